"""Latency histograms a daemon keeps of its own calls (the guest: one per ioctl), read by its
metrics endpoint (dxg.cli.metrics) when scraped.

Plain counts in fixed buckets, owned by the object that observes them (never a registry or a
module): observing is a clock read, a bisect and three increments under an uncontended lock, so
it can sit on the ioctl path; the reader copies the counts under the same lock.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Hashable
from dataclasses import dataclass

__all__ = ["BUCKETS", "LatencyHistograms", "Series"]

# Upper bounds in seconds (Prometheus's "le"), from a fast ioctl (tens of microseconds) to a
# long wait; a final +Inf bucket is implied.
BUCKETS: tuple[float, ...] = (
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)


@dataclass(frozen=True, slots=True)
class Series:
    """A copy of one histogram: per-bucket counts (not cumulative; the last is +Inf), the sum
    of the observed seconds, and how many failed."""

    counts: tuple[int, ...]
    total: float
    errors: int

    @property
    def count(self) -> int:
        return sum(self.counts)


class LatencyHistograms:
    """Histograms of call durations, one per key (an ioctl number...), made on first use."""

    __slots__ = ("_lock", "_series", "bounds")

    def __init__(self, bounds: tuple[float, ...] = BUCKETS) -> None:
        self.bounds = bounds
        self._lock = threading.Lock()
        # key -> [bucket counts..., sum of seconds, errors]
        self._series: dict[Hashable, list[float]] = {}

    def observe(self, key: Hashable, seconds: float, failed: bool = False) -> None:
        """One call of ``key`` took ``seconds`` (``failed``: it returned an error)."""
        slot = bisect.bisect_left(self.bounds, seconds)
        n = len(self.bounds) + 1
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = [0] * (n + 2)
            series[slot] += 1
            series[n] += seconds
            if failed:
                series[n + 1] += 1

    def snapshot(self) -> dict[Hashable, Series]:
        """A copy of every histogram, by key."""
        n = len(self.bounds) + 1
        with self._lock:
            items = [(key, list(values)) for key, values in self._series.items()]
        return {key: Series(tuple(int(v) for v in values[:n]), float(values[n]),
                            int(values[n + 1]))
                for key, values in items}
