"""The probe keeps one connection to containerd between requests (docs/design.md, "probe client"):
a containerd that stops and comes back must still be seen by the first request after it listens
again, within one probe interval plus one timeout, as with a channel per request (no reconnect
backoff). The probe runs on the host against the node's socket (through /proc/LEADER/root), with
the shipped interval and timeout."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from lab.faults import SHIPPED_POLICY, SOCKET
from lab.node import Node

from nodemedic.clock import MonotonicClock
from nodemedic.events import Event, ProbeAnswered, ProbeFailed
from nodemedic.policy.load import parse_policy_text
from nodemedic.sources.probe import ContainerdProbe, ProbeLoop

pytestmark = pytest.mark.system


def _listens(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
        return True


async def _until(what: str, predicate: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.005)


async def _stop_and_start(node: Node, path: str, events: list[Event]) -> float:
    """Stop containerd, let the probe fail a few times, start it; returns when it listened again."""
    await asyncio.to_thread(node.run, "systemctl", "stop", "containerd.service")
    await _until("a failed probe", lambda: any(isinstance(e, ProbeFailed) for e in events), 5)
    await asyncio.sleep(1.0)
    start = asyncio.create_task(asyncio.to_thread(node.run, "systemctl", "start", "containerd.service"))
    await _until("containerd's socket to accept", lambda: _listens(path), 30)
    listening = time.monotonic()
    await start
    return listening


def test_a_containerd_that_comes_back_is_answered_within_one_interval(node: Node) -> None:
    settings = parse_policy_text(SHIPPED_POLICY.read_text()).daemon.probe
    path = f"/proc/{node.leader}/root{SOCKET}"
    events: list[Event] = []

    async def scenario() -> float:
        probe = ContainerdProbe()
        loop = ProbeLoop(probe, path, settings.interval, settings.timeout, events.append, MonotonicClock())
        task = asyncio.create_task(loop.run())
        try:
            await asyncio.sleep(1.0)  # the kept connection is up and answering
            assert not events, events
            listening = await _stop_and_start(node, path, events)
            await _until("the probe's answer", lambda: isinstance(events[-1], ProbeAnswered), 10)
            return events[-1].at - listening
        finally:
            task.cancel()
            probe.close()

    late = asyncio.run(scenario())
    assert late <= settings.interval + settings.timeout, f"answered {late:.3f}s after containerd listened"


def test_the_first_request_after_a_restart_is_answered(node: Node) -> None:
    """containerd restarted (by a repair, or an operator) while the probe's connection sat idle: the
    kept connection is dead, and the next request must still be answered (verify-containerd asks
    right after a restart; a failure there would only delay the repair)."""
    path = f"/proc/{node.leader}/root{SOCKET}"

    async def scenario() -> list[str]:
        probe = ContainerdProbe()
        try:
            answers = [await probe.version(path, 2.0)]
            for _ in range(2):
                await asyncio.to_thread(node.run, "systemctl", "restart", "containerd.service")
                await _until("containerd's socket to accept", lambda: _listens(path), 30)
                answers.append(await probe.version(path, 2.0))
            return answers
        finally:
            probe.close()

    assert len(asyncio.run(scenario())) == 3
