"""The threads ``def`` handlers run on, and ``kumo.inline``.

As in FastAPI, a ``def`` handler runs on a thread of a pool, so one that
blocks (a synchronous database client, an HTTP call) does not hold up the
server's loop; ``async def`` handlers, and ``def`` handlers marked with
:func:`inline`, run on the server's asyncio loop.

The pool is shared fairly between clients (as the per-client limits count
them: an IPv4 address, or an IPv6 network of ``client_ipv6_prefix_length``
bits): one client runs handlers on at most a quarter of the threads at once,
and clients with calls waiting take turns. So a client whose calls are slow
(names whose DNS it answers slowly, say) delays its own sessions, and the
other clients' calls still find a thread. A call whose session has stopped
waiting (the client went away, or ``data_processing_timeout`` passed) before
a thread takes it is dropped without running.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
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


def fair_share(size: int) -> int:
    """The most threads one client's handlers run on at once, of ``size``."""
    return max(1, size // 4)


class _Work:
    __slots__ = ("abandoned", "args", "done", "fn")

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        done: Done,
        abandoned: Callable[[], bool] | None,
    ) -> None:
        self.fn = fn
        self.args = args
        self.done = done
        self.abandoned = abandoned


class HandlerThreads:
    """A pool of at most ``size`` threads, started as needed, that call
    handlers and report each outcome on ``loop``, shared fairly between
    clients.

    Each call names its client (``None``: one exempt from the per-client
    limits, which shares no cap). A client runs at most ``per_client`` calls
    at once (:func:`fair_share` by default); its other calls wait in its own
    queue, and the clients with a call that may start are served in turn,
    one call each. Before a call starts, ``abandoned()`` is asked: a call
    nobody waits for any more is dropped, its ``done`` never called.

    Daemon threads, unlike ``concurrent.futures``' (joined when the
    interpreter exits): a handler that never returns must not keep the
    process from exiting. Its session got a 4xx at ``data_processing_timeout``.
    """

    def __init__(
        self, size: int, loop: asyncio.AbstractEventLoop, per_client: int | None = None
    ) -> None:
        if size < 1:
            raise ValueError(f"handler_threads must be at least 1, got {size}")
        self._size = size
        self._per_client = per_client if per_client is not None else fair_share(size)
        self._loop = loop
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        # Calls waiting, per client.
        self._queues: dict[Hashable, deque[_Work]] = {}
        # Calls running, per client (those with any).
        self._running: dict[Hashable, int] = {}
        # The clients with a call waiting that may start now, in turn order.
        self._turns: OrderedDict[Hashable, None] = OrderedDict()
        self._threads = 0
        self._idle = 0
        self._closing = False
        self.dropped = 0
        """Calls dropped unrun because nobody waited for them any more."""

    def submit(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        done: Done,
        client: Hashable = None,
        abandoned: Callable[[], bool] | None = None,
    ) -> None:
        """Call ``fn(*args)`` on a thread, in ``client``'s turn; then
        ``done(error, result)`` on the loop (not when ``abandoned()`` said
        true before it started)."""
        with self._lock:
            self._queues.setdefault(client, deque()).append(_Work(fn, args, done, abandoned))
            if client not in self._turns and self._may_start(client):
                self._turns[client] = None
                self._wake_or_start()

    def close(self) -> None:
        """Let every thread end once the work queued before is done."""
        with self._lock:
            self._closing = True
            self._idle = 0
            self._wake.notify_all()

    def _may_start(self, client: Hashable) -> bool:
        return client is None or self._running.get(client, 0) < self._per_client

    def _wake_or_start(self) -> None:
        """A call may start: an idle thread takes it; else a new one, while
        there may be more; else it waits for the first thread to finish.
        Called with the lock held."""
        if self._idle > 0:
            # Counted off here, by the waker: the next call wakes another.
            self._idle -= 1
            self._wake.notify()
        elif self._threads < self._size:
            self._threads += 1
            name = f"kumo-handler-{self._threads}"
            threading.Thread(target=self._serve, name=name, daemon=True).start()

    def _next(self) -> tuple[Hashable, _Work] | None:
        """The next call to run, counted as running; ``None`` when the
        pool closes. Called with the lock held."""
        while True:
            if not self._turns:
                if self._closing:
                    return None
                self._idle += 1
                self._wake.wait()
                continue
            client, _ = self._turns.popitem(last=False)
            queue = self._queues[client]
            work = queue.popleft()
            if not queue:
                del self._queues[client]
            if work.abandoned is not None and work.abandoned():
                self.dropped += 1
                self._take_turn_again(client)
                continue
            self._running[client] = self._running.get(client, 0) + 1
            self._take_turn_again(client)
            if self._turns:
                self._wake_or_start()
            return client, work

    def _take_turn_again(self, client: Hashable) -> None:
        """Put ``client`` back in line, at the end, if it has a call that may start."""
        if client in self._queues and client not in self._turns and self._may_start(client):
            self._turns[client] = None

    def _serve(self) -> None:
        while True:
            with self._lock:
                taken = self._next()
                if taken is None:
                    self._threads -= 1
                    return
            client, work = taken
            try:
                error, result = None, work.fn(*work.args)
            except BaseException as raised:  # reported to the loop, like a task's exception
                error, result = raised, None
            with self._lock:
                running = self._running[client] - 1
                if running:
                    self._running[client] = running
                else:
                    del self._running[client]
                # This thread serves the next turn itself, this client's if it is alone.
                self._take_turn_again(client)
            try:
                self._loop.call_soon_threadsafe(work.done, error, result)
            except RuntimeError:  # the loop is closed: nobody waits any more
                return
