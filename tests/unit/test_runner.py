"""The runner with real files in a temporary directory; systemd and containerd faked at the edges."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nodemedic.actions.base import ActionContext, Step
from nodemedic.events import JournalLine, PathChanged, PathKind, UnitChanged
from nodemedic.executor import Executor
from nodemedic.policy.load import parse_policy, parse_policy_text
from nodemedic.policy.model import Policy
from nodemedic.report import MemorySink, RecordKind, Reporter

from .fakes import FakeClock, FakeProbe, FakeUnits

pytestmark = pytest.mark.unit


def make_policy(root: Path, mode: str = "enforce") -> Policy:
    sock, ttrpc = str(root / "containerd.sock"), str(root / "containerd.sock.ttrpc")
    return parse_policy(
        {
            "daemon": {"mode": mode, "state_dir": str(root.parent / "state")},
            "rule": [
                {
                    "name": "socket-path-is-directory",
                    "trigger": [
                        {"source": "path", "paths": [sock, ttrpc], "kind": "directory"},
                        {
                            "source": "journal",
                            "pattern": "failed to get listener for main (ttrpc )?endpoint: is a directory",
                        },
                    ],
                    "confirm": {"paths": [sock, ttrpc], "kind": "directory", "unit": "containerd.service"},
                    "action": [
                        {"do": "stop-unit", "unit": "containerd.service"},
                        {"do": "remove-socket-dir", "paths": [sock, ttrpc], "root": str(root)},
                        {"do": "start-unit", "unit": "containerd.service"},
                        {"do": "verify-containerd", "socket": sock, "timeout": "1s"},
                        {"do": "restart-unit", "unit": "kubelet.service"},
                    ],
                }
            ],
        }
    )


class Harness:
    def __init__(
        self,
        tmp_path: Path,
        mode: str = "enforce",
        units: FakeUnits | None = None,
        probe: FakeProbe | None = None,
    ) -> None:
        self.root = tmp_path / "run" / "containerd"
        self.root.mkdir(parents=True)
        self.sock = self.root / "containerd.sock"
        self.clock = FakeClock()
        self.units = units or FakeUnits()
        self.probe = probe or FakeProbe()
        self.sink = MemorySink()
        self.tasks: list[asyncio.Task[None]] = []
        self.sockets: list[socket.socket] = []
        self.quarantine = tmp_path / "state" / "quarantine"
        # containerd coming back after a start: its socket path becomes a socket
        self.units.on_start = lambda unit: unit == "containerd.service" and self.serve_socket_if_free()
        ctx = ActionContext(self.units, self.probe, self.clock, self.quarantine)
        self.runner = Executor(make_policy(self.root, mode), ctx, Reporter(self.sink), self._spawn)
        # as at start-up: D-Bus resynchronises the units' state first (a crashed containerd)
        self.runner.handle(UnitChanged("containerd.service", "activating", "auto-restart"))

    def _spawn(self, coro: Any) -> None:
        self.tasks.append(asyncio.get_running_loop().create_task(coro))

    async def settle(self) -> None:
        while self.tasks:
            await self.tasks.pop(0)

    def outcomes(self, kind: RecordKind = RecordKind.ACTION) -> list[tuple[str, str]]:
        return [(r.fields["ACTION"], r.fields["OUTCOME"]) for r in self.sink.of(kind)]

    def serve_socket_if_free(self) -> None:
        if not self.sock.exists():  # a directory still there: containerd would fail to start
            self.serve_socket()

    def serve_socket(self) -> socket.socket:
        """containerd coming back: its socket path is a socket again."""
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(self.sock))
        self.sockets.append(s)
        return s

    def close(self) -> None:
        for s in self.sockets:
            s.close()


async def test_enforce_removes_the_directory_and_restarts(harness: Callable[..., Harness]) -> None:
    h = harness()
    h.sock.mkdir()

    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY, at=h.clock.now))
    await h.settle()
    assert h.units.calls == [
        ("stop", "containerd.service"),
        ("start", "containerd.service"),
        ("restart", "kubelet.service"),
    ]
    assert h.outcomes() == [
        ("stop-unit", "done"),
        ("remove-socket-dir", "done"),
        ("start-unit", "done"),
        ("verify-containerd", "done"),
        ("restart-unit", "done"),
    ]
    assert h.sock.is_socket()
    [outcome] = h.sink.of(RecordKind.OUTCOME)
    assert outcome.fields["OUTCOME"] == "repaired"
    incidents = {r.fields.get("INCIDENT") for r in h.sink.records}
    assert len(incidents) == 1, "every record of one incident carries the same id"
    [detected] = h.sink.of(RecordKind.DETECTED)
    assert detected.fields["PATH"] == str(h.sock)
    assert detected.fields["SOURCE"] == "inotify"


async def test_observe_mode_touches_nothing(harness: Callable[..., Harness]) -> None:
    h = harness(mode="observe")
    h.sock.mkdir()
    (h.sock / "keep").write_text("x")
    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
    await h.settle()
    assert h.units.calls == []
    assert (h.sock / "keep").read_text() == "x"
    outcomes = dict(h.outcomes())
    assert outcomes["stop-unit"] == outcomes["remove-socket-dir"] == "would-do"
    assert all(r.fields["MODE"] == "observe" for r in h.sink.records)
    assert h.sink.of(RecordKind.OUTCOME)[0].fields["OUTCOME"] == "observed"
    # the same incident seen again (journald, D-Bus) is not reported again...
    h.runner.handle(
        JournalLine(
            "containerd.service", "containerd: failed to get listener for main endpoint: is a directory"
        )
    )
    await h.settle()
    assert len(h.sink.of(RecordKind.DETECTED)) == 1
    # ...until it has cleared and comes back
    (h.sock / "keep").unlink()
    h.sock.rmdir()
    h.runner.handle(PathChanged(str(h.sock), PathKind.MISSING))
    h.sock.mkdir()
    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
    await h.settle()
    assert len(h.sink.of(RecordKind.DETECTED)) == 2


async def test_one_incident_from_three_sources_is_repaired_once(harness: Callable[..., Harness]) -> None:
    h = harness()
    h.sock.mkdir()
    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
    line = "containerd: failed to get listener for main endpoint: is a directory"
    h.runner.handle(JournalLine("containerd.service", line))  # while the repair runs: coalesced
    await h.settle()
    h.runner.handle(JournalLine("containerd.service", line))  # stale: the directory is gone
    await h.settle()
    assert h.units.calls.count(("stop", "containerd.service")) == 1
    assert len(h.sink.of(RecordKind.DETECTED)) == 1


async def test_stale_event_does_nothing(harness: Callable[..., Harness]) -> None:
    h = harness()
    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))  # already gone when we look
    await h.settle()
    assert h.sink.records == []
    assert h.units.calls == []


async def test_failed_repair_backs_off(harness: Callable[..., Harness]) -> None:
    units = FakeUnits()
    units.fail.add(("start", "containerd.service"))
    h = harness(units=units)
    h.sock.mkdir()
    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
    await h.settle()
    assert h.outcomes()[-1] == ("start-unit", "failed")
    assert h.sink.of(RecordKind.OUTCOME)[-1].fields["OUTCOME"] == "not-repaired"
    # the fault comes back at once: within the backoff nothing is tried, and that is said once
    h.sock.mkdir()
    for _ in range(3):
        h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
    await h.settle()
    assert units.calls.count(("start", "containerd.service")) == 1
    deferred = [r for r in h.sink.of(RecordKind.DECIDED) if r.fields.get("OUTCOME") == "deferred"]
    assert len(deferred) == 1
    h.clock.advance(5.0)
    units.fail.clear()
    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
    await h.settle()
    assert units.calls.count(("start", "containerd.service")) == 2


async def test_verify_fails_when_containerd_never_answers(harness: Callable[..., Harness]) -> None:
    h = harness(probe=FakeProbe(answers=False))
    h.clock.tick = 0.1
    h.sock.mkdir()
    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
    await h.settle()
    assert ("verify-containerd", "failed") in h.outcomes()
    assert "restart-unit" not in dict(h.outcomes()), "the sequence stops at the first failure"
    assert h.probe.calls > 1


async def test_breaker_opens_escalates_and_persists(harness: Callable[..., Harness], tmp_path: Path) -> None:
    from nodemedic.store import StateStore

    units = FakeUnits()
    units.fail.add(("start", "containerd.service"))
    h = harness(units=units)
    store = StateStore(tmp_path / "state")
    h.runner = Executor(h.runner.policy, h.runner.ctx, h.runner.report, h._spawn, store)
    h.runner.handle(UnitChanged("containerd.service", "activating", "auto-restart"))
    for _ in range(3):  # default breaker: 3 failures within 15 min
        h.sock.mkdir(exist_ok=True)
        h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
        await h.settle()
        h.clock.advance(400)  # past the backoff
    [escalated] = h.sink.of(RecordKind.ESCALATED)
    assert escalated.fields["OUTCOME"] == "breaker-open"
    assert escalated.fields["DETAIL"].count("failed: start-unit") == 3
    # open: it keeps observing (reports what it would do) and does not act
    h.sock.mkdir(exist_ok=True)
    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
    await h.settle()
    assert units.calls.count(("start", "containerd.service")) == 3
    held = [r for r in h.sink.of(RecordKind.DECIDED) if r.fields.get("OUTCOME") == "held"]
    assert len(held) == 1
    assert h.outcomes()[-1][1] == "would-do"
    # a restarted daemon finds the breaker still open
    again = Executor(h.runner.policy, h.runner.ctx, Reporter(MemorySink()), h._spawn, store)
    assert again.states["socket-path-is-directory"].breaker.state == "open"
    # the operator's reset closes it, and the fault still there is acted on at once
    units.fail.clear()
    again.handle(UnitChanged("containerd.service", "activating", "auto-restart"))
    store.request_reset("socket-path-is-directory")
    before = len(units.calls)
    again.take_resets()
    await h.settle()
    assert again.states["socket-path-is-directory"].breaker.state == "closed"
    assert ("restart", "kubelet.service") in units.calls[before:], "a whole repair ran after the reset"


async def test_global_budget_holds_repairs(harness: Callable[..., Harness]) -> None:
    h = harness()
    h.runner.budget.repairs = 1
    h.sock.mkdir()
    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
    await h.settle()
    h.sock.unlink()
    h.sock.mkdir()
    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
    await h.settle()
    assert h.units.calls.count(("stop", "containerd.service")) == 1
    held = [r for r in h.sink.of(RecordKind.DECIDED) if r.fields.get("OUTCOME") == "held"]
    assert "budget" in held[0].message


async def test_failed_repair_is_retried_without_a_new_event(harness: Callable[..., Harness]) -> None:
    units = FakeUnits()
    units.fail.add(("stop", "containerd.service"))  # fails first: the directory stays
    h = harness(units=units)
    backoff = h.runner.states["socket-path-is-directory"].backoff
    backoff.initial, backoff.jitter = 0.05, 0.0
    h.sock.mkdir()
    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
    await h.settle()
    # the failed stop is compensated: containerd is started again, systemd's Restart= in charge
    assert units.calls == [("stop", "containerd.service"), ("start", "containerd.service")]
    units.fail.clear()
    h.clock.advance(1.0)  # the backoff has passed on the wall clock too
    h.clock.run_due()  # only the executor's own timer can start the retry: no event is sent
    await h.settle()
    assert units.calls.count(("stop", "containerd.service")) == 2
    assert h.sink.of(RecordKind.OUTCOME)[-1].fields["OUTCOME"] == "repaired"
    assert [
        r.fields["OUTCOME"] for r in h.sink.of(RecordKind.ACTION) if r.fields["ACTION"] == "compensate"
    ] == ["done"]


async def test_an_operators_stop_is_respected(harness: Callable[..., Harness]) -> None:
    from nodemedic.events import UnitChanged

    h = harness()
    h.runner.handle(UnitChanged("containerd.service", "inactive", "dead"))  # systemctl stop containerd
    h.sock.mkdir()
    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
    await h.settle()
    assert h.units.calls == []
    [respected] = [r for r in h.sink.of(RecordKind.DECIDED) if r.fields.get("OUTCOME") == "operator-stop"]
    assert "stopped by someone else" in respected.message
    # the operator starts it again; it fails on the directory and says so: now nodemedic acts
    h.runner.handle(UnitChanged("containerd.service", "activating", "auto-restart"))
    h.runner.handle(
        JournalLine(
            "containerd.service", "containerd: failed to get listener for main endpoint: is a directory"
        )
    )
    await h.settle()
    assert ("stop", "containerd.service") in h.units.calls
    assert h.sink.of(RecordKind.OUTCOME)[-1].fields["OUTCOME"] == "repaired"


async def test_its_own_stop_is_not_taken_for_an_operators(harness: Callable[..., Harness]) -> None:
    from nodemedic.events import UnitChanged

    units = FakeUnits()
    units.fail.add(("start", "containerd.service"))
    h = harness(units=units)
    h.sock.mkdir()
    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
    await h.settle()  # stopped containerd, then failed to start it
    h.runner.handle(UnitChanged("containerd.service", "inactive", "dead"))  # the event of our own stop
    assert "containerd.service" not in h.runner.stopped_by_others


async def test_at_start_up_it_waits_to_know_whether_an_operator_stopped_the_unit(tmp_path: Path) -> None:
    root = tmp_path / "run" / "containerd"
    (root / "containerd.sock").mkdir(parents=True)
    units, sink, tasks = FakeUnits({"containerd.service": "inactive"}), MemorySink(), []
    ctx = ActionContext(units, FakeProbe(), FakeClock(), tmp_path / "q")
    spawn = lambda coro: tasks.append(asyncio.get_running_loop().create_task(coro))  # noqa: E731
    runner = Executor(make_policy(root), ctx, Reporter(sink), spawn)
    runner.handle(PathChanged(str(root / "containerd.sock"), PathKind.DIRECTORY))  # inotify: first
    assert tasks == [], "no decision before D-Bus has said how containerd is"
    runner.handle(UnitChanged("containerd.service", "inactive", "dead"))  # an operator stopped it
    await asyncio.gather(*tasks)
    assert units.calls == []
    assert [r.fields["OUTCOME"] for r in sink.of(RecordKind.DECIDED)] == ["operator-stop"]


async def test_a_malformed_state_file_is_moved_aside(harness: Callable[..., Harness], tmp_path: Path) -> None:
    from nodemedic.store import StateStore

    h = harness()
    state_dir = tmp_path / "state"
    state_dir.mkdir(exist_ok=True)
    (state_dir / "state.json").write_text(
        '{"version": 1, "rules": {"socket-path-is-directory": {"breaker": 7}}}'
    )
    Executor(h.runner.policy, h.runner.ctx, h.runner.report, h._spawn, StateStore(state_dir))
    assert list(state_dir.glob("state.json.corrupt-*"))
    assert h.sink.of(RecordKind.ERROR)[-1].fields["OUTCOME"] == "state-reset"


class Broken:
    """remove-socket-dir with a bug: ``phase`` (check, apply or verify) raises ``error``."""

    name = "remove-socket-dir"

    def __init__(self, phase: str, error: BaseException) -> None:
        self.phase, self.error = phase, error

    def __call__(self, params: object) -> Broken:
        return self

    async def _maybe_raise(self, phase: str) -> None:
        if phase == self.phase:
            raise self.error

    async def check(self, ctx: ActionContext) -> Step:
        await self._maybe_raise("check")
        return Step("remove the directory", paths=("x",))

    async def apply(self, ctx: ActionContext, step: Step) -> str:
        await self._maybe_raise("apply")
        return ""

    async def verify(self, ctx: ActionContext, step: Step) -> str:
        await self._maybe_raise("verify")
        return ""


@pytest.fixture
def broken(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Give remove-socket-dir (which runs after stop-unit), or stop-unit itself, a bug."""
    from nodemedic.actions import registry
    from nodemedic.policy.actions import RemoveSocketDirParams, StopUnitParams

    def install(phase: str, error: BaseException, action: str = "remove-socket-dir") -> None:
        params: type[Any] = StopUnitParams if action == "stop-unit" else RemoveSocketDirParams
        bug = Broken(phase, error)
        bug.name = action
        monkeypatch.setitem(registry.ACTIONS, params, bug)

    return install


