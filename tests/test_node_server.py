"""SocketNode over a small fake driver: real sockets, real client processes.

No fixed sleeps: everything waits on a condition with a deadline.
"""

import asyncio
import contextlib
import ctypes
import errno
import json
import os
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from dxg.client import thunks
from dxg.client.connection import NodeConnection
from dxg.client.errors import (
    NodeError,
    NodeNotFound,
    NodePermissionDenied,
    NodeProtocolError,
    NodeUnavailable,
)
from dxg.node import server as node_server
from dxg.node.server import NodeBusy, SocketNode
from dxg.oslib.procmem import UserMemoryFault
from dxg.runtime.loop import LoopThread
from dxg.uapi import ioctls as io
from dxg.uapi import structs as s
from dxg.uapi import wire
from dxg.uapi.ntstatus import NTSTATUS

DEADLINE = 10.0
NOBODY = 65534
IS_ROOT = os.geteuid() == 0

# ---- the fake driver -----------------------------------------------------------------------------


class FakeProc:
    def __init__(self, pid: int, uid: int, name: str) -> None:
        self.pid, self.uid, self.name = pid, uid, name
        self.closed = 0


class FakeDriver:
    """Records every call; answers a few ioctls in a recognizable way; DestroyContext waits for
    `gate` (after setting `entered`) so tests can hold a call inside the driver. Runs on a loop of
    its own, as the real driver does."""

    def __init__(self) -> None:
        self.rt = LoopThread("fake-driver")
        self.cond = threading.Condition()
        self.opened: list[FakeProc] = []
        self.closed: list[FakeProc] = []
        self.calls: list[tuple[FakeProc, int, bytes]] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.returned = threading.Event()
        self.cancelled = threading.Event()
        self.on_enter = None
        # ESCAPE parks on the driver's loop (no thread) until released (or cancelled)
        self.parked: list[asyncio.Future] = []
        self.escapes_open = False

    def open_process(self, pid: int, uid: int, name: str,
                     gids: tuple[int, ...] = ()) -> FakeProc:
        p = FakeProc(pid, uid, name)
        with self.cond:
            self.opened.append(p)
            self.cond.notify_all()
        return p

    async def close_process(self, proc: FakeProc) -> None:
        with self.cond:
            proc.closed += 1
            self.closed.append(proc)
            self.cond.notify_all()

    async def ioctl(self, proc: FakeProc, code: int, arg: bytes, mem) -> tuple[int, bytes]:
        with self.cond:
            self.calls.append((proc, code, arg))
            self.cond.notify_all()
        try:
            if code == io.LX_DXDESTROYCONTEXT:
                self.entered.set()
                if self.on_enter is not None:
                    self.on_enter()
                loop = asyncio.get_running_loop()
                try:
                    await loop.run_in_executor(None, self.gate.wait, DEADLINE * 3)
                except asyncio.CancelledError:
                    self.cancelled.set()
                    raise
                self.returned.set()
                return 0, arg
            if code == io.LX_DXESCAPE and not self.escapes_open:
                fut = asyncio.get_running_loop().create_future()
                self.parked.append(fut)
                await fut
                return 0, arg
            return self._ioctl(proc, code, arg, mem)
        except UserMemoryFault:
            return -errno.EFAULT, arg

    def _ioctl(self, proc: FakeProc, code: int, arg: bytes, mem) -> tuple[int, bytes]:
        if code == io.LX_DXENUMADAPTERS2:
            a = s.d3dkmt_enumadapters2.from_buffer_copy(arg)
            infos = (s.d3dkmt_adapterinfo * a.num_adapters)()
            for i in range(a.num_adapters):
                infos[i].adapter_handle.v = 0x40000000 + i
                infos[i].adapter_luid.a = proc.pid
            mem.write(a.adapters, bytes(infos))
            return 0, bytes(a)
        if code == io.LX_DXQUERYADAPTERINFO:
            a = s.d3dkmt_queryadapterinfo.from_buffer_copy(arg)
            data = mem.read(a.private_data, a.private_data_size)
            mem.write(a.private_data, data[::-1])
            return NTSTATUS.STATUS_PENDING, arg
        if code == io.LX_DXOPENADAPTERFROMLUID:
            a = s.d3dkmt_openadapterfromluid.from_buffer_copy(arg)
            a.adapter_handle.v = 0x1234
            return 0, bytes(a)
        return 0, arg

    async def admin(self, request: dict) -> dict:
        with self.cond:
            return {"echo": request, "pids": [p.pid for p in self.opened]}

    def release_escapes(self) -> None:
        """Let every parked ESCAPE return, and those to come return at once."""
        def release() -> None:
            self.escapes_open = True
            for fut in self.parked:
                if not fut.done():
                    fut.set_result(None)
        self.rt.call(release)

    def escapes(self, uid: int | None = None) -> list[int]:
        """The ``type`` field of each ESCAPE the driver was called with (tests put the seq there),
        in call order."""
        with self.cond:
            return [s.d3dkmt_escape.from_buffer_copy(arg).type for p, code, arg in self.calls
                    if code == io.LX_DXESCAPE and (uid is None or p.uid == uid)]

    def wait(self, predicate, timeout: float = DEADLINE) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def procs_of(self, pid: int) -> list[FakeProc]:
        with self.cond:
            return [p for p in self.opened if p.pid == pid]


# ---- helpers -------------------------------------------------------------------------------------


def wait_until(pred, timeout: float = DEADLINE) -> None:
    """Wait for `pred()` with a deadline (checked every 10 ms)."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        tick.wait(0.01)


@pytest.fixture
def driver():
    drv = FakeDriver()
    yield drv
    drv.gate.set()
    drv.rt.close()


@pytest.fixture
def node_dir():
    d = tempfile.mkdtemp(prefix="dxgnode-")
    os.chmod(d, 0o755)
    yield Path(d)
    shutil.rmtree(d)


@pytest.fixture
def node(driver, node_dir):
    n = SocketNode(driver, node_dir / "dxg.sock")
    n.start()
    yield n
    n.close()


CLIENT = r"""
import ctypes, json, os, sys
from dxg.client import thunks
from dxg.client.connection import NodeConnection
from dxg.uapi import ioctls as io, structs as s

path, mode = sys.argv[1], sys.argv[2]

def enum(conn, n=2):
    infos = (s.d3dkmt_adapterinfo * n)()
    args = s.d3dkmt_enumadapters2(num_adapters=n, adapters=ctypes.addressof(infos))
    ret = conn.ioctl(io.LX_DXENUMADAPTERS2, args)
    return ret, [(infos[i].adapter_handle.v, infos[i].adapter_luid.a) for i in range(n)]

conn = NodeConnection(path)
if mode == "enum":
    print(json.dumps(enum(conn)), flush=True)
elif mode == "loop":
    for i in range(int(sys.argv[3])):
        data = os.urandom(1 + i % 300)
        buf = ctypes.create_string_buffer(data, len(data))
        args = s.d3dkmt_queryadapterinfo(private_data=ctypes.addressof(buf),
                                         private_data_size=len(data))
        st = thunks.D3DKMTQueryAdapterInfo(conn, args)
        assert st == 0x103, hex(st)
        assert buf.raw == data[::-1], "reply not applied"
    print("ok", flush=True)
elif mode == "hold":
    enum(conn)
    print("ready", flush=True)
    sys.stdin.read()
elif mode == "slow":
    print("ready", flush=True)
    conn.ioctl(io.LX_DXDESTROYCONTEXT, s.d3dkmt_destroycontext())
    sys.stdin.read()
