"""What the sources report. Frozen dataclasses: no behaviour, no I/O."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class PathKind(str, enum.Enum):
    """What is found at a watched path (lstat, never following a symlink)."""

    DIRECTORY = "directory"
    SOCKET = "socket"
    SYMLINK = "symlink"
    FILE = "file"
    OTHER = "other"
    MISSING = "missing"


@dataclass(frozen=True, slots=True)
class UnitChanged:
    """A watched systemd unit's state, after a change (or at (re)synchronisation)."""

    unit: str
    active_state: str
    sub_state: str
    result: str = ""
    exec_main_code: int = 0
    exec_main_status: int = 0
    n_restarts: int = 0
    main_pid: int = 0
    load_state: str = "loaded"
    at: float = 0.0
    source: str = "dbus"


@dataclass(frozen=True, slots=True)
class JournalLine:
    """One journal entry from or about a watched unit."""

    unit: str
    message: str
    identifier: str = ""
    pid: int = 0
    cursor: str = ""
    at: float = 0.0
    source: str = "journal"


@dataclass(frozen=True, slots=True)
class PathChanged:
    """A watched path changed kind, or became another socket (bound anew: its inode or, on a file
    system that reuses inode numbers, its ctime changed), or its state at start-up. ``inode`` and
    ``ctime_ns`` 0: nothing there, or not known; ``ctime_ns`` is only read for a socket."""

    path: str
    kind: PathKind
    at: float = 0.0
    source: str = "inotify"
    inode: int = 0
    ctime_ns: int = 0


@dataclass(frozen=True, slots=True)
class ProbeFailed:
    """containerd did not answer a real request."""

    target: str
    error: str
    consecutive: int = 1
    at: float = 0.0
    source: str = "probe"


@dataclass(frozen=True, slots=True)
class ProbeAnswered:
    """containerd answered again after failed requests: a hang seen by the probe has cleared."""

    target: str
    at: float = 0.0
    source: str = "probe"


@dataclass(frozen=True, slots=True)
class SignalSeen:
    """A signal was sent to a watched process: seen over D-Bus (the main process died of it; no
    sender known) or in the kernel's trace (``source="tracefs"``: the sender is known).

    ``target_pid`` is in nodemedic's own PID namespace (0 if it could not be resolved);
    ``sender_pid`` is as the kernel's trace gives it. ``sender_cgroup`` is relative to nodemedic's
    cgroup namespace; ``sender_unit`` and ``sender_pod`` are derived from it ("" if none).
    ``result`` is the kernel's verdict (0 delivered, 1 ignored by the target, 2 already pending)."""

    signal: int
    target_pid: int
    unit: str = ""
    sender_pid: int = 0
    sender_comm: str = ""
    sender_cgroup: str = ""
    sender_unit: str = ""
    sender_pod: str = ""
    target_comm: str = ""
    result: int = 0
    at: float = 0.0
    source: str = "dbus"


@dataclass(frozen=True, slots=True)
class FileChanged:
    """A watched file may have new content (written and closed, renamed into place, or created)."""

    path: str
    at: float = 0.0
    source: str = "inotify"


# ---- the resource watcher's readings (sources/resources.py), one kind per check ---------------


@dataclass(frozen=True, slots=True)
class FdUsage:
    """A unit's main process: its open file descriptors against its RLIMIT_NOFILE soft limit
    (``limit`` 0: unlimited)."""

    unit: str
    pid: int
    open: int
    limit: int
    at: float = 0.0
    source: str = "resources"


@dataclass(frozen=True, slots=True)
class PressureSeen:
    """A PSI reading: the share of the last 10 s in which some (or all) tasks waited for
    ``resource``, host-wide (``scope="host"``) or in a unit's cgroup (``scope="containerd"``)."""

    scope: str
    resource: str
    some_avg10: float
    full_avg10: float
    path: str = ""
    at: float = 0.0
    source: str = "resources"


@dataclass(frozen=True, slots=True)
class OomKills:
    """The OOM killer's count in a unit's cgroup (memory.events ``oom_kill``) and how much it grew
    since the previous reading."""

    unit: str
    total: int
    new: int
    path: str = ""
    at: float = 0.0
    source: str = "resources"


@dataclass(frozen=True, slots=True)
class SocketModeSeen:
    """A socket's permission bits and owner, as lstat finds them."""

    path: str
    mode: int
    uid: int
    gid: int
    at: float = 0.0
    source: str = "resources"


@dataclass(frozen=True, slots=True)
class VersionSeen:
    """The version containerd reports over its Version API: sent once per version seen."""

    version: str
    at: float = 0.0
    source: str = "resources"


@dataclass(frozen=True, slots=True)
class GrpcStreamsSetting:
    """What containerd's config file says for ``[grpc] max_concurrent_streams``: ``value`` is the
    TOML value as written (``"2"``), ``""`` while the key is not set."""

    path: str
    value: str
    at: float = 0.0
    source: str = "resources"


ResourceReading = FdUsage | PressureSeen | OomKills | SocketModeSeen | VersionSeen | GrpcStreamsSetting

Event = (
    UnitChanged
    | JournalLine
    | PathChanged
    | ProbeFailed
    | ProbeAnswered
    | SignalSeen
    | FileChanged
    | FdUsage
    | PressureSeen
    | OomKills
    | SocketModeSeen
    | VersionSeen
    | GrpcStreamsSetting
)
