"""Watch paths with inotify and report when one changes kind (e.g. a socket path becomes a directory).

inotify events are only wake-ups: after each one the watched paths are lstat'ed again, so a burst
or a create-then-replace race is still reported with the real final state. A parent directory that
is missing (e.g. /run/containerd before containerd first starts) is waited for by watching its
nearest existing ancestor; a removed and recreated parent is watched again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from asyncinotify import Inotify, Mask, Watch

from nodemedic.events import Event, PathChanged, PathKind
from nodemedic.fs import path_identity
from nodemedic.ports import Clock

log = logging.getLogger(__name__)

DIR_MASK = (
    Mask.CREATE
    | Mask.DELETE
    | Mask.MOVED_FROM
    | Mask.MOVED_TO
    | Mask.ATTRIB
    | Mask.DELETE_SELF
    | Mask.MOVE_SELF
    | Mask.ONLYDIR
)


class PathWatcher:
    """Emits PathChanged for ``paths``: once each at start, then on every change of kind, and when
    another file of the same kind took a path's place (a new inode; a socket bound anew)."""

    def __init__(self, paths: list[str], emit: Callable[[Event], None], clock: Clock) -> None:
        self.paths = list(paths)
        self._emit = emit
        self._clock = clock
        self._kinds: dict[str, tuple[PathKind, int, int]] = {}
        self._watches: dict[str, tuple[Watch, int]] = {}  # directory -> (watch, inode)

    async def run(self) -> None:
        if not self.paths:
            return
        with Inotify() as inotify:
            self._rearm(inotify)
            self._rescan()
            async for event in inotify:
                if event.mask & Mask.IGNORED and event.watch is not None:
                    self._forget(event.watch)
                self._rearm(inotify)
                self._rescan()

    def _rearm(self, inotify: Inotify) -> None:
        # A subdirectory created before its parent's watch existed sent no event: after adding a
        # watch, look again until nothing new is found.
        while self._arm_once(inotify):
            pass

    def _arm_once(self, inotify: Inotify) -> bool:
        added = False
        for directory in {_nearest_existing(os.path.dirname(p)) for p in self.paths}:
            try:
                inode = os.stat(directory).st_ino
            except FileNotFoundError:
                continue  # vanished since; the next event re-arms
            known = self._watches.get(directory)
            if known and known[1] == inode:
                continue
            try:
                self._watches[directory] = (inotify.add_watch(directory, DIR_MASK), inode)
            except (FileNotFoundError, NotADirectoryError):
                continue
            added = True
            log.debug("watching %s", directory)
        return added

    def _forget(self, watch: Watch) -> None:
        for directory, (w, _) in list(self._watches.items()):
            if w is watch:
                del self._watches[directory]

    def _rescan(self) -> None:
        now = self._clock.monotonic()
        for path in self.paths:
            kind, inode, ctime = identity = path_identity(path)
            if self._kinds.get(path) != identity:
                self._kinds[path] = identity
                self._emit(PathChanged(path, kind, at=now, inode=inode, ctime_ns=ctime))


def _nearest_existing(directory: str) -> str:
    while not os.path.isdir(directory) and directory not in ("/", ""):
        directory = os.path.dirname(directory)
    return directory or "/"
