"""A repair whose actions all find nothing to do changes nothing: its follow-ups (kubelet) skip too."""

from __future__ import annotations

import asyncio

import pytest

from nodemedic.actions.base import ActionContext
from nodemedic.events import JournalLine
from nodemedic.executor import Executor
from nodemedic.policy.load import parse_policy
from nodemedic.report import MemorySink, Reporter

from .fakes import FakeClock, FakeProbe, FakeUnits

pytestmark = pytest.mark.unit


async def test_a_stale_trigger_restarts_no_kubelet(tmp_path: object) -> None:
    policy = parse_policy({"rule": [{"name": "stale", "trigger": [{"source": "journal", "pattern": "x"}],
        "action": [{"do": "start-unit", "unit": "containerd.service"},
                   {"do": "restart-unit", "unit": "kubelet.service", "after_change": True}]}]})  # fmt: skip
    units = FakeUnits({"containerd.service": "active", "kubelet.service": "active"})
    ctx = ActionContext(units, FakeProbe(), FakeClock(), quarantine_dir=tmp_path)  # type: ignore[arg-type]
    sink = MemorySink()
    tasks: list[asyncio.Task[None]] = []
    runner = Executor(
        policy, ctx, Reporter(sink), lambda c: tasks.append(asyncio.get_running_loop().create_task(c))
    )
    runner.handle(JournalLine("containerd.service", "x"))
    while tasks:
        await tasks.pop(0)
    assert ("restart", "kubelet.service") not in units.calls
    assert [r.fields.get("OUTCOME") for r in sink.records if r.kind.name == "OUTCOME"] == ["nothing-to-do"]


async def test_after_a_change_kubelet_is_restarted(tmp_path: object) -> None:
    policy = parse_policy({"rule": [{"name": "real", "trigger": [{"source": "journal", "pattern": "x"}],
        "action": [{"do": "start-unit", "unit": "containerd.service"},
                   {"do": "restart-unit", "unit": "kubelet.service", "after_change": True}]}]})  # fmt: skip
    units = FakeUnits({"containerd.service": "failed", "kubelet.service": "active"})
    ctx = ActionContext(units, FakeProbe(), FakeClock(), quarantine_dir=tmp_path)  # type: ignore[arg-type]
    tasks: list[asyncio.Task[None]] = []
    runner = Executor(policy, ctx, Reporter(MemorySink()),
                    lambda c: tasks.append(asyncio.get_running_loop().create_task(c)))  # fmt: skip
    runner.handle(JournalLine("containerd.service", "x"))
    while tasks:
        await tasks.pop(0)
    assert ("restart", "kubelet.service") in units.calls


async def test_verifying_is_not_a_change(tmp_path: object) -> None:
    from nodemedic.actions.registry import build_action
    from nodemedic.policy.actions import VerifyContainerdParams

    step = await build_action(VerifyContainerdParams(do="verify-containerd")).check(None)  # type: ignore[arg-type]
    assert step.changes is False  # type: ignore[union-attr]
