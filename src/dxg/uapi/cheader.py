"""Render ``dxg_uapi.h``: a C header written *from the ctypes classes* of ``dxg.uapi``.

The header uses the public Linux names (``struct d3dkmthandle``, ``enum d3dkmt_...``,
``LX_DX...`` macros built with ``_IOWR(0x47, nr, struct ...)``, ``D3DKMT_ADAPTERS_MAX``...) and
``__u32``/``__u64`` from ``<linux/types.h>``, so a program written for the Linux
``d3dkmthk.h`` compiles against it unchanged.  The Windows QueryAdapterInfo payloads of
``dxg.uapi.wddm`` follow, as libdxg-style typedefs (``typedef struct _D3DKMT_ADAPTERTYPE {...}
D3DKMT_ADAPTERTYPE;``) with ``__u16`` for the UTF-16 WCHAR of the wire format.

Member order, names, bit widths, array lengths, nesting, anonymity (``_anonymous_``) and packing
(``_pack_``) come from the ctypes classes; the C spelling of each member's type comes from the
class's ``_c_types_`` and is cross-checked against the ctypes size while rendering, so the header
cannot silently disagree with the classes.  ``tests/test_uapi_header.py`` compiles it with
``gcc -Wall -Werror`` and compares every ``sizeof``/``_Alignof``/``offsetof`` and bit-field
position with ctypes.
"""

from __future__ import annotations

import ctypes
import enum
from collections.abc import Iterator
from dataclasses import dataclass
from types import MappingProxyType

from . import ioctls, structs, wddm

__all__ = (
    "HEADER_NAME",
    "FlatField",
    "HeaderRenderError",
    "all_struct_classes",
    "c_type_name",
    "flat_fields",
    "render_header",
)

HEADER_NAME = "dxg_uapi.h"

# Byte size of every C scalar spelling used in ``_c_types_`` (enums are handled separately).
_C_SCALAR_SIZES = MappingProxyType(
    {
        "__u8": 1,
        "__s8": 1,
        "__u16": 2,
        "__s16": 2,
        "__u32": 4,
        "__s32": 4,
        "__u64": 8,
        "__s64": 8,
        "int": 4,
        "bool": 1,
        "char": 1,
        "__u64 *": 8,
    }
)

_SIGNED_CTYPES = (ctypes.c_int8, ctypes.c_int16, ctypes.c_int32, ctypes.c_int64)

# Numeric #defines that array dimensions in ``_c_types_`` may name.
_DEFINES = (
    ("D3DDDI_MAX_WRITTEN_PRIMARIES", ioctls.D3DDDI_MAX_WRITTEN_PRIMARIES),
    ("D3DDDI_MAX_MPO_PRESENT_DIRTY_RECTS", ioctls.D3DDDI_MAX_MPO_PRESENT_DIRTY_RECTS),
    ("D3DKMT_CREATEALLOCATION_MAX", ioctls.D3DKMT_CREATEALLOCATION_MAX),
    ("D3DKMT_MAKERESIDENT_ALLOC_MAX", ioctls.D3DKMT_MAKERESIDENT_ALLOC_MAX),
    ("D3DKMT_ADAPTERS_MAX", ioctls.D3DKMT_ADAPTERS_MAX),
    ("D3DDDI_MAX_BROADCAST_CONTEXT", ioctls.D3DDDI_MAX_BROADCAST_CONTEXT),
    ("D3DDDI_MAX_OBJECT_WAITED_ON", ioctls.D3DDDI_MAX_OBJECT_WAITED_ON),
    ("D3DDDI_MAX_OBJECT_SIGNALED", ioctls.D3DDDI_MAX_OBJECT_SIGNALED),
)


class HeaderRenderError(Exception):
    """The ctypes classes and their ``_c_types_`` metadata disagree."""


