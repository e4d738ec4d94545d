"""Synchronization objects through the node: monitored fences (signal and wait from the CPU,
value read from a shared page with no call, eventfds that become readable), waits on several
fences at once, the legacy kinds and GPU-side signals and waits, sync and asyncio.

::

    from dxg.client import open_node, wait_all
    from dxg.uapi.ntstatus import NTSTATUS

    with open_node() as node, node.adapters()[0].create_device() as dev:
        with dev.fence() as f:                      # CreateSynchronizationObject2 (monitored)
            f.signal(5)                              # SignalSynchronizationObjectFromCpu
            assert f.value == 5                      # read from the mapped page: no call
            assert f.wait(5) == NTSTATUS.STATUS_SUCCESS
            assert f.wait(6, timeout=0.1) == NTSTATUS.STATUS_TIMEOUT
            fd = f.eventfd_wait(6)                   # an eventfd, readable once f reaches 6
            g = dev.fence()
            wait_all([(f, 5), (g, 0)], timeout=1.0)  # both; wait_any: one of them

and on asyncio (``open_node_async``) the same calls awaited (``await f.wait(6, timeout=1)``);
``value`` is a plain property on both.

Waits. ``wait`` is WaitForSynchronizationObjectFromCpu, which blocks in the driver (only this
caller: the process's other threads and calls go on) until the fence reaches the value. The
D3DKMT call has no timeout; ``timeout`` is this library's: at the deadline the call is cancelled
(the node's CANCEL: the driver unregisters the wait's host event and withdraws the wait on the
host) and the wait returns ``STATUS_TIMEOUT`` (0x102, a success code, as the D3DKMT wait
functions report a timeout). ``STATUS_SUCCESS`` (0) means reached; a wait whose values the
fence pages show already returns it at once, without a call. A wait whose fence is
destroyed fails with DxgError(STATUS_INVALID_HANDLE); one whose device is destroyed or whose
adapter is removed with DxgError(STATUS_DEVICE_REMOVED). ``eventfd_wait`` arms the asynchronous
form: the eventfd (this process's; close it when done) is written once when the wait is over
(also when it fails: check the fence then); poll it with select/poll/epoll or an event loop.

Closing. ``close()`` destroys the object (DestroySynchronizationObject); closing a device closes
its fences first. Waiting after close raises DxgError(STATUS_INVALID_HANDLE).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
from collections.abc import Iterable, Sequence
from typing import Any

from dxg.client import thunks as t
from dxg.client.aio import AsyncNodeConnection
from dxg.client.api import _Async, _Object, _Sync, close_child
from dxg.client.drive import AsyncRunner, Op, Step, call, op
from dxg.client.errors import DxgError, check_status
from dxg.uapi import ioctls as io
from dxg.uapi import structs as s
from dxg.uapi.ntstatus import NTSTATUS, ioctl_result_to_ntstatus

__all__ = [
    "AsyncFence",
    "AsyncSyncObject",
    "Fence",
    "SyncKind",
    "SyncObject",
    "create_fence",
    "create_sync_object",
    "signal_from_gpu",
    "wait_all",
    "wait_any",
    "wait_from_gpu",
]

_check = check_status
STATUS_SUCCESS = NTSTATUS.STATUS_SUCCESS
STATUS_TIMEOUT = NTSTATUS.STATUS_TIMEOUT
MAX_OBJECT_WAITED_ON = 32  # D3DDDI_MAX_OBJECT_WAITED_ON
_ALLOW_FENCE_REWIND = 1 << 2  # d3dddicb_signalflags.allow_fence_rewind
_WAIT_ANY = 1


class SyncKind:
    """``d3dddi_synchronizationobject_type``."""

    MUTEX = 1
    SEMAPHORE = 2
    FENCE = 3
    CPU_NOTIFICATION = 4
    MONITORED_FENCE = 5


def _pick(owner: Any, sync_type: type, async_type: type) -> type:
    return async_type if isinstance(owner, AsyncRunner) else sync_type


def _ioctl(code: int, args: Any, fds: Sequence[int] = (), timeout: float | None = None) -> Step:
    """The ioctl as a step, its result as libdxg's NTSTATUS; past ``timeout`` the call is
    cancelled and the step raises TimeoutError."""

    def step(conn: Any) -> Any:
        if isinstance(conn, AsyncNodeConnection):
            async def run() -> int:
                pending = conn.ioctl(code, args, fds)
                ret = await (pending if timeout is None
                             else asyncio.wait_for(pending, max(0.0, timeout)))
                return ioctl_result_to_ntstatus(ret)

            return run()
        return ioctl_result_to_ntstatus(conn.ioctl(code, args, fds, timeout=timeout))

    return step


# ---- objects -------------------------------------------------------------------------------------


class _SyncObjectOps(_Object):
    """A synchronization object of a device (CreateSynchronizationObject2), destroyed by
    ``close()``. ``kind`` is a :class:`SyncKind`."""

    def __init__(self, device: Any, handle: int, kind: int) -> None:
        super().__init__()
        self.device = device
        self.handle = handle
        self.kind = kind

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<{type(self).__name__} handle=0x{self.handle:08x} kind={self.kind}{state}>"

    @property
    def conn(self) -> Any:
        return self.device.conn

    def _live(self) -> None:
        if self._closed:
            raise DxgError(NTSTATUS.STATUS_INVALID_HANDLE, f"{self!r} is closed")

    def _close(self) -> Op[None]:
        args = s.d3dkmt_destroysynchronizationobject()
        args.sync_object.v = self.handle
        yield from close_child(self, t.D3DKMTDestroySynchronizationObject, args,
                               "DestroySynchronizationObject")


class _FenceOps(_SyncObjectOps):
    """A monitored fence: a u64 that rises (``signal``), read from a page this process maps
    (``value``, no call), waited on from the CPU (``wait``, ``eventfd_wait``)."""

    def __init__(self, device: Any, handle: int, address: int, *, shared: bool = False,
                 read_only: bool = False) -> None:
        super().__init__(device, handle, SyncKind.MONITORED_FENCE)
        self.address = address  # where the value is in this process (0: not mapped)
        self.shared = shared  # shared by descriptor (``device.shared_fence``, or opened)
        self.read_only = read_only  # opened without the right to signal it

    @property
    def value(self) -> int:
        """The fence's current value, read from the page the node shares with this process."""
        with self._lock:
            self._live()
            if not self.address:
                raise DxgError(NTSTATUS.STATUS_NOT_SUPPORTED, "the fence page is not mapped")
            return int(ctypes.c_uint64.from_address(self.address).value)

    @op
    def signal(self, value: int, *, rewind: bool = False) -> Op[None]:
        """SignalSynchronizationObjectFromCpu: the fence takes ``value`` (never lower unless
        ``rewind``); the page shows it when this returns."""
        self._live()
        handles = (ctypes.c_uint32 * 1)(self.handle)
        values = (ctypes.c_uint64 * 1)(int(value))
        args = s.d3dkmt_signalsynchronizationobjectfromcpu()
        args.device.v = self.device.handle
        args.object_count = 1
        args.objects = ctypes.addressof(handles)
        args.fence_values = ctypes.addressof(values)
        args.flags.value = _ALLOW_FENCE_REWIND if rewind else 0
        _check((yield call(t.D3DKMTSignalSynchronizationObjectFromCpu, args)),
               "SignalSynchronizationObjectFromCpu")

    @op
    def wait(self, value: int, timeout: float | None = None) -> Op[int]:
        """Until the fence reaches ``value``: STATUS_SUCCESS, or STATUS_TIMEOUT after
        ``timeout`` seconds (None: no limit)."""
        return (yield from _wait([(self, value)], False, timeout))

    @op
    def eventfd_wait(self, value: int) -> Op[int]:
        """An eventfd (this process's, non-blocking, close-on-exec) that becomes readable once
        the fence reaches ``value``."""
        return (yield from _eventfd_wait([(self, value)], False))

    # -- sharing (dxg.client.share) --

    @op
    def share(self, read_only: bool = False) -> Op[Any]:
        """ShareObjects: a ``share.SharedHandle`` (a descriptor: pass it to another process,
        which opens the fence with ``device.open_fence``); ``read_only``: the opener cannot
        signal it. The fence must be made shared (``device.shared_fence``)."""
        from dxg.client import share

        return (yield from share.share_object(self, read_only))

    @op
    def sync_file(self, value: int) -> Op[Any]:
        """CreateSyncFile: a ``share.SyncFile`` (pollable: ``fileno()``) that becomes readable,
        for good, once the fence reaches ``value``."""
        from dxg.client import share

        return (yield from share.create_sync_file(self, value))


