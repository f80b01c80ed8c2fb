"""Builds and wires everything from the policy. The one place that knows every part.

Events flow one way: the sources emit them into one queue; the daemon hands each to the executor,
which feeds the node view and the cores (pure) and runs the effects they return through the
actions. The sources whose work the rules decide (paths, files, the probe, the resource checks)
are built by ``policy_sources``, so a reload can build them again for the new policy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodemedic.actions.base import ActionContext
from nodemedic.actions.freezer import Freezer
from nodemedic.api import Api
from nodemedic.clock import MonotonicClock
from nodemedic.configs import GoodConfigs
from nodemedic.events import Event
from nodemedic.executor import Executor, keeping, placeholders
from nodemedic.executor.interventions import GuardParts, SighupInterventions, register
from nodemedic.metrics import Metrics, TextfileWriter
from nodemedic.policy.match import journal_filter
from nodemedic.policy.model import Policy
from nodemedic.ports import Clock, SystemdManager, UnitControl, VersionProbe
from nodemedic.report import Record, RecordKind, Reporter
from nodemedic.snapshot import StatusTracker
from nodemedic.sources.dbus import SystemdBus
from nodemedic.sources.filewatch import FileWatcher
from nodemedic.sources.inotify import PathWatcher
from nodemedic.sources.journal import JournalFollower
from nodemedic.sources.probe import ContainerdProbe, ProbeLoop
from nodemedic.sources.resources import ResourceWatch
from nodemedic.sources.tracefs import TraceSignals
from nodemedic.store import IntentStore, StateStore

CURSOR_FILE = "journal.cursor"
GOOD_CONFIGS = "config-good"
FROZEN = "frozen.json"
SIGHUP_STATE = "sighup.json"
CGROUP_ROOT = Path("/sys/fs/cgroup")
POLICY_SOURCES = ("inotify", "files", "probe", "resources")  # built again at a reload

Source = Callable[[], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class Wiring:
    """What the sources that follow the policy's triggers are built from."""

    emit: Callable[[Event], None]
    clock: Clock
    prober: VersionProbe
    report: Callable[..., Record]
    main_pid: Callable[[str], int]  # the node view's copy of a unit's main process
    guard_config: str | None  # config.toml, followed for the SIGHUP guard's coalesced reloads


@dataclass
class App:
    policy: Policy
    policy_path: Path | None
    report: Callable[..., Record]  # the executor's report: every record passes it
    events: asyncio.Queue[Event]
    sources: dict[str, Source]
    systemd: SystemdBus
    executor: Executor
    repairs: set[asyncio.Task[None]]
    observers: list[Callable[[Event], None]] = field(default_factory=list)  # see every event too
    guard: SighupInterventions | None = None  # [sighup], unless mode = "off"
    placeholders: placeholders.Placeholders | None = None  # [placeholder] (mode "off": does nothing)
    wiring: Wiring | None = None  # None: the policy's sources are not rebuilt at a reload
    journal: JournalFollower | None = None  # its filter follows the policy's journal triggers

    def policy_sources(self, policy: Policy) -> dict[str, Source]:
        """Fresh sources for ``policy``'s paths, files, probe and resource checks."""
        return policy_sources(policy, self.wiring) if self.wiring is not None else {}

    def close_probe(self) -> None:
        """Close the probe's kept connection to containerd (at shutdown)."""
        if self.wiring is not None and isinstance(self.wiring.prober, ContainerdProbe):
            self.wiring.prober.close()


def build_app(
    policy: Policy,
    report: Reporter,
    *,
    policy_path: Path | None = None,
    clock: Clock | None = None,
    bus_address: str | None = None,
    journal_dir: str | None = None,
    units: UnitControl | None = None,
    probe: VersionProbe | None = None,
    reload: Callable[[], None] | None = None,
) -> App:
    """Every part, wired. ``reload`` (the daemon's reload request) also serves the D-Bus API
    (io.nodemedic1) on the system bus, or at ``bus_address``; without it no API is served."""
    clock = clock or MonotonicClock()
    events: asyncio.Queue[Event] = asyncio.Queue()
    settings = policy.daemon
    systemd = SystemdBus(
        settings.watch_units, events.put_nowait, clock, bus_address=bus_address, on_state=_say(report, "dbus")
    )
    prober = probe or ContainerdProbe()
    good = GoodConfigs(settings.state_dir / GOOD_CONFIGS, settings.config_backup.keep)
    ctx = ActionContext(units or systemd, prober, clock, settings.quarantine, good_configs=good)
    app = _with_executor(policy, policy_path, ctx, report, events, systemd)
    executor = app.executor
    follower = _journal(policy, events.put_nowait, clock, journal_dir, app.report)
    app.journal = follower
    app.sources["journal"] = follower.run
    keeping.register(executor, settings, good)  # last-known-good copies of config.toml
    app.placeholders = placeholders.register(executor, policy)  # a reload may turn it on
    if policy.sighup.mode != "off":
        app.guard = _build_guard(app, clock, systemd, good)
    if settings.metrics.enabled:
        _export_metrics(app, clock, follower)
    guard_config = settings.config_backup.path if app.guard is not None else None
    app.wiring = Wiring(events.put_nowait, clock, prober, app.report, executor.view.main_pid, guard_config)
    app.sources.update(app.policy_sources(policy))
    if reload is not None:
        app.sources["api"] = Api(app, reload, bus_address=bus_address).run
    return app


