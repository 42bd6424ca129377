"""Resident memory per idle connection, kumo_listener (discard) and aiosmtpd:
the RSS of a fresh server process before and after opening ``--idle``
connections that have read their banner."""

from __future__ import annotations

import socket
import time
from typing import Any

from .common import AIOSMTPD, KUMO_DISCARD, LOOPBACK, BenchError, ServerKind, Settings, Tools, log
from .processes import read_banner, status_kib, warm_up_connections
from .servers import running_server

SERVERS = (KUMO_DISCARD, AIOSMTPD)


def open_idle_connections(port: int, count: int, into: list[socket.socket]) -> None:
    for index in range(count):
        try:
            connection = socket.create_connection((LOOPBACK, port), timeout=10.0)
            into.append(connection)
            read_banner(connection)
        except OSError as error:
            raise BenchError(f"connection {index + 1} of {count}: {error}") from None


def measure_server(kind: ServerKind, tools: Tools, settings: Settings) -> dict[str, Any]:
    result: dict[str, Any] = {"title": kind.title, "connections": 0, "error": None}
    connections: list[socket.socket] = []
    try:
        with running_server(kind, tools, settings, max_connections=settings.idle + 100) as server:
            warm_up_connections(server.port, settings.sessions)
            time.sleep(0.5)
            result["rss_before_kib"] = status_kib(server.pid, "VmRSS")
            open_idle_connections(server.port, settings.idle, connections)
            time.sleep(1.0)
            server.check_alive()
            result["rss_after_kib"] = status_kib(server.pid, "VmRSS")
            result["connections"] = len(connections)
    except BenchError as error:
        result["error"] = str(error)
    finally:
        for connection in connections:
            connection.close()
    if result["error"] is None:
        growth = result["rss_after_kib"] - result["rss_before_kib"]
        result["kib_per_connection"] = growth / result["connections"]
    status = result["error"] or f"{result['kib_per_connection']:.1f} KiB per connection"
    log(f"e2e: {kind.title}, {settings.idle} idle connections: {status}")
    return result


def measure(tools: Tools, settings: Settings) -> dict[str, Any]:
    """The JSON section: server key → RSS before and after, KiB per connection."""
    return {kind.key: measure_server(kind, tools, settings) for kind in SERVERS}
