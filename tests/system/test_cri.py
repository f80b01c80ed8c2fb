"""The lab's real CRI mechanism (lab/cri.py): containerd 1.6.20's own CRI plugin, driven over the
CRI v1 API as the kubelet drives it, runs a pod with a hostPath volume of the socket path, and
makes a directory there only while it runs with its socket file gone (docs/incident.md): the
socket unlinked under a connection that outlived it, or a clean stop with a CreateContainer in
flight; never while containerd is down, never at its start."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from lab.cri import (
    CriClient,
    CriError,
    container_state,
    prepare_cri,
    remove_pod,
    run_hostpath_pod,
    runtime_ready,
)
from lab.faults import SOCKET, TTRPC, cri_socket_dir, cri_stop_race, sighup_containerd, wait_for
from lab.node import Node

pytestmark = pytest.mark.system


def kind(node: Node, path: str = SOCKET) -> str:
    script = (f"if [ -L {path} ]; then echo symlink; elif [ -d {path} ]; then echo directory; "
              f"elif [ -S {path} ]; then echo socket; elif [ -e {path} ]; then echo other; "
              "else echo missing; fi")  # fmt: skip
    return node.sh(script).stdout.strip()


def containerd_restarted(node: Node) -> None:
    node.run("systemctl", "reset-failed", "containerd.service", check=False)
    node.run("systemctl", "restart", "containerd.service", timeout=60)
    wait_for(lambda: node.sh("ctr --timeout 2s version", check=False).returncode == 0, 30, "containerd")


@pytest.fixture
def cri_node(node_factory: Callable[..., Node]) -> Node:
    node = node_factory(containers=True)
    prepare_cri(node)
    return node


def test_prepare_is_idempotent_and_the_pod_runs_with_the_socket_mounted(cri_node: Node) -> None:
    node = cri_node
    pid = node.unit_property("containerd.service", "MainPID")
    prepare_cri(node)  # a second time: nothing to build, import or restart
    assert node.unit_property("containerd.service", "MainPID") == pid

    pod = run_hostpath_pod(node, "with-socket")
    assert container_state(node, pod) == "CONTAINER_RUNNING"
    inside = node.run("ctr", "-n", "k8s.io", "task", "exec", "--exec-id", "ls", pod.container_id,
                      "/bin/busybox", "stat", "-c", "%F", SOCKET).stdout  # fmt: skip
    assert inside.strip() == "socket", "the pod sees containerd's socket, bind-mounted"
    assert kind(node) == "socket", "an existing socket is mounted, nothing is created"

    remove_pod(node, pod)
    remove_pod(node, pod)  # idempotent
    assert node.run("ctr", "-n", "k8s.io", "containers", "ls", "-q").stdout.strip() == ""


def test_a_missing_host_path_is_made_a_directory_by_the_cri_plugin(cri_node: Node) -> None:
    pod = run_hostpath_pod(cri_node, "elsewhere", "/srv/missing/deeper")
    assert kind(cri_node, "/srv/missing/deeper") == "directory", "WithMounts: MkdirAll(src, 0755)"
    assert cri_node.sh("stat -c %a /srv/missing/deeper").stdout.strip() == "755"
    remove_pod(cri_node, pod)


def test_socket_unlinked_under_a_live_connection_becomes_a_directory(cri_node: Node) -> None:
    node = cri_node
    before = node.sh("date +%s.%N").stdout
    made_at = cri_socket_dir(node)
    assert float(before) <= made_at
    assert kind(node) == "directory"
    # The incident's state: systemd says active, every new client is refused.
    assert node.unit_property("containerd.service", "ActiveState") == "active"
    refused = node.sh("ctr --connect-timeout 1s --timeout 2s version", check=False)
    assert refused.returncode != 0
    assert f"dial unix {SOCKET}: connect: connection refused" in refused.stderr
    # ... and containerd's next start fails on it.
    node.run("systemctl", "restart", "containerd.service", check=False, timeout=60)
    failed = node.run("journalctl", "-q", "-u", "containerd.service", "--grep", "is a directory", check=False)
    assert "failed to get listener for main endpoint: is a directory" in failed.stdout

    node.run("rmdir", SOCKET)  # lab clean-up: containerd serving again, so teardown can kill the pod
    containerd_restarted(node)


def test_no_directory_while_containerd_is_down(cri_node: Node) -> None:
    """Nothing of containerd's runs then: the CRI request cannot even connect. Only the kubelet
    itself could make the directory now, for a hostPath of type DirectoryOrCreate."""
    node = cri_node
    node.run("systemctl", "stop", "containerd.service")
    assert kind(node) == "missing", "a clean stop unlinks the socket"
    with pytest.raises(CriError, match="UNAVAILABLE"):
        run_hostpath_pod(node, "while-down")
    assert kind(node) == "missing"
    containerd_restarted(node)
    assert kind(node) == "socket"


def test_a_clean_stop_during_create_container_leaves_a_directory(cri_node: Node) -> None:
    """No one unlinks anything: containerd stopped (SIGTERM) while a CreateContainer with a
    hostPath of the socket is in flight. grpc-go's Stop closes the listener (the socket file goes)
    and does not wait for the handler, whose WithMounts then makes the directory (a few % of tries)."""
    node = cri_node
    race = cri_stop_race(node)
    assert race.directory_at is not None, f"no directory in {race.attempts} tries"
    assert kind(node) == "directory"
    node.run("systemctl", "start", "containerd.service", check=False, timeout=60)
    failed = node.run("journalctl", "-q", "-u", "containerd.service", "--grep", "is a directory", check=False)
    assert "failed to get listener for main endpoint: is a directory" in failed.stdout
    node.run("rmdir", SOCKET)  # lab clean-up, as above
    containerd_restarted(node)


@pytest.mark.parametrize("how", ["restart", "sighup"])
def test_no_directory_at_containerd_start(cri_node: Node, how: str) -> None:
    """A pod holding the socket mounted, containerd restarted (clean: the socket is unlinked
    while it is down; SIGHUP: a stale socket stays), then a new pod created at once: the socket
    is bound before the CRI plugin can be asked anything, so the path is a socket every time."""
    node = cri_node
    first = run_hostpath_pod(node, "before")
    if how == "sighup":
        sighup_containerd(node)
        assert kind(node) == "socket", "SIGHUP leaves the stale socket"
        wait_for(lambda: node.unit_property("containerd.service", "SubState") == "running", 20,
                 "systemd's automatic restart")  # fmt: skip
    else:
        node.run("systemctl", "restart", "containerd.service", timeout=60)
    with CriClient(node) as client:
        # The socket is bound before the CRI plugin serves ("server is not initialized yet").
        wait_for(lambda: runtime_ready(node, client), 20, "the CRI plugin after the restart")
        second = run_hostpath_pod(node, "after", client=client)
    assert kind(node) == "socket"
    assert kind(node, TTRPC) == "socket"
    for pod in (first, second):
        remove_pod(node, pod)
