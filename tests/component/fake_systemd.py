"""A fake systemd on a private bus: the edge that SystemdBus talks to.

It speaks the part of org.freedesktop.systemd1 that nodemedic uses, with the real object paths,
interfaces, property names, D-Bus types and signals. State lives in ``FakeSystemd``; each
``attach`` exports fresh interface objects on a new connection, so the same fake survives a
restart of the bus daemon.
"""

# No ``from __future__ import annotations``: dbus-fast reads the D-Bus signatures from the
# annotations at class creation.

import asyncio
from dataclasses import dataclass, field
from typing import Annotated, Any

from dbus_fast import DBusError
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusInt32, DBusObjectPath, DBusSignature, DBusStr, DBusUInt32
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property, dbus_signal

SYSTEMD = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
UNIT_PATH_PREFIX = "/org/freedesktop/systemd1/unit/"
READ = PropertyAccess.READ

# systemd's UnitActiveState/SubState after each job, as it ends with result "done"
AFTER_JOB = {
    "StartUnit": ("active", "running"),
    "RestartUnit": ("active", "running"),
    "StopUnit": ("inactive", "dead"),
}
UNIT_PROPS = ("LoadState", "ActiveState", "SubState")
SERVICE_PROPS = (
    "Result",
    "ExecMainCode",
    "ExecMainStatus",
    "NRestarts",
    "MainPID",
    "ExecMainPID",
    "ExecMainExitTimestampMonotonic",
)


def unit_path(name: str) -> str:
    """systemd's object path for a unit: every byte that is not [A-Za-z0-9] as _xx."""
    escaped = "".join(c if c.isascii() and c.isalnum() else f"_{ord(c):02x}" for c in name)
    return UNIT_PATH_PREFIX + escaped


@dataclass
class FakeUnit:
    name: str
    props: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def service(cls, name: str, active: str = "active", sub: str = "running", pid: int = 4242) -> "FakeUnit":
        return cls(
            name,
            {
                "LoadState": "loaded",
                "ActiveState": active,
                "SubState": sub,
                "Result": "success",
                "ExecMainCode": 0,
                "ExecMainStatus": 0,
                "NRestarts": 0,
                "MainPID": pid,
                "ExecMainPID": pid,
                "ExecMainExitTimestampMonotonic": 0,
                # (path, argv, ignore-failure) per ExecStart line, as systemd's D-Bus reports them
                "ExecStart": [("/usr/bin/containerd", ["/usr/bin/containerd"], False)],
            },
        )

    @classmethod
    def not_found(cls, name: str) -> "FakeUnit":
        return cls(name, {"LoadState": "not-found", "ActiveState": "inactive", "SubState": "dead"})

    @property
    def is_service(self) -> bool:
        return "MainPID" in self.props


class UnitInterface(ServiceInterface):
    def __init__(self, unit: FakeUnit) -> None:
        super().__init__("org.freedesktop.systemd1.Unit")
        self.unit = unit

    @dbus_property(access=READ)
    def Id(self) -> DBusStr:
        return self.unit.name

    @dbus_property(access=READ)
    def LoadState(self) -> DBusStr:
        return str(self.unit.props["LoadState"])

    @dbus_property(access=READ)
    def ActiveState(self) -> DBusStr:
        return str(self.unit.props["ActiveState"])

    @dbus_property(access=READ)
    def SubState(self) -> DBusStr:
        return str(self.unit.props["SubState"])


class ServiceUnitInterface(ServiceInterface):
    def __init__(self, unit: FakeUnit) -> None:
        super().__init__("org.freedesktop.systemd1.Service")
        self.unit = unit

    @dbus_property(access=READ)
    def Result(self) -> DBusStr:
        return str(self.unit.props["Result"])

    @dbus_property(access=READ)
    def ExecMainCode(self) -> DBusInt32:
        return int(self.unit.props["ExecMainCode"])

    @dbus_property(access=READ)
    def ExecMainStatus(self) -> DBusInt32:
        return int(self.unit.props["ExecMainStatus"])

    @dbus_property(access=READ)
    def NRestarts(self) -> DBusUInt32:
        return int(self.unit.props["NRestarts"])

    @dbus_property(access=READ)
    def MainPID(self) -> DBusUInt32:
        return int(self.unit.props["MainPID"])

    @dbus_property(access=READ)
    def ExecMainPID(self) -> DBusUInt32:
        return int(self.unit.props["ExecMainPID"])

    @dbus_property(access=READ)
    def ExecMainExitTimestampMonotonic(self) -> "t":  # type: ignore[name-defined]  # noqa: F821
        return int(self.unit.props["ExecMainExitTimestampMonotonic"])

    @dbus_property(access=READ)
    def ExecStart(self) -> "a(sasbttttuii)":  # type: ignore[name-defined]  # noqa: F821
        """path, argv, ignore-failure, start/stop times (realtime, monotonic), pid, code, status."""
        lines = self.unit.props.get("ExecStart", [])
        return [[path, list(argv), bool(ignore), 0, 0, 0, 0, 0, 0, 0] for path, argv, ignore in lines]


