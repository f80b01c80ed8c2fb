"""Edits of a policy's TOML text that keep every comment and the layout (tomlkit)."""

from __future__ import annotations

from typing import Any

import tomlkit
from tomlkit.items import AoT, Array, InlineTable, Table

from nodemedic.errors import UnknownRuleError

__all__ = ["UnknownRuleError", "set_mode"]
from nodemedic.policy.model import Mode


def set_mode(text: str, mode: Mode, rule: str | None = None) -> str:
    """``text`` with ``mode`` set in ``[daemon]``, or in the ``[[rule]]`` named ``rule``.

    Only that one value changes; a rule without its own ``mode`` gets one after its ``name`` and
    ``description``. The result is not validated: that is the caller's job (``parse_policy_text``).
    """
    doc = tomlkit.parse(text)
    if rule is None:
        if "daemon" not in doc:
            doc.append("daemon", tomlkit.table())
        _set_key(doc["daemon"], "mode", mode)
    else:
        _set_key(_find_rule(doc, rule), "mode", mode)
    return doc.as_string()


def _find_rule(doc: tomlkit.TOMLDocument, name: str) -> Table | InlineTable:
    rules = doc.get("rule")
    tables = (
        [r for r in rules if isinstance(r, (Table, InlineTable))] if isinstance(rules, (AoT, Array)) else []
    )
    for table in tables:
        if table.get("name") == name:
            return table
    known = ", ".join(repr(str(t.get("name"))) for t in tables) or "none"
    raise UnknownRuleError(f"no rule named {name!r}; the policy's rules: {known}")


def _set_key(table: Any, key: str, value: str) -> None:
    if key in table or not isinstance(table, (Table, InlineTable)):
        table[key] = value  # tomlkit keeps the line's indent and trailing comment
        return
    after = next((k for k in ("description", "name") if k in table), None)
    if after is None:
        table.append(key, value)
    else:
        # Right after name/description, not after the comment that introduces the next sub-table.
        table.value._insert_after(after, key, tomlkit.item(value))
