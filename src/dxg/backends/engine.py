"""The soft adapter's execution engine: runs pydxg-soft-v1 command buffers with NumPy.

`run` decodes and checks the whole buffer first (`dxg.backends.softcmd.decode`: nothing runs if
any command is malformed), then executes the commands in order. For each one it resolves every
operand through the caller's ``resolve(va, nbytes, write)`` (the host wires that to the process's
GPU VA space), checks that the destination overlaps no source, and only then reads and writes.
A range is resolved on its first use in the run and an operand's view made once (`_Run`: a
buffer of many small commands on the same tensors pays a lookup, not a resolve, per operand).
The work happens on NumPy views of the resolved memory (``out=`` arguments, matmul straight into
the destination); temporaries are made only where an op needs them (GEMM with beta != 0 or
through f16, convolution patches, f16 accumulation) and are never larger than the operands'
real memory (a convolution's padded input rows: a few times one image's operands; its im2col
patches: 8 MiB at most). Large copies, ufuncs and BLAS GEMMs run with the GIL released.

Whatever the bytes, `run` returns a `RunResult` or raises `EngineFault`; commands before the
faulting one (``command_index``) have run. ``cancelled`` is checked before every command (and
between the blocks or kernel rows of a convolution). Floating-point errors never fault: they
give inf/NaN as a GPU would. The engine keeps no state between calls: it can run on many threads at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from dxg.backends import Cancelled
from dxg.backends.fanout import FanOut
from dxg.backends.softcmd import (
    Binary,
    BinaryOp,
    Command,
    Conv2d,
    Copy,
    EngineFault,
    FaultKind,
    Fill,
    Gemm,
    Marker,
    Nop,
    Operand,
    Reduce,
    ReduceOp,
    Softmax,
    Unary,
    UnaryOp,
    decode,
)

__all__ = ["EngineFault", "FaultKind", "Resolve", "RunResult", "run"]

# resolve(va, nbytes, write) -> a memoryview of exactly those bytes, or raise EngineFault
Resolve = Callable[[int, int, bool], memoryview]
NDArray = np.ndarray[Any, Any]

_F16 = np.dtype(np.float16)
_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)


@dataclass(frozen=True, slots=True)
class RunResult:
    """What one buffer did: commands executed, bytes of operand memory resolved (read and
    written), seconds it took (decode included) and the MARKER values passed, in order."""

    commands: int
    bytes_touched: int
    elapsed: float
    markers: tuple[int, ...] = ()


class _Run:
    """One run's resolver, counters and what it has resolved.

    Within a run each distinct range ``(va, nbytes, write)`` is resolved once, and each distinct
    operand (as a destination or as a source) gets one NumPy view, used again by every later
    command that names it: a buffer of many small commands costs a dictionary lookup per operand
    rather than a resolve and a new array. That is sound because nothing can change what a range
    resolves to while the run lasts: no command touches mappings (commands read and write memory
    contents only), the host resolves through an immutable snapshot of the VA space
    (`VaSnapshot`) taken for the job, and every view stays held until the run ends anyway (see
    ``held``). Each use still counts in ``touched``, and every overlap check is made per command.
    """

    __slots__ = ("addresses", "cancelled", "fanout", "held", "markers", "resolve", "touched",
                 "views")

    def __init__(self, resolve: Resolve, cancelled: Cancelled | None,
                 fanout: FanOut | None = None) -> None:
        self.resolve = resolve
        self.cancelled = cancelled
        self.fanout = fanout  # idle engine slots a big GEMM may borrow (backends.fanout)
        self.touched = 0
        self.markers: list[int] = []
        # Every view resolved, by range, held until the run ends: NumPy keeps only the exporter
        # (not the view) of an array made on a buffer, so without these the memory's owner
        # could unmap it (it sees no export) while the engine still works on it.
        self.held: dict[tuple[int, int, bool], memoryview] = {}
        # (va, dtype, shape, strides, write) -> the operand's array
        self.views: dict[tuple[Any, ...], NDArray] = {}
        # id(array) -> (array, the host address of its first element); the array is kept in
        # the entry so that its id stays its own
        self.addresses: dict[int, tuple[NDArray, int]] = {}

    def check_cancelled(self) -> None:
        if self.cancelled is not None and self.cancelled.is_set():
            raise EngineFault(FaultKind.CANCELLED, -1, "cancelled")

    def memory(self, va: int, nbytes: int, write: bool) -> memoryview:
        """Exactly ``nbytes`` at ``va`` (writable when ``write``), or PAGE_FAULT; resolved on
        the run's first use of that range."""
        key = (va, nbytes, write)
        mv = self.held.get(key)
        if mv is None:
            mv = self.held[key] = self._resolve(va, nbytes, write)
        self.touched += nbytes
        return mv

    def _resolve(self, va: int, nbytes: int, write: bool) -> memoryview:
        """``resolve``'s answer, checked: whatever the resolver does, a PAGE_FAULT or bytes."""
        page_fault = FaultKind.PAGE_FAULT
        try:
            mv = self.resolve(va, nbytes, write)
        except EngineFault as e:
            raise e if e.va or e.kind != page_fault else EngineFault(
                e.kind, e.command_index, e.detail, va) from None
        except Exception as e:  # e.g. dxg.host.vaspace.VaFault, which carries the address
            at = getattr(e, "va", None)
            raise EngineFault(page_fault, -1, f"0x{va:x}+{nbytes}: {e}",
                              at if isinstance(at, int) else va) from e
        try:
            if type(mv) is not memoryview:
                mv = memoryview(mv)
            if not mv.c_contiguous:
                raise ValueError("not contiguous")
            if mv.ndim != 1 or mv.itemsize != 1:
                mv = mv.cast("B")
        except (TypeError, ValueError):
            raise EngineFault(page_fault, -1,
                              f"0x{va:x}+{nbytes}: resolved to no contiguous bytes", va) from None
        if mv.nbytes != nbytes:
            raise EngineFault(page_fault, -1, f"0x{va:x}+{nbytes}: resolved {mv.nbytes} bytes",
                              va)
        if write and mv.readonly:
            raise EngineFault(page_fault, -1, f"0x{va:x}+{nbytes}: read-only", va)
        return mv

    def array(self, op: Operand, write: bool) -> NDArray:
        """A NumPy view (no copy) of ``op`` in the resolved memory (read-only unless
        ``write``); the run's first use of the operand makes it."""
        va, dtype, shape, strides = op.va, op.dtype, op.shape, op.strides
        key = (va, dtype, shape, strides, write)
        arr = self.views.get(key)
        if arr is not None:
            self.touched += op.nbytes
            return arr
        mv = self.memory(va, op.nbytes, write)
        if strides is not None:
            isz = op.itemsize
            strides = tuple(s * isz for s in strides)
        # (strides None: NumPy's C-order strides, the operand's own)
        arr = np.ndarray(shape, dtype.numpy, buffer=mv, strides=strides)
        if not write:
            arr.flags.writeable = False
        self.views[key] = arr
        return arr

    def address(self, arr: NDArray) -> int:
        """The host address of ``arr``'s first element (asked of NumPy once per array: it
        costs about as much as the rest of a small command's checks)."""
        got = self.addresses.get(id(arr))
        if got is None:
            got = self.addresses[id(arr)] = (arr, arr.__array_interface__["data"][0])
        return got[1]

    def same(self, a: NDArray, b: NDArray) -> bool:
        """Whether ``a`` and ``b`` are one operand: the same memory, dtype, shape and strides."""
        return (a.shape == b.shape and a.strides == b.strides and a.dtype == b.dtype
                and self.address(a) == self.address(b))

    def disjoint(self, dst: NDArray, *srcs: NDArray | None, inplace: bool = False) -> None:
        """BAD_OPERAND when the destination's memory overlaps a source's (by address bounds, so
        two VAs of the same memory count). ``inplace``: a source that is exactly the destination
        is fine (elementwise ops)."""
        for s in srcs:
            if (s is not None and np.may_share_memory(dst, s)
                    and not (inplace and self.same(dst, s))):
                raise EngineFault(FaultKind.BAD_OPERAND, -1,
                                  "the destination overlaps a source" +
                                  (" (only an identical operand may be updated in place)"
                                   if inplace else ""))


