"""The threads ``def`` handlers run on, and ``kumo.inline``.

As in FastAPI, a ``def`` handler runs on a thread of a pool, so one that
blocks (a synchronous database client, an HTTP call) delays only its own
session; ``async def`` handlers, and ``def`` handlers marked with
:func:`inline`, run on the server's asyncio loop.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_HANDLER_THREADS = 40
"""AnyIO's (and so FastAPI's) default: enough for handlers that wait on I/O."""

_INLINE = "__kumo_inline__"

Done = Callable[[BaseException | None, Any], None]


def inline(fn: F) -> F:
    """Mark a ``def`` handler to run on the server's loop, without a thread
    hop: for handlers that never block (counters, lookups in memory, a
    ``kumo.memoize`` hit). One that does block holds up every session."""
    setattr(fn, _INLINE, True)
    return fn


def runs_on_loop(handler: Callable[..., Any]) -> bool:
    """Whether ``handler`` runs on the loop: ``async def`` or marked inline."""
    return bool(getattr(handler, _INLINE, False)) or asyncio.iscoroutinefunction(handler)


class HandlerThreads:
    """A pool of at most ``size`` threads, started as needed, that call
    handlers and report each outcome on ``loop``.

    Daemon threads, unlike ``concurrent.futures``' (joined when the
    interpreter exits): a handler that never returns must not keep the
    process from exiting. Its session got a 4xx at ``data_processing_timeout``.
    """

    def __init__(self, size: int, loop: asyncio.AbstractEventLoop) -> None:
        if size < 1:
            raise ValueError(f"handler_threads must be at least 1, got {size}")
        self._size = size
        self._loop = loop
        self._work: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], Done] | None]
        self._work = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], done: Done) -> None:
        """Call ``fn(*args)`` on a thread; then ``done(error, result)`` on the loop."""
        with self._lock:
            # An idle thread takes it; else a new one, while there may be more;
            # else it waits in the queue for the first thread to finish.
            start = self._idle == 0 and self._threads < self._size
            if start:
                self._threads += 1
            elif self._idle > 0:
                self._idle -= 1
        self._work.put((fn, args, done))
        if start:
            name = f"kumo-handler-{self._threads}"
            threading.Thread(target=self._serve, name=name, daemon=True).start()

    def close(self) -> None:
        """Let every thread end once the work queued before is done."""
        with self._lock:
            threads = self._threads
        for _ in range(threads):
            self._work.put(None)

    def _serve(self) -> None:
        while (item := self._work.get()) is not None:
            fn, args, done = item
            try:
                error, result = None, fn(*args)
            except BaseException as raised:  # reported to the loop, like a task's exception
                error, result = raised, None
            with self._lock:
                self._idle += 1
            try:
                self._loop.call_soon_threadsafe(done, error, result)
            except RuntimeError:  # the loop is closed: nobody waits any more
                return
