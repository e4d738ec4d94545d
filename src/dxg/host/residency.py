"""Residency, priorities, offers and budgets: MAKERESIDENT, EVICT, QUERYALLOCATIONRESIDENCY,
SET/GETALLOCATIONPRIORITY, OFFERALLOCATIONS, RECLAIMALLOCATIONS, UPDATEALLOCATIONPROPERTY,
FLUSHHEAPTRANSITIONS, QUERYVIDEOMEMORYINFO and CHANGEVIDEOMEMORYRESERVATION.

All in the IoctlArgs layout (dxg.protocol.messages.IoctlArgs): the ioctl struct with host
handles, then its arrays. Every handle of a call is checked before anything changes.

- MAKERESIDENT: when a listed allocation was evicted, all are made resident and the call answers
  STATUS_PENDING with the paging fence value that the queue's fence reaches from a task right
  after the reply (on a link without descriptors, where no client sees the fence page, it is
  reached first and the call answers STATUS_SUCCESS). Nothing to page in: STATUS_SUCCESS and the
  fence's current value. A discarded allocation must be reclaimed first (INVALID_PARAMETER).
- EVICT marks allocations not resident; their memory and contents stay.
- QUERYALLOCATIONRESIDENCY, as the real driver: a list of allocations (one status each) or a
  resource with allocation_count 0 (one status for the resource: NOTRESIDENT when any of its
  allocations is, else RESIDENTINSHAREDMEMORY when any is non-local, else RESIDENTINGPUMEMORY).
- OFFER/RECLAIM: see dxg.host.memory for when offered memory is discarded. A resource's reclaim
  result is the worst of its allocations' (NOT_COMMITTED, then DISCARDED, then OK).
- QUERYVIDEOMEMORYINFO / CHANGEVIDEOMEMORYRESERVATION: dxg.host.memory.Segments.info.
"""

from __future__ import annotations

import struct
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from dxg.host.adapter import addressed
from dxg.host.allocation import Allocation, allocation_of, resource_of
from dxg.host.call import Call, CommandFailed, Handler
from dxg.host.memory import Usage, expect_extra, ioctl_args, ioctl_reply, u32_array
from dxg.host.placement import choose_group, promote, rank
from dxg.protocol import messages as m
from dxg.protocol.commands import VgpuCommand
from dxg.uapi.memory import ALLOC_NONLOCAL, GROUP_LOCAL, GROUP_NONLOCAL, MAKERESIDENT_ALLOC_MAX
from dxg.uapi.ntstatus import NTSTATUS
from dxg.uapi.structs import (
    d3dddi_makeresident,
    d3dddi_reclaim_result,
    d3dddi_updateallocproperty,
    d3dkmt_allocationresidencystatus,
    d3dkmt_changevideomemoryreservation,
    d3dkmt_evict,
    d3dkmt_flushheaptransitions,
    d3dkmt_getallocationpriority,
    d3dkmt_offer_priority,
    d3dkmt_offerallocations,
    d3dkmt_queryallocationresidency,
    d3dkmt_queryvideomemoryinfo,
    d3dkmt_reclaimallocations2,
    d3dkmt_setallocationpriority,
)

if TYPE_CHECKING:
    from dxg.host.adapter import HostAdapter
    from dxg.host.device import HostDevice
    from dxg.host.pagingqueue import Fence
    from dxg.host.partition import Partition
    from dxg.host.process import HostProcess

__all__ = ["HANDLERS"]

