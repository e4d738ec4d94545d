"""Synchronization objects as the guest keeps them, and host events (the real driver's
``dxghostevent``, ``dxgglobal_signal_host_event``), one table per host link.

Objects. A process's sync objects are in its handle table (HandleType.SYNCOBJECT) and in its
``ProcessSync``. A monitored fence is a device object (it goes with DestroyDevice); the legacy
kinds and CPU notifications are adapter-level, as in the real driver (they go when the process
closes its last handle of the adapter). A monitored fence's value is in a slot of a host fence
block the client maps read-only (one GuestBlock per block, as paging fences); on a link that
cannot carry descriptors the guest keeps the value in a page of its own (a *mirror* page, 512
slots, mapped into the client the same way) that the host keeps current with PYDXG_FENCEVALUE.

Host events. Anything the host must tell the guest about later (a CPU wait that is over, a CPU
notification, a signal with ``enqueue_cpu_event``, a mirrored fence's new value) is a
`HostEvent` registered in its link's `HostEvents` *before* the request that names it is sent,
so no wake-up can be lost; the host names it by id in SIGNALGUESTEVENT (whose pydxg status
field says whether the wait failed) or PYDXG_FENCEVALUE. Unknown ids are ignored (a waiter that
gave up only has to remove its id). Kinds:

- a *wait*: a future the blocking CPU wait awaits (one shot);
- an *eventfd*: the client's eventfd, written (adding 1) when the event comes: one shot for an
  asynchronous CPU wait or an enqueued CPU event, persistent for a CPU notification object.
  Writes never block the loop: each goes through ``HostEvents.writers``
  (dxg.oslib.eventfd.EventfdWriters: a thread of its own per write, capped per process and per
  link), and the signals that come while one is on its way are added together in the next;
- a *mirror*: a function that stores a fence's new value in the mirror page.

When an adapter stops (removed, or its host gone) every wait and one-shot eventfd of it is
ended with STATUS_DEVICE_REMOVED (an eventfd is written, so that a poller wakes); when a
process goes its events go with it. Everything here runs on the driver's event loop.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from dxg.guest.allocation import FENCE_PAGE, GuestBlock, Shadow
from dxg.guest.errors import IoctlError
from dxg.guest.handles import HandleType
from dxg.oslib.eventfd import EventfdWriters
from dxg.oslib.fds import close_all
from dxg.uapi.ntstatus import NTSTATUS

if TYPE_CHECKING:
    from dxg.guest.adapter import GuestAdapter
    from dxg.guest.device import GuestDevice
    from dxg.guest.hostlink import HostLink
    from dxg.guest.process import GuestProcess, ProcessAdapter
    from dxg.runtime.tasks import TaskSet

__all__ = [
    "MAX_EVENTS_PER_PROCESS",
    "MIRROR_SLOTS",
    "GuestSyncObject",
    "HostEvent",
    "HostEvents",
    "ProcessSync",
    "adapter_stopped",
    "release_adapter_syncobjects",
    "release_device_syncobjects",
    "release_syncobject",
]

log = logging.getLogger(__name__)

# Host events one process may have registered at once (waits in flight, eventfds armed, CPU
# notifications, mirrors): -ENOMEM past it.
MAX_EVENTS_PER_PROCESS = 1 << 14
MIRROR_SLOTS = FENCE_PAGE // 8  # fence values in one mirror page
_RETRY_BUSY = 0.005  # seconds before an eventfd write refused for the cap is tried again
_REMOVED = int(NTSTATUS.STATUS_DEVICE_REMOVED)

WAIT, EVENTFD, MIRROR = 0, 1, 2


class HostEvent:
    """One registered host event (see the module doc for the kinds)."""

    __slots__ = ("adapter", "closing", "fd", "future", "id", "kind", "on_signal", "pending",
                 "persistent", "process", "store", "writing")

    def __init__(self, kind: int, process: GuestProcess | None, adapter: GuestAdapter) -> None:
        self.kind = kind
        self.id = 0
        self.process = process  # None: a sync file's wait (it outlives the process that made it)
        self.adapter = adapter
        self.future: asyncio.Future[int] | None = None  # WAIT: the status it ends with
        self.fd = -1  # EVENTFD: the client's eventfd (ours to close)
        self.persistent = False  # EVENTFD: signalled again and again (CPU notification)
        self.pending = 0  # EVENTFD: to add at the next write
        self.writing = False  # EVENTFD: a write is on its way
        self.closing = False  # EVENTFD: unregistered; close the descriptor after the write
        self.store: Callable[[int], None] | None = None  # MIRROR
        # EVENTFD: told the status before the eventfd is written (a wait on a queue's fence
        # over TCP brings the guest's fence page up to the values waited for)
        self.on_signal: Callable[[int], None] | None = None


class HostEvents:
    """The host events of one link, by id (ids are never reused on the link)."""

    def __init__(self, name: str, tasks: TaskSet) -> None:
        self.name = name
        self._tasks = tasks
        self._next = 0
        self._events: dict[int, HostEvent] = {}
        self.writers = EventfdWriters(f"{name} host events")

    def __len__(self) -> int:
        return len(self._events)

    def __contains__(self, event_id: int) -> bool:
        return event_id in self._events

    def _add(self, event: HostEvent) -> HostEvent:
        if event.process is not None:
            sync = event.process.sync
            if sync.events >= MAX_EVENTS_PER_PROCESS:
                raise IoctlError(errno.ENOMEM, f"{MAX_EVENTS_PER_PROCESS} host events at once")
            sync.events += 1
            sync.tables.add(self)
        self._next += 1
        event.id = self._next
        self._events[event.id] = event
        return event

    @staticmethod
    def _uncount(event: HostEvent) -> None:
        if event.process is not None:
            event.process.sync.events -= 1

    def add_wait(self, process: GuestProcess, adapter: GuestAdapter) -> HostEvent:
        """A one-shot event whose future gets the status SIGNALGUESTEVENT brings."""
        event = HostEvent(WAIT, process, adapter)
        event.future = asyncio.get_running_loop().create_future()
        return self._add(event)

    def add_file_wait(self, adapter: GuestAdapter) -> HostEvent:
        """A one-shot wait of no process: a sync file's wait on a shared fence, which lives as
        long as the sync file (its host reference), not its maker. Bounded by the sync files
        the guest keeps (dxg.guest.share)."""
        event = HostEvent(WAIT, None, adapter)
        event.future = asyncio.get_running_loop().create_future()
        return self._add(event)

    def add_eventfd(self, process: GuestProcess, adapter: GuestAdapter, fd: int,
                    persistent: bool) -> HostEvent:
        """An event that adds 1 to eventfd ``fd`` (taken: closed when the event goes, also
        when this fails)."""
        event = HostEvent(EVENTFD, process, adapter)
        event.fd = fd
        event.persistent = persistent
        try:
            return self._add(event)
        except BaseException:
            close_all((fd,))
            raise

    def add_mirror(self, process: GuestProcess, adapter: GuestAdapter,
                   store: Callable[[int], None]) -> HostEvent:
        event = HostEvent(MIRROR, process, adapter)
        event.store = store
        return self._add(event)

    def remove(self, event_id: int) -> bool:
        """Unregister an event; False when it was gone already (it came, or never was)."""
        event = self._events.pop(event_id, None)
        if event is None:
            return False
        self._retire(event)
        return True

    def _retire(self, event: HostEvent) -> None:
        self._uncount(event)
        if event.kind == EVENTFD:
            event.closing = True
            if not event.writing:
                self._close_fd(event)
        elif event.kind == WAIT and event.future is not None and not event.future.done():
            event.future.cancel()

    @staticmethod
    def _close_fd(event: HostEvent) -> None:
        if event.fd >= 0:
            close_all((event.fd,))
            event.fd = -1

    # ---- what the host says --------------------------------------------------------------------

    def signal(self, event_id: int, status: int = 0) -> bool:
        """SIGNALGUESTEVENT(event_id): False for an id nobody waits on (ignored)."""
        event = self._events.get(event_id)
        if event is None:
            return False
        if event.kind == WAIT:
            del self._events[event_id]
            self._uncount(event)
            if event.future is not None and not event.future.done():
                event.future.set_result(int(status) & 0xFFFFFFFF)
        elif event.kind == EVENTFD:
            if not event.persistent:
                del self._events[event_id]
                self._uncount(event)
                event.closing = True  # (after its write)
            if event.on_signal is not None:
                try:
                    event.on_signal(int(status) & 0xFFFFFFFF)
                except Exception:  # the page is a courtesy: the wake-up must still go
                    log.exception("host event %d: updating a fence page failed", event_id)
            self._write(event)
        return True

    def value(self, event_id: int, value: int) -> bool:
        """PYDXG_FENCEVALUE(event_id, value): a mirrored fence's new value."""
        event = self._events.get(event_id)
        if event is None or event.kind != MIRROR or event.store is None:
            return False
        event.store(value)
        return True

    def _write(self, event: HostEvent) -> None:
        event.pending += 1
        if event.writing:
            return  # (added to the write after the one on its way)
        event.writing = True
        try:
            self._tasks.spawn(self._writer(event), f"{self.name} eventfd")
        except RuntimeError:  # the link is closing
            event.writing = False
            if event.closing:
                self._close_fd(event)

    async def _writer(self, event: HostEvent) -> None:
        try:
            while event.pending and event.fd >= 0:
                n, event.pending = event.pending, 0
                try:
                    fd = os.dup(event.fd)
                except OSError:
                    return
                ret = await self.writers.add(fd, n, event.process)
                if ret == -errno.EBUSY:  # too many writes on their way: ours comes next
                    event.pending += n
                    await asyncio.sleep(_RETRY_BUSY)
                elif ret < 0:  # not an eventfd any more, or its counter is full: it is set
                    log.debug("%s: eventfd write: %s", self.name, os.strerror(-ret))
        finally:
            event.writing = False
            if event.closing:
                self._close_fd(event)

    # ---- ends ----------------------------------------------------------------------------------

    def fail_adapter(self, adapter: GuestAdapter, status: int = _REMOVED) -> None:
        """The adapter stopped: its waits end with ``status``, its one-shot eventfds are
        written (a poller wakes and finds the adapter gone)."""
        for event_id, event in list(self._events.items()):
            if event.adapter is not adapter:
                continue
            if event.kind == WAIT or (event.kind == EVENTFD and not event.persistent):
                self.signal(event_id, status)

    def drop_process(self, process: GuestProcess) -> None:
        """The process goes: every event of it is unregistered."""
        for event_id, event in list(self._events.items()):
            if event.process is process:
                self.remove(event_id)

    def close(self) -> None:
        """The link goes: waits end with STATUS_DEVICE_REMOVED, descriptors are closed."""
        for event_id in list(self._events):
            event = self._events[event_id]
            if event.kind == WAIT:
                self.signal(event_id, _REMOVED)
            else:
                self.remove(event_id)


