"""The servers compared, each started as its own process on a free port:
kumo_listener (``kumo-listener serve`` with the benchmark policy), aiosmtpd
(``benches/aiosmtpd_server.py``), Postfix's smtp-sink, and the private Postfix;
the forwarding ones (kumo_listener's ``forward_to``, aiosmtpd's Proxy handler,
Postfix's ``smtpd_proxy_filter``) with the upstream they forward to."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from .common import (
    AIOSMTPD,
    AIOSMTPD_PROXY,
    BENCHES,
    COUNTED,
    FORWARDERS,
    HOOKS_WRITTEN,
    KUMO_AUTHENTICATION,
    KUMO_LIMITED,
    KUMO_MAILDIR,
    KUMO_SERVERS,
    LOOPBACK,
    OBSERVED,
    POSTFIX_PROXY,
    POSTFIX_QUEUE,
    UPSTREAM_SINK,
    BenchError,
    ServerKind,
    Settings,
    Tools,
    log,
)
from .postfix import running_postfix_proxy, running_postfix_queue
from .processes import RunningServer, free_port, stop_process, wait_until_ready

POLICY = BENCHES / "policy_bench.py"
AIOSMTPD_SERVER = BENCHES / "aiosmtpd_server.py"
# The policy's `via` table: the certificate each local address must present.
KUMO_TLS_IDENTITIES = {"127.0.0.1": "mx.example-customer.com", "127.0.0.2": "mx.other-customer.com"}
AIOSMTPD_TLS_HOSTNAME = "bench.example"
TLS_HOSTNAMES = (AIOSMTPD_TLS_HOSTNAME, *KUMO_TLS_IDENTITIES.values())


def server_command(
    kind: ServerKind, tools: Tools, settings: Settings, port: int, count_file: Path, maildir: Path
) -> list[str]:
    if kind in KUMO_SERVERS:
        command = [sys.executable, "-m", "kumo_listener", "serve", "--policy", str(POLICY)]
        if kind in OBSERVED:
            command += ["--log-level", "INFO", "--metrics", f"{LOOPBACK}:{free_port()}"]
        else:
            command += ["--log-level", settings.kumo_log_level]
        if kind is KUMO_MAILDIR:
            return [*command, "--sink", "maildir", "--maildir", str(maildir)]
        return [*command, "--sink", "discard"]
    if kind in (AIOSMTPD, AIOSMTPD_PROXY):
        tls = [settings.tls_dir / f"{AIOSMTPD_TLS_HOSTNAME}.{suffix}" for suffix in ("crt", "key")]
        command = [sys.executable, str(AIOSMTPD_SERVER), str(port), str(count_file)]
        return [*command, "--tls", *map(str, tls)]
    user = ["-u", "nobody"] if os.geteuid() == 0 else []  # smtp-sink refuses to run as root
    counters = ["-c"] if kind is UPSTREAM_SINK else []  # "mesg=N" on stdout
    return [tools.smtp_sink, *user, *counters, "-m", "4096", f"{LOOPBACK}:{port}", "4096"]


def upstream_arguments(kind: ServerKind, upstream: RunningServer | None) -> list[str]:
    """What tells a forwarding server where to: the policy reads
    ``KUMO_BENCH_FORWARD_TO`` (see ``running_server``), aiosmtpd takes ``--proxy``."""
    if (kind in FORWARDERS) != (upstream is not None):
        raise BenchError(f"{kind.title}: an upstream is needed by the forwarders, and only them")
    if kind is AIOSMTPD_PROXY and upstream is not None:
        return ["--proxy", f"{LOOPBACK}:{upstream.port}"]
    return []


@contextlib.contextmanager
def running_server(
    kind: ServerKind,
    tools: Tools,
    settings: Settings,
    max_connections: int = 32768,
    upstream: RunningServer | None = None,
    extra_arguments: Sequence[str] = (),
) -> Iterator[RunningServer]:
    """Start the server of ``kind`` (a forwarding one: to ``upstream``; with
    ``extra_arguments`` on its command line), stop it after."""
    arguments = upstream_arguments(kind, upstream)
    if kind is POSTFIX_QUEUE:
        with running_postfix_queue() as server:
            yield server
        return
    if kind is POSTFIX_PROXY:
        assert upstream is not None
        with running_postfix_proxy(upstream.port) as server:
            server.upstream = upstream
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
    policy_settings = {}  # shown in the log: the policy's forward_to and limits
    if upstream is not None and kind in KUMO_SERVERS:
        policy_settings["KUMO_BENCH_FORWARD_TO"] = f"smtp://{LOOPBACK}:{upstream.port}"
    if kind in KUMO_LIMITED:
        policy_settings["KUMO_BENCH_CLIENT_LIMITS"] = "1"
    if kind is KUMO_AUTHENTICATION:
        policy_settings["KUMO_BENCH_AUTHENTICATION"] = "annotate"
    if kind in HOOKS_WRITTEN:
        policy_settings["KUMO_BENCH_HOOKS"] = HOOKS_WRITTEN[kind]
    env.update(policy_settings)
    command = server_command(kind, tools, settings, port, count_file, maildir)
    command += [*arguments, *extra_arguments]
    shown = [f"{name}={value}" for name, value in policy_settings.items()] + command
    log(f"e2e: starting {kind.title}: {shlex.join(shown)}")
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
            sink_counters=stdout_path if kind is UPSTREAM_SINK else None,
            upstream=upstream,
        )
        wait_until_ready(server, stdout_path)
        yield server
    finally:
        stop_process(process)
        shutil.rmtree(workdir, ignore_errors=True)
