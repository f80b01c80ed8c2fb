"""Exponential backoff: a pure state machine driven by the caller's clock readings."""

from __future__ import annotations

import math
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
        if failures <= 0:
            return 0.0
        try:
            grown = self.initial * self.factor ** (failures - 1)
        except OverflowError:  # float ** int past 1.8e308: a long run of failures, or a crafted state file
            grown = math.inf
        base = min(self.maximum, grown)
        if self.jitter:
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
        return now >= self.not_before

    def remaining(self, now: float) -> float:
        return max(0.0, self.not_before - now)
