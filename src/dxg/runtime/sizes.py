"""Byte sizes as people write them ("512M", "2G", 4096), for flags and the guest's policy file:
one parser, so that every place that takes a size accepts the same spellings."""

from __future__ import annotations

import re
from types import MappingProxyType

__all__ = ["SIZE_HELP", "format_size", "parse_size"]

SIZE_HELP = 'bytes, or a number with K, M, G or T (powers of 1024), e.g. "512M" or "1.5G"'
_UNITS = MappingProxyType({"": 0, "K": 10, "M": 20, "G": 30, "T": 40})
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", re.IGNORECASE)
_MAX = 1 << 62  # more than any machine's memory; keeps every sum within a u64


def parse_size(value: object) -> int:
    """A size in bytes from an int (bytes) or a string like "512M", "2GiB", "1.5G" or "4096";
    ValueError (saying what is accepted) for anything else. Fractions round down to a byte."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size (use {SIZE_HELP})")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and (match := _SIZE.fullmatch(value)):
        number, unit = match.groups()
        shift = _UNITS[unit.upper()]
        if "." in number:
            whole, frac = number.split(".")
            n = (int(whole) << shift) + (int(frac) << shift) // 10 ** len(frac)
        else:
            n = int(number) << shift
    else:
        raise ValueError(f"{value!r} is not a size (use {SIZE_HELP})")
    if not 0 <= n <= _MAX:
        raise ValueError(f"{value!r} is not a size between 0 and 4 EiB")
    return n


def format_size(n: int) -> str:
    """``n`` bytes in the largest unit that holds it exactly ("64M", "1536M", "4097"): what
    `parse_size` reads back as ``n``."""
    for unit in ("T", "G", "M", "K"):
        shift = _UNITS[unit]
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)
