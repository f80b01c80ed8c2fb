"""SystemdBus's calls for the SIGHUP drop-in: ExecStart read over D-Bus, and daemon-reload.

A fake systemd on a real private dbus-daemon, speaking systemd's types (ExecStart is a(sasbttttuii)).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from nodemedic.actions.sighup_dropin import render_dropin
from nodemedic.backoff import Backoff
from nodemedic.clock import MonotonicClock
from nodemedic.errors import UnitControlError
from nodemedic.sources.dbus import SystemdBus

from .conftest import DbusDaemon
from .fake_systemd import FakeSystemd, FakeUnit
from .helpers import Recorder, running

pytestmark = pytest.mark.component

CONTAINERD = "containerd.service"


@dataclass
class Setup:
    systemd: FakeSystemd
    bus: SystemdBus


@pytest.fixture
async def setup(dbus_daemon: DbusDaemon) -> AsyncIterator[Setup]:
    systemd = FakeSystemd([FakeUnit.service(CONTAINERD)])
    await systemd.attach(dbus_daemon.address)
    events = Recorder()
    bus = SystemdBus(
        [CONTAINERD],
        events.emit,
        MonotonicClock(),
        bus_address=dbus_daemon.address,
        reconnect=Backoff(initial=0.05, factor=2.0, maximum=0.5),
    )
    try:
        async with running(events, bus.run()):
            await events.next()  # connected and resynchronised
            yield Setup(systemd, bus)
    finally:
        await bus.close()
        systemd.detach()


async def test_exec_start_as_the_lab_node_reports_it(setup: Setup) -> None:
    """containerd's stock unit: one line, argv[0] is the path (busctl in the lab says the same)."""
    assert await setup.bus.exec_start(CONTAINERD) == [["/usr/bin/containerd"]]


async def test_exec_start_arguments_ignore_failure_and_empty_argv(setup: Setup) -> None:
    setup.systemd.units[CONTAINERD].props["ExecStart"] = [
        ("/usr/bin/containerd", ["containerd-custom-argv0", "--config", "/etc/c d/x.toml"], True),
        ("/usr/bin/true", [], False),
    ]
    lines = await setup.bus.exec_start(CONTAINERD)

    assert lines == [["-/usr/bin/containerd", "--config", "/etc/c d/x.toml"], ["/usr/bin/true"]]
    text = render_dropin(lines)
    assert (
        'ExecStart=-/usr/bin/env --ignore-signal=HUP /usr/bin/containerd --config "/etc/c d/x.toml"' in text
    )


async def test_exec_start_after_our_dropin_is_unwrapped_by_render(setup: Setup) -> None:
    """With our drop-in active, systemd reports the wrapped line; rendering again does not wrap twice."""
    wrapped = ["/usr/bin/env", "--ignore-signal=HUP", "/usr/bin/containerd"]
    setup.systemd.units[CONTAINERD].props["ExecStart"] = [("/usr/bin/env", wrapped, False)]
    lines = await setup.bus.exec_start(CONTAINERD)

    assert render_dropin(lines) == render_dropin([["/usr/bin/containerd"]])


async def test_exec_start_of_a_unit_that_is_not_a_service_fails_typed(setup: Setup) -> None:
    with pytest.raises(UnitControlError, match=r"ExecStart|InvalidArgs|UnknownInterface|UnknownProperty"):
        await setup.bus.exec_start("nothing-here.service")


async def test_daemon_reload_waits_for_systemds_reply(setup: Setup) -> None:
    setup.systemd.reload_delay = 0.3

    await setup.bus.daemon_reload()

    assert setup.systemd.calls[-2:] == [("Reload", "start"), ("Reload", "done")]


async def test_daemon_reload_refused_is_a_unit_control_error(setup: Setup) -> None:
    setup.systemd.reload_fails = True

    with pytest.raises(UnitControlError, match=r"Reload: org\.freedesktop\.DBus\.Error\.AccessDenied"):
        await setup.bus.daemon_reload()
