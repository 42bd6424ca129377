"""STARTTLS sessions per second: the Rust load client ``benches/starttls-load``
runs sessions of banner, EHLO, STARTTLS, a full TLS handshake (no resumption),
EHLO, QUIT, ``--sessions`` at a time on one thread. kumo_listener listens on
every address and its dynamic hook gives 127.0.0.1 and 127.0.0.2 each its own
certificate (the client checks that each address presented its own); aiosmtpd
has one ``ssl`` context. The certificates are ECDSA P-256."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .common import (
    AIOSMTPD,
    KUMO_DISCARD,
    LOOPBACK,
    BenchError,
    Measured,
    Run,
    ServerKind,
    Settings,
    Tools,
    log,
)
from .processes import RunningServer
from .servers import AIOSMTPD_TLS_HOSTNAME, KUMO_TLS_IDENTITIES, running_server
from .throughput import run_load

SERVERS = (KUMO_DISCARD, AIOSMTPD)
QUICK_COUNT = 64


@dataclass
class Handshakes(Measured):
    """The STARTTLS runs against one server."""

    protocols: dict[str, int] = field(default_factory=dict)

    def as_json(self, kind: ServerKind) -> dict[str, Any]:
        return {
            "title": kind.title,
            "sessions_per_s_median": self.median,
            "sessions_per_s_runs": self.rates,
            "cpu_us_per_session_server_client": self.cpu_us(),
            "protocols": self.protocols,
            "error": self.error,
        }


def starttls_targets(kind: ServerKind, port: int) -> dict[str, str]:
    """Each address the load client reaches, and the common name it must present."""
    if kind is AIOSMTPD:
        return {f"{LOOPBACK}:{port}": AIOSMTPD_TLS_HOSTNAME}
    return {f"{ip}:{port}": name for ip, name in KUMO_TLS_IDENTITIES.items()}


def starttls_run(
    server: RunningServer, tools: Tools, settings: Settings, limit: list[str]
) -> tuple[Run, dict[str, Any]]:
    """One run of the load client, and its JSON report; or BenchError."""
    assert tools.starttls_load is not None
    targets = starttls_targets(server.kind, server.port)
    # One thread, as smtp-source is one process: the rest of the machine is the server's.
    command = [str(tools.starttls_load), "--connect", ",".join(targets), "--threads", "1"]
    command += ["--concurrency", str(settings.sessions), *limit]
    result, run = run_load(server, command, settings.run_timeout)
    report = json.loads(result.stdout)
    if report["errors"] or not report["handshakes"]:
        raise BenchError(f"{report['errors']} failed sessions: {report['error_kinds']}")
    for target, name in targets.items():
        presented = report["subjects"].get(target, {})
        if set(presented) != {name}:
            raise BenchError(f"{target} presented {presented}, not only {name}")
    server.check_log()
    return Run(report["handshakes"], report["seconds"], run.server_cpu, run.client_cpu), report


def measure_server(kind: ServerKind, tools: Tools, settings: Settings) -> Handshakes:
    result = Handshakes()
    try:
        with running_server(kind, tools, settings) as server:
            warm_up = starttls_run(server, tools, settings, ["--count", str(QUICK_COUNT)])
            runs = [warm_up] if settings.quick else []
            for _ in range(0 if settings.quick else settings.repeat):
                runs.append(
                    starttls_run(server, tools, settings, ["--seconds", str(settings.seconds)])
                )
            result.runs = [run for run, _ in runs]
            result.protocols = runs[-1][1]["protocols"]
    except BenchError as error:
        result.error = str(error)
    status = result.error or result.rates_text() + " sessions/s"
    log(f"e2e: {kind.title}, STARTTLS: {status}")
    return result


def measure(tools: Tools, settings: Settings) -> dict[str, Any]:
    """The JSON section: server key → sessions per second and CPU per session."""
    return {kind.key: measure_server(kind, tools, settings).as_json(kind) for kind in SERVERS}
