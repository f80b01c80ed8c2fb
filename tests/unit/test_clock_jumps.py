"""The wall clock set back or forward an hour during a backoff, a breaker cool-down and a budget
window (issue 12, fault matrix item 4): no repair storm, nothing held for ever. The machines use
the wall clock because their state is persisted; the host's clock is never touched: a fake one
whose wall reading jumps while the monotonic one runs on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from nodemedic.backoff import Backoff
from nodemedic.core.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from nodemedic.core.budget import RepairBudget
from nodemedic.events import PathChanged, PathKind
from nodemedic.report import RecordKind

from .fakes import FakeClock, FakeTimer, FakeUnits
from .test_runner import Harness

pytestmark = pytest.mark.unit

HOUR = 3600.0
T0 = 1_700_000_000.0


class WallJumps:
    """Lets a FakeClock's wall reading be stepped (as an operator or NTP would) while its monotonic
    reading runs on."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock, self.offset = clock, 0.0
        real = clock.wall
        clock.wall = lambda: real() + self.offset  # type: ignore[method-assign]

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    def jump(self, seconds: float) -> None:
        self.offset += seconds


# ---- the pure machines --------------------------------------------------------------------------


def test_a_backoff_is_never_held_longer_than_one_delay_by_a_clock_set_back() -> None:
    backoff = Backoff(initial=60.0, maximum=300.0)
    backoff.failed(T0)
    assert backoff.remaining(T0 + 30) == 30
    later = T0 + 30 - HOUR  # 30 s into the wait, the clock goes back an hour
    assert backoff.remaining(later) <= 60.0
    assert backoff.ready(later + 60.0)
    assert not backoff.ready(later + 59.0), "no early release either"


def test_a_backoff_ends_early_when_the_clock_goes_forward_one_attempt_then_longer() -> None:
    backoff = Backoff(initial=60.0, maximum=HOUR)
    backoff.failed(T0)
    assert backoff.ready(T0 + HOUR)
    assert backoff.failed(T0 + HOUR) == 120.0, "the next failure waits longer, from the new time"
    assert not backoff.ready(T0 + HOUR + 119)


def test_a_restored_backoff_from_a_clock_that_was_far_ahead_is_bounded() -> None:
    backoff = Backoff(initial=5.0, maximum=300.0, failures=2, not_before=T0 + 10 * HOUR)
    assert backoff.remaining(T0) == 10.0


def test_an_open_breaker_is_not_held_an_extra_hour_by_a_clock_set_back() -> None:
    breaker = CircuitBreaker(failures=1, window=900.0, cooldown=600.0)
    assert breaker.failed(T0)
    back = T0 + 300 - HOUR  # half-way through the cooldown the clock goes back an hour
    assert not breaker.allow(back)
    assert breaker.allow(back + 600.0), "open at most one cooldown after the jump was seen"
    assert breaker.state == HALF_OPEN


def test_a_clock_set_forward_gives_one_trial_then_the_breaker_opens_again() -> None:
    breaker = CircuitBreaker(failures=3, window=900.0, cooldown=600.0)
    for i in range(3):
        breaker.failed(T0 + i)
    assert breaker.state == OPEN
    ahead = T0 + HOUR
    assert breaker.allow(ahead)
    assert breaker.failed(ahead), "the trial failed: open again at once"
    assert not breaker.allow(ahead + 1)
    assert breaker.reopens_at() == ahead + 600.0


def test_failures_dated_after_a_clock_set_back_leave_the_window_in_time() -> None:
    breaker = CircuitBreaker(failures=3, window=900.0, cooldown=600.0)
    breaker.failed(T0)
    breaker.failed(T0 + 1)
    back = T0 + 2 - HOUR
    breaker.allow(back)
    assert not breaker.failed(back + 901.0), "the two old failures are out of the window"
    assert breaker.state == CLOSED


def test_a_budget_window_ends_at_most_one_window_after_a_clock_set_back() -> None:
    budget = RepairBudget(repairs=2, window=HOUR)
    budget.spend(T0)
    budget.spend(T0 + 10)
    back = T0 + 20 - HOUR
    assert not budget.allow(back)
    assert budget.allow(back + HOUR + 1), "not two hours"


def test_a_clock_set_forward_refills_the_budget_but_never_beyond_it() -> None:
    budget = RepairBudget(repairs=3, window=HOUR)
    for i in range(3):
        budget.spend(T0 + i)
    ahead = T0 + 2 * HOUR
    allowed = 0
    for i in range(20):  # a storm of faults right after the jump
        if budget.allow(ahead + i):
            budget.spend(ahead + i)
            allowed += 1
    assert allowed == 3


