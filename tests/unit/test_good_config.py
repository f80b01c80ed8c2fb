"""Last-known-good copies: one judgement per start of containerd, decided by the pure core
(core/good_copies.py) and run by the executor (executor/keeping.py) with the steps of
actions/good_config.py. The settle is the fake clock's timer, fired by the test: no real sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from nodemedic.actions import good_config
from nodemedic.actions.base import ActionContext
from nodemedic.configs import GoodConfigs
from nodemedic.core.effects import Instant, Later
from nodemedic.core.good_copies import GoodCopies, KeepIfHealthy, ReadStartedWith
from nodemedic.core.nodeview import NodeView
from nodemedic.events import UnitChanged
from nodemedic.executor import Executor, keeping
from nodemedic.policy.model import Policy
from nodemedic.report import MemorySink, RecordKind, Reporter

from .fakes import FakeClock, FakeProbe, FakeUnits

pytestmark = pytest.mark.unit

UNIT = "containerd.service"
SETTLE = 60.0
NOW = Instant(1.0, 1_700_000_000.0)


async def loads(path: Path) -> str | None:
    return None  # as `containerd config dump` would say of a good file, without a containerd here


class Keeper:
    """An executor with the good copies registered; its spawned work awaited by ``done``."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str = "enforce") -> None:
        monkeypatch.setattr(good_config, "config_problem", loads)
        self.config = tmp_path / "config.toml"
        self.config.write_text("version = 2\n")
        self.store = GoodConfigs(tmp_path / "good", 5)
        self.sink, self.probe, self.clock = MemorySink(), FakeProbe(), FakeClock()
        self.tasks: list[asyncio.Task[None]] = []
        policy = Policy.model_validate(
            {"daemon": {"mode": mode, "config_backup": {"path": str(self.config), "settle": "60s"}}}
        )
        ctx = ActionContext(FakeUnits(), self.probe, self.clock, tmp_path / "q", good_configs=self.store)
        self.ex = Executor(policy, ctx, Reporter(self.sink), self.spawn)
        self.core = keeping.register(self.ex, policy.daemon, self.store)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self.tasks.append(asyncio.get_running_loop().create_task(coro))

    def see(self, event: UnitChanged) -> None:
        self.ex.handle(event)  # the node view first, then the cores

    async def done(self) -> None:
        """Every read and judgement spawned so far (and those they led to), finished."""
        while self.tasks:
            pending, self.tasks = self.tasks, []
            await asyncio.wait_for(asyncio.gather(*pending), 5)

    async def settle(self, seconds: float = SETTLE) -> None:
        await self.done()  # the content it started with is read: its timer is armed
        self.clock.advance(seconds)
        self.clock.run_due()
        await self.done()

    def kept(self) -> list[bytes]:
        return [p.read_bytes() for p in self.store.copies()]


def start(pid: int) -> UnitChanged:
    return UnitChanged(UNIT, "active", "running", main_pid=pid)


async def test_a_start_that_ran_healthy_keeps_its_config_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    k = Keeper(tmp_path, monkeypatch)
    k.see(start(7))
    k.see(start(7))  # a resync: the same start
    await k.settle()
    assert k.kept() == [b"version = 2\n"]
    assert k.probe.calls == 1, "one judgement per start"
    (kept,) = k.sink.of(RecordKind.DAEMON)
    assert "kept a last-known-good copy" in kept.message
    assert kept.fields["OUTCOME"] == "config-kept"


async def test_nothing_is_judged_before_settle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    k = Keeper(tmp_path, monkeypatch)
    k.see(start(7))
    await k.settle(SETTLE - 1)
    assert (k.kept(), k.probe.calls) == ([], 0)
    await k.settle(1)
    assert k.kept() == [b"version = 2\n"]


async def test_a_resync_of_the_same_running_process_is_judged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    k = Keeper(tmp_path, monkeypatch)
    k.see(start(7))
    await k.settle()
    k.see(start(7))  # a bus reconnect long after: the same process, already judged
    await k.settle()
    assert (k.probe.calls, k.clock.timers, k.tasks) == (1, [], [])
    assert len(k.sink.of(RecordKind.DAEMON)) == 1


