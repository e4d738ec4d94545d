"""Hardware queues and what runs on them: command buffers executed by the adapter's engine, in
submission order per queue and side by side across queues, and device faults.

A queue belongs to a context. Each submission names a command buffer by GPU VA (an allocation
the process mapped) and the value its progress fence takes when the buffer is done. Submissions
arrive fire-and-forget (SUBMITCOMMANDTOHWQUEUE needs no reply): each becomes a turn of the
queue's lane; a turn copies the command buffer out of memory (so the process cannot change it
under the engine), takes a snapshot of the process's VA space, waits for an engine slot of the
adapter (by the context's scheduling priority: dxg.host.scheduler) and runs the engine on a
worker thread (one slot, one core; a big GEMM of a queue with nothing behind it may borrow idle
slots: dxg.backends.fanout). A command buffer that faults (a bad opcode, an unmapped or
out-of-range address, a shape that overruns its buffer) puts its device in the error state:
GetDeviceState reports it (with the faulting address), the guest is told (SETGUESTDATA), its
fences' waiters wake with an error and its later submissions are dropped; every other device
carries on. Errors of a submission never come back as a reply: they surface through the
device's state, as on the real driver.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from dxg.host import gpusync
from dxg.host.call import Call, CommandFailed, Handler
from dxg.host.memory import expect_extra, ioctl_args, ioctl_reply
from dxg.host.pagingqueue import register_queue
from dxg.host.syncobject import FLAG_NO_SIGNAL, MONITORED_FENCE, SyncObject
from dxg.protocol import messages as m
from dxg.protocol.commands import VgpuCommand
from dxg.uapi.handles import HandleType
from dxg.uapi.ntstatus import NTSTATUS
from dxg.uapi.structs import (
    d3dkmt_createhwqueue,
    d3dkmt_destroyhwqueue,
    d3dkmt_deviceexecution_state,
    d3dkmt_submitcommand,
    d3dkmt_submitcommandtohwqueue,
)

if TYPE_CHECKING:
    from dxg.host.context import HostContext
    from dxg.host.device import HostDevice
    from dxg.host.memory import FenceBlock
    from dxg.host.partition import Partition
    from dxg.host.process import HostProcess

log = logging.getLogger(__name__)

INVALID = NTSTATUS.STATUS_INVALID_PARAMETER
EXECUTION_ACTIVE = int(d3dkmt_deviceexecution_state._D3DKMT_DEVICEEXECUTION_ACTIVE)
ERROR_OUTOFMEMORY = int(d3dkmt_deviceexecution_state._D3DKMT_DEVICEEXECUTION_ERROR_OUTOFMEMORY)
ERROR_DMAFAULT = int(d3dkmt_deviceexecution_state._D3DKMT_DEVICEEXECUTION_ERROR_DMAFAULT)
ERROR_DMAPAGEFAULT = int(
    d3dkmt_deviceexecution_state._D3DKMT_DEVICEEXECUTION_ERROR_DMAPAGEFAULT)
# Submissions one queue may have waiting (fire-and-forget: past it the device runs out of
# memory, as a real GPU whose ring overflowed would, instead of the host holding unbounded work).
MAX_QUEUED = 4096
# The largest command buffer (it is copied out of the process's memory before it runs).
MAX_COMMAND_BYTES = 16 << 20
MAX_BROADCAST_CONTEXT = 64  # D3DDDI_MAX_BROADCAST_CONTEXT


class ProgressFence(SyncObject):
    """A queue's progress fence (HandleType.MONITOREDFENCE): a monitored fence whose value is
    in a shared slot, which only the queue signals; CPU and GPU waits work on it."""

    __slots__ = ()

    def __init__(self, device: HostDevice, block: FenceBlock, index: int) -> None:
        super().__init__(0, device, MONITORED_FENCE, block=block, index=index,
                         flags=FLAG_NO_SIGNAL)


@dataclass(eq=False, slots=True)
class HwQueue:
    handle: int
    context: HostContext
    fence: ProgressFence
    flags: int = 0
    queued: int = 0  # submissions waiting or running
    executed: int = 0  # command buffers run to their end
    commands: int = 0  # commands they held
    alive: bool = True

    @property
    def device(self) -> HostDevice:
        return self.context.device

    def census(self) -> dict[str, Any]:
        return {"handle": self.handle, "context": self.context.handle,
                "fence": self.fence.handle, "fence_value": self.fence.value,
                "queued": self.queued, "executed": self.executed, "commands": self.commands}


def queue_of(p: Partition, process: HostProcess, handle: int, adapter: Any) -> HwQueue:
    queue = p.handles.get(handle, HandleType.HWQUEUE)
    if (queue is None or queue.device.process is not process
            or queue.device.adapter is not adapter):
        raise CommandFailed(NTSTATUS.STATUS_INVALID_HANDLE,
                            f"hardware queue 0x{handle:08x} is not this process's")
    return queue


def drop_hwqueue(p: Partition, queue: HwQueue) -> None:
    """The queue goes; its submissions still waiting find it gone and do nothing."""
    if not queue.alive:
        return
    queue.alive = False
    gpusync.queue_gone(p, queue)
    context = queue.context
    context.hwqueues.pop(queue.handle, None)
    process = context.device.process
    fence = queue.fence
    fence.fail(NTSTATUS.STATUS_INVALID_HANDLE)  # its waiters wake: it will never move again
    if fence.block is not None:
        process.memory.free_fence_slot(fence.block, fence.index)
        fence.block = None
    p.free(fence.handle, HandleType.MONITOREDFENCE, process)
    p.free(queue.handle, HandleType.HWQUEUE, process)


def fault_device(p: Partition, device: HostDevice, state: int, va: int = 0,
                 why: str = "") -> None:
    """The device's work faulted: it enters the error state (once), the guest is told, and
    whatever waits on its fences wakes with an error."""
    if (device.execution_state != EXECUTION_ACTIVE
            or p.handles.get(device.handle, HandleType.DEVICE) is not device):
        return  # faulted already, or gone
    log.info("partition %d: device 0x%08x faulted (%d) at 0x%x: %s", p.id, device.handle,
             state, va, why)
    for context in device.contexts.values():  # its timelines stop: what waits there goes
        gpusync.context_gone(p, context)
        for queue in context.hwqueues.values():
            gpusync.queue_gone(p, queue)
    device.fault_va = va
    device.fault_reason = why
    p.set_device_execution_state(device.handle, state)
    from dxg.host import syncobject as so

    so.fail_device(p, device, NTSTATUS.STATUS_DEVICE_REMOVED)


# ---- the commands ------------------------------------------------------------------------------


def create_hwqueue(p: Partition, call: Call, body: m.IoctlArgs) -> m.IoctlArgsReturn:
    """CREATEHWQUEUE: a queue on a context and its progress fence (the reply's extra: where
    the fence's value is; its block's descriptor beside it on a local link)."""
    args = ioctl_args(body, d3dkmt_createhwqueue)
    process = p.process(call)
    context = p.handles.get(args.context.v, HandleType.CONTEXT)
    if (context is None or context.device.process is not process
            or context.device.adapter is not call.adapter):
        raise CommandFailed(NTSTATUS.STATUS_INVALID_HANDLE, "not this process's context")
    if len(body.extra) > 128 * 1024:
        raise CommandFailed(INVALID, "private data too large")
    device = context.device
    memory = process.memory
    block, index = memory.fence_slot(p.config, device.adapter.index)
    fence = ProgressFence(device, block, index)
    queue = HwQueue(0, context, fence, int(args.flags.value))
    register_queue(p, call, process, queue, HandleType.HWQUEUE, fence)
    context.hwqueues[queue.handle] = queue
    args.queue.v = queue.handle
    args.queue_progress_fence.v = fence.handle
    args.queue_progress_fence_cpu_va = 0
    args.queue_progress_fence_gpu_va = 0
    return ioctl_reply(args, fence.ref().pack())


def destroy_hwqueue(p: Partition, call: Call, body: m.IoctlArgs) -> m.IoctlArgsReturn:
    args = ioctl_args(body, d3dkmt_destroyhwqueue)
    expect_extra(body.extra, 0, "DESTROYHWQUEUE")
    drop_hwqueue(p, queue_of(p, p.process(call), args.queue.v, call.adapter))
    return ioctl_reply(args)


def submit_command_to_hwqueue(p: Partition, call: Call,
                              body: m.IoctlArgs) -> m.IoctlArgsReturn:
    """SUBMITCOMMANDTOHWQUEUE: the command buffer at ``command_buffer`` (GPU VA) runs after the
    queue's earlier work; then the progress fence takes ``hwqueue_progress_fence_id``."""
    args = ioctl_args(body, d3dkmt_submitcommandtohwqueue)
    process = p.process(call)
    queue = queue_of(p, process, args.hwqueue.v, call.adapter)
    device = queue.device
    length = int(args.command_length)
    if device.execution_state != EXECUTION_ACTIVE:
        raise CommandFailed(NTSTATUS.STATUS_DEVICE_REMOVED, "the device is in an error state")
    if not 0 < length <= MAX_COMMAND_BYTES:
        raise CommandFailed(INVALID, f"a command buffer of {length} bytes")
    if queue.queued >= MAX_QUEUED:
        fault_device(p, device, ERROR_OUTOFMEMORY, 0, f"more than {MAX_QUEUED} submissions")
        raise CommandFailed(NTSTATUS.STATUS_NO_MEMORY, "the queue is full")
    queue.queued += 1
    va, value = int(args.command_buffer), int(args.hwqueue_progress_fence_id)

    def turn() -> Any:
        return _execute(p, queue, va, length, value)

    if p.tasks.closed:
        queue.queued -= 1
        raise CommandFailed(NTSTATUS.STATUS_DEVICE_REMOVED, "the host is closing")
    # Started on the spot: it takes its place in the queue's lane before the next command is
    # dispatched (a signal submitted right after waits for it: dxg.host.gpusync).
    p.tasks.eager(p.lanes.run(gpusync.lane_of_queue(queue), turn),
                  f"partition {p.id} hwqueue 0x{queue.handle:08x}")
    return ioctl_reply(args)


