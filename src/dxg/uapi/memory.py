"""Device memory facts shared by client, guest and host: the soft adapter's allocation private
data, pages, segment groups, GPU virtual address bounds and the driver's limits.

The real driver leaves an allocation's size and placement to the private data the user-mode and
kernel-mode drivers agree on. pydxg's soft adapters read this layout (documented in
``docs/memory.md``), little-endian, 16 bytes at the start of an allocation's ``priv_drv_data``::

    0   u32 magic    0x41584450 (the bytes "PDXA")
    4   u16 version  1
    6   u16 flags    ALLOC_NONLOCAL (1): place in the non-local segment group;
                     ALLOC_CACHED (2): CPU mappings are cached (all mappings of the soft adapter
                     are: the flag is reported back)
    8   u64 size     bytes (rounded up to whole pages)

Private data longer than 16 bytes travels to the host and back unchanged after the header. A
standard allocation (``standard_allocation`` flag, type EXISTINGHEAP) names its size in the
heap data instead and carries no private data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Self

__all__ = [
    "ALLOC_CACHED",
    "ALLOC_DESC",
    "ALLOC_FLAGS",
    "ALLOC_MAGIC",
    "ALLOC_NONLOCAL",
    "ALLOC_VERSION",
    "CREATEALLOCATION_MAX",
    "GROUP_LOCAL",
    "GROUP_NONLOCAL",
    "MAKERESIDENT_ALLOC_MAX",
    "PAGE_SIZE",
    "PRIORITY_HIGH",
    "PRIORITY_LOW",
    "PRIORITY_MAXIMUM",
    "PRIORITY_MINIMUM",
    "PRIORITY_NORMAL",
    "VA_MAX",
    "VA_MIN",
    "AllocDesc",
    "pages",
    "round_up",
]

PAGE_SIZE = 4096
ALLOC_MAGIC = 0x41584450
ALLOC_VERSION = 1
ALLOC_NONLOCAL = 1
ALLOC_CACHED = 2
ALLOC_FLAGS = ALLOC_NONLOCAL | ALLOC_CACHED
ALLOC_DESC = struct.Struct("<IHHQ")

# enum d3dkmt_memory_segment_group
GROUP_LOCAL = 0
GROUP_NONLOCAL = 1

# D3DDDI_ALLOCATIONPRIORITY_* (d3dukmdt.h): the usual allocation priorities. Any u32 is a priority
# (higher stays in local memory longer); 0, which CreateAllocation's zeroed info carries, counts
# as NORMAL.
PRIORITY_MINIMUM = 0x28000000
PRIORITY_LOW = 0x50000000
PRIORITY_NORMAL = 0x78000000
PRIORITY_HIGH = 0xA0000000
PRIORITY_MAXIMUM = 0xC8000000

# The real driver's limits (d3dkmthk.h).
CREATEALLOCATION_MAX = 1024  # D3DKMT_CREATEALLOCATION_MAX
MAKERESIDENT_ALLOC_MAX = 10240  # D3DKMT_MAKERESIDENT_ALLOC_MAX

# One GPU virtual address space per process and adapter: page-granular, [VA_MIN, VA_MAX).
# Address 0 and the first 64 KiB are never handed out, so a zero VA is always a fault.
VA_MIN = 1 << 16
VA_MAX = 1 << 47


def round_up(n: int, to: int = PAGE_SIZE) -> int:
    return -(-n // to) * to


def pages(n: int) -> int:
    return -(-n // PAGE_SIZE)


@dataclass(frozen=True, slots=True)
class AllocDesc:
    """The 16-byte head of a soft adapter allocation's private data."""

    size: int
    flags: int = 0
    version: int = ALLOC_VERSION

    def pack(self) -> bytes:
        return ALLOC_DESC.pack(ALLOC_MAGIC, self.version, self.flags, self.size)

    @classmethod
    def unpack(cls, data: bytes) -> Self | None:
        """The head of ``data``, or None when it is not one (too short, wrong magic)."""
        if len(data) < ALLOC_DESC.size:
            return None
        magic, version, flags, size = ALLOC_DESC.unpack_from(data)
        if magic != ALLOC_MAGIC:
            return None
        return cls(size, flags, version)
