"""Fixtures: a real server on loopback, real clients."""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import kumo_listener as kumo
import pytest


class RawClient:
    """A plain socket speaking SMTP byte by byte, for what smtplib won't send."""

    def __init__(
        self, address: tuple[str, int] | str, source: str | None = None, timeout: float = 10.0
    ):
        if isinstance(address, str):  # a Unix socket's path
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(address)
        else:
            self.sock = socket.create_connection(
                address, timeout=timeout, source_address=(source, 0) if source else None
            )
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; unread: {self.buffer!r}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def reply(self) -> tuple[int, list[str]]:
        """One whole (possibly multi-line) reply: the code and the texts."""
        texts = []
        while True:
            line = self.line().decode("utf-8", "replace")
            assert len(line) >= 4 and line[:3].isdigit() and line[3] in " -", line
            texts.append(line[4:])
            if line[3] == " ":
                return int(line[:3]), texts

    def command(self, data: bytes | str) -> tuple[int, list[str]]:
        self.send(data.encode() + b"\r\n" if isinstance(data, str) else data)
        return self.reply()

    def until_closed(self, within: float = 10.0) -> bytes:
        """Everything unread until the server closes (a reset counts as a
        close); fails the test if the connection is still open after `within` s."""
        deadline = time.monotonic() + within
        received, self.buffer = self.buffer, b""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"connection still open after {within}s; received {received!r}")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return received
            except TimeoutError:
                pytest.fail(f"connection still open after {within}s; received {received!r}")
            if not chunk:
                return received
            received += chunk

    def closed(self) -> bool:
        """True once the server has closed the connection (after any buffered bytes)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def policy() -> kumo.Policy:
    return kumo.Policy()


@pytest.fixture
def maildir(tmp_path: Path) -> Path:
    return tmp_path / "maildir"


@pytest.fixture
def server(policy: kumo.Policy, maildir: Path) -> Iterator[kumo.Server]:
    with kumo.Server(policy=policy, maildir=maildir, shutdown_grace=5) as running:
        yield running


@pytest.fixture
def listen(server: kumo.Server):
    """Start a listener on an ephemeral port with test-friendly defaults."""

    def start(**params) -> tuple[str, int] | str:
        params.setdefault("listen", "127.0.0.1:0")
        params.setdefault("hostname", "mx.test.example")
        return server.start_esmtp_listener(**params).address

    return start


@pytest.fixture
def raw():
    clients: list[RawClient] = []

    def connect(
        address: tuple[str, int] | str, source: str | None = None, timeout: float = 10.0
    ) -> RawClient:
        client = RawClient(address, source, timeout)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()


@pytest.fixture
def smtp():
    clients: list[smtplib.SMTP] = []

    def connect(address: tuple[str, int], source: str | None = None) -> smtplib.SMTP:
        client = smtplib.SMTP(
            address[0], address[1], timeout=10, source_address=(source, 0) if source else None
        )
        clients.append(client)
        return client

    yield connect
    for client in clients:
        with contextlib.suppress(OSError):
            client.close()


def delivered(maildir: Path) -> list[bytes]:
    """Contents of every message in ``new/``, oldest name first."""
    return [path.read_bytes() for path in sorted((maildir / "new").iterdir())]


ENVELOPE = re.compile(rb"\AReturn-Path: <[^\r\n]*>\r\n(?:Delivered-To: [^\r\n]+\r\n)+")


def without_envelope(stored: bytes) -> bytes:
    """A stored file without the ``Return-Path:`` and ``Delivered-To:`` lines
    the Maildir sink writes first (it fails the test when they are missing)."""
    found = ENVELOPE.match(stored)
    assert found, f"no envelope at the top of {stored[:200]!r}"
    return stored[found.end() :]


@pytest.fixture
def kumo_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="kumo_listener")
    return caplog


KUMO = [sys.executable, "-m", "kumo_listener"]


class Served:
    """A ``kumo-listener serve`` process and the address it printed."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.process = subprocess.Popen(
            [*KUMO, "serve", *args],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.banner = self.process.stdout.readline()
        found = re.search(r"listening on (?:([\d.]+):(\d+)|(/[^;,]+))", self.banner)
        assert found, self.banner + self.process.stderr.read()  # type: ignore[union-attr]
        # A Unix socket's path, or (host, port).
        self.address = found.group(3) or (found.group(1), int(found.group(2)))

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    started: list[Served] = []

    def start(*args: str) -> Served:
        started.append(Served(list(args), tmp_path))
        return started[-1]

    yield start
    for served in started:
        if served.process.poll() is None:
            served.process.kill()
            served.process.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