async def _execute(p: Partition, queue: HwQueue, va: int, length: int, value: int) -> None:
    """One submission's turn on its queue: the buffer runs, then the progress fence moves."""
    try:
        if not queue.alive:
            return
        result = await run_buffer(p, queue.context, va, length, lambda: queue.alive,
                                  lambda: queue.queued <= 1)
        if result is None:
            return
        queue.executed += 1
        queue.commands += int(getattr(result, "commands", 0))
        if queue.alive:
            queue.fence.signal(value)
    finally:
        queue.queued -= 1


class _Skip(Exception):
    """The buffer will not run (its context, queue, process or device went meanwhile)."""


async def run_buffer(p: Partition, context: HostContext, va: int, length: int,
                     alive: Callable[[], bool] = lambda: True,
                     lone: Callable[[], bool] = lambda: False) -> Any:
    """Run the command buffer at ``va`` for ``context``'s device: its result, or None when it
    did not run (its context, process or device went, the device was in error, ``alive()``
    says no, or it faulted now). The engine slot is taken only once the job has its worker
    slots, and the buffer and the VA space are read only then (what the job will use).
    ``lone()`` (asked on the worker thread, op by op) says that nothing waits behind the
    buffer on its queue: then its big ops may borrow idle engine slots (dxg.backends.fanout),
    while a backlog keeps one slot per buffer and gets its parallelism from other queues."""
    from dxg.backends.engine import EngineFault
    from dxg.backends.fanout import FanOut
    from dxg.host.placement import promote_device
    from dxg.host.vaspace import VaFault, vaspace_of

    device = context.device
    process = device.process
    adapter = device.adapter
    engine = adapter.engine
    backend = p.config.backend
    index = adapter.index
    got: list[Any] = []

    def runnable() -> bool:
        return (context.alive and alive() and process.alive
                and device.execution_state == EXECUTION_ACTIVE
                and p.handles.get(device.handle, HandleType.DEVICE) is device)

    async def admit() -> None:
        if not runnable():
            raise _Skip
        await engine.acquire(context.priority * 16 + context.inprocess_priority)
        try:
            if not runnable():
                raise _Skip
            promote_device(device)  # its demoted memory comes back first, by priority
            space = vaspace_of(process, adapter, create=False)
            if space is None:
                fault_device(p, device, ERROR_DMAPAGEFAULT, va, "no GPU VA space")
                raise _Skip
            snapshot = space.snapshot()
            try:
                got.append(bytes(snapshot.view(va, length, False)))
            except VaFault as e:
                fault_device(p, device, ERROR_DMAPAGEFAULT, e.va, f"command buffer: {e.why}")
                raise _Skip from None
            got.append(snapshot)
        except BaseException:
            engine.release(ran=False)
            raise

    def job(cancelled: Any) -> Any:
        buffer, snapshot = got
        fanout = FanOut(engine, p.host.workers.submit, lone)
        return backend.execute(index, buffer, snapshot.view, cancelled, fanout)

    try:
        result = await p.run_blocking(process, job, device=device, admit=admit,
                                      done=engine.release)
    except _Skip:
        return None
    except EngineFault as e:
        if e.kind != "CANCELLED":  # (cancelled: its process or device is going)
            state = ERROR_DMAPAGEFAULT if e.kind == "PAGE_FAULT" else ERROR_DMAFAULT
            fault_device(p, device, state, e.va, str(e))
        return None
    context.executed += 1
    context.commands += int(getattr(result, "commands", 0))
    return result


