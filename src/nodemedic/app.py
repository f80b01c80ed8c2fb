"""Builds and wires everything from the policy. The one place that knows every part."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodemedic.actions.base import ActionContext
from nodemedic.actions.freezer import Freezer
from nodemedic.clock import MonotonicClock
from nodemedic.configs import GoodConfigs
from nodemedic.engine.lastgood import LastGoodKeeper
from nodemedic.engine.sighup import GuardContext, SighupGuard
from nodemedic.events import Event
from nodemedic.executor import Executor
from nodemedic.policy.model import Policy
from nodemedic.ports import Clock, SystemdManager, UnitControl, VersionProbe
from nodemedic.report import RecordKind, Reporter
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


@dataclass
class App:
    policy: Policy
    policy_path: Path | None
    report: Reporter
    events: asyncio.Queue[Event]
    sources: dict[str, Callable[[], Coroutine[Any, Any, None]]]
    systemd: SystemdBus
    executor: Executor
    repairs: set[asyncio.Task[None]]
    observers: list[Callable[[Event], None]] = field(default_factory=list)  # see every event too
    guard: SighupGuard | None = None  # [sighup], unless mode = "off"


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
) -> App:
    clock = clock or MonotonicClock()
    events: asyncio.Queue[Event] = asyncio.Queue()
    emit = events.put_nowait
    settings = policy.daemon

    def on_bus_state(message: str) -> None:
        report(RecordKind.DAEMON, message, SOURCE="dbus")

    def on_files_state(message: str) -> None:
        report(RecordKind.DAEMON, message, SOURCE="inotify")

    systemd = SystemdBus(settings.watch_units, emit, clock, bus_address=bus_address, on_state=on_bus_state)
    journal = JournalFollower(
        settings.journal_units,
        emit,
        clock,
        cursor_file=settings.state_dir / CURSOR_FILE,
        journal_dir=journal_dir,
    )
    paths = PathWatcher(policy.watched_paths(), emit, clock)
    prober = probe or ContainerdProbe()
    backup = settings.config_backup
    good = GoodConfigs(settings.state_dir / GOOD_CONFIGS, backup.keep)
    ctx = ActionContext(units=units or systemd, probe=prober, clock=clock,
                        quarantine_dir=settings.quarantine, good_configs=good)  # fmt: skip
    keeper = LastGoodKeeper(Path(backup.path), good, backup.unit, backup.settle, prober,
                            settings.probe.socket, settings.probe.timeout, report)  # fmt: skip
    repairs: set[asyncio.Task[None]] = set()
    sources = {"dbus": systemd.run, "journal": journal.run, "inotify": paths.run, "lastgood": keeper.run}
    if policy.uses_probe():
        p = settings.probe
        sources["probe"] = ProbeLoop(prober, p.socket, p.interval, p.timeout, emit, clock).run

    executor = Executor(
        policy,
        ctx,
        report,
        _spawner(repairs),
        StateStore(settings.state_dir),
        IntentStore(settings.state_dir),
    )
    observers: list[Callable[[Event], None]] = [keeper.handle]
    if policy.resource_checks():
        res = settings.resources
        watch = ResourceWatch(policy.resource_checks(), res.unit, res.interval, prober,
                              settings.probe.socket, settings.probe.timeout, emit, clock)  # fmt: skip
        sources["resources"] = watch.run
        observers.append(watch.handle)
    guard = None
    if policy.sighup.mode != "off":
        guard = _build_guard(policy, report, clock, emit, systemd, prober, good, executor, sources, observers)
    # file triggers' paths, and config.toml for the guard's coalesced reloads
    files = policy.watched_files() + ([backup.path] if guard is not None else [])
    if files:
        sources["files"] = FileWatcher(files, emit, clock, on_state=on_files_state).run
    return App(
        policy=policy,
        policy_path=policy_path,
        report=report,
        events=events,
        sources=sources,
        systemd=systemd,
        executor=executor,
        repairs=repairs,
        observers=observers,
        guard=guard,
    )


def _spawner(repairs: set[asyncio.Task[None]]) -> Callable[[Coroutine[Any, Any, None]], None]:
    def spawn(coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        repairs.add(task)
        task.add_done_callback(repairs.discard)

    return spawn


def _build_guard(policy: Policy, report: Reporter, clock: Clock, emit: Callable[[Event], None],
                 systemd: SystemdManager, prober: VersionProbe, good: GoodConfigs, runner: Executor,
                 sources: dict[str, Callable[[], Coroutine[Any, Any, None]]],
                 observers: list[Callable[[Event], None]]) -> SighupGuard:  # fmt: skip
    """[sighup]: the guard, the config watch it reloads from, and the kernel trace that names senders."""
    hup, settings = policy.sighup, policy.daemon

    def on_trace_state(message: str) -> None:
        report(RecordKind.DAEMON, message, SOURCE="tracefs")

    # nodemedic's own cgroup is protected by the freezer itself
    freezer = Freezer(
        CGROUP_ROOT, settings.state_dir / FROZEN, hup.throttle.deny, [f"/system.slice/{hup.unit}"]
    )
    config = Path(settings.config_backup.path)
    ctx = GuardContext(systemd=systemd, probe=prober, probe_socket=settings.probe.socket,
                       probe_timeout=settings.probe.timeout, config=config, good=good, freezer=freezer,
                       state_file=settings.state_dir / SIGHUP_STATE, exclusive=lambda: runner.lock,
                       closing=lambda: runner.closing)  # fmt: skip
    guard = SighupGuard(hup, settings.mode, ctx, report, clock)
    sources["sighup"] = guard.run
    observers.append(guard.handle)
    if hup.trace:
        trace = TraceSignals(tracefs=hup.tracefs, proc=hup.proc, unit=hup.unit, emit=emit, clock=clock,
                             on_state=on_trace_state)  # fmt: skip
        sources["tracefs"] = trace.run
        observers.append(trace.handle)
    return guard
