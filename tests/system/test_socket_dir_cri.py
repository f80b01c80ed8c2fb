"""The socket-directory incident with the real mechanism (issue 18): containerd's own CRI plugin
makes the directory (lab.faults.cri_socket_dir: the socket unlinked under a live connection, then
a pod with a hostPath volume of it; or a clean stop with such a CreateContainer in flight), and
nodemedic repairs it: containerd serves again."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from lab.cri import prepare_cri, remove_pod, run_hostpath_pod
from lab.faults import (
    SOCKET,
    TTRPC,
    containerd_serving,
    cri_socket_dir,
    realtime,
    records,
    start_nodemedic,
    wait_for,
)
from lab.node import Node

pytestmark = pytest.mark.system
RULE = "socket-path-is-directory"


@pytest.mark.parametrize(("path", "via"), [(SOCKET, "unlink"), (TTRPC, "unlink"), (SOCKET, "stop")],
                         ids=["containerd.sock", "containerd.sock.ttrpc", "clean-stop-race"])  # fmt: skip
def test_directory_made_by_the_cri_plugin_is_repaired(
    node_factory: Callable[..., Node], path: str, via: str
) -> None:
    node = node_factory(containers=True)
    prepare_cri(node)  # before nodemedic: it restarts containerd once for the lab's CRI settings
    start_nodemedic(node)

    made_at = cri_socket_dir(node, path, via=via)

    wait_for(lambda: records(node, rule=RULE, outcome="repaired"), 30, "nodemedic's 'repaired' record")
    assert containerd_serving(node)
    assert node.sh(f"test -S {path} && ! test -L {path}", check=False).returncode == 0
    [detected] = records(node, rule=RULE, kind="detected")
    assert realtime(detected) - made_at < 2.0, "detected at once"
    [removal] = records(node, action="remove-socket-dir")
    assert "removed empty directory" in removal["NODEMEDIC_DETAIL"]
    # The CRI plugin serves again on the new socket: a new hostPath pod finds a socket, makes nothing.
    pod = run_hostpath_pod(node, "after-repair", path)
    assert node.sh(f"test -S {path}", check=False).returncode == 0
    remove_pod(node, pod)
