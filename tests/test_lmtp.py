"""LMTP listeners (RFC 2033) over TCP and a Unix socket: raw dialogues,
swaks, and Postfix's ``lmtp`` delivery agent delivering to us."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import kumo_listener as kumo
import pytest
from peers import PrivatePostfix, scratch_dir
from support import RawClient, delivered, swaks, without_envelope

RECIPIENTS = ["x@d.example", "y@d.example", "z@e.example"]


def refuse_y(policy: kumo.Policy) -> None:
    """``smtp_server_message_received`` refuses the part for y@, only."""

    @policy.on("smtp_server_message_received")
    def received(message, meta):
        if any(recipient.user == "y" for recipient in message.recipients):
            raise kumo.Reject(550, "5.7.1 not for y")


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A directory for Unix sockets: short (a socket path has at most 107
    bytes) and open to Postfix's lmtp client, which runs as ``postfix``."""
    directory = Path(tempfile.mkdtemp(prefix="kumo-lmtp-", dir="/var/tmp"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def lhlo(client: RawClient) -> list[str]:
    code, lines = client.reply()
    assert code == 220 and " LMTP " in lines[0], lines
    code, lines = client.command("LHLO client.example")
    assert code == 250, lines
    return lines


def send_message(client: RawClient, recipients: list[str]) -> list[tuple[int, str]]:
    """A pipelined transaction: the replies to the data, one per accepted recipient."""
    commands = "MAIL FROM:<a@b.example>\r\n" + "".join(f"RCPT TO:<{r}>\r\n" for r in recipients)
    client.send(f"{commands}DATA\r\n".encode())
    assert client.reply()[0] == 250
    accepted = sum(client.reply()[0] == 250 for _ in recipients)
    assert client.reply()[0] == 354
    client.send(b"Subject: lmtp\r\n\r\nbody\r\n.\r\n")
    replies = client.replies(accepted)
    assert client.command("NOOP")[0] == 250, "no more replies than accepted recipients"
    return replies


def stored_recipients(maildir: Path) -> list[str]:
    found = []
    for stored in delivered(maildir):
        found += re.findall(rb"^Delivered-To: (\S+)\r$", stored, re.M)
    return sorted(name.decode() for name in found)


def assert_each_recipient_answered(replies: list[tuple[int, str]]) -> None:
    assert [code for code, _ in replies] == [250, 550, 250], replies
    assert replies[1][1] == "5.7.1 not for y"
    assert all(text.startswith("2.0.0 OK id=") for code, text in replies if code == 250), replies


# --- the parameters ----------------------------------------------------------------------


def test_protocol_is_checked_and_top_level_only(server):
    with pytest.raises(ValueError, match=r'protocol: expected one of "smtp", "lmtp"'):
        server.start_esmtp_listener(listen="127.0.0.1:0", protocol="LMTP")
    with pytest.raises(ValueError, match=r"peer.'10.0.0.0/8'.protocol: only allowed at the top"):
        server.start_esmtp_listener(listen="127.0.0.1:0", peer={"10.0.0.0/8": {"protocol": "lmtp"}})
    with pytest.raises(ValueError, match="nor a socket path"):
        server.start_esmtp_listener(listen="lmtp.sock")


# --- raw dialogues -----------------------------------------------------------------------


def test_tcp_each_recipient_gets_its_own_reply(policy, listen, raw, maildir):
    refuse_y(policy)
    client = raw(listen(protocol="lmtp"))
    assert "PIPELINING" in lhlo(client)
    assert_each_recipient_answered(send_message(client, RECIPIENTS))
    assert stored_recipients(maildir) == ["x@d.example", "z@e.example"]
    stored = without_envelope(delivered(maildir)[0])
    assert stored.startswith(b"Received: from client.example ([127.0.0.1])\r\n"), stored
    assert b" with LMTP id " in stored


def test_ehlo_is_refused_in_lmtp_and_lhlo_in_smtp(listen, raw):
    client = raw(listen(protocol="lmtp"))
    client.reply()
    assert client.command("EHLO client.example")[0] == 500
    assert client.command("HELO client.example")[0] == 500
    smtp = raw(listen())
    smtp.reply()
    assert smtp.command("LHLO client.example")[0] == 500


def test_a_sink_failure_answers_each_recipient_451(policy, listen, raw, maildir):
    refuse_y(policy)
    client = raw(listen(protocol="lmtp"))
    lhlo(client)
    shutil.rmtree(maildir)
    replies = send_message(client, RECIPIENTS)
    assert [code for code, _ in replies] == [451, 550, 451], replies
    assert replies[0][1].startswith("4.3.0 ")


def test_unix_socket_each_recipient_and_local_client(policy, server, raw, maildir, socket_dir):
    refuse_y(policy)
    seen = []

    @policy.on("smtp_server_mail_from")
    def mail(sender, meta):
        seen.append((meta.get_meta("received_from"), meta.get_meta("received_via")))

    policy.on("get_listener_domain", lambda domain, listener, meta: {"relay_to": True})
    path = str(socket_dir / "lmtp.sock")
    # One connection per client address, with 127.0.0.1 not among the
    # relay_hosts (which are exempt): a Unix socket client is not counted.
    limits = {"max_connections_per_client": 1, "relay_hosts": ["10.0.0.0/8"]}
    listener = server.start_esmtp_listener(listen=path, protocol="lmtp", hostname="mx", **limits)
    assert listener.address == path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666
    first, second = raw(path), raw(path)
    lhlo(first)
    lhlo(second)
    assert_each_recipient_answered(send_message(first, RECIPIENTS))
    assert stored_recipients(maildir) == ["x@d.example", "z@e.example"]
    assert seen[0] == ("127.0.0.1:0", "127.0.0.1:0")
    stored = without_envelope(delivered(maildir)[0])
    assert stored.startswith(b"Received: from client.example ([127.0.0.1])\r\n"), stored


def test_unix_socket_file_replaces_a_stale_socket_and_is_removed_at_stop(policy, socket_dir):
    path = socket_dir / "lmtp.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    with kumo.Server(policy=policy, sink="discard", shutdown_grace=5) as running:
        running.start_esmtp_listener(listen=str(path), protocol="lmtp")
        with pytest.raises(OSError, match="a server is listening on it"):
            running.start_esmtp_listener(listen=str(path))
        client = RawClient(str(path))
        assert client.reply()[0] == 220
        client.close()
    assert not path.exists()
    path.write_text("not a socket")
    with (
        kumo.Server(policy=policy, sink="discard", shutdown_grace=5) as running,
        pytest.raises(OSError, match="exists and is not a socket"),
    ):
        running.start_esmtp_listener(listen=str(path))
    assert path.read_text() == "not a socket"


def test_workers_cannot_share_a_unix_socket(socket_dir):
    path = socket_dir / "w.sock"
    command = ["kumo-listener", "serve", "--workers", "2", "--listen", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Unix socket cannot be shared" in result.stderr, result
    with (
        kumo.Server(sink="discard", reuse_port=True) as running,
        pytest.raises(OSError, match="cannot be shared by worker processes"),
    ):
        running.start_esmtp_listener(listen=str(path))


def test_serve_listens_on_a_unix_socket(serve, socket_dir):
    path = socket_dir / "serve.sock"
    served = serve("--listen", str(path))
    client = RawClient(str(path))
    code, lines = client.reply()
    assert code == 220 and " ESMTP " in lines[0], lines
    assert client.command("EHLO client.example")[0] == 250
    client.close()
    assert served.stop() == 0
    assert not path.exists()


# --- swaks ---------------------------------------------------------------------------------


def swaks_lmtp(*where: str) -> subprocess.CompletedProcess[str]:
    command = ["--protocol", "LMTP", *where, "--helo", "swaks.example"]
    command += ["--from", "sender@b.example", "--to", ",".join(RECIPIENTS), "--body", "via swaks"]
    return swaks(*command, timeout=60)


def assert_swaks_answered_each(result: subprocess.CompletedProcess[str], maildir: Path) -> None:
    # swaks shows `<-` for a good reply, `<**` for a refusal.
    after_data = result.stdout.split("\n -> .\n", 1)[1]
    replies = re.findall(r"^<(?:-|\*\*) +(\d{3} [\d.]+ .*)$", after_data, re.M)[:3]
    codes = [reply[:10] for reply in replies]
    assert codes == ["250 2.0.0 ", "550 5.7.1 ", "250 2.0.0 "], result.stdout
    assert replies[0] != replies[2], "each stored part has its own id"
    assert stored_recipients(maildir) == ["x@d.example", "z@e.example"]
    assert all(b" with LMTP id " in stored for stored in delivered(maildir))


def test_swaks_lmtp_over_tcp(policy, listen, maildir):
    refuse_y(policy)
    host, port = listen(protocol="lmtp")
    assert_swaks_answered_each(swaks_lmtp("--server", host, "--port", str(port)), maildir)


def test_swaks_lmtp_over_a_unix_socket(policy, listen, maildir, socket_dir):
    refuse_y(policy)
    path = listen(listen=str(socket_dir / "swaks.sock"), protocol="lmtp")
    assert_swaks_answered_each(swaks_lmtp("--socket", path), maildir)


# --- Postfix's lmtp client -----------------------------------------------------------------


@pytest.fixture
def postfix_dir() -> Iterator[Path]:
    with scratch_dir("kumo-postfix-") as directory:
        yield directory


@contextlib.contextmanager
def private_postfix(directory: Path, transport: str) -> Iterator[PrivatePostfix]:
    postfix = PrivatePostfix(
        directory, {"default_transport": transport, "relay_transport": transport}
    )
    try:
        yield postfix
    finally:
        postfix.stop()


MESSAGE = b"From: sender@b.example\nSubject: from postfix\n\nhello from Postfix's lmtp\n"


def deliver_through_postfix(postfix: PrivatePostfix, maildir: Path) -> None:
    # A null sender: the bounce of y@ goes nowhere, so only the two parts are stored.
    postfix.send("<>", RECIPIENTS, MESSAGE)
    statuses = postfix.statuses(RECIPIENTS)
    assert statuses == {"x@d.example": "sent", "y@d.example": "bounced", "z@e.example": "sent"}
    log = postfix.log.read_text(errors="replace")
    assert re.search(r"to=<y@d\.example>.*status=bounced .*550 5\.7\.1 not for y", log), log
    assert stored_recipients(maildir) == ["x@d.example", "z@e.example"]
    for stored in delivered(maildir):
        body = without_envelope(stored)
        assert body.startswith(b"Received: from postfix.test.example ([127.0.0.1])\r\n"), body
        assert b" with LMTP id " in body and body.endswith(b"\r\nhello from Postfix's lmtp\r\n")


@pytest.mark.slow
def test_postfix_lmtp_client_over_tcp(policy, listen, maildir, postfix_dir):
    refuse_y(policy)
    host, port = listen(protocol="lmtp")
    with private_postfix(postfix_dir, f"lmtp:inet:{host}:{port}") as postfix:
        deliver_through_postfix(postfix, maildir)


@pytest.mark.slow
def test_postfix_lmtp_client_over_a_unix_socket(policy, listen, maildir, postfix_dir):
    refuse_y(policy)
    path = listen(listen=str(postfix_dir / "lmtp.sock"), protocol="lmtp")
    with private_postfix(postfix_dir, f"lmtp:unix:{path}") as postfix:
        deliver_through_postfix(postfix, maildir)
