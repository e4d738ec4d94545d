"""Windows (WDDM) QueryAdapterInfo payloads, which the Linux UAPI header does not define.

``LX_DXQUERYADAPTERINFO`` carries a ``KMTQUERYADAPTERINFOTYPE`` and an opaque buffer that the
guest driver forwards to the host; the buffer holds one of the Windows ``D3DKMT_*`` structs
below.  Names, members and values follow ``microsoft/libdxg`` (``include/dxg/d3dkmthk.h`` and
``include/dxg/d3dkmdt.h``, the headers libdxg builds with, WDDM 3.x interface version).

Layouts are the *wire* layout, i.e. what crosses ``/dev/dxg`` on x86-64 Linux:

* UINT/ULONG/UINT32 are 4 bytes, BOOL is a 4-byte int, BOOLEAN 1 byte, ULONGLONG/LARGE_INTEGER
  8 bytes (DirectX-Headers ``wsl/winadapter.h`` typedefs; ``D3DKMT_ALIGN64`` = 8-byte aligned).
* **WCHAR is 2 bytes (UTF-16LE) on the wire.**  Note that libdxg's own C ``WCHAR`` is *not*:
  DirectX-Headers ``wsl/winadapter.h`` has ``typedef wchar_t WCHAR`` (4 bytes on Linux), and
  libdxg's ``d3dukmdt.h`` says "a thunking layer is still used for wchar_t translation, where
  Windows uses 16-bit characters and non-Windows uses 32-bit characters".  That thunk is
  ``D3DKMTQueryAdapterInfo`` in libdxg ``src/d3dkmt-wsl.cpp``: when ``sizeof(wchar_t) != 2`` it
  sends ``*_WCHAR16`` copies of these structs (``char16_t`` strings) to the ioctl and widens
  the reply.  The classes here are those ``char16_t`` wire forms (the ``*_WCHAR16`` names are
  aliases), so a UMDFILENAMEINFO is 524 bytes here, 1044 in libdxg's C API.
* Everything that ``d3dkmdt.h`` declares after its ``#pragma pack(push, 1)`` (the WDDM 1.3+
  caps, ``DXGK_NODEMETADATA`` and ``D3DKMT_NODEMETADATA``, ``D3DKMT_DRIVERCAPS_EXT``,
  ``D3DKMT_DISPLAY_CAPS``) is packed, so those have alignment 1; libdxg's
  ``D3DKMT_NODEMETADATA_WCHAR16`` is packed as well.

Each class carries ``_c_kind_``, ``_c_tag_``, ``_c_typedef_`` and ``_c_types_`` (member, C type
as ``dxg.uapi.cheader`` writes it, with ``__u16`` for WCHAR) like the classes of ``structs``.
"""

from __future__ import annotations

import ctypes
import enum
from types import MappingProxyType

MAX_PATH = 260
DXGK_MAX_METADATA_NAME_LENGTH = 32

__all__ = (
    "D3DKMDT_COMPUTE_PREEMPTION_GRANULARITY",
    "D3DKMDT_GRAPHICS_PREEMPTION_GRANULARITY",
    "D3DKMDT_PREEMPTION_CAPS",
    "D3DKMT_ADAPTERADDRESS",
    "D3DKMT_ADAPTERREGISTRYINFO",
    "D3DKMT_ADAPTERREGISTRYINFO_WCHAR16",
    "D3DKMT_ADAPTERTYPE",
    "D3DKMT_DEVICE_IDS",
    "D3DKMT_DISPLAY_CAPS",
    "D3DKMT_DRIVERCAPS_EXT",
    "D3DKMT_DRIVERVERSION",
    "D3DKMT_DRIVER_DESCRIPTION",
    "D3DKMT_DRIVER_DESCRIPTION_WCHAR16",
    "D3DKMT_GPUMMU_CAPS",
    "D3DKMT_KMD_DRIVER_VERSION",
    "D3DKMT_NODEMETADATA",
    "D3DKMT_NODEMETADATA_WCHAR16",
    "D3DKMT_OPENGLINFO",
    "D3DKMT_OPENGLINFO_WCHAR16",
    "D3DKMT_PARAVIRTUALIZATION",
    "D3DKMT_PHYSICAL_ADAPTER_COUNT",
    "D3DKMT_QUERY_ADAPTER_UNIQUE_GUID",
    "D3DKMT_QUERY_ADAPTER_UNIQUE_GUID_WCHAR16",
    "D3DKMT_QUERY_DEVICE_IDS",
    "D3DKMT_QUERY_GPUMMU_CAPS",
    "D3DKMT_SEGMENTGROUPSIZEINFO",
    "D3DKMT_SEGMENTSIZEINFO",
    "D3DKMT_UMDFILENAMEINFO",
    "D3DKMT_UMDFILENAMEINFO_WCHAR16",
    "D3DKMT_UMD_DRIVER_VERSION",
    "D3DKMT_WDDM_1_2_CAPS",
    "D3DKMT_WDDM_1_3_CAPS",
    "D3DKMT_WDDM_2_0_CAPS",
    "D3DKMT_WDDM_2_7_CAPS",
    "D3DKMT_WDDM_2_9_CAPS",
    "D3DKMT_WDDM_3_0_CAPS",
    "DXGK_ENGINE_TYPE",
    "DXGK_MAX_METADATA_NAME_LENGTH",
    "DXGK_NODEMETADATA",
    "DXGK_NODEMETADATA_FLAGS",
    "KMTQUERYADAPTERINFOTYPE",
    "KMTUMDVERSION",
    "MAX_PATH",
    "QAI_PAYLOADS",
    "WDDM_ENUMS",
    "WDDM_STRUCTS",
    "decode_utf16z",
    "encode_utf16z",
)

_U8 = ctypes.c_uint8
_U16 = ctypes.c_uint16
_U32 = ctypes.c_uint32
_S32 = ctypes.c_int32
_U64 = ctypes.c_uint64
_S64 = ctypes.c_int64
_WCHAR = ctypes.c_uint16  # UTF-16 code unit (wire form of WCHAR)


# ---------------------------------------------------------------------------------------------
# Enums


