"""The soft adapter's command-buffer format (dxg.backends.softcmd) and engine (dxg.backends.engine):
every op against NumPy, an MLP forward pass and a Gaussian blur end to end, faults of every kind,
cancellation, and fuzzing that only ever gets EngineFault back."""

from __future__ import annotations

import struct
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dxg.backends.engine import RunResult, run
from dxg.backends.soft import SOFT_COMMAND_FORMAT_V1, SoftBackend
from dxg.backends.softcmd import (
    COMMAND_SIZES,
    FAULT_KINDS,
    HEADER_BYTES,
    MAGIC,
    Binary,
    BinaryOp,
    CommandBuffer,
    Conv2d,
    Copy,
    DType,
    EngineFault,
    FaultKind,
    Fill,
    Gemm,
    Opcode,
    Operand,
    Reduce,
    ReduceOp,
    Softmax,
    Unary,
    UnaryOp,
    decode,
)

BASE = 0x10000  # read-write memory
ALIAS = 0x4000_0000  # a second VA window onto the same read-write memory
RO_BASE = 0x8000_0000  # read-only memory

FLOATS = (np.float16, np.float32, np.float64)
ALL = (*FLOATS, np.int32, np.uint8)
TOL = {np.dtype(np.float16): 2e-3, np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


class FakeVA:
    """A GPU VA space for tests: ``size`` bytes of read-write memory at BASE (seen again at
    ALIAS) and a read-only page at RO_BASE; anything else faults."""

    def __init__(self, size: int = 8 << 20) -> None:
        self.mem = bytearray(size)
        self.ro = bytearray(4096)
        self.top = 0
        self.calls: list[tuple[int, int, bool]] = []

    def resolve(self, va: int, n: int, write: bool) -> memoryview:
        self.calls.append((va, n, write))
        for base, buf in ((BASE, self.mem), (ALIAS, self.mem), (RO_BASE, self.ro)):
            if base <= va and va + n <= base + len(buf):
                if buf is self.ro:
                    if write:
                        raise EngineFault(FaultKind.PAGE_FAULT, -1, "read-only")
                    return memoryview(buf).toreadonly()[va - base:va - base + n]
                return memoryview(buf)[va - base:va - base + n]
        raise EngineFault(FaultKind.PAGE_FAULT, -1, f"0x{va:x}+{n} not mapped")

    def alloc(self, shape: tuple[int, ...], dtype: object,
              strides: tuple[int, ...] | None = None) -> Operand:
        op = Operand(BASE + self.top, dtype, shape, strides)
        self.top = (self.top + max(op.nbytes, 1) + 63) // 64 * 64
        assert self.top <= len(self.mem)
        return op

    def put(self, arr: np.ndarray) -> Operand:
        op = self.alloc(arr.shape, arr.dtype)
        self.view(op)[...] = arr
        return op

    def view(self, op: Operand) -> np.ndarray:
        isz = op.itemsize
        return np.ndarray(op.shape, op.dtype.numpy, buffer=self.mem, offset=op.va - BASE,
                          strides=tuple(s * isz for s in op.element_strides))

    def get(self, op: Operand) -> np.ndarray:
        return self.view(op).copy()

    def run(self, cb: CommandBuffer | bytes, cancelled: threading.Event | None = None
            ) -> RunResult:
        data = cb.tobytes() if isinstance(cb, CommandBuffer) else cb
        return run(data, self.resolve, cancelled)


@pytest.fixture
def va() -> FakeVA:
    return FakeVA()


def rand(rng: np.random.Generator, shape: tuple[int, ...], dtype: object,
         lo: float = -3, hi: float = 3) -> np.ndarray:
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return rng.uniform(lo, hi, shape).astype(dt)
    if dt.kind == "u":
        return rng.integers(0, 256, shape).astype(dt)
    return rng.integers(-1000, 1000, shape).astype(dt)


def close(got: np.ndarray, want: np.ndarray, dtype: object) -> None:
    dt = np.dtype(dtype)
    assert got.dtype == dt
    if dt.kind == "f":
        tol = TOL[dt]
        np.testing.assert_allclose(got.astype(np.float64), np.asarray(want, np.float64),
                                   rtol=tol, atol=tol, equal_nan=True)
    else:
        np.testing.assert_array_equal(got, np.asarray(want).astype(dt))


def fault(va: FakeVA, cb: CommandBuffer | bytes, kind: FaultKind, index: int | None = None,
          cancelled: threading.Event | None = None) -> EngineFault:
    with pytest.raises(EngineFault) as e:
        va.run(cb, cancelled)
    assert e.value.kind == kind, e.value
    if index is not None:
        assert e.value.command_index == index, e.value
    return e.value


# ---- format -----------------------------------------------------------------------------------


def test_header_layout_and_roundtrip(va: FakeVA) -> None:
    x = va.alloc((4, 3), "float32")
    y = va.alloc((4, 3), "float32", strides=(1, 4))
    w = va.alloc((2, 3, 3, 3), np.float32)
    cb = (CommandBuffer().nop(24).marker(5).copy(x.va, y.va, 12).fill(x, 1.5)
          .unary("relu", x, y).binary(BinaryOp.ADD, x, x, y)
          .gemm(va.alloc((4, 4), np.float32), x, x, alpha=2, beta=0.5, trans_b=True)
          .reduce("mean", va.alloc((3,), np.float32), x, axis=-2).softmax(x, x)
          .conv2d(va.alloc((1, 2, 2, 1), np.float32), va.alloc((1, 3, 4, 3), np.float32), w,
                  bias=va.alloc((2,), np.float32), stride=(2, 1), padding=1, dilation=(1, 2)))
    data = cb.tobytes()
    magic, version, flags, count, total = struct.unpack_from("<IHHII", data)
    assert data[:4] == b"PDXC" and magic == MAGIC and version == 1 and flags == 0
    assert count == len(cb) == 10 and total == len(data) == cb.nbytes
    assert decode(data) == tuple(cb.commands)
    assert decode(memoryview(bytearray(data) + bytes(64))) == tuple(cb.commands)  # tail ignored
    off = HEADER_BYTES
    for _ in cb.commands:  # every command 8-byte aligned, with its documented size
        opcode, size = struct.unpack_from("<HH", data, off)
        assert size % 8 == 0 and size == COMMAND_SIZES.get(Opcode(opcode), 24)
        off += size
    assert set(FaultKind) == FAULT_KINDS and SOFT_COMMAND_FORMAT_V1 == "pydxg-soft-v1"
    assert COMMAND_SIZES[Opcode.GEMM] == 200 and COMMAND_SIZES[Opcode.CONV2D] == 216


def test_encoder_checks_like_the_engine(va: FakeVA) -> None:
    a = va.alloc((2, 3), np.float32)
    with pytest.raises(ValueError, match="SHAPE_MISMATCH"):
        CommandBuffer().gemm(a, a, a)
    with pytest.raises(ValueError, match="unknown unary op"):
        CommandBuffer().unary("cube", a, a)
    with pytest.raises(ValueError, match="BAD_OPERAND"):
        CommandBuffer().unary("exp", va.alloc((2, 3), np.int32), va.alloc((2, 3), np.int32))
    with pytest.raises(ValueError):
        Operand(BASE, "complex64", (2,))


# ---- each op against NumPy --------------------------------------------------------------------


def test_copy_and_fill(va: FakeVA) -> None:
    src = va.put(np.arange(1000, dtype=np.uint8) % 251)
    dst = va.alloc((1000,), np.uint8)
    va.run(CommandBuffer().copy(dst.va, src.va, 1000).copy(dst.va, src.va, 0))
    assert bytes(va.get(dst)) == bytes(va.get(src))
    for dtype, value in ((np.float16, -2.5), (np.float32, 3.25), (np.float64, 1e300),
                         (np.int32, -7), (np.uint8, 200)):
        full = va.put(np.zeros((3, 5), dtype))
        every_other = Operand(full.va, dtype, (3, 3), (5, 2))  # strided: columns 0, 2, 4
        va.run(CommandBuffer().fill(every_other, value).fill(Operand(full.va, dtype, ()), 1))
        want = np.zeros((3, 5), dtype)
        want[:, ::2] = value
        want[0, 0] = 1
        np.testing.assert_array_equal(va.get(full), want)


UNARY_REF = {
    UnaryOp.NEG: np.negative, UnaryOp.ABS: np.abs, UnaryOp.EXP: np.exp, UnaryOp.LOG: np.log,
    UnaryOp.SQRT: np.sqrt, UnaryOp.TANH: np.tanh,
    UnaryOp.SIGMOID: lambda x: 1 / (1 + np.exp(-x.astype(np.float64))),
    UnaryOp.RELU: lambda x: np.maximum(x, 0),
}


@pytest.mark.parametrize("dtype", ALL, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("op", list(UNARY_REF), ids=lambda o: o.name)
def test_unary(va: FakeVA, op: UnaryOp, dtype: object) -> None:
    rng = np.random.default_rng(int(op))
    floats_only = op in (UnaryOp.EXP, UnaryOp.LOG, UnaryOp.SQRT, UnaryOp.TANH, UnaryOp.SIGMOID)
    if floats_only and np.dtype(dtype).kind != "f":
        with pytest.raises(ValueError, match="BAD_OPERAND"):
            CommandBuffer().unary(op, va.alloc((2,), dtype), va.alloc((2,), dtype))
        return
    lo = 0.01 if op in (UnaryOp.LOG, UnaryOp.SQRT) else -3
    x = rand(rng, (7, 5), dtype, lo)
    src, dst = va.put(x), va.alloc((7, 5), dtype)
    one, one_out = va.put(x[:1, :1].reshape(())), va.alloc((), dtype)
    row_out = va.alloc((3, 5), dtype)
    col_t = Operand(src.va, dtype, (5, 7), (1, 5))  # the transpose, strided
    col_out = va.alloc((5, 7), dtype)
    inplace = va.put(x)
    cb = (CommandBuffer().unary(op, dst, src).unary(op, one_out, one)
          .unary(op, row_out, Operand(src.va, dtype, (5,)))  # a row broadcast over 3 rows
          .unary(op, col_out, col_t).unary(op, inplace, inplace))
    assert va.run(cb).commands == 5
    want = UNARY_REF[op](x)
    close(va.get(dst), want, dtype)
    close(va.get(one_out), want[0, 0], dtype)
    close(va.get(row_out), np.broadcast_to(want[0], (3, 5)), dtype)
    close(va.get(col_out), want.T, dtype)
    close(va.get(inplace), want, dtype)


def test_sigmoid_extremes_and_cast(va: FakeVA) -> None:
    x = np.array([-1000, -50, 0, 50, 1000, np.nan], np.float32)
    src, dst = va.put(x), va.alloc((6,), np.float32)
    va.run(CommandBuffer().unary("sigmoid", dst, src))
    close(va.get(dst), [0, 1.9287e-22, 0.5, 1, 1, np.nan], np.float32)
    pairs = [(np.float32, np.int32, [-2.7, -0.5, 0.5, 2.7, 1e3]),
             (np.int32, np.float16, [-70000, -3, 0, 3, 2048]),
             (np.float64, np.float32, [1e-3, 1e40, -2.5, np.pi, 0]),
             (np.uint8, np.float32, [0, 1, 127, 128, 255]),
             (np.float16, np.uint8, [0, 1.9, 127.5, 200, 255]),
             (np.int32, np.int32, [1, 2, 3, 4, 5])]
    for sdt, ddt, values in pairs:
        v = np.array(values, sdt)
        s, d = va.put(v), va.alloc((5,), ddt)
        va.run(CommandBuffer().cast(d, s))
        with np.errstate(over="ignore"):  # -70000 is -inf in f16
            np.testing.assert_array_equal(va.get(d), v.astype(ddt))
    # NaN / out of range to integers: no fault (the value is unspecified)
    s, d = va.put(np.array([np.nan, np.inf, -1e20], np.float32)), va.alloc((3,), np.int32)
    va.run(CommandBuffer().cast(d, s))


BINARY_REF = {
    BinaryOp.ADD: np.add, BinaryOp.SUB: np.subtract, BinaryOp.MUL: np.multiply,
    BinaryOp.DIV: np.divide, BinaryOp.MAX: np.maximum, BinaryOp.MIN: np.minimum,
    BinaryOp.POW: np.power,
}


def int_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.broadcast_arrays(a.astype(np.int64), b.astype(np.int64))
    q = np.zeros(a.shape, np.int64)
    nz = b != 0
    q[nz] = np.abs(a[nz]) // np.abs(b[nz]) * np.sign(a[nz]) * np.sign(b[nz])
    return q


@pytest.mark.parametrize("dtype", ALL, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("op", list(BINARY_REF), ids=lambda o: o.name)
def test_binary(va: FakeVA, op: BinaryOp, dtype: object) -> None:
    rng = np.random.default_rng(100 + int(op))
    dt = np.dtype(dtype)
    if op is BinaryOp.POW and dt.kind != "f":
        with pytest.raises(ValueError, match="BAD_OPERAND"):
            o = va.alloc((2,), dtype)
            CommandBuffer().binary(op, o, o, o)
        return
    lo = 0.1 if op is BinaryOp.POW else -3
    a = rand(rng, (6, 4), dtype, lo)
    b = rand(rng, (6, 4), dtype, lo)
    if op is BinaryOp.DIV and dt.kind != "f":
        b[0, :2] = 0  # x / 0 is 0 for integers
        if dt.kind == "i":
            a[1, 0], b[1, 0] = -7, 2  # truncation, not floor
    shapes = {"full": b, "scalar": b[0, 0].reshape(()), "row": b[0], "column": b[:, :1]}
    oa = va.put(a)
    cb = CommandBuffer()
    outs = {}
    for name, bb in shapes.items():
        outs[name] = va.alloc((6, 4), dtype)
        cb.binary(op, outs[name], oa, va.put(bb))
    inplace = va.put(a)
    cb.binary(op, inplace, inplace, va.put(b))  # dst is a
    va.run(cb)

    def ref(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        if op is BinaryOp.DIV and dt.kind != "f":
            return int_div(x, y)
        with np.errstate(all="ignore"):
            return BINARY_REF[op](x, y).astype(dt)

    for name, bb in shapes.items():
        close(va.get(outs[name]), ref(a, bb), dtype)
    close(va.get(inplace), ref(a, b), dtype)


def test_binary_broadcast_both_and_int_edges(va: FakeVA) -> None:
    col, row = va.put(np.arange(3, dtype=np.int32).reshape(3, 1)), va.put(
        np.arange(4, dtype=np.int32) * 10)
    out = va.alloc((2, 3, 4), np.int32)
    va.run(CommandBuffer().binary("add", out, col, row))
    np.testing.assert_array_equal(va.get(out), np.broadcast_to(np.arange(3)[:, None]
                                                                + np.arange(4) * 10, (2, 3, 4)))
    a = va.put(np.array([-2**31, 7, -7, 2**31 - 1], np.int32))
    b = va.put(np.array([-1, -2, -2, 0], np.int32))
    q = va.alloc((4,), np.int32)
    va.run(CommandBuffer().binary("div", q, a, b))
    assert list(va.get(q)[1:]) == [-3, 3, 0]  # INT_MIN / -1 overflows: unspecified


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True),
                                             (True, True)])
def test_gemm(va: FakeVA, dtype: object, trans_a: bool, trans_b: bool) -> None:
    rng = np.random.default_rng(7)
    m, k, n = 5, 7, 3
    a = rand(rng, (k, m) if trans_a else (m, k), dtype, -1, 1)
    b = rand(rng, (n, k) if trans_b else (k, n), dtype, -1, 1)
    c0 = rand(rng, (m, n), dtype, -1, 1)
    oa, ob = va.put(a), va.put(b)
    plain, scaled = va.put(np.full((m, n), np.nan, dtype)), va.put(c0)
    va.run(CommandBuffer().gemm(plain, oa, ob, trans_a=trans_a, trans_b=trans_b)
           .gemm(scaled, oa, ob, alpha=-0.5, beta=2.0, trans_a=trans_a, trans_b=trans_b))
    opa = (a.T if trans_a else a).astype(np.float64)
    opb = (b.T if trans_b else b).astype(np.float64)
    close(va.get(plain), opa @ opb, dtype)  # beta 0: C's NaNs are not read
    close(va.get(scaled), -0.5 * (opa @ opb) + 2.0 * c0, dtype)


def test_gemm_batched_shapes_and_layouts(va: FakeVA) -> None:
    rng = np.random.default_rng(8)
    batch, m, k, n = 4, 6, 5, 3
    a = rand(rng, (batch, k, m), np.float32)  # stored transposed
    b = rand(rng, (k, n), np.float32)  # one B shared by the batch (batch stride 0)
    oa = va.put(a)
    ob = va.put(b)
    c = va.alloc((batch, m, n), np.float32)
    cmat = Operand(c.va, np.float32, (m, n))
    va.run(CommandBuffer().gemm(cmat, Operand(oa.va, np.float32, (k, m)), ob, trans_a=True,
                                batch=batch, batch_strides=(m * n, k * m, 0)))
    np.testing.assert_allclose(va.get(c), np.transpose(a, (0, 2, 1)) @ b, rtol=1e-5)
    # 1x1x1, a row times a column, and a C stored column-major (not BLAS-shaped as stored)
    one = va.put(np.array([[3.0]]))
    out = va.put(np.array([[5.0]]))
    va.run(CommandBuffer().gemm(out, one, one, alpha=2, beta=1))
    assert va.get(out)[0, 0] == 23.0
    x, y = rand(rng, (1, 9), np.float64), rand(rng, (9, 1), np.float64)
    dot = va.alloc((1, 1), np.float64)
    outer = va.alloc((9, 9), np.float64)
    colmajor = va.alloc((4, 6), np.float64, strides=(1, 4))
    p, q = rand(rng, (4, 8), np.float64), rand(rng, (8, 6), np.float64)
    va.run(CommandBuffer().gemm(dot, va.put(x), va.put(y)).gemm(outer, va.put(y), va.put(x))
           .gemm(colmajor, va.put(p), va.put(q), alpha=0.5))
    np.testing.assert_allclose(va.get(dot), x @ y)
    np.testing.assert_allclose(va.get(outer), y @ x)
    np.testing.assert_allclose(va.get(colmajor), 0.5 * p @ q)
    # A not BLAS-shaped (every other column of a wider matrix); f16, batched, A shared, beta 1
    wide = rand(rng, (4, 16), np.float32)
    sparse_a = Operand(va.put(wide).va, np.float32, (4, 8), (16, 2))
    r = rand(rng, (8, 3), np.float32)
    out3 = va.alloc((4, 3), np.float32)
    h_a, h_b = rand(rng, (3, 5), np.float16), rand(rng, (2, 5, 2), np.float16)
    h_c0 = rand(rng, (2, 3, 2), np.float16)
    h_c = va.put(h_c0)
    va.run(CommandBuffer().gemm(out3, sparse_a, va.put(r))
           .gemm(Operand(h_c.va, np.float16, (3, 2)), va.put(h_a),
                 Operand(va.put(h_b).va, np.float16, (5, 2)), beta=1.0, batch=2,
                 batch_strides=(6, 0, 10)))
    np.testing.assert_allclose(va.get(out3), wide[:, ::2] @ r, rtol=1e-5)
    close(va.get(h_c), h_a.astype(np.float64) @ h_b.astype(np.float64) + h_c0, np.float16)
    # alpha 0: C = beta * C without reading A or B
    out2 = va.put(np.array([[4.0]]))
    va.run(CommandBuffer().gemm(out2, one, one, alpha=0, beta=0.25))
    assert va.get(out2)[0, 0] == 1.0


@pytest.mark.parametrize("dtype", ALL, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("op", list(ReduceOp), ids=lambda o: o.name)
def test_reduce(va: FakeVA, op: ReduceOp, dtype: object) -> None:
    rng = np.random.default_rng(int(op))
    x = rand(rng, (3, 4, 5), dtype)
    if np.dtype(dtype).kind == "u":
        x //= 16  # sums stay in range
    src = va.put(x)
    cb = CommandBuffer()
    outs = []
    for axis in range(3):
        for keep in (False, True):
            shape = list(x.shape)
            shape[axis] = 1
            if not keep:
                del shape[axis]
            outs.append((axis, keep, va.alloc(tuple(shape), dtype)))
            cb.reduce(op, outs[-1][2], src, axis)
    single = va.put(x[:1, 0, 0])
    single_out = va.alloc((), dtype)
    cb.reduce(op, single_out, single, 0)
    va.run(cb)
    wide = x.astype(np.float64)
    fn = {ReduceOp.SUM: np.sum, ReduceOp.MAX: np.max, ReduceOp.MIN: np.min,
          ReduceOp.MEAN: np.mean}[op]
    for axis, keep, out in outs:
        want = fn(wide, axis=axis, keepdims=keep)
        if op is ReduceOp.MEAN and np.dtype(dtype).kind != "f":
            want = np.trunc(want)
        close(va.get(out), want, dtype)
    close(va.get(single_out), x[0, 0, 0], dtype)


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: np.dtype(d).name)
def test_softmax(va: FakeVA, dtype: object) -> None:
    rng = np.random.default_rng(3)
    x = rand(rng, (3, 4, 6), dtype)
    big = np.array([[1000, 999, 998], [-1000, -1001, -999], [6e4, 6e4, -6e4]], dtype)
    src, bsrc = va.put(x), va.put(big)
    outs = [va.alloc(x.shape, dtype) for _ in range(3)]
    bout = va.alloc(big.shape, dtype)
    inplace = va.put(x)
    cb = CommandBuffer()
    for axis, out in enumerate(outs):
        cb.softmax(out, src, axis)
    cb.softmax(bout, bsrc, axis=-1).softmax(inplace, inplace, axis=2)
    va.run(cb)

    def ref(v: np.ndarray, axis: int) -> np.ndarray:
        v = v.astype(np.float64)
        e = np.exp(v - v.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)

    for axis, out in enumerate(outs):
        close(va.get(out), ref(x, axis), dtype)
    got = va.get(bout)
    assert np.isfinite(got).all()
    close(got, ref(big, 1), dtype)
    close(va.get(inplace), ref(x, 2), dtype)


def conv_ref(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, stride: tuple[int, int],
             pad: tuple[int, int], dil: tuple[int, int], groups: int) -> np.ndarray:
    """Direct convolution over an explicitly padded input, in f64."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    n, _, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    oh = (h + 2 * pad[0] - dil[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + 2 * pad[1] - dil[1] * (kw - 1) - 1) // stride[1] + 1
    out = np.zeros((n, o, oh, ow))
    og = o // groups
    for g in range(groups):
        for i in range(kh):
            for j in range(kw):
                r, s = i * dil[0], j * dil[1]
                patch = xp[:, g * cg:(g + 1) * cg, r:r + stride[0] * (oh - 1) + 1:stride[0],
                           s:s + stride[1] * (ow - 1) + 1:stride[1]]
                out[:, g * og:(g + 1) * og] += np.einsum("ncyx,oc->noyx", patch,
                                                         w[g * og:(g + 1) * og, :, i, j])
    if bias is not None:
        out += bias.astype(np.float64)[None, :, None, None]
    return out


CONV_CASES = [  # N, C, H, W, O, KH, KW, stride, padding, dilation, groups, bias
    (1, 1, 1, 1, 1, 1, 1, (1, 1), (0, 0), (1, 1), 1, False),
    (2, 3, 9, 7, 4, 3, 3, (1, 1), (1, 1), (1, 1), 1, True),
    (1, 4, 10, 11, 6, 3, 2, (2, 3), (2, 1), (1, 1), 2, True),
    (2, 2, 8, 8, 2, 3, 3, (1, 2), (3, 0), (2, 1), 1, False),
    (1, 3, 6, 5, 3, 5, 5, (1, 1), (2, 2), (1, 1), 3, False),
    (1, 2, 3, 3, 1, 2, 2, (3, 3), (4, 4), (1, 1), 1, True),  # padding larger than the input
]


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d(va: FakeVA, dtype: object, case: tuple) -> None:
    n, c, h, w, o, kh, kw, stride, pad, dil, groups, has_bias = case
    rng = np.random.default_rng(11)
    x = rand(rng, (n, c, h, w), dtype, -1, 1)
    wt = rand(rng, (o, c // groups, kh, kw), dtype, -1, 1)
    b = rand(rng, (o,), dtype, -1, 1) if has_bias else None
    want = conv_ref(x, wt, b, stride, pad, dil, groups)
    out = va.alloc(want.shape, dtype)
    va.run(CommandBuffer().conv2d(out, va.put(x), va.put(wt), va.put(b) if has_bias else None,
                                  stride=stride, padding=pad, dilation=dil, groups=groups))
    close(va.get(out), want, dtype)


# ---- end to end -------------------------------------------------------------------------------


def test_mlp_forward(va: FakeVA) -> None:
    rng = np.random.default_rng(42)
    batch, d_in, hidden, classes = 16, 32, 64, 10
    x = rng.standard_normal((batch, d_in)).astype(np.float32)
    w1 = (rng.standard_normal((d_in, hidden)) / np.sqrt(d_in)).astype(np.float32)
    b1 = rng.standard_normal(hidden).astype(np.float32)
    w2 = (rng.standard_normal((hidden, classes)) / np.sqrt(hidden)).astype(np.float32)
    b2 = rng.standard_normal(classes).astype(np.float32)
    ox, ow1, ob1, ow2, ob2 = (va.put(v) for v in (x, w1, b1, w2, b2))
    h = va.alloc((batch, hidden), np.float32)
    logits = va.alloc((batch, classes), np.float32)
    probs = va.alloc((batch, classes), np.float32)
    cb = (CommandBuffer().gemm(h, ox, ow1).binary("add", h, h, ob1).unary("relu", h, h)
          .gemm(logits, h, ow2).binary("add", logits, logits, ob2).softmax(probs, logits, 1)
          .marker(1))
    result = va.run(cb)
    assert result.commands == 7 and result.markers == (1,) and result.bytes_touched > 0
    hid = np.maximum(x.astype(np.float64) @ w1 + b1, 0)
    z = hid @ w2 + b2
    want = np.exp(z - z.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    np.testing.assert_allclose(va.get(probs), want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(va.get(probs).sum(1), 1, rtol=1e-5)


def test_gaussian_blur_5x5(va: FakeVA) -> None:
    rng = np.random.default_rng(5)
    img = rng.uniform(0, 255, (1, 3, 256, 256)).astype(np.uint8)
    g1 = np.exp(-0.5 * (np.arange(5) - 2) ** 2 / 1.0**2)
    kernel = np.outer(g1, g1) / np.outer(g1, g1).sum()
    weight = np.broadcast_to(kernel, (3, 1, 5, 5)).astype(np.float32)  # depthwise
    src = va.put(img)
    f = va.alloc(img.shape, np.float32)
    blurred = va.alloc(img.shape, np.float32)
    out = va.alloc(img.shape, np.uint8)
    cb = (CommandBuffer().cast(f, src).conv2d(blurred, f, va.put(weight), padding=2, groups=3)
          .cast(out, blurred))
    t0 = time.perf_counter()
    va.run(cb)
    elapsed = time.perf_counter() - t0
    xp = np.pad(img.astype(np.float64), ((0, 0), (0, 0), (2, 2), (2, 2)))
    want = sum(kernel[i, j] * xp[:, :, i:i + 256, j:j + 256] for i in range(5) for j in range(5))
    np.testing.assert_allclose(va.get(blurred), want, rtol=1e-5, atol=1e-3)
    assert np.abs(va.get(out).astype(int) - np.trunc(want)).max() <= 1
    assert elapsed < 1.0, elapsed  # about 20 ms on two cores


def test_conv_3x3_speed(va: FakeVA) -> None:
    rng = np.random.default_rng(6)
    x = va.put(rng.standard_normal((1, 3, 256, 256)).astype(np.float32))
    w = va.put(rng.standard_normal((16, 3, 3, 3)).astype(np.float32))
    b = va.put(rng.standard_normal(16).astype(np.float32))
    y = va.alloc((1, 16, 256, 256), np.float32)
    t0 = time.perf_counter()
    va.run(CommandBuffer().conv2d(y, x, w, b, padding=1))
    assert time.perf_counter() - t0 < 1.0


def test_soft_backend_executes(va: FakeVA) -> None:
    x = va.put(np.arange(6, dtype=np.float64))
    y = va.alloc((6,), np.float64)
    result = SoftBackend().execute(0, CommandBuffer().unary("sqrt", y, x).tobytes(), va.resolve,
                                   threading.Event())
    assert result.commands == 1 and result.bytes_touched == 96
    np.testing.assert_allclose(va.get(y), np.sqrt(np.arange(6)))


def test_concurrent_runs(va: FakeVA) -> None:
    rng = np.random.default_rng(9)
    a = rng.standard_normal((128, 128))
    oa = va.put(a)
    outs = [va.alloc((128, 128), np.float64) for _ in range(4)]
    errors: list[BaseException] = []

    def work(out: Operand) -> None:
        try:
            for _ in range(5):
                va.run(CommandBuffer().gemm(out, oa, oa).unary("tanh", out, out))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(o,)) for o in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for o in outs:
        np.testing.assert_allclose(va.get(o), np.tanh(a @ a), rtol=1e-10)


# ---- faults -----------------------------------------------------------------------------------


def header(count: int, total: int, magic: int = MAGIC, version: int = 1, flags: int = 0) -> bytes:
    return struct.pack("<IHHII", magic, version, flags, count, total)


def test_bad_headers(va: FakeVA) -> None:
    ok = CommandBuffer().nop().tobytes()
    assert va.run(ok).commands == 1
    assert va.run(header(0, 16)).commands == 0
    cases = [b"", b"PDXC", header(1, 24, magic=0x12345678) + bytes(8),
             header(1, 24, version=2) + ok[16:], header(1, 24, flags=1) + ok[16:],
             header(1, 32) + ok[16:],  # total past the end of the buffer
             header(1, 20) + ok[16:] + bytes(4),  # total not a multiple of 8
             header(5, 24) + ok[16:],  # more commands than fit
             header(1, 32) + ok[16:] + bytes(8),  # bytes after the last command
             header(1, 24) + struct.pack("<HHI", 1, 0, 0),  # size 0
             header(1, 24) + struct.pack("<HHI", 1, 12, 0),  # size not a multiple of 8
             header(1, 24) + struct.pack("<HHI", 1, 32, 0)]  # size past the total
    for data in cases:
        fault(va, data, FaultKind.BAD_HEADER)
    fault(va, memoryview(np.zeros(3, np.float32)), FaultKind.BAD_HEADER)
    fault(va, "not bytes", FaultKind.BAD_HEADER)  # type: ignore[arg-type]
    fault(va, memoryview(bytearray(64))[::2], FaultKind.BAD_HEADER)
    # a format-'f' view of a good buffer is read as its bytes
    assert run(memoryview(bytearray(ok)).cast("f"), va.resolve).commands == 1


def test_bad_opcodes(va: FakeVA) -> None:
    x = va.alloc((4,), np.float32)
    good = CommandBuffer().nop().unary("neg", x, x).tobytes()

    def patched(off: int, fmt: str, *values: int) -> bytes:
        data = bytearray(good)
        struct.pack_into(fmt, data, off, *values)
        return bytes(data)

    fault(va, patched(24, "<H", 0), FaultKind.BAD_OPCODE, 1)  # opcode 0
    fault(va, patched(24, "<H", 99), FaultKind.BAD_OPCODE, 1)
    fault(va, patched(24, "<H", int(Opcode.BINARY)), FaultKind.BAD_OPCODE, 1)  # wrong size
    fault(va, patched(28, "<H", 77), FaultKind.BAD_OPCODE, 1)  # unknown unary function
    fault(va, patched(30, "<H", 1), FaultKind.BAD_OPCODE, 1)  # reserved field
    va.run(good)


def test_bad_operands(va: FakeVA) -> None:
    f32 = va.alloc((4, 4), np.float32)
    good = CommandBuffer().unary("neg", f32, f32).tobytes()
    dst = 16 + 8  # the destination operand of that UNARY

    def patched(rel: int, fmt: str, *values: int) -> bytes:
        data = bytearray(good)
        struct.pack_into(fmt, data, dst + rel, *values)
        return bytes(data)

    for rel, fmt, value in [(8, "<B", 0), (8, "<B", 9),  # dtype codes
                            (9, "<B", 5),  # 5 dims
                            (10, "<H", 2), (12, "<I", 1),  # unknown flag, reserved
                            (16, "<I", 0),  # an empty dimension
                            (24, "<I", 3),  # a shape field past ndim
                            (32, "<I", 1),  # strides on a contiguous operand
                            (0, "<Q", BASE + 2)]:  # VA not aligned to its elements
        fault(va, patched(rel, fmt, value), FaultKind.BAD_OPERAND, 0)
    # the same through command objects: the encoder refuses them, and so does the decoder
    cases = [
        Unary(UnaryOp.NEG, Operand(BASE, "f4", (4, 4), (0, 1)), f32),  # dst repeats elements
        Reduce(ReduceOp.SUM, Operand(BASE, "f4", (4,)),
               Operand(BASE + 64, "f4", (1 << 20, 4), (0, 1)), 0),  # a broadcast source
        Gemm(Operand(BASE, "f4", (2, 2)), Operand(BASE + 64, "f4", (2, 2)),
             Operand(BASE + 128, "f4", (2, 2)), batch=3,
             batch_strides=(4, 1, 0)),  # A's matrices overlap
        Gemm(Operand(BASE, "f4", (2, 2)), Operand(BASE + 64, "f4", (2, 2)),
             Operand(BASE + 128, "f4", (2, 2)), batch=3,
             batch_strides=(0, 4, 4)),  # every C the same
        Gemm(Operand(BASE, "i4", (2, 2)), Operand(BASE + 64, "i4", (2, 2)),
             Operand(BASE + 128, "i4", (2, 2))),  # no integer GEMM
        Copy(BASE, BASE + (1 << 48), 1 << 48),
        Unary(UnaryOp.NEG, Operand(2**64 - 4, "f4", (2,)), Operand(BASE, "f4", (2,))),
    ]
    for cmd in cases:
        with pytest.raises(ValueError, match="BAD_OPERAND"):
            CommandBuffer().append(cmd)
        body = cmd.encode()
        fault(va, header(1, 16 + len(body)) + body, FaultKind.BAD_OPERAND, 0)
    with pytest.raises(ValueError, match="BAD_OPERAND"):
        CommandBuffer().append(Fill(f32, b"\0\0"))  # value bytes of the wrong size
    body = Fill(f32, b"\1" * 8).encode()  # on the wire: bytes past the f32 value are set
    fault(va, header(1, 16 + len(body)) + body, FaultKind.BAD_OPERAND, 0)


def test_shape_mismatches(va: FakeVA) -> None:
    a, b = va.alloc((3, 4), np.float32), va.alloc((5, 2), np.float32)
    d = va.alloc((3, 4), np.float64)
    w, x = va.alloc((2, 3, 3, 3), np.float32), va.alloc((1, 3, 8, 8), np.float32)
    cmds = [
        Gemm(a, a, b), Gemm(va.alloc((3, 2), np.float32), a, b),
        Gemm(Operand(a.va, "f4", (3, 4, 1)), a, a),
    ]
    cmds += [
        Binary(BinaryOp.ADD, a, a, b), Binary(BinaryOp.ADD, a, a, d),  # shape, dtype
        Unary(UnaryOp.NEG, a, va.alloc((4, 3), np.float32)), Unary(UnaryOp.EXP, d, a),
        Reduce(ReduceOp.SUM, va.alloc((4,), np.float32), a, 1),
        Reduce(ReduceOp.SUM, va.alloc((3,), np.float32), a, 2),
        Softmax(va.alloc((4, 3), np.float32), a, 0), Softmax(a, a, 2),
        Conv2d(va.alloc((1, 2, 6, 6), np.float32), x, w, padding=(0, 1)),
        Conv2d(va.alloc((1, 2, 6, 6), np.float32), x, va.alloc((2, 2, 3, 3), np.float32)),
        Conv2d(va.alloc((1, 2, 1, 1), np.float32), va.alloc((1, 3, 2, 2), np.float32), w),
        Conv2d(va.alloc((1, 2, 6, 6), np.float32), x, w, va.alloc((3,), np.float32)),
    ]
    for cmd in cmds:
        with pytest.raises(ValueError, match="SHAPE_MISMATCH"):
            CommandBuffer().append(cmd)
        body = cmd.encode()
        fault(va, header(1, 16 + len(body)) + body, FaultKind.SHAPE_MISMATCH, 0)


def test_page_faults_and_partial_execution(va: FakeVA) -> None:
    x = va.put(np.arange(8, dtype=np.float32))
    y = va.alloc((8,), np.float32)
    ro = Operand(RO_BASE, np.float32, (8,))
    end = Operand(BASE + len(va.mem) - 16, np.float32, (8,))  # runs off the end
    for bad in (Operand(0x10_0000_0000, np.float32, (8,)), end):
        e = fault(va, CommandBuffer().unary("neg", y, x).unary("neg", y, bad),
                  FaultKind.PAGE_FAULT, 1)
        assert "not mapped" in e.detail and e.va == bad.va
    np.testing.assert_array_equal(va.get(y), -np.arange(8))  # command 0 ran
    fault(va, CommandBuffer().unary("neg", ro, x), FaultKind.PAGE_FAULT, 0)  # read-only
    va.run(CommandBuffer().unary("neg", y, ro))  # reading it is fine
    fault(va, CommandBuffer().copy(RO_BASE, BASE, 8), FaultKind.PAGE_FAULT, 0)
    fault(va, CommandBuffer().copy(BASE, 0, 8), FaultKind.PAGE_FAULT, 0)

    # a resolver that misbehaves still only gives PAGE_FAULT
    def short(v: int, n: int, w: bool) -> memoryview:
        return va.resolve(v, n, w)[:-1]

    def broken(v: int, n: int, w: bool) -> memoryview:
        raise KeyError(v)

    class VaFault(Exception):  # as dxg.host.vaspace's: the address refused in ``va``
        def __init__(self, va: int) -> None:
            super().__init__(f"GPU VA 0x{va:x}: not mapped")
            self.va = va

    def host_like(v: int, n: int, w: bool) -> memoryview:
        raise VaFault(v + 4096)

    def readonly(v: int, n: int, w: bool) -> memoryview:
        return va.resolve(v, n, w).toreadonly()

    data = CommandBuffer().unary("neg", y, x).tobytes()
    for resolver in (short, broken, readonly, host_like, lambda v, n, w: 42):
        with pytest.raises(EngineFault) as e:
            run(data, resolver)
        assert e.value.kind == FaultKind.PAGE_FAULT and e.value.command_index == 0
        assert e.value.va == (x.va + 4096 if resolver is host_like else
                              y.va if resolver is readonly else x.va)


def test_overlaps(va: FakeVA) -> None:
    x = va.put(np.arange(16, dtype=np.float32))
    first = Operand(x.va, np.float32, (8,))
    shifted = Operand(x.va + 4, np.float32, (8,))
    alias = Operand(x.va - BASE + ALIAS, np.float32, (16,))  # same memory, another VA
    m = va.put(np.eye(4, dtype=np.float32))
    m_alias = Operand(m.va - BASE + ALIAS, np.float32, (4, 4))
    for cb in (CommandBuffer().copy(x.va + 4, x.va, 16),
               CommandBuffer().copy(x.va, x.va, 16),
               CommandBuffer().unary("neg", shifted, first),
               CommandBuffer().unary("neg", Operand(alias.va + 4, np.float32, (8,)), first),
               CommandBuffer().binary("add", first, first, shifted),
               CommandBuffer().gemm(m, m, va.alloc((4, 4), np.float32)),
               CommandBuffer().gemm(m_alias, m, m),
               CommandBuffer().reduce("sum", Operand(x.va, np.float32, (4,)),
                                      Operand(x.va, np.float32, (4, 4)), 1),
               CommandBuffer().softmax(shifted, first, 0)):
        fault(va, cb, FaultKind.BAD_OPERAND, 0)
    np.testing.assert_array_equal(va.get(x), np.arange(16))  # nothing was written
    # in place through the same operand (even at another VA) is fine; so are disjoint neighbours
    va.run(CommandBuffer().unary("neg", x, x).copy(x.va + 32, x.va, 32).unary("neg", alias, x))
    np.testing.assert_array_equal(va.get(x), np.concatenate([np.arange(8)] * 2))


def test_decode_errors_run_nothing(va: FakeVA) -> None:
    x = va.put(np.ones(4, np.float32))
    good = CommandBuffer().unary("neg", x, x).unary("neg", x, x).tobytes()
    data = bytearray(good)
    struct.pack_into("<H", data, 16 + 104, 99)  # the second command's opcode
    fault(va, bytes(data), FaultKind.BAD_OPCODE, 1)
    assert va.calls == []  # not even resolved
    np.testing.assert_array_equal(va.get(x), np.ones(4))


def test_cancellation(va: FakeVA) -> None:
    x = va.put(np.ones(4, np.float32))
    cb = CommandBuffer().unary("neg", x, x).unary("neg", x, x).unary("neg", x, x)
    stop = threading.Event()
    stop.set()
    fault(va, cb, FaultKind.CANCELLED, 0, cancelled=stop)
    np.testing.assert_array_equal(va.get(x), np.ones(4))
    stop.clear()

    def resolve(v: int, n: int, w: bool) -> memoryview:
        stop.set()  # the caller goes away while command 0 runs
        return va.resolve(v, n, w)

    with pytest.raises(EngineFault) as e:
        run(cb.tobytes(), resolve, stop)
    assert e.value.kind == FaultKind.CANCELLED and e.value.command_index == 1
    np.testing.assert_array_equal(va.get(x), -np.ones(4))  # command 0 ran, 1 and 2 did not
    # a long convolution notices between kernel rows
    stop.clear()
    xi = va.alloc((1, 1, 64, 64), np.float32)
    conv = CommandBuffer().conv2d(va.alloc((1, 1, 64, 64), np.float32), xi,
                                  va.alloc((1, 1, 9, 9), np.float32), padding=4).tobytes()
    with pytest.raises(EngineFault) as e:
        run(conv, resolve, stop)
    assert e.value.kind == FaultKind.CANCELLED and e.value.command_index == 0


# ---- what one run (and one decode) does once ----------------------------------------------------


def test_run_resolves_each_range_once(va: FakeVA) -> None:
    """Many small ops on the same operands: each range resolved once per run, each use still
    counted in bytes_touched, results as if every op resolved afresh."""
    x = va.put(np.zeros(256, np.float32))
    one = va.put(np.ones(256, np.float32))
    cb = CommandBuffer()
    for _ in range(50):
        cb.binary("add", x, x, one)
    result = va.run(cb)
    np.testing.assert_array_equal(va.get(x), np.full(256, 50, np.float32))
    assert sorted(va.calls) == sorted([(x.va, 1024, False), (one.va, 1024, False),
                                       (x.va, 1024, True)])
    assert result.bytes_touched == 50 * 3 * 1024
    va.calls.clear()
    va.run(cb)  # a new run resolves afresh
    assert len(va.calls) == 3
    np.testing.assert_array_equal(va.get(x), np.full(256, 100, np.float32))


def test_run_cache_is_per_run(va: FakeVA) -> None:
    """A range one run resolved is resolved again (and may fault) in the next."""
    x = va.put(np.arange(8, dtype=np.float32))
    data = CommandBuffer().unary("neg", x, x).tobytes()
    assert run(data, va.resolve).commands == 1
    gone = FakeVA()  # nothing of x's is mapped here any more

    def unmapped(v: int, n: int, w: bool) -> memoryview:
        raise EngineFault(FaultKind.PAGE_FAULT, -1, "unmapped")

    for resolver in (unmapped, lambda v, n, w: gone.resolve(v, n, w)[:-4]):
        with pytest.raises(EngineFault) as e:
            run(data, resolver)
        assert e.value.kind == FaultKind.PAGE_FAULT and e.value.va == x.va


def test_cached_ranges_keep_every_check(va: FakeVA) -> None:
    """After operands resolved (and ran) fine, a later command in the same run still faults on
    an unmapped VA, a read-only destination, a destination overlapping a source (also through
    another VA of the same memory); the commands before it ran, it did not."""
    x = va.put(np.arange(1, 17, dtype=np.float32))
    y = va.put(np.zeros(16, np.float32))
    first = Operand(x.va, np.float32, (8,))
    shifted = Operand(x.va + 4, np.float32, (8,))
    alias_x = Operand(x.va - BASE + ALIAS, np.float32, (16,))
    alias_shifted = Operand(alias_x.va + 4, np.float32, (8,))
    ro = Operand(RO_BASE, np.float32, (16,))
    unmapped = Operand(0x10_0000_0000, np.float32, (16,))
    warm = (CommandBuffer().unary("neg", y, x).unary("neg", y, y).unary("neg", x, x)
            .unary("neg", first, first).unary("neg", y, ro)
            .unary("neg", alias_x, x)  # in place, through another VA of the same memory
            .unary("neg", y, alias_x))
    tails = [
        (CommandBuffer().unary("neg", y, unmapped), FaultKind.PAGE_FAULT, unmapped.va),
        (CommandBuffer().binary("add", y, y, unmapped), FaultKind.PAGE_FAULT, unmapped.va),
        (CommandBuffer().unary("neg", ro, x), FaultKind.PAGE_FAULT, RO_BASE),  # read it, yes
        (CommandBuffer().unary("neg", shifted, first), FaultKind.BAD_OPERAND, 0),
        (CommandBuffer().binary("add", first, first, shifted), FaultKind.BAD_OPERAND, 0),
        (CommandBuffer().unary("neg", alias_shifted, first), FaultKind.BAD_OPERAND, 0),
        (CommandBuffer().copy(x.va, alias_x.va + 4, 16), FaultKind.BAD_OPERAND, 0),
        (CommandBuffer().copy(x.va, alias_x.va, 64), FaultKind.BAD_OPERAND, 0),
        (CommandBuffer().reduce("sum", Operand(x.va, np.float32, (4,)),
                                Operand(x.va, np.float32, (4, 4)), 1),
         FaultKind.BAD_OPERAND, 0),
    ]
    for tail, kind, at in tails:
        x0 = va.get(x)
        cb = CommandBuffer()
        for cmd in (*warm.commands, *tail.commands):
            cb.append(cmd)
        e = fault(va, cb, kind, len(warm))
        assert e.va == at
        # what the warm-up does: x[:8] negated, y = -x
        want = np.concatenate([-x0[:8], x0[8:]])
        np.testing.assert_array_equal(va.get(x), want)
        np.testing.assert_array_equal(va.get(y), -want)


def test_decode_once_per_operand_bytes(va: FakeVA) -> None:
    """One decode makes one Operand of the same 48 bytes, yet checks every command's use of it
    (a broadcast source may not be a destination; a bad copy still faults after good ones)."""
    x = va.put(np.zeros(4, np.float32))
    row = Operand(x.va, np.float32, (4, 4), (0, 1))  # one row, repeated: fine as a source
    out = va.alloc((4, 4), np.float32)
    cb = CommandBuffer().unary("neg", out, row).unary("neg", out, row)
    cmds = decode(cb.tobytes())
    assert cmds[0].src is cmds[1].src and cmds[0].dst is cmds[1].dst  # type: ignore[union-attr]
    assert cmds[0].src == row and cmds[0].src.nbytes == row.nbytes == 16  # type: ignore[union-attr]
    body = Unary(UnaryOp.NEG, row, out).encode()  # the same operand as a destination
    data = cb.tobytes()
    data = header(3, len(data) + len(body)) + data[HEADER_BYTES:] + body
    fault(va, data, FaultKind.BAD_OPERAND, 2)
    # the same bytes with a reserved bit set, after the good ones
    bad = bytearray(Unary(UnaryOp.NEG, out, row).encode())
    bad[8 + 48 + 12] = 1  # the source operand's reserved field
    data = cb.tobytes()
    data = header(3, len(data) + len(bad)) + data[HEADER_BYTES:] + bytes(bad)
    fault(va, data, FaultKind.BAD_OPERAND, 2)


def test_many_distinct_operands(va: FakeVA) -> None:
    """More distinct operands than one decode remembers: all still decode and run."""
    n = 1500  # 4,500 operands
    xs = [va.put(np.full(4, i, np.float32)) for i in range(n)]
    ys = [va.alloc((4,), np.float32) for _ in range(n)]
    cb = CommandBuffer()
    for i in range(n):
        cb.binary("mul", ys[i], xs[i], xs[i])
    assert va.run(cb).commands == n
    for i in (0, 1, n // 2, n - 1):
        np.testing.assert_array_equal(va.get(ys[i]), np.full(4, i * i, np.float32))


def test_operand_value_semantics() -> None:
    """Operand's kept layout is no part of its value: equality, hash, repr, replace, pickle."""
    import dataclasses
    import pickle

    a = Operand(0x1000, np.float32, (4, 4), (8, 1))
    b = Operand(0x1000, DType.F32, [4, 4], [8, 1])
    assert a == b and hash(a) == hash(b) and a.nbytes == (3 * 8 + 3 + 1) * 4
    assert repr(a) == "Operand(va=4096, dtype=<DType.F32: 2>, shape=(4, 4), strides=(8, 1))"
    c = dataclasses.replace(a, shape=(2, 2))
    assert c.nbytes == (8 + 1 + 1) * 4 and c.size == 4
    d = pickle.loads(pickle.dumps(a))
    assert d == a and d.nbytes == a.nbytes and d.element_strides == (8, 1)
    assert Operand(0, np.float32, (0, 4)).nbytes == 0
    assert Operand(0, np.float32, (3, 4)).element_strides == (4, 1)


def test_fault_pickles() -> None:
    import pickle

    e = pickle.loads(pickle.dumps(EngineFault("PAGE_FAULT", 3, "x", 0x1000)))
    assert (e.kind, e.command_index, e.detail, e.va) == (FaultKind.PAGE_FAULT, 3, "x", 0x1000)
    assert e.kind == "PAGE_FAULT" and e.at(3) is e and e.at(4).va == 0x1000
    with pytest.raises(ValueError):
        EngineFault("NOT_A_KIND", 0, "")


# ---- fuzzing ----------------------------------------------------------------------------------

FUZZ_BYTES = 16 << 10


def fuzz_buffer() -> bytes:
    """A valid buffer touching every op, on small operands inside FUZZ_BYTES."""
    f32 = np.float32
    m = Operand(BASE, f32, (4, 4))
    v = Operand(BASE + 64, f32, (4,))
    c = Operand(BASE + 128, f32, (4, 4))
    img = Operand(BASE + 256, f32, (1, 2, 5, 5))
    wt = Operand(BASE + 512, f32, (2, 2, 3, 3))
    out = Operand(BASE + 1024, f32, (1, 2, 3, 3))
    i32 = Operand(BASE + 2048, np.int32, (3, 4), (4, 1))
    return (CommandBuffer().nop(16).marker(9).copy(BASE + 4096, BASE, 64).fill(m, 0.5)
            .unary("sigmoid", c, m).binary("pow", c, m, v).binary("div", i32, i32, i32)
            .gemm(c, m, m, alpha=2, beta=1, trans_b=True, batch=2, batch_strides=(32, 0, 0))
            .reduce("mean", v, m, 1).softmax(c, c, 0)
            .conv2d(out, img, wt, v.__class__(BASE + 1200, f32, (2,)))
            .cast(Operand(BASE + 3000, np.uint8, (4, 4)), m).tobytes())


def fuzz_operand(rank: int | None = None, dtypes: tuple[DType, ...] = tuple(DType)
                 ) -> st.SearchStrategy[Operand]:
    """Small operands, mostly in mapped memory, sometimes misaligned, read-only or aliased."""
    ranks = st.just(rank) if rank is not None else st.integers(0, 4)

    def build(dims: list[int], strided: bool, strides: list[int], dt: DType, base: int,
              off: int) -> Operand:
        return Operand(base + off, dt, tuple(dims),
                       tuple(strides[:len(dims)]) if strided else None)

    return ranks.flatmap(lambda nd: st.builds(
        build, st.lists(st.integers(1, 5), min_size=nd, max_size=nd), st.booleans(),
        st.lists(st.sampled_from([0, 1, 2, 5, 20]), min_size=4, max_size=4),
        st.sampled_from(dtypes), st.sampled_from([BASE, BASE, BASE, ALIAS, RO_BASE]),
        st.sampled_from([0, 64, 512, 4096, 8192, FUZZ_BYTES - 64, 2])))


FUZZ_FLOATS = (DType.F16, DType.F32, DType.F64)
FUZZ_COMMANDS = st.one_of(
    st.builds(Copy, st.integers(BASE, BASE + FUZZ_BYTES), st.integers(BASE, BASE + FUZZ_BYTES),
              st.integers(0, 256)),
    st.builds(Fill, fuzz_operand(), st.binary(min_size=1, max_size=8)),
    st.builds(Unary, st.sampled_from(UnaryOp), fuzz_operand(), fuzz_operand()),
    st.builds(Binary, st.sampled_from(BinaryOp), fuzz_operand(), fuzz_operand(),
              fuzz_operand()),
    st.builds(Gemm, fuzz_operand(2, FUZZ_FLOATS), fuzz_operand(2, FUZZ_FLOATS),
              fuzz_operand(2, FUZZ_FLOATS), st.sampled_from([0.0, 1.0, -2.0, float("nan")]),
              st.sampled_from([0.0, 1.0]), st.booleans(), st.booleans(), st.integers(1, 3),
              st.tuples(*[st.sampled_from([0, 1, 4, 16])] * 3)),
    st.builds(Reduce, st.sampled_from(ReduceOp), fuzz_operand(), fuzz_operand(),
              st.integers(0, 4)),
    st.builds(Softmax, fuzz_operand(), fuzz_operand(), st.integers(0, 3)),
    st.builds(Conv2d, fuzz_operand(4, FUZZ_FLOATS), fuzz_operand(4, FUZZ_FLOATS),
              fuzz_operand(4, FUZZ_FLOATS), st.none() | fuzz_operand(1, FUZZ_FLOATS),
              st.tuples(st.integers(1, 2), st.integers(1, 2)),
              st.tuples(st.integers(0, 3), st.integers(0, 3)),
              st.tuples(st.integers(1, 2), st.integers(1, 2)), st.integers(1, 3)),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(FUZZ_COMMANDS, min_size=1, max_size=3))
def test_fuzz_typed_commands(cmds: list) -> None:
    """Well-formed commands with random operands, encoded without the encoder's checks."""
    body = b"".join(c.encode() for c in cmds)
    fuzz_run(header(len(cmds), 16 + len(body)) + body)


def fuzz_run(data: bytes) -> None:
    fake = FakeVA(FUZZ_BYTES)
    try:
        result = run(data, fake.resolve)
    except EngineFault as e:
        assert e.kind in FAULT_KINDS and isinstance(e.detail, str)
        assert e.__cause__ is None, repr(e.__cause__)  # a check caught it, not the last resort
        assert -1 <= e.command_index < max(1, len(data) // 8)
    else:
        assert isinstance(result, RunResult)


def test_fuzz_base_buffer_runs() -> None:
    fake = FakeVA(FUZZ_BYTES)
    assert run(fuzz_buffer(), fake.resolve).commands == 12


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(data: bytes) -> None:
    fuzz_run(data)
    fuzz_run(header(len(data) // 8, 16 + len(data) // 8 * 8) + data[:len(data) // 8 * 8])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 4000), st.sampled_from("BHIQ"),
                          st.integers(0, 2**64 - 1)), min_size=1, max_size=6))
def test_fuzz_mutated_buffers(edits: list[tuple[int, str, int]]) -> None:
    data = bytearray(fuzz_buffer())
    for off, fmt, value in edits:
        size = struct.calcsize(fmt)
        off %= len(data) - size + 1
        struct.pack_into("<" + fmt, data, off, value % (1 << (8 * size)))
    fuzz_run(bytes(data))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from([*Opcode, 0, 11, 0xFFFF]),
                          st.binary(min_size=0, max_size=256),
                          st.sampled_from([BASE, BASE + 64, RO_BASE, 0, 2**63])),
                min_size=1, max_size=4))
def test_fuzz_structured_commands(cmds: list[tuple[int, bytes, int]]) -> None:
    """Commands with the right framing and random bodies (operand VAs mostly mapped)."""
    body = b""
    for opcode, payload, va_hint in cmds:
        size = COMMAND_SIZES.get(opcode, 8 + len(payload) // 8 * 8)  # type: ignore[call-overload]
        raw = bytearray((struct.pack("<HH", opcode, size) + payload).ljust(size, b"\0")[:size])
        for off in range(8, size - 47, 48):  # aim operand-looking slots at real memory
            if off + 8 <= size:
                struct.pack_into("<Q", raw, off, va_hint)
        body += bytes(raw)
    fuzz_run(header(len(cmds), 16 + len(body)) + body)
