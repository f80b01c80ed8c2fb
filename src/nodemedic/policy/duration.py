"""Durations written as in systemd and Kubernetes: "500ms", "30s", "5m", "1h"."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")


def parse_duration(value: object) -> float:
    """Seconds from "30s"-style text; a bare number is seconds."""
    if isinstance(value, bool):
        raise ValueError('a duration is text such as "30s", "5m" or "500ms"')
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError(f'{value!r} is not a duration; write e.g. "500ms", "30s", "5m", "1h"')
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