@dataclass(frozen=True, slots=True)
class FlatField:
    """One C access path of a struct, with its ctypes layout (offsets from the struct start).

    For a bit-field, ``offset`` is its storage unit's offset, ``size`` the unit's size and
    ``bit_offset``/``bit_width`` its position in that unit; otherwise both are None.
    """

    path: str
    offset: int
    size: int
    ctype: type
    bit_offset: int | None = None
    bit_width: int | None = None

    @property
    def is_bitfield(self) -> bool:
        return self.bit_width is not None

    @property
    def is_signed(self) -> bool:
        return self.ctype in _SIGNED_CTYPES


def _is_aggregate(t: type) -> bool:
    return isinstance(t, type) and issubclass(t, ctypes.Structure | ctypes.Union)


def c_type_name(cls: type) -> str:
    """How C names a tagged class: ``struct d3dkmthandle`` or a typedef (``D3DKMT_ADAPTERTYPE``)."""
    typedef = getattr(cls, "_c_typedef_", None)
    if typedef:
        return typedef
    tag = getattr(cls, "_c_tag_", None)
    if not tag:
        raise HeaderRenderError(f"{cls.__name__} has no C name (untagged helper class)")
    return f"{cls._c_kind_} {tag}"


def all_struct_classes() -> tuple[type, ...]:
    """Every tagged class the header defines: Linux UAPI structs, then the WDDM payloads."""
    return (*structs.STRUCTS.values(), *wddm.WDDM_STRUCTS)


def flat_fields(cls: type, *, into_records: bool = True) -> Iterator[FlatField]:
    """Every C access path of ``cls`` (anonymous levels add nothing, as in C), depth first.

    Members of untagged inline aggregates are always included (``flags.do_not_wait``); members
    of named struct/union members (``adapter.v``) only if ``into_records``.
    """
    yield from _flat(cls, "", 0, into_records)


def _flat(cls: type, prefix: str, base: int, into_records: bool) -> Iterator[FlatField]:
    anonymous = set(getattr(cls, "_anonymous_", ()))
    for field in cls._fields_:
        name, ftype = field[0], field[1]
        desc = getattr(cls, name)
        offset = base + desc.offset
        if name in anonymous:
            yield from _flat(ftype, prefix, offset, into_records)
            continue
        path = prefix + name
        if len(field) == 3:
            yield FlatField(
                path,
                offset,
                ctypes.sizeof(ftype),
                ftype,
                bit_offset=desc.size & 0xFFFF,
                bit_width=desc.size >> 16,
            )
            continue
        yield FlatField(path, offset, desc.size, ftype)
        if _is_aggregate(ftype) and (into_records or ftype._c_tag_ is None):
            yield from _flat(ftype, path + ".", offset, into_records)


# ---------------------------------------------------------------------------------------------
# Type checks


def _enum_sizes() -> dict[str, int]:
    """Size of every enum spelling: ``enum <tag>`` of the UAPI and the WDDM typedef names."""
    sizes = {f"enum {tag}": ctypes.sizeof(ct) for tag, ct in structs.ENUM_CTYPES.items()}
    for enum_cls, _tag in wddm.WDDM_ENUMS:
        sizes[enum_cls.__name__] = 4
    return sizes


def _dim_value(dim: str) -> int:
    for name, value in _DEFINES:
        if dim == name:
            return value
    try:
        return int(dim, 0)
    except ValueError:
        raise HeaderRenderError(f"unknown array dimension {dim!r}") from None


def _split_array(c_text: str) -> tuple[str, list[str]]:
    base, sep, rest = c_text.partition("[")
    if not sep:
        return c_text, []
    dims = ("[" + rest).replace("]", "").split("[")[1:]
    return base.rstrip(), dims


