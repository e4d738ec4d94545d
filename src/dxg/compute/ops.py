"""The operations of dxg.compute: each checks its arguments as NumPy would (ValueError,
TypeError) before anything is encoded, makes its result arrays, and encodes pydxg-soft-v1
commands (``dxg.backends.softcmd``) on the current stream of the device.

Elementwise operations (UNARY, BINARY) broadcast by giving sources element strides of 0; the
dimensions of an operation are merged where every operand allows it, so any rank works (an
operation that still has more than 4 dimensions is split into one command per leading index).
A destination that overlaps a source (other than exactly, which the engine allows) gets a copy
of that source first.
"""

from __future__ import annotations

import builtins
import itertools
import math
import operator
from collections.abc import Sequence
from types import MappingProxyType
from typing import Any

import numpy as np

from dxg.backends.softcmd import (
    MAX_DIMS,
    Operand,
    contiguous_strides,
    conv_output_size,
    is_dense,
)
from dxg.compute import dtypes as _dt
from dxg.compute.array import ndarray

__all__ = [
    "absolute",
    "add",
    "asnumpy",
    "assign",
    "astype",
    "clip",
    "conv2d",
    "divide",
    "download",
    "exp",
    "fill",
    "log",
    "matmul",
    "max",
    "maximum",
    "mean",
    "min",
    "minimum",
    "multiply",
    "negative",
    "power",
    "relu",
    "sigmoid",
    "softmax",
    "sqrt",
    "subtract",
    "sum",
    "tanh",
    "upload",
]

_F64 = np.dtype(np.float64)
MAX_SPLIT = 1 << 16  # commands one elementwise operation may be split into
SCALAR_CACHE = 256  # constants a device keeps on the GPU for reuse


# ---- operands and layouts ----------------------------------------------------------------------


def _operand(a: ndarray, shape: Sequence[int], strides: Sequence[int], extra: int = 0) -> Operand:
    shape = tuple(shape)
    strides = tuple(strides)
    va = a._block.va + (a._offset + extra) * a.itemsize
    return Operand(va, a.dtype, shape, None if strides == contiguous_strides(shape) else strides)


def _bcast_strides(a: ndarray, shape: Sequence[int]) -> tuple[int, ...]:
    """``a``'s element strides when broadcast to ``shape`` (0 where it repeats)."""
    lead = len(shape) - a.ndim
    out = [0] * lead
    for d, s, want in zip(a.shape, a._strides, shape[lead:], strict=True):
        out.append(0 if d == 1 and want != 1 else s)
    return tuple(out)


def _collapse(shape: Sequence[int], strides: Sequence[Sequence[int]]) -> tuple[
        list[int], list[list[int]]]:
    """Merge dimensions that every operand steps through as one; drop dimensions of size 1."""
    keep = [i for i, d in enumerate(shape) if d != 1]
    out_shape: list[int] = []
    out_strides: list[list[int]] = [[] for _ in strides]
    for i in reversed(keep):
        d = shape[i]
        if out_shape and all(s[i] == o[0] * out_shape[0] for s, o in zip(strides, out_strides,
                                                                          strict=True)):
            out_shape[0] *= d
            continue
        out_shape.insert(0, d)
        for s, o in zip(strides, out_strides, strict=True):
            o.insert(0, s[i])
    return out_shape, out_strides


def _overlaps(a: ndarray, b: ndarray) -> bool:
    """Whether ``a`` and ``b`` may share bytes (same block and intersecting spans)."""
    if a._block is not b._block or not a.size or not b.size:
        return False

    def span(x: ndarray) -> tuple[int, int]:
        last = builtins.sum((d - 1) * s for d, s in zip(x.shape, x._strides, strict=True))
        return x._offset, x._offset + last + 1

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def _same_view(a: ndarray, b: ndarray) -> bool:
    return (a._block is b._block and a._offset == b._offset and a.shape == b.shape
            and a.dtype == b.dtype
            and all(d <= 1 or s == t for d, s, t in zip(a.shape, a._strides, b._strides,
                                                        strict=True)))


def _stream(dev: Any) -> Any:
    return dev.current_stream