elif mode == "fork":
    child = os.fork()
    if child == 0:
        infos = (s.d3dkmt_adapterinfo * 1)()
        args = s.d3dkmt_enumadapters2(num_adapters=1, adapters=ctypes.addressof(infos))
        raw = conn.ioctl(io.LX_DXENUMADAPTERS2, args)
        st = thunks.D3DKMTEnumAdapters2(conn, args)
        ok = raw == -25 and st == 0 and infos[0].adapter_luid.a == os.getpid()
        os._exit(0 if ok else 1)
    _, status = os.waitpid(child, 0)
    ret, infos = enum(conn, 1)
    print(json.dumps([os.waitstatus_to_exitcode(status), ret, infos[0][1] == os.getpid()]),
          flush=True)
"""


def spawn(path: Path, mode: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CLIENT, str(path), mode, *extra],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_line(proc: subprocess.Popen, timeout: float = DEADLINE) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        proc.kill()
        raise AssertionError(f"client printed nothing within {timeout}s: {proc.stderr.read()}")
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(f"client died: {proc.wait()} {proc.stderr.read()}")
    return line.strip()


def finish(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.stdin.close()
        proc.wait(DEADLINE)


class Raw:
    """A hand-driven wire connection, for sending what a real client never would."""

    def __init__(self, path: Path, hello: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(DEADLINE)
        self.sock.connect(str(path))
        self.dec = wire.FrameDecoder()
        if hello:
            self.send(wire.encode(wire.Hello(), 1))
            assert isinstance(self.recv(), wire.HelloReply)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def frame(self, kind: int, payload: bytes, seq: int = 5) -> None:
        self.send(struct.pack("<IHHII", wire.MAGIC, kind, 0, seq, len(payload)) + payload)

    def recv(self) -> wire.Message | None:
        while (f := self.dec.next_frame()) is None:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.dec.feed(data)
        return wire.decode(f)

    def at_eof(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def ioctl(self, code: int, body: bytes, regions=()) -> wire.Message:
        self.send(wire.encode(wire.IoctlRequest(code, body, tuple(regions)), 9))
        return self.recv()

    def close(self) -> None:
        self.sock.close()


def enum_ok(raw: Raw) -> None:
    args = s.d3dkmt_enumadapters2(num_adapters=1, adapters=0x7000)
    reply = raw.ioctl(
        io.LX_DXENUMADAPTERS2, bytes(args), [wire.Region(0x7000, 20, wire.REGION_OUT)]
    )
    assert isinstance(reply, wire.IoctlReply) and reply.ret == 0
    assert reply.writes[0].addr == 0x7000 and len(reply.writes[0].data) == 20


# ---- processes and credentials -------------------------------------------------------------------


def test_client_process_gets_its_own_process_with_peercred(driver, node):
    proc = spawn(node.path, "hold")
    try:
        assert read_line(proc) == "ready"
        (p,) = driver.procs_of(proc.pid)
        assert p.uid == os.getuid()
        with open(f"/proc/{proc.pid}/comm") as f:
            assert p.name == f.read().strip()
        assert {c["pid"] for c in node.connections()} == {proc.pid}
    finally:
        finish(proc)
    assert driver.wait(lambda: p.closed == 1)


def test_ioctl_round_trip_applies_writes_and_struct(driver, node):
    proc = spawn(node.path, "enum")
    ret, infos = json.loads(read_line(proc))
    finish(proc)
    assert ret == 0
    assert infos == [[0x40000000, proc.pid], [0x40000001, proc.pid]]


def test_many_clients_at_once(driver, node):
    procs = [spawn(node.path, "loop", "40") for _ in range(12)]
    try:
        for p in procs:
            assert read_line(p, 60) == "ok"
            assert p.wait(DEADLINE) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    pids = {p.pid for p in procs}
    assert driver.wait(lambda: {q.pid for q in driver.closed} >= pids)
    assert {q.pid for q in driver.opened} == pids
    assert all(q.closed == 1 for q in driver.opened)


def test_blocked_call_does_not_stall_another_client(driver, node):
    a = NodeConnection(node.path)
    b = NodeConnection(node.path)
    result = {}
    t = threading.Thread(
        target=lambda: result.update(ret=a.ioctl(io.LX_DXDESTROYCONTEXT, s.d3dkmt_destroycontext()))
    )
    t.start()
    try:
        assert driver.entered.wait(DEADLINE)
        infos = (s.d3dkmt_adapterinfo * 1)()
        args = s.d3dkmt_enumadapters2(num_adapters=1, adapters=ctypes.addressof(infos))
        assert b.ioctl(io.LX_DXENUMADAPTERS2, args) == 0
        assert infos[0].adapter_handle.v == 0x40000000
        assert "ret" not in result  # A is still inside the driver
    finally:
        driver.gate.set()
        t.join(DEADLINE)
    assert result == {"ret": 0}
    a.close()
    b.close()


def test_sigkilled_client_is_closed_within_a_second(driver, node):
    proc = spawn(node.path, "hold")
    assert read_line(proc) == "ready"
    (p,) = driver.procs_of(proc.pid)
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    assert driver.wait(lambda: p.closed == 1, 1.0)
    assert time.monotonic() - t0 < 1.0
    proc.wait(DEADLINE)


def test_sigkill_while_blocked_in_the_driver(driver, node):
    proc = spawn(node.path, "slow")
    assert read_line(proc) == "ready"
    assert driver.entered.wait(DEADLINE)
    (p,) = driver.procs_of(proc.pid)
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    assert driver.wait(lambda: p.closed == 1, 1.0), "not released while its call was blocked"
    assert time.monotonic() - t0 < 1.0
    assert driver.cancelled.wait(DEADLINE), "the dead process's call was not cancelled"
    proc.wait(DEADLINE)
    driver.gate.set()
    wait_until(lambda: node.connections() == [])
    assert p.closed == 1  # exactly once
    assert not driver.returned.is_set()


def test_interrupted_call_leaves_the_connection_usable(driver, node):
    class Interrupted(Exception):
        pass

    def handler(signum, frame):
        raise Interrupted

    old = signal.signal(signal.SIGUSR1, handler)
    main = threading.main_thread().ident
    driver.on_enter = lambda: signal.pthread_kill(main, signal.SIGUSR1)
    conn = NodeConnection(node.path)
    try:
        with pytest.raises(Interrupted):
            conn.ioctl(io.LX_DXDESTROYCONTEXT, s.d3dkmt_destroycontext())
    finally:
        signal.signal(signal.SIGUSR1, old)
    # The client told the node it gave up (CANCEL): the driver's call is cancelled.
    assert driver.cancelled.wait(DEADLINE)
    driver.gate.set()
    infos = (s.d3dkmt_adapterinfo * 1)()
    args = s.d3dkmt_enumadapters2(num_adapters=1, adapters=ctypes.addressof(infos))
    assert conn.ioctl(io.LX_DXENUMADAPTERS2, args) == 0
    assert infos[0].adapter_handle.v == 0x40000000
    assert args.num_adapters == 1
    conn.close()


def test_forked_child_gets_enotty_and_thunk_reopens(driver, node):
    proc = spawn(node.path, "fork")
    code, ret, mine = json.loads(read_line(proc))
    finish(proc)
    assert (code, ret, mine) == (0, 0, True)


# ---- malformed requests --------------------------------------------------------------------------


def test_unknown_code_and_wrong_size_bits_get_enotty(driver, node):
    raw = Raw(node.path)
    body = bytes(s.d3dkmt_enumadapters2())
    bad_size = (io.LX_DXENUMADAPTERS2 & ~(0x3FFF << 16)) | (17 << 16)
    for code in (0xC0104799, 0, 0xFFFFFFFF, bad_size, io.LX_DXENUMADAPTERS2 & ~0xC0000000):
        reply = raw.ioctl(code, body)
        assert isinstance(reply, wire.IoctlReply)
        assert reply.ret == -errno.ENOTTY and reply.struct == body
    assert driver.calls == []
    enum_ok(raw)
    raw.close()


def test_short_and_long_structs(driver, node):
    raw = Raw(node.path)
    assert raw.ioctl(io.LX_DXENUMADAPTERS2, b"\0" * 8).ret == -errno.EFAULT
    assert raw.ioctl(io.LX_DXENUMADAPTERS2, b"\0" * 17).ret == -errno.EINVAL
    assert driver.calls == []
    enum_ok(raw)
    raw.close()


def test_access_outside_sent_regions_is_efault(driver, node):
    raw = Raw(node.path)
    args = s.d3dkmt_enumadapters2(num_adapters=2, adapters=0x7000)
    # only one of the two entries was sent: the driver's write faults
    reply = raw.ioctl(
        io.LX_DXENUMADAPTERS2, bytes(args), [wire.Region(0x7000, 20, wire.REGION_OUT)]
    )
    assert reply.ret == -errno.EFAULT and reply.writes == ()
    raw.close()


@pytest.mark.parametrize(
    "payload,err",
    [
        (struct.pack("<IIII", io.LX_DXENUMADAPTERS2, 16, 0xFFFFFFFF, 0) + b"\0" * 16, errno.E2BIG),
        (
            struct.pack("<IIII", io.LX_DXENUMADAPTERS2, 16, 1, 0)
            + b"\0" * 16
            + struct.pack("<QII", 0x1000, 0xFFFFFF, 2),
            errno.E2BIG,
        ),
        (struct.pack("<IIII", io.LX_DXENUMADAPTERS2, 16, 2, 0) + b"\0" * 16, errno.EINVAL),
        (b"\x01\x02\x03", errno.EINVAL),
    ],
)
def test_malformed_ioctl_frames_keep_the_connection(driver, node, payload, err):
    raw = Raw(node.path)
    raw.frame(wire.Kind.IOCTL, payload, seq=77)
    reply = raw.recv()
    assert isinstance(reply, wire.ErrorReply) and reply.errno == err and not reply.fatal
    enum_ok(raw)
    raw.close()


def test_unknown_kinds_bad_json_and_stray_replies_keep_the_connection(driver, node):
    raw = Raw(node.path)
    for kind, payload in (
        (42, b"whatever"),
        (wire.Kind.ADMIN, b"{not json"),
        (wire.Kind.ADMIN, b"[1]"),
        (wire.Kind.IOCTL_REPLY, struct.pack("<qII", 0, 0, 0)),
        (wire.Kind.HELLO, struct.pack("<HHI", 1, 1, 0)),
    ):
        raw.frame(kind, payload)
        reply = raw.recv()
        assert isinstance(reply, wire.ErrorReply) and not reply.fatal, (kind, reply)
    enum_ok(raw)
    raw.close()


def test_huge_length_is_fatal_but_the_node_stays_up(driver, node):
    raw = Raw(node.path)
    raw.send(struct.pack("<IHHII", wire.MAGIC, wire.Kind.IOCTL, 0, 3, 0xFFFFFFF0))
    reply = raw.recv()
    assert isinstance(reply, wire.ErrorReply) and reply.fatal and reply.errno == errno.EMSGSIZE
    assert raw.at_eof()
    (p,) = driver.procs_of(os.getpid())
    assert driver.wait(lambda: p.closed == 1)
    raw.close()
    other = Raw(node.path)
    enum_ok(other)
    other.close()


@pytest.mark.parametrize(
    "first",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        wire.encode(wire.AdminRequest({"op": "snapshot"}), 1),
        wire.encode(wire.Hello(50, 60), 1),
        struct.pack("<IHHII", wire.MAGIC, wire.Kind.HELLO, 0, 1, 2) + b"xx",
    ],
)
def test_bad_handshakes_are_fatal(driver, node, first):
    raw = Raw(node.path, hello=False)
    raw.send(first)
    reply = raw.recv()
    assert isinstance(reply, wire.ErrorReply) and reply.fatal
    assert raw.at_eof()
    raw.close()
    assert driver.opened == []  # no process is opened before a good HELLO


def test_garbage_mid_stream_closes_that_connection_only(driver, node):
    raw = Raw(node.path)
    other = Raw(node.path)
    raw.send(os.urandom(64))
    reply = raw.recv()
    assert reply is None or (isinstance(reply, wire.ErrorReply) and reply.fatal)
    enum_ok(other)
    raw.close()
    other.close()


def test_bad_pointer_gives_efault_not_a_crash(driver, node):
    conn = NodeConnection(node.path)
    args = s.d3dkmt_enumadapters2(num_adapters=2, adapters=0x10)
    assert conn.ioctl(io.LX_DXENUMADAPTERS2, args) == -errno.EFAULT
    args = s.d3dkmt_queryadapterinfo(private_data=0xDEAD0000, private_data_size=64)
    assert thunks.D3DKMTQueryAdapterInfo(conn, args) == NTSTATUS.STATUS_UNSUCCESSFUL
    conn.close()


# ---- admin ---------------------------------------------------------------------------------------


def test_admin_round_trip(driver, node):
    with NodeConnection(node.path) as conn:
        reply = conn.admin({"op": "snapshot"})
    assert reply == {"echo": {"op": "snapshot"}, "pids": [os.getpid()]}


def test_admin_refused_to_other_users(driver, node_dir):
    with SocketNode(driver, node_dir / "a.sock", admin_uids=frozenset()) as n:
        conn = NodeConnection(n.path)
        with pytest.raises(NodeProtocolError) as ei:
            conn.admin({"op": "snapshot"})
        assert ei.value.errno == errno.EACCES
        infos = (s.d3dkmt_adapterinfo * 1)()
        args = s.d3dkmt_enumadapters2(num_adapters=1, adapters=ctypes.addressof(infos))
        assert conn.ioctl(io.LX_DXENUMADAPTERS2, args) == 0  # still usable
        conn.close()


# ---- the socket file -----------------------------------------------------------------------------


def test_mode_and_group_are_applied(driver, node_dir):
    gid = 1 if os.geteuid() == 0 else os.getgid()
    with SocketNode(driver, node_dir / "m.sock", mode=0o660, group=gid) as n:
        st = os.stat(n.path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == gid
    if os.geteuid() == 0:
        import grp

        name = grp.getgrgid(1).gr_name
        with SocketNode(driver, node_dir / "g.sock", mode=0o640, group=name) as n:
            st = os.stat(n.path)
            assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o640, 1)
    assert list(node_dir.iterdir()) == []


def test_unknown_group_is_an_error(driver, node_dir):
    with pytest.raises(LookupError):
        SocketNode(driver, node_dir / "x.sock", group="no-such-group-pydxg").start()


def test_permission_denied_by_mode(driver, node_dir):
    with SocketNode(driver, node_dir / "p.sock", mode=0o600) as n:
        if os.geteuid() != 0:
            os.chmod(n.path, 0o000)
            with pytest.raises(NodePermissionDenied) as ei:
                NodeConnection(n.path)
            assert str(n.path) in str(ei.value)
            return
        r, w = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child
            os.close(r)
            code = b"?"
            try:
                os.setgid(65534)
                os.setuid(65534)
                NodeConnection(n.path)
                code = b"connected"
            except NodePermissionDenied as e:
                code = b"denied" if str(n.path) in str(e) else b"no-path"
            except BaseException as e:
                code = type(e).__name__.encode()
            os.write(w, code)
            os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            assert f.read() == b"denied"
        os.waitpid(child, 0)


def test_parent_directory_is_created(driver, node_dir):
    with SocketNode(driver, node_dir / "sub" / "dir" / "dxg.sock") as n:
        assert n.path.exists()
    (node_dir / "sub" / "dir").rmdir()
    (node_dir / "sub").rmdir()


def test_refuses_to_clobber_a_live_socket(driver, node):
    with pytest.raises(NodeBusy):
        SocketNode(FakeDriver(), node.path).start()
    enum_ok(Raw(node.path))


def test_stale_socket_is_replaced_and_files_are_not(driver, node_dir):
    stale = node_dir / "stale.sock"
    sk = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sk.bind(str(stale))
    sk.close()
    with pytest.raises(NodeUnavailable) as ei:
        NodeConnection(stale)
    assert str(stale) in str(ei.value)
    with SocketNode(driver, stale) as n:
        enum_ok(Raw(n.path))
    regular = node_dir / "file"
    regular.write_text("keep me")
    with pytest.raises(NodeBusy):
        SocketNode(driver, regular).start()
    assert regular.read_text() == "keep me"


def test_close_unlinks_and_releases_everyone(driver, node_dir):
    n = SocketNode(driver, node_dir / "c.sock")
    n.start()
    conns = [NodeConnection(n.path) for _ in range(3)]
    blocked = NodeConnection(n.path)
    t = threading.Thread(
        target=lambda: pytest.raises(
            NodeError, blocked.ioctl, io.LX_DXDESTROYCONTEXT, s.d3dkmt_destroycontext()
        )
    )
    t.start()
    assert driver.entered.wait(DEADLINE)
    n.close()
    assert not n.path.exists()
    assert driver.wait(lambda: len(driver.closed) == 4)
    assert all(p.closed == 1 for p in driver.opened)
    for c in conns:
        with pytest.raises(NodeUnavailable):
            c.ioctl(io.LX_DXCLOSEADAPTER, s.d3dkmt_closeadapter())
    driver.gate.set()
    t.join(DEADLINE)
    assert not t.is_alive()
    n.close()  # idempotent


def test_connection_cap(driver, node_dir):
    with SocketNode(driver, node_dir / "cap.sock", max_connections=1) as n:
        first = NodeConnection(n.path)
        with pytest.raises(NodeError):
            NodeConnection(n.path)
        first.close()


# ---- client errors -------------------------------------------------------------------------------


def test_node_not_found_names_the_path(node_dir):
    missing = node_dir / "nope.sock"
    with pytest.raises(NodeNotFound) as ei:
        NodeConnection(missing)
    assert str(missing) in str(ei.value)
    assert ei.value.status == NTSTATUS.STATUS_NO_SUCH_DEVICE


def test_default_path_follows_the_environment(monkeypatch, tmp_path):
    from dxg.uapi.nodepath import default_node_path

    monkeypatch.setenv("DXG_NODE", str(tmp_path / "x.sock"))
    assert default_node_path() == tmp_path / "x.sock"
    monkeypatch.delenv("DXG_NODE")
    if os.geteuid() == 0:
        assert default_node_path() == Path("/run/pydxg/dxg.sock")
    else:
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
        assert default_node_path() == tmp_path / "pydxg" / "dxg.sock"
        monkeypatch.delenv("XDG_RUNTIME_DIR")
        assert default_node_path() == Path(f"/tmp/pydxg-{os.geteuid()}/dxg.sock")


def test_connection_to_dead_node_raises_unavailable(driver, node_dir):
    n = SocketNode(driver, node_dir / "d.sock")
    n.start()
    conn = NodeConnection(n.path)
    n.close()
    with pytest.raises(NodeUnavailable):
        conn.ioctl(io.LX_DXCLOSEADAPTER, s.d3dkmt_closeadapter())
    assert conn.closed


# ---- limits on what one client can hold ----------------------------------------------------------


def in_child(fn, uid: int | None = None) -> str:
    """Run ``fn()`` in a forked child (as ``uid`` when given: root only) and return the string it
    returns, or the exception it raised as text."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.close(r)
        out = "?"
        try:
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            out = fn()
        except BaseException as e:
            out = f"{type(e).__name__}: {e}"
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    data = b""
    deadline = time.monotonic() + DEADLINE * 2
    with os.fdopen(r, "rb", buffering=0) as f:
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([f], [], [], max(left, 0))
            if not ready:
                os.kill(child, signal.SIGKILL)
                os.waitpid(child, 0)
                raise AssertionError("child did not finish in time")
            chunk = f.read(4096)
            if not chunk:
                break
            data += chunk
    os.waitpid(child, 0)
    return data.decode()


