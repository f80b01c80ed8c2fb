"""The Prometheus metrics (issue 15 items 1 and 2): every family, fed by the executor's records
and events as they really come (a repair, a failure, a breaker opening, observe mode, a SIGHUP
storm, a freeze), and the textfile written atomically for node-exporter, checked by promtool."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nodemedic import __version__
from nodemedic.actions.base import ActionContext
from nodemedic.events import FileChanged, PathChanged, PathKind, SignalSeen
from nodemedic.executor import Executor
from nodemedic.metrics import FILE, HELP, Metrics, TextfileWriter
from nodemedic.policy.load import parse_policy
from nodemedic.policy.model import MetricsSettings
from nodemedic.report import MemorySink, Record, RecordKind, Reporter
from nodemedic.sources.journal import JournalFollower

from .fakes import FakeClock, FakeProbe, FakeUnits
from .test_runner import Harness
from .test_sighup_guard import GOOD, UNIT, Setup, write_status

pytestmark = pytest.mark.unit
RULE = "socket-path-is-directory"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of the exposition, by name and labels (parsed by prometheus_client's parser)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, tuple(sorted(labels.items()))]


def wired(h: Harness) -> Metrics:
    metrics = Metrics(h.runner, h.clock)
    h.runner.listeners.append(metrics.record)
    return metrics


async def fault(h: Harness) -> None:
    if h.sock.is_socket():  # repaired before: containerd serves there again
        h.sock.unlink()
    h.sock.mkdir(exist_ok=True)
    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY, at=h.clock.now))
    await h.settle()


def check_help_and_type(text: str) -> None:
    for name in HELP:
        shown = f"{name}_total" if f"# TYPE {name}_total counter" in text else name
        assert f"# HELP {shown} " in text, name
        assert f"# TYPE {shown} " in text, name


# ---- the families, fed by real records ------------------------------------------------------------


async def test_a_repair_then_failures_that_open_the_breaker(harness: Callable[..., Harness]) -> None:
    units = FakeUnits()
    h = harness(units=units)
    metrics = wired(h)
    before = parse(metrics.text())
    assert value(before, "nodemedic_repairs_total", rule=RULE, result="repaired") == 0, "0 before any"
    assert value(before, "nodemedic_problem_active", rule=RULE) == 0
    await fault(h)
    units.fail.add(("start", "containerd.service"))
    for _ in range(3):  # the default breaker: 3 failures within 15 minutes
        h.clock.advance(400)  # past the backoff
        await fault(h)
    h.clock.advance(400)
    await fault(h)  # held by the open breaker: observed only
    text = metrics.text()
    check_help_and_type(text)
    got = parse(text)
    assert value(got, "nodemedic_build_info", version=__version__) == 1
    assert value(got, "nodemedic_problems_detected_total", rule=RULE) == 5
    assert value(got, "nodemedic_repairs_total", rule=RULE, result="repaired") == 1
    assert value(got, "nodemedic_repairs_total", rule=RULE, result="not-repaired") == 3
    assert value(got, "nodemedic_repairs_total", rule=RULE, result="held") == 1
    assert value(got, "nodemedic_repairs_total", rule=RULE, result="observed") == 1
    assert value(got, "nodemedic_repair_duration_seconds_count", rule=RULE) == 4
    assert value(got, "nodemedic_detection_latency_seconds_count", rule=RULE) == 5
    assert value(got, "nodemedic_breaker_open", rule=RULE) == 1
    assert value(got, "nodemedic_repair_budget_limit") == 10
    assert value(got, "nodemedic_repair_budget_remaining") == 6, "a failed repair spends the budget too"
    assert value(got, "nodemedic_mode", mode="enforce") == 1
    assert value(got, "nodemedic_mode", mode="observe") == 0
    assert value(got, "nodemedic_rule_observe", rule=RULE) == 0


def test_durations_and_latencies_fall_in_their_buckets() -> None:
    metrics = Metrics(bare_executor(), FakeClock())  # records fed by hand
    metrics.record(Record(RecordKind.DETECTED, "x", {"RULE": "r", "ELAPSED_MS": "3"}))
    metrics.record(
        Record(RecordKind.OUTCOME, "x", {"RULE": "r", "OUTCOME": "repaired", "ELAPSED_MS": "1500"})
    )
    metrics.record(Record(RecordKind.OUTCOME, "x", {"RULE": "r", "OUTCOME": "failed"}))  # not a result
    got = parse(metrics.text())
    assert value(got, "nodemedic_repair_duration_seconds_bucket", rule="r", le="1.0") == 0
    assert value(got, "nodemedic_repair_duration_seconds_bucket", rule="r", le="2.5") == 1
    assert value(got, "nodemedic_repair_duration_seconds_bucket", rule="r", le="+Inf") == 1
    assert value(got, "nodemedic_repair_duration_seconds_sum", rule="r") == 1.5
    assert value(got, "nodemedic_detection_latency_seconds_bucket", rule="r", le="0.001") == 0
    assert value(got, "nodemedic_detection_latency_seconds_bucket", rule="r", le="0.005") == 1
    assert value(got, "nodemedic_repairs_total", rule="r", result="repaired") == 1
    assert sum(v for (n, _), v in got.items() if n == "nodemedic_repairs_total") == 1


def bare_executor() -> Executor:
    """An executor with a policy of one rule, "r", and fakes at the edges."""
    policy = parse_policy(
        {"rule": [{"name": "r", "trigger": [{"source": "path", "paths": ["/x"], "kind": "directory"}]}]}
    )
    ctx = ActionContext(FakeUnits(), FakeProbe(), FakeClock(), Path("/nonexistent"))
    return Executor(policy, ctx, Reporter(MemorySink()), lambda coro: None)


async def test_observe_mode_keeps_the_problem_active_until_it_clears(harness: Callable[..., Harness]) -> None:
    h = harness(mode="observe")
    metrics = wired(h)
    await fault(h)
    got = parse(metrics.text())
    assert value(got, "nodemedic_mode", mode="observe") == 1
    assert value(got, "nodemedic_rule_observe", rule=RULE) == 1
    assert value(got, "nodemedic_repairs_total", rule=RULE, result="observed") == 1
    assert value(got, "nodemedic_repair_duration_seconds_count", rule=RULE) == 0, "nothing was repaired"
    assert value(got, "nodemedic_problem_active", rule=RULE) == 1, "observed: still there"
    h.sock.rmdir()
    h.runner.handle(PathChanged(str(h.sock), PathKind.MISSING))
    assert value(parse(metrics.text()), "nodemedic_problem_active", rule=RULE) == 0


def test_a_rule_gone_at_a_reload_keeps_its_counts_and_a_new_one_starts_at_0() -> None:
    ex = bare_executor()
    metrics = Metrics(ex, FakeClock())
    metrics.record(Record(RecordKind.OUTCOME, "x", {"RULE": "r", "OUTCOME": "repaired", "ELAPSED_MS": "9"}))
    new = parse_policy(
        {"rule": [{"name": "s", "trigger": [{"source": "path", "paths": ["/y"], "kind": "directory"}]}]}
    )
    ex.replace_policy(new)
    got = parse(metrics.text())
    assert value(got, "nodemedic_repairs_total", rule="r", result="repaired") == 1
    assert value(got, "nodemedic_repairs_total", rule="s", result="repaired") == 0
    assert ("nodemedic_breaker_open", (("rule", "r"),)) not in got, "gauges follow the policy in force"


# ---- the SIGHUP guard --------------------------------------------------------------------------


def guarded(s: Setup) -> Metrics:
    """Metrics wired to the guard's executor as app.py wires them: a listener, reading the guard."""
    metrics = Metrics(s.ex, s.clock, guard=s.guard.core)
    s.ex.listeners.append(metrics.record)
    return metrics