def _elementwise(dst: ndarray, srcs: Sequence[ndarray], make: Any) -> None:
    """Encode ``make(cb, dst_operand, *src_operands)`` over ``dst``'s shape, sources broadcast;
    split into several commands when more than 4 dimensions are left after merging."""
    if not dst.size:
        return
    srcs = [s.copy() if _overlaps(dst, s) and not _same_view(dst, s) else s for s in srcs]
    shape = dst.shape
    strides = [dst._strides, *(_bcast_strides(s, shape) for s in srcs)]
    cshape, cstrides = _collapse(shape, strides)
    arrays = [dst, *srcs]
    lead = builtins.max(0, len(cshape) - MAX_DIMS)
    outer = cshape[:lead]
    if math.prod(outer) > MAX_SPLIT:
        raise ValueError(f"an operation over shape {shape} has too many dimensions that "
                         "cannot be merged; make its operands contiguous first")
    stream = _stream(dst.device)
    reads = [s._block for s in srcs]
    inner = cshape[lead:]
    for index in itertools.product(*(range(d) for d in outer)):
        ops = [_operand(a, inner, st[lead:],
                        builtins.sum(i * s for i, s in zip(index, st[:lead], strict=True)))
               for a, st in zip(arrays, cstrides, strict=True)]
        stream._append(lambda cb, ops=ops: make(cb, *ops), reads, (dst._block,),
                       math.prod(inner))


def _is_dense(a: ndarray) -> bool:
    """Whether no two elements of ``a`` share memory (not a broadcast view)."""
    return is_dense(a.shape, a._strides)


def _dense(a: ndarray) -> ndarray:
    """``a``, or a C-contiguous copy when it is a broadcast view."""
    return a if _is_dense(a) else a.copy()


def _contiguous(a: ndarray) -> ndarray:
    return a if a.is_contiguous else a.copy()


# ---- values in and out -------------------------------------------------------------------------


def _device_of(*args: Any) -> Any:
    dev = None
    for a in args:
        if isinstance(a, ndarray):
            if dev is None:
                dev = a.device
            elif a.device is not dev:
                raise ValueError("arrays on different devices; move one with dev.asarray")
    if dev is None:
        raise TypeError("expected a dxg.compute array")
    dev._live()
    return dev


def _host(value: Any, dtype: Any = None) -> np.ndarray:
    """``value`` as a NumPy array of a device dtype (integers checked to fit int32)."""
    arr = np.asarray(value)
    want = _dt.coerce(arr.dtype) if dtype is None else _dt.device_dtype(dtype)
    if arr.dtype != want:
        if arr.dtype.kind in "iub" and want == np.int32 and arr.size:
            info = np.iinfo(np.int32)
            if arr.min() < info.min or arr.max() > info.max:
                raise OverflowError(f"values of {arr.dtype} out of range for int32")
        arr = arr.astype(want)
    return arr


def upload(dev: Any, value: Any, dtype: Any = None) -> ndarray:
    """A new device array holding ``value``. Large arrays (their own allocation) are written
    through a CPU map (zero-copy on a local link); small ones are staged in upload memory and
    copied on the GPU in stream order."""
    dev._live()
    if isinstance(value, ndarray):
        value = value.get()
    src = np.asarray(_host(value, dtype), order="C")
    out = dev._empty(src.shape, src.dtype)
    _write(out, src)
    return out


def _write(out: ndarray, src: np.ndarray) -> None:
    """Write the contiguous ``src`` (out's shape and dtype) into the fresh contiguous ``out``."""
    blk = out._block
    if not src.size:
        return
    raw = src.reshape(-1).view(np.uint8)
    if blk.dedicated:
        blk.alloc.upload(raw, offset=blk.offset + out._offset * out.itemsize)
        return
    dev = out.device
    stage = dev.pool.malloc(raw.nbytes, "upload", dev._pressure)
    try:
        stage.alloc.upload(raw, offset=stage.offset)
        _stream(dev)._append(lambda cb: cb.copy(out.va, stage.va, raw.nbytes), (stage,),
                             (blk,), raw.nbytes)
    finally:
        dev.pool.release(stage)


