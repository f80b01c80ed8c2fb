"""A confirm unit that is masked or not installed is a refusal, not an operator's stop (issue 12,
fault matrix item 6): the record says which, and what to do."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from nodemedic.actions.base import ActionContext
from nodemedic.events import PathChanged, PathKind, UnitChanged
from nodemedic.executor import Executor
from nodemedic.report import MemorySink, RecordKind, Reporter

from .fakes import FakeClock, FakeProbe, FakeUnits
from .test_runner import make_policy

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("load_state", "says"), [("masked", "systemctl unmask"), ("not-found", "install it")]
)
async def test_a_masked_or_missing_unit_is_refused_once(tmp_path: Path, load_state: str, says: str) -> None:
    root = tmp_path / "run" / "containerd"
    (root / "containerd.sock").mkdir(parents=True)
    units, sink, tasks = FakeUnits({"containerd.service": "inactive"}), MemorySink(), []
    ctx = ActionContext(units, FakeProbe(), FakeClock(), tmp_path / "q")
    spawn = lambda coro: tasks.append(asyncio.get_running_loop().create_task(coro))  # noqa: E731
    runner = Executor(make_policy(root), ctx, Reporter(sink), spawn)
    runner.handle(UnitChanged("containerd.service", "inactive", "dead", load_state=load_state))
    for _ in range(3):  # the same fault seen again (inotify, journal, retries): said once
        runner.handle(PathChanged(str(root / "containerd.sock"), PathKind.DIRECTORY))
    await asyncio.gather(*tasks)
    assert units.calls == []
    [refused] = sink.of(RecordKind.DECIDED)
    assert refused.fields["OUTCOME"] == "refused"
    assert f"containerd.service is {load_state}" in refused.message
    assert says in refused.message
    assert "stopped by someone else" not in refused.message


async def test_a_masked_unit_still_running_is_not_stopped(tmp_path: Path) -> None:
    """The fault is seen before containerd's death is: a repair would stop what it cannot start."""
    root = tmp_path / "run" / "containerd"
    (root / "containerd.sock").mkdir(parents=True)
    units, sink, tasks = FakeUnits({"containerd.service": "active"}), MemorySink(), []
    ctx = ActionContext(units, FakeProbe(), FakeClock(), tmp_path / "q")
    spawn = lambda coro: tasks.append(asyncio.get_running_loop().create_task(coro))  # noqa: E731
    runner = Executor(make_policy(root), ctx, Reporter(sink), spawn)
    runner.handle(UnitChanged("containerd.service", "active", "running", load_state="masked"))
    runner.handle(PathChanged(str(root / "containerd.sock"), PathKind.DIRECTORY))
    await asyncio.gather(*tasks)
    assert units.calls == []
    assert [r.fields["OUTCOME"] for r in sink.of(RecordKind.DECIDED)] == ["refused"]
