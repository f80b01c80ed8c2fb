"""SystemdBus against a fake systemd on a real private dbus-daemon."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from nodemedic.backoff import Backoff
from nodemedic.clock import MonotonicClock
from nodemedic.errors import UnitControlError
from nodemedic.events import Event, SignalSeen, UnitChanged
from nodemedic.sources.dbus import SystemdBus

from .conftest import DbusDaemon
from .fake_systemd import FakeSystemd, FakeUnit
from .helpers import WAIT, Recorder, eventually, running

pytestmark = pytest.mark.component

CONTAINERD = "containerd.service"
KUBELET = "kubelet.service"


@dataclass
class Setup:
    daemon: DbusDaemon
    systemd: FakeSystemd
    bus: SystemdBus
    events: Recorder
    states: list[str]


@pytest.fixture
async def setup(dbus_daemon: DbusDaemon) -> AsyncIterator[Setup]:
    """The fake systemd on the bus, and a SystemdBus watching containerd and kubelet."""
    systemd = FakeSystemd([FakeUnit.service(CONTAINERD, pid=4242), FakeUnit.service(KUBELET, pid=777)])
    await systemd.attach(dbus_daemon.address)
    events = Recorder()
    states: list[str] = []
    bus = SystemdBus(
        [CONTAINERD, KUBELET],
        events.emit,
        MonotonicClock(),
        bus_address=dbus_daemon.address,
        on_state=states.append,
        reconnect=Backoff(initial=0.05, factor=2.0, maximum=0.5),
    )
    try:
        async with running(events, bus.run()):
            yield Setup(dbus_daemon, systemd, bus, events, states)
    finally:
        await bus.close()  # after run() is cancelled, as the daemon does at shutdown
        systemd.detach()


def unit_changed(unit: str, **fields: object) -> Callable[[Event], bool]:
    """A predicate: a UnitChanged of ``unit`` with these field values."""

    def matches(event: Event) -> bool:
        return (
            isinstance(event, UnitChanged)
            and event.unit == unit
            and all(getattr(event, k) == v for k, v in fields.items())
        )

    return matches


async def resynced(events: Recorder) -> dict[str, UnitChanged]:
    """The two snapshots SystemdBus emits after (re)connecting, by unit."""
    got: dict[str, UnitChanged] = {}
    for _ in range(2):
        event = await events.next()
        assert isinstance(event, UnitChanged)
        got[event.unit] = event
    return got


async def test_connect_emits_each_units_current_state(setup: Setup) -> None:
    got = await resynced(setup.events)

    assert set(got) == {CONTAINERD, KUBELET}
    containerd = got[CONTAINERD]
    assert (containerd.load_state, containerd.active_state, containerd.sub_state) == (
        "loaded",
        "active",
        "running",
    )
    assert (containerd.result, containerd.exec_main_code, containerd.n_restarts) == ("success", 0, 0)
    assert containerd.main_pid == 4242
    assert got[KUBELET].main_pid == 777
    assert containerd.source == "dbus"
    assert setup.bus.connected.is_set()
    assert ("Subscribe", "") in setup.systemd.calls


async def test_sighup_death_and_restart_are_reported(setup: Setup) -> None:
    """The sequence seen in the lab after ``kill -HUP`` of containerd (domain.md)."""
    await resynced(setup.events)

    # containerd dies of SIGHUP: systemd says success, ExecMain* tell the truth.
    setup.systemd.set(
        CONTAINERD,
        Result="success",
        ExecMainCode=2,
        ExecMainStatus=1,
        MainPID=0,
        ActiveState="activating",
        SubState="auto-restart",
    )
    died = await setup.events.until(unit_changed(CONTAINERD, sub_state="auto-restart"))
    assert isinstance(died, UnitChanged)
    assert (died.active_state, died.exec_main_code, died.exec_main_status) == ("activating", 2, 1)
    assert (died.result, died.main_pid, died.n_restarts) == ("success", 0, 0)

    # RestartSec later: restarted, one more restart counted, a new main process.
    setup.systemd.set(CONTAINERD, NRestarts=1, MainPID=5151, ActiveState="active", SubState="running")
    back = await setup.events.until(unit_changed(CONTAINERD, sub_state="running"))
    assert isinstance(back, UnitChanged)
    assert (back.n_restarts, back.main_pid, back.active_state) == (1, 5151, "active")
    assert (back.exec_main_code, back.exec_main_status) == (2, 1)  # kept until the next exit


async def test_only_the_changed_unit_is_reported(setup: Setup) -> None:
    await resynced(setup.events)

    setup.systemd.set(KUBELET, ActiveState="deactivating", SubState="stop-sigterm")
    setup.systemd.set(CONTAINERD, ActiveState="failed", SubState="failed")

    kubelet = await setup.events.next()
    containerd = await setup.events.next()
    assert isinstance(kubelet, UnitChanged)
    assert (kubelet.unit, kubelet.sub_state, kubelet.main_pid) == (KUBELET, "stop-sigterm", 777)
    assert isinstance(containerd, UnitChanged)
    assert (containerd.unit, containerd.active_state) == (CONTAINERD, "failed")


async def test_invalidated_properties_are_read_again(setup: Setup) -> None:
    await resynced(setup.events)
    setup.systemd.units[CONTAINERD].props.update(ActiveState="reloading", SubState="reload")

    setup.systemd.invalidate(CONTAINERD, "ActiveState", "SubState")

    event = await setup.events.until(unit_changed(CONTAINERD, sub_state="reload"))
    assert isinstance(event, UnitChanged)
    assert event.active_state == "reloading"


async def test_state_reads_the_unit(setup: Setup) -> None:
    await setup.bus.connected.wait()

    state = await setup.bus.state(CONTAINERD)

    assert (state.load_state, state.active_state, state.sub_state) == ("loaded", "active", "running")
    assert state.exists
    assert not state.down


async def test_a_unit_that_does_not_exist(setup: Setup) -> None:
    await setup.bus.connected.wait()

    state = await setup.bus.state("nosuch.service")

    assert state.load_state == "not-found"
    assert not state.exists
    with pytest.raises(UnitControlError, match="NoSuchUnit"):
        await setup.bus.start("nosuch.service", timeout=WAIT)


async def test_watching_a_unit_that_does_not_exist(dbus_daemon: DbusDaemon) -> None:
    systemd = FakeSystemd([FakeUnit.service(CONTAINERD)])
    await systemd.attach(dbus_daemon.address)
    events = Recorder()
    bus = SystemdBus(["nosuch.service"], events.emit, MonotonicClock(), bus_address=dbus_daemon.address)
    try:
        async with running(events, bus.run()):
            event = await events.next()
    finally:
        await bus.close()
        systemd.detach()

    assert isinstance(event, UnitChanged)
    assert (event.unit, event.load_state, event.active_state) == ("nosuch.service", "not-found", "inactive")


@pytest.mark.parametrize(
    ("method", "dbus_method", "after"),
    [
        ("stop", "StopUnit", ("inactive", "dead")),
        ("start", "StartUnit", ("active", "running")),
        ("restart", "RestartUnit", ("active", "running")),
    ],
)
async def test_jobs_wait_for_job_removed(
    setup: Setup, method: str, dbus_method: str, after: tuple[str, str]
) -> None:
    await setup.bus.connected.wait()
    setup.systemd.set(CONTAINERD, ActiveState="activating", SubState="auto-restart")

    await getattr(setup.bus, method)(CONTAINERD, timeout=WAIT)

    # The fake changes the state only when the job ends, with JobRemoved: seeing the new state
    # right after the call returned shows the call waited for the job, not only for its reply.
    assert (dbus_method, CONTAINERD) in setup.systemd.calls
    state = await setup.bus.state(CONTAINERD)
    assert (state.active_state, state.sub_state) == after


async def test_a_failed_job_raises(setup: Setup) -> None:
    await setup.bus.connected.wait()
    setup.systemd.fail.add(("StartUnit", CONTAINERD))

    with pytest.raises(UnitControlError, match="'failed'"):
        await setup.bus.start(CONTAINERD, timeout=WAIT)


async def test_a_job_that_never_ends_times_out(setup: Setup) -> None:
    await setup.bus.connected.wait()
    setup.systemd.hang.add(("StopUnit", CONTAINERD))

    with pytest.raises(UnitControlError, match="no result within"):
        await setup.bus.stop(CONTAINERD, timeout=0.3)

    # and the next job is not confused by the one that never ended
    await setup.bus.start(CONTAINERD, timeout=WAIT)


async def test_reconnects_and_resyncs_after_the_bus_restarts(setup: Setup) -> None:
    await resynced(setup.events)

    await setup.daemon.kill()
    setup.systemd.detach()
    # While the bus is down, containerd dies: only a resynchronisation can tell.
    setup.systemd.units[CONTAINERD].props.update(ActiveState="failed", SubState="failed", MainPID=0)
    await setup.daemon.start()
    # A bus without systemd on it yet: the connection is refused and retried with backoff.
    await eventually(lambda: any("ServiceUnknown" in s and "retrying in" in s for s in setup.states))
    await setup.systemd.attach(setup.daemon.address)

    got = await resynced(setup.events)
    assert (got[CONTAINERD].active_state, got[CONTAINERD].sub_state) == ("failed", "failed")
    assert got[CONTAINERD].main_pid == 0
    assert got[KUBELET].active_state == "active"
    assert "D-Bus connection lost; reconnecting" in setup.states
    assert setup.bus.connected.is_set()

    # and it follows changes on the new connection
    setup.systemd.set(CONTAINERD, ActiveState="active", SubState="running", MainPID=6161)
    await setup.events.until(unit_changed(CONTAINERD, main_pid=6161, active_state="active"))


async def test_unit_control_waits_for_the_connection(dbus_daemon: DbusDaemon) -> None:
    """At start-up a repair may come before the bus is up: it waits, it does not fail."""
    systemd = FakeSystemd([FakeUnit.service(CONTAINERD, pid=4242)])
    events = Recorder()
    bus = SystemdBus([CONTAINERD], events.emit, MonotonicClock(), bus_address=dbus_daemon.address,
                     reconnect=Backoff(initial=0.05, factor=2.0, maximum=0.2))  # fmt: skip
    asked = asyncio.ensure_future(bus.state(CONTAINERD))  # before run(): not connected yet
    await asyncio.sleep(0.1)
    assert not asked.done()
    await systemd.attach(dbus_daemon.address)
    try:
        async with running(events, bus.run()):
            state = await asyncio.wait_for(asked, WAIT)
            assert state.active_state == "active"
    finally:
        await bus.close()
        systemd.detach()


async def test_a_death_by_signal_is_a_signal_seen_once(setup: Setup) -> None:
    await resynced(setup.events)
    setup.systemd.set(CONTAINERD, ExecMainCode=2, ExecMainStatus=1, ExecMainPID=4242,
                      ExecMainExitTimestampMonotonic=123_456_789, MainPID=0,
                      ActiveState="activating", SubState="auto-restart")  # fmt: skip
    seen = await setup.events.until(lambda e: isinstance(e, SignalSeen))
    assert isinstance(seen, SignalSeen)
    assert (seen.unit, seen.signal, seen.target_pid, seen.source) == (CONTAINERD, 1, 4242, "dbus")
    # later changes of the same unit (the restart) are not a second death
    setup.systemd.set(CONTAINERD, NRestarts=1, MainPID=5151, ActiveState="active", SubState="running")
    await setup.events.until(unit_changed(CONTAINERD, sub_state="running"))
    assert [e for e in setup.events.seen if isinstance(e, SignalSeen)] == [seen]


async def test_kill_sends_the_signal_to_the_main_process(setup: Setup) -> None:
    await resynced(setup.events)
    await setup.bus.kill(CONTAINERD, 10)  # SIGUSR1: containerd dumps its goroutine stacks
    assert ("KillUnit main 10", CONTAINERD) in setup.systemd.calls