def download(a: ndarray, stream: Any = None) -> np.ndarray:
    """``a``'s values as a NumPy array, once the work that writes it has run. An array with
    its own allocation is read through a CPU map; a small one (or a strided view) is copied on
    the GPU into a staging buffer first, so the CPU never maps memory the GPU may be writing."""
    dev = a.device
    dev._live()
    out = np.empty(a.shape, a.dtype)
    if not a.size:
        return out
    blk = a._block
    if blk.dedicated and a.is_contiguous:
        if blk.writer is not None:
            writer, value = blk.writer
            writer.wait_value(value)
        blk.alloc.download_into(out.reshape(-1).view(np.uint8),
                                offset=blk.offset + a._offset * a.itemsize)
        return out
    stream = stream or _stream(dev)  # it waits (on the GPU) for a writer on another stream
    stage = dev.pool.staging(a.nbytes, dev._pressure)
    try:
        with stream:
            if a.is_contiguous:
                stream._append(lambda cb: cb.copy(stage.va, a.va, a.nbytes), (blk,), (stage,),
                               a.nbytes)
            else:  # the staging block as an array the pool keeps (no finalizer)
                view = ndarray._new(dev, stage, a.shape, a.dtype, owned=False)
                _elementwise(view, [a], lambda cb, d, s: cb.cast(d, s))
        stream.wait_value(stream.flush())
        stage.alloc.download_into(out.reshape(-1).view(np.uint8), offset=0)
    except BaseException:
        dev.pool.release(stage)  # freed once whatever was queued into it has run
        raise
    dev.pool.unstage(stage)
    return out


def asnumpy(a: Any) -> np.ndarray:
    """``a`` as a NumPy array (a device array read back; anything else through numpy)."""
    return a.get() if isinstance(a, ndarray) else np.asarray(a)


def _scalar(dev: Any, value: Any, dtype: np.dtype[Any]) -> ndarray:
    """A 0-d device array holding ``value`` (a FILL), shared by the operations of the current
    stream that use the same constant (kept per stream, so its FILL is always ahead of them)."""
    stream = _stream(dev)
    with np.errstate(all="ignore"):
        raw = np.asarray(value).astype(dtype, casting="unsafe").tobytes()
    key = (stream, dtype.str, raw)
    cache = dev._scalars
    with dev._lock:
        hit = cache.get(key)
        if hit is not None:
            cache.move_to_end(key)
            return hit
    out = dev._empty((), dtype)
    fill(out, value)
    with dev._lock:
        cache[key] = out
        while len(cache) > SCALAR_CACHE:
            cache.popitem(last=False)
    return out


def _on_device(dev: Any, value: Any, dtype: np.dtype[Any]) -> ndarray:
    """``value`` (a device array, an array-like or a scalar) as a device array of ``dtype``."""
    if isinstance(value, ndarray):
        return value if value.dtype == dtype else astype(value, dtype)
    if np.ndim(value) == 0 and not isinstance(value, np.ndarray):
        return _scalar(dev, value, dtype)
    return upload(dev, _host(value).astype(dtype, copy=False))


def fill(dst: ndarray, value: Any) -> None:
    """Every element of ``dst`` becomes ``value`` (a FILL on the current stream)."""
    with np.errstate(all="ignore"):
        v = np.asarray(value)
        if v.ndim:
            raise ValueError("fill takes a scalar")
        if v.dtype.kind in "iu" and dst.dtype.kind in "iu":
            info = np.iinfo(dst.dtype)
            if not info.min <= int(v) <= info.max:
                raise OverflowError(f"Python integer {int(v)} out of bounds for {dst.dtype}")
    if not dst.size:
        return
    if not _is_dense(dst):
        raise ValueError("cannot fill a broadcast view")
    _elementwise_fill(dst, v)


def _elementwise_fill(dst: ndarray, v: np.ndarray) -> None:
    shape = dst.shape
    cshape, (cstr,) = _collapse(shape, [dst._strides])
    lead = builtins.max(0, len(cshape) - MAX_DIMS)
    stream = _stream(dst.device)
    inner = cshape[lead:]
    for index in itertools.product(*(range(d) for d in cshape[:lead])):
        op = _operand(dst, inner, cstr[lead:],
                      builtins.sum(i * s for i, s in zip(index, cstr[:lead], strict=True)))
        stream._append(lambda cb, op=op: cb.fill(op, v), (), (dst._block,), math.prod(inner))


def astype(a: ndarray, dtype: Any) -> ndarray:
    """A new contiguous array of ``a``'s values converted to ``dtype`` (UNARY CAST)."""
    dev = _device_of(a)
    out = dev._empty(a.shape, _dt.device_dtype(dtype))
    _elementwise(out, [a], lambda cb, d, s: cb.cast(d, s))
    return out