def refusal(path: Path) -> wire.Message | None:
    """Connect, say HELLO (the node may already have hung up) and return its first answer."""
    raw = Raw(path, hello=False)
    try:
        with contextlib.suppress(OSError):
            raw.send(wire.encode(wire.Hello(), 1))
        return raw.recv()
    finally:
        raw.close()


def test_handshake_reads_only_a_small_frame(driver, node):
    # A pre-HELLO peer declaring a 4 MiB frame is cut off at the header, not buffered.
    raw = Raw(node.path, hello=False)
    raw.send(struct.pack("<IHHII", wire.MAGIC, wire.Kind.HELLO, 0, 1, wire.MAX_PAYLOAD))
    reply = raw.recv()
    assert isinstance(reply, wire.ErrorReply) and reply.fatal and reply.errno == errno.EMSGSIZE
    assert raw.at_eof()
    raw.close()
    assert driver.opened == []
    big = Raw(node.path)  # after HELLO, the full limit applies
    blob = {"pad": "x" * 100_000}
    big.send(wire.encode(wire.AdminRequest(blob), 3))
    reply = big.recv()
    assert isinstance(reply, wire.AdminReply) and reply.reply["echo"] == blob
    big.close()


def test_handshake_deadline_covers_the_whole_handshake(driver, node_dir):
    with SocketNode(driver, node_dir / "h.sock", handshake_timeout=1.0) as n:
        raw = Raw(n.path, hello=False)
        hello = wire.encode(wire.Hello(), 1)
        stop = threading.Event()
        sent: list[int] = []

        def trickle() -> None:  # one byte every 0.2 s: each well inside the 1 s limit
            for b in hello[:-1]:
                if stop.wait(0.2):
                    return
                try:
                    raw.sock.send(bytes([b]))
                except OSError:
                    return
                sent.append(b)

        t0 = time.monotonic()
        th = threading.Thread(target=trickle)
        th.start()
        try:
            reply = raw.recv()
        finally:
            stop.set()
            th.join(DEADLINE)
        elapsed = time.monotonic() - t0
        assert isinstance(reply, wire.ErrorReply) and reply.fatal, reply
        assert reply.errno == errno.ETIMEDOUT and "HELLO" in reply.message
        assert elapsed < 5.0
        assert len(sent) < len(hello) - 1  # dropped while still trickling
        assert raw.at_eof()
        raw.close()
        assert driver.opened == []
        wait_until(lambda: n.connections() == [])


