"""A partition: the host's state for one guest (one bus session), like the VM object of the real
host. It implements `HostBusHandler`: channel opens bind channels to their adapter, and every
request on them goes through the dispatcher (dxg.host.dispatch) to the handlers of the object
kinds (adapter, process, device, context, escape modules); the VM-level commands
(SETIOSPACEREGION, the census) are here.

Every piece of partition state is touched only on the host's event loop, so there is no
partition lock at all, and none can be held while a backend runs: backend work goes to the
host's worker threads through `run_blocking`, which sees no partition state.

Memory: a guest pins host memory only through the objects it creates. Each is charged its
estimated footprint (OBJECT_BYTES) against HostConfig.max_partition_bytes, besides the handle
cap; no bytes of guest payloads are kept (a context keeps the size of its private data only).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

from dxg.host.adapter import AdapterOpen, HostAdapter, drop_open
from dxg.host.call import Call, CommandFailed, Handler
from dxg.host.config import HostConfig
from dxg.host.device import EXECUTION_ACTIVE, EXECUTION_STATES, HostDevice
from dxg.host.dispatch import OBJECT_HANDLERS, Dispatcher, _merge
from dxg.host.handles import HandleTable, HandleTableFull
from dxg.host.process import HostProcess, drop_process
from dxg.host.quota import GuestLedgers
from dxg.host.scheduler import EngineGroup
from dxg.host.share import HostShares
from dxg.host.statistics import JobClock, PartitionStatistics, adapter_work, process_work
from dxg.oslib.eventfd import EventfdWriters
from dxg.protocol import messages as m
from dxg.protocol.bus import DXGK_VMBUS_INTERFACE_VERSION, OpenChannel
from dxg.protocol.commands import GlobalCommand, HostToVmCommand
from dxg.protocol.errors import ProtocolError
from dxg.protocol.guids import DXGK_GLOBAL_GUID, DXGK_VGPU_GUID
from dxg.protocol.headers import encode_host_to_vm
from dxg.protocol.messages import (
    SETGUESTDATA_DATATYPE_DWORD,
    SetGuestData,
    SetIoSpaceRegion,
    SignalGuestEvent,
)
from dxg.runtime.logs import LogLimiter
from dxg.runtime.tasks import Lanes, TaskSet
from dxg.uapi.handles import HandleType
from dxg.uapi.ntstatus import NTSTATUS
from dxg.vmbus.channel import Channel

if TYPE_CHECKING:
    from dxg.host.host import Host
    from dxg.vmbus.bus import HostBusSession

log = logging.getLogger(__name__)

_T = TypeVar("_T")
OK = NTSTATUS.STATUS_SUCCESS
# What one host object pins, in bytes, against HostConfig.max_partition_bytes: its measured
# footprint (the object, its handle-table entry, its slot in its owner's table) rounded up; a
# process includes the longest name a guest can give it.
OBJECT_BYTES: Mapping[HandleType, int] = MappingProxyType({
    HandleType.ADAPTER: 512,
    HandleType.PROCESS: 2048,
    HandleType.DEVICE: 512,
    HandleType.CONTEXT: 512,
    HandleType.ALLOCATION: 256,
    HandleType.RESOURCE: 256,
    HandleType.PAGINGQUEUE: 512,
    HandleType.HWQUEUE: 512,
    HandleType.MONITOREDFENCE: 128,
    HandleType.SYNCOBJECT: 256,
    HandleType.SHAREDRESOURCE: 512,  # shared by descriptor (dxg.host.share)
    HandleType.SHAREDVMOBJECT: 512,
})


# ---- VM-level commands ---------------------------------------------------------------------------


def _set_io_space_region(p: Partition, call: Call, body: SetIoSpaceRegion) -> m.NtStatusReturn:
    if body.start + body.length > 1 << 64:
        raise CommandFailed(NTSTATUS.STATUS_INVALID_PARAMETER, "IO space wraps")
    p.io_space = body
    return m.NtStatusReturn(OK)


def _query_partition(p: Partition, call: Call, body: m.Empty) -> m.JsonReply:
    return m.JsonReply(json.dumps(p.census(), separators=(",", ":")).encode())


HANDLERS: MappingProxyType[GlobalCommand, Handler] = MappingProxyType({
    GlobalCommand.SETIOSPACEREGION: _set_io_space_region,
    GlobalCommand.PYDXG_QUERYPARTITION: _query_partition,
})
ALL_HANDLERS = _merge(OBJECT_HANDLERS, HANDLERS)


class Partition:
    """One guest's objects on this host, and the dispatcher for its channels."""

    def __init__(
        self,
        partition_id: int,
        host: Host,
        adapters: Sequence[HostAdapter],
        config: HostConfig,
        peer: str = "",
        on_closed: Callable[[Partition], None] | None = None,
    ) -> None:
        self.id = partition_id
        self.host = host
        self.peer = peer
        self.config = config
        self.session: HostBusSession | None = None
        self.closed = False
        self.adapters = list(adapters)
        self._by_vgpu_luid = {a.host_vgpu_luid: a for a in self.adapters}
        self._by_instance = {a.instance_guid: a for a in self.adapters}
        self._on_closed = on_closed
        self.handles = HandleTable(capacity=config.max_handles_per_partition)
        self.pinned = 0  # bytes charged for live objects and regions
        self.processes: dict[int, HostProcess] = {}
        # Objects shared between its processes by descriptor (dxg.host.share).
        self.shares = HostShares(GuestLedgers(config.guest_memory))
        # Device memory its processes commit, per adapter and per account (dxg.host.quota).
        self.ledgers = self.shares.ledgers
        self.opens: dict[int, AdapterOpen] = {}  # adapter index -> this partition's open
        self.io_space: SetIoSpaceRegion | None = None
        self.global_channel: Channel | None = None
        self.vgpu_channels: dict[int, Channel] = {}  # adapter index -> channel
        self.tasks = TaskSet(f"partition {partition_id}")
        self.lanes = Lanes()
        # Worker threads this guest may keep busy at once (HostConfig.max_jobs_per_partition).
        self.job_slots = asyncio.Semaphore(config.max_jobs_per_partition)
        self.running_jobs = 0
        # Writes to eventfds its processes handed in (pydxg EVENTFD_SIGNAL), off the loop.
        self.eventfd_writers = EventfdWriters(f"partition {partition_id}")
        self.pending_calls = 0  # requests running as tasks, and the bytes they hold
        self.pending_bytes = 0
        self.dispatcher = Dispatcher(self, ALL_HANDLERS)
        # Counts of its processes' work that outlive the objects (QUERYSTATISTICS).
        self.statistics = PartitionStatistics()
        # Its processes' part of each adapter's engine, by adapter index (dxg.host.scheduler).
        self.engine_groups: dict[int, EngineGroup] = {}
        self.logs = LogLimiter(log)  # what the guest provokes cannot flood the log

    def __repr__(self) -> str:
        return f"<Partition {self.id} peer={self.peer!r}>"

    @property
    def rt(self) -> Any:
        return self.host.rt

    @property
    def max_message(self) -> int:
        return self.config.max_message_bytes

    # ---- HostBusHandler ------------------------------------------------------------------------

    def channel_opened(self, session: HostBusSession, channel: Channel, msg: OpenChannel) -> int:
        if self.closed:
            return -errno.ENODEV
        if channel.type_guid == DXGK_GLOBAL_GUID:
            if self.global_channel is not None and not self.global_channel.closed:
                return -errno.EBUSY
            self.global_channel = channel
            channel.on_request = functools.partial(self.dispatcher.on_packet, None)
            log.info("partition %d: global channel %d open", self.id, channel.relid)
            return 0
        if channel.type_guid == DXGK_VGPU_GUID:
            adapter = self._by_instance.get(channel.instance_guid)
            if adapter is None:
                return -errno.ENODEV
            if msg.interface_version != DXGK_VMBUS_INTERFACE_VERSION:
                log.warning("partition %d: vGPU %d opened with interface version %d, need %d",
                            self.id, adapter.index, msg.interface_version,
                            DXGK_VMBUS_INTERFACE_VERSION)
                return -errno.EPROTONOSUPPORT
            if adapter.removed:
                return -errno.ENODEV
            self.vgpu_channels[adapter.index] = channel
            channel.on_request = functools.partial(self.dispatcher.on_packet, adapter)
            log.info("partition %d: vGPU %d channel %d open (guest caps 0x%x)", self.id,
                     adapter.index, channel.relid, msg.guest_caps)
            return 0
        return -errno.ENODEV

    def channel_closed(self, session: HostBusSession, channel: Channel) -> None:
        if self.global_channel is channel:
            self.global_channel = None
        for index, ch in list(self.vgpu_channels.items()):
            if ch is channel:
                del self.vgpu_channels[index]

    def session_closed(self, session: HostBusSession) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """The guest is gone: drop every object of every process, every open and channel, and
        cancel the work still running for it."""
        if self.closed:
            return
        self.closed = True
        self.tasks.cancel()
        for process in list(self.processes.values()):
            drop_process(self, process)
        self.shares.close(self)  # (what only descriptors of the gone guest held)
        for index in list(self.opens):
            drop_open(self, index)
        self.global_channel = None
        self.vgpu_channels.clear()
        log.info("partition %d (%s): closed", self.id, self.peer)
        if self._on_closed is not None:
            self._on_closed(self)

    def adapter_by_vgpu_luid(self, luid: int) -> HostAdapter | None:
        return self._by_vgpu_luid.get(luid)

    # ---- objects ---------------------------------------------------------------------------------

    def charge(self, nbytes: int, process: HostProcess | None = None) -> None:
        """Count ``nbytes`` of host memory against the guest's budget and, with ``process``,
        that process's share (or fail NO_MEMORY)."""
        if self.pinned + nbytes > self.config.max_partition_bytes:
            raise CommandFailed(NTSTATUS.STATUS_NO_MEMORY,
                                f"partition memory budget of {self.config.max_partition_bytes} "
                                "bytes reached")
        if process is not None:
            if process.pinned + nbytes > self.config.max_process_bytes:
                raise CommandFailed(NTSTATUS.STATUS_NO_MEMORY,
                                    f"process memory share of {self.config.max_process_bytes} "
                                    "bytes reached")
            process.pinned += nbytes
        self.pinned += nbytes

    def uncharge(self, nbytes: int, process: HostProcess | None = None) -> None:
        self.pinned = max(0, self.pinned - nbytes)
        if process is not None:
            process.pinned = max(0, process.pinned - nbytes)

    def alloc(self, htype: HandleType, obj: Any, process: HostProcess | None = None) -> int:
        """A handle for a new object, charged against the partition's limits and, with
        ``process``, that process's share of objects."""
        if process is not None and process.objects >= self.config.max_objects_per_process:
            raise CommandFailed(NTSTATUS.STATUS_NO_MEMORY,
                                f"a process may hold {self.config.max_objects_per_process} "
                                "objects")
        self.charge(OBJECT_BYTES[htype])
        try:
            handle = self.handles.alloc(htype, obj)
        except HandleTableFull as e:
            self.uncharge(OBJECT_BYTES[htype])
            raise CommandFailed(NTSTATUS.STATUS_NO_MEMORY, str(e)) from None
        if process is not None:
            process.objects += 1
        return handle

    def free(self, handle: int, htype: HandleType, process: HostProcess | None = None) -> None:
        if self.handles.free(handle, htype) is not None:
            self.uncharge(OBJECT_BYTES[htype])
            if process is not None:
                process.objects = max(0, process.objects - 1)

    def process(self, call: Call) -> HostProcess:
        process = self.handles.get(call.process_handle, HandleType.PROCESS)
        if process is None:
            raise CommandFailed(NTSTATUS.STATUS_INVALID_HANDLE,
                                f"process 0x{call.process_handle:08x} is not live here")
        return process

    def optional_process(self, call: Call) -> HostProcess | None:
        if call.process_handle == 0:
            return None
        return self.process(call)

    async def run_blocking(self, process: HostProcess,
                           job: Callable[[threading.Event], _T],
                           lane: Hashable | None = None,
                           device: HostDevice | None = None,
                           engine_time: bool = True,
                           admit: Callable[[], Awaitable[None]] | None = None,
                           done: Callable[[], None] | None = None) -> _T:
        """Run ``job(cancelled)`` on a host worker thread, after the earlier jobs of ``lane``
        and when the process and the partition have a worker slot free (fair shares of the
        pool); ``cancelled`` is set when the process (or ``device``) goes, or this call is
        cancelled. The time a job of ``device`` holds its thread counts as the device's engine
        time (QUERYSTATISTICS), unless ``engine_time`` is False (a wait, not work).

        ``admit()``, when given, is awaited once the worker slots are the job's and before it
        starts (an adapter's engine slot: dxg.host.scheduler), so nothing is held while the
        job waits for slots it may never get; if it raises, the job does not run. ``done()``
        is then called on the loop once the job is over (returned, even after this call was
        cancelled)."""
        cancelled = threading.Event()
        owners = [process.jobs] if device is None else [process.jobs, device.jobs]
        for jobs in owners:
            jobs.add(cancelled)
        loop = asyncio.get_running_loop()
        work_fn: Callable[[threading.Event], _T] = job
        timed = device is not None and engine_time
        clock: list[JobClock] = []  # the job's engine time, once it is handed to its thread

        def clocked(ev: threading.Event) -> _T:
            clock[0].start()
            try:
                return job(ev)
            finally:
                clock[0].stop()

        if timed:
            work_fn = clocked

        admitted = [False]

        def release(started: bool) -> None:
            if started:
                process.running -= 1
                self.running_jobs -= 1
            if clock and device is not None:
                self.statistics.job_done(device, clock.pop())
            self.job_slots.release()
            process.job_slots.release()
            if admitted[0] and done is not None:
                admitted[0] = False
                done()

        def released(_work: object) -> None:  # on the worker thread, when the job returns
            try:
                loop.call_soon_threadsafe(release, True)
            except RuntimeError:
                pass  # the loop is closed: nothing is left to count

        async def run() -> _T:
            # A worker slot of the process, then one of the partition: a process waits for
            # its own jobs first, so it never holds a partition slot while it waits.
            await process.job_slots.acquire()
            try:
                await self.job_slots.acquire()
            except BaseException:
                process.job_slots.release()
                raise
            if admit is not None:
                try:
                    await admit()
                except BaseException:
                    release(False)
                    raise
                admitted[0] = True
            if cancelled.is_set():
                try:
                    return job(cancelled)  # already told to stop: it returns at once
                finally:
                    release(False)
            if timed and device is not None:
                clock.append(self.statistics.job_started(device))
            try:
                work = self.host.workers.submit(work_fn, cancelled)
            except BaseException:
                release(False)
                raise
            # The slots are the thread's: they stay taken until the job returns, even when this
            # call is cancelled first (the job is told to stop, and must).
            process.running += 1
            self.running_jobs += 1
            work.add_done_callback(released)
            return await asyncio.wrap_future(work, loop=loop)

        try:
            if lane is None:
                return await run()
            return await self.lanes.run(lane, run)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        finally:
            for jobs in owners:
                jobs.discard(cancelled)

    # ---- host -> guest -------------------------------------------------------------------------

    def notify(self, command: HostToVmCommand, body: bytes = b"", process: int = 0) -> bool:
        """Send a host -> guest message on the global channel; False when it cannot be sent."""
        channel = self.global_channel
        if channel is None or channel.closed:
            log.info("partition %d: no global channel for %s", self.id, command.name)
            return False
        try:
            channel.notify(encode_host_to_vm(command, process, body))
        except (ConnectionError, ProtocolError) as e:
            log.info("partition %d: %s not sent: %s", self.id, command.name, e)
            return False
        return True

    def signal_guest_event(self, event_id: int, process_id: int = 0,
                           dereference: bool = False) -> bool:
        """SIGNALGUESTEVENT: `event_id` is a guest host-event id (never a pointer)."""
        body = SignalGuestEvent(event_id, process_id, int(dereference)).pack()
        return self.notify(HostToVmCommand.SIGNALGUESTEVENT, body)

    def set_guest_data(self, guest_pointer: int, value: int,
                       data_type: int = SETGUESTDATA_DATATYPE_DWORD) -> bool:
        """SETGUESTDATA to a guest cookie (the guest checks it against its own; never written)."""
        body = SetGuestData(guest_pointer, value, (data_type & 0xF) << 1).pack()
        return self.notify(HostToVmCommand.SETGUESTDATA, body)

    def set_device_execution_state(self, device_handle: int, state: int) -> bool:
        """Change a device's execution state; when it changes, tell the guest with
        SETGUESTDATA(DWORD, the device's cookie, 1) so it drops its cached state. Returns whether
        a notification went out. Raises KeyError for a handle that is not a live device. Any
        thread may call it."""
        if not self.rt.in_loop():
            return bool(self.rt.call(self.set_device_execution_state, device_handle, state))
        if int(state) not in EXECUTION_STATES:
            raise ValueError(f"{state} is not a D3DKMT execution state")
        device: HostDevice | None = self.handles.get(device_handle, HandleType.DEVICE)
        if device is None:
            raise KeyError(f"device 0x{device_handle:08x} is not live in partition {self.id}")
        changed = device.execution_state != int(state)
        was_active = device.execution_state == EXECUTION_ACTIVE
        device.execution_state = int(state)
        if not changed:
            return False
        if was_active:
            self.statistics.device_state(device, int(state))  # a fault or a reset, counted
        if int(state) != EXECUTION_ACTIVE:  # waits on its fences end with an error
            from dxg.host.syncobject import fail_device

            fail_device(self, device)
        return self.set_guest_data(device.error_code, 1, SETGUESTDATA_DATATYPE_DWORD)

    # ---- census --------------------------------------------------------------------------------

    def census(self) -> dict[str, Any]:
        """JSON-able picture of this guest's objects (any thread may call it)."""
        if not self.rt.in_loop():
            return dict(self.rt.call(self.census))
        now_ns = time.monotonic_ns()
        processes = [{**p.census(), "work": process_work(self, p, now_ns)}
                     for p in self.processes.values()]
        io = self.io_space
        census: dict[str, Any] = {
            "id": self.id,
            # The host's monotonic clock when the work figures were read: engine time grown
            # between two censuses over the time between their now_ns is the utilization.
            "now_ns": now_ns,
            "peer": self.peer,
            "closed": self.closed,
            "requests": self.dispatcher.requests,
            "pinned_bytes": self.pinned,
            "tasks": len(self.tasks),
            "pending_calls": self.pending_calls,
            "pending_bytes": self.pending_bytes,
            "running_jobs": self.running_jobs,
            "io_space": None if io is None else {"start": io.start, "length": io.length},
            "channels": {
                "global": self.global_channel is not None,
                "vgpu": sorted(self.vgpu_channels),
            },
            "adapters": [
                {"index": o.adapter.index, "guest_luid": o.adapter.guest_luid,
                 "handle": o.handle, "opens": o.opens,
                 "memory": o.adapter.segments.census(),
                 "work": adapter_work(self, o.adapter, now_ns)}
                for o in self.opens.values()
            ],
            # What this guest's processes commit per adapter, and the host's quota for it.
            "guest_memory": self.ledgers.census(self.opens),
            "processes": processes,
            # Objects shared by descriptor, and the memory of shared resources (dxg.host.share).
            "shared": self.shares.census(),
            # Device memory of all its processes (host-wide segment use: "adapters").
            "memory": {key: sum(p[key] for p in processes)
                       for key in ("allocations", "resources", "paging_queues", "blocks",
                                   "block_bytes")},
            "totals": {
                "processes": len(processes),
                "devices": sum(p["device_count"] for p in processes),
                "contexts": sum(p["context_count"] for p in processes),
                "regions": sum(p["regions"] for p in processes),
                "adapter_handles": len(self.opens),
                "handles": len(self.handles),
            },
        }
        return census

    def devices(self) -> list[tuple[int, int]]:
        """(process handle, device handle) of every live device: for tools and tests."""
        if not self.rt.in_loop():
            return list(self.rt.call(self.devices))
        return [(p.handle, d) for p in self.processes.values() for d in p.devices]


__all__ = ["OBJECT_BYTES", "Partition"]
