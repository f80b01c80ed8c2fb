"""The one place effects run: whatever the cores decide, this does, and only this.

The executor feeds every event to the node view and to the cores (pure: ``core/``), runs the
effects they return, and reports back how each ended. It owns what makes acting safe: the one
lock every change to the node holds (a repair, a SIGHUP guard restart, a freeze), observe mode
(only a check, then "would ..."), the global repair budget as a gate for every restart of
containerd, compensation, the record of a repair under way, and the journald records.

Handlers are picked by the effect's type from ``handlers``: the rules' repairs run in
``executor/repairs.py``, the SIGHUP guard's interventions in ``executor/interventions.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Protocol

from nodemedic.actions.base import ActionContext
from nodemedic.core.budget import RepairBudget
from nodemedic.core.effects import (
    Effect,
    Effects,
    Instant,
    Later,
    LookAgain,
    Repair,
    Report,
    SaveState,
    Settle,
)
from nodemedic.core.nodeview import NodeView
from nodemedic.core.rules import RuleCore, RuleState
from nodemedic.events import Event, PathChanged
from nodemedic.executor.repairs import Repairs
from nodemedic.fs import path_kind
from nodemedic.policy.match import Match
from nodemedic.policy.model import PathTrigger, Policy
from nodemedic.report import Record, RecordKind, Reporter
from nodemedic.store import IntentStore, RepairIntent, StateStore

log = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, None]], object]
STATE_ERRORS = (KeyError, TypeError, ValueError, AttributeError)  # state.json content not ours


class Core(Protocol):
    """A pure decision core beside the rules' (the SIGHUP guard's)."""

    def handle(self, event: Event, now: Instant) -> Effects: ...


class ChangeLock:
    """The one lock every change to the node holds, counting its releases: a repair that confirmed
    its fault before taking the lock re-confirms it if a change was made since (``generation``
    moved), so a verdict taken while another repair ran is never acted on stale."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self.generation = 0  # bumped each time a change's hold of the lock ends

    def locked(self) -> bool:
        return self._lock.locked()

    async def __aenter__(self) -> None:
        await self._lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.generation += 1
        self._lock.release()


