"""The threads ``def`` handlers run on, and ``kumo.inline``.

As in FastAPI, a ``def`` handler runs on a thread of a pool, so one that
blocks (a synchronous database client, an HTTP call) does not hold up the
server's loop; ``async def`` handlers, and ``def`` handlers marked with
:func:`inline`, run on the server's loop.

The pool is shared fairly between clients (as the per-client limits count
them: an IPv4 address, or an IPv6 network of ``client_ipv6_prefix_length``
bits): one client runs handlers on at most a quarter of the threads at once,
and clients with calls waiting take turns. So a client whose calls are slow
(names whose DNS it answers slowly, say) delays its own sessions, and the
other clients' calls still find a thread. A call whose session has stopped
waiting (the client went away, or ``data_processing_timeout`` passed) before
a thread takes it is dropped without running.

The queue is the core's (``rust/handler_threads.rs``): a session's call
reaches a waiting thread directly, and its outcome goes straight back,
without passing through the loop. The threads are started as needed, one
kept spare while the pool may grow.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from . import _core

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_HANDLER_THREADS: int = _core.DEFAULT_HANDLER_THREADS

_INLINE = "__kumo_inline__"


def inline(fn: F) -> F:
    """Mark a ``def`` handler to run on the server's loop, without a thread
    hop: for handlers that never block (counters, lookups in memory, a
    ``kumo.memoize`` hit). One that does block holds up every session."""
    setattr(fn, _INLINE, True)
    return fn


def runs_on_loop(handler: Callable[..., Any]) -> bool:
    """Whether ``handler`` runs on the loop: ``async def`` or marked inline."""
    return bool(getattr(handler, _INLINE, False)) or asyncio.iscoroutinefunction(handler)
