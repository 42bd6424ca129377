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

from ._core import METRICS

# Every metric is declared once, in the core (rust/metrics.rs): its name,
# kind, help and labels come from there, and a snapshot gives its samples
# under the same name.
Snapshot = Callable[[], dict[str, list[tuple[tuple[str, ...], Any]]]]

_FAMILIES: dict[str, type[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]] = {
    "counter": CounterMetricFamily,
    "gauge": GaugeMetricFamily,
    "histogram": HistogramMetricFamily,
}


class Collector(_Collector):
    """Turns a server core's counters into metric families at each scrape."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snapshot = self._snapshot()
        for name, kind, documentation, labels in METRICS:
            family = _FAMILIES[kind](name, documentation, labels=labels)
            for label_values, value in snapshot[name]:
                if isinstance(family, HistogramMetricFamily):
                    buckets, total = value
                    bounded = [(_bound(bound), count) for bound, count in buckets]
                    family.add_metric(list(label_values), bounded, total)
                else:
                    family.add_metric(list(label_values), value)
            yield family


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)
