"""The ``kumo-listener`` command: ``check`` and ``serve`` as separate processes."""

from __future__ import annotations

import re
import resource
import signal
import smtplib
import socket
import subprocess
from pathlib import Path

import pytest
from support import RawClient, delivered, free_port, port_free, run_kumo, start_workers


def test_check_accepts_a_valid_file(tmp_path: Path):
    path = tmp_path / "params.toml"
    path.write_text('[via."10.0.0.1"]\nhostname = "mx.example-customer.com"\n')
    result = run_kumo("check", str(path))
    assert (result.returncode, result.stdout.strip()) == (0, f"{path}: OK")


def test_check_lists_every_error_with_its_key_path(tmp_path: Path):
    path = tmp_path / "params.toml"
    path.write_text(
        '[via."10.0.0.1"]\nmax_connections = 5\nhostname = 7\n\n'
        '[peer."192.168.1.1/24"]\nbanner = "x"\n'
    )
    result = run_kumo("check", str(path))
    assert result.returncode == 1
    assert f"{path}: via.'10.0.0.1'.max_connections: only allowed at the top level" in result.stderr
    assert f"{path}: via.'10.0.0.1'.hostname: expected a string" in result.stderr
    assert "did you mean 192.168.1.0/24?" in result.stderr


def test_check_reports_the_errors_inside_a_block_whose_cidr_is_bad(tmp_path: Path):
    path = tmp_path / "params.toml"
    path.write_text('[peer."10.0.0.0/33"]\nbannr = "x"\nhostname = 7\n')
    result = run_kumo("check", str(path))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert f"{path}: peer.'10.0.0.0/33': \"10.0.0.0/33\" is neither an IP address" in lines[0]
    assert f"{path}: peer.'10.0.0.0/33'.bannr: unknown parameter; did you mean banner?" in lines
    assert any(line.startswith(f"{path}: peer.'10.0.0.0/33'.hostname: expected") for line in lines)


def test_check_json_and_unreadable_files(tmp_path: Path):
    good = tmp_path / "params.json"
    good.write_text('{"via": {"10.0.0.2": {"banner": "two"}}}')
    assert run_kumo("check", str(good)).returncode == 0
    broken = tmp_path / "broken.toml"
    broken.write_text("[via\n")
    result = run_kumo("check", str(broken))
    assert result.returncode == 1 and str(broken) in result.stderr
    assert run_kumo("check", str(tmp_path / "missing.toml")).returncode == 1


def test_serve_delivers_then_stops_cleanly_on_sigterm(serve, tmp_path: Path):
    served = serve("--listen", "127.0.0.1:0")
    assert "mail goes to Maildir maildir" in served.banner
    with smtplib.SMTP(*served.address, timeout=10) as client:
        client.sendmail("a@b.example", ["c@d.example"], b"Subject: cli\r\n\r\nbody\r\n")
    idle = RawClient(served.address)
    assert idle.reply()[0] == 220
    assert served.stop() == 0
    assert idle.reply()[0] == 421
    [stored] = delivered(tmp_path / "maildir")
    assert stored.endswith(b"Subject: cli\r\n\r\nbody\r\n")


def test_serve_with_a_policy_file(serve, tmp_path: Path):
    overrides = tmp_path / "listener_params.toml"
    overrides.write_text('[via."127.0.0.2"]\nhostname = "mx.customer.example"\n')
    policy = tmp_path / "policy.py"
    policy.write_text(
        "import kumo_listener as kumo\n\n"
        "@kumo.on('init')\n"
        "def init():\n"
        "    kumo.start_esmtp_listener(listen='0.0.0.0:0', hostname='mx.default.example')\n\n"
        "@kumo.on('smtp_server_get_dynamic_parameters')\n"
        "def dynamic(listener, conn_meta):\n"
        f"    return kumo.serde.toml_load({str(overrides)!r})\n"
    )
    served = serve("--policy", str(policy), "--sink", "discard")
    port = served.address[1]
    assert RawClient(("127.0.0.2", port)).reply() == (
        220,
        ["mx.customer.example ESMTP kumo_listener"],
    )
    assert RawClient(("127.0.0.3", port)).reply() == (
        220,
        ["mx.default.example ESMTP kumo_listener"],
    )
    assert served.stop() == 0


