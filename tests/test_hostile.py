"""Hostile clients over real sockets: smuggling, pipelining abuse, oversized input,
garbage, slow clients, connection limits, policy faults, PROXY protocol, XCLIENT."""

from __future__ import annotations

import asyncio
import random
import re
import socket
import struct
import threading
import time
from pathlib import Path

import kumo_listener as kumo
import pytest
from support import RawClient, RssWatch, delivered, wait_until, without_envelope

HOSTNAME = "mx.test.example"
MIB = 1024 * 1024
REPLY_LINE = re.compile(rb"^\d{3}[ -]")
SMUGGLED = b"MAIL FROM:<x@y.example>\r\nRCPT TO:<z@w.example>\r\nDATA\r\n"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


# --- helpers -------------------------------------------------------------------------


def stored(maildir: Path) -> list[bytes]:
    if not (maildir / "new").is_dir():
        return []
    return [without_envelope(message) for message in delivered(maildir)]


def raw_reply_lines(client: RawClient) -> list[bytes]:
    """One whole reply read with a plain recv loop, every line unchecked (without CRLF)."""
    lines = []
    while True:
        while b"\r\n" not in client.buffer:
            chunk = client.sock.recv(4096)
            assert chunk, f"closed; unread: {client.buffer!r}"
            client.buffer += chunk
        line, client.buffer = client.buffer.split(b"\r\n", 1)
        lines.append(line)
        if len(line) < 4 or line[3:4] != b"-":
            return lines


def assert_well_formed(lines: list[bytes]) -> None:
    for line in lines:
        assert REPLY_LINE.match(line), line
        assert not any(byte in line for byte in b"\r\n\x00"), line


def new_connection_is_greeted(raw, address: tuple[str, int]) -> None:
    client = raw(address)
    assert client.reply()[0] == 220
    client.close()


def run_in_thread(target) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            target()
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=guarded, daemon=True)
    thread.start()
    return thread, errors


@pytest.fixture
def address(listen):
    return listen()


@pytest.fixture
def slow_greeting(policy, listen):
    """A listener whose greeting comes 0.2 s after the connection is accepted, so
    whatever the client sends at once is surely there before the banner."""

    @policy.on("smtp_server_connection_accepted")
    async def accepted(meta):
        await asyncio.sleep(0.2)

    return listen()


# --- 1. SMTP smuggling ---------------------------------------------------------------

ENDINGS = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r.\r",
    b"\r.\n",
    b"\n.\r",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r\n\x00.\r\n",
]
SMUGGLING_CASES = [
    pytest.param(ending, mode, id=f"{mode}-{ending!r}")
    for ending in ENDINGS
    for mode in ("Deny", "Allow", "Fix")
]


def unstuffed(body: bytes) -> bytes:
    """RFC 5321 §4.5.2, as Postfix applies it: lines end in CRLF only, and a
    line starting with a period loses that period."""
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in body.split(b"\r\n"))


@pytest.mark.parametrize(("ending", "mode"), SMUGGLING_CASES)
def test_smuggled_end_of_data_does_not_end_data(listen, raw, maildir, ending, mode):
    client = raw(listen(invalid_line_endings=mode, trace_headers={"received_header": False}))
    client.open_data()
    payload = b"Subject: smuggling\r\n\r\nbody line" + ending + SMUGGLED + b"more text\r\n.\r\n"
    client.send(payload)
    code, lines = client.reply()
    # Exactly one reply for the whole DATA: nothing queued for the smuggled commands.
    assert client.command("NOOP") == (250, ["2.0.0 OK"])
    assert not client.readable(0.1)
    messages = stored(maildir)
    if mode == "Deny" and ending != b"\r\n\x00.\r\n":
        assert (code, lines[0][:5]) == (550, "5.6.0")
        assert messages == []
        return
    assert code == 250, lines
    [message] = messages
    if mode == "Fix":
        assert re.search(rb"\r(?!\n)|(?<!\r)\n", message) is None, message
        assert message.startswith(b"Subject: smuggling\r\n\r\nbody line\r\n")
        assert SMUGGLED in message and message.endswith(b"more text\r\n")
    else:
        # Allow keeps bare CR and LF as sent; only the transparency rule applies.
        assert message == unstuffed(payload[: -len(b".\r\n")])


