"""Sharing between processes by descriptor, and sync files, through the node (docs/sharing.md),
sync and asyncio.

::

    import select, subprocess
    from dxg.client import open_node

    with open_node() as node, node.adapters()[0].create_device() as dev:
        res = dev.shared_resource([1 << 20])       # CreateAllocation, create_shared + NT sharing
        res.allocations[0].upload(b"hello")
        handle = res.share(read_only=True)         # ShareObjects: a descriptor of this process
        subprocess.run([...], pass_fds=[handle.fileno()])   # or SCM_RIGHTS on a socket
        #   ... and in the other process, given the descriptor number fd:
        #   other = dev.open_resource(fd)          # QueryResourceInfo + OpenResourceFromNtHandle
        #   with other.allocations[0].map() as view:   # the same memory (read-only here)
        #       print(bytes(view[:5]))
        fence = dev.shared_fence()                 # CreateSynchronizationObject2, shared
        fh = fence.share()                         # another process: dev.open_fence(fd)
        sf = fence.sync_file(5)                    # CreateSyncFile: readable once fence >= 5
        fence.signal(5)
        select.select([sf], [], [])

and on asyncio the same calls awaited (``await dev.open_resource(fd)``); the descriptors
(`SharedHandle`, `SyncFile`) are plain objects with ``fileno()`` on both.

A descriptor is this process's: ``close()`` closes it here (copies other processes hold stay
valid); the object shared lives while any process holds a handle of it or a copy of a share
descriptor. ``open_resource``/``open_fence`` take a `SharedHandle` or a descriptor number (the
node says which access the descriptor grants: ``read_only`` is right either way). An allocation
of a resource opened from a read-only share maps read-only (its views are not writable,
``upload`` raises DxgError(STATUS_ACCESS_DENIED)), and a fence opened so cannot be signalled
(STATUS_ACCESS_DENIED). Resources are closed with their device (before its
allocations); closing one destroys its handle in this process only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
from collections.abc import Sequence
from typing import Any

from dxg.client import thunks as t
from dxg.client.api import _Async, _Object, _Sync
from dxg.client.drive import Op, call, op
from dxg.client.errors import DxgError, NodeError, check_status
from dxg.client.memory import Allocation, AsyncAllocation, _alloc_flags, _pick
from dxg.uapi import memory as um
from dxg.uapi import structs as s
from dxg.uapi.access import GENERIC_ALL, GENERIC_READ, OPENED_READ_ONLY
from dxg.uapi.ntstatus import NTSTATUS

__all__ = [
    "AsyncResource",
    "AsyncResourceAllocation",
    "Resource",
    "ResourceAllocation",
    "SharedHandle",
    "SyncFile",
    "create_sync_file",
    "open_fence",
    "open_resource",
    "open_sync_file",
    "share_object",
    "shared_resource",
    "wait_sync_file",
]

_check = check_status


# ---- descriptors ---------------------------------------------------------------------------------


class _Descriptor:
    """A descriptor this process owns (closed by ``close()``, ``with``, or when collected)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError(f"{self!r} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def detach(self) -> int:
        """The descriptor, now the caller's to close."""
        fd, self._fd = self._fd, -1
        return fd

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class SharedHandle(_Descriptor):
    """A share descriptor (ShareObjects): hand it to another process, which opens the object
    with ``device.open_resource`` or ``device.open_fence``. ``read_only``: holders cannot write
    (a resource) or signal (a fence) through it."""

    def __init__(self, fd: int, kind: str, read_only: bool) -> None:
        super().__init__(fd)
        self.kind = kind  # "resource" or "fence"
        self.read_only = read_only

    def __repr__(self) -> str:
        access = "read-only" if self.read_only else "read-write"
        return f"<SharedHandle {self.kind} fd={self._fd} {access}>"


class SyncFile(_Descriptor):
    """A sync file (CreateSyncFile): readable (poll, select, epoll, ``loop.add_reader``), for
    good, once its fence reached ``value`` (or its wait failed: ``status()`` tells which). Pass
    it to another process like any descriptor; with a shared fence, that process can
    ``device.open_sync_file`` it or make a context wait for it (``context.wait_sync_file``)."""

    PENDING, SIGNALED, ERROR = 0, 1, -1  # what ``status()`` answers (as Linux's sync_file_info)

    def __init__(self, fd: int, value: int) -> None:
        super().__init__(fd)
        self.value = value

    def __repr__(self) -> str:
        return f"<SyncFile fd={self._fd} value={self.value}>"

    def ready(self) -> bool:
        """Whether it is readable now."""
        return bool(select.select([self.fileno()], [], [], 0)[0])

    def wait(self, timeout: float | None = None) -> bool:
        """Until it is readable (True), or ``timeout`` seconds (False). Blocks this thread: on
        asyncio, use ``loop.add_reader(sf.fileno(), ...)`` instead."""
        return bool(select.select([self.fileno()], [], [], timeout)[0])

    def status(self) -> int:
        """``SyncFile.PENDING`` (0) while the fence has not reached the value, ``SIGNALED``
        (1) once it has, ``ERROR`` (-1) when its wait failed (the fence, its device or adapter
        went; end of file: the node went). Reads one of the bytes the node keeps in it (it
        keeps them there: others still find them)."""
        fd = self.fileno()
        for patience in (0.0, 1.0):  # (then: the moment the node takes to refill it)
            if not select.select([fd], [], [], patience)[0]:
                return self.PENDING
            try:
                byte = os.read(fd, 1)
            except BlockingIOError:  # another holder took the last byte: the node refills it
                continue
            return self.SIGNALED if byte == b"\x01" else self.ERROR
        return self.PENDING


def _fd_of(handle: Any) -> int:
    """A descriptor number from a SharedHandle, a SyncFile or an int."""
    if isinstance(handle, _Descriptor):
        return handle.fileno()
    fd = int(handle)
    if fd < 0:
        raise ValueError(f"bad descriptor {fd}")
    return fd


# ---- resources -----------------------------------------------------------------------------------


class _InResource:
    """An allocation of a resource: it goes with the resource (closing it alone only forgets
    it here)."""

    _forget: Any

    def _close(self) -> Op[None]:
        self._forget()
        return
        yield  # pragma: no cover - makes this a generator


class ResourceAllocation(_InResource, Allocation):
    """An allocation of a :class:`Resource` (map, upload, download, map_gpu...)."""


class AsyncResourceAllocation(_InResource, AsyncAllocation):
    """An allocation of an :class:`AsyncResource`."""


class _ResourceOps(_Object):
    """A resource of a device holding ``allocations``: one made shared
    (``device.shared_resource``) or opened from a share descriptor (``device.open_resource``:
    ``opened``; its private data as the creator passed them are ``runtime_data`` and
    ``priv_drv_data``). ``close()`` destroys this process's handle of it."""

    def __init__(self, device: Any, handle: int, allocations: list[Any], opened: bool,
                 read_only: bool, runtime_data: bytes = b"", priv_drv_data: bytes = b"") -> None:
        super().__init__()
        self.device = device
        self.handle = handle
        self.allocations = allocations
        self.opened = opened
        self.read_only = read_only  # (for an opened one: what the share handed said, if known)
        self.runtime_data = runtime_data
        self.priv_drv_data = priv_drv_data

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return (f"<{type(self).__name__} handle=0x{self.handle:08x} "
                f"allocations={len(self.allocations)}{state}>")

    @property
    def conn(self) -> Any:
        return self.device.conn

    @op
    def share(self, read_only: bool = False) -> Op[SharedHandle]:
        """ShareObjects: a :class:`SharedHandle` another process opens the resource with;
        ``read_only``: it cannot write the memory (neither the CPU nor its GPU work)."""
        return (yield from share_object(self, read_only))

    def _close(self) -> Op[None]:
        """DestroyAllocation2 of the resource (its allocations go with it)."""
        if not self._mark_closed():
            return
        for a in self.allocations:
            a._forget()
        self.device._untrack(self)
        if self.conn.closed:
            return
        args = s.d3dkmt_destroyallocation2()
        args.device.v = self.device.handle
        args.resource.v = self.handle
        try:
            status = yield call(t.D3DKMTDestroyAllocation2, args)
        except NodeError:
            return  # the node is gone, and the resource with it
        _check(status, "DestroyAllocation2")


class Resource(_Sync, _ResourceOps):
    __doc__ = _ResourceOps.__doc__


class AsyncResource(_Async, _ResourceOps):
    """A resource on an asyncio connection."""


def _make(device: Any, handle: int, infos: Sequence[tuple[int, int, int]], opened: bool,
          read_only: bool, runtime: bytes = b"", priv: bytes = b"") -> Any:
    kind = _pick(device, ResourceAllocation, AsyncResourceAllocation)
    allocs = [kind(device, h, size, size, flags) for h, size, flags in infos]
    if read_only:
        for a in allocs:
            a.read_only = True
    res = _pick(device, Resource, AsyncResource)(device, handle, allocs, opened, read_only,
                                                 runtime, priv)
    return device._track_resource(res)


def _desc_of(priv: bytes) -> tuple[int, int]:
    """(size, ALLOC_* flags) from an allocation's private data (a pydxg AllocDesc)."""
    desc = um.AllocDesc.unpack(priv)
    if desc is None:
        raise DxgError(NTSTATUS.STATUS_INVALID_PARAMETER, "an allocation without its size")
    return um.round_up(desc.size), desc.flags


def shared_resource(device: Any, sizes: Sequence[int] | int, *, non_local: bool = False,
                    cached: bool = False) -> Op[Any]:
    """``device.shared_resource``: CreateAllocation of a resource (one allocation per size)
    made ``create_shared | nt_security_sharing``: each allocation in memory of its own."""
    sizes = [int(sizes)] if isinstance(sizes, int) else [int(n) for n in sizes]
    if not sizes or len(sizes) > um.CREATEALLOCATION_MAX or any(n <= 0 for n in sizes):
        raise ValueError(f"1..{um.CREATEALLOCATION_MAX} allocations of positive sizes")
    flags = _alloc_flags(non_local, cached)
    count = len(sizes)
    infos = (s.d3dddi_allocationinfo2 * count)()
    descs = []
    for i, n in enumerate(sizes):
        desc = (ctypes.c_ubyte * um.ALLOC_DESC.size).from_buffer_copy(
            um.AllocDesc(um.round_up(n), flags).pack())
        descs.append(desc)
        infos[i].priv_drv_data = ctypes.addressof(desc)
        infos[i].priv_drv_data_size = ctypes.sizeof(desc)
    args = s.d3dkmt_createallocation()
    args.device.v = device.handle
    args.alloc_count = count
    args.allocation_info = ctypes.addressof(infos)
    args.flags.create_resource = 1
    args.flags.create_shared = 1
    args.flags.nt_security_sharing = 1
    _check((yield call(t.D3DKMTCreateAllocation, args)), "CreateAllocation (shared)")
    made = [(int(infos[i].allocation.v), *_desc_of(bytes(descs[i]))) for i in range(count)]
    return _make(device, int(args.resource.v), made, False, False)


def open_resource(device: Any, handle: Any) -> Op[Any]:
    """``device.open_resource``: QueryResourceInfoFromNtHandle, then OpenResourceFromNtHandle
    of the share descriptor ``handle`` (a SharedHandle or a descriptor number)."""
    fd = _fd_of(handle)
    query = s.d3dkmt_queryresourceinfofromnthandle()
    query.device.v = device.handle
    query.nt_handle = fd
    _check((yield call(t.D3DKMTQueryResourceInfoFromNtHandle, query)),
           "QueryResourceInfoFromNtHandle")
    count = int(query.allocation_count)
    infos = (s.d3dddi_openallocationinfo2 * count)()
    runtime = (ctypes.c_ubyte * max(1, query.private_runtime_data_size))()
    priv = (ctypes.c_ubyte * max(1, query.resource_priv_drv_data_size))()
    total = (ctypes.c_ubyte * max(1, query.total_priv_drv_data_size))()
    args = s.d3dkmt_openresourcefromnthandle()
    args.device.v = device.handle
    args.nt_handle = fd
    args.allocation_count = count
    args.open_alloc_info = ctypes.addressof(infos)
    args.private_runtime_data_size = query.private_runtime_data_size
    args.private_runtime_data = ctypes.addressof(runtime)
    args.resource_priv_drv_data_size = query.resource_priv_drv_data_size
    args.resource_priv_drv_data = ctypes.addressof(priv)
    args.total_priv_drv_data_size = query.total_priv_drv_data_size
    args.total_priv_drv_data = ctypes.addressof(total)
    _check((yield call(t.D3DKMTOpenResourceFromNtHandle, args)), "OpenResourceFromNtHandle")
    base = ctypes.addressof(total)
    made = []
    for info in infos:
        at = int(info.priv_drv_data) - base if info.priv_drv_data else 0
        blob = bytes(total)[at : at + int(info.priv_drv_data_size)]
        made.append((int(info.allocation.v), *_desc_of(blob)))
    # what the node says the descriptor granted (pydxg: ``reserved``), whatever we were told
    read_only = bool(int(args.reserved) & OPENED_READ_ONLY) or bool(
        getattr(handle, "read_only", False))
    return _make(device, int(args.resource.v), made, True, read_only,
                 bytes(runtime)[: args.private_runtime_data_size],
                 bytes(priv)[: args.resource_priv_drv_data_size])


# ---- sharing -------------------------------------------------------------------------------------


def share_object(obj: Any, read_only: bool = False) -> Op[SharedHandle]:
    """ShareObjects of a shared resource or fence: a :class:`SharedHandle`. ``read_only`` asks
    for GENERIC_READ only; else GENERIC_ALL (a process can share onward at most what it has)."""
    if obj.closed:
        raise DxgError(NTSTATUS.STATUS_INVALID_HANDLE, f"ShareObjects: {obj!r} is closed")
    handles = (ctypes.c_uint32 * 1)(obj.handle)
    out = ctypes.c_uint64(0)
    args = s.d3dkmt_shareobjects()
    args.object_count = 1
    args.objects = ctypes.addressof(handles)
    args.desired_access = GENERIC_READ if read_only else GENERIC_ALL
    args.shared_handle = ctypes.addressof(out)
    _check((yield call(t.D3DKMTShareObjects, args)), "ShareObjects")
    kind = "resource" if isinstance(obj, _ResourceOps) else "fence"
    return SharedHandle(int(out.value), kind, read_only or bool(getattr(obj, "read_only", 0)))


def open_fence(device: Any, handle: Any, read_only: bool = False) -> Op[Any]:
    """``device.open_fence``: OpenSyncObjectFromNtHandle2 of the share descriptor ``handle``: a
    ``sync.Fence`` of this device (its value read from the shared page); ``read_only`` (or a
    read-only share): it cannot be signalled through this handle."""
    from dxg.client.sync import AsyncFence, Fence

    fd = _fd_of(handle)
    ro = read_only or bool(getattr(handle, "read_only", False))
    args = s.d3dkmt_opensyncobjectfromnthandle2()
    args.nt_handle = fd
    args.device.v = device.handle
    args.flags.no_signal = int(ro)
    _check((yield call(t.D3DKMTOpenSyncObjectFromNtHandle2, args)),
           "OpenSyncObjectFromNtHandle2")
    ro = ro or bool(args.flags.no_signal)  # (pydxg: set when the share grants no signal)
    fence = _pick(device, Fence, AsyncFence)(
        device, int(args.sync_object.v), int(args.monitored_fence.fence_value_cpu_va),
        shared=True, read_only=ro)
    return device._track_fence(fence)


# ---- sync files ----------------------------------------------------------------------------------


def create_sync_file(fence: Any, value: int) -> Op[SyncFile]:
    """``fence.sync_file``: CreateSyncFile."""
    fence._live()
    args = s.d3dkmt_createsyncfile()
    args.device.v = fence.device.handle
    args.monitored_fence.v = fence.handle
    args.fence_value = int(value)
    _check((yield call(t.D3DKMTCreateSyncFile, args)), "CreateSyncFile")
    return SyncFile(int(args.sync_file_handle), int(value))


def open_sync_file(device: Any, sync_file: Any) -> Op[tuple[Any, int]]:
    """``device.open_sync_file``: OpenSyncObjectFromSyncFile: (the sync file's fence as a
    read-only ``sync.Fence`` of this device, the value it stands for). Its fence must be
    shared (else DxgError(STATUS_INVALID_PARAMETER))."""
    from dxg.client.sync import AsyncFence, Fence

    args = s.d3dkmt_opensyncobjectfromsyncfile()
    args.sync_file_handle = _fd_of(sync_file)
    args.device.v = device.handle
    _check((yield call(t.D3DKMTOpenSyncObjectFromSyncFile, args)), "OpenSyncObjectFromSyncFile")
    fence = _pick(device, Fence, AsyncFence)(
        device, int(args.syncobj.v), int(args.fence_value_cpu_va), shared=True, read_only=True)
    return device._track_fence(fence), int(args.fence_value)


def wait_sync_file(context: Any, sync_file: Any) -> Op[None]:
    """``context.wait_sync_file``: WaitSyncFile: the context's later GPU work waits for the sync
    file's (shared) fence to reach its value."""
    args = s.d3dkmt_waitsyncfile()
    args.sync_file_handle = _fd_of(sync_file)
    args.context.v = context.handle
    _check((yield call(t.D3DKMTWaitSyncFile, args)), "WaitSyncFile")