class SyncObject(_Sync, _SyncObjectOps):
    __doc__ = _SyncObjectOps.__doc__


class Fence(_Sync, _FenceOps):
    __doc__ = _FenceOps.__doc__


class AsyncSyncObject(_Async, _SyncObjectOps):
    """A synchronization object on an asyncio connection."""


class AsyncFence(_Async, _FenceOps):
    """A monitored fence on an asyncio connection (``value`` is a plain property)."""


# ---- waits ---------------------------------------------------------------------------------------


def _pairs(pairs: Iterable[tuple[Any, int]]) -> list[tuple[Any, int]]:
    items = [(f, int(v)) for f, v in pairs]
    if not items:
        raise ValueError("nothing to wait on")
    if len(items) > MAX_OBJECT_WAITED_ON:
        raise ValueError(f"at most {MAX_OBJECT_WAITED_ON} fences in one wait")
    device = items[0][0].device
    for f, _ in items:
        if not isinstance(f, _FenceOps):
            raise TypeError(f"expected fences, got {type(f).__name__}")
        if f.device.adapter is not device.adapter:
            raise ValueError("the fences of one wait must be on one adapter")
        f._live()
    return items


def _wait_args(items: list[tuple[Any, int]], wait_any: bool) -> tuple[Any, Any, Any]:
    handles = (ctypes.c_uint32 * len(items))(*(f.handle for f, _ in items))
    values = (ctypes.c_uint64 * len(items))(*(v for _, v in items))
    args = s.d3dkmt_waitforsynchronizationobjectfromcpu()
    args.device.v = items[0][0].device.handle
    args.object_count = len(items)
    args.objects = ctypes.addressof(handles)
    args.fence_values = ctypes.addressof(values)
    args.flags.value = _WAIT_ANY if wait_any else 0
    return args, handles, values