class KMTQUERYADAPTERINFOTYPE(enum.IntEnum):
    """``KMTQUERYADAPTERINFOTYPE`` (libdxg include/dxg/d3dkmthk.h), every value.

    libdxg spells value 64 ``KMTQUITYPE_GPUVERSION`` (sic); ``KMTQAITYPE_GPUVERSION`` is the
    canonical member here and the libdxg spelling an alias.  Values 14 and 78+ are not defined.
    """

    KMTQAITYPE_UMDRIVERPRIVATE = 0
    KMTQAITYPE_UMDRIVERNAME = 1
    KMTQAITYPE_UMOPENGLINFO = 2
    KMTQAITYPE_GETSEGMENTSIZE = 3
    KMTQAITYPE_ADAPTERGUID = 4
    KMTQAITYPE_FLIPQUEUEINFO = 5
    KMTQAITYPE_ADAPTERADDRESS = 6
    KMTQAITYPE_SETWORKINGSETINFO = 7
    KMTQAITYPE_ADAPTERREGISTRYINFO = 8
    KMTQAITYPE_CURRENTDISPLAYMODE = 9
    KMTQAITYPE_MODELIST = 10
    KMTQAITYPE_CHECKDRIVERUPDATESTATUS = 11
    KMTQAITYPE_VIRTUALADDRESSINFO = 12
    KMTQAITYPE_DRIVERVERSION = 13
    KMTQAITYPE_ADAPTERTYPE = 15
    KMTQAITYPE_OUTPUTDUPLCONTEXTSCOUNT = 16
    KMTQAITYPE_WDDM_1_2_CAPS = 17
    KMTQAITYPE_UMD_DRIVER_VERSION = 18
    KMTQAITYPE_DIRECTFLIP_SUPPORT = 19
    KMTQAITYPE_MULTIPLANEOVERLAY_SUPPORT = 20
    KMTQAITYPE_DLIST_DRIVER_NAME = 21
    KMTQAITYPE_WDDM_1_3_CAPS = 22
    KMTQAITYPE_MULTIPLANEOVERLAY_HUD_SUPPORT = 23
    KMTQAITYPE_WDDM_2_0_CAPS = 24
    KMTQAITYPE_NODEMETADATA = 25
    KMTQAITYPE_CPDRIVERNAME = 26
    KMTQAITYPE_XBOX = 27
    KMTQAITYPE_INDEPENDENTFLIP_SUPPORT = 28
    KMTQAITYPE_MIRACASTCOMPANIONDRIVERNAME = 29
    KMTQAITYPE_PHYSICALADAPTERCOUNT = 30
    KMTQAITYPE_PHYSICALADAPTERDEVICEIDS = 31
    KMTQAITYPE_DRIVERCAPS_EXT = 32
    KMTQAITYPE_QUERY_MIRACAST_DRIVER_TYPE = 33
    KMTQAITYPE_QUERY_GPUMMU_CAPS = 34
    KMTQAITYPE_QUERY_MULTIPLANEOVERLAY_DECODE_SUPPORT = 35
    KMTQAITYPE_QUERY_HW_PROTECTION_TEARDOWN_COUNT = 36
    KMTQAITYPE_QUERY_ISBADDRIVERFORHWPROTECTIONDISABLED = 37
    KMTQAITYPE_MULTIPLANEOVERLAY_SECONDARY_SUPPORT = 38
    KMTQAITYPE_INDEPENDENTFLIP_SECONDARY_SUPPORT = 39
    KMTQAITYPE_PANELFITTER_SUPPORT = 40
    KMTQAITYPE_PHYSICALADAPTERPNPKEY = 41
    KMTQAITYPE_GETSEGMENTGROUPSIZE = 42
    KMTQAITYPE_MPO3DDI_SUPPORT = 43
    KMTQAITYPE_HWDRM_SUPPORT = 44
    KMTQAITYPE_MPOKERNELCAPS_SUPPORT = 45
    KMTQAITYPE_MULTIPLANEOVERLAY_STRETCH_SUPPORT = 46
    KMTQAITYPE_GET_DEVICE_VIDPN_OWNERSHIP_INFO = 47
    KMTQAITYPE_QUERYREGISTRY = 48
    KMTQAITYPE_KMD_DRIVER_VERSION = 49
    KMTQAITYPE_BLOCKLIST_KERNEL = 50
    KMTQAITYPE_BLOCKLIST_RUNTIME = 51
    KMTQAITYPE_ADAPTERGUID_RENDER = 52
    KMTQAITYPE_ADAPTERADDRESS_RENDER = 53
    KMTQAITYPE_ADAPTERREGISTRYINFO_RENDER = 54
    KMTQAITYPE_CHECKDRIVERUPDATESTATUS_RENDER = 55
    KMTQAITYPE_DRIVERVERSION_RENDER = 56
    KMTQAITYPE_ADAPTERTYPE_RENDER = 57
    KMTQAITYPE_WDDM_1_2_CAPS_RENDER = 58
    KMTQAITYPE_WDDM_1_3_CAPS_RENDER = 59
    KMTQAITYPE_QUERY_ADAPTER_UNIQUE_GUID = 60
    KMTQAITYPE_NODEPERFDATA = 61
    KMTQAITYPE_ADAPTERPERFDATA = 62
    KMTQAITYPE_ADAPTERPERFDATA_CAPS = 63
    KMTQAITYPE_GPUVERSION = 64
    KMTQUITYPE_GPUVERSION = 64  # libdxg's spelling
    KMTQAITYPE_DRIVER_DESCRIPTION = 65
    KMTQAITYPE_DRIVER_DESCRIPTION_RENDER = 66
    KMTQAITYPE_SCANOUT_CAPS = 67
    KMTQAITYPE_DISPLAY_UMDRIVERNAME = 71
    KMTQAITYPE_PARAVIRTUALIZATION_RENDER = 68
    KMTQAITYPE_SERVICENAME = 69
    KMTQAITYPE_WDDM_2_7_CAPS = 70
    KMTQAITYPE_TRACKEDWORKLOAD_SUPPORT = 72
    KMTQAITYPE_HYBRID_DLIST_DLL_SUPPORT = 73
    KMTQAITYPE_DISPLAY_CAPS = 74
    KMTQAITYPE_WDDM_2_9_CAPS = 75
    KMTQAITYPE_CROSSADAPTERRESOURCE_SUPPORT = 76
    KMTQAITYPE_WDDM_3_0_CAPS = 77


class KMTUMDVERSION(enum.IntEnum):
    """``KMTUMDVERSION`` (libdxg include/dxg/d3dkmthk.h)."""

    KMTUMDVERSION_DX9 = 0
    KMTUMDVERSION_DX10 = 1
    KMTUMDVERSION_DX11 = 2
    KMTUMDVERSION_DX12 = 3
    NUM_KMTUMDVERSIONS = 4


class D3DKMT_DRIVERVERSION(enum.IntEnum):
    """``D3DKMT_DRIVERVERSION`` (tag ``_QAI_DRIVERVERSION``; libdxg include/dxg/d3dkmthk.h).

    The KMTQAITYPE_DRIVERVERSION(_RENDER) payload is this enum (4 bytes).
    """

    KMT_DRIVERVERSION_WDDM_1_0 = 1000
    KMT_DRIVERVERSION_WDDM_1_1_PRERELEASE = 1102
    KMT_DRIVERVERSION_WDDM_1_1 = 1105
    KMT_DRIVERVERSION_WDDM_1_2 = 1200
    KMT_DRIVERVERSION_WDDM_1_3 = 1300
    KMT_DRIVERVERSION_WDDM_2_0 = 2000
    KMT_DRIVERVERSION_WDDM_2_1 = 2100
    KMT_DRIVERVERSION_WDDM_2_2 = 2200
    KMT_DRIVERVERSION_WDDM_2_3 = 2300
    KMT_DRIVERVERSION_WDDM_2_4 = 2400
    KMT_DRIVERVERSION_WDDM_2_5 = 2500
    KMT_DRIVERVERSION_WDDM_2_6 = 2600
    KMT_DRIVERVERSION_WDDM_2_7 = 2700
    KMT_DRIVERVERSION_WDDM_2_8 = 2800
    KMT_DRIVERVERSION_WDDM_2_9 = 2900
    KMT_DRIVERVERSION_WDDM_3_0 = 3000


