"""The Pythonic layer over the D3DKMT thunks, sync and asyncio.

::

    from dxg.client import open_node

    with open_node() as node:
        for ad in node.adapters():
            print(hex(ad.luid), ad.description, ad.adapter_type.compute_only)
        with node.adapters()[0].create_device() as dev, dev.create_context() as ctx:
            print(dev.execution_state, ctx.handle)

and the same on asyncio, where every call that reaches the node is awaited::

    async with await open_node_async() as node:
        for ad in await node.adapters():
            print(hex(ad.luid), await ad.description(), (await ad.adapter_type()).compute_only)
        async with await (await node.adapters())[0].create_device() as dev:
            print(await dev.execution_state())

The two flavors share every line of logic: each operation is one generator of steps
(:mod:`dxg.client.drive`) that :class:`Node`/:class:`Adapter`/:class:`Device`/:class:`Context`
run to completion and :class:`AsyncNode`/:class:`AsyncAdapter`/:class:`AsyncDevice`/
:class:`AsyncContext` turn into coroutines. One rule for properties and methods: a value read
without arguments is a property on the sync side -- ``description``, ``adapter_type``,
``device_ids`` (``ids``), ``compute_only``, ``paravirtualized``, ``software``, ``vendor_id``,
``device_id`` (asked once, cached), ``device.execution_state`` (asked each time) -- and a
zero-argument async method on the async side, since reading it may need the node
(``await adapter.description()``); anything that takes arguments or acts is a method
(``adapter.query_device_ids(i)``, ``device.create_context()``). The older call forms
``adapter.device_ids(i)`` and ``device.execution_state()`` still work. Plain attributes
(``handle``, ``luid``, ``luid_parts``, ``closed``) are the same on both. LUIDs are taken as ints,
as the ``0x…`` strings ``dxg ls`` prints, or as (low, high); ``node.adapter(i)`` opens one
adapter by index (or LUID); ``DXG_VISIBLE_ADAPTERS`` limits what a process enumerates
(:mod:`dxg.client.visible`).

Device memory (allocations, device arrays, paging queues, GPU virtual addresses, video memory
budgets) lives in :mod:`dxg.client.memory`; ``device.allocate``/``empty``/``array``/
``paging_queue``... and ``adapter.video_memory_info``/``reserve_gpu_va``... are its entry points.
Synchronization objects (``device.fence``, ``device.sync_object``) live in :mod:`dxg.client.sync`.

Every object is a context manager (``with`` / ``async with``) whose ``close()`` is idempotent,
and closing a parent closes its children first (Node > Adapter > Device > Context, Allocation,
PagingQueue; an Adapter's GPU virtual address ranges after its devices). A failed call
raises :class:`~dxg.client.errors.DxgError` whose ``.status`` is the NTSTATUS. The sync objects
are thread-safe; the async ones belong to the loop of their connection.
"""

from __future__ import annotations

import ctypes
import enum
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from dxg.client import diag
from dxg.client import thunks as t
from dxg.client.aio import AsyncNodeConnection
from dxg.client.connection import NodeConnection
from dxg.client.drive import AsyncRunner, Op, SyncRunner, call, op, prop
from dxg.client.errors import DxgError, NodeError, NoSuchAdapter, check_status
from dxg.client.luids import LuidLike, luid_text, parse_luid, pick_adapter
from dxg.client.visible import Visible, visible_from_env
from dxg.uapi import structs as s
from dxg.uapi import wddm
from dxg.uapi.ntstatus import NTSTATUS

__all__ = [
    "Adapter",
    "AdapterType",
    "AsyncAdapter",
    "AsyncContext",
    "AsyncDevice",
    "AsyncNode",
    "ClockCalibration",
    "Context",
    "Device",
    "DeviceIds",
    "ExecutionState",
    "FeatureState",
    "Node",
    "open_node",
    "open_node_async",
]

_S = TypeVar("_S", bound=ctypes.Structure)
_T = TypeVar("_T")
_QAI = wddm.KMTQUERYADAPTERINFOTYPE
_DEVICESTATE_EXECUTION = int(s.d3dkmt_devicestate_type._D3DKMT_DEVICESTATE_EXECUTION)
_RETRIES = 8  # re-sizing rounds when the adapter/process count grows between two calls
_check = check_status


def luid_to_int(low: int, high: int) -> int:
    return ((high & 0xFFFFFFFF) << 32) | (low & 0xFFFFFFFF)


def _luid_parts(luid: LuidLike) -> tuple[int, int]:
    """(low, high) of a LUID given as an int, a ``0x…`` string (as ``dxg ls`` prints it) or
    (low, high)."""
    if isinstance(luid, tuple):
        low, high = luid
        return low & 0xFFFFFFFF, high & 0xFFFFFFFF
    number = parse_luid(luid)
    return number & 0xFFFFFFFF, (number >> 32) & 0xFFFFFFFF


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
    """``D3DKMT_DEVICE_IDS`` of a physical adapter (KMTQAITYPE_PHYSICALADAPTERDEVICEIDS):
    ``adapter.device_ids`` (physical adapter 0). Calling it, ``adapter.device_ids(i)``, is the
    older method form, kept working: the ids of physical adapter ``i``
    (``adapter.query_device_ids(i)``)."""

    vendor_id: int
    device_id: int
    subvendor_id: int
    subsystem_id: int
    revision_id: int
    bus_type: int
    _query: Any = field(default=None, compare=False, repr=False, hash=False)

    def __call__(self, physical_adapter_index: int = 0) -> DeviceIds:
        if physical_adapter_index == 0 or self._query is None:
            if physical_adapter_index != 0:
                raise TypeError("these ids are not bound to an adapter: use "
                                "adapter.query_device_ids(i)")
            return self
        return self._query(physical_adapter_index)  # type: ignore[no-any-return]


