"""D3DKMT thunks: one function per ``/dev/dxg`` ioctl, as libdxg's ``d3dkmt-wsl.cpp`` has them.

Each ``D3DKMTxxx(conn, args)`` takes the ioctl's ctypes struct (from :mod:`dxg.uapi.structs`),
runs the ioctl on the node connection ``conn`` and returns the NTSTATUS the way libdxg does:
a non-negative return is the status itself (0, or a success code such as ``STATUS_PENDING``),
a negative errno is mapped back with :func:`dxg.uapi.ntstatus.ioctl_result_to_ntstatus`. The
struct (and the buffers it points at) are updated in place.

Like libdxg, OpenAdapterFromLuid, EnumAdapters2 and EnumAdapters3 reopen the node and retry once
when they get ``-ENOTTY``/``-EBADF`` in a forked child (whose inherited connection belongs to
the parent). A node that cannot be reached raises :class:`~dxg.client.errors.NodeError`.
"""

from __future__ import annotations

import ctypes
import errno

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
]

_REOPEN_ERRNOS = (-errno.ENOTTY, -errno.EBADF)


def _call(
    conn: NodeConnection, code: int, struct_type: type[ctypes.Structure], args: object
) -> int:
    if not isinstance(args, struct_type):
        raise TypeError(f"expected a {struct_type.__name__}, got {type(args).__name__}")
    return ioctl_result_to_ntstatus(conn.ioctl(code, args))


def _retry_call(
    conn: NodeConnection, code: int, struct_type: type[ctypes.Structure], args: object
) -> int:
    if not isinstance(args, struct_type):
        raise TypeError(f"expected a {struct_type.__name__}, got {type(args).__name__}")
    ret = conn.ioctl(code, args)
    if ret in _REOPEN_ERRNOS and conn.forked:
        conn.reopen()
        ret = conn.ioctl(code, args)
    return ioctl_result_to_ntstatus(ret)


def D3DKMTOpenAdapterFromLuid(conn: NodeConnection, args: s.d3dkmt_openadapterfromluid) -> int:
    return _retry_call(conn, io.LX_DXOPENADAPTERFROMLUID, s.d3dkmt_openadapterfromluid, args)


def D3DKMTCreateDevice(conn: NodeConnection, args: s.d3dkmt_createdevice) -> int:
    return _call(conn, io.LX_DXCREATEDEVICE, s.d3dkmt_createdevice, args)


def D3DKMTCreateContext(conn: NodeConnection, args: s.d3dkmt_createcontext) -> int:
    """No handler in the driver: -ENOTTY, i.e. STATUS_UNSUCCESSFUL."""
    return _call(conn, io.LX_DXCREATECONTEXT, s.d3dkmt_createcontext, args)


def D3DKMTCreateContextVirtual(conn: NodeConnection, args: s.d3dkmt_createcontextvirtual) -> int:
    return _call(conn, io.LX_DXCREATECONTEXTVIRTUAL, s.d3dkmt_createcontextvirtual, args)


def D3DKMTDestroyContext(conn: NodeConnection, args: s.d3dkmt_destroycontext) -> int:
    return _call(conn, io.LX_DXDESTROYCONTEXT, s.d3dkmt_destroycontext, args)


def D3DKMTCreateAllocation(conn: NodeConnection, args: s.d3dkmt_createallocation) -> int:
    return _call(conn, io.LX_DXCREATEALLOCATION, s.d3dkmt_createallocation, args)


def D3DKMTCreatePagingQueue(conn: NodeConnection, args: s.d3dkmt_createpagingqueue) -> int:
    return _call(conn, io.LX_DXCREATEPAGINGQUEUE, s.d3dkmt_createpagingqueue, args)


def D3DKMTReserveGpuVirtualAddress(
    conn: NodeConnection, args: s.d3dddi_reservegpuvirtualaddress
) -> int:
    return _call(conn, io.LX_DXRESERVEGPUVIRTUALADDRESS, s.d3dddi_reservegpuvirtualaddress, args)


def D3DKMTQueryAdapterInfo(conn: NodeConnection, args: s.d3dkmt_queryadapterinfo) -> int:
    return _call(conn, io.LX_DXQUERYADAPTERINFO, s.d3dkmt_queryadapterinfo, args)


def D3DKMTQueryVideoMemoryInfo(conn: NodeConnection, args: s.d3dkmt_queryvideomemoryinfo) -> int:
    return _call(conn, io.LX_DXQUERYVIDEOMEMORYINFO, s.d3dkmt_queryvideomemoryinfo, args)


