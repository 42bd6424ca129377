"""The log lines an operator greps: one per refusal, one per stored message,
one per connection when it ends (as Postfix's smtpd writes them)."""

from __future__ import annotations

import json
import re
import signal
import smtplib
import threading
import time

import kumo_listener as kumo
import pytest
from support import delivered, logged, port_free, wait_until, without_envelope

BODY = b"Subject: log\r\n\r\nbody\r\n"


def test_a_stored_message_a_refusal_and_the_disconnect_line(kumo_log, listen, smtp, raw):
    address = listen(relay_hosts=["127.0.0.1"])
    with smtp(address) as client:
        client.sendmail("a@b.example", ["c@d.example"], BODY)
    logged(
        kumo_log,
        r"stored: \S+ from=<a@b\.example> to=<c@d\.example> size=\d+ client=127\.0\.0\.1:\d+"
        r" via=127\.0\.0\.1:\d+ \(mx\.test\.example\)",
    )
    logged(
        kumo_log,
        r"disconnect from 127\.0\.0\.1:\d+ to 127\.0\.0\.1:\d+ \(mx\.test\.example\) time=[\d.]+s"
        r" ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5",
    )
    stranger = raw(address, source="127.0.0.30")
    assert stranger.reply()[0] == 220
    assert stranger.command("EHLO client.example")[0] == 250
    assert stranger.command("MAIL FROM:<a@b.example>")[0] == 250
    assert stranger.command("RCPT TO:<x@elsewhere.example>")[0] == 550
    assert stranger.command("BOGUS")[0] == 500
    assert stranger.command("QUIT")[0] == 221
    logged(
        kumo_log,
        r"reject: RCPT from 127\.0\.0\.30:\d+: 550 5\.7\.1 relaying not permitted;"
        r" helo=client\.example",
    )
    logged(kumo_log, r"reject: UNKNOWN from 127\.0\.0\.30:\d+: 500 5\.5\.2 command not recognized")
    logged(
        kumo_log,
        r"disconnect from 127\.0\.0\.30:\d+ .* ehlo=1 mail=1 rcpt=0/1 quit=1 unknown=0/1"
        r" commands=3/5",
    )


def test_policy_refusals_are_info_and_failures_warnings(kumo_log, policy, listen, smtp):
    @policy.on("smtp_server_mail_from")
    def mail(sender, meta):
        if sender.user == "broken":
            raise RuntimeError("database down")
        raise kumo.Reject(550, "5.7.1 not you")

    address = listen()
    with smtp(address) as client:
        client.ehlo("client.example")
        assert client.mail("someone@b.example")[0] == 550
        assert client.mail("broken@b.example")[0] == 451
    refusal = [r for r in kumo_log.records if "reject: MAIL" in r.getMessage()]
    assert [(r.levelname, r.getMessage().split(": ", 2)[2][:9]) for r in refusal] == [
        ("INFO", "550 5.7.1"),
        ("WARNING", "451 4.3.0"),
    ]


def test_serve_log_format_json(serve):
    served = serve("--listen", "127.0.0.1:0", "--sink", "discard", "--log-format", "json")
    with smtplib.SMTP(*served.address, timeout=10) as client:
        client.sendmail("a@b.example", ["c@d.example", "e@f.example"], BODY)
        client.ehlo("client.example")
        assert client.docmd("VRFY")[0] == 501
    assert served.stop() == 0
    assert served.process.stderr is not None
    records = [json.loads(line) for line in served.process.stderr.read().splitlines()]
    assert all({"time", "level", "logger", "message"} <= record.keys() for record in records)
    by_event = {record.get("event"): record for record in records}
    # One record per stored message: split per recipient, each under its own id.
    stored = [record for record in records if record.get("event") == "stored"]
    assert [record["recipients"] for record in stored] == [["c@d.example"], ["e@f.example"]]
    assert len({record["id"] for record in stored}) == 2
    for record in stored:
        assert record["sender"] == "a@b.example"
        assert record["client"].startswith("127.0.0.1:") and record["size"] > len(BODY)
        assert record["message"].startswith(f"stored: {record['id']} from=<a@b.example>")
    reject = by_event["reject"]
    assert (reject["command"], reject["code"], reject["enhanced"]) == ("VRFY", 501, "5.5.4")
    disconnect = by_event["disconnect"]
    assert disconnect["commands"]["vrfy"] == {"tried": 1, "refused": 1}
    # EHLO, MAIL, 2 RCPT, DATA, EHLO, VRFY, QUIT
    assert disconnect["commands"]["commands"] == {"tried": 8, "refused": 1}


