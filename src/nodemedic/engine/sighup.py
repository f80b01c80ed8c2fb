"""The SIGHUP guard: sees SIGHUPs sent to containerd, reports storms, and damps them by mode.

- Every SIGHUP counts once: the kernel's trace (which names the sender) is preferred; a death by
  SIGHUP reported over D-Bus counts only where the trace did not see it.
- A storm (more than ``[sighup.storm].signals`` within ``window``) is one record when it begins and one
  when it ends, with the count, the senders and how often containerd restarted meanwhile.
- ``coalesce``: a drop-in starts containerd with SIGHUP ignored, and the reload the signal asked for
  is done here, only when config.toml's content really changed and loads, at most once per interval.
- ``throttle``: a sender over its token bucket has its cgroup frozen for a cool-down, then thawed.
Leaving a mode restores stock behaviour (drop-in removed, cgroups thawed), whatever ``[daemon].mode``
says; installing, freezing and restarting happen only in enforce mode. Restarts of containerd take
the runner's lock, so they never overlap a repair.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from nodemedic.actions.base import UnitState, VersionProbe
from nodemedic.clock import Clock
from nodemedic.configs import GoodConfigs, config_problem
from nodemedic.engine.ratelimit import SenderBuckets
from nodemedic.engine.storm import Storm, StormDetector, Verdict
from nodemedic.errors import NodemedicError
from nodemedic.events import Event, FileChanged, SignalSeen, UnitChanged
from nodemedic.policy.model import Mode
from nodemedic.policy.sighup import SighupSettings
from nodemedic.report import RecordKind, Reporter
from nodemedic.sighup import dropin
from nodemedic.state import atomic_write

log = logging.getLogger(__name__)

SIGHUP = 1
RULE = "sighup"  # NODEMEDIC_RULE of the guard's records
TRACE_COVERS = 10.0  # a D-Bus death this soon after a traced SIGHUP is that same signal
TICK = 1.0
RESTART_TIMEOUT = 60.0
NEW_PID_WAIT = 15.0


class GuardSystemd(Protocol):
    """What the guard needs from systemd (SystemdBus in the daemon)."""

    async def state(self, unit: str) -> UnitState: ...

    async def restart(self, unit: str, timeout: float) -> None: ...

    async def exec_start(self, unit: str) -> list[list[str]]: ...

    async def daemon_reload(self) -> None: ...


class Freezing(Protocol):
    """What the guard needs from the freezer (sighup/freezer.py's Freezer)."""

    def refusal(self, cgroup: str) -> str | None: ...

    def freeze(self, cgroup: str, until_wall: float) -> None: ...

    def frozen(self) -> dict[str, float]: ...

    def thaw_all(self) -> list[str]: ...

    def thaw_due(self, now_wall: float) -> list[str]: ...


@dataclass(frozen=True)
class GuardContext:
    systemd: GuardSystemd
    probe: VersionProbe
    probe_socket: str
    probe_timeout: float
    config: Path
    good: GoodConfigs
    freezer: Freezing
    state_file: Path
    exclusive: Callable[[], AbstractAsyncContextManager[object]]
    closing: Callable[[], bool]
    dropin_root: Path = Path("/")
    proc: Path = Path("/proc")


def sender_name(event: SignalSeen) -> str:
    """Who sent a signal, in the operator's terms: the pod, else the unit, else the process."""
    if event.source != "tracefs":
        return "unknown sender (seen over D-Bus)"
    who = f"pod {event.sender_pod}" if event.sender_pod else event.sender_unit or event.sender_cgroup
    process = f"pid {event.sender_pid} {event.sender_comm}"
    return f"{who} ({process})" if who else f"{process} (gone)"


class SighupGuard:
    def __init__(self, settings: SighupSettings, daemon_mode: Mode, ctx: GuardContext, report: Reporter,
                 clock: Clock) -> None:  # fmt: skip
        self.ctx, self._report, self._clock = ctx, report, clock
        self.settings = settings
        self.daemon_mode = daemon_mode
        self._storm = StormDetector(settings.storm.signals, settings.storm.window)
        t = settings.throttle
        self._buckets = SenderBuckets(t.burst, t.refill, t.per, clock)
        self._wake = asyncio.Event()
        self._last_traced = -1e18
        self._main_pid = 0
        self._restarting = False  # a restart of ours is under way: its new PID is expected
        self._new_pid = asyncio.Event()
        self._applied: bytes | None = None  # the config content containerd runs with
        self._persisted = _load_state(ctx.state_file)
        self._reload_due: float | None = None
        self._requests = 0
        self._last_restart = -1e18
        self._told: set[str] = set()  # one-off reports already made (refused contents, senders)
        self._apply_dropin = False
        self._coalescing = False
        self._storm_restarts = 0
        self._storm_incident = ""
        self._mode_changed = True
        self._to_freeze: dict[str, str] = {}  # cgroup -> sender, decided, frozen at the next tick

    # ---- events ---------------------------------------------------------------------------------

    def handle(self, event: Event) -> None:
        if self.settings.mode == "off":
            return
        if isinstance(event, UnitChanged) and event.unit == self.settings.unit:
            self._unit_changed(event)
        elif isinstance(event, SignalSeen) and event.unit == self.settings.unit and event.signal == SIGHUP:
            self._sighup(event)
        elif isinstance(event, FileChanged) and event.path == str(self.ctx.config):
            self._request_reload()

    def _unit_changed(self, event: UnitChanged) -> None:
        if event.active_state != "active" or not event.main_pid or event.main_pid == self._main_pid:
            return
        first = self._main_pid == 0
        self._main_pid = event.main_pid
        self._new_pid.set()
        if self._storm.storm is not None and not first:
            self._storm_restarts += 1
        if self._restarting:
            return  # our restart: it records what it applied
        content = _read(self.ctx.config)
        saved = self._persisted
        # nodemedic restarted, containerd did not: it still runs what was applied before
        same_process = first and saved.get("main_pid") == event.main_pid
        if same_process and content is not None and saved.get("applied") != _digest(content):
            self._applied = self._good_copy(str(saved.get("applied", ""))) or b""
            self._request_reload()
            return
        self._applied = content
        self._persist()

    def _sighup(self, event: SignalSeen) -> None:
        now = self._clock.monotonic()
        if event.source == "tracefs":
            self._last_traced = now
        elif now - self._last_traced < TRACE_COVERS:
            return  # the death the trace already counted
        sender = sender_name(event)
        verdict = self._storm.add(now, sender)
        if verdict is Verdict.SINGLE:
            self._say(RecordKind.DETECTED, f"{self.settings.unit} was sent SIGHUP by {sender}"
                         f"{' (ignored: it runs with SIGHUP ignored)' if event.result == 1 else ''}",
                         UNIT=self.settings.unit, SOURCE=event.source, SENDERS=sender,
                         CGROUP=event.sender_cgroup, OUTCOME="sighup")  # fmt: skip
        elif verdict is Verdict.BEGAN and self._storm.storm is not None:
            self._storm_began(self._storm.storm)
        if self.settings.mode == "throttle" and event.source == "tracefs":
            self._throttle(event, sender)
        if self.settings.mode == "coalesce" and event.source == "tracefs":
            self._request_reload()
        self._wake.set()

    def _storm_began(self, storm: Storm) -> None:
        self._storm_restarts = 0
        self._storm_incident = uuid.uuid4().hex[:12]
        window = self.settings.storm.window
        self._report(
            RecordKind.DETECTED,
            f"SIGHUP storm against {self.settings.unit}: {storm.signals} SIGHUPs within {window:g}s from "
            f"{storm.describe_senders()}; [sighup] mode {self.settings.mode}",
            UNIT=self.settings.unit, SIGNALS=storm.signals, SENDERS=storm.describe_senders(),
            WINDOW=window, OUTCOME="storm",
        )  # fmt: skip

    def _storm_ended(self, storm: Storm) -> None:
        lasted = storm.last - storm.began
        self._report(
            RecordKind.DETECTED,
            f"SIGHUP storm against {self.settings.unit} ended: {storm.signals} SIGHUPs over {lasted:.0f}s "
            f"from {storm.describe_senders()}; {self.settings.unit} restarted {self._storm_restarts} "
            f"time(s) meanwhile",
            UNIT=self.settings.unit, SIGNALS=storm.signals, SENDERS=storm.describe_senders(),
            WINDOW=lasted, OUTCOME="storm-ended", INCIDENT=self._storm_incident,
            DETAIL=f"restarts={self._storm_restarts}",
        )  # fmt: skip

    # ---- the loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            while True:
                await self.step()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._next_wait())
                self._wake.clear()
        finally:
            if self.settings.mode == "throttle":
                self._thaw(self.ctx.freezer.thaw_all(), "nodemedic is stopping")

    async def step(self) -> None:
        """One turn: enter a new mode, end a storm, freeze and thaw, apply what is due."""
        if self._mode_changed:
            self._mode_changed = False
            await self._enter_mode()
        await self._tick()

    def replace(self, settings: SighupSettings, daemon_mode: Mode) -> None:
        """A reloaded policy: a new mode is entered (and the old one's effects undone) at once."""
        old, old_daemon = self.settings, self.daemon_mode
        self.settings, self.daemon_mode = settings, daemon_mode
        self._storm.threshold, self._storm.window = settings.storm.signals, settings.storm.window
        t = settings.throttle
        self._buckets = SenderBuckets(t.burst, t.refill, t.per, self._clock)
        if old.mode != settings.mode or old.coalesce != settings.coalesce or old_daemon != daemon_mode:
            self._mode_changed = True
            self._wake.set()

    def _next_wait(self) -> float:
        if self._reload_due is not None:
            return max(0.0, min(TICK, self._reload_due - self._clock.monotonic()))
        return TICK

    async def _tick(self) -> None:
        ended = self._storm.ended(self._clock.monotonic())
        if ended is not None:
            self._storm_ended(ended)
        if self.settings.mode == "throttle":
            await self._freeze_decided()
            due = await asyncio.to_thread(self.ctx.freezer.thaw_due, self._clock.wall())
            self._thaw(due, "its cool-down is over")
        if self._apply_dropin:
            self._apply_dropin = False
            await self._restart_for_dropin()
        if self._reload_due is not None and self._clock.monotonic() >= self._reload_due:
            self._reload_due = None
            await self._reload()

    # ---- modes ----------------------------------------------------------------------------------

    async def _enter_mode(self) -> None:
        mode = self.settings.mode
        if mode != "throttle":
            self._to_freeze.clear()
            self._thaw(await asyncio.to_thread(self.ctx.freezer.thaw_all), f"[sighup] mode is {mode}")
        if mode != "coalesce":
            self._coalescing = False
            await self._remove_dropins()
        if mode == "coalesce":
            await self._install_dropin()

    async def _remove_dropins(self) -> None:
        removed = await asyncio.to_thread(dropin.remove_dropins, self.settings.unit, self.ctx.dropin_root)
        if not removed:
            return
        await self._daemon_reload()
        self._say(RecordKind.ACTION, f"removed {', '.join(map(str, removed))}: {self.settings.unit} "
                     f"dies on SIGHUP again from its next start ([sighup] mode {self.settings.mode}); "
                     "until then it keeps ignoring SIGHUP", UNIT=self.settings.unit,
                     PATH=str(removed[0]), OUTCOME="dropin-removed", ACTION="sighup-dropin")  # fmt: skip

    async def _install_dropin(self) -> None:
        unit, co = self.settings.unit, self.settings.coalesce
        if not await asyncio.to_thread(dropin.env_ignores_signals):
            self._say(RecordKind.ERROR, "[sighup] mode coalesce needs `env --ignore-signal` (coreutils "
                         ">= 8.31), which this node lacks: SIGHUPs are only observed", UNIT=unit,
                         OUTCOME="refused", ACTION="sighup-dropin")  # fmt: skip
            return
        self._coalescing = True
        path = dropin.dropin_path(unit, co.persistent, self.ctx.dropin_root)
        try:
            text = dropin.render_dropin(await self.ctx.systemd.exec_start(unit))
        except (NodemedicError, OSError) as exc:
            self._say(RecordKind.ERROR, f"cannot read {unit}'s ExecStart to write the drop-in: {exc}",
                         UNIT=unit, OUTCOME="failed", ACTION="sighup-dropin")  # fmt: skip
            return
        if self.daemon_mode == "observe":
            if not path.exists():
                self._say(RecordKind.DECIDED, f"would install {path} so that {unit} starts with SIGHUP "
                             "ignored, and apply config changes itself", UNIT=unit, PATH=str(path),
                             MODE="observe", OUTCOME="would-do", ACTION="sighup-dropin")  # fmt: skip
            return
        try:
            installed = await asyncio.to_thread(self._install_only, path, text)
        except (NodemedicError, OSError) as exc:
            self._say(RecordKind.ERROR, f"cannot install {path}: {exc}", UNIT=unit, PATH=str(path),
                         OUTCOME="failed", ACTION="sighup-dropin")  # fmt: skip
            return
        if installed:
            await self._daemon_reload()
            self._say(RecordKind.ACTION, f"installed {path}: {unit} starts with SIGHUP ignored; "
                         "nodemedic applies config.toml changes itself", UNIT=unit, PATH=str(path),
                         OUTCOME="dropin-installed", ACTION="sighup-dropin")  # fmt: skip
        self._request_reload()  # a change that came before the mode was entered
        if co.restart_to_apply:
            self._apply_dropin = True
        else:
            self._say(RecordKind.DAEMON, f"the drop-in takes effect at {unit}'s next start", UNIT=unit,
                         OUTCOME="dropin-pending", ACTION="sighup-dropin")  # fmt: skip

    def _install_only(self, path: Path, text: str) -> bool:
        """Install at ``path``; our copy at the other place (/run or /etc) goes, so that turning
        ``persistent`` off really reverts at the next reboot."""
        other = dropin.dropin_path(self.settings.unit, not self.settings.coalesce.persistent,
                                   self.ctx.dropin_root)  # fmt: skip
        moved = dropin.is_ours(other)
        if moved:
            other.unlink()
        return dropin.install_dropin(path, text) or moved

    async def _daemon_reload(self) -> None:
        try:
            await self.ctx.systemd.daemon_reload()
        except (NodemedicError, OSError) as exc:
            self._say(RecordKind.ERROR, f"systemd daemon-reload failed: {exc}", OUTCOME="failed",
                         ACTION="sighup-dropin")  # fmt: skip

    async def _restart_for_dropin(self) -> None:
        unit = self.settings.unit
        if not self._main_pid:  # at start-up, D-Bus may not have said yet
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._new_pid.wait(), NEW_PID_WAIT)
        if not self._main_pid:
            self._say(RecordKind.DAEMON, f"{unit} is not running: the drop-in takes effect when it "
                         "starts", UNIT=unit, OUTCOME="dropin-pending", ACTION="sighup-dropin")  # fmt: skip
            return
        if dropin.ignores_sighup(self._main_pid, self.ctx.proc):
            return  # already applied (e.g. nodemedic restarted, containerd did not)
        problem = await config_problem(self.ctx.config)
        if problem is not None:
            self._say(RecordKind.DECIDED, f"not restarting {unit} to apply the drop-in: its config does "
                         f"not load ({problem}); the drop-in takes effect at its next start", UNIT=unit,
                         OUTCOME="dropin-pending", DETAIL=problem, ACTION="sighup-dropin")  # fmt: skip
            return
        pid = await self._restart("apply the SIGHUP drop-in")
        if pid and dropin.ignores_sighup(pid, self.ctx.proc):
            self._say(RecordKind.OUTCOME, f"{unit} restarted (pid {pid}) and now ignores SIGHUP",
                         UNIT=unit, OUTCOME="dropin-applied", ACTION="sighup-dropin")  # fmt: skip
        elif pid:
            self._say(RecordKind.ERROR, f"{unit} restarted (pid {pid}) but does not ignore SIGHUP: "
                         "is the drop-in overridden by another one?", UNIT=unit, OUTCOME="failed",
                         ACTION="sighup-dropin")  # fmt: skip

    # ---- coalesced reloads ----------------------------------------------------------------------

    def _request_reload(self) -> None:
        if self.settings.mode != "coalesce" or not self._coalescing or self._applied is None:
            return
        content = _read(self.ctx.config)
        if content is None or content == self._applied:
            return  # a SIGHUP with nothing to reload: absorbed
        self._requests += 1
        if self._reload_due is None:
            interval = self.settings.coalesce.interval
            self._reload_due = max(self._clock.monotonic(), self._last_restart + interval)
        self._wake.set()

    async def _reload(self) -> None:
        unit, path = self.settings.unit, self.ctx.config
        content = _read(path)
        if content is None or content == self._applied:
            self._requests = 0
            return
        digest = _digest(content)
        problem = await config_problem(path)
        if problem is not None:
            if f"refused:{digest}" not in self._told:
                self._told.add(f"refused:{digest}")
                self._say(RecordKind.DETECTED, f"{path} changed but containerd would refuse it: "
                             f"{problem}; {unit} keeps running with its current config", UNIT=unit,
                             PATH=str(path), DETAIL=problem, OUTCOME="reload-refused")  # fmt: skip
            self._requests = 0
            return
        requests, self._requests = self._requests, 0
        if self.daemon_mode == "observe":
            self._say(RecordKind.DECIDED, f"would restart {unit} once to apply the new {path} "
                         f"({requests} request(s) coalesced)", UNIT=unit, PATH=str(path), SIGNALS=requests,
                         MODE="observe", OUTCOME="would-do", ACTION="sighup-reload")  # fmt: skip
            self._applied = content
            return
        if self._applied:
            await asyncio.to_thread(self.ctx.good.save, self._applied)
        pid = await self._restart(f"apply a new {path}", content)
        if pid:
            self._say(RecordKind.OUTCOME, f"applied the new {path} with one restart of {unit} "
                         f"(pid {pid}): {requests} request(s) coalesced", UNIT=unit, PATH=str(path),
                         SIGNALS=requests, DETAIL=f"sha256 {digest}", OUTCOME="reload-applied",
                         ACTION="sighup-reload")  # fmt: skip

    async def _restart(self, why: str, content: bytes | None = None) -> int:
        """Restart the unit under the runner's lock; returns the new main PID (0 if none came)."""
        unit = self.settings.unit
        async with self.ctx.exclusive():
            if self.ctx.closing():
                return 0
            self._restarting = True
            self._new_pid.clear()
            old = self._main_pid
            try:
                applied = content if content is not None else _read(self.ctx.config)
                self._say(RecordKind.ACTION, f"restarting {unit} to {why}", UNIT=unit, OUTCOME="started",
                             ACTION="restart-unit")  # fmt: skip
                await self.ctx.systemd.restart(unit, RESTART_TIMEOUT)
                deadline = self._clock.monotonic() + NEW_PID_WAIT
                while self._main_pid == old and self._clock.monotonic() < deadline:
                    self._new_pid.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._new_pid.wait(), 0.5)
            except (NodemedicError, OSError) as exc:
                self._say(RecordKind.ERROR, f"restarting {unit} to {why} failed: {exc}", UNIT=unit,
                             OUTCOME="failed", ACTION="restart-unit")  # fmt: skip
                return 0
            finally:
                self._restarting = False
                self._last_restart = self._clock.monotonic()
            self._applied = applied
            self._persist()
            return self._main_pid if self._main_pid != old else 0

    # ---- throttle -------------------------------------------------------------------------------

    def _throttle(self, event: SignalSeen, sender: str) -> None:
        cgroup = event.sender_cgroup
        if not cgroup or self._buckets.take(cgroup):
            return
        refusal = self.ctx.freezer.refusal(cgroup)
        if refusal is not None:
            if f"refusal:{cgroup}" not in self._told:
                self._told.add(f"refusal:{cgroup}")
                self._say(RecordKind.DECIDED, f"{sender} exceeds its SIGHUP budget but is not frozen: "
                             f"{refusal}", CGROUP=cgroup, SENDERS=sender, OUTCOME="refused",
                             DETAIL=refusal, ACTION="freeze-sender")  # fmt: skip
            return
        cooldown = self.settings.throttle.cooldown
        if self.daemon_mode == "observe":
            self._say(RecordKind.DECIDED, f"would freeze {cgroup} ({sender}) for {cooldown:g}s: it "
                         "exceeds its SIGHUP budget", CGROUP=cgroup, SENDERS=sender, MODE="observe",
                         OUTCOME="would-do", ACTION="freeze-sender")  # fmt: skip
            return
        if cgroup not in self.ctx.freezer.frozen():
            self._to_freeze[cgroup] = sender
            self._wake.set()

    async def _freeze_decided(self) -> None:
        throttle = self.settings.throttle
        while self._to_freeze:
            cgroup, sender = self._to_freeze.popitem()
            try:
                await asyncio.to_thread(
                    self.ctx.freezer.freeze, cgroup, self._clock.wall() + throttle.cooldown
                )
            except (NodemedicError, OSError) as exc:
                self._say(RecordKind.ERROR, f"could not freeze {cgroup}: {exc}", CGROUP=cgroup,
                             SENDERS=sender, OUTCOME="failed", ACTION="freeze-sender")  # fmt: skip
                continue
            self._say(RecordKind.ACTION, f"froze {cgroup} ({sender}) for {throttle.cooldown:g}s: it sent "
                         f"more SIGHUPs than its budget ({throttle.burst} at once, {throttle.refill} per "
                         f"{throttle.per:g}s)", CGROUP=cgroup, SENDERS=sender, OUTCOME="frozen",
                         ACTION="freeze-sender")  # fmt: skip

    def _thaw(self, cgroups: list[str], why: str) -> None:
        for cgroup in cgroups:
            self._say(RecordKind.ACTION, f"thawed {cgroup}: {why}", CGROUP=cgroup, OUTCOME="thawed",
                         ACTION="freeze-sender")  # fmt: skip

    # ---- helpers --------------------------------------------------------------------------------

    def _say(self, kind: RecordKind, message: str, **fields: object) -> None:
        """Every record of the guard carries NODEMEDIC_RULE=sighup (`journalctl NODEMEDIC_RULE=sighup`),
        the mode, and an incident id: the storm's while one lasts, so its records go together."""
        incident = self._storm_incident if self._storm.storm is not None else uuid.uuid4().hex[:12]
        fields.setdefault("MODE", self.daemon_mode)
        fields.setdefault("INCIDENT", incident)
        self._report(kind, message, RULE=RULE, **fields)

    def _good_copy(self, digest: str) -> bytes | None:
        path = self.ctx.good.directory / f"{digest}.toml"
        return _read(path) if digest else None

    def _persist(self) -> None:
        if self._applied is None:
            return
        self._persisted = {"main_pid": self._main_pid, "applied": _digest(self._applied)}
        with contextlib.suppress(OSError):
            atomic_write(self.ctx.state_file, json.dumps(self._persisted))


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _digest(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _load_state(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
