"""The memory budget: large bodies spill to files as they arrive, the
server's memory stays flat, envelopes count against the same budget, a full
spool disk refuses only the messages that need it (never a 250), load is shed
with 421 only when memory is used up, one client's spilled bytes are capped,
a body's time is bounded, and a kill -9 leaves only whole messages in new/."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import smtplib
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import kumo_listener as kumo
import pytest
from prometheus_client import CollectorRegistry
from support import RawClient, Served, rss_kib, run_kumo, wait_until, without_envelope

MiB = 1 << 20
CLIENTS = 60
BODY_LINE = b"x" * 998 + b"\r\n"


def open_transaction(address: tuple[str, int]) -> RawClient:
    """A client (patient: 60 s) whose next bytes are a message's body."""
    client = RawClient(address, timeout=60)
    client.open_data()
    return client


def big_body(ident: str, size: int) -> bytes:
    """About `size` bytes of message naming `ident` first and last."""
    lines = BODY_LINE * (size // len(BODY_LINE))
    return f"Subject: big {ident}\r\n\r\n".encode() + lines + f"END-{ident}\r\n".encode()


def spilled_bytes(tmp: Path) -> int:
    total = 0
    for path in tmp.glob("*.body"):
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_size
    return total


def test_sixty_clients_holding_8_mb_bodies_grow_the_server_by_less_than_128_mib(serve, tmp_path):
    maildir = tmp_path / "maildir"
    served = serve("--listen", "127.0.0.1:0", "--maildir", str(maildir))
    # Warm up: the first message's allocations are not the bodies'.
    with smtplib.SMTP(*served.address, timeout=30) as client:
        client.sendmail("a@b.example", ["c@d.example"], big_body("warm", 300_000))
    (next((maildir / "new").iterdir())).unlink()
    before = rss_kib(served.process.pid) * 1024
    bodies = [big_body(str(n), 8_000_000) for n in range(CLIENTS)]
    clients = [open_transaction(served.address) for _ in range(CLIENTS)]
    senders = [
        threading.Thread(target=client.send, args=(body,))
        for client, body in zip(clients, bodies, strict=True)
    ]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    # Every byte sent is in a spill file before the dot (the server read it all).
    expected = sum(len(body) for body in bodies)
    wait_until(
        lambda: spilled_bytes(maildir / "tmp") >= expected,
        within=120,
        what="the bodies to reach tmp/",
    )
    growth = rss_kib(served.process.pid) * 1024 - before
    inodes = {path.stat().st_ino for path in (maildir / "tmp").glob("*.body")}
    assert len(inodes) == CLIENTS
    for client in clients:
        client.send(b".\r\n")
    replies = [client.reply() for client in clients]
    assert [code for code, _ in replies] == [250] * CLIENTS, replies
    stored = {path.stat().st_ino: path.read_bytes() for path in (maildir / "new").iterdir()}
    assert sorted(
        without_envelope(text).split(b"\r\n", 4)[4] for text in stored.values()
    ) == sorted(bodies), "every message whole, after its Received header"
    assert set(stored) == inodes, "each spilled file was renamed into new/, not copied"
    assert list((maildir / "tmp").iterdir()) == []
    print(f"\nRSS growth with {CLIENTS} x 8 MB held before the dot: {growth / MiB:.1f} MiB")
    assert growth < 128 * MiB


POLICY = """
import kumo_listener as kumo

@kumo.on("init")
def init():
    kumo.start_esmtp_listener(listen="127.0.0.1:0", hostname="mx.test.example", {params})
"""


def serve_policy(serve, tmp_path: Path, params: str) -> Served:
    policy = tmp_path / "policy.py"
    policy.write_text(POLICY.format(params=params))
    return serve("--policy", str(policy), "--maildir", str(tmp_path / "maildir"))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs for the spool, mounted for the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "spool"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk: Path) -> Path:
    """Write a file until the file system is full."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as out:
        for chunk in (MiB, 4096):
            with contextlib.suppress(OSError):
                while True:
                    out.write(b"\0" * chunk)
    return filler


def test_a_full_spool_disk_refuses_only_what_needs_it_and_never_250(serve, tmp_path, small_disk):
    params = (
        f'body_spool_path="{small_disk}", max_message_size="4 MiB", body_spill_threshold="64 KiB"'
    )
    served = serve_policy(serve, tmp_path, params)
    new = tmp_path / "maildir" / "new"
    client = open_transaction(served.address)
    filler = fill(small_disk)
    client.send(big_body("lost", 2 * MiB) + b".\r\n")
    assert client.reply() == (452, ["4.3.1 insufficient system storage"])
    assert list(small_disk.glob("*.body")) == [], "the partial body is removed"
    # The session carries on: a message announced too large for memory is
    # refused at MAIL, one that fits in memory is taken.
    assert client.command("RSET")[0] == 250
    code, texts = client.command(f"MAIL FROM:<a@b.example> SIZE={2 * MiB}")
    assert (code, texts) == (452, ["4.3.1 insufficient system storage"])
    assert client.command("MAIL FROM:<a@b.example> SIZE=1000")[0] == 250
    assert client.command("RSET")[0] == 250
    # New sessions are not shed, and their small messages get through.
    fresh = open_transaction(served.address)
    fresh.send(b"Subject: small\r\n\r\nhi\r\n.\r\n")
    assert fresh.reply()[0] == 250
    assert len(list(new.iterdir())) == 1
    # With room again (measured at most a second later), large mail flows.
    filler.unlink()
    wait_until(
        lambda: client.command(f"MAIL FROM:<a@b.example> SIZE={2 * MiB}")[0] == 250,
        within=120,
        what="room on the spool",
        interval=0.05,
    )
    assert client.command("RCPT TO:<c@d.example>")[0] == 250
    assert client.command("DATA")[0] == 354
    body = big_body("kept", 2 * MiB)
    client.send(body + b".\r\n")
    assert client.reply()[0] == 250
    stored = [path.read_bytes() for path in new.iterdir()]
    assert sum(without_envelope(file).endswith(b"\r\n" + body) for file in stored) == 1
    assert served.process.poll() is None


def test_a_spool_disk_filling_up_mid_body_gets_452_and_removes_the_part_written(
    serve, tmp_path, small_disk
):
    params = (
        f'body_spool_path="{small_disk}", max_message_size="4 MiB", body_spill_threshold="64 KiB"'
    )
    served = serve_policy(serve, tmp_path, params)
    client = open_transaction(served.address)
    client.send(big_body("half", MiB)[: MiB // 2])
    wait_until(lambda: spilled_bytes(small_disk) > 64 * 1024, within=120, what="the body to spill")
    filler = fill(small_disk)
    client.send(big_body("half", MiB)[MiB // 2 :] + b".\r\n")
    assert client.reply() == (452, ["4.3.1 insufficient system storage"])
    assert list(small_disk.glob("*.body")) == []
    filler.unlink()
    assert list((tmp_path / "maildir" / "new").iterdir()) == []


def test_sessions_past_the_body_memory_budget_are_shed_and_the_others_finish(serve, tmp_path):
    served = serve_policy(serve, tmp_path, 'body_memory_limit="512 KiB"')
    held = []
    shed = None
    for _ in range(200):
        client = RawClient(served.address, timeout=60)
        code, texts = client.reply()
        if code == 421:
            shed = texts
            break
        assert client.command("EHLO client.example")[0] == 250
        assert client.command("MAIL FROM:<a@b.example>")[0] == 250
        assert client.command("RCPT TO:<c@d.example>")[0] == 250
        assert client.command("DATA")[0] == 354
        client.send(b"Subject: held\r\n\r\n" + (b"y" * 78 + b"\r\n") * 25)
        held.append(client)
    assert shed == ["4.3.2 mx.test.example service busy, try again later"], len(held)
    assert held, "the first session was shed"
    for client in held:
        client.send(b".\r\n")
    assert [client.reply()[0] for client in held] == [250] * len(held)
    assert len(list((tmp_path / "maildir" / "new").iterdir())) == len(held)

    def accepted() -> bool:
        client = RawClient(served.address)
        try:
            return client.reply()[0] == 220
        finally:
            client.close()

    wait_until(accepted, within=120, what="the budget to be given back")


# RFC 5321's longest path: `<` + 64 + `@` + 189 + `>` = 256 octets.
LONGEST_DOMAIN = ".".join(["d" * 63, "d" * 63, "d" * 61])


def longest_recipient(n: int) -> str:
    return f"RCPT TO:<{n:064d}@{LONGEST_DOMAIN}>"


CRLF = b"\r\n"


def pipeline(client: RawClient, commands: list[str]) -> list[int]:
    """Send `commands` in one write; the code of each (one-line) reply, up to
    the server's closing the connection."""
    client.send("".join(f"{command}\r\n" for command in commands).encode())
    received = client.buffer
    while received.count(b"\r\n") < len(commands):
        try:
            chunk = client.sock.recv(1 << 20)
        except TimeoutError:
            raise AssertionError(f"{received.count(CRLF)} {received[-300:]!r}") from None
        if not chunk:
            break
        received += chunk
    lines = received.split(b"\r\n")
    replies = min(len(commands), len(lines) - 1)
    client.buffer = b"\r\n".join(lines[replies:])
    return [int(line[:3]) for line in lines[:replies]]


