"""Prometheus metrics: what nodemedic saw, decided and did, for the fleet to see.

Computed here only. ``Metrics`` counts from the records every decision and effect passes (an
executor listener: DETECTED, OUTCOME, the rules' held decisions, the SIGHUP guard's storms, freezes
and thaws), and reads the rest at each write: the executor's state (breakers, budget, modes) and
the SIGHUP guard core's own count of SIGHUPs (in a storm it writes no record per signal).
``TextfileWriter`` writes them in node-exporter's textfile format, atomically, into
``[daemon.metrics].textfile_dir``: nodemedic opens no socket (``PrivateNetwork=yes``),
node-exporter's textfile collector serves the file, and the file's age
(``node_textfile_mtime_seconds``) shows a nodemedic that no longer runs.

The names are a contract with the shipped alert rules (packaging/prometheus/) and the lab's PromQL;
docs/operations.md ("The fleet: metrics") says which metric answers which question.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from nodemedic import __version__
from nodemedic.core.breaker import HALF_OPEN, OPEN
from nodemedic.core.sighup_guard import RULE as SIGHUP_RULE
from nodemedic.core.sighup_guard import SighupGuard
from nodemedic.policy.model import MetricsSettings
from nodemedic.ports import Clock
from nodemedic.report import Record, RecordKind
from nodemedic.store import atomic_write

if TYPE_CHECKING:
    from nodemedic.executor import Executor

FILE = "nodemedic.prom"  # node-exporter reads *.prom; the temporary file's name does not end so
FILE_MODE = 0o644  # node-exporter runs as its own user
MIN_GAP = 1.0  # at most one write a second, however many records come
RESULTS = ("repaired", "not-repaired", "observed", "reported", "nothing-to-do", "held")
TIMED = ("repaired", "not-repaired")  # the ends of a repair that ran: its duration is observed
MODES = ("enforce", "observe")
REPAIR_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
DETECTION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
IGNORED = 1  # the kernel's verdict on a signal its target ignores (SignalSeen.result)
# The SIGHUP guard's restarts of containerd spend the repair budget like a rule's repair: they count
# in nodemedic_repairs_total{rule="sighup"} too. Applied: the drop-in, a coalesced reload. Failed:
# the restart itself, or a drop-in not in effect after it.
GUARD_APPLIED = ("dropin-applied", "reload-applied")
GUARD_FAILED = ("restart-unit", "sighup-dropin")  # the ACTION of an OUTCOME=failed record

# Every family, with its HELP text (a counter's name without its _total, as prometheus_client wants).
HELP = {
    "nodemedic_build_info": "nodemedic's version (label version); always 1.",
    "nodemedic_mode": "1 for the daemon's [daemon].mode (enforce or observe), 0 for the other.",
    "nodemedic_rule_observe": "1 if the rule runs in observe mode (its own mode or the daemon's).",
    "nodemedic_problem_active": "1 from a problem's detection until its outcome; for an observed or "
    "report-only incident until it clears.",
    "nodemedic_problems_detected": "Problems detected (DETECTED records), per rule.",
    "nodemedic_repairs": "Ends of incidents per rule and result: repaired, not-repaired, observed "
    "(observe mode), reported (report-only rule), nothing-to-do; held: the breaker or the budget held "
    "the rule to observing (that incident also ends as observed: leave held out of sums). Rule sighup: "
    "the SIGHUP guard's restarts of containerd.",
    "nodemedic_repair_duration_seconds": "From a fault's first event to its repair's end (repaired or "
    "not-repaired).",
    "nodemedic_detection_latency_seconds": "From a fault's first event to its detection.",
    "nodemedic_breaker_open": "1 while the rule's circuit breaker is open or half-open: its repairs "
    "kept failing, a human is needed (nodemedic reset RULE).",
    "nodemedic_repair_budget_remaining": "Repairs the global repair budget allows now.",
    "nodemedic_repair_budget_limit": "Repairs the global repair budget allows per window.",
    "nodemedic_sighups": "SIGHUPs sent to containerd, as the SIGHUP guard counts them, by [sighup] mode.",
    "nodemedic_sighup_storms": "SIGHUP storms begun, by [sighup] mode.",
    "nodemedic_sighup_storm_active": "1 while a SIGHUP storm against containerd goes on.",
    "nodemedic_sighups_absorbed": "SIGHUPs containerd ignored (coalesce's drop-in): none restarted it.",
    "nodemedic_cgroups_frozen": "Cgroups of SIGHUP senders nodemedic holds frozen (throttle).",
    "nodemedic_last_loop_timestamp_seconds": "Unix time of the metrics writer's last turn on "
    "nodemedic's event loop.",
    "nodemedic_event_loop_lag_seconds": "How late the metrics writer's last timer ran against when it "
    "was due: a blocked event loop shows here.",
    "nodemedic_journal_lag_seconds": "How long the last journal entry read had waited in the journal "
    "(it stays while nothing is read).",
    "nodemedic_journal_last_read_timestamp_seconds": "Unix time the journal follower last read an "
    "entry (0: none yet).",
    "nodemedic_journal_skipped_entries": "Journal entries the follower skipped unread because its "
    "reading could not catch up (counted by sequence number: every unit's entries; a skip whose count "
    "is unknown, across journal files, adds nothing).",
    "nodemedic_metrics_written_timestamp_seconds": "Unix time this file's content was made.",
}


@dataclass(slots=True)
class Buckets:
    """One histogram's counts (prometheus_client's text format renders them)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, the last one +Inf
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # a bucket counts values <= its bound
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        edges = [*(repr(float(b)) for b in self.bounds), "+Inf"]  # as prometheus_client writes them
        return list(zip(edges, map(float, itertools.accumulate(self.counts)), strict=True))


