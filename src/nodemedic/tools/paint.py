"""Colours for the operator's commands: one table and one rule for when to colour.

Colours only on a terminal, and never with NO_COLOR set and not empty (https://no-color.org).
Each tool names colours by what they mean to it; the codes are ANSI SGR parameters.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

CODES = {
    "bold": "1",
    "dim": "2",
    "red": "31",
    "bold-red": "31;1",
    "green": "32",
    "yellow": "33",
    "cyan": "36",
}
Paint = Callable[[str, str], str]


def wants_colour(stream: Any) -> bool:
    """Whether output to ``stream`` is coloured: a terminal, and NO_COLOR unset or empty."""
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR")


def painter(on: bool) -> Paint:
    """``paint(text, colour)``: ``text`` in ``colour`` (a name in CODES) when ``on``; an empty or
    unknown colour name leaves the text as it is."""

    def paint(text: str, colour: str) -> str:
        code = CODES.get(colour)
        return f"\033[{code}m{text}\033[0m" if on and code else text

    return paint
