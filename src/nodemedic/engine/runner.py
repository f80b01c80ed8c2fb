"""Applies the policy to events: match, confirm against the real state, then act, reporting each step.

One incident reported by several sources (inotify, D-Bus, journald) leads to one repair: while a
rule's repair runs, further matches are coalesced, and afterwards the rule's ``confirm`` condition,
checked against the real state, no longer holds, so stale events lead to nothing. In observe mode an
incident is reported once, and again only after its condition has cleared.

Before acting in enforce mode the rule must be allowed by its backoff (after a failure), its circuit
breaker (after repeated failures: then a human is needed) and the global repair budget. A rule held
by its breaker or the budget keeps observing: it reports what it would do, once per incident.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodemedic.actions.base import ActionContext, Skip, Step
from nodemedic.actions.registry import build_action
from nodemedic.actions.shims import KillOrphanedShims, ReportedOrphans
from nodemedic.actions.socket_dir import finish_quarantines
from nodemedic.backoff import Backoff
from nodemedic.configs import config_problem
from nodemedic.core.breaker import HALF_OPEN, OPEN, CircuitBreaker
from nodemedic.core.budget import RepairBudget
from nodemedic.errors import NodemedicError, ProbeError
from nodemedic.events import (
    Event,
    FdUsage,
    FileChanged,
    GrpcStreamsSetting,
    JournalLine,
    OomKills,
    PathChanged,
    PressureSeen,
    ProbeAnswered,
    SocketModeSeen,
    UnitChanged,
    VersionSeen,
)
from nodemedic.policy.actions import KillOrphanedShimsParams, RemoveSocketDirParams
from nodemedic.policy.match import Match, in_states, match, match_trigger
from nodemedic.policy.model import (
    RESOURCE_TRIGGERS,
    Confirm,
    FdTrigger,
    GrpcStreamsTrigger,
    Mode,
    OomTrigger,
    PathTrigger,
    Policy,
    PressureTrigger,
    ResourceTriggerType,
    Rule,
    SocketModeTrigger,
    VersionTrigger,
)
from nodemedic.report import RecordKind, Reporter
from nodemedic.sources.inotify import path_kind
from nodemedic.store import IntentStore, RepairIntent, StateStore

log = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, None]], object]
COMPENSATE_TIMEOUT = 30.0
MAX_RESUMES = 2  # a repair cut off this often by nodemedic's own end is only undone at the next start
UNIT_STEPS = ("stop-unit", "start-unit", "restart-unit", "raise-nofile-limit")  # leave a unit down if cut off
MAX_PENDING = 16
# A unit down in one of these load states is no operator's stop: systemd will not start it.
UNIT_REFUSED = {
    "masked": "systemd refuses to start a masked unit (systemctl unmask it first)",
    "not-found": "no such unit file is installed (install it, or fix the unit's name in the policy)",
}
# The retry timer runs on the loop's monotonic clock, readiness is judged on the wall clock: a
# small margin keeps a retry from landing a hair early and deferring itself for good.
RETRY_MARGIN = 0.1


@dataclass(slots=True)
class RuleState:
    backoff: Backoff
    breaker: CircuitBreaker
    running: bool = False
    observed: bool = False  # an observe-mode incident is open (already reported)
    deferred_reported: bool = False
    held_reported: bool = False
    respected_stop: bool = False
    # matches that came while a repair ran, one per distinct trigger, decided again afterwards
    pending: dict[str, Match] = field(default_factory=dict)

    def configure(self, rule: Rule) -> None:
        """Take the rule's (possibly reloaded) settings, keeping the counters."""
        b, k = rule.backoff, rule.breaker
        self.backoff.initial, self.backoff.factor, self.backoff.maximum = b.initial, b.factor, b.max
        self.backoff.jitter = b.jitter
        self.breaker.failures, self.breaker.window, self.breaker.cooldown = k.failures, k.window, k.cooldown


def _new_state(rule: Rule) -> RuleState:
    state = RuleState(Backoff(rule.backoff.initial), CircuitBreaker(1, 0.0, 0.0))
    state.configure(rule)
    return state


