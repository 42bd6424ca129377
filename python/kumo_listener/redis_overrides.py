"""Listener overrides kept in Redis, for an ``async def``
``smtp_server_get_dynamic_parameters`` hook, that change on every host within
a second of being published (docs/policy/redis-overrides.md)::

    overrides = RedisOverrides("redis://redis.example.net:6379/0")

    @kumo.on("smtp_server_get_dynamic_parameters")
    async def dynamic(listener, conn_meta):
        return await overrides.get(listener)

Each name (a listener, a ``via`` address, anything the hook chooses) is one
Redis hash, ``key_prefix + name``: a field per parameter, its value JSON (so
nested tables such as ``meta`` work). Reads are memoized per name; a
message on ``channel`` (the name, or ``*`` for all) invalidates them in
every process subscribed. Needs the ``redis`` package: the ``redis`` extra.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._core import ListenerParams, ParamsError, duration_seconds
from .memoize import memoize

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub

logger = logging.getLogger("kumo_listener")

DEFAULT_KEY_PREFIX = "kumo_listener:overrides:"
DEFAULT_CHANNEL = "kumo_listener:overrides"
# A message naming this invalidates every name.
EVERY_NAME = "*"
# The subscriber pings Redis when it has heard nothing for this long, and
# reconnects when a ping goes unanswered for as long again (a cut link).
HEARTBEAT_SECONDS = 5.0
RECONNECT_SECONDS = 0.5

_EMPTY = ListenerParams()


def _redis_asyncio() -> Any:
    try:
        import redis.asyncio
    except ImportError as error:
        raise ImportError(
            "kumo_listener.redis_overrides needs the redis package:"
            " pip install 'kumo_listener[redis]'"
        ) from error
    return redis.asyncio


def _json_field(name: str, field: bytes | str, raw: bytes | str) -> Any:
    try:
        return json.loads(raw)
    except ValueError as error:
        key = field.decode() if isinstance(field, bytes) else field
        raise ValueError(f"overrides {name!r}: field {key!r} is not JSON: {error}") from None


def _decode(name: str, fields: Mapping[bytes | str, bytes | str]) -> ListenerParams:
    """The hash's fields as validated overrides; ``ValueError`` says which
    field is not JSON, ``ParamsError`` which parameter is invalid."""
    params = {
        (field.decode() if isinstance(field, bytes) else field): _json_field(name, field, raw)
        for field, raw in fields.items()
    }
    return ListenerParams(params)


class RedisOverrides:
    """Overrides read from Redis hashes, memoized per name, invalidated by
    pub/sub messages on ``channel`` and after every (re)subscription, and
    expired after ``ttl`` anyway (a backstop for a message that never came).

    ``timeout`` bounds each read. When Redis does not answer, or a hash holds
    something invalid, :meth:`get` serves the last good overrides of that name,
    else none (``ListenerParams()``: the listener's own parameters), and
    logs one WARNING per outage; it never fails the connection.

    Use one instance per event loop (per :class:`~kumo_listener.Server`): its
    Redis connections belong to the loop of the first :meth:`get`.
    """

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        channel: str = DEFAULT_CHANNEL,
        ttl: float | str = "60s",
        timeout: float | str = "100ms",
        capacity: int = 1024,
    ) -> None:
        self._redis_module = _redis_asyncio()
        self.url = url
        self.key_prefix = key_prefix
        self.channel = channel
        self._timeout = duration_seconds(timeout)
        self._last_good: dict[str, ListenerParams] = {}
        self._capacity = capacity
        self._client: Redis | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscriber: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._healthy = True
        self.reads = 0
        self._cached = memoize(
            self._read, name=f"redis_overrides {url}", ttl=ttl, capacity=capacity
        )

    async def get(self, name: str) -> ListenerParams:
        """The overrides of ``name`` (empty when its hash does not exist)."""
        self._start()
        result: ListenerParams = await self._cached(name)
        return result

    def invalidate(self, name: str | None = None) -> None:
        """Expire the memoized overrides of ``name``, or of every name."""
        if name is None or name == EVERY_NAME:
            self._cached.invalidate_all()  # type: ignore[attr-defined]
        else:
            self._cached.invalidate(name)  # type: ignore[attr-defined]

    async def wait_subscribed(self, timeout: float | None = None) -> None:
        """Return once the subscriber listens on ``channel`` (starting it)."""
        self._start()
        await asyncio.wait_for(self._subscribed.wait(), timeout)

    async def load(self, name: str) -> dict[str, Any]:
        """The overrides of ``name`` as stored, read now (not memoized, not
        validated); ``ValueError`` for a field that is not JSON."""
        fields = await self._connection().hgetall(self.key_prefix + name)
        return {
            (key.decode() if isinstance(key, bytes) else key): _json_field(name, key, raw)
            for key, raw in fields.items()
        }

    async def set(self, name: str, params: Mapping[str, Any], *, replace: bool = False) -> None:
        """Validate ``params`` and store them as the overrides of ``name``
        (merged into its hash, or replacing it), then publish the change."""
        ListenerParams(dict(params))
        client = self._connection()
        async with client.pipeline(transaction=True) as pipe:
            if replace:
                pipe.delete(self.key_prefix + name)
            if params:
                fields = {key: json.dumps(value) for key, value in params.items()}
                pipe.hset(self.key_prefix + name, mapping=fields)  # type: ignore[arg-type]
            pipe.publish(self.channel, name)
            await pipe.execute()

    async def delete(self, name: str, *fields: str) -> None:
        """Remove ``fields`` of the overrides of ``name`` (all of them when
        none are given), then publish the change."""
        client = self._connection()
        async with client.pipeline(transaction=True) as pipe:
            if fields:
                pipe.hdel(self.key_prefix + name, *fields)
            else:
                pipe.delete(self.key_prefix + name)
            pipe.publish(self.channel, name)
            await pipe.execute()

    async def aclose(self) -> None:
        """Stop the subscriber and close the connections."""
        if self._subscriber is not None:
            self._subscriber.cancel()
            await asyncio.gather(self._subscriber, return_exceptions=True)
            self._subscriber = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _connection(self) -> Redis:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError(
                "a RedisOverrides is used from one event loop only; make one per loop"
            )
        if self._client is None:
            self._client = self._redis_module.Redis.from_url(
                self.url, socket_timeout=self._timeout, socket_connect_timeout=self._timeout
            )
        return self._client

    def _start(self) -> None:
        client = self._connection()
        if self._subscriber is None or self._subscriber.done():
            self._subscriber = asyncio.ensure_future(self._subscribe_forever(client))

    async def _read(self, name: str) -> ListenerParams:
        self.reads += 1
        try:
            fields = await asyncio.wait_for(
                self._connection().hgetall(self.key_prefix + name),
                self._timeout,
            )
            params = _decode(name, fields)
        except (ValueError, ParamsError) as error:
            logger.warning("redis overrides: keeping the last good overrides: %s", error)
            return self._last_good.get(name, _EMPTY)
        except Exception as error:
            self._down(error)
            return self._last_good.get(name, _EMPTY)
        self._up()
        self._remember(name, params)
        return params

    def _remember(self, name: str, params: ListenerParams) -> None:
        self._last_good.pop(name, None)
        self._last_good[name] = params
        if len(self._last_good) > self._capacity:
            del self._last_good[next(iter(self._last_good))]

    def _down(self, error: BaseException) -> None:
        if self._healthy:
            self._healthy = False
            logger.warning(
                "redis overrides: %s unavailable (%s): serving the last good overrides"
                " (none where there were none) until it answers",
                self.url,
                str(error) or type(error).__name__,
            )

    def _up(self) -> None:
        if not self._healthy:
            self._healthy = True
            logger.warning("redis overrides: %s answers again", self.url)

    async def _subscribe_forever(self, client: Redis) -> None:
        while True:
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                await self._listen(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self._down(error)
            finally:
                self._subscribed.clear()
                await pubsub.aclose()
            await asyncio.sleep(RECONNECT_SECONDS)

    async def _listen(self, pubsub: PubSub) -> None:
        """Handle messages until the connection fails or goes silent."""
        heard = time.monotonic()
        pinged = False
        while True:
            message = await pubsub.get_message(timeout=1.0)
            now = time.monotonic()
            if message is not None:
                heard, pinged = now, False
                self._handle(message)
            elif now - heard > HEARTBEAT_SECONDS and not pinged:
                await pubsub.ping()
                pinged = True
            elif now - heard > 2 * HEARTBEAT_SECONDS:
                raise TimeoutError(f"no answer to a ping within {HEARTBEAT_SECONDS}s")

    def _handle(self, message: Mapping[str, Any]) -> None:
        if message["type"] == "subscribe":
            # Whatever was published while not subscribed is lost: start afresh.
            self.invalidate()
            self._subscribed.set()
            self._up()
        elif message["type"] == "message":
            data = message["data"]
            self.invalidate(data.decode() if isinstance(data, bytes) else str(data))
