"""Clients that spread out, hold on or guess, against a ``kumo-listener serve``
process over real sockets: starving the policy threads with calls of sessions
that are gone, talking before the greeting behind PROXY or XCLIENT, walking
around per-client limits across an IPv6 network, guessing passwords over many
connections (docs/operations/hostile-input.md)."""

from __future__ import annotations

import re
import smtplib
import socket
import struct
import time
from pathlib import Path

import pytest
from support import RawClient, Served, client_context

ROOT = Path(__file__).resolve().parent.parent
HOSTNAME = "mx.test.example"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

POLICY = """
import time
import kumo_listener as kumo

@kumo.on("init")
def init():
    kumo.start_esmtp_listener(listen="127.0.0.1:0", hostname={hostname!r}, **{params!r})
"""


def serve_policy(serve, tmp_path: Path, params: dict, handlers: str = "") -> Served:
    """``kumo-listener serve`` with a listener of `params` and the `handlers` given."""
    policy = tmp_path / "policy.py"
    policy.write_text(POLICY.format(hostname=HOSTNAME, params=params) + handlers)
    return serve("--policy", str(policy), "--sink", "discard")


def reset(sock: socket.socket) -> None:
    """Close with a TCP reset, as a client that gives up at once does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# --- starving the policy threads ------------------------------------------------------

SLOW_EHLO = """
CALLS = {calls!r}

@kumo.on("smtp_server_ehlo")
def ehlo(domain, conn_meta, extensions):
    # Stands for a DNS lookup against the client's own slow name server.
    if domain.endswith(".slow.example"):
        with open(CALLS, "a") as calls:
            calls.write(domain + "\\n")
        time.sleep(2)
    return None
"""


def test_sessions_that_reset_cannot_starve_the_handler_threads(serve, tmp_path):
    calls = tmp_path / "calls"
    calls.touch()
    served = serve_policy(serve, tmp_path, {}, SLOW_EHLO.format(calls=str(calls)))

    # 200 connections from one address, each EHLO with a slow name, reset at
    # once: 3 ms later, so that the server has surely read the EHLO (a reset
    # that comes first discards it unread).
    started = time.monotonic()
    greeted = 0
    for number in range(200):
        attacker = RawClient(served.address, source="127.0.0.30")
        code, _ = attacker.reply()
        if code == 220:
            greeted += 1
            attacker.send(f"EHLO x{number}.slow.example\r\n".encode())
            time.sleep(0.003)
        reset(attacker.sock)
    attack_took = time.monotonic() - started
    assert greeted >= 150, greeted

    # A legitimate client from another address is answered at once.
    legitimate = RawClient(served.address, source="127.0.0.31")
    assert legitimate.reply()[0] == 220
    asked = time.monotonic()
    assert legitimate.command("EHLO mail.legitimate.example")[0] == 250
    waited = time.monotonic() - asked
    assert waited < 0.5, f"a legitimate EHLO waited {waited:.2f}s"
    assert legitimate.command("QUIT")[0] == 221

    # The calls already running end; those of sessions gone are never run:
    # one fair share of the threads ran calls (two if the attack outlasted the
    # first calls, on a loaded machine), the other calls were dropped.
    time.sleep(2.5 + attack_took)
    ran = calls.read_text().splitlines()
    fair_share = 40 // 4
    most = fair_share if attack_took < 1.8 else 2 * fair_share
    assert 1 <= len(ran) <= most, (len(ran), attack_took)
    time.sleep(2.5)
    assert len(calls.read_text().splitlines()) == len(ran), "a dropped call ran later"
    assert served.stop() == 0
    log = served.errors()
    returned = re.findall(r"smtp_server_ehlo handler for 127\.0\.0\.30:\d+ returned after", log)
    assert len(returned) == len(ran), log[-2000:]


# --- talking before the greeting behind PROXY, or after XCLIENT ----------------------

SLOW_GREETING = """
import asyncio

@kumo.on("smtp_server_connection_accepted")
async def accepted(conn_meta):
    # The greeting comes 0.2 s late, so whatever the client says at once is there first.
    await asyncio.sleep(0.2)
