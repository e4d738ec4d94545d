"""The one table of guest <-> host commands pydxg speaks.

For each command: its code, the body type of the request and of the reply, how the host says
"failed" in that reply's layout, whether it is fire-and-forget once the host enables async
messages, which channel it travels on, whether its header names a host process, and whether it
may be larger than one packet (a bulk attachment) or carry file descriptors. The guest sends and
the host dispatches through this table; `docs/protocol.md`'s command list is generated from it
(`render_command_table`); the protocol fuzz tests iterate over it.

Body types are the classes of :mod:`dxg.protocol.messages`: ``pack()`` and ``unpack(bytes)``
(which raises ProtocolError on anything malformed). Commands the real driver defines but pydxg
does not speak are absent: the host answers them with a 4-byte STATUS_NOT_IMPLEMENTED.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Any

from dxg.protocol import messages as m
from dxg.protocol.bus import (
    DXGK_VMBUS_INTERFACE_VERSION,
    DXGK_VMBUS_LAST_COMPATIBLE_INTERFACE_VERSION,
)
from dxg.protocol.commands import GlobalCommand, VgpuCommand
from dxg.protocol.errors import ProtocolError

Command = GlobalCommand | VgpuCommand
FailureReply = Callable[[int, bytes], bytes]


class Route(Enum):
    """Where a command travels."""

    GLOBAL = "global"  # the global channel (VM-level commands, codes >= 1000)
    VGPU = "vgpu"  # the adapter's vGPU channel, or the global channel once async is enabled
    VGPU_ONLY = "vgpu-only"  # always the adapter's own vGPU channel (adapter bring-up)


# ---- failure replies: one per reply layout -----------------------------------------------------


def fail_status(status: int, body: bytes) -> bytes:
    """The bare 4-byte NTSTATUS (the guest reads a 4-byte reply where a larger one was due as
    the host's failure status)."""
    return m.NtStatusReturn(int(status) & 0xFFFFFFFF).pack()


def fail_empty(status: int, body: bytes) -> bytes:
    return b""


def _fail_create_process(status: int, body: bytes) -> bytes:
    return m.CreateProcessReturn(0).pack()


def _fail_handle(status: int, body: bytes) -> bytes:
    return m.HandleReturn(0, int(status) & 0xFFFFFFFF).pack()


def _fail_open_adapter(status: int, body: bytes) -> bytes:
    return m.OpenAdapterReturn(0, int(status) & 0xFFFFFFFF, DXGK_VMBUS_INTERFACE_VERSION,
                               DXGK_VMBUS_LAST_COMPATIBLE_INTERFACE_VERSION).pack()


def _fail_query_adapter_info(status: int, body: bytes) -> bytes:
    try:
        data = m.QueryAdapterInfo.unpack(body).private_data
    except ProtocolError:
        return fail_status(status, body)
    return m.StatusAndData(int(status) & 0xFFFFFFFF, data).pack()


def _fail_create_context(status: int, body: bytes) -> bytes:
    try:
        request = m.CreateContextVirtual.unpack(body)
    except ProtocolError:
        return fail_status(status, body)
    return dataclasses.replace(request, context=0).pack()


def _fail_device_state(status: int, body: bytes) -> bytes:
    try:
        args = m.GetDeviceState.unpack(body).args
    except ProtocolError:
        return fail_status(status, body)
    return m.GetDeviceStateReturn(args, int(status) & 0xFFFFFFFF).pack()


def _fail_feature(status: int, body: bytes) -> bytes:
    return m.IsFeatureEnabledReturn(int(status) & 0xFFFFFFFF, 0, 0, 0, 0, 0).pack()


def _fail_clock(status: int, body: bytes) -> bytes:
    return m.QueryClockCalibrationReturn(int(status) & 0xFFFFFFFF,
                                         bytes(m.GPUCLOCKDATA_SIZE)).pack()


def _fail_create_allocation(status: int, body: bytes) -> bytes:
    return m.CreateAllocationReturn(int(status) & 0xFFFFFFFF, 0).pack()


def _fail_lock2(status: int, body: bytes) -> bytes:
    return m.Lock2Return(int(status) & 0xFFFFFFFF).pack()


def _fail_ioctl_args(status: int, body: bytes) -> bytes:
    try:
        args = m.IoctlArgs.unpack(body).args
    except ProtocolError:
        return fail_status(status, body)
    return m.IoctlArgsReturn(int(status) & 0xFFFFFFFF, args).pack()


# ---- the table -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommandSpec:
    command: Command
    request: type  # body class of the request (m.Empty: header only)
    reply: type | None  # body class of the reply; None: an empty completion
    failure: FailureReply  # the reply that carries a failure status
    route: Route
    per_process: bool = True  # the header's process field names a host process
    asynchronous: bool = False  # fire-and-forget once the host enables async messages
    large: bool = False  # request and reply may exceed one packet (bulk attachment)
    fds: bool = False  # descriptors may travel with the request and the reply
    note: str = ""

    @property
    def name(self) -> str:
        return self.command.name

    def parse_request(self, body: bytes) -> Any:
        return self.request.unpack(body)

    def parse_reply(self, body: bytes) -> Any:
        if self.reply is None:
            if body:
                raise ProtocolError(f"{self.name}: {len(body)} bytes in an empty completion")
            return None
        return self.reply.unpack(body)


def _g(command: GlobalCommand, request: type, reply: type | None, failure: FailureReply,
       **kw: Any) -> CommandSpec:
    return CommandSpec(command, request, reply, failure, Route.GLOBAL, **kw)


def _v(command: VgpuCommand, request: type, reply: type | None, failure: FailureReply,
       route: Route = Route.VGPU, **kw: Any) -> CommandSpec:
    return CommandSpec(command, request, reply, failure, route, **kw)


G, V = GlobalCommand, VgpuCommand

_SPECS = (
    _g(G.CREATEPROCESS, m.CreateProcess, m.CreateProcessReturn, _fail_create_process,
       per_process=False, note="hprocess 0 = failure"),
    _g(G.DESTROYPROCESS, m.Empty, m.NtStatusReturn, fail_status),
    _g(G.SETIOSPACEREGION, m.SetIoSpaceRegion, m.NtStatusReturn, fail_status, per_process=False),
    _g(G.PYDXG_QUERYPARTITION, m.Empty, m.JsonReply, fail_status, per_process=False, large=True,
       note="pydxg extension: the host's census of this guest, UTF-8 JSON"),
    _g(G.PYDXG_SETPROCESSQUOTA, m.ProcessQuota, m.NtStatusReturn, fail_status,
       note="pydxg extension: account u64, per-process and per-account limits u64 (bytes per "
            "adapter; 2^64-1 none), compute share u32 (1..10000) and 4 bytes of padding; "
            "before the process commits memory"),
    _v(V.OPENADAPTER, m.OpenAdapter, m.OpenAdapterReturn, _fail_open_adapter, Route.VGPU_ONLY,
       per_process=False),
    _v(V.CLOSEADAPTER, m.CloseAdapter, None, fail_empty, Route.VGPU_ONLY, per_process=False),
    _v(V.GETINTERNALADAPTERINFO, m.Empty, m.GetInternalAdapterInfoReturn, fail_status,
       Route.VGPU_ONLY, per_process=False),
    _v(V.QUERYADAPTERINFO, m.QueryAdapterInfo, m.StatusAndData, _fail_query_adapter_info,
       note="the host process is optional (0 allowed)"),
    _v(V.CREATEDEVICE, m.CreateDevice, m.HandleReturn, _fail_handle,
       note="handle u32, status u32 (pydxg: why, when the handle is 0)"),
    _v(V.DESTROYDEVICE, m.DestroyDevice, m.NtStatusReturn, fail_status),
    _v(V.FLUSHDEVICE, m.FlushDevice, m.NtStatusReturn, fail_status),
    _v(V.CREATECONTEXTVIRTUAL, m.CreateContextVirtual, m.CreateContextVirtual,
       _fail_create_context, note="echoed with the context handle (0 = failure)"),
    _v(V.DESTROYCONTEXT, m.DestroyContext, m.NtStatusReturn, fail_status),
    _v(V.GETDEVICESTATE, m.GetDeviceState, m.GetDeviceStateReturn, _fail_device_state),
    _v(V.ISFEATUREENABLED, m.IsFeatureEnabled, m.IsFeatureEnabledReturn, _fail_feature,
       per_process=False),
    _v(V.QUERYCLOCKCALIBRATION, m.QueryClockCalibration, m.QueryClockCalibrationReturn,
       _fail_clock),
    _v(V.ESCAPE, m.Escape, m.Escape, fail_status, large=True, fds=True,
       note="adapter, device, type, flags, priv size, context u32, attachment size u64, "
            "priv data, attachment; echoed with the priv data overwritten (the attachment: a "
            "region copied where no descriptor can go)"),
)

_MEMORY_NOTE = "IoctlArgs: the ioctl struct (host handles, no pointers) + its arrays"


def _mem(command: VgpuCommand, note: str = _MEMORY_NOTE, **kw: Any) -> CommandSpec:
    """A memory command in the IoctlArgs layout (dxg.protocol.messages.IoctlArgs)."""
    return CommandSpec(command, m.IoctlArgs, m.IoctlArgsReturn, _fail_ioctl_args, Route.VGPU,
                       note=note, **kw)


_SPECS += (
    _v(V.CREATEALLOCATION, m.CreateAllocation, m.CreateAllocationReturn,
       _fail_create_allocation, note="allocations and where their memory is (block, offset)"),
    _v(V.DESTROYALLOCATION, m.DestroyAllocation, m.NtStatusReturn, fail_status),
    _v(V.LOCK2, m.Lock2, m.Lock2Return, _fail_lock2, large=True, fds=True,
       note="the block's descriptor (LOCK2_FD) or the bytes (LOCK2_COPY)"),
    _v(V.UNLOCK2, m.Unlock2, m.NtStatusReturn, fail_status, large=True,
       note="write-back of a copy (links without descriptors)"),
    _mem(V.RESERVEGPUVIRTUALADDRESS),
    _mem(V.MAPGPUVIRTUALADDRESS),
    _mem(V.FREEGPUVIRTUALADDRESS),
    _mem(V.UPDATEGPUVIRTUALADDRESS),
    _mem(V.CREATEPAGINGQUEUE, fds=True,
         note="IoctlArgs; the reply's extra is the fence's BlockRef, its descriptor beside it"),
    _mem(V.DESTROYPAGINGQUEUE),
    _mem(V.MAKERESIDENT),
    _mem(V.EVICT),
    _mem(V.QUERYALLOCATIONRESIDENCY),
    _mem(V.SETALLOCATIONPRIORITY),
    _mem(V.GETALLOCATIONPRIORITY),
    _mem(V.OFFERALLOCATIONS),
    _mem(V.RECLAIMALLOCATIONS),
    _mem(V.UPDATEALLOCATIONPROPERTY),
    _mem(V.FLUSHHEAPTRANSITIONS),
    _mem(V.QUERYVIDEOMEMORYINFO),
    _mem(V.CHANGEVIDEOMEMORYRESERVATION),
    _v(V.PYDXG_CLOSEPROCESSADAPTER, m.Empty, m.NtStatusReturn, fail_status,
       note="pydxg extension: the process's last handle of the adapter closed"),
)

# ---- queues and execution
_SPECS += (
    _mem(V.CREATEHWQUEUE, fds=True,
         note="IoctlArgs (extra: private data); the reply's extra is the progress fence's "
              "BlockRef, its descriptor beside it"),
    _mem(V.DESTROYHWQUEUE),
    _mem(V.SUBMITCOMMANDTOHWQUEUE, asynchronous=True,
         note="IoctlArgs; fire-and-forget: errors surface through the device's state"),
    _mem(V.SUBMITCOMMAND, asynchronous=True,
         note="IoctlArgs (broadcast contexts as host handles; no history, private data or "
              "primaries); fire-and-forget"),
    _mem(V.SETCONTEXTSCHEDULINGPRIORITY,
         note="IoctlArgs of d3dkmt_setcontextschedulingpriority; extra: 1 byte, 1 = in-process"),
    _mem(V.GETCONTEXTSCHEDULINGPRIORITY,
         note="IoctlArgs of d3dkmt_setcontextschedulingpriority; extra: 1 byte, 1 = in-process"),
    _mem(V.MARKDEVICEASERROR),
)

# ---- statistics
_SPECS += (
    _mem(V.QUERYSTATISTICS,
         note="IoctlArgs of d3dkmt_querystatistics (host adapter LUID, host process handle or "
              "0); the reply's result is pydxg's statistics record (docs/statistics.md)"),
    _mem(V.INVALIDATECACHE,
         note="IoctlArgs of d3dkmt_invalidatecache (host handles); checked, then nothing to do "
              "(the soft adapters' memory is coherent)"),
)

# ---- synchronization objects


def _fail_create_sync(status: int, body: bytes) -> bytes:
    return m.CreateSyncObjectReturn(int(status) & 0xFFFFFFFF).pack()


_SPECS += (
    _v(V.CREATESYNCOBJECT, m.CreateSyncObject, m.CreateSyncObjectReturn, _fail_create_sync,
       fds=True, note="device, mirror event, the d3dddi_synchronizationobjectinfo2; the reply: "
                      "handle, GPU VA, the fence's BlockRef (its descriptor beside it)"),
    _g(G.DESTROYSYNCOBJECT, m.DestroySyncObject, m.NtStatusReturn, fail_status,
       note="global, as in the real driver"),
    _v(V.SIGNALSYNCOBJECT, m.SignalSyncObject, m.NtStatusReturn, fail_status,
       asynchronous=True, note="device (CPU signal) or contexts (GPU), objects, values; pydxg "
                               "sends the CPU signal with a completion"),
    _v(V.WAITFORSYNCOBJECTFROMCPU, m.WaitSyncObjectCpu, m.NtStatusReturn, fail_status,
       note="acked at once; SIGNALGUESTEVENT(guest_event, status) ends the wait; 0 objects: "
            "withdraw it"),
    _v(V.WAITFORSYNCOBJECTFROMGPU, m.WaitSyncObjectGpu, m.NtStatusReturn, fail_status,
       asynchronous=True, note="context, legacy flag, values, objects"),
)

# ---- sharing by descriptor (docs/sharing.md)


def _fail_nt_shared(status: int, body: bytes) -> bytes:
    return m.CreateNtSharedObjectReturn(int(status) & 0xFFFFFFFF).pack()


def _fail_open_resource(status: int, body: bytes) -> bytes:
    return m.OpenResourceReturn(int(status) & 0xFFFFFFFF).pack()


_SPECS += (
    _g(G.CREATENTSHAREDOBJECT, m.CreateNtSharedObject, m.CreateNtSharedObjectReturn,
       _fail_nt_shared, note="a shared resource or sync object of the caller (a host handle); "
                             "the reply: the NT handle, its kind and a resource's sizes; one "
                             "reference per share descriptor"),
    _g(G.DESTROYNTSHAREDOBJECT, m.DestroyNtSharedObject, m.NtStatusReturn, fail_status,
       per_process=False, note="the NT handle: one reference fewer (the last share descriptor "
                               "of a group closed)"),
    _v(V.OPENRESOURCE, m.OpenResource, m.OpenResourceReturn, _fail_open_resource,
       note="device, NT handle, read-only flag, allocation count; the reply: the opener's "
            "resource and allocations (where their memory is), the private data"),
    _g(G.OPENSYNCOBJECT, m.OpenSyncObject, m.CreateSyncObjectReturn, _fail_create_sync,
       fds=True, note="device, NT handle, read-only flag, mirror event; the reply as "
                      "CREATESYNCOBJECT's (the shared fence's block descriptor beside it)"),
    _g(G.PYDXG_WAITSHAREDSYNC, m.WaitSharedSync, m.NtStatusReturn, fail_status,
       per_process=False, note="pydxg extension: NT handle, flags (1 withdraw), guest event, "
                               "value: a sync file's CPU wait, held by its NT reference"),
)

COMMANDS: MappingProxyType[Command, CommandSpec] = MappingProxyType(
    {spec.command: spec for spec in _SPECS})


def spec_of(command: int) -> CommandSpec | None:
    """The spec of a command code (a GlobalCommand or VgpuCommand member, or its int)."""
    return COMMANDS.get(command)  # type: ignore[call-overload]


def render_command_table() -> str:
    """The Markdown command table of docs/protocol.md (between its `command-table` markers)."""
    lines = [
        "| code | command | route | process | request body | reply | async | large | fds | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for spec in sorted(COMMANDS.values(), key=lambda s: (s.route == Route.GLOBAL, int(s.command))):
        reply = spec.reply.__name__ if spec.reply is not None else "(empty completion)"
        lines.append(
            f"| {int(spec.command)} | {spec.name} | {spec.route.value} | "
            f"{'yes' if spec.per_process else '0'} | {spec.request.__name__} | {reply} | "
            f"{'yes' if spec.asynchronous else 'no'} | {'yes' if spec.large else 'no'} | "
            f"{'yes' if spec.fds else 'no'} | {spec.note} |")
    return "\n".join(lines) + "\n"


__all__ = ["COMMANDS", "Command", "CommandSpec", "Route", "fail_empty", "fail_status",
           "render_command_table", "spec_of"]