# --- 2. bare LF does not end a command ----------------------------------------------


def test_a_command_ending_in_a_bare_lf_is_not_a_line(address, raw):
    client = raw(address)
    client.hello()
    client.send(b"NOOP\n")
    assert not client.readable(0.3)
    client.send(b"\r\n")
    assert client.reply()[0] == 500
    assert client.command("NOOP")[0] == 250


# --- 3. unauthorised pipelining -------------------------------------------------------


def assert_lost_synchronization(client: RawClient) -> None:
    code, lines = client.reply()
    assert (code, lines[0][:5]) == (554, "5.5.0"), lines
    assert client.closed()


def test_talking_before_the_greeting(slow_greeting, raw):
    client = raw(slow_greeting)
    client.send(b"EHLO x\r\n")
    assert_lost_synchronization(client)


def test_body_sent_before_the_354(address, raw, maildir):
    client = raw(address)
    client.hello()
    client.send(
        b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"
        b"Subject: x\r\n\r\nbody\r\n.\r\n"
    )
    assert client.reply()[0] == 250
    assert client.reply()[0] == 250
    assert_lost_synchronization(client)
    assert stored(maildir) == []


def test_command_pipelined_after_ehlo(address, raw):
    client = raw(address)
    assert client.reply()[0] == 220
    client.send(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\n")
    assert_lost_synchronization(client)


# A legal pipelined group (MAIL, RCPT..., DATA): test_protocol.py,
# test_pipelined_transaction_in_one_write.


def test_rset_may_be_pipelined_before_noop(address, raw):
    client = raw(address)
    client.hello()
    client.send(b"RSET\r\nNOOP\r\n")
    assert client.reply() == (250, ["2.0.0 OK"])
    assert client.reply() == (250, ["2.0.0 OK"])
    assert client.command("NOOP")[0] == 250


# --- 4. command lines past the limit --------------------------------------------------


@pytest.mark.parametrize("length", [998, 999, 1000, 10_000])
def test_command_line_lengths(address, raw, length):
    client = raw(address)
    client.hello()
    code, lines = client.command(b"NOOP " + b"x" * (length - 5) + b"\r\n")
    if length <= 998:
        assert code == 250
    else:
        assert (code, lines[0][:5]) == (500, "5.2.3")
    assert client.command("NOOP") == (250, ["2.0.0 OK"])


def test_a_100_mb_command_line_is_discarded_in_bounded_memory(address, raw):
    client = raw(address)
    client.hello()
    chunk = b"x" * MIB

    def send() -> None:
        client.send(b"NOOP ")
        for _ in range(100):
            client.send(chunk)
        client.send(b"\r\n")

    rss = RssWatch()
    sender, errors = run_in_thread(send)
    give_up = time.monotonic() + 20
    while sender.is_alive() and time.monotonic() < give_up:
        rss.sample()
        time.sleep(0.005)
    assert not sender.is_alive() and not errors, errors
    code, lines = client.reply()
    assert (code, lines[0][:5]) == (500, "5.2.3")
    assert client.command("NOOP")[0] == 250
    assert rss.growth_mib() < 64


# --- 5. body over max_message_size ------------------------------------------------------


def test_a_1_mb_body_over_the_size_limit(listen, raw, maildir):
    client = raw(listen(max_message_size=10_000))
    client.open_data()
    client.send((b"y" * 98 + b"\r\n") * 10_000)
    assert not client.readable(0.2)
    client.send(b".\r\n")
    code, lines = client.reply()
    assert (code, lines[0][:5]) == (552, "5.3.4")
    assert client.command("NOOP") == (250, ["2.0.0 OK"])
    assert not client.readable(0.1)
    assert stored(maildir) == []


# --- 6. 100,000 pipelined recipients ----------------------------------------------------


def test_100k_pipelined_recipients(listen, raw):
    address = listen(max_recipients_per_message=1000)
    client = raw(address)
    client.hello()
    assert client.command("MAIL FROM:<a@b.example>")[0] == 250
    total = 100_000

    def send() -> None:
        for start in range(0, total, 2000):
            client.send(
                b"".join(b"RCPT TO:<r%d@d.example>\r\n" % i for i in range(start, start + 2000))
            )

    rss = RssWatch()
    sender, errors = run_in_thread(send)
    codes: list[bytes] = []
    buffer = b""
    while len(codes) < total:
        chunk = client.sock.recv(1 << 16)
        if not chunk:
            break
        *lines, buffer = (buffer + chunk).split(b"\r\n")
        codes += [line[:9] for line in lines]
        rss.sample()
        if codes and codes[-1].startswith(b"421"):
            break
    sender.join(10)
    assert not sender.is_alive()
    assert codes[:1000] == [b"250 2.1.5"] * 1000
    if codes[-1].startswith(b"421"):
        assert set(codes[1000:-1]) <= {b"452 4.5.3"}
        assert client.closed()
    else:
        assert not errors, errors
        assert codes[1000:] == [b"452 4.5.3"] * (total - 1000)
        assert client.command("RSET") == (250, ["2.0.0 OK"])
    assert rss.growth_mib() < 64
    new_connection_is_greeted(raw, address)


# --- 7. garbage -------------------------------------------------------------------------


# Invalid UTF-8 and control characters in commands: test_protocol.py,
# test_invalid_utf8_and_control_characters_are_answered.


def test_http_request_gets_postfix_reply_and_is_closed(address, raw):
    client = raw(address)
    assert client.reply()[0] == 220
    client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert client.reply() == (221, ["2.7.0 Error: I can break rules, too. Goodbye."])
    assert client.closed()
    new_connection_is_greeted(raw, address)


def test_tls_client_hello_on_the_plain_port(slow_greeting, raw):
    client = raw(slow_greeting)
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + random.Random(7).randbytes(500)
    client.send(hello)
    assert_lost_synchronization(client)
    new_connection_is_greeted(raw, slow_greeting)


# --- 8. every reply line is well formed -------------------------------------------------


def test_every_reply_line_is_well_formed(address, raw):
    rng = random.Random(1234)
    printable = bytes(range(0x20, 0x7F))
    nasty = [
        b"\x00",
        b"\xff\xfe",
        b"MAIL FROM:<a\rb@c>",
        b"RCPT TO:<\n>",
        b"EHLO \x1b[31m",
        b"VRFY \r",
        bytes(rng.choice(printable) for _ in range(990)),
        b"HELO x",
        b"\r",
        b"\n",
        b"",
        b"NOOP \xc3\x28",
        b"EHLO x\x7f",
        b"MAIL FROM:<a@b.example>\x00",
        b"MAIL FROM:<a@b.example>",
        b"RCPT TO:<c@d.example> \x0b",
        b"DATA\x00",
        b"VRFY \xe2\x80\xa8x",
        b"RSET",
        b"QUIT",
    ]
    client = raw(address)
    assert_well_formed(raw_reply_lines(client))
    codes = []
    for line in nasty:
        client.send(line + b"\r\n")
        lines = raw_reply_lines(client)
        assert_well_formed(lines)
        codes.append(int(lines[-1][:3]))
    assert codes[-1] == 221 and 250 in codes
    assert client.closed()


def test_policy_reply_text_cannot_inject_reply_lines(policy, listen, raw):
    @policy.on("smtp_server_rcpt_to")
    def rcpt(recipient, meta):
        raise kumo.Reject(550, "5.7.1 line1\r\n250 injected\nline3")

    client = raw(listen())
    client.hello()
    assert client.command("MAIL FROM:<a@b.example>")[0] == 250
    client.send(b"RCPT TO:<c@d.example>\r\n")
    lines = raw_reply_lines(client)
    assert_well_formed(lines)
    assert len(lines) >= 2 and all(line.startswith(b"550") for line in lines), lines
    assert client.command("NOOP") == (250, ["2.0.0 OK"])


# --- 9. too many errors ------------------------------------------------------------------


def test_mixed_errors_count_together(address, raw):
    client = raw(address)
    client.hello()
    errors = [("BOGUS", 500), ("EHLO", 501), ("RCPT TO:<a@b.example>", 503)] * 7
    for command, code in errors[:19]:
        assert client.command(command)[0] == code, command
        assert not client.readable(0)
    assert client.command(errors[19][0])[0] == errors[19][1]
    assert client.reply()[0] == 421
    assert client.closed()


# --- 10. slow clients ---------------------------------------------------------------------


def assert_idle_too_long(client: RawClient) -> None:
    code, lines = client.reply()
    assert (code, lines[0][:5]) == (421, "4.3.2"), lines
    assert "idle too long" in lines[0]
    assert client.closed()


def test_idle_after_the_banner(listen, raw):
    client = raw(listen(client_timeout=0.5))
    assert client.reply()[0] == 220
    started = time.monotonic()
    assert_idle_too_long(client)
    assert 0.4 < time.monotonic() - started < 1.5


def test_idle_inside_data(listen, raw, maildir):
    client = raw(listen(client_timeout=0.5))
    client.open_data()
    client.send(b"Subject: half a message\r\n")
    started = time.monotonic()
    assert_idle_too_long(client)
    assert 0.4 < time.monotonic() - started < 1.5
    assert stored(maildir) == []


def test_trickling_inside_data_is_cut_off(listen, raw, maildir):
    client = raw(listen(client_timeout=1))
    client.open_data()
    started = time.monotonic()
    while time.monotonic() - started < 5 and not client.readable(0.1):
        client.send(b"x")
    elapsed = time.monotonic() - started
    code, lines = client.reply()
    assert (code, lines[0][:5]) == (421, "4.3.2"), lines
    assert 0.9 < elapsed < 3, elapsed
    assert client.closed()
    assert stored(maildir) == []


# --- 11. max_connections -----------------------------------------------------------------


def test_max_connections_slots_are_released_however_clients_leave(listen, raw):
    address = listen(max_connections=3)
    clients = [raw(address) for _ in range(3)]
    assert [client.reply()[0] for client in clients] == [220, 220, 220]
    fourth = raw(address)
    assert fourth.reply() == (
        421,
        [f"4.3.2 {HOSTNAME} too many concurrent sessions. Try later"],
    )
    assert fourth.closed()
    quitting, abrupt, reset = clients
    assert quitting.command("QUIT")[0] == 221
    quitting.close()
    abrupt.close()
    reset.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    reset.close()

    def three_greeted() -> bool:
        fresh = [raw(address) for _ in range(3)]
        codes.append([client.reply()[0] for client in fresh])
        if codes[-1] == [220, 220, 220]:
            return True
        for client in fresh:
            client.close()
        return False

    codes: list[list[int]] = []
    wait_until(three_greeted, within=2, what=lambda: f"3 free slots: {codes[-1]}", interval=0.05)


# --- 12. policy faults --------------------------------------------------------------------


def test_handler_raising_gives_451_and_is_logged(policy, listen, raw, kumo_log):
    policy.on("smtp_server_rcpt_to", lambda recipient, meta: 1 / 0)
    client = raw(listen())
    client.hello()
    assert client.command("MAIL FROM:<a@b.example>")[0] == 250
    code, lines = client.command("RCPT TO:<c@d.example>")
    assert (code, lines[0][:5]) == (451, "4.3.0")
    assert "smtp_server_rcpt_to" in kumo_log.text
    assert "ZeroDivisionError" in kumo_log.text
    assert client.command("NOOP")[0] == 250


def test_handler_that_never_completes_does_not_hold_up_others(policy, listen, raw):
    @policy.on("smtp_server_mail_from")
    async def mail(sender, meta):
        if sender.user == "stuck":
            await asyncio.Event().wait()

    address = listen(data_processing_timeout=0.5)
    stuck = raw(address)
    stuck.hello()
    stuck.send(b"MAIL FROM:<stuck@b.example>\r\n")
    sent = time.monotonic()
    other = raw(address)
    other.open_data()
    assert other.command(b"Subject: x\r\n\r\nbody\r\n.\r\n")[0] == 250
    assert time.monotonic() - sent < 1
    assert not stuck.readable(0)
    code, lines = stuck.reply()
    assert (code, lines[0][:5]) == (451, "4.3.0")
    assert 0.4 < time.monotonic() - sent < 1.2
    assert stuck.command("NOOP")[0] == 250


def test_handler_returning_the_wrong_type(policy, listen, raw, kumo_log):
    policy.on("smtp_server_mail_from", lambda sender, meta: "yes")
    client = raw(listen())
    client.hello()
    code, lines = client.command("MAIL FROM:<a@b.example>")
    assert (code, lines[0][:1]) == (451, "4")
    assert "smtp_server_mail_from handlers must return None" in kumo_log.text


def test_dynamic_parameters_that_never_complete(policy, listen, raw):
    @policy.on("smtp_server_get_dynamic_parameters")
    async def dynamic(listener, meta):
        if meta.get_meta("received_from").startswith("127.0.0.9:"):
            await asyncio.Event().wait()

    address = listen(data_processing_timeout=0.5)
    stuck = raw(address, source="127.0.0.9")
    started = time.monotonic()
    other = raw(address, source="127.0.0.1")
    assert other.reply()[0] == 220
    assert time.monotonic() - started < 0.4
    assert not stuck.readable(0)
    code, lines = stuck.reply()
    assert (code, lines[0][:5]) == (421, "4.3.0"), lines
    assert 0.4 < time.monotonic() - started < 1.5
    assert stuck.closed()


# --- 13. PROXY protocol -------------------------------------------------------------------

PROXY_V1 = b"PROXY TCP4 192.0.2.7 127.0.0.2 40000 25\r\n"


def proxy_v2(source: str, destination: str, source_port: int, destination_port: int) -> bytes:
    addresses = struct.pack(
        "!4s4sHH",
        socket.inet_aton(source),
        socket.inet_aton(destination),
        source_port,
        destination_port,
    )
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, len(addresses)) + addresses


