#!/usr/bin/env python3
"""Generate ``src/dxg/uapi/structs.py`` from the d3dkmthk ABI description (JSON).

The JSON (``tests/data/d3dkmthk-abi.json`` in the repository by default) describes the
Linux dxgkrnl UAPI header ``include/uapi/misc/d3dkmthk.h`` as data: every struct/union with its
declaration tree (anonymous unions/structs, bit-fields, arrays, pointers), every enum and the
later ioctl 0x45-0x49 ``supplement``.  This script turns that tree into readable ctypes classes:

* one class per C struct/union, named exactly like the C tag, fields named like the C members;
* anonymous unions/structs become private helper classes plus ``_anonymous_`` so the C access
  paths (``args.adapter``, ``args.flags.do_not_wait``) work unchanged;
* untagged inline aggregates (``union {...} flags;``) become private helper classes too;
* bit-fields keep their declared storage type, ``#pragma pack(1)`` structs get ``_pack_ = 1``;
* ``DXGKPOINTER(x) *p`` (``__u64 *`` in user space) is a ``c_uint64`` user address;
* each C enum becomes an ``enum.IntEnum`` named like the C tag; enum-typed members use the
  enum's measured storage type (``c_uint32`` or ``c_int32``).

Every class also carries the C-level facts that ctypes loses, for ``dxg.uapi.cheader``:
``_c_kind_`` (``"struct"``/``"union"``), ``_c_tag_`` (``None`` for an untagged helper) and
``_c_types_``: ``(member, C type as declared)`` pairs.  For arrays the C type ends with the
dimension as written (``"struct d3dkmthandle[D3DDDI_MAX_BROADCAST_CONTEXT]"``); for an anonymous
or inline aggregate it is just ``"struct"``/``"union"``.

Usage::

    python3 tools/gen_uapi.py [ABI_JSON] [--out PATH] [--check]
"""

from __future__ import annotations

import argparse
import json
import keyword
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "tests" / "data" / "d3dkmthk-abi.json"
DEFAULT_OUT = REPO / "src" / "dxg" / "uapi" / "structs.py"

# C scalar type (after preprocessing) -> ctypes type.  ``char`` only occurs in opaque byte
# blobs (``char size[0x328]``), so it maps to c_uint8: a c_char array would cut reads at NUL.
SCALAR_CTYPES: Mapping[str, str] = MappingProxyType(
    {
        "__u8": "ctypes.c_uint8",
        "__u16": "ctypes.c_uint16",
        "__u32": "ctypes.c_uint32",
        "__u64": "ctypes.c_uint64",
        "__s8": "ctypes.c_int8",
        "__s16": "ctypes.c_int16",
        "__s32": "ctypes.c_int32",
        "__s64": "ctypes.c_int64",
        "int": "ctypes.c_int32",
        "bool": "ctypes.c_bool",
        "char": "ctypes.c_uint8",
    }
)

# Storage of an enum by (size, signed).
ENUM_STORAGE: Mapping[tuple[int, bool], str] = MappingProxyType(
    {
        (1, False): "ctypes.c_uint8",
        (1, True): "ctypes.c_int8",
        (2, False): "ctypes.c_uint16",
        (2, True): "ctypes.c_int16",
        (4, False): "ctypes.c_uint32",
        (4, True): "ctypes.c_int32",
        (8, False): "ctypes.c_uint64",
        (8, True): "ctypes.c_int64",
    }
)

POINTER_CTYPE = "ctypes.c_uint64"
POINTER_C_TYPE = "__u64 *"
INDENT = "    "
LINE_LENGTH = 100  # [tool.ruff] line-length


class GenError(Exception):
    """The JSON contains something this generator does not know how to express."""


def _check_identifier(name: str, where: str) -> str:
    if not name.isidentifier() or keyword.iskeyword(name):
        raise GenError(f"{where}: {name!r} is not usable as a Python identifier")
    return name


def _enum_tag(c_type: str) -> str:
    if not c_type.startswith("enum "):
        raise GenError(f"expected an enum type, got {c_type!r}")
    return c_type[len("enum ") :]


