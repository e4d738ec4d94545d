"""What the benchmarks share: percentiles, and a `dxg up` started for one run and stopped after.

Imported by the scripts of this folder as ``common`` (they put their folder on sys.path). The
code lives in the package (dxg.bench.stack, dxg.bench.model), where `dxg bench` uses it too."""

from __future__ import annotations

from dxg.bench.model import interleave, pct, timed
from dxg.bench.stack import DXG, cpu_busy, start_up, stop_up

__all__ = ["DXG", "cpu_busy", "interleave", "pct", "start_up", "stop_up", "timed"]