async def test_a_sighup_storm_is_counted_while_it_lasts_and_its_end_seen(tmp_path: Path) -> None:
    s = Setup(tmp_path, "observe")
    try:
        metrics = guarded(s)
        s.containerd_runs()
        for _ in range(10):  # a storm: more than 3 within the window
            s.sighup()
            s.advance(1)
        s.sighup(source="dbus")  # the death the trace already counted
        got = parse(metrics.text())
        assert value(got, "nodemedic_sighups_total", mode="observe") == 10, "each, in the storm too"
        assert value(got, "nodemedic_sighup_storms_total", mode="observe") == 1
        assert value(got, "nodemedic_sighup_storm_active") == 1
        assert value(got, "nodemedic_sighups_absorbed_total") == 0
        s.advance(61)
        await s.turn()
        got = parse(metrics.text())
        assert value(got, "nodemedic_sighup_storm_active") == 0
        assert value(got, "nodemedic_sighup_storms_total", mode="observe") == 1
    finally:
        await s.stop()


async def test_sighups_containerd_ignores_are_absorbed(tmp_path: Path) -> None:
    s = Setup(tmp_path, "coalesce")
    try:
        metrics = guarded(s)
        s.containerd_runs()
        await s.turn()
        for _ in range(2):
            s.handle(SignalSeen(1, s.systemd.pid, unit=UNIT, sender_pid=7, source="tracefs", result=1))
        got = parse(metrics.text())
        assert value(got, "nodemedic_sighups_total", mode="coalesce") == 2
        assert value(got, "nodemedic_sighups_absorbed_total") == 2
    finally:
        await s.stop()


