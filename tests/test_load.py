"""Many concurrent connections: 5,000 idle sessions held open by a
``kumo-listener serve`` process, what they cost, and a message on each; and
``max_connections`` enforced and released."""

from __future__ import annotations

import asyncio
import re
import resource
import smtplib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Served, delivered, rss_kib

CONNECTIONS = 5000
MAX_CONNECTIONS = 6000
# Generous: a leak of one read buffer (128 KiB) per connection must fail it.
MAX_KIB_PER_IDLE_CONNECTION = 64
OPEN_CONCURRENCY = 200
SEND_CONCURRENCY = 500


@pytest.fixture
def many_files() -> Iterator[None]:
    """Room for 5,000 sockets here and in the server (which inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 12_000:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < 12000")
    wanted = 65_536 if hard == resource.RLIM_INFINITY else min(hard, 65_536)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def served(tmp_path: Path, many_files: None) -> Iterator[tuple[subprocess.Popen, tuple[str, int]]]:
    policy = tmp_path / "policy.py"
    policy.write_text(
        "import kumo_listener as kumo\n\n"
        "@kumo.on('init')\n"
        "def init():\n"
        "    kumo.start_esmtp_listener(\n"
        f"        listen='127.0.0.1:0', max_connections={MAX_CONNECTIONS},\n"
        "        relay_hosts=['127.0.0.0/8'], hostname='mx.load.example',\n"
        "    )\n"
    )
    maildir = tmp_path / "maildir"
    served = Served(
        ["--policy", str(policy), "--maildir", str(maildir)], tmp_path, log=tmp_path / "server.log"
    )
    try:
        yield served.process, served.address
    finally:
        served.process.kill()
        served.process.wait()


async def reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    lines = []
    while True:
        line = (await asyncio.wait_for(reader.readline(), 60)).decode()
        assert len(line) >= 4 and line.endswith("\r\n"), repr(line)
        lines.append(line)
        if line[3] == " ":
            return int(line[:3]), "".join(lines)


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_idle(address: tuple[str, int], count: int) -> list[Connection]:
    """``count`` connections, each greeted (220), left open."""
    limit = asyncio.Semaphore(OPEN_CONCURRENCY)

    async def one() -> Connection:
        async with limit:
            reader, writer = await asyncio.open_connection(*address)
            code, text = await reply(reader)
            assert code == 220, text
            return reader, writer

    return await asyncio.gather(*(one() for _ in range(count)))


async def send_on_each(connections: list[Connection]) -> list[int]:
    """A whole transaction on every connection, at most SEND_CONCURRENCY at a
    time; the DATA reply of each."""
    limit = asyncio.Semaphore(SEND_CONCURRENCY)

    async def step(reader, writer, data: bytes, expected: int) -> int:
        writer.write(data)
        code, text = await reply(reader)
        assert code == expected, (data[:20], text)
        return code

    async def one(number: int, reader, writer) -> int:
        async with limit:
            await step(reader, writer, b"EHLO load.example\r\n", 250)
            await step(reader, writer, b"MAIL FROM:<a@load.example>\r\n", 250)
            await step(reader, writer, f"RCPT TO:<rcpt{number}@d.example>\r\n".encode(), 250)
            await step(reader, writer, b"DATA\r\n", 354)
            body = f"Subject: load {number}\r\n\r\nmessage {number}\r\n.\r\n".encode()
            code, _ = await reply_after(reader, writer, body)
            await step(reader, writer, b"QUIT\r\n", 221)
            writer.close()
            return code

    async def reply_after(reader, writer, data: bytes) -> tuple[int, str]:
        writer.write(data)
        return await reply(reader)

    return await asyncio.gather(*(one(n, r, w) for n, (r, w) in enumerate(connections)))


@pytest.mark.slow
def test_5000_idle_connections_then_a_message_on_each(served, tmp_path: Path):
    process, address = served
    # Warm up the runtime (threads, buffers) with one short session first.
    with smtplib.SMTP(*address, timeout=10) as warm_up:
        assert warm_up.ehlo()[0] == 250
    time.sleep(0.2)
    before = rss_kib(process.pid)

    async def scenario() -> tuple[int, list[int]]:
        started = time.monotonic()
        connections = await open_idle(address, CONNECTIONS)
        opened_in = time.monotonic() - started
        await asyncio.sleep(0.3)
        during = rss_kib(process.pid)
        print(
            f"\n{CONNECTIONS} connections opened in {opened_in:.1f}s; server VmRSS "
            f"{before} KiB before, {during} KiB with them open: "
            f"{(during - before) / CONNECTIONS:.1f} KiB per idle connection"
        )
        # One more, fresh, while all are open: greeted and served.
        with smtplib.SMTP(*address, timeout=30) as extra:
            assert extra.noop()[0] == 250
            message = b"Subject: the 5001st\r\n\r\nextra\r\n"
            assert extra.sendmail("a@load.example", ["x@d.example"], message) == {}
        started = time.monotonic()
        codes = await send_on_each(connections)
        print(f"{CONNECTIONS} messages sent on them in {time.monotonic() - started:.1f}s")
        return during, codes

    during, codes = asyncio.run(scenario())
    assert codes == [250] * CONNECTIONS
    assert (during - before) / CONNECTIONS < MAX_KIB_PER_IDLE_CONNECTION
    stored = delivered(tmp_path / "maildir")
    assert len(stored) == CONNECTIONS + 1
    subjects = {re.search(rb"Subject: (load \d+|the 5001st)\r\n", m).group(1) for m in stored}
    assert subjects == {f"load {n}".encode() for n in range(CONNECTIONS)} | {b"the 5001st"}


def test_max_connections_refuses_the_one_too_many_then_admits_again(listen, raw):
    address = listen(max_connections=50)
    clients = [raw(address) for _ in range(50)]
    for client in clients:
        assert client.reply() == (220, ["mx.test.example ESMTP kumo_listener"])
    refused = raw(address)
    busy = "4.3.2 mx.test.example too many concurrent sessions. Try later"
    assert refused.reply() == (421, [busy])
    assert refused.closed()
    # The refused one did not take a slot: one of the 50 still works.
    assert clients[0].command("NOOP")[0] == 250
    for client in clients:
        client.close()
    # The server notices the closes asynchronously: a 421 meanwhile is retried,
    # for at most 5 s. All 50 slots come back, and the limit still holds after.
    deadline = time.monotonic() + 5
    fresh = [greeted(raw, address, deadline) for _ in range(50)]
    assert [client.reply()[0] for client in fresh] == [250] * 50
    assert raw(address).reply()[0] == 421


def greeted(raw, address: tuple[str, int], deadline: float):
    """A new client that got 220 (then NOOP sent), retrying 421s until ``deadline``."""
    while True:
        client = raw(address)
        code, texts = client.reply()
        if code == 220:
            client.send(b"NOOP\r\n")
            return client
        assert code == 421 and time.monotonic() < deadline, (code, texts)
        client.close()
        time.sleep(0.02)