OK = NTSTATUS.STATUS_SUCCESS
INVALID = NTSTATUS.STATUS_INVALID_PARAMETER
R = d3dkmt_allocationresidencystatus
RESIDENT_LOCAL = int(R._D3DKMT_ALLOCATIONRESIDENCYSTATUS_RESIDENTINGPUMEMORY)
RESIDENT_NONLOCAL = int(R._D3DKMT_ALLOCATIONRESIDENCYSTATUS_RESIDENTINSHAREDMEMORY)
NOT_RESIDENT = int(R._D3DKMT_ALLOCATIONRESIDENCYSTATUS_NOTRESIDENT)
RECLAIM_OK = int(d3dddi_reclaim_result._D3DDDI_RECLAIM_RESULT_OK)
RECLAIM_DISCARDED = int(d3dddi_reclaim_result._D3DDDI_RECLAIM_RESULT_DISCARDED)
RECLAIM_NOT_COMMITTED = int(d3dddi_reclaim_result._D3DDDI_RECLAIM_RESULT_NOT_COMMITTED)
_OFFER_PRIORITIES = frozenset(int(v) for v in d3dkmt_offer_priority)
_OFFER_AUTO = int(d3dkmt_offer_priority._D3DKMT_OFFER_PRIORITY_AUTO)
_OFFER_NORMAL = int(d3dkmt_offer_priority._D3DKMT_OFFER_PRIORITY_NORMAL)


def _device(p: Partition, call: Call, handle: int) -> tuple[HostProcess, HostDevice]:
    from dxg.host.device import device_of

    process = p.process(call)
    return process, device_of(p, process, handle, call.adapter)


def _count(count: int, limit: int = MAKERESIDENT_ALLOC_MAX) -> int:
    if not 0 < count <= limit:
        raise CommandFailed(INVALID, f"{count} allocations")
    return count


def _allocations(p: Partition, process: HostProcess, device: HostDevice,
                 handles: tuple[int, ...]) -> list[Allocation]:
    return [allocation_of(p, process, h, device) for h in handles]


def _pack(values: list[int]) -> bytes:
    return struct.pack(f"<{len(values)}I", *values)


def _complete_later(p: Partition, fence: Fence, value: int) -> None:
    """The fence reaches ``value`` from a task, after the reply now being made has gone."""

    async def complete() -> None:
        fence.signal(value)

    try:
        p.tasks.spawn(complete(), f"partition {p.id} paging fence {fence.handle:#x}")
    except RuntimeError:  # the partition is closing: no one waits any more
        fence.signal(value)


def make_resident(p: Partition, call: Call, body: m.IoctlArgs) -> m.IoctlArgsReturn:
    from dxg.host.pagingqueue import queue_of

    args = ioctl_args(body, d3dddi_makeresident)
    process = p.process(call)
    queue = queue_of(p, process, args.paging_queue.v, call.adapter)
    count = _count(args.alloc_count)
    expect_extra(body.extra, 4 * count, "MAKERESIDENT")
    allocs = _allocations(p, process, queue.device, u32_array(body.extra, count))
    if any(a.discarded for a in allocs):
        raise CommandFailed(INVALID, "a discarded allocation: reclaim it first")
    args.num_bytes_to_trim = 0
    evicted = [a for a in allocs if not a.resident]
    if not evicted:
        args.paging_fence_value = queue.fence.value
        return ioctl_reply(args)
    for a in evicted:
        a.resident = True
    value = queue.next_value()
    args.paging_fence_value = value
    if not call.can_pass_fds:
        queue.fence.signal(value)
        return ioctl_reply(args)
    _complete_later(p, queue.fence, value)
    return ioctl_reply(args, status=NTSTATUS.STATUS_PENDING)


def evict(p: Partition, call: Call, body: m.IoctlArgs) -> m.IoctlArgsReturn:
    args = ioctl_args(body, d3dkmt_evict)
    process, device = _device(p, call, args.device.v)
    count = _count(args.alloc_count)
    expect_extra(body.extra, 4 * count, "EVICT")
    allocs = _allocations(p, process, device, u32_array(body.extra, count))
    if not args.flags.evict_only_if_necessary:  # never necessary here: nothing is short
        for a in allocs:
            a.resident = False
    args.num_bytes_to_trim = 0
    return ioctl_reply(args)


def _residency(a: Allocation) -> int:
    if not a.resident or a.discarded:
        return NOT_RESIDENT
    group = a.group if a.shared is None else a.shared.group  # (a view: where its memory is)
    return RESIDENT_LOCAL if group == GROUP_LOCAL else RESIDENT_NONLOCAL