async def test_a_restart_while_settling_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    k = Keeper(tmp_path, monkeypatch)
    k.see(start(7))
    await k.done()
    k.ex.view.see(start(8))  # seen before 7's judgement ran
    await k.settle()
    assert k.store.copies() == []
    assert k.probe.calls == 0


async def test_a_restart_during_settle_judges_only_the_new_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    k = Keeper(tmp_path, monkeypatch)
    k.see(start(7))
    await k.settle(SETTLE / 2)
    k.see(UnitChanged(UNIT, "activating", "auto-restart"))
    k.see(start(8))
    await k.settle(SETTLE / 2)  # 7's settle is over: it no longer runs
    assert (k.kept(), k.probe.calls) == ([], 0)
    await k.settle(SETTLE / 2)  # 8's
    assert k.kept() == [b"version = 2\n"]
    assert k.probe.calls == 1


async def test_an_edit_during_settle_keeps_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    k = Keeper(tmp_path, monkeypatch)
    k.see(start(7))
    await k.done()  # it started with version = 2
    k.config.write_text("version = 3\n")  # not what it runs
    await k.settle()
    assert (k.kept(), k.probe.calls) == ([], 0)
    assert k.sink.of(RecordKind.DAEMON) == []


async def test_no_answer_or_a_config_that_does_not_load_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    k = Keeper(tmp_path, monkeypatch)
    k.probe.answers = False
    k.see(start(7))
    await k.settle()
    assert k.kept() == []

    async def refused(path: Path) -> str | None:
        return "unknown plugin"

    monkeypatch.setattr(good_config, "config_problem", refused)
    k.probe.answers = True
    k.see(start(8))
    await k.settle()
    assert k.kept() == []
    assert k.sink.of(RecordKind.DAEMON) == []


async def test_the_same_content_again_is_said_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    k = Keeper(tmp_path, monkeypatch)
    for pid in (7, 8):
        k.see(start(pid))
        await k.settle()
    assert k.kept() == [b"version = 2\n"]
    assert k.probe.calls == 2
    assert len(k.sink.of(RecordKind.DAEMON)) == 1


async def test_observe_mode_still_keeps_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    k = Keeper(tmp_path, monkeypatch, mode="observe")
    k.see(start(7))
    await k.settle()
    assert k.kept() == [b"version = 2\n"]


async def test_a_judgement_pending_at_shutdown_does_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    k = Keeper(tmp_path, monkeypatch)
    k.see(start(7))
    await k.done()
    k.ex.closing = True  # nodemedic is stopping
    await k.settle()
    k.see(start(8))
    await k.done()
    assert (k.kept(), k.probe.calls, k.tasks) == ([], 0, [])
    assert k.sink.of(RecordKind.ERROR) == []


async def test_other_units_and_states_start_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    k = Keeper(tmp_path, monkeypatch)
    k.see(UnitChanged("kubelet.service", "active", "running", main_pid=7))
    k.see(UnitChanged(UNIT, "activating", "start", main_pid=7))
    k.see(UnitChanged(UNIT, "active", "running"))
    assert (k.tasks, k.clock.timers) == ([], [])


def test_the_core_alone_reads_waits_then_asks_for_a_judgement() -> None:
    view = NodeView()
    core = GoodCopies(UNIT, SETTLE, view)
    view.see(start(7))
    assert core.handle(start(7), NOW) == [ReadStartedWith(7)]
    assert core.handle(start(7), NOW) == [], "a resync of the same process"
    assert core.started_with(7, None) == [], "unreadable: not judged"
    (later,) = core.started_with(7, b"version = 2\n")
    assert isinstance(later, Later)
    assert later.delay == SETTLE
    assert later.then(NOW) == [KeepIfHealthy(7, b"version = 2\n")]
    view.see(start(8))
    assert later.then(NOW) == [], "restarted meanwhile"