# ---- objects ------------------------------------------------------------------------------------


class GuestSyncObject:
    """A sync object of a process: its host handle, its kind, where its value is shown (a host
    fence block, or a mirror slot) and its CPU notification's event."""

    __slots__ = ("block", "device", "event", "flags", "handle", "host_handle", "mirror",
                 "offset", "pa", "readonly", "type")

    def __init__(self, device: GuestDevice, host_handle: int, kind: int, flags: int,
                 device_object: bool) -> None:
        self.device: GuestDevice | None = device if device_object else None
        self.pa: ProcessAdapter = device.process_adapter
        self.host_handle = host_handle
        self.type = kind
        self.flags = flags
        self.handle = 0
        self.block: GuestBlock | None = None  # the host fence block it is in (local links)
        self.offset = 0
        self.mirror: tuple[MirrorPage, int, HostEvent] | None = None  # (links without fds)
        self.event: HostEvent | None = None  # a CPU notification's (persistent) eventfd
        self.readonly = False  # a shared fence opened without the right to signal it

    @property
    def shared(self) -> bool:
        """Shared by descriptor (made ``shared``, or opened from a share: docs/sharing.md)."""
        return bool(self.flags & 1)  # d3dddi_synchronizationobject_flags.shared

    @property
    def adapter(self) -> GuestAdapter:
        return self.pa.adapter

    @property
    def monitored(self) -> bool:
        return self.type == 5  # _D3DDDI_MONITORED_FENCE


