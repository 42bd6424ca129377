"""Delivery: trace headers, splitting, message handlers, the Maildir sink's
durability, failures, and graceful shutdown."""

from __future__ import annotations

import asyncio
import base64
import json
import smtplib
import threading
from email.message import EmailMessage
from pathlib import Path

import kumo_listener as kumo
import pytest
from support import delivered, swaks, without_envelope


def send(client: smtplib.SMTP, recipients: list[str], subject: str = "test") -> dict:
    message = EmailMessage()
    message["Subject"] = subject
    message.set_content("hello\n.leading dot\n")
    return client.send_message(message, "a@b.example", recipients)


def test_swaks_end_to_end(listen, maildir):
    host, port = listen()
    result = swaks(
        *("--server", host, "--port", str(port), "--helo", "swaks.example"),
        *("--from", "sender@b.example", "--to", "rcpt@d.example"),
        *("--header", "Subject: via swaks", "--body", "sent by swaks"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [stored] = delivered(maildir)
    assert stored.startswith(b"Return-Path: <sender@b.example>\r\nDelivered-To: rcpt@d.example\r\n")
    stored = without_envelope(stored)
    assert stored.startswith(b"Received: from swaks.example ([127.0.0.1])\r\n\tby mx.test.example")
    assert b"\r\n\tfor <rcpt@d.example>;" in stored
    assert b"Subject: via swaks\r\n" in stored and b"sent by swaks" in stored


def test_received_header_then_the_data_as_sent(listen, raw, maildir):
    client = raw(listen())
    client.reply()
    client.command("EHLO client.example")
    client.command("MAIL FROM:<a@b.example>")
    client.command("RCPT TO:<c@d.example>")
    client.command("DATA")
    code, lines = client.command(b"Subject: s\r\n\r\n..one\r\ntwo\r\n.\r\n")
    assert code == 250 and lines[0].startswith("2.0.0 OK ids=")
    [id] = lines[0].removeprefix("2.0.0 OK ids=").split(",")
    [stored] = delivered(maildir)
    [name] = (maildir / "new").iterdir()
    assert f".{id}." in name.name, "the file name carries the id of the 250"
    header, body = without_envelope(stored).split(b"Subject: s", 1)
    assert header.startswith(b"Received: from client.example ([127.0.0.1])\r\n")
    assert f"by mx.test.example (kumo_listener) with ESMTP id {id}\r\n".encode() in header
    assert body == b"\r\n\r\n.one\r\ntwo\r\n"


@pytest.mark.parametrize(
    ("handling", "groups"),
    [
        ("BifurcateAlways", [["1@a.example"], ["2@a.example"], ["3@b.example"]]),
        ("BatchByDomain", [["1@a.example", "2@a.example"], ["3@b.example"]]),
    ],
)
def test_batch_handling_splits_the_transaction(policy, listen, smtp, maildir, handling, groups):
    seen: dict[str, list] = {"data": [], "received": []}

    @policy.on("smtp_server_data")
    def data(message, meta):
        seen["data"].append([str(r) for r in message.recipients])
        message.set_meta("queue", "q1")

    @policy.on("smtp_server_message_received")
    def received(message, meta):
        seen["received"].append([str(r) for r in message.recipients])
        assert message.get_meta("queue") == "q1"
        assert str(message.sender) == "a@b.example"
        assert message.data.endswith(b"hello\r\n.leading dot\r\n")

    client = smtp(listen(batch_handling=handling))
    assert send(client, ["1@a.example", "2@a.example", "3@b.example"]) == {}
    assert seen["data"] == [["1@a.example", "2@a.example", "3@b.example"]]
    assert seen["received"] == groups
    assert len(delivered(maildir)) == len(groups)
    for path in (maildir / "new").iterdir():
        # File names are `seconds.ID.host`; each file's Received: header names its ID.
        assert f" id {path.name.split('.')[1]}".encode() in path.read_bytes()


def test_supplemental_trace_header(policy, listen, smtp, maildir):
    policy.on("smtp_server_connection_accepted", lambda meta: meta.set_meta("tenant", "acme"))
    client = smtp(
        listen(
            trace_headers={
                "received_header": False,
                "supplemental_header": True,
                "include_meta_names": ["tenant"],
            }
        )
    )
    send(client, ["r@d.example"])
    [stored] = delivered(maildir)
    name, value = without_envelope(stored).split(b"\r\n", 1)[0].split(b": ", 1)
    assert name == b"X-KumoRef"
    assert json.loads(base64.b64decode(value)) == {
        "_@_": "\\_o< DUCK!",
        "recipient": "r@d.example",
        "tenant": "acme",
    }


def test_every_250_is_already_durable_in_new(listen, maildir):
    """Each sender checks, as soon as its 250 arrives, that its message is
    complete in new/; several connections send at once."""
    address = listen()
    problems: list[str] = []

    def sender(index: int) -> None:
        with smtplib.SMTP(*address, timeout=30) as client:
            for number in range(15):
                subject = f"durable {index}-{number}"
                send(client, ["r@d.example"], subject)
                matches = [m for m in delivered(maildir) if f"Subject: {subject}\r\n".encode() in m]
                if len(matches) != 1 or not matches[0].endswith(b"\r\n.leading dot\r\n"):
                    problems.append(subject)

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert problems == []
    assert len(delivered(maildir)) == 60
    assert list((maildir / "tmp").iterdir()) == []


def test_a_failing_sink_gives_451_and_leaves_nothing(listen, smtp, maildir):
    client = smtp(listen())
    (maildir / "new").rmdir()
    (maildir / "new").write_text("not a directory")
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(client, ["1@d.example", "2@d.example"])
    assert refused.value.smtp_code == 451
    assert list((maildir / "tmp").iterdir()) == []
    (maildir / "new").unlink()
    (maildir / "new").mkdir()
    send(client, ["1@d.example"])
    assert len(delivered(maildir)) == 1


def test_a_failing_message_handler_stores_nothing(policy, listen, smtp, maildir):
    @policy.on("smtp_server_message_received")
    def received(message, meta):
        if message.recipients[0].user == "2":
            raise RuntimeError("spool full")

    client = smtp(listen())
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(client, ["1@d.example", "2@d.example"])
    assert refused.value.smtp_code == 451
    assert delivered(maildir) == []


def test_discard_sink_stores_nothing(policy, tmp_path: Path):
    with kumo.Server(policy=policy, sink="discard", maildir=tmp_path / "unused") as server:
        address = server.start_esmtp_listener(listen="127.0.0.1:0").address
        assert server.sink == "discard"
        with smtplib.SMTP(*address, timeout=10) as client:
            assert send(client, ["r@d.example"]) == {}
    assert not (tmp_path / "unused").exists()


def test_graceful_shutdown_finishes_messages_in_flight(policy, tmp_path: Path, raw):
    maildir = tmp_path / "maildir"
    in_handler = threading.Event()

    @policy.on("smtp_server_message_received")
    async def received(message, meta):
        in_handler.set()
        await asyncio.sleep(0.5)

    server = kumo.Server(policy=policy, maildir=maildir).start()
    address = server.start_esmtp_listener(listen="127.0.0.1:0", hostname="mx.test.example").address
    idle, busy = raw(address), raw(address)
    for client in (idle, busy):
        client.reply()
        client.command("EHLO client.example")
    busy.command("MAIL FROM:<a@b.example>")
    busy.command("RCPT TO:<c@d.example>")
    busy.command("DATA")
    busy.send(b"Subject: in flight\r\n\r\nbody\r\n.\r\n")
    assert in_handler.wait(5)
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    assert idle.reply() == (421, ["4.3.2 mx.test.example shutting down"])
    assert idle.closed()
    assert busy.reply()[0] == 250
    assert busy.reply() == (421, ["4.3.2 mx.test.example shutting down"])
    stopper.join(10)
    assert not stopper.is_alive()
    assert len(delivered(maildir)) == 1
    with pytest.raises(OSError):
        raw(address, timeout=2).reply()


# --- trace headers against hostile clients ---------------------------------------------


def header_lines(stored: bytes) -> list[bytes]:
    """The lines of the stored message's header section (without CRLF)."""
    return without_envelope(stored).split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def test_received_lines_fit_998_octets_with_the_longest_helo_accepted(listen, raw, maildir):
    """line_length_hard_limit is 998 by default: HELO and 993 octets is the
    longest EHLO line accepted (a 1,022-octet Received: line before)."""
    address = listen(relay_hosts=["127.0.0.1"])
    longest = "h" * 993
    too_long_for_the_line = "x" * 984
    for helo in (longest, too_long_for_the_line, "a" * 980):
        client = raw(address)
        assert client.reply()[0] == 220
        client.ehlo(helo)
        assert client.command("MAIL FROM:<a@b.example>")[0] == 250
        assert client.command("RCPT TO:<c@d.example>")[0] == 250
        assert client.command("DATA")[0] == 354
        assert client.command(b"Subject: long helo\r\n\r\nbody\r\n.\r\n")[0] == 250
        client.close()
    stored = sorted(delivered(maildir), key=len)
    assert len(stored) == 3
    for message in stored:
        lines = header_lines(message)
        assert all(len(line) <= 998 for line in lines), [len(line) for line in lines]
        assert lines[1].startswith((b"\t([127.0.0.1])", b"\tby ")), lines[:3]
    received = [header_lines(message)[0] for message in stored]
    # Cut to fit when the name alone is longer than the line can hold.
    assert b"Received: from " + b"h" * 980 + b"..." in received
    assert b"Received: from " + b"x" * 980 + b"..." in received
    assert b"Received: from " + b"a" * 980 in received


def test_received_escapes_hidden_characters_and_long_utf8_recipients(listen, raw, maildir):
    address = listen(relay_hosts=["127.0.0.1"])
    client = raw(address)
    assert client.reply()[0] == 220
    client.ehlo("moc.elgoog\u202e\u2028x")
    # The second: a local part of 62 octets (RFC 5321 allows 64), 166 escaped.
    recipients = ["r\u2029\u200b@\u4f8b\u3048.jp", "\u00fc" + "\u200b" * 20 + "@d.example"]
    assert client.command("MAIL FROM:<a@b.example> SMTPUTF8")[0] == 250
    for recipient in recipients:
        assert client.command(f"RCPT TO:<{recipient}>")[0] == 250
    assert client.command("DATA")[0] == 354
    assert client.command(b"Subject: utf8\r\n\r\nbody\r\n.\r\n")[0] == 250
    stored = delivered(maildir)
    assert len(stored) == 2
    for message in stored:
        lines = header_lines(message)
        assert all(len(line) <= 998 for line in lines), [len(line) for line in lines]
        text = b"\r\n".join(lines).decode()
        assert not any(char in text for char in "\u202e\u2028\u2029\u200b"), text
        assert text.startswith("Received: from moc.elgoog\\u{202e}\\u{2028}x ([127.0.0.1])")
    texts = [b"\r\n".join(header_lines(message)).decode() for message in stored]
    assert any("\tfor <r\\u{2029}\\u{200b}@\u4f8b\u3048.jp>;" in text for text in texts), texts
    assert any("\tfor <\u00fc" + "\\u{200b}" * 20 + "@d.example>;" in text for text in texts), texts


# --- the dot stuffed for transparency ---------------------------------------------------


@pytest.mark.parametrize("first", [b"x", b"."])
@pytest.mark.parametrize("length", [998, 999])
def test_a_998_octet_line_may_start_with_a_dot(listen, maildir, length, first):
    """RFC 5321 §4.5.3.1.6: 1,000 octets with CRLF, not counting the dot
    smtplib (like kumod) adds before a line starting with one."""
    line = first + b"y" * (length - 1)
    with smtplib.SMTP(*listen(), timeout=10) as client:
        message = b"Subject: dots\r\n\r\n" + line + b"\r\nend\r\n"
        if length <= 998:
            assert client.sendmail("a@b.example", ["c@d.example"], message) == {}
        else:
            with pytest.raises(smtplib.SMTPDataError) as refused:
                client.sendmail("a@b.example", ["c@d.example"], message)
            assert (refused.value.smtp_code, refused.value.smtp_error[:5]) == (500, b"5.2.3")
    stored = delivered(maildir)
    if length <= 998:
        assert without_envelope(stored[0]).endswith(b"\r\n\r\n" + line + b"\r\nend\r\n")
    else:
        assert stored == []
