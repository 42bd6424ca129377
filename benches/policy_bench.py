"""Policy of the end-to-end benchmark (``python3 -m benches.e2e``).

Run as ``python3 -m kumo_listener serve --policy benches/policy_bench.py``. Settings
come from the environment:

- ``KUMO_BENCH_PORT``: the port to listen on, on every local address (required);
- ``KUMO_BENCH_MAX_CONNECTIONS``: ``max_connections`` (default 32768);
- ``KUMO_BENCH_COUNT_FILE``: where to write the number of messages received, on
  SIGUSR1 and at exit (default: not written);
- ``KUMO_BENCH_TLS_DIR``: a directory holding ``HOSTNAME.crt`` and ``HOSTNAME.key``
  for each hostname below (default: self-signed certificates);
- ``KUMO_BENCH_FORWARD_TO``: an upstream URL (``smtp://HOST:PORT``) for the
  listener's ``forward_to`` (default: none, the server's sink). The message
  counter then counts messages handed on (``smtp_server_message_received``
  runs before the upstream is given the data: the upstream's own count is
  what says they arrived).
- ``KUMO_BENCH_HOOKS``: how the hooks are written: ``inline`` (default:
  memoized and ``@kumo.inline``, the fast path), ``def`` (the same as plain
  ``def`` functions, as a user writes them first) or ``seed`` (plain ``def``,
  the dynamic hook returning ``kumo.serde.toml_load(path)`` per connection,
  exactly as the seed's documentation shows it).
- ``KUMO_BENCH_CLIENT_LIMITS``: when set (to anything), the per-client limits
  apply to loopback too (``max_connections_per_client``,
  ``max_connection_rate_per_client``, ``max_message_rate_per_client``, high
  enough never to refuse): ``relay_hosts`` is then empty, since its clients
  are exempt, and ``get_listener_domain`` lets every recipient be relayed.
- ``KUMO_BENCH_AUTHENTICATION``: ``annotate`` or ``enforce`` for every method
  of the ``authentication`` parameter (default: off); the resolver is given
  with ``--dns-server``.

The dynamic hook gives each of two local addresses, 127.0.0.1 and 127.0.0.2, its
own identity (hostname, banner, certificate), like the seed's ``via`` table.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import tempfile
from typing import Any

import kumo_listener as kumo

PORT = int(os.environ["KUMO_BENCH_PORT"])
MAX_CONNECTIONS = int(os.environ.get("KUMO_BENCH_MAX_CONNECTIONS", "32768"))
COUNT_FILE = os.environ.get("KUMO_BENCH_COUNT_FILE")
FORWARD_TO = os.environ.get("KUMO_BENCH_FORWARD_TO")
CLIENT_LIMITS = "KUMO_BENCH_CLIENT_LIMITS" in os.environ
AUTHENTICATION = os.environ.get("KUMO_BENCH_AUTHENTICATION")

TLS_DIR = os.environ.get("KUMO_BENCH_TLS_DIR")
DEFAULT_HOSTNAME = "bench.example"


def identity(hostname: str, **params: Any) -> dict[str, Any]:
    if TLS_DIR is not None:
        params["tls_certificate"] = os.path.join(TLS_DIR, f"{hostname}.crt")
        params["tls_private_key"] = os.path.join(TLS_DIR, f"{hostname}.key")
    return {"hostname": hostname, **params}


VIA_TABLE: dict[str, Any] = {
    "via": {
        "127.0.0.1": identity("mx.example-customer.com"),
        "127.0.0.2": identity("mx.other-customer.com", banner="other customer's MX"),
    }
}

received = 0


def write_count(*_: object) -> None:
    """Write the message counter to ``COUNT_FILE`` (atomically, by rename)."""
    if COUNT_FILE is None:
        return
    partial = f"{COUNT_FILE}.tmp"
    with open(partial, "w", encoding="ascii") as file:
        file.write(f"{received}\n")
    os.replace(partial, COUNT_FILE)


signal.signal(signal.SIGUSR1, write_count)
atexit.register(write_count)


# Counted for every client (none in relay_hosts), never reached by the load.
LIMITS: dict[str, Any] = {
    "relay_hosts": [],
    "max_connections_per_client": 100_000,
    "max_connection_rate_per_client": "1000000/s",
    "max_message_rate_per_client": "1000000/s",
}


@kumo.on("init")
def init() -> None:
    chosen: dict[str, Any] = {"forward_to": [FORWARD_TO]} if FORWARD_TO else {}
    if AUTHENTICATION:
        methods = ("spf", "dkim", "dmarc", "arc", "iprev")
        chosen["authentication"] = dict.fromkeys(methods, AUTHENTICATION)
    kumo.start_esmtp_listener(
        listen=f"0.0.0.0:{PORT}",
        max_connections=MAX_CONNECTIONS,
        **identity(DEFAULT_HOSTNAME),
        **chosen,
        **(LIMITS if CLIENT_LIMITS else {"relay_hosts": ["127.0.0.0/8"]}),
    )


if CLIENT_LIMITS:

    @kumo.on("get_listener_domain")
    @kumo.inline
    def relay_everything(
        domain: str, listener: str, conn_meta: kumo.ConnectionMeta
    ) -> dict[str, bool]:
        return {"relay_to": True}


def load_via_table(listener: str) -> kumo.ListenerParams:
    """Stands for reading an operator-edited file; memoized below, and
    validated once into ListenerParams so each connection costs a pointer copy."""
    return kumo.ListenerParams(VIA_TABLE)


cached_via_table = kumo.memoize(load_via_table, name="via_table", ttl="5 minutes", capacity=16)


def memoized_parameters(listener: str, conn_meta: kumo.ConnectionMeta) -> kumo.ListenerParams:
    return cached_via_table(listener)


def count_message(message: kumo.Message, conn_meta: kumo.ConnectionMeta) -> None:
    global received
    received += 1


def write_via_table_file() -> str:
    """The seed's ``listener_params.toml``: the ``via`` table as an operator writes it."""
    lines = []
    for address, params in VIA_TABLE["via"].items():
        lines.append(f'[via."{address}"]')
        lines += [f"{name} = {json.dumps(value)}" for name, value in params.items()]
    path = os.path.join(tempfile.mkdtemp(prefix="kumo-bench-"), "listener_params.toml")
    with open(path, "w", encoding="utf-8") as file:
        file.write("\n".join(lines) + "\n")
    return path


HOOKS = os.environ.get("KUMO_BENCH_HOOKS", "inline")
if HOOKS == "inline":
    kumo.on("smtp_server_get_dynamic_parameters")(kumo.inline(memoized_parameters))
    kumo.on("smtp_server_message_received")(kumo.inline(count_message))
elif HOOKS == "def":
    kumo.on("smtp_server_get_dynamic_parameters")(memoized_parameters)
    kumo.on("smtp_server_message_received")(count_message)
elif HOOKS == "seed":
    LISTENER_PARAMS = write_via_table_file()

    @kumo.on("smtp_server_get_dynamic_parameters")
    def dynamic(listener: str, conn_meta: kumo.ConnectionMeta) -> dict[str, Any] | None:
        return kumo.serde.toml_load(LISTENER_PARAMS)

    kumo.on("smtp_server_message_received")(count_message)
else:
    raise SystemExit(f"KUMO_BENCH_HOOKS: {HOOKS!r} is not inline, def or seed")
