"""Policy regular expressions, compiled with RE2 so that matching takes time linear in the line.

A journal line is written by whoever can reach journald, and Python's backtracking ``re`` takes
quadratic (or exponential) time on some patterns: ``containerd\\.sock\\S*: connect`` took 35 s on
one 400 KiB line, longer than the daemon's WatchdogSec, while a repair may be under way. RE2 runs
every pattern in one pass over the text (no backreferences, no lookarounds: a pattern that needs
them is refused when the policy loads). Only the first ``MESSAGE_LIMIT`` characters are searched.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import re2  # type: ignore[import-untyped]  # google-re2 ships no type information
from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema

log = logging.getLogger(__name__)
_GROUP = "nodemedic_any_"  # the names of the groups that check a join (see `_alternation`)
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
    rule (the patterns as alternatives of one RE2 pattern; each one's flags stay its own). Where
    joining them would not keep each pattern whole (see `_alternation`), or is past RE2's program
    size, each is searched on its own, as the rules do, and the log says so once."""

    __slots__ = ("_compiled", "joined")

    def __init__(self, patterns: Iterable[Regex]) -> None:
        unique = sorted({p.pattern for p in patterns})
        combined = _alternation(unique) if unique else None
        self.joined = combined is not None or not unique  # False: one search per pattern
        if combined is not None:
            self._compiled = [combined]
        else:
            self._compiled = [re2.compile(p, _options()) for p in unique]
        if not self.joined:
            log.warning(
                "the %d journal patterns could not be joined into one RE2 pattern: the journal "
                "filter searches each on its own (%d searches a line)",
                len(unique),
                len(unique),
            )

    def search(self, data: bytes) -> bool:
        """``data``: the first MESSAGE_LIMIT characters of a line, UTF-8 (what Regex.search searches)."""
        return any(c.search(data) is not None for c in self._compiled)


def _alternation(patterns: list[str]) -> Any | None:
    """``(?:p1)|(?:p2)|...`` compiled, or None where that would not mean "p1 or p2 or ...".

    A pattern's text can reach past the group put around it: RE2 lets ``\\Q`` quote to the end
    of the pattern, so ``\\Qa`` would quote the ``)|(?:`` after it and the next pattern too (the
    lines both want refused). Such a trailing ``\\Q`` is closed with ``\\E`` (which RE2 accepts
    only inside a quote); and the join is checked: each pattern in a named group must get the
    group number its own groups give it, which it cannot if any text of the join became literal."""
    closed = [_closed(p) for p in patterns]
    expected, number = {}, 1
    for n, pattern in enumerate(closed):
        expected[f"{_GROUP}{n}"] = number
        number += 1 + re2.compile(pattern, _options()).groups
    try:
        named = re2.compile("|".join(f"(?P<{_GROUP}{n}>{p})" for n, p in enumerate(closed)), _options())
        combined = re2.compile("|".join(f"(?:{p})" for p in closed), _options())
    except re2.error:  # past RE2's program size, or a group name taken
        return None
    ours = {name: at for name, at in named.groupindex.items() if name.startswith(_GROUP)}
    if ours != expected or combined.groups != number - 1 - len(closed):
        return None
    return combined


def _closed(pattern: str) -> str:
    """``pattern`` with a ``\\Q`` left open at its end closed (same meaning: it quotes to the end)."""
    try:
        re2.compile(pattern + "\\E", _options())
    except re2.error:  # a \E outside a quote is an error in RE2: there is no open \Q
        return pattern
    return pattern + "\\E"


def _validate(value: object) -> Regex:
    if isinstance(value, Regex):
        return value
    if not isinstance(value, str):
        raise ValueError(f"a pattern is a string, not {type(value).__name__}")
    return Regex(value)
