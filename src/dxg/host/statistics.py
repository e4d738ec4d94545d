"""QUERYSTATISTICS and INVALIDATECACHE: what a guest learns of the work its processes do on an
adapter, and the cache maintenance a coherent adapter does not need.

Counters are counted where the work happens and kept here, per partition (one guest: a guest
sees its own processes' work, never another guest's):

- command buffers and their commands: each context counts what it ran to the end
  (``HostContext.executed`` / ``commands``, by ``dxg.host.hwqueue.run_buffer``, queue or
  broadcast); a context that goes hands its counts to its (process, adapter) here
  (``context_gone``);
- engine time: the worker-thread time of each job run for a device (``Partition.run_blocking``
  starts a ``JobClock`` when the job is handed to its thread and calls ``job_done`` when it is
  over): command buffers and backend escapes, not pydxg SLEEP escapes. A job still running counts
  up to now, so the engine time is exact whenever it is read and a rate between two readings
  (``dxg ls``/``ps``/``top``: ``process_work``, ``adapter_work``) shows a long job while it runs;
- faults and resets: every change of a device's execution state away from ACTIVE
  (``Partition.set_device_execution_state``, which ``fault_device`` and MarkDeviceAsError go
  through) calls ``device_state``.

A process that goes hands its counts to its adapters (``process_gone``), so an adapter's
counters cover the processes that were as well as the live ones. Objects alive now (devices,
contexts, queues, allocations, committed bytes) are read from the live objects when asked.
Everything here runs on the host's event loop. The result layout: dxg.uapi.statistics,
docs/statistics.md.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

from dxg.host.call import Call, CommandFailed, Handler
from dxg.host.device import EXECUTION_ACTIVE, device_of
from dxg.host.memory import expect_extra, ioctl_args, ioctl_reply
from dxg.protocol import messages as m
from dxg.protocol.commands import VgpuCommand
from dxg.protocol.guids import luid_to_int
from dxg.uapi.handles import HandleType
from dxg.uapi.memory import GROUP_LOCAL, GROUP_NONLOCAL
from dxg.uapi.ntstatus import NTSTATUS
from dxg.uapi.statistics import (
    QUERY_ADAPTER,
    QUERY_PROCESS,
    QUERY_PROCESS_ADAPTER,
    RESULT_BYTES,
    StatisticsRecord,
)
from dxg.uapi.structs import (
    d3dkmt_deviceexecution_state,
    d3dkmt_invalidatecache,
    d3dkmt_querystatistics,
    d3dkmt_querystatistics_type,
)

if TYPE_CHECKING:
    from dxg.host.adapter import HostAdapter
    from dxg.host.context import HostContext
    from dxg.host.device import HostDevice
    from dxg.host.partition import Partition
    from dxg.host.process import HostProcess

__all__ = ["HANDLERS", "Counters", "JobClock", "PartitionStatistics", "adapter_work",
           "process_work"]

INVALID = NTSTATUS.STATUS_INVALID_PARAMETER
_EXECUTION_RESET = int(d3dkmt_deviceexecution_state._D3DKMT_DEVICEEXECUTION_RESET)
_KNOWN_TYPES = frozenset(int(t) for t in d3dkmt_querystatistics_type)


@dataclass(slots=True)
class Counters:
    """Cumulative counts of one scope."""

    command_buffers: int = 0
    commands: int = 0
    engine_busy_ns: int = 0
    faults: int = 0
    resets: int = 0
    demoted_bytes: int = 0
    promoted_bytes: int = 0
    cpu_waits: int = 0  # WAITFORSYNCOBJECTFROMCPU registered (fence waits of the CPU)
    gpu_waits: int = 0  # WAITFORSYNCOBJECTFROMGPU queued (a context's work waits on fences)

    def add(self, other: Counters) -> None:
        self.command_buffers += other.command_buffers
        self.commands += other.commands
        self.engine_busy_ns += other.engine_busy_ns
        self.faults += other.faults
        self.resets += other.resets
        self.demoted_bytes += other.demoted_bytes
        self.promoted_bytes += other.promoted_bytes
        self.cpu_waits += other.cpu_waits
        self.gpu_waits += other.gpu_waits

    def add_paged(self, paged: tuple[int, int]) -> None:
        self.demoted_bytes += paged[0]
        self.promoted_bytes += paged[1]

    def add_context(self, context: HostContext) -> None:
        self.command_buffers += context.executed
        self.commands += context.commands


class JobClock:
    """One job's time on its worker thread. The thread writes ``start_ns`` and then ``end_ns``
    (single stores); the loop reads them, so a running job's time so far can be counted."""

    __slots__ = ("end_ns", "process", "start_ns")

    def __init__(self, process: HostProcess) -> None:
        self.process = process
        self.start_ns = 0  # 0: not on its thread yet
        self.end_ns = 0  # 0: still running

    def start(self) -> None:
        self.start_ns = time.monotonic_ns()

    def stop(self) -> None:
        self.end_ns = time.monotonic_ns()

    @property
    def running(self) -> bool:
        return bool(self.start_ns) and not self.end_ns

    def elapsed(self, now_ns: int) -> int:
        """ns on its thread up to ``now_ns`` (all of it once it is over)."""
        start, end = self.start_ns, self.end_ns
        if not start:
            return 0
        return max(0, (end or now_ns) - start)


