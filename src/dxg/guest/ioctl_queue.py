"""Hardware queues and execution: CreateHwQueue / DestroyHwQueue, SubmitCommandToHwQueue,
context scheduling priorities and MarkDeviceAsError (the execution half of the real driver's
ioctl.c).

A queue's progress fence is a monitored fence whose value the caller reads from a read-only
page mapped into it (as a paging queue's: dxg.guest.ioctl_memory). Submissions travel as the
real protocol's fire-and-forget messages once the host enables asynchronous messages (no round
trip): what goes wrong with them on the host surfaces through the device's state
(GetDeviceState), never as the submission's return value. See docs/execution.md.
"""

from __future__ import annotations

import ctypes
import errno
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from dxg.guest import vmbus
from dxg.guest.allocation import GuestBlock, fence_reached, release_queue
from dxg.guest.device import DEVICEEXECUTION_RESET, ObjectState
from dxg.guest.errors import IoctlError
from dxg.guest.handles import HandleType
from dxg.guest.ioctl_memory import _send_args, adopt_fence_page, spawn_destroy
from dxg.guest.ioctl_sync import _post
from dxg.guest.lookup import PRIVATE_DATA_MAX, _context, _device, _h, _host_result
from dxg.guest.process import GuestProcess, host_process
from dxg.guest.usermem import UserMemory, copy_from_user, map_block
from dxg.oslib.fds import close_all
from dxg.protocol import messages as m
from dxg.protocol.commands import VgpuCommand
from dxg.uapi import structs as s
from dxg.uapi.ntstatus import nt_success

if TYPE_CHECKING:
    from dxg.guest.adapter import GuestAdapter
    from dxg.guest.allocation import Shadow
    from dxg.guest.context import GuestContext
    from dxg.guest.driver import GuestDriver

V = VgpuCommand
# The real driver's limits: D3DDDI_MAX_OBJECT_SIGNALED / _WAITED_ON, D3DDDI_MAX_BROADCAST_CONTEXT.
_MAX_OBJECTS = 32
_MAX_BROADCAST = 64
_STATE_EXECUTION = int(s.d3dkmt_devicestate_type._D3DKMT_DEVICESTATE_EXECUTION)
_HQ_FENCE = s.d3dkmt_createhwqueue.queue_progress_fence_cpu_va.offset
# Context scheduling priorities as D3DKMT defines them (-7..7; 0 normal).
PRIORITY_MIN, PRIORITY_MAX = -7, 7


class GuestHwQueue:
    __slots__ = ("block", "context", "fence_handle", "fence_offset", "handle", "host_fence",
                 "host_handle", "shadow")

    def __init__(self, context: GuestContext, host_handle: int, host_fence: int,
                 block: GuestBlock, fence_offset: int) -> None:
        self.context = context
        self.host_handle = host_handle
        self.host_fence = host_fence
        self.handle = 0
        self.fence_handle = 0
        self.block = block
        self.fence_offset = fence_offset
        self.shadow: Shadow | None = None

    @property
    def device(self) -> Any:
        return self.context.device

    def reached(self, value: int) -> None:
        """A CPU wait saw the progress fence reach ``value`` (the page over TCP shows it)."""
        fence_reached(self.shadow, value)


def release_hwqueue(proc: GuestProcess, queue: GuestHwQueue) -> None:
    """The queue's guest handles and fence block go (the host's with its context)."""
    release_queue(proc, queue, HandleType.HWQUEUE)
    if queue in queue.context.hwqueues:
        queue.context.hwqueues.remove(queue)


def _queue(proc: GuestProcess, handle: Any) -> GuestHwQueue:
    queue = proc.handles.get(_h(handle), HandleType.HWQUEUE)
    if queue is None:
        raise IoctlError(errno.EBADF, "invalid hardware queue handle")
    if not queue.context.device.adapter.active:
        raise IoctlError(errno.ENODEV, "adapter was removed")
    return queue