def query_allocation_residency(p: Partition, call: Call,
                               body: m.IoctlArgs) -> m.IoctlArgsReturn:
    args = ioctl_args(body, d3dkmt_queryallocationresidency)
    process, device = _device(p, call, args.device.v)
    if bool(args.resource.v) == bool(args.allocation_count):
        raise CommandFailed(INVALID, "a resource or a list of allocations, one of them")
    if args.resource.v:
        expect_extra(body.extra, 0, "QUERYALLOCATIONRESIDENCY")
        r = resource_of(p, process, args.resource.v, device)
        states = [_residency(a) for a in r.allocations.values()]
        worst = (NOT_RESIDENT if NOT_RESIDENT in states else
                 RESIDENT_NONLOCAL if RESIDENT_NONLOCAL in states else RESIDENT_LOCAL)
        return ioctl_reply(args, _pack([worst]))
    count = _count(args.allocation_count)
    expect_extra(body.extra, 4 * count, "QUERYALLOCATIONRESIDENCY")
    allocs = _allocations(p, process, device, u32_array(body.extra, count))
    return ioctl_reply(args, _pack([_residency(a) for a in allocs]))


def set_allocation_priority(p: Partition, call: Call, body: m.IoctlArgs) -> m.IoctlArgsReturn:
    args = ioctl_args(body, d3dkmt_setallocationpriority)
    process, device = _device(p, call, args.device.v)
    if bool(args.resource.v) == bool(args.allocation_count):
        raise CommandFailed(INVALID, "a resource or a list of allocations, one of them")
    if args.resource.v:
        expect_extra(body.extra, 4, "SETALLOCATIONPRIORITY")
        r = resource_of(p, process, args.resource.v, device)
        (r.priority,) = u32_array(body.extra, 1)
        for a in r.allocations.values():
            _set_priority(a, r.priority)
        _promote_raised(list(r.allocations.values()))
        return ioctl_reply(args)
    count = _count(args.allocation_count)
    expect_extra(body.extra, 8 * count, "SETALLOCATIONPRIORITY")
    allocs = _allocations(p, process, device, u32_array(body.extra, count))
    for a, priority in zip(allocs, u32_array(body.extra, count, 4 * count), strict=True):
        _set_priority(a, priority)
    _promote_raised(allocs)
    return ioctl_reply(args)


def _set_priority(a: Allocation, priority: int) -> None:
    """A view of shared memory sets its SharedAllocation's priority: that is what placement
    goes by, and what every holder's GETALLOCATIONPRIORITY reports."""
    a.priority = priority
    if a.shared is not None:
        a.shared.priority = priority


def _priority(a: Allocation) -> int:
    return a.priority if a.shared is None else a.shared.priority


def _promote_raised(allocs: list[Allocation]) -> None:
    """Demoted allocations among those whose priority was just set come back to the local group
    now when their new priority earns it (dxg.host.placement), highest first; for a view of
    shared memory, its SharedAllocation (the memory placement moves)."""
    placed: dict[Any, None] = {}
    for a in allocs:
        placed[a if a.shared is None else a.shared] = None
    demoted = [a for a in placed if a.wants_local and a.group != GROUP_LOCAL and a.alive
               and not a.discarded]
    for a in sorted(demoted, key=lambda a: rank(a.priority), reverse=True):
        promote(a)


def get_allocation_priority(p: Partition, call: Call, body: m.IoctlArgs) -> m.IoctlArgsReturn:
    args = ioctl_args(body, d3dkmt_getallocationpriority)
    process, device = _device(p, call, args.device.v)
    if bool(args.resource.v) == bool(args.allocation_count):
        raise CommandFailed(INVALID, "a resource or a list of allocations, one of them")
    if args.resource.v:
        expect_extra(body.extra, 0, "GETALLOCATIONPRIORITY")
        r = resource_of(p, process, args.resource.v, device)
        if r.shared is not None and r.shared.allocations:  # (what placement goes by)
            return ioctl_reply(args, _pack([r.shared.allocations[0].priority]))
        return ioctl_reply(args, _pack([r.priority]))
    count = _count(args.allocation_count)
    expect_extra(body.extra, 4 * count, "GETALLOCATIONPRIORITY")
    allocs = _allocations(p, process, device, u32_array(body.extra, count))
    return ioctl_reply(args, _pack([_priority(a) for a in allocs]))


