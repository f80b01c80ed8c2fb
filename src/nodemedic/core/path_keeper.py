"""When to put a placeholder socket at a missing containerd socket path, and what to say; pure.

A watched path seen missing (inotify's word, through the node view) gets a placeholder at once.
Only where containerd may be between unlinking the path and binding its socket there (it is
starting; the path that vanished was our placeholder, which containerd removes as it starts or
stops; D-Bus has not said yet what containerd does) would a placeholder make containerd's bind fail
with "address already in use": then the core looks again after ``grace``, and acts only if the
path is still missing. An active containerd has bound its sockets (it says READY after both, and a
new process of it is reported starting long before it gets to bind): if it runs while its path is
missing, its socket file was unlinked under it: the placeholder is made at once and the fault
reported.

The executor makes the placeholder (``MakePlaceholder``) and says how it went (``made``,
``not_made``); when another file takes the placeholder's place (containerd's own socket: a new
inode) the core says so once.
"""

from __future__ import annotations

from dataclasses import dataclass

from nodemedic.core.effects import Effect, Effects, Instant, Later, Report
from nodemedic.core.nodeview import NodeView
from nodemedic.events import Event, PathChanged, PathKind
from nodemedic.policy.model import Mode
from nodemedic.policy.placeholder import PlaceholderMode, PlaceholderSettings
from nodemedic.report import RecordKind

ACTION = "placeholder-socket"
# Every record's NODEMEDIC_RULE (as the SIGHUP guard's say "sighup"): status, metrics and the D-Bus
# API see the socket-unlinked fault as an incident of it, open until containerd's socket is back.
RULE = "placeholder"
RUNNING = ("active", "reloading")
STARTING = ("start-pre", "start", "start-post")  # activating with a process that may bind
MAX_LOOKS = 50  # grace periods waited at most while containerd starts (5 s at the default 100 ms)
RETRY_AFTER = (0.5, 1.0, 2.0, 4.0, 8.0)  # seconds before each new try after a failure; then given up


@dataclass(frozen=True, slots=True)
class MakePlaceholder(Effect):
    """Make a placeholder socket at ``path`` (nothing there is ever replaced)."""

    path: str
    running: int  # containerd's main PID when it runs (its socket file unlinked: a fault), else 0
    detected_at: float  # monotonic: when the path was seen missing


