"""Linux network namespaces for multi-host tests: a ``Lab`` makes one "core"
namespace holding a bridge, and hosts (namespaces of their own) plugged into
it by veth pairs, with addresses from 198.18.0.0/15 (the benchmarking range).
Nothing is added to the host's own interfaces: each veth pair is created
inside the core namespace, its far end moved straight into its host's.

Processes run in a host's namespace through ``ip netns exec``; code of the
test itself runs there on a thread of its own (:meth:`Lab.call_in`), whose
sockets stay in that namespace. Leaving the ``with`` block kills every
process started and deletes every namespace, also when the test failed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from support import require_tool

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
SUBNET_BITS = 24


class Lab:
    """Namespaces named ``PREFIX-PID-NAME`` (so that what a crashed earlier run
    left cannot collide), on one bridge."""

    def __init__(self, prefix: str = "kl") -> None:
        self.ip = require_tool("ip", "iproute2")
        self.prefix = f"{prefix}{os.getpid()}"
        self.core = f"{self.prefix}-core"
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen[Any]] = []

    def __enter__(self) -> Lab:
        try:
            self._add_namespace(self.core)
            self._run("-n", self.core, "link", "add", "br0", "type", "bridge")
            self._run("-n", self.core, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def namespace(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def add_host(self, host: str, addresses: list[str]) -> str:
        """A namespace for `host` with loopback and ``eth0`` (its peer ``host``
        on the core's bridge) carrying `addresses` (the first is the one its
        connections come from); its name."""
        name = self.namespace(host)
        self._add_namespace(name)
        self._run(
            "-n", self.core, "link", "add", host, "type", "veth", "peer", "eth0", "netns", name
        )
        self._run("-n", self.core, "link", "set", host, "master", "br0", "up")
        for address in addresses:
            self._run("-n", name, "addr", "add", f"{address}/{SUBNET_BITS}", "dev", "eth0")
        self._run("-n", name, "link", "set", "eth0", "up")
        return name

    def set_link(self, host: str, up: bool) -> None:
        """Plug `host` into the bridge, or pull it out (its veth on the core side)."""
        self._run("-n", self.core, "link", "set", host, "up" if up else "down")

    def popen(self, host: str, command: list[str], **options: Any) -> subprocess.Popen[Any]:
        """`command` started in `host`'s namespace (``ip netns exec`` execs it:
        the process's pid is the command's); killed when the lab closes."""
        process = subprocess.Popen(
            [self.ip, "netns", "exec", self.namespace(host), *command], **options
        )
        self.processes.append(process)
        return process

    def call_in(self, host: str, function: Callable[[], T]) -> T:
        """`function` run on a new thread in `host`'s namespace; its result, or
        its exception raised here."""
        outcome: dict[str, Any] = {}
        thread = threading.Thread(target=self._run_in, args=(host, function, outcome))
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def thread_in(self, host: str, function: Callable[[], object]) -> threading.Thread:
        """`function` started on a daemon thread in `host`'s namespace."""
        thread = threading.Thread(target=self._run_in, args=(host, function, {}), daemon=True)
        thread.start()
        return thread

    def _run_in(self, host: str, function: Callable[[], Any], outcome: dict[str, Any]) -> None:
        try:
            enter_namespace(self.namespace(host))
            outcome["value"] = function()
        except BaseException as error:
            outcome["error"] = error

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGCONT)  # a stopped one dies at once
                    process.kill()
            process.wait(timeout=10)
        for name in reversed(self.namespaces):
            self._kill_remaining(name)
            subprocess.run([self.ip, "netns", "del", name], capture_output=True, timeout=10)
        self.namespaces.clear()

    def _kill_remaining(self, name: str) -> None:
        listed = subprocess.run(
            [self.ip, "netns", "pids", name], capture_output=True, text=True, timeout=10
        )
        for pid in listed.stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)

    def _add_namespace(self, name: str) -> None:
        self._run("netns", "add", name)
        self.namespaces.append(name)
        self._run("-n", name, "link", "set", "lo", "up")

    def _run(self, *args: str) -> None:
        result = subprocess.run([self.ip, *args], capture_output=True, text=True, timeout=10)
        if result.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def enter_namespace(name: str) -> None:
    """Move the calling thread into the network namespace `name` (Python 3.11
    has no os.setns)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(Path("/run/netns") / name, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns {name}: {os.strerror(error)}")
    finally:
        os.close(fd)