class Generator:
    """Collects the emitted source; one instance per run."""

    def __init__(self, abi: Mapping[str, Any]) -> None:
        self.abi = abi
        supplement = abi.get("supplement", {})
        self.enums: dict[str, Mapping[str, Any]] = dict(abi["enums"])
        self.enums.update(supplement.get("enums", {}))
        self.supplement_tags = set(supplement.get("structs", {})) | set(supplement.get("enums", {}))
        self.lines: list[str] = []
        self.root_c_name = ""
        self.class_names: set[str] = set()

    # ------------------------------------------------------------------ helpers

    def enum_ctype(self, c_type: str) -> str:
        tag = _enum_tag(c_type)
        info = self.enums.get(tag)
        if info is None:
            raise GenError(f"unknown enum {tag!r}")
        return ENUM_STORAGE[(int(info["size"]), bool(info["underlying_signed"]))]

    def scalar_ctype(self, c_type: str) -> str:
        if c_type.startswith("enum "):
            return self.enum_ctype(c_type)
        try:
            return SCALAR_CTYPES[c_type]
        except KeyError:
            raise GenError(f"unknown scalar type {c_type!r}") from None

    @staticmethod
    def record_class(member: Mapping[str, Any]) -> str:
        return _check_identifier(member["record_tag"], "record member")

    def element_ctype(self, member: Mapping[str, Any]) -> str:
        kind = member.get("element_kind")
        if kind == "record":
            c_type = member["element_type"]
            return _check_identifier(c_type.split()[-1], "array element")
        return self.scalar_ctype(member["element_type"])

    # ------------------------------------------------------------------ aggregates

    def emit_aggregate(
        self,
        pyname: str,
        kind: str,
        tag: str | None,
        members: Iterable[Mapping[str, Any]],
        pack: int | None,
        doc: str,
    ) -> None:
        """Emit the helper classes of ``members`` and then the class ``pyname``."""
        fields: list[list[str]] = []
        c_types: list[tuple[str, str]] = []
        anonymous: list[str] = []
        anon_index = 0
        for member in members:
            mkind = member["kind"]
            if mkind in ("anonymous_union", "anonymous_struct", "inline_union", "inline_struct"):
                sub_kind = "union" if mkind.endswith("union") else "struct"
                if mkind.startswith("anonymous"):
                    field_name = f"_anon{anon_index}"
                    anon_index += 1
                    anonymous.append(field_name)
                    where = f"anonymous {sub_kind} at +{member['offset']}"
                else:
                    field_name = _check_identifier(member["name"], pyname)
                    where = f"member {member['path']} (untagged {sub_kind}) at +{member['offset']}"
                helper = f"_{pyname.lstrip('_')}_{field_name.lstrip('_')}"
                self.emit_aggregate(
                    helper,
                    sub_kind,
                    None,
                    member["members"],
                    pack,
                    f"{where[0].upper()}{where[1:]} of ``{self.root_c_name}``.",
                )
                fields.append([f'"{field_name}"', helper])
                c_types.append((field_name, sub_kind))
                continue

            name = _check_identifier(member["name"], pyname)
            if mkind == "scalar":
                fields.append([f'"{name}"', self.scalar_ctype(member["type"])])
                c_types.append((name, member["type"]))
            elif mkind == "enum":
                fields.append([f'"{name}"', self.enum_ctype(member["type"])])
                c_types.append((name, member["type"]))
            elif mkind == "pointer":
                fields.append([f'"{name}"', POINTER_CTYPE])
                c_types.append((name, POINTER_C_TYPE))
            elif mkind == "record":
                fields.append([f'"{name}"', self.record_class(member)])
                c_types.append((name, member["type"]))
            elif mkind == "array":
                dims = [str(d) for d in member.get("dims_expr") or [member["count"]]]
                counts = self.array_counts(member, len(dims))
                fields.append([f'"{name}"', self.array_ctype(member, counts)])
                c_types.append((name, member["type"] + "".join(f"[{d}]" for d in dims)))
            elif mkind == "bitfield":
                width = str(int(member["bit_width"]))
                fields.append([f'"{name}"', self.scalar_ctype(member["type"]), width])
                c_types.append((name, member["type"]))
            else:
                raise GenError(f"{pyname}.{name}: unknown member kind {mkind!r}")

        if pyname in self.class_names:
            raise GenError(f"two classes would be named {pyname!r}")
        self.class_names.add(pyname)
        base = "ctypes.Union" if kind == "union" else "ctypes.Structure"
        out = self.lines
        out.append("")
        out.append("")
        out.append(f"class {pyname}({base}):")
        out.append(f'{INDENT}"""{doc}"""')
        out.append("")
        out.append(f'{INDENT}_c_kind_ = "{kind}"')
        out.append(f"{INDENT}_c_tag_ = " + (f'"{tag}"' if tag is not None else "None"))
        if pack is not None:
            out.append(f"{INDENT}_pack_ = {int(pack)}")
        if anonymous:
            out.extend(_tuple_lines("_anonymous_", [[f'"{a}"'] for a in anonymous]))
        out.extend(_tuple_lines("_fields_", fields))
        out.extend(_tuple_lines("_c_types_", [[f'"{n}"', f'"{t}"'] for n, t in c_types]))

    @staticmethod
    def array_counts(member: Mapping[str, Any], ndims: int) -> list[int]:
        if ndims != 1:
            raise GenError(f"{member['path']}: multi-dimensional arrays are not supported")
        return [int(member["count"])]

    def array_ctype(self, member: Mapping[str, Any], counts: list[int]) -> str:
        ctype = self.element_ctype(member)
        for count in reversed(counts):
            ctype = f"{ctype} * {count}"
        return ctype

    # ------------------------------------------------------------------ top level

    def emit_struct(self, tag: str, info: Mapping[str, Any], origin: str) -> None:
        self.root_c_name = f"{info['kind']} {tag}"
        pack = info.get("pragma_pack")
        where = f"d3dkmthk.h:{info['source_line']}" if origin == "header" else "supplement"
        packed = f", ``#pragma pack({pack})``" if pack else ""
        doc = (
            f"``{info['kind']} {tag}``: {info['size']} bytes, align {info['align']}{packed} "
            f"({where})."
        )
        self.emit_aggregate(
            _check_identifier(tag, "struct tag"), info["kind"], tag, info["members"], pack, doc
        )

    def emit_enum(self, tag: str, info: Mapping[str, Any], origin: str) -> None:
        where = f"d3dkmthk.h:{info['source_line']}" if origin == "header" else "supplement"
        sign = "signed" if info["underlying_signed"] else "unsigned"
        out = self.lines
        out.append("")
        out.append("")
        if tag in self.class_names:
            raise GenError(f"two classes would be named {tag!r}")
        self.class_names.add(tag)
        out.append(f"class {_check_identifier(tag, 'enum tag')}(enum.IntEnum):")
        out.append(f'{INDENT}"""``enum {tag}``: {info["size"]} bytes, {sign} ({where})."""')
        out.append("")
        for item in info["enumerators"]:
            name = _check_identifier(item["name"], f"enum {tag}")
            value = int(item["value"])
            written = (item.get("value_as_written") or "").strip()
            if written.lower().startswith("0x") and value >= 0:
                literal = f"0x{value:X}"
            else:
                literal = str(value)
            out.append(f"{INDENT}{name} = {literal}")

    def generate(self, json_label: str) -> str:
        abi = self.abi
        supplement = abi.get("supplement", {})
        meta = abi.get("meta", {})
        source = meta.get("source", {})

        header_structs = sorted(abi["structs"].items(), key=lambda kv: kv[1]["source_line"])
        supp_structs = sorted(
            supplement.get("structs", {}).items(), key=lambda kv: kv[1]["source_line"]
        )
        header_enums = sorted(abi["enums"].items(), key=lambda kv: kv[1]["source_line"])
        supp_enums = sorted(
            supplement.get("enums", {}).items(), key=lambda kv: kv[1]["source_line"]
        )

        out = self.lines
        out.extend(
            [
                "# Generated by tools/gen_uapi.py -- DO NOT EDIT; change the generator and rerun it:",
                "#     python3 tools/gen_uapi.py [path/to/d3dkmthk-abi.json]",
                f"# Input: {json_label}, the ABI of the Linux dxgkrnl UAPI header",
                f"#     {source.get('path', 'include/uapi/misc/d3dkmthk.h')} of "
                f"{source.get('repository', 'microsoft/WSL2-Linux-Kernel')}",
                f"#     at commit {source.get('commit', '?')}",
                f"#     (sha256 {source.get('sha256', '?')}),",
                "#     plus its 'supplement' (ioctls 0x45-0x49 from the dxgkrnl patch series).",
                "# Target: x86-64 Linux (LP64, gcc): sizes, alignments, offsets and bit positions",
                "# are those of the C header; tests/test_uapi_abi.py checks them against the JSON.",
                '"""ctypes mirror of the Linux dxgkrnl UAPI header ``d3dkmthk.h`` (generated).',
                "",
                "Struct/union classes are named like the C tags and enums like the C enum tags.",
                "Pointers (``DXGKPOINTER(x) *``) are ``c_uint64`` user addresses.  Class attributes",
                "``_c_kind_``, ``_c_tag_`` and ``_c_types_`` record the C declaration for",
                "``dxg.uapi.cheader``; private ``_<tag>_*`` classes are anonymous/inline members.",
                '"""',
                "",
                "import ctypes",
                "import enum",
                "from types import MappingProxyType",
            ]
        )

        for tag, info in header_enums:
            self.emit_enum(tag, info, "header")
        for tag, info in supp_enums:
            self.emit_enum(tag, info, "supplement")
        for tag, info in header_structs:
            self.emit_struct(tag, info, "header")
        for tag, info in supp_structs:
            self.emit_struct(tag, info, "supplement")

        all_enums = [tag for tag, _ in header_enums + supp_enums]
        all_structs = [tag for tag, _ in header_structs + supp_structs]

        out.append("")
        out.append("")
        out.append(
            "# Every struct/union of the header, then of the supplement, in declaration order."
        )
        out.append("STRUCTS = MappingProxyType(")
        out.append(f"{INDENT}{{")
        out.extend(f'{INDENT * 2}"{tag}": {tag},' for tag in all_structs)
        out.append(f"{INDENT}}}")
        out.append(")")
        out.append("")
        out.append("# Every enum of the header, then of the supplement, in declaration order.")
        out.append("ENUMS = MappingProxyType(")
        out.append(f"{INDENT}{{")
        out.extend(f'{INDENT * 2}"{tag}": {tag},' for tag in all_enums)
        out.append(f"{INDENT}}}")
        out.append(")")
        out.append("")
        out.append("# Storage type of each enum (what an enum-typed member occupies).")
        out.append("ENUM_CTYPES = MappingProxyType(")
        out.append(f"{INDENT}{{")
        out.extend(f'{INDENT * 2}"{tag}": {self.enum_ctype("enum " + tag)},' for tag in all_enums)
        out.append(f"{INDENT}}}")
        out.append(")")
        out.append("")
        out.append("# Tags that come from the supplement (ioctls 0x45-0x49), not from the header.")
        out.append("SUPPLEMENT_TAGS = frozenset(")
        out.append(f"{INDENT}{{")
        out.extend(f'{INDENT * 2}"{tag}",' for tag in sorted(self.supplement_tags))
        out.append(f"{INDENT}}}")
        out.append(")")
        out.append("")
        exported = sorted(
            ["ENUMS", "ENUM_CTYPES", "STRUCTS", "SUPPLEMENT_TAGS", *all_enums, *all_structs],
            key=_all_sort_key,
        )
        out.append("__all__ = (")
        out.extend(f'{INDENT}"{name}",' for name in exported)
        out.append(")")
        return "\n".join(out) + "\n"


