"""The orphan proof of kill-orphaned-shims, on a fake /proc tree (the kill itself is proven in the lab)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodemedic.actions.base import ActionContext, Skip, Step
from nodemedic.actions.shims import KillOrphanedShims, ReportedOrphans
from nodemedic.events import JournalLine
from nodemedic.policy.actions import KillOrphanedShimsParams

from .fakes import FakeClock, FakeProbe, FakeUnits

pytestmark = pytest.mark.unit
CGROUP = "0::/system.slice/containerd.service\n"


def process(proc: Path, pid: int, argv: list[str], cgroup: str = CGROUP, children: str = "",
            started: int = 1000) -> None:  # fmt: skip
    base = proc / str(pid)
    (base / "task" / str(pid)).mkdir(parents=True)
    stat_of(proc, pid, started)
    (base / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (base / "cgroup").write_text(cgroup)
    (base / "status").write_text("Name:\tcontainerd-shim\nState:\tS (sleeping)\n")
    (base / "task" / str(pid) / "children").write_text(children)


def stat_of(proc: Path, pid: int, started: int) -> None:
    """/proc/PID/stat with ``started`` as field 22 (a comm with a space and a parenthesis in it)."""
    (proc / str(pid) / "stat").write_text(f"{pid} (shim) x) S " + "0 " * 18 + f"{started} 0 0\n")


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

    from nodemedic.executor import Executor
    from nodemedic.policy.load import parse_policy
    from nodemedic.report import MemorySink, Reporter

    judged: list[str] = []

    class Recording(KillOrphanedShims):
        async def check(self, ctx: ActionContext) -> Step | Skip:
            assert isinstance(ctx.event, JournalLine)
            judged.append(ctx.event.message)
            await asyncio.sleep(0)  # yields, as a real check does: the rule stays under way
            return Skip("test")

    from nodemedic.actions import registry

    policy = parse_policy({"rule": [{"name": "left-over-shims",
        "trigger": [{"source": "journal", "pattern": r"Found left-over process \d+ \(containerd-shim"}],
        "action": [{"do": "kill-orphaned-shims"}]}]})  # fmt: skip
    tasks: list[asyncio.Task[None]] = []
    saved = registry.ACTIONS[KillOrphanedShimsParams]
    registry.ACTIONS[KillOrphanedShimsParams] = Recording
    try:
        runner = Executor(policy, ctx(""), Reporter(MemorySink()),
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

    from nodemedic.executor import Executor
    from nodemedic.policy.load import parse_policy
    from nodemedic.report import MemorySink, Reporter

    policy = parse_policy({"daemon": {"budget": {"repairs": 1}}, "rule": [{"name": "left-over-shims",
        "trigger": [{"source": "journal", "pattern": r"Found left-over process \d+ \(containerd-shim"}],
        "action": [{"do": "kill-orphaned-shims", "proc": str(tmp_path)}]}]})  # fmt: skip
    sink = MemorySink()
    tasks: list[asyncio.Task[None]] = []
    runner = Executor(policy, ctx(""), Reporter(sink),
                    lambda c: tasks.append(asyncio.get_running_loop().create_task(c)))  # fmt: skip
    for _ in range(3):
        runner.handle(JournalLine("containerd.service", "Found left-over process 62 (containerd-shim) x"))
        while tasks:
            await tasks.pop(0)
    outcomes = [r.fields.get("OUTCOME") for r in sink.records if r.kind.name == "OUTCOME"]
    assert outcomes == ["nothing-to-do"] * 3
    assert runner.budget.spent == []


POD_SCOPE = (
    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1234.slice/cri-containerd-ab12.scope"
)


@pytest.mark.parametrize(
    ("cgroup", "proven"),
    [
        ("0::/system.slice/containerd.service\n", True),
        # a legacy host: the unified line is "/", the name=systemd line names the unit
        (
            "12:cpu,cpuacct:/system.slice/containerd.service\n1:name=systemd:/system.slice/containerd.service\n"
            "0::/\n",
            True,
        ),
        # a pod's cgroup with a child named after the unit: held the substring check
        (f"0::{POD_SCOPE}/containerd.service\n", False),
        ("0::/kubepods/besteffort/pod1234/ab12/containerd.service\n", False),
        ("0::/system.slice/containerd.service/nested\n", False),
        ("0::/system.slice/containerd.service.d-x.scope\n", False),
        ("0::/../lab-other/system.slice/containerd.service\n", False),  # another node's systemd
        # only the unified line counts; a v1 controller line naming the unit does not
        (f"4:memory:/system.slice/containerd.service\n0::{POD_SCOPE}\n", False),
        ("0::/system.slice/containerd.service\n".replace("\n", " extra\n"), False),
        (b"0::/system.slice/\xff\xfe.service\n", False),
    ],
)
def test_the_cgroup_must_be_the_units_own(tmp_path: Path, cgroup: str | bytes, proven: bool) -> None:
    proc = tmp_path / "proc"
    process(proc, 100, shim("gone"))
    (proc / "100" / "cgroup").write_bytes(cgroup if isinstance(cgroup, bytes) else cgroup.encode())
    kill = KillOrphanedShims(KillOrphanedShimsParams(do="kill-orphaned-shims", bundles=str(tmp_path / "b"),
                                                     proc=str(proc)))  # fmt: skip
    assert (kill.not_orphaned(100) is None) is proven
    if not proven:
        assert kill.not_orphaned(100) == "not in containerd.service's cgroup"


def test_without_children_files_nothing_is_proven(kill: KillOrphanedShims, tmp_path: Path) -> None:
    """A kernel without CONFIG_PROC_CHILDREN has no task/*/children: fail closed, never kill."""
    proc = tmp_path / "proc"
    (proc / "100" / "task" / "100" / "children").unlink()
    why = kill.not_orphaned(100)
    assert why is not None
    assert "cannot tell whether it has child processes" in why
    # a second thread without the file is enough to keep it
    (proc / "100" / "task" / "100" / "children").write_text("")
    (proc / "100" / "task" / "101").mkdir()
    assert "cannot tell" in (kill.not_orphaned(100) or "")
    # no threads listed at all, or no task folder: nothing proven either
    (proc / "100" / "task" / "101").rmdir()
    (proc / "100" / "task" / "100" / "children").unlink()
    (proc / "100" / "task" / "100").rmdir()
    assert "cannot tell" in (kill.not_orphaned(100) or "")
    (proc / "100" / "task").rmdir()
    assert "cannot tell" in (kill.not_orphaned(100) or "")


@pytest.mark.parametrize("task", ["..", ".", "a/../../gone"])
def test_a_crafted_task_id_is_not_looked_up_elsewhere(tmp_path: Path, task: str) -> None:
    proc = tmp_path / "proc"
    process(proc, 100, shim(task))
    kill = KillOrphanedShims(KillOrphanedShimsParams(do="kill-orphaned-shims", bundles=str(tmp_path / "b"),
                                                     proc=str(proc)))  # fmt: skip
    assert kill.not_orphaned(100) == "its namespace or task id is unknown"


@pytest.mark.parametrize(
    "pid",
    [
        "9" * 4301,  # int() refuses more than 4,300 digits: ValueError, a spent repair
        "99999999999",  # 11 digits
        "4194305",  # above PID_MAX_LIMIT
        "0",
        "\u0661\u0660\u0660",  # Arabic-Indic "100": int() would accept it
    ],
)
async def test_a_forged_pid_is_not_a_pid(kill: KillOrphanedShims, pid: str) -> None:
    step = await kill.check(ctx(f"Found left-over process {pid} (containerd-shim) in control group x."))
    assert step == Skip("no left-over shim named by systemd")


async def test_a_huge_pid_next_to_a_real_one_leaves_the_real_one(kill: KillOrphanedShims) -> None:
    message = (
        f"Found left-over process {'9' * 5000} (containerd-shim) x "
        "Found left-over process 100 (containerd-shim) in control group while starting unit."
    )
    step = await kill.check(ctx(message))
    assert isinstance(step, Step)
    assert step.data["pids"] == "100"


def test_an_orphan_is_reported_once_per_process(tmp_path: Path) -> None:
    """A PID named again (ExecStartPre=, then ExecStart=) is the same incident while it is the same
    process; the same PID for a later process is a new one; a gone process leaves the map."""
    proc = tmp_path / "proc"
    process(proc, 100, shim("gone"), started=1000)
    process(proc, 101, shim("gone2"), started=1001)
    seen = ReportedOrphans()
    assert seen.first_seen([100], str(proc)) == [100]
    assert seen.first_seen([100, 101], str(proc)) == [101]
    assert seen.first_seen([100, 101], str(proc)) == []
    stat_of(proc, 100, 5000)  # PID 100 reused by a later process
    assert seen.first_seen([100], str(proc)) == [100]
    (proc / "101" / "stat").unlink()  # 101 is gone: forgotten, whether named again or not
    assert seen.first_seen([], str(proc)) == []
    assert len(seen) == 1
    assert seen.first_seen([101], str(proc)) == []  # a process gone by now is no incident


def test_proven_orphans_use_the_one_proof(kill: KillOrphanedShims) -> None:
    lines = " ".join(f"Found left-over process {pid} (containerd-shim) x." for pid in (100, 200, 300, 999))
    assert kill.proven_orphans(lines) == [100]
    assert kill.verdicts(lines)[200] == "it has child processes (a container)"
