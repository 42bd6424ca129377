"""``kumo_listener.redis_overrides`` with a real Redis: servers whose
``async def`` dynamic hook reads overrides through a ``RedisOverrides`` see
a change published on its channel (and not before), keep the last good
overrides while Redis is down, subscribe again when it is back, and read
Redis once for many connections after an invalidation."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Coroutine, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar

import kumo_listener as kumo
import pytest
from kumo_listener.redis_overrides import DEFAULT_CHANNEL, DEFAULT_KEY_PREFIX, RedisOverrides
from peers import Redis
from support import RawClient, free_port, in_threads, logged, require_tool, run_kumo, wait_until

NAME = "127.0.0.1:0"  # the listener's `listen`, the hook's key
KEY = DEFAULT_KEY_PREFIX + NAME
BASE = "mx.base.example"
# A day: only an invalidation, never the TTL, makes a change visible here.
LONG_TTL = "1 day"
T = TypeVar("T")


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Redis]:
    server = Redis(tmp_path, options=["--enable-debug-command", "local"])
    yield server
    server.stop()


class Host:
    """A ``kumo.Server`` (its own loop and thread) whose dynamic hook returns
    ``await overrides.get(listener)`` from its own ``RedisOverrides``."""

    def __init__(self, url: str, subscribed: bool = True, **options: object) -> None:
        self.overrides = RedisOverrides(url, **options)  # type: ignore[arg-type]
        policy = kumo.Policy()

        async def dynamic(listener: str, conn_meta: kumo.ConnectionMeta) -> kumo.ListenerParams:
            return await self.overrides.get(listener)

        policy.on("smtp_server_get_dynamic_parameters", dynamic)
        self.server = kumo.Server(policy=policy, sink="discard")
        self.server.start()
        listener = self.server.start_esmtp_listener(listen=NAME, hostname=BASE)
        assert isinstance(listener.address, tuple)
        self.address = listener.address
        if subscribed:
            # Subscribing invalidates everything: done before the test reads.
            self.run(self.overrides.wait_subscribed(10))

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run on the server's loop (where the overrides' connections live)."""
        assert self.server._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self.server._loop).result(15)

    def hostname(self) -> str:
        """The hostname in a new connection's greeting."""
        client = RawClient(self.address, timeout=10)
        try:
            code, texts = client.reply()
            assert code == 220, texts
            return texts[0].split()[0]
        finally:
            client.close()

    def stop(self) -> None:
        self.run(self.overrides.aclose())
        self.server.stop(10)


@pytest.fixture
def hosts() -> Iterator[Callable[..., Host]]:
    with ExitStack() as stack:

        def start(url: str, **options: object) -> Host:
            host = Host(url, **options)
            stack.callback(host.stop)
            return host

        yield start


def publish(redis: Redis, **params: str) -> None:
    """Set fields (JSON values) of the listener's hash, then say so on the channel."""
    for field, value in params.items():
        redis.command("HSET", KEY, field, value)
    redis.command("PUBLISH", DEFAULT_CHANNEL, NAME)


def serves(host: Host, hostname: str, within: float = 10) -> None:
    wait_until(lambda: host.hostname() == hostname, within, f"{hostname} from {host.address}")


def hgetall_calls(redis: Redis) -> int:
    found = re.search(r"cmdstat_hgetall:calls=(\d+)", redis.command("INFO", "commandstats"))
    return int(found.group(1)) if found else 0


def test_a_published_change_reaches_every_server(redis: Redis, hosts):
    redis.command("HSET", KEY, "hostname", '"mx.first.example"')
    first, second = hosts(redis.url, ttl=LONG_TTL), hosts(redis.url, ttl=LONG_TTL)
    assert first.hostname() == second.hostname() == "mx.first.example"
    # Changed but not published: the memoized overrides stay.
    redis.command("HSET", KEY, "hostname", '"mx.unpublished.example"')
    assert first.hostname() == second.hostname() == "mx.first.example"
    publish(redis, hostname='"mx.second.example"')
    serves(first, "mx.second.example")
    serves(second, "mx.second.example")
    # A field removed and published: the listener's own hostname again.
    redis.command("HDEL", KEY, "hostname")
    redis.command("PUBLISH", DEFAULT_CHANNEL, "*")
    serves(first, BASE)
    serves(second, BASE)


def test_nested_values_and_the_publish_helper(redis: Redis, hosts):
    seen: list[object] = []
    host = hosts(redis.url, ttl=LONG_TTL)
    host.server.policy.on("smtp_server_connection_accepted", lambda meta: seen.append(meta))
    operator = RedisOverrides(redis.url)

    async def change() -> None:
        await operator.set(NAME, {"hostname": "mx.set.example", "meta": {"tier": "gold"}})
        await operator.aclose()

    asyncio.run(change())
    assert redis.command("HGET", KEY, "meta") == '{"tier": "gold"}'
    serves(host, "mx.set.example")
    with pytest.raises(kumo.ParamsError, match="hostname"):
        asyncio.run(operator.set(NAME, {"hostname": 7}))


