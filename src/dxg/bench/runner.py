"""``dxg bench``: runs the parts M1..M6 in order, then the Ray peer, and prints one table.

Each part is a module with ``run(ctx) -> list[Figure]`` (see :mod:`dxg.bench.model`); a part that
fails, or that this checkout does not have, becomes one figure that carries the error, and the
run goes on. The exit status is 0 only when every figure was produced (numbers, no error): that
is what the CI smoke test (``dxg bench --quick``) checks, never how fast anything was.

The header names the machine and how busy other processes kept it during the run (busy CPU of
the whole machine minus this run's own, processes it started included): a ratio measured while
the machine was shared is noisier, and this says how much.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dxg.bench.model import Context, Figure, Stats

__all__ = ["PARTS", "add_arguments", "main", "run_bench"]

# (part, module, what it measures): the order of the run and of the table.
PARTS = (
    ("M1", "dxg.bench.latency", "call latency"),
    ("M2", "dxg.bench.transfer", "transfer"),
    ("M3", "dxg.bench.compute", "compute"),
    ("M4", "dxg.bench.scale", "scale"),
    ("M5", "dxg.bench.cleanup", "clean-up"),
    ("M6", "dxg.bench.memory_cost", "memory"),
)
PEER_PARTS = frozenset({"M1", "M2", "M3"})
PEER_MODULE = "dxg.bench.peer_ray"


# ---- the command line ------------------------------------------------------------------------


def _parts(text: str) -> tuple[str, ...]:
    names = tuple(p.strip().upper() for p in text.split(",") if p.strip())
    known = {p for p, _, _ in PARTS}
    bad = [n for n in names if n not in known]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown part {', '.join(bad)} (the parts are {', '.join(sorted(known))})")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``dxg bench`` (and of bench/paravirt.py), in one place."""
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: every figure, the fewest rounds (under a minute)")
    p.add_argument("--json", metavar="FILE", help="also write every figure as JSON to FILE")
    p.add_argument("--only", type=_parts, default=(), metavar="M1,M3",
                   help="run only these parts")
    p.add_argument("--skip", type=_parts, default=(), metavar="M4,M5",
                   help="run every part but these")
    p.add_argument("--no-peer", dest="peer", action="store_false",
                   help="leave out the Ray column")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dxg.bench.runner`` / bench/paravirt.py: the same as ``dxg bench``."""
    ap = argparse.ArgumentParser(prog="dxg bench", description=__doc__.splitlines()[0])
    add_arguments(ap)
    ap.add_argument("-v", "--verbose", action="count", default=0)
    args = ap.parse_args(argv)
    try:
        return run_bench(args)
    except KeyboardInterrupt:
        return 130
    except ValueError as e:
        print(f"dxg bench: {e}", file=sys.stderr)
        return 2


# ---- the machine -----------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = platform.processor() or platform.machine()
    mem_kib = 0
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_kib = int(line.split()[1])
                    break
    except OSError:
        pass
    try:
        import numpy

        np_version = numpy.__version__
    except ImportError:  # pragma: no cover - a dependency
        np_version = "-"
    return {"cores": os.cpu_count() or 0, "cpu": model, "memory_gib": round(mem_kib / 2**20, 1),
            "python": platform.python_version(), "numpy": np_version,
            "kernel": platform.release(), "system": platform.system()}


class Load:
    """How much CPU other processes used between ``start`` and ``stop`` (see cpu_busy)."""

    def __init__(self) -> None:
        from dxg.bench.stack import cpu_busy

        self._read = cpu_busy
        self.t0 = time.monotonic()
        self.busy0, self.own0 = cpu_busy()

    def stop(self) -> dict[str, float]:
        busy, own = self._read()
        wall = max(time.monotonic() - self.t0, 1e-9)
        other = max(0.0, (busy - self.busy0) - (own - self.own0))
        return {"seconds": round(wall, 2), "own_cores": round((own - self.own0) / wall, 2),
                "other_cores": round(other / wall, 2)}


# ---- running ---------------------------------------------------------------------------------


def _selected(only: Sequence[str], skip: Sequence[str]) -> list[tuple[str, str, str]]:
    return [p for p in PARTS if (not only or p[0] in only) and p[0] not in skip]


def _run_part(part: str, module: str, ctx: Context) -> list[Figure]:
    try:
        mod = importlib.import_module(module)
        figures = list(mod.run(ctx))
        if not figures:
            return [Figure(part, f"({part})", "", None, error="the part produced no figure")]
        return figures
    except Exception as e:  # a part that fails is a figure with its error; the run goes on
        ctx.log(f"{part}: failed: {type(e).__name__}: {e}")
        if ctx.verbose:
            import traceback

            traceback.print_exc()
        return [Figure(part, f"({part})", "", None, error=f"{type(e).__name__}: {e}")]


def _run_peer(ctx: Context) -> tuple[dict[str, tuple[Stats, Stats]], str]:
    try:
        mod = importlib.import_module(PEER_MODULE)
        results, note = mod.run(ctx)
        return dict(results), str(note)
    except Exception as e:
        ctx.log(f"Ray: failed: {type(e).__name__}: {e}")
        return {}, f"the Ray column failed: {type(e).__name__}: {e}"


def merge_peer(figures: list[Figure], results: dict[str, tuple[Stats, Stats]],
               note: str) -> list[Figure]:
    """The Ray column joined to the figures of the same name; the M1..M3 figures without one
    get why (the peer's note when it ran nothing, else that it has no counterpart)."""
    out = []
    for fig in figures:
        if fig.name in results:
            peer, base = results[fig.name]
            fig = dataclasses.replace(fig, peer=peer, peer_baseline=base, peer_note=note)
        elif fig.part in PEER_PARTS:
            fig = dataclasses.replace(fig, peer_note=note if not results
                                      else "no Ray counterpart for this figure")
        out.append(fig)
    return out


def _finite(s: Stats | None) -> bool:
    return s is not None and math.isfinite(s.p50) and math.isfinite(s.p99)


def produced(fig: Figure) -> bool:
    """Whether the figure has its numbers: pydxg's (and its baseline's, when it has one)."""
    return (not fig.error and _finite(fig.pydxg)
            and (fig.baseline is None or _finite(fig.baseline)))


def run_bench(args: argparse.Namespace) -> int:
    quick, peer = bool(args.quick), bool(getattr(args, "peer", True))
    verbose = bool(getattr(args, "verbose", 0) or getattr(args, "verbose_after", 0))
    parts = _selected(args.only or (), args.skip or ())
    if not parts:
        raise ValueError("--only/--skip leave no part to run")
    root = Path(tempfile.mkdtemp(prefix="pydxg-dxgbench."))
    os.chmod(root, 0o700)
    extra: dict[str, Any] = {"parts": [p for p, _, _ in parts]}
    previous = _raise_on_sigterm()
    load = Load()
    loads: dict[str, dict[str, float]] = {}
    figures: list[Figure] = []
    started = time.time()
    try:
        for part, module, what in parts:
            ctx = Context(tmp=root / part.lower(), quick=quick, peer=peer, verbose=verbose,
                          extra=extra)
            ctx.tmp.mkdir()
            ctx.log(f"{part} ({what}) ...")
            part_load = Load()
            figures += _run_part(part, module, ctx)
            loads[part] = part_load.stop()
            ctx.log(f"{part}: {loads[part]['seconds']:.1f} s")
        if not peer:
            results, note = {}, "not run (--no-peer)"
        elif not PEER_PARTS & {p for p, _, _ in parts}:
            results, note = {}, "not run (none of M1, M2, M3 selected)"
        else:
            ctx = Context(tmp=root / "peer", quick=quick, peer=True, verbose=verbose, extra=extra)
            ctx.tmp.mkdir()
            ctx.log("Ray peer ...")
            part_load = Load()
            results, note = _run_peer(ctx)
            loads["Ray"] = part_load.stop()
            ctx.log(f"Ray: {loads['Ray']['seconds']:.1f} s")
        figures = merge_peer(figures, results, note)
        unmatched = sorted(set(results) - {f.name for f in figures})
        total = load.stop()
    except BaseException:  # interrupted: every stack is stopped by now; say where the logs are
        print(f"interrupted; logs kept in {root}", file=sys.stderr)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    ok = all(produced(f) for f in figures)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(started)),
              "quick": quick, "machine": machine(), "load": total, "parts": loads,
              "peer_note": note, "peer_unmatched": unmatched, "ok": ok, "tmp": str(root),
              "figures": [f.json() for f in figures]}
    print_table(report, figures, sys.stdout)
    if args.json:
        Path(args.json).write_text(json.dumps(_plain(report), indent=2) + "\n")
    _clean(root, ok)
    return 0 if ok else 1