def D3DKMTMakeResident(conn: NodeConnection, args: s.d3dddi_makeresident) -> int:
    return _call(conn, io.LX_DXMAKERESIDENT, s.d3dddi_makeresident, args)


def D3DKMTMapGpuVirtualAddress(conn: NodeConnection, args: s.d3dddi_mapgpuvirtualaddress) -> int:
    return _call(conn, io.LX_DXMAPGPUVIRTUALADDRESS, s.d3dddi_mapgpuvirtualaddress, args)


def D3DKMTEscape(conn: NodeConnection, args: s.d3dkmt_escape) -> int:
    return _call(conn, io.LX_DXESCAPE, s.d3dkmt_escape, args)


def D3DKMTGetDeviceState(conn: NodeConnection, args: s.d3dkmt_getdevicestate) -> int:
    return _call(conn, io.LX_DXGETDEVICESTATE, s.d3dkmt_getdevicestate, args)


def D3DKMTSubmitCommand(conn: NodeConnection, args: s.d3dkmt_submitcommand) -> int:
    return _call(conn, io.LX_DXSUBMITCOMMAND, s.d3dkmt_submitcommand, args)


def D3DKMTCreateSynchronizationObject2(
    conn: NodeConnection, args: s.d3dkmt_createsynchronizationobject2
) -> int:
    return _call(
        conn, io.LX_DXCREATESYNCHRONIZATIONOBJECT, s.d3dkmt_createsynchronizationobject2, args
    )


def D3DKMTSignalSynchronizationObject2(
    conn: NodeConnection, args: s.d3dkmt_signalsynchronizationobject2
) -> int:
    return _call(
        conn, io.LX_DXSIGNALSYNCHRONIZATIONOBJECT, s.d3dkmt_signalsynchronizationobject2, args
    )


def D3DKMTWaitForSynchronizationObject2(
    conn: NodeConnection, args: s.d3dkmt_waitforsynchronizationobject2
) -> int:
    return _call(
        conn, io.LX_DXWAITFORSYNCHRONIZATIONOBJECT, s.d3dkmt_waitforsynchronizationobject2, args
    )


def D3DKMTDestroyAllocation2(conn: NodeConnection, args: s.d3dkmt_destroyallocation2) -> int:
    return _call(conn, io.LX_DXDESTROYALLOCATION2, s.d3dkmt_destroyallocation2, args)


def D3DKMTEnumAdapters2(conn: NodeConnection, args: s.d3dkmt_enumadapters2) -> int:
    return _retry_call(conn, io.LX_DXENUMADAPTERS2, s.d3dkmt_enumadapters2, args)


def D3DKMTCloseAdapter(conn: NodeConnection, args: s.d3dkmt_closeadapter) -> int:
    return _call(conn, io.LX_DXCLOSEADAPTER, s.d3dkmt_closeadapter, args)


def D3DKMTChangeVideoMemoryReservation(
    conn: NodeConnection, args: s.d3dkmt_changevideomemoryreservation
) -> int:
    return _call(
        conn, io.LX_DXCHANGEVIDEOMEMORYRESERVATION, s.d3dkmt_changevideomemoryreservation, args
    )


def D3DKMTCreateHwContext(conn: NodeConnection, args: s.d3dkmt_createhwcontext) -> int:
    """No handler in the driver: -ENOTTY, i.e. STATUS_UNSUCCESSFUL."""
    return _call(conn, io.LX_DXCREATEHWCONTEXT, s.d3dkmt_createhwcontext, args)


def D3DKMTCreateHwQueue(conn: NodeConnection, args: s.d3dkmt_createhwqueue) -> int:
    return _call(conn, io.LX_DXCREATEHWQUEUE, s.d3dkmt_createhwqueue, args)


def D3DKMTDestroyDevice(conn: NodeConnection, args: s.d3dkmt_destroydevice) -> int:
    return _call(conn, io.LX_DXDESTROYDEVICE, s.d3dkmt_destroydevice, args)


def D3DKMTDestroyHwContext(conn: NodeConnection, args: s.d3dkmt_destroyhwcontext) -> int:
    """No handler in the driver: -ENOTTY, i.e. STATUS_UNSUCCESSFUL."""
    return _call(conn, io.LX_DXDESTROYHWCONTEXT, s.d3dkmt_destroyhwcontext, args)


def D3DKMTDestroyHwQueue(conn: NodeConnection, args: s.d3dkmt_destroyhwqueue) -> int:
    return _call(conn, io.LX_DXDESTROYHWQUEUE, s.d3dkmt_destroyhwqueue, args)


