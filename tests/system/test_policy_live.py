"""The policy on a running node: a broken reload is refused and the old policy stays in force."""

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
    wait_for,
)
from lab.node import Node

pytestmark = pytest.mark.system
RULE = "socket-path-is-directory"


def test_broken_policy_reload_keeps_the_old_one(node: Node) -> None:
    start_nodemedic(node)
    broken = SHIPPED_POLICY.read_text().replace('do = "stop-unit"', 'do = "remove-dir"')
    node.write_file(POLICY_PATH, broken)
    node.run("systemctl", "reload", "nodemedic.service")

    [refused] = wait_for(lambda: records(node, kind="error", outcome="refused"), 10, "the refusal")  # type: ignore[misc]
    assert "unknown action 'remove-dir'" in refused["MESSAGE"]
    assert node.unit_property("nodemedic.service", "ActiveState") == "active"

    sighup_containerd(node)  # the old policy still repairs
    make_directory_at(node, SOCKET)
    wait_for(lambda: records(node, rule=RULE, outcome="repaired"), 30, "the repair under the old policy")
    assert containerd_serving(node)


def test_mode_observe_on_a_running_node(node: Node) -> None:
    start_nodemedic(node)
    out = node.run("nodemedic", "mode", "observe").stdout
    assert "[daemon] mode enforce -> observe" in out
    assert "reloaded nodemedic.service" in out
    assert "# nodemedic policy" in node.sh(f"head -1 {POLICY_PATH}").stdout, "comments are kept"
    wait_for(lambda: records(node, kind="daemon", outcome="reloaded"), 10, "the reload")

    sighup_containerd(node)
    make_directory_at(node, SOCKET)
    wait_for(lambda: records(node, rule=RULE, outcome="observed"), 30, "the observed record")
    assert records(node, outcome="done") == []
    assert node.sh(f"test -d {SOCKET}", check=False).returncode == 0, "the directory stays"
