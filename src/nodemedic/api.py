"""The daemon's D-Bus API: ``io.nodemedic1`` on the system bus (docs/cli.md, "The D-Bus API").

Anyone may read (the properties, ``Status()``, introspection) and follow the signals; only root may
change anything (``Reset``, ``SetMode``, ``Reload``). The bus decides who may call what, from the
policy file the packages install (packaging/dbus/io.nodemedic1.conf), not this code: the bus knows
the caller's uid for certain, a method handler only sees a message.

The service is one of the daemon's sources (``Api.run``) with a connection of its own. When the bus
drops, or the name cannot be owned (another owner, the policy file not installed yet), it tries
again with backoff while the daemon goes on repairing; each reason is said once. Its signals come
from a listener on the executor's records, the one place every decision passes.

The client half (``call_daemon``) is what ``nodemedic mode`` and ``nodemedic reset`` use; where no
daemon serves the name they fall back to the files, through the same ``change_mode``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast, get_args

from dbus_fast import (
    AuthError,
    BusType,
    DBusError,
    ErrorType,
    Message,
    MessageType,
    NameFlag,
    RequestNameReply,
)
from dbus_fast import introspection as intr
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusSignature, DBusStr
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property, dbus_signal

from nodemedic import __version__
from nodemedic.backoff import Backoff
from nodemedic.errors import NodemedicError, PolicyError, UnknownRuleError
from nodemedic.policy.edit import set_mode
from nodemedic.policy.load import parse_policy_text, read_policy_text
from nodemedic.policy.model import Mode, Policy
from nodemedic.report import Record, RecordKind
from nodemedic.snapshot import Snapshot, daemon_status, freezer_of, iso, policy_sha, read_frozen, tracker_of
from nodemedic.store import atomic_write

if TYPE_CHECKING:
    from nodemedic.app import App

log = logging.getLogger(__name__)

BUS_NAME = "io.nodemedic1"
OBJECT_PATH = "/io/nodemedic1"
INTERFACE = "io.nodemedic1.Manager"
PROPERTIES = "org.freedesktop.DBus.Properties"
# The errors the methods answer with, besides the bus's own (AccessDenied for a caller not root).
UNKNOWN_RULE = "io.nodemedic1.Error.UnknownRule"
INVALID_MODE = "io.nodemedic1.Error.InvalidMode"
INVALID_POLICY = "io.nodemedic1.Error.InvalidPolicy"
POLICY_NOT_WRITABLE = "io.nodemedic1.Error.PolicyNotWritable"
NO_POLICY_FILE = "io.nodemedic1.Error.NoPolicyFile"
RELOAD_REFUSED = "io.nodemedic1.Error.ReloadRefused"
# Where the client does it on the files itself: nobody owns the name (or it went away), or the
# daemon cannot write its policy file (its unit's sandbox): the CLI, root, can.
NO_OWNER = frozenset({ErrorType.SERVICE_UNKNOWN.value, ErrorType.NAME_HAS_NO_OWNER.value})  # no daemon serves
FILE_WAY = NO_OWNER | {POLICY_NOT_WRITABLE}

MODES: tuple[str, ...] = get_args(Mode)
RELOAD_WAIT = 5.0  # how long Reload and SetMode wait for the daemon's word on the reload
CALL_TIMEOUT = 10.0  # the client's bound on one call (a reload is waited for, RELOAD_WAIT at most)
RECONNECT_MAX = 30.0  # the longest wait between two tries to connect and own the name

Say = Callable[[str], None]


# ---- what the records become: signals, and the end of a reload ---------------------------------


@dataclass(frozen=True, slots=True)
class SignalOut:
    """One signal to emit: its member name and its arguments."""

    member: str
    args: tuple[str | float, ...]


def signal_for(record: Record, reopens_at: Callable[[str], float | None]) -> SignalOut | None:
    """The signal a record is followed by, if any. ``reopens_at(rule)``: the wall-clock time the
    rule's breaker lets a repair try again (None where the rule has no breaker)."""
    fields = record.fields
    rule, incident = fields.get("RULE", ""), fields.get("INCIDENT", "")
    if record.kind is RecordKind.DETECTED:
        return SignalOut("IncidentStarted", (rule, incident, fields.get("TRIGGER") or record.message))
    if record.kind is RecordKind.OUTCOME and fields.get("OUTCOME") == "repaired":
        return SignalOut("Repaired", (rule, incident, _number(fields.get("ELAPSED_MS", ""))))
    if record.kind is RecordKind.ESCALATED:
        at = reopens_at(rule)
        return SignalOut("BreakerOpened", (rule, iso(at) or ""))
    return None