def D3DKMTDestroyPagingQueue(conn: NodeConnection, args: s.d3dddi_destroypagingqueue) -> int:
    return _call(conn, io.LX_DXDESTROYPAGINGQUEUE, s.d3dddi_destroypagingqueue, args)


def D3DKMTDestroySynchronizationObject(
    conn: NodeConnection, args: s.d3dkmt_destroysynchronizationobject
) -> int:
    return _call(
        conn, io.LX_DXDESTROYSYNCHRONIZATIONOBJECT, s.d3dkmt_destroysynchronizationobject, args
    )


def D3DKMTEvict(conn: NodeConnection, args: s.d3dkmt_evict) -> int:
    return _call(conn, io.LX_DXEVICT, s.d3dkmt_evict, args)


def D3DKMTFlushHeapTransitions(conn: NodeConnection, args: s.d3dkmt_flushheaptransitions) -> int:
    return _call(conn, io.LX_DXFLUSHHEAPTRANSITIONS, s.d3dkmt_flushheaptransitions, args)


def D3DKMTFreeGpuVirtualAddress(conn: NodeConnection, args: s.d3dkmt_freegpuvirtualaddress) -> int:
    return _call(conn, io.LX_DXFREEGPUVIRTUALADDRESS, s.d3dkmt_freegpuvirtualaddress, args)


def D3DKMTGetContextInProcessSchedulingPriority(
    conn: NodeConnection, args: s.d3dkmt_getcontextinprocessschedulingpriority
) -> int:
    return _call(
        conn,
        io.LX_DXGETCONTEXTINPROCESSSCHEDULINGPRIORITY,
        s.d3dkmt_getcontextinprocessschedulingpriority,
        args,
    )


def D3DKMTGetContextSchedulingPriority(
    conn: NodeConnection, args: s.d3dkmt_getcontextschedulingpriority
) -> int:
    return _call(
        conn, io.LX_DXGETCONTEXTSCHEDULINGPRIORITY, s.d3dkmt_getcontextschedulingpriority, args
    )


def D3DKMTGetSharedResourceAdapterLuid(
    conn: NodeConnection, args: s.d3dkmt_getsharedresourceadapterluid
) -> int:
    """No handler in the driver: -ENOTTY, i.e. STATUS_UNSUCCESSFUL."""
    return _call(
        conn, io.LX_DXGETSHAREDRESOURCEADAPTERLUID, s.d3dkmt_getsharedresourceadapterluid, args
    )


def D3DKMTInvalidateCache(conn: NodeConnection, args: s.d3dkmt_invalidatecache) -> int:
    return _call(conn, io.LX_DXINVALIDATECACHE, s.d3dkmt_invalidatecache, args)


def D3DKMTLock2(conn: NodeConnection, args: s.d3dkmt_lock2) -> int:
    return _call(conn, io.LX_DXLOCK2, s.d3dkmt_lock2, args)


def D3DKMTMarkDeviceAsError(conn: NodeConnection, args: s.d3dkmt_markdeviceaserror) -> int:
    return _call(conn, io.LX_DXMARKDEVICEASERROR, s.d3dkmt_markdeviceaserror, args)


def D3DKMTOfferAllocations(conn: NodeConnection, args: s.d3dkmt_offerallocations) -> int:
    return _call(conn, io.LX_DXOFFERALLOCATIONS, s.d3dkmt_offerallocations, args)


def D3DKMTOpenResource(conn: NodeConnection, args: s.d3dkmt_openresource) -> int:
    """No handler in the driver: -ENOTTY, i.e. STATUS_UNSUCCESSFUL."""
    return _call(conn, io.LX_DXOPENRESOURCE, s.d3dkmt_openresource, args)


def D3DKMTOpenSynchronizationObject(
    conn: NodeConnection, args: s.d3dkmt_opensynchronizationobject
) -> int:
    """No handler in the driver: -ENOTTY, i.e. STATUS_UNSUCCESSFUL."""
    return _call(conn, io.LX_DXOPENSYNCHRONIZATIONOBJECT, s.d3dkmt_opensynchronizationobject, args)


def D3DKMTQueryAllocationResidency(
    conn: NodeConnection, args: s.d3dkmt_queryallocationresidency
) -> int:
    return _call(conn, io.LX_DXQUERYALLOCATIONRESIDENCY, s.d3dkmt_queryallocationresidency, args)


def D3DKMTQueryResourceInfo(conn: NodeConnection, args: s.d3dkmt_queryresourceinfo) -> int:
    """No handler in the driver: -ENOTTY, i.e. STATUS_UNSUCCESSFUL."""
    return _call(conn, io.LX_DXQUERYRESOURCEINFO, s.d3dkmt_queryresourceinfo, args)


