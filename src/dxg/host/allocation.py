"""Allocations and resources: CREATEALLOCATION, DESTROYALLOCATION, LOCK2 and UNLOCK2.

An allocation belongs to a device (and, optionally, to a resource of that device that owns a
group of allocations). Its memory is ``size`` bytes (whole pages) at ``offset`` in a block of
its process (dxg.host.memory), committed in one segment group of the device's adapter: the
non-local group when its private data asks (ALLOC_NONLOCAL), else the local group when it fits
there (or room can be made there from allocations of lower priority: dxg.host.placement), else
the non-local one. Allocations are made resident; EVICT and MAKERESIDENT,
OFFERALLOCATIONS and RECLAIMALLOCATIONS (dxg.host.residency) change that. A discarded
allocation keeps its place in its block (its pages punched, its bytes uncommitted) so that its
BlockRef never changes; reclaimed, it reads zero.

CREATEALLOCATION is all or nothing: on any failure no handle, memory or charge stays (offered
memory of others that had to be discarded to make room stays discarded: that is what an offer
allows at any time).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from dxg.host.call import Call, CommandFailed, Handler
from dxg.host.memory import Arena, Block, Segments, Usage
from dxg.host.placement import choose_group
from dxg.host.quota import left_of
from dxg.protocol import messages as m
from dxg.protocol.commands import VgpuCommand
from dxg.protocol.framing import DXG_MAX_VM_BUS_PACKET_SIZE
from dxg.uapi.handles import HandleType
from dxg.uapi.memory import (
    ALLOC_CACHED,
    ALLOC_FLAGS,
    ALLOC_NONLOCAL,
    ALLOC_VERSION,
    CREATEALLOCATION_MAX,
    GROUP_LOCAL,
    PAGE_SIZE,
    AllocDesc,
    round_up,
)
from dxg.uapi.ntstatus import NTSTATUS
from dxg.uapi.structs import d3dkmt_createallocationflags

if TYPE_CHECKING:
    from dxg.host.adapter import HostAdapter
    from dxg.host.device import HostDevice
    from dxg.host.partition import Partition
    from dxg.host.process import HostProcess
    from dxg.host.share import SharedAllocation, SharedResource
    from dxg.host.vaspace import Mapping

__all__ = ["HANDLERS", "Allocation", "Resource", "allocation_of", "drop_allocation", "drop_device_memory", "drop_resource", "resource_of"]

OK = NTSTATUS.STATUS_SUCCESS
INVALID = NTSTATUS.STATUS_INVALID_PARAMETER
INVALID_HANDLE = NTSTATUS.STATUS_INVALID_HANDLE
_HEAD = 16  # CreateAllocationReturn's fixed part
_PER_ALLOCATION = 48  # and each allocation's


@dataclass(eq=False, slots=True)
class Allocation:
    handle: int
    device: HostDevice
    resource: Resource | None
    size: int
    flags: int  # ALLOC_* as answered (ALLOC_CACHED always)
    priority: int
    group: int = GROUP_LOCAL
    block: Block = None  # type: ignore[assignment]  # set once its memory is placed
    offset: int = 0
    arena: Arena | None = None
    usage: Usage = None  # type: ignore[assignment]
    resident: bool = True
    offered: bool = False
    offer_priority: int = 0
    offer_seq: int = 0
    discarded: bool = False
    alive: bool = True
    mappings: set[Mapping] = field(default_factory=set)  # its GPU VA mappings
    # A view of a shared resource's allocation (dxg.host.share): the memory and its charge are
    # the SharedAllocation's; ``readonly``: opened without write access.
    shared: SharedAllocation | None = None
    readonly: bool = False

    @property
    def segments(self) -> Segments:
        return self.usage.segments

    @property
    def wants_local(self) -> bool:
        return not self.flags & ALLOC_NONLOCAL

    def discard(self) -> None:
        """Its memory goes (pages punched, bytes uncommitted); it lives on, discarded."""
        if self.discarded or not self.alive:
            return
        self.block.punch(self.offset, self.size)
        self.segments.unhold(self)
        self.segments.offered.pop(self, None)
        self.discarded = True

    def view(self, offset: int = 0, length: int | None = None) -> memoryview:
        """A writable view of its bytes (all, or ``length`` from ``offset``)."""
        n = self.size - offset if length is None else length
        if offset < 0 or n < 0 or offset + n > self.size:
            raise ValueError(f"range {offset}+{n} outside {self.size} bytes")
        return self.block.view(self.offset + offset, n)

    def info(self, priv_drv_data: bytes) -> m.AllocationInfo:
        return m.AllocationInfo(self.handle, self.group, self.flags, self.block.id,
                                self.block.size, self.offset, self.size, priv_drv_data)


@dataclass(eq=False, slots=True)
class Resource:
    handle: int
    device: HostDevice
    priority: int = 0
    allocations: dict[int, Allocation] = field(default_factory=dict)
    shared: SharedResource | None = None  # a handle of a shared resource (dxg.host.share)


# ---- lookups -----------------------------------------------------------------------------------


def allocation_of(p: Partition, process: HostProcess, handle: int,
                  device: HostDevice | None = None,
                  adapter: HostAdapter | None = None) -> Allocation:
    """The allocation ``handle`` of ``process`` (of ``device``, or on ``adapter``), or
    CommandFailed(INVALID_HANDLE)."""
    a = p.handles.get(handle, HandleType.ALLOCATION)
    if (a is None or a.device.process is not process
            or (device is not None and a.device is not device)
            or (adapter is not None and a.device.adapter is not adapter)):
        raise CommandFailed(INVALID_HANDLE, f"allocation 0x{handle:08x} is not this process's")
    return a


def resource_of(p: Partition, process: HostProcess, handle: int,
                device: HostDevice) -> Resource:
    r = p.handles.get(handle, HandleType.RESOURCE)
    if r is None or r.device is not device or device.process is not process:
        raise CommandFailed(INVALID_HANDLE, f"resource 0x{handle:08x} is not this device's")
    return r


# ---- life and death ----------------------------------------------------------------------------


def _new_allocation(p: Partition, device: HostDevice, resource: Resource | None, size: int,
                    flags: int, priority: int) -> Allocation:
    process = device.process
    adapter = device.adapter
    a = Allocation(0, device, resource, size, flags | ALLOC_CACHED, priority)
    a.handle = p.alloc(HandleType.ALLOCATION, a, process)
    try:
        segments = adapter.segments
        a.usage = process.memory.usage(segments, adapter.index)
        group = choose_group(segments, a.usage, size, bool(flags & ALLOC_NONLOCAL), priority)
        if group is None:
            left = left_of(a.usage.bounds)
            why = (f"over a memory quota ({left} bytes left)" if left is not None and size > left
                   else "no room")
            raise CommandFailed(NTSTATUS.STATUS_NO_MEMORY,
                                f"{why} for {size} bytes on adapter {adapter.index}")
        a.block, a.offset, a.arena = process.memory.place(p.config, adapter.index, size)
        segments.hold(a, group)
    except BaseException:
        p.free(a.handle, HandleType.ALLOCATION, process)
        raise
    device.allocations[a.handle] = a
    if resource is not None:
        resource.allocations[a.handle] = a
    return a


def drop_allocation(p: Partition, a: Allocation) -> None:
    """The allocation goes with its mappings and its memory."""
    if not a.alive:
        return
    process = a.device.process
    if a.mappings:
        space = process.memory.vaspaces.get(a.device.adapter.index)
        if space is not None:
            space.unmap_allocation(p, a)
        a.mappings.clear()
    if a.shared is None:
        segments = a.segments
        segments.offered.pop(a, None)
        if not a.discarded:
            segments.unhold(a)
    a.alive = False
    if a.shared is None:  # (a view's memory is its shared resource's: dxg.host.share)
        process.memory.release(a.block, a.offset, a.size, a.arena)
    a.device.allocations.pop(a.handle, None)
    if a.resource is not None:
        a.resource.allocations.pop(a.handle, None)
    p.free(a.handle, HandleType.ALLOCATION, process)


def drop_resource(p: Partition, r: Resource) -> None:
    for a in list(r.allocations.values()):
        drop_allocation(p, a)
    if r.device.resources.pop(r.handle, None) is not None:
        p.free(r.handle, HandleType.RESOURCE, r.device.process)
    if r.shared is not None:
        from dxg.host.share import release_resource

        release_resource(p, r)


def drop_device_memory(p: Partition, device: HostDevice) -> None:
    """A device goes: its paging queues, resources and allocations."""
    from dxg.host.pagingqueue import drop_paging_queue

    for queue in list(device.paging_queues.values()):
        drop_paging_queue(p, queue)
    for r in list(device.resources.values()):
        drop_resource(p, r)
    for a in list(device.allocations.values()):
        drop_allocation(p, a)


# ---- the commands ------------------------------------------------------------------------------


def _sizes(body: m.CreateAllocation, flags: d3dkmt_createallocationflags) -> list[tuple[int, int]]:
    """(size in whole pages, ALLOC_* flags) of each allocation asked for."""
    if flags.standard_allocation:
        (only,) = body.allocations
        size = body.standard_size
        if only.priv_drv_data or size <= 0 or size % PAGE_SIZE or size >= 1 << 62:
            raise CommandFailed(INVALID, "a standard allocation: one, sized, no private data")
        return [(size, 0)]
    if body.standard_size:
        raise CommandFailed(INVALID, "a heap size without standard_allocation")
    out = []
    for new in body.allocations:
        desc = AllocDesc.unpack(new.priv_drv_data)
        if (desc is None or desc.version != ALLOC_VERSION or desc.flags & ~ALLOC_FLAGS
                or not 0 < desc.size < 1 << 62):
            raise CommandFailed(INVALID, "allocation private data is no pydxg AllocDesc v1")
        out.append((round_up(desc.size), desc.flags))
    return out


def create_allocation(p: Partition, call: Call,
                      body: m.CreateAllocation) -> m.CreateAllocationReturn:
    from dxg.host.device import device_of

    process = p.process(call)
    device = device_of(p, process, body.device, call.adapter)
    flags = d3dkmt_createallocationflags()
    flags.value = body.flags
    if flags.create_protected or flags.existing_section:
        raise CommandFailed(INVALID, "protected and section-backed allocations are not served")
    if flags.existing_sysmem or flags.cross_adapter or flags.open_cross_adapter:
        raise CommandFailed(NTSTATUS.STATUS_NOT_SUPPORTED, "sysmem or cross-adapter allocations")
    shared = bool(flags.create_shared or flags.nt_security_sharing)
    if shared:
        if not flags.nt_security_sharing:  # (global-handle sharing: no handler in the real one)
            raise CommandFailed(NTSTATUS.STATUS_NOT_SUPPORTED, "sharing without NT handles")
        if not flags.create_shared or not flags.create_resource or body.resource:
            raise CommandFailed(INVALID, "a shared resource is made whole, by create_resource")
    count = len(body.allocations)
    if not 0 < count <= CREATEALLOCATION_MAX:
        raise CommandFailed(INVALID, f"{count} allocations")
    if flags.standard_allocation and count != 1:
        raise CommandFailed(INVALID, "a standard allocation comes alone")
    resource: Resource | None = None
    if body.resource:
        if flags.create_resource:
            raise CommandFailed(INVALID, "create_resource and an existing resource")
        resource = resource_of(p, process, body.resource, device)
        if resource.shared is not None:
            raise CommandFailed(INVALID, "a shared resource takes no more allocations")
    sizes = _sizes(body, flags)
    reply_size = _HEAD + count * _PER_ALLOCATION + sum(len(a.priv_drv_data)
                                                        for a in body.allocations)
    if reply_size > DXG_MAX_VM_BUS_PACKET_SIZE:
        raise CommandFailed(INVALID, "private data too large to answer")
    if shared:
        from dxg.host.share import create_shared_resource

        return create_shared_resource(p, device, body, sizes)
    made: list[Allocation] = []
    fresh: Resource | None = None
    try:
        if flags.create_resource:
            fresh = Resource(0, device, body.allocations[0].priority)
            fresh.handle = p.alloc(HandleType.RESOURCE, fresh, process)
            device.resources[fresh.handle] = fresh
            resource = fresh
        for (size, aflags), new in zip(sizes, body.allocations, strict=True):
            made.append(_new_allocation(p, device, resource, size, aflags, new.priority))
    except BaseException:
        for a in reversed(made):
            drop_allocation(p, a)
        if fresh is not None:
            drop_resource(p, fresh)
        raise
    infos = tuple(a.info(new.priv_drv_data)
                  for a, new in zip(made, body.allocations, strict=True))
    return m.CreateAllocationReturn(OK, resource.handle if resource is not None else 0, infos)


_SYSTEM_USE_ONLY = 1 << 31  # d3dddicb_destroyallocation2flags.system_use_only


def destroy_allocation(p: Partition, call: Call, body: m.DestroyAllocation) -> m.NtStatusReturn:
    from dxg.host.device import device_of

    process = p.process(call)
    device = device_of(p, process, body.device, call.adapter)
    if bool(body.resource) == bool(body.allocations):
        raise CommandFailed(INVALID, "a resource or a list of allocations, one of them")
    if body.resource:
        drop_resource(p, resource_of(p, process, body.resource, device))
        return m.NtStatusReturn(OK)
    if len(body.allocations) > CREATEALLOCATION_MAX:
        raise CommandFailed(INVALID, f"{len(body.allocations)} allocations")
    victims: dict[int, Allocation] = {}
    for handle in body.allocations:
        victims[handle] = allocation_of(p, process, handle, device)
    # A resource's allocations go with it, except when the guest undoes allocations it added
    # to a resource for a caller that gave up (system_use_only, bit 31: guests set it only
    # then; a guest breaking that rule only removes its own process's allocations).
    if not body.flags & _SYSTEM_USE_ONLY and any(a.resource is not None
                                                   for a in victims.values()):
        raise CommandFailed(INVALID, "an allocation of a resource goes with its resource")
    for a in victims.values():
        drop_allocation(p, a)
    return m.NtStatusReturn(OK)


def _lockable(p: Partition, call: Call, device_handle: int, handle: int) -> Allocation:
    from dxg.host.device import device_of

    process = p.process(call)
    device = device_of(p, process, device_handle, call.adapter)
    a = allocation_of(p, process, handle, device)
    if a.offered or a.discarded:
        raise CommandFailed(INVALID, "the allocation is offered")
    return a


def _block_fd(a: Allocation) -> int:
    """A descriptor of the allocation's block for the guest: read-only for a view opened
    without write access (dxg.host.share)."""
    if a.readonly:
        from dxg.host.share import readonly_fd

        return readonly_fd(a.block)
    try:
        return os.dup(a.block.fd)
    except OSError as e:
        raise CommandFailed(NTSTATUS.STATUS_NO_MEMORY, f"no descriptor: {e}") from None


def lock2(p: Partition, call: Call, body: m.Lock2) -> m.Lock2Return:
    a = _lockable(p, call, body.device, body.allocation)
    if body.mode == m.LOCK2_FD:
        if not call.can_pass_fds:
            raise CommandFailed(NTSTATUS.STATUS_NOT_SUPPORTED, "no descriptors on this link")
        call.reply_fds.append(_block_fd(a))
        return m.Lock2Return(OK, a.block.id, a.block.size, a.offset, a.size)
    if body.mode == m.LOCK2_COPY:
        if (body.offset > a.size or body.length > a.size - body.offset
                or body.length > p.config.max_message_bytes - 4096):
            raise CommandFailed(INVALID, "range outside the allocation")
        # A view of the allocation's memory: the reply goes to the socket from there (no copy;
        # a block freed meanwhile stays mapped until the view is gone, and reads zero).
        data = a.view(body.offset, body.length)
        return m.Lock2Return(OK, a.block.id, a.block.size, a.offset, a.size, data)
    raise CommandFailed(INVALID, f"lock mode {body.mode}")


def unlock2(p: Partition, call: Call, body: m.Unlock2) -> m.NtStatusReturn:
    a = _lockable(p, call, body.device, body.allocation)
    n = len(body.data)
    if body.offset > a.size or n > a.size - body.offset:
        raise CommandFailed(INVALID, "range outside the allocation")
    if n and a.readonly:
        raise CommandFailed(NTSTATUS.STATUS_ACCESS_DENIED, "opened read-only")
    if n:  # (body.data: a view of the received message: one copy, into the block)
        a.block.write(a.offset + body.offset, body.data)
    return m.NtStatusReturn(OK)


HANDLERS: MappingProxyType[VgpuCommand, Handler] = MappingProxyType({
    VgpuCommand.CREATEALLOCATION: create_allocation,
    VgpuCommand.DESTROYALLOCATION: destroy_allocation,
    VgpuCommand.LOCK2: lock2,
    VgpuCommand.UNLOCK2: unlock2,
})