class ExecutionState(enum.IntEnum):
    """A device's execution state (``d3dkmt_deviceexecution_state``): ``device.execution_state``
    (ACTIVE while its work runs; an error state after a fault, RESET after MarkDeviceAsError).
    Calling it returns itself, so code written for the older method form,
    ``device.execution_state()``, keeps working."""

    ACTIVE = 1
    RESET = 2
    HUNG = 3
    STOPPED = 4
    ERROR_OUTOFMEMORY = 5
    ERROR_DMAFAULT = 6
    ERROR_DMAPAGEFAULT = 7

    def __call__(self) -> ExecutionState:
        return self

    @classmethod
    def _missing_(cls, value: object) -> ExecutionState | None:
        """A state this library does not know (a newer host): kept, named by its number."""
        if not isinstance(value, int):
            return None
        member = int.__new__(cls, value)
        member._name_ = f"STATE_{value}"
        member._value_ = value
        return member


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



# ---- operations shared by more than one object ---------------------------------------------------


def _enum_processes(luid: int | tuple[int, int]) -> Op[list[int]]:
    """EnumProcesses: the pids of the processes that have the adapter open."""
    args = s.d3dkmt_enumprocesses()
    args.adapter_luid.a, args.adapter_luid.b = _luid_parts(luid)
    pids = (ctypes.c_uint32 * 0)()
    status = yield call(t.D3DKMTEnumProcesses, args)
    for _ in range(_RETRIES):
        if status != NTSTATUS.STATUS_BUFFER_TOO_SMALL:
            _check(status, "EnumProcesses")
            return list(pids[: min(int(args.buffer_count), len(pids))])
        count = int(args.buffer_count)
        pids = (ctypes.c_uint32 * max(count, 1))()
        args.buffer = ctypes.addressof(pids)
        args.buffer_count = count
        status = yield call(t.D3DKMTEnumProcesses, args)
    raise DxgError(NTSTATUS.STATUS_BUFFER_TOO_SMALL, "EnumProcesses: process count unstable")


def _execution() -> Any:
    """:mod:`dxg.client.execution` (imported when used, as :mod:`dxg.client.memory`)."""
    from dxg.client import execution

    return execution


def _sync() -> Any:
    """:mod:`dxg.client.sync` (imported when used, as :mod:`dxg.client.memory`)."""
    from dxg.client import sync

    return sync


def _share() -> Any:
    """:mod:`dxg.client.share` (imported when used, as :mod:`dxg.client.memory`)."""
    from dxg.client import share

    return share


def _memory() -> Any:
    """:mod:`dxg.client.memory`, which builds on this module (so it is imported when used)."""
    from dxg.client import memory

    return memory


def _close_children(children: list[Any]) -> Op[BaseException | None]:
    """Close children on the way down. A child that fails with DxgError is left to its parent's
    own close (which releases whatever is left); anything else (an interrupt) stops the round
    and is returned, so the parent still closes before it is raised."""
    for child in children:
        try:
            yield from child._close()
        except DxgError:
            pass
        except GeneratorExit:
            raise
        except BaseException as e:
            return e
    return None


def close_child(obj: Any, thunk: Any, args: Any, what: str, parent: Any = None) -> Op[None]:
    """Close ``obj``, a child of a device (or of ``parent``) with no children of its own:
    untracked from its parent, then destroyed with ``thunk(args)`` (nothing to do once the node
    is gone)."""
    if not obj._mark_closed():
        return
    (obj.device if parent is None else parent)._untrack(obj)
    if obj.conn.closed:
        return
    try:
        status = yield call(thunk, args)
    except NodeError:
        return
    _check(status, what)


# ---- the objects, written once -------------------------------------------------------------------


