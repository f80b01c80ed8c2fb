"""The daemon's life: startup -> main loop -> shutdown. The shutdown trigger is passed in.

Signals are turned into requests by the caller (cli.py) and never handled here directly, so tests
drive the daemon without sending real signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol

from nodemedic import __version__
from nodemedic.app import POLICY_SOURCES, App
from nodemedic.core.sighup_guard import RESTART_SOURCES
from nodemedic.errors import PolicyError, SourceFailedError
from nodemedic.events import Event
from nodemedic.policy.load import load_policy
from nodemedic.policy.match import journal_filter
from nodemedic.policy.model import DaemonSettings, Policy
from nodemedic.report import RecordKind
from nodemedic.store import take_set_aside

log = logging.getLogger(__name__)

READY_WAIT = 5.0  # how long start-up waits for the D-Bus connection before saying READY anyway
REPAIR_GRACE = 120.0  # a repair under way is finished, not cut off, at shutdown (bounded)


class Notifier(Protocol):
    def __call__(self, state: str) -> object: ...


def sd_notify(state: str) -> object:
    from systemd import daemon

    return daemon.notify(state)


class Daemon:
    def __init__(
        self, app: App, shutdown: asyncio.Event, reload: asyncio.Event, notify: Notifier = sd_notify
    ) -> None:
        self.app = app
        self.shutdown = shutdown
        self.reload = reload
        self.notify = notify
        self.tasks: dict[str, asyncio.Task[None]] = {}  # sources, the dispatch and the watchdog, by name

    async def run(self) -> None:
        self._startup()
        try:
            await self._ready()
            await self._main_loop()
        finally:
            await self._shutdown()

    def _startup(self) -> None:
        # A repair cut off by our last end (SIGKILL, OOM) is finished first: it holds the repair
        # lock before any source's event can start another one.
        self.app.executor.recover()
        for name, run in self.app.sources.items():
            self._start(name, run)
        self._start("dispatch", self._dispatch)
        watchdog = _watchdog_interval()
        if watchdog:
            self._start("watchdog", lambda: self._watchdog(watchdog))

    def _start(self, name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self.tasks[name] = asyncio.get_running_loop().create_task(run(), name=name)

    async def _ready(self) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.app.systemd.connected.wait(), READY_WAIT)
        policy = self.app.policy
        self.app.report(
            RecordKind.DAEMON,
            f"nodemedic {__version__} started: mode {policy.daemon.mode}, {len(policy.rule)} rule(s), "
            f"watching {', '.join(policy.watched_paths()) or 'no paths'}",
            MODE=policy.daemon.mode,
            VERSION=__version__,
            OUTCOME="started",
        )
        self._report_set_aside()
        self.notify(f"READY=1\nSTATUS=watching {len(policy.rule)} rule(s)")

    def _report_set_aside(self) -> None:
        """State files found damaged (journal cursor, SIGHUP state, freezer registry, good copies)."""
        for found in take_set_aside(self.app.policy.daemon.state_dir):
            message = f"state file {found.path} unusable ({found.why}); kept as {found.kept_as} and not used"
            self.app.report(
                RecordKind.ERROR, message, OUTCOME="state-reset", PATH=found.kept_as, DETAIL=found.why
            )

    async def _main_loop(self) -> None:
        while not self.shutdown.is_set():
            stop = asyncio.ensure_future(self.shutdown.wait())
            reload = asyncio.ensure_future(self.reload.wait())
            running = set(self.tasks.values())
            done, _ = await asyncio.wait([stop, reload, *running], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            reload.cancel()
            for name, task in [(n, t) for n, t in self.tasks.items() if t in done]:
                if not task.cancelled() and task.exception() is not None:
                    self._source_ended(task)
                # a source with nothing to watch (e.g. no paths in the policy) ends at once: fine
                log.debug("%s has nothing to do", name)
                del self.tasks[name]
            if self.reload.is_set():
                self.reload.clear()
                self._reload()

    def _source_ended(self, task: asyncio.Task[None]) -> None:
        exc = task.exception()
        self.app.report(
            RecordKind.ERROR,
            f"{task.get_name()} stopped: {exc!r}; exiting",
            SOURCE=task.get_name(),
            DETAIL=repr(exc),
            OUTCOME="failed",
        )
        raise SourceFailedError(f"{task.get_name()} stopped: {exc!r}") from exc

    async def _dispatch(self) -> None:
        while True:
            event = await self.app.events.get()
            log.debug("event %s", event)
            self.app.executor.handle(event)
            for observe in self.app.observers:
                self._observe(observe, event)

    def _observe(self, observe: Callable[[Event], None], event: Event) -> None:
        """One observer's bug is recorded and never keeps the event from the others."""
        try:
            observe(event)
        except Exception as exc:
            log.debug("observer %r failed on %s", observe, event, exc_info=exc)
            self.app.report(
                RecordKind.ERROR,
                f"internal error in {_name(observe)} on {type(event).__name__} (a nodemedic bug): {exc!r}",
                OUTCOME="internal-error",
                DETAIL=repr(exc),
            )

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def _reload(self) -> None:
        """Re-read the policy; a broken one is reported and the one in force stays."""
        path = self.app.policy_path
        if path is None:
            return
        self.notify("RELOADING=1")
        try:
            policy = load_policy(path)
        except Exception as exc:  # a reload never ends the daemon: a bug in loading is refused too
            problems = exc.problems if isinstance(exc, PolicyError) else [f"internal error: {exc!r}"]
            log.debug("reload refused", exc_info=True)
            self.app.report(
                RecordKind.ERROR,
                f"reload refused, the policy in force stays: {exc}",
                ACTION="reload",
                OUTCOME="refused",
                DETAIL="; ".join(problems),
                PATH=str(path),
            )
        else:
            self._apply(policy, path)
        self.app.executor.take_resets()
        self._report_set_aside()
        self.notify("READY=1")

    def _apply(self, policy: Policy, path: Path) -> None:
        """Put a reloaded policy in force: the rules at once, and the sources that follow its
        triggers built again wherever it asks them for something new."""
        in_force = self.app.executor.policy
        restarted = self._restart_policy_sources(policy, in_force)
        if _needs_restart(policy.daemon, in_force.daemon) or _sighup_needs_restart(policy, in_force):
            message = (
                "reloaded; changes to [daemon] (but mode and budget) or to [sighup]'s sources take "
                "effect at the next restart"
            )
            self.app.report(RecordKind.DAEMON, message, PATH=str(path))
        self.app.policy = policy
        self.app.executor.replace_policy(policy)
        if self.app.journal is not None:
            self.app.journal.wanted = journal_filter(policy.rule)
        if self.app.guard is not None:
            self.app.guard.replace(policy.sighup, policy.daemon.mode)
        if self.app.placeholders is not None:
            self.app.placeholders.replace(policy)
        again = f"; followed again: {', '.join(restarted)}" if restarted else ""
        message = f"policy reloaded from {path}: {len(policy.rule)} rule(s){again}"
        fields = {"ACTION": "reload", "OUTCOME": "reloaded", "PATH": str(path), "DETAIL": " ".join(restarted)}
        self.app.report(RecordKind.DAEMON, message, **fields)

    def _restart_policy_sources(self, policy: Policy, in_force: Policy) -> list[str]:
        """Each source whose share of the policy changed (new paths, files, checks, the probe) is
        replaced by one built for the new policy, so that every trigger of it is served."""
        new, old = policy.served(), in_force.served()
        built = self.app.policy_sources(policy)
        restarted = []
        for name in POLICY_SOURCES:
            if new.get(name, frozenset()) == old.get(name, frozenset()) or not self.app.wiring:
                continue
            task = self.tasks.pop(name, None)
            if task is not None:
                task.cancel()
            if name in built:
                self.app.sources[name] = built[name]
                self._start(name, built[name])
            else:
                self.app.sources.pop(name, None)
            restarted.append(name)
        return restarted

    async def _shutdown(self) -> None:
        self.notify("STOPPING=1")
        # Cutting a repair off between "stop containerd" and "start containerd" would leave the
        # node worse than before: no new one starts, and those under way finish (bounded).
        self.app.executor.closing = True
        deadline = asyncio.get_running_loop().time() + REPAIR_GRACE
        while self.app.repairs and asyncio.get_running_loop().time() < deadline:
            await asyncio.wait(set(self.app.repairs), timeout=deadline - asyncio.get_running_loop().time())
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        await self.app.systemd.close()
        self.app.close_probe()
        self.app.report(RecordKind.DAEMON, "nodemedic stopped", OUTCOME="stopped")


def _needs_restart(new: DaemonSettings, old: DaemonSettings) -> bool:
    """[daemon] settings other than mode and budget are read once, at start-up."""
    live = {"mode", "budget"}
    return new.model_dump(exclude=live) != old.model_dump(exclude=live)


def _sighup_needs_restart(new: Policy, old: Policy) -> bool:
    """[sighup] mode and its settings apply at once; turning it on or off, or its sources, at restart."""
    a, b = new.sighup, old.sighup
    sources = [(getattr(a, k), getattr(b, k)) for k in RESTART_SOURCES]
    return (a.mode == "off") != (b.mode == "off") or any(x != y for x, y in sources)


def _name(observe: Callable[[Event], None]) -> str:
    owner = getattr(observe, "__self__", None)
    return type(owner).__name__ if owner is not None else getattr(observe, "__name__", repr(observe))


def _watchdog_interval() -> float:
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return 0.0
    return int(usec) / 2_000_000
