"""The PROXY protocol end to end, behind a real HAProxy (v1 ``send-proxy`` and v2
``send-proxy-v2``): the listener judges, greets and records the real client."""

from __future__ import annotations

import logging
import re
import smtplib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import (
    delivered,
    free_port,
    logged,
    require_tool,
    wait_until,
    without_envelope,
)

CLIENT = "127.0.0.9"
# HAProxy's frontend listens on an address of its own, so that the `via` block
# of the address the client connected to is told apart from the socket's.
FRONTEND = "127.0.0.3"

PROXIES = {"v1": "send-proxy", "v2": "send-proxy-v2"}


class HAProxy:
    """``haproxy -db`` in the foreground with our own configuration file."""

    def __init__(self, directory: Path, backend: tuple[str, int], send_proxy: str) -> None:
        haproxy = require_tool("haproxy")
        self.address = (FRONTEND, free_port(FRONTEND))
        config = directory / f"haproxy-{send_proxy}.cfg"
        config.write_text(
            "global\n"
            "    maxconn 100\n"
            "defaults\n"
            "    mode tcp\n"
            "    timeout connect 5s\n"
            "    timeout client 5s\n"
            "    timeout server 5s\n"
            "frontend smtp\n"
            f"    bind {self.address[0]}:{self.address[1]}\n"
            "    default_backend kumo\n"
            "backend kumo\n"
            f"    server kumo {backend[0]}:{backend[1]} {send_proxy}\n"
        )
        self.log = directory / f"haproxy-{send_proxy}.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [haproxy, "-f", str(config), "-db"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self._wait_listening()

    def _wait_listening(self) -> None:
        """Until the frontend's port is bound. Probing it with connect() would
        itself be a proxied connection, so try to bind it instead."""

        def bound() -> bool:
            exited = self.process.poll()
            assert exited is None, f"haproxy exited {exited}: {self.log.read_text()}"
            with socket.socket() as probe:
                try:
                    probe.bind(self.address)
                except OSError:
                    return True
            return False

        wait_until(
            bound, within=10, what=lambda: f"haproxy on {self.address}: {self.log.read_text()}"
        )

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator:
    started: list[HAProxy] = []

    def start(backend: tuple[str, int], send_proxy: str) -> HAProxy:
        started.append(HAProxy(tmp_path, backend, send_proxy))
        return started[-1]

    yield start
    for proxy in started:
        proxy.stop()


def proxied_listener(listen) -> tuple[str, int]:
    """The PROXY protocol required of HAProxy's address (loopback) only, and
    parameters that only apply if the real addresses are the ones evaluated."""
    return listen(
        listen="127.0.0.1:0",
        hostname="mx.socket-peer.example",
        relay_hosts=[CLIENT],  # not HAProxy's 127.0.0.1: relaying is judged on the real client
        peer={
            "127.0.0.1": {"require_proxy_protocol": True, "client_timeout": 1},
            CLIENT: {"hostname": "real-client.example"},
        },
        via={FRONTEND: {"meta": {"vmta": "frontend-three"}}},
    )


def record_events(policy) -> dict[str, list[dict]]:
    """Every connection-level and MAIL event's view of the addresses."""
    names = ("received_from", "received_via", "orig_received_from", "orig_received_via", "vmta")
    seen: dict[str, list[dict]] = {"dynamic": [], "accepted": [], "mail": []}

    def snapshot(meta) -> dict:
        return {name: meta.get_meta(name) for name in names}

    def dynamic(listener, meta):
        seen["dynamic"].append(snapshot(meta))
        if str(meta.get_meta("received_from")).startswith(f"{CLIENT}:"):
            return {"banner": "dynamic hook saw the real client"}
        return None

    policy.on("smtp_server_get_dynamic_parameters", dynamic)
    policy.on("smtp_server_connection_accepted", lambda m: seen["accepted"].append(snapshot(m)))
    policy.on("smtp_server_mail_from", lambda sender, m: seen["mail"].append(snapshot(m)))
    return seen


@pytest.mark.parametrize("version", sorted(PROXIES))
def test_a_message_through_haproxy_is_judged_and_recorded_as_the_real_clients(
    policy, listen, haproxy, maildir, version
):
    seen = record_events(policy)
    kumo_address = proxied_listener(listen)
    proxy = haproxy(kumo_address, PROXIES[version])

    client = smtplib.SMTP(timeout=10, source_address=(CLIENT, 0))
    try:
        code, greeting = client.connect(*proxy.address)
        assert (code, greeting) == (
            220,
            b"real-client.example ESMTP dynamic hook saw the real client",
        )
        client_port = client.sock.getsockname()[1]
        message = f"Subject: through haproxy {version}\r\n\r\nproxied body\r\n".encode()
        assert client.sendmail("a@b.example", ["c@d.example"], message) == {}
        client.quit()
    finally:
        client.close()

    real = {
        "received_from": f"{CLIENT}:{client_port}",
        "received_via": f"{proxy.address[0]}:{proxy.address[1]}",
        "orig_received_via": f"{kumo_address[0]}:{kumo_address[1]}",
        "vmta": "frontend-three",
    }
    # One connection: the hook asked once, about the real client, never about HAProxy.
    assert len(seen["dynamic"]) == 1
    for event in ("dynamic", "accepted", "mail"):
        [view] = seen[event]
        orig_from = view.pop("orig_received_from")
        assert orig_from.startswith("127.0.0.1:") and orig_from != f"127.0.0.1:{client_port}"
        if event == "dynamic":
            # The hook runs before the parameters' `meta` is merged in.
            assert view.pop("vmta") is None
            assert view == {k: v for k, v in real.items() if k != "vmta"}
        else:
            assert view == real, event

    [stored] = delivered(maildir)
    assert stored.endswith(message)
    received = without_envelope(stored)[: -len(message)].decode()
    assert received.startswith("Received: from ")
    assert f"([{CLIENT}])" in received
    assert "by real-client.example (kumo_listener)" in received


