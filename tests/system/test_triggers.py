"""Probe and signal triggers on a real node: a SIGHUP seen over D-Bus, a hung containerd seen by the probe.

The rules are in observe mode: this proves detection on real systemd and containerd; the repairs
for these faults belong to their own rules."""

from __future__ import annotations

import pytest
from lab.faults import records, start_nodemedic, wait_for
from lab.node import Node

pytestmark = pytest.mark.system

POLICY = """
[daemon]
mode = "observe"
[daemon.probe]
interval = "500ms"
timeout = "1s"

[[rule]]
name = "containerd-got-sighup"
[[rule.trigger]]
source = "signal"
unit = "containerd.service"
signal = "SIGHUP"
[[rule.action]]
do = "start-unit"
unit = "containerd.service"

[[rule]]
name = "containerd-hung"
[[rule.trigger]]
source = "probe"
failures = 3
[rule.when]
unit = "containerd.service"
active_state = ["active"]
[[rule.action]]
do = "restart-unit"
unit = "containerd.service"
"""


def test_sighup_is_seen_over_dbus_once(node: Node) -> None:
    start_nodemedic(node, policy=POLICY)
    pid = node.unit_property("containerd.service", "MainPID")
    node.run("kill", "-HUP", pid)
    [seen] = wait_for(lambda: records(node, rule="containerd-got-sighup", kind="detected"), 10, "the SIGHUP")  # type: ignore[misc]
    assert seen["NODEMEDIC_SOURCE"] == "dbus"
    assert f"main process {pid} was killed by signal 1" in seen["MESSAGE"]
    wait_for(lambda: node.unit_property("containerd.service", "SubState") == "running", 15, "the restart")
    assert len(records(node, rule="containerd-got-sighup", kind="detected")) == 1, "one death, one record"
    assert records(node, rule="containerd-hung", kind="detected") == [], "restarting is not hung"


def test_hung_containerd_is_seen_by_the_probe(node: Node) -> None:
    start_nodemedic(node, policy=POLICY)
    pid = node.unit_property("containerd.service", "MainPID")
    node.run("kill", "-STOP", pid)  # systemd still says active/running
    try:
        [seen] = wait_for(lambda: records(node, rule="containerd-hung", kind="detected"), 15, "the hang")  # type: ignore[misc]
        assert seen["NODEMEDIC_SOURCE"] == "probe"
        assert "did not answer 3 requests in a row" in seen["MESSAGE"]
        assert node.unit_property("containerd.service", "ActiveState") == "active"
    finally:
        node.run("kill", "-CONT", pid)
