"""Hardware queues and what runs on them: command buffers executed by the adapter's engine, in
submission order per queue and side by side across queues, and device faults.

A queue belongs to a context. Each submission names a command buffer by GPU VA (an allocation
the process mapped) and the value its progress fence takes when the buffer is done. Submissions
arrive fire-and-forget (SUBMITCOMMANDTOHWQUEUE needs no reply): each becomes a turn of the
queue's lane; a turn copies the command buffer out of memory (so the process cannot change it
under the engine), takes a snapshot of the process's VA space, waits for an engine slot of the
adapter (by the context's scheduling priority: dxg.host.scheduler) and runs the engine on a
worker thread (one slot, one core; a big GEMM may borrow slots nobody is using:
dxg.backends.fanout). A command buffer that faults (a bad opcode, an unmapped or
out-of-range address, a shape that overruns its buffer) puts its device in the error state:
GetDeviceState reports it (with the faulting address), the guest is told (SETGUESTDATA), its
fences' waiters wake with an error and its later submissions are dropped; every other device
carries on. A buffer that has run HostConfig.tdr_seconds and is still running is stopped
between commands the same way, its device HUNG (the TDR: `Watchdog`). Errors of a submission never come
back as a reply: they surface through the device's state, as on the real driver.

The engine slot goes by the process's compute share, then the context's priority
(dxg.host.scheduler: `engine_account` is the process's account on an adapter).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from dxg.host import gpusync
from dxg.host.call import Call, CommandFailed, Handler
from dxg.host.memory import expect_extra, ioctl_args, ioctl_reply
from dxg.host.pagingqueue import register_queue
from dxg.host.scheduler import EngineAccount, EngineGroup, Slot
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
    from dxg.backends import Cancelled
    from dxg.host.adapter import HostAdapter
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
EXECUTION_HUNG = int(d3dkmt_deviceexecution_state._D3DKMT_DEVICEEXECUTION_HUNG)  # the TDR
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
    if p.tasks.closed:
        raise CommandFailed(NTSTATUS.STATUS_DEVICE_REMOVED, "the host is closing")
    _queued(queue, call.adapter.engine, 1)
    va, value = int(args.command_buffer), int(args.hwqueue_progress_fence_id)

    def turn() -> Any:
        return _execute(p, queue, va, length, value)

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
        result = await run_buffer(p, queue.context, va, length, lambda: queue.alive)
        if result is None:
            return
        queue.executed += 1
        queue.commands += int(getattr(result, "commands", 0))
        if queue.alive:
            queue.fence.signal(value)
    finally:
        _queued(queue, queue.device.adapter.engine, -1)


def _queued(timeline: Any, engine: Any, n: int) -> None:
    """``timeline`` (a queue or a context) has ``n`` more submissions; the adapter's engine
    counts the timelines that have any (dxg.backends.fanout lends slots to a lone one)."""
    before = timeline.queued
    timeline.queued = before + n
    if (before > 0) != (timeline.queued > 0):
        engine.timelines += 1 if timeline.queued > 0 else -1


class _Skip(Exception):
    """The buffer will not run (its context, queue, process or device went meanwhile)."""


class Watchdog:
    """The TDR of one run: the engine's ``cancelled``, set when the job is told to stop (its
    process or device goes) and once the run has used its time limit (then ``expired``). The
    time is the CPU time of the run's thread (what the buffer used of its core; time spent
    waiting for a core on a busy host does not count), read only when the monotonic clock says
    the limit could have been reached (a CPU clock is a system call; the monotonic one is not).
    Made and asked on the run's thread. The engine asks it between commands (and between a
    convolution's kernel rows): one command is never cut short (its time is bounded by its
    operands, which lie in memory the process mapped). A buffer whose last command ends past
    the limit has completed: it is not hung."""

    __slots__ = ("cancelled", "check_at", "cpu0", "expired", "limit")

    def __init__(self, cancelled: threading.Event, seconds: float) -> None:
        self.cancelled = cancelled
        self.limit = seconds
        self.cpu0 = time.thread_time()
        self.check_at = time.monotonic() + seconds  # (CPU time grows no faster than this)
        self.expired = False

    def is_set(self) -> bool:
        if self.cancelled.is_set():
            return True
        now = time.monotonic()
        if now < self.check_at:
            return False
        used = time.thread_time() - self.cpu0
        if used >= self.limit:
            self.expired = True
            return True
        self.check_at = now + (self.limit - used)
        return False


def engine_account(p: Partition, process: HostProcess, adapter: HostAdapter) -> EngineAccount:
    """The process's account on the adapter's engine (made with its first job there, weighed
    by its compute share), in its guest's group (dxg.host.scheduler)."""
    account = process.engine_accounts.get(adapter.index)
    if account is None:
        group = p.engine_groups.get(adapter.index)
        if group is None:
            group = p.engine_groups[adapter.index] = EngineGroup(f"partition {p.id}")
        account = process.engine_accounts[adapter.index] = EngineAccount(
            group, process.compute_share, f"partition {p.id} pid {process.pid}")
    return account


