"""The Ray column of ``dxg bench``: how a Python user shares one compute engine among processes
today, measured on the same figures as pydxg (M1, M2, M3).

A Ray actor holds the engine (NumPy; the actor asks for every core, so Ray gives its BLAS that
many threads, as the NumPy baseline and pydxg's engine have), and the bench's driver process
uses it:

- "local ioctl (socket node, dxg up)": a no-op actor method, called and waited for (us);
  beside it a raw 64-byte Unix round trip to a forked echo;
- "Lock2 write+read 16 MiB" / "256 MiB": the array sent to the actor as an argument, returned
  by it, and copied into the driver's destination array (ms); beside it the same write + read
  on an in-process buffer;
- "GEMM 2048 f32", "MLP forward": the actor computes on arrays it holds (the MLP's output is
  returned) (ms); beside it the same NumPy code in the driver.

Each figure's pair is measured interleaved in one child process. Ray's own processes (GCS,
raylet, workers) talk over sockets, so they run only inside a new network namespace that has
nothing but ``lo`` (``unshare -n``, root only), and a new PID namespace, so that nothing Ray
started outlives the child. Without root, ``unshare``, ``ip`` or Ray the column is skipped, with
a note that says why.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dxg.bench.model import Context, Stats, interleave, stats, timed

__all__ = ["run"]

PARTS = ("M1", "M2", "M3")  # what the column measures; ctx.extra["parts"] may name fewer
RTT_NAME = "local ioctl (socket node, dxg up)"  # M1's figure: one small call
MIB = 1 << 20
MOVE_QUICK = (16 * MIB,)
MOVE_FULL = (16 * MIB, 256 * MIB)
PR_SET_PDEATHSIG = 1
TIMEOUT_QUICK = 90.0
TIMEOUT_FULL = 600.0
SETTLE = 0.15  # idle before a window that follows the other side's BLAS (its threads spin)
MAX_TMP = 40  # Ray's socket paths (< 108 bytes) go under its temp dir: keep that short


# ---- the parent ----------------------------------------------------------------------------------


def _unavailable() -> str:
    """Why the column cannot run here ("" when it can)."""
    if os.geteuid() != 0:
        return "not root (Ray runs only in a network namespace of its own: unshare -n)"
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"no {tool} command"
    if importlib.util.find_spec("ray") is None:
        return "Ray is not installed (pip install -e '.[bench]')"
    return ""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def _leftovers(marker: str) -> list[int]:
    """Processes whose command line names ``marker`` (the Ray temp dir of this run)."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(d))
    return found


def run(ctx: Context) -> tuple[dict[str, tuple[Stats, Stats]], str]:
    """figure name -> (Ray's stats, the baseline measured beside it), and a note."""
    why = _unavailable()
    if why:
        return {}, f"{why}, Ray column skipped"
    work = ctx.tmp
    work.mkdir(parents=True, exist_ok=True)
    # Ray's temp dir holds its Unix sockets, whose paths must stay short.
    own = len(str(work / "ray")) > MAX_TMP
    rtmp = Path(tempfile.mkdtemp(prefix="dxgray.", dir="/tmp")) if own else work / "ray"
    rtmp.mkdir(exist_ok=True)
    (work / "home").mkdir(exist_ok=True)
    out, log = work / "ray.json", work / "ray.log"
    env = dict(os.environ, HOME=str(work / "home"), RAY_TMPDIR=str(rtmp),
               RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
               RAY_DEDUP_LOGS="0", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    parts = [p for p in ctx.extra.get("parts", PARTS) if p in PARTS] or list(PARTS)
    child = [sys.executable, "-m", "dxg.bench.peer_ray", "--child", "--json", str(out),
             "--tmp", str(rtmp), "--parts", ",".join(parts), *(["--quick"] if ctx.quick else [])]
    # sh is the new PID namespace's first process, exec'ed into Python once lo is up; when it
    # ends, the kernel kills everything Ray left in the namespace.
    cmd = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child", "sh", "-c",
           'ip link set lo up && exec "$@"', "sh", *child]
    out.unlink(missing_ok=True)
    timeout = TIMEOUT_QUICK if ctx.quick else TIMEOUT_FULL
    t0 = time.monotonic()
    try:
        with open(log, "wb") as lf:
            rc: int | None = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=lf,
                                            stderr=lf, timeout=timeout,
                                            preexec_fn=_die_with_parent).returncode
    except subprocess.TimeoutExpired:  # unshare was killed, and with it the namespace
        rc = None
    took = time.monotonic() - t0
    left = _leftovers(str(rtmp))
    for pid in left:  # cannot happen with the PID namespace; never leave Ray running
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if own:
        shutil.rmtree(rtmp, ignore_errors=True)
    try:
        data = json.loads(out.read_text())
    except (OSError, ValueError):
        data = None
    if rc != 0 or data is None or data.get("error"):
        why = (f"timed out after {timeout:g} s" if rc is None
               else (data or {}).get("error") or _tail(log) or f"exit status {rc}")
        return {}, f"Ray run failed ({why}), Ray column skipped"
    res = {name: (Stats(**v["peer"]), Stats(**v["base"])) for name, v in data["figures"].items()}
    note = (f"Ray {data['version']} in a network namespace with only lo: ray.init(num_cpus="
            f"{data['cpus']}), one actor (num_cpus={data['cpus']}) holding the engine (NumPy, "
            f"BLAS on {data['actor_threads']} threads); "
            f"the baselines measured beside it in the same process; Ray up in "
            f"{data['startup_s']:.1f} s, the whole column {took:.1f} s")
    if left:
        note += f"; killed {len(left)} Ray processes left behind"
    return res, note