class DXGK_ENGINE_TYPE(enum.IntEnum):
    """``DXGK_ENGINE_TYPE`` (untagged typedef; libdxg include/dxg/d3dkmdt.h)."""

    DXGK_ENGINE_TYPE_OTHER = 0
    DXGK_ENGINE_TYPE_3D = 1
    DXGK_ENGINE_TYPE_VIDEO_DECODE = 2
    DXGK_ENGINE_TYPE_VIDEO_ENCODE = 3
    DXGK_ENGINE_TYPE_VIDEO_PROCESSING = 4
    DXGK_ENGINE_TYPE_SCENE_ASSEMBLY = 5
    DXGK_ENGINE_TYPE_COPY = 6
    DXGK_ENGINE_TYPE_OVERLAY = 7
    DXGK_ENGINE_TYPE_CRYPTO = 8
    DXGK_ENGINE_TYPE_VIDEO_CODEC = 9
    DXGK_ENGINE_TYPE_MAX = 10


class D3DKMDT_GRAPHICS_PREEMPTION_GRANULARITY(enum.IntEnum):
    """``D3DKMDT_GRAPHICS_PREEMPTION_GRANULARITY`` (libdxg include/dxg/d3dkmdt.h)."""

    D3DKMDT_GRAPHICS_PREEMPTION_NONE = 0
    D3DKMDT_GRAPHICS_PREEMPTION_DMA_BUFFER_BOUNDARY = 100
    D3DKMDT_GRAPHICS_PREEMPTION_PRIMITIVE_BOUNDARY = 200
    D3DKMDT_GRAPHICS_PREEMPTION_TRIANGLE_BOUNDARY = 300
    D3DKMDT_GRAPHICS_PREEMPTION_PIXEL_BOUNDARY = 400
    D3DKMDT_GRAPHICS_PREEMPTION_SHADER_BOUNDARY = 500


class D3DKMDT_COMPUTE_PREEMPTION_GRANULARITY(enum.IntEnum):
    """``D3DKMDT_COMPUTE_PREEMPTION_GRANULARITY`` (libdxg include/dxg/d3dkmdt.h)."""

    D3DKMDT_COMPUTE_PREEMPTION_NONE = 0
    D3DKMDT_COMPUTE_PREEMPTION_DMA_BUFFER_BOUNDARY = 100
    D3DKMDT_COMPUTE_PREEMPTION_DISPATCH_BOUNDARY = 200
    D3DKMDT_COMPUTE_PREEMPTION_THREAD_GROUP_BOUNDARY = 300
    D3DKMDT_COMPUTE_PREEMPTION_THREAD_BOUNDARY = 400
    D3DKMDT_COMPUTE_PREEMPTION_SHADER_BOUNDARY = 500


# (enum class, C tag or None for an untagged ``typedef enum {...} NAME;``), in header order.
# The typedef name is the class name; members are 4-byte unsigned ints in C.
WDDM_ENUMS: tuple[tuple[type[enum.IntEnum], str | None], ...] = (
    (KMTUMDVERSION, "_KMTUMDVERSION"),
    (D3DKMT_DRIVERVERSION, "_QAI_DRIVERVERSION"),
    (DXGK_ENGINE_TYPE, None),
    (D3DKMDT_GRAPHICS_PREEMPTION_GRANULARITY, "_D3DKMDT_GRAPHICS_PREEMPTION_GRANULARITY"),
    (D3DKMDT_COMPUTE_PREEMPTION_GRANULARITY, "_D3DKMDT_COMPUTE_PREEMPTION_GRANULARITY"),
    (KMTQUERYADAPTERINFOTYPE, "_KMTQUERYADAPTERINFOTYPE"),
)


# ---------------------------------------------------------------------------------------------
# Structs from libdxg include/dxg/d3dkmthk.h (natural alignment)


class _D3DKMT_ADAPTERTYPE_anon0_anon0(ctypes.Structure):
    _c_kind_ = "struct"
    _c_tag_ = None
    _fields_ = (
        ("RenderSupported", _U32, 1),
        ("DisplaySupported", _U32, 1),
        ("SoftwareDevice", _U32, 1),
        ("PostDevice", _U32, 1),
        ("HybridDiscrete", _U32, 1),
        ("HybridIntegrated", _U32, 1),
        ("IndirectDisplayDevice", _U32, 1),
        ("Paravirtualized", _U32, 1),
        ("ACGSupported", _U32, 1),
        ("SupportSetTimingsFromVidPn", _U32, 1),
        ("Detachable", _U32, 1),
        ("ComputeOnly", _U32, 1),
        ("Prototype", _U32, 1),
        ("RuntimePowerManagement", _U32, 1),
        ("Reserved", _U32, 18),
    )
    _c_types_ = tuple((f[0], "__u32") for f in _fields_)


class _D3DKMT_ADAPTERTYPE_anon0(ctypes.Union):
    _c_kind_ = "union"
    _c_tag_ = None
    _anonymous_ = ("_anon0",)
    _fields_ = (("_anon0", _D3DKMT_ADAPTERTYPE_anon0_anon0), ("Value", _U32))
    _c_types_ = (("_anon0", "struct"), ("Value", "__u32"))


class D3DKMT_ADAPTERTYPE(ctypes.Structure):
    """KMTQAITYPE_ADAPTERTYPE(_RENDER) payload (libdxg include/dxg/d3dkmthk.h), 4 bytes."""

    _c_kind_ = "struct"
    _c_tag_ = "_D3DKMT_ADAPTERTYPE"
    _c_typedef_ = "D3DKMT_ADAPTERTYPE"
    _anonymous_ = ("_anon0",)
    _fields_ = (("_anon0", _D3DKMT_ADAPTERTYPE_anon0),)
    _c_types_ = (("_anon0", "union"),)


class D3DKMT_SEGMENTSIZEINFO(ctypes.Structure):
    """KMTQAITYPE_GETSEGMENTSIZE payload (libdxg include/dxg/d3dkmthk.h), 24 bytes."""

    _c_kind_ = "struct"
    _c_tag_ = "_D3DKMT_SEGMENTSIZEINFO"
    _c_typedef_ = "D3DKMT_SEGMENTSIZEINFO"
    _fields_ = (
        ("DedicatedVideoMemorySize", _U64),
        ("DedicatedSystemMemorySize", _U64),
        ("SharedSystemMemorySize", _U64),
    )
    _c_types_ = tuple((f[0], "__u64") for f in _fields_)


class D3DKMT_SEGMENTGROUPSIZEINFO(ctypes.Structure):
    """KMTQAITYPE_GETSEGMENTGROUPSIZE payload (libdxg include/dxg/d3dkmthk.h), 56 bytes."""

    _c_kind_ = "struct"
    _c_tag_ = "_D3DKMT_SEGMENTGROUPSIZEINFO"
    _c_typedef_ = "D3DKMT_SEGMENTGROUPSIZEINFO"
    _fields_ = (
        ("PhysicalAdapterIndex", _U32),
        ("LegacyInfo", D3DKMT_SEGMENTSIZEINFO),
        ("LocalMemory", _U64),
        ("NonLocalMemory", _U64),
        ("NonBudgetMemory", _U64),
    )
    _c_types_ = (
        ("PhysicalAdapterIndex", "__u32"),
        ("LegacyInfo", "D3DKMT_SEGMENTSIZEINFO"),
        ("LocalMemory", "__u64"),
        ("NonLocalMemory", "__u64"),
        ("NonBudgetMemory", "__u64"),
    )


