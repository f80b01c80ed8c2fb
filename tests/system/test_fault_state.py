"""Fault matrix items 3 and 5 (issue 12) on a real node: a full or read-only state directory
never stops a repair and is said once; a policy removed, or made a symlink into a world-writable
folder, at reload keeps the policy in force with a clear record."""

from __future__ import annotations

import pytest
from lab.faults import (
    POLICY_PATH,
    SHIPPED_POLICY,
    SOCKET,
    containerd_serving,
    make_directory_at,
    records,
    sighup_containerd,
    start_nodemedic,
    state_dir_full,
    state_dir_read_only,
    wait_for,
)
from lab.node import Node

pytestmark = pytest.mark.system
RULE = "socket-path-is-directory"


def repair_once(node: Node, n: int) -> None:
    sighup_containerd(node)
    make_directory_at(node, SOCKET)
    wait_for(lambda: len(records(node, rule=RULE, outcome="repaired")) >= n, 60, f"repair {n}")
    wait_for(lambda: containerd_serving(node), 30, "containerd serving")


def said_once(node: Node) -> None:
    saves = [r for r in records(node, kind="error") if "cannot save state" in r["MESSAGE"]]
    assert len(saves) == 1, [r["MESSAGE"] for r in saves]
    log = node.sh("journalctl -u nodemedic.service -o cat | grep 'in memory only' || true").stdout
    saved = [
        line.split("cannot save ")[1].split(" ")[0] for line in log.splitlines() if "cannot save " in line
    ]
    assert len(saved) == len(set(saved)), f"one warning per state file: {saved}"


def test_a_full_state_directory_never_stops_a_repair(node: Node) -> None:
    state_dir_full(node)
    start_nodemedic(node)
    repair_once(node, 1)
    repair_once(node, 2)
    said_once(node)
    assert node.unit_property("nodemedic.service", "ActiveState") == "active"


def test_a_state_directory_made_read_only_never_stops_a_repair(node: Node) -> None:
    start_nodemedic(node)
    state_dir_read_only(node)
    repair_once(node, 1)
    repair_once(node, 2)
    said_once(node)
    assert node.unit_property("nodemedic.service", "ActiveState") == "active"


def test_a_policy_removed_or_linked_into_a_public_folder_at_reload_keeps_the_old_one(node: Node) -> None:
    start_nodemedic(node)
    node.sh(f"mv {POLICY_PATH} /root/policy.toml")
    node.run("systemctl", "reload", "nodemedic.service")
    wait_for(lambda: records(node, kind="error", outcome="refused"), 10, "the refusal of a missing policy")
    [removed] = records(node, kind="error", outcome="refused")
    assert removed["NODEMEDIC_DETAIL"] == "file not found"
    # /srv/public, not /tmp: nodemedic.service has PrivateTmp=yes and would not see the file
    node.sh("mkdir -p -m 1777 /srv/public && chmod 1777 /srv/public")
    node.write_file("/srv/public/policy.toml", SHIPPED_POLICY.read_text())
    node.sh(f"ln -s /srv/public/policy.toml {POLICY_PATH}")
    node.run("systemctl", "reload", "nodemedic.service")
    wait_for(lambda: len(records(node, kind="error", outcome="refused")) == 2, 10, "the refusal of the link")
    linked = records(node, kind="error", outcome="refused")[-1]
    assert "directory /srv/public is writable by group or others" in linked["NODEMEDIC_DETAIL"]
    assert node.unit_property("nodemedic.service", "ActiveState") == "active"
    repair_once(node, 1)  # the policy in force still repairs
