"""The SIGHUP guard's decisions: sees SIGHUPs sent to containerd, reports storms, and damps them by mode.

Pure: it takes events and the time (``handle``) and the results of what the executor did for it
(``config_running``, ``reload_checked``, ``restart_finished``, ``frozen`` ...), and returns effects;
``executor/interventions.py`` runs them with the actions in ``actions/`` (the drop-in, the coalesced
reload, the freezer). containerd's main PID is read from the NodeView.

- Every SIGHUP counts once: the kernel's trace (which names the sender) is preferred; a death by
  SIGHUP reported over D-Bus counts only where the trace did not see it.
- A storm (more than ``[sighup.storm].signals`` within ``window``) is one record when it begins and one
  when it ends, with the count, the senders and how often containerd restarted meanwhile.
- ``coalesce``: a drop-in starts containerd with SIGHUP ignored, and the reload the signal asked for
  is done by nodemedic, only when config.toml's content really changed and loads, at most once per
  interval. The content containerd runs with is known by its digest (kept in ``sighup.json``).
- ``throttle``: a sender over its token bucket has its cgroup frozen for a cool-down, then thawed.
Leaving a mode restores stock behaviour (drop-in removed, cgroups thawed), whatever ``[daemon].mode``
says; installing, freezing and restarting happen only in enforce mode.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from nodemedic.core.effects import Effect, Effects, Instant, Later, Report
from nodemedic.core.nodeview import NodeView
from nodemedic.core.ratelimit import SenderBuckets
from nodemedic.core.storm import Storm, StormDetector, Verdict
from nodemedic.events import Event, FileChanged, SignalSeen, UnitChanged
from nodemedic.policy.model import Mode
from nodemedic.policy.sighup import SighupSettings
from nodemedic.report import RecordKind

SIGHUP = 1
IGNORED = 1  # the kernel's verdict in a trace line: the target ignores the signal
RULE = "sighup"  # NODEMEDIC_RULE of the guard's records
TRACE_COVERS = 10.0  # a D-Bus death this soon after a traced SIGHUP is that same signal
SETTLE = 0.5  # a write is applied this long after it was seen, so a tool's second write joins it
THAW_RETRY = 1.0  # a cgroup whose thaw failed is tried again this often
EARLY = 1e-3  # a timer that fires this much before its time is on time (the loop's resolution)
RESTART_SOURCES = ("unit", "trace", "tracefs", "proc")  # [sighup] keys read once, at start-up


def sender_name(event: SignalSeen) -> str:
    """Who sent a signal, in the operator's terms: the pod, else the unit, else the process."""
    if event.source != "tracefs":
        return "unknown sender (seen over D-Bus)"
    who = f"pod {event.sender_pod}" if event.sender_pod else event.sender_unit or event.sender_cgroup
    process = f"pid {event.sender_pid} {event.sender_comm}"
    return f"{who} ({process})" if who else f"{process} (gone)"


def digest(content: bytes) -> str:
    """How the guard names a config's content (sighup.json's ``applied``)."""
    return hashlib.sha256(content).hexdigest()


# ---- the effects ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EnterCoalesce(Effect):
    """Install the drop-in (observe: say it would), then tell ``coalesce_entered``."""

    mode: Mode


@dataclass(frozen=True, slots=True)
class LeaveCoalesce(Effect):
    """Remove our drop-ins, then tell ``coalesce_left`` whether the running containerd still
    ignores SIGHUP. ``sighup_mode`` is the mode now in force (for the record)."""

    was_active: bool
    sighup_mode: str


@dataclass(frozen=True, slots=True)
class MainProcessStarted(Effect):
    """containerd has a new main process. Not ``ours`` (no restart of ours under way): read the
    config it started with (``first``: and what sighup.json says it runs), then tell
    ``config_running``."""

    pid: int
    first: bool
    ours: bool


@dataclass(frozen=True, slots=True)
class ReadConfig(Effect):
    """A reload request (a SIGHUP or a write): read config.toml and tell ``config_read``."""


@dataclass(frozen=True, slots=True)
class ApplyReload(Effect):
    """A coalesced reload is due: under the lock, read and check the config, tell ``reload_checked``,
    and restart containerd for the requests it returns (the budget allowing)."""


@dataclass(frozen=True, slots=True)
class RestartForDropin(Effect):
    """Restart containerd once so that the drop-in takes effect (unless it already ignores SIGHUP)."""


@dataclass(frozen=True, slots=True)
class SaveApplied(Effect):
    """Write sighup.json: process ``pid`` runs the config with ``applied`` as digest."""

    pid: int
    applied: str


