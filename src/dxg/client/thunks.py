"""D3DKMT thunks: one function per ``/dev/dxg`` ioctl, as libdxg's ``d3dkmt-wsl.cpp`` has them.

Each ``D3DKMTxxx(conn, args)`` takes the ioctl's ctypes struct (from :mod:`dxg.uapi.structs`),
runs the ioctl on the node connection ``conn`` and returns the NTSTATUS the way libdxg does:
a non-negative return is the status itself (0, or a success code such as ``STATUS_PENDING``),
a negative errno is mapped back with :func:`dxg.uapi.ntstatus.ioctl_result_to_ntstatus`. The
struct (and the buffers it points at) are updated in place.

The same thunks serve both connections: with a
:class:`~dxg.client.connection.NodeConnection` a thunk returns the NTSTATUS, with an
:class:`~dxg.client.aio.AsyncNodeConnection` it returns an awaitable of it
(``status = await D3DKMTCreateDevice(aconn, args)``). They are made from one table, so the
two can never drift apart.

Like libdxg, OpenAdapterFromLuid, EnumAdapters2 and EnumAdapters3 reopen the node and retry once
when they get ``-ENOTTY``/``-EBADF`` in a forked child (whose inherited connection belongs to
the parent). A node that cannot be reached raises :class:`~dxg.client.errors.NodeError`.
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Awaitable, Coroutine
from typing import Any, Generic, Protocol, TypeVar, overload

from dxg.client.aio import AsyncNodeConnection
from dxg.client.connection import NodeConnection
from dxg.uapi import ioctls as io
from dxg.uapi import structs as s
from dxg.uapi.ntstatus import ioctl_result_to_ntstatus

__all__ = [
    "D3DKMTChangeVideoMemoryReservation",
    "D3DKMTCloseAdapter",
    "D3DKMTCreateAllocation",
    "D3DKMTCreateAllocation2",
    "D3DKMTCreateContext",
    "D3DKMTCreateContextVirtual",
    "D3DKMTCreateDevice",
    "D3DKMTCreateHwContext",
    "D3DKMTCreateHwQueue",
    "D3DKMTCreatePagingQueue",
    "D3DKMTCreateSyncFile",
    "D3DKMTCreateSynchronizationObject2",
    "D3DKMTDestroyAllocation2",
    "D3DKMTDestroyContext",
    "D3DKMTDestroyDevice",
    "D3DKMTDestroyHwContext",
    "D3DKMTDestroyHwQueue",
    "D3DKMTDestroyPagingQueue",
    "D3DKMTDestroySynchronizationObject",
    "D3DKMTEnumAdapters2",
    "D3DKMTEnumAdapters3",
    "D3DKMTEnumProcesses",
    "D3DKMTEscape",
    "D3DKMTEvict",
    "D3DKMTFlushHeapTransitions",
    "D3DKMTFreeGpuVirtualAddress",
    "D3DKMTGetAllocationPriority",
    "D3DKMTGetContextInProcessSchedulingPriority",
    "D3DKMTGetContextSchedulingPriority",
    "D3DKMTGetDeviceState",
    "D3DKMTGetSharedResourceAdapterLuid",
    "D3DKMTInvalidateCache",
    "D3DKMTIsFeatureEnabled",
    "D3DKMTLock2",
    "D3DKMTMakeResident",
    "D3DKMTMapGpuVirtualAddress",
    "D3DKMTMarkDeviceAsError",
    "D3DKMTOfferAllocations",
    "D3DKMTOpenAdapterFromLuid",
    "D3DKMTOpenResource",
    "D3DKMTOpenResourceFromNtHandle",
    "D3DKMTOpenSyncObjectFromNtHandle2",
    "D3DKMTOpenSyncObjectFromSyncFile",
    "D3DKMTOpenSynchronizationObject",
    "D3DKMTQueryAdapterInfo",
    "D3DKMTQueryAllocationResidency",
    "D3DKMTQueryClockCalibration",
    "D3DKMTQueryResourceInfo",
    "D3DKMTQueryResourceInfoFromNtHandle",
    "D3DKMTQueryStatistics",
    "D3DKMTQueryVideoMemoryInfo",
    "D3DKMTReclaimAllocations2",
    "D3DKMTRender",
    "D3DKMTReserveGpuVirtualAddress",
    "D3DKMTSetAllocationPriority",
    "D3DKMTSetContextInProcessSchedulingPriority",
    "D3DKMTSetContextSchedulingPriority",
    "D3DKMTShareObjectWithHost",
    "D3DKMTShareObjects",
    "D3DKMTSignalSynchronizationObject2",
    "D3DKMTSignalSynchronizationObjectFromCpu",
    "D3DKMTSignalSynchronizationObjectFromGpu",
    "D3DKMTSignalSynchronizationObjectFromGpu2",
    "D3DKMTSubmitCommand",
    "D3DKMTSubmitCommandToHwQueue",
    "D3DKMTSubmitSignalSyncObjectsToHwQueue",
    "D3DKMTSubmitWaitForSyncObjectsToHwQueue",
    "D3DKMTUnlock2",
    "D3DKMTUpdateAllocationProperty",
    "D3DKMTUpdateGpuVirtualAddress",
    "D3DKMTWaitForSynchronizationObject2",
    "D3DKMTWaitForSynchronizationObjectFromCpu",
    "D3DKMTWaitForSynchronizationObjectFromGpu",
    "D3DKMTWaitSyncFile",
    "Thunk",
]

_A = TypeVar("_A", bound=ctypes.Structure, contravariant=True)
_REOPEN_ERRNOS = (-errno.ENOTTY, -errno.EBADF)
_NO_HANDLER = "No handler in the driver: -ENOTTY, i.e. STATUS_UNSUCCESSFUL."


class Thunk(Protocol, Generic[_A]):
    """``D3DKMTxxx(conn, args)``: the NTSTATUS, or an awaitable of it on an async connection."""

    code: int
    struct: type[ctypes.Structure]

    @overload
    def __call__(self, conn: NodeConnection, args: _A, /) -> int: ...

    @overload
    def __call__(self, conn: AsyncNodeConnection, args: _A, /) -> Awaitable[int]: ...


def _fds_of(args: Any, fd_field: str) -> tuple[int, ...]:
    """The descriptor a struct names (a share descriptor, a sync file): handed to the node with
    the call, as the kernel takes it by number from the caller's table."""
    if not fd_field:
        return ()
    number = int(getattr(args, fd_field))
    return (number,) if 0 <= number <= 0x7FFFFFFF else ()


