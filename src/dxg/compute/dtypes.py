"""The element types of device arrays, and how NumPy's are mapped onto them.

The soft GPU computes in float16, float32, float64, int32 and uint8. Results follow NumPy's type
rules (``numpy.result_type``, Python scalars "weak" as in NumPy 2), then every integer type other
than uint8 is stored as int32, and booleans as int32 too.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["DTYPES", "coerce", "device_dtype", "is_float", "shape_of"]

DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64),
          np.dtype(np.int32), np.dtype(np.uint8))
_NAMES = "float16, float32, float64, int32, uint8"


def device_dtype(dtype: Any) -> np.dtype[Any]:
    """``dtype`` when the device has it; TypeError otherwise (asked for by name)."""
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    if dt not in DTYPES:
        raise TypeError(f"dtype {dt} is not supported on the device ({_NAMES})")
    return dt


def coerce(dtype: Any) -> np.dtype[Any]:
    """The device dtype that holds ``dtype``'s values: itself, int32 for other integers and
    booleans; TypeError for complex, strings and objects."""
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    if dt in DTYPES:
        return dt
    if dt.kind in "iub":
        return DTYPES[3]
    if dt.kind == "f":  # longdouble
        return DTYPES[2]
    raise TypeError(f"dtype {dt} is not supported on the device ({_NAMES})")


def is_float(dtype: Any) -> bool:
    return np.dtype(dtype).kind == "f"


def shape_of(shape: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(shape, int | np.integer):
        dims: tuple[int, ...] = (operator.index(shape),)
    else:
        dims = tuple(operator.index(d) for d in shape)
    if any(d < 0 for d in dims):
        raise ValueError("negative dimensions are not allowed")
    return dims
