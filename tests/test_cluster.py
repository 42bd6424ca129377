"""Many hosts, one service, under faults: three ``kumo-listener serve`` hosts
behind a real HAProxy (PROXY v2, SMTP health checks), sharing per-client
limits and overrides in one real Redis, each in a network namespace of its
own (tests/netns.py), with a client sending thousands of messages from
several addresses while the test kills a host, cuts another off, stops Redis
and changes an override. See docs/operations/deployment.md, "What the
cluster test proves"."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from cluster_client import message
from netns import Lab
from support import Served, require_tool, wait_until, without_envelope

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]

TESTS = Path(__file__).parent
SERVICE = "198.18.0.25"  # HAProxy's frontend: the address clients connect to
PROXY = "198.18.0.2"  # HAProxy's own, that its connections to the hosts come from
REDIS = "198.18.0.30"
HOSTS = {"mx1": "198.18.0.11", "mx2": "198.18.0.12", "mx3": "198.18.0.13"}
SOURCES = ["198.18.0.101", "198.18.0.102", "198.18.0.103", "198.18.0.104"]
PROBE = "198.18.0.105"  # the client's address for probing the banner only
LIMIT = 3  # max_connections_per_client
MESSAGES = 2000  # at least, acknowledged before the client is told to stop
CLIENT_TIMEOUT = 2.0  # seconds: leases live twice that
LEASE = 2 * CLIENT_TIMEOUT
NEW_BANNER = "cluster banner changed in Redis"
OUTAGE = f"redis: redis://{REDIS}:6379/0 unavailable"

# Live leases per client, as Redis counts them (expired ones not yet pruned excluded).
LIVE_LEASES = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local counts = {}
for _, key in ipairs(redis.call('KEYS', 'kumo_listener:*:leases')) do
  table.insert(counts, key)
  table.insert(counts, redis.call('ZCOUNT', key, '(' .. now_ms, '+inf'))
end
return counts
"""