def reload_ended(record: Record) -> bool:
    """Is this the daemon's word on a reload: taken ("reloaded"), or refused (the old one stays)?
    The daemon's two records of a reload carry NODEMEDIC_ACTION=reload."""
    return record.fields.get("ACTION") == "reload" and record.fields.get("OUTCOME") in ("reloaded", "refused")


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0


# ---- the mode in the policy file: the API's SetMode and the CLI's fallback ----------------------


@dataclass(frozen=True, slots=True)
class ModeChange:
    """What a mode change did: the lines to tell the operator, and whether the file changed."""

    lines: list[str]
    changed: bool


def change_mode(path: Path, mode: Mode, rule: str | None) -> ModeChange:
    """Set ``mode`` in ``[daemon]`` (``rule`` None) or in one rule of the policy file at ``path``,
    keeping its comments, owner and permissions; a result that would not load is never written."""
    text = read_policy_text(path)
    before = parse_policy_text(text, str(path))
    edited = set_mode(text, mode, rule)  # UnknownRuleError for a rule not in the file
    what = "[daemon]" if rule is None else f"rule {rule!r}"
    if mode_in(before, rule) == mode:
        return ModeChange([f"{path.name}: {what} mode is already {mode}; nothing changed"], False)
    after = parse_policy_text(edited, str(path))
    if mode_in(after, rule) != mode:
        raise NodemedicError(f"{path}: setting the mode of {what} did not take; edit the file by hand")
    write_keeping_owner(path, edited)
    lines = [f"{path.name}: {what} mode {mode_in(before, rule)} -> {mode}"]
    if rule is None:
        lines += [
            f"{path.name}: rule {r.name!r} keeps its own mode {r.mode}"
            for r in after.rule
            if r.mode is not None and r.mode != mode
        ]
    return ModeChange(lines, True)


def mode_in(policy: Policy, rule: str | None) -> str:
    """The mode of [daemon], or of a rule: its own, or "enforce (from [daemon])" where it has none."""
    if rule is None:
        return policy.daemon.mode
    own: Mode | None = next(r.mode for r in policy.rule if r.name == rule)
    return own or f"{policy.daemon.mode} (from [daemon])"


def write_keeping_owner(path: Path, text: str) -> None:
    real = path.resolve()  # a symlinked policy stays a symlink; its target is replaced
    st = real.stat()
    try:
        atomic_write(real, text)
        os.chown(real, st.st_uid, st.st_gid)
        os.chmod(real, stat.S_IMODE(st.st_mode))
    except PermissionError as exc:
        raise PermissionError(f"cannot write {real} ({exc.strerror}): run this as root") from exc


# ---- the interface -------------------------------------------------------------------------------