# ---- ops ---------------------------------------------------------------------------------------


def _nop(run: _Run, cmd: Nop) -> None:
    pass


def _marker(run: _Run, cmd: Marker) -> None:
    run.markers.append(cmd.value)


def _copy(run: _Run, cmd: Copy) -> None:
    if not cmd.nbytes:
        return
    dst = np.frombuffer(run.memory(cmd.dst_va, cmd.nbytes, True), np.uint8)
    src = np.frombuffer(run.memory(cmd.src_va, cmd.nbytes, False), np.uint8)
    run.disjoint(dst, src)
    np.copyto(dst, src)


def _fill(run: _Run, cmd: Fill) -> None:
    dst = run.array(cmd.dst, True)
    np.copyto(dst, cmd.scalar)


def _sigmoid(d: NDArray, s: NDArray) -> None:
    # 1 / (1 + exp(-x)): exact for large |x| (exp overflows to inf, giving 0)
    np.negative(s, out=d)
    np.exp(d, out=d)
    np.add(d, 1, out=d)
    np.reciprocal(d, out=d)


_UNARY = MappingProxyType({
    UnaryOp.NEG: lambda d, s: np.negative(s, out=d),
    UnaryOp.ABS: lambda d, s: np.absolute(s, out=d),
    UnaryOp.EXP: lambda d, s: np.exp(s, out=d),
    UnaryOp.LOG: lambda d, s: np.log(s, out=d),
    UnaryOp.SQRT: lambda d, s: np.sqrt(s, out=d),
    UnaryOp.TANH: lambda d, s: np.tanh(s, out=d),
    UnaryOp.SIGMOID: _sigmoid,
    UnaryOp.RELU: lambda d, s: np.maximum(s, d.dtype.type(0), out=d),
    UnaryOp.CAST: lambda d, s: np.copyto(d, s, casting="unsafe"),
})