SESSIONS = 200
RECIPIENTS = 1024
ENVELOPE_BUDGET = 16 * MiB


def test_recipient_floods_are_held_to_rfc_5321_and_to_the_memory_budget(tmp_path):
    """Issue 17's attack: 200 sessions x 1,024 recipients of 986 octets took the
    server from 29 to 254 MiB. They are refused now; and recipients of the
    longest legal path are held by `body_memory_limit`."""
    policy = tmp_path / "policy.py"
    policy.write_text(POLICY.format(params=f'body_memory_limit="{ENVELOPE_BUDGET}"'))
    # A log line per refused recipient: to a file, which never fills up as a pipe would.
    args = ["--policy", str(policy), "--maildir", str(tmp_path / "maildir")]
    served = Served(args, tmp_path, log=tmp_path / "server.log")
    try:
        envelopes_within_their_budget(served)
    finally:
        served.process.kill()
        served.process.wait()


def envelopes_within_their_budget(served: Served) -> None:
    pid = served.process.pid
    # Warm up: the first transaction's allocations are not the envelopes'.
    warm = RawClient(served.address, timeout=60)
    warm.hello()
    assert pipeline(warm, ["MAIL FROM:<a@b.example>", *map(longest_recipient, range(100))])
    warm.command("QUIT")
    start = rss_kib(pid) * 1024
    clients = []
    for _ in range(SESSIONS):
        client = RawClient(served.address, timeout=60)
        client.hello()
        clients.append(client)
    opened = rss_kib(pid) * 1024
    # The recipients: 986 octets, refused; 20 refusals end the session.
    over_long = f"RCPT TO:<{'a' * 64}.{'b' * 894}@{'c' * 16}.example>"
    assert len(over_long) - len("RCPT TO:") == 986
    codes = pipeline(clients[0], ["MAIL FROM:<a@b.example>", *[over_long] * 19])
    assert codes == [250] + [501] * 19
    code, texts = clients[0].command(over_long)
    assert (code, texts[0][:5]) == (501, "5.1.3"), texts
    assert clients[0].reply() == (421, ["4.7.0 mx.test.example too many errors"])
    # The longest legal ones: accepted while the budget has room, 452 after.
    accepted = 0
    for client in clients[1:]:
        commands = ["MAIL FROM:<a@b.example>", *map(longest_recipient, range(RECIPIENTS))]
        codes = pipeline(client, commands)
        if codes[0] == 250:
            assert set(codes[1:]) <= {250, 452}, sorted(set(codes))
            accepted += codes.count(250) - 1
        else:
            # No room for a sender either: the recipients are out of sequence.
            assert codes == [452] + [503] * 20 + [421], codes
    grown = rss_kib(pid) * 1024
    refused = (len(clients) - 1) * RECIPIENTS - accepted
    assert accepted > ENVELOPE_BUDGET // 1024, accepted
    assert refused > 0
    growth = grown - opened
    print(
        f"\nRSS: {start / MiB:.1f} MiB, {opened / MiB:.1f} with {SESSIONS} sessions, "
        f"{grown / MiB:.1f} with {accepted} recipients held ({refused} refused with 452)"
    )
    # The envelopes stay within their budget, give or take what the charge
    # leaves out (a recipient list's spare capacity, allocator pages): 254 MiB
    # before the budget counted them.
    assert growth < ENVELOPE_BUDGET * 1.25, f"{growth / MiB:.1f} MiB"
    for client in clients:
        client.close()

    def accepted_again() -> bool:
        client = RawClient(served.address)
        try:
            return client.reply()[0] == 220
        finally:
            client.close()

    wait_until(accepted_again, within=60, what="the budget to be given back")


