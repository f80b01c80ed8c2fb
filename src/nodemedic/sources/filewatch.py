"""Watch files for new content with inotify (e.g. containerd's config.toml being edited).

Editors and tools write a file in place (close-write) or write a temporary file and rename it over
(moved-to); both wake the watch on the parent directory. An event is only a wake-up: whoever acts on
it reads the file and compares its content.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from asyncinotify import Inotify, Mask

from nodemedic.events import Event, FileChanged
from nodemedic.ports import Clock

log = logging.getLogger(__name__)

# Not CREATE: a new file is still empty then; its CLOSE_WRITE follows once it is written.
MASK = Mask.CLOSE_WRITE | Mask.MOVED_TO | Mask.ONLYDIR


class FileWatcher:
    """Emits FileChanged for ``paths`` whenever one may have new content."""

    def __init__(
        self,
        paths: list[str],
        emit: Callable[[Event], None],
        clock: Clock,
        on_state: Callable[[str], None] = log.warning,
    ) -> None:
        self.paths = list(dict.fromkeys(paths))
        self._emit = emit
        self._clock = clock
        self._on_state = on_state

    async def run(self) -> None:
        if not self.paths:
            return
        names: dict[str, set[str]] = {}
        for path in self.paths:
            names.setdefault(os.path.dirname(path), set()).add(os.path.basename(path))
        with Inotify() as inotify:
            for directory in names:
                try:
                    inotify.add_watch(directory, MASK)
                except (FileNotFoundError, NotADirectoryError):
                    self._on_state(
                        f"{directory} does not exist: changes to the files in it are not "
                        "followed until nodemedic restarts"
                    )
            async for event in inotify:
                if event.watch is None or event.name is None:
                    continue
                directory = str(event.watch.path)
                if event.name.name in names.get(directory, ()):
                    self._emit(
                        FileChanged(os.path.join(directory, event.name.name), at=self._clock.monotonic())
                    )