def assign(dst: ndarray, value: Any) -> None:
    """``dst[...] = value``: a scalar fills, an array broadcasts and converts."""
    dev = _device_of(dst)
    if not isinstance(value, ndarray) and np.ndim(value) == 0:
        fill(dst, value)
        return
    if isinstance(value, ndarray):
        src = value if value.device is dev else upload(dev, value.get())
    else:
        src = upload(dev, value)
    try:
        np.broadcast_shapes(src.shape, dst.shape)
        if len(src.shape) > len(dst.shape) or np.broadcast_shapes(src.shape,
                                                                  dst.shape) != dst.shape:
            raise ValueError
    except ValueError:
        raise ValueError(f"could not broadcast input array from shape {src.shape} into shape "
                         f"{dst.shape}") from None
    if not _is_dense(dst):
        raise ValueError("cannot write into a broadcast view")
    _elementwise(dst, [src], lambda cb, d, s: cb.cast(d, s))


# ---- elementwise -------------------------------------------------------------------------------


def _probe(v: Any) -> Any:
    """A stand-in for ``v`` that NumPy's type rules see as ``v`` (arrays by dtype, Python
    scalars as weak scalars)."""
    if isinstance(v, ndarray):
        return np.ones(1, v.dtype)
    if isinstance(v, np.ndarray):
        return np.ones(1, _dt.coerce(v.dtype))
    if isinstance(v, np.generic):
        return v
    if isinstance(v, bool | int | float):
        return v
    if isinstance(v, list | tuple):
        return np.ones(1, _dt.coerce(np.asarray(v).dtype))
    raise TypeError(f"unsupported operand type: {type(v).__name__}")


def _result_dtype(ufunc: Any, *args: Any) -> np.dtype[Any]:
    with np.errstate(all="ignore"):
        return _dt.coerce(ufunc(*(_probe(a) for a in args)).dtype)


def _shape(v: Any) -> tuple[int, ...]:
    return v.shape if isinstance(v, ndarray) else np.shape(v)


def _check_out(name: str, out: ndarray, result: np.dtype[Any], shape: tuple[int, ...]) -> None:
    if not isinstance(out, ndarray):
        raise TypeError("out must be a dxg.compute array")
    if not np.can_cast(result, out.dtype, "same_kind"):
        raise TypeError(f"Cannot cast ufunc '{name}' output from {result!r} to "
                        f"{out.dtype!r} with casting rule 'same_kind'")
    if out.shape != shape:
        raise ValueError(f"non-broadcastable output operand with shape {out.shape} doesn't "
                         f"match the broadcast shape {shape}")
    if not _is_dense(out):
        raise ValueError("cannot write into a broadcast view")


def _finish(dev: Any, name: str, shape: tuple[int, ...], result: np.dtype[Any],
            compute: np.dtype[Any], srcs: Sequence[ndarray], make: Any,
            out: ndarray | None) -> ndarray:
    """Run ``make`` into a new array of ``compute`` dtype (or straight into ``out``), then cast
    to ``result`` / into ``out`` as needed."""
    if out is not None:
        _check_out(name, out, result, shape)
        if compute == out.dtype and _is_dense(out):
            _elementwise(out, srcs, make)
            return out
    res = dev._empty(shape, compute)
    _elementwise(res, srcs, make)
    if out is not None:
        _elementwise(out, [res], lambda cb, d, s: cb.cast(d, s))
        return out
    return res if compute == result else astype(res, result)


_BINARY = MappingProxyType({
    "add": (np.add, "add"), "subtract": (np.subtract, "sub"), "multiply": (np.multiply, "mul"),
    "divide": (np.true_divide, "div"), "maximum": (np.maximum, "max"),
    "minimum": (np.minimum, "min"), "power": (np.power, "pow"),
})


def _binary(name: str, a: Any, b: Any, out: ndarray | None = None) -> ndarray:
    dev = _device_of(a, b, out)
    ufunc, code = _BINARY[name]
    result = _result_dtype(ufunc, a, b)
    compute = _F64 if name == "power" and not _dt.is_float(result) else result
    try:
        shape = tuple(np.broadcast_shapes(_shape(a), _shape(b)))
    except ValueError:
        raise ValueError(f"operands could not be broadcast together with shapes "
                         f"{_shape(a)} {_shape(b)}") from None
    if out is None and not math.prod(shape):
        return dev._empty(shape, result)
    x, y = _on_device(dev, a, compute), _on_device(dev, b, compute)
    return _finish(dev, name, shape, result, compute, [x, y],
                   lambda cb, d, p, q: cb.binary(code, d, p, q), out)


def add(a: Any, b: Any, out: ndarray | None = None) -> ndarray:
    return _binary("add", a, b, out)


def subtract(a: Any, b: Any, out: ndarray | None = None) -> ndarray:
    return _binary("subtract", a, b, out)