class _Object:
    """What every object has: a lock, ``closed``, a context manager in its flavor."""

    _closed = False
    conn: Any

    def __init__(self) -> None:
        self._lock = threading.RLock()

    @property
    def closed(self) -> bool:
        return self._closed

    def _mark_closed(self) -> bool:
        """Mark closed; False if it already was (close is idempotent)."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            return True

    def _close(self) -> Op[None]:
        raise NotImplementedError
        yield  # pragma: no cover - makes this a generator

    def _close_op(self) -> Op[None]:
        """Close this object (and its children first); closing again does nothing. In a
        forked child it only lets go (the objects are the parent's, and stay so)."""
        if getattr(self.conn, "forked", False):
            return self._let_go()
        return self._close()

    def _let_go(self) -> Op[None]:
        """Marked closed here, with no call: what a forked child does with its parent's
        objects."""
        self._mark_closed()
        return
        yield  # pragma: no cover - makes this a generator

    close = op(_close_op, forked_ok=True)


class _NodeOps(_Object):
    """This process's connection to the node, and everything opened through it."""

    _adapter_type: type[_AdapterOps]

    def __init__(self, conn: Any, visible: Visible | None = None) -> None:
        super().__init__()
        self.conn = conn
        # DXG_VISIBLE_ADAPTERS (dxg.client.visible): the adapters this process enumerates and
        # opens; None: all that the node shows it.
        self.visible = visible
        self._adapters: list[_AdapterOps] = []

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {str(self.conn.path)!r}>"

    def _let_go(self) -> Op[None]:
        self._mark_closed()
        self.conn.close()  # a forked child's copy of the stream only
        return
        yield  # pragma: no cover - makes this a generator

    def _track(self, adapter: _AdapterOps) -> Any:
        with self._lock:
            self._adapters.append(adapter)
        return adapter

    def _untrack(self, adapter: _AdapterOps) -> None:
        with self._lock:
            if adapter in self._adapters:
                self._adapters.remove(adapter)

    @op
    def adapters(self, include_compute_only: bool = True) -> Op[list[Any]]:
        """EnumAdapters3: every adapter this process sees, each opened (close them, or close
        the Node); with ``DXG_VISIBLE_ADAPTERS`` only those it names, in its order."""
        return (yield from self._visible_adapters(include_compute_only))

    def _visible_adapters(self, include_compute_only: bool) -> Op[list[Any]]:
        found = yield from self._enumerate(include_compute_only)
        if self.visible is None:
            return found
        keep = [found[i] for i in self.visible.select(found)]
        pending = yield from _close_children([a for a in found if a not in keep])
        if pending is not None:
            raise pending
        return keep

    @op
    def adapter(self, which: Any = 0) -> Op[Any]:
        """One adapter, opened: ``which`` is an index into :meth:`adapters` (0, 1, ...) or a
        LUID (a ``0x…`` string as ``dxg ls`` prints it, ``(low, high)``, or an int that is not
        an index). Raises :class:`~dxg.client.errors.NoSuchAdapter`."""
        found = yield from self._visible_adapters(True)
        try:
            index = pick_adapter(found, which)
        except BaseException:
            yield from _close_children(found)
            raise
        pending = yield from _close_children([a for i, a in enumerate(found) if i != index])
        if pending is not None:
            raise pending
        return found[index]

    def _visible_luid(self, luid: int) -> Op[bool]:
        """Whether ``DXG_VISIBLE_ADAPTERS`` lets this process open the adapter ``luid``."""
        visible = self.visible
        if visible is None:
            return True
        if visible.luids_only:
            return visible.names_luid(luid)
        found = yield from self._enumerate(True)
        seen = {found[i].luid for i in visible.select(found)}
        pending = yield from _close_children(found)
        if pending is not None:
            raise pending
        return luid in seen

    def _enumerate(self, include_compute_only: bool) -> Op[list[Any]]:
        """EnumAdapters3: every adapter the node shows this process, each opened."""
        args = s.d3dkmt_enumadapters3()
        args.filter.include_compute_only = int(include_compute_only)
        _check((yield call(t.D3DKMTEnumAdapters3, args)), "EnumAdapters3 (count)")
        for _ in range(_RETRIES):
            count = int(args.adapter_count)
            if count == 0:
                return []
            infos = (s.d3dkmt_adapterinfo * count)()
            args.adapter_count = count
            args.adapters = ctypes.addressof(infos)
            status = yield call(t.D3DKMTEnumAdapters3, args)
            if status == NTSTATUS.STATUS_BUFFER_TOO_SMALL:
                continue  # more adapters appeared; args.adapter_count holds the new count
            _check(status, "EnumAdapters3")
            found = min(int(args.adapter_count), count)
            return [
                self._track(self._adapter_type(
                    self, int(infos[i].adapter_handle.v),
                    luid_to_int(infos[i].adapter_luid.a, infos[i].adapter_luid.b)))
                for i in range(found)
            ]
        raise DxgError(NTSTATUS.STATUS_BUFFER_TOO_SMALL, "EnumAdapters3: adapter count unstable")

    @op
    def open_adapter(self, luid: LuidLike) -> Op[Any]:
        """OpenAdapterFromLuid; ``luid`` as one 64-bit int, a ``0x…`` string (as ``dxg ls``
        prints it) or (low, high). A LUID that names no adapter this process sees raises
        :class:`~dxg.client.errors.NoSuchAdapter`."""
        number = luid_to_int(*_luid_parts(luid))
        missing = f"no such adapter: LUID {luid_text(number)} (`dxg ls` lists the adapters " \
                  "this user sees)"
        if not (yield from self._visible_luid(number)):
            raise NoSuchAdapter(f"{missing}; DXG_VISIBLE_ADAPTERS leaves it out")
        args = s.d3dkmt_openadapterfromluid()
        args.adapter_luid.a, args.adapter_luid.b = _luid_parts(number)
        status = yield call(t.D3DKMTOpenAdapterFromLuid, args)
        if status == NTSTATUS.STATUS_INVALID_PARAMETER:
            raise NoSuchAdapter(missing, status)
        _check(status, "OpenAdapterFromLuid")
        return self._track(self._adapter_type(self, int(args.adapter_handle.v), number))

    @op
    def processes(self, adapter_luid: LuidLike) -> Op[list[int]]:
        """EnumProcesses: the pids of the processes that have the adapter open."""
        return (yield from _enum_processes(adapter_luid))

    @op
    def admin(self, request: dict[str, Any]) -> Op[dict[str, Any]]:
        """An introspection request to the guest driver (``{"op": "snapshot"}``, ...)."""
        return (yield lambda conn: conn.admin(request))

    @op
    def snapshot(self) -> Op[dict[str, Any]]:
        """The guest driver's picture of its hosts, adapters and processes (``dxg ps``)."""
        return (yield lambda conn: conn.admin({"op": "snapshot"}))

    def _close(self) -> Op[None]:
        """Close every adapter (and so every device and context), then the connection."""
        if not self._mark_closed():
            return
        with self._lock:
            adapters, self._adapters = self._adapters, []
        try:
            pending = yield from _close_children(adapters)
        finally:
            self.conn.close()
        if pending is not None:
            raise pending


class _AdapterOps(_Object):
    """An open adapter handle (from EnumAdapters3 or OpenAdapterFromLuid)."""

    _device_type: type[_DeviceOps]

    def __init__(self, node: _NodeOps, handle: int, luid: int) -> None:
        super().__init__()
        self.node = node
        self.handle = handle
        self.luid = luid
        self._devices: list[_DeviceOps] = []
        self._va_ranges: list[Any] = []  # memory.GpuVaRange
        self._cache: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} handle=0x{self.handle:08x} luid=0x{self.luid:016x}>"

    @property
    def conn(self) -> Any:
        return self.node.conn

    @property
    def luid_parts(self) -> tuple[int, int]:
        """The LUID as winluid (low part ``a``, high part ``b``)."""
        return _luid_parts(self.luid)

    def _escape_handles(self) -> tuple[int, int]:
        return self.handle, 0

    def _cached(self, key: str, make: Op[_T]) -> Op[_T]:
        """``make``'s result, asked of the node once per adapter (the answer does not change)."""
        if key in self._cache:
            make.close()
            return self._cache[key]
        value = yield from make
        self._cache[key] = value
        return value

    def _query_info(self, info_type: int, data: _S) -> Op[_S]:
        """QueryAdapterInfo of ``info_type`` (KMTQAITYPE_*) into the ctypes struct ``data``."""
        args = s.d3dkmt_queryadapterinfo()
        args.adapter.v = self.handle
        args.type = int(info_type)
        args.private_data = ctypes.addressof(data)
        args.private_data_size = ctypes.sizeof(data)
        _check((yield call(t.D3DKMTQueryAdapterInfo, args)), f"QueryAdapterInfo({int(info_type)})")
        return data

    query_info = op(_query_info)

    def _description(self) -> Op[str]:
        d = yield from self._query_info(_QAI.KMTQAITYPE_DRIVER_DESCRIPTION,
                                        wddm.D3DKMT_DRIVER_DESCRIPTION())
        text = bytes(d.DriverDescription).decode("utf-16-le", errors="replace")
        return text.split("\0", 1)[0]

    @prop
    def description(self) -> Op[str]:
        """The driver description (KMTQAITYPE_DRIVER_DESCRIPTION, UTF-16 on the wire)."""
        return (yield from self._cached("description", self._description()))

    def _adapter_type_op(self) -> Op[AdapterType]:
        a = yield from self._query_info(_QAI.KMTQAITYPE_ADAPTERTYPE, wddm.D3DKMT_ADAPTERTYPE())
        return AdapterType.from_struct(a)

    def _type(self) -> Op[AdapterType]:
        """The bits of D3DKMT_ADAPTERTYPE (KMTQAITYPE_ADAPTERTYPE)."""
        return (yield from self._cached("adapter_type", self._adapter_type_op()))

    adapter_type = prop(_type)

    @prop
    def compute_only(self) -> Op[bool]:
        return (yield from self._type()).compute_only

    @prop
    def paravirtualized(self) -> Op[bool]:
        return (yield from self._type()).paravirtualized

    @prop
    def software(self) -> Op[bool]:
        return (yield from self._type()).software

    def _device_ids(self, physical_adapter_index: int = 0) -> Op[DeviceIds]:
        """``D3DKMT_DEVICE_IDS`` of physical adapter ``physical_adapter_index``."""
        q = wddm.D3DKMT_QUERY_DEVICE_IDS()
        q.PhysicalAdapterIndex = physical_adapter_index
        yield from self._query_info(_QAI.KMTQAITYPE_PHYSICALADAPTERDEVICEIDS, q)
        ids = q.DeviceIds
        query = self.query_device_ids if isinstance(self, SyncRunner) else None
        return DeviceIds(int(ids.VendorID), int(ids.DeviceID), int(ids.SubVendorID),
                         int(ids.SubSystemID), int(ids.RevisionID), int(ids.BusType), query)

    query_device_ids = op(_device_ids)

    def _ids(self) -> Op[DeviceIds]:
        """The device ids of physical adapter 0 (asked once)."""
        return (yield from self._cached("ids", self._device_ids(0)))

    # A value read is a property (an async method on the async side), as description and
    # adapter_type; ``ids`` is its older name.
    device_ids = prop(_ids)
    ids = prop(_ids)

    @prop
    def vendor_id(self) -> Op[int]:
        return (yield from self._ids()).vendor_id

    @prop
    def device_id(self) -> Op[int]:
        return (yield from self._ids()).device_id

    @op
    def is_feature_enabled(self, feature_id: int) -> Op[FeatureState]:
        args = s.d3dkmt_isfeatureenabled()
        args.adapter.v = self.handle
        args.feature_id = int(feature_id)
        _check((yield call(t.D3DKMTIsFeatureEnabled, args)), "IsFeatureEnabled")
        r = args.result
        return FeatureState(int(r.version), bool(r.enabled), bool(r.known_feature),
                            bool(r.supported_by_driver), bool(r.supported_on_config))

    @op
    def clock_calibration(self, node_ordinal: int = 0,
                          physical_adapter_index: int = 0) -> Op[ClockCalibration]:
        args = s.d3dkmt_queryclockcalibration()
        args.adapter.v = self.handle
        args.node_ordinal = node_ordinal
        args.physical_adapter_index = physical_adapter_index
        _check((yield call(t.D3DKMTQueryClockCalibration, args)), "QueryClockCalibration")
        c = args.clock_data
        return ClockCalibration(int(c.gpu_frequency), int(c.gpu_clock_counter),
                                int(c.cpu_clock_counter), int(c.flags.value))

    @op
    def processes(self) -> Op[list[int]]:
        """The pids of the processes that have this adapter open."""
        return (yield from _enum_processes(self.luid))

    @op
    def create_device(self, flags: int = 0) -> Op[Any]:
        args = s.d3dkmt_createdevice()
        args.adapter.v = self.handle
        ctypes.memmove(ctypes.addressof(args.flags), int(flags).to_bytes(4, "little"), 4)
        _check((yield call(t.D3DKMTCreateDevice, args)), "CreateDevice")
        if int(args.device.v) == 0:
            raise DxgError(NTSTATUS.STATUS_UNSUCCESSFUL, "CreateDevice returned no device")
        dev = self._device_type(self, int(args.device.v))
        with self._lock:
            self._devices.append(dev)
        return dev

    @op
    def escape(self, data: bytes, fds: Sequence[int] = (), flags: int = 0) -> Op[bytes]:
        """D3DKMTEscape (driver-private) on this adapter: the private data after the call.
        ``fds``: descriptors of ours whose numbers ``data`` holds (see :mod:`dxg.client.diag`)."""
        return (yield from diag.escape_op(self.handle, 0, data, fds, flags))

    # -- memory (dxg.client.memory) --

    @op
    def video_memory_info(self, group: int = 0) -> Op[Any]:
        """QueryVideoMemoryInfo of this process: a ``memory.VideoMemoryInfo`` (budget,
        current_usage, current_reservation, available_for_reservation) of segment ``group``
        (0 local, 1 non-local)."""
        return (yield from _memory().video_memory_info(self, group))

    @op
    def reserve_video_memory(self, nbytes: int, group: int = 0) -> Op[None]:
        """ChangeVideoMemoryReservation: this process's reservation in ``group`` becomes
        ``nbytes``."""
        return (yield from _memory().reserve_video_memory(self, nbytes, group))

    @op
    def reserve_gpu_va(self, size: int, base: int = 0, minimum: int = 0,
                       maximum: int = 0) -> Op[Any]:
        """ReserveGpuVirtualAddress: a ``memory.GpuVaRange`` (``.va``, ``.size``; ``close()``
        frees it) of ``size`` bytes at ``base`` (0: where the adapter chooses)."""
        return (yield from _memory().reserve_gpu_va(self, size, base, minimum, maximum))

    @op
    def flush_heap_transitions(self) -> Op[None]:
        return (yield from _memory().flush_heap_transitions(self))

    def _track_va(self, va_range: Any) -> Any:
        with self._lock:
            self._va_ranges.append(va_range)
        return va_range

    def _va_range_at(self, va: int) -> Any:
        """The open GPU VA range reserved through this adapter that holds ``va``, or None."""
        with self._lock:
            return next((r for r in self._va_ranges if va in r), None)

    def _untrack(self, child: Any) -> None:
        with self._lock:
            for children in (self._devices, self._va_ranges):
                if child in children:
                    children.remove(child)

    def _close(self) -> Op[None]:
        """Destroy this adapter's devices, free its GPU VA ranges, then CloseAdapter."""
        if not self._mark_closed():
            return
        with self._lock:
            devices, self._devices = self._devices, []
            va_ranges, self._va_ranges = self._va_ranges, []
        self.node._untrack(self)
        if self.conn.closed:
            return
        pending = yield from _close_children(devices)
        if pending is None:
            pending = yield from _close_children(va_ranges)
        args = s.d3dkmt_closeadapter()
        args.adapter_handle.v = self.handle
        try:
            status = yield call(t.D3DKMTCloseAdapter, args)
        except NodeError:
            status = NTSTATUS.STATUS_SUCCESS  # the node is gone, and the handle with it
        if pending is not None:
            raise pending
        _check(status, "CloseAdapter")