class Manager(ServiceInterface):
    """``io.nodemedic1.Manager``: the members, typed for D-Bus; each is answered by the ``Api``."""

    def __init__(self, api: Api) -> None:
        super().__init__(INTERFACE)
        self._api = api

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> DBusStr:
        return __version__

    @dbus_property(access=PropertyAccess.READ)
    def Mode(self) -> DBusStr:
        return self._api.mode()

    @dbus_property(access=PropertyAccess.READ)
    def PolicyPath(self) -> DBusStr:
        return self._api.policy_path()

    @dbus_property(access=PropertyAccess.READ)
    def PolicySha256(self) -> DBusStr:
        return self._api.policy_sha256()

    @dbus_property(access=PropertyAccess.READ)
    def StartedAt(self) -> DBusStr:
        return self._api.started_at()

    @dbus_method()
    async def Status(self) -> DBusStr:
        return await self._api.status_json()

    @dbus_method()
    def Reset(self, rule: DBusStr) -> DBusStr:
        return self._api.reset(rule)

    @dbus_method()
    async def SetMode(self, mode: DBusStr, rule: DBusStr) -> DBusStr:
        return await self._api.set_mode(mode, rule)

    @dbus_method()
    async def Reload(self) -> DBusStr:
        return await self._api.reload()

    @dbus_signal()
    def IncidentStarted(
        self, rule: str, incident: str, trigger: str
    ) -> Annotated[tuple[str, str, str], DBusSignature("sss")]:
        return rule, incident, trigger

    @dbus_signal()
    def Repaired(
        self, rule: str, incident: str, elapsed_ms: float
    ) -> Annotated[tuple[str, str, float], DBusSignature("ssd")]:
        return rule, incident, elapsed_ms

    @dbus_signal()
    def BreakerOpened(self, rule: str, reopens_at: str) -> Annotated[tuple[str, str], DBusSignature("ss")]:
        return rule, reopens_at

    def introspect(self) -> intr.Interface:
        """dbus-fast's, with names for the arguments it leaves unnamed (signals', methods' out)."""
        interface = super().introspect()
        named = [(m.name, m.out_args) for m in interface.methods]
        named += [(s.name, s.args) for s in interface.signals]
        for member, args in named:
            for arg, name in zip(args, ARG_NAMES.get(member, [None] * len(args)), strict=True):
                arg.name = name or arg.name
        return interface


ARG_NAMES = {
    "IncidentStarted": ("rule", "incident", "trigger"),
    "Repaired": ("rule", "incident", "elapsed_ms"),
    "BreakerOpened": ("rule", "reopens_at"),
    "Status": ("json",),
    "Reset": ("said",),
    "SetMode": ("said",),
    "Reload": ("said",),
}


# ---- the service ---------------------------------------------------------------------------------


