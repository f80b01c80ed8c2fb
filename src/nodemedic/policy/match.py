"""Pure matching of events against rules: no I/O, no clock.

What fires a trigger is the trigger's own business (``fires`` on each trigger model in
policy/model.py), so a new kind of trigger needs no change here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from nodemedic.events import Event
from nodemedic.policy.model import JournalTrigger, Rule, TriggerModel, in_states, known_bugs, version_tuple
from nodemedic.policy.patterns import AnyPattern

__all__ = [
    "Match",
    "in_states",
    "journal_filter",
    "known_bugs",
    "match",
    "match_trigger",
    "version_tuple",
]


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


def journal_filter(rules: list[Rule]) -> Callable[[bytes], bool]:
    """Whether a journal line's MESSAGE (its first MESSAGE_LIMIT characters, UTF-8) may fire one of
    ``rules``: one search for every journal trigger's pattern. A line it refuses fires none, so the
    journal source need not make an event of it."""
    patterns = [t.pattern for r in rules for t in r.trigger if isinstance(t, JournalTrigger)]
    return AnyPattern(patterns).search
