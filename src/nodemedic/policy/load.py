"""Read and validate a policy file; every problem is reported at once, with its line and key path."""

from __future__ import annotations

import contextlib
import re
import stat
import sys
from bisect import bisect_right
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
_TOML_LINE = re.compile(r"\(at line (\d+), column \d+\)")

KeyPath = tuple[str | int, ...]


def load_policy(path: Path, *, check_owner: bool = True) -> Policy:
    """Read, check and validate ``path``. ``check_owner=False`` skips `check_permissions`."""
    return parse_policy_text(read_policy_text(path, check_owner=check_owner), str(path))


def read_policy_text(path: Path, *, check_owner: bool = True) -> str:
    """The text of the policy at ``path``, after `check_permissions` unless ``check_owner`` is False."""
    try:
        if check_owner:
            check_permissions(path)
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise PolicyError(str(path), ["file not found"]) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(str(path), [f"cannot read: {exc}"]) from exc


def check_permissions(path: Path) -> None:
    """Refuse a policy that anyone but root could change: nodemedic runs its actions as root.

    The file (symlinks followed) and the directories holding it must be owned by root and not
    writable by group or others."""
    real = path.resolve()
    targets = dict.fromkeys([path, path.parent, real.parent])
    problems = []
    for target in targets:
        st = target.stat()
        what = "" if target == path else f"directory {target} is "
        if st.st_uid != 0:
            problems.append(f"{what}owned by uid {st.st_uid}, not root: run `chown root {target}`")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            mode = f"{stat.S_IMODE(st.st_mode):04o}"
            problems.append(f"{what}writable by group or others (mode {mode}): run `chmod go-w {target}`")
    if problems:
        raise PolicyError(str(path), problems)