def assert_nothing_counted(h: Harness) -> None:
    """An internal error is nodemedic's fault: no budget spent, backoff and breaker untouched."""
    state = h.runner.states["socket-path-is-directory"]
    assert h.runner.budget.spent == []
    assert state.backoff.failures == 0
    assert state.breaker.state == "closed"
    assert state.breaker.recent_failures == []


async def test_a_bug_after_the_stop_starts_the_unit_again(
    harness: Callable[..., Harness], broken: Callable[..., None]
) -> None:
    broken("apply", KeyError("runc"))  # as tomlkit's NonExistentKey on a containerd 2.x config
    h = harness()
    h.sock.mkdir()
    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
    await h.settle()
    assert h.units.calls == [("stop", "containerd.service"), ("start", "containerd.service")]
    assert h.units.active["containerd.service"] == "active"
    assert h.outcomes() == [("stop-unit", "done"), ("remove-socket-dir", "failed"), ("compensate", "done")]
    failed = h.sink.of(RecordKind.ACTION)[1]
    assert "KeyError('runc')" in failed.fields["DETAIL"]
    [error] = h.sink.of(RecordKind.ERROR)
    assert error.fields["OUTCOME"] == "internal-error"
    assert "KeyError('runc')" in error.fields["DETAIL"]
    assert "counted as a failed repair: it had changed the node" in error.message
    # containerd was stopped and started: a failed repair like any other, so a bug the fault trips
    # each time is bounded by the backoff, the breaker and the budget instead of looping
    [outcome] = h.sink.of(RecordKind.OUTCOME)
    assert outcome.fields["OUTCOME"] == "not-repaired"
    assert "KeyError('runc')" in outcome.fields["DETAIL"]
    assert len(h.runner.budget.spent) == 1
    assert h.runner.states["socket-path-is-directory"].backoff.failures == 1