def submit_command(p: Partition, call: Call, body: m.IoctlArgs) -> m.IoctlArgsReturn:
    """SUBMITCOMMAND: the command buffer runs on each of its 1..64 contexts' timelines (a
    broadcast), after what each has queued; fences signalled on a context after it see it
    done. Fire-and-forget like a queue submission."""
    from dxg.host.context import context_of

    args = ioctl_args(body, d3dkmt_submitcommand)
    expect_extra(body.extra, 0, "SUBMITCOMMAND")
    count = int(args.broadcast_context_count)
    length = int(args.command_length)
    if not 0 < count <= MAX_BROADCAST_CONTEXT:
        raise CommandFailed(INVALID, f"{count} contexts")
    if not 0 < length <= MAX_COMMAND_BYTES:
        raise CommandFailed(INVALID, f"a command buffer of {length} bytes")
    contexts = [context_of(p, call, int(args.broadcast_context[i].v)) for i in range(count)]
    if len({id(c) for c in contexts}) != count:
        raise CommandFailed(INVALID, "a context named twice")
    for context in contexts:
        if context.device.execution_state != EXECUTION_ACTIVE:
            raise CommandFailed(NTSTATUS.STATUS_DEVICE_REMOVED, "a device in an error state")
        if context.queued >= MAX_QUEUED:
            fault_device(p, context.device, ERROR_OUTOFMEMORY, 0,
                         f"more than {MAX_QUEUED} submissions on a context")
            raise CommandFailed(NTSTATUS.STATUS_NO_MEMORY, "the context's timeline is full")
    if p.tasks.closed:
        raise CommandFailed(NTSTATUS.STATUS_DEVICE_REMOVED, "the host is closing")
    va = int(args.command_buffer)
    for context in contexts:
        context.queued += 1

        async def turn(context: HostContext = context) -> Any:
            try:
                return await run_buffer(p, context, va, length,
                                        lone=lambda: context.queued <= 1)
            finally:
                context.queued -= 1

        p.tasks.eager(p.lanes.run(gpusync.lane_of(context), turn),
                      f"partition {p.id} context 0x{context.handle:08x}")
    return ioctl_reply(args)


HANDLERS: MappingProxyType[VgpuCommand, Handler] = MappingProxyType({
    VgpuCommand.CREATEHWQUEUE: create_hwqueue,
    VgpuCommand.DESTROYHWQUEUE: destroy_hwqueue,
    VgpuCommand.SUBMITCOMMANDTOHWQUEUE: submit_command_to_hwqueue,
    VgpuCommand.SUBMITCOMMAND: submit_command,
})

__all__ = ["HANDLERS", "HwQueue", "drop_hwqueue", "fault_device", "queue_of"]