PROXY_V2 = proxy_v2("192.0.2.7", "127.0.0.2", 40000, 25)
CONN_NAMES = ("received_from", "received_via", "orig_received_from")


@pytest.fixture
def proxied(policy, listen):
    """Start a listener requiring PROXY from 127.0.0.1; returns (address, what hooks saw)."""
    seen: dict[str, list] = {"accepted": [], "dynamic": []}

    @policy.on("smtp_server_get_dynamic_parameters")
    def dynamic(listener, meta):
        seen["dynamic"].append(meta.get_meta("received_from"))

    @policy.on("smtp_server_connection_accepted")
    def accepted(meta):
        seen["accepted"].append({name: meta.get_meta(name) for name in CONN_NAMES})

    def start(**params):
        address = listen(
            peer={
                "127.0.0.1": {"require_proxy_protocol": True},
                "192.0.2.0/24": {"hostname": "proxied-peer.example"},
            },
            via={"127.0.0.2": {"banner": "via two"}},
            **params,
        )
        return address, seen

    return start


def assert_proxied_session(client: RawClient, seen) -> None:
    assert client.reply() == (220, ["proxied-peer.example ESMTP via two"])
    [accepted] = seen["accepted"]
    assert accepted["received_from"] == "192.0.2.7:40000"
    assert accepted["received_via"] == "127.0.0.2:25"
    assert accepted["orig_received_from"].startswith("127.0.0.1:")
    assert seen["dynamic"] == ["192.0.2.7:40000"]
    assert client.command("EHLO client.example")[0] == 250


