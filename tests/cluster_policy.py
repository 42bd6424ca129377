"""Policy of each listener host of tests/test_cluster.py, configured by the
environment (CLUSTER_*). Requires the PROXY header from HAProxy's address,
takes its identity from the `via` block of the service address, and serves
overrides kept in Redis: a hash ``kumo_listener:overrides:ADDRESS`` per
service address, read by an ``async def`` dynamic hook through
``redis.asyncio``, memoized, and invalidated by any message on the channel
``kumo_listener:overrides`` (so every host sees a change within about a
second; the TTL is only a backstop). This override pattern lives here on
purpose: a helper of the package may replace it."""

from __future__ import annotations

import asyncio
import logging
import os

import kumo_listener as kumo
import redis.asyncio as aioredis

REDIS_URL = os.environ["CLUSTER_REDIS"]
SERVICE = os.environ["CLUSTER_SERVICE"]
PROXY = os.environ["CLUSTER_PROXY"]
CHANNEL = "kumo_listener:overrides"

logger = logging.getLogger("kumo_listener")
redis_client: aioredis.Redis | None = None
background: set[asyncio.Task[None]] = set()


async def fetch_overrides(address: str) -> dict[str, str]:
    assert redis_client is not None
    return await redis_client.hgetall(f"kumo_listener:overrides:{address}")


overrides = kumo.memoize(
    fetch_overrides,
    name="overrides",
    ttl="60 seconds",
    capacity=64,
    stale_on_error=True,
    populate_timeout="300ms",
)


async def watch_overrides() -> None:
    """Expire the cached overrides at each message on the channel, and on
    each (re)subscription (messages may have been missed meanwhile)."""
    while True:
        watcher = aioredis.from_url(REDIS_URL, socket_connect_timeout=1)
        try:
            async with watcher.pubsub() as pubsub:
                await pubsub.subscribe(CHANNEL)
                overrides.invalidate_all()
                while True:
                    found = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if found is not None:
                        overrides.invalidate_all()
        except Exception as error:  # any trouble: subscribe again
            logger.warning("overrides: %s: subscribing again", error)
            await asyncio.sleep(0.5)
        finally:
            await watcher.aclose()


@kumo.on("init")
async def init() -> None:
    global redis_client
    redis_client = aioredis.from_url(
        REDIS_URL, decode_responses=True, socket_timeout=0.5, socket_connect_timeout=0.5
    )
    task = asyncio.get_running_loop().create_task(watch_overrides())
    background.add(task)
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
    address = str(conn_meta.get_meta("received_via")).rsplit(":", 1)[0]
    found = await overrides(address)
    return {"banner": found["banner"]} if found.get("banner") else None


@kumo.on("get_listener_domain")
def domain(domain, listener, conn_meta):
    return {"relay_to": True}
