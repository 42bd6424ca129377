"""Prometheus metrics of a server, as a ``prometheus_client`` collector.

The core counts in Rust (relaxed atomics, per listener); a scrape reads a
snapshot of the counters. Register the collector in any registry::

    registry.register(server.metrics_collector())

``kumo-listener serve --metrics ADDR`` serves it at ``http://ADDR/metrics``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector as _Collector

Snapshot = Callable[[], dict[str, Any]]

# (name, help, key in a listener's snapshot): counters labelled by listener.
LISTENER_COUNTERS = (
    ("kumo_listener_connections", "Connections accepted.", "connections"),
    ("kumo_listener_messages_received", "Messages stored (one per split message).", "messages"),
    ("kumo_listener_received_bytes", "Bytes of the messages stored.", "message_bytes"),
    ("kumo_listener_tls_handshakes", "TLS handshakes completed.", "tls_handshakes"),
    ("kumo_listener_tls_handshake_failures", "TLS handshakes failed.", "tls_failures"),
    (
        "kumo_listener_client_limit_refusals",
        "Connections refused by max_connections_per_client or the connection rate.",
        "client_limit_refusals",
    ),
    (
        "kumo_listener_shed_connections",
        "Connections refused while too many policy calls waited (load shedding).",
        "shed_connections",
    ),
)


# (name, help, key in a listener's snapshot): gauges labelled by listener.
LISTENER_GAUGES = (
    (
        "kumo_listener_body_memory_bytes",
        "Bytes of message bodies held in memory now (against body_memory_limit).",
        "body_memory_bytes",
    ),
    (
        "kumo_listener_body_spilled_bytes",
        "Bytes of message bodies in spill files now.",
        "body_spilled_bytes",
    ),
)


def _listener_gauges(listeners: list[dict[str, Any]]) -> Iterator[Metric]:
    for name, documentation, key in LISTENER_GAUGES:
        family = GaugeMetricFamily(name, documentation, labels=["listener"])
        for listener in listeners:
            family.add_metric([listener["listener"]], listener[key])
        yield family


class Collector(_Collector):
    """Turns a server core's counters into metric families at each scrape."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snapshot = self._snapshot()
        listeners = snapshot["listeners"]
        for name, documentation, key in LISTENER_COUNTERS:
            family = CounterMetricFamily(name, documentation, labels=["listener"])
            for listener in listeners:
                family.add_metric([listener["listener"]], listener[key])
            yield family
        active = GaugeMetricFamily(
            "kumo_listener_connections_active", "Sessions open now.", labels=["listener"]
        )
        rejections = CounterMetricFamily(
            "kumo_listener_rejections",
            "Replies with a 4xx or 5xx code, by code.",
            labels=["listener", "code"],
        )
        for listener in listeners:
            active.add_metric([listener["listener"]], listener["active"])
            for code, count in sorted(listener["rejections"].items()):
                rejections.add_metric([listener["listener"], str(code)], count)
        yield active
        yield rejections
        yield from _listener_gauges(listeners)
        latency = HistogramMetricFamily(
            "kumo_listener_policy_call_seconds",
            "How long policy calls took, from queued to answered, by event.",
            labels=["event"],
        )
        for histogram in snapshot["policy_latency"]:
            buckets = [(_bound(bound), count) for bound, count in histogram["buckets"]]
            latency.add_metric([histogram["event"]], buckets, histogram["sum"])
        yield latency


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)