def _targets(p: Partition, process: HostProcess, device: HostDevice, resources: int,
             allocations: int, extra: bytes, count: int) -> list[list[Allocation]]:
    """The allocations each handle of an offer/reclaim names (a resource: all of its)."""
    if (resources, allocations) not in ((1, 0), (0, 1)):
        raise CommandFailed(INVALID, "resources or allocations, one of them")
    expect_extra(extra, 4 * count, "allocation list")
    handles = u32_array(extra, count)
    if len(set(handles)) != count:
        raise CommandFailed(INVALID, "a handle listed twice")
    if resources:
        return [list(resource_of(p, process, h, device).allocations.values()) for h in handles]
    return [[a] for a in _allocations(p, process, device, handles)]


def offer_allocations(p: Partition, call: Call, body: m.IoctlArgs) -> m.IoctlArgsReturn:
    args = ioctl_args(body, d3dkmt_offerallocations)
    process, device = _device(p, call, args.device.v)
    count = _count(args.allocation_count)
    groups = _targets(p, process, device, args.resources, args.allocations, body.extra, count)
    if args.priority not in _OFFER_PRIORITIES:
        raise CommandFailed(INVALID, f"offer priority {args.priority}")
    priority = _OFFER_NORMAL if args.priority == _OFFER_AUTO else args.priority
    allocs = [a for group in groups for a in group]
    if any(a.offered for a in allocs):
        raise CommandFailed(INVALID, "an allocation is offered already")
    if any(a.shared is not None for a in allocs):  # (discarding it would take it from all)
        raise CommandFailed(INVALID, "shared memory is not offered")
    for a in allocs:
        segments = a.segments
        segments.offer_seq += 1
        a.offered = True
        a.offer_priority = priority
        a.offer_seq = segments.offer_seq
        segments.offered[a] = None
        if args.flags.allow_decommit:
            a.discard()
    return ioctl_reply(args)


def _reclaim(a: Allocation) -> int:
    """Recommit a discarded allocation (zero-filled): DISCARDED, or NOT_COMMITTED."""
    group = choose_group(a.segments, a.usage, a.size, bool(a.flags & ALLOC_NONLOCAL), a.priority)
    if group is None:
        return RECLAIM_NOT_COMMITTED
    a.block.punch(a.offset, a.size)  # zero, whatever was written there meanwhile
    a.segments.hold(a, group)
    a.discarded = False
    a.offered = False
    return RECLAIM_DISCARDED


def reclaim_allocations(p: Partition, call: Call, body: m.IoctlArgs) -> m.IoctlArgsReturn:
    from dxg.host.pagingqueue import queue_of

    args = ioctl_args(body, d3dkmt_reclaimallocations2)
    process = p.process(call)
    queue = queue_of(p, process, args.paging_queue.v, call.adapter)
    count = _count(args.allocation_count)
    groups = _targets(p, process, queue.device, args.resources, args.allocations, body.extra,
                      count)
    # A resource counts as offered while any of its allocations is (one that could not be
    # recommitted stays offered); an allocation must be.
    if not all(any(a.offered for a in group) for group in groups):
        raise CommandFailed(INVALID, "an allocation is not offered")
    # Kept ones first, so making room for the discarded ones cannot discard them.
    for group in groups:
        for a in group:
            if a.offered and not a.discarded:
                a.segments.offered.pop(a, None)
                a.offered = False
    results = []
    for group in groups:
        worst = RECLAIM_OK
        for a in group:
            if a.offered and a.discarded:
                worst = max(worst, _reclaim(a))
        results.append(worst)
    args.paging_fence_value = queue.fence.value
    return ioctl_reply(args, _pack(results))


