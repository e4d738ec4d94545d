"""Synchronization objects on the host: one per CREATESYNCOBJECT, and the waits on them.

Kinds (``d3dddi_synchronizationobject_type``), as the real driver accepts them:

- MONITORED_FENCE (5): a u64 that only rises (unless a signal allows a rewind). Its value lives
  in an 8-byte slot of one of the process's fence blocks (dxg.host.memory.FenceBlock): the
  client maps the block read-only and reads the value with no call; the host is the only
  writer. A device object (``device`` set): it goes with DestroyDevice.
- FENCE (3), SYNCHRONIZATION_MUTEX (1), SEMAPHORE (2), CPU_NOTIFICATION (4): the legacy kinds,
  adapter-level (``device`` None, as in the real driver's dxgsyncobject_create): they go when
  their process closes its last handle of the adapter, or exits. A FENCE is a value no page
  shows; a mutex is taken by the wait that gets it and given back by a signal; a semaphore
  counts (``max_count``); signalling a CPU notification sends SIGNALGUESTEVENT to the guest
  event it was created with (the guest writes the client's eventfd).
- PERIODIC_MONITORED_FENCE (6) ticks with a display's vblank: pydxg's adapters drive no
  display, so it is refused (STATUS_NOT_SUPPORTED).

A monitored fence made ``shared | nt_security_sharing`` is shared by descriptor
(dxg.host.share): its value is in a fence page of its own, other processes open it
(OPENSYNCOBJECT: handles that name the same object, with their own access) and it lives while any
handle or descriptor names it. Other kinds are not shared (STATUS_NOT_SUPPORTED).

`SyncObject` is the interface the rest of the host uses (queues signal and wait on it):
``signal(value)``, ``wait(value) -> Future`` (resolved when reached; failed with
CommandFailed(status) when the object, its device, adapter or process goes or the device
enters the error state) and ``fail(status)``. A paging queue's fence is one too
(dxg.host.pagingqueue.Fence), so a CPU wait works on it.

CPU waits (WAITFORSYNCOBJECTFROMCPU): the guest registers a host-event id before it sends the
wait; the host acks at once and sends SIGNALGUESTEVENT(id) when all (or, with wait_any, one) of
the objects reached their values, with pydxg's status field non-zero when the wait failed. A
wait the guest gives up on is withdrawn by a WAITFORSYNCOBJECTFROMCPU with no objects.

GPU signals and waits run on the contexts' ordered lanes: dxg.host.gpusync.

Everything here runs on the host's event loop.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections import deque
from collections.abc import Hashable
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from dxg.host import gpusync
from dxg.host.call import Call, CommandFailed, Handler
from dxg.host.memory import FENCE_SLOT_BYTES, FenceBlock, readonly_fd
from dxg.protocol import messages as m
from dxg.protocol.commands import GlobalCommand, HostToVmCommand, VgpuCommand
from dxg.uapi.handles import HandleType
from dxg.uapi.ntstatus import NTSTATUS
from dxg.uapi.structs import (
    d3dddi_synchronizationobject_type,
    d3dddi_synchronizationobjectinfo2,
    d3dkmt_deviceexecution_state,
)

if TYPE_CHECKING:
    from dxg.host.adapter import HostAdapter
    from dxg.host.context import HostContext
    from dxg.host.device import HostDevice
    from dxg.host.partition import Partition
    from dxg.host.process import HostProcess
    from dxg.host.share import SharedSync

__all__ = [
    "HANDLERS",
    "MAX_CPU_WAITS_PER_PROCESS",
    "ProcessSync",
    "SyncObject",
    "adapter_removed",
    "drop_adapter_syncobjects",
    "drop_device_syncobjects",
    "drop_process_syncobjects",
    "drop_syncobject",
    "fail_device",
    "syncobject_of",
]

log = logging.getLogger(__name__)

_T = d3dddi_synchronizationobject_type
MUTEX = int(_T._D3DDDI_SYNCHRONIZATION_MUTEX)
SEMAPHORE = int(_T._D3DDDI_SEMAPHORE)
FENCE = int(_T._D3DDDI_FENCE)
CPU_NOTIFICATION = int(_T._D3DDDI_CPU_NOTIFICATION)
MONITORED_FENCE = int(_T._D3DDDI_MONITORED_FENCE)
PERIODIC_MONITORED_FENCE = int(_T._D3DDDI_PERIODIC_MONITORED_FENCE)
_VALUE_KINDS = frozenset({FENCE, MONITORED_FENCE})  # objects whose state is a u64 value
_LEGACY_KINDS = frozenset({MUTEX, SEMAPHORE, FENCE, CPU_NOTIFICATION})

# d3dddi_synchronizationobject_flags
FLAG_SHARED = 1 << 0
FLAG_NT_SECURITY_SHARING = 1 << 1
FLAG_NO_SIGNAL = 1 << 4
FLAG_NO_WAIT = 1 << 5
_FLAGS_KNOWN = (1 << 8) - 1
# d3dddicb_signalflags
SIGNAL_ALLOW_FENCE_REWIND = 1 << 2

MAX_OBJECT_SIGNALED = 32  # D3DDDI_MAX_OBJECT_SIGNALED: a CPU signal's objects
MAX_OBJECT_WAITED_ON = 32  # D3DDDI_MAX_OBJECT_WAITED_ON: a CPU wait's objects
MAX_BROADCAST_CONTEXT = 64  # D3DDDI_MAX_BROADCAST_CONTEXT
# CPU waits one process may have registered at once (each a small record and one waiter per
# object): a guest that never withdraws what its callers gave up on cannot grow the host.
MAX_CPU_WAITS_PER_PROCESS = 1 << 14

_U64 = (1 << 64) - 1
_ACTIVE = int(d3dkmt_deviceexecution_state._D3DKMT_DEVICEEXECUTION_ACTIVE)
OK = NTSTATUS.STATUS_SUCCESS
INVALID = NTSTATUS.STATUS_INVALID_PARAMETER
GONE = NTSTATUS.STATUS_DEVICE_REMOVED  # what a wait gets when its device/adapter/process goes
DESTROYED = NTSTATUS.STATUS_INVALID_HANDLE  # ... and when its object is destroyed


class SyncObject:
    """One synchronization object of a process (see the module doc for the kinds).

    ``value``: a value kind's u64 (a monitored fence's is also in its shared slot), a mutex's or
    semaphore's count. ``device`` is None for the adapter-level legacy kinds."""

    __slots__ = (
        "_adapter",
        "_fifo",
        "_process",
        "_prune_at",
        "_seq",
        "_value",
        "_waiters",
        "block",
        "cpu_event",
        "device",
        "error",
        "flags",
        "handle",
        "index",
        "max_count",
        "mirror_event",
        "partition",
        "shared",
        "type",
    )

    def __init__(self, handle: int, device: HostDevice | None, kind: int, *,
                 process: HostProcess | None = None, adapter: HostAdapter | None = None,
                 flags: int = 0, block: FenceBlock | None = None, index: int = 0,
                 value: int = 0, max_count: int = 0, partition: Partition | None = None) -> None:
        self.handle = handle
        self.device = device
        self.type = kind
        self.flags = flags
        self._process = process
        self._adapter = adapter
        self.block = block  # monitored fences: where the value is shown (None once freed)
        self.index = index
        self._value = value & _U64
        self.max_count = max_count  # semaphores
        self.cpu_event = 0  # CPU notifications: the guest's host-event id
        self.mirror_event = 0  # a guest host-event id told of every new value (no page)
        self.partition = partition  # whom to tell (CPU notifications, mirrors)
        self.error: int | None = None  # set by fail(): waits that are not reached fail
        self.shared: SharedSync | None = None  # shared by descriptor (dxg.host.share)
        # Value kinds: a heap of (target, seq, future); mutex and semaphore: a FIFO of futures.
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._fifo: deque[asyncio.Future[None]] | None = None
        self._seq = 0
        self._prune_at = 64
        if block is not None:
            block.write(index, self._value)

    def __repr__(self) -> str:
        return f"<SyncObject 0x{self.handle:08x} type {self.type} value {self._value}>"

    @property
    def process(self) -> HostProcess:
        assert self.device is not None or self._process is not None
        return self.device.process if self.device is not None else self._process  # type: ignore[return-value]

    @property
    def adapter(self) -> HostAdapter:
        assert self.device is not None or self._adapter is not None
        return self.device.adapter if self.device is not None else self._adapter  # type: ignore[return-value]

    @property
    def monitored(self) -> bool:
        return self.type == MONITORED_FENCE

    @property
    def value(self) -> int:
        return self._value

    @property
    def waiting(self) -> int:
        """Waits not yet over."""
        queue = self._fifo if self._fifo is not None else (e[2] for e in self._waiters)
        return sum(1 for f in queue if not f.done())

    def ref(self) -> m.BlockRef:
        """Where the value's slot is (monitored fences)."""
        assert self.block is not None
        return self.block.block.ref(self.index * FENCE_SLOT_BYTES)

    # ---- the interface -------------------------------------------------------------------------

    def signal(self, value: int = 0, rewind: bool = False) -> None:
        """Value kinds: the value becomes ``value`` when that is higher (or, with ``rewind``,
        whatever it is), shown in the slot, and every wait it reaches ends. A mutex is given
        back (to its first waiter, if any), a semaphore counts one up (up to ``max_count``), a
        CPU notification tells the guest."""
        kind = self.type
        if kind in _VALUE_KINDS:
            value &= _U64
            old = self._value
            new = value if rewind else max(old, value)
            if new != old:
                self._value = new
                if self.block is not None:
                    self.block.write(self.index, new)
                if self.mirror_event and self.partition is not None:
                    self.partition.notify(HostToVmCommand.PYDXG_FENCEVALUE,
                                          m.FenceValue(self.mirror_event, new).pack())
                if self.shared is not None and self.partition is not None:
                    self.shared.mirrored(new, self.partition)  # (openers' mirror pages)
            heap = self._waiters
            while heap and heap[0][0] <= new:
                future = heapq.heappop(heap)[2]
                if not future.done():
                    future.set_result(None)
        elif kind == CPU_NOTIFICATION:
            if self.partition is not None and self.cpu_event and self.error is None:
                _signal_guest(self.partition, self.cpu_event, self.process, OK)
        else:
            fifo = self._fifo
            while fifo:
                future = fifo.popleft()
                if not future.done():
                    future.set_result(None)  # the unit passes to this waiter
                    return
            limit = 1 if kind == MUTEX else self.max_count
            self._value = min(limit, self._value + 1)

    def wait(self, value: int = 0) -> asyncio.Future[None]:
        """A future resolved once the object reaches ``value`` (value kinds) or, for a mutex
        or semaphore, once this wait got a unit (it takes it); failed with CommandFailed when
        the object, its device, adapter or process goes, or its device is in error."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        kind = self.type
        if kind in _VALUE_KINDS and self._value >= (value & _U64):
            future.set_result(None)
            return future
        status = self.error
        if status is None and self.device is not None and self.device.execution_state != _ACTIVE:
            status = GONE
        if status is not None:
            future.set_exception(CommandFailed(status, "the object cannot be waited on"))
            return future
        if kind in _VALUE_KINDS:
            self._seq += 1
            heapq.heappush(self._waiters, (value & _U64, self._seq, future))
            if len(self._waiters) >= self._prune_at:  # waits given up on, cleared in bulk
                self._waiters = [e for e in self._waiters if not e[2].done()]
                heapq.heapify(self._waiters)
                self._prune_at = max(64, 2 * len(self._waiters))
        elif kind in (MUTEX, SEMAPHORE):
            if self._value > 0 and not self._fifo:
                self._value -= 1
                future.set_result(None)
                return future
            if self._fifo is None:
                self._fifo = deque()
            self._fifo.append(future)
            if len(self._fifo) >= self._prune_at:
                self._fifo = deque(f for f in self._fifo if not f.done())
                self._prune_at = max(64, 2 * len(self._fifo))
        else:
            future.set_exception(CommandFailed(INVALID, "a CPU notification is not waited on"))
        return future

    def fail(self, status: int) -> None:
        """Every wait not over ends with CommandFailed(status), and so does every later one
        that is not reached already (device error, removal, teardown). The first status
        stays."""
        if self.error is None:
            self.error = int(status)
        pending = [e[2] for e in self._waiters]
        self._waiters = []
        if self._fifo:
            pending += list(self._fifo)
            self._fifo.clear()
        for future in pending:
            if not future.done():
                future.set_exception(CommandFailed(self.error, "the object went"))
                future.exception()  # (whoever wanted it has a callback; nobody else must log)

    def census(self) -> dict[str, Any]:
        return {"handle": self.handle, "type": self.type, "value": self._value,
                "device": self.device.handle if self.device is not None else 0,
                "waiting": self.waiting, "failed": self.error is not None}


class ProcessSync:
    """A process's synchronization objects, its CPU waits (by guest event id) and its GPU
    signals and waits queued on context lanes (dxg.host.gpusync)."""

    __slots__ = ("cpu_waits", "gpu_count", "gpu_ops", "objects")

    def __init__(self) -> None:
        self.objects: dict[int, SyncObject] = {}
        self.cpu_waits: dict[int, CpuWait] = {}
        self.gpu_ops: dict[Hashable, set[asyncio.Future[Any]]] = {}  # lane -> its queued turns
        self.gpu_count = 0  # turns queued (a broadcast counts once)

    def census(self) -> dict[str, int]:
        return {"sync_objects": len(self.objects), "cpu_waits": len(self.cpu_waits),
                "gpu_ops": self.gpu_count}


# ---- lookups --------------------------------------------------------------------------------------


def syncobject_of(p: Partition, process: HostProcess, handle: int,
                  device: HostDevice | None = None) -> SyncObject:
    """The synchronization object ``handle`` of ``process`` (a created one, or a monitored fence
    of a queue), or INVALID_HANDLE; with ``device``, it must be that device's (or an
    adapter-level one of the device's adapter)."""
    obj = p.handles.get(handle, HandleType.SYNCOBJECT)
    if obj is None:
        obj = p.handles.get(handle, HandleType.MONITOREDFENCE)
    elif not isinstance(obj, SyncObject):  # a shared object this process opened
        return p.shares.resolve(obj, process, device)
    if not isinstance(obj, SyncObject) or (obj.device is None and obj._process is None) \
            or obj.process is not process:
        raise CommandFailed(NTSTATUS.STATUS_INVALID_HANDLE,
                            f"sync object 0x{handle:08x} is not this process's")
    if device is not None and obj.device is not device and not (
            obj.device is None and obj.adapter is device.adapter):
        raise CommandFailed(NTSTATUS.STATUS_INVALID_HANDLE,
                            f"sync object 0x{handle:08x} is not this device's")
    return obj


