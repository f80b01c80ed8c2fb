"""Exponential backoff: a pure state machine driven by the caller's clock readings.

The readings are wall-clock times (the state is persisted across restarts and reboots), so the
machine must bear the clock jumping: see ``_anchored``."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(slots=True)
class Backoff:
    """Delay after the n-th consecutive failure: initial * factor**(n-1), at most ``maximum``.

    ``jitter`` (0..1) spreads retries of many nodes: the delay is scaled by a factor drawn from
    [1 - jitter, 1]. ``rng`` is injectable so tests are deterministic.
    """

    initial: float
    factor: float = 2.0
    maximum: float = 300.0
    jitter: float = 0.0
    failures: int = 0
    not_before: float = 0.0
    rng: random.Random | None = None

    def delay(self, failures: int) -> float:
        base = self.longest(failures)
        if self.jitter and failures > 0:
            draw = (self.rng or random).random()
            base *= 1.0 - self.jitter * draw
        return base

    def failed(self, now: float) -> float:
        """Record a failure at ``now``; returns the delay before the next attempt."""
        self.failures += 1
        wait = self.delay(self.failures)
        self.not_before = now + wait
        return wait

    def succeeded(self) -> None:
        self.failures = 0
        self.not_before = 0.0

    def ready(self, now: float) -> bool:
        return now >= self._anchored(now)

    def remaining(self, now: float) -> float:
        return max(0.0, self._anchored(now) - now)

    def longest(self, failures: int) -> float:
        """The delay after ``failures`` failures before jitter shrinks it: the longest wait there is."""
        if failures <= 0:
            return 0.0
        try:
            return min(self.maximum, self.initial * self.factor ** (failures - 1))
        except OverflowError:  # float ** int past 1.8e308: a long run of failures, or a crafted state file
            return self.maximum

    def _anchored(self, now: float) -> float:
        """``not_before``, but never more than one full delay after ``now``: the wall clock set back
        (NTP stepping, a hand, a wrong RTC at boot) would otherwise hold the rule for as long
        again as the clock went back. A clock set forward ends the wait early: one attempt, and
        a failure waits longer again (the budget and the breaker bound the rest)."""
        self.not_before = min(self.not_before, now + self.longest(self.failures))
        return self.not_before
