"""The FUSE device file: real mounts under tmp_path, a real stack behind them, and real client
processes (the C program tests/c/dxg_test.c built against the generated header, Python
children, other users).

Every mount is taken down by the fixture even when a test fails (``FuseNode.close`` in a
``finally``, then a lazy unmount of anything still mounted below the test's directory), and a
session-wide check fails the run if any pydxg FUSE mount is left below pytest's temporary
directory. Without FUSE (no ``/dev/fuse``, mounting not permitted) the mounting tests are skipped
with a loud reason; the protocol and documentation tests run everywhere.

Long calls come from the pydxg SLEEP escape (``dxg_test ... sleep``, held by the host) or from
driver wrappers that park a call; what the node does to a caller's memory is counted through an
instrumented ``Syscalls`` handed to the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import re
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import CountingSyscalls, make_stack, wait_until
from dxg.guest.ioctl import HANDLERS
from dxg.node import fuse_proto as fp
from dxg.node.fuse import (
    FSTYPE,
    MNT_DETACH,
    FuseNode,
    FuseUnavailable,
    UnsafeDevicePath,
    fuse_available,
    pydxg_mounts,
)
from dxg.node.server import NodeBusy
from dxg.node.support import (
    FILE_LIMITS,
    ioctl_support,
    render_ioctls_doc,
    render_libdxg_table,
)
from dxg.oslib.procmem import UserMemoryFault
from dxg.uapi.ioctls import (
    IOCTLS,
    IOCTLS_BY_NAME,
    LX_DXENUMADAPTERS3,
    LX_DXGETDEVICESTATE,
    LX_DXOPENADAPTERFROMLUID,
    LX_DXQUERYADAPTERINFO,
    LX_ISFEATUREENABLED,
)

ROOT = Path(__file__).resolve().parent.parent
C_SOURCE = ROOT / "tests" / "c" / "dxg_test.c"
DOC = ROOT / "docs" / "libdxg.md"
GCC = shutil.which("gcc")
NO_FUSE = fuse_available()
ADAPTERS = 2
KMTQAITYPE_ADAPTERTYPE = 15

needs_fuse = pytest.mark.skipif(
    NO_FUSE is not None,
    reason=f"!!! FUSE UNAVAILABLE ({NO_FUSE}): the /dev/dxg device file is NOT being tested !!!",
)
needs_gcc = pytest.mark.skipif(
    GCC is None, reason="!!! gcc NOT FOUND: the C client of the device file is NOT being run !!!"
)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (other users, mount(2))")


# ---- fixtures ---------------------------------------------------------------------------------


def _detach_all(under: Path) -> list[str]:
    """Lazily unmount every pydxg FUSE mount below ``under``; returns what was mounted."""
    left = pydxg_mounts(under)
    if left:
        libc = ctypes.CDLL(None, use_errno=True)
        for where in reversed(left):
            if libc.umount2(os.fsencode(where), MNT_DETACH) != 0 and shutil.which("fusermount3"):
                subprocess.run(["fusermount3", "-u", "-z", "-q", "--", where], check=False)
    return left


def _dead(where: str, timeout: float = 2.0) -> bool:
    """Whether the FUSE file at ``where`` belongs to a dead connection. Opening it asks the
    node (``stat`` could answer from the attribute cache); a node that does not answer at all
    is left alone too."""
    result: list[int] = []

    def probe() -> None:
        try:
            os.close(os.open(where, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK))
            result.append(0)
        except OSError as e:
            result.append(e.errno or errno.EIO)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(result) and result[0] in (errno.ENOTCONN, errno.ECONNABORTED)


@pytest.fixture(scope="session", autouse=True)
def no_fuse_mount_left(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the whole session: no pydxg FUSE mount may remain below pytest's temporary dir."""
    base = tmp_path_factory.getbasetemp()
    # Dead mounts of earlier, killed runs are detached first; live ones may belong to another
    # run in progress and are left alone.
    for where in pydxg_mounts(base.parent):
        if _dead(where):
            _detach_all(Path(where))
    yield
    left = _detach_all(base)
    assert not left, f"pydxg FUSE mounts were left behind (now detached): {left}"


@pytest.fixture
def stack(tmp_path: Path):
    with make_stack(tmp_path, "fuse", adapters=ADAPTERS) as s:
        yield s


def _mounted(node: FuseNode) -> bool:
    return str(node.path) in pydxg_mounts()


@contextlib.contextmanager
def mounted(driver, path: Path, **kw) -> Iterator[FuseNode]:
    """A started FuseNode at ``path``; always closed and unmounted afterwards."""
    node = FuseNode(driver, path, **kw)
    try:
        try:
            node.start()
        except FuseUnavailable as e:
            pytest.skip(f"!!! FUSE UNAVAILABLE ({e}): the device file is NOT being tested !!!")
        yield node
    finally:
        node.close()
        _detach_all(path.parent)


@pytest.fixture
def dev(stack, tmp_path: Path) -> Iterator[FuseNode]:
    if NO_FUSE is not None:
        pytest.skip(f"!!! FUSE UNAVAILABLE ({NO_FUSE}) !!!")
    with mounted(stack.driver, tmp_path / "dxg") as node:
        yield node


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every user can reach (pytest's own temporary directory is private to
    root); its mounts are taken down afterwards."""
    public = Path(tempfile.mkdtemp(prefix="pydxg-fuse-"))
    try:
        os.chmod(public, 0o755)
        yield public
    finally:
        _detach_all(public)
        shutil.rmtree(public, ignore_errors=True)


def _uapi_header() -> str:
    """``dxg uapi-header``: the CLI's command where it exists, else the generator directly."""
    cli = subprocess.run([sys.executable, "-m", "dxg.cli.main", "uapi-header"],
                         capture_output=True, text=True, timeout=60, check=False)
    if cli.returncode == 0 and "#define LX_DXENUMADAPTERS3" in cli.stdout:
        return cli.stdout
    from dxg.uapi.cheader import render_header

    return render_header()


