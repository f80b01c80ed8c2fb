"""Left-over shims on a real node: systemd names every shim left in containerd's cgroup when it
starts (KillMode=process keeps them on purpose). Only the proven orphan is killed; the shim of a
running container, and the container, survive."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from lab.faults import records, run_container, start_nodemedic, wait_for
from lab.node import Node

pytestmark = pytest.mark.system
RULE = "left-over-shims"
BUNDLES = "/run/containerd/io.containerd.runtime.v2.task/default"


def alive(node: Node, pid: int) -> bool:
    return (
        node.sh(f"test -d /proc/{pid} && ! grep -q '^State:.*Z' /proc/{pid}/status", check=False).returncode
        == 0
    )


def test_only_the_proven_orphan_is_killed(node_factory: Callable[..., Node]) -> None:
    node = node_factory(containers=True)
    live_shim, gone_shim = run_container(node, "app"), run_container(node, "gone")
    start_nodemedic(node)
    node.run("systemctl", "stop", "containerd.service")  # KillMode=process: the shims stay
    # "gone" becomes a real orphan: its container process dies and containerd loses its task
    child = node.sh(f"cat /proc/{gone_shim}/task/*/children").stdout.split()[0]
    node.run("kill", "-9", child)
    node.run("mv", f"{BUNDLES}/gone", "/run/moved-bundle-of-gone")
    node.run("systemctl", "start", "containerd.service")  # systemd: "Found left-over process ..."

    wait_for(lambda: records(node, rule=RULE, action="kill-orphaned-shims", outcome="done"), 20, "the kill")
    wait_for(lambda: not alive(node, gone_shim), 10, "the orphaned shim to be gone")
    assert alive(node, live_shim), "the shim of a running container is never killed"
    assert "RUNNING" in node.sh("ctr task ls | grep '^app '").stdout
    verdicts = " ".join(r.get("NODEMEDIC_DETAIL", "") for r in records(node, rule=RULE))
    assert f"{gone_shim} killed" in verdicts
    assert f"{live_shim} kept: it has child processes" in verdicts


def test_observe_mode_kills_nothing(node_factory: Callable[..., Node]) -> None:
    node = node_factory(containers=True)
    gone_shim = run_container(node, "gone")
    start_nodemedic(node, mode="observe")
    node.run("systemctl", "stop", "containerd.service")
    node.run("kill", "-9", node.sh(f"cat /proc/{gone_shim}/task/*/children").stdout.split()[0])
    node.run("mv", f"{BUNDLES}/gone", "/run/moved-bundle-of-gone")
    node.run("systemctl", "start", "containerd.service")

    wait_for(lambda: records(node, rule=RULE, outcome="would-do"), 20, "the would-do record")
    assert alive(node, gone_shim)
