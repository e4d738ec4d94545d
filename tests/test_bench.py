"""`dxg bench --quick`, the CI smoke test of the benchmark: every part runs and every figure is
produced (numbers, no error), with the Ray column where Ray is installed. Nothing here looks at
how fast anything was."""

import dataclasses
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from dxg.bench.model import Figure, Stats
from dxg.bench.runner import merge_peer, print_table, produced
from dxg.node.fuse import fuse_available

HAVE_RAY = importlib.util.find_spec("ray") is not None


def _processes_mentioning(text: str) -> list[str]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        if text in cmd:
            out.append(f"{pid}: {cmd[:200]}")
    return out


def test_quick_run_produces_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = [sys.executable, "-m", "dxg.cli.main", "bench", "--quick", "--json", str(out)]
    if not HAVE_RAY:
        argv.append("--no-peer")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=280)
    # Without FUSE here the FUSE-file rows say so in their error and the run exits 1 (it is
    # incomplete); every other figure must still be there.
    no_fuse = fuse_available() is not None
    assert r.returncode == (1 if no_fuse else 0), f"{r.stdout}\n{r.stderr}"
    assert "\x1b[" not in r.stdout  # piped: plain columns, no colour
    report = json.loads(out.read_text())
    assert report["ok"] is (not no_fuse) and report["quick"] is True
    figures = report["figures"]
    assert {f["part"] for f in figures} == {"M1", "M2", "M3", "M4", "M5", "M6"}
    if no_fuse:
        fuse_rows = [f for f in figures if "FUSE file" in f["name"]]
        assert fuse_rows and all("no FUSE file" in f["error"] for f in fuse_rows)
        figures = [f for f in figures if f not in fuse_rows]
    for f in figures:
        assert not f["error"], f
        for side in ("pydxg",) + (("baseline",) if f["baseline"] is not None else ()):
            assert f[side] is not None and f[side]["n"] > 0, f
            assert all(isinstance(f[side][k], float | int) and math.isfinite(f[side][k])
                       for k in ("p50", "p99")), f
        assert f["name"] in r.stdout  # the table names every figure
    names = {f["name"] for f in figures}
    assert "local ioctl (socket node, dxg up)" in names  # where the Ray peer's small call joins
    m = report["machine"]
    assert m["cores"] >= 1 and m["python"] and m["numpy"]
    assert report["load"]["seconds"] > 0 and "other_cores" in report["load"]
    # The Ray column: there, or a note that says why not, on every M1..M3 figure.
    peer_figures = [f for f in figures if f["part"] in ("M1", "M2", "M3")]
    assert report["peer_note"]
    if HAVE_RAY and any(f["peer"] is not None for f in figures):
        assert any(f["peer"] is not None for f in peer_figures)
    for f in peer_figures:
        assert f["peer"] is not None or f["peer_note"], f
    # Nothing of the run is left: no daemon, no worker, no FUSE mount (nor, after a complete
    # run, its directory).
    assert not _processes_mentioning(report["tmp"])
    assert not [m for m in Path("/proc/self/mounts").read_text().splitlines()
                if report["tmp"] in m]
    assert no_fuse or not Path(report["tmp"]).exists()


def test_bad_part_is_one_line() -> None:
    r = subprocess.run([sys.executable, "-m", "dxg.cli.main", "bench", "--only", "M9"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown part M9" in r.stderr


def _fig(part: str, name: str, **kw: object) -> Figure:
    return Figure(part, name, "us", Stats(10.0, 20.0, 5), Stats(5.0, 8.0, 5), "raw", **kw)


def test_merge_peer_and_produced() -> None:
    figs = [_fig("M1", "a"), _fig("M1", "b"), _fig("M4", "c")]
    merged = merge_peer(figs, {"a": (Stats(40.0, 50.0, 3), Stats(4.0, 6.0, 3))}, "Ray ran")
    assert merged[0].peer == Stats(40.0, 50.0, 3) and merged[0].peer_ratio == 10.0
    assert merged[1].peer is None and merged[1].peer_note  # says it has no counterpart
    assert merged[2].peer_note == ""  # M4 has no Ray column
    skipped = merge_peer(figs, {}, "skipped: no ray")
    assert [f.peer_note for f in skipped[:2]] == ["skipped: no ray"] * 2
    assert all(produced(f) for f in merged)
    assert not produced(dataclasses.replace(figs[0], error="boom"))
    assert not produced(dataclasses.replace(figs[0], pydxg=Stats(math.nan, 1.0, 0)))
    assert not produced(Figure("M6", "x", "KiB", None))


def test_table_reads_when_piped() -> None:
    figs = [_fig("M1", "local ioctl", note="a note"),
            Figure("M5", "kill", "ms", None, error="it broke")]
    report = {"date": "now", "quick": True, "peer_note": "not run (--no-peer)",
              "peer_unmatched": [], "ok": False, "parts": {"M1": {"seconds": 1.0,
                                                                   "other_cores": 0.1}},
              "load": {"seconds": 2.0, "own_cores": 1.0, "other_cores": 0.5},
              "machine": {"cores": 2, "cpu": "cpu", "memory_gib": 1.0, "python": "3.11",
                          "numpy": "2", "kernel": "6", "system": "Linux"}}
    buf = io.StringIO()
    print_table(report, figs, buf)
    text = buf.getvalue()
    assert "\x1b[" not in text
    row = next(line for line in text.splitlines() if line.startswith("M1"))
    assert row.split()[-8:-3] == ["10.0", "20.0", "5.00", "8.00", "2.00"]
    assert "ERROR: it broke" in text and "baseline: raw; a note" in text
    assert "NOT every figure was produced" in text
