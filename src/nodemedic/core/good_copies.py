"""When to take a last-known-good copy of containerd's config. Pure: it decides, the executor reads,
probes and saves (``executor/keeping.py`` with the steps of ``actions/good_config.py``).

Each start of containerd (its unit reported active with a main process not judged yet) is judged
once: the executor reads the content it started with, and ``settle`` seconds later, if the same
process is still the unit's main process, judges the rest (the file unchanged, a real request
answered, the file loadable) and keeps that content. Only the main PID judged last is kept here,
so a resync of the same running process (a bus reconnect, a reload) is not judged twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from nodemedic.core.effects import Effect, Effects, Instant, Later
from nodemedic.core.nodeview import NodeView
from nodemedic.events import Event, UnitChanged


@dataclass(frozen=True, slots=True)
class ReadStartedWith(Effect):
    """containerd's process ``pid`` has just started: read the config it started with and tell
    ``GoodCopies.started_with``."""

    pid: int


@dataclass(frozen=True, slots=True)
class KeepIfHealthy(Effect):
    """``pid`` still runs after ``settle``: keep ``content`` if the file still holds it, containerd
    answers a real request and the file loads (the record only for a copy not kept before)."""

    pid: int
    content: bytes


class GoodCopies:
    """Decides which start of ``unit`` is judged, and when (see the module's docstring)."""

    def __init__(self, unit: str, settle: float, view: NodeView) -> None:
        self.unit, self.settle, self.view = unit, settle, view
        self.judged = 0  # the main PID whose start was judged last

    def handle(self, event: Event, now: Instant) -> Effects:
        """A start of ``unit``: a main process, not judged yet, reported active (the view has
        seen the event already)."""
        if not (isinstance(event, UnitChanged) and event.unit == self.unit):
            return []
        seen, pid = self.view.state(self.unit), self.view.main_pid(self.unit)
        if seen is None or seen.active_state != "active" or not pid or pid == self.judged:
            return []
        self.judged = pid
        return [ReadStartedWith(pid)]

    def started_with(self, pid: int, content: bytes | None) -> Effects:
        """What ``pid`` started with, as read; None: unreadable, so this start is not judged."""
        if content is None:
            return []
        settled = partial(self._settled, pid, content)
        return [Later(self.settle, settled, what=f"judging {self.unit}'s start (pid {pid})")]

    def _settled(self, pid: int, content: bytes, now: Instant) -> Effects:
        if not self.running(pid):
            return []  # restarted meanwhile: not the content that ran
        return [KeepIfHealthy(pid, content)]

    def running(self, pid: int) -> bool:
        """Whether ``pid`` is still the unit's last main process seen active."""
        return self.view.last_main_pid(self.unit) == pid
