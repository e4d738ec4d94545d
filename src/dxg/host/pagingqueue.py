"""Paging queues: one per CREATEPAGINGQUEUE, owned by a device, each with a monitored fence.

The fence's value lives in an 8-byte slot of one of the process's fence blocks
(dxg.host.memory.FenceBlock), so clients read it without a call: CREATEPAGINGQUEUE answers the
slot's BlockRef in its extra and, on a link that carries descriptors, the fence block's
descriptor, opened read-only, beside it (on every create; the guest keeps one mapping per
block id). The host keeps
its own record of the value (`Fence.value`) and is the only writer of the slot.

Work that pages memory in (MAKERESIDENT of an evicted allocation) is answered STATUS_PENDING with
the value the queue's fence will reach; the fence reaches it from a task right after the reply.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from dxg.host.call import Call, CommandFailed, Handler
from dxg.host.memory import FenceBlock, expect_extra, ioctl_args, ioctl_reply, readonly_fd
from dxg.host.syncobject import FLAG_NO_SIGNAL, MONITORED_FENCE, SyncObject
from dxg.protocol import messages as m
from dxg.protocol.commands import VgpuCommand
from dxg.uapi.handles import HandleType
from dxg.uapi.ntstatus import NTSTATUS
from dxg.uapi.structs import (
    d3dddi_destroypagingqueue,
    d3dddi_pagingqueue_priority,
    d3dkmt_createpagingqueue,
)

if TYPE_CHECKING:
    from dxg.host.adapter import HostAdapter
    from dxg.host.device import HostDevice
    from dxg.host.partition import Partition
    from dxg.host.process import HostProcess

__all__ = ["HANDLERS", "Fence", "PagingQueue", "drop_paging_queue", "queue_of"]

INVALID = NTSTATUS.STATUS_INVALID_PARAMETER
_PRIORITIES = frozenset(int(v) for v in d3dddi_pagingqueue_priority)


class Fence(SyncObject):
    """A paging queue's monitored fence (HandleType.MONITOREDFENCE): a SyncObject whose value
    is in a shared slot (``block`` is None once freed; values never go back), so a CPU wait
    works on it. Its device is its queue's."""

    __slots__ = ("_queue",)

    def __init__(self, handle: int, queue: PagingQueue | None, block: FenceBlock | None,
                 index: int, value: int = 0) -> None:
        super().__init__(handle, None, MONITORED_FENCE, block=block, index=index, value=value,
                         flags=FLAG_NO_SIGNAL)  # the paging queue signals it, nobody else
        self.queue = queue  # type: ignore[assignment]

    @property
    def queue(self) -> PagingQueue:
        return self._queue  # type: ignore[no-any-return]

    @queue.setter
    def queue(self, queue: PagingQueue | None) -> None:
        self._queue = queue
        self.device = queue.device if queue is not None else None


@dataclass(eq=False, slots=True)
class PagingQueue:
    handle: int
    device: HostDevice
    priority: int
    fence: Fence
    fence_target: int = 0  # the last value handed out for paging work

    def next_value(self) -> int:
        self.fence_target = max(self.fence_target, self.fence.value) + 1
        return self.fence_target

    def census(self) -> dict[str, int]:
        return {"handle": self.handle, "fence": self.fence.handle, "priority": self.priority,
                "fence_value": self.fence.value}


def queue_of(p: Partition, process: HostProcess, handle: int,
             adapter: HostAdapter | None) -> PagingQueue:
    """The paging queue ``handle`` of ``process`` on ``adapter``, or INVALID_HANDLE."""
    queue = p.handles.get(handle, HandleType.PAGINGQUEUE)
    if queue is None or queue.device.process is not process or queue.device.adapter is not adapter:
        raise CommandFailed(NTSTATUS.STATUS_INVALID_HANDLE,
                            f"paging queue 0x{handle:08x} is not this process's")
    return queue


def drop_paging_queue(p: Partition, queue: PagingQueue) -> None:
    device = queue.device
    process = device.process
    if device.paging_queues.pop(queue.handle, None) is None:
        return
    fence = queue.fence
    fence.fail(NTSTATUS.STATUS_INVALID_HANDLE)  # CPU waits on it end
    if fence.block is not None:
        process.memory.free_fence_slot(fence.block, fence.index)
        fence.block = None
    p.free(fence.handle, HandleType.MONITOREDFENCE, process)
    p.free(queue.handle, HandleType.PAGINGQUEUE, process)


def register_queue(p: Partition, call: Call, process: HostProcess, queue: Any,
                   qtype: HandleType, fence: Any) -> None:
    """Give a new queue (``queue.handle``) and its monitored fence (``fence.handle``, its slot
    in ``fence.block``) their handles, and the fence block's descriptor to the reply on a local
    link; on any failure none of it stays (the slot is freed too)."""
    try:
        queue.handle = p.alloc(qtype, queue, process)
        fence.handle = p.alloc(HandleType.MONITOREDFENCE, fence, process)
        if call.can_pass_fds:  # read-only: only the host writes a queue's fence
            call.reply_fds.append(readonly_fd(fence.block.block))
    except BaseException:
        if fence.handle:
            p.free(fence.handle, HandleType.MONITOREDFENCE, process)
        if queue.handle:
            p.free(queue.handle, qtype, process)
        process.memory.free_fence_slot(fence.block, fence.index)
        raise


def create_paging_queue(p: Partition, call: Call, body: m.IoctlArgs) -> m.IoctlArgsReturn:
    from dxg.host.device import device_of

    args = ioctl_args(body, d3dkmt_createpagingqueue)
    expect_extra(body.extra, 0, "CREATEPAGINGQUEUE")
    process = p.process(call)
    device = device_of(p, process, args.device.v, call.adapter)
    if args.priority not in _PRIORITIES or args.physical_adapter_index != 0:
        raise CommandFailed(INVALID, "bad priority or physical adapter index")
    memory = process.memory
    block, index = memory.fence_slot(p.config, device.adapter.index)
    fence = Fence(0, None, block, index)  # type: ignore[arg-type]  # the queue comes next
    queue = PagingQueue(0, device, args.priority, fence)
    fence.queue = queue
    register_queue(p, call, process, queue, HandleType.PAGINGQUEUE, fence)
    device.paging_queues[queue.handle] = queue
    args.paging_queue.v = queue.handle
    args.sync_object.v = fence.handle
    args.fence_cpu_virtual_address = 0
    return ioctl_reply(args, fence.ref().pack())


def destroy_paging_queue(p: Partition, call: Call, body: m.IoctlArgs) -> m.IoctlArgsReturn:
    args = ioctl_args(body, d3dddi_destroypagingqueue)
    expect_extra(body.extra, 0, "DESTROYPAGINGQUEUE")
    drop_paging_queue(p, queue_of(p, p.process(call), args.paging_queue.v, call.adapter))
    return ioctl_reply(args)


HANDLERS: MappingProxyType[VgpuCommand, Handler] = MappingProxyType({
    VgpuCommand.CREATEPAGINGQUEUE: create_paging_queue,
    VgpuCommand.DESTROYPAGINGQUEUE: destroy_paging_queue,
})
