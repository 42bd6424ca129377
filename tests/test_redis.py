"""Per-client limits shared through a real Redis (``--redis``): two
``kumo-listener serve`` processes count one client together; a killed
process's leases expire; Redis stopped, silent or restarted never stalls
mail (fail open, one WARNING), unless fail-closed is asked for."""

from __future__ import annotations

import re
import signal
import smtplib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import kumo_listener as kumo
import pytest
from kumo_listener.cli import _parser, worker_arguments
from peers import Redis
from support import RawClient, Served, free_port, run_kumo, wait_until

TOO_MANY = (421, ["4.7.0 mx.test.example too many connections from your address"])
OUTAGE = r"WARNING kumo_listener: redis: redis://127\.0\.0\.1:\d+/0 unavailable \(.*\): "


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Redis]:
    server = Redis(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    """Start ``kumo-listener serve`` processes running ``policy`` with these
    listener parameters (and a short client_timeout); each logs to a file."""
    started: list[Served] = []

    def start(*args: str, **params: object) -> Served:
        params.setdefault("listen", "127.0.0.1:0")
        params.setdefault("hostname", "mx.test.example")
        number = len(started)
        policy = tmp_path / f"policy{number}.py"
        policy.write_text(
            "import kumo_listener as kumo\n\n"
            "@kumo.on('init')\n"
            "def init():\n"
            f"    kumo.start_esmtp_listener(**{params!r})\n\n"
            "@kumo.on('get_listener_domain')\n"
            "def domain(domain, listener, conn_meta):\n"
            "    return {'relay_to': True}\n"
        )
        served = Served(
            ["--policy", str(policy), "--sink", "discard", *args],
            tmp_path,
            log=tmp_path / f"serve{number}.log",
        )
        started.append(served)
        return served

    yield start
    for served in started:
        served.process.kill()
        served.process.wait(timeout=10)


def greeted(address: tuple[str, int], source: str, clients: list[RawClient]) -> tuple:
    client = RawClient(address, source, timeout=10)
    clients.append(client)
    return client.reply()


@pytest.fixture
def clients() -> Iterator[list[RawClient]]:
    opened: list[RawClient] = []
    yield opened
    for client in opened:
        client.close()


def test_two_servers_share_one_connection_limit(redis: Redis, serve, clients):
    first = serve("--redis", redis.url, max_connections_per_client=2)
    second = serve("--redis", redis.url, max_connections_per_client=2)
    source = "127.0.0.40"
    assert greeted(first.address, source, clients)[0] == 220
    assert greeted(second.address, source, clients)[0] == 220
    assert greeted(first.address, source, clients) == TOO_MANY
    assert greeted(second.address, source, clients) == TOO_MANY
    assert greeted(second.address, "127.0.0.41", clients)[0] == 220, "another client"
    # One lease per session, under the client's key.
    key = "kumo_listener:{127.0.0.40/32}:leases"
    assert redis.command("ZCARD", key) == "2"
    assert clients[0].command("QUIT")[0] == 221
    clients[0].until_closed()
    wait_until(lambda: redis.command("ZCARD", key) == "1", within=5, what="the lease released")
    assert greeted(second.address, source, clients)[0] == 220


def test_a_killed_servers_leases_expire_within_twice_client_timeout(redis: Redis, serve, clients):
    params = {"max_connections_per_client": 1, "client_timeout": "2s"}
    doomed = serve("--redis", redis.url, **params)
    other = serve("--redis", redis.url, **params)
    source = "127.0.0.42"
    assert greeted(doomed.address, source, clients)[0] == 220
    # Renewed every client_timeout while the session lives (here past a whole lease time).
    for _ in range(5):
        time.sleep(1)
        assert clients[0].command("NOOP")[0] == 250
    assert greeted(other.address, source, clients) == TOO_MANY
    doomed.process.send_signal(signal.SIGKILL)
    doomed.process.wait(timeout=10)
    killed = time.monotonic()

    def admitted() -> bool:
        return greeted(other.address, source, clients)[0] == 220

    wait_until(admitted, within=8, what="the dead server's lease to expire", interval=0.2)
    # The lease's time to live is twice client_timeout (4 s).
    assert time.monotonic() - killed <= 4 + 1.0


def test_the_message_rate_is_shared(redis: Redis, serve, clients):
    first = serve("--redis", redis.url, max_message_rate_per_client="3/hour")
    second = serve("--redis", redis.url, max_message_rate_per_client="3/hour")
    sessions = []
    for served in (first, second):
        client = RawClient(served.address, "127.0.0.43", timeout=10)
        clients.append(client)
        assert client.reply()[0] == 220
        assert client.command("EHLO client.example")[0] == 250
        sessions.append(client)
    for client in (sessions[0], sessions[1], sessions[0]):
        assert client.command("MAIL FROM:<a@b.example>")[0] == 250
        assert client.command("RSET")[0] == 250
    for client in sessions:
        assert client.command("MAIL FROM:<a@b.example>") == (
            452,
            ["4.7.0 too many messages from your address, try again later"],
        )


def send(address: tuple[str, int], source: str = "127.0.0.44") -> None:
    with smtplib.SMTP(*address, timeout=10, source_address=(source, 0)) as client:
        client.sendmail("a@b.example", ["c@d.example"], b"Subject: x\r\n\r\nbody\r\n")


def test_a_redis_outage_leaves_mail_flowing_and_redis_is_used_again(redis: Redis, serve, clients):
    served = serve("--redis", redis.url, max_connections_per_client=1)
    send(served.address)
    redis.stop()
    for _ in range(5):
        send(served.address)
    wait_until(lambda: re.search(OUTAGE, served.errors()), within=5, what=served.errors)
    assert len(re.findall(OUTAGE, served.errors())) == 1, served.errors()
    assert "per-client limits counted per process until it answers" in served.errors()
    # Meanwhile this process's own count holds.
    assert greeted(served.address, "127.0.0.45", clients)[0] == 220
    assert greeted(served.address, "127.0.0.45", clients) == TOO_MANY
    for client in clients:
        client.close()
    redis.start()

    def shared_again() -> bool:
        send(served.address)
        return "answers again: per-client limits shared again" in served.errors()

    wait_until(shared_again, within=15, what="the server to use Redis again", interval=0.3)
    clients.clear()
    assert greeted(served.address, "127.0.0.46", clients)[0] == 220
    assert redis.command("ZCARD", "kumo_listener:{127.0.0.46/32}:leases") == "1"
    assert len(re.findall(OUTAGE, served.errors())) == 1, "one WARNING per outage"


def test_a_redis_that_never_answers_does_not_stall_sessions(tmp_path: Path, serve, clients):
    # Accepts connections (the kernel does, from the backlog), never replies.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        rate = {"max_message_rate_per_client": "9/h"}
        served = serve("--redis", url, "--redis-timeout", "100ms", **rate)
        for number in range(5):
            started = time.monotonic()
            send(served.address, source=f"127.0.0.{50 + number}")
            # Connection check and MAIL's rate check: at most one deadline each.
            assert time.monotonic() - started < 1.0
        wait_until(lambda: re.search(OUTAGE, served.errors()), within=5, what=served.errors)
        assert len(re.findall(OUTAGE, served.errors())) == 1, served.errors()
        assert "no answer within 100ms" in served.errors()


def test_fail_closed_refuses_new_connections(tmp_path: Path, serve, clients):
    url = f"redis://127.0.0.1:{free_port()}/0"
    served = serve("--redis", url, "--redis-fail-closed")
    code, text = greeted(served.address, "127.0.0.60", clients)
    assert code == 421
    assert text == ["4.3.0 mx.test.example temporarily unable to check limits, try again later"]
    closed = "new connections refused (421 4.3.0) until it answers"
    wait_until(lambda: closed in served.errors(), within=5, what="the WARNING")
    # relay_hosts (127.0.0.1 by default) are not counted, so not refused.
    assert greeted(served.address, "127.0.0.1", clients)[0] == 220


def test_the_metrics_show_fallbacks_and_whether_redis_is_up(redis: Redis, tmp_path: Path):
    policy = kumo.Policy()
    policy.on("get_listener_domain", lambda domain, listener, meta: {"relay_to": True})
    with kumo.Server(policy=policy, sink="discard", redis=redis.url) as server:
        address = server.start_esmtp_listener(listen="127.0.0.1:0").address
        assert isinstance(address, tuple)
        send(address)
        metrics = server._core.metrics()
        label = (redis.url,)
        assert metrics["kumo_listener_redis_up"] == [(label, 1)]
        assert metrics["kumo_listener_redis_calls"][0][1] >= 1
        redis.stop()
        send(address)
        metrics = server._core.metrics()
        assert metrics["kumo_listener_redis_up"] == [(label, 0)]
        assert metrics["kumo_listener_redis_fallbacks"][0][1] >= 1


def test_a_bad_redis_url_is_one_line(tmp_path: Path):
    with pytest.raises(ValueError, match="redis"):
        kumo.Server(sink="discard", redis="http://nowhere")
    with pytest.raises(ValueError, match="redis_timeout"):
        kumo.Server(sink="discard", redis="redis://127.0.0.1:1", redis_timeout=0)


def test_the_command_line_checks_its_redis_options(tmp_path: Path):
    result = run_kumo("serve", "--redis", "http://nowhere", "--listen", "127.0.0.1:0", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith('kumo-listener: redis "http://nowhere": ')
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    options = ["--redis", "redis://127.0.0.1:1", "--redis-timeout", "0"]
    result = run_kumo("serve", *options, cwd=tmp_path)
    assert result.returncode == 2 and "--redis-timeout" in result.stderr


def test_workers_get_the_redis_options():
    args = _parser().parse_args(
        ["serve", "--redis", "redis://h:1/2", "--redis-timeout", "50ms", "--redis-fail-closed"]
    )
    worker = worker_arguments(args, 0)
    assert worker[worker.index("--redis") + 1] == "redis://h:1/2"
    assert worker[worker.index("--redis-timeout") + 1] == "0.05"
    assert "--redis-fail-closed" in worker
