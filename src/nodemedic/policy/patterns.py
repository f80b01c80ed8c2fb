"""Policy regular expressions, compiled with RE2 so that matching takes time linear in the line.

A journal line is written by whoever can reach journald, and Python's backtracking ``re`` takes
quadratic (or exponential) time on some patterns: ``containerd\\.sock\\S*: connect`` took 35 s on
one 400 KiB line, longer than the daemon's WatchdogSec, while a repair may be under way. RE2 runs
every pattern in one pass over the text (no backreferences, no lookarounds: a pattern that needs
them is refused when the policy loads). Only the first ``MESSAGE_LIMIT`` characters are searched.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import re2  # type: ignore[import-untyped]  # google-re2 ships no type information
from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema

# The lines rules look for (containerd's, systemd's, the kernel's) are well under 1 KiB; journald
# takes entries up to 32 MiB from any local client. Searching only the start bounds the cost of a
# line for every rule, and what a rule reports of it (the source cuts MESSAGE there too).
MESSAGE_LIMIT = 8192


def _options() -> Any:
    options = re2.Options()
    options.log_errors = False  # RE2 would print its compile errors on stderr; they go in PolicyError
    return options


class Regex:
    """A compiled policy pattern: ``search`` says whether it occurs in the first MESSAGE_LIMIT chars."""

    __slots__ = ("_compiled", "pattern")

    def __init__(self, pattern: str) -> None:
        try:
            self._compiled = re2.compile(pattern, _options())
        except re2.error as exc:
            raise ValueError(
                f"{pattern!r} is not a pattern RE2 accepts ({exc}); RE2 has no backreferences "
                "(\\1) or lookarounds ((?=...), (?<!...)): write the pattern without them"
            ) from None
        self.pattern = pattern

    def search(self, text: str) -> bool:
        # As bytes: RE2 works on UTF-8, and a lone surrogate must not make encoding fail.
        data = text[:MESSAGE_LIMIT].encode("utf-8", "replace")
        return self._compiled.search(data) is not None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Regex) and other.pattern == self.pattern

    def __hash__(self) -> int:
        return hash(self.pattern)

    def __repr__(self) -> str:
        return f"Regex({self.pattern!r})"

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            _validate, serialization=core_schema.plain_serializer_function_ser_schema(lambda r: r.pattern)
        )


class AnyPattern:
    """Whether any of several policy patterns occurs in a line, in one RE2 pass over it: the
    journal source's filter, so that a line no rule looks for costs one search instead of one per
    rule (the patterns as alternatives of one RE2 pattern; each one's flags stay its own)."""

    __slots__ = ("_compiled",)

    def __init__(self, patterns: Iterable[Regex]) -> None:
        unique = sorted({p.pattern for p in patterns})
        try:
            self._compiled = [re2.compile("|".join(f"(?:{p})" for p in unique), _options())] if unique else []
        except re2.error:  # together past RE2's program size: each on its own, as the rules do
            self._compiled = [re2.compile(p, _options()) for p in unique]

    def search(self, data: bytes) -> bool:
        """``data``: the first MESSAGE_LIMIT characters of a line, UTF-8 (what Regex.search searches)."""
        return any(c.search(data) is not None for c in self._compiled)


def _validate(value: object) -> Regex:
    if isinstance(value, Regex):
        return value
    if not isinstance(value, str):
        raise ValueError(f"a pattern is a string, not {type(value).__name__}")
    return Regex(value)
