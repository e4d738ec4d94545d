"""pydxg-soft-v1: the soft adapter's command-buffer format (byte layout in docs/commands.md).

A command buffer is bytes: a 16-byte header, then commands, each starting with
``{u16 opcode, u16 size}`` and 8-byte aligned. Every operand is a GPU virtual address and its
layout (`Operand`: dtype, shape up to 4 dims, element strides or C-contiguous), never a host
pointer. This module is the format alone: constants, one small frozen value per command kind, an
encoder (`CommandBuffer`) and a validating decoder (`decode`). It reads no device memory;
`dxg.backends.engine` executes what `decode` returns.

Everything a command says about itself is checked here (`validate`), before the engine resolves
a single address: opcode and size, reserved fields, dtypes, ranks, limits, shapes agreeing, layout
rules. What needs the memory (is it mapped, does a destination overlap a source) the engine checks
after resolving and before it reads or writes anything. Anything wrong is an `EngineFault`.
"""

from __future__ import annotations

import math
import operator
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from types import MappingProxyType
from typing import Any, TypeAlias

import numpy as np

__all__ = [
    "ALIGNMENT", "COMMAND_HEADER_BYTES", "COMMAND_SIZES", "FAULT_KINDS", "HEADER_BYTES", "MAGIC",
    "MAX_BUFFER_BYTES", "MAX_COMMANDS", "MAX_DIMS", "MAX_ELEMENTS", "MAX_OPERAND_BYTES",
    "OPERAND_BYTES", "VERSION", "BinaryOp", "Command", "CommandBuffer", "Conv2d", "Copy",
    "DType", "EngineFault", "FaultKind", "Fill", "Gemm", "Marker", "Nop", "Opcode", "Operand",
    "Reduce", "ReduceOp", "Softmax", "Unary", "UnaryOp", "broadcasts_to", "contiguous_strides",
    "conv_output_size", "decode", "is_dense",
]

# ---- constants ---------------------------------------------------------------------------------

MAGIC = 0x43584450  # b"PDXC" read as a little-endian u32
VERSION = 1
ALIGNMENT = 8  # every command starts and ends on a multiple of 8 bytes
HEADER_BYTES = 16
COMMAND_HEADER_BYTES = 4  # u16 opcode, u16 size; the rest of a command is its own
OPERAND_BYTES = 48
MAX_DIMS = 4
MAX_DIM = (1 << 32) - 1  # one dimension or one element stride (u32 fields)
MAX_ELEMENTS = 1 << 40  # elements in one operand
MAX_OPERAND_BYTES = 1 << 47  # bytes one operand (or one COPY) spans: the whole GPU VA space
MAX_BUFFER_BYTES = 1 << 24  # 16 MiB of commands
MAX_COMMANDS = 1 << 16
MAX_COMMAND_BYTES = 0xFFF8  # the largest multiple of 8 a u16 size can hold
U64 = (1 << 64) - 1

OPERAND_STRIDED = 0x1  # Operand flags bit 0: the strides fields hold element strides
GEMM_TRANS_A = 0x1
GEMM_TRANS_B = 0x2
CONV_HAS_BIAS = 0x1

_HEADER = struct.Struct("<IHHII")  # magic, version, flags, command count, total bytes
_CMD = struct.Struct("<HH")  # opcode, size
_OPERAND = struct.Struct("<QBBHI4I4I")  # va, dtype, ndim, flags, reserved, shape[4], strides[4]
_NOP = struct.Struct("<HHI")  # opcode, size, (ignored)
_MARKER = struct.Struct("<HHIQ")  # opcode, size, reserved, value
_COPY = struct.Struct("<HHIQQQ")  # opcode, size, reserved, dst va, src va, bytes
_FILL = struct.Struct("<HHI8s")  # opcode, size, reserved, value (8 bytes), then dst
_UNARY = struct.Struct("<HHHH")  # opcode, size, function, reserved; then dst, src
_BINARY = struct.Struct("<HHHH")  # opcode, size, function, reserved; then dst, a, b
# opcode, size, flags, reserved, batch, reserved, alpha, beta, batch strides of C, A, B;
# then C, A, B
_GEMM = struct.Struct("<HHHHIIddQQQ")
_REDUCE = struct.Struct("<HHHBB")  # opcode, size, function, axis, reserved; then dst, src
_SOFTMAX = struct.Struct("<HHBBH")  # opcode, size, axis, reserved, reserved; then dst, src
# opcode, size, flags, groups, stride h/w, padding h/w, dilation h/w, reserved;
# then dst, src, weight, bias
_CONV = struct.Struct("<HHHHHHHHHHI")


class FaultKind(StrEnum):
    """Why a command buffer faulted (`EngineFault.kind`)."""

    BAD_HEADER = "BAD_HEADER"  # the buffer header, or the framing of commands (sizes, count)
    BAD_OPCODE = "BAD_OPCODE"  # unknown opcode or function, wrong size, bad flags or reserved
    BAD_OPERAND = "BAD_OPERAND"  # an operand (dtype, rank, limits, alignment, layout, overlap)
    PAGE_FAULT = "PAGE_FAULT"  # memory not mapped, not accessible or read-only (from resolve)
    SHAPE_MISMATCH = "SHAPE_MISMATCH"  # operands that do not fit the operation or each other
    CANCELLED = "CANCELLED"  # the caller went away between commands


FAULT_KINDS = frozenset(FaultKind)


class EngineFault(Exception):
    """A command buffer the engine will not (or could not) run to the end.

    ``command_index`` is the command that faulted (commands before it ran), -1 for the buffer
    header; ``detail`` says what was wrong in words; ``va`` is the GPU VA refused, for a
    PAGE_FAULT (0 otherwise)."""

    def __init__(self, kind: FaultKind | str, command_index: int, detail: str,
                 va: int = 0) -> None:
        self.kind = FaultKind(kind)
        self.command_index = command_index
        self.detail = detail
        self.va = va
        where = "header" if command_index < 0 else f"command {command_index}"
        super().__init__(f"{self.kind} at {where}: {detail}")

    def at(self, command_index: int) -> EngineFault:
        """The same fault, stamped with the command it happened in."""
        if command_index == self.command_index:
            return self
        return EngineFault(self.kind, command_index, self.detail, self.va)

    def __reduce__(self) -> tuple[Any, ...]:
        return (EngineFault, (self.kind, self.command_index, self.detail, self.va))