class PartitionStatistics:
    """The counters of one partition that outlive the objects they count: per live process
    and adapter, and per adapter for the processes that went; and the clocks of the jobs on
    the engine now."""

    __slots__ = ("_clocks", "_gone", "_processes")

    def __init__(self) -> None:
        # host process handle -> adapter index -> its counts not held by a live context
        self._processes: dict[int, dict[int, Counters]] = {}
        self._gone: dict[int, Counters] = {}  # adapter index -> processes that went
        self._clocks: dict[int, set[JobClock]] = {}  # adapter index -> jobs handed to threads

    def _counters(self, process: HostProcess, adapter_index: int) -> Counters:
        """Where an event of ``process`` on the adapter counts (once it is going: the
        adapter's own)."""
        if process.alive:
            per = self._processes.setdefault(process.handle, {})
            return per.setdefault(adapter_index, Counters())
        return self._gone.setdefault(adapter_index, Counters())

    # ---- events --------------------------------------------------------------------------------

    def engine_time(self, device: HostDevice, ns: int) -> None:
        """A job of ``device`` held a worker thread for ``ns`` nanoseconds."""
        if ns > 0:
            self._counters(device.process, device.adapter.index).engine_busy_ns += ns

    def job_started(self, device: HostDevice) -> JobClock:
        """A job of ``device`` is being handed to a worker thread: its clock counts from when
        the thread starts it (``JobClock.start``) until ``job_done``."""
        clock = JobClock(device.process)
        self._clocks.setdefault(device.adapter.index, set()).add(clock)
        return clock

    def job_done(self, device: HostDevice, clock: JobClock) -> None:
        """The job is over (or never started): its time counts as engine time."""
        clocks = self._clocks.get(device.adapter.index)
        if clocks is not None:
            clocks.discard(clock)
            if not clocks:
                del self._clocks[device.adapter.index]
        if clock.start_ns:
            self.engine_time(device, clock.elapsed(time.monotonic_ns()))

    def running(self, adapter_index: int, now_ns: int,
                process: HostProcess | None = None) -> tuple[int, int]:
        """(jobs running now, their ns so far) on the adapter: of ``process``, or (None) of
        the processes that went."""
        jobs = spent = 0
        for clock in self._clocks.get(adapter_index, ()):
            if (clock.process is process) if process is not None else not clock.process.alive:
                jobs += clock.running
                spent += 0 if clock.end_ns else clock.elapsed(now_ns)
        return jobs, spent

    def adapters_of(self, process: HostProcess) -> set[int]:
        """The adapters on which ``process`` has counts or jobs."""
        out = set(self._processes.get(process.handle, ()))
        out.update(i for i, clocks in self._clocks.items()
                   if any(c.process is process for c in clocks))
        return out

    def running_jobs(self, adapter_index: int) -> int:
        """Jobs on the adapter's worker threads now (every process's)."""
        return sum(c.running for c in self._clocks.get(adapter_index, ()))

    def fence_wait(self, process: HostProcess, adapter_index: int, cpu: bool) -> None:
        """A wait on fences was taken: from the CPU (``cpu``) or queued on a context."""
        counters = self._counters(process, adapter_index)
        if cpu:
            counters.cpu_waits += 1
        else:
            counters.gpu_waits += 1

    def device_state(self, device: HostDevice, state: int) -> None:
        """``device`` left the ACTIVE state for ``state``: a reset (MarkDeviceAsError) or a
        fault (any other error state)."""
        if state == EXECUTION_ACTIVE:
            return
        counters = self._counters(device.process, device.adapter.index)
        if state == _EXECUTION_RESET:
            counters.resets += 1
        else:
            counters.faults += 1

    def context_gone(self, context: HostContext) -> None:
        device = context.device
        self._counters(device.process, device.adapter.index).add_context(context)

    def process_gone(self, process: HostProcess) -> None:
        """The process went (its contexts and memory before it): its counts stay with its
        adapters."""
        for index, counters in self._processes.pop(process.handle, {}).items():
            self._gone.setdefault(index, Counters()).add(counters)
        for index in process.memory.paged_gone:
            self._gone.setdefault(index, Counters()).add_paged(process.memory.paged(index))

    # ---- views ---------------------------------------------------------------------------------

    def of_process(self, process: HostProcess, adapter_index: int | None = None,
                   now_ns: int | None = None) -> Counters:
        """A live process's counts on one adapter (None: on every adapter of this host), its
        running jobs' engine time up to ``now_ns`` (None: now) included."""
        now = time.monotonic_ns() if now_ns is None else now_ns
        total = Counters()
        for index, counters in self._processes.get(process.handle, {}).items():
            if adapter_index is None or index == adapter_index:
                total.add(counters)
        for index in self._clocks:
            if adapter_index is None or index == adapter_index:
                total.engine_busy_ns += self.running(index, now, process)[1]
        for device in process.devices.values():
            if adapter_index is None or device.adapter.index == adapter_index:
                for context in device.contexts.values():
                    total.add_context(context)
        memory = process.memory
        for index in {*memory.usages, *memory.paged_gone}:
            if adapter_index is None or index == adapter_index:
                total.add_paged(memory.paged(index))
        return total

    def of_adapter(self, p: Partition, adapter_index: int, now_ns: int | None = None) -> Counters:
        """An adapter's counts: the processes that went and the live ones (running jobs up to
        ``now_ns``, None: now)."""
        now = time.monotonic_ns() if now_ns is None else now_ns
        total = Counters()
        gone = self._gone.get(adapter_index)
        if gone is not None:
            total.add(gone)
        total.engine_busy_ns += self.running(adapter_index, now)[1]
        for process in p.processes.values():
            total.add(self.of_process(process, adapter_index, now))
        return total