async def create_hwqueue(drv: GuestDriver, proc: GuestProcess, args: Any,
                         mem: UserMemory) -> int:
    ctx = _context(proc, args.context)
    dev = ctx.device
    if dev.state != ObjectState.ACTIVE or ctx.destroyed:
        return -errno.EBADF
    adapter = dev.adapter
    priv = copy_from_user(mem, args.priv_drv_data, args.priv_drv_data_size, PRIVATE_DATA_MAX)
    hargs = s.d3dkmt_createhwqueue.from_buffer_copy(bytes(args))
    hargs.context.v = ctx.host_handle
    hargs.priv_drv_data = 1 if priv else 0
    proc.charge_object()
    try:
        status, out, extra, got = await _send_args(
            proc, adapter, V.CREATEHWQUEUE, hargs, priv, want_fds=True,
            undo=lambda hp, r: _undo_queue(adapter, hp, _queue_of_reply(r)))
    except BaseException:
        if not proc.closed:
            proc.release_objects()
        raise
    try:
        ret = _host_result(status)
        if ret < 0:
            proc.release_objects()
            return ret
        hprocess = await host_process(proc, adapter.link)
        queue = _adopt(proc, ctx, hprocess, out, extra, got)
    except BaseException:
        if not proc.closed:
            proc.release_objects()
        if nt_success(status) and _h(out.queue):
            _undo_queue(adapter, await host_process(proc, adapter.link), _h(out.queue))
        raise
    finally:
        close_all(got)
    block = queue.block
    try:
        map_block(mem, block.id, block.size, queue.fence_offset, _HQ_FENCE,
                  proc.memory.give(block), readonly=True)
        block.mapped = True
    except IoctlError as e:
        if e.errno != errno.EOPNOTSUPP:
            release_hwqueue(proc, queue)
            proc.release_objects()
            _undo_queue(adapter, hprocess, queue.host_handle)
            raise
        args.queue_progress_fence_cpu_va = 0  # through a file that cannot map (FUSE)
    args.queue.v = queue.handle
    args.queue_progress_fence.v = queue.fence_handle
    args.queue_progress_fence_gpu_va = 0
    return ret


def _adopt(proc: GuestProcess, ctx: GuestContext, hprocess: int, out: Any, extra: bytes,
           got: list[int]) -> GuestHwQueue:
    dev = ctx.device
    if proc.closed or dev.state != ObjectState.ACTIVE or ctx.destroyed:
        raise IoctlError(errno.ENODEV, "the context went while the host made the queue")
    if not _h(out.queue) or not _h(out.queue_progress_fence):
        raise IoctlError(errno.EPROTO, "host answered CREATEHWQUEUE wrongly")
    block, offset, shadow = adopt_fence_page(proc, dev, hprocess, extra, got)
    queue = GuestHwQueue(ctx, _h(out.queue), _h(out.queue_progress_fence), block, offset)
    queue.shadow = shadow
    ctx.hwqueues.append(queue)
    try:
        queue.handle = proc.handles.alloc(HandleType.HWQUEUE, queue)
        queue.fence_handle = proc.handles.alloc(HandleType.MONITOREDFENCE, queue)
    except BaseException:
        release_hwqueue(proc, queue)
        raise
    return queue


def _queue_of_reply(reply: m.IoctlArgsReturn) -> int:
    if not nt_success(reply.status) or len(reply.args) != ctypes.sizeof(s.d3dkmt_createhwqueue):
        return 0
    return int(s.d3dkmt_createhwqueue.from_buffer_copy(reply.args).queue.v)


def _undo_queue(adapter: GuestAdapter, hprocess: int, host_queue: int) -> None:
    if host_queue:
        args = s.d3dkmt_destroyhwqueue()
        args.queue.v = host_queue
        spawn_destroy(adapter, hprocess, V.DESTROYHWQUEUE, args)


async def destroy_hwqueue(drv: GuestDriver, proc: GuestProcess, args: Any,
                          mem: UserMemory) -> int:
    queue = proc.handles.get(_h(args.queue), HandleType.HWQUEUE)
    if queue is None:
        return -errno.EBADF
    adapter = queue.context.device.adapter
    host = s.d3dkmt_destroyhwqueue()
    host.queue.v = queue.host_handle
    release_hwqueue(proc, queue)
    if not proc.closed:
        proc.release_objects()
    if not adapter.active or not adapter.link.up:
        return 0
    status, _, _extra = await _send_args(proc, adapter, V.DESTROYHWQUEUE, host)
    return _host_result(status)


async def submit_command_to_hwqueue(drv: GuestDriver, proc: GuestProcess, args: Any,
                                    mem: UserMemory) -> int:
    """The command buffer (a GPU VA in the caller's VA space on the host) goes to the queue,
    fire-and-forget: the call returns once it is on its way."""
    queue = _queue(proc, args.hwqueue)
    dev = queue.context.device
    if dev.state != ObjectState.ACTIVE or queue.context.destroyed:
        return -errno.EBADF
    if not 0 < args.command_length or args.priv_drv_data_size > PRIVATE_DATA_MAX:
        return -errno.EINVAL
    if args.num_primaries:
        return -errno.EINVAL  # compute-only adapters present nothing
    if not await _device_active(proc, dev):
        return -errno.EIO  # its earlier work faulted (GetDeviceState says how): nothing runs
    hargs = s.d3dkmt_submitcommandtohwqueue.from_buffer_copy(bytes(args))
    hargs.hwqueue.v = queue.host_handle
    hargs.priv_drv_data = 0
    hargs.priv_drv_data_size = 0
    hargs.written_primaries = 0
    return await _post(proc, dev.adapter, V.SUBMITCOMMANDTOHWQUEUE, m.IoctlArgs(bytes(hargs)))


