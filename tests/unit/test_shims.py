"""The orphan proof of kill-orphaned-shims, on a fake /proc tree (the kill itself is proven in the lab)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodemedic.actions.base import ActionContext, Skip, Step
from nodemedic.actions.shims import KillOrphanedShims, KillOrphanedShimsParams
from nodemedic.events import JournalLine

from .fakes import FakeClock, FakeProbe, FakeUnits

pytestmark = pytest.mark.unit
CGROUP = "0::/system.slice/containerd.service\n"


def process(proc: Path, pid: int, argv: list[str], cgroup: str = CGROUP, children: str = "") -> None:
    base = proc / str(pid)
    (base / "task" / str(pid)).mkdir(parents=True)
    (base / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (base / "cgroup").write_text(cgroup)
    (base / "status").write_text("Name:\tcontainerd-shim\nState:\tS (sleeping)\n")
    (base / "task" / str(pid) / "children").write_text(children)


def shim(task: str) -> list[str]:
    return ["/usr/bin/containerd-shim-runc-v2", "-namespace", "default", "-id", task, "-address", "/run/x"]


@pytest.fixture
def kill(tmp_path: Path) -> KillOrphanedShims:
    proc, bundles = tmp_path / "proc", tmp_path / "bundles"
    process(proc, 100, shim("gone"))  # proven orphan
    process(proc, 200, shim("app"), children="201 ")  # serves a container
    process(proc, 300, shim("kept"))  # containerd still has the task
    (bundles / "default" / "kept").mkdir(parents=True)
    process(proc, 400, shim("other"), cgroup="0::/system.slice/other.service\n")
    process(proc, 500, ["/bin/sleep", "100"])
    params = KillOrphanedShimsParams(do="kill-orphaned-shims", bundles=str(bundles), proc=str(proc))
    return KillOrphanedShims(params)


def ctx(line: str) -> ActionContext:
    return ActionContext(FakeUnits(), FakeProbe(), FakeClock(), Path("/nonexistent"),
                         event=JournalLine("containerd.service", line))  # fmt: skip


def test_proof(kill: KillOrphanedShims) -> None:
    assert kill.not_orphaned(100) is None
    assert kill.not_orphaned(200) == "it has child processes (a container)"
    assert kill.not_orphaned(300) == "containerd still has task default/kept"
    assert kill.not_orphaned(400) == "not in containerd.service's cgroup"
    assert kill.not_orphaned(500) == "not a containerd shim"
    assert kill.not_orphaned(999) == "no such process"


async def test_only_named_and_proven_pids(kill: KillOrphanedShims) -> None:
    step = await kill.check(
        ctx("Found left-over process 100 (containerd-shim) in control group while starting unit.")
    )
    assert isinstance(step, Step)
    assert step.data["pids"] == "100"
    live = await kill.check(
        ctx("Found left-over process 200 (containerd-shim) in control group while starting unit.")
    )
    assert isinstance(live, Skip)
    assert "200 kept: it has child processes" in live.reason
    assert isinstance(await kill.check(ctx("containerd.service: Deactivated successfully.")), Skip)


async def test_every_named_pid_is_judged_even_when_lines_come_in_a_burst(tmp_path: Path) -> None:
    import asyncio

    from nodemedic.engine.runner import Runner
    from nodemedic.policy.load import parse_policy
    from nodemedic.report import MemorySink, Reporter

    judged: list[str] = []

    class Recording(KillOrphanedShims):
        async def check(self, ctx: ActionContext) -> Step | Skip:
            assert isinstance(ctx.event, JournalLine)
            judged.append(ctx.event.message)
            await asyncio.sleep(0.01)  # still running when the next line comes
            return Skip("test")

    from nodemedic.actions import registry

    policy = parse_policy({"rule": [{"name": "left-over-shims",
        "trigger": [{"source": "journal", "pattern": r"Found left-over process \d+ \(containerd-shim"}],
        "action": [{"do": "kill-orphaned-shims"}]}]})  # fmt: skip
    tasks: list[asyncio.Task[None]] = []
    saved = registry.ACTIONS[KillOrphanedShimsParams]
    registry.ACTIONS[KillOrphanedShimsParams] = Recording
    try:
        runner = Runner(policy, ctx(""), Reporter(MemorySink()),
                        lambda c: tasks.append(asyncio.get_running_loop().create_task(c)))  # fmt: skip
        for pid in (62, 111, 140):
            runner.handle(
                JournalLine("containerd.service", f"Found left-over process {pid} (containerd-shim) x")
            )
        while tasks:
            await tasks.pop(0)
    finally:
        registry.ACTIONS[KillOrphanedShimsParams] = saved
    assert sorted(judged) == sorted(
        f"Found left-over process {p} (containerd-shim) x" for p in (62, 111, 140)
    )


async def test_a_repair_whose_actions_all_find_nothing_to_do_spends_no_budget(tmp_path: Path) -> None:
    """Live shims named at every containerd start are not a repair: no budget, no breaker."""
    import asyncio

    from nodemedic.engine.runner import Runner
    from nodemedic.policy.load import parse_policy
    from nodemedic.report import MemorySink, Reporter

    policy = parse_policy({"daemon": {"budget": {"repairs": 1}}, "rule": [{"name": "left-over-shims",
        "trigger": [{"source": "journal", "pattern": r"Found left-over process \d+ \(containerd-shim"}],
        "action": [{"do": "kill-orphaned-shims", "proc": str(tmp_path)}]}]})  # fmt: skip
    sink = MemorySink()
    tasks: list[asyncio.Task[None]] = []
    runner = Runner(policy, ctx(""), Reporter(sink),
                    lambda c: tasks.append(asyncio.get_running_loop().create_task(c)))  # fmt: skip
    for _ in range(3):
        runner.handle(JournalLine("containerd.service", "Found left-over process 62 (containerd-shim) x"))
        while tasks:
            await tasks.pop(0)
    outcomes = [r.fields.get("OUTCOME") for r in sink.records if r.kind.name == "OUTCOME"]
    assert outcomes == ["nothing-to-do"] * 3
    assert runner.budget.spent == []
