"""User memory for a socket client: the regions and descriptors its request carried, nothing else.

A socket client cannot be read or written by the node directly, so it sends the buffers its
struct's pointers refer to (see :mod:`dxg.uapi.wire`). :class:`RegionUserMemory` serves the
driver's copy_from_user/copy_to_user from them: a read must fall entirely inside one region the
client sent readable (REGION_IN), a write entirely inside one region it marked writable
(REGION_OUT); anything else is a :class:`~dxg.guest.usermem.UserMemoryFault`, which the driver
turns into ``-EFAULT`` exactly as the kernel would for a bad user pointer.

Writes land in the region's copy (a later read sees them, as in real memory) and are reported
by :meth:`RegionUserMemory.writes`: one write per touched region covering the span written, so
the reply never grows past the regions the request declared.

Descriptors: the client sends the ones the driver may take beside the request, each with the
number it has in the client; :meth:`take_fd` hands the driver a duplicate by that number. A
descriptor the driver gives the client (:meth:`give_fd_to_user`) goes back beside the reply with
a fixup saying where the client stores the number it gets (inside a writable region).
:meth:`close` releases every descriptor the accessor still holds.
"""

from __future__ import annotations

import bisect
import errno
import os
from collections.abc import Iterable, Sequence

from dxg.oslib.fds import close_all
from dxg.oslib.procmem import UserMemoryFault
from dxg.uapi.wire import FD_IN_USER, MAX_FDS, FdFixup, Region, Write

__all__ = ["RegionUserMemory"]


class _Backing:
    __slots__ = ("addr", "buf", "dirty_hi", "dirty_lo", "end", "readable", "writable")

    def __init__(self, region: Region) -> None:
        self.addr = region.addr
        self.end = region.addr + region.length
        self.readable = region.readable
        self.writable = region.writable
        self.buf = bytearray(region.data) if region.data is not None else bytearray(region.length)
        self.dirty_lo = self.end
        self.dirty_hi = self.addr


class RegionUserMemory:
    """:class:`~dxg.guest.usermem.UserMemory` over the regions of one request.

    ``regions`` must be sorted and non-overlapping, as :func:`dxg.uapi.wire.decode` guarantees.
    """

    def __init__(self, regions: Iterable[Region] = (), fds: Sequence[int] = (),
                 fd_numbers: Sequence[int] = ()) -> None:
        self._regions = [_Backing(r) for r in regions]
        self._starts = [b.addr for b in self._regions]
        for prev, cur in zip(self._regions, self._regions[1:], strict=False):
            if cur.addr < prev.end:
                raise ValueError("regions must be sorted and must not overlap")
        if len(fds) != len(fd_numbers):
            raise ValueError("one number per descriptor")
        self._in = dict(zip(fd_numbers, fds, strict=True))  # caller's number -> our descriptor
        self._out: list[int] = []
        self._fixups: list[FdFixup] = []

    def _find(self, addr: int, size: int, what: str) -> _Backing:
        if addr <= 0 or size < 0:
            raise UserMemoryFault(f"bad user {what} at 0x{addr:x} (+{size})")
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            b = self._regions[i]
            if addr + size <= b.end:
                return b
        raise UserMemoryFault(f"user {what} 0x{addr:x}+{size} is outside the buffers sent")

    def read(self, addr: int, size: int) -> bytes:
        if size == 0:
            return b""
        b = self._find(addr, size, "read")
        if not b.readable:
            raise UserMemoryFault(f"user buffer at 0x{b.addr:x} was not sent readable")
        off = addr - b.addr
        return bytes(b.buf[off : off + size])

    def write(self, addr: int, data: bytes) -> None:
        size = len(data)
        if size == 0:
            return
        b = self._find(addr, size, "write")
        if not b.writable:
            raise UserMemoryFault(f"user buffer at 0x{b.addr:x} is not writable")
        off = addr - b.addr
        b.buf[off : off + size] = data
        b.dirty_lo = min(b.dirty_lo, addr)
        b.dirty_hi = max(b.dirty_hi, addr + size)

    # ---- descriptors ----------------------------------------------------------------------------

    def take_fd(self, number: int) -> int:
        fd = self._in.get(number)
        if fd is None:
            raise OSError(errno.EBADF, f"descriptor {number} was not handed over with the call")
        return os.dup(fd)

    def give_fd_to_user(self, fd: int, addr: int, width: int = 8) -> None:
        try:
            b = self._find(addr, width, "descriptor slot")
            if not b.writable:
                raise UserMemoryFault(f"user buffer at 0x{b.addr:x} is not writable")
            if len(self._out) >= MAX_FDS:
                raise UserMemoryFault(f"more than {MAX_FDS} descriptors in one reply")
        except BaseException:
            os.close(fd)
            raise
        self._out.append(fd)
        self._fixups.append(FdFixup(FD_IN_USER, addr, width))

    def reply_fds(self) -> tuple[list[int], tuple[FdFixup, ...]]:
        """The descriptors for the reply and where the client stores their numbers."""
        return list(self._out), tuple(self._fixups)

    def close(self) -> None:
        close_all(self._in.values())
        close_all(self._out)
        self._in.clear()
        self._out.clear()
        self._fixups.clear()

    def writes(self) -> tuple[Write, ...]:
        """What the driver stored, as one write per touched region (in address order)."""
        out = []
        for b in self._regions:
            if b.dirty_hi > b.dirty_lo:
                lo, hi = b.dirty_lo - b.addr, b.dirty_hi - b.addr
                out.append(Write(b.dirty_lo, bytes(b.buf[lo:hi])))
        return tuple(out)
