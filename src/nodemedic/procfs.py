"""Readings of /proc and cgroup2 files, shared by the resource watcher and the actions. Each takes
its root folder, so tests give a fake tree.

Look up the kernel trace's PIDs in a /proc of the initial PID namespace, relative to our own.

The kernel's trace gives PIDs of the initial PID namespace. On a node nodemedic runs there and
that /proc is /proc; in the lab a node has its own PID namespace and the host's /proc is bound at
/host/proc. Either way the answers are given as nodemedic sees the world: PIDs in its own PID
namespace (the last ``NSpid:`` entry) and cgroup paths relative to its own cgroup namespace.

The kernel already renders /proc/PID/cgroup relative to the *reader's* cgroup namespace, whichever
/proc it is read through (checked in the lab: /host/proc/self/cgroup equals /proc/self/cgroup, a
process in another node reads as ``/../lab-.../system.slice/x.service``). The prefix stripping below
(our path in that /proc against our path in our own /proc) is therefore empty in every setup seen
so far; it is kept for a /proc whose paths would be rendered from further up.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
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


log = logging.getLogger(__name__)

OWN_PROC = Path("/proc")

# kubelet's systemd cgroup driver: kubepods-besteffort-pod<uid with _ for ->.slice,
# kubepods-pod<uid>.slice for guaranteed pods; the cgroupfs driver: pod<uid>.
_SYSTEMD_POD = re.compile(r"^kubepods(?:-[a-z]+)?-pod([0-9a-fA-F_-]+)\.slice$")
_CGROUPFS_POD = re.compile(r"^pod([0-9a-fA-F-]+)$")


def cgroup_from_text(text: str) -> str:
    """The process's cgroup from the text of /proc/PID/cgroup: the cgroup2 (``0::``) line, or on a
    legacy host (where that line is just ``/``) the ``name=systemd`` line. "" if neither."""
    unified = named = ""
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            unified = path
        elif controllers == "name=systemd":
            named = path
    if unified and (unified != "/" or not named):
        return unified
    return named or unified


def cgroup_prefix(outer: str, inner: str) -> str:
    """What to strip from cgroup paths read in another /proc: ``outer`` is our own cgroup as that
    /proc shows it, ``inner`` as our own /proc does. "" if they agree (or cannot be reconciled)."""
    if not outer.startswith("/") or not inner.startswith("/") or outer == inner:
        return ""
    if inner == "/":
        return outer.rstrip("/")
    if outer.endswith(inner):
        return outer[: -len(inner)]
    log.debug("our cgroup %r in the trace's /proc does not end with %r: no prefix stripped", outer, inner)
    return ""


def relative_cgroup(path: str, prefix: str) -> str:
    """``path`` with ``prefix`` (a whole-component leading path) removed."""
    if not prefix or not path:
        return path
    if path == prefix:
        return "/"
    if path.startswith(prefix + "/"):
        return path[len(prefix) :]
    return path


def outside_namespace(cgroup: str) -> bool:
    """The kernel writes a cgroup outside the reader's cgroup namespace with ``..`` components."""
    return ".." in cgroup.split("/")


def is_unit_cgroup(cgroup: str, unit: str) -> bool:
    """``cgroup`` (from ``cgroup_from_text``) is ``unit``'s own cgroup: systemd puts a service
    right under its slice (``/system.slice/containerd.service``). A cgroup below a pod's or a
    container's, named like the unit (``.../cri-containerd-<id>.scope/containerd.service``), is not."""
    parts = cgroup.split("/")
    if parts[0] != "" or parts[-1] != unit or outside_namespace(cgroup):
        return False
    return all(part.endswith(".slice") for part in parts[1:-1])


def unit_of(cgroup: str) -> str:
    """The systemd unit a cgroup belongs to: its last component ending in .service or .scope
    (``cri-containerd-<id>.scope`` is a Kubernetes container under the systemd driver). "" for a
    cgroup outside our cgroup namespace (it belongs to another systemd) or in no unit."""
    if outside_namespace(cgroup):
        return ""
    for part in reversed(cgroup.split("/")):
        if part.endswith((".service", ".scope")):
            return part
    return ""


def pod_of(cgroup: str) -> str:
    """The Kubernetes pod UID of a container's cgroup, under either of kubelet's cgroup drivers
    (``.../kubepods-besteffort-pod<uid_with_underscores>.slice/...`` or
    ``/kubepods/besteffort/pod<uid>/<container>``); "" if not a pod's (or outside our namespace)."""
    if outside_namespace(cgroup):
        return ""
    for part in reversed(cgroup.split("/")):
        if match := _SYSTEMD_POD.match(part):
            return match.group(1).replace("_", "-")
        if match := _CGROUPFS_POD.match(part):
            return match.group(1)
    return ""


