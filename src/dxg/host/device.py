"""Host devices: one per CREATEDEVICE, owned by a process, bound to one adapter."""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from dxg.host.call import Call, CommandFailed, Handler
from dxg.protocol import messages as m
from dxg.protocol.commands import VgpuCommand
from dxg.uapi.handles import HandleType
from dxg.uapi.ntstatus import NTSTATUS
from dxg.uapi.structs import (
    d3dkmt_deviceexecution_state,
    d3dkmt_devicepagefault_state,
    d3dkmt_devicestate_type,
    d3dkmt_getdevicestate,
    d3dkmt_markdeviceaserror,
)

if TYPE_CHECKING:
    from dxg.host.adapter import HostAdapter
    from dxg.host.allocation import Allocation, Resource
    from dxg.host.context import HostContext
    from dxg.host.pagingqueue import PagingQueue
    from dxg.host.partition import Partition
    from dxg.host.process import HostProcess

OK = NTSTATUS.STATUS_SUCCESS
EXECUTION_ACTIVE = int(d3dkmt_deviceexecution_state._D3DKMT_DEVICEEXECUTION_ACTIVE)
EXECUTION_STATES = frozenset(int(s) for s in d3dkmt_deviceexecution_state)
_EXECUTION_RESET = int(d3dkmt_deviceexecution_state._D3DKMT_DEVICEEXECUTION_RESET)

_STATE_EXECUTION = int(d3dkmt_devicestate_type._D3DKMT_DEVICESTATE_EXECUTION)
_STATE_RESET = int(d3dkmt_devicestate_type._D3DKMT_DEVICESTATE_RESET)
_STATE_PAGE_FAULT = int(d3dkmt_devicestate_type._D3DKMT_DEVICESTATE_PAGE_FAULT)
_STATE_PRESENT_KINDS = frozenset(
    int(s)
    for s in (
        d3dkmt_devicestate_type._D3DKMT_DEVICESTATE_PRESENT,
        d3dkmt_devicestate_type._D3DKMT_DEVICESTATE_PRESENT_DWM,
        d3dkmt_devicestate_type._D3DKMT_DEVICESTATE_PRESENT_QUEUE,
    )
)


@dataclass(eq=False, slots=True)
class HostDevice:
    handle: int
    process: HostProcess
    adapter: HostAdapter
    flags: int
    # The guest's device-state cookie (CREATEDEVICE.error_code): opaque to the host, echoed in
    # SETGUESTDATA whenever this device's execution state changes.
    error_code: int
    execution_state: int = EXECUTION_ACTIVE
    contexts: dict[int, HostContext] = field(default_factory=dict)
    # Device memory (dxg.host.allocation): every allocation (a resource's too), the resources,
    # the paging queues.
    allocations: dict[int, Allocation] = field(default_factory=dict)
    resources: dict[int, Resource] = field(default_factory=dict)
    paging_queues: dict[int, PagingQueue] = field(default_factory=dict)
    flushes: int = 0
    fault_va: int = 0  # where its work last faulted (GetDeviceState PAGE_FAULT)
    fault_reason: str = ""
    # Backend work in flight for this device: set each event to cut it short.
    jobs: set[threading.Event] = field(default_factory=set)

    def census(self) -> dict[str, Any]:
        return {
            "handle": self.handle,
            "adapter": self.adapter.index,
            "flags": self.flags,
            "execution_state": self.execution_state,
            "contexts": [c.census() for c in self.contexts.values()],
            "allocations": len(self.allocations),
            "resources": len(self.resources),
            "paging_queues": [q.census() for q in self.paging_queues.values()],
        }


def drop_device(p: Partition, device: HostDevice) -> None:
    """The device goes, with its contexts, paging queues, resources and allocations; work it
    has in flight is told to stop."""
    from dxg.host.allocation import drop_device_memory
    from dxg.host.context import drop_context

    for job in list(device.jobs):
        job.set()
    for context in list(device.contexts.values()):
        drop_context(p, context)
    from dxg.host.syncobject import drop_device_syncobjects

    drop_device_syncobjects(p, device)  # (its monitored fences; waits on them end)
    drop_device_memory(p, device)
    device.process.devices.pop(device.handle, None)
    p.shares.device_gone(device)  # (shared memory it stood for gets another device)
    p.free(device.handle, HandleType.DEVICE, device.process)


