"""Property tests: whatever the wall clock does (steps back or forward by up to a day between
readings), backoff, breaker and budget never hold longer than one delay, cooldown or window from
the latest reading, and the budget never allows more than its repairs at once (issue 12, item 4)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodemedic.backoff import Backoff
from nodemedic.core.breaker import OPEN, CircuitBreaker
from nodemedic.core.budget import RepairBudget

pytestmark = pytest.mark.unit

DAY = 86_400.0
T0 = 1_700_000_000.0
steps = st.lists(
    st.tuples(
        st.floats(-DAY, DAY, allow_nan=False),  # the clock's step (0 most often: time just passes)
        st.floats(0, 3600, allow_nan=False),  # real time passing
        st.sampled_from(["fail", "succeed", "look"]),
    ),
    max_size=40,
)


@given(steps)
def test_nothing_is_held_beyond_one_period_from_the_latest_reading(
    ops: list[tuple[float, float, str]],
) -> None:
    backoff = Backoff(initial=5.0, factor=2.0, maximum=300.0)
    breaker = CircuitBreaker(failures=3, window=900.0, cooldown=3600.0)
    budget = RepairBudget(repairs=10, window=3600.0)
    now = T0
    for jump, passed, what in ops:
        now += jump + passed
        if what == "fail":
            backoff.failed(now)
            breaker.failed(now)
            budget.spend(now)
        elif what == "succeed":
            backoff.succeeded()
            breaker.succeeded(now)
            budget.spend(now)
        breaker.allow(now)
        assert backoff.remaining(now) <= backoff.longest(backoff.failures)
        if breaker.state == OPEN:
            assert breaker.reopens_at() <= now + breaker.cooldown
        assert all(t <= now for t in breaker.recent_failures)
        budget.allow(now)
        assert all(now - budget.window < t <= now for t in budget.spent)


@given(st.floats(-DAY, DAY, allow_nan=False), st.integers(0, 10))
def test_after_any_step_the_budget_allows_at_most_its_repairs(jump: float, spent: int) -> None:
    budget = RepairBudget(repairs=10, window=3600.0)
    for i in range(spent):
        budget.spend(T0 + i)
    now = T0 + spent + jump
    allowed = 0
    for i in range(50):
        if budget.allow(now + i):
            budget.spend(now + i)
            allowed += 1
    assert allowed <= 10
