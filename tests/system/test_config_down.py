"""CASE C while containerd is down, on a real node: config.toml turns broken while containerd waits
for its automatic restart (the toolkit's SIGHUP, RestartSec=5s). nodemedic restores the last-known-good
copy (the broken file kept aside) and restarts containerd at once, before systemd's own start could
meet the broken file. A write in two steps (half the runtime block, then the rest) is judged once
complete (the file trigger's settle): the good file it leaves is not restored over.

The time from fault to serving is bench/config_down.py's (no timing is asserted here)."""

from __future__ import annotations

import time

import pytest
from lab.faults import (
    SHIPPED_POLICY,
    containerd_serving,
    records,
    sighup_containerd,
    start_nodemedic,
    wait_for,
)
from lab.node import Node

pytestmark = pytest.mark.system
DOWN = "containerd-config-broken-while-down"
EDITED = "containerd-config-edited-broken"
CONFIG = "/etc/containerd/config.toml"
BROKEN = 'version = 2\n[plugins."io.containerd.grpc.v1.cri"\n  sandbox_image = "pause"\n'
# The toolkit's runtime block, as its two close-writes leave the file: the first stops mid-value.
RUNTIME = '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia]\n  runtime_type = '
REST = (
    '"io.containerd.runc.v2"\n'
    '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia.options]\n'
    '  BinaryName = "/usr/bin/nvidia-container-runtime"\n'
)


def policy() -> str:
    """The shipped policy, the last-known-good copy taken after 1 s instead of 1 min."""
    return SHIPPED_POLICY.read_text().replace('settle = "1m"', 'settle = "1s"')


def with_a_good_copy(node: Node, mode: str = "enforce") -> str:
    """nodemedic started and a last-known-good copy kept; the good file's sha256."""
    good = node.run("sha256sum", CONFIG).stdout.split()[0]
    start_nodemedic(node, mode=mode, policy=policy())
    wait_for(lambda: records(node, outcome="config-kept"), 15, "a last-known-good copy")
    return good


def refused(node: Node) -> bool:
    """Did containerd ever meet a config it refused?"""
    said = node.run("journalctl", "-u", "containerd", "-q", "--grep", "failed to load TOML", check=False)
    return said.returncode == 0


def fail_containerd(node: Node) -> None:
    """containerd killed with its Restart= off (a drop-in of the test's): failed, no restart coming."""
    node.write_file(
        "/run/systemd/system/containerd.service.d/50-test-no-restart.conf", "[Service]\nRestart=no\n"
    )
    node.run("systemctl", "daemon-reload")
    node.run("systemctl", "kill", "--kill-whom=main", "-s", "KILL", "containerd.service")
    wait_for(
        lambda: node.unit_property("containerd.service", "ActiveState") == "failed", 10, "containerd failed"
    )


@pytest.mark.parametrize("state", ["auto-restart", "failed"])
def test_broken_while_down_is_restored_before_the_restart(node: Node, state: str) -> None:
    good = with_a_good_copy(node)
    if state == "failed":
        fail_containerd(node)
    else:
        sighup_containerd(node)  # down, waiting for its automatic restart
    node.write_file(CONFIG, BROKEN)
    wait_for(lambda: records(node, rule=DOWN, outcome="repaired"), 15, "the repaired record")
    assert containerd_serving(node)
    assert node.run("sha256sum", CONFIG).stdout.split()[0] == good, "restored byte for byte"
    [aside] = node.sh(f"ls {CONFIG}.broken-*").stdout.split()
    assert node.sh(f"cat {aside}").stdout == BROKEN, "the broken file is kept aside"
    assert len(records(node, action="restore-config", outcome="done")) == 1, "one restore"
    assert records(node, rule=DOWN, action="restart-unit", outcome="done"), "restarted, not left to wait"
    assert not refused(node), "containerd never met the broken file"


def test_observe_mode_says_what_it_would_do_while_down(node: Node) -> None:
    with_a_good_copy(node, mode="observe")
    sighup_containerd(node)
    node.write_file(CONFIG, BROKEN)
    wait_for(lambda: records(node, rule=DOWN, outcome="observed"), 15, "the observed record")
    would = {r["NODEMEDIC_ACTION"] for r in records(node, rule=DOWN, outcome="would-do")}
    assert {"restore-config", "restart-unit"} <= would
    assert node.sh(f"cat {CONFIG}").stdout == BROKEN, "observe touches nothing"