class ManagerInterface(ServiceInterface):
    def __init__(self, systemd: "FakeSystemd") -> None:
        super().__init__("org.freedesktop.systemd1.Manager")
        self.systemd = systemd

    @dbus_method()
    def Subscribe(self) -> None:
        self.systemd.calls.append(("Subscribe", ""))

    @dbus_method()
    def LoadUnit(self, name: DBusStr) -> DBusObjectPath:
        self.systemd.calls.append(("LoadUnit", name))
        return self.systemd.load(name)

    @dbus_method()
    def StartUnit(self, name: DBusStr, mode: DBusStr) -> DBusObjectPath:
        return self.systemd.queue_job("StartUnit", name, mode)

    @dbus_method()
    def StopUnit(self, name: DBusStr, mode: DBusStr) -> DBusObjectPath:
        return self.systemd.queue_job("StopUnit", name, mode)

    @dbus_method()
    def RestartUnit(self, name: DBusStr, mode: DBusStr) -> DBusObjectPath:
        return self.systemd.queue_job("RestartUnit", name, mode)

    @dbus_method()
    def KillUnit(self, name: DBusStr, whom: DBusStr, signal: DBusInt32) -> None:
        self.systemd.calls.append((f"KillUnit {whom} {signal}", name))

    @dbus_method()
    async def Reload(self) -> None:
        """daemon-reload: like systemd, the reply comes once the unit files are read again."""
        self.systemd.calls.append(("Reload", "start"))
        await asyncio.sleep(self.systemd.reload_delay)
        if self.systemd.reload_fails:
            raise DBusError("org.freedesktop.DBus.Error.AccessDenied", "Access denied")
        self.systemd.calls.append(("Reload", "done"))

    @dbus_signal()
    def JobRemoved(
        self, job_id: int, job: str, unit: str, result: str
    ) -> Annotated[tuple[int, str, str, str], DBusSignature("uoss")]:
        return job_id, job, unit, result


class FakeSystemd:
    """systemd's units and jobs. ``fail`` and ``hang`` pick jobs that end badly or never end."""

    def __init__(self, units: list[FakeUnit], job_delay: float = 0.05) -> None:
        self.units = {u.name: u for u in units}
        self.job_delay = job_delay  # the job ends (state changes, JobRemoved) this long after the reply
        self.fail: set[tuple[str, str]] = set()  # (method, unit): JobRemoved result "failed"
        self.hang: set[tuple[str, str]] = set()  # (method, unit): no JobRemoved at all
        self.calls: list[tuple[str, str]] = []
        self.reload_delay = 0.1  # Manager.Reload replies this long after it was called
        self.reload_fails = False
        self.bus: MessageBus | None = None
        self._manager: ManagerInterface | None = None
        self._exported: dict[str, tuple[UnitInterface, ServiceUnitInterface | None]] = {}
        self._next_job = 100

    async def attach(self, address: str) -> None:
        """Connect to the bus at ``address``, export everything and take systemd's name."""
        bus = await MessageBus(bus_address=address).connect()
        self.bus = bus
        self._manager = ManagerInterface(self)
        bus.export(MANAGER_PATH, self._manager)
        self._exported = {}
        for unit in self.units.values():
            self._export(unit)
        await bus.request_name(SYSTEMD)

    def detach(self) -> None:
        if self.bus is not None:
            self.bus.disconnect()
            self.bus = None

    def _export(self, unit: FakeUnit) -> None:
        assert self.bus is not None
        path = unit_path(unit.name)
        ifaces = (UnitInterface(unit), ServiceUnitInterface(unit) if unit.is_service else None)
        for iface in ifaces:
            if iface is not None:
                self.bus.export(path, iface)
        self._exported[unit.name] = ifaces

    def load(self, name: str) -> str:
        """Manager.LoadUnit: like systemd, an unknown name gives a unit with LoadState not-found."""
        if name not in self.units:
            self.units[name] = FakeUnit.not_found(name)
            self._export(self.units[name])
        return unit_path(name)

    def set(self, name: str, **props: Any) -> None:
        """Change a unit's properties and signal it as systemd does: Service first, then Unit."""
        unit = self.units[name]
        unit.props.update(props)
        unit_iface, service_iface = self._exported[name]
        service_changed = {k: v for k, v in props.items() if k in SERVICE_PROPS}
        unit_changed = {k: v for k, v in props.items() if k in UNIT_PROPS}
        if service_iface is not None and service_changed:
            service_iface.emit_properties_changed(service_changed)
        if unit_changed:
            unit_iface.emit_properties_changed(unit_changed)

    def invalidate(self, name: str, *props: str) -> None:
        """PropertiesChanged with the names only (no values), as for EMITS_INVALIDATION properties."""
        self._exported[name][0].emit_properties_changed({}, list(props))

    def queue_job(self, method: str, name: str, mode: str) -> str:
        self.calls.append((method, name))
        if name not in self.units or self.units[name].props["LoadState"] != "loaded":
            raise DBusError("org.freedesktop.systemd1.NoSuchUnit", f"Unit {name} not found.")
        self._next_job += 1
        job_id, job = self._next_job, f"{MANAGER_PATH}/job/{self._next_job}"
        if (method, name) not in self.hang:
            asyncio.get_running_loop().call_later(self.job_delay, self._finish, job_id, job, method, name)
        return job

    def _finish(self, job_id: int, job: str, method: str, name: str) -> None:
        assert self._manager is not None
        # Another job of the same unit ending first must not be taken for this one.
        self._manager.JobRemoved(job_id + 1000, f"{MANAGER_PATH}/job/{job_id + 1000}", name, "canceled")
        if (method, name) in self.fail:
            self.set(name, ActiveState="failed", SubState="failed", Result="exit-code")
            self._manager.JobRemoved(job_id, job, name, "failed")
            return
        active, sub = AFTER_JOB[method]
        self.set(name, ActiveState=active, SubState=sub)
        self._manager.JobRemoved(job_id, job, name, "done")