class _DeviceOps(_Object):
    _context_type: type[_ContextOps]

    def __init__(self, adapter: _AdapterOps, handle: int) -> None:
        super().__init__()
        self.adapter = adapter
        self.handle = handle
        self._contexts: list[_ContextOps] = []
        # memory.Allocation (and DeviceArray), memory.PagingQueue: ordered sets (a device may
        # hold many allocations, each closed on its own)
        self._allocations: dict[Any, None] = {}
        self._queues: dict[Any, None] = {}
        self._own_queue: Any = None  # the paging queue of make_resident/reclaim/map_gpu
        self._fences: dict[Any, None] = {}  # sync.Fence, sync.SyncObject
        self._resources: dict[Any, None] = {}  # share.Resource (with their allocations)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} handle=0x{self.handle:08x}>"

    @property
    def conn(self) -> Any:
        return self.adapter.conn

    def _escape_handles(self) -> tuple[int, int]:
        return self.adapter.handle, self.handle

    @op
    def create_context(self, node_ordinal: int = 0, engine_affinity: int = 0, flags: int = 0,
                       client_hint: int = 0, priv_data: bytes = b"") -> Op[Any]:
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
        _check((yield call(t.D3DKMTCreateContextVirtual, args)), "CreateContextVirtual")
        ctx = self._context_type(self, int(args.context.v), node_ordinal,
                                 buf.raw if buf is not None else b"")
        with self._lock:
            self._contexts.append(ctx)
        return ctx

    @op
    def mark_error(self, reason: int = 0) -> Op[None]:
        """MarkDeviceAsError: the device is reset; its fences' waiters wake with an error."""
        return (yield from _execution().mark_error(self, reason))

    @op
    def check(self) -> Op[None]:
        """Raise ``execution.DeviceFault`` when the device is not active (its work faulted)."""
        return (yield from _execution().check_device(self))

    @prop
    def execution_state(self) -> Op[ExecutionState]:
        """GetDeviceState(EXECUTION), read each time: an :class:`ExecutionState` (1 = ACTIVE).
        A property (``await device.execution_state()`` on the async side)."""
        args = s.d3dkmt_getdevicestate()
        args.device.v = self.handle
        args.state_type = _DEVICESTATE_EXECUTION
        _check((yield call(t.D3DKMTGetDeviceState, args)), "GetDeviceState")
        return ExecutionState(int(args.execution_state))

    @op
    def escape(self, data: bytes, fds: Sequence[int] = (), flags: int = 0) -> Op[bytes]:
        """D3DKMTEscape (driver-private) on this device: the private data after the call."""
        return (yield from diag.escape_op(self.adapter.handle, self.handle, data, fds, flags))

    # -- synchronization objects (dxg.client.sync) --

    @op
    def fence(self, initial: int = 0) -> Op[Any]:
        """CreateSynchronizationObject2: a ``sync.Fence`` (monitored fence) starting at
        ``initial`` (``value``, ``signal``, ``wait``, ``eventfd_wait``)."""
        return (yield from _sync().create_fence(self, initial))

    @op
    def sync_object(self, kind: int, *, initial: int = 0, max_count: int = 1,
                    eventfd: int = -1) -> Op[Any]:
        """CreateSynchronizationObject2 of a legacy kind (``sync.SyncKind``): a
        ``sync.SyncObject``."""
        return (yield from _sync().create_sync_object(self, kind, initial=initial,
                                                      max_count=max_count, eventfd=eventfd))

    def _track_fence(self, fence: Any) -> Any:
        with self._lock:
            self._fences[fence] = None
        return fence

    # -- sharing between processes (dxg.client.share) --

    @op
    def shared_fence(self, initial: int = 0) -> Op[Any]:
        """A monitored fence shared by descriptor (``shared | nt_security_sharing``): a
        ``sync.Fence`` whose ``share()`` hands out descriptors other processes open it with."""
        return (yield from _sync().create_fence(self, initial, shared=True))

    @op
    def shared_resource(self, sizes: Sequence[int] | int, *, non_local: bool = False,
                        cached: bool = False) -> Op[Any]:
        """CreateAllocation of a shared resource (one allocation per size, each in memory of
        its own): a ``share.Resource`` (``allocations``, ``share()``)."""
        return (yield from _share().shared_resource(self, sizes, non_local=non_local,
                                                    cached=cached))

    @op
    def open_resource(self, handle: Any) -> Op[Any]:
        """OpenResourceFromNtHandle of a share descriptor (a ``share.SharedHandle`` or a
        descriptor number): a ``share.Resource`` whose allocations are the shared memory."""
        return (yield from _share().open_resource(self, handle))

    @op
    def open_fence(self, handle: Any, read_only: bool = False) -> Op[Any]:
        """OpenSyncObjectFromNtHandle2 of a share descriptor: a ``sync.Fence`` of this device."""
        return (yield from _share().open_fence(self, handle, read_only))

    @op
    def open_sync_file(self, sync_file: Any) -> Op[tuple[Any, int]]:
        """OpenSyncObjectFromSyncFile: (the sync file's shared fence, read-only, its value)."""
        return (yield from _share().open_sync_file(self, sync_file))

    def _track_resource(self, resource: Any) -> Any:
        with self._lock:
            self._resources[resource] = None
        return resource

    # -- memory (dxg.client.memory) --

    @op
    def allocate(self, nbytes: int, *, non_local: bool = False, cached: bool = False,
                 standard: bool = False) -> Op[Any]:
        """CreateAllocation: a ``memory.Allocation`` of at least ``nbytes`` bytes (whole pages),
        in the local segment group or, with ``non_local``, the non-local one; ``standard``: a
        standard EXISTINGHEAP allocation (no private data)."""
        return (yield from _memory().allocate(self, nbytes, non_local=non_local, cached=cached,
                                              standard=standard))

    @op
    def allocate_many(self, sizes: Sequence[int], *, non_local: bool = False,
                      cached: bool = False) -> Op[list[Any]]:
        """One CreateAllocation for several allocations: a list of ``memory.Allocation``."""
        return (yield from _memory().allocate_many(self, sizes, non_local=non_local,
                                                   cached=cached))

    @op
    def empty(self, shape: int | Sequence[int], dtype: Any = None, *,
              non_local: bool = False) -> Op[Any]:
        """A ``memory.DeviceArray`` of ``shape`` and ``dtype`` (default float64); contents
        undefined."""
        return (yield from _memory().empty(self, shape, dtype, non_local=non_local))

    @op
    def zeros(self, shape: int | Sequence[int], dtype: Any = None, *,
              non_local: bool = False) -> Op[Any]:
        return (yield from _memory().zeros(self, shape, dtype, non_local=non_local))

    @op
    def array(self, data: Any, dtype: Any = None, *, non_local: bool = False) -> Op[Any]:
        """A ``memory.DeviceArray`` holding a copy of ``data`` (an ndarray or array-like)."""
        return (yield from _memory().array(self, data, dtype, non_local=non_local))

    from_numpy = array

    @op
    def paging_queue(self, priority: int = 0) -> Op[Any]:
        """CreatePagingQueue: a ``memory.PagingQueue`` (``make_resident``, ``fence_value``)."""
        return (yield from _memory().paging_queue(self, priority))

    @op
    def make_resident(self, allocs: Sequence[Any], wait: bool = True,
                      timeout: float | None = 30.0) -> Op[int]:
        """MakeResident through this device's own paging queue; the paging fence value."""
        return (yield from _memory().make_resident(self, allocs, wait, timeout))

    @op
    def evict(self, allocs: Sequence[Any], only_if_necessary: bool = False) -> Op[int]:
        """Evict; the bytes the adapter says are left to trim."""
        return (yield from _memory().evict(self, allocs, only_if_necessary))

    @op
    def residency(self, allocs: Sequence[Any]) -> Op[list[Any]]:
        """QueryAllocationResidency: a ``memory.Residency`` per allocation."""
        return (yield from _memory().residency(self, allocs))

    @op
    def set_priority(self, allocs: Sequence[Any], priority: int) -> Op[None]:
        """SetAllocationPriority of each allocation."""
        return (yield from _memory().set_priority(self, allocs, priority))

    @op
    def offer(self, allocs: Sequence[Any], priority: int = 2) -> Op[None]:
        """OfferAllocations (``memory.OfferPriority``, default NORMAL)."""
        return (yield from _memory().offer(self, allocs, priority))

    @op
    def reclaim(self, allocs: Sequence[Any], queue: Any = None, wait: bool = True,
                timeout: float | None = 30.0) -> Op[list[Any]]:
        """ReclaimAllocations2: a ``memory.ReclaimResult`` per allocation (OK, DISCARDED,
        NOT_COMMITTED)."""
        return (yield from _memory().reclaim(self, allocs, queue, wait, timeout))

    def _default_queue(self) -> Op[Any]:
        """This device's own paging queue, made when first needed."""
        if self._own_queue is None:
            queue = yield from _memory().paging_queue(self)
            with self._lock:
                if self._own_queue is None:
                    self._own_queue = queue
        return self._own_queue

    def _track_allocation(self, alloc: Any) -> Any:
        with self._lock:
            self._allocations[alloc] = None
        return alloc

    def _track_queue(self, queue: Any) -> Any:
        with self._lock:
            self._queues[queue] = None
        return queue

    def _untrack(self, child: Any) -> None:
        with self._lock:
            if child in self._contexts:
                self._contexts.remove(child)
            self._allocations.pop(child, None)
            self._queues.pop(child, None)
            self._fences.pop(child, None)
            self._resources.pop(child, None)
            if child is self._own_queue:
                self._own_queue = None

    def _close(self) -> Op[None]:
        """Destroy this device's fences, its contexts, its resources, its allocations (one
        DestroyAllocation2), its paging queues, then DestroyDevice."""
        if not self._mark_closed():
            return
        with self._lock:
            contexts, self._contexts = self._contexts, []
            allocations, self._allocations = list(self._allocations), {}
            queues, self._queues = list(self._queues), {}
            fences, self._fences = list(self._fences), {}
            resources, self._resources = list(self._resources), {}
            self._own_queue = None
        self.adapter._untrack(self)
        if self.conn.closed:
            return
        pending = yield from _close_children(fences)
        if pending is None:
            pending = yield from _close_children(contexts)
        if pending is None:
            pending = yield from _close_children(resources)
        if pending is None:
            pending = yield from _memory().close_allocations(allocations)
        if pending is None:
            pending = yield from _close_children(queues)
        args = s.d3dkmt_destroydevice()
        args.device.v = self.handle
        try:
            status = yield call(t.D3DKMTDestroyDevice, args)
        except NodeError:
            status = NTSTATUS.STATUS_SUCCESS  # the node is gone, and the device with it
        if pending is not None:
            raise pending
        _check(status, "DestroyDevice")


