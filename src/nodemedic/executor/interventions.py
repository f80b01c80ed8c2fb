"""The SIGHUP guard's effects, run: the drop-in, the coalesced reload, freezing and thawing.

``core/sighup_guard.py`` decides; this runs what it returns with the actions of
``actions/sighup_dropin.py``, ``actions/sighup_reload.py`` and ``actions/freezer.py``, and tells the
core how each ended. As for every other effect of nodemedic, every change to the node holds the
executor's lock (so none overlaps a repair), observe mode only checks and says what it would do,
nothing new starts once nodemedic is stopping, and a restart of containerd (a reload or the
drop-in's) counts against the global repair budget: while the budget is spent it is held, said
once, and tried again an interval later.

The guard's work runs one job at a time (as its turns did), in ``run``: app.py runs it as a
long-lived task; when it ends, nothing nodemedic froze stays frozen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nodemedic.actions import freezer as freezing
from nodemedic.actions import sighup_dropin as dropin
from nodemedic.actions.sighup_reload import ACTION_ERRORS, ConfigReload, answers, restart_unit
from nodemedic.core.sighup_guard import (
    ApplyReload,
    EnterCoalesce,
    Freeze,
    LeaveCoalesce,
    MainProcessStarted,
    ReadConfig,
    RestartForDropin,
    SaveApplied,
    SighupGuard,
    ThawAll,
    ThawDue,
    digest,
)
from nodemedic.policy.model import Mode
from nodemedic.policy.sighup import SighupSettings
from nodemedic.ports import Freezing, SystemdManager
from nodemedic.report import RecordKind

if TYPE_CHECKING:
    from nodemedic.executor import Executor

log = logging.getLogger(__name__)

FREEZE_GRACE = 5.0  # at stop, how long a freeze under way may take to finish before all is thawed
NEW_PID_WAIT = 15.0  # at start-up, how long D-Bus may take to name containerd's main process

Job = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class GuardParts:
    """What the guard's actions touch beyond the executor's context."""

    systemd: SystemdManager
    freezer: Freezing
    config: Path  # containerd's config.toml ([daemon.config_backup].path)
    state_file: Path  # sighup.json
    probe_socket: str
    probe_timeout: float
    dropin_root: Path = Path("/")
    proc: Path = Path("/proc")


def register(
    ex: Executor, settings: SighupSettings, daemon_mode: Mode, parts: GuardParts
) -> SighupInterventions:
    """The guard's core and its handlers, added to ``ex``; returns what app.py runs (``run``) and
    the daemon reloads (``replace``)."""
    core = SighupGuard(settings, daemon_mode, ex.view, str(parts.config))
    guard = SighupInterventions(ex, core, parts)
    ex.handlers.update(guard.handlers())
    ex.add_core(core)
    ex.run(core.begin(ex.now()))  # queued: done once ``run`` runs
    return guard


class SighupInterventions:
    """Runs the SIGHUP guard's effects for the executor (see the module's docstring)."""

    def __init__(self, ex: Executor, core: SighupGuard, parts: GuardParts) -> None:
        self.ex, self.core, self.parts = ex, core, parts
        self.reload = ConfigReload(parts.config, parts.state_file, parts.proc, ex.ctx.good_configs)
        parts.freezer.deny = list(core.settings.throttle.deny)
        self._jobs: asyncio.Queue[Job] = asyncio.Queue()
        self._new_pid = asyncio.Event()  # set at each new main process of containerd
        self._to_freeze: dict[str, str] = {}  # cgroup -> sender: over budget, to be judged
        self._refused: set[str] = set()  # cgroups whose refusal was said
        self._inflight: asyncio.Future[None] | None = None  # the freeze under way, if any
        self._restart_began = 0.0  # monotonic: when the last restart of ours began

    @property
    def settings(self) -> SighupSettings:
        return self.core.settings

    def handlers(self) -> dict[type[Any], Callable[[Any], None]]:
        later = self._queue
        return {
            EnterCoalesce: lambda _e: later(self._enter),
            LeaveCoalesce: lambda e: later(partial(self._leave, e)),
            ApplyReload: lambda _e: later(self._reload),
            RestartForDropin: lambda _e: later(self._restart_for_dropin),
            Freeze: self._freeze_wanted,
            ThawDue: lambda _e: later(self._thaw_due),
            ThawAll: lambda e: later(partial(self._thaw_all, e.why)),
            MainProcessStarted: self._main_process,
            ReadConfig: self._read_config,
            SaveApplied: lambda e: self.reload.save(e.pid, e.applied),
        }

    def replace(self, settings: SighupSettings, daemon_mode: Mode) -> None:
        """A reloaded policy (see ``SighupGuard.replace``): the new deny list at once."""
        self.parts.freezer.deny = list(settings.throttle.deny)
        self.ex.run(self.core.replace(settings, daemon_mode, self.ex.now()))

    # ---- the loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        """The guard's jobs, one at a time, until cancelled; then everything frozen is thawed."""
        try:
            while True:
                job = await self._jobs.get()
                try:
                    await job()
                except Exception as exc:  # recorded; the guard goes on with its next job
                    log.exception("SIGHUP guard turn failed")
                    self._say(
                        RecordKind.ERROR,
                        f"SIGHUP guard: internal error: {exc!r}",
                        OUTCOME="failed",
                        DETAIL=repr(exc),
                    )
                finally:
                    self._jobs.task_done()
        finally:
            await self._thaw_at_exit()

    async def idle(self) -> None:
        """Until every job queued so far (and those they queued) is done: for tests."""
        await self._jobs.join()

    def _queue(self, job: Job) -> None:
        self._jobs.put_nowait(job)

    async def _thaw_at_exit(self) -> None:
        # whatever the mode now, nothing nodemedic froze stays frozen (ExecStopPost does it too);
        # a freeze still under way is let finish first, or it could freeze after the thaw
        inflight = self._inflight
        if inflight is not None and not inflight.done():
            with contextlib.suppress(Exception):
                await asyncio.wait({inflight}, timeout=FREEZE_GRACE)
        with contextlib.suppress(OSError):
            self._thawed(self.parts.freezer.thaw_all(), "nodemedic is stopping")

    def _say(self, kind: RecordKind, message: str, **fields: object) -> None:
        self.ex.run([self.core.record(kind, message, **fields)])

    # ---- what containerd runs -------------------------------------------------------------------

    def _main_process(self, effect: MainProcessStarted) -> None:
        self._new_pid.set()
        if effect.ours:
            return  # our restart says what it applied
        content = self.reload.read()
        saved = self.reload.saved_for(effect.pid) if effect.first else None
        self.ex.run(self.core.config_running(effect.pid, content, saved, self.ex.now()))

    def _read_config(self, _effect: ReadConfig) -> None:
        self.ex.run(self.core.config_read(self.reload.read(), self.ex.now()))

    # ---- entering and leaving coalesce ----------------------------------------------------------

    async def _enter(self) -> None:
        unit, persistent, root = self.core.unit, self.settings.coalesce.persistent, self.parts.dropin_root
        if not await asyncio.to_thread(dropin.env_ignores_signals):
            self._say(
                RecordKind.ERROR,
                "[sighup] mode coalesce needs `env --ignore-signal` (coreutils "
                ">= 8.31), which this node lacks: SIGHUPs are only observed",
                UNIT=unit,
                OUTCOME="refused",
                ACTION="sighup-dropin",
            )
            return
        path = dropin.dropin_path(unit, persistent, root)
        try:
            text = await dropin.dropin_text(self.parts.systemd, unit)
        except ACTION_ERRORS as exc:
            self._say(
                RecordKind.ERROR,
                f"cannot read {unit}'s ExecStart to write the drop-in: {exc}",
                UNIT=unit,
                OUTCOME="failed",
                ACTION="sighup-dropin",
            )
            return
        if self.core.daemon_mode == "observe":
            if not path.exists():
                self._say(
                    RecordKind.DECIDED,
                    f"would install {path} so that {unit} starts with SIGHUP "
                    "ignored, and apply config changes itself",
                    UNIT=unit,
                    PATH=str(path),
                    MODE="observe",
                    OUTCOME="would-do",
                    ACTION="sighup-dropin",
                )
            self.ex.run(self.core.coalesce_entered())
            return
        if not self.ex.closing and await self._install(path, text):
            self.ex.run(self.core.coalesce_entered())

    async def _install(self, path: Path, text: str) -> bool:
        unit = self.core.unit
        async with self.ex.lock:
            try:
                installed = await asyncio.to_thread(
                    dropin.install_for, unit, self.settings.coalesce.persistent, text, self.parts.dropin_root
                )
            except ACTION_ERRORS as exc:
                self._say(
                    RecordKind.ERROR,
                    f"cannot install {path}: {exc}",
                    UNIT=unit,
                    PATH=str(path),
                    OUTCOME="failed",
                    ACTION="sighup-dropin",
                )
                return False
            if installed:
                await self._daemon_reload()
        if installed:
            self._say(
                RecordKind.ACTION,
                f"installed {path}: {unit} starts with SIGHUP ignored; "
                "nodemedic applies config.toml changes itself",
                UNIT=unit,
                PATH=str(path),
                OUTCOME="dropin-installed",
                ACTION="sighup-dropin",
            )
        return True

    async def _leave(self, effect: LeaveCoalesce) -> None:
        """Stock behaviour again: the drop-in goes; changes are still applied while the running
        containerd ignores SIGHUP (until its next start)."""
        unit = self.core.unit
        async with self.ex.lock:
            try:
                removed = await asyncio.to_thread(dropin.remove_dropins, unit, self.parts.dropin_root)
            except ACTION_ERRORS as exc:
                self._say(
                    RecordKind.ERROR,
                    f"cannot remove {unit}'s SIGHUP drop-in: {exc}; "
                    "`nodemedic sighup-restore` removes it by hand",
                    UNIT=unit,
                    OUTCOME="failed",
                    ACTION="sighup-dropin",
                )
                return
            pid = self.ex.view.main_pid(unit)
            lingering = bool(pid) and dropin.ignores_sighup(pid, self.parts.proc)
            self.core.coalesce_left(lingering)
            if removed:
                await self._daemon_reload()
        if not removed:
            return
        until = (
            " until then it keeps ignoring SIGHUP, and nodemedic keeps applying config.toml changes"
            if lingering
            else ""
        )
        self._say(
            RecordKind.ACTION,
            f"removed {', '.join(map(str, removed))}: {unit} dies on SIGHUP "
            f"again from its next start ([sighup] mode {effect.sighup_mode});{until}",
            UNIT=unit,
            PATH=str(removed[0]),
            OUTCOME="dropin-removed",
            ACTION="sighup-dropin",
            DETAIL="was active" if effect.was_active else "left from an earlier run",
        )

    async def _daemon_reload(self) -> None:
        try:
            await self.parts.systemd.daemon_reload()
        except ACTION_ERRORS as exc:
            self._say(
                RecordKind.ERROR,
                f"systemd daemon-reload failed: {exc}",
                OUTCOME="failed",
                ACTION="sighup-dropin",
            )

    # ---- restarts of containerd -----------------------------------------------------------------

    async def _restart_for_dropin(self) -> None:
        core, unit = self.core, self.core.unit
        if not self._may_apply_dropin():
            return  # coalesce was left meanwhile, or nodemedic observes now: it restarts nothing
        pid = await self._main_pid_soon()
        if not pid:
            self._say(
                RecordKind.DAEMON,
                f"{unit} is not running: the drop-in takes effect when it starts",
                UNIT=unit,
                OUTCOME="dropin-pending",
                ACTION="sighup-dropin",
            )
            return
        if dropin.ignores_sighup(pid, self.parts.proc):
            return  # already in effect (e.g. nodemedic restarted, containerd did not)
        async with self.ex.lock:
            if not self._may_apply_dropin():
                return  # changed while the lock was waited for
            content, problem = await self.reload.loadable(core.not_read())
            if problem is not None:
                self._say(
                    RecordKind.DECIDED,
                    f"not restarting {unit} to apply the drop-in: {problem}; "
                    "the drop-in takes effect at its next start",
                    UNIT=unit,
                    DETAIL=problem,
                    OUTCOME="dropin-pending",
                    ACTION="sighup-dropin",
                )
                return
            if self._held("sighup-dropin", 0):
                return
            pid = await self._restart("apply the SIGHUP drop-in", content)
        self._dropin_verified(pid)

    def _may_apply_dropin(self) -> bool:
        return self.core.active and self.core.daemon_mode != "observe"

    def _dropin_verified(self, pid: int) -> None:
        """The verify step of applying the drop-in: the new process ignores SIGHUP."""
        unit = self.core.unit
        if pid and dropin.ignores_sighup(pid, self.parts.proc):
            self._say(
                RecordKind.OUTCOME,
                f"{unit} restarted (pid {pid}) and now ignores SIGHUP",
                UNIT=unit,
                OUTCOME="dropin-applied",
                ACTION="sighup-dropin",
                ELAPSED_MS=self._restart_ms(),
            )
        elif pid:
            self._say(
                RecordKind.ERROR,
                f"{unit} restarted (pid {pid}) but does not ignore SIGHUP: is the "
                "drop-in overridden by another one?",
                UNIT=unit,
                OUTCOME="failed",
                ACTION="sighup-dropin",
                ELAPSED_MS=self._restart_ms(),
            )

    async def _main_pid_soon(self) -> int:
        """containerd's main PID; at start-up D-Bus may not have said yet: waited for a while."""
        unit = self.core.unit
        if not self.ex.view.main_pid(unit):
            self._new_pid.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._new_pid.wait(), NEW_PID_WAIT)
        return self.ex.view.main_pid(unit)

    async def _reload(self) -> None:
        """Apply a real change with one restart. Everything is read and checked again under the
        repair lock: a repair may have changed the file, or started containerd, meanwhile."""
        core, path = self.core, self.parts.config
        async with self.ex.lock:
            content, problem = await self.reload.loadable(core.not_read())
            requests, effects = core.reload_checked(content, problem)
            self.ex.run(effects)
            if not requests or content is None or self._held("sighup-reload", requests):
                return
            await self._keep_good_copy(core.running.content if core.running else b"")
            pid = await self._restart(f"apply a new {path}", content)
            served = bool(pid) and await answers(
                self.ex.ctx.probe, self.parts.probe_socket, self.parts.probe_timeout, self.ex.ctx.clock
            )
            if served:  # it runs and serves with it: what restore-config should go back to now
                await self._keep_good_copy(content)
        if pid:
            self._say(
                RecordKind.OUTCOME,
                f"applied the new {path} with one restart of {core.unit} (pid {pid}"
                f"{'' if served else ', not answering yet'}): {requests} request(s) coalesced",
                UNIT=core.unit,
                PATH=str(path),
                SIGNALS=requests,
                DETAIL=f"sha256 {digest(content)}",
                OUTCOME="reload-applied",
                ACTION="sighup-reload",
                ELAPSED_MS=self._restart_ms(),
            )
        self.ex.run(core.reload_done(self.ex.now()))  # written again while it restarted: an interval later

    def _held(self, action: str, requests: int) -> bool:
        """Whether the global repair budget holds this restart (then the core keeps it for later)."""
        now = self.ex.now()
        reason = self.ex.budget_held(now)
        if reason is None:
            return False
        self.ex.run(self.core.held(action, reason, requests, now))
        return True

    async def _keep_good_copy(self, content: bytes) -> None:
        """Keep ``content`` as a last-known-good copy: the content that ran, before it is replaced,
        and the new one once containerd serves with it."""
        try:
            await self.reload.keep_good_copy(content)
        except OSError as exc:
            config = self.parts.config
            self._say(
                RecordKind.ERROR,
                f"could not keep a last-known-good copy of {config}: {exc}",
                PATH=str(config),
                OUTCOME="failed",
                ACTION="sighup-reload",
            )

    async def _restart(self, why: str, content: bytes | None) -> int:
        """Restart containerd (the caller holds the lock): one restart against the repair budget.
        The new main PID, 0 if none came."""
        unit, core = self.core.unit, self.core
        if self.ex.closing:
            return 0
        now = self.ex.now()
        self._restart_began = now.monotonic
        core.restart_started(now)
        self._say(
            RecordKind.ACTION,
            f"restarting {unit} to {why}",
            UNIT=unit,
            OUTCOME="started",
            ACTION="restart-unit",
        )
        self.ex.view.stopping(unit)  # the inactive state on the way is ours, no operator's stop
        try:
            pid = await self._restart_unit()
        except BaseException as exc:
            core.restart_failed()
            self.ex.spend_budget(now)
            if not isinstance(exc, ACTION_ERRORS):
                raise
            self._restart_failed(f"restarting {unit} to {why} failed: {exc}")
            return 0
        self.ex.spend_budget(now)
        if not pid:  # systemd took the job, but no new main process came within the wait
            self._restart_failed(f"restarting {unit} to {why}: no new main process came after the restart")
        self.ex.run(core.restart_finished(content))
        return pid

    def _restart_failed(self, message: str) -> None:
        fields = {"UNIT": self.core.unit, "OUTCOME": "failed", "ACTION": "restart-unit"}
        self._say(RecordKind.ERROR, message, **fields, ELAPSED_MS=self._restart_ms())

    def _restart_ms(self) -> float:
        """Milliseconds since the last restart of ours began (the metrics' repair duration)."""
        return (self.ex.ctx.clock.monotonic() - self._restart_began) * 1000.0

    def _restart_unit(self) -> Awaitable[int]:
        unit, view = self.core.unit, self.ex.view
        how = self.settings.coalesce.restart
        return restart_unit(
            self.parts.systemd, unit, how, lambda: view.main_pid(unit), self._new_pid, self.ex.ctx.clock
        )

    # ---- throttle -------------------------------------------------------------------------------

    def _freeze_wanted(self, effect: Freeze) -> None:
        """Over budget: judged at the guard's next job (once, however many SIGHUPs came meanwhile)."""
        if effect.cgroup not in self._to_freeze:
            self._queue(partial(self._judge, effect.cgroup))
        self._to_freeze[effect.cgroup] = effect.sender

    async def _judge(self, cgroup: str) -> None:
        sender = self._to_freeze.pop(cgroup, None)
        if sender is None or not self.core.throttling:
            return  # thawed or left throttle meanwhile
        t = self.settings.throttle
        refusal = await freezing.check_freeze(self.parts.freezer, cgroup)
        if refusal == freezing.ALREADY_FROZEN:
            return
        if refusal is not None:
            if cgroup not in self._refused:
                self._refused.add(cgroup)
                self._say(
                    RecordKind.DECIDED,
                    f"{sender} exceeds its SIGHUP budget but is not frozen: {refusal}",
                    CGROUP=cgroup,
                    SENDERS=sender,
                    OUTCOME="refused",
                    DETAIL=refusal,
                    ACTION="freeze-sender",
                )
            return
        if self.core.daemon_mode == "observe":
            self._say(
                RecordKind.DECIDED,
                f"would freeze {cgroup} ({sender}) for {t.cooldown:g}s: it exceeds its SIGHUP budget",
                CGROUP=cgroup,
                SENDERS=sender,
                MODE="observe",
                OUTCOME="would-do",
                ACTION="freeze-sender",
            )
            return
        if not self.ex.closing:
            await self._freeze(cgroup, sender)

    async def _freeze(self, cgroup: str, sender: str) -> None:
        t = self.settings.throttle
        async with self.ex.lock:
            until = self.ex.ctx.clock.wall() + t.cooldown
            self._inflight = freezing.start_freeze(self.parts.freezer, cgroup, until)
            try:
                await asyncio.shield(self._inflight)
            except ACTION_ERRORS as exc:
                self._say(
                    RecordKind.ERROR,
                    f"could not freeze {cgroup}: {exc}",
                    CGROUP=cgroup,
                    SENDERS=sender,
                    OUTCOME="failed",
                    ACTION="freeze-sender",
                )
                return
        self._say(
            RecordKind.ACTION,
            f"froze {cgroup} ({sender}) for {t.cooldown:g}s: it sent more SIGHUPs "
            f"than its budget ({t.burst} at once, {t.refill} per {t.per:g}s)",
            CGROUP=cgroup,
            SENDERS=sender,
            OUTCOME="frozen",
            ACTION="freeze-sender",
        )
        self.ex.run(self.core.frozen(until, self.ex.now()))

    async def _thaw_due(self) -> None:
        try:  # no lock: thawing only gives stock behaviour back, and must not wait for a repair
            thawed, next_until = await freezing.thaw_over(self.parts.freezer, self.ex.ctx.clock.wall())
        except ACTION_ERRORS as exc:  # the registry unusable, say: recorded, and tried again shortly
            self._say(
                RecordKind.ERROR, f"SIGHUP guard: internal error: {exc!r}", OUTCOME="failed", DETAIL=repr(exc)
            )
            thawed, next_until = [], self.ex.now().wall
        self._thawed(thawed, "its cool-down is over")
        self.ex.run(self.core.thaw_checked(next_until, self.ex.now()))

    async def _thaw_all(self, why: str) -> None:
        self._to_freeze.clear()
        thawed = await asyncio.to_thread(self.parts.freezer.thaw_all)  # no lock, as for _thaw_due
        self._thawed(thawed, why)

    def _thawed(self, cgroups: list[str], why: str) -> None:
        for cgroup in cgroups:
            self._say(
                RecordKind.ACTION,
                f"thawed {cgroup}: {why}",
                CGROUP=cgroup,
                OUTCOME="thawed",
                ACTION="freeze-sender",
            )
