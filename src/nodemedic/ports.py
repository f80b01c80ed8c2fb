"""The seams: the Protocols through which the core, the executor and the actions touch the world.

The daemon passes the real parts (``clock.LoopClock``, ``sources.dbus.SystemdBus``,
``sources.probe.ContainerdProbe``, ``actions.freezer.Freezer``); unit tests pass fakes
(``tests/unit/fakes.py``). Nothing else is replaced in tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


class Timer(Protocol):
    """A callback armed with ``Clock.call_later``."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    """Time as nodemedic reads it: ``monotonic`` for intervals, ``wall`` for timestamps and the
    state files, and timers on the monotonic clock (a fake clock fires them when advanced)."""

    def monotonic(self) -> float: ...

    def wall(self) -> float: ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer: ...


@dataclass(frozen=True, slots=True)
class UnitState:
    load_state: str
    active_state: str
    sub_state: str

    @property
    def exists(self) -> bool:
        return self.load_state not in ("not-found", "masked")

    @property
    def down(self) -> bool:
        """Not running and not about to run by itself."""
        return self.active_state in ("inactive", "failed")


class UnitControl(Protocol):
    """systemd, as the actions see it (D-Bus in the daemon, a fake in unit tests)."""

    async def state(self, unit: str) -> UnitState: ...

    async def stop(self, unit: str, timeout: float) -> None: ...

    async def start(self, unit: str, timeout: float) -> None: ...

    async def restart(self, unit: str, timeout: float) -> None: ...

    async def kill(self, unit: str, signal: int) -> None:
        """Send ``signal`` to the unit's main process (systemd's KillUnit, whom="main")."""
        ...


class SystemdManager(UnitControl, Protocol):
    """What the SIGHUP drop-in actions need of systemd beyond unit jobs."""

    async def exec_start(self, unit: str) -> list[list[str]]: ...

    async def daemon_reload(self) -> None: ...


class VersionProbe(Protocol):
    """containerd's Version API over its socket."""

    async def version(self, socket: str, timeout: float) -> str: ...


class Freezing(Protocol):
    """The cgroup freezer (actions/freezer.py's Freezer): every call touches cgroupfs, so the
    executor runs them off the event loop."""

    deny: list[str]

    def refusal(self, cgroup: str) -> str | None: ...

    def freeze(self, cgroup: str, until_wall: float) -> None: ...

    def frozen(self) -> dict[str, float]: ...

    def thaw_all(self) -> list[str]: ...

    def thaw_due(self, now_wall: float) -> list[str]: ...