def _on_adapter(p: Partition, process: HostProcess, handle: int,
                adapter: HostAdapter | None) -> SyncObject:
    obj = syncobject_of(p, process, handle)
    if obj.adapter is not adapter:
        raise CommandFailed(NTSTATUS.STATUS_INVALID_HANDLE,
                            f"sync object 0x{handle:08x} is on another adapter")
    return obj


def _context_of(p: Partition, process: HostProcess, handle: int,
                adapter: HostAdapter | None) -> HostContext:
    context = p.handles.get(handle, HandleType.CONTEXT)
    if (context is None or context.device.process is not process
            or context.device.adapter is not adapter):
        raise CommandFailed(NTSTATUS.STATUS_INVALID_HANDLE,
                            f"context 0x{handle:08x} is not this process's")
    return context


def _timeline_of(p: Partition, process: HostProcess, handle: int,
                 adapter: HostAdapter | None) -> tuple[Hashable, HostDevice]:
    """The GPU timeline a signal or wait names: a context's, or (as the real driver sends
    SubmitSignal/WaitForSyncObjectsToHwQueue) a hardware queue's. Host handles are typed, so
    the handle says which."""
    from dxg.host.hwqueue import queue_of

    if p.handles.get(handle, HandleType.HWQUEUE) is not None:
        queue = queue_of(p, process, handle, adapter)
        return gpusync.lane_of_queue(queue), queue.device
    context = _context_of(p, process, handle, adapter)
    return gpusync.lane_of(context), context.device