async def submit_command(drv: GuestDriver, proc: GuestProcess, args: Any,
                         mem: UserMemory) -> int:
    """SubmitCommand: the command buffer (a GPU VA) runs on each of 1..64 contexts of one
    device, after what each has queued (no progress fence: signal a fence on the contexts after
    it to learn it is done). History buffers (presentation) are accepted and not used."""
    count = int(args.broadcast_context_count)
    if not 0 < count <= _MAX_BROADCAST or not 0 < args.command_length:
        return -errno.EINVAL
    if args.num_primaries or args.num_history_buffers > 1024:
        return -errno.EINVAL
    if args.priv_drv_data_size > PRIVATE_DATA_MAX:
        return -errno.EINVAL
    contexts = [_context(proc, args.broadcast_context[i]) for i in range(count)]
    dev = contexts[0].device
    if any(c.device is not dev or c.destroyed for c in contexts):
        return -errno.EINVAL  # one device's contexts
    if dev.state != ObjectState.ACTIVE:
        return -errno.EBADF
    if not dev.adapter.active:
        return -errno.ENODEV
    if not await _device_active(proc, dev):
        return -errno.EIO
    hargs = s.d3dkmt_submitcommand.from_buffer_copy(bytes(args))
    for i, c in enumerate(contexts):
        hargs.broadcast_context[i].v = c.host_handle
    hargs.priv_drv_data = 0
    hargs.priv_drv_data_size = 0
    hargs.num_history_buffers = 0
    hargs.history_buffer_array = 0
    return await _post(proc, dev.adapter, V.SUBMITCOMMAND, m.IoctlArgs(bytes(hargs)))


async def _device_active(proc: GuestProcess, dev: Any) -> bool:
    """Whether the device may run work: its cached execution state while the host has told of
    no change (SETGUESTDATA), else the host's answer (cached again)."""
    from dxg.guest.device import DEVICEEXECUTION_ACTIVE

    link = dev.adapter.link
    counter = link.device_state_counter
    if dev.execution_state_counter != counter:
        args = s.d3dkmt_getdevicestate()
        args.device.v = dev.host_handle
        args.state_type = _STATE_EXECUTION
        hprocess = await host_process(proc, link)
        out, status = await vmbus.get_device_state(dev.adapter, hprocess, bytes(args))
        if _host_result(status) < 0:
            return False
        state = int(s.d3dkmt_getdevicestate.from_buffer_copy(out).execution_state)
        dev.execution_state = state or DEVICEEXECUTION_ACTIVE
        dev.execution_state_counter = counter
    return bool(dev.execution_state == DEVICEEXECUTION_ACTIVE)


# ---- GPU signals and waits on queues (as on contexts: dxg.guest.ioctl_sync) --------------------


async def submit_signal_sync_objects_to_hwqueue(drv: GuestDriver, proc: GuestProcess,
                                                args: Any, mem: UserMemory) -> int:
    """SubmitSignalSyncObjectsToHwQueue: monitored fences take their values once every queue
    (1..64) has run what was submitted to it before (SIGNALSYNCOBJECT naming the queues)."""
    from dxg.guest.ioctl_sync import _signal_gpu, _u32s, _u64s

    nq, n = int(args.hwqueue_count), int(args.object_count)
    if not 0 < nq <= _MAX_BROADCAST or not 0 < n <= _MAX_OBJECTS:
        return -errno.EINVAL
    queues = [_queue(proc, _to_handle(h))
              for h in _u32s(mem, args.hwqueues, nq, _MAX_BROADCAST)]
    handles = _u32s(mem, args.objects, n, _MAX_OBJECTS)
    values = tuple(_u64s(mem, args.fence_values, n, _MAX_OBJECTS))
    return await _signal_gpu(proc, queues, int(args.flags.value), handles, values, 0, 0,  # type: ignore[arg-type]
                             mem)