@pytest.mark.parametrize("header", [PROXY_V1, PROXY_V2], ids=["v1", "v2"])
def test_proxy_header_gives_the_real_client(proxied, raw, header):
    address, seen = proxied()
    client = raw(address, source="127.0.0.1")
    client.send(header)
    assert_proxied_session(client, seen)


def test_proxy_v2_header_one_byte_at_a_time(proxied, raw):
    address, seen = proxied()
    client = raw(address, source="127.0.0.1")
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for byte in PROXY_V2:
        client.send(bytes([byte]))
        time.sleep(0.005)
    assert_proxied_session(client, seen)


def test_proxy_v2_header_and_ehlo_in_one_segment(proxied, raw):
    # The EHLO came before our greeting: the client talked first (what HAProxy
    # forwards from a bot that does), as on a direct connection.
    address, seen = proxied()
    client = raw(address, source="127.0.0.1")
    client.send(PROXY_V2 + b"EHLO x\r\n")
    assert_lost_synchronization(client)
    assert seen["dynamic"] == ["192.0.2.7:40000"], "judged as the real client"


def test_proxy_v2_local_keeps_the_socket_addresses(proxied, raw):
    address, seen = proxied()
    client = raw(address, source="127.0.0.1")
    client.send(V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, 0))
    assert client.reply() == (220, [f"{HOSTNAME} ESMTP kumo_listener"])
    here = client.sock.getsockname()
    [accepted] = seen["accepted"]
    assert accepted["received_from"] == f"127.0.0.1:{here[1]}"
    assert accepted["received_via"] == f"{address[0]}:{address[1]}"


