"""Prometheus metrics of a server, as a ``prometheus_client`` collector.

The core counts in Rust (relaxed atomics, per listener); a scrape reads a
snapshot of the counters. Register the collector in any registry::

    registry.register(server.metrics_collector())

``kumo-listener serve --metrics ADDR`` serves it at ``http://ADDR/metrics``
(:class:`MetricsServer`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector as _Collector
from prometheus_client.registry import CollectorRegistry

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


# --- the HTTP endpoint of ``kumo-listener serve --metrics`` ---------------------------

#: The most a request's line and headers may take.
MAX_REQUEST_HEAD = 16 * 1024
#: Seconds a connection has to send its request, and to take the response.
READ_TIMEOUT = 10.0
#: Connections open at once; past it, the one waiting longest for its request is closed.
MAX_CONNECTIONS = 64

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


class MetricsServer:
    """``registry`` at ``http://HOST:PORT/metrics``, served from one thread
    (an asyncio loop of its own): a connection that sends no request costs a
    descriptor, not a thread, and is closed after ``read_timeout`` seconds;
    past ``max_connections`` open at once, the one waiting longest for its
    request is closed, so that idle connections never keep a scrape out.
    One request per connection (``Connection: close``), as Prometheus scrapes.
    Bound when made: an address that can't be bound raises ``OSError`` here."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        *,
        read_timeout: float = READ_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._registry = registry
        self._read_timeout = read_timeout
        self._max_connections = max_connections
        self._open = 0
        # Connections still waiting for their request, oldest first.
        self._waiting: dict[asyncio.StreamWriter, None] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="kumo-listener-metrics", daemon=True
        )
        self._thread.start()
        # Bound on the loop's thread (the caller may be running a loop of its own).
        starting = asyncio.start_server(self._serve, host, port, limit=MAX_REQUEST_HEAD)
        try:
            self._server = asyncio.run_coroutine_threadsafe(starting, self._loop).result()
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            raise

    @property
    def address(self) -> tuple[str, int]:
        """The first bound ``(host, port)`` (the real port when given 0)."""
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    def close(self) -> None:
        """Stop listening, drop the connections, stop the thread."""

        async def stop() -> None:
            self._server.close()
            tasks = asyncio.all_tasks() - {asyncio.current_task()}
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        self._waiting[writer] = None
        if self._open > self._max_connections:
            oldest = next(iter(self._waiting))
            del self._waiting[oldest]
            oldest.transport.abort()
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._read_timeout)
            finally:
                self._waiting.pop(writer, None)
            writer.write(self._respond(head))
            await asyncio.wait_for(writer.drain(), self._read_timeout)
            writer.close()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.transport.abort()
        finally:
            self._open -= 1

    def _respond(self, head: bytes) -> bytes:
        lines = head.decode("latin-1").split("\r\n")
        request = lines[0].split()
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:] if line)
        }
        content_type, body = "text/plain; charset=utf-8", b""
        if len(request) != 3:
            status = 400
        elif request[0] not in ("GET", "HEAD"):
            status = 405
        elif request[1].partition("?")[0] not in ("/", "/metrics"):
            status = 404
        else:
            encoder, content_type = choose_encoder(headers.get("accept", ""))
            status, body = 200, encoder(self._registry)
        head_only = request[:1] == ["HEAD"]
        return (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode("latin-1") + (b"" if head_only else body)