def test_serve_workers_share_the_port(tmp_path: Path):
    port = free_port()
    process, workers = start_workers([], tmp_path, port)
    try:
        for number in range(20):
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.sendmail("a@b.example", ["c@d.example"], f"Subject: {number}\r\n\r\nx\r\n")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert all(not Path(f"/proc/{worker}").exists() for worker in workers)
    finally:
        process.kill()
    assert len(delivered(tmp_path / "maildir")) == 20


def test_serve_refuses_a_bad_policy_listener_with_the_key_path(tmp_path: Path):
    policy = tmp_path / "policy.py"
    policy.write_text(
        "import kumo_listener as kumo\n\n"
        "@kumo.on('init')\n"
        "def init():\n"
        "    kumo.start_esmtp_listener(listen='127.0.0.1:0', via={'10.0.0.1': {'listen': 'x'}})\n"
    )
    result = run_kumo("serve", "--policy", str(policy), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "kumo-listener: via.'10.0.0.1'.listen: "
        "only allowed at the top level of start_esmtp_listener"
    )


@pytest.mark.parametrize(
    ("name", "content", "said"),
    [
        ("missing.py", None, "policy {path}: No such file or directory"),
        ("policy.py", "def f(:\n", "policy {path}:1: invalid syntax"),
        ("folder", "", "policy {path}: a directory, not a Python file"),
    ],
)
def test_serve_names_a_policy_it_cannot_load_in_one_line(tmp_path: Path, name, content, said):
    path = tmp_path / name
    if name == "folder":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    result = run_kumo("serve", "--policy", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "kumo-listener: " + said.format(path=path)


def test_serve_says_when_the_address_is_taken(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_kumo("serve", "--listen", f"127.0.0.1:{port}", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith(f"kumo-listener: cannot listen on 127.0.0.1:{port}: ")


@pytest.mark.skipif(not port_free(2025), reason="127.0.0.1:2025 is in use on this machine")
def test_the_embedded_default_is_loopback_2025_into_maildir(tmp_path: Path):
    process = subprocess.Popen(
        ["kumo-listener", "serve"], cwd=tmp_path, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        assert "listening on 127.0.0.1:2025" in process.stdout.readline()
        with smtplib.SMTP("127.0.0.1", 2025, timeout=10) as client:
            client.sendmail("a@b.example", ["c@d.example"], b"Subject: default\r\n\r\nx\r\n")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
    assert len(delivered(tmp_path / "maildir")) == 1


def open_files_limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open files limit")


def test_serve_raises_the_open_files_limit_to_the_hard_one(serve):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard > 1024, "the test needs a hard limit above 1,024"

    def start_low() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))

    served = serve("--listen", "127.0.0.1:0", "--sink", "discard", preexec_fn=start_low)
    assert open_files_limits(served.process.pid) == (hard, hard)
    assert served.stop() == 0
    # The hard limit is above the 32,768 default max_connections, or said to be below.
    said = "open files limit" in served.errors()
    assert said == (hard < 32768)


def test_serve_warns_when_the_hard_limit_is_below_max_connections(serve, tmp_path: Path):
    policy = tmp_path / "policy.py"
    policy.write_text(
        "import kumo_listener as kumo\n"
        "@kumo.on('init')\n"
        "def init():\n"
        "    kumo.start_esmtp_listener(listen='127.0.0.1:0', max_connections=3000)\n"
        "    kumo.start_esmtp_listener(listen='127.0.0.1:0', max_connections=2000)\n"
    )

    def limit_to_4096() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 4096))

    served = serve("--policy", str(policy), "--sink", "discard", preexec_fn=limit_to_4096)
    assert open_files_limits(served.process.pid) == (4096, 4096)
    assert served.stop() == 0
    assert re.search(
        r"WARNING kumo_listener: the open files limit \(4096, RLIMIT_NOFILE\) is below the 5000"
        r" connections the listeners may hold \(max_connections\)",
        served.errors(),
    ), served.errors()
