"""End-to-end benchmark: kumo_listener against aiosmtpd and Postfix's smtp-sink.

Usage::

    python3 benches/e2e.py                 # full run (a few minutes)
    python3 benches/e2e.py --quick         # smoke run: tiny counts, one repetition
    python3 benches/e2e.py --json out.json # also write the results as JSON

Options: ``--sessions`` (parallel smtp-source sessions, 16), ``--repeat`` (timed
runs per cell, 3), ``--seconds`` (target length of a run, 3), ``--idle`` (idle
connections, 5000), ``--kumo-log-level`` (WARNING), ``--durable-sessions`` (50),
``--memory-sessions`` (50), ``--memory-megabytes`` (5), ``--memory-seconds`` (4).

Each server runs as its own process on a free 127.0.0.1 port, one after the other:

- kumo_listener, ``python3 -m kumo_listener serve --policy benches/policy_bench.py``
  with ``--sink discard``, then with ``--sink maildir`` (fsync'd delivery into a
  temporary directory);
- aiosmtpd, ``python3 benches/aiosmtpd_server.py PORT COUNT_FILE --tls CERT KEY``
  (count, ``250 OK``);
- Postfix's ``smtp-sink`` (discards everything).

Postfix's ``smtp-source`` drives each in three shapes: a new connection per 1 KB
message, reused connections with 1 KB messages, and reused connections with
100 KB messages. Outside ``--quick``, a warm-up run calibrates the message count
so that a run lasts about ``--seconds``; then ``--repeat`` runs are timed and the
median is reported. A run fails (and is reported as failed, not as a number) when
smtp-source exits non-zero or writes to stderr, when the server's message counter
(or, for Maildir, the number of delivered files) differs from the number sent, or
when the server logs an error meanwhile. Delivered Maildir files are kept until
that server stops (deleting them between runs slows the next runs' fsyncs down),
unless the disk runs short.

Then the resident memory per idle connection of kumo_listener (discard) and
aiosmtpd: RSS of a fresh server process before and after opening ``--idle``
connections that have read their banner.

Durable delivery: kumo_listener (discard), kumo_listener (maildir) and a private
Postfix with its queue (``postfix -c DIR start``, its own ``queue_directory`` under
/var/tmp, ``default_transport = discard``: cleanup fsyncs each message into the
queue before smtpd's 250) run at the same time, with ``--durable-sessions``
smtp-source sessions, a new connection per 1 KB message and reused connections;
their timed runs take turns. The table gives Maildir/discard and Maildir/Postfix.
A Postfix run counts when its log has a ``status=sent`` line per message sent.
Server CPU is that of the server's process tree, with the CPU of the children
it has reaped (``/proc/PID/stat`` utime, stime, cutime, cstime): for Postfix,
master, smtpd, cleanup, qmgr, the discard transport and the rest.

Memory with big bodies: ``--memory-sessions`` clients each send a message of
``--memory-megabytes`` over ``--memory-seconds`` and wait before the final dot;
kumo_listener (maildir), aiosmtpd and the Postfix queue. Memory is the sum of the
Pss (``/proc/PID/smaps_rollup``) of the server's process tree: before, at the
pause, and the highest of samples every 0.1 s; for single processes also VmHWM
(reset through ``clear_refs``) minus VmRSS before.

The harness installs what it lacks: the Debian package ``postfix`` (configured as
"No configuration", so no mail system is set up; its ports are never used) and
the PyPI packages ``aiosmtpd`` and ``cryptography``. It raises its own open-file
limit, which the server processes inherit. All processes it starts run in their
own process group and are killed on exit, errors and Ctrl-C. The exit status is
1 when anything failed.

STARTTLS: the Rust load client ``benches/starttls-load`` (built by the harness)
runs sessions of banner, EHLO, STARTTLS, a full TLS handshake (no resumption),
EHLO, QUIT, ``--sessions`` at a time on one thread. kumo_listener listens on
every address and its dynamic hook gives 127.0.0.1 and 127.0.0.2 each its own
certificate (the client checks that each address presented its own); aiosmtpd
has one ``ssl`` context. The certificates are ECDSA P-256, made by the harness
with ``cryptography``.

kumo_listener runs with ``--log-level WARNING`` (``--kumo-log-level``): at the
default INFO it logs a line per message, as aiosmtpd does at INFO, which neither
does here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCHES = Path(__file__).resolve().parent
POLICY = BENCHES / "policy_bench.py"
AIOSMTPD_SERVER = BENCHES / "aiosmtpd_server.py"
STARTTLS_LOAD = BENCHES / "starttls-load"
LOOPBACK = "127.0.0.1"
# The policy's `via` table: the certificate each local address must present.
KUMO_TLS_IDENTITIES = {"127.0.0.1": "mx.example-customer.com", "127.0.0.2": "mx.other-customer.com"}
TLS_HOSTNAMES = ("bench.example", *KUMO_TLS_IDENTITIES.values())
AIOSMTPD_TLS_HOSTNAME = "bench.example"
STARTTLS_QUICK_COUNT = 64
SENDER = "sender@client.example"
RECIPIENT = "rcpt@dest.example"
POSTFIX_DEBCONF = "postfix postfix/main_mailer_type select No configuration\n"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
MIN_CALIBRATION_SECONDS = 0.5
MESSAGE_OVERHEAD_BYTES = 4096  # headers smtp-source and the server add, file system slack
MESSAGES_PER_CONNECTION_CAP = 5000  # kumo_listener's max_messages_per_connection is 10000
SERVER_LOG_ERROR = re.compile(r"\b(ERROR|CRITICAL)\b|Traceback|panicked")


@dataclass(frozen=True)
class Shape:
    """One way of sending mail with smtp-source."""

    key: str
    title: str
    size: int
    reuse: bool
    quick_count: int
    warmup_per_session: int


SHAPES = (
    Shape("new_connection_1k", "new connection per message, 1 KB", 1024, False, 160, 20),
    Shape("reused_connection_1k", "reused connections, 1 KB", 1024, True, 320, 20),
    Shape("reused_connection_100k", "reused connections, 100 KB", 102400, True, 64, 5),
)


@dataclass(frozen=True)
class ServerKind:
    key: str
    title: str


KUMO_DISCARD = ServerKind("kumo_discard", "kumo_listener (discard)")
# The defaults an operator runs with: INFO logging (a line per message and per
# connection) and the Prometheus endpoint, so that their cost is visible.
KUMO_OBSERVED = ServerKind("kumo_observed", "kumo_listener (discard, INFO logs, metrics)")
KUMO_MAILDIR = ServerKind("kumo_maildir", "kumo_listener (maildir)")
AIOSMTPD = ServerKind("aiosmtpd", "aiosmtpd")
SMTP_SINK = ServerKind("smtp_sink", "smtp-sink")
POSTFIX_QUEUE = ServerKind("postfix_queue", "Postfix (queue, discard transport)")
SERVERS = (KUMO_DISCARD, KUMO_OBSERVED, KUMO_MAILDIR, AIOSMTPD, SMTP_SINK)
COUNTED = (KUMO_DISCARD, KUMO_OBSERVED, KUMO_MAILDIR, AIOSMTPD)
# Durable delivery side by side: what a durable 250 costs, against discarding.
DURABLE_SERVERS = (KUMO_DISCARD, KUMO_MAILDIR, POSTFIX_QUEUE)
DURABLE_SHAPES = (
    Shape("durable_new_connection_1k", "new connection per message, 1 KB", 1024, False, 100, 4),
    Shape("durable_reused_connection_1k", "reused connections, 1 KB", 1024, True, 200, 20),
)
# Bodies held while their sessions are slow: what a server keeps in memory.
BODY_MEMORY_SERVERS = (KUMO_MAILDIR, AIOSMTPD, POSTFIX_QUEUE)
BODY_LINE = b"x" * 998 + b"\r\n"
BODY_CHUNK_LINES = 64
POSTFIX_LOG_WAIT = 60.0
POSTFIX_SENT = re.compile(r" status=sent ")
POSTFIX_TROUBLE = re.compile(r"^.* (fatal|panic|error): .*$", re.MULTILINE)


class BenchError(Exception):
    """A measurement that failed; the message says why."""


@dataclass(frozen=True)
class Settings:
    quick: bool
    sessions: int
    repeat: int
    seconds: float
    idle: int
    kumo_log_level: str
    run_timeout: float
    workdir: Path
    durable_sessions: int
    memory_sessions: int
    memory_megabytes: int
    memory_seconds: float

    @property
    def tls_dir(self) -> Path:
        return self.workdir / "tls"


@dataclass(frozen=True)
class Tools:
    smtp_source: str
    smtp_sink: str
    starttls_load: Path


@dataclass(frozen=True)
class Run:
    """One timed run: how many messages (or sessions) in how long, and the
    CPU time (user and system) the server and the load generator spent."""

    count: int
    seconds: float
    server_cpu: float
    client_cpu: float


@dataclass
class Measured:
    """The timed runs of one measurement, or why it failed."""

    runs: list[Run] = field(default_factory=list)
    error: str | None = None

    @property
    def rates(self) -> list[float]:
        return [run.count / run.seconds for run in self.runs]

    @property
    def median(self) -> float | None:
        return None if self.error or not self.runs else statistics.median(self.rates)

    def cpu_us(self) -> tuple[float, float] | None:
        """Median CPU microseconds per message (or session): (server, load generator)."""
        if self.error or not self.runs:
            return None
        server = statistics.median(1e6 * run.server_cpu / run.count for run in self.runs)
        client = statistics.median(1e6 * run.client_cpu / run.count for run in self.runs)
        return server, client


@dataclass
class Throughput(Measured):
    """The runs of one (shape, server) pair."""

    messages_per_run: int = 0


@dataclass
class IdleMemory:
    connections: int = 0
    rss_before_kib: int = 0
    rss_after_kib: int = 0
    error: str | None = None

    @property
    def kib_per_connection(self) -> float | None:
        if self.error or not self.connections:
            return None
        return (self.rss_after_kib - self.rss_before_kib) / self.connections


def log(text: str) -> None:
    """Progress goes to stderr; the results go to stdout."""
    print(text, file=sys.stderr, flush=True)


# --- installing what the harness needs ---------------------------------------------


def ensure_tools() -> Tools:
    postfix = find_postfix_tools()
    if postfix is None:
        install_postfix()
        postfix = find_postfix_tools()
    if postfix is None:
        raise SystemExit("e2e: smtp-source/smtp-sink not found even after installing postfix")
    missing = [
        name for name in ("aiosmtpd", "cryptography") if importlib.util.find_spec(name) is None
    ]
    if missing:
        log(f"e2e: installing {', '.join(missing)} from PyPI")
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, *missing], check=True)
    smtp_source, smtp_sink = postfix
    return Tools(smtp_source, smtp_sink, build_starttls_load())


def find_postfix_tools() -> tuple[str, str] | None:
    listing = subprocess.run(["dpkg", "-L", "postfix"], capture_output=True, text=True)
    if listing.returncode != 0:
        return None
    paths = {Path(line).name: line for line in listing.stdout.splitlines()}
    source, sink = paths.get("smtp-source"), paths.get("smtp-sink")
    if source is None or sink is None or not os.access(source, os.X_OK):
        return None
    return source, sink


def build_starttls_load() -> Path:
    log("e2e: building benches/starttls-load")
    manifest = STARTTLS_LOAD / "Cargo.toml"
    command = ["cargo", "build", "--quiet", "--release", "--manifest-path", str(manifest)]
    subprocess.run(command, check=True)
    return STARTTLS_LOAD / "target" / "release" / "starttls-load"


def make_certificates(directory: Path) -> None:
    """A self-signed ECDSA P-256 certificate and key per name in TLS_HOSTNAMES,
    as ``NAME.crt`` and ``NAME.key`` (what the benchmark policy reads)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    for hostname in TLS_HOSTNAMES:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
            .sign(key, hashes.SHA256())
        )
        pem = serialization.Encoding.PEM
        (directory / f"{hostname}.crt").write_bytes(certificate.public_bytes(pem))
        private = key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        (directory / f"{hostname}.key").write_bytes(private)


