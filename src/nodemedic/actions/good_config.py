"""Keeping a last-known-good copy of containerd's config: the steps the executor runs when
``core/good_copies.py`` asks (``executor/keeping.py``). Once containerd has run healthy with a
content for ``settle`` (the same main process still active, answering a real request, the file
unchanged since it started and loadable), that content is kept (content-addressed), for
``restore-config`` to put back.

Every file read and write runs in a thread, off the event loop; what cannot be read or saved
leaves nothing kept (a good copy is a convenience: no copy is better than a wrong one).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from nodemedic.configs import GoodConfigs, config_problem, read_config
from nodemedic.ports import VersionProbe

log = logging.getLogger(__name__)


class GoodConfigKeeper:
    """Reads, judges (``check``) and keeps (``apply``) the content containerd runs with. The copy
    is the ``verify``: content-addressed, it holds exactly what was judged."""

    def __init__(
        self, path: Path, store: GoodConfigs, probe: VersionProbe, socket: str, timeout: float
    ) -> None:
        self.path, self.store = path, store
        self._probe, self._socket, self._timeout = probe, socket, timeout

    async def started_with(self) -> bytes | None:
        """The file's content now (at a start); None if it cannot be read."""
        try:
            return await asyncio.to_thread(read_config, self.path)
        except OSError as exc:
            log.debug("not judging this start: %s", exc)
            return None

    async def check(self, content: bytes, running: Callable[[], bool]) -> str | None:
        """Why ``content`` is not to be kept; None if it ran healthy. ``running``: whether the
        process that started with it is still the unit's main process (and may still be judged)."""
        gone = "no longer the main process (or nodemedic is stopping)"
        try:
            if not running():
                return gone
            if await asyncio.to_thread(read_config, self.path) != content:
                return "edited since it started"
            await self._probe.version(self._socket, self._timeout)  # ProbeError: an OSError
            if not running():
                return gone
            problem = await config_problem(self.path)
        except OSError as exc:  # unreadable, no answer, or containerd's own check gave no verdict
            return str(exc)
        return problem

    async def apply(self, content: bytes) -> Path | None:
        """Keep ``content``; the copy's path if it is a new one, None if it was kept before (or
        cannot be saved)."""
        try:
            return await asyncio.to_thread(self._save_new, content)
        except OSError as exc:
            log.debug("cannot keep a good copy of %s: %s", self.path, exc)
            return None

    def _save_new(self, content: bytes) -> Path | None:
        known = {p.name for p in self.store.copies()}
        kept = self.store.save(content)
        return None if kept.name in known else kept
