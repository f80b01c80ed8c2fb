"""Which unit a journal entry belongs to is judged by journald's own fields, never by the sender's.

Any local process can send ``UNIT=containerd.service`` (or ``SYSLOG_IDENTIFIER=containerd``); only
the ``_``-fields come from journald (the sender's credentials and cgroup). Issue 11: a forged
``_SYSTEMD_UNIT=user@1000.service, UNIT=containerd.service`` entry fired left-over-shims.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nodemedic.events import JournalLine
from nodemedic.policy.load import load_policy
from nodemedic.policy.match import match
from nodemedic.sources.journal import KERNEL, MESSAGE_LIMIT, JournalFollower, attribute

from .fakes import FakeClock

pytestmark = pytest.mark.unit
ROOT = Path(__file__).parents[2]
POLICY = load_policy(ROOT / "policy" / "policy.toml", check_owner=False)
UNITS = ["containerd.service", "kubelet.service", KERNEL]
CONTAINERD = "containerd.service"
LEFT_OVER = (
    "containerd.service: Found left-over process 68 (containerd-shim) in control group while starting unit."
)

# What journald stores (systemd 252, lab): containerd's stderr, and PID 1's lines about the unit.
CONTAINERD_SAYS = {"_SYSTEMD_UNIT": CONTAINERD, "_PID": 2345, "_UID": 0, "_TRANSPORT": "stdout"}
SYSTEMD_SAYS = {
    "_SYSTEMD_UNIT": "init.scope",
    "_PID": 1,
    "_UID": 0,
    "_TRANSPORT": "journal",
    "UNIT": CONTAINERD,
}


def follower() -> JournalFollower:
    return JournalFollower(UNITS, lambda _: None, FakeClock())


def line(entry: dict[str, object]) -> JournalLine | None:
    return follower()._line(entry)


@pytest.mark.parametrize(
    ("entry", "unit"),
    [
        (CONTAINERD_SAYS, CONTAINERD),
        (SYSTEMD_SAYS, CONTAINERD),
        ({**SYSTEMD_SAYS, "_PID": "1", "_UID": "0"}, CONTAINERD),  # as text (journal export, tests)
        ({**SYSTEMD_SAYS, "UNIT": "kubelet.service"}, "kubelet.service"),
        ({"_SYSTEMD_UNIT": "kubelet.service", "_PID": 3456, "_UID": 0}, "kubelet.service"),
        ({"_TRANSPORT": "kernel"}, KERNEL),
        ({"_TRANSPORT": "audit", "_PID": 1234, "_SYSTEMD_UNIT": CONTAINERD}, KERNEL),
    ],
)
def test_trusted_fields_name_the_unit(entry: dict[str, object], unit: str) -> None:
    assert attribute(entry, UNITS) == unit


@pytest.mark.parametrize(
    "entry",
    [
        # the review's forged entry: a user's process naming containerd in UNIT=
        {"_SYSTEMD_UNIT": "user@1000.service", "_PID": 4242, "_UID": 1000, "UNIT": CONTAINERD},
        # root, but not PID 1 (nodemedic's own records carry UNIT=containerd.service, too)
        {"_SYSTEMD_UNIT": "nodemedic.service", "_PID": 777, "_UID": 0, "UNIT": CONTAINERD},
        # PID 1 of a user namespace that is not root there; and fields missing
        {**SYSTEMD_SAYS, "_UID": 1000},
        {key: value for key, value in SYSTEMD_SAYS.items() if key != "_UID"},
        {"UNIT": CONTAINERD},
        {"_PID": "1x", "_UID": "0", "UNIT": CONTAINERD},
        {"_PID": ["1", "1"], "_UID": "0", "UNIT": CONTAINERD},
        {"_PID": True, "_UID": False, "UNIT": CONTAINERD},
        # SYSLOG_IDENTIFIER=kernel is the sender's word; _TRANSPORT is journald's
        {"_SYSTEMD_UNIT": "user@1000.service", "SYSLOG_IDENTIFIER": "kernel", "_TRANSPORT": "journal"},
        {"_SYSTEMD_UNIT": "user@1000.service", "_TRANSPORT": b"kernel"},
        {"_SYSTEMD_UNIT": KERNEL},
    ],
)
def test_forged_fields_name_no_unit(entry: dict[str, object]) -> None:
    assert attribute(entry, UNITS) is None


def test_a_forged_left_over_line_fires_nothing() -> None:
    forged = {"_SYSTEMD_UNIT": "user@1000.service", "_PID": 4242, "_UID": 1000, "UNIT": CONTAINERD}
    assert line({**forged, "MESSAGE": LEFT_OVER}) is None
    real = line({**SYSTEMD_SAYS, "MESSAGE": LEFT_OVER})
    assert real is not None
    assert [m.rule.name for m in match(POLICY.rule, real)] == ["left-over-shims"]


def test_kernel_lines_only_when_followed() -> None:
    assert attribute({"_TRANSPORT": "kernel", "_SYSTEMD_UNIT": CONTAINERD}, [CONTAINERD]) is None


@pytest.mark.parametrize("message", [b"x" * (32 << 20), "x" * (32 << 20), [b"x" * (1 << 20)] * 40])
def test_a_huge_message_is_cut(message: object) -> None:
    got = line({**CONTAINERD_SAYS, "MESSAGE": message})
    assert got is not None
    assert len(got.message) == MESSAGE_LIMIT


def test_a_multibyte_character_cut_in_half_is_replaced() -> None:
    got = line({**CONTAINERD_SAYS, "MESSAGE": "é".encode() * MESSAGE_LIMIT})
    assert got is not None
    assert got.message == "é" * MESSAGE_LIMIT
    got = line({**CONTAINERD_SAYS, "MESSAGE": b"a" + "é".encode() * MESSAGE_LIMIT})
    assert got is not None
    assert got.message.startswith("aé")
    assert len(got.message) == MESSAGE_LIMIT


def test_pid_is_journald_pid() -> None:
    got = line({**CONTAINERD_SAYS, "_PID": "9" * 5000, "SYSLOG_PID": "1"})
    assert got is not None
    assert got.pid == 0
