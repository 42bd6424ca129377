"""``kumo.memoize``: cache a function's results per argument tuple.

One populate at a time per key: callers that find a populate running get
the last good value at once when there is one, else wait for that populate
(no thundering herd when a TTL expires under load). ``populate_timeout``
bounds a populate; ``.invalidate()`` expires one function's results, and
:func:`invalidate_all` every memoized function's (an epoch bump).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from ._core import duration_seconds

F = TypeVar("F", bound=Callable[..., Any])

logger = logging.getLogger("kumo_listener")

# Bumped by invalidate_all(): results stored under an older epoch are stale.
_epoch = 0
_epoch_lock = threading.Lock()


def invalidate_all() -> None:
    """Expire the results of every memoized function (of this process): the
    next call of each repopulates; until it has, the last good values stay
    available for ``stale_on_error`` and for callers while a populate runs."""
    global _epoch
    with _epoch_lock:
        _epoch += 1


# (the global epoch, the function's own generation) a result was fetched under.
Stamp = tuple[int, int]


class _Cache:
    """A bounded LRU map whose entries expire ``ttl`` seconds after they are
    stored, or when invalidated; expired entries stay (until evicted) as the
    last good values."""

    def __init__(self, ttl: float, capacity: int) -> None:
        self._ttl = ttl
        self._capacity = capacity
        self._entries: OrderedDict[Hashable, tuple[float, Stamp, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._generation = 0

    def stamp(self) -> Stamp:
        return (_epoch, self._generation)

    def lookup(self, key: Hashable) -> tuple[bool, bool, Any]:
        """``(fresh, known, value)``: known is a last good value, fresh or not."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False, False, None
            expires, stamp, value = entry
            self._entries.move_to_end(key)
            return expires > time.monotonic() and stamp == self.stamp(), True, value

    def put(self, key: Hashable, value: Any, stamp: Stamp) -> None:
        with self._lock:
            self._entries[key] = (time.monotonic() + self._ttl, stamp, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)

    def invalidate(self, key: Hashable | None = None) -> None:
        with self._lock:
            if key is None:
                self._generation += 1
            elif (entry := self._entries.get(key)) is not None:
                self._entries[key] = (0.0, entry[1], entry[2])


class _Flight:
    """A populate running on a thread: its outcome, once done."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


def memoize(
    fn: F,
    *,
    name: str,
    ttl: float | str,
    capacity: int,
    stale_on_error: bool = False,
    populate_timeout: float | str | None = None,
) -> F:
    """Wrap ``fn`` so that results are reused for ``ttl`` (seconds, or a
    string like ``"5 minutes"``), keeping at most ``capacity`` argument tuples.

    Arguments must be hashable. ``async def`` functions are supported: the
    awaited result is cached. Exceptions are not cached.

    One call at a time populates a key; while it runs, other callers get the
    last good value for the key when there is one, else wait for it and
    share its result (or its exception). ``populate_timeout`` (a duration)
    bounds a populate: an ``async def`` one is cancelled, a ``def`` one runs
    on a thread of its own and its callers stop waiting (it stores its result
    if it ever returns); either way the callers get ``TimeoutError``, or the
    last good value with ``stale_on_error``.

    With ``stale_on_error``, when ``fn`` raises (or times out) for arguments
    that had a result, that last good result is returned instead (and kept
    for another ``ttl``, when ``fn`` is tried again), and the error is logged
    as a warning on the ``kumo_listener`` logger: a half-written or invalid
    file being reloaded keeps the previous settings rather than failing
    connections.

    The wrapper's ``.invalidate(*args, **kwargs)`` expires the result for
    those arguments, ``.invalidate_all()`` every result of this function
    (see also the module's :func:`invalidate_all`).
    """
    if not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"memoize {name!r}: capacity must be a positive integer, got {capacity!r}")
    try:
        seconds = duration_seconds(ttl)
    except ValueError as error:
        raise ValueError(f"memoize {name!r}: ttl: {error}") from None
    try:
        timeout = None if populate_timeout is None else duration_seconds(populate_timeout)
    except ValueError as error:
        raise ValueError(f"memoize {name!r}: populate_timeout: {error}") from None
    cache = _Cache(seconds, capacity)
    lock = threading.Lock()
    flights: dict[Hashable, _Flight] = {}
    tasks: dict[Hashable, asyncio.Future[Any]] = {}
    counter = itertools.count()

    def key_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
        return (args, tuple(sorted(kwargs.items()))) if kwargs else args

    def fall_back(key: Hashable, error: BaseException) -> Any:
        """The last good result for ``key`` if allowed and known; else re-raise."""
        _, known, value = cache.lookup(key) if stale_on_error else (False, False, None)
        if not known:
            raise error
        logger.warning("memoize %r: keeping the last good result: %s", name, error)
        cache.put(key, value, cache.stamp())
        return value

    def timed_out() -> TimeoutError:
        return TimeoutError(f"memoize {name!r}: no result within {timeout}s")

    if inspect.iscoroutinefunction(fn):

        async def populate(key: Hashable, stamp: Stamp, args: Any, kwargs: Any) -> Any:
            try:
                value = await asyncio.wait_for(fn(*args, **kwargs), timeout)
            except TimeoutError:
                raise timed_out() from None
            cache.put(key, value, stamp)
            return value

        def forget_task(key: Hashable, done: asyncio.Future[Any]) -> None:
            if tasks.get(key) is done:
                del tasks[key]

        @functools.wraps(fn)
        async def cached_async(*args: Any, **kwargs: Any) -> Any:
            key = key_of(args, kwargs)
            fresh, known, value = cache.lookup(key)
            if fresh:
                return value
            task = tasks.get(key)
            loop = asyncio.get_running_loop()
            if task is not None and not task.done() and task.get_loop() is loop:
                if known:
                    return value
            else:
                task = asyncio.ensure_future(populate(key, cache.stamp(), args, kwargs))
                tasks[key] = task
                task.add_done_callback(functools.partial(forget_task, key))
            try:
                return await asyncio.shield(task)
            except Exception as error:
                return fall_back(key, error)

        wrapper: Any = cached_async
    else:

        def run(key: Hashable, stamp: Stamp, flight: _Flight, args: Any, kwargs: Any) -> None:
            try:
                flight.value = fn(*args, **kwargs)
                cache.put(key, flight.value, stamp)
            except Exception as error:
                flight.error = error
            finally:
                with lock:
                    if flights.get(key) is flight:
                        del flights[key]
                flight.done.set()

        @functools.wraps(fn)
        def cached(*args: Any, **kwargs: Any) -> Any:
            key = key_of(args, kwargs)
            fresh, known, value = cache.lookup(key)
            if fresh:
                return value
            with lock:
                flight = flights.get(key)
                leader = flight is None
                if flight is None:
                    flight = flights[key] = _Flight()
            if not leader and known:
                return value
            if leader:
                stamp = cache.stamp()
                if timeout is None:
                    run(key, stamp, flight, args, kwargs)
                else:
                    thread = threading.Thread(
                        target=run,
                        args=(key, stamp, flight, args, kwargs),
                        name=f"memoize-{name}-{next(counter)}",
                        daemon=True,
                    )
                    thread.start()
            if not flight.done.wait(timeout):
                return fall_back(key, timed_out())
            if flight.error is not None:
                return fall_back(key, flight.error)
            return flight.value

        cached.__qualname__ = f"memoize[{name}]"
        wrapper = cached

    wrapper.invalidate = lambda *args, **kwargs: cache.invalidate(key_of(args, kwargs))
    wrapper.invalidate_all = lambda: cache.invalidate()
    return wrapper  # type: ignore[no-any-return]
