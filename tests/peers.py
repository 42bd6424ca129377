"""Real mail servers the tests run on loopback beside us: private Postfix
instances (a client relaying to us, an upstream receiving from us), Postfix's
``smtp-sink`` with its fault flags, and Dovecot's LMTP server. Recipes:
/work/shared/reference/real-peers.md. Each starts with its own files under a
directory the caller owns and is stopped by the caller.

Plain classes only; the fixtures that start them are in the test files.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from support import free_port, require_tool, wait_until

MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
smtp      unix  -       -       n       -       -       smtp
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A directory under /var/tmp, open to the peers' own users (Postfix,
    Dovecot): pytest's tmp_path lives under a 0700 directory."""
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class PrivatePostfix:
    """A Postfix instance of its own (``postfix -c DIR/etc``). `main` adds
    to or replaces its main.cf settings; with `smtpd_port` it also receives
    SMTP on 127.0.0.1:`smtpd_port`. Nothing is chrooted."""

    def __init__(
        self, directory: Path, main: dict[str, object], smtpd_port: int | None = None
    ) -> None:
        require_tool("postfix")
        require_tool("script", "bsdutils")
        self.directory = directory
        self.etc = directory / "etc"
        self.log = directory / "postfix.log"
        self.mail = directory / "mail"
        for name in ("etc", "spool", "lib", "mail"):
            (directory / name).mkdir(mode=0o755)
        shutil.chown(directory / "lib", "postfix")
        shutil.chown(self.mail, 65534, 65534)
        settings: dict[str, object] = {
            "compatibility_level": "3.6",
            "queue_directory": directory / "spool",
            "data_directory": directory / "lib",
            "maillog_file": self.log,
            "maillog_file_prefixes": directory,
            "myhostname": "postfix.test.example",
            "mydestination": "",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "inet_interfaces": "all" if smtpd_port else "loopback-only",
            "inet_protocols": "ipv4",
            "bounce_queue_lifetime": "0",
            "maximal_queue_lifetime": "0",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtpd_client_connection_count_limit": "0",
            "smtpd_client_connection_rate_limit": "0",
            "smtpd_client_message_rate_limit": "0",
        }
        settings.update(main)
        lines = [f"{key} = {value}\n" for key, value in settings.items()]
        (self.etc / "main.cf").write_text("".join(lines))
        master = MASTER_CF
        if smtpd_port:
            master += f"127.0.0.1:{smtpd_port} inet n - n - - smtpd\n"
        (self.etc / "master.cf").write_text(master)
        self.postfix("start")

    @classmethod
    def upstream(
        cls, directory: Path, port: int, extra: dict[str, object] | None = None
    ) -> PrivatePostfix:
        """A receiving Postfix: the domains d.example and b.example delivered
        into one Maildir (`inbox/` under `mail`), as user nobody; the
        recipients reject@d.example and tempfail@d.example refused."""
        access = (
            "inline:{ {reject@d.example=REJECT no such user here}"
            " {tempfail@d.example=450 4.2.0 try again later} }"
        )
        main: dict[str, object] = {
            "virtual_mailbox_domains": "d.example b.example",
            "virtual_mailbox_base": directory / "mail",
            "virtual_mailbox_maps": "static:inbox/",
            "virtual_uid_maps": "static:65534",
            "virtual_gid_maps": "static:65534",
            "smtpd_recipient_restrictions": f"check_recipient_access {access}, permit",
        }
        main.update(extra or {})
        return cls(directory, main, smtpd_port=port)

    def postfix(self, command: str) -> None:
        # Postfix prints its start-up errors only to a terminal.
        run = ["script", "-qc", f"postfix -c {self.etc} {command}", "/dev/null"]
        result = subprocess.run(run, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr

    def send(self, sender: str, recipients: list[str], message: bytes, *options: str) -> None:
        command = ["sendmail", "-C", str(self.etc), "-f", sender, *options, *recipients]
        subprocess.run(command, input=message, check=True, timeout=60)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def statuses(self, recipients: list[str], within: float = 120.0) -> dict[str, str]:
        """Each recipient's final ``status=`` in Postfix's log, once all have one."""

        def found() -> dict[str, str] | None:
            found = dict(re.findall(r" to=<([^>]+)>,.* status=(\w+)", self.log_text()))
            return found if all(recipient in found for recipient in recipients) else None

        return wait_until(
            found, within, lambda: f"a status for every recipient:\n{self.log_text()}", interval=0.2
        )

    def inbox(self, count: int, within: float = 60.0) -> list[bytes]:
        """The messages delivered into the Maildir, once there are `count`."""

        def files() -> list[bytes] | None:
            new = self.mail / "inbox" / "new"
            found = sorted(new.iterdir()) if new.exists() else []
            return [path.read_bytes() for path in found] if len(found) >= count else None

        return wait_until(
            files, within, lambda: f"{count} messages:\n{self.log_text()}", interval=0.2
        )

    def stop(self) -> None:
        with contextlib.suppress(AssertionError):
            self.postfix("stop")


class SmtpSink:
    """Postfix's ``smtp-sink`` on a port of its own, with fault `flags`
    (``-q .``: close after the final dot with no reply; ``-r CMD``: 4xx;
    ``-f CMD``: 5xx; ``-W CMD:S``: slow; ``-L``: LMTP)."""

    def __init__(self, *flags: str) -> None:
        path = require_tool("smtp-sink", "postfix")
        self.port = free_port()
        self.url = f"{'lmtp' if '-L' in flags else 'smtp'}://127.0.0.1:{self.port}"
        command = [path, "-u", "nobody", *flags, f"127.0.0.1:{self.port}", "100"]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        wait_until(self.listening, 10, "smtp-sink listening")

    def listening(self) -> bool:
        assert self.process.poll() is None, (
            self.process.stderr.read() if self.process.stderr else ""
        )
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
            return True
        return False

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(10)


DOVECOT_CONF = """\
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/dovecot.log
protocols = lmtp
ssl = no
auth_username_format = %Ln
first_valid_uid = 1000
last_valid_uid = 0
mail_location = maildir:~/Maildir
mail_plugins = quota
plugin {{
  quota = maildir:User quota
}}
passdb {{
  driver = passwd-file
  args = {dir}/users
}}
userdb {{
  driver = passwd-file
  args = {dir}/users
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
}}
"""


class Dovecot:
    """Dovecot's LMTP server with the users alice, bob and full (whose quota
    of 1 byte refuses every message after the data, 552), at any domain."""

    def __init__(self, directory: Path) -> None:
        require_tool("dovecot", "dovecot-lmtpd")
        self.directory = directory
        self.port = free_port()
        self.url = f"lmtp://127.0.0.1:{self.port}"
        self.conf = directory / "dovecot.conf"
        users = [
            f"alice::65534:65534::{directory}/mail/alice::",
            f"bob::65534:65534::{directory}/mail/bob::",
            f"full::65534:65534::{directory}/mail/full::userdb_quota_rule=*:storage=1",
        ]
        (directory / "users").write_text("\n".join(users) + "\n")
        (directory / "mail").mkdir()
        shutil.chown(directory / "mail", 65534, 65534)
        self.conf.write_text(DOVECOT_CONF.format(dir=directory, port=self.port))
        subprocess.run(["dovecot", "-c", str(self.conf)], check=True, timeout=30)
        wait_until(self.listening, 10, lambda: f"Dovecot listening:\n{self.log()}")

    def listening(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
            return True
        return False

    def log(self) -> str:
        path = self.directory / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def mailbox(self, user: str) -> list[bytes]:
        new = self.directory / "mail" / user / "Maildir" / "new"
        return [path.read_bytes() for path in sorted(new.iterdir())] if new.exists() else []

    def stop(self) -> None:
        subprocess.run(["doveadm", "-c", str(self.conf), "stop"], capture_output=True, timeout=30)
        deadline = time.monotonic() + 10
        while self.listening() and time.monotonic() < deadline:
            time.sleep(0.1)


# Nothing written to disk.
REDIS_PRIVATE = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir"]


class Redis:
    """A private ``redis-server`` on a free port (or `port`), restartable on
    it, with these extra `options` (e.g. ``["--enable-debug-command", "local"]``)."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        start: bool = True,
        options: Sequence[str] = (),
    ) -> None:
        self.binary = require_tool("redis-server")
        self.options = list(options)
        self.port = port if port is not None else free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        if start:
            self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                *REDIS_PRIVATE,
                str(self.workdir),
                *self.options,
            ],
            stdout=subprocess.DEVNULL,
        )
        wait_until(self._answers, within=10, what="redis-server to answer")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as probe:
                probe.sendall(b"PING\r\n")
                return probe.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def command(self, *args: str) -> str:
        cli = require_tool("redis-cli", "redis-tools")
        result = subprocess.run(
            [cli, "-p", str(self.port), *args], capture_output=True, text=True, timeout=10
        )
        return result.stdout.strip()