@pytest.mark.parametrize("version", sorted(PROXIES))
def test_several_messages_on_one_proxied_connection(policy, listen, haproxy, maildir, version):
    proxy = haproxy(proxied_listener(listen), PROXIES[version])
    with smtplib.SMTP(*proxy.address, timeout=10, source_address=(CLIENT, 0)) as client:
        for number in range(3):
            body = f"Subject: {version} {number}\r\n\r\nbody {number}\r\n".encode()
            assert client.sendmail("a@b.example", ["c@d.example"], body) == {}
    assert len(delivered(maildir)) == 3


def test_a_direct_client_without_a_proxy_header_gets_no_banner_and_is_closed(
    kumo_log, policy, listen, raw
):
    # kumo_log first: the logger's level is set before the server starts.
    seen = record_events(policy)
    address = proxied_listener(listen)
    client = raw(address)
    started = time.monotonic()
    client.send(b"EHLO x\r\n")
    assert client.until_closed() == b""
    assert time.monotonic() - started < 0.9, "closed at once, not at client_timeout"
    # No policy ran for a connection whose real client is unknown.
    assert seen == {"dynamic": [], "accepted": [], "mail": []}
    logged(kumo_log, "closed, bad PROXY protocol header: not a PROXY protocol", within=5)


def test_a_silent_direct_client_gets_no_banner_and_is_closed_at_client_timeout(listen, raw):
    client = raw(proxied_listener(listen))
    started = time.monotonic()
    assert client.until_closed() == b""
    assert 0.8 < time.monotonic() - started < 5


def test_the_proxy_protocol_is_required_only_of_the_proxys_address(listen, raw):
    address = proxied_listener(listen)
    client = raw(address, source=CLIENT)
    assert client.reply() == (220, ["real-client.example ESMTP kumo_listener"])
    assert client.command("EHLO x")[0] == 250


def test_the_bad_header_is_logged_when_info_is_enabled_after_the_server_started(
    policy, listen, raw, caplog
):
    address = proxied_listener(listen)
    caplog.set_level(logging.INFO, logger="kumo_listener")
    client = raw(address)
    client.send(b"EHLO x\r\n")
    assert client.until_closed() == b""
    logged(caplog, "closed, bad PROXY protocol header", within=3)


def test_per_client_limits_count_the_real_client_not_the_proxy(listen, haproxy, raw):
    address = listen(
        listen="127.0.0.1:0",
        hostname="mx.limits.example",
        relay_hosts=[],
        max_connections_per_client=1,
        peer={"127.0.0.1": {"require_proxy_protocol": True}},
    )
    proxy = haproxy(address, PROXIES["v2"])
    first = raw(proxy.address, source="127.0.0.10")
    assert first.reply()[0] == 220
    second = raw(proxy.address, source="127.0.0.10")
    assert second.reply() == (
        421,
        ["4.7.0 mx.limits.example too many connections from your address"],
    )
    # Every connection comes from HAProxy's address, which is not counted.
    assert raw(proxy.address, source="127.0.0.11").reply()[0] == 220


SLOW_GREETING_POLICY = """
import asyncio
import kumo_listener as kumo

@kumo.on("init")
def init():
    kumo.start_esmtp_listener(
        listen="127.0.0.1:0",
        hostname="mx.pregreet.example",
        peer={"127.0.0.1": {"require_proxy_protocol": True}},
    )

@kumo.on("smtp_server_connection_accepted")
async def accepted(conn_meta):
    # The greeting comes 0.2 s late: what the client says at once is surely there first.
    await asyncio.sleep(0.2)
"""


@pytest.mark.parametrize("version", sorted(PROXIES))
def test_a_client_that_talks_first_is_caught_behind_haproxy(serve, haproxy, tmp_path, version):
    policy = tmp_path / "policy.py"
    policy.write_text(SLOW_GREETING_POLICY)
    served = serve("--policy", str(policy), "--sink", "discard")
    proxy = haproxy(served.address, PROXIES[version])

    # A bot that talks as soon as it connects: HAProxy forwards its EHLO after the header.
    bot = socket.create_connection(proxy.address, timeout=10, source_address=(CLIENT, 0))
    bot_port = bot.getsockname()[1]
    bot.sendall(b"EHLO bot.example\r\n")
    received = b""
    while chunk := bot.recv(4096):
        received += chunk
    bot.close()
    assert received == b"554 5.5.0 mx.pregreet.example Error: SMTP protocol synchronization\r\n"

    # A client that waits for the greeting is served.
    with smtplib.SMTP(*proxy.address, timeout=10, source_address=(CLIENT, 0)) as client:
        assert client.ehlo()[0] == 250
    assert served.stop() == 0
    # Logged as the real client's.
    found = re.search(rf"reject: .*{re.escape(CLIENT)}:{bot_port}\b.*554 5\.5\.0", served.errors())
    assert found, served.errors()
