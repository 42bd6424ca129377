"""Registration of policy event handlers (``kumo.on``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, overload

from . import _core

Handler = Callable[..., Any]
F = TypeVar("F", bound=Handler)

#: Every event a handler may be registered for: ``init``, which Python runs
#: at start-up, and the events sessions raise. Declared in the core
#: (``rust/events.rs``).
EVENTS: frozenset[str] = _core.EVENTS


class Policy:
    """A set of event handlers: one per event, registering again replaces it."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self._watchers: list[Callable[[], None]] = []

    @overload
    def on(self, event: str) -> Callable[[F], F]: ...
    @overload
    def on(self, event: str, fn: F) -> F: ...

    def on(self, event: str, fn: Handler | None = None) -> Any:
        """Register ``fn`` for ``event``; without ``fn``, a decorator."""
        _core.check_event(event)  # ValueError for an unknown name, suggesting the closest

        def register(handler: F) -> F:
            if not callable(handler):
                raise TypeError(f"handler for {event!r} must be callable, got {handler!r}")
            self._handlers[event] = handler
            self._changed()
            return handler

        return register if fn is None else register(fn)

    def remove(self, event: str) -> None:
        """Forget the handler of ``event``, if any."""
        self._handlers.pop(event, None)
        self._changed()

    def handler(self, event: str) -> Handler | None:
        return self._handlers.get(event)

    def events(self) -> list[str]:
        """The events that have a handler."""
        return list(self._handlers)

    def watch(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever the set of handlers changes."""
        self._watchers.append(callback)

    def _changed(self) -> None:
        for callback in self._watchers:
            callback()


default_policy = Policy()


@overload
def on(event: str) -> Callable[[F], F]: ...
@overload
def on(event: str, fn: F) -> F: ...


def on(event: str, fn: Handler | None = None) -> Any:
    """Register a handler in the default policy (``kumo.on``)."""
    return default_policy.on(event, fn) if fn is not None else default_policy.on(event)
