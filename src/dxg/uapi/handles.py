"""The 32-bit ``d3dkmthandle`` format, as pure functions, plus ctypes field helpers.

Bit layout (``struct d3dkmthandle``; same as Windows ``D3DKMT_HANDLE``; dxgkrnl ``hmgr.h``)::

    bits  0..5   instance  (6 bits)  always 0 in the Linux driver
    bits  6..29  index     (24 bits) slot in the handle table, 0..HANDLE_INDEX_MAX
    bits 30..31  unique    (2 bits)  generation counter of the slot

A first-generation handle (``unique == 1``) therefore looks like ``0x40000000 + index * 0x40``.

A ``d3dkmthandle`` member of a ctypes struct is read and written through its ``v`` member (the
C union member ``__u32 v``), exactly as in C: ``args.adapter.v = h`` / ``h = args.adapter.v``.
:func:`handle_value` and :func:`set_handle_value` do the same and also accept plain ints.
"""

from __future__ import annotations

from enum import IntEnum

from .structs import d3dkmthandle

HANDLE_INSTANCE_BITS = 6
HANDLE_INDEX_BITS = 24
HANDLE_UNIQUE_BITS = 2

HANDLE_INSTANCE_SHIFT = 0
HANDLE_INDEX_SHIFT = HANDLE_INSTANCE_BITS  # 6
HANDLE_UNIQUE_SHIFT = HANDLE_INSTANCE_BITS + HANDLE_INDEX_BITS  # 30

HANDLE_INSTANCE_MAX = (1 << HANDLE_INSTANCE_BITS) - 1  # 63
HANDLE_INDEX_MAX = (1 << HANDLE_INDEX_BITS) - 1  # 0xFFFFFF
HANDLE_UNIQUE_MAX = (1 << HANDLE_UNIQUE_BITS) - 1  # 3

HANDLE_INSTANCE_MASK = HANDLE_INSTANCE_MAX << HANDLE_INSTANCE_SHIFT  # 0x0000003F
HANDLE_INDEX_MASK = HANDLE_INDEX_MAX << HANDLE_INDEX_SHIFT  # 0x3FFFFFC0
HANDLE_UNIQUE_MASK = HANDLE_UNIQUE_MAX << HANDLE_UNIQUE_SHIFT  # 0xC0000000

HANDLE_MAX = 0xFFFFFFFF
NULL_HANDLE = 0

__all__ = (
    "HANDLE_INDEX_BITS",
    "HANDLE_INDEX_MASK",
    "HANDLE_INDEX_MAX",
    "HANDLE_INDEX_SHIFT",
    "HANDLE_INSTANCE_BITS",
    "HANDLE_INSTANCE_MASK",
    "HANDLE_INSTANCE_MAX",
    "HANDLE_INSTANCE_SHIFT",
    "HANDLE_MAX",
    "HANDLE_UNIQUE_BITS",
    "HANDLE_UNIQUE_MASK",
    "HANDLE_UNIQUE_MAX",
    "HANDLE_UNIQUE_SHIFT",
    "NULL_HANDLE",
    "HandleType",
    "handle_index",
    "handle_instance",
    "handle_str",
    "handle_unique",
    "handle_value",
    "make_handle",
    "set_handle_value",
    "split_handle",
    "to_handle",
)


class HandleType(IntEnum):
    """What a handle names: ``enum hmgrentry_type`` of the real driver (hmgr.h). The guest's and
    the host's handle tables both type their entries with it."""

    FREE = 0
    ADAPTER = 1
    SHAREDRESOURCE = 2
    DEVICE = 3
    RESOURCE = 4
    ALLOCATION = 5
    OVERLAY = 6
    CONTEXT = 7
    SYNCOBJECT = 8
    KEYEDMUTEX = 9
    PAGINGQUEUE = 10
    DEVICESYNCOBJECT = 11
    PROCESS = 12
    SHAREDVMOBJECT = 13
    PROTECTEDSESSION = 14
    HWQUEUE = 15
    MONITOREDFENCE = 32


def _check_range(what: str, value: int, maximum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not 0 <= value <= maximum:
        raise ValueError(f"{what} {value} out of range 0..{maximum}")
    return value


def make_handle(index: int, unique: int, instance: int = 0) -> int:
    """The 32-bit handle value for ``(index, unique, instance)``; ranges are checked."""
    _check_range("handle index", index, HANDLE_INDEX_MAX)
    _check_range("handle unique", unique, HANDLE_UNIQUE_MAX)
    _check_range("handle instance", instance, HANDLE_INSTANCE_MAX)
    return (
        (unique << HANDLE_UNIQUE_SHIFT)
        | (index << HANDLE_INDEX_SHIFT)
        | (instance << HANDLE_INSTANCE_SHIFT)
    )


def _raw(h: int | d3dkmthandle) -> int:
    if isinstance(h, d3dkmthandle):
        return int(h.v)
    return _check_range("handle", h, HANDLE_MAX)


def handle_index(h: int | d3dkmthandle) -> int:
    """Table slot of a handle (bits 6..29)."""
    return (_raw(h) & HANDLE_INDEX_MASK) >> HANDLE_INDEX_SHIFT


def handle_unique(h: int | d3dkmthandle) -> int:
    """Generation counter of a handle (bits 30..31)."""
    return (_raw(h) & HANDLE_UNIQUE_MASK) >> HANDLE_UNIQUE_SHIFT


def handle_instance(h: int | d3dkmthandle) -> int:
    """Instance bits of a handle (bits 0..5; always 0 in the Linux driver)."""
    return (_raw(h) & HANDLE_INSTANCE_MASK) >> HANDLE_INSTANCE_SHIFT


def handle_value(h: int | d3dkmthandle) -> int:
    """The 32-bit value of a handle given as a ctypes ``d3dkmthandle`` (``h.v``) or an int."""
    return _raw(h)


def set_handle_value(h: d3dkmthandle, value: int | d3dkmthandle) -> None:
    """Store ``value`` into the ctypes handle ``h`` in place (``h.v = value``).

    ``h`` is typically a struct member, e.g. ``set_handle_value(args.device, 0x40000040)``;
    ctypes returns struct members as views, so this writes into ``args``.
    """
    if not isinstance(h, d3dkmthandle):
        raise TypeError(f"expected a d3dkmthandle, not {type(h).__name__}")
    h.v = _raw(value)


def to_handle(value: int | d3dkmthandle) -> d3dkmthandle:
    """A new ctypes ``d3dkmthandle`` holding ``value``."""
    return d3dkmthandle(v=_raw(value))


def split_handle(value: object) -> tuple[int, int] | None:
    """``(index, unique)`` of a value that can be a live handle (an int in 1..2**32-1 with zero
    instance bits), else None: the check every handle table makes first, without exceptions
    (it runs on every call)."""
    if not isinstance(value, int) or not 0 < value <= HANDLE_MAX or value & HANDLE_INSTANCE_MASK:
        return None
    return (value & HANDLE_INDEX_MASK) >> HANDLE_INDEX_SHIFT, value >> HANDLE_UNIQUE_SHIFT


def handle_str(h: int | d3dkmthandle) -> str:
    """``0x40000040 (index 1, unique 1)``: a handle for log messages."""
    raw = _raw(h)
    text = f"0x{raw:08X} (index {handle_index(raw)}, unique {handle_unique(raw)}"
    instance = handle_instance(raw)
    return text + (f", instance {instance})" if instance else ")")
