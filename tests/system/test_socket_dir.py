"""The incident on a real node: containerd SIGHUPed, a directory created at its socket path in the
restart window. nodemedic runs as a systemd unit from the checkout."""

from __future__ import annotations

import pytest
from lab.faults import (
    SOCKET,
    TTRPC,
    containerd_serving,
    make_directory_at,
    realtime,
    records,
    sighup_containerd,
    start_nodemedic,
    wait_for,
)
from lab.node import Node

pytestmark = pytest.mark.system
RULE = "socket-path-is-directory"


def containerd_said(node: Node, text: str) -> bool:
    grep = node.run("journalctl", "-q", "-u", "containerd.service", "--grep", text, check=False)
    return grep.returncode == 0


def repaired(node: Node) -> list[dict[str, str]]:
    return records(node, rule=RULE, outcome="repaired")


@pytest.mark.parametrize("path", [SOCKET, TTRPC], ids=["containerd.sock", "containerd.sock.ttrpc"])
def test_directory_at_socket_path_is_repaired(node: Node, path: str) -> None:
    start_nodemedic(node)
    restarts_before = int(node.unit_property("containerd.service", "NRestarts"))
    sighup_containerd(node)
    fault_at = make_directory_at(node, path)

    wait_for(lambda: repaired(node), 30, "nodemedic's 'repaired' record")
    assert containerd_serving(node)
    assert node.sh(f"test -S {path}", check=False).returncode == 0, f"{path} is a socket again"
    assert node.unit_property("containerd.service", "ActiveState") == "active"
    assert node.unit_property("kubelet.service", "ActiveState") == "active"

    [detected] = records(node, rule=RULE, kind="detected")
    assert detected["NODEMEDIC_MODE"] == "enforce"
    assert realtime(detected) - fault_at < 2.0, "detected at once, not at systemd's next restart"
    actions = {r["NODEMEDIC_ACTION"]: r["NODEMEDIC_OUTCOME"] for r in records(node, rule=RULE, kind="action")}
    assert actions == {"stop-unit": "done", "remove-socket-dir": "done", "start-unit": "done",
                       "verify-containerd": "done", "restart-unit": "done"}  # fmt: skip
    [removal] = records(node, action="remove-socket-dir")
    assert "removed empty directory" in removal["NODEMEDIC_DETAIL"]
    # nodemedic started containerd itself: systemd's restart loop was cancelled, not counted on.
    assert int(node.unit_property("containerd.service", "NRestarts")) <= restarts_before + 1


def test_observe_mode_reports_and_touches_nothing(node: Node) -> None:
    start_nodemedic(node, mode="observe")
    sighup_containerd(node)
    make_directory_at(node, SOCKET)

    wait_for(lambda: records(node, rule=RULE, outcome="observed"), 30, "the 'observed' record")
    would = {r["NODEMEDIC_ACTION"] for r in records(node, rule=RULE, outcome="would-do")}
    assert {"stop-unit", "remove-socket-dir", "start-unit"} <= would
    assert all(r["NODEMEDIC_MODE"] == "observe" for r in records(node, rule=RULE))
    assert records(node, outcome="done") == []
    # containerd's own restart (RestartSec=5s) fails on the directory; nothing repairs it.
    wait_for(lambda: int(node.unit_property("containerd.service", "NRestarts")) >= 2, 20,
             "systemd to retry containerd")  # fmt: skip
    assert node.sh(f"test -d {SOCKET} && ! test -L {SOCKET}", check=False).returncode == 0
    assert not containerd_serving(node)
    assert containerd_said(node, "is a directory"), "containerd itself reports the directory"


def test_symlink_at_socket_path_is_never_followed(node: Node) -> None:
    start_nodemedic(node)
    sighup_containerd(node)
    make_directory_at(node, SOCKET, symlink_to="/srv/elsewhere")

    # containerd unlinks a symlink at its socket path by itself at the next start.
    wait_for(lambda: containerd_serving(node), 30, "containerd to come back on its own")
    assert node.sh("cat /srv/elsewhere/file").stdout.strip() == "precious"
    assert node.sh("test -d /srv/elsewhere && ! test -L /srv/elsewhere", check=False).returncode == 0
    assert records(node, action="remove-socket-dir") == []
    assert node.sh("ls -A /var/lib/nodemedic/quarantine 2>/dev/null || true").stdout.strip() == ""


def test_non_empty_directory_is_quarantined_intact(node: Node) -> None:
    start_nodemedic(node)
    sighup_containerd(node)
    make_directory_at(node, SOCKET, content="pod data that must not be lost")

    wait_for(lambda: repaired(node), 30, "nodemedic's 'repaired' record")
    assert containerd_serving(node)
    kept = node.sh("ls -d /var/lib/nodemedic/quarantine/*-containerd.sock").stdout.split()
    assert len(kept) == 1
    assert node.sh(f"cat {kept[0]}/data").stdout == "pod data that must not be lost"
    [removal] = records(node, action="remove-socket-dir")
    assert kept[0] in removal["NODEMEDIC_DETAIL"]
    leftovers = node.sh("ls -A /run/containerd").stdout.split()
    assert not [n for n in leftovers if "nodemedic" in n], "the aside copy is gone once quarantined"


def test_directory_present_before_nodemedic_starts(node: Node) -> None:
    sighup_containerd(node)
    make_directory_at(node, SOCKET)
    wait_for(lambda: containerd_said(node, "is a directory"), 20, "containerd to fail on the directory")
    start_nodemedic(node)  # its start-up scan finds what is already broken

    wait_for(lambda: repaired(node), 30, "nodemedic's 'repaired' record")
    assert containerd_serving(node)


def test_restart_of_nodemedic_neither_replays_nor_repeats(node: Node) -> None:
    start_nodemedic(node)
    sighup_containerd(node)
    make_directory_at(node, SOCKET)
    wait_for(lambda: repaired(node), 30, "nodemedic's 'repaired' record")
    # journald wakes its readers on a coalescing timer (250 ms), so the journal source lags a little.
    cursor = "test -s /var/lib/nodemedic/journal.cursor"
    wait_for(lambda: node.sh(cursor, check=False).returncode == 0, 5, "the saved journal cursor")

    node.run("systemctl", "restart", "nodemedic.service", timeout=60)
    wait_for(lambda: len(records(node, kind="daemon", outcome="started")) == 2, 10, "the second start")
    # containerd's "is a directory" lines are behind the saved cursor: not read again, no new incident
    assert len(records(node, rule=RULE, kind="detected")) == 1
    assert node.unit_property("nodemedic.service", "ActiveState") == "active"


def test_an_operators_stop_is_respected(node: Node) -> None:
    start_nodemedic(node)
    node.run("systemctl", "stop", "containerd.service")  # maintenance: the operator stopped it
    make_directory_at(node, SOCKET)
    wait_for(lambda: records(node, rule=RULE, outcome="operator-stop"), 10, "the operator-stop record")
    assert records(node, rule=RULE, kind="action") == []
    assert node.unit_property("containerd.service", "ActiveState") == "inactive"

    # the operator starts containerd: it fails on the directory, and nodemedic repairs it now
    node.run("systemctl", "start", "--no-block", "containerd.service")
    wait_for(lambda: repaired(node), 30, "nodemedic's 'repaired' record")
    assert containerd_serving(node)
