"""`nodemedic replay`: run a policy over journal history and say what it would have detected and done.

Nothing here decides: each entry becomes the event the journal source emits (``line_from_entry``,
the same attribution by journald's own fields), the one ``NodeView`` sees it and the one
``RuleCore`` decides, on a clock driven by the entries' timestamps, so backoff, breakers and the
repair budget behave as they would have. Only the effects are interpreted here instead of run: the
node the history comes from cannot be asked, so a rule's confirm condition is taken to hold
(``ASSUMPTIONS``), a repair is said, not made, and its end is reported to the core as the executor
would have reported it (repaired, or failed with ``--assume-failed``).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import os
import random
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any, BinaryIO

from pydantic import BaseModel

from nodemedic.core.breaker import OPEN
from nodemedic.core.effects import Effects, Instant, Later, Repair, Report
from nodemedic.core.nodeview import NodeView
from nodemedic.core.rules import RepairEnd, RuleCore
from nodemedic.errors import NodemedicError
from nodemedic.events import UnitChanged
from nodemedic.policy.duration import parse_duration
from nodemedic.policy.load import DEFAULT_POLICY, load_policy
from nodemedic.policy.match import match
from nodemedic.policy.model import Mode, Policy
from nodemedic.report import RecordKind
from nodemedic.sources.journal import KERNEL, add_matches, line_from_entry
from nodemedic.tools.paint import Paint, painter, wants_colour

SCHEMA = 1
JOURNAL_MAGIC = b"LPKSHHRH"  # the first bytes of a journal file (systemd's journal-def.h)
MAX_FIELD = 64 * 1024 * 1024  # journald keeps entries up to 32 MiB: a bigger field is no export
DEFAULT_REPAIR_TIME = 10.0
_NAME = re.compile(rb"[A-Za-z0-9_]{1,256}")
_RELATIVE = re.compile(r"^([+-])?\s*(\d{1,9}(?:\.\d{1,9})?)\s*(ms|s|m|h|d)(\s+ago)?$")

ASSUMPTIONS = (
    "each rule's confirm condition holds when it fires (the node cannot be asked: paths, the probe,"
    " the config check and the shims' proof are not looked at)",
    "the units in [daemon] watch_units and journal_units run, and nobody stopped them (D-Bus unit"
    " states are not in the journal)",
    "a repair in enforce mode takes --repair-time and repairs (with --assume-failed: fails); lines"
    " that came while it ran are stale afterwards, as the live confirm check would find them",
)
WHY_NOT = {
    "inotify": "a path's kind is seen by inotify; the journal does not record it",
    "files": "a file's writes are seen by inotify; the journal does not record them",
    "probe": "the probe asks containerd over its socket; the journal holds no answer",
    "dbus": "unit states and signals come over D-Bus; they are not read back from the journal",
    "resources": "readings of /proc, cgroups, the socket and config.toml are taken live, not logged",
    "signals": "the SIGHUP guard ([sighup]) sees signals over D-Bus and in the kernel's trace",
}
SIGHUP_GUARD = "sighup"  # NODEMEDIC_RULE of the guard's records (core/sighup_guard.py)


class ReplayInputError(NodemedicError, OSError):
    """The journal or the file to replay cannot be read (not a journal file or export stream, a
    truncated field, an unreadable file): say which and where."""


# ---- the history: entries and their times -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """One journal entry: its fields, its wall-clock time and its boot's monotonic time (seconds)."""

    fields: Mapping[str, object]
    wall: float
    monotonic: float | None = None
    boot: str = ""


def parse_export(stream: BinaryIO) -> Iterator[dict[str, object]]:
    """The entries of a ``journalctl -o export`` stream: ``KEY=value`` lines, a binary field as its
    name, a 64-bit little-endian length and the data; a blank line ends an entry. A repeated field
    becomes a list, binary data text where it is UTF-8 (as python-systemd's Reader gives it)."""
    fields: dict[str, object] = {}
    number = 1
    while line := stream.readline():
        if line == b"\n":
            if fields:
                yield fields
                fields, number = {}, number + 1
            continue
        try:
            name, value = _field(stream, line)
        except ReplayInputError as exc:
            raise ReplayInputError(f"entry {number}: {exc}") from None
        old = fields.get(name)
        fields[name] = value if old is None else [*(old if isinstance(old, list) else [old]), value]
    if fields:
        yield fields


