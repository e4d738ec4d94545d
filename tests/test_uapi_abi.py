"""dxg.uapi against the measured ABI of the Linux dxgkrnl UAPI header (d3dkmthk-abi.json).

The JSON is kept in the repository as test data (``tests/data/d3dkmthk-abi.json``, a copy of
the project's shared ABI description), so the tests pass in a clone anywhere; ``DXG_ABI_JSON``
points them at another copy.  Every ioctl code, every struct/union size and alignment, every member
offset, every bit-field position, every enum and every constant is checked, one test each.
Also: the real driver's ntstatus2int table, libdxg's errno mapping, the handle format and the
WDDM payload layouts.
"""

from __future__ import annotations

import ctypes
import errno
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest

from dxg import uapi
from dxg.uapi import cheader, handles, ntstatus, structs, wddm

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ABI_JSON = Path(__file__).parent / "data" / "d3dkmthk-abi.json"
ABI_JSON = Path(os.environ.get("DXG_ABI_JSON") or DEFAULT_ABI_JSON)
MISSING = (
    f"ABI JSON not found at {ABI_JSON} (default tests/data/d3dkmthk-abi.json; set DXG_ABI_JSON "
    "to override). The ABI tests cannot run without it."
)


def _load_abi() -> dict[str, Any] | None:
    try:
        return json.loads(ABI_JSON.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


ABI = _load_abi()


def _need_abi() -> dict[str, Any]:
    if ABI is None:
        pytest.fail(MISSING, pytrace=False)
    return ABI


def _params(items: list[tuple[str, Any]]) -> list[Any]:
    """pytest params named by their first element; one failing param if the JSON is missing."""
    if ABI is None:
        return [pytest.param(None, id="abi-json-missing")]
    return [pytest.param(item, id=item[0]) for item in items]


def _merged(key: str) -> dict[str, Any]:
    if ABI is None:
        return {}
    out = dict(ABI[key])
    out.update(ABI.get("supplement", {}).get(key, {}))
    return out


ALL_IOCTLS = _merged("ioctls")
ALL_STRUCTS = _merged("structs")
ALL_ENUMS = _merged("enums")
CONSTANTS = dict(ABI["constants"]) if ABI else {}
FLAT_LEAVES = [
    (f"{tag}.{path}", (tag, path, leaf))
    for tag, info in ALL_STRUCTS.items()
    for path, leaf in info["flat"].items()
]
UNHANDLED = {0x03, 0x17, 0x1A, 0x23, 0x28, 0x29, 0x2B, 0x2D}


def test_abi_json_is_available() -> None:
    abi = _need_abi()
    counts = abi["meta"]["counts"]
    assert (counts["ioctls"], counts["structs"], counts["enums"]) == (68, 121, 24)
    assert len(abi["supplement"]["ioctls"]) == 5
    assert len(abi["supplement"]["structs"]) == 6
    assert len(ALL_STRUCTS) == 127 and len(ALL_IOCTLS) == 73 and len(ALL_ENUMS) == 25


def test_generated_structs_are_up_to_date() -> None:
    _need_abi()
    spec = importlib.util.spec_from_file_location("gen_uapi", REPO / "tools" / "gen_uapi.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    rc = gen.main([str(ABI_JSON), "--check", "--out", str(Path(structs.__file__))])
    assert rc == 0, "src/dxg/uapi/structs.py differs from what tools/gen_uapi.py generates"


# ---------------------------------------------------------------------------------------------
# ioctls


@pytest.mark.parametrize("item", _params(sorted(ALL_IOCTLS.items())))
def test_ioctl_code(item: tuple[str, dict[str, Any]] | None) -> None:
    _need_abi()
    assert item is not None
    name, info = item
    code = getattr(uapi, name)
    assert code == info["value"], f"{name}: 0x{code:08x} != {info['hex']}"
    entry = uapi.IOCTLS[info["nr_int"]]
    assert entry.name == name
    assert entry.code == info["value"]
    assert entry.nr == info["nr_int"]
    assert entry.struct.__name__ == info["struct"]
    assert entry.size == info["size"] == ctypes.sizeof(entry.struct)
    assert entry.handled == (entry.nr not in UNHANDLED)
    assert uapi.IOCTLS_BY_NAME[name] is entry
    assert uapi.IOCTLS_BY_CODE[code] is entry
    assert uapi._IOC_NR(code) == info["nr_int"]
    assert uapi._IOC_TYPE(code) == int(info["type"], 0) == ord(info["type_char"])
    assert uapi._IOC_SIZE(code) == info["size"]
    assert uapi._IOC_DIR(code) == info["dir_bits"] == uapi._IOC_READ | uapi._IOC_WRITE
    assert uapi._IOWR(info["type_char"], info["nr_int"], entry.struct) == code


def test_ioctl_table_is_complete() -> None:
    _need_abi()
    assert {d.name for d in uapi.IOCTLS.values()} == set(ALL_IOCTLS)
    assert len(uapi.IOCTLS) == 73
    assert {nr for nr, d in uapi.IOCTLS.items() if not d.handled} == UNHANDLED
    assert uapi.UNHANDLED_IOCTL_NRS == UNHANDLED
    assert sorted(uapi.HEADER_IOCTL_NRS) == list(range(0x01, 0x45))
    assert sorted(uapi.SUPPLEMENT_IOCTL_NRS) == list(range(0x45, 0x4A))
    assert len([d for d in uapi.IOCTLS.values() if d.handled]) == 65


def test_ioctl_helpers_and_lookup() -> None:
    assert uapi._IOWR("G", 0x01, 12) == 0xC00C4701
    assert uapi._IOR(0x47, 2, 8) == 0x80084702
    assert uapi._IOW(0x47, 3, 4) == 0x40044703
    assert uapi._IO(0x47, 4) == 0x00004704
    assert uapi.lookup_ioctl(uapi.LX_DXENUMADAPTERS3) is uapi.IOCTLS[0x3E]
    # Same nr, wrong size: the driver answers -ENOTTY.
    assert uapi.lookup_ioctl(uapi._IOWR("G", 0x3E, 16)) is None
    assert uapi.lookup_ioctl(uapi.LX_DXRENDER) is None  # no handler
    assert uapi.lookup_ioctl(uapi._IOWR("G", 0x4A, 8)) is None
    with pytest.raises(ValueError):
        uapi._IOWR("G", 0x100, 8)
    with pytest.raises(ValueError):
        uapi._IOWR("G", 1, 1 << 14)


# ---------------------------------------------------------------------------------------------
# structs and unions


@pytest.mark.parametrize("item", _params(sorted(ALL_STRUCTS.items())))
def test_struct_size_and_alignment(item: tuple[str, dict[str, Any]] | None) -> None:
    _need_abi()
    assert item is not None
    tag, info = item
    cls = structs.STRUCTS[tag]
    assert getattr(uapi, tag) is cls or tag == "ntstatus"
    assert cls.__name__ == tag and cls._c_tag_ == tag and cls._c_kind_ == info["kind"]
    base = ctypes.Union if info["kind"] == "union" else ctypes.Structure
    assert issubclass(cls, base)
    assert ctypes.sizeof(cls) == info["size"], f"sizeof({info['kind']} {tag})"
    assert ctypes.alignment(cls) == info["align"], f"_Alignof({info['kind']} {tag})"
    assert getattr(cls, "_pack_", None) == info["pragma_pack"]


@pytest.mark.parametrize("item", _params(sorted(ALL_STRUCTS.items())))
def test_struct_has_exactly_the_c_members(item: tuple[str, dict[str, Any]] | None) -> None:
    _need_abi()
    assert item is not None
    tag, info = item
    paths = [f.path for f in cheader.flat_fields(structs.STRUCTS[tag], into_records=False)]
    assert len(paths) == len(set(paths))
    assert set(paths) == set(info["flat"])


def _resolve(cls: type, path: str) -> tuple[int, Any, type]:
    """(absolute offset of the field's CField, the CField, its ctypes type) for a C path."""
    offset = 0
    owner = cls
    parts = path.split(".")
    for i, part in enumerate(parts):
        desc = getattr(owner, part)
        ftype = _field_type(owner, part)
        assert ftype is not None, f"{cls.__name__} has no member {path}"
        if i == len(parts) - 1:
            return offset + desc.offset, desc, ftype
        offset += desc.offset
        owner = ftype
    raise AssertionError("unreachable")


def _field_type(cls: type, name: str) -> type | None:
    for field in cls._fields_:
        if field[0] == name:
            return field[1]
    for field in cls._fields_:
        if field[0] in getattr(cls, "_anonymous_", ()):
            found = _field_type(field[1], name)
            if found is not None:
                return found
    return None


@pytest.mark.parametrize("item", _params(FLAT_LEAVES))
def test_member_layout(item: tuple[str, tuple[str, str, dict[str, Any]]] | None) -> None:
    _need_abi()
    assert item is not None
    _, (tag, path, leaf) = item
    cls = structs.STRUCTS[tag]
    offset, desc, ftype = _resolve(cls, path)
    if leaf["kind"] == "bitfield":
        assert offset == leaf["storage_unit_offset"], f"{tag}.{path}: storage unit offset"
        assert ctypes.sizeof(ftype) == leaf["storage_unit_size"], f"{tag}.{path}: unit size"
        assert desc.size >> 16 == leaf["bit_width"], f"{tag}.{path}: bit width"
        assert desc.size & 0xFFFF == leaf["bit_offset_in_unit"], f"{tag}.{path}: bit offset"
        assert offset * 8 + leaf["bit_offset_in_unit"] == leaf["bit_offset"]
    else:
        assert offset == leaf["offset"], f"offsetof({tag}, {path})"
        assert desc.size == leaf["size"] == ctypes.sizeof(ftype), f"sizeof({tag}.{path})"
        if leaf["kind"] == "pointer":
            assert ftype is ctypes.c_uint64
        if leaf["kind"] == "record":
            assert ftype is structs.STRUCTS[leaf["record_tag"]]
        if leaf["kind"] == "array":
            assert issubclass(ftype, ctypes.Array) and ftype._length_ == leaf["count"]
            assert ctypes.sizeof(ftype._type_) == leaf["element_size"]


def test_c_access_paths_work() -> None:
    e = uapi.d3dkmt_enumadapters3()
    e.filter.include_compute_only = 1
    assert e.filter.value == 1
    e.adapter_count = 3
    info = uapi.d3dkmt_adapterinfo()
    info.adapter_handle.v = 0x40000040
    assert info.adapter_handle.index == 1 and info.adapter_handle.unique == 1
    u = uapi.d3dkmt_updategpuvirtualaddress()
    u.flags.do_not_wait = 1
    assert u.flags.value == 1
    s = uapi.d3dddi_synchronizationobjectinfo2()
    s.monitored_fence.initial_fence_value = 7
    assert s.fence.fence_value == 7 and s.reserved.reserved[0] == 7


# ---------------------------------------------------------------------------------------------
# enums and constants


@pytest.mark.parametrize("item", _params(sorted(ALL_ENUMS.items())))
def test_enum(item: tuple[str, dict[str, Any]] | None) -> None:
    _need_abi()
    assert item is not None
    tag, info = item
    cls = structs.ENUMS[tag]
    assert cls.__name__ == tag and getattr(uapi, tag) is cls
    expected = {e["name"]: e["value"] for e in info["enumerators"]}
    assert expected == info["values"]
    assert {name: int(m) for name, m in cls.__members__.items()} == expected
    ctype = structs.ENUM_CTYPES[tag]
    assert ctypes.sizeof(ctype) == info["size"] and ctypes.alignment(ctype) == info["align"]
    assert (ctype(-1).value < 0) == info["underlying_signed"]


@pytest.mark.parametrize("item", _params(sorted(CONSTANTS.items())))
def test_constant(item: tuple[str, dict[str, Any]] | None) -> None:
    _need_abi()
    assert item is not None
    name, info = item
    assert getattr(uapi, name) == info["value"]


# ---------------------------------------------------------------------------------------------
# NTSTATUS <-> errno

S = uapi.NTSTATUS

# dxgkrnl dxgvmbus.c ntstatus2int(), row by row.
NTSTATUS2INT = [
    (S.STATUS_OBJECT_NAME_COLLISION, -errno.EEXIST),
    (S.STATUS_NO_MEMORY, -errno.ENOMEM),
    (S.STATUS_INVALID_PARAMETER, -errno.EINVAL),
    (S.STATUS_OBJECT_NAME_INVALID, -errno.ENOENT),
    (S.STATUS_OBJECT_NAME_NOT_FOUND, -errno.ENOENT),
    (S.STATUS_BUFFER_TOO_SMALL, -errno.EOVERFLOW),
    (S.STATUS_DEVICE_REMOVED, -errno.ENODEV),
    (S.STATUS_ACCESS_DENIED, -errno.EACCES),
    (S.STATUS_NOT_SUPPORTED, -errno.EPERM),
    (S.STATUS_ILLEGAL_INSTRUCTION, -errno.EOPNOTSUPP),
    (S.STATUS_INVALID_HANDLE, -errno.EBADF),
    (S.STATUS_GRAPHICS_ALLOCATION_BUSY, -errno.EINPROGRESS),
    (S.STATUS_OBJECT_TYPE_MISMATCH, -errno.EPROTOTYPE),
    (S.STATUS_NOT_IMPLEMENTED, -errno.EPERM),
    # Not in the switch: the default.
    (S.STATUS_UNSUCCESSFUL, -errno.EINVAL),
    (S.STATUS_NOT_FOUND, -errno.EINVAL),
    (S.STATUS_INTERNAL_ERROR, -errno.EINVAL),
    (S.STATUS_BUFFER_OVERFLOW, -errno.EINVAL),
    (0xC0FFEE00, -errno.EINVAL),
    # NT_SUCCESS: passed through (STATUS_TIMEOUT's switch row is unreachable).
    (S.STATUS_SUCCESS, 0),
    (S.STATUS_TIMEOUT, 0x102),
    (S.STATUS_PENDING, 0x103),
]


@pytest.mark.parametrize(("status", "expected"), NTSTATUS2INT, ids=lambda v: f"{v:#x}")
def test_ntstatus_to_errno(status: int, expected: int) -> None:
    assert uapi.ntstatus_to_errno(status) == expected
    assert uapi.ntstatus_to_errno(uapi.ntstatus_to_signed(status)) == expected


# libdxg src/d3dkmt-wsl.cpp LinuxErrToNTSTATUS(), row by row.
LINUXERR2NTSTATUS = [
    (errno.EEXIST, S.STATUS_OBJECT_NAME_COLLISION),
    (errno.ENOMEM, S.STATUS_NO_MEMORY),
    (errno.EINVAL, S.STATUS_INVALID_PARAMETER),
    (errno.ENOENT, S.STATUS_OBJECT_NAME_INVALID),
    (errno.EAGAIN, S.STATUS_TIMEOUT),
    (errno.EOVERFLOW, S.STATUS_BUFFER_TOO_SMALL),
    (errno.ENODEV, S.STATUS_DEVICE_REMOVED),
    (errno.EACCES, S.STATUS_ACCESS_DENIED),
    (errno.ENOSYS, S.STATUS_NOT_SUPPORTED),
    (errno.EPERM, S.STATUS_NOT_SUPPORTED),
    (errno.EOPNOTSUPP, S.STATUS_ILLEGAL_INSTRUCTION),
    (errno.EBADF, S.STATUS_INVALID_HANDLE),
    (errno.EINPROGRESS, S.STATUS_GRAPHICS_ALLOCATION_BUSY),
    (errno.EPROTOTYPE, S.STATUS_OBJECT_TYPE_MISMATCH),
    (errno.ENOTTY, S.STATUS_UNSUCCESSFUL),
    (errno.EFAULT, S.STATUS_UNSUCCESSFUL),
    (0, S.STATUS_UNSUCCESSFUL),
]


@pytest.mark.parametrize(("err", "expected"), LINUXERR2NTSTATUS, ids=lambda v: str(v))
def test_errno_to_ntstatus(err: int, expected: int) -> None:
    assert uapi.errno_to_ntstatus(err) == expected
    assert uapi.errno_to_ntstatus(-err) == expected


def test_ioctl_result_to_ntstatus() -> None:
    assert uapi.ioctl_result_to_ntstatus(0) == S.STATUS_SUCCESS
    assert uapi.ioctl_result_to_ntstatus(0x103) is S.STATUS_PENDING
    assert uapi.ioctl_result_to_ntstatus(0x102) == S.STATUS_TIMEOUT
    assert uapi.ioctl_result_to_ntstatus(-errno.EBADF) == S.STATUS_INVALID_HANDLE
    assert uapi.ioctl_result_to_ntstatus(-errno.ENOTTY) == S.STATUS_UNSUCCESSFUL
    # A raw negative NTSTATUS returned by the kernel (CreateAllocation) passes through.
    raw = uapi.ntstatus_to_signed(S.STATUS_INVALID_PARAMETER)
    assert uapi.ioctl_result_to_ntstatus(raw) == S.STATUS_INVALID_PARAMETER
    # Host status -> kernel (ntstatus2int) -> libdxg (LinuxErrToNTSTATUS): lossy, as for real.
    round_trips = {
        S.STATUS_INVALID_HANDLE: S.STATUS_INVALID_HANDLE,
        S.STATUS_NO_MEMORY: S.STATUS_NO_MEMORY,
        S.STATUS_NOT_IMPLEMENTED: S.STATUS_NOT_SUPPORTED,
        S.STATUS_OBJECT_NAME_NOT_FOUND: S.STATUS_OBJECT_NAME_INVALID,
        S.STATUS_INTERNAL_ERROR: S.STATUS_INVALID_PARAMETER,
        S.STATUS_PENDING: S.STATUS_PENDING,
    }
    for host, seen in round_trips.items():
        assert uapi.ioctl_result_to_ntstatus(uapi.ntstatus_to_errno(host)) == seen, host.name


def test_ntstatus_values_and_helpers() -> None:
    expected = {
        "STATUS_SUCCESS": 0,
        "STATUS_TIMEOUT": 0x102,
        "STATUS_PENDING": 0x103,
        "STATUS_BUFFER_OVERFLOW": 0x80000005,
        "STATUS_UNSUCCESSFUL": 0xC0000001,
        "STATUS_NOT_IMPLEMENTED": 0xC0000002,
        "STATUS_INFO_LENGTH_MISMATCH": 0xC0000004,
        "STATUS_INVALID_HANDLE": 0xC0000008,
        "STATUS_INVALID_PARAMETER": 0xC000000D,
        "STATUS_INVALID_DEVICE_REQUEST": 0xC0000010,
        "STATUS_NO_MEMORY": 0xC0000017,
        "STATUS_ILLEGAL_INSTRUCTION": 0xC000001D,
        "STATUS_ACCESS_DENIED": 0xC0000022,
        "STATUS_BUFFER_TOO_SMALL": 0xC0000023,
        "STATUS_OBJECT_TYPE_MISMATCH": 0xC0000024,
        "STATUS_OBJECT_NAME_INVALID": 0xC0000033,
        "STATUS_OBJECT_NAME_NOT_FOUND": 0xC0000034,
        "STATUS_OBJECT_NAME_COLLISION": 0xC0000035,
        "STATUS_DEVICE_NOT_READY": 0xC00000A3,
        "STATUS_NOT_SUPPORTED": 0xC00000BB,
        "STATUS_INTERNAL_ERROR": 0xC00000E5,
        "STATUS_PROCESS_IS_TERMINATING": 0xC000010A,
        "STATUS_CANCELLED": 0xC0000120,
        "STATUS_NOT_FOUND": 0xC0000225,
        "STATUS_DEVICE_REMOVED": 0xC00002B6,
        "STATUS_GRAPHICS_PRESENT_OCCLUDED": 0xC01E0006,
        "STATUS_GRAPHICS_ALLOCATION_BUSY": 0xC01E0102,
    }
    for name, value in expected.items():
        assert S[name] == value, name
    assert uapi.nt_success(0) and uapi.nt_success(0x103) and uapi.nt_success(0x401E000A)
    assert not uapi.nt_success(0xC0000008) and not uapi.nt_success(0x80000005)
    assert not uapi.nt_success(-1073741816)
    assert uapi.ntstatus_to_signed(0xC0000008) == -1073741816
    assert uapi.ntstatus_to_unsigned(-1073741816) == 0xC0000008
    assert uapi.status_name(0xC0000008) == "STATUS_INVALID_HANDLE (0xC0000008)"
    assert uapi.status_name(-1073741811) == "STATUS_INVALID_PARAMETER (0xC000000D)"
    assert uapi.status_name(0) == "STATUS_SUCCESS (0x00000000)"
    assert uapi.status_name(0xC0DE0001) == "0xC0DE0001"
    with pytest.raises(ValueError):
        uapi.ntstatus_to_unsigned(1 << 32)
    assert ntstatus.NTSTATUS is S and uapi.ntstatus is ntstatus


# ---------------------------------------------------------------------------------------------
# handles


def test_handle_format() -> None:
    assert handles.HANDLE_INDEX_BITS == 24 and handles.HANDLE_INDEX_MAX == 0xFFFFFF
    assert uapi.make_handle(0, 1) == 0x40000000
    assert uapi.make_handle(1, 1) == 0x40000040
    for index in (0, 1, 2, 0x1234, handles.HANDLE_INDEX_MAX):
        h = uapi.make_handle(index, 1)
        assert h == 0x40000000 + index * 0x40
        assert uapi.handle_index(h) == index and uapi.handle_unique(h) == 1
    h = uapi.make_handle(0xABCDEF, 3, 0x2A)
    assert (uapi.handle_index(h), uapi.handle_unique(h), uapi.handle_instance(h)) == (
        0xABCDEF,
        3,
        0x2A,
    )
    assert h == (3 << 30) | (0xABCDEF << 6) | 0x2A
    for bad in ((handles.HANDLE_INDEX_MAX + 1, 1, 0), (0, 4, 0), (0, 1, 64), (-1, 1, 0)):
        with pytest.raises(ValueError):
            uapi.make_handle(*bad)
    with pytest.raises(ValueError):
        uapi.handle_index(1 << 32)


def test_handle_matches_c_bitfields_and_ctypes_helpers() -> None:
    for index, unique, instance in ((1, 1, 0), (0xFFFFFF, 3, 63), (0x123456, 2, 5)):
        value = uapi.make_handle(index, unique, instance)
        h = uapi.to_handle(value)
        assert (h.index, h.unique, h.instance, h.v) == (index, unique, instance, value)
        assert uapi.handle_value(h) == value
        assert uapi.handle_index(h) == index
    args = uapi.d3dkmt_createdevice()
    uapi.set_handle_value(args.adapter, 0x40000080)
    assert args.adapter.v == 0x40000080 and args.adapter.index == 2
    assert bytes(args)[:4] == (0x40000080).to_bytes(4, "little")
    args.device.v = uapi.make_handle(5, 1)
    assert uapi.handle_value(args.device) == 0x40000140
    assert uapi.handle_str(0x40000040) == "0x40000040 (index 1, unique 1)"
    with pytest.raises(TypeError):
        uapi.set_handle_value(5, 1)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# WDDM payloads (sizes on the wire: WCHAR is UTF-16)

WDDM_LAYOUT = [
    ("D3DKMT_ADAPTERTYPE", 4, 4),
    ("D3DKMT_SEGMENTSIZEINFO", 24, 8),
    ("D3DKMT_SEGMENTGROUPSIZEINFO", 56, 8),
    ("D3DKMT_ADAPTERADDRESS", 12, 4),
    ("D3DKMT_PHYSICAL_ADAPTER_COUNT", 4, 4),
    ("D3DKMT_DEVICE_IDS", 24, 4),
    ("D3DKMT_QUERY_DEVICE_IDS", 28, 4),
    ("D3DKMT_UMD_DRIVER_VERSION", 8, 8),
    ("D3DKMT_KMD_DRIVER_VERSION", 8, 8),
    ("D3DKMT_UMDFILENAMEINFO", 524, 4),
    ("D3DKMT_OPENGLINFO", 528, 4),
    ("D3DKMT_ADAPTERREGISTRYINFO", 2080, 2),
    ("D3DKMT_QUERY_ADAPTER_UNIQUE_GUID", 80, 2),
    ("D3DKMT_DRIVER_DESCRIPTION", 8192, 2),
    ("D3DKMT_PARAVIRTUALIZATION", 1, 1),
    ("D3DKMT_GPUMMU_CAPS", 8, 4),
    ("D3DKMT_QUERY_GPUMMU_CAPS", 12, 4),
    ("D3DKMDT_PREEMPTION_CAPS", 8, 4),
    ("D3DKMT_WDDM_1_2_CAPS", 12, 4),
    ("D3DKMT_WDDM_1_3_CAPS", 4, 1),
    ("D3DKMT_WDDM_2_0_CAPS", 4, 1),
    ("D3DKMT_WDDM_2_7_CAPS", 4, 1),
    ("D3DKMT_WDDM_2_9_CAPS", 4, 1),
    ("D3DKMT_WDDM_3_0_CAPS", 4, 1),
    ("DXGK_NODEMETADATA_FLAGS", 4, 1),
    ("DXGK_NODEMETADATA", 74, 1),
    ("D3DKMT_NODEMETADATA", 78, 1),
    ("D3DKMT_DRIVERCAPS_EXT", 4, 1),
    ("D3DKMT_DISPLAY_CAPS", 8, 1),
]


@pytest.mark.parametrize(("name", "size", "align"), WDDM_LAYOUT, ids=lambda v: str(v))
def test_wddm_layout(name: str, size: int, align: int) -> None:
    cls = getattr(uapi, name)
    assert cls in wddm.WDDM_STRUCTS and cls._c_typedef_ == name and cls._c_tag_ == "_" + name
    assert (ctypes.sizeof(cls), ctypes.alignment(cls)) == (size, align)


def test_wddm_members() -> None:
    assert {c.__name__ for c in wddm.WDDM_STRUCTS} == {n for n, _, _ in WDDM_LAYOUT}
    t = uapi.D3DKMT_ADAPTERTYPE(Value=0)
    t.RenderSupported = 1
    t.Paravirtualized = 1
    t.ComputeOnly = 1
    assert t.Value == (1 << 0) | (1 << 7) | (1 << 11)
    caps = uapi.D3DKMT_WDDM_2_7_CAPS()
    caps.HwSchEnabled = 1
    assert caps.Value == 2
    meta = uapi.D3DKMT_NODEMETADATA()
    assert uapi.D3DKMT_NODEMETADATA.NodeData.offset == 4
    assert uapi.DXGK_NODEMETADATA.Flags.offset == 68
    assert uapi.DXGK_NODEMETADATA.IoMmuSupported.offset == 73
    meta.NodeData.Flags.MaxInFlightHwQueueBuffers = 0xFFFF
    assert meta.NodeData.Flags.Value == 0xFFFF0000
    assert uapi.D3DKMT_QUERY_DEVICE_IDS.DeviceIds.offset == 4
    assert uapi.D3DKMT_SEGMENTGROUPSIZEINFO.LegacyInfo.offset == 8
    assert uapi.D3DKMT_WDDM_1_2_CAPS.Value.offset == 8
    assert uapi.D3DKMT_NODEMETADATA_WCHAR16 is uapi.D3DKMT_NODEMETADATA


def test_kmtqueryadapterinfotype() -> None:
    q = uapi.KMTQUERYADAPTERINFOTYPE
    assert len(q.__members__) == 78 and len(q) == 77  # value 64 has two names
    assert 14 not in {int(m) for m in q} and max(q) == 77
    assert q.KMTQAITYPE_UMDRIVERPRIVATE == 0
    assert q.KMTQAITYPE_ADAPTERTYPE == 15 == structs.kmtqueryadapterinfotype._KMTQAITYPE_ADAPTERTYPE
    assert q.KMTQAITYPE_ADAPTERTYPE_RENDER == 57
    assert q.KMTQAITYPE_PHYSICALADAPTERDEVICEIDS == 31
    assert q.KMTQAITYPE_DRIVER_DESCRIPTION == 65
    assert q.KMTQAITYPE_WDDM_2_7_CAPS == 70
    assert q.KMTQAITYPE_DISPLAY_UMDRIVERNAME == 71
    assert q.KMTQUITYPE_GPUVERSION is q.KMTQAITYPE_GPUVERSION
    assert uapi.QAI_PAYLOADS[q.KMTQAITYPE_ADAPTERTYPE] is uapi.D3DKMT_ADAPTERTYPE
    assert uapi.QAI_PAYLOADS[q.KMTQAITYPE_PHYSICALADAPTERDEVICEIDS] is uapi.D3DKMT_QUERY_DEVICE_IDS


def test_utf16_helpers() -> None:
    assert uapi.encode_utf16z("ab", 4) == b"a\0b\0\0\0\0\0"
    assert uapi.encode_utf16z("abcdef", 3) == b"a\0b\0\0\0"
    assert uapi.encode_utf16z("", 1) == b"\0\0"
    # A surrogate pair is never split.
    assert uapi.encode_utf16z("a\U0001f600", 3) == b"a\0\0\0\0\0"
    assert uapi.decode_utf16z(uapi.encode_utf16z("a\U0001f600", 4)) == "a\U0001f600"
    with pytest.raises(ValueError):
        uapi.encode_utf16z("x", 0)
    desc = uapi.D3DKMT_DRIVER_DESCRIPTION()
    text = "Microsoft Basic Render Driver - \u00e9\u4e2d"
    data = uapi.encode_utf16z(text, len(desc.DriverDescription))
    ctypes.memmove(desc.DriverDescription, data, len(data))
    assert uapi.decode_utf16z(desc.DriverDescription) == text
    assert uapi.decode_utf16z(bytes(desc)) == text
    assert uapi.decode_utf16z(b"x\0y") == "x"  # odd trailing byte ignored
