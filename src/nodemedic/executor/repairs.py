"""A rule's repair, as the executor runs it: confirm against the node, then check -> apply -> verify
each action in order under the one lock, start again what a failed repair stopped, and keep the
record of the repair under way (``repair.json``) so that one cut off by nodemedic's end is
finished at the next start. How it ended goes back to the rules' core (``RuleCore.finished``),
which counts it against the backoff, the breaker and the budget.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from nodemedic.actions.base import ActionContext, Skip, Step
from nodemedic.actions.registry import build_action
from nodemedic.actions.shims import KillOrphanedShims, ReportedOrphans
from nodemedic.actions.socket_dir import finish_quarantines
from nodemedic.configs import config_problem
from nodemedic.core.effects import Repair
from nodemedic.core.rules import RepairEnd
from nodemedic.errors import NodemedicError, ProbeError
from nodemedic.events import (
    Event,
    JournalLine,
)
from nodemedic.fs import path_kind
from nodemedic.policy.actions import KillOrphanedShimsParams, RemoveSocketDirParams
from nodemedic.policy.match import Match
from nodemedic.policy.model import Confirm, Mode, Rule
from nodemedic.report import RecordKind
from nodemedic.store import IntentStore, RepairIntent

if TYPE_CHECKING:
    from nodemedic.executor import Executor

log = logging.getLogger(__name__)

COMPENSATE_TIMEOUT = 30.0
MAX_RESUMES = 2  # a repair cut off this often by nodemedic's own end is only undone at the next start


@dataclasses.dataclass(slots=True)
class Run:
    """One repair under way: what its records share, and what it changed so far."""

    rule: Rule | None  # None: a repair record's rule removed from the policy since
    mode: Mode
    common: dict[str, str]
    started: float  # monotonic: ELAPSED_MS counts from here
    event: Event | None = None
    applied: list[str] = dataclasses.field(default_factory=list)  # the actions that changed something
    stopped: list[str] = dataclasses.field(default_factory=list)  # units it stopped, not started yet
    halted: str = ""  # the unit an operator stopped during the repair: nothing after it was done
    would: list[str] = dataclasses.field(default_factory=list)  # observe: the actions that would change


class Repairs:
    def __init__(self, ex: Executor, intents: IntentStore | None) -> None:
        self.ex = ex
        self._intents = intents
        self._intent_failing = False  # a failed save of the repair record is said once
        self._began: dict[str, float] = {}  # incident -> wall clock of its first recorded step
        self._resumes = 0  # of the repair under way, when a start-up resumed it
        self._compensating: set[asyncio.Future[None]] = set()  # starts that outlive a cancelled repair
        self._reported_orphans = ReportedOrphans()  # confirm.orphaned_shims: one incident per process
        self.unfinished = self._load_intent()

    @property
    def ctx(self) -> ActionContext:
        return self.ex.ctx

    def _ms(self, started: float) -> float:
        return (self.ctx.clock.monotonic() - started) * 1000.0

    # ---- one repair, from the core's Repair effect to its end -----------------------------------

    async def run(self, effect: Repair) -> None:
        m, mode = effect.match, effect.mode
        end = RepairEnd("none")
        try:
            generation = self.ex.lock.generation  # before the confirm: a change meanwhile makes it stale
            if await self._confirmed(m, mode):
                end = await self._incident(m, mode, effect.retry, generation)
        finally:  # whatever happened, the rule may decide again
            self.ex.run(self.ex.rules.finished(m, mode, end, self.ex.now()))

    async def _confirmed(self, m: Match, mode: Mode) -> bool:
        fields = {"RULE": m.rule.name, "MODE": mode}
        try:
            return await self._confirmed_now(m, mode)
        except (NodemedicError, OSError) as exc:  # no verdict (a config check killed): do nothing
            why = f"{m.rule.name}: cannot tell whether the fault is there: {exc}; not acting"
            self.ex.report(RecordKind.ERROR, why, **fields, OUTCOME="unchecked", DETAIL=str(exc))
        except Exception as exc:  # e.g. a config check that fails on crafted content
            self._internal_error(m.rule, exc, fields, "confirm")
        return False

    async def _confirmed_now(self, m: Match, mode: Mode) -> bool:
        """``confirm`` asked of the node: is the path what it must be, does containerd answer, does
        its config load, does the line name a shim proven orphaned?"""
        rule, confirm = m.rule, m.rule.confirm
        if confirm is None:
            return True
        if not _holds(confirm):
            log.debug("rule %s: condition no longer holds (%s)", rule.name, m.trigger)
            return False
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
            probe = self.ex.policy.daemon.probe
            try:
                await self.ctx.probe.version(probe.socket, probe.timeout)
            except ProbeError:
                return True
            log.debug("rule %s: containerd answers; nothing to do", rule.name)
            return False
        return True

    def _new_orphans(self, m: Match, mode: Mode) -> list[int]:
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

    async def _incident(self, m: Match, mode: Mode, retry: bool, generation: int) -> RepairEnd:
        run = self._begin(m, mode, retry)
        try:
            if mode != "enforce":
                failure = await self._actions(run)
            else:
                async with self.ex.lock:
                    if self._stop_respected(m.rule):
                        return self._respected(m.rule, run)
                    changed = self.ex.lock.generation != generation  # a change since the confirm
                    if changed and not await self._still_there(m.rule):
                        return self._gone(m.rule, run)
                    failure = await self._actions(run)
                    if run.halted:
                        return self._respected(m.rule, run)
        except Exception as exc:  # a bug must not kill the daemon; it is recorded
            self._internal_error(m.rule, exc, run.common, "repair", counted=bool(run.applied))
            if not run.applied:
                return RepairEnd("none")
            # It had changed the node (stopped containerd, say): counted as a failed repair, so a
            # bug that the same fault trips each time cannot restart containerd in an endless loop.
            failure = f"internal error after {', '.join(run.applied)}: {exc!r}"
        if mode == "enforce" and failure is None and not run.applied and m.rule.action:
            return RepairEnd("nothing-to-do", None, run.common, self._ms(run.started))
        return RepairEnd("concluded", failure, run.common, self._ms(run.started))

    def _begin(self, m: Match, mode: Mode, retry: bool) -> Run:
        """The incident's first records: what was detected, and what is decided."""
        rule = m.rule
        now = self.ctx.clock.monotonic()
        started = now if retry else _event_time(m.event, now)  # a retry is timed from itself
        run = Run(
            rule, mode, {"RULE": rule.name, "MODE": mode, "INCIDENT": uuid.uuid4().hex[:12]}, started, m.event
        )
        self.ex.report(
            RecordKind.DETECTED,
            f"{rule.name}: {m.trigger}",
            **run.common,
            SOURCE=m.event.source,
            TRIGGER=m.trigger,
            PATH=_event_path(m.event),
            UNIT=_event_unit(m.event),
            DETAIL=rule.advice,
            ELAPSED_MS=self._ms(started),
        )
        if not rule.action:
            verb, decided = "report only: nodemedic has no safe repair for this", "report"
        elif mode == "enforce":
            verb, decided = "repairing", "repair"
        else:
            verb, decided = "observe mode: reporting what would be done", "observe"
        self.ex.report(RecordKind.DECIDED, f"{rule.name}: {verb}", **run.common, OUTCOME=decided)
        return run

    def _stop_respected(self, rule: Rule) -> bool:
        """Right before acting, every time: has an operator stopped the rule's unit (or is it masked)
        since the rule decided? (during the config check, or while waiting for the lock)"""
        said = self.ex.rules.stop_respected(rule)
        if said is None:
            return False
        self.ex.run(said)
        return True

    def _respected(self, rule: Rule, run: Run) -> RepairEnd:
        """An operator's stop (or a mask) came after the rule decided: not acted on, or not past it."""
        unit = run.halted or (rule.confirm.unit if rule.confirm else "") or ""
        done = f"; done before it: {', '.join(run.applied)}" if run.applied else "; nothing changed"
        message = f"{rule.name}: {unit} was stopped by someone else (or masked) meanwhile, not started{done}"
        self.ex.report(
            RecordKind.OUTCOME,
            message,
            **run.common,
            UNIT=unit,
            OUTCOME="operator-stop",
            ELAPSED_MS=self._ms(run.started),
        )
        return RepairEnd("none")

    def _gone(self, rule: Rule, run: Run) -> RepairEnd:
        message = f"{rule.name}: gone once the repair before it had finished; nothing to do, nothing changed"
        self.ex.report(
            RecordKind.OUTCOME,
            message,
            **run.common,
            OUTCOME="nothing-to-do",
            ELAPSED_MS=self._ms(run.started),
        )
        return RepairEnd("none")

    async def _still_there(self, rule: Rule) -> bool:
        """Asked again after waiting for another rule's repair (one fault often fires two rules: a
        directory at the socket path also fails the hang probe): that repair may have cured this one,
        and acting on the old verdict would restart a containerd that serves again."""
        if not self.ex.rules.conditions_met(rule, self.ex.now()):
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
        self.ex.report(RecordKind.ERROR, message, **common, OUTCOME="internal-error", DETAIL=repr(exc))

    # ---- the actions ----------------------------------------------------------------------------

    async def _actions(self, run: Run, first: int = 0) -> str | None:
        """Run the rule's actions in order (from ``first``, resuming a repair cut off); the first
        failure's message, or None. A failure after a stop starts the stopped units again:
        systemd's own Restart= is back in charge, and the node is no worse than before nodemedic
        acted. The repair record is removed once all that is over, not when cancelled."""
        failure: str | None = "interrupted"  # kept if _steps raises: a bug, or shutdown's cancel
        try:
            failure = await self._steps(run, first)
        finally:  # whatever ended the repair, nobody else would start the stopped units again
            if failure is not None and run.stopped:
                await self._compensate_bounded(run)
            if run.mode == "enforce":  # observe-mode repairs run beside an enforce one: not theirs
                self._clear_intent()
        return failure

    async def _steps(self, run: Run, first: int) -> str | None:
        ctx = dataclasses.replace(self.ctx, event=run.event)  # actions may need what fired the rule
        actions = run.rule.action if run.rule is not None else []
        for index, params in enumerate(actions[first:], first):
            action = build_action(params)
            fields = {**run.common, "ACTION": action.name}
            try:
                ctx = dataclasses.replace(ctx, changed=(*run.applied, *run.would))
                step = self._unless_stopped_meanwhile(run, await action.check(ctx))
                if isinstance(step, Skip):
                    self._say_skipped(run, fields, step)
                elif run.mode != "enforce":
                    self._say_would(run, fields, step)
                else:
                    self._before_apply(run, index, action.name, step)
                    done = await action.apply(ctx, step)
                    checked = await action.verify(ctx, step)
                    self._say_done(run, fields, step, done, checked)
                if run.halted:
                    return None
            except (NodemedicError, OSError) as exc:  # OSError: the file system said no
                self._say_failed(run, fields, f"{action.name} failed: {exc}", str(exc))
                return f"{action.name}: {exc}"
            except Exception as exc:  # a bug: recorded here, reported as one by _incident
                self._say_failed(
                    run, fields, f"{action.name} failed with an internal error: {exc!r}", repr(exc)
                )
                raise
        return None

    def _unless_stopped_meanwhile(self, run: Run, step: Step | Skip) -> Step | Skip:
        """A start or restart of a unit an operator stopped (or masked) during the repair is not
        made, and ends the repair: the unit is theirs until it runs again."""
        view = self.ex.view
        if isinstance(step, Skip) or run.mode != "enforce" or step.unit_effect not in ("starts", "restarts"):
            return step
        if step.unit not in (view.stopped_by_others | view.unstartable()) - set(run.stopped):
            return step
        run.halted = step.unit
        return Skip(f"{step.unit} was stopped by someone else during the repair: not started again")

    def _before_apply(self, run: Run, index: int, name: str, step: Step) -> None:
        """What a change needs before it is made: the record (a crash from here on is finished at
        the next start), our stop known as ours, the units down if it ends now."""
        if step.changes:
            self._note_intent(run, index, name, step)
        if step.unit_effect in ("stops", "restarts"):
            self.ex.view.stopping(step.unit)  # before the stop: its events follow at once
        if step.unit_effect == "stops":
            run.stopped.append(step.unit)
        if step.unit_effect == "starts" and step.unit in run.stopped:
            run.stopped.remove(step.unit)
        if step.changes:
            run.applied.append(name)

    def _say_skipped(self, run: Run, fields: dict[str, str], step: Skip) -> None:
        self.ex.report(
            RecordKind.ACTION,
            f"{fields['ACTION']}: nothing to do: {step.reason}",
            **fields,
            OUTCOME="skipped",
            DETAIL=step.reason,
            ELAPSED_MS=self._ms(run.started),
        )

    def _say_would(self, run: Run, fields: dict[str, str], step: Step) -> None:
        if step.changes:  # what follows only after a change (after_change) is said as it would be
            run.would.append(fields["ACTION"])
        where = {"UNIT": step.unit, "PATH": " ".join(step.paths)}
        message = f"would {step.summary}"
        self.ex.report(
            RecordKind.ACTION,
            message,
            **fields,
            **where,
            OUTCOME="would-do",
            ELAPSED_MS=self._ms(run.started),
        )

    def _say_done(self, run: Run, fields: dict[str, str], step: Step, done: str, checked: str) -> None:
        where = {"UNIT": step.unit, "PATH": " ".join(step.paths)}
        detail = "; ".join(d for d in (done, checked) if d)
        self.ex.report(
            RecordKind.ACTION,
            f"{step.summary}: done" + (f" ({detail})" if detail else ""),
            **fields,
            **where,
            OUTCOME="done",
            DETAIL=detail,
            ELAPSED_MS=self._ms(run.started),
        )

    def _say_failed(self, run: Run, fields: dict[str, str], message: str, detail: str) -> None:
        self.ex.report(
            RecordKind.ACTION,
            message,
            **fields,
            OUTCOME="failed",
            DETAIL=detail,
            ELAPSED_MS=self._ms(run.started),
        )

    # ---- compensation ---------------------------------------------------------------------------

    async def _compensate_bounded(self, run: Run) -> None:
        """Start the units again within COMPENSATE_TIMEOUT, also in a task being cancelled at
        shutdown: the starts run shielded, and a second cancel stops only the wait for them."""
        stopped = list(run.stopped)
        job = asyncio.ensure_future(self._compensate(stopped, run))
        self._compensating.add(job)
        job.add_done_callback(self._compensating.discard)
        try:
            await asyncio.wait_for(asyncio.shield(job), COMPENSATE_TIMEOUT)
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:  # not one class before 3.11
            if isinstance(exc, asyncio.TimeoutError):
                job.cancel()
            detail = f"{', '.join(stopped)} may still be stopped: starting again did not finish ({exc!r})"
            self.ex.report(
                RecordKind.ACTION,
                detail,
                **run.common,
                ACTION="compensate",
                UNIT=" ".join(stopped),
                OUTCOME="failed",
                DETAIL=detail,
                ELAPSED_MS=self._ms(run.started),
            )
            if isinstance(exc, asyncio.CancelledError):
                raise

    async def _compensate(self, stopped: list[str], run: Run) -> None:
        for unit in stopped:
            try:
                await self.ctx.units.start(unit, COMPENSATE_TIMEOUT)
            except Exception as exc:  # whatever it is, the next unit is still started
                outcome, detail = "failed", f"{unit} could not be started again: {exc}"
            else:
                outcome, detail = "done", f"{unit} started again after the failed repair"
            self.ex.report(
                RecordKind.ACTION,
                detail,
                **run.common,
                ACTION="compensate",
                UNIT=unit,
                OUTCOME=outcome,
                DETAIL=detail,
                ELAPSED_MS=self._ms(run.started),
            )

    # ---- the repair record, and finishing a repair cut off --------------------------------------

    def _load_intent(self) -> RepairIntent | None:
        """At start-up, before D-Bus says anything: the units a repair cut off had stopped are
        ours, not an operator's stop, and will be started again by ``recover``."""
        if self._intents is None:
            return None
        intent = self._intents.load()
        if self._intents.corrupt:
            message = (
                f"repair record unusable, moved to {self._intents.corrupt}; a repair cut off before "
                "this start cannot be finished: check containerd by hand"
            )
            self.ex.report(RecordKind.ERROR, message, OUTCOME="state-reset", PATH=self._intents.corrupt)
        if intent is not None:
            for unit in intent.stopped:
                self.ex.view.stopping(unit)
        return intent

    def _note_intent(self, run: Run, index: int, name: str, step: Step) -> None:
        """Say what is about to change, durably, before it does; best effort (a full disk never
        stops a repair: said once)."""
        if self._intents is None:
            return
        units = [*run.stopped]
        if step.unit_effect and step.unit not in units:
            units.append(step.unit)  # being stopped or started: down if we die now
        now = self.ctx.clock.wall()
        began = self._began.setdefault(run.common["INCIDENT"], now)
        intent = RepairIntent(
            incident=run.common["INCIDENT"],
            rule=run.common["RULE"],
            started_at=began,
            index=index,
            step=name,
            stopped=tuple(units),
            applied=tuple(run.applied),
            paths=step.paths,
            unit=step.unit,
            at=now,
            resumes=self._resumes,
        )
        self._save_intent(intent, run.common)

    def _save_intent(self, intent: RepairIntent, common: dict[str, str]) -> None:
        if self._intents is None:
            return
        try:
            self._intents.save(intent)
        except OSError as exc:
            if not self._intent_failing:
                self._intent_failing = True
                message = (
                    f"cannot record the repair under way ({exc}); it goes on, but if nodemedic dies "
                    "before it ends, nothing will finish it"
                )
                path = str(self._intents.path)
                self.ex.report(
                    RecordKind.ERROR, message, **common, OUTCOME="failed", PATH=path, DETAIL=str(exc)
                )
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
        self.ex.rules.hold(intent.rule)  # matches meanwhile wait, and are confirmed again afterwards
        self.ex.spawn(self._recover(intent))

    async def _recover(self, intent: RepairIntent) -> None:
        try:
            async with self.ex.lock:
                await self._finish(intent)
        except Exception as exc:  # a bug must not kill the daemon: the units are started by hand then
            self._internal_error_during_recovery(intent, exc)
        finally:
            self.ex.run(self.ex.rules.release(intent.rule, self.ex.now()))

    async def _finish(self, intent: RepairIntent) -> None:
        common = {"RULE": intent.rule, "MODE": "enforce", "INCIDENT": intent.incident}
        started = self.ctx.clock.monotonic()
        rule = self.ex.rules.rule(intent.rule)
        run = Run(rule, "enforce", common, started, None, list(intent.applied), list(intent.stopped))
        self._began[intent.incident] = intent.started_at
        self._say_interrupted(intent, run.common)
        resumable, why = self._resumable(intent)
        self._resumes = intent.resumes + 1
        self._save_intent(dataclasses.replace(intent, resumes=self._resumes), run.common)  # before any step
        if resumable:
            failure = await self._actions(run, intent.index)
        else:  # the rule changed meanwhile (or observe now): only undo, start what was stopped
            failure = f"{why}: the stopped units were started again"
            if intent.stopped:
                await self._compensate_bounded(run)
            self._clear_intent()
        if intent.step == "remove-socket-dir" and intent.resumes < MAX_RESUMES:  # the copy may be what kills
            await self._finish_quarantine(intent, run)
        outcome, said = ("recovered", "finished") if failure is None else ("compensated", "undone")
        message = f"{intent.rule}: the repair cut off by nodemedic's end was {said}"
        self.ex.report(
            RecordKind.OUTCOME,
            message,
            **run.common,
            OUTCOME=outcome,
            DETAIL=failure or "",
            ELAPSED_MS=self._ms(run.started),
        )

    def _say_interrupted(self, intent: RepairIntent, common: dict[str, str]) -> None:
        self.ex.report(
            RecordKind.ERROR,
            f"{intent.rule}: nodemedic was stopped in the middle of repair {intent.incident} "
            f"(during {intent.step}, begun {_when(intent.started_at)}); finishing it",
            **common,
            ACTION=intent.step,
            UNIT=" ".join(intent.stopped),
            PATH=" ".join(intent.paths),
            OUTCOME="interrupted",
        )

    def _resumable(self, intent: RepairIntent) -> tuple[bool, str]:
        """Whether the cut-off step can be run again from where it was, and why not."""
        rule = self.ex.rules.rule(intent.rule)
        resumable = (
            rule is not None
            and intent.index < len(rule.action)
            and rule.action[intent.index].do == intent.step
            and self.ex.policy.mode_of(rule) == "enforce"
        )
        if resumable and intent.resumes >= MAX_RESUMES:  # the step itself kills nodemedic (OOM, say)
            return False, f"cut off {intent.resumes + 1} times in {intent.step}: not resumed again"
        return resumable, "the rule's actions changed since"

    async def _finish_quarantine(self, intent: RepairIntent, run: Run) -> None:
        """A directory moved aside by the cut-off step goes into the quarantine as it would have."""
        rule = self.ex.rules.rule(intent.rule)
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
        self.ex.report(
            RecordKind.ACTION,
            f"finish-quarantine: {detail}",
            **run.common,
            ACTION="finish-quarantine",
            PATH=params.root,
            OUTCOME=outcome,
            DETAIL=detail,
            ELAPSED_MS=self._ms(run.started),
        )

    def _internal_error_during_recovery(self, intent: RepairIntent, exc: Exception) -> None:
        log.debug("recovery of %s failed", intent.incident, exc_info=exc)
        self.ex.report(
            RecordKind.ERROR,
            f"{intent.rule}: internal error while finishing repair {intent.incident} "
            f"(a nodemedic bug): {exc!r}; check that {' '.join(intent.stopped) or 'containerd'} runs",
            RULE=intent.rule,
            INCIDENT=intent.incident,
            OUTCOME="internal-error",
            DETAIL=repr(exc),
        )


def _holds(confirm: Confirm) -> bool:
    """The path part of the condition, looked at now (lstat, never following a symlink)."""
    return not confirm.paths or any(path_kind(p) == confirm.kind for p in confirm.paths)


def _when(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


def _event_time(event: Event, now: float) -> float:
    return event.at if 0 < event.at <= now else now


def _event_path(event: Event) -> str:
    """The path an event is about, whatever its type ("" if none)."""
    path = getattr(event, "path", "")
    return path if isinstance(path, str) else ""


def _event_unit(event: Event) -> str:
    """The unit an event is about, whatever its type ("" if none)."""
    unit = getattr(event, "unit", "")
    return unit if isinstance(unit, str) else ""
