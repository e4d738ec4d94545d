"""The Pythonic layer over the D3DKMT thunks.

::

    from dxg.client import open_node

    with open_node() as node:
        for ad in node.adapters():
            print(hex(ad.luid), ad.description, ad.adapter_type.compute_only)
        with node.adapters()[0].create_device() as dev, dev.create_context() as ctx:
            print(dev.execution_state(), ctx.handle)

Every object is a context manager whose ``close()`` is idempotent, and closing a parent closes
its children first (Node > Adapter > Device > Context). A failed call raises
:class:`~dxg.client.errors.DxgError` whose ``.status`` is the NTSTATUS.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass
from functools import cached_property
from typing import Any, TypeVar

from dxg.client import thunks as t
from dxg.client.connection import NodeConnection
from dxg.client.errors import DxgError, NodeError
from dxg.uapi import structs as s
from dxg.uapi import wddm
from dxg.uapi.ntstatus import NTSTATUS, nt_success

__all__ = [
    "Adapter",
    "AdapterType",
    "ClockCalibration",
    "Context",
    "Device",
    "DeviceIds",
    "FeatureState",
    "Node",
    "open_node",
]

_S = TypeVar("_S", bound=ctypes.Structure)
_QAI = wddm.KMTQUERYADAPTERINFOTYPE
_DEVICESTATE_EXECUTION = int(s.d3dkmt_devicestate_type._D3DKMT_DEVICESTATE_EXECUTION)
_RETRIES = 8  # re-sizing rounds when the adapter/process count grows between two calls


def _check(status: int, what: str) -> int:
    if not nt_success(status):
        raise DxgError(status, what)
    return status


def luid_to_int(low: int, high: int) -> int:
    return ((high & 0xFFFFFFFF) << 32) | (low & 0xFFFFFFFF)


def _luid_parts(luid: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(luid, tuple):
        low, high = luid
        return low & 0xFFFFFFFF, high & 0xFFFFFFFF
    return luid & 0xFFFFFFFF, (luid >> 32) & 0xFFFFFFFF


# ---- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterType:
    """The bits of ``D3DKMT_ADAPTERTYPE`` (KMTQAITYPE_ADAPTERTYPE)."""

    value: int
    render_supported: bool
    display_supported: bool
    software: bool
    paravirtualized: bool
    compute_only: bool
    hybrid_discrete: bool
    hybrid_integrated: bool

    @classmethod
    def from_struct(cls, a: wddm.D3DKMT_ADAPTERTYPE) -> AdapterType:
        return cls(
            value=int(a.Value),
            render_supported=bool(a.RenderSupported),
            display_supported=bool(a.DisplaySupported),
            software=bool(a.SoftwareDevice),
            paravirtualized=bool(a.Paravirtualized),
            compute_only=bool(a.ComputeOnly),
            hybrid_discrete=bool(a.HybridDiscrete),
            hybrid_integrated=bool(a.HybridIntegrated),
        )


@dataclass(frozen=True)
class DeviceIds:
    """``D3DKMT_DEVICE_IDS`` of physical adapter ``index`` (KMTQAITYPE_PHYSICALADAPTERDEVICEIDS)."""

    vendor_id: int
    device_id: int
    subvendor_id: int
    subsystem_id: int
    revision_id: int
    bus_type: int


@dataclass(frozen=True)
class FeatureState:
    """``dxgk_isfeatureenabled_result``."""

    version: int
    enabled: bool
    known_feature: bool
    supported_by_driver: bool
    supported_on_config: bool

    def __bool__(self) -> bool:
        return self.enabled


@dataclass(frozen=True)
class ClockCalibration:
    """``dxgk_gpuclockdata``: a GPU and a CPU timestamp taken together."""

    gpu_frequency: int
    gpu_clock_counter: int
    cpu_clock_counter: int
    flags: int


# ---- objects -------------------------------------------------------------------------------------


class _Closable:
    _closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: Any) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Node(_Closable):
    """This process's connection to the node, and everything opened through it."""

    def __init__(self, conn: NodeConnection) -> None:
        self.conn = conn
        self._lock = threading.RLock()
        self._adapters: list[Adapter] = []

    def __repr__(self) -> str:
        return f"<Node {str(self.conn.path)!r}>"

    def _track(self, adapter: Adapter) -> Adapter:
        with self._lock:
            self._adapters.append(adapter)
        return adapter

    def _untrack(self, adapter: Adapter) -> None:
        with self._lock:
            if adapter in self._adapters:
                self._adapters.remove(adapter)

    def adapters(self, include_compute_only: bool = True) -> list[Adapter]:
        """EnumAdapters3: every adapter, each opened (close them, or close the Node)."""
        args = s.d3dkmt_enumadapters3()
        args.filter.include_compute_only = int(include_compute_only)
        _check(t.D3DKMTEnumAdapters3(self.conn, args), "EnumAdapters3 (count)")
        for _ in range(_RETRIES):
            count = int(args.adapter_count)
            if count == 0:
                return []
            infos = (s.d3dkmt_adapterinfo * count)()
            args.adapter_count = count
            args.adapters = ctypes.addressof(infos)
            status = t.D3DKMTEnumAdapters3(self.conn, args)
            if status == NTSTATUS.STATUS_BUFFER_TOO_SMALL:
                continue  # more adapters appeared; args.adapter_count holds the new count
            _check(status, "EnumAdapters3")
            found = min(int(args.adapter_count), count)
            return [
                self._track(
                    Adapter(
                        self,
                        int(infos[i].adapter_handle.v),
                        luid_to_int(infos[i].adapter_luid.a, infos[i].adapter_luid.b),
                    )
                )
                for i in range(found)
            ]
        raise DxgError(NTSTATUS.STATUS_BUFFER_TOO_SMALL, "EnumAdapters3: adapter count unstable")

    def open_adapter(self, luid: int | tuple[int, int]) -> Adapter:
        """OpenAdapterFromLuid; ``luid`` as one 64-bit int or as (low, high)."""
        args = s.d3dkmt_openadapterfromluid()
        args.adapter_luid.a, args.adapter_luid.b = _luid_parts(luid)
        _check(t.D3DKMTOpenAdapterFromLuid(self.conn, args), "OpenAdapterFromLuid")
        return self._track(
            Adapter(self, int(args.adapter_handle.v), luid_to_int(*_luid_parts(luid)))
        )

    def processes(self, adapter_luid: int | tuple[int, int]) -> list[int]:
        """EnumProcesses: the pids of the processes that have the adapter open."""
        args = s.d3dkmt_enumprocesses()
        args.adapter_luid.a, args.adapter_luid.b = _luid_parts(adapter_luid)
        pids = (ctypes.c_uint32 * 0)()
        status = t.D3DKMTEnumProcesses(self.conn, args)
        for _ in range(_RETRIES):
            if status != NTSTATUS.STATUS_BUFFER_TOO_SMALL:
                _check(status, "EnumProcesses")
                return list(pids[: min(int(args.buffer_count), len(pids))])
            count = int(args.buffer_count)
            pids = (ctypes.c_uint32 * max(count, 1))()
            args.buffer = ctypes.addressof(pids)
            args.buffer_count = count
            status = t.D3DKMTEnumProcesses(self.conn, args)
        raise DxgError(NTSTATUS.STATUS_BUFFER_TOO_SMALL, "EnumProcesses: process count unstable")

    def admin(self, request: dict[str, Any]) -> dict[str, Any]:
        return self.conn.admin(request)

    def snapshot(self) -> dict[str, Any]:
        return self.conn.admin({"op": "snapshot"})

    def close(self) -> None:
        """Close every adapter (and so every device and context), then the connection."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            adapters, self._adapters = self._adapters, []
        try:
            for ad in adapters:
                try:
                    ad.close()
                except DxgError:
                    pass  # the connection's close below releases whatever is left
        finally:
            self.conn.close()


class Adapter(_Closable):
    """An open adapter handle (from EnumAdapters3 or OpenAdapterFromLuid)."""

    def __init__(self, node: Node, handle: int, luid: int) -> None:
        self.node = node
        self.handle = handle
        self.luid = luid
        self._lock = threading.RLock()
        self._devices: list[Device] = []

    def __repr__(self) -> str:
        return f"<Adapter handle=0x{self.handle:08x} luid=0x{self.luid:016x}>"

    @property
    def conn(self) -> NodeConnection:
        return self.node.conn

    @property
    def luid_parts(self) -> tuple[int, int]:
        """The LUID as winluid (low part ``a``, high part ``b``)."""
        return _luid_parts(self.luid)

    def query_info(self, info_type: int, data: _S) -> _S:
        """QueryAdapterInfo of ``info_type`` (KMTQAITYPE_*) into the ctypes struct ``data``."""
        args = s.d3dkmt_queryadapterinfo()
        args.adapter.v = self.handle
        args.type = int(info_type)
        args.private_data = ctypes.addressof(data)
        args.private_data_size = ctypes.sizeof(data)
        _check(t.D3DKMTQueryAdapterInfo(self.conn, args), f"QueryAdapterInfo({int(info_type)})")
        return data

    @cached_property
    def description(self) -> str:
        """The driver description (KMTQAITYPE_DRIVER_DESCRIPTION, UTF-16 on the wire)."""
        d = self.query_info(_QAI.KMTQAITYPE_DRIVER_DESCRIPTION, wddm.D3DKMT_DRIVER_DESCRIPTION())
        raw = bytes(d.DriverDescription)
        text = raw.decode("utf-16-le", errors="replace")
        return text.split("\0", 1)[0]

    @cached_property
    def adapter_type(self) -> AdapterType:
        a = self.query_info(_QAI.KMTQAITYPE_ADAPTERTYPE, wddm.D3DKMT_ADAPTERTYPE())
        return AdapterType.from_struct(a)

    @property
    def compute_only(self) -> bool:
        return self.adapter_type.compute_only

    @property
    def paravirtualized(self) -> bool:
        return self.adapter_type.paravirtualized

    @property
    def software(self) -> bool:
        return self.adapter_type.software

    def device_ids(self, physical_adapter_index: int = 0) -> DeviceIds:
        q = wddm.D3DKMT_QUERY_DEVICE_IDS()
        q.PhysicalAdapterIndex = physical_adapter_index
        self.query_info(_QAI.KMTQAITYPE_PHYSICALADAPTERDEVICEIDS, q)
        ids = q.DeviceIds
        return DeviceIds(
            int(ids.VendorID),
            int(ids.DeviceID),
            int(ids.SubVendorID),
            int(ids.SubSystemID),
            int(ids.RevisionID),
            int(ids.BusType),
        )

    @cached_property
    def ids(self) -> DeviceIds:
        return self.device_ids(0)

    @property
    def vendor_id(self) -> int:
        return self.ids.vendor_id

    @property
    def device_id(self) -> int:
        return self.ids.device_id

    def is_feature_enabled(self, feature_id: int) -> FeatureState:
        args = s.d3dkmt_isfeatureenabled()
        args.adapter.v = self.handle
        args.feature_id = int(feature_id)
        _check(t.D3DKMTIsFeatureEnabled(self.conn, args), "IsFeatureEnabled")
        r = args.result
        return FeatureState(
            int(r.version),
            bool(r.enabled),
            bool(r.known_feature),
            bool(r.supported_by_driver),
            bool(r.supported_on_config),
        )

    def clock_calibration(
        self, node_ordinal: int = 0, physical_adapter_index: int = 0
    ) -> ClockCalibration:
        args = s.d3dkmt_queryclockcalibration()
        args.adapter.v = self.handle
        args.node_ordinal = node_ordinal
        args.physical_adapter_index = physical_adapter_index
        _check(t.D3DKMTQueryClockCalibration(self.conn, args), "QueryClockCalibration")
        c = args.clock_data
        return ClockCalibration(
            int(c.gpu_frequency),
            int(c.gpu_clock_counter),
            int(c.cpu_clock_counter),
            int(c.flags.value),
        )

    def processes(self) -> list[int]:
        return self.node.processes(self.luid)

    def create_device(self, flags: int = 0) -> Device:
        args = s.d3dkmt_createdevice()
        args.adapter.v = self.handle
        ctypes.memmove(ctypes.addressof(args.flags), int(flags).to_bytes(4, "little"), 4)
        _check(t.D3DKMTCreateDevice(self.conn, args), "CreateDevice")
        if int(args.device.v) == 0:
            raise DxgError(NTSTATUS.STATUS_UNSUCCESSFUL, "CreateDevice returned no device")
        dev = Device(self, int(args.device.v))
        with self._lock:
            self._devices.append(dev)
        return dev

    def _untrack(self, dev: Device) -> None:
        with self._lock:
            if dev in self._devices:
                self._devices.remove(dev)

    def close(self) -> None:
        """Destroy this adapter's devices, then CloseAdapter."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            devices, self._devices = self._devices, []
        self.node._untrack(self)
        if self.conn.closed:
            return
        try:
            for dev in devices:
                try:
                    dev.close()
                except DxgError:
                    pass  # CloseAdapter below tears the rest down
        finally:
            args = s.d3dkmt_closeadapter()
            args.adapter_handle.v = self.handle
            try:
                status = t.D3DKMTCloseAdapter(self.conn, args)
            except NodeError:
                return
            _check(status, "CloseAdapter")


