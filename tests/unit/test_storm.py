from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodemedic.core.storm import StormDetector, Verdict

pytestmark = pytest.mark.unit


def test_more_than_threshold_within_window_is_one_storm() -> None:
    d = StormDetector(threshold=3, window=60)
    verdicts = [d.add(t, "toolkit") for t in (0, 5, 10, 15, 20, 25)]
    assert verdicts == [Verdict.SINGLE] * 3 + [Verdict.BEGAN, Verdict.ONGOING, Verdict.ONGOING]
    assert d.storm is not None
    assert d.storm.signals == 6
    assert d.storm.senders["toolkit"] == 6


def test_spread_out_signals_are_no_storm() -> None:
    d = StormDetector(threshold=3, window=60)
    assert all(d.add(t * 30.0, "toolkit") is Verdict.SINGLE for t in range(10))


def test_storm_ends_after_a_quiet_window_and_a_new_one_can_begin() -> None:
    d = StormDetector(threshold=1, window=10)
    d.add(0, "a")
    assert d.add(1, "b") is Verdict.BEGAN
    assert d.ended(10.9) is None
    ended = d.ended(11)
    assert ended is not None
    assert ended.signals == 2
    assert ended.describe_senders() == "a x1, b x1"
    assert d.storm is None
    assert d.add(30, "a") is Verdict.SINGLE
    assert d.add(31, "a") is Verdict.BEGAN


def test_senders_are_summarised() -> None:
    d = StormDetector(threshold=0, window=60)
    for i in range(8):
        d.add(float(i), f"s{i % 7}")
    assert d.storm is not None
    assert d.storm.describe_senders(most=2).endswith("and 5 more")


@given(st.integers(1, 200), st.integers(1, 10), st.floats(0.5, 100))
def test_a_storm_counts_every_signal_once(n: int, threshold: int, window: float) -> None:
    """n signals within one window: a storm exactly when n > threshold, counting all n."""
    d = StormDetector(threshold, window)
    step = window / (n + 1)
    verdicts = [d.add(i * step, "x") for i in range(n)]
    if n > threshold:
        assert d.storm is not None
        assert d.storm.signals == n
        assert verdicts.count(Verdict.BEGAN) == 1
    else:
        assert d.storm is None
