"""kumo_listener: an ESMTP listener configured like KumoMTA's, with a Rust
core and policy written in Python.

The public API mirrors KumoMTA's Lua API (``kumo.on``,
``kumo.start_esmtp_listener``, ``kumo.reject``, connection metadata)::

    import kumo_listener as kumo

    @kumo.on("init")
    def init():
        kumo.start_esmtp_listener(listen="0.0.0.0:25", hostname="mx.example.net")
"""

from . import serde, types
from ._core import (
    ConnectionMeta,
    EnvelopeAddress,
    ListenerParams,
    Message,
    ParamsError,
    validate_overrides,
)
from .authentication import check_authentication, check_authentication_async
from .memoize import invalidate_all as invalidate_memoized
from .memoize import memoize
from .policy import EVENTS, Policy, default_policy, on
from .reject import Reject
from .server import (
    Listener,
    Server,
    configure,
    configure_dns,
    default_server,
    serve,
    start_esmtp_listener,
)
from .threads import inline

__all__ = [
    "EVENTS",
    "ConnectionMeta",
    "EnvelopeAddress",
    "Listener",
    "ListenerParams",
    "Message",
    "ParamsError",
    "Policy",
    "Reject",
    "Server",
    "check_authentication",
    "check_authentication_async",
    "configure",
    "configure_dns",
    "default_policy",
    "default_server",
    "inline",
    "invalidate_memoized",
    "memoize",
    "on",
    "serde",
    "serve",
    "start_esmtp_listener",
    "types",
    "validate_overrides",
]
