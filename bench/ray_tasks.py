"""Ray + pydxg: throughput of small tasks through the virtual GPU against the same tasks computing
with NumPy in the Ray worker itself (issue "Beyond one machine", its benchmark):

    .venv/bin/python bench/ray_tasks.py [--tasks 1000] [--batch 100] [--quick] [--json FILE]

One Ray node started by `dxg ray start --head --up` (its own host and guest, one soft adapter)
inside a network namespace that has only `lo` (the script re-runs itself under `unshare -n`;
root needed). Each task asks for 0.25 of the adapter (dxg.ray.remote(vgpu=0.25)) and multiplies
two 256x256 f32 matrices through dxg.compute (opening its device, uploading, computing, reading
back, closing); the baseline task (num_cpus=0.25, the same concurrency) does `a @ b` with NumPy.
Batches of each kind alternate, so the machine's noise hits both alike; the figure is tasks/s
per batch (the median batch, and the slowest) and the ratio pydxg / NumPy. A third row runs the same GEMMs
as calls to one actor per adapter quarter that keeps its device open (what to do for many small
steps), against NumPy actors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from dxg.bench.model import pct

DXG = (sys.executable, "-m", "dxg.cli.main")
N = 256




def only_loopback() -> bool:
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def reexec_in_namespace(argv: list[str]) -> int:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        print("bench/ray_tasks.py: needs root and unshare to run Ray in a network namespace "
              "with only lo; skipped", file=sys.stderr)
        return 2
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    # a PID namespace too: whatever Ray started ends with the run
    return subprocess.call(["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child",
                            "sh", "-c", 'ip link set lo up && exec "$0" "$@"',
                            sys.executable, __file__, *argv], env=env)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=1000, help="tasks of each kind (default 1000)")
    ap.add_argument("--batch", type=int, default=100, help="tasks per batch (default 100)")
    ap.add_argument("--quick", action="store_true", help="200 tasks of each kind, batches of 50")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    if not only_loopback():
        return reexec_in_namespace(sys.argv[1:])
    if args.quick:
        args.tasks, args.batch = 200, 50
    import ray

    import dxg.ray

    tmp = Path(tempfile.mkdtemp(prefix="dxgrb"))
    os.environ["HOME"] = str(tmp)
    log = open(tmp / "agent.log", "wb")
    agent = subprocess.Popen([*DXG, "ray", "start", "--head", "--port", "6390", "--up",
                              "--adapters", "1", "--state-dir", str(tmp / "s"), "--poll", "1",
                              "--", "--num-cpus=2", "--object-store-memory=80000000",
                              "--include-dashboard=false", "--node-ip-address=127.0.0.1",
                              f"--temp-dir={tmp / 'r'}"], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if "Ray runtime started" in (tmp / "s" / "ray.log").read_text():
                    ray.init(address="127.0.0.1:6390", log_to_driver=False)
                    break
            except (FileNotFoundError, ConnectionError):
                pass
            if agent.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the Ray node did not start: see {tmp}/agent.log")
            time.sleep(0.2)
        return run(args, ray, dxg.ray)
    finally:
        ray.shutdown()
        agent.terminate()
        agent.wait(90)
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, ray: Any, dxgray: Any) -> int:
    a = np.random.default_rng(1).standard_normal((N, N), dtype=np.float32)
    a_ref = ray.put(a)

    @dxgray.remote(vgpu=0.25, num_cpus=0)
    def gemm_dxg(m: np.ndarray) -> float:
        import dxg.compute

        with dxg.compute.device(0) as dev:
            x = dev.asarray(m)
            return float((x @ x).get()[0, 0])

    @ray.remote(num_cpus=0.5)
    def gemm_numpy(m: np.ndarray) -> float:
        return float((m @ m)[0, 0])

    @dxgray.remote(vgpu=0.25, num_cpus=0)
    class DxgActor:
        def __init__(self) -> None:
            import dxg.compute

            self.dev = dxg.compute.device(0)

        def gemm(self, m: np.ndarray) -> float:
            x = self.dev.asarray(m)
            return float((x @ x).get()[0, 0])

    @ray.remote(num_cpus=0.5)
    class NumpyActor:
        def gemm(self, m: np.ndarray) -> float:
            return float((m @ m)[0, 0])

    expect = float((a @ a)[0, 0])
    rates: dict[str, list[float]] = {}

    def measure(kinds: dict[str, Any]) -> None:
        """Warm each kind up (workers started, imports done, results checked), then alternate
        batches of each, the order reversed every round."""
        for submit in kinds.values():
            got = ray.get(submit(16), timeout=300)
            assert all(abs(g - expect) <= 1e-3 * max(1.0, abs(expect)) for g in got), got[:3]
        names = list(kinds)
        for r in range(max(1, args.tasks // args.batch)):
            for name in names if r % 2 == 0 else names[::-1]:
                t0 = time.perf_counter()
                ray.get(kinds[name](args.batch), timeout=600)
                rates.setdefault(name, []).append(args.batch / (time.perf_counter() - t0))

    # tasks first: the actors below hold the whole adapter while they live
    measure({"task: dxg.compute (vgpu=0.25)": lambda n: [gemm_dxg.remote(a_ref)
                                                         for _ in range(n)],
             "task: NumPy in the worker": lambda n: [gemm_numpy.remote(a_ref) for _ in range(n)]})
    dxg_actors = [DxgActor.remote() for _ in range(4)]
    np_actors = [NumpyActor.remote() for _ in range(4)]
    measure({"actor: dxg.compute, device kept": lambda n: [dxg_actors[i % 4].gemm.remote(a_ref)
                                                           for i in range(n)],
             "actor: NumPy": lambda n: [np_actors[i % 4].gemm.remote(a_ref) for i in range(n)]})
    rounds = max(1, args.tasks // args.batch)
    names = list(rates)
    rows = []
    for dxg_name, np_name in ((names[0], names[1]), (names[2], names[3])):
        d, n = rates[dxg_name], rates[np_name]
        rows.append({"pydxg": dxg_name, "baseline": np_name,
                     "pydxg_tasks_per_s": {"p50": pct(d, 0.5), "slow": pct(d, 0.01)},
                     "baseline_tasks_per_s": {"p50": pct(n, 0.5), "slow": pct(n, 0.01)},
                     "ratio": pct(d, 0.5) / pct(n, 0.5), "tasks": args.batch * rounds})
    print(f"Ray + pydxg: {args.batch * rounds} tasks of each kind, 256x256 f32 GEMM, batches of "
          f"{args.batch}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
    print(f"{'pydxg':34} {'tasks/s p50':>11} {'slow':>8}   {'baseline':28} {'tasks/s p50':>11} "
          f"{'slow':>8} {'ratio':>6}")
    for row in rows:
        p, b = row["pydxg_tasks_per_s"], row["baseline_tasks_per_s"]
        print(f"{row['pydxg']:34} {p['p50']:11.1f} {p['slow']:8.1f}   {row['baseline']:28} "
              f"{b['p50']:11.1f} {b['slow']:8.1f} {row['ratio']:6.3f}")
    print("ratio: pydxg / NumPy tasks per second (1.0 = as fast); slow: the slowest batch")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
