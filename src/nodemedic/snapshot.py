"""The status snapshot: what nodemedic knows and would do, in one documented shape (``"schema": 1``).

Built here only. ``daemon_status(app)`` reads the running daemon (the D-Bus API's ``Status()``
serves it); ``offline_status(policy_path)`` reads the same from the state files when the daemon is
not running (``nodemedic status`` shows it then). docs/cli.md documents every field.

What no state object holds (when the daemon started, each rule's last trigger and last repair, the
SIGHUP guard's storms) a ``StatusTracker`` keeps: app.py registers it in ``executor.listeners``,
the one place every decision and action passes.
"""

from __future__ import annotations

import enum
import hashlib
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from nodemedic import __version__
from nodemedic.actions.freezer import REGISTRY_NAME, Freezer
from nodemedic.core.breaker import HALF_OPEN, OPEN, CircuitBreaker
from nodemedic.core.budget import RepairBudget
from nodemedic.core.nodeview import NodeView
from nodemedic.core.rules import RuleCore, RuleState
from nodemedic.core.sighup_guard import RULE as SIGHUP_RULE
from nodemedic.errors import NodemedicError
from nodemedic.policy.load import parse_policy_text, read_policy_text
from nodemedic.policy.model import Policy, Rule
from nodemedic.ports import Clock, Freezing
from nodemedic.report import Record, RecordKind
from nodemedic.store import STATE_FILE, StateStore

if TYPE_CHECKING:
    from nodemedic.app import App

SCHEMA = 1
STORM, STORM_ENDED = "storm", "storm-ended"  # the guard's OUTCOME on a storm's two records
STATE_ERRORS = (KeyError, TypeError, ValueError, AttributeError)  # state.json content not ours
Snapshot = dict[str, Any]


class _Frozen(enum.Enum):
    READ_HERE = "read here"


READ_HERE = _Frozen.READ_HERE
"""``daemon_status``'s default: the freezer registry is read there, on the caller's thread."""


@dataclass(frozen=True, slots=True)
class Seen:
    """A record and the wall-clock time it was written."""

    at: float
    record: Record

    def field(self, name: str) -> str | None:
        return self.record.fields.get(name)


class StatusTracker:
    """Keeps, from every record the executor writes, what status shows and no state holds: per
    rule the last trigger (DETECTED) and the last end of a repair (OUTCOME), the SIGHUP guard's
    last storm, when the daemon started and the hash of the policy it loaded. Where the daemon's
    own records pass the executor's listeners too, its "started" record dates the start and each
    "reloaded" one hashes the file just loaded; else the tracker's construction dates it and a
    reload is hashed at the first request after it."""

    def __init__(self, clock: Clock, policy: Policy | None = None, policy_path: Path | None = None) -> None:
        self.clock = clock
        self.started_wall = clock.wall()
        self.started_monotonic = clock.monotonic()
        self.detected: dict[str, Seen] = {}
        self.outcome: dict[str, Seen] = {}
        self.storm_began: Seen | None = None
        self.storm_ended: Seen | None = None
        self._said_started = False
        self._digest: tuple[Policy, str | None] | None = None
        self._reloaded: str | None = None  # the hash taken at a reload, for the policy next asked of
        if policy is not None:
            self.policy_loaded(policy, policy_path)

    def __call__(self, record: Record) -> None:
        """An executor listener: a few dict writes per record (and a read of the policy file at a
        reload, which has just read it too)."""
        rule, outcome = record.fields.get("RULE"), record.fields.get("OUTCOME")
        if record.kind is RecordKind.DAEMON:
            self._daemon(outcome, record.fields.get("PATH"))
        elif rule is None:
            return
        elif rule == SIGHUP_RULE and outcome in (STORM, STORM_ENDED):
            seen = Seen(self.clock.wall(), record)
            if outcome == STORM:
                self.storm_began, self.storm_ended = seen, None
            else:
                self.storm_ended = seen
        elif record.kind is RecordKind.DETECTED:
            self.detected[rule] = Seen(self.clock.wall(), record)
        elif record.kind is RecordKind.OUTCOME:
            self.outcome[rule] = Seen(self.clock.wall(), record)

    def _daemon(self, outcome: str | None, path: str | None) -> None:
        if outcome == "started" and not self._said_started:
            self._said_started = True
            self.started_wall, self.started_monotonic = self.clock.wall(), self.clock.monotonic()
        elif outcome == "reloaded" and path:
            self._reloaded = file_sha256(Path(path))

    def policy_loaded(self, policy: Policy, path: Path | None) -> str | None:
        """Hash the policy file now (at its load)."""
        digest = file_sha256(path) if path is not None else None
        self._digest, self._reloaded = (policy, digest), None
        return digest

    def policy_sha256(self, policy: Policy, path: Path | None) -> str | None:
        """The sha256 of ``policy``'s file, taken when it was loaded where the tracker saw that,
        else at this first request for this policy object."""
        if self._digest is not None and self._digest[0] is policy:
            return self._digest[1]
        if self._reloaded is not None:
            self._digest, self._reloaded = (policy, self._reloaded), None
            return self._digest[1]
        return self.policy_loaded(policy, path)


