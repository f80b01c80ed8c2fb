"""Read and validate a policy file; every problem is reported at once, with its key path."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from nodemedic.errors import PolicyError
from nodemedic.policy.model import Policy

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_POLICY = Path("/etc/nodemedic/policy.toml")
_TAG_NAMES = {"do": "action", "source": "trigger source"}


def load_policy(path: Path) -> Policy:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise PolicyError(str(path), ["file not found"]) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(str(path), [f"cannot read: {exc}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(str(path), [f"not valid TOML: {exc}"]) from exc
    return parse_policy(data, str(path))


def parse_policy(data: dict[str, object], origin: str = "<policy>") -> Policy:
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(origin, [_describe(err, data) for err in exc.errors()]) from exc


def _describe(err: Any, data: dict[str, object]) -> str:
    where = _key_path(list(err["loc"]), data)
    msg = str(err["msg"])
    if err["type"] == "union_tag_invalid":
        ctx = err.get("ctx", {})
        kind = _TAG_NAMES.get(str(ctx.get("discriminator", "")).strip("'"), "kind")
        msg = f"unknown {kind} {ctx.get('tag')!r}; known: {ctx.get('expected_tags')}"
    elif err["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"{where}: {msg}" if where else msg


def _key_path(loc: list[object], data: dict[str, object]) -> str:
    """pydantic's error location as a TOML key path: rule[0] ('socket-dir').action[2].timeout"""
    parts: list[str] = []
    node: object = data
    for part in loc:
        if isinstance(part, int) and isinstance(node, list) and part < len(node):
            node = node[part]
            name = node.get("name") if isinstance(node, dict) else None
            label = f"{parts.pop() if parts else ''}[{part}]"
            parts.append(label + (f" ({name!r})" if isinstance(name, str) else ""))
        elif isinstance(node, dict) and part in node:
            node = node[part]
            parts.append(str(part))
        elif isinstance(node, dict) and part in (node.get("do"), node.get("source")):
            continue  # pydantic names the union member chosen by its tag; TOML has no such key
        else:
            parts.append(str(part))
            node = None
    return ".".join(parts)
