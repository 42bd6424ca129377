"""The cost of message authentication: kumo_listener with ``annotate`` for
every method (SPF, DKIM, DMARC, ARC, iprev) against the same policy without
it, both discarding, their timed runs taking turns. The sender's domain is
served by a dnslib server on loopback (SPF, an RSA-2048 DKIM key, DMARC
``p=reject``), its answers cached by the server's resolver after the warm-up;
each message carries one RSA-2048 signature, made once by dkimpy. The load
generator is ``benches/auth_load.py`` (smtp-source cannot send a message of
its own): reused connections, 1 KB, 100 KB and 1 MB messages. The measure is
the server's CPU per message (its process tree, from /proc)."""

from __future__ import annotations

import base64
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .common import (
    BENCHES,
    KUMO_AUTHENTICATION,
    KUMO_DISCARD,
    LOOPBACK,
    RECIPIENT,
    Run,
    Settings,
    Shape,
    Throughput,
    Tools,
    log,
    shapes_json,
)
from .processes import RunningServer
from .servers import running_server
from .throughput import check_delivery, record_error, run_load, start_servers

SENDER_DOMAIN = "client.example"
SENDER = f"sender@{SENDER_DOMAIN}"
HELO = f"mail.{SENDER_DOMAIN}"
SELECTOR = "bench"
LOAD = BENCHES / "auth_load.py"
SHAPES = (
    Shape(
        "authentication_1k", "reused connections, 1 KB, one RSA-2048 signature", 1024, True, 400, 0
    ),
    Shape(
        "authentication_100k",
        "reused connections, 100 KB, one RSA-2048 signature",
        102400,
        True,
        200,
        0,
    ),
    Shape(
        "authentication_1m",
        "reused connections, 1 MB, one RSA-2048 signature",
        1048576,
        True,
        40,
        0,
    ),
)
# Messages per timed run (quick runs: the shape's quick_count).
FULL_COUNTS = {"authentication_1k": 4000, "authentication_100k": 1000, "authentication_1m": 150}
SERVERS = (KUMO_AUTHENTICATION, KUMO_DISCARD)


@contextlib.contextmanager
def sender_zone(public_key_der: bytes) -> Iterator[str]:
    """A dnslib server on loopback for the sender's domain; its address."""
    from dnslib import QTYPE, RCODE, RR, SOA, TXT
    from dnslib.server import BaseResolver, DNSServer

    key = base64.b64encode(public_key_der).decode()
    negative_soa = SOA("ns.example.", "hostmaster.example.", (1, 3600, 600, 86400, 86400))
    records = {
        f"{SENDER_DOMAIN}.": "v=spf1 ip4:127.0.0.0/8 -all",
        f"{HELO}.": "v=spf1 ip4:127.0.0.0/8 -all",
        f"_dmarc.{SENDER_DOMAIN}.": "v=DMARC1; p=reject",
        f"{SELECTOR}._domainkey.{SENDER_DOMAIN}.": f"v=DKIM1; k=rsa; p={key}",
    }

    class Resolver(BaseResolver):  # type: ignore[misc]
        def resolve(self, request: Any, handler: Any) -> Any:
            reply = request.reply()
            text = records.get(str(request.q.qname).lower())
            if text is None:
                # With the zone's SOA, as an authoritative server answers: the
                # resolver caches the negative answer (RFC 2308), e.g. for the
                # DMARC tree walk's `_dmarc.example.`.
                reply.header.rcode = RCODE.NXDOMAIN
                reply.add_auth(RR("example.", QTYPE.SOA, rdata=negative_soa, ttl=86400))
            elif request.q.qtype == QTYPE.TXT:
                data = text.encode()
                strings = [data[i : i + 255] for i in range(0, len(data), 255)]
                reply.add_answer(RR(request.q.qname, QTYPE.TXT, rdata=TXT(strings), ttl=86400))
            return reply

    class Quiet:
        def __getattr__(self, name: str) -> Any:
            return lambda *args, **kwargs: None

    server = DNSServer(Resolver(), LOOPBACK, 0, logger=Quiet())
    server.start_thread()
    try:
        yield f"{LOOPBACK}:{server.server.server_address[1]}"
    finally:
        server.stop()
        server.server.server_close()


def signed_messages(workdir: Path) -> tuple[bytes, dict[str, Path]]:
    """An RSA-2048 key (its public half, DER) and a signed message file per shape."""
    import dkim
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    files = {}
    for shape in SHAPES:
        head = (
            f"From: Sender <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: bench\r\n"
            "Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <bench@client.example>\r\n\r\n"
        ).encode()
        line = b"The quick brown fox jumps over the lazy dog, again and again.\r\n"
        body = line * max(1, (shape.size - len(head)) // len(line))
        message = head + body
        signature = dkim.sign(
            message, SELECTOR.encode(), SENDER_DOMAIN.encode(), private,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
        )  # fmt: skip
        path = workdir / f"{shape.key}.eml"
        path.write_bytes(signature + message)
        files[shape.key] = path
    return public, files


def timed_run(server: RunningServer, settings: Settings, file: Path, count: int) -> Run:
    server.check_alive()
    server.new_log_output()
    before = server.received()
    sessions = min(settings.sessions, 10, count)
    command = [sys.executable, str(LOAD), f"{LOOPBACK}:{server.port}", str(file), str(count)]
    command += [str(sessions), SENDER, RECIPIENT, HELO]
    _, run = run_load(server, command, settings.run_timeout)
    check_delivery(server, before, None, count)
    return Run(count, run.seconds, run.server_cpu, run.client_cpu)


def measure(tools: Tools, settings: Settings) -> dict[str, Any]:
    """The JSON section: shape key → the shape and, by server key, its runs."""
    results = {shape.key: {kind.key: Throughput() for kind in SERVERS} for shape in SHAPES}
    public, files = signed_messages(settings.workdir)
    with contextlib.ExitStack() as stack:
        dns = stack.enter_context(sender_zone(public))

        def start(kind: Any) -> Any:
            return running_server(kind, tools, settings, extra_arguments=["--dns-server", dns])

        servers = start_servers(stack, SERVERS, start, results)
        for shape in SHAPES:
            count = shape.quick_count if settings.quick else FULL_COUNTS[shape.key]
            row = results[shape.key]
            for key, server in servers.items():
                row[key].messages_per_run = count
                with record_error(row[key]):  # the warm-up: the resolver's cache filled
                    timed_run(server, settings, files[shape.key], max(10, count // 10))
            for _ in range(settings.repeat):
                for key, server in servers.items():
                    if row[key].error is None:
                        with record_error(row[key]):
                            row[key].runs.append(
                                timed_run(server, settings, files[shape.key], count)
                            )
            for key, server in servers.items():
                status = row[key].error or row[key].rates_text() + " msgs/s"
                log(f"e2e: authentication, {server.kind.title}, {shape.title}: {status}")
    check_errors(results)
    return shapes_json(SHAPES, SERVERS, results, min(settings.sessions, 10))


def check_errors(results: dict[str, dict[str, Throughput]]) -> None:
    for row in results.values():
        for item in row.values():
            if item.error:
                log(f"e2e: authentication: {item.error}")
