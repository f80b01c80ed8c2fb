"""The global repair budget: at most N repairs within a sliding window, across all rules. Pure."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RepairBudget:
    """At most ``repairs`` restarts within any ``window`` seconds of wall time (``spent``: when)."""

    repairs: int
    window: float
    spent: list[float] = field(default_factory=list)

    def allow(self, now: float) -> bool:
        self._forget(now)
        return len(self.spent) < self.repairs

    def remaining(self, now: float) -> int:
        """Repairs ``allow`` would let through now, without forgetting anything (a reader's view:
        the metrics and status ask, only the executor's spend and allow change the budget)."""
        spent = sum(1 for t in self.spent if t > now - self.window)  # as _forget keeps them
        return max(0, self.repairs - spent)

    def spend(self, now: float) -> None:
        self._forget(now)
        self.spent.append(now)

    def _forget(self, now: float) -> None:
        # A repair "after now" means the wall clock was set back: it counts as spent now, so the
        # window ends at most one window after the jump is seen, not that plus the jump. A clock
        # set forward forgets what was spent: at most ``repairs`` more, never more at once.
        self.spent = [min(t, now) for t in self.spent if t > now - self.window]
