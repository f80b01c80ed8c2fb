"""The record of a repair under way, so that one cut off (SIGKILL, OOM, watchdog) is finished.

Written (atomic, fsynced with its folder) before each step of a repair that changes the node, and
removed when the repair has concluded, compensation included. A record found at start-up means
nodemedic died mid-repair: it says which units the repair had stopped (so containerd stopped by
nodemedic is not taken for an operator's stop), which step was under way and what had changed.
An unreadable record is moved aside, never deleted, and reported, as ``state.json`` is.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nodemedic.state import SetAside, atomic_write, fsync_directory, load_checked

INTENT_FILE = "repair.json"
VERSION = 1


@dataclass(frozen=True, slots=True)
class RepairIntent:
    """One repair under way: enough to finish it, or to undo what it did, after a crash."""

    incident: str
    rule: str
    started_at: float  # wall clock
    index: int  # the position in the rule's actions of the step under way
    step: str  # that step's action name, checked against the rule at recovery
    stopped: tuple[str, ...] = ()  # units the repair stopped (or is starting) and not yet running again
    applied: tuple[str, ...] = ()  # the actions that had changed something (for after_change)
    paths: tuple[str, ...] = ()  # the paths the step under way concerns
    unit: str = ""
    at: float = field(default=0.0)  # wall clock of this record
    resumes: int = 0  # how often a start-up has resumed it already (a step that kills nodemedic)

    def to_json(self) -> str:
        return json.dumps({"version": VERSION, **asdict(self)}, indent=1, sort_keys=True) + "\n"


class IntentStore:
    """``repair.json`` under the state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / INTENT_FILE
        self.corrupt = ""  # where an unusable record was moved, for the start-up record

    def save(self, intent: RepairIntent) -> None:
        """Raises OSError (full, read-only): the caller decides; a repair goes on without it."""
        atomic_write(self.path, intent.to_json())

    def clear(self) -> None:
        """The repair concluded: nothing to finish after a crash."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return
        fsync_directory(self.path.parent)

    def load(self) -> RepairIntent | None:
        """The unfinished repair, or None. A record that cannot be read is moved aside."""
        return load_checked(self.path, _parse_text, self._noted)

    def _noted(self, aside: SetAside) -> None:
        self.corrupt = aside.kept_as  # the runner's start-up record says it


def _parse_text(text: str) -> RepairIntent:
    return _parse(json.loads(text))


def _parse(data: Any) -> RepairIntent:
    """Every field checked for its type: a record half-understood could start the wrong unit."""
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise ValueError(f"not a nodemedic repair record of version {VERSION}")
    texts = {k: data[k] for k in ("incident", "rule", "step", "unit")}
    lists = {k: data[k] for k in ("stopped", "applied", "paths")}
    numbers = {k: data[k] for k in ("started_at", "at")}
    if not all(isinstance(v, str) for v in texts.values()):
        raise ValueError("incident, rule, step and unit must be strings")
    if not all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in lists.values()):
        raise ValueError("stopped, applied and paths must be lists of strings")
    index, resumes = data["index"], data.get("resumes", 0)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (index, resumes)):
        raise ValueError("index and resumes must be non-negative integers")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in numbers.values()):
        raise ValueError("started_at and at must be numbers")
    try:  # an integer past float's range would raise OverflowError, which no loader expects
        times = {k: float(v) for k, v in numbers.items()}
    except OverflowError as exc:
        raise ValueError("started_at and at must be times") from exc
    if not all(math.isfinite(v) for v in times.values()):
        raise ValueError("started_at and at must be finite")
    return RepairIntent(
        incident=texts["incident"],
        rule=texts["rule"],
        started_at=times["started_at"],
        index=index,
        step=texts["step"],
        stopped=tuple(lists["stopped"]),
        applied=tuple(lists["applied"]),
        paths=tuple(lists["paths"]),
        unit=texts["unit"],
        at=times["at"],
        resumes=resumes,
    )
