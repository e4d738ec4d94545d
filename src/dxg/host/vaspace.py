"""GPU virtual address spaces: one per (process, adapter), made when first used.

A VA space holds reservations (page-aligned ranges of [VA_MIN, VA_MAX) that do not overlap) and,
inside them, mappings of allocation pages. RESERVEGPUVIRTUALADDRESS makes a reservation
(explicit); MAPGPUVIRTUALADDRESS maps into one (base given) or into fresh space, which becomes an
implicit reservation that lives as long as it holds a mapping; FREEGPUVIRTUALADDRESS frees one
reservation (exactly its range) with its mappings; UPDATEGPUVIRTUALADDRESS maps, unmaps, copies
and re-protects ranges inside reservations, all operations or none. Destroying an allocation
removes its mappings.

Engines reach memory only through `VaSpace.translate` (every access checked: unmapped, no-access,
read-only, evicted and discarded memory all raise `VaFault`) or `VaSpace.view` (a writable view
when the range lies in one allocation). A mapping with the ``zero`` protection bit is treated as
no-access: the soft adapter has no zero page. An allocation opened read-only from a shared
resource (dxg.host.share) is always mapped without the write bit, whatever the caller asks.

Each reservation and mapping is charged VA_ENTRY_BYTES of the guest's memory budget and counts
against HostConfig.max_va_entries.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from dxg.host.adapter import addressed
from dxg.host.call import Call, CommandFailed, Handler
from dxg.host.memory import expect_extra, ioctl_args, ioctl_reply, pages_ok
from dxg.protocol import messages as m
from dxg.protocol.commands import VgpuCommand
from dxg.uapi.handles import HandleType
from dxg.uapi.memory import PAGE_SIZE, VA_MAX, VA_MIN
from dxg.uapi.ntstatus import NTSTATUS
from dxg.uapi.structs import (
    d3dddi_mapgpuvirtualaddress,
    d3dddi_reservegpuvirtualaddress,
    d3dddi_updategpuvirtualaddress_operation,
    d3dddigpuva_reservation_type,
    d3dkmt_freegpuvirtualaddress,
    d3dkmt_updategpuvirtualaddress,
)

if TYPE_CHECKING:
    from dxg.host.adapter import HostAdapter
    from dxg.host.allocation import Allocation
    from dxg.host.partition import Partition
    from dxg.host.process import HostProcess

__all__ = ["HANDLERS", "VA_ENTRY_BYTES", "Mapping", "Reservation", "VaFault", "VaSpace",
           "drop_vaspace", "vaspace_of"]

INVALID = NTSTATUS.STATUS_INVALID_PARAMETER
CONFLICT = NTSTATUS.STATUS_CONFLICTING_ADDRESSES
OK = NTSTATUS.STATUS_SUCCESS
# What one reservation or mapping pins, against HostConfig.max_partition_bytes.
VA_ENTRY_BYTES = 192
_OP_MAP, _OP_UNMAP, _OP_COPY, _OP_MAP_PROTECT = 0, 1, 2, 3
_OP_SIZE = 64
_PROT_WRITE, _PROT_EXECUTE, _PROT_ZERO, _PROT_NO_ACCESS, _PROT_SYSTEM = 1, 2, 4, 8, 16
_PROT_KNOWN = 0x1F
_RESERVATION_TYPES = frozenset(int(t) for t in d3dddigpuva_reservation_type)
_MAX_UPDATE_OPS = 2048  # what the real driver queues in one call


class VaFault(Exception):
    """An access the VA space does not allow: ``va`` is the first address refused."""

    def __init__(self, va: int, why: str) -> None:
        super().__init__(f"GPU VA 0x{va:x}: {why}")
        self.va = va
        self.why = why


@dataclass(frozen=True, slots=True, eq=False)
class Mapping:
    """``size`` bytes at ``va`` show ``allocation`` from ``offset``."""

    va: int
    size: int
    allocation: Allocation
    offset: int
    protection: int  # d3dddigpuva_protection_type bits

    @property
    def end(self) -> int:
        return self.va + self.size

    @property
    def writable(self) -> bool:
        return bool(self.protection & _PROT_WRITE)

    @property
    def accessible(self) -> bool:
        return not self.protection & (_PROT_NO_ACCESS | _PROT_ZERO)

    def part(self, lo: int, hi: int) -> Mapping:
        """The part of this mapping in ``[lo, hi)`` (a new mapping)."""
        return Mapping(lo, hi - lo, self.allocation, self.offset + (lo - self.va),
                       self.protection)

    def moved(self, va: int) -> Mapping:
        return Mapping(va, self.size, self.allocation, self.offset, self.protection)


@dataclass(eq=False, slots=True)
class Reservation:
    base: int
    size: int
    implicit: bool = False  # made by a map into fresh space: goes with its last mapping
    starts: list[int] = field(default_factory=list)  # mapping VAs, sorted
    maps: list[Mapping] = field(default_factory=list)

    @property
    def end(self) -> int:
        return self.base + self.size

    def find(self, va: int) -> int:
        """Index of the mapping holding ``va``, or -1."""
        i = bisect.bisect_right(self.starts, va) - 1
        if i >= 0 and self.maps[i].end > va:
            return i
        return -1


def _clear(starts: list[int], maps: list[Mapping], lo: int, hi: int) -> None:
    """Remove ``[lo, hi)`` from the mappings in ``starts``/``maps`` (splitting at the edges)."""
    i = bisect.bisect_right(starts, lo) - 1
    if i >= 0 and maps[i].end > lo:
        mp = maps[i]
        pieces = [mp.part(mp.va, lo)] if mp.va < lo else []
        if mp.end > hi:
            pieces.append(mp.part(hi, mp.end))
        maps[i : i + 1] = pieces
        starts[i : i + 1] = [p.va for p in pieces]
    j = bisect.bisect_left(starts, lo)
    k = j
    while k < len(starts) and starts[k] < hi:
        k += 1
    if k > j:
        last = maps[k - 1]
        tail = [last.part(hi, last.end)] if last.end > hi else []
        maps[j:k] = tail
        starts[j:k] = [p.va for p in tail]


def _insert(starts: list[int], maps: list[Mapping], mp: Mapping) -> None:
    i = bisect.bisect_left(starts, mp.va)
    starts.insert(i, mp.va)
    maps.insert(i, mp)


@dataclass(frozen=True, slots=True)
class VaSnapshot:
    """An immutable copy of a VA space's accessible mappings: (va, end, the block's mapping,
    the offset of ``va`` in it, writable), sorted. Safe to use from any thread."""

    starts: tuple[int, ...]
    entries: tuple[tuple[int, int, Any, int, bool], ...]

    def view(self, va: int, nbytes: int, write: bool) -> memoryview:
        """``nbytes`` at ``va``, which must lie in one mapping (VaFault otherwise)."""
        if nbytes <= 0 or va < 0 or va + nbytes > VA_MAX:
            raise VaFault(va, "outside the VA space" if nbytes > 0 else "an empty range")
        i = bisect.bisect_right(self.starts, va) - 1
        if i < 0 or self.entries[i][1] <= va:
            raise VaFault(va, "not mapped")
        start, end, mapped, base, writable = self.entries[i]
        if va + nbytes > end:
            raise VaFault(end, "not mapped (the range runs past its mapping)")
        if write and not writable:
            raise VaFault(va, "read-only")
        at = base + (va - start)
        try:
            return memoryview(mapped)[at : at + nbytes]
        except ValueError:  # its block was closed meanwhile
            raise VaFault(va, "the memory went") from None


class VaSpace:
    """The GPU VA space of one process on one adapter."""

    def __init__(self, process: HostProcess, adapter: HostAdapter) -> None:
        self.process = process
        self.adapter = adapter
        self.bases: list[int] = []  # reservation bases, sorted
        self.reservations: list[Reservation] = []
        self.mappings = 0
        self.charged = 0  # entries charged to the partition
        self.hint = VA_MIN  # where the search for fresh space starts

    @property
    def entries(self) -> int:
        return len(self.reservations) + self.mappings

    # ---- lookups -------------------------------------------------------------------------------

    def reservation_at(self, va: int) -> Reservation | None:
        i = bisect.bisect_right(self.bases, va) - 1
        if i >= 0 and self.reservations[i].end > va:
            return self.reservations[i]
        return None

    def reservation_holding(self, lo: int, hi: int) -> Reservation | None:
        """The reservation that holds all of ``[lo, hi)``, or None."""
        r = self.reservation_at(lo)
        return r if r is not None and hi <= r.end else None

    def overlaps(self, lo: int, hi: int) -> bool:
        """Whether any reservation overlaps ``[lo, hi)``."""
        i = bisect.bisect_right(self.bases, lo) - 1
        if i >= 0 and self.reservations[i].end > lo:
            return True
        return i + 1 < len(self.bases) and self.bases[i + 1] < hi

    def find_space(self, size: int, lo: int, hi: int) -> int | None:
        """The lowest free, page-aligned base of ``size`` bytes in ``[lo, hi)`` (trying after the
        last one handed out first)."""
        lo = -(-max(lo, VA_MIN) // PAGE_SIZE) * PAGE_SIZE
        hi = min(hi, VA_MAX)
        if lo <= self.hint and self.hint + size <= hi and not self.overlaps(self.hint,
                                                                            self.hint + size):
            return self.hint
        at = lo
        i = bisect.bisect_right(self.bases, lo) - 1
        if i >= 0 and self.reservations[i].end > at:
            at = self.reservations[i].end
        for r in self.reservations[i + 1 :]:
            if at + size > hi:
                return None
            if r.base >= at + size:
                return at
            at = max(at, r.end)
        return at if at + size <= hi else None

    def translate(self, va: int, nbytes: int, write: bool) -> list[tuple[Allocation, int, int]]:
        """Where ``nbytes`` at ``va`` live: (allocation, offset in it, length) pieces in order.
        Raises VaFault for an address not mapped, not accessible, read-only on a write, or
        memory that is evicted or discarded."""
        if nbytes < 0 or va < 0 or va + nbytes > VA_MAX:
            raise VaFault(va, "outside the VA space")
        out: list[tuple[Allocation, int, int]] = []
        at, left = va, nbytes
        while left > 0:
            r = self.reservation_at(at)
            i = -1 if r is None else r.find(at)
            if r is None or i < 0:
                raise VaFault(at, "not mapped")
            mp = r.maps[i]
            if not mp.accessible:
                raise VaFault(at, "no access")
            if write and not mp.writable:
                raise VaFault(at, "read-only")
            a = mp.allocation
            if a.discarded:
                raise VaFault(at, "the allocation's memory was discarded")
            if not a.resident:
                raise VaFault(at, "the allocation is evicted")
            take = min(left, mp.end - at)
            offset = mp.offset + (at - mp.va)
            if out and out[-1][0] is a and out[-1][1] + out[-1][2] == offset:
                prev = out[-1]
                out[-1] = (a, prev[1], prev[2] + take)
            else:
                out.append((a, offset, take))
            at += take
            left -= take
        return out

    def view(self, va: int, nbytes: int, write: bool = True) -> memoryview | None:
        """A view of ``nbytes`` at ``va`` when they lie in one allocation (writable); None when
        they span several (use `translate`). Raises VaFault as `translate` does."""
        pieces = self.translate(va, nbytes, write)
        if len(pieces) != 1:
            return None if pieces else memoryview(b"")
        a, offset, length = pieces[0]
        return a.block.view(a.offset + offset, length)

    def snapshot(self) -> VaSnapshot:
        """The VA space as it is now, for work that runs off the loop (an engine job resolves
        its operands with it on a worker thread, as a GPU works from the page tables it was
        given): accessible mappings of resident, committed memory only."""
        entries = []
        for r in self.reservations:
            for mp in r.maps:
                a = mp.allocation
                if not mp.accessible or a.discarded or not a.resident or not a.alive:
                    continue
                entries.append((mp.va, mp.end, a.block.map, a.offset + mp.offset,
                                mp.writable))
        entries.sort(key=lambda e: e[0])
        return VaSnapshot(tuple(e[0] for e in entries), tuple(entries))

    # ---- changes -------------------------------------------------------------------------------

    def _account(self, p: Partition, entries: int) -> None:
        """Charge (or give back) the change to ``entries`` reservations + mappings."""
        if entries > self.charged:
            if entries > p.config.max_va_entries:
                raise CommandFailed(NTSTATUS.STATUS_NO_MEMORY,
                                    f"a VA space holds at most {p.config.max_va_entries} "
                                    "reservations and mappings")
            p.charge((entries - self.charged) * VA_ENTRY_BYTES, self.process)
        elif entries < self.charged:
            p.uncharge((self.charged - entries) * VA_ENTRY_BYTES, self.process)
        self.charged = entries

    def _add_reservation(self, r: Reservation) -> None:
        i = bisect.bisect_left(self.bases, r.base)
        self.bases.insert(i, r.base)
        self.reservations.insert(i, r)
        if r.end > self.hint:
            self.hint = r.end

    def _remove_reservation(self, r: Reservation) -> None:
        i = bisect.bisect_left(self.bases, r.base)
        if i < len(self.reservations) and self.reservations[i] is r:
            del self.bases[i]
            del self.reservations[i]
        for mp in r.maps:
            mp.allocation.mappings.discard(mp)
        self.mappings -= len(r.maps)
        r.maps = []
        r.starts = []

    def reserve(self, p: Partition, base: int, size: int, lo: int, hi: int,
                implicit: bool = False) -> Reservation:
        """A reservation of ``size`` bytes at ``base`` (0: anywhere in ``[lo, hi)``)."""
        if size <= 0 or not pages_ok(base, size):
            raise CommandFailed(INVALID, "VA range not page-aligned or empty")
        if base:
            if base < VA_MIN or base + size > VA_MAX:
                raise CommandFailed(INVALID, "VA range outside the VA space")
            if self.overlaps(base, base + size):
                raise CommandFailed(CONFLICT, "VA range overlaps a reservation")
        else:
            if lo == hi == 0:
                lo, hi = VA_MIN, VA_MAX
            elif hi == 0:
                hi = VA_MAX
            if hi > VA_MAX or lo >= hi:
                raise CommandFailed(INVALID, "bad VA bounds")
            found = self.find_space(size, lo, hi)
            if found is None:
                raise CommandFailed(NTSTATUS.STATUS_NO_MEMORY, "no free VA range that large")
            base = found
        self._account(p, self.entries + 1)
        r = Reservation(base, size, implicit)
        self._add_reservation(r)
        return r

    def free(self, p: Partition, base: int, size: int) -> None:
        r = self.reservation_at(base)
        if r is None or r.base != base or r.size != size:
            raise CommandFailed(INVALID, "not a reservation's exact range")
        self._remove_reservation(r)
        self._account(p, self.entries)

    def map(self, p: Partition, allocation: Allocation, offset: int, size: int,
            protection: int, base: int, lo: int, hi: int) -> int:
        """Map ``size`` bytes of ``allocation`` from ``offset`` at ``base`` (inside a
        reservation) or, with base 0, into fresh space in ``[lo, hi)``; returns the VA."""
        if base:
            if not pages_ok(base) or base + size > VA_MAX:
                raise CommandFailed(INVALID, "VA not page-aligned or outside the VA space")
            r = self.reservation_holding(base, base + size)
            if r is None:
                conflict = self.overlaps(base, base + size)
                raise CommandFailed(CONFLICT if conflict else INVALID,
                                    "VA range not inside one reservation")
            i = bisect.bisect_left(r.starts, base + size)
            if (i > 0 and r.maps[i - 1].end > base):
                raise CommandFailed(CONFLICT, "VA range already mapped")
            self._account(p, self.entries + 1)
        else:
            self._account(p, self.entries + 2)
            try:
                r = self.reserve(p, 0, size, lo, hi, implicit=True)
            except CommandFailed:
                self._account(p, self.entries)
                raise
            base = r.base
        mp = Mapping(base, size, allocation, offset, protection)
        _insert(r.starts, r.maps, mp)
        allocation.mappings.add(mp)
        self.mappings += 1
        self._account(p, self.entries)
        return base

    def unmap_allocation(self, p: Partition, allocation: Allocation) -> None:
        """Every mapping of ``allocation`` goes (it is being destroyed)."""
        for mp in list(allocation.mappings):
            r = self.reservation_at(mp.va)
            if r is None:
                continue
            i = r.find(mp.va)
            if i >= 0 and r.maps[i] is mp:
                del r.maps[i]
                del r.starts[i]
                self.mappings -= 1
            if r.implicit and not r.maps:
                self._remove_reservation(r)
        allocation.mappings.clear()
        self._account(p, self.entries)

    def update(self, p: Partition, ops: list[tuple[Any, ...]]) -> None:
        """Apply checked operations (see `_check_op`) all together: the new mapping lists are
        built aside, then swapped in at once."""
        work: dict[Reservation, tuple[list[int], list[Mapping]]] = {}

        def lists(r: Reservation) -> tuple[list[int], list[Mapping]]:
            got = work.get(r)
            if got is None:
                got = work[r] = (list(r.starts), list(r.maps))
            return got

        for op in ops:
            kind = op[0]
            if kind == _OP_COPY:
                _, src, size, dst, r_src, r_dst = op
                s_starts, s_maps = lists(r_src)
                pieces: list[Mapping] = []
                i = bisect.bisect_right(s_starts, src) - 1
                i = max(i, 0)
                while i < len(s_maps) and s_maps[i].va < src + size:
                    mp = s_maps[i]
                    lo, hi = max(mp.va, src), min(mp.end, src + size)
                    if lo < hi:
                        pieces.append(mp.part(lo, hi).moved(dst + (lo - src)))
                    i += 1
                d_starts, d_maps = lists(r_dst)
                _clear(d_starts, d_maps, dst, dst + size)
                for mp in pieces:
                    _insert(d_starts, d_maps, mp)
            else:
                _, base, size, r, new = op
                starts, maps = lists(r)
                _clear(starts, maps, base, base + size)
                if new is not None:
                    _insert(starts, maps, new)
        delta = sum(len(new[1]) - len(r.maps) for r, new in work.items())
        gone = [r for r, new in work.items() if r.implicit and not new[1]]
        self._account(p, self.entries + delta - len(gone))
        for r, (starts, maps) in work.items():
            old, fresh = set(r.maps), set(maps)
            for mp in old - fresh:
                mp.allocation.mappings.discard(mp)
            for mp in fresh - old:
                mp.allocation.mappings.add(mp)
            r.starts, r.maps = starts, maps
        self.mappings += delta
        for r in gone:
            self._remove_reservation(r)

    def drop(self, p: Partition) -> None:
        for r in list(self.reservations):
            self._remove_reservation(r)
        self._account(p, 0)

    def census(self) -> dict[str, int]:
        return {"adapter": self.adapter.index, "reservations": len(self.reservations),
                "mappings": self.mappings}


def vaspace_of(process: HostProcess, adapter: HostAdapter, create: bool = True) -> VaSpace | None:
    spaces = process.memory.vaspaces
    space = spaces.get(adapter.index)
    if space is None and create:
        space = spaces[adapter.index] = VaSpace(process, adapter)
    return space


def drop_vaspace(p: Partition, process: HostProcess, adapter_index: int) -> None:
    space = process.memory.vaspaces.pop(adapter_index, None)
    if space is not None:
        space.drop(p)


# ---- the commands ------------------------------------------------------------------------------


def _map_range(a: Allocation, offset: int, size: int) -> None:
    if size <= 0 or not pages_ok(offset, size) or offset > a.size or size > a.size - offset:
        raise CommandFailed(INVALID, "range outside the allocation")


def reserve_gpu_va(p: Partition, call: Call, body: m.IoctlArgs) -> m.IoctlArgsReturn:
    args = ioctl_args(body, d3dddi_reservegpuvirtualaddress)
    expect_extra(body.extra, 0, "RESERVEGPUVIRTUALADDRESS")
    process = p.process(call)
    adapter = addressed(p, call, args.adapter.v)
    if args.reservation_type not in _RESERVATION_TYPES:
        raise CommandFailed(INVALID, f"reservation type {args.reservation_type}")
    space = vaspace_of(process, adapter)
    assert space is not None
    r = space.reserve(p, args.base_address, args.size, args.minimum_address,
                      args.maximum_address)
    args.virtual_address = r.base
    args.paging_fence_value = 0
    return ioctl_reply(args)


def free_gpu_va(p: Partition, call: Call, body: m.IoctlArgs) -> m.IoctlArgsReturn:
    args = ioctl_args(body, d3dkmt_freegpuvirtualaddress)
    expect_extra(body.extra, 0, "FREEGPUVIRTUALADDRESS")
    process = p.process(call)
    adapter = addressed(p, call, args.adapter.v)
    space = vaspace_of(process, adapter, create=False)
    if space is None:
        raise CommandFailed(INVALID, "nothing reserved")
    space.free(p, args.base_address, args.size)
    return ioctl_reply(args)


def map_gpu_va(p: Partition, call: Call, body: m.IoctlArgs) -> m.IoctlArgsReturn:
    from dxg.host.allocation import allocation_of
    from dxg.host.pagingqueue import queue_of

    args = ioctl_args(body, d3dddi_mapgpuvirtualaddress)
    expect_extra(body.extra, 0, "MAPGPUVIRTUALADDRESS")
    process = p.process(call)
    queue = queue_of(p, process, args.paging_queue.v, call.adapter)
    a = allocation_of(p, process, args.allocation.v, queue.device)
    protection = int(args.protection.value)
    if protection & ~_PROT_KNOWN:
        raise CommandFailed(INVALID, "unknown protection bits")
    if a.readonly:  # opened without write access (dxg.host.share): the GPU only reads it
        protection &= ~_PROT_WRITE
    if args.offset_in_pages >= 1 << 52 or args.size_in_pages >= 1 << 52:
        raise CommandFailed(INVALID, "range outside the allocation")
    offset, size = args.offset_in_pages * PAGE_SIZE, args.size_in_pages * PAGE_SIZE
    _map_range(a, offset, size)
    space = vaspace_of(process, queue.device.adapter)
    assert space is not None
    args.virtual_address = space.map(p, a, offset, size, protection, args.base_address,
                                     args.minimum_address, args.maximum_address)
    args.paging_fence_value = queue.fence.value
    return ioctl_reply(args)


def _check_op(p: Partition, process: HostProcess, device: Any, space: VaSpace,
              op: d3dddi_updategpuvirtualaddress_operation) -> tuple[Any, ...]:
    """One operation, checked against the VA space as it is before the call."""
    from dxg.host.allocation import allocation_of

    kind = op.operation

    def inside(base: int, size: int) -> Reservation:
        if size <= 0 or not pages_ok(base, size) or base + size > VA_MAX:
            raise CommandFailed(INVALID, "VA range not page-aligned, empty or outside")
        r = space.reservation_holding(base, base + size)
        if r is None:
            raise CommandFailed(INVALID, "VA range not inside one reservation")
        return r

    if kind in (_OP_MAP, _OP_MAP_PROTECT):
        fields = op.map if kind == _OP_MAP else op.map_protect
        protection = int(op.map_protect.protection.value) if kind == _OP_MAP_PROTECT else (
            _PROT_WRITE)
        if protection & ~_PROT_KNOWN:
            raise CommandFailed(INVALID, "unknown protection bits")
        r = inside(fields.base_address, fields.size)
        a = allocation_of(p, process, fields.allocation.v, device)
        if fields.allocation_size != fields.size:
            raise CommandFailed(INVALID, "mapped and allocation sizes differ")
        _map_range(a, fields.allocation_offset, fields.allocation_size)
        if a.readonly:  # (dxg.host.share: opened without write access)
            protection &= ~_PROT_WRITE
        new = Mapping(fields.base_address, fields.size, a, fields.allocation_offset, protection)
        return (kind, fields.base_address, fields.size, r, new)
    if kind == _OP_UNMAP:
        r = inside(op.unmap.base_address, op.unmap.size)
        return (kind, op.unmap.base_address, op.unmap.size, r, None)
    if kind == _OP_COPY:
        c = op.copy
        r_src = inside(c.source_address, c.size)
        r_dst = inside(c.dest_address, c.size)
        if c.source_address < c.dest_address + c.size and c.dest_address < c.source_address + (
                c.size):
            raise CommandFailed(INVALID, "COPY ranges overlap")
        return (kind, c.source_address, c.size, c.dest_address, r_src, r_dst)
    raise CommandFailed(INVALID, f"VA operation {kind}")


def update_gpu_va(p: Partition, call: Call, body: m.IoctlArgs) -> m.IoctlArgsReturn:
    from dxg.host.device import device_of
    from dxg.host.pagingqueue import Fence

    args = ioctl_args(body, d3dkmt_updategpuvirtualaddress)
    process = p.process(call)
    device = device_of(p, process, args.device.v, call.adapter)
    count = args.num_operations
    if not 0 < count <= _MAX_UPDATE_OPS:
        raise CommandFailed(INVALID, f"{count} operations")
    expect_extra(body.extra, count * _OP_SIZE, "UPDATEGPUVIRTUALADDRESS")
    if args.context.v:
        context = p.handles.get(args.context.v, HandleType.CONTEXT)
        if context is None or context.device is not device:
            raise CommandFailed(NTSTATUS.STATUS_INVALID_HANDLE, "not this device's context")
    if args.fence_object.v:
        fence = p.handles.get(args.fence_object.v, HandleType.MONITOREDFENCE)
        if (not isinstance(fence, Fence) or fence.queue.device is not device
                or args.fence_value > fence.value):
            raise CommandFailed(INVALID, "not a reached fence of this device's paging queue")
    space = vaspace_of(process, device.adapter)
    assert space is not None
    ops = [_check_op(p, process, device, space,
                     d3dddi_updategpuvirtualaddress_operation.from_buffer_copy(
                         body.extra, i * _OP_SIZE))
           for i in range(count)]
    space.update(p, ops)
    return ioctl_reply(args)


HANDLERS: MappingProxyType[VgpuCommand, Handler] = MappingProxyType({
    VgpuCommand.RESERVEGPUVIRTUALADDRESS: reserve_gpu_va,
    VgpuCommand.MAPGPUVIRTUALADDRESS: map_gpu_va,
    VgpuCommand.FREEGPUVIRTUALADDRESS: free_gpu_va,
    VgpuCommand.UPDATEGPUVIRTUALADDRESS: update_gpu_va,
})
