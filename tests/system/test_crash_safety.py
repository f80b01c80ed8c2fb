"""nodemedic SIGKILLed in the middle of a repair (OOM, watchdog): systemd starts it again
(Restart=on-failure) and it finishes the repair it was cut off in, from its record (repair.json),
with no human: containerd serves again, the record is gone, and the journal says it was recovered.

Each case kills at one boundary of the socket-directory repair (CASE A) or the config repair
(CASE C). The directory holds 20,000 small files, so its copy to the quarantine and its removal
after take long enough to be caught; the kill is sent from inside the node by the script that sees
the boundary."""

from __future__ import annotations

import pytest
from lab.faults import (
    QUARANTINE,
    REPAIR_RECORD,
    SHIPPED_POLICY,
    SOCKET,
    containerd_serving,
    kill_nodemedic_when,
    make_large_directory_at,
    realtime,
    records,
    sighup_containerd,
    start_nodemedic,
    wait_for,
)
from lab.node import Node

pytestmark = pytest.mark.system
FILES = 20_000
ASIDE = "/run/containerd/.containerd.sock.nodemedic-*"
BROKEN = 'version = 2\\n[plugins."io.containerd.grpc.v1.cri"\\n  sandbox_image = "pause"\\n'
RECOVERY = 90  # systemd's RestartSec=2s, nodemedic's start, the copy again: generous on 2 cores


def _step(name: str) -> str:
    return f'grep -q \'"step": "{name}"\' {REPAIR_RECORD} 2>/dev/null'


SOCKET_BOUNDARIES = {
    # the first change is recorded: containerd being stopped, or just stopped
    "stop": f"test -e {REPAIR_RECORD}",
    # the directory moved aside, its copy to the quarantine under way
    "copy": f"ls -d {QUARANTINE}/*.partial >/dev/null 2>&1",
    # the copy complete, the aside directory being removed
    "removal": f"ls -d {QUARANTINE}/*-containerd.sock >/dev/null 2>&1 && ls -d {ASIDE} >/dev/null 2>&1",
    # the socket path free, containerd being started
    "start": _step("start-unit"),
}
CONFIG_BOUNDARIES = {
    # the first change recorded: the stop (skipped where containerd is already down), or the restore
    "stop": f"test -e {REPAIR_RECORD}",
    "restore": _step("restore-config"),
    "start": _step("start-unit"),
}


def socket_policy() -> str:
    """The shipped policy, with room for the whole directory in the quarantine (the default
    max_entries keeps a directory of 20,000 entries aside whole, with nothing to remove)."""
    return SHIPPED_POLICY.read_text().replace(
        'root = "/run/containerd"\n',
        'root = "/run/containerd"\nmax_entries = 50000\nmax_seconds = "60s"\n',
        1,
    )


def config_policy() -> str:
    """The shipped policy without the rules for a broken edit under a running or a down containerd
    (CASE C here is containerd meeting the broken file at its start) and with no good copy taken in
    time: the repair generates a default."""
    import tomlkit

    doc = tomlkit.parse(SHIPPED_POLICY.read_text().replace('settle = "1m"', 'settle = "1h"'))
    rules = doc["rule"]
    for name in ("containerd-config-edited-broken", "containerd-config-broken-while-down"):
        del rules[[r["name"] for r in rules].index(name)]  # type: ignore[union-attr]
    return tomlkit.dumps(doc)


def break_config_and_restart(node: Node) -> None:
    """A partial section, as a crashing toolkit leaves it; its next SIGHUP makes containerd reload."""
    node.sh(f"printf '{BROKEN}' > /etc/containerd/config.toml")
    node.run("kill", "-HUP", node.unit_property("containerd.service", "MainPID"))


def assert_recovered(node: Node, killed: float) -> dict[str, str]:
    """containerd serves with no human, the repair record is gone, the journal says so. Prints the
    step cut off and the seconds from the kill to the 'recovered' record (docs/reliability.md)."""
    wait_for(lambda: records(node, outcome="recovered"), RECOVERY, "the 'recovered' record")
    wait_for(lambda: containerd_serving(node), 30, "containerd to serve")
    assert node.sh(f"test -e {REPAIR_RECORD}", check=False).returncode != 0, "the record is cleared"
    assert int(node.unit_property("nodemedic.service", "NRestarts")) >= 1, "systemd started it again"
    [interrupted] = records(node, outcome="interrupted")
    [recovered] = records(node, outcome="recovered")
    assert interrupted["NODEMEDIC_INCIDENT"] == recovered["NODEMEDIC_INCIDENT"]
    assert node.unit_property("kubelet.service", "ActiveState") == "active"
    took = realtime(recovered) - killed
    print(f"cut off in {interrupted['NODEMEDIC_ACTION']}: recovered {took:.1f}s after the kill")
    return interrupted


@pytest.mark.parametrize("boundary", list(SOCKET_BOUNDARIES))
def test_killed_during_the_socket_directory_repair(node: Node, boundary: str) -> None:
    start_nodemedic(node, policy=socket_policy())
    sighup_containerd(node)
    make_large_directory_at(node, SOCKET, FILES)
    killed = kill_nodemedic_when(node, SOCKET_BOUNDARIES[boundary])
    assert killed is not None, f"the {boundary} boundary was seen"

    interrupted = assert_recovered(node, killed)
    assert interrupted["NODEMEDIC_RULE"] == "socket-path-is-directory"
    assert node.sh(f"test -S {SOCKET}", check=False).returncode == 0
    # nothing of the pod's directory lost: all of it in one complete quarantine entry, none left aside
    wait_for(lambda: node.sh(f"ls -d {ASIDE}", check=False).returncode != 0, 30, "the aside copy removed")
    [entry] = node.sh(f"ls -d {QUARANTINE}/*-containerd.sock").stdout.split()
    assert int(node.sh(f"ls {entry} | grep -c '^f'").stdout) == FILES
    assert '"complete": true' in node.sh(f"cat {entry}/MANIFEST.nodemedic.json").stdout


@pytest.mark.parametrize("boundary", list(CONFIG_BOUNDARIES))
def test_killed_during_the_config_repair(node: Node, boundary: str) -> None:
    start_nodemedic(node, policy=config_policy())
    break_config_and_restart(node)
    killed = kill_nodemedic_when(node, CONFIG_BOUNDARIES[boundary])
    assert killed is not None, f"the {boundary} boundary was seen"

    interrupted = assert_recovered(node, killed)
    assert interrupted["NODEMEDIC_RULE"] == "containerd-config-broken"
    assert "SystemdCgroup = true" in node.sh("cat /etc/containerd/config.toml").stdout