@pytest.mark.parametrize("cut", [5, -3], ids=["in-header", "in-payload"])
def test_stalled_frame_is_dropped_but_an_idle_connection_is_not(driver, node_dir, cut):
    with SocketNode(driver, node_dir / "f.sock", handshake_timeout=0.5, frame_timeout=0.5) as n:
        idle = Raw(n.path)
        idle_since = time.monotonic()
        stalled = Raw(n.path)
        body = bytes(s.d3dkmt_enumadapters2())
        stalled.send(wire.encode(wire.IoctlRequest(io.LX_DXENUMADAPTERS2, body), 9)[:cut])
        reply = stalled.recv()
        assert isinstance(reply, wire.ErrorReply) and reply.fatal, reply
        assert reply.errno == errno.ETIMEDOUT and "frame" in reply.message
        assert stalled.at_eof()
        stalled.close()
        first, second = driver.opened
        assert driver.wait(lambda: second.closed == 1)
        # idle for longer than both timeouts, between requests: still an open process
        assert time.monotonic() - idle_since > 0.5
        enum_ok(idle)
        assert first.closed == 0
        idle.close()


def uid_cap_scenario(path: Path) -> str:
    """Two connections are fine, the third is refused with the per-uid limit; closing one gives
    the slot back."""
    held = [Raw(path), Raw(path)]
    reply = refusal(path)
    assert isinstance(reply, wire.ErrorReply) and reply.fatal, reply
    assert reply.errno == errno.EMFILE and f"uid {os.geteuid()}" in reply.message, reply
    held.pop().close()
    deadline = time.monotonic() + DEADLINE
    tick = threading.Event()
    while not isinstance(refusal(path), wire.HelloReply):  # once the node has seen the close
        assert time.monotonic() < deadline, "slot not given back"
        tick.wait(0.01)
    held.pop().close()
    return "ok"


