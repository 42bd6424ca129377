"""Fixtures: a real server on loopback, real clients (the helpers they use
are in support.py)."""

from __future__ import annotations

import contextlib
import logging
import smtplib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kumo_listener as kumo
import pytest
from support import RawClient, Served


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


@pytest.fixture
def kumo_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="kumo_listener")
    return caplog


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    started: list[Served] = []

    def start(*args: str, **options: Any) -> Served:
        started.append(Served(list(args), tmp_path, **options))
        return started[-1]

    yield start
    for served in started:
        if served.process.poll() is None:
            served.process.kill()
            served.process.wait()
