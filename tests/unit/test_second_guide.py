"""The second field guide's causes: the resource watcher on a fake /proc and cgroup tree, the
matchers, the report-only rules in the runner, and the opt-in fd-limit repair."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from nodemedic.actions import nofile
from nodemedic.actions.base import ActionContext, Skip, Step
from nodemedic.actions.nofile import MARKER, RaiseNofileLimit
from nodemedic.errors import RepairFailedError, UnsafePathError
from nodemedic.events import (
    Event,
    FdUsage,
    GrpcStreamsSetting,
    JournalLine,
    OomKills,
    PressureSeen,
    ProbeFailed,
    SocketModeSeen,
    UnitChanged,
    VersionSeen,
)
from nodemedic.executor import Executor
from nodemedic.policy.actions import RaiseNofileLimitParams
from nodemedic.policy.load import load_policy, parse_policy
from nodemedic.policy.match import known_bugs, match, version_tuple
from nodemedic.policy.model import Policy
from nodemedic.procfs import oom_kill_count, read_pressure, soft_nofile, unit_cgroup
from nodemedic.report import MemorySink, RecordKind, Reporter
from nodemedic.sources import resources
from nodemedic.sources.resources import ResourceWatch, streams_setting

from .fakes import FakeClock, FakeProbe, FakeUnits

pytestmark = pytest.mark.unit
SHIPPED = load_policy(Path(__file__).parents[2] / "policy" / "policy.toml", check_owner=False)
LIMITS = """Limit                     Soft Limit           Hard Limit           Units
Max cpu time              unlimited            unlimited            seconds
Max open files            {soft}                  {hard}                  files
"""
PSI = (
    "some avg10={some} avg60=0.50 avg300=0.10 total=12345\nfull avg10={full} avg60=0.00 avg300=0.00 total=0\n"
)


def fired(event: Event) -> list[str]:
    return [m.rule.name for m in match(SHIPPED.rule, event)]


# ---- matchers on the shipped policy --------------------------------------------------------


def test_fd_usage_fires_above_the_fraction_only() -> None:
    assert "containerd-fd-exhaustion" in fired(FdUsage("containerd.service", 74, 210, 256))
    assert "containerd-fd-exhaustion" not in fired(FdUsage("containerd.service", 74, 200, 256))
    assert fired(FdUsage("containerd.service", 74, 5000, 0)) == [], "unlimited never fires"


def test_pressure_fires_on_its_scope_resource_and_line() -> None:
    assert "containerd-starved" in fired(PressureSeen("containerd", "cpu", 61.0, 0.0))
    assert "containerd-starved" not in fired(PressureSeen("containerd", "cpu", 59.0, 59.0))
    assert "containerd-starved" not in fired(PressureSeen("host", "cpu", 99.0, 99.0)), "no host cpu trigger"
    assert "containerd-starved" in fired(PressureSeen("host", "memory", 5.0, 25.0)), "full line"
    assert "containerd-starved" not in fired(PressureSeen("host", "memory", 90.0, 5.0))


def test_oom_kills_fire_only_when_the_count_grows() -> None:
    assert "containerd-starved" in fired(OomKills("containerd.service", 3, 1))
    assert "containerd-starved" not in fired(OomKills("containerd.service", 3, 0))


def test_kernel_oom_and_denial_lines() -> None:
    oom = "Out of memory: Killed process 4242 (containerd) total-vm:2097152kB, anon-rss:1048576kB"
    assert fired(JournalLine("kernel", oom)) == ["containerd-starved"]
    avc = ('avc:  denied  { connectto } for  pid=1234 comm="kubelet" path="/run/containerd/containerd.sock" '
           "tcontext=system_u:system_r:container_runtime_t:s0 tclass=unix_stream_socket")  # fmt: skip
    assert fired(JournalLine("kernel", avc)) == ["containerd-socket-denied"]
    assert fired(JournalLine("kernel", 'apparmor="DENIED" operation="open" name="/etc/shadow"')) == []


def test_socket_mode_fires_on_mode_or_owner() -> None:
    sock = "/run/containerd/containerd.sock"
    assert fired(SocketModeSeen(sock, 0o660, 0, 0)) == []
    assert fired(SocketModeSeen(sock, 0o000, 0, 0)) == ["containerd-socket-mode"]
    assert fired(SocketModeSeen(sock, 0o660, 0, 1000)) == ["containerd-socket-mode"]
    assert fired(SocketModeSeen("/run/other.sock", 0o000, 0, 0)) == []


def test_versions_against_known_bugs() -> None:
    assert version_tuple("1.6.20~ds1") == (1, 6, 20)
    assert version_tuple("v2.0.0-rc.1") == (2, 0, 0)
    assert version_tuple("devel") == ()
    [trigger] = [t for r in SHIPPED.rule for t in r.trigger if t.source == "version"]
    bugs = known_bugs(trigger.known_bugs, "1.6.20~ds1")  # type: ignore[union-attr]
    assert any("CVE-2024-40635" in b.reason for b in bugs)
    assert known_bugs(trigger.known_bugs, "1.7.27") == []  # type: ignore[union-attr]
    assert known_bugs(trigger.known_bugs, "2.1.0")  # type: ignore[union-attr]
    assert known_bugs(trigger.known_bugs, "unknown") == []  # type: ignore[union-attr]
    assert fired(VersionSeen("1.6.20~ds1")) == ["containerd-known-bugs"]
    assert fired(VersionSeen("1.7.28")) == []


def test_a_resource_unit_must_be_watched() -> None:
    with pytest.raises(ValueError, match=r"\[daemon.resources\].unit"):
        parse_policy({"daemon": {"watch_units": ["kubelet.service"]},
                      "rule": [{"name": "r", "trigger": [{"source": "oom"}]}]})  # fmt: skip


def test_a_bad_socket_mode_is_a_load_error() -> None:
    with pytest.raises(ValueError, match="octal"):
        parse_policy({"rule": [{"name": "r", "trigger": [{"source": "socket-mode", "mode": "rw-rw----"}]}]})


# ---- readers on a fake tree ----------------------------------------------------------------


def fake_tree(tmp_path: Path, *, soft: int = 256, fds: int = 10, oom: int = 0) -> tuple[Path, Path]:
    proc, cgroot = tmp_path / "proc", tmp_path / "cgroup"
    pid = proc / "74"
    (pid / "fd").mkdir(parents=True)
    for n in range(fds):
        (pid / "fd" / str(n)).touch()
    (pid / "limits").write_text(LIMITS.format(soft=soft, hard=soft))
    (pid / "cgroup").write_text("1:cpu:/\n0::/system.slice/containerd.service\n")
    (proc / "pressure").mkdir()
    (proc / "pressure" / "memory").write_text(PSI.format(some=1.5, full=0.5))
    cg = cgroot / "system.slice" / "containerd.service"
    cg.mkdir(parents=True)
    (cg / "cpu.pressure").write_text(PSI.format(some=72.25, full=3.0))
    (cg / "memory.events").write_text(f"low 0\nhigh 0\nmax 4\noom 2\noom_kill {oom}\noom_group_kill 0\n")
    return proc, cgroot


def test_readers(tmp_path: Path) -> None:
    proc, cgroot = fake_tree(tmp_path, soft=256, oom=2)
    assert soft_nofile(proc, 74) == 256
    assert unit_cgroup(proc, cgroot, 74) == cgroot / "system.slice" / "containerd.service"
    assert read_pressure(cgroot / "system.slice" / "containerd.service" / "cpu.pressure") == (72.25, 3.0)
    assert oom_kill_count(cgroot / "system.slice" / "containerd.service" / "memory.events") == 2
    (proc / "74" / "limits").write_text(LIMITS.format(soft="unlimited", hard="unlimited"))
    assert soft_nofile(proc, 74) == 0


async def test_the_watcher_emits_a_reading_per_check(tmp_path: Path) -> None:
    proc, cgroot = fake_tree(tmp_path, soft=256, fds=230)
    sock = tmp_path / "containerd.sock"
    sock.touch()  # not a socket: nothing emitted for it
    policy = parse_policy({"rule": [{"name": "r", "trigger": [
        {"source": "fds"}, {"source": "oom"}, {"source": "socket-mode", "path": str(sock)},
        {"source": "pressure", "scope": "containerd", "resource": "cpu"},
        {"source": "pressure", "scope": "host", "resource": "memory"},
        {"source": "version", "known_bugs": [{"first": "1.6.0", "reason": "x"}]},
    ]}]})  # fmt: skip
    events: list[Event] = []
    main_pid = 0
    watch = ResourceWatch(policy.resource_checks(), "containerd.service", 5.0, FakeProbe(), "/sock", 1.0,
                          events.append, FakeClock(), main_pid=lambda: main_pid, proc=proc,
                          cgroup_root=cgroot)  # fmt: skip
    await watch.read_once()
    assert [type(e) for e in events] == [PressureSeen, VersionSeen], "no MainPID yet: host-wide only"
    main_pid = 74  # D-Bus reported containerd's main process (the node view's copy)
    events.clear()
    await watch.read_once()
    assert FdUsage("containerd.service", 74, 230, 256, at=1000.0) in events
    assert any(
        isinstance(e, PressureSeen) and e.scope == "containerd" and e.some_avg10 == 72.25 for e in events
    )
    assert any(isinstance(e, PressureSeen) and e.scope == "host" and e.some_avg10 == 1.5 for e in events)
    assert [e.new for e in events if isinstance(e, OomKills)] == [0]
    assert not any(isinstance(e, VersionSeen | SocketModeSeen) for e in events), "version: once per version"
    (cgroot / "system.slice" / "containerd.service" / "memory.events").write_text("oom_kill 3\n")
    events.clear()
    await watch.read_once()
    assert [(e.total, e.new) for e in events if isinstance(e, OomKills)] == [(3, 3)]


async def test_an_unreadable_check_emits_nothing_and_the_others_go_on(tmp_path: Path) -> None:
    proc, cgroot = fake_tree(tmp_path)
    (proc / "74" / "limits").unlink()  # as for a process gone between two readings
    policy = parse_policy({"rule": [{"name": "r", "trigger": [{"source": "fds"}, {"source": "oom"}]}]})
    events: list[Event] = []
    watch = ResourceWatch(policy.resource_checks(), "containerd.service", 5.0, FakeProbe(), "/s", 1.0,
                          events.append, FakeClock(), main_pid=lambda: 74, proc=proc,
                          cgroup_root=cgroot)  # fmt: skip
    await watch.read_once()
    assert [type(e) for e in events] == [OomKills]


# ---- report-only rules in the runner -------------------------------------------------------


def report_only_policy(mode: str = "enforce") -> Policy:
    return parse_policy({"daemon": {"mode": mode}, "rule": [{
        "name": "containerd-starved", "advice": "evict pods",
        "trigger": [{"source": "pressure", "scope": "host", "resource": "memory", "above": 10.0}],
    }]})  # fmt: skip


async def settle(runner_tasks: list[asyncio.Task[None]]) -> None:
    while runner_tasks:
        await runner_tasks.pop()


@pytest.mark.parametrize("mode", ["enforce", "observe"])
async def test_a_report_only_rule_reports_once_per_incident(mode: str) -> None:
    sink, tasks = MemorySink(), []
    ctx = ActionContext(FakeUnits(), FakeProbe(), FakeClock(), Path("/nonexistent"))
    runner = Executor(report_only_policy(mode), ctx, Reporter(sink),
                    lambda c: tasks.append(asyncio.get_running_loop().create_task(c)))  # fmt: skip
    high, low = PressureSeen("host", "memory", 30.0, 0.0), PressureSeen("host", "memory", 1.0, 0.0)
    for event in (high, high, high):
        runner.handle(event)
        await settle(tasks)
    outcomes = [r.fields["OUTCOME"] for r in sink.of(RecordKind.OUTCOME)]
    assert outcomes == ["reported"], "one report while the pressure lasts"
    [record] = sink.of(RecordKind.OUTCOME)
    assert record.fields["DETAIL"] == "evict pods"
    assert record.fields["MODE"] == mode
    assert "What to do: evict pods" in record.message
    assert [r.fields["OUTCOME"] for r in sink.of(RecordKind.DECIDED)] == ["report"]
    assert runner.budget.spent == [], "a report spends no repair budget"
    runner.handle(low)  # cleared
    runner.handle(high)
    await settle(tasks)
    assert [r.fields["OUTCOME"] for r in sink.of(RecordKind.OUTCOME)] == ["reported", "reported"]


async def test_another_checks_reading_does_not_clear_an_incident() -> None:
    sink, tasks = MemorySink(), []
    ctx = ActionContext(FakeUnits(), FakeProbe(), FakeClock(), Path("/nonexistent"))
    runner = Executor(report_only_policy(), ctx, Reporter(sink),
                    lambda c: tasks.append(asyncio.get_running_loop().create_task(c)))  # fmt: skip
    runner.handle(PressureSeen("host", "memory", 30.0, 0.0))
    await settle(tasks)
    runner.handle(PressureSeen("host", "cpu", 0.0, 0.0))  # another reading
    runner.handle(UnitChanged("containerd.service", "active", "running"))
    runner.handle(PressureSeen("host", "memory", 30.0, 0.0))
    await settle(tasks)
    assert len(sink.of(RecordKind.OUTCOME)) == 1


# ---- the opt-in fd-limit repair ------------------------------------------------------------


class FakeSystemd:
    """systemctl as the action calls it: daemon-reload and MainPID."""

    def __init__(self, proc: Path, pids: list[int]) -> None:
        self.proc, self.pids = proc, pids
        self.calls: list[str] = []

    async def systemctl(self, *args: str) -> str:
        self.calls.append(" ".join(args))
        return ""

    async def main_pid(self, unit: str) -> int:
        return self.pids.pop(0) if len(self.pids) > 1 else self.pids[0]


@pytest.fixture
def nofile_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[RaiseNofileLimit, FakeSystemd, Path]:
    proc, _ = fake_tree(tmp_path, soft=256)
    new = proc / "99"
    new.mkdir()
    (new / "limits").write_text(LIMITS.format(soft=1048576, hard=1048576))
    fake = FakeSystemd(proc, [74, 99])
    monkeypatch.setattr(nofile, "systemctl", fake.systemctl)
    monkeypatch.setattr(nofile, "main_pid", fake.main_pid)
    action = RaiseNofileLimit(
        RaiseNofileLimitParams(do="raise-nofile-limit", dropin_root=str(tmp_path / "run"))
    )
    action.proc = proc
    return action, fake, tmp_path


def ctx() -> ActionContext:
    return ActionContext(FakeUnits({"containerd.service": "active"}), FakeProbe(), FakeClock(), Path("/x"))


async def test_the_fd_limit_is_raised_with_a_marked_drop_in(nofile_env: Any) -> None:
    action, fake, root = nofile_env
    c = ctx()
    step = await action.check(c)
    assert isinstance(step, Step)
    assert "soft limit of 256" in step.summary
    await action.apply(c, step)
    text = (root / "run" / "containerd.service.d" / "90-nodemedic-nofile.conf").read_text()
    assert MARKER in text
    assert "LimitNOFILE=1048576" in text
    assert fake.calls == ["daemon-reload"]
    assert ("restart", "containerd.service") in c.units.calls
    assert "LimitNOFILE 1048576" in await action.verify(c, step)


async def test_a_drop_in_that_is_not_ours_is_never_overwritten(nofile_env: Any) -> None:
    action, _, root = nofile_env
    theirs = root / "run" / "containerd.service.d" / "90-nodemedic-nofile.conf"
    theirs.parent.mkdir(parents=True)
    theirs.write_text("[Service]\nLimitNOFILE=512\n")
    with pytest.raises(UnsafePathError, match="not nodemedic's"):
        await action.check(ctx())
    assert theirs.read_text() == "[Service]\nLimitNOFILE=512\n"


async def test_enough_already_is_skipped_and_a_limit_still_low_fails_verify(nofile_env: Any) -> None:
    action, fake, _ = nofile_env
    fake.pids[:] = [99]
    assert isinstance(await action.check(ctx()), Skip)
    fake.pids[:] = [74, 75]
    (fake.proc / "75").mkdir()
    (fake.proc / "75" / "limits").write_text(LIMITS.format(soft=256, hard=256))
    step = await action.check(ctx())
    assert isinstance(step, Step)
    with pytest.raises(RepairFailedError, match="still has LimitNOFILE 256"):
        await action.verify(ctx(), step)


# ---- gRPC max_concurrent_streams: a key containerd does not read (issue 12) -----------------

CONTAINERD_TOML = "/etc/containerd/config.toml"


def test_a_stream_limit_in_the_config_fires_only_its_report() -> None:
    [m] = match(SHIPPED.rule, GrpcStreamsSetting(CONTAINERD_TOML, "2"))
    assert m.rule.name == "containerd-grpc-streams"
    assert "max_concurrent_streams = 2" in m.trigger
    assert "not in effect" in m.trigger
    assert m.rule.action == [], "report only"
    assert "remove max_concurrent_streams" in (m.rule.advice or "")
    assert fired(GrpcStreamsSetting(CONTAINERD_TOML, "")) == [], "the key not set"
    assert fired(GrpcStreamsSetting("/etc/other.toml", "2")) == [], "another file"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("version = 2\n[grpc]\n  max_concurrent_streams = 2\n", "2"),
        ('[grpc]\nmax_concurrent_streams = "100"\n', '"100"'),
        ("[grpc]\nmax_concurrent_streams = true\n", "true"),
        ("[grpc]\nmax_concurrent_streams = 1979-05-27\n", '"1979-05-27"'),
        (f'[grpc]\nmax_concurrent_streams = "{"x" * 100}"\n', '"' + "x" * 63),
        ('version = 2\n[grpc]\n  address = "/run/containerd/containerd.sock"\n', ""),
        ("version = 2\n", ""),
        ("grpc = 1\n", ""),
        ("[grpc\n", None),
        ("[grpc]\nmax_concurrent_streams = 1" + "0" * 5000 + "\n", None),
        ("\xff", None),
    ],
)
def test_the_setting_as_written(tmp_path: Path, text: str, value: str | None) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b"\xff" if text == "\xff" else text.encode())
    assert streams_setting(path) == value


def test_a_config_that_is_not_a_regular_file_is_never_read(tmp_path: Path) -> None:
    real = tmp_path / "real.toml"
    real.write_text("[grpc]\nmax_concurrent_streams = 2\n")
    link = tmp_path / "config.toml"
    link.symlink_to(real)
    assert streams_setting(link) is None, "a symlink is not followed"
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    assert streams_setting(fifo) is None, "a FIFO is refused without blocking"
    assert streams_setting(tmp_path / "missing.toml") is None


async def test_the_watcher_reads_the_setting_and_parses_only_a_changed_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[grpc]\nmax_concurrent_streams = 2\n")
    policy = parse_policy(
        {"rule": [{"name": "r", "trigger": [{"source": "grpc-streams", "config": str(config)}]}]}
    )
    parsed: list[Path] = []
    real = resources.streams_setting

    def counting(path: Path) -> str | None:
        parsed.append(path)
        return real(path)

    monkeypatch.setattr(resources, "streams_setting", counting)
    events: list[Event] = []
    watch = ResourceWatch(policy.resource_checks(), "containerd.service", 5.0, FakeProbe(), "/s", 1.0,
                          events.append, FakeClock(), main_pid=lambda: 0, proc=tmp_path,
                          cgroup_root=tmp_path)  # fmt: skip
    await watch.read_once()
    await watch.read_once()
    assert events == [GrpcStreamsSetting(str(config), "2", at=1000.0)] * 2, "a reading each time"
    assert len(parsed) == 1, "an unchanged file is not parsed again"
    config.write_text("version = 2\n")
    await watch.read_once()
    assert events[-1] == GrpcStreamsSetting(str(config), "", at=1000.0)
    assert len(parsed) == 2
    config.unlink()
    await watch.read_once()
    assert len(events) == 3, "no file: no reading (the config rule's business)"


@pytest.mark.parametrize("mode", ["enforce", "observe"])
async def test_a_stream_limit_is_reported_once_while_set_and_again_after_it_went(mode: str) -> None:
    sink, tasks = MemorySink(), []
    policy = parse_policy({"daemon": {"mode": mode}, "rule": [{
        "name": "containerd-grpc-streams", "advice": "remove it",
        "trigger": [{"source": "grpc-streams"}],
    }]})  # fmt: skip
    ctx = ActionContext(FakeUnits(), FakeProbe(), FakeClock(), Path("/nonexistent"))
    runner = Executor(policy, ctx, Reporter(sink),
                    lambda c: tasks.append(asyncio.get_running_loop().create_task(c)))  # fmt: skip
    set_, unset = GrpcStreamsSetting(CONTAINERD_TOML, "2"), GrpcStreamsSetting(CONTAINERD_TOML, "")
    for event in (set_, set_, ProbeFailed("/run/containerd/containerd.sock", "x"), set_):
        runner.handle(event)
        await settle(tasks)
    [record] = sink.of(RecordKind.OUTCOME)
    assert (record.fields["OUTCOME"], record.fields["DETAIL"]) == ("reported", "remove it")
    assert "max_concurrent_streams = 2" in record.fields["TRIGGER"]
    runner.handle(unset)  # the key removed: the incident is over
    runner.handle(set_)
    await settle(tasks)
    assert len(sink.of(RecordKind.OUTCOME)) == 2
    assert runner.budget.spent == []


def test_a_hang_never_reads_as_a_stream_limit() -> None:
    hung = ProbeFailed("/run/containerd/containerd.sock", "DEADLINE_EXCEEDED", consecutive=5)
    assert "containerd-grpc-streams" not in fired(hung)
    assert "containerd-hung" not in fired(GrpcStreamsSetting(CONTAINERD_TOML, "2"))
