"""Probe and signal triggers, [rule.when] conditions, and the probe loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from nodemedic.actions.base import ActionContext
from nodemedic.errors import PolicyError
from nodemedic.events import Event, ProbeAnswered, ProbeFailed, SignalSeen, UnitChanged
from nodemedic.executor import Executor
from nodemedic.policy.load import parse_policy
from nodemedic.policy.match import match
from nodemedic.policy.model import Policy
from nodemedic.policy.signals import signal_number
from nodemedic.report import MemorySink, RecordKind, Reporter
from nodemedic.sources.probe import ProbeLoop

from .fakes import FakeClock, FakeProbe, FakeUnits

pytestmark = pytest.mark.unit


def policy(trigger: dict[str, object], when: dict[str, object] | None = None) -> Policy:
    rule: dict[str, object] = {
        "name": "r",
        "trigger": [trigger],
        "action": [{"do": "restart-unit", "unit": "containerd.service"}],
    }
    if when:
        rule["when"] = when
    return parse_policy({"rule": [rule]})


def test_probe_trigger_fires_from_n_failures_in_a_row() -> None:
    rules = policy({"source": "probe", "failures": 3}).rule
    assert match(rules, ProbeFailed("/run/containerd/containerd.sock", "DEADLINE_EXCEEDED", 2)) == []
    [m] = match(rules, ProbeFailed("/run/containerd/containerd.sock", "DEADLINE_EXCEEDED", 3))
    assert "3 requests in a row" in m.trigger


def test_signal_trigger_matches_unit_and_signal() -> None:
    rules = policy({"source": "signal", "signal": "SIGHUP"}).rule
    assert match(rules, SignalSeen(15, 42, unit="containerd.service")) == []
    assert match(rules, SignalSeen(1, 42, unit="kubelet.service")) == []
    [m] = match(rules, SignalSeen(1, 42, unit="containerd.service"))
    assert "killed by signal 1" in m.trigger


@pytest.mark.parametrize(("text", "number"), [("SIGHUP", 1), ("hup", 1), (9, 9), ("SIGUSR1", 10)])
def test_signal_names(text: object, number: int) -> None:
    assert signal_number(text) == number


def test_unknown_signal_is_a_policy_error() -> None:
    with pytest.raises(PolicyError, match="'SIGFOO' is not a signal"):
        policy({"source": "signal", "signal": "SIGFOO"})


def test_when_unit_must_be_watched() -> None:
    with pytest.raises(PolicyError, match=r"when.unit docker.service is not in \[daemon\].watch_units"):
        policy({"source": "probe"}, {"unit": "docker.service"})


def runner(p: Policy, tmp_path: Path) -> tuple[Executor, FakeUnits, MemorySink, list[asyncio.Task[None]]]:
    units, sink, tasks = FakeUnits(), MemorySink(), []
    ctx = ActionContext(units, FakeProbe(), FakeClock(), tmp_path)
    spawn = lambda coro: tasks.append(asyncio.get_running_loop().create_task(coro))  # noqa: E731
    return Executor(p, ctx, Reporter(sink), spawn), units, sink, tasks


async def test_occurrences_within_a_window(tmp_path: Path) -> None:
    r, units, _, tasks = runner(
        policy({"source": "probe", "failures": 1}, {"occurrences": 3, "within": "1m"}), tmp_path
    )
    clock = r.ctx.clock
    assert isinstance(clock, FakeClock)
    fail = ProbeFailed("/s", "timeout", 1)
    r.handle(fail)
    clock.advance(61)  # the first falls out of the window
    r.handle(fail)
    r.handle(fail)
    assert tasks == []
    r.handle(fail)
    await asyncio.gather(*tasks)
    assert units.calls == [("restart", "containerd.service")]


async def test_unit_state_condition(tmp_path: Path) -> None:
    p = policy({"source": "probe", "failures": 1}, {"unit": "containerd.service", "active_state": ["active"]})
    r, units, _, tasks = runner(p, tmp_path)
    fail: Event = ProbeFailed("/s", "timeout", 1)
    r.handle(fail)  # no state known yet: not acting on a guess
    r.handle(UnitChanged("containerd.service", "activating", "auto-restart"))
    r.handle(fail)  # restarting: the probe failing is expected
    assert tasks == []
    r.handle(UnitChanged("containerd.service", "active", "running"))
    r.handle(fail)  # active yet not answering: hung
    await asyncio.gather(*tasks)
    assert units.calls == [("restart", "containerd.service")]


async def test_probe_loop_counts_failures_in_a_row() -> None:
    probe, events = FakeProbe(answers=False), []
    loop = ProbeLoop(probe, "/run/containerd/containerd.sock", 0.001, 0.5, events.append, FakeClock())
    task = asyncio.create_task(loop.run())

    async def until(predicate: Callable[[], bool]) -> None:
        while not predicate():
            await asyncio.sleep(0.001)

    await until(lambda: len(events) >= 3)
    probe.answers = True
    failed_before = len(events)
    await until(lambda: probe.calls >= failed_before + 2)
    probe.answers = False
    await until(lambda: isinstance(events[-1], ProbeFailed) and len(events) > failed_before + 1)
    task.cancel()
    assert [e.consecutive for e in events[:3] if isinstance(e, ProbeFailed)] == [1, 2, 3]
    answered = [e for e in events if isinstance(e, ProbeAnswered)]
    assert len(answered) == 1, "an answer after failures is said once"
    after = events[events.index(answered[0]) + 1]
    assert isinstance(after, ProbeFailed)
    assert after.consecutive == 1, "and the count starts again"


def test_daemon_records_are_unaffected() -> None:
    assert RecordKind.ESCALATED.priority == 2


async def test_observed_hang_is_reported_again_after_it_cleared(tmp_path: Path) -> None:
    p = parse_policy({"daemon": {"mode": "observe"}, "rule": [{
        "name": "hung", "trigger": [{"source": "probe", "failures": 1}], "confirm": {"probe": True},
        "action": [{"do": "restart-unit", "unit": "containerd.service"}]}]})  # fmt: skip
    r, _, sink, tasks = runner(p, tmp_path)
    r.ctx.probe.answers = False  # type: ignore[attr-defined]
    for _ in range(2):
        r.handle(ProbeFailed("/s", "timeout", 1))
        await asyncio.gather(*tasks)
    assert len(sink.of(RecordKind.DETECTED)) == 1, "one hang, one report"
    r.handle(ProbeAnswered("/s"))  # it cleared...
    r.handle(ProbeFailed("/s", "timeout", 1))  # ...and came back: a new incident
    await asyncio.gather(*tasks)
    assert len(sink.of(RecordKind.DETECTED)) == 2
