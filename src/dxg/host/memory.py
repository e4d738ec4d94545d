"""Device memory on the host: shared-memory blocks, the arenas small allocations are carved from,
fence blocks, each adapter's segments, and the helpers the memory commands share.

Blocks. Every byte of an allocation lives in a `Block`: a memfd of fixed size, sealed against
shrinking and growing (a client that maps it can never make the host's mapping fault), mapped
read-write by the host. A block's id is a per-process counter, never reused, so a guest or client
can cache its mapping by id. Allocations of at most ``HostConfig.arena_max_allocation`` bytes are
carved page-aligned, first fit, from per-(process, adapter) arenas (4 MiB first, then each twice
the largest up to 64 MiB); larger ones get a block of their own. A freed range is punched
(``MADV_REMOVE``): its pages go back to the OS at once, even while a client still maps the
block, and read zero when the range is used again. One empty arena per (process, adapter) is
kept; the others are closed. Fence blocks (64 KiB of 8-byte little-endian slots) hold paging
fence values that clients read without a call.

Segments. Each `HostAdapter` has two segment groups, local (``dedicated_video_memory``) and
non-local (``shared_system_memory``), shared by every guest of the host. A `Usage` is one
process's committed bytes and reservation per group on one adapter. For process P and group g:

    reserved_unused(Q, g) = max(0, reservation(Q, g) - committed(Q, g))
    room(P, g)            = capacity(g) - committed(g) - sum over Q != P of reserved_unused(Q, g)

An allocation of n bytes fits when n <= room(P, g). What QUERYVIDEOMEMORYINFO answers (and the
census reports: `Segments.info`, the one function for both):

    budget                    = capacity(g)
    current_usage             = committed(P, g)
    current_reservation       = reservation(P, g)
    available_for_reservation = max(0, room(P, g) + committed(P, g))
                              = max(0, capacity(g) - sum over Q != P of
                                       max(committed(Q, g), reservation(Q, g)))

A process under memory quotas (dxg.host.quota: its own, its account's, its guest's) must also
fit what they leave, left(P), and is told less:

    budget                    = min(capacity(g), committed(P, g) + left(P))
    available_for_reservation = min(budget, max(0, room(P, g) + committed(P, g)))
    GETSEGMENTSIZE            = min(capacity(g), the lowest quota that binds P)   (`sizes`)

CHANGEVIDEOMEMORYRESERVATION may set a reservation up to available_for_reservation. When an
allocation does not fit, offered allocations of that group on the adapter (any process, any
guest; lowest offer priority first, then the oldest offer) are discarded until it does, or none
is when even all of them would not make room. Before that, allocations of lower priority may be
demoted from the local group to the non-local one (dxg.host.placement).

Fence blocks (and shared memory: dxg.host.share) are handed to clients only as descriptors opened
O_RDONLY (`readonly_fd`), their mode 0444: no client can map one writable, so a fence value every
holder reads without a call is written by the host alone.

Allocation memory is accounted by the segments only (not against the partition's object budget,
which counts the host objects: see dxg.host.partition.OBJECT_BYTES). Everything here runs on the
host's event loop.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import fcntl
import mmap
import os
import struct
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from dxg.host.call import CommandFailed
from dxg.host.quota import Bound, GuestLedgers, Ledger, ProcessQuota, left_of
from dxg.protocol import messages as m
from dxg.uapi.memory import GROUP_LOCAL, GROUP_NONLOCAL, PAGE_SIZE
from dxg.uapi.ntstatus import NTSTATUS

if TYPE_CHECKING:
    from dxg.host.config import HostConfig

__all__ = [
    "FENCE_BLOCK_BYTES",
    "GROUPS",
    "GROUP_NAMES",
    "READ_ONLY_MODE",
    "Arena",
    "Block",
    "FenceBlock",
    "ProcessMemory",
    "Segments",
    "Usage",
    "ioctl_args",
    "ioctl_reply",
    "readonly_fd",
    "u32_array",
]

GROUPS = (GROUP_LOCAL, GROUP_NONLOCAL)
GROUP_NAMES = ("local", "nonlocal")
FENCE_BLOCK_BYTES = 64 << 10
FENCE_SLOT_BYTES = 8
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
# The mode of blocks clients may only read (fence blocks, shared memory): nobody but root can
# reopen one for writing through /proc from the read-only descriptor it was given.
READ_ONLY_MODE = 0o444
_INVALID = NTSTATUS.STATUS_INVALID_PARAMETER

_S = TypeVar("_S", bound=ctypes.Structure)


# ---- blocks --------------------------------------------------------------------------------------


def _same_file(fd: int, st: os.stat_result) -> bool:
    try:
        other = os.fstat(fd)
    except OSError:
        return False
    return (other.st_ino, other.st_dev) == (st.st_ino, st.st_dev)


def _map(fd: int, size: int) -> tuple[mmap.mmap, int]:
    """Map ``fd`` shared, read-write: (the mapping, the descriptor it keeps, or -1).

    Python's mmap keeps a duplicate of the descriptor it maps, which it does not show; a block
    would cost two descriptors. The duplicate takes the lowest free number (F_DUPFD_CLOEXEC, as
    os.dup), so that number is taken and given back just before, and checked after: a
    descriptor of this fresh memfd other than ``fd`` can only be the mapping's. Should another
    thread take the number first, every descriptor is looked at."""
    st = os.fstat(fd)
    probe = os.dup(fd)
    os.close(probe)
    mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    if probe != fd and _same_file(probe, st):
        return mapping, probe
    for name in os.listdir("/proc/self/fd"):
        n = int(name)
        if n != fd and _same_file(n, st):
            return mapping, n
    return mapping, -1


class Block:
    """One sealed memfd of ``size`` bytes and the host's mapping of it: one descriptor, ``fd``
    (the mapping's own; hand out duplicates)."""

    __slots__ = ("_own_fd", "adapter", "fd", "id", "kind", "map", "size")

    def __init__(self, block_id: int, size: int, kind: str, adapter: int) -> None:
        fd = os.memfd_create(f"pydxg-{kind}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            self.map, kept = _map(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self._own_fd = kept < 0
        if kept >= 0:
            os.close(fd)
            fd = kept
        self.fd = fd
        self.id = block_id
        self.size = size
        self.kind = kind  # "arena", "dedicated" or "fence"
        self.adapter = adapter  # adapter index

    def __repr__(self) -> str:
        return f"<Block {self.id} {self.kind} {self.size}>"

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def punch(self, offset: int, length: int) -> None:
        """Give the pages of ``[offset, offset + length)`` back to the OS; they read zero."""
        if length > 0 and self.fd >= 0:
            self.map.madvise(mmap.MADV_REMOVE, offset, length)

    def read(self, offset: int, length: int) -> bytes:
        return self.map[offset : offset + length]

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self.map[offset : offset + len(data)] = data

    def view(self, offset: int, length: int) -> memoryview:
        """A writable view of ``[offset, offset + length)`` (release it when done)."""
        return memoryview(self.map)[offset : offset + length]

    def ref(self, offset: int) -> m.BlockRef:
        return m.BlockRef(self.id, self.size, offset)

    def close(self) -> None:
        """Punch every page, then unmap and close. Idempotent. A view still held keeps the
        (empty) mapping and its descriptor until the view is released."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError, ValueError):
            self.punch(0, self.size)
        with contextlib.suppress(BufferError):
            self.map.close()  # closes its descriptor (else the last view's release does)
        if self._own_fd:
            os.close(self.fd)
        self.fd = -1


def readonly_fd(block: Block) -> int:
    """A new descriptor of ``block`` opened O_RDONLY (through /proc: a memfd has no path), so
    that whoever gets it can map it only read-only (mmap or mprotect for writing: EACCES)."""
    try:
        return os.open(f"/proc/self/fd/{block.fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise CommandFailed(NTSTATUS.STATUS_NO_MEMORY, f"no read-only descriptor: {e}") from None


class Arena:
    """A block that small allocations are carved from: page-aligned ranges, first fit, free
    ranges coalesced."""

    __slots__ = ("block", "lens", "starts", "used")

    def __init__(self, block: Block) -> None:
        self.block = block
        self.starts: list[int] = [0]  # free ranges, by offset
        self.lens: list[int] = [block.size]
        self.used = 0

    def carve(self, size: int) -> int | None:
        """The offset of a free range of ``size`` bytes, now taken; None when none is free."""
        lens = self.lens
        for i, length in enumerate(lens):
            if length >= size:
                offset = self.starts[i]
                if length == size:
                    del self.starts[i]
                    del lens[i]
                else:
                    self.starts[i] = offset + size
                    lens[i] = length - size
                self.used += size
                return offset
        return None

    def release(self, offset: int, size: int) -> None:
        self.block.punch(offset, size)
        self.used -= size
        starts, lens = self.starts, self.lens
        i = bisect.bisect_left(starts, offset)
        if i > 0 and starts[i - 1] + lens[i - 1] == offset:
            i -= 1
            lens[i] += size
        else:
            starts.insert(i, offset)
            lens.insert(i, size)
        if i + 1 < len(starts) and starts[i] + lens[i] == starts[i + 1]:
            lens[i] += lens[i + 1]
            del starts[i + 1]
            del lens[i + 1]


class FenceBlock:
    """A block of 8-byte fence slots (u64 little-endian values)."""

    __slots__ = ("block", "free", "used", "words")

    def __init__(self, block: Block) -> None:
        self.block = block
        self.words: memoryview = memoryview(block.map).cast("Q")  # one aligned store per write
        slots = block.size // FENCE_SLOT_BYTES
        self.free: list[int] = list(range(slots - 1, -1, -1))  # pop() hands out slot 0 first
        self.used = 0

    def write(self, index: int, value: int) -> None:
        if not self.block.closed:
            self.words[index] = value & 0xFFFFFFFFFFFFFFFF

    def read(self, index: int) -> int:
        return int(self.words[index]) if not self.block.closed else 0

    def close(self) -> None:
        self.words.release()
        self.block.close()


# ---- segments ------------------------------------------------------------------------------------


class Placed(Protocol):
    """What `Segments.hold` needs of an allocation (dxg.host.allocation)."""

    group: int
    size: int
    usage: Usage

    @property
    def wants_local(self) -> bool: ...


class Offered(Protocol):
    """What `Segments.make_room` needs of an offered allocation (dxg.host.allocation)."""

    group: int
    size: int
    usage: Usage
    offer_priority: int
    offer_seq: int

    def discard(self) -> None: ...


class Usage:
    """One process's committed bytes and reservation, per segment group, on one adapter, and
    the ledgers its commitments count in (dxg.host.quota): its own, its account's, its
    guest's, with the bounds that apply to it."""

    __slots__ = ("adapter", "bounds", "committed", "demoted_bytes", "ledgers", "promoted_bytes",
                 "reservation", "segments")

    def __init__(self, segments: Segments, adapter: int,
                 ledgers: tuple[Ledger, ...] = (), bounds: tuple[Bound, ...] = ()) -> None:
        self.segments = segments
        self.adapter = adapter
        self.committed = [0, 0]
        self.reservation = [0, 0]
        self.ledgers = ledgers
        self.bounds = bounds
        # Bytes of the process's allocations the memory manager moved out of the local group
        # to make room for ones of higher priority, and back in (dxg.host.placement).
        self.demoted_bytes = 0
        self.promoted_bytes = 0

    def unused(self, group: int) -> int:
        return max(0, self.reservation[group] - self.committed[group])

    def left(self) -> int | None:
        """Bytes the quotas still let the process commit on the adapter (None: no quota)."""
        return left_of(self.bounds)

    def limit(self) -> int | None:
        """The lowest quota that binds the process on the adapter (None: none does)."""
        return min((limit for _, limit in self.bounds), default=None)

    def census(self) -> dict[str, int | None]:
        segments = self.segments
        local = segments.info(GROUP_LOCAL, self)
        nonlocal_ = segments.info(GROUP_NONLOCAL, self)
        return {
            "adapter": self.adapter,
            "local": self.committed[GROUP_LOCAL],
            "nonlocal": self.committed[GROUP_NONLOCAL],
            "local_reservation": self.reservation[GROUP_LOCAL],
            "nonlocal_reservation": self.reservation[GROUP_NONLOCAL],
            # What QUERYVIDEOMEMORYINFO answers this process (Segments.info), and the quota
            # that binds it (None: none).
            "local_budget": local[0],
            "nonlocal_budget": nonlocal_[0],
            "local_available": local[3],
            "nonlocal_available": nonlocal_[3],
            "limit": self.limit(),
            "left": self.left(),
        }


class Segments:
    """The two segment groups of one adapter, host-wide (every guest's processes)."""

    def __init__(self, local_bytes: int, nonlocal_bytes: int) -> None:
        self.capacity = (local_bytes, nonlocal_bytes)
        self.committed = [0, 0]
        self.usages: dict[Usage, None] = {}  # every process using the adapter (ordered set)
        # Sum over the usages of max(0, reservation - committed), per group.
        self.unused_reserved = [0, 0]
        self.offered: dict[Any, None] = {}  # offered, not yet discarded (oldest first)
        self.offer_seq = 0
        # Allocations committed in the local group (oldest first), and those committed in the
        # non-local group that want the local one (demoted, or placed there when it was full):
        # what dxg.host.placement moves by priority.
        self.local: dict[Any, None] = {}
        self.demoted: dict[Any, None] = {}

    def join(self, usage: Usage) -> None:
        self.usages[usage] = None

    def leave(self, usage: Usage) -> None:
        """The process goes: its reservation ends (its allocations went before)."""
        for g in GROUPS:
            self._update(usage, g, 0, 0)
        self.usages.pop(usage, None)

    def _update(self, usage: Usage, group: int, committed: int, reservation: int) -> None:
        """Set a usage's numbers; keeps the totals and the quota ledgers (the one place a
        commitment changes, so every count is what the segments hold)."""
        before = usage.unused(group)
        delta = committed - usage.committed[group]
        self.committed[group] += delta
        for ledger in usage.ledgers:
            ledger.used += delta
        usage.committed[group] = committed
        usage.reservation[group] = reservation
        self.unused_reserved[group] += usage.unused(group) - before

    def commit(self, usage: Usage, group: int, nbytes: int) -> None:
        self._update(usage, group, usage.committed[group] + nbytes, usage.reservation[group])

    def uncommit(self, usage: Usage, group: int, nbytes: int) -> None:
        self._update(usage, group, max(0, usage.committed[group] - nbytes),
                     usage.reservation[group])

    def hold(self, a: Placed, group: int) -> None:
        """``a``'s bytes are committed in ``group`` (it was committed nowhere)."""
        self.commit(a.usage, group, a.size)
        a.group = group
        if group == GROUP_LOCAL:
            self.local[a] = None
        elif a.wants_local:
            self.demoted[a] = None

    def unhold(self, a: Placed) -> None:
        """``a``'s bytes are committed nowhere any more (freed or discarded)."""
        self.uncommit(a.usage, a.group, a.size)
        self.local.pop(a, None)
        self.demoted.pop(a, None)

    def reserve(self, usage: Usage, group: int, nbytes: int) -> None:
        self._update(usage, group, usage.committed[group], nbytes)

    def room(self, group: int, usage: Usage) -> int:
        others = self.unused_reserved[group] - usage.unused(group)
        return self.capacity[group] - self.committed[group] - others

    def info(self, group: int, usage: Usage) -> tuple[int, int, int, int]:
        """(budget, current_usage, current_reservation, available_for_reservation) of
        ``usage``'s process: QUERYVIDEOMEMORYINFO, CHANGEVIDEOMEMORYRESERVATION and the census.
        The one function behind every figure a process is told about its memory: the budget is
        the capacity, or less under a quota (what it has in the group plus what its quotas still
        let it commit); nothing is available beyond the budget."""
        committed = usage.committed[group]
        budget = self.capacity[group]
        left = usage.left()
        if left is not None:
            budget = min(budget, committed + left)
        available = min(budget, max(0, self.room(group, usage) + committed))
        return budget, committed, usage.reservation[group], available

    def sizes(self, usage: Usage) -> tuple[int, int]:
        """(local, non-local) segment sizes as ``usage``'s process is told them
        (GETSEGMENTSIZE): the capacities, or the quota that binds it when that is lower. The
        most it could ever have; its budget (`info`) is what it may have now."""
        limit = usage.limit()
        if limit is None:
            return self.capacity[GROUP_LOCAL], self.capacity[GROUP_NONLOCAL]
        return min(self.capacity[GROUP_LOCAL], limit), min(self.capacity[GROUP_NONLOCAL], limit)

    def within_quota(self, usage: Usage, nbytes: int) -> bool:
        left = usage.left()
        return left is None or nbytes <= left

    def make_quota_room(self, usage: Usage, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit ``usage``'s quotas, after discarding offered allocations
        charged to a quota that is short (of the process, its account or its guest; lowest
        offer priority first, then the oldest). Nothing is discarded when even all of them
        would not make room."""
        short = [(ledger, limit) for ledger, limit in usage.bounds
                 if ledger.used + nbytes > limit]
        if not short:
            return True
        projected = {id(ledger): ledger.used for ledger, _ in short}
        chosen: list[Offered] = []
        for victim in sorted(self.offered, key=lambda a: (a.offer_priority, a.offer_seq)):
            mine = [id(ledger) for ledger in victim.usage.ledgers if id(ledger) in projected]
            if not any(id(ledger) in mine and projected[id(ledger)] + nbytes > limit
                       for ledger, limit in short):
                continue  # discarding it would not help a quota that is short
            chosen.append(victim)
            for key in mine:
                projected[key] -= victim.size
            if all(projected[id(ledger)] + nbytes <= limit for ledger, limit in short):
                for a in chosen:
                    a.discard()
                return True
        return False

    def make_room(self, group: int, usage: Usage, nbytes: int) -> bool:
        """Whether ``nbytes`` fit in ``group`` for ``usage``'s process, after discarding offered
        allocations if needed (lowest offer priority first, then oldest). Nothing is discarded
        when even all of them would not make room."""
        room = self.room(group, usage)
        if nbytes <= room:
            return True
        candidates = sorted((a for a in self.offered if a.group == group),
                            key=lambda a: (a.offer_priority, a.offer_seq))
        committed = self.committed[group]
        others = self.unused_reserved[group] - usage.unused(group)
        projected: dict[Usage, int] = {}
        chosen: list[Offered] = []
        for victim in candidates:
            owner = victim.usage
            was = projected.get(owner, owner.committed[group])
            now = max(0, was - victim.size)
            projected[owner] = now
            if owner is not usage:
                res = owner.reservation[group]
                others += max(0, res - now) - max(0, res - was)
            committed -= victim.size
            chosen.append(victim)
            if nbytes <= self.capacity[group] - committed - others:
                for a in chosen:
                    a.discard()
                return True
        return False

    def census(self) -> dict[str, dict[str, int]]:
        return {name: {"total": self.capacity[g], "used": self.committed[g]}
                for g, name in zip(GROUPS, GROUP_NAMES, strict=True)}


# ---- one process's memory ---------------------------------------------------------------------


class ProcessMemory:
    """A process's blocks (arenas, dedicated, fence), its usages per adapter and its GPU VA
    spaces (dxg.host.vaspace), keyed by adapter index."""

    __slots__ = ("arenas", "block_bytes", "block_ids", "blocks", "fences", "ledgers",
                 "paged_gone", "quota", "usages", "vaspaces")

    def __init__(self) -> None:
        # The quotas its guest asked for it (PYDXG_SETPROCESSQUOTA), and its partition's shared
        # ledgers (dxg.host.quota); None: no quota binds it (a process made outside a partition).
        self.quota = ProcessQuota()
        self.ledgers: GuestLedgers | None = None
        self.block_ids = 0
        self.blocks: dict[int, Block] = {}
        self.block_bytes = 0
        self.arenas: dict[int, list[Arena]] = {}
        self.fences: dict[int, list[FenceBlock]] = {}
        self.usages: dict[int, Usage] = {}
        self.vaspaces: dict[int, Any] = {}  # adapter index -> VaSpace
        # adapter index -> [demoted, promoted] bytes of usages that went (statistics outlive them)
        self.paged_gone: dict[int, list[int]] = {}

    # blocks
    def _new_block(self, config: HostConfig, size: int, kind: str, adapter: int) -> Block:
        if len(self.blocks) >= config.max_blocks_per_process:
            raise CommandFailed(NTSTATUS.STATUS_NO_MEMORY,
                                f"a process may hold {config.max_blocks_per_process} blocks")
        try:
            block = Block(self.block_ids + 1, size, kind, adapter)
        except OSError as e:
            raise CommandFailed(NTSTATUS.STATUS_NO_MEMORY, f"no shared memory: {e}") from None
        self.block_ids += 1
        self.blocks[block.id] = block
        self.block_bytes += size
        return block

    def _close_block(self, block: Block) -> None:
        if self.blocks.pop(block.id, None) is not None:
            self.block_bytes -= block.size
        block.close()

    def place(self, config: HostConfig, adapter: int,
              size: int) -> tuple[Block, int, Arena | None]:
        """Memory for an allocation of ``size`` bytes (whole pages): (block, offset, arena)."""
        if size > config.arena_max_allocation:
            return self._new_block(config, size, "dedicated", adapter), 0, None
        arenas = self.arenas.setdefault(adapter, [])
        for arena in arenas:
            offset = arena.carve(size)
            if offset is not None:
                arena.block.punch(offset, size)  # zero, whatever a client wrote to free space
                return arena.block, offset, arena
        largest = max((a.block.size for a in arenas), default=0)
        arena_size = min(config.arena_max_bytes, max(config.arena_min_bytes, 2 * largest))
        arena = Arena(self._new_block(config, arena_size, "arena", adapter))
        arenas.append(arena)
        offset = arena.carve(size)
        assert offset == 0
        return arena.block, offset, arena

    def release(self, block: Block, offset: int, size: int, arena: Arena | None) -> None:
        """The memory of an allocation goes back (punched)."""
        if arena is None:
            self._close_block(block)
            return
        arena.release(offset, size)
        if arena.used == 0:
            arenas = self.arenas.get(block.adapter, [])
            if any(a is not arena and a.used == 0 for a in arenas):
                arenas.remove(arena)
                self._close_block(block)

    # fences
    def fence_slot(self, config: HostConfig, adapter: int) -> tuple[FenceBlock, int]:
        fences = self.fences.setdefault(adapter, [])
        for fb in fences:
            if fb.free:
                break
        else:
            block = self._new_block(config, FENCE_BLOCK_BYTES, "fence", adapter)
            try:
                os.fchmod(block.fd, READ_ONLY_MODE)  # (only the host writes fence values)
            except OSError:
                self._close_block(block)
                raise CommandFailed(NTSTATUS.STATUS_NO_MEMORY, "cannot protect a fence block") \
                    from None
            fb = FenceBlock(block)
            fences.append(fb)
        index = fb.free.pop()
        fb.used += 1
        fb.write(index, 0)
        return fb, index

    def free_fence_slot(self, fb: FenceBlock, index: int) -> None:
        fb.write(index, 0)
        fb.free.append(index)
        fb.used -= 1
        fences = self.fences.get(fb.block.adapter, [])
        if fb.used == 0 and len(fences) > 1 and fb in fences:
            fences.remove(fb)
            self._drop_fence_block(fb)

    def _drop_fence_block(self, fb: FenceBlock) -> None:
        self.blocks.pop(fb.block.id, None)
        self.block_bytes -= fb.block.size
        fb.close()

    # usage
    def _counted_in(self, adapter: int, hold: bool) -> tuple[tuple[Ledger, ...],
                                                             tuple[Bound, ...]]:
        if self.ledgers is None:
            return (), ()
        return self.ledgers.ledgers(self.quota, adapter, Ledger(), hold)

    def usage(self, segments: Segments, adapter: int) -> Usage:
        usage = self.usages.get(adapter)
        if usage is None:
            usage = Usage(segments, adapter, *self._counted_in(adapter, True))
            segments.join(usage)
            self.usages[adapter] = usage
        return usage

    def view(self, segments: Segments, adapter: int) -> Usage:
        """The process's usage of ``adapter``, or (when it has none yet) one that counts
        nothing and is kept nowhere, under the same quotas: what a query answers."""
        usage = self.usages.get(adapter)
        if usage is None:
            usage = Usage(segments, adapter, *self._counted_in(adapter, False))
        return usage

    def drop_adapter(self, adapter: int) -> None:
        """Everything of one adapter goes (its allocations and VA space went before)."""
        for arena in self.arenas.pop(adapter, []):
            self._close_block(arena.block)
        for fb in self.fences.pop(adapter, []):
            self._drop_fence_block(fb)
        usage = self.usages.pop(adapter, None)
        if usage is not None:
            usage.segments.leave(usage)
            if self.ledgers is not None:
                self.ledgers.release(self.quota, adapter)
            gone = self.paged_gone.setdefault(adapter, [0, 0])
            gone[0] += usage.demoted_bytes
            gone[1] += usage.promoted_bytes
        for block in [b for b in self.blocks.values() if b.adapter == adapter]:
            self._close_block(block)  # none should be left; never leak one

    def paged(self, adapter: int) -> tuple[int, int]:
        """(demoted, promoted) bytes of the process's allocations on ``adapter``, so far."""
        gone = self.paged_gone.get(adapter, (0, 0))
        usage = self.usages.get(adapter)
        if usage is None:
            return gone[0], gone[1]
        return gone[0] + usage.demoted_bytes, gone[1] + usage.promoted_bytes

    def drop(self) -> None:
        for adapter in {*self.arenas, *self.fences, *self.usages,
                        *(b.adapter for b in self.blocks.values())}:
            self.drop_adapter(adapter)

    def census(self) -> dict[str, Any]:
        return {
            "memory": [u.census() for u in self.usages.values()],
            "blocks": len(self.blocks),
            "block_bytes": self.block_bytes,
        }


# ---- the IoctlArgs layout (dxg.protocol.messages.IoctlArgs) -----------------------------------


def ioctl_args(body: m.IoctlArgs, ctype: type[_S]) -> _S:
    """The ioctl struct of a request; a size that is not the struct's: INVALID_PARAMETER."""
    if len(body.args) != ctypes.sizeof(ctype):
        raise CommandFailed(_INVALID, f"{ctype.__name__}: {len(body.args)} bytes")
    return ctype.from_buffer_copy(body.args)


def ioctl_reply(args: ctypes.Structure, extra: bytes = b"",
                status: int = NTSTATUS.STATUS_SUCCESS) -> m.IoctlArgsReturn:
    return m.IoctlArgsReturn(int(status), bytes(args), extra)


def u32_array(extra: bytes, count: int, at: int = 0) -> tuple[int, ...]:
    """``count`` u32 values at ``at`` in a request's extra."""
    return struct.unpack_from(f"<{count}I", extra, at) if count else ()


def expect_extra(extra: bytes, nbytes: int, what: str) -> None:
    if len(extra) != nbytes:
        raise CommandFailed(_INVALID, f"{what}: {len(extra)} bytes of arrays, {nbytes} expected")


def pages_ok(*values: int) -> bool:
    return all(v % PAGE_SIZE == 0 for v in values)