async def test_a_frozen_sender_is_counted_until_it_is_thawed(tmp_path: Path) -> None:
    s = Setup(tmp_path, "throttle")
    try:
        metrics = guarded(s)
        s.containerd_runs()
        for _ in range(4):  # over the bucket's burst of 3
            s.sighup()
        await s.turn()
        assert value(parse(metrics.text()), "nodemedic_cgroups_frozen") == 1
        s.advance(301)
        await s.turn()
        assert value(parse(metrics.text()), "nodemedic_cgroups_frozen") == 0
    finally:
        await s.stop()


async def test_the_guards_restarts_count_as_repairs_as_they_spend_the_budget(tmp_path: Path) -> None:
    s = Setup(tmp_path, "coalesce")
    try:
        metrics = guarded(s)
        sighup = {"rule": "sighup"}
        assert value(parse(metrics.text()), "nodemedic_repairs_total", **sighup, result="repaired") == 0
        s.containerd_runs()
        await s.turn()  # the drop-in, applied with one restart
        s.config.write_bytes(GOOD + b"# a real change\n")
        s.handle(FileChanged(str(s.config)))
        s.advance(31)  # past the coalesce interval since the drop-in's restart
        await s.turn()  # the change, applied with one restart
        assert [len(s.with_outcome(o)) for o in ("dropin-applied", "reload-applied")] == [1, 1]
        got = parse(metrics.text())
        assert value(got, "nodemedic_repairs_total", **sighup, result="repaired") == 2
        assert value(got, "nodemedic_repairs_total", **sighup, result="not-repaired") == 0
        assert value(got, "nodemedic_repair_budget_remaining") == 10 - len(s.ex.budget.spent) == 8
        # the guard's records carry the restart's time: its repair-duration histogram fills too
        assert all("ELAPSED_MS" in r.fields for r in s.with_outcome("reload-applied"))
        assert value(got, "nodemedic_repair_duration_seconds_count", **sighup) == 2
    finally:
        await s.stop()


async def test_the_guards_failed_restarts_count_as_not_repaired(tmp_path: Path) -> None:
    s = Setup(tmp_path, "coalesce")
    try:
        metrics = guarded(s)
        s.systemd.ignore_after_restart = False  # the drop-in is not in effect after the restart
        s.containerd_runs()
        await s.turn()
        write_status(s.proc, s.systemd.pid, ignores_hup=True)  # in effect now: the reload's turn

        def refused() -> None:
            raise OSError("systemd refused the restart")

        s.systemd.during_restart = refused
        s.config.write_bytes(GOOD + b"# a real change\n")
        s.handle(FileChanged(str(s.config)))
        s.advance(31)  # past the coalesce interval since the drop-in's restart
        await s.turn()
        assert s.systemd.restarts == 2
        got = parse(metrics.text())
        assert value(got, "nodemedic_repairs_total", rule="sighup", result="not-repaired") == 2
        assert value(got, "nodemedic_repairs_total", rule="sighup", result="repaired") == 0
        assert value(got, "nodemedic_repair_budget_remaining") == 8, "both spent the budget"
    finally:
        await s.stop()


def test_a_guard_restart_that_ended_unsaid_counts_as_not_repaired_at_the_next() -> None:
    metrics = Metrics(bare_executor(), FakeClock())  # records fed by hand, as the guard writes them
    started = {"RULE": "sighup", "OUTCOME": "started", "ACTION": "restart-unit"}
    metrics.record(Record(RecordKind.ACTION, "x", started))
    metrics.record(Record(RecordKind.ACTION, "x", started))  # the first got no new main process
    applied = {"RULE": "sighup", "OUTCOME": "dropin-applied", "ACTION": "sighup-dropin", "ELAPSED_MS": "800"}
    metrics.record(Record(RecordKind.OUTCOME, "x", applied))
    metrics.record(Record(RecordKind.OUTCOME, "x", applied))  # no restart began: nothing to count
    failed = {"RULE": "sighup", "OUTCOME": "failed", "ACTION": "sighup-dropin"}
    metrics.record(Record(RecordKind.ERROR, "x", failed))  # a drop-in install failing: no restart
    got = parse(metrics.text())
    assert value(got, "nodemedic_repairs_total", rule="sighup", result="not-repaired") == 1
    assert value(got, "nodemedic_repairs_total", rule="sighup", result="repaired") == 1
    assert value(got, "nodemedic_repair_duration_seconds_sum", rule="sighup") == 0.8, "its ELAPSED_MS"


