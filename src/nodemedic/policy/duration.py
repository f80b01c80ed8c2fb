"""Durations written as in systemd and Kubernetes: "500ms", "30s", "5m", "1h".

Every duration is finite and at most `MAX_DURATION` (30 days): NaN compares false with everything,
so a NaN window would switch a budget off and a NaN interval would make a loop spin; infinity or a
huge number overflows the clock arithmetic. Three kinds, by what 0 would mean:
`Duration` (0 allowed: no wait), `PositiveDuration` (timeouts, windows: 0 would fail at once or
count nothing), `Interval` (periodic loops: at least `MIN_INTERVAL`, or the loop only burns CPU).
"""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^\s*(\d{1,15}(?:\.\d{1,15})?)\s*(ms|s|m|h)\s*$")
MAX_DURATION = 30 * 24 * 3600.0
"""The longest duration any policy field takes: 30 days (``"720h"``)."""
MIN_INTERVAL = 0.1
"""The shortest period of a periodic loop (a probe, a reading): 100 ms."""


def parse_duration(value: object) -> float:
    """Seconds from "30s"-style text; a bare number is seconds. Finite, 0 to `MAX_DURATION`."""
    if isinstance(value, bool):
        raise ValueError('a duration is text such as "30s", "5m" or "500ms"')
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f'{value} is not a duration: write a finite time such as "30s" or "5m"')
        seconds = float(max(-1, min(value, MAX_DURATION * 2)))  # a huge int would overflow float()
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError(f'{_short(value)} is not a duration; write e.g. "500ms", "30s", "5m", "1h"')
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if seconds > MAX_DURATION:
        raise ValueError(f'{_short(value)} is longer than the longest duration allowed, 30 days ("720h")')
    return seconds


def _positive(seconds: float) -> float:
    if seconds <= 0:
        raise ValueError('this duration must be longer than 0 (0 would fail or count at once): e.g. "30s"')
    return seconds


def _interval(seconds: float) -> float:
    if seconds < MIN_INTERVAL:
        raise ValueError(
            f"an interval must be at least {MIN_INTERVAL * 1000:.0f}ms: a loop that wakes more "
            "often only spends CPU"
        )
    return seconds


def _short(value: object) -> str:
    if isinstance(value, int) and value.bit_length() > 64:
        return "a number that long"  # repr() of a 4,301-digit int raises ValueError
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


# parse_duration first in each: the policy reference (reference.py) knows a duration by it
Duration = Annotated[float, BeforeValidator(parse_duration)]
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_positive)]
Interval = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_interval)]