@pytest.mark.parametrize(
    "what", ["missing", "malformed", "truncated-then-close", "silence"], ids=str
)
def test_bad_proxy_header_closes_without_a_banner(proxied, raw, what):
    address, seen = proxied(client_timeout=0.5)
    client = raw(address, source="127.0.0.1")
    if what == "missing":
        client.send(b"EHLO x\r\n")
    elif what == "malformed":
        client.send(b"PROXY TCP4 999.1.1.1 127.0.0.2 40000 25\r\n")
    elif what == "truncated-then-close":
        client.send(PROXY_V1[:20])
        client.sock.shutdown(socket.SHUT_WR)
    started = time.monotonic()
    assert client.until_closed(2.0) == b""
    assert time.monotonic() - started < 1.5
    assert seen["accepted"] == []


def test_proxy_line_from_a_client_not_required_to_send_one(policy, listen, raw):
    seen = []

    @policy.on("smtp_server_mail_from")
    def mail(sender, meta):
        seen.append(meta.get_meta("received_from"))

    client = raw(listen(), source="127.0.0.1")
    client.hello()
    assert client.command(PROXY_V1)[0] == 500
    assert client.command("MAIL FROM:<a@b.example>")[0] == 250
    assert seen == [f"127.0.0.1:{client.sock.getsockname()[1]}"]