RELAYING_POLICY = """
import kumo_listener as kumo

@kumo.on("init")
def init():
    kumo.start_esmtp_listener(listen="127.0.0.1:0", hostname="mx.test.example", {params})

@kumo.on("get_listener_domain")
def domain(domain, listener, meta):
    return {{"relay_to": True}}
"""

STALLED = int(3.5 * MiB)


def test_stalled_bodies_on_a_full_spool_refuse_only_what_needs_the_spool(
    serve, tmp_path, small_disk
):
    """Issue 17's attack: three sessions hold 3.5 MiB bodies on a 16 MiB
    spool, stop before the dot and trickle. New clients are still served."""
    duration = 10
    params = (
        f'body_spool_path="{small_disk}", max_message_size="4 MiB", '
        f'body_spill_threshold="64 KiB", max_spilled_bytes_per_client="8 MiB", '
        f'max_data_duration="{duration}s"'
    )
    policy = tmp_path / "policy.py"
    policy.write_text(RELAYING_POLICY.format(params=params))
    served = serve("--policy", str(policy), "--maildir", str(tmp_path / "maildir"))
    new = tmp_path / "maildir" / "new"
    # Two from one address, one from another (127.0.0.1 would be exempt: relay_hosts).
    began = time.monotonic()
    stallers = []
    for source in ["127.0.0.50", "127.0.0.50", "127.0.0.51"]:
        client = RawClient(served.address, source=source, timeout=60)
        client.open_data()
        client.send(big_body(source, STALLED))
        stallers.append(client)
    wait_until(
        lambda: spilled_bytes(small_disk) >= 3 * STALLED,
        within=60,
        what="the stalled bodies to reach the spool",
    )
    # A fresh client: its small message is taken (before, 421 for everyone).
    fresh = RawClient(served.address, source="127.0.0.52", timeout=60)
    fresh.open_data()
    fresh.send(b"Subject: small\r\n\r\nstill delivered\r\n.\r\n")
    assert fresh.reply()[0] == 250
    assert len(list(new.iterdir())) == 1
    # A message announced too large for memory, with no room for it: 452 at MAIL.
    assert fresh.command(f"MAIL FROM:<a@b.example> SIZE={4 * MiB}") == (
        452,
        ["4.3.1 insufficient system storage"],
    )
    # The stallers' address has 7 MiB spilled: 2 MiB more would pass its 8 MiB.
    same = RawClient(served.address, source="127.0.0.50", timeout=60)
    refused = (452, ["4.7.0 too much mail from your address is waiting here, try again later"])
    assert same.transaction()[0] == 250
    assert same.command("DATA")[0] == 354
    same.send(big_body("capped", 2 * MiB) + b".\r\n")
    assert same.reply() == refused
    assert same.command(f"MAIL FROM:<a@b.example> SIZE={2 * MiB}") == refused
    assert time.monotonic() - began < duration, "the checks took longer than the duration bound"
    # The stallers trickle a byte every half second: cut off at max_data_duration.
    while time.monotonic() - began < duration + 10 and not all(
        client.readable(0) for client in stallers
    ):
        for client in stallers:
            if not client.readable(0):
                client.send(b"x")
        time.sleep(0.5)
    for client in stallers:
        assert client.reply() == (421, ["4.4.2 mx.test.example data timeout, closing connection"])
        assert client.until_closed() == b""
    took = time.monotonic() - began
    assert duration < took < duration + 5, took
    assert list(small_disk.glob("*.body")) == [], "their spill files are removed"
    # The spool has room again: a large message is taken.
    wait_until(
        lambda: fresh.command(f"MAIL FROM:<a@b.example> SIZE={3 * MiB}")[0] == 250,
        within=30,
        what="room on the spool",
        interval=0.2,
    )
    assert fresh.command("RCPT TO:<c@d.example>")[0] == 250
    assert fresh.command("DATA")[0] == 354
    fresh.send(big_body("large", 3 * MiB) + b".\r\n")
    assert fresh.reply()[0] == 250
    assert len(list(new.iterdir())) == 2


