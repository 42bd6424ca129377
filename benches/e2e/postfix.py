"""A private Postfix with its own configuration and queue (``postfix -c DIR
start``): the durable server kumo_listener's Maildir sink is compared with, and
the before-queue proxy (``smtpd_proxy_filter``) its forwarding is compared with."""

from __future__ import annotations

import contextlib
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .common import LOOPBACK, POSTFIX_PROXY, POSTFIX_QUEUE, BenchError, ServerKind, log
from .processes import READY_TIMEOUT, STOP_TIMEOUT, RunningServer, free_port, wait_until_ready

POSTFIX_LOG_WAIT = 60.0
POSTFIX_SENT = re.compile(r" status=sent ")
# What the proxying smtpd logs when the filter took a message (and it answered 250).
POSTFIX_PROXY_ACCEPT = re.compile(r" proxy-accept: END-OF-MESSAGE: 250 ")
POSTFIX_TROUBLE = re.compile(r"^.* (fatal|panic|error|proxy-reject): .*$", re.MULTILINE)

POSTFIX_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {base}/spool
data_directory = {base}/lib
maillog_file = {base}/postfix.log
maillog_file_prefixes = {base}
myhostname = postfix-queue.bench.example
mydestination =
alias_maps =
alias_database =
local_recipient_maps =
inet_interfaces = all
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
default_transport = discard
relay_transport = discard
message_size_limit = 104857600
default_process_limit = 200
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
smtpd_peername_lookup = no
in_flow_delay = 0s
"""


@contextlib.contextmanager
def running_postfix_queue() -> Iterator[RunningServer]:
    """Postfix with its own configuration and queue under /var/tmp (each directory
    on the way must be open to the ``postfix`` user): smtpd on a free port,
    cleanup fsyncs each message into the queue before smtpd's 250, and the
    ``discard`` transport takes it out again. Anvil's limits are off and
    ``in_flow_delay`` is 0, so that nothing but the work paces it; no DNS."""
    with running_postfix(POSTFIX_QUEUE, "", POSTFIX_SENT) as server:
        yield server


@contextlib.contextmanager
def running_postfix_proxy(filter_port: int) -> Iterator[RunningServer]:
    """The same Postfix as a before-queue proxy: its smtpd has
    ``-o smtpd_proxy_filter=127.0.0.1:FILTER_PORT`` (SMTPD_PROXY_README), so it
    does its own checks of MAIL and RCPT, then opens a connection to the filter
    per message (EHLO, XFORWARD when offered, MAIL, each RCPT, DATA, no
    pipelining, QUIT), passes on the commands it accepted and gives its client
    the filter's replies. Nothing goes through cleanup or the queue: the filter
    would re-inject the message into another smtpd; here it is the upstream
    itself. Without ``smtpd_proxy_options = speed_adjust`` the filter's
    connection is opened at MAIL FROM and the message is relayed as it comes."""
    options = f" -o smtpd_proxy_filter={LOOPBACK}:{filter_port}"
    with running_postfix(POSTFIX_PROXY, options, POSTFIX_PROXY_ACCEPT) as server:
        yield server


@contextlib.contextmanager
def running_postfix(
    kind: ServerKind, smtpd_options: str, counted: re.Pattern[str]
) -> Iterator[RunningServer]:
    """A private Postfix whose public smtpd (on a free port) has ``smtpd_options``;
    its message counter is the number of its log lines that match ``counted``."""
    port = free_port()
    base = Path(tempfile.mkdtemp(prefix="kumo-e2e-postfix-", dir="/var/tmp"))
    base.chmod(0o755)
    etc, lib = base / "etc", base / "lib"
    for directory in (etc, base / "spool", lib):
        directory.mkdir()
    shutil.chown(lib, "postfix")
    (etc / "main.cf").write_text(POSTFIX_MAIN_CF.format(base=base))
    master = Path("/etc/postfix/master.cf").read_text()
    listener = f"{LOOPBACK}:{port} inet n - n - - smtpd{smtpd_options}"
    master, replaced = re.subn(r"(?m)^smtp\s+inet\s.*$", listener, master)
    if replaced != 1:
        raise BenchError("no `smtp inet` line in /etc/postfix/master.cf")
    (etc / "master.cf").write_text(master)
    subprocess.run(["postconf", "-c", str(etc), "-F", "*/*/chroot = n"], check=True)
    log_path, stderr_path = base / "postfix.log", base / "start.log"
    log_path.touch()
    try:
        # Postfix prints why it did not start only to a terminal: give it one.
        start = f"postfix -c {shlex.quote(str(etc))} start"
        result = subprocess.run(
            ["script", "-qec", start, "/dev/null"], capture_output=True, text=True
        )
        stderr_path.write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            raise BenchError(f"{start} failed:\n{result.stdout}{result.stderr}")
        server = RunningServer(
            kind=kind,
            process=None,
            pid=postfix_master_pid(base / "spool"),
            port=port,
            stderr_path=stderr_path,
            count_file=None,
            maildir=None,
            postfix_log=PostfixLog(log_path, counted),
            stderr_offset=stderr_path.stat().st_size,  # "starting the Postfix mail system"
        )
        log(f"e2e: started {kind.title}: {start} (listening on {LOOPBACK}:{port})")
        wait_until_ready(server, stderr_path)
        yield server
    finally:
        stop_postfix(etc)
        shutil.rmtree(base, ignore_errors=True)


def postfix_master_pid(spool: Path) -> int:
    deadline = time.monotonic() + READY_TIMEOUT
    pid_file = spool / "pid" / "master.pid"
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            return int(pid_file.read_text().strip())
        time.sleep(0.05)
    raise BenchError(f"no {pid_file} after {READY_TIMEOUT:.0f} s")


def stop_postfix(etc: Path) -> None:
    """``postfix stop``; ``postfix abort`` if the master does not end."""
    for action in ("stop", "abort"):
        command = ["postfix", "-c", str(etc), action]
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(command, capture_output=True, timeout=STOP_TIMEOUT)
        status = subprocess.run(["postfix", "-c", str(etc), "status"], capture_output=True)
        if status.returncode != 0:  # not running
            return


@dataclass
class PostfixLog:
    """Postfix's log, read as it grows."""

    path: Path
    counted: re.Pattern[str] = POSTFIX_SENT
    """The lines that count a message: ``status=sent`` (delivered), or ``proxy-accept``."""
    offset: int = 0
    sent_lines: int = 0

    def sent(self, at_least: int) -> int:
        """Messages logged (``counted`` lines), once there are ``at_least``, or
        when none came for ``POSTFIX_LOG_WAIT``; BenchError on a fatal or panic."""
        deadline = time.monotonic() + POSTFIX_LOG_WAIT
        while True:
            before = self.sent_lines
            self.read_new_lines()
            if self.sent_lines >= at_least:
                return self.sent_lines
            if self.sent_lines > before:
                deadline = time.monotonic() + POSTFIX_LOG_WAIT
            elif time.monotonic() > deadline:
                return self.sent_lines
            time.sleep(0.05)

    def read_new_lines(self) -> None:
        with self.path.open("rb") as stream:
            stream.seek(self.offset)
            data = stream.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        text = complete.decode(errors="replace")
        self.sent_lines += len(self.counted.findall(text))
        trouble = POSTFIX_TROUBLE.search(text)
        if trouble:
            raise BenchError(f"Postfix logged: {text[trouble.start() :][:2000]}")
