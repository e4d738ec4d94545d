"""An execution context on a device (CreateContextVirtual)."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from dxg.guest.errors import IoctlError
from dxg.guest.handles import HandleType
from dxg.protocol import messages as m

if TYPE_CHECKING:
    from dxg.guest.device import GuestDevice
    from dxg.guest.ioctl_queue import GuestHwQueue
    from dxg.guest.process import GuestProcess


class GuestContext:
    def __init__(self, device: GuestDevice, host_handle: int, node_ordinal: int) -> None:
        self.device = device
        self.host_handle = host_handle
        self.node_ordinal = node_ordinal
        self.handle = 0
        self.destroyed = False
        self.hwqueues: list[GuestHwQueue] = []


async def create_context(proc: GuestProcess, dev: GuestDevice, node_ordinal: int,
                         engine_affinity: int, flags: int, client_hint: int,
                         priv: bytes) -> tuple[GuestContext, bytes]:
    """CREATECONTEXTVIRTUAL; returns the context and the host's copy of the private data."""
    from dxg.guest import vmbus
    from dxg.guest.device import ObjectState
    from dxg.guest.process import host_process

    adapter = dev.adapter
    if not adapter.active:
        raise IoctlError(errno.ENODEV, "adapter is stopped")
    proc.charge_object()
    try:
        hprocess = await host_process(proc, adapter.link)
        msg = m.CreateContextVirtual(0, dev.host_handle, node_ordinal, engine_affinity, flags,
                                     client_hint, priv)
        out = await vmbus.create_context_virtual(adapter, hprocess, msg)
        if out.context == 0:
            raise IoctlError(errno.EINVAL, "the host refused to create the context")
        ctx = GuestContext(dev, out.context, node_ordinal)
        if dev.state != ObjectState.ACTIVE:
            await vmbus.destroy_context(adapter, hprocess, out.context)
            raise IoctlError(errno.EINVAL, "device destroyed during context creation")
        try:
            ctx.handle = proc.handles.alloc(HandleType.CONTEXT, ctx)
        except MemoryError:
            await vmbus.destroy_context(adapter, hprocess, out.context)
            raise
    except BaseException:
        if not proc.closed:
            proc.release_objects()
        raise
    dev.contexts.append(ctx)
    return ctx, out.priv_drv_data


def release_context_queues(proc: GuestProcess, ctx: GuestContext) -> int:
    """The context's hardware queues go from the guest (the host's go with the context);
    returns how many."""
    from dxg.guest.ioctl_queue import release_hwqueue

    queues = list(ctx.hwqueues)
    for queue in queues:
        release_hwqueue(proc, queue)
    return len(queues)


async def destroy_context(proc: GuestProcess, ctx: GuestContext) -> int:
    from dxg.guest import vmbus
    from dxg.guest.process import existing_host_process

    dev = ctx.device
    if ctx.destroyed:
        return 0
    ctx.destroyed = True
    proc.handles.free(ctx.handle, HandleType.CONTEXT)
    queues = release_context_queues(proc, ctx)
    if ctx in dev.contexts:
        dev.contexts.remove(ctx)
        if not proc.closed:
            proc.release_objects(1 + queues)
    adapter = dev.adapter
    if not adapter.active:
        raise IoctlError(errno.ENODEV, "adapter is stopped")
    hprocess = existing_host_process(proc, adapter.link)
    if hprocess is None:
        return 0
    return await vmbus.destroy_context(adapter, hprocess, ctx.host_handle)
