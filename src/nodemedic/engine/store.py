"""nodemedic's persisted engine state (breakers, backoff, budget) and operators' reset requests.

One JSON file under the state directory, written atomically (temporary file, fsync, rename), so a
crash leaves the old or the new state. A file that cannot be read is moved aside with a warning and
the daemon starts clean. ``nodemedic reset RULE`` drops a request file into ``reset/``; the daemon
takes it at start-up and at each reload, whether or not it was running when the request was made.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from nodemedic.state import atomic_write

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
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("version") != VERSION:
                raise ValueError(f"not a nodemedic state file of version {VERSION}")
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            self.set_aside(str(exc))
            return {}
        return data

    def set_aside(self, why: str) -> None:
        """Move an unusable state file aside (never deleted); the daemon starts clean."""
        aside = self.path.with_name(
            f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        )
        try:
            os.replace(self.path, aside)
        except OSError:
            aside = self.path
        log.warning("state file %s unusable (%s); kept as %s, starting clean", self.path, why, aside)
        self.corrupt = str(aside)

    def save(self, data: dict[str, Any]) -> None:
        atomic_write(self.path, json.dumps({"version": VERSION, **data}, indent=1, sort_keys=True) + "\n")

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
            request.unlink(missing_ok=True)
        return names
