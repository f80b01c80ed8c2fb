"""SIGHUP storms on a real node: every [sighup] mode, a config change during a storm, nodemedic
killed mid-storm, and a mode switch. The sender is a stand-in unit for the nvidia-container-toolkit
pod (lab/faults.py): it SIGHUPs containerd's main PID the way the toolkit does. Nodes are booted with
tracefs and the host's /proc (the trace's PIDs are the host's: lab.md)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from lab.faults import (
    SighupPattern,
    containerd_serving,
    containerd_starts,
    records,
    run_container,
    sighup_policy,
    start_nodemedic,
    start_toolkit_standin,
    wait_for,
)
from lab.node import Node

pytestmark = pytest.mark.system
NodeFactory = Callable[..., Node]

CONFIG = "/etc/containerd/config.toml"
DROPIN = "/run/systemd/system/containerd.service.d/50-nodemedic-sighup.conf"
STANDIN_CGROUP = "/sys/fs/cgroup/system.slice/toolkit-standin.service"


def outcome(node: Node, name: str) -> list[dict[str, str]]:
    return records(node, outcome=name)


def wait_outcome(node: Node, name: str, timeout: float, count: int = 1) -> list[dict[str, str]]:
    wait_for(lambda: len(outcome(node, name)) >= count, timeout, f"{count} record(s) {name}", 0.25)
    return outcome(node, name)


def main_pid(node: Node) -> int:
    return int(node.unit_property("containerd.service", "MainPID"))


def ignores_sighup(node: Node) -> bool:
    status = node.sh(f"grep SigIgn /proc/{main_pid(node)}/status", check=False).stdout.split()
    return len(status) == 2 and int(status[1], 16) & 1 == 1


def boot(node_factory: NodeFactory, containers: bool = False) -> Node:
    return node_factory(tracefs=True, host_proc=True, containers=containers)


def test_observe_names_the_sender_and_reports_a_storm_once(node_factory: NodeFactory) -> None:
    node = boot(node_factory)
    start_nodemedic(node, "enforce", sighup_policy("observe", storm={"signals": 2, "window": "20s"}))
    standin = start_toolkit_standin(node, SighupPattern(crashes=1, signals=3, every=6, pause=0, bursts=0))
    wait_for(lambda: standin.counts().finished, 40, "the stand-in's SIGHUPs")
    (storm,) = wait_outcome(node, "storm", 10)
    assert storm["NODEMEDIC_SIGNALS"] == "3"
    assert "toolkit-standin.service" in storm["NODEMEDIC_SENDERS"]
    singles = outcome(node, "sighup")
    assert len(singles) == 2
    assert all(r["NODEMEDIC_CGROUP"] == "/system.slice/toolkit-standin.service" for r in singles)
    (ended,) = wait_outcome(node, "storm-ended", 30)
    assert ended["NODEMEDIC_SIGNALS"] == "3"
    # observe changed nothing: containerd died of each SIGHUP and was restarted by systemd
    assert int(node.unit_property("containerd.service", "NRestarts")) == 3
    assert node.sh(f"test -e {DROPIN}", check=False).returncode != 0


def test_coalesce_absorbs_a_storm_and_applies_a_change_made_during_it_exactly_once(
    node_factory: NodeFactory,
) -> None:
    node = boot(node_factory, containers=True)
    run_container(node, "survivor")
    policy = sighup_policy("coalesce", coalesce={"interval": "10s"}, storm={"signals": 3, "window": "10s"})
    start_nodemedic(node, "enforce", policy)
    wait_outcome(node, "dropin-applied", 30)
    assert ignores_sighup(node)
    before, since = main_pid(node), float(node.sh("date +%s.%N").stdout)

    standin = start_toolkit_standin(node, SighupPattern(crashes=1, signals=60, every=0.1, pause=0, bursts=0))
    time.sleep(2)
    node.sh(f"echo '# changed during the storm' >> {CONFIG}")
    wait_for(lambda: standin.counts().finished, 30, "the stand-in's SIGHUPs")
    (_applied,) = wait_outcome(node, "reload-applied", 30)
    time.sleep(3)  # nothing more may come

    assert standin.counts().delivered == 60
    assert len(outcome(node, "reload-applied")) == 1
    assert "changed during the storm" in node.sh(f"cat {CONFIG}").stdout
    assert containerd_starts(node, since) == 1  # the one restart that applied the change
    assert main_pid(node) != before
    assert ignores_sighup(node)
    assert len(outcome(node, "storm")) == 1
    assert containerd_serving(node)
    assert "survivor " in node.sh("ctr task ls | grep RUNNING").stdout

    # a change containerd would refuse: the shipped rule containerd-config-edited-broken puts it aside
    # and restores what containerd runs with (kept as good once it served); no restart either way
    pid, applied = main_pid(node), node.sh(f"cat {CONFIG}").stdout
    node.sh(f"echo '[plugins' >> {CONFIG}")
    start_toolkit_standin(node, SighupPattern(crashes=1, signals=3, every=0.2, pause=0, bursts=0),
                          unit="toolkit-standin-2.service")  # fmt: skip
    wait_for(lambda: records(node, rule="containerd-config-edited-broken", outcome="repaired"), 30,
             "the broken edit to be put aside")  # fmt: skip
    assert node.sh(f"cat {CONFIG}").stdout == applied
    assert "[plugins" in node.sh(f"cat {CONFIG}.broken-*").stdout
    time.sleep(3)
    assert main_pid(node) == pid
    assert outcome(node, "reload-applied") == [_applied]
    assert containerd_serving(node)


def test_throttle_freezes_the_sender_and_thaws_it_also_when_nodemedic_is_killed(
    node_factory: NodeFactory,
) -> None:
    node = boot(node_factory)
    policy = sighup_policy("throttle", throttle={"burst": 2, "refill": 1, "per": "5m", "cooldown": "6s"})
    start_nodemedic(node, "enforce", policy)
    standin = start_toolkit_standin(node, SighupPattern(crashes=1, signals=6, every=6, pause=0, bursts=0))
    (frozen,) = wait_outcome(node, "frozen", 40)
    assert frozen["NODEMEDIC_CGROUP"] == "/system.slice/toolkit-standin.service"
    assert "frozen 1" in node.sh(f"cat {STANDIN_CGROUP}/cgroup.events").stdout
    sent = standin.counts().attempts
    time.sleep(2)
    assert standin.counts().attempts == sent  # frozen: it sends nothing
    wait_outcome(node, "thawed", 20)
    # thawed, it sends again at once and, still over budget, is frozen again
    wait_outcome(node, "frozen", 40, count=2)
    assert standin.counts().attempts > sent

    # nodemedic is killed: ExecStopPost thaws, and systemd starts nodemedic again
    assert "frozen 1" in node.sh(f"cat {STANDIN_CGROUP}/cgroup.events").stdout
    node.run("systemctl", "kill", "-s", "KILL", "nodemedic.service")
    wait_for(lambda: "frozen 0" in node.sh(f"cat {STANDIN_CGROUP}/cgroup.events").stdout, 10,
             "ExecStopPost to thaw the stand-in")  # fmt: skip
    wait_for(lambda: node.unit_property("nodemedic.service", "SubState") == "running", 20,
             "nodemedic to be restarted")  # fmt: skip


def test_killed_mid_storm_then_a_change_is_applied_when_nodemedic_is_back(node_factory: NodeFactory) -> None:
    node = boot(node_factory)
    start_nodemedic(node, "enforce", sighup_policy("coalesce", coalesce={"interval": "5s"}))
    wait_outcome(node, "dropin-applied", 30)
    pid = main_pid(node)
    standin = start_toolkit_standin(node, SighupPattern(crashes=1, signals=80, every=0.1, pause=0, bursts=0))
    time.sleep(1)
    node.run("systemctl", "kill", "-s", "KILL", "nodemedic.service")
    node.sh(f"echo '# changed while nodemedic was down' >> {CONFIG}")
    wait_for(lambda: standin.counts().finished, 30, "the stand-in's SIGHUPs")
    # the drop-in stayed: containerd survived every SIGHUP while nodemedic was down
    assert node.sh(f"test -f {DROPIN}", check=False).returncode == 0
    wait_for(lambda: node.unit_property("nodemedic.service", "SubState") == "running", 20,
             "nodemedic to be restarted")  # fmt: skip
    assert len(wait_outcome(node, "reload-applied", 30)) == 1
    assert main_pid(node) != pid
    assert ignores_sighup(node)
    assert containerd_serving(node)


def test_leaving_coalesce_removes_the_dropin(node_factory: NodeFactory) -> None:
    node = boot(node_factory)
    start_nodemedic(node, "enforce", sighup_policy("coalesce"))
    wait_outcome(node, "dropin-applied", 30)
    node.write_file("/etc/nodemedic/policy.toml", sighup_policy("observe"))
    node.run("systemctl", "reload", "nodemedic.service")
    (removed,) = wait_outcome(node, "dropin-removed", 20)
    assert node.sh(f"test -e {DROPIN}", check=False).returncode != 0
    assert "next start" in removed["MESSAGE"]
    node.run("systemctl", "restart", "containerd.service")
    assert not ignores_sighup(node)  # stock again
