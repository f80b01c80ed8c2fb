"""Pure matching of events against rules: no I/O, no clock.

What fires a trigger is the trigger's own business (``fires`` on each trigger model in
policy/model.py), so a new kind of trigger needs no change here."""

from __future__ import annotations

from dataclasses import dataclass

from nodemedic.events import Event
from nodemedic.policy.model import Rule, TriggerModel, in_states, known_bugs, version_tuple

__all__ = ["Match", "in_states", "known_bugs", "match", "match_trigger", "version_tuple"]


@dataclass(frozen=True, slots=True)
class Match:
    """A rule fired by an event, and a few words on what fired it."""

    rule: Rule
    event: Event
    trigger: str


def match(rules: list[Rule], event: Event) -> list[Match]:
    """The rules that ``event`` fires, each with what fired it (its first trigger that fires)."""
    out = []
    for rule in rules:
        for trig in rule.trigger:
            why = trig.fires(event)
            if why:
                out.append(Match(rule, event, why))
                break
    return out


def match_trigger(trig: TriggerModel, event: Event) -> str | None:
    """What fired, if ``trig`` fires on ``event``."""
    return trig.fires(event)