def _field(stream: BinaryIO, line: bytes) -> tuple[str, str | bytes]:
    name, equals, value = line.removesuffix(b"\n").partition(b"=")
    if not _NAME.fullmatch(name):
        raise ReplayInputError(f"not a journal export stream: a field named {name[:40]!r}")
    if equals:
        return name.decode(), value.decode("utf-8", "replace")
    size = stream.read(8)
    length = int.from_bytes(size, "little")
    if len(size) < 8 or length > MAX_FIELD:
        raise ReplayInputError(f"binary field {name.decode()} has no valid length")
    data = stream.read(length)
    if len(data) < length or stream.read(1) != b"\n":
        raise ReplayInputError(f"binary field {name.decode()} is cut short")
    try:
        return name.decode(), data.decode("utf-8")
    except UnicodeDecodeError:
        return name.decode(), data


def entry_of(fields: Mapping[str, object]) -> Entry:
    """An entry with its times, from an export stream's text or python-systemd's values."""
    wall = _microseconds(fields.get("__REALTIME_TIMESTAMP"))
    if wall is None:
        raise ReplayInputError("an entry has no __REALTIME_TIMESTAMP: not a journal entry")
    mono = fields.get("__MONOTONIC_TIMESTAMP")
    boot = fields.get("_BOOT_ID", "")
    if isinstance(mono, tuple) and len(mono) == 2:  # python-systemd: (monotonic, boot id)
        mono, boot = mono
    monotonic = _microseconds(mono)
    return Entry(fields, wall / 1e6, None if monotonic is None else monotonic / 1e6, str(boot))


def _microseconds(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, datetime):
        return round(value.timestamp() * 1e6)
    if isinstance(value, timedelta):
        return round(value.total_seconds() * 1e6)
    return None


class History:
    """Where the entries come from: the local journal, a journal file, or an export stream."""

    def __init__(self, path: str | None, since: float | None, until: float | None) -> None:
        self.path, self.since, self.until = path, since, until
        self.kind = "journal" if path is None else "export"  # until its first bytes say otherwise
        self._stream: BinaryIO | None = None
        self.size: int | None = None

    def describe(self) -> str:
        where = {"journal": "the local journal", "journal-file": "journal file", "export": "export stream"}
        return where[self.kind] + (f" {self.path}" if self.path else "")

    def done(self) -> float | None:
        """The share read so far, where it is known (an export stream in a regular file)."""
        if self._stream is None or not self.size:
            return None
        if self._stream.closed:
            return 1.0
        return min(1.0, self._stream.tell() / self.size)

    def entries(self, units: list[str]) -> Iterator[Entry]:
        for fields in self._fields(units):
            entry = entry_of(fields)
            if self.since is not None and entry.wall < self.since:
                continue
            if self.until is not None and entry.wall > self.until:
                continue
            yield entry

    def _fields(self, units: list[str]) -> Iterator[Mapping[str, object]]:
        if self.path == "-":
            return parse_export(sys.stdin.buffer)
        if self.path is None:
            return self._reader(units, None)
        with open(self.path, "rb") as probe:
            if probe.read(len(JOURNAL_MAGIC)) == JOURNAL_MAGIC:
                self.kind = "journal-file"
                return self._reader(units, self.path)
        return self._export(self.path)

    def _export(self, path: str) -> Iterator[Mapping[str, object]]:
        with open(path, "rb") as stream:
            self._stream, self.size = stream, os.fstat(stream.fileno()).st_size
            yield from parse_export(stream)

    def _reader(self, units: list[str], path: str | None) -> Iterator[Mapping[str, object]]:
        try:
            from systemd import journal
        except ImportError as exc:
            raise ReplayInputError(f"python-systemd is missing ({exc}): replay an export stream") from exc
        raw = {"__REALTIME_TIMESTAMP": int, "__MONOTONIC_TIMESTAMP": tuple}
        reader = journal.Reader(files=[path], converters=raw) if path else journal.Reader(converters=raw)
        add_matches(reader, units)  # only narrows the read: line_from_entry decides
        if self.since is not None:
            reader.seek_realtime(self.since)
        return iter(reader)


