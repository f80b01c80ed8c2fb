"""The real clock (``ports.Clock``): time.monotonic for intervals, time.time for timestamps, and
timers on the running event loop. Tests pass ``tests/unit/fakes.FakeClock`` instead."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from nodemedic.ports import Timer


class MonotonicClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_later(delay, callback)
