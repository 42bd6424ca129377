"""``kumo-listener serve --user``: bind as root, then serve as that user."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import smtplib
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import (
    KUMO,
    RawClient,
    Served,
    delivered,
    port_free,
    proc_status,
    run_kumo,
    start_workers,
    wait_until,
)

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def privileged_port() -> int:
    for port in (587, 465, 588, 999, 1023):
        if port_free(port):
            return port
    pytest.skip("no free port below 1024 on 127.0.0.1")


@pytest.fixture
def nobody() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory ``nobody`` can traverse (pytest's own are root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="kumo-user-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def ids(pid: int, field: str, task: str | None = None) -> list[int]:
    return [int(value) for value in proc_status(field, pid, task)]


def assert_runs_as(pid: int, user: pwd.struct_passwd) -> None:
    """Every thread of ``pid``: real, effective, saved and fs ids are ``user``'s."""
    groups = sorted(os.getgrouplist(user.pw_name, user.pw_gid))
    for task in os.listdir(f"/proc/{pid}/task"):
        assert ids(pid, "Uid", task) == [user.pw_uid] * 4, task
        assert ids(pid, "Gid", task) == [user.pw_gid] * 4, task
        assert sorted(ids(pid, "Groups", task)) == groups, task


@root_only
def test_user_binds_a_privileged_port_then_serves_as_that_user(shared_dir, nobody):
    port = privileged_port()
    maildir = shared_dir / "spool" / "maildir"
    served = Served(
        ["--user", "nobody", "--listen", f"127.0.0.1:{port}", "--maildir", str(maildir)],
        shared_dir,
    )
    try:
        assert f"listening on 127.0.0.1:{port}" in served.banner
        assert_runs_as(served.process.pid, nobody)
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail("a@b.example", ["c@d.example"], b"Subject: nobody\r\n\r\nx\r\n")
        assert served.stop() == 0
    finally:
        served.process.kill()
    assert served.process.stderr is not None
    log = served.process.stderr.read()
    assert "dropped privileges: running as nobody" in log
    assert "running as root" not in log
    # Created as root, owned by the user; the message written by the user.
    for directory in (maildir.parent, maildir, maildir / "tmp", maildir / "new", maildir / "cur"):
        assert directory.stat().st_uid == nobody.pw_uid, directory
    [stored] = (maildir / "new").iterdir()
    assert (stored.stat().st_uid, stored.stat().st_gid) == (nobody.pw_uid, nobody.pw_gid)
    assert delivered(maildir)[0].endswith(b"Subject: nobody\r\n\r\nx\r\n")


@root_only
def test_init_runs_as_root_and_nothing_is_accepted_before_the_drop(shared_dir, nobody):
    """An ``init`` that awaits after binding: a client connecting meanwhile
    waits in the backlog, and its session (and every handler) runs as the user."""
    port = privileged_port()
    bound, done = shared_dir / "bound", shared_dir / "init-done"
    policy = shared_dir / "policy.py"
    policy.write_text(
        "import asyncio, os, pathlib\n"
        "import kumo_listener as kumo\n\n"
        "@kumo.on('init')\n"
        "async def init():\n"
        f"    kumo.start_esmtp_listener(listen='127.0.0.1:{port}', hostname='mx.test',\n"
        "                              banner=f'init-euid={os.geteuid()}')\n"
        f"    pathlib.Path({str(bound)!r}).write_text('bound')\n"
        "    await asyncio.sleep(1)\n"
        f"    pathlib.Path({str(done)!r}).write_text('done')\n\n"
        "@kumo.on('smtp_server_ehlo')\n"
        "def ehlo(domain, conn_meta, extensions):\n"
        "    return [*extensions, f'X-EUID-{os.geteuid()}']\n"
    )
    process = subprocess.Popen(
        [*KUMO, "serve", "--user", "nobody", "--policy", str(policy), "--sink", "discard"],
        cwd=shared_dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def bound_or_exited() -> bool:
            assert process.poll() is None, "the server exited"
            return bound.exists()

        wait_until(bound_or_exited, within=30, what="init to bind", interval=0.01)
        client = RawClient(("127.0.0.1", port))  # bound, init still awaiting as root
        # No connection_accepted handler: a session running now would greet at once.
        assert client.reply() == (220, ["mx.test ESMTP init-euid=0"])
        assert done.exists(), "greeted before init returned"
        code, lines = client.command("EHLO client.example")
        assert code == 250 and f"X-EUID-{nobody.pw_uid}" in lines
        assert_runs_as(process.pid, nobody)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()


@root_only
def test_workers_each_drop_privileges(shared_dir, nobody):
    port = privileged_port()
    process, workers = start_workers(
        ["--user", "nobody", "--maildir", str(shared_dir / "maildir")], shared_dir, port
    )
    try:
        for pid in [process.pid, *map(int, workers)]:
            assert_runs_as(pid, nobody)
        for number in range(6):
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.sendmail("a@b.example", ["c@d.example"], f"Subject: {number}\r\n\r\nx\r\n")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
    stored = list((shared_dir / "maildir" / "new").iterdir())
    assert len(stored) == 6 and all(path.stat().st_uid == nobody.pw_uid for path in stored)


@root_only
def test_root_without_user_warns(tmp_path: Path):
    served = Served(["--listen", "127.0.0.1:0", "--sink", "discard"], tmp_path)
    assert served.stop() == 0
    assert served.process.stderr is not None
    assert "WARNING kumo_listener: running as root without --user" in served.process.stderr.read()


def test_unknown_user_is_refused(tmp_path: Path):
    result = run_kumo("serve", "--user", "no-such-user-here", cwd=tmp_path)
    assert (result.returncode, result.stderr.strip()) == (
        2,
        "kumo-listener: --user no-such-user-here: no such user",
    )
    assert not (tmp_path / "maildir").exists()