def install_postfix() -> None:
    log("e2e: installing the Debian package postfix (for smtp-source and smtp-sink)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["debconf-set-selections"], input=POSTFIX_DEBCONF, text=True, check=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "postfix"]
    subprocess.run(install, check=True, env=env, stdout=subprocess.DEVNULL)


def raise_open_file_limit(needed: int) -> None:
    """Raise RLIMIT_NOFILE to ``needed``; processes started later inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        with contextlib.suppress(ValueError, OSError):  # raising the hard limit needs root
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            return
        needed = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


# --- server processes ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


@dataclass
class RunningServer:
    kind: ServerKind
    process: subprocess.Popen[bytes] | None
    """None for Postfix, which puts itself in the background."""
    pid: int
    """The process whose tree is the server (Postfix: its master)."""
    port: int
    stderr_path: Path
    count_file: Path | None
    maildir: Path | None
    postfix_log: PostfixLog | None = None
    stderr_offset: int = 0

    def check_alive(self) -> None:
        if self.process is None:
            if not Path(f"/proc/{self.pid}").exists():
                tail = self.stderr_path.read_text(errors="replace")[-4000:]
                raise BenchError(f"{self.kind.title}: its master process is gone:\n{tail}")
            return
        if self.process.poll() is not None:
            tail = self.stderr_path.read_text(errors="replace")[-4000:]
            raise BenchError(f"{self.kind.title} exited with {self.process.returncode}:\n{tail}")

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)

    def new_log_output(self) -> str:
        """What the server wrote to stderr since the last call."""
        with self.stderr_path.open("rb") as stream:
            stream.seek(self.stderr_offset)
            data = stream.read()
        self.stderr_offset += len(data)
        return data.decode(errors="replace")

    def received(self, at_least: int = 0) -> int | None:
        """The server's message counter (asked for with SIGUSR1), if it has one.

        Postfix's counter is its log's ``status=sent`` lines: it delivers (to the
        discard transport) after its 250, so this waits until ``at_least``."""
        if self.postfix_log is not None:
            return self.postfix_log.sent(at_least)
        if self.count_file is None:
            return None
        self.count_file.unlink(missing_ok=True)
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 10.0
        while not self.count_file.exists():
            self.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"{self.kind.title} did not write {self.count_file}")
            time.sleep(0.01)
        return int(self.count_file.read_text().strip())

    def delivered_files(self) -> int | None:
        if self.maildir is None:
            return None
        return sum(1 for _ in os.scandir(self.maildir / "new"))

    def make_room(self, needed_bytes: int) -> None:
        """Empty the Maildir if fewer than twice ``needed_bytes`` are free.

        Only then: deleting thousands of files slows the fsyncs of the next runs
        down (by several times on this project's machines), so delivered
        messages are normally kept until the server stops."""
        if self.maildir is None:
            return
        disk = os.statvfs(self.maildir.parent)
        if disk.f_bavail * disk.f_frsize >= 2 * needed_bytes:
            return
        log(f"e2e: low on disk space, emptying {self.maildir}/new")
        for entry in os.scandir(self.maildir / "new"):
            os.unlink(entry.path)


def server_command(
    kind: ServerKind, tools: Tools, settings: Settings, port: int, count_file: Path, maildir: Path
) -> list[str]:
    if kind in (KUMO_DISCARD, KUMO_OBSERVED, KUMO_MAILDIR):
        command = [sys.executable, "-m", "kumo_listener", "serve", "--policy", str(POLICY)]
        if kind is KUMO_OBSERVED:
            command += ["--log-level", "INFO", "--metrics", f"{LOOPBACK}:{free_port()}"]
        else:
            command += ["--log-level", settings.kumo_log_level]
        if kind is KUMO_MAILDIR:
            return [*command, "--sink", "maildir", "--maildir", str(maildir)]
        return [*command, "--sink", "discard"]
    if kind is AIOSMTPD:
        tls = [settings.tls_dir / f"{AIOSMTPD_TLS_HOSTNAME}.{suffix}" for suffix in ("crt", "key")]
        command = [sys.executable, str(AIOSMTPD_SERVER), str(port), str(count_file)]
        return [*command, "--tls", *map(str, tls)]
    user = ["-u", "nobody"] if os.geteuid() == 0 else []  # smtp-sink refuses to run as root
    return [tools.smtp_sink, *user, "-m", "4096", f"{LOOPBACK}:{port}", "4096"]


@contextlib.contextmanager
def running_server(
    kind: ServerKind, tools: Tools, settings: Settings, max_connections: int = 32768
) -> Iterator[RunningServer]:
    if kind is POSTFIX_QUEUE:
        with running_postfix_queue() as server:
            yield server
        return
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix=f"{kind.key}-", dir=settings.workdir))
    count_file, maildir = workdir / "received", workdir / "maildir"
    env = {
        **os.environ,
        "KUMO_BENCH_PORT": str(port),
        "KUMO_BENCH_MAX_CONNECTIONS": str(max_connections),
        "KUMO_BENCH_COUNT_FILE": str(count_file),
        "KUMO_BENCH_TLS_DIR": str(settings.tls_dir),
    }
    command = server_command(kind, tools, settings, port, count_file, maildir)
    log(f"e2e: starting {kind.title}: {shlex.join(command)}")
    stdout_path, stderr_path = workdir / "stdout", workdir / "stderr"
    with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=env,
            cwd=workdir,
            process_group=0,
        )
    try:
        server = RunningServer(
            kind=kind,
            process=process,
            pid=process.pid,
            port=port,
            stderr_path=stderr_path,
            count_file=count_file if kind in COUNTED else None,
            maildir=maildir if kind is KUMO_MAILDIR else None,
        )
        wait_until_ready(server, stdout_path)
        yield server
    finally:
        stop_process(process)
        shutil.rmtree(workdir, ignore_errors=True)


def wait_until_ready(server: RunningServer, stdout_path: Path) -> None:
    """Wait for the ``listening on`` line (smtp-sink prints none: for the banner)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        server.check_alive()
        if server.kind in (SMTP_SINK, POSTFIX_QUEUE):
            with contextlib.suppress(OSError):
                probe_banner(server.port)
                return
        elif "listening on" in stdout_path.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise BenchError(f"{server.kind.title} was not ready after {READY_TIMEOUT:.0f} s")


def probe_banner(port: int) -> None:
    with socket.create_connection((LOOPBACK, port), timeout=2.0) as connection:
        read_banner(connection)
        connection.sendall(b"QUIT\r\n")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL it if it is still there after a while."""
    for signum, timeout in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
            return


# --- a private Postfix instance with its queue --------------------------------------


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
    port = free_port()
    base = Path(tempfile.mkdtemp(prefix="kumo-e2e-postfix-", dir="/var/tmp"))
    base.chmod(0o755)
    etc, lib = base / "etc", base / "lib"
    for directory in (etc, base / "spool", lib):
        directory.mkdir()
    shutil.chown(lib, "postfix")
    (etc / "main.cf").write_text(POSTFIX_MAIN_CF.format(base=base))
    master = Path("/etc/postfix/master.cf").read_text()
    listener = f"{LOOPBACK}:{port} inet n - n - - smtpd"
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
            kind=POSTFIX_QUEUE,
            process=None,
            pid=postfix_master_pid(base / "spool"),
            port=port,
            stderr_path=stderr_path,
            count_file=None,
            maildir=None,
            postfix_log=PostfixLog(log_path),
            stderr_offset=stderr_path.stat().st_size,  # "starting the Postfix mail system"
        )
        log(f"e2e: started {POSTFIX_QUEUE.title}: {start} (listening on {LOOPBACK}:{port})")
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
    offset: int = 0
    sent_lines: int = 0

    def sent(self, at_least: int) -> int:
        """Deliveries logged (``status=sent``), once there are ``at_least``, or
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
        self.sent_lines += len(POSTFIX_SENT.findall(text))
        trouble = POSTFIX_TROUBLE.search(text)
        if trouble:
            raise BenchError(f"Postfix logged: {text[trouble.start() :][:2000]}")


# --- throughput ----------------------------------------------------------------------


def smtp_source_command(
    tools: Tools, port: int, shape: Shape, count: int, sessions: int
) -> list[str]:
    command = [tools.smtp_source, "-s", str(sessions), "-l", str(shape.size), "-m", str(count)]
    command += ["-f", SENDER, "-t", RECIPIENT]
    if shape.reuse:
        command.append("-d")  # "don't disconnect after sending a message"
    return [*command, f"{LOOPBACK}:{port}"]


def timed_run(
    server: RunningServer, tools: Tools, settings: Settings, shape: Shape, count: int
) -> Run:
    """Send ``count`` messages and time it, or raise BenchError."""
    server.check_alive()
    server.new_log_output()
    server.make_room(count * (shape.size + MESSAGE_OVERHEAD_BYTES))
    counter_before, files_before = server.received(), server.delivered_files()
    command = smtp_source_command(tools, server.port, shape, count, settings.sessions)
    result, run = run_load(server, command, settings.run_timeout)
    if result.stderr.strip():
        raise BenchError(f"{shlex.join(command)} wrote to stderr:\n{result.stderr}")
    check_delivery(server, counter_before, files_before, count)
    return Run(count, run.seconds, run.server_cpu, run.client_cpu)


def run_load(
    server: RunningServer, command: list[str], timeout: float
) -> tuple[subprocess.CompletedProcess[str], Run]:
    """Run a load generator against ``server``: its output, and the run (count 1)."""
    server_cpu, client_cpu = server.cpu_seconds(), children_cpu_seconds()
    started = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise BenchError(f"{shlex.join(command)} timed out after {error.timeout} s") from None
    elapsed = time.perf_counter() - started
    server_cpu = server.cpu_seconds() - server_cpu
    client_cpu = children_cpu_seconds() - client_cpu
    if result.returncode != 0:
        raise BenchError(f"{shlex.join(command)} exited with {result.returncode}:\n{result.stderr}")
    return result, Run(1, elapsed, server_cpu, client_cpu)


def process_tree(root: int) -> dict[int, list[str]]:
    """``/proc/PID/stat`` fields (after the command name) of ``root`` and its
    descendants, by pid."""
    stats: dict[int, list[str]] = {}
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):  # gone meanwhile
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            stats[int(entry.name)] = fields
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree: dict[int, list[str]] = {}
    pending = [root]
    while pending:
        pid = pending.pop()
        if pid in stats:
            tree[pid] = stats[pid]
            pending += children.get(pid, [])
    return tree


def tree_cpu_seconds(root: int) -> float:
    """User and system CPU time of a process and its descendants, with that of
    the children they have waited for: Postfix's master reaps the smtpd and
    cleanup processes that exit, so their time stays in the sum."""
    ticks = sum(sum(map(int, fields[11:15])) for fields in process_tree(root).values())
    return ticks / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """User and system CPU time of the children waited for so far (the load generators)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def check_server_log(server: RunningServer) -> None:
    """Fail on errors the server logged since the last check."""
    server.check_alive()
    output = server.new_log_output()
    if SERVER_LOG_ERROR.search(output):
        raise BenchError(f"{server.kind.title} logged errors:\n{output[-4000:]}")
    if output.strip():
        log(f"e2e: {server.kind.title} wrote to stderr:\n{output[-2000:]}")


def check_delivery(
    server: RunningServer, counter_before: int | None, files_before: int | None, sent: int
) -> None:
    check_server_log(server)
    if counter_before is not None:
        counted = server.received(at_least=counter_before + sent)
        assert counted is not None
        if counted - counter_before != sent:
            raise BenchError(
                f"{server.kind.title} counted {counted - counter_before} messages, sent {sent}"
            )
    files_after = server.delivered_files()
    if files_after is not None and files_before is not None and files_after - files_before != sent:
        delivered = files_after - files_before
        raise BenchError(f"{server.kind.title}: {delivered} new files in new/, sent {sent}")


def message_cap(shape: Shape, settings: Settings) -> int:
    return settings.sessions * MESSAGES_PER_CONNECTION_CAP if shape.reuse else 1_000_000


def calibrate(server: RunningServer, tools: Tools, settings: Settings, shape: Shape) -> int:
    """Warm up, growing the count until a run lasts long enough to give a rate,
    and return the count for a run of about ``settings.seconds``."""
    cap = message_cap(shape, settings)
    count = min(cap, settings.sessions * shape.warmup_per_session)
    while True:
        elapsed = timed_run(server, tools, settings, shape, count).seconds
        if elapsed >= MIN_CALIBRATION_SECONDS or count >= cap:
            break
        count = min(cap, count * 4)
    wanted = int(count / elapsed * settings.seconds)
    return max(settings.sessions, min(cap, wanted))


def measure_throughput(
    server: RunningServer, tools: Tools, settings: Settings, shape: Shape
) -> Throughput:
    result = Throughput()
    try:
        count = shape.quick_count if settings.quick else calibrate(server, tools, settings, shape)
        result.messages_per_run = count
        for _ in range(settings.repeat):
            result.runs.append(timed_run(server, tools, settings, shape, count))
    except BenchError as error:
        result.error = str(error)
    status = result.error or ", ".join(f"{rate:,.0f}" for rate in result.rates) + " msgs/s"
    log(f"e2e: {server.kind.title}, {shape.title}, {result.messages_per_run} msgs: {status}")
    return result


def measure_server(kind: ServerKind, tools: Tools, settings: Settings) -> dict[str, Throughput]:
    """All shapes against one server process."""
    try:
        with running_server(kind, tools, settings) as server:
            return {
                shape.key: measure_throughput(server, tools, settings, shape) for shape in SHAPES
            }
    except BenchError as error:
        log(f"e2e: {kind.title}: {error}")
        return {shape.key: Throughput(error=str(error)) for shape in SHAPES}


def measure_durable(tools: Tools, settings: Settings) -> dict[str, dict[str, Throughput]]:
    """The durable shapes with ``--durable-sessions``: kumo_listener (discard,
    Maildir) and Postfix with its queue all running at once, their timed runs
    taking turns, so that whatever else loads the machine falls on each alike."""
    durable = dataclasses.replace(settings, sessions=settings.durable_sessions)
    results = {
        shape.key: {kind.key: Throughput() for kind in DURABLE_SERVERS} for shape in DURABLE_SHAPES
    }
    with contextlib.ExitStack() as stack:
        servers: dict[str, RunningServer] = {}
        for kind in DURABLE_SERVERS:
            try:
                servers[kind.key] = stack.enter_context(running_server(kind, tools, durable))
            except BenchError as error:
                log(f"e2e: {kind.title}: {error}")
                for shape in DURABLE_SHAPES:
                    results[shape.key][kind.key].error = str(error)
        for shape in DURABLE_SHAPES:
            row = results[shape.key]
            for key, server in servers.items():
                row[key].messages_per_run = measure_count(server, tools, durable, shape, row[key])
            for _ in range(durable.repeat):
                for key, server in servers.items():
                    if row[key].error is None:
                        with record_error(row[key]):
                            count = row[key].messages_per_run
                            row[key].runs.append(timed_run(server, tools, durable, shape, count))
            for key, server in servers.items():
                status = row[key].error or ", ".join(f"{r:,.0f}" for r in row[key].rates)
                log(f"e2e: durable, {server.kind.title}, {shape.title}: {status} msgs/s")
    return results


def measure_count(
    server: RunningServer, tools: Tools, settings: Settings, shape: Shape, into: Measured
) -> int:
    """The message count of a timed run (0 when the warm-up failed, in ``into.error``)."""
    with record_error(into):
        return shape.quick_count if settings.quick else calibrate(server, tools, settings, shape)
    return 0


@contextlib.contextmanager
def record_error(into: Measured) -> Iterator[None]:
    try:
        yield
    except BenchError as error:
        into.error = str(error)


# --- resident memory per idle connection ---------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for process {pid}")


def read_banner(connection: socket.socket) -> bytes:
    """Read the greeting up to its last line (``220 ``, not ``220-``)."""
    data = b""
    while True:
        chunk = connection.recv(4096)
        if not chunk:
            raise BenchError(f"connection closed before the banner ended: {data!r}")
        data += chunk
        lines = data.split(b"\r\n")
        if len(lines) > 1 and lines[-2][:4] == b"220 ":
            return data
        if len(lines) > 1 and not lines[-2].startswith(b"220"):
            raise BenchError(f"unexpected greeting: {data!r}")


def open_idle_connections(port: int, count: int, into: list[socket.socket]) -> None:
    for index in range(count):
        try:
            connection = socket.create_connection((LOOPBACK, port), timeout=10.0)
            into.append(connection)
            read_banner(connection)
        except OSError as error:
            raise BenchError(f"connection {index + 1} of {count}: {error}") from None


def warm_up_connections(port: int, count: int) -> None:
    """Open and close a few sessions so one-time set-up is not counted per connection."""
    for _ in range(count):
        probe_banner(port)


def measure_idle_memory(kind: ServerKind, tools: Tools, settings: Settings) -> IdleMemory:
    result = IdleMemory()
    connections: list[socket.socket] = []
    try:
        with running_server(kind, tools, settings, max_connections=settings.idle + 100) as server:
            warm_up_connections(server.port, settings.sessions)
            time.sleep(0.5)
            result.rss_before_kib = rss_kib(server.pid)
            open_idle_connections(server.port, settings.idle, connections)
            time.sleep(1.0)
            server.check_alive()
            result.rss_after_kib = rss_kib(server.pid)
            result.connections = len(connections)
            for connection in connections:
                connection.close()
    except BenchError as error:
        result.error = str(error)
    finally:
        for connection in connections:
            connection.close()
    status = result.error or f"{result.kib_per_connection:.1f} KiB per connection"
    log(f"e2e: {kind.title}, {settings.idle} idle connections: {status}")
    return result


# --- memory while slow sessions send big messages ---------------------------------


@dataclass
class BodyMemory:
    """Memory of a server's processes (the sum of their Pss, so that pages they
    share count once) while ``sessions`` clients each send a big message slowly."""

    sessions: int = 0
    baseline_kib: int = 0
    at_pause_kib: int = 0
    """All bodies sent but for the final dot."""
    peak_kib: int = 0
    """The highest of the samples taken every ``MEMORY_SAMPLE_SECONDS``, end of data included."""
    hwm_growth_kib: int | None = None
    """Single-process servers: VmHWM at the end minus VmRSS before (exact peak)."""
    error: str | None = None

    def growth_mib(self, value_kib: int) -> float:
        return (value_kib - self.baseline_kib) / 1024


MEMORY_SAMPLE_SECONDS = 0.1


def tree_pss_kib(root: int) -> int:
    """The proportional set size of a process and its descendants."""
    total = 0
    for pid in process_tree(root):
        with contextlib.suppress(OSError):  # gone meanwhile
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
    return total


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise BenchError(f"no {key} for process {pid}")


class MemorySampler:
    """Samples the Pss of a process tree in a thread, keeping the highest."""

    def __init__(self, root: int) -> None:
        self.root, self.peak_kib = root, 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.sample_until_stopped, daemon=True)

    def sample_until_stopped(self) -> None:
        while not self.stopped.wait(MEMORY_SAMPLE_SECONDS):
            self.peak_kib = max(self.peak_kib, tree_pss_kib(self.root))

    def __enter__(self) -> MemorySampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()


async def read_reply(reader: asyncio.StreamReader, code: bytes) -> None:
    while True:
        line = await reader.readline()
        if not line.startswith(code):
            raise BenchError(f"expected {code.decode()}, got {line!r}")
        if line[3:4] != b"-":
            return


async def slow_session(
    port: int, settings: Settings, paused: asyncio.Queue[None], go: asyncio.Event
) -> None:
    """One message of ``--memory-megabytes``, sent over ``--memory-seconds``;
    then wait for ``go`` before the final dot."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        await read_reply(reader, b"220")
        for command, code in (
            (b"EHLO client.example", b"250"),
            (f"MAIL FROM:<{SENDER}>".encode(), b"250"),
            (f"RCPT TO:<{RECIPIENT}>".encode(), b"250"),
            (b"DATA", b"354"),
        ):
            writer.write(command + b"\r\n")
            await read_reply(reader, code)
        chunk = BODY_LINE * BODY_CHUNK_LINES
        chunks = settings.memory_megabytes * 1024 * 1024 // len(chunk)
        for _ in range(chunks):
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(settings.memory_seconds / chunks)
        paused.put_nowait(None)
        await go.wait()
        writer.write(b".\r\n")
        await read_reply(reader, b"250")
        writer.write(b"QUIT\r\n")
        await read_reply(reader, b"221")
    finally:
        writer.close()