def _signal_guest(p: Partition, event: int, process: HostProcess, status: int) -> None:
    p.notify(HostToVmCommand.SIGNALGUESTEVENT,
             m.SignalGuestEvent(event, process.pid, 0, int(status) & 0xFFFFFFFF).pack())


# ---- life cycle ----------------------------------------------------------------------------------


def drop_syncobject(p: Partition, obj: SyncObject, status: int = DESTROYED) -> None:
    """The object goes: its waits end with ``status``, its slot and handle are freed. A
    shared one only loses its creator's handle while others hold it (dxg.host.share)."""
    if obj.shared is not None:
        p.shares.release_creator(p, obj, status)
        return
    process = obj.process
    if process.sync.objects.get(obj.handle) is not obj:
        return
    del process.sync.objects[obj.handle]
    obj.fail(status)
    if obj.block is not None:
        process.memory.free_fence_slot(obj.block, obj.index)
        obj.block = None
    p.free(obj.handle, HandleType.SYNCOBJECT, process)


def drop_device_syncobjects(p: Partition, device: HostDevice) -> None:
    """DestroyDevice: the device's objects go; waits on them and on its queues' fences end
    with STATUS_DEVICE_REMOVED. A shared fence others still hold lives on (only its creator's
    handle goes), and so do its waits; the shared fences the device opened go."""
    for obj in _fences_of(device):
        if obj.shared is None:
            obj.fail(GONE)
    for obj in [o for o in device.process.sync.objects.values() if o.device is device]:
        drop_syncobject(p, obj, GONE)
    p.shares.drop_device(p, device)


