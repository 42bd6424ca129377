"""A server under test as a process tree: its port, its log, its message
counter, its CPU time; and starting, probing and stopping it."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .common import LOOPBACK, PROBED, BenchError, ServerKind, log

if TYPE_CHECKING:
    from .postfix import PostfixLog

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
SERVER_LOG_ERROR = re.compile(r"\b(ERROR|CRITICAL)\b|Traceback|panicked")
SINK_MESSAGES = re.compile(rb"mesg=(\d+)\r")  # smtp-sink -c: "sess=N quit=N mesg=N\r"
SINK_COUNT_WAIT = 10.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


@dataclass
class RunningServer:
    kind: ServerKind
    process: subprocess.Popen[bytes] | None
    """None for Postfix, which puts itself in the background."""
    pid: int
    """The process whose tree is the server (Postfix: its master)."""
    port: int
    stderr_path: Path
    count_file: Path | None
    maildir: Path | None
    postfix_log: PostfixLog | None = None
    stderr_offset: int = 0
    sink_counters: Path | None = None
    """smtp-sink's standard output with ``-c``: its running counters."""
    upstream: RunningServer | None = None
    """The server this one forwards every message to (a run must reach it)."""

    def check_alive(self) -> None:
        if self.process is None:
            if not Path(f"/proc/{self.pid}").exists():
                tail = self.stderr_path.read_text(errors="replace")[-4000:]
                raise BenchError(f"{self.kind.title}: its master process is gone:\n{tail}")
            return
        if self.process.poll() is not None:
            tail = self.stderr_path.read_text(errors="replace")[-4000:]
            raise BenchError(f"{self.kind.title} exited with {self.process.returncode}:\n{tail}")

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)

    def new_log_output(self) -> str:
        """What the server wrote to stderr since the last call."""
        with self.stderr_path.open("rb") as stream:
            stream.seek(self.stderr_offset)
            data = stream.read()
        self.stderr_offset += len(data)
        return data.decode(errors="replace")

    def received(self, at_least: int = 0) -> int | None:
        """The server's message counter (asked for with SIGUSR1), if it has one.

        Postfix's counter is its log's ``status=sent`` lines (as a proxy, its
        ``proxy-accept`` lines): it delivers (to the discard transport) after its
        250, so this waits until ``at_least``; so does smtp-sink's (``-c``)."""
        if self.postfix_log is not None:
            return self.postfix_log.sent(at_least)
        if self.sink_counters is not None:
            return self.sink_messages(at_least)
        if self.count_file is None:
            return None
        self.count_file.unlink(missing_ok=True)
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 10.0
        while not self.count_file.exists():
            self.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"{self.kind.title} did not write {self.count_file}")
            time.sleep(0.01)
        return int(self.count_file.read_text().strip())

    def sink_messages(self, at_least: int) -> int:
        """smtp-sink's count of messages (the last ``mesg=N`` it wrote), once
        there are ``at_least``, or when it stopped growing for a while."""
        assert self.sink_counters is not None
        deadline = time.monotonic() + SINK_COUNT_WAIT
        last = -1
        while True:
            self.check_alive()
            with self.sink_counters.open("rb") as stream:
                stream.seek(max(0, self.sink_counters.stat().st_size - 256))
                found = SINK_MESSAGES.findall(stream.read())
            count = int(found[-1]) if found else 0
            if count >= at_least:
                return count
            if count > last:
                last, deadline = count, time.monotonic() + SINK_COUNT_WAIT
            elif time.monotonic() > deadline:
                return count
            time.sleep(0.01)

    def delivered_files(self) -> int | None:
        if self.maildir is None:
            return None
        return sum(1 for _ in os.scandir(self.maildir / "new"))

    def make_room(self, needed_bytes: int) -> None:
        """Empty the Maildir if fewer than twice ``needed_bytes`` are free.

        Only then: deleting thousands of files slows the fsyncs of the next runs
        down (by several times on this project's machines), so delivered
        messages are normally kept until the server stops."""
        if self.maildir is None:
            return
        disk = os.statvfs(self.maildir.parent)
        if disk.f_bavail * disk.f_frsize >= 2 * needed_bytes:
            return
        log(f"e2e: low on disk space, emptying {self.maildir}/new")
        for entry in os.scandir(self.maildir / "new"):
            os.unlink(entry.path)

    def check_log(self) -> None:
        """Fail on errors the server logged since the last check."""
        self.check_alive()
        output = self.new_log_output()
        if SERVER_LOG_ERROR.search(output):
            raise BenchError(f"{self.kind.title} logged errors:\n{output[-4000:]}")
        if output.strip():
            log(f"e2e: {self.kind.title} wrote to stderr:\n{output[-2000:]}")


def wait_until_ready(server: RunningServer, stdout_path: Path) -> None:
    """Wait for the ``listening on`` line (smtp-sink prints none: for the banner)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        server.check_alive()
        if server.kind in PROBED:
            with contextlib.suppress(OSError):
                probe_banner(server.port)
                return
        elif "listening on" in stdout_path.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise BenchError(f"{server.kind.title} was not ready after {READY_TIMEOUT:.0f} s")


def read_banner(connection: socket.socket) -> bytes:
    """Read the greeting up to its last line (``220 ``, not ``220-``)."""
    data = b""
    while True:
        chunk = connection.recv(4096)
        if not chunk:
            raise BenchError(f"connection closed before the banner ended: {data!r}")
        data += chunk
        lines = data.split(b"\r\n")
        if len(lines) > 1 and lines[-2][:4] == b"220 ":
            return data
        if len(lines) > 1 and not lines[-2].startswith(b"220"):
            raise BenchError(f"unexpected greeting: {data!r}")


def probe_banner(port: int) -> None:
    with socket.create_connection((LOOPBACK, port), timeout=2.0) as connection:
        read_banner(connection)
        connection.sendall(b"QUIT\r\n")


def warm_up_connections(port: int, count: int) -> None:
    """Open and close a few sessions so one-time set-up is not counted per connection."""
    for _ in range(count):
        probe_banner(port)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL it if it is still there after a while."""
    for signum, timeout in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
            return


def process_tree(root: int) -> dict[int, list[str]]:
    """``/proc/PID/stat`` fields (after the command name) of ``root`` and its
    descendants, by pid."""
    stats: dict[int, list[str]] = {}
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):  # gone meanwhile
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            stats[int(entry.name)] = fields
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree: dict[int, list[str]] = {}
    pending = [root]
    while pending:
        pid = pending.pop()
        if pid in stats:
            tree[pid] = stats[pid]
            pending += children.get(pid, [])
    return tree


def tree_cpu_seconds(root: int) -> float:
    """User and system CPU time of a process and its descendants, with that of
    the children they have waited for: Postfix's master reaps the smtpd and
    cleanup processes that exit, so their time stays in the sum."""
    ticks = sum(sum(map(int, fields[11:15])) for fields in process_tree(root).values())
    return ticks / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, key: str) -> int:
    """A ``/proc/PID/status`` size (``VmRSS``, ``VmHWM``) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise BenchError(f"no {key} for process {pid}")


def children_cpu_seconds() -> float:
    """User and system CPU time of the children waited for so far (the load generators)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
