"""`nodemedic status` on a real node with the .deb installed: asked of the daemon over the system
bus while a repair is under way and after it, then read from the state files with the daemon
stopped. `packaging/build.py` builds the package (cached under build/packages)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from lab.faults import POLICY_PATH, SOCKET, make_directory_at, records, sighup_containerd, wait_for
from lab.node import Node
from lab.package import build_packages, install_deb

pytestmark = pytest.mark.system
REPO = Path(__file__).resolve().parents[2]
RULE = "socket-path-is-directory"
UNIT = "nodemedic.service"
# The kubelet stand-in takes this long to start again: the repair's last step (restart-unit
# kubelet.service) keeps the repair under way long enough for a status to see it.
SLOW_START = 4


@pytest.fixture(scope="module")
def deb() -> str:
    return build_packages()["deb"]


def install(node: Node, deb: str) -> None:
    """The package alone provides nodemedic (lab/package.py); postinst starts the service."""
    install_deb(node, deb)
    assert node.unit_property(UNIT, "ActiveState") == "active"


def status(node: Node, *args: str) -> tuple[int, str]:
    done = node.run("nodemedic", "status", *args, check=False, timeout=30)
    return done.returncode, done.stdout


def snapshot(node: Node) -> tuple[int, dict[str, Any]]:
    code, out = status(node, "--json")
    return code, json.loads(out)


def row_of(text: str) -> str:
    """The rule's row in the readable summary."""
    [row] = [line for line in text.splitlines() if line.startswith(RULE)]
    return row


def under_way(node: Node) -> dict[str, Any] | None:
    """The status, if it shows the rule's repair under way."""
    snap = snapshot(node)[1]
    return snap if rule_of(snap)["running"] else None


def rule_of(snap: dict[str, Any]) -> dict[str, Any]:
    [rule] = [r for r in snap["rules"] if r["name"] == RULE]
    return rule


def test_status_during_and_after_a_repair_and_with_the_daemon_stopped(node: Node, deb: str) -> None:
    install(node, deb)
    slow = f"[Service]\nExecStartPre=/bin/sleep {SLOW_START}\n"
    node.write_file("/etc/systemd/system/kubelet.service.d/slow.conf", slow)
    node.run("systemctl", "daemon-reload")

    code, snap = snapshot(node)
    assert (code, snap["schema"], snap["running"]) == (0, 1, True)
    assert snap["policy"]["path"] == POLICY_PATH
    assert snap["policy"]["sha256"] == node.run("sha256sum", POLICY_PATH).stdout.split()[0]
    assert snap["started_at"] is not None
    assert snap["uptime_s"] >= 0
    assert rule_of(snap)["breaker"]["state"] == "closed"
    assert rule_of(snap)["last_repair"] is None
    code, text = status(node)
    assert code == 0
    assert f"nodemedic {snap['version']} running since" in text.splitlines()[0]

    sighup_containerd(node)
    make_directory_at(node, SOCKET)
    # during: the repair waits for the slow kubelet stand-in
    during = wait_for(lambda: under_way(node), 30, "a status showing the repair under way")
    assert isinstance(during, dict)
    assert rule_of(during)["last_repair"] is None
    detected = rule_of(during)["last_trigger"]
    assert detected is not None, "the incident was detected before the repair began"
    assert "is a directory" in detected["trigger"]
    assert row_of(status(node)[1]).endswith("repair under way")

    wait_for(lambda: records(node, rule=RULE, outcome="repaired"), 60, "the 'repaired' record")
    [repaired] = records(node, rule=RULE, outcome="repaired")
    code, after = snapshot(node)
    rule = rule_of(after)
    assert code == 0
    assert rule["running"] is False
    assert rule["last_repair"]["outcome"] == "repaired"
    assert rule["last_repair"]["incident"] == repaired["NODEMEDIC_INCIDENT"] == detected["incident"]
    assert rule["last_repair"]["elapsed_ms"] == pytest.approx(float(repaired["NODEMEDIC_ELAPSED_MS"]), abs=1)
    assert rule["breaker"]["state"] == "closed"
    assert after["budget"]["spent"] >= 1
    assert f"repaired {rule['last_repair']['at']}" in row_of(status(node)[1])

    node.run("systemctl", "stop", UNIT, timeout=60)
    code, text = status(node)
    assert code == 1
    assert text.startswith("nodemedic is not running (no process owns io.nodemedic1 on the system bus)")
    assert "from its state files: mode enforce" in text
    code, offline = snapshot(node)
    assert (code, offline["running"]) == (1, False)
    kept = rule_of(offline)
    assert kept["last_repair"]["outcome"] == "repaired", "the breaker's memory, from state.json"
    assert (kept["running"], kept["last_trigger"], offline["started_at"]) == (None, None, None)
    assert offline["budget"]["spent"] == after["budget"]["spent"]
    assert offline["policy"]["sha256"] == after["policy"]["sha256"]
