"""Type stubs for the compiled core (``rust/py``)."""

from typing import Any, BinaryIO, final

# PyO3 sets the module's __all__ to everything it adds; stubtest checks this
# list against it.
__all__ = [
    "AUTHENTICATION_FIELDS",
    "DEFAULT_BUSY_AT",
    "DEFAULT_DNS",
    "DEFAULT_HANDLER_THREADS",
    "DEFAULT_LISTEN",
    "DEFAULT_MAX_CONNECTIONS",
    "EVENTS",
    "FORWARD_OPTIONS",
    "METRICS",
    "PARAMETERS",
    "ConnectionMeta",
    "Core",
    "EnvelopeAddress",
    "Job",
    "ListenerParams",
    "Message",
    "ParamsError",
    "check_authentication",
    "check_event",
    "configure_dns",
    "duration_seconds",
    "validate_overrides",
]

#: Every event a handler may be registered for (``init`` included).
EVENTS: frozenset[str]
#: ``listen`` when none is given: ``start_esmtp_listener``, ``kumo-listener serve``.
DEFAULT_LISTEN: str
#: ``max_connections`` when none is given.
DEFAULT_MAX_CONNECTIONS: int
#: ``busy_at`` when none is given: policy calls waiting before new connections get ``421``.
DEFAULT_BUSY_AT: int
#: ``handler_threads`` when none is given: AnyIO's (and so FastAPI's) default.
DEFAULT_HANDLER_THREADS: int
#: ``(name, kind, help, labels)`` of every Prometheus metric; ``kind`` is
#: ``"counter"``, ``"gauge"`` or ``"histogram"``.
METRICS: list[tuple[str, str, str, list[str]]]
#: ``(name, scope)`` of every listener parameter, in the table's order;
#: ``scope`` is ``"top_level"`` (``start_esmtp_listener`` only) or ``"anywhere"``.
PARAMETERS: list[tuple[str, str]]
#: The fields of the ``forward_options`` table.
FORWARD_OPTIONS: list[str]
#: The fields of the ``authentication`` table.
AUTHENTICATION_FIELDS: list[str]
#: ``(timeout, attempts, budget)`` of the resolver when none are given.
DEFAULT_DNS: tuple[float, int, float]

class ParamsError(ValueError):
    """Invalid listener parameters; the message lists every error with its key path."""

@final
class ConnectionMeta:
    def get_meta(self, name: str) -> Any: ...
    def set_meta(self, name: str, value: Any) -> None: ...

@final
class EnvelopeAddress:
    @property
    def user(self) -> str: ...
    @property
    def domain(self) -> str: ...
    @property
    def params(self) -> dict[str, str | None]:
        """ESMTP parameters of its MAIL FROM/RCPT TO: keys upper-case, values
        xtext-decoded, None for a bare keyword."""

@final
class Message:
    @property
    def id(self) -> str: ...
    @property
    def sender(self) -> EnvelopeAddress: ...
    @property
    def recipients(self) -> list[EnvelopeAddress]: ...
    @property
    def data(self) -> bytes: ...
    @property
    def authentication_results(self) -> list[dict[str, Any]]:
        """The ``authentication`` parameter's results, each
        ``{"method", "result", "reason", "props"}``."""
    def open(self) -> BinaryIO: ...
    def get_meta(self, name: str) -> Any: ...
    def set_meta(self, name: str, value: Any) -> None: ...

@final
class ListenerParams:
    """Overrides validated once, for ``smtp_server_get_dynamic_parameters`` to return."""

    def __new__(cls, params: dict[str, Any] | None = None, **overrides: Any) -> ListenerParams: ...

@final
class Job:
    @property
    def abandoned(self) -> bool: ...
    @property
    def client(self) -> str | None: ...
    @property
    def event(self) -> str: ...
    @property
    def args(self) -> tuple[Any, ...]: ...
    def complete(self, result: Any) -> None: ...
    def reject(self, code: int, message: str) -> None: ...
    def fail(self, reason: str) -> None: ...

@final
class Core:
    def __new__(
        cls,
        sink: str,
        maildir: str | None = None,
        reuse_port: bool = False,
        busy_at: int = ...,
        redis: str | None = None,
        redis_timeout: float | None = None,
        redis_fail_closed: bool = False,
    ) -> Core: ...
    def start_listener(self, params: dict[str, Any]) -> tuple[str, int] | str: ...
    def set_handlers(self, events: list[str], threaded: list[str] = ...) -> None:
        """Raises ``ValueError`` for a name that is not an event."""
    def start_handler_threads(self, size: int) -> None: ...
    def next_handler_job(self, finished: Job | None = None) -> tuple[Job, bool] | None: ...
    def run_on_handler_thread(self, job: Job) -> None: ...
    def close_handler_threads(self) -> None: ...
    @property
    def handler_calls_dropped(self) -> int: ...
    def refresh_log_level(self, level: int) -> list[tuple[int, str, dict[str, Any] | None]]: ...
    def drive(self, watched: int, timeout: float | None) -> bool: ...
    def write_logs_directly(self, format: str) -> None: ...
    def unwatch(self) -> None: ...
    def drive_in_background(self) -> int: ...
    def stop_background(self) -> None: ...
    def take(self) -> tuple[list[Job], list[tuple[int, str, dict[str, Any] | None]]]: ...
    def begin_shutdown(self, grace: float = 0.0) -> None: ...
    def active_sessions(self) -> int: ...
    def open_listeners(self) -> int: ...
    def describe_sink(self) -> str: ...
    def metrics(self) -> dict[str, list[tuple[tuple[str, ...], Any]]]: ...

def validate_overrides(value: Any) -> list[str]: ...
def duration_seconds(value: float | str) -> float: ...
def check_event(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is an event, suggesting the closest."""

def configure_dns(servers: list[str], timeout: float, attempts: int, budget: float) -> None:
    """Point the process's resolver at ``servers`` (none: the system's)."""

def check_authentication(
    message: Message,
    conn_meta: ConnectionMeta,
    spf: bool,
    dkim: bool,
    dmarc: bool,
    arc: bool,
    iprev: bool,
    add_header: bool,
) -> list[dict[str, Any]]:
    """Run the checks asked on ``message``, blocking without the GIL."""
