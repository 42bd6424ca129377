"""CHUNKING (RFC 3030): BDAT from a real client, Exim, and the error paths
over raw sockets (smtplib cannot send BDAT)."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import kumo_listener as kumo
import pytest
from support import RssWatch, delivered, logged, wait_until, without_envelope

EXIM = Path("/usr/sbin/exim4")
INSTALL_EXIM = Path(__file__).resolve().parent.parent / "tools" / "exim.sh"


def bdat(data: bytes, last: bool = False) -> bytes:
    return f"BDAT {len(data)}{' LAST' if last else ''}\r\n".encode() + data


def stored_bodies(maildir: Path) -> list[bytes]:
    """Each stored message after our own `Received:` header (its first
    header, ending at the first line that is not folded)."""
    bodies = []
    for stored in delivered(maildir):
        message = without_envelope(stored)
        assert message.startswith(b"Received: from "), message[:200]
        bodies.append(re.sub(rb"\AReceived: [^\r]*\r\n(?:\t[^\r]*\r\n)*", b"", message, count=1))
    return bodies


@pytest.fixture
def address(listen) -> tuple[str, int]:
    return listen(relay_hosts=["127.0.0.1"], max_message_size=1000)


def test_ehlo_offers_chunking_and_binarymime(address, raw):
    lines = raw(address).hello()
    assert "CHUNKING" in lines and "BINARYMIME" in lines


def test_pipelined_chunks_are_data_not_commands(address, raw, maildir):
    client = raw(address)
    client.hello()
    first = b"Subject: pipelined\r\n\r\nRSET\r\n.\r\nMAIL FROM:<evil@x.example>\r\n"
    second = b"..\r\nQUIT\r\n"
    client.send(
        b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@d.example>\r\n"
        + bdat(first)
        + bdat(second, last=True)
        + b"NOOP\r\n"
    )
    got = client.replies(5)
    assert got[:3] == [
        (250, "2.1.0 OK"),
        (250, "2.1.5 OK"),
        (250, f"2.0.0 {len(first)} octets received"),
    ]
    assert got[3][0] == 250 and got[3][1].startswith("2.0.0 OK ids=")
    assert got[4] == (250, "2.0.0 OK")
    assert stored_bodies(maildir) == [first + second]


def test_binarymime_is_stored_byte_exact(address, raw, maildir):
    client = raw(address)
    client.hello()
    body = bytes(range(256)) + b"\r\r\n\n.\r\n"
    client.send(b"MAIL FROM:<a@b.example> BODY=BINARYMIME\r\nRCPT TO:<x@d.example>\r\nDATA\r\n")
    assert client.replies(3)[2] == (503, "5.5.1 BODY=BINARYMIME needs BDAT, not DATA")
    client.send(bdat(body[:100]) + bdat(body[100:], last=True))
    assert [code for code, _ in client.replies(2)] == [250, 250]
    assert stored_bodies(maildir) == [body]


def test_a_chunk_cut_short_by_a_closed_socket_stores_nothing(address, raw, maildir, kumo_log):
    client = raw(address)
    client.hello()
    client.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@d.example>\r\nBDAT 500 LAST\r\nonly part")
    assert [code for code, _ in client.replies(2)] == [250, 250]
    client.close()

    # As Postfix counts it, the BDAT cut short did not succeed.
    logged(kumo_log, r"lost connection after BDAT from ", within=10)
    logged(kumo_log, r"disconnect from .* bdat=0/1 .* reason=client-closed", within=10)
    assert not (maildir / "new").exists() or delivered(maildir) == []
    # The server goes on serving.
    again = raw(address)
    again.hello()
    again.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@d.example>\r\n" + bdat(b"whole", last=True))
    assert again.replies(3)[2][0] == 250
    assert stored_bodies(maildir) == [b"whole"]


def test_a_message_over_max_message_size_is_refused_chunk_by_chunk(address, raw, maildir):
    client = raw(address)
    client.hello()
    assert client.command("MAIL FROM:<a@b.example> SIZE=1001")[1] == [
        "5.3.4 message size exceeds fixed maximum message size"
    ]
    client.send(
        b"MAIL FROM:<a@b.example> SIZE=900\r\nRCPT TO:<x@d.example>\r\n"
        + bdat(b"x" * 600)
        + bdat(b"y" * 600)
        + bdat(b"z" * 10, last=True)
        + b"MAIL FROM:<a@b.example>\r\n"
    )
    too_big = (552, "5.3.4 message size exceeds fixed maximum message size")
    assert client.replies(6) == [
        (250, "2.1.0 OK"),
        (250, "2.1.5 OK"),
        (250, "2.0.0 600 octets received"),
        too_big,
        too_big,
        (250, "2.1.0 OK"),
    ]
    assert not (maildir / "new").exists() or delivered(maildir) == []


def test_a_chunk_too_big_is_discarded_in_bounded_memory(address, raw, maildir):
    client = raw(address)
    client.hello()
    size = 100 * 1024 * 1024
    client.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@d.example>\r\n")
    assert [code for code, _ in client.replies(2)] == [250, 250]
    watch = RssWatch()
    client.send(f"BDAT {size} LAST\r\n".encode())
    piece = b"x" * (1024 * 1024)
    for _ in range(size // len(piece)):
        client.send(piece)
        watch.sample()
    assert client.replies(1) == [(552, "5.3.4 message size exceeds fixed maximum message size")]
    assert watch.growth_mib() < 30, f"{watch.growth_mib():.1f} MiB for a {size >> 20} MiB chunk"
    assert client.command("MAIL FROM:<a@b.example>")[0] == 250, "LAST ended the transaction"
    assert not (maildir / "new").exists() or delivered(maildir) == []


def test_a_bdat_without_a_number_ends_the_session(address, raw):
    client = raw(address)
    client.hello()
    client.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@d.example>\r\nBDAT ten LAST\r\nQUIT\r\n")
    assert client.replies(3)[2] == (521, "5.5.4 mx.test.example syntax: BDAT size [LAST]")
    assert client.until_closed() == b""


def test_data_after_bdat_and_bdat_without_a_transaction(address, raw):
    client = raw(address)
    client.hello()
    client.send(bdat(b"MAIL FROM:<a@b.example>\r\n", last=True) + b"RSET\r\n")
    assert client.replies(2) == [(503, "5.5.1 need MAIL command first"), (250, "2.0.0 OK")]
    client.send(
        b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@d.example>\r\n" + bdat(b"abc") + b"DATA\r\n"
    )
    assert client.replies(4)[3] == (503, "5.5.1 DATA after BDAT, send RSET")


# --- Exim, a real client that sends BDAT whenever CHUNKING is offered -------


@pytest.fixture(scope="session")
def exim() -> Path:
    """Exim 4 from Debian's packages, unpacked by tools/exim.sh (idempotent),
    which needs root: failing, not skipping, where it can't run."""
    result = subprocess.run(
        ["bash", str(INSTALL_EXIM)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        pytest.fail(f"tools/exim.sh failed (it needs root and Debian's archive):\n{result.stderr}")
    return EXIM


class Exim:
    """Exim with its own spool and log under /var/tmp (traversable by its
    user Debian-exim), routing every address to one port."""

    def __init__(self, binary: Path, port: int) -> None:
        self.binary = binary
        self.root = Path(tempfile.mkdtemp(prefix="kumo-exim-", dir="/var/tmp"))
        self.root.chmod(0o755)
        for directory in ("spool", "log"):
            (self.root / directory).mkdir()
            shutil.chown(self.root / directory, "Debian-exim", "Debian-exim")
        self.config = self.root / "exim.conf"
        self.config.write_text(
            f"""exim_user = Debian-exim
exim_group = Debian-exim
spool_directory = {self.root}/spool
log_file_path = {self.root}/log/%slog
primary_hostname = client.test
dsn_advertise_hosts = *
acl_smtp_rcpt = accept_all
begin acl
accept_all:
  accept
begin routers
to_listener:
  driver = manualroute
  user = Debian-exim
  transport = remote
  route_list = * 127.0.0.1::{port}
  self = send
begin transports
remote:
  driver = smtp
  hosts_try_chunking = *
  hosts_avoid_tls = *
  allow_localhost
  port = {port}
begin retry
* * F,1m,1m
"""
        )

    def run(self, *args: str, stdin: bytes = b"") -> bytes:
        result = subprocess.run(
            [str(self.binary), "-C", str(self.config), *args],
            input=stdin,
            capture_output=True,
            timeout=120,
        )
        assert result.returncode == 0, (args, result.stderr)
        return result.stdout

    def mainlog(self) -> str:
        return (self.root / "log" / "mainlog").read_text()

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def exim_client(exim: Path, listen) -> Iterator[Exim]:
    _, port = listen(relay_hosts=["127.0.0.1"], max_message_size=10_000_000)
    client = Exim(exim, port)
    yield client
    client.remove()


def message(subject: str, body: bytes) -> bytes:
    """A whole message with LF line ends, as a local program hands it to
    Exim; every header Exim would otherwise add is there."""
    headers = (
        f"From: a@client.test\nTo: x@local.example\nSubject: {subject}\n"
        f"Date: Wed, 2 Dec 2026 03:00:00 +0000\nMessage-ID: <{subject}@client.test>\n\n"
    )
    return headers.encode() + body


def eight_bit_body() -> bytes:
    """Lines of every byte but NUL, CR and LF (some starting with a dot)."""
    generator = random.Random(3030)
    alphabet = bytes(b for b in range(1, 256) if b not in b"\r\n")
    lines = [
        bytes(generator.choice(alphabet) for _ in range(generator.randrange(0, 900)))
        for _ in range(200)
    ]
    return b"\n".join([b".", b"..dot", *lines]) + b"\n"


def test_exim_sends_by_bdat_and_every_message_is_stored_byte_exact(exim_client, maildir):
    big_line = b"0123456789abcdefghijklmnopqrstuvwxyz" * 2 + b"\n"
    sent = {
        "first": message("first", b"one\n"),
        "second": message("second", b"two\n.\n"),
        "third": message("third", b"three\n"),
        "eightbit": message("eightbit", eight_bit_body()),
        "big": message("big", big_line * (5 * 1024 * 1024 // len(big_line))),
    }
    # Exim 4.96 sends 8-bit bodies without BODY=8BITMIME (the string is not
    # in its binary), so the eightbit message comes as the others do.
    for whole in sent.values():
        exim_client.run("-odq", "-oi", "-f", "a@client.test", "x@local.example", stdin=whole)
    # One queue run delivers them all.
    exim_client.run("-qqff")

    def deliveries() -> list[str]:
        return [
            line for line in exim_client.mainlog().splitlines() if " => x@local.example" in line
        ]

    wait_until(
        lambda: len(deliveries()) == len(sent),
        within=60,
        what=lambda: f"every delivery in the mainlog:\n{exim_client.mainlog()}",
    )
    log = exim_client.mainlog()
    assert all(" K " in line for line in deliveries()), "every delivery used CHUNKING:\n" + log
    stored = {}
    for body in stored_bodies(maildir):
        # Exim's own Received: header comes first, then the message as given.
        found = re.match(rb"\AReceived: [^\r]*\r\n(?:\t[^\r]*\r\n)*", body)
        assert found, body[:300]
        rest = body[found.end() :]
        subject = re.search(rb"^Subject: (\w+)\r$", rest, re.MULTILINE)
        assert subject, rest[:300]
        stored[subject.group(1).decode()] = rest
    assert stored.keys() == sent.keys()
    for subject, whole in sent.items():
        assert stored[subject] == whole.replace(b"\n", b"\r\n"), subject
    assert len(stored["big"]) > 5_000_000


def test_exim_passes_dsn_parameters_over_bdat(exim_client, policy):
    seen: list = []

    @policy.on("smtp_server_message_received")
    def received(message: kumo.Message, meta: kumo.ConnectionMeta) -> None:
        seen.append((message.sender.params, [r.params for r in message.recipients]))

    # Exim forwards the DSN requests a message came with: here from SMTP on
    # its standard input (-bs), to which it advertises DSN.
    session = (
        b"EHLO local.client\r\n"
        b"MAIL FROM:<a@client.test> RET=HDRS ENVID=env+2B1\r\n"
        b"RCPT TO:<x@local.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@local.example\r\n"
        b"DATA\r\nSubject: dsn\r\n\r\nbody\r\n.\r\nQUIT\r\n"
    )
    output = exim_client.run("-odf", "-bs", stdin=session)
    assert b"250 OK id=" in output, output
    wait_until(lambda: seen, what=lambda: f"the message, mainlog:\n{exim_client.mainlog()}")
    (sender, recipients) = seen[0]
    assert {key: sender[key] for key in ("RET", "ENVID")} == {"RET": "HDRS", "ENVID": "env+1"}
    assert recipients == [{"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;x@local.example"}]
    assert " K " in next(line for line in exim_client.mainlog().splitlines() if "=>" in line)


def test_exim_installer_is_idempotent(exim):
    first = subprocess.run(["bash", str(INSTALL_EXIM)], capture_output=True, text=True, check=True)
    assert first.stdout.startswith("Exim version 4."), first.stdout
    assert os.path.realpath(EXIM).startswith("/var/tmp/kumo-exim/") or not EXIM.is_symlink()
