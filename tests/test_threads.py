"""Where handlers run: ``def`` handlers on the handler threads, so that one
that blocks does not hold up the loop, and threads are shared fairly between
clients; ``async def`` and ``kumo.inline``
handlers on the server's loop."""

from __future__ import annotations

import asyncio
import smtplib
import statistics
import threading
import time

import kumo_listener as kumo
from support import logged, wait_until

BODY = b"Subject: x\r\n\r\nbody\r\n"


def test_def_handlers_run_on_threads_and_the_others_on_the_loop(policy, listen, smtp):
    threads: dict[str, str] = {}

    @policy.on("smtp_server_mail_from")
    def mail(sender, meta):
        threads["def"] = threading.current_thread().name

    @policy.on("smtp_server_rcpt_to")
    @kumo.inline
    def rcpt(recipient, meta):
        threads["inline"] = threading.current_thread().name

    @policy.on("smtp_server_data")
    async def data(message, meta):
        threads["async"] = threading.current_thread().name

    address = listen()
    assert smtp(address).sendmail("a@b.example", ["c@d.example"], BODY) == {}
    assert threads["def"].startswith("kumo-handler-")
    assert threads["inline"] == threads["async"] == "kumo-listener-policy"


def test_a_blocking_def_handler_delays_only_its_own_session(policy, listen, raw):
    @policy.on("smtp_server_message_received")
    def store(message, meta):
        time.sleep(0.3)  # a synchronous database insert, say

    address = listen()
    accepted = []
    stop = time.monotonic() + 3.5

    def send() -> None:
        with smtplib.SMTP(*address, timeout=10) as client:
            while time.monotonic() < stop:
                client.sendmail("a@b.example", ["c@d.example"], BODY)
                accepted.append(time.monotonic())

    senders = [threading.Thread(target=send) for _ in range(6)]
    for sender in senders:
        sender.start()
    time.sleep(0.5)  # every sender is inside a slow handler by now
    waits = []
    while time.monotonic() < stop - 0.5:
        started = time.monotonic()
        assert raw(address).reply()[0] == 220
        waits.append(time.monotonic() - started)
        time.sleep(0.05)
    for sender in senders:
        sender.join(15)
    assert statistics.median(waits) < 0.05, waits
    assert len([t for t in accepted if t <= stop]) >= 30, len(accepted)


def test_a_def_handler_that_never_returns_costs_only_its_own_session(policy, listen, raw, kumo_log):
    release = threading.Event()

    @policy.on("smtp_server_rcpt_to")
    def stuck(recipient, meta):
        if recipient.user == "stuck":
            release.wait(30)

    address = listen(data_processing_timeout=1)
    client = raw(address)
    assert client.transaction(recipient="stuck@d.example") == (
        451,
        ["4.3.0 temporary policy failure, try again later"],
    )
    # Its session goes on, and so do the others.
    assert client.command("RCPT TO:<other@d.example>")[0] == 250
    assert raw(address).transaction()[0] == 250
    release.set()
    logged(kumo_log, "returned after its session stopped waiting")
    assert "smtp_server_rcpt_to handler did not finish within 1s" in kumo_log.text


def test_the_pool_has_the_size_given(policy, maildir, raw):
    running = []
    release = threading.Event()

    @policy.on("smtp_server_rcpt_to")
    def wait(recipient, meta):
        running.append(threading.current_thread().name)
        release.wait(10)

    with kumo.Server(policy=policy, maildir=maildir, handler_threads=2) as server:
        address = server.start_esmtp_listener(listen="127.0.0.1:0").address
        clients = [raw(address) for _ in range(3)]
        for client in clients:
            assert client.reply()[0] == 220
            client.command("EHLO x")
            client.command("MAIL FROM:<a@b.example>")
            client.send(b"RCPT TO:<c@d.example>\r\n")
        time.sleep(0.5)
        assert len(running) == 2, "the third waits for a free thread"
        release.set()
        assert [client.reply()[0] for client in clients] == [250, 250, 250]
        assert len(running) == 3 and len(set(running)) == 2


def test_new_connections_are_shed_while_too_many_policy_calls_wait(policy, maildir, raw):
    release = asyncio.Event()
    loop: list[asyncio.AbstractEventLoop] = []

    @policy.on("smtp_server_connection_accepted")
    async def slow(meta):
        loop.append(asyncio.get_running_loop())
        await release.wait()

    with kumo.Server(policy=policy, maildir=maildir, busy_at=2) as server:
        address = server.start_esmtp_listener(listen="127.0.0.1:0", hostname="mx.busy").address
        waiting = [raw(address), raw(address)]
        wait_until(lambda: len(loop) >= 2, within=5, what="two sessions in the slow handler")
        shed = raw(address)
        assert shed.reply() == (421, ["4.3.2 mx.busy service busy, try again later"])
        loop[0].call_soon_threadsafe(release.set)
        for client in waiting:
            assert client.reply()[0] == 220, "the sessions already open carry on"
        assert raw(address).reply()[0] == 220
