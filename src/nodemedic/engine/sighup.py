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
import logging
import uuid

from nodemedic.core.storm import Storm, StormDetector, Verdict
from nodemedic.engine.coalesce import Coalescer
from nodemedic.engine.sighup_context import GuardContext, Say
from nodemedic.engine.throttle import Throttler
from nodemedic.events import Event, FileChanged, SignalSeen, UnitChanged
from nodemedic.policy.model import Mode
from nodemedic.policy.sighup import SighupSettings
from nodemedic.ports import Clock, SystemdManager
from nodemedic.report import RecordKind, Reporter

__all__ = ["GuardContext", "Say", "SighupGuard", "SystemdManager", "sender_name"]

log = logging.getLogger(__name__)

SIGHUP = 1
RULE = "sighup"  # NODEMEDIC_RULE of the guard's records
TRACE_COVERS = 10.0  # a D-Bus death this soon after a traced SIGHUP is that same signal
TICK = 1.0
FREEZE_GRACE = 5.0  # at stop, how long a freeze under way may take to finish before all is thawed
RESTART_SOURCES = ("unit", "trace", "tracefs", "proc")  # [sighup] keys read once, at start-up


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
        self._storm_incident = ""
        self._storm_restarts = 0
        self._last_traced = -1e18
        self._wake = asyncio.Event()
        self._mode_changed = True
        self.coalesce = Coalescer(settings, ctx, self._say, clock)
        self.throttle = Throttler(settings, ctx, self._say, clock)
        self._set_daemon_mode(daemon_mode)

    # ---- events ---------------------------------------------------------------------------------

    def handle(self, event: Event) -> None:
        """Observer of every event. A bug here must not stop the daemon's dispatch: it is recorded."""
        try:
            if isinstance(event, UnitChanged) and event.unit == self.settings.unit:
                if self.coalesce.unit_changed(event) and self._storm.storm is not None:
                    self._storm_restarts += 1
            elif isinstance(event, SignalSeen) and (event.unit, event.signal) == (self.settings.unit, SIGHUP):
                self._sighup(event)
            elif isinstance(event, FileChanged) and event.path == str(self.ctx.config):
                self.coalesce.request()
                self._wake.set()
        except Exception as exc:
            log.exception("SIGHUP guard failed on %s", event)
            self._say(RecordKind.ERROR, f"SIGHUP guard: internal error on {type(event).__name__}: {exc!r}",
                      OUTCOME="failed", DETAIL=repr(exc))  # fmt: skip

    def _sighup(self, event: SignalSeen) -> None:
        if self.settings.mode == "off":
            return
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
        if event.source == "tracefs":
            if self.settings.mode == "throttle":
                self.throttle.seen(event, sender)
            self.coalesce.request()  # a SIGHUP is a reload request, applied only if the file changed
        self._wake.set()

    def _storm_began(self, storm: Storm) -> None:
        self._storm_restarts = 0
        self._storm_incident = uuid.uuid4().hex[:12]
        window = self.settings.storm.window
        self._say(RecordKind.DETECTED, f"SIGHUP storm against {self.settings.unit}: {storm.signals} SIGHUPs "
                  f"within {window:g}s from {storm.describe_senders()}; [sighup] mode {self.settings.mode}",
                  UNIT=self.settings.unit, SIGNALS=storm.signals, SENDERS=storm.describe_senders(),
                  WINDOW=window, OUTCOME="storm")  # fmt: skip

    def _storm_ended(self, storm: Storm) -> None:
        lasted = storm.last - storm.began
        self._say(RecordKind.DETECTED, f"SIGHUP storm against {self.settings.unit} ended: {storm.signals} "
                  f"SIGHUPs over {lasted:.0f}s from {storm.describe_senders()}; {self.settings.unit} "
                  f"restarted {self._storm_restarts} time(s) meanwhile", UNIT=self.settings.unit,
                  SIGNALS=storm.signals, SENDERS=storm.describe_senders(), WINDOW=lasted,
                  OUTCOME="storm-ended", INCIDENT=self._storm_incident,
                  DETAIL=f"restarts={self._storm_restarts}")  # fmt: skip

    # ---- the loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self.step()
                except Exception as exc:  # recorded; the guard goes on at its next turn
                    log.exception("SIGHUP guard turn failed")
                    self._say(RecordKind.ERROR, f"SIGHUP guard: internal error: {exc!r}", OUTCOME="failed",
                              DETAIL=repr(exc))  # fmt: skip
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._next_wait())
                self._wake.clear()
        finally:
            # whatever the mode now, nothing nodemedic froze stays frozen (ExecStopPost does it too);
            # a freeze still under way is let finish first, or it could freeze after the thaw
            inflight = self.throttle.inflight
            if inflight is not None and not inflight.done():
                with contextlib.suppress(Exception):
                    await asyncio.wait({inflight}, timeout=FREEZE_GRACE)
            with contextlib.suppress(OSError):
                self.throttle.thawed(self.ctx.freezer.thaw_all(), "nodemedic is stopping")

    async def step(self) -> None:
        """One turn: enter a new mode, end a storm, freeze and thaw, apply what is due."""
        if self._mode_changed:
            self._mode_changed = False
            await self._enter_mode()
        ended = self._storm.ended(self._clock.monotonic())
        if ended is not None:
            self._storm_ended(ended)
        if self.settings.mode == "throttle":
            await self.throttle.tick()
        await self.coalesce.tick()

    def replace(self, settings: SighupSettings, daemon_mode: Mode) -> None:
        """A reloaded policy: a new mode is entered (and the old one's effects undone) at once. The
        keys that choose the sources (unit, trace, tracefs, proc) wait for a restart, as the daemon
        says when it reloads."""
        old, old_daemon = self.settings, self.daemon_mode
        settings = settings.model_copy(update={k: getattr(old, k) for k in RESTART_SOURCES})
        self.settings = self.coalesce.settings = settings
        self._storm.threshold, self._storm.window = settings.storm.signals, settings.storm.window
        self.throttle.configure(settings)
        self._set_daemon_mode(daemon_mode)
        if old.mode != settings.mode or old.coalesce != settings.coalesce or old_daemon != daemon_mode:
            self._mode_changed = True
            self._wake.set()

    def _set_daemon_mode(self, mode: Mode) -> None:
        self.daemon_mode = self.coalesce.daemon_mode = self.throttle.daemon_mode = mode

    def _next_wait(self) -> float:
        due = self.coalesce.next_due()
        if due is not None:
            return max(0.0, min(TICK, due - self._clock.monotonic()))
        return TICK

    async def _enter_mode(self) -> None:
        mode = self.settings.mode
        if mode != "throttle":
            await self.throttle.thaw_all(f"[sighup] mode is {mode}")
        if mode == "coalesce":
            await self.coalesce.enter()
        else:
            await self.coalesce.leave()

    def _say(self, kind: RecordKind, message: str, **fields: object) -> None:
        """Every record of the guard carries NODEMEDIC_RULE=sighup (`journalctl NODEMEDIC_RULE=sighup`),
        the mode, and an incident id: the storm's while one lasts, so its records go together."""
        incident = self._storm_incident if self._storm.storm is not None else uuid.uuid4().hex[:12]
        fields.setdefault("MODE", self.daemon_mode)
        fields.setdefault("INCIDENT", incident)
        self._report(kind, message, RULE=RULE, **fields)
