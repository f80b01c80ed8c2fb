"""Takes last-known-good copies of containerd's config: once containerd has run healthy with a
content for ``settle`` (the same main process still active, answering a real request, the file
unchanged since it started and loadable), that content is kept (content-addressed), for
``restore-config`` to put back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from nodemedic.configs import GoodConfigs, config_problem, read_config
from nodemedic.errors import ProbeError
from nodemedic.events import Event, UnitChanged
from nodemedic.ports import VersionProbe
from nodemedic.report import RecordKind, Reporter

log = logging.getLogger(__name__)


class LastGoodKeeper:
    """Judges each start of ``unit`` after ``settle`` and keeps the config it ran with if it ran
    healthy. ``main_pid`` gives the unit's last main process seen active (the node view's copy)."""

    def __init__(
        self,
        path: Path,
        store: GoodConfigs,
        unit: str,
        settle: float,
        probe: VersionProbe,
        socket: str,
        timeout: float,
        report: Reporter,
        *,
        main_pid: Callable[[], int],
    ) -> None:
        self.path, self.store, self.unit, self.settle = path, store, unit, settle
        self._probe, self._socket, self._timeout = probe, socket, timeout
        self._report = report
        self._main_pid = main_pid
        # The main PID whose start was judged last: one judgement per start, however often D-Bus
        # reports the same running process (a resync after a bus reconnect, a reload).
        self._judged = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Lives as long as the daemon; pending checks end with it."""
        try:
            await asyncio.Future()
        finally:
            for task in self._tasks:
                task.cancel()

    def handle(self, event: Event) -> None:
        """Notice a start of ``unit``: a new main process reported active."""
        if not (isinstance(event, UnitChanged) and event.unit == self.unit):
            return
        if event.active_state != "active" or not event.main_pid or event.main_pid == self._judged:
            return
        self._judged = event.main_pid  # a new containerd process: judge it after it has run a while
        task = asyncio.get_running_loop().create_task(self._judge(event.main_pid))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _judge(self, pid: int) -> None:
        try:
            started_with = await asyncio.to_thread(read_config, self.path)
        except OSError:
            return
        await asyncio.sleep(self.settle)
        with contextlib.suppress(OSError):
            if self._main_pid() != pid or await asyncio.to_thread(read_config, self.path) != started_with:
                return  # restarted, or edited since: not the content that ran
            try:
                await self._probe.version(self._socket, self._timeout)
            except ProbeError:
                return
            if await config_problem(self.path) is not None:
                return
            await self._keep(started_with)

    async def _keep(self, content: bytes) -> None:
        known = {p.name for p in self.store.copies()}
        kept = await asyncio.to_thread(self.store.save, content)
        if kept.name not in known:
            self._report(
                RecordKind.DAEMON,
                f"kept a last-known-good copy of {self.path}: {kept}",
                PATH=str(kept),
                OUTCOME="config-kept",
            )
