"""The rules' core on its own (issue 10 item 1): events and hand-made instants in, effects out.

No asyncio, no files, no sleeps, no executor: the test plays the executor's part, feeding the node
view first and reporting each repair's end back through ``finished``.
"""

from __future__ import annotations

from typing import TypeVar

import pytest

from nodemedic.core.effects import Effect, Effects, Instant, Later, LookAgain, Repair, Report, SaveState
from nodemedic.core.nodeview import NodeView
from nodemedic.core.rules import RETRY_MARGIN, RepairEnd, RuleCore
from nodemedic.events import Event, PathChanged, PathKind, UnitChanged
from nodemedic.policy.load import parse_policy
from nodemedic.policy.model import Policy
from nodemedic.report import RecordKind

pytestmark = pytest.mark.unit

E = TypeVar("E", bound=Effect)
SOCK = "/run/containerd/containerd.sock"
UNIT = "containerd.service"
RULE = "socket-path-is-directory"
WALL = 1_700_000_000.0  # the wall clock at monotonic 0
FAILED = RepairEnd("concluded", failure="x", common={"RULE": RULE})
REPAIRED = RepairEnd("concluded", common={"RULE": RULE})


def policy(mode: str = "enforce", repairs: int = 10) -> Policy:
    rule = {
        "name": RULE,
        "trigger": [{"source": "path", "paths": [SOCK], "kind": "directory"}],
        "confirm": {"paths": [SOCK], "kind": "directory", "unit": UNIT},
        "action": [
            {"do": "stop-unit", "unit": UNIT},
            {"do": "remove-socket-dir", "paths": [SOCK], "root": "/run/containerd"},
            {"do": "start-unit", "unit": UNIT},
        ],
        "backoff": {"initial": "5s", "jitter": 0.0},  # no jitter: the delays are exact
    }
    return parse_policy({"daemon": {"mode": mode, "budget": {"repairs": repairs}}, "rule": [rule]})


def at(t: float) -> Instant:
    return Instant(t, WALL + t)


def unit(active: str = "active", load_state: str = "loaded") -> UnitChanged:
    sub = "running" if active == "active" else "dead"
    return UnitChanged(UNIT, active, sub, main_pid=42 if active == "active" else 0, load_state=load_state)


def path(kind: PathKind = PathKind.DIRECTORY) -> PathChanged:
    return PathChanged(SOCK, kind)


def feed(core: RuleCore, event: Event, t: float) -> Effects:
    """What the executor does with an event: the node view sees it first, then the core."""
    core.view.see(event)
    return core.handle(event, at(t))


def make_core(mode: str = "enforce", repairs: int = 10, known: bool = True) -> RuleCore:
    core = RuleCore(policy(mode, repairs), NodeView())
    if known:  # D-Bus has said containerd runs
        assert feed(core, unit(), 0.0) == []
    return core


def only(effects: Effects, kind: type[E]) -> E:
    [effect] = [e for e in effects if isinstance(e, kind)]
    return effect


def outcomes(effects: Effects) -> list[tuple[RecordKind, object]]:
    return [(e.kind, e.fields.get("OUTCOME")) for e in effects if isinstance(e, Report)]


def open_breaker(core: RuleCore) -> tuple[Effects, float]:
    """Three failed repairs, each retried once its backoff allows: the third opens the breaker."""
    repair, t = only(feed(core, path(), 0.0), Repair), 0.0
    for n in range(3):
        t += 1.0
        out = core.finished(repair.match, "enforce", FAILED, at(t))
        if n < 2:
            later = only(out, Later)
            t += later.delay
            repair = only(later.then(at(t)), Repair)
    return out, t


def test_a_match_gives_one_repair() -> None:
    [repair] = feed(make_core(), path(), 1.0)
    assert isinstance(repair, Repair)
    assert (repair.match.rule.name, repair.mode, repair.retry) == (RULE, "enforce", False)


def test_a_match_while_the_repair_runs_is_decided_again_when_it_ends() -> None:
    core = make_core()
    repair = only(feed(core, path(), 1.0), Repair)
    assert feed(core, path(), 1.5) == []
    [again] = core.finished(repair.match, "enforce", RepairEnd("none"), at(2.0))
    assert isinstance(again, Repair)
    assert again.retry


def test_a_match_waits_until_the_units_state_is_known() -> None:
    core = make_core(known=False)
    assert feed(core, path(), 1.0) == []
    [repair] = feed(core, unit(), 2.0)
    assert isinstance(repair, Repair)


