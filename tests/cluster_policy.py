"""Policy of each listener host of tests/test_cluster.py, configured by the
environment (CLUSTER_*). Requires the PROXY header from HAProxy's address,
takes its identity from the `via` block of the service address, and serves
overrides kept in Redis with the package's helper
(``kumo_listener.redis_overrides``): a hash per service address, read by an
``async def`` dynamic hook, memoized, and invalidated by a message on the
helper's channel, so every host sees a change within about a second."""

from __future__ import annotations

import os

import kumo_listener as kumo
from kumo_listener.redis_overrides import RedisOverrides

REDIS_URL = os.environ["CLUSTER_REDIS"]
SERVICE = os.environ["CLUSTER_SERVICE"]
PROXY = os.environ["CLUSTER_PROXY"]

overrides: RedisOverrides | None = None


@kumo.on("init")
async def init() -> None:
    global overrides
    overrides = RedisOverrides(REDIS_URL)  # on the server's loop, where the hook runs
    kumo.start_esmtp_listener(
        listen=os.environ["CLUSTER_LISTEN"],
        hostname=os.environ["CLUSTER_HOSTNAME"],
        client_timeout=os.environ["CLUSTER_CLIENT_TIMEOUT"],
        max_connections_per_client=int(os.environ["CLUSTER_LIMIT"]),
        relay_hosts=[],
        peer={PROXY: {"require_proxy_protocol": True}},
        via={SERVICE: {"hostname": "mx.cluster.test"}},
    )


@kumo.on("smtp_server_get_dynamic_parameters")
async def dynamic(listener, conn_meta):
    assert overrides is not None
    return await overrides.get(str(conn_meta.get_meta("received_via")).rsplit(":", 1)[0])


@kumo.on("get_listener_domain")
def domain(domain, listener, conn_meta):
    return {"relay_to": True}