class Executor:
    def __init__(
        self,
        policy: Policy,
        ctx: ActionContext,
        report: Reporter,
        spawn: Spawn,
        store: StateStore | None = None,
        intents: IntentStore | None = None,
    ) -> None:
        self.ctx = ctx
        self.reporter = report
        self.listeners: list[Callable[[Record], None]] = []  # see every record (status, the D-Bus API)
        self._spawn = spawn
        self._store = store
        self.view = NodeView()
        self.rules = RuleCore(policy, self.view)
        self.lock = ChangeLock()  # repairs never overlap (two rules, one containerd)
        self.cores: list[Core] = []
        self.handlers: dict[type[Any], Callable[[Any], None]] = {
            Report: self._report,
            Later: self._later,
            Settle: self._later,
            SaveState: self._save,
            Repair: self._repair,
            LookAgain: self._look_again,
        }
        # Before anything can start a repair: a reset taken at start-up may act at once.
        self.repairs = Repairs(self, intents)
        self._restore()
        self.take_resets()

    # ---- what the rest of nodemedic reads -------------------------------------------------------

    @property
    def policy(self) -> Policy:
        return self.rules.policy

    @property
    def states(self) -> dict[str, RuleState]:
        return self.rules.states

    @property
    def budget(self) -> RepairBudget:
        return self.rules.budget

    @property
    def closing(self) -> bool:
        """Set at shutdown: no new repair starts."""
        return self.rules.closing

    @closing.setter
    def closing(self, value: bool) -> None:
        self.rules.closing = value

    @property
    def stopped_by_others(self) -> set[str]:
        return self.view.stopped_by_others

    @property
    def unfinished(self) -> RepairIntent | None:
        """The repair a previous run was cut off in, until ``recover`` takes it."""
        return self.repairs.unfinished

    @unfinished.setter
    def unfinished(self, intent: RepairIntent | None) -> None:
        self.repairs.unfinished = intent

    def report(self, kind: RecordKind, message: str, **fields: object) -> Record:
        """Write one journald record, and tell every listener: every decision and effect of
        nodemedic is written through here."""
        record = self.reporter(kind, message, **fields)
        for listen in self.listeners:
            try:
                listen(record)
            except Exception:  # a listener's bug must not stop a repair's records
                log.exception("record listener %r failed", listen)
        return record

    def now(self) -> Instant:
        return Instant(self.ctx.clock.monotonic(), self.ctx.clock.wall())

    # ---- events in, effects out -----------------------------------------------------------------

    def add_core(self, core: Core) -> None:
        self.cores.append(core)

    def handle(self, event: Event) -> None:
        """Every event: the node view first, then the rules, then every other core. An exception
        in one core is recorded and never keeps the event from the others."""
        self.view.see(event)
        now = self.now()
        for core in [self.rules, *self.cores]:
            try:
                effects = core.handle(event, now)
            except Exception as exc:
                self._core_failed(f"{type(core).__name__} on {type(event).__name__}", exc)
                continue
            self.run(effects)  # a failing handler is recorded there: the next core still sees the event

    def _core_failed(self, what: str, exc: Exception) -> None:
        log.debug("%s failed", what, exc_info=exc)
        message = f"internal error in {what} (a nodemedic bug): {exc!r}"
        self.report(RecordKind.ERROR, message, OUTCOME="internal-error", DETAIL=repr(exc))

    def run(self, effects: Iterable[Effect]) -> None:
        """Each effect by its handler; one that raises is recorded (a nodemedic bug) and the
        others still run."""
        for effect in effects:
            try:
                self.handlers[type(effect)](effect)
            except Exception as exc:
                self._core_failed(f"the {type(effect).__name__} handler", exc)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._spawn(coro)

    def replace_policy(self, policy: Policy) -> None:
        self.rules.replace_policy(policy)

    def recover(self) -> None:
        """At start-up, before any source runs: finish the repair a previous run was cut off in."""
        self.repairs.recover()

    # ---- the repair budget, for every restart of containerd -------------------------------------

    def budget_held(self, now: Instant) -> str | None:
        """Why the global repair budget forbids restarting containerd now; None if it allows it."""
        return self.rules.budget_held(now)

    def spend_budget(self, now: Instant) -> None:
        self.run(self.rules.spend_budget(now))

    # ---- the effects ----------------------------------------------------------------------------

    def _report(self, effect: Report) -> None:
        self.report(effect.kind, effect.message, **effect.fields)

    def _later(self, effect: Later) -> None:
        def fire() -> None:
            try:
                effects = effect.then(self.now())
            except Exception as exc:  # a bug in a timer's decision must not stop the loop
                self._core_failed(effect.what or "a timer", exc)
                return
            self.run(effects)

        self.ctx.clock.call_later(max(0.0, effect.delay), fire)

    def _repair(self, effect: Repair) -> None:
        self._spawn(self.repairs.run(effect))

    def _look_again(self, effect: LookAgain) -> None:
        """After a reset, a fault that is still there is acted on now, not at its next event."""
        rule = effect.rule
        for trig in (t for t in rule.trigger if isinstance(t, PathTrigger)):
            for path in trig.paths:
                if path_kind(path) == trig.kind:
                    event = PathChanged(path, trig.kind, at=self.ctx.clock.monotonic(), source="reset")
                    match = Match(rule, event, f"after reset: {path} is a {trig.kind.value}")
                    self.run(self.rules.decide(match, self.now(), retry=True))
                    return

    # ---- state.json -----------------------------------------------------------------------------

    def take_resets(self) -> None:
        """Close the breakers an operator asked to reset (`nodemedic reset RULE`)."""
        if self._store is None:
            return
        self.run(self.rules.reset(self._store.take_resets()))

    def _restore(self) -> None:
        if self._store is None:
            return
        try:
            self.rules.restore(self._store.load())
        except STATE_ERRORS as exc:
            self._store.set_aside(f"unexpected content: {exc!r}")
            self.rules.fresh()
        if self._store.corrupt:
            message = f"state file unusable, moved to {self._store.corrupt}; starting with closed breakers"
            self.report(RecordKind.ERROR, message, OUTCOME="state-reset", PATH=self._store.corrupt)

    def _save(self, effect: SaveState) -> None:
        if self._store is None:
            return
        try:
            self._store.save(dict(effect.data))
        except OSError as exc:
            self.report(RecordKind.ERROR, f"cannot save state: {exc}", OUTCOME="failed", DETAIL=str(exc))