class _ContextOps(_Object):
    def __init__(self, device: _DeviceOps, handle: int, node_ordinal: int,
                 priv_data: bytes) -> None:
        super().__init__()
        self.device = device
        self.handle = handle
        self.node_ordinal = node_ordinal
        self.priv_data = priv_data
        self._queues: dict[Any, None] = {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} handle=0x{self.handle:08x} node={self.node_ordinal}>"

    @property
    def conn(self) -> Any:
        return self.device.conn

    @op
    def hwqueue(self, flags: int = 0) -> Op[Any]:
        """CreateHwQueue: an ``execution.HwQueue`` (``submit``, ``wait``, ``progress``)."""
        return (yield from _execution().hwqueue(self, flags))

    @op
    def set_priority(self, priority: int, in_process: bool = False) -> Op[None]:
        """Set[InProcess]ContextSchedulingPriority (-7..7): who runs first on the adapter."""
        return (yield from _execution().set_priority(self, priority, in_process))

    @op
    def priority(self, in_process: bool = False) -> Op[int]:
        """Get[InProcess]ContextSchedulingPriority."""
        return (yield from _execution().get_priority(self, in_process))

    @op
    def wait_sync_file(self, sync_file: Any) -> Op[None]:
        """WaitSyncFile: this context's later GPU work waits until the sync file's (shared)
        fence reaches its value (a ``share.SyncFile`` or a descriptor number)."""
        return (yield from _share().wait_sync_file(self, sync_file))

    def _track_queue(self, queue: Any) -> Any:
        with self._lock:
            self._queues[queue] = None
        return queue

    def _untrack(self, child: Any) -> None:
        with self._lock:
            self._queues.pop(child, None)

    def _close(self) -> Op[None]:
        with self._lock:
            queues, self._queues = list(self._queues), {}
        if not self._closed and not self.conn.closed:
            yield from _close_children(queues)
        args = s.d3dkmt_destroycontext()
        args.context.v = self.handle
        yield from close_child(self, t.D3DKMTDestroyContext, args, "DestroyContext")