class Cluster:
    """The namespaces and what runs in them."""

    def __init__(self, lab: Lab, workdir: Path) -> None:
        self.lab = lab
        self.workdir = workdir
        self.listeners: dict[str, Served] = {}
        self.redis: subprocess.Popen[bytes] | None = None
        self.haproxy: subprocess.Popen[bytes] | None = None
        self.stats_socket = workdir / "haproxy.sock"
        self.samplers: list[LeaseSampler] = []

    def build(self) -> None:
        self.lab.add_host("lb", [PROXY, SERVICE])
        self.lab.add_host("redis", [REDIS])
        self.lab.add_host("client", [*SOURCES, PROBE])
        for host, address in HOSTS.items():
            self.lab.add_host(host, [address])
        self.start_redis()
        for host in HOSTS:
            self.start_listener(host)
        self.start_haproxy()

    # --- Redis -------------------------------------------------------------------

    def start_redis(self) -> None:
        no_disk = ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        server = require_tool("redis-server")
        self.redis = self.lab.popen(
            "redis",
            [server, "--bind", REDIS, "--port", "6379", "--protected-mode", "no", *no_disk],
            stdout=subprocess.DEVNULL,
        )
        wait_until(lambda: self.in_redis(lambda r: r.ping()), within=10, what="redis to answer")

    def in_redis(self, call: Any) -> Any:
        """`call(client)` with a client in Redis's namespace; None if it fails."""

        def run() -> Any:
            client = redis.Redis(host=REDIS, socket_timeout=1, socket_connect_timeout=1)
            try:
                return call(client)
            except redis.RedisError:
                return None
            finally:
                client.close()

        return self.lab.call_in("redis", run)

    # --- listeners ---------------------------------------------------------------

    def start_listener(self, host: str) -> Served:
        settings = {
            "CLUSTER_REDIS": f"redis://{REDIS}:6379/0",
            "CLUSTER_SERVICE": SERVICE,
            "CLUSTER_PROXY": PROXY,
            "CLUSTER_LISTEN": f"{HOSTS[host]}:25",
            "CLUSTER_HOSTNAME": f"{host}.internal.cluster.test",
            "CLUSTER_CLIENT_TIMEOUT": f"{CLIENT_TIMEOUT}s",
            "CLUSTER_LIMIT": str(LIMIT),
        }
        environment = [f"{name}={value}" for name, value in settings.items()]
        prefix = [self.lab.ip, "netns", "exec", self.lab.namespace(host), "env", *environment]
        args = ["--policy", str(TESTS / "cluster_policy.py"), "--maildir", str(self.maildir(host))]
        args += ["--redis", settings["CLUSTER_REDIS"], "--log-level", "WARNING"]
        log = self.workdir / f"{host}-{len(list(self.workdir.glob(f'{host}-*.log')))}.log"
        served = Served(args, self.workdir, log=log, prefix=prefix)
        self.lab.processes.append(served.process)
        self.listeners[host] = served
        return served

    def maildir(self, host: str) -> Path:
        return self.workdir / f"maildir-{host}"

    # --- HAProxy -----------------------------------------------------------------

    def start_haproxy(self) -> None:
        config = self.workdir / "haproxy.cfg"
        servers = "".join(f"    server {host} {address}:25\n" for host, address in HOSTS.items())
        config.write_text(
            "global\n"
            "    maxconn 2000\n"
            f"    stats socket {self.stats_socket} mode 600 level admin\n"
            "defaults\n"
            "    mode tcp\n"
            "    timeout connect 1s\n"
            "    timeout client 10s\n"
            "    timeout server 10s\n"
            "    retries 2\n"
            "    option redispatch\n"
            "frontend smtp\n"
            f"    bind {SERVICE}:25\n"
            "    default_backend kumo\n"
            "backend kumo\n"
            "    balance leastconn\n"
            f"    source {PROXY}\n"
            "    option smtpchk EHLO haproxy.cluster.test\n"
            "    default-server send-proxy-v2 check-send-proxy check inter 300ms fall 2 rise 2\n"
            f"{servers}"
        )
        with (self.workdir / "haproxy.log").open("w") as log:
            self.haproxy = self.lab.popen(
                "lb",
                [require_tool("haproxy"), "-f", str(config), "-db"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        for host in HOSTS:
            self.wait_status(host, "UP", within=10)

    def status(self) -> dict[str, str]:
        """Each backend server's status in HAProxy (``show stat``)."""
        try:
            with socket.socket(socket.AF_UNIX) as stats:
                stats.settimeout(5)
                stats.connect(str(self.stats_socket))
                stats.sendall(b"show stat\n")
                text = b""
                while chunk := stats.recv(65536):
                    text += chunk
        except OSError:
            return {}
        lines = text.decode().splitlines()
        if not lines:
            return {}
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {row["svname"]: row["status"] for row in rows if row.get("pxname") == "kumo"}

    def wait_status(self, host: str, wanted: str, within: float) -> float:
        """Seconds until HAProxy shows `host` with status `wanted` (UP, DOWN)."""
        started = time.monotonic()
        wait_until(
            lambda: self.status().get(host, "").startswith(wanted),
            within=within,
            what=lambda: f"HAProxy to show {host} {wanted}: {self.status()}",
            interval=0.05,
        )
        return time.monotonic() - started

    # --- the banner ----------------------------------------------------------------

    def banner_of(self, host: str) -> str:
        """The greeting `host` gives a client of the service address, asked
        directly from HAProxy's namespace with a PROXY header of our own."""

        def greet() -> str:
            with socket.create_connection(
                (HOSTS[host], 25), timeout=5, source_address=(PROXY, 0)
            ) as probe:
                probe.sendall(f"PROXY TCP4 {PROBE} {SERVICE} 40000 25\r\n".encode())
                greeting = probe.makefile("rb").readline().decode()
                probe.sendall(b"QUIT\r\n")
                return greeting

        try:
            return self.lab.call_in("lb", greet)
        except OSError as error:
            return repr(error)

    def banner_through_haproxy(self) -> str:
        def greet() -> str:
            with socket.create_connection(
                (SERVICE, 25), timeout=5, source_address=(PROBE, 0)
            ) as probe:
                greeting = probe.makefile("rb").readline().decode()
                probe.sendall(b"QUIT\r\n")
                return greeting

        return self.lab.call_in("client", greet)


class LeaseSampler:
    """Samples Redis's live lease counts per client, every 50 ms, from
    Redis's namespace, until stopped: (when, {key: count}) per answer."""

    def __init__(self, lab: Lab) -> None:
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.stopped = threading.Event()
        self.thread = lab.thread_in("redis", self.run)

    def run(self) -> None:
        client = redis.Redis(host=REDIS, socket_timeout=0.3, socket_connect_timeout=0.3)
        while not self.stopped.wait(0.05):
            try:
                flat = client.eval(LIVE_LEASES, 0)
            except redis.RedisError:
                continue
            counts = {flat[i].decode(): int(flat[i + 1]) for i in range(0, len(flat), 2)}
            self.samples.append((time.monotonic(), counts))
        client.close()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with Lab() as lab:
        built = Cluster(lab, tmp_path)
        try:
            built.build()
            yield built
        finally:
            for sampler in built.samplers:
                sampler.stop()


class Timeline:
    """When each fault began and ended (monotonic seconds)."""

    def __init__(self) -> None:
        self.windows: dict[str, tuple[float, float]] = {}

    def mark(self, name: str, start: float, end: float) -> None:
        self.windows[name] = (start, end)

    def within(self, when: float, name: str, after: float) -> bool:
        start, end = self.windows[name]
        return start <= when <= end + after


def test_a_cluster_keeps_every_acknowledged_message_and_its_limits_under_faults(
    cluster: Cluster, tmp_path: Path
):
    run = f"r{os.getpid()}"
    client, progress = start_client(cluster, tmp_path, run)
    sampler = LeaseSampler(cluster.lab)
    cluster.samplers.append(sampler)
    timeline = Timeline()
    wait_acknowledged(progress, 100)
    taken_out = kill_and_restart(cluster, "mx1", timeline)
    cut_out = cut_off(cluster, "mx2", timeline)
    during_outage = stop_redis(cluster, progress, timeline)
    delays = change_banner(cluster)
    through_haproxy = [cluster.banner_through_haproxy() for _ in range(6)]
    wait_acknowledged(progress, MESSAGES)
    (tmp_path / "stop").touch()
    assert client.wait(timeout=60) == 0
    sampler.stop()
    for served in cluster.listeners.values():
        assert served.stop() == 0, served.errors()

    result = json.loads((tmp_path / "result.json").read_text())
    report = check_messages(cluster, result, run)
    report.update(taken_out=round(taken_out, 2), cut_out=round(cut_out, 2), banner_delays=delays)
    report.update(during_outage=during_outage, lease_samples=len(sampler.samples))
    print(f"cluster test: {report}")
    assert during_outage > 0, "no message accepted while Redis was stopped"
    for host, served in cluster.listeners.items():
        assert OUTAGE in served.errors(), f"{host} did not see Redis stop"
    assert all(NEW_BANNER in greeting for greeting in through_haproxy), through_haproxy
    check_limit(sampler.samples, result, timeline)


def acknowledged(progress: Path) -> int:
    return int(progress.read_text())


def wait_acknowledged(progress: Path, count: int) -> None:
    wait_until(
        lambda: acknowledged(progress) >= count,
        within=60,
        what=lambda: f"{count} messages acknowledged (now {acknowledged(progress)})",
        interval=0.1,
    )


def kill_and_restart(cluster: Cluster, host: str, timeline: Timeline) -> float:
    """SIGKILL `host` under load, and start it again once HAProxy has taken
    it out: the seconds HAProxy took."""
    killed = time.monotonic()
    cluster.listeners[host].process.send_signal(signal.SIGKILL)
    cluster.listeners[host].process.wait(timeout=10)
    taken_out = cluster.wait_status(host, "DOWN", within=10)
    cluster.start_listener(host)
    cluster.wait_status(host, "UP", within=10)
    timeline.mark("kill", killed, time.monotonic())
    return taken_out


def cut_off(cluster: Cluster, host: str, timeline: Timeline) -> float:
    """`host`'s link down for longer than a lease, then up again: the seconds
    HAProxy took to take it out."""
    cut = time.monotonic()
    cluster.lab.set_link(host, up=False)
    taken_out = cluster.wait_status(host, "DOWN", within=10)
    time.sleep(max(0.0, LEASE + 2 - (time.monotonic() - cut)))
    cluster.lab.set_link(host, up=True)
    cluster.wait_status(host, "UP", within=10)
    timeline.mark("cut", cut, time.monotonic())
    return taken_out


def stop_redis(cluster: Cluster, progress: Path, timeline: Timeline) -> int:
    """Redis stopped (SIGSTOP: it answers nothing) for a lease time: the
    messages acknowledged meanwhile."""
    assert cluster.redis is not None
    before = acknowledged(progress)
    stopped = time.monotonic()
    cluster.redis.send_signal(signal.SIGSTOP)
    time.sleep(LEASE)
    during = acknowledged(progress) - before
    cluster.redis.send_signal(signal.SIGCONT)
    timeline.mark("redis", stopped, time.monotonic())
    return during


def start_client(cluster: Cluster, workdir: Path, run: str) -> tuple[subprocess.Popen[bytes], Path]:
    progress = workdir / "progress"
    progress.write_text("0")
    config = {
        "service": SERVICE,
        "port": 25,
        "sources": SOURCES,
        "threads_per_source": 5,
        "timeout": 5,
        # Between messages of a session: the sessions last, and a few thousand
        # messages are sent in all.
        "pause": 0.05,
        "run": run,
        "stop_file": str(workdir / "stop"),
        "progress_file": str(progress),
        "result_file": str(workdir / "result.json"),
    }
    (workdir / "client.json").write_text(json.dumps(config))
    script = [sys.executable, str(TESTS / "cluster_client.py"), str(workdir / "client.json")]
    return cluster.lab.popen("client", script), progress


def change_banner(cluster: Cluster) -> dict[str, float]:
    """Set the service address's banner in Redis and announce it: seconds
    until each host serves it."""
    key = f"kumo_listener:overrides:{SERVICE}"
    for host in HOSTS:  # each has the old one cached
        assert NEW_BANNER not in cluster.banner_of(host)
    changed = time.monotonic()
    cluster.in_redis(lambda r: r.hset(key, "banner", json.dumps(NEW_BANNER)))  # JSON values
    cluster.in_redis(lambda r: r.publish("kumo_listener:overrides", SERVICE))
    delays = {}
    for host in HOSTS:

        def served_new(host: str = host) -> str | None:
            greeting = cluster.banner_of(host)
            return greeting if NEW_BANNER in greeting else None

        greeting = wait_until(
            served_new,
            within=3,
            what=lambda host=host: f"{host} to serve the new banner: {cluster.banner_of(host)}",
            interval=0.05,
        )
        assert greeting.startswith("220 mx.cluster.test ESMTP "), greeting
        delays[host] = round(time.monotonic() - changed, 2)
    # The documented bound (docs/policy/redis-overrides.md): about a second.
    assert max(delays.values()) <= 1.0, delays
    return delays


RECEIVED_FROM = re.compile(rb"\AReceived: from [^\r\n]*\(\[(?P<client>[\d.]+)\]\)")


def stored_messages(cluster: Cluster, run: str) -> dict[int, list[tuple[str, str]]]:
    """Each message number in the Maildirs: (host, client address in its
    Received header) per copy; each copy checked whole."""
    copies: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for host in HOSTS:
        for path in (cluster.maildir(host) / "new").iterdir():
            stored = without_envelope(path.read_bytes())
            found = re.search(rb"Message-ID: <(\d+)\." + run.encode() + rb"@", stored)
            assert found, f"{path}: no Message-ID of this run"
            number = int(found.group(1))
            assert stored.endswith(message(number, run)), f"{path}: not the message sent"
            received = RECEIVED_FROM.match(stored)
            assert received, f"{path}: {stored[:300]!r}"
            copies[number].append((host, received.group("client").decode()))
    return copies


def check_messages(cluster: Cluster, result: dict[str, Any], run: str) -> dict[str, Any]:
    """Every acknowledged message stored, whole, once (or more only after a
    failure past DATA); nothing stored that was not sent; the real client's
    address in each copy."""
    copies = stored_messages(cluster, run)
    acknowledged = {a["number"] for a in result["attempts"] if a["code"] == 250}
    unsure: Counter[int] = Counter(
        a["number"] for a in result["attempts"] if a["after_data"] and a["code"] != 250
    )
    sources: dict[int, set[str]] = defaultdict(set)
    for attempt in result["attempts"]:
        sources[attempt["number"]].add(attempt["source"])
    lost = sorted(acknowledged - copies.keys())
    assert not lost, f"acknowledged but stored nowhere: {lost[:20]}"
    for number, found in copies.items():
        allowed = (number in acknowledged) + unsure[number]
        assert len(found) <= allowed, f"message {number}: {len(found)} copies, {allowed} allowed"
        for host, client in found:
            assert client in sources[number], f"message {number} on {host}: from {client}"
    assert len(acknowledged) >= MESSAGES, f"only {len(acknowledged)} messages acknowledged"
    per_host = Counter(host for found in copies.values() for host, _ in found)
    return {
        "acknowledged": len(acknowledged),
        "attempts": len(result["attempts"]),
        "unsure_after_data": sum(unsure.values()),
        "duplicates": sum(len(found) - 1 for found in copies.values()),
        "stored_per_host": dict(per_host),
        "refusals": len(result["refusals"]),
        "sessions": len(result["sessions"]),
    }


def check_limit(
    samples: list[tuple[float, dict[str, int]]], result: dict[str, Any], timeline: Timeline
) -> None:
    """The per-client limit held cluster-wide: in Redis's live leases, and in
    the sessions the client had open at once (each source more threads than
    the limit, so it was pressed), except in the documented windows: fail open
    while Redis was stopped (and sessions admitted then, without leases, for
    a lease time after), and a cut-off host's sessions until the client gave up
    on them."""
    shared = [
        (when, max(counts.values(), default=0))
        for when, counts in samples
        if not timeline.within(when, "redis", LEASE)
    ]
    assert len(shared) > 20, f"too few samples of the leases: {len(shared)}"
    over = [(when, most) for when, most in shared if most > LIMIT]
    assert not over, f"more leases than the limit outside the Redis outage: {over[:5]}"
    assert max(most for _, most in shared) == LIMIT, "the limit never reached"
    refused = [r for r in result["refusals"] if "too many connections" in r["text"]]
    assert refused, "no client was ever refused: the limit was not pressed"
    for source in SOURCES:
        for when, count in open_sessions(result["sessions"], source):
            if count > LIMIT:
                excused = timeline.within(when, "redis", LEASE) or timeline.within(when, "cut", 0)
                assert excused, f"{source}: {count} sessions at once at {when}: {timeline.windows}"


def open_sessions(sessions: list[list[Any]], source: str) -> list[tuple[float, int]]:
    """How many sessions `source` had open (greeted, not yet closed) after each change."""
    changes = []
    for session_source, opened, closed in sessions:
        if session_source == source:
            changes += [(opened, 1), (closed, -1)]
    count, counts = 0, []
    for when, change in sorted(changes, key=lambda c: (c[0], c[1])):
        count += change
        counts.append((when, count))
    return counts
