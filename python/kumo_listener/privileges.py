"""Dropping root for ``kumo-listener serve --user NAME``.

The order, in ``kumo-listener serve``: the policy file and its ``init``
handler run as root (``init`` starts the listeners, so that privileged ports
can be bound), then privileges are dropped, then the sessions start. The
core's sessions run only when the asyncio loop drives them, and
:meth:`kumo_listener.Server.run` does not drive them until ``init`` and its
``on_ready`` callback (where the drop happens) have returned: nothing is
accepted, and no other handler runs, as root.
"""

from __future__ import annotations

import logging
import os
import pwd
from pathlib import Path

logger = logging.getLogger("kumo_listener")


class PrivilegeError(RuntimeError):
    """``--user`` can't be honoured: unknown user, not root, or root could be regained."""


def lookup_user(name: str) -> pwd.struct_passwd:
    """The password entry of ``name`` (a name, or a numeric uid)."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    if name.isdigit():
        try:
            return pwd.getpwuid(int(name))
        except KeyError:
            pass
    raise PrivilegeError(f"--user {name}: no such user")


def needs_drop(user: pwd.struct_passwd) -> bool:
    """Whether this process must change identity to run as ``user``: raises
    :class:`PrivilegeError` when it can't (not root, and not already ``user``)."""
    if os.geteuid() == 0:
        return user.pw_uid != 0
    if os.geteuid() == os.getuid() == user.pw_uid:
        return False
    raise PrivilegeError(f"--user {user.pw_name}: changing user needs root")


def drop_privileges(user: pwd.struct_passwd) -> None:
    """Become ``user`` (its supplementary groups, its group, then its uid),
    and check that root can't be regained. glibc applies each change to every
    thread of the process, the core's threads included."""
    if not needs_drop(user):
        return
    os.initgroups(user.pw_name, user.pw_gid)
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)
    if user.pw_uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:  # pragma: no cover - a kernel that lets us back is a kernel we can't trust
            raise PrivilegeError(f"--user {user.pw_name}: root could be regained after setuid")
    logger.info(
        "dropped privileges: running as %s (uid %d, gid %d, groups %s)",
        user.pw_name,
        os.getuid(),
        os.getgid(),
        ",".join(str(group) for group in os.getgroups()),
    )


def prepare_maildir(root: str | os.PathLike[str], user: pwd.struct_passwd) -> None:
    """Create the Maildir ``root`` (and missing parents) with ``tmp``, ``new``
    and ``cur``, the directories created here owned by ``user``. Existing
    directories are left as they are (``--maildir /srv`` must not give away
    ``/srv``); a ``tmp``, ``new`` or ``cur`` that ``user`` does not own is
    warned about."""
    root = Path(root)
    missing: list[Path] = []
    for directory in (root, *root.parents):
        if directory.exists():
            break
        missing.append(directory)
    for directory in [*reversed(missing), root / "tmp", root / "new", root / "cur"]:
        try:
            directory.mkdir()
        except FileExistsError:
            if directory.parent == root and directory.stat().st_uid != user.pw_uid:
                logger.warning(
                    "%s exists and is not owned by %s: deliveries may fail", directory, user.pw_name
                )
            continue
        os.chown(directory, user.pw_uid, user.pw_gid)


def warn_if_root() -> None:
    """At start-up: say so when serving as root without ``--user``."""
    if os.geteuid() == 0:
        logger.warning(
            "running as root without --user: the policy and every session run as root; "
            "give --user NAME to drop privileges once the listeners are bound"
        )