def file_sha256(path: Path) -> str | None:
    """The sha256 of the policy file's bytes; None where it cannot be read now."""
    try:
        return hashlib.sha256(read_policy_text(path, check_owner=False).encode("utf-8")).hexdigest()
    except (NodemedicError, OSError):
        return None


# ---- the running daemon ---------------------------------------------------------------------------


def tracker_of(app: App) -> StatusTracker | None:
    """The tracker registered in the executor's listeners (None: not wired)."""
    return next((t for t in app.executor.listeners if isinstance(t, StatusTracker)), None)


def daemon_status(
    app: App, frozen: dict[str, float] | Literal[_Frozen.READ_HERE] | None = READ_HERE
) -> Snapshot:
    """The running daemon's snapshot. ``frozen``: the freezer registry as ``read_frozen`` gave it
    beforehand (e.g. in a thread: it touches cgroupfs; None: it could not be read); by default it
    is read here. The policy file is read once per reload, to hash it; nothing else here touches
    the node."""
    ex, tracker = app.executor, tracker_of(app)
    now = ex.now()
    errors: list[str] = []
    if frozen is READ_HERE:
        frozen = read_frozen(freezer_of(app), errors)
    snap = _frame(running=True, why=None, policy=ex.policy, now=now.wall)
    snap["version"] = __version__
    snap["policy"] = _policy_field(app.policy_path, policy_sha(tracker, ex.policy, app.policy_path))
    if tracker is not None:
        snap |= _times("started_at", tracker.started_wall)
        snap["uptime_s"] = round(now.monotonic - tracker.started_monotonic, 3)
    snap["rules"] = [_rule(r, ex.policy, ex.states.get(r.name), tracker, now.wall) for r in ex.policy.rule]
    snap["budget"] = _budget(ex.budget, now.wall, ex.policy)
    guard_mode = app.guard.settings.mode if app.guard is not None else "off"
    snap["sighup"] = _guard(guard_mode, tracker)
    snap["frozen"] = _frozen(frozen)
    snap["errors"] = errors
    return snap


def read_frozen(freezer: Freezing, errors: list[str]) -> dict[str, float] | None:
    """The freezer registry with the freezer's own reader (it drops cgroups that are gone); None,
    and the reason in ``errors``, where it cannot be read."""
    try:
        return freezer.frozen()
    except (NodemedicError, OSError) as exc:
        errors.append(f"frozen cgroups unknown: {exc}")
        return None


def freezer_of(app: App) -> Freezing:
    """The freezer whose registry status reads: the SIGHUP guard's, else one on the state
    directory's registry (a mode that froze nothing may have left entries from another)."""
    if app.guard is not None:
        return app.guard.parts.freezer
    return Freezer(registry=app.policy.daemon.state_dir / REGISTRY_NAME)


def policy_sha(tracker: StatusTracker | None, policy: Policy, path: Path | None) -> str | None:
    """The policy's sha256 as status shows it: the tracker's (hashed once per policy loaded)."""
    if path is None:
        return None
    return tracker.policy_sha256(policy, path) if tracker is not None else file_sha256(path)


# ---- the daemon not running -----------------------------------------------------------------------