class D3DKMT_ADAPTERADDRESS(ctypes.Structure):
    """KMTQAITYPE_ADAPTERADDRESS(_RENDER) payload (libdxg include/dxg/d3dkmthk.h), 12 bytes."""

    _c_kind_ = "struct"
    _c_tag_ = "_D3DKMT_ADAPTERADDRESS"
    _c_typedef_ = "D3DKMT_ADAPTERADDRESS"
    _fields_ = (("BusNumber", _U32), ("DeviceNumber", _U32), ("FunctionNumber", _U32))
    _c_types_ = tuple((f[0], "__u32") for f in _fields_)


class D3DKMT_PHYSICAL_ADAPTER_COUNT(ctypes.Structure):
    """KMTQAITYPE_PHYSICALADAPTERCOUNT payload (libdxg include/dxg/d3dkmthk.h), 4 bytes."""

    _c_kind_ = "struct"
    _c_tag_ = "_D3DKMT_PHYSICAL_ADAPTER_COUNT"
    _c_typedef_ = "D3DKMT_PHYSICAL_ADAPTER_COUNT"
    _fields_ = (("Count", _U32),)
    _c_types_ = (("Count", "__u32"),)


class D3DKMT_DEVICE_IDS(ctypes.Structure):
    """PCI identity of a physical adapter (libdxg include/dxg/d3dkmthk.h), 24 bytes."""

    _c_kind_ = "struct"
    _c_tag_ = "_D3DKMT_DEVICE_IDS"
    _c_typedef_ = "D3DKMT_DEVICE_IDS"
    _fields_ = (
        ("VendorID", _U32),
        ("DeviceID", _U32),
        ("SubVendorID", _U32),
        ("SubSystemID", _U32),
        ("RevisionID", _U32),
        ("BusType", _U32),
    )
    _c_types_ = tuple((f[0], "__u32") for f in _fields_)


class D3DKMT_QUERY_DEVICE_IDS(ctypes.Structure):
    """KMTQAITYPE_PHYSICALADAPTERDEVICEIDS payload (libdxg include/dxg/d3dkmthk.h), 28 bytes."""

    _c_kind_ = "struct"
    _c_tag_ = "_D3DKMT_QUERY_DEVICE_IDS"
    _c_typedef_ = "D3DKMT_QUERY_DEVICE_IDS"
    _fields_ = (("PhysicalAdapterIndex", _U32), ("DeviceIds", D3DKMT_DEVICE_IDS))
    _c_types_ = (("PhysicalAdapterIndex", "__u32"), ("DeviceIds", "D3DKMT_DEVICE_IDS"))


class D3DKMT_UMD_DRIVER_VERSION(ctypes.Structure):
    """KMTQAITYPE_UMD_DRIVER_VERSION payload (libdxg include/dxg/d3dkmthk.h), 8 bytes."""

    _c_kind_ = "struct"
    _c_tag_ = "_D3DKMT_UMD_DRIVER_VERSION"
    _c_typedef_ = "D3DKMT_UMD_DRIVER_VERSION"
    _fields_ = (("DriverVersion", _S64),)  # LARGE_INTEGER
    _c_types_ = (("DriverVersion", "__s64"),)


class D3DKMT_KMD_DRIVER_VERSION(ctypes.Structure):
    """KMTQAITYPE_KMD_DRIVER_VERSION payload (libdxg include/dxg/d3dkmthk.h), 8 bytes."""

    _c_kind_ = "struct"
    _c_tag_ = "_D3DKMT_KMD_DRIVER_VERSION"
    _c_typedef_ = "D3DKMT_KMD_DRIVER_VERSION"
    _fields_ = (("DriverVersion", _S64),)  # LARGE_INTEGER
    _c_types_ = (("DriverVersion", "__s64"),)


class D3DKMT_UMDFILENAMEINFO(ctypes.Structure):
    """KMTQAITYPE_UMDRIVERNAME payload (libdxg include/dxg/d3dkmthk.h), 524 bytes (UTF-16)."""

    _c_kind_ = "struct"
    _c_tag_ = "_D3DKMT_UMDFILENAMEINFO"
    _c_typedef_ = "D3DKMT_UMDFILENAMEINFO"
    _fields_ = (("Version", _U32), ("UmdFileName", _WCHAR * MAX_PATH))
    _c_types_ = (("Version", "KMTUMDVERSION"), ("UmdFileName", "__u16[260]"))


class D3DKMT_OPENGLINFO(ctypes.Structure):
    """KMTQAITYPE_UMOPENGLINFO payload (libdxg include/dxg/d3dkmthk.h), 528 bytes (UTF-16)."""

    _c_kind_ = "struct"
    _c_tag_ = "_D3DKMT_OPENGLINFO"
    _c_typedef_ = "D3DKMT_OPENGLINFO"
    _fields_ = (
        ("UmdOpenGlIcdFileName", _WCHAR * MAX_PATH),
        ("Version", _U32),
        ("Flags", _U32),
    )
    _c_types_ = (
        ("UmdOpenGlIcdFileName", "__u16[260]"),
        ("Version", "__u32"),
        ("Flags", "__u32"),
    )


class D3DKMT_ADAPTERREGISTRYINFO(ctypes.Structure):
    """KMTQAITYPE_ADAPTERREGISTRYINFO(_RENDER) payload (libdxg d3dkmthk.h), 2080 bytes."""

    _c_kind_ = "struct"
    _c_tag_ = "_D3DKMT_ADAPTERREGISTRYINFO"
    _c_typedef_ = "D3DKMT_ADAPTERREGISTRYINFO"
    _fields_ = (
        ("AdapterString", _WCHAR * MAX_PATH),
        ("BiosString", _WCHAR * MAX_PATH),
        ("DacType", _WCHAR * MAX_PATH),
        ("ChipType", _WCHAR * MAX_PATH),
    )
    _c_types_ = tuple((f[0], "__u16[260]") for f in _fields_)


class D3DKMT_QUERY_ADAPTER_UNIQUE_GUID(ctypes.Structure):
    """KMTQAITYPE_QUERY_ADAPTER_UNIQUE_GUID payload (libdxg d3dkmthk.h), 80 bytes (UTF-16)."""

    _c_kind_ = "struct"
    _c_tag_ = "_D3DKMT_QUERY_ADAPTER_UNIQUE_GUID"
    _c_typedef_ = "D3DKMT_QUERY_ADAPTER_UNIQUE_GUID"
    _fields_ = (("AdapterUniqueGUID", _WCHAR * 40),)
    _c_types_ = (("AdapterUniqueGUID", "__u16[40]"),)


class D3DKMT_DRIVER_DESCRIPTION(ctypes.Structure):
    """KMTQAITYPE_DRIVER_DESCRIPTION(_RENDER) payload (libdxg d3dkmthk.h), 8192 bytes."""

    _c_kind_ = "struct"
    _c_tag_ = "_D3DKMT_DRIVER_DESCRIPTION"
    _c_typedef_ = "D3DKMT_DRIVER_DESCRIPTION"
    _fields_ = (("DriverDescription", _WCHAR * 4096),)
    _c_types_ = (("DriverDescription", "__u16[4096]"),)


class D3DKMT_PARAVIRTUALIZATION(ctypes.Structure):
    """KMTQAITYPE_PARAVIRTUALIZATION_RENDER payload (libdxg d3dkmthk.h), 1 byte."""

    _c_kind_ = "struct"
    _c_tag_ = "_D3DKMT_PARAVIRTUALIZATION"
    _c_typedef_ = "D3DKMT_PARAVIRTUALIZATION"
    _fields_ = (("SecureContainer", _U8),)  # BOOLEAN
    _c_types_ = (("SecureContainer", "__u8"),)