HANDLERS = """
import hashlib
import kumo_listener as kumo

@kumo.on("init")
def init():
    kumo.start_esmtp_listener(listen="127.0.0.1:0", body_spill_threshold="64 KiB")

@kumo.on("smtp_server_message_received")
def received(message, conn_meta):
    data = message.data
    with message.open() as body:
        head = body.read(9)
        rest = body.read()
        body.seek(0)
        again = body.read()
    if not head + rest == data == again:
        raise kumo.Reject(550, "data and open() differ")
    with open("digests", "a") as out:
        out.write(hashlib.sha256(data).hexdigest() + "\\n")
"""


@pytest.mark.parametrize("recipients", [1, 3])
@pytest.mark.parametrize("size", [1000, 3 * MiB])
def test_handlers_read_the_body_as_bytes_or_a_file_alike(serve, tmp_path, recipients, size):
    """`Message.data` and `Message.open()` give the same bytes, trace headers
    first, for a body in memory or spilled, shared by split parts or not."""
    (tmp_path / "policy.py").write_text(HANDLERS)
    served = serve("--policy", str(tmp_path / "policy.py"), "--maildir", str(tmp_path / "maildir"))
    text = big_body("api", size)
    with smtplib.SMTP(*served.address, timeout=60) as client:
        client.sendmail("a@b.example", [f"r{n}@d.example" for n in range(recipients)], text)
    stored = [path.read_bytes() for path in (tmp_path / "maildir" / "new").iterdir()]
    assert len(stored) == recipients
    assert all(file.endswith(text) for file in stored)
    seen = sorted((tmp_path / "digests").read_text().split())
    assert seen == sorted(hashlib.sha256(without_envelope(file)).hexdigest() for file in stored)