class ReplayClock:
    """The replayed time: the wall clock is each entry's ``__REALTIME_TIMESTAMP``; the monotonic
    clock moves by ``__MONOTONIC_TIMESTAMP`` within a boot and by the wall clock across boots (or
    where an entry has none), and never backwards, so timers fire in order."""

    def __init__(self) -> None:
        self.monotonic = 0.0
        self.wall: float | None = None
        self._boot = ""
        self._entry_monotonic: float | None = None

    def advance(self, entry: Entry) -> Instant:
        if self.wall is None:
            step = 0.0
        elif entry.boot == self._boot and None not in (entry.monotonic, self._entry_monotonic):
            step = (entry.monotonic or 0.0) - (self._entry_monotonic or 0.0)
        else:
            step = entry.wall - self.wall
        self.monotonic += max(0.0, step)
        self.wall, self._boot, self._entry_monotonic = entry.wall, entry.boot, entry.monotonic
        return Instant(self.monotonic, entry.wall)

    def at(self, monotonic: float) -> Instant:
        """The moment ``monotonic`` on the replayed clock (a timer due between entries)."""
        return Instant(monotonic, (self.wall or 0.0) + monotonic - self.monotonic)


# ---- the replay: the real core, its effects interpreted -------------------------------------------


@dataclass(slots=True)
class Step:
    """One thing the live daemon would have written, at the replayed time."""

    at: float
    kind: str  # detected, decided, action, outcome, escalated (a record kind), or error
    message: str
    outcome: str = ""
    rule: str = ""


@dataclass(slots=True)
class Incident:
    """One decision to act (or observe, or report) on a rule, with the lines grouped under it: those
    matched from it until the rule's next incident."""

    number: int
    rule: str
    mode: Mode
    first: float
    trigger: str
    decided: str  # repair, observe, report, or held (observe only: the breaker or the budget)
    would: list[str]
    last: float = 0.0
    lines: int = 0
    held: str = ""
    outcome: str = ""
    breaker_opened: bool = False
    steps: list[Step] = field(default_factory=list)


@dataclass(slots=True)
class RuleTally:
    """What one rule did over the whole history."""

    rule: str
    mode: Mode
    lines: int = 0
    lines_before: int = 0  # matched before its first incident (e.g. fewer than [rule.when] asks)
    incidents: int = 0
    repairs: int = 0
    held: int = 0
    breaker_opened: int = 0


@dataclass(order=True, slots=True)
class _Timer:
    due: float
    seq: int
    repair_end: bool = field(compare=False)
    what: str = field(compare=False)
    fire: Callable[[Instant], None] = field(compare=False)


_DECIDED: dict[Mode, str] = {"enforce": "repair", "observe": "observe"}


