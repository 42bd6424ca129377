"""Running listeners: the server object and the dispatcher of policy calls.

The Rust core queues every policy call; the dispatcher, running on one
asyncio loop, takes them and runs the handlers: ``async def`` handlers as
tasks on that loop, ``def`` handlers on a pool of threads shared fairly
between clients (those marked ``kumo.inline`` on the loop), so a slow one
does not hold up other clients' connections.

The sessions run on the core's single-threaded tokio runtime. On a loop of
:meth:`Server.new_event_loop` (what :meth:`Server.start` and ``kumo-listener
serve`` use), the loop's selector drives that runtime while asyncio waits, so
a policy call costs no thread switch. On any other loop, a thread of the core
drives it and calls arrive through a wake-up socket.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import os
import selectors
import signal
import threading
import traceback
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Unpack

from . import _core
from .policy import Policy, default_policy
from .reject import Reject
from .threads import DEFAULT_HANDLER_THREADS, runs_on_loop

if TYPE_CHECKING:
    from .metrics import Collector
    from .types import ListenerParameters

logger = logging.getLogger("kumo_listener")

# What selectors accept: a descriptor, or an object with fileno().
FileObject = Any


@dataclass(frozen=True)
class Listener:
    """A started listener."""

    listen: str
    """The ``listen`` address as configured, e.g. ``"0.0.0.0:25"``, or the
    path of a Unix socket, e.g. ``"/run/kumo/lmtp.sock"``."""
    address: tuple[str, int] | str
    """The bound ``(host, port)`` (with port 0 in ``listen``, the real port),
    or the socket's path, as :mod:`socket` gives addresses."""
    max_connections: int = _core.DEFAULT_MAX_CONNECTIONS
    """The sessions it holds at once (``max_connections``)."""


