"""Token buckets: a pure rate limit per SIGHUP sender, driven by the caller's clock.

A bucket holds at most ``burst`` tokens and starts full; it gains ``refill`` tokens per ``per``
seconds, continuously (so 1 per 60 s gives a token back 60 s after one was taken, not at the
next whole minute). ``take`` spends one if there is one.
"""

from __future__ import annotations

from typing import Protocol


class Monotonic(Protocol):
    """Where the buckets read the time: only a monotonic reading (a ``ports.Clock`` is one; the
    SIGHUP guard passes the time of the event it handles)."""

    def monotonic(self) -> float: ...


class TokenBucket:
    """One sender's bucket; times are the clock's monotonic readings."""

    def __init__(self, burst: int, refill: int, per: float, clock: Monotonic) -> None:
        if burst < 1 or refill < 1 or per <= 0:
            raise ValueError(
                f"a token bucket needs burst >= 1, refill >= 1, per > 0 (got {burst}, {refill}, {per})"
            )
        self.burst = burst
        self.rate = refill / per  # tokens per second
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock.monotonic()

    @property
    def tokens(self) -> float:
        """Tokens available now (fractional while refilling)."""
        self._refill()
        return self._tokens

    @property
    def full(self) -> bool:
        return self.tokens >= self.burst

    def take(self) -> bool:
        """Spend one token: True if there was one, False if the sender is over its rate."""
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def _refill(self) -> None:
        now = self._clock.monotonic()
        elapsed = max(0.0, now - self._at)  # a clock that steps back gives nothing, takes nothing
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
        self._at = now


class SenderBuckets:
    """A bucket per sender (its cgroup path). A bucket that refilled completely is forgotten: it
    is the same as a new one, and a crashlooping pod's new cgroup per restart must not pile up."""

    def __init__(self, burst: int, refill: int, per: float, clock: Monotonic) -> None:
        TokenBucket(burst, refill, per, clock)  # validates the settings once, here
        self.burst, self.refill, self.per = burst, refill, per
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, sender: str) -> bool:
        """Spend one of ``sender``'s tokens; False if it has none left (it is over its rate)."""
        self.forget_idle()
        bucket = self._buckets.get(sender)
        if bucket is None:
            bucket = self._buckets[sender] = TokenBucket(self.burst, self.refill, self.per, self._clock)
        return bucket.take()

    def tokens(self, sender: str) -> float:
        """``sender``'s tokens now (a sender never seen, or forgotten, has a full bucket)."""
        bucket = self._buckets.get(sender)
        return float(self.burst) if bucket is None else bucket.tokens

    def forget_idle(self) -> list[str]:
        """Drop every bucket that is full again; returns the senders forgotten."""
        idle = [sender for sender, bucket in self._buckets.items() if bucket.full]
        for sender in idle:
            del self._buckets[sender]
        return idle

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, sender: object) -> bool:
        return sender in self._buckets
