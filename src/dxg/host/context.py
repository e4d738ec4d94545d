"""Host contexts: one per CREATECONTEXTVIRTUAL, owned by a device."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from dxg.host.call import Call, CommandFailed, Handler
from dxg.protocol import messages as m
from dxg.protocol.commands import VgpuCommand
from dxg.uapi.handles import HandleType
from dxg.uapi.ntstatus import NTSTATUS
from dxg.uapi.structs import d3dkmt_setcontextschedulingpriority

if TYPE_CHECKING:
    from dxg.host.device import HostDevice
    from dxg.host.hwqueue import HwQueue
    from dxg.host.partition import Partition

# Private driver data of one context, as the real driver caps it (and the wire allows).
MAX_CONTEXT_PRIVATE_DATA = 128 * 1024
# D3DKMT context scheduling priorities.
PRIORITY_MIN, PRIORITY_MAX = -7, 7


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
    # Its scheduling priorities (Set[InProcess]ContextSchedulingPriority, -7..7): who runs
    # first on the engine (the in-process one orders contexts of equal priority).
    priority: int = 0
    inprocess_priority: int = 0
    executed: int = 0  # command buffers it ran to their end
    commands: int = 0  # the commands in them
    queued: int = 0  # SubmitCommand work waiting or running on its timeline
    alive: bool = True  # False once destroyed: work still queued for it does not run
    hwqueues: dict[int, HwQueue] = field(default_factory=dict)

    def census(self) -> dict[str, Any]:
        return {
            "handle": self.handle,
            "node_ordinal": self.node_ordinal,
            "engine_affinity": self.engine_affinity,
            "flags": self.flags,
            "client_hint": self.client_hint,
            "priv_drv_data_size": self.priv_drv_data_size,
            "priority": self.priority,
            "executed": self.executed,
            "hwqueues": [q.census() for q in self.hwqueues.values()],
        }


def drop_context(p: Partition, context: HostContext) -> None:
    from dxg.host.hwqueue import drop_hwqueue

    context.alive = False
    for queue in list(context.hwqueues.values()):
        drop_hwqueue(p, queue)
    from dxg.host.gpusync import context_gone

    context_gone(p, context)  # its queued GPU signals and waits will never run
    p.statistics.context_gone(context)  # what it ran stays counted (QUERYSTATISTICS)
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


def context_of(p: Partition, call: Call, handle: int) -> HostContext:
    process = p.process(call)
    context = p.handles.get(handle, HandleType.CONTEXT)
    if (context is None or context.device.process is not process
            or context.device.adapter is not call.adapter):
        raise CommandFailed(NTSTATUS.STATUS_INVALID_HANDLE,
                            f"context 0x{handle:08x} is not this process's")
    return context


def destroy_context(p: Partition, call: Call, body: m.DestroyContext) -> m.NtStatusReturn:
    drop_context(p, context_of(p, call, body.context))
    return m.NtStatusReturn(NTSTATUS.STATUS_SUCCESS)


def _priority_call(p: Partition, call: Call, body: m.IoctlArgs) -> tuple[Any, HostContext, bool]:
    from dxg.host.memory import ioctl_args

    args = ioctl_args(body, d3dkmt_setcontextschedulingpriority)
    if body.extra not in (b"\0", b"\1"):
        raise CommandFailed(NTSTATUS.STATUS_INVALID_PARAMETER, "which priority: one byte")
    return args, context_of(p, call, args.context.v), body.extra == b"\1"


def set_context_scheduling_priority(p: Partition, call: Call,
                                    body: m.IoctlArgs) -> m.IoctlArgsReturn:
    from dxg.host.memory import ioctl_reply

    args, context, in_process = _priority_call(p, call, body)
    if not PRIORITY_MIN <= args.priority <= PRIORITY_MAX:
        raise CommandFailed(NTSTATUS.STATUS_INVALID_PARAMETER, f"priority {args.priority}")
    if in_process:
        context.inprocess_priority = int(args.priority)
    else:
        context.priority = int(args.priority)
    return ioctl_reply(args)


def get_context_scheduling_priority(p: Partition, call: Call,
                                    body: m.IoctlArgs) -> m.IoctlArgsReturn:
    from dxg.host.memory import ioctl_reply

    args, context, in_process = _priority_call(p, call, body)
    args.priority = context.inprocess_priority if in_process else context.priority
    return ioctl_reply(args)


HANDLERS: MappingProxyType[VgpuCommand, Handler] = MappingProxyType({
    VgpuCommand.CREATECONTEXTVIRTUAL: create_context_virtual,
    VgpuCommand.DESTROYCONTEXT: destroy_context,
    VgpuCommand.SETCONTEXTSCHEDULINGPRIORITY: set_context_scheduling_priority,
    VgpuCommand.GETCONTEXTSCHEDULINGPRIORITY: get_context_scheduling_priority,
})

__all__ = ["HANDLERS", "MAX_CONTEXT_PRIVATE_DATA", "HostContext", "drop_context"]