def _unary(run: _Run, cmd: Unary) -> None:
    src = run.array(cmd.src, False)
    dst = run.array(cmd.dst, True)
    run.disjoint(dst, src, inplace=True)
    _UNARY[cmd.op](dst, src)


def _divide(d: NDArray, a: NDArray, b: NDArray) -> None:
    if d.dtype.kind == "f":
        np.true_divide(a, b, out=d)
    elif d.dtype.kind == "u":
        np.floor_divide(a, b, out=d)  # floor is truncation here; x // 0 is 0
    else:
        # truncate toward zero (C, GPUs): floor, plus one where the signs differ and there
        # is a remainder; computed before d is written (d may be a or b)
        fix = (np.remainder(a, b) != 0) & ((a < 0) != (b < 0))
        np.floor_divide(a, b, out=d)
        np.add(d, fix, out=d, casting="unsafe")


_BINARY = MappingProxyType({
    BinaryOp.ADD: lambda d, a, b: np.add(a, b, out=d),
    BinaryOp.SUB: lambda d, a, b: np.subtract(a, b, out=d),
    BinaryOp.MUL: lambda d, a, b: np.multiply(a, b, out=d),
    BinaryOp.DIV: _divide,
    BinaryOp.MAX: lambda d, a, b: np.maximum(a, b, out=d),
    BinaryOp.MIN: lambda d, a, b: np.minimum(a, b, out=d),
    BinaryOp.POW: lambda d, a, b: np.power(a, b, out=d),
})


def _binary(run: _Run, cmd: Binary) -> None:
    a = run.array(cmd.a, False)
    b = run.array(cmd.b, False)
    dst = run.array(cmd.dst, True)
    run.disjoint(dst, a, b, inplace=True)
    _BINARY[cmd.op](dst, a, b)


def _blasable(x: NDArray) -> bool:
    """Whether BLAS takes the last two dims of ``x`` as they are (or transposed), as NumPy's
    matmul decides; otherwise it falls back to a slow loop."""
    isz = x.itemsize
    r, c = x.shape[-2:]
    sr, sc = x.strides[-2:]
    return ((sc == isz and sr % isz == 0 and sr >= c * isz)
            or (sr == isz and sc % isz == 0 and sc >= r * isz))


def _matrices(x: NDArray, dtype: np.dtype[Any]) -> NDArray:
    """``x`` (matrices, maybe batched) ready for BLAS in ``dtype``: as it is when it can be, else
    a contiguous copy (one matrix, broadcast, when the batch shares it)."""
    if x.dtype == dtype and _blasable(x):
        return x
    if x.ndim == 3 and x.strides[0] == 0:
        return np.broadcast_to(np.ascontiguousarray(x[0], dtype=dtype), x.shape)
    return np.ascontiguousarray(x, dtype=dtype)


