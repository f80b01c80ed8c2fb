"""A file trigger's ``settle`` in the rules' core, on a fake clock, with the shipped config rules.

The toolkit writes config.toml in two steps (half its runtime block, closed, then the rest within
~100 ms): the rules must judge the file once, after its last write has been left alone for
``settle``, never the half-written file. Which rule acts depends on containerd's state then:
running -> containerd-config-edited-broken (restore only), down waiting for its restart or failed
-> containerd-config-broken-while-down (restore and restart), stopped by an operator -> none.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nodemedic.core.effects import Effects, Instant, Later, Repair, Report, Settle
from nodemedic.core.nodeview import NodeView
from nodemedic.core.rules import RuleCore
from nodemedic.events import Event, FileChanged, JournalLine, UnitChanged
from nodemedic.policy.load import load_policy, parse_policy
from nodemedic.policy.model import FileTrigger

pytestmark = pytest.mark.unit

SHIPPED = Path(__file__).resolve().parents[2] / "policy" / "policy.toml"
CONFIG = "/etc/containerd/config.toml"
UNIT = "containerd.service"
EDITED = "containerd-config-edited-broken"
DOWN = "containerd-config-broken-while-down"
WALL = 1_700_000_000.0


class FakeTimers:
    """The executor's part: events to the node view then the core, timers run when their time comes."""

    def __init__(self, core: RuleCore) -> None:
        self.core = core
        self.now = 0.0
        self.timers: list[tuple[float, Later]] = []
        self.repairs: list[Repair] = []
        self.reports: list[Report] = []

    def feed(self, event: Event) -> None:
        self.core.view.see(event)
        self._take(self.core.handle(event, Instant(self.now, WALL + self.now)))

    def advance(self, to: float) -> None:
        while due := sorted((t for t in self.timers if t[0] <= to), key=lambda t: t[0]):
            at, later = due[0]
            self.timers.remove(due[0])
            self.now = at
            self._take(later.then(Instant(at, WALL + at)))
        self.now = to

    def _take(self, effects: Effects) -> None:
        for effect in effects:
            if isinstance(effect, Later):
                self.timers.append((self.now + effect.delay, effect))
            elif isinstance(effect, Repair):
                self.repairs.append(effect)
            elif isinstance(effect, Report):
                self.reports.append(effect)


def containerd(active: str, sub: str) -> UnitChanged:
    return UnitChanged(UNIT, active, sub, main_pid=42 if active == "active" else 0)


def node(*states: UnitChanged) -> FakeTimers:
    clock = FakeTimers(RuleCore(load_policy(SHIPPED, check_owner=False), NodeView()))
    for state in states:
        clock.feed(state)
    return clock


def write(clock: FakeTimers) -> None:
    clock.feed(FileChanged(CONFIG, at=clock.now))


def test_the_shipped_file_triggers_settle_for_300ms() -> None:
    policy = load_policy(SHIPPED, check_owner=False)
    settles = {r.name: t.settle for r in policy.rule for t in r.trigger if isinstance(t, FileTrigger)}
    assert settles == {EDITED: 0.3, DOWN: 0.3}


def test_a_two_step_write_is_judged_once_after_its_last_step() -> None:
    clock = node(containerd("active", "running"))
    write(clock)  # the first close-write: half the runtime block
    assert clock.repairs == [], "nothing is decided on a write that may be half done"
    assert [type(e) for _, e in clock.timers] == [Settle, Settle], "one per file rule"
    clock.advance(0.1)
    write(clock)  # the rest, 100 ms later: the wait starts again
    clock.advance(0.35)  # the first write's 300 ms are over, the second's not
    assert clock.repairs == [], "the half-written file is never judged"
    clock.advance(0.4)
    [repair] = clock.repairs
    assert repair.match.rule.name == EDITED
    assert repair.match.event == FileChanged(CONFIG, at=0.1), "the complete file, timed from its write"
    assert "left unchanged for 0.3s" in repair.match.trigger
    clock.advance(10.0)
    assert len(clock.repairs) == 1


def test_broken_while_containerd_waits_for_its_restart_is_decided_after_settle() -> None:
    clock = node(containerd("active", "running"), containerd("activating", "auto-restart"))
    write(clock)
    clock.advance(0.29)
    assert clock.repairs == []
    clock.advance(0.3)
    [repair] = clock.repairs
    assert repair.match.rule.name == DOWN, "restore and restart, not the running containerd's rule"
    assert repair.mode == "enforce"


@pytest.mark.parametrize("state", [("failed", "failed"), ("activating", "auto-restart")])
def test_only_the_down_rule_acts_while_containerd_is_down(state: tuple[str, str]) -> None:
    clock = node(containerd("active", "running"), containerd(*state))
    write(clock)
    clock.advance(1.0)
    assert [r.match.rule.name for r in clock.repairs] == [DOWN]


def test_a_start_under_way_is_left_alone() -> None:
    """activating/start: containerd may have read the file before the write; no rule restarts it."""
    clock = node(containerd("active", "running"), containerd("activating", "start"))
    write(clock)
    clock.advance(1.0)
    assert clock.repairs == []


def test_nothing_while_an_operator_has_containerd_stopped() -> None:
    clock = node(containerd("active", "running"), containerd("inactive", "dead"))
    write(clock)
    clock.advance(1.0)
    assert clock.repairs == []
    said = [r.fields.get("OUTCOME") for r in clock.reports if r.fields.get("RULE") == DOWN]
    assert said == ["operator-stop"]