def nspid_from_status(text: str) -> list[int]:
    """The ``NSpid:`` entries of /proc/PID/status, outermost namespace first ([] if absent)."""
    for line in text.splitlines():
        if line.startswith("NSpid:"):
            try:
                return [int(p) for p in line.split()[1:]]
            except ValueError:
                return []
    return []


class ProcView:
    """A /proc where the kernel trace's PIDs are looked up (``proc``), seen from our namespaces.

    Every lookup returns None/0/"" for a process that is gone (PIDs come from the trace, so a
    process may exit at any moment). ``own`` is our own /proc (tests pass a fake tree)."""

    def __init__(self, proc: Path, own: Path = OWN_PROC) -> None:
        self.proc = proc
        self.own = own
        self._prefix: str | None = None

    def is_own_proc(self) -> bool:
        """``proc`` is our own /proc: its PIDs are ours."""
        try:
            return os.readlink(self.proc / "self") == str(os.getpid())
        except OSError:
            return False

    def prefix(self) -> str:
        """The cgroup prefix stripped from paths read in ``proc`` (computed once)."""
        if self._prefix is None:
            outer = cgroup_from_text(self._read(self.proc / "self" / "cgroup") or "")
            inner = cgroup_from_text(self._read(self.own / "self" / "cgroup") or "")
            self._prefix = cgroup_prefix(outer, inner)
        return self._prefix

    def pids(self) -> Iterator[int]:
        """Every PID in ``proc`` (a snapshot)."""
        try:
            names = os.listdir(self.proc)
        except OSError:
            return
        for name in names:
            if name.isdigit():
                yield int(name)

    def comm(self, pid: int) -> str | None:
        text = self._read(self.proc / str(pid) / "comm")
        return None if text is None else text.rstrip("\n")

    def cgroup(self, pid: int) -> str | None:
        """The process's cgroup relative to our cgroup namespace (None if gone)."""
        text = self._read(self.proc / str(pid) / "cgroup")
        if text is None:
            return None
        return relative_cgroup(cgroup_from_text(text), self.prefix())

    def local_pid(self, pid: int) -> int:
        """The process's PID in its own (innermost) PID namespace, 0 if gone."""
        nspid = nspid_from_status(self._read(self.proc / str(pid) / "status") or "")
        return nspid[-1] if nspid else 0

    def start_time(self, pid: int) -> str:
        """Field 22 of /proc/PID/stat: tells a process from a later one with the same PID."""
        text = self._read(self.proc / str(pid) / "stat")
        if not text:
            return ""
        fields = text.rpartition(")")[2].split()
        return fields[19] if len(fields) > 19 else ""

    def in_our_pid_namespace(self, pid: int) -> bool | None:
        """The process lives in our PID namespace (None if that cannot be told).

        /proc/PID/ns/pid needs ptrace access, which nodemedic.service's capability set does not
        give for a root process with more capabilities (measured: EACCES). Then the process must be
        in our own /proc under its innermost PID, with the same start time."""
        try:
            theirs = os.readlink(self.proc / str(pid) / "ns" / "pid")
            ours = os.readlink(self.own / "self" / "ns" / "pid")
        except OSError:
            pass
        else:
            return theirs == ours
        started = self.start_time(pid)
        local_pid = self.local_pid(pid)
        if not started or not local_pid:
            return None  # gone
        return ProcView(self.own).start_time(local_pid) == started

    def is_ours_in_unit(self, pid: int, unit: str) -> bool:
        """The process is in ``unit``'s cgroup as our systemd sees it (not another node's) and in
        our PID namespace: ``/…/<unit>`` inside our cgroup namespace."""
        cgroup = self.cgroup(pid)
        if not cgroup or not is_unit_cgroup(cgroup, unit):
            return False
        return self.in_our_pid_namespace(pid) is not False

    def find(self, local_pid: int, unit: str) -> int:
        """The PID in ``proc`` of the process of ``unit`` whose PID in our namespace is
        ``local_pid`` (0 if none)."""
        if self.is_own_proc():
            return local_pid
        for pid in self.pids():
            if self.local_pid(pid) == local_pid and self.is_ours_in_unit(pid, unit):
                return pid
        return 0

    def find_by_comm(self, comm: str, unit: str) -> list[int]:
        """PIDs in ``proc`` of the processes named ``comm`` in ``unit`` (ours)."""
        return [pid for pid in self.pids() if self.comm(pid) == comm and self.is_ours_in_unit(pid, unit)]

    @staticmethod
    def _read(path: Path) -> str | None:
        try:
            return path.read_text(encoding="utf-8", errors="replace")
        except (FileNotFoundError, ProcessLookupError, NotADirectoryError, PermissionError):
            return None
        except OSError as err:  # ESRCH and friends from a process that is exiting
            log.debug("cannot read %s: %s", path, err)
            return None
