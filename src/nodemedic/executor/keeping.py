"""Last-known-good copies of containerd's config, taken through the executor.

``core/good_copies.py`` decides which start of containerd is judged and when; this runs what it
returns with the steps of ``actions/good_config.py``: it reads the content a start began with, and
after the core's ``Later(settle)`` judges it and keeps it, saying so once per new copy (a DAEMON
record, OUTCOME config-kept). The reads, the probe and the save run off the loop (threads, or the
probe's own I/O), in tasks the executor tracks.

Observe mode does not stop this: keeping a copy never changes the node, it only writes into
nodemedic's own state directory, and an operator who switches to enforce later wants copies of
what ran healthy meanwhile. Nothing new starts once nodemedic is stopping; a judgement still
pending then simply never fires (its timer goes with the event loop).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nodemedic.actions.good_config import GoodConfigKeeper
from nodemedic.configs import GoodConfigs
from nodemedic.core.good_copies import GoodCopies, KeepIfHealthy, ReadStartedWith
from nodemedic.policy.model import DaemonSettings
from nodemedic.report import RecordKind

if TYPE_CHECKING:
    from nodemedic.executor import Executor

log = logging.getLogger(__name__)


def register(ex: Executor, settings: DaemonSettings, store: GoodConfigs) -> GoodCopies:
    """The good copies' core and handlers, added to ``ex`` (``[daemon.config_backup]``, the
    probe's socket and timeout from ``settings``); returns the core."""
    backup, probe = settings.config_backup, settings.probe
    core = GoodCopies(backup.unit, backup.settle, ex.view)
    keeper = GoodConfigKeeper(Path(backup.path), store, ex.ctx.probe, probe.socket, probe.timeout)
    ex.handlers.update(GoodCopyKeeping(ex, core, keeper).handlers())
    ex.add_core(core)
    return core


class GoodCopyKeeping:
    """Runs the good copies' effects for the executor (see the module's docstring)."""

    def __init__(self, ex: Executor, core: GoodCopies, keeper: GoodConfigKeeper) -> None:
        self.ex, self.core, self.keeper = ex, core, keeper

    def handlers(self) -> dict[type[Any], Callable[[Any], None]]:
        return {ReadStartedWith: self._read, KeepIfHealthy: self._judge}

    def _read(self, effect: ReadStartedWith) -> None:
        if not self.ex.closing:
            self.ex.spawn(self._isolated(self._started_with(effect.pid)))

    def _judge(self, effect: KeepIfHealthy) -> None:
        if not self.ex.closing:
            self.ex.spawn(self._isolated(self._keep(effect)))

    async def _started_with(self, pid: int) -> None:
        content = await self.keeper.started_with()
        self.ex.run(self.core.started_with(pid, content))

    async def _keep(self, effect: KeepIfHealthy) -> None:
        def running() -> bool:
            return self.core.running(effect.pid) and not self.ex.closing

        why_not = await self.keeper.check(effect.content, running)
        if why_not is not None:
            log.debug("no good copy from %s pid %d: %s", self.core.unit, effect.pid, why_not)
            return
        kept = await self.keeper.apply(effect.content)
        if kept is not None:
            path = self.keeper.path
            self.ex.report(
                RecordKind.DAEMON,
                f"kept a last-known-good copy of {path}: {kept}",
                PATH=str(kept),
                OUTCOME="config-kept",
            )

    async def _isolated(self, work: Coroutine[Any, Any, None]) -> None:
        """A bug here is recorded, and never reaches the task that awaits the executor's work."""
        try:
            await work
        except Exception as exc:
            log.debug("keeping a good copy failed", exc_info=exc)
            message = f"internal error in keeping a good copy (a nodemedic bug): {exc!r}"
            self.ex.report(RecordKind.ERROR, message, OUTCOME="internal-error", DETAIL=repr(exc))