def multiply(a: Any, b: Any, out: ndarray | None = None) -> ndarray:
    return _binary("multiply", a, b, out)


def divide(a: Any, b: Any, out: ndarray | None = None) -> ndarray:
    """True division (integers give float64, as NumPy's)."""
    return _binary("divide", a, b, out)


def maximum(a: Any, b: Any, out: ndarray | None = None) -> ndarray:
    return _binary("maximum", a, b, out)


def minimum(a: Any, b: Any, out: ndarray | None = None) -> ndarray:
    return _binary("minimum", a, b, out)


def power(a: Any, b: Any, out: ndarray | None = None) -> ndarray:
    """``a ** b`` (integers are raised in float64 and converted back)."""
    return _binary("power", a, b, out)


def _sigmoid_probe(x: Any) -> Any:
    return np.exp(x)


def _relu_probe(x: Any) -> Any:
    return np.maximum(x, 0)


_UNARY = MappingProxyType({
    "negative": (np.negative, "neg"), "absolute": (np.absolute, "abs"), "exp": (np.exp, "exp"),
    "log": (np.log, "log"), "sqrt": (np.sqrt, "sqrt"), "tanh": (np.tanh, "tanh"),
    "sigmoid": (_sigmoid_probe, "sigmoid"), "relu": (_relu_probe, "relu"),
})


def _unary(name: str, x: Any, out: ndarray | None = None) -> ndarray:
    dev = _device_of(x, out)
    probe, code = _UNARY[name]
    result = _result_dtype(probe, x)
    shape = _shape(x)
    if out is None and not math.prod(shape):
        return dev._empty(shape, result)
    src = _on_device(dev, x, result)
    return _finish(dev, name, shape, result, result, [src],
                   lambda cb, d, s: cb.unary(code, d, s), out)


def negative(x: Any, out: ndarray | None = None) -> ndarray:
    return _unary("negative", x, out)


def absolute(x: Any, out: ndarray | None = None) -> ndarray:
    return _unary("absolute", x, out)


abs = absolute


def exp(x: Any, out: ndarray | None = None) -> ndarray:
    return _unary("exp", x, out)


def log(x: Any, out: ndarray | None = None) -> ndarray:
    return _unary("log", x, out)


def sqrt(x: Any, out: ndarray | None = None) -> ndarray:
    return _unary("sqrt", x, out)


def tanh(x: Any, out: ndarray | None = None) -> ndarray:
    return _unary("tanh", x, out)


def sigmoid(x: Any, out: ndarray | None = None) -> ndarray:
    """``1 / (1 + exp(-x))``."""
    return _unary("sigmoid", x, out)


def relu(x: Any, out: ndarray | None = None) -> ndarray:
    """``max(x, 0)`` (NaN stays NaN)."""
    return _unary("relu", x, out)


def clip(x: Any, a_min: Any = None, a_max: Any = None) -> ndarray:
    if a_min is None and a_max is None:
        raise ValueError("One of max or min must be given")
    out = x
    if a_min is not None:
        out = maximum(out, a_min)
    if a_max is not None:
        out = minimum(out, a_max)
    return out if out is not x else x.copy()


# ---- matrix products ---------------------------------------------------------------------------


def _matrices(a: ndarray, batch: tuple[int, ...]) -> tuple[ndarray, int]:
    """``a`` (..., R, C) as the GEMM steps through it: ``a`` itself and the one element stride
    between its matrices over ``batch`` (0: one matrix shared by the whole batch), or a
    contiguous copy with the batch spelled out when its layout allows neither."""
    mat = a.shape[-2:]
    strides = _bcast_strides(a, (*batch, *mat))
    bshape, (bstr,) = _collapse(batch, [strides[:len(batch)]])
    step = bstr[0] if bshape else 0
    count = math.prod(batch)
    if (len(bshape) <= 1 and is_dense(mat, strides[-2:])
            and (not step or is_dense((count, *mat), (step, *strides[-2:])))):
        return a, step
    m = a.device._empty((*batch, *mat), a.dtype)
    _elementwise(m, [a], lambda cb, d, s: cb.cast(d, s))
    return m, (mat[0] * mat[1] if count > 1 else 0)