def test_per_uid_connection_cap(driver, node_dir):
    assert SocketNode(driver, node_dir / "n.sock", max_connections=10).max_per_uid == 2
    with SocketNode(driver, node_dir / "u.sock", max_connections=8, max_per_uid=2) as n:
        if not IS_ROOT:
            assert in_child(lambda: uid_cap_scenario(n.path)) == "ok"
            return
        mine = [Raw(n.path) for _ in range(3)]  # root is held to the total only
        assert in_child(lambda: uid_cap_scenario(n.path), NOBODY) == "ok"
        assert in_child(lambda: uid_cap_scenario(n.path), NOBODY - 1) == "ok"
        enum_ok(mine[2])
        for raw in mine:
            raw.close()


def test_node_dir_must_belong_to_this_user_or_root(driver, node_dir):
    public = node_dir / "public"
    public.mkdir()
    os.chmod(public, 0o777)
    with pytest.raises(PermissionError, match="writable by everyone"):
        SocketNode(driver, public / "x.sock").start()
    assert list(public.iterdir()) == []
    os.chmod(public, 0o1777)  # sticky, as /tmp: nobody can swap our socket
    with SocketNode(driver, public / "x.sock") as n:
        enum_ok(Raw(n.path))
    if IS_ROOT:
        theirs = node_dir / "theirs"
        theirs.mkdir(mode=0o755)
        os.chown(theirs, NOBODY, NOBODY)
        with pytest.raises(PermissionError, match=f"uid {NOBODY}"):
            SocketNode(driver, theirs / "x.sock").start()
        assert list(theirs.iterdir()) == []
        link = node_dir / "link"
        link.symlink_to(theirs)
        with pytest.raises(PermissionError, match=f"uid {NOBODY}"):
            SocketNode(driver, link / "x.sock").start()

        # as that user, the same directory is fine
        def serve_there() -> str:
            with SocketNode(FakeDriver(), theirs / "x.sock") as n:
                NodeConnection(n.path).close()
            return "ok"

        assert in_child(serve_there, NOBODY) == "ok"


def test_tmp_fallback_dir_is_created_private(driver, node_dir, monkeypatch):
    fallback = node_dir / "pydxg-fallback"
    monkeypatch.setattr(node_server, "private_node_dir", lambda d: d == fallback)
    with SocketNode(driver, fallback / "dxg.sock") as n:
        assert stat.S_IMODE(os.stat(fallback).st_mode) == 0o700
        enum_ok(Raw(n.path))
    from dxg.uapi.nodepath import tmp_fallback_dir

    assert tmp_fallback_dir(1234) == Path("/tmp/pydxg-1234")


def test_client_refuses_a_default_node_dir_it_cannot_trust(driver, node_dir):
    runtime = node_dir / "run"
    runtime.mkdir(mode=0o755)
    nodedir = runtime / "pydxg"
    who = NOBODY if IS_ROOT else None

    def connect_by_default() -> str:
        os.environ.pop("DXG_NODE", None)
        os.environ["XDG_RUNTIME_DIR"] = str(runtime)
        try:
            NodeConnection().close()
            return "connected"
        except NodePermissionDenied as e:
            refused = str(e)
        NodeConnection(nodedir / "dxg.sock").close()  # an explicit path is the user's choice
        os.environ["DXG_NODE"] = str(nodedir / "dxg.sock")
        NodeConnection().close()
        return refused

    with SocketNode(driver, nodedir / "dxg.sock"):
        if IS_ROOT:
            os.chown(nodedir, NOBODY, NOBODY)
            assert in_child(connect_by_default, NOBODY) == "connected"  # its own directory
            os.chown(nodedir, NOBODY - 1, NOBODY - 1)  # somebody else's
            expected = f"uid {NOBODY - 1}"
        else:
            assert in_child(connect_by_default) == "connected"
            os.chmod(nodedir, 0o777)
            expected = "writable by everyone"
        refused = in_child(connect_by_default, who)
        assert expected in refused and str(nodedir / "dxg.sock") in refused, refused
        assert "DXG_NODE" in refused


@pytest.mark.skipif(not IS_ROOT, reason="needs two users")
def test_client_refuses_a_node_below_a_directory_another_user_controls(driver, node_dir):
    """The review's attack: the node at A/sub/dxg.sock where another user owns A. That user can
    rename sub and serve its own socket in a new sub, so the node's own directory being
    trustworthy is not enough: every directory above it must be too."""
    a = node_dir / "a"
    a.mkdir(mode=0o755)
    os.chown(a, NOBODY, NOBODY)  # another user's
    sub = a / "pydxg"
    sub.mkdir(mode=0o755)  # root's own, but inside theirs

    def connect_by_default() -> str:
        os.environ.pop("DXG_NODE", None)
        os.environ["XDG_RUNTIME_DIR"] = str(a)
        try:
            NodeConnection().close()
            return "connected"
        except NodePermissionDenied as e:
            return str(e)

    with pytest.raises(PermissionError, match=f"uid {NOBODY}"):
        SocketNode(driver, sub / "dxg.sock").start()  # the node refuses to serve there
    os.chown(a, 0, 0)
    with SocketNode(driver, sub / "dxg.sock"):
        os.chown(a, NOBODY, NOBODY)
        refused = in_child(connect_by_default, NOBODY - 1)  # a third user, default path
        assert f"uid {NOBODY}" in refused and str(a) in refused, refused
        os.chown(a, 0, 0)
        assert in_child(connect_by_default, NOBODY - 1) == "connected"


def test_admin_is_refused_before_its_json_is_parsed(driver, node_dir):
    with SocketNode(driver, node_dir / "a.sock", admin_uids=frozenset()) as n:
        raw = Raw(n.path)
        raw.frame(wire.Kind.ADMIN, b"{not json" * 10_000)
        reply = raw.recv()
        assert isinstance(reply, wire.ErrorReply) and not reply.fatal
        assert reply.errno == errno.EACCES  # not EINVAL: the JSON was never looked at
        enum_ok(raw)
        raw.close()


def test_peer_gone_right_after_hello_is_closed_once(driver, node):
    raw = Raw(node.path, hello=False)
    raw.send(wire.encode(wire.Hello(), 1))
    raw.close()
    assert driver.wait(lambda: len(driver.opened) == 1 and driver.opened[0].closed == 1)
    wait_until(lambda: node.connections() == [])
    assert driver.opened[0].closed == 1


# ---- what one client's calls may hold (the review's attacks) -------------------------------------


