"""A partition: the host's state for one guest (one bus session), like the VM object of the real
host. It implements `HostBusHandler`: channel opens bind channels to their adapter, and every
request on them goes through one dispatcher with a table per command kind.

Rules every handler follows:
- Bytes from the guest are hostile. A body that does not parse is answered with a 4-byte
  STATUS_INVALID_PARAMETER; an unknown command code likewise; a known command this host does not
  implement yet with a 4-byte STATUS_NOT_IMPLEMENTED. Fire-and-forget packets (no completion
  requested) that are unknown or unimplemented are dropped with a log line. No exception leaves
  the dispatcher.
- Failures otherwise use the command's own reply layout (a status field, a zero handle, ...), so
  the guest always reads a reply of the size it expects.
- Per-process commands take the header's `process` as a host process handle of THIS partition,
  and every device/context handle must belong to that process and to the addressed adapter.
- Commands for a removed adapter answer STATUS_DEVICE_REMOVED, except the teardown commands
  (DESTROYDEVICE, DESTROYCONTEXT, CLOSEADAPTER), which still release the host objects.

Locking: requests of one session arrive in order on its reader thread; `census()`,
`set_device_execution_state()` and adapter removal come from other threads. One lock per
partition guards its tables; notifications are sent after it is released, and never wait more
than NOTIFY_LOCK_TIMEOUT behind another sender to the same guest.

Memory: a guest pins host memory only through the objects it creates. Each is charged its
estimated footprint (OBJECT_BYTES) against HostConfig.max_partition_bytes, besides the handle
cap; no bytes of guest payloads are kept (a context keeps the size of its private data only).
"""

import dataclasses
import errno
import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from dxg.host.adapter import AdapterOpen, HostAdapter
from dxg.host.config import HostConfig
from dxg.host.context import HostContext
from dxg.host.device import EXECUTION_STATES, HostDevice
from dxg.host.handles import HandleTable, HandleTableFull, HandleType
from dxg.host.process import HostProcess
from dxg.protocol.bus import (
    DXGK_VMBUS_INTERFACE_VERSION,
    DXGK_VMBUS_LAST_COMPATIBLE_INTERFACE_VERSION,
    OpenChannel,
)
from dxg.protocol.commands import GlobalCommand, HostToVmCommand, VgpuCommand
from dxg.protocol.errors import ProtocolError
from dxg.protocol.framing import DXG_MAX_VM_BUS_PACKET_SIZE, VM_PKT_DATA_INBAND
from dxg.protocol.guids import DXGK_GLOBAL_GUID, DXGK_VGPU_GUID, luid_to_int
from dxg.protocol.headers import GuestMessage, decode_guest, encode_host_to_vm
from dxg.protocol.messages import (
    GPUCLOCKDATA_SIZE,
    SETGUESTDATA_DATATYPE_DWORD,
    CloseAdapter,
    CreateContextVirtual,
    CreateDevice,
    CreateProcess,
    CreateProcessReturn,
    DestroyContext,
    DestroyDevice,
    FlushDevice,
    GetDeviceState,
    GetDeviceStateReturn,
    HandleReturn,
    IsFeatureEnabled,
    IsFeatureEnabledReturn,
    NtStatusReturn,
    OpenAdapter,
    OpenAdapterReturn,
    QueryAdapterInfo,
    QueryClockCalibration,
    QueryClockCalibrationReturn,
    SetGuestData,
    SetIoSpaceRegion,
    SignalGuestEvent,
    StatusAndData,
)
from dxg.uapi.ntstatus import NTSTATUS
from dxg.uapi.structs import (
    d3dkmt_devicestate_type,
    d3dkmt_getdevicestate,
    d3dkmt_queryclockcalibration,
    dxgk_feature_id,
    dxgk_gpuclockdata,
)
from dxg.vmbus.channel import Channel, ChannelClosed

if TYPE_CHECKING:
    from dxg.vmbus.bus import HostBusSession

log = logging.getLogger(__name__)

