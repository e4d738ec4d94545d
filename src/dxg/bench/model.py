"""What every part of ``dxg bench`` produces: figures, each a pydxg measurement beside its
baseline (and, where there is one, the Ray peer) from the same run, and the context a part runs in.

A part is a module of this package with ``run(ctx: Context) -> list[Figure]``. It measures pydxg
and its baseline interleaved (a window of each in turn, the order swapped every round) so the
noise of a busy machine hits both sides of a ratio alike, and never asserts how fast anything is:
a figure it could not produce carries ``error`` instead of numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Context", "Figure", "Stats", "interleave", "pct", "stats", "timed"]


def pct(samples: list[float], q: float) -> float:
    """The ``q`` quantile of ``samples`` (nearest rank; NaN when there are none)."""
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))] if s else math.nan


def timed(fn: Callable[[], object], n: int) -> list[float]:
    """``n`` calls of ``fn``: each one's time in microseconds."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t0) / 1000)
    return out


def interleave(fns: dict[str, Callable[[], object]], rounds: int, per: int,
               settle: Callable[[str | None, str], float] | None = None,
               warm: int = 0) -> dict[str, list[float]]:
    """``warm`` calls of each first (not kept), then ``rounds`` rounds of ``per`` calls of each
    function in turn (the order reversed every other round): all the samples (us) of each.
    ``settle(previous, name)``: seconds to idle before a window of ``name`` that follows one of
    ``previous`` (None for the first)."""
    for fn in fns.values():
        timed(fn, warm)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    prev: str | None = None
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            if settle is not None and (s := settle(prev, name)) > 0:
                time.sleep(s)
            samples[name] += timed(fns[name], per)
            prev = name
    return samples


@dataclass(frozen=True, slots=True)
class Stats:
    """Median and p99 of one side of a figure, in the figure's unit, over ``n`` samples."""

    p50: float
    p99: float
    n: int

    def json(self) -> dict[str, Any]:
        return {"p50": self.p50, "p99": self.p99, "n": self.n}


def stats(samples: list[float]) -> Stats:
    return Stats(pct(samples, 0.5), pct(samples, 0.99), len(samples))


@dataclass(frozen=True, slots=True)
class Figure:
    """One row of the table.

    ``lower_is_better``: True for times and memory (the ratio is pydxg / baseline, so 1.0 is
    native speed and 2.0 twice as slow), False for rates such as GB/s or calls/s (the ratio is
    baseline / pydxg, so it reads the same way: how many times worse than the baseline pydxg
    is). ``ratio`` is None when a side is missing. ``peer`` is the Ray column (M1, M2, M3 only),
    ``peer_note`` says why it is missing when it is.
    """

    part: str  # "M1" .. "M6"
    name: str  # what was measured, e.g. "local ioctl (EnumAdapters3, count only)"
    unit: str  # "us", "ms", "GB/s", "calls/s", "ops/s", "KiB", "s"
    pydxg: Stats | None
    baseline: Stats | None = None
    baseline_name: str = ""
    lower_is_better: bool = True
    peer: Stats | None = None
    peer_baseline: Stats | None = None  # the baseline measured beside the peer (its own run)
    peer_note: str = ""
    note: str = ""
    error: str = ""  # why this figure could not be produced (then pydxg may be None)

    @property
    def ratio(self) -> float | None:
        return _ratio(self.pydxg, self.baseline, self.lower_is_better)

    @property
    def peer_ratio(self) -> float | None:
        """Ray against the baseline measured beside it (else this figure's), read the same way as
        ``ratio``."""
        base = self.peer_baseline if self.peer_baseline is not None else self.baseline
        return _ratio(self.peer, base, self.lower_is_better)

    def json(self) -> dict[str, Any]:
        return {"part": self.part, "name": self.name, "unit": self.unit,
                "pydxg": None if self.pydxg is None else self.pydxg.json(),
                "baseline": None if self.baseline is None else self.baseline.json(),
                "baseline_name": self.baseline_name, "lower_is_better": self.lower_is_better,
                "ratio": self.ratio, "peer": None if self.peer is None else self.peer.json(),
                "peer_baseline": None if self.peer_baseline is None else self.peer_baseline.json(),
                "peer_ratio": self.peer_ratio, "peer_note": self.peer_note,
                "note": self.note, "error": self.error}


def _ratio(side: Stats | None, base: Stats | None, lower_is_better: bool) -> float | None:
    if side is None or base is None:
        return None
    num, den = (side.p50, base.p50) if lower_is_better else (base.p50, side.p50)
    if not den or math.isnan(num) or math.isnan(den):
        return None
    return num / den


@dataclass(slots=True)
class Context:
    """What a part gets: ``quick`` (a smoke run: the fewest rounds and sizes that still produce
    every figure, the whole of ``dxg bench --quick`` in under a minute), a private temporary
    directory, ``peer`` (whether to run the Ray column), and ``log`` for progress lines (stderr;
    the table goes to stdout)."""

    tmp: Path
    quick: bool = False
    peer: bool = True
    verbose: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def log(self, line: str) -> None:
        import sys

        print(line, file=sys.stderr, flush=True)