def _gemm(run: _Run, cmd: Gemm) -> None:
    c3, a3, b3 = cmd.layouts()
    a = run.array(a3, False)
    b = run.array(b3, False)
    c = run.array(c3, True)
    run.disjoint(c, a, b)
    if cmd.trans_a:
        a = a.transpose(0, 2, 1)
    if cmd.trans_b:
        b = b.transpose(0, 2, 1)
    if cmd.batch == 1:
        a, b, c = a[0], b[0], c[0]
    alpha, beta = cmd.alpha, cmd.beta
    if alpha == 0:  # BLAS: A and B are not read
        if beta == 0:
            c.fill(0)
        else:
            np.multiply(c, beta, out=c)
        return
    work = _F32 if c.dtype == _F16 else c.dtype
    a = _matrices(a, work)
    b = _matrices(b, work)
    if beta == 0 and work == c.dtype and _blasable(c):
        if run.fanout is None or not run.fanout.matmul(a, b, c):
            np.matmul(a, b, out=c)
        if alpha != 1:
            np.multiply(c, alpha, out=c)
        return
    t = np.matmul(a, b)
    if alpha != 1:
        np.multiply(t, alpha, out=t)
    if beta != 0:
        if work == c.dtype:
            np.multiply(c, beta, out=c)
            np.add(c, t, out=c)
            return
        t += c.astype(work) * beta
    np.copyto(c, t, casting="unsafe")


def _reduce(run: _Run, cmd: Reduce) -> None:
    src = run.array(cmd.src, False)
    dst = run.array(cmd.dst, True)
    run.disjoint(dst, src)
    axis, keep = cmd.axis, cmd.keepdims
    if cmd.op is ReduceOp.MAX:
        np.maximum.reduce(src, axis=axis, out=dst, keepdims=keep)
        return
    if cmd.op is ReduceOp.MIN:
        np.minimum.reduce(src, axis=axis, out=dst, keepdims=keep)
        return
    mean = cmd.op is ReduceOp.MEAN
    if dst.dtype.kind == "f" and dst.dtype != _F16:
        np.add.reduce(src, axis=axis, dtype=dst.dtype, out=dst, keepdims=keep)
        if mean:
            np.divide(dst, src.shape[axis], out=dst)
        return
    if not mean and dst.dtype.kind != "f":  # integer sums wrap in their own type
        np.add.reduce(src, axis=axis, dtype=dst.dtype, out=dst, keepdims=keep)
        return
    # f16 (accumulated in f32) and integer means (f64, truncated)
    acc = _F32 if dst.dtype == _F16 else _F64
    t = np.add.reduce(src, axis=axis, dtype=acc, keepdims=keep)
    if mean:
        t = np.divide(t, src.shape[axis], out=np.asarray(t))
        if dst.dtype.kind != "f":
            np.trunc(t, out=t)
    np.copyto(dst, t, casting="unsafe")


def _softmax(run: _Run, cmd: Softmax) -> None:
    src = run.array(cmd.src, False)
    dst = run.array(cmd.dst, True)
    run.disjoint(dst, src, inplace=True)
    axis = cmd.axis
    top = np.maximum.reduce(src, axis=axis, keepdims=True)  # before dst is written
    np.subtract(src, top, out=dst)
    np.exp(dst, out=dst)
    total = np.add.reduce(dst, axis=axis, keepdims=True,
                          dtype=_F32 if dst.dtype == _F16 else dst.dtype)
    np.divide(dst, total, out=dst, casting="unsafe")