def matmul(a: Any, b: Any, out: ndarray | None = None) -> ndarray:
    """``a @ b`` with NumPy's rules: 1-D operands are vectors, leading dimensions are batches
    that broadcast. One GEMM command for the whole batch."""
    dev = _device_of(a, b, out)
    sa, sb = _shape(a), _shape(b)
    if not sa or not sb:
        which = 0 if not sa else 1
        raise ValueError(f"matmul: Input operand {which} does not have enough dimensions (has "
                         "0, gufunc core with signature (n?,k),(k,m?)->(n?,m?) requires 1)")
    result = _result_dtype(np.matmul, a if isinstance(a, ndarray) else np.asarray(a),
                           b if isinstance(b, ndarray) else np.asarray(b))
    compute = result if _dt.is_float(result) else _F64
    x, y = _on_device(dev, a, compute), _on_device(dev, b, compute)
    vec_a, vec_b = x.ndim == 1, y.ndim == 1
    if vec_a:
        x = x.reshape(1, -1)
    if vec_b:
        y = y.reshape(-1, 1)
    m, k = x.shape[-2:]
    k2, n = y.shape[-2:]
    if k != k2:
        raise ValueError(f"matmul: Input operand 1 has a mismatch in its core dimension 0, "
                         f"with gufunc signature (n?,k),(k,m?)->(n?,m?) (size {k2} is "
                         f"different from {k})")
    try:
        batch = tuple(np.broadcast_shapes(x.shape[:-2], y.shape[:-2]))
    except ValueError:
        raise ValueError(f"operands could not be broadcast together with remapped shapes "
                         f"[original->remapped]: {sa}->{x.shape} {sb}->{y.shape}") from None
    shape = (*batch, m, n)
    final = (*batch, *(() if vec_a else (m,)), *(() if vec_b else (n,)))
    if out is not None:
        _check_out("matmul", out, result, final)
    res = dev._empty(shape, compute)
    if res.size:
        if k == 0:
            fill(res, 0)
        else:
            xa, xs = _matrices(x, batch)
            ya, ys = _matrices(y, batch)
            count = math.prod(batch)
            c_op = _operand(res, (m, n), (n, 1))
            a_op = _operand(xa, (m, k), xa._strides[-2:])
            b_op = _operand(ya, (k, n), ya._strides[-2:])
            strides = (m * n if count > 1 else 0, xs if count > 1 else 0,
                       ys if count > 1 else 0)
            _stream(dev)._append(
                lambda cb: cb.gemm(c_op, a_op, b_op, batch=count, batch_strides=strides),
                (xa._block, ya._block), (res._block,), count * m * n * k)
    res = res.reshape(final)
    if out is not None:
        _elementwise(out, [res], lambda cb, d, s: cb.cast(d, s))
        return out
    return res if compute == result else astype(res, result)


# ---- reductions --------------------------------------------------------------------------------