TEXT_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) kumo_listener\S*: "
)


def test_serve_writes_text_lines_in_the_formatters_shape_from_the_core_too(serve):
    served = serve("--listen", "127.0.0.1:0", "--sink", "discard")
    with smtplib.SMTP(*served.address, timeout=10) as client:
        client.sendmail("a@b.example", ["c@d.example"], BODY)
    assert served.stop() == 0
    assert served.process.stderr is not None
    lines = served.process.stderr.read().splitlines()
    assert all(TEXT_LINE.match(line) for line in lines), lines
    assert any(" INFO kumo_listener: stored: " in line for line in lines), lines
    assert any(" INFO kumo_listener: disconnect from " in line for line in lines), lines


def test_a_policy_with_its_own_log_handler_still_gets_the_cores_records(serve, tmp_path):
    log_file = tmp_path / "policy.log"
    policy = tmp_path / "policy.py"
    policy.write_text(
        "import logging\n"
        f"handler = logging.FileHandler({str(log_file)!r})\n"
        "logging.getLogger('kumo_listener').addHandler(handler)\n"
    )
    served = serve("--listen", "127.0.0.1:0", "--sink", "discard", "--policy", str(policy))
    with smtplib.SMTP(*served.address, timeout=10) as client:
        client.sendmail("a@b.example", ["c@d.example"], BODY)
    assert served.stop() == 0
    assert "stored: " in log_file.read_text()


# --- hostile values: text lines read back to the same fields as the JSON record -------


def read_value(text: str, stops: str) -> tuple[str, str]:
    """One value of the text format (docs/operations/logs.md): a double-quoted
    string with ``\\"``, ``\\\\``, ``\\xNN`` and ``\\u{...}`` escapes, or bare up to
    a character of `stops`. Returns the value and the rest of the line."""
    if not text.startswith('"'):
        end = min((text.find(stop) for stop in stops if stop in text), default=len(text))
        return text[:end], text[end:]
    value, index = [], 1
    while text[index] != '"':
        char = text[index]
        if char != "\\":
            value.append(char)
            index += 1
        elif text[index + 1] == "x":
            value.append(chr(int(text[index + 2 : index + 4], 16)))
            index += 4
        elif text[index + 1] == "u":
            end = text.index("}", index)
            value.append(chr(int(text[index + 3 : end], 16)))
            index = end + 1
        else:
            value.append(text[index + 1])
            index += 2
    return "".join(value), text[index + 1 :]


def read_address(text: str) -> tuple[str, str]:
    """``<bare>`` or a quoted string."""
    if text.startswith("<"):
        value, rest = read_value(text[1:], ">")
        return value, rest[1:]
    assert text.startswith('"'), text
    return read_value(text, "")


def expect(text: str, prefix: str) -> str:
    assert text.startswith(prefix), (prefix, text)
    return text[len(prefix) :]


