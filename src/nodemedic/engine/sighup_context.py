"""What the SIGHUP guard and its two modes (coalesce, throttle) share: the world they may touch, as
Protocols, and the one door through which they report."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from nodemedic.configs import GoodConfigs
from nodemedic.ports import Freezing, SystemdManager, VersionProbe
from nodemedic.report import RecordKind

ACTION_ERRORS = (OSError, EOFError, RuntimeError, ValueError)  # NodemedicError subclasses these too


@dataclass(frozen=True)
class GuardContext:
    systemd: SystemdManager
    probe: VersionProbe
    probe_socket: str
    probe_timeout: float
    config: Path
    good: GoodConfigs
    freezer: Freezing
    state_file: Path
    exclusive: Callable[[], AbstractAsyncContextManager[object]]  # the runner's repair lock
    closing: Callable[[], bool]  # nodemedic is stopping: start nothing
    dropin_root: Path = Path("/")
    proc: Path = Path("/proc")


class Say(Protocol):
    """Writes one of the guard's records (NODEMEDIC_RULE=sighup, the mode and the incident added)."""

    def __call__(self, kind: RecordKind, message: str, **fields: object) -> None: ...
