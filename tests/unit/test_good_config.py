"""LastGoodKeeper: one judgement per start of containerd, the main PID asked of the node view."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from nodemedic.actions import good_config
from nodemedic.actions.good_config import LastGoodKeeper
from nodemedic.configs import GoodConfigs
from nodemedic.core.nodeview import NodeView
from nodemedic.events import UnitChanged
from nodemedic.report import MemorySink, RecordKind, Reporter

from .fakes import FakeProbe

pytestmark = pytest.mark.unit

UNIT = "containerd.service"


async def loads(path: Path) -> str | None:
    return None  # as `containerd config dump` would say of a good file, without a containerd here


class Keeper:
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(good_config, "config_problem", loads)
        self.config = tmp_path / "config.toml"
        self.config.write_text("version = 2\n")
        self.store = GoodConfigs(tmp_path / "good", 5)
        self.sink, self.probe, self.view = MemorySink(), FakeProbe(), NodeView()
        report = Reporter(self.sink)
        self.keeper = LastGoodKeeper(
            self.config, self.store, UNIT, 0.0, self.probe, "/s", 1.0, report, main_pid=self.main_pid
        )

    def main_pid(self) -> int:
        return self.view.last_main_pid(UNIT)

    def see(self, event: UnitChanged) -> None:
        self.view.see(event)  # the executor feeds the view first, then the observers
        self.keeper.handle(event)

    async def judged(self) -> None:
        await asyncio.wait_for(asyncio.gather(*self.keeper._tasks), 5)


async def test_a_start_that_ran_healthy_keeps_its_config_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    k = Keeper(tmp_path, monkeypatch)
    k.see(UnitChanged(UNIT, "active", "running", main_pid=7))
    k.see(UnitChanged(UNIT, "active", "running", main_pid=7))  # a resync: the same start
    await k.judged()
    assert [p.read_bytes() for p in k.store.copies()] == [b"version = 2\n"]
    assert k.probe.calls == 1, "one judgement per start"
    (kept,) = k.sink.of(RecordKind.DAEMON)
    assert "kept a last-known-good copy" in kept.message


async def test_a_restart_while_settling_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    k = Keeper(tmp_path, monkeypatch)
    k.see(UnitChanged(UNIT, "active", "running", main_pid=7))
    k.view.see(UnitChanged(UNIT, "active", "running", main_pid=8))  # seen before 7's judgement ran
    await k.judged()
    assert k.store.copies() == []
    assert k.probe.calls == 0


async def test_other_units_and_states_start_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    k = Keeper(tmp_path, monkeypatch)
    k.see(UnitChanged("kubelet.service", "active", "running", main_pid=7))
    k.see(UnitChanged(UNIT, "activating", "start", main_pid=7))
    k.see(UnitChanged(UNIT, "active", "running"))
    assert not k.keeper._tasks