# ---- the census's work figures (dxg ls / ps / top) ---------------------------------------------


def _queued(contexts: list[HostContext]) -> int:
    """Submissions waiting or running on these contexts and their hardware queues."""
    return sum(c.queued + sum(q.queued for q in c.hwqueues.values()) for c in contexts)


def _event_counts(counters: Counters) -> dict[str, int]:
    """The cumulative event counts of the census (metrics: dxg.cli.metrics): commands run,
    faults, resets, and fence waits from the CPU and on contexts."""
    return {"commands": counters.commands, "faults": counters.faults,
            "resets": counters.resets, "cpu_waits": counters.cpu_waits,
            "gpu_waits": counters.gpu_waits}


def process_work(p: Partition, process: HostProcess, now_ns: int) -> list[dict[str, int]]:
    """Per adapter the process works on: cumulative engine time (``engine_busy_ns``, running
    jobs up to ``now_ns``: a tool divides the growth between two censuses by the time between
    their ``now_ns``), command buffers run, jobs on the engine now, submissions waiting or
    running, fences, and devices out of the ACTIVE state."""
    stats = p.statistics
    indices = {d.adapter.index for d in process.devices.values()} | stats.adapters_of(process)
    fences: dict[int, int] = {}
    for o in process.sync.objects.values():
        fences[o.adapter.index] = fences.get(o.adapter.index, 0) + 1
    out = []
    for index in sorted(indices):
        devices = [d for d in process.devices.values() if d.adapter.index == index]
        contexts = [c for d in devices for c in d.contexts.values()]
        counters = stats.of_process(process, index, now_ns)
        out.append({
            "adapter": index,
            "engine_busy_ns": counters.engine_busy_ns,
            "command_buffers": counters.command_buffers,
            "running": stats.running(index, now_ns, process)[0],
            "queued": _queued(contexts),
            # its synchronization objects and its queues' progress fences
            "fences": fences.get(index, 0) + sum(len(c.hwqueues) for c in contexts),
            "faulted": sum(d.execution_state != EXECUTION_ACTIVE for d in devices),
            **_event_counts(counters),
        })
    return out