def _axes(axis: Any, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    items = axis if isinstance(axis, tuple) else (axis,)
    out = []
    for a in items:
        a = operator.index(a)
        if not -ndim <= a < ndim:
            raise np.exceptions.AxisError(a, ndim)
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError("duplicate value in 'axis'")
    return tuple(sorted(out))


_REDUCE_NAMES = MappingProxyType({"sum": "sum", "max": "maximum", "min": "minimum",
                                  "mean": "mean"})


def _reduce(kind: str, x: Any, axis: Any, dtype: Any, out: Any, keepdims: bool) -> ndarray:
    dev = _device_of(x)
    if dtype is not None:
        x = x.astype(_dt.device_dtype(dtype), copy=False)
    if kind == "mean" and not _dt.is_float(x.dtype):
        x = astype(x, _F64)
    axes = _axes(axis, x.ndim)
    shape = (tuple(1 if i in axes else d for i, d in enumerate(x.shape)) if keepdims
             else tuple(d for i, d in enumerate(x.shape) if i not in axes))
    if any(x.shape[i] == 0 for i in axes):
        if kind in ("max", "min"):
            raise ValueError(f"zero-size array to reduction operation {_REDUCE_NAMES[kind]} "
                             "which has no identity")
        res = dev.full(shape, 0 if kind == "sum" else np.nan, x.dtype)
    elif not math.prod(shape) or not axes:
        res = x.copy().reshape(shape) if not axes else dev._empty(shape, x.dtype)
    else:
        res = _reduce_axes(kind, _contiguous(x), axes).reshape(shape)
    if out is not None:
        _check_out(kind, out, res.dtype, shape)
        _elementwise(out, [res], lambda cb, d, s: cb.cast(d, s))
        return out
    return res


def _reduce_axes(kind: str, x: ndarray, axes: tuple[int, ...]) -> ndarray:
    """Reduce the contiguous ``x`` over ``axes``: runs of reduced and of kept dimensions merge,
    then one REDUCE per reduced run (last first); more than 4 merged dims: transpose first."""
    groups: list[list[Any]] = []  # [size, reduced]
    for i, d in enumerate(x.shape):
        r = i in axes
        if groups and groups[-1][1] == r:
            groups[-1][0] *= d
        else:
            groups.append([d, r])
    if len(groups) > MAX_DIMS:
        kept = [i for i in range(x.ndim) if i not in axes]
        moved = x.transpose([*kept, *axes]).copy()
        return _reduce_axes(kind, moved, tuple(range(len(kept), x.ndim)))
    dims = [g[0] for g in groups]
    cur = x.reshape(dims)
    dev = x.device
    stream = _stream(dev)
    for gi in reversed([i for i, g in enumerate(groups) if g[1]]):
        new_dims = dims[:gi] + dims[gi + 1:]
        dst = dev._empty(new_dims, x.dtype)
        src_op = _operand(cur, dims, contiguous_strides(dims))
        dst_op = _operand(dst, new_dims, contiguous_strides(new_dims))
        stream._append(lambda cb, d=dst_op, s=src_op, a=gi: cb.reduce(kind, d, s, a),
                       (cur._block,), (dst._block,), cur.size)
        cur, dims = dst, new_dims
    return cur


def sum(x: Any, axis: Any = None, dtype: Any = None, out: Any = None,
        keepdims: bool = False) -> ndarray:
    """Sum over ``axis`` (None: all; an int or a tuple). Integer sums stay int32 (and wrap)."""
    return _reduce("sum", x, axis, dtype, out, keepdims)


def mean(x: Any, axis: Any = None, dtype: Any = None, out: Any = None,
         keepdims: bool = False) -> ndarray:
    return _reduce("mean", x, axis, dtype, out, keepdims)


def max(x: Any, axis: Any = None, out: Any = None, keepdims: bool = False) -> ndarray:
    return _reduce("max", x, axis, None, out, keepdims)


def min(x: Any, axis: Any = None, out: Any = None, keepdims: bool = False) -> ndarray:
    return _reduce("min", x, axis, None, out, keepdims)


amax, amin = max, min


# ---- softmax and convolution -------------------------------------------------------------------


def softmax(x: Any, axis: int = -1) -> ndarray:
    """``exp(x - max) / sum(exp(x - max))`` along ``axis`` (integers give float64)."""
    dev = _device_of(x)
    ax = operator.index(axis)
    if not -x.ndim <= ax < x.ndim:
        raise np.exceptions.AxisError(ax, x.ndim)
    ax %= x.ndim
    if not _dt.is_float(x.dtype):
        x = astype(x, _F64)
    res = dev._empty(x.shape, x.dtype)
    if not x.size:
        return res
    src = _contiguous(x)
    dims = (math.prod(x.shape[:ax]), x.shape[ax], math.prod(x.shape[ax + 1:]))
    s_op = _operand(src, dims, contiguous_strides(dims))
    d_op = _operand(res, dims, contiguous_strides(dims))
    _stream(dev)._append(lambda cb: cb.softmax(d_op, s_op, 1), (src._block,), (res._block,),
                         4 * x.size)
    return res


def _pair(v: Any, what: str) -> tuple[int, int]:
    if isinstance(v, int | np.integer):
        return int(v), int(v)
    try:
        a, b = v
        return operator.index(a), operator.index(b)
    except (TypeError, ValueError):
        raise TypeError(f"conv2d: {what} must be an int or a pair of ints") from None


def conv2d(x: Any, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0,
           dilation: Any = 1, groups: int = 1) -> ndarray:
    """2-D convolution (cross-correlation) as ``torch.nn.functional.conv2d``: ``x`` (N, C, H, W)
    or (C, H, W), ``weight`` (O, C/groups, KH, KW), ``bias`` (O,), zero ``padding`` (an int, a
    pair, "valid" or "same")."""
    dev = _device_of(x, weight, bias)
    sx, sw = _shape(x), _shape(weight)
    if len(sx) not in (3, 4):
        raise ValueError(f"conv2d: expected a 3-D (C, H, W) or 4-D (N, C, H, W) input, got "
                         f"shape {sx}")
    if len(sw) != 4:
        raise ValueError(f"conv2d: expected a 4-D weight (O, C/groups, KH, KW), got {sw}")
    unbatched = len(sx) == 3
    n, c, h, w = (1, *sx) if unbatched else sx
    o, cg, kh, kw = sw
    groups = operator.index(groups)
    if groups < 1 or c % groups or o % groups or cg != c // groups:
        raise ValueError(f"conv2d: input of {c} channels, weight {sw} and groups={groups} do "
                         f"not fit (weight.shape[1] * groups must equal {c}, and "
                         f"weight.shape[0] be a multiple of groups)")
    if bias is not None and _shape(bias) != (o,):
        raise ValueError(f"conv2d: bias of shape {_shape(bias)}, expected ({o},)")
    st = _pair(stride, "stride")
    dil = _pair(dilation, "dilation")
    if isinstance(padding, str):
        if padding == "valid":
            pad = (0, 0)
        elif padding == "same":
            if st != (1, 1):
                raise ValueError("conv2d: padding='same' needs stride 1")
            need = (dil[0] * (kh - 1), dil[1] * (kw - 1))
            if need[0] % 2 or need[1] % 2:
                raise ValueError("conv2d: padding='same' with an even kernel needs uneven "
                                 "padding, which the device does not do")
            pad = (need[0] // 2, need[1] // 2)
        else:
            raise ValueError(f"conv2d: padding {padding!r} (an int, a pair, 'valid', 'same')")
    else:
        pad = _pair(padding, "padding")
    if (any(v < 1 for v in (*st, *dil)) or any(v < 0 for v in pad)
            or any(v > 0xFFFF for v in (*st, *dil, *pad, groups))):
        raise ValueError(f"conv2d: stride {st}, padding {pad}, dilation {dil}")
    oh = conv_output_size(h, kh, st[0], pad[0], dil[0])
    ow = conv_output_size(w, kw, st[1], pad[1], dil[1])
    if oh < 1 or ow < 1:
        raise ValueError(f"conv2d: the kernel ({kh}x{kw}, dilation {dil}) is larger than the "
                         f"padded input ({h + 2 * pad[0]}x{w + 2 * pad[1]})")
    args = [x, weight] + ([bias] if bias is not None else [])
    probes = [a if isinstance(a, ndarray) else np.asarray(a) for a in args]
    result = _result_dtype(np.add, *probes[:2])
    if bias is not None:
        result = _result_dtype(np.add, np.ones(1, result), probes[2])
    if not _dt.is_float(result):
        result = _F64
    xs = _contiguous(_on_device(dev, x, result))
    ws = _contiguous(_on_device(dev, weight, result))
    bs = _contiguous(_on_device(dev, bias, result)) if bias is not None else None
    res = dev._empty((n, o, oh, ow), result)
    if n * c * h * w and o and kh * kw:
        ops = [_operand(a, s, contiguous_strides(s)) for a, s in
               ((res, (n, o, oh, ow)), (xs, (n, c, h, w)), (ws, (o, cg, kh, kw)))]
        b_op = _operand(bs, (o,), (1,)) if bs is not None else None
        reads = [xs._block, ws._block] + ([bs._block] if bs is not None else [])
        _stream(dev)._append(
            lambda cb: cb.conv2d(ops[0], ops[1], ops[2], b_op, st, pad, dil, groups),
            reads, (res._block,), n * o * oh * ow * cg * kh * kw)
    elif bs is not None and res.size:
        res = add(dev.zeros((n, o, oh, ow), result), bs.reshape(o, 1, 1))
    elif res.size:
        fill(res, 0)
    return res.reshape(o, oh, ow) if unbatched else res


# ---- NumPy's __array_ufunc__ -------------------------------------------------------------------


_UFUNCS = MappingProxyType({
    np.add: add, np.subtract: subtract, np.multiply: multiply, np.true_divide: divide,
    np.maximum: maximum, np.minimum: minimum, np.power: power, np.negative: negative,
    np.absolute: absolute, np.exp: exp, np.log: log, np.sqrt: sqrt, np.tanh: tanh,
    np.matmul: matmul,
})


def array_ufunc(ufunc: Any, method: str, inputs: tuple[Any, ...],
                kwargs: dict[str, Any]) -> Any:
    fn = _UFUNCS.get(ufunc)
    out = kwargs.pop("out", None)
    if isinstance(out, tuple):
        out = out[0] if len(out) == 1 else out
    if (method == "__call__" and fn is not None and not kwargs
            and (out is None or isinstance(out, ndarray))):
        return fn(*inputs, out=out)
    if out is not None:
        return NotImplemented
    host = [a.get() if isinstance(a, ndarray) else a for a in inputs]
    return getattr(ufunc, method)(*host, **kwargs)
