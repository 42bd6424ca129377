"""Helpers shared by the tests: a raw SMTP client, waiting, ports, ``kumo-listener
serve`` processes, the Maildir, /proc, external tools and certificates.

Plain functions and classes only; the fixtures are in conftest.py.
"""

from __future__ import annotations

import datetime
import os
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

T = TypeVar("T")

# What installs every external tool the tests use (Debian packages, Exim).
INSTALLER = "tools/install-deps.sh"

KUMO = [sys.executable, "-m", "kumo_listener"]


# --- external tools -----------------------------------------------------------------


def missing_tool(what: str, package: str) -> NoReturn:
    """Fail the test: an external tool it needs is not there."""
    pytest.fail(
        f"{what} is missing: {INSTALLER} installs it (Debian package {package}); "
        f"run it once, as root, before the tests",
        pytrace=False,
    )


def require_tool(name: str, package: str | None = None) -> str:
    """The path of the external program `name`; fails the test (never skips)
    when it is not installed."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        missing_tool(name, package or name)
    return path


def swaks(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``swaks ARGS`` to the end, its output captured. Fails the test if swaks
    is missing, or, when ARGS ask for TLS, if its TLS support is: swaks does
    TLS only with Net::SSLeay and IO::Socket::SSL, which it only recommends."""
    path = require_tool("swaks")
    if any(arg.startswith("--tls") for arg in args):
        support = subprocess.run([path, "--support"], capture_output=True, text=True, timeout=30)
        if "=== TLS supported" not in support.stdout + support.stderr:
            missing_tool("TLS in swaks", "libnet-ssleay-perl and libio-socket-ssl-perl")
    return subprocess.run([path, *args], capture_output=True, text=True, timeout=timeout)


# --- waiting ------------------------------------------------------------------------


def wait_until(
    condition: Callable[[], T],
    within: float = 10.0,
    what: str | Callable[[], str] = "the condition",
    interval: float = 0.02,
) -> T:
    """Poll `condition` until it returns something true, and return that;
    raise AssertionError naming `what` (a text, or a function giving one, for
    the state at that moment) if it has not after `within` seconds."""
    deadline = time.monotonic() + within
    while not (result := condition()):
        if time.monotonic() > deadline:
            described = what() if callable(what) else what
            raise AssertionError(f"still waiting after {within}s for {described}")
        time.sleep(interval)
    return result


def logged(caplog: pytest.LogCaptureFixture, pattern: str, within: float = 5.0) -> str:
    """The first text matching the regular expression `pattern` in the captured
    log, once there (records come from the server's threads)."""
    found = wait_until(
        lambda: re.search(pattern, caplog.text),
        within,
        lambda: f"{pattern!r} in the log:\n{caplog.text}",
    )
    return found.group(0)


# --- ports --------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at `host` just now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if `port` can be bound on `host`."""
    with socket.socket() as probe:
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
        except OSError:
            return False
    return True


# --- a raw SMTP client --------------------------------------------------------------