def adapter_work(p: Partition, adapter: HostAdapter, now_ns: int) -> dict[str, int]:
    """The adapter as this guest uses it: cumulative engine time of its processes (live and
    gone), command buffers run, jobs running now, submissions waiting or running; and the
    engine's slots (jobs it runs at once: utilization is engine time / (time x slots))."""
    counters = p.statistics.of_adapter(p, adapter.index, now_ns)
    contexts = [c for process in p.processes.values() for d in process.devices.values()
                if d.adapter is adapter for c in d.contexts.values()]
    return {"engine_busy_ns": counters.engine_busy_ns,
            "command_buffers": counters.command_buffers,
            "running": p.statistics.running_jobs(adapter.index), "queued": _queued(contexts), "slots": adapter.engine.slots,
            **_event_counts(counters)}


# ---- QUERYSTATISTICS ---------------------------------------------------------------------------


_OBJECT_FIELDS = ("devices", "contexts", "hwqueues", "allocations", "committed_local",
                  "committed_nonlocal")


def _objects(process: HostProcess, adapter: HostAdapter | None) -> dict[str, int]:
    """What the process has alive now on the adapter (None: on every adapter)."""
    devices = [d for d in process.devices.values() if adapter is None or d.adapter is adapter]
    contexts = [c for d in devices for c in d.contexts.values()]
    usages = [u for index, u in process.memory.usages.items()
              if adapter is None or index == adapter.index]
    return {
        "devices": len(devices),
        "contexts": len(contexts),
        "hwqueues": sum(len(c.hwqueues) for c in contexts),
        "allocations": sum(len(d.allocations) for d in devices),
        "committed_local": sum(u.committed[GROUP_LOCAL] for u in usages),
        "committed_nonlocal": sum(u.committed[GROUP_NONLOCAL] for u in usages),
    }


def _record(qtype: int, objects: dict[str, int], counters: Counters, processes: int,
            adapter: HostAdapter | None) -> StatisticsRecord:
    capacity = adapter.segments.capacity if adapter is not None else (0, 0)
    return StatisticsRecord(
        qtype, processes=processes, **objects,
        local_capacity=capacity[GROUP_LOCAL], nonlocal_capacity=capacity[GROUP_NONLOCAL],
        command_buffers=counters.command_buffers, commands=counters.commands,
        engine_busy_ns=counters.engine_busy_ns, faults=counters.faults, resets=counters.resets,
        demoted_bytes=counters.demoted_bytes, promoted_bytes=counters.promoted_bytes)


def adapter_record(p: Partition, adapter: HostAdapter) -> StatisticsRecord:
    """ADAPTER: the adapter as this guest uses it (its processes, live and gone)."""
    objects = dict.fromkeys(_OBJECT_FIELDS, 0)
    users = 0
    for process in p.processes.values():
        mine = _objects(process, adapter)
        users += bool(mine["devices"])
        for key, value in mine.items():
            objects[key] += value
    return _record(QUERY_ADAPTER, objects, p.statistics.of_adapter(p, adapter.index), users,
                   adapter)