class _DrivingSelector(selectors.BaseSelector):
    """asyncio's selector, for a loop that also drives a core's sessions:
    while asyncio would wait, the sessions run (GIL released) until a policy
    call is queued, one of asyncio's descriptors is ready, or its next timer
    is due; then the queued calls are dispatched."""

    def __init__(self, core: _core.Core) -> None:
        self._core = core
        self._selector = selectors.DefaultSelector()
        self.on_work: Callable[[], None] | None = None
        # False: asyncio's own selector only, the sessions don't run.
        self.driving = True

    def register(self, fileobj: FileObject, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._selector.register(fileobj, events, data)

    def unregister(self, fileobj: FileObject) -> selectors.SelectorKey:
        return self._selector.unregister(fileobj)

    def modify(self, fileobj: FileObject, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._selector.modify(fileobj, events, data)

    def get_map(self) -> Mapping[FileObject, selectors.SelectorKey]:
        return self._selector.get_map()

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if not self.driving:
            return self._selector.select(timeout)
        readable = self._core.drive(self._selector.fileno(), timeout)
        ready = self._selector.select(0) if readable else []
        if self.on_work is not None:
            try:
                self.on_work()
            except Exception:
                # As asyncio does for a failing callback: say so, and go on serving.
                logger.exception("dispatching policy calls failed")
        return ready

    def close(self) -> None:
        self._core.unwatch()
        self._selector.close()


class _Dispatcher:
    """Runs queued policy calls on the current asyncio loop."""

    # The core keeps log records below the logger's level (as last told)
    # aside, without waking us; this often we tell it the level again and
    # log those the level now lets through (it was lowered meanwhile).
    QUIET_RECORDS_INTERVAL = 1.0

    def __init__(
        self,
        core: _core.Core,
        policy: Policy,
        loop: asyncio.AbstractEventLoop,
        selector: _DrivingSelector | None,
        handler_threads: int,
    ) -> None:
        self._core = core
        self._policy = policy
        self._loop = loop
        self._selector = selector
        self._handler_threads = handler_threads
        self._thread_numbers = itertools.count(1)
        # Handler → whether it runs on the loop, found out once per handler.
        self._on_loop: dict[Callable[..., Any], bool] = {}
        self._wake_fd: int | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self._tick: asyncio.TimerHandle | None = None
        self._run_handlers = True

    def start(self, *, run_handlers: bool = True) -> None:
        """Dispatch queued calls from now on; without ``run_handlers``, fail
        them without running any handler (a server that failed to start)."""
        self._run_handlers = run_handlers
        self._core.start_handler_threads(self._handler_threads)
        self._start_handler_thread()
        if self._selector is not None:
            self._selector.on_work = self._drain
        else:
            self._wake_fd = self._core.drive_in_background()
            self._loop.add_reader(self._wake_fd, self._drain)
        self._drain_periodically()

    def close(self) -> None:
        if self._selector is not None:
            self._selector.on_work = None
        if self._wake_fd is not None:
            self._loop.remove_reader(self._wake_fd)
            self._core.stop_background()
        if self._tick is not None:
            self._tick.cancel()
        self._drain()
        self._core.close_handler_threads()

    def _drain_periodically(self) -> None:
        self.log(self._core.refresh_log_level(logger.getEffectiveLevel()))
        self._drain()
        self._tick = self._loop.call_later(self.QUIET_RECORDS_INTERVAL, self._drain_periodically)

    def _drain(self) -> None:
        jobs, logs = self._core.take()
        self.log(logs)
        for job in jobs:
            self._run(job)

    @staticmethod
    def log(records: list[tuple[int, str, dict[str, Any] | None]]) -> None:
        for level, message, fields in records:
            # The fields reach a formatter as `record.kumo` (see `logs.JsonFormatter`).
            logger.log(level, "%s", message, extra=None if fields is None else {"kumo": fields})

    def _runs_on_loop(self, handler: Callable[..., Any]) -> bool:
        on_loop = self._on_loop.get(handler)
        if on_loop is None:
            on_loop = self._on_loop[handler] = runs_on_loop(handler)
        return on_loop

    def _run(self, job: _core.Job) -> None:
        """Run a job the loop took (the core gives the threads theirs directly)."""
        if not self._run_handlers:
            job.fail(f"{job.event}: the server failed to start")
            return
        handler = self._policy.handler(job.event)
        if handler is None:
            job.complete(None)
            return
        if not self._runs_on_loop(handler):
            # Made a `def` handler since the core was told (`Server._sync_handlers`).
            self._core.run_on_handler_thread(job)
            return
        try:
            result = handler(*job.args)
        except Exception as error:
            self._fail(job, error)
            return
        self._finish(job, result)

    def _start_handler_thread(self) -> None:
        name = f"kumo-handler-{next(self._thread_numbers)}"
        threading.Thread(target=self._serve_handler_calls, name=name, daemon=True).start()

    def _serve_handler_calls(self) -> None:
        """A handler thread's life: the calls the core gives it, until it closes.

        Daemon threads: a handler that never returns must not keep the
        process from exiting (its session got a 4xx at ``data_processing_timeout``).
        """
        job = None
        while (taken := self._core.next_handler_job(job)) is not None:
            job, start_another = taken
            if start_another:
                self._start_handler_thread()
            self._run_on_thread(job)

    def _run_on_thread(self, job: _core.Job) -> None:
        handler = self._policy.handler(job.event) if self._run_handlers else None
        if handler is not None and self._runs_on_loop(handler):
            # Made inline or async since the core was told: its place is the loop.
            try:
                self._loop.call_soon_threadsafe(self._run, job)
            except RuntimeError:  # the loop is closed: nobody waits any more
                job.fail(f"{job.event}: the server stopped")
            return
        if handler is None:
            self._run(job)  # nothing to run, or the server failed to start
            return
        try:
            result = handler(*job.args)
        except BaseException as error:  # reported like a task's exception
            self._ran(job, error, None)
        else:
            self._ran(job, None, result)

    def _ran(self, job: _core.Job, error: BaseException | None, result: Any) -> None:
        """A handler run on a thread has returned (or raised): its job is
        finished from that thread (a job is thread-safe), without waking the
        loop, unless the handler returned an awaitable."""
        if job.abandoned:
            logger.warning(
                "%s handler for %s returned after its session stopped waiting",
                job.event,
                _peer_of(job),
            )
        if error is not None:
            self._fail(job, error)
        elif result is not None and inspect.isawaitable(result):
            try:
                self._loop.call_soon_threadsafe(self._await, job, result)
            except RuntimeError:  # the loop is closed: nobody waits any more
                job.fail(f"{job.event}: the server stopped")
        else:
            self._complete(job, result)

    def _finish(self, job: _core.Job, result: Any) -> None:
        # `None` first: most handlers return it, and isawaitable is slow to say no.
        if result is not None and inspect.isawaitable(result):
            self._await(job, result)
        else:
            self._complete(job, result)

    def _await(self, job: _core.Job, awaitable: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(awaitable, loop=self._loop)
        self._tasks.add(task)

        def done(task: asyncio.Future[Any]) -> None:
            self._tasks.discard(task)
            if task.cancelled():
                self._fail(job, asyncio.CancelledError(f"{job.event} handler was cancelled"))
            elif (error := task.exception()) is not None:
                self._fail(job, error)
            else:
                self._complete(job, task.result())

        task.add_done_callback(done)

    def _complete(self, job: _core.Job, result: Any) -> None:
        try:
            job.complete(result)
        except (TypeError, ValueError) as error:
            peer = _peer_of(job)
            logger.error(
                "%s handler returned an unusable result for %s:\n%s", job.event, peer, error
            )
            job.fail(f"{job.event}: {error}")

    def _fail(self, job: _core.Job, error: BaseException) -> None:
        if isinstance(error, Reject):
            job.reject(error.code, error.message)
            return
        peer = _peer_of(job)
        text = "".join(traceback.format_exception(error)).rstrip()
        logger.error("%s handler failed for %s:\n%s", job.event, peer, text)
        job.fail(f"{job.event}: {error!r}")


def _abandoned(job: _core.Job) -> Callable[[], bool]:
    """Whether nobody waits for ``job`` any more, asked when a thread is about to run it."""
    return lambda: job.abandoned


def _peer_of(job: _core.Job) -> str:
    for arg in job.args:
        if isinstance(arg, _core.ConnectionMeta):
            return str(arg.get_meta("received_from"))
    return "?"


class Server:
    """Listeners sharing one sink and one policy.

    Embedded use (tests, applications)::

        with kumo.Server(policy=policy, maildir=tmp_path) as server:
            listener = server.start_esmtp_listener(listen="127.0.0.1:0")
            host, port = listener.address
            ...

    ``with`` (or :meth:`start`) runs the dispatcher on a background thread;
    :meth:`run` runs it on the caller's asyncio loop instead, best one of
    :meth:`new_event_loop`. ``reuse_port`` binds listeners with SO_REUSEPORT,
    for worker processes sharing a port. ``def`` handlers run on at most
    ``handler_threads`` threads, at most a quarter of them for one client's
    calls (see :mod:`kumo_listener.threads`). While ``busy_at`` policy calls wait for
    their handlers, new connections get ``421 4.3.2 service busy``.

    ``redis`` (``"redis://HOST:PORT[/DB]"``) shares the per-client limits
    (``max_connections_per_client``, ``max_connection_rate_per_client``,
    ``max_message_rate_per_client``) with every server that points at the
    same Redis. Each call to it has ``redis_timeout`` (seconds, or a string
    like ``"100ms"``; 0.1 by default); when Redis does not answer in time,
    this process's own counts decide, or with ``redis_fail_closed`` new
    connections get ``421 4.3.0`` (see docs/operations/limits.md).
    """

    def __init__(
        self,
        *,
        policy: Policy | None = None,
        sink: str = "maildir",
        maildir: str | os.PathLike[str] = "maildir",
        shutdown_grace: float = 30.0,
        reuse_port: bool = False,
        handler_threads: int = DEFAULT_HANDLER_THREADS,
        busy_at: int = _core.DEFAULT_BUSY_AT,
        redis: str | None = None,
        redis_timeout: float | str | None = None,
        redis_fail_closed: bool = False,
    ) -> None:
        self.policy = policy if policy is not None else default_policy
        maildir_path = os.fspath(maildir) if sink == "maildir" else None
        try:
            timeout = None if redis_timeout is None else _core.duration_seconds(redis_timeout)
        except ValueError as error:
            raise ValueError(f"redis_timeout: {error}") from None
        self._core = _core.Core(
            sink, maildir_path, reuse_port, busy_at, redis, timeout, redis_fail_closed
        )
        self._shutdown_grace = shutdown_grace
        if handler_threads < 1:
            raise ValueError(f"handler_threads must be at least 1, got {handler_threads}")
        self._handler_threads = handler_threads
        self._listeners: list[Listener] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._driving: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _DrivingSelector] = (
            weakref.WeakKeyDictionary()
        )
        self._sync_handlers()
        self.policy.watch(self._sync_handlers)

    @property
    def listeners(self) -> list[Listener]:
        return list(self._listeners)

    @property
    def sink(self) -> str:
        """What the sink is, e.g. ``"Maildir ./maildir"``."""
        return self._core.describe_sink()

    def start_esmtp_listener(self, **params: Unpack[ListenerParameters]) -> Listener:
        """Validate ``params`` and start a listener (docs/reference/parameters.md)."""
        bound = self._core.start_listener(dict(params))
        listen = str(params.get("listen", _core.DEFAULT_LISTEN))
        most = int(params.get("max_connections", _core.DEFAULT_MAX_CONNECTIONS))
        listener = Listener(listen, bound, most)
        self._listeners.append(listener)
        return listener

    def write_logs_directly(self, log_format: Literal["text", "json"]) -> None:
        """From now on the core writes its own records (refusals, stored
        messages, disconnects…) to standard error itself, in the lines of
        ``kumo-listener serve --log-format`` (what it does when the logging
        set-up is its own), rather than hand each to the ``kumo_listener``
        logger, which costs more than receiving the message. The logger's
        level still decides which are written; its handlers no longer see them."""
        self._core.write_logs_directly(log_format)
        _Dispatcher.log(self._core.refresh_log_level(logger.getEffectiveLevel()))

    def metrics_collector(self) -> Collector:
        """A ``prometheus_client`` collector of this server's metrics, for
        ``registry.register(...)``."""
        from .metrics import Collector

        return Collector(self._core.metrics)

    def _sync_handlers(self) -> None:
        """Tell the core which events have handlers, and which of them run
        on the handler threads (its queue gives those calls to them directly)."""
        handlers = {event: self.policy.handler(event) for event in self.policy.events()}
        threaded = [event for event, fn in handlers.items() if fn and not runs_on_loop(fn)]
        self._core.set_handlers(list(handlers), threaded)

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        """An asyncio loop that runs this server's sessions while it waits, so
        that :meth:`run` on it calls policy handlers without a thread switch:
        ``asyncio.Runner(loop_factory=server.new_event_loop)``."""
        selector = _DrivingSelector(self._core)
        loop = asyncio.SelectorEventLoop(selector)
        self._driving[loop] = selector
        return loop

    def run_forever(self, **options: Any) -> None:
        """:meth:`run` (with these options) on a new loop of
        :meth:`new_event_loop`, in this thread."""
        with asyncio.Runner(loop_factory=self.new_event_loop) as runner:
            runner.run(self.run(**options))

    async def run(
        self,
        *,
        handle_signals: bool = False,
        run_init: bool = False,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        """Serve on the running loop until :meth:`stop` (or SIGINT/SIGTERM
        with ``handle_signals``), then shut down gracefully. ``on_ready`` is
        called once ``init`` has run.

        The sessions don't run until ``init`` and ``on_ready`` have returned:
        listeners they start are bound at once (the kernel queues connections
        in the backlog), but no connection is accepted and no other handler
        runs before. ``kumo-listener serve --user`` drops root in ``on_ready``."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stopping = asyncio.Event()
        selector = self._driving.get(loop)
        dispatcher = _Dispatcher(self._core, self.policy, loop, selector, self._handler_threads)
        if handle_signals:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, self._stopping.set)
        try:
            if selector is not None:
                selector.driving = False
            try:
                if run_init:
                    await self.run_init()
                if on_ready is not None:
                    on_ready()
            except BaseException:
                # Shutting down needs the runtime driven, and a connection may
                # be accepted meanwhile: no handler runs for it.
                self._core.begin_shutdown()
                dispatcher.start(run_handlers=False)
                raise
            else:
                dispatcher.start()
            finally:
                if selector is not None:
                    selector.driving = True
            await self._stopping.wait()
        finally:
            await self._shut_down()
            dispatcher.close()

    async def run_init(self) -> None:
        """Run the policy's ``init`` handler with this server as the one that
        ``kumo.start_esmtp_listener`` starts listeners on."""
        init = self.policy.handler("init")
        if init is None:
            return
        with current_server(self):
            result = init()
            if inspect.isawaitable(result):
                await result

    async def _shut_down(self) -> None:
        # A session receiving a message gets most of the grace to finish it.
        self._core.begin_shutdown(self._shutdown_grace)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._shutdown_grace
        # The runtime runs while this loop waits: listening sockets close
        # (so that the port is free when stop() returns) and sessions finish.
        while (
            self._core.active_sessions() or self._core.open_listeners()
        ) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if self._core.active_sessions():
            logger.warning(
                "%d sessions still open after the shutdown grace", self._core.active_sessions()
            )

    def start(self) -> Server:
        """Run the dispatcher on a background thread."""
        if self._thread is not None:
            raise RuntimeError("server already started")
        ready = threading.Event()

        def serve() -> None:
            try:
                self.run_forever(on_ready=ready.set)
            finally:
                ready.set()

        self._thread = threading.Thread(target=serve, name="kumo-listener-policy", daemon=True)
        self._thread.start()
        ready.wait()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Shut down gracefully: stop accepting, let sessions finish (421 to
        idle ones), then stop the dispatcher. Safe from any thread."""
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stopping.set)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


_current: Server | None = None
_default: Server | None = None
# configure()'s settings of the default server; the rest are Server's defaults.
_default_settings: dict[str, Any] = {}


@contextmanager
def current_server(server: Server) -> Iterator[Server]:
    """Make ``kumo.start_esmtp_listener`` start listeners on ``server``."""
    global _current
    previous, _current = _current, server
    try:
        yield server
    finally:
        _current = previous


def configure(
    *,
    sink: str | None = None,
    maildir: str | os.PathLike[str] | None = None,
    reuse_port: bool | None = None,
    handler_threads: int | None = None,
    redis: str | None = None,
    redis_timeout: float | str | None = None,
    redis_fail_closed: bool | None = None,
) -> None:
    """Set up the default server (sink, SO_REUSEPORT, handler threads, the
    Redis of the shared per-client limits: see :class:`Server`), before it
    is first used."""
    if _default is not None:
        raise RuntimeError("the default server is already running; configure it before use")
    given = {
        "sink": sink,
        "maildir": maildir,
        "reuse_port": reuse_port,
        "handler_threads": handler_threads,
        "redis": redis,
        "redis_timeout": redis_timeout,
        "redis_fail_closed": redis_fail_closed,
    }
    _default_settings.update((name, value) for name, value in given.items() if value is not None)


def configure_dns(
    servers: Sequence[str] = (),
    *,
    timeout: float = _core.DEFAULT_DNS[0],
    attempts: int = _core.DEFAULT_DNS[1],
    budget: float = _core.DEFAULT_DNS[2],
) -> None:
    """Set up the process's one resolver, which the ``authentication``
    checks of every server use (docs/operations/authentication.md).

    ``servers``: ``"HOST:PORT"`` or IP addresses (port 53) of the name
    servers to ask, UDP then TCP; none: the system's (``/etc/resolv.conf``).
    ``timeout``: seconds one query waits for one server; ``attempts``: how
    many times a query is sent; ``budget``: seconds one check may take in
    all (SPF at MAIL FROM, or the checks of a message), past which what is
    left is ``temperror``. Takes effect for the checks started after it,
    with an empty cache. Raises ``ValueError`` for a bad address or value.
    """
    _core.configure_dns(list(servers), timeout, attempts, budget)


def default_server() -> Server:
    """The server behind the module-level API, created on first use."""
    global _default
    if _default is None:
        _default = Server(policy=default_policy, **_default_settings)
    return _default


def start_esmtp_listener(**params: Unpack[ListenerParameters]) -> Listener:
    """Start a listener (``kumo.start_esmtp_listener``), normally from ``init``."""
    return (_current or default_server()).start_esmtp_listener(**params)


def serve() -> None:
    """Run the default server: ``init``, then serve until SIGINT/SIGTERM."""
    default_server().run_forever(handle_signals=True, run_init=True)