class RawClient:
    """A plain socket speaking SMTP byte by byte, for what smtplib won't send."""

    def __init__(
        self, address: tuple[str, int] | str, source: str | None = None, timeout: float = 10.0
    ):
        if isinstance(address, str):  # a Unix socket's path
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(address)
        else:
            self.sock = socket.create_connection(
                address, timeout=timeout, source_address=(source, 0) if source else None
            )
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; unread: {self.buffer!r}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def reply(self) -> tuple[int, list[str]]:
        """One whole (possibly multi-line) reply: the code and the texts."""
        texts = []
        while True:
            line = self.line().decode("utf-8", "replace")
            assert len(line) >= 4 and line[:3].isdigit() and line[3] in " -", line
            texts.append(line[4:])
            if line[3] == " ":
                return int(line[:3]), texts

    def replies(self, count: int) -> list[tuple[int, str]]:
        """The next `count` replies (to pipelined commands): each code and last text."""
        got = []
        for _ in range(count):
            code, texts = self.reply()
            got.append((code, texts[-1]))
        return got

    def command(self, data: bytes | str) -> tuple[int, list[str]]:
        self.send(data.encode() + b"\r\n" if isinstance(data, str) else data)
        return self.reply()

    def ehlo(self, domain: str = "client.example") -> list[str]:
        """EHLO, which must get 250: the reply's lines."""
        code, lines = self.command(f"EHLO {domain}")
        assert code == 250, lines
        return lines

    def hello(self, domain: str = "client.example") -> list[str]:
        """The 220 greeting, then EHLO: the lines of the EHLO reply."""
        code, lines = self.reply()
        assert code == 220, lines
        return self.ehlo(domain)

    def transaction(
        self, sender: str = "a@b.example", recipient: str = "c@d.example"
    ) -> tuple[int, list[str]]:
        """Greeting, EHLO, MAIL (which must get 250); the reply to RCPT."""
        self.hello()
        assert self.command(f"MAIL FROM:<{sender}>")[0] == 250
        return self.command(f"RCPT TO:<{recipient}>")

    def open_data(self, recipient: str = "c@d.example") -> None:
        """Greeting, EHLO, MAIL, RCPT, DATA, each accepted: what is sent next is the body."""
        assert self.transaction(recipient=recipient)[0] == 250
        assert self.command("DATA")[0] == 354

    def readable(self, seconds: float) -> bool:
        """True if the server sent something (or closed) within `seconds`."""
        return bool(self.buffer) or bool(select.select([self.sock], [], [], seconds)[0])

    def until_closed(self, within: float = 10.0) -> bytes:
        """Everything unread until the server closes (a reset counts as a
        close); fails the test if the connection is still open after `within` s."""
        deadline = time.monotonic() + within
        received, self.buffer = self.buffer, b""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"connection still open after {within}s; received {received!r}")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return received
            except TimeoutError:
                pytest.fail(f"connection still open after {within}s; received {received!r}")
            if not chunk:
                return received
            received += chunk

    def closed(self) -> bool:
        """True once the server has closed the connection (after any buffered bytes)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


# --- kumo-listener serve ------------------------------------------------------------


def run_kumo(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``kumo-listener ARGS`` to the end, its output captured."""
    return subprocess.run([*KUMO, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


class Served:
    """A ``kumo-listener serve`` process and the address it printed. Its
    standard error is a pipe, or the file `log` when one is given."""

    def __init__(
        self,
        args: list[str],
        cwd: Path,
        log: Path | None = None,
        preexec_fn: Callable[[], object] | None = None,
        prefix: list[str] | None = None,
    ) -> None:
        """`preexec_fn` runs in the child before the command (e.g. to set
        limits); `prefix` runs the command (e.g. ``ip netns exec NS``)."""
        self.log = log
        command = [*(prefix or []), *KUMO, "serve", *args]
        if log is None:
            self.process = subprocess.Popen(
                command,
                cwd=cwd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                preexec_fn=preexec_fn,
            )
        else:
            with log.open("w") as errors:
                self.process = subprocess.Popen(
                    command,
                    cwd=cwd,
                    stdout=subprocess.PIPE,
                    stderr=errors,
                    text=True,
                    preexec_fn=preexec_fn,
                )
        assert self.process.stdout is not None
        self.banner = self.process.stdout.readline()
        found = re.search(r"listening on (?:([\d.]+):(\d+)|(/[^;,]+))", self.banner)
        if not found:
            self.process.kill()
            raise AssertionError(self.banner + self.errors())
        # A Unix socket's path, or (host, port).
        self.address = found.group(3) or (found.group(1), int(found.group(2)))

    def errors(self) -> str:
        """What the process wrote to standard error (waiting for its end if a pipe)."""
        if self.log is not None:
            return self.log.read_text()
        assert self.process.stderr is not None
        return self.process.stderr.read()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)


def start_workers(args: list[str], cwd: Path, port: int) -> tuple[subprocess.Popen, list[str]]:
    """``kumo-listener serve --workers 2 --listen 127.0.0.1:PORT ARGS``, once
    both workers have said they listen: the process and the workers' pids."""
    process = subprocess.Popen(
        [*KUMO, "serve", "--workers", "2", "--listen", f"127.0.0.1:{port}", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        banners = [process.stdout.readline() for _ in range(2)]
        assert all(f"listening on 127.0.0.1:{port}" in banner for banner in banners), banners
        workers = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        assert len(workers) == 2
    except BaseException:
        process.kill()
        raise
    return process, workers


# --- the Maildir --------------------------------------------------------------------


def delivered(maildir: Path) -> list[bytes]:
    """Contents of every message in ``new/``, oldest name first."""
    return [path.read_bytes() for path in sorted((maildir / "new").iterdir())]


ENVELOPE = re.compile(rb"\AReturn-Path: <[^\r\n]*>\r\n(?:Delivered-To: [^\r\n]+\r\n)+")


def without_envelope(stored: bytes) -> bytes:
    """A stored file without the ``Return-Path:`` and ``Delivered-To:`` lines
    the Maildir sink writes first (it fails the test when they are missing)."""
    found = ENVELOPE.match(stored)
    assert found, f"no envelope at the top of {stored[:200]!r}"
    return stored[found.end() :]


# --- /proc --------------------------------------------------------------------------


def proc_status(field: str, pid: int | str = "self", task: str | None = None) -> list[str]:
    """The values of one line of /proc/PID[/task/TASK]/status, e.g. ``["1234", "kB"]``."""
    status = Path(f"/proc/{pid}/task/{task}/status" if task else f"/proc/{pid}/status")
    for line in status.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return line.split()[1:]
    raise AssertionError(f"no {field} in {status}")


def rss_kib(pid: int | str = "self") -> int:
    """The resident set of process `pid`, in KiB."""
    value, unit = proc_status("VmRSS", pid)
    assert unit == "kB", unit
    return int(value)


class RssWatch:
    """Growth of this process's resident set (the server runs in it) from now on:
    the kernel's peak (VmHWM, reset through clear_refs), else VmRSS samples."""

    def __init__(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.peak_field = "VmHWM"
        except OSError:
            self.peak_field = "VmRSS"
        self.before = self.peak = rss_kib()

    def sample(self) -> None:
        self.peak = max(self.peak, int(proc_status(self.peak_field)[0]))

    def growth_mib(self) -> float:
        self.sample()
        return (self.peak - self.before) / 1024


# --- certificates -------------------------------------------------------------------

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass
class Issued:
    """A certificate and its key, written as PEM files."""

    cert: x509.Certificate
    key: PrivateKey
    cert_path: Path
    key_path: Path
    key_format: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8
    # Intermediates between this certificate and its root, nearest first.
    chain: list[x509.Certificate] = field(default_factory=list)

    @property
    def common_name(self) -> str:
        return common_name(self.cert)

    @property
    def cert_pem(self) -> str:
        """The certificate followed by its intermediates (a "fullchain" file)."""
        return "".join(
            c.public_bytes(serialization.Encoding.PEM).decode() for c in [self.cert, *self.chain]
        )

    @property
    def key_pem(self) -> str:
        return self.key.private_bytes(
            serialization.Encoding.PEM, self.key_format, serialization.NoEncryption()
        ).decode()

    def write(self) -> None:
        self.cert_path.write_text(self.cert_pem)
        self.key_path.write_text(self.key_pem)

    def overwrite(self, target: Issued) -> None:
        """Write this certificate and key over `target`'s files, as a renewal does.

        The modification times move two seconds on, as they would between two
        real renewals, so a cache keyed on mtime is not defeated by timing.
        """
        for path, text in ((target.cert_path, self.cert_pem), (target.key_path, self.key_pem)):
            path.write_text(text)
            later = path.stat().st_mtime + 2
            os.utime(path, (later, later))


class Pki:
    """Makes CAs and leaf certificates into one directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(exist_ok=True)
        self.count = 0

    def _paths(self, common_name: str) -> tuple[Path, Path]:
        self.count += 1
        stem = f"{self.count:02d}-{re.sub(r'[^A-Za-z0-9.-]', '_', common_name)}"
        return self.directory / f"{stem}.crt", self.directory / f"{stem}.key"

    def ca(self, common_name: str = "Test Root CA", *, issuer: Issued | None = None) -> Issued:
        """A CA: a self-signed root, or an intermediate signed by `issuer`."""
        return self._issue(common_name, issuer=issuer, is_ca=True)

    def leaf(
        self,
        common_name: str,
        *,
        ca: Issued | None = None,
        dns: list[str] | None = None,
        key_type: str = "ec",
        key_format: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8,
    ) -> Issued:
        """A server/client certificate for `common_name` (also its DNS SAN unless
        `dns` is given), signed by `ca`, or self-signed without one."""
        return self._issue(
            common_name,
            issuer=ca,
            is_ca=False,
            dns=[common_name] if dns is None else dns,
            key_type=key_type,
            key_format=key_format,
        )

    def _issue(
        self,
        common_name: str,
        *,
        issuer: Issued | None,
        is_ca: bool,
        dns: list[str] | None = None,
        key_type: str = "ec",
        key_format: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8,
    ) -> Issued:
        key: PrivateKey
        if key_type == "rsa":
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.datetime.now(datetime.UTC)
        signing_key = issuer.key if issuer else key
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer.cert.subject if issuer else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()),
                critical=False,
            )
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=not is_ca and key_type == "rsa",
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=is_ca,
                    crl_sign=is_ca,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
        )
        if not is_ca:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            if dns:
                builder = builder.add_extension(
                    x509.SubjectAlternativeName([x509.DNSName(name) for name in dns]),
                    critical=False,
                )
        cert = builder.sign(signing_key, hashes.SHA256())
        root = issuer is None or issuer.cert.issuer == issuer.cert.subject
        chain = [] if root else [issuer.cert, *issuer.chain]
        cert_path, key_path = self._paths(common_name)
        issued = Issued(cert, key, cert_path, key_path, key_format, chain)
        issued.write()
        return issued


def common_name(cert: x509.Certificate) -> str:
    [attribute] = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attribute.value)


# --- TLS clients --------------------------------------------------------------------


def client_context(
    ca: Issued | None = None,
    *,
    cert: Issued | None = None,
    maximum_version: ssl.TLSVersion | None = None,
    check_hostname: bool = False,
) -> ssl.SSLContext:
    """A client context: verifies against `ca` if given (else verifies
    nothing), presents `cert` if given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = check_hostname
    if ca is None:
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(cadata=ca.cert_pem)
        context.verify_mode = ssl.CERT_REQUIRED
    if cert is not None:
        context.load_cert_chain(cert.cert_path, cert.key_path)
    if maximum_version is not None:
        context.maximum_version = maximum_version
    return context


def upgrade(
    client: RawClient,
    context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> RawClient:
    """STARTTLS and the handshake; the same client, now over TLS."""
    assert client.command("STARTTLS") == (220, ["2.0.0 Ready to start TLS"])
    assert client.buffer == b"", "bytes after the 220 would be lost in the handshake"
    context = context or client_context()
    client.sock = context.wrap_socket(client.sock, server_hostname=server_hostname)
    return client


def tls_session(
    raw: Callable[..., RawClient],
    address: tuple[str, int],
    context: ssl.SSLContext | None = None,
    *,
    via: str | None = None,
    server_hostname: str | None = None,
) -> tuple[RawClient, list[str]]:
    """Greeting, EHLO, STARTTLS, handshake, EHLO again: the client over TLS
    and the lines of its EHLO reply over TLS."""
    client = raw((via or address[0], address[1]))
    client.hello()
    upgrade(client, context, server_hostname)
    return client, client.ehlo()


def in_threads(count: int, call: Callable[[], T]) -> list[T]:
    """``call()`` on ``count`` threads at once; their results in order."""
    results: list[Any] = [None] * count

    def run(index: int) -> None:
        results[index] = call()

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results