def _raise_on_sigterm() -> Any:
    """SIGTERM unwinds like Ctrl-C does (every stack stopped on the way out)."""
    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    try:
        return signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave it as it is
        return signal.getsignal(signal.SIGTERM)


def _clean(root: Path, ok: bool) -> None:
    """Remove the run's directory, or keep it (the daemons' logs) when a figure is missing."""
    from dxg.node.fuse import pydxg_mounts

    if ok and not pydxg_mounts(root):
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"logs kept in {root}", file=sys.stderr)


def _plain(x: Any) -> Any:
    """JSON without NaN (null instead)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


# ---- the table -------------------------------------------------------------------------------

COLUMNS = ("part", "figure", "unit", "p50", "p99", "baseline", "base p50", "base p99", "ratio",
           "Ray p50", "Ray p99", "Ray ratio", "note")
NUMERIC = frozenset({"p50", "p99", "base p50", "base p99", "ratio", "Ray p50", "Ray p99",
                     "Ray ratio"})


def num(x: float | None) -> str:
    """A figure's number, to the digits that mean something."""
    if x is None or not math.isfinite(x):
        return "-"
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _ratio(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.2f}"


def rows(figures: Sequence[Figure], peer_note: str) -> list[tuple[str, ...]]:
    out = []
    for f in figures:
        p, b, r = f.pydxg, f.baseline, f.peer
        note = f"ERROR: {f.error}" if f.error else f.note
        if f.peer is not None and f.peer_note and f.peer_note != peer_note:
            note = f"{note}; Ray: {f.peer_note}" if note else f"Ray: {f.peer_note}"
        out.append((f.part, f.name, f.unit,
                    num(p.p50 if p else None), num(p.p99 if p else None),
                    f.baseline_name if b else "-",
                    num(b.p50 if b else None), num(b.p99 if b else None), _ratio(f.ratio),
                    num(r.p50 if r else None), num(r.p99 if r else None),
                    _ratio(f.peer_ratio), note))
    return out