class Runner:
    def __init__(self, policy: Policy, ctx: ActionContext, report: Reporter, spawn: Spawn,
                 store: StateStore | None = None, intents: IntentStore | None = None) -> None:  # fmt: skip
        self.ctx = ctx
        self.report = report
        self._spawn = spawn
        self._store = store
        self.policy = policy
        self.states: dict[str, RuleState] = {}
        self.budget = RepairBudget(policy.daemon.budget.repairs, policy.daemon.budget.window)
        self.stopped_by_us: set[str] = set()  # units a repair stopped (not yet running again)
        self.stopped_by_others: set[str] = set()  # units an operator stopped
        self.unit_states: dict[str, UnitChanged] = {}  # the last state D-Bus reported, per unit
        self._waiting: dict[str, Match] = {}  # rule -> match held until its unit's state is known
        self._one_at_a_time = asyncio.Lock()  # repairs never overlap (two rules, one containerd)
        self.closing = False  # set at shutdown: no new repair starts
        self._fired: dict[str, list[float]] = {}  # when each rule's triggers fired (monotonic)
        self._compensating: set[asyncio.Future[None]] = set()  # starts that outlive a cancelled repair
        self._reported_orphans = ReportedOrphans()  # confirm.orphaned_shims: one incident per process
        self.replace_policy(policy)
        self._restore()
        self.take_resets()
        self._intents = intents
        self._intent_failing = False  # a failed save of the repair record is said once
        self._began: dict[str, float] = {}  # incident -> wall clock of its first recorded step
        self._resumes = 0  # of the repair under way, when a start-up resumed it
        self.unfinished = self._load_intent()

    def exclusive(self) -> asyncio.Lock:
        """The lock every repair holds: whoever else restarts containerd (the SIGHUP guard) takes it too."""
        return self._one_at_a_time

    def replace_policy(self, policy: Policy) -> None:
        """Apply a (re)loaded policy; state of rules that stay, and repairs under way, are kept."""
        self.policy = policy
        self.budget.repairs, self.budget.window = policy.daemon.budget.repairs, policy.daemon.budget.window
        states = {}
        for rule in policy.rule:
            states[rule.name] = self.states.get(rule.name) or _new_state(rule)
            states[rule.name].configure(rule)
        self.states = states

    def handle(self, event: Event) -> None:
        if isinstance(event, UnitChanged):
            self.unit_states[event.unit] = event
            self._track_stops(event)
            for name, held in list(self._waiting.items()):
                if held.rule.confirm is not None and held.rule.confirm.unit == event.unit:
                    del self._waiting[name]
                    self._decide(held)
        self._close_cleared(event)
        for m in match(self.policy.rule, event):
            self._decide(m)

    def _track_stops(self, event: UnitChanged) -> None:
        """With Restart=, only a stop job leaves a unit inactive: if no repair of ours stopped it,
        someone else did (an operator's systemctl stop), and it is theirs until it runs again."""
        if event.active_state == "inactive":
            if event.unit not in self.stopped_by_us:
                self.stopped_by_others.add(event.unit)
        elif event.active_state in ("active", "activating", "reloading"):
            self.stopped_by_us.discard(event.unit)
            self.stopped_by_others.discard(event.unit)

    def _close_cleared(self, event: Event) -> None:
        """An observed incident ends when its condition no longer holds, whatever event says so."""
        for rule in self.policy.rule:
            state = self.states[rule.name]
            if state.observed and _cleared(rule, event):
                state.observed = False

    def _decide(self, m: Match, retry: bool = False) -> None:
        rule, state = m.rule, self.states[m.rule.name]
        if self.closing:
            return
        if state.running:
            # The same incident seen again is dropped later by the confirm check; a different one
            # (another PID named by systemd, say) must not be lost.
            if len(state.pending) < MAX_PENDING:
                state.pending.setdefault(m.trigger, m)
            return
        if not self._conditions_met(rule, count=not retry):
            return
        if rule.confirm is not None and not _holds(rule.confirm):
            log.debug("rule %s: condition no longer holds (%s)", rule.name, m.trigger)
            return
        if rule.confirm is not None and rule.confirm.unit and rule.confirm.unit not in self.unit_states:
            # At start-up D-Bus may not have said yet whether an operator stopped the unit: wait.
            self._waiting[rule.name] = m
            return
        if rule.confirm is not None and rule.confirm.unit in self.stopped_by_others | self._unstartable():
            self._respect_stop(rule, state, rule.confirm.unit)
            return
        state.respected_stop = False
        mode = self.policy.mode_of(rule)
        now = self.ctx.clock.wall()
        if mode == "enforce":
            reopens = state.breaker.reopens_at()
            mode = self._held(rule, state, now) or mode
            if state.breaker.state == OPEN and state.breaker.reopens_at() != reopens:
                # The wall clock was set back and the cool-down re-anchored to now: the retry armed
                # for its old end comes too early, so look again when the new one ends.
                self._retry_later(m, state.breaker.reopens_at() - now + RETRY_MARGIN)
        if mode == "enforce" and not state.backoff.ready(now):
            self._defer(m, state, now)
            return
        if (mode == "observe" or not rule.action) and state.observed:
            return  # observed, or a report-only rule: once per incident
        state.running = True
        self._fired.pop(rule.name, None)
        self._spawn(self._run(m, mode, state, retry))

    def _conditions_met(self, rule: Rule, count: bool) -> bool:
        """``[rule.when]``: enough firings within the window, and the unit in the wanted state."""
        when = rule.when
        if count:
            now = self.ctx.clock.monotonic()
            fired = [t for t in self._fired.get(rule.name, []) if t > now - when.within] + [now]
            self._fired[rule.name] = fired
            if len(fired) < when.occurrences:
                log.debug("rule %s: %d of %d firings", rule.name, len(fired), when.occurrences)
                return False
        if when.unit is None:
            return True
        seen = self.unit_states.get(when.unit)
        return seen is not None and in_states(seen, when.active_state, when.sub_state)

    def _unstartable(self) -> set[str]:
        """Units systemd will not start (masked, no unit file), running or not: a repair that stops
        one could not start it again, so no rule whose confirm names one acts."""
        return {unit for unit, seen in self.unit_states.items() if seen.load_state in UNIT_REFUSED}

    def _respect_stop(self, rule: Rule, state: RuleState, unit: str) -> None:
        seen = self.unit_states.get(unit)
        if not state.respected_stop and seen is not None and seen.load_state in UNIT_REFUSED:
            state.respected_stop = True  # masked or not installed: no stop of anyone's, a refusal
            self.report(RecordKind.DECIDED, f"{rule.name}: {unit} is {seen.load_state}: "
                        f"{UNIT_REFUSED[seen.load_state]}; nodemedic does not start it, not acting",
                        RULE=rule.name, UNIT=unit, OUTCOME="refused", DETAIL=seen.load_state)  # fmt: skip
        if not state.respected_stop:
            state.respected_stop = True
            self.report(RecordKind.DECIDED,
                        f"{rule.name}: {unit} was stopped by someone else (systemctl stop); "
                        "not acting until it is started again",
                        RULE=rule.name, UNIT=unit, OUTCOME="operator-stop")  # fmt: skip

    def _defer(self, m: Match, state: RuleState, now: float) -> None:
        """Within the backoff after a failure: say so once, and look again when it has passed."""
        if state.deferred_reported:
            return
        state.deferred_reported = True
        wait = state.backoff.remaining(now)
        self.report(RecordKind.DECIDED,
                    f"{m.rule.name}: backing off {wait:.0f}s after {state.backoff.failures} failed repair(s)",
                    RULE=m.rule.name, MODE="enforce", OUTCOME="deferred", TRIGGER=m.trigger)  # fmt: skip
        self._retry_later(m, wait + RETRY_MARGIN)

    def _held(self, rule: Rule, state: RuleState, now: float) -> Mode | None:
        """'observe' when the breaker or the budget forbids acting (said once), else None."""
        was = state.breaker.state
        if not state.breaker.allow(now):
            why = (f"circuit breaker open since {_when(state.breaker.opened_at)} after repeated failed "
                   f"repairs; observing only until {_when(state.breaker.reopens_at())} or "
                   f"`nodemedic reset {rule.name}`")  # fmt: skip
        elif not self.budget.allow(now):
            why = (f"global repair budget spent ({self.budget.repairs} repairs within "
                   f"{self.budget.window:g}s); observing only")  # fmt: skip
        else:
            if was == OPEN and state.breaker.state == HALF_OPEN:
                self.report(RecordKind.DECIDED, f"{rule.name}: breaker half-open: one trial repair",
                            RULE=rule.name, MODE="enforce", OUTCOME="trial")  # fmt: skip
            state.held_reported = False
            return None
        if not state.held_reported:
            state.held_reported = True
            self.report(RecordKind.DECIDED, f"{rule.name}: {why}", RULE=rule.name, MODE="observe",
                        OUTCOME="held", DETAIL=why)  # fmt: skip
        return "observe"

    async def _run(self, m: Match, mode: str, state: RuleState, retry: bool = False) -> None:
        try:
            confirmed = await self._confirmed_now(m, mode)
        except (NodemedicError, OSError) as exc:  # no verdict (a config check killed): do nothing
            why = f"{m.rule.name}: cannot tell whether the fault is there: {exc}; not acting"
            self.report(
                RecordKind.ERROR, why, RULE=m.rule.name, MODE=mode, OUTCOME="unchecked", DETAIL=str(exc)
            )
            confirmed = False
        except Exception as exc:  # e.g. a config check that fails on crafted content
            self._internal_error(m.rule, exc, {"RULE": m.rule.name, "MODE": mode}, "confirm")
            confirmed = False
        try:
            if confirmed:
                await self._handle_incident(m, mode, state, retry)
        finally:  # whatever happened, the rule may decide again
            state.running = False
        pending, state.pending = list(state.pending.values()), {}
        for again in pending:
            self._decide(again, retry=True)

    async def _confirmed_now(self, m: Match, mode: str) -> bool:
        """The parts of ``confirm`` that need asking: does containerd answer, does its config load,
        does the line name a shim proven orphaned?"""
        rule, confirm = m.rule, m.rule.confirm
        if confirm is None:
            return True
        if confirm.orphaned_shims and not self._new_orphans(m, mode):
            log.debug("rule %s: no new proven orphan named (%s); nothing to do", rule.name, m.trigger)
            return False
        return await self._node_confirms(rule, confirm)

    async def _node_confirms(self, rule: Rule, confirm: Confirm) -> bool:
        """What ``confirm`` asks of the node itself: does its config load, does containerd answer?
        Raises what gives no verdict (a config check killed)."""
        if confirm.config_broken and await config_problem(Path(confirm.config_broken)) is None:
            log.debug("rule %s: %s loads; nothing to do", rule.name, confirm.config_broken)
            return False
        if confirm.probe:
            probe = self.policy.daemon.probe
            try:
                await self.ctx.probe.version(probe.socket, probe.timeout)
            except ProbeError:
                return True
            log.debug("rule %s: containerd answers; nothing to do", rule.name)
            return False
        return True

    def _new_orphans(self, m: Match, mode: str) -> list[int]:
        """The proven orphans the triggering line names that make an incident: in enforce mode every
        one (one still there after its incident is a failed kill: acting again is the retry); when
        nothing would be killed, only those not reported yet as that process."""
        if not isinstance(m.event, JournalLine):
            return []
        kills = [a for a in m.rule.action if isinstance(a, KillOrphanedShimsParams)]
        proof = KillOrphanedShims(kills[0] if kills else KillOrphanedShimsParams(do="kill-orphaned-shims"))
        orphans = proof.proven_orphans(m.event.message)
        if mode == "enforce" and kills:
            return orphans
        return self._reported_orphans.first_seen(orphans, proof.params.proc)

    async def _handle_incident(self, m: Match, mode: str, state: RuleState, retry: bool) -> None:
        rule = m.rule
        incident = uuid.uuid4().hex[:12]
        now = self.ctx.clock.monotonic()
        started = now if retry else _event_time(m.event, now)  # a retry is timed from itself
        common = {"RULE": rule.name, "MODE": mode, "INCIDENT": incident}
        self.report(RecordKind.DETECTED, f"{rule.name}: {m.trigger}", **common,
                    SOURCE=m.event.source, TRIGGER=m.trigger, PATH=_event_path(m.event),
                    UNIT=_event_unit(m.event), DETAIL=rule.advice, ELAPSED_MS=self._ms(started))  # fmt: skip
        verb, decided = ("repairing", "repair") if mode == "enforce" else (
            "observe mode: reporting what would be done", "observe")  # fmt: skip
        if not rule.action:
            verb, decided = "report only: nodemedic has no safe repair for this", "report"
        self.report(RecordKind.DECIDED, f"{rule.name}: {verb}", **common, OUTCOME=decided)
        applied: list[str] = []  # the actions that changed something
        try:
            if mode == "enforce":
                waited = self._one_at_a_time.locked()
                async with self._one_at_a_time:
                    if waited and not await self._still_there(rule):
                        self.report(RecordKind.OUTCOME, f"{rule.name}: gone once the repair before it had "
                                    "finished; nothing to do, nothing changed", **common,
                                    OUTCOME="nothing-to-do", ELAPSED_MS=self._ms(started))  # fmt: skip
                        return
                    failure = await self._actions(rule, mode, common, started, m.event, applied)
            else:
                failure = await self._actions(rule, mode, common, started, m.event, applied)
        except Exception as exc:  # a bug must not kill the daemon; it is recorded
            self._internal_error(rule, exc, common, "repair", counted=bool(applied))
            if not applied:
                return
            # It had changed the node (stopped containerd, say): counted as a failed repair, so a
            # bug that the same fault trips each time cannot restart containerd in an endless loop.
            failure = f"internal error after {', '.join(applied)}: {exc!r}"
        if mode == "enforce" and failure is None and not applied and rule.action:
            self._nothing_done(m, state, common, started)
            return
        self._conclude(m, mode, state, failure, common, started)

    async def _still_there(self, rule: Rule) -> bool:
        """Asked again after waiting for another rule's repair (one fault often fires two rules: a
        directory at the socket path also fails the hang probe): that repair may have cured this one,
        and acting on the old verdict would restart a containerd that serves again."""
        if not self._conditions_met(rule, count=False):
            return False
        confirm = rule.confirm
        if confirm is None:
            return True
        if not _holds(confirm):
            return False
        try:  # the probe and the config check again (not the shims': their verdict is per line)
            return await self._node_confirms(rule, confirm)
        except (NodemedicError, OSError):  # no verdict: act as decided
            return True

    def _internal_error(
        self, rule: Rule, exc: Exception, common: dict[str, str], step: str, counted: bool = False
    ) -> None:
        """nodemedic's own fault, not the node's. Before anything changed no budget is spent and
        neither backoff nor breaker moves, so input that trips a bug in a check (a forged journal
        line, say) cannot switch repairs off; the caller counts a bug after a change (``counted``)
        as a failed repair. The units the repair stopped were started again by ``_actions``."""
        log.debug("rule %s: internal error in its %s", rule.name, step, exc_info=exc)
        how = (
            "counted as a failed repair: it had changed the node"
            if counted
            else "not counted as a failed repair"
        )
        message = f"{rule.name}: internal error in its {step} (a nodemedic bug, {how}): {exc!r}"
        self.report(RecordKind.ERROR, message, **common, OUTCOME="internal-error", DETAIL=repr(exc))

    def _nothing_done(self, m: Match, state: RuleState, common: dict[str, str], started: float) -> None:
        """Every action's check found nothing to do (e.g. the shims systemd named all serve
        containers): not a repair, so no budget is spent and the breaker is not moved."""
        state.deferred_reported = False
        state.backoff.succeeded()
        self.report(RecordKind.OUTCOME, f"{m.rule.name}: nothing to do, nothing changed", **common,
                    OUTCOME="nothing-to-do", ELAPSED_MS=self._ms(started))  # fmt: skip

    async def _actions(
        self,
        rule: Rule,
        mode: str,
        common: dict[str, str],
        started: float,
        event: Event | None,
        applied: list[str],
        first: int = 0,
        stopped: list[str] | None = None,
    ) -> str | None:
        """Run the rule's actions in order (from ``first``, resuming a repair cut off); the first
        failure's message, or None. A failure after a stop starts the stopped units again:
        systemd's own Restart= is back in charge, and the node is no worse than before nodemedic
        acted. The repair record is removed once all that is over, not when cancelled."""
        stopped = [] if stopped is None else stopped
        ctx = dataclasses.replace(self.ctx, event=event)  # actions may need what fired the rule
        failure: str | None = "interrupted"  # kept if _steps raises: a bug, or shutdown's cancel
        try:
            failure = await self._steps(ctx, rule, mode, common, started, stopped, applied, first)
        finally:  # whatever ended the repair, nobody else would start the stopped units again
            if failure is not None and stopped:
                await self._compensate_bounded(stopped, common, started)
            if mode == "enforce":  # observe-mode repairs run beside an enforce one: not theirs
                self._clear_intent()
        return failure

    async def _compensate_bounded(self, stopped: list[str], common: dict[str, str], started: float) -> None:
        """Start the units again within COMPENSATE_TIMEOUT, also in a task being cancelled at
        shutdown: the starts run shielded, and a second cancel stops only the wait for them."""
        job = asyncio.ensure_future(self._compensate(list(stopped), common, started))
        self._compensating.add(job)
        job.add_done_callback(self._compensating.discard)
        try:
            await asyncio.wait_for(asyncio.shield(job), COMPENSATE_TIMEOUT)
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:  # not one class before 3.11
            if isinstance(exc, asyncio.TimeoutError):
                job.cancel()
            detail = f"{', '.join(stopped)} may still be stopped: starting again did not finish ({exc!r})"
            self.report(RecordKind.ACTION, detail, **common, ACTION="compensate", UNIT=" ".join(stopped),
                        OUTCOME="failed", DETAIL=detail, ELAPSED_MS=self._ms(started))  # fmt: skip
            if isinstance(exc, asyncio.CancelledError):
                raise

    async def _compensate(self, stopped: list[str], common: dict[str, str], started: float) -> None:
        for unit in stopped:
            try:
                await self.ctx.units.start(unit, COMPENSATE_TIMEOUT)
            except Exception as exc:  # whatever it is, the next unit is still started
                outcome, detail = "failed", f"{unit} could not be started again: {exc}"
            else:
                outcome, detail = "done", f"{unit} started again after the failed repair"
            self.report(RecordKind.ACTION, detail, **common, ACTION="compensate", UNIT=unit,
                        OUTCOME=outcome, DETAIL=detail, ELAPSED_MS=self._ms(started))  # fmt: skip

    # ---- the repair record, and finishing a repair cut off ----------------------------------

    def _load_intent(self) -> RepairIntent | None:
        """At start-up, before D-Bus says anything: the units a repair cut off had stopped are
        ours, not an operator's stop, and will be started again by ``recover``."""
        if self._intents is None:
            return None
        intent = self._intents.load()
        if self._intents.corrupt:
            self.report(RecordKind.ERROR, f"repair record unusable, moved to {self._intents.corrupt}; a "
                        "repair cut off before this start cannot be finished: check containerd by hand",
                        OUTCOME="state-reset", PATH=self._intents.corrupt)  # fmt: skip
        if intent is not None:
            self.stopped_by_us.update(intent.stopped)
        return intent

    def _note_intent(self, rule: Rule, common: dict[str, str], index: int, name: str, step: Step,
                     stopped: list[str], applied: list[str]) -> None:  # fmt: skip
        """Say what is about to change, durably, before it does; best effort (a full disk never
        stops a repair: said once)."""
        if self._intents is None:
            return
        units = [*stopped]
        if name in UNIT_STEPS and step.unit not in units:
            units.append(step.unit)  # being stopped or started: down if we die now
        now = self.ctx.clock.wall()
        began = self._began.setdefault(common["INCIDENT"], now)
        intent = RepairIntent(incident=common["INCIDENT"], rule=rule.name, started_at=began, index=index,
                              step=name, stopped=tuple(units), applied=tuple(applied), paths=step.paths,
                              unit=step.unit, at=now, resumes=self._resumes)  # fmt: skip
        self._save_intent(intent, common)

    def _save_intent(self, intent: RepairIntent, common: dict[str, str]) -> None:
        if self._intents is None:
            return
        try:
            self._intents.save(intent)
        except OSError as exc:
            if not self._intent_failing:
                self._intent_failing = True
                self.report(RecordKind.ERROR, f"cannot record the repair under way ({exc}); it goes on, "
                            "but if nodemedic dies before it ends, nothing will finish it",
                            **common, OUTCOME="failed", PATH=str(self._intents.path),
                            DETAIL=str(exc))  # fmt: skip
            return
        self._intent_failing = False

    def _clear_intent(self) -> None:
        self._began.clear()  # repairs that change anything run one at a time
        self._resumes = 0
        if self._intents is None:
            return
        try:
            self._intents.clear()
        except OSError as exc:  # a stale record only makes the next start check the units again
            log.warning("cannot remove the repair record %s: %s", self._intents.path, exc)

    def recover(self) -> None:
        """At start-up, before any source runs: finish the repair a previous run was cut off in."""
        intent, self.unfinished = self.unfinished, None
        if intent is None:
            return
        state = self.states.get(intent.rule)
        if state is not None:
            state.running = True  # matches meanwhile wait, and are confirmed again afterwards
        self._spawn(self._recover(intent, state))

    async def _recover(self, intent: RepairIntent, state: RuleState | None) -> None:
        try:
            async with self._one_at_a_time:
                await self._finish(intent)
        except Exception as exc:  # a bug must not kill the daemon: the units are started by hand then
            self._internal_error_during_recovery(intent, exc)
        finally:
            if state is not None:
                state.running = False
                pending, state.pending = list(state.pending.values()), {}
                for again in pending:
                    self._decide(again, retry=True)

    async def _finish(self, intent: RepairIntent) -> None:
        common = {"RULE": intent.rule, "MODE": "enforce", "INCIDENT": intent.incident}
        started = self.ctx.clock.monotonic()
        self._began[intent.incident] = intent.started_at
        self.report(RecordKind.ERROR,
                    f"{intent.rule}: nodemedic was stopped in the middle of repair {intent.incident} "
                    f"(during {intent.step}, begun {_when(intent.started_at)}); finishing it",
                    **common, ACTION=intent.step, UNIT=" ".join(intent.stopped), PATH=" ".join(intent.paths),
                    OUTCOME="interrupted")  # fmt: skip
        rule = next((r for r in self.policy.rule if r.name == intent.rule), None)
        resumable = (rule is not None and intent.index < len(rule.action)
                     and rule.action[intent.index].do == intent.step
                     and self.policy.mode_of(rule) == "enforce")  # fmt: skip
        if resumable and intent.resumes >= MAX_RESUMES:  # the step itself kills nodemedic (OOM, say)
            resumable = False
            why = f"cut off {intent.resumes + 1} times in {intent.step}: not resumed again"
        else:
            why = "the rule's actions changed since"
        self._resumes = intent.resumes + 1
        self._save_intent(dataclasses.replace(intent, resumes=self._resumes), common)  # before any step
        if rule is not None and resumable:
            failure = await self._actions(rule, "enforce", common, started, None, list(intent.applied),
                                          intent.index, list(intent.stopped))  # fmt: skip
        else:  # the rule changed meanwhile (or observe now): only undo, start what was stopped
            failure = f"{why}: the stopped units were started again"
            if intent.stopped:
                await self._compensate_bounded(list(intent.stopped), common, started)
            self._clear_intent()
        if intent.step == "remove-socket-dir" and intent.resumes < MAX_RESUMES:  # the copy may be what kills
            await self._finish_quarantine(intent, rule, common, started)
        outcome, said = ("recovered", "finished") if failure is None else ("compensated", "undone")
        self.report(RecordKind.OUTCOME, f"{intent.rule}: the repair cut off by nodemedic's end was {said}",
                    **common, OUTCOME=outcome, DETAIL=failure or "",
                    ELAPSED_MS=self._ms(started))  # fmt: skip

    async def _finish_quarantine(self, intent: RepairIntent, rule: Rule | None, common: dict[str, str],
                                 started: float) -> None:  # fmt: skip
        """A directory moved aside by the cut-off step goes into the quarantine as it would have."""
        found = [a for a in (rule.action if rule else []) if isinstance(a, RemoveSocketDirParams)]
        params = found[0] if found else RemoveSocketDirParams(do="remove-socket-dir")
        try:
            done = await asyncio.to_thread(
                finish_quarantines, params, self.ctx.clock, self.ctx.quarantine_dir
            )
        except (NodemedicError, OSError) as exc:
            outcome, detail = "failed", f"moving the aside directory into the quarantine failed: {exc}"
        else:
            outcome, detail = ("done", "; ".join(done)) if done else ("skipped", "no aside directory left")
        self.report(RecordKind.ACTION, f"finish-quarantine: {detail}", **common, ACTION="finish-quarantine",
                    PATH=params.root, OUTCOME=outcome, DETAIL=detail,
                    ELAPSED_MS=self._ms(started))  # fmt: skip

    def _internal_error_during_recovery(self, intent: RepairIntent, exc: Exception) -> None:
        log.debug("recovery of %s failed", intent.incident, exc_info=exc)
        self.report(RecordKind.ERROR,
                    f"{intent.rule}: internal error while finishing repair {intent.incident} "
                    f"(a nodemedic bug): {exc!r}; check that {' '.join(intent.stopped) or 'containerd'} runs",
                    RULE=intent.rule, INCIDENT=intent.incident, OUTCOME="internal-error",
                    DETAIL=repr(exc))  # fmt: skip

    async def _steps(self, ctx: ActionContext, rule: Rule, mode: str, common: dict[str, str],
                     started: float, stopped: list[str], applied: list[str],
                     first: int = 0) -> str | None:  # fmt: skip
        for index, params in enumerate(rule.action[first:], first):
            action = build_action(params)
            fields = {**common, "ACTION": action.name}
            try:
                ctx = dataclasses.replace(ctx, changed=tuple(applied))
                step = await action.check(ctx)
                if isinstance(step, Skip):
                    self.report(RecordKind.ACTION, f"{action.name}: nothing to do: {step.reason}",
                                **fields, OUTCOME="skipped", DETAIL=step.reason,
                                ELAPSED_MS=self._ms(started))  # fmt: skip
                    continue
                where = {"UNIT": step.unit, "PATH": " ".join(step.paths)}
                if mode == "observe":
                    self.report(RecordKind.ACTION, f"would {step.summary}", **fields, **where,
                                OUTCOME="would-do", ELAPSED_MS=self._ms(started))  # fmt: skip
                    continue
                if step.changes:  # before the first change: a crash from here on is finished at start
                    self._note_intent(rule, common, index, action.name, step, stopped, applied)
                if action.name in ("stop-unit", "restart-unit", "raise-nofile-limit"):
                    self.stopped_by_us.add(step.unit)  # before the stop: its events follow at once
                if action.name == "stop-unit":
                    stopped.append(step.unit)
                if action.name == "start-unit" and step.unit in stopped:
                    stopped.remove(step.unit)
                if step.changes:
                    applied.append(action.name)
                done = await action.apply(ctx, step)
                checked = await action.verify(ctx, step)
            except (NodemedicError, OSError) as exc:  # OSError: the file system said no
                self.report(RecordKind.ACTION, f"{action.name} failed: {exc}", **fields,
                            OUTCOME="failed", DETAIL=str(exc), ELAPSED_MS=self._ms(started))  # fmt: skip
                return f"{action.name}: {exc}"
            except Exception as exc:  # a bug: recorded here, reported as one by _handle_incident
                self.report(RecordKind.ACTION, f"{action.name} failed with an internal error: {exc!r}",
                            **fields, OUTCOME="failed", DETAIL=repr(exc),
                            ELAPSED_MS=self._ms(started))  # fmt: skip
                raise
            detail = "; ".join(d for d in (done, checked) if d)
            self.report(RecordKind.ACTION, f"{step.summary}: done" + (f" ({detail})" if detail else ""),
                        **fields, **where, OUTCOME="done", DETAIL=detail,
                        ELAPSED_MS=self._ms(started))  # fmt: skip
        return None

    def _conclude(self, m: Match, mode: str, state: RuleState, failure: str | None,
                  common: dict[str, str], started: float) -> None:  # fmt: skip
        rule = m.rule
        state.deferred_reported = False
        elapsed = self._ms(started)
        now = self.ctx.clock.wall()
        if not rule.action:  # report-only: no budget spent, no backoff, once per incident
            state.observed = True
            advice = f". What to do: {rule.advice}" if rule.advice else ""
            self.report(RecordKind.OUTCOME, f"{rule.name}: reported, nothing changed{advice}",
                        **common, OUTCOME="reported", TRIGGER=m.trigger, DETAIL=rule.advice,
                        ELAPSED_MS=elapsed)  # fmt: skip
            return
        if mode == "observe":
            state.observed = True
            self.report(RecordKind.OUTCOME, f"{rule.name}: observed, nothing changed (observe mode)",
                        **common, OUTCOME="observed", ELAPSED_MS=elapsed)  # fmt: skip
            return
        self.budget.spend(now)
        if failure is None:
            state.backoff.succeeded()
            state.breaker.succeeded(now, "repaired")
            self.report(RecordKind.OUTCOME, f"{rule.name}: repaired in {elapsed:.0f} ms",
                        **common, OUTCOME="repaired", ELAPSED_MS=elapsed)  # fmt: skip
        else:
            wait = state.backoff.failed(now)
            opened = state.breaker.failed(now, failure)
            if opened:
                wait = state.breaker.reopens_at() - now
            self.report(RecordKind.OUTCOME,
                        f"{rule.name}: not repaired; next attempt in {wait:.0f}s at the earliest",
                        **common, OUTCOME="not-repaired", DETAIL=failure, ELAPSED_MS=elapsed)  # fmt: skip
            if opened:
                self._escalate(rule, state, common)
            # A failed repair may leave nothing that raises a new event (containerd stopped, the
            # directory unchanged): look again by ourselves when the rule may act again.
            retry_at = state.breaker.reopens_at() if opened else state.backoff.not_before
            self._retry_later(m, max(0.0, retry_at - now) + RETRY_MARGIN)
        self._persist()

    def _retry_later(self, m: Match, delay: float) -> None:
        def retry() -> None:
            rule = next((r for r in self.policy.rule if r.name == m.rule.name), None)
            if rule is None:  # gone after a reload: nothing to retry
                return
            self.states[rule.name].deferred_reported = False
            self._decide(Match(rule, m.event, f"retry: {m.trigger}"), retry=True)

        asyncio.get_running_loop().call_later(delay, retry)

    def _escalate(self, rule: Rule, state: RuleState, common: dict[str, str]) -> None:
        history = "\n".join(f"{_when(a.at)} {'repaired' if a.ok else 'failed'}: {a.detail}"
                            for a in state.breaker.history)  # fmt: skip
        self.report(RecordKind.ESCALATED,
                    f"{rule.name}: circuit breaker OPEN after {len(state.breaker.recent_failures)} failed "
                    f"repairs within {state.breaker.window:g}s; a human is needed. nodemedic stops acting "
                    f"on this rule and keeps observing; `nodemedic reset {rule.name}` closes the breaker",
                    **common, OUTCOME="breaker-open", DETAIL=history)  # fmt: skip

    # ---- persistence -------------------------------------------------------------------------

    def take_resets(self) -> None:
        """Close the breakers an operator asked to reset (`nodemedic reset RULE`)."""
        if self._store is None:
            return
        for name in self._store.take_resets():
            state = self.states.get(name)
            if state is None:
                self.report(RecordKind.ERROR, f"reset requested for unknown rule {name!r}",
                            RULE=name, OUTCOME="refused")  # fmt: skip
                continue
            state.breaker.reset()
            state.backoff.succeeded()
            state.held_reported = False
            self.report(RecordKind.DECIDED, f"{name}: breaker closed by the operator (nodemedic reset)",
                        RULE=name, OUTCOME="reset")  # fmt: skip
            self._look_again(name)
        self._persist()

    def _look_again(self, name: str) -> None:
        """After a reset, a fault that is still there is acted on now, not at its next event."""
        rule = next((r for r in self.policy.rule if r.name == name), None)
        if rule is None:
            return
        self.states[name].observed = False
        for trig in (t for t in rule.trigger if isinstance(t, PathTrigger)):
            for path in trig.paths:
                if path_kind(path) == trig.kind:
                    event = PathChanged(path, trig.kind, at=self.ctx.clock.monotonic(), source="reset")
                    self._decide(
                        Match(rule, event, f"after reset: {path} is a {trig.kind.value}"), retry=True
                    )
                    return

    def _restore(self) -> None:
        if self._store is None:
            return
        try:
            self._restore_from(self._store.load())
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            self._store.set_aside(f"unexpected content: {exc!r}")
            for rule in self.policy.rule:
                self.states[rule.name] = _new_state(rule)
            self.budget.spent = []
        if self._store.corrupt:
            self.report(RecordKind.ERROR, f"state file unusable, moved to {self._store.corrupt}; "
                        "starting with closed breakers",
                        OUTCOME="state-reset", PATH=self._store.corrupt)  # fmt: skip

    def _restore_from(self, data: dict[str, Any]) -> None:
        self.budget.spent = [float(t) for t in data.get("budget", {}).get("spent", [])]
        for name, saved in data.get("rules", {}).items():
            state = self.states.get(name)
            if state is None:
                continue
            state.breaker.restore(saved.get("breaker", {}))
            state.backoff.failures = int(saved.get("backoff", {}).get("failures", 0))
            state.backoff.not_before = float(saved.get("backoff", {}).get("not_before", 0.0))

    def _persist(self) -> None:
        if self._store is None:
            return
        rules = {
            name: {"breaker": s.breaker.to_dict(),
                   "backoff": {"failures": s.backoff.failures, "not_before": s.backoff.not_before}}
            for name, s in self.states.items()
        }  # fmt: skip
        try:
            self._store.save({"rules": rules, "budget": {"spent": self.budget.spent}})
        except OSError as exc:
            self.report(RecordKind.ERROR, f"cannot save state: {exc}", OUTCOME="failed", DETAIL=str(exc))

    def _ms(self, started: float) -> float:
        return (self.ctx.clock.monotonic() - started) * 1000.0