async def test_internal_errors_before_any_change_never_open_the_breaker(
    harness: Callable[..., Harness], broken: Callable[..., None]
) -> None:
    """Three forged lines that trip a bug (finding: 3 of the budget's repairs, then the breaker)."""
    broken("check", ValueError("Exceeds the limit (4300 digits) for integer string conversion"), "stop-unit")
    h = harness()
    h.runner.budget.repairs = 1
    for _ in range(3):
        h.sock.mkdir(exist_ok=True)
        h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
        await h.settle()
    assert [r.fields["OUTCOME"] for r in h.sink.of(RecordKind.ERROR)] == ["internal-error"] * 3
    assert h.units.calls == [], "the bug came before anything changed"
    assert h.sink.of(RecordKind.ESCALATED) == []
    assert not [r for r in h.sink.of(RecordKind.DECIDED) if r.fields.get("OUTCOME") in ("held", "deferred")]
    assert_nothing_counted(h)


async def test_a_bug_after_each_stop_opens_the_breaker_instead_of_looping(
    harness: Callable[..., Harness], broken: Callable[..., None]
) -> None:
    broken("check", ValueError("a bug the fault trips every time"))  # remove-socket-dir, after the stop
    h = harness()
    state = h.runner.states["socket-path-is-directory"]
    for _ in range(6):
        h.sock.mkdir(exist_ok=True)
        state.backoff.not_before = 0.0  # the fault comes back after each backoff
        h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
        await h.settle()
    assert h.sink.of(RecordKind.ESCALATED), "repeated failures hand over to a human"
    assert h.units.calls.count(("stop", "containerd.service")) == state.breaker.failures