def drop_adapter_syncobjects(p: Partition, process: HostProcess,
                             adapter: HostAdapter) -> None:
    """The process is done with the adapter: its adapter-level objects there go."""
    for obj in [o for o in process.sync.objects.values() if o.adapter is adapter]:
        drop_syncobject(p, obj, GONE)


def drop_process_syncobjects(p: Partition, process: HostProcess) -> None:
    """The process goes: its GPU operations stop, its CPU waits are forgotten (nobody is left
    to tell), and its objects go."""
    gpusync.process_gone(p, process)
    waits = list(process.sync.cpu_waits.values())
    process.sync.cpu_waits.clear()
    for w in waits:
        w.withdraw()
    for obj in list(process.sync.objects.values()):
        drop_syncobject(p, obj, GONE)
    p.shares.drop_process(p, process)


def _fences_of(device: HostDevice) -> list[SyncObject]:
    """Every waitable fence of a device: its objects and its queues' fences."""
    out: list[SyncObject] = [o for o in device.process.sync.objects.values()
                             if o.device is device]
    out += [q.fence for q in device.paging_queues.values() if isinstance(q.fence, SyncObject)]
    for context in device.contexts.values():  # (hardware queues' fences, once SyncObjects)
        out += [q.fence for q in getattr(context, "hwqueues", {}).values()
                if isinstance(getattr(q, "fence", None), SyncObject)]
    return out


