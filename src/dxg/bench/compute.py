"""M3 of ``dxg bench``: compute through dxg.compute against the same NumPy code in this process.

Against `dxg up` (a local link), one ``dxg.compute`` device, data already on it:

- GEMM n x n f32 (512 .. 4096): ``dc.matmul(A, B, out=C)`` and a wait for it, against
  ``np.matmul(a, b, out=c)`` here;
- an MLP forward pass (batch 256, 1024-4096-4096-1024, bias + relu between the layers), the
  output read back, against the same three lines of NumPy;
- a 5x5 Gaussian blur of a 1080p RGB f32 image: ``dc.conv2d`` (depthwise), against NumPy's
  slicing sums over a zero-padded copy;
- small ops (an in-place add of 256 f32), each followed by a wait, against the same ops batched
  (one wait at the end: dxg.compute puts up to 1,024 in one command buffer), and the batched
  ones against NumPy.

The baseline is NumPy as a NumPy user has it: this process's BLAS on every core. The host runs
BLAS single-threaded, one engine slot per core, and a big GEMM fans out over the idle slots
(docs/execution.md), so both sides use every core. Windows interleave, the order swapped every
round; a pydxg window starts after SETTLE idle, as this process's BLAS threads spin a while
after a NumPy GEMM and would take a core from the host's engine.

``GEMM_PEER``, ``MLP_BATCH``/``MLP_WIDTHS``, ``mlp_params`` and ``mlp_numpy`` are shared with the
Ray column (dxg.bench.peer_ray), which computes the same things.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from itertools import pairwise
from typing import Any

import numpy as np

from dxg.bench.model import Context, Figure, interleave, stats, timed
from dxg.bench.stack import up

__all__ = ["BLUR_NAME", "GEMM_PEER", "MLP_BATCH", "MLP_NAME", "MLP_WIDTHS", "gemm_name",
           "mlp_numpy", "mlp_params", "run"]

PART = "M3"
SETTLE = 0.15  # seconds idle before a pydxg window (this process's BLAS threads stop spinning)
GEMM_QUICK = ((512, 3, 10), (1024, 3, 4), (2048, 4, 1))  # (n, rounds, calls per window)
GEMM_FULL = ((512, 10, 20), (1024, 10, 5), (2048, 10, 2), (4096, 6, 1))
GEMM_PEER = 2048  # the size the Ray column computes too
MLP_BATCH = 256
MLP_WIDTHS = (1024, 4096, 4096, 1024)
MLP_NAME = "MLP forward"
MLP_QUICK, MLP_FULL = (3, 1), (10, 3)  # (rounds, calls per window)
BLUR_SHAPE = (3, 1080, 1920)  # C, H, W
BLUR_TAPS = (1.0, 4.0, 6.0, 4.0, 1.0)  # binomial: a 5x5 Gaussian
BLUR_NAME = "blur 5x5 1080p RGB f32"
BLUR_QUICK, BLUR_FULL = (2, 1), (6, 2)
SMALL = 256  # elements of a small op
SMALL_QUICK, SMALL_FULL = (1000, 2), (10000, 3)  # (ops per run, rounds)
SMALL_NAME = "small op, one wait each"
BATCHED_NAME = "small ops, batched"


def gemm_name(n: int) -> str:
    """"GEMM 2048 f32": the Ray column attaches to the GEMM_PEER figure by this name."""
    return f"GEMM {n} f32"


def _numpy_threads() -> str:
    try:
        from threadpoolctl import threadpool_info

        n = [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]
        return f"{n[0]} thread{'s' if n[0] != 1 else ''}" if n else "its default threads"
    except Exception:
        return "its default threads"


def _settle(prev: str | None, name: str) -> float:
    return SETTLE if name == "pydxg" and prev == "numpy" else 0.0


def _ms(samples: list[float]) -> list[float]:
    return [x / 1e3 for x in samples]


# ---- GEMM ----------------------------------------------------------------------------------------


def gemm(dev: Any, n: int, rounds: int, per: int) -> tuple[dict[str, list[float]], bool]:
    import dxg.compute as dc

    rng = np.random.default_rng(n)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.zeros((n, n), np.float32)  # touched
    da, db, dcc = dev.asarray(a), dev.asarray(b), dev.zeros((n, n), np.float32)
    stream = dev.default_stream

    def pydxg() -> None:
        dc.matmul(da, db, out=dcc)
        stream.synchronize()

    def numpy() -> None:
        np.matmul(a, b, out=c)

    pydxg()  # warm up: the engine's pages, BLAS's threads
    numpy()
    ok = bool(np.allclose(dcc.get(), c, rtol=1e-3, atol=1e-2))
    return interleave({"pydxg": pydxg, "numpy": numpy}, rounds, per, _settle), ok


# ---- MLP -----------------------------------------------------------------------------------------


def mlp_params(seed: int = 3) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """The input batch and (weight, bias) of each layer, f32."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((MLP_BATCH, MLP_WIDTHS[0]), dtype=np.float32)
    layers = []
    for k_in, k_out in pairwise(MLP_WIDTHS):
        w = (rng.standard_normal((k_in, k_out), dtype=np.float32)
             * np.float32(1 / np.sqrt(k_in)))
        layers.append((w, rng.standard_normal(k_out, dtype=np.float32) * np.float32(0.1)))
    return x, layers


