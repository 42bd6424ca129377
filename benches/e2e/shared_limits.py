"""The per-client limits shared in Redis (``--redis``, a private
``redis-server`` on loopback) against the same limits counted per process:
``max_connections_per_client``, ``max_connection_rate_per_client`` and
``max_message_rate_per_client`` set high enough never to refuse, the benchmark
policy otherwise (``KUMO_BENCH_CLIENT_LIMITS``), a new connection per 1 KB
message. Both servers run at once and their timed runs take turns. Targets:
server CPU per message ≤ 1.15x, throughput ≥ 0.9x.

Then the Redis round trips, from ``INFO commandstats`` around two counted runs
of the ``--redis`` server (a new connection per message, and reused
connections: one connection per session), solved for the calls per
connection and per message. Only the commands a client sends count (EVALSHA,
EVAL, SCRIPT, ZREM), not those the scripts run."""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import (
    KUMO_LIMITS_LOCAL,
    KUMO_LIMITS_REDIS,
    LOOPBACK,
    BenchError,
    ServerKind,
    Settings,
    Shape,
    Throughput,
    Tools,
    log,
    shapes_json,
)
from .processes import RunningServer, free_port
from .servers import running_server
from .throughput import measure_in_turns, record_error, start_servers, timed_run

NEW_CONNECTION = Shape(
    "shared_limits_new_connection_1k", "new connection per message, 1 KB", 1024, False, 160, 20
)
REUSED = Shape("shared_limits_reused_1k", "reused connections, 1 KB", 1024, True, 320, 20)
SERVERS = (KUMO_LIMITS_LOCAL, KUMO_LIMITS_REDIS)
# The commands a client of Redis sends for the limits (what the scripts call is not counted).
CLIENT_COMMANDS = ("evalsha", "eval", "script", "zrem")
COUNTED_MESSAGES = 2000
READY_TIMEOUT = 10.0


@dataclass(frozen=True)
class Redis:
    port: int

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def command(self, *args: str) -> str:
        """One command over a new connection; its reply as text (a bulk or simple string)."""
        request = f"*{len(args)}\r\n" + "".join(f"${len(arg)}\r\n{arg}\r\n" for arg in args)
        with socket.create_connection((LOOPBACK, self.port), timeout=5) as connection:
            connection.sendall(request.encode())
            stream = connection.makefile("rb")
            first = stream.readline().decode()
            if first.startswith("$"):
                return stream.read(int(first[1:]) + 2)[:-2].decode()
            if first.startswith("-"):
                raise BenchError(f"redis {' '.join(args)}: {first.strip()}")
            return first[1:].strip()

    def client_calls(self) -> dict[str, int]:
        """Calls so far of each of CLIENT_COMMANDS."""
        stats = self.command("INFO", "commandstats")
        calls = {}
        for name in CLIENT_COMMANDS:
            found = re.search(rf"^cmdstat_{name}:calls=(\d+)", stats, re.MULTILINE)
            calls[name] = int(found.group(1)) if found else 0
        return calls


@contextlib.contextmanager
def running_redis(settings: Settings) -> Iterator[Redis]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("no redis-server (the Debian package redis-server)")
    workdir = Path(tempfile.mkdtemp(prefix="redis-", dir=settings.workdir))
    redis = Redis(free_port())
    command = [binary, "--port", str(redis.port), "--bind", LOOPBACK, "--save", ""]
    command += ["--appendonly", "no", "--dir", str(workdir)]
    log(f"e2e: starting Redis: {' '.join(command)}")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_redis(redis, process)
        yield redis
    finally:
        process.kill()
        process.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def wait_for_redis(redis: Redis, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        with contextlib.suppress(OSError, BenchError):
            if redis.command("PING") == "PONG":
                return
        if process.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"redis-server on port {redis.port} did not answer")
        time.sleep(0.05)


def counted_run(
    redis: Redis, server: RunningServer, tools: Tools, settings: Settings, shape: Shape
) -> tuple[int, int]:
    """(messages, Redis client calls) of one run of ``shape``."""
    count = max(settings.sessions, shape.quick_count if settings.quick else COUNTED_MESSAGES)
    before = redis.client_calls()
    run = timed_run(server, tools, settings, shape, count)
    # The lease releases (ZREM) are sent after the session ends: let them land.
    time.sleep(0.5)
    after = redis.client_calls()
    return run.count, sum(after.values()) - sum(before.values())


def round_trips(
    redis: Redis, server: RunningServer, tools: Tools, settings: Settings
) -> dict[str, Any]:
    """Redis calls per connection and per message, from a run with a
    connection per message (c + m per message) and one with ``sessions``
    connections (c * sessions + m * messages)."""
    new_messages, new_calls = counted_run(redis, server, tools, settings, NEW_CONNECTION)
    reused_messages, reused_calls = counted_run(redis, server, tools, settings, REUSED)
    per_new_message = new_calls / new_messages
    # c + m = per_new_message; c * S + m * M = reused_calls.
    sessions = settings.sessions
    per_message = (reused_calls - per_new_message * sessions) / (reused_messages - sessions)
    return {
        "commands": list(CLIENT_COMMANDS),
        "new_connection_run": {"messages": new_messages, "calls": new_calls},
        "reused_run": {"messages": reused_messages, "connections": sessions, "calls": reused_calls},
        "per_connection": per_new_message - per_message,
        "per_message": per_message,
    }


def measure(tools: Tools, settings: Settings) -> dict[str, Any]:
    """The JSON section: the shape, its servers' runs, and the Redis round trips."""
    results = {NEW_CONNECTION.key: {kind.key: Throughput() for kind in SERVERS}}
    trips: dict[str, Any] = {"error": None}
    with contextlib.ExitStack() as stack:
        try:
            redis = stack.enter_context(running_redis(settings))
        except BenchError as error:
            log(f"e2e: Redis: {error}")
            for item in results[NEW_CONNECTION.key].values():
                item.error = f"Redis did not start: {error}"
            return section(results, settings, {"error": str(error)})

        def start(kind: ServerKind) -> AbstractContextManager[RunningServer]:
            extra = ["--redis", redis.url] if kind is KUMO_LIMITS_REDIS else []
            return running_server(kind, tools, settings, extra_arguments=extra)

        servers = start_servers(stack, SERVERS, start, results)
        row = results[NEW_CONNECTION.key]
        measure_in_turns(servers, tools, settings, NEW_CONNECTION, row, "shared limits")
        shared = servers.get(KUMO_LIMITS_REDIS.key)
        if shared is not None:
            counted = Throughput()
            with record_error(counted):
                trips = {**round_trips(redis, shared, tools, settings), "error": None}
            if counted.error is not None:
                trips = {"error": counted.error}
            log(f"e2e: shared limits, Redis round trips: {trips}")
    return section(results, settings, trips)


def section(
    results: dict[str, dict[str, Throughput]], settings: Settings, trips: dict[str, Any]
) -> dict[str, Any]:
    shaped = shapes_json((NEW_CONNECTION,), SERVERS, results, settings.sessions)
    shaped[NEW_CONNECTION.key]["redis_round_trips"] = trips
    return shaped
