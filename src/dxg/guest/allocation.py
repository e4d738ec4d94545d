"""Device memory as the guest keeps it: allocations, resources, paging queues, and the blocks of
host shared memory their bytes live in.

The host carves allocations out of *blocks* (shared memory objects; small allocations share one,
large ones have their own) and says, for each allocation, which block and where. The guest keeps,
per process, one record per host block it knows: the descriptor once a Lock2 needed it (fetched
once with LOCK2_FD, then every Lock2 in that block is answered here with no host call), how many
of the process's allocations and fences live in it, and whether the client has mapped it. When
the last of them goes the guest forgets the block (closes its descriptor) and tells the client to
unmap it with the reply of the next call (UNMAP). A record that outlives the host's block by a
race costs an open descriptor until the process exits, never memory: freed host memory is
punched out of the block.

On a link that cannot carry descriptors (TCP), a Lock2 makes a *shadow*: a block of the guest's
own that holds a copy fetched from the host (LOCK2_COPY, in chunks), mapped into the client like
any block and written back at the last Unlock2 (UNLOCK2). After that last Unlock2 the shadow (and
the client's mapping of it) is kept for the allocation's next Lock2, which fetches the bytes again
into it: a process keeps at most ``KEPT_SHADOW_BYTES`` of such unlocked shadows, the least
recently used going first (unmapped from the client like any block that goes), and they go with
their allocation, its device or the process. Paging fences get a guest page there, updated with
the values the host reports.

Everything here is touched only on the driver's event loop.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Any

from dxg.guest.errors import IoctlError
from dxg.guest.handles import HandleType
from dxg.oslib.fds import close_all
from dxg.oslib.memfd import SharedMemory

if TYPE_CHECKING:
    import asyncio

    from dxg.guest.device import GuestDevice
    from dxg.guest.hostlink import HostLink
    from dxg.guest.process import GuestProcess

# A block of host memory as the guest names it: (host link, the link's generation (a host that
# came back numbers its blocks anew), host process, host block number).
BlockKey = tuple[int, int, int, int]
FENCE_PAGE = 4096
# Shadows of unlocked allocations a process keeps for their next Lock2, in bytes at most.
KEPT_SHADOW_BYTES = 64 << 20
# What one process may have in shadows at once (kept ones included): the guest's memory a
# client can make it hold by locking over a link without descriptors.
MAX_SHADOW_BYTES = 1 << 30


class GuestBlock:
    """One block of host (or, for a shadow, guest) shared memory this process uses."""

    __slots__ = ("fd", "id", "key", "mapped", "readonly", "size", "users")

    def __init__(self, key: BlockKey | None, block_id: int, size: int,
                 readonly: bool = False) -> None:
        self.key = key  # None: a guest-made block (shadow copy, fence page)
        self.id = block_id  # the number the client knows it by (unique in the process)
        self.size = size
        self.fd = -1
        self.users = 0
        self.mapped = False  # the client has it (it got the descriptor)
        self.readonly = readonly


class GuestAllocation:
    __slots__ = ("block", "device", "flags", "group", "handle", "host_handle", "lock_count",
                 "offered", "offering", "offset", "readonly", "resource", "shadow", "size")

    def __init__(self, device: GuestDevice, host_handle: int, block: GuestBlock, offset: int,
                 size: int, group: int, flags: int,
                 resource: GuestResource | None = None) -> None:
        self.device = device
        self.host_handle = host_handle
        self.handle = 0
        self.block = block
        self.offset = offset
        self.size = size
        self.group = group
        self.flags = flags
        self.resource = resource
        self.lock_count = 0
        self.offered = False
        self.offering = 0  # offers of it on their way to the host
        self.shadow: Shadow | None = None
        self.readonly = False  # opened from a read-only share (docs/sharing.md)


class GuestResource:
    __slots__ = ("allocations", "device", "handle", "host_handle", "readonly", "shared")

    def __init__(self, device: GuestDevice, host_handle: int, shared: bool = False,
                 readonly: bool = False) -> None:
        self.device = device
        self.host_handle = host_handle
        self.handle = 0
        self.allocations: list[GuestAllocation] = []
        self.shared = shared  # a shared resource (made shared, or opened): ShareObjects takes it
        self.readonly = readonly  # opened without write access


class GuestPagingQueue:
    __slots__ = ("block", "device", "fence_handle", "fence_offset", "handle", "host_fence",
                 "host_handle", "shadow")

    def __init__(self, device: GuestDevice, host_handle: int, host_fence: int,
                 block: GuestBlock, fence_offset: int) -> None:
        self.device = device
        self.host_handle = host_handle
        self.host_fence = host_fence  # the host's handle of the queue's monitored fence
        self.handle = 0
        self.fence_handle = 0
        self.block = block
        self.fence_offset = fence_offset
        self.shadow: Shadow | None = None  # the guest's fence page (links without descriptors)

    def reached(self, value: int) -> None:
        """The host says the fence reached ``value`` (mirrored where the client reads it)."""
        fence_reached(self.shadow, value)


def fence_reached(shadow: Shadow | None, value: int) -> None:
    """A queue's fence is at ``value`` at least: the guest's own fence page (a link without
    descriptors, where the host's page cannot be mapped) shows it, never going back."""
    if shadow is not None and value:
        old = int.from_bytes(shadow.mem.read(0, 8), "little")
        if value > old:
            shadow.mem.write(0, value.to_bytes(8, "little"))


class Shadow:
    """A guest-made block: a copy of an allocation (or a fence page) mapped into the client."""

    __slots__ = ("block", "busy", "dropped", "kept", "mem", "owner")

    def __init__(self, block: GuestBlock, mem: SharedMemory) -> None:
        self.block = block
        self.mem = mem
        self.owner: GuestAllocation | None = None  # whose copy it is (alloc.shadow is it)
        self.busy: asyncio.Future[None] | None = None  # a fetch or write-back under way
        self.kept = False  # unlocked, kept for the next Lock2 (ProcessMemory's LRU)
        self.dropped = False

    def view(self) -> memoryview:
        """A writable view of all its bytes (it keeps the mapping alive while it lives)."""
        return self.mem.view()


class ProcessMemory:
    """A process's blocks, and what the client must be told to unmap."""

    def __init__(self, kept_limit: int = KEPT_SHADOW_BYTES) -> None:
        self.blocks: dict[BlockKey, GuestBlock] = {}
        self.next_id = 0
        self.unmaps: list[int] = []
        self.shadows = 0  # shadows in use (locked, being fetched or written back, fences)
        self.kept_limit = kept_limit
        self.kept_bytes = 0
        self._kept: dict[Shadow, None] = {}  # unlocked shadows kept, least recently used first
        self._live: dict[int, Shadow] = {}  # every shadow, by block id

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    @property
    def shadow_bytes(self) -> int:
        """Bytes of every shadow this process has (in use and kept)."""
        return sum(s.block.size for s in self._live.values())

    def use(self, key: BlockKey, size: int, readonly: bool = False) -> GuestBlock:
        """The block ``key`` with one more user (recorded the first time)."""
        block = self.blocks.get(key)
        if block is None:
            block = self.blocks[key] = GuestBlock(key, self._new_id(), size, readonly)
        elif block.size != size or block.readonly != readonly:
            # A host that restates a live block: its memory is not ours to guess at.
            raise IoctlError(errno.EPROTO, "host changed the size of a block in use")
        block.users += 1
        return block

    def not_mapped(self, ids: list[int]) -> None:
        """These blocks' maps never reached the client: it gets their descriptors again."""
        wanted = set(ids)
        for block in self.blocks.values():
            if block.id in wanted:
                block.mapped = False
        for block_id in wanted:
            shadow = self._live.get(block_id)
            if shadow is not None:
                shadow.block.mapped = False

    def release(self, block: GuestBlock) -> None:
        block.users -= 1
        if block.users <= 0:
            if block.key is not None and self.blocks.get(block.key) is block:
                del self.blocks[block.key]
            self._forget(block)

    def _forget(self, block: GuestBlock) -> None:
        if block.fd >= 0:
            close_all((block.fd,))
            block.fd = -1
        if block.mapped:
            block.mapped = False
            self.unmaps.append(block.id)

    def shadow(self, size: int, readonly: bool = False) -> Shadow:
        """A new guest-made block of ``size`` bytes (zero-filled); -ENOMEM past the process's
        share of the guest's memory for copies (``MAX_SHADOW_BYTES`` in use at once)."""
        while self._kept and self.shadow_bytes + size > MAX_SHADOW_BYTES:
            self.drop_shadow(next(iter(self._kept)))  # kept ones make room first
        if self.shadow_bytes + size > MAX_SHADOW_BYTES:
            raise IoctlError(errno.ENOMEM, f"copies of more than {MAX_SHADOW_BYTES} bytes "
                             "locked at once over this link")
        mem = SharedMemory(size, "pydxg-shadow")
        block = GuestBlock(None, self._new_id(), size, readonly)
        block.fd = mem.fd
        block.users = 1
        self.shadows += 1
        shadow = self._live[block.id] = Shadow(block, mem)
        return shadow

    def drop_shadow(self, shadow: Shadow) -> None:
        """The shadow goes (its owner forgets it; the client unmaps it). Idempotent. Views of
        it still held (bytes on their way) keep its memory until they are released."""
        if shadow.dropped:
            return
        self.take(shadow)
        shadow.dropped = True
        owner = shadow.owner
        if owner is not None and owner.shadow is shadow:
            owner.shadow = None
        self._live.pop(shadow.block.id, None)
        shadow.block.fd = -1  # (the SharedMemory owns it)
        shadow.block.users = 0
        if shadow.block.mapped:
            shadow.block.mapped = False
            self.unmaps.append(shadow.block.id)
        shadow.mem.close()
        self.shadows -= 1

    def keep(self, shadow: Shadow) -> None:
        """An allocation's shadow, unlocked now, is kept (mapped in the client) for its next
        Lock2; the least recently used kept ones go to stay within ``kept_limit`` (one larger
        than that goes at once)."""
        if shadow.dropped or shadow.kept:
            return
        if shadow.block.size > self.kept_limit:
            self.drop_shadow(shadow)
            return
        shadow.kept = True
        self._kept[shadow] = None
        self.kept_bytes += shadow.block.size
        self.shadows -= 1
        while self.kept_bytes > self.kept_limit:
            self.drop_shadow(next(iter(self._kept)))

    def take(self, shadow: Shadow) -> None:
        """A kept shadow is in use again (no longer one the limit may drop)."""
        if shadow.kept:
            shadow.kept = False
            del self._kept[shadow]
            self.kept_bytes -= shadow.block.size
            self.shadows += 1

    @property
    def kept(self) -> int:
        """How many unlocked shadows are kept."""
        return len(self._kept)

    def give(self, block: GuestBlock) -> int | None:
        """A descriptor for the client when it does not have ``block`` yet (None when it does);
        the caller passes it on (map_block owns it from there). A block the client may only
        read (a fence page, a read-only share) goes as a descriptor opened O_RDONLY, so that no
        mapping of it can ever be made writable."""
        if block.mapped:
            return None
        if block.readonly:
            return os.open(f"/proc/self/fd/{block.fd}", os.O_RDONLY | os.O_CLOEXEC)
        return os.dup(block.fd)

    def close(self) -> None:
        for shadow in list(self._kept):
            self.drop_shadow(shadow)
        for block in list(self.blocks.values()):
            if block.fd >= 0:
                close_all((block.fd,))
                block.fd = -1
        self.blocks.clear()
        self.unmaps.clear()

    @property
    def fds(self) -> int:
        return sum(1 for b in self.blocks.values() if b.fd >= 0)


# A block mapped read-only because its allocation was opened so (docs/sharing.md) is another
# record than the same block mapped writable (it has its own read-only descriptor).
_READONLY_KEY = 1 << 63


def link_key(link: HostLink, hprocess: int, block: int, readonly: bool = False) -> BlockKey:
    return (link.index, link.generation, hprocess, block | (_READONLY_KEY if readonly else 0))


def release_allocation(proc: GuestProcess, alloc: GuestAllocation) -> None:
    """The allocation is gone from the guest: its handle (if still there), its lock state and
    its block reference."""
    if alloc.handle:
        proc.handles.free(alloc.handle, HandleType.ALLOCATION)
        alloc.handle = 0
    if alloc.shadow is not None:
        proc.memory.drop_shadow(alloc.shadow)
        alloc.shadow = None
    alloc.lock_count = 0
    proc.memory.release(alloc.block)


def release_device_memory(proc: GuestProcess, dev: GuestDevice) -> int:
    """Everything memory of a device goes from the guest (DestroyDevice); returns the number of
    objects released (for the process's object share)."""
    n = 0
    for alloc in dev.allocations:
        release_allocation(proc, alloc)
        n += 1
    dev.allocations.clear()
    for res in dev.resources:
        for alloc in res.allocations:
            release_allocation(proc, alloc)
            n += 1
        res.allocations.clear()
        if res.handle:
            proc.handles.free(res.handle, HandleType.RESOURCE)
            res.handle = 0
        n += 1
    dev.resources.clear()
    for queue in dev.paging_queues:
        release_paging_queue(proc, queue)
        n += 1
    dev.paging_queues.clear()
    return n


def release_paging_queue(proc: GuestProcess, queue: GuestPagingQueue) -> None:
    release_queue(proc, queue, HandleType.PAGINGQUEUE)


def release_queue(proc: GuestProcess, queue: Any, qtype: HandleType) -> None:
    """A queue (paging or hardware) goes from the guest: its handle, its fence's handle, and
    its fence page (the host's block, or the guest's own page)."""
    if queue.handle:
        proc.handles.free(queue.handle, qtype)
        queue.handle = 0
    if queue.fence_handle:
        proc.handles.free(queue.fence_handle, HandleType.MONITOREDFENCE)
        queue.fence_handle = 0
    if queue.shadow is not None:
        proc.memory.drop_shadow(queue.shadow)
        queue.shadow = None
    else:
        proc.memory.release(queue.block)


__all__ = ["FENCE_PAGE", "KEPT_SHADOW_BYTES", "MAX_SHADOW_BYTES", "BlockKey", "GuestAllocation", "GuestBlock",
           "GuestPagingQueue", "GuestResource", "ProcessMemory", "Shadow", "link_key",
           "release_allocation", "release_device_memory", "release_paging_queue", "release_queue"]