def _check_member(owner: type, name: str, ftype: type, c_text: str, enum_sizes: dict) -> None:
    where = f"{owner.__name__}.{name}"
    base, dims = _split_array(c_text)
    count = 1
    for dim in dims:
        count *= _dim_value(dim)
    if dims:
        if not issubclass(ftype, ctypes.Array):
            raise HeaderRenderError(f"{where}: C array {c_text!r} but ctypes type is not one")
        elem = ftype
        while issubclass(elem, ctypes.Array):
            elem = elem._type_
    else:
        elem = ftype
    if _is_aggregate(elem):
        expected = c_type_name(elem)
        if base != expected:
            raise HeaderRenderError(f"{where}: C type {base!r} but ctypes type is {expected!r}")
        elem_size = ctypes.sizeof(elem)
    elif base in _C_SCALAR_SIZES:
        elem_size = _C_SCALAR_SIZES[base]
    elif base in enum_sizes:
        elem_size = enum_sizes[base]
    else:
        raise HeaderRenderError(f"{where}: unknown C type {base!r}")
    if elem_size * count != ctypes.sizeof(ftype):
        raise HeaderRenderError(
            f"{where}: C type {c_text!r} is {elem_size * count} bytes, "
            f"ctypes {ftype.__name__} is {ctypes.sizeof(ftype)}"
        )


# ---------------------------------------------------------------------------------------------
# Rendering


def _member_decl(name: str, c_text: str, width: int | None) -> str:
    base, dims = _split_array(c_text)
    sep = "" if base.endswith("*") else " "
    decl = f"{base}{sep}{name}" + "".join(f"[{d}]" for d in dims)
    if width is not None:
        decl += f":{width}"
    return decl + ";"


def _body(cls: type, depth: int, enum_sizes: dict) -> list[str]:
    """The member lines of ``cls`` (without braces), indented ``depth`` tabs."""
    c_types = tuple(getattr(cls, "_c_types_", ()))
    names = [f[0] for f in cls._fields_]
    if [n for n, _ in c_types] != names:
        raise HeaderRenderError(f"{cls.__name__}: _c_types_ does not list the _fields_ in order")
    anonymous = set(getattr(cls, "_anonymous_", ()))
    tab = "\t" * depth
    lines: list[str] = []
    for field, (name, c_text) in zip(cls._fields_, c_types, strict=True):
        ftype = field[1]
        if c_text in ("struct", "union"):
            if not _is_aggregate(ftype) or ftype._c_kind_ != c_text or ftype._c_tag_ is not None:
                raise HeaderRenderError(f"{cls.__name__}.{name}: not an untagged {c_text}")
            lines.append(f"{tab}{c_text} {{")
            lines.extend(_body(ftype, depth + 1, enum_sizes))
            lines.append(f"{tab}}};" if name in anonymous else f"{tab}}} {name};")
            continue
        if name in anonymous:
            raise HeaderRenderError(f"{cls.__name__}.{name}: anonymous member must be inline")
        width = field[2] if len(field) == 3 else None
        if width is not None:
            if not _is_c_int_type(c_text, enum_sizes):
                raise HeaderRenderError(f"{cls.__name__}.{name}: bit-field of type {c_text!r}")
            size = _C_SCALAR_SIZES.get(c_text) or enum_sizes[c_text]
            if size != ctypes.sizeof(ftype):
                raise HeaderRenderError(f"{cls.__name__}.{name}: bit-field storage size differs")
        else:
            _check_member(cls, name, ftype, c_text, enum_sizes)
        lines.append(tab + _member_decl(name, c_text, width))
    return lines


def _is_c_int_type(c_text: str, enum_sizes: dict) -> bool:
    return c_text in enum_sizes or (c_text in _C_SCALAR_SIZES and "*" not in c_text)


def _render_struct(cls: type, enum_sizes: dict) -> list[str]:
    kind, tag = cls._c_kind_, cls._c_tag_
    typedef = getattr(cls, "_c_typedef_", None)
    pack = getattr(cls, "_pack_", None)
    lines: list[str] = []
    if pack:
        lines.append(f"#pragma pack(push, {pack})")
    lines.append(f"typedef {kind} {tag} {{" if typedef else f"{kind} {tag} {{")
    lines.extend(_body(cls, 1, enum_sizes))
    lines.append(f"}} {typedef};" if typedef else "};")
    if pack:
        lines.append("#pragma pack(pop)")
    lines.append("")
    return lines


