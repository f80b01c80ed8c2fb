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
    loc = [part for part in err["loc"] if not _is_union_tag(part)]
    where = _key_path(loc, data)
    msg = str(err["msg"])
    if err["type"] == "union_tag_invalid":
        ctx = err.get("ctx", {})
        msg = (
            f"unknown {ctx.get('discriminator', 'kind')} {ctx.get('tag')}; known: {ctx.get('expected_tags')}"
        )
    elif err["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"{where}: {msg}" if where else msg


def _is_union_tag(part: object) -> bool:
    # pydantic puts the discriminator's value into the location ("remove-socket-dir"); the
    # TOML key path does not have it.
    return isinstance(part, str) and "-" in part


def _key_path(loc: list[object], data: dict[str, object]) -> str:
    parts: list[str] = []
    node: object = data
    for part in loc:
        if isinstance(part, int):
            label = parts.pop() if parts else ""
            name = (
                node[part].get("name")
                if isinstance(node, list) and part < len(node) and isinstance(node[part], dict)
                else None
            )
            parts.append(f"{label}[{part}]" + (f" ({name!r})" if name else ""))
            node = node[part] if isinstance(node, list) and part < len(node) else None
        else:
            parts.append(str(part))
            node = node.get(part) if isinstance(node, dict) else None
    return ".".join(parts)