def fail_device(p: Partition, device: HostDevice, status: int = GONE) -> None:
    """The device entered the error state: every wait on its fences ends with ``status``
    (the objects stay until destroyed; later waits that are not reached fail at once)."""
    for obj in _fences_of(device):
        obj.fail(status)


def adapter_removed(p: Partition, adapter: HostAdapter) -> None:
    """The adapter was removed: its objects go (the guest releases its handles without telling
    this host), and every wait on them or on its queues' fences ends with
    STATUS_DEVICE_REMOVED."""
    for process in list(p.processes.values()):
        for device in list(process.devices.values()):
            if device.adapter is adapter:
                fail_device(p, device, GONE)
        for obj in [o for o in process.sync.objects.values() if o.adapter is adapter]:
            drop_syncobject(p, obj, GONE)
    p.shares.adapter_removed(p, adapter)


# ---- CPU waits -----------------------------------------------------------------------------------


class CpuWait:
    """One WAITFORSYNCOBJECTFROMCPU: its futures, and the guest event that ends it."""

    __slots__ = ("any", "done", "event", "futures", "partition", "process", "remaining")

    def __init__(self, p: Partition, process: HostProcess, event: int, wait_any: bool) -> None:
        self.partition = p
        self.process = process
        self.event = event
        self.any = wait_any
        self.futures: list[asyncio.Future[None]] = []
        self.remaining = 0
        self.done = False

    def one_done(self, future: asyncio.Future[None]) -> None:
        if future.cancelled():
            return
        error = future.exception()  # (retrieved even when the wait is over already)
        if self.done:
            return
        if error is not None:
            status = error.status if isinstance(error, CommandFailed) else \
                NTSTATUS.STATUS_INTERNAL_ERROR
        else:
            self.remaining -= 1
            if self.remaining > 0 and not self.any:
                return
            status = OK
        self.withdraw()
        _signal_guest(self.partition, self.event, self.process, status)

    def withdraw(self) -> None:
        """Over (or given up): out of the process's table, its object waits cancelled."""
        self.done = True
        waits = self.process.sync.cpu_waits
        if waits.get(self.event) is self:
            del waits[self.event]
        for future in self.futures:
            if not future.done():
                future.cancel()