class _D3DKMT_GPUMMU_CAPS_Flags_anon0(ctypes.Structure):
    _c_kind_ = "struct"
    _c_tag_ = None
    _fields_ = (
        ("ReadOnlyMemorySupported", _U32, 1),
        ("NoExecuteMemorySupported", _U32, 1),
        ("CacheCoherentMemorySupported", _U32, 1),
        ("Reserved", _U32, 29),
    )
    _c_types_ = tuple((f[0], "__u32") for f in _fields_)


class _D3DKMT_GPUMMU_CAPS_Flags(ctypes.Union):
    _c_kind_ = "union"
    _c_tag_ = None
    _anonymous_ = ("_anon0",)
    _fields_ = (("_anon0", _D3DKMT_GPUMMU_CAPS_Flags_anon0), ("Value", _U32))
    _c_types_ = (("_anon0", "struct"), ("Value", "__u32"))


class D3DKMT_GPUMMU_CAPS(ctypes.Structure):
    """GPU MMU capabilities (libdxg include/dxg/d3dkmthk.h), 8 bytes."""

    _c_kind_ = "struct"
    _c_tag_ = "_D3DKMT_GPUMMU_CAPS"
    _c_typedef_ = "D3DKMT_GPUMMU_CAPS"
    _fields_ = (("Flags", _D3DKMT_GPUMMU_CAPS_Flags), ("VirtualAddressBitCount", _U32))
    _c_types_ = (("Flags", "union"), ("VirtualAddressBitCount", "__u32"))


class D3DKMT_QUERY_GPUMMU_CAPS(ctypes.Structure):
    """KMTQAITYPE_QUERY_GPUMMU_CAPS payload (libdxg include/dxg/d3dkmthk.h), 12 bytes."""

    _c_kind_ = "struct"
    _c_tag_ = "_D3DKMT_QUERY_GPUMMU_CAPS"
    _c_typedef_ = "D3DKMT_QUERY_GPUMMU_CAPS"
    _fields_ = (("PhysicalAdapterIndex", _U32), ("Caps", D3DKMT_GPUMMU_CAPS))
    _c_types_ = (("PhysicalAdapterIndex", "__u32"), ("Caps", "D3DKMT_GPUMMU_CAPS"))


# ---------------------------------------------------------------------------------------------
# Structs from libdxg include/dxg/d3dkmdt.h.  D3DKMDT_PREEMPTION_CAPS and D3DKMT_WDDM_1_2_CAPS
# come before that header's ``#pragma pack(push, 1)``; everything after it is packed.


class D3DKMDT_PREEMPTION_CAPS(ctypes.Structure):
    """Preemption granularities (libdxg include/dxg/d3dkmdt.h), 8 bytes."""

    _c_kind_ = "struct"
    _c_tag_ = "_D3DKMDT_PREEMPTION_CAPS"
    _c_typedef_ = "D3DKMDT_PREEMPTION_CAPS"
    _fields_ = (("GraphicsPreemptionGranularity", _U32), ("ComputePreemptionGranularity", _U32))
    _c_types_ = (
        ("GraphicsPreemptionGranularity", "D3DKMDT_GRAPHICS_PREEMPTION_GRANULARITY"),
        ("ComputePreemptionGranularity", "D3DKMDT_COMPUTE_PREEMPTION_GRANULARITY"),
    )


class _D3DKMT_WDDM_1_2_CAPS_anon0_anon0(ctypes.Structure):
    _c_kind_ = "struct"
    _c_tag_ = None
    _fields_ = (
        ("SupportNonVGA", _U32, 1),
        ("SupportSmoothRotation", _U32, 1),
        ("SupportPerEngineTDR", _U32, 1),
        ("SupportKernelModeCommandBuffer", _U32, 1),
        ("SupportCCD", _U32, 1),
        ("SupportSoftwareDeviceBitmaps", _U32, 1),
        ("SupportGammaRamp", _U32, 1),
        ("SupportHWCursor", _U32, 1),
        ("SupportHWVSync", _U32, 1),
        ("SupportSurpriseRemovalInHibernation", _U32, 1),
        ("Reserved", _U32, 22),
    )
    _c_types_ = tuple((f[0], "__u32") for f in _fields_)


class _D3DKMT_WDDM_1_2_CAPS_anon0(ctypes.Union):
    _c_kind_ = "union"
    _c_tag_ = None
    _anonymous_ = ("_anon0",)
    _fields_ = (("_anon0", _D3DKMT_WDDM_1_2_CAPS_anon0_anon0), ("Value", _U32))
    _c_types_ = (("_anon0", "struct"), ("Value", "__u32"))


class D3DKMT_WDDM_1_2_CAPS(ctypes.Structure):
    """KMTQAITYPE_WDDM_1_2_CAPS(_RENDER) payload (libdxg include/dxg/d3dkmdt.h), 12 bytes."""

    _c_kind_ = "struct"
    _c_tag_ = "_D3DKMT_WDDM_1_2_CAPS"
    _c_typedef_ = "D3DKMT_WDDM_1_2_CAPS"
    _anonymous_ = ("_anon0",)
    _fields_ = (
        ("PreemptionCaps", D3DKMDT_PREEMPTION_CAPS),
        ("_anon0", _D3DKMT_WDDM_1_2_CAPS_anon0),
    )
    _c_types_ = (("PreemptionCaps", "D3DKMDT_PREEMPTION_CAPS"), ("_anon0", "union"))


class _D3DKMT_WDDM_1_3_CAPS_anon0_anon0(ctypes.Structure):
    _c_kind_ = "struct"
    _c_tag_ = None
    _pack_ = 1
    _fields_ = (
        ("SupportMiracast", _U32, 1),
        ("IsHybridIntegratedGPU", _U32, 1),
        ("IsHybridDiscreteGPU", _U32, 1),
        ("SupportPowerManagementPStates", _U32, 1),
        ("SupportVirtualModes", _U32, 1),
        ("SupportCrossAdapterResource", _U32, 1),
        ("Reserved", _U32, 26),
    )
    _c_types_ = tuple((f[0], "__u32") for f in _fields_)


class _D3DKMT_WDDM_1_3_CAPS_anon0(ctypes.Union):
    _c_kind_ = "union"
    _c_tag_ = None
    _pack_ = 1
    _anonymous_ = ("_anon0",)
    _fields_ = (("_anon0", _D3DKMT_WDDM_1_3_CAPS_anon0_anon0), ("Value", _U32))
    _c_types_ = (("_anon0", "struct"), ("Value", "__u32"))


class D3DKMT_WDDM_1_3_CAPS(ctypes.Structure):
    """KMTQAITYPE_WDDM_1_3_CAPS(_RENDER) payload (libdxg d3dkmdt.h), 4 bytes, packed."""

    _c_kind_ = "struct"
    _c_tag_ = "_D3DKMT_WDDM_1_3_CAPS"
    _c_typedef_ = "D3DKMT_WDDM_1_3_CAPS"
    _pack_ = 1
    _anonymous_ = ("_anon0",)
    _fields_ = (("_anon0", _D3DKMT_WDDM_1_3_CAPS_anon0),)
    _c_types_ = (("_anon0", "union"),)


