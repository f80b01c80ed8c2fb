"""nodemedic's persisted engine state (breakers, backoff, budget) and operators' reset requests.

One JSON file under the state directory, written atomically (temporary file, fsync, rename), so a
crash leaves the old or the new state. A file that cannot be read is moved aside with a warning and
the daemon starts clean. ``nodemedic reset RULE`` drops a request file into ``reset/``; the daemon
takes it at start-up and at each reload, whether or not it was running when the request was made.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from nodemedic.errors import StateSaveError
from nodemedic.state import SetAside, atomic_write, load_checked, note_save_failed, note_saved, set_aside

log = logging.getLogger(__name__)
STATE_FILE = "state.json"
RESET_DIR = "reset"
VERSION = 1


class StateStore:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / STATE_FILE
        self.reset_dir = state_dir / RESET_DIR
        self.corrupt = ""  # where an unusable state file was moved, for the start-up record

    def load(self) -> dict[str, Any]:
        """The saved state, or an empty one. A corrupt file is moved aside, never deleted."""
        return load_checked(self.path, _checked_state, self._noted) or {}

    def set_aside(self, why: str) -> None:
        """Move an unusable state file aside (never deleted); the daemon starts clean."""
        set_aside(self.path, why, self._noted)

    def _noted(self, aside: SetAside) -> None:
        self.corrupt = aside.kept_as  # the runner's start-up record says it

    def save(self, data: dict[str, Any]) -> None:
        """Save atomically. StateSaveError on the first failure of a run only (the runner records
        it): a full or read-only state folder is said once, and repairs go on regardless."""
        try:
            atomic_write(self.path, json.dumps({"version": VERSION, **data}, indent=1, sort_keys=True) + "\n")
        except OSError as exc:
            if note_save_failed(self.path, exc):
                raise StateSaveError(exc.errno, f"{exc.strerror or exc}: {self.path} is not saved; repairs "
                                     "go on with breakers, backoff and budget in memory only; free "
                                     "space or make the state directory writable (said once until "
                                     "a save works again)") from exc  # fmt: skip
            return
        note_saved(self.path)

    def request_reset(self, rule: str) -> Path:
        self.reset_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        request = self.reset_dir / rule
        atomic_write(request, f"{time.time():.3f}\n")
        return request

    def take_resets(self) -> list[str]:
        """Rules whose reset was requested; the requests are consumed."""
        try:
            requests = sorted(self.reset_dir.iterdir())
        except FileNotFoundError:
            return []
        names = []
        for request in requests:
            if request.name.startswith("."):
                continue  # an atomic write in progress
            names.append(request.name)
            try:
                request.unlink(missing_ok=True)
            except OSError as exc:  # read-only: taken again at each reload, which would undo the breaker
                log.warning("cannot consume the reset request %s (%s): not applied; make the state "
                            "directory writable and reset again", request, exc)  # fmt: skip
                names.pop()
        return names


def _checked_state(text: str) -> dict[str, Any]:
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise ValueError(f"not a nodemedic state file of version {VERSION}")
    return data
