"""Forwarding (``forward_to``) to real upstreams on loopback: a private
Postfix (SMTP), Dovecot (LMTP), Postfix's smtp-sink with its faults, a closed
port and a socket that never accepts; and Postfix as the client, through us
into Postfix. Every fault shows the client's reply, and that no ``250`` was
given for a message the upstream did not take."""

from __future__ import annotations

import re
import smtplib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import kumo_listener as kumo
import pytest
from peers import Dovecot, PrivatePostfix, SmtpSink, scratch_dir
from support import RawClient, delivered, free_port, logged, swaks, without_envelope

FAST = {"connect_timeout": 2, "command_timeout": 3, "data_timeout": 3, "backoff": 30}
MESSAGE = (
    b"From: a@b.example\r\nTo: x@d.example\r\nSubject: forwarded\r\n"
    b"Message-ID: <forwarded-1@b.example>\r\nDate: Sun, 06 Dec 2026 05:00:00 +0000\r\n\r\n"
    b"first line\r\n.a line that starts with a dot\r\n" + b"long " * 180 + b"\r\nlast\r\n"
)


@pytest.fixture
def forwarding(listen):
    """Start a listener forwarding to `upstreams`; its (host, port)."""

    def start(*upstreams: str, **params) -> tuple[str, int]:
        options = {**FAST, **params.pop("forward_options", {})}
        return listen(forward_to=list(upstreams), forward_options=options, **params)

    return start


@pytest.fixture
def upstream_postfix() -> Iterator[PrivatePostfix]:
    with scratch_dir("kumo-upstream-") as directory:
        postfix = PrivatePostfix.upstream(directory, free_port())
        try:
            yield postfix
        finally:
            postfix.stop()


def smtpd_url(postfix: PrivatePostfix) -> str:
    port = re.search(r"127\.0\.0\.1:(\d+) inet", (postfix.etc / "master.cf").read_text())
    assert port
    return f"smtp://127.0.0.1:{port[1]}"


def ask(client: RawClient, line: str) -> tuple[int, str]:
    code, texts = client.command(line)
    return code, texts[-1]


def answer(client: RawClient) -> tuple[int, str]:
    code, texts = client.reply()
    return code, texts[-1]


def body_of(stored: bytes) -> bytes:
    """What follows the trace headers Postfix and we added."""
    return stored[stored.index(b"From: a@b.example") :]


@pytest.mark.slow
def test_messages_reach_postfix_byte_for_byte_with_their_dsn_parameters(
    forwarding, upstream_postfix
):
    host, port = forwarding(smtpd_url(upstream_postfix), hostname="front.test")
    with smtplib.SMTP(host, port) as client:
        client.ehlo("client.test")
        refused = client.sendmail(
            "a@b.example",
            ["x@d.example", "y@d.example"],
            MESSAGE,
            mail_options=["RET=HDRS", "ENVID=env-1"],
            rcpt_options=["NOTIFY=SUCCESS", "ORCPT=rfc822;alias@d.example"],
        )
        assert refused == {}
    # Two deliveries, and the success DSNs Postfix sends back to a@b.example.
    stored = upstream_postfix.inbox(3)
    deliveries = [m for m in stored if b"multipart/report" not in m]
    assert len(deliveries) == 2
    for message in deliveries:
        assert body_of(message).replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n") == MESSAGE
        assert b"by front.test (kumo_listener)" in message or b"by front.test" in message
    notices = [m for m in stored if b"Original-Envelope-Id: env-1" in m]
    assert notices, "Postfix saw ENVID and NOTIFY=SUCCESS and sent the success notice"
    assert b"Original-Recipient: rfc822;alias@d.example" in notices[0]


@pytest.mark.slow
def test_postfixs_refusals_are_the_clients_replies(forwarding, upstream_postfix):
    host, port = forwarding(smtpd_url(upstream_postfix))
    client = RawClient((host, port))
    client.hello()
    assert ask(client, "MAIL FROM:<a@b.example>")[0] == 250
    code, text = ask(client, "RCPT TO:<reject@d.example>")
    assert code == 554 and "5.7.1" in text and "no such user here" in text, text
    code, text = ask(client, "RCPT TO:<tempfail@d.example>")
    assert (code, text) == (
        450,
        "4.2.0 <tempfail@d.example>: Recipient address rejected: try again later",
    )
    assert ask(client, "RCPT TO:<x@d.example>")[0] == 250
    assert ask(client, "DATA")[0] == 354
    client.send(MESSAGE + b".\r\n")
    code, text = answer(client)
    assert code == 250 and "queued as" in text, text
    assert len(upstream_postfix.inbox(1)) == 1


