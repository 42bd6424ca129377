"""Memory while slow sessions send big messages: ``--memory-sessions`` clients
each send a message of ``--memory-megabytes`` over ``--memory-seconds`` and wait
before the final dot; kumo_listener (Maildir), aiosmtpd and the Postfix queue.
Memory is the sum of the Pss (``/proc/PID/smaps_rollup``) of the server's
process tree: before, at the pause, and the highest of samples every 0.1 s; for
single processes also VmHWM (reset through ``clear_refs``) minus VmRSS before."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import (
    AIOSMTPD,
    KUMO_MAILDIR,
    LOOPBACK,
    POSTFIX_QUEUE,
    RECIPIENT,
    SENDER,
    BenchError,
    ServerKind,
    Settings,
    Tools,
    log,
)
from .processes import RunningServer, process_tree, status_kib, warm_up_connections
from .servers import running_server

SERVERS = (KUMO_MAILDIR, AIOSMTPD, POSTFIX_QUEUE)
BODY_LINE = b"x" * 998 + b"\r\n"
BODY_CHUNK_LINES = 64


@dataclass
class BodyMemory:
    """Memory of a server's processes (the sum of their Pss, so that pages they
    share count once) while ``sessions`` clients each send a big message slowly."""

    sessions: int = 0
    baseline_kib: int = 0
    at_pause_kib: int = 0
    """All bodies sent but for the final dot."""
    peak_kib: int = 0
    """The highest of the samples taken every ``MEMORY_SAMPLE_SECONDS``, end of data included."""
    hwm_growth_kib: int | None = None
    """Single-process servers: VmHWM at the end minus VmRSS before (exact peak)."""
    error: str | None = None

    def growth_mib(self, value_kib: int) -> float:
        return (value_kib - self.baseline_kib) / 1024


MEMORY_SAMPLE_SECONDS = 0.1


def tree_pss_kib(root: int) -> int:
    """The proportional set size of a process and its descendants."""
    total = 0
    for pid in process_tree(root):
        with contextlib.suppress(OSError):  # gone meanwhile
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
    return total


class MemorySampler:
    """Samples the Pss of a process tree in a thread, keeping the highest."""

    def __init__(self, root: int) -> None:
        self.root, self.peak_kib = root, 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.sample_until_stopped, daemon=True)

    def sample_until_stopped(self) -> None:
        while not self.stopped.wait(MEMORY_SAMPLE_SECONDS):
            self.peak_kib = max(self.peak_kib, tree_pss_kib(self.root))

    def __enter__(self) -> MemorySampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()


async def read_reply(reader: asyncio.StreamReader, code: bytes) -> None:
    while True:
        line = await reader.readline()
        if not line.startswith(code):
            raise BenchError(f"expected {code.decode()}, got {line!r}")
        if line[3:4] != b"-":
            return


async def slow_session(
    port: int, settings: Settings, paused: asyncio.Queue[None], go: asyncio.Event
) -> None:
    """One message of ``--memory-megabytes``, sent over ``--memory-seconds``;
    then wait for ``go`` before the final dot."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        await read_reply(reader, b"220")
        for command, code in (
            (b"EHLO client.example", b"250"),
            (f"MAIL FROM:<{SENDER}>".encode(), b"250"),
            (f"RCPT TO:<{RECIPIENT}>".encode(), b"250"),
            (b"DATA", b"354"),
        ):
            writer.write(command + b"\r\n")
            await read_reply(reader, code)
        chunk = BODY_LINE * BODY_CHUNK_LINES
        chunks = settings.memory_megabytes * 1024 * 1024 // len(chunk)
        for _ in range(chunks):
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(settings.memory_seconds / chunks)
        paused.put_nowait(None)
        await go.wait()
        writer.write(b".\r\n")
        await read_reply(reader, b"250")
        writer.write(b"QUIT\r\n")
        await read_reply(reader, b"221")
    finally:
        writer.close()


async def slow_sessions(server: RunningServer, settings: Settings, result: BodyMemory) -> None:
    """Run the sessions; sample memory once all of them wait before their final dot."""
    paused: asyncio.Queue[None] = asyncio.Queue()
    go = asyncio.Event()
    sessions = [
        asyncio.create_task(slow_session(server.port, settings, paused, go))
        for _ in range(settings.memory_sessions)
    ]
    waiting = asyncio.gather(*sessions)
    try:
        for _ in sessions:
            await asyncio.wait_for(paused.get(), settings.run_timeout)
        await asyncio.sleep(0.5)  # for the server to read the last bytes
        result.at_pause_kib = tree_pss_kib(server.pid)
        go.set()
        await asyncio.wait_for(waiting, settings.run_timeout)
    except TimeoutError:
        raise BenchError("slow sessions timed out") from None
    finally:
        waiting.cancel()
        with contextlib.suppress(BaseException):
            await waiting


def measure_server(kind: ServerKind, tools: Tools, settings: Settings) -> BodyMemory:
    result = BodyMemory(sessions=settings.memory_sessions)
    try:
        with running_server(kind, tools, settings) as server:
            warm_up_connections(server.port, 4)
            time.sleep(0.5)
            result.baseline_kib = tree_pss_kib(server.pid)
            single = server.process is not None
            if single:
                rss_before = status_kib(server.pid, "VmRSS")
                Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # resets VmHWM
            with MemorySampler(server.pid) as sampler:
                asyncio.run(slow_sessions(server, settings, result))
            result.peak_kib = max(sampler.peak_kib, result.at_pause_kib)
            if single:
                result.hwm_growth_kib = status_kib(server.pid, "VmHWM") - rss_before
            server.check_log()
            counted = server.received(at_least=settings.memory_sessions)
            if counted is not None and counted < settings.memory_sessions:
                raise BenchError(f"{counted} messages counted, {settings.memory_sessions} sent")
    except (BenchError, OSError) as error:
        result.error = str(error)
    status = result.error or (
        f"{result.growth_mib(result.at_pause_kib):,.1f} MiB more at the pause, "
        f"{result.growth_mib(result.peak_kib):,.1f} MiB more at the peak"
    )
    log(f"e2e: {kind.title}, {settings.memory_sessions} slow sessions: {status}")
    return result


def measure(tools: Tools, settings: Settings) -> dict[str, Any]:
    """The JSON section: server key → the title and the memory figures in KiB."""
    return {
        kind.key: {"title": kind.title, **dataclasses.asdict(measure_server(kind, tools, settings))}
        for kind in SERVERS
    }
