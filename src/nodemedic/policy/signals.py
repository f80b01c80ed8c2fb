"""Signals written by name ("SIGHUP", "HUP") or number in the policy.

Only the standard signals (1-31 on Linux) are accepted. Real-time signals are refused: glibc keeps
32 and 33 for its threads, SIGRTMIN is 34 under glibc but 35 under musl, Python names none of them
but SIGRTMIN and SIGRTMAX (so a record could not name one), and nothing nodemedic watches or sends
(containerd's SIGHUP death, SIGUSR1 for a stack dump, SIGTERM, SIGKILL) is one of them.
"""

from __future__ import annotations

import signal as signals
from typing import Annotated

from pydantic import BeforeValidator

_RT_FIRST = int(getattr(signals, "SIGRTMIN", 32))
# aliases too (SIGIOT, SIGPOLL, SIGCLD): __members__ lists them
STANDARD = {name: int(s) for name, s in signals.Signals.__members__.items() if 0 < s < _RT_FIRST}


def signal_number(value: object) -> int:
    """A standard signal given by name ("SIGHUP", "HUP") or number."""
    if isinstance(value, int) and not isinstance(value, bool) and value in STANDARD.values():
        return value
    if isinstance(value, str):
        name = value.upper() if value.upper().startswith("SIG") else "SIG" + value.upper()
        if name in STANDARD:
            return STANDARD[name]
    shown = "a number that long" if isinstance(value, int) and value.bit_length() > 64 else repr(value)
    shown = shown if len(shown) <= 40 else f"{shown[:37]}..."
    raise ValueError(
        f'{shown} is not a signal nodemedic can use; write a name such as "SIGHUP" or a number '
        f"1-{max(STANDARD.values())} (real-time signals are refused)"
    )


Signal = Annotated[int, BeforeValidator(signal_number)]
