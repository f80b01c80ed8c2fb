"""``[placeholder]``'s effects, run: a placeholder socket made where containerd's socket is missing.

``core/path_keeper.py`` decides; this makes the socket with ``actions/placeholder_socket.py`` and tells
the core how it went. Unlike a repair it does not wait for the executor's lock: a repair under way
(a restart of containerd, say) is exactly what may leave the path missing, and the placeholder
only ever creates a name where there is none: it replaces nothing, stops nothing, and containerd
removes it when it binds. Nor does it spend the repair budget. It is a few system calls, done in
the event loop within milliseconds of inotify's event; containerd's config (for the owner) is
parsed again only when the file changed.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from nodemedic.actions.placeholder_socket import make_placeholder, socket_owner, sweep_temporaries
from nodemedic.core.path_keeper import ACTION, MakePlaceholder, PlaceholderCore
from nodemedic.errors import UnsafePathError
from nodemedic.policy.model import Policy
from nodemedic.report import RecordKind

if TYPE_CHECKING:
    from nodemedic.executor import Executor


def register(ex: Executor, policy: Policy) -> Placeholders:
    """The placeholder core and its handler, added to ``ex``; returns what a reload updates."""
    core = PlaceholderCore(policy.placeholder, policy.daemon.mode, ex.view)
    for path in policy.placeholder.paths:  # what a crash between bind and unlink left
        for removed in sweep_temporaries(path):
            message = f"removed {removed}, a placeholder's temporary a crash left"
            ex.report(RecordKind.DAEMON, message, PATH=removed, ACTION=ACTION, OUTCOME="removed")
    placeholders = Placeholders(ex, core)
    ex.handlers[MakePlaceholder] = placeholders.make
    ex.add_core(core)
    return placeholders


class Placeholders:
    """Makes the placeholders the core asks for (see the module's docstring)."""

    def __init__(self, ex: Executor, core: PlaceholderCore) -> None:
        self.ex, self.core = ex, core
        self._owners: dict[str, tuple[tuple[int, int, int], tuple[int, int]]] = {}

    def replace(self, policy: Policy) -> None:
        """A reloaded policy's ``[placeholder]`` and ``[daemon].mode``, at once (a mode now in
        effect decides again for the paths already missing: those effects are run here)."""
        self.ex.run(self.core.replace(policy.placeholder, policy.daemon.mode, self.ex.now()))

    def make(self, effect: MakePlaceholder) -> None:
        settings = self.core.settings
        uid, gid = self._owner(settings.config, effect.path)
        run = self.ex.run
        try:
            placed = make_placeholder(effect.path, int(settings.socket_mode, 8), uid, gid)
        except FileExistsError:
            run(self.core.not_made(effect, "skipped", "something appeared there meanwhile: left alone"))
        except UnsafePathError as exc:
            run(self.core.not_made(effect, "refused", str(exc)))
        except OSError as exc:
            run(self.core.not_made(effect, "failed", f"{type(exc).__name__}: {exc}"))
        else:
            elapsed = (self.ex.ctx.clock.monotonic() - effect.detected_at) * 1000.0
            identity = placed.inode, placed.ctime_ns
            run(self.core.made(effect, identity, placed.describe(), max(0.0, elapsed), placed.replaced))

    def _owner(self, config: str, path: str) -> tuple[int, int]:
        """containerd's owner for ``path``, from its config; parsed again only when it changed."""
        try:
            st = os.stat(config)
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            return 0, 0
        cached = self._owners.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        owner = socket_owner(config, path)
        self._owners[path] = (key, owner)
        return owner