def D3DKMTReclaimAllocations2(conn: NodeConnection, args: s.d3dkmt_reclaimallocations2) -> int:
    return _call(conn, io.LX_DXRECLAIMALLOCATIONS2, s.d3dkmt_reclaimallocations2, args)


def D3DKMTRender(conn: NodeConnection, args: s.d3dkmt_render) -> int:
    """No handler in the driver: -ENOTTY, i.e. STATUS_UNSUCCESSFUL."""
    return _call(conn, io.LX_DXRENDER, s.d3dkmt_render, args)


def D3DKMTSetAllocationPriority(conn: NodeConnection, args: s.d3dkmt_setallocationpriority) -> int:
    return _call(conn, io.LX_DXSETALLOCATIONPRIORITY, s.d3dkmt_setallocationpriority, args)


def D3DKMTSetContextInProcessSchedulingPriority(
    conn: NodeConnection, args: s.d3dkmt_setcontextinprocessschedulingpriority
) -> int:
    return _call(
        conn,
        io.LX_DXSETCONTEXTINPROCESSSCHEDULINGPRIORITY,
        s.d3dkmt_setcontextinprocessschedulingpriority,
        args,
    )


def D3DKMTSetContextSchedulingPriority(
    conn: NodeConnection, args: s.d3dkmt_setcontextschedulingpriority
) -> int:
    return _call(
        conn, io.LX_DXSETCONTEXTSCHEDULINGPRIORITY, s.d3dkmt_setcontextschedulingpriority, args
    )


def D3DKMTSignalSynchronizationObjectFromCpu(
    conn: NodeConnection, args: s.d3dkmt_signalsynchronizationobjectfromcpu
) -> int:
    return _call(
        conn,
        io.LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMCPU,
        s.d3dkmt_signalsynchronizationobjectfromcpu,
        args,
    )


def D3DKMTSignalSynchronizationObjectFromGpu(
    conn: NodeConnection, args: s.d3dkmt_signalsynchronizationobjectfromgpu
) -> int:
    return _call(
        conn,
        io.LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMGPU,
        s.d3dkmt_signalsynchronizationobjectfromgpu,
        args,
    )


def D3DKMTSignalSynchronizationObjectFromGpu2(
    conn: NodeConnection, args: s.d3dkmt_signalsynchronizationobjectfromgpu2
) -> int:
    return _call(
        conn,
        io.LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMGPU2,
        s.d3dkmt_signalsynchronizationobjectfromgpu2,
        args,
    )


def D3DKMTSubmitCommandToHwQueue(
    conn: NodeConnection, args: s.d3dkmt_submitcommandtohwqueue
) -> int:
    return _call(conn, io.LX_DXSUBMITCOMMANDTOHWQUEUE, s.d3dkmt_submitcommandtohwqueue, args)


def D3DKMTSubmitSignalSyncObjectsToHwQueue(
    conn: NodeConnection, args: s.d3dkmt_submitsignalsyncobjectstohwqueue
) -> int:
    return _call(
        conn,
        io.LX_DXSUBMITSIGNALSYNCOBJECTSTOHWQUEUE,
        s.d3dkmt_submitsignalsyncobjectstohwqueue,
        args,
    )


def D3DKMTSubmitWaitForSyncObjectsToHwQueue(
    conn: NodeConnection, args: s.d3dkmt_submitwaitforsyncobjectstohwqueue
) -> int:
    return _call(
        conn,
        io.LX_DXSUBMITWAITFORSYNCOBJECTSTOHWQUEUE,
        s.d3dkmt_submitwaitforsyncobjectstohwqueue,
        args,
    )


def D3DKMTUnlock2(conn: NodeConnection, args: s.d3dkmt_unlock2) -> int:
    return _call(conn, io.LX_DXUNLOCK2, s.d3dkmt_unlock2, args)


def D3DKMTUpdateAllocationProperty(conn: NodeConnection, args: s.d3dddi_updateallocproperty) -> int:
    return _call(conn, io.LX_DXUPDATEALLOCPROPERTY, s.d3dddi_updateallocproperty, args)


def D3DKMTUpdateGpuVirtualAddress(
    conn: NodeConnection, args: s.d3dkmt_updategpuvirtualaddress
) -> int:
    return _call(conn, io.LX_DXUPDATEGPUVIRTUALADDRESS, s.d3dkmt_updategpuvirtualaddress, args)


