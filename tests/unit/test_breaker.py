from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodemedic.core.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from nodemedic.core.budget import RepairBudget
from nodemedic.store import StateStore

pytestmark = pytest.mark.unit


def test_opens_after_failures_within_window_then_half_opens() -> None:
    b = CircuitBreaker(failures=3, window=60, cooldown=600)
    assert not b.failed(0, "a")
    assert not b.failed(10, "b")
    assert b.failed(20, "c")
    assert b.state == OPEN
    assert not b.allow(619)
    assert b.allow(620)
    assert b.state == HALF_OPEN
    assert b.failed(621, "trial failed"), "a failed trial opens it again at once"
    assert not b.allow(622)
    assert b.allow(1221)
    b.succeeded(1222)
    assert b.state == CLOSED
    assert [a.detail for a in b.history][-2:] == ["trial failed", ""]


def test_old_failures_fall_out_of_the_window() -> None:
    b = CircuitBreaker(failures=2, window=60, cooldown=600)
    b.failed(0)
    assert not b.failed(61)
    assert b.state == CLOSED


def test_reset_closes() -> None:
    b = CircuitBreaker(failures=1, window=60, cooldown=600)
    b.failed(0)
    b.reset()
    assert b.allow(1)


events = st.lists(st.tuples(st.floats(0, 50), st.booleans()), max_size=40)


@given(failures=st.integers(1, 5), window=st.floats(1, 100), cooldown=st.floats(1, 100), steps=events)
def test_breaker_invariants(
    failures: int, window: float, cooldown: float, steps: list[tuple[float, bool]]
) -> None:
    b = CircuitBreaker(failures, window, cooldown)
    now = 0.0
    for gap, ok in steps:
        now += gap
        if not b.allow(now):
            assert b.state == OPEN
            assert now < b.opened_at + cooldown, "an open breaker allows once its cooldown has passed"
            continue
        was = b.state
        if ok:
            b.succeeded(now)
            assert b.state == CLOSED
        else:
            opened = b.failed(now)
            in_window = [t for t in b.recent_failures if t > now - window]
            assert opened == (was == HALF_OPEN or len(in_window) >= failures)
        assert len(b.history) <= 10


def test_breaker_round_trips_through_dict() -> None:
    b = CircuitBreaker(failures=1, window=60, cooldown=600)
    b.failed(5, "boom")
    c = CircuitBreaker(failures=1, window=60, cooldown=600)
    c.restore(json.loads(json.dumps(b.to_dict())))
    assert (c.state, c.opened_at, c.recent_failures, c.history) == (
        b.state,
        b.opened_at,
        b.recent_failures,
        b.history,
    )


def test_budget_is_a_sliding_window() -> None:
    budget = RepairBudget(repairs=2, window=3600)
    budget.spend(0)
    budget.spend(10)
    assert not budget.allow(3599)
    assert budget.allow(3601)


def test_store_round_trip_and_resets(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    assert store.load() == {}
    store.save({"rules": {"r": {"breaker": {"state": "open"}}}})
    assert store.load()["rules"]["r"]["breaker"]["state"] == "open"
    store.request_reset("r")
    assert store.take_resets() == ["r"]
    assert store.take_resets() == []


@pytest.mark.parametrize("content", ["{not json", '{"version": 99}', "[]"])
def test_corrupt_state_is_moved_aside_not_lost(tmp_path: Path, content: str) -> None:
    (tmp_path / "state.json").write_text(content)
    store = StateStore(tmp_path)
    assert store.load() == {}
    [aside] = tmp_path.glob("state.json.corrupt-*")
    assert aside.read_text() == content
    assert store.corrupt == str(aside)
