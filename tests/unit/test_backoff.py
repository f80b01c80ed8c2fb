from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodemedic.backoff import Backoff

pytestmark = pytest.mark.unit


def test_doubles_up_to_max() -> None:
    b = Backoff(initial=5, factor=2, maximum=30)
    assert [b.failed(0) for _ in range(5)] == [5, 10, 20, 30, 30]
    assert not b.ready(29.9)
    assert b.ready(30)
    b.succeeded()
    assert b.ready(0)
    assert b.failures == 0


@given(
    initial=st.floats(0.01, 100),
    factor=st.floats(1, 10),
    maximum=st.floats(0.01, 1000),
    jitter=st.floats(0, 1),
    failures=st.integers(1, 60),
    seed=st.integers(0, 2**32),
)
def test_delay_is_bounded_and_monotone_without_jitter(
    initial: float, factor: float, maximum: float, jitter: float, failures: int, seed: int
) -> None:
    b = Backoff(initial, factor, maximum, jitter, rng=random.Random(seed))
    d = b.delay(failures)
    assert 0 <= d <= maximum + 1e-9
    plain = Backoff(initial, factor, maximum)
    assert plain.delay(failures) <= plain.delay(failures + 1) + 1e-9
    assert d >= plain.delay(failures) * (1 - jitter) - 1e-9


@pytest.mark.parametrize("failures", [1_025, 5_000, 10**9])
def test_a_long_run_of_failures_stays_at_the_maximum(failures: int) -> None:
    """factor ** (failures - 1) overflows a float after ~1,025 failures at factor 2 (OverflowError)."""
    b = Backoff(initial=5.0, factor=2.0, maximum=300.0)  # floats, as the policy gives them
    assert b.delay(failures) == 300
    b.failures = failures
    assert b.failed(0) == 300
