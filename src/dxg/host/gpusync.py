"""GPU-side signals and waits: each context's timeline as an ordered lane.

A context's GPU timeline is the partition's `Lanes` FIFO under ``lane_of(context)``: whatever is
queued there runs in order, and nothing else waits behind it. Two kinds of turn exist here:

- a GPU **wait** (WAITFORSYNCOBJECTFROMGPU, legacy WaitForSynchronizationObject2) takes a turn
  that lasts until its objects are reached (``SyncObject.wait``: a wait whose object fails ends
  too, so a lane never sticks on an object that went);
- a GPU **signal** (SIGNALSYNCOBJECT on contexts) happens when every one of its contexts has
  finished what it queued before: at once when none has anything queued, else as a turn of
  each of those lanes (taken in a fixed order, so two broadcasts never wait on each other).

Submission plugs in by queueing its work on the same key (``p.lanes.run(lane_of(context),
job)``): a signal queued after a submission then waits for it, and a submission queued after a
GPU wait waits for the wait. Turns of one process are counted (``MAX_GPU_OPS_PER_PROCESS``) and
cancelled when their context or process goes (``context_gone``, ``process_gone``).

Everything here runs on the host's event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

from dxg.host.call import CommandFailed
from dxg.uapi.ntstatus import NTSTATUS

if TYPE_CHECKING:
    from dxg.host.context import HostContext
    from dxg.host.hwqueue import HwQueue
    from dxg.host.partition import Partition
    from dxg.host.process import HostProcess

__all__ = ["MAX_GPU_OPS_PER_PROCESS", "context_gone", "lane_of", "lane_of_queue", "process_gone",
           "queue_gone", "signal_after", "wait_on"]

# GPU signals and waits one process may have queued at once (fire-and-forget commands: past it
# they are refused, and the refusal is logged).
MAX_GPU_OPS_PER_PROCESS = 4096


def lane_of(context: HostContext) -> Hashable:
    """The key of a context's GPU timeline in ``Partition.lanes``."""
    return ("context", context.handle)


def lane_of_queue(queue: HwQueue) -> Hashable:
    """The key of a hardware queue's timeline: its command buffers run there in order, and the
    signals and waits submitted to it take their turns between them."""
    return ("hwqueue", queue.handle)


def signal_after(p: Partition, process: HostProcess, lanes: Sequence[Hashable],
                 signal: Callable[[], None], name: str) -> None:
    """``signal()`` once every lane in ``lanes`` has run what was queued on it before: now,
    when none has anything queued."""
    keys = sorted(set(lanes), key=repr)
    if not any(p.lanes.busy(k) for k in keys):
        signal()
        return

    async def turn() -> None:
        signal()

    _queue(p, process, keys, turn, name)


def wait_on(p: Partition, process: HostProcess, lane: Hashable,
            start: Callable[[], list[asyncio.Future[None]]], name: str,
            give_back: Callable[[list[asyncio.Future[None]]], None] | None = None) -> None:
    """A turn of ``lane`` that starts the waits (``start()``, when the turn comes) and lasts
    until all of them are over, whatever their outcome. Cancelled (its context, queue or
    process went) with some waits over and others not, ``give_back(futures)`` returns what
    the ones that are over took (a mutex's or semaphore's unit), so nothing is lost."""

    async def turn() -> None:
        futures = start()
        if futures:
            try:
                # Cancelling the turn cancels the waits with it.
                await asyncio.gather(*futures, return_exceptions=True)
            except asyncio.CancelledError:
                if give_back is not None:
                    give_back(futures)
                raise

    _queue(p, process, [lane], turn, name)


def _queue(p: Partition, process: HostProcess, keys: list[Hashable],
           job: Callable[[], Awaitable[None]], name: str) -> None:
    sync = process.sync
    ops = sync.gpu_ops
    if sync.gpu_count >= MAX_GPU_OPS_PER_PROCESS:
        raise CommandFailed(NTSTATUS.STATUS_NO_MEMORY,
                            f"{MAX_GPU_OPS_PER_PROCESS} GPU signals and waits queued already")

    async def nested(i: int) -> None:
        if i == len(keys):
            await job()
            return
        await p.lanes.run(keys[i], lambda: nested(i + 1))

    if p.tasks.closed:
        raise CommandFailed(NTSTATUS.STATUS_DEVICE_REMOVED, "the host is closing")
    # Started on the spot (TaskSet.eager): it takes its place in its lanes before the next
    # command is dispatched, so a signal that comes right after finds the lane busy.
    task = p.tasks.eager(nested(0), name)
    sync.gpu_count += 1
    for key in keys:
        ops.setdefault(key, set()).add(task)

    def done(_task: Any) -> None:
        sync.gpu_count -= 1
        for key in keys:
            tasks = ops.get(key)
            if tasks is not None:
                tasks.discard(task)
                if not tasks:
                    del ops[key]

    task.add_done_callback(done)


def context_gone(p: Partition, context: HostContext) -> None:
    """The context went: what it had queued will never run."""
    for task in list(context.device.process.sync.gpu_ops.get(lane_of(context), ())):
        task.cancel()


def queue_gone(p: Partition, queue: HwQueue) -> None:
    """The hardware queue went: the signals and waits it had queued will never run."""
    for task in list(queue.device.process.sync.gpu_ops.get(lane_of_queue(queue), ())):
        task.cancel()


def process_gone(p: Partition, process: HostProcess) -> None:
    for tasks in list(process.sync.gpu_ops.values()):
        for task in list(tasks):
            task.cancel()