class PlaceholderCore:
    """Decides placeholders for ``[placeholder]`` (see the module's docstring)."""

    def __init__(self, settings: PlaceholderSettings, daemon_mode: Mode, view: NodeView) -> None:
        self.settings, self.daemon_mode, self.view = settings, daemon_mode, view
        self.placed: dict[str, tuple[int, int]] = {}  # path -> (inode, ctime) of our placeholder
        self._decided: set[str] = set()  # paths missing whose placeholder is decided (or said)
        self._retries: dict[str, int] = {}  # path -> tries after a failure so far (this incident)

    def replace(self, settings: PlaceholderSettings, daemon_mode: Mode, now: Instant) -> Effects:
        """A reloaded policy (or ``nodemedic mode``): its settings from now on. When the mode in
        effect changes (off or observe to enforce, say), every path already missing is decided
        again at once: no inotify event comes for it (the path did not change, and a watch another
        rule shares is not rebuilt), and what observe said it would do is no placeholder made."""
        before = self.mode
        self.settings, self.daemon_mode = settings, daemon_mode
        if self.mode == before:
            return []
        self._decided.clear()
        self._retries.clear()
        if self.mode == "off":
            return []
        out: Effects = []
        for path in self.settings.paths:
            if self.view.paths.get(path) is PathKind.MISSING:
                out += self._missing(PathChanged(path, PathKind.MISSING, at=now.monotonic))
        return out

    @property
    def mode(self) -> PlaceholderMode:
        if self.settings.mode == "enforce" and self.daemon_mode == "observe":
            return "observe"
        return self.settings.mode

    def handle(self, event: Event, now: Instant) -> Effects:
        if self.mode == "off" or not isinstance(event, PathChanged):
            return []
        if event.path not in self.settings.paths:
            return []
        if event.kind is PathKind.MISSING:
            return self._missing(event)
        self._decided.discard(event.path)
        self._retries.pop(event.path, None)
        return self._present(event)

    def _missing(self, event: PathChanged) -> Effects:
        path = event.path
        if path in self._decided:
            return []
        if path in self.placed or self._may_bind():
            return [self._look_again(path, event.at, MAX_LOOKS)]
        return self._decide(path, event.at)

    def _look_again(self, path: str, detected_at: float, looks: int) -> Later:
        """After ``grace``: still missing, and containerd not (or no longer) starting? Then decide.
        While it starts, look again (``looks`` more times at most: a start that hangs must not keep
        the path missing for ever)."""

        def then(_now: Instant) -> Effects:
            if self.mode == "off" or self.view.paths.get(path) is not PathKind.MISSING:
                return []
            if path in self._decided:
                return []
            if looks > 1 and self._may_bind():
                return [self._look_again(path, detected_at, looks - 1)]
            return self._decide(path, detected_at)

        return Later(self.settings.grace, then, f"placeholder: {path} still missing?")

    def _may_bind(self) -> bool:
        """Whether containerd may be between unlinking its socket path and binding it."""
        seen = self.view.state(self.settings.unit)
        if seen is None:  # at start-up, before D-Bus has said
            return True
        return seen.active_state == "activating" and seen.sub_state in STARTING

    def _running(self) -> int:
        """containerd's main PID while it is active, else 0."""
        seen = self.view.state(self.settings.unit)
        return seen.main_pid if seen is not None and seen.active_state in RUNNING else 0

    def _decide(self, path: str, detected_at: float) -> Effects:
        self._decided.add(path)
        running = self._running()
        if self.mode == "enforce":
            return [MakePlaceholder(path, running, detected_at)]
        state = "is active" if running else "is not running"
        message = f"{path} is missing and {self.settings.unit} {state}: would make a placeholder socket there"
        return [self._report(RecordKind.DECIDED, message, path, "would-do", MODE="observe")]

    def made(
        self,
        effect: MakePlaceholder,
        identity: tuple[int, int],
        detail: str,
        elapsed_ms: float,
        replaced: str = "",
    ) -> Effects:
        """The executor made the placeholder (``identity``: its inode and ctime) at ``effect.path``;
        ``replaced``: what holds the path already instead (containerd unlinked ours at once)."""
        path, unit = effect.path, self.settings.unit
        self._decided.discard(path)  # the path is there again: its next vanishing is a new incident
        self._retries.pop(path, None)
        fields = {"MODE": "enforce", "DETAIL": detail, "ELAPSED_MS": elapsed_ms}
        why = f"{unit} active when it went missing" if effect.running else f"{unit} is not running"
        if replaced:  # never recorded as ours: containerd's own socket would be taken for it
            message = f"placeholder socket made at {path} ({why}), already replaced by {replaced}: {detail}"
            return [self._report(RecordKind.ACTION, message, path, "done", REPLACED=replaced, **fields)]
        self.placed[path] = identity
        out: Effects = []
        if effect.running:  # said once the grace has shown it was no stop D-Bus had not told yet
            out.append(Later(self.settings.grace, lambda _now: self._unlinked(effect, identity, elapsed_ms)))
        message = f"placeholder socket made at {path} ({why}): {detail}"
        out.append(self._report(RecordKind.ACTION, message, path, "done", **fields))
        return out

    def _unlinked(self, effect: MakePlaceholder, identity: tuple[int, int], elapsed_ms: float) -> Effects:
        """containerd still runs as the same process and our placeholder is still there: its
        socket file really was unlinked under it (a stop or restart would have replaced or
        removed the placeholder, or changed the unit's state, by now)."""
        path, unit = effect.path, self.settings.unit
        if self._running() != effect.running or self.placed.get(path) != identity:
            return []
        message = (
            f"{unit} runs but its socket file {path} was unlinked: it serves only the connections "
            f"already open; a placeholder keeps the path, and a restart of {unit} binds its socket again"
        )
        fields = {"MODE": "enforce", "ELAPSED_MS": elapsed_ms, "TRIGGER": f"{path} missing"}
        return [self._report(RecordKind.DETECTED, message, path, "socket-unlinked", **fields)]

    def not_made(self, effect: MakePlaceholder, outcome: str, detail: str) -> Effects:
        """The placeholder was not made: something appeared meanwhile ("skipped"), it was refused,
        or it failed: then it is tried again after a backoff, ``len(RETRY_AFTER)`` times at most."""
        kind = RecordKind.ERROR if outcome == "failed" else RecordKind.ACTION
        retry = self._retry(effect) if outcome == "failed" else []
        if outcome == "failed":
            tries = self._retries[effect.path]
            again = (
                f"tried again in {retry[0].delay:g}s ({tries} of {len(RETRY_AFTER)})" if retry else "given up"
            )
            detail = f"{detail}; {again}"
        message = f"no placeholder socket made at {effect.path}: {detail}"
        return [self._report(kind, message, effect.path, outcome, MODE="enforce", DETAIL=detail), *retry]

    def _retry(self, effect: MakePlaceholder) -> list[Later]:
        path = effect.path
        tries = self._retries.get(path, 0)
        if tries >= len(RETRY_AFTER):
            return []
        self._retries[path] = tries + 1
        self._decided.discard(path)  # an event for the path meanwhile decides anew; else this does

        def then(_now: Instant) -> Effects:
            if (
                self.mode == "off"
                or path in self._decided
                or self.view.paths.get(path) is not PathKind.MISSING
            ):
                return []
            return self._missing(PathChanged(path, PathKind.MISSING, at=effect.detected_at))

        return [Later(RETRY_AFTER[tries], then, f"placeholder: {path} again after a failure")]

    def _present(self, event: PathChanged) -> Effects:
        """Something is at the path: if it took our placeholder's place, say so once."""
        ours = self.placed.get(event.path)
        if ours is None or (event.kind is PathKind.SOCKET and (event.inode, event.ctime_ns) == ours):
            return []
        del self.placed[event.path]
        if event.kind is PathKind.SOCKET and event.inode == ours[0]:  # a chmod (IN_ATTRIB), or inode reuse
            message = (
                f"the placeholder socket at {event.path} changed or was replaced (inode {event.inode}, a "
                f"new ctime: a chmod or chown of it, or a socket bound anew on a reused inode number)"
            )
            return [
                self._report(RecordKind.OUTCOME, message, event.path, "replaced", DETAIL=event.kind.value)
            ]
        if event.kind is PathKind.SOCKET:
            what = f"a new socket (inode {event.inode}): {self.settings.unit} bound its own"
        else:
            what = f"a {event.kind.value}, not a socket (a directory is the socket-path-is-directory rule's)"
        message = f"the placeholder socket at {event.path} was replaced by {what}"
        return [self._report(RecordKind.OUTCOME, message, event.path, "replaced", DETAIL=event.kind.value)]

    def _report(self, kind: RecordKind, message: str, path: str, outcome: str, **fields: object) -> Report:
        common = {
            "RULE": RULE,
            "ACTION": ACTION,
            "PATH": path,
            "UNIT": self.settings.unit,
            "OUTCOME": outcome,
        }
        return Report(kind, message, {**common, "SOURCE": "inotify", **fields})