def _reached(items: list[tuple[Any, int]], wait_any: bool) -> bool:
    """Whether the pages already show the wait is over (no call needed then)."""
    if not all(f.address for f, _ in items):
        return False
    seen = (f.value >= v for f, v in items)
    return any(seen) if wait_any else all(seen)


def _wait(pairs: Iterable[tuple[Any, int]], wait_any: bool, timeout: float | None) -> Op[int]:
    items = _pairs(pairs)
    if _reached(items, wait_any):
        return STATUS_SUCCESS
    args, _handles, _values = _wait_args(items, wait_any)
    try:
        status = yield _ioctl(io.LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU, args,
                              timeout=timeout)
    except TimeoutError:
        return STATUS_TIMEOUT
    _check(status, "WaitForSynchronizationObjectFromCpu")
    return status


def _eventfd_wait(pairs: Iterable[tuple[Any, int]], wait_any: bool) -> Op[int]:
    items = _pairs(pairs)
    args, _handles, _values = _wait_args(items, wait_any)
    fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    args.async_event = fd
    try:
        status = yield _ioctl(io.LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU, args, (fd,))
        _check(status, "WaitForSynchronizationObjectFromCpu")
    except BaseException:
        os.close(fd)
        raise
    return fd


def wait_all(pairs: Iterable[tuple[Any, int]], timeout: float | None = None) -> Any:
    """Until every ``(fence, value)`` is reached (at most 32 fences, one adapter):
    STATUS_SUCCESS or STATUS_TIMEOUT; with async fences, a coroutine of it."""
    items = list(pairs)
    if not items:
        raise ValueError("nothing to wait on")
    return items[0][0]._run(_wait(items, False, timeout))


def wait_any(pairs: Iterable[tuple[Any, int]], timeout: float | None = None) -> Any:
    """Until one ``(fence, value)`` is reached: STATUS_SUCCESS or STATUS_TIMEOUT (then read the
    fences' values to see which); with async fences, a coroutine of it."""
    items = list(pairs)
    if not items:
        raise ValueError("nothing to wait on")
    return items[0][0]._run(_wait(items, True, timeout))


# ---- GPU timelines -------------------------------------------------------------------------------


def _gpu_objects(pairs: Iterable[tuple[Any, int]], context: Any) -> tuple[Any, Any, int]:
    items = [(o, int(v)) for o, v in pairs]
    if not items:
        raise ValueError("no objects")
    for o, _ in items:
        if not isinstance(o, _SyncObjectOps):
            raise TypeError(f"expected sync objects, got {type(o).__name__}")
        if o.device.adapter is not context.device.adapter:
            raise ValueError("the objects must be on the context's adapter")
        o._live()
    handles = (ctypes.c_uint32 * len(items))(*(o.handle for o, _ in items))
    values = (ctypes.c_uint64 * len(items))(*(v for _, v in items))
    return handles, values, len(items)


