"""`nodemedic diagnose`: a one-shot, read-only triage of this node now.

Each check reads the node with the daemon's own parts (fs.path_kind, sources/dbus.py or
``systemctl show``, sources/probe.py, configs.py, actions/shims.py's proof, procfs.py, the journal
source's attribution) and turns what it found into the events the daemon's sources would emit.
Those events go through the real matcher and decision core (policy.match, core/rules.py
``RuleCore`` with the breakers, backoff and budget of state.json), and each match is confirmed
against what the checks found, as the executor would confirm it. So the rule named is the one
nodemedic would act with, in the mode it would act in. Nothing is changed: no repair, no state
file, no record; state.json is read, never set aside.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from nodemedic.actions.shims import LEFT_OVER, KillOrphanedShims
from nodemedic.app import GOOD_CONFIGS
from nodemedic.clock import MonotonicClock
from nodemedic.configs import GoodConfigs, config_problem
from nodemedic.core.effects import Effect, Instant, Repair, Report, Settle
from nodemedic.core.nodeview import NodeView
from nodemedic.core.rules import RepairEnd, RuleCore
from nodemedic.errors import (
    ConfigCheckError,
    ConfigFileError,
    NodemedicError,
    PolicyError,
    ProbeError,
    UnitControlError,
)
from nodemedic.events import (
    Event,
    FdUsage,
    FileChanged,
    GrpcStreamsSetting,
    JournalLine,
    PathChanged,
    PathKind,
    PressureSeen,
    ProbeFailed,
    SocketModeSeen,
    UnitChanged,
    VersionSeen,
)
from nodemedic.fs import path_kind
from nodemedic.policy.actions import KillOrphanedShimsParams
from nodemedic.policy.load import DEFAULT_POLICY, load_policy
from nodemedic.policy.match import Match, match
from nodemedic.policy.model import (
    Confirm,
    FdTrigger,
    GrpcStreamsTrigger,
    OomTrigger,
    PathTrigger,
    Policy,
    PressureTrigger,
    ProbeTrigger,
    Rule,
    SocketModeTrigger,
    VersionTrigger,
)
from nodemedic.ports import VersionProbe
from nodemedic.procfs import ProcView, is_unit_cgroup, open_fds, read_pressure, soft_nofile, unit_cgroup
from nodemedic.sources.dbus import SystemdBus
from nodemedic.sources.journal import add_matches, line_from_entry
from nodemedic.sources.probe import ContainerdProbe
from nodemedic.sources.resources import streams_setting
from nodemedic.store import STATE_FILE, StateStore
from nodemedic.tools.paint import painter, wants_colour

Status = Literal["ok", "problem", "unknown"]
SCHEMA = 1
HOUR = 3600.0
NODEMEDIC = "nodemedic.service"
BUS_WAIT = 3.0  # the system bus answers in milliseconds; past this, systemctl is asked instead
SYSTEMCTL_PROPS = "LoadState,ActiveState,SubState,Result,NRestarts,ExecMainPID,MainPID"
MAX_ENTRIES = 200_000  # journal entries of the last hour read at most (a very chatty node)
SHOWN_LINES = 10  # matching journal lines shown per check
# systemd's catalog ids (sd-messages.h): a start job begun, a unit started, a restart scheduled
UNIT_STARTING = "7d4958e842da4a758f6c1cdc7b36dcc5"
UNIT_STARTED = "39f53479d3a045ac8e11786248231fbf"
UNIT_RESTART_SCHEDULED = "5eb03494b6584870a536b337290809b3"
PRESSURE_RESOURCES = ("cpu", "memory", "io")
ADVISORY_TRIGGERS = (VersionTrigger, GrpcStreamsTrigger)  # a standing fact of the node, not a fault
EXIT_HEALTHY, EXIT_PROBLEM, EXIT_UNKNOWN = 0, 1, 2
_LINE = re.compile(r"^\d+: ")  # a policy problem that starts with its line: file:line: problem

UnitsReader = Callable[[list[str]], Awaitable[tuple[dict[str, UnitChanged], str]]]
JournalReader = Callable[[list[str], float], list[Mapping[str, object]]]


# ---- what a diagnosis is -------------------------------------------------------------------------


@dataclass(slots=True)
class Check:
    """One reading of the node: ``ok``, ``problem`` or ``unknown`` (it could not be read)."""

    name: str
    status: Status
    evidence: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Case:
    """A named fault (or an advisory), the rule that would act on it and what it would do, and what
    a human should run. ``fault`` False: an advisory (a version with known bugs), not a problem."""

    name: str
    rule: str
    would: str
    advice: str
    evidence: list[str] = field(default_factory=list)
    fault: bool = True


@dataclass(slots=True)
class Diagnosis:
    """Every check and the cases named from them."""

    checks: list[Check]
    cases: list[Case]

    def exit_code(self) -> int:
        if any(c.fault for c in self.cases) or any(c.status == "problem" for c in self.checks):
            return EXIT_PROBLEM
        return EXIT_UNKNOWN if any(c.status == "unknown" for c in self.checks) else EXIT_HEALTHY

    def result(self) -> str:
        return {EXIT_HEALTHY: "healthy", EXIT_PROBLEM: "problem", EXIT_UNKNOWN: "unknown"}[self.exit_code()]

    def to_json(self, policy_path: str) -> dict[str, Any]:
        """Schema 1 (docs/cli.md): stable keys; new keys may be added, none removed or renamed."""
        return {
            "schema": SCHEMA,
            "result": self.result(),
            "exit": self.exit_code(),
            "policy": policy_path,
            "checks": [{"name": c.name, "status": c.status, "evidence": c.evidence} for c in self.checks],
            "cases": [
                {
                    "name": c.name,
                    "rule": c.rule,
                    "would": c.would,
                    "advice": c.advice,
                    "evidence": c.evidence,
                    "fault": c.fault,
                }
                for c in self.cases
            ],
        }


@dataclass(slots=True)
class Edges:
    """Where diagnose reads the node: the seams unit tests replace (systemd, the probe, the
    journal, /proc and the cgroup tree, the clock)."""

    units: UnitsReader
    probe: VersionProbe
    journal: JournalReader
    proc: Path = Path("/proc")
    cgroup_root: Path = Path("/sys/fs/cgroup")
    wall: Callable[[], float] = time.time
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep


@dataclass(slots=True)
class Facts:
    """What the checks found, for the next checks and for confirming the rules' matches."""

    units: dict[str, UnitChanged] = field(default_factory=dict)
    units_how: str = ""
    units_problem: str = ""
    journal: list[tuple[float, JournalLine, Mapping[str, object]]] | None = None
    journal_problem: str = ""
    since: float = 0.0  # containerd's last start attempt (or an hour ago): "now" begins there
    kinds: dict[str, PathKind] = field(default_factory=dict)
    probe_error: str | None = None
    configs: dict[str, str | None] = field(default_factory=dict)  # path -> why refused (None: loads)
    unchecked: dict[str, str] = field(default_factory=dict)  # path -> why no verdict
    good_copy: Path | None = None
    orphans: set[int] = field(default_factory=set)
    journal_rules: set[str] = field(default_factory=set)  # rules that lines since ``since`` match
    events: list[Event] = field(default_factory=list)

    def main_pid(self, unit: str) -> int:
        seen = self.units.get(unit)
        return seen.main_pid if seen is not None and seen.active_state != "inactive" else 0

    def active(self, unit: str) -> bool:
        seen = self.units.get(unit)
        return seen is not None and seen.active_state == "active"


