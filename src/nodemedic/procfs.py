"""Readings of /proc and cgroup2 files, shared by the resource watcher and the actions. Each takes
its root folder, so tests give a fake tree."""

from __future__ import annotations

import os
from pathlib import Path


def soft_nofile(proc: Path, pid: int) -> int:
    """The RLIMIT_NOFILE soft limit of ``pid`` from /proc/PID/limits; 0 for unlimited."""
    for line in (proc / str(pid) / "limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft = line[len("Max open files") :].split()[0]
            return 0 if soft == "unlimited" else int(soft)
    raise ValueError(f"no 'Max open files' line in {proc / str(pid) / 'limits'}")


def open_fds(proc: Path, pid: int) -> int:
    """The number of open file descriptors of ``pid`` (needs ptrace access to it)."""
    return len(os.listdir(proc / str(pid) / "fd"))


def read_pressure(path: Path) -> tuple[float, float]:
    """The ``some`` and ``full`` avg10 of a PSI file ("some avg10=1.23 avg60=... total=...")."""
    values = {"some": 0.0, "full": 0.0}
    for line in path.read_text().splitlines():
        kind, *pairs = line.split()
        fields = dict(p.split("=", 1) for p in pairs)
        if kind in values and "avg10" in fields:
            values[kind] = float(fields["avg10"])
    return values["some"], values["full"]


def oom_kill_count(path: Path) -> int:
    """``oom_kill`` from a cgroup's memory.events."""
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0


def unit_cgroup(proc: Path, cgroup_root: Path, pid: int) -> Path:
    """The cgroup2 folder of ``pid`` (the "0::" line of /proc/PID/cgroup)."""
    for line in (proc / str(pid) / "cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return cgroup_root / line[3:].lstrip("/")
    raise ValueError(f"{pid} is in no cgroup2 group")