class _D3DKMT_WDDM_2_0_CAPS_anon0_anon0(ctypes.Structure):
    _c_kind_ = "struct"
    _c_tag_ = None
    _pack_ = 1
    _fields_ = (
        ("Support64BitAtomics", _U32, 1),
        ("GpuMmuSupported", _U32, 1),
        ("IoMmuSupported", _U32, 1),
        ("FlipOverwriteSupported", _U32, 1),
        ("SupportContextlessPresent", _U32, 1),
        ("SupportSurpriseRemoval", _U32, 1),
        ("Reserved", _U32, 26),
    )
    _c_types_ = tuple((f[0], "__u32") for f in _fields_)


class _D3DKMT_WDDM_2_0_CAPS_anon0(ctypes.Union):
    _c_kind_ = "union"
    _c_tag_ = None
    _pack_ = 1
    _anonymous_ = ("_anon0",)
    _fields_ = (("_anon0", _D3DKMT_WDDM_2_0_CAPS_anon0_anon0), ("Value", _U32))
    _c_types_ = (("_anon0", "struct"), ("Value", "__u32"))


class D3DKMT_WDDM_2_0_CAPS(ctypes.Structure):
    """KMTQAITYPE_WDDM_2_0_CAPS payload (libdxg include/dxg/d3dkmdt.h), 4 bytes, packed."""

    _c_kind_ = "struct"
    _c_tag_ = "_D3DKMT_WDDM_2_0_CAPS"
    _c_typedef_ = "D3DKMT_WDDM_2_0_CAPS"
    _pack_ = 1
    _anonymous_ = ("_anon0",)
    _fields_ = (("_anon0", _D3DKMT_WDDM_2_0_CAPS_anon0),)
    _c_types_ = (("_anon0", "union"),)


class _D3DKMT_WDDM_2_7_CAPS_anon0_anon0(ctypes.Structure):
    _c_kind_ = "struct"
    _c_tag_ = None
    _pack_ = 1
    _fields_ = (
        ("HwSchSupported", _U32, 1),
        ("HwSchEnabled", _U32, 1),
        ("HwSchEnabledByDefault", _U32, 1),
        ("IndependentVidPnVSyncControl", _U32, 1),
        ("Reserved", _U32, 28),
    )
    _c_types_ = tuple((f[0], "__u32") for f in _fields_)


class _D3DKMT_WDDM_2_7_CAPS_anon0(ctypes.Union):
    _c_kind_ = "union"
    _c_tag_ = None
    _pack_ = 1
    _anonymous_ = ("_anon0",)
    _fields_ = (("_anon0", _D3DKMT_WDDM_2_7_CAPS_anon0_anon0), ("Value", _U32))
    _c_types_ = (("_anon0", "struct"), ("Value", "__u32"))


class D3DKMT_WDDM_2_7_CAPS(ctypes.Structure):
    """KMTQAITYPE_WDDM_2_7_CAPS payload (libdxg include/dxg/d3dkmdt.h), 4 bytes, packed."""

    _c_kind_ = "struct"
    _c_tag_ = "_D3DKMT_WDDM_2_7_CAPS"
    _c_typedef_ = "D3DKMT_WDDM_2_7_CAPS"
    _pack_ = 1
    _anonymous_ = ("_anon0",)
    _fields_ = (("_anon0", _D3DKMT_WDDM_2_7_CAPS_anon0),)
    _c_types_ = (("_anon0", "union"),)


class _D3DKMT_WDDM_2_9_CAPS_anon0_anon0(ctypes.Structure):
    _c_kind_ = "struct"
    _c_tag_ = None
    _pack_ = 1
    _fields_ = (
        ("HwSchSupportState", _U32, 2),  # DXGK_FEATURE_SUPPORT_* (0..3)
        ("HwSchEnabled", _U32, 1),
        ("SelfRefreshMemorySupported", _U32, 1),
        ("Reserved", _U32, 28),
    )
    _c_types_ = tuple((f[0], "__u32") for f in _fields_)


class _D3DKMT_WDDM_2_9_CAPS_anon0(ctypes.Union):
    _c_kind_ = "union"
    _c_tag_ = None
    _pack_ = 1
    _anonymous_ = ("_anon0",)
    _fields_ = (("_anon0", _D3DKMT_WDDM_2_9_CAPS_anon0_anon0), ("Value", _U32))
    _c_types_ = (("_anon0", "struct"), ("Value", "__u32"))


class D3DKMT_WDDM_2_9_CAPS(ctypes.Structure):
    """KMTQAITYPE_WDDM_2_9_CAPS payload (libdxg include/dxg/d3dkmdt.h), 4 bytes, packed."""

    _c_kind_ = "struct"
    _c_tag_ = "_D3DKMT_WDDM_2_9_CAPS"
    _c_typedef_ = "D3DKMT_WDDM_2_9_CAPS"
    _pack_ = 1
    _anonymous_ = ("_anon0",)
    _fields_ = (("_anon0", _D3DKMT_WDDM_2_9_CAPS_anon0),)
    _c_types_ = (("_anon0", "union"),)


class _D3DKMT_WDDM_3_0_CAPS_anon0_anon0(ctypes.Structure):
    _c_kind_ = "struct"
    _c_tag_ = None
    _pack_ = 1
    _fields_ = (
        ("HwFlipQueueSupportState", _U32, 2),  # DXGK_FEATURE_SUPPORT_* (0..3)
        ("HwFlipQueueEnabled", _U32, 1),
        ("DisplayableSupported", _U32, 1),
        ("Reserved", _U32, 28),
    )
    _c_types_ = tuple((f[0], "__u32") for f in _fields_)


class _D3DKMT_WDDM_3_0_CAPS_anon0(ctypes.Union):
    _c_kind_ = "union"
    _c_tag_ = None
    _pack_ = 1
    _anonymous_ = ("_anon0",)
    _fields_ = (("_anon0", _D3DKMT_WDDM_3_0_CAPS_anon0_anon0), ("Value", _U32))
    _c_types_ = (("_anon0", "struct"), ("Value", "__u32"))


class D3DKMT_WDDM_3_0_CAPS(ctypes.Structure):
    """KMTQAITYPE_WDDM_3_0_CAPS payload (libdxg include/dxg/d3dkmdt.h), 4 bytes, packed."""

    _c_kind_ = "struct"
    _c_tag_ = "_D3DKMT_WDDM_3_0_CAPS"
    _c_typedef_ = "D3DKMT_WDDM_3_0_CAPS"
    _pack_ = 1
    _anonymous_ = ("_anon0",)
    _fields_ = (("_anon0", _D3DKMT_WDDM_3_0_CAPS_anon0),)
    _c_types_ = (("_anon0", "union"),)


class _DXGK_NODEMETADATA_FLAGS_anon0_anon0(ctypes.Structure):
    _c_kind_ = "struct"
    _c_tag_ = None
    _pack_ = 1
    _fields_ = (
        ("ContextSchedulingSupported", _U32, 1),
        ("RingBufferFenceRelease", _U32, 1),
        ("SupportTrackedWorkload", _U32, 1),
        ("UserModeSubmission", _U32, 1),
        ("SupportBuildTestCommandBuffer", _U32, 1),
        ("Reserved", _U32, 11),
        ("MaxInFlightHwQueueBuffers", _U32, 16),
    )
    _c_types_ = tuple((f[0], "__u32") for f in _fields_)