def mlp_numpy(x: np.ndarray, layers: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The forward pass as a NumPy user writes it: relu between the layers, none after the last."""
    h = x
    for i, (w, b) in enumerate(layers):
        h = h @ w + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0)
    return h


def mlp(dev: Any, rounds: int, per: int) -> tuple[dict[str, list[float]], bool]:
    import dxg.compute as dc

    x, layers = mlp_params()
    dx = dev.asarray(x)
    dlayers = [(dev.asarray(w), dev.asarray(b)) for w, b in layers]
    got: list[np.ndarray] = []

    def pydxg() -> None:
        h = dx
        for i, (w, b) in enumerate(dlayers):
            h = h @ w + b
            if i < len(dlayers) - 1:
                h = dc.relu(h)
        got[:] = [h.get()]

    def numpy() -> None:
        mlp_numpy(x, layers)

    pydxg()
    numpy()
    ok = bool(np.allclose(got[0], mlp_numpy(x, layers), rtol=1e-3, atol=1e-2))
    return interleave({"pydxg": pydxg, "numpy": numpy}, rounds, per, _settle), ok


# ---- blur ----------------------------------------------------------------------------------------


def blur_kernel() -> np.ndarray:
    g = np.array(BLUR_TAPS)
    k = np.outer(g, g)
    return (k / k.sum()).astype(np.float32)


def blur(dev: Any, rounds: int, per: int) -> tuple[dict[str, list[float]], bool]:
    import dxg.compute as dc

    c, h, w = BLUR_SHAPE
    k = blur_kernel()
    r = len(BLUR_TAPS) // 2
    img = np.random.default_rng(5).random(BLUR_SHAPE, dtype=np.float32)
    weight = np.repeat(k[None, None], c, axis=0)  # (C, 1, 5, 5): depthwise
    dimg, dweight = dev.asarray(img), dev.asarray(weight)
    stream = dev.default_stream
    padded = np.zeros((c, h + 2 * r, w + 2 * r), np.float32)
    out = np.empty(BLUR_SHAPE, np.float32)
    tmp = np.empty(BLUR_SHAPE, np.float32)
    result: list[Any] = []

    def pydxg() -> None:
        result[:] = [dc.conv2d(dimg, dweight, padding=r, groups=c)]
        stream.synchronize()

    def numpy() -> None:
        padded[:, r:r + h, r:r + w] = img
        out.fill(0)
        for i in range(2 * r + 1):
            for j in range(2 * r + 1):
                np.multiply(padded[:, i:i + h, j:j + w], k[i, j], out=tmp)
                np.add(out, tmp, out=out)

    pydxg()
    numpy()
    ok = bool(np.allclose(result[0].get(), out, rtol=1e-4, atol=1e-5))
    return interleave({"pydxg": pydxg, "numpy": numpy}, rounds, per, _settle), ok


# ---- small ops -------------------------------------------------------------------------------------


def small_ops(dev: Any, count: int, rounds: int) -> tuple[dict[str, list[float]], bool]:
    """Samples (us per op): "sync" each op and its wait timed alone; "batched" and "numpy" a
    whole run of ``count`` ops (one wait at the end) divided by ``count``. Each run starts from
    zeros and must end at ``count`` (every op ran, in order)."""
    import dxg.compute as dc

    x = dev.zeros(SMALL, np.float32)
    one = dev.ones(SMALL, np.float32)
    xh = np.zeros(SMALL, np.float32)
    oneh = np.ones(SMALL, np.float32)
    stream = dev.default_stream

    def op_and_wait() -> None:
        dc.add(x, one, out=x)
        stream.synchronize()

    def sync(k: int) -> list[float]:
        return timed(op_and_wait, k)

    def batched(k: int) -> list[float]:
        t0 = time.perf_counter_ns()
        for _ in range(k):
            dc.add(x, one, out=x)
        stream.synchronize()
        return [(time.perf_counter_ns() - t0) / 1000 / k]

    def numpy(k: int) -> list[float]:
        t0 = time.perf_counter_ns()
        for _ in range(k):
            np.add(xh, oneh, out=xh)
        return [(time.perf_counter_ns() - t0) / 1000 / k]

    fns: dict[str, Callable[[int], list[float]]] = {"sync": sync, "batched": batched,
                                                    "numpy": numpy}
    for fn in fns.values():  # warm up
        fn(min(count, 50))
    samples: dict[str, list[float]] = {k: [] for k in fns}
    ok = True
    names = list(fns)
    for rnd in range(rounds):
        for name in names if rnd % 2 == 0 else names[::-1]:
            x[...] = 0
            xh[...] = 0
            stream.synchronize()
            samples[name] += fns[name](count)
            got = xh if name == "numpy" else x.get()
            ok = ok and bool(np.all(got == count))
    return samples, ok


# ---- the part ------------------------------------------------------------------------------------


def _figure(name: str, fn: Callable[[], tuple[dict[str, list[float]], bool]], base_name: str,
            note: str) -> Figure:
    """A figure in ms of "pydxg" against "numpy" from ``fn``'s samples (us)."""
    try:
        samples, ok = fn()
    except Exception as e:
        return Figure(PART, name, "ms", None, baseline_name=base_name,
                      error=f"{type(e).__name__}: {e}")
    return Figure(PART, name, "ms", stats(_ms(samples["pydxg"])), stats(_ms(samples["numpy"])),
                  base_name, note=note, error="" if ok else "the results differ from NumPy's")


def _small_figures(dev: Any, count: int, rounds: int) -> list[Figure]:
    try:
        samples, ok = small_ops(dev, count, rounds)
    except Exception as e:
        err = f"{type(e).__name__}: {e}"
        return [Figure(PART, SMALL_NAME, "us", None, error=err),
                Figure(PART, BATCHED_NAME, "us", None, error=err)]
    wrong = "" if ok else "an op did not run, or ran out of order"
    what = f"{count:,} in-place adds of {SMALL} f32 through dxg.compute, us per op"
    return [Figure(PART, SMALL_NAME, "us", stats(samples["sync"]), stats(samples["batched"]),
                   "the same ops batched (one wait at the end)",
                   note=f"{what}: each op + stream.synchronize() timed alone, against a whole "
                        "batched run / its count (the ratio: what batching saves)",
                   error=wrong),
            Figure(PART, BATCHED_NAME, "us", stats(samples["batched"]), stats(samples["numpy"]),
                   "the same adds in NumPy in this process",
                   note=f"{what}, a whole run / its count", error=wrong)]


def _figures(ctx: Context, dev: Any) -> list[Figure]:
    quick = ctx.quick
    np_name = f"NumPy in this process (BLAS on {_numpy_threads()})"
    figures = []
    for n, rounds, per in GEMM_QUICK if quick else GEMM_FULL:
        ctx.log(f"M3 {gemm_name(n)}")
        f = _figure(gemm_name(n), lambda n=n, r=rounds, p=per: gemm(dev, n, r, p), np_name,
                    "data on the device; the host's BLAS is single-threaded, a big GEMM fans "
                    "out over the idle engine slots (one per core)")
        if f.pydxg is not None and f.baseline is not None:
            flops = 2 * n ** 3 / 1e6  # GFLOP/s from a time in ms
            f = replace(f, note=f"{f.note}; GFLOP/s at p50: pydxg {flops / f.pydxg.p50:.0f}, "
                                f"NumPy {flops / f.baseline.p50:.0f}")
        figures.append(f)
    ctx.log(f"M3 {MLP_NAME}")
    rounds, per = MLP_QUICK if quick else MLP_FULL
    figures.append(_figure(
        MLP_NAME, lambda: mlp(dev, rounds, per), np_name,
        f"batch {MLP_BATCH}, {'-'.join(map(str, MLP_WIDTHS))}, bias + relu; input and weights "
        "on the device, the output read back"))
    ctx.log(f"M3 {BLUR_NAME}")
    b_rounds, b_per = BLUR_QUICK if quick else BLUR_FULL
    figures.append(_figure(
        BLUR_NAME, lambda: blur(dev, b_rounds, b_per),
        f"{np_name}: 25 slicing multiply-adds on a zero-padded copy",
        "dc.conv2d, depthwise (groups=3), padding 2; the image on the device, the result left "
        "there"))
    count, s_rounds = SMALL_QUICK if quick else SMALL_FULL
    ctx.log(f"M3 {count} small ops")
    return figures + _small_figures(dev, count, s_rounds)


def _names(quick: bool) -> list[str]:
    return [*(gemm_name(n) for n, _, _ in (GEMM_QUICK if quick else GEMM_FULL)), MLP_NAME,
            BLUR_NAME, SMALL_NAME, BATCHED_NAME]


def run(ctx: Context) -> list[Figure]:
    """Every M3 figure, on one dxg.compute device of a `dxg up` started for the part."""
    import dxg.compute as dc

    tmp = ctx.tmp
    tmp.mkdir(parents=True, exist_ok=True)
    figures: list[Figure] = []
    try:
        with up(tmp) as stack, dc.device(0, node=stack.node) as dev:
            figures = _figures(ctx, dev)
    except Exception as e:  # the stack or the device did not start (or stop)
        done = {f.name for f in figures}
        figures += [Figure(PART, n, "us" if "small" in n else "ms", None,
                           error=f"dxg up / dxg.compute device: {type(e).__name__}: {e}")
                    for n in _names(ctx.quick) if n not in done]
    return figures
