"""A pytest plugin: a real SMTP server for tests of code that sends mail.

Installed with the package and loaded by pytest through its ``pytest11``
entry point. The ``smtp_server`` fixture starts an in-process
:class:`kumo_listener.Server` on ``127.0.0.1:0`` that accepts mail for any
domain from anyone, and stops it after the test::

    def test_signup_sends_a_welcome_mail(smtp_server):
        app.signup("ann@example.com", smtp=smtp_server.address)
        [mail] = smtp_server.messages
        assert mail["Subject"] == "Welcome"
        assert mail.rcpt_to == ["ann@example.com"]

Override the ``smtp_server_policy`` fixture (a :class:`kumo_listener.Policy`)
or ``smtp_server_params`` (listener parameters) to change what it does;
:meth:`SMTPTestServer.refuse_next` and :meth:`SMTPTestServer.delay` make it
refuse or stall, for testing an application's retry logic.
"""

from __future__ import annotations

import asyncio
import email.policy
import inspect
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any, Literal

import pytest

from .policy import Policy
from .reject import Reject
from .server import Server

__all__ = ["ReceivedMessage", "SMTPTestServer", "Stage"]

#: Where a refusal or a delay applies: the connection (before the banner),
#: EHLO/HELO, MAIL FROM, RCPT TO, or the end of DATA.
Stage = Literal["connect", "ehlo", "mail", "rcpt", "data"]

_EVENT_OF: dict[str, str] = {
    "connect": "smtp_server_connection_accepted",
    "ehlo": "smtp_server_ehlo",
    "mail": "smtp_server_mail_from",
    "rcpt": "smtp_server_rcpt_to",
    "data": "smtp_server_data",
}

#: Open relay: a test server accepts mail for any domain, from any client.
DEFAULT_PARAMS: Mapping[str, Any] = {
    "hostname": "smtp.test",
    "relay_hosts": ["0.0.0.0/0", "::/0"],
}

# Marks a transaction in the message metadata (split parts get a copy).
_TRANSACTION_META = "kumo_testing_transaction"


class ReceivedMessage(EmailMessage):
    """A received message, parsed with ``email.policy.default``, with its
    envelope: ``mail_from`` (``""`` for the null sender), ``rcpt_to`` (every
    recipient of the transaction, whatever the headers say) and ``raw`` (the
    bytes as received, CRLF line endings and the server's ``Received:``
    header included). Parsed with ``"\n"`` line endings, the email package's own."""

    mail_from: str = ""
    rcpt_to: list[str]  # set on the message itself; the parts of a multipart have none
    raw: bytes = b""


@dataclass
class _Transaction:
    mail_from: str
    rcpt_to: list[str]
    raw: bytes
    parsed: ReceivedMessage | None = None

    def message(self) -> ReceivedMessage:
        if self.parsed is None:
            # The email package's own line ending is "\n": get_content() gives
            # text as the application wrote it (`raw` keeps the wire's CRLF).
            text = self.raw.replace(b"\r\n", b"\n")
            parsed = BytesParser(ReceivedMessage, policy=email.policy.default).parsebytes(text)
            assert isinstance(parsed, ReceivedMessage)
            parsed.mail_from, parsed.rcpt_to, parsed.raw = self.mail_from, self.rcpt_to, self.raw
            self.parsed = parsed
        return self.parsed


@dataclass
class _Fault:
    remaining: int | None  # None: every time
    action: Callable[[], Any]
    refuses: bool


