"""What a run was measured on and with: the date, the machine and how busy it
was before the run, the versions of the servers, and the flags used."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .common import Settings


def conditions(flags: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Taken before any server starts: the load average and CPU use are the
    rest of the machine's, which skews the results."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": sys.orig_argv,
        "flags": flags,
        "settings": settings.as_json(),
        "machine": {
            "nproc": len(os.sched_getaffinity(0)),
            "cpu": cpu_model(),
            "kernel": platform.release(),
            "load_average_before": list(os.getloadavg()),
            "cpu_busy_before_percent": cpu_busy_percent(),
            "maildir_filesystem": filesystem_of(settings.workdir),
        },
        "versions": {
            "python": platform.python_version(),
            "kumo_listener": package_version("kumo_listener"),
            "aiosmtpd": package_version("aiosmtpd"),
            "postfix": debian_version("postfix"),
        },
    }


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def cpu_busy_percent(interval: float = 1.0) -> float:
    """How busy the CPUs were over ``interval``."""

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
    return kind