async def slow_sessions(server: RunningServer, settings: Settings, result: BodyMemory) -> None:
    """Run the sessions; sample memory once all of them wait before their final dot."""
    paused: asyncio.Queue[None] = asyncio.Queue()
    go = asyncio.Event()
    sessions = [
        asyncio.create_task(slow_session(server.port, settings, paused, go))
        for _ in range(settings.memory_sessions)
    ]
    waiting = asyncio.gather(*sessions)
    try:
        for _ in sessions:
            await asyncio.wait_for(paused.get(), settings.run_timeout)
        await asyncio.sleep(0.5)  # for the server to read the last bytes
        result.at_pause_kib = tree_pss_kib(server.pid)
        go.set()
        await asyncio.wait_for(waiting, settings.run_timeout)
    except TimeoutError:
        raise BenchError("slow sessions timed out") from None
    finally:
        waiting.cancel()
        with contextlib.suppress(BaseException):
            await waiting


def measure_body_memory(kind: ServerKind, tools: Tools, settings: Settings) -> BodyMemory:
    result = BodyMemory(sessions=settings.memory_sessions)
    try:
        with running_server(kind, tools, settings) as server:
            warm_up_connections(server.port, 4)
            time.sleep(0.5)
            result.baseline_kib = tree_pss_kib(server.pid)
            single = server.process is not None
            if single:
                rss_before = status_kib(server.pid, "VmRSS")
                Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # resets VmHWM
            with MemorySampler(server.pid) as sampler:
                asyncio.run(slow_sessions(server, settings, result))
            result.peak_kib = max(sampler.peak_kib, result.at_pause_kib)
            if single:
                result.hwm_growth_kib = status_kib(server.pid, "VmHWM") - rss_before
            check_server_log(server)
            counted = server.received(at_least=settings.memory_sessions)
            if counted is not None and counted < settings.memory_sessions:
                raise BenchError(f"{counted} messages counted, {settings.memory_sessions} sent")
    except (BenchError, OSError) as error:
        result.error = str(error)
    status = result.error or (
        f"{result.growth_mib(result.at_pause_kib):,.1f} MiB more at the pause, "
        f"{result.growth_mib(result.peak_kib):,.1f} MiB more at the peak"
    )
    log(f"e2e: {kind.title}, {settings.memory_sessions} slow sessions: {status}")
    return result