def _signal_gpu(context: Any, pairs: Iterable[tuple[Any, int]]) -> Op[None]:
    handles, values, n = _gpu_objects(pairs, context)
    args = s.d3dkmt_signalsynchronizationobjectfromgpu()
    args.context.v = context.handle
    args.object_count = n
    args.objects = ctypes.addressof(handles)
    args.monitored_fence_values = ctypes.addressof(values)
    _check((yield call(t.D3DKMTSignalSynchronizationObjectFromGpu, args)),
           "SignalSynchronizationObjectFromGpu")


def _wait_gpu(context: Any, pairs: Iterable[tuple[Any, int]]) -> Op[None]:
    handles, values, n = _gpu_objects(pairs, context)
    args = s.d3dkmt_waitforsynchronizationobjectfromgpu()
    args.context.v = context.handle
    args.object_count = n
    args.objects = ctypes.addressof(handles)
    args.monitored_fence_values = ctypes.addressof(values)
    _check((yield call(t.D3DKMTWaitForSynchronizationObjectFromGpu, args)),
           "WaitForSynchronizationObjectFromGpu")


def signal_from_gpu(context: Any, pairs: Iterable[tuple[Any, int]]) -> Any:
    """SignalSynchronizationObjectFromGpu: each ``(fence, value)`` is signalled once the work
    ``context`` queued before is done (at once when it has none); a coroutine with an async
    context."""
    return context._run(_signal_gpu(context, pairs))


def wait_from_gpu(context: Any, pairs: Iterable[tuple[Any, int]]) -> Any:
    """WaitForSynchronizationObjectFromGpu: the context's later GPU work (and signals) waits
    until each ``(fence, value)`` is reached; a coroutine with an async context."""
    return context._run(_wait_gpu(context, pairs))


# ---- creation (the hooks of dxg.client.api.Device) -----------------------------------------------


def create_fence(device: Any, initial: int = 0, shared: bool = False) -> Op[Any]:
    """``device.fence``: a monitored fence starting at ``initial``; ``shared``
    (``device.shared_fence``): shared by descriptor (``fence.share()``)."""
    args = s.d3dkmt_createsynchronizationobject2()
    args.device.v = device.handle
    args.info.type = SyncKind.MONITORED_FENCE
    args.info.monitored_fence.initial_fence_value = int(initial)
    if shared:
        args.info.flags.shared = 1
        args.info.flags.nt_security_sharing = 1
    _check((yield call(t.D3DKMTCreateSynchronizationObject2, args)),
           "CreateSynchronizationObject2")
    fence = _pick(device, Fence, AsyncFence)(
        device, int(args.sync_object.v), int(args.info.monitored_fence.fence_cpu_virtual_address),
        shared=shared)
    return device._track_fence(fence)


def create_sync_object(device: Any, kind: int, *, initial: int = 0, max_count: int = 1,
                       eventfd: int = -1) -> Op[Any]:
    """``device.sync_object``: a legacy object: a MUTEX (``initial`` 1: free), a SEMAPHORE
    (``initial`` of ``max_count``), a FENCE (``initial`` value), or a CPU_NOTIFICATION whose
    ``eventfd`` (this process's; it stays open here) is written whenever it is signalled. A
    MONITORED_FENCE is ``device.fence``."""
    args = s.d3dkmt_createsynchronizationobject2()
    args.device.v = device.handle
    args.info.type = int(kind)
    fds: tuple[int, ...] = ()
    if kind == SyncKind.MUTEX:
        args.info.synchronization_mutex.initial_state = 1 if initial else 0
    elif kind == SyncKind.SEMAPHORE:
        args.info.semaphore.max_count = int(max_count)
        args.info.semaphore.initial_count = int(initial)
    elif kind == SyncKind.FENCE:
        args.info.fence.fence_value = int(initial)
    elif kind == SyncKind.CPU_NOTIFICATION:
        if eventfd < 0:
            raise ValueError("a CPU notification needs an eventfd")
        args.info.cpu_notification.event = eventfd
        fds = (eventfd,)
    elif kind == SyncKind.MONITORED_FENCE:
        return (yield from create_fence(device, initial))
    else:
        raise ValueError(f"unknown sync object kind {kind}")
    _check((yield _ioctl(io.LX_DXCREATESYNCHRONIZATIONOBJECT, args, fds)),
           "CreateSynchronizationObject2")
    obj = _pick(device, SyncObject, AsyncSyncObject)(device, int(args.sync_object.v), int(kind))
    return device._track_fence(obj)
