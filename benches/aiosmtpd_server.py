"""The aiosmtpd server of the end-to-end benchmark (``python3 -m benches.e2e``).

Usage: ``python3 benches/aiosmtpd_server.py PORT [COUNT_FILE] [--tls CERT KEY]
[--proxy HOST:PORT]``

Listens on ``127.0.0.1:PORT`` with a handler equivalent to the benchmark's
kumo_listener policy (count each message, answer ``250 OK``, store nothing).
With ``COUNT_FILE``, the number of messages received is written there on
SIGUSR1 and at exit. With ``--tls``, STARTTLS is offered with that certificate
and key (PEM files). With ``--proxy``, aiosmtpd's own ``Proxy`` handler sends
each message on to that SMTP server instead (``smtplib``, a connection per
message, blocking the event loop meanwhile; it answers ``250 OK`` whatever the
upstream said), and the count is of the messages the upstream took.
SIGINT/SIGTERM stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import ssl
import sys
from typing import Any

from aiosmtpd.handlers import Proxy
from aiosmtpd.smtp import SMTP, Envelope, Session

HOSTNAME = "bench.example"


class CountingHandler:
    """Counts messages and discards them."""

    def __init__(self) -> None:
        self.received = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.received += 1
        return "250 OK"


class CountingProxy(Proxy):
    """aiosmtpd's Proxy handler, unchanged, counting the messages its upstream took."""

    def __init__(self, remote_hostname: str, remote_port: int) -> None:
        super().__init__(remote_hostname, remote_port)
        self.received = 0

    def _deliver(self, mail_from: str, rcpt_tos: list[str], data: str | bytes) -> Any:
        refused = super()._deliver(mail_from, rcpt_tos, data)
        if not refused:  # {} when every recipient was taken; Proxy answers 250 OK anyway
            self.received += 1
        return refused


def write_count(path: str | None, count: int) -> None:
    """Write ``count`` to ``path`` (atomically, by rename)."""
    if path is None:
        return
    partial = f"{path}.tmp"
    with open(partial, "w", encoding="ascii") as file:
        file.write(f"{count}\n")
    os.replace(partial, path)


async def serve(
    port: int,
    count_file: str | None,
    tls: ssl.SSLContext | None,
    proxy: tuple[str, int] | None = None,
) -> None:
    loop = asyncio.get_running_loop()
    handler: CountingHandler | CountingProxy
    handler = CountingHandler() if proxy is None else CountingProxy(*proxy)

    def factory() -> Any:
        return SMTP(handler, hostname=HOSTNAME, tls_context=tls)

    server = await loop.create_server(factory, host="127.0.0.1", port=port, backlog=4096)
    stopping = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: write_count(count_file, handler.received))
    print(f"aiosmtpd: listening on 127.0.0.1:{port}", flush=True)
    try:
        await stopping.wait()
    finally:
        server.close()
        write_count(count_file, handler.received)


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("count_file", nargs="?")
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    parser.add_argument(
        "--proxy", type=host_port, metavar="HOST:PORT", help="forward to this SMTP server"
    )
    args = parser.parse_args(argv[1:])
    logging.basicConfig(level=logging.WARNING)
    tls = tls_context(*args.tls) if args.tls else None
    asyncio.run(serve(args.port, args.count_file, tls, args.proxy))
    return 0


def host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
