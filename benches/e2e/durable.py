"""What a durable 250 costs: kumo_listener (discard), kumo_listener (Maildir,
fsync'd) and the private Postfix with its queue, all running at once with
``--durable-sessions`` smtp-source sessions, their timed runs taking turns so
that whatever else loads the machine falls on each alike."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from .common import (
    KUMO_DISCARD,
    KUMO_MAILDIR,
    POSTFIX_QUEUE,
    BenchError,
    Settings,
    Shape,
    Throughput,
    Tools,
    log,
    shapes_json,
)
from .processes import RunningServer
from .servers import running_server
from .throughput import measure_count, record_error, timed_run

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
        servers: dict[str, RunningServer] = {}
        for kind in SERVERS:
            try:
                servers[kind.key] = stack.enter_context(running_server(kind, tools, durable))
            except BenchError as error:
                log(f"e2e: {kind.title}: {error}")
                for shape in SHAPES:
                    results[shape.key][kind.key].error = str(error)
        for shape in SHAPES:
            row = results[shape.key]
            for key, server in servers.items():
                row[key].messages_per_run = measure_count(server, tools, durable, shape, row[key])
            for _ in range(durable.repeat):
                for key, server in servers.items():
                    if row[key].error is None:
                        with record_error(row[key]):
                            count = row[key].messages_per_run
                            row[key].runs.append(timed_run(server, tools, durable, shape, count))
            for key, server in servers.items():
                status = row[key].error or row[key].rates_text()
                log(f"e2e: durable, {server.kind.title}, {shape.title}: {status} msgs/s")
    return shapes_json(SHAPES, SERVERS, results, durable.sessions)
