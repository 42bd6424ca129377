"""What every part of the harness shares: the shapes of load, the servers
compared, the settings of a run, and a measurement's timed runs."""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCHES = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
SENDER = "sender@client.example"
RECIPIENT = "rcpt@dest.example"


@dataclass(frozen=True)
class Shape:
    """One way of sending mail with smtp-source."""

    key: str
    title: str
    size: int
    reuse: bool
    quick_count: int
    warmup_per_session: int

    def as_json(self) -> dict[str, Any]:
        return {"title": self.title, "message_bytes": self.size, "reused_connections": self.reuse}


@dataclass(frozen=True)
class ServerKind:
    key: str
    title: str


KUMO_DISCARD = ServerKind("kumo_discard", "kumo_listener (discard)")
# The defaults an operator runs with: INFO logging (a line per message and per
# connection) and the Prometheus endpoint, so that their cost is visible.
KUMO_OBSERVED = ServerKind("kumo_observed", "kumo_listener (discard, INFO logs, metrics)")
# The same as kumo_observed (whose hooks are memoized and `@kumo.inline`),
# with the hooks as a user writes them first (see benches/policy_bench.py).
KUMO_DEF_HOOKS = ServerKind("kumo_def_hooks", "kumo_listener (plain def hooks, INFO logs, metrics)")
KUMO_SEED = ServerKind("kumo_seed", "kumo_listener (the seed's toml_load hook, INFO logs, metrics)")
HOOKS_WRITTEN = {KUMO_DEF_HOOKS: "def", KUMO_SEED: "seed"}
"""The servers whose policy's hooks are not the default (``KUMO_BENCH_HOOKS``)."""
KUMO_MAILDIR = ServerKind("kumo_maildir", "kumo_listener (maildir)")
AIOSMTPD = ServerKind("aiosmtpd", "aiosmtpd")
SMTP_SINK = ServerKind("smtp_sink", "smtp-sink")
POSTFIX_QUEUE = ServerKind("postfix_queue", "Postfix (queue, discard transport)")
# Forwarding each message to one upstream, an smtp-sink that counts (-c).
UPSTREAM_SINK = ServerKind("upstream_sink", "smtp-sink (the upstream, sent to directly)")
KUMO_FORWARD = ServerKind("kumo_forward", "kumo_listener (forward_to)")
KUMO_FORWARD_OBSERVED = ServerKind(
    "kumo_forward_observed", "kumo_listener (forward_to, INFO logs, metrics)"
)
# The authentication benchmark: `annotate` for every method, against the same
# policy without it (KUMO_DISCARD).
KUMO_AUTHENTICATION = ServerKind(
    "kumo_authentication", "kumo_listener (discard, authentication annotate)"
)
POSTFIX_PROXY = ServerKind("postfix_proxy", "Postfix (smtpd_proxy_filter)")
AIOSMTPD_PROXY = ServerKind("aiosmtpd_proxy", "aiosmtpd (Proxy handler)")
# The per-client limits on (for loopback too), counted per process or in Redis.
KUMO_LIMITS_LOCAL = ServerKind(
    "kumo_limits_local", "kumo_listener (per-client limits, per process)"
)
KUMO_LIMITS_REDIS = ServerKind("kumo_limits_redis", "kumo_listener (per-client limits, --redis)")
KUMO_LIMITED = (KUMO_LIMITS_LOCAL, KUMO_LIMITS_REDIS)
FORWARDERS = (KUMO_FORWARD, KUMO_FORWARD_OBSERVED, POSTFIX_PROXY, AIOSMTPD_PROXY)
"""The servers that need an upstream to start."""
KUMO_SERVERS = (
    KUMO_DISCARD,
    KUMO_OBSERVED,
    *HOOKS_WRITTEN,
    KUMO_MAILDIR,
    KUMO_FORWARD,
    KUMO_FORWARD_OBSERVED,
    *KUMO_LIMITED,
    KUMO_AUTHENTICATION,
)
OBSERVED = (KUMO_OBSERVED, *HOOKS_WRITTEN, KUMO_FORWARD_OBSERVED)
"""The kumo_listener servers run as an operator does: INFO logs, the metrics endpoint."""
COUNTED = (*KUMO_SERVERS, AIOSMTPD, AIOSMTPD_PROXY)
"""The servers that count the messages they receive (asked with SIGUSR1);
aiosmtpd's Proxy handler counts those its upstream took."""
PROBED = (SMTP_SINK, UPSTREAM_SINK, POSTFIX_QUEUE, POSTFIX_PROXY)
"""The servers that print no ``listening on`` line: ready when they greet."""