class _DXGK_NODEMETADATA_FLAGS_anon0(ctypes.Union):
    _c_kind_ = "union"
    _c_tag_ = None
    _pack_ = 1
    _anonymous_ = ("_anon0",)
    _fields_ = (("_anon0", _DXGK_NODEMETADATA_FLAGS_anon0_anon0), ("Value", _U32))
    _c_types_ = (("_anon0", "struct"), ("Value", "__u32"))


class DXGK_NODEMETADATA_FLAGS(ctypes.Structure):
    """Engine flags of DXGK_NODEMETADATA (libdxg include/dxg/d3dkmdt.h), 4 bytes, packed."""

    _c_kind_ = "struct"
    _c_tag_ = "_DXGK_NODEMETADATA_FLAGS"
    _c_typedef_ = "DXGK_NODEMETADATA_FLAGS"
    _pack_ = 1
    _anonymous_ = ("_anon0",)
    _fields_ = (("_anon0", _DXGK_NODEMETADATA_FLAGS_anon0),)
    _c_types_ = (("_anon0", "union"),)


class DXGK_NODEMETADATA(ctypes.Structure):
    """One engine's metadata (libdxg include/dxg/d3dkmdt.h), 74 bytes, packed (UTF-16 name)."""

    _c_kind_ = "struct"
    _c_tag_ = "_DXGK_NODEMETADATA"
    _c_typedef_ = "DXGK_NODEMETADATA"
    _pack_ = 1
    _fields_ = (
        ("EngineType", _U32),
        ("FriendlyName", _WCHAR * DXGK_MAX_METADATA_NAME_LENGTH),
        ("Flags", DXGK_NODEMETADATA_FLAGS),
        ("GpuMmuSupported", _U8),  # BOOLEAN
        ("IoMmuSupported", _U8),  # BOOLEAN
    )
    _c_types_ = (
        ("EngineType", "DXGK_ENGINE_TYPE"),
        ("FriendlyName", "__u16[32]"),
        ("Flags", "DXGK_NODEMETADATA_FLAGS"),
        ("GpuMmuSupported", "__u8"),
        ("IoMmuSupported", "__u8"),
    )


class D3DKMT_NODEMETADATA(ctypes.Structure):
    """KMTQAITYPE_NODEMETADATA payload (libdxg include/dxg/d3dkmdt.h), 78 bytes, packed.

    ``NodeOrdinalAndAdapterIndex``: low word node ordinal, high word physical adapter index.
    """

    _c_kind_ = "struct"
    _c_tag_ = "_D3DKMT_NODEMETADATA"
    _c_typedef_ = "D3DKMT_NODEMETADATA"
    _pack_ = 1
    _fields_ = (("NodeOrdinalAndAdapterIndex", _U32), ("NodeData", DXGK_NODEMETADATA))
    _c_types_ = (("NodeOrdinalAndAdapterIndex", "__u32"), ("NodeData", "DXGK_NODEMETADATA"))


class _D3DKMT_DRIVERCAPS_EXT_anon0_anon0(ctypes.Structure):
    _c_kind_ = "struct"
    _c_tag_ = None
    _pack_ = 1
    _fields_ = (
        ("VirtualModeSupport", _U32, 1),
        ("Usb4MonitorSupport", _U32, 1),
        ("Reserved", _U32, 30),
    )
    _c_types_ = tuple((f[0], "__u32") for f in _fields_)


class _D3DKMT_DRIVERCAPS_EXT_anon0(ctypes.Union):
    _c_kind_ = "union"
    _c_tag_ = None
    _pack_ = 1
    _anonymous_ = ("_anon0",)
    _fields_ = (("_anon0", _D3DKMT_DRIVERCAPS_EXT_anon0_anon0), ("Value", _U32))
    _c_types_ = (("_anon0", "struct"), ("Value", "__u32"))


class D3DKMT_DRIVERCAPS_EXT(ctypes.Structure):
    """KMTQAITYPE_DRIVERCAPS_EXT payload (libdxg include/dxg/d3dkmdt.h), 4 bytes, packed."""

    _c_kind_ = "struct"
    _c_tag_ = "_D3DKMT_DRIVERCAPS_EXT"
    _c_typedef_ = "D3DKMT_DRIVERCAPS_EXT"
    _pack_ = 1
    _anonymous_ = ("_anon0",)
    _fields_ = (("_anon0", _D3DKMT_DRIVERCAPS_EXT_anon0),)
    _c_types_ = (("_anon0", "union"),)


class _D3DKMT_DISPLAY_CAPS_anon0_anon0(ctypes.Structure):
    _c_kind_ = "struct"
    _c_tag_ = None
    _pack_ = 1
    _fields_ = (
        ("PreferPhysicallyContiguous", _U64, 1),
        ("CursorScaledWithMultiPlaneOverlayPlane0", _U64, 1),
        ("Reserved", _U64, 62),
    )
    _c_types_ = tuple((f[0], "__u64") for f in _fields_)


class _D3DKMT_DISPLAY_CAPS_anon0(ctypes.Union):
    _c_kind_ = "union"
    _c_tag_ = None
    _pack_ = 1
    _anonymous_ = ("_anon0",)
    _fields_ = (("_anon0", _D3DKMT_DISPLAY_CAPS_anon0_anon0), ("Value", _U64))
    _c_types_ = (("_anon0", "struct"), ("Value", "__u64"))


class D3DKMT_DISPLAY_CAPS(ctypes.Structure):
    """KMTQAITYPE_DISPLAY_CAPS payload (libdxg include/dxg/d3dkmdt.h), 8 bytes, packed."""

    _c_kind_ = "struct"
    _c_tag_ = "_D3DKMT_DISPLAY_CAPS"
    _c_typedef_ = "D3DKMT_DISPLAY_CAPS"
    _pack_ = 1
    _anonymous_ = ("_anon0",)
    _fields_ = (("_anon0", _D3DKMT_DISPLAY_CAPS_anon0),)
    _c_types_ = (("_anon0", "union"),)


# libdxg's names for the char16_t wire forms (src/d3dkmt-wsl.cpp); same classes.
D3DKMT_UMDFILENAMEINFO_WCHAR16 = D3DKMT_UMDFILENAMEINFO
D3DKMT_OPENGLINFO_WCHAR16 = D3DKMT_OPENGLINFO
D3DKMT_ADAPTERREGISTRYINFO_WCHAR16 = D3DKMT_ADAPTERREGISTRYINFO
D3DKMT_DRIVER_DESCRIPTION_WCHAR16 = D3DKMT_DRIVER_DESCRIPTION
D3DKMT_QUERY_ADAPTER_UNIQUE_GUID_WCHAR16 = D3DKMT_QUERY_ADAPTER_UNIQUE_GUID
D3DKMT_NODEMETADATA_WCHAR16 = D3DKMT_NODEMETADATA

