"""dxg.uapi.cheader: the rendered ``dxg_uapi.h`` compiles and matches the ctypes classes.

A generated C program prints ``sizeof``/``_Alignof`` of every struct, ``offsetof``/``sizeof`` of
every member, the bytes of every bit-field after storing all-ones into it, every enumerator,
every ``#define`` and every ioctl macro; each is compared with ctypes.  A hand-written program
that uses the public Linux header's names must compile against the rendered header unchanged.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dxg import uapi
from dxg.uapi import cheader, ioctls, structs, wddm

GCC = shutil.which("gcc")
CFLAGS = ["-Wall", "-Werror", "-std=gnu11"]

pytestmark = pytest.mark.skipif(
    GCC is None,
    reason="!!! gcc NOT FOUND: the C header of dxg.uapi is NOT being compiled or checked !!!",
)

STRUCT_CLASSES = cheader.all_struct_classes()
DEFINE_NAMES = [
    "D3DDDI_MAX_WRITTEN_PRIMARIES",
    "D3DDDI_MAX_MPO_PRESENT_DIRTY_RECTS",
    "D3DKMT_CREATEALLOCATION_MAX",
    "D3DKMT_MAKERESIDENT_ALLOC_MAX",
    "D3DKMT_ADAPTERS_MAX",
    "D3DDDI_MAX_BROADCAST_CONTEXT",
    "D3DDDI_MAX_OBJECT_WAITED_ON",
    "D3DDDI_MAX_OBJECT_SIGNALED",
    "LX_IO_MAX",
]


def _enum_items() -> list[tuple[str, int]]:
    items = [
        (name, int(member))
        for enum_cls in (*structs.ENUMS.values(), *(e for e, _ in wddm.WDDM_ENUMS))
        for name, member in enum_cls.__members__.items()
    ]
    assert len({n for n, _ in items}) == len(items), "enumerator names must be unique in C"
    return items


def _compile(source: Path, out: Path, *extra: str, link: bool = False) -> None:
    assert GCC is not None
    cmd = [GCC, *CFLAGS, *extra, "-I", str(source.parent)]
    cmd += ["-o", str(out), str(source)] if link else ["-c", "-o", str(out), str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}{proc.stderr}"


@pytest.fixture(scope="module")
def header_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    build = tmp_path_factory.mktemp("dxg_uapi_header")
    (build / cheader.HEADER_NAME).write_text(cheader.render_header(), encoding="utf-8")
    return build


def test_header_compiles_standalone(header_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "only_header.c"
    src.write_text(f'#include "{cheader.HEADER_NAME}"\n#include "{cheader.HEADER_NAME}"\n')
    _compile(src, tmp_path / "only_header.o", "-I", str(header_dir))


def test_header_is_deterministic_and_complete() -> None:
    text = cheader.render_header()
    assert text == cheader.render_header()
    for cls in STRUCT_CLASSES:
        typedef = getattr(cls, "_c_typedef_", None)
        if typedef:
            assert f"\ntypedef {cls._c_kind_} {cls._c_tag_} {{\n" in text, typedef
            assert f"\n}} {typedef};\n" in text, typedef
        else:
            assert f"\n{cls._c_kind_} {cls._c_tag_} {{\n" in text, cls._c_tag_
    for entry in ioctls.IOCTLS.values():
        assert f"#define {entry.name} \\\n\t_IOWR(0x47, 0x{entry.nr:02x}, " in text
    assert "#define LX_DXENUMADAPTERS3 \\\n\t_IOWR(0x47, 0x3e, struct d3dkmt_enumadapters3)" in text


# ---------------------------------------------------------------------------------------------
# The probe program


def _c_str(s: str) -> str:
    return '"' + s + '"'


def _probe_source() -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <string.h>",
        f'#include "{cheader.HEADER_NAME}"',
        "",
        "static void dump(const char *name, const char *path, const void *p, size_t n)",
        "{",
        "\tconst unsigned char *b = p;",
        '\tprintf("B %s %s ", name, path);',
        "\tfor (size_t i = 0; i < n; i++)",
        '\t\tprintf("%02x", b[i]);',
        '\tprintf("\\n");',
        "}",
        "",
        "int main(void)",
        "{",
        "\tvolatile unsigned long long ones = ~0ULL;",
        "",
    ]
    for cls in STRUCT_CLASSES:
        key, ctype = cls.__name__, cheader.c_type_name(cls)
        lines.append(
            f'\tprintf("S %s %zu %zu\\n", {_c_str(key)}, sizeof({ctype}), _Alignof({ctype}));'
        )
        for ff in cheader.flat_fields(cls):
            if ff.is_bitfield:
                lines.append(
                    f"\t{{ {ctype} t; memset(&t, 0, sizeof t); t.{ff.path} = ones; "
                    f"dump({_c_str(key)}, {_c_str(ff.path)}, &t, sizeof t); }}"
                )
            else:
                lines.append(
                    f'\tprintf("F %s %s %zu %zu\\n", {_c_str(key)}, {_c_str(ff.path)}, '
                    f"offsetof({ctype}, {ff.path}), sizeof((({ctype} *)0)->{ff.path}));"
                )
    for entry in ioctls.IOCTLS.values():
        lines.append(
            f'\tprintf("I %s %llu\\n", {_c_str(entry.name)}, (unsigned long long){entry.name});'
        )
    for name, _ in _enum_items():
        lines.append(f'\tprintf("E %s %lld\\n", {_c_str(name)}, (long long){name});')
    for name in DEFINE_NAMES:
        lines.append(f'\tprintf("D %s %lld\\n", {_c_str(name)}, (long long){name});')
    lines += ["\treturn 0;", "}", ""]
    return "\n".join(lines)


@dataclass
class ProbeResult:
    structs: dict[str, tuple[int, int]] = field(default_factory=dict)
    fields: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    bits: dict[tuple[str, str], str] = field(default_factory=dict)
    ioctls: dict[str, int] = field(default_factory=dict)
    enums: dict[str, int] = field(default_factory=dict)
    defines: dict[str, int] = field(default_factory=dict)


@pytest.fixture(scope="module")
def probe(header_dir: Path) -> ProbeResult:
    src = header_dir / "probe.c"
    src.write_text(_probe_source(), encoding="utf-8")
    exe = header_dir / "probe"
    _compile(src, exe, link=True)
    proc = subprocess.run([str(exe)], capture_output=True, text=True, check=True)
    result = ProbeResult()
    for line in proc.stdout.splitlines():
        kind, *rest = line.split()
        if kind == "S":
            result.structs[rest[0]] = (int(rest[1]), int(rest[2]))
        elif kind == "F":
            result.fields[(rest[0], rest[1])] = (int(rest[2]), int(rest[3]))
        elif kind == "B":
            result.bits[(rest[0], rest[1])] = rest[2]
        elif kind == "I":
            result.ioctls[rest[0]] = int(rest[1])
        elif kind == "E":
            result.enums[rest[0]] = int(rest[1])
        elif kind == "D":
            result.defines[rest[0]] = int(rest[1])
        else:
            raise AssertionError(f"unexpected probe output {line!r}")
    return result


def _ctypes_bits(cls: type, ff: cheader.FlatField) -> str:
    obj = cls()
    parts = ff.path.split(".")
    target = obj
    for part in parts[:-1]:
        target = getattr(target, part)
    assert ff.bit_width is not None
    setattr(target, parts[-1], -1 if ff.is_signed else (1 << ff.bit_width) - 1)
    return bytes(obj).hex()


@pytest.mark.parametrize("cls", STRUCT_CLASSES, ids=lambda c: c.__name__)
def test_struct_matches_c(cls: type, probe: ProbeResult) -> None:
    key = cls.__name__
    assert probe.structs[key] == (ctypes.sizeof(cls), ctypes.alignment(cls)), (
        f"sizeof/_Alignof({cheader.c_type_name(cls)})"
    )
    wrong: list[str] = []
    for ff in cheader.flat_fields(cls):
        if ff.is_bitfield:
            c_bytes = probe.bits[(key, ff.path)]
            py_bytes = _ctypes_bits(cls, ff)
            if c_bytes != py_bytes:
                wrong.append(f"bit-field {ff.path}: C {c_bytes} != ctypes {py_bytes}")
        elif probe.fields[(key, ff.path)] != (ff.offset, ff.size):
            wrong.append(
                f"{ff.path}: C offset/size {probe.fields[(key, ff.path)]} "
                f"!= ctypes {(ff.offset, ff.size)}"
            )
    assert not wrong, f"{key}:\n" + "\n".join(wrong)


def test_probe_covered_every_member(probe: ProbeResult) -> None:
    n_fields = sum(1 for c in STRUCT_CLASSES for f in cheader.flat_fields(c) if not f.is_bitfield)
    n_bits = sum(1 for c in STRUCT_CLASSES for f in cheader.flat_fields(c) if f.is_bitfield)
    assert len(probe.structs) == len(STRUCT_CLASSES) == 127 + len(wddm.WDDM_STRUCTS)
    assert len(probe.fields) == n_fields and len(probe.bits) == n_bits
    assert n_bits > 155  # every UAPI bit-field, plus those reached through named members


@pytest.mark.parametrize("entry", list(ioctls.IOCTLS.values()), ids=lambda e: e.name)
def test_ioctl_macro_matches(entry: ioctls.IoctlDef, probe: ProbeResult) -> None:
    assert probe.ioctls[entry.name] == entry.code == getattr(uapi, entry.name)


def test_enums_and_defines_match(probe: ProbeResult) -> None:
    items = _enum_items()
    assert probe.enums == dict(items)
    assert probe.defines == {name: getattr(uapi, name) for name in DEFINE_NAMES}


# ---------------------------------------------------------------------------------------------
# A program written for the public Linux header (include/uapi/misc/d3dkmthk.h)

PUBLIC_HEADER_PROGRAM = r"""
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <fcntl.h>
#include <unistd.h>
#include "dxg_uapi.h"