@dataclass(frozen=True, slots=True)
class Freeze(Effect):
    """``sender`` (cgroup ``cgroup``) is over its SIGHUP budget: freeze it for the cool-down (after
    the freezer's refusal check; observe: say it would), then tell ``frozen``."""

    cgroup: str
    sender: str


@dataclass(frozen=True, slots=True)
class ThawDue(Effect):
    """Thaw the cgroups whose cool-down is over, then tell ``thaw_checked`` when the next one is."""


@dataclass(frozen=True, slots=True)
class ThawAll(Effect):
    """Thaw everything nodemedic froze (``why`` goes into each record)."""

    why: str


@dataclass(frozen=True, slots=True)
class Running:
    """What containerd's main process runs with, as far as the guard knows (sighup.json's record):
    the digest of its config (None: not known yet) and that content, when it was read (kept as a
    last-known-good copy before a reload replaces it)."""

    pid: int
    applied: str | None = None
    content: bytes = b""


class _Reading:
    """The buckets' clock: the monotonic reading of the instant being handled."""

    __slots__ = ("at",)

    def __init__(self) -> None:
        self.at = 0.0

    def monotonic(self) -> float:
        return self.at


class SighupGuard:
    """The SIGHUP guard's state and decisions (see the module's docstring)."""

    def __init__(
        self,
        settings: SighupSettings,
        daemon_mode: Mode,
        view: NodeView,
        config: str,
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex[:12],
    ) -> None:
        self.settings, self.daemon_mode = settings, daemon_mode
        self.config = config  # containerd's config.toml, as FileChanged names it
        self._view, self._new_id = view, new_id
        self._storm = StormDetector(settings.storm.signals, settings.storm.window)
        self._storm_incident = ""
        self._storm_restarts = 0
        self._storm_check_armed = False
        self._last_traced = -1e18
        self.counted: Counter[str] = Counter()  # SIGHUPs counted (once each), by [sighup] mode
        self.absorbed = 0  # of them, those containerd ignored (it runs under coalesce's drop-in)
        self._reading = _Reading()
        self._buckets = self._new_buckets()
        self._thaw_check: tuple[int, float] | None = None  # (generation, wall time) of the armed one
        self._thaw_generation = 0
        self.active = False  # in coalesce, with a drop-in (or would-be drop-in in observe)
        self.lingering = False  # left coalesce; the running containerd still ignores SIGHUP
        self.running: Running | None = None
        self.restarting = False  # a restart of ours is under way: its new process is ours
        self._due: float | None = None
        self._requests = 0
        self._last_restart = -1e18
        self._told: set[str] = set()
        self._held_said: set[str] = set()

    @property
    def unit(self) -> str:
        return self.settings.unit

    @property
    def throttling(self) -> bool:
        return self.settings.mode == "throttle"

    def begin(self, now: Instant) -> Effects:
        """At start: enter the mode of the policy (and undo what another mode left behind)."""
        self._reading.at = now.monotonic
        return self._enter_mode()

    def replace(self, settings: SighupSettings, daemon_mode: Mode, now: Instant) -> Effects:
        """A reloaded policy: a new mode is entered (and the old one's effects undone) at once. The
        keys that choose the sources (RESTART_SOURCES) wait for a restart, as the daemon says."""
        self._reading.at = now.monotonic
        old, old_daemon = self.settings, self.daemon_mode
        self.settings = settings.model_copy(update={k: getattr(old, k) for k in RESTART_SOURCES})
        self._storm.threshold, self._storm.window = self.settings.storm.signals, self.settings.storm.window
        self._buckets = self._new_buckets()
        self.daemon_mode = daemon_mode
        new = self.settings
        if old.mode != new.mode or old.coalesce != new.coalesce or old_daemon != daemon_mode:
            return self._enter_mode()
        return []

    def _new_buckets(self) -> SenderBuckets:
        t = self.settings.throttle
        return SenderBuckets(t.burst, t.refill, t.per, self._reading)

    def _enter_mode(self) -> Effects:
        mode = self.settings.mode
        out: Effects = [ThawDue() if mode == "throttle" else ThawAll(f"[sighup] mode is {mode}")]
        if mode == "coalesce":
            out.append(EnterCoalesce(self.daemon_mode))
        else:
            was_active, self.active = self.active, False
            out.append(LeaveCoalesce(was_active, mode))
        return out

    # ---- events ---------------------------------------------------------------------------------

    def handle(self, event: Event, now: Instant) -> Effects:
        """Every event. A bug here is recorded as the guard's, and the daemon goes on."""
        self._reading.at = now.monotonic
        try:
            if isinstance(event, UnitChanged) and event.unit == self.unit:
                return self._unit_changed(event)
            if isinstance(event, SignalSeen) and (event.unit, event.signal) == (self.unit, SIGHUP):
                return self._sighup(event, now)
            if isinstance(event, FileChanged) and event.path == self.config:
                return self._request()
        except Exception as exc:
            return [
                self.record(
                    RecordKind.ERROR,
                    f"SIGHUP guard: internal error on {type(event).__name__}: {exc!r}",
                    OUTCOME="failed",
                    DETAIL=repr(exc),
                )
            ]
        return []

    def _unit_changed(self, event: UnitChanged) -> Effects:
        """A new main process (the view has its PID; ``running`` says which one the guard knows)."""
        pid, old = self._view.main_pid(self.unit), self.running
        if event.active_state != "active" or not pid or (old is not None and old.pid == pid):
            return []
        if self._storm.storm is not None:
            self._storm_restarts += 1
        # what it runs is known once its config is read (config_running), or our restart says it
        self.running = Running(pid) if old is None else Running(pid, old.applied, old.content)
        if not self.restarting:
            self.lingering = False  # a new process: it has what the unit says now
        return [MainProcessStarted(pid, first=old is None, ours=self.restarting)]

    def _sighup(self, event: SignalSeen, now: Instant) -> Effects:
        if self.settings.mode == "off":
            return []
        if event.source == "tracefs":
            self._last_traced = now.monotonic
        elif now.monotonic - self._last_traced < TRACE_COVERS:
            return []  # the death the trace already counted
        self.counted[self.settings.mode] += 1
        self.absorbed += event.result == IGNORED
        sender = sender_name(event)
        verdict = self._storm.add(now.monotonic, sender)
        out: Effects = []
        if verdict is Verdict.SINGLE:
            ignored = " (ignored: it runs with SIGHUP ignored)" if event.result == IGNORED else ""
            out.append(
                self.record(
                    RecordKind.DETECTED,
                    f"{self.unit} was sent SIGHUP by {sender}{ignored}",
                    UNIT=self.unit,
                    SOURCE=event.source,
                    SENDERS=sender,
                    CGROUP=event.sender_cgroup,
                    OUTCOME="sighup",
                )
            )
        elif verdict is Verdict.BEGAN and self._storm.storm is not None:
            out += self._storm_began(self._storm.storm, now)
        if event.source == "tracefs":
            if self.throttling and event.sender_cgroup and not self._buckets.take(event.sender_cgroup):
                out.append(Freeze(event.sender_cgroup, sender))
            out += self._request()  # a SIGHUP is a reload request, applied only if the file changed
        return out

    # ---- storms ---------------------------------------------------------------------------------

    def _storm_began(self, storm: Storm, now: Instant) -> Effects:
        self._storm_restarts = 0
        self._storm_incident = self._new_id()
        window = self.settings.storm.window
        out: Effects = [
            self.record(
                RecordKind.DETECTED,
                f"SIGHUP storm against {self.unit}: {storm.signals} SIGHUPs "
                f"within {window:g}s from {storm.describe_senders()}; [sighup] mode "
                f"{self.settings.mode}",
                UNIT=self.unit,
                SIGNALS=storm.signals,
                SENDERS=storm.describe_senders(),
                WINDOW=window,
                OUTCOME="storm",
            )
        ]
        if not self._storm_check_armed:
            out.append(self._storm_check(storm, now))
        return out

    def _storm_check(self, storm: Storm, now: Instant) -> Later:
        """The next look at whether the storm is over: a whole window after its last signal."""
        self._storm_check_armed = True
        delay = max(EARLY, storm.last + self.settings.storm.window - now.monotonic)
        return Later(delay, self._storm_check_due, "SIGHUP storm end")

    def _storm_check_due(self, now: Instant) -> Effects:
        self._storm_check_armed = False
        storm = self._storm.storm
        if storm is None:
            return []
        ended = self._storm.ended(now.monotonic + EARLY)
        if ended is None:  # more signals came meanwhile
            return [self._storm_check(storm, now)]
        lasted = ended.last - ended.began
        return [
            self.record(
                RecordKind.DETECTED,
                f"SIGHUP storm against {self.unit} ended: {ended.signals} "
                f"SIGHUPs over {lasted:.0f}s from {ended.describe_senders()}; {self.unit} "
                f"restarted {self._storm_restarts} time(s) meanwhile",
                UNIT=self.unit,
                SIGNALS=ended.signals,
                SENDERS=ended.describe_senders(),
                WINDOW=lasted,
                OUTCOME="storm-ended",
                INCIDENT=self._storm_incident,
                DETAIL=f"restarts={self._storm_restarts}",
            )
        ]

    # ---- coalesce: what containerd runs, and the requests to change it ---------------------------

    def config_running(self, pid: int, content: bytes | None, saved: str | None, now: Instant) -> Effects:
        """The config a new process (not ours) started with, as read (None: unreadable), and what
        sighup.json says process ``pid`` runs (``saved``: only if it names this very process)."""
        if self.running is None or self.running.pid != pid:
            return []  # another process came meanwhile: it is learnt in its turn
        if saved is not None and content is not None and saved != digest(content):
            # nodemedic restarted, containerd did not: it still runs what was applied before
            self.running = Running(pid, saved)
            return self.config_read(content, now)  # a request, once in the mode
        if content is None:
            return []
        self.running = Running(pid, digest(content), content)
        return [SaveApplied(pid, self.running.applied or "")]

    def _request(self) -> Effects:
        """A SIGHUP or a write: a reload if the content really changed (the executor reads it)."""
        if not (self.active or self.lingering) or self.running is None or self.running.applied is None:
            return []
        return [ReadConfig()]

    def config_read(self, content: bytes | None, now: Instant) -> Effects:
        """config.toml as read for a request: its bytes, b"" if there is none, None if unreadable."""
        if not (self.active or self.lingering) or self.running is None or self.running.applied is None:
            return []
        return self._requested(content, now)

    def _requested(self, content: bytes | None, now: Instant) -> Effects:
        if content is None:  # a symlink or FIFO at the path, say: never followed, so no reload on a guess
            return self._tell_once(self.not_read(), "nodemedic cannot check it")
        if not content or self.running is None or digest(content) == self.running.applied:
            return []  # nothing to reload (or the file is gone: no reason to restart)
        self._requests += 1
        if self._due is not None:
            return []
        self._due = max(now.monotonic + SETTLE, self._last_restart + self.settings.coalesce.interval)
        return [self._due_timer(self._due, now)]

    def _due_timer(self, due: float, now: Instant) -> Later:
        return Later(due - now.monotonic, self._reload_due, "SIGHUP reload due")

    def _reload_due(self, now: Instant) -> Effects:
        """A timer armed for ``_due``: one armed for an earlier due time finds it moved, and goes."""
        if self._due is None or now.monotonic + EARLY < self._due:
            return []
        earliest = self._last_restart + self.settings.coalesce.interval
        if now.monotonic + EARLY < earliest:  # a restart started since the request was scheduled
            self._due = earliest
            return [self._due_timer(earliest, now)]
        self._due = None
        return [ApplyReload()]

    def reload_checked(self, content: bytes | None, problem: str | None) -> tuple[int, Effects]:
        """The config as read and checked under the lock (``problem``: why containerd would refuse
        it). Returns the requests one restart is to apply now (0: none) and the records."""
        running = self.running
        if running is None or not content or digest(content) == running.applied:
            self._requests = 0
            return 0, []
        applied = digest(content)
        if problem is not None:
            self._requests = 0
            return 0, self._tell_once(problem, "containerd would refuse it", applied)
        requests, self._requests = self._requests, 0
        if self.daemon_mode != "observe":
            return requests, []
        self.running = Running(running.pid, applied, content)
        return 0, [
            self.record(
                RecordKind.DECIDED,
                f"would restart {self.unit} once to apply the new {self.config} "
                f"({requests} request(s) coalesced)",
                UNIT=self.unit,
                PATH=self.config,
                SIGNALS=requests,
                MODE="observe",
                OUTCOME="would-do",
                ACTION="sighup-reload",
            )
        ]

    def held(self, action: str, reason: str, requests: int, now: Instant) -> Effects:
        """The repair budget holds a restart (``action``: sighup-reload or sighup-dropin): said once,
        kept (``requests`` of a reload) and tried again an interval later."""
        interval = self.settings.coalesce.interval
        out: Effects = []
        if action not in self._held_said:
            self._held_said.add(action)
            what = f"the new {self.config}" if action == "sighup-reload" else "the SIGHUP drop-in"
            out.append(
                self.record(
                    RecordKind.DECIDED,
                    f"not restarting {self.unit} to apply {what} now: "
                    f"{reason}; tried again every {interval:g}s",
                    UNIT=self.unit,
                    DETAIL=reason,
                    OUTCOME="held",
                    ACTION=action,
                )
            )
        if action == "sighup-reload":
            self._requests += requests
            if self._due is None:
                self._due = now.monotonic + interval
                out.append(self._due_timer(self._due, now))
        else:
            out.append(Later(interval, self._dropin_retry, "SIGHUP drop-in restart"))
        return out

    def _dropin_retry(self, now: Instant) -> Effects:
        wanted = self.active and self.daemon_mode != "observe" and self.settings.coalesce.restart_to_apply
        return [RestartForDropin()] if wanted else []

    def restart_started(self, now: Instant) -> None:
        """A restart of ours begins: its new process is ours, and the next waits an interval."""
        self.restarting = True
        self._last_restart = now.monotonic
        self._held_said.clear()

    def restart_failed(self) -> None:
        self.restarting = False

    def restart_finished(self, content: bytes | None) -> Effects:
        """Our restart is done: the process now running (the view's) runs ``content``."""
        self.restarting = False
        pid = self._view.main_pid(self.unit) or (self.running.pid if self.running else 0)
        if content is not None:
            self.running = Running(pid, digest(content), content)
        if not self.active:
            self.lingering = False  # started without the drop-in: stock
        if self.running is None or self.running.applied is None:
            return []
        return [SaveApplied(pid, self.running.applied)]

    def reload_done(self, now: Instant) -> Effects:
        """After a reload: the file may have been written again while containerd restarted."""
        return self._request()

    # ---- entering and leaving coalesce ----------------------------------------------------------

    def coalesce_entered(self) -> Effects:
        """The drop-in is in place (observe: would be)."""
        self.active = True
        if self.daemon_mode == "observe":
            return []
        out = self._request()  # a change that came before the mode was entered
        if self.settings.coalesce.restart_to_apply:
            out.append(RestartForDropin())
        else:
            out.append(
                self.record(
                    RecordKind.DAEMON,
                    f"the drop-in takes effect at {self.unit}'s next start",
                    UNIT=self.unit,
                    OUTCOME="dropin-pending",
                    ACTION="sighup-dropin",
                )
            )
        return out

    def coalesce_left(self, lingering: bool) -> None:
        """Our drop-ins are gone; ``lingering``: the running containerd still ignores SIGHUP, and
        its changes are still applied here until its next start."""
        self.lingering = lingering
        if not lingering:
            self._due, self._requests = None, 0

    # ---- throttle -------------------------------------------------------------------------------

    def frozen(self, until_wall: float, now: Instant) -> Effects:
        """A cgroup was frozen until ``until_wall``: thaw it then."""
        return self._thaw_timer(until_wall, now)

    def thaw_checked(self, next_until: float | None, now: Instant) -> Effects:
        """What is still frozen after a thaw: the earliest end of a cool-down (None: nothing)."""
        if next_until is None:
            return []
        if next_until <= now.wall:  # its thaw failed: tried again shortly
            next_until = now.wall + THAW_RETRY
        return self._thaw_timer(next_until, now)

    def _thaw_timer(self, until_wall: float, now: Instant) -> Effects:
        """One timer for the earliest cool-down's end (a later one is armed when that one fires)."""
        armed = self._thaw_check
        if armed is not None and armed[1] <= until_wall:
            return []
        self._thaw_generation += 1
        generation = self._thaw_generation
        self._thaw_check = (generation, until_wall)

        def due(_now: Instant) -> Effects:
            if self._thaw_check is not None and self._thaw_check[0] == generation:
                self._thaw_check = None
            return [ThawDue()]

        return [Later(max(0.0, until_wall - now.wall), due, "SIGHUP sender thaw")]

    # ---- records --------------------------------------------------------------------------------

    def not_read(self) -> str:
        return (
            f"{self.config} is not a regular file nodemedic reads (a symlink, FIFO, directory, or "
            "over the size cap): never followed"
        )

    def _tell_once(self, problem: str, why: str, key: str = "") -> Effects:
        """A refused reload, said once per content (or per problem, when it cannot be read)."""
        if (key or problem) in self._told:
            return []
        self._told.add(key or problem)
        message = (
            f"{self.config} changed but {why}: {problem}; {self.unit} keeps running with its current config"
        )
        return [
            self.record(
                RecordKind.DETECTED,
                message,
                UNIT=self.unit,
                PATH=self.config,
                DETAIL=problem,
                OUTCOME="reload-refused",
            )
        ]

    def record(self, kind: RecordKind, message: str, **fields: object) -> Report:
        """Every record of the guard carries NODEMEDIC_RULE=sighup (`journalctl NODEMEDIC_RULE=sighup`),
        the mode, and an incident id: the storm's while one lasts, so its records go together."""
        incident = self._storm_incident if self._storm.storm is not None else self._new_id()
        fields.setdefault("MODE", self.daemon_mode)
        fields.setdefault("INCIDENT", incident)
        return Report(kind, message, {"RULE": RULE, **fields})
