"""What the SIGHUP guard and its two modes (coalesce, throttle) share: the world they may touch, as
Protocols, and the one door through which they report."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from nodemedic.actions.base import VersionProbe
from nodemedic.configs import GoodConfigs
from nodemedic.report import RecordKind

ACTION_ERRORS = (OSError, EOFError, RuntimeError, ValueError)  # NodemedicError subclasses these too


class GuardSystemd(Protocol):
    """What the guard needs from systemd (SystemdBus in the daemon)."""

    async def restart(self, unit: str, timeout: float) -> None: ...

    async def kill(self, unit: str, signal: int) -> None: ...

    async def exec_start(self, unit: str) -> list[list[str]]: ...

    async def daemon_reload(self) -> None: ...


class Freezing(Protocol):
    """What the guard needs from the freezer (sighup/freezer.py's Freezer)."""

    deny: list[str]

    def refusal(self, cgroup: str) -> str | None: ...

    def freeze(self, cgroup: str, until_wall: float) -> None: ...

    def frozen(self) -> dict[str, float]: ...

    def thaw_all(self) -> list[str]: ...

    def thaw_due(self, now_wall: float) -> list[str]: ...


@dataclass(frozen=True)
class GuardContext:
    systemd: GuardSystemd
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