def _fault(kind: FaultKind, detail: str) -> EngineFault:
    return EngineFault(kind, -1, detail)


class Opcode(IntEnum):
    NOP = 1
    MARKER = 2
    COPY = 3
    FILL = 4
    UNARY = 5
    BINARY = 6
    GEMM = 7
    REDUCE = 8
    SOFTMAX = 9
    CONV2D = 10


# The size of each fixed-size command (NOP is any multiple of 8 from 8 up).
COMMAND_SIZES = MappingProxyType({
    Opcode.MARKER: _MARKER.size,
    Opcode.COPY: _COPY.size,
    Opcode.FILL: _FILL.size + OPERAND_BYTES,
    Opcode.UNARY: _UNARY.size + 2 * OPERAND_BYTES,
    Opcode.BINARY: _BINARY.size + 3 * OPERAND_BYTES,
    Opcode.GEMM: _GEMM.size + 3 * OPERAND_BYTES,
    Opcode.REDUCE: _REDUCE.size + 2 * OPERAND_BYTES,
    Opcode.SOFTMAX: _SOFTMAX.size + 2 * OPERAND_BYTES,
    Opcode.CONV2D: _CONV.size + 4 * OPERAND_BYTES,
})


class DType(IntEnum):
    """Element types (the operand's dtype byte)."""

    F16 = 1
    F32 = 2
    F64 = 3
    I32 = 4
    U8 = 5

    @property
    def numpy(self) -> np.dtype[Any]:
        return _NUMPY_DTYPES[self]

    @property
    def itemsize(self) -> int:
        return _ITEMSIZES[self]

    @property
    def is_float(self) -> bool:
        return self in FLOAT_DTYPES

    @classmethod
    def of(cls, value: Any) -> DType:
        """A DType from a DType, its code, or anything `numpy.dtype` takes ("float32",
        numpy.float32, an array's dtype)."""
        if isinstance(value, DType):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(value)
        try:
            dt = np.dtype(value)
        except TypeError:
            raise ValueError(f"not a dtype: {value!r}") from None
        found = _BY_NUMPY.get(dt)
        if found is None:
            raise ValueError(f"dtype {dt} is not one the soft adapter has")
        return found


_NUMPY_DTYPES = MappingProxyType({
    DType.F16: np.dtype("<f2"), DType.F32: np.dtype("<f4"), DType.F64: np.dtype("<f8"),
    DType.I32: np.dtype("<i4"), DType.U8: np.dtype("u1"),
})
_ITEMSIZES = MappingProxyType({d: dt.itemsize for d, dt in _NUMPY_DTYPES.items()})
_DTYPE_CODES = MappingProxyType({int(d): d for d in DType})  # the dtype byte's values
_BY_NUMPY = MappingProxyType({dt: d for d, dt in _NUMPY_DTYPES.items()})
FLOAT_DTYPES = frozenset({DType.F16, DType.F32, DType.F64})
ALL_DTYPES = frozenset(DType)


class UnaryOp(IntEnum):
    NEG = 1
    ABS = 2
    EXP = 3
    LOG = 4
    SQRT = 5
    TANH = 6
    SIGMOID = 7
    RELU = 8
    CAST = 9  # copy with conversion to the destination's dtype (same dtype: a strided copy)


class BinaryOp(IntEnum):
    ADD = 1
    SUB = 2
    MUL = 3
    DIV = 4  # integers: truncating, x / 0 = 0
    MAX = 5
    MIN = 6
    POW = 7


class ReduceOp(IntEnum):
    SUM = 1
    MAX = 2
    MIN = 3
    MEAN = 4  # integers: the mean truncated toward zero


UNARY_DTYPES = MappingProxyType({
    UnaryOp.NEG: ALL_DTYPES, UnaryOp.ABS: ALL_DTYPES, UnaryOp.EXP: FLOAT_DTYPES,
    UnaryOp.LOG: FLOAT_DTYPES, UnaryOp.SQRT: FLOAT_DTYPES, UnaryOp.TANH: FLOAT_DTYPES,
    UnaryOp.SIGMOID: FLOAT_DTYPES, UnaryOp.RELU: ALL_DTYPES, UnaryOp.CAST: ALL_DTYPES,
})
BINARY_DTYPES = MappingProxyType({
    BinaryOp.ADD: ALL_DTYPES, BinaryOp.SUB: ALL_DTYPES, BinaryOp.MUL: ALL_DTYPES,
    BinaryOp.DIV: ALL_DTYPES, BinaryOp.MAX: ALL_DTYPES, BinaryOp.MIN: ALL_DTYPES,
    BinaryOp.POW: FLOAT_DTYPES,
})


def _enum(cls: Any, value: Any, what: str) -> Any:
    try:
        return cls[value.upper()] if isinstance(value, str) else cls(value)
    except (KeyError, ValueError):
        raise ValueError(f"unknown {what}: {value!r}") from None


# ---- operands ----------------------------------------------------------------------------------


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """C-order element strides of ``shape``."""
    out = []
    step = 1
    for d in reversed(shape):
        out.append(step)
        step *= d
    return tuple(reversed(out))