def test_nothing_while_an_operator_has_containerd_stopped(node: Node) -> None:
    with_a_good_copy(node)
    node.run("systemctl", "stop", "containerd.service")
    node.write_file(CONFIG, BROKEN)
    wait_for(lambda: records(node, rule=DOWN, outcome="operator-stop"), 15, "the operator-stop record")
    assert node.sh(f"cat {CONFIG}").stdout == BROKEN, "left as the operator's"
    assert node.unit_property("containerd.service", "ActiveState") == "inactive", "not started"
    assert not records(node, action="restore-config")


@pytest.mark.parametrize("down", [True, False], ids=["while-down", "while-running"])
def test_a_two_step_write_is_left_as_written(node: Node, down: bool) -> None:
    """The first close-write leaves a file containerd would refuse; the second, 100 ms later, a good
    one. Within the file triggers' settle (300 ms) nothing is judged: the good file stays."""
    with_a_good_copy(node)
    first = node.sh(f"cat {CONFIG}").stdout + RUNTIME
    node.write_file("/root/first", first)
    node.write_file("/root/rest", REST)
    half = node.run("containerd", "--config", "/root/first", "config", "dump", check=False, timeout=30)
    assert half.returncode != 0, "the first step alone is a file containerd refuses"
    if down:
        sighup_containerd(node)
    node.sh(f"cat /root/first > {CONFIG}; sleep 0.1; cat /root/rest >> {CONFIG}")
    wait_for(lambda: containerd_serving(node), 15, "containerd serving on the file as written")
    time.sleep(2)  # past the settle time and the config check: a restore would have been made by now
    assert node.sh(f"cat {CONFIG}").stdout == first + REST, "the final file is left as written"
    assert not records(node, action="restore-config"), "no restore"
    assert not records(node, rule=DOWN, kind="detected")
    assert not records(node, rule=EDITED, kind="detected")
    assert node.sh(f"ls {CONFIG}.broken-* 2>/dev/null", check=False).stdout == "", "nothing kept aside"
    assert not refused(node)


@pytest.mark.parametrize("restart", ["on-failure", "no"])
def test_broken_while_down_after_a_sighup_without_restart(node: Node, restart: str) -> None:
    """With Restart=on-failure (or no) a SIGHUP leaves containerd inactive/dead (systemd counts the
    signal as a clean exit: Result=success, ExecMainCode=2, ExecMainStatus=1), with no stop job:
    no operator's stop, so the broken file is restored and containerd started again."""
    good = with_a_good_copy(node)
    node.write_file(
        "/run/systemd/system/containerd.service.d/50-test-restart.conf", f"[Service]\nRestart={restart}\n"
    )
    node.run("systemctl", "daemon-reload")
    node.sh("kill -HUP $(systemctl show -p MainPID --value containerd.service)")
    wait_for(
        lambda: node.unit_property("containerd.service", "ActiveState") == "inactive", 10, "containerd dead"
    )
    assert node.unit_property("containerd.service", "ExecMainStatus") == "1", "died of SIGHUP"
    node.write_file(CONFIG, BROKEN)
    wait_for(lambda: records(node, rule=DOWN, outcome="repaired"), 15, "the repaired record")
    assert containerd_serving(node)
    assert node.run("sha256sum", CONFIG).stdout.split()[0] == good, "restored byte for byte"
    assert not records(node, outcome="operator-stop"), "a death, not an operator's stop"


def test_a_start_between_the_two_steps_is_not_restored_over(node: Node) -> None:
    """containerd (re)started between the toolkit's two writes fails on the half file and says so in
    the journal: the journal rule (containerd-config-broken) waits for the file to settle too, and
    leaves the file the toolkit finishes; systemd's next automatic start serves on it."""
    with_a_good_copy(node)
    first = node.sh(f"cat {CONFIG}").stdout + RUNTIME
    node.write_file("/root/first", first)
    node.write_file("/root/rest", REST)
    sighup_containerd(node)
    node.sh(
        f"cat /root/first > {CONFIG}; (sleep 0.2; cat /root/rest >> {CONFIG}) & "
        "systemctl restart containerd.service; wait",
        check=False,
    )
    assert refused(node), "containerd met the half-written file (the case under test)"
    wait_for(lambda: containerd_serving(node), 20, "containerd serving on the file as written")
    time.sleep(1)
    assert node.sh(f"cat {CONFIG}").stdout == first + REST, "the final file is left as written"
    assert not records(node, action="restore-config"), "no restore"
    assert node.sh(f"ls {CONFIG}.broken-* 2>/dev/null", check=False).stdout == "", "nothing kept aside"
