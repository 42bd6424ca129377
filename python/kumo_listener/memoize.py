"""``kumo.memoize``: cache a function's results per argument tuple."""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from ._core import duration_seconds

F = TypeVar("F", bound=Callable[..., Any])

logger = logging.getLogger("kumo_listener")


class _Cache:
    """A bounded LRU map whose entries expire ``ttl`` seconds after they are stored."""

    def __init__(self, ttl: float, capacity: int) -> None:
        self._ttl = ttl
        self._capacity = capacity
        self._entries: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> tuple[bool, Any]:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] <= time.monotonic():
                return False, None
            self._entries.move_to_end(key)
            return True, entry[1]

    def get_stale(self, key: Hashable) -> tuple[bool, Any]:
        """The value stored for ``key``, expired or not (until evicted)."""
        with self._lock:
            entry = self._entries.get(key)
            return (False, None) if entry is None else (True, entry[1])

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._entries[key] = (time.monotonic() + self._ttl, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)


def memoize(
    fn: F, *, name: str, ttl: float | str, capacity: int, stale_on_error: bool = False
) -> F:
    """Wrap ``fn`` so that results are reused for ``ttl`` (seconds, or a
    string like ``"5 minutes"``), keeping at most ``capacity`` argument tuples.

    Arguments must be hashable. ``async def`` functions are supported: the
    awaited result is cached. Exceptions are not cached.

    With ``stale_on_error``, when ``fn`` raises for arguments that had a
    result, that last good result is returned instead (and kept for another
    ``ttl``, when ``fn`` is tried again), and the error is logged as a
    warning on the ``kumo_listener`` logger: a half-written or invalid file
    being reloaded keeps the previous settings rather than failing connections.
    """
    if not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"memoize {name!r}: capacity must be a positive integer, got {capacity!r}")
    try:
        seconds = duration_seconds(ttl)
    except ValueError as error:
        raise ValueError(f"memoize {name!r}: ttl: {error}") from None
    cache = _Cache(seconds, capacity)

    def key_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
        return (args, tuple(sorted(kwargs.items()))) if kwargs else args

    def fall_back(key: Hashable, error: Exception) -> Any:
        """The last good result for ``key`` if allowed and known; else re-raise."""
        hit, value = cache.get_stale(key) if stale_on_error else (False, None)
        if not hit:
            raise error
        logger.warning("memoize %r: keeping the last good result: %s", name, error)
        cache.put(key, value)
        return value

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def cached_async(*args: Any, **kwargs: Any) -> Any:
            key = key_of(args, kwargs)
            hit, value = cache.get(key)
            if not hit:
                try:
                    value = await fn(*args, **kwargs)
                except Exception as error:
                    return fall_back(key, error)
                cache.put(key, value)
            return value

        return cached_async  # type: ignore[return-value]

    @functools.wraps(fn)
    def cached(*args: Any, **kwargs: Any) -> Any:
        key = key_of(args, kwargs)
        hit, value = cache.get(key)
        if not hit:
            try:
                value = fn(*args, **kwargs)
            except Exception as error:
                return fall_back(key, error)
            cache.put(key, value)
        return value

    cached.__qualname__ = f"memoize[{name}]"
    return cached  # type: ignore[return-value]
