"""``[sighup] mode = "coalesce"``: containerd ignores SIGHUP, and nodemedic does the reload it asked for.

A drop-in starts containerd under ``env --ignore-signal=HUP``; one restart (under the runner's lock,
never with a config containerd would refuse) makes it take effect. From then on a SIGHUP or a write
to config.toml is only a request: the file is compared with the content containerd was started with,
and only a real change that containerd accepts leads to a restart, at most one per ``interval``,
however many requests came. The content containerd runs with is kept in ``sighup.json`` (with the
process's start time), so a change made while nodemedic was down is applied when it is back.

After leaving the mode the drop-in is removed, but the running containerd keeps ignoring SIGHUP
until its next start: until then changes are still applied here, so no reload is ever lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import signal
from pathlib import Path

from nodemedic.actions import sighup_dropin as dropin
from nodemedic.configs import config_problem, read_config
from nodemedic.engine.sighup_context import ACTION_ERRORS, GuardContext, Say
from nodemedic.events import UnitChanged
from nodemedic.policy.model import Mode
from nodemedic.policy.sighup import SighupSettings
from nodemedic.ports import Clock
from nodemedic.procfs import ProcView
from nodemedic.report import RecordKind
from nodemedic.store import load_checked, save_best_effort

log = logging.getLogger(__name__)

RESTART_TIMEOUT = 60.0
NEW_PID_WAIT = 15.0
ANSWER_WAIT = 10.0  # how long a restarted containerd may take to answer before its config is kept
_SHA256 = re.compile(r"[0-9a-f]{64}")
SETTLE = 0.5  # a write is applied this long after it was seen, so a tool's second write joins it


class Coalescer:
    def __init__(self, settings: SighupSettings, ctx: GuardContext, say: Say, clock: Clock) -> None:
        self.settings, self.ctx, self._say, self._clock = settings, ctx, say, clock
        self.daemon_mode: Mode = "enforce"
        self.active = False  # in the mode, with a drop-in (or would-be drop-in in observe)
        self.lingering = False  # left the mode; the running containerd still ignores SIGHUP
        self.main_pid = 0
        self._new_pid = asyncio.Event()
        self._restarting = False  # a restart of ours is under way: its new PID is expected
        self._applied: str | None = None  # sha256 of what containerd runs with; None: not known yet
        self._applied_bytes = b""
        self._persisted = _load_state(ctx.state_file)
        self._due: float | None = None
        self._requests = 0
        self._last_restart = -1e18
        self._told: set[str] = set()
        self.apply_dropin = False

    # ---- what happened --------------------------------------------------------------------------

    def unit_changed(self, event: UnitChanged) -> bool:
        """Follow containerd's main process; True when it is a new one."""
        if event.active_state != "active" or not event.main_pid or event.main_pid == self.main_pid:
            return False
        first = self.main_pid == 0
        self.main_pid = event.main_pid
        self._new_pid.set()
        if self._restarting:
            return True  # our restart records what it applied
        self.lingering = False  # a new process: it has what the unit says now
        content = self._read_config()
        saved = self._persisted
        same = first and saved.get("main_pid") == event.main_pid and saved.get("started") == self._started()
        if same and content is not None and saved.get("applied") != _digest(content):
            # nodemedic restarted, containerd did not: it still runs what was applied before
            self._applied, self._applied_bytes = str(saved.get("applied")), b""
            self.request()
            return True
        if content is not None:
            self._applied, self._applied_bytes = _digest(content), content
            self._persist()
        return True

    def request(self) -> None:
        """A SIGHUP or a write: schedule a reload if the content really changed."""
        if not (self.active or self.lingering) or self._applied is None:
            return
        content = self._read_config()
        if content is None:  # a symlink or FIFO at the path, say: never followed, so no reload on a guess
            self._tell_once(self._not_read(), "nodemedic cannot check it")
            return
        if not content or _digest(content) == self._applied:
            return  # nothing to reload (or the file is gone: no reason to restart)
        self._requests += 1
        if self._due is None:
            interval = self.settings.coalesce.interval
            self._due = max(self._clock.monotonic() + SETTLE, self._last_restart + interval)

    def next_due(self) -> float | None:
        return self._due

    # ---- entering and leaving -------------------------------------------------------------------

    async def enter(self) -> None:
        unit, co = self.settings.unit, self.settings.coalesce
        if not await asyncio.to_thread(dropin.env_ignores_signals):
            self._say(RecordKind.ERROR, "[sighup] mode coalesce needs `env --ignore-signal` (coreutils "
                      ">= 8.31), which this node lacks: SIGHUPs are only observed", UNIT=unit,
                      OUTCOME="refused", ACTION="sighup-dropin")  # fmt: skip
            return
        path = dropin.dropin_path(unit, co.persistent, self.ctx.dropin_root)
        try:
            text = dropin.render_dropin(await self.ctx.systemd.exec_start(unit))
        except ACTION_ERRORS as exc:
            self._say(RecordKind.ERROR, f"cannot read {unit}'s ExecStart to write the drop-in: {exc}",
                      UNIT=unit, OUTCOME="failed", ACTION="sighup-dropin")  # fmt: skip
            return
        self.active = True
        if self.daemon_mode == "observe":
            if not path.exists():
                self._say(RecordKind.DECIDED, f"would install {path} so that {unit} starts with SIGHUP "
                          "ignored, and apply config changes itself", UNIT=unit, PATH=str(path),
                          MODE="observe", OUTCOME="would-do", ACTION="sighup-dropin")  # fmt: skip
            return
        try:
            installed = await asyncio.to_thread(self._install, path, text)
        except ACTION_ERRORS as exc:
            self.active = False
            self._say(RecordKind.ERROR, f"cannot install {path}: {exc}", UNIT=unit, PATH=str(path),
                      OUTCOME="failed", ACTION="sighup-dropin")  # fmt: skip
            return
        if installed:
            await self._daemon_reload()
            self._say(RecordKind.ACTION, f"installed {path}: {unit} starts with SIGHUP ignored; "
                      "nodemedic applies config.toml changes itself", UNIT=unit, PATH=str(path),
                      OUTCOME="dropin-installed", ACTION="sighup-dropin")  # fmt: skip
        self.request()  # a change that came before the mode was entered
        if co.restart_to_apply:
            self.apply_dropin = True
        else:
            self._say(RecordKind.DAEMON, f"the drop-in takes effect at {unit}'s next start", UNIT=unit,
                      OUTCOME="dropin-pending", ACTION="sighup-dropin")  # fmt: skip

    async def leave(self) -> None:
        """Stock behaviour again: the drop-in goes; changes are still applied while the running
        containerd ignores SIGHUP (until its next start)."""
        was_active, self.active = self.active, False
        self.apply_dropin = False
        unit = self.settings.unit
        try:
            removed = await asyncio.to_thread(dropin.remove_dropins, unit, self.ctx.dropin_root)
        except ACTION_ERRORS as exc:
            self._say(RecordKind.ERROR, f"cannot remove {unit}'s SIGHUP drop-in: {exc}; "
                      "`nodemedic sighup-restore` removes it by hand", UNIT=unit, OUTCOME="failed",
                      ACTION="sighup-dropin")  # fmt: skip
            return
        self.lingering = bool(self.main_pid) and dropin.ignores_sighup(self.main_pid, self.ctx.proc)
        if not self.lingering:
            self._due, self._requests = None, 0
        if not removed:
            return
        await self._daemon_reload()
        until = (" until then it keeps ignoring SIGHUP, and nodemedic keeps applying config.toml changes"
                 if self.lingering else "")  # fmt: skip
        self._say(RecordKind.ACTION, f"removed {', '.join(map(str, removed))}: {unit} dies on SIGHUP "
                  f"again from its next start ([sighup] mode {self.settings.mode});{until}",
                  UNIT=unit, PATH=str(removed[0]), OUTCOME="dropin-removed", ACTION="sighup-dropin",
                  DETAIL="was active" if was_active else "left from an earlier run")  # fmt: skip

    def _install(self, path: Path, text: str) -> bool:
        """Install at ``path``; our copy at the other place (/run or /etc) goes, so that turning
        ``persistent`` off really reverts at the next reboot."""
        other = dropin.dropin_path(self.settings.unit, not self.settings.coalesce.persistent,
                                   self.ctx.dropin_root)  # fmt: skip
        moved = dropin.is_ours(other)
        if moved:
            other.unlink()
        return dropin.install_dropin(path, text) or moved

    async def _daemon_reload(self) -> None:
        try:
            await self.ctx.systemd.daemon_reload()
        except ACTION_ERRORS as exc:
            self._say(RecordKind.ERROR, f"systemd daemon-reload failed: {exc}", OUTCOME="failed",
                      ACTION="sighup-dropin")  # fmt: skip

    # ---- what is due ----------------------------------------------------------------------------

    async def tick(self) -> None:
        if self.apply_dropin:
            self.apply_dropin = False
            await self._restart_for_dropin()
        now = self._clock.monotonic()
        if self._due is None or now < self._due:
            return
        earliest = self._last_restart + self.settings.coalesce.interval
        if now < earliest:  # a restart started since the request was scheduled
            self._due = earliest
            return
        self._due = None
        await self._reload()

    async def _restart_for_dropin(self) -> None:
        unit = self.settings.unit
        if not self.main_pid:  # at start-up, D-Bus may not have said yet
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._new_pid.wait(), NEW_PID_WAIT)
        if not self.main_pid:
            self._say(RecordKind.DAEMON, f"{unit} is not running: the drop-in takes effect when it starts",
                      UNIT=unit, OUTCOME="dropin-pending", ACTION="sighup-dropin")  # fmt: skip
            return
        if dropin.ignores_sighup(self.main_pid, self.ctx.proc):
            return  # already in effect (e.g. nodemedic restarted, containerd did not)
        async with self.ctx.exclusive():
            content, problem = await self._loadable()
            if problem is not None:
                self._say(RecordKind.DECIDED, f"not restarting {unit} to apply the drop-in: {problem}; "
                          "the drop-in takes effect at its next start", UNIT=unit, DETAIL=problem,
                          OUTCOME="dropin-pending", ACTION="sighup-dropin")  # fmt: skip
                return
            pid = await self._restart_locked("apply the SIGHUP drop-in", content)
        if pid and dropin.ignores_sighup(pid, self.ctx.proc):
            self._say(RecordKind.OUTCOME, f"{unit} restarted (pid {pid}) and now ignores SIGHUP",
                      UNIT=unit, OUTCOME="dropin-applied", ACTION="sighup-dropin")  # fmt: skip
        elif pid:
            self._say(RecordKind.ERROR, f"{unit} restarted (pid {pid}) but does not ignore SIGHUP: is the "
                      "drop-in overridden by another one?", UNIT=unit, OUTCOME="failed",
                      ACTION="sighup-dropin")  # fmt: skip

    async def _reload(self) -> None:
        """Apply a real change with one restart. Everything is read and checked again under the
        repair lock: a repair may have changed the file, or started containerd, meanwhile."""
        unit, path = self.settings.unit, self.ctx.config
        async with self.ctx.exclusive():
            content, problem = await self._loadable()
            if content is None or not content or _digest(content) == self._applied:
                self._requests = 0
                return
            digest = _digest(content)
            if problem is not None:
                self._tell_once(problem, "containerd would refuse it", digest)
                self._requests = 0
                return
            requests, self._requests = self._requests, 0
            if self.daemon_mode == "observe":
                self._say(RecordKind.DECIDED, f"would restart {unit} once to apply the new {path} "
                          f"({requests} request(s) coalesced)", UNIT=unit, PATH=str(path), SIGNALS=requests,
                          MODE="observe", OUTCOME="would-do", ACTION="sighup-reload")  # fmt: skip
                self._applied, self._applied_bytes = digest, content
                return
            await self._keep_good_copy(self._applied_bytes)
            pid = await self._restart_locked(f"apply a new {path}", content)
            answers = bool(pid) and await self._answers()
            if answers:  # it runs and serves with it: what restore-config should go back to now
                await self._keep_good_copy(content)
        if pid:
            self._say(RecordKind.OUTCOME, f"applied the new {path} with one restart of {unit} (pid {pid}"
                      f"{'' if answers else ', not answering yet'}): {requests} request(s) coalesced",
                      UNIT=unit, PATH=str(path), SIGNALS=requests, DETAIL=f"sha256 {digest}",
                      OUTCOME="reload-applied", ACTION="sighup-reload")  # fmt: skip
        self.request()  # written again while it restarted: the next one, an interval later

    def _not_read(self) -> str:
        return (
            f"{self.ctx.config} is not a regular file nodemedic reads (a symlink, FIFO, directory, or "
            "over the size cap): never followed"
        )

    def _tell_once(self, problem: str, why: str, key: str = "") -> None:
        """A refused reload, said once per content (or per problem, when it cannot be read)."""
        if (key or problem) in self._told:
            return
        self._told.add(key or problem)
        unit, path = self.settings.unit, self.ctx.config
        message = f"{path} changed but {why}: {problem}; {unit} keeps running with its current config"
        self._say(
            RecordKind.DETECTED, message, UNIT=unit, PATH=str(path), DETAIL=problem, OUTCOME="reload-refused"
        )

    async def _loadable(self) -> tuple[bytes | None, str | None]:
        """The config's content and why containerd would refuse it (None: it loads). A missing file
        loads (containerd runs on its defaults); one that cannot be read does not."""
        content = self._read_config()
        if content is None:
            return None, self._not_read()
        if not content:
            return content, None
        problem = await config_problem(self.ctx.config)
        if problem is None and self._read_config() != content:
            return None, f"{self.ctx.config} changed while it was checked"
        return content, problem

    async def _answers(self) -> bool:
        """containerd answers a Version request within ANSWER_WAIT."""
        deadline = self._clock.monotonic() + ANSWER_WAIT
        while True:
            try:
                await self.ctx.probe.version(self.ctx.probe_socket, self.ctx.probe_timeout)
            except ACTION_ERRORS:
                if self._clock.monotonic() >= deadline:
                    return False
                await asyncio.sleep(0.2)
            else:
                return True

    async def _keep_good_copy(self, content: bytes) -> None:
        """Keep ``content`` as a last-known-good copy: the content that ran, before it is replaced,
        and the new one once containerd serves with it."""
        if not content:
            return
        try:
            await asyncio.to_thread(self.ctx.good.save, content)
        except OSError as exc:
            self._say(RecordKind.ERROR, f"could not keep a last-known-good copy of {self.ctx.config}: {exc}",
                      PATH=str(self.ctx.config), OUTCOME="failed", ACTION="sighup-reload")  # fmt: skip

    async def _restart_locked(self, why: str, content: bytes | None) -> int:
        """Restart the unit (the caller holds the repair lock); the new main PID, 0 if none came."""
        unit = self.settings.unit
        if self.ctx.closing():
            return 0
        self._restarting = True
        self._new_pid.clear()
        old = self.main_pid
        self._last_restart = self._clock.monotonic()
        try:
            self._say(RecordKind.ACTION, f"restarting {unit} to {why}", UNIT=unit, OUTCOME="started",
                      ACTION="restart-unit")  # fmt: skip
            if self.settings.coalesce.restart == "kill":  # the socket file stays: no hostPath window
                await self.ctx.systemd.kill(unit, signal.SIGKILL)
            await self.ctx.systemd.restart(unit, RESTART_TIMEOUT)
            deadline = self._clock.monotonic() + NEW_PID_WAIT
            while self.main_pid == old and self._clock.monotonic() < deadline:
                self._new_pid.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._new_pid.wait(), 0.5)
        except ACTION_ERRORS as exc:
            self._say(RecordKind.ERROR, f"restarting {unit} to {why} failed: {exc}", UNIT=unit,
                      OUTCOME="failed", ACTION="restart-unit")  # fmt: skip
            return 0
        finally:
            self._restarting = False
        if content is not None:
            self._applied, self._applied_bytes = _digest(content), content
        if not self.active:
            self.lingering = False  # started without the drop-in: stock
        self._persist()
        return self.main_pid if self.main_pid != old else 0

    # ---- helpers --------------------------------------------------------------------------------

    def _read_config(self) -> bytes | None:
        """The config's bytes; b"" if there is none; None if it cannot be read."""
        try:
            return read_config(self.ctx.config)  # no symlink, FIFO or device followed; bounded
        except FileNotFoundError:
            return b""
        except OSError:
            return None

    def _started(self) -> str:
        """The main process's start time: with the PID, it names the process across a reboot that
        reused the PID."""
        return ProcView(self.ctx.proc).start_time(self.main_pid)

    def _persist(self) -> None:
        if self._applied is None:
            return
        self._persisted = {"main_pid": self.main_pid, "started": self._started(), "applied": self._applied}
        save_best_effort(self.ctx.state_file, json.dumps(self._persisted))  # a failure is said once


def _digest(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _load_state(path: Path) -> dict[str, object]:
    """What `_persist` wrote, checked: a damaged file is moved aside, never trusted."""
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
