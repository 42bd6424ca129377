"""The client of tests/test_cluster.py, run in the client's namespace:
``python3 cluster_client.py CONFIG.json``. Threads, each bound to one of
several source addresses, open connection after connection to the service
address and send messages with unique Message-IDs (a few per connection)
until the stop file appears; a message that did not get its 250 is tried
again on a later connection. It writes what it saw to the result file: every
attempt (message, source, reply, whether the body had been sent), every
refusal at the greeting, and when each session opened and closed."""

from __future__ import annotations

import collections
import contextlib
import json
import random
import smtplib
import sys
import threading
import time
from pathlib import Path
from typing import Any

# Stop trying messages that failed this long after the stop file appeared.
DRAIN_SECONDS = 8.0


def message(number: int, run: str) -> bytes:
    """Message `number` of run `run`, as sent (CRLF lines, none starting with a dot)."""
    filler = f"{number:06d} {run} ".encode() * 60
    return (
        f"Message-ID: <{number}.{run}@client.cluster.test>\r\n"
        f"Subject: cluster message {number}\r\n"
        "From: <sender@client.cluster.test>\r\n"
        "To: <rcpt@service.cluster.test>\r\n"
        "\r\n"
    ).encode() + b"".join(filler[i : i + 76] + b"\r\n" for i in range(0, len(filler), 76))


class Client:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.service = (config["service"], config["port"])
        self.stop_file = Path(config["stop_file"])
        self.lock = threading.Lock()
        self.next_number = 0
        self.retry: collections.deque[int] = collections.deque()
        self.accepted: set[int] = set()
        self.attempts: list[dict[str, Any]] = []
        self.refusals: list[dict[str, Any]] = []
        self.sessions: list[list[Any]] = []  # [source, opened, closed]
        self.drain_deadline: float | None = None

    def stopping(self) -> bool:
        if self.drain_deadline is None and self.stop_file.exists():
            self.drain_deadline = time.monotonic() + DRAIN_SECONDS
        return self.drain_deadline is not None

    def take(self) -> int | None:
        """A message to send: one to try again first; a new one until stopping."""
        with self.lock:
            if self.retry:
                return self.retry.popleft()
            if self.stopping():
                return None
            self.next_number += 1
            return self.next_number

    def done(self) -> bool:
        with self.lock:
            if not self.stopping():
                return False
            assert self.drain_deadline is not None
            return not self.retry or time.monotonic() > self.drain_deadline

    def run_thread(self, source: str) -> None:
        while not self.done():
            with contextlib.suppress(OSError, smtplib.SMTPException):
                self.session(source)
            time.sleep(random.uniform(0.0, 0.05))

    def session(self, source: str) -> None:
        smtp = smtplib.SMTP(timeout=self.config["timeout"], source_address=(source, 0))
        try:
            code, text = smtp.connect(*self.service)
            if code != 220:
                self.refusals.append({"source": source, "code": code, "text": text.decode()})
                time.sleep(random.uniform(0.1, 0.3))
                return
            record = [source, time.monotonic(), None]
            self.sessions.append(record)
            try:
                self.transactions(smtp, source)
            finally:
                record[2] = time.monotonic()
        finally:
            smtp.close()

    def transactions(self, smtp: smtplib.SMTP, source: str) -> None:
        smtp.ehlo("client.cluster.test")
        for _ in range(random.randint(1, 5)):
            number = self.take()
            if number is None:
                break
            if not self.send(smtp, source, number):
                return
            time.sleep(self.config["pause"])
        smtp.quit()

    def send(self, smtp: smtplib.SMTP, source: str, number: int) -> bool:
        """One transaction; False when the connection is no longer usable."""
        attempt: dict[str, Any] = {"number": number, "source": source, "after_data": False}
        self.attempts.append(attempt)
        try:
            code = smtp.mail("sender@client.cluster.test")[0]
            if code == 250:
                code = smtp.rcpt("rcpt@service.cluster.test")[0]
            if code == 250:
                code = smtp.docmd("DATA")[0]
            if code == 354:
                attempt["after_data"] = True
                smtp.send(message(number, self.config["run"]) + b".\r\n")
                code = smtp.getreply()[0]
        except (OSError, smtplib.SMTPException) as error:
            attempt["error"] = repr(error)
            self.settle(number, attempt, None)
            return False
        self.settle(number, attempt, code)
        return code == 250

    def settle(self, number: int, attempt: dict[str, Any], code: int | None) -> None:
        attempt["code"] = code
        with self.lock:
            if code == 250:
                self.accepted.add(number)
            else:
                self.retry.append(number)

    def progress(self) -> None:
        """The count of messages acknowledged so far, replaced whole (never read half-written)."""
        progress = Path(self.config["progress_file"])
        partial = progress.with_suffix(".partial")
        partial.write_text(str(len(self.accepted)))
        partial.replace(progress)

    def result(self) -> dict[str, Any]:
        return {
            "sent": self.next_number,
            "attempts": self.attempts,
            "refusals": self.refusals,
            "sessions": self.sessions,
        }


def main() -> None:
    config = json.loads(Path(sys.argv[1]).read_text())
    client = Client(config)
    threads = [
        threading.Thread(target=client.run_thread, args=(source,), daemon=True)
        for source in config["sources"]
        for _ in range(config["threads_per_source"])
    ]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        client.progress()
        time.sleep(0.2)
    client.progress()
    Path(config["result_file"]).write_text(json.dumps(client.result()))


if __name__ == "__main__":
    main()
