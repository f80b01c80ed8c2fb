"""What every action needs: the world it may touch (as Protocols) and the shape of a step."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from nodemedic.configs import GoodConfigs
from nodemedic.events import Event
from nodemedic.ports import Clock, UnitControl, VersionProbe


@dataclass(frozen=True, slots=True)
class ActionContext:
    units: UnitControl
    probe: VersionProbe
    clock: Clock
    quarantine_dir: Path
    good_configs: GoodConfigs | None = None  # last-known-good copies of containerd's config
    event: Event | None = None  # what fired the rule (e.g. the journal line naming left-over PIDs)
    changed: tuple[str, ...] = ()  # the actions of this repair that changed something so far


@dataclass(frozen=True, slots=True)
class Step:
    """What an action is about to do (or would do), found by its read-only check."""

    summary: str
    unit: str = ""
    paths: tuple[str, ...] = ()
    detail: str = ""
    data: dict[str, str] = field(default_factory=dict)
    changes: bool = True  # False for a step that only looks (verify-containerd)
    # What it does to ``unit``, so the executor knows without knowing the action: "stops" (started
    # again if the repair fails after it), "restarts" (down for a moment: our stop, not an
    # operator's), "starts" (no longer ours to start again), "" (nothing).
    unit_effect: Literal["", "stops", "starts", "restarts"] = ""


@dataclass(frozen=True, slots=True)
class Skip:
    """The check found nothing to do, and says why."""

    reason: str


class Action(Protocol):
    """check (read-only) -> apply -> verify. Observe mode runs check only."""

    name: str

    async def check(self, ctx: ActionContext) -> Step | Skip: ...

    async def apply(self, ctx: ActionContext, step: Step) -> str:
        """Do it; return a short detail for the record (e.g. where a path was moved)."""
        ...

    async def verify(self, ctx: ActionContext, step: Step) -> str:
        """Raise RepairFailedError if the intended state did not come about; else a short detail."""
        ...