def device_of(p: Partition, process: HostProcess, handle: int,
              adapter: HostAdapter | None) -> HostDevice:
    """The device ``handle`` of ``process`` on ``adapter``, or CommandFailed(INVALID_HANDLE)."""
    device = p.handles.get(handle, HandleType.DEVICE)
    if device is None or device.process is not process or device.adapter is not adapter:
        raise CommandFailed(NTSTATUS.STATUS_INVALID_HANDLE,
                            f"device 0x{handle:08x} is not this process's on this adapter")
    return device


def create_device(p: Partition, call: Call, body: m.CreateDevice) -> m.HandleReturn:
    from dxg.host.adapter import open_of

    assert call.adapter is not None
    process = p.process(call)
    open_of(p, call.adapter)
    device = HostDevice(0, process, call.adapter, body.flags, body.error_code)
    device.handle = p.alloc(HandleType.DEVICE, device, process)
    process.devices[device.handle] = device
    return m.HandleReturn(device.handle)


def destroy_device(p: Partition, call: Call, body: m.DestroyDevice) -> m.NtStatusReturn:
    drop_device(p, device_of(p, p.process(call), body.device, call.adapter))
    return m.NtStatusReturn(OK)


def flush_device(p: Partition, call: Call, body: m.FlushDevice) -> m.NtStatusReturn:
    device = device_of(p, p.process(call), body.device, call.adapter)
    device.flushes += 1  # nothing queued yet: no engine runs work on this host so far
    return m.NtStatusReturn(OK)


def get_device_state(p: Partition, call: Call,
                     body: m.GetDeviceState) -> m.GetDeviceStateReturn:
    args = d3dkmt_getdevicestate.from_buffer_copy(body.args)
    device = device_of(p, p.process(call), args.device.v, call.adapter)
    state_type = args.state_type
    if state_type == _STATE_EXECUTION:
        args.execution_state = device.execution_state
        status = OK
    elif state_type in (_STATE_RESET, _STATE_PAGE_FAULT):
        # The union reads as zeros but for the address the device's work last faulted at.
        args = d3dkmt_getdevicestate.from_buffer_copy(body.args[:8] + bytes(len(body.args) - 8))
        if state_type == _STATE_PAGE_FAULT and device.fault_va:
            fault = d3dkmt_devicepagefault_state(faulted_virtual_address=device.fault_va)
            ctypes.memmove(ctypes.addressof(args) + 8, bytes(fault), ctypes.sizeof(fault))
        status = OK
    elif state_type in _STATE_PRESENT_KINDS:
        status = NTSTATUS.STATUS_NOT_SUPPORTED  # compute-only adapters present nothing
    else:
        status = NTSTATUS.STATUS_INVALID_PARAMETER
    return m.GetDeviceStateReturn(bytes(args), status)


def mark_device_as_error(p: Partition, call: Call, body: m.IoctlArgs) -> m.IoctlArgsReturn:
    """MARKDEVICEASERROR: the device is reset (its fences' waiters wake with an error; its
    later submissions are refused), as when its own work faults."""
    from dxg.host.hwqueue import fault_device
    from dxg.host.memory import expect_extra, ioctl_args, ioctl_reply

    args = ioctl_args(body, d3dkmt_markdeviceaserror)
    expect_extra(body.extra, 0, "MARKDEVICEASERROR")
    device = device_of(p, p.process(call), args.device.v, call.adapter)
    fault_device(p, device, _EXECUTION_RESET, 0, f"marked as in error (reason {args.reason})")
    return ioctl_reply(args)


HANDLERS: MappingProxyType[VgpuCommand, Handler] = MappingProxyType({
    VgpuCommand.CREATEDEVICE: create_device,
    VgpuCommand.DESTROYDEVICE: destroy_device,
    VgpuCommand.FLUSHDEVICE: flush_device,
    VgpuCommand.GETDEVICESTATE: get_device_state,
    VgpuCommand.MARKDEVICEASERROR: mark_device_as_error,
})

__all__ = ["EXECUTION_STATES", "HANDLERS", "HostDevice", "device_of", "drop_device"]
