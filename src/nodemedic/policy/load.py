"""Read and validate a policy file; every problem is reported at once, with its line and key path."""

from __future__ import annotations

import contextlib
import os
import re
import stat
import sys
from bisect import bisect_right
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from nodemedic.errors import PolicyError
from nodemedic.policy.model import DaemonSettings, Policy

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_POLICY = Path("/etc/nodemedic/policy.toml")
MAX_POLICY_BYTES = 1 << 20
"""The largest policy file read (the shipped one is about 23 KiB)."""
MAX_NESTING = 16
"""The deepest nesting of tables and arrays (the shipped policy needs 7)."""
_INT64 = range(-(2**63), 2**63)  # TOML's integers; a bigger one would overflow where it is used
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
        raw = _read_regular_file(path)
    except FileNotFoundError as exc:
        raise PolicyError(str(path), ["file not found"]) from exc
    except OSError as exc:
        raise PolicyError(str(path), [f"cannot read: {exc}"]) from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        byte = raw[exc.start : exc.start + 1].hex()
        raise PolicyError(
            str(path), [f"{line}: not UTF-8 text (byte 0x{byte}): save the file as UTF-8"]
        ) from exc


def _read_regular_file(path: Path) -> bytes:
    """At most `MAX_POLICY_BYTES` of a regular file. Non-blocking, so a FIFO at the path cannot hang
    a reload or the ExecStopPost thaw; symlinks are followed (a linked policy is supported: whether
    its folder is safe is `check_permissions`' business)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise PolicyError(str(path), [f"{kind} (mode {mode:o}): give the path of a policy file"])
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_POLICY_BYTES:
                raise PolicyError(str(path), [f"larger than {MAX_POLICY_BYTES >> 10} KiB: not a policy file"])
        return b"".join(chunks)
    finally:
        os.close(fd)


def salvage_state_dir(path: Path) -> Path | None:
    """``[daemon].state_dir`` of a policy that does not load as a whole (a broken rule, say), so
    that ``nodemedic thaw`` finds the cgroups it froze; None where even that cannot be read. The
    file must still pass `check_permissions`: its state_dir decides what is thawed."""
    try:
        data = _parse_toml(read_policy_text(path), str(path))
        daemon = data.get("daemon")
        if _shape_problem(data, {}) or not isinstance(daemon, dict) or "state_dir" not in daemon:
            return None
        return DaemonSettings.model_validate({"state_dir": daemon["state_dir"]}).state_dir
    except (PolicyError, ValidationError):
        return None


def check_permissions(path: Path) -> None:
    """Refuse a policy that anyone but root could change: nodemedic runs its actions as root.

    The file (symlinks followed) and the directories holding it must be owned by root and not
    writable by group or others; so must every folder on the way to it, through every symlink
    (`_unsafe_lookups`)."""
    real = Path(os.path.realpath(path))  # unlike resolve(), no RuntimeError on a symlink loop
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
    problems += _unsafe_lookups(path, set(targets))
    if problems:
        raise PolicyError(str(path), problems)


MAX_LINKS = 40  # as the kernel's path walk (ELOOP)


def _lookups(path: Path) -> list[tuple[Path, str]]:
    """Every (folder, name) looked up on the way to ``path``, symlinks followed one at a time."""
    folder, seen, links = Path("/"), [], 0
    pending = list(reversed((path if path.is_absolute() else Path.cwd() / path).parts[1:]))
    while pending:
        name = pending.pop()
        if name in ("", "."):
            continue
        if name == "..":
            folder = folder.parent
            continue
        seen.append((folder, name))
        entry = folder / name
        if not entry.is_symlink():
            folder = entry
            continue
        links += 1
        if links > MAX_LINKS:
            raise PolicyError(str(path), [f"more than {MAX_LINKS} symbolic links on the way: a loop?"])
        target = Path(os.readlink(entry))
        if target.is_absolute():
            folder = Path("/")
        pending.extend(reversed(target.parts[1:] if target.is_absolute() else target.parts))
    return seen


def _unsafe_lookups(path: Path, checked: set[Path]) -> list[str]:
    """Folders on the way to the policy (through every symlink) in which someone but root could
    swap the next name: a policy linked to ``/tmp/x/policy.toml``, or through a link that a user
    owns in /tmp, is only as safe as each of them. A sticky folder (/tmp) is fine for names that
    root owns there: nobody else may rename or remove them."""
    problems = []
    for folder, name in _lookups(path):
        if folder in checked:
            continue
        st = folder.stat()
        if st.st_uid != 0:
            problems.append(
                f"directory {folder} on the way to the policy is owned by uid {st.st_uid}, not "
                f"root: anyone who owns it could swap {folder / name}"
            )
        elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            if st.st_mode & stat.S_ISVTX and os.lstat(folder / name).st_uid == 0:
                continue
            problems.append(
                f"directory {folder} on the way to the policy is writable by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}): anyone could swap {folder / name}; "
                "keep the policy and its links in root's folders"
            )
        checked.add(folder)
    return problems


def parse_policy_text(text: str, origin: str = "<policy>") -> Policy:
    """Parse TOML ``text`` and validate it; each problem starts with its line (``57: ...``)."""
    data = _parse_toml(text, origin)
    lines = key_lines(text)
    if problem := _shape_problem(data, lines):
        raise PolicyError(origin, [problem])
    return _validate(data, origin, lines)


def _parse_toml(text: str, origin: str) -> dict[str, Any]:
    if problem := _structure_problem(text):
        raise PolicyError(origin, [problem])
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        where = _TOML_LINE.search(str(exc))
        prefix = f"{where.group(1) if where else text.count(chr(10)) + 1}: "  # else: at end of document
        raise PolicyError(origin, [f"{prefix}not valid TOML: {exc}"]) from exc
    except ValueError as exc:  # int(): more digits than sys.get_int_max_str_digits()
        limit = sys.get_int_max_str_digits()
        digits = re.search(rf"[0-9_]{{{limit + 1},}}", text)
        at = text.count("\n", 0, digits.start()) + 1 if digits else 1
        raise PolicyError(
            origin, [f"{at}: a number with more than {limit} digits: not a policy value"]
        ) from exc


def parse_policy(data: dict[str, object], origin: str = "<policy>") -> Policy:
    """Validate already parsed TOML (no lines known)."""
    if problem := _shape_problem(data, {}):
        raise PolicyError(origin, [problem])
    return _validate(data, origin, {})


def _validate(data: dict[str, object], origin: str, lines: dict[KeyPath, int]) -> Policy:
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        found = [_describe(err, data, lines) for err in exc.errors()]
        found.sort(key=lambda problem: problem[0] or 0)
        raise PolicyError(origin, [f"{line}: {msg}" if line else msg for line, msg in found]) from exc
    except (ArithmeticError, LookupError, TypeError, ValueError, RecursionError) as exc:
        # A validator that let a non-ValueError through is nodemedic's bug; the policy still
        # cannot be used, and callers (reload, thaw) only ever have PolicyError to handle.
        problem = f"cannot be validated ({type(exc).__name__}: {exc}): a bug in nodemedic, please report it"
        raise PolicyError(origin, [problem]) from exc


def _shape_problem(data: dict[str, Any], lines: dict[KeyPath, int]) -> str | None:
    """What no policy has, checked before pydantic (which recurses): nesting deeper than
    `MAX_NESTING` and integers outside TOML's 64 bits. Iterative, so any depth is safe."""
    stack: list[tuple[KeyPath, object]] = [((), data)]
    while stack:
        key, node = stack.pop()
        if len(key) > MAX_NESTING:
            return _at(key, lines, f"nested more than {MAX_NESTING} deep: a policy needs no such depth")
        if isinstance(node, int) and not isinstance(node, bool) and node not in _INT64:
            return _at(key, lines, "integer out of TOML's 64-bit range: write a smaller number")
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        stack.extend(((*key, k), v) for k, v in items)
    return None


