"""The resource watcher: one periodic reading of what no event announces.

Running out of file descriptors, CPU or memory pressure, an OOM kill, a socket's mode changed by
hand, a containerd version with known bugs, or a config key containerd ignores: none of these sends
an event (systemd still says active/running), so they are read every ``[daemon.resources].interval``.
Only the checks some rule uses are read. Readings are events like any other; whether one is a fault
is the policy's business (policy/match.py), not this module's.

containerd's MainPID is asked of ``main_pid`` (app.py hands in the node view's, the one copy of it)
at each reading, its cgroup read from /proc/MainPID/cgroup. Which reading a trigger needs is one
entry in ``READINGS``. Everything read here is a file under ``proc`` and ``cgroup_root``, so unit
tests give a fake tree.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

from nodemedic.configs import parsed_config
from nodemedic.errors import ProbeError
from nodemedic.events import (
    Event,
    FdUsage,
    GrpcStreamsSetting,
    OomKills,
    PressureSeen,
    SocketModeSeen,
    VersionSeen,
)
from nodemedic.policy.model import (
    FdTrigger,
    GrpcStreamsTrigger,
    OomTrigger,
    PressureTrigger,
    ResourceTrigger,
    SocketModeTrigger,
    VersionTrigger,
)
from nodemedic.ports import Clock, VersionProbe
from nodemedic.procfs import oom_kill_count, open_fds, read_pressure, soft_nofile, unit_cgroup

log = logging.getLogger(__name__)

T = TypeVar("T", bound=ResourceTrigger)


class ResourceWatch:
    """Reads, every ``interval``, each check that ``triggers`` need and emits what it found."""

    def __init__(
        self,
        triggers: Sequence[ResourceTrigger],
        unit: str,
        interval: float,
        probe: VersionProbe,
        probe_socket: str,
        probe_timeout: float,
        emit: Callable[[Event], None],
        clock: Clock,
        *,
        main_pid: Callable[[], int],
        proc: Path = Path("/proc"),
        cgroup_root: Path = Path("/sys/fs/cgroup"),
    ) -> None:
        self.unit = unit
        self.interval = interval
        self._triggers = list(triggers)
        self._main_pid = main_pid  # ``unit``'s main process as last reported (0 while not running)
        self._probe = probe
        self._probe_socket, self._probe_timeout = probe_socket, probe_timeout
        self._emit = emit
        self._clock = clock
        self._proc, self._cgroup_root = proc, cgroup_root
        self._oom_seen: int | None = None
        self._version = ""
        self._warned: set[str] = set()
        self._streams_seen: dict[str, tuple[tuple[int, ...], str | None]] = {}  # path: (stat, value)

    async def run(self) -> None:
        if not self._triggers:
            return
        while True:
            await self.read_once()
            await asyncio.sleep(self.interval)

    async def read_once(self) -> None:
        """One reading of every check in use, in the order of ``READINGS``."""
        kinds = {type(t) for t in self._triggers}
        for kind, read in READINGS.items():
            if kind in kinds:
                await read(self)

    def _of(self, kind: type[T]) -> list[T]:
        return [t for t in self._triggers if isinstance(t, kind)]

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
        pid = self._main_pid()
        if pid <= 0:
            return
        limit, count = soft_nofile(self._proc, pid), open_fds(self._proc, pid)
        self._emit(FdUsage(self.unit, pid, count, limit, at=self._clock.monotonic()))

    def _pressures(self) -> None:
        wanted = {(t.scope, t.resource) for t in self._of(PressureTrigger)}
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
        pid = self._main_pid()
        if pid <= 0:
            return None
        return unit_cgroup(self._proc, self._cgroup_root, pid) / f"{resource}.pressure"

    def _oom(self) -> None:
        pid = self._main_pid()
        if pid <= 0:
            return
        path = unit_cgroup(self._proc, self._cgroup_root, pid) / "memory.events"
        total = oom_kill_count(path)
        new = 0 if self._oom_seen is None else max(0, total - self._oom_seen)
        self._oom_seen = total
        self._emit(OomKills(self.unit, total, new, str(path), at=self._clock.monotonic()))

    def _sockets(self) -> None:
        paths = {t.path for t in self._of(SocketModeTrigger)}
        for path in sorted(paths):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISSOCK(st.st_mode):
                mode = stat.S_IMODE(st.st_mode)
                self._emit(SocketModeSeen(path, mode, st.st_uid, st.st_gid, at=self._clock.monotonic()))

    def _grpc_streams(self) -> None:
        paths = {t.config for t in self._of(GrpcStreamsTrigger)}
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


def _files_reading(
    what: str, read: Callable[[ResourceWatch], None]
) -> Callable[[ResourceWatch], Awaitable[None]]:
    """A reading of files, as an entry of ``READINGS`` (see ``ResourceWatch._guarded``)."""

    async def reading(watch: ResourceWatch) -> None:
        watch._guarded(what, lambda: read(watch))

    return reading


# Which reading each resource trigger needs, in reading order. A new resource trigger is one class
# in policy/model.py and one entry here (tests/unit/test_trigger_behaviour.py checks that each has one).
READINGS: dict[type[ResourceTrigger], Callable[[ResourceWatch], Awaitable[None]]] = {
    FdTrigger: _files_reading("FdTrigger", ResourceWatch._fds),
    PressureTrigger: _files_reading("PressureTrigger", ResourceWatch._pressures),
    OomTrigger: _files_reading("OomTrigger", ResourceWatch._oom),
    SocketModeTrigger: _files_reading("SocketModeTrigger", ResourceWatch._sockets),
    GrpcStreamsTrigger: _files_reading("GrpcStreamsTrigger", ResourceWatch._grpc_streams),
    VersionTrigger: ResourceWatch._containerd_version,
}


def streams_setting(path: Path) -> str | None:
    """The TOML value of ``[grpc] max_concurrent_streams`` in ``path`` as written (at most 64
    characters), "" if the key is not set, None if the file is not one nodemedic reads or not TOML:
    a broken config is the config rule's business, and reading it is never an error here."""
    doc = parsed_config(path)
    if doc is None:
        return None
    grpc = doc.get("grpc")
    if not isinstance(grpc, dict) or "max_concurrent_streams" not in grpc:
        return ""
    value = grpc["max_concurrent_streams"]
    plain = isinstance(value, int) and not isinstance(value, bool)
    return (str(value) if plain else json.dumps(value, default=str))[:64]
