"""Signals written by name ("SIGHUP", "HUP") or number in the policy."""

from __future__ import annotations

import signal as signals
from typing import Annotated

from pydantic import BeforeValidator


def signal_number(value: object) -> int:
    """A signal given by name ("SIGHUP", "HUP") or number."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65:
        return value
    if isinstance(value, str):
        name = value.upper() if value.upper().startswith("SIG") else "SIG" + value.upper()
        if name in signals.Signals.__members__:
            return int(signals.Signals[name])
    raise ValueError(f'{value!r} is not a signal; write e.g. "SIGHUP" or 1')


Signal = Annotated[int, BeforeValidator(signal_number)]
