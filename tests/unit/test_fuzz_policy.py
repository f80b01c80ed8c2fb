"""Property tests of the policy loader on mutations of the shipped policy (issue 11, finding 6).

Byte flips, deleted, duplicated and inserted lines, values swapped for NaN, infinities, huge or
negative numbers, deep nesting, relative paths and real-time signals, and truncation. Whatever the
mutation, loading gives a Policy or a PolicyError whose every problem starts with its line, and
``nodemedic check`` exits 0 or 1 without a traceback.
"""

from __future__ import annotations

import contextlib
import io
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodemedic import cli
from nodemedic.errors import PolicyError
from nodemedic.policy.load import load_policy
from nodemedic.policy.model import Policy

pytestmark = pytest.mark.unit
SHIPPED = (Path(__file__).parents[2] / "policy" / "policy.toml").read_bytes()
LINES = SHIPPED.splitlines(keepends=True)
ASSIGNMENT = re.compile(rb"^(\s*[A-Za-z0-9_.\"-]+\s*=\s*)(.*?)(\s*(?:#.*)?)$", re.DOTALL)
ASSIGNED = [n for n, line in enumerate(LINES) if ASSIGNMENT.match(line)]
WITH_LINE = re.compile(r"^\d+: ")

NASTY = [
    b"nan", b"+nan", b"-nan", b"inf", b"-inf", b"1e400", b"-1", b"-1.5", b"0", b"0.0", b'"0ms"',
    b'"-5s"', b'"1ms"', b'"99999h"', b"9" * 5000, b"-" + b"9" * 5000, b"0x" + b"f" * 40,
    b"18446744073709551616", b"-9223372036854775809", b"9223372036854775807", b"1e308",
    b"[" * 2000 + b"]" * 2000, b"[" * 17 + b"]" * 17, b"{ a = " * 40 + b"1" + b" }" * 40,
    b'"relative/path"', b'"/a/../b"', b'"/a//b"', b'"/a/"', b'"/"', b'"/x\\u0000y"', b'""',
    b'"' + b"x" * 10_000 + b'"', b"true", b"[]", b"{}", b"1979-05-27T07:32:00Z", b"32", b"64",
    b'"SIGRTMIN"', b'"SIGFOO"', b'"\\xff"', b"'''", b'"""', b"[1, [2, [3]]]", b'{ do = "x" }',
]  # fmt: skip


@st.composite
def mutated_policies(draw: st.DrawFn) -> bytes:
    lines = list(LINES)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(
            st.sampled_from(["replace", "replace", "delete", "duplicate", "insert", "flip", "truncate"])
        )
        at = draw(st.integers(0, len(lines) - 1)) if lines else 0
        if op == "replace":
            at = draw(st.sampled_from(ASSIGNED))
            if at < len(lines) and (m := ASSIGNMENT.match(lines[at])):
                lines[at] = m.group(1) + draw(st.sampled_from(NASTY)) + b"\n"
        elif op == "delete" and lines:
            del lines[at]
        elif op == "duplicate" and lines:
            lines.insert(at, lines[at])
        elif op == "insert":
            lines.insert(at, draw(st.sampled_from(NASTY)) + b"\n")
        elif op == "flip" and lines and lines[at]:
            line = bytearray(lines[at])
            line[draw(st.integers(0, len(line) - 1))] = draw(st.integers(0, 255))
            lines[at] = bytes(line)
        elif op == "truncate":
            lines = [*lines[:at], lines[at][: draw(st.integers(0, len(lines[at])))]] if lines else []
    return b"".join(lines)


@contextlib.contextmanager
def policy_file() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder) / "policy.toml"


def assert_loads_or_names_lines(path: Path) -> None:
    try:
        policy: Policy | None = load_policy(path, check_owner=False)
    except PolicyError as exc:
        policy, problems = None, exc.problems
    if policy is None:
        assert problems, "a PolicyError with no problem"
        unplaced = [p for p in problems if not WITH_LINE.match(p)]
        assert not unplaced, f"problems without a line: {unplaced}"
    else:
        assert isinstance(policy, Policy)


@given(mutated_policies())
def test_a_mutated_policy_loads_or_every_problem_names_its_line(text: bytes) -> None:
    with policy_file() as path:
        path.write_bytes(text)
        assert_loads_or_names_lines(path)


@given(mutated_policies())
def test_check_on_a_mutated_policy_exits_0_or_1_without_a_traceback(text: bytes) -> None:
    with policy_file() as path:
        path.write_bytes(text)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = cli.main(["check", "--ignore-owner", str(path)])
        assert status in (0, 1)
        assert "Traceback" not in err.getvalue()
        if status == 1:
            assert re.search(rf"^{re.escape(str(path))}:\d+: ", err.getvalue(), re.MULTILINE), err.getvalue()


def test_the_mutations_reach_the_nasty_values() -> None:
    """The strategy's replace really rewrites values (the regex finds the shipped assignments)."""
    assert len(ASSIGNED) > 100
    assert all(LINES[n].strip() for n in ASSIGNED)