class SMTPTestServer:
    """What the ``smtp_server`` fixture yields: a running server and what it received."""

    def __init__(self, policy: Policy, maildir: Path, params: Mapping[str, Any]) -> None:
        self.policy = policy
        """The test's policy; handlers registered on it during the test take effect."""
        self.maildir = maildir
        """The Maildir the server stores messages in (``new/`` holds one file per recipient)."""
        self._own = Policy()
        self._server = Server(policy=self._own, maildir=maildir, shutdown_grace=5)
        self._lock = threading.Condition()
        self._transactions: dict[int, _Transaction] = {}
        self._faults: dict[str, list[_Fault]] = {}
        self._next = 0
        self._sync()
        policy.watch(self._sync)
        self._server.start()
        try:
            listener = self._server.start_esmtp_listener(**{"listen": "127.0.0.1:0", **params})
            if isinstance(listener.address, str):
                raise ValueError("listen: the test server listens on TCP, not on a Unix socket")
        except BaseException:
            self._server.stop()
            raise
        self.host, self.port = listener.address

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)``, e.g. for ``smtplib.SMTP(*smtp_server.address)``."""
        return self.host, self.port

    @property
    def messages(self) -> list[ReceivedMessage]:
        """The messages accepted so far (one per transaction), oldest first:
        recorded once ``smtp_server_data`` has passed, forgotten if the test's
        ``smtp_server_message_received`` refuses one."""
        with self._lock:
            return [transaction.message() for transaction in self._transactions.values()]

    def wait_for_messages(self, count: int = 1, timeout: float = 10.0) -> list[ReceivedMessage]:
        """:attr:`messages` once there are at least ``count`` (for mail sent
        from another thread or process); ``AssertionError`` after ``timeout`` s."""
        with self._lock:
            if not self._lock.wait_for(lambda: len(self._transactions) >= count, timeout):
                raise AssertionError(
                    f"expected {count} messages within {timeout}s, got {len(self._transactions)}"
                )
        return self.messages

    def clear(self) -> None:
        """Forget the messages received so far."""
        with self._lock:
            self._transactions.clear()

    def refuse_next(
        self, count: int = 1, code: int = 451, text: str = "4.3.0 try later", *, at: Stage = "rcpt"
    ) -> None:
        """Answer the next ``count`` commands of stage ``at`` with ``code text``
        (4xx: a temporary failure the client should retry; ``421`` also closes
        the connection), before the test's own handler runs."""
        if not 400 <= code <= 599:
            raise ValueError(f"refusal code must be 4xx or 5xx, got {code}")

        def refuse() -> None:
            raise Reject(code, text)

        self._add_fault(at, _Fault(count, refuse, refuses=True))

    def delay(self, seconds: float, *, at: Stage = "data", count: int | None = None) -> None:
        """Wait ``seconds`` before answering stage ``at`` (every time, or the
        next ``count`` times); other connections are served meanwhile. Past
        ``data_processing_timeout`` (default 300 s) the client gets a 4xx."""

        async def stall() -> None:
            await asyncio.sleep(seconds)

        self._add_fault(at, _Fault(count, stall, refuses=False))

    def reset_faults(self) -> None:
        """Forget every :meth:`refuse_next` and :meth:`delay`."""
        with self._lock:
            self._faults.clear()

    def stop(self) -> None:
        self._server.stop()

    def _add_fault(self, at: Stage, fault: _Fault) -> None:
        if at not in _EVENT_OF:
            raise ValueError(f"at: expected one of {', '.join(_EVENT_OF)}, got {at!r}")
        if fault.remaining is not None and fault.remaining < 1:
            raise ValueError(f"count must be positive, got {fault.remaining}")
        with self._lock:
            self._faults.setdefault(_EVENT_OF[at], []).append(fault)
        self._sync()

    def _take_faults(self, event: str) -> list[_Fault]:
        """The faults that apply to this call of ``event``, in the order given."""
        with self._lock:
            faults = self._faults.get(event, [])
            # Every delay, and the first refusal: the next waits its turn.
            first_refusal = next((fault for fault in faults if fault.refuses), None)
            due = [fault for fault in faults if not fault.refuses or fault is first_refusal]
            for fault in due:
                if fault.remaining is not None:
                    fault.remaining -= 1
            faults[:] = [fault for fault in faults if fault.remaining != 0]
            return due

    def _sync(self) -> None:
        """Mirror the test's handlers (and the faults' events) into the server's policy."""
        with self._lock:
            # smtp_server_data records each transaction; init never runs here.
            events = {*self.policy.events(), *self._faults, "smtp_server_data"} - {"init"}
        for event in set(self._own.events()) - events:
            self._own.remove(event)
        for event in events - set(self._own.events()):
            self._own.on(event, self._wrapper(event))

    def _wrapper(self, event: str) -> Callable[..., Any]:
        async def handle(*args: Any) -> Any:
            # Delays in the order given, then a refusal (which raises Reject).
            for fault in sorted(self._take_faults(event), key=lambda fault: fault.refuses):
                outcome = fault.action()
                if inspect.isawaitable(outcome):
                    await outcome
            handler = self.policy.handler(event)
            try:
                result = handler(*args) if handler is not None else None
                if inspect.isawaitable(result):
                    result = await result
            except BaseException:
                if event == "smtp_server_message_received":
                    self._forget(args[0])
                raise
            if event == "smtp_server_data":
                self._record(args[0])
            return result

        handle.__qualname__ = f"SMTPTestServer[{event}]"
        return handle

    def _record(self, message: Any) -> None:
        with self._lock:
            number, self._next = self._next, self._next + 1
            self._transactions[number] = _Transaction(
                str(message.sender), [str(r) for r in message.recipients], message.data
            )
            self._lock.notify_all()
        message.set_meta(_TRANSACTION_META, number)

    def _forget(self, message: Any) -> None:
        """A part of the transaction was refused after ``smtp_server_data``."""
        with self._lock:
            self._transactions.pop(message.get_meta(_TRANSACTION_META), None)


@pytest.fixture
def smtp_server_policy() -> Policy:
    """The policy of ``smtp_server``: override this fixture to give handlers
    (the default has none: every message is accepted)."""
    return Policy()


@pytest.fixture
def smtp_server_params() -> Mapping[str, Any]:
    """Listener parameters of ``smtp_server`` (``listen`` is ``127.0.0.1:0``
    unless given): override this fixture to change them. The default relays
    for anyone, to any domain."""
    return dict(DEFAULT_PARAMS)


@pytest.fixture
def smtp_server(
    smtp_server_policy: Policy,
    smtp_server_params: Mapping[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SMTPTestServer]:
    """A running SMTP server on ``127.0.0.1``, stopped after the test."""
    maildir = tmp_path_factory.mktemp("smtp_server") / "maildir"
    server = SMTPTestServer(smtp_server_policy, maildir, smtp_server_params)
    try:
        yield server
    finally:
        server.stop()