class Replay:
    """Feeds entries through the real NodeView and RuleCore and keeps what they decide."""

    def __init__(
        self, policy: Policy, repair_time: float = DEFAULT_REPAIR_TIME, assume_failed: bool = False
    ) -> None:
        self.policy, self.repair_time, self.assume_failed = policy, repair_time, assume_failed
        self.view = NodeView()
        for unit in dict.fromkeys([*policy.daemon.watch_units, *policy.daemon.journal_units]):
            if unit != KERNEL:  # assumed running (ASSUMPTIONS): D-Bus is not in the journal
                self.view.see(UnitChanged(unit, "active", "running", source="replay"))
        self.core = RuleCore(policy, self.view)
        for state in self.core.states.values():  # the jitter drawn alike each time: replays agree
            state.backoff.rng = random.Random(0)  # noqa: S311 (spreads retries; no secret)
        self.clock = ReplayClock()
        self.incidents: list[Incident] = []
        self.other: list[Step] = []  # records no incident explains
        self.rules = {r.name: RuleTally(r.name, policy.mode_of(r)) for r in policy.rule}
        self.entries = self.lines = 0
        self.first: float | None = None  # the earliest and latest entry (the wall may go back)
        self.last: float | None = None
        self._latest: dict[str, Incident] = {}
        self._timers: list[_Timer] = []
        self._seq = itertools.count()

    def feed(self, entry: Entry) -> None:
        now = self.clock.advance(entry)
        self._fire_until(now.monotonic)
        self.entries += 1
        self.first = entry.wall if self.first is None else min(self.first, entry.wall)
        self.last = entry.wall if self.last is None else max(self.last, entry.wall)
        cursor = str(entry.fields.get("__CURSOR", ""))
        line = line_from_entry(entry.fields, self.policy.daemon.journal_units, now.monotonic, cursor)
        if line is None:
            return
        self.lines += 1
        self.view.see(line)
        fired = [m.rule.name for m in match(self.policy.rule, line)]  # only to count the lines
        self._run(self.core.handle(line, now), now)
        for name in fired:
            self._count_line(name, now.wall)

    def finish(self, end: float | None = None) -> list[tuple[float, str]]:
        """Let the replayed clock run to ``end`` (the history's end: ``--until``, now); repairs
        under way then are finished anyway. Returns the timers still to come (when, what)."""
        last = self.clock.wall
        if end is not None and last is not None and end > last:
            self._fire_until(self.clock.monotonic + end - last)
        while ends := [t for t in self._timers if t.repair_end]:
            first = min(ends)
            self._timers.remove(first)
            heapq.heapify(self._timers)
            first.fire(self.clock.at(first.due))
        return [(self.clock.at(t.due).wall, t.what) for t in sorted(self._timers)]

    def _fire_until(self, monotonic: float) -> None:
        while self._timers and self._timers[0].due <= monotonic:
            timer = heapq.heappop(self._timers)
            timer.fire(self.clock.at(timer.due))

    def _later(
        self, due: float, what: str, fire: Callable[[Instant], None], repair_end: bool = False
    ) -> None:
        heapq.heappush(self._timers, _Timer(due, next(self._seq), repair_end, what, fire))

    def _count_line(self, rule: str, wall: float) -> None:
        tally, incident = self.rules[rule], self._latest.get(rule)
        tally.lines += 1
        if incident is None:
            tally.lines_before += 1
            return
        incident.lines += 1
        incident.last = max(incident.last, wall)

    # ---- the effects, as the executor would have run them ---------------------------------------

    def _run(self, effects: Effects, now: Instant, stale: bool = False) -> None:
        """``stale``: the effects ``finished`` returned after a repair that worked; the matches kept
        meanwhile are confirmed again live and found gone."""
        repairs = [e for e in effects if isinstance(e, Repair)]
        if stale:
            for r in repairs:
                self._run(self.core.finished(r.match, r.mode, RepairEnd("none"), now), now, stale=True)
            repairs = []
        begun = [(r, self._begin(r, now)) for r in repairs]
        for effect in effects:
            if isinstance(effect, Report):
                self._report(effect, now)
            elif isinstance(effect, Later):
                self._timer(now, effect)
        for repair, incident in begun:
            self._act(repair, incident, now)

    def _timer(self, now: Instant, later: Later) -> None:
        self._later(now.monotonic + later.delay, later.what, lambda t: self._run(later.then(t), t))

    def _begin(self, e: Repair, now: Instant) -> Incident:
        rule, tally = e.match.rule, self.rules[e.match.rule.name]
        held = ""
        if e.mode == "observe" and self.policy.mode_of(rule) == "enforce" and rule.action:
            breaker = self.core.states[rule.name].breaker.state == OPEN
            held = "circuit breaker open" if breaker else "global repair budget spent"
        decided = "held" if held else "report" if not rule.action else _DECIDED[e.mode]
        would = [describe(a) for a in rule.action]
        incident = Incident(
            len(self.incidents) + 1, rule.name, e.mode, now.wall, e.match.trigger, decided, would
        )
        incident.last, incident.held = now.wall, held
        self.incidents.append(incident)
        self._latest[rule.name] = incident
        tally.incidents += 1
        tally.held += bool(held)
        tally.repairs += decided == "repair"
        incident.steps.append(Step(now.wall, "detected", f"{rule.name}: {e.match.trigger}", rule=rule.name))
        return incident

    def _act(self, e: Repair, incident: Incident, now: Instant) -> None:
        rule = e.match.rule
        verbs = {
            "report": "report only: nodemedic has no safe repair for this",
            "repair": "repairing (replayed: the repair is not made)",
            "observe": "observe mode: reporting what would be done",
            "held": f"observe only ({incident.held}): reporting what would be done",
        }
        self._step(incident, now, "decided", f"{rule.name}: {verbs[incident.decided]}", incident.decided)
        for summary in incident.would:
            self._step(incident, now, "action", f"would {summary}", "would-do")
        common = {"RULE": rule.name, "MODE": e.mode, "INCIDENT": str(incident.number)}
        if incident.decided != "repair":
            self._end(e, RepairEnd("concluded", None, common, 0.0), now)
            return
        failure = "assumed failed (--assume-failed)" if self.assume_failed else None
        end = RepairEnd("concluded", failure, common, self.repair_time * 1000.0)
        self._later(
            now.monotonic + self.repair_time,
            f"end of repair {incident.number}",
            lambda t: self._end(e, end, t),
            repair_end=True,
        )

    def _end(self, e: Repair, end: RepairEnd, now: Instant) -> None:
        stale = e.mode == "enforce" and end.failure is None and bool(e.match.rule.action)
        self._run(self.core.finished(e.match, e.mode, end, now), now, stale=stale)

    def _report(self, e: Report, now: Instant) -> None:
        rule = str(e.fields.get("RULE", ""))
        number = str(e.fields.get("INCIDENT", ""))  # ours: the RepairEnd's common fields
        incident = self.incidents[int(number) - 1] if number.isdigit() else self._latest.get(rule)
        outcome = str(e.fields.get("OUTCOME", ""))
        if e.kind == RecordKind.ESCALATED and rule in self.rules:
            self.rules[rule].breaker_opened += 1
        if incident is None:
            self.other.append(Step(now.wall, e.kind.name.lower(), e.message, outcome, rule))
            return
        if e.kind == RecordKind.OUTCOME:
            incident.outcome = outcome
        incident.breaker_opened |= e.kind == RecordKind.ESCALATED
        self._step(incident, now, e.kind.name.lower(), e.message, outcome)

    def _step(self, incident: Incident, now: Instant, kind: str, message: str, outcome: str) -> None:
        incident.steps.append(Step(now.wall, kind, message, outcome, incident.rule))
        incident.last = max(incident.last, now.wall)


