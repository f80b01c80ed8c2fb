"""Counts signals in a sliding window and tells when they become a storm and when it is over.

Pure: times come from the caller. More than ``threshold`` signals within ``window`` is a storm; it
ends once a whole window has passed without a signal. A storm is one incident: it is reported when it
begins and when it ends, with the count and the senders, never once per signal.
"""

from __future__ import annotations

import enum
from collections import Counter, deque
from dataclasses import dataclass, field


class Verdict(enum.Enum):
    SINGLE = "single"  # a signal, no storm (yet)
    BEGAN = "began"  # this signal made a storm
    ONGOING = "ongoing"  # one more signal in a storm already reported


@dataclass
class Storm:
    """A storm under way (or just ended)."""

    began: float
    last: float
    signals: int = 0
    senders: Counter[str] = field(default_factory=Counter)

    def describe_senders(self, most: int = 5) -> str:
        top = self.senders.most_common(most)
        text = ", ".join(f"{name} x{n}" for name, n in top)
        rest = len(self.senders) - len(top)
        return text + (f" and {rest} more" if rest > 0 else "")


class StormDetector:
    def __init__(self, threshold: int, window: float) -> None:
        self.threshold = threshold
        self.window = window
        self._recent: deque[tuple[float, str]] = deque()
        self.storm: Storm | None = None

    def add(self, now: float, sender: str) -> Verdict:
        """Count one signal from ``sender`` (a unit, pod or "unknown sender") at ``now``."""
        self._recent.append((now, sender))
        while self._recent and self._recent[0][0] <= now - self.window:
            self._recent.popleft()
        if self.storm is not None:
            self.storm.signals += 1
            self.storm.senders[sender] += 1
            self.storm.last = now
            return Verdict.ONGOING
        if len(self._recent) > self.threshold:
            first = self._recent[0][0]
            self.storm = Storm(first, now, len(self._recent), Counter(s for _, s in self._recent))
            return Verdict.BEGAN
        return Verdict.SINGLE

    def ended(self, now: float) -> Storm | None:
        """The storm, once a whole window has passed since its last signal (then it is forgotten)."""
        storm = self.storm
        if storm is None or now - storm.last < self.window:
            return None
        self.storm = None
        self._recent.clear()
        return storm
