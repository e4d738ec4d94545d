"""Host contexts: one per CREATECONTEXTVIRTUAL, owned by a device."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from dxg.host.call import Call, CommandFailed, Handler
from dxg.protocol import messages as m
from dxg.protocol.commands import VgpuCommand
from dxg.uapi.handles import HandleType
from dxg.uapi.ntstatus import NTSTATUS

if TYPE_CHECKING:
    from dxg.host.device import HostDevice
    from dxg.host.partition import Partition

# Private driver data of one context, as the real driver caps it (and the wire allows).
MAX_CONTEXT_PRIVATE_DATA = 128 * 1024


@dataclass(eq=False, slots=True)
class HostContext:
    handle: int
    device: HostDevice
    node_ordinal: int
    engine_affinity: int
    flags: int
    client_hint: int
    # Only the size of the guest's private driver data is kept: the bytes are echoed in the
    # reply and nothing on this host reads them, so a guest cannot pin memory with them.
    priv_drv_data_size: int = 0

    def census(self) -> dict[str, Any]:
        return {
            "handle": self.handle,
            "node_ordinal": self.node_ordinal,
            "engine_affinity": self.engine_affinity,
            "flags": self.flags,
            "client_hint": self.client_hint,
            "priv_drv_data_size": self.priv_drv_data_size,
        }


def drop_context(p: Partition, context: HostContext) -> None:
    context.device.contexts.pop(context.handle, None)
    p.free(context.handle, HandleType.CONTEXT, context.device.process)


def create_context_virtual(p: Partition, call: Call,
                           body: m.CreateContextVirtual) -> m.CreateContextVirtual:
    from dxg.host.device import device_of

    adapter = call.adapter
    assert adapter is not None
    device = device_of(p, p.process(call), body.device, adapter)
    if body.node_ordinal >= adapter.node_count:
        raise CommandFailed(NTSTATUS.STATUS_INVALID_PARAMETER,
                            f"node {body.node_ordinal} of {adapter.node_count}")
    if len(body.priv_drv_data) > MAX_CONTEXT_PRIVATE_DATA:
        raise CommandFailed(NTSTATUS.STATUS_INVALID_PARAMETER, "private data too large")
    context = HostContext(0, device, body.node_ordinal, body.engine_affinity, body.flags,
                          body.client_hint, len(body.priv_drv_data))
    context.handle = p.alloc(HandleType.CONTEXT, context, device.process)
    device.contexts[context.handle] = context
    return dataclasses.replace(body, context=context.handle)


def destroy_context(p: Partition, call: Call, body: m.DestroyContext) -> m.NtStatusReturn:
    process = p.process(call)
    context = p.handles.get(body.context, HandleType.CONTEXT)
    if (context is None or context.device.process is not process
            or context.device.adapter is not call.adapter):
        raise CommandFailed(NTSTATUS.STATUS_INVALID_HANDLE,
                            f"context 0x{body.context:08x} is not this process's")
    drop_context(p, context)
    return m.NtStatusReturn(NTSTATUS.STATUS_SUCCESS)


HANDLERS: MappingProxyType[VgpuCommand, Handler] = MappingProxyType({
    VgpuCommand.CREATECONTEXTVIRTUAL: create_context_virtual,
    VgpuCommand.DESTROYCONTEXT: destroy_context,
})

__all__ = ["HANDLERS", "MAX_CONTEXT_PRIVATE_DATA", "HostContext", "drop_context"]
