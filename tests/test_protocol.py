"""The SMTP conversation: commands, replies, sequence and limits."""

from __future__ import annotations

import re
import time

import pytest
from support import without_envelope

ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3} ")


@pytest.fixture
def address(listen):
    return listen()


def test_greeting_and_ehlo_extensions(address, raw):
    client = raw(address)
    assert client.reply() == (220, ["mx.test.example ESMTP kumo_listener"])
    code, lines = client.command("EHLO client.example")
    assert code == 250
    assert lines[0] == "mx.test.example Hello client.example"
    assert lines[1:] == [
        "PIPELINING",
        "ENHANCEDSTATUSCODES",
        "8BITMIME",
        "SMTPUTF8",
        f"SIZE {20 * 1024 * 1024}",
        "DSN",
        "CHUNKING",
        "BINARYMIME",
        "STARTTLS",
    ]


def test_helo_replies_without_enhanced_codes(address, raw):
    client = raw(address)
    client.reply()
    assert client.command("HELO client.example") == (250, ["mx.test.example Hello client.example"])
    assert client.command("NOOP") == (250, ["OK"])
    assert client.command("MAIL FROM:<a@b.example> SIZE=x")[0] == 501


def test_every_reply_after_ehlo_has_an_enhanced_code(address, raw):
    client = raw(address)
    client.hello()
    for command in [
        "NOOP",
        "RSET",
        "VRFY someone",
        "HELP",
        "FOO",
        "RCPT TO:<a@b.example>",
        "MAIL FROM:<a@b.example>",
        "MAIL FROM:<a@b.example>",
        "DATA",
        "STARTTLS x",
    ]:
        _, lines = client.command(command)
        assert all(ENHANCED.match(line) for line in lines), (command, lines)


@pytest.mark.parametrize(
    ("command", "code", "enhanced"),
    [
        ("FOO bar", 500, "5.5.2"),
        ("EHLO", 501, None),
        ("MAIL FROM:a@b.example", 501, "5.1.7"),
        ("MAIL FROM:<a@b.example> FOO=1", 555, "5.5.4"),
        ("MAIL FROM:<a@b.example> BODY=9BIT", 501, "5.5.4"),
        ("RCPT TO:<a@b.example>", 503, "5.5.1"),
        ("DATA", 503, "5.5.1"),
        ("DATA now", 501, "5.5.4"),
        ("RSET x", 501, "5.5.4"),
        ("QUIT now", 501, "5.5.4"),
        ("VRFY", 501, "5.5.4"),
        ("VRFY postmaster", 252, "2.1.5"),
        ("HELP", 214, "2.0.0"),
        ("STARTTLS now", 501, "5.5.4"),
        ("AUTH PLAIN", 503, "5.5.1"),
        ("XCLIENT ADDR=1.2.3.4", 550, "5.7.0"),
        ("EXPN staff", 502, "5.5.1"),
        ("ETRN example.com", 502, "5.5.1"),
        ("TURN", 502, "5.5.1"),
        ("MAIL FROM:<a@b.example> BODY=BINARY", 501, "5.5.4"),
        ("BDAT 0", 503, "5.5.1"),
        ("MAIL FROM:<a@b.example> REQUIRETLS", 530, "5.7.10"),
    ],
)
def test_command_replies(address, raw, command, code, enhanced):
    client = raw(address)
    client.hello()
    got, lines = client.command(command)
    assert got == code, lines
    if enhanced:
        assert lines[-1].startswith(enhanced + " "), lines


def test_sequence_errors(address, raw):
    client = raw(address)
    client.reply()
    assert client.command("MAIL FROM:<a@b.example>")[0] == 503
    client.command("EHLO client.example")
    assert client.command("MAIL FROM:<a@b.example>")[0] == 250
    assert client.command("MAIL FROM:<a@b.example>")[0] == 503
    assert client.command("DATA")[0] == 503
    assert client.command("RSET")[0] == 250
    assert client.command("RCPT TO:<a@b.example>")[0] == 503


def test_invalid_utf8_and_control_characters_are_answered(address, raw):
    client = raw(address)
    client.hello()
    assert client.command(b"\x80\x81\r\n")[0] == 501
    assert client.command(b"NOOP\x00\r\n")[0] == 500
    assert client.command(b"NOOP\nRSET\r\n")[0] == 500
    assert client.command(b"VRFY post\x7fmaster\r\n")[0] == 500
    assert client.command("VRFY post\u0085master\r\n".encode())[0] == 500
    assert client.command("NOOP")[0] == 250


def test_command_line_too_long_then_the_session_goes_on(address, raw):
    client = raw(address)
    client.hello()
    assert client.command("NOOP " + "x" * 993)[0] == 250
    code, lines = client.command("NOOP " + "x" * 5000)
    assert (code, lines[0][:5]) == (500, "5.2.3")
    code, _ = client.command(b"NOOP " + b"y" * 2_000_000 + b"\r\n")
    assert code == 500
    assert client.command("NOOP")[0] == 250


def test_size_parameter_over_the_limit_is_refused_up_front(listen, raw):
    client = raw(listen(max_message_size=1000))
    client.hello()
    code, lines = client.command("MAIL FROM:<a@b.example> SIZE=1001")
    assert (code, lines[0][:5]) == (552, "5.3.4")
    assert client.command("MAIL FROM:<a@b.example> SIZE=1000 BODY=8BITMIME")[0] == 250