def test_the_command_line_sets_shows_and_deletes(redis: Redis, hosts, tmp_path: Path):
    host = hosts(redis.url, ttl=LONG_TTL)
    command = ("overrides", "--redis", redis.url)
    assignments = [
        "hostname=mx.cli.example",
        'meta={"tier": "gold"}',
        "max_recipients_per_message=5",
    ]
    result = run_kumo(*command, "set", NAME, *assignments, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    serves(host, "mx.cli.example")
    shown = run_kumo(*command, "show", NAME, cwd=tmp_path)
    expected = {
        "hostname": "mx.cli.example",
        "meta": {"tier": "gold"},
        "max_recipients_per_message": 5,
    }
    assert json.loads(shown.stdout) == expected
    refused = run_kumo(*command, "set", NAME, "hostname=7", cwd=tmp_path)
    assert refused.returncode == 1
    assert refused.stderr.startswith(f"kumo-listener: overrides set {NAME}: hostname: ")
    assert run_kumo(*command, "delete", NAME, "hostname", cwd=tmp_path).returncode == 0
    serves(host, BASE)
    assert json.loads(run_kumo(*command, "show", NAME, cwd=tmp_path).stdout) == {
        "meta": {"tier": "gold"},
        "max_recipients_per_message": 5,
    }


def test_a_redis_outage_keeps_the_last_good_overrides(redis: Redis, hosts, caplog):
    redis.command("HSET", KEY, "hostname", '"mx.good.example"')
    host = hosts(redis.url, ttl=LONG_TTL)
    assert host.hostname() == "mx.good.example"
    redis.stop()
    logged(caplog, r"WARNING.*redis overrides: redis://\S+ unavailable")
    # Expired while Redis is down: the read fails, the last good value stays.
    host.overrides.invalidate()
    reads = host.overrides.reads
    assert [host.hostname() for _ in range(5)] == ["mx.good.example"] * 5
    assert host.overrides.reads == reads + 1, "one failed read, then the kept value"
    assert len(re.findall("unavailable", caplog.text)) == 1, "one WARNING per outage"
    redis.start()
    logged(caplog, "answers again")
    # A fresh Redis (no persistence): the change made after it is back is seen.
    publish(redis, hostname='"mx.after.example"')
    serves(host, "mx.after.example")


def test_without_redis_at_start_the_listeners_own_parameters(tmp_path: Path, hosts, caplog):
    redis = Redis(tmp_path, start=False)
    host = hosts(redis.url, subscribed=False, ttl=LONG_TTL)
    try:
        assert host.hostname() == BASE
        logged(caplog, r"WARNING.*redis overrides: redis://\S+ unavailable")
        redis.start()
        redis.command("HSET", KEY, "hostname", '"mx.late.example"')
        # No message needed: subscribing (again) invalidates everything.
        serves(host, "mx.late.example")
    finally:
        redis.stop()


def test_invalid_overrides_keep_the_last_good_ones(redis: Redis, hosts, caplog):
    publish(redis, hostname='"mx.valid.example"')
    host = hosts(redis.url, ttl=LONG_TTL)
    assert host.hostname() == "mx.valid.example"
    for bad, complaint in (("not json", "field 'hostname' is not JSON"), ("7", "hostname")):
        publish(redis, hostname=bad)
        # Read again on the next connection (after the message), and refused.
        wait_until(
            lambda complaint=complaint: (
                host.hostname() == "mx.valid.example"
                and re.search(f"keeping the last good overrides: .*{complaint}", caplog.text)
            ),
            within=10,
            what=lambda: caplog.text,
        )
        caplog.clear()


def test_many_connections_after_an_invalidation_read_redis_once(redis: Redis, hosts):
    redis.command("HSET", KEY, "hostname", '"mx.herd.example"')
    host = hosts(redis.url, ttl=LONG_TTL, timeout="5s")
    assert host.hostname() == "mx.herd.example"
    redis.command("CONFIG", "RESETSTAT")
    # Redis busy for two seconds: the one read waits, the connections don't.
    sleeper = subprocess.Popen(
        [require_tool("redis-cli", "redis-tools"), "-p", str(redis.port), "DEBUG", "SLEEP", "2"],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: sleeping(redis), within=5, what="Redis to sleep")
        host.overrides.invalidate()
        names = in_threads(40, host.hostname)
    finally:
        sleeper.wait(10)
    assert names == ["mx.herd.example"] * 40
    wait_until(lambda: hgetall_calls(redis) >= 1, within=5, what="the read to reach Redis")
    assert hgetall_calls(redis) == 1


def sleeping(redis: Redis) -> bool:
    """Whether Redis is in its DEBUG SLEEP: a PING goes unanswered."""
    with socket.create_connection(("127.0.0.1", redis.port), timeout=5) as probe:
        probe.sendall(b"PING\r\n")
        probe.settimeout(0.2)
        try:
            probe.recv(16)
        except TimeoutError:
            return True
        return False


def test_without_the_redis_package_the_error_names_the_extra():
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "from kumo_listener.redis_overrides import RedisOverrides\n"
        f"RedisOverrides('redis://127.0.0.1:{free_port()}/0')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=os.environ
    )
    assert result.returncode == 1
    assert "pip install 'kumo_listener[redis]'" in result.stderr
