"""What a run needs before any server starts: the tools (installed by
``tools/install-bench-deps.sh``, never by the harness), the certificates and
the open-file limit."""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import os
import resource
import shutil
import subprocess
from pathlib import Path

from .common import BENCHES, Settings, Tools
from .servers import TLS_HOSTNAMES

INSTALL_HINT = "run `bash tools/install-bench-deps.sh` (it installs what the harness needs)"


def starttls_load_path() -> Path:
    """Where ``cargo build --release`` puts ``benches/starttls-load``."""
    target = os.environ.get("CARGO_TARGET_DIR")
    directory = Path(target) if target else BENCHES / "starttls-load" / "target"
    return directory / "release" / "starttls-load"


def check_tools(settings: Settings) -> Tools:
    """The tools a run needs, or SystemExit naming every one that is missing."""
    missing: list[str] = []
    postfix = find_postfix_tools()
    if postfix is None:
        missing.append("smtp-source and smtp-sink (the Debian package postfix)")
    commands = ["postfix", "postconf", "script"]
    missing += [f"the command {name}" for name in commands if shutil.which(name) is None]
    modules = ["aiosmtpd", "cryptography"]
    missing += [f"the Python package {name}" for name in modules if not importable(name)]
    if "shared_limits" not in settings.skip and shutil.which("redis-server") is None:
        missing.append("redis-server (the Debian package; or skip it: --skip shared_limits)")
    starttls_load = None
    if "starttls" not in settings.skip:
        starttls_load = starttls_load_path()
        if not os.access(starttls_load, os.X_OK):
            missing.append(f"{starttls_load} (or skip it: --skip starttls)")
    if missing or postfix is None:
        raise SystemExit("e2e: missing " + "; ".join(missing) + f".\nTo fix: {INSTALL_HINT}.")
    return Tools(*postfix, starttls_load)


def importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def find_postfix_tools() -> tuple[str, str] | None:
    listing = subprocess.run(["dpkg", "-L", "postfix"], capture_output=True, text=True)
    if listing.returncode != 0:
        return None
    paths = {Path(line).name: line for line in listing.stdout.splitlines()}
    source, sink = paths.get("smtp-source"), paths.get("smtp-sink")
    if source is None or sink is None or not os.access(source, os.X_OK):
        return None
    return source, sink


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