# ---- the two flavors ------------------------------------------------------------------------------


class _Sync(SyncRunner):
    """Sync flavor: operations return their results; ``with obj:`` closes it."""

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # type: ignore[attr-defined]


class _Async(AsyncRunner):
    """Asyncio flavor: operations return coroutines; ``async with obj:`` closes it."""

    async def __aenter__(self: _T) -> _T:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()  # type: ignore[attr-defined]

    async def aclose(self) -> None:
        await self.close()  # type: ignore[attr-defined]


class Context(_Sync, _ContextOps):
    """A context (CreateContextVirtual) of a :class:`Device`."""


class Device(_Sync, _DeviceOps):
    """A device (CreateDevice) of an :class:`Adapter`."""

    _context_type = Context


class Adapter(_Sync, _AdapterOps):
    __doc__ = _AdapterOps.__doc__
    _device_type = Device


class Node(_Sync, _NodeOps):
    __doc__ = _NodeOps.__doc__
    _adapter_type = Adapter

    def __init__(self, conn: NodeConnection, visible: Visible | None = None) -> None:
        super().__init__(conn, visible)


class AsyncContext(_Async, _ContextOps):
    """A context of an :class:`AsyncDevice`."""


class AsyncDevice(_Async, _DeviceOps):
    """A device of an :class:`AsyncAdapter`."""

    _context_type = AsyncContext


