"""``kumo.memoize``: cache a function's results per argument tuple."""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from ._core import duration_seconds

F = TypeVar("F", bound=Callable[..., Any])


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

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._entries[key] = (time.monotonic() + self._ttl, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)


def memoize(fn: F, *, name: str, ttl: float | str, capacity: int) -> F:
    """Wrap ``fn`` so that results are reused for ``ttl`` (seconds, or a
    string like ``"5 minutes"``), keeping at most ``capacity`` argument tuples.

    Arguments must be hashable. ``async def`` functions are supported: the
    awaited result is cached. Exceptions are not cached.
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

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def cached_async(*args: Any, **kwargs: Any) -> Any:
            key = key_of(args, kwargs)
            hit, value = cache.get(key)
            if not hit:
                value = await fn(*args, **kwargs)
                cache.put(key, value)
            return value

        return cached_async  # type: ignore[return-value]

    @functools.wraps(fn)
    def cached(*args: Any, **kwargs: Any) -> Any:
        key = key_of(args, kwargs)
        hit, value = cache.get(key)
        if not hit:
            value = fn(*args, **kwargs)
            cache.put(key, value)
        return value

    cached.__qualname__ = f"memoize[{name}]"
    return cached  # type: ignore[return-value]