def _cleared(rule: Rule, event: Event) -> bool:
    """Has an observed incident of ``rule`` ended? Paths are looked at; a hang ends when the probe
    is answered again; a broken config when its unit runs again."""
    readings = [t for t in rule.trigger if isinstance(t, RESOURCE_TRIGGERS)]
    if readings:  # only a reading of the same check can say the condition is gone
        same = [t for t in readings if _reads(t, event)]
        return bool(same) and not any(match_trigger(t, event) for t in same)
    confirm = rule.confirm
    if confirm is None:
        return True
    if confirm.paths:
        return not _holds(confirm)
    if confirm.probe:
        return isinstance(event, ProbeAnswered)
    if confirm.config_broken:
        return (
            isinstance(event, UnitChanged) and event.unit == confirm.unit and event.active_state == "active"
        )
    return True


def _reads(trig: ResourceTriggerType, event: Event) -> bool:
    """Is ``event`` a reading of the check ``trig`` looks at?"""
    if isinstance(trig, PressureTrigger):
        return isinstance(event, PressureSeen) and (event.scope, event.resource) == (
            trig.scope,
            trig.resource,
        )
    if isinstance(trig, SocketModeTrigger):
        return isinstance(event, SocketModeSeen) and event.path == trig.path
    if isinstance(trig, GrpcStreamsTrigger):
        return isinstance(event, GrpcStreamsSetting) and event.path == trig.config
    kinds: dict[type, type] = {FdTrigger: FdUsage, OomTrigger: OomKills, VersionTrigger: VersionSeen}
    return isinstance(event, kinds[type(trig)])


def _holds(confirm: Confirm) -> bool:
    """The path part of the condition (the probe part is asked in ``_still_unanswered``)."""
    return not confirm.paths or any(path_kind(p) == confirm.kind for p in confirm.paths)


def _when(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


def _event_time(event: Event, now: float) -> float:
    return event.at if 0 < event.at <= now else now


def _event_path(event: Event) -> str:
    paths = PathChanged | SocketModeSeen | PressureSeen | OomKills | FileChanged | GrpcStreamsSetting
    return event.path if isinstance(event, paths) else ""


def _event_unit(event: Event) -> str:
    return event.unit if isinstance(event, UnitChanged | JournalLine | FdUsage | OomKills) else ""