def _tail(log: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
        if lines:
            return lines[-1][:200]
    return ""


# ---- the child, inside the namespaces ------------------------------------------------------------


def _pair(peer: Callable[[], object], base: Callable[[], object], rounds: int, per: int,
          div: float, settle: float = 0.0) -> dict[str, dict[str, float]]:
    """Interleaved windows of Ray and its baseline (the order swapped every round); with
    ``settle``, idle that long whenever the side changes."""
    samples = interleave({"peer": peer, "base": base}, rounds, per,
                         lambda prev, name: settle if prev not in (None, name) else 0.0)
    return {k: stats([x / div for x in v]).json() for k, v in samples.items()}


class _Echo:
    """A forked process echoing 64 bytes over a Unix socketpair: the raw round trip."""

    def __init__(self) -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.pid = os.fork()
        if self.pid == 0:
            a.close()
            while d := b.recv(64):
                b.sendall(d)
            os._exit(0)
        b.close()
        self.sock = a
        self.msg = b"x" * 64

    def rtt(self) -> None:
        self.sock.sendall(self.msg)
        got = 0
        while got < 64:
            got += len(self.sock.recv(64 - got))

    def close(self) -> None:
        self.sock.close()
        os.waitpid(self.pid, 0)


def _engine_class() -> Any:
    import ray

    from dxg.bench.compute import GEMM_PEER, mlp_numpy, mlp_params

    @ray.remote
    class Engine:
        """The shared engine: holds its arrays, computes on them."""

        def __init__(self) -> None:
            self.a, self.b, self.c = _gemm_arrays(GEMM_PEER)
            self.x, self.layers = mlp_params()

        def threads(self) -> int:
            from threadpoolctl import threadpool_info

            n = [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]
            return n[0] if n else 0

        def noop(self) -> None:
            return None

        def echo(self, a: np.ndarray) -> np.ndarray:
            return a

        def gemm(self) -> None:
            np.matmul(self.a, self.b, out=self.c)

        def mlp(self) -> np.ndarray:
            return mlp_numpy(self.x, self.layers)

    return Engine


def _gemm_arrays(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A and B as M3 makes them, and a touched C."""
    rng = np.random.default_rng(n)
    return (rng.standard_normal((n, n), dtype=np.float32),
            rng.standard_normal((n, n), dtype=np.float32), np.zeros((n, n), np.float32))


def _measure(quick: bool, rtmp: str, parts: frozenset[str]) -> dict[str, Any]:
    nets = sorted(name for _, name in socket.if_nameindex())  # this namespace's, not sysfs's
    if nets != ["lo"]:
        return {"error": f"the network namespace has {nets}, not only lo"}
    echo = _Echo()  # forked before Ray starts threads
    try:
        import ray

        t0 = time.monotonic()
        cpus = os.cpu_count() or 2
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, _temp_dir=rtmp,
                 _node_ip_address="127.0.0.1", object_store_memory=(512 if quick else 2048) * MIB)
        try:
            engine = _engine_class().options(num_cpus=cpus).remote()
            threads = ray.get(engine.threads.remote())
            startup = time.monotonic() - t0
            figs: dict[str, dict[str, Any]] = {}
            if "M1" in parts:
                figs |= _call(engine, echo, quick)
            if "M2" in parts:
                figs |= _move(engine, quick)
            if "M3" in parts:
                figs |= _compute(engine, quick)
            return {"figures": figs, "version": ray.__version__, "cpus": cpus,
                    "actor_threads": threads, "startup_s": startup}
        finally:
            ray.shutdown()
    finally:
        echo.close()


def _call(engine: Any, echo: _Echo, quick: bool) -> dict[str, dict[str, Any]]:
    """One small remote call (a no-op method, waited for) against a raw Unix round trip (us)."""
    import ray

    def call() -> None:
        ray.get(engine.noop.remote())

    timed(call, 20)
    timed(echo.rtt, 20)
    return {RTT_NAME: _pair(call, echo.rtt, 3 if quick else 10, 100 if quick else 300, 1.0)}


def _move(engine: Any, quick: bool) -> dict[str, dict[str, Any]]:
    """An array to the actor and back into a destination array, against the same write + read
    on an in-process buffer (ms)."""
    import ray

    from dxg.bench.transfer import zero_copy_name

    figs = {}
    for size in MOVE_QUICK if quick else MOVE_FULL:
        src = np.arange(size, dtype=np.uint32).astype(np.uint8)
        dst = np.zeros(size, np.uint8)
        buf = np.zeros(size, np.uint8)

        def move(src: np.ndarray = src, dst: np.ndarray = dst) -> None:
            np.copyto(dst, ray.get(engine.echo.remote(src)))

        def local(src: np.ndarray = src, dst: np.ndarray = dst, buf: np.ndarray = buf) -> None:
            np.copyto(buf, src)
            np.copyto(dst, buf)

        move()
        if not np.array_equal(dst, src):
            raise RuntimeError("the array came back from the actor changed")
        local()
        per = 3 if quick or size >= 256 * MIB else 10
        figs[zero_copy_name(size)] = _pair(move, local, 3 if quick else 10, per, 1e3)
    return figs


def _compute(engine: Any, quick: bool) -> dict[str, dict[str, Any]]:
    """GEMM and MLP: the actor on the arrays it holds, against the same NumPy code here (ms)."""
    import ray

    from dxg.bench.compute import GEMM_PEER, MLP_NAME, gemm_name, mlp_numpy, mlp_params

    a, b, c = _gemm_arrays(GEMM_PEER)

    def gemm() -> None:
        ray.get(engine.gemm.remote())

    def numpy_gemm() -> None:
        np.matmul(a, b, out=c)

    gemm()
    numpy_gemm()
    figs = {gemm_name(GEMM_PEER): _pair(gemm, numpy_gemm, 4 if quick else 10, 1 if quick else 2,
                                        1e3, SETTLE)}
    x, layers = mlp_params()
    if not np.allclose(ray.get(engine.mlp.remote()), mlp_numpy(x, layers), rtol=1e-3,
                       atol=1e-2):
        raise RuntimeError("the actor's MLP output differs from NumPy's")

    def mlp() -> None:
        ray.get(engine.mlp.remote())

    def numpy_mlp() -> None:
        mlp_numpy(x, layers)

    figs[MLP_NAME] = _pair(mlp, numpy_mlp, 3 if quick else 10, 1 if quick else 3, 1e3, SETTLE)
    return figs


def _child(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m dxg.bench.peer_ray")
    ap.add_argument("--child", action="store_true", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--tmp", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts", default=",".join(PARTS))
    args = ap.parse_args(argv)
    try:
        result = _measure(args.quick, args.tmp, frozenset(args.parts.split(",")))
    except Exception as e:
        result = {"error": f"{type(e).__name__}: {e}"}
    Path(args.json).write_text(json.dumps(result))
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
