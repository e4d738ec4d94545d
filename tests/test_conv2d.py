"""The soft engine's CONV2D (dxg.backends.engine) against a plain NumPy reference: its blocked
depthwise path, its im2col path and its per-tap path (1x1 kernels, huge padding or dilation),
for many shapes, strides, dilations, paddings, groups, batches and float dtypes; the M3 bench
blur's exact case; and a convolution fanned out over helper threads (`FanOut.spans`)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dxg.backends.engine import run
from dxg.backends.fanout import FanOut
from dxg.backends.softcmd import CommandBuffer, EngineFault, FaultKind, Operand
from dxg.bench.compute import BLUR_SHAPE, BLUR_TAPS, blur_kernel

BASE = 0x10000
TOL = {np.dtype(np.float16): 3e-3, np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-12}


class Memory:
    """GPU memory for a test: one bytearray at BASE, operands allocated one after another."""

    def __init__(self, size: int) -> None:
        self.mem = bytearray(size)
        self.top = 0

    def resolve(self, va: int, n: int, write: bool) -> memoryview:
        if not BASE <= va <= va + n <= BASE + len(self.mem):
            raise EngineFault(FaultKind.PAGE_FAULT, -1, f"0x{va:x}+{n} not mapped")
        return memoryview(self.mem)[va - BASE:va - BASE + n]

    def alloc(self, shape: tuple[int, ...], dtype: object) -> Operand:
        op = Operand(BASE + self.top, dtype, shape)
        self.top = (self.top + max(op.nbytes, 1) + 63) // 64 * 64
        assert self.top <= len(self.mem)
        return op

    def view(self, op: Operand) -> np.ndarray:
        return np.ndarray(op.shape, op.dtype.numpy, buffer=self.mem, offset=op.va - BASE)

    def put(self, arr: np.ndarray) -> Operand:
        op = self.alloc(arr.shape, arr.dtype)
        self.view(op)[...] = arr
        return op


def reference(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, stride: tuple[int, int],
              pad: tuple[int, int], dil: tuple[int, int], groups: int) -> np.ndarray:
    """Straightforward convolution in f64: every output element's sum over its group's
    channels and kernel taps, on an explicitly zero-padded input."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    n, _, h, wd = x.shape
    o, cg, kh, kw = w.shape
    og = o // groups
    xp = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    oh = (h + 2 * pad[0] - dil[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + 2 * pad[1] - dil[1] * (kw - 1) - 1) // stride[1] + 1
    out = np.zeros((n, o, oh, ow))
    for oc in range(o):
        g = oc // og
        for ci in range(cg):
            for i in range(kh):
                for j in range(kw):
                    r, s = i * dil[0], j * dil[1]
                    out[:, oc] += w[oc, ci, i, j] * xp[:, g * cg + ci,
                                                       r:r + stride[0] * (oh - 1) + 1:stride[0],
                                                       s:s + stride[1] * (ow - 1) + 1:stride[1]]
    if bias is not None:
        out += bias.astype(np.float64)[None, :, None, None]
    return out


def conv(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, stride: tuple[int, int],
         pad: tuple[int, int], dil: tuple[int, int], groups: int,
         fanout: FanOut | None = None) -> np.ndarray:
    """The engine's answer for one CONV2D command."""
    n, _, h, wd = x.shape
    o, _, kh, kw = w.shape
    oh = (h + 2 * pad[0] - dil[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + 2 * pad[1] - dil[1] * (kw - 1) - 1) // stride[1] + 1
    size = x.nbytes + w.nbytes + (0 if bias is None else bias.nbytes) + 4 * 64
    mem = Memory(size + n * o * oh * ow * x.itemsize)
    xo, wo = mem.put(x), mem.put(w)
    bo = None if bias is None else mem.put(bias)
    yo = mem.alloc((n, o, oh, ow), x.dtype)
    mem.view(yo).fill(np.nan)  # every output must be written
    cb = CommandBuffer().conv2d(yo, xo, wo, bo, stride=stride, padding=pad, dilation=dil,
                                groups=groups)
    run(cb.tobytes(), mem.resolve, None, fanout)
    return mem.view(yo).copy()


def check(got: np.ndarray, want: np.ndarray, scale: float) -> None:
    """Equal to float rounding: the tolerance grows with the terms each output sums."""
    tol = TOL[got.dtype] * max(1.0, scale)
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=tol, atol=tol)


@st.composite
def cases(draw: st.DrawFn) -> tuple:
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    n = draw(st.integers(1, 2))
    c = draw(st.integers(1, 4))
    depthwise = draw(st.booleans())
    groups = c if depthwise else 1
    o = c * draw(st.integers(1, 2)) if depthwise else draw(st.integers(1, 5))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dil = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pad = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    # an input big enough for at least one output
    h = draw(st.integers(max(1, dil[0] * (kh - 1) + 1 - 2 * pad[0]), 12))
    wd = draw(st.integers(max(1, dil[1] * (kw - 1) + 1 - 2 * pad[1]), 12))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return dtype, n, c, h, wd, o, kh, kw, stride, pad, dil, groups, bias, seed


def make(dtype: object, n: int, c: int, h: int, wd: int, o: int, kh: int, kw: int,
         groups: int, has_bias: bool, seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, c, h, wd)).astype(dtype)
    w = rng.uniform(-1, 1, (o, c // groups, kh, kw)).astype(dtype)
    b = rng.uniform(-1, 1, o).astype(dtype) if has_bias else None
    return x, w, b


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_against_reference(case: tuple) -> None:
    dtype, n, c, h, wd, o, kh, kw, stride, pad, dil, groups, has_bias, seed = case
    x, w, b = make(dtype, n, c, h, wd, o, kh, kw, groups, has_bias, seed)
    got = conv(x, w, b, stride, pad, dil, groups)
    check(got, reference(x, w, b, stride, pad, dil, groups), (c // groups) * kh * kw)


SHAPES = [  # N, C, H, W, O, KH, KW, stride, padding, dilation, groups, bias
    (1, 3, 700, 300, 3, 5, 5, (1, 1), (2, 2), (1, 1), 3, True),  # depthwise, 3 row blocks
    (2, 6, 33, 17, 12, 3, 3, (2, 1), (1, 3), (2, 1), 6, False),  # depthwise multiplier 2
    (1, 600, 3, 700, 600, 3, 3, (1, 1), (1, 1), (1, 1), 600, True),  # channel blocks
    (2, 4, 30, 41, 6, 3, 5, (1, 2), (2, 0), (1, 2), 2, True),  # im2col, 2 groups
    (1, 5, 9, 9, 7, 1, 1, (2, 2), (1, 1), (1, 1), 1, True),  # 1x1: the per-tap path
    (1, 2, 2, 2, 2, 2, 2, (3, 3), (300, 200), (1, 1), 2, True),  # much padding: per-tap path
    (1, 1, 2, 2, 1, 2, 2, (50, 40), (1000, 900), (1, 1), 1, True),
    (1, 1, 3, 2, 2, 2, 2, (50, 40), (1000, 900), (1, 1), 1, False),
    (1, 2, 4, 3, 2, 2, 2, (1, 1), (0, 0), (3, 2), 1, True),  # dilation = the whole input
]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES)
def test_shapes(shape: tuple, dtype: object) -> None:
    n, c, h, wd, o, kh, kw, stride, pad, dil, groups, has_bias = shape
    x, w, b = make(dtype, n, c, h, wd, o, kh, kw, groups, has_bias, 3)
    got = conv(x, w, b, stride, pad, dil, groups)
    check(got, reference(x, w, b, stride, pad, dil, groups), (c // groups) * kh * kw)


def test_bench_blur() -> None:
    """M3's "blur 5x5 1080p RGB f32": the same image, kernel and command as the bench, against
    NumPy's 25 multiply-adds on a padded copy (the bench's own baseline, here in f64)."""
    c, h, wd = BLUR_SHAPE
    r = len(BLUR_TAPS) // 2
    k = blur_kernel()
    img = np.random.default_rng(5).random(BLUR_SHAPE, dtype=np.float32)
    weight = np.repeat(k[None, None], c, axis=0)
    got = conv(img[None], weight, None, (1, 1), (r, r), (1, 1), c)[0]
    padded = np.pad(img.astype(np.float64), ((0, 0), (r, r), (r, r)))
    want = np.zeros(BLUR_SHAPE)
    for i in range(2 * r + 1):
        for j in range(2 * r + 1):
            want += float(k[i, j]) * padded[:, i:i + h, j:j + wd]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


class _Slots:
    """A lender with ``free`` idle slots (counts what it lent and got back)."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.lock = threading.Lock()
        self.lent = 0

    def try_borrow(self, most: int) -> int:
        with self.lock:
            got = min(most, self.free)
            self.free -= got
            self.lent += got
            return got

    def give_back(self, n: int = 1) -> None:
        with self.lock:
            self.free += n

    def wanted(self) -> bool:
        return False


@pytest.mark.parametrize("depthwise", [True, False], ids=["depthwise", "im2col"])
def test_fanned_out(depthwise: bool) -> None:
    """Blocks spread over helper threads give the same result as one thread, and every
    borrowed slot goes back."""
    rng = np.random.default_rng(8)
    c = 3
    x = rng.uniform(-1, 1, (2, c, 300, 400)).astype(np.float32)
    o, groups = (c, c) if depthwise else (4, 1)
    w = rng.uniform(-1, 1, (o, c // groups, 5, 5)).astype(np.float32)
    b = rng.uniform(-1, 1, o).astype(np.float32)
    slots = _Slots(1)
    with ThreadPoolExecutor(2) as pool:
        def submit(fn: Callable[[], None]) -> Future[None]:
            return pool.submit(fn)

        fan = FanOut(slots, submit, lambda: True, min_flops=1)
        got = conv(x, w, b, (1, 1), (2, 2), (1, 1), groups, fan)
    assert fan.split == 1 and slots.lent == 1 and slots.free == 1
    one = conv(x, w, b, (1, 1), (2, 2), (1, 1), groups)
    np.testing.assert_array_equal(got, one)
    check(got, reference(x, w, b, (1, 1), (2, 2), (1, 1), groups), (c // groups) * 25)
