"""Python policy: handlers, Reject, metadata, relaying, helpers."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time

import kumo_listener as kumo
import pytest
from kumo_listener import _core
from support import delivered


def reject(code: int, text: str):
    def handler(*args):
        raise kumo.Reject(code, text)

    return handler


@pytest.mark.parametrize(
    ("event", "step"),
    [
        ("smtp_server_connection_accepted", "greeting"),
        ("smtp_server_ehlo", "ehlo"),
        ("smtp_server_mail_from", "mail"),
        ("smtp_server_rcpt_to", "rcpt"),
        ("get_listener_domain", "rcpt"),
        ("smtp_server_data", "data"),
        ("smtp_server_message_received", "data"),
    ],
)
def test_reject_from_each_event_becomes_the_reply(policy, listen, raw, event, step):
    policy.on(event, reject(550, "5.7.1 not today"))
    client = raw(listen(relay_hosts=[]))
    replies = {"greeting": client.reply()}
    if step != "greeting":
        replies["ehlo"] = client.command("EHLO client.example")
    if step in ("mail", "rcpt", "data"):
        replies["mail"] = client.command("MAIL FROM:<a@b.example>")
    if step in ("rcpt", "data"):
        if event != "get_listener_domain":
            policy.on("get_listener_domain", lambda d, listener, meta: {"relay_to": True})
        replies["rcpt"] = client.command("RCPT TO:<c@d.example>")
    if step == "data":
        assert client.command("DATA")[0] == 354
        replies["data"] = client.command("Subject: x\r\n\r\nbody\r\n.")
    code, lines = replies[step]
    assert code == 550
    assert lines[-1] == ("5.7.1 not today" if step != "greeting" else "not today")


def test_reject_421_closes_the_connection(policy, listen, raw):
    policy.on("smtp_server_mail_from", reject(421, "4.7.0 go away for now"))
    client = raw(listen())
    client.reply()
    client.command("EHLO client.example")
    assert client.command("MAIL FROM:<a@b.example>") == (421, ["4.7.0 go away for now"])
    assert client.closed()


def test_reject_without_enhanced_code_gets_a_generic_one(policy, listen, raw):
    policy.on("smtp_server_rcpt_to", reject(450, "mailbox busy"))
    assert raw(listen()).transaction() == (450, ["4.0.0 mailbox busy"])


def test_reject_validates_its_code():
    with pytest.raises(ValueError, match="4xx or 5xx"):
        kumo.Reject(250, "fine")


def test_handler_error_and_wrong_return_type_are_temporary_failures(policy, listen, raw, kumo_log):
    policy.on("smtp_server_mail_from", lambda sender, meta: 1 / 0)
    policy.on("smtp_server_rcpt_to", lambda recipient, meta: "yes")
    client = raw(listen())
    client.reply()
    client.command("EHLO client.example")
    code, lines = client.command("MAIL FROM:<a@b.example>")
    assert (code, lines[0][:5]) == (451, "4.3.0")
    assert "ZeroDivisionError" in kumo_log.text
    policy.remove("smtp_server_mail_from")
    client.command("MAIL FROM:<a@b.example>")
    assert client.command("RCPT TO:<c@d.example>")[0] == 451
    assert "smtp_server_rcpt_to handlers must return None" in kumo_log.text


def test_connection_meta_is_shared_by_every_event(policy, listen, raw):
    seen = {}

    @policy.on("smtp_server_connection_accepted")
    def accepted(meta):
        meta.set_meta("tenant", {"id": 7, "tags": ["a", "b"]})

    @policy.on("smtp_server_rcpt_to")
    def rcpt(recipient, meta):
        seen["tenant"] = meta.get_meta("tenant")
        seen["recipient"] = (str(recipient), recipient.user, recipient.domain)
        for name in (
            "received_from",
            "received_via",
            "hostname",
            "ehlo_domain",
            "reception_protocol",
            "missing",
        ):
            seen[name] = meta.get_meta(name)

    @policy.on("smtp_server_mail_from")
    def mail(sender, meta):
        seen["sender"] = str(sender)

    client = raw(listen(), source="127.0.0.1")
    assert client.transaction(sender="")[0] == 250
    port = client.sock.getsockname()[1]
    assert seen == {
        "tenant": {"id": 7, "tags": ["a", "b"]},
        "recipient": ("c@d.example", "c", "d.example"),
        "received_from": f"127.0.0.1:{port}",
        "received_via": f"127.0.0.1:{client.sock.getpeername()[1]}",
        "hostname": "mx.test.example",
        "ehlo_domain": "client.example",
        "reception_protocol": "ESMTP",
        "missing": None,
        "sender": "",
    }


def test_set_meta_refuses_values_that_are_not_json(policy, listen, raw, kumo_log):
    policy.on("smtp_server_connection_accepted", lambda meta: meta.set_meta("x", object()))
    code, _ = raw(listen()).reply()
    assert code == 421
    assert "TypeError" in kumo_log.text


def test_ehlo_handler_can_replace_the_extensions(policy, listen, raw):
    seen = {}

    @policy.on("smtp_server_ehlo")
    def ehlo(domain, meta, extensions):
        seen["domain"], seen["extensions"] = domain, list(extensions)
        return [e for e in extensions if e != "STARTTLS"] + ["X-TEST"]

    client = raw(listen())
    client.reply()
    code, lines = client.command("EHLO client.example")
    assert code == 250
    assert seen["domain"] == "client.example"
    assert "STARTTLS" in seen["extensions"]
    assert "STARTTLS" not in lines and lines[-1] == "X-TEST"


def test_relaying(policy, listen, raw):
    address = listen(listen="127.0.0.1:0")
    denied = raw(address, source="127.0.0.9").transaction()
    assert denied == (550, ["5.7.1 relaying not permitted"])
    assert raw(address).transaction()[0] == 250

    domains = {
        "local.example": {"relay_to": True},
        "sender-trusted.example": {"relay_from": ["127.0.0.8/30"]},
    }
    asked = []

    @policy.on("get_listener_domain")
    def listener_domain(domain, listener, meta):
        asked.append((domain, listener))
        return domains.get(domain)

    assert raw(address, source="127.0.0.9").transaction(recipient="x@local.example")[0] == 250
    assert raw(address, source="127.0.0.9").transaction()[0] == 550
    assert raw(address, source="127.0.0.9").transaction(sender="s@sender-trusted.example")[0] == 250
    assert (
        raw(address, source="127.0.0.12").transaction(sender="s@sender-trusted.example")[0] == 550
    )
    assert ("local.example", "127.0.0.1:0") in asked


def test_relay_hosts_parameter(listen, raw):
    address = listen(relay_hosts=["127.0.0.9"])
    assert raw(address, source="127.0.0.9").transaction()[0] == 250
    assert raw(address).transaction()[0] == 550


def test_async_handlers_run_concurrently(policy, listen, raw):
    release = asyncio.Event()
    waiting = []

    @policy.on("smtp_server_mail_from")
    async def mail(sender, meta):
        if sender.user == "slow":
            waiting.append(asyncio.get_running_loop())
            await release.wait()

    address = listen()
    slow = raw(address)
    slow.reply()
    slow.command("EHLO client.example")
    slow.send(b"MAIL FROM:<slow@b.example>\r\n")
    while not waiting:
        time.sleep(0.01)
    assert raw(address).transaction()[0] == 250
    waiting[0].call_soon_threadsafe(release.set)
    assert slow.reply()[0] == 250


@pytest.mark.parametrize("loop_kind", ["the server's", "the caller's"])
def test_server_runs_on_the_server_loop_or_the_callers(policy, maildir, raw, loop_kind):
    """On a loop of Server.new_event_loop the loop drives the sessions; on any
    other loop a thread of the core does. Handlers, async and inline, run on
    that loop either way."""
    loops = []

    @policy.on("smtp_server_mail_from")
    @kumo.inline
    def mail(sender, meta):
        loops.append(asyncio.get_running_loop())

    @policy.on("smtp_server_rcpt_to")
    async def rcpt(recipient, meta):
        await asyncio.sleep(0.01)
        loops.append(asyncio.get_running_loop())

    server = kumo.Server(policy=policy, maildir=maildir)
    started = threading.Event()
    address = []

    def ready():
        address.append(server.start_esmtp_listener(listen="127.0.0.1:0").address)
        started.set()

    def serve():
        if loop_kind == "the server's":
            server.run_forever(on_ready=ready)
        else:
            asyncio.run(server.run(on_ready=ready))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(10)
    client = raw(address[0])
    assert client.transaction()[0] == 250
    assert client.command("DATA")[0] == 354
    assert client.command(b"Subject: x\r\n\r\nbody\r\n.\r\n")[0] == 250
    server.stop()
    thread.join(10)
    assert not thread.is_alive()
    assert len(loops) == 2 and loops[0] is loops[1]
    assert len(delivered(maildir)) == 1


def test_async_handler_can_reject(policy, listen, raw):
    @policy.on("smtp_server_rcpt_to")
    async def rcpt(recipient, meta):
        await asyncio.sleep(0.01)
        raise kumo.Reject(550, "5.1.1 no such user")

    assert raw(listen()).transaction() == (550, ["5.1.1 no such user"])


def test_handler_slower_than_data_processing_timeout(policy, listen, raw):
    @policy.on("smtp_server_mail_from")
    async def mail(sender, meta):
        await asyncio.sleep(5)

    client = raw(listen(data_processing_timeout=0.3))
    client.reply()
    client.command("EHLO client.example")
    code, lines = client.command("MAIL FROM:<a@b.example>")
    assert (code, lines[0][:5]) == (451, "4.3.0")


def test_unknown_event_names_are_refused(policy):
    with pytest.raises(ValueError, match="unknown event"):
        policy.on("smtp_server_mail", print)


def test_an_unknown_event_name_suggests_the_closest_event(policy):
    message = "unknown event 'smtp_server_rcpt'; did you mean 'smtp_server_rcpt_to'?"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        policy.on("smtp_server_rcpt", print)
    assert policy.events() == []


def test_the_event_names_come_from_the_core():
    assert kumo.EVENTS == _core.EVENTS
    assert {"init", "smtp_server_rcpt_to", "get_listener_domain"} <= kumo.EVENTS


def test_the_core_refuses_handlers_for_unknown_events():
    core = _core.Core("discard")
    core.set_handlers(["init", "smtp_server_ehlo"])
    with pytest.raises(ValueError, match="unknown event 'smtp_server_helo'; did you mean"):
        core.set_handlers(["smtp_server_helo"])


def test_memoize_caches_per_arguments_with_ttl_and_capacity():
    calls = []

    def load(path):
        calls.append(path)
        return {"path": path}

    cached = kumo.memoize(load, name="load", ttl="1 minute", capacity=2)
    assert cached("a") == cached("a") == {"path": "a"}
    cached("b")
    cached("c")
    cached("a")
    assert calls == ["a", "b", "c", "a"]
    short = kumo.memoize(load, name="short", ttl=0.05, capacity=10)
    short("x")
    time.sleep(0.1)
    short("x")
    assert calls[-2:] == ["x", "x"]
    with pytest.raises(ValueError, match="ttl"):
        kumo.memoize(load, name="bad", ttl="soonish", capacity=1)


def test_memoize_async():
    calls = []

    async def fetch(key):
        calls.append(key)
        return key.upper()

    cached = kumo.memoize(fetch, name="fetch", ttl=60, capacity=4)

    async def main():
        return [await cached("k"), await cached("k")]

    assert asyncio.run(main()) == ["K", "K"]
    assert calls == ["k"]


def test_serde_loaders(tmp_path):
    (tmp_path / "p.toml").write_text('[via."10.0.0.1"]\nhostname = "mx.example"\n')
    (tmp_path / "p.json").write_text(json.dumps({"hostname": "mx.example"}))
    assert kumo.serde.toml_load(tmp_path / "p.toml") == {
        "via": {"10.0.0.1": {"hostname": "mx.example"}}
    }
    assert kumo.serde.json_load(str(tmp_path / "p.json")) == {"hostname": "mx.example"}


def test_the_port_is_free_as_soon_as_the_server_stops(policy, maildir, raw):
    with kumo.Server(policy=policy, maildir=maildir) as server:
        host, port = server.start_esmtp_listener(listen="127.0.0.1:0").address
        client = raw((host, port))
        assert client.reply()[0] == 220
        client.sock.close()
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind((host, port))
        again.listen()


# --- KumoMTA's parity events and metadata ------------------------------------------------


def test_rewrite_response_changes_status_and_text(policy, listen, raw):
    seen: list[tuple[int, str, str | None]] = []

    @policy.on("smtp_server_rewrite_response")
    def rewrite(status, response, command, conn_meta):
        seen.append((status, response, command))
        if command == "RCPT" and status == 550:
            return 451, "4.7.1 greylisted, come back later"
        if command is None:
            return None, "welcome, says policy"
        if command == "NOOP":
            raise RuntimeError("a failing handler changes nothing")
        return None

    client = raw(listen(relay_hosts=[]))
    assert client.reply() == (220, ["welcome, says policy"])
    client.ehlo()
    assert client.command("MAIL FROM:<a@b.example>")[0] == 250
    assert client.command("RCPT TO:<c@elsewhere.example>") == (
        451,
        ["4.7.1 greylisted, come back later"],
    )
    assert client.command("NOOP") == (250, ["2.0.0 OK"])
    assert (550, "5.7.1 relaying not permitted", "RCPT") in seen


def test_split_transaction_groups_recipients(policy, listen, raw, maildir):
    parts = []

    @policy.on("smtp_server_split_transaction")
    def split(message, conn_meta):
        by_user = sorted(message.recipients, key=lambda r: r.user)
        return [by_user[:2], [str(by_user[2])]]

    @policy.on("smtp_server_message_received")
    def received(message, conn_meta):
        parts.append(sorted(str(r) for r in message.recipients))

    client = raw(listen())
    client.hello()
    assert client.command("MAIL FROM:<a@b.example>")[0] == 250
    for user in ("c", "a", "b"):
        assert client.command(f"RCPT TO:<{user}@d.example>")[0] == 250
    assert client.command("DATA")[0] == 354
    code, texts = client.command(b"Subject: s\r\n\r\nx\r\n.\r\n")
    assert code == 250 and texts[0].count(",") == 1, texts
    assert sorted(parts) == [["a@d.example", "b@d.example"], ["c@d.example"]]
    assert len(delivered(maildir)) == 2, "a file per part"


def test_split_transaction_that_loses_a_recipient_is_a_temporary_failure(policy, listen, raw):
    policy.on("smtp_server_split_transaction", lambda message, meta: [message.recipients[:1]])
    client = raw(listen())
    client.hello()
    client.command("MAIL FROM:<a@b.example>")
    client.command("RCPT TO:<a@d.example>")
    client.command("RCPT TO:<b@d.example>")
    client.command("DATA")
    assert client.command(b"x\r\n.\r\n") == (
        451,
        ["4.3.0 temporary policy failure, try again later"],
    )


def test_session_id_is_in_the_metadata_of_each_connection(policy, listen, raw):
    ids = []
    policy.on(
        "smtp_server_connection_accepted", lambda meta: ids.append(meta.get_meta("session_id"))
    )
    address = listen()
    for _ in range(2):
        assert raw(address).reply()[0] == 220
    assert len(ids) == 2 and ids[0] != ids[1]
    assert all(re.fullmatch(r"[0-9a-f]{32}", session_id) for session_id in ids), ids
