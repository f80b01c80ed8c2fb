"""The second field guide's causes on a real node (issue 4, case 5), in enforce and observe mode:
file-descriptor exhaustion (real: containerd's limit lowered, its fds held by real connections),
a socket's mode changed by hand, a corrupted metadata database, a containerd version with known
bugs, and CPU pressure in containerd's cgroup. OOM kills and SELinux/AppArmor denials cannot be
made in a lab node (no memory controller in its cgroup2; its journald reads no kernel lines): they
are covered by unit tests and samples only."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from lab.faults import (
    SHIPPED_POLICY,
    SOCKET,
    containerd_serving,
    records,
    run_container,
    start_nodemedic,
    wait_for,
)
from lab.node import Node

pytestmark = pytest.mark.system
FAULT_DROPIN = "/etc/systemd/system/containerd.service.d/50-lab-fault.conf"
OUR_DROPIN = "/run/systemd/system/containerd.service.d/90-nodemedic-nofile.conf"
# The opt-in of docs/operations.md: counting containerd's fds needs CAP_SYS_PTRACE, writing the
# drop-in needs its folder to exist when nodemedic's sandbox is set up.
OPT_IN = ("[Service]\nCapabilityBoundingSet=CAP_SYS_PTRACE\n"
          "ExecStartPre=+/bin/mkdir -p /run/systemd/system/containerd.service.d\n")  # fmt: skip
META_DB = "/var/lib/containerd/io.containerd.metadata.v1.bolt/meta.db"
HOLD_FDS = ("import socket, time\nheld = []\nfor _ in range({n}):\n    s = socket.socket(socket.AF_UNIX)\n"
            "    s.connect('{sock}')\n    held.append(s)\ntime.sleep(3600)\n")  # fmt: skip


def rule_enforced(name: str, text: str | None = None) -> str:
    """The shipped policy with an opt-in rule (shipped with mode = "observe") turned on."""
    text = text if text is not None else SHIPPED_POLICY.read_text()
    rule = re.compile(rf'(name = "{name}"\n(?:.*\n){{0,3}}?)mode = "observe"')
    assert rule.search(text), f"the shipped {name} rule has mode = observe"
    return rule.sub(r'\1mode = "enforce"', text, count=1)


def fd_rule_enforced() -> str:
    # The node's systemd caps LimitNOFILE at 20000 (containerd's "infinity" there): ask for less.
    text = SHIPPED_POLICY.read_text().replace("limit = 1048576", "limit = 16384", 1)
    return rule_enforced("containerd-fd-exhaustion", text)


def soft_limit(node: Node) -> int:
    pid = node.unit_property("containerd.service", "MainPID")
    return int(node.sh(f"awk '/Max open files/ {{print $4}}' /proc/{pid}/limits").stdout)


def exhaust_fds(node: Node, limit: int = 256, held: int = 230) -> None:
    """containerd restarted with a low limit, then ``held`` connections to its socket kept open by a
    helper unit: containerd holds one fd per connection, as with a leaking client."""
    node.write_file(FAULT_DROPIN, f"[Service]\nLimitNOFILE={limit}\n")
    node.run("systemctl", "daemon-reload")
    node.run("systemctl", "restart", "containerd.service")
    assert soft_limit(node) == limit
    node.write_file("/root/hold.py", HOLD_FDS.format(n=held, sock=SOCKET))
    node.run("systemd-run", "--unit=fd-holder", "python3", "/root/hold.py")
    pid = node.unit_property("containerd.service", "MainPID")
    wait_for(lambda: int(node.sh(f"ls /proc/{pid}/fd | wc -l").stdout) > 0.8 * limit, 15,
             "containerd to hold over 80 % of its fds")  # fmt: skip


def opt_in(node: Node) -> None:
    node.write_file("/etc/systemd/system/nodemedic.service.d/60-nofile-opt-in.conf", OPT_IN)
    node.run("systemctl", "daemon-reload")


def test_fd_exhaustion_is_repaired_with_a_drop_in_when_opted_in(node_factory: Callable[..., Node]) -> None:
    node = node_factory(containers=True)
    shim = run_container(node, "app")
    opt_in(node)
    exhaust_fds(node)
    old = node.unit_property("containerd.service", "MainPID")
    start_nodemedic(node, policy=fd_rule_enforced())
    [done] = wait_for(lambda: records(node, rule="containerd-fd-exhaustion", outcome="repaired"), 40,
                      "the repaired record")  # type: ignore[misc]  # fmt: skip
    [raised] = records(node, rule="containerd-fd-exhaustion", action="raise-nofile-limit", outcome="done")
    assert "LimitNOFILE 16384" in raised["NODEMEDIC_DETAIL"]
    assert node.unit_property("containerd.service", "MainPID") != old
    assert soft_limit(node) == 16384
    assert "# nodemedic: managed drop-in" in node.sh(f"cat {OUR_DROPIN}").stdout
    assert "LimitNOFILE=256" in node.sh(f"cat {FAULT_DROPIN}").stdout, "the operator's file is untouched"
    assert containerd_serving(node)
    assert "RUNNING" in node.run("ctr", "task", "ls").stdout, "the container survived"
    assert node.sh(f"test -d /proc/{shim}", check=False).returncode == 0
    assert done["NODEMEDIC_MODE"] == "enforce"


def test_fd_exhaustion_in_the_shipped_observe_mode_changes_nothing(node: Node) -> None:
    opt_in(node)
    exhaust_fds(node)
    old = node.unit_property("containerd.service", "MainPID")
    start_nodemedic(node)  # the daemon enforces; the fd rule ships in observe mode
    wait_for(
        lambda: records(node, rule="containerd-fd-exhaustion", outcome="observed"), 30, "the observed record"
    )
    [detected] = records(node, rule="containerd-fd-exhaustion", kind="detected")
    assert re.search(r"has 2\d\d of 256 file descriptors open", detected["MESSAGE"]), detected["MESSAGE"]
    would = {
        r["NODEMEDIC_ACTION"] for r in records(node, rule="containerd-fd-exhaustion", outcome="would-do")
    }
    assert "raise-nofile-limit" in would
    assert node.unit_property("containerd.service", "MainPID") == old
    assert soft_limit(node) == 256
    assert node.sh(f"test -e {OUR_DROPIN}", check=False).returncode != 0


@pytest.mark.parametrize("mode", ["enforce", "observe"])
def test_a_socket_with_the_wrong_mode(node_factory: Callable[..., Node], mode: str) -> None:
    node = node_factory(containers=True)
    run_container(node, "app")
    # shipped in observe; a rule's own mode wins over [daemon]'s, so observe keeps the shipped one
    start_nodemedic(
        node, mode=mode, policy=rule_enforced("containerd-socket-mode") if mode == "enforce" else None
    )
    old = node.unit_property("containerd.service", "MainPID")
    node.run("chmod", "000", SOCKET)
    outcome = "repaired" if mode == "enforce" else "observed"
    wait_for(
        lambda: records(node, rule="containerd-socket-mode", outcome=outcome), 30, f"the {outcome} record"
    )
    [detected] = records(node, rule="containerd-socket-mode", kind="detected")
    assert "is mode 0000 owner 0:0, expected 0660 0:0" in detected["MESSAGE"]
    mode_now = node.sh(f"stat -c %a {SOCKET}").stdout.strip()
    if mode == "enforce":
        assert mode_now == "660"
        # restore-socket-mode puts the bits back in place: containerd is not restarted any more
        assert node.unit_property("containerd.service", "MainPID") == old
        assert "RUNNING" in node.run("ctr", "task", "ls").stdout, "the container survived"
        assert containerd_serving(node)
    else:
        assert mode_now == "0"
        assert node.unit_property("containerd.service", "MainPID") == old


@pytest.mark.parametrize("mode", ["enforce", "observe"])
def test_a_corrupted_metadata_database_is_reported_never_touched(node: Node, mode: str) -> None:
    start_nodemedic(node, mode=mode)
    node.run("systemctl", "stop", "containerd.service")
    node.sh(f"dd if=/dev/zero of={META_DB} bs=4096 count=8 status=none")
    digest = node.run("sha256sum", META_DB).stdout
    node.run("systemctl", "start", "containerd.service")
    [reported] = wait_for(lambda: records(node, rule="containerd-state-corrupted", outcome="reported"), 30,
                          "the reported record")  # type: ignore[misc]  # fmt: skip
    assert "move meta.db" in reported["NODEMEDIC_DETAIL"], "the record says what the operator can do"
    assert reported["NODEMEDIC_MODE"] == mode
    assert node.run("sha256sum", META_DB).stdout == digest, "the database is never touched"
    assert records(node, rule="containerd-state-corrupted", kind="action") == []


@pytest.mark.parametrize("mode", ["enforce", "observe"])
def test_a_version_with_known_bugs_is_reported_once(node: Node, mode: str) -> None:
    start_nodemedic(node, mode=mode)
    [reported] = wait_for(lambda: records(node, rule="containerd-known-bugs", outcome="reported"), 30,
                          "the reported record")  # type: ignore[misc]  # fmt: skip
    assert "containerd 1.6.20~ds1 has known bugs" in reported["NODEMEDIC_TRIGGER"]
    assert "CVE-2024-40635" in reported["NODEMEDIC_TRIGGER"]
    node.run("sleep", "11")  # two more readings of the same version
    assert len(records(node, rule="containerd-known-bugs", outcome="reported")) == 1


@pytest.mark.parametrize("mode", ["enforce", "observe"])
def test_cpu_pressure_in_containerds_cgroup_is_reported(node: Node, mode: str) -> None:
    # Real pressure, kept short and low-priority (the lab's 2 cores are shared): 3 busy loops at
    # nice 19 inside containerd's cgroup, for at most 20 s; the threshold is lowered to 10 %.
    policy = SHIPPED_POLICY.read_text().replace(
        'resource = "cpu"\nline = "some"\nabove = 60.0', 'resource = "cpu"\nline = "some"\nabove = 10.0'
    )
    start_nodemedic(node, mode=mode, policy=policy)
    cgroup = "/sys/fs/cgroup/system.slice/containerd.service/cgroup.procs"
    hog = f"sh -c 'echo $$ > {cgroup}; exec nice -n 19 timeout 20 sh -c \"while :; do :; done\"'"
    node.sh(" & ".join([hog] * 3) + " & true")
    reported, *_ = wait_for(lambda: records(node, rule="containerd-starved", outcome="reported"), 40,
                            "the reported record")  # type: ignore[misc]  # fmt: skip
    assert "cpu pressure (containerd's cgroup)" in reported["NODEMEDIC_TRIGGER"]
    assert records(node, rule="containerd-starved", kind="action") == []