# ---- the commands --------------------------------------------------------------------------------


def create_sync_object(p: Partition, call: Call,
                       body: m.CreateSyncObject) -> m.CreateSyncObjectReturn:
    """CREATESYNCOBJECT: an object of any kind the real driver accepts (module doc)."""
    from dxg.host.device import device_of

    process = p.process(call)
    adapter = call.adapter
    assert adapter is not None
    device = device_of(p, process, body.device, adapter)
    info = d3dddi_synchronizationobjectinfo2.from_buffer_copy(body.info)
    kind = int(info.type)
    flags = int(info.flags.value)
    if kind == PERIODIC_MONITORED_FENCE:
        raise CommandFailed(NTSTATUS.STATUS_NOT_SUPPORTED, "no display: no periodic fence")
    if kind not in _LEGACY_KINDS and kind != MONITORED_FENCE:
        raise CommandFailed(INVALID, f"sync object type {kind}")
    if flags & ~_FLAGS_KNOWN:
        raise CommandFailed(INVALID, "unknown sync object flags")
    shared = bool(flags & (FLAG_SHARED | FLAG_NT_SECURITY_SHARING))
    if shared and (flags & FLAG_SHARED == 0 or flags & FLAG_NT_SECURITY_SHARING == 0
                   or kind != MONITORED_FENCE):
        # (global-handle sharing has no handler in the real driver; only fences are shared)
        raise CommandFailed(NTSTATUS.STATUS_NOT_SUPPORTED,
                            "only monitored fences are shared, by NT handle")
    if body.mirror_event and kind != MONITORED_FENCE:
        raise CommandFailed(INVALID, "only a monitored fence has a value to mirror")
    monitored = kind == MONITORED_FENCE
    obj = SyncObject(0, device if monitored else None, kind, process=process, adapter=adapter,
                     flags=flags, partition=p)
    if kind == FENCE:
        obj._value = int(info.fence.fence_value)
    elif kind == MUTEX:
        obj._value = 1 if info.synchronization_mutex.initial_state else 0
    elif kind == SEMAPHORE:
        sem = info.semaphore
        if sem.max_count == 0 or sem.initial_count > sem.max_count:
            raise CommandFailed(INVALID, "semaphore counts")
        obj.max_count = int(sem.max_count)
        obj._value = int(sem.initial_count)
    elif kind == CPU_NOTIFICATION:
        obj.cpu_event = int(info.cpu_notification.event)
        if not obj.cpu_event:
            raise CommandFailed(INVALID, "a CPU notification needs the guest's event")
    memory = process.memory
    if shared:  # a fence page of its own: an opener sees no other fence (dxg.host.share)
        obj.block, obj.index = p.shares.fence_page(adapter.index)
    elif monitored:
        obj.block, obj.index = memory.fence_slot(p.config, adapter.index)
    if monitored:
        obj._value = int(info.monitored_fence.initial_fence_value)
        obj.block.write(obj.index, obj._value)
        obj.mirror_event = body.mirror_event
    try:
        obj.handle = p.alloc(HandleType.SYNCOBJECT, obj, process)
        if monitored and call.can_pass_fds:
            assert obj.block is not None
            # read-only: the creator cannot write the value either (only signals move it)
            call.reply_fds.append(readonly_fd(obj.block.block))
        if shared:
            assert obj.block is not None
            p.shares.add_sync(p, obj, obj.block)
    except BaseException:
        if obj.handle:
            p.free(obj.handle, HandleType.SYNCOBJECT, process)
        if obj.block is not None:
            if shared:
                p.shares.close_fence(obj.block)
            else:
                memory.free_fence_slot(obj.block, obj.index)
            obj.block = None
        raise
    process.sync.objects[obj.handle] = obj
    if not monitored:
        return m.CreateSyncObjectReturn(OK, obj.handle)
    ref = obj.ref()
    return m.CreateSyncObjectReturn(OK, obj.handle, 0, ref.block, ref.block_size, ref.offset)


