"""The ``kumo-listener`` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import pwd
import resource
import runpy
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from . import _core, privileges
from .logs import JsonFormatter
from .redis_overrides import DEFAULT_CHANNEL, DEFAULT_KEY_PREFIX, RedisOverrides
from .server import Server, configure, configure_dns, default_server


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "check":
        return check(Path(args.file))
    if args.command == "overrides":
        return overrides(args)
    return serve(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kumo-listener", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the listener")
    serve.add_argument("--policy", help="a Python policy file")
    serve.add_argument(
        "--listen",
        help="address (or Unix socket path) to listen on when the policy has no init handler"
        f" (default {_core.DEFAULT_LISTEN})",
    )
    serve.add_argument(
        "--maildir", default="maildir", help="Maildir to deliver to (default ./maildir)"
    )
    serve.add_argument("--sink", choices=["maildir", "discard"], default="maildir")
    serve.add_argument(
        "--forward-to",
        metavar="URL",
        action="append",
        default=[],
        help="relay each message to this upstream (smtp://HOST[:PORT], lmtp://HOST:PORT or"
        " lmtp:/path.sock) before answering; repeat for fail-over, in order (the default"
        " listener's forward_to)",
    )
    serve.add_argument("--log-level", default="INFO", help="Python logging level (default INFO)")
    serve.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="text lines, or one JSON object per record (default text)",
    )
    serve.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="processes sharing the listening ports (SO_REUSEPORT), each with its own "
        "interpreter, so Python policy runs on several cores (default 1)",
    )
    serve.add_argument(
        "--handler-threads",
        type=positive_int,
        help="threads that run def handlers (default 40)",
    )
    serve.add_argument(
        "--metrics",
        metavar="ADDR",
        help="serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9155"
        " (with --workers N, worker i listens on the port plus i)",
    )
    serve.add_argument(
        "--user",
        help="when started as root: run init (which binds the listeners) as root, then "
        "become this user and its groups before any connection is accepted",
    )
    serve.add_argument(
        "--redis",
        metavar="URL",
        help="share the per-client limits with every server using this Redis,"
        " redis://HOST:PORT[/DB] (default: counted per process)",
    )
    serve.add_argument(
        "--redis-timeout",
        metavar="DURATION",
        type=duration,
        help="each call to --redis may take this long (seconds, or e.g. 100ms) before this"
        " process's own counts decide (default 0.1)",
    )
    serve.add_argument(
        "--redis-fail-closed",
        action="store_true",
        help="when --redis does not answer, refuse new connections (421 4.3.0) rather than"
        " count per process",
    )
    serve.add_argument(
        "--dns-server",
        metavar="HOST:PORT",
        action="append",
        default=[],
        help="a name server for the authentication checks (SPF, DKIM, DMARC, ARC, iprev),"
        " instead of the system's; repeat for several",
    )
    serve.add_argument(
        "--dns-timeout",
        type=float,
        default=_core.DEFAULT_DNS[0],
        help=f"seconds a DNS query waits for a server (default {_core.DEFAULT_DNS[0]:g})",
    )
    serve.add_argument(
        "--dns-attempts",
        type=positive_int,
        default=_core.DEFAULT_DNS[1],
        help=f"times a DNS query is sent (default {_core.DEFAULT_DNS[1]})",
    )
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    check = commands.add_parser("check", help="validate a TOML or JSON overrides file")
    check.add_argument("file")
    add_overrides_parser(commands)
    return parser


def add_overrides_parser(commands: Any) -> None:
    """``kumo-listener overrides``: the overrides kept in Redis (redis_overrides)."""
    parser = commands.add_parser("overrides", help="show or change the overrides kept in Redis")
    parser.add_argument("--redis", required=True, metavar="URL", help="redis://HOST:PORT[/DB]")
    parser.add_argument("--key-prefix", default=DEFAULT_KEY_PREFIX, help="%(default)s")
    parser.add_argument("--channel", default=DEFAULT_CHANNEL, help="%(default)s")
    actions = parser.add_subparsers(dest="action", required=True)
    show = actions.add_parser("show", help="print the overrides of NAME as JSON")
    show.add_argument("name")
    change = actions.add_parser("set", help="validate, store and publish overrides of NAME")
    change.add_argument("name")
    change.add_argument(
        "assignments",
        nargs="+",
        metavar="KEY=VALUE",
        help="a parameter and its value: JSON, or else a string",
    )
    change.add_argument("--replace", action="store_true", help="drop the other parameters")
    delete = actions.add_parser("delete", help="remove parameters (or all) of NAME, publish")
    delete.add_argument("name")
    delete.add_argument("fields", nargs="*", metavar="KEY")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def duration(text: str) -> float:
    """Seconds in ``text``: a number, or a duration such as ``100ms``."""
    try:
        seconds = _core.duration_seconds(float(text))
    except ValueError:
        try:
            seconds = _core.duration_seconds(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration above zero, got {text}")
    return seconds


def serve(args: argparse.Namespace) -> int:
    try:
        user = privileges.lookup_user(args.user) if args.user else None
        # Who to become once bound: None without --user, or when already that user.
        become = user if user is not None and privileges.needs_drop(user) else None
    except privileges.PrivilegeError as error:
        print(f"kumo-listener: {error}", file=sys.stderr)
        return 2
    handler = configure_logging(args.log_level, args.log_format)
    open_files = raise_open_files_limit()
    if become is not None and args.sink == "maildir":
        # Created here as root, owned by the user, before the server (or the
        # workers) open it.
        privileges.prepare_maildir(args.maildir, become)
    if args.workers > 1:
        if args.listen and args.listen.startswith("/"):
            print("kumo-listener: a Unix socket cannot be shared by --workers", file=sys.stderr)
            return 2
        return supervise_workers(args, become)
    try:
        configure_dns(args.dns_server, timeout=args.dns_timeout, attempts=args.dns_attempts)
    except ValueError as error:
        print(f"kumo-listener: {error}", file=sys.stderr)
        return 2
    configure(
        sink=args.sink,
        maildir=args.maildir,
        reuse_port=args.reuse_port,
        handler_threads=args.handler_threads,
        redis=args.redis,
        redis_timeout=args.redis_timeout,
        redis_fail_closed=args.redis_fail_closed,
    )
    if args.policy and not load_policy(args.policy):
        return 2
    try:
        server = default_server()
    except ValueError as error:
        # A --redis URL that is no URL.
        print(f"kumo-listener: {error}", file=sys.stderr)
        return 2
    if logging_is_the_clis(handler):
        server.write_logs_directly(args.log_format)
    has_init = server.policy.handler("init") is not None
    for option, given in (("--listen", args.listen), ("--forward-to", args.forward_to)):
        if has_init and given:
            conflict = f"kumo-listener: {option} conflicts with the policy's init handler"
            print(conflict, file=sys.stderr)
            return 2

    def ready() -> None:
        # Called after init, before the sessions run: bind, then drop root.
        if not has_init:
            listen = args.listen or _core.DEFAULT_LISTEN
            server.start_esmtp_listener(listen=listen, forward_to=args.forward_to)
        warn_if_few_open_files(open_files, server)
        if args.metrics:
            serve_metrics(server, args.metrics)
        if become is not None:
            privileges.drop_privileges(become)
        elif user is None:
            privileges.warn_if_root()
        places = ", ".join(describe_address(x.address) for x in server.listeners)
        # One write: workers share the pipe, and print() writes the newline apart.
        goes_to = ", then ".join(args.forward_to) if args.forward_to else server.sink
        sys.stdout.write(
            f"kumo-listener: listening on {places or 'nothing'}; mail goes to {goes_to}\n"
        )
        sys.stdout.flush()

    try:
        server.run_forever(handle_signals=True, run_init=True, on_ready=ready)
    except (_core.ParamsError, OSError, privileges.PrivilegeError) as error:
        # Invalid listener parameters or an address that can't be bound: the
        # message says what and where; a traceback would only hide it.
        print(f"kumo-listener: {error}", file=sys.stderr)
        return 1
    return 0


def configure_logging(level: str, log_format: str) -> logging.Handler:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    return handler


def logging_is_the_clis(handler: logging.Handler) -> bool:
    """Whether the core's records would only reach ``handler``: then the core
    writes them itself, in the same format. A policy that adds handlers or
    filters keeps them going through ``logging``."""
    ours = logging.getLogger("kumo_listener")
    root = logging.getLogger()
    only_ours = root.handlers == [handler] and ours.propagate
    return only_ours and not (ours.handlers or ours.filters or root.filters)


def serve_metrics(server: Server, address: str) -> None:
    """Prometheus metrics at ``http://ADDRESS/metrics``, on a thread of their
    own, with a read timeout and a cap on the connections held open."""
    import prometheus_client

    from .metrics import MetricsServer

    host, _, port = address.rpartition(":")
    registry = prometheus_client.CollectorRegistry()
    registry.register(server.metrics_collector())
    MetricsServer(registry, host.strip("[]") or "0.0.0.0", int(port))


def raise_open_files_limit() -> int:
    """Raise the soft limit on open files to the hard one (each connection
    holds a descriptor; many systems start processes at 1,024); the soft
    limit in force after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def warn_if_few_open_files(limit: int, server: Server) -> None:
    """A WARNING when the listeners may hold more connections than the
    process may open files."""
    wanted = sum(listener.max_connections for listener in server.listeners)
    if limit != resource.RLIM_INFINITY and limit < wanted:
        logging.getLogger("kumo_listener").warning(
            "the open files limit (%d, RLIMIT_NOFILE) is below the %d connections the listeners"
            " may hold (max_connections): past it, connections are refused at accept; raise"
            " the hard limit (LimitNOFILE= in a systemd unit, ulimit -Hn) or lower"
            " max_connections",
            limit,
            wanted,
        )