class AsyncAdapter(_Async, _AdapterOps):
    """An open adapter handle on an asyncio connection (properties are async methods)."""

    _device_type = AsyncDevice


class AsyncNode(_Async, _NodeOps):
    """This process's asyncio connection to the node, and everything opened through it."""

    _adapter_type = AsyncAdapter

    def __init__(self, conn: AsyncNodeConnection, visible: Visible | None = None) -> None:
        super().__init__(conn, visible)


def open_node(path: str | os.PathLike[str] | None = None) -> Node:
    """Connect to the node (default: ``$DXG_NODE``, else this user's default path, else the
    system node ``/run/pydxg/dxg.sock``). ``$DXG_VISIBLE_ADAPTERS``, when set, restricts the
    adapters it enumerates and opens (:mod:`dxg.client.visible`)."""
    visible = visible_from_env()  # (a bad value fails before anything connects)
    return Node(NodeConnection(path), visible)


async def open_node_async(path: str | os.PathLike[str] | None = None) -> AsyncNode:
    """Connect to the node on the running event loop: ``async with await open_node_async():``
    (the same path and ``$DXG_VISIBLE_ADAPTERS`` as :func:`open_node`)."""
    visible = visible_from_env()
    return AsyncNode(await AsyncNodeConnection.open(path), visible)
