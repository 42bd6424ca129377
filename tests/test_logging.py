"""The log lines an operator greps: one per refusal, one per stored message,
one per connection when it ends (as Postfix's smtpd writes them)."""

from __future__ import annotations

import json
import re
import smtplib

import kumo_listener as kumo
from support import logged

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