# ---- the runner, driven through jumps -------------------------------------------------------------


def jumping_harness(tmp_path: Path, units: FakeUnits) -> tuple[Harness, WallJumps]:
    h = Harness(tmp_path, units=units)
    return h, WallJumps(h.clock)


async def fault(h: Harness, times: int = 1) -> None:
    for _ in range(times):
        h.sock.mkdir(exist_ok=True)
        h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
        await h.settle()


async def open_the_breaker(h: Harness) -> None:
    for _ in range(3):  # the shipped default: 3 failed repairs within 15 min
        await fault(h)
        h.clock.advance(400)  # past each backoff
    assert h.runner.states["socket-path-is-directory"].breaker.state == OPEN


async def test_runner_a_clock_set_back_does_not_keep_the_breaker_open_an_extra_hour(tmp_path: Path) -> None:
    units = FakeUnits()
    units.fail.add(("start", "containerd.service"))
    h, clock = jumping_harness(tmp_path, units)
    try:
        await open_the_breaker(h)
        breaker = h.runner.states["socket-path-is-directory"].breaker
        clock.advance(600)
        clock.jump(-HOUR)
        await fault(h)  # the jump is seen
        clock.advance(breaker.cooldown)  # one full cooldown after it, far less than cooldown + an hour
        units.fail.clear()
        before = units.calls.count(("start", "containerd.service"))
        await fault(h)
        assert units.calls.count(("start", "containerd.service")) == before + 1, "the trial repair ran"
        assert breaker.state == CLOSED
    finally:
        h.close()


async def test_runner_a_clock_set_forward_is_one_trial_not_a_storm(tmp_path: Path) -> None:
    units = FakeUnits()
    units.fail.add(("start", "containerd.service"))
    h, clock = jumping_harness(tmp_path, units)
    try:
        await open_the_breaker(h)
        before = units.calls.count(("start", "containerd.service"))
        clock.jump(2 * HOUR)  # past the cooldown, the backoff and the budget window at once
        await fault(h, times=10)
        assert units.calls.count(("start", "containerd.service")) == before + 1, "one trial only"
        trials = [r for r in h.sink.of(RecordKind.DECIDED) if r.fields.get("OUTCOME") == "trial"]
        assert len(trials) == 1
        assert h.runner.states["socket-path-is-directory"].breaker.state == OPEN
    finally:
        h.close()


async def test_runner_a_clock_set_back_during_a_backoff_waits_one_delay_at_most(tmp_path: Path) -> None:
    units = FakeUnits()
    units.fail.add(("start", "containerd.service"))
    h, clock = jumping_harness(tmp_path, units)
    try:
        backoff = h.runner.states["socket-path-is-directory"].backoff
        backoff.jitter = 0.0
        await fault(h)
        units.fail.clear()
        clock.jump(-HOUR)
        await fault(h)  # deferred: within the backoff
        clock.advance(backoff.longest(backoff.failures))
        await fault(h)
        assert units.calls.count(("start", "containerd.service")) == 2
    finally:
        h.close()


async def test_runner_a_clock_set_back_rearms_the_breakers_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retry armed at the end of the cool-down (monotonic) fires while the re-anchored one still
    runs: without a new retry nothing looks again until the next event, and on a quiet node the
    breaker stays open (found by the lab test, tests/system/test_clock_jump.py)."""
    units = FakeUnits()
    units.fail.add(("start", "containerd.service"))
    h, clock = jumping_harness(tmp_path, units)
    try:
        await open_the_breaker(h)
        breaker = h.runner.states["socket-path-is-directory"].breaker
        armed: list[float] = []
        arm = h.clock.call_later

        def record(delay: float, callback: Callable[[], None]) -> FakeTimer:
            armed.append(delay)  # the executor's timers: here, only the rule's retries
            return arm(delay, callback)

        monkeypatch.setattr(h.clock, "call_later", record)
        clock.jump(-HOUR - breaker.cooldown)  # back past the breaker's opening
        await fault(h)  # the old retry, or any event: the jump is seen, the cool-down re-anchored
        assert armed, "a retry for the re-anchored cool-down's end"
        assert breaker.cooldown <= armed[-1] <= breaker.cooldown + 1
        armed.clear()
        await fault(h)  # seen again: no second retry for the same jump
        assert armed == []
    finally:
        h.close()