def process_record(p: Partition, process: HostProcess,
                   adapter: HostAdapter | None) -> StatisticsRecord:
    """PROCESS_ADAPTER (the process on ``adapter``) or PROCESS (``adapter`` None: the process
    on every adapter of this host)."""
    qtype = QUERY_PROCESS if adapter is None else QUERY_PROCESS_ADAPTER
    counters = p.statistics.of_process(process, None if adapter is None else adapter.index)
    return _record(qtype, _objects(process, adapter), counters, 1, adapter)


def query_statistics(p: Partition, call: Call, body: m.IoctlArgs) -> m.IoctlArgsReturn:
    """QUERYSTATISTICS: d3dkmt_querystatistics with the host adapter LUID and the host handle
    of the process asked about (0: none); the reply's result holds the record."""
    args = ioctl_args(body, d3dkmt_querystatistics)
    expect_extra(body.extra, 0, "QUERYSTATISTICS")
    adapter = call.adapter
    if adapter is None:
        raise CommandFailed(INVALID, "no adapter addressed")
    p.process(call)  # the caller must be live here
    if luid_to_int(args.adapter_luid.a, args.adapter_luid.b) != adapter.host_adapter_luid:
        raise CommandFailed(INVALID, "not this adapter's LUID")
    target: HostProcess | None = None
    if args.process:
        handle = int(args.process)
        target = (p.handles.get(handle, HandleType.PROCESS) if handle <= 0xFFFFFFFF
                  else None)
        if target is None:
            raise CommandFailed(NTSTATUS.STATUS_INVALID_HANDLE,
                                f"process 0x{handle:x} is not live here")
    qtype = int(args.type)
    if qtype == QUERY_ADAPTER:
        record = adapter_record(p, adapter)
    elif qtype in (QUERY_PROCESS, QUERY_PROCESS_ADAPTER):
        if target is None:
            raise CommandFailed(INVALID, "a process query names no process")
        record = process_record(p, target, adapter if qtype == QUERY_PROCESS_ADAPTER else None)
    elif qtype in _KNOWN_TYPES:
        raise CommandFailed(NTSTATUS.STATUS_NOT_SUPPORTED, f"statistics type {qtype}")
    else:
        raise CommandFailed(INVALID, f"statistics type {qtype}")
    ctypes.memmove(ctypes.addressof(args.result), record.pack(), RESULT_BYTES)
    return ioctl_reply(args)


# ---- INVALIDATECACHE -----------------------------------------------------------------------------


def invalidate_cache(p: Partition, call: Call, body: m.IoctlArgs) -> m.IoctlArgsReturn:
    """INVALIDATECACHE: a range of an allocation of the caller's device. The soft adapters'
    memory is the host's shared memory, which every CPU and the engine see coherently: once
    the range is checked there is nothing to write back or invalidate."""
    args = ioctl_args(body, d3dkmt_invalidatecache)
    expect_extra(body.extra, 0, "INVALIDATECACHE")
    device = device_of(p, p.process(call), args.device.v, call.adapter)
    allocation = device.allocations.get(args.allocation.v)
    if allocation is None or not allocation.alive:
        raise CommandFailed(NTSTATUS.STATUS_INVALID_HANDLE,
                            f"allocation 0x{args.allocation.v:08x} is not the device's")
    offset, length = int(args.offset), int(args.length)
    if offset > allocation.size or length > allocation.size - offset:
        raise CommandFailed(INVALID, f"[{offset}, +{length}) outside {allocation.size} bytes")
    return ioctl_reply(args)


HANDLERS: MappingProxyType[VgpuCommand, Handler] = MappingProxyType({
    VgpuCommand.QUERYSTATISTICS: query_statistics,
    VgpuCommand.INVALIDATECACHE: invalidate_cache,
})