def escape(seq: int, extra_in: int = 0, fd_numbers: tuple[int, ...] = (),
           priv: int = 0x10000) -> bytes:
    """An ESCAPE frame the fake driver parks; ``type`` carries the seq (to see which ran), and
    ``extra_in`` bytes ride along in a region the driver never reads."""
    e = s.d3dkmt_escape(type=seq, priv_drv_data=priv, priv_drv_data_size=8)
    regions = [wire.Region(priv, 8, wire.REGION_IN | wire.REGION_OUT, bytes(8))]
    if extra_in:
        regions.append(wire.Region(0x1000000, extra_in, wire.REGION_IN, bytes(extra_in)))
    return wire.encode(wire.IoctlRequest(io.LX_DXESCAPE, bytes(e), tuple(regions), fd_numbers),
                       seq)


def replies(raw: Raw, n: int) -> dict[int, wire.Message]:
    """The next ``n`` replies, by seq."""
    out = {}
    for _ in range(n):
        f = None
        while (f := raw.dec.next_frame()) is None:
            data = raw.sock.recv(1 << 20)
            assert data, "the node hung up"
            raw.dec.feed(data)
        out[f.seq] = wire.decode(f)
    return out


def conn_info(node: SocketNode, pid: int | None = None) -> dict:
    (info,) = [c for c in node.connections() if pid is None or c["pid"] == pid]
    return info


def test_max_calls_holds_within_one_read_and_cancel_reaches_queued_and_running(driver, node_dir):
    """The review's attack: one send of many requests put them all in flight (the cap only
    paused later reads), and once reading paused CANCEL could not get through. Now calls past
    max_calls wait in a queue, start first come first served, and CANCEL reaches both."""
    with SocketNode(driver, node_dir / "q.sock", max_calls=4, max_queued=4) as n:
        raw = Raw(n.path)
        raw.send(b"".join(escape(seq) for seq in range(10, 17)))  # 7 requests, one send
        wait_until(lambda: len(driver.parked) == 4)
        assert driver.escapes() == [10, 11, 12, 13]
        info = conn_info(n)
        assert (info["calls"], info["queued"]) == (4, 3)

        raw.send(wire.encode(wire.Cancel(), 15))  # queued: answered without ever running
        got = replies(raw, 1)
        assert isinstance(got[15], wire.IoctlReply) and got[15].ret == -errno.EINTR
        raw.send(wire.encode(wire.Cancel(), 11))  # running: interrupted, and 14 takes its slot
        got = replies(raw, 1)
        assert isinstance(got[11], wire.IoctlReply) and got[11].ret == -errno.EINTR
        wait_until(lambda: driver.escapes() == [10, 11, 12, 13, 14])
        info = conn_info(n)
        assert (info["calls"], info["queued"]) == (4, 1)

        # Past the queue's bound the node stops reading: 3 more fill it, the 4th waits read
        # but not queued, and what follows stays unread.
        raw.send(b"".join(escape(seq) for seq in range(20, 26)))
        wait_until(lambda: conn_info(n)["queued"] == 4)
        assert conn_info(n)["calls"] == 4 and len(driver.escapes()) == 5
        driver.release_escapes()
        got = replies(raw, 11)
        assert sorted(got) == [10, 12, 13, 14, 16, 20, 21, 22, 23, 24, 25]
        assert all(isinstance(r, wire.IoctlReply) and r.ret == 0 for r in got.values())
        # first come, first served; 15 never ran
        assert driver.escapes() == [10, 11, 12, 13, 14, 16, 20, 21, 22, 23, 24, 25]
        enum_ok(raw)
        raw.close()


def test_request_bytes_held_by_calls_are_bounded_per_connection(driver, node_dir):
    mib = 1 << 20
    with SocketNode(driver, node_dir / "b.sock", max_call_bytes=8 * mib) as n:
        raw = Raw(n.path)
        frames = b"".join(escape(seq, extra_in=3 * mib) for seq in range(10, 16))
        sender = threading.Thread(target=raw.send, args=(frames,), daemon=True)
        sender.start()  # blocks while the node holds what it may
        wait_until(lambda: len(driver.parked) == 2)  # 2 x 3 MiB fit in 8 MiB, a third not
        info = conn_info(n)
        assert info["held_bytes"] <= 8 * mib and info["calls"] + info["queued"] == 2, info
        driver.release_escapes()
        got = replies(raw, 6)
        assert sorted(got) == list(range(10, 16))
        sender.join(DEADLINE)
        assert conn_info(n)["held_bytes"] == 0
        raw.close()


