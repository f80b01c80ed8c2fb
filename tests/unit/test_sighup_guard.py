"""The SIGHUP guard (its core and the executor's handlers for its effects) against fakes at its edges:
systemd, the freezer, a /proc tree, a config file, and a fake clock whose timers the tests fire."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from nodemedic.actions import sighup_dropin as dropin
from nodemedic.actions.base import ActionContext
from nodemedic.configs import GoodConfigs
from nodemedic.core.effects import Instant, Later, Report
from nodemedic.core.nodeview import NodeView
from nodemedic.core.sighup_guard import SighupGuard
from nodemedic.events import Event, FileChanged, SignalSeen, UnitChanged
from nodemedic.executor import Executor
from nodemedic.executor.interventions import GuardParts, SighupInterventions, register
from nodemedic.policy.model import Mode, Policy
from nodemedic.policy.sighup import SighupSettings
from nodemedic.ports import UnitState
from nodemedic.report import MemorySink, Record, Reporter

from .fakes import FakeClock, FakeProbe

pytestmark = pytest.mark.unit

UNIT = "containerd.service"
GOOD = b'version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n'


class FakeSystemd:
    def __init__(self, proc: Path) -> None:
        self.restarts = 0
        self.reloads = 0
        self.pid = 100
        self._proc = proc
        self.ignore_after_restart = True
        self.kills: list[int] = []
        self.during_restart: Callable[[], None] = lambda: None
        self.emit: Callable[[Event], None] = lambda event: None  # the executor's handle

    async def restart(self, unit: str, timeout: float) -> None:
        self.restarts += 1
        self.during_restart()
        self.pid += 1
        write_status(self._proc, self.pid, ignores_hup=self.ignore_after_restart)
        self.emit(UnitChanged(UNIT, "active", "running", main_pid=self.pid))

    async def kill(self, unit: str, signal: int) -> None:
        self.kills.append(signal)

    async def state(self, unit: str) -> UnitState:
        return UnitState("loaded", "active", "running")

    async def stop(self, unit: str, timeout: float) -> None:
        raise AssertionError("the guard never stops containerd")

    async def start(self, unit: str, timeout: float) -> None:
        raise AssertionError("the guard never starts containerd")

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
    """An executor with the guard registered, and its job loop running (stopped by ``stop``)."""

    def __init__(
        self,
        tmp: Path,
        mode: str,
        daemon_mode: Mode = "enforce",
        budget: dict[str, object] | None = None,
        **coalesce: object,
    ) -> None:
        self.tmp = tmp
        self.clock = FakeClock()
        self.sink = MemorySink()
        self.proc = tmp / "proc"
        write_status(self.proc, 100, ignores_hup=False)
        self.config = tmp / "config.toml"
        self.config.write_bytes(GOOD)
        self.systemd = FakeSystemd(self.proc)
        self.freezer = FakeFreezer()
        self.settings = SighupSettings.model_validate(
            {"mode": mode, "coalesce": {"interval": "30s", **coalesce}, "storm": {"signals": 3}}
        )
        policy = Policy.model_validate({"daemon": {"mode": daemon_mode, "budget": budget or {}}})
        ctx = ActionContext(
            units=self.systemd,
            probe=FakeProbe(),
            clock=self.clock,
            quarantine_dir=tmp / "q",
            good_configs=GoodConfigs(tmp / "good"),
        )
        self.ex = Executor(policy, ctx, Reporter(self.sink), asyncio.get_running_loop().create_task)
        self.lock = self.ex.lock  # the executor's repair lock
        self.systemd.emit = self.ex.handle
        parts = GuardParts(
            systemd=self.systemd,
            freezer=self.freezer,
            config=self.config,
            state_file=tmp / "state" / "sighup.json",
            probe_socket="/x.sock",
            probe_timeout=1,
            dropin_root=tmp / "root",
            proc=self.proc,
        )
        self.guard: SighupInterventions = register(self.ex, self.settings, daemon_mode, parts)
        self.task = asyncio.get_running_loop().create_task(self.guard.run())

    async def turn(self) -> None:
        """What the guard's old turn did: every job queued so far, done."""
        await self.guard.idle()

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.clock.run_due()

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    def handle(self, event: Event) -> None:
        self.ex.handle(event)

    def containerd_runs(self, pid: int = 100) -> None:
        self.handle(UnitChanged(UNIT, "active", "running", main_pid=pid))

    def sighup(self, sender: str = "/system.slice/toolkit.service", source: str = "tracefs") -> None:
        self.handle(
            SignalSeen(
                1,
                self.systemd.pid,
                unit=UNIT,
                sender_pid=7,
                sender_comm="sh",
                sender_cgroup=sender,
                sender_unit=sender.rsplit("/", 1)[-1],
                source=source,
            )
        )

    def outcomes(self) -> list[str]:
        return [r.fields.get("OUTCOME", "") for r in self.sink.records]

    def with_outcome(self, outcome: str) -> list[Record]:
        return [r for r in self.sink.records if r.fields.get("OUTCOME") == outcome]

    @property
    def dropin(self) -> Path:
        return dropin.dropin_path(UNIT, False, self.tmp / "root")