def _enum_literal(value: int) -> str:
    if value < 0:
        return str(value)
    return f"0x{value:X}" if value >= 0x10000 else str(value)


def _render_enum(enum_cls: type[enum.IntEnum], tag: str | None, typedef: str | None) -> list[str]:
    opener = "enum" + (f" {tag}" if tag else "")
    lines = [f"typedef {opener} {{" if typedef else f"{opener} {{"]
    for name, member in enum_cls.__members__.items():
        lines.append(f"\t{name} = {_enum_literal(int(member))},")
    lines.append(f"}} {typedef};" if typedef else "};")
    lines.append("")
    return lines


def render_header() -> str:
    """The text of ``dxg_uapi.h``."""
    enum_sizes = _enum_sizes()
    out: list[str] = [
        "/* SPDX-License-Identifier: MIT */",
        "/*",
        f" * {HEADER_NAME} - generated by dxg.uapi.cheader.render_header() from the ctypes",
        " * classes of dxg.uapi; do not edit.",
        " *",
        " * The Linux dxgkrnl UAPI (include/uapi/misc/d3dkmthk.h, plus ioctls 0x45-0x49 of the",
        " * later driver) with the same type, member and macro names, followed by the Windows",
        " * QueryAdapterInfo payloads (libdxg names; WCHAR is UTF-16, so __u16).",
        " * Target: x86-64 Linux user space.",
        " */",
        "",
        "#ifndef _DXG_UAPI_H",
        "#define _DXG_UAPI_H",
        "",
        "#include <linux/types.h>",
        "#include <linux/ioctl.h>",
        "#ifndef __cplusplus",
        "#include <stdbool.h>",
        "#endif",
        "",
        "/* User space: DXGKPOINTER(x) members are plain 64-bit user addresses (__u64 *). */",
        "#ifndef DXGKPOINTER",
        "#define DXGKPOINTER(x) __u64",
        "#endif",
        "",
    ]
    for name, value in _DEFINES:
        out.append(f"#define {name} {value}")
    out.append("")

    out.append("/* Enums of the Linux UAPI. */")
    out.append("")
    for tag, enum_cls in structs.ENUMS.items():
        out.extend(_render_enum(enum_cls, tag, None))

    out.append("/* Structs and unions of the Linux UAPI. */")
    out.append("")
    for cls in structs.STRUCTS.values():
        out.extend(_render_struct(cls, enum_sizes))

    out.append("/* ioctls: _IOWR('G', nr, struct). */")
    out.append("")
    for entry in ioctls.IOCTLS.values():
        if entry.code != ioctls._IOWR(ioctls.LX_DXGK_IOCTL_TYPE, entry.nr, entry.struct):
            raise HeaderRenderError(f"{entry.name}: code does not match its struct")
        out.append(
            f"#define {entry.name} \\\n"
            f"\t_IOWR(0x{ioctls.LX_DXGK_IOCTL_TYPE:02x}, 0x{entry.nr:02x}, "
            f"{c_type_name(entry.struct)})"
        )
    out.append("")
    out.append(f"#define LX_IO_MAX 0x{ioctls.LX_IO_MAX:02x}")
    out.append("")

    out.append("/* Windows QueryAdapterInfo payloads (microsoft/libdxg d3dkmthk.h, d3dkmdt.h). */")
    out.append("")
    for enum_cls, tag in wddm.WDDM_ENUMS:
        out.extend(_render_enum(enum_cls, tag, enum_cls.__name__))
    for cls in wddm.WDDM_STRUCTS:
        out.extend(_render_struct(cls, enum_sizes))

    out.append("#endif /* _DXG_UAPI_H */")
    return "\n".join(out) + "\n"