# --- STARTTLS handshakes ------------------------------------------------------------


STARTTLS_SERVERS = (KUMO_DISCARD, AIOSMTPD)


@dataclass
class Handshakes(Measured):
    """The STARTTLS runs against one server."""

    protocols: dict[str, int] = field(default_factory=dict)


def starttls_targets(kind: ServerKind, port: int) -> dict[str, str]:
    """Each address the load client reaches, and the common name it must present."""
    if kind is AIOSMTPD:
        return {f"{LOOPBACK}:{port}": AIOSMTPD_TLS_HOSTNAME}
    return {f"{ip}:{port}": name for ip, name in KUMO_TLS_IDENTITIES.items()}


def starttls_run(
    server: RunningServer, tools: Tools, settings: Settings, limit: list[str]
) -> tuple[Run, dict[str, Any]]:
    """One run of the load client, and its JSON report; or BenchError."""
    targets = starttls_targets(server.kind, server.port)
    # One thread, as smtp-source is one process: the rest of the machine is the server's.
    command = [str(tools.starttls_load), "--connect", ",".join(targets), "--threads", "1"]
    command += ["--concurrency", str(settings.sessions), *limit]
    result, run = run_load(server, command, settings.run_timeout)
    report = json.loads(result.stdout)
    if report["errors"] or not report["handshakes"]:
        raise BenchError(f"{report['errors']} failed sessions: {report['error_kinds']}")
    for target, name in targets.items():
        presented = report["subjects"].get(target, {})
        if set(presented) != {name}:
            raise BenchError(f"{target} presented {presented}, not only {name}")
    check_server_log(server)
    return Run(report["handshakes"], report["seconds"], run.server_cpu, run.client_cpu), report