def describe(params: BaseModel) -> str:
    """An action's words from its parameters alone (its check would read the node)."""
    data = params.model_dump()
    words = [str(data.get("do", type(params).__name__))]
    words += [str(data[k]) for k in ("unit", "path", "socket") if isinstance(data.get(k), str)]
    words += [str(p) for p in data.get("paths") or []]
    if isinstance(number := data.get("signal"), int):
        words.append(signal.Signals(number).name if number in set(signal.Signals) else str(number))
    if data.get("after_change"):
        words.append("(only after a change)")
    return " ".join(words)


def not_replayed(policy: Policy) -> list[dict[str, Any]]:
    """The rules with triggers the journal cannot replay, and why."""
    out = []
    for rule in policy.rule:
        others = [t for t in rule.trigger if t.served_by != "journal"]
        if not others:
            continue
        why = "; ".join(dict.fromkeys(WHY_NOT.get(t.served_by, t.served_by) for t in others))
        partly = len(others) < len(rule.trigger)
        triggers = sorted({str(getattr(t, "source", t.served_by)) for t in others})
        out.append({"rule": rule.name, "triggers": triggers, "partly": partly, "why": why})
    if policy.sighup.mode != "off":  # its records name it as their rule
        out.append({"rule": SIGHUP_GUARD, "triggers": ["signal"], "partly": False, "why": WHY_NOT["signals"]})
    return out


# ---- output ------------------------------------------------------------------------------------------


def iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return datetime.fromtimestamp(wall, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def to_json(
    replay: Replay, history: History, policy_path: Path, pending: list[tuple[float, str]]
) -> dict[str, Any]:
    """The documented, stable schema (docs/cli.md)."""

    def step(s: Step) -> dict[str, Any]:
        return {"at": iso(s.at), "kind": s.kind, "rule": s.rule, "message": s.message, "outcome": s.outcome}

    def incident(i: Incident) -> dict[str, Any]:
        data = asdict(i)
        data |= {"first": iso(i.first), "last": iso(i.last), "steps": [step(s) for s in i.steps]}
        return data

    return {
        "schema": SCHEMA,
        "policy": str(policy_path),
        "source": {
            "kind": history.kind,
            "path": history.path,
            "since": iso(history.since),
            "until": iso(history.until),
        },
        "assumptions": list(ASSUMPTIONS),
        "repair_time": replay.repair_time,
        "assume_failed": replay.assume_failed,
        "entries": replay.entries,
        "lines": replay.lines,
        "first": iso(replay.first),
        "last": iso(replay.last),
        "not_replayed": not_replayed(replay.policy),
        "incidents": [incident(i) for i in replay.incidents],
        "other": [step(s) for s in replay.other],
        "rules": [asdict(t) for t in replay.rules.values()],
        "pending": [{"at": iso(at), "what": what} for at, what in pending],
    }


OUTCOME_COLOUR = {"repaired": "green", "not-repaired": "red", "breaker-open": "red", "held": "yellow"}


def render(data: dict[str, Any], out: IO[str]) -> None:
    paint = painter(wants_colour(out))
    source = data["source"]
    where = source["path"] or "the local journal"
    span = f"{data['first']} .. {data['last']}" if data["first"] else "no entries"
    print(f"Replayed {data['entries']} entries ({span}) of {where} with {data['policy']}", file=out)
    print(f"{data['lines']} lines from or about the units followed", file=out)
    print("Assumed (the node cannot be asked):", file=out)
    for assumption in data["assumptions"]:
        print(f"  - {assumption}", file=out)
    if data["not_replayed"]:
        print("Not replayed (what fires them is not in the journal):", file=out)
    for rule in data["not_replayed"]:
        how = "only its journal triggers are replayed" if rule["partly"] else "cannot be replayed"
        print(f"  - {rule['rule']}: {how}; {', '.join(rule['triggers'])}: {rule['why']}", file=out)
    print(file=out)
    for incident in data["incidents"]:
        _render_incident(incident, paint, out)
    if not data["incidents"]:
        print("No incidents: nothing would have been detected.\n", file=out)
    for s in data["other"]:
        print(f"  {s['at']}  {s['kind']:<9} {s['message']}", file=out)
    _render_rules(data["rules"], paint, out)
    for timer in data["pending"]:
        print(f"still to come after the history's end: {timer['what']} at {timer['at']}", file=out)


def _render_incident(incident: dict[str, Any], paint: Paint, out: IO[str]) -> None:
    head = f"Incident {incident['number']}  {paint(incident['rule'], 'bold')}  {incident['mode']}"
    print(f"{head}  {incident['first']} .. {incident['last']}  {incident['lines']} line(s)", file=out)
    print(f"  trigger  {_short(incident['trigger'], 160)}", file=out)
    print(f"  would    {'; '.join(incident['would']) or '(report only)'}", file=out)
    outcome = incident["outcome"] or "?"
    if incident["decided"] == "repair":
        outcome += " (--assume-failed)" if outcome == "not-repaired" else " (assumed)"
    if incident["breaker_opened"]:
        outcome += "; circuit breaker opened"
    colour = OUTCOME_COLOUR.get(incident["outcome"], "dim")
    print(f"  outcome  {paint(outcome, 'red' if incident['breaker_opened'] else colour)}", file=out)
    for s in incident["steps"]:
        if s["kind"] == "action":
            continue  # each "would ..." is in the line above
        print(f"    {s['at']}  {s['kind']:<9} {_short(s['message'], 200)}", file=out)
    print(file=out)


def _render_rules(rules: list[dict[str, Any]], paint: Paint, out: IO[str]) -> None:
    width = max([len(r["rule"]) for r in rules] + [4])
    print(
        paint(f"{'rule':<{width}}  mode     lines  incidents  repairs  held  breaker-opened", "bold"),
        file=out,
    )
    for r in rules:
        counts = f"{r['lines']:>5}  {r['incidents']:>9}  {r['repairs']:>7}  {r['held']:>4}"
        counts += f"  {r['breaker_opened']:>14}"
        print(f"{r['rule']:<{width}}  {r['mode']:<7}  {counts}", file=out)


def _short(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Progress:
    """Entries read (and the share done, where known) on stderr, when it is a terminal."""

    def __init__(self, stream: IO[str], history: History) -> None:
        self.stream, self.history = stream, history
        self.on = stream.isatty()
        self._next = 0.0

    def tick(self, entries: int) -> None:
        if not self.on or time.monotonic() < self._next:
            return
        self._next = time.monotonic() + 0.1
        done = self.history.done()
        if done is None:
            self.stream.write(f"\rreplaying: {entries} entries read")
        else:
            bar = "#" * int(done * 30)
            self.stream.write(f"\rreplaying: [{bar:<30}] {done:4.0%} {entries} entries read")
        self.stream.flush()

    def close(self) -> None:
        if self.on:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


# ---- the command -------------------------------------------------------------------------------------


def parse_time(text: str, now: float | None = None) -> float:
    """A time as journalctl takes it: "2024-05-01 10:00[:00]", ISO 8601 (with Z or an offset; without
    one, local time), "@EPOCH", "now", "today", "yesterday", or relative: "-1h", "30m ago", "+5m"."""
    now = time.time() if now is None else now
    word = text.strip().lower()
    midnight = datetime.fromtimestamp(now).replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
    named = {"now": now, "today": midnight, "yesterday": midnight - 86400, "tomorrow": midnight + 86400}
    if word in named:
        return named[word]
    if word.startswith("@"):
        return float(word[1:])
    if relative := _RELATIVE.match(word):
        sign, amount, unit, ago = relative.groups()
        seconds = float(amount) * 86400 if unit == "d" else parse_duration(f"{amount}{unit}")
        return now + seconds if sign == "+" and not ago else now - seconds
    moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return moment.timestamp()  # a naive time is local time, as journalctl reads it


def _time_arg(text: str) -> float:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: write e.g. '2024-05-01 10:00', '2024-05-01T10:00:00Z', "
            "'-2h' or 'yesterday'"
        ) from exc


def _duration_arg(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = sub.add_parser(
        "replay",
        help="run a policy over journal history: what it would have detected and done",
        description=(
            "Run a policy over journal history (this node's journal, a journal file, or a "
            "`journalctl -o export` stream from another node) and print, in order, what nodemedic "
            "would have detected and done, incidents grouped, and a summary per rule. Nothing on "
            "this node is changed. The node cannot be asked: each rule's confirm condition is "
            "taken to hold, and a repair to work (or fail, --assume-failed). Exit 0 when replayed "
            "(incidents found or not), 2 when the journal or file cannot be read."
        ),
    )
    cmd.add_argument("--policy", type=Path, default=DEFAULT_POLICY, help="policy to try (%(default)s)")
    cmd.add_argument(
        "--file", metavar="PATH", help="a journal file, or a `journalctl -o export` stream ('-': stdin)"
    )
    cmd.add_argument(
        "--since",
        type=_time_arg,
        metavar="TIME",
        help="from this time on ('2024-05-01 10:00', --since=-2h, '2h ago')",
    )
    cmd.add_argument("--until", type=_time_arg, metavar="TIME", help="up to this time")
    cmd.add_argument(
        "--assume-failed", action="store_true", help="every repair fails (see backoff and breakers)"
    )
    cmd.add_argument(
        "--repair-time",
        type=_duration_arg,
        default=DEFAULT_REPAIR_TIME,
        metavar="DURATION",
        help="how long a repair is taken to last: lines meanwhile belong to it (default 10s)",
    )
    cmd.add_argument("--json", action="store_true", help="print the result as JSON (schema 1, docs/cli.md)")
    cmd.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    policy = load_policy(args.policy, check_owner=False)  # replay changes nothing: a draft may be tried
    history = History(args.file, args.since, args.until)
    replay = Replay(policy, args.repair_time, args.assume_failed)
    progress = Progress(sys.stderr, history)
    try:
        for entry in history.entries(policy.daemon.journal_units):
            replay.feed(entry)
            progress.tick(replay.entries)
    except (ReplayInputError, OSError) as exc:
        progress.close()
        print(f"nodemedic replay: cannot read {history.describe()}: {exc}", file=sys.stderr)
        return 2
    progress.close()
    end = args.until if args.until is not None else (time.time() if args.file is None else None)
    data = to_json(replay, history, args.policy, replay.finish(end))
    if args.json:
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        render(data, sys.stdout)
    return 0