class Metrics:
    """Every metric of nodemedic, in a registry of its own (``registry``, rendered by ``text``).

    ``record`` is an executor listener; ``changed`` is set by it, for the writer. ``guard`` is the
    SIGHUP guard's core (None: [sighup] is off); ``journal_lag`` reads how long the last journal
    entry waited before it was read, ``journal_last_read`` when (wall time) the follower last
    read one, and ``journal_skipped`` how many entries it skipped unread, behind a flood."""

    def __init__(
        self,
        executor: Executor,
        clock: Clock,
        *,
        guard: SighupGuard | None = None,
        journal_lag: Callable[[], float] = lambda: 0.0,
        journal_last_read: Callable[[], float] = lambda: 0.0,
        journal_skipped: Callable[[], int] = lambda: 0,
    ) -> None:
        self.executor, self.clock, self.guard = executor, clock, guard
        self._journal_lag, self._journal_last_read = journal_lag, journal_last_read
        self._journal_skipped = journal_skipped
        self.changed = asyncio.Event()
        self.detected: Counter[str] = Counter()
        self.repairs: Counter[tuple[str, str]] = Counter()
        self.durations: dict[str, Buckets] = {}
        self.latencies: dict[str, Buckets] = {}
        self.open: set[str] = set()  # rules with a DETECTED not yet followed by an OUTCOME
        self.storms: Counter[str] = Counter()
        self.storm_active = False
        self.frozen: set[str] = set()
        self.last_loop = 0.0
        self.loop_lag = 0.0  # set by the writer, each time its timer runs
        self.written = 0.0
        self._guard_restarting = False  # a restart of containerd by the guard began, its end not seen
        self.registry = CollectorRegistry()
        self.registry.register(self)

    # ---- records and events in ------------------------------------------------------------------

    def record(self, record: Record) -> None:
        """An executor listener: a few counts per record."""
        rule, outcome = record.fields.get("RULE"), record.fields.get("OUTCOME")
        if rule == SIGHUP_RULE:
            self._guard_record(record, outcome)
        elif rule is not None and record.kind is RecordKind.DETECTED:
            self.detected[rule] += 1
            self.open.add(rule)
            self._observe(self.latencies, DETECTION_BUCKETS, rule, record)
        elif rule is not None and record.kind is RecordKind.OUTCOME:
            self.open.discard(rule)
            if outcome in RESULTS:
                self.repairs[rule, outcome] += 1
            if outcome in TIMED:
                self._observe(self.durations, REPAIR_BUCKETS, rule, record)
        elif rule is not None and record.kind is RecordKind.DECIDED and outcome == "held":
            self.repairs[rule, "held"] += 1  # the breaker or the budget holds it to observing
        self.changed.set()

    def _guard_record(self, record: Record, outcome: str | None) -> None:
        cgroup = record.fields.get("CGROUP", "")
        self._guard_restart(record, outcome)
        if outcome == "storm":
            self.storms[self._sighup_mode()] += 1
            self.storm_active = True
        elif outcome == "storm-ended":
            self.storm_active = False
        elif outcome == "frozen" and record.kind is RecordKind.ACTION:
            self.frozen.add(cgroup)
        elif outcome == "thawed":
            self.frozen.discard(cgroup)

    def _guard_restart(self, record: Record, outcome: str | None) -> None:
        """Each restart of containerd by the guard counts once, at its end (repaired: applied;
        not-repaired: failed), as the budget counts it once at its start."""
        action = record.fields.get("ACTION")
        if record.kind is RecordKind.ACTION and outcome == "started" and action == "restart-unit":
            if self._guard_restarting:  # the last one got no new main process: it ended unsaid
                self.repairs[SIGHUP_RULE, "not-repaired"] += 1
            self._guard_restarting = True
            return
        if not self._guard_restarting:
            return
        if outcome in GUARD_APPLIED:
            result = "repaired"
        elif outcome == "failed" and action in GUARD_FAILED:
            result = "not-repaired"
        else:
            return
        self._guard_restarting = False
        self.repairs[SIGHUP_RULE, result] += 1
        self._observe(self.durations, REPAIR_BUCKETS, SIGHUP_RULE, record)

    def _observe(
        self, into: dict[str, Buckets], bounds: tuple[float, ...], rule: str, record: Record
    ) -> None:
        elapsed = record.fields.get("ELAPSED_MS")
        with contextlib.suppress(ValueError):  # no such field: nothing to observe
            seconds = float(elapsed or "") / 1000
            into.setdefault(rule, Buckets(bounds)).observe(seconds)

    def _sighup_mode(self) -> str:
        return self.guard.settings.mode if self.guard is not None else "off"

    # ---- out ------------------------------------------------------------------------------------

    def text(self) -> str:
        """The metrics now, in Prometheus' text format (what node-exporter's textfile collector
        reads); stamps ``last_loop`` (this runs on the event loop)."""
        self.last_loop = self.written = self.clock.wall()
        return generate_latest(self.registry).decode("utf-8")

    def collect(self) -> Iterator[Metric]:
        """prometheus_client's collector: every family, with every rule of the policy in force
        (a count not seen yet is 0, so a first repair shows as an increase)."""
        rules = [r.name for r in self.executor.policy.rule]
        yield from self._daemon_families()
        yield from self._rule_families()
        yield from self._count_families(rules)
        yield from self._guard_families()

    def _daemon_families(self) -> Iterator[Metric]:
        ex = self.executor
        yield _family(GaugeMetricFamily, "nodemedic_build_info", ["version"], [([__version__], 1)])
        modes = [([m], float(ex.policy.daemon.mode == m)) for m in MODES]
        yield _family(GaugeMetricFamily, "nodemedic_mode", ["mode"], modes)
        yield _gauge("nodemedic_repair_budget_remaining", ex.budget.remaining(ex.now().wall))
        yield _gauge("nodemedic_repair_budget_limit", ex.budget.repairs)
        yield _gauge("nodemedic_last_loop_timestamp_seconds", self.last_loop)
        yield _gauge("nodemedic_event_loop_lag_seconds", self.loop_lag)
        yield _gauge("nodemedic_journal_lag_seconds", self._journal_lag())
        yield _gauge("nodemedic_journal_last_read_timestamp_seconds", self._journal_last_read())
        skipped = float(self._journal_skipped())
        yield _family(CounterMetricFamily, "nodemedic_journal_skipped_entries", [], [([], skipped)])
        yield _gauge("nodemedic_metrics_written_timestamp_seconds", self.written)

    def _rule_families(self) -> Iterator[Metric]:
        ex = self.executor
        observe, active, breaker = [], [], []
        for rule in ex.policy.rule:
            state = ex.states.get(rule.name)
            observe.append(([rule.name], float(ex.policy.mode_of(rule) == "observe")))
            # an observed (or reported) incident stays open until it clears; a repair under way too
            held = state is not None and (state.observed or state.running)
            active.append(([rule.name], float(rule.name in self.open or held)))
            is_open = state is not None and state.breaker.state in (OPEN, HALF_OPEN)
            breaker.append(([rule.name], float(is_open)))
        yield _family(GaugeMetricFamily, "nodemedic_rule_observe", ["rule"], observe)
        yield _family(GaugeMetricFamily, "nodemedic_problem_active", ["rule"], active)
        yield _family(GaugeMetricFamily, "nodemedic_breaker_open", ["rule"], breaker)

    def _count_families(self, rules: list[str]) -> Iterator[Metric]:
        detected = [([r], float(self.detected[r])) for r in sorted({*rules, *self.detected})]
        yield _family(CounterMetricFamily, "nodemedic_problems_detected", ["rule"], detected)
        guarded = [SIGHUP_RULE] if self.guard is not None else []  # its restarts start at 0 too
        named = sorted({*rules, *guarded, *(r for r, _ in self.repairs)})
        repairs = [([r, x], float(self.repairs[r, x])) for r in named for x in RESULTS]
        yield _family(CounterMetricFamily, "nodemedic_repairs", ["rule", "result"], repairs)
        yield _histogram("nodemedic_repair_duration_seconds", rules, self.durations, REPAIR_BUCKETS)
        yield _histogram("nodemedic_detection_latency_seconds", rules, self.latencies, DETECTION_BUCKETS)

    def _guard_families(self) -> Iterator[Metric]:
        guard = self.guard
        counted = guard.counted if guard is not None else Counter[str]()  # the guard's own count
        now = [guard.settings.mode] if guard is not None else []
        modes = sorted({*counted, *self.storms, *now})
        sighups = [([m], float(counted[m])) for m in modes]
        yield _family(CounterMetricFamily, "nodemedic_sighups", ["mode"], sighups)
        storms = [([m], float(self.storms[m])) for m in modes]
        yield _family(CounterMetricFamily, "nodemedic_sighup_storms", ["mode"], storms)
        yield _gauge("nodemedic_sighup_storm_active", float(self.storm_active))
        absorbed = float(guard.absorbed if guard is not None else 0)
        yield _family(CounterMetricFamily, "nodemedic_sighups_absorbed", [], [([], absorbed)])
        yield _gauge("nodemedic_cgroups_frozen", len(self.frozen))