def update_allocation_property(p: Partition, call: Call,
                               body: m.IoctlArgs) -> m.IoctlArgsReturn:
    from dxg.host.pagingqueue import queue_of

    args = ioctl_args(body, d3dddi_updateallocproperty)
    expect_extra(body.extra, 0, "UPDATEALLOCATIONPROPERTY")
    process = p.process(call)
    queue = queue_of(p, process, args.paging_queue.v, call.adapter)
    allocation_of(p, process, args.allocation.v, queue.device)
    # One memory pool per group on the soft adapter: nothing moves.
    args.paging_fence_value = queue.fence.value
    return ioctl_reply(args)


def flush_heap_transitions(p: Partition, call: Call, body: m.IoctlArgs) -> m.IoctlArgsReturn:
    args = ioctl_args(body, d3dkmt_flushheaptransitions)
    expect_extra(body.extra, 0, "FLUSHHEAPTRANSITIONS")
    p.process(call)
    addressed(p, call, args.adapter.v)
    return ioctl_reply(args)


def _budget_call(p: Partition, call: Call, body: m.IoctlArgs,
                 ctype: type) -> tuple[object, HostAdapter, Usage, int]:
    args = ioctl_args(body, ctype)
    expect_extra(body.extra, 0, ctype.__name__)
    process = p.process(call)
    adapter = addressed(p, call, args.adapter.v)
    if args.process != 0 or args.physical_adapter_index != 0:
        raise CommandFailed(INVALID, "process must be 0, physical adapter 0")
    group = args.memory_segment_group
    if group not in (GROUP_LOCAL, GROUP_NONLOCAL):
        raise CommandFailed(INVALID, f"segment group {group}")
    return args, adapter, process.memory.view(adapter.segments, adapter.index), group


def query_video_memory_info(p: Partition, call: Call, body: m.IoctlArgs) -> m.IoctlArgsReturn:
    args, adapter, usage, group = _budget_call(p, call, body, d3dkmt_queryvideomemoryinfo)
    assert isinstance(args, d3dkmt_queryvideomemoryinfo)
    (args.budget, args.current_usage, args.current_reservation,
     args.available_for_reservation) = adapter.segments.info(group, usage)
    return ioctl_reply(args)


def change_video_memory_reservation(p: Partition, call: Call,
                                    body: m.IoctlArgs) -> m.IoctlArgsReturn:
    args, adapter, _, group = _budget_call(p, call, body, d3dkmt_changevideomemoryreservation)
    assert isinstance(args, d3dkmt_changevideomemoryreservation)
    segments = adapter.segments
    usage = p.process(call).memory.usage(segments, adapter.index)
    if args.reservation > segments.info(group, usage)[3]:
        raise CommandFailed(NTSTATUS.STATUS_NO_MEMORY, "more than is available to reserve")
    segments.reserve(usage, group, args.reservation)
    return ioctl_reply(args)


HANDLERS: MappingProxyType[VgpuCommand, Handler] = MappingProxyType({
    VgpuCommand.MAKERESIDENT: make_resident,
    VgpuCommand.EVICT: evict,
    VgpuCommand.QUERYALLOCATIONRESIDENCY: query_allocation_residency,
    VgpuCommand.SETALLOCATIONPRIORITY: set_allocation_priority,
    VgpuCommand.GETALLOCATIONPRIORITY: get_allocation_priority,
    VgpuCommand.OFFERALLOCATIONS: offer_allocations,
    VgpuCommand.RECLAIMALLOCATIONS: reclaim_allocations,
    VgpuCommand.UPDATEALLOCATIONPROPERTY: update_allocation_property,
    VgpuCommand.FLUSHHEAPTRANSITIONS: flush_heap_transitions,
    VgpuCommand.QUERYVIDEOMEMORYINFO: query_video_memory_info,
    VgpuCommand.CHANGEVIDEOMEMORYRESERVATION: change_video_memory_reservation,
})