def header(report: dict[str, Any]) -> list[str]:
    m, load = report["machine"], report["load"]
    cores = max(1, m["cores"])
    lines = [
        f"pydxg bench{' --quick' if report['quick'] else ''}, {report['date']}",
        f"machine: {m['cores']} cores, {m['cpu']}, {m['memory_gib']} GiB; Python {m['python']}, "
        f"NumPy {m['numpy']}, {m['system']} {m['kernel']}",
        f"load: other processes used {load['other_cores']:.2f} of {cores} cores "
        f"({100 * load['other_cores'] / cores:.0f}%) over the run's {load['seconds']:.0f} s; "
        f"this run {load['own_cores']:.2f} cores",
        "per part (s, other cores): " + ", ".join(
            f"{k} {v['seconds']:.1f} s {v['other_cores']:.2f}"
            for k, v in report["parts"].items()),
        f"Ray column: {report['peer_note'] or '-'}",
        "ratio: how many times worse than the baseline (pydxg/baseline for times and memory, "
        "baseline/pydxg for rates; 1.00 = as fast); for rates the p99 column is the slow tail",
    ]
    if report.get("peer_unmatched"):
        lines.append("Ray figures with no pydxg figure of that name: "
                     + ", ".join(report["peer_unmatched"]))
    if not report["ok"]:
        lines.append("NOT every figure was produced: see ERROR in the notes")
    return lines


def print_table(report: dict[str, Any], figures: Sequence[Figure], out: Any) -> None:
    """One table: aligned columns of numbers, each row's baseline and note on an indented line
    below it (every long name side by side would fit no terminal or CI log). Plain text when
    piped; on a terminal the same, with rich's colour (errors red, notes dim)."""
    body = rows(figures, report["peer_note"])
    cols = [c for c in COLUMNS if c not in ("baseline", "note")]
    cells = [[c for c, col in zip(r, COLUMNS, strict=True) if col not in ("baseline", "note")]
             for r in body]
    width = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c)
             for i, c in enumerate(cols)]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if col in NUMERIC else c.ljust(w)
                         for c, w, col in zip(row, width, cols, strict=True)).rstrip()

    styled: list[tuple[str, str]] = [(h, "bold" if i == 0 else "") for i, h in
                                     enumerate(header(report))]
    styled += [("", ""), (line(cols), "bold"), (line(["-" * w for w in width]), "")]
    for row, short in zip(body, cells, strict=True):
        error = row[-1].startswith("ERROR")
        styled.append((line(short), "red" if error else ""))
        base, note = row[COLUMNS.index("baseline")], row[-1]
        text = "; ".join(x for x in (f"baseline: {base}" if base != "-" else "", note) if x)
        if text:
            styled.append((f"      {text}", "red" if error else "dim"))
    if hasattr(out, "isatty") and out.isatty():
        from rich.console import Console
        from rich.text import Text

        console = Console(file=out, highlight=False)
        for text, style in styled:
            console.print(Text(text, style=style or ""), soft_wrap=True)
        return
    out.write("\n".join(text for text, _ in styled) + "\n")
    out.flush()

if __name__ == "__main__":
    sys.exit(main())
