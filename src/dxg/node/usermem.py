"""User memory for a socket client: the regions and descriptors its request carried, nothing else.

A socket client cannot be read or written by the node directly, so it sends the buffers its
struct's pointers refer to (see :mod:`dxg.uapi.wire`). :class:`RegionUserMemory` serves the
driver's copy_from_user/copy_to_user from them: a read must fall entirely inside one region the
client sent readable (REGION_IN), a write entirely inside one region it marked writable
(REGION_OUT); anything else is a :class:`~dxg.guest.usermem.UserMemoryFault`, which the driver
turns into ``-EFAULT`` exactly as the kernel would for a bad user pointer.

Writes are kept beside the request's bytes, not in a copy of each region: a region costs the node
only what the driver actually writes into it (an OUT-only region the client declared 4 MiB long
and the driver never touches costs nothing, however long the call waits). A later read sees
earlier writes, as in real memory. :meth:`RegionUserMemory.writes` reports them: one write per
touched region covering the span from the first to the last byte written, so the reply never
grows past the regions the request declared; inside that span, bytes the driver did not write
carry the region's data as sent (IN|OUT) or zero (OUT only), as the wire contract says.

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

from dxg.oslib.fds import close_all, close_foreign
from dxg.oslib.procmem import UserMemoryFault
from dxg.uapi.wire import (
    FD_IN_STRUCT,
    FD_IN_USER,
    MAP,
    MAP_READONLY,
    MAP_WITH_FD,
    MAX_FDS,
    MAX_MAPS,
    UNMAP,
    BlockMap,
    FdFixup,
    Region,
    Write,
)

__all__ = ["RegionUserMemory"]


class _Backing:
    """One region: the bytes the client sent (IN), and what the driver wrote into it (OUT), kept
    as sorted, disjoint, non-adjacent runs so that memory follows what is written."""

    __slots__ = ("addr", "data", "end", "readable", "run_bufs", "run_starts", "writable")

    def __init__(self, region: Region) -> None:
        self.addr = region.addr
        self.end = region.addr + region.length
        self.readable = region.readable
        self.writable = region.writable
        self.data = region.data  # the bytes sent (IN), shared with the request, never copied
        self.run_starts: list[int] = []  # offsets into the region
        self.run_bufs: list[bytearray] = []

    @property
    def written(self) -> int:
        return sum(len(b) for b in self.run_bufs)

    def base(self, lo: int, hi: int) -> bytearray:
        """The region's bytes lo..hi as sent (zero for an OUT-only region)."""
        if self.data is None:
            return bytearray(hi - lo)
        return bytearray(self.data[lo:hi])

    def store(self, off: int, data: bytes) -> None:
        end = off + len(data)
        starts, bufs = self.run_starts, self.run_bufs
        # runs that overlap or touch [off, end) merge with it into one
        first = bisect.bisect_left(starts, off)
        if first > 0 and starts[first - 1] + len(bufs[first - 1]) >= off:
            first -= 1
        last = bisect.bisect_right(starts, end)  # runs [first, last) start at or before end
        if first == last:
            starts.insert(first, off)
            bufs.insert(first, bytearray(data))
            return
        lo = min(off, starts[first])
        hi = max(end, starts[last - 1] + len(bufs[last - 1]))
        if last - first == 1 and lo == starts[first] and hi == lo + len(bufs[first]):
            bufs[first][off - lo : end - lo] = data  # inside one run: in place
            return
        merged = bytearray(hi - lo)
        for at, buf in zip(starts[first:last], bufs[first:last], strict=True):
            merged[at - lo : at - lo + len(buf)] = buf
        merged[off - lo : end - lo] = data
        starts[first:last] = [lo]
        bufs[first:last] = [merged]

    def load(self, off: int, size: int) -> bytes:
        """``size`` bytes at ``off``: as sent, with what was written since on top."""
        end = off + size
        starts, bufs = self.run_starts, self.run_bufs
        if not starts or starts[0] >= end or starts[-1] + len(bufs[-1]) <= off:
            return bytes(size) if self.data is None else self.data[off:end]  # nothing written
        out = self.base(off, end)
        i = max(bisect.bisect_right(starts, off) - 1, 0)
        while i < len(starts) and starts[i] < end:
            at, buf = starts[i], bufs[i]
            lo, hi = max(at, off), min(at + len(buf), end)
            if lo < hi:
                out[lo - off : hi - off] = buf[lo - at : hi - at]
            i += 1
        return bytes(out)

    def span(self) -> tuple[int, bytes] | None:
        """(offset, bytes) from the first to the last byte written, or None when untouched."""
        if not self.run_starts:
            return None
        lo = self.run_starts[0]
        hi = self.run_starts[-1] + len(self.run_bufs[-1])
        return lo, self.load(lo, hi - lo)