class Api:
    """The daemon's D-Bus API: ``run`` is its source; the methods answer ``Manager``'s members."""

    def __init__(
        self,
        app: App,
        request_reload: Callable[[], None],
        *,
        bus_address: str | None = None,
        status: Callable[[App, dict[str, float] | None], Snapshot] = daemon_status,
        reconnect: Backoff | None = None,
    ) -> None:
        self.app = app
        self.manager = Manager(self)
        self._request_reload = request_reload
        self._address = bus_address
        self._status = status
        self._backoff = reconnect or Backoff(initial=0.5, factor=2.0, maximum=RECONNECT_MAX, jitter=0.2)
        self._said = ""  # the last connection problem said: each is said once
        self._serving = False
        self._reloads: list[asyncio.Future[Record]] = []  # callers waiting for the word on a reload
        self._changing = asyncio.Lock()  # one SetMode at a time: each reads the file the last wrote
        app.executor.listeners.append(self.on_record)

    # ---- the connection ------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until cancelled; a lost bus or a name not ours is tried again, never an end."""
        while True:
            bus = None
            try:
                bus = await self._serve()
                self._backoff.succeeded()
                await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # whatever it is, the daemon goes on without its API
                log.debug("D-Bus API connection", exc_info=True)
                self._failed(exc)
            finally:
                if bus is not None:
                    bus.disconnect()
            if self._serving:
                self._serving = False
                self._say(f"D-Bus API: lost the system bus; {BUS_NAME} is served again once it is back")
            await asyncio.sleep(self._backoff.failed(self.app.executor.ctx.clock.monotonic()))

    async def _serve(self) -> MessageBus:
        bus = MessageBus(bus_address=self._address) if self._address else MessageBus(bus_type=BusType.SYSTEM)
        await bus.connect()
        try:
            bus.export(OBJECT_PATH, self.manager)
            reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
        except BaseException:
            bus.disconnect()
            raise
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            bus.disconnect()
            raise NodemedicError(f"{BUS_NAME} is owned by another process (is a second nodemedic running?)")
        self._serving, self._said = True, ""
        self._say(f"D-Bus API: serving {BUS_NAME} at {OBJECT_PATH} on the system bus")
        return bus

    def _failed(self, exc: BaseException) -> None:
        # once per reason: a bus error's text names this try's connection (":1.42"), its type not
        reason = exc.type if isinstance(exc, DBusError) else str(exc) or type(exc).__name__
        if reason == self._said:
            log.debug("D-Bus API still not served: %s", exc)
            return
        self._said = reason
        why = str(exc) or type(exc).__name__
        if isinstance(exc, DBusError) and exc.type == ErrorType.ACCESS_DENIED.value:
            why = (
                f"the bus does not let nodemedic own {BUS_NAME} ({exc.text}); is "
                "/usr/share/dbus-1/system.d/io.nodemedic1.conf installed?"
            )
        self._say(
            f"D-Bus API not served: {why}; nodemedic runs on without it and tries again every "
            f"{RECONNECT_MAX:g}s at most"
        )

    def _say(self, message: str) -> None:
        self.app.report(RecordKind.DAEMON, message, SOURCE="api")

    # ---- the records: signals, and the word on a reload ----------------------------------------

    def on_record(self, record: Record) -> None:
        """An executor listener: every record nodemedic writes passes here."""
        if reload_ended(record):
            for waiter in self._reloads:
                if not waiter.done():
                    waiter.set_result(record)
            if record.kind is RecordKind.DAEMON:
                changed = {"Mode": self.mode(), "PolicySha256": self.policy_sha256()}
                self._emit(lambda: self.manager.emit_properties_changed(changed))
        out = signal_for(record, self._reopens_at)
        if out is not None:
            self._emit(lambda: getattr(self.manager, out.member)(*out.args))

    def _emit(self, send: Callable[[], object]) -> None:
        """Signals are best effort: a bus going down loses them, and must not fail the record."""
        try:
            send()
        except Exception as exc:
            log.debug("D-Bus API: a signal was not sent: %r", exc)

    def _reopens_at(self, rule: str) -> float | None:
        state = self.app.executor.states.get(rule)
        return None if state is None else state.breaker.reopens_at()

    # ---- reading ---------------------------------------------------------------------------------

    def mode(self) -> str:
        return self.app.executor.policy.daemon.mode

    def policy_path(self) -> str:
        return "" if self.app.policy_path is None else str(self.app.policy_path)

    def policy_sha256(self) -> str:
        """As ``Status()`` has it: hashed once per policy loaded (snapshot.py's tracker)."""
        return policy_sha(tracker_of(self.app), self.app.executor.policy, self.app.policy_path) or ""

    def started_at(self) -> str:
        tracker = tracker_of(self.app)
        return (iso(tracker.started_wall) if tracker is not None else None) or ""

    async def status_json(self) -> str:
        """snapshot.py's status as JSON; the freezer's registry is read off the event loop."""
        errors: list[str] = []
        frozen = await asyncio.to_thread(read_frozen, freezer_of(self.app), errors)
        snapshot = self._status(self.app, frozen)
        snapshot.setdefault("errors", []).extend(e for e in errors if e not in snapshot["errors"])
        return json.dumps(snapshot, sort_keys=True)

    # ---- changing (root only: the bus's policy file) ---------------------------------------------

    def reset(self, rule: str) -> str:
        """Close ``rule``'s breaker, as ``nodemedic reset`` does, through the executor."""
        executor = self.app.executor
        state = executor.states.get(rule)
        if state is None or executor.rules.rule(rule) is None:
            raise DBusError(UNKNOWN_RULE, _unknown_rule(rule, executor.policy))
        was = state.breaker.state
        executor.run(executor.rules.reset([rule]))
        return f"rule {rule!r}: breaker closed (it was {was})"

    async def set_mode(self, mode: str, rule: str) -> str:
        """Set the mode in the policy file, as ``nodemedic mode`` does, and reload it."""
        checked = _checked_mode(mode)
        path = self._policy_file()
        async with self._changing:
            try:
                change = await asyncio.to_thread(change_mode, path, checked, rule or None)
            except UnknownRuleError as exc:
                raise DBusError(UNKNOWN_RULE, str(exc)) from exc
            except PolicyError as exc:
                raise DBusError(INVALID_POLICY, f"{exc.path}: {'; '.join(exc.problems)}") from exc
            except OSError as exc:
                raise DBusError(POLICY_NOT_WRITABLE, f"cannot write {path}: {exc}") from exc
            if not change.changed:
                return "\n".join(change.lines)
            said = await self.reload()
        return "\n".join([*change.lines, said])

    async def reload(self) -> str:
        """Ask the daemon to reload its policy; its word on the reload, RELOAD_WAIT at most."""
        self._policy_file()
        waiter: asyncio.Future[Record] = asyncio.get_running_loop().create_future()
        self._reloads.append(waiter)
        try:
            self._request_reload()
            record = await asyncio.wait_for(waiter, RELOAD_WAIT)
        except asyncio.TimeoutError:
            return f"reload requested; no word on it within {RELOAD_WAIT:g}s: see journalctl -u nodemedic"
        finally:
            self._reloads.remove(waiter)
        if record.kind is not RecordKind.DAEMON:
            raise DBusError(RELOAD_REFUSED, record.message)
        return record.message

    def _policy_file(self) -> Path:
        if self.app.policy_path is None:
            raise DBusError(NO_POLICY_FILE, "this nodemedic runs without a policy file: nothing to reload")
        return self.app.policy_path


