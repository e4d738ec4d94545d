"""A device: created on the host under an adapter; owns contexts, allocations, resources and
paging queues."""

from __future__ import annotations

import errno
from enum import IntEnum
from typing import TYPE_CHECKING

from dxg.guest.errors import IoctlError
from dxg.guest.handles import HandleType

if TYPE_CHECKING:
    from dxg.guest.adapter import GuestAdapter
    from dxg.guest.allocation import GuestAllocation, GuestPagingQueue, GuestResource
    from dxg.guest.context import GuestContext
    from dxg.guest.process import GuestProcess, ProcessAdapter


class ObjectState(IntEnum):
    CREATED = 0
    ACTIVE = 1
    DESTROYED = 2


# d3dkmt_deviceexecution_state
DEVICEEXECUTION_ACTIVE = 1
DEVICEEXECUTION_RESET = 2


class GuestDevice:
    def __init__(self, pa: ProcessAdapter, host_handle: int) -> None:
        self.process_adapter = pa
        self.host_handle = host_handle
        self.handle = 0
        self.state = ObjectState.CREATED
        self.contexts: list[GuestContext] = []
        self.allocations: list[GuestAllocation] = []  # standalone ones
        self.resources: list[GuestResource] = []
        self.paging_queues: list[GuestPagingQueue] = []
        self.execution_state = DEVICEEXECUTION_ACTIVE
        self.execution_state_counter = 0

    @property
    def adapter(self) -> GuestAdapter:
        return self.process_adapter.adapter


async def create_device(proc: GuestProcess, pa: ProcessAdapter, flags: int) -> GuestDevice:
    from dxg.guest import vmbus
    from dxg.guest.process import host_process

    adapter = pa.adapter
    if not adapter.active:
        raise IoctlError(errno.ENODEV, "adapter is stopped")
    link = adapter.link
    proc.charge_object()
    try:
        hprocess = await host_process(proc, link)
        host_handle = await vmbus.create_device(adapter, hprocess, flags,
                                                link.device_state_cookie)
        if host_handle == 0:
            raise IoctlError(errno.EINVAL, "the host refused to create the device")
        dev = GuestDevice(pa, host_handle)
        if proc.closed or pa.refcount == 0:
            # The process or its adapter handle went away while the host was creating it.
            await _host_destroy(dev, hprocess)
            raise IoctlError(errno.ENODEV, "adapter closed during device creation")
        try:
            dev.handle = proc.handles.alloc(HandleType.DEVICE, dev)
        except MemoryError:
            await _host_destroy(dev, hprocess)
            raise
    except BaseException:
        if not proc.closed:
            proc.release_objects()
        raise
    dev.state = ObjectState.ACTIVE
    pa.devices.append(dev)
    return dev


async def destroy_device(proc: GuestProcess, dev: GuestDevice, flush: bool = False) -> int:
    """Guest handles go first (memory, contexts, then the device), then the host object (which
    takes its allocations, resources and paging queues with it)."""
    from dxg.guest.allocation import release_device_memory
    from dxg.guest.process import existing_host_process

    if dev.state == ObjectState.DESTROYED:
        return 0
    dev.state = ObjectState.DESTROYED
    from dxg.guest.context import release_context_queues

    released = release_device_memory(proc, dev)
    from dxg.guest.syncobject import release_device_syncobjects

    released += release_device_syncobjects(proc, dev)
    for ctx in dev.contexts:
        ctx.destroyed = True
        proc.handles.free(ctx.handle, HandleType.CONTEXT)
        released += release_context_queues(proc, ctx)
    if not proc.closed:  # process exit releases the whole share at once
        proc.release_objects(1 + len(dev.contexts) + released)
    dev.contexts.clear()
    proc.handles.free(dev.handle, HandleType.DEVICE)
    pa = dev.process_adapter
    if dev in pa.devices:
        pa.devices.remove(dev)
    adapter = dev.adapter
    if not adapter.active or not adapter.link.up:
        return 0  # the host is gone: nothing to tell it
    hprocess = existing_host_process(proc, adapter.link)
    if hprocess is None:
        return 0
    if flush:
        from dxg.guest import vmbus
        from dxg.protocol.commands import DXGDEVICE_FLUSHSCHEDULER_DEVICE_TERMINATE

        try:
            await vmbus.flush_device(adapter, hprocess, dev.host_handle,
                                     DXGDEVICE_FLUSHSCHEDULER_DEVICE_TERMINATE)
        except IoctlError:
            pass
    return await _host_destroy(dev, hprocess)


async def _host_destroy(dev: GuestDevice, hprocess: int) -> int:
    from dxg.guest import vmbus

    try:
        return await vmbus.destroy_device(dev.adapter, hprocess, dev.host_handle)
    except IoctlError as e:
        if e.errno == errno.ENODEV:
            return 0
        raise