def _sync_call(conn: NodeConnection, code: int, args: Any, retry: bool,
               fd_field: str = "") -> int:
    fds = _fds_of(args, fd_field)
    try:
        ret = conn.ioctl(code, args, fds) if fds else conn.ioctl(code, args)
    except OSError as e:
        if not fds or e.errno != errno.EBADF:
            raise
        ret = -errno.EBADF  # not a descriptor of this process: as the kernel's fget() fails
    if retry and ret in _REOPEN_ERRNOS and conn.forked:
        conn.reopen()
        ret = conn.ioctl(code, args)
    return ioctl_result_to_ntstatus(ret)


async def _async_call(conn: AsyncNodeConnection, code: int, args: Any, retry: bool,
                      fd_field: str = "") -> int:
    fds = _fds_of(args, fd_field)
    try:
        ret = await (conn.ioctl(code, args, fds) if fds else conn.ioctl(code, args))
    except OSError as e:
        if not fds or e.errno != errno.EBADF:
            raise
        ret = -errno.EBADF
    if retry and ret in _REOPEN_ERRNOS and conn.forked:
        await conn.reopen()
        ret = await conn.ioctl(code, args)
    return ioctl_result_to_ntstatus(ret)


def _thunk(name: str, code: int, struct_type: type[ctypes.Structure], retry: bool = False,
           doc: str = "", fd_field: str = "") -> Any:
    """The thunk ``name`` for ioctl ``code``; ``retry``: libdxg's reopen-once in a forked child;
    ``fd_field``: the struct field that holds a descriptor of the caller's the call takes."""

    def thunk(conn: NodeConnection | AsyncNodeConnection,
              args: Any) -> int | Coroutine[Any, Any, int]:
        if not isinstance(args, struct_type):
            raise TypeError(f"expected a {struct_type.__name__}, got {type(args).__name__}")
        if isinstance(conn, AsyncNodeConnection):
            return _async_call(conn, code, args, retry, fd_field)
        if plain:  # (no descriptor to hand over, no reopen: _sync_call's first step alone)
            return ioctl_result_to_ntstatus(conn.ioctl(code, args))
        return _sync_call(conn, code, args, retry, fd_field)

    plain = not retry and not fd_field

    thunk.__name__ = thunk.__qualname__ = name
    thunk.__doc__ = doc or f"``{io.IOCTLS_BY_CODE[code].name}`` with a ``{struct_type.__name__}``."
    thunk.code = code  # type: ignore[attr-defined]
    thunk.struct = struct_type  # type: ignore[attr-defined]
    return thunk