def parse_policy_text(text: str, origin: str = "<policy>") -> Policy:
    """Parse TOML ``text`` and validate it; each problem starts with its line (``57: ...``)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = _TOML_LINE.search(str(exc))
        prefix = f"{line.group(1)}: " if line else ""
        raise PolicyError(origin, [f"{prefix}not valid TOML: {exc}"]) from exc
    return _validate(data, origin, text)


def parse_policy(data: dict[str, object], origin: str = "<policy>") -> Policy:
    """Validate already parsed TOML (no lines known)."""
    return _validate(data, origin, None)


def _validate(data: dict[str, object], origin: str, text: str | None) -> Policy:
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        lines = key_lines(text) if text is not None else {}
        found = [_describe(err, data, lines) for err in exc.errors()]
        found.sort(key=lambda problem: problem[0] or 0)
        raise PolicyError(origin, [f"{line}: {msg}" if line else msg for line, msg in found]) from exc


def _describe(err: Any, data: dict[str, object], lines: dict[KeyPath, int]) -> tuple[int | None, str]:
    loc = list(err["loc"])
    msg = str(err["msg"])
    ctx = err.get("ctx", {})
    disc = str(ctx.get("discriminator", "")).strip("'")
    if err["type"] == "union_tag_invalid":
        loc.append(disc)  # the tag's own key, so the line is the one to fix
        msg = f"unknown {_TAG_NAMES.get(disc, 'kind')} {ctx.get('tag')!r}; known: {ctx.get('expected_tags')}"
    elif err["type"] == "union_tag_not_found":
        msg = f"missing key {disc!r}, which names the {_TAG_NAMES.get(disc, 'kind')}"
    elif err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")  # our validators' own messages say it all
    where, key = _key_path(loc, data)
    return _line_of(key, lines), (f"{where}: {msg}" if where else msg)


def _line_of(key: KeyPath, lines: dict[KeyPath, int]) -> int | None:
    """The line of ``key``, or of the nearest enclosing key or table (a key that is missing)."""
    for end in range(len(key), 0, -1):
        if key[:end] in lines:
            return lines[key[:end]]
    return None


def _key_path(loc: list[object], data: dict[str, object]) -> tuple[str, KeyPath]:
    """pydantic's error location as a TOML key path, for people and for `key_lines`:
    ``rule[0] ('socket-dir').action[2].timeout`` and ``("rule", 0, "action", 2, "timeout")``."""
    parts: list[str] = []
    key: list[str | int] = []
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
        key.append(part if isinstance(part, int) else str(part))
    return ".".join(parts), tuple(key)


def key_lines(text: str) -> dict[KeyPath, int]:
    """Where each table, key and array element of a valid TOML ``text`` is first defined (1-based).

    Keys are full paths with array-of-tables indexes: ``("rule", 0, "action", 1, "do")``. tomlkit keeps
    the layout but not positions, so this is a small scanner; tomllib has already checked the syntax.
    """
    scanner = _KeyScanner(text)
    with contextlib.suppress(IndexError, ValueError):  # lines are a help, never in the way of problems
        scanner.scan()
    return scanner.lines


class _KeyScanner:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.newlines = [m.start() for m in re.finditer("\n", text)]
        self.lines: dict[KeyPath, int] = {}
        self.aot_counts: dict[KeyPath, int] = {}

    def scan(self) -> None:
        table: KeyPath = ()
        while self._skip_blank(newlines=True):
            line = self._line()
            if self.s[self.i] == "[":
                table = self._header(line)
            else:
                key = table + self._key()
                self._record(key, line)
                self._expect("=")
                self._value(key)

    def _header(self, line: int) -> KeyPath:
        aot = self.s.startswith("[[", self.i)
        self.i += 2 if aot else 1
        names = self._key()
        self.i += 2 if aot else 1
        path: KeyPath = ()
        for n, name in enumerate(names):
            path = (*path, name)
            if aot and n == len(names) - 1:
                index = self.aot_counts.get(path, 0)
                self.aot_counts[path] = index + 1
                path = (*path, index)
            elif path in self.aot_counts:
                path = (*path, self.aot_counts[path] - 1)  # the latest [[table]] of that name
        self._record(path, line)
        return path

    def _key(self) -> KeyPath:
        names: list[str] = []
        while True:
            self._skip_blank()
            start = self.i
            if self.s[start] in "\"'":
                self._string()
                names.append(tomllib.loads(f"k = {self.s[start : self.i]}")["k"])
            else:
                while self.i < len(self.s) and (self.s[self.i].isalnum() or self.s[self.i] in "_-"):
                    self.i += 1
                names.append(self.s[start : self.i])
            self._skip_blank()
            if not self.s.startswith(".", self.i):
                return tuple(names)
            self.i += 1

    def _value(self, key: KeyPath) -> None:
        self._skip_blank()
        c = self.s[self.i]
        if c in "\"'":
            self._string()
        elif c == "[":
            self._array(key)
        elif c == "{":
            self._inline_table(key)
        else:  # number, boolean, date: no quotes, brackets or comment signs inside
            while self.i < len(self.s) and self.s[self.i] not in ",]}#\n":
                self.i += 1

    def _array(self, key: KeyPath) -> None:
        self.i += 1
        index = 0
        while self._skip_blank(newlines=True) and self.s[self.i] != "]":
            start = self.i
            self._record((*key, index), self._line())
            self._value((*key, index))
            self._skip_blank(newlines=True)
            if self.s.startswith(",", self.i):
                self.i += 1
            index += 1
            self._progressed(start)
        self.i += 1

    def _inline_table(self, key: KeyPath) -> None:
        self.i += 1
        while self._skip_blank(newlines=True) and self.s[self.i] != "}":
            start = self.i
            item = key + self._key()
            self._record(item, self._line())
            self._expect("=")
            self._value(item)
            self._skip_blank(newlines=True)
            if self.s.startswith(",", self.i):
                self.i += 1
            self._progressed(start)
        self.i += 1

    def _string(self) -> None:
        quote = self.s[self.i]
        delim = quote * 3 if self.s.startswith(quote * 3, self.i) else quote
        self.i += len(delim)
        while not self.s.startswith(delim, self.i):
            if self.i >= len(self.s):
                raise IndexError("unterminated string")  # tomllib would have refused it
            self.i += 2 if quote == '"' and self.s[self.i] == "\\" else 1
        self.i += len(delim)
        while len(delim) == 3 and self.s.startswith(quote, self.i):
            self.i += 1  # up to two quotes may close a multi-line string: """a "quoted" b"""""

    def _skip_blank(self, *, newlines: bool = False) -> bool:
        """Skip spaces (and newlines and comments if ``newlines``); False at the end of the text."""
        stops = " \t\r\n" if newlines else " \t"
        while self.i < len(self.s):
            if self.s[self.i] in stops:
                self.i += 1
            elif newlines and self.s[self.i] == "#":
                end = self.s.find("\n", self.i)
                self.i = len(self.s) if end < 0 else end
            else:
                return True
        return False

    def _expect(self, char: str) -> None:
        self._skip_blank()
        self.i += len(char)

    def _progressed(self, start: int) -> None:
        if self.i <= start:
            raise IndexError("policy scanner stuck")  # only on text that tomllib would refuse

    def _record(self, key: KeyPath, line: int) -> None:
        for end in range(1, len(key) + 1):
            self.lines.setdefault(key[:end], line)

    def _line(self) -> int:
        return bisect_right(self.newlines, self.i - 1) + 1
