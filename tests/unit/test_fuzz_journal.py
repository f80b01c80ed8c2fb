"""Property tests: journal entries -> JournalFollower._line -> match -> rules.

Entries as a hostile local client (or a broken journal file) can shape them: binary, huge and
invalid UTF-8 MESSAGE fields, repeated fields (lists), fields missing, and UNIT= forged by a process
that is not PID 1. journald sets the ``_``-fields itself, so ``_TRANSPORT`` cannot be forged, but
it can be missing. Nothing may raise, a forged UNIT never yields a containerd.service line, and
matching stays fast whatever the line.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodemedic.events import JournalLine
from nodemedic.policy.load import load_policy
from nodemedic.policy.match import match
from nodemedic.sources.journal import KERNEL, MESSAGE_LIMIT, JournalFollower

from .fakes import FakeClock

pytestmark = pytest.mark.unit
ROOT = Path(__file__).parents[2]
POLICY = load_policy(ROOT / "policy" / "policy.toml", check_owner=False)
UNITS = ["containerd.service", "kubelet.service", KERNEL]
CONTAINERD = "containerd.service"

# Texts the shipped patterns look for, so that generated lines come near them.
FRAGMENTS = [
    "containerd: failed to get listener for main endpoint: is a directory",
    'time="2026-11-23T01:02:54.985572671Z" level=error msg="x" error="',
    "context deadline exceeded",
    "ttrpc: closed",
    '\\"',
    '"',
    "Found left-over process 68 (containerd-shim) in control group while starting unit.",
    "containerd.sock",
    'avc:  denied  { connectto } for  pid=1 comm="x" path="',
    'apparmor="DENIED" operation="connect" ',
    "failed to load TOML",
    ": unknown",
    " ",
]

texts = st.one_of(
    st.text(max_size=200),
    st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join),
    st.binary(max_size=200),  # invalid UTF-8 too
    # huge: a fragment repeated up to 4 MiB
    st.tuples(st.sampled_from(FRAGMENTS), st.integers(1, 4 << 20)).map(
        lambda p: p[0] * (p[1] // len(p[0]) + 1)
    ),
    st.tuples(st.binary(min_size=1, max_size=8), st.integers(1, 1 << 20)).map(lambda p: p[0] * p[1]),
)
numbers = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, "0", "1", "01", " 1", "1\n", "٣", "1_0", "9" * 5000, True, False]),
    st.text(max_size=12),
    st.binary(max_size=12),
)
scalar = st.one_of(texts, numbers, st.none())
value = st.one_of(scalar, st.lists(scalar, max_size=4))
units = st.sampled_from(
    [CONTAINERD, "kubelet.service", "user@1000.service", "init.scope", "nodemedic.service", KERNEL, ""]
)
transports = st.sampled_from(["journal", "stdout", "syslog", "kernel", "audit", "driver"])


def entries(unit: st.SearchStrategy[object] = units) -> st.SearchStrategy[dict[str, object]]:
    return st.fixed_dictionaries(
        {},
        optional={
            "MESSAGE": value,
            "UNIT": st.one_of(unit, value),
            "_SYSTEMD_UNIT": st.one_of(unit, value),
            "_PID": numbers,
            "_UID": numbers,
            "_TRANSPORT": st.one_of(transports, value),
            "SYSLOG_IDENTIFIER": value,
            "OTHER": value,
        },
    )


def follower() -> JournalFollower:
    return JournalFollower(UNITS, lambda _: None, FakeClock())


def check(entry: dict[str, object]) -> JournalLine | None:
    line = follower()._line(entry)
    if line is not None:
        assert line.unit in UNITS
        assert len(line.message) <= MESSAGE_LIMIT
        started = time.perf_counter()
        for fired in match(POLICY.rule, line):
            assert fired.rule.name
        assert time.perf_counter() - started < 0.2, "matching one line took too long"
    return line


@given(entries())
def test_any_entry_is_handled(entry: dict[str, object]) -> None:
    check(entry)


# A sender other than PID 1 as root: whatever it puts in UNIT=, the line is not containerd's
# unless journald itself put it in containerd's cgroup (or the kernel sent it).
def says(value: object, number: int) -> bool:
    """Whether a PID/UID field holds ``number``, in any spelling journald or a reader may give it."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if isinstance(value, str):
        return (
            value.isascii()
            and value.strip().isdigit()
            and value.strip().lstrip("0") == str(number).lstrip("0")
        )
    return isinstance(value, int) and value == number


not_systemd = st.tuples(numbers, numbers).filter(lambda p: not (says(p[0], 1) and says(p[1], 0)))


@given(
    entries(), not_systemd, st.sampled_from(["user@1000.service", "nodemedic.service", None, "init.scope"])
)
def test_a_forged_unit_is_never_containerd(
    entry: dict[str, object], ids: tuple[object, object], own: object
) -> None:
    forged = {**entry, "UNIT": CONTAINERD, "_PID": ids[0], "_UID": ids[1], "_SYSTEMD_UNIT": own}
    line = check(forged)
    assert line is None or line.unit != CONTAINERD


@given(entries(), st.sampled_from(["journal", "stdout", "syslog", None]))
def test_without_a_kernel_transport_nothing_is_the_kernel(
    entry: dict[str, object], transport: object
) -> None:
    line = check({**entry, "_TRANSPORT": transport, "SYSLOG_IDENTIFIER": "kernel", "_SYSTEMD_UNIT": KERNEL})
    assert line is None or line.unit != KERNEL
