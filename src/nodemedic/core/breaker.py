"""Circuit breaker per rule: a pure state machine on wall-clock times given by the caller.

closed --N failures within window--> open --cooldown passed--> half-open (one trial)
half-open --success--> closed;  half-open --failure--> open;  reset() --> closed.
Wall-clock times, because the state is persisted and must survive a reboot; a clock set back is
borne by ``_clamp``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"
HISTORY = 10


@dataclass(slots=True)
class Attempt:
    at: float
    ok: bool
    detail: str = ""


@dataclass(slots=True)
class CircuitBreaker:
    failures: int
    window: float
    cooldown: float
    state: str = CLOSED
    opened_at: float = 0.0
    recent_failures: list[float] = field(default_factory=list)
    history: list[Attempt] = field(default_factory=list)

    def allow(self, now: float) -> bool:
        """May a repair be attempted now? An open breaker turns half-open after its cooldown."""
        self._clamp(now)
        if self.state == OPEN and now >= self.opened_at + self.cooldown:
            self.state = HALF_OPEN
        return self.state != OPEN

    def succeeded(self, now: float, detail: str = "") -> None:
        self._remember(Attempt(now, True, detail))
        self.state = CLOSED
        self.recent_failures.clear()

    def failed(self, now: float, detail: str = "") -> bool:
        """Record a failed repair; True if this failure opened the breaker."""
        self._clamp(now)
        self._remember(Attempt(now, False, detail))
        self.recent_failures = [t for t in self.recent_failures if t > now - self.window] + [now]
        if self.state == HALF_OPEN or len(self.recent_failures) >= self.failures:
            self.state = OPEN
            self.opened_at = now
            return True
        return False

    def _clamp(self, now: float) -> None:
        """Times after ``now`` mean the wall clock was set back: they count as ``now``, so an open
        breaker stays open at most one full cooldown after the jump is seen (not cooldown plus
        however far the clock went back), and a failure window ends at most a window from now.
        A clock set forward ends the cooldown early: half-open, one trial, then open again."""
        if self.opened_at > now:
            self.opened_at = now
        self.recent_failures = [min(t, now) for t in self.recent_failures]

    def reset(self) -> None:
        self.state = CLOSED
        self.opened_at = 0.0
        self.recent_failures.clear()

    def reopens_at(self) -> float:
        return self.opened_at + self.cooldown

    def _remember(self, attempt: Attempt) -> None:
        self.history = [*self.history, attempt][-HISTORY:]

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "opened_at": self.opened_at,
            "recent_failures": self.recent_failures,
            "history": [[a.at, a.ok, a.detail] for a in self.history],
        }

    def restore(self, data: dict[str, Any]) -> None:
        state = data.get("state", CLOSED)
        self.state = state if state in (CLOSED, OPEN, HALF_OPEN) else CLOSED
        self.opened_at = float(data.get("opened_at", 0.0))
        self.recent_failures = [float(t) for t in data.get("recent_failures", [])]
        self.history = [Attempt(float(a), bool(b), str(c)) for a, b, c in data.get("history", [])]