def supervise_workers(args: argparse.Namespace, user: pwd.struct_passwd | None) -> int:
    """Run ``args.workers`` copies of this command sharing their ports; pass
    SIGINT/SIGTERM on to them and exit when all have, with the worst status.
    With ``--user``, each worker binds as root and drops privileges itself;
    this process, which runs no policy, drops them once they are started."""
    workers = [
        subprocess.Popen([sys.executable, "-m", "kumo_listener", *worker_arguments(args, index)])
        for index in range(args.workers)
    ]
    if user is not None:
        privileges.drop_privileges(user)

    def forward(signum: int, _frame: object) -> None:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    statuses = [worker.wait() for worker in workers]
    return next((status for status in statuses if status), 0)


def describe_address(address: tuple[str, int] | str) -> str:
    if isinstance(address, str):
        return address
    host, port = address
    return f"{host}:{port}"


def worker_arguments(args: argparse.Namespace, index: int) -> list[str]:
    """The ``serve`` arguments of worker ``index``: the same, as a single
    process, with its metrics on a port of its own."""
    given = {
        "--policy": args.policy,
        "--listen": args.listen,
        "--maildir": args.maildir,
        "--sink": args.sink,
        "--log-level": args.log_level,
        "--log-format": args.log_format,
        "--handler-threads": args.handler_threads and str(args.handler_threads),
        "--metrics": args.metrics and worker_metrics_address(args.metrics, index),
        "--user": args.user,
        "--redis": args.redis,
        "--redis-timeout": args.redis_timeout and str(args.redis_timeout),
        "--dns-timeout": str(args.dns_timeout),
        "--dns-attempts": str(args.dns_attempts),
    }
    options = [part for name, value in given.items() if value for part in (name, value)]
    if args.redis_fail_closed:
        options.append("--redis-fail-closed")
    forwards = [part for url in args.forward_to for part in ("--forward-to", url)]
    dns = [part for server in args.dns_server for part in ("--dns-server", server)]
    return ["serve", *options, *forwards, *dns, "--reuse-port"]