def read_line(message: str) -> dict:
    """The fields a text line gives, parsed as the documentation describes it."""
    if message.startswith("stored: "):
        record_id, rest = expect(message, "stored: ").split(" ", 1)
        sender, rest = read_address(expect(rest, "from="))
        rest = expect(rest, " to=")
        recipients = []
        while True:
            recipient, rest = read_address(rest)
            recipients.append(recipient)
            if not rest.startswith(","):
                break
            rest = rest[1:]
        size, rest = expect(rest, " size=").split(" ", 1)
        client, rest = expect(rest, "client=").split(" ", 1)
        return {
            "event": "stored",
            "id": record_id,
            "sender": sender,
            "recipients": recipients,
            "size": int(size),
            "client": client,
        }
    found = re.match(r"(reject:|timeout after|shutdown after|too many errors after) ", message)
    assert found, message
    event = {"reject:": "reject", "too many errors after": "too_many_errors"}.get(
        found.group(1), found.group(1).removesuffix(" after")
    )
    command, rest = message[found.end() :].split(" ", 1)
    client, rest = expect(rest, "from ").split(": ", 1)
    code, enhanced, rest = rest.split(" ", 2)
    text, rest = read_value(rest, ";")
    helo, rest = read_value(expect(rest, "; helo="), " ")
    assert rest == "", message
    return {
        "event": event,
        "command": command,
        "client": client,
        "code": int(code),
        "enhanced": enhanced,
        "text": text,
        "helo": helo,
    }


FORGED_SENDER = '"a> to=<victim@example.com> size=1 client=203.0.113.66:1 x"@b.example'
HOSTILE_HELO = 'h\u2028elo=x"<>\\\u202e;x'
HOSTILE_RECIPIENTS = [
    '"c d"@x.example',
    "r\u2028\u202e\u200b@\u4f8b\u3048.jp",
    "SRS0=ab=cd=x.example=u@fwd.example",
    '"a\\\\b\\"q"@x.example',
    '"refuse me; helo=x"@x.example',
]


def test_text_lines_read_back_to_their_json_fields_for_hostile_values(
    policy, listen, raw, kumo_log
):
    @policy.on("smtp_server_rcpt_to")
    def rcpt(recipient, meta):
        if recipient.user.startswith("refuse"):
            raise kumo.Reject(550, f'5.1.1 <{recipient}>: no; helo=forged "x" \\ \u2028\u202e')

    client = raw(listen(relay_hosts=["127.0.0.1"]))
    assert client.reply()[0] == 220
    client.ehlo(HOSTILE_HELO)
    assert client.command(f"MAIL FROM:<{FORGED_SENDER}> SMTPUTF8")[0] == 250
    codes = [client.command(f"RCPT TO:<{recipient}>")[0] for recipient in HOSTILE_RECIPIENTS]
    assert codes == [250, 250, 250, 250, 550]
    assert client.command("DATA")[0] == 354
    assert client.command(b"Subject: x\r\n\r\nbody\r\n.\r\n")[0] == 250
    assert client.command("QUIT")[0] == 221
    logged(kumo_log, "disconnect from")

    records = [r for r in kumo_log.records if re.match(r"(stored|reject):", r.getMessage())]
    assert len(records) == 5, [r.getMessage() for r in records]
    for record in records:
        line, fields = record.getMessage(), record.kumo
        for name, value in read_line(line).items():
            assert fields[name] == value, (name, line, fields)
        assert not any(char in line for char in "\u2028\u202e\u200b\r\n"), line
        # No regular expression finds a forged field.
        assert not re.search(
            r"\bto=<victim|client=203\.0\.113\.66|\bsize=1\b|helo=(forged|x)", line
        )


# --- why and after what a session ended ----------------------------------------------


def test_a_timeout_is_blamed_on_nothing_the_client_was_refused(listen, raw, kumo_log):
    client = raw(listen(relay_hosts=["127.0.0.1"], client_timeout=0.5))
    assert client.transaction()[0] == 250
    code, texts = client.reply()
    assert (code, texts) == (421, ["4.3.2 mx.test.example idle too long, closing connection"])
    port = client.sock.getsockname()[1]
    logged(
        kumo_log,
        rf"timeout after RCPT from 127\.0\.0\.1:{port}: 421 4\.3\.2 idle too long, closing"
        r" connection; helo=client\.example",
    )
    logged(
        kumo_log,
        rf"disconnect from 127\.0\.0\.1:{port} .* ehlo=1 mail=1 rcpt=1 commands=3 reason=timeout",
    )
    assert "reject: RCPT" not in kumo_log.text


