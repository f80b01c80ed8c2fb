"""Shared by the benchmarks: one summary line per measured series."""

from __future__ import annotations

import statistics


def summary(label: str, values: list[float], unit: str = "ms") -> str:
    scale = 1000.0 if unit == "ms" else 1.0
    ordered = sorted(v * scale for v in values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return (f"{label:<44} median {statistics.median(ordered):8.1f} {unit}   p95 {p95:8.1f} {unit}"
            f"   min {ordered[0]:8.1f}   max {ordered[-1]:8.1f}   (n={len(ordered)})")  # fmt: skip
