"""containerd's socket chmodded on a real node (a hostPath pod's or an operator's chmod on
/run/containerd/containerd.sock): the shipped containerd-socket-mode rule, turned to enforce,
puts the bits back in place with no restart of containerd (same MainPID, same socket inode); in
its shipped observe mode it says it would, and only that. A wrong owner, which nodemedic cannot
chown back, is still repaired by a restart of containerd."""

from __future__ import annotations

import re
import time

import pytest
from lab.faults import SHIPPED_POLICY, SOCKET, containerd_serving, records, start_nodemedic, wait_for
from lab.node import Node

pytestmark = pytest.mark.system
RULE = "containerd-socket-mode"


def enforced() -> str:
    """The shipped policy with this rule (shipped mode = "observe") turned to enforce."""
    text = SHIPPED_POLICY.read_text()
    rule = re.compile(rf'(name = "{RULE}"\n(?:.*\n){{0,3}}?)mode = "observe"')
    assert rule.search(text), f"the shipped {RULE} rule has mode = observe"
    return rule.sub(r'\1mode = "enforce"', text, count=1)


def stat(node: Node) -> str:
    return node.sh(f"stat -c '%a %u:%g %i' {SOCKET}").stdout.strip()


def actions(node: Node, outcome: str) -> list[str]:
    return [r["NODEMEDIC_ACTION"] for r in records(node, rule=RULE, outcome=outcome)]


def test_wrong_bits_are_put_back_without_restarting_containerd(node: Node) -> None:
    start_nodemedic(node, policy=enforced())
    pid = node.unit_property("containerd.service", "MainPID")
    mode, owner, inode = stat(node).split()
    assert (mode, owner) == ("660", "0:0")
    node.run("chmod", "0666", SOCKET)
    chmodded = time.monotonic()
    wait_for(lambda: stat(node).startswith("660 "), 30, "the mode to be put back", interval=0.02)
    restored = time.monotonic() - chmodded
    [done] = wait_for(lambda: records(node, rule=RULE, outcome="repaired"), 10, "the repaired record")  # type: ignore[misc]
    print(f"chmod -> mode restored: {restored:.2f} s; {done['MESSAGE']}; MainPID {pid} before and after")
    assert node.unit_property("containerd.service", "MainPID") == pid, "containerd was not restarted"
    assert stat(node) == f"660 0:0 {inode}", "the same socket, its bits back"
    assert actions(node, "done") == ["verify-containerd", "restore-socket-mode"]
    assert actions(node, "skipped") == ["restart-unit", "restart-unit"], "neither containerd nor kubelet"
    [detected] = records(node, rule=RULE, kind="detected")
    assert "is mode 0666 owner 0:0, expected 0660 0:0" in detected["MESSAGE"]
    assert containerd_serving(node)


def test_in_the_shipped_observe_mode_it_says_it_would_chmod(node: Node) -> None:
    start_nodemedic(node)  # the daemon enforces; this rule ships in observe mode
    pid = node.unit_property("containerd.service", "MainPID")
    node.run("chmod", "0600", SOCKET)
    wait_for(lambda: records(node, rule=RULE, outcome="observed"), 30, "the observed record")
    assert actions(node, "would-do") == ["verify-containerd", "restore-socket-mode"], (
        "no restart would be made"
    )
    [would] = records(node, rule=RULE, action="restore-socket-mode", outcome="would-do")
    assert "restore /run/containerd/containerd.sock's mode to 0660 (it is 0600)" in would["MESSAGE"]
    assert stat(node).startswith("600 0:0 ")
    assert node.unit_property("containerd.service", "MainPID") == pid


def test_a_wrong_owner_is_repaired_by_a_restart(node: Node) -> None:
    start_nodemedic(node, policy=enforced())
    pid = node.unit_property("containerd.service", "MainPID")
    node.run("chown", "1000:1000", SOCKET)
    wait_for(lambda: records(node, rule=RULE, outcome="repaired"), 30, "the repaired record")
    assert node.unit_property("containerd.service", "MainPID") != pid, "a new socket needs a new containerd"
    assert stat(node).startswith("660 0:0 ")
    [skipped] = records(node, rule=RULE, action="restore-socket-mode", outcome="skipped")
    assert "already mode 0660" in skipped["MESSAGE"], "the restart made it anew"
    assert containerd_serving(node)