@contextlib.contextmanager
def held_in_child(fn, uid: int):
    """Run ``fn()`` in a forked child as ``uid`` (root only); the child keeps what it returns
    (its connections) until the block ends. Yields ``fn``'s string form of the result."""
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.close(ready_r)
        os.close(stop_w)
        keep = None
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            keep = fn()
            os.write(ready_w, b"ok")
        except BaseException as e:
            os.write(ready_w, f"{type(e).__name__}: {e}".encode())
        os.read(stop_r, 1)  # until the parent closes its end
        del keep
        os._exit(0)
    os.close(ready_w)
    os.close(stop_r)
    try:
        ready, _, _ = select.select([ready_r], [], [], DEADLINE * 2)
        assert ready, "child did not get ready in time"
        msg = os.read(ready_r, 4096).decode()
        assert msg == "ok", msg
        yield
    finally:
        os.close(stop_w)
        os.close(ready_r)
        deadline = time.monotonic() + DEADLINE
        while os.waitpid(child, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(child, signal.SIGKILL)
                os.waitpid(child, 0)
                break
            threading.Event().wait(0.01)


def _three_escapes_of_3_mib(path: Path) -> list[socket.socket]:
    socks = []
    for seq in (10, 11, 12):
        raw = Raw(path)
        raw.send(escape(seq, extra_in=3 << 20))
        socks.append(raw.sock)
    return socks


@pytest.mark.skipif(not IS_ROOT, reason="needs two users")
def test_request_bytes_held_by_calls_are_bounded_per_user(driver, node_dir):
    one = wire.HEADER_SIZE + wire.MAX_PAYLOAD
    with SocketNode(driver, node_dir / "u.sock", max_call_bytes=one,
                    max_call_bytes_per_uid=8 << 20) as n:
        with held_in_child(lambda: _three_escapes_of_3_mib(n.path), NOBODY):
            wait_until(lambda: len(driver.escapes(NOBODY)) == 2)  # 2 x 3 MiB of the 8
            held = n.rt.call(lambda: n.call_bytes.held(NOBODY))
            assert 6 << 20 < held <= 8 << 20
            mine = Raw(n.path)  # root (and every other user) is not held back by nobody's
            mine.send(escape(30, extra_in=3 << 20))
            wait_until(lambda: driver.escapes()[-1:] == [30])
            driver.release_escapes()  # nobody's calls end: its third gets in
            wait_until(lambda: len(driver.escapes(NOBODY)) == 3)
            mine.close()
        wait_until(lambda: n.rt.call(lambda: n.call_bytes.total) == 0)


def test_what_calls_hold_is_bounded_for_everyone_together(driver, node_dir):
    """Per-user limits do not bind root, nor a user with many uids (a rootless container's):
    the node-wide totals of call bytes and descriptors do."""
    from dxg.oslib.fds import send_with_fds

    one = wire.HEADER_SIZE + wire.MAX_PAYLOAD
    with SocketNode(driver, node_dir / "t.sock", max_call_bytes=one, max_call_bytes_per_uid=one,
                    max_total_call_bytes=8 << 20, max_fds=16, max_fds_per_uid=16,
                    max_total_fds=32) as n:
        raws = [Raw(n.path) for _ in range(3)]
        for seq, raw in enumerate(raws, 10):
            raw.send(escape(seq, extra_in=3 << 20))
        wait_until(lambda: len(driver.escapes()) == 2)  # 2 x 3 MiB of the 8: the third waits
        assert 6 << 20 < n.rt.call(lambda: n.call_bytes.total) <= 8 << 20
        driver.release_escapes()  # room again: the third gets in
        wait_until(lambda: len(driver.escapes()) == 3)
        driver.release_escapes()
        for raw in raws:
            assert all(r.ret == 0 for r in replies(raw, 1).values())
        # descriptors: 16 each on two connections fill the 32; a third call is refused
        driver.rt.call(lambda: setattr(driver, "escapes_open", False))  # they park again
        efd = os.eventfd(0)
        try:
            for seq, raw in enumerate(raws, 20):
                send_with_fds(raw.sock, escape(seq, fd_numbers=tuple(range(16))), [efd] * 16)
            got = [replies(raw, 1) for raw in raws[2:]]
            assert [r.ret for g in got for r in g.values()] == [-errno.EMFILE]
            wait_until(lambda: len(driver.escapes()) == 5)
            assert n.rt.call(lambda: n.call_fds.total) == 32
            driver.release_escapes()
            for raw in raws[:2]:
                assert all(r.ret == 0 for r in replies(raw, 1).values())
        finally:
            os.close(efd)
        wait_until(lambda: n.rt.call(lambda: (n.call_bytes.total, n.call_fds.total)) == (0, 0))
        for raw in raws:
            raw.close()


def _fd_rets(path: Path) -> str:
    """As another user: escapes with 16 descriptors each on 3 connections, and a non-escape
    ioctl with one; returns each connection's results, read up to a sentinel."""
    efd = os.eventfd(0)
    raws = [Raw(path) for _ in range(3)]
    out = []
    from dxg.oslib.fds import send_with_fds

    for i, raw in enumerate(raws):
        frames = [(escape(100 + 10 * i + k, fd_numbers=tuple(range(16))), [efd] * 16)
                  for k in range(2)]
        if i == 0:
            q = s.d3dkmt_queryadapterinfo(private_data=0x7000, private_data_size=4)
            frames.append((wire.encode(wire.IoctlRequest(
                io.LX_DXQUERYADAPTERINFO, bytes(q),
                (wire.Region(0x7000, 4, wire.REGION_IN | wire.REGION_OUT, b"abcd"),), (7,)),
                99), [efd]))
        for data, fds in frames:
            send_with_fds(raw.sock, data, fds)
        args = s.d3dkmt_enumadapters2(num_adapters=1, adapters=0x7000)
        raw.send(wire.encode(wire.IoctlRequest(io.LX_DXENUMADAPTERS2, bytes(args),
                                               (wire.Region(0x7000, 20, wire.REGION_OUT),)),
                             1))
        rets = []
        while True:
            f = None
            while (f := raw.dec.next_frame()) is None:
                raw.dec.feed(raw.sock.recv(65536))
            if f.seq == 1:
                break
            rets.append((f.seq, wire.decode(f).ret))
        out.append(rets)
    os.close(efd)
    return json.dumps(out)


@pytest.mark.skipif(not IS_ROOT, reason="needs two users")
def test_descriptors_only_with_fd_ioctls_and_bounded_per_connection_and_user(driver, node_dir):
    """The review's attack: every call held up to 16 descriptors for its whole life, with no
    bound (200 parked calls: 3200 descriptors, then accept failed for everyone)."""
    assert "LX_DXESCAPE" in node_server.FD_IOCTLS
    with SocketNode(driver, node_dir / "f.sock", max_fds=16, max_fds_per_uid=32) as n:
        from dxg.oslib.fds import open_fd_count

        before = open_fd_count()
        got = json.loads(in_child(lambda: _fd_rets(n.path), NOBODY))
        emfile, einval = -errno.EMFILE, -errno.EINVAL
        # per connection 16 (one escape's worth), per user 32 (two connections' worth); a
        # query never takes descriptors: -EINVAL, before anything is held
        assert got == [[[101, emfile], [99, einval]], [[111, emfile]], [[120, emfile],
                                                                          [121, emfile]]], got
        assert sorted(driver.escapes(NOBODY)) == [100, 110]
        driver.release_escapes()
        wait_until(lambda: n.connections() == [])
        wait_until(lambda: open_fd_count() <= before)
        assert n.rt.call(lambda: n.call_fds.total) == 0


HOG_REPLY = wire.MAX_PAYLOAD - 4096


def _hogs(path: Path, count: int) -> list[socket.socket]:
    """Connections that each ask for a ~4 MiB reply and never read it."""
    q = s.d3dkmt_queryadapterinfo(private_data=0x10000, private_data_size=HOG_REPLY)
    req = wire.IoctlRequest(io.LX_DXQUERYADAPTERINFO, bytes(q), (
        wire.Region(0x10000, HOG_REPLY, wire.REGION_IN | wire.REGION_OUT, bytes(HOG_REPLY)),))
    data = wire.encode(wire.Hello(), 1) + wire.encode(req, 2)
    socks = []
    for _ in range(count):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.connect(str(path))
        c.sendall(data)
        socks.append(c)
    return socks


def big_reply_ok(path: Path, size: int = HOG_REPLY) -> None:
    """A well-behaved client asks for a large reply, reads it, and gets it right."""
    raw = Raw(path)
    data = os.urandom(size)
    q = s.d3dkmt_queryadapterinfo(private_data=0x10000, private_data_size=size)
    reply = raw.ioctl(io.LX_DXQUERYADAPTERINFO, bytes(q),
                      [wire.Region(0x10000, size, wire.REGION_IN | wire.REGION_OUT, data)])
    assert isinstance(reply, wire.IoctlReply), reply
    assert reply.writes[0].data == data[::-1]
    raw.close()


def hog_calls(driver: FakeDriver, uid: int) -> int:
    with driver.cond:
        return len([p for p, code, _ in driver.calls
                    if code == io.LX_DXQUERYADAPTERINFO and p.uid == uid])


@pytest.mark.skipif(not IS_ROOT, reason="needs two users")
def test_one_user_cannot_fill_the_reply_pool(driver, node_dir):
    """The review's attack: 67 connections of one user with one unread 4 MiB reply each filled
    the node's pool, and an unrelated client asking for a 3 MiB reply was dropped. Now each
    user but root has a share of the pool (max(max_buffer, a quarter) = 9 MiB here)."""
    with SocketNode(driver, node_dir / "p.sock", max_total_buffer=32 << 20) as n:
        assert n.max_buffer_per_uid == n.max_buffer
        with held_in_child(lambda: _hogs(n.path, 8), NOBODY):
            wait_until(lambda: hog_calls(driver, NOBODY) == 8)
            n.rt.call(lambda: None)  # the last hog's reply is written by now
            assert n.rt.call(lambda: n.write_budget.used) <= n.max_buffer_per_uid
            assert len(n.connections()) < 8  # the biggest holders of that user went
            big_reply_ok(n.path)
            big_reply_ok(n.path)


@pytest.mark.skipif(not IS_ROOT, reason="needs three users")
def test_a_full_reply_pool_drops_the_biggest_holder_not_the_newcomer(driver, node_dir):
    with SocketNode(driver, node_dir / "e.sock", max_total_buffer=32 << 20,
                    max_buffer_per_uid=16 << 20) as n:
        with held_in_child(lambda: _hogs(n.path, 4), NOBODY), \
                held_in_child(lambda: _hogs(n.path, 4), NOBODY - 1):
            wait_until(lambda: hog_calls(driver, NOBODY) + hog_calls(driver, NOBODY - 1) == 8)
            n.rt.call(lambda: None)
            assert len(n.connections()) == 8  # each user within its share...
            assert n.rt.call(lambda: n.write_budget.used) > (32 << 20) - HOG_REPLY  # ...pool full
            big_reply_ok(n.path)  # room is made by dropping one hog, not this client
            wait_until(lambda: len(n.connections()) == 7)  # (this client gone too)
            assert {c["uid"] for c in n.connections()} == {NOBODY, NOBODY - 1}


def test_write_budget_shares_and_eviction():
    from dxg.vmbus.transport import WriteBudget

    dropped = []
    holders = {"a": 6, "b": 3, "me": 0}

    def evict(need, who):
        victim = max((k for k in holders if k != who), key=holders.get)
        if holders[victim] <= holders[who]:
            return False
        dropped.append(victim)
        pool.give(holders.pop(victim))
        return True

    pool = WriteBudget(10, evict=evict)
    share = WriteBudget(5, parent=pool)
    assert pool.take(9, "a")
    assert share.take(4, "me") is True and dropped == ["a"]  # the biggest holder went
    assert (share.used, pool.used) == (4, 7)
    assert not share.take(2, "me")  # past the share: no evict there, refused
    share.give(4)
    assert (share.used, pool.used) == (0, 3)
    assert WriteBudget(1).take(2) is False  # the host's use: no evict, plain refusal


def test_stale_socket_probe_treats_a_busy_server_as_alive(node_dir):
    """A live server whose backlog is full answers the probe with EAGAIN (or a timeout): that
    is somebody there, not a stale socket to unlink."""
    import asyncio as aio

    from dxg.vmbus.transport import Listener, TransportError

    path = node_dir / "busy.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(0)
    waiting = []
    try:
        while True:  # fill its backlog
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.setblocking(False)
            waiting.append(c)
            try:
                c.connect(str(path))
            except BlockingIOError:
                break
        loop = aio.new_event_loop()
        try:
            with pytest.raises(TransportError, match="in use"):
                Listener(loop, str(path), lambda sock, peer: None)
        finally:
            loop.close()
        assert path.exists()
    finally:
        for c in waiting:
            c.close()
        server.close()
    loop = aio.new_event_loop()  # nobody listens now: stale, replaced
    try:
        listener = Listener(loop, str(path), lambda sock, peer: None)
        listener.close()
    finally:
        loop.close()


def test_close_after_the_loop_is_gone_releases_everything(node_dir):
    from dxg.oslib.fds import open_fd_count

    drv = FakeDriver()
    before = open_fd_count()
    n = SocketNode(drv, node_dir / "late.sock")
    n.start()
    raw = Raw(n.path)
    enum_ok(raw)
    drv.rt.close()  # the driver's owner closed the loop first
    n.close()
    assert not (node_dir / "late.sock").exists()
    raw.close()
    assert open_fd_count() <= before


def test_uid_counter_and_process_name():
    from dxg.node.admission import UidCounter, process_name

    c = UidCounter(3)
    c.add(1000, 2)
    assert c.fits(1000) and not c.fits(1000, 2) and c.fits(0, 100)  # root: never refused
    c.add(0, 50)
    c.remove(1000, 2)
    assert c.users() == {0: 50} and c.total == 50
    assert process_name(os.getpid()) and process_name(0) == "" and process_name(-1) == ""


def test_a_client_that_hangs_up_while_its_reading_is_paused_is_seen_at_once(driver, node_dir):
    with SocketNode(driver, node_dir / "h.sock", max_calls=1, max_queued=1) as n:
        raw = Raw(n.path)
        raw.send(b"".join(escape(seq) for seq in (10, 11, 12)))  # 1 runs, 1 waits, 1 unread
        wait_until(lambda: conn_info(n)["queued"] == 1 and len(driver.parked) == 1)
        raw.close()
        wait_until(lambda: n.connections() == [])
        assert driver.wait(lambda: len(driver.closed) == 1)
        assert driver.parked[0].cancelled() and driver.escapes() == [10]


class FdGivingDriver(FakeDriver):
    """ESCAPE hands the caller an eventfd (as pydxg's FD_OUT escapes do), its number stored
    in the private data."""

    async def ioctl(self, proc, code, arg, mem):
        if code != io.LX_DXESCAPE:
            return await super().ioctl(proc, code, arg, mem)
        with self.cond:
            self.calls.append((proc, code, arg))
            self.cond.notify_all()
        e = s.d3dkmt_escape.from_buffer_copy(arg)
        mem.give_fd_to_user(os.eventfd(0), e.priv_drv_data, 8)
        return 0, arg


def test_reply_descriptors_that_cannot_be_kept_answer_emfile_and_leak_nothing(node_dir,
                                                                              monkeypatch):
    """The review's bug: the reply's descriptors were duplicated outside any try, so on EMFILE
    the call died unanswered and the copies already made leaked."""
    from dxg.oslib.fds import open_fd_count

    drv = FdGivingDriver()
    try:
        with SocketNode(drv, node_dir / "m.sock") as n:
            raw = Raw(n.path)
            raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            before = open_fd_count()
            real_dup = os.dup
            failing = threading.Event()

            def dup(fd):
                if failing.is_set() and threading.current_thread() is not threading.main_thread():
                    raise OSError(errno.EMFILE, "Too many open files")
                return real_dup(fd)

            monkeypatch.setattr(os, "dup", dup)
            failing.set()
            size = 600_000  # a reply that waits, so the next one's descriptor must be kept
            q = s.d3dkmt_queryadapterinfo(private_data=0x10000, private_data_size=size)
            raw.send(wire.encode(wire.IoctlRequest(io.LX_DXQUERYADAPTERINFO, bytes(q), (
                wire.Region(0x10000, size, wire.REGION_IN | wire.REGION_OUT, bytes(size)),)), 3)
                + escape(4))
            assert drv.wait(lambda: len(drv.calls) == 2)
            n.rt.call(lambda: None)
            failing.clear()
            got = replies(raw, 2)
            assert got[3].ret == NTSTATUS.STATUS_PENDING
            assert isinstance(got[4], wire.IoctlReply) and got[4].ret == -errno.EMFILE
            assert got[4].fixups == () and raw.dec.next_frame() is None
            assert open_fd_count() <= before
            enum_ok(raw)  # and the connection goes on
            raw.close()
    finally:
        drv.gate.set()
        drv.rt.close()


def test_calls_that_end_at_once_give_back_all_they_held(driver, node):
    """A bare call answered at once, one frame per read or many per read, leaves nothing held:
    no bytes or descriptors on its connection or its user, no task, no entry by seq."""
    raw = Raw(node.path)
    body = bytes(s.d3dkmt_openadapterfromluid())
    for _ in range(50):
        reply = raw.ioctl(io.LX_DXOPENADAPTERFROMLUID, body)
        assert isinstance(reply, wire.IoctlReply) and reply.ret == 0 and not reply.writes
    raw.send(b"".join(wire.encode(wire.IoctlRequest(io.LX_DXOPENADAPTERFROMLUID, body), seq)
                      for seq in range(100, 140)))
    got = replies(raw, 40)
    assert sorted(got) == list(range(100, 140))
    info = conn_info(node)
    assert info["held_bytes"] == 0 and info["held_fds"] == 0, info
    assert info["calls"] == 0 and info["queued"] == 0, info
    assert node.rt.call(lambda: (node.call_bytes.total, node.call_fds.total,
                                 node.call_bytes.users())) == (0, 0, {})
    (conn,) = node._conns
    assert node.rt.call(lambda: len(conn.calls)) == 0
    raw.close()
