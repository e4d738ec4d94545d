"""pydxg's own driver escapes: diagnostics every pydxg host serves, whatever its backend.

``D3DKMTEscape`` carries driver-private data from a user-mode driver to the host's kernel-mode
driver and back. A private data blob that starts with the header below is a pydxg escape: the
host answers it itself (tools and tests use them to exercise every layer with a real call), and
the guest moves the descriptors and bulk data it names. Anything else goes to the host's backend.

Header (32 bytes, little-endian), then the op's fields::

    0   u32 magic     "PDXE" (0x45584450)
    4   u16 version   1
    6   u16 op        Op below
    8   u32 status    out: the op's NTSTATUS (the ioctl itself succeeds when the escape arrived)
    12  u32 flags     FD_IN (1): ``fd`` names a descriptor of the caller that goes to the host
                      FD_OUT (2, out): ``fd`` now holds a descriptor the caller owns
                      DATA_AS_FD (4, out): the descriptor is a copy (the link to the host cannot
                      carry descriptors, so the host sent the bytes and the guest made a memfd)
    16  i64 fd        in: the caller's descriptor (FD_IN); out: the one it received (FD_OUT)
    24  u64 length    op-specific byte count
    32  op fields

Ops:

====  ==============  =============================================================================
1     PING            nothing: the smallest call that reaches the host and back
2     SLEEP           u32 milliseconds @32 (at most 600000): the host holds the call on a worker
                      thread that long (cut short when the caller goes): a long host command
3     SHMEM_CREATE    length = bytes: the host makes a shared memory region holding the bytes
                      0, 1, 2, ... (mod 251) and hands it over as a descriptor; out: u64 region
                      @32. Zero-copy on a local link; a copy (DATA_AS_FD) over TCP
4     SHMEM_READ      u64 region @32, u64 offset @40, length: the host's view of those bytes,
                      written at @48 (the private data must be 48 + length bytes)
5     SHMEM_WRITE     u64 region @32, u64 offset @40, length, bytes @48: written by the host
6     SHMEM_FREE      u64 region @32
7     EVENTFD_SIGNAL  FD_IN with an eventfd, u64 value @32 (1..MAX_EVENTFD_VALUE): the host adds
                      ``value`` to it (the caller sees its eventfd become readable); a counter
                      with no room for it: STATUS_DEVICE_BUSY; local links only
====  ==============  =============================================================================

A region belongs to the process that created it and goes with it; its bytes count against the
guest's memory budget on the host.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

__all__ = ["ESCAPE_HEADER", "ESCAPE_MAGIC", "ESCAPE_VERSION", "FD_OFFSET", "MAX_EVENTFD_VALUE",
           "MAX_SLEEP_MS", "EscapeFlags", "EscapeHeader", "Op", "is_pydxg_escape"]

ESCAPE_MAGIC = 0x45584450  # b"PDXE" little-endian
ESCAPE_VERSION = 1
ESCAPE_HEADER = struct.Struct("<IHHIIqQ")
FD_OFFSET = 16  # where the descriptor number sits in the private data
OP_FIELDS = ESCAPE_HEADER.size  # 32: where each op's own fields start
MAX_SLEEP_MS = 600_000
MAX_EVENTFD_VALUE = 1 << 32


class Op(IntEnum):
    PING = 1
    SLEEP = 2
    SHMEM_CREATE = 3
    SHMEM_READ = 4
    SHMEM_WRITE = 5
    SHMEM_FREE = 6
    EVENTFD_SIGNAL = 7


class EscapeFlags(IntFlag):
    NONE = 0
    FD_IN = 1
    FD_OUT = 2
    DATA_AS_FD = 4


@dataclass(frozen=True, slots=True)
class EscapeHeader:
    op: int
    status: int = 0
    flags: int = 0
    fd: int = -1
    length: int = 0
    version: int = ESCAPE_VERSION

    def pack(self) -> bytes:
        return ESCAPE_HEADER.pack(ESCAPE_MAGIC, self.version, self.op, self.status & 0xFFFFFFFF,
                                  self.flags, self.fd, self.length)

    @classmethod
    def unpack(cls, data: bytes) -> EscapeHeader:
        """The header at the start of ``data``; ValueError if it is not a pydxg escape."""
        if not is_pydxg_escape(data):
            raise ValueError("not a pydxg escape")
        _magic, version, op, status, flags, fd, length = ESCAPE_HEADER.unpack_from(data)
        return cls(op, status, flags, fd, length, version)


def is_pydxg_escape(data: bytes) -> bool:
    return len(data) >= ESCAPE_HEADER.size and \
        int.from_bytes(data[:4], "little") == ESCAPE_MAGIC