Family = GaugeMetricFamily | CounterMetricFamily
Samples = list[tuple[list[str], float]]


def _family(kind: type[Family], name: str, labels: list[str], samples: Samples) -> Family:
    family = kind(name, HELP[name], labels=labels)
    for values, value in samples:
        family.add_metric(values, value)
    return family


def _gauge(name: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, HELP[name], value=value)


def _histogram(
    name: str, rules: list[str], seen: dict[str, Buckets], bounds: tuple[float, ...]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, HELP[name], labels=["rule"])
    for rule in sorted({*rules, *seen}):
        buckets = seen.get(rule) or Buckets(bounds)
        family.add_metric([rule], buckets.cumulative(), buckets.total)
    return family


# ---- the file -------------------------------------------------------------------------------------


class TextfileWriter:
    """Writes ``nodemedic.prom`` into node-exporter's textfile folder: at start, at each change (at
    most once per ``min_gap``) and at least every ``interval``; atomically (a temporary file in that
    folder, fsync, rename, the folder fsynced), mode 0644, off the event loop. A folder missing or
    not writable is said once (a DAEMON record, SOURCE=metrics) and tried again; never fatal."""

    def __init__(self, metrics: Metrics, settings: MetricsSettings, *, min_gap: float = MIN_GAP) -> None:
        self.metrics, self.settings, self.min_gap = metrics, settings, min_gap
        self.path = settings.textfile_dir / FILE
        self.failing: str | None = None  # why the last write failed (said once), None: it worked

    async def run(self) -> None:
        """Until cancelled (app.py runs it as a long-lived task); nothing when not enabled."""
        if not self.settings.enabled:
            return
        loop, changed = asyncio.get_running_loop(), self.metrics.changed
        while True:
            changed.clear()
            written = loop.time()
            await self.write()
            await self._change_or_interval(loop)
            await self._sleep_until(loop, written + self.min_gap)  # changes gather

    async def _change_or_interval(self, loop: asyncio.AbstractEventLoop) -> None:
        due = loop.time() + self.settings.interval
        with contextlib.suppress(asyncio.TimeoutError):  # not the builtin TimeoutError on 3.10
            await asyncio.wait_for(self.metrics.changed.wait(), self.settings.interval)
            return
        self._timer_ran(loop, due)

    async def _sleep_until(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        if due > loop.time():
            await asyncio.sleep(due - loop.time())
            self._timer_ran(loop, due)

    def _timer_ran(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        # A timer runs late only when the loop was busy (a blocking call, a long callback): the
        # classic event-loop health signal. A loop stuck for good writes no file: its age shows that.
        self.metrics.loop_lag = max(0.0, loop.time() - due)

    async def write(self) -> bool:
        """One write of the metrics now; False (said once per outage) where it failed."""
        try:
            text = self.metrics.text()
            await asyncio.to_thread(self._write, text)
        except OSError as exc:
            self._failed(exc.strerror or str(exc), _hint(exc), str(exc))
            return False
        except Exception as exc:  # a bug in the metrics must never stop nodemedic
            self._failed(f"internal error (a nodemedic bug): {exc!r}", "", repr(exc))
            return False
        if self.failing is not None:
            self.failing = None
            self._say(f"metrics written to {self.path} again")
        return True

    def _write(self, text: str) -> None:
        folder = self.settings.textfile_dir
        if not folder.is_dir():  # node-exporter's to make: nodemedic never creates it
            why = "no such folder (is prometheus-node-exporter installed?)"
            raise FileNotFoundError(errno.ENOENT, why, str(folder))
        atomic_write(self.path, text, mode=FILE_MODE)

    def _failed(self, why: str, hint: str, detail: str) -> None:
        if self.failing is not None:
            return  # said at the first failure of this outage
        self.failing = why
        again = f"tried again at each change and every {self.settings.interval:g}s; nodemedic runs on"
        self._say(f"cannot write metrics to {self.path}: {why}{hint}; {again}", detail)

    def _say(self, message: str, detail: str = "") -> None:
        self.metrics.executor.report(
            RecordKind.DAEMON, message, SOURCE="metrics", PATH=str(self.path), DETAIL=detail
        )


def _hint(exc: OSError) -> str:
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (
            " (nodemedic.service may write only a folder that existed when it started, by its "
            "ReadWritePaths=: restart nodemedic once the folder is there)"
        )
    return ""
