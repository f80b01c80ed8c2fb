"""One exception in one observer never stops the others (issue 10 item 7): a core that raises, an
observer of the daemon's that raises, a timer whose decision raises. Each is recorded as a nodemedic
bug, and every event still reaches everyone else."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from nodemedic.actions.base import ActionContext
from nodemedic.core.effects import Effects, Instant, Later, Report
from nodemedic.daemon import Daemon
from nodemedic.events import Event, JournalLine, UnitChanged
from nodemedic.executor import Executor
from nodemedic.policy.load import parse_policy
from nodemedic.report import MemorySink, RecordKind, Reporter

from .fakes import FakeClock, FakeProbe, FakeUnits
from .test_daemon import SHIPPED, make_app, until

pytestmark = pytest.mark.unit
EVENTS: list[Event] = [
    UnitChanged("containerd.service", "active", "running", main_pid=42),
    JournalLine("containerd.service", "ttrpc: closed"),  # the rule below fires on it
    JournalLine("kubelet.service", "nothing to see"),
]
# The daemon's app has the shipped policy and runs no repair: events that no rule of it fires on.
QUIET: list[Event] = [
    UnitChanged("kubelet.service", "active", "running", main_pid=7),
    JournalLine("kubelet.service", "nothing to see"),
    JournalLine("containerd.service", "nothing to see either"),
]


class Broken:
    """A core (``handle``) or an observer (``observe``) with a bug that every event trips."""

    def __init__(self) -> None:
        self.calls = 0

    def handle(self, event: Event, now: Instant) -> Effects:
        self.observe(event)
        return []

    def observe(self, event: Event) -> None:
        self.calls += 1
        raise RuntimeError("a bug")


class Recording:
    """A core (``handle``) or an observer (``observe``) that sees every event."""

    def __init__(self) -> None:
        self.seen: list[Event] = []

    def handle(self, event: Event, now: Instant) -> Effects:
        self.observe(event)
        return []

    def observe(self, event: Event) -> None:
        self.seen.append(event)


def executor(sink: MemorySink, spawned: list[Coroutine[Any, Any, None]]) -> Executor:
    rule = {
        "name": "containerd-hung",
        "trigger": [{"source": "journal", "pattern": "^ttrpc: closed$"}],
        "action": [{"do": "restart-unit", "unit": "containerd.service"}],
    }
    ctx = ActionContext(FakeUnits(), FakeProbe(), FakeClock(), Path("/nonexistent"))
    return Executor(parse_policy({"rule": [rule]}), ctx, Reporter(sink), spawned.append)


def internal_errors(sink: MemorySink) -> list[str]:
    return [r.message for r in sink.of(RecordKind.ERROR) if r.fields.get("OUTCOME") == "internal-error"]


def test_a_core_that_raises_keeps_no_event_from_the_others() -> None:
    sink, spawned = MemorySink(), list[Coroutine[Any, Any, None]]()
    ex, broken, recording = executor(sink, spawned), Broken(), Recording()
    ex.add_core(broken)
    ex.add_core(recording)
    for event in EVENTS:
        ex.handle(event)
    assert recording.seen == EVENTS
    assert broken.calls == len(EVENTS)
    assert len(internal_errors(sink)) == len(EVENTS)
    assert "Broken on JournalLine" in internal_errors(sink)[1]
    assert len(spawned) == 1  # the rules' core still decided: one repair
    for coro in spawned:
        coro.close()  # not run: this test is about who sees the event


def test_a_timer_whose_decision_raises_is_recorded_and_the_next_one_fires() -> None:
    sink, spawned = MemorySink(), list[Coroutine[Any, Any, None]]()
    ex = executor(sink, spawned)

    def broken(now: Instant) -> Effects:
        raise RuntimeError("a bug")

    def fine(now: Instant) -> Effects:
        return [Report(RecordKind.DAEMON, "the next timer fired")]

    ex.run([Later(1.0, broken, "a broken timer"), Later(1.0, fine, "a fine timer")])
    clock = ex.ctx.clock
    assert isinstance(clock, FakeClock)
    clock.advance(1.0)
    assert clock.run_due() == 2
    [error] = internal_errors(sink)
    assert "a broken timer" in error
    assert [r.message for r in sink.of(RecordKind.DAEMON)] == ["the next timer fired"]


async def test_an_observer_that_raises_keeps_no_event_from_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    policy = tmp_path / "policy.toml"
    policy.write_text(SHIPPED.read_text())
    sink, broken, recording = MemorySink(), Broken(), Recording()
    app = make_app(policy, sink)
    app.observers += [broken.observe, recording.observe]
    shutdown = asyncio.Event()
    task = asyncio.create_task(Daemon(app, shutdown, asyncio.Event(), notify=lambda s: None).run())
    for event in QUIET:
        app.events.put_nowait(event)
    await until(lambda: len(recording.seen) == len(QUIET))
    assert recording.seen == QUIET
    assert broken.calls == len(QUIET)
    assert len(internal_errors(sink)) == len(QUIET)
    assert "internal error in Broken on UnitChanged" in internal_errors(sink)[0]
    assert not task.done()
    shutdown.set()
    await asyncio.wait_for(task, 5)
    assert sink.records[-1].fields["OUTCOME"] == "stopped"
