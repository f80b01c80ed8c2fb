"""Freeze a SIGHUP sender's cgroup for a while (``[sighup] mode = "throttle"``), and thaw it.

cgroup v2: ``cgroup.freeze`` (1/0), confirmed by ``frozen 1``/``frozen 0`` in ``cgroup.events``;
cgroup v1: ``freezer.state`` (FROZEN/THAWED) under the freezer hierarchy. A frozen process keeps
everything (memory, sockets, children); thawed, it continues where it stopped.

Safety rules (``refusal``): only a leaf cgroup that has processes; never the root, never a cgroup
with a component matching the deny list, never a protected cgroup (nodemedic's own, containerd's)
nor an ancestor of one. Every frozen cgroup is first recorded in the registry (a JSON file under
the state directory, written atomically), so whatever happens to nodemedic, ``nodemedic thaw``
(the unit's ExecStopPost) finds and thaws it.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import posixpath
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from nodemedic.errors import FreezeFailedError, FreezeRefusedError
from nodemedic.ports import Freezing
from nodemedic.store import DAMAGED, SetAside, atomic_write, load_checked, note_set_aside

log = logging.getLogger(__name__)

REGISTRY_NAME = "frozen.json"
VERSION = 1
SETTLE = 2.0  # seconds the kernel gets to report a cgroup frozen (or thawed)
POLL = 0.01


class Freezer:
    """Freezes and thaws cgroups named by their path below the cgroup root (``/system.slice/x.service``)."""

    def __init__(
        self,
        cgroup_root: Path = Path("/sys/fs/cgroup"),
        registry: Path = Path("/var/lib/nodemedic") / REGISTRY_NAME,
        deny: Iterable[str] = (),
        protected: Iterable[str] = (),
        *,
        proc: Path = Path("/proc"),
        settle: float = SETTLE,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.root = cgroup_root
        self.registry = registry
        self.deny = list(deny)
        self.v2 = (cgroup_root / "cgroup.controllers").exists()
        own = own_cgroup(proc, v2=self.v2)
        self.protected = sorted({_normalise(p) for p in [*protected, *([own] if own else [])]})
        self.settle = settle
        self._sleep = sleep  # where the kernel gets time; tests pass a fake kernel here
        self.failed: dict[str, str] = {}  # cgroup -> why it could not be thawed (kept registered)

    # ---- decisions ---------------------------------------------------------------------------

    def refusal(self, cgroup: str) -> str | None:
        """Why ``cgroup`` may not be frozen, or None if it may."""
        if ".." in cgroup.split("/"):
            return "a path with '..' (outside this cgroup namespace)"
        cg = _normalise(cgroup)
        if cg == "/":
            return "the root cgroup"
        for part in cg.strip("/").split("/"):
            for pattern in self.deny:
                if fnmatch.fnmatchcase(part, pattern):
                    return f"{part!r} matches the deny-list pattern {pattern!r}"
        for p in self.protected:
            if p == cg:
                return "a protected cgroup (nodemedic's own or containerd's)"
            if p.startswith(cg + "/"):
                return f"an ancestor of the protected cgroup {p}"
        folder = self._folder(cg)
        if not folder.is_dir():
            return "no such cgroup (the sender is gone)"
        if any(child.is_dir() for child in folder.iterdir()):
            return "not a leaf: it has child cgroups, which would all be frozen"
        if not (folder / "cgroup.procs").read_text(encoding="utf-8").split():
            return "no process in it"
        return None

    # ---- actions -----------------------------------------------------------------------------

    def freeze(self, cgroup: str, until_wall: float) -> None:
        """Freeze ``cgroup`` until the wall-clock time ``until_wall`` (see ``thaw_due``).
        Recorded before it is frozen, so no frozen cgroup is ever unknown to ``thaw``."""
        why = self.refusal(cgroup)
        if why is not None:
            raise FreezeRefusedError(f"not freezing {cgroup}: {why}")
        cg = _normalise(cgroup)
        entries = self._load()
        entries[cg] = float(until_wall)
        self._save(entries)
        try:
            self._set(cg, frozen=True)
        except (OSError, FreezeFailedError) as exc:
            self._restore_thawed(cg)
            raise FreezeFailedError(f"could not freeze {cg}: {exc}; it was left thawed") from exc

    def thaw(self, cgroup: str) -> bool:
        """Thaw ``cgroup`` and drop it from the registry; False if it no longer exists (dropped)."""
        cg = _normalise(cgroup)
        if not self._folder(cg).is_dir():
            self._drop(cg)
            return False
        try:
            self._set(cg, frozen=False)
        except OSError as exc:
            if not self._folder(cg).is_dir():  # vanished meanwhile
                self._drop(cg)
                return False
            raise FreezeFailedError(f"could not thaw {cg}: {exc}; it stays in {self.registry}") from exc
        self._drop(cg)
        return True

    def frozen(self) -> dict[str, float]:
        """Registered cgroups and until when they stay frozen; vanished ones are dropped."""
        entries = self._load()
        alive = {cg: until for cg, until in entries.items() if self._folder(cg).is_dir()}
        if alive != entries:
            self._save(alive)
        return alive

    def thaw_all(self) -> list[str]:
        """Thaw every registered cgroup; returns those thawed. One that fails is logged, kept
        registered and named in ``failed``; the others are thawed regardless."""
        return self._thaw_each(self._load())

    def thaw_due(self, now_wall: float) -> list[str]:
        """Thaw the registered cgroups whose time is up at ``now_wall``; returns those thawed."""
        return self._thaw_each({cg: u for cg, u in self._load().items() if u <= now_wall})

    def _thaw_each(self, entries: dict[str, float]) -> list[str]:
        thawed = []
        self.failed = {}
        for cg in sorted(entries):
            try:
                if self.thaw(cg):
                    thawed.append(cg)
            except (FreezeFailedError, OSError) as exc:
                log.error("%s", exc)
                self.failed[cg] = str(exc)
        return thawed

    # ---- the kernel ----------------------------------------------------------------------------

    def _folder(self, cg: str) -> Path:
        base = self.root if self.v2 else self.root / "freezer"
        return base / cg.lstrip("/")

    def _set(self, cg: str, *, frozen: bool) -> None:
        folder = self._folder(cg)
        if self.v2:
            (folder / "cgroup.freeze").write_text("1" if frozen else "0", encoding="ascii")
        else:
            (folder / "freezer.state").write_text("FROZEN" if frozen else "THAWED", encoding="ascii")
        deadline = time.monotonic() + self.settle
        while self._is_frozen(folder) != frozen:
            if time.monotonic() > deadline:
                if not frozen and self._own_setting(folder) == "0":
                    # ours is undone; something else (an ancestor frozen by someone else) holds it
                    log.warning("%s: thawed by nodemedic, but still frozen from above", cg)
                    return
                state = "frozen" if frozen else "thawed"
                raise FreezeFailedError(f"{cg} not reported {state} within {self.settle:g}s")
            self._sleep(POLL)

    def _is_frozen(self, folder: Path) -> bool:
        if self.v2:
            events = (folder / "cgroup.events").read_text(encoding="ascii")
            return re.search(r"^frozen 1$", events, re.MULTILINE) is not None
        return (folder / "freezer.state").read_text(encoding="ascii").strip() == "FROZEN"

    def _own_setting(self, folder: Path) -> str:
        name = "cgroup.freeze" if self.v2 else "freezer.self_freezing"
        try:
            return (folder / name).read_text(encoding="ascii").strip()
        except OSError:
            return ""

    def _restore_thawed(self, cg: str) -> None:
        try:
            self._set(cg, frozen=False)
        except (OSError, FreezeFailedError) as exc:
            log.error("%s: could not undo a failed freeze (%s); it stays in %s", cg, exc, self.registry)
            return
        self._drop(cg)

    # ---- the registry --------------------------------------------------------------------------

    def _drop(self, cg: str) -> None:
        entries = self._load()
        if entries.pop(cg, None) is not None:
            self._save(entries)

    def _load(self) -> dict[str, float]:
        named: dict[str, float] = {}
        read: list[bool] = []

        def check(text: str) -> dict[str, float]:
            read.append(True)
            try:
                return self._entries(text)
            except DAMAGED:  # every cgroup path it names is due for thawing now
                named.update({_normalise(m): 0.0 for m in re.findall(r'"(/[^"\\]*)"', text)})
                raise

        unusable: list[SetAside] = []
        entries = load_checked(self.registry, check, unusable.append)
        if entries is not None or not unusable:
            return entries or {}
        note_set_aside(unusable[0])  # for the daemon's record
        if not read:  # not even text: what it named may still be frozen, and nobody would know
            found = unusable[0]
            raise FreezeFailedError(
                f"{self.registry} unusable ({found.why}); kept as {found.kept_as}: thaw what it names by hand"
            )
        if named:
            log.warning("%s: thawing what the unusable registry names: %s", self.registry, ", ".join(named))
            try:
                self._save(named)
            except OSError as exc:  # a read-only state folder: thawed from memory all the same
                log.warning("cannot save %s: %s", self.registry, exc)
        return named

    def _entries(self, text: str) -> dict[str, float]:
        data = json.loads(text)
        raw = data["frozen"] if isinstance(data, dict) and data.get("version") == VERSION else None
        if not isinstance(raw, dict):
            raise ValueError(f"not a nodemedic registry of version {VERSION}")
        entries = {}
        for cg, until in raw.items():
            try:
                entries[_normalise(str(cg))] = float(until)
            except (TypeError, ValueError):
                log.warning("%s: entry %r: %r is not a time; thawing it now", self.registry, cg, until)
                entries[_normalise(str(cg))] = 0.0
        return entries

    def _save(self, entries: dict[str, float]) -> None:
        self.registry.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        body = {"version": VERSION, "frozen": dict(sorted(entries.items()))}
        atomic_write(self.registry, json.dumps(body, indent=1) + "\n")


# ---- the steps the executor runs (every call touches cgroupfs: off the event loop) ------------------

ALREADY_FROZEN = "frozen already"


async def check_freeze(freezer: Freezing, cgroup: str) -> str | None:
    """The check: why ``cgroup`` is not to be frozen now (its refusal, or ALREADY_FROZEN), None if
    it may be."""
    try:
        refusal = await asyncio.to_thread(freezer.refusal, cgroup)
        if refusal is None and cgroup in await asyncio.to_thread(freezer.frozen):
            return ALREADY_FROZEN
    except OSError as exc:  # e.g. the sender's cgroup vanished while it was looked at
        return f"its cgroup could not be read: {exc}"
    return refusal


def start_freeze(freezer: Freezing, cgroup: str, until_wall: float) -> asyncio.Future[None]:
    """The apply step, in a thread: the caller shields the future, so that a freeze cut off by
    nodemedic's stop finishes before the exit-time thaw."""
    return asyncio.ensure_future(asyncio.to_thread(freezer.freeze, cgroup, until_wall))


async def thaw_over(freezer: Freezing, now_wall: float) -> tuple[list[str], float | None]:
    """Thaw the cgroups whose cool-down is over at ``now_wall``: those thawed, and the end of the
    earliest cool-down still running (None: nothing is frozen any more)."""
    thawed = await asyncio.to_thread(freezer.thaw_due, now_wall)
    left = await asyncio.to_thread(freezer.frozen)
    return thawed, min(left.values(), default=None)


def own_cgroup(proc: Path = Path("/proc"), *, v2: bool = True, pid: str = "self") -> str:
    """The cgroup of ``pid`` (the unified one on v2, the freezer one on v1); "" if unknown."""
    try:
        lines = (proc / pid / "cgroup").read_text(encoding="utf-8").splitlines()
    except OSError:
        return ""
    for line in lines:
        _num, controllers, path = line.split(":", 2)
        if (v2 and controllers == "") or (not v2 and "freezer" in controllers.split(",")):
            return path
    return ""


def _normalise(cgroup: str) -> str:
    return posixpath.normpath("/" + cgroup.strip().lstrip("/"))
