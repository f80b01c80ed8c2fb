"""The rules' decisions: match, hold, defer, respect an operator's stop; pure.

One incident reported by several sources (inotify, D-Bus, journald) leads to one repair: while a
rule's repair runs, further matches are kept (one per distinct trigger) and decided again
afterwards, when the rule's ``confirm`` condition, asked of the node by the executor, no longer
holds, so stale events lead to nothing. In observe mode an incident is reported once, and again
only after its condition has cleared.

Before acting in enforce mode the rule must be allowed by its backoff (after a failure), its circuit
breaker (after repeated failures: then a human is needed) and the global repair budget. A rule held
by its breaker or the budget keeps observing: it reports what it would do, once per incident.

``RuleCore`` takes events and the time and returns effects (``core/effects.py``); the executor
runs them and reports each repair's end back through ``finished``. Nothing here does I/O: what is
at a path comes from the node view (inotify's last word), and the executor checks it again, for
real, before acting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from nodemedic.backoff import Backoff
from nodemedic.core.breaker import HALF_OPEN, OPEN, CircuitBreaker
from nodemedic.core.budget import RepairBudget
from nodemedic.core.effects import Effects, Instant, Later, LookAgain, Repair, Report, SaveState, Settle
from nodemedic.core.nodeview import UNIT_REFUSED, NodeView
from nodemedic.events import Event, FileChanged, ProbeAnswered, UnitChanged
from nodemedic.policy.match import Match, in_states, match, match_trigger
from nodemedic.policy.model import Confirm, FileTrigger, Mode, Policy, Rule
from nodemedic.report import RecordKind

MAX_PENDING = 16
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
        self.breaker.failures, self.breaker.window = k.failures, k.window
        self.breaker.cooldown = k.cooldown


def _new_state(rule: Rule) -> RuleState:
    state = RuleState(Backoff(rule.backoff.initial), CircuitBreaker(1, 0.0, 0.0))
    state.configure(rule)
    return state


@dataclass(frozen=True, slots=True)
class RepairEnd:
    """How a repair the core asked for ended, as the executor reports it.

    ``none``: nothing to conclude (not confirmed, gone after waiting, a bug before any change);
    ``nothing-to-do``: every action's check found nothing to do; ``concluded``: it ran (observe or
    report-only included), ``failure`` says what failed, None if it repaired."""

    kind: Literal["none", "nothing-to-do", "concluded"]
    failure: str | None = None
    common: dict[str, str] = field(default_factory=dict)
    elapsed_ms: float = 0.0


class RuleCore:
    def __init__(self, policy: Policy, view: NodeView) -> None:
        self.view = view
        self.policy = policy
        self.states: dict[str, RuleState] = {}
        self.budget = RepairBudget(policy.daemon.budget.repairs, policy.daemon.budget.window)
        self.closing = False  # set at shutdown: no new repair starts
        self._waiting: dict[str, Match] = {}  # rule -> match held until its unit's state is known
        self._fired: dict[str, list[float]] = {}  # when each rule's triggers fired (monotonic)
        self._running: dict[str, RuleState] = {}  # repairs under way: their rule's state, kept over a reload
        self._written: dict[str, float] = {}  # file -> when it was last written (monotonic)
        self._settling: dict[tuple[str, str], Match] = {}  # (rule, file) -> the match decided once it settles
        self.replace_policy(policy)

    def replace_policy(self, policy: Policy) -> None:
        """Apply a (re)loaded policy; state of rules that stay, and repairs under way, are kept."""
        self.policy = policy
        self.budget.repairs = policy.daemon.budget.repairs
        self.budget.window = policy.daemon.budget.window
        states = {}
        for rule in policy.rule:
            states[rule.name] = self.states.get(rule.name) or _new_state(rule)
            states[rule.name].configure(rule)
        self.states = states

    def rule(self, name: str) -> Rule | None:
        return next((r for r in self.policy.rule if r.name == name), None)

    # ---- events ---------------------------------------------------------------------------------

    def handle(self, event: Event, now: Instant) -> Effects:
        """An event the node view has already seen."""
        out: Effects = []
        if isinstance(event, UnitChanged):
            for name, held in list(self._waiting.items()):
                if held.rule.confirm is not None and held.rule.confirm.unit == event.unit:
                    del self._waiting[name]
                    self._decide(held, now, out)
        if isinstance(event, FileChanged):
            self._written[event.path] = now.monotonic
        self._close_cleared(event)
        for m in match(self.policy.rule, event):
            settle = self._settle_of(m, now)
            if settle is not None:
                self._settle(m, *settle, now, out)
            else:
                self._decide(m, now, out)
        return out

    def _settle_of(self, m: Match, now: Instant) -> tuple[str, float] | None:
        """The file ``m`` must wait for and how long after its last write; None to decide now.
        A rule's own file trigger with ``settle``; and any other trigger (containerd's journal
        line, say) of a rule whose confirm reads a file written less than its settle ago: the
        toolkit's half-written file may have failed a start systemd made between its two steps,
        and the rule must judge the file it finishes, not the half."""
        path = (
            m.event.path if isinstance(m.event, FileChanged) else (m.rule.confirm or Confirm()).config_broken
        )
        if path is None:
            return None
        settle = _settle_for(self.policy, path)
        if settle <= 0:
            return None
        if (
            not isinstance(m.event, FileChanged)
            and self._written.get(path, -settle) + settle <= now.monotonic
        ):
            return None  # not written lately: the file is as written
        return path, settle

    def _settle(self, m: Match, path: str, settle: float, now: Instant, out: Effects) -> None:
        """Decide once the file has gone unwritten for ``settle`` (each write restarts the wait),
        so a write made in steps (half a runtime block, then the rest) is judged once, complete.
        One timer per rule and file: a later write moves it on, a later match replaces the one
        it will decide."""
        key = (m.rule.name, path)
        pending = key in self._settling
        self._settling[key] = m
        if not pending:
            written = self._written.get(path, now.monotonic)
            out.append(self._settle_timer(key, settle, written + settle - now.monotonic, written))

    def _settle_timer(self, key: tuple[str, str], settle: float, delay: float, written: float) -> Settle:
        name, path = key

        def settled(now: Instant) -> Effects:
            last = self._written.get(path, written)
            if last != written:  # written again meanwhile: wait for that write's settle
                return [self._settle_timer(key, settle, last + settle - now.monotonic, last)]
            m = self._settling.pop(key, None)
            rule = self.rule(name)
            if m is None or rule is None:  # gone after a reload
                return []
            return self.decide(Match(rule, m.event, f"{m.trigger}, then left unchanged for {settle:g}s"), now)

        return Settle(delay, settled, f"settle {name}")

    def decide(self, m: Match, now: Instant, retry: bool = False) -> Effects:
        out: Effects = []
        self._decide(m, now, out, retry)
        return out

    def _close_cleared(self, event: Event) -> None:
        """An observed incident ends when its condition no longer holds, whatever event says so."""
        for rule in self.policy.rule:
            state = self.states[rule.name]
            if state.observed and self._cleared(rule, event):
                state.observed = False

    def _decide(self, m: Match, now: Instant, out: Effects, retry: bool = False) -> None:
        rule, state = m.rule, self.states[m.rule.name]
        if self.closing:
            return
        if state.running:
            # The same incident seen again is dropped later by the confirm check; a different one
            # (another PID named by systemd, say) must not be lost.
            if len(state.pending) < MAX_PENDING:
                state.pending.setdefault(m.trigger, m)
            return
        if not self._may_decide(m, now, out, count=not retry):
            return
        mode = self._mode_now(m, state, now, out)
        if mode == "enforce" and not state.backoff.ready(now.wall):
            self._defer(m, state, now, out)
            return
        if (mode == "observe" or not rule.action) and state.observed:
            return  # observed, or a report-only rule: once per incident
        state.running = True
        self._running[rule.name] = state
        self._fired.pop(rule.name, None)
        out.append(Repair(m, mode, retry))

    def _may_decide(self, m: Match, now: Instant, out: Effects, count: bool) -> bool:
        """The rule's conditions, its path condition as last seen, and its unit's stop."""
        rule, state = m.rule, self.states[m.rule.name]
        if not self.conditions_met(rule, now, count=count):
            return False
        confirm = rule.confirm
        if confirm is None:
            return True
        if self._holds(confirm) is False:
            return False  # inotify's last word: not there (the executor would find the same)
        if confirm.unit and self.view.state(confirm.unit) is None:
            # At start-up D-Bus may not have said yet whether an operator stopped the unit: wait.
            self._waiting[rule.name] = m
            return False
        if confirm.unit in self.view.stopped_by_others | self.view.unstartable():
            self._respect_stop(rule, state, confirm.unit, out)
            return False
        state.respected_stop = False
        return True

    def _mode_now(self, m: Match, state: RuleState, now: Instant, out: Effects) -> Mode:
        """The rule's mode, or "observe" while its breaker or the budget holds it."""
        mode = self.policy.mode_of(m.rule)
        if mode != "enforce":
            return mode
        reopens = state.breaker.reopens_at()
        held = self._held(m.rule, state, now, out)
        if state.breaker.state == OPEN and state.breaker.reopens_at() != reopens:
            # The wall clock was set back and the cool-down re-anchored to now: the retry armed
            # for its old end comes too early, so look again when the new one ends.
            self._retry_later(m, state.breaker.reopens_at() - now.wall + RETRY_MARGIN, out)
        return held or mode

    def conditions_met(self, rule: Rule, now: Instant, count: bool = False) -> bool:
        """``[rule.when]``: enough firings within the window, and the unit in the wanted state."""
        when = rule.when
        if count:
            recent = [t for t in self._fired.get(rule.name, []) if t > now.monotonic - when.within]
            fired = self._fired[rule.name] = [*recent, now.monotonic]
            if len(fired) < when.occurrences:
                return False
        if when.unit is None:
            return True
        seen = self.view.state(when.unit)
        return seen is not None and in_states(seen, when.active_state, when.sub_state)

    def _holds(self, confirm: Confirm) -> bool | None:
        """The path part of the condition as inotify last saw it; None while no event has said."""
        if not confirm.paths or confirm.kind is None:
            return True
        seen = [self.view.path_is(p, confirm.kind) for p in confirm.paths]
        if any(seen):
            return True
        return None if None in seen else False

    def stop_respected(self, rule: Rule) -> Effects | None:
        """Asked by the executor right before a repair acts: None if the rule may act on its unit,
        else what to say (once) of an operator's stop, or of a masked unit, since it decided."""
        unit, state = (rule.confirm or Confirm()).unit, self.states.get(rule.name)
        if unit is None or unit not in self.view.stopped_by_others | self.view.unstartable():
            return None
        out: Effects = []
        if state is not None:
            self._respect_stop(rule, state, unit, out)
        return out

    def _respect_stop(self, rule: Rule, state: RuleState, unit: str, out: Effects) -> None:
        seen = self.view.state(unit)
        if state.respected_stop:
            return
        state.respected_stop = True
        if seen is not None and seen.load_state in UNIT_REFUSED:  # no stop of anyone's: a refusal
            why = UNIT_REFUSED[seen.load_state]
            message = (
                f"{rule.name}: {unit} is {seen.load_state}: {why}; nodemedic does not start it, not acting"
            )
            fields = {"OUTCOME": "refused", "DETAIL": seen.load_state}
        else:
            message = (
                f"{rule.name}: {unit} was stopped by someone else (systemctl stop); "
                "not acting until it is started again"
            )
            fields = {"OUTCOME": "operator-stop"}
        out.append(Report(RecordKind.DECIDED, message, {"RULE": rule.name, "UNIT": unit, **fields}))

    def _defer(self, m: Match, state: RuleState, now: Instant, out: Effects) -> None:
        """Within the backoff after a failure: say so once, and look again when it has passed."""
        if state.deferred_reported:
            return
        state.deferred_reported = True
        wait = state.backoff.remaining(now.wall)
        message = f"{m.rule.name}: backing off {wait:.0f}s after {state.backoff.failures} failed repair(s)"
        fields = {"RULE": m.rule.name, "MODE": "enforce", "OUTCOME": "deferred", "TRIGGER": m.trigger}
        out.append(Report(RecordKind.DECIDED, message, fields))
        self._retry_later(m, wait + RETRY_MARGIN, out)

    def _held(self, rule: Rule, state: RuleState, now: Instant, out: Effects) -> Mode | None:
        """'observe' when the breaker or the budget forbids acting (said once), else None."""
        was = state.breaker.state
        if not state.breaker.allow(now.wall):
            why = (
                f"circuit breaker open since {_when(state.breaker.opened_at)} after repeated failed "
                f"repairs; observing only until {_when(state.breaker.reopens_at())} or "
                f"`nodemedic reset {rule.name}`"
            )
        elif (spent := self.budget_held(now)) is not None:
            why = spent
        else:
            if was == OPEN and state.breaker.state == HALF_OPEN:
                fields = {"RULE": rule.name, "MODE": "enforce", "OUTCOME": "trial"}
                out.append(
                    Report(RecordKind.DECIDED, f"{rule.name}: breaker half-open: one trial repair", fields)
                )
            state.held_reported = False
            return None
        if not state.held_reported:
            state.held_reported = True
            fields = {"RULE": rule.name, "MODE": "observe", "OUTCOME": "held", "DETAIL": why}
            out.append(Report(RecordKind.DECIDED, f"{rule.name}: {why}", fields))
        return "observe"

    def budget_held(self, now: Instant) -> str | None:
        """Why the global repair budget forbids a repair (or a restart of containerd) now; None if not."""
        if self.budget.allow(now.wall):
            return None
        return (
            f"global repair budget spent ({self.budget.repairs} repairs within "
            f"{self.budget.window:g}s); observing only"
        )

    def spend_budget(self, now: Instant) -> Effects:
        self.budget.spend(now.wall)
        return [SaveState(self.snapshot())]

    def _retry_later(self, m: Match, delay: float, out: Effects) -> None:
        def retry(now: Instant) -> Effects:
            rule = self.rule(m.rule.name)
            if rule is None:  # gone after a reload: nothing to retry
                return []
            self.states[rule.name].deferred_reported = False
            return self.decide(Match(rule, m.event, f"retry: {m.trigger}"), now, retry=True)

        out.append(Later(delay, retry, f"retry {m.rule.name}"))

    # ---- the end of a repair --------------------------------------------------------------------

    def hold(self, name: str) -> None:
        """A repair of ``name`` runs that the core did not start (one finished at start-up): matches
        meanwhile wait, and are decided again when it is ``finished``."""
        state = self.states.get(name)
        if state is not None:
            state.running = True
            self._running[name] = state

    def finished(self, m: Match, mode: Mode, end: RepairEnd, now: Instant) -> Effects:
        """The executor's word on a repair this core asked for; the rule may decide again."""
        out: Effects = []
        state = self._running.get(m.rule.name) or self.states.get(m.rule.name)
        if state is not None and end.kind == "nothing-to-do":
            self._nothing_done(m, state, end, out)
        elif state is not None and end.kind == "concluded":
            self._conclude(m, mode, state, end, now, out)
        return out + self.release(m.rule.name, now)

    def release(self, name: str, now: Instant) -> Effects:
        """The rule's repair is over: what came meanwhile is decided again."""
        state = self._running.pop(name, None) or self.states.get(name)
        if state is None:
            return []
        state.running = False
        pending, state.pending = list(state.pending.values()), {}
        out: Effects = []
        for again in pending:
            self._decide(again, now, out, retry=True)
        return out

    def _nothing_done(self, m: Match, state: RuleState, end: RepairEnd, out: Effects) -> None:
        """Every action's check found nothing to do (e.g. the shims systemd named all serve
        containers): not a repair, so no budget is spent and the breaker is not moved."""
        state.deferred_reported = False
        state.backoff.succeeded()
        fields = {**end.common, "OUTCOME": "nothing-to-do", "ELAPSED_MS": end.elapsed_ms}
        out.append(Report(RecordKind.OUTCOME, f"{m.rule.name}: nothing to do, nothing changed", fields))

    def _conclude(
        self, m: Match, mode: Mode, state: RuleState, end: RepairEnd, now: Instant, out: Effects
    ) -> None:
        rule = m.rule
        state.deferred_reported = False
        fields: dict[str, object] = {**end.common, "ELAPSED_MS": end.elapsed_ms}
        if not rule.action:  # report-only: no budget spent, no backoff, once per incident
            state.observed = True
            advice = f". What to do: {rule.advice}" if rule.advice else ""
            fields |= {"OUTCOME": "reported", "TRIGGER": m.trigger, "DETAIL": rule.advice}
            out.append(Report(RecordKind.OUTCOME, f"{rule.name}: reported, nothing changed{advice}", fields))
            return
        if mode == "observe":
            state.observed = True
            fields["OUTCOME"] = "observed"
            message = f"{rule.name}: observed, nothing changed (observe mode)"
            out.append(Report(RecordKind.OUTCOME, message, fields))
            return
        self.budget.spend(now.wall)
        if end.failure is None:
            state.backoff.succeeded()
            state.breaker.succeeded(now.wall, "repaired")
            fields["OUTCOME"] = "repaired"
            out.append(
                Report(RecordKind.OUTCOME, f"{rule.name}: repaired in {end.elapsed_ms:.0f} ms", fields)
            )
        else:
            self._failed(m, state, end, now, out)
        out.append(SaveState(self.snapshot()))

    def _failed(self, m: Match, state: RuleState, end: RepairEnd, now: Instant, out: Effects) -> None:
        failure = end.failure or ""
        wait = state.backoff.failed(now.wall)
        opened = state.breaker.failed(now.wall, failure)
        if opened:
            wait = state.breaker.reopens_at() - now.wall
        fields = {**end.common, "OUTCOME": "not-repaired", "DETAIL": failure, "ELAPSED_MS": end.elapsed_ms}
        message = f"{m.rule.name}: not repaired; next attempt in {wait:.0f}s at the earliest"
        out.append(Report(RecordKind.OUTCOME, message, fields))
        if opened:
            self._escalate(m.rule, state, end.common, out)
        # A failed repair may leave nothing that raises a new event (containerd stopped, the
        # directory unchanged): look again by ourselves when the rule may act again.
        retry_at = state.breaker.reopens_at() if opened else state.backoff.not_before
        self._retry_later(m, max(0.0, retry_at - now.wall) + RETRY_MARGIN, out)

    def _escalate(self, rule: Rule, state: RuleState, common: dict[str, str], out: Effects) -> None:
        history = "\n".join(
            f"{_when(a.at)} {'repaired' if a.ok else 'failed'}: {a.detail}" for a in state.breaker.history
        )
        message = (
            f"{rule.name}: circuit breaker OPEN after {len(state.breaker.recent_failures)} failed "
            f"repairs within {state.breaker.window:g}s; a human is needed. nodemedic stops acting "
            f"on this rule and keeps observing; `nodemedic reset {rule.name}` closes the breaker"
        )
        fields = {**common, "OUTCOME": "breaker-open", "DETAIL": history}
        out.append(Report(RecordKind.ESCALATED, message, fields))

    # ---- operators' resets and the saved state --------------------------------------------------

    def reset(self, names: list[str]) -> Effects:
        """Close the breakers an operator asked to reset (`nodemedic reset RULE`)."""
        out: Effects = []
        for name in names:
            state, rule = self.states.get(name), self.rule(name)
            if state is None or rule is None:
                fields = {"RULE": name, "OUTCOME": "refused"}
                out.append(Report(RecordKind.ERROR, f"reset requested for unknown rule {name!r}", fields))
                continue
            state.breaker.reset()
            state.backoff.succeeded()
            state.held_reported = False
            state.observed = False
            message = f"{name}: breaker closed by the operator (nodemedic reset)"
            out.append(Report(RecordKind.DECIDED, message, {"RULE": name, "OUTCOME": "reset"}))
            out.append(LookAgain(rule))  # a fault still there is acted on now, not at its next event
        return [*out, SaveState(self.snapshot())]

    def restore(self, data: dict[str, Any]) -> None:
        """Take what ``snapshot`` saved; raises KeyError, TypeError, ValueError or AttributeError
        on content that is not (the caller sets such a file aside and calls ``fresh``)."""
        self.budget.spent = [float(t) for t in data.get("budget", {}).get("spent", [])]
        for name, saved in data.get("rules", {}).items():
            state = self.states.get(name)
            if state is None:
                continue
            state.breaker.restore(saved.get("breaker", {}))
            state.backoff.failures = int(saved.get("backoff", {}).get("failures", 0))
            state.backoff.not_before = float(saved.get("backoff", {}).get("not_before", 0.0))

    def fresh(self) -> None:
        """Closed breakers, no backoff, an unspent budget."""
        for rule in self.policy.rule:
            self.states[rule.name] = _new_state(rule)
        self.budget.spent = []

    def snapshot(self) -> dict[str, Any]:
        rules = {
            name: {
                "breaker": s.breaker.to_dict(),
                "backoff": {"failures": s.backoff.failures, "not_before": s.backoff.not_before},
            }
            for name, s in self.states.items()
        }
        return {"rules": rules, "budget": {"spent": list(self.budget.spent)}}

    # ---- when an observed incident is over ------------------------------------------------------

    def _cleared(self, rule: Rule, event: Event) -> bool:
        """Has an observed incident of ``rule`` ended? Paths are looked at (as inotify last saw
        them); a hang ends when the probe is answered again; a broken config when its unit runs
        again; a reading when a reading of the same check no longer fires."""
        readings = [t for t in rule.trigger if t.served_by == "resources"]
        if readings:  # only a reading of the same check can say the condition is gone
            same = [t for t in readings if t.reads(event)]
            return bool(same) and not any(match_trigger(t, event) for t in same)
        confirm = rule.confirm
        if confirm is None:
            return True
        if confirm.paths:  # a path no event has spoken of yet counts as not there
            return not any(self.view.path_is(p, confirm.kind) for p in confirm.paths if confirm.kind)
        if confirm.probe:
            return isinstance(event, ProbeAnswered)
        if confirm.config_broken:
            return (
                isinstance(event, UnitChanged)
                and event.unit == confirm.unit
                and event.active_state == "active"
            )
        return True


def _settle_for(policy: Policy, path: str) -> float:
    """How long ``path`` must go unwritten before a rule judges it: the longest ``settle`` of the
    policy's file triggers on it (0: judged at once)."""
    files = [t for r in policy.rule for t in r.trigger if isinstance(t, FileTrigger) and t.path == path]
    return max((t.settle for t in files), default=0.0)


def _when(wall: float) -> str:
    return datetime.fromtimestamp(wall, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