def test_body_over_the_limit_is_read_to_the_end_then_refused(listen, raw, maildir):
    client = raw(listen(max_message_size=1000))
    client.hello()
    client.command("MAIL FROM:<a@b.example>")
    client.command("RCPT TO:<c@d.example>")
    assert client.command("DATA")[0] == 354
    client.send(b"x" * 500 + b"\r\n" + b"y" * 600 + b"\r\n.\r\n")
    code, lines = client.reply()
    assert (code, lines[0][:5]) == (552, "5.3.4")
    assert client.command("NOOP")[0] == 250
    assert not any((maildir / "new").iterdir())


def test_too_many_recipients_keeps_the_earlier_ones(listen, raw):
    client = raw(listen(max_recipients_per_message=2))
    client.hello()
    client.command("MAIL FROM:<a@b.example>")
    assert client.command("RCPT TO:<1@d.example>")[0] == 250
    assert client.command("RCPT TO:<2@d.example>")[0] == 250
    code, lines = client.command("RCPT TO:<3@d.example>")
    assert (code, lines[0][:5]) == (452, "4.5.3")
    assert client.command("DATA")[0] == 354
    assert client.command(b"Subject: x\r\n\r\nhi\r\n.\r\n")[0] == 250


def test_max_messages_per_connection_counts_transactions(listen, raw):
    client = raw(listen(max_messages_per_connection=2))
    client.hello()
    for _ in range(2):
        assert client.command("MAIL FROM:<a@b.example>")[0] == 250
        assert client.command("RSET")[0] == 250
    assert client.command("MAIL FROM:<a@b.example>")[0] == 421
    assert client.closed()


def test_pipelined_transaction_in_one_write(address, raw, maildir):
    client = raw(address)
    client.hello()
    client.send(
        b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nRCPT TO:<e@d.example>\r\nDATA\r\n"
    )
    assert [client.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
    client.send(b"Subject: p\r\n\r\n..dotted\r\n.\r\nQUIT\r\n")
    assert client.reply()[0] == 250
    assert client.reply()[0] == 221
    bodies = [p.read_bytes() for p in (maildir / "new").iterdir()]
    assert len(bodies) == 2
    assert all(body.endswith(b"Subject: p\r\n\r\n.dotted\r\n") for body in bodies)


def test_empty_body_and_terminator_split_across_segments(listen, raw, maildir):
    client = raw(listen(trace_headers={"received_header": False}))
    client.hello()
    client.command("MAIL FROM:<>")
    client.command("RCPT TO:<c@d.example>")
    assert client.command("DATA")[0] == 354
    assert client.command(".")[0] == 250
    client.command("MAIL FROM:<a@b.example>")
    client.command("RCPT TO:<c@d.example>")
    client.command("DATA")
    for byte in b"line\r\n.\r\n":
        client.send(bytes([byte]))
        time.sleep(0.005)
    assert client.reply()[0] == 250
    stored = [without_envelope(p.read_bytes()) for p in (maildir / "new").iterdir()]
    assert sorted(stored) == [b"", b"line\r\n"]


def test_non_ascii_address_needs_smtputf8(address, raw):
    client = raw(address)
    client.hello()
    code, lines = client.command("MAIL FROM:<jörg@b.example>")
    assert (code, lines[0][:5]) == (553, "5.6.7")
    assert client.command("MAIL FROM:<jörg@b.example> SMTPUTF8")[0] == 250
    assert client.command("RCPT TO:<müller@d.example>")[0] == 250


def test_idle_client_is_closed_with_421(listen, raw):
    client = raw(listen(client_timeout=0.5))
    client.hello()
    code, lines = client.reply()
    assert code == 421
    assert "idle too long" in lines[0]
    assert client.closed()


def test_trickling_bytes_do_not_extend_the_command_deadline(listen, raw):
    client = raw(listen(client_timeout=1))
    client.hello()
    give_up = time.monotonic() + 5
    while time.monotonic() < give_up and not client.readable(0.1):
        client.send(b"N")
    code, lines = client.reply()
    assert code == 421
    assert "idle too long" in lines[0]


def test_quit_closes(address, raw):
    client = raw(address)
    client.hello()
    assert client.command("QUIT") == (221, ["2.0.0 mx.test.example closing connection"])
    assert client.closed()


def test_too_many_errors_closes_the_session(address, raw):
    client = raw(address)
    client.hello()
    for _ in range(19):
        assert client.command("BOGUS")[0] == 500
    assert client.command("BOGUS")[0] == 500
    assert client.reply()[0] == 421
    assert client.closed()


def test_max_connections(listen, raw):
    address = listen(max_connections=2)
    first, second = raw(address), raw(address)
    assert first.reply()[0] == 220 and second.reply()[0] == 220
    third = raw(address)
    assert third.reply() == (421, ["4.3.2 mx.test.example too many concurrent sessions. Try later"])
    first.command("QUIT")
    second.command("QUIT")
    time.sleep(0.2)
    assert raw(address).reply()[0] == 220
