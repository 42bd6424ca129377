"""Cost of turning a Python dict of the seed's shape into native listener
parameters, as a dynamic hook returning a dict pays on every connection, and
what `kumo.ListenerParams` saves.

    python3 benches/python_params.py            # medians of 7 runs, microseconds
    python3 benches/python_params.py --quick    # one short run (CI)
"""

from __future__ import annotations

import argparse
import statistics
import timeit

import kumo_listener as kumo

SEED_OVERRIDES = {
    "via": {
        "10.0.0.1": {"hostname": "mx.example-customer.com"},
        "10.0.0.2": {"hostname": "mx.other-customer.com", "banner": "other customer's MX"},
    }
}


def per_call_microseconds(statement: str, number: int, repeat: int) -> float:
    namespace = {"kumo": kumo, "overrides": SEED_OVERRIDES}
    runs = timeit.repeat(statement, globals=namespace, number=number, repeat=repeat)
    return statistics.median(runs) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    number, repeat = (1_000, 1) if args.quick else (50_000, 7)
    cases = {
        "dict → native (what a hook returning a dict costs per connection)": (
            "kumo.validate_overrides(overrides)"
        ),
        "dict → ListenerParams (once, then memoized)": "kumo.ListenerParams(overrides)",
    }
    for label, statement in cases.items():
        print(f"{per_call_microseconds(statement, number, repeat):8.2f} µs  {label}")


if __name__ == "__main__":
    main()
