"""The reload ``[sighup] mode = "coalesce"`` does for containerd: one restart that applies a real change.

containerd runs with SIGHUP ignored (actions/sighup_dropin.py), so a SIGHUP or a write to config.toml
is only a request; the guard's core (core/sighup_guard.py) decides when one is due, and the
executor runs these steps under its lock: read the config (never following a symlink, bounded),
check that containerd would load it, restart containerd (``kill``: SIGKILL to its main process
first, so the socket file stays), wait for the new main process, probe it, and keep last-known-good
copies (the content that ran, before it is replaced, and the new one once containerd serves with it).

The content containerd runs with is kept in ``sighup.json`` (with the process's PID and start time),
so a change made while nodemedic was down is applied when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
from collections.abc import Callable
from pathlib import Path

from nodemedic.configs import GoodConfigs, config_problem, read_config
from nodemedic.ports import Clock, UnitControl, VersionProbe
from nodemedic.procfs import ProcView
from nodemedic.store import load_checked, save_best_effort

RESTART_TIMEOUT = 60.0
NEW_PID_WAIT = 15.0
ANSWER_WAIT = 10.0  # how long a restarted containerd may take to answer before its config is kept
ANSWER_POLL = 0.2
_SHA256 = re.compile(r"[0-9a-f]{64}")
ACTION_ERRORS = (OSError, EOFError, RuntimeError, ValueError)  # NodemedicError subclasses these too


class ConfigReload:
    """containerd's config.toml as the reload reads, checks and keeps it, and sighup.json."""

    def __init__(self, config: Path, state_file: Path, proc: Path, good: GoodConfigs | None) -> None:
        self.config, self.state_file, self.proc, self.good = config, state_file, proc, good
        self._saved = load_applied(state_file)

    def read(self) -> bytes | None:
        """The config's bytes; b"" if there is none; None if it cannot be read."""
        try:
            return read_config(self.config)  # no symlink, FIFO or device followed; bounded
        except FileNotFoundError:
            return b""
        except OSError:
            return None

    async def loadable(self, unreadable: str) -> tuple[bytes | None, str | None]:
        """The check: the config's content and why containerd would refuse it (None: it loads;
        ``unreadable`` where it cannot be read). A missing file loads (containerd runs on its
        defaults)."""
        content = self.read()
        if content is None:
            return None, unreadable
        if not content:
            return content, None
        problem = await config_problem(self.config)
        if problem is None and self.read() != content:
            return None, f"{self.config} changed while it was checked"
        return content, problem

    async def keep_good_copy(self, content: bytes) -> None:
        """Keep ``content`` as a last-known-good copy (OSError if it cannot be written)."""
        if content and self.good is not None:
            await asyncio.to_thread(self.good.save, content)

    # ---- sighup.json ----------------------------------------------------------------------------

    def saved_for(self, pid: int) -> str | None:
        """The digest sighup.json says process ``pid`` runs with, if it names this very process
        (the PID and its start time: a reboot may have reused the PID)."""
        saved = self._saved
        if saved.get("main_pid") != pid or saved.get("started") != self.started(pid):
            return None
        return str(saved.get("applied"))

    def save(self, pid: int, applied: str) -> None:
        """Process ``pid`` runs the content with digest ``applied`` (a failure is said once)."""
        self._saved = {"main_pid": pid, "started": self.started(pid), "applied": applied}
        save_best_effort(self.state_file, json.dumps(self._saved))

    def started(self, pid: int) -> str:
        """The process's start time: with the PID, it names the process across a reboot."""
        return ProcView(self.proc).start_time(pid)


async def restart_unit(
    units: UnitControl, unit: str, how: str, main_pid: Callable[[], int], new_pid: asyncio.Event, clock: Clock
) -> int:
    """The apply step: restart ``unit`` (``how`` "kill": SIGKILL to its main process first) and
    wait for its new main process (``new_pid`` is set when one is seen). Its PID, 0 if none came
    in time; ACTION_ERRORS if systemd refused."""
    old = main_pid()
    if how == "kill":  # the socket file stays: no hostPath window
        await units.kill(unit, signal.SIGKILL)
    await units.restart(unit, RESTART_TIMEOUT)
    deadline = clock.monotonic() + NEW_PID_WAIT
    while main_pid() in (old, 0) and clock.monotonic() < deadline:  # 0: down, the new one not up yet
        new_pid.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(new_pid.wait(), 0.5)
    pid = main_pid()
    return pid if pid != old else 0


async def answers(probe: VersionProbe, socket: str, timeout: float, clock: Clock) -> bool:
    """The verify step: containerd answers a Version request within ANSWER_WAIT."""
    deadline = clock.monotonic() + ANSWER_WAIT
    while True:
        try:
            await probe.version(socket, timeout)
        except ACTION_ERRORS:
            if clock.monotonic() >= deadline:
                return False
            await asyncio.sleep(ANSWER_POLL)
        else:
            return True


def load_applied(path: Path) -> dict[str, object]:
    """What ``ConfigReload.save`` wrote, checked: a damaged file is moved aside, never trusted."""
    return load_checked(path, _checked_state) or {}


def _checked_state(text: str) -> dict[str, object]:
    data = json.loads(text)
    if not (
        isinstance(data, dict)
        and isinstance(data.get("main_pid"), int)
        and isinstance(data.get("started"), str)
        and _SHA256.fullmatch(str(data.get("applied")))
    ):
        raise ValueError("not a nodemedic SIGHUP state file (main_pid, started, applied)")
    return data