@pytest.mark.parametrize("ending", ["timeout", "client-closed"])
def test_200000_rsets_are_counted_as_accepted_whatever_ends_the_session(
    listen, raw, kumo_log, ending
):
    client = raw(listen(client_timeout=1), timeout=60)
    client.hello()
    count = 200_000
    sender = threading.Thread(target=client.send, args=(b"RSET\r\n" * count,))
    sender.start()
    for _ in range(count):
        assert client.line() == b"250 2.0.0 OK"
    sender.join()
    port = client.sock.getsockname()[1]
    if ending == "timeout":
        assert client.reply()[0] == 421
        logged(kumo_log, rf"timeout after RSET from 127\.0\.0\.1:{port}: 421 ")
    else:
        client.close()
        logged(kumo_log, rf"lost connection after RSET from 127\.0\.0\.1:{port}; ")
    logged(
        kumo_log,
        rf"disconnect from 127\.0\.0\.1:{port} .* ehlo=1 rset=200000 commands=200001"
        rf" reason={ending}",
    )
    assert "reject: RSET" not in kumo_log.text


def test_a_client_gone_without_quit_is_lost_after_its_last_command(listen, raw, kumo_log):
    client = raw(listen())
    client.hello()
    assert client.command("MAIL FROM:<a@b.example>")[0] == 250
    port = client.sock.getsockname()[1]
    client.close()
    logged(kumo_log, rf"lost connection after MAIL from 127\.0\.0\.1:{port}; helo=client\.example")
    logged(
        kumo_log, rf"disconnect from 127\.0\.0\.1:{port} .* mail=1 commands=2 reason=client-closed"
    )


def test_sigterm_is_logged_as_shutdown_after_the_last_command(serve, raw):
    served = serve("--listen", "127.0.0.1:0", "--sink", "discard")
    client = raw(served.address)
    client.hello()
    assert client.command("MAIL FROM:<a@b.example>")[0] == 250
    port = client.sock.getsockname()[1]
    served.process.send_signal(signal.SIGTERM)
    assert client.reply()[0] == 421
    assert served.process.wait(timeout=30) == 0
    errors = served.errors()
    assert re.search(
        rf"INFO kumo_listener: shutdown after MAIL from 127\.0\.0\.1:{port}: 421 4\.3\.2 shutting"
        r" down; helo=client\.example",
        errors,
    ), errors
    assert re.search(
        rf"disconnect from 127\.0\.0\.1:{port} .* ehlo=1 mail=1 commands=2 reason=shutdown", errors
    ), errors
    assert "reject: MAIL" not in errors


def test_a_body_being_sent_at_sigterm_may_finish_within_the_grace(serve, raw, tmp_path):
    served = serve("--listen", "127.0.0.1:0")
    client = raw(served.address)
    client.open_data()
    client.send(b"Subject: grace\r\n\r\nfirst half\r\n")
    time.sleep(0.2)
    served.process.send_signal(signal.SIGTERM)
    # The listener closes at once, the session with its message goes on.
    wait_until(lambda: port_free(served.address[1]), what="the listening port closed")
    time.sleep(0.5)
    client.send(b"second half\r\n.\r\n")
    code, texts = client.reply()
    assert code == 250, texts
    code, texts = client.reply()
    assert code == 421 and texts[0].endswith(" shutting down"), texts
    assert served.process.wait(timeout=30) == 0
    [message] = delivered(tmp_path / "maildir")
    assert without_envelope(message).endswith(
        b"\r\nSubject: grace\r\n\r\nfirst half\r\nsecond half\r\n"
    )
    assert "reason=shutdown" in served.errors()


def test_a_policy_reject_with_451_is_info(kumo_log, policy, listen, smtp):
    @policy.on("smtp_server_mail_from")
    def mail(sender, meta):
        raise kumo.Reject(451, "4.7.1 greylisted, try again later")

    with smtp(listen()) as client:
        client.ehlo("client.example")
        assert client.mail("someone@b.example")[0] == 451
    logged(kumo_log, r"reject: MAIL .* 451 4\.7\.1 greylisted")
    [record] = [r for r in kumo_log.records if "reject: MAIL" in r.getMessage()]
    assert record.levelname == "INFO"