def test_an_operators_stop_is_reported_once_and_respected() -> None:
    core = make_core()
    assert feed(core, unit("inactive"), 1.0) == []  # no repair of ours stopped it
    [report] = feed(core, path(), 2.0)
    assert isinstance(report, Report)
    assert (report.kind, report.fields["OUTCOME"], report.fields["UNIT"]) == (
        RecordKind.DECIDED,
        "operator-stop",
        UNIT,
    )
    assert feed(core, path(), 3.0) == []
    assert feed(core, unit("active"), 4.0) == []  # started again: acting is allowed again
    assert isinstance(only(feed(core, path(), 5.0), Repair), Repair)


def test_a_masked_unit_is_a_refusal() -> None:
    core = make_core()
    feed(core, unit("inactive", load_state="masked"), 1.0)
    out = feed(core, path(), 2.0)
    assert outcomes(out) == [(RecordKind.DECIDED, "refused")]
    assert only(out, Report).fields["DETAIL"] == "masked"


def test_a_failed_repair_backs_off_then_retries() -> None:
    core = make_core()
    repair = only(feed(core, path(), 1.0), Repair)
    out = core.finished(repair.match, "enforce", FAILED, at(2.0))
    assert [type(e) for e in out] == [Report, Later, SaveState]
    assert outcomes(out) == [(RecordKind.OUTCOME, "not-repaired")]
    later = only(out, Later)
    assert later.delay == pytest.approx(5.0 + RETRY_MARGIN)
    deferred = feed(core, path(), 3.0)  # within the backoff: said once, looked at again later
    assert outcomes(deferred) == [(RecordKind.DECIDED, "deferred")]
    [retry] = later.then(at(2.0 + later.delay))
    assert isinstance(retry, Repair)
    assert retry.retry


def test_three_failures_open_the_breaker_and_the_rule_only_observes() -> None:
    core = make_core()
    out, t = open_breaker(core)
    assert (RecordKind.ESCALATED, "breaker-open") in outcomes(out)
    assert only(out, Later).delay == pytest.approx(3600.0 + RETRY_MARGIN)  # the cool-down
    held = feed(core, path(), t + 1)
    assert outcomes(held) == [(RecordKind.DECIDED, "held")]
    assert only(held, Repair).mode == "observe"
    observed = core.finished(only(held, Repair).match, "observe", REPAIRED, at(t + 2))
    assert outcomes(observed) == [(RecordKind.OUTCOME, "observed")]
    feed(core, path(PathKind.SOCKET), t + 3)  # the incident is over
    [again] = feed(core, path(), t + 4)  # a new one: observed, the hold not said again
    assert isinstance(again, Repair)
    assert again.mode == "observe"


def test_observe_mode_reports_once_per_incident() -> None:
    core = make_core(mode="observe")
    repair = only(feed(core, path(), 1.0), Repair)
    assert repair.mode == "observe"
    done = core.finished(repair.match, "observe", REPAIRED, at(2.0))
    assert outcomes(done) == [(RecordKind.OUTCOME, "observed")]
    assert feed(core, path(), 3.0) == []  # the same incident
    assert feed(core, path(PathKind.SOCKET), 4.0) == []  # cleared
    assert only(feed(core, path(), 5.0), Repair).mode == "observe"


def test_a_spent_budget_holds_the_rule() -> None:
    core = make_core(repairs=1)
    repair = only(feed(core, path(), 1.0), Repair)
    done = core.finished(repair.match, "enforce", REPAIRED, at(2.0))
    assert outcomes(done) == [(RecordKind.OUTCOME, "repaired")]
    assert isinstance(only(done, SaveState), SaveState)
    assert core.budget_held(at(3.0)) is not None
    held = feed(core, path(), 3.0)
    assert outcomes(held) == [(RecordKind.DECIDED, "held")]
    assert "global repair budget spent" in str(only(held, Report).fields["DETAIL"])
    assert only(held, Repair).mode == "observe"


def test_a_reset_closes_the_breaker_and_looks_again() -> None:
    core = make_core()
    _, t = open_breaker(core)
    out = core.reset([RULE])
    assert [type(e) for e in out] == [Report, LookAgain, SaveState]
    assert outcomes(out) == [(RecordKind.DECIDED, "reset")]
    assert only(out, LookAgain).rule.name == RULE
    assert only(feed(core, path(), t + 1), Repair).mode == "enforce"


def test_a_reset_of_an_unknown_rule_is_refused() -> None:
    out = make_core().reset(["no-such-rule"])
    assert outcomes(out) == [(RecordKind.ERROR, "refused")]
    assert isinstance(only(out, SaveState), SaveState)


def test_an_open_breaker_survives_a_snapshot() -> None:
    core = make_core()
    _, t = open_breaker(core)
    again = make_core()
    again.restore(core.snapshot())
    assert outcomes(feed(again, path(), t + 1)) == [(RecordKind.DECIDED, "held")]
