"""ProcView and the cgroup mappings: pure functions, and lookups in a fake /proc tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nodemedic.procfs import (
    ProcView,
    cgroup_from_text,
    cgroup_prefix,
    nspid_from_status,
    outside_namespace,
    pod_of,
    relative_cgroup,
    unit_of,
)

pytestmark = pytest.mark.unit

UID = "8f5c2c7e-5a3b-4b8e-9c1d-2f0e6a7b8c9d"
CID = "3b1f0c9e2d4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c"
# kubelet's systemd cgroup driver (SystemdCgroup = true): slices per QoS class, a scope per container
SYSTEMD_BESTEFFORT = (
    "/kubepods.slice/kubepods-besteffort.slice/"
    f"kubepods-besteffort-pod{UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope"
)
SYSTEMD_BURSTABLE = (
    "/kubepods.slice/kubepods-burstable.slice/"
    f"kubepods-burstable-pod{UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope"
)
SYSTEMD_GUARANTEED = f"/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope"
# the cgroupfs driver: plain folders
CGROUPFS_BESTEFFORT = f"/kubepods/besteffort/pod{UID}/{CID}"
CGROUPFS_GUARANTEED = f"/kubepods/pod{UID}/{CID}"
# a static pod's UID is a hash (no dashes)
STATIC_UID = "5e2ab33b8a8b3e1ff6e1b8c5d3e0cde1"

V2_TEXT = "0::/system.slice/toolkit-standin.service\n"
HYBRID_TEXT = (
    "12:pids:/system.slice/toolkit-standin.service\n"
    "3:cpu,cpuacct:/system.slice/toolkit-standin.service\n"
    "1:name=systemd:/system.slice/toolkit-standin.service\n"
    "0::/system.slice/toolkit-standin.service\n"
)
# A legacy (v1-only) host: the cgroup2 line exists but says nothing.
LEGACY_TEXT = "4:memory:/kubepods/x\n1:name=systemd:/system.slice/cron.service\n0::/\n"
# A lab node's systemd only uses cgroup2; name=systemd is left at the node's root.
LAB_NODE_TEXT = "9:name=systemd:/\n4:memory:/\n0::/system.slice/containerd.service\n"


@pytest.mark.parametrize(
    ("text", "cgroup"),
    [
        (V2_TEXT, "/system.slice/toolkit-standin.service"),
        (HYBRID_TEXT, "/system.slice/toolkit-standin.service"),
        (LEGACY_TEXT, "/system.slice/cron.service"),
        (LAB_NODE_TEXT, "/system.slice/containerd.service"),
        ("0::/\n", "/"),
        ("", ""),
        ("garbage\n", ""),
    ],
)
def test_cgroup_from_text(text: str, cgroup: str) -> None:
    assert cgroup_from_text(text) == cgroup


@pytest.mark.parametrize(
    ("cgroup", "unit", "pod"),
    [
        ("/system.slice/toolkit-standin.service", "toolkit-standin.service", ""),
        ("/system.slice/containerd.service", "containerd.service", ""),
        ("/user.slice/user-0.slice/session-3.scope", "session-3.scope", ""),
        ("/init.scope", "init.scope", ""),
        # a delegated subtree inside a unit still belongs to the unit
        ("/system.slice/docker.service/payload", "docker.service", ""),
        (SYSTEMD_BESTEFFORT, f"cri-containerd-{CID}.scope", UID),
        (SYSTEMD_BURSTABLE, f"cri-containerd-{CID}.scope", UID),
        (SYSTEMD_GUARANTEED, f"cri-containerd-{CID}.scope", UID),
        (
            f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{STATIC_UID}.slice",
            "",
            STATIC_UID,
        ),
        (CGROUPFS_BESTEFFORT, "", UID),
        (CGROUPFS_GUARANTEED, "", UID),
        (f"/kubepods/burstable/pod{UID}", "", UID),
        ("/", "", ""),
        ("", "", ""),
        ("/system.slice", "", ""),
        # outside our cgroup namespace (another lab node, or a process nsenter'ed from the host)
        ("/../lab-1-0-ab/system.slice/toolkit.service", "", ""),
        ("/../..", "", ""),
    ],
)
def test_unit_and_pod_of(cgroup: str, unit: str, pod: str) -> None:
    assert unit_of(cgroup) == unit
    assert pod_of(cgroup) == pod


def test_outside_namespace() -> None:
    assert outside_namespace("/../x/system.slice/a.service")
    assert not outside_namespace("/system.slice/a..b.service")


@pytest.mark.parametrize(
    ("outer", "inner", "prefix"),
    [
        ("/system.slice/nodemedic.service", "/system.slice/nodemedic.service", ""),  # a real node
        ("/lab-1-0-ab/system.slice/nodemedic.service", "/system.slice/nodemedic.service", "/lab-1-0-ab"),
        ("/lab-1-0-ab", "/", "/lab-1-0-ab"),
        ("/other/x.service", "/system.slice/nodemedic.service", ""),  # cannot be reconciled
        ("/ab/c.service", "b/c.service", ""),  # not a whole component
        ("", "/system.slice/nodemedic.service", ""),
    ],
)
def test_cgroup_prefix(outer: str, inner: str, prefix: str) -> None:
    assert cgroup_prefix(outer, inner) == prefix


@pytest.mark.parametrize(
    ("path", "prefix", "relative"),
    [
        ("/lab-1/system.slice/a.service", "/lab-1", "/system.slice/a.service"),
        ("/lab-1", "/lab-1", "/"),
        ("/lab-10/system.slice/a.service", "/lab-1", "/lab-10/system.slice/a.service"),
        ("/system.slice/a.service", "", "/system.slice/a.service"),
    ],
)
def test_relative_cgroup(path: str, prefix: str, relative: str) -> None:
    assert relative_cgroup(path, prefix) == relative


def test_nspid_from_status() -> None:
    status = "Name:\tcontainerd\nTgid:\t16733\nNSpid:\t16733\t33\nNSsid:\t1\n"
    assert nspid_from_status(status) == [16733, 33]
    assert nspid_from_status("Name:\tx\n") == []
    assert nspid_from_status("NSpid:\tx\n") == []


# ---- a fake /proc ------------------------------------------------------------------------------


class FakeProc:
    """A /proc tree: ``proc`` is the trace's /proc (host PIDs), ``own`` is ours."""

    def __init__(self, root: Path, *, outer_self: str, inner_self: str) -> None:
        self.proc = root / "proc"
        self.own = root / "own"
        self.proc.mkdir()
        (self.own / "self" / "ns").mkdir(parents=True)
        (self.own / "self" / "cgroup").write_text(f"0::{inner_self}\n")
        (self.own / "self" / "ns" / "pid").symlink_to("pid:[4026532181]")
        self.add(999_999, comm="python3", cgroup=outer_self, nspid=[999_999, 77])
        (self.proc / "self").symlink_to("999999")

    def add(
        self,
        pid: int,
        *,
        comm: str,
        cgroup: str,
        nspid: list[int],
        pidns: str = "pid:[4026532181]",
        start: int = 100,
    ) -> None:
        folder = self.proc / str(pid)
        (folder / "ns").mkdir(parents=True)
        (folder / "comm").write_text(comm + "\n")
        (folder / "cgroup").write_text(f"1:name=systemd:/\n0::{cgroup}\n")
        (folder / "status").write_text(f"Name:\t{comm}\nNSpid:\t" + "\t".join(map(str, nspid)) + "\n")
        (folder / "stat").write_text(f"{pid} ({comm}) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {start} 0 0\n")
        (folder / "ns" / "pid").symlink_to(pidns)

    def remove(self, pid: int) -> None:
        folder = self.proc / str(pid)
        for item in sorted(folder.rglob("*"), reverse=True):
            item.unlink() if not item.is_dir() or item.is_symlink() else item.rmdir()
        folder.rmdir()