Make = Callable[..., Setup]


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Make]:
    """``make(mode, daemon_mode=..., **coalesce)``: a Setup in tmp_path, its loop stopped at the end."""
    made: list[Setup] = []

    def factory(mode: str, daemon_mode: Mode = "enforce", **kwargs: object) -> Setup:
        made.append(Setup(tmp_path, mode, daemon_mode, **kwargs))  # type: ignore[arg-type]
        return made[-1]

    yield factory
    for setup in made:
        await setup.stop()


async def entered(make: Make, mode: str) -> Setup:
    """A coalesce setup whose containerd already ignores SIGHUP, with the mode entered."""
    s = make(mode)
    write_status(s.proc, 100, ignores_hup=True)
    s.containerd_runs()
    await s.turn()
    return s


async def test_single_sighups_are_reported_each_and_a_storm_once_with_its_end(make: Make) -> None:
    s = make("observe")
    s.containerd_runs()
    for _ in range(10):
        s.sighup()
        s.advance(1)
    assert s.outcomes().count("sighup") == 3
    (storm,) = s.with_outcome("storm")
    assert storm.fields["SIGNALS"] == "4"
    assert "toolkit.service (pid 7 sh) x4" in storm.fields["SENDERS"]
    s.advance(61)
    await s.turn()
    (ended,) = s.with_outcome("storm-ended")
    assert ended.fields["SIGNALS"] == "10"
    assert s.systemd.restarts == 0
    assert not s.dropin.exists()


async def test_a_death_the_trace_already_saw_is_not_counted_twice(make: Make) -> None:
    s = make("observe")
    s.sighup()
    s.sighup(source="dbus")
    assert s.outcomes().count("sighup") == 1
    s.advance(11)
    s.sighup(source="dbus")
    assert s.outcomes().count("sighup") == 2
    assert "unknown sender" in s.sink.records[-1].message


async def test_coalesce_installs_the_dropin_and_restarts_once_to_apply_it(make: Make) -> None:
    s = make("coalesce")
    s.containerd_runs()
    await s.turn()
    text = s.dropin.read_text()
    assert "ExecStart=/usr/bin/env --ignore-signal=HUP /usr/bin/containerd" in text
    assert s.systemd.reloads == 1
    assert s.systemd.restarts == 1
    assert s.systemd.kills == [9]  # abrupt, as the SIGHUP was: the socket file stays on disk
    assert s.outcomes()[-1] == "dropin-applied"
    await s.turn()
    assert s.systemd.restarts == 1  # applied: no second restart


async def test_coalesce_does_not_restart_a_containerd_that_already_ignores_sighup(make: Make) -> None:
    s = await entered(make, "coalesce")
    assert s.systemd.restarts == 0


async def test_sighups_without_a_change_cause_no_restart_and_a_change_one(make: Make) -> None:
    s = await entered(make, "coalesce")
    for _ in range(50):
        s.sighup()
        await s.turn()
    assert s.systemd.restarts == 0
    s.config.write_bytes(GOOD + b"# a real change\n")
    for _ in range(50):
        s.sighup()
        s.handle(FileChanged(str(s.config)))
    s.advance(1)  # past the settle time of a write
    await s.turn()
    assert s.systemd.restarts == 1
    (applied,) = s.with_outcome("reload-applied")
    assert applied.fields["SIGNALS"] == "100"
    assert list((s.tmp / "good").glob("*.toml"))  # the content that ran is kept first
    for _ in range(5):
        s.sighup()
        await s.turn()
    assert s.systemd.restarts == 1