def D3DKMTWaitForSynchronizationObjectFromCpu(
    conn: NodeConnection, args: s.d3dkmt_waitforsynchronizationobjectfromcpu
) -> int:
    return _call(
        conn,
        io.LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU,
        s.d3dkmt_waitforsynchronizationobjectfromcpu,
        args,
    )


def D3DKMTWaitForSynchronizationObjectFromGpu(
    conn: NodeConnection, args: s.d3dkmt_waitforsynchronizationobjectfromgpu
) -> int:
    return _call(
        conn,
        io.LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMGPU,
        s.d3dkmt_waitforsynchronizationobjectfromgpu,
        args,
    )


def D3DKMTGetAllocationPriority(conn: NodeConnection, args: s.d3dkmt_getallocationpriority) -> int:
    return _call(conn, io.LX_DXGETALLOCATIONPRIORITY, s.d3dkmt_getallocationpriority, args)


def D3DKMTQueryClockCalibration(conn: NodeConnection, args: s.d3dkmt_queryclockcalibration) -> int:
    return _call(conn, io.LX_DXQUERYCLOCKCALIBRATION, s.d3dkmt_queryclockcalibration, args)


def D3DKMTEnumAdapters3(conn: NodeConnection, args: s.d3dkmt_enumadapters3) -> int:
    return _retry_call(conn, io.LX_DXENUMADAPTERS3, s.d3dkmt_enumadapters3, args)


def D3DKMTShareObjects(conn: NodeConnection, args: s.d3dkmt_shareobjects) -> int:
    return _call(conn, io.LX_DXSHAREOBJECTS, s.d3dkmt_shareobjects, args)


def D3DKMTOpenSyncObjectFromNtHandle2(
    conn: NodeConnection, args: s.d3dkmt_opensyncobjectfromnthandle2
) -> int:
    return _call(
        conn, io.LX_DXOPENSYNCOBJECTFROMNTHANDLE2, s.d3dkmt_opensyncobjectfromnthandle2, args
    )


def D3DKMTQueryResourceInfoFromNtHandle(
    conn: NodeConnection, args: s.d3dkmt_queryresourceinfofromnthandle
) -> int:
    return _call(
        conn, io.LX_DXQUERYRESOURCEINFOFROMNTHANDLE, s.d3dkmt_queryresourceinfofromnthandle, args
    )


def D3DKMTOpenResourceFromNtHandle(
    conn: NodeConnection, args: s.d3dkmt_openresourcefromnthandle
) -> int:
    return _call(conn, io.LX_DXOPENRESOURCEFROMNTHANDLE, s.d3dkmt_openresourcefromnthandle, args)


def D3DKMTQueryStatistics(conn: NodeConnection, args: s.d3dkmt_querystatistics) -> int:
    return _call(conn, io.LX_DXQUERYSTATISTICS, s.d3dkmt_querystatistics, args)


def D3DKMTShareObjectWithHost(conn: NodeConnection, args: s.d3dkmt_shareobjectwithhost) -> int:
    return _call(conn, io.LX_DXSHAREOBJECTWITHHOST, s.d3dkmt_shareobjectwithhost, args)


def D3DKMTCreateSyncFile(conn: NodeConnection, args: s.d3dkmt_createsyncfile) -> int:
    return _call(conn, io.LX_DXCREATESYNCFILE, s.d3dkmt_createsyncfile, args)


def D3DKMTWaitSyncFile(conn: NodeConnection, args: s.d3dkmt_waitsyncfile) -> int:
    return _call(conn, io.LX_DXWAITSYNCFILE, s.d3dkmt_waitsyncfile, args)


def D3DKMTOpenSyncObjectFromSyncFile(
    conn: NodeConnection, args: s.d3dkmt_opensyncobjectfromsyncfile
) -> int:
    return _call(
        conn, io.LX_DXOPENSYNCOBJECTFROMSYNCFILE, s.d3dkmt_opensyncobjectfromsyncfile, args
    )


def D3DKMTEnumProcesses(conn: NodeConnection, args: s.d3dkmt_enumprocesses) -> int:
    return _call(conn, io.LX_DXENUMPROCESSES, s.d3dkmt_enumprocesses, args)


def D3DKMTIsFeatureEnabled(conn: NodeConnection, args: s.d3dkmt_isfeatureenabled) -> int:
    return _call(conn, io.LX_ISFEATUREENABLED, s.d3dkmt_isfeatureenabled, args)


D3DKMTCreateAllocation2 = D3DKMTCreateAllocation
"""libdxg's second name for CreateAllocation (the same ioctl)."""