@pytest.mark.slow
def test_postfix_as_the_client_through_us_into_postfix(forwarding, upstream_postfix):
    host, port = forwarding(smtpd_url(upstream_postfix))
    with scratch_dir("kumo-client-") as directory:
        relay = f"smtp:[{host}]:{port}"
        client = PrivatePostfix(directory, {"default_transport": relay, "relay_transport": relay})
        try:
            client.send("a@b.example", ["x@d.example"], MESSAGE, "-N", "success", "-V", "env-2")
            assert client.statuses(["x@d.example"]) == {"x@d.example": "sent"}
        finally:
            client.stop()
    stored = upstream_postfix.inbox(2)
    assert any(b"Subject: forwarded" in message for message in stored)
    notices = [m for m in stored if b"Original-Envelope-Id: env-2" in m]
    assert notices, "NOTIFY and ENVID crossed both hops"


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    with scratch_dir("kumo-dovecot-") as directory:
        server = Dovecot(directory)
        try:
            yield server
        finally:
            server.stop()


@pytest.mark.slow
def test_dovecot_lmtp_a_refusal_after_the_data_is_kept_here(forwarding, dovecot, maildir):
    host, port = forwarding(dovecot.url)
    with smtplib.SMTP(host, port) as client:
        recipients = ["alice@d.example", "nosuch@d.example", "full@d.example"]
        refused = client.sendmail("a@b.example", recipients, MESSAGE)
    assert list(refused) == ["nosuch@d.example"] and refused["nosuch@d.example"][0] == 550
    assert len(dovecot.mailbox("alice")) == 1
    assert dovecot.mailbox("full") == []
    kept = delivered(maildir)
    assert len(kept) == 1 and b"Delivered-To: full@d.example" in kept[0]
    assert without_envelope(kept[0]).endswith(b"\r\nlast\r\n")


@pytest.mark.slow
def test_dovecot_lmtp_relays_each_recipients_reply_to_an_lmtp_client(forwarding, dovecot):
    host, port = forwarding(dovecot.url, protocol="lmtp")
    result = swaks(
        *("--protocol", "LMTP", "--server", f"{host}:{port}", "--from", "a@b.example"),
        *("--to", "alice@d.example,full@d.example,bob@d.example"),
        # Over full's quota of 1 KiB.
        *("--body", "x" * 900 + "\n" + "y" * 900),
    )
    after_data = result.stdout[result.stdout.index(" -> .") :]
    codes = re.findall(r"^<(?:-|\*\*) +(\d{3}) ", after_data, re.MULTILINE)
    assert codes[:3] == ["250", "552", "250"], result.stdout
    assert len(dovecot.mailbox("bob")) == 1


def send_raw(host: str, port: int, recipient: str = "x@d.example") -> tuple[int, int, str]:
    """MAIL, RCPT, DATA and a message: (RCPT code, final code, final text)."""
    client = RawClient((host, port))
    client.hello()
    assert ask(client, "MAIL FROM:<a@b.example>")[0] == 250
    rcpt, text = ask(client, f"RCPT TO:<{recipient}>")
    if rcpt != 250:
        return rcpt, rcpt, text
    assert ask(client, "DATA")[0] == 354
    client.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    code, text = answer(client)
    return rcpt, code, text


@pytest.fixture
def sink_with():
    started: list[SmtpSink] = []

    def start(*flags: str) -> SmtpSink:
        sink = SmtpSink(*flags)
        started.append(sink)
        return sink

    yield start
    for sink in started:
        sink.stop()


@pytest.mark.slow
def test_a_drop_after_the_dot_is_451_and_a_possible_duplicate(forwarding, sink_with, kumo_log):
    sink = sink_with("-q", ".")
    host, port = forwarding(sink.url)
    rcpt, code, text = send_raw(host, port)
    assert (rcpt, code) == (250, 451), text
    assert text.startswith("4.4.2 no reply from the upstream after the data")
    logged(
        kumo_log,
        r"possible duplicate: message \w+ from 127\.0\.0\.1:\d+: "
        r"smtp://127\.0\.0\.1:\d+ got the data",
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flags", "rcpt_code", "final_code"),
    [
        (("-r", "RCPT"), 450, 450),
        (("-f", "RCPT"), 500, 500),
        (("-f", "."), 250, 500),
        (("-r", "."), 250, 450),
    ],
)
def test_the_upstreams_refusals_reach_the_client(
    forwarding, sink_with, flags, rcpt_code, final_code
):
    sink = sink_with(*flags)
    host, port = forwarding(sink.url)
    rcpt, code, _ = send_raw(host, port)
    assert (rcpt, code) == (rcpt_code, final_code)