def worker_metrics_address(address: str, index: int) -> str:
    host, _, port = address.rpartition(":")
    return f"{host}:{int(port) + index}"


def load_overrides(path: Path) -> Any:
    """Read a TOML or JSON file (by extension; TOML when unsure)."""
    if path.suffix.lower() == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    return tomllib.loads(path.read_text(encoding="utf-8"))


def load_policy(path: str) -> bool:
    """Run the policy file; a file that cannot be read or parsed is one line
    on standard error (an exception its code raises keeps its traceback)."""
    if Path(path).is_dir():
        print(f"kumo-listener: policy {path}: a directory, not a Python file", file=sys.stderr)
        return False
    try:
        runpy.run_path(path, run_name="kumo_policy")
    except OSError as error:
        print(f"kumo-listener: policy {path}: {error.strerror or error}", file=sys.stderr)
        return False
    except SyntaxError as error:
        where = f"{error.filename}:{error.lineno}" if error.lineno else path
        print(f"kumo-listener: policy {where}: {error.msg}", file=sys.stderr)
        return False
    return True


def check(path: Path) -> int:
    try:
        data = load_overrides(path)
    except (OSError, ValueError) as error:
        print(f"{path}: {error}", file=sys.stderr)
        return 1
    errors = _core.validate_overrides(data)
    for problem in errors:
        print(f"{path}: {problem}", file=sys.stderr)
    if not errors:
        print(f"{path}: OK")
    return 1 if errors else 0


def overrides(args: argparse.Namespace) -> int:
    try:
        store = RedisOverrides(args.redis, key_prefix=args.key_prefix, channel=args.channel)
        given = args.assignments if args.action == "set" else []
        params = dict(assignment(text) for text in given)
        asyncio.run(overrides_action(store, args, params))
    except ImportError as error:
        print(f"kumo-listener: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        # Invalid parameters, a field that is not JSON, Redis unreachable.
        print(f"kumo-listener: overrides {args.action} {args.name}: {error}", file=sys.stderr)
        return 1
    return 0


def assignment(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``: the value as JSON when it is JSON, else the string."""
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


async def overrides_action(
    store: RedisOverrides, args: argparse.Namespace, params: dict[str, Any]
) -> None:
    try:
        if args.action == "show":
            print(json.dumps(await store.load(args.name), indent=2, sort_keys=True))
        elif args.action == "set":
            await store.set(args.name, params, replace=args.replace)
        else:
            await store.delete(args.name, *args.fields)
    finally:
        await store.aclose()


if __name__ == "__main__":
    sys.exit(main())
