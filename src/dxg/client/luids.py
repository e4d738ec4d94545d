"""Adapter LUIDs as people write them: a 64-bit int, the ``0x…`` string that ``dxg ls`` and
``dxg ls --json`` print, or the (low, high) parts of a winluid; and picking one adapter of a list
by index or by LUID (``node.adapter(i)``, ``dxg.compute.device(i)``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dxg.client.errors import NoSuchAdapter

__all__ = ["LuidLike", "luid_parts", "luid_text", "parse_luid", "pick_adapter"]

LuidLike = int | str | tuple[int, int]
"""What a LUID may be given as: see :func:`parse_luid`."""

_LUID_MAX = (1 << 64) - 1


def parse_luid(value: Any) -> int:
    """The 64-bit LUID ``value`` names: an int, a string as ``dxg ls`` prints it
    (``"0x000000010000abcd"``: hexadecimal with ``0x``, so that it is never taken for an
    index), or ``(low, high)``. Raises ValueError (any other string, a value out of range) or
    TypeError."""
    if isinstance(value, bool):
        raise TypeError("a LUID is an int, a string like '0x0000000100000002' or (low, high)")
    if isinstance(value, tuple):
        if len(value) != 2:
            raise ValueError(f"a LUID as parts is (low, high), not {value!r}")
        low, high = (int(v) for v in value)
        return ((high & 0xFFFFFFFF) << 32) | (low & 0xFFFFFFFF)
    if isinstance(value, str):
        text = value.strip()
        try:
            if not text.lower().startswith("0x"):
                raise ValueError(text)
            number = int(text, 16)
        except ValueError:
            raise ValueError(f"{value!r} is not a LUID (write it as `dxg ls` prints it, e.g. "
                             "0x0000000100000002)") from None
    elif hasattr(value, "__index__"):
        number = value.__index__()
    else:
        raise TypeError(f"a LUID is an int, a string like '0x0000000100000002' or (low, high), "
                        f"not {type(value).__name__}")
    if not 0 <= number <= _LUID_MAX:
        raise ValueError(f"LUID {value!r} is out of range (64 bits)")
    return number


def luid_parts(value: Any) -> tuple[int, int]:
    """(low, high) of a LUID given in any form :func:`parse_luid` takes."""
    luid = parse_luid(value)
    return luid & 0xFFFFFFFF, luid >> 32


def luid_text(luid: int) -> str:
    """The LUID as ``dxg ls`` prints it."""
    return f"0x{luid:016x}"


def pick_adapter(adapters: Sequence[Any], which: Any) -> int:
    """The position in ``adapters`` (objects with ``.luid``) that ``which`` names: an index
    (0, 1, ... as an int) or a LUID (a string, ``(low, high)``, or an int that is not an
    index). Raises :class:`NoSuchAdapter` naming what this process can see."""
    if isinstance(which, str | tuple):
        luid = parse_luid(which)
        index = next((i for i, a in enumerate(adapters) if a.luid == luid), -1)
        what = f"LUID {luid_text(luid)}"
    elif hasattr(which, "__index__") and not isinstance(which, bool):
        number = which.__index__()
        if 0 <= number < len(adapters):
            return number
        index = next((i for i, a in enumerate(adapters) if a.luid == number), -1)
        what = f"index or LUID {number}"
    else:
        raise TypeError(f"an adapter index or LUID, not {type(which).__name__}")
    if index < 0:
        raise NoSuchAdapter(f"no such adapter: {what} ({_seen(adapters)})")
    return index


def _seen(adapters: Sequence[Any]) -> str:
    if not adapters:
        return "this process sees no adapters: `dxg ls` lists them"
    return (f"this process sees {len(adapters)}: indices 0..{len(adapters) - 1}, LUIDs "
            + ", ".join(luid_text(a.luid) for a in adapters))