def test_without_the_guard_its_families_are_there_with_nothing_counted() -> None:
    text = Metrics(bare_executor(), FakeClock()).text()
    check_help_and_type(text)
    got = parse(text)
    assert value(got, "nodemedic_sighup_storm_active") == 0
    assert not [k for k in got if k[0] == "nodemedic_sighups_total"]
    assert not [k for k in got if ("rule", "sighup") in k[1]], "no guard, no restarts of its own"


# ---- the daemon's own health ------------------------------------------------------------------------


def test_loop_turn_written_time_and_journal_lag() -> None:
    clock = FakeClock()
    metrics = Metrics(bare_executor(), clock, journal_lag=lambda: 0.25, journal_last_read=lambda: 990.5)
    got = parse(metrics.text())
    assert value(got, "nodemedic_last_loop_timestamp_seconds") == clock.wall()
    assert value(got, "nodemedic_metrics_written_timestamp_seconds") == clock.wall()
    assert value(got, "nodemedic_event_loop_lag_seconds") == 0, "no timer ran yet"
    assert value(got, "nodemedic_journal_lag_seconds") == 0.25
    assert value(got, "nodemedic_journal_last_read_timestamp_seconds") == 990.5


async def test_a_blocked_event_loop_shows_as_the_writers_timer_running_late(tmp_path: Path) -> None:
    metrics = Metrics(bare_executor(), FakeClock())
    writer = TextfileWriter(metrics, settings(tmp_path, interval="100ms"), min_gap=0.0)
    path = tmp_path / FILE
    task = asyncio.get_running_loop().create_task(writer.run())
    try:
        await until(path.exists)
        asyncio.get_running_loop().call_soon(time.sleep, 0.5)  # a blocking call on the loop
        await until(lambda: lag_in(path) >= 0.3)
        await until(lambda: lag_in(path) < 0.05)  # the loop turns freely again
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def lag_in(path: Path) -> float:
    return value(parse(path.read_text()), "nodemedic_event_loop_lag_seconds")


class Reader:
    """systemd-python's Reader as the follower reads it (its low-level calls): entries, then nothing."""

    def __init__(self, entries: list[dict[str, object]]) -> None:
        self.entries = entries
        self.current: dict[str, object] = {}

    def _next(self) -> bool:
        if not self.entries:
            return False
        self.current = self.entries.pop(0)
        return True

    def _get(self, field: str) -> bytes:
        return str(self.current[field]).encode()

    def _get_all(self) -> dict[str, object]:
        return dict(self.current)

    def _convert_entry(self, entry: dict[str, object]) -> dict[str, object]:
        return entry

    def _get_cursor(self) -> str:
        return str(self.current.get("__CURSOR", ""))

    def _get_realtime(self) -> int:
        stamp = self.current["__REALTIME_TIMESTAMP"]
        assert isinstance(stamp, datetime)
        return round(stamp.timestamp() * 1e6)


def test_the_journal_follower_says_how_long_the_last_entry_waited() -> None:
    clock = FakeClock()
    follower = JournalFollower(["containerd.service"], lambda e: None, clock)
    assert follower.lag == follower.last_read == 0.0
    stamp = datetime.fromtimestamp(clock.wall() - 0.4, timezone.utc)
    entry = {
        "__CURSOR": "s=1",
        "__REALTIME_TIMESTAMP": stamp,
        "MESSAGE": "x",
        "_SYSTEMD_UNIT": "containerd.service",
    }
    follower._drain(Reader([entry]))  # the fd's wake-up, without a journal
    assert follower.lag == pytest.approx(0.4)
    assert follower.last_read == clock.wall()
    clock.advance(30)
    follower._drain(Reader([]))  # woken, nothing to read: the lag stays, the last read ages
    assert follower.lag == pytest.approx(0.4)
    assert follower.last_read == clock.wall() - 30
    ahead = datetime.fromtimestamp(clock.wall() + 5, timezone.utc)  # a clock set back meanwhile
    follower._drain(Reader([{"__REALTIME_TIMESTAMP": ahead}]))
    assert follower.lag == 0.0


