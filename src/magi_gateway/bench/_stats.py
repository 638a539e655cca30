"""Latency histograms (sans-I/O): bounded memory, mergeable across load generator processes."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["Histogram"]

#: Bucket i > 0 holds values in [GROWTH**(i-1), GROWTH**i) microseconds: 1% resolution.
GROWTH = 1.01
_LOG_GROWTH = math.log(GROWTH)
#: Values are clamped to about an hour (2000 buckets at most).
_MAX_BUCKET = 2200


class Histogram:
    """Counts of microsecond values in logarithmic buckets, with exact count, sum and max."""

    __slots__ = ("buckets", "count", "max_us", "sum_us")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.sum_us = 0.0
        self.max_us = 0.0

    def add(self, value_us: float) -> None:
        """Record one value (negative values, from clock jitter, count as 0)."""
        value_us = max(value_us, 0.0)
        index = 0 if value_us < 1.0 else min(int(math.log(value_us) / _LOG_GROWTH) + 1, _MAX_BUCKET)
        self.buckets[index] = self.buckets.get(index, 0) + 1
        self.count += 1
        self.sum_us += value_us
        self.max_us = max(self.max_us, value_us)

    def merge(self, other: Histogram) -> None:
        """Add ``other``'s values to this histogram."""
        for index, n in other.buckets.items():
            self.buckets[index] = self.buckets.get(index, 0) + n
        self.count += other.count
        self.sum_us += other.sum_us
        self.max_us = max(self.max_us, other.max_us)

    def percentile(self, fraction: float) -> float | None:
        """The value below which ``fraction`` of the values lie (bucket midpoint), or None."""
        if not self.count:
            return None
        rank = max(1, math.ceil(fraction * self.count))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                if index == 0:
                    return 0.5
                # Geometric middle of the bucket, never above the largest value seen.
                return float(min(GROWTH ** (index - 0.5), self.max_us))
        return self.max_us

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form that ``from_json`` reads back."""
        return {
            "buckets": {str(i): n for i, n in self.buckets.items()},
            "count": self.count,
            "sum_us": self.sum_us,
            "max_us": self.max_us,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Histogram:
        """The histogram ``to_json`` described."""
        histogram = cls()
        histogram.buckets = {int(i): int(n) for i, n in data["buckets"].items()}
        histogram.count = int(data["count"])
        histogram.sum_us = float(data["sum_us"])
        histogram.max_us = float(data["max_us"])
        return histogram