def _at(key: KeyPath, lines: dict[KeyPath, int], msg: str) -> str:
    line = _line_of(key, lines)
    where = ".".join(str(k) for k in key[:MAX_NESTING])
    return f"{line}: {where}: {msg}" if line else f"{where}: {msg}"


# An unterminated string is one token to the end of its line (or of the text, for a multi-line
# one): were the closing quote required, each quote of `x = "\"\"\"...` would start a fresh scan to
# the end of the line, quadratic in the line (32 KB took 7 s: a reload past WatchdogSec=).
_TOKEN = re.compile(
    r'"""(?:[^\\]|\\.)*?(?:""""{0,2}|\Z)'
    r"|'''.*?(?:''''{0,2}|\Z)"  # multi-line strings (2 more quotes may close them)
    r'|"(?:[^"\\\n]|\\.)*"?'
    r"|'[^'\n]*'?|#[^\n]*"  # one-line strings, comments
    r"|[A-Za-z0-9_:+-]+|[ \t\r]+|\n|.",  # bare words (keys, numbers, dates), blanks, the rest
    re.DOTALL,
)


def _structure_problem(text: str) -> str | None:
    """Brackets nested, or a key dotted, deeper than `MAX_NESTING`, found in one linear pass before
    tomllib sees the text: it recurses on brackets, and its memory grows with the square of a
    key's parts (a 20,000-part key takes 1.5 GB)."""
    depth = parts = 0
    line = 1
    in_value = dot = False
    for match in _TOKEN.finditer(text):
        tok = match.group()
        if tok[0] in "\"'" or tok[0].isalnum() or tok[0] in "_-":
            parts, dot = (parts + 1 if dot else 1), False
        elif tok == ".":
            dot = parts > 0
        elif not tok.isspace() or tok == "\n":
            parts = 0
        if tok in "[{" and (in_value or depth):
            depth += 1
        elif tok in "]}" and depth:
            depth -= 1
        elif tok == "=" and not depth:
            in_value = True
        if depth > MAX_NESTING or parts > MAX_NESTING:
            what = "arrays or inline tables nested" if depth > MAX_NESTING else "a key of dotted parts"
            return f"{line}: {what} more than {MAX_NESTING} deep: a policy needs no such depth"
        line += tok.count("\n")
        in_value = in_value and not (tok == "\n" and not depth)
    return None


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
    line = _line_of(key, lines) if key else _whole_policy_line(msg, data, lines)
    return line, (f"{where}: {msg}" if where else msg)


