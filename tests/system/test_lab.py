"""The lab itself: a booted node is a real systemd + containerd node (facts from domain.md)."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from lab.node import Node, NodeError

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
DEPENDENCIES = "dbus_fast, asyncinotify, pydantic, tomlkit, grpc, systemd.journal"


def wait_for(probe: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def ctr_answers(node: Node) -> bool:
    return node.run("ctr", "--timeout", "2s", "version", check=False, timeout=5).returncode == 0


def test_pid1_is_systemd_and_containerd_serves(node: Node) -> None:
    assert node.run("cat", "/proc/1/comm").stdout.strip() == "systemd"
    assert node.unit_property("containerd.service", "ActiveState") == "active"
    version = node.run("ctr", "version").stdout
    assert re.search(r"Server:\s*\n\s*Version:\s*\S+", version), version


def test_kubelet_stand_in_runs_and_says_so(node: Node) -> None:
    assert node.unit_property("kubelet.service", "ActiveState") == "active"
    assert "lab stand-in" in node.unit_property("kubelet.service", "Description")


def test_daemon_dependencies_import_in_the_venv(node: Node) -> None:
    node.run("/opt/nodemedic/venv/bin/python3", "-c", f"import {DEPENDENCIES}")


def test_checkout_src_is_bound_read_only(node: Node) -> None:
    inside = node.run("ls", "-A", "/opt/nodemedic/src").stdout.split()
    assert sorted(inside) == sorted(p.name for p in (REPO / "src").iterdir())
    write = node.run("touch", "/opt/nodemedic/src/lab-probe", check=False)
    assert write.returncode != 0
    assert "Read-only file system" in write.stderr
    assert node.run("cat", "/usr/bin/nodemedic").stdout.startswith("#!/bin/sh")


def test_journal_is_readable(node: Node) -> None:
    entries = node.journal("-b", "-u", "containerd.service")
    from_containerd = [e for e in entries if e.get("_SYSTEMD_UNIT") == "containerd.service"]
    assert any("containerd successfully booted" in e["MESSAGE"] for e in from_containerd)
    assert any(e.get("UNIT") == "containerd.service" for e in entries)  # systemd's own lines


def test_sighup_kills_containerd_and_systemd_restarts_it(node: Node) -> None:
    first_pid = node.unit_property("containerd.service", "MainPID")
    node.run("kill", "-HUP", first_pid)
    wait_for(lambda: node.unit_property("containerd.service", "NRestarts") == "1", 15, "NRestarts=1")
    assert node.unit_property("containerd.service", "MainPID") not in ("0", first_pid)
    wait_for(lambda: ctr_answers(node), 10, "containerd to answer again")


def test_two_nodes_at_once_and_teardown_is_isolated(node: Node, lab_image: Path) -> None:
    with Node.boot(image=lab_image) as second:
        assert second.leader != node.leader
        assert second.cgroups
        assert set(second.cgroups).isdisjoint(node.cgroups)
        second.write_file("/etc/nodemedic/marker", "second\n")
        assert node.run("test", "-e", "/etc/nodemedic/marker", check=False).returncode == 1
        machine_ids = {n.run("cat", "/etc/machine-id").stdout for n in (node, second)}
        assert len(machine_ids) == 2
        copy = second.copy
    assert copy is not None
    assert not copy.exists()
    assert not any(cg.exists() for cg in second.cgroups)
    assert node.run("systemctl", "is-system-running").stdout.strip() in ("running", "degraded")
    assert node.unit_property("containerd.service", "ActiveState") == "active"
    assert ctr_answers(node)


def test_containers_and_tracefs_when_asked(node_factory: Callable[..., Node]) -> None:
    boxed = node_factory(containers=True, tracefs=True)
    assert boxed.run("test", "-d", "/sys/kernel/tracing/events/signal").returncode == 0
    ctr_run = ("ctr", "run", "--cpu-shares", "0")  # flags first; --rootfs takes the image's place
    hello = boxed.run(*ctr_run, "--rm", "--rootfs", "/opt/bbroot", "hello", "/bin/echo", "hello")
    assert hello.stdout.strip() == "hello"
    boxed.run(*ctr_run, "-d", "--rootfs", "/opt/bbroot", "sleeper", "/bin/sleep", "1000")
    assert "sleeper" in boxed.run("ctr", "task", "ls", "-q").stdout.split()
    boxed.shutdown()  # a running task must not stall the halt (lab.md: up to 90 s)
    assert boxed.teardown_seconds < 15


@pytest.mark.usefixtures("lab_host")
def test_failed_boot_says_why_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(NodeError, match="tail of"):
        Node.boot(image=tmp_path, ready_timeout=10)
    ours = f"lab-{os.getpid()}-"
    leftovers = [p for p in Path("/sys/fs/cgroup").glob(f"*/{ours}*")]
    assert leftovers == []