OK = NTSTATUS.STATUS_SUCCESS
# Private driver data of one context, as the real driver caps it (and the wire allows).
MAX_CONTEXT_PRIVATE_DATA = 128 * 1024
# The soft adapter's GPU timestamp frequency: its clock counts nanoseconds.
GPU_CLOCK_FREQUENCY = 1_000_000_000
# What one host object pins, in bytes, against HostConfig.max_partition_bytes: its measured
# footprint (the object, its handle-table entry, its slot in its owner's table) rounded up; a
# process includes the longest name a guest can give it.
OBJECT_BYTES: Mapping[HandleType, int] = MappingProxyType({
    HandleType.ADAPTER: 512,
    HandleType.PROCESS: 2048,
    HandleType.DEVICE: 512,
    HandleType.CONTEXT: 512,
})
# The longest a host -> guest notification waits behind another sender to the same guest (a
# reply stuck on a guest that does not read) before it gives up.
NOTIFY_LOCK_TIMEOUT = 5.0

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
_KNOWN_FEATURES = frozenset(
    int(f)
    for f in (
        dxgk_feature_id._DXGK_FEATURE_HWSCH,
        dxgk_feature_id._DXGK_FEATURE_PAGE_BASED_MEMORY_MANAGER,
        dxgk_feature_id._DXGK_FEATURE_KERNEL_MODE_TESTING,
    )
)
_FEATURE_RESULT_KNOWN = 1 << 1  # dxgk_isfeatureenabled_result: enabled:1 known_feature:1 ...

# Teardown commands still run on a removed adapter, so a guest can always release what it holds.
_TEARDOWN = frozenset({VgpuCommand.DESTROYDEVICE, VgpuCommand.DESTROYCONTEXT,
                       VgpuCommand.CLOSEADAPTER})

Handler = Callable[[GuestMessage, HostAdapter | None], bytes]
FailReply = Callable[[int, GuestMessage], bytes]


class CommandFailed(Exception):
    """Raised by a handler: answer with the command's failure reply carrying `status`."""

    def __init__(self, status: int, why: str = "") -> None:
        super().__init__(why or f"status 0x{status:08X}")
        self.status = int(status)


def status_only(status: int) -> bytes:
    """The bare 4-byte NTSTATUS reply."""
    return NtStatusReturn(int(status) & 0xFFFFFFFF).pack()


def _empty(body: bytes, what: str) -> None:
    if body:
        raise ProtocolError(f"{what}: {len(body)} unexpected body bytes")


# ---- failure replies, one per reply layout ---------------------------------------------------


def _fail_status(status: int, msg: GuestMessage) -> bytes:
    return status_only(status)


def _fail_nothing(status: int, msg: GuestMessage) -> bytes:
    return b""


def _fail_create_process(status: int, msg: GuestMessage) -> bytes:
    return CreateProcessReturn(0).pack()


def _fail_handle(status: int, msg: GuestMessage) -> bytes:
    return HandleReturn(0).pack()


def _fail_open_adapter(status: int, msg: GuestMessage) -> bytes:
    return OpenAdapterReturn(0, status, DXGK_VMBUS_INTERFACE_VERSION,
                             DXGK_VMBUS_LAST_COMPATIBLE_INTERFACE_VERSION).pack()


def _fail_query_adapter_info(status: int, msg: GuestMessage) -> bytes:
    try:
        data = QueryAdapterInfo.unpack(msg.body).private_data
    except ProtocolError:
        return status_only(status)
    return StatusAndData(status, data).pack()


def _fail_create_context(status: int, msg: GuestMessage) -> bytes:
    try:
        body = CreateContextVirtual.unpack(msg.body)
    except ProtocolError:
        return status_only(status)
    return dataclasses.replace(body, context=0).pack()


def _fail_device_state(status: int, msg: GuestMessage) -> bytes:
    try:
        args = GetDeviceState.unpack(msg.body).args
    except ProtocolError:
        return status_only(status)
    return GetDeviceStateReturn(args, status).pack()


def _fail_feature(status: int, msg: GuestMessage) -> bytes:
    return IsFeatureEnabledReturn(status, 0, 0, 0, 0, 0).pack()


