"""Applies the policy to events: match, confirm against the real state, then act, reporting each step.

One incident reported by several sources (inotify, D-Bus, journald) leads to one repair: while a
rule's repair runs, further matches are coalesced, and afterwards the rule's ``confirm`` condition,
checked against the real state, no longer holds, so stale events lead to nothing. In observe mode an
incident is reported once, and again only after its condition has cleared.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from nodemedic.actions.base import ActionContext, Skip
from nodemedic.actions.registry import build_action
from nodemedic.engine.backoff import Backoff
from nodemedic.errors import NodemedicError
from nodemedic.events import Event, JournalLine, PathChanged, UnitChanged
from nodemedic.policy.match import Match, match
from nodemedic.policy.model import PathConfirm, Policy, Rule
from nodemedic.report import RecordKind, Reporter
from nodemedic.sources.inotify import path_kind

log = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, None]], object]


@dataclass(slots=True)
class RuleState:
    backoff: Backoff
    running: bool = False
    observed: bool = False  # an observe-mode incident is open (already reported)
    coalesced: int = 0
    deferred_reported: bool = False
    incidents: int = field(default=0)


class Runner:
    def __init__(self, policy: Policy, ctx: ActionContext, report: Reporter, spawn: Spawn) -> None:
        self.policy = policy
        self.ctx = ctx
        self.report = report
        self._spawn = spawn
        self.states = {
            r.name: RuleState(Backoff(r.backoff.initial, r.backoff.factor, r.backoff.max))
            for r in policy.rule
        }
        self.idle = asyncio.Event()
        self.idle.set()

    def handle(self, event: Event) -> None:
        self._close_cleared()
        for m in match(self.policy.rule, event):
            self._decide(m)

    def _close_cleared(self) -> None:
        """An observed incident ends when its condition no longer holds, whatever event says so."""
        for rule in self.policy.rule:
            state = self.states[rule.name]
            if state.observed and (rule.confirm is None or not _holds(rule.confirm)):
                state.observed = False

    def _decide(self, m: Match) -> None:
        rule, state = m.rule, self.states[m.rule.name]
        if state.running:
            state.coalesced += 1
            return
        if rule.confirm is not None and not _holds(rule.confirm):
            log.debug("rule %s: condition no longer holds (%s)", rule.name, m.trigger)
            return
        mode = self.policy.mode_of(rule)
        if mode == "observe" and state.observed:
            state.coalesced += 1
            return
        now = self.ctx.clock.monotonic()
        if not state.backoff.ready(now):
            if not state.deferred_reported:
                state.deferred_reported = True
                self.report(
                    RecordKind.DECIDED,
                    f"{rule.name}: backing off {state.backoff.remaining(now):.0f}s "
                    f"after {state.backoff.failures} failed repair(s)",
                    RULE=rule.name,
                    MODE=mode,
                    OUTCOME="deferred",
                    TRIGGER=m.trigger,
                )
            return
        state.running = True
        self.idle.clear()
        self._spawn(self._run(m, mode, state))

    async def _run(self, m: Match, mode: str, state: RuleState) -> None:
        rule = m.rule
        incident = uuid.uuid4().hex[:12]
        started = _event_time(m.event, self.ctx.clock.monotonic())
        common = {"RULE": rule.name, "MODE": mode, "INCIDENT": incident}
        self.report(
            RecordKind.DETECTED,
            f"{rule.name}: {m.trigger}",
            **common,
            SOURCE=m.event.source,
            TRIGGER=m.trigger,
            PATH=_event_path(m.event),
            UNIT=_event_unit(m.event),
            ELAPSED_MS=self._ms(started),
        )
        verb = "repairing" if mode == "enforce" else "observe mode: reporting what would be done"
        self.report(
            RecordKind.DECIDED,
            f"{rule.name}: {verb}",
            **common,
            OUTCOME="repair" if mode == "enforce" else "observe",
        )
        try:
            ok = await self._actions(rule, mode, common, started)
        except Exception as exc:  # a bug must not kill the daemon; it is recorded
            log.exception("rule %s crashed", rule.name)
            self.report(
                RecordKind.ERROR,
                f"{rule.name}: internal error: {exc}",
                **common,
                OUTCOME="failed",
                DETAIL=repr(exc),
            )
            ok = False
        finally:
            state.running = False
            self.idle.set()
        self._conclude(rule, mode, state, ok, common, started)

    async def _actions(self, rule: Rule, mode: str, common: dict[str, str], started: float) -> bool:
        for params in rule.action:
            action = build_action(params)
            fields = {**common, "ACTION": action.name}
            try:
                step = await action.check(self.ctx)
                if isinstance(step, Skip):
                    self.report(
                        RecordKind.ACTION,
                        f"{action.name}: nothing to do: {step.reason}",
                        **fields,
                        OUTCOME="skipped",
                        DETAIL=step.reason,
                        ELAPSED_MS=self._ms(started),
                    )
                    continue
                where = {"UNIT": step.unit, "PATH": " ".join(step.paths)}
                if mode == "observe":
                    self.report(
                        RecordKind.ACTION,
                        f"would {step.summary}",
                        **fields,
                        **where,
                        OUTCOME="would-do",
                        ELAPSED_MS=self._ms(started),
                    )
                    continue
                done = await action.apply(self.ctx, step)
                checked = await action.verify(self.ctx, step)
            except NodemedicError as exc:
                self.report(
                    RecordKind.ACTION,
                    f"{action.name} failed: {exc}",
                    **fields,
                    OUTCOME="failed",
                    DETAIL=str(exc),
                    ELAPSED_MS=self._ms(started),
                )
                return False
            detail = "; ".join(d for d in (done, checked) if d)
            self.report(
                RecordKind.ACTION,
                f"{step.summary}: done" + (f" ({detail})" if detail else ""),
                **fields,
                **where,
                OUTCOME="done",
                DETAIL=detail,
                ELAPSED_MS=self._ms(started),
            )
        return True

    def _conclude(
        self,
        rule: Rule,
        mode: str,
        state: RuleState,
        ok: bool,
        common: dict[str, str],
        started: float,
    ) -> None:
        state.incidents += 1
        state.coalesced = 0
        state.deferred_reported = False
        elapsed = self._ms(started)
        if mode == "observe":
            state.observed = True
            self.report(
                RecordKind.OUTCOME,
                f"{rule.name}: observed, nothing changed (observe mode)",
                **common,
                OUTCOME="observed",
                ELAPSED_MS=elapsed,
            )
        elif ok:
            state.backoff.succeeded()
            self.report(
                RecordKind.OUTCOME,
                f"{rule.name}: repaired in {elapsed:.0f} ms",
                **common,
                OUTCOME="repaired",
                ELAPSED_MS=elapsed,
            )
        else:
            wait = state.backoff.failed(self.ctx.clock.monotonic())
            self.report(
                RecordKind.OUTCOME,
                f"{rule.name}: not repaired; next attempt in {wait:.0f}s at the earliest",
                **common,
                OUTCOME="not-repaired",
                ELAPSED_MS=elapsed,
            )

    def _ms(self, started: float) -> float:
        return (self.ctx.clock.monotonic() - started) * 1000.0


def _holds(confirm: PathConfirm) -> bool:
    return any(path_kind(p) == confirm.kind for p in confirm.paths)


def _event_time(event: Event, now: float) -> float:
    return event.at if 0 < event.at <= now else now


def _event_path(event: Event) -> str:
    return event.path if isinstance(event, PathChanged) else ""


def _event_unit(event: Event) -> str:
    return event.unit if isinstance(event, UnitChanged | JournalLine) else ""