"""

PROXY_V1 = b"PROXY TCP4 192.0.2.7 127.0.0.2 40000 25\r\n"


def assert_lost_synchronization(client: RawClient) -> None:
    assert client.reply() == (554, [f"5.5.0 {HOSTNAME} Error: SMTP protocol synchronization"])
    assert client.until_closed() == b""


def test_talking_before_the_greeting_behind_proxy(serve, tmp_path):
    params = {"peer": {"127.0.0.1": {"require_proxy_protocol": True}}}
    served = serve_policy(serve, tmp_path, params, SLOW_GREETING)
    early = RawClient(served.address)
    early.send(PROXY_V1 + b"EHLO early.example\r\n")
    assert_lost_synchronization(early)
    # What counts is what follows the header: a header alone, then EHLO after the 220.
    patient = RawClient(served.address)
    patient.send(PROXY_V1)
    assert patient.reply()[0] == 220
    assert patient.command("EHLO patient.example")[0] == 250


def test_talking_before_the_greeting_after_xclient(serve, tmp_path):
    params = {"peer": {"127.0.0.1": {"allow_xclient": True}}}
    served = serve_policy(serve, tmp_path, params, SLOW_GREETING)
    proxy = RawClient(served.address)
    proxy.hello("proxy.example")
    proxy.send(b"XCLIENT ADDR=192.0.2.7\r\nEHLO early.example\r\n")
    assert_lost_synchronization(proxy)
    patient = RawClient(served.address)
    patient.hello("proxy.example")
    assert patient.command("XCLIENT ADDR=192.0.2.7")[0] == 220
    assert patient.command("EHLO patient.example")[0] == 250


# --- per-client limits across an IPv6 network ----------------------------------------


def proxy_v2_tcp6(source: str, destination: str, source_port: int, destination_port: int) -> bytes:
    addresses = struct.pack(
        "!16s16sHH",
        socket.inet_pton(socket.AF_INET6, source),
        socket.inet_pton(socket.AF_INET6, destination),
        source_port,
        destination_port,
    )
    # Version 2, PROXY; TCP over IPv6.
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x21, len(addresses)) + addresses


def open_proxied(address, source: str) -> RawClient:
    client = RawClient(address)
    client.send(proxy_v2_tcp6(source, "2001:db8:ffff::25", 40000, 25))
    return client


@pytest.mark.parametrize("prefix_length", [None, 128], ids=["default-84", "per-address"])
def test_per_client_limits_count_an_ipv6_network(serve, tmp_path, prefix_length):
    params: dict = {
        "max_connections_per_client": 50,
        "peer": {"127.0.0.1": {"require_proxy_protocol": True}},
    }
    if prefix_length is not None:
        params["client_ipv6_prefix_length"] = prefix_length
    served = serve_policy(serve, tmp_path, params)
    clients = [open_proxied(served.address, f"2001:db8:1:2::{n:x}") for n in range(1, 121)]
    codes = [client.reply() for client in clients]
    greeted = [code for code, _ in codes if code == 220]
    refused = [(code, text[0]) for code, text in codes if code != 220]
    if prefix_length is None:
        # 2001:db8:1:2::/84 is one client: 50 sessions, then 421.
        assert len(greeted) == 50, codes
        assert set(refused) == {(421, f"4.7.0 {HOSTNAME} too many connections from your address")}
        other_network = open_proxied(served.address, "2001:db8:1:2:0:1000::1")
        assert other_network.reply()[0] == 220, "the next /84 is another client"
    else:
        assert len(greeted) == 120, refused
    for client in clients:
        client.close()


def test_the_connection_rate_counts_an_ipv6_network(serve, tmp_path):
    params = {
        "max_connection_rate_per_client": "10/minute",
        "peer": {"127.0.0.1": {"require_proxy_protocol": True}},
    }
    served = serve_policy(serve, tmp_path, params)
    for n in range(1, 11):
        client = open_proxied(served.address, f"2001:db8:1:2::{n:x}")
        assert client.reply()[0] == 220
        assert client.command("QUIT")[0] == 221
    late = open_proxied(served.address, "2001:db8:1:2:0:fff:ffff:ffff")
    code, text = late.reply()
    assert code == 421 and "too many connections" in text[0], text


# --- guessing passwords over many connections ----------------------------------------

AUTH = """
@kumo.on("smtp_server_auth_plain")
def auth(authz, authc, password, conn_meta):
    return authc == "alice" and password == "secret"
"""


def auth_plain(address, source: str, password: str) -> tuple[int, bytes]:
    """One TLS connection from `source`, one AUTH PLAIN as alice: the reply."""
    with smtplib.SMTP(*address, timeout=10, source_address=(source, 0)) as client:
        client.starttls(context=client_context())
        client.ehlo()
        client.user, client.password = "alice", password
        try:
            code, text = client.auth("PLAIN", client.auth_plain)
        except smtplib.SMTPAuthenticationError as refused:
            code, text = refused.smtp_code, refused.smtp_error
        if code != 421:
            client.quit()
        return code, text


def documented_failregex() -> re.Pattern[str]:
    """The fail2ban filter in docs/operations/limits.md, <ADDR> as a named group."""
    page = (ROOT / "docs" / "operations" / "limits.md").read_text()
    found = re.search(r"^failregex = (.+)$", page, re.MULTILINE)
    assert found, "no failregex in limits.md"
    return re.compile(re.escape(found.group(1)).replace("<ADDR>", r"(?P<addr>[0-9A-Fa-f:.]+)"))


def test_failed_auth_is_limited_per_client_across_connections(serve, tmp_path):
    served = serve_policy(serve, tmp_path, {}, AUTH)  # max_auth_failures_per_client: 10/minute
    for _ in range(10):
        assert auth_plain(served.address, "127.0.0.40", "guess")[0] == 535
    code, text = auth_plain(served.address, "127.0.0.40", "guess")
    refusal = f"4.7.0 {HOSTNAME} too many failed authentications from your address, try again later"
    assert (code, text) == (421, refusal.encode())
    # Refused before the credentials are looked at: the right password too.
    assert auth_plain(served.address, "127.0.0.40", "secret")[0] == 421
    # Another address still authenticates.
    assert auth_plain(served.address, "127.0.0.41", "secret")[0] == 235

    assert served.stop() == 0
    log = served.errors()
    lines = [line for line in log.splitlines() if "auth-limit:" in line]
    assert len(lines) == 2, log[-3000:]
    assert all(" WARNING kumo_listener: auth-limit: client=127.0.0.40 " in line for line in lines)
    failregex = documented_failregex()
    assert [failregex.search(line).group("addr") for line in lines] == ["127.0.0.40"] * 2  # type: ignore[union-attr]


def test_relay_hosts_are_not_held_to_the_auth_failure_limit(serve, tmp_path):
    served = serve_policy(serve, tmp_path, {"max_auth_failures_per_client": "2/hour"}, AUTH)
    # 127.0.0.1 is in relay_hosts (the default).
    assert [auth_plain(served.address, "127.0.0.1", "guess")[0] for _ in range(4)] == [535] * 4
    assert [auth_plain(served.address, "127.0.0.42", "guess")[0] for _ in range(3)] == [
        535,
        535,
        421,
    ]
