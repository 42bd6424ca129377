"""Durability: a ``kumo-listener serve`` process killed with SIGKILL under load
has every message it acknowledged, whole and once, in ``new/``, and nothing
partial there."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support import Served

SENDERS = 8
LOAD_SECONDS = 1.5
ROUNDS = 3
SUBJECT = re.compile(rb"^Subject: crash (\d+-\d+)\r\n", re.MULTILINE)


def message(ident: str) -> bytes:
    """A message whose size depends on its id (2 to 33 KiB) and whose last line names it."""
    number = sum(int(part) for part in ident.split("-"))
    lines = b"".join(
        f"{ident} line {n:05d} ".encode() + b"x" * 50 + b"\r\n" for n in range(30 + number % 400)
    )
    return (
        f"Subject: crash {ident}\r\nMessage-ID: <{ident}@crash.example>\r\n\r\n".encode()
        + lines
        + f"END-{ident}\r\n".encode()
    )


@dataclass
class Load:
    """What the senders did: ids acknowledged with 250, ids sent without an answer."""

    address: tuple[str, int]
    stop: threading.Event = field(default_factory=threading.Event)
    killed: threading.Event = field(default_factory=threading.Event)
    acked: set[str] = field(default_factory=set)
    attempted: set[str] = field(default_factory=set)
    cut_off: list[str] = field(default_factory=list)
    early_errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def sender(self, number: int) -> None:
        sequence = 0
        client = None
        try:
            client = smtplib.SMTP(*self.address, timeout=10)
            while not self.stop.is_set():
                ident = f"{number}-{sequence}"
                sequence += 1
                with self.lock:
                    self.attempted.add(ident)
                try:
                    refused = client.sendmail("a@b.example", ["c@d.example"], message(ident))
                except (smtplib.SMTPException, OSError) as error:
                    self.note_error(ident, error)
                    return
                assert refused == {}
                with self.lock:
                    self.acked.add(ident)
        except (smtplib.SMTPException, OSError) as error:
            self.note_error("(connect)", error)
        finally:
            if client is not None:
                client.close()

    def note_error(self, ident: str, error: Exception) -> None:
        with self.lock:
            if self.killed.is_set():
                self.cut_off.append(ident)
            else:
                self.early_errors.append(f"{ident}: {error!r}")


def kill_under_load(directory: Path) -> Load:
    served = Served(
        ["--listen", "127.0.0.1:0", "--maildir", str(directory / "maildir")],
        directory,
        log=directory / "server.log",
    )
    process, address = served.process, served.address
    load = Load(address)
    threads = [threading.Thread(target=load.sender, args=(n,)) for n in range(SENDERS)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(LOAD_SECONDS)
        load.killed.set()
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=10) == -signal.SIGKILL
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(timeout=20)
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not any(thread.is_alive() for thread in threads)
    return load


def check_maildir(maildir: Path, load: Load) -> tuple[int, int]:
    """Every file in new/ whole and expected, every acknowledged id there once.
    Returns the number of files in new/ and in tmp/."""
    found: Counter[str] = Counter()
    for path in (maildir / "new").iterdir():
        stored = path.read_bytes()
        subject = SUBJECT.search(stored)
        assert subject, f"{path.name}: no Subject (partial file?) {stored[:200]!r}"
        ident = subject.group(1).decode()
        assert ident in load.attempted, f"{path.name}: a message nobody sent: {ident}"
        original = message(ident)
        assert stored.endswith(f"END-{ident}\r\n".encode()), f"{path.name}: truncated"
        assert stored.endswith(original), f"{path.name}: differs from what was sent"
        trace = stored[: -len(original)]
        envelope = rb"Return-Path: <[^\r\n]*>\r\nDelivered-To: [^\r\n]+\r\nReceived: "
        assert re.match(envelope, trace) and b"\r\n\r\n" not in trace, trace
        assert len(stored) == len(trace) + len(original)
        found[ident] += 1
    duplicates = [ident for ident, count in found.items() if count > 1]
    assert not duplicates, f"delivered more than once: {duplicates}"
    missing = sorted(load.acked - set(found))
    assert not missing, f"acknowledged with 250 but not in new/: {missing}"
    return len(found), len(list((maildir / "tmp").iterdir()))


@pytest.mark.slow
def test_sigkill_under_load_loses_no_acknowledged_message_and_leaves_no_partial_one(
    tmp_path: Path,
):
    for round_number in range(ROUNDS):
        directory = tmp_path / f"round{round_number}"
        directory.mkdir()
        load = kill_under_load(directory)
        assert not load.early_errors, "senders failed before the kill"
        assert len(load.acked) >= 20, f"too little load to mean anything: {len(load.acked)}"
        # The kill hit senders in the middle of their work, not after it.
        assert load.cut_off, "no sender was cut off by the kill"
        in_new, in_tmp = check_maildir(directory / "maildir", load)
        unanswered = len(load.attempted - load.acked)
        print(
            f"\nround {round_number}: {len(load.acked)} acknowledged, {unanswered} unanswered, "
            f"{in_new} in new/ ({in_new - len(load.acked)} delivered but unacknowledged), "
            f"{in_tmp} left in tmp/"
        )