# --- 14. XCLIENT -----------------------------------------------------------------------------


def test_xclient_not_allowed(address, raw):
    client = raw(address)
    lines = client.hello()
    assert not any(line.startswith("XCLIENT") for line in lines)
    code, lines = client.command("XCLIENT ADDR=1.2.3.4")
    assert (code, lines[0][:5]) == (550, "5.7.0")


@pytest.fixture
def xclient(policy, listen):
    """Start a listener allowing XCLIENT from 127.0.0.1; returns (address, dynamic calls)."""
    calls: list[tuple[str, str | None]] = []

    @policy.on("smtp_server_get_dynamic_parameters")
    def dynamic(listener, meta):
        calls.append((meta.get_meta("received_from"), meta.get_meta("orig_received_from")))

    def start(**params):
        address = listen(
            peer={
                "127.0.0.1": {"allow_xclient": True},
                "192.0.2.0/24": {"hostname": "xclient-peer.example"},
            },
            via={"127.0.0.3": {"banner": "via three"}},
            **params,
        )
        return address, calls

    return start


def test_xclient_starts_the_session_over_as_the_new_client(xclient, raw):
    address, calls = xclient()
    client = raw(address, source="127.0.0.1")
    lines = client.hello()
    assert any(line.startswith("XCLIENT ") for line in lines)
    here = f"127.0.0.1:{client.sock.getsockname()[1]}"
    assert client.command("XCLIENT ADDR=192.0.2.9 PORT=4000") == (
        220,
        ["xclient-peer.example ESMTP kumo_listener"],
    )
    assert calls == [(here, None), ("192.0.2.9:4000", here)]
    assert client.command("MAIL FROM:<a@b.example>")[0] == 503
    code, lines = client.command("EHLO client.example")
    assert code == 250 and not any(line.startswith("XCLIENT") for line in lines)
    code, lines = client.command("XCLIENT ADDR=192.0.2.10")
    assert (code, lines[0][:5]) == (550, "5.7.0")


