"""ESMTP extensions with real clients: DSN and other parameters as the
policy sees them, REQUIRETLS, SMTPUTF8's protocol name, the envelope in the
Maildir, EXPN/ETRN/TURN, HELP, sizes with units."""

from __future__ import annotations

import smtplib

import kumo_listener as kumo
import pytest
from support import client_context, delivered, tls_session, without_envelope

MESSAGE = b"Subject: esmtp\r\n\r\nbody\r\n"


@pytest.fixture
def params_seen(policy: kumo.Policy) -> dict[str, list]:
    """The `.params` of every address each handler was given."""
    seen: dict[str, list] = {"mail": [], "rcpt": [], "data": [], "received": []}

    @policy.on("smtp_server_mail_from")
    def mail_from(sender, meta):
        seen["mail"].append(sender.params)

    @policy.on("smtp_server_rcpt_to")
    def rcpt_to(recipient, meta):
        seen["rcpt"].append((str(recipient), recipient.params))

    @policy.on("smtp_server_data")
    def data(message, meta):
        seen["data"].append([message.sender.params] + [r.params for r in message.recipients])

    @policy.on("smtp_server_message_received")
    def received(message, meta):
        seen["received"].append([message.sender.params] + [r.params for r in message.recipients])

    return seen


def test_dsn_parameters_from_smtplib_reach_the_policy(listen, smtp, params_seen):
    client = smtp(listen())
    client.ehlo("client.example")
    assert client.has_extn("dsn")
    refused = client.sendmail(
        "a@b.example",
        ["x@d.example", "y@d.example"],
        MESSAGE,
        mail_options=["RET=HDRS", "ENVID=QQ314159+2B+3D"],
        rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;x+2By@d.example"],
    )
    assert refused == {}
    # smtplib adds SIZE= itself.
    sender = {"RET": "HDRS", "ENVID": "QQ314159+=", "SIZE": str(len(MESSAGE))}
    recipient = {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;x+y@d.example"}
    assert params_seen["mail"] == [sender]
    assert params_seen["rcpt"] == [("x@d.example", recipient), ("y@d.example", recipient)]
    assert params_seen["data"] == [[sender, recipient, recipient]]
    assert params_seen["received"] == [[sender, recipient], [sender, recipient]]


def test_bare_keywords_are_none_and_no_parameters_an_empty_dict(listen, smtp, params_seen):
    client = smtp(listen())
    client.ehlo("client.example")
    client.sendmail(
        "a@b.example", ["x@d.example"], MESSAGE, mail_options=["SMTPUTF8", "BODY=8bitmime"]
    )
    client.sendmail("a@b.example", ["x@d.example"], MESSAGE)
    size = str(len(MESSAGE))
    assert params_seen["mail"] == [
        {"SMTPUTF8": None, "BODY": "8BITMIME", "SIZE": size},
        {"SIZE": size},
    ]
    assert params_seen["rcpt"] == [("x@d.example", {}), ("x@d.example", {})]


def test_bad_and_unknown_parameters_are_refused(listen, smtp, params_seen):
    client = smtp(listen())
    client.ehlo("client.example")
    assert client.mail("a@b.example", ["RET=ALL"])[0] == 501
    assert client.mail("a@b.example", ["ENVID=" + "e" * 101])[0] == 501
    assert client.mail("a@b.example", ["X-UNKNOWN=1"])[0] == 555
    assert client.mail("a@b.example", ["BODY=BINARY"])[0] == 501
    assert client.mail("a@b.example", ["AUTH=<>"])[0] == 250
    assert client.rcpt("x@d.example", ["NOTIFY=NEVER,SUCCESS"])[0] == 501
    assert client.rcpt("x@d.example", ["ORCPT=rfc822"])[0] == 501
    assert client.rcpt("x@d.example", ["NOTIFY=NEVER"])[0] == 250
    assert params_seen["mail"] == [{"AUTH": "<>"}]
    assert params_seen["rcpt"] == [("x@d.example", {"NOTIFY": "NEVER"})]


def test_requiretls_is_refused_in_plaintext_and_marks_the_message_under_tls(policy, listen, raw):
    seen: list = []

    @policy.on("smtp_server_message_received")
    def received(message, meta):
        seen.append((message.get_meta("requiretls"), message.sender.params))

    address = listen()
    client = raw(address)
    assert client.reply()[0] == 220
    lines = client.ehlo()
    assert "REQUIRETLS" not in lines
    code, lines = client.command("MAIL FROM:<a@b.example> REQUIRETLS")
    assert (code, lines[0][:6]) == (530, "5.7.10"), lines
    client, lines = tls_session(raw, address)
    assert "REQUIRETLS" in lines
    assert client.command("MAIL FROM:<a@b.example> REQUIRETLS")[0] == 250
    assert client.command("RCPT TO:<x@d.example>")[0] == 250
    assert client.command("DATA")[0] == 354
    assert client.command(MESSAGE + b".\r\n")[0] == 250
    assert client.command("MAIL FROM:<a@b.example>")[0] == 250
    assert client.command("RCPT TO:<x@d.example>")[0] == 250
    assert client.command("DATA")[0] == 354
    assert client.command(MESSAGE + b".\r\n")[0] == 250
    assert seen == [(True, {"REQUIRETLS": None}), (None, {})]


def test_smtputf8_transactions_are_utf8smtp(policy, listen, smtp, maildir):
    seen: list = []
    policy.on(
        "smtp_server_message_received",
        lambda message, meta: seen.append(
            (message.get_meta("reception_protocol"), meta.get_meta("reception_protocol"))
        ),
    )
    host, port = listen()
    client = smtp((host, port))
    client.sendmail("jörg@b.example", ["x@d.example"], MESSAGE, mail_options=["SMTPUTF8"])
    client.sendmail("a@b.example", ["x@d.example"], MESSAGE)
    with smtplib.SMTP(host, port, timeout=10) as secure:
        secure.starttls(context=client_context())
        secure.sendmail("a@b.example", ["x@d.example"], MESSAGE, mail_options=["SMTPUTF8"])
    assert seen == [("UTF8SMTP", "ESMTP"), ("ESMTP", "ESMTP"), ("UTF8SMTPS", "ESMTPS")]
    words = [
        without_envelope(stored).split(b" id ", 1)[0].rsplit(b" ", 1)[1]
        for stored in delivered(maildir)
    ]
    assert sorted(words) == [b"ESMTP", b"UTF8SMTP", b"UTF8SMTPS"]


def test_the_maildir_keeps_the_envelope(listen, smtp, maildir):
    client = smtp(listen())
    client.sendmail("", ["x@d.example", "y@d.example"], MESSAGE)
    files = delivered(maildir)
    assert len(files) == 2
    for stored in files:
        assert stored.startswith(b"Return-Path: <>\r\nDelivered-To: ")
        recipient = stored.split(b"Delivered-To: ", 1)[1].split(b"\r\n", 1)[0]
        # Split to one recipient, each file's Received: names it.
        assert b"\r\n\tfor <" + recipient + b">;" in stored
        assert stored.endswith(MESSAGE)
    assert sorted(f.split(b"\r\n")[1] for f in files) == [
        b"Delivered-To: x@d.example",
        b"Delivered-To: y@d.example",
    ]


def test_batch_by_domain_has_one_delivered_to_per_recipient(policy, listen, smtp, maildir):
    data: list[bytes] = []
    policy.on("smtp_server_message_received", lambda message, meta: data.append(message.data))
    client = smtp(listen(batch_handling="BatchByDomain"))
    client.sendmail("a@b.example", ["x@d.example", "y@d.example", "z@e.example"], MESSAGE)
    files = delivered(maildir)
    [both] = [stored for stored in files if b"Delivered-To: y@" in stored]
    [single] = [stored for stored in files if b"Delivered-To: z@" in stored]
    assert both.startswith(
        b"Return-Path: <a@b.example>\r\n"
        b"Delivered-To: x@d.example\r\nDelivered-To: y@d.example\r\nReceived: "
    )
    assert b"for <" not in both
    assert single.startswith(b"Return-Path: <a@b.example>\r\nDelivered-To: z@e.example\r\n")
    assert b"\r\n\tfor <z@e.example>;" in single
    # What the policy sees is the message with its trace headers, without the envelope.
    assert sorted(data) == sorted(without_envelope(f) for f in files)


def test_expn_etrn_turn_are_not_implemented_and_help_lists_what_is_available(listen, smtp):
    client = smtp(listen())
    client.ehlo("client.example")
    assert client.expn("staff")[0] == 502
    assert client.docmd("ETRN", "d.example")[0] == 502
    assert client.docmd("TURN")[0] == 502
    assert client.help().endswith(b"VRFY HELP STARTTLS")
    client.starttls(context=client_context())
    client.ehlo("client.example")
    assert client.help().endswith(b"VRFY HELP")


def test_sizes_accept_units(listen, smtp):
    client = smtp(listen(max_message_size="100 KB", data_buffer_size="64 KiB"))
    client.ehlo("client.example")
    assert client.esmtp_features["size"] == "100000"
    with pytest.raises(ValueError, match="max_message_size"):
        listen(max_message_size="100 K")
