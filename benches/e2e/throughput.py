"""Messages per second: Postfix's smtp-source against each server, one server
after the other, in three shapes (a new connection per 1 KB message, reused
connections with 1 KB and with 100 KB messages)."""

from __future__ import annotations

import contextlib
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

from .common import (
    AIOSMTPD,
    KUMO_DEF_HOOKS,
    KUMO_DISCARD,
    KUMO_MAILDIR,
    KUMO_OBSERVED,
    KUMO_SEED,
    LOOPBACK,
    RECIPIENT,
    SENDER,
    SMTP_SINK,
    BenchError,
    Measured,
    Run,
    ServerKind,
    Settings,
    Shape,
    Throughput,
    Tools,
    log,
    shapes_json,
)
from .processes import RunningServer, children_cpu_seconds
from .servers import running_server

SHAPES = (
    Shape("new_connection_1k", "new connection per message, 1 KB", 1024, False, 160, 20),
    Shape("reused_connection_1k", "reused connections, 1 KB", 1024, True, 320, 20),
    Shape("reused_connection_100k", "reused connections, 100 KB", 102400, True, 64, 5),
)
SERVERS = (
    KUMO_DISCARD,
    KUMO_OBSERVED,
    KUMO_DEF_HOOKS,
    KUMO_SEED,
    KUMO_MAILDIR,
    AIOSMTPD,
    SMTP_SINK,
)
MIN_CALIBRATION_SECONDS = 0.5
MESSAGE_OVERHEAD_BYTES = 4096  # headers smtp-source and the server add, file system slack
MESSAGES_PER_CONNECTION_CAP = 5000  # kumo_listener's max_messages_per_connection is 10000


def smtp_source_command(
    tools: Tools, port: int, shape: Shape, count: int, sessions: int
) -> list[str]:
    command = [tools.smtp_source, "-s", str(sessions), "-l", str(shape.size), "-m", str(count)]
    command += ["-f", SENDER, "-t", RECIPIENT]
    if shape.reuse:
        command.append("-d")  # "don't disconnect after sending a message"
    return [*command, f"{LOOPBACK}:{port}"]


def timed_run(
    server: RunningServer, tools: Tools, settings: Settings, shape: Shape, count: int
) -> Run:
    """Send ``count`` messages and time it, or raise BenchError."""
    server.check_alive()
    server.new_log_output()
    server.make_room(count * (shape.size + MESSAGE_OVERHEAD_BYTES))
    counter_before, files_before = server.received(), server.delivered_files()
    upstream_before = None if server.upstream is None else server.upstream.received()
    command = smtp_source_command(tools, server.port, shape, count, settings.sessions)
    result, run = run_load(server, command, settings.run_timeout)
    if result.stderr.strip():
        raise BenchError(f"{shlex.join(command)} wrote to stderr:\n{result.stderr}")
    check_delivery(server, counter_before, files_before, count)
    if server.upstream is not None:  # what a forwarder counts is not what arrived
        check_delivery(server.upstream, upstream_before, None, count)
    return Run(count, run.seconds, run.server_cpu, run.client_cpu)


def run_load(
    server: RunningServer, command: list[str], timeout: float
) -> tuple[subprocess.CompletedProcess[str], Run]:
    """Run a load generator against ``server``: its output, and the run (count 1)."""
    server_cpu, client_cpu = server.cpu_seconds(), children_cpu_seconds()
    started = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise BenchError(f"{shlex.join(command)} timed out after {error.timeout} s") from None
    elapsed = time.perf_counter() - started
    server_cpu = server.cpu_seconds() - server_cpu
    client_cpu = children_cpu_seconds() - client_cpu
    if result.returncode != 0:
        raise BenchError(f"{shlex.join(command)} exited with {result.returncode}:\n{result.stderr}")
    return result, Run(1, elapsed, server_cpu, client_cpu)


def check_delivery(
    server: RunningServer, counter_before: int | None, files_before: int | None, sent: int
) -> None:
    server.check_log()
    if counter_before is not None:
        counted = server.received(at_least=counter_before + sent)
        assert counted is not None
        if counted - counter_before != sent:
            raise BenchError(
                f"{server.kind.title} counted {counted - counter_before} messages, sent {sent}"
            )
    files_after = server.delivered_files()
    if files_after is not None and files_before is not None and files_after - files_before != sent:
        delivered = files_after - files_before
        raise BenchError(f"{server.kind.title}: {delivered} new files in new/, sent {sent}")