async def test_an_internal_error_in_the_confirm_step_is_reported_not_counted(
    harness: Callable[..., Harness], tmp_path: Path
) -> None:
    class CrashingProbe(FakeProbe):
        async def version(self, socket: str, timeout: float) -> str:
            raise RecursionError("maximum recursion depth exceeded")

    h = harness(probe=CrashingProbe())
    confirm = h.runner.policy.rule[0].confirm
    assert confirm is not None
    rule = h.runner.policy.rule[0].model_copy(update={"confirm": confirm.model_copy(update={"probe": True})})
    h.runner.replace_policy(h.runner.policy.model_copy(update={"rule": [rule]}))
    h.sock.mkdir()
    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
    await h.settle()  # the task ends normally: no exception left in it
    [error] = h.sink.of(RecordKind.ERROR)
    assert error.fields["OUTCOME"] == "internal-error"
    assert "RecursionError" in error.fields["DETAIL"]
    assert h.units.calls == []
    assert_nothing_counted(h)
    assert not h.runner.states["socket-path-is-directory"].running


async def test_a_confirm_step_without_a_verdict_acts_on_nothing(
    harness: Callable[..., Harness], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """containerd's config check killed (OOM at MemoryMax=): not a bug, not a fault: not acting."""
    from nodemedic.errors import ConfigCheckError
    from nodemedic.executor import repairs as runner

    async def killed(path: Path) -> str | None:
        raise ConfigCheckError("`containerd config dump` was killed by SIGKILL: cannot tell")

    monkeypatch.setattr(runner, "config_problem", killed)
    h = harness()
    confirm = h.runner.policy.rule[0].confirm
    assert confirm is not None
    update = {"config_broken": str(tmp_path / "config.toml")}
    rule = h.runner.policy.rule[0].model_copy(update={"confirm": confirm.model_copy(update=update)})
    h.runner.replace_policy(h.runner.policy.model_copy(update={"rule": [rule]}))
    h.sock.mkdir()
    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
    await h.settle()
    [error] = h.sink.of(RecordKind.ERROR)
    assert error.fields["OUTCOME"] == "unchecked"
    assert "cannot tell" in error.fields["DETAIL"]
    assert h.units.calls == []
    assert_nothing_counted(h)


async def test_a_repair_cancelled_after_the_stop_starts_the_unit_again(
    harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    from nodemedic.actions import registry
    from nodemedic.policy.actions import RemoveSocketDirParams

    entered = asyncio.Event()

    class Hanging(Broken):
        async def apply(self, ctx: ActionContext, step: Step) -> str:
            entered.set()
            await asyncio.Event().wait()  # until cancelled (nodemedic stopping)
            return ""

    params: type[Any] = RemoveSocketDirParams
    monkeypatch.setitem(registry.ACTIONS, params, Hanging("none", KeyError()))
    h = harness()
    h.sock.mkdir()
    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
    [task] = h.tasks
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert h.units.calls == [("stop", "containerd.service"), ("start", "containerd.service")]
    assert ("compensate", "done") in h.outcomes()
    assert_nothing_counted(h)


async def test_compensation_is_bounded(
    harness: Callable[..., Harness], broken: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from nodemedic.executor import repairs as runner

    broken("apply", KeyError("x"))
    monkeypatch.setattr(runner, "COMPENSATE_TIMEOUT", 0.05)
    units = FakeUnits()

    async def hanging_start(unit: str, timeout: float) -> None:
        units.calls.append(("start", unit))
        await asyncio.Event().wait()  # a systemd that never answers

    units.start = hanging_start  # type: ignore[method-assign]
    h = harness(units=units)
    h.sock.mkdir()
    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
    await asyncio.wait_for(h.settle(), 5)
    compensate = [r for r in h.sink.of(RecordKind.ACTION) if r.fields["ACTION"] == "compensate"]
    assert [r.fields["OUTCOME"] for r in compensate] == ["failed"]
    assert "may still be stopped" in compensate[0].message


# ---- left-over shims: a healthy shim is no incident, an orphan is one per process -------------

SHIPPED = Path(__file__).parents[2] / "policy" / "policy.toml"
KILL_ACTION = 'do = "kill-orphaned-shims"\nunit = "containerd.service"\n'


def left_over(pid: int) -> JournalLine:
    return JournalLine("containerd.service", f"containerd.service: Found left-over process {pid} "
                       "(containerd-shim) in control group while starting unit. Ignoring.")  # fmt: skip


class ShimNode:
    """The shipped policy's left-over-shims rule on a fake /proc: 200 serves a container, 100 is
    a proven orphan. Its kill is replaced (the fake PIDs are not this machine's)."""

    def __init__(self, tmp_path: Path, mode: str) -> None:
        from .test_shims import process, shim

        self.proc = tmp_path / "proc"
        process(self.proc, 100, shim("gone"))
        process(self.proc, 200, shim("app"), children="201 ")
        text = SHIPPED.read_text().replace('mode = "enforce"', f'mode = "{mode}"', 1)
        where = f'proc = "{self.proc}"\nbundles = "{tmp_path / "bundles"}"\n'
        assert KILL_ACTION in text
        policy = parse_policy_text(text.replace(KILL_ACTION, KILL_ACTION + where))
        self.sink = MemorySink()
        self.tasks: list[asyncio.Task[None]] = []
        ctx = ActionContext(FakeUnits(), FakeProbe(), FakeClock(), tmp_path / "quarantine")
        self.runner = Executor(policy, ctx, Reporter(self.sink), self._spawn)

    def _spawn(self, coro: Any) -> None:
        self.tasks.append(asyncio.get_running_loop().create_task(coro))

    async def named(self, *pids: int) -> None:
        for pid in pids:  # ExecStartPre= and ExecStart= each name every left-over process
            self.runner.handle(left_over(pid))
            while self.tasks:
                await self.tasks.pop(0)

    def incidents(self) -> set[str]:
        return {r.fields["INCIDENT"] for r in self.sink.records if "INCIDENT" in r.fields}


@pytest.fixture
def no_real_kill(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    from nodemedic.actions.shims import KillOrphanedShims

    killed: list[str] = []

    async def apply(self: KillOrphanedShims, ctx: ActionContext, step: Step) -> str:
        killed.append(step.data["pids"])
        (Path(self.params.proc) / step.data["pids"] / "cmdline").write_bytes(b"")  # as a zombie: gone
        return "killed"

    monkeypatch.setattr(KillOrphanedShims, "apply", apply)
    return killed


@pytest.mark.parametrize("mode", ["enforce", "observe"])
async def test_a_shim_serving_a_container_writes_no_record(
    tmp_path: Path, mode: str, no_real_kill: list[str]
) -> None:
    """Before: four records for each line naming a live shim (detected, decided, skipped, nothing to
    do), eight per shim per containerd start."""
    node = ShimNode(tmp_path, mode)
    await node.named(200, 200, 200, 200)
    assert node.sink.records == []
    assert no_real_kill == []


async def test_an_orphan_is_one_incident_however_often_systemd_names_it(
    tmp_path: Path, no_real_kill: list[str]
) -> None:
    node = ShimNode(tmp_path, "enforce")
    await node.named(200, 100, 200, 100)
    assert no_real_kill == ["100"]
    assert len(node.incidents()) == 1
    assert [r.fields["OUTCOME"] for r in node.sink.of(RecordKind.OUTCOME)] == ["repaired"]


async def test_an_orphan_only_reported_is_reported_once_per_process(
    tmp_path: Path, no_real_kill: list[str]
) -> None:
    from .test_shims import stat_of

    node = ShimNode(tmp_path, "observe")
    await node.named(100, 200, 100)
    assert len(node.incidents()) == 1
    assert [r.fields["OUTCOME"] for r in node.sink.of(RecordKind.ACTION)] == ["would-do"]
    stat_of(node.proc, 100, 9999)  # the PID reused by a later orphan: a new incident
    await node.named(100, 100)
    assert len(node.incidents()) == 2
    assert no_real_kill == []
