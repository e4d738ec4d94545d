"""``/dev/dxg`` ioctl numbers, computed the way ``d3dkmthk.h`` does: ``_IOWR('G', nr, struct)``.

Every code is derived from the ctypes class's ``sizeof``, so a wrong struct size shows up as
a wrong ioctl code (and the real driver answers a wrong code with ``-ENOTTY``).

:data:`IOCTLS` maps ``nr`` to an :class:`IoctlDef` for all 68 header ioctls (0x01-0x44) plus
the 5 later ones (0x45-0x49).  ``handled`` is False for the 8 numbers that the driver's
``ioctls[]`` table leaves empty (they return ``-ENOTTY``): 0x03 CreateContext, 0x17
CreateHwContext, 0x1a DestroyHwContext, 0x23 GetSharedResourceAdapterLuid, 0x28 OpenResource,
0x29 OpenSynchronizationObject, 0x2b QueryResourceInfo, 0x2d Render.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from types import MappingProxyType

from . import structs as s

# ---------------------------------------------------------------------------------------------
# <asm-generic/ioctl.h> (x86-64): nr 8 bits, type 8 bits, size 14 bits, dir 2 bits.

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_DIRBITS = 2

_IOC_NRMASK = (1 << _IOC_NRBITS) - 1
_IOC_TYPEMASK = (1 << _IOC_TYPEBITS) - 1
_IOC_SIZEMASK = (1 << _IOC_SIZEBITS) - 1
_IOC_DIRMASK = (1 << _IOC_DIRBITS) - 1

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _type_code(type_: int | str) -> int:
    code = ord(type_) if isinstance(type_, str) else int(type_)
    if not 0 <= code <= _IOC_TYPEMASK:
        raise ValueError(f"ioctl type {type_!r} out of range")
    return code


def _size_of(size: int | type) -> int:
    n = size if isinstance(size, int) else ctypes.sizeof(size)
    if not 0 <= n <= _IOC_SIZEMASK:
        raise ValueError(f"ioctl argument size {n} does not fit in {_IOC_SIZEBITS} bits")
    return n


def _IOC(dir_: int, type_: int | str, nr: int, size: int | type) -> int:
    """``_IOC(dir, type, nr, size)``; ``size`` may be a byte count or a ctypes type."""
    if not 0 <= dir_ <= _IOC_DIRMASK:
        raise ValueError(f"ioctl direction {dir_!r} out of range")
    if not 0 <= nr <= _IOC_NRMASK:
        raise ValueError(f"ioctl nr {nr!r} out of range")
    return (
        (dir_ << _IOC_DIRSHIFT)
        | (_type_code(type_) << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (_size_of(size) << _IOC_SIZESHIFT)
    )


def _IO(type_: int | str, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int | str, nr: int, size: int | type) -> int:
    return _IOC(_IOC_READ, type_, nr, size)


def _IOW(type_: int | str, nr: int, size: int | type) -> int:
    return _IOC(_IOC_WRITE, type_, nr, size)


def _IOWR(type_: int | str, nr: int, size: int | type) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, size)


def _IOC_DIR(cmd: int) -> int:
    return (cmd >> _IOC_DIRSHIFT) & _IOC_DIRMASK


def _IOC_TYPE(cmd: int) -> int:
    return (cmd >> _IOC_TYPESHIFT) & _IOC_TYPEMASK


def _IOC_NR(cmd: int) -> int:
    return (cmd >> _IOC_NRSHIFT) & _IOC_NRMASK


def _IOC_SIZE(cmd: int) -> int:
    return (cmd >> _IOC_SIZESHIFT) & _IOC_SIZEMASK


# ---------------------------------------------------------------------------------------------
# Numeric #defines of d3dkmthk.h.

D3DDDI_MAX_WRITTEN_PRIMARIES = 16
D3DDDI_MAX_MPO_PRESENT_DIRTY_RECTS = 0xFFF
D3DKMT_CREATEALLOCATION_MAX = 1024
D3DKMT_MAKERESIDENT_ALLOC_MAX = 1024 * 10
D3DKMT_ADAPTERS_MAX = 64
D3DDDI_MAX_BROADCAST_CONTEXT = 64
D3DDDI_MAX_OBJECT_WAITED_ON = 32
D3DDDI_MAX_OBJECT_SIGNALED = 32
LX_IO_MAX = 0x44  # highest ioctl nr in the header

# Not in the header: the ioctl type ('G') and the highest nr of the later driver (0x49,
# LX_ISFEATUREENABLED), whose dispatch table has slots 0x00..LX_IO_MAX_SUPPLEMENT.
LX_DXGK_IOCTL_TYPE = 0x47
LX_IO_MAX_SUPPLEMENT = 0x49

# Slots of the driver's table that have no handler (-ENOTTY).
UNHANDLED_IOCTL_NRS = frozenset({0x03, 0x17, 0x1A, 0x23, 0x28, 0x29, 0x2B, 0x2D})

_G = LX_DXGK_IOCTL_TYPE

# ---------------------------------------------------------------------------------------------
# The ioctls, in nr order.  0x01-0x44: the header; 0x45-0x49: the later patch series.

LX_DXOPENADAPTERFROMLUID = _IOWR(_G, 0x01, s.d3dkmt_openadapterfromluid)
LX_DXCREATEDEVICE = _IOWR(_G, 0x02, s.d3dkmt_createdevice)
LX_DXCREATECONTEXT = _IOWR(_G, 0x03, s.d3dkmt_createcontext)
LX_DXCREATECONTEXTVIRTUAL = _IOWR(_G, 0x04, s.d3dkmt_createcontextvirtual)
LX_DXDESTROYCONTEXT = _IOWR(_G, 0x05, s.d3dkmt_destroycontext)
LX_DXCREATEALLOCATION = _IOWR(_G, 0x06, s.d3dkmt_createallocation)
LX_DXCREATEPAGINGQUEUE = _IOWR(_G, 0x07, s.d3dkmt_createpagingqueue)
LX_DXRESERVEGPUVIRTUALADDRESS = _IOWR(_G, 0x08, s.d3dddi_reservegpuvirtualaddress)
LX_DXQUERYADAPTERINFO = _IOWR(_G, 0x09, s.d3dkmt_queryadapterinfo)
LX_DXQUERYVIDEOMEMORYINFO = _IOWR(_G, 0x0A, s.d3dkmt_queryvideomemoryinfo)
LX_DXMAKERESIDENT = _IOWR(_G, 0x0B, s.d3dddi_makeresident)
LX_DXMAPGPUVIRTUALADDRESS = _IOWR(_G, 0x0C, s.d3dddi_mapgpuvirtualaddress)
LX_DXESCAPE = _IOWR(_G, 0x0D, s.d3dkmt_escape)
LX_DXGETDEVICESTATE = _IOWR(_G, 0x0E, s.d3dkmt_getdevicestate)
LX_DXSUBMITCOMMAND = _IOWR(_G, 0x0F, s.d3dkmt_submitcommand)
LX_DXCREATESYNCHRONIZATIONOBJECT = _IOWR(_G, 0x10, s.d3dkmt_createsynchronizationobject2)
LX_DXSIGNALSYNCHRONIZATIONOBJECT = _IOWR(_G, 0x11, s.d3dkmt_signalsynchronizationobject2)
LX_DXWAITFORSYNCHRONIZATIONOBJECT = _IOWR(_G, 0x12, s.d3dkmt_waitforsynchronizationobject2)
LX_DXDESTROYALLOCATION2 = _IOWR(_G, 0x13, s.d3dkmt_destroyallocation2)
LX_DXENUMADAPTERS2 = _IOWR(_G, 0x14, s.d3dkmt_enumadapters2)
LX_DXCLOSEADAPTER = _IOWR(_G, 0x15, s.d3dkmt_closeadapter)
LX_DXCHANGEVIDEOMEMORYRESERVATION = _IOWR(_G, 0x16, s.d3dkmt_changevideomemoryreservation)
LX_DXCREATEHWCONTEXT = _IOWR(_G, 0x17, s.d3dkmt_createhwcontext)
LX_DXCREATEHWQUEUE = _IOWR(_G, 0x18, s.d3dkmt_createhwqueue)
LX_DXDESTROYDEVICE = _IOWR(_G, 0x19, s.d3dkmt_destroydevice)
LX_DXDESTROYHWCONTEXT = _IOWR(_G, 0x1A, s.d3dkmt_destroyhwcontext)
LX_DXDESTROYHWQUEUE = _IOWR(_G, 0x1B, s.d3dkmt_destroyhwqueue)
LX_DXDESTROYPAGINGQUEUE = _IOWR(_G, 0x1C, s.d3dddi_destroypagingqueue)
LX_DXDESTROYSYNCHRONIZATIONOBJECT = _IOWR(_G, 0x1D, s.d3dkmt_destroysynchronizationobject)
LX_DXEVICT = _IOWR(_G, 0x1E, s.d3dkmt_evict)
LX_DXFLUSHHEAPTRANSITIONS = _IOWR(_G, 0x1F, s.d3dkmt_flushheaptransitions)
LX_DXFREEGPUVIRTUALADDRESS = _IOWR(_G, 0x20, s.d3dkmt_freegpuvirtualaddress)
LX_DXGETCONTEXTINPROCESSSCHEDULINGPRIORITY = _IOWR(
    _G, 0x21, s.d3dkmt_getcontextinprocessschedulingpriority
)
LX_DXGETCONTEXTSCHEDULINGPRIORITY = _IOWR(_G, 0x22, s.d3dkmt_getcontextschedulingpriority)
LX_DXGETSHAREDRESOURCEADAPTERLUID = _IOWR(_G, 0x23, s.d3dkmt_getsharedresourceadapterluid)
LX_DXINVALIDATECACHE = _IOWR(_G, 0x24, s.d3dkmt_invalidatecache)
LX_DXLOCK2 = _IOWR(_G, 0x25, s.d3dkmt_lock2)
LX_DXMARKDEVICEASERROR = _IOWR(_G, 0x26, s.d3dkmt_markdeviceaserror)
LX_DXOFFERALLOCATIONS = _IOWR(_G, 0x27, s.d3dkmt_offerallocations)
LX_DXOPENRESOURCE = _IOWR(_G, 0x28, s.d3dkmt_openresource)
LX_DXOPENSYNCHRONIZATIONOBJECT = _IOWR(_G, 0x29, s.d3dkmt_opensynchronizationobject)
LX_DXQUERYALLOCATIONRESIDENCY = _IOWR(_G, 0x2A, s.d3dkmt_queryallocationresidency)
LX_DXQUERYRESOURCEINFO = _IOWR(_G, 0x2B, s.d3dkmt_queryresourceinfo)
LX_DXRECLAIMALLOCATIONS2 = _IOWR(_G, 0x2C, s.d3dkmt_reclaimallocations2)
LX_DXRENDER = _IOWR(_G, 0x2D, s.d3dkmt_render)
LX_DXSETALLOCATIONPRIORITY = _IOWR(_G, 0x2E, s.d3dkmt_setallocationpriority)
LX_DXSETCONTEXTINPROCESSSCHEDULINGPRIORITY = _IOWR(
    _G, 0x2F, s.d3dkmt_setcontextinprocessschedulingpriority
)
LX_DXSETCONTEXTSCHEDULINGPRIORITY = _IOWR(_G, 0x30, s.d3dkmt_setcontextschedulingpriority)
LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMCPU = _IOWR(
    _G, 0x31, s.d3dkmt_signalsynchronizationobjectfromcpu
)
LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMGPU = _IOWR(
    _G, 0x32, s.d3dkmt_signalsynchronizationobjectfromgpu
)
LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMGPU2 = _IOWR(
    _G, 0x33, s.d3dkmt_signalsynchronizationobjectfromgpu2
)
LX_DXSUBMITCOMMANDTOHWQUEUE = _IOWR(_G, 0x34, s.d3dkmt_submitcommandtohwqueue)
LX_DXSUBMITSIGNALSYNCOBJECTSTOHWQUEUE = _IOWR(_G, 0x35, s.d3dkmt_submitsignalsyncobjectstohwqueue)
LX_DXSUBMITWAITFORSYNCOBJECTSTOHWQUEUE = _IOWR(_G, 0x36, s.d3dkmt_submitwaitforsyncobjectstohwqueue)
LX_DXUNLOCK2 = _IOWR(_G, 0x37, s.d3dkmt_unlock2)
LX_DXUPDATEALLOCPROPERTY = _IOWR(_G, 0x38, s.d3dddi_updateallocproperty)
LX_DXUPDATEGPUVIRTUALADDRESS = _IOWR(_G, 0x39, s.d3dkmt_updategpuvirtualaddress)
LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU = _IOWR(
    _G, 0x3A, s.d3dkmt_waitforsynchronizationobjectfromcpu
)
LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMGPU = _IOWR(
    _G, 0x3B, s.d3dkmt_waitforsynchronizationobjectfromgpu
)
LX_DXGETALLOCATIONPRIORITY = _IOWR(_G, 0x3C, s.d3dkmt_getallocationpriority)
LX_DXQUERYCLOCKCALIBRATION = _IOWR(_G, 0x3D, s.d3dkmt_queryclockcalibration)
LX_DXENUMADAPTERS3 = _IOWR(_G, 0x3E, s.d3dkmt_enumadapters3)
LX_DXSHAREOBJECTS = _IOWR(_G, 0x3F, s.d3dkmt_shareobjects)
LX_DXOPENSYNCOBJECTFROMNTHANDLE2 = _IOWR(_G, 0x40, s.d3dkmt_opensyncobjectfromnthandle2)
LX_DXQUERYRESOURCEINFOFROMNTHANDLE = _IOWR(_G, 0x41, s.d3dkmt_queryresourceinfofromnthandle)
LX_DXOPENRESOURCEFROMNTHANDLE = _IOWR(_G, 0x42, s.d3dkmt_openresourcefromnthandle)
LX_DXQUERYSTATISTICS = _IOWR(_G, 0x43, s.d3dkmt_querystatistics)
LX_DXSHAREOBJECTWITHHOST = _IOWR(_G, 0x44, s.d3dkmt_shareobjectwithhost)
LX_DXCREATESYNCFILE = _IOWR(_G, 0x45, s.d3dkmt_createsyncfile)
LX_DXWAITSYNCFILE = _IOWR(_G, 0x46, s.d3dkmt_waitsyncfile)
LX_DXOPENSYNCOBJECTFROMSYNCFILE = _IOWR(_G, 0x47, s.d3dkmt_opensyncobjectfromsyncfile)
LX_DXENUMPROCESSES = _IOWR(_G, 0x48, s.d3dkmt_enumprocesses)
LX_ISFEATUREENABLED = _IOWR(_G, 0x49, s.d3dkmt_isfeatureenabled)


@dataclass(frozen=True, slots=True)
class IoctlDef:
    """One ``/dev/dxg`` ioctl: number, macro name, full command code and argument struct."""

    nr: int
    name: str
    code: int
    struct: type[ctypes.Structure]
    size: int
    handled: bool

    @property
    def hex(self) -> str:
        return f"0x{self.code:08x}"


def _def(name: str, code: int, struct: type[ctypes.Structure]) -> IoctlDef:
    nr = _IOC_NR(code)
    size = ctypes.sizeof(struct)
    if _IOC_SIZE(code) != size or _IOC_TYPE(code) != LX_DXGK_IOCTL_TYPE:
        raise AssertionError(f"{name}: code 0x{code:08x} does not match {struct.__name__}")
    return IoctlDef(nr, name, code, struct, size, nr not in UNHANDLED_IOCTL_NRS)


_ALL = (
    _def("LX_DXOPENADAPTERFROMLUID", LX_DXOPENADAPTERFROMLUID, s.d3dkmt_openadapterfromluid),
    _def("LX_DXCREATEDEVICE", LX_DXCREATEDEVICE, s.d3dkmt_createdevice),
    _def("LX_DXCREATECONTEXT", LX_DXCREATECONTEXT, s.d3dkmt_createcontext),
    _def("LX_DXCREATECONTEXTVIRTUAL", LX_DXCREATECONTEXTVIRTUAL, s.d3dkmt_createcontextvirtual),
    _def("LX_DXDESTROYCONTEXT", LX_DXDESTROYCONTEXT, s.d3dkmt_destroycontext),
    _def("LX_DXCREATEALLOCATION", LX_DXCREATEALLOCATION, s.d3dkmt_createallocation),
    _def("LX_DXCREATEPAGINGQUEUE", LX_DXCREATEPAGINGQUEUE, s.d3dkmt_createpagingqueue),
    _def(
        "LX_DXRESERVEGPUVIRTUALADDRESS",
        LX_DXRESERVEGPUVIRTUALADDRESS,
        s.d3dddi_reservegpuvirtualaddress,
    ),
    _def("LX_DXQUERYADAPTERINFO", LX_DXQUERYADAPTERINFO, s.d3dkmt_queryadapterinfo),
    _def("LX_DXQUERYVIDEOMEMORYINFO", LX_DXQUERYVIDEOMEMORYINFO, s.d3dkmt_queryvideomemoryinfo),
    _def("LX_DXMAKERESIDENT", LX_DXMAKERESIDENT, s.d3dddi_makeresident),
    _def("LX_DXMAPGPUVIRTUALADDRESS", LX_DXMAPGPUVIRTUALADDRESS, s.d3dddi_mapgpuvirtualaddress),
    _def("LX_DXESCAPE", LX_DXESCAPE, s.d3dkmt_escape),
    _def("LX_DXGETDEVICESTATE", LX_DXGETDEVICESTATE, s.d3dkmt_getdevicestate),
    _def("LX_DXSUBMITCOMMAND", LX_DXSUBMITCOMMAND, s.d3dkmt_submitcommand),
    _def(
        "LX_DXCREATESYNCHRONIZATIONOBJECT",
        LX_DXCREATESYNCHRONIZATIONOBJECT,
        s.d3dkmt_createsynchronizationobject2,
    ),
    _def(
        "LX_DXSIGNALSYNCHRONIZATIONOBJECT",
        LX_DXSIGNALSYNCHRONIZATIONOBJECT,
        s.d3dkmt_signalsynchronizationobject2,
    ),
    _def(
        "LX_DXWAITFORSYNCHRONIZATIONOBJECT",
        LX_DXWAITFORSYNCHRONIZATIONOBJECT,
        s.d3dkmt_waitforsynchronizationobject2,
    ),
    _def("LX_DXDESTROYALLOCATION2", LX_DXDESTROYALLOCATION2, s.d3dkmt_destroyallocation2),
    _def("LX_DXENUMADAPTERS2", LX_DXENUMADAPTERS2, s.d3dkmt_enumadapters2),
    _def("LX_DXCLOSEADAPTER", LX_DXCLOSEADAPTER, s.d3dkmt_closeadapter),
    _def(
        "LX_DXCHANGEVIDEOMEMORYRESERVATION",
        LX_DXCHANGEVIDEOMEMORYRESERVATION,
        s.d3dkmt_changevideomemoryreservation,
    ),
    _def("LX_DXCREATEHWCONTEXT", LX_DXCREATEHWCONTEXT, s.d3dkmt_createhwcontext),
    _def("LX_DXCREATEHWQUEUE", LX_DXCREATEHWQUEUE, s.d3dkmt_createhwqueue),
    _def("LX_DXDESTROYDEVICE", LX_DXDESTROYDEVICE, s.d3dkmt_destroydevice),
    _def("LX_DXDESTROYHWCONTEXT", LX_DXDESTROYHWCONTEXT, s.d3dkmt_destroyhwcontext),
    _def("LX_DXDESTROYHWQUEUE", LX_DXDESTROYHWQUEUE, s.d3dkmt_destroyhwqueue),
    _def("LX_DXDESTROYPAGINGQUEUE", LX_DXDESTROYPAGINGQUEUE, s.d3dddi_destroypagingqueue),
    _def(
        "LX_DXDESTROYSYNCHRONIZATIONOBJECT",
        LX_DXDESTROYSYNCHRONIZATIONOBJECT,
        s.d3dkmt_destroysynchronizationobject,
    ),
    _def("LX_DXEVICT", LX_DXEVICT, s.d3dkmt_evict),
    _def("LX_DXFLUSHHEAPTRANSITIONS", LX_DXFLUSHHEAPTRANSITIONS, s.d3dkmt_flushheaptransitions),
    _def("LX_DXFREEGPUVIRTUALADDRESS", LX_DXFREEGPUVIRTUALADDRESS, s.d3dkmt_freegpuvirtualaddress),
    _def(
        "LX_DXGETCONTEXTINPROCESSSCHEDULINGPRIORITY",
        LX_DXGETCONTEXTINPROCESSSCHEDULINGPRIORITY,
        s.d3dkmt_getcontextinprocessschedulingpriority,
    ),
    _def(
        "LX_DXGETCONTEXTSCHEDULINGPRIORITY",
        LX_DXGETCONTEXTSCHEDULINGPRIORITY,
        s.d3dkmt_getcontextschedulingpriority,
    ),
    _def(
        "LX_DXGETSHAREDRESOURCEADAPTERLUID",
        LX_DXGETSHAREDRESOURCEADAPTERLUID,
        s.d3dkmt_getsharedresourceadapterluid,
    ),
    _def("LX_DXINVALIDATECACHE", LX_DXINVALIDATECACHE, s.d3dkmt_invalidatecache),
    _def("LX_DXLOCK2", LX_DXLOCK2, s.d3dkmt_lock2),
    _def("LX_DXMARKDEVICEASERROR", LX_DXMARKDEVICEASERROR, s.d3dkmt_markdeviceaserror),
    _def("LX_DXOFFERALLOCATIONS", LX_DXOFFERALLOCATIONS, s.d3dkmt_offerallocations),
    _def("LX_DXOPENRESOURCE", LX_DXOPENRESOURCE, s.d3dkmt_openresource),
    _def(
        "LX_DXOPENSYNCHRONIZATIONOBJECT",
        LX_DXOPENSYNCHRONIZATIONOBJECT,
        s.d3dkmt_opensynchronizationobject,
    ),
    _def(
        "LX_DXQUERYALLOCATIONRESIDENCY",
        LX_DXQUERYALLOCATIONRESIDENCY,
        s.d3dkmt_queryallocationresidency,
    ),
    _def("LX_DXQUERYRESOURCEINFO", LX_DXQUERYRESOURCEINFO, s.d3dkmt_queryresourceinfo),
    _def("LX_DXRECLAIMALLOCATIONS2", LX_DXRECLAIMALLOCATIONS2, s.d3dkmt_reclaimallocations2),
    _def("LX_DXRENDER", LX_DXRENDER, s.d3dkmt_render),
    _def("LX_DXSETALLOCATIONPRIORITY", LX_DXSETALLOCATIONPRIORITY, s.d3dkmt_setallocationpriority),
    _def(
        "LX_DXSETCONTEXTINPROCESSSCHEDULINGPRIORITY",
        LX_DXSETCONTEXTINPROCESSSCHEDULINGPRIORITY,
        s.d3dkmt_setcontextinprocessschedulingpriority,
    ),
    _def(
        "LX_DXSETCONTEXTSCHEDULINGPRIORITY",
        LX_DXSETCONTEXTSCHEDULINGPRIORITY,
        s.d3dkmt_setcontextschedulingpriority,
    ),
    _def(
        "LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMCPU",
        LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMCPU,
        s.d3dkmt_signalsynchronizationobjectfromcpu,
    ),
    _def(
        "LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMGPU",
        LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMGPU,
        s.d3dkmt_signalsynchronizationobjectfromgpu,
    ),
    _def(
        "LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMGPU2",
        LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMGPU2,
        s.d3dkmt_signalsynchronizationobjectfromgpu2,
    ),
    _def(
        "LX_DXSUBMITCOMMANDTOHWQUEUE",
        LX_DXSUBMITCOMMANDTOHWQUEUE,
        s.d3dkmt_submitcommandtohwqueue,
    ),
    _def(
        "LX_DXSUBMITSIGNALSYNCOBJECTSTOHWQUEUE",
        LX_DXSUBMITSIGNALSYNCOBJECTSTOHWQUEUE,
        s.d3dkmt_submitsignalsyncobjectstohwqueue,
    ),
    _def(
        "LX_DXSUBMITWAITFORSYNCOBJECTSTOHWQUEUE",
        LX_DXSUBMITWAITFORSYNCOBJECTSTOHWQUEUE,
        s.d3dkmt_submitwaitforsyncobjectstohwqueue,
    ),
    _def("LX_DXUNLOCK2", LX_DXUNLOCK2, s.d3dkmt_unlock2),
    _def("LX_DXUPDATEALLOCPROPERTY", LX_DXUPDATEALLOCPROPERTY, s.d3dddi_updateallocproperty),
    _def(
        "LX_DXUPDATEGPUVIRTUALADDRESS",
        LX_DXUPDATEGPUVIRTUALADDRESS,
        s.d3dkmt_updategpuvirtualaddress,
    ),
    _def(
        "LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU",
        LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU,
        s.d3dkmt_waitforsynchronizationobjectfromcpu,
    ),
    _def(
        "LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMGPU",
        LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMGPU,
        s.d3dkmt_waitforsynchronizationobjectfromgpu,
    ),
    _def("LX_DXGETALLOCATIONPRIORITY", LX_DXGETALLOCATIONPRIORITY, s.d3dkmt_getallocationpriority),
    _def("LX_DXQUERYCLOCKCALIBRATION", LX_DXQUERYCLOCKCALIBRATION, s.d3dkmt_queryclockcalibration),
    _def("LX_DXENUMADAPTERS3", LX_DXENUMADAPTERS3, s.d3dkmt_enumadapters3),
    _def("LX_DXSHAREOBJECTS", LX_DXSHAREOBJECTS, s.d3dkmt_shareobjects),
    _def(
        "LX_DXOPENSYNCOBJECTFROMNTHANDLE2",
        LX_DXOPENSYNCOBJECTFROMNTHANDLE2,
        s.d3dkmt_opensyncobjectfromnthandle2,
    ),
    _def(
        "LX_DXQUERYRESOURCEINFOFROMNTHANDLE",
        LX_DXQUERYRESOURCEINFOFROMNTHANDLE,
        s.d3dkmt_queryresourceinfofromnthandle,
    ),
    _def(
        "LX_DXOPENRESOURCEFROMNTHANDLE",
        LX_DXOPENRESOURCEFROMNTHANDLE,
        s.d3dkmt_openresourcefromnthandle,
    ),
    _def("LX_DXQUERYSTATISTICS", LX_DXQUERYSTATISTICS, s.d3dkmt_querystatistics),
    _def("LX_DXSHAREOBJECTWITHHOST", LX_DXSHAREOBJECTWITHHOST, s.d3dkmt_shareobjectwithhost),
    _def("LX_DXCREATESYNCFILE", LX_DXCREATESYNCFILE, s.d3dkmt_createsyncfile),
    _def("LX_DXWAITSYNCFILE", LX_DXWAITSYNCFILE, s.d3dkmt_waitsyncfile),
    _def(
        "LX_DXOPENSYNCOBJECTFROMSYNCFILE",
        LX_DXOPENSYNCOBJECTFROMSYNCFILE,
        s.d3dkmt_opensyncobjectfromsyncfile,
    ),
    _def("LX_DXENUMPROCESSES", LX_DXENUMPROCESSES, s.d3dkmt_enumprocesses),
    _def("LX_ISFEATUREENABLED", LX_ISFEATUREENABLED, s.d3dkmt_isfeatureenabled),
)

IOCTLS: MappingProxyType[int, IoctlDef] = MappingProxyType({d.nr: d for d in _ALL})
IOCTLS_BY_NAME: MappingProxyType[str, IoctlDef] = MappingProxyType({d.name: d for d in _ALL})
IOCTLS_BY_CODE: MappingProxyType[int, IoctlDef] = MappingProxyType({d.code: d for d in _ALL})

# The ioctls of the header itself (0x01..LX_IO_MAX) and the later ones.
HEADER_IOCTL_NRS = frozenset(nr for nr in IOCTLS if nr <= LX_IO_MAX)
SUPPLEMENT_IOCTL_NRS = frozenset(nr for nr in IOCTLS if nr > LX_IO_MAX)


def lookup_ioctl(cmd: int) -> IoctlDef | None:
    """The ioctl for command ``cmd`` the way the driver dispatches it, or None (``-ENOTTY``).

    Like ``dxgk_ioctl``: index the table by ``_IOC_NR(cmd)`` and require the *whole* 32-bit
    command (direction, type, size) to match; empty slots count as no match.
    """
    entry = IOCTLS.get(_IOC_NR(cmd))
    if entry is None or entry.code != cmd or not entry.handled:
        return None
    return entry


__all__ = (
    "D3DDDI_MAX_BROADCAST_CONTEXT",
    "D3DDDI_MAX_MPO_PRESENT_DIRTY_RECTS",
    "D3DDDI_MAX_OBJECT_SIGNALED",
    "D3DDDI_MAX_OBJECT_WAITED_ON",
    "D3DDDI_MAX_WRITTEN_PRIMARIES",
    "D3DKMT_ADAPTERS_MAX",
    "D3DKMT_CREATEALLOCATION_MAX",
    "D3DKMT_MAKERESIDENT_ALLOC_MAX",
    "HEADER_IOCTL_NRS",
    "IOCTLS",
    "IOCTLS_BY_CODE",
    "IOCTLS_BY_NAME",
    "LX_DXGK_IOCTL_TYPE",
    "LX_IO_MAX",
    "LX_IO_MAX_SUPPLEMENT",
    "SUPPLEMENT_IOCTL_NRS",
    "UNHANDLED_IOCTL_NRS",
    "_IO",
    "_IOC",
    "_IOC_DIR",
    "_IOC_NONE",
    "_IOC_NR",
    "_IOC_READ",
    "_IOC_SIZE",
    "_IOC_TYPE",
    "_IOC_WRITE",
    "_IOR",
    "_IOW",
    "_IOWR",
    "IoctlDef",
    "lookup_ioctl",
    *(d.name for d in _ALL),
)
