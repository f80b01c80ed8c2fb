"""Pure matching of events against rules: no I/O, no clock."""

from __future__ import annotations

import re
from dataclasses import dataclass

from nodemedic.events import (
    Event,
    FdUsage,
    FileChanged,
    GrpcStreamsSetting,
    JournalLine,
    OomKills,
    PathChanged,
    PressureSeen,
    ProbeFailed,
    SignalSeen,
    SocketModeSeen,
    UnitChanged,
    VersionSeen,
)
from nodemedic.policy.model import (
    FdTrigger,
    FileTrigger,
    GrpcStreamsTrigger,
    JournalTrigger,
    KnownBug,
    OomTrigger,
    PathTrigger,
    PressureTrigger,
    ProbeTrigger,
    Rule,
    SignalTrigger,
    SocketModeTrigger,
    Trigger,
    UnitTrigger,
    VersionTrigger,
)


@dataclass(frozen=True, slots=True)
class Match:
    """A rule fired by an event, and a few words on what fired it."""

    rule: Rule
    event: Event
    trigger: str


def match(rules: list[Rule], event: Event) -> list[Match]:
    out = []
    for rule in rules:
        for trig in rule.trigger:
            why = _fires(trig, event)
            if why:
                out.append(Match(rule, event, why))
                break
    return out


def match_trigger(trig: Trigger, event: Event) -> str | None:
    """What fired, if ``trig`` fires on ``event``."""
    return _fires(trig, event)


def _fires(trig: Trigger, event: Event) -> str | None:
    if isinstance(trig, PathTrigger) and isinstance(event, PathChanged):
        return _path(trig, event)
    if isinstance(trig, JournalTrigger) and isinstance(event, JournalLine):
        return _journal(trig, event)
    if isinstance(trig, UnitTrigger) and isinstance(event, UnitChanged):
        return _unit(trig, event)
    if isinstance(trig, ProbeTrigger) and isinstance(event, ProbeFailed):
        return _probe(trig, event)
    if isinstance(trig, SignalTrigger) and isinstance(event, SignalSeen):
        return _signal(trig, event)
    if isinstance(trig, FileTrigger) and isinstance(event, FileChanged) and event.path == trig.path:
        return f"{event.path} was written"
    return _resource(trig, event)


def _resource(trig: Trigger, event: Event) -> str | None:
    """The resource watcher's readings (sources/resources.py)."""
    if isinstance(trig, FdTrigger) and isinstance(event, FdUsage):
        return _fds(trig, event)
    if isinstance(trig, PressureTrigger) and isinstance(event, PressureSeen):
        return _pressure(trig, event)
    if isinstance(trig, OomTrigger) and isinstance(event, OomKills) and event.new > 0:
        return (
            f"the OOM killer killed {event.new} process(es) in {event.unit}'s cgroup ({event.total} in all)"
        )
    if isinstance(trig, SocketModeTrigger) and isinstance(event, SocketModeSeen):
        return _socket_mode(trig, event)
    if isinstance(trig, GrpcStreamsTrigger) and isinstance(event, GrpcStreamsSetting):
        return _grpc_streams(trig, event)
    if isinstance(trig, VersionTrigger) and isinstance(event, VersionSeen):
        bugs = known_bugs(trig.known_bugs, event.version)
        if bugs:
            return f"containerd {event.version} has known bugs: " + "; ".join(b.reason for b in bugs)
    return None


def _path(trig: PathTrigger, event: PathChanged) -> str | None:
    if event.path in trig.paths and event.kind == trig.kind:
        return f"{event.path} is a {event.kind.value}"
    return None


def _journal(trig: JournalTrigger, event: JournalLine) -> str | None:
    if event.unit == trig.unit and trig.pattern.search(event.message):
        return f"journal: {event.message}"
    return None


def in_states(seen: UnitChanged, active_state: list[str], sub_state: list[str]) -> bool:
    """A unit's state against wanted ActiveState and SubState values (an empty list means any)."""
    return (not active_state or seen.active_state in active_state) and (
        not sub_state or seen.sub_state in sub_state
    )


def _unit(trig: UnitTrigger, event: UnitChanged) -> str | None:
    if event.unit == trig.unit and in_states(event, trig.active_state, trig.sub_state):
        return f"{event.unit} is {event.active_state}/{event.sub_state}"
    return None


def _probe(trig: ProbeTrigger, event: ProbeFailed) -> str | None:
    if event.consecutive >= trig.failures:
        return f"containerd did not answer {event.consecutive} requests in a row: {event.error}"
    return None


def _signal(trig: SignalTrigger, event: SignalSeen) -> str | None:
    if event.unit == trig.unit and event.signal == trig.signal:
        return f"{event.unit}'s main process {event.target_pid} was killed by signal {event.signal}"
    return None


def _fds(trig: FdTrigger, event: FdUsage) -> str | None:
    if event.limit > 0 and event.open > trig.fraction * event.limit:
        return (f"{event.unit}'s main process {event.pid} has {event.open} of {event.limit} file "
                f"descriptors open ({100 * event.open / event.limit:.0f} %)")  # fmt: skip
    return None


def _pressure(trig: PressureTrigger, event: PressureSeen) -> str | None:
    if (trig.scope, trig.resource) != (event.scope, event.resource):
        return None
    value = event.some_avg10 if trig.line == "some" else event.full_avg10
    if value >= trig.above:
        where = "host" if event.scope == "host" else "containerd's cgroup"
        return f"{trig.resource} pressure ({where}): {trig.line} avg10={value:.2f} % >= {trig.above:g} %"
    return None


def _socket_mode(trig: SocketModeTrigger, event: SocketModeSeen) -> str | None:
    if event.path != trig.path or (event.mode, event.uid, event.gid) == (trig.bits, trig.uid, trig.gid):
        return None
    return (f"{event.path} is mode {event.mode:04o} owner {event.uid}:{event.gid}, "
            f"expected {trig.bits:04o} {trig.uid}:{trig.gid}")  # fmt: skip


def _grpc_streams(trig: GrpcStreamsTrigger, event: GrpcStreamsSetting) -> str | None:
    if event.path != trig.config or not event.value:
        return None
    return (f"{event.path} sets [grpc] max_concurrent_streams = {event.value}, a key containerd does not "
            "read: its gRPC server has no stream limit, so this limit is not in effect")  # fmt: skip


def version_tuple(version: str) -> tuple[int, ...]:
    """The leading numbers of a version: "1.6.20~ds1" -> (1, 6, 20); "v2.0.0-rc.1" -> (2, 0, 0)."""
    found = re.match(r"v?(\d+(?:\.\d+)*)", version.strip())
    return tuple(int(n) for n in found.group(1).split(".")) if found else ()


def known_bugs(bugs: list[KnownBug], version: str) -> list[KnownBug]:
    """The ranges ``version`` falls in (first <= version < fixed); none for an unparsable version."""
    seen = version_tuple(version)
    if not seen:
        return []
    return [
        b for b in bugs
        if version_tuple(b.first) <= seen and (b.fixed is None or seen < version_tuple(b.fixed))
    ]  # fmt: skip