def offline_status(policy_path: Path, why: str | None = None) -> Snapshot:
    """The snapshot from the policy, state.json and frozen.json, ``"running": false``: what only
    the daemon knows is null. Raises PolicyError where the policy cannot be read (nothing to show);
    a state file that cannot be read is named in ``errors``."""
    text = read_policy_text(policy_path, check_owner=False)  # only read: an unsafe owner harms nothing
    policy = parse_policy_text(text, str(policy_path))
    wall = _wall_now()
    errors: list[str] = []
    core = _restored(policy, errors)
    snap = _frame(running=False, why=why, policy=policy, now=wall)
    snap["version"] = __version__  # of this command: the daemon's is not known
    snap["policy"] = _policy_field(policy_path, hashlib.sha256(text.encode("utf-8")).hexdigest())
    restored = core is not None
    snap["rules"] = [
        _rule(r, policy, core.states.get(r.name) if core else None, None, wall, restored) for r in policy.rule
    ]
    snap["budget"] = _budget(core.budget if core else None, wall, policy)
    snap["sighup"] = _guard(policy.sighup.mode, None, offline=True)
    frozen = None
    if _readable(policy.daemon.state_dir, errors):
        frozen = read_frozen(Freezer(registry=policy.daemon.state_dir / REGISTRY_NAME), errors)
    snap["frozen"] = _frozen(frozen)
    snap["errors"] = errors
    return snap


def _restored(policy: Policy, errors: list[str]) -> RuleCore | None:
    """The rules' core (pure) with state.json restored into it, as the daemon would start; None
    where state.json cannot be read."""
    state_dir = policy.daemon.state_dir
    if not _readable(state_dir, errors):
        return None
    store = StateStore(state_dir)
    core = RuleCore(policy, NodeView())
    data, why = store.peek()  # read only: a damaged file is the daemon's to set aside, and say
    try:
        core.restore(data)
    except STATE_ERRORS as exc:
        why = repr(exc)
    if why:
        errors.append(
            f"{store.path} unusable ({why}); the daemon sets it aside and starts with closed breakers"
        )
        return None
    return core


def _readable(state_dir: Path, errors: list[str]) -> bool:
    """Whether the state directory can be read by this user (it is root's, mode 0700)."""
    if not state_dir.exists() or os.access(state_dir, os.R_OK | os.X_OK):
        return True
    message = f"cannot read {state_dir / STATE_FILE} and {REGISTRY_NAME}: permission denied (run as root)"
    if message not in errors:
        errors.append(message)
    return False


def _wall_now() -> float:
    return datetime.now(timezone.utc).timestamp()


# ---- the parts of a snapshot ----------------------------------------------------------------------


def _frame(*, running: bool, why: str | None, policy: Policy, now: float) -> Snapshot:
    """The top of a snapshot, in the order docs/cli.md lists it."""
    snap: Snapshot = {"schema": SCHEMA, "running": running, "why_not_running": why}
    snap |= {"version": None, "mode": policy.daemon.mode, "policy": None}
    snap |= _times("now", now)
    snap |= {**_times("started_at", None), "uptime_s": None}
    return snap


def _policy_field(path: Path | None, sha256: str | None) -> dict[str, str | None]:
    return {"path": str(path) if path is not None else None, "sha256": sha256}