def destroy_sync_object(p: Partition, call: Call,
                        body: m.DestroySyncObject) -> m.NtStatusReturn:
    """DESTROYSYNCOBJECT (global channel): waits on the object end with INVALID_HANDLE."""
    process = p.process(call)
    obj = process.sync.objects.get(body.sync_object)
    if obj is None:
        if p.shares.drop_opened(p, process, body.sync_object):  # (a shared one it opened)
            return m.NtStatusReturn(OK)
        raise CommandFailed(NTSTATUS.STATUS_INVALID_HANDLE,
                            f"sync object 0x{body.sync_object:08x} is not this process's")
    drop_syncobject(p, obj, DESTROYED)
    return m.NtStatusReturn(OK)


def signal_sync_object(p: Partition, call: Call, body: m.SignalSyncObject) -> m.NtStatusReturn:
    """SIGNALSYNCOBJECT: from the CPU (``device`` set: monitored fences take their values now)
    or on the contexts' GPU timelines (after the work they have queued: dxg.host.gpusync)."""
    from dxg.host.device import device_of

    process = p.process(call)
    adapter = call.adapter
    rewind = bool(body.flags & SIGNAL_ALLOW_FENCE_REWIND)
    n = len(body.objects)
    if body.device:
        device = device_of(p, process, body.device, adapter)
        if not 0 < n <= MAX_OBJECT_SIGNALED or len(body.values) != n or body.contexts \
                or body.cpu_event:
            raise CommandFailed(INVALID, "a CPU signal: 1..32 fences and one value each")
        objects = [_on_adapter(p, process, h, device.adapter) for h in body.objects]
        for obj in objects:
            if not obj.monitored or obj.flags & FLAG_NO_SIGNAL:
                raise CommandFailed(INVALID, "only monitored fences are signalled from the CPU")
        if p.shares.opened and p.shares.any_readonly(body.objects):
            raise CommandFailed(NTSTATUS.STATUS_ACCESS_DENIED, "a fence opened read-only")
        for obj, value in zip(objects, body.values, strict=True):
            obj.signal(value, rewind)
        return m.NtStatusReturn(OK)
    if not 0 < len(body.contexts) <= MAX_BROADCAST_CONTEXT:
        raise CommandFailed(INVALID, "1..64 contexts")
    timelines = [_timeline_of(p, process, h, adapter) for h in body.contexts]
    lanes = [lane for lane, _ in timelines]
    devices = {id(d): d for _, d in timelines}.values()
    objects = [_on_adapter(p, process, h, adapter) for h in body.objects]
    if not objects and not body.cpu_event:
        raise CommandFailed(INVALID, "nothing to signal")
    if p.shares.opened and p.shares.any_readonly(body.objects):
        raise CommandFailed(NTSTATUS.STATUS_ACCESS_DENIED, "a fence opened read-only")
    if body.values and len(body.values) != n:
        raise CommandFailed(INVALID, "one value per object")
    for obj in objects:
        if obj.flags & FLAG_NO_SIGNAL:
            raise CommandFailed(INVALID, "an object created no_signal")
        if body.values and obj.type not in _VALUE_KINDS:
            raise CommandFailed(INVALID, "values for an object without one")
        if not body.values and obj.monitored:
            raise CommandFailed(INVALID, "a monitored fence needs its value")
    values = body.values or (body.fence_value,) * n
    pairs = list(zip(objects, values, strict=True))
    event = body.cpu_event

    def signal() -> None:
        if any(d.execution_state != _ACTIVE for d in devices):
            return  # a timeline whose device faulted stopped there: it never gets this far
        for obj, value in pairs:
            obj.signal(value, rewind)  # (an object gone meanwhile shows nobody its value)
        if event:
            _signal_guest(p, event, process, OK)

    gpusync.signal_after(p, process, lanes, signal, f"partition {p.id} GPU signal")
    return m.NtStatusReturn(OK)


