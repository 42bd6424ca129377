"""The pytest plugin (``kumo_listener.testing``), used as a user would: a
project's test files, run by pytest in a subprocess that loads the plugin
through its ``pytest11`` entry point."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

APP = '''
"""An application that sends mail, with a retry on temporary failures."""
import smtplib
import time
from email.message import EmailMessage


def send_welcome(address, to, cc=()):
    message = EmailMessage()
    message["From"] = "app@example.org"
    message["To"] = to
    if cc:
        message["Cc"] = ", ".join(cc)
    message["Subject"] = "Welcome"
    message.set_content("Hello, and welcome!")
    with smtplib.SMTP(*address, timeout=10) as smtp:
        smtp.send_message(message)


def send_with_retry(address, to, attempts=3, pause=0.01):
    for attempt in range(1, attempts + 1):
        try:
            send_welcome(address, to)
            return attempt
        except smtplib.SMTPRecipientsRefused as error:
            if any(code >= 500 for code, _ in error.recipients.values()):
                raise
        except smtplib.SMTPResponseException as error:
            if error.smtp_code >= 500:
                raise
        time.sleep(pause)
    raise RuntimeError(f"gave up after {attempts} attempts")
'''

TESTS = """
import smtplib
import threading
import time

import kumo_listener as kumo
import pytest

from app import send_welcome, send_with_retry


def test_the_plugin_is_loaded_by_its_entry_point(pytestconfig):
    assert pytestconfig.pluginmanager.has_plugin("kumo_listener")


def test_a_message_is_received_and_parsed(smtp_server):
    assert smtp_server.address == (smtp_server.host, smtp_server.port)
    assert smtp_server.host == "127.0.0.1" and smtp_server.port > 0
    send_welcome(smtp_server.address, "ann@example.com", cc=["bob@example.net"])
    [mail] = smtp_server.messages
    assert mail["Subject"] == "Welcome"
    assert mail["To"] == "ann@example.com"
    assert mail.get_content() == "Hello, and welcome!\\n"
    assert mail.mail_from == "app@example.org"
    assert mail.rcpt_to == ["ann@example.com", "bob@example.net"]
    assert mail.raw.startswith(b"Received: ")
    assert mail["Received"].startswith("from ")
    assert len(list((smtp_server.maildir / "new").iterdir())) == 2  # one file per recipient


def test_each_test_gets_a_fresh_server(smtp_server):
    assert smtp_server.messages == []


def test_refusals_exercise_the_retry(smtp_server):
    smtp_server.refuse_next(2, 451, "4.3.0 try later", at="rcpt")
    assert send_with_retry(smtp_server.address, "ann@example.com") == 3
    assert len(smtp_server.messages) == 1


def test_a_permanent_refusal_is_not_retried(smtp_server):
    smtp_server.refuse_next(1, 550, "5.7.1 no thanks", at="mail")
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        send_with_retry(smtp_server.address, "ann@example.com")
    assert refused.value.smtp_code == 550 and b"5.7.1 no thanks" in refused.value.smtp_error
    assert smtp_server.messages == []


def test_refusing_the_connection_and_the_data(smtp_server):
    smtp_server.refuse_next(at="connect", code=421, text="4.3.2 maintenance")
    with pytest.raises(smtplib.SMTPConnectError):
        smtplib.SMTP(*smtp_server.address, timeout=10)
    smtp_server.refuse_next(at="data")
    with pytest.raises(smtplib.SMTPDataError):
        send_welcome(smtp_server.address, "ann@example.com")
    send_welcome(smtp_server.address, "ann@example.com")
    assert len(smtp_server.messages) == 1


def test_a_delay_holds_one_connection_not_the_others(smtp_server):
    smtp_server.delay(1.0, at="data", count=1)
    slow = threading.Thread(target=send_welcome, args=(smtp_server.address, "slow@example.com"))
    started = time.monotonic()
    slow.start()
    time.sleep(0.2)
    send_welcome(smtp_server.address, "fast@example.com")
    assert time.monotonic() - started < 0.9
    slow.join()
    assert time.monotonic() - started >= 1.0
    assert [m.rcpt_to for m in smtp_server.messages] == [["fast@example.com"], ["slow@example.com"]]


def test_wait_for_messages_sent_from_another_thread(smtp_server):
    threading.Timer(0.2, send_welcome, (smtp_server.address, "ann@example.com")).start()
    [mail] = smtp_server.wait_for_messages(1, timeout=10)
    assert mail.rcpt_to == ["ann@example.com"]
    smtp_server.clear()
    assert smtp_server.messages == []
    with pytest.raises(AssertionError, match="expected 1 messages within 0.1s, got 0"):
        smtp_server.wait_for_messages(1, timeout=0.1)


def test_handlers_added_during_the_test(smtp_server):
    @smtp_server.policy.on("smtp_server_rcpt_to")
    def rcpt(recipient, conn_meta):
        if recipient.domain == "blocked.example":
            raise kumo.Reject(550, "5.1.1 no such user")

    with pytest.raises(smtplib.SMTPRecipientsRefused):
        send_welcome(smtp_server.address, "x@blocked.example")
    send_welcome(smtp_server.address, "ann@example.com")
    assert [m.rcpt_to for m in smtp_server.messages] == [["ann@example.com"]]
"""

OVERRIDES = """
import smtplib

import kumo_listener as kumo
import pytest

from app import send_welcome


@pytest.fixture
def smtp_server_policy():
    policy = kumo.Policy()

    @policy.on("smtp_server_message_received")
    def received(message, conn_meta):
        if b"reject me" in message.data:
            raise kumo.Reject(554, "5.7.1 spam")

    return policy


@pytest.fixture
def smtp_server_params():
    return {"hostname": "mx.custom.example", "relay_hosts": ["127.0.0.1"]}


def test_the_policy_and_params_fixtures(smtp_server):
    with smtplib.SMTP(*smtp_server.address, timeout=10) as smtp:
        assert smtp.ehlo()[1].startswith(b"mx.custom.example")
        with pytest.raises(smtplib.SMTPDataError):
            smtp.sendmail("a@example.org", ["b@example.com"], b"Subject: x\\r\\n\\r\\nreject me")
    assert smtp_server.messages == []
    send_welcome(smtp_server.address, "ann@example.com")
    assert len(smtp_server.messages) == 1
"""


def test_the_plugin_as_a_user_would_use_it(pytester: pytest.Pytester):
    pytester.makepyfile(app=APP, test_app=TESTS, test_overrides=OVERRIDES)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=TESTS.count("\ndef test_") + OVERRIDES.count("\ndef test_"))


def test_bad_fault_arguments(smtp_server):
    with pytest.raises(ValueError, match="at: expected one of connect, ehlo, mail, rcpt, data"):
        smtp_server.refuse_next(at="quit")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="4xx or 5xx"):
        smtp_server.refuse_next(code=250)
    with pytest.raises(ValueError, match="count must be positive"):
        smtp_server.delay(1, count=0)