def measure_starttls(kind: ServerKind, tools: Tools, settings: Settings) -> Handshakes:
    result = Handshakes()
    try:
        with running_server(kind, tools, settings) as server:
            warm_up = starttls_run(server, tools, settings, ["--count", str(STARTTLS_QUICK_COUNT)])
            runs = [warm_up] if settings.quick else []
            for _ in range(0 if settings.quick else settings.repeat):
                runs.append(
                    starttls_run(server, tools, settings, ["--seconds", str(settings.seconds)])
                )
            result.runs = [run for run, _ in runs]
            result.protocols = runs[-1][1]["protocols"]
    except BenchError as error:
        result.error = str(error)
    status = result.error or ", ".join(f"{rate:,.0f}" for rate in result.rates) + " sessions/s"
    log(f"e2e: {kind.title}, STARTTLS: {status}")
    return result


# --- report --------------------------------------------------------------------------


@dataclass
class Results:
    throughput: dict[str, dict[str, Throughput]]
    """shape key → server key → runs"""
    memory: dict[str, IdleMemory]
    starttls: dict[str, Handshakes]
    durable: dict[str, dict[str, Throughput]]
    """durable shape key → server key → runs"""
    body_memory: dict[str, BodyMemory]


def machine_description(settings: Settings) -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "kumo_listener": package_version("kumo_listener"),
        "aiosmtpd": package_version("aiosmtpd"),
        "postfix": debian_version("postfix"),
        "maildir_filesystem": filesystem_of(settings.workdir),
        "cpu_busy_before_percent": cpu_busy_percent(),
    }