def message_cap(shape: Shape, settings: Settings) -> int:
    return settings.sessions * MESSAGES_PER_CONNECTION_CAP if shape.reuse else 1_000_000


def calibrate(server: RunningServer, tools: Tools, settings: Settings, shape: Shape) -> int:
    """Warm up, growing the count until a run lasts long enough to give a rate,
    and return the count for a run of about ``settings.seconds``."""
    cap = message_cap(shape, settings)
    count = min(cap, settings.sessions * shape.warmup_per_session)
    while True:
        elapsed = timed_run(server, tools, settings, shape, count).seconds
        if elapsed >= MIN_CALIBRATION_SECONDS or count >= cap:
            break
        count = min(cap, count * 4)
    wanted = int(count / elapsed * settings.seconds)
    return max(settings.sessions, min(cap, wanted))


def measure_count(
    server: RunningServer, tools: Tools, settings: Settings, shape: Shape, into: Measured
) -> int:
    """The message count of a timed run (0 when the warm-up failed, in ``into.error``)."""
    with record_error(into):
        return shape.quick_count if settings.quick else calibrate(server, tools, settings, shape)
    return 0


@contextlib.contextmanager
def record_error(into: Measured) -> Iterator[None]:
    try:
        yield
    except BenchError as error:
        into.error = str(error)


def measure_shape(
    server: RunningServer, tools: Tools, settings: Settings, shape: Shape
) -> Throughput:
    result = Throughput()
    result.messages_per_run = measure_count(server, tools, settings, shape, result)
    with record_error(result):
        for _ in range(settings.repeat if result.error is None else 0):
            result.runs.append(timed_run(server, tools, settings, shape, result.messages_per_run))
    status = result.error or result.rates_text() + " msgs/s"
    log(f"e2e: {server.kind.title}, {shape.title}, {result.messages_per_run} msgs: {status}")
    return result


def start_servers(
    stack: contextlib.ExitStack,
    kinds: tuple[ServerKind, ...],
    start: Callable[[ServerKind], AbstractContextManager[RunningServer]],
    results: dict[str, dict[str, Throughput]],
) -> dict[str, RunningServer]:
    """Start a server of each kind, to run at once; one that fails to start has
    that error in each shape of ``results`` (shape key → server key → runs).
    The running ones by key; ``stack`` stops them."""
    servers: dict[str, RunningServer] = {}
    for kind in kinds:
        try:
            servers[kind.key] = stack.enter_context(start(kind))
        except BenchError as error:
            log(f"e2e: {kind.title}: {error}")
            for row in results.values():
                row[kind.key].error = str(error)
    return servers


def measure_in_turns(
    servers: dict[str, RunningServer],
    tools: Tools,
    settings: Settings,
    shape: Shape,
    row: dict[str, Throughput],
    label: str,
) -> None:
    """One shape against servers running at once: each calibrated, then their
    timed runs take turns, so that whatever else loads the machine falls on
    each alike; ``row``: server key → its runs."""
    for key, server in servers.items():
        row[key].messages_per_run = measure_count(server, tools, settings, shape, row[key])
    for _ in range(settings.repeat):
        for key, server in servers.items():
            if row[key].error is None:
                with record_error(row[key]):
                    count = row[key].messages_per_run
                    row[key].runs.append(timed_run(server, tools, settings, shape, count))
    for key, server in servers.items():
        status = row[key].error or row[key].rates_text()
        log(f"e2e: {label}, {server.kind.title}, {shape.title}: {status} msgs/s")


def measure_server(kind: ServerKind, tools: Tools, settings: Settings) -> dict[str, Throughput]:
    """All shapes against one server process."""
    try:
        with running_server(kind, tools, settings) as server:
            return {shape.key: measure_shape(server, tools, settings, shape) for shape in SHAPES}
    except BenchError as error:
        log(f"e2e: {kind.title}: {error}")
        return {shape.key: Throughput(error=str(error)) for shape in SHAPES}


def measure(tools: Tools, settings: Settings) -> dict[str, Any]:
    """The JSON section: shape key → the shape and, by server key, its runs."""
    results: dict[str, dict[str, Throughput]] = {shape.key: {} for shape in SHAPES}
    for kind in SERVERS:
        for shape_key, runs in measure_server(kind, tools, settings).items():
            results[shape_key][kind.key] = runs
    return shapes_json(SHAPES, SERVERS, results, settings.sessions)
