"""Types for editors and mypy: the listener parameters as ``TypedDict``\\ s
and the signatures of the event handlers.

``start_esmtp_listener(**params)`` takes :class:`ListenerParameters`, so a
misspelled or mistyped parameter is flagged before the policy runs; a
``smtp_server_get_dynamic_parameters`` handler returns
:class:`OverrideParameters`. The keys are the core's table of parameters
(``_core.PARAMETERS``); ``tests/test_types.py`` holds the two together.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeAlias, TypedDict, TypeVar

from ._core import ConnectionMeta, EnvelopeAddress, ListenerParams, Message

#: Seconds, or a string like ``"5 minutes"``.
Duration = float | str
#: Bytes, or a string like ``"20 MiB"``.
Size = int | str


class KeyData(TypedDict):
    """PEM given inline rather than as a file path."""

    key_data: str


#: A file path, or ``{"key_data": "..."}``.
KeySource = str | KeyData


class TraceHeaders(TypedDict, total=False):
    received_header: bool
    supplemental_header: bool
    header_name: str
    include_meta_names: list[str]


class ForwardOptions(TypedDict, total=False):
    """How the upstreams of ``forward_to`` are reached."""

    tls: Literal["none", "opportunistic", "required", "verify"]
    tls_ca: KeySource
    connect_timeout: Duration
    command_timeout: Duration
    data_timeout: Duration
    pool_size: int
    idle_timeout: Duration
    backoff: Duration


#: What one authentication method does.
AuthMode = Literal["off", "annotate", "enforce"]


class Authentication(TypedDict, total=False):
    """The methods checked at reception (docs/operations/authentication.md)."""

    spf: AuthMode
    dkim: AuthMode
    dmarc: AuthMode
    arc: AuthMode
    iprev: AuthMode


class AuthenticationResult(TypedDict):
    """One result of ``message.authentication_results`` (KumoMTA's shape)."""

    method: Literal["spf", "dkim", "dmarc", "arc", "iprev"]
    result: str
    reason: str | None
    props: dict[str, str]


class AuthenticationChecks(TypedDict, total=False):
    """The options of ``kumo.check_authentication``: the methods to run
    (each ``True`` by default) and whether to add the header (``False``)."""

    spf: bool
    dkim: bool
    dmarc: bool
    arc: bool
    iprev: bool
    add_header: bool


class OverrideParameters(TypedDict, total=False):
    """Parameters allowed anywhere: at the top level, in ``peer`` and ``via``
    blocks, and in what ``smtp_server_get_dynamic_parameters`` returns."""

    hostname: str
    banner: str
    relay_hosts: list[str]
    client_timeout: Duration
    data_processing_timeout: Duration
    max_message_size: Size
    max_recipients_per_message: int
    max_messages_per_connection: int
    data_buffer_size: Size
    body_spill_threshold: Size
    line_length_hard_limit: int
    invalid_line_endings: Literal["Deny", "Allow", "Fix"]
    meta: dict[str, Any]
    peer: dict[str, OverrideParameters]
    via: dict[str, OverrideParameters]
    batch_handling: Literal["BifurcateAlways", "BatchByDomain"]
    trace_headers: TraceHeaders
    tls_certificate: KeySource
    tls_private_key: KeySource
    tls_required_client_ca: KeySource
    allow_xclient: bool
    require_proxy_protocol: bool
    max_connections_per_client: int
    max_connection_rate_per_client: str
    max_message_rate_per_client: str
    forward_to: list[str]
    forward_options: ForwardOptions
    max_auth_failures_per_client: str | Literal[False]
    client_ipv6_prefix_length: int
    max_spilled_bytes_per_client: Size
    max_data_duration: Duration
    authentication: Authentication


class ListenerParameters(OverrideParameters, total=False):
    """What ``start_esmtp_listener`` takes: every parameter, the top-level-only ones too."""

    listen: str
    max_connections: int
    implicit_tls: bool
    protocol: Literal["smtp", "lmtp"]
    body_memory_limit: Size
    body_spool_path: str


#: What a handler returns, ``def`` or ``async def``: ``T``, or an awaitable of it.
_Answer = TypeVar("_Answer")
Returns: TypeAlias = _Answer | Awaitable[_Answer]

_Params: TypeAlias = OverrideParameters | ListenerParams | None

GetDynamicParameters = Callable[[str, ConnectionMeta], Returns[_Params]]
ConnectionAccepted = Callable[[ConnectionMeta], Returns[None]]
Ehlo = Callable[[str, ConnectionMeta, list[str]], Returns[list[str] | None]]
MailFrom = Callable[[EnvelopeAddress, ConnectionMeta], Returns[None]]
RcptTo = Callable[[EnvelopeAddress, ConnectionMeta], Returns[None]]
GetListenerDomain = Callable[[str, str, ConnectionMeta], Returns[dict[str, Any] | None]]
Data = Callable[[Message, ConnectionMeta], Returns[None]]
MessageReceived = Callable[[Message, ConnectionMeta], Returns[None]]
AuthPlain = Callable[[str, str, str, ConnectionMeta], Returns[bool]]
#: Groups of recipients (``EnvelopeAddress`` or ``str``), each recipient in one.
SplitTransaction = Callable[
    [Message, ConnectionMeta], Returns[list[list[EnvelopeAddress | str]] | None]
]
#: ``(status, text)``, each ``None`` to keep it, or ``None``.
RewriteResponse = Callable[
    [int, str, str | None, ConnectionMeta], Returns[tuple[int | None, str | None] | None]
]
