"""[placeholder] on a real node (issue 18, part 2): containerd's socket paths are never missing, so a
pod's hostPath mount of them (the CRI plugin's MkdirAll, or its stand-in) makes no directory, and
containerd 1.6 starts through the placeholders at both paths."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from lab.faults import (
    SOCKET,
    TTRPC,
    containerd_serving,
    cri_hostpath_fault,
    placeholder_policy,
    records,
    start_nodemedic,
    wait_for,
)
from lab.node import Node

pytestmark = pytest.mark.system
ACTION = "placeholder-socket"


def placeholders(node: Node, outcome: str) -> dict[str, dict[str, str]]:
    return {r["NODEMEDIC_PATH"]: r for r in records(node, action=ACTION, outcome=outcome)}


def kind_of(node: Node, path: str) -> str:
    return node.sh(f"stat -c %F {path}", check=False).stdout.strip()


def test_containerd_starts_through_placeholders_at_both_paths(node: Node) -> None:
    start_nodemedic(node, policy=placeholder_policy("enforce"))
    node.run("systemctl", "stop", "containerd.service")  # a clean stop unlinks containerd.sock
    node.run("rm", "-f", TTRPC)  # (the ttrpc one may stay, stale): make it missing too
    made = wait_for(lambda: len(p := placeholders(node, "done")) == 2 and p, 10, "two placeholders")
    assert isinstance(made, dict)
    assert set(made) == {SOCKET, TTRPC}
    for path in (SOCKET, TTRPC):
        assert kind_of(node, path) == "socket"
        assert node.sh(f"stat -c '%a %u:%g' {path}").stdout.split() == ["660", "0:0"]
    # a pod's hostPath mount after the placeholder: MkdirAll finds the path, makes nothing
    assert node.sh(f"mkdir -p {SOCKET}", check=False).returncode != 0
    assert kind_of(node, SOCKET) == "socket"
    assert not containerd_serving(node), "clients get ECONNREFUSED, as from a stale socket"

    node.run("systemctl", "start", "containerd.service")
    wait_for(lambda: containerd_serving(node), 15, "containerd serving through the placeholders")
    wait_for(lambda: len(placeholders(node, "replaced")) == 2, 10, "both placeholders replaced")
    replaced = placeholders(node, "replaced")
    assert all("bound its own" in r["MESSAGE"] for r in replaced.values())
    listener = node.sh("journalctl -u containerd.service --grep 'failed to get listener'", check=False)
    assert listener.returncode != 0, listener.stdout
    assert node.unit_property("containerd.service", "ActiveState") == "active"


def test_the_real_cri_pod_finds_the_path_existing(node_factory: Callable[..., Node]) -> None:
    """The CRI plugin's own MkdirAll (lab/cri.py): containerd runs, its socket file is unlinked
    under a live connection, and a hostPath pod of it is created over that connection."""
    node = node_factory(containers=True)
    start_nodemedic(node, policy=placeholder_policy("enforce"))
    # 50 ms between the unlink and the pod's CreateContainer (a kubelet restarting a crashlooping
    # container waits its back-off, 10 s at least): with none at all, the CRI plugin's MkdirAll can
    # come within the millisecond inotify takes to tell nodemedic (docs/benchmarks.md, placeholder)
    fault = cri_hostpath_fault(node, SOCKET, timeout=5, gap=0.05)
    assert fault.directory_at is None, fault
    assert kind_of(node, SOCKET) == "socket"
    [fault] = records(node, action=ACTION, outcome="socket-unlinked")
    assert fault["NODEMEDIC_KIND"] == "detected"
    # the probe gets ECONNREFUSED from the placeholder: the hung rule restarts containerd
    wait_for(
        lambda: records(node, rule="containerd-hung", outcome="repaired"), 30, "containerd-hung repaired"
    )
    wait_for(lambda: containerd_serving(node), 15, "containerd serving again")
    assert records(node, rule="socket-path-is-directory") == []


def test_observe_mode_makes_nothing(node: Node) -> None:
    start_nodemedic(node, policy=placeholder_policy("observe"))
    node.run("systemctl", "stop", "containerd.service")
    wait_for(lambda: records(node, action=ACTION, outcome="would-do"), 10, "the would-do record")
    assert kind_of(node, SOCKET) == "", "nothing made"
    assert placeholders(node, "done") == {}


_EXCHANGE = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, RENAME_EXCHANGE = -100, 2
aside = sys.argv[1] + ".lab-dir"
os.mkdir(aside)
if libc.renameat2(AT_FDCWD, aside.encode(), AT_FDCWD, sys.argv[1].encode(), RENAME_EXCHANGE):
    sys.exit(f"renameat2: errno {ctypes.get_errno()}")
os.unlink(aside)  # now the placeholder that was swapped out
"""


def test_a_directory_that_appears_anyway_is_repaired_as_before(node: Node) -> None:
    """A directory swapped in atomically for the placeholder (renameat2 RENAME_EXCHANGE: the path
    is never missing, so no placeholder can come first): the directory rule repairs it."""
    start_nodemedic(node, policy=placeholder_policy("enforce"))
    node.run("systemctl", "stop", "containerd.service")
    wait_for(lambda: placeholders(node, "done"), 10, "the placeholder")
    node.run("/usr/bin/python3", "-c", _EXCHANGE, SOCKET)
    node.run("systemctl", "start", "--no-block", "containerd.service")
    wait_for(lambda: records(node, rule="socket-path-is-directory", outcome="repaired"), 30, "the repair")
    wait_for(lambda: containerd_serving(node), 15, "containerd serving")
    assert kind_of(node, SOCKET) == "socket"