async def test_changes_within_the_interval_are_coalesced_into_one_later_restart(make: Make) -> None:
    s = await entered(make, "coalesce")
    s.config.write_bytes(GOOD + b"# 1\n")
    s.handle(FileChanged(str(s.config)))
    s.advance(1)  # past the settle time of a write
    await s.turn()
    assert s.systemd.restarts == 1
    s.config.write_bytes(GOOD + b"# 2\n")
    s.handle(FileChanged(str(s.config)))
    s.config.write_bytes(GOOD + b"# 3\n")
    s.handle(FileChanged(str(s.config)))
    s.advance(1)  # past the settle time of a write
    await s.turn()
    assert s.systemd.restarts == 1  # within the interval
    s.advance(30)
    await s.turn()
    assert s.systemd.restarts == 2
    assert s.with_outcome("reload-applied")[-1].fields["SIGNALS"] == "2"


async def test_a_change_containerd_would_refuse_is_reported_and_not_applied(make: Make) -> None:
    s = await entered(make, "coalesce")
    s.config.write_bytes(b"[plugins\n")
    s.handle(FileChanged(str(s.config)))
    s.sighup()
    s.advance(1)  # past the settle time of a write
    await s.turn()
    assert s.systemd.restarts == 0
    (refused,) = s.with_outcome("reload-refused")
    assert "not valid TOML" in refused.fields["DETAIL"]


async def test_a_config_nodemedic_does_not_read_is_reported_once_and_not_applied(make: Make) -> None:
    """A symlink at config.toml is never followed: the toolkit's reload is refused with a record
    (it was dropped silently), once, not at every SIGHUP."""
    s = await entered(make, "coalesce")
    target = s.tmp / "elsewhere.toml"
    target.write_bytes(GOOD + b"# linked\n")
    s.config.unlink()
    s.config.symlink_to(target)
    for _ in range(3):
        s.handle(FileChanged(str(s.config)))
        s.sighup()
        s.advance(31)
        await s.turn()
    assert s.systemd.restarts == 0
    (refused,) = s.with_outcome("reload-refused")
    assert "never followed" in refused.fields["DETAIL"]


async def test_leaving_coalesce_removes_the_dropin(make: Make) -> None:
    s = make("coalesce")
    s.containerd_runs()
    await s.turn()
    assert s.dropin.exists()
    s.guard.replace(SighupSettings(mode="observe"), "enforce")
    await s.turn()
    assert not s.dropin.exists()
    assert "dropin-removed" in s.outcomes()


async def test_observe_daemon_installs_nothing_and_says_what_it_would_do(make: Make) -> None:
    s = make("coalesce", daemon_mode="observe")
    s.containerd_runs()
    await s.turn()
    assert not s.dropin.exists()
    assert s.systemd.restarts == 0
    assert s.with_outcome("would-do")[0].fields["ACTION"] == "sighup-dropin"


async def test_throttle_freezes_a_sender_over_budget_and_thaws_it_after_the_cooldown(make: Make) -> None:
    s = make("throttle")
    s.containerd_runs()
    for _ in range(3):
        s.sighup()
    await s.turn()
    assert s.freezer.frozen_until == {}
    s.sighup()
    await s.turn()
    assert list(s.freezer.frozen_until) == ["/system.slice/toolkit.service"]
    assert "frozen" in s.outcomes()
    s.advance(301)
    await s.turn()
    assert s.freezer.frozen_until == {}
    assert "thawed" in s.outcomes()


async def test_throttle_never_freezes_a_refused_sender_and_says_why_once(make: Make) -> None:
    s = make("throttle")
    s.freezer.refuse["/system.slice/kubelet.service"] = "kubelet.service is on the deny list"
    for _ in range(10):
        s.sighup("/system.slice/kubelet.service")
    await s.turn()
    assert s.freezer.frozen_until == {}
    assert len(s.with_outcome("refused")) == 1


async def test_leaving_throttle_thaws_everything(make: Make) -> None:
    s = make("throttle")
    for _ in range(5):
        s.sighup()
    await s.turn()
    assert s.freezer.frozen_until
    s.guard.replace(SighupSettings(mode="observe"), "enforce")
    await s.turn()
    assert s.freezer.frozen_until == {}


async def test_a_change_made_while_nodemedic_was_down_is_applied_when_it_is_back(make: Make) -> None:
    first = await entered(make, "coalesce")  # the first nodemedic: it records what containerd runs
    assert (first.tmp / "state" / "sighup.json").exists()
    again = make("coalesce")  # same state dir; containerd kept pid 100
    again.config.write_bytes(GOOD + b"# changed while nodemedic was down\n")
    write_status(again.proc, 100, ignores_hup=True)
    again.containerd_runs()
    await again.turn()  # the mode is entered: the change is due after the settle time
    again.advance(1)
    await again.turn()
    assert again.systemd.restarts == 1
    assert again.with_outcome("reload-applied")