D3DKMTOpenAdapterFromLuid: Thunk[s.d3dkmt_openadapterfromluid] = _thunk(
    "D3DKMTOpenAdapterFromLuid",
    io.LX_DXOPENADAPTERFROMLUID,
    s.d3dkmt_openadapterfromluid,
    retry=True,
)
D3DKMTCreateDevice: Thunk[s.d3dkmt_createdevice] = _thunk(
    "D3DKMTCreateDevice", io.LX_DXCREATEDEVICE, s.d3dkmt_createdevice
)
D3DKMTCreateContext: Thunk[s.d3dkmt_createcontext] = _thunk(
    "D3DKMTCreateContext", io.LX_DXCREATECONTEXT, s.d3dkmt_createcontext, doc=_NO_HANDLER
)
D3DKMTCreateContextVirtual: Thunk[s.d3dkmt_createcontextvirtual] = _thunk(
    "D3DKMTCreateContextVirtual", io.LX_DXCREATECONTEXTVIRTUAL, s.d3dkmt_createcontextvirtual
)
D3DKMTDestroyContext: Thunk[s.d3dkmt_destroycontext] = _thunk(
    "D3DKMTDestroyContext", io.LX_DXDESTROYCONTEXT, s.d3dkmt_destroycontext
)
D3DKMTCreateAllocation: Thunk[s.d3dkmt_createallocation] = _thunk(
    "D3DKMTCreateAllocation", io.LX_DXCREATEALLOCATION, s.d3dkmt_createallocation
)
D3DKMTCreatePagingQueue: Thunk[s.d3dkmt_createpagingqueue] = _thunk(
    "D3DKMTCreatePagingQueue", io.LX_DXCREATEPAGINGQUEUE, s.d3dkmt_createpagingqueue
)
D3DKMTReserveGpuVirtualAddress: Thunk[s.d3dddi_reservegpuvirtualaddress] = _thunk(
    "D3DKMTReserveGpuVirtualAddress",
    io.LX_DXRESERVEGPUVIRTUALADDRESS,
    s.d3dddi_reservegpuvirtualaddress,
)
D3DKMTQueryAdapterInfo: Thunk[s.d3dkmt_queryadapterinfo] = _thunk(
    "D3DKMTQueryAdapterInfo", io.LX_DXQUERYADAPTERINFO, s.d3dkmt_queryadapterinfo
)
D3DKMTQueryVideoMemoryInfo: Thunk[s.d3dkmt_queryvideomemoryinfo] = _thunk(
    "D3DKMTQueryVideoMemoryInfo", io.LX_DXQUERYVIDEOMEMORYINFO, s.d3dkmt_queryvideomemoryinfo
)
D3DKMTMakeResident: Thunk[s.d3dddi_makeresident] = _thunk(
    "D3DKMTMakeResident", io.LX_DXMAKERESIDENT, s.d3dddi_makeresident
)
D3DKMTMapGpuVirtualAddress: Thunk[s.d3dddi_mapgpuvirtualaddress] = _thunk(
    "D3DKMTMapGpuVirtualAddress", io.LX_DXMAPGPUVIRTUALADDRESS, s.d3dddi_mapgpuvirtualaddress
)
D3DKMTEscape: Thunk[s.d3dkmt_escape] = _thunk("D3DKMTEscape", io.LX_DXESCAPE, s.d3dkmt_escape)
D3DKMTGetDeviceState: Thunk[s.d3dkmt_getdevicestate] = _thunk(
    "D3DKMTGetDeviceState", io.LX_DXGETDEVICESTATE, s.d3dkmt_getdevicestate
)
D3DKMTSubmitCommand: Thunk[s.d3dkmt_submitcommand] = _thunk(
    "D3DKMTSubmitCommand", io.LX_DXSUBMITCOMMAND, s.d3dkmt_submitcommand
)
D3DKMTCreateSynchronizationObject2: Thunk[s.d3dkmt_createsynchronizationobject2] = _thunk(
    "D3DKMTCreateSynchronizationObject2",
    io.LX_DXCREATESYNCHRONIZATIONOBJECT,
    s.d3dkmt_createsynchronizationobject2,
)
D3DKMTSignalSynchronizationObject2: Thunk[s.d3dkmt_signalsynchronizationobject2] = _thunk(
    "D3DKMTSignalSynchronizationObject2",
    io.LX_DXSIGNALSYNCHRONIZATIONOBJECT,
    s.d3dkmt_signalsynchronizationobject2,
)
D3DKMTWaitForSynchronizationObject2: Thunk[s.d3dkmt_waitforsynchronizationobject2] = _thunk(
    "D3DKMTWaitForSynchronizationObject2",
    io.LX_DXWAITFORSYNCHRONIZATIONOBJECT,
    s.d3dkmt_waitforsynchronizationobject2,
)
D3DKMTDestroyAllocation2: Thunk[s.d3dkmt_destroyallocation2] = _thunk(
    "D3DKMTDestroyAllocation2", io.LX_DXDESTROYALLOCATION2, s.d3dkmt_destroyallocation2
)
D3DKMTEnumAdapters2: Thunk[s.d3dkmt_enumadapters2] = _thunk(
    "D3DKMTEnumAdapters2", io.LX_DXENUMADAPTERS2, s.d3dkmt_enumadapters2, retry=True
)
D3DKMTCloseAdapter: Thunk[s.d3dkmt_closeadapter] = _thunk(
    "D3DKMTCloseAdapter", io.LX_DXCLOSEADAPTER, s.d3dkmt_closeadapter
)
D3DKMTChangeVideoMemoryReservation: Thunk[s.d3dkmt_changevideomemoryreservation] = _thunk(
    "D3DKMTChangeVideoMemoryReservation",
    io.LX_DXCHANGEVIDEOMEMORYRESERVATION,
    s.d3dkmt_changevideomemoryreservation,
)
D3DKMTCreateHwContext: Thunk[s.d3dkmt_createhwcontext] = _thunk(
    "D3DKMTCreateHwContext", io.LX_DXCREATEHWCONTEXT, s.d3dkmt_createhwcontext, doc=_NO_HANDLER
)
D3DKMTCreateHwQueue: Thunk[s.d3dkmt_createhwqueue] = _thunk(
    "D3DKMTCreateHwQueue", io.LX_DXCREATEHWQUEUE, s.d3dkmt_createhwqueue
)
D3DKMTDestroyDevice: Thunk[s.d3dkmt_destroydevice] = _thunk(
    "D3DKMTDestroyDevice", io.LX_DXDESTROYDEVICE, s.d3dkmt_destroydevice
)
D3DKMTDestroyHwContext: Thunk[s.d3dkmt_destroyhwcontext] = _thunk(
    "D3DKMTDestroyHwContext", io.LX_DXDESTROYHWCONTEXT, s.d3dkmt_destroyhwcontext, doc=_NO_HANDLER
)
D3DKMTDestroyHwQueue: Thunk[s.d3dkmt_destroyhwqueue] = _thunk(
    "D3DKMTDestroyHwQueue", io.LX_DXDESTROYHWQUEUE, s.d3dkmt_destroyhwqueue
)
D3DKMTDestroyPagingQueue: Thunk[s.d3dddi_destroypagingqueue] = _thunk(
    "D3DKMTDestroyPagingQueue", io.LX_DXDESTROYPAGINGQUEUE, s.d3dddi_destroypagingqueue
)
D3DKMTDestroySynchronizationObject: Thunk[s.d3dkmt_destroysynchronizationobject] = _thunk(
    "D3DKMTDestroySynchronizationObject",
    io.LX_DXDESTROYSYNCHRONIZATIONOBJECT,
    s.d3dkmt_destroysynchronizationobject,
)
D3DKMTEvict: Thunk[s.d3dkmt_evict] = _thunk("D3DKMTEvict", io.LX_DXEVICT, s.d3dkmt_evict)
D3DKMTFlushHeapTransitions: Thunk[s.d3dkmt_flushheaptransitions] = _thunk(
    "D3DKMTFlushHeapTransitions", io.LX_DXFLUSHHEAPTRANSITIONS, s.d3dkmt_flushheaptransitions
)
D3DKMTFreeGpuVirtualAddress: Thunk[s.d3dkmt_freegpuvirtualaddress] = _thunk(
    "D3DKMTFreeGpuVirtualAddress", io.LX_DXFREEGPUVIRTUALADDRESS, s.d3dkmt_freegpuvirtualaddress
)
D3DKMTGetContextInProcessSchedulingPriority: Thunk[s.d3dkmt_getcontextinprocessschedulingpriority] = _thunk(
    "D3DKMTGetContextInProcessSchedulingPriority",
    io.LX_DXGETCONTEXTINPROCESSSCHEDULINGPRIORITY,
    s.d3dkmt_getcontextinprocessschedulingpriority,
)
D3DKMTGetContextSchedulingPriority: Thunk[s.d3dkmt_getcontextschedulingpriority] = _thunk(
    "D3DKMTGetContextSchedulingPriority",
    io.LX_DXGETCONTEXTSCHEDULINGPRIORITY,
    s.d3dkmt_getcontextschedulingpriority,
)
D3DKMTGetSharedResourceAdapterLuid: Thunk[s.d3dkmt_getsharedresourceadapterluid] = _thunk(
    "D3DKMTGetSharedResourceAdapterLuid",
    io.LX_DXGETSHAREDRESOURCEADAPTERLUID,
    s.d3dkmt_getsharedresourceadapterluid,
    doc=_NO_HANDLER,
)
D3DKMTInvalidateCache: Thunk[s.d3dkmt_invalidatecache] = _thunk(
    "D3DKMTInvalidateCache", io.LX_DXINVALIDATECACHE, s.d3dkmt_invalidatecache
)
D3DKMTLock2: Thunk[s.d3dkmt_lock2] = _thunk("D3DKMTLock2", io.LX_DXLOCK2, s.d3dkmt_lock2)
D3DKMTMarkDeviceAsError: Thunk[s.d3dkmt_markdeviceaserror] = _thunk(
    "D3DKMTMarkDeviceAsError", io.LX_DXMARKDEVICEASERROR, s.d3dkmt_markdeviceaserror
)
D3DKMTOfferAllocations: Thunk[s.d3dkmt_offerallocations] = _thunk(
    "D3DKMTOfferAllocations", io.LX_DXOFFERALLOCATIONS, s.d3dkmt_offerallocations
)
D3DKMTOpenResource: Thunk[s.d3dkmt_openresource] = _thunk(
    "D3DKMTOpenResource", io.LX_DXOPENRESOURCE, s.d3dkmt_openresource, doc=_NO_HANDLER
)
D3DKMTOpenSynchronizationObject: Thunk[s.d3dkmt_opensynchronizationobject] = _thunk(
    "D3DKMTOpenSynchronizationObject",
    io.LX_DXOPENSYNCHRONIZATIONOBJECT,
    s.d3dkmt_opensynchronizationobject,
    doc=_NO_HANDLER,
)
D3DKMTQueryAllocationResidency: Thunk[s.d3dkmt_queryallocationresidency] = _thunk(
    "D3DKMTQueryAllocationResidency",
    io.LX_DXQUERYALLOCATIONRESIDENCY,
    s.d3dkmt_queryallocationresidency,
)
D3DKMTQueryResourceInfo: Thunk[s.d3dkmt_queryresourceinfo] = _thunk(
    "D3DKMTQueryResourceInfo",
    io.LX_DXQUERYRESOURCEINFO,
    s.d3dkmt_queryresourceinfo,
    doc=_NO_HANDLER,
)
D3DKMTReclaimAllocations2: Thunk[s.d3dkmt_reclaimallocations2] = _thunk(
    "D3DKMTReclaimAllocations2", io.LX_DXRECLAIMALLOCATIONS2, s.d3dkmt_reclaimallocations2
)
D3DKMTRender: Thunk[s.d3dkmt_render] = _thunk(
    "D3DKMTRender", io.LX_DXRENDER, s.d3dkmt_render, doc=_NO_HANDLER
)
D3DKMTSetAllocationPriority: Thunk[s.d3dkmt_setallocationpriority] = _thunk(
    "D3DKMTSetAllocationPriority", io.LX_DXSETALLOCATIONPRIORITY, s.d3dkmt_setallocationpriority
)
D3DKMTSetContextInProcessSchedulingPriority: Thunk[s.d3dkmt_setcontextinprocessschedulingpriority] = _thunk(
    "D3DKMTSetContextInProcessSchedulingPriority",
    io.LX_DXSETCONTEXTINPROCESSSCHEDULINGPRIORITY,
    s.d3dkmt_setcontextinprocessschedulingpriority,
)
D3DKMTSetContextSchedulingPriority: Thunk[s.d3dkmt_setcontextschedulingpriority] = _thunk(
    "D3DKMTSetContextSchedulingPriority",
    io.LX_DXSETCONTEXTSCHEDULINGPRIORITY,
    s.d3dkmt_setcontextschedulingpriority,
)
D3DKMTSignalSynchronizationObjectFromCpu: Thunk[s.d3dkmt_signalsynchronizationobjectfromcpu] = _thunk(
    "D3DKMTSignalSynchronizationObjectFromCpu",
    io.LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMCPU,
    s.d3dkmt_signalsynchronizationobjectfromcpu,
)
D3DKMTSignalSynchronizationObjectFromGpu: Thunk[s.d3dkmt_signalsynchronizationobjectfromgpu] = _thunk(
    "D3DKMTSignalSynchronizationObjectFromGpu",
    io.LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMGPU,
    s.d3dkmt_signalsynchronizationobjectfromgpu,
)
D3DKMTSignalSynchronizationObjectFromGpu2: Thunk[s.d3dkmt_signalsynchronizationobjectfromgpu2] = _thunk(
    "D3DKMTSignalSynchronizationObjectFromGpu2",
    io.LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMGPU2,
    s.d3dkmt_signalsynchronizationobjectfromgpu2,
)
D3DKMTSubmitCommandToHwQueue: Thunk[s.d3dkmt_submitcommandtohwqueue] = _thunk(
    "D3DKMTSubmitCommandToHwQueue", io.LX_DXSUBMITCOMMANDTOHWQUEUE, s.d3dkmt_submitcommandtohwqueue
)
D3DKMTSubmitSignalSyncObjectsToHwQueue: Thunk[s.d3dkmt_submitsignalsyncobjectstohwqueue] = _thunk(
    "D3DKMTSubmitSignalSyncObjectsToHwQueue",
    io.LX_DXSUBMITSIGNALSYNCOBJECTSTOHWQUEUE,
    s.d3dkmt_submitsignalsyncobjectstohwqueue,
)
D3DKMTSubmitWaitForSyncObjectsToHwQueue: Thunk[s.d3dkmt_submitwaitforsyncobjectstohwqueue] = _thunk(
    "D3DKMTSubmitWaitForSyncObjectsToHwQueue",
    io.LX_DXSUBMITWAITFORSYNCOBJECTSTOHWQUEUE,
    s.d3dkmt_submitwaitforsyncobjectstohwqueue,
)
D3DKMTUnlock2: Thunk[s.d3dkmt_unlock2] = _thunk("D3DKMTUnlock2", io.LX_DXUNLOCK2, s.d3dkmt_unlock2)
D3DKMTUpdateAllocationProperty: Thunk[s.d3dddi_updateallocproperty] = _thunk(
    "D3DKMTUpdateAllocationProperty", io.LX_DXUPDATEALLOCPROPERTY, s.d3dddi_updateallocproperty
)
D3DKMTUpdateGpuVirtualAddress: Thunk[s.d3dkmt_updategpuvirtualaddress] = _thunk(
    "D3DKMTUpdateGpuVirtualAddress",
    io.LX_DXUPDATEGPUVIRTUALADDRESS,
    s.d3dkmt_updategpuvirtualaddress,
)
D3DKMTWaitForSynchronizationObjectFromCpu: Thunk[s.d3dkmt_waitforsynchronizationobjectfromcpu] = _thunk(
    "D3DKMTWaitForSynchronizationObjectFromCpu",
    io.LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU,
    s.d3dkmt_waitforsynchronizationobjectfromcpu,
)
D3DKMTWaitForSynchronizationObjectFromGpu: Thunk[s.d3dkmt_waitforsynchronizationobjectfromgpu] = _thunk(
    "D3DKMTWaitForSynchronizationObjectFromGpu",
    io.LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMGPU,
    s.d3dkmt_waitforsynchronizationobjectfromgpu,
)
D3DKMTGetAllocationPriority: Thunk[s.d3dkmt_getallocationpriority] = _thunk(
    "D3DKMTGetAllocationPriority", io.LX_DXGETALLOCATIONPRIORITY, s.d3dkmt_getallocationpriority
)
D3DKMTQueryClockCalibration: Thunk[s.d3dkmt_queryclockcalibration] = _thunk(
    "D3DKMTQueryClockCalibration", io.LX_DXQUERYCLOCKCALIBRATION, s.d3dkmt_queryclockcalibration
)
D3DKMTEnumAdapters3: Thunk[s.d3dkmt_enumadapters3] = _thunk(
    "D3DKMTEnumAdapters3", io.LX_DXENUMADAPTERS3, s.d3dkmt_enumadapters3, retry=True
)
D3DKMTShareObjects: Thunk[s.d3dkmt_shareobjects] = _thunk(
    "D3DKMTShareObjects", io.LX_DXSHAREOBJECTS, s.d3dkmt_shareobjects
)
D3DKMTOpenSyncObjectFromNtHandle2: Thunk[s.d3dkmt_opensyncobjectfromnthandle2] = _thunk(
    "D3DKMTOpenSyncObjectFromNtHandle2",
    io.LX_DXOPENSYNCOBJECTFROMNTHANDLE2,
    s.d3dkmt_opensyncobjectfromnthandle2,
    fd_field="nt_handle",
)
D3DKMTQueryResourceInfoFromNtHandle: Thunk[s.d3dkmt_queryresourceinfofromnthandle] = _thunk(
    "D3DKMTQueryResourceInfoFromNtHandle",
    io.LX_DXQUERYRESOURCEINFOFROMNTHANDLE,
    s.d3dkmt_queryresourceinfofromnthandle,
    fd_field="nt_handle",
)
D3DKMTOpenResourceFromNtHandle: Thunk[s.d3dkmt_openresourcefromnthandle] = _thunk(
    "D3DKMTOpenResourceFromNtHandle",
    io.LX_DXOPENRESOURCEFROMNTHANDLE,
    s.d3dkmt_openresourcefromnthandle,
    fd_field="nt_handle",
)
D3DKMTQueryStatistics: Thunk[s.d3dkmt_querystatistics] = _thunk(
    "D3DKMTQueryStatistics", io.LX_DXQUERYSTATISTICS, s.d3dkmt_querystatistics
)
D3DKMTShareObjectWithHost: Thunk[s.d3dkmt_shareobjectwithhost] = _thunk(
    "D3DKMTShareObjectWithHost", io.LX_DXSHAREOBJECTWITHHOST, s.d3dkmt_shareobjectwithhost
)
D3DKMTCreateSyncFile: Thunk[s.d3dkmt_createsyncfile] = _thunk(
    "D3DKMTCreateSyncFile", io.LX_DXCREATESYNCFILE, s.d3dkmt_createsyncfile
)
D3DKMTWaitSyncFile: Thunk[s.d3dkmt_waitsyncfile] = _thunk(
    "D3DKMTWaitSyncFile", io.LX_DXWAITSYNCFILE, s.d3dkmt_waitsyncfile,
    fd_field="sync_file_handle",
)
D3DKMTOpenSyncObjectFromSyncFile: Thunk[s.d3dkmt_opensyncobjectfromsyncfile] = _thunk(
    "D3DKMTOpenSyncObjectFromSyncFile",
    io.LX_DXOPENSYNCOBJECTFROMSYNCFILE,
    s.d3dkmt_opensyncobjectfromsyncfile,
    fd_field="sync_file_handle",
)
D3DKMTEnumProcesses: Thunk[s.d3dkmt_enumprocesses] = _thunk(
    "D3DKMTEnumProcesses", io.LX_DXENUMPROCESSES, s.d3dkmt_enumprocesses
)
D3DKMTIsFeatureEnabled: Thunk[s.d3dkmt_isfeatureenabled] = _thunk(
    "D3DKMTIsFeatureEnabled", io.LX_ISFEATUREENABLED, s.d3dkmt_isfeatureenabled
)

D3DKMTCreateAllocation2 = D3DKMTCreateAllocation
"""libdxg's second name for CreateAllocation (the same ioctl)."""