def iso(wall: float | None) -> str | None:
    """An epoch time as ISO 8601 UTC (``2026-01-02T03:04:05Z``); None stays None."""
    if wall is None:
        return None
    return datetime.fromtimestamp(wall, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _times(name: str, wall: float | None) -> dict[str, Any]:
    """``name`` as ISO 8601 UTC and ``name_epoch`` as seconds since the epoch (both null if unset)."""
    return {name: iso(wall), f"{name}_epoch": wall}


def _rule(
    rule: Rule,
    policy: Policy,
    state: RuleState | None,
    tracker: StatusTracker | None,
    now: float,
    known: bool = True,
) -> Snapshot:
    """One rule. ``tracker`` None: the daemon is not running (``running`` and ``last_trigger``
    null, ``last_repair`` from the breaker's history); ``known`` False: state.json unreadable."""
    name = rule.name
    out: Snapshot = {"name": name, "mode": policy.mode_of(rule)}
    out["running"] = state.running if tracker is not None and state is not None else None
    out["breaker"] = _breaker(state.breaker, now) if state is not None and known else None
    out["backoff"] = _backoff(state, now) if state is not None and known else None
    out["last_trigger"] = _last_trigger(tracker.detected.get(name)) if tracker is not None else None
    seen = tracker.outcome.get(name) if tracker is not None else None
    if seen is not None:
        out["last_repair"] = _last_repair(seen)
    else:  # not seen since the start: the last enforce repair the breaker remembers
        out["last_repair"] = _from_history(state.breaker) if state is not None and known else None
    return out


def _breaker(breaker: CircuitBreaker, now: float) -> Snapshot:
    recent = [t for t in breaker.recent_failures if t > now - breaker.window]
    opened = breaker.opened_at if breaker.state in (OPEN, HALF_OPEN) else None
    reopens = breaker.reopens_at() if breaker.state == OPEN else None
    return {
        "state": breaker.state,
        **_times("opened_at", opened),
        **_times("reopens_at", reopens),
        "recent_failures": len(recent),
        "opens_after": breaker.failures,
        "window_s": breaker.window,
    }


def _backoff(state: RuleState, now: float) -> Snapshot:
    b = state.backoff
    waiting = b.not_before if b.failures and b.not_before > now else None
    return {"failures": b.failures, **_times("not_before", waiting)}


def _last_trigger(seen: Seen | None) -> Snapshot | None:
    if seen is None:
        return None
    words = seen.field("TRIGGER") or seen.record.message
    return {**_times("at", seen.at), "trigger": words, "incident": seen.field("INCIDENT")}


def _last_repair(seen: Seen) -> Snapshot:
    elapsed = seen.field("ELAPSED_MS")
    return {
        **_times("at", seen.at),
        "outcome": seen.field("OUTCOME"),
        "incident": seen.field("INCIDENT"),
        "elapsed_ms": float(elapsed) if elapsed is not None else None,
    }


def _from_history(breaker: CircuitBreaker) -> Snapshot | None:
    if not breaker.history:
        return None
    last = breaker.history[-1]
    outcome = "repaired" if last.ok else "not-repaired"
    return {**_times("at", last.at), "outcome": outcome, "incident": None, "elapsed_ms": None}


def _budget(budget: RepairBudget | None, now: float, policy: Policy) -> Snapshot:
    """The global repair budget; ``budget`` None (state.json unreadable): what was spent is null."""
    settings = policy.daemon.budget
    counts: Snapshot = {"repairs": settings.repairs, "window_s": settings.window, "spent": None, "left": None}
    if budget is None:
        return counts | _times("next_free_at", None)
    # as the budget counts (without changing it): a time ahead of now counts as now
    spent = sorted(min(t, now) for t in budget.spent if t > now - budget.window)
    left = max(0, budget.repairs - len(spent))
    free = spent[len(spent) - budget.repairs] + budget.window if 0 < budget.repairs <= len(spent) else None
    counts |= {"repairs": budget.repairs, "window_s": budget.window, "spent": len(spent), "left": left}
    return counts | _times("next_free_at", free)


def _guard(mode: str, tracker: StatusTracker | None, offline: bool = False) -> Snapshot:
    """The SIGHUP guard's mode and its storm under way or last one (null: none seen, or offline)."""
    storm = None
    if tracker is not None and tracker.storm_began is not None:
        began, ended = tracker.storm_began, tracker.storm_ended
        last = ended or began
        storm = {
            "state": "ended" if ended is not None else "under-way",
            **_times("began_at", began.at),
            **_times("ended_at", ended.at if ended is not None else None),
            "signals": int(last.field("SIGNALS") or 0),
            "senders": last.field("SENDERS"),
            "incident": last.field("INCIDENT"),
        }
    return {"mode": mode, "storm": None if offline else storm}


def _frozen(frozen: dict[str, float] | None) -> list[Snapshot] | None:
    if frozen is None:
        return None
    return [{"cgroup": cg, **_times("until", until)} for cg, until in sorted(frozen.items())]