def test_observe_mode_decides_after_settle_too() -> None:
    text = SHIPPED.read_text().replace('mode = "enforce"', 'mode = "observe"', 1)
    import tomllib

    clock = FakeTimers(RuleCore(parse_policy(tomllib.loads(text)), NodeView()))
    clock.feed(containerd("activating", "auto-restart"))
    write(clock)
    clock.advance(0.1)
    write(clock)
    clock.advance(1.0)
    assert [(r.match.rule.name, r.mode) for r in clock.repairs] == [(DOWN, "observe")]


def test_without_settle_a_write_is_decided_at_once() -> None:
    rule = {"name": "edited", "trigger": [{"source": "file", "path": CONFIG}],
            "action": [{"do": "restore-config", "generate": False}]}  # fmt: skip
    clock = FakeTimers(RuleCore(parse_policy({"rule": [rule]}), NodeView()))
    write(clock)
    assert [r.match.rule.name for r in clock.repairs] == ["edited"]
    assert clock.timers == []


def test_settle_is_bounded() -> None:
    from nodemedic.errors import PolicyError

    rule = {"name": "edited", "trigger": [{"source": "file", "path": CONFIG, "settle": "2m"}],
            "action": [{"do": "restore-config"}]}  # fmt: skip
    with pytest.raises(PolicyError, match="settle"):
        parse_policy({"rule": [rule]})


# ---- review findings (issue 14, goal 3): each failed before its fix -----------------------------

BROKEN_RULE = "containerd-config-broken"
LINE = "containerd: failed to load TOML: /etc/containerd/config.toml: (2, 2): unexpected token"


def sighup_death(before: str = "active") -> list[UnitChanged]:
    """What D-Bus says of a SIGHUP'd containerd with Restart=on-failure (or no) under systemd 252:
    ExecMain* first (the Service interface), then inactive/dead with Result=success."""
    return [
        UnitChanged(UNIT, before, "running", main_pid=42, exec_main_code=2, exec_main_status=1),
        UnitChanged(UNIT, "inactive", "dead", result="success", exec_main_code=2, exec_main_status=1),
    ]


def test_a_death_by_sighup_without_restart_is_no_operators_stop() -> None:
    clock = node(containerd("active", "running"), *sighup_death())
    assert UNIT not in clock.core.view.stopped_by_others
    write(clock)
    clock.advance(1.0)
    assert [r.match.rule.name for r in clock.repairs] == [DOWN]
    assert not [r for r in clock.reports if r.fields.get("OUTCOME") == "operator-stop"]


@pytest.mark.parametrize(
    "states",
    [
        # systemctl stop while containerd waits for its restart: ExecMain* still tell of the SIGHUP
        [containerd("activating", "auto-restart"),
         UnitChanged(UNIT, "inactive", "dead", exec_main_code=2, exec_main_status=1)],
        # systemctl stop of a running unit: deactivating first, then the stop's SIGTERM death
        [containerd("deactivating", "stop-sigterm"),
         UnitChanged(UNIT, "inactive", "dead", exec_main_code=2, exec_main_status=15)],
        # containerd exits 0 on the stop's SIGTERM, the deactivating state unseen
        [UnitChanged(UNIT, "inactive", "dead", exec_main_code=1, exec_main_status=0)],
    ],
)  # fmt: skip
def test_a_stop_job_is_still_an_operators_stop(states: list[UnitChanged]) -> None:
    clock = node(containerd("active", "running"), *states)
    assert UNIT in clock.core.view.stopped_by_others
    write(clock)
    clock.advance(1.0)
    assert clock.repairs == []


def test_the_journal_rule_waits_for_a_file_written_in_steps() -> None:
    """systemd's start lands between the toolkit's two steps and fails on the half file: the journal
    rule judges the file once the last step has settled, not the half (nor the finished file)."""
    clock = node(containerd("active", "running"), containerd("activating", "auto-restart"))
    write(clock)  # the half runtime block
    clock.advance(0.05)
    clock.feed(containerd("activating", "start"))
    clock.feed(JournalLine(UNIT, LINE))  # containerd failed on the half file
    clock.feed(containerd("activating", "auto-restart"))
    assert clock.repairs == [], "not decided on a file written 50 ms ago"
    clock.advance(0.1)
    write(clock)  # the rest
    clock.advance(0.39)
    assert clock.repairs == []
    clock.advance(0.41)
    assert sorted(r.match.rule.name for r in clock.repairs) == [BROKEN_RULE, DOWN]
    assert all("left unchanged for 0.3s" in r.match.trigger for r in clock.repairs)


def test_the_journal_rule_decides_at_once_on_a_file_not_written_lately() -> None:
    clock = node(containerd("active", "running"))
    write(clock)
    clock.advance(5.0)
    clock.feed(containerd("activating", "auto-restart"))
    clock.feed(JournalLine(UNIT, LINE))
    assert [r.match.rule.name for r in clock.repairs] == [EDITED, BROKEN_RULE]


def test_many_writes_keep_one_timer_per_rule() -> None:
    clock = node(containerd("active", "running"))
    for _ in range(50):
        write(clock)
        clock.advance(clock.now + 0.01)
    assert len(clock.timers) == 2
    clock.advance(10.0)
    assert [r.match.rule.name for r in clock.repairs] == [EDITED]