async def run_buffer(p: Partition, context: HostContext, va: int, length: int,
                     alive: Callable[[], bool] = lambda: True) -> Any:
    """Run the command buffer at ``va`` for ``context``'s device: its result, or None when it
    did not run (its context, process or device went, the device was in error, ``alive()``
    says no, or it faulted now). The engine slot is taken only once the job has its worker
    slots, and the buffer and the VA space are read only then (what the job will use). Its
    big ops may borrow engine slots nobody is using (dxg.backends.fanout) while its timeline is
    the only one of the adapter with work, whatever waits behind it on its own (a queue runs
    in order: its backlog could not use them); none is lent while another job waits for a
    slot, and a lent one goes back once a job wants it.

    The engine slot comes by the process's compute share and then the context's priority
    (dxg.host.scheduler); the engine time measured on the threads that ran the buffer (its
    own and fan-out helpers) is charged to the process's share. A buffer that has run
    ``HostConfig.tdr_seconds`` and is still running is stopped between commands (`Watchdog`)
    and its device enters the HUNG state, as a TDR does."""
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
    account = engine_account(p, process, adapter)
    tdr = p.config.tdr_seconds
    got: list[Any] = []
    held: list[Slot] = []  # the job's engine slot, once it has one
    watch: list[Watchdog] = []

    def runnable() -> bool:
        return (context.alive and alive() and process.alive
                and device.execution_state == EXECUTION_ACTIVE
                and p.handles.get(device.handle, HandleType.DEVICE) is device)

    async def admit() -> None:
        if not runnable():
            raise _Skip
        held.append(await engine.acquire(context.priority * 16 + context.inprocess_priority,
                                         account))
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
            engine.release(held.pop(), ran=False)
            raise

    def job(cancelled: threading.Event) -> Any:
        buffer, snapshot = got
        slot = held[0]
        fanout = FanOut(engine, p.host.workers.submit, lambda: engine.timelines <= 1,
                        charge=functools.partial(engine.charge, slot, lent=True))
        stop: Cancelled = cancelled
        if tdr > 0:
            stop = Watchdog(cancelled, tdr)
            watch.append(stop)
        t0 = time.monotonic_ns()
        try:
            return backend.execute(index, buffer, snapshot.view, stop, fanout)
        finally:
            engine.charge(slot, time.monotonic_ns() - t0)

    def done() -> None:
        slot = held.pop()
        engine.release(slot)
        # (its own thread's time is counted by run_blocking; the borrowed slots' here)
        p.statistics.engine_time(device, slot.lent_ns)

    try:
        result = await p.run_blocking(process, job, device=device, admit=admit, done=done)
    except _Skip:
        return None
    except EngineFault as e:
        if e.kind != "CANCELLED":
            state = ERROR_DMAPAGEFAULT if e.kind == "PAGE_FAULT" else ERROR_DMAFAULT
            fault_device(p, device, state, e.va, str(e))
        elif watch and watch[0].expired:  # the TDR (else its process or device is going)
            engine.hung += 1
            fault_device(p, device, EXECUTION_HUNG, 0,
                         f"ran {tdr:g} s on the engine and was still running (the TDR): "
                         f"stopped before command {e.command_index}")
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
        _queued(context, context.device.adapter.engine, 1)

        async def turn(context: HostContext = context) -> Any:
            try:
                return await run_buffer(p, context, va, length)
            finally:
                _queued(context, context.device.adapter.engine, -1)

        p.tasks.eager(p.lanes.run(gpusync.lane_of(context), turn),
                      f"partition {p.id} context 0x{context.handle:08x}")
    return ioctl_reply(args)


HANDLERS: MappingProxyType[VgpuCommand, Handler] = MappingProxyType({
    VgpuCommand.CREATEHWQUEUE: create_hwqueue,
    VgpuCommand.DESTROYHWQUEUE: destroy_hwqueue,
    VgpuCommand.SUBMITCOMMANDTOHWQUEUE: submit_command_to_hwqueue,
    VgpuCommand.SUBMITCOMMAND: submit_command,
})

__all__ = ["HANDLERS", "HwQueue", "Watchdog", "drop_hwqueue", "engine_account", "fault_device",
           "queue_of"]