# ---- the edges: systemd and the journal ------------------------------------------------------------


async def read_units(units: list[str]) -> tuple[dict[str, UnitChanged], str]:
    """Each unit's state over D-Bus (the daemon's own SystemdBus), else from `systemctl show`
    (which, as root, reaches systemd over its private socket while the bus is down); and how."""
    try:
        return await _units_over_dbus(units, BUS_WAIT), "D-Bus"
    except (UnitControlError, OSError) as exc:
        bus_problem = str(exc)
    try:
        found = await asyncio.to_thread(_units_over_systemctl, units)
    except (UnitControlError, OSError, subprocess.SubprocessError) as exc:
        raise UnitControlError(f"neither D-Bus ({bus_problem}) nor systemctl ({exc}) answered") from exc
    return found, f"systemctl (D-Bus: {bus_problem})"


async def _units_over_dbus(units: list[str], wait: float) -> dict[str, UnitChanged]:
    """The states SystemdBus emits once connected; its first failure to connect ends the wait."""
    seen: dict[str, UnitChanged] = {}
    failed, why = asyncio.Event(), list[str]()

    def emit(event: Event) -> None:
        if isinstance(event, UnitChanged):
            seen[event.unit] = event

    def said(message: str) -> None:
        if not bus.connected.is_set():
            why.append(message.split("; retrying")[0])
            failed.set()

    bus = SystemdBus(units, emit, MonotonicClock(), on_state=said)
    tasks = [asyncio.ensure_future(w) for w in (bus.run(), bus.connected.wait(), failed.wait())]
    try:
        await asyncio.wait(tasks[1:], timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        connected = bus.connected.is_set()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await bus.close()
    if not connected:
        raise UnitControlError(why[0] if why else f"no answer on the system bus within {wait:g}s")
    return seen


def _units_over_systemctl(units: list[str]) -> dict[str, UnitChanged]:
    exe = shutil.which("systemctl")
    if exe is None:
        raise UnitControlError("systemctl is not installed")
    found = {}
    for unit in units:
        done = subprocess.run(  # noqa: S603 (a fixed program, our own arguments)
            [exe, "show", "-p", SYSTEMCTL_PROPS, "--", unit],
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if done.returncode != 0:
            said = " ".join(done.stderr.split()) or f"exit {done.returncode}"
            raise UnitControlError(f"`systemctl show {unit}`: {said}")
        found[unit] = unit_from_show(unit, done.stdout)
    return found


def unit_from_show(unit: str, text: str) -> UnitChanged:
    """A unit's state from `systemctl show -p ...` output (KEY=VALUE lines)."""
    props = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    return UnitChanged(
        unit=unit,
        active_state=props.get("ActiveState", ""),
        sub_state=props.get("SubState", ""),
        result=props.get("Result", ""),
        n_restarts=_number(props.get("NRestarts")),
        main_pid=_number(props.get("MainPID")),
        load_state=props.get("LoadState", ""),
        source="systemctl",
    )


def read_journal(units: list[str], since: float) -> list[Mapping[str, object]]:
    """The entries from or about ``units`` since the wall time ``since``, selected as the journal
    source selects them; which unit each belongs to is `attribute`'s judgement, later."""
    from systemd import journal

    reader = journal.Reader()
    try:
        add_matches(reader, units)
        reader.seek_realtime(since)
        return list(itertools.islice(reader, MAX_ENTRIES))
    finally:
        reader.close()


def _number(value: object) -> int:
    try:
        return int(str(value)) if value is not None and not isinstance(value, bool) else 0
    except ValueError:
        return 0


def _wall(entry: Mapping[str, object]) -> float:
    """An entry's wall-clock time (systemd's reader gives a datetime, tests a number)."""
    stamp = entry.get("__REALTIME_TIMESTAMP")
    if hasattr(stamp, "timestamp"):
        return float(stamp.timestamp())
    return float(stamp) if isinstance(stamp, int | float) else 0.0


def _message_id(entry: Mapping[str, object]) -> str:
    value = entry.get("MESSAGE_ID")
    return str(getattr(value, "hex", value) or "")


def _from_systemd(entry: Mapping[str, object], unit: str, catalog: str, text: str) -> bool:
    """A line of systemd's own (PID 1) about ``unit``: by its catalog id, or by its text."""
    if _number(entry.get("_PID")) != 1 or entry.get("UNIT") != unit:
        return False
    message = str(entry.get("MESSAGE") or "")
    return _message_id(entry) == catalog or message.startswith(text) or f": {text}" in message


# ---- the checks -------------------------------------------------------------------------------------


def containerd_unit(policy: Policy) -> str:
    return policy.daemon.resources.unit


async def read_units_into(policy: Policy, edges: Edges, facts: Facts) -> None:
    units = list(dict.fromkeys([*policy.daemon.watch_units, containerd_unit(policy), NODEMEDIC]))
    try:
        facts.units, facts.units_how = await edges.units(units)
    except (NodemedicError, OSError) as exc:
        facts.units_problem = f"cannot read the units' states: {exc}"
        return
    facts.events.extend(facts.units.values())


async def read_journal_into(policy: Policy, edges: Edges, facts: Facts) -> None:
    """The last hour of the followed units' lines; "now" begins at containerd's last start job."""
    units = list(dict.fromkeys([*policy.daemon.journal_units, containerd_unit(policy)]))
    hour_ago = edges.wall() - HOUR
    facts.since = hour_ago
    try:
        entries = await asyncio.to_thread(edges.journal, units, hour_ago)
    except (ImportError, OSError, ValueError) as exc:
        facts.journal_problem = f"cannot read the journal: {exc}"
        return
    facts.journal = []
    unit = containerd_unit(policy)
    for entry in entries:
        line = line_from_entry(entry, units, at=0.0)
        if line is None:
            continue
        facts.journal.append((_wall(entry), line, entry))
        if _from_systemd(entry, unit, UNIT_STARTING, "Starting "):
            facts.since = max(facts.since, _wall(entry))


def unit_check(policy: Policy, facts: Facts) -> Check:
    unit = containerd_unit(policy)
    restarts = _restarts(facts, unit)
    seen = facts.units.get(unit)
    if seen is None:
        return Check("unit", "unknown", [facts.units_problem or f"{unit}: no state read", restarts])
    result = f", result {seen.result}" if seen.result not in ("", "success") else ""
    said = (
        f"{unit} is {seen.active_state}/{seen.sub_state}{result}, MainPID {seen.main_pid}, "
        f"NRestarts {seen.n_restarts} (read over {facts.units_how})"
    )
    if seen.load_state in ("masked", "not-found"):
        return Check("unit", "problem", [f"{unit} is {seen.load_state}: systemd will not start it", restarts])
    return Check("unit", "ok" if seen.active_state == "active" else "problem", [said, restarts])


def _restarts(facts: Facts, unit: str) -> str:
    if facts.journal is None:
        return f"restarts in the last hour unknown: {facts.journal_problem}"
    entries = [entry for _, _, entry in facts.journal]
    started = sum(_from_systemd(e, unit, UNIT_STARTED, "Started ") for e in entries)
    scheduled = sum(_from_systemd(e, unit, UNIT_RESTART_SCHEDULED, "Scheduled restart job") for e in entries)
    return f"in the last hour: started {started} time(s), {scheduled} automatic restart(s) scheduled"


def paths_check(policy: Policy, facts: Facts) -> Check:
    """The kind of each of containerd's socket paths the policy watches (lstat, no symlink followed)."""
    paths = list(dict.fromkeys([*policy.watched_paths(), policy.daemon.probe.socket]))
    runs = facts.active(containerd_unit(policy))
    evidence, bad = [], False
    for path in paths:
        kind = facts.kinds[path] = path_kind(path)
        facts.events.append(PathChanged(path, kind))
        wrong = kind not in (PathKind.SOCKET, PathKind.MISSING) or (kind is PathKind.MISSING and runs)
        note = " (containerd runs: it should be its socket)" if wrong and kind is PathKind.MISSING else ""
        evidence.append(f"{path}: {kind.value}{note}")
        bad = bad or wrong
    return Check("paths", "problem" if bad else "ok", evidence)


async def probe_check(policy: Policy, edges: Edges, facts: Facts) -> Check:
    """Version requests, as many in a row as the policy's probe triggers need to fire, and the
    confirming request where their rule confirms with the probe (as the daemon asks them)."""
    probe = policy.daemon.probe
    tries = max(
        (
            t.failures + (1 if r.confirm is not None and r.confirm.probe else 0)
            for r in policy.rule
            for t in r.trigger
            if isinstance(t, ProbeTrigger)
        ),
        default=1,
    )
    for attempt in range(1, tries + 1):
        try:
            version = await edges.probe.version(probe.socket, probe.timeout)
        except ProbeError as exc:
            facts.probe_error = str(exc)
            facts.events.append(ProbeFailed(probe.socket, str(exc), attempt))
            if attempt < tries:
                await edges.sleep(probe.interval)
            continue
        facts.probe_error = None
        facts.events.append(VersionSeen(version))
        return Check("probe", "ok", [f"containerd {version} answers a Version request on {probe.socket}"])
    said = f"no answer to {tries} Version request(s) in a row on {probe.socket} ({probe.timeout:g}s each)"
    return Check("probe", "problem", [f"{said}: {facts.probe_error}"])


def _config_paths(policy: Policy) -> list[str]:
    paths = [policy.daemon.config_backup.path]
    paths += [r.confirm.config_broken for r in policy.rule if r.confirm and r.confirm.config_broken]
    return list(dict.fromkeys(paths))


async def config_check(policy: Policy, facts: Facts) -> Check:
    """containerd's own verdict on config.toml (configs.config_problem), and the good copies."""
    evidence: list[str] = []
    status: Status = "ok"
    for path in _config_paths(policy):
        try:
            problem = await config_problem(Path(path))
        except (ConfigFileError, ConfigCheckError) as exc:
            facts.unchecked[path] = str(exc)
            evidence.append(f"{path}: no verdict: {exc}")
            status = "unknown" if status == "ok" else status
            continue
        facts.configs[path] = problem
        if problem is None:
            evidence.append(f"{path}: containerd loads it")
        else:
            evidence.append(f"{path}: containerd would refuse it: {problem}")
            facts.events.append(FileChanged(path))
            status = "problem"
    evidence.append(_good_copies(policy, facts))
    evidence += _grpc_streams(policy, facts)
    return Check("config", status, evidence)


def _good_copies(policy: Policy, facts: Facts) -> str:
    folder = policy.daemon.state_dir / GOOD_CONFIGS
    try:
        copies = GoodConfigs(folder, policy.daemon.config_backup.keep).copies()
    except OSError as exc:
        return f"last-known-good copies in {folder} cannot be listed: {exc.strerror or exc}"
    if not copies:
        return f"no last-known-good copy in {folder}"
    facts.good_copy = copies[0]
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(copies[0].stat().st_mtime))
    return f"{len(copies)} last-known-good cop{'y' if len(copies) == 1 else 'ies'} in {folder}, newest {when}"


def _grpc_streams(policy: Policy, facts: Facts) -> list[str]:
    said = []
    for path in sorted(
        {t.config for r in policy.rule for t in r.trigger if isinstance(t, GrpcStreamsTrigger)}
    ):
        value = streams_setting(Path(path))
        if value is not None:
            facts.events.append(GrpcStreamsSetting(path, value))
        if value:
            said.append(f"{path} sets [grpc] max_concurrent_streams = {value} (containerd ignores it)")
    return said


def shim_proof(policy: Policy) -> KillOrphanedShims:
    """The proof of the policy's kill-orphaned-shims action, with its settings (or the defaults)."""
    kills = [a for r in policy.rule for a in r.action if isinstance(a, KillOrphanedShimsParams)]
    return KillOrphanedShims(kills[0] if kills else KillOrphanedShimsParams(do="kill-orphaned-shims"))


def shims_check(policy: Policy, facts: Facts) -> Check:
    """Shims systemd named in the last hour ("Found left-over process") and those now in
    containerd's cgroup, each judged by the kill action's own proof."""
    proof = shim_proof(policy)
    named = {
        int(pid)
        for _, line, _ in facts.journal or []
        if line.unit == proof.params.unit
        for pid, _ in LEFT_OVER.findall(line.message)
    }
    view = ProcView(Path(proof.params.proc))
    found = {
        pid
        for pid in view.pids()
        if (view.comm(pid) or "").startswith("containerd-shim")
        and is_unit_cgroup(view.cgroup(pid) or "", proof.params.unit)
    }
    evidence = []
    for pid in sorted(named | found):
        why = proof.not_orphaned(pid)
        if why == "no such process" and pid not in found:
            continue  # named earlier, gone since
        how = "named by systemd" if pid in named else f"in {proof.params.unit}'s cgroup"
        if why is None:
            facts.orphans.add(pid)
        evidence.append(f"shim {pid} ({how}): " + ("proven orphan" if why is None else f"kept: {why}"))
    if not evidence:
        evidence.append(
            f"no left-over shim named by systemd in the last hour or in {proof.params.unit}'s cgroup"
        )
    if facts.journal is None:
        evidence.append(f"the journal was not read: {facts.journal_problem}")
    return Check("shims", "problem" if facts.orphans else "ok", evidence)


def fds_check(policy: Policy, edges: Edges, facts: Facts) -> Check:
    """containerd's open file descriptors against its soft RLIMIT_NOFILE (procfs)."""
    unit = containerd_unit(policy)
    pid = facts.main_pid(unit)
    if pid <= 0:
        status: Status = "unknown" if facts.units_problem else "ok"
        return Check("fds", status, [f"{unit} has no main process: no descriptors to count"])
    try:
        limit, count = soft_nofile(edges.proc, pid), open_fds(edges.proc, pid)
    except PermissionError as exc:
        why = f"cannot count the fds of {unit} (PID {pid}): {exc.strerror}: run as root (CAP_SYS_PTRACE)"
        return Check("fds", "unknown", [why])
    except (OSError, ValueError) as exc:
        return Check("fds", "unknown", [f"cannot count the fds of {unit} (PID {pid}): {exc}"])
    facts.events.append(FdUsage(unit, pid, count, limit))
    fraction = min(
        (t.fraction for r in policy.rule for t in r.trigger if isinstance(t, FdTrigger)), default=0.8
    )
    if limit <= 0:
        return Check("fds", "ok", [f"{unit} (PID {pid}): {count} fds open, no limit"])
    share = count / limit
    said = f"{unit} (PID {pid}): {count} of {limit} fds open ({share:.0%}; threshold {fraction:.0%})"
    return Check("fds", "problem" if share > fraction else "ok", [said])


def pressure_check(policy: Policy, edges: Edges, facts: Facts) -> Check:
    """PSI avg10, host-wide and in containerd's cgroup, against the policy's pressure triggers."""
    readings, unread = [], []
    pid = facts.main_pid(containerd_unit(policy))
    for resource in PRESSURE_RESOURCES:
        host = edges.proc / "pressure" / resource
        places = [("host", host if host.exists() else edges.cgroup_root / f"{resource}.pressure")]
        if pid > 0:
            with contextlib.suppress(OSError, ValueError):
                cgroup = unit_cgroup(edges.proc, edges.cgroup_root, pid)
                places.append(("containerd", cgroup / f"{resource}.pressure"))
        for scope, path in places:
            try:
                some, full = read_pressure(path)
            except (OSError, ValueError) as exc:
                unread.append(f"{path}: {getattr(exc, 'strerror', None) or exc}")
                continue
            readings.append(PressureSeen(scope, resource, some, full, str(path)))
    facts.events.extend(readings)
    triggers = [t for r in policy.rule for t in r.trigger if isinstance(t, PressureTrigger)]
    fired = [why for seen in readings for t in triggers if (why := t.fires(seen))]
    evidence = [
        f"{s.scope} {s.resource}: some {s.some_avg10:.2f} % full {s.full_avg10:.2f} % (avg10)"
        for s in readings
    ]
    if not readings:
        return Check("pressure", "unknown", ["no PSI reading (a kernel without PSI?)", *unread])
    return Check("pressure", "problem" if fired else "ok", fired + evidence)


def socket_mode_check(policy: Policy, facts: Facts) -> Check:
    """The sockets' permission bits and owner, against the policy's socket-mode triggers."""
    triggers = [t for r in policy.rule for t in r.trigger if isinstance(t, SocketModeTrigger)]
    paths = sorted({t.path for t in triggers} or {policy.daemon.probe.socket})
    evidence, fired = [], []
    for path in paths:
        try:
            st = os.lstat(path)
        except OSError as exc:
            evidence.append(f"{path}: {exc.strerror}")
            continue
        if not stat.S_ISSOCK(st.st_mode):
            evidence.append(f"{path}: not a socket")
            continue
        seen = SocketModeSeen(path, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
        facts.events.append(seen)
        evidence.append(f"{path}: mode {seen.mode:04o} owner {seen.uid}:{seen.gid}")
        fired += [why for t in triggers if (why := t.fires(seen))]
    return Check("socket-mode", "problem" if fired else "ok", fired + evidence)


def journal_check(policy: Policy, facts: Facts) -> Check:
    """The last hour's lines that match the policy's journal triggers (the real matcher); those
    since containerd's last start job are the present, and go to the decision."""
    if facts.journal is None:
        return Check("journal", "unknown", [facts.journal_problem])
    now: list[str] = []
    before: list[str] = []
    for wall, line, _ in facts.journal:
        if wall >= facts.since:
            facts.events.append(line)
        rules = [m.rule.name for m in match(policy.rule, line)]
        if rules and wall >= facts.since:
            facts.journal_rules.update(rules)
        if rules:
            said = f"{_clock(wall)} {line.unit}: {line.message[:300]} (rule {', '.join(rules)})"
            (now if wall >= facts.since else before).append(said)
    evidence = [f"{len(facts.journal)} line(s) of the followed units in the last hour; {len(now)} match now"]
    evidence += now[-SHOWN_LINES:]
    if before:
        evidence.append(f"{len(before)} older match(es), before containerd's last start; the last:")
        evidence += before[-3:]
    return Check("journal", "ok", evidence)


def _clock(wall: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(wall))


def nodemedic_check(policy: Policy, facts: Facts, saved: Mapping[str, Any], saved_problem: str) -> Check:
    """Whether the daemon runs, its mode, and what state.json says of the breakers and the budget."""
    seen = facts.units.get(NODEMEDIC)
    state = "unknown" if seen is None else f"{seen.active_state}/{seen.sub_state}"
    evidence = [f"{NODEMEDIC} is {state}; [daemon] mode {policy.daemon.mode}"]
    if seen is not None and seen.active_state != "active":
        evidence.append("nothing is repaired while it does not run (systemctl start nodemedic)")
    for name, rule_state in sorted(saved.get("rules", {}).items()):
        breaker = rule_state.get("breaker", {}) if isinstance(rule_state, dict) else {}
        if isinstance(breaker, dict) and breaker.get("state") not in (None, "closed"):
            evidence.append(f"rule {name}: breaker {breaker.get('state')} (state.json)")
    if saved_problem:
        evidence.append(saved_problem)
    return Check("nodemedic", "ok", evidence)


def saved_state(state_dir: Path) -> tuple[dict[str, Any], str]:
    """state.json, read only: a damaged file is said, never moved aside (the daemon does that)."""
    data, why = StateStore(state_dir).peek()
    if why:
        return (
            {},
            f"{state_dir / STATE_FILE} cannot be used ({why}): the daemon would set it aside and start clean",
        )
    return data, ""


# ---- the decision: the real core on what the checks found ---------------------------------------------


@dataclass(slots=True)
class Decision:
    """What the rules' core decided for one rule: the mode of the repair it asked for ("" if
    none), what fired it, what it said (held, backing off, an operator's stop), and whether any
    of its matches holds against the node now (``confirmed``)."""

    rule: Rule
    mode: str = ""
    trigger: str = ""
    notes: list[str] = field(default_factory=list)
    confirmed: bool = False
    stale: list[str] = field(default_factory=list)


def not_confirmed(m: Match, facts: Facts) -> str | None:
    """Why ``m``'s confirm condition does not hold on what the checks found (None: it holds), as
    the executor asks the node: paths, named orphans, containerd's verdict on its config, the probe."""
    confirm = m.rule.confirm
    if confirm is None:
        return None
    if confirm.paths and not any(facts.kinds.get(p, path_kind(p)) == confirm.kind for p in confirm.paths):
        return f"none of {', '.join(confirm.paths)} is a {confirm.kind.value if confirm.kind else '?'} now"
    if confirm.orphaned_shims:
        named = {int(pid) for pid, _ in LEFT_OVER.findall(getattr(m.event, "message", ""))}
        if not named & facts.orphans:
            return "it names no shim proven orphaned now"
    if confirm.config_broken:
        path = confirm.config_broken
        if path in facts.unchecked:
            return f"no verdict on {path}: {facts.unchecked[path]}"
        if facts.configs.get(path) is None:
            return f"{path} loads now"
    if confirm.probe and facts.probe_error is None:
        return "containerd answers now"
    return None


def decide(policy: Policy, saved: Mapping[str, Any], facts: Facts, now: Instant) -> list[Decision]:
    """Feed every event to a RuleCore (breakers, backoff and budget from state.json) as the
    executor would, the node view first; each match is confirmed against ``facts``."""
    core = RuleCore(policy, NodeView())
    with contextlib.suppress(KeyError, TypeError, ValueError, AttributeError):
        core.restore(dict(saved))  # what the daemon would set aside, it would also start without
    decisions: dict[str, Decision] = {}
    for event in facts.events:
        for m in match(policy.rule, event):
            found = decisions.setdefault(m.rule.name, Decision(m.rule))
            why = not_confirmed(m, facts)
            found.confirmed = found.confirmed or why is None
            if why is not None:
                found.stale.append(f"{m.trigger[:200]}: {why}")
        core.view.see(event)
        _effects(core, core.handle(event, now), decisions, facts, now)
    return [d for d in decisions.values() if d.confirmed and (d.mode or d.notes)]


def _effects(
    core: RuleCore, effects: list[Effect], found: dict[str, Decision], facts: Facts, now: Instant
) -> None:
    queue = deque(effects)
    while queue:
        effect = queue.popleft()
        if isinstance(effect, Report) and isinstance(effect.fields.get("RULE"), str):
            rule = core.rule(str(effect.fields["RULE"]))
            if rule is not None:
                found.setdefault(rule.name, Decision(rule)).notes.append(effect.message)
        elif isinstance(effect, Repair):
            m = effect.match
            decision = found.setdefault(m.rule.name, Decision(m.rule))
            if not_confirmed(m, facts) is None and not decision.mode:
                decision.mode, decision.trigger = effect.mode, m.trigger
            else:  # stale: the executor would find nothing to do, and the rule may decide again
                queue.extend(core.finished(m, effect.mode, RepairEnd("none"), now))
        elif isinstance(effect, Settle):  # the file as it is now is the file as it will be judged
            queue.extend(effect.then(now))


# ---- naming the cases -----------------------------------------------------------------------------


def case_name(rule: Rule) -> str:
    """The field guide's name of the fault a rule is about, from its shape (confirm and triggers)."""
    confirm = rule.confirm or Confirm()
    kinds = tuple(type(t) for t in rule.trigger)
    directory = confirm.kind is PathKind.DIRECTORY or any(
        isinstance(t, PathTrigger) and t.kind is PathKind.DIRECTORY for t in rule.trigger
    )
    shapes = (
        (confirm.orphaned_shims, "left-over shims"),
        (confirm.config_broken is not None, "broken config"),
        (directory, "socket directory"),
        (confirm.probe or ProbeTrigger in kinds, "hang"),
        (FdTrigger in kinds, "fd exhaustion"),
        (SocketModeTrigger in kinds, "socket mode"),
        (PressureTrigger in kinds or OomTrigger in kinds, "pressure"),
        (VersionTrigger in kinds, "known bugs"),
        (GrpcStreamsTrigger in kinds, "grpc streams"),
    )
    return next((name for holds, name in shapes if holds), rule.name)


def is_advisory(rule: Rule) -> bool:
    """A rule about a standing fact (a version, a config key), not a fault of the node."""
    return all(isinstance(t, ADVISORY_TRIGGERS) for t in rule.trigger)


_BY_HAND: dict[str, Callable[[Any, Facts], str]] = {
    "stop-unit": lambda a, f: f"systemctl stop {a.unit}",
    "start-unit": lambda a, f: f"systemctl start {a.unit}",
    "restart-unit": lambda a, f: f"systemctl restart {a.unit}",
    "signal-unit": lambda a, f: f"systemctl kill --kill-whom=main -s {a.signal} {a.unit}",
    "remove-socket-dir": lambda a, f: (
        "move aside what is not a socket: "
        + " ".join(f"mv {p} /root/" for p in a.paths if f.kinds.get(p, path_kind(p)) is PathKind.DIRECTORY)
    ),
    "verify-containerd": lambda a, f: f"ctr --address {a.socket} version",
    "restore-config": lambda a, f: f"cp {f.good_copy or '<a known-good copy>'} {a.path}",
    "kill-orphaned-shims": lambda a, f: "kill " + (" ".join(map(str, sorted(f.orphans))) or "<PIDs>"),
    "raise-nofile-limit": lambda a, f: (
        f"a drop-in for {a.unit} with LimitNOFILE={a.limit}, "
        f"systemctl daemon-reload, systemctl restart {a.unit}"
    ),
    "restore-socket-mode": lambda a, f: f"chmod {a.mode} {a.path}",
}


def by_hand(rule: Rule, facts: Facts) -> str:
    """The rule's advice, else its actions as the commands an operator would run."""
    if rule.advice:
        return rule.advice
    steps = [_BY_HAND[a.do](a, facts) if a.do in _BY_HAND else a.do for a in rule.action]
    return "; ".join(steps) or rule.description


def rule_case(d: Decision, policy: Policy, facts: Facts) -> Case:
    rule = d.rule
    evidence = ([f"fired: {d.trigger[:300]}"] if d.trigger else []) + d.notes
    steps = " -> ".join(a.do for a in rule.action)
    runs = facts.active(NODEMEDIC)
    later = "" if runs else f" once {NODEMEDIC} runs (it does not now: systemctl start nodemedic)"
    case = Case(case_name(rule), rule.name, "", "", evidence, fault=not is_advisory(rule))
    if not rule.action:
        case.would, case.advice = f"report only{later}: a record, nothing changed", by_hand(rule, facts)
    elif not d.mode:
        case.would, case.advice = "nothing now: " + "; ".join(d.notes), by_hand(rule, facts)
    elif d.mode == "enforce":
        case.would = f"enforce{later}: {steps}"
        case.advice = "" if runs else f"systemctl start nodemedic, or by hand: {by_hand(rule, facts)}"
    else:
        case.would = f"observe{later}: would {steps}; changes nothing"
        case.advice = f"{_why_observe(rule, policy, d)}; by hand: {by_hand(rule, facts)}"
    return case


def _why_observe(rule: Rule, policy: Policy, d: Decision) -> str:
    if policy.mode_of(rule) == "enforce":  # held: its breaker is open, or the budget is spent
        return d.notes[-1] if d.notes else "held by its breaker or the repair budget"
    if rule.mode == "observe":
        return (
            f'rule {rule.name} is in observe mode (set its mode = "enforce" in the policy to let it repair)'
        )
    return "nodemedic is in observe mode (`nodemedic mode enforce` lets it repair)"


# What each problem check is, where no rule's case covers it, and what a human can run.
_UNCOVERED = {
    "unit": (
        "containerd down",
        "systemctl status containerd; journalctl -u containerd -n 50; systemctl start containerd",
    ),
    "paths": (
        "socket path",
        "ls -la /run/containerd; stop containerd, move aside what is not its socket, start it",
    ),
    "probe": (
        "hang",
        "systemctl kill --kill-whom=main -s SIGUSR1 containerd (its stacks go to the journal); "
        "systemctl restart containerd",
    ),
    "config": (
        "broken config",
        "containerd config dump (says what it refuses); restore a known-good config.toml",
    ),
    "shims": ("left-over shims", "kill the proven orphans' PIDs (no child process, no task in containerd)"),
    "fds": (
        "fd exhaustion",
        "ls -l /proc/$(systemctl show -p MainPID --value containerd)/fd; raise LimitNOFILE in a drop-in",
    ),
    "pressure": (
        "pressure",
        "systemd-cgtop; evict or limit the heaviest pods; reserve resources for system daemons",
    ),
    "socket-mode": (
        "socket mode",
        "ls -l /run/containerd/containerd.sock; chmod 0660 it (or restart containerd)",
    ),
}
_UNCOVERED_WOULD = {
    "shims": "nothing: nodemedic kills only the shims systemd names when containerd starts",
}
SYMPTOMS = ("unit", "probe")  # what any fault of containerd shows as well


def _order(policy: Policy, name: str) -> int:
    return next((i for i, r in enumerate(policy.rule) if r.name == name), len(policy.rule))


def name_cases(policy: Policy, checks: list[Check], decisions: list[Decision], facts: Facts) -> list[Case]:
    """A case per rule the core would act on (or holds), then one per problem no such case covers."""
    cases: list[Case] = []
    for case in [rule_case(d, policy, facts) for d in decisions]:
        same = next((c for c in cases if c.fault and case.fault and c.name == case.name), None)
        if same is None:
            cases.append(case)
        elif _order(policy, case.rule) < _order(policy, same.rule):
            cases[cases.index(same)] = case  # one fault, one case: the rule the policy puts first
    named = {c.name for c in cases if c.fault}
    for check in sorted(checks, key=lambda c: c.name in SYMPTOMS):  # symptoms last
        if check.status != "problem" or check.name not in _UNCOVERED:
            continue
        name, advice = _UNCOVERED[check.name]
        if check.name == "paths" and any(k is PathKind.DIRECTORY for k in facts.kinds.values()):
            name = "socket directory"
        if check.name == "probe" and not facts.active(containerd_unit(policy)):
            name = "containerd down"
        if name in named or (check.name in SYMPTOMS and named):
            continue
        named.add(name)
        would = _UNCOVERED_WOULD.get(check.name, "nothing: no rule of the policy acts on what was found")
        cases.append(Case(name, "", would, advice, list(check.evidence)))
    return cases


# ---- the whole triage -----------------------------------------------------------------------------


async def diagnose(policy: Policy, edges: Edges) -> Diagnosis:
    """Every check, in an order where each reads what the earlier ones found, then the cases."""
    facts = Facts()
    await read_units_into(policy, edges, facts)
    await read_journal_into(policy, edges, facts)
    checks = [unit_check(policy, facts), paths_check(policy, facts), await probe_check(policy, edges, facts)]
    checks.append(await config_check(policy, facts))
    checks += [
        shims_check(policy, facts),
        fds_check(policy, edges, facts),
        pressure_check(policy, edges, facts),
    ]
    checks += [socket_mode_check(policy, facts), journal_check(policy, facts)]
    saved, saved_problem = saved_state(policy.daemon.state_dir)
    checks.append(nodemedic_check(policy, facts, saved, saved_problem))
    decisions = decide(policy, saved, facts, Instant(time.monotonic(), edges.wall()))
    cases = name_cases(policy, checks, decisions, facts)
    if facts.journal_rules & {d.rule.name for d in decisions if d.mode}:
        next(c for c in checks if c.name == "journal").status = "problem"
    return Diagnosis(checks, cases)


# ---- output -----------------------------------------------------------------------------------------

# What each status means in colour (tools/paint.py's names).
_COLOURS = {"ok": "green", "problem": "bold-red", "unknown": "yellow", "healthy": "green", "advisory": "cyan"}


def _paint(text: str, key: str, colour: bool) -> str:
    return painter(colour)(text, _COLOURS.get(key, ""))


def render(diagnosis: Diagnosis, policy_path: str, colour: bool) -> str:
    """The readable report: each check with its evidence, then each case, then the verdict."""
    out = [f"nodemedic diagnose (policy {policy_path})", ""]
    for check in diagnosis.checks:
        out.append(f"{_paint(check.status.upper().ljust(7), check.status, colour)}  {check.name}")
        out += [f"         {line}" for line in check.evidence if line]
    for case in diagnosis.cases:
        kind = "case" if case.fault else "advisory"
        rule = f" (rule {case.rule})" if case.rule else ""
        out += ["", _paint(f"{kind}: {case.name}{rule}", "problem" if case.fault else "advisory", colour)]
        out += [f"  evidence: {line}" for line in case.evidence[:SHOWN_LINES]]
        out.append(f"  nodemedic would: {case.would}")
        if case.advice:
            out.append(f"  a human can run: {case.advice}")
    code = diagnosis.exit_code()
    verdict = {
        EXIT_HEALTHY: _paint("healthy", "healthy", colour),
        EXIT_PROBLEM: _paint("problem found", "problem", colour),
        EXIT_UNKNOWN: _paint("could not check everything, no problem found", "unknown", colour),
    }[code]
    out += ["", f"result: {verdict} (exit {code})"]
    return "\n".join(out) + "\n"


# ---- the command ---------------------------------------------------------------------------------------


def add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = sub.add_parser(
        "diagnose",
        help="triage this node now (read-only): name the fault, the rule that would act, what to run",
        description=(
            "Reads containerd's socket paths, unit, probe, config.toml, shims, fds, pressure and "
            "the last hour of the journal, names the fault (or says healthy), the policy's rule "
            "that would act and what it would do, and what a human can run. Changes nothing; "
            "works without the daemon and without D-Bus."
        ),
        epilog=(
            "exit codes: 0 healthy, 1 a problem found, 2 could not check (and no problem found), "
            "or the policy could not be read"
        ),
    )
    cmd.add_argument("--policy", type=Path, default=DEFAULT_POLICY, help="policy file (%(default)s)")
    cmd.add_argument("--json", action="store_true", help="print the diagnosis as JSON (schema 1)")
    cmd.set_defaults(func=_run)


def real_edges() -> Edges:
    return Edges(units=read_units, probe=ContainerdProbe(), journal=read_journal)


async def _diagnose_once(policy: Policy, edges: Edges) -> Diagnosis:
    try:
        return await diagnose(policy, edges)
    finally:
        if isinstance(edges.probe, ContainerdProbe):
            edges.probe.close()  # its kept connection, before the loop ends


def _run(args: argparse.Namespace) -> int:
    try:
        # Read only: the owner check is the daemon's business (it would refuse such a policy, and says so).
        policy = load_policy(args.policy, check_owner=False)
    except PolicyError as exc:
        # Without a policy there is no rule to name: the node was not checked, which is exit 2, not 1.
        print(f"invalid policy {exc.path}: {len(exc.problems)} problem(s); nothing checked", file=sys.stderr)
        for problem in exc.problems:
            print(f"{exc.path}:{'' if _LINE.match(problem) else ' '}{problem}", file=sys.stderr)
        return EXIT_UNKNOWN
    diagnosis = asyncio.run(_diagnose_once(policy, real_edges()))
    if args.json:
        print(json.dumps(diagnosis.to_json(str(args.policy)), indent=2))
    else:
        sys.stdout.write(render(diagnosis, str(args.policy), wants_colour(sys.stdout)))
    return diagnosis.exit_code()