def wait_sync_object_gpu(p: Partition, call: Call,
                         body: m.WaitSyncObjectGpu) -> m.NtStatusReturn:
    """WAITFORSYNCOBJECTFROMGPU: the context's later GPU work (and signals) waits until every
    object is reached (a mutex or semaphore: taken)."""
    process = p.process(call)
    lane, _device = _timeline_of(p, process, body.context, call.adapter)
    n = len(body.objects)
    if not 0 < n <= MAX_OBJECT_WAITED_ON:
        raise CommandFailed(INVALID, f"a GPU wait names 1..{MAX_OBJECT_WAITED_ON} objects")
    objects = [_on_adapter(p, process, h, call.adapter) for h in body.objects]
    for obj in objects:
        if obj.type == CPU_NOTIFICATION or obj.flags & FLAG_NO_WAIT:
            raise CommandFailed(INVALID, "an object that is not waited on")
        if (body.legacy and obj.monitored) or (not body.legacy and obj.type not in _VALUE_KINDS):
            raise CommandFailed(INVALID, "monitored and legacy objects mixed up")
    values = body.values * n if body.legacy else body.values

    def start() -> list[asyncio.Future[None]]:
        return [obj.wait(value) for obj, value in zip(objects, values, strict=True)]

    def give_back(futures: list[asyncio.Future[None]]) -> None:
        """The wait will never be over: units it took of a mutex or semaphore go back."""
        for obj, future in zip(objects, futures, strict=True):
            if (obj.type in (MUTEX, SEMAPHORE) and future.done() and not future.cancelled()
                    and future.exception() is None and obj.error is None):
                obj.signal()

    gpusync.wait_on(p, process, lane, start,
                    f"partition {p.id} GPU wait on 0x{body.context:08x}", give_back)
    p.statistics.fence_wait(process, _device.adapter.index, cpu=False)
    return m.NtStatusReturn(OK)


def wait_sync_object_cpu(p: Partition, call: Call,
                         body: m.WaitSyncObjectCpu) -> m.NtStatusReturn:
    """WAITFORSYNCOBJECTFROMCPU: acked at once; SIGNALGUESTEVENT(guest_event) when over. No
    objects: the guest withdraws that wait."""
    from dxg.host.device import device_of

    process = p.process(call)
    waits = process.sync.cpu_waits
    if not body.objects:
        w = waits.get(body.guest_event)
        if w is not None:
            w.withdraw()
        return m.NtStatusReturn(OK)
    device = device_of(p, process, body.device, call.adapter)
    n = len(body.objects)
    if n > MAX_OBJECT_WAITED_ON or body.flags & ~m.WAIT_ANY or not body.guest_event:
        raise CommandFailed(INVALID, "1..32 objects, known flags and an event")
    if body.guest_event in waits:
        raise CommandFailed(INVALID, "that event is waited for already")
    if len(waits) >= MAX_CPU_WAITS_PER_PROCESS:
        raise CommandFailed(NTSTATUS.STATUS_NO_MEMORY, "too many CPU waits")
    objects = [_on_adapter(p, process, h, device.adapter) for h in body.objects]
    for obj in objects:
        if not obj.monitored or obj.flags & FLAG_NO_WAIT:
            raise CommandFailed(INVALID, "only monitored fences are waited on from the CPU")
    w = CpuWait(p, process, body.guest_event, bool(body.flags & m.WAIT_ANY))
    w.futures = [obj.wait(value) for obj, value in zip(objects, body.values, strict=True)]
    w.remaining = n
    waits[w.event] = w
    for future in w.futures:
        future.add_done_callback(w.one_done)
    p.statistics.fence_wait(process, device.adapter.index, cpu=True)
    return m.NtStatusReturn(OK)


HANDLERS: MappingProxyType[Any, Handler] = MappingProxyType({
    VgpuCommand.CREATESYNCOBJECT: create_sync_object,
    GlobalCommand.DESTROYSYNCOBJECT: destroy_sync_object,
    VgpuCommand.SIGNALSYNCOBJECT: signal_sync_object,
    VgpuCommand.WAITFORSYNCOBJECTFROMGPU: wait_sync_object_gpu,
    VgpuCommand.WAITFORSYNCOBJECTFROMCPU: wait_sync_object_cpu,
})
