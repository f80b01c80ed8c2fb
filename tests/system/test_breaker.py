"""A fault nodemedic cannot repair: a file system mounted over the socket path. The breaker opens,
nodemedic stops acting, says a human is needed, and still knows it after a restart."""

from __future__ import annotations

import pytest
from lab.faults import SHIPPED_POLICY, SOCKET, records, sighup_containerd, start_nodemedic, wait_for
from lab.node import Node

pytestmark = pytest.mark.system
RULE = "socket-path-is-directory"


def fast_policy() -> str:
    """The shipped policy with a 1 s backoff, so three failures take seconds, not minutes."""
    text = SHIPPED_POLICY.read_text()
    return text.replace('initial = "5s"', 'initial = "1s"').replace("jitter = 0.1", "jitter = 0.0")


def attempts(node: Node) -> int:
    return len(records(node, rule=RULE, action="remove-socket-dir", outcome="failed"))


def test_unrepairable_fault_opens_the_breaker_which_survives_a_restart(node: Node) -> None:
    start_nodemedic(node, policy=fast_policy())
    sighup_containerd(node)
    node.sh(f"rm -f {SOCKET} && mkdir {SOCKET} && mount -t tmpfs -o size=1m podvolume {SOCKET} "
            f"&& echo data > {SOCKET}/file")  # fmt: skip

    [escalated] = wait_for(
        lambda: records(node, rule=RULE, outcome="breaker-open"), 30, "the breaker to open"
    )  # type: ignore[misc]
    assert escalated["PRIORITY"] == "2"
    assert escalated["NODEMEDIC_DETAIL"].count("mount point") == 3, "the record has the history of attempts"
    assert attempts(node) == 3
    assert node.sh(f"cat {SOCKET}/file").stdout == "data\n", "the mounted data is untouched"
    assert '"state": "open"' in node.sh("cat /var/lib/nodemedic/state.json").stdout

    held_before = len(records(node, rule=RULE, outcome="held"))
    node.run("systemctl", "restart", "nodemedic.service", timeout=60)
    # at start-up it sees the directory again, and the breaker, read back from disk, holds it
    wait_for(lambda: len(records(node, rule=RULE, outcome="held")) > held_before, 15,
             "the held record after the restart")  # fmt: skip
    wait_for(lambda: records(node, rule=RULE, outcome="would-do"), 10, "it to keep observing")
    assert attempts(node) == 3, "no repair is attempted while the breaker is open"

    # the operator has looked; `nodemedic reset` closes the breaker in the running daemon
    out = node.run("nodemedic", "reset", RULE).stdout
    assert "reloaded nodemedic.service" in out
    wait_for(lambda: records(node, rule=RULE, outcome="reset"), 10, "the reset record")
