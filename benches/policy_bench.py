"""Policy of the end-to-end benchmark (``benches/e2e.py``).

Run as ``python3 -m kumo_listener serve --policy benches/policy_bench.py``. Settings
come from the environment:

- ``KUMO_BENCH_PORT``: the loopback port to listen on (required);
- ``KUMO_BENCH_MAX_CONNECTIONS``: ``max_connections`` (default 32768);
- ``KUMO_BENCH_COUNT_FILE``: where to write the number of messages received, on
  SIGUSR1 and at exit (default: not written).
"""

from __future__ import annotations

import atexit
import os
import signal
from typing import Any

import kumo_listener as kumo

PORT = int(os.environ["KUMO_BENCH_PORT"])
MAX_CONNECTIONS = int(os.environ.get("KUMO_BENCH_MAX_CONNECTIONS", "32768"))
COUNT_FILE = os.environ.get("KUMO_BENCH_COUNT_FILE")

VIA_TABLE: dict[str, Any] = {
    "via": {
        "10.0.0.1": {"hostname": "mx.example-customer.com"},
        "10.0.0.2": {"hostname": "mx.other-customer.com", "banner": "other customer's MX"},
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


@kumo.on("init")
def init() -> None:
    kumo.start_esmtp_listener(
        listen=f"127.0.0.1:{PORT}",
        relay_hosts=["127.0.0.0/8"],
        max_connections=MAX_CONNECTIONS,
        hostname="bench.example",
    )


def load_via_table(listener: str) -> kumo.ListenerParams:
    """Stands for reading an operator-edited file; memoized below, and
    validated once into ListenerParams so each connection costs a pointer copy."""
    return kumo.ListenerParams(VIA_TABLE)


cached_via_table = kumo.memoize(load_via_table, name="via_table", ttl="5 minutes", capacity=16)


@kumo.on("smtp_server_get_dynamic_parameters")
def dynamic_parameters(listener: str, conn_meta: kumo.ConnectionMeta) -> kumo.ListenerParams:
    return cached_via_table(listener)


@kumo.on("smtp_server_message_received")
def message_received(message: kumo.Message, conn_meta: kumo.ConnectionMeta) -> None:
    global received
    received += 1