def _fail_clock(status: int, msg: GuestMessage) -> bytes:
    return QueryClockCalibrationReturn(status, bytes(GPUCLOCKDATA_SIZE)).pack()


class Partition:
    """One guest's objects on this host, and the dispatcher for its channels."""

    def __init__(
        self,
        partition_id: int,
        adapters: Sequence[HostAdapter],
        config: HostConfig,
        peer: str = "",
        on_closed: Callable[["Partition"], None] | None = None,
    ) -> None:
        self.id = partition_id
        self.peer = peer
        self.config = config
        self.session: HostBusSession | None = None
        self.closed = threading.Event()
        self._adapters = list(adapters)
        self._by_vgpu_luid = {a.host_vgpu_luid: a for a in self._adapters}
        self._on_closed = on_closed
        self._lock = threading.RLock()
        self._handles = HandleTable(capacity=config.max_handles_per_partition)
        self._pinned = 0  # bytes charged for live objects (OBJECT_BYTES each)
        self._processes: dict[int, HostProcess] = {}
        self._opens: dict[int, AdapterOpen] = {}  # adapter index -> this partition's open
        self._io_space: SetIoSpaceRegion | None = None
        self._global_channel: Channel | None = None
        self._vgpu_channels: dict[int, Channel] = {}  # adapter index -> channel
        self._requests = 0
        self._global_handlers: dict[GlobalCommand, tuple[Handler, FailReply]] = {
            GlobalCommand.CREATEPROCESS: (self._create_process, _fail_create_process),
            GlobalCommand.DESTROYPROCESS: (self._destroy_process, _fail_status),
            GlobalCommand.SETIOSPACEREGION: (self._set_io_space_region, _fail_status),
            GlobalCommand.PYDXG_QUERYPARTITION: (self._query_partition, _fail_status),
        }
        self._vgpu_handlers: dict[VgpuCommand, tuple[Handler, FailReply]] = {
            VgpuCommand.OPENADAPTER: (self._open_adapter, _fail_open_adapter),
            VgpuCommand.CLOSEADAPTER: (self._close_adapter, _fail_nothing),
            VgpuCommand.GETINTERNALADAPTERINFO: (self._get_internal_adapter_info, _fail_status),
            VgpuCommand.QUERYADAPTERINFO: (self._query_adapter_info, _fail_query_adapter_info),
            VgpuCommand.CREATEDEVICE: (self._create_device, _fail_handle),
            VgpuCommand.DESTROYDEVICE: (self._destroy_device, _fail_status),
            VgpuCommand.FLUSHDEVICE: (self._flush_device, _fail_status),
            VgpuCommand.CREATECONTEXTVIRTUAL: (self._create_context_virtual, _fail_create_context),
            VgpuCommand.DESTROYCONTEXT: (self._destroy_context, _fail_status),
            VgpuCommand.GETDEVICESTATE: (self._get_device_state, _fail_device_state),
            VgpuCommand.ISFEATUREENABLED: (self._is_feature_enabled, _fail_feature),
            VgpuCommand.QUERYCLOCKCALIBRATION: (self._query_clock_calibration, _fail_clock),
        }

    def __repr__(self) -> str:
        return f"<Partition {self.id} peer={self.peer!r}>"

    # ---- HostBusHandler ------------------------------------------------------------------------

    def channel_opened(self, session: "HostBusSession", channel: Channel, msg: OpenChannel) -> int:
        if self.closed.is_set():
            return -errno.ENODEV
        if channel.type_guid == DXGK_GLOBAL_GUID:
            with self._lock:
                if self._global_channel is not None and not self._global_channel.closed:
                    return -errno.EBUSY
                self._global_channel = channel
            channel.on_request = functools.partial(self._on_request, None)
            log.info("partition %d: global channel %d open", self.id, channel.relid)
            return 0
        if channel.type_guid == DXGK_VGPU_GUID:
            adapter = self._adapter_for_channel(channel)
            if adapter is None:
                return -errno.ENODEV
            if msg.interface_version != DXGK_VMBUS_INTERFACE_VERSION:
                log.warning("partition %d: vGPU %d opened with interface version %d, need %d",
                            self.id, adapter.index, msg.interface_version,
                            DXGK_VMBUS_INTERFACE_VERSION)
                return -errno.EPROTONOSUPPORT
            if adapter.removed:
                return -errno.ENODEV
            with self._lock:
                self._vgpu_channels[adapter.index] = channel
            channel.on_request = functools.partial(self._on_request, adapter)
            log.info("partition %d: vGPU %d channel %d open (guest caps 0x%x)", self.id,
                     adapter.index, channel.relid, msg.guest_caps)
            return 0
        return -errno.ENODEV

    def channel_closed(self, session: "HostBusSession", channel: Channel) -> None:
        with self._lock:
            if self._global_channel is channel:
                self._global_channel = None
            for index, ch in list(self._vgpu_channels.items()):
                if ch is channel:
                    del self._vgpu_channels[index]

    def session_closed(self, session: "HostBusSession") -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """The guest is gone: drop every object of every process, every open and channel."""
        with self._lock:
            if self.closed.is_set():
                return
            self.closed.set()
            for process in list(self._processes.values()):
                self._drop_process(process)
            for index in list(self._opens):
                self._drop_open(index)
            self._global_channel = None
            self._vgpu_channels.clear()
        log.info("partition %d (%s): closed", self.id, self.peer)
        if self._on_closed is not None:
            self._on_closed(self)

    def _adapter_for_channel(self, channel: Channel) -> HostAdapter | None:
        for adapter in self._adapters:
            if adapter.instance_guid == channel.instance_guid:
                return adapter
        return None

    # ---- dispatcher ----------------------------------------------------------------------------

    def _on_request(
        self, bound: HostAdapter | None, channel: Channel, payload: bytes, wants_completion: bool
    ) -> bytes | None:
        try:
            reply = self._dispatch(bound, payload, wants_completion)
        except Exception:  # never let a bug take the session down
            log.exception("partition %d: dispatcher failed", self.id)
            reply = status_only(NTSTATUS.STATUS_INTERNAL_ERROR)
        if not wants_completion:
            return None
        if reply is not None and len(reply) > DXG_MAX_VM_BUS_PACKET_SIZE:
            log.error("partition %d: reply of %d bytes over the packet cap", self.id, len(reply))
            reply = status_only(NTSTATUS.STATUS_BUFFER_OVERFLOW)
        return reply

    def _dispatch(
        self, bound: HostAdapter | None, payload: bytes, wants_completion: bool
    ) -> bytes | None:
        self._requests += 1
        try:
            msg = decode_guest(payload)
        except ProtocolError as e:
            log.warning("partition %d: bad message (%s)", self.id, e)
            return status_only(NTSTATUS.STATUS_INVALID_PARAMETER) if wants_completion else None

        adapter: HostAdapter | None = None
        if msg.is_global:
            if bound is not None:
                log.warning("partition %d: global command %s on a vGPU channel", self.id,
                            msg.command.name)
                return status_only(NTSTATUS.STATUS_INVALID_PARAMETER) if wants_completion else None
            entry = self._global_handlers.get(msg.command)  # type: ignore[call-overload]
        else:
            entry = self._vgpu_handlers.get(msg.command)  # type: ignore[call-overload]
        if entry is None:
            if not wants_completion:
                log.info("partition %d: fire-and-forget %s not implemented, dropped", self.id,
                         msg.command.name)
                return None
            log.info("partition %d: %s not implemented", self.id, msg.command.name)
            return status_only(NTSTATUS.STATUS_NOT_IMPLEMENTED)

        handler, fail = entry
        try:
            if not msg.is_global:
                adapter = self._route(bound, msg)
                if adapter.removed and msg.command not in _TEARDOWN:
                    raise CommandFailed(NTSTATUS.STATUS_DEVICE_REMOVED, "adapter removed")
            with self._lock:
                if self.closed.is_set():
                    raise CommandFailed(NTSTATUS.STATUS_DEVICE_REMOVED, "partition closed")
                return handler(msg, adapter)
        except CommandFailed as f:
            log.debug("partition %d: %s failed: %s", self.id, msg.command.name, f)
            return fail(f.status, msg)
        except ProtocolError as e:
            log.warning("partition %d: %s: malformed body (%s)", self.id, msg.command.name, e)
            return status_only(NTSTATUS.STATUS_INVALID_PARAMETER)

    def _route(self, bound: HostAdapter | None, msg: GuestMessage) -> HostAdapter:
        """The adapter a per-adapter command addresses: the vGPU channel's own adapter, or on the
        global channel the one whose host vGPU LUID is in the extension header."""
        if bound is not None:
            if msg.vgpu_luid not in (0, bound.host_vgpu_luid):
                raise CommandFailed(NTSTATUS.STATUS_INVALID_PARAMETER, "vGPU LUID mismatch")
            return bound
        adapter = self._by_vgpu_luid.get(msg.vgpu_luid)
        if adapter is None:
            raise CommandFailed(NTSTATUS.STATUS_INVALID_PARAMETER,
                                f"no adapter with vGPU LUID 0x{msg.vgpu_luid:x}")
        return adapter

    # ---- lookups (called with the lock held) ---------------------------------------------------

    def _process(self, msg: GuestMessage) -> HostProcess:
        process = self._handles.get(msg.process, HandleType.PROCESS)
        if process is None:
            raise CommandFailed(NTSTATUS.STATUS_INVALID_HANDLE,
                                f"process 0x{msg.process:08x} is not live here")
        return process  # type: ignore[no-any-return]

    def _optional_process(self, msg: GuestMessage) -> HostProcess | None:
        """Adapter-level commands: `process` is 0, or else a live process of this partition."""
        return None if msg.process == 0 else self._process(msg)

    def _device(self, process: HostProcess, handle: int, adapter: HostAdapter) -> HostDevice:
        device = self._handles.get(handle, HandleType.DEVICE)
        if device is None or device.process is not process or device.adapter is not adapter:
            raise CommandFailed(NTSTATUS.STATUS_INVALID_HANDLE,
                                f"device 0x{handle:08x} is not this process's on this adapter")
        return device  # type: ignore[no-any-return]

    def _open_of(self, adapter: HostAdapter) -> AdapterOpen:
        opened = self._opens.get(adapter.index)
        if opened is None:
            raise CommandFailed(NTSTATUS.STATUS_INVALID_HANDLE, "adapter not opened")
        return opened

    def _alloc(self, htype: HandleType, obj: Any) -> int:
        cost = OBJECT_BYTES[htype]
        if self._pinned + cost > self.config.max_partition_bytes:
            raise CommandFailed(NTSTATUS.STATUS_NO_MEMORY,
                                f"{self._pinned} bytes pinned, budget "
                                f"{self.config.max_partition_bytes}")
        try:
            handle = self._handles.alloc(htype, obj)
        except HandleTableFull as e:
            raise CommandFailed(NTSTATUS.STATUS_NO_MEMORY, str(e)) from None
        self._pinned += cost
        return handle

    def _free(self, handle: int, htype: HandleType) -> None:
        if self._handles.free(handle, htype) is not None:
            self._pinned -= OBJECT_BYTES[htype]

    # ---- teardown (lock held) ------------------------------------------------------------------

    def _drop_context(self, context: HostContext) -> None:
        context.device.contexts.pop(context.handle, None)
        self._free(context.handle, HandleType.CONTEXT)

    def _drop_device(self, device: HostDevice) -> None:
        for context in list(device.contexts.values()):
            self._drop_context(context)
        device.process.devices.pop(device.handle, None)
        self._free(device.handle, HandleType.DEVICE)

    def _drop_process(self, process: HostProcess) -> None:
        for device in list(process.devices.values()):
            self._drop_device(device)
        self._processes.pop(process.handle, None)
        self._free(process.handle, HandleType.PROCESS)

    def _drop_open(self, adapter_index: int) -> None:
        opened = self._opens.pop(adapter_index, None)
        if opened is None:
            return
        for process in self._processes.values():
            for device in list(process.devices.values()):
                if device.adapter is opened.adapter:
                    self._drop_device(device)
        self._free(opened.handle, HandleType.ADAPTER)

    # ---- global commands -----------------------------------------------------------------------

    def _create_process(self, msg: GuestMessage, _: HostAdapter | None) -> bytes:
        body = CreateProcess.unpack(msg.body)
        process = HostProcess(0, body.process_id, body.process_name, body.process_cookie,
                              body.linux_process)
        process.handle = self._alloc(HandleType.PROCESS, process)
        self._processes[process.handle] = process
        log.info("partition %d: process %d %r -> 0x%08x", self.id, process.pid, process.name,
                 process.handle)
        return CreateProcessReturn(process.handle).pack()

    def _destroy_process(self, msg: GuestMessage, _: HostAdapter | None) -> bytes:
        _empty(msg.body, "DestroyProcess")
        process = self._process(msg)
        self._drop_process(process)
        log.info("partition %d: process 0x%08x destroyed", self.id, process.handle)
        return status_only(OK)

    def _set_io_space_region(self, msg: GuestMessage, _: HostAdapter | None) -> bytes:
        region = SetIoSpaceRegion.unpack(msg.body)
        if region.start + region.length > 1 << 64:
            raise CommandFailed(NTSTATUS.STATUS_INVALID_PARAMETER, "IO space wraps")
        self._io_space = region
        return status_only(OK)

    def _query_partition(self, msg: GuestMessage, _: HostAdapter | None) -> bytes:
        _empty(msg.body, "QueryPartition")
        census = self._census_locked()
        text = json.dumps(census, separators=(",", ":")).encode()
        if len(text) > DXG_MAX_VM_BUS_PACKET_SIZE:
            census["processes"] = []
            census["truncated"] = True
            text = json.dumps(census, separators=(",", ":")).encode()
        return text

    # ---- per-adapter commands ------------------------------------------------------------------

    def _open_adapter(self, msg: GuestMessage, adapter: HostAdapter | None) -> bytes:
        assert adapter is not None
        body = OpenAdapter.unpack(msg.body)
        if body.vmbus_interface_version < DXGK_VMBUS_LAST_COMPATIBLE_INTERFACE_VERSION:
            raise CommandFailed(NTSTATUS.STATUS_NOT_SUPPORTED,
                                f"interface version {body.vmbus_interface_version}")
        guest_luid = luid_to_int(body.guest_luid_low, body.guest_luid_high)
        if guest_luid not in (0, adapter.guest_luid):
            raise CommandFailed(NTSTATUS.STATUS_INVALID_PARAMETER, "guest LUID mismatch")
        opened = self._opens.get(adapter.index)
        if opened is None:
            opened = AdapterOpen(0, adapter)
            opened.handle = self._alloc(HandleType.ADAPTER, opened)
            self._opens[adapter.index] = opened
        opened.opens += 1
        return OpenAdapterReturn(opened.handle, OK, DXGK_VMBUS_INTERFACE_VERSION,
                                 DXGK_VMBUS_LAST_COMPATIBLE_INTERFACE_VERSION).pack()

    def _close_adapter(self, msg: GuestMessage, adapter: HostAdapter | None) -> bytes:
        assert adapter is not None
        body = CloseAdapter.unpack(msg.body)
        opened = self._opens.get(adapter.index)
        if opened is None or opened.handle != body.host_handle:
            log.warning("partition %d: CLOSEADAPTER of unknown handle 0x%08x", self.id,
                        body.host_handle)
            return b""
        opened.opens -= 1
        if opened.opens <= 0:
            self._drop_open(adapter.index)
        return b""

    def _get_internal_adapter_info(self, msg: GuestMessage, adapter: HostAdapter | None) -> bytes:
        assert adapter is not None
        _empty(msg.body, "GetInternalAdapterInfo")
        return adapter.internal_info(self.config.async_msg_enabled).pack()

    def _query_adapter_info(self, msg: GuestMessage, adapter: HostAdapter | None) -> bytes:
        assert adapter is not None
        body = QueryAdapterInfo.unpack(msg.body)
        self._optional_process(msg)
        status, data = adapter.query_info(body.query_type, body.private_data)
        return StatusAndData(status, data).pack()

    def _create_device(self, msg: GuestMessage, adapter: HostAdapter | None) -> bytes:
        assert adapter is not None
        body = CreateDevice.unpack(msg.body)
        process = self._process(msg)
        self._open_of(adapter)
        device = HostDevice(0, process, adapter, body.flags, body.error_code)
        device.handle = self._alloc(HandleType.DEVICE, device)
        process.devices[device.handle] = device
        return HandleReturn(device.handle).pack()

    def _destroy_device(self, msg: GuestMessage, adapter: HostAdapter | None) -> bytes:
        assert adapter is not None
        body = DestroyDevice.unpack(msg.body)
        device = self._device(self._process(msg), body.device, adapter)
        self._drop_device(device)
        return status_only(OK)

    def _flush_device(self, msg: GuestMessage, adapter: HostAdapter | None) -> bytes:
        assert adapter is not None
        body = FlushDevice.unpack(msg.body)
        device = self._device(self._process(msg), body.device, adapter)
        device.flushes += 1  # nothing queued yet: no engine runs work on this host so far
        return status_only(OK)

    def _create_context_virtual(self, msg: GuestMessage, adapter: HostAdapter | None) -> bytes:
        assert adapter is not None
        body = CreateContextVirtual.unpack(msg.body)
        device = self._device(self._process(msg), body.device, adapter)
        if body.node_ordinal >= adapter.node_count:
            raise CommandFailed(NTSTATUS.STATUS_INVALID_PARAMETER,
                                f"node {body.node_ordinal} of {adapter.node_count}")
        if len(body.priv_drv_data) > MAX_CONTEXT_PRIVATE_DATA:
            raise CommandFailed(NTSTATUS.STATUS_INVALID_PARAMETER, "private data too large")
        context = HostContext(0, device, body.node_ordinal, body.engine_affinity, body.flags,
                              body.client_hint, len(body.priv_drv_data))
        context.handle = self._alloc(HandleType.CONTEXT, context)
        device.contexts[context.handle] = context
        return dataclasses.replace(body, context=context.handle).pack()

    def _destroy_context(self, msg: GuestMessage, adapter: HostAdapter | None) -> bytes:
        assert adapter is not None
        body = DestroyContext.unpack(msg.body)
        process = self._process(msg)
        context = self._handles.get(body.context, HandleType.CONTEXT)
        if (context is None or context.device.process is not process
                or context.device.adapter is not adapter):
            raise CommandFailed(NTSTATUS.STATUS_INVALID_HANDLE,
                                f"context 0x{body.context:08x} is not this process's")
        self._drop_context(context)
        return status_only(OK)

    def _get_device_state(self, msg: GuestMessage, adapter: HostAdapter | None) -> bytes:
        assert adapter is not None
        body = GetDeviceState.unpack(msg.body)
        args = d3dkmt_getdevicestate.from_buffer_copy(body.args)
        device = self._device(self._process(msg), args.device.v, adapter)
        state_type = args.state_type
        if state_type == _STATE_EXECUTION:
            args.execution_state = device.execution_state
            status = OK
        elif state_type in (_STATE_RESET, _STATE_PAGE_FAULT):
            # No reset has happened and no page fault is recorded: the union reads as zeros.
            args = d3dkmt_getdevicestate.from_buffer_copy(body.args[:8] + bytes(len(body.args) - 8))
            status = OK
        elif state_type in _STATE_PRESENT_KINDS:
            status = NTSTATUS.STATUS_NOT_SUPPORTED  # compute-only adapters present nothing
        else:
            status = NTSTATUS.STATUS_INVALID_PARAMETER
        return GetDeviceStateReturn(bytes(args), status).pack()

    def _is_feature_enabled(self, msg: GuestMessage, adapter: HostAdapter | None) -> bytes:
        body = IsFeatureEnabled.unpack(msg.body)
        self._optional_process(msg)
        # Known features are reported as known, not supported and not enabled; unknown ids are
        # answered with known_feature = 0.
        bits = _FEATURE_RESULT_KNOWN if body.feature_id in _KNOWN_FEATURES else 0
        return IsFeatureEnabledReturn(OK, 0, 0, 0, 0, bits).pack()

    def _query_clock_calibration(self, msg: GuestMessage, adapter: HostAdapter | None) -> bytes:
        assert adapter is not None
        body = QueryClockCalibration.unpack(msg.body)
        self._process(msg)
        args = d3dkmt_queryclockcalibration.from_buffer_copy(body.args)
        if args.adapter.v != self._open_of(adapter).handle:
            raise CommandFailed(NTSTATUS.STATUS_INVALID_HANDLE, "not this adapter's host handle")
        if args.node_ordinal >= adapter.node_count or args.physical_adapter_index != 0:
            raise CommandFailed(NTSTATUS.STATUS_INVALID_PARAMETER, "no such node/physical adapter")
        clock = dxgk_gpuclockdata()
        clock.gpu_frequency = GPU_CLOCK_FREQUENCY
        # The soft GPU's timestamp counter is CLOCK_MONOTONIC in ns, and CLOCK_MONOTONIC is also
        # the CPU clock a Linux guest reads (clock_gettime), so the pair is taken back to back.
        clock.gpu_clock_counter = time.monotonic_ns()
        clock.cpu_clock_counter = time.monotonic_ns()
        return QueryClockCalibrationReturn(OK, bytes(clock)).pack()

    # ---- host -> guest -------------------------------------------------------------------------

    def notify(self, command: HostToVmCommand, body: bytes = b"", process: int = 0) -> bool:
        """Send a host -> guest message on the global channel; False when it cannot be sent."""
        with self._lock:
            channel = self._global_channel
        if channel is None or channel.closed:
            log.info("partition %d: no global channel for %s", self.id, command.name)
            return False
        try:
            # Not channel.notify(): that would wait for as long as a reply to a guest that does
            # not read holds the connection; a notification gives up after NOTIFY_LOCK_TIMEOUT.
            channel.connection.send_frame(channel.relid, VM_PKT_DATA_INBAND,
                                          encode_host_to_vm(command, process, body),
                                          lock_timeout=NOTIFY_LOCK_TIMEOUT)
        except (ChannelClosed, OSError, ProtocolError) as e:
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
        a notification went out. Raises KeyError for a handle that is not a live device."""
        if int(state) not in EXECUTION_STATES:
            raise ValueError(f"{state} is not a D3DKMT execution state")
        with self._lock:
            device = self._handles.get(device_handle, HandleType.DEVICE)
            if device is None:
                raise KeyError(f"device 0x{device_handle:08x} is not live in partition {self.id}")
            changed = device.execution_state != int(state)
            device.execution_state = int(state)
            cookie = device.error_code
        if not changed:
            return False
        return self.set_guest_data(cookie, 1, SETGUESTDATA_DATATYPE_DWORD)

    # ---- census --------------------------------------------------------------------------------

    def census(self) -> dict[str, Any]:
        with self._lock:
            return self._census_locked()

    def _census_locked(self) -> dict[str, Any]:
        processes = [p.census() for p in self._processes.values()]
        devices = sum(p["device_count"] for p in processes)
        contexts = sum(p["context_count"] for p in processes)
        io = self._io_space
        return {
            "id": self.id,
            "peer": self.peer,
            "closed": self.closed.is_set(),
            "requests": self._requests,
            "pinned_bytes": self._pinned,
            "io_space": None if io is None else {"start": io.start, "length": io.length},
            "channels": {
                "global": self._global_channel is not None,
                "vgpu": sorted(self._vgpu_channels),
            },
            "adapters": [
                {"index": o.adapter.index, "handle": o.handle, "opens": o.opens}
                for o in self._opens.values()
            ],
            "processes": processes,
            "totals": {
                "processes": len(processes),
                "devices": devices,
                "contexts": contexts,
                "adapter_handles": len(self._opens),
                "handles": len(self._handles),
            },
        }

    def devices(self) -> list[tuple[int, int]]:
        """(process handle, device handle) of every live device: for tools and tests."""
        with self._lock:
            return [(p.handle, d) for p in self._processes.values() for d in p.devices]


__all__ = ["CommandFailed", "Partition", "status_only"]