def _with_executor(
    policy: Policy,
    policy_path: Path | None,
    ctx: ActionContext,
    report: Reporter,
    events: asyncio.Queue[Event],
    systemd: SystemdBus,
) -> App:
    """The executor, its state files and the status tracker, in an App whose records pass it."""
    repairs: set[asyncio.Task[None]] = set()
    state = StateStore(policy.daemon.state_dir), IntentStore(policy.daemon.state_dir)
    executor = Executor(policy, ctx, report, _spawner(repairs), *state)
    executor.listeners.append(StatusTracker(ctx.clock, policy, policy_path))  # for status and the API
    # the daemon's own records pass the executor too, so every listener sees every record
    return App(
        policy, policy_path, executor.report, events, {"dbus": systemd.run}, systemd, executor, repairs
    )


def policy_sources(policy: Policy, wiring: Wiring) -> dict[str, Source]:
    """The sources whose work the policy's triggers decide; each only when some trigger needs it."""
    emit, clock, settings = wiring.emit, wiring.clock, policy.daemon
    sources: dict[str, Source] = {"inotify": PathWatcher(policy.watched_paths(), emit, clock).run}
    if policy.uses_probe():
        p = settings.probe
        sources["probe"] = ProbeLoop(wiring.prober, p.socket, p.interval, p.timeout, emit, clock).run
    if policy.resource_checks():
        res, p = settings.resources, settings.probe
        unit = res.unit
        watch = ResourceWatch(
            policy.resource_checks(),
            unit,
            res.interval,
            wiring.prober,
            p.socket,
            p.timeout,
            emit,
            clock,
            main_pid=lambda: wiring.main_pid(unit),
        )
        sources["resources"] = watch.run
    # file triggers' paths, and config.toml for the guard's coalesced reloads
    files = policy.watched_files() + ([wiring.guard_config] if wiring.guard_config else [])
    if files:
        sources["files"] = FileWatcher(files, emit, clock, on_state=_say(wiring.report, "inotify")).run
    return sources


def _export_metrics(app: App, clock: Clock, follower: JournalFollower) -> None:
    """Prometheus metrics from every record and event, written for node-exporter's textfile collector."""
    executor = app.executor
    guard = app.guard.core if app.guard is not None else None
    metrics = Metrics(
        executor,
        clock,
        guard=guard,
        journal_lag=lambda: follower.lag,
        journal_last_read=lambda: follower.last_read,
        journal_skipped=lambda: follower.skipped,
    )
    executor.listeners.append(metrics.record)  # every record
    app.sources["metrics"] = TextfileWriter(metrics, app.policy.daemon.metrics).run


def _journal(
    policy: Policy,
    emit: Callable[[Event], None],
    clock: Clock,
    journal_dir: str | None,
    report: Callable[..., Record],
) -> JournalFollower:
    """The journal source, making events only of the lines some journal trigger may fire on."""
    settings = policy.daemon

    def skipped(message: str, detail: str) -> None:
        report(RecordKind.ERROR, message, SOURCE="journal", OUTCOME="skipped", DETAIL=detail)

    return JournalFollower(
        settings.journal_units,
        emit,
        clock,
        cursor_file=settings.state_dir / CURSOR_FILE,
        journal_dir=journal_dir,
        wanted=journal_filter(policy.rule),
        on_skip=skipped,
    )


def _say(report: Callable[..., Record], source: str) -> Callable[[str], None]:
    """A source's word on its own state (connected, watching, lost), as a DAEMON record."""

    def say(message: str) -> None:
        report(RecordKind.DAEMON, message, SOURCE=source)

    return say


def _spawner(repairs: set[asyncio.Task[None]]) -> Callable[[Coroutine[Any, Any, None]], None]:
    def spawn(coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        repairs.add(task)
        task.add_done_callback(repairs.discard)

    return spawn


def _build_guard(app: App, clock: Clock, systemd: SystemdManager, good: GoodConfigs) -> SighupInterventions:
    """[sighup]: the guard's core and its interventions on the executor, and the kernel trace that
    names senders. Good copies of config.toml come from the executor's context."""
    policy, report, executor = app.policy, app.report, app.executor
    hup, settings = policy.sighup, policy.daemon
    # nodemedic's own cgroup is protected by the freezer itself
    freezer = Freezer(
        CGROUP_ROOT, settings.state_dir / FROZEN, hup.throttle.deny, [f"/system.slice/{hup.unit}"]
    )
    parts = GuardParts(
        systemd=systemd,
        freezer=freezer,
        config=Path(settings.config_backup.path),
        state_file=settings.state_dir / SIGHUP_STATE,
        probe_socket=settings.probe.socket,
        probe_timeout=settings.probe.timeout,
    )
    guard = register(executor, hup, settings.mode, parts)
    app.sources["sighup"] = guard.run
    if hup.trace:
        trace = TraceSignals(
            tracefs=hup.tracefs,
            proc=hup.proc,
            unit=hup.unit,
            emit=app.events.put_nowait,
            clock=clock,
            on_state=_say(report, "tracefs"),
            main_pid=lambda: executor.view.main_pid(hup.unit),
        )
        app.sources["tracefs"] = trace.run
        app.observers.append(trace.handle)
    return guard