# Every public struct, in an order where each one's member types come first.
WDDM_STRUCTS: tuple[type[ctypes.Structure], ...] = (
    D3DKMT_ADAPTERTYPE,
    D3DKMT_SEGMENTSIZEINFO,
    D3DKMT_SEGMENTGROUPSIZEINFO,
    D3DKMT_ADAPTERADDRESS,
    D3DKMT_PHYSICAL_ADAPTER_COUNT,
    D3DKMT_DEVICE_IDS,
    D3DKMT_QUERY_DEVICE_IDS,
    D3DKMT_UMD_DRIVER_VERSION,
    D3DKMT_KMD_DRIVER_VERSION,
    D3DKMT_UMDFILENAMEINFO,
    D3DKMT_OPENGLINFO,
    D3DKMT_ADAPTERREGISTRYINFO,
    D3DKMT_QUERY_ADAPTER_UNIQUE_GUID,
    D3DKMT_DRIVER_DESCRIPTION,
    D3DKMT_PARAVIRTUALIZATION,
    D3DKMT_GPUMMU_CAPS,
    D3DKMT_QUERY_GPUMMU_CAPS,
    D3DKMDT_PREEMPTION_CAPS,
    D3DKMT_WDDM_1_2_CAPS,
    D3DKMT_WDDM_1_3_CAPS,
    D3DKMT_WDDM_2_0_CAPS,
    D3DKMT_WDDM_2_7_CAPS,
    D3DKMT_WDDM_2_9_CAPS,
    D3DKMT_WDDM_3_0_CAPS,
    DXGK_NODEMETADATA_FLAGS,
    DXGK_NODEMETADATA,
    D3DKMT_NODEMETADATA,
    D3DKMT_DRIVERCAPS_EXT,
    D3DKMT_DISPLAY_CAPS,
)

_Q = KMTQUERYADAPTERINFOTYPE

# QueryAdapterInfo type -> the payload class (its size is the PrivateDriverDataSize that
# libdxg sends).  Only the types whose payload is defined here.
QAI_PAYLOADS: MappingProxyType[KMTQUERYADAPTERINFOTYPE, type] = MappingProxyType(
    {
        _Q.KMTQAITYPE_UMDRIVERNAME: D3DKMT_UMDFILENAMEINFO,
        _Q.KMTQAITYPE_UMOPENGLINFO: D3DKMT_OPENGLINFO,
        _Q.KMTQAITYPE_GETSEGMENTSIZE: D3DKMT_SEGMENTSIZEINFO,
        _Q.KMTQAITYPE_ADAPTERADDRESS: D3DKMT_ADAPTERADDRESS,
        _Q.KMTQAITYPE_ADAPTERREGISTRYINFO: D3DKMT_ADAPTERREGISTRYINFO,
        _Q.KMTQAITYPE_DRIVERVERSION: _U32,
        _Q.KMTQAITYPE_ADAPTERTYPE: D3DKMT_ADAPTERTYPE,
        _Q.KMTQAITYPE_WDDM_1_2_CAPS: D3DKMT_WDDM_1_2_CAPS,
        _Q.KMTQAITYPE_UMD_DRIVER_VERSION: D3DKMT_UMD_DRIVER_VERSION,
        _Q.KMTQAITYPE_WDDM_1_3_CAPS: D3DKMT_WDDM_1_3_CAPS,
        _Q.KMTQAITYPE_WDDM_2_0_CAPS: D3DKMT_WDDM_2_0_CAPS,
        _Q.KMTQAITYPE_NODEMETADATA: D3DKMT_NODEMETADATA,
        _Q.KMTQAITYPE_PHYSICALADAPTERCOUNT: D3DKMT_PHYSICAL_ADAPTER_COUNT,
        _Q.KMTQAITYPE_PHYSICALADAPTERDEVICEIDS: D3DKMT_QUERY_DEVICE_IDS,
        _Q.KMTQAITYPE_DRIVERCAPS_EXT: D3DKMT_DRIVERCAPS_EXT,
        _Q.KMTQAITYPE_QUERY_GPUMMU_CAPS: D3DKMT_QUERY_GPUMMU_CAPS,
        _Q.KMTQAITYPE_GETSEGMENTGROUPSIZE: D3DKMT_SEGMENTGROUPSIZEINFO,
        _Q.KMTQAITYPE_KMD_DRIVER_VERSION: D3DKMT_KMD_DRIVER_VERSION,
        _Q.KMTQAITYPE_ADAPTERADDRESS_RENDER: D3DKMT_ADAPTERADDRESS,
        _Q.KMTQAITYPE_ADAPTERREGISTRYINFO_RENDER: D3DKMT_ADAPTERREGISTRYINFO,
        _Q.KMTQAITYPE_DRIVERVERSION_RENDER: _U32,
        _Q.KMTQAITYPE_ADAPTERTYPE_RENDER: D3DKMT_ADAPTERTYPE,
        _Q.KMTQAITYPE_WDDM_1_2_CAPS_RENDER: D3DKMT_WDDM_1_2_CAPS,
        _Q.KMTQAITYPE_WDDM_1_3_CAPS_RENDER: D3DKMT_WDDM_1_3_CAPS,
        _Q.KMTQAITYPE_QUERY_ADAPTER_UNIQUE_GUID: D3DKMT_QUERY_ADAPTER_UNIQUE_GUID,
        _Q.KMTQAITYPE_DRIVER_DESCRIPTION: D3DKMT_DRIVER_DESCRIPTION,
        _Q.KMTQAITYPE_DRIVER_DESCRIPTION_RENDER: D3DKMT_DRIVER_DESCRIPTION,
        _Q.KMTQAITYPE_PARAVIRTUALIZATION_RENDER: D3DKMT_PARAVIRTUALIZATION,
        _Q.KMTQAITYPE_WDDM_2_7_CAPS: D3DKMT_WDDM_2_7_CAPS,
        _Q.KMTQAITYPE_DISPLAY_CAPS: D3DKMT_DISPLAY_CAPS,
        _Q.KMTQAITYPE_WDDM_2_9_CAPS: D3DKMT_WDDM_2_9_CAPS,
        _Q.KMTQAITYPE_WDDM_3_0_CAPS: D3DKMT_WDDM_3_0_CAPS,
    }
)


# ---------------------------------------------------------------------------------------------
# UTF-16 (wire WCHAR) helpers


def encode_utf16z(text: str, nchars: int) -> bytes:
    """``text`` as a NUL-terminated UTF-16LE ``WCHAR[nchars]`` buffer: ``2 * nchars`` bytes.

    Text that does not fit is cut (never inside a surrogate pair) so that a terminating NUL
    always fits; the rest is zero-filled.
    """
    if nchars < 1:
        raise ValueError(f"a WCHAR[{nchars}] buffer cannot hold a terminating NUL")
    units = text.encode("utf-16-le", errors="surrogatepass")
    limit = (nchars - 1) * 2
    if len(units) > limit:
        units = units[:limit]
        last = int.from_bytes(units[-2:], "little") if units else 0
        if 0xD800 <= last <= 0xDBFF:  # a lead surrogate whose partner was cut off
            units = units[:-2]
    return units + bytes(2 * nchars - len(units))


def decode_utf16z(data: bytes | bytearray | memoryview | ctypes.Array) -> str:
    """The string in a UTF-16LE ``WCHAR`` buffer, up to the first NUL (or the whole buffer).

    ``data`` may be raw bytes or a ctypes ``c_uint16`` array such as ``info.UmdFileName``.
    Invalid UTF-16 is replaced with U+FFFD.
    """
    raw = bytes(data)
    end = len(raw) - len(raw) % 2
    for i in range(0, end, 2):
        if raw[i] == 0 and raw[i + 1] == 0:
            end = i
            break
    return raw[:end].decode("utf-16-le", errors="replace")
