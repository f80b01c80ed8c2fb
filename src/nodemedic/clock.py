"""The clock the engine reads. Tests pass a fake; the daemon passes MonotonicClock."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def wall(self) -> float: ...


class MonotonicClock:
    """The real clock: time.monotonic for intervals, time.time for timestamps."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()
