"""Host adapters: the identity of each virtual GPU this host exposes and its info payloads.

One `HostAdapter` per adapter, shared by every partition (guest); a partition's OPENADAPTER is an
`AdapterOpen` (one host adapter handle per partition and adapter).

QUERYADAPTERINFO types answered (the reply data is always exactly as long as the request's
private data: the payload overwrites its start, the rest comes back as sent):

    UMDRIVERPRIVATE (0)               the pydxg UMD blob, see `umd_private_blob`
    GETSEGMENTSIZE (3)                D3DKMT_SEGMENTSIZEINFO: dedicated video / system, shared
                                      (for a process under a quota, no more than its quota:
                                      dxg.host.memory.Segments.sizes)
    ADAPTERADDRESS (6, 53 _RENDER)    D3DKMT_ADAPTERADDRESS: bus 1, device = adapter index, fn 0
    DRIVERVERSION (13, 56 _RENDER)    KMT_DRIVERVERSION_WDDM_2_7 (u32)
    ADAPTERTYPE (15, 57 _RENDER)      D3DKMT_ADAPTERTYPE of the HOST adapter: RenderSupported,
                                      SoftwareDevice, ComputeOnly (the guest patches its own
                                      Paravirtualized/display bits)
    PHYSICALADAPTERCOUNT (30)         D3DKMT_PHYSICAL_ADAPTER_COUNT: 1
    PHYSICALADAPTERDEVICEIDS (31)     D3DKMT_QUERY_DEVICE_IDS for PhysicalAdapterIndex 0 (PCI
                                      ids of the backend adapter); any other index:
                                      STATUS_INVALID_PARAMETER
    DRIVER_DESCRIPTION (65, 66 _RENDER)  D3DKMT_DRIVER_DESCRIPTION, UTF-16
    WDDM_2_7_CAPS (70)                D3DKMT_WDDM_2_7_CAPS: all zero (no hardware scheduling)

Private data shorter than the payload: STATUS_BUFFER_TOO_SMALL. A type Windows defines but this
host does not serve: STATUS_NOT_SUPPORTED; a number that is no KMTQUERYADAPTERINFOTYPE at all:
STATUS_INVALID_PARAMETER.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from dxg.backends import AdapterDescription
from dxg.host.call import Call, CommandFailed, Handler
from dxg.host.config import AdapterIdentity
from dxg.host.memory import Segments
from dxg.host.scheduler import EngineScheduler
from dxg.protocol import messages as m
from dxg.protocol.bus import (
    DXGK_VMBUS_INTERFACE_VERSION,
    DXGK_VMBUS_LAST_COMPATIBLE_INTERFACE_VERSION,
    PCI_DEVICE_ID_COMPUTE_ACCELERATOR,
    PCI_DEVICE_ID_VIRTUAL_RENDER,
    PCI_VENDOR_MICROSOFT,
    Offer,
)
from dxg.protocol.commands import VgpuCommand
from dxg.protocol.guids import DXGK_VGPU_GUID, luid_to_int
from dxg.protocol.messages import IAI_ASYNC_MSG_ENABLED, GetInternalAdapterInfoReturn
from dxg.uapi.handles import HandleType
from dxg.uapi.ntstatus import NTSTATUS
from dxg.uapi.structs import d3dkmt_queryclockcalibration, dxgk_feature_id, dxgk_gpuclockdata
from dxg.uapi.wddm import (
    D3DKMT_ADAPTERADDRESS,
    D3DKMT_ADAPTERTYPE,
    D3DKMT_DRIVER_DESCRIPTION,
    D3DKMT_DRIVERVERSION,
    D3DKMT_PHYSICAL_ADAPTER_COUNT,
    D3DKMT_QUERY_DEVICE_IDS,
    D3DKMT_SEGMENTSIZEINFO,
    D3DKMT_WDDM_2_7_CAPS,
    KMTQUERYADAPTERINFOTYPE,
    encode_utf16z,
)

if TYPE_CHECKING:
    from dxg.host.partition import Partition

log = logging.getLogger(__name__)

Q = KMTQUERYADAPTERINFOTYPE
OK = NTSTATUS.STATUS_SUCCESS
# The soft adapter's GPU timestamp frequency: its clock counts nanoseconds.
GPU_CLOCK_FREQUENCY = 1_000_000_000
_KNOWN_FEATURES = frozenset(
    int(f)
    for f in (
        dxgk_feature_id._DXGK_FEATURE_HWSCH,
        dxgk_feature_id._DXGK_FEATURE_PAGE_BASED_MEMORY_MANAGER,
        dxgk_feature_id._DXGK_FEATURE_KERNEL_MODE_TESTING,
    )
)
_FEATURE_RESULT_KNOWN = 1 << 1  # dxgk_isfeatureenabled_result: enabled:1 known_feature:1 ...

# dxgk_device_types bits (GETINTERNALADAPTERINFO)
DEVICE_TYPE_SOFTWARE = 1 << 2
DEVICE_TYPE_SOFT_GPU = 1 << 3
DEVICE_TYPE_VIRTUAL_RENDER = 1 << 14
DXGKDDI_INTERFACE_VERSION_WDDM2_7 = 0xC004
PCI_BUS_TYPE = 0  # D3DKMT_DEVICE_IDS.BusType: not reported

# ---- the pydxg UMDRIVERPRIVATE blob, version 1 (little-endian) -------------------------------
#   @0  u32 magic "PDXU" | @4 u16 version (1) | @6 u16 header size (24) | @8 u32 total size
#   @12 u32 node count   | @16 u32 flags (bit0 compute-only, bit1 software device)
#   @20 u32 format count | @24 format count x 32-byte NUL-padded ASCII command-format names
UMD_PRIVATE_MAGIC = b"PDXU"
UMD_PRIVATE_VERSION = 1
UMD_PRIVATE_HEADER = struct.Struct("<4sHHIIII")
UMD_PRIVATE_FORMAT_NAME = 32
UMD_FLAG_COMPUTE_ONLY = 1 << 0
UMD_FLAG_SOFTWARE = 1 << 1


def umd_private_blob(desc: AdapterDescription) -> bytes:
    names = b"".join(
        f.encode("ascii")[: UMD_PRIVATE_FORMAT_NAME - 1].ljust(UMD_PRIVATE_FORMAT_NAME, b"\0")
        for f in desc.command_formats
    )
    flags = (UMD_FLAG_COMPUTE_ONLY if desc.compute_only else 0) | (
        UMD_FLAG_SOFTWARE if desc.software_device else 0
    )
    total = UMD_PRIVATE_HEADER.size + len(names)
    return UMD_PRIVATE_HEADER.pack(UMD_PRIVATE_MAGIC, UMD_PRIVATE_VERSION, UMD_PRIVATE_HEADER.size,
                                   total, desc.node_count, flags,
                                   len(desc.command_formats)) + names


def parse_umd_private_blob(data: bytes) -> dict[str, Any]:
    """Inverse of `umd_private_blob` (for UMDs and tests); raises ValueError if malformed."""
    if len(data) < UMD_PRIVATE_HEADER.size:
        raise ValueError("UMD private blob shorter than its header")
    magic, version, hsize, total, nodes, flags, count = UMD_PRIVATE_HEADER.unpack_from(data)
    if magic != UMD_PRIVATE_MAGIC or version != UMD_PRIVATE_VERSION:
        raise ValueError("not a pydxg v1 UMD private blob")
    if total != hsize + count * UMD_PRIVATE_FORMAT_NAME or len(data) < total:
        raise ValueError("UMD private blob sizes do not add up")
    formats = tuple(
        data[hsize + i * UMD_PRIVATE_FORMAT_NAME : hsize + (i + 1) * UMD_PRIVATE_FORMAT_NAME]
        .split(b"\0", 1)[0].decode("ascii", "replace")
        for i in range(count)
    )
    return {"node_count": nodes, "compute_only": bool(flags & UMD_FLAG_COMPUTE_ONLY),
            "software_device": bool(flags & UMD_FLAG_SOFTWARE), "command_formats": formats}


class HostAdapter:
    """One virtual GPU offered to every guest of this host."""

    def __init__(self, index: int, description: AdapterDescription, identity: AdapterIdentity,
                 relid: int) -> None:
        self.index = index
        self.description = description
        self.identity = identity
        self.relid = relid  # the vGPU channel's relid in every session
        # Set once by Host.remove_adapter; read without a lock: a command racing the removal
        # either runs before it or gets STATUS_DEVICE_REMOVED.
        self.removed = False
        # Its memory, shared by every guest: local = dedicated video memory, non-local = shared
        # system memory, as GETSEGMENTSIZE reports them (dxg.host.memory).
        # Who runs next on its engine: one slot per host core (dxg.host.scheduler).
        self.engine = EngineScheduler(os.cpu_count() or 1)
        self.segments = Segments(description.dedicated_video_memory,
                                 description.shared_system_memory)
        self._qai: MappingProxyType[int, Callable[[bytearray], int]] = MappingProxyType({
            Q.KMTQAITYPE_UMDRIVERPRIVATE: self._qai_umd_private,
            Q.KMTQAITYPE_GETSEGMENTSIZE: self._qai_segment_size,
            Q.KMTQAITYPE_ADAPTERADDRESS: self._qai_address,
            Q.KMTQAITYPE_ADAPTERADDRESS_RENDER: self._qai_address,
            Q.KMTQAITYPE_DRIVERVERSION: self._qai_driver_version,
            Q.KMTQAITYPE_DRIVERVERSION_RENDER: self._qai_driver_version,
            Q.KMTQAITYPE_ADAPTERTYPE: self._qai_adapter_type,
            Q.KMTQAITYPE_ADAPTERTYPE_RENDER: self._qai_adapter_type,
            Q.KMTQAITYPE_PHYSICALADAPTERCOUNT: self._qai_physical_count,
            Q.KMTQAITYPE_PHYSICALADAPTERDEVICEIDS: self._qai_device_ids,
            Q.KMTQAITYPE_DRIVER_DESCRIPTION: self._qai_driver_description,
            Q.KMTQAITYPE_DRIVER_DESCRIPTION_RENDER: self._qai_driver_description,
            Q.KMTQAITYPE_WDDM_2_7_CAPS: self._qai_wddm_2_7_caps,
        })
        self._umd_private = umd_private_blob(description)
        # Constant payloads, encoded once.
        self._driver_description = encode_utf16z(
            description.driver_description, ctypes.sizeof(D3DKMT_DRIVER_DESCRIPTION) // 2)

    def __repr__(self) -> str:
        return f"<HostAdapter {self.index} {self.description.name!r} luid=0x{self.guest_luid:x}>"

    # ---- identity ------------------------------------------------------------------------------

    @property
    def guest_luid(self) -> int:
        return self.identity.guest_luid

    @property
    def host_adapter_luid(self) -> int:
        return self.identity.host_adapter_luid

    @property
    def host_vgpu_luid(self) -> int:
        return self.identity.host_vgpu_luid

    @property
    def instance_guid(self) -> uuid.UUID:
        return self.identity.instance_guid

    @property
    def node_count(self) -> int:
        return self.description.node_count

    @property
    def pci_device_id(self) -> int:
        """The virtual PCI device id the guest sees (not the backend adapter's own id)."""
        if self.description.compute_only:
            return PCI_DEVICE_ID_COMPUTE_ACCELERATOR
        return PCI_DEVICE_ID_VIRTUAL_RENDER

    @property
    def device_instance_id(self) -> str:
        d = self.description
        return (f"PCI\\VEN_{d.vendor_id:04X}&DEV_{d.device_id:04X}"
                f"&SUBSYS_{d.subsystem_id:04X}{d.subsystem_vendor_id:04X}&REV_{d.revision_id:02X}"
                f"\\4&{self.host_adapter_luid & 0xFFFFFFFF:08X}&0&{self.index:02X}")

    @property
    def device_types(self) -> int:
        if self.description.software_device:
            return DEVICE_TYPE_SOFTWARE | DEVICE_TYPE_SOFT_GPU
        return 0

    def offer(self, host_caps: int = 0) -> Offer:
        return Offer(
            relid=self.relid,
            type_guid=DXGK_VGPU_GUID,
            instance_guid=self.instance_guid,
            interface_version=DXGK_VMBUS_INTERFACE_VERSION,
            host_caps=host_caps,
            host_vgpu_luid=self.host_vgpu_luid,
            pci_vendor_id=PCI_VENDOR_MICROSOFT,
            pci_device_id=self.pci_device_id,
        )

    def internal_info(self, async_msg_enabled: bool) -> GetInternalAdapterInfoReturn:
        return GetInternalAdapterInfoReturn(
            device_types=self.device_types,
            driver_store_copy_mode=0,
            driver_ddi_version=DXGKDDI_INTERFACE_VERSION_WDDM2_7,
            flags=IAI_ASYNC_MSG_ENABLED if async_msg_enabled else 0,
            host_adapter_luid=self.host_adapter_luid,
            device_description=self.description.name,
            device_instance_id=self.device_instance_id,
            host_vgpu_luid=self.host_vgpu_luid,
        )

    def census(self) -> dict[str, Any]:
        d = self.description
        return {
            "index": self.index,
            "name": d.name,
            "removed": self.removed,
            "guest_luid": self.guest_luid,
            "host_adapter_luid": self.host_adapter_luid,
            "host_vgpu_luid": self.host_vgpu_luid,
            "instance_guid": str(self.instance_guid),
            "relid": self.relid,
            "node_count": d.node_count,
            "command_formats": list(d.command_formats),
            "dedicated_video_memory": d.dedicated_video_memory,
            "engine": d.engine,
            "memory": self.segments.census(),
            "scheduler": self.engine.census(),
        }

    # ---- QUERYADAPTERINFO ----------------------------------------------------------------------

    def query_info(self, query_type: int, private_data: bytes) -> tuple[int, bytes]:
        """(NTSTATUS, reply data); the reply data is always `len(private_data)` bytes."""
        handler = self._qai.get(query_type)
        if handler is None:
            known = query_type in KMTQUERYADAPTERINFOTYPE._value2member_map_
            status = NTSTATUS.STATUS_NOT_SUPPORTED if known else NTSTATUS.STATUS_INVALID_PARAMETER
            return int(status), private_data
        buf = bytearray(private_data)
        status = handler(buf)
        return int(status), bytes(buf) if status == NTSTATUS.STATUS_SUCCESS else private_data

    def query_segment_sizes(self, private_data: bytes,
                            sizes: tuple[int, int]) -> tuple[int, bytes]:
        """GETSEGMENTSIZE as one process is told it: (local, non-local) ``sizes`` (its quotas
        may make them smaller than the segments: Segments.sizes); as `query_info` otherwise."""
        buf = bytearray(private_data)
        status = self._qai_segment_size(buf, sizes)
        return int(status), bytes(buf) if status == NTSTATUS.STATUS_SUCCESS else private_data

    @staticmethod
    def _put(buf: bytearray, payload: bytes | ctypes.Structure | ctypes.c_uint32) -> int:
        raw = bytes(payload)
        if len(buf) < len(raw):
            return NTSTATUS.STATUS_BUFFER_TOO_SMALL
        buf[: len(raw)] = raw
        return NTSTATUS.STATUS_SUCCESS

    def _qai_umd_private(self, buf: bytearray) -> int:
        return self._put(buf, self._umd_private)

    def _qai_segment_size(self, buf: bytearray,
                          sizes: tuple[int, int] | None = None) -> int:
        d = self.description
        local, shared = sizes if sizes is not None else (d.dedicated_video_memory,
                                                         d.shared_system_memory)
        return self._put(buf, D3DKMT_SEGMENTSIZEINFO(
            DedicatedVideoMemorySize=local,
            DedicatedSystemMemorySize=d.dedicated_system_memory,
            SharedSystemMemorySize=shared,
        ))

    def _qai_address(self, buf: bytearray) -> int:
        return self._put(buf, D3DKMT_ADAPTERADDRESS(BusNumber=1, DeviceNumber=self.index,
                                                    FunctionNumber=0))

    def _qai_driver_version(self, buf: bytearray) -> int:
        return self._put(buf, struct.pack(
            "<I", D3DKMT_DRIVERVERSION.KMT_DRIVERVERSION_WDDM_2_7))

    def _qai_adapter_type(self, buf: bytearray) -> int:
        d = self.description
        t = D3DKMT_ADAPTERTYPE()
        t.RenderSupported = int(not d.compute_only)  # compute-only (MCDM) adapters do not render
        t.SoftwareDevice = int(d.software_device)
        t.ComputeOnly = int(d.compute_only)
        t.DisplaySupported = 0
        return self._put(buf, t)

    def _qai_physical_count(self, buf: bytearray) -> int:
        return self._put(buf, D3DKMT_PHYSICAL_ADAPTER_COUNT(Count=1))

    def _qai_device_ids(self, buf: bytearray) -> int:
        size = ctypes.sizeof(D3DKMT_QUERY_DEVICE_IDS)
        if len(buf) < size:
            return NTSTATUS.STATUS_BUFFER_TOO_SMALL
        q = D3DKMT_QUERY_DEVICE_IDS.from_buffer_copy(bytes(buf[:size]))
        if q.PhysicalAdapterIndex != 0:
            return NTSTATUS.STATUS_INVALID_PARAMETER
        d = self.description
        ids = q.DeviceIds
        ids.VendorID = d.vendor_id
        ids.DeviceID = d.device_id
        ids.SubVendorID = d.subsystem_vendor_id
        ids.SubSystemID = d.subsystem_id
        ids.RevisionID = d.revision_id
        ids.BusType = PCI_BUS_TYPE
        return self._put(buf, q)

    def _qai_driver_description(self, buf: bytearray) -> int:
        return self._put(buf, self._driver_description)

    def _qai_wddm_2_7_caps(self, buf: bytearray) -> int:
        return self._put(buf, D3DKMT_WDDM_2_7_CAPS())  # no hardware scheduling, no display


@dataclass(eq=False, slots=True)
class AdapterOpen:
    """A partition's open of an adapter: its host adapter handle, counted opens."""

    handle: int
    adapter: HostAdapter
    opens: int = 0


# ---- the commands ------------------------------------------------------------------------------


def drop_open(p: Partition, adapter_index: int) -> None:
    """The partition's open of an adapter goes, and every device any process has on it, with
    the processes' GPU VA spaces and memory on it."""
    from dxg.host.device import drop_device
    from dxg.host.vaspace import drop_vaspace

    opened = p.opens.pop(adapter_index, None)
    if opened is None:
        return
    from dxg.host.syncobject import drop_adapter_syncobjects

    for process in list(p.processes.values()):
        for device in list(process.devices.values()):
            if device.adapter is opened.adapter:
                drop_device(p, device)
        drop_adapter_syncobjects(p, process, opened.adapter)
        drop_vaspace(p, process, adapter_index)
        p.shares.process_leaving(process, adapter_index)
        process.memory.drop_adapter(adapter_index)
    p.free(opened.handle, HandleType.ADAPTER)


def close_process_adapter(p: Partition, call: Call, body: m.Empty) -> m.NtStatusReturn:
    """PYDXG_CLOSEPROCESSADAPTER: the process is done with this adapter (its devices went
    before): its GPU VA space, reservations and memory blocks there go too."""
    from dxg.host.vaspace import drop_vaspace

    adapter = _adapter(call)
    process = p.process(call)
    for device in list(process.devices.values()):
        if device.adapter is adapter:
            raise CommandFailed(NTSTATUS.STATUS_INVALID_PARAMETER, "devices still open on it")
    from dxg.host.syncobject import drop_adapter_syncobjects

    drop_adapter_syncobjects(p, process, adapter)  # (its legacy sync objects there)
    drop_vaspace(p, process, adapter.index)
    p.shares.process_leaving(process, adapter.index)  # (shared memory it pays goes elsewhere)
    process.memory.drop_adapter(adapter.index)
    return m.NtStatusReturn(NTSTATUS.STATUS_SUCCESS)


def addressed(p: Partition, call: Call, handle: int) -> HostAdapter:
    """The adapter a call addresses, which ``handle`` (the guest's host handle of it, from an
    ioctl struct) must name."""
    adapter = _adapter(call)
    if handle != open_of(p, adapter).handle:
        raise CommandFailed(NTSTATUS.STATUS_INVALID_HANDLE, "not this adapter's host handle")
    return adapter


def open_of(p: Partition, adapter: HostAdapter) -> AdapterOpen:
    opened = p.opens.get(adapter.index)
    if opened is None:
        raise CommandFailed(NTSTATUS.STATUS_INVALID_HANDLE, "adapter not opened by this guest")
    return opened


def _adapter(call: Call) -> HostAdapter:
    if call.adapter is None:
        raise CommandFailed(NTSTATUS.STATUS_INVALID_PARAMETER, "no adapter addressed")
    return call.adapter


def open_adapter(p: Partition, call: Call, body: m.OpenAdapter) -> m.OpenAdapterReturn:
    adapter = _adapter(call)
    if body.vmbus_interface_version < DXGK_VMBUS_LAST_COMPATIBLE_INTERFACE_VERSION:
        raise CommandFailed(NTSTATUS.STATUS_NOT_SUPPORTED,
                            f"interface version {body.vmbus_interface_version}")
    guest_luid = luid_to_int(body.guest_luid_low, body.guest_luid_high)
    if guest_luid not in (0, adapter.guest_luid):
        raise CommandFailed(NTSTATUS.STATUS_INVALID_PARAMETER, "guest LUID mismatch")
    opened = p.opens.get(adapter.index)
    if opened is None:
        opened = AdapterOpen(0, adapter)
        opened.handle = p.alloc(HandleType.ADAPTER, opened)
        p.opens[adapter.index] = opened
    opened.opens += 1
    return m.OpenAdapterReturn(opened.handle, OK, DXGK_VMBUS_INTERFACE_VERSION,
                               DXGK_VMBUS_LAST_COMPATIBLE_INTERFACE_VERSION)


def close_adapter(p: Partition, call: Call, body: m.CloseAdapter) -> None:
    adapter = _adapter(call)
    opened = p.opens.get(adapter.index)
    if opened is None or opened.handle != body.host_handle:
        log.warning("partition %d: CLOSEADAPTER of unknown handle 0x%08x", p.id,
                    body.host_handle)
        return None
    opened.opens -= 1
    if opened.opens <= 0:
        drop_open(p, adapter.index)
    return None


def get_internal_adapter_info(p: Partition, call: Call,
                              body: m.Empty) -> GetInternalAdapterInfoReturn:
    return _adapter(call).internal_info(p.config.async_msg_enabled)


def query_adapter_info(p: Partition, call: Call, body: m.QueryAdapterInfo) -> m.StatusAndData:
    adapter = _adapter(call)
    process = p.optional_process(call)
    if process is not None and body.query_type == Q.KMTQAITYPE_GETSEGMENTSIZE:
        segments = adapter.segments  # the sizes as this process is told them (its quotas)
        sizes = segments.sizes(process.memory.view(segments, adapter.index))
        status, data = adapter.query_segment_sizes(body.private_data, sizes)
    else:
        status, data = adapter.query_info(body.query_type, body.private_data)
    return m.StatusAndData(status, data)


def is_feature_enabled(p: Partition, call: Call,
                       body: m.IsFeatureEnabled) -> m.IsFeatureEnabledReturn:
    p.optional_process(call)
    # Known features are reported as known, not supported and not enabled; unknown ids are
    # answered with known_feature = 0.
    bits = _FEATURE_RESULT_KNOWN if body.feature_id in _KNOWN_FEATURES else 0
    return m.IsFeatureEnabledReturn(OK, 0, 0, 0, 0, bits)


def query_clock_calibration(p: Partition, call: Call,
                            body: m.QueryClockCalibration) -> m.QueryClockCalibrationReturn:
    adapter = _adapter(call)
    p.process(call)
    args = d3dkmt_queryclockcalibration.from_buffer_copy(body.args)
    if args.adapter.v != open_of(p, adapter).handle:
        raise CommandFailed(NTSTATUS.STATUS_INVALID_HANDLE, "not this adapter's host handle")
    if args.node_ordinal >= adapter.node_count or args.physical_adapter_index != 0:
        raise CommandFailed(NTSTATUS.STATUS_INVALID_PARAMETER, "no such node/physical adapter")
    clock = dxgk_gpuclockdata()
    clock.gpu_frequency = GPU_CLOCK_FREQUENCY
    # The soft GPU's timestamp counter is CLOCK_MONOTONIC in ns, and CLOCK_MONOTONIC is also
    # the CPU clock a Linux guest reads (clock_gettime), so the pair is taken back to back.
    clock.gpu_clock_counter = time.monotonic_ns()
    clock.cpu_clock_counter = time.monotonic_ns()
    return m.QueryClockCalibrationReturn(OK, bytes(clock))


HANDLERS: MappingProxyType[VgpuCommand, Handler] = MappingProxyType({
    VgpuCommand.OPENADAPTER: open_adapter,
    VgpuCommand.CLOSEADAPTER: close_adapter,
    VgpuCommand.GETINTERNALADAPTERINFO: get_internal_adapter_info,
    VgpuCommand.QUERYADAPTERINFO: query_adapter_info,
    VgpuCommand.ISFEATUREENABLED: is_feature_enabled,
    VgpuCommand.QUERYCLOCKCALIBRATION: query_clock_calibration,
    VgpuCommand.PYDXG_CLOSEPROCESSADAPTER: close_process_adapter,
})

__all__ = ["HANDLERS", "AdapterOpen", "HostAdapter", "drop_open", "open_of",
           "parse_umd_private_blob", "umd_private_blob"]