def test_xclient_inside_a_transaction(xclient, raw):
    address, _ = xclient()
    client = raw(address, source="127.0.0.1")
    client.hello()
    assert client.command("MAIL FROM:<a@b.example>")[0] == 250
    code, lines = client.command("XCLIENT ADDR=192.0.2.9")
    assert (code, lines[0][:5]) == (503, "5.5.1")


@pytest.mark.parametrize(
    "command",
    [
        "XCLIENT ADDR=999.1.1.1",
        "XCLIENT PORT=70000",
        "XCLIENT FOO=1",
        "XCLIENT",
        "XCLIENT HELO=a+zz",
    ],
)
def test_xclient_bad_attributes(xclient, raw, command):
    address, calls = xclient()
    client = raw(address, source="127.0.0.1")
    client.hello()
    code, lines = client.command(command)
    assert (code, lines[0][:5]) == (501, "5.5.4"), lines
    assert len(calls) == 1
    assert client.command("NOOP")[0] == 250


def test_xclient_login_authenticates_and_may_relay(policy, xclient, raw):
    seen = []
    policy.on("smtp_server_rcpt_to", lambda recipient, meta: seen.append(meta.get_meta("authn_id")))
    address, _ = xclient(relay_hosts=[])
    anonymous = raw(address, source="127.0.0.1")
    anonymous.hello()
    assert anonymous.command("XCLIENT ADDR=192.0.2.9")[0] == 220
    assert anonymous.command("EHLO client.example")[0] == 250
    assert anonymous.command("MAIL FROM:<a@b.example>")[0] == 250
    assert anonymous.command("RCPT TO:<c@outside.example>")[0] == 550

    client = raw(address, source="127.0.0.1")
    client.hello()
    assert client.command("XCLIENT LOGIN=alice ADDR=192.0.2.9")[0] == 220
    assert client.command("EHLO client.example")[0] == 250
    assert client.command("MAIL FROM:<a@b.example>")[0] == 250
    assert client.command("RCPT TO:<c@outside.example>")[0] == 250
    assert seen == ["alice"]


def test_xclient_destaddr_switches_the_via_block(xclient, raw):
    address, _ = xclient()
    client = raw(address, source="127.0.0.1")
    client.hello()
    assert client.command("XCLIENT DESTADDR=127.0.0.3") == (220, [f"{HOSTNAME} ESMTP via three"])