MESSAGES_SENDERS = 6


def crash_message(ident: str) -> bytes:
    """300 KB to 1.3 MB (spilled with the default threshold), its last line naming it."""
    number = sum(int(part) for part in ident.split("-"))
    return big_body(ident, 300_000 + (number * 97_003) % 1_000_000)


def test_kill_9_during_delivery_of_spilled_bodies_leaves_only_whole_messages(tmp_path):
    maildir = tmp_path / "maildir"
    served = Served(
        ["--listen", "127.0.0.1:0", "--maildir", str(maildir)],
        tmp_path,
        log=tmp_path / "server.log",
    )
    process, address = served.process, served.address
    acked: set[str] = set()
    errors: list[str] = []
    stop = threading.Event()
    killed = threading.Event()
    lock = threading.Lock()

    def sender(number: int) -> None:
        try:
            with smtplib.SMTP(*address, timeout=30) as client:
                for sequence in range(10_000):
                    if stop.is_set():
                        return
                    ident = f"{number}-{sequence}"
                    client.sendmail("a@b.example", ["c@d.example"], crash_message(ident))
                    with lock:
                        acked.add(ident)
        except (smtplib.SMTPException, OSError) as error:
            if not killed.is_set():
                errors.append(repr(error))

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(MESSAGES_SENDERS)]
    for thread in threads:
        thread.start()
    try:
        wait_until(
            lambda: len(acked) >= 3 * MESSAGES_SENDERS,
            within=120,
            what="some messages to be stored",
        )
        killed.set()
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=10) == -signal.SIGKILL
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        if process.poll() is None:
            process.kill()
    assert not errors, errors
    found_ids = []
    for path in (maildir / "new").iterdir():
        stored = path.read_bytes()
        subject = re.search(rb"^Subject: big (\d+-\d+)\r\n", stored, re.MULTILINE)
        assert subject, f"{path.name}: no Subject (partial file?)"
        ident = subject.group(1).decode()
        assert without_envelope(stored).endswith(b"\r\n" + crash_message(ident)), (
            f"{path.name}: not whole"
        )
        found_ids.append(ident)
    assert len(found_ids) == len(set(found_ids))
    missing = acked - set(found_ids)
    assert not missing, f"acknowledged with 250 but not in new/: {sorted(missing)}"
    # Only bodies being received or delivered can be left, in tmp/.
    assert all(path.suffix == ".body" for path in (maildir / "tmp").iterdir())


def test_a_spool_path_that_cannot_be_made_is_an_error_at_start(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    policy = tmp_path / "policy.py"
    policy.write_text(POLICY.format(params=f'body_spool_path="{blocker}/spool"'))
    maildir = tmp_path / "maildir"
    result = run_kumo("serve", "--policy", str(policy), "--maildir", str(maildir), cwd=tmp_path)
    assert result.returncode != 0
    assert "body_spool_path" in result.stderr, result.stderr


def test_the_gauges_show_bodies_in_memory_and_spilled(tmp_path):
    registry = CollectorRegistry()
    with kumo.Server(policy=kumo.Policy(), maildir=tmp_path / "maildir") as server:
        registry.register(server.metrics_collector())
        address = server.start_esmtp_listener(listen="127.0.0.1:0").address
        listener = {"listener": "127.0.0.1:0"}

        def gauge(name: str) -> float:
            value = registry.get_sample_value(f"kumo_listener_body_{name}_bytes", listener)
            assert value is not None
            return value

        small, big = open_transaction(address), open_transaction(address)
        small.send(b"Subject: small\r\n\r\nhi\r\n")
        big.send(big_body("gauge", 2 * MiB))
        wait_until(lambda: gauge("spilled") >= 2 * MiB, within=120, what="the big body to spill")
        assert gauge("memory") > 0, "the small body is in memory"
        for client in (small, big):
            client.send(b".\r\n")
            assert client.reply()[0] == 250
        wait_until(
            lambda: gauge("memory") == gauge("spilled") == 0,
            within=120,
            what="the bodies to be let go",
        )
