"""Token buckets per SIGHUP sender, on a fake clock."""

from __future__ import annotations

import pytest

from nodemedic.core.ratelimit import SenderBuckets, TokenBucket

from .fakes import FakeClock

pytestmark = pytest.mark.unit


def test_burst_then_refused_then_refilled_continuously() -> None:
    clock = FakeClock()
    bucket = TokenBucket(burst=3, refill=1, per=60, clock=clock)

    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock.advance(30)
    assert bucket.tokens == pytest.approx(0.5)
    assert not bucket.take()
    clock.advance(30)
    assert bucket.take()
    assert not bucket.take()


def test_never_above_burst_and_a_clock_stepping_back_gives_nothing() -> None:
    clock = FakeClock()
    bucket = TokenBucket(burst=2, refill=5, per=1, clock=clock)
    clock.advance(3600)
    assert bucket.tokens == 2
    bucket.take()
    clock.advance(-100)
    assert bucket.tokens == 1


@pytest.mark.parametrize(("burst", "refill", "per"), [(0, 1, 60), (3, 0, 60), (3, 1, 0)])
def test_settings_that_make_no_bucket(burst: int, refill: int, per: float) -> None:
    with pytest.raises(ValueError, match="token bucket"):
        TokenBucket(burst, refill, per, FakeClock())


def test_each_sender_has_its_own_bucket() -> None:
    clock = FakeClock()
    buckets = SenderBuckets(burst=2, refill=1, per=60, clock=clock)

    assert [buckets.take("/kubepods/pod-a") for _ in range(3)] == [True, True, False]
    assert buckets.take("/system.slice/toolkit-standin.service")
    assert buckets.tokens("/kubepods/pod-a") == 0
    assert buckets.tokens("/never/seen") == 2


def test_full_idle_buckets_are_forgotten() -> None:
    clock = FakeClock()
    buckets = SenderBuckets(burst=2, refill=1, per=60, clock=clock)
    for n in range(100):  # a crashlooping pod: a new cgroup per restart
        buckets.take(f"/kubepods/pod-{n}")
    assert len(buckets) == 100

    clock.advance(59)
    buckets.take("/kubepods/pod-new")
    assert len(buckets) == 101  # none refilled yet
    clock.advance(1)
    assert sorted(buckets.forget_idle()) == sorted(f"/kubepods/pod-{n}" for n in range(100))
    assert "/kubepods/pod-new" in buckets
    assert "/kubepods/pod-0" not in buckets