def _span(offset: int, stride: int, size: int, out: int) -> tuple[int, int]:
    """The outputs [o0, o1) whose input index ``o * stride + offset`` lies in [0, size)."""
    o0 = max(0, -(offset // stride))  # ceil(-offset / stride)
    o1 = min(out, (size - 1 - offset) // stride + 1)
    return o0, o1


# A depthwise convolution works in blocks of about this many outputs (1 MiB of f32), each read
# from a zero-padded copy of just the input rows it needs, its sums kept in a contiguous scratch
# array until the last tap: the block stays in a core's caches through every kernel tap (whole-
# image passes go out to memory twice per tap) and every tap covers the whole block, so NumPy
# runs each multiply and add as one long loop. (Measured on the 1080p blur and a 64-channel
# 3x3: 2^16..2^19 all within ~10%; smaller blocks pay per-call and per-row costs.)
_CONV_BLOCK = 1 << 18


def _fill_padded(pad: NDArray, src: NDArray, top: int, pw: int, cols: int) -> None:
    """``pad`` (C, R, W') := the R rows of ``src`` (C, H, W) from row ``top`` on (rows outside
    [0, H) zero), input column 0 at ``pw``; only columns [pw, pw + cols) are written (the
    others hold zeros from the scratch array's making)."""
    need = pad.shape[1]
    a, b = max(0, top), min(src.shape[1], top + need)
    if b <= a or cols == 0:
        pad.fill(0)
        return
    pad[:, :a - top].fill(0)
    pad[:, b - top:].fill(0)
    pad[:, a - top:b - top, pw:pw + cols] = src[:, a:b, :cols]


def _conv_depthwise(run: _Run, cmd: Conv2d, x: NDArray, w: NDArray, bias: NDArray | None,
                    y: NDArray) -> bool:
    """A convolution with one input channel per group (groups == C; O a multiple of it), as
    NumPy code would do it: per kernel tap one broadcast multiply and one add into the block's
    sums, where BLAS would get matrices of one column. Blocks of (image, channels, output rows)
    spread over idle engine slots (`FanOut.spans`). False (nothing done) when the padded copy
    would be too big for the block (padding or dilation far beyond the input)."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    og = o // c
    oh, ow = y.shape[2:]
    (sh, sw), (ph, pw), (dh, dw) = cmd.stride, cmd.padding, cmd.dilation
    chans = max(1, min(c, _CONV_BLOCK // (og * ow)))
    rows = max(1, min(oh, _CONV_BLOCK // (chans * og * ow)))
    span_h = (rows - 1) * sh + (kh - 1) * dh + 1  # padded input rows one block reads
    span_w = (ow - 1) * sw + (kw - 1) * dw + 1  # padded input columns every block reads
    if chans * span_h * span_w > 4 * (c * h * wd + o * oh * ow):  # (one image's operands)
        return False
    cols = max(0, min(wd, span_w - pw))  # input columns [0, cols) land at pw.. in the copy
    work = _F32 if y.dtype == _F16 else y.dtype
    # (KH, KW, C, O/C, 1, 1): each tap's weights, broadcast over a block's rows and columns
    taps = np.ascontiguousarray(w.reshape(c, og, kh, kw).transpose(2, 3, 0, 1),
                                dtype=work)[..., None, None]
    b4 = None if bias is None else bias.astype(work).reshape(c, og, 1, 1)
    y5 = np.reshape(y, (n, c, og, oh, ow), copy=False)  # a view: what it gets lands in y
    blocks = [(i, c0, r0) for i in range(n) for c0 in range(0, c, chans)
              for r0 in range(0, oh, rows)]

    def some(lo: int, hi: int) -> None:
        """Blocks [lo, hi), with this thread's own scratch arrays."""
        buf = np.zeros((chans, span_h, span_w), work)  # columns outside the input stay 0
        tmp = np.empty((chans, og, rows, ow), work)
        sums = np.empty((chans, og, rows, ow), work)  # (y's block may be strided, or f16)
        for i, c0, r0 in blocks[lo:hi]:
            run.check_cancelled()
            c1, r1 = min(c, c0 + chans), min(oh, r0 + rows)
            nc, nr = c1 - c0, r1 - r0
            pad = buf[:nc, :(nr - 1) * sh + (kh - 1) * dh + 1]
            _fill_padded(pad, x[i, c0:c1], r0 * sh - ph, pw, cols)
            acc = sums[:nc, :, :nr]
            t = tmp[:nc, :, :nr]
            for p in range(kh):
                for q in range(kw):
                    v = pad[:, None, p * dh:p * dh + (nr - 1) * sh + 1:sh,
                            q * dw:q * dw + (ow - 1) * sw + 1:sw]
                    if p == q == 0:
                        np.multiply(v, taps[0, 0, c0:c1], out=acc)
                    else:
                        np.multiply(v, taps[p, q, c0:c1], out=t)
                        np.add(acc, t, out=acc)
            if b4 is not None:
                np.add(acc, b4[c0:c1], out=acc)
            np.copyto(y5[i, c0:c1, :, r0:r1], acc, casting="unsafe")

    flops = 2 * n * o * oh * ow * kh * kw
    if run.fanout is None or not run.fanout.spans(flops, len(blocks), some):
        some(0, len(blocks))
    return True


def _conv_im2col(run: _Run, cmd: Conv2d, x: NDArray, w: NDArray, bias: NDArray | None,
                 y: NDArray) -> bool:
    """A convolution as one GEMM per block of output rows (and group): (O/g, C/g*KH*KW) @
    (C/g*KH*KW, rows*OW) over the block's patches (im2col), read from a zero-padded copy of
    just the input rows the block needs; one BLAS call with all taps in K rather than a thin
    one per tap plus an add. False (nothing done) when a block's patches would be too big."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    g = cmd.groups
    og = o // g
    oh, ow = y.shape[2:]
    (sh, sw), (ph, pw), (dh, dw) = cmd.stride, cmd.padding, cmd.dilation
    k = cg * kh * kw
    rows = max(1, min(oh, _CONV_BLOCK // (c * kh * kw * ow)))
    span_h = (rows - 1) * sh + (kh - 1) * dh + 1
    span_w = (ow - 1) * sw + (kw - 1) * dw + 1
    if (c * span_h * span_w > 4 * (c * h * wd + o * oh * ow)  # (one image's operands)
            or c * kh * kw * rows * ow > 4 * _CONV_BLOCK):
        return False
    cols = max(0, min(wd, span_w - pw))
    work = _F32 if y.dtype == _F16 else y.dtype
    wmat = np.ascontiguousarray(w.reshape(g, og, k), dtype=work)
    b3 = None if bias is None else bias.astype(work).reshape(g, og, 1)
    y5 = np.reshape(y, (n, g, og, oh, ow), copy=False)  # a view: what it gets lands in y
    blocks = [(i, r0) for i in range(n) for r0 in range(0, oh, rows)]

    def some(lo: int, hi: int) -> None:
        """Blocks [lo, hi), with this thread's own scratch arrays."""
        buf = np.zeros((c, span_h, span_w), work)
        patches = np.empty(c * kh * kw * rows * ow, work)
        sums = np.empty(o * rows * ow, work)
        for i, r0 in blocks[lo:hi]:
            run.check_cancelled()
            nr = min(oh, r0 + rows) - r0
            pad = buf[:, :(nr - 1) * sh + (kh - 1) * dh + 1]
            _fill_padded(pad, x[i], r0 * sh - ph, pw, cols)
            pad4 = pad.reshape(g, cg, *pad.shape[1:])
            # (the first nr * OW of each row of a block's scratch, contiguous)
            col6 = patches[:c * kh * kw * nr * ow].reshape(g, cg, kh, kw, nr, ow)
            for p in range(kh):
                for q in range(kw):
                    col6[:, :, p, q] = pad4[:, :, p * dh:p * dh + (nr - 1) * sh + 1:sh,
                                            q * dw:q * dw + (ow - 1) * sw + 1:sw]
            acc = sums[:o * nr * ow].reshape(g, og, nr * ow)
            np.matmul(wmat, col6.reshape(g, k, nr * ow), out=acc)
            if b3 is not None:
                np.add(acc, b3, out=acc)
            np.copyto(y5[i, :, :, r0:r0 + nr], acc.reshape(g, og, nr, ow), casting="unsafe")

    flops = 2 * n * o * oh * ow * k
    if run.fanout is None or not run.fanout.spans(flops, len(blocks), some):
        some(0, len(blocks))
    return True


def _conv2d(run: _Run, cmd: Conv2d) -> None:
    x = run.array(cmd.src, False)
    w = run.array(cmd.weight, False)
    bias = run.array(cmd.bias, False) if cmd.bias is not None else None
    y = run.array(cmd.dst, True)
    run.disjoint(y, x, w, bias)
    if w.shape[1] == 1 and _conv_depthwise(run, cmd, x, w, bias, y):
        return
    if w.shape[2] * w.shape[3] > 1 and _conv_im2col(run, cmd, x, w, bias, y):
        return  # (a 1x1 kernel: the patches would be copies of the input; one GEMM below)
    n, _, h, wd = x.shape
    o, cg, kh, kw = w.shape
    g = cmd.groups
    og = o // g
    oh, ow = y.shape[2:]
    (sh, sw), (ph, pw), (dh, dw) = cmd.stride, cmd.padding, cmd.dilation
    work = _F32 if y.dtype == _F16 else y.dtype
    acc = y if y.dtype == work else np.empty(y.shape, work)
    if bias is not None:
        np.copyto(acc, bias.reshape(1, o, 1, 1), casting="unsafe")
    else:
        acc.fill(0)
    # the weights as (KH, KW, groups, O/groups, C/groups): one small matrix per kernel tap
    taps = np.ascontiguousarray(w.reshape(g, og, cg, kh, kw).transpose(3, 4, 0, 1, 2),
                                dtype=work)
    rows = [(i, *_span(i * dh - ph, sh, h, oh)) for i in range(kh)]
    cols = [(j, *_span(j * dw - pw, sw, wd, ow)) for j in range(kw)]
    cols = [c for c in cols if c[1] < c[2]]
    for i, r0, r1 in rows:
        if r0 >= r1:
            continue
        run.check_cancelled()
        hh = r1 - r0
        ih = r0 * sh + i * dh - ph
        for j, c0, c1 in cols:
            ww = c1 - c0
            iw = c0 * sw + j * dw - pw
            patch = x[:, :, ih:ih + (hh - 1) * sh + 1:sh, iw:iw + (ww - 1) * sw + 1:sw]
            p = np.ascontiguousarray(patch, dtype=work).reshape(n, g, cg, hh * ww)
            # (g, O/g, C/g) @ (N, g, C/g, P) -> (N, g, O/g, P): BLAS, one GEMM per image/group
            part = np.matmul(taps[i, j], p)
            acc[:, :, r0:r1, c0:c1] += part.reshape(n, o, hh, ww)
    if acc is not y:
        np.copyto(y, acc, casting="unsafe")


_EXECUTE: MappingProxyType[type, Callable[[_Run, Any], None]] = MappingProxyType({
    Nop: _nop, Marker: _marker, Copy: _copy, Fill: _fill, Unary: _unary, Binary: _binary,
    Gemm: _gemm, Reduce: _reduce, Softmax: _softmax, Conv2d: _conv2d,
})


def run(buffer: memoryview | bytes, resolve: Resolve,
        cancelled: Cancelled | None = None, fanout: FanOut | None = None) -> RunResult:
    """Execute a pydxg-soft-v1 command buffer. ``resolve(va, nbytes, write)`` returns a
    memoryview of exactly that range of GPU memory or raises EngineFault (PAGE_FAULT); any other
    exception it raises becomes a PAGE_FAULT too (with the exception's ``va`` attribute, when it
    has one, as the fault's ``va``). Raises EngineFault and nothing else (for any bytes).
    ``fanout``, when given, lets a big GEMM spread over idle engine slots (backends.fanout)."""
    start = time.perf_counter()
    try:
        commands: tuple[Command, ...] = decode(buffer)
    except EngineFault:
        raise
    except Exception as e:  # decode checks everything; this is a last line of defence
        raise EngineFault(FaultKind.BAD_HEADER, -1, f"{type(e).__name__}: {e}") from e
    state = _Run(resolve, cancelled, fanout)
    with np.errstate(all="ignore"):
        for i, cmd in enumerate(commands):
            if cancelled is not None and cancelled.is_set():
                raise EngineFault(FaultKind.CANCELLED, i, "cancelled before this command")
            try:
                _EXECUTE[type(cmd)](state, cmd)
            except EngineFault as e:
                raise e.at(i) from None
            except MemoryError:
                raise EngineFault(FaultKind.BAD_OPERAND, i,
                                  "the host has no memory for this command") from None
            except Exception as e:  # a check missed something: still a fault, never a crash
                raise EngineFault(FaultKind.BAD_OPERAND, i,
                                  f"{type(cmd).__name__}: {type(e).__name__}: {e}") from e
    return RunResult(len(commands), state.touched, time.perf_counter() - start,
                     tuple(state.markers))