@pytest.mark.slow
def test_a_slow_upstream_times_out_into_451(forwarding, sink_with):
    sink = sink_with("-W", "rcpt:10")
    host, port = forwarding(sink.url, forward_options={"command_timeout": 1})
    started = time.monotonic()
    rcpt, _, text = send_raw(host, port)
    assert rcpt == 451, text
    assert time.monotonic() - started < 5


@pytest.mark.slow
def test_no_upstream_is_a_quick_451_closed_or_hung(forwarding):
    closed = free_port()
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(0)  # the handshake completes in the backlog; nobody ever greets
    try:
        for url in (f"smtp://127.0.0.1:{closed}", f"smtp://127.0.0.1:{hung.getsockname()[1]}"):
            host, port = forwarding(url, forward_options={"connect_timeout": 1})
            started = time.monotonic()
            rcpt, _, text = send_raw(host, port)
            assert (rcpt, text) == (451, "4.4.1 no upstream server available, try again later")
            assert time.monotonic() - started < 3
    finally:
        hung.close()


@pytest.mark.slow
def test_fail_over_to_the_next_upstream_and_its_metrics(forwarding, sink_with, server):
    sink = sink_with()
    closed = f"smtp://127.0.0.1:{free_port()}"
    host, port = forwarding(closed, sink.url)
    for _ in range(3):
        assert send_raw(host, port)[1] == 250
    families = {family.name: family for family in server.metrics_collector().collect()}
    forwarded = {
        s.labels["upstream"]: s.value for s in families["kumo_listener_forwarded_messages"].samples
    }
    assert forwarded[sink.url] == 3
    failures = {
        s.labels["upstream"]: s.value for s in families["kumo_listener_forward_failures"].samples
    }
    assert failures[closed] == 1, "skipped, not retried, during its back-off"


@pytest.mark.slow
def test_serve_forward_to(serve, sink_with, tmp_path: Path):
    sink = sink_with()
    served = serve("--forward-to", sink.url)
    assert f"mail goes to {sink.url}" in served.banner
    host, port = served.address
    assert send_raw(host, port)[1] == 250
    assert not (tmp_path / "maildir" / "new").exists() or not list(
        (tmp_path / "maildir" / "new").iterdir()
    )


def test_forward_to_errors_name_the_key_path(server):
    with pytest.raises(kumo.ParamsError, match=r"forward_to\[0\]: \"mx\.example\": expected"):
        server.start_esmtp_listener(listen="127.0.0.1:0", forward_to=["mx.example"])
    with pytest.raises(
        kumo.ParamsError, match=r"via\.'10\.0\.0\.1'\.forward_options\.tls: expected one of"
    ):
        server.start_esmtp_listener(
            listen="127.0.0.1:0", via={"10.0.0.1": {"forward_options": {"tls": "maybe"}}}
        )


def test_check_reports_forward_errors(tmp_path: Path):
    path = tmp_path / "params.toml"
    path.write_text('forward_to = ["http://x"]\n[forward_options]\npool_size = 0\n')
    result = subprocess.run(
        ["kumo-listener", "check", str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert "forward_to[0]" in result.stderr and "forward_options.pool_size" in result.stderr


@pytest.mark.slow
def test_routing_per_via_from_a_dynamic_result(policy, listen, sink_with):
    first, second = sink_with(), sink_with()

    @policy.on("smtp_server_get_dynamic_parameters")
    def dynamic(listener, conn_meta):
        return {
            "forward_options": FAST,
            "via": {
                "127.0.0.2": {"forward_to": [first.url]},
                "127.0.0.3": {"forward_to": [second.url]},
            },
        }

    seen = []
    policy.on(
        "smtp_server_message_received", lambda m, meta: seen.append(meta.get_meta("forwarded_to"))
    )
    _, port = listen(listen="0.0.0.0:0")
    for host in ("127.0.0.2", "127.0.0.3", "127.0.0.2"):
        assert send_raw(host, port)[1] == 250
    assert seen == [first.url, second.url, first.url]