def _whole_policy_line(msg: str, data: dict[str, object], lines: dict[KeyPath, int]) -> int | None:
    """The line of a check across the whole policy (unique names, watched units): the rule named
    first in ``msg`` (a repeated name: its second rule), else the first ``[table].key`` it names."""
    rules = data.get("rule")
    names = [r.get("name") if isinstance(r, dict) else None for r in rules] if isinstance(rules, list) else []
    key: KeyPath = ("daemon", "watch_units")
    if (repeated := re.search(r"repeated: ([a-z0-9-]+)", msg)) and names.count(repeated.group(1)) > 1:
        key = ("rule", [i for i, n in enumerate(names) if n == repeated.group(1)][1])
    elif (rule := re.search(r"rule '([a-z0-9-]+)'", msg)) and rule.group(1) in names:
        key = ("rule", names.index(rule.group(1)), "name")
    elif table := re.search(r"\[([a-z_.]+)\]\.([a-z_]+)", msg):
        key = (*table.group(1).split("."), table.group(2))
    return _line_of(key, lines)


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
    after_index = False
    for part in loc:
        if after_index and isinstance(node, dict) and part in (node.get("do"), node.get("source")):
            after_index = False
            continue  # pydantic names the union member chosen by its tag (source = "signal" too)
        after_index = isinstance(part, int)
        if isinstance(part, int) and isinstance(node, list) and part < len(node):
            node = node[part]
            name = node.get("name") if isinstance(node, dict) else None
            label = f"{parts.pop() if parts else ''}[{part}]"
            parts.append(label + (f" ({name!r})" if isinstance(name, str) else ""))
        elif isinstance(node, dict) and part in node:
            node = node[part]
            parts.append(str(part))
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
    # lines are a help, never in the way of problems
    with contextlib.suppress(IndexError, ValueError, RecursionError):
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
