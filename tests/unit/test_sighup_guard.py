"""The SIGHUP guard against fakes at its edges: systemd, the freezer, a /proc tree, a config file."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import pytest

from nodemedic.actions import sighup_dropin as dropin
from nodemedic.configs import GoodConfigs
from nodemedic.engine.sighup import GuardContext, SighupGuard
from nodemedic.events import FileChanged, SignalSeen, UnitChanged
from nodemedic.policy.model import Mode
from nodemedic.policy.sighup import SighupSettings
from nodemedic.report import MemorySink, Record, Reporter

from .fakes import FakeClock, FakeProbe

pytestmark = pytest.mark.unit

UNIT = "containerd.service"
GOOD = b'version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n'


class FakeSystemd:
    def __init__(self, guard: list[SighupGuard], proc: Path) -> None:
        self.restarts = 0
        self.reloads = 0
        self.pid = 100
        self._guard = guard
        self._proc = proc
        self.ignore_after_restart = True
        self.kills: list[int] = []
        self.during_restart: Callable[[], None] = lambda: None

    async def restart(self, unit: str, timeout: float) -> None:
        self.restarts += 1
        self.during_restart()
        self.pid += 1
        write_status(self._proc, self.pid, ignores_hup=self.ignore_after_restart)
        self._guard[0].handle(UnitChanged(UNIT, "active", "running", main_pid=self.pid))

    async def kill(self, unit: str, signal: int) -> None:
        self.kills.append(signal)

    async def exec_start(self, unit: str) -> list[list[str]]:
        return [["/usr/bin/containerd"]]

    async def daemon_reload(self) -> None:
        self.reloads += 1


class FakeFreezer:
    def __init__(self) -> None:
        self.deny: list[str] = []
        self.frozen_until: dict[str, float] = {}
        self.refuse: dict[str, str] = {}

    def refusal(self, cgroup: str) -> str | None:
        return self.refuse.get(cgroup)

    def freeze(self, cgroup: str, until_wall: float) -> None:
        self.frozen_until[cgroup] = until_wall

    def frozen(self) -> dict[str, float]:
        return dict(self.frozen_until)

    def thaw_all(self) -> list[str]:
        thawed = sorted(self.frozen_until)
        self.frozen_until.clear()
        return thawed

    def thaw_due(self, now_wall: float) -> list[str]:
        due = sorted(c for c, t in self.frozen_until.items() if t <= now_wall)
        for c in due:
            del self.frozen_until[c]
        return due


def write_status(proc: Path, pid: int, *, ignores_hup: bool) -> None:
    (proc / str(pid)).mkdir(parents=True, exist_ok=True)
    mask = "0000000000000001" if ignores_hup else "0000000000000000"
    (proc / str(pid) / "status").write_text(f"Name:\tcontainerd\nSigIgn:\t{mask}\n")


class Setup:
    def __init__(self, tmp: Path, mode: str, daemon_mode: Mode = "enforce", **coalesce: object) -> None:
        self.tmp = tmp
        self.clock = FakeClock()
        self.sink = MemorySink()
        self.proc = tmp / "proc"
        write_status(self.proc, 100, ignores_hup=False)
        self.config = tmp / "config.toml"
        self.config.write_bytes(GOOD)
        holder: list[SighupGuard] = []
        self.lock = asyncio.Lock()  # the runner's repair lock
        self.systemd = FakeSystemd(holder, self.proc)
        self.freezer = FakeFreezer()
        self.settings = SighupSettings.model_validate(
            {"mode": mode, "coalesce": {"interval": "30s", **coalesce}, "storm": {"signals": 3}}
        )
        ctx = GuardContext(systemd=self.systemd, probe=FakeProbe(), probe_socket="/x.sock", probe_timeout=1,
                           config=self.config, good=GoodConfigs(tmp / "good"), freezer=self.freezer,
                           state_file=tmp / "state" / "sighup.json", exclusive=lambda: self.lock,
                           closing=lambda: False, dropin_root=tmp / "root", proc=self.proc)  # fmt: skip
        self.guard = SighupGuard(self.settings, daemon_mode, ctx, Reporter(self.sink), self.clock)
        holder.append(self.guard)

    def containerd_runs(self, pid: int = 100) -> None:
        self.guard.handle(UnitChanged(UNIT, "active", "running", main_pid=pid))

    def sighup(self, sender: str = "/system.slice/toolkit.service", source: str = "tracefs") -> None:
        self.guard.handle(SignalSeen(1, self.systemd.pid, unit=UNIT, sender_pid=7, sender_comm="sh",
                                     sender_cgroup=sender, sender_unit=sender.rsplit("/", 1)[-1],
                                     source=source))  # fmt: skip

    def outcomes(self) -> list[str]:
        return [r.fields.get("OUTCOME", "") for r in self.sink.records]

    def with_outcome(self, outcome: str) -> list[Record]:
        return [r for r in self.sink.records if r.fields.get("OUTCOME") == outcome]

    @property
    def dropin(self) -> Path:
        return dropin.dropin_path(UNIT, False, self.tmp / "root")


async def entered(mode: str, tmp_path: Path) -> Setup:
    """A coalesce setup whose containerd already ignores SIGHUP, with the mode entered."""
    s = Setup(tmp_path, mode)
    write_status(s.proc, 100, ignores_hup=True)
    s.containerd_runs()
    await s.guard.step()
    return s


async def test_single_sighups_are_reported_each_and_a_storm_once_with_its_end(tmp_path: Path) -> None:
    s = Setup(tmp_path, "observe")
    s.containerd_runs()
    for _ in range(10):
        s.sighup()
        s.clock.advance(1)
    assert s.outcomes().count("sighup") == 3
    (storm,) = s.with_outcome("storm")
    assert storm.fields["SIGNALS"] == "4"
    assert "toolkit.service (pid 7 sh) x4" in storm.fields["SENDERS"]
    s.clock.advance(61)
    await s.guard.step()
    (ended,) = s.with_outcome("storm-ended")
    assert ended.fields["SIGNALS"] == "10"
    assert s.systemd.restarts == 0
    assert not s.dropin.exists()


async def test_a_death_the_trace_already_saw_is_not_counted_twice(tmp_path: Path) -> None:
    s = Setup(tmp_path, "observe")
    s.sighup()
    s.sighup(source="dbus")
    assert s.outcomes().count("sighup") == 1
    s.clock.advance(11)
    s.sighup(source="dbus")
    assert s.outcomes().count("sighup") == 2
    assert "unknown sender" in s.sink.records[-1].message


async def test_coalesce_installs_the_dropin_and_restarts_once_to_apply_it(tmp_path: Path) -> None:
    s = Setup(tmp_path, "coalesce")
    s.containerd_runs()
    await s.guard.step()
    text = s.dropin.read_text()
    assert "ExecStart=/usr/bin/env --ignore-signal=HUP /usr/bin/containerd" in text
    assert s.systemd.reloads == 1
    assert s.systemd.restarts == 1
    assert s.systemd.kills == [9]  # abrupt, as the SIGHUP was: the socket file stays on disk
    assert s.outcomes()[-1] == "dropin-applied"
    await s.guard.step()
    assert s.systemd.restarts == 1  # applied: no second restart


async def test_coalesce_does_not_restart_a_containerd_that_already_ignores_sighup(tmp_path: Path) -> None:
    s = await entered("coalesce", tmp_path)
    assert s.systemd.restarts == 0


async def test_sighups_without_a_change_cause_no_restart_and_a_change_one(tmp_path: Path) -> None:
    s = await entered("coalesce", tmp_path)
    for _ in range(50):
        s.sighup()
        await s.guard.step()
    assert s.systemd.restarts == 0
    s.config.write_bytes(GOOD + b"# a real change\n")
    for _ in range(50):
        s.sighup()
        s.guard.handle(FileChanged(str(s.config)))
    s.clock.advance(1)  # past the settle time of a write
    await s.guard.step()
    assert s.systemd.restarts == 1
    (applied,) = s.with_outcome("reload-applied")
    assert applied.fields["SIGNALS"] == "100"
    assert list((tmp_path / "good").glob("*.toml"))  # the content that ran is kept first
    for _ in range(5):
        s.sighup()
        await s.guard.step()
    assert s.systemd.restarts == 1


async def test_changes_within_the_interval_are_coalesced_into_one_later_restart(tmp_path: Path) -> None:
    s = await entered("coalesce", tmp_path)
    s.config.write_bytes(GOOD + b"# 1\n")
    s.guard.handle(FileChanged(str(s.config)))
    s.clock.advance(1)  # past the settle time of a write
    await s.guard.step()
    assert s.systemd.restarts == 1
    s.config.write_bytes(GOOD + b"# 2\n")
    s.guard.handle(FileChanged(str(s.config)))
    s.config.write_bytes(GOOD + b"# 3\n")
    s.guard.handle(FileChanged(str(s.config)))
    s.clock.advance(1)  # past the settle time of a write
    await s.guard.step()
    assert s.systemd.restarts == 1  # within the interval
    s.clock.advance(30)
    await s.guard.step()
    assert s.systemd.restarts == 2
    assert s.with_outcome("reload-applied")[-1].fields["SIGNALS"] == "2"


async def test_a_change_containerd_would_refuse_is_reported_and_not_applied(tmp_path: Path) -> None:
    s = await entered("coalesce", tmp_path)
    s.config.write_bytes(b"[plugins\n")
    s.guard.handle(FileChanged(str(s.config)))
    s.sighup()
    s.clock.advance(1)  # past the settle time of a write
    await s.guard.step()
    assert s.systemd.restarts == 0
    (refused,) = s.with_outcome("reload-refused")
    assert "not valid TOML" in refused.fields["DETAIL"]


async def test_a_config_nodemedic_does_not_read_is_reported_once_and_not_applied(tmp_path: Path) -> None:
    """A symlink at config.toml is never followed: the toolkit's reload is refused with a record
    (it was dropped silently), once, not at every SIGHUP."""
    s = await entered("coalesce", tmp_path)
    target = tmp_path / "elsewhere.toml"
    target.write_bytes(GOOD + b"# linked\n")
    s.config.unlink()
    s.config.symlink_to(target)
    for _ in range(3):
        s.guard.handle(FileChanged(str(s.config)))
        s.sighup()
        s.clock.advance(31)
        await s.guard.step()
    assert s.systemd.restarts == 0
    (refused,) = s.with_outcome("reload-refused")
    assert "never followed" in refused.fields["DETAIL"]


async def test_leaving_coalesce_removes_the_dropin(tmp_path: Path) -> None:
    s = Setup(tmp_path, "coalesce")
    s.containerd_runs()
    await s.guard.step()
    assert s.dropin.exists()
    s.guard.replace(SighupSettings(mode="observe"), "enforce")
    await s.guard.step()
    assert not s.dropin.exists()
    assert "dropin-removed" in s.outcomes()


async def test_observe_daemon_installs_nothing_and_says_what_it_would_do(tmp_path: Path) -> None:
    s = Setup(tmp_path, "coalesce", daemon_mode="observe")
    s.containerd_runs()
    await s.guard.step()
    assert not s.dropin.exists()
    assert s.systemd.restarts == 0
    assert s.with_outcome("would-do")[0].fields["ACTION"] == "sighup-dropin"


async def test_throttle_freezes_a_sender_over_budget_and_thaws_it_after_the_cooldown(tmp_path: Path) -> None:
    s = Setup(tmp_path, "throttle")
    s.containerd_runs()
    for _ in range(3):
        s.sighup()
    await s.guard.step()
    assert s.freezer.frozen_until == {}
    s.sighup()
    await s.guard.step()
    assert list(s.freezer.frozen_until) == ["/system.slice/toolkit.service"]
    assert "frozen" in s.outcomes()
    s.clock.advance(301)
    await s.guard.step()
    assert s.freezer.frozen_until == {}
    assert "thawed" in s.outcomes()


async def test_throttle_never_freezes_a_refused_sender_and_says_why_once(tmp_path: Path) -> None:
    s = Setup(tmp_path, "throttle")
    s.freezer.refuse["/system.slice/kubelet.service"] = "kubelet.service is on the deny list"
    for _ in range(10):
        s.sighup("/system.slice/kubelet.service")
    await s.guard.step()
    assert s.freezer.frozen_until == {}
    assert len(s.with_outcome("refused")) == 1


async def test_leaving_throttle_thaws_everything(tmp_path: Path) -> None:
    s = Setup(tmp_path, "throttle")
    for _ in range(5):
        s.sighup()
    await s.guard.step()
    assert s.freezer.frozen_until
    s.guard.replace(SighupSettings(mode="observe"), "enforce")
    await s.guard.step()
    assert s.freezer.frozen_until == {}


async def test_a_change_made_while_nodemedic_was_down_is_applied_when_it_is_back(tmp_path: Path) -> None:
    await entered("coalesce", tmp_path)  # the first nodemedic: it records what containerd runs
    assert (tmp_path / "state" / "sighup.json").exists()
    again = Setup(tmp_path, "coalesce")  # same state dir; containerd kept pid 100
    again.config.write_bytes(GOOD + b"# changed while nodemedic was down\n")
    write_status(again.proc, 100, ignores_hup=True)
    again.containerd_runs()
    await again.guard.step()  # the mode is entered: the change is due after the settle time
    again.clock.advance(1)
    await again.guard.step()
    assert again.systemd.restarts == 1
    assert again.with_outcome("reload-applied")


async def test_turning_observe_off_installs_what_was_only_reported(tmp_path: Path) -> None:
    s = Setup(tmp_path, "coalesce", daemon_mode="observe")
    s.containerd_runs()
    await s.guard.step()
    assert not s.dropin.exists()
    s.guard.replace(s.settings, "enforce")
    await s.guard.step()
    assert s.dropin.exists()
    assert "dropin-installed" in s.outcomes()


async def test_a_config_that_appears_later_is_applied(tmp_path: Path) -> None:
    s = Setup(tmp_path, "coalesce")
    s.config.unlink()
    write_status(s.proc, 100, ignores_hup=True)
    s.containerd_runs()
    await s.guard.step()
    s.config.write_bytes(GOOD)
    s.guard.handle(FileChanged(str(s.config)))
    s.clock.advance(1)
    await s.guard.step()
    assert s.systemd.restarts == 1


async def test_a_reload_waiting_for_a_repair_checks_again_under_the_lock(tmp_path: Path) -> None:
    s = await entered("coalesce", tmp_path)
    s.config.write_bytes(GOOD + b"# change\n")
    s.guard.handle(FileChanged(str(s.config)))
    s.clock.advance(1)
    async with s.lock:  # a repair is running...
        turn = asyncio.create_task(s.guard.step())
        await asyncio.sleep(0.05)
        assert not turn.done()
        s.config.write_bytes(GOOD)  # ...and restores the content containerd runs with
    await turn
    assert s.systemd.restarts == 0


async def test_a_write_during_a_restart_waits_a_whole_interval(tmp_path: Path) -> None:
    s = await entered("coalesce", tmp_path)

    def written_meanwhile() -> None:
        s.config.write_bytes(GOOD + b"# second\n")
        s.guard.handle(FileChanged(str(s.config)))

    s.config.write_bytes(GOOD + b"# first\n")
    s.guard.handle(FileChanged(str(s.config)))
    s.clock.advance(1)
    s.systemd.during_restart = written_meanwhile
    await s.guard.step()
    s.systemd.during_restart = lambda: None
    assert s.systemd.restarts == 1
    s.clock.advance(1)
    await s.guard.step()
    assert s.systemd.restarts == 1
    s.clock.advance(30)
    await s.guard.step()
    assert s.systemd.restarts == 2


async def test_after_leaving_coalesce_changes_are_applied_until_a_stock_start(
    tmp_path: Path,
) -> None:
    s = await entered("coalesce", tmp_path)
    s.guard.replace(SighupSettings(mode="observe"), "enforce")
    await s.guard.step()
    assert not s.dropin.exists()
    assert "keeps applying" in s.with_outcome("dropin-removed")[0].message
    s.systemd.ignore_after_restart = False
    s.config.write_bytes(GOOD + b"# change\n")
    s.guard.handle(FileChanged(str(s.config)))
    s.clock.advance(1)
    await s.guard.step()
    assert s.systemd.restarts == 1  # the change was not lost
    s.config.write_bytes(GOOD + b"# another\n")
    s.guard.handle(FileChanged(str(s.config)))
    s.clock.advance(60)
    await s.guard.step()
    assert s.systemd.restarts == 1  # containerd is stock again: its own SIGHUP handling applies


async def test_a_sender_whose_cgroup_vanishes_is_not_frozen_and_nothing_crashes(tmp_path: Path) -> None:
    s = Setup(tmp_path, "throttle")

    def vanished(cgroup: str) -> str | None:
        raise FileNotFoundError(cgroup)

    s.freezer.refusal = vanished  # type: ignore[method-assign]
    for _ in range(5):
        s.sighup()
    await s.guard.step()
    assert s.freezer.frozen_until == {}
    assert "could not be read" in s.with_outcome("refused")[0].fields["DETAIL"]


async def test_a_reload_takes_the_new_deny_list_but_keeps_the_unit_until_a_restart(tmp_path: Path) -> None:
    s = Setup(tmp_path, "throttle")
    s.guard.replace(SighupSettings(mode="throttle", unit="other.service", throttle={"deny": ["x.service"]}),
                    "enforce")  # fmt: skip
    assert s.freezer.deny == ["x.service"]
    assert s.guard.settings.unit == UNIT


async def test_a_freeze_cut_off_by_the_stop_finishes_and_is_thawed(tmp_path: Path) -> None:
    import time

    s = Setup(tmp_path, "throttle")
    slow_freeze = s.freezer.freeze

    def freeze(cgroup: str, until_wall: float) -> None:
        time.sleep(0.3)  # the kernel takes its time
        slow_freeze(cgroup, until_wall)

    s.freezer.freeze = freeze  # type: ignore[method-assign]
    for _ in range(5):
        s.sighup()
    task = asyncio.create_task(s.guard.run())
    await asyncio.sleep(0.1)  # the freeze is under way in its thread
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert s.freezer.frozen_until == {}
    assert "thawed" in s.outcomes()
