"""SystemdBus under the fault matrix (issue 12): what it says when the bus goes and comes back, and
when a watched unit cannot be started (masked, not installed); a repair waits for a lost bus."""

from __future__ import annotations

import asyncio

import pytest

from nodemedic.backoff import Backoff
from nodemedic.clock import MonotonicClock
from nodemedic.sources.dbus import SystemdBus

from .conftest import DbusDaemon
from .fake_systemd import FakeSystemd, FakeUnit
from .helpers import Recorder, eventually, running

pytestmark = pytest.mark.component
CONTAINERD = "containerd.service"
ABSENT = "cri-absent.service"


def watch(daemon: DbusDaemon, units: list[str], states: list[str], events: Recorder) -> SystemdBus:
    fast = Backoff(initial=0.05, factor=2.0, maximum=0.1)
    return SystemdBus(units, events.emit, MonotonicClock(), bus_address=daemon.address,
                      on_state=states.append, reconnect=fast)  # fmt: skip


async def test_a_long_outage_is_said_once_and_a_repair_waits_it_out(dbus_daemon: DbusDaemon) -> None:
    systemd = FakeSystemd([FakeUnit.service(CONTAINERD, pid=4242)])
    await systemd.attach(dbus_daemon.address)
    events, states = Recorder(), list[str]()
    bus = watch(dbus_daemon, [CONTAINERD], states, events)
    try:
        async with running(events, bus.run()):
            await bus.connected.wait()
            await dbus_daemon.kill()
            systemd.detach()
            await eventually(lambda: not bus.connected.is_set())
            state = asyncio.ensure_future(bus.state(CONTAINERD))  # a repair's first question
            await asyncio.sleep(1.0)  # about 10 failed tries at 0.1 s
            assert not state.done(), "it waits for the bus; it does not fail"
            failed = [s for s in states if "connection failed" in s]
            assert 1 <= len(failed) <= 2, states  # once per reason (reset, then refused), not per try
            await dbus_daemon.start()
            await systemd.attach(dbus_daemon.address)
            assert (await asyncio.wait_for(state, 5)).active_state == "active"
            await eventually(lambda: any("connection back after" in s for s in states))
    finally:
        await bus.close()
        systemd.detach()


async def test_a_watched_unit_that_cannot_start_is_said_once(dbus_daemon: DbusDaemon) -> None:
    systemd = FakeSystemd([FakeUnit.service(CONTAINERD, pid=4242), FakeUnit.not_found(ABSENT)])
    await systemd.attach(dbus_daemon.address)
    events, states = Recorder(), list[str]()
    bus = watch(dbus_daemon, [CONTAINERD, ABSENT], states, events)
    try:
        async with running(events, bus.run()):
            await eventually(lambda: any(ABSENT in s for s in states))
            systemd.set(CONTAINERD, LoadState="masked", ActiveState="inactive", SubState="dead")
            await eventually(lambda: any(f"{CONTAINERD} is masked" in s for s in states))
            systemd.set(CONTAINERD, ActiveState="failed")  # still masked: not said again
            await asyncio.sleep(0.2)
    finally:
        await bus.close()
        systemd.detach()
    [absent] = [s for s in states if ABSENT in s]
    assert "not-found" in absent
    assert "wrong name in the policy" in absent
    assert len([s for s in states if f"{CONTAINERD} is masked" in s]) == 1