static struct d3dkmt_adapterinfo infos[D3DKMT_ADAPTERS_MAX];

int main(void)
{
	int fd = open("/nonexistent/dev/dxg", O_RDWR);
	struct d3dkmt_enumadapters3 e = {0};
	struct d3dkmt_adapterinfo a;
	struct d3dkmt_openadapterfromluid open_args = {0};
	struct d3dkmt_queryadapterinfo q = {0};
	struct d3dkmt_createdevice cd = {0};
	struct d3dkmt_updategpuvirtualaddress up = {0};
	struct d3dddi_synchronizationobjectinfo2 so = {0};
	struct d3dkmt_isfeatureenabled fe = {0};
	D3DKMT_ADAPTERTYPE at = {0};
	D3DKMT_QUERY_DEVICE_IDS ids = {0};
	enum kmtqueryadapterinfotype t = _KMTQAITYPE_ADAPTERTYPE;
	int r;

	e.filter.include_compute_only = 1;
	e.filter.include_display_only = 0;
	e.adapter_count = D3DKMT_ADAPTERS_MAX;
	e.adapters = (void *)infos;
	a.adapter_handle.v = 0;
	a.adapter_luid.a = 1;
	a.adapter_luid.b = 2;
	open_args.adapter_luid = a.adapter_luid;
	q.adapter = a.adapter_handle;
	q.type = t;
	q.private_data = (void *)&at;
	q.private_data_size = sizeof(at);
	cd.adapter = open_args.adapter_handle;
	cd.flags.legacy_mode = 0;
	up.flags.do_not_wait = 1;
	so.type = _D3DDDI_MONITORED_FENCE;
	so.monitored_fence.initial_fence_value = 0;
	so.flags.shared = 0;
	fe.feature_id = _DXGK_FEATURE_HWSCH;
	at.ComputeOnly = 1;
	ids.DeviceIds.VendorID = 0x1414;
	(void)KMTQAITYPE_WDDM_2_7_CAPS;

	r = ioctl(fd, LX_DXENUMADAPTERS3, &e);
	r |= ioctl(fd, LX_DXOPENADAPTERFROMLUID, &open_args);
	r |= ioctl(fd, LX_DXQUERYADAPTERINFO, &q);
	r |= ioctl(fd, LX_DXCREATEDEVICE, &cd);
	r |= ioctl(fd, LX_ISFEATUREENABLED, &fe);
	r |= (ids.DeviceIds.VendorID != 0x1414) | (so.type != _D3DDDI_MONITORED_FENCE);
	printf("%d %d %u %u\n", r, LX_IO_MAX, (unsigned)sizeof(e), (unsigned)sizeof(up));
	if (fd >= 0)
		close(fd);
	return 0;
}
"""


def test_public_header_program_compiles_and_runs(header_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "uses_public_names.c"
    src.write_text(PUBLIC_HEADER_PROGRAM, encoding="utf-8")
    exe = tmp_path / "uses_public_names"
    _compile(src, exe, "-I", str(header_dir), link=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["-1", str(0x44), "24", str(ctypes.sizeof(uapi.d3dkmt_updategpuvirtualaddress))]