async def test_turning_observe_off_installs_what_was_only_reported(make: Make) -> None:
    s = make("coalesce", daemon_mode="observe")
    s.containerd_runs()
    await s.turn()
    assert not s.dropin.exists()
    s.guard.replace(s.settings, "enforce")
    await s.turn()
    assert s.dropin.exists()
    assert "dropin-installed" in s.outcomes()


async def test_a_config_that_appears_later_is_applied(make: Make) -> None:
    s = make("coalesce")
    s.config.unlink()
    write_status(s.proc, 100, ignores_hup=True)
    s.containerd_runs()
    await s.turn()
    s.config.write_bytes(GOOD)
    s.handle(FileChanged(str(s.config)))
    s.advance(1)
    await s.turn()
    assert s.systemd.restarts == 1


async def test_a_reload_waiting_for_a_repair_checks_again_under_the_lock(make: Make) -> None:
    s = await entered(make, "coalesce")
    s.config.write_bytes(GOOD + b"# change\n")
    s.handle(FileChanged(str(s.config)))
    s.advance(1)
    async with s.lock:  # a repair is running...
        turn = asyncio.create_task(s.turn())
        for _ in range(20):  # the reload's job runs up to the lock, and waits there
            await asyncio.sleep(0)
        assert not turn.done()
        s.config.write_bytes(GOOD)  # ...and restores the content containerd runs with
    await turn
    assert s.systemd.restarts == 0


async def test_a_write_during_a_restart_waits_a_whole_interval(make: Make) -> None:
    s = await entered(make, "coalesce")

    def written_meanwhile() -> None:
        s.config.write_bytes(GOOD + b"# second\n")
        s.handle(FileChanged(str(s.config)))

    s.config.write_bytes(GOOD + b"# first\n")
    s.handle(FileChanged(str(s.config)))
    s.advance(1)
    s.systemd.during_restart = written_meanwhile
    await s.turn()
    s.systemd.during_restart = lambda: None
    assert s.systemd.restarts == 1
    s.advance(1)
    await s.turn()
    assert s.systemd.restarts == 1
    s.advance(30)
    await s.turn()
    assert s.systemd.restarts == 2


async def test_after_leaving_coalesce_changes_are_applied_until_a_stock_start(make: Make) -> None:
    s = await entered(make, "coalesce")
    s.guard.replace(SighupSettings(mode="observe"), "enforce")
    await s.turn()
    assert not s.dropin.exists()
    assert "keeps applying" in s.with_outcome("dropin-removed")[0].message
    s.systemd.ignore_after_restart = False
    s.config.write_bytes(GOOD + b"# change\n")
    s.handle(FileChanged(str(s.config)))
    s.advance(1)
    await s.turn()
    assert s.systemd.restarts == 1  # the change was not lost
    s.config.write_bytes(GOOD + b"# another\n")
    s.handle(FileChanged(str(s.config)))
    s.advance(60)
    await s.turn()
    assert s.systemd.restarts == 1  # containerd is stock again: its own SIGHUP handling applies


async def test_a_sender_whose_cgroup_vanishes_is_not_frozen_and_nothing_crashes(make: Make) -> None:
    s = make("throttle")

    def vanished(cgroup: str) -> str | None:
        raise FileNotFoundError(cgroup)

    s.freezer.refusal = vanished  # type: ignore[method-assign]
    for _ in range(5):
        s.sighup()
    await s.turn()
    assert s.freezer.frozen_until == {}
    assert "could not be read" in s.with_outcome("refused")[0].fields["DETAIL"]


async def test_a_reload_takes_the_new_deny_list_but_keeps_the_unit_until_a_restart(make: Make) -> None:
    s = make("throttle")
    s.guard.replace(
        SighupSettings(mode="throttle", unit="other.service", throttle={"deny": ["x.service"]}), "enforce"
    )
    assert s.freezer.deny == ["x.service"]
    assert s.guard.settings.unit == UNIT


