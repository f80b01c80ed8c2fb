"""Left-over shims on a real node: systemd names every shim left in containerd's cgroup when it
starts (KillMode=process keeps them on purpose). Only the proven orphan is killed; the shim of a
running container, and the container, survive."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from lab.faults import records, run_container, start_nodemedic, wait_for
from lab.node import Node

pytestmark = pytest.mark.system
RULE = "left-over-shims"
BUNDLES = "/run/containerd/io.containerd.runtime.v2.task/default"
CURSOR = "/var/lib/nodemedic/journal.cursor"


def alive(node: Node, pid: int) -> bool:
    return (
        node.sh(f"test -d /proc/{pid} && ! grep -q '^State:.*Z' /proc/{pid}/status", check=False).returncode
        == 0
    )


def read_past_left_over_lines(node: Node) -> None:
    """Wait until nodemedic has read (saved its journal cursor past) every line of systemd's naming
    a left-over shim, then give the decisions on them time to be written."""
    named = "journalctl -q -u containerd.service -g 'Found left-over process' -o cat"
    wait_for(lambda: node.sh(named, check=False).stdout.strip(), 20, "systemd's left-over lines")
    behind = f'{named} --after-cursor="$(cat {CURSOR})"'
    wait_for(lambda: node.sh(f"test -s {CURSOR} && test -z \"$({behind})\"", check=False).returncode == 0,
             20, "nodemedic to read past them")  # fmt: skip
    time.sleep(3)  # the decisions run as tasks right after the read: generous on a 2-core machine


def test_a_running_container_s_shim_is_no_incident(node_factory: Callable[..., Node]) -> None:
    """containerd restarted with a container running: systemd names its shim (once per ExecStartPre=
    and ExecStart=); nodemedic decides that silently, and the container runs on."""
    node = node_factory(containers=True)
    live_shim = run_container(node, "app")
    start_nodemedic(node)
    node.run("systemctl", "restart", "containerd.service")  # KillMode=process: the shim stays

    read_past_left_over_lines(node)
    assert str(live_shim) in node.sh("journalctl -q -u containerd.service -g 'Found left-over' -o cat").stdout
    assert records(node, rule=RULE) == [], "a shim serving a container is not an incident"
    assert alive(node, live_shim)
    assert "RUNNING" in node.sh("ctr task ls | grep '^app '").stdout


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
    # the live shim is no incident: systemd names it too, and nodemedic writes nothing for it
    # (before: "<pid> kept: it has child processes" in four records per line naming it)
    assert str(live_shim) not in " ".join(r.get("MESSAGE", "") + r.get("NODEMEDIC_DETAIL", "")
                                          for r in records(node, rule=RULE))  # fmt: skip
    read_past_left_over_lines(node)
    assert len({r["NODEMEDIC_INCIDENT"] for r in records(node, rule=RULE)}) == 1, "one incident, one orphan"


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
