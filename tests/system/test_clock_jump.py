"""The wall clock steps back an hour while a breaker is open (issue 12, fault matrix item 4): the
breaker still gives its trial after one cooldown, not an hour later.

Only nodemedic's process sees the jump (libfaketime, `lab.faults.fake_clock_for_nodemedic`): a lab
node shares the host's clock, which the tests never change. The journal's own timestamps stay real,
so they measure what the jump cost.
"""

from __future__ import annotations

import json
import time

import pytest
from lab.faults import (
    SHIPPED_POLICY,
    SOCKET,
    fake_clock_for_nodemedic,
    realtime,
    records,
    sighup_containerd,
    start_nodemedic,
    step_nodemedic_clock,
    wait_for,
)
from lab.node import Node

pytestmark = pytest.mark.system
RULE = "socket-path-is-directory"
COOLDOWN = 10  # seconds
HOUR = 3600


def short_breaker_policy() -> str:
    """The shipped policy with a 1 s backoff and a breaker of 2 failures and a 10 s cooldown."""
    text = SHIPPED_POLICY.read_text()
    text = text.replace('initial = "5s"', 'initial = "1s"').replace("jitter = 0.1", "jitter = 0.0")
    breaker = 'failures = 3\nwindow = "15m"\ncooldown = "1h"'
    assert text.count(breaker) == 1, "the shipped breaker of socket-path-is-directory moved"
    return text.replace(breaker, f'failures = 2\nwindow = "1m"\ncooldown = "{COOLDOWN}s"')


def attempts(node: Node) -> int:
    return len(records(node, rule=RULE, action="remove-socket-dir", outcome="failed"))


@pytest.mark.parametrize("step_after", [0, COOLDOWN - 2], ids=["at-once", "near-the-end-of-the-cooldown"])
def test_a_clock_set_back_an_hour_does_not_hold_an_open_breaker_an_extra_hour(
    node: Node, step_after: int
) -> None:
    fake_clock_for_nodemedic(node, "+0")
    start_nodemedic(node, policy=short_breaker_policy())
    sighup_containerd(node)
    # a mount point at the socket path: the repair is refused every time, so the breaker opens
    node.sh(f"rm -f {SOCKET} && mkdir {SOCKET} && mount -t tmpfs -o size=1m podvolume {SOCKET}")
    opened = first_record(node, "breaker-open", 30, "the breaker to open")
    assert attempts(node) == 2

    time.sleep(step_after)  # the worst case: an hour back just before the cooldown would end
    step_nodemedic_clock(node, "-1h")
    trial = first_record(node, "trial", COOLDOWN + 40, "the half-open trial (not an hour later)")
    waited = realtime(trial) - realtime(opened)
    print(f"breaker open -> trial: {waited:.1f}s (cooldown {COOLDOWN}s, stepped back 1h after {step_after}s)")
    assert waited < 4 * COOLDOWN, "about one cooldown after the step is seen, never an hour more"

    # the trial fails (the mount is still there): one attempt, and the breaker opens again, dated on
    # nodemedic's stepped-back clock, which shows the step really reached the process
    wait_for(lambda: len(records(node, rule=RULE, outcome="breaker-open")) == 2, 20, "the breaker to reopen")
    assert attempts(node) == 3, "one trial repair, no storm"
    wait_for(lambda: realtime(trial) - opened_at(node) > HOUR - 60, 10,
             "the reopened breaker dated an hour behind the journal's clock")  # fmt: skip


def first_record(node: Node, outcome: str, timeout: float, what: str) -> dict[str, str]:
    """The first of the rule's records with ``outcome``, waited for."""
    wait_for(lambda: records(node, rule=RULE, outcome=outcome), timeout, what)
    return records(node, rule=RULE, outcome=outcome)[0]


def opened_at(node: Node) -> float:
    """When nodemedic's state file says the breaker opened, on nodemedic's wall clock."""
    state = json.loads(node.sh("cat /var/lib/nodemedic/state.json").stdout)
    return float(state["rules"][RULE]["breaker"]["opened_at"])
