"""``dxg.compute.ndarray``: an array in a virtual GPU's memory, with NumPy's interface.

An array is a view (shape, element strides, element offset, dtype) of a block of device memory
(:mod:`dxg.compute.memory`), which every view of it shares and which goes back to the device
once the last view is gone and the work using it has run. Operators and methods encode work on
the device's current stream and return new arrays at once; reading values (``get()``,
``numpy.asarray(x)``, ``float(x)``, ``print(x)``) waits for the work that writes them.
"""

from __future__ import annotations

import math
import operator
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from dxg.backends.softcmd import Operand, contiguous_strides
from dxg.compute import dtypes as _dt

__all__ = ["ndarray"]


def _ops() -> Any:
    from dxg.compute import ops

    return ops


class _Buffer:
    """Holds a block while arrays use it; when the last one goes, the block goes back to the
    pool (a finalizer: safe from any thread, no call to the node from it)."""

    __slots__ = ("__weakref__", "block")

    def __init__(self, pool: Any, block: Any) -> None:
        self.block = block
        if block.size and pool is not None:
            fin = weakref.finalize(self, pool.release, block)
            fin.atexit = False


class ndarray:
    """An array on a :class:`~dxg.compute.device.Device` (see the module's docstring)."""

    __slots__ = ("__weakref__", "_buf", "_offset", "_strides", "device", "dtype", "shape")
    __array_priority__ = 100

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("make arrays with dev.asarray / dev.empty / dev.zeros, not ndarray()")

    @classmethod
    def _new(cls, device: Any, block: Any, shape: tuple[int, ...], dtype: np.dtype[Any],
             strides: tuple[int, ...] | None = None, offset: int = 0,
             buf: _Buffer | None = None, owned: bool = True) -> ndarray:
        self = object.__new__(cls)
        self.device = device
        self._buf = buf if buf is not None else _Buffer(device.pool if owned else None, block)
        self.shape = tuple(shape)
        self.dtype = dtype
        self._strides = contiguous_strides(self.shape) if strides is None else tuple(strides)
        self._offset = offset
        return self

    def _view(self, shape: Sequence[int], strides: Sequence[int], offset: int) -> ndarray:
        return ndarray._new(self.device, None, tuple(shape), self.dtype, tuple(strides), offset,
                            self._buf)

    # -- what it is ----------------------------------------------------------------------------

    @property
    def _block(self) -> Any:
        return self._buf.block

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.size * self.itemsize

    @property
    def strides(self) -> tuple[int, ...]:
        """Bytes, as NumPy's."""
        return tuple(s * self.itemsize for s in self._strides)

    @property
    def va(self) -> int:
        """The GPU virtual address of element [0, 0, ...] (0 for an empty array)."""
        return self._block.va + self._offset * self.itemsize if self._block.size else 0

    @property
    def is_contiguous(self) -> bool:
        """C-contiguous (dimensions of size 1 do not count)."""
        want = contiguous_strides(self.shape)
        return all(d <= 1 or s == w for d, s, w in zip(self.shape, self._strides, want,
                                                       strict=True))

    @property
    def flags(self) -> dict[str, bool]:
        return {"C_CONTIGUOUS": self.is_contiguous, "OWNDATA": False, "WRITEABLE": True}

    @property
    def T(self) -> ndarray:
        return self.transpose()

    def operand(self) -> Operand:
        """The array as a command-buffer operand (``dxg.backends.softcmd.Operand``), for
        ``stream.launch`` of a hand-built command buffer."""
        if not self.size:
            raise ValueError("an empty array has no operand")
        strides = None if self.is_contiguous else self._strides
        return Operand(self.va, self.dtype, self.shape, strides)

    def __repr__(self) -> str:
        if self.device.closed:
            return f"<dxg.compute.ndarray shape={self.shape} dtype={self.dtype} (device closed)>"
        return repr(self.get())

    def __str__(self) -> str:
        return str(self.get())

    def __format__(self, spec: str) -> str:
        return format(self.get(), spec)

    # -- reading back ----------------------------------------------------------------------------

    def get(self, stream: Any = None) -> np.ndarray:
        """A NumPy copy, once the work that writes this array has run (DeviceFault if the
        device's work faulted)."""
        return _ops().download(self, stream)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if copy is False:
            raise ValueError("a device array cannot be seen by NumPy without a copy")
        out = self.get()
        return out if dtype is None else out.astype(dtype, copy=False)

    def set(self, value: Any) -> None:
        """Write ``value`` (an array-like, broadcast to this shape) into this array, in stream
        order."""
        self[...] = value

    def tolist(self) -> Any:
        return self.get().tolist()

    def item(self) -> Any:
        if self.size != 1:
            raise ValueError("can only convert an array of size 1 to a Python scalar")
        return self.get().item()

    def __float__(self) -> float:
        return float(self.item())

    def __int__(self) -> int:
        return int(self.item())

    def __bool__(self) -> bool:
        if self.size != 1:
            raise ValueError("The truth value of an array with more than one element is "
                             "ambiguous. Use a.any() or a.all()")
        return bool(self.item())

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of unsized object")
        return self.shape[0]

    def __iter__(self) -> Iterator[ndarray]:
        if not self.shape:
            raise TypeError("iteration over a 0-d array")
        for i in range(self.shape[0]):
            yield self[i]

    # -- views ---------------------------------------------------------------------------------

    def __getitem__(self, key: Any) -> ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        for k in key:
            if isinstance(k, ndarray | np.ndarray | list | bool | np.bool_):
                raise IndexError("only integers, slices (`:`), ellipsis (`...`) and "
                                 "numpy.newaxis (`None`) index device arrays")
        used = sum(1 for k in key if k is not None and k is not Ellipsis)
        if used > self.ndim:
            raise IndexError(f"too many indices for array: array is {self.ndim}-dimensional, "
                             f"but {used} were indexed")
        if sum(1 for k in key if k is Ellipsis) > 1:
            raise IndexError("an index can only have a single ellipsis ('...')")
        if Ellipsis in key:
            at = next(i for i, k in enumerate(key) if k is Ellipsis)
            key = key[:at] + (slice(None),) * (self.ndim - used) + key[at + 1:]
        shape: list[int] = []
        strides: list[int] = []
        offset = self._offset
        dim = 0
        for k in key:
            if k is None:
                shape.append(1)
                strides.append(0)
                continue
            n, stride = self.shape[dim], self._strides[dim]
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step < 0:
                    raise ValueError("negative steps are not supported on device arrays")
                length = len(range(start, stop, step))
                shape.append(length)
                strides.append(stride * step)
                if length:
                    offset += start * stride
            else:
                try:
                    i = operator.index(k)
                except TypeError:
                    raise IndexError("only integers, slices (`:`), ellipsis (`...`) and "
                                     "numpy.newaxis (`None`) are valid indices") from None
                if not -n <= i < n:
                    raise IndexError(f"index {i} is out of bounds for axis {dim} with size {n}")
                offset += (i % n) * stride
            dim += 1
        shape.extend(self.shape[dim:])
        strides.extend(self._strides[dim:])
        return self._view(shape, strides, offset)

    def __setitem__(self, key: Any, value: Any) -> None:
        _ops().assign(self[key], value)

    def reshape(self, *shape: Any, order: str = "C") -> ndarray:
        if order != "C":
            raise ValueError("only C order is supported")
        if len(shape) == 1 and not isinstance(shape[0], int | np.integer):
            shape = tuple(shape[0])
        dims = [operator.index(d) for d in shape]
        if dims.count(-1) > 1:
            raise ValueError("can only specify one unknown dimension")
        if -1 in dims:
            rest = math.prod(d for d in dims if d != -1)
            if rest == 0 or self.size % rest:
                raise ValueError(f"cannot reshape array of size {self.size} into shape "
                                 f"{tuple(shape)}")
            dims[dims.index(-1)] = self.size // rest
        if any(d < 0 for d in dims) or math.prod(dims) != self.size:
            raise ValueError(f"cannot reshape array of size {self.size} into shape "
                             f"{tuple(dims)}")
        src = self if self.is_contiguous else self.copy()
        return src._view(dims, contiguous_strides(dims), src._offset)

    def ravel(self) -> ndarray:
        return self.reshape(-1)

    def flatten(self) -> ndarray:
        return self.copy().reshape(-1)

    def transpose(self, *axes: Any) -> ndarray:
        if len(axes) == 1 and not isinstance(axes[0], int | np.integer):
            axes = tuple(axes[0]) if axes[0] is not None else ()
        if not axes:
            order = tuple(reversed(range(self.ndim)))
        else:
            order = tuple(_normalize_axis(operator.index(a), self.ndim) for a in axes)
            if sorted(order) != list(range(self.ndim)):
                raise ValueError("axes don't match array")
        return self._view([self.shape[i] for i in order], [self._strides[i] for i in order],
                          self._offset)

    def swapaxes(self, axis1: int, axis2: int) -> ndarray:
        order = list(range(self.ndim))
        a, b = _normalize_axis(axis1, self.ndim), _normalize_axis(axis2, self.ndim)
        order[a], order[b] = order[b], order[a]
        return self.transpose(order)

    def squeeze(self, axis: Any = None) -> ndarray:
        if axis is None:
            keep = [i for i, d in enumerate(self.shape) if d != 1]
        else:
            axes = {_normalize_axis(a, self.ndim)
                    for a in (axis if isinstance(axis, tuple) else (axis,))}
            if any(self.shape[a] != 1 for a in axes):
                raise ValueError("cannot select an axis to squeeze out which has size not "
                                 "equal to one")
            keep = [i for i in range(self.ndim) if i not in axes]
        return self._view([self.shape[i] for i in keep], [self._strides[i] for i in keep],
                          self._offset)

    # -- copies and casts ----------------------------------------------------------------------

    def copy(self) -> ndarray:
        """A new C-contiguous array with the same values (on the current stream)."""
        return _ops().astype(self, self.dtype)

    def astype(self, dtype: Any, copy: bool = True) -> ndarray:
        dt = _dt.device_dtype(dtype)
        if dt == self.dtype and not copy:
            return self
        return _ops().astype(self, dt)

    # -- reductions ----------------------------------------------------------------------------

    def sum(self, axis: Any = None, dtype: Any = None, out: Any = None,
            keepdims: bool = False) -> ndarray:
        return _ops().sum(self, axis, dtype=dtype, out=out, keepdims=keepdims)

    def mean(self, axis: Any = None, dtype: Any = None, out: Any = None,
             keepdims: bool = False) -> ndarray:
        return _ops().mean(self, axis, dtype=dtype, out=out, keepdims=keepdims)

    def max(self, axis: Any = None, out: Any = None, keepdims: bool = False) -> ndarray:
        return _ops().max(self, axis, out=out, keepdims=keepdims)

    def min(self, axis: Any = None, out: Any = None, keepdims: bool = False) -> ndarray:
        return _ops().min(self, axis, out=out, keepdims=keepdims)

    def clip(self, a_min: Any = None, a_max: Any = None) -> ndarray:
        return _ops().clip(self, a_min, a_max)

    # -- operators -----------------------------------------------------------------------------

    def __add__(self, other: Any) -> ndarray:
        return _ops().add(self, other)

    def __radd__(self, other: Any) -> ndarray:
        return _ops().add(other, self)

    def __iadd__(self, other: Any) -> ndarray:
        return _ops().add(self, other, out=self)

    def __sub__(self, other: Any) -> ndarray:
        return _ops().subtract(self, other)

    def __rsub__(self, other: Any) -> ndarray:
        return _ops().subtract(other, self)

    def __isub__(self, other: Any) -> ndarray:
        return _ops().subtract(self, other, out=self)

    def __mul__(self, other: Any) -> ndarray:
        return _ops().multiply(self, other)

    def __rmul__(self, other: Any) -> ndarray:
        return _ops().multiply(other, self)

    def __imul__(self, other: Any) -> ndarray:
        return _ops().multiply(self, other, out=self)

    def __truediv__(self, other: Any) -> ndarray:
        return _ops().divide(self, other)

    def __rtruediv__(self, other: Any) -> ndarray:
        return _ops().divide(other, self)

    def __itruediv__(self, other: Any) -> ndarray:
        return _ops().divide(self, other, out=self)

    def __pow__(self, other: Any) -> ndarray:
        return _ops().power(self, other)

    def __rpow__(self, other: Any) -> ndarray:
        return _ops().power(other, self)

    def __ipow__(self, other: Any) -> ndarray:
        return _ops().power(self, other, out=self)

    def __matmul__(self, other: Any) -> ndarray:
        return _ops().matmul(self, other)

    def __rmatmul__(self, other: Any) -> ndarray:
        return _ops().matmul(other, self)

    def __imatmul__(self, other: Any) -> ndarray:
        return _ops().matmul(self, other, out=self)

    def __neg__(self) -> ndarray:
        return _ops().negative(self)

    def __pos__(self) -> ndarray:
        return self.copy()

    def __abs__(self) -> ndarray:
        return _ops().absolute(self)

    # -- NumPy's protocols ---------------------------------------------------------------------

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        """``numpy.exp(x)``, ``numpy_array + x`` ...: the device's operation when it has one
        (the result stays on the device), NumPy on copies otherwise."""
        return _ops().array_ufunc(ufunc, method, inputs, kwargs)


def _normalize_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise np.exceptions.AxisError(axis, ndim)
    return axis % ndim
