"""Device memory through the node: allocations, typed device arrays, paging queues and residency,
GPU virtual addresses and video memory budgets, sync and asyncio.

::

    import numpy as np
    from dxg.client import open_node

    with open_node() as node, node.adapters()[0].create_device() as dev:
        with dev.allocate(1 << 20) as a:            # CreateAllocation (DestroyAllocation2)
            a.upload(b"hello")                       # Lock2, copy, Unlock2
            with a.map() as view:                    # a NumPy uint8 view while locked
                view[5:10] = 33
            assert a.download(10) == b"hello!!!!!"
        x = dev.array(np.arange(16, dtype=np.float32))
        print(x.download() * 2)                      # a copy, an ndarray of x.shape
        with dev.paging_queue() as q:
            q.make_resident([x])                     # waits on the paging fence if pending
        print(dev.adapter.video_memory_info())

and the same on asyncio, every call that reaches the node awaited, maps with ``async with``::

    async with await ad.create_device() as dev:
        a = await dev.allocate(4096)
        async with a.map() as view:
            view[:] = 7
        print(await a.download(16))

Each operation is written once as a generator of steps (:mod:`dxg.client.drive`), like those
of :mod:`dxg.client.api`; :class:`Allocation`, :class:`DeviceArray`, :class:`PagingQueue`,
:class:`GpuVaRange` and :class:`GpuMapping` run them to completion, their ``Async*`` twins
return coroutines. The hooks on :class:`~dxg.client.api.Device` (``allocate``, ``empty``,
``array``, ``paging_queue``, ``evict``, ``offer``, ``reclaim``...) and
:class:`~dxg.client.api.Adapter` (``video_memory_info``, ``reserve_video_memory``,
``reserve_gpu_va``) call the functions at the bottom of this module.

Mapping. ``alloc.map()`` is D3DKMTLock2 on enter and D3DKMTUnlock2 on exit: the view is the
allocation's memory itself on a local link (host, guest and this process share the pages), a
copy fetched at the first Lock2 and written back at the last Unlock2 over a network link. So
written data reaches the host when the last map of the allocation ends. Maps nest: the first one
locks, the inner ones reuse its address, the last one unlocks. A view must not be used once its
map has ended (it may point at memory that is gone).

Closing. Every object is a context manager whose ``close()`` is idempotent; closing a device
closes its contexts, then its allocations (with their GPU mappings), then its paging queues,
and closing an adapter frees the GPU virtual address ranges reserved through it.
"""

from __future__ import annotations

import asyncio
import ctypes
import enum
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from dxg.client import thunks as t
from dxg.client.aio import AsyncNodeConnection
from dxg.client.api import _Async, _Object, _Sync, close_child
from dxg.client.drive import AsyncRunner, Op, Step, call, op
from dxg.client.errors import DxgError, NodeError, check_status
from dxg.uapi import memory as um
from dxg.uapi import structs as s
from dxg.uapi.ntstatus import NTSTATUS

__all__ = [
    "Allocation",
    "AsyncAllocation",
    "AsyncDeviceArray",
    "AsyncGpuMapping",
    "AsyncGpuVaRange",
    "AsyncMapping",
    "AsyncPagingQueue",
    "DeviceArray",
    "GpuMapping",
    "GpuVaRange",
    "Mapping",
    "OfferPriority",
    "PagingQueue",
    "PagingTimeout",
    "ReclaimResult",
    "Residency",
    "VideoMemoryInfo",
]

_T = TypeVar("_T")
_check = check_status
_STATUS_PENDING = int(NTSTATUS.STATUS_PENDING)
_STANDARD_EXISTINGHEAP = int(s.d3dkmt_standardallocationtype._D3DKMT_STANDARDALLOCATIONTYPE_EXISTINGHEAP)
_VA_UNMAP = int(s.d3dddi_updategpuvirtualaddress_operation_type._D3DDDI_UPDATEGPUVIRTUALADDRESS_UNMAP)
DEFAULT_TIMEOUT = 30.0  # seconds a paging fence may take before PagingTimeout
_POLL_FIRST = 50e-6  # the first pause between two reads of a paging fence; doubles up to ...
_POLL_MAX = 5e-3


class Residency(enum.IntEnum):
    """``d3dkmt_allocationresidencystatus``."""

    RESIDENT_IN_GPU_MEMORY = 1
    RESIDENT_IN_SHARED_MEMORY = 2
    NOT_RESIDENT = 3


class OfferPriority(enum.IntEnum):
    """``d3dkmt_offer_priority``: how readily the system may discard an offered allocation."""

    LOW = 1
    NORMAL = 2
    HIGH = 3
    AUTO = 4


class ReclaimResult(enum.IntEnum):
    """``d3dddi_reclaim_result``: what became of an offered allocation."""

    OK = 0
    DISCARDED = 1
    NOT_COMMITTED = 2


@dataclass(frozen=True)
class VideoMemoryInfo:
    """``d3dkmt_queryvideomemoryinfo`` of this process on one adapter and segment group."""

    budget: int
    current_usage: int
    current_reservation: int
    available_for_reservation: int


class PagingTimeout(DxgError, TimeoutError):
    """A paging fence did not reach its value in time (``status`` is STATUS_TIMEOUT)."""

    def __init__(self, message: str) -> None:
        super().__init__(NTSTATUS.STATUS_TIMEOUT, message)


# ---- helpers -------------------------------------------------------------------------------------


def _np() -> Any:
    """NumPy, imported when first needed (``dxg ls`` and friends never need it)."""
    import numpy

    return numpy


def _pick(owner: Any, sync_type: type[_T], async_type: type[_T]) -> type[_T]:
    """The class of the flavor ``owner`` is of."""
    return async_type if isinstance(owner, AsyncRunner) else sync_type


