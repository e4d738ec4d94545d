"""Which user buffers each ioctl's struct points at, and how many bytes each one spans.

The kernel reads and writes the caller's memory through the pointers in an ioctl's struct. A
socket client has to send those buffers along (see :mod:`dxg.uapi.wire`), so for every ioctl
this module lists its pointer fields (:class:`Buf`): the field, the byte count (computed from
other fields of the same struct, as the driver computes it), and whether the driver reads the
buffer (IN), writes it (OUT) or both. A buffer that is itself an array of structs with pointers
(CreateAllocation's ``allocation_info``) lists those inner pointers too.

:func:`gather` applies a row to a struct: NULL pointers and empty sizes send nothing; a buffer
that cannot be read in this process is left out, so the driver answers ``-EFAULT`` when it
touches it, as the kernel does for a bad pointer; overlapping buffers are merged into one
region. An ioctl without a row sends just its struct.

Known gaps (not expressible as "pointer + size from the struct"): CreateAllocation's ``sysmem``
pages (existing-sysmem allocations; their size is in the driver-private data), the nested
pointers of the BUILDTESTCOMMANDBUFFER known escape, eventfd/sync-file descriptors (they are
file descriptors, not memory: the caller hands them over with ``ioctl(..., fds=...)``), and the
legacy Render/CreateContext lists (no handler).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from dxg.uapi import structs as s
from dxg.uapi.wire import REGION_IN, REGION_OUT, Region

__all__ = ["IN", "INOUT", "OUT", "USERBUFS", "Buf", "Reader", "gather"]

IN = REGION_IN
OUT = REGION_OUT
INOUT = REGION_IN | REGION_OUT

Reader = Callable[[int, int], bytes | None]
"""Reads ``size`` bytes at ``addr`` of this process; None if that memory is not readable."""

_HANDLE = 4  # struct d3dkmthandle
_U32 = 4
_U64 = 8


@dataclass(frozen=True)
class Buf:
    """One pointer field and the buffer it refers to.

    ``size(args)`` gives the byte count; ``when(args)`` (optional) says whether the field holds a
    pointer at all (it may share a union with a scalar). For an array of structs that contain
    pointers themselves, ``elem`` is the element type, ``count(args)`` the element count and
    ``inner`` the pointer fields of one element.
    """

    field: str
    size: Callable[[Any], int]
    flags: int = INOUT
    when: Callable[[Any], bool] | None = None
    elem: type[ctypes.Structure] | None = None
    count: Callable[[Any], int] | None = None
    inner: tuple[Buf, ...] = ()
    note: str = ""


def _n(field: str, unit: int) -> Callable[[Any], int]:
    """``getattr(args, field) * unit`` bytes (negative counts give 0)."""
    return lambda a: max(int(getattr(a, field)), 0) * unit


def _fixed(nbytes: int) -> Callable[[Any], int]:
    return lambda a: nbytes


def _priority_count(a: Any) -> int:
    # Set/GetAllocationPriority: one priority for a whole resource, else one per allocation.
    return 1 if int(a.resource.v) else max(int(a.allocation_count), 0)


def _residency_count(a: Any) -> int:
    # QueryAllocationResidency: one status for a whole resource, else one per allocation.
    return max(int(a.allocation_count), 1 if int(a.resource.v) else 0)


_ADAPTERINFO = ctypes.sizeof(s.d3dkmt_adapterinfo)
_ALLOCINFO2 = ctypes.sizeof(s.d3dddi_allocationinfo2)
_OPENALLOCINFO2 = ctypes.sizeof(s.d3dddi_openallocationinfo2)
_UPDATEVA_OP = ctypes.sizeof(s.d3dddi_updategpuvirtualaddress_operation)
_STDALLOC = ctypes.sizeof(s.d3dkmt_createstandardallocation)

_OPEN_RESOURCE = (
    Buf(
        "open_alloc_info",
        _n("allocation_count", _OPENALLOCINFO2),
        INOUT,
        note="allocation_count x d3dddi_openallocationinfo2; each entry's priv_drv_data is "
        "set by the driver to point into total_priv_drv_data",
    ),
    Buf("private_runtime_data", _n("private_runtime_data_size", 1), INOUT),
    Buf("resource_priv_drv_data", _n("resource_priv_drv_data_size", 1), INOUT),
    Buf("total_priv_drv_data", _n("total_priv_drv_data_size", 1), INOUT),
)

USERBUFS: MappingProxyType[str, tuple[Buf, ...]] = MappingProxyType(
    {
        # ---- adapters ----------------------------------------------------------------------------
        "LX_DXENUMADAPTERS2": (
            Buf(
                "adapters",
                _n("num_adapters", _ADAPTERINFO),
                INOUT,
                note="num_adapters x d3dkmt_adapterinfo (20 bytes)",
            ),
        ),
        "LX_DXENUMADAPTERS3": (
            Buf(
                "adapters",
                _n("adapter_count", _ADAPTERINFO),
                INOUT,
                note="adapter_count x d3dkmt_adapterinfo (20 bytes)",
            ),
        ),
        "LX_DXQUERYADAPTERINFO": (
            Buf(
                "private_data",
                _n("private_data_size", 1),
                INOUT,
                note="the KMTQAITYPE_* payload, sent and overwritten by the reply",
            ),
        ),
        "LX_DXENUMPROCESSES": (
            Buf("buffer", _n("buffer_count", _U32), INOUT, note="buffer_count x u32 pid"),
        ),
        # ---- contexts and queues -----------------------------------------------------------------
        "LX_DXCREATECONTEXT": (Buf("priv_drv_data", _n("priv_drv_data_size", 1), INOUT),),
        "LX_DXCREATECONTEXTVIRTUAL": (
            Buf(
                "priv_drv_data",
                _n("priv_drv_data_size", 1),
                INOUT,
                note="private driver data, sent to the host and overwritten by its copy",
            ),
        ),
        "LX_DXCREATEHWCONTEXT": (Buf("priv_drv_data", _n("priv_drv_data_size", 1), INOUT),),
        "LX_DXCREATEHWQUEUE": (Buf("priv_drv_data", _n("priv_drv_data_size", 1), INOUT),),
        "LX_DXESCAPE": (
            Buf(
                "priv_drv_data",
                _n("priv_drv_data_size", 1),
                INOUT,
                note="escape data, overwritten in place by the reply",
            ),
        ),
        # ---- allocations -------------------------------------------------------------------------
        "LX_DXCREATEALLOCATION": (
            Buf("private_runtime_data", _n("private_runtime_data_size", 1), IN),
            Buf(
                "priv_drv_data",
                _n("priv_drv_data_size", 1),
                IN,
                when=lambda a: not a.flags.standard_allocation,
            ),
            Buf(
                "standard_allocation",
                _fixed(_STDALLOC),
                IN,
                when=lambda a: bool(a.flags.standard_allocation),
                note="d3dkmt_createstandardallocation when flags.standard_allocation",
            ),
            Buf(
                "allocation_info",
                _n("alloc_count", _ALLOCINFO2),
                INOUT,
                elem=s.d3dddi_allocationinfo2,
                count=lambda a: max(int(a.alloc_count), 0),
                inner=(Buf("priv_drv_data", _n("priv_drv_data_size", 1), INOUT),),
                note="alloc_count x d3dddi_allocationinfo2 (96), each with its own private data; "
                "sysmem pages are not sent",
            ),
        ),
        "LX_DXDESTROYALLOCATION2": (Buf("allocations", _n("alloc_count", _HANDLE), IN),),
        "LX_DXOPENRESOURCE": _OPEN_RESOURCE,
        "LX_DXOPENRESOURCEFROMNTHANDLE": (
            *_OPEN_RESOURCE,
            Buf("keyed_mutex_private_data", _n("keyed_mutex_private_data_size", 1), INOUT),
        ),
        "LX_DXQUERYRESOURCEINFO": (
            Buf("private_runtime_data", _n("private_runtime_data_size", 1), INOUT),
        ),
        "LX_DXQUERYRESOURCEINFOFROMNTHANDLE": (
            Buf("private_runtime_data", _n("private_runtime_data_size", 1), INOUT),
        ),
        "LX_DXSHAREOBJECTS": (
            Buf("objects", _n("object_count", _HANDLE), IN),
            Buf("shared_handle", _fixed(_U64), INOUT, note="u64 that receives the shared fd"),
        ),
        # ---- residency and priorities ------------------------------------------------------------
        "LX_DXMAKERESIDENT": (
            Buf("allocation_list", _n("alloc_count", _HANDLE), IN),
            Buf("priority_list", _n("alloc_count", _U32), IN, note="not forwarded by the driver"),
        ),
        "LX_DXEVICT": (Buf("allocations", _n("alloc_count", _HANDLE), IN),),
        "LX_DXOFFERALLOCATIONS": (
            Buf("resources", _n("allocation_count", _HANDLE), IN),
            Buf("allocations", _n("allocation_count", _HANDLE), IN),
        ),
        "LX_DXRECLAIMALLOCATIONS2": (
            Buf("resources", _n("allocation_count", _HANDLE), IN),
            Buf("allocations", _n("allocation_count", _HANDLE), IN),
            Buf(
                "results",
                _n("allocation_count", _U32),
                INOUT,
                note="allocation_count x d3dddi_reclaim_result (union with discarded)",
            ),
        ),
        "LX_DXQUERYALLOCATIONRESIDENCY": (
            Buf("allocations", _n("allocation_count", _HANDLE), IN),
            Buf("residency_status", lambda a: _residency_count(a) * _U32, INOUT),
        ),
        "LX_DXSETALLOCATIONPRIORITY": (
            Buf("allocation_list", _n("allocation_count", _HANDLE), IN),
            Buf("priorities", lambda a: _priority_count(a) * _U32, IN),
        ),
        "LX_DXGETALLOCATIONPRIORITY": (
            Buf("allocation_list", _n("allocation_count", _HANDLE), IN),
            Buf("priorities", lambda a: _priority_count(a) * _U32, INOUT),
        ),
        # ---- GPU virtual addresses ---------------------------------------------------------------
        "LX_DXUPDATEGPUVIRTUALADDRESS": (
            Buf(
                "operations",
                _n("num_operations", _UPDATEVA_OP),
                IN,
                note="num_operations x d3dddi_updategpuvirtualaddress_operation (64)",
            ),
        ),
        # ---- submission --------------------------------------------------------------------------
        "LX_DXSUBMITCOMMAND": (
            Buf("priv_drv_data", _n("priv_drv_data_size", 1), IN),
            Buf("history_buffer_array", _n("num_history_buffers", _HANDLE), IN),
        ),
        "LX_DXSUBMITCOMMANDTOHWQUEUE": (
            Buf("priv_drv_data", _n("priv_drv_data_size", 1), IN),
            Buf("written_primaries", _n("num_primaries", _HANDLE), IN),
        ),
        # ---- synchronization ---------------------------------------------------------------------
        "LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMCPU": (
            Buf("objects", _n("object_count", _HANDLE), IN),
            Buf("fence_values", _n("object_count", _U64), IN),
        ),
        "LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMGPU": (
            Buf("objects", _n("object_count", _HANDLE), IN),
            Buf("monitored_fence_values", _n("object_count", _U64), IN),
        ),
        "LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMGPU2": (
            Buf("objects", _n("object_count", _HANDLE), IN),
            Buf("contexts", _n("context_count", _HANDLE), IN),
            Buf(
                "monitored_fence_values",
                _n("object_count", _U64),
                IN,
                when=lambda a: not a.flags.enqueue_cpu_event,
                note="a union with fence_value/cpu_event_handle: sent only if it reads as memory",
            ),
        ),
        "LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU": (
            Buf("objects", _n("object_count", _HANDLE), IN),
            Buf("fence_values", _n("object_count", _U64), IN),
        ),
        "LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMGPU": (
            Buf("objects", _n("object_count", _HANDLE), IN),
            Buf(
                "monitored_fence_values",
                _n("object_count", _U64),
                IN,
                note="a union with fence_value: sent only if it reads as memory",
            ),
        ),
        "LX_DXSUBMITSIGNALSYNCOBJECTSTOHWQUEUE": (
            Buf("hwqueues", _n("hwqueue_count", _HANDLE), IN),
            Buf("objects", _n("object_count", _HANDLE), IN),
            Buf("fence_values", _n("object_count", _U64), IN),
        ),
        "LX_DXSUBMITWAITFORSYNCOBJECTSTOHWQUEUE": (
            Buf("objects", _n("object_count", _HANDLE), IN),
            Buf("fence_values", _n("object_count", _U64), IN),
        ),
    }
)


# ---- gathering -----------------------------------------------------------------------------------


def _collect(
    bufs: tuple[Buf, ...],
    args: Any,
    read: Reader,
    limit: int,
    out: list[tuple[int, int, int, bytes]],
) -> None:
    for buf in bufs:
        if buf.when is not None and not buf.when(args):
            continue
        addr = int(getattr(args, buf.field))
        size = buf.size(args)
        if addr <= 0 or size <= 0:
            continue
        if size > limit or addr + size > 1 << 64:
            continue  # cannot be sent: the driver will fault (or reject the size) on it
        data = read(addr, size)
        if data is None or len(data) != size:
            continue
        out.append((addr, size, buf.flags, data))
        if buf.elem is not None and buf.count is not None and buf.inner:
            esz = ctypes.sizeof(buf.elem)
            n = min(buf.count(args), size // esz)
            for i in range(n):
                elem = buf.elem.from_buffer_copy(data, i * esz)
                _collect(buf.inner, elem, read, limit, out)


def _merge(pieces: list[tuple[int, int, int, bytes]]) -> list[Region]:
    """Sorted, non-overlapping regions; overlapping or touching buffers become one region."""
    pieces.sort(key=lambda p: (p[0], -p[1]))
    merged: list[tuple[int, bytearray, int]] = []  # (addr, data, flags)
    for addr, size, flags, data in pieces:
        if merged and addr <= merged[-1][0] + len(merged[-1][1]):
            maddr, mdata, mflags = merged[-1]
            end = addr + size
            if end > maddr + len(mdata):
                mdata.extend(data[maddr + len(mdata) - addr :])
            merged[-1] = (maddr, mdata, mflags | flags)
        else:
            merged.append((addr, bytearray(data), flags))
    return [Region(a, len(d), f, bytes(d) if f & IN else None) for a, d, f in merged]


def gather(name: str, args: Any, read: Reader, budget: int) -> tuple[Region, ...]:
    """The regions to send with ioctl ``name`` (an ``LX_*`` macro name) for struct ``args``.

    ``budget`` bounds the bytes the regions may span in total (the wire's message limit minus
    what the struct and the region table take); buffers past it are left out.
    """
    row = USERBUFS.get(name)
    if not row:
        return ()
    pieces: list[tuple[int, int, int, bytes]] = []
    _collect(row, args, read, budget, pieces)
    regions = _merge(pieces)
    kept: list[Region] = []
    used = 0
    for r in regions:
        cost = r.length + 16  # its bytes (carried or returned) and its table entry
        if used + cost > budget:
            continue
        used += cost
        kept.append(r)
    return tuple(kept)
