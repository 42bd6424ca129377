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