def _checked_mode(mode: str) -> Mode:
    if mode in MODES:
        return cast(Mode, mode)
    raise DBusError(INVALID_MODE, f"mode {mode!r}: one of {', '.join(MODES)}")


def _unknown_rule(rule: str, policy: Policy) -> str:
    names = ", ".join(repr(r.name) for r in policy.rule) or "none"
    return f"no rule named {rule!r}; the policy's rules: {names}"


# ---- the client: nodemedic mode and reset --------------------------------------------------------


def call_daemon(
    member: str,
    signature: str = "",
    body: list[Any] | None = None,
    *,
    policy_path: Path,
    bus_address: str | None = None,
    timeout: float = CALL_TIMEOUT,
) -> list[Any] | None:
    """Call ``member`` of the running daemon's API; its answer, or None where the caller is to do
    it on the files: no daemon serving ``policy_path`` on the bus (not running, another policy
    file, no system bus), or one that cannot write the file. Its refusals are raised
    (PermissionError for a caller not root, UnknownRuleError, NodemedicError)."""
    return asyncio.run(_call(member, signature, body or [], policy_path, bus_address, timeout))


async def _call(
    member: str, signature: str, body: list[Any], policy_path: Path, address: str | None, timeout: float
) -> list[Any] | None:
    bus = MessageBus(bus_address=address) if address else MessageBus(bus_type=BusType.SYSTEM)
    try:
        await asyncio.wait_for(bus.connect(), timeout)
    except (OSError, EOFError, AuthError, asyncio.TimeoutError) as exc:
        log.debug("no system bus: %r", exc)
        return None
    try:
        served = await _ask(bus, PROPERTIES, "Get", "ss", [INTERFACE, "PolicyPath"], timeout)
        if served is None or not _same_file(served[0].value, policy_path):
            return None
        return await _ask(bus, INTERFACE, member, signature, body, timeout)
    finally:
        bus.disconnect()


async def _ask(
    bus: MessageBus,
    interface: str,
    member: str,
    signature: str,
    body: list[Any],
    timeout: float,
) -> list[Any] | None:
    message = Message(
        destination=BUS_NAME,
        path=OBJECT_PATH,
        interface=interface,
        member=member,
        signature=signature,
        body=body,
    )
    try:
        reply = await asyncio.wait_for(bus.call(message), timeout)
    except asyncio.TimeoutError as exc:
        raise NodemedicError(f"nodemedic did not answer {member} within {timeout:g}s") from exc
    if reply.message_type is not MessageType.ERROR:
        return list(reply.body)
    if reply.error_name in FILE_WAY:
        return None
    raise _refusal(member, reply)


def _refusal(member: str, reply: Message) -> Exception:
    text = str(reply.body[0]) if reply.body else ""
    if reply.error_name == ErrorType.ACCESS_DENIED.value:
        return PermissionError(f"nodemedic's {member} is for root only ({text}): run this as root")
    if reply.error_name == UNKNOWN_RULE:
        return UnknownRuleError(text)
    return NodemedicError(f"nodemedic refused {member}: {text} ({reply.error_name})")


def _same_file(served: object, path: Path) -> bool:
    try:
        return bool(served) and Path(str(served)).resolve() == path.resolve()
    except OSError:
        return False
