"""What a durable 250 costs: kumo_listener (discard), kumo_listener (Maildir,
fsync'd) and the private Postfix with its queue, all running at once with
``--durable-sessions`` smtp-source sessions, their timed runs taking turns so
that whatever else loads the machine falls on each alike."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

from .common import (
    KUMO_DISCARD,
    KUMO_MAILDIR,
    POSTFIX_QUEUE,
    Settings,
    Shape,
    Throughput,
    Tools,
    shapes_json,
)
from .servers import running_server
from .throughput import measure_in_turns, start_servers

SERVERS = (KUMO_DISCARD, KUMO_MAILDIR, POSTFIX_QUEUE)
SHAPES = (
    Shape("durable_new_connection_1k", "new connection per message, 1 KB", 1024, False, 100, 4),
    Shape("durable_reused_connection_1k", "reused connections, 1 KB", 1024, True, 200, 20),
)


def measure(tools: Tools, settings: Settings) -> dict[str, Any]:
    """The JSON section: durable shape key → the shape and, by server key, its runs."""
    durable = dataclasses.replace(settings, sessions=settings.durable_sessions)
    results = {shape.key: {kind.key: Throughput() for kind in SERVERS} for shape in SHAPES}
    with contextlib.ExitStack() as stack:
        start = functools.partial(running_server, tools=tools, settings=durable)
        servers = start_servers(stack, SERVERS, start, results)
        for shape in SHAPES:
            measure_in_turns(servers, tools, durable, shape, results[shape.key], "durable")
    return shapes_json(SHAPES, SERVERS, results, durable.sessions)