def _tuple_lines(attr: str, items: list[list[str]]) -> list[str]:
    """``attr = (items...)`` as a class attribute, laid out the way ``ruff format`` does."""

    def item_text(parts: list[str]) -> str:
        return parts[0] if len(parts) == 1 else "(" + ", ".join(parts) + ")"

    if len(items) == 1:
        one_line = f"{INDENT}{attr} = ({item_text(items[0])},)"
        if len(one_line) <= LINE_LENGTH:
            return [one_line]
    lines = [f"{INDENT}{attr} = ("]
    for parts in items:
        line = f"{INDENT * 2}{item_text(parts)},"
        if len(line) <= LINE_LENGTH or len(parts) == 1:
            lines.append(line)
        else:
            lines.append(f"{INDENT * 2}(")
            lines.extend(f"{INDENT * 3}{part}," for part in parts)
            lines.append(f"{INDENT * 2}),")
    lines.append(f"{INDENT})")
    return lines


def _all_sort_key(name: str) -> tuple[int, str]:
    # The order ruff's RUF022 expects: SCREAMING_CASE, then CamelCase, then the rest.
    if name.upper() == name:
        return (0, name)
    if name[:1].isupper():
        return (1, name)
    return (2, name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "abi_json",
        nargs="?",
        type=Path,
        default=DEFAULT_JSON,
        help="ABI JSON (default: tests/data/d3dkmthk-abi.json)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output file")
    parser.add_argument(
        "--check", action="store_true", help="do not write; exit 1 if the output is stale"
    )
    args = parser.parse_args(argv)

    abi_path: Path = args.abi_json
    if not abi_path.is_file():
        print(f"gen_uapi: ABI JSON not found: {abi_path}", file=sys.stderr)
        return 2
    abi = json.loads(abi_path.read_text(encoding="utf-8"))
    try:
        text = Generator(abi).generate(abi_path.name)
    except GenError as exc:
        print(f"gen_uapi: {exc}", file=sys.stderr)
        return 2

    out: Path = args.out
    if args.check:
        current = out.read_text(encoding="utf-8") if out.is_file() else ""
        if current != text:
            print(f"gen_uapi: {out} is out of date", file=sys.stderr)
            return 1
        return 0
    out.write_text(text, encoding="utf-8")
    print(f"gen_uapi: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