MEASUREMENTS = (
    "throughput",
    "forwarding",
    "shared_limits",
    "starttls",
    "idle_memory",
    "durable",
    "body_memory",
    "authentication",
)


class BenchError(Exception):
    """A measurement that failed; the message says why."""


@dataclass(frozen=True)
class Settings:
    quick: bool
    sessions: int
    repeat: int
    seconds: float
    idle: int
    kumo_log_level: str
    run_timeout: float
    workdir: Path
    durable_sessions: int
    memory_sessions: int
    memory_megabytes: int
    memory_seconds: float
    skip: tuple[str, ...] = ()

    @property
    def tls_dir(self) -> Path:
        return self.workdir / "tls"

    def as_json(self) -> dict[str, Any]:
        return {
            "quick": self.quick,
            "sessions": self.sessions,
            "repeat": self.repeat,
            "seconds": self.seconds,
            "idle_connections": self.idle,
            "kumo_log_level": self.kumo_log_level,
            "run_timeout": self.run_timeout,
            "durable_sessions": self.durable_sessions,
            "memory_sessions": self.memory_sessions,
            "memory_megabytes": self.memory_megabytes,
            "memory_seconds": self.memory_seconds,
            "skipped": list(self.skip),
        }


@dataclass(frozen=True)
class Tools:
    smtp_source: str
    smtp_sink: str
    starttls_load: Path | None
    """None when the STARTTLS measurement is skipped."""


@dataclass(frozen=True)
class Run:
    """One timed run: how many messages (or sessions) in how long, and the
    CPU time (user and system) the server and the load generator spent."""

    count: int
    seconds: float
    server_cpu: float
    client_cpu: float


@dataclass
class Measured:
    """The timed runs of one measurement, or why it failed."""

    runs: list[Run] = field(default_factory=list)
    error: str | None = None

    @property
    def rates(self) -> list[float]:
        return [run.count / run.seconds for run in self.runs]

    @property
    def median(self) -> float | None:
        return None if self.error or not self.runs else statistics.median(self.rates)

    def cpu_us(self) -> list[float] | None:
        """Median CPU microseconds per message (or session): [server, load generator]."""
        if self.error or not self.runs:
            return None
        server = statistics.median(1e6 * run.server_cpu / run.count for run in self.runs)
        client = statistics.median(1e6 * run.client_cpu / run.count for run in self.runs)
        return [server, client]

    def rates_text(self) -> str:
        return ", ".join(f"{rate:,.0f}" for rate in self.rates)


@dataclass
class Throughput(Measured):
    """The runs of one (shape, server) pair."""

    messages_per_run: int = 0

    def as_json(self, kind: ServerKind) -> dict[str, Any]:
        return {
            "title": kind.title,
            "msgs_per_s_median": self.median,
            "msgs_per_s_runs": self.rates,
            "cpu_us_per_msg_server_client": self.cpu_us(),
            "messages_per_run": self.messages_per_run,
            "error": self.error,
        }


def shapes_json(
    shapes: tuple[Shape, ...],
    kinds: tuple[ServerKind, ...],
    results: dict[str, dict[str, Throughput]],
    sessions: int,
) -> dict[str, Any]:
    """A throughput section of the JSON: shape key → the shape and, by server
    key, its runs (``results``: shape key → server key → runs)."""
    return {
        shape.key: {
            **shape.as_json(),
            "sessions": sessions,
            "servers": {kind.key: results[shape.key][kind.key].as_json(kind) for kind in kinds},
        }
        for shape in shapes
    }


def log(text: str) -> None:
    """Progress goes to stderr; the results go to stdout."""
    print(text, file=sys.stderr, flush=True)