class MirrorPage:
    """A guest page of fence values the client maps read-only (links without descriptors)."""

    __slots__ = ("free", "shadow")

    def __init__(self, shadow: Shadow) -> None:
        self.shadow = shadow
        self.free = list(range(MIRROR_SLOTS - 1, -1, -1))  # pop() hands out slot 0 first

    def store(self, slot: int, value: int) -> None:
        if not self.shadow.dropped:
            self.shadow.mem.write(slot * 8, (value & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little"))


class ProcessSync:
    """One process's sync objects (by guest handle), its mirror pages per link and how many
    host events it has registered."""

    def __init__(self) -> None:
        self.objects: dict[int, GuestSyncObject] = {}
        self.events = 0
        self.tables: set[HostEvents] = set()  # the links' event tables it registered in
        self._pages: dict[HostLink, list[MirrorPage]] = {}

    def mirror_slot(self, proc: GuestProcess, link: HostLink) -> tuple[MirrorPage, int]:
        pages = self._pages.setdefault(link, [])
        for page in pages:
            if page.free:
                break
        else:
            page = MirrorPage(proc.memory.shadow(FENCE_PAGE, readonly=True))
            pages.append(page)
        return page, page.free.pop()

    def new_mirror(self, proc: GuestProcess, link: HostLink, adapter: GuestAdapter,
                   initial: int = 0) -> tuple[MirrorPage, int, HostEvent]:
        """A fence's mirror over a link without descriptors: a slot of a mirror page showing
        ``initial``, and the host event that stores the fence's new values in it."""
        page, slot = self.mirror_slot(proc, link)
        page.store(slot, initial)
        try:
            event = link.events.add_mirror(proc, adapter, functools.partial(page.store, slot))
        except BaseException:
            self.free_mirror(proc, link, page, slot)
            raise
        return page, slot, event

    def drop_mirror(self, proc: GuestProcess, link: HostLink,
                    mirror: tuple[MirrorPage, int, HostEvent]) -> None:
        page, slot, event = mirror
        link.events.remove(event.id)
        self.free_mirror(proc, link, page, slot)

    def free_mirror(self, proc: GuestProcess, link: HostLink, page: MirrorPage,
                    slot: int) -> None:
        page.store(slot, 0)
        page.free.append(slot)
        pages = self._pages.get(link, [])
        if len(page.free) == MIRROR_SLOTS and page in pages:
            pages.remove(page)
            if not pages:
                del self._pages[link]
            proc.memory.drop_shadow(page.shadow)

    def close(self, proc: GuestProcess) -> None:
        """The process goes: every object's events and pages (the handles went before)."""
        for obj in list(self.objects.values()):
            release_syncobject(proc, obj)
        for table in self.tables:
            table.drop_process(proc)
        self.tables.clear()
        for pages in self._pages.values():
            for page in pages:
                proc.memory.drop_shadow(page.shadow)
        self._pages.clear()


def release_syncobject(proc: GuestProcess, obj: GuestSyncObject) -> None:
    """The object goes from the guest: its handle, its events, its page (the host's goes with
    DESTROYSYNCOBJECT, or with its device, adapter or process)."""
    proc.sync.objects.pop(obj.handle, None)
    if obj.handle:
        proc.handles.free(obj.handle, HandleType.SYNCOBJECT)
        obj.handle = 0
    link = obj.adapter.link
    if obj.event is not None:
        link.events.remove(obj.event.id)
        obj.event = None
    if obj.mirror is not None:
        proc.sync.drop_mirror(proc, link, obj.mirror)
        obj.mirror = None
    if obj.block is not None:
        proc.memory.release(obj.block)
        obj.block = None


def release_device_syncobjects(proc: GuestProcess, dev: GuestDevice) -> int:
    """DestroyDevice: its monitored fences go from the guest; returns how many."""
    gone = [o for o in proc.sync.objects.values() if o.device is dev]
    for obj in gone:
        release_syncobject(proc, obj)
    return len(gone)


def release_adapter_syncobjects(proc: GuestProcess, adapter: GuestAdapter) -> int:
    """The process closed its last handle of the adapter: every object on it goes from the
    guest (the host drops them with PYDXG_CLOSEPROCESSADAPTER); returns how many."""
    gone = [o for o in proc.sync.objects.values() if o.adapter is adapter]
    for obj in gone:
        release_syncobject(proc, obj)
    return len(gone)


def adapter_stopped(adapter: GuestAdapter) -> None:
    """The adapter stopped (removed, or its host gone): whoever waits on it wakes with
    STATUS_DEVICE_REMOVED."""
    adapter.link.events.fail_adapter(adapter, _REMOVED)
