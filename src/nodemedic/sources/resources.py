"""The resource watcher: one periodic reading of what no event announces.

Running out of file descriptors, CPU or memory pressure, an OOM kill, a socket's mode changed by
hand, a containerd version with known bugs, or a config key containerd ignores: none of these sends
an event (systemd still says active/running), so they are read every ``[daemon.resources].interval``.
Only the checks some rule uses are read. Readings are events like any other; whether one is a fault
is the policy's business (policy/match.py), not this module's.

containerd's MainPID is learnt from the D-Bus events (``handle``, an observer of every event), its
cgroup from /proc/MainPID/cgroup. Everything read here is a file under ``proc`` and ``cgroup_root``,
so unit tests give a fake tree.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path

from nodemedic.configs import read_config
from nodemedic.errors import ProbeError
from nodemedic.events import (
    Event,
    FdUsage,
    GrpcStreamsSetting,
    OomKills,
    PressureSeen,
    SocketModeSeen,
    UnitChanged,
    VersionSeen,
)
from nodemedic.policy.model import (
    FdTrigger,
    GrpcStreamsTrigger,
    OomTrigger,
    PressureTrigger,
    ResourceTriggerType,
    SocketModeTrigger,
    VersionTrigger,
)
from nodemedic.ports import Clock, VersionProbe
from nodemedic.procfs import oom_kill_count, open_fds, read_pressure, soft_nofile, unit_cgroup

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)


class ResourceWatch:
    """Reads, every ``interval``, each check that ``triggers`` need and emits what it found."""

    def __init__(self, triggers: list[ResourceTriggerType], unit: str, interval: float,
                 probe: VersionProbe, probe_socket: str, probe_timeout: float,
                 emit: Callable[[Event], None], clock: Clock, *,
                 proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> None:  # fmt: skip
        self.unit = unit
        self.interval = interval
        self._triggers = triggers
        self._probe = probe
        self._probe_socket, self._probe_timeout = probe_socket, probe_timeout
        self._emit = emit
        self._clock = clock
        self._proc, self._cgroup_root = proc, cgroup_root
        self.main_pid = 0
        self._oom_seen: int | None = None
        self._version = ""
        self._warned: set[str] = set()
        self._streams_seen: dict[str, tuple[tuple[int, ...], str | None]] = {}  # path: (stat, value)

    def handle(self, event: Event) -> None:
        """Learn the unit's MainPID from what D-Bus reports (0 while it is not running)."""
        if isinstance(event, UnitChanged) and event.unit == self.unit:
            self.main_pid = event.main_pid

    async def run(self) -> None:
        if not self._triggers:
            return
        while True:
            await self.read_once()
            await asyncio.sleep(self.interval)

    async def read_once(self) -> None:
        """One reading of every check in use."""
        kinds = {type(t) for t in self._triggers}
        readers: list[tuple[type, Callable[[], None]]] = [
            (FdTrigger, self._fds), (PressureTrigger, self._pressures), (OomTrigger, self._oom),
            (SocketModeTrigger, self._sockets), (GrpcStreamsTrigger, self._grpc_streams),
        ]  # fmt: skip
        for kind, read in readers:
            if kind in kinds:
                self._guarded(kind.__name__, read)
        if VersionTrigger in kinds:
            await self._containerd_version()

    def _guarded(self, what: str, read: Callable[[], None]) -> None:
        """A check that cannot read its files (a process gone between two reads, no permission, no
        such controller) emits nothing this time; a lasting reason is logged once."""
        try:
            read()
        except (OSError, ValueError) as exc:
            if what not in self._warned:
                self._warned.add(what)
                log.warning("resource watcher: %s cannot be read: %s", what, exc)

    def _fds(self) -> None:
        pid = self.main_pid
        if pid <= 0:
            return
        limit, count = soft_nofile(self._proc, pid), open_fds(self._proc, pid)
        self._emit(FdUsage(self.unit, pid, count, limit, at=self._clock.monotonic()))

    def _pressures(self) -> None:
        wanted = {(t.scope, t.resource) for t in self._triggers if isinstance(t, PressureTrigger)}
        for scope, resource in sorted(wanted):
            path = self._pressure_path(scope, resource)
            if path is None:
                continue
            some, full = read_pressure(path)
            self._emit(PressureSeen(scope, resource, some, full, str(path), at=self._clock.monotonic()))

    def _pressure_path(self, scope: str, resource: str) -> Path | None:
        if scope == "host":
            host = self._proc / "pressure" / resource
            # A unit with ProcSubset=pid sees no /proc/pressure; the cgroup2 root has the same figures.
            return host if host.exists() else self._cgroup_root / f"{resource}.pressure"
        if self.main_pid <= 0:
            return None
        return unit_cgroup(self._proc, self._cgroup_root, self.main_pid) / f"{resource}.pressure"

    def _oom(self) -> None:
        if self.main_pid <= 0:
            return
        path = unit_cgroup(self._proc, self._cgroup_root, self.main_pid) / "memory.events"
        total = oom_kill_count(path)
        new = 0 if self._oom_seen is None else max(0, total - self._oom_seen)
        self._oom_seen = total
        self._emit(OomKills(self.unit, total, new, str(path), at=self._clock.monotonic()))

    def _sockets(self) -> None:
        paths = {t.path for t in self._triggers if isinstance(t, SocketModeTrigger)}
        for path in sorted(paths):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISSOCK(st.st_mode):
                mode = stat.S_IMODE(st.st_mode)
                self._emit(SocketModeSeen(path, mode, st.st_uid, st.st_gid, at=self._clock.monotonic()))

    def _grpc_streams(self) -> None:
        paths = {t.config for t in self._triggers if isinstance(t, GrpcStreamsTrigger)}
        for path in sorted(paths):
            value = self._streams_setting(Path(path))
            if value is not None:
                self._emit(GrpcStreamsSetting(path, value, at=self._clock.monotonic()))

    def _streams_setting(self, path: Path) -> str | None:
        """``[grpc] max_concurrent_streams`` as written ("" if unset), None if the file cannot be
        read as TOML; parsed again only when the file changed (parsing is the costly part)."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        seen = self._streams_seen.get(str(path))
        if seen is not None and seen[0] == key:
            return seen[1]
        value = streams_setting(path)
        self._streams_seen[str(path)] = (key, value)
        return value

    async def _containerd_version(self) -> None:
        try:
            version = await self._probe.version(self._probe_socket, self._probe_timeout)
        except ProbeError:
            return  # not answering is the probe rules' business
        if version != self._version:
            self._version = version
            self._emit(VersionSeen(version, at=self._clock.monotonic()))


def streams_setting(path: Path) -> str | None:
    """The TOML value of ``[grpc] max_concurrent_streams`` in ``path`` as written (at most 64
    characters), "" if the key is not set, None if the file is not one nodemedic reads or not TOML:
    a broken config is the config rule's business, and reading it is never an error here."""
    try:
        doc = tomllib.loads(read_config(path).decode())
    except (OSError, ValueError, RecursionError, MemoryError):  # ValueError: UnicodeDecodeError, TOML
        return None
    grpc = doc.get("grpc")
    if not isinstance(grpc, dict) or "max_concurrent_streams" not in grpc:
        return ""
    value = grpc["max_concurrent_streams"]
    plain = isinstance(value, int) and not isinstance(value, bool)
    return (str(value) if plain else json.dumps(value, default=str))[:64]
