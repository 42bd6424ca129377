"""The command line: ``python3 -m benches.e2e [--quick] [--json PATH] ...``
(from the repository root). See the package's docstring for what it measures."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import (
    authentication,
    body_memory,
    durable,
    forwarding,
    idle_memory,
    shared_limits,
    starttls,
    throughput,
)
from .common import MEASUREMENTS, Settings
from .conditions import conditions
from .prerequisites import check_tools, make_certificates, raise_open_file_limit
from .report import failures, render_markdown

MODULES = {
    "throughput": throughput,
    "forwarding": forwarding,
    "shared_limits": shared_limits,
    "starttls": starttls,
    "idle_memory": idle_memory,
    "durable": durable,
    "body_memory": body_memory,
    "authentication": authentication,
}
assert tuple(MODULES) == MEASUREMENTS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python3 -m benches.e2e",
        description="End-to-end SMTP benchmark: kumo_listener, aiosmtpd, smtp-sink, Postfix.",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny counts, 1 run")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--sessions", type=int, default=50, help="parallel smtp-source sessions")
    parser.add_argument("--repeat", type=int, help="timed runs per cell (default 3, quick 1)")
    parser.add_argument("--seconds", type=float, default=3.0, help="target length of a run")
    parser.add_argument("--idle", type=int, help="idle connections (default 5000, quick 200)")
    parser.add_argument(
        "--kumo-log-level", default="WARNING", help="kumo_listener --log-level (default WARNING)"
    )
    parser.add_argument(
        "--durable-sessions", type=int, default=50, help="sessions of the durable comparison"
    )
    parser.add_argument(
        "--memory-sessions", type=int, help="slow sessions with a big message (default 50, quick 4)"
    )
    parser.add_argument(
        "--memory-megabytes", type=int, default=5, help="size of each slow session's message"
    )
    parser.add_argument(
        "--memory-seconds", type=float, help="how long each slow body takes (default 4, quick 0.5)"
    )
    parser.add_argument(
        "--skip",
        action="append",
        choices=MEASUREMENTS,
        default=[],
        help="leave this measurement out (repeatable)",
    )
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace, workdir: Path) -> Settings:
    return Settings(
        quick=args.quick,
        sessions=args.sessions,
        repeat=args.repeat or (1 if args.quick else 3),
        seconds=args.seconds,
        idle=args.idle or (200 if args.quick else 5000),
        kumo_log_level=args.kumo_log_level,
        run_timeout=60.0 if args.quick else 120.0,
        workdir=workdir,
        durable_sessions=args.durable_sessions,
        memory_sessions=args.memory_sessions or (4 if args.quick else 50),
        memory_megabytes=args.memory_megabytes,
        memory_seconds=args.memory_seconds or (0.5 if args.quick else 4.0),
        skip=tuple(name for name in MEASUREMENTS if name in args.skip),
    )


def flags_of(args: argparse.Namespace) -> dict[str, Any]:
    """The command-line options as given (None: the default), for the JSON."""
    return {
        name: str(value) if isinstance(value, Path) else value for name, value in vars(args).items()
    }


def run(args: argparse.Namespace, settings: Settings) -> int:
    tools = check_tools(settings)
    make_certificates(settings.tls_dir)
    raise_open_file_limit(settings.idle + 1024)
    document: dict[str, Any] = {
        "schema": 1,
        "conditions": conditions(flags_of(args), settings),
        "results": {},
    }
    started = time.monotonic()
    for name, module in MODULES.items():
        if name not in settings.skip:
            document["results"][name] = module.measure(tools, settings)
    document["conditions"]["duration_seconds"] = round(time.monotonic() - started, 1)
    print(render_markdown(document), end="", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    return 1 if failures(document["results"]) else 0


def raise_system_exit(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so that ``finally`` blocks stop the servers."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, raise_system_exit)
    workdir = Path(tempfile.mkdtemp(prefix="kumo-e2e-"))
    try:
        return run(args, settings_from(args, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