class Device(_Closable):
    def __init__(self, adapter: Adapter, handle: int) -> None:
        self.adapter = adapter
        self.handle = handle
        self._lock = threading.RLock()
        self._contexts: list[Context] = []

    def __repr__(self) -> str:
        return f"<Device handle=0x{self.handle:08x}>"

    @property
    def conn(self) -> NodeConnection:
        return self.adapter.conn

    def create_context(
        self,
        node_ordinal: int = 0,
        engine_affinity: int = 0,
        flags: int = 0,
        client_hint: int = 0,
        priv_data: bytes = b"",
    ) -> Context:
        """CreateContextVirtual. ``priv_data`` goes to the host; its answer is ``ctx.priv_data``."""
        args = s.d3dkmt_createcontextvirtual()
        args.device.v = self.handle
        args.node_ordinal = node_ordinal
        args.engine_affinity = engine_affinity
        args.flags.value = flags
        args.client_hint = client_hint
        buf = ctypes.create_string_buffer(bytes(priv_data), len(priv_data)) if priv_data else None
        if buf is not None:
            args.priv_drv_data = ctypes.addressof(buf)
            args.priv_drv_data_size = len(priv_data)
        _check(t.D3DKMTCreateContextVirtual(self.conn, args), "CreateContextVirtual")
        ctx = Context(self, int(args.context.v), node_ordinal, buf.raw if buf is not None else b"")
        with self._lock:
            self._contexts.append(ctx)
        return ctx

    def execution_state(self) -> int:
        """GetDeviceState(EXECUTION): a ``d3dkmt_deviceexecution_state`` value (1 = ACTIVE)."""
        args = s.d3dkmt_getdevicestate()
        args.device.v = self.handle
        args.state_type = _DEVICESTATE_EXECUTION
        _check(t.D3DKMTGetDeviceState(self.conn, args), "GetDeviceState")
        value = int(args.execution_state)
        try:
            return s.d3dkmt_deviceexecution_state(value)
        except ValueError:
            return value

    def _untrack(self, ctx: Context) -> None:
        with self._lock:
            if ctx in self._contexts:
                self._contexts.remove(ctx)

    def close(self) -> None:
        """Destroy this device's contexts, then DestroyDevice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            contexts, self._contexts = self._contexts, []
        self.adapter._untrack(self)
        if self.conn.closed:
            return
        try:
            for ctx in contexts:
                try:
                    ctx.close()
                except DxgError:
                    pass  # DestroyDevice below destroys the rest
        finally:
            args = s.d3dkmt_destroydevice()
            args.device.v = self.handle
            try:
                status = t.D3DKMTDestroyDevice(self.conn, args)
            except NodeError:
                return
            _check(status, "DestroyDevice")


class Context(_Closable):
    def __init__(self, device: Device, handle: int, node_ordinal: int, priv_data: bytes) -> None:
        self.device = device
        self.handle = handle
        self.node_ordinal = node_ordinal
        self.priv_data = priv_data

    def __repr__(self) -> str:
        return f"<Context handle=0x{self.handle:08x} node={self.node_ordinal}>"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.device._untrack(self)
        conn = self.device.conn
        if conn.closed:
            return
        args = s.d3dkmt_destroycontext()
        args.context.v = self.handle
        try:
            status = t.D3DKMTDestroyContext(conn, args)
        except NodeError:
            return
        _check(status, "DestroyContext")


def open_node(path: str | os.PathLike[str] | None = None) -> Node:
    """Connect to the node (default: ``$DXG_NODE`` or the standard path)."""
    return Node(NodeConnection(path))
