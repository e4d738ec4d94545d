"""What the benchmarks share: percentiles, and a `dxg up` started for one run and stopped after.

Imported by the scripts of this folder as ``common`` (they put their folder on sys.path)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

DXG = (sys.executable, "-m", "dxg.cli.main")


def pct(samples: list[float], q: float) -> float:
    """The ``q`` quantile of ``samples`` (nearest rank; NaN when there are none)."""
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def start_up(tmp: Path, adapters: int = 1, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """`dxg up` with ``adapters`` soft adapters (and ``extra`` flags), its node in ``tmp``,
    once `dxg wait` sees them; its log in tmp/up.log."""
    node = str(tmp / "up.sock")
    up = subprocess.Popen([*DXG, "up", "--node", node, "--adapters", str(adapters), *extra],
                          env=dict(os.environ, DXG_NODE=node), stdout=subprocess.DEVNULL,
                          stderr=open(tmp / "up.log", "wb"))
    r = subprocess.run([*DXG, "wait", "--node", node, "--adapters", str(adapters), "--timeout",
                        "60"])
    if r.returncode != 0:
        up.kill()
        raise RuntimeError(f"dxg up did not come up (see {tmp}/up.log)")
    return up, node


def cpu_busy() -> tuple[float, float]:
    """(seconds of CPU the whole machine spent busy, seconds this process and its waited-for
    children spent) so far: what other processes took between two readings is the difference
    (the noise a measurement shared the machine with)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    t = os.times()
    return busy, t.user + t.system + t.children_user + t.children_system


def stop_up(up: subprocess.Popen[bytes]) -> None:
    """SIGTERM (a clean stop), SIGKILL after 30 s."""
    up.send_signal(signal.SIGTERM)
    try:
        up.wait(30)
    except subprocess.TimeoutExpired:
        up.kill()
        up.wait()