class RegionUserMemory:
    """:class:`~dxg.guest.usermem.UserMemory` over the regions of one request.

    ``regions`` must be sorted and non-overlapping, as :func:`dxg.uapi.wire.decode` guarantees.
    """

    def __init__(self, regions: Iterable[Region] = (), fds: Sequence[int] = (),
                 fd_numbers: Sequence[int] = ()) -> None:
        self._out: list[int] = []
        self._fixups: list[FdFixup] = []
        self._maps: list[BlockMap] = []
        self._map_fds: list[int] = []
        if not regions and not fds and not fd_numbers:  # a bare struct: nothing to index
            self._regions: list[_Backing] = []
            self._starts: list[int] = []
            self._in: dict[int, int] = {}
            return
        self._regions = [_Backing(r) for r in regions]
        self._starts = [b.addr for b in self._regions]
        for prev, cur in zip(self._regions, self._regions[1:], strict=False):
            if cur.addr < prev.end:
                raise ValueError("regions must be sorted and must not overlap")
        if len(fds) != len(fd_numbers):
            raise ValueError("one number per descriptor")
        self._in = dict(zip(fd_numbers, fds, strict=True))  # caller's number -> our descriptor

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
        return b.load(addr - b.addr, size)

    def write(self, addr: int, data: bytes) -> None:
        size = len(data)
        if size == 0:
            return
        b = self._find(addr, size, "write")
        if not b.writable:
            raise UserMemoryFault(f"user buffer at 0x{b.addr:x} is not writable")
        b.store(addr - b.addr, data)

    # ---- descriptors ----------------------------------------------------------------------------

    def take_fd(self, number: int) -> int:
        fd = self._in.get(number)
        if fd is None:
            raise OSError(errno.EBADF, f"descriptor {number} was not handed over with the call")
        return os.dup(fd)

    def give_fd_to_user(self, fd: int, addr: int, width: int = 8,
                        in_struct: bool = False) -> None:
        try:
            if not in_struct:
                b = self._find(addr, width, "descriptor slot")
                if not b.writable:
                    raise UserMemoryFault(f"user buffer at 0x{b.addr:x} is not writable")
            elif addr < 0 or width not in (4, 8):
                raise UserMemoryFault(f"bad descriptor slot +{addr} in the struct")
            if len(self._out) >= MAX_FDS:
                raise UserMemoryFault(f"more than {MAX_FDS} descriptors in one reply")
        except BaseException:
            os.close(fd)
            raise
        self._out.append(fd)
        self._fixups.append(FdFixup(FD_IN_STRUCT if in_struct else FD_IN_USER, addr, width))

    def reply_fds(self) -> tuple[list[int], tuple[FdFixup, ...]]:
        """The descriptors for the reply and where the client stores their numbers."""
        if not self._out:
            return [], ()
        return list(self._out), tuple(self._fixups)

    # ---- block maps -----------------------------------------------------------------------------

    def map_block(self, block: int, block_size: int, offset: int, where: int,
                  fd: int | None = None, readonly: bool = False, in_struct: bool = True) -> None:
        """Map ``block`` into the caller (with ``fd`` the first time; the accessor owns it from
        here) and store the address of its byte ``offset`` at ``where`` (a struct offset, or a
        user address in a writable region)."""
        try:
            if not in_struct:
                b = self._find(where, 8, "address slot")
                if not b.writable:
                    raise UserMemoryFault(f"user buffer at 0x{b.addr:x} is not writable")
            if len(self._maps) >= MAX_MAPS or (
                    fd is not None and len(self._out) + len(self._map_fds) >= MAX_FDS):
                raise UserMemoryFault("too many maps in one reply")
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        flags = (MAP_WITH_FD if fd is not None else 0) | (MAP_READONLY if readonly else 0)
        self._maps.append(BlockMap(MAP, block, block_size, offset, where,
                                   FD_IN_STRUCT if in_struct else FD_IN_USER, flags))
        if fd is not None:
            self._map_fds.append(fd)

    def unmap_block(self, block: int) -> bool:
        """Tell the caller ``block`` is gone; False when this reply has no room left."""
        if len(self._maps) >= MAX_MAPS:
            return False
        self._maps.append(BlockMap(UNMAP, block, 0, 0, 0, FD_IN_STRUCT, 0, 0))
        return True

    def reply_maps(self) -> tuple[tuple[BlockMap, ...], list[int]]:
        """The block maps for the reply and the descriptors of those that bring one."""
        return tuple(self._maps), list(self._map_fds)

    def close(self) -> None:
        """Close every descriptor the accessor still holds (closing again does nothing)."""
        if self._in:  # the caller's: off the loop unless a pipe or socket (dxg.oslib.fds)
            close_foreign(self._in.values())
            self._in.clear()
        if self._out:
            close_all(self._out)
            self._out.clear()
        self._fixups.clear()
        if self._map_fds:
            close_all(self._map_fds)
            self._map_fds.clear()
        self._maps.clear()

    def writes(self) -> tuple[Write, ...]:
        """What the driver stored, as one write per touched region (in address order)."""
        if not self._regions:
            return ()
        out = []
        for b in self._regions:
            span = b.span()
            if span is not None:
                out.append(Write(b.addr + span[0], span[1]))
        return tuple(out)

    @property
    def written_bytes(self) -> int:
        """Bytes this accessor holds for what the driver wrote (the request's own bytes aside)."""
        return sum(b.written for b in self._regions)