def _sleep(seconds: float) -> Step:
    """A pause that parks only this caller: ``time.sleep`` on a sync connection, ``asyncio.sleep``
    on an async one."""

    def step(conn: Any) -> Any:
        if isinstance(conn, AsyncNodeConnection):
            return asyncio.sleep(seconds)
        time.sleep(seconds)
        return None

    return step


def _readonly_at(address: int) -> Step:
    """Whether the node mapped ``address`` read-only into this process (False for a connection
    that cannot say)."""

    def step(conn: Any) -> bool:
        mapped_readonly = getattr(conn, "mapped_readonly", None)
        return bool(mapped_readonly(address)) if mapped_readonly is not None else False

    return step


def _handles(allocs: Iterable[Any], device: Any, what: str) -> tuple[list[Any], Any]:
    """The allocations as a list and their handles as a u32 array; every one must belong to
    ``device`` and be open."""
    items = list(allocs)
    if not items:
        raise ValueError(f"{what}: no allocations")
    for a in items:
        if not isinstance(a, _AllocationOps):
            raise TypeError(f"{what}: expected allocations, got {type(a).__name__}")
        if a.device is not device:
            raise ValueError(f"{what}: {a!r} belongs to another device")
        if a.closed:
            raise DxgError(NTSTATUS.STATUS_INVALID_HANDLE, f"{what}: {a!r} is closed")
    return items, (ctypes.c_uint32 * len(items))(*(a.handle for a in items))


def _byte_source(data: Any) -> Any:
    """``data`` (bytes-like or ndarray) as a flat, C-contiguous uint8 ndarray (no copy when it
    already is one)."""
    np = _np()
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)


def _shape_of(shape: int | Sequence[int]) -> tuple[int, ...]:
    dims = (int(shape),) if isinstance(shape, int) else tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise ValueError(f"negative dimension in shape {dims}")
    return dims


# ---- allocations ---------------------------------------------------------------------------------