@pytest.fixture
def fake(tmp_path: Path) -> FakeProc:
    # the lab shape if the kernel rendered the host's view: our cgroup seen from the host /proc
    # carries the node's folder in front
    return FakeProc(
        tmp_path,
        outer_self="/lab-1-0-ab/system.slice/nodemedic.service",
        inner_self="/system.slice/nodemedic.service",
    )


def test_lookups_strip_our_prefix(fake: FakeProc) -> None:
    fake.add(16733, comm="containerd", cgroup="/lab-1-0-ab/system.slice/containerd.service",
             nspid=[16733, 33])  # fmt: skip
    view = ProcView(fake.proc, own=fake.own)
    assert not view.is_own_proc()
    assert view.prefix() == "/lab-1-0-ab"
    assert view.cgroup(16733) == "/system.slice/containerd.service"
    assert view.comm(16733) == "containerd"
    assert view.local_pid(16733) == 33
    assert view.start_time(16733) == "100"
    assert view.in_our_pid_namespace(16733) is True
    assert view.is_ours_in_unit(16733, "containerd.service")
    assert view.find(33, "containerd.service") == 16733
    assert view.find_by_comm("containerd", "containerd.service") == [16733]


def test_another_nodes_containerd_is_not_ours(fake: FakeProc) -> None:
    # another lab node on the same kernel: same unit name, same inner PID, another namespace
    fake.add(17000, comm="containerd", cgroup="/../lab-2-0-cd/system.slice/containerd.service",
             nspid=[17000, 33], pidns="pid:[4026532999]")  # fmt: skip
    # a host process whose PID happens to be 33
    fake.add(33, comm="kworker", cgroup="/", nspid=[33], pidns="pid:[4026531836]")
    view = ProcView(fake.proc, own=fake.own)
    assert not view.is_ours_in_unit(17000, "containerd.service")
    assert view.find(33, "containerd.service") == 0
    assert view.find_by_comm("containerd", "containerd.service") == []


