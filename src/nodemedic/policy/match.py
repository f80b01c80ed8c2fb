"""Pure matching of events against rules: no I/O, no clock."""

from __future__ import annotations

from dataclasses import dataclass

from nodemedic.events import Event, JournalLine, PathChanged, ProbeFailed, SignalSeen, UnitChanged
from nodemedic.policy.model import (
    JournalTrigger,
    PathTrigger,
    ProbeTrigger,
    Rule,
    SignalTrigger,
    Trigger,
    UnitTrigger,
)


@dataclass(frozen=True, slots=True)
class Match:
    """A rule fired by an event, and a few words on what fired it."""

    rule: Rule
    event: Event
    trigger: str


def match(rules: list[Rule], event: Event) -> list[Match]:
    out = []
    for rule in rules:
        for trig in rule.trigger:
            why = _fires(trig, event)
            if why:
                out.append(Match(rule, event, why))
                break
    return out


def _fires(trig: Trigger, event: Event) -> str | None:
    if isinstance(trig, PathTrigger) and isinstance(event, PathChanged):
        return _path(trig, event)
    if isinstance(trig, JournalTrigger) and isinstance(event, JournalLine):
        return _journal(trig, event)
    if isinstance(trig, UnitTrigger) and isinstance(event, UnitChanged):
        return _unit(trig, event)
    if isinstance(trig, ProbeTrigger) and isinstance(event, ProbeFailed):
        return _probe(trig, event)
    if isinstance(trig, SignalTrigger) and isinstance(event, SignalSeen):
        return _signal(trig, event)
    return None


def _path(trig: PathTrigger, event: PathChanged) -> str | None:
    if event.path in trig.paths and event.kind == trig.kind:
        return f"{event.path} is a {event.kind.value}"
    return None


def _journal(trig: JournalTrigger, event: JournalLine) -> str | None:
    if event.unit == trig.unit and trig.pattern.search(event.message):
        return f"journal: {event.message}"
    return None


def in_states(seen: UnitChanged, active_state: list[str], sub_state: list[str]) -> bool:
    """A unit's state against wanted ActiveState and SubState values (an empty list means any)."""
    return (not active_state or seen.active_state in active_state) and (
        not sub_state or seen.sub_state in sub_state
    )


def _unit(trig: UnitTrigger, event: UnitChanged) -> str | None:
    if event.unit == trig.unit and in_states(event, trig.active_state, trig.sub_state):
        return f"{event.unit} is {event.active_state}/{event.sub_state}"
    return None


def _probe(trig: ProbeTrigger, event: ProbeFailed) -> str | None:
    if event.consecutive >= trig.failures:
        return f"containerd did not answer {event.consecutive} requests in a row: {event.error}"
    return None


def _signal(trig: SignalTrigger, event: SignalSeen) -> str | None:
    if event.unit == trig.unit and event.signal == trig.signal:
        return f"{event.unit}'s main process {event.target_pid} was killed by signal {event.signal}"
    return None
