"""What the core asks for. The core never acts: it returns these, and the executor does them.

Every effect is a frozen dataclass; the executor picks its handler by type (``Executor.handlers``),
so a new kind of effect is one class here (or beside the core that returns it) and one handler.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nodemedic.policy.match import Match
from nodemedic.policy.model import Mode, Rule
from nodemedic.report import RecordKind


@dataclass(frozen=True, slots=True)
class Instant:
    """A moment as the core sees it: the monotonic reading (intervals) and the wall clock (state files,
    breakers and backoff, which must survive a restart)."""

    monotonic: float
    wall: float


class Effect:
    """Base of everything the core returns."""

    __slots__ = ()


Effects = list[Effect]


@dataclass(frozen=True, slots=True)
class Report(Effect):
    """Write one journald record (report.py checks the field names)."""

    kind: RecordKind
    message: str
    fields: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Repair(Effect):
    """Confirm ``match`` against the node, then run its rule's actions (observe: say what they would
    do). The executor reports the end to ``RuleCore.finished``."""

    match: Match
    mode: Mode
    retry: bool = False


@dataclass(frozen=True, slots=True)
class Later(Effect):
    """Call ``then`` after ``delay`` seconds (a retry after a backoff, a breaker's cool-down, a
    deadline) and do what it returns."""

    delay: float
    then: Callable[[Instant], Effects]
    what: str = ""  # for the debug log


@dataclass(frozen=True, slots=True)
class Settle(Later):
    """A ``Later`` that waits for a written file to stay unchanged (a file trigger's ``settle``):
    whoever judges the node as it is now (``nodemedic diagnose``) may run ``then`` at once."""


@dataclass(frozen=True, slots=True)
class SaveState(Effect):
    """Write ``state.json`` (breakers, backoff, budget)."""

    data: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class LookAgain(Effect):
    """After an operator's reset: look at ``rule``'s watched paths now, and decide again on what is
    found there (a fault still present is acted on at once, not at its next event)."""

    rule: Rule