def cpu_busy_percent(interval: float = 1.0) -> float:
    """How busy the CPUs were over ``interval`` (before any server starts): other
    work on the machine skews the results."""

    def sample() -> tuple[int, int]:
        fields = [int(value) for value in Path("/proc/stat").read_text().split()[1:9]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    busy_start, total_start = sample()
    time.sleep(interval)
    busy_end, total_end = sample()
    return 100.0 * (busy_end - busy_start) / max(1, total_end - total_start)


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def debian_version(name: str) -> str:
    query = ["dpkg-query", "-W", "-f", "${Version}", name]
    return subprocess.run(query, capture_output=True, text=True).stdout.strip() or "unknown"


def filesystem_of(path: Path) -> str:
    """The type of the filesystem holding ``path`` (tmpfs makes fsync free)."""
    best, kind = "", "unknown"
    resolved = str(path.resolve())
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        mount, fstype = fields[1], fields[2]
        inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > len(best):
            best, kind = mount, fstype
    return f"{kind} ({path})"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def rate_cell(value: float | None) -> str:
    return "FAILED" if value is None else f"{value:,.0f}"


def ratio_cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def shape_ratios(row: dict[str, Throughput]) -> dict[str, float | None]:
    kumo = row[KUMO_DISCARD.key].median
    return {
        "kumo_over_smtp_sink": ratio(kumo, row[SMTP_SINK.key].median),
        "kumo_over_aiosmtpd": ratio(kumo, row[AIOSMTPD.key].median),
    }


def throughput_table(results: dict[str, dict[str, Throughput]]) -> list[str]:
    titles = [kind.title for kind in SERVERS]
    header = ["shape (msgs/s, median)", *titles, "kumo/smtp-sink", "kumo/aiosmtpd"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|---" + "|---:" * (len(header) - 1) + "|",
    ]
    for shape in SHAPES:
        row = results[shape.key]
        ratios = shape_ratios(row)
        cells = [rate_cell(row[kind.key].median) for kind in SERVERS]
        cells += [
            ratio_cell(ratios["kumo_over_smtp_sink"]),
            ratio_cell(ratios["kumo_over_aiosmtpd"]),
        ]
        lines.append(f"| {shape.title} | " + " | ".join(cells) + " |")
    return lines


def durable_ratios(row: dict[str, Throughput]) -> dict[str, float | None]:
    maildir = row[KUMO_MAILDIR.key].median
    return {
        "maildir_over_discard": ratio(maildir, row[KUMO_DISCARD.key].median),
        "maildir_over_postfix_queue": ratio(maildir, row[POSTFIX_QUEUE.key].median),
    }


def durable_table(results: dict[str, dict[str, Throughput]], sessions: int) -> list[str]:
    titles = [kind.title for kind in DURABLE_SERVERS]
    header = [f"durable, {sessions} sessions (msgs/s, median)", *titles]
    header += ["maildir/discard", "maildir/Postfix queue"]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for shape in DURABLE_SHAPES:
        row = results[shape.key]
        ratios = durable_ratios(row)
        cells = [rate_cell(row[kind.key].median) for kind in DURABLE_SERVERS]
        cells += [ratio_cell(ratios["maildir_over_discard"])]
        cells += [ratio_cell(ratios["maildir_over_postfix_queue"])]
        lines.append(f"| {shape.title} | " + " | ".join(cells) + " |")
    for shape in DURABLE_SHAPES:
        cells = [cpu_cell(results[shape.key][kind.key]) for kind in DURABLE_SERVERS]
        lines.append(
            f"| CPU µs per message, server / load generator: {shape.title} | "
            + " | ".join(cells)
            + " | | |"
        )
    return lines


def body_memory_table(memory: dict[str, BodyMemory], settings: Settings) -> list[str]:
    lines = [
        f"| {settings.memory_sessions} sessions, {settings.memory_megabytes} MB each over "
        f"{settings.memory_seconds:g} s (MiB) | before | more, before the final dots "
        "| more, peak (sampled) | more, VmHWM |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind in BODY_MEMORY_SERVERS:
        item = memory[kind.key]
        if item.error:
            lines.append(f"| {kind.title} | FAILED | FAILED | FAILED | FAILED |")
            continue
        hwm = "n/a" if item.hwm_growth_kib is None else f"{item.hwm_growth_kib / 1024:,.1f}"
        lines.append(
            f"| {kind.title} | {item.baseline_kib / 1024:,.1f} "
            f"| {item.growth_mib(item.at_pause_kib):,.1f} | {item.growth_mib(item.peak_kib):,.1f} "
            f"| {hwm} |"
        )
    return lines


def cpu_cell(item: Measured | None) -> str:
    cpu = None if item is None else item.cpu_us()
    return "n/a" if cpu is None else f"{cpu[0]:,.0f} / {cpu[1]:,.0f}"


def cpu_ratio_table(results: dict[str, dict[str, Throughput]]) -> list[str]:
    """The issue's measure: server CPU per message against smtp-sink's, which does nothing."""
    kinds = (KUMO_DISCARD, KUMO_OBSERVED)
    lines = [
        "| server CPU per message over smtp-sink's (median) | "
        + " | ".join(kind.title for kind in kinds)
        + " |",
        "|---" + "|---:" * len(kinds) + "|",
    ]
    for shape in SHAPES:
        row = results[shape.key]
        sink = row[SMTP_SINK.key].cpu_us()
        cells = []
        for kind in kinds:
            kumo = row[kind.key].cpu_us()
            server_ratio = None if kumo is None or sink is None else ratio(kumo[0], sink[0])
            cells.append(ratio_cell(server_ratio))
        lines.append(f"| {shape.title} | " + " | ".join(cells) + " |")
    return lines


def cpu_table(results: Results) -> list[str]:
    """Where the time goes: when the load generator's CPU per message nears a
    core's worth at the measured rate, it, not the server, sets the pace."""
    titles = [kind.title for kind in SERVERS]
    lines = [
        "| CPU µs per message (median): server / load generator | " + " | ".join(titles) + " |",
        "|---" + "|---:" * len(titles) + "|",
    ]
    for shape in SHAPES:
        cells = [cpu_cell(results.throughput[shape.key][kind.key]) for kind in SERVERS]
        lines.append(f"| {shape.title} | " + " | ".join(cells) + " |")
    cells = [cpu_cell(results.starttls.get(kind.key)) for kind in SERVERS]
    lines.append("| STARTTLS session (per session) | " + " | ".join(cells) + " |")
    return lines


def memory_table(memory: dict[str, IdleMemory], idle: int) -> list[str]:
    lines = [
        f"| server | RSS before (MiB) | RSS, {idle} idle connections (MiB) | KiB/connection |",
        "|---|---:|---:|---:|",
    ]
    for kind in (KUMO_DISCARD, AIOSMTPD):
        item = memory[kind.key]
        if item.error:
            lines.append(f"| {kind.title} | FAILED | FAILED | FAILED |")
            continue
        lines.append(
            f"| {kind.title} | {item.rss_before_kib / 1024:.1f} | {item.rss_after_kib / 1024:.1f} "
            f"| {item.kib_per_connection:.1f} |"
        )
    return lines


def starttls_table(starttls: dict[str, Handshakes]) -> list[str]:
    kumo, aiosmtpd = (starttls[kind.key] for kind in STARTTLS_SERVERS)
    cells = [rate_cell(kumo.median), rate_cell(aiosmtpd.median)]
    cells.append(ratio_cell(ratio(kumo.median, aiosmtpd.median)))
    protocols = ", ".join(sorted(set(kumo.protocols) | set(aiosmtpd.protocols))) or "n/a"
    return [
        "| STARTTLS sessions/s (median) | kumo_listener, a certificate per `via` | aiosmtpd "
        "| kumo/aiosmtpd |",
        "|---|---:|---:|---:|",
        f"| full handshake, EHLO, QUIT ({protocols}) | " + " | ".join(cells) + " |",
    ]


def failures(results: Results) -> list[str]:
    """One Markdown list item per failure; an error seen before is named, not repeated."""
    labelled = [
        (f"{kind.title}, {shape.title}", results.throughput[shape.key][kind.key].error)
        for kind in SERVERS
        for shape in SHAPES
    ]
    titles = {kind.key: kind.title for kind in SERVERS}
    labelled += [
        (f"{titles[key]}, idle connections", item.error) for key, item in results.memory.items()
    ]
    labelled += [(f"{titles[key]}, STARTTLS", item.error) for key, item in results.starttls.items()]
    titles[POSTFIX_QUEUE.key] = POSTFIX_QUEUE.title
    labelled += [
        (f"{titles[key]}, durable, {shape.title}", item.error)
        for shape in DURABLE_SHAPES
        for key, item in results.durable[shape.key].items()
    ]
    labelled += [
        (f"{titles[key]}, slow sessions with big messages", item.error)
        for key, item in results.body_memory.items()
    ]
    found: list[str] = []
    first_seen: dict[str, str] = {}
    for label, error in labelled:
        if not error:
            continue
        if error in first_seen:
            found.append(f"- {label}: the same failure as {first_seen[error]}")
            continue
        first_seen[error] = label
        found.append(f"- {label}:\n\n" + textwrap.indent(error, "      ") + "\n")
    return found


def run_details(results: Results) -> list[str]:
    def rates_of(item: Measured) -> str:
        return ", ".join(f"{rate:,.0f}" for rate in item.rates)

    lines = []
    for prefix, shapes, kinds, table in (
        ("", SHAPES, SERVERS, results.throughput),
        ("durable, ", DURABLE_SHAPES, DURABLE_SERVERS, results.durable),
    ):
        for shape in shapes:
            for kind in kinds:
                item = table[shape.key][kind.key]
                if item.rates:
                    lines.append(
                        f"- {prefix}{kind.title}, {shape.title}: "
                        f"{item.messages_per_run} msgs/run; {rates_of(item)}"
                    )
    for kind in STARTTLS_SERVERS:
        handshakes = results.starttls[kind.key]
        if handshakes.rates:
            lines.append(f"- {kind.title}, STARTTLS sessions/s: {rates_of(handshakes)}")
    return lines


def report(machine: dict[str, Any], settings: Settings, results: Results) -> str:
    lines = [
        f"Command: `{shlex.join(sys.orig_argv)}`",
        f"Machine: {machine['nproc']} CPUs ({machine['cpu']}), Linux {machine['kernel']}, "
        f"Python {machine['python']}; CPUs {machine['cpu_busy_before_percent']:.0f}% busy "
        "before the run",
        f"Versions: kumo_listener {machine['kumo_listener']}, aiosmtpd {machine['aiosmtpd']}, "
        f"postfix {machine['postfix']}; Maildir on {machine['maildir_filesystem']}",
        f"Load: smtp-source, {settings.sessions} parallel sessions, "
        f"{settings.repeat} timed run(s) per cell"
        + ("" if settings.quick else f" of about {settings.seconds:g} s after a warm-up"),
        "",
        *throughput_table(results.throughput),
        "",
        *starttls_table(results.starttls),
        "",
        *cpu_table(results),
        "",
        *cpu_ratio_table(results.throughput),
        "",
        *memory_table(results.memory, settings.idle),
        "",
        *durable_table(results.durable, settings.durable_sessions),
        "",
        "Memory: the sum of the Pss of the server's processes (Postfix: master and every "
        "child, smtpd and cleanup included); VmHWM for single processes.",
        "",
        *body_memory_table(results.body_memory, settings),
        "",
        "Runs:",
        *run_details(results),
    ]
    problems = failures(results)
    if problems:
        lines += ["", "Failures:", "", *problems]
    return "\n".join(lines)


def as_json(machine: dict[str, Any], settings: Settings, results: Results) -> dict[str, Any]:
    throughput = {
        shape.key: {
            "title": shape.title,
            "message_bytes": shape.size,
            "reused_connections": shape.reuse,
            "servers": {
                kind.key: {
                    "title": kind.title,
                    "msgs_per_s_median": results.throughput[shape.key][kind.key].median,
                    "msgs_per_s_runs": results.throughput[shape.key][kind.key].rates,
                    "cpu_us_per_msg_server_client": results.throughput[shape.key][
                        kind.key
                    ].cpu_us(),
                    "messages_per_run": results.throughput[shape.key][kind.key].messages_per_run,
                    "error": results.throughput[shape.key][kind.key].error,
                }
                for kind in SERVERS
            },
            "ratios": shape_ratios(results.throughput[shape.key]),
        }
        for shape in SHAPES
    }
    idle_memory = {
        key: {
            "connections": item.connections,
            "rss_before_kib": item.rss_before_kib,
            "rss_after_kib": item.rss_after_kib,
            "kib_per_connection": item.kib_per_connection,
            "error": item.error,
        }
        for key, item in results.memory.items()
    }
    starttls = {
        key: {
            "sessions_per_s_median": item.median,
            "sessions_per_s_runs": item.rates,
            "cpu_us_per_session_server_client": item.cpu_us(),
            "protocols": item.protocols,
            "error": item.error,
        }
        for key, item in results.starttls.items()
    }
    durable = {
        shape.key: {
            "title": shape.title,
            "sessions": settings.durable_sessions,
            "reused_connections": shape.reuse,
            "servers": {
                kind.key: {
                    "title": kind.title,
                    "msgs_per_s_median": item.median,
                    "msgs_per_s_runs": item.rates,
                    "cpu_us_per_msg_server_client": item.cpu_us(),
                    "messages_per_run": item.messages_per_run,
                    "error": item.error,
                }
                for kind in DURABLE_SERVERS
                for item in [results.durable[shape.key][kind.key]]
            },
            "ratios": durable_ratios(results.durable[shape.key]),
        }
        for shape in DURABLE_SHAPES
    }
    body_memory = {key: dataclasses.asdict(item) for key, item in results.body_memory.items()}
    return {
        "command": sys.orig_argv,
        "machine": machine,
        "settings": {
            "quick": settings.quick,
            "sessions": settings.sessions,
            "repeat": settings.repeat,
            "seconds": settings.seconds,
            "idle_connections": settings.idle,
            "kumo_log_level": settings.kumo_log_level,
            "durable_sessions": settings.durable_sessions,
            "memory_sessions": settings.memory_sessions,
            "memory_megabytes": settings.memory_megabytes,
            "memory_seconds": settings.memory_seconds,
        },
        "throughput": throughput,
        "idle_memory": idle_memory,
        "starttls": starttls,
        "durable": durable,
        "slow_big_messages_memory": body_memory,
    }


# --- main ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="End-to-end SMTP benchmark: kumo_listener, aiosmtpd, smtp-sink."
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny counts, 1 run")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--sessions", type=int, default=50, help="parallel smtp-source sessions")
    parser.add_argument("--repeat", type=int, help="timed runs per cell (default 3, quick 1)")
    parser.add_argument("--seconds", type=float, default=3.0, help="target length of a run")
    parser.add_argument("--idle", type=int, help="idle connections (default 5000, quick 200)")
    parser.add_argument(
        "--kumo-log-level", default="WARNING", help="kumo_listener --log-level (default WARNING)"
    )
    parser.add_argument(
        "--durable-sessions", type=int, default=50, help="sessions of the durable comparison"
    )
    parser.add_argument(
        "--memory-sessions", type=int, help="slow sessions with a big message (default 50, quick 4)"
    )
    parser.add_argument(
        "--memory-megabytes", type=int, default=5, help="size of each slow session's message"
    )
    parser.add_argument(
        "--memory-seconds", type=float, help="how long each slow body takes (default 4, quick 0.5)"
    )
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace, workdir: Path) -> Settings:
    return Settings(
        quick=args.quick,
        sessions=args.sessions,
        repeat=args.repeat or (1 if args.quick else 3),
        seconds=args.seconds,
        idle=args.idle or (200 if args.quick else 5000),
        kumo_log_level=args.kumo_log_level,
        run_timeout=60.0 if args.quick else 120.0,
        workdir=workdir,
        durable_sessions=args.durable_sessions,
        memory_sessions=args.memory_sessions or (4 if args.quick else 50),
        memory_megabytes=args.memory_megabytes,
        memory_seconds=args.memory_seconds or (0.5 if args.quick else 4.0),
    )


