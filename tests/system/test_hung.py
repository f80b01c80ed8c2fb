"""CASE B on a real node: containerd hung (SIGSTOP: systemd still says active/running), with a real
container running. nodemedic must have containerd answering again within 5 s of the hang, with
the goroutine dump asked for first, and the container must survive."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from lab.faults import (
    STARVE_UNIT,
    containerd_serving,
    records,
    run_container,
    start_nodemedic,
    starve_containerd,
    wait_for,
)
from lab.node import Node

pytestmark = pytest.mark.system
RULE = "containerd-hung"


def test_hung_containerd_is_restarted_and_containers_survive(node_factory: Callable[..., Node]) -> None:
    node = node_factory(containers=True)
    shim = run_container(node, "app")
    start_nodemedic(node)
    pid = node.unit_property("containerd.service", "MainPID")
    hung_at = time.monotonic()
    node.run("kill", "-STOP", pid)

    wait_for(lambda: containerd_serving(node), 15, "containerd to answer again")
    recovered = time.monotonic() - hung_at
    assert recovered < 5.0, f"containerd answered again {recovered:.1f}s after the hang"
    wait_for(lambda: records(node, rule=RULE, outcome="repaired"), 15, "the repaired record")
    actions = [
        (r["NODEMEDIC_ACTION"], r["NODEMEDIC_OUTCOME"]) for r in records(node, rule=RULE, kind="action")
    ]
    assert actions[:3] == [("signal-unit", "done"), ("restart-unit", "done"), ("verify-containerd", "done")]
    assert node.unit_property("containerd.service", "MainPID") != pid
    # the container and its shim went through the restart untouched (KillMode=process)
    assert "RUNNING" in node.run("ctr", "task", "ls").stdout
    assert node.sh(f"test -d /proc/{shim}", check=False).returncode == 0
    assert records(node, rule="socket-path-is-directory") == [], "no other rule mistook the restart"


def test_observe_mode_reports_the_hang_and_touches_nothing(node: Node) -> None:
    start_nodemedic(node, mode="observe")
    pid = node.unit_property("containerd.service", "MainPID")
    node.run("kill", "-STOP", pid)
    try:
        wait_for(lambda: records(node, rule=RULE, outcome="observed"), 15, "the observed record")
        would = {r["NODEMEDIC_ACTION"] for r in records(node, rule=RULE, outcome="would-do")}
        assert {"signal-unit", "restart-unit"} <= would
        assert node.unit_property("containerd.service", "MainPID") == pid, "not restarted"
        assert node.sh(f"grep -q '^State:.*stopped' /proc/{pid}/status", check=False).returncode == 0
    finally:
        node.run("kill", "-CONT", pid)


def test_slow_but_alive_containerd_is_not_restarted(node: Node) -> None:
    """A CPU-starved containerd (stand-in: stopped 350 ms of every 400 ms, lab.faults) answers in up
    to ~400 ms: under the probe's timeout, so nothing is detected and nothing restarted."""
    start_nodemedic(node)
    pid = node.unit_property("containerd.service", "MainPID")
    starve_containerd(node, 15)
    slowest = 0.0
    while node.run("systemctl", "is-active", STARVE_UNIT, check=False).returncode == 0:
        started = time.monotonic()
        node.run("ctr", "--timeout", "5s", "version")
        slowest = max(slowest, time.monotonic() - started)
    assert slowest > 0.2, f"the stand-in slowed nothing (slowest answer {slowest:.2f}s)"
    assert records(node, rule=RULE) == [], "a slow containerd is no hang"
    assert node.unit_property("containerd.service", "MainPID") == pid
    assert node.unit_property("containerd.service", "NRestarts") == "0"