def test_a_pods_cgroup_named_like_the_unit_is_not_ours(fake: FakeProc) -> None:
    """A pod may make a child cgroup named containerd.service and run a process named containerd
    in it: a SIGHUP to that is not a SIGHUP to containerd (it ended with /containerd.service)."""
    pod = "/kubepods.slice/kubepods-pod1.slice/cri-containerd-ab.scope/containerd.service"
    fake.add(16800, comm="containerd", cgroup="/lab-1-0-ab" + pod, nspid=[16800, 40])
    view = ProcView(fake.proc, own=fake.own)
    assert not view.is_ours_in_unit(16800, "containerd.service")
    assert view.find_by_comm("containerd", "containerd.service") == []


def test_same_cgroup_other_pid_namespace_is_not_ours(fake: FakeProc) -> None:
    fake.add(17001, comm="containerd", cgroup="/lab-1-0-ab/system.slice/containerd.service",
             nspid=[17001, 5], pidns="pid:[4026532999]")  # fmt: skip
    assert not ProcView(fake.proc, own=fake.own).is_ours_in_unit(17001, "containerd.service")


def test_a_gone_process_reads_as_nothing(fake: FakeProc) -> None:
    view = ProcView(fake.proc, own=fake.own)
    assert view.comm(4242) is None
    assert view.cgroup(4242) is None
    assert view.local_pid(4242) == 0
    assert view.start_time(4242) == ""
    assert view.in_our_pid_namespace(4242) is None
    assert not view.is_ours_in_unit(4242, "containerd.service")


def test_own_proc_gives_main_pid_as_is() -> None:
    view = ProcView(Path("/proc"))
    assert view.is_own_proc()
    assert view.find(os.getpid(), "containerd.service") == os.getpid()
    assert view.prefix() == ""
    assert view.in_our_pid_namespace(os.getpid()) is True


def test_missing_proc_is_empty(tmp_path: Path) -> None:
    view = ProcView(tmp_path / "nothing", own=tmp_path / "nothing")
    assert list(view.pids()) == []
    assert view.prefix() == ""
    assert not view.is_own_proc()


def test_without_ns_links_the_pid_namespace_is_told_by_start_time(tmp_path: Path) -> None:
    # nodemedic.service cannot read /proc/PID/ns/pid of a root process (no CAP_SYS_PTRACE): the
    # process must then be in our /proc, under its innermost PID, with the same start time
    fake = FakeProc(tmp_path, outer_self="/system.slice/nodemedic.service",
                    inner_self="/system.slice/nodemedic.service")  # fmt: skip
    (fake.own / "self" / "ns" / "pid").unlink()
    fake.add(
        16733, comm="containerd", cgroup="/system.slice/containerd.service", nspid=[16733, 33], start=500
    )
    fake.add(
        17000, comm="containerd", cgroup="/system.slice/containerd.service", nspid=[17000, 34], start=700
    )
    (fake.own / "33").mkdir()
    (fake.own / "33" / "stat").write_text("33 (containerd) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 500 0 0\n")
    (fake.own / "34").mkdir()
    (fake.own / "34" / "stat").write_text("34 (bash) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 900 0 0\n")
    view = ProcView(fake.proc, own=fake.own)
    assert view.in_our_pid_namespace(16733) is True
    assert view.in_our_pid_namespace(17000) is False  # PID 34 here is another process
    assert view.in_our_pid_namespace(4242) is None
    assert not view.is_ours_in_unit(17000, "containerd.service")