def is_dense(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether no two elements of the layout share memory (dims of size 1 do not count).
    Sufficient, not necessary: the dims sorted by stride must each step past all inner ones."""
    reach = 1
    for s, d in sorted((s, d) for d, s in zip(shape, strides, strict=True) if d > 1):
        if s < reach:
            return False
        reach += s * (d - 1)
    return True


def broadcasts_to(src: Sequence[int], dst: Sequence[int]) -> bool:
    """NumPy broadcasting of ``src`` to exactly ``dst``."""
    if src == dst:
        return True
    if len(src) > len(dst):
        return False
    return all(s in (1, d) for s, d in zip(reversed(src), reversed(dst), strict=False))


def _layout_of(shape: tuple[int, ...], strides: tuple[int, ...] | None,
               itemsize: int) -> tuple[int, int]:
    """(size, nbytes) of a layout, for `Operand` to keep: a command's checks and its execution
    read them many times. Any shape gets an answer (a bad one is refused by `Operand.check`,
    not here); nbytes is 0 when a dimension is empty."""
    size = math.prod(shape)
    if shape and min(shape) <= 0:
        return size, 0
    if strides is None:  # C-contiguous: the elements, end to end
        return size, size * itemsize
    span = 0
    for d, s in zip(shape, strides, strict=False):
        span += (d - 1) * s
    return size, (span + 1) * itemsize


@dataclass(frozen=True, slots=True)
class Operand:
    """A tensor in GPU memory: its VA (of element [0, 0, ...]), dtype, shape (at most 4 dims; ()
    is a scalar) and element strides (None: C-contiguous)."""

    va: int
    dtype: DType
    shape: tuple[int, ...] = ()
    strides: tuple[int, ...] | None = None
    # (size, nbytes), worked out once: see `_layout_of`
    _layout: tuple[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "va", operator.index(self.va))
        object.__setattr__(self, "dtype", DType.of(self.dtype))
        object.__setattr__(self, "shape", tuple(operator.index(d) for d in self.shape))
        if self.strides is not None:
            object.__setattr__(self, "strides",
                               tuple(operator.index(s) for s in self.strides))
        object.__setattr__(self, "_layout",
                           _layout_of(self.shape, self.strides, _ITEMSIZES[self.dtype]))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return self._layout[0]

    @property
    def itemsize(self) -> int:
        return _ITEMSIZES[self.dtype]

    @property
    def element_strides(self) -> tuple[int, ...]:
        return self.strides if self.strides is not None else contiguous_strides(self.shape)

    @property
    def nbytes(self) -> int:
        """The bytes from the first element to the end of the last: what the engine resolves."""
        return self._layout[1]

    @property
    def dense(self) -> bool:
        return self.strides is None or is_dense(self.shape, self.strides)

    def check(self, what: str, max_stride: int = MAX_DIM) -> None:
        """Raise BAD_OPERAND unless the descriptor itself is sound."""
        shape, strides = self.shape, self.strides
        ndim = len(shape)
        bad = FaultKind.BAD_OPERAND
        if ndim > MAX_DIMS:
            raise _fault(bad, f"{what}: {ndim} dimensions (at most {MAX_DIMS})")
        for d in shape:
            if not 1 <= d <= MAX_DIM:
                raise _fault(bad, f"{what}: shape {shape} (each dimension 1..{MAX_DIM})")
        if strides is not None:
            if len(strides) != ndim:
                raise _fault(bad, f"{what}: {len(strides)} strides for {ndim} dims")
            for s in strides:
                if not 0 <= s <= max_stride:
                    raise _fault(bad, f"{what}: strides {strides} (each 0..{max_stride})")
        size, n = self._layout
        if size > MAX_ELEMENTS:
            raise _fault(bad, f"{what}: {size} elements (at most {MAX_ELEMENTS})")
        if n > MAX_OPERAND_BYTES:
            raise _fault(bad, f"{what}: spans {n} bytes (at most {MAX_OPERAND_BYTES})")
        va = self.va
        if not 0 <= va <= U64 or va + n > U64 + 1:
            raise _fault(bad, f"{what}: VA 0x{va:x} + {n} bytes is outside 64 bits")
        if va % _ITEMSIZES[self.dtype]:
            raise _fault(bad, f"{what}: VA 0x{va:x} not aligned to its "
                              f"{_ITEMSIZES[self.dtype]}-byte elements")

    def check_dense(self, what: str) -> None:
        if self.strides is not None and not is_dense(self.shape, self.strides):
            raise _fault(FaultKind.BAD_OPERAND,
                         f"{what}: strides {self.strides} overlap themselves (this operand "
                         "must not repeat elements)")

    def encode(self) -> bytes:
        shape = (*self.shape, 0, 0, 0, 0)[:4]
        strides = (*(self.strides or ()), 0, 0, 0, 0)[:4]
        flags = OPERAND_STRIDED if self.strides is not None else 0
        return _OPERAND.pack(self.va, self.dtype, self.ndim, flags, 0, *shape, *strides)


def _new_operand(va: int, dtype: DType, shape: tuple[int, ...],
                 strides: tuple[int, ...] | None) -> Operand:
    """An Operand from fields already of the right types (the decoder's): the public
    constructor's conversions cost more than the rest of decoding an operand."""
    op = _NEW(Operand)
    _SET_VA(op, va)
    _SET_DTYPE(op, dtype)
    _SET_SHAPE(op, shape)
    _SET_STRIDES(op, strides)
    _SET_LAYOUT(op, _layout_of(shape, strides, _ITEMSIZES[dtype]))
    return op


# Operand's slots, set straight (it is frozen: its own __setattr__ refuses)
_NEW = object.__new__
_SET_VA = Operand.va.__set__  # type: ignore[attr-defined]
_SET_DTYPE = Operand.dtype.__set__  # type: ignore[attr-defined]
_SET_SHAPE = Operand.shape.__set__  # type: ignore[attr-defined]
_SET_STRIDES = Operand.strides.__set__  # type: ignore[attr-defined]
_SET_LAYOUT = Operand._layout.__set__  # type: ignore[attr-defined]


_ZERO_OPERAND = bytes(OPERAND_BYTES)


# Operands one decode remembers by their bytes (a buffer names the same tensors again and
# again); past this many it decodes the rest afresh, so the memo stays small.
_MEMO_OPERANDS = 4096

_Memo: TypeAlias = dict[bytes, Operand]


def _decode_operand(data: bytes, off: int, what: str, memo: _Memo) -> Operand:
    """The operand at ``off``, its encoding checked (what the fields themselves allow; what it
    describes, `Operand.check` checks). The same 48 bytes decode to the same Operand, so one
    decode does them once (``memo``)."""
    raw = data[off:off + OPERAND_BYTES]
    op = memo.get(raw)
    if op is None:
        op = _parse_operand(raw, what)
        if len(memo) < _MEMO_OPERANDS:
            memo[raw] = op
    return op


def _parse_operand(raw: bytes, what: str) -> Operand:
    (va, code, ndim, flags, reserved,
     s0, s1, s2, s3, t0, t1, t2, t3) = _OPERAND.unpack(raw)
    bad = FaultKind.BAD_OPERAND
    dtype = _DTYPE_CODES.get(code)
    if dtype is None:
        raise _fault(bad, f"{what}: unknown dtype code {code}")
    if flags & ~OPERAND_STRIDED or reserved:
        raise _fault(bad, f"{what}: unknown flags 0x{flags:x} or reserved field set")
    if ndim > MAX_DIMS:
        raise _fault(bad, f"{what}: {ndim} dimensions (at most {MAX_DIMS})")
    shape = (s0, s1, s2, s3)
    strides = (t0, t1, t2, t3)
    if ndim < MAX_DIMS and (any(shape[ndim:]) or any(strides[ndim:])):
        raise _fault(bad, f"{what}: shape or stride fields past its {ndim} dimensions are set")
    if flags:  # OPERAND_STRIDED
        return _new_operand(va, dtype, shape[:ndim], strides[:ndim])
    if t0 or t1 or t2 or t3:
        raise _fault(bad, f"{what}: strides set on a contiguous operand")
    return _new_operand(va, dtype, shape[:ndim], None)


def _same_dtype(what: str, *ops: Operand) -> None:
    first = ops[0].dtype
    for o in ops:
        if o.dtype != first:
            raise _fault(FaultKind.SHAPE_MISMATCH,
                         f"{what}: dtypes {[o.dtype.name for o in ops]} differ")


def _dtype_in(what: str, op: Operand, allowed: frozenset[DType]) -> None:
    if op.dtype not in allowed:
        raise _fault(FaultKind.BAD_OPERAND, f"{what} does not take {op.dtype.name}")


def _reserved(*values: int) -> None:
    if any(values):
        raise _fault(FaultKind.BAD_OPCODE, "a reserved field is not zero")


# ---- commands ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Nop:
    """Does nothing; ``size`` (a multiple of 8) pads the buffer. Its bytes after the size field
    are ignored."""

    size: int = 8

    def validate(self) -> None:
        if not 8 <= self.size <= MAX_COMMAND_BYTES or self.size % ALIGNMENT:
            raise _fault(FaultKind.BAD_HEADER, f"NOP of {self.size} bytes")

    def encode(self) -> bytes:
        return _NOP.pack(Opcode.NOP, self.size, 0) + bytes(self.size - _NOP.size)


@dataclass(frozen=True, slots=True)
class Marker:
    """A point in the buffer the engine reports (`RunResult.markers`) when it gets there."""

    value: int

    def validate(self) -> None:
        if not 0 <= self.value <= U64:
            raise _fault(FaultKind.BAD_OPCODE, f"marker value {self.value}")

    def encode(self) -> bytes:
        return _MARKER.pack(Opcode.MARKER, _MARKER.size, 0, self.value)


@dataclass(frozen=True, slots=True)
class Copy:
    """``nbytes`` bytes from ``src_va`` to ``dst_va`` (the ranges must not overlap)."""

    dst_va: int
    src_va: int
    nbytes: int

    def validate(self) -> None:
        bad = FaultKind.BAD_OPERAND
        if not 0 <= self.nbytes <= MAX_OPERAND_BYTES:
            raise _fault(bad, f"COPY of {self.nbytes} bytes (at most {MAX_OPERAND_BYTES})")
        for what, va in (("destination", self.dst_va), ("source", self.src_va)):
            if not 0 <= va <= U64 or va + self.nbytes > U64 + 1:
                raise _fault(bad, f"COPY {what} 0x{va:x} + {self.nbytes} is outside 64 bits")

    def encode(self) -> bytes:
        return _COPY.pack(Opcode.COPY, _COPY.size, 0, self.dst_va, self.src_va, self.nbytes)


@dataclass(frozen=True, slots=True)
class Fill:
    """Every element of ``dst`` becomes ``value`` (the element's bytes, little-endian)."""

    dst: Operand
    value: bytes

    def validate(self) -> None:
        self.dst.check("FILL destination")
        self.dst.check_dense("FILL destination")
        if len(self.value) != self.dst.itemsize:
            raise _fault(FaultKind.BAD_OPERAND,
                         f"FILL value of {len(self.value)} bytes for {self.dst.dtype.name}")

    @property
    def scalar(self) -> Any:
        return np.frombuffer(self.value, self.dst.dtype.numpy)[0]

    def encode(self) -> bytes:
        return _FILL.pack(Opcode.FILL, COMMAND_SIZES[Opcode.FILL], 0,
                          self.value.ljust(8, b"\0")) + self.dst.encode()


@dataclass(frozen=True, slots=True)
class Unary:
    """``dst = op(src)`` elementwise; ``src`` broadcasts to ``dst``'s shape. Same dtype, except
    CAST, which converts to ``dst``'s dtype."""

    op: UnaryOp
    dst: Operand
    src: Operand

    def validate(self) -> None:
        dst, src = self.dst, self.src
        dst.check("destination")
        src.check("source")
        dst.check_dense("destination")
        if ((self.op is not UnaryOp.CAST and src.dtype != dst.dtype)
                or src.dtype not in UNARY_DTYPES[self.op]
                or (src.shape != dst.shape and not broadcasts_to(src.shape, dst.shape))):
            name = f"UNARY {self.op.name}"  # (the message only: the checks again, in order)
            if self.op is not UnaryOp.CAST:
                _same_dtype(name, dst, src)
            _dtype_in(name, src, UNARY_DTYPES[self.op])
            raise _fault(FaultKind.SHAPE_MISMATCH,
                         f"{name}: source {src.shape} does not broadcast to {dst.shape}")

    def encode(self) -> bytes:
        return (_UNARY.pack(Opcode.UNARY, COMMAND_SIZES[Opcode.UNARY], self.op, 0)
                + self.dst.encode() + self.src.encode())


@dataclass(frozen=True, slots=True)
class Binary:
    """``dst = a op b`` elementwise; ``a`` and ``b`` broadcast (NumPy rules) to ``dst``'s shape:
    a scalar, a row, a column. All three of one dtype."""

    op: BinaryOp
    dst: Operand
    a: Operand
    b: Operand

    def validate(self) -> None:
        dst, a, b = self.dst, self.a, self.b
        dst.check("destination")
        a.check("a")
        b.check("b")
        dst.check_dense("destination")
        shape = dst.shape
        if (not dst.dtype == a.dtype == b.dtype or dst.dtype not in BINARY_DTYPES[self.op]
                or (a.shape != shape and not broadcasts_to(a.shape, shape))
                or (b.shape != shape and not broadcasts_to(b.shape, shape))):
            name = f"BINARY {self.op.name}"  # (the message only: the checks again, in order)
            _same_dtype(name, dst, a, b)
            _dtype_in(name, dst, BINARY_DTYPES[self.op])
            for what, o in (("a", a), ("b", b)):
                if not broadcasts_to(o.shape, shape):
                    raise _fault(FaultKind.SHAPE_MISMATCH,
                                 f"{name}: {what} {o.shape} does not broadcast to {shape}")

    def encode(self) -> bytes:
        return (_BINARY.pack(Opcode.BINARY, COMMAND_SIZES[Opcode.BINARY], self.op, 0)
                + self.dst.encode() + self.a.encode() + self.b.encode())


@dataclass(frozen=True, slots=True)
class Gemm:
    """``C = alpha * op(A) @ op(B) + beta * C`` for ``batch`` matrices; op() transposes when
    asked. A, B and C are the matrices as stored (2-D); matrix i of each starts ``i *
    batch_strides`` elements (C, A, B) after the first. beta 0 ignores C's old contents."""

    c: Operand
    a: Operand
    b: Operand
    alpha: float = 1.0
    beta: float = 0.0
    trans_a: bool = False
    trans_b: bool = False
    batch: int = 1
    batch_strides: tuple[int, int, int] = (0, 0, 0)  # elements, of C, A, B

    def validate(self) -> None:
        for what, o in (("C", self.c), ("A", self.a), ("B", self.b)):
            o.check(what)
            if o.ndim != 2:
                raise _fault(FaultKind.SHAPE_MISMATCH, f"GEMM {what} has {o.ndim} dims, not 2")
            _dtype_in("GEMM", o, FLOAT_DTYPES)
            o.check_dense(f"GEMM {what}")
        _same_dtype("GEMM", self.c, self.a, self.b)
        if not 1 <= self.batch <= MAX_DIM:
            raise _fault(FaultKind.BAD_OPERAND, f"GEMM batch {self.batch}")
        if len(self.batch_strides) != 3 or any(not 0 <= s <= U64 for s in self.batch_strides):
            raise _fault(FaultKind.BAD_OPERAND, f"GEMM batch strides {self.batch_strides}")
        m, k = self.a.shape[::-1] if self.trans_a else self.a.shape
        k2, n = self.b.shape[::-1] if self.trans_b else self.b.shape
        if k != k2 or self.c.shape != (m, n):
            raise _fault(FaultKind.SHAPE_MISMATCH,
                         f"GEMM op(A) {m}x{k} @ op(B) {k2}x{n} into C {self.c.shape}")
        c3, a3, b3 = self.layouts()
        for what, o in (("C", c3), ("A", a3), ("B", b3)):
            o.check(f"GEMM batched {what}", max_stride=U64)
        c3.check_dense("GEMM batched C")
        for what, o, s in (("A", a3, self.batch_strides[1]), ("B", b3, self.batch_strides[2])):
            if s and not o.dense:
                raise _fault(FaultKind.BAD_OPERAND,
                             f"GEMM batched {what}: matrices overlap (batch stride {s}); use "
                             "0 to share one matrix")

    def layouts(self) -> tuple[Operand, Operand, Operand]:
        """C, A and B as 3-D operands: (batch, rows, cols)."""
        return tuple(  # type: ignore[return-value]
            Operand(o.va, o.dtype, (self.batch, *o.shape), (s, *o.element_strides))
            for o, s in zip((self.c, self.a, self.b), self.batch_strides, strict=True))

    def encode(self) -> bytes:
        flags = (GEMM_TRANS_A if self.trans_a else 0) | (GEMM_TRANS_B if self.trans_b else 0)
        return (_GEMM.pack(Opcode.GEMM, COMMAND_SIZES[Opcode.GEMM], flags, 0, self.batch, 0,
                           self.alpha, self.beta, *self.batch_strides)
                + self.c.encode() + self.a.encode() + self.b.encode())


@dataclass(frozen=True, slots=True)
class Reduce:
    """``dst = op(src, axis)``: ``dst`` has ``src``'s shape without ``axis``, or with it as 1
    (keepdims). Same dtype. Sums in f16 accumulate in f32; integer sums wrap."""

    op: ReduceOp
    dst: Operand
    src: Operand
    axis: int

    @property
    def keepdims(self) -> bool:
        return self.dst.ndim == self.src.ndim

    def validate(self) -> None:
        self.dst.check("destination")
        self.src.check("source")
        self.dst.check_dense("destination")
        self.src.check_dense("REDUCE source")
        if self.dst.dtype != self.src.dtype:
            _same_dtype(f"REDUCE {self.op.name}", self.dst, self.src)
        shape = self.src.shape
        if not 0 <= self.axis < len(shape):
            raise _fault(FaultKind.SHAPE_MISMATCH,
                         f"REDUCE {self.op.name}: axis {self.axis} of {shape}")
        fits = (shape[:self.axis] + shape[self.axis + 1:],
                (*shape[:self.axis], 1, *shape[self.axis + 1:]))
        if self.dst.shape not in fits:
            raise _fault(FaultKind.SHAPE_MISMATCH, f"REDUCE {self.op.name}: {shape} along axis "
                                                   f"{self.axis} into {self.dst.shape}")

    def encode(self) -> bytes:
        return (_REDUCE.pack(Opcode.REDUCE, COMMAND_SIZES[Opcode.REDUCE], self.op, self.axis, 0)
                + self.dst.encode() + self.src.encode())


@dataclass(frozen=True, slots=True)
class Softmax:
    """``dst = exp(src - max) / sum(exp(src - max))`` along ``axis``. Same shape and float
    dtype; ``dst`` may be ``src`` itself."""

    dst: Operand
    src: Operand
    axis: int

    def validate(self) -> None:
        self.dst.check("destination")
        self.src.check("source")
        self.dst.check_dense("destination")
        self.src.check_dense("SOFTMAX source")
        _same_dtype("SOFTMAX", self.dst, self.src)
        _dtype_in("SOFTMAX", self.src, FLOAT_DTYPES)
        if self.dst.shape != self.src.shape or not 0 <= self.axis < self.src.ndim:
            raise _fault(FaultKind.SHAPE_MISMATCH,
                         f"SOFTMAX {self.src.shape} axis {self.axis} into {self.dst.shape}")

    def encode(self) -> bytes:
        return (_SOFTMAX.pack(Opcode.SOFTMAX, COMMAND_SIZES[Opcode.SOFTMAX], self.axis, 0, 0)
                + self.dst.encode() + self.src.encode())


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of one spatial dim (may be <= 0: no output)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@dataclass(frozen=True, slots=True)
class Conv2d:
    """2-D cross-correlation, as torch.nn.functional.conv2d: ``src`` NCHW, ``weight``
    (O, C/groups, KH, KW), optional ``bias`` (O,), ``dst`` (N, O, OH, OW); zero padding."""

    dst: Operand
    src: Operand
    weight: Operand
    bias: Operand | None = None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    def validate(self) -> None:
        ops = [("destination", self.dst, 4), ("source", self.src, 4), ("weight", self.weight, 4)]
        if self.bias is not None:
            ops.append(("bias", self.bias, 1))
        for what, o, rank in ops:
            o.check(f"CONV2D {what}")
            o.check_dense(f"CONV2D {what}")
            _dtype_in("CONV2D", o, FLOAT_DTYPES)
            if o.ndim != rank:
                raise _fault(FaultKind.SHAPE_MISMATCH,
                             f"CONV2D {what} has {o.ndim} dims, not {rank}")
        _same_dtype("CONV2D", *(o for _, o, _ in ops))
        u16 = 0xFFFF
        if (len(self.stride) != 2 or len(self.padding) != 2 or len(self.dilation) != 2
                or any(not 1 <= v <= u16 for v in (*self.stride, *self.dilation, self.groups))
                or any(not 0 <= v <= u16 for v in self.padding)):
            raise _fault(FaultKind.BAD_OPERAND,
                         f"CONV2D stride {self.stride} padding {self.padding} dilation "
                         f"{self.dilation} groups {self.groups}")
        n, c, h, w = self.src.shape
        o, cg, kh, kw = self.weight.shape
        g = self.groups
        mismatch = FaultKind.SHAPE_MISMATCH
        if c % g or o % g or cg != c // g:
            raise _fault(mismatch, f"CONV2D {c} channels, weight {self.weight.shape}, "
                                   f"{g} groups")
        if self.bias is not None and self.bias.shape != (o,):
            raise _fault(mismatch, f"CONV2D bias {self.bias.shape} for {o} outputs")
        oh = conv_output_size(h, kh, self.stride[0], self.padding[0], self.dilation[0])
        ow = conv_output_size(w, kw, self.stride[1], self.padding[1], self.dilation[1])
        if oh < 1 or ow < 1 or self.dst.shape != (n, o, oh, ow):
            raise _fault(mismatch, f"CONV2D output is {(n, o, oh, ow)}, destination "
                                   f"{self.dst.shape}")

    def encode(self) -> bytes:
        flags = CONV_HAS_BIAS if self.bias is not None else 0
        head = _CONV.pack(Opcode.CONV2D, COMMAND_SIZES[Opcode.CONV2D], flags, self.groups,
                          *self.stride, *self.padding, *self.dilation, 0)
        bias = self.bias.encode() if self.bias is not None else _ZERO_OPERAND
        return head + self.dst.encode() + self.src.encode() + self.weight.encode() + bias


Command: TypeAlias = Nop | Marker | Copy | Fill | Unary | Binary | Gemm | Reduce | Softmax | Conv2d


# ---- decoding ----------------------------------------------------------------------------------


def _operands(data: bytes, off: int, names: Iterable[str], memo: _Memo) -> list[Operand]:
    return [_decode_operand(data, off + i * OPERAND_BYTES, n, memo)
            for i, n in enumerate(names)]


def _operands2(data: bytes, off: int, first: str, second: str,
               memo: _Memo) -> tuple[Operand, Operand]:
    """Two operands one after the other (the commonest case, without `_operands`' loop)."""
    return (_decode_operand(data, off, first, memo),
            _decode_operand(data, off + OPERAND_BYTES, second, memo))


def _d_nop(data: bytes, off: int, size: int, memo: _Memo) -> Command:
    return Nop(size)


def _d_marker(data: bytes, off: int, size: int, memo: _Memo) -> Command:
    _, _, reserved, value = _MARKER.unpack_from(data, off)
    _reserved(reserved)
    return Marker(value)


def _d_copy(data: bytes, off: int, size: int, memo: _Memo) -> Command:
    _, _, reserved, dst, src, n = _COPY.unpack_from(data, off)
    _reserved(reserved)
    return Copy(dst, src, n)


def _d_fill(data: bytes, off: int, size: int, memo: _Memo) -> Command:
    _, _, reserved, value = _FILL.unpack_from(data, off)
    _reserved(reserved)
    dst = _decode_operand(data, off + _FILL.size, "FILL destination", memo)
    if any(value[dst.itemsize:]):
        raise _fault(FaultKind.BAD_OPERAND, "FILL value bytes past its element are set")
    return Fill(dst, value[:dst.itemsize])


def _function(table: MappingProxyType[int, Any], code: int, what: str) -> Any:
    found = table.get(code)
    if found is None:
        raise _fault(FaultKind.BAD_OPCODE, f"unknown {what} function {code}")
    return found


# function codes -> the enum members (a lookup, where calling the enum costs a lot more)
_UNARY_OPS = MappingProxyType({int(o): o for o in UnaryOp})
_BINARY_OPS = MappingProxyType({int(o): o for o in BinaryOp})
_REDUCE_OPS = MappingProxyType({int(o): o for o in ReduceOp})


def _d_unary(data: bytes, off: int, size: int, memo: _Memo) -> Command:
    _, _, func, reserved = _UNARY.unpack_from(data, off)
    _reserved(reserved)
    op = _function(_UNARY_OPS, func, "UNARY")
    dst, src = _operands2(data, off + _UNARY.size, "destination", "source", memo)
    return Unary(op, dst, src)


def _d_binary(data: bytes, off: int, size: int, memo: _Memo) -> Command:
    _, _, func, reserved = _BINARY.unpack_from(data, off)
    _reserved(reserved)
    op = _function(_BINARY_OPS, func, "BINARY")
    at = off + _BINARY.size
    dst, a = _operands2(data, at, "destination", "a", memo)
    b = _decode_operand(data, at + 2 * OPERAND_BYTES, "b", memo)
    return Binary(op, dst, a, b)


def _d_gemm(data: bytes, off: int, size: int, memo: _Memo) -> Command:
    _, _, flags, r1, batch, r2, alpha, beta, s_c, s_a, s_b = _GEMM.unpack_from(data, off)
    _reserved(r1, r2, flags & ~(GEMM_TRANS_A | GEMM_TRANS_B))
    c, a, b = _operands(data, off + _GEMM.size, ("C", "A", "B"), memo)
    return Gemm(c, a, b, alpha, beta, bool(flags & GEMM_TRANS_A), bool(flags & GEMM_TRANS_B),
                batch, (s_c, s_a, s_b))


def _d_reduce(data: bytes, off: int, size: int, memo: _Memo) -> Command:
    _, _, func, axis, reserved = _REDUCE.unpack_from(data, off)
    _reserved(reserved)
    op = _function(_REDUCE_OPS, func, "REDUCE")
    dst, src = _operands2(data, off + _REDUCE.size, "destination", "source", memo)
    return Reduce(op, dst, src, axis)


def _d_softmax(data: bytes, off: int, size: int, memo: _Memo) -> Command:
    _, _, axis, r1, r2 = _SOFTMAX.unpack_from(data, off)
    _reserved(r1, r2)
    dst, src = _operands2(data, off + _SOFTMAX.size, "destination", "source", memo)
    return Softmax(dst, src, axis)


def _d_conv(data: bytes, off: int, size: int, memo: _Memo) -> Command:
    _, _, flags, groups, sh, sw, ph, pw, dh, dw, reserved = _CONV.unpack_from(data, off)
    _reserved(reserved, flags & ~CONV_HAS_BIAS)
    at = off + _CONV.size
    dst, src, weight = _operands(data, at, ("destination", "source", "weight"), memo)
    at += 3 * OPERAND_BYTES
    if flags & CONV_HAS_BIAS:
        bias: Operand | None = _decode_operand(data, at, "bias", memo)
    elif data[at:at + OPERAND_BYTES] != _ZERO_OPERAND:
        raise _fault(FaultKind.BAD_OPERAND, "CONV2D bias operand set without the bias flag")
    else:
        bias = None
    return Conv2d(dst, src, weight, bias, (sh, sw), (ph, pw), (dh, dw), groups)


_DECODERS = MappingProxyType({
    Opcode.NOP: _d_nop, Opcode.MARKER: _d_marker, Opcode.COPY: _d_copy, Opcode.FILL: _d_fill,
    Opcode.UNARY: _d_unary, Opcode.BINARY: _d_binary, Opcode.GEMM: _d_gemm,
    Opcode.REDUCE: _d_reduce, Opcode.SOFTMAX: _d_softmax, Opcode.CONV2D: _d_conv,
})


def _header(buffer: Any) -> tuple[memoryview, int, int]:
    """The buffer as bytes, its command count and total size, or BAD_HEADER."""
    bad = FaultKind.BAD_HEADER
    try:
        mv = memoryview(buffer)
        if not mv.c_contiguous:
            raise TypeError("not contiguous")
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
    except (TypeError, ValueError) as e:
        raise _fault(bad, f"not a contiguous byte buffer ({e})") from None
    if mv.nbytes < HEADER_BYTES:
        raise _fault(bad, f"{mv.nbytes} bytes is shorter than the {HEADER_BYTES}-byte header")
    magic, version, flags, count, total = _HEADER.unpack_from(mv, 0)
    if magic != MAGIC:
        raise _fault(bad, f"magic 0x{magic:08x}, not 0x{MAGIC:08x}")
    if version != VERSION:
        raise _fault(bad, f"format version {version}; this engine runs {VERSION}")
    if flags:
        raise _fault(bad, f"header flags 0x{flags:x} (none defined)")
    if total % ALIGNMENT or not HEADER_BYTES <= total <= min(mv.nbytes, MAX_BUFFER_BYTES):
        raise _fault(bad, f"total of {total} bytes in a buffer of {mv.nbytes} (a multiple of "
                          f"{ALIGNMENT} up to {MAX_BUFFER_BYTES})")
    if count > MAX_COMMANDS or count > (total - HEADER_BYTES) // ALIGNMENT:
        raise _fault(bad, f"{count} commands in {total} bytes")
    return mv, count, total


def decode(buffer: Any) -> tuple[Command, ...]:
    """Every command of a pydxg-soft-v1 buffer, each checked (`validate`); raises EngineFault.
    The bytes are copied first, so a client that writes the buffer meanwhile changes nothing.
    Bytes past the header's total size are not looked at."""
    mv, count, total = _header(buffer)
    data = bytes(mv[:total])
    off = HEADER_BYTES
    out: list[Command] = []
    memo: _Memo = {}
    for i in range(count):
        if off + COMMAND_HEADER_BYTES > total:
            raise EngineFault(FaultKind.BAD_HEADER, i, "command past the buffer's total size")
        opcode, size = _CMD.unpack_from(data, off)
        if size < ALIGNMENT or size % ALIGNMENT or off + size > total:
            raise EngineFault(FaultKind.BAD_HEADER, i,
                              f"command size {size} at offset {off} of {total}")
        decoder = _DECODERS.get(opcode)  # type: ignore[call-overload]
        if decoder is None:
            raise EngineFault(FaultKind.BAD_OPCODE, i, f"unknown opcode {opcode}")
        want = COMMAND_SIZES.get(opcode)  # type: ignore[call-overload]
        if want is not None and size != want:
            raise EngineFault(FaultKind.BAD_OPCODE, i,
                              f"{Opcode(opcode).name} is {want} bytes, not {size}")
        try:
            cmd = decoder(data, off, size, memo)
            cmd.validate()
        except EngineFault as e:
            raise e.at(i) from None
        out.append(cmd)
        off += size
    if off != total:
        raise EngineFault(FaultKind.BAD_HEADER, -1,
                          f"{total - off} bytes after the last of {count} commands")
    return tuple(out)


# ---- encoding ----------------------------------------------------------------------------------


def _checked(cmd: Command) -> Command:
    try:
        cmd.validate()
    except EngineFault as e:
        raise ValueError(f"{type(cmd).__name__}: {e.kind}: {e.detail}") from None
    return cmd


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (operator.index(a), operator.index(b))


class CommandBuffer:
    """Builds a pydxg-soft-v1 command buffer. Each method checks its command as the engine
    will (raising ValueError) and returns the builder, so calls chain; `tobytes` gives the
    buffer to place in an allocation::

        cb = CommandBuffer()
        cb.gemm(h, x, w1).binary("add", h, h, b1).unary("relu", h, h).softmax(y, h, axis=1)
        data = cb.tobytes()
    """

    def __init__(self) -> None:
        self.commands: list[Command] = []
        self._bytes = HEADER_BYTES

    def __len__(self) -> int:
        return len(self.commands)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def append(self, cmd: Command) -> CommandBuffer:
        size = cmd.size if isinstance(cmd, Nop) else COMMAND_SIZES[_OPCODES[type(cmd)]]
        if len(self.commands) >= MAX_COMMANDS or self._bytes + size > MAX_BUFFER_BYTES:
            raise ValueError("command buffer full")
        self.commands.append(_checked(cmd))
        self._bytes += size
        return self

    def nop(self, size: int = 8) -> CommandBuffer:
        return self.append(Nop(size))

    def marker(self, value: int) -> CommandBuffer:
        return self.append(Marker(value))

    def copy(self, dst_va: int, src_va: int, nbytes: int) -> CommandBuffer:
        return self.append(Copy(dst_va, src_va, nbytes))

    def fill(self, dst: Operand, value: float | int) -> CommandBuffer:
        arr = np.asarray(value)
        if arr.size != 1:
            raise ValueError("FILL takes one value")
        with np.errstate(all="ignore"):
            raw = arr.reshape(()).astype(dst.dtype.numpy, casting="unsafe").tobytes()
        return self.append(Fill(dst, raw))

    def unary(self, op: UnaryOp | str | int, dst: Operand, src: Operand) -> CommandBuffer:
        return self.append(Unary(_enum(UnaryOp, op, "unary op"), dst, src))

    def cast(self, dst: Operand, src: Operand) -> CommandBuffer:
        return self.unary(UnaryOp.CAST, dst, src)

    def binary(self, op: BinaryOp | str | int, dst: Operand, a: Operand,
               b: Operand) -> CommandBuffer:
        return self.append(Binary(_enum(BinaryOp, op, "binary op"), dst, a, b))

    def gemm(self, c: Operand, a: Operand, b: Operand, alpha: float = 1.0, beta: float = 0.0,
             trans_a: bool = False, trans_b: bool = False, batch: int = 1,
             batch_strides: Sequence[int] | None = None) -> CommandBuffer:
        """``batch_strides`` (C, A, B, in elements) default to matrices packed one after the
        other (each operand's rows*cols; 0 when batch is 1)."""
        if batch_strides is None:
            batch_strides = (0, 0, 0) if batch == 1 else (c.size, a.size, b.size)
        strides = tuple(operator.index(s) for s in batch_strides)
        if len(strides) != 3:
            raise ValueError("batch_strides: three strides (C, A, B)")
        return self.append(Gemm(c, a, b, float(alpha), float(beta), bool(trans_a),
                                bool(trans_b), operator.index(batch), strides))  # type: ignore[arg-type]

    def reduce(self, op: ReduceOp | str | int, dst: Operand, src: Operand,
               axis: int) -> CommandBuffer:
        axis = operator.index(axis)
        return self.append(Reduce(_enum(ReduceOp, op, "reduce op"), dst, src,
                                  axis + src.ndim if axis < 0 else axis))

    def softmax(self, dst: Operand, src: Operand, axis: int = -1) -> CommandBuffer:
        axis = operator.index(axis)
        return self.append(Softmax(dst, src, axis + src.ndim if axis < 0 else axis))

    def conv2d(self, dst: Operand, src: Operand, weight: Operand, bias: Operand | None = None,
               stride: int | Sequence[int] = (1, 1), padding: int | Sequence[int] = (0, 0),
               dilation: int | Sequence[int] = (1, 1), groups: int = 1) -> CommandBuffer:
        return self.append(Conv2d(dst, src, weight, bias, _pair(stride), _pair(padding),
                                  _pair(dilation), operator.index(groups)))

    def tobytes(self) -> bytes:
        body = b"".join(c.encode() for c in self.commands)
        total = HEADER_BYTES + len(body)
        return _HEADER.pack(MAGIC, VERSION, 0, len(self.commands), total) + body


_OPCODES = MappingProxyType({
    Nop: Opcode.NOP, Marker: Opcode.MARKER, Copy: Opcode.COPY, Fill: Opcode.FILL,
    Unary: Opcode.UNARY, Binary: Opcode.BINARY, Gemm: Opcode.GEMM, Reduce: Opcode.REDUCE,
    Softmax: Opcode.SOFTMAX, Conv2d: Opcode.CONV2D,
})
