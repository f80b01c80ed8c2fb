"""Pure matching of events against rules: no I/O, no clock."""

from __future__ import annotations

from dataclasses import dataclass

from nodemedic.events import Event, JournalLine, PathChanged, UnitChanged
from nodemedic.policy.model import JournalTrigger, PathTrigger, Rule, UnitTrigger


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


def _fires(trig: PathTrigger | JournalTrigger | UnitTrigger, event: Event) -> str | None:
    if isinstance(trig, PathTrigger) and isinstance(event, PathChanged):
        if event.path in trig.paths and event.kind == trig.kind:
            return f"{event.path} is a {event.kind.value}"
    elif isinstance(trig, JournalTrigger) and isinstance(event, JournalLine):
        if event.unit == trig.unit and trig.pattern.search(event.message):
            return f"journal: {event.message}"
    elif (
        isinstance(trig, UnitTrigger)
        and isinstance(event, UnitChanged)
        and (
            event.unit == trig.unit
            and (not trig.active_state or event.active_state in trig.active_state)
            and (not trig.sub_state or event.sub_state in trig.sub_state)
        )
    ):
        return f"{event.unit} is {event.active_state}/{event.sub_state}"
    return None
