"""Forwarding each message to one upstream before answering: Postfix's
smtp-sink on loopback (started once; ``-c``, so that it counts what arrives)
behind kumo_listener's ``forward_to`` (at ``--kumo-log-level``, WARNING by
default: the main row; and at INFO with metrics), Postfix's before-queue proxy
(``smtpd_proxy_filter``) and aiosmtpd's ``Proxy`` handler; with, for the cost of
forwarding, kumo_listener discarding and the sink sent to directly. All run at
once and their timed runs take turns (as in the durable comparison), in two
shapes: reused connections and a new connection per message, 1 KB messages.

A run counts only when smtp-source saw no error, the server logged none, and
the sink's message count grew by exactly the number sent (the counters of
kumo_listener and aiosmtpd are checked too, but they count before, or whatever,
the upstream answered)."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any

from .common import (
    AIOSMTPD_PROXY,
    FORWARDERS,
    KUMO_DISCARD,
    KUMO_FORWARD,
    KUMO_FORWARD_OBSERVED,
    POSTFIX_PROXY,
    UPSTREAM_SINK,
    BenchError,
    ServerKind,
    Settings,
    Shape,
    Throughput,
    Tools,
    log,
    shapes_json,
)
from .processes import RunningServer
from .servers import running_server
from .throughput import measure_in_turns, start_servers

SHAPES = (
    Shape("forward_reused_connection_1k", "reused connections, 1 KB", 1024, True, 200, 20),
    Shape("forward_new_connection_1k", "new connection per message, 1 KB", 1024, False, 100, 4),
)
SERVERS = (
    KUMO_FORWARD,
    KUMO_FORWARD_OBSERVED,
    POSTFIX_PROXY,
    AIOSMTPD_PROXY,
    KUMO_DISCARD,
    UPSTREAM_SINK,
)


def measure(tools: Tools, settings: Settings) -> dict[str, Any]:
    """The JSON section: forwarding shape key → the shape and, by server key, its runs."""
    results = {shape.key: {kind.key: Throughput() for kind in SERVERS} for shape in SHAPES}
    with contextlib.ExitStack() as stack:
        try:
            sink = stack.enter_context(running_server(UPSTREAM_SINK, tools, settings))
        except BenchError as error:
            log(f"e2e: {UPSTREAM_SINK.title}: {error}")
            for row in results.values():
                for item in row.values():
                    item.error = f"the upstream did not start: {error}"
            return shapes_json(SHAPES, SERVERS, results, settings.sessions)

        def start(kind: ServerKind) -> AbstractContextManager[RunningServer]:
            if kind is UPSTREAM_SINK:
                return contextlib.nullcontext(sink)
            upstream = sink if kind in FORWARDERS else None
            return running_server(kind, tools, settings, upstream=upstream)

        servers = start_servers(stack, SERVERS, start, results)
        for shape in SHAPES:
            measure_in_turns(servers, tools, settings, shape, results[shape.key], "forwarding")
    return shapes_json(SHAPES, SERVERS, results, settings.sessions)