class _AllocationOps(_Object):
    """One allocation of a device (D3DKMTCreateAllocation), destroyed by ``close()``.

    ``nbytes`` is what was asked for, ``size`` what the allocation spans (whole pages)."""

    _mapping_type: type[_MapBase]
    # Memory this process may only read (an allocation opened from a read-only share:
    # dxg.client.share): known once mapped; its views are read-only and writes are refused.
    read_only = False

    def __init__(self, device: Any, handle: int, nbytes: int, size: int, flags: int) -> None:
        super().__init__()
        self.device = device
        self.handle = handle
        self.nbytes = nbytes
        self.size = size
        self.flags = flags
        self._maps = 0  # maps open now (nested ones included)
        self._locks = 0  # Lock2 calls that succeeded and are not unlocked yet
        self._address = 0  # where the allocation is in this process while mapped
        self._gpu_mappings: list[_GpuMappingOps] = []

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<{type(self).__name__} handle=0x{self.handle:08x} size={self.size}{state}>"

    @property
    def conn(self) -> Any:
        return self.device.conn

    @property
    def non_local(self) -> bool:
        """Asked for in the non-local segment group (system memory the GPU reaches). One asked
        for in the local group goes to the non-local one when the local one is full:
        ``residency()`` says where it is (RESIDENT_IN_SHARED_MEMORY)."""
        return bool(self.flags & um.ALLOC_NONLOCAL)

    # -- Lock2 / Unlock2, counted ---------------------------------------------------------------

    def _acquire(self) -> Op[int]:
        """The allocation's address in this process; the first acquire calls Lock2."""
        with self._lock:
            if self._closed:
                raise DxgError(NTSTATUS.STATUS_INVALID_HANDLE, f"Lock2: {self!r}")
            if self._maps and self._address:
                self._maps += 1
                return self._address
        args = s.d3dkmt_lock2()
        args.device.v = self.device.handle
        args.allocation.v = self.handle
        _check((yield call(t.D3DKMTLock2, args)), "Lock2")
        if not args.data:
            raise DxgError(NTSTATUS.STATUS_UNSUCCESSFUL, "Lock2 returned no address")
        address = int(args.data)
        if (yield _readonly_at(address)):
            self.read_only = True  # (the node mapped it so: writing would fault this process)
        with self._lock:
            if self._closed:  # closed by another thread while Lock2 ran: the memory is gone
                raise DxgError(NTSTATUS.STATUS_INVALID_HANDLE, f"Lock2: {self!r} was closed")
            # Two first maps racing both lock; the last release unlocks as often as was locked.
            self._locks += 1
            self._maps += 1
            self._address = int(args.data)
            return self._address

    def _release(self) -> Op[None]:
        """End one acquire; the last one calls Unlock2 (once per Lock2 it made)."""
        with self._lock:
            if self._maps == 0:
                return  # closed (or never mapped) meanwhile: nothing is locked any more
            self._maps -= 1
            if self._maps:
                return
            count, self._locks, self._address = self._locks, 0, 0
        failure: DxgError | None = None
        for _ in range(count):
            args = s.d3dkmt_unlock2()
            args.device.v = self.device.handle
            args.allocation.v = self.handle
            try:
                status = yield call(t.D3DKMTUnlock2, args)
            except NodeError:
                return  # the node is gone, and the lock with it
            try:
                _check(status, "Unlock2")
            except DxgError as e:
                failure = failure or e
        if failure is not None:
            raise failure

    def map(self, dtype: Any = None, shape: int | Sequence[int] | None = None,
            offset: int = 0) -> Any:
        """A context manager (``with`` / ``async with``): Lock2 on enter, which gives a NumPy view
        of the allocation (``uint8`` over the whole size, or ``dtype`` and ``shape`` from byte
        ``offset``), and Unlock2 on exit. Do not use the view after the ``with`` block."""
        return self._mapping_type(self, dtype, shape, offset)

    def _view(self, address: int, dtype: Any, shape: Any, offset: int) -> Any:
        np = _np()
        dt = np.dtype(np.uint8 if dtype is None else dtype)
        if offset < 0 or offset > self.size:
            raise ValueError(f"offset {offset} outside the allocation ({self.size} bytes)")
        if shape is None:
            dims: tuple[int, ...] = ((self.size - offset) // dt.itemsize,)
        else:
            dims = _shape_of(shape)
        nbytes = math.prod(dims) * dt.itemsize
        if offset + nbytes > self.size:
            raise ValueError(f"a {dims} {dt} view from byte {offset} does not fit in "
                             f"{self.size} bytes")
        raw = (ctypes.c_ubyte * nbytes).from_address(address + offset)
        view = np.frombuffer(raw, dtype=dt, count=math.prod(dims)).reshape(dims)
        if self.read_only:
            view.flags.writeable = False
        return view

    # -- copies -------------------------------------------------------------------------------

    def _check_range(self, offset: int, nbytes: int) -> None:
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise ValueError(f"bytes {offset}..{offset + nbytes} are outside the allocation "
                             f"({self.size} bytes)")

    def _write(self, src: Any, offset: int) -> Op[None]:
        """Copy the uint8 ndarray ``src`` to byte ``offset`` (under a map)."""
        n = int(src.nbytes)
        self._check_range(offset, n)
        address = yield from self._acquire()
        try:
            if self.read_only:
                raise DxgError(NTSTATUS.STATUS_ACCESS_DENIED, f"{self!r} is read-only")
            if n:
                ctypes.memmove(address + offset, src.ctypes.data, n)
        finally:
            yield from self._release()

    def _read_into(self, out: Any, offset: int) -> Op[Any]:
        """Copy ``out.nbytes`` bytes from byte ``offset`` into the C-contiguous ndarray ``out``."""
        n = int(out.nbytes)
        self._check_range(offset, n)
        address = yield from self._acquire()
        try:
            if n:
                ctypes.memmove(out.ctypes.data, address + offset, n)
        finally:
            yield from self._release()
        return out

    @op
    def upload(self, data: Any, offset: int = 0) -> Op[None]:
        """Write ``data`` (bytes, bytearray, memoryview or ndarray, any dtype) at byte ``offset``."""
        yield from self._write(_byte_source(data), int(offset))

    @op
    def download(self, nbytes: int | None = None, offset: int = 0) -> Op[bytes]:
        """``nbytes`` bytes (default: up to ``self.nbytes``) from byte ``offset``, as bytes."""
        np = _np()
        offset = int(offset)
        n = max(self.nbytes - offset, 0) if nbytes is None else int(nbytes)
        out = yield from self._read_into(np.empty(n, dtype=np.uint8), offset)
        return out.tobytes()

    @op
    def download_into(self, out: Any, offset: int = 0) -> Op[Any]:
        """Fill the writable, C-contiguous ndarray ``out`` from byte ``offset``; returns ``out``."""
        if not (out.flags.c_contiguous and out.flags.writeable):
            raise ValueError("download_into needs a writable C-contiguous array")
        return (yield from self._read_into(out, int(offset)))

    # -- residency and priority ---------------------------------------------------------------

    @op
    def residency(self) -> Op[Residency]:
        """QueryAllocationResidency of this allocation."""
        return (yield from _residency(self.device, [self]))[0]

    def _get_priority(self) -> Op[int]:
        args = s.d3dkmt_getallocationpriority()
        _, handles = _handles([self], self.device, "GetAllocationPriority")
        out = (ctypes.c_uint32 * 1)()
        args.device.v = self.device.handle
        args.allocation_list = ctypes.addressof(handles)
        args.allocation_count = 1
        args.priorities = ctypes.addressof(out)
        _check((yield call(t.D3DKMTGetAllocationPriority, args)), "GetAllocationPriority")
        return int(out[0])

    get_priority = op(_get_priority)

    def _set_priority(self, priority: int) -> Op[None]:
        yield from _set_priorities(self.device, [self], int(priority))

    set_priority = op(_set_priority)

    # -- GPU virtual addresses ----------------------------------------------------------------

    @op
    def map_gpu(self, queue: Any = None, *, va: int = 0, minimum: int = 0, maximum: int = 0,
                offset: int = 0, size: int | None = None, write: bool = True,
                execute: bool = False, wait: bool = True,
                timeout: float | None = DEFAULT_TIMEOUT) -> Op[Any]:
        """MapGpuVirtualAddress: map bytes ``offset`` .. ``offset + size`` (whole pages; default
        the rest of the allocation) at GPU virtual address ``va``, inside a range reserved with
        ``adapter.reserve_gpu_va`` (0: in fresh space the adapter chooses, between ``minimum``
        and ``maximum`` if given), through paging queue ``queue`` (default: the device's own).
        Returns a :class:`GpuMapping` (``int(m)`` is its address); with ``wait``, once the
        paging fence says the mapping is in place. The mapping ends with ``close()``, with the
        allocation, or with the reserved range it is in."""
        if self._closed:
            raise DxgError(NTSTATUS.STATUS_INVALID_HANDLE, f"MapGpuVirtualAddress: {self!r}")
        if offset % um.PAGE_SIZE:
            raise ValueError(f"offset {offset} is not a whole number of pages")
        length = self.size - offset if size is None else um.round_up(int(size))
        self._check_range(offset, length)
        if queue is None:
            queue = yield from self.device._default_queue()
        args = s.d3dddi_mapgpuvirtualaddress()
        args.paging_queue.v = queue.handle
        args.base_address = int(va)
        args.minimum_address = int(minimum)
        args.maximum_address = int(maximum)
        args.allocation.v = self.handle
        args.offset_in_pages = offset // um.PAGE_SIZE
        args.size_in_pages = length // um.PAGE_SIZE
        args.protection.write = int(write)
        args.protection.execute = int(execute)
        status = _check((yield call(t.D3DKMTMapGpuVirtualAddress, args)), "MapGpuVirtualAddress")
        address = int(args.virtual_address)
        mapping = _pick(self, GpuMapping, AsyncGpuMapping)(
            self, address, length, offset, int(args.paging_fence_value),
            self.device.adapter._va_range_at(address) if va else None, not va)
        with self._lock:
            self._gpu_mappings.append(mapping)
        if wait and status == _STATUS_PENDING:
            yield from queue._wait(mapping.paging_fence_value, timeout)
        return mapping

    def _untrack(self, mapping: _GpuMappingOps) -> None:
        with self._lock:
            if mapping in self._gpu_mappings:
                self._gpu_mappings.remove(mapping)

    @property
    def gpu_mappings(self) -> list[Any]:
        """The GPU mappings made through :meth:`map_gpu` that are still open."""
        with self._lock:
            return list(self._gpu_mappings)

    # -- closing ------------------------------------------------------------------------------

    def _forget(self) -> bool:
        """Mark closed (its GPU mappings too: they go with it), drop the map counts and
        untrack; False if it already was closed."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            self._maps = self._locks = self._address = 0
            mappings, self._gpu_mappings = self._gpu_mappings, []
        for mapping in mappings:
            mapping._mark_closed()
        self.device._untrack(self)
        return True

    def _close(self) -> Op[None]:
        """DestroyAllocation2 (which also ends its GPU mappings)."""
        if not self._forget() or self.conn.closed:
            return
        yield from _destroy(self.device, [self.handle])


class _ArrayOps(_AllocationOps):
    """An allocation that holds an array of ``shape`` and ``dtype`` (``device.empty``)."""

    def __init__(self, device: Any, handle: int, nbytes: int, size: int, flags: int,
                 shape: tuple[int, ...], dtype: Any) -> None:
        super().__init__(device, handle, nbytes, size, flags)
        self.shape = shape
        self.dtype = dtype

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return (f"<{type(self).__name__} handle=0x{self.handle:08x} shape={self.shape} "
                f"dtype={self.dtype}{state}>")

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def itemsize(self) -> int:
        return int(self.dtype.itemsize)

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d array")
        return self.shape[0]

    def map(self, dtype: Any = None, shape: int | Sequence[int] | None = None,
            offset: int = 0) -> Any:
        """Like :meth:`Allocation.map`, but the view is an ndarray of the array's shape and
        dtype unless others are given."""
        if dtype is None and shape is None and offset == 0:
            return self._mapping_type(self, self.dtype, self.shape, 0)
        return self._mapping_type(self, dtype, shape, offset)

    def _source(self, data: Any) -> Any:
        np = _np()
        arr = np.ascontiguousarray(data, dtype=self.dtype)
        if arr.shape != self.shape:
            if arr.size != math.prod(self.shape):
                raise ValueError(f"cannot upload an array of shape {arr.shape} to {self.shape}")
            arr = arr.reshape(self.shape)
        return arr.reshape(-1).view(np.uint8)

    @op
    def upload(self, data: Any, offset: int = 0) -> Op[None]:
        """Write ``data`` (an ndarray or anything NumPy makes one of, cast to the array's dtype,
        of its shape or at least its size) into the array. ``offset``: bytes, for raw writes."""
        np = _np()
        if offset or not isinstance(data, np.ndarray | list | tuple | int | float | complex):
            yield from self._write(_byte_source(data), int(offset))
        else:
            yield from self._write(self._source(data), 0)

    @op
    def download(self) -> Op[Any]:  # type: ignore[override]
        """A copy of the array: an ndarray of its shape and dtype."""
        np = _np()
        return (yield from self._read_into(np.empty(self.shape, dtype=self.dtype), 0))

    def to_numpy(self) -> Any:
        """The same as :meth:`download`."""
        return self.download()


# ---- maps ----------------------------------------------------------------------------------------


class _MapBase:
    """One map of an allocation: Lock2 on enter, the view, Unlock2 on exit."""

    def __init__(self, alloc: _AllocationOps, dtype: Any, shape: Any, offset: int) -> None:
        self.allocation = alloc
        self.dtype = dtype
        self.shape = shape
        self.offset = int(offset)
        self._held = False

    def _enter(self) -> Op[Any]:
        if self._held:
            raise RuntimeError("this map is already entered; call map() again to nest")
        address = yield from self.allocation._acquire()
        self._held = True
        try:
            return self.allocation._view(address, self.dtype, self.shape, self.offset)
        except BaseException:
            self._held = False
            yield from self.allocation._release()
            raise

    def _exit(self) -> Op[None]:
        if self._held:
            self._held = False
            yield from self.allocation._release()


class Mapping(_MapBase):
    """``with alloc.map() as view:`` (sync)."""

    def __enter__(self) -> Any:
        return self.allocation._run(self._enter())

    def __exit__(self, *exc: object) -> None:
        self.allocation._run(self._exit())


class AsyncMapping(_MapBase):
    """``async with alloc.map() as view:`` (asyncio)."""

    async def __aenter__(self) -> Any:
        return await self.allocation._run(self._enter())

    async def __aexit__(self, *exc: object) -> None:
        await self.allocation._run(self._exit())


# ---- paging queues -------------------------------------------------------------------------------


class _PagingQueueOps(_Object):
    """A paging queue of a device (D3DKMTCreatePagingQueue): residency changes and GPU mappings
    made through it complete in order, and its paging fence tells how far they are."""

    def __init__(self, device: Any, handle: int, sync_object: int, fence_address: int) -> None:
        super().__init__()
        self.device = device
        self.handle = handle
        self.sync_object = sync_object
        self.fence_address = fence_address

    def __repr__(self) -> str:
        return f"<{type(self).__name__} handle=0x{self.handle:08x}>"

    @property
    def conn(self) -> Any:
        return self.device.conn

    @property
    def fence_value(self) -> int:
        """The paging fence's current value, read from the page the node shares with this
        process (no call)."""
        with self._lock:
            if self._closed:
                raise DxgError(NTSTATUS.STATUS_INVALID_HANDLE, f"fence of {self!r}")
            if not self.fence_address:
                raise DxgError(NTSTATUS.STATUS_NOT_SUPPORTED, "the paging fence is not mapped")
            return int(ctypes.c_uint64.from_address(self.fence_address).value)

    def _wait(self, value: int, timeout: float | None = DEFAULT_TIMEOUT) -> Op[int]:
        """Wait until the paging fence reaches ``value``; its value then."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = _POLL_FIRST
        while True:
            current = self.fence_value
            if current >= value:
                return current
            if deadline is not None and time.monotonic() >= deadline:
                raise PagingTimeout(f"paging fence of {self!r} at {current}, waited for {value}")
            yield _sleep(pause)
            pause = min(pause * 2, _POLL_MAX)

    @op
    def wait(self, value: int, timeout: float | None = DEFAULT_TIMEOUT) -> Op[int]:
        """Wait (polling the shared fence page) until the paging fence reaches ``value``."""
        return (yield from self._wait(int(value), timeout))

    @op
    def make_resident(self, allocs: Iterable[Any], *, wait: bool = True,
                      timeout: float | None = DEFAULT_TIMEOUT) -> Op[int]:
        """MakeResident: the paging fence value that says they are resident; with ``wait``
        (default) the call returns once the fence has reached it."""
        return (yield from _make_resident(self, allocs, wait, timeout))

    @op
    def reclaim(self, allocs: Iterable[Any], *, wait: bool = True,
                timeout: float | None = DEFAULT_TIMEOUT) -> Op[list[ReclaimResult]]:
        """ReclaimAllocations2 through this queue: one :class:`ReclaimResult` per allocation."""
        return (yield from _reclaim(self, allocs, wait, timeout))

    def _close(self) -> Op[None]:
        args = s.d3dddi_destroypagingqueue()
        args.paging_queue.v = self.handle
        yield from close_child(self, t.D3DKMTDestroyPagingQueue, args, "DestroyPagingQueue")


# ---- GPU virtual addresses -----------------------------------------------------------------------


class _GpuVaRangeOps(_Object):
    """GPU virtual addresses ``va`` .. ``va + size`` reserved in this process's address space on
    an adapter (ReserveGpuVirtualAddress); ``close()`` frees them (FreeGpuVirtualAddress)."""

    def __init__(self, adapter: Any, va: int, size: int) -> None:
        super().__init__()
        self.adapter = adapter
        self.va = va
        self.size = size

    def __repr__(self) -> str:
        return f"<{type(self).__name__} 0x{self.va:x}+0x{self.size:x}>"

    def __int__(self) -> int:
        return self.va

    __index__ = __int__

    @property
    def end(self) -> int:
        return self.va + self.size

    @property
    def conn(self) -> Any:
        return self.adapter.conn

    def __contains__(self, va: int) -> bool:
        return self.va <= int(va) < self.va + self.size

    def _close(self) -> Op[None]:
        if not self._mark_closed():
            return
        self.adapter._untrack(self)
        if self.conn.closed:
            return
        yield from _free_va(self.adapter, self.va, self.size)


class _GpuMappingOps(_Object):
    """An allocation mapped at GPU virtual address ``va`` (``alloc.map_gpu``): ``size`` bytes of
    it from byte ``offset``, inside the reserved range ``va_range`` (None: fresh space of its
    own, ``implicit``). ``close()`` unmaps it: UpdateGpuVirtualAddress(UNMAP) inside a reserved
    range, FreeGpuVirtualAddress of its own space otherwise. Destroying the allocation or
    freeing the range ends it too."""

    def __init__(self, alloc: _AllocationOps, va: int, size: int, offset: int,
                 paging_fence_value: int, va_range: Any, implicit: bool) -> None:
        super().__init__()
        self.allocation = alloc
        self.va = va
        self.size = size
        self.offset = offset
        self.paging_fence_value = paging_fence_value
        self.va_range = va_range
        self.implicit = implicit

    def __repr__(self) -> str:
        return f"<{type(self).__name__} 0x{self.va:x}+0x{self.size:x} of {self.allocation!r}>"

    def __int__(self) -> int:
        return self.va

    __index__ = __int__

    @property
    def conn(self) -> Any:
        return self.allocation.conn

    def _close(self) -> Op[None]:
        if not self._mark_closed():
            return
        self.allocation._untrack(self)
        if self.conn.closed or (self.va_range is not None and self.va_range.closed):
            return  # its range was freed, and the mapping with it
        if self.implicit:
            yield from _free_va(self.allocation.device.adapter, self.va, self.size)
        else:
            yield from _unmap_va(self.allocation.device, self.va, self.size)


def _free_va(adapter: Any, va: int, size: int) -> Op[None]:
    args = s.d3dkmt_freegpuvirtualaddress()
    args.adapter.v = adapter.handle
    args.base_address = va
    args.size = size
    try:
        status = yield call(t.D3DKMTFreeGpuVirtualAddress, args)
    except NodeError:
        return
    _check(status, "FreeGpuVirtualAddress")


def _unmap_va(device: Any, va: int, size: int) -> Op[None]:
    """UpdateGpuVirtualAddress with one UNMAP operation (no context, no fence)."""
    operation = s.d3dddi_updategpuvirtualaddress_operation()
    operation.operation = _VA_UNMAP
    operation.unmap.base_address = va
    operation.unmap.size = size
    args = s.d3dkmt_updategpuvirtualaddress()
    args.device.v = device.handle
    args.num_operations = 1
    args.operations = ctypes.addressof(operation)
    try:
        status = yield call(t.D3DKMTUpdateGpuVirtualAddress, args)
    except NodeError:
        return
    _check(status, "UpdateGpuVirtualAddress")


# ---- the two flavors -----------------------------------------------------------------------------


class Allocation(_Sync, _AllocationOps):
    __doc__ = _AllocationOps.__doc__
    _mapping_type = Mapping

    @property
    def priority(self) -> int:
        """GetAllocationPriority / SetAllocationPriority (async: ``get_priority()`` /
        ``set_priority(p)``)."""
        return self.get_priority()

    @priority.setter
    def priority(self, value: int) -> None:
        self.set_priority(value)


class DeviceArray(Allocation, _ArrayOps):
    __doc__ = _ArrayOps.__doc__


class PagingQueue(_Sync, _PagingQueueOps):
    __doc__ = _PagingQueueOps.__doc__


class GpuVaRange(_Sync, _GpuVaRangeOps):
    __doc__ = _GpuVaRangeOps.__doc__


class GpuMapping(_Sync, _GpuMappingOps):
    __doc__ = _GpuMappingOps.__doc__


class AsyncAllocation(_Async, _AllocationOps):
    """An allocation on an asyncio connection (``async with alloc.map() as view``)."""

    _mapping_type = AsyncMapping


class AsyncDeviceArray(AsyncAllocation, _ArrayOps):
    """A device array on an asyncio connection."""


class AsyncPagingQueue(_Async, _PagingQueueOps):
    """A paging queue on an asyncio connection."""


class AsyncGpuVaRange(_Async, _GpuVaRangeOps):
    """A reserved GPU virtual address range on an asyncio connection."""


class AsyncGpuMapping(_Async, _GpuMappingOps):
    """A GPU mapping on an asyncio connection."""


# ---- device operations (the hooks of dxg.client.api.Device) --------------------------------------


def _create(device: Any, sizes: Sequence[int], flags: int, standard: bool) -> Op[list[tuple[
        int, int, int]]]:
    """CreateAllocation of one allocation per size: (handle, size, flags) of each, size and
    flags as the adapter reports them back in the private data."""
    if not sizes:
        raise ValueError("no allocations to create")
    if len(sizes) > um.CREATEALLOCATION_MAX:
        raise ValueError(f"at most {um.CREATEALLOCATION_MAX} allocations in one call")
    if any(n <= 0 for n in sizes):
        raise ValueError("an allocation needs a positive size")
    if flags & ~um.ALLOC_FLAGS:
        raise ValueError(f"unknown allocation flags 0x{flags:x}")
    count = len(sizes)
    infos = (s.d3dddi_allocationinfo2 * count)()
    args = s.d3dkmt_createallocation()
    args.device.v = device.handle
    args.alloc_count = count
    args.allocation_info = ctypes.addressof(infos)
    descs: list[Any] = []
    if standard:
        if count != 1 or flags:
            raise ValueError("a standard allocation is one allocation, with no flags")
        std = s.d3dkmt_createstandardallocation()
        std.type = _STANDARD_EXISTINGHEAP
        std.existing_heap_data.size = um.round_up(sizes[0])
        args.flags.standard_allocation = 1
        args.standard_allocation = ctypes.addressof(std)
    else:
        for i, n in enumerate(sizes):
            desc = (ctypes.c_ubyte * um.ALLOC_DESC.size).from_buffer_copy(
                um.AllocDesc(um.round_up(n), flags).pack())
            descs.append(desc)
            infos[i].priv_drv_data = ctypes.addressof(desc)
            infos[i].priv_drv_data_size = ctypes.sizeof(desc)
    _check((yield call(t.D3DKMTCreateAllocation, args)), "CreateAllocation")
    out = []
    for i, n in enumerate(sizes):
        size, got_flags = um.round_up(n), flags
        if descs:
            back = um.AllocDesc.unpack(bytes(descs[i]))
            if back is not None and back.size >= n:
                size, got_flags = back.size, back.flags
        out.append((int(infos[i].allocation.v), size, got_flags))
    return out


def _alloc_flags(non_local: bool, cached: bool) -> int:
    return (um.ALLOC_NONLOCAL if non_local else 0) | (um.ALLOC_CACHED if cached else 0)


def allocate(device: Any, nbytes: int, *, non_local: bool = False, cached: bool = False,
             standard: bool = False) -> Op[Any]:
    """``device.allocate``: one allocation of at least ``nbytes`` bytes."""
    nbytes = int(nbytes)
    ((handle, size, flags),) = yield from _create(
        device, [nbytes], _alloc_flags(non_local, cached), standard)
    alloc = _pick(device, Allocation, AsyncAllocation)(device, handle, nbytes, size, flags)
    return device._track_allocation(alloc)


def allocate_many(device: Any, sizes: Sequence[int], *, non_local: bool = False,
                  cached: bool = False) -> Op[list[Any]]:
    """``device.allocate_many``: one allocation per size, made in one CreateAllocation."""
    sizes = [int(n) for n in sizes]
    made = yield from _create(device, sizes, _alloc_flags(non_local, cached), False)
    kind = _pick(device, Allocation, AsyncAllocation)
    return [device._track_allocation(kind(device, h, n, size, flags))
            for n, (h, size, flags) in zip(sizes, made, strict=True)]


def empty(device: Any, shape: int | Sequence[int], dtype: Any = None, *,
          non_local: bool = False) -> Op[Any]:
    """``device.empty``: a :class:`DeviceArray` of ``shape`` and ``dtype`` (default float64, as
    NumPy's), contents undefined."""
    np = _np()
    dims = _shape_of(shape)
    dt = np.dtype(np.float64 if dtype is None else dtype)
    if dt.hasobject:
        raise TypeError("an array of Python objects cannot live on a device")
    nbytes = math.prod(dims) * dt.itemsize
    ((handle, size, flags),) = yield from _create(
        device, [max(nbytes, 1)], _alloc_flags(non_local, False), False)
    arr = _pick(device, DeviceArray, AsyncDeviceArray)(device, handle, nbytes, size, flags,
                                                       dims, dt)
    return device._track_allocation(arr)


def zeros(device: Any, shape: int | Sequence[int], dtype: Any = None, *,
          non_local: bool = False) -> Op[Any]:
    """``device.zeros``: like :func:`empty`, every element zero."""
    arr = yield from empty(device, shape, dtype, non_local=non_local)
    try:
        address = yield from arr._acquire()
        try:
            ctypes.memset(address, 0, arr.size)
        finally:
            yield from arr._release()
    except BaseException:
        yield from arr._close()
        raise
    return arr


def array(device: Any, data: Any, dtype: Any = None, *, non_local: bool = False) -> Op[Any]:
    """``device.array`` / ``device.from_numpy``: a :class:`DeviceArray` holding a copy of
    ``data`` (an ndarray, or anything NumPy makes one of)."""
    np = _np()
    src = np.ascontiguousarray(data, dtype=dtype)
    arr = yield from empty(device, src.shape, src.dtype, non_local=non_local)
    try:
        yield from arr._write(src.reshape(-1).view(np.uint8), 0)
    except BaseException:
        yield from arr._close()
        raise
    return arr


def paging_queue(device: Any, priority: int = 0) -> Op[Any]:
    """``device.paging_queue``: CreatePagingQueue (priority -1 below normal, 0 normal, 1 above)."""
    args = s.d3dkmt_createpagingqueue()
    args.device.v = device.handle
    args.priority = int(priority)
    _check((yield call(t.D3DKMTCreatePagingQueue, args)), "CreatePagingQueue")
    queue = _pick(device, PagingQueue, AsyncPagingQueue)(
        device, int(args.paging_queue.v), int(args.sync_object.v),
        int(args.fence_cpu_virtual_address))
    return device._track_queue(queue)


def _make_resident(queue: Any, allocs: Iterable[Any], wait: bool,
                   timeout: float | None) -> Op[int]:
    items, handles = _handles(allocs, queue.device, "MakeResident")
    args = s.d3dddi_makeresident()
    args.paging_queue.v = queue.handle
    args.alloc_count = len(items)
    args.allocation_list = ctypes.addressof(handles)
    status = _check((yield call(t.D3DKMTMakeResident, args)), "MakeResident")
    value = int(args.paging_fence_value)
    if wait and status == _STATUS_PENDING:
        yield from queue._wait(value, timeout)
    return value


def make_resident(device: Any, allocs: Iterable[Any], wait: bool = True,
                  timeout: float | None = DEFAULT_TIMEOUT) -> Op[int]:
    """``device.make_resident``: MakeResident through the device's own paging queue."""
    queue = yield from device._default_queue()
    return (yield from _make_resident(queue, allocs, wait, timeout))


def evict(device: Any, allocs: Iterable[Any], only_if_necessary: bool = False) -> Op[int]:
    """``device.evict``: Evict; the bytes the adapter says are left to trim."""
    items, handles = _handles(allocs, device, "Evict")
    args = s.d3dkmt_evict()
    args.device.v = device.handle
    args.alloc_count = len(items)
    args.allocations = ctypes.addressof(handles)
    args.flags.evict_only_if_necessary = int(only_if_necessary)
    _check((yield call(t.D3DKMTEvict, args)), "Evict")
    return int(args.num_bytes_to_trim)


def _residency(device: Any, allocs: Iterable[Any]) -> Op[list[Residency]]:
    items, handles = _handles(allocs, device, "QueryAllocationResidency")
    out = (ctypes.c_uint32 * len(items))()
    args = s.d3dkmt_queryallocationresidency()
    args.device.v = device.handle
    args.allocations = ctypes.addressof(handles)
    args.allocation_count = len(items)
    args.residency_status = ctypes.addressof(out)
    _check((yield call(t.D3DKMTQueryAllocationResidency, args)), "QueryAllocationResidency")
    result: list[Residency] = []
    for v in out:
        try:
            result.append(Residency(int(v)))
        except ValueError:
            result.append(int(v))  # type: ignore[arg-type]  # an adapter's own value
    return result


residency = _residency


def _set_priorities(device: Any, allocs: Iterable[Any], priority: int) -> Op[None]:
    items, handles = _handles(allocs, device, "SetAllocationPriority")
    prios = (ctypes.c_uint32 * len(items))(*([priority & 0xFFFFFFFF] * len(items)))
    args = s.d3dkmt_setallocationpriority()
    args.device.v = device.handle
    args.allocation_list = ctypes.addressof(handles)
    args.allocation_count = len(items)
    args.priorities = ctypes.addressof(prios)
    _check((yield call(t.D3DKMTSetAllocationPriority, args)), "SetAllocationPriority")


set_priority = _set_priorities


def offer(device: Any, allocs: Iterable[Any],
          priority: int = OfferPriority.NORMAL) -> Op[None]:
    """``device.offer``: OfferAllocations (their contents may be discarded until reclaimed)."""
    items, handles = _handles(allocs, device, "OfferAllocations")
    args = s.d3dkmt_offerallocations()
    args.device.v = device.handle
    args.allocations = ctypes.addressof(handles)
    args.allocation_count = len(items)
    args.priority = int(priority)
    _check((yield call(t.D3DKMTOfferAllocations, args)), "OfferAllocations")


def _reclaim(queue: Any, allocs: Iterable[Any], wait: bool,
             timeout: float | None) -> Op[list[ReclaimResult]]:
    items, handles = _handles(allocs, queue.device, "ReclaimAllocations2")
    results = (ctypes.c_uint32 * len(items))()
    args = s.d3dkmt_reclaimallocations2()
    args.paging_queue.v = queue.handle
    args.allocation_count = len(items)
    args.allocations = ctypes.addressof(handles)
    args.results = ctypes.addressof(results)
    status = _check((yield call(t.D3DKMTReclaimAllocations2, args)), "ReclaimAllocations2")
    if wait and status == _STATUS_PENDING:
        yield from queue._wait(int(args.paging_fence_value), timeout)
    out: list[ReclaimResult] = []
    for v in results:
        try:
            out.append(ReclaimResult(int(v)))
        except ValueError:
            out.append(int(v))  # type: ignore[arg-type]
    return out


def reclaim(device: Any, allocs: Iterable[Any], queue: Any = None, wait: bool = True,
            timeout: float | None = DEFAULT_TIMEOUT) -> Op[list[ReclaimResult]]:
    """``device.reclaim``: ReclaimAllocations2 through ``queue`` (default: the device's own)."""
    if queue is None:
        queue = yield from device._default_queue()
    return (yield from _reclaim(queue, allocs, wait, timeout))


def _destroy(device: Any, handles: Sequence[int]) -> Op[None]:
    """DestroyAllocation2 of ``handles`` (at most CREATEALLOCATION_MAX a call)."""
    failure: DxgError | None = None
    for at in range(0, len(handles), um.CREATEALLOCATION_MAX):
        chunk = handles[at : at + um.CREATEALLOCATION_MAX]
        arr = (ctypes.c_uint32 * len(chunk))(*chunk)
        args = s.d3dkmt_destroyallocation2()
        args.device.v = device.handle
        args.allocations = ctypes.addressof(arr)
        args.alloc_count = len(chunk)
        try:
            status = yield call(t.D3DKMTDestroyAllocation2, args)
        except NodeError:
            return  # the node is gone, and the allocations with it
        try:
            _check(status, "DestroyAllocation2")
        except DxgError as e:
            failure = failure or e
    if failure is not None:
        raise failure


def close_allocations(allocs: Sequence[Any]) -> Op[BaseException | None]:
    """Close a device's allocations on the way down: one DestroyAllocation2 for all. Like
    ``_close_children``: a DxgError is left to the device's own destruction; anything else (an
    interrupt) is returned for the caller to raise."""
    handles: list[int] = []
    device = None
    for a in allocs:
        if a._forget():
            handles.append(a.handle)
            device = a.device
    if device is None or device.conn.closed:
        return None
    try:
        yield from _destroy(device, handles)
    except DxgError:
        pass
    except GeneratorExit:
        raise
    except BaseException as e:
        return e
    return None


# ---- adapter operations (the hooks of dxg.client.api.Adapter) ------------------------------------


def video_memory_info(adapter: Any, group: int = um.GROUP_LOCAL) -> Op[VideoMemoryInfo]:
    """``adapter.video_memory_info``: QueryVideoMemoryInfo of this process."""
    args = s.d3dkmt_queryvideomemoryinfo()
    args.adapter.v = adapter.handle
    args.memory_segment_group = int(group)
    _check((yield call(t.D3DKMTQueryVideoMemoryInfo, args)), "QueryVideoMemoryInfo")
    return VideoMemoryInfo(int(args.budget), int(args.current_usage),
                           int(args.current_reservation), int(args.available_for_reservation))


def reserve_video_memory(adapter: Any, nbytes: int, group: int = um.GROUP_LOCAL) -> Op[None]:
    """``adapter.reserve_video_memory``: ChangeVideoMemoryReservation of this process to
    ``nbytes`` (it replaces the previous reservation; 0 gives it back)."""
    if nbytes < 0:
        raise ValueError("a reservation cannot be negative")
    args = s.d3dkmt_changevideomemoryreservation()
    args.adapter.v = adapter.handle
    args.memory_segment_group = int(group)
    args.reservation = int(nbytes)
    _check((yield call(t.D3DKMTChangeVideoMemoryReservation, args)),
           "ChangeVideoMemoryReservation")


def reserve_gpu_va(adapter: Any, size: int, base: int = 0, minimum: int = 0,
                   maximum: int = 0) -> Op[Any]:
    """``adapter.reserve_gpu_va``: ReserveGpuVirtualAddress of ``size`` bytes (whole pages) at
    ``base`` (0: anywhere between ``minimum`` and ``maximum``, when given)."""
    size = um.round_up(int(size))
    if size <= 0:
        raise ValueError("a GPU virtual address range needs a positive size")
    args = s.d3dddi_reservegpuvirtualaddress()
    args.adapter.v = adapter.handle
    args.base_address = int(base)
    args.minimum_address = int(minimum)
    args.maximum_address = int(maximum)
    args.size = size
    _check((yield call(t.D3DKMTReserveGpuVirtualAddress, args)), "ReserveGpuVirtualAddress")
    va_range = _pick(adapter, GpuVaRange, AsyncGpuVaRange)(adapter, int(args.virtual_address), size)
    return adapter._track_va(va_range)


def flush_heap_transitions(adapter: Any) -> Op[None]:
    """``adapter.flush_heap_transitions``: FlushHeapTransitions."""
    args = s.d3dkmt_flushheaptransitions()
    args.adapter.v = adapter.handle
    _check((yield call(t.D3DKMTFlushHeapTransitions, args)), "FlushHeapTransitions")

