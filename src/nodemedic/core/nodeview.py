"""What nodemedic knows of the node, fed by events: the one copy of the units' states, their main
processes, who stopped them, and what is at each watched path. Pure: the core, the executor and
the sources (through getters that app.py hands them) read it; only ``see`` and ``stopping`` change
it."""

from __future__ import annotations

from nodemedic.events import Event, PathChanged, PathKind, UnitChanged

# A unit down in one of these load states is no operator's stop: systemd will not start it.
UNIT_REFUSED = {
    "masked": "systemd refuses to start a masked unit (systemctl unmask it first)",
    "not-found": "no such unit file is installed (install it, or fix the unit's name in the policy)",
}
# ExecMainCode: the main process was killed by a signal (CLD_KILLED), or killed and dumped core.
CLD_KILLED, CLD_DUMPED = 2, 3
# The signals a stop job sends (KillSignal=, then SIGKILL past TimeoutStopSec=): a death by one of
# them may be a stop's, by any other (SIGHUP, SIGINT, SIGPIPE...) it is not.
STOP_SIGNALS = {15, 9}  # SIGTERM, SIGKILL


class NodeView:
    def __init__(self) -> None:
        self.units: dict[str, UnitChanged] = {}  # the last state D-Bus reported, per unit
        self.stopped_by_us: set[str] = set()  # units a repair stopped (not yet running again)
        self.stopped_by_others: set[str] = set()  # units an operator stopped
        self._last_pid: dict[str, int] = {}  # the last main PID seen while the unit was active
        self.paths: dict[str, PathKind] = {}  # what inotify last found at each watched path

    def see(self, event: Event) -> None:
        if isinstance(event, PathChanged):
            self.paths[event.path] = event.kind
        if not isinstance(event, UnitChanged):
            return
        before = self.units.get(event.unit)
        self.units[event.unit] = event
        if event.active_state == "active" and event.main_pid:
            self._last_pid[event.unit] = event.main_pid
        self._track_stops(event, before)

    def _track_stops(self, event: UnitChanged, before: UnitChanged | None) -> None:
        """With Restart=always only a stop job leaves a unit inactive: if no repair of ours stopped
        it, someone else did (an operator's systemctl stop), and it is theirs until it runs again.
        One exception: a main process that died by itself of a signal systemd counts as a clean
        exit (SIGHUP, with Restart=on-failure or Restart=no) leaves it inactive without any stop."""
        if event.active_state == "inactive":
            if event.unit not in self.stopped_by_us and not _died_by_itself(event, before):
                self.stopped_by_others.add(event.unit)
        elif event.active_state in ("active", "activating", "reloading"):
            self.stopped_by_us.discard(event.unit)
            self.stopped_by_others.discard(event.unit)

    def stopping(self, unit: str) -> None:
        """nodemedic is about to stop (or restart) ``unit``: the inactive state that follows is ours."""
        self.stopped_by_us.add(unit)

    def state(self, unit: str) -> UnitChanged | None:
        return self.units.get(unit)

    def main_pid(self, unit: str) -> int:
        """The unit's main process as last reported (0 while it is not running, or not known yet)."""
        seen = self.units.get(unit)
        return seen.main_pid if seen is not None else 0

    def last_main_pid(self, unit: str) -> int:
        """The last main process seen while the unit was active (kept while it is down)."""
        return self._last_pid.get(unit, 0)

    def path_is(self, path: str, kind: PathKind) -> bool | None:
        """Whether ``path`` was last seen as ``kind``; None if no event has said what is there."""
        seen = self.paths.get(path)
        return None if seen is None else seen == kind

    def unstartable(self) -> set[str]:
        """Units systemd will not start (masked, no unit file), running or not."""
        return {unit for unit, seen in self.units.items() if seen.load_state in UNIT_REFUSED}


def _died_by_itself(event: UnitChanged, before: UnitChanged | None) -> bool:
    """``event`` (inactive) follows a death of the running main process, not a stop job: straight
    from running (a stop job passes through deactivating, and one cancels a pending auto-restart:
    from activating/auto-restart, where ExecMain* still tell of the death before), killed by a
    signal no stop job sends. systemd 252 reports a SIGHUP'd containerd with Restart=on-failure as
    inactive/dead, Result=success, ExecMainCode=2, ExecMainStatus=1. At start-up (nothing seen
    before) it cannot be told: counted as a stop."""
    return (
        before is not None
        and before.active_state in ("active", "reloading")
        and event.exec_main_code in (CLD_KILLED, CLD_DUMPED)
        and event.exec_main_status not in STOP_SIGNALS
    )