def raise_system_exit(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so that ``finally`` blocks stop the servers."""
    raise SystemExit(128 + signum)


def run(settings: Settings, json_path: Path | None) -> int:
    tools = ensure_tools()
    make_certificates(settings.tls_dir)
    raise_open_file_limit(settings.idle + 1024)
    machine = machine_description(settings)
    throughput: dict[str, dict[str, Throughput]] = {shape.key: {} for shape in SHAPES}
    for kind in SERVERS:
        for shape_key, runs in measure_server(kind, tools, settings).items():
            throughput[shape_key][kind.key] = runs
    results = Results(
        throughput=throughput,
        starttls={kind.key: measure_starttls(kind, tools, settings) for kind in STARTTLS_SERVERS},
        memory={
            kind.key: measure_idle_memory(kind, tools, settings)
            for kind in (KUMO_DISCARD, AIOSMTPD)
        },
        durable=measure_durable(tools, settings),
        body_memory={
            kind.key: measure_body_memory(kind, tools, settings) for kind in BODY_MEMORY_SERVERS
        },
    )
    print(report(machine, settings, results), flush=True)
    if json_path is not None:
        document = as_json(machine, settings, results)
        json_path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    return 1 if failures(results) else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, raise_system_exit)
    workdir = Path(tempfile.mkdtemp(prefix="kumo-e2e-"))
    try:
        return run(settings_from(args, workdir), args.json)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
