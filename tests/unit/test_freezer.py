"""The cgroup freezer on a fake cgroup v2 (and v1) tree: refusal rules, the registry, thawing.

The fake kernel is the ``sleep`` the Freezer waits with: each time it waits, the kernel reports
what cgroup.freeze (freezer.state on v1) asks for, as the real one does a moment later."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nodemedic.actions.freezer import (
    ALREADY_FROZEN,
    Freezer,
    check_freeze,
    own_cgroup,
    start_freeze,
    thaw_over,
)
from nodemedic.errors import FreezeFailedError, FreezeRefusedError
from nodemedic.policy.sighup import DEFAULT_DENY

pytestmark = pytest.mark.unit

STANDIN = "/system.slice/toolkit-standin.service"  # a stand-in for the toolkit pod's cgroup
POD = "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1234.slice/cri-containerd-abc.scope"
CONTAINERD = "/system.slice/containerd.service"
NODEMEDIC = "/system.slice/nodemedic.service"


class FakeKernel:
    def __init__(self, root: Path, v2: bool = True, stuck: bool = False) -> None:
        self.root, self.v2, self.stuck = root, v2, stuck
        self.waits = 0

    def sleep(self, _seconds: float) -> None:
        self.waits += 1
        if self.stuck:
            return
        if self.v2:
            for freeze in self.root.rglob("cgroup.freeze"):
                if not freeze.is_file():
                    continue
                want = freeze.read_text().strip() or "0"
                (freeze.parent / "cgroup.events").write_text(f"populated 1\nfrozen {want}\n")
        else:
            for state in self.root.rglob("freezer.state"):
                if state.read_text().strip() == "FROZEN":
                    (state.parent / "freezer.self_freezing").write_text("1\n")
                else:
                    state.write_text("THAWED\n")
                    (state.parent / "freezer.self_freezing").write_text("0\n")


def make_cgroup(root: Path, path: str, pids: str = "4242\n", v2: bool = True) -> Path:
    folder = root / path.lstrip("/")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cgroup.procs").write_text(pids)
    if v2:
        (folder / "cgroup.freeze").write_text("0\n")
        (folder / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    else:
        (folder / "freezer.state").write_text("THAWED\n")
    return folder


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    others = ["/system.slice/kubelet.service", "/init.scope", "/user.slice/user-0.slice/session-1.scope",
              "/system.slice/systemd-journald.service"]  # fmt: skip
    for cg in (STANDIN, POD, CONTAINERD, NODEMEDIC, *others):
        make_cgroup(root, cg)
    (root / "system.slice" / "cgroup.procs").write_text("")
    make_cgroup(root, "/system.slice/idle.service", pids="")
    return root


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    """/proc/self/cgroup of a nodemedic running as its unit."""
    (tmp_path / "proc" / "self").mkdir(parents=True)
    (tmp_path / "proc" / "self" / "cgroup").write_text(f"0::{NODEMEDIC}\n")
    return tmp_path / "proc"


def make_freezer(tree: Path, proc: Path, **kwargs: object) -> tuple[Freezer, FakeKernel]:
    kernel = FakeKernel(tree, v2=(tree / "cgroup.controllers").exists())
    freezer = Freezer(
        tree, tree.parent / "state" / "frozen.json", deny=DEFAULT_DENY, protected=[CONTAINERD],
        proc=proc, settle=0.5, sleep=kernel.sleep, **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip
    return freezer, kernel


@pytest.mark.parametrize(
    ("cgroup", "why"),
    [
        ("/", "the root cgroup"),
        ("", "the root cgroup"),
        (
            "/system.slice/kubelet.service",
            "'kubelet.service' matches the deny-list pattern 'kubelet.service'",
        ),
        ("/system.slice/systemd-journald.service", "matches the deny-list pattern 'systemd-*'"),
        ("/user.slice/user-0.slice/session-1.scope", "'user.slice' matches"),
        ("/init.scope", "'init.scope' matches"),
        (CONTAINERD, "'containerd.service' matches"),
        ("/system.slice", "an ancestor of the protected cgroup /system.slice/containerd.service"),
        ("/system.slice/../system.slice/toolkit-standin.service", "'..'"),
        ("/system.slice/gone.service", "no such cgroup"),
        ("/kubepods.slice", "not a leaf"),
        ("/system.slice/idle.service", "no process in it"),
    ],
)
def test_refusals(tree: Path, proc: Path, cgroup: str, why: str) -> None:
    freezer, _ = make_freezer(tree, proc)
    reason = freezer.refusal(cgroup)
    assert reason is not None
    assert why in reason
    with pytest.raises(FreezeRefusedError, match="not freezing"):
        freezer.freeze(cgroup, 2e9)


def test_protected_and_own_cgroup_even_with_an_empty_deny_list(tree: Path, proc: Path) -> None:
    freezer, _ = make_freezer(tree, proc)
    freezer.deny = []
    assert "protected" in (freezer.refusal(CONTAINERD) or "")
    assert "protected" in (freezer.refusal(NODEMEDIC) or "")  # its own, found in /proc/self/cgroup
    assert "ancestor" in (freezer.refusal("/system.slice") or "")
    assert freezer.refusal("/system.slice/kubelet.service") is None


def test_a_pod_container_and_a_standin_unit_may_be_frozen(tree: Path, proc: Path) -> None:
    freezer, _ = make_freezer(tree, proc)
    assert freezer.refusal(POD) is None
    assert freezer.refusal(STANDIN) is None
    assert freezer.refusal("system.slice/toolkit-standin.service/") is None  # normalised


def test_freeze_waits_for_the_kernel_and_records_first(tree: Path, proc: Path) -> None:
    freezer, kernel = make_freezer(tree, proc)

    freezer.freeze(STANDIN, 1_700_000_300.0)

    folder = tree / STANDIN.lstrip("/")
    assert (folder / "cgroup.freeze").read_text() == "1"
    assert "frozen 1" in (folder / "cgroup.events").read_text()
    assert kernel.waits >= 1
    data = json.loads(freezer.registry.read_text())
    assert data == {"version": 1, "frozen": {STANDIN: 1_700_000_300.0}}
    assert freezer.frozen() == {STANDIN: 1_700_000_300.0}


def test_registry_survives_a_restart_and_thaw_due(tree: Path, proc: Path) -> None:
    first, _ = make_freezer(tree, proc)
    first.freeze(STANDIN, 100.0)
    first.freeze(POD, 200.0)

    again, _ = make_freezer(tree, proc)  # a new process: only the file is shared
    assert again.frozen() == {STANDIN: 100.0, POD: 200.0}
    assert again.thaw_due(99.0) == []
    assert again.thaw_due(100.0) == [STANDIN]
    assert (tree / STANDIN.lstrip("/") / "cgroup.freeze").read_text() == "0"
    assert "frozen 0" in (tree / STANDIN.lstrip("/") / "cgroup.events").read_text()
    assert again.frozen() == {POD: 200.0}
    assert again.thaw_all() == [POD]
    assert again.frozen() == {}
    assert again.thaw_all() == []


def test_a_vanished_cgroup_is_dropped_not_an_error(tree: Path, proc: Path) -> None:
    freezer, _ = make_freezer(tree, proc)
    freezer.freeze(POD, 100.0)
    freezer.freeze(STANDIN, 100.0)
    for f in (tree / POD.lstrip("/")).iterdir():
        f.unlink()
    (tree / POD.lstrip("/")).rmdir()  # the pod's container ended

    assert freezer.thaw_all() == [STANDIN]
    assert freezer.failed == {}
    assert freezer.frozen() == {}


def test_a_bad_entry_is_thawed_and_a_corrupt_registry_is_salvaged(tree: Path, proc: Path) -> None:
    freezer, _ = make_freezer(tree, proc)
    freezer.registry.parent.mkdir(parents=True)
    freezer.registry.write_text(json.dumps({"version": 1, "frozen": {STANDIN: "soon", POD: 5e9}}))
    assert freezer.thaw_due(10.0) == [STANDIN]  # a time that is not a time: due now

    freezer.registry.write_text('{"version": 1, "frozen": {"' + POD + '": 5e9, ')  # cut short
    assert freezer.frozen() == {POD: 0.0}  # thawed at the next chance rather than forgotten
    assert list(freezer.registry.parent.glob("frozen.json.corrupt-*"))


def test_one_failing_thaw_does_not_stop_the_others(tree: Path, proc: Path) -> None:
    freezer, _ = make_freezer(tree, proc)
    freezer.freeze(POD, 100.0)
    freezer.freeze(STANDIN, 100.0)
    freeze_file = tree / POD.lstrip("/") / "cgroup.freeze"
    freeze_file.unlink()
    freeze_file.mkdir()  # writing it fails: EISDIR

    assert freezer.thaw_all() == [STANDIN]
    assert list(freezer.failed) == [POD]
    assert "could not thaw" in freezer.failed[POD]
    assert freezer.frozen() == {POD: 100.0}  # kept for the next try


def test_a_freeze_the_kernel_never_reports_is_undone(tree: Path, proc: Path) -> None:
    freezer, kernel = make_freezer(tree, proc)
    kernel.stuck = True
    freezer.settle = 0.05

    with pytest.raises(FreezeFailedError, match="not reported frozen"):
        freezer.freeze(STANDIN, 100.0)
    assert (tree / STANDIN.lstrip("/") / "cgroup.freeze").read_text() == "0"
    assert freezer.frozen() == {}


def test_cgroup_v1_freezer_hierarchy(tmp_path: Path, proc: Path) -> None:
    root = tmp_path / "cgroup"
    make_cgroup(root / "freezer", STANDIN, v2=False)
    freezer, _ = make_freezer(root, proc)
    assert not freezer.v2

    freezer.freeze(STANDIN, 100.0)
    assert (root / "freezer" / STANDIN.lstrip("/") / "freezer.state").read_text() == "FROZEN"
    assert freezer.thaw_all() == [STANDIN]
    assert (root / "freezer" / STANDIN.lstrip("/") / "freezer.state").read_text().strip() == "THAWED"


def test_own_cgroup(tmp_path: Path, proc: Path) -> None:
    assert own_cgroup(proc) == NODEMEDIC
    (proc / "self" / "cgroup").write_text("5:freezer:/frz\n1:name=systemd:/system.slice/x\n0::/u\n")
    assert own_cgroup(proc, v2=False) == "/frz"
    assert own_cgroup(tmp_path / "nothing") == ""


async def test_the_executor_steps_check_freeze_and_thaw_what_is_due(tree: Path, proc: Path) -> None:
    """The steps executor/interventions.py runs: the check says why not (or that it is frozen
    already), the freeze runs in a thread, the thaw says when the next cool-down ends."""
    freezer, _ = make_freezer(tree, proc)
    assert "deny-list" in (await check_freeze(freezer, "/system.slice/kubelet.service") or "")
    assert await check_freeze(freezer, STANDIN) is None
    await start_freeze(freezer, STANDIN, 100.0)
    await start_freeze(freezer, POD, 200.0)
    assert await check_freeze(freezer, STANDIN) == ALREADY_FROZEN
    assert await thaw_over(freezer, 150.0) == ([STANDIN], 200.0)
    assert await thaw_over(freezer, 250.0) == ([POD], None)
