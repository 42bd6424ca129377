#!/usr/bin/env bash
# Install everything the tests need (tools/install-deps.sh), then run all of
# them: Rust unit tests, lint (clippy, ruff, mypy, no import circle in
# rust/), the docs site built strictly, the Python suite against the built
# package over real sockets, every fuzz target for a bounded time, and the
# benchmarks once in their quick mode (so that they cannot rot; their numbers
# mean nothing here). Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

bash tools/install-deps.sh

# Without the `python` feature nothing links libpython: the unit tests,
# benches and fuzz targets run as they are. Clippy checks the crate both
# without and with it (the PyO3 layer, rust/py).
cargo test --release --lib
cargo clippy --release --all-targets --quiet -- -D warnings
cargo clippy --release --all-targets --all-features --quiet -- -D warnings
python3 -m ruff check python tests benches docs tools
python3 -m ruff format --check python tests benches docs tools
python3 -m mypy python/kumo_listener
python3 tools/module-cycles.py
python3 -m mkdocs build --strict --site-dir "$(mktemp -d)"
# The stubs of the compiled core against the installed module.
python3 -m mypy.stubtest kumo_listener._core
python3 -m pytest "$@"
# The abi3 wheel, installed into a fresh venv without cargo, runs.
bash tools/wheel-smoke.sh

bash tools/fuzz.sh "${FUZZ_SECONDS:-15}"

cargo bench --no-run --quiet
cargo clippy --release --all-targets --quiet --manifest-path benches/starttls-load/Cargo.toml -- -D warnings
python3 benches/python_params.py --quick
python3 -m benches.e2e --quick