@pytest.fixture(scope="session")
def dxg_test(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/c/dxg_test.c built with gcc against the generated dxg_uapi.h."""
    if GCC is None:
        pytest.skip("!!! gcc NOT FOUND: the C client of the device file is NOT being run !!!")
    build = tmp_path_factory.mktemp("dxg_test_c")
    (build / "dxg_uapi.h").write_text(_uapi_header(), encoding="utf-8")
    exe = build / "dxg_test"
    cc = subprocess.run(
        [GCC, "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread", "-I", str(build),
         str(C_SOURCE), "-o", str(exe)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert cc.returncode == 0, f"dxg_test.c does not build:\n{cc.stderr}"
    os.chmod(build, 0o755)
    return exe


def run_c(exe: Path, path: Path, mode: str, *opts: str, timeout: float = 60,
          **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(exe), "-a", str(ADAPTERS), *opts, str(path), mode],
                          capture_output=True, text=True, timeout=timeout, check=False, **kw)
    assert proc.returncode == 0 and f"PASS {mode}" in proc.stdout, (
        f"dxg_test {mode} exited {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr}")
    assert "FAIL" not in proc.stdout
    return proc


def _readline(proc: subprocess.Popen, timeout: float = 20.0) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        proc.kill()
        raise AssertionError(f"{proc.args} printed nothing in {timeout}s")
    return proc.stdout.readline()


def _enum3(fd: int) -> tuple[int, int]:
    b = bytearray(24)
    struct.pack_into("<Q", b, 0, 1)  # include_compute_only
    try:
        ret = fcntl.ioctl(fd, LX_DXENUMADAPTERS3, b, True)
    except OSError as e:
        return -e.errno, 0
    return ret, struct.unpack_from("<I", b, 8)[0]


def _settled(stack, node: FuseNode) -> bool:
    t = stack.host_totals()
    return (not node.processes() and not stack.driver.processes()
            and t["processes"] == 0 and t["devices"] == 0 and t["contexts"] == 0)


# ---- the FUSE protocol, bytes only ------------------------------------------------------------


def _request(opcode: int, body: bytes, unique: int = 7, pid: int = 1234) -> memoryview:
    hdr = struct.pack("<IIQQIIIHH", 40 + len(body), opcode, unique, 1, 1000, 100, pid, 0, 0)
    return memoryview(hdr + body)


def test_proto_parses_requests() -> None:
    req = fp.parse(_request(fp.Op.IOCTL, struct.pack("<QIIQII", 5, 0, 0xC018473E, 0xDEAD, 24, 24)
                            + bytes(range(24))))
    assert (req.opcode, req.unique, req.nodeid, req.uid, req.gid, req.pid) == (39, 7, 1, 1000,
                                                                                 100, 1234)
    io = fp.parse_ioctl(req)
    assert (io.fh, io.cmd, io.arg, io.in_size, io.out_size) == (5, 0xC018473E, 0xDEAD, 24, 24)
    assert bytes(io.data) == bytes(range(24))
    init = fp.parse_init(fp.parse(_request(fp.Op.INIT, struct.pack("<IIII", 7, 45, 1 << 17, 3)
                                           + bytes(48))))
    assert (init.major, init.minor, init.max_readahead, init.flags) == (7, 45, 1 << 17, 3)
    assert fp.parse_open(fp.parse(_request(fp.Op.OPEN, struct.pack("<II", os.O_RDONLY, 0)))) == 0
    assert fp.parse_fh(fp.parse(_request(fp.Op.RELEASE, struct.pack("<QIIQ", 9, 0, 0, 0)))) == 9
    assert fp.parse_interrupt(fp.parse(_request(fp.Op.INTERRUPT, struct.pack("<Q", 77)))) == 77


@pytest.mark.parametrize("raw", [
    b"\0" * 39,
    struct.pack("<IIQQIIIHH", 99, 1, 1, 1, 0, 0, 0, 0, 0),  # says 99 bytes, has 40
])
def test_proto_rejects_short_or_inconsistent_requests(raw: bytes) -> None:
    with pytest.raises(fp.ProtocolViolation):
        fp.parse(memoryview(raw))


def test_proto_rejects_short_bodies() -> None:
    with pytest.raises(fp.ProtocolViolation):
        fp.parse_ioctl(fp.parse(_request(fp.Op.IOCTL, b"\0" * 16)))
    with pytest.raises(fp.ProtocolViolation):  # says 24 bytes in, carries 4
        fp.parse_ioctl(fp.parse(_request(fp.Op.IOCTL, struct.pack("<QIIQII", 1, 0, 0, 0, 24, 24)
                                         + b"abcd")))
    with pytest.raises(fp.ProtocolViolation):
        fp.parse_init(fp.parse(_request(fp.Op.INIT, b"\0" * 8)))


def test_proto_replies() -> None:
    def joined(parts: list[bytes]) -> bytes:
        data = b"".join(parts)
        assert struct.unpack_from("<I", data)[0] == len(data)
        return data

    err = joined(fp.error_reply(5, errno.ENOSYS))
    assert struct.unpack("<IiQ", err) == (16, -errno.ENOSYS, 5)
    with pytest.raises(ValueError):
        fp.error_reply(5, -1)
    ok = joined(fp.ioctl_reply(6, 0x103, b"x" * 24))
    assert struct.unpack_from("<IiQiIII", ok) == (16 + 16 + 24, 0, 6, 0x103, 0, 0, 0)
    assert ok[32:] == b"x" * 24
    assert len(joined(fp.ioctl_reply(6, -errno.ENOTTY))) == 32
    with pytest.raises(ValueError):
        fp.ioctl_reply(6, 1 << 31)
    kernel = fp.InitIn(7, 45, 131072, 0xFFFFFFFF)
    init = joined(fp.init_reply(1, kernel, flags=0, max_write=4096))
    assert len(init) == 16 + 64
    major, minor, readahead, flags, _bg, _ct, max_write = struct.unpack_from("<IIIIHHI", init, 16)
    assert (major, minor, readahead, flags, max_write) == (7, fp.FUSE_KERNEL_MINOR_VERSION,
                                                           131072, 0, 4096)
    newer = joined(fp.init_reply(1, fp.InitIn(8, 0, 0, 0)))
    assert struct.unpack_from("<II", newer, 16) == (7, 0)
    older_minor = joined(fp.init_reply(1, fp.InitIn(7, 26, 0, 0)))
    assert struct.unpack_from("<II", older_minor, 16) == (7, 26)
    attr = joined(fp.attr_reply(2, fp.Attr(mode=stat.S_IFREG | 0o640, uid=5, gid=6,
                                           time_ns=3_000_000_007), 1.5))
    assert len(attr) == 16 + 104
    valid, valid_ns, _ = struct.unpack_from("<QII", attr, 16)
    assert (valid, valid_ns) == (1, 500_000_000)
    ino, size, _blocks, atime = struct.unpack_from("<QQQQ", attr, 32)
    assert (ino, size, atime) == (1, 0, 3)
    mode, nlink, uid, gid = struct.unpack_from("<IIII", attr, 32 + 60)
    assert (mode, nlink, uid, gid) == (stat.S_IFREG | 0o640, 1, 5, 6)
    opened = joined(fp.open_reply(3, 42, fp.FOPEN_DIRECT_IO | fp.FOPEN_NONSEEKABLE))
    assert struct.unpack_from("<QIi", opened, 16) == (42, 5, 0)
    assert len(joined(fp.statfs_reply(4))) == 16 + 80
    assert joined(fp.empty_reply(9)) == struct.pack("<IiQ", 16, 0, 9)


def test_mount_table_paths_are_unescaped() -> None:
    from dxg.node.fuse import _unescape_mount_path

    assert _unescape_mount_path(r"/tmp/a\040b\011c\134d") == "/tmp/a b\tc\\d"
    assert _unescape_mount_path("/dev/dxg") == "/dev/dxg"


# ---- the documentation cannot drift ----------------------------------------------------------


def test_docs_list_the_supported_ioctls() -> None:
    text = DOC.read_text(encoding="utf-8")
    m = re.search(r"<!-- ioctl-table:begin -->\n(.*?)<!-- ioctl-table:end -->", text, re.S)
    assert m, "docs/libdxg.md lost its ioctl-table markers"
    assert m.group(1) == render_libdxg_table(), (
        "docs/libdxg.md is out of date: regenerate its table with "
        "`python -m dxg.node.fuse ioctl-table`")
    rows = list(ioctl_support())
    assert [r.nr for r in rows] == sorted(IOCTLS)
    assert {r.name for r in rows if r.implemented} == {
        name for name in HANDLERS if IOCTLS_BY_NAME[name].handled}
    assert set(FILE_LIMITS) <= set(IOCTLS_BY_NAME), "FILE_LIMITS names an unknown ioctl"


def test_one_list_renders_both_documents() -> None:
    """docs/ioctls.md and docs/libdxg.md come from the same rows: they cannot disagree."""
    rows = list(ioctl_support())
    ioctls_md = render_ioctls_doc(rows).splitlines()
    libdxg_md = render_libdxg_table(rows).splitlines()
    for r in rows:
        [a] = [line for line in ioctls_md if f"| {r.name} |" in line]
        [b] = [line for line in libdxg_md if f"| `{r.name}` |" in line]
        assert a.endswith("| implemented |") == r.implemented == b.startswith(
            f"| 0x{r.nr:02x} | `{r.name}` | `0x{r.code:08x}` | `{r.struct}` ({r.size}) | yes |")
        if r.name in FILE_LIMITS:
            assert FILE_LIMITS[r.name] in b
    cli = subprocess.run([sys.executable, "-m", "dxg.node.fuse", "ioctl-table"],
                         capture_output=True, text=True, timeout=60, check=True)
    assert cli.stdout == render_libdxg_table()


# ---- mounting ---------------------------------------------------------------------------------


@needs_fuse
def test_the_file_looks_like_a_device_and_goes_away(stack, tmp_path: Path) -> None:
    path = tmp_path / "dxg"
    with mounted(stack.driver, path, mode=0o640) as node:
        assert _mounted(node) and node.mounted_by == ("syscall" if os.geteuid() == 0
                                                      else "fusermount")
        st = os.stat(path)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
        assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            with pytest.raises(OSError) as e:
                os.read(fd, 8)
            assert e.value.errno == errno.EINVAL
            with pytest.raises(OSError) as e:
                os.write(fd, b"x")
            assert e.value.errno == errno.EINVAL
            with pytest.raises(OSError) as e:
                os.lseek(fd, 0, os.SEEK_SET)
            assert e.value.errno == errno.ESPIPE
        finally:
            os.close(fd)
        assert os.statvfs(path).f_bsize == 4096
    assert not _mounted(node)
    assert not path.exists()  # the node created it, the node removed it


@needs_fuse
def test_an_existing_file_is_covered_and_kept(stack, tmp_path: Path) -> None:
    path = tmp_path / "dev-dxg"
    path.write_bytes(b"underneath")
    with mounted(stack.driver, path) as node:
        assert _mounted(node)
        fd = os.open(path, os.O_RDONLY)
        assert _enum3(fd) == (0, ADAPTERS)
        os.close(fd)
    assert path.read_bytes() == b"underneath"
    with pytest.raises(IsADirectoryError):
        FuseNode(stack.driver, tmp_path).start()
    assert not pydxg_mounts(tmp_path)


@needs_fuse
@needs_root
def test_fusermount3_path(stack, tmp_path: Path) -> None:
    if shutil.which("fusermount3") is None:
        pytest.skip("!!! fusermount3 NOT FOUND: the non-root mount path is NOT being tested !!!")
    with mounted(stack.driver, tmp_path / "dxg", mount="fusermount") as node:
        assert node.mounted_by == "fusermount" and _mounted(node)
        fd = os.open(node.path, os.O_RDONLY | os.O_CLOEXEC)
        assert _enum3(fd) == (0, ADAPTERS)
        os.close(fd)
    assert not pydxg_mounts(tmp_path)


def _dead_mount(path: Path) -> None:
    """Mount a pydxg FUSE file at ``path`` whose daemon is gone at once (as after SIGKILL)."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    libc = ctypes.CDLL(None, use_errno=True)
    data = f"fd={fd},rootmode=100000,user_id=0,group_id=0".encode()
    try:
        assert libc.mount(b"pydxg", os.fsencode(path), FSTYPE.encode(), 6, data) == 0, \
            os.strerror(ctypes.get_errno())
    finally:
        os.close(fd)  # the daemon is gone


@needs_fuse
@needs_root
def test_dead_mounts_are_detached_before_mounting(stack, tmp_path: Path) -> None:
    """Nodes that died without unmounting leave mounts whose connection is gone, possibly
    several stacked: every dead layer is detached, and the new node's is the only mount."""
    path = tmp_path / "dxg"
    path.touch()
    try:
        _dead_mount(path)
        _dead_mount(path)
        with pytest.raises(OSError) as e:
            os.stat(path)
        assert e.value.errno == errno.ENOTCONN
        assert pydxg_mounts(tmp_path) == [str(path)] * 2
        with mounted(stack.driver, path) as node:
            assert pydxg_mounts(tmp_path) == [str(path)]
            fd = os.open(node.path, os.O_RDONLY)
            assert _enum3(fd) == (0, ADAPTERS)
            os.close(fd)
    finally:
        _detach_all(tmp_path)
    assert not pydxg_mounts(tmp_path)
    assert path.exists()  # the file underneath was there before: it stays


@needs_fuse
def test_a_live_node_is_never_covered(stack, dev: FuseNode, tmp_path: Path) -> None:
    """A second node at a path a live node serves refuses, and the first one goes on."""
    with pytest.raises(NodeBusy, match="another node serves"):
        FuseNode(stack.driver, dev.path).start()
    assert pydxg_mounts(tmp_path) == [str(dev.path)]
    fd = os.open(dev.path, os.O_RDONLY)
    assert _enum3(fd) == (0, ADAPTERS)
    os.close(fd)
    assert dev.wait_idle(10)


NODE_PROCESS = r"""
import sys
from dxg.guest.driver import GuestDriver
from dxg.host.config import HostConfig
from dxg.host.host import Host
from dxg.node.fuse import FuseNode

host = Host(HostConfig(adapters=int(sys.argv[2])))
driver = GuestDriver()
driver.bind_host(host)
assert driver.wait_for_adapters(int(sys.argv[2]), 15)
node = FuseNode(driver, sys.argv[1])
node.start()
print("ready", flush=True)
sys.stdin.read()
node.close()
driver.close()
host.close()
print("stopped", flush=True)
"""


def _node_process(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", NODE_PROCESS, str(path), str(ADAPTERS)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = _readline(proc, 60)
    assert line == "ready\n", f"node process: {line!r} {proc.stderr.read() if proc.poll() else ''}"
    return proc


@needs_fuse
@needs_root
def test_a_node_killed_and_restarted_at_once_leaves_no_mount(tmp_path: Path) -> None:
    """SIGKILL a node process and start a new one at once: the kernel still has the file's
    attributes cached (stat succeeds on the dead mount), yet the new node finds the dead layer,
    detaches it and serves; once it stops, nothing is mounted at the path any more."""
    path = tmp_path / "dxg"
    procs: list[subprocess.Popen] = []
    try:
        procs.append(_node_process(path))
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        assert _enum3(fd) == (0, ADAPTERS)
        os.close(fd)
        procs[0].kill()
        procs[0].wait(20)
        assert pydxg_mounts(tmp_path) == [str(path)]
        assert os.stat(path).st_ino == fp.FUSE_ROOT_ID  # cached: stat cannot tell it is dead
        procs.append(_node_process(path))
        assert pydxg_mounts(tmp_path) == [str(path)]
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        assert _enum3(fd) == (0, ADAPTERS)
        os.close(fd)
        out, err = procs[1].communicate("", timeout=60)
        assert procs[1].returncode == 0 and "stopped" in out, err[-3000:]
        assert pydxg_mounts(tmp_path) == []
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        _detach_all(tmp_path)


# ---- where the file may be -----------------------------------------------------------------


@needs_fuse
def test_a_symlink_at_the_path_is_refused(stack, tmp_path: Path) -> None:
    """Someone plants a link where the device file goes, pointing at a private file: the node
    refuses instead of covering (and exposing) that file, and creates nothing either."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"private")
    os.chmod(secret, 0o600)
    link = tmp_path / "dxg"
    link.symlink_to(secret)
    with pytest.raises(UnsafeDevicePath, match="symbolic link"):
        FuseNode(stack.driver, link).start()
    dangling = tmp_path / "dxg2"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(UnsafeDevicePath, match="symbolic link"):
        FuseNode(stack.driver, dangling).start()
    assert not pydxg_mounts(tmp_path)
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600 and secret.read_bytes() == b"private"
    assert not (tmp_path / "nowhere").exists() and link.is_symlink()


@needs_fuse
@needs_root
def test_directories_someone_else_controls_are_refused(stack, tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    with pytest.raises(UnsafeDevicePath, match="owned by uid 65534"):
        FuseNode(stack.driver, theirs / "dxg").start()
    shared = tmp_path / "shared"
    (shared / "sub").mkdir(parents=True)
    os.chmod(shared, 0o777)
    for where in (shared / "dxg", shared / "sub" / "dxg", shared / "sub" / "new" / "dxg"):
        with pytest.raises(UnsafeDevicePath, match="writable by everyone and not sticky"):
            FuseNode(stack.driver, where).start()
    assert not (shared / "sub" / "new").exists()
    assert not pydxg_mounts(tmp_path)
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)  # like /tmp: fine
    with mounted(stack.driver, sticky / "dxg") as node:
        fd = os.open(node.path, os.O_RDONLY)
        assert _enum3(fd) == (0, ADAPTERS)
        os.close(fd)


@needs_fuse
@needs_root
def test_files_that_may_not_be_covered(stack, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UnsafeDevicePath, match="neither a regular file nor a character device"):
        FuseNode(stack.driver, fifo).start()
    other = tmp_path / "other"
    other.write_bytes(b"not yours")
    os.chown(other, 65534, 65534)
    with pytest.raises(UnsafeDevicePath, match="belongs to uid 65534"):
        FuseNode(stack.driver, other).start()
    with pytest.raises(IsADirectoryError):
        FuseNode(stack.driver, tmp_path).start()
    assert not pydxg_mounts(tmp_path)
    assert other.read_bytes() == b"not yours" and stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_fuse_unavailable_is_a_clear_error(stack, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("dxg.node.fuse.fuse_available", lambda: "no /dev/fuse here")
    node = FuseNode(stack.driver, tmp_path / "dxg")
    with pytest.raises(FuseUnavailable, match="no /dev/fuse here"):
        node.start()
    node.close()
    assert not (tmp_path / "dxg").exists()


# ---- processes ------------------------------------------------------------------------------


@needs_fuse
def test_each_open_file_is_one_process(stack, dev: FuseNode) -> None:
    """Each open file is one process's handle on the driver: handles of one file are invalid
    through another, closing a file tears down what it created, and the other file keeps
    working. Calls from another thread of the opener work."""
    fd1 = os.open(dev.path, os.O_RDONLY | os.O_CLOEXEC)
    fd2 = os.open(dev.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        procs = dev.processes()
        assert [(p["pid"], p["files"]) for p in procs] == [(os.getpid(), 1)] * 2
        assert len(stack.driver.processes()) == 2
        b = bytearray(12)
        luid = stack.driver.active_adapters()[0].luid
        struct.pack_into("<II", b, 0, luid & 0xFFFFFFFF, luid >> 32)
        assert fcntl.ioctl(fd1, LX_DXOPENADAPTERFROMLUID, b, True) == 0
        handle = struct.unpack_from("<I", b, 8)[0]
        info = ctypes.create_string_buffer(4)
        q = bytearray(struct.pack("<IIQI4x", handle, KMTQAITYPE_ADAPTERTYPE,
                                  ctypes.addressof(info), 4))
        assert fcntl.ioctl(fd1, LX_DXQUERYADAPTERINFO, q, True) == 0
        assert struct.unpack("<I", info.raw)[0] & (1 << 7)  # Paravirtualized
        with pytest.raises(OSError) as e:  # another file's handle is foreign here
            fcntl.ioctl(fd2, LX_DXQUERYADAPTERINFO, q, True)
        assert e.value.errno == errno.EBADF
        seen: list[tuple[int, int]] = []
        t = threading.Thread(target=lambda: seen.append(_enum3(fd2)))
        t.start()
        t.join()
        assert seen == [(0, ADAPTERS)]
    finally:
        os.close(fd1)
    wait_until(lambda: len(dev.processes()) == 1, what="the first file's process gone")
    assert len(stack.driver.processes()) == 1
    assert _enum3(fd2) == (0, ADAPTERS)
    os.close(fd2)
    wait_until(lambda: _settled(stack, dev), what="process torn down")


@needs_fuse
@needs_gcc
def test_c_program_every_ioctl(stack, dev: FuseNode, dxg_test: Path) -> None:
    out = run_c(dxg_test, dev.path, "all").stdout
    exercised = set(re.findall(r"^ok +(LX_\w+) ", out, re.M))
    for needed in ("LX_DXENUMADAPTERS2", "LX_DXENUMADAPTERS3", "LX_DXQUERYADAPTERINFO",
                   "LX_DXOPENADAPTERFROMLUID", "LX_DXCREATEDEVICE", "LX_DXDESTROYDEVICE",
                   "LX_DXCREATECONTEXTVIRTUAL", "LX_DXDESTROYCONTEXT", "LX_DXCLOSEADAPTER",
                   "LX_DXGETDEVICESTATE", "LX_ISFEATUREENABLED", "LX_DXQUERYCLOCKCALIBRATION",
                   "LX_DXENUMPROCESSES", "LX_DXESCAPE"):
        assert needed in exercised, f"{needed} not exercised"
    for what in ("KMTQAITYPE_ADAPTERTYPE", "KMTQAITYPE_DRIVER_DESCRIPTION",
                 "KMTQAITYPE_PHYSICALADAPTERDEVICEIDS", "KMTQAITYPE_WDDM_2_7_CAPS",
                 "bad handle", "a slot without a handler", "NULL buffer with a size",
                 "unmapped buffer", "pydxg PING"):
        assert f"({what})" in out
    assert '"pydxg Soft GPU' in out  # the UTF-16 description arrived as text
    wait_until(lambda: _settled(stack, dev), what="the C program's process torn down")


@needs_fuse
@needs_gcc
def test_c_program_exercises_every_implemented_ioctl(stack, dev: FuseNode,
                                                     dxg_test: Path) -> None:
    """The driver grows; this names any ioctl it implements that the C program does not call
    yet (a skip with the list, so a new handler is never silently untested from C)."""
    out = run_c(dxg_test, dev.path, "all", "-q").stdout
    assert out.startswith("PASS")
    source = C_SOURCE.read_text(encoding="utf-8")
    missing = [name for name in sorted(HANDLERS)
               if IOCTLS_BY_NAME[name].handled and name not in source]
    if missing:
        pytest.skip(f"!!! implemented but not exercised by tests/c/dxg_test.c: {missing} !!!")


MEMORY_IOCTLS = (
    "LX_DXCREATEALLOCATION", "LX_DXDESTROYALLOCATION2", "LX_DXLOCK2", "LX_DXUNLOCK2",
    "LX_DXCREATEPAGINGQUEUE", "LX_DXDESTROYPAGINGQUEUE", "LX_DXMAKERESIDENT", "LX_DXEVICT",
    "LX_DXQUERYALLOCATIONRESIDENCY", "LX_DXSETALLOCATIONPRIORITY", "LX_DXGETALLOCATIONPRIORITY",
    "LX_DXOFFERALLOCATIONS", "LX_DXRECLAIMALLOCATIONS2", "LX_DXUPDATEALLOCPROPERTY",
    "LX_DXFLUSHHEAPTRANSITIONS", "LX_DXQUERYVIDEOMEMORYINFO",
    "LX_DXCHANGEVIDEOMEMORYRESERVATION", "LX_DXRESERVEGPUVIRTUALADDRESS",
    "LX_DXMAPGPUVIRTUALADDRESS", "LX_DXFREEGPUVIRTUALADDRESS", "LX_DXUPDATEGPUVIRTUALADDRESS",
)


@needs_fuse
@needs_gcc
def test_c_program_device_memory(stack, dev: FuseNode, dxg_test: Path) -> None:
    """The memory ioctls from C through the file: allocations (standalone, a resource of three,
    a standard one), Lock2 refused with EOPNOTSUPP (a file cannot map into its caller), budgets
    and reservations, a paging queue without a fence mapping, GPU virtual addresses, residency,
    priorities, offers, and the error paths of each family; everything is gone afterwards."""
    out = run_c(dxg_test, dev.path, "memory").stdout
    exercised = set(re.findall(r"^ok +(LX_\w+) ", out, re.M))
    missing = [name for name in MEMORY_IOCTLS if name not in exercised]
    assert not missing, f"not exercised: {missing}"
    for line in ("ok   LX_DXLOCK2 (through the file (cannot map into the caller)) -> -EOPNOTSUPP",
                 "ok   LX_DXUNLOCK2 (an allocation not locked) -> -EINVAL",
                 "ok   LX_DXCREATEALLOCATION (alloc_count 1025) -> -EINVAL",
                 "ok   LX_DXQUERYVIDEOMEMORYINFO (segment group 2) -> -EINVAL",
                 "ok   LX_DXRESERVEGPUVIRTUALADDRESS (misaligned base) -> -EINVAL",
                 "ok   LX_DXUPDATEGPUVIRTUALADDRESS (UNMAP the mapping) -> 0",
                 "ok   LX_DXFREEGPUVIRTUALADDRESS (the reservation) -> 0",
                 "ok   LX_DXDESTROYALLOCATION2 (bad allocation handle) -> -EBADF"):
        assert line in out, line
    assert "(the memory is given back)" in out
    assert "(DestroyDevice gave the memory back)" in out
    wait_until(lambda: _settled(stack, dev), what="the C program's process torn down")


SYNC_IOCTLS = (
    "LX_DXCREATESYNCHRONIZATIONOBJECT", "LX_DXDESTROYSYNCHRONIZATIONOBJECT",
    "LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMCPU", "LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU",
    "LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMGPU", "LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMGPU2",
    "LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMGPU", "LX_DXSIGNALSYNCHRONIZATIONOBJECT",
    "LX_DXWAITFORSYNCHRONIZATIONOBJECT",
)


@needs_fuse
@needs_gcc
def test_c_program_sync_objects(stack, dev: FuseNode, dxg_test: Path) -> None:
    """Sync objects from C through the file: a monitored fence (no page: address 0) signalled
    from the CPU and waited on (a reached value, a value a second thread signals while the first
    is blocked, an eventfd the node takes with pidfd_getfd, wait-any and wait-all), GPU signals
    and waits on a context, the legacy calls, a CPU notification, and the error paths."""
    out = run_c(dxg_test, dev.path, "sync").stdout
    exercised = set(re.findall(r"^ok +(LX_\w+) ", out, re.M))
    missing = [name for name in SYNC_IOCTLS if name not in exercised]
    assert not missing, f"not exercised: {missing}"
    for line in ("ok   LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU (blocking, a value reached "
                 "already) -> 0",
                 "ok   LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU (blocking until a second thread "
                 "signals) -> 0",
                 "ok   LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU (the eventfd is written once the "
                 "fence gets there) -> 0",
                 "ok   LX_DXCREATESYNCHRONIZATIONOBJECT (through the file the fence page is not "
                 "mapped: address 0) -> 0",
                 "ok   LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU (33 objects) -> -EINVAL"):
        assert line in out, line
    wait_until(lambda: _settled(stack, dev), what="the C program's process torn down")
    (part,) = stack.host.census()["partitions"]
    assert all(p["sync_objects"] == 0 for p in part["processes"])


QUEUE_IOCTLS = (
    "LX_DXCREATEHWQUEUE", "LX_DXDESTROYHWQUEUE", "LX_DXSUBMITCOMMANDTOHWQUEUE",
    "LX_DXSUBMITCOMMAND", "LX_DXSETCONTEXTSCHEDULINGPRIORITY",
    "LX_DXSETCONTEXTINPROCESSSCHEDULINGPRIORITY", "LX_DXGETCONTEXTSCHEDULINGPRIORITY",
    "LX_DXGETCONTEXTINPROCESSSCHEDULINGPRIORITY", "LX_DXSUBMITSIGNALSYNCOBJECTSTOHWQUEUE",
    "LX_DXSUBMITWAITFORSYNCOBJECTSTOHWQUEUE", "LX_DXMARKDEVICEASERROR", "LX_DXQUERYSTATISTICS",
    "LX_DXINVALIDATECACHE",
)


def _device_memory(stack, pid: int, va: int, nbytes: int, data: bytes | None = None) -> bytes:
    """Read (or write) ``nbytes`` at GPU VA ``va`` of the host process of guest pid ``pid``:
    what Lock2 and a memcpy would do, which a program cannot through the file."""
    from dxg.host.vaspace import vaspace_of

    def on_loop() -> bytes:
        for part in stack.host.partitions():
            for process in part.processes.values():
                if process.pid != pid:
                    continue
                for adapter in part.adapters:
                    space = vaspace_of(process, adapter, create=False)
                    if space is None:
                        continue
                    try:
                        view = space.view(va, nbytes, data is not None)
                    except Exception:  # (not mapped in this adapter's space)
                        continue
                    if view is None:
                        continue
                    try:
                        if data is None:
                            return bytes(view)
                        view[:] = data
                        return b""
                    finally:
                        view.release()
        raise LookupError(f"pid {pid} has nothing at 0x{va:x}")

    return stack.host.rt.call(on_loop)


def run_with_memory_peer(stack, exe: Path, path: Path, mode: str, *opts: str,
                         timeout: float = 60) -> str:
    """Run the C program with -p, answering its "@write VA HEX" / "@read VA N" requests
    through the host; returns its output (the requests included)."""
    proc = subprocess.Popen([str(exe), "-a", str(ADAPTERS), "-p", *opts, str(path), mode],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    out: list[str] = []
    pending = b""
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()  # read unbuffered: select() must see every byte not yet read
    try:
        while True:
            if b"\n" not in pending:
                left = deadline - time.monotonic()
                ready, _, _ = select.select([fd], [], [], max(0.0, left))
                if not ready:
                    raise AssertionError(f"dxg_test {mode} hung:\n{''.join(out)[-6000:]}")
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                pending += chunk
                continue
            raw, pending = pending.split(b"\n", 1)
            line = raw.decode() + "\n"
            out.append(line)
            words = line.split()
            if line.startswith("@write "):
                _device_memory(stack, proc.pid, int(words[1], 16), len(words[2]) // 2,
                               bytes.fromhex(words[2]))
                proc.stdin.write(b"ok\n")
                proc.stdin.flush()
            elif line.startswith("@read "):
                data = _device_memory(stack, proc.pid, int(words[1], 16), int(words[2]))
                proc.stdin.write(data.hex().encode() + b"\n")
                proc.stdin.flush()
        if pending:
            out.append(pending.decode())
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(out)
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert rc == 0 and f"PASS {mode}" in text and "FAIL" not in text, (
        f"dxg_test {mode} exited {rc}\n{text[-6000:]}\n{err}")
    return text


@needs_fuse
@needs_gcc
def test_c_program_hardware_queues(stack, dev: FuseNode, dxg_test: Path) -> None:
    """Hardware queues from C through the file: a queue (its progress-fence page is not
    mapped: address 0), priorities (-7..7, both kinds), command buffers the program builds in
    pydxg-soft-v1 and puts in device memory through its peer (FILL, then an add on the queue,
    then a multiply by SubmitCommand; the results read back), completion seen by blocking CPU
    waits on the progress fence, fences signalled and waited on by the queue, a command buffer
    at an unmapped VA that faults a second device only, MarkDeviceAsError on a third,
    QueryStatistics and InvalidateCache, DestroyHwQueue; everything gone afterwards."""
    out = run_with_memory_peer(stack, dxg_test, dev.path, "queue")
    exercised = set(re.findall(r"^ok +(LX_\w+) ", out, re.M))
    missing = [name for name in QUEUE_IOCTLS if name not in exercised]
    assert not missing, f"not exercised: {missing}"
    for line in ("ok   LX_DXCREATEHWQUEUE (no fence mapping through the file) -> 0",
                 "ok   peer (c = 1.5 + 2 everywhere) -> 0: got 3.5",
                 "ok   peer (c = 3.5 * 2 everywhere) -> 0: got 7",
                 "ok   LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU (the queue's progress fence at 2)"
                 " -> 0",
                 "ok   LX_DXGETDEVICESTATE (still active after the work) -> 0",
                 "ok   LX_DXSETCONTEXTSCHEDULINGPRIORITY (8 (out of -7..7)) -> -EINVAL",
                 "ok   LX_DXSETCONTEXTINPROCESSSCHEDULINGPRIORITY (-8 (out of -7..7)) -> -EINVAL",
                 "ok   LX_DXGETDEVICESTATE (the faulting device's execution state) -> 0",
                 "ok   LX_DXGETDEVICESTATE (the first device is still active) -> 0",
                 "ok   LX_DXGETDEVICESTATE (the marked device) -> 0",
                 "ok   LX_DXSUBMITCOMMANDTOHWQUEUE (on the faulted device) -> -EIO",
                 "ok   LX_DXQUERYSTATISTICS (the three command buffers counted) -> 0: 3 buffers, 4 "
                 "commands",
                 "ok   LX_DXINVALIDATECACHE (past its end) -> -EINVAL",
                 "ok   LX_DXDESTROYHWQUEUE (again (stale handle)) -> -EBADF"):
        assert line in out, line
    assert "faulted_virtual_address 0x7f0000000" in out
    wait_until(lambda: _settled(stack, dev), what="the C program's process torn down")
    (part,) = stack.host.census()["partitions"]
    assert part["totals"]["handles"] == len(part["adapters"])  # only the adapters' handles


@needs_fuse
@needs_gcc
def test_c_program_threads_and_processes_at_once(stack, dev: FuseNode, dxg_test: Path) -> None:
    procs = [subprocess.Popen([str(dxg_test), "-q", "-a", str(ADAPTERS), "-t", "3", "-n", "2",
                               str(dev.path), "threads"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0 and "PASS threads" in out, f"{out[-4000:]}\n{err}"
            assert re.search(r"3 threads x 2 sessions on one descriptor: \d+ checks, 0 failures",
                             out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    wait_until(lambda: _settled(stack, dev), what="every client process torn down")


@needs_fuse
@needs_gcc
def test_c_forked_child_gets_enotty_and_reopens(stack, dev: FuseNode, dxg_test: Path) -> None:
    out = run_c(dxg_test, dev.path, "fork").stdout
    for what in ("child on the parent's descriptor",
                 "child with the parent's handle and descriptor"):
        assert re.search(rf"\[child\] ok +LX_\w+ \({re.escape(what)}\) -> -ENOTTY", out), out
    assert "[child] ok   LX_DXCREATEDEVICE (on the opened adapter) -> 0" in out
    assert "ok   LX_DXQUERYADAPTERINFO (parent's handle still valid) -> 0" in out
    wait_until(lambda: _settled(stack, dev), what="parent and child torn down")


@needs_fuse
@needs_gcc
@pytest.mark.parametrize("how", ["sigkill", "exit"])
def test_a_dead_or_exiting_process_loses_everything(stack, dev: FuseNode, dxg_test: Path,
                                                    how: str) -> None:
    proc = subprocess.Popen([str(dxg_test), "-q", str(dev.path), "hold"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        line = _readline(proc)
        assert line.startswith(f"ready pid {proc.pid} "), line
        totals = stack.host_totals()
        assert totals["devices"] == 1 and totals["contexts"] == 1
        assert [p["pid"] for p in dev.processes()] == [proc.pid]
        if how == "sigkill":
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=20) == -signal.SIGKILL
        else:
            assert proc.stdin is not None
            proc.stdin.close()  # it exits without destroying anything: close() must
            assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert dev.wait_idle(20)
    wait_until(lambda: _settled(stack, dev), what="the process's objects gone on the host")


@needs_fuse
@needs_gcc
@needs_root
def test_other_users_reach_it_and_mode_is_enforced(stack, dxg_test: Path,
                                                    public_dir: Path) -> None:
    """allow_other lets nobody in; default_permissions enforces the file's mode."""
    exe = public_dir / "dxg_test"
    shutil.copy2(dxg_test, exe)
    with mounted(stack.driver, public_dir / "dxg", mode=0o666) as node:
        out = run_c(exe, node.path, "all", user=65534, group=65534).stdout
        assert "ok   LX_DXCREATEDEVICE (on the opened adapter) -> 0" in out
        wait_until(lambda: not node.processes(), what="nobody's process closed")
    with mounted(stack.driver, public_dir / "dxg", mode=0o600) as node:
        proc = subprocess.run([str(exe), str(node.path), "all"], user=65534, group=65534,
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode != 0 and "Permission denied" in proc.stdout, proc.stdout
    wait_until(lambda: not stack.driver.processes(), what="processes gone")


@needs_fuse
@needs_gcc
def test_close_with_a_client_still_attached(stack, tmp_path: Path, dxg_test: Path) -> None:
    """close() detaches the mount at once, ends the connection, and closes the processes the
    node still served; the client's next call fails instead of hanging."""
    path = tmp_path / "dxg"
    holder: subprocess.Popen | None = None
    with mounted(stack.driver, path) as node:
        holder = subprocess.Popen([str(dxg_test), "-q", str(path), "hold"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert _readline(holder).startswith("ready")
        fd = os.open(path, os.O_RDONLY)
        node.close()
        assert not _mounted(node) and not pydxg_mounts(tmp_path)
        assert node.processes() == [] and stack.driver.processes() == []
        assert _enum3(fd)[0] == -errno.ENOTCONN
        os.close(fd)
    assert holder is not None
    holder.kill()
    holder.wait()
    wait_until(lambda: stack.host_totals()["devices"] == 0, what="devices destroyed")


@needs_fuse
def test_an_ioctl_not_implemented_yet_is_enotty_through_the_file(dev: FuseNode) -> None:
    """The driver answers -ENOSYS; FUSE hands that to the caller as ENOTTY (never ENOSYS)."""
    todo = [r for r in ioctl_support() if r.handled and not r.implemented]
    if not todo:
        pytest.skip("every ioctl is implemented")
    fd = os.open(dev.path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as e:
            fcntl.ioctl(fd, todo[0].code, bytearray(todo[0].size), True)
        assert e.value.errno == errno.ENOTTY, todo[0].name
    finally:
        os.close(fd)


class Wrapped:
    """The real driver behind the node (its loop included); subclasses intercept calls."""

    def __init__(self, real) -> None:
        self.real = real
        self.rt = real.rt

    def open_process(self, pid: int, uid: int, name: str, gids: tuple[int, ...] = ()):
        return self.real.open_process(pid, uid, name, gids)

    async def close_process(self, proc) -> None:
        await self.real.close_process(proc)

    async def ioctl(self, proc, code: int, arg: bytes, mem, caller_tgid=None):
        return await self.real.ioctl(proc, code, arg, mem, caller_tgid=caller_tgid)


class BlockingDriver(Wrapped):
    """GetDeviceState blocks (as a CPU wait blocks until it is signalled) until cancelled."""

    def __init__(self, real) -> None:
        super().__init__(real)
        self.blocked = threading.Event()
        self.cancelled = threading.Event()
        self.released = threading.Event()

    async def close_process(self, proc) -> None:
        self.released.set()
        await super().close_process(proc)

    async def ioctl(self, proc, code: int, arg: bytes, mem, caller_tgid=None):
        if code == LX_DXGETDEVICESTATE:
            self.blocked.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            return -errno.ESRCH, arg
        return await super().ioctl(proc, code, arg, mem, caller_tgid)


BLOCKED_CLIENT = r"""
import ctypes, fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CLOEXEC)
buf = ctypes.create_string_buffer(b"untouched", 16)
arg = bytearray(56)
struct.pack_into("<Q", arg, 0, ctypes.addressof(buf))
print("calling", flush=True)
fcntl.ioctl(fd, int(sys.argv[2]), arg, True)
print("returned", flush=True)
"""


@needs_fuse
def test_a_killed_caller_inside_a_blocking_call_does_not_hang(stack, tmp_path: Path) -> None:
    """SIGKILL while the driver is blocked in its call: the kernel sends INTERRUPT, the node
    answers EINTR at once so the process can die and cancels the call; the RELEASE closes the
    process. Meanwhile other callers are served."""
    driver = BlockingDriver(stack.driver)
    with mounted(driver, tmp_path / "dxg") as node:
        child = subprocess.Popen([sys.executable, "-c", BLOCKED_CLIENT, str(node.path),
                                  str(LX_DXGETDEVICESTATE)], stdout=subprocess.PIPE, text=True)
        try:
            assert _readline(child).strip() == "calling"
            assert driver.blocked.wait(20)
            fd = os.open(node.path, os.O_RDONLY)
            assert _enum3(fd) == (0, ADAPTERS)  # served while the other call is blocked
            os.close(fd)
            child.send_signal(signal.SIGKILL)
            assert child.wait(timeout=20) == -signal.SIGKILL
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert driver.cancelled.wait(20)
        assert driver.released.wait(20)
        assert node.wait_idle(20)
        assert node.inflight() == 0
    wait_until(lambda: not stack.driver.processes(), what="processes gone")


FENCE_WAITER = r"""
import ctypes, fcntl, os, sys
from dxg.uapi import ioctls as io, structs as s
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CLOEXEC)
infos = (s.d3dkmt_adapterinfo * 8)()
e = s.d3dkmt_enumadapters3()
e.filter.include_compute_only = 1
e.adapter_count = 8
e.adapters = ctypes.addressof(infos)
fcntl.ioctl(fd, io.LX_DXENUMADAPTERS3, e, True)
cd = s.d3dkmt_createdevice()
cd.adapter = infos[0].adapter_handle
fcntl.ioctl(fd, io.LX_DXCREATEDEVICE, cd, True)
c = s.d3dkmt_createsynchronizationobject2()
c.device = cd.device
c.info.type = 5  # a monitored fence
fcntl.ioctl(fd, io.LX_DXCREATESYNCHRONIZATIONOBJECT, c, True)
handles = (ctypes.c_uint32 * 1)(c.sync_object.v)
values = (ctypes.c_uint64 * 1)(1)
w = s.d3dkmt_waitforsynchronizationobjectfromcpu()
w.device = cd.device
w.object_count = 1
w.objects = ctypes.addressof(handles)
w.fence_values = ctypes.addressof(values)
print("waiting", flush=True)
fcntl.ioctl(fd, io.LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU, w, True)
print("returned", flush=True)
"""


@needs_fuse
def test_a_killed_caller_blocked_in_a_cpu_wait_leaves_nothing(stack, dev: FuseNode) -> None:
    """A program blocked in WaitForSynchronizationObjectFromCpu through the file is SIGKILLed:
    its wait is withdrawn, its fence and process go on guest and host."""
    child = subprocess.Popen([sys.executable, "-c", FENCE_WAITER, str(dev.path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert _readline(child).strip() == "waiting"

        def host_waits() -> int:
            return sum(p["cpu_waits"] for part in stack.host.census()["partitions"]
                       for p in part["processes"])

        wait_until(lambda: host_waits() == 1, what="the wait on the host")
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=20) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    wait_until(lambda: not stack.driver.processes(), what="process gone")
    wait_until(lambda: stack.host_totals()["processes"] == 0, what="host process gone")
    assert stack.driver.rt.call(lambda: sum(len(x.events) for x in stack.driver.links())) == 0


class OutlivingDriver(Wrapped):
    """GetDeviceState starts work that outlives its caller (shielded from cancellation, the
    way a driver sees host work through) and then writes the result to the caller's buffer,
    whose address is the struct's first 8 bytes: the shape of a late copy_to_user."""

    def __init__(self, real) -> None:
        super().__init__(real)
        self.parked = threading.Event()
        self.cancelled = threading.Event()
        self.outcome: list[str] = []
        self.go: asyncio.Event | None = None

    async def _finish(self, mem, addr: int) -> None:
        assert self.go is not None
        await self.go.wait()
        try:
            mem.write(addr, b"LATE")
            self.outcome.append("written")
        except UserMemoryFault as e:
            self.outcome.append(f"refused: {e}")

    async def ioctl(self, proc, code: int, arg: bytes, mem, caller_tgid=None):
        if code != LX_DXGETDEVICESTATE:
            return await super().ioctl(proc, code, arg, mem, caller_tgid)
        addr = struct.unpack_from("<Q", arg)[0]
        assert mem.read(addr, 9) == b"untouched"  # the caller is reachable while it waits
        self.go = asyncio.Event()
        work = asyncio.ensure_future(self._finish(mem, addr))
        self.parked.set()
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return 0, arg


@needs_fuse
def test_a_call_that_outlives_its_killed_caller_never_writes(stack, tmp_path: Path) -> None:
    """The attack shape of the pinned-caller fix: a caller blocked in a long call is
    SIGKILLed and answered EINTR; the driver's work finishes later and writes its output. The
    write must not reach any process (the dead caller's pid may belong to a stranger by then):
    the accessor refuses it and no process_vm_writev is ever made. (Before the fix the late
    write went to process_vm_writev with the raw pid.)"""
    driver = OutlivingDriver(stack.driver)
    sys_ = CountingSyscalls()
    with mounted(driver, tmp_path / "dxg", syscalls=sys_) as node:
        child = subprocess.Popen([sys.executable, "-c", BLOCKED_CLIENT, str(node.path),
                                  str(LX_DXGETDEVICESTATE)], stdout=subprocess.PIPE, text=True)
        try:
            assert _readline(child).strip() == "calling"
            assert driver.parked.wait(20)
            assert sys_.touching(child.pid) == [("process_vm_readv", child.pid)]
            child.send_signal(signal.SIGKILL)
            assert child.wait(timeout=20) == -signal.SIGKILL  # answered EINTR, dead, reaped
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert driver.cancelled.wait(20)  # the call itself was cancelled
        assert driver.go is not None
        stack.driver.rt.call(driver.go.set)  # now the late work tries to write
        wait_until(lambda: driver.outcome, what="the late write attempted")
        assert driver.outcome[0].startswith("refused") and "interrupted" in driver.outcome[0]
        assert node.wait_idle(20)
    assert sys_.touching(child.pid) == [("process_vm_readv", child.pid)]
    assert not any(name == "process_vm_writev" for name, _ in sys_.calls)


@needs_fuse
@needs_gcc
def test_a_killed_sleeper_is_never_touched_after_its_kill(stack, tmp_path: Path,
                                                         dxg_test: Path) -> None:
    """The same through the real stack: a C caller blocked in a pydxg SLEEP escape (held by
    the host) is SIGKILLed. Nothing reads or writes its pid from then on, though the escape's
    reply (the host cuts the sleep short when the process goes) would be copied back to it.
    (Before the fix the call went on after the EINTR and wrote that reply with
    process_vm_writev to the dead pid.)"""
    sys_ = CountingSyscalls()
    with mounted(stack.driver, tmp_path / "dxg", syscalls=sys_) as node:
        child = subprocess.Popen([str(dxg_test), "-q", "-t", "1", "-n", "60000",
                                  str(node.path), "sleep"], stdout=subprocess.PIPE, text=True)
        try:
            assert _readline(child).startswith(f"sleeping pid {child.pid} ")
            wait_until(lambda: node.inflight() == 1, what="the SLEEP parked")
            wait_until(lambda: sys_.touching(child.pid), what="the escape read its data")
            seen = len(sys_.touching(child.pid))
            child.send_signal(signal.SIGKILL)
            assert child.wait(timeout=20) == -signal.SIGKILL
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert node.wait_idle(20)
        wait_until(lambda: _settled(stack, node), what="the process torn down on the host")
        assert node.inflight() == 0
    assert len(sys_.touching(child.pid)) == seen, sys_.touching(child.pid)


@needs_fuse
@needs_gcc
def test_64_parked_callers_do_not_hold_up_a_65th(stack, dev: FuseNode, dxg_test: Path) -> None:
    """No worker cap: 64 threads each blocked in a long call (a pydxg SLEEP the host holds for
    a minute), and another caller is still answered at once."""
    sleeper = subprocess.Popen([str(dxg_test), "-q", "-t", "64", "-n", "60000", str(dev.path),
                                "sleep"], stdout=subprocess.PIPE, text=True)
    try:
        assert _readline(sleeper).startswith("sleeping")
        wait_until(lambda: dev.inflight() >= 64, timeout=30, what="64 calls parked")
        fd = os.open(dev.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            t0 = time.monotonic()
            assert _enum3(fd) == (0, ADAPTERS)
            took = time.monotonic() - t0
        finally:
            os.close(fd)
        assert took < 5.0, f"the 65th call took {took:.1f}s"
        assert dev.inflight() >= 64  # the others are still parked
    finally:
        sleeper.kill()
        sleeper.wait()
    assert dev.wait_idle(30)
    wait_until(lambda: _settled(stack, dev), timeout=30, what="the sleeper torn down")


def _open_as(uid: int, path: Path) -> tuple[int, int, int]:
    """Fork a child that becomes ``uid`` and opens ``path`` until refused (at most 100 times)
    and holds what it got. Returns (its pid, how many opens succeeded, the errno that stopped
    it); the child exits when it is killed. (The test's Python lives under root's home, which
    other users cannot run, so a fork instead of a new interpreter.)"""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: system calls only, then _exit
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            fds, err = [], 0
            while len(fds) < 100:
                try:
                    fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
                except OSError as e:
                    err = e.errno or 0
                    break
            os.write(w, struct.pack("<ii", len(fds), err))
            signal.pause()
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 20)
        data = os.read(r, 8) if ready else b""
    finally:
        os.close(r)
    if len(data) != 8:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise AssertionError("the child opening as another user reported nothing")
    opened, err = struct.unpack("<ii", data)
    return pid, opened, err


@needs_fuse
@needs_root
def test_open_files_are_limited_per_user(stack, public_dir: Path, caplog) -> None:
    """One user cannot hold every open file: past max_opens_per_uid its opens fail with
    EMFILE (and a log line says why), while root still opens, up to max_opens in all."""
    caplog.set_level(logging.INFO, logger="dxg.node.fuse")
    with mounted(stack.driver, public_dir / "dxg", max_opens=10, max_opens_per_uid=3) as node:
        mine: list[int] = []
        child = 0
        try:
            child, opened, err = _open_as(65534, node.path)
            assert (opened, err) == (3, errno.EMFILE)
            assert "uid 65534 already holds 3 open files" in caplog.text
            assert [p["uid"] for p in node.processes()] == [65534] * 3
            for _ in range(7):  # root is not held to the per-user limit
                mine.append(os.open(node.path, os.O_RDONLY | os.O_CLOEXEC))
            assert _enum3(mine[-1]) == (0, ADAPTERS)
            with pytest.raises(OSError) as e:  # but the node is full now
                os.open(node.path, os.O_RDONLY | os.O_CLOEXEC)
            assert e.value.errno == errno.EMFILE
            assert node.open_files() == 10 and node.refused == 2
        finally:
            for fd in mine:
                os.close(fd)
            if child:
                os.kill(child, signal.SIGKILL)
                os.waitpid(child, 0)
        assert node.wait_idle(20)
        fd = os.open(node.path, os.O_RDONLY | os.O_CLOEXEC)  # free again
        os.close(fd)


class LimitedDriver(Wrapped):
    """Two calls need what a file cannot do: GetDeviceState wants to give the caller a
    descriptor, IsFeatureEnabled breaks inside the driver."""

    async def ioctl(self, proc, code: int, arg: bytes, mem, caller_tgid=None):
        if code == LX_DXGETDEVICESTATE:
            mem.give_fd_to_user(os.dup(0), 0x1000)
        if code == LX_ISFEATUREENABLED:
            raise RuntimeError("a driver bug")
        return await super().ioctl(proc, code, arg, mem, caller_tgid)


@needs_fuse
def test_what_a_file_cannot_do_is_an_error_status(stack, tmp_path: Path, caplog) -> None:
    with mounted(LimitedDriver(stack.driver), tmp_path / "dxg") as node:
        fd = os.open(node.path, os.O_RDONLY)
        try:
            with pytest.raises(OSError) as e:
                fcntl.ioctl(fd, LX_DXGETDEVICESTATE, bytearray(56), True)
            assert e.value.errno == errno.EOPNOTSUPP
            with pytest.raises(OSError) as e:
                fcntl.ioctl(fd, LX_ISFEATUREENABLED, bytearray(12), True)
            assert e.value.errno == errno.EIO
            assert _enum3(fd) == (0, ADAPTERS)
        finally:
            os.close(fd)
    assert "a driver bug" in caplog.text


# ---- cost ---------------------------------------------------------------------------------------


@needs_fuse
@needs_gcc
def test_c_bench_runs(stack, dev: FuseNode, dxg_test: Path) -> None:
    out = run_c(dxg_test, dev.path, "bench", "-q", "-n", "300").stdout
    found = dict(re.findall(r"^bench (\w+) n=300 p50_us=([\d.]+)", out, re.M))
    assert set(found) == {"LX_DXENUMADAPTERS3_count", "LX_DXQUERYADAPTERINFO_adaptertype"}
    # Generous: a FUSE round trip is tens of microseconds; a second would mean a hang somewhere.
    assert all(float(v) < 1_000_000 for v in found.values()), found