async def submit_wait_for_sync_objects_to_hwqueue(drv: GuestDriver, proc: GuestProcess,
                                                  args: Any, mem: UserMemory) -> int:
    """SubmitWaitForSyncObjectsToHwQueue: the queue's later work waits until every monitored
    fence reached its value (WAITFORSYNCOBJECTFROMGPU naming the queue)."""
    from dxg.guest.ioctl_sync import _u32s, _u64s, _wait_gpu

    queue = _queue(proc, args.hwqueue)
    n = int(args.object_count)
    if not 0 < n <= _MAX_OBJECTS:
        return -errno.EINVAL
    handles = _u32s(mem, args.objects, n, _MAX_OBJECTS)
    values = tuple(_u64s(mem, args.fence_values, n, _MAX_OBJECTS))
    return await _wait_gpu(proc, queue, handles, values, 0)  # type: ignore[arg-type]


def _to_handle(value: int) -> Any:
    h = s.d3dkmthandle()
    h.v = value
    return h


# ---- scheduling priorities and device errors -----------------------------------------------------


async def _priority(proc: GuestProcess, args: Any, command: VgpuCommand,
                    in_process: bool) -> int:
    """(The in-process variants carry the same struct: a one-byte extra says which.)"""
    ctx = _context(proc, args.context)
    hargs = s.d3dkmt_setcontextschedulingpriority.from_buffer_copy(bytes(args))
    hargs.context.v = ctx.host_handle
    status, out, _extra = await _send_args(proc, ctx.device.adapter, command, hargs,
                                           b"\1" if in_process else b"\0")
    ret = _host_result(status)
    if ret >= 0:
        args.priority = out.priority
    return ret


async def set_context_scheduling_priority(drv: GuestDriver, proc: GuestProcess, args: Any,
                                          mem: UserMemory) -> int:
    if not PRIORITY_MIN <= args.priority <= PRIORITY_MAX:
        return -errno.EINVAL
    return await _priority(proc, args, V.SETCONTEXTSCHEDULINGPRIORITY, False)


async def set_context_inprocess_scheduling_priority(drv: GuestDriver, proc: GuestProcess,
                                                    args: Any, mem: UserMemory) -> int:
    if not PRIORITY_MIN <= args.priority <= PRIORITY_MAX:
        return -errno.EINVAL
    return await _priority(proc, args, V.SETCONTEXTSCHEDULINGPRIORITY, True)


async def get_context_scheduling_priority(drv: GuestDriver, proc: GuestProcess, args: Any,
                                          mem: UserMemory) -> int:
    return await _priority(proc, args, V.GETCONTEXTSCHEDULINGPRIORITY, False)


async def get_context_inprocess_scheduling_priority(drv: GuestDriver, proc: GuestProcess,
                                                    args: Any, mem: UserMemory) -> int:
    return await _priority(proc, args, V.GETCONTEXTSCHEDULINGPRIORITY, True)


async def mark_device_as_error(drv: GuestDriver, proc: GuestProcess, args: Any,
                               mem: UserMemory) -> int:
    """MarkDeviceAsError: the device's state becomes RESET here at once (as the real driver
    caches it), then on the host (its fences' waiters wake with an error)."""
    dev = _device(proc, args.device)
    dev.execution_state = DEVICEEXECUTION_RESET
    hargs = s.d3dkmt_markdeviceaserror.from_buffer_copy(bytes(args))
    hargs.device.v = dev.host_handle
    status, _, _extra = await _send_args(proc, dev.adapter, V.MARKDEVICEASERROR, hargs)
    return _host_result(status)


HANDLERS: MappingProxyType[str, Any] = MappingProxyType({
    "LX_DXCREATEHWQUEUE": create_hwqueue,
    "LX_DXDESTROYHWQUEUE": destroy_hwqueue,
    "LX_DXSUBMITCOMMANDTOHWQUEUE": submit_command_to_hwqueue,
    "LX_DXSUBMITCOMMAND": submit_command,
    "LX_DXSETCONTEXTSCHEDULINGPRIORITY": set_context_scheduling_priority,
    "LX_DXSETCONTEXTINPROCESSSCHEDULINGPRIORITY": set_context_inprocess_scheduling_priority,
    "LX_DXGETCONTEXTSCHEDULINGPRIORITY": get_context_scheduling_priority,
    "LX_DXGETCONTEXTINPROCESSSCHEDULINGPRIORITY": get_context_inprocess_scheduling_priority,
    "LX_DXMARKDEVICEASERROR": mark_device_as_error,
    "LX_DXSUBMITSIGNALSYNCOBJECTSTOHWQUEUE": submit_signal_sync_objects_to_hwqueue,
    "LX_DXSUBMITWAITFORSYNCOBJECTSTOHWQUEUE": submit_wait_for_sync_objects_to_hwqueue,
})

__all__ = ["HANDLERS", "GuestHwQueue", "release_hwqueue"]
