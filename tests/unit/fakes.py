"""Fakes for the edges: the clock, systemd, containerd's Version API."""

from __future__ import annotations

from collections.abc import Callable

from nodemedic.errors import ProbeError, UnitControlError
from nodemedic.ports import UnitState


class FakeTimer:
    """A callback armed on the fake clock: it fires when the test says so (``FakeClock.run_due``)."""

    def __init__(self, due: float, delay: float, callback: Callable[[], None]) -> None:
        self.due, self.delay, self.callback = due, delay, callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """Time that moves only when a test moves it; timers fire only when it runs them."""

    def __init__(self, start: float = 1000.0, tick: float = 0.0) -> None:
        self.now = start
        self.tick = tick  # time that passes at each reading: for code that waits on a deadline
        self.timers: list[FakeTimer] = []  # armed, not fired yet

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(self.now + delay, delay, callback)
        self.timers.append(timer)
        return timer

    def run_due(self) -> int:
        """Fire every timer due by now (and those they arm that are due too); how many fired."""
        fired = 0
        while True:
            due = sorted((t for t in self.timers if t.due <= self.now), key=lambda t: t.due)
            if not due:
                return fired
            for timer in due:
                self.timers.remove(timer)
                if not timer.cancelled:
                    fired += 1
                    timer.callback()

    def monotonic(self) -> float:
        self.now += self.tick
        return self.now

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeUnits:
    """systemd as the actions see it; records every call."""

    def __init__(self, states: dict[str, str] | None = None) -> None:
        self.active = dict(states or {"containerd.service": "activating", "kubelet.service": "active"})
        self.calls: list[tuple[str, str]] = []
        self.fail: set[tuple[str, str]] = set()
        self.on_start: Callable[[str], None] = lambda unit: None

    async def state(self, unit: str) -> UnitState:
        if unit not in self.active:
            return UnitState("not-found", "inactive", "dead")
        active = self.active[unit]
        sub = {"active": "running", "activating": "auto-restart"}.get(active, "dead")
        return UnitState("loaded", active, sub)

    async def _job(self, verb: str, unit: str, result: str) -> None:
        self.calls.append((verb, unit))
        if (verb, unit) in self.fail:
            raise UnitControlError(f"{verb} {unit}: systemd job result 'failed'")
        self.active[unit] = result

    async def stop(self, unit: str, timeout: float) -> None:
        await self._job("stop", unit, "inactive")

    async def start(self, unit: str, timeout: float) -> None:
        await self._job("start", unit, "active")
        self.on_start(unit)

    async def kill(self, unit: str, signal: int) -> None:
        self.calls.append((f"kill -{signal}", unit))

    async def restart(self, unit: str, timeout: float) -> None:
        await self._job("restart", unit, "active")


class FakeProbe:
    def __init__(self, answers: bool = True) -> None:
        self.answers = answers
        self.calls = 0

    async def version(self, socket: str, timeout: float) -> str:
        self.calls += 1
        if not self.answers:
            raise ProbeError("containerd Version: UNAVAILABLE")
        return "1.6.20"