# ---- the file ---------------------------------------------------------------------------------------


def settings(folder: Path, **more: object) -> MetricsSettings:
    return MetricsSettings.model_validate({"textfile_dir": str(folder), **more})


async def test_the_file_is_written_atomically_readable_by_node_exporter(tmp_path: Path) -> None:
    ex = bare_executor()
    writer = TextfileWriter(Metrics(ex, FakeClock()), settings(tmp_path))
    assert await writer.write()
    path = tmp_path / FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o644, "node-exporter runs as its own user"
    assert os.listdir(tmp_path) == [FILE], "no temporary file left beside it"
    check_help_and_type(path.read_text())
    old = path.stat().st_ino
    assert await writer.write()
    assert path.stat().st_ino != old, "replaced by a rename, never written in place"


async def test_a_missing_folder_is_said_once_and_tried_again(tmp_path: Path) -> None:
    ex = bare_executor()
    sink = ex.reporter._sink  # type: ignore[attr-defined]
    folder = tmp_path / "node-exporter"
    writer = TextfileWriter(Metrics(ex, FakeClock()), settings(folder))
    assert not await writer.write()
    assert not await writer.write()
    said = [r for r in sink.of(RecordKind.DAEMON) if r.fields.get("SOURCE") == "metrics"]
    assert len(said) == 1
    assert "prometheus-node-exporter installed" in said[0].message
    assert not folder.exists(), "the folder is node-exporter's to make"
    folder.mkdir()
    assert await writer.write()
    said = [r for r in sink.of(RecordKind.DAEMON) if r.fields.get("SOURCE") == "metrics"]
    assert len(said) == 2
    assert "again" in said[1].message
    assert (folder / FILE).is_file()


async def test_a_bug_in_the_metrics_is_said_and_never_stops_the_writer(tmp_path: Path) -> None:
    ex = bare_executor()
    metrics = Metrics(ex, FakeClock(), journal_lag=lambda: 1 / 0)
    writer = TextfileWriter(metrics, settings(tmp_path))
    assert not await writer.write()
    assert writer.failing is not None
    assert "internal error" in writer.failing


async def test_run_writes_at_start_at_each_change_and_every_interval(tmp_path: Path) -> None:
    ex = bare_executor()
    clock = FakeClock()
    metrics = Metrics(ex, clock)
    writer = TextfileWriter(metrics, settings(tmp_path, interval="200ms"), min_gap=0.05)
    path = tmp_path / FILE
    task = asyncio.get_running_loop().create_task(writer.run())
    try:
        await until(path.exists)
        first = path.read_text()
        metrics.record(Record(RecordKind.DETECTED, "x", {"RULE": "r", "ELAPSED_MS": "1"}))
        await until(lambda: path.read_text() != first)
        assert 'nodemedic_problems_detected_total{rule="r"} 1.0' in path.read_text()
        stamped = path.stat().st_mtime_ns
        await until(lambda: path.stat().st_mtime_ns != stamped)  # nothing changed: the interval
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_not_enabled_writes_nothing(tmp_path: Path) -> None:
    writer = TextfileWriter(Metrics(bare_executor(), FakeClock()), settings(tmp_path, enabled=False))
    await asyncio.wait_for(writer.run(), 1)
    assert os.listdir(tmp_path) == []


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


# ---- promtool -------------------------------------------------------------------------------------


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing: `make deps` installs Debian's prometheus package, which has it")
        pytest.skip("promtool not installed (Debian's prometheus package; `make deps`)")
    return found


async def test_promtool_check_metrics_passes_on_every_family(tmp_path: Path) -> None:
    tool = promtool()
    s = Setup(tmp_path, "throttle")
    try:
        metrics = guarded(s)
        s.containerd_runs()
        for _ in range(5):
            s.sighup()
        await s.turn()
        metrics.record(Record(RecordKind.DETECTED, "x", {"RULE": "r", "ELAPSED_MS": "3"}))
        text = metrics.text()
    finally:
        await s.stop()
    check_help_and_type(text)
    done = subprocess.run([tool, "check", "metrics"], input=text, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout + done.stderr == "", "promtool's lint has nothing to say either"