async def test_a_freeze_cut_off_by_the_stop_finishes_and_is_thawed(make: Make) -> None:
    s = make("throttle")
    slow_freeze = s.freezer.freeze
    under_way = threading.Event()

    def freeze(cgroup: str, until_wall: float) -> None:
        under_way.set()
        time.sleep(0.3)  # the kernel takes its time
        slow_freeze(cgroup, until_wall)

    s.freezer.freeze = freeze  # type: ignore[method-assign]
    for _ in range(5):
        s.sighup()
    await asyncio.to_thread(under_way.wait, 5)  # the freeze is under way in its thread
    await s.stop()
    assert s.freezer.frozen_until == {}
    assert "thawed" in s.outcomes()


async def test_a_coalesce_restart_is_held_by_the_spent_repair_budget_and_applied_when_it_allows(
    make: Make,
) -> None:
    s = make("coalesce", budget={"repairs": 1, "window": "60s"})
    write_status(s.proc, 100, ignores_hup=True)
    s.containerd_runs()
    await s.turn()
    s.ex.spend_budget(s.ex.now())  # a repair restarted containerd just now
    s.config.write_bytes(GOOD + b"# change\n")
    s.handle(FileChanged(str(s.config)))
    s.advance(1)
    await s.turn()
    assert s.systemd.restarts == 0
    (held,) = s.with_outcome("held")
    assert held.fields["RULE"] == "sighup"
    assert held.fields["ACTION"] == "sighup-reload"
    assert "global repair budget" in held.fields["DETAIL"]
    s.advance(30)
    await s.turn()
    assert s.systemd.restarts == 0
    assert len(s.with_outcome("held")) == 1  # said once
    s.advance(30)  # the repair's restart is out of the window
    await s.turn()
    assert s.systemd.restarts == 1
    assert s.with_outcome("reload-applied")[0].fields["SIGNALS"] == "1"
    assert len(s.ex.budget.spent) == 1  # the reload's restart counts


async def test_the_dropin_restart_spends_the_repair_budget(make: Make) -> None:
    s = make("coalesce")
    s.containerd_runs()
    await s.turn()
    assert s.systemd.restarts == 1
    assert len(s.ex.budget.spent) == 1


async def test_nothing_is_restarted_once_nodemedic_is_stopping(make: Make) -> None:
    s = await entered(make, "coalesce")
    s.ex.closing = True
    s.config.write_bytes(GOOD + b"# change\n")
    s.handle(FileChanged(str(s.config)))
    s.advance(1)
    await s.turn()
    assert s.systemd.restarts == 0


async def test_observe_daemon_freezes_nothing_and_says_what_it_would_freeze(make: Make) -> None:
    s = make("throttle", daemon_mode="observe")
    for _ in range(5):
        s.sighup()
    await s.turn()
    assert s.freezer.frozen_until == {}
    (would,) = s.with_outcome("would-do")
    assert would.fields["ACTION"] == "freeze-sender"


def test_the_core_alone_ends_a_storm_with_one_timer_and_no_turns() -> None:
    """The pure core: events and instants in, effects out; the storm's end is one timer armed
    a window after its last signal, looked at again if signals came meanwhile."""
    settings = SighupSettings.model_validate({"mode": "observe", "storm": {"signals": 3, "window": "10s"}})
    core = SighupGuard(settings, "enforce", NodeView(), "/etc/containerd/config.toml")
    effects = []
    for t in range(5):
        event = SignalSeen(
            1, 100, unit=UNIT, sender_pid=7, sender_comm="sh", sender_cgroup="/x.service", source="tracefs"
        )
        effects += core.handle(event, Instant(float(t), 1e9 + t))
    (timer,) = [e for e in effects if isinstance(e, Later)]
    assert timer.delay == 10  # began at t=3
    (again,) = timer.then(Instant(13.0, 1e9 + 13))  # t=4 came: not over yet
    assert isinstance(again, Later)
    assert again.delay == pytest.approx(1)
    (ended,) = again.then(Instant(14.0, 1e9 + 14))
    assert isinstance(ended, Report)
    assert ended.fields["OUTCOME"] == "storm-ended"
    assert ended.fields["SIGNALS"] == 5


async def test_a_restart_that_brings_no_new_main_process_is_said(make: Make) -> None:
    """systemd took the restart job but no new containerd came: the budget is spent, and that is
    written (it was silent, and only counted at the next restart)."""
    s = make("coalesce")
    s.systemd.emit = lambda event: None  # the new process is never reported
    s.containerd_runs()
    s.clock.tick = 10.0  # the wait for the new main process runs out at once
    await s.turn()
    [failed] = [r for r in s.with_outcome("failed") if r.fields.get("ACTION") == "restart-unit"]
    assert "no new main process came after the restart" in failed.message
    assert len(s.ex.budget.spent) == 1
