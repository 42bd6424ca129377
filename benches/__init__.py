"""Benchmarks: ``python3 -m benches.e2e`` (end to end), ``python_params.py``,
the Rust ``hot_path.rs`` and ``starttls-load``."""
