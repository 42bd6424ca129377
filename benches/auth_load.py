"""A load generator for the authentication benchmark: ``SESSIONS`` processes
(threads would fight over one GIL, and the faster the server, the more they
burn: the client, not the server, would set the pace), each on one
connection (EHLO once), sending the message in ``FILE`` (already
signed) ``COUNT``/``SESSIONS`` times with smtplib. smtp-source cannot send a
message of its own; what this costs in CPU is the client's, not the server's.

Usage: python3 benches/auth_load.py HOST:PORT FILE COUNT SESSIONS SENDER RECIPIENT HELO
Exits 1 (with the error on stderr) if any message is not accepted."""

from __future__ import annotations

import multiprocessing
import smtplib
import sys
from pathlib import Path


def send(host: str, port: int, data: bytes, count: int, envelope: tuple[str, str, str]) -> None:
    sender, recipient, helo = envelope
    with smtplib.SMTP(host, port, timeout=60) as client:
        client.ehlo(helo)
        for _ in range(count):
            client.sendmail(sender, [recipient], data)


def main(argv: list[str]) -> int:
    address, file, count_text, sessions_text, sender, recipient, helo = argv
    host, port = address.rsplit(":", 1)
    data = Path(file).read_bytes()
    count, sessions = int(count_text), int(sessions_text)
    shares = [count // sessions + (1 if i < count % sessions else 0) for i in range(sessions)]
    envelope = (sender, recipient, helo)
    workers = [
        multiprocessing.Process(target=send, args=(host, int(port), data, share, envelope))
        for share in shares
        if share
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    failed = [worker.exitcode for worker in workers if worker.exitcode != 0]
    if failed:
        print(f"{len(failed)} sessions failed (exit codes {failed})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
