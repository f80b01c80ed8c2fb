"""systemd over D-Bus (dbus-fast): follow watched units' state, and start/stop units for repairs.

``SystemdBus`` owns the connection. It subscribes to systemd, adds match rules for the watched
units' PropertiesChanged and for JobRemoved, reads every unit's state at (re)connection and emits it,
then merges each PropertiesChanged into that state and emits the new snapshot. When the bus drops it
reconnects with backoff and resynchronises: the states read at reconnection carry every change made
while it was down. An outage is reported twice (lost, back): the retries in between only at debug.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dbus_fast import AuthError, BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from nodemedic.backoff import Backoff
from nodemedic.errors import UnitControlError
from nodemedic.events import Event, SignalSeen, UnitChanged
from nodemedic.ports import Clock, UnitState

log = logging.getLogger(__name__)

SYSTEMD = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
UNIT = "org.freedesktop.systemd1.Unit"
SERVICE = "org.freedesktop.systemd1.Service"
PROPERTIES = "org.freedesktop.DBus.Properties"
# How long unit control waits for the first connection at start-up. While reconnecting it waits
# as long as the bus is down: no unit job can run without it, and a repair failed for that alone
# would be counted against the rule (backoff, breaker) for an outage of the bus, not of the repair.
CONNECT_WAIT = 15.0
RECONNECT_MAX = 2.0  # the longest wait between two tries: the bus is back within this

# D-Bus property -> UnitChanged field
FIELDS = {
    "LoadState": "load_state",
    "ActiveState": "active_state",
    "SubState": "sub_state",
    "Result": "result",
    "ExecMainCode": "exec_main_code",
    "ExecMainStatus": "exec_main_status",
    "NRestarts": "n_restarts",
    "MainPID": "main_pid",
}
# Also read, to tell each death of the main process apart (ExecMain* stay until the next one).
DEATH_PROPS = ("ExecMainPID", "ExecMainExitTimestampMonotonic")
WATCHED_PROPS = frozenset(FIELDS) | frozenset(DEATH_PROPS)
UNIT_NOT_STARTABLE = {
    "masked": "systemd will not start it until it is unmasked; repairs that need it refuse",
    "not-found": "no unit file of that name is installed (not installed, or a wrong name in the policy's "
    "watch_units or a rule's unit); repairs that need it refuse",
}
CLD_KILLED, CLD_DUMPED = 2, 3  # ExecMainCode: killed by a signal, or killed and dumped core


@dataclass(slots=True)
class _Watched:
    unit: str
    path: str
    props: dict[str, Any]
    last_death: int = 0  # ExecMainExitTimestampMonotonic of the last death seen


class SystemdBus:
    """The connection to systemd; also the daemon's ``UnitControl``."""

    def __init__(
        self,
        units: list[str],
        emit: Callable[[Event], None],
        clock: Clock,
        *,
        bus_address: str | None = None,
        on_state: Callable[[str], None] | None = None,
        reconnect: Backoff | None = None,
    ) -> None:
        self.units = list(units)
        self._emit = emit
        self._clock = clock
        self._address = bus_address
        self._on_state = on_state or (lambda _msg: None)
        self._backoff = reconnect or Backoff(initial=0.2, factor=2.0, maximum=RECONNECT_MAX, jitter=0.2)
        self._down_since: float | None = None  # monotonic time the bus was lost (None: connected)
        self._ever_connected = False
        self._failure_said = ""  # the reason of this outage's last failed try reported
        self._bus: MessageBus | None = None
        self._watched: dict[str, _Watched] = {}  # object path -> unit
        self._jobs: dict[str, asyncio.Queue[tuple[str, str]]] = {}  # unit -> (job, result)
        self.connected = asyncio.Event()
        self._refreshing: set[asyncio.Task[None]] = set()
        self._load_said: dict[str, str] = {}  # unit -> the LoadState last reported for it

    # ---- connection lifecycle -------------------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                bus = await self._connect()
            except (OSError, UnitControlError, EOFError, AuthError) as exc:
                wait = self._backoff.failed(self._clock.monotonic())
                self._connect_failed(exc, wait)
                await asyncio.sleep(wait)
                continue
            self._backoff.succeeded()
            self._reconnected()
            try:
                await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
            except Exception as exc:  # what ended the connection, e.g. EOFError when the bus daemon died
                log.debug("D-Bus connection ended: %r", exc)
            self.connected.clear()
            self._down_since = self._clock.monotonic()
            self._on_state("D-Bus connection lost; reconnecting")

    def _connect_failed(self, exc: BaseException, wait: float) -> None:
        # Once per outage and reason: a bus down for an hour would otherwise write a record every
        # few seconds; a new reason (refused, then no systemd on the bus yet) is news.
        if str(exc) == self._failure_said:
            log.debug("D-Bus connection failed again (%s); retrying in %.1fs", exc, wait)
            return
        self._failure_said = str(exc)
        if self._down_since is None:
            self._down_since = self._clock.monotonic()
        self._on_state(
            f"D-Bus connection failed ({exc}); retrying in {wait:.1f}s, and every "
            f"{RECONNECT_MAX:g}s at most until it is back; repairs wait for it"
        )

    def _reconnected(self) -> None:
        down_since, self._down_since, self._failure_said = self._down_since, None, ""
        if down_since is not None:
            gone = self._clock.monotonic() - down_since
            self._on_state(
                f"D-Bus connection back after {gone:.1f}s; the watched units' states were read again"
            )
        self._ever_connected = True

    async def _connect(self) -> MessageBus:
        bus = MessageBus(bus_address=self._address) if self._address else MessageBus(bus_type=BusType.SYSTEM)
        await bus.connect()
        self._bus = bus
        bus.add_message_handler(self._on_message)
        try:
            await self._call(MANAGER_PATH, MANAGER, "Subscribe")
            await self._add_match(f"type='signal',interface='{MANAGER}',member='JobRemoved'")
            # LoadState is a constant property for systemd: a `systemctl mask` or a removed unit
            # file changes it at the daemon-reload without a PropertiesChanged; read it again then.
            await self._add_match(f"type='signal',interface='{MANAGER}',member='Reloading'")
            self._watched = {}
            for unit in self.units:
                path = await self._unit_path(unit)
                await self._add_match(
                    f"type='signal',interface='{PROPERTIES}',member='PropertiesChanged',path='{path}'"
                )
                props = await self._read_props(path)
                # a death from before we connected is history, not an event
                self._watched[path] = _Watched(unit, path, props, _died_at(props))
        except BaseException:
            bus.disconnect()
            raise
        self.connected.set()
        for watched in self._watched.values():
            self._emit_state(watched)
        return bus

    async def close(self) -> None:
        if self._bus is not None:
            self._bus.disconnect()

    # ---- watching ----------------------------------------------------------------------------

    def _on_message(self, msg: Message) -> None:
        if msg.message_type is not MessageType.SIGNAL:
            return
        if msg.member == "PropertiesChanged" and msg.path in self._watched:
            self._on_properties(self._watched[msg.path], msg.body)
        elif msg.member == "JobRemoved" and msg.interface == MANAGER:
            _id, job, unit, result = msg.body
            queue = self._jobs.get(unit)
            if queue is not None:
                queue.put_nowait((job, result))
        elif msg.member == "Reloading" and msg.interface == MANAGER and msg.body == [False]:
            for watched in self._watched.values():  # the reload is over
                self._refresh_later(watched)

    def _on_properties(self, watched: _Watched, body: list[Any]) -> None:
        _iface, changed, invalidated = body
        relevant = {k: v.value for k, v in changed.items() if k in WATCHED_PROPS}
        if relevant and any(watched.props.get(k) != v for k, v in relevant.items()):
            watched.props.update(relevant)
            self._emit_state(watched)
        if any(k in WATCHED_PROPS for k in invalidated):
            self._refresh_later(watched)

    def _refresh_later(self, watched: _Watched) -> None:
        task = asyncio.get_running_loop().create_task(self._refresh(watched))
        self._refreshing.add(task)  # a reference, so the task is not collected mid-way
        task.add_done_callback(self._refreshing.discard)

    async def _refresh(self, watched: _Watched) -> None:
        try:
            props = await self._read_props(watched.path)
        except (OSError, UnitControlError, EOFError):
            return  # the reconnection resynchronises
        if props != watched.props:  # as for PropertiesChanged: a snapshot only when something changed
            watched.props = props
            self._emit_state(watched)

    def _emit_state(self, watched: _Watched) -> None:
        values = {FIELDS[k]: v for k, v in watched.props.items() if k in FIELDS}
        self._emit(UnitChanged(unit=watched.unit, at=self._clock.monotonic(), **values))
        self._say_load_state(watched)
        self._check_death(watched)

    def _say_load_state(self, watched: _Watched) -> None:
        """A watched unit that systemd cannot start (masked, or no such unit: a typo in the policy)
        is said once when it becomes so: every rule acting on it refuses, and this says why."""
        load = str(watched.props.get("LoadState", ""))
        if self._load_said.get(watched.unit, "loaded") == load:
            return
        self._load_said[watched.unit] = load
        if load in UNIT_NOT_STARTABLE:
            self._on_state(f"watched unit {watched.unit} is {load}: {UNIT_NOT_STARTABLE[load]}")

    def _check_death(self, watched: _Watched) -> None:
        """A new death of the main process by a signal is a SignalSeen (e.g. containerd's SIGHUP)."""
        died_at = _died_at(watched.props)
        if died_at == watched.last_death:
            return
        watched.last_death = died_at
        if watched.props.get("ExecMainCode") in (CLD_KILLED, CLD_DUMPED):
            self._emit(
                SignalSeen(
                    signal=int(watched.props.get("ExecMainStatus", 0)),
                    target_pid=int(watched.props.get("ExecMainPID", 0)),
                    unit=watched.unit,
                    at=self._clock.monotonic(),
                    source="dbus",
                )
            )

    async def _read_props(self, path: str) -> dict[str, Any]:
        props: dict[str, Any] = {}
        for iface in (UNIT, SERVICE):
            try:
                reply = await self._call(path, PROPERTIES, "GetAll", "s", [iface])
            except UnitControlError:
                continue  # not a service (or not loaded): Unit properties are enough
            props.update({k: v.value for k, v in reply[0].items() if k in WATCHED_PROPS})
        return props

    # ---- UnitControl ---------------------------------------------------------------------------

    async def _wait_connected(self) -> None:
        """A repair waits for the bus rather than fail at once: at start-up for CONNECT_WAIT, once
        connected before for as long as the bus is down (see CONNECT_WAIT)."""
        if self.connected.is_set():
            return
        if self._ever_connected:
            await self.connected.wait()
            return
        try:
            await asyncio.wait_for(self.connected.wait(), CONNECT_WAIT)
        except asyncio.TimeoutError as exc:
            raise UnitControlError(f"not connected to the D-Bus system bus after {CONNECT_WAIT:g}s") from exc

    async def state(self, unit: str) -> UnitState:
        await self._wait_connected()
        path = await self._unit_path(unit)
        props = await self._read_props(path)
        return UnitState(
            load_state=str(props.get("LoadState", "")),
            active_state=str(props.get("ActiveState", "")),
            sub_state=str(props.get("SubState", "")),
        )

    async def stop(self, unit: str, timeout: float) -> None:
        await self._job("StopUnit", unit, timeout)

    async def start(self, unit: str, timeout: float) -> None:
        await self._job("StartUnit", unit, timeout)

    async def restart(self, unit: str, timeout: float) -> None:
        await self._job("RestartUnit", unit, timeout)

    async def kill(self, unit: str, signal: int) -> None:
        await self._wait_connected()
        await self._call(MANAGER_PATH, MANAGER, "KillUnit", "ssi", [unit, "main", signal])

    async def exec_start(self, unit: str) -> list[list[str]]:
        """The unit's ExecStart command lines: per line, the executable's path then argv[1:] (the
        path alone if argv is empty); ignore-failure is written as systemd does, ``-/path``."""
        await self._wait_connected()
        path = await self._unit_path(unit)
        reply = await self._call(path, PROPERTIES, "Get", "ss", [SERVICE, "ExecStart"])
        lines = []
        for exe, argv, ignore_failure, *_times in reply[0].value:  # a(sasbttttuii)
            lines.append([("-" if ignore_failure else "") + str(exe), *(str(a) for a in list(argv)[1:])])
        return lines

    async def daemon_reload(self) -> None:
        """``systemctl daemon-reload``: systemd replies once the unit files are read again."""
        await self._wait_connected()
        await self._call(MANAGER_PATH, MANAGER, "Reload")

    async def _job(self, method: str, unit: str, timeout: float) -> None:
        """Queue a systemd job and wait for its JobRemoved: the job's result, not only its start."""
        await self._wait_connected()
        queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._jobs[unit] = queue  # before the call: JobRemoved may come right after the reply
        try:
            reply = await self._call(MANAGER_PATH, MANAGER, method, "ss", [unit, "replace"])
            result = await asyncio.wait_for(_job_result(queue, reply[0]), timeout)
        except asyncio.TimeoutError as exc:
            raise UnitControlError(f"{method} {unit}: no result within {timeout:g}s") from exc
        finally:
            self._jobs.pop(unit, None)
        if result != "done":
            raise UnitControlError(f"{method} {unit}: systemd job result {result!r}")

    # ---- plumbing ------------------------------------------------------------------------------

    async def _unit_path(self, unit: str) -> str:
        reply = await self._call(MANAGER_PATH, MANAGER, "LoadUnit", "s", [unit])
        return str(reply[0])

    async def _add_match(self, rule: str) -> None:
        bus = self._require_bus()
        reply = await bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="AddMatch",
                signature="s",
                body=[rule],
            )
        )
        _check(reply, "AddMatch")

    async def _call(
        self,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: list[Any] | None = None,
    ) -> list[Any]:
        bus = self._require_bus()
        reply = await bus.call(
            Message(
                destination=SYSTEMD,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=body or [],
            )
        )
        return _check(reply, f"{interface}.{member}")

    def _require_bus(self) -> MessageBus:
        if self._bus is None or not self._bus.connected:
            raise UnitControlError("not connected to the D-Bus system bus")
        return self._bus


def _died_at(props: dict[str, Any]) -> int:
    return int(props.get("ExecMainExitTimestampMonotonic", 0) or 0)


async def _job_result(queue: asyncio.Queue[tuple[str, str]], job: str) -> str:
    while True:
        done, result = await queue.get()
        if done == job:
            return result


def _check(reply: Message | None, what: str) -> list[Any]:
    if reply is None:
        raise UnitControlError(f"{what}: no reply")
    if reply.message_type is MessageType.ERROR:
        detail = reply.body[0] if reply.body else ""
        raise UnitControlError(f"{what}: {reply.error_name}: {detail}")
    return list(reply.body)
