"""One fault, two rules (issue 12, fault matrix): a directory at the socket path also fails the hang
probe. The hang rule, confirmed while the socket repair held the lock, asks again once it has the
lock: containerd answers by then, so it does not restart the containerd just repaired."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from nodemedic.actions.base import ActionContext
from nodemedic.events import JournalLine, PathChanged, PathKind
from nodemedic.executor import Executor
from nodemedic.policy.load import parse_policy
from nodemedic.report import MemorySink, RecordKind, Reporter

from .fakes import FakeClock, FakeProbe, FakeUnits

pytestmark = pytest.mark.unit


class SlowUnits(FakeUnits):
    """A stop that takes until the test lets it end, as systemd's takes a while: the other rule
    decides meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.stopping = asyncio.Event()  # a stop has begun
        self.stopped = asyncio.Event()  # set by the test: the stop may end

    async def stop(self, unit: str, timeout: float) -> None:
        self.stopping.set()
        await self.stopped.wait()
        await super().stop(unit, timeout)


class AskedProbe(FakeProbe):
    """Says when it was first asked (the hang rule's confirm)."""

    def __init__(self, answers: bool = True) -> None:
        super().__init__(answers)
        self.asked = asyncio.Event()

    async def version(self, socket: str, timeout: float) -> str:
        self.asked.set()
        return await super().version(socket, timeout)


def two_rules(root: Path) -> dict[str, Any]:
    sock = str(root / "containerd.sock")
    socket_rule = {
        "name": "socket-path-is-directory",
        "trigger": [{"source": "path", "paths": [sock], "kind": "directory"}],
        "confirm": {"paths": [sock], "kind": "directory"},
        "action": [
            {"do": "stop-unit", "unit": "containerd.service"},
            {"do": "remove-socket-dir", "paths": [sock], "root": str(root)},
            {"do": "start-unit", "unit": "containerd.service"},
        ],
    }
    hung_rule = {
        "name": "containerd-hung",
        "trigger": [{"source": "journal", "pattern": "^ttrpc: closed$"}],
        "confirm": {"probe": True},
        "action": [{"do": "restart-unit", "unit": "containerd.service", "if_exists": False}],
    }
    return {"daemon": {"state_dir": str(root.parent / "state")}, "rule": [socket_rule, hung_rule]}


async def test_a_rule_that_waited_for_another_repair_asks_again(tmp_path: Path) -> None:
    root = tmp_path / "run" / "containerd"
    (root / "containerd.sock").mkdir(parents=True)
    units, probe, sink, tasks = SlowUnits(), AskedProbe(answers=False), MemorySink(), []
    units.on_start = lambda unit: setattr(probe, "answers", True)  # containerd serves again
    ctx = ActionContext(units, probe, FakeClock(), tmp_path / "state" / "quarantine")
    spawn = lambda coro: tasks.append(asyncio.get_running_loop().create_task(coro))  # noqa: E731
    runner = Executor(parse_policy(two_rules(root)), ctx, Reporter(sink), spawn)

    runner.handle(PathChanged(str(root / "containerd.sock"), PathKind.DIRECTORY))
    await units.stopping.wait()  # the socket repair holds the lock, stopping containerd
    runner.handle(JournalLine("containerd.service", "ttrpc: closed"))
    # The probe fails: confirmed. The probe answers without yielding, so by the time this test runs
    # again the hang rule waits for the lock.
    await probe.asked.wait()
    assert runner.lock.locked()
    units.stopped.set()
    await asyncio.gather(*tasks)

    assert ("restart", "containerd.service") not in units.calls
    assert units.calls == [("stop", "containerd.service"), ("start", "containerd.service")]
    outcomes = {r.fields["RULE"]: r.fields["OUTCOME"] for r in sink.of(RecordKind.OUTCOME)}
    assert outcomes == {"socket-path-is-directory": "repaired", "containerd-hung": "nothing-to-do"}
