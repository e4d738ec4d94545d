"""The client's node connections (sync and asyncio) against a fake wire-v2 node that lives in
this test: a real Unix socket, real threads, real descriptors. The fake answers when the test
says so, in any order, so each rule of the wire can be shown on its own: replies matched by seq,
one parked call parking only its caller, CANCEL on an interrupted wait, descriptors both ways,
ADMIN_REPLY chunks, fatal errors, fork. A small fake driver behind it lets the Pythonic API
(both flavors) and the diagnostic escapes run whole flows without the real stack."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import mmap
import os
import signal
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import wait_until
from dxg.client import (
    AsyncNode,
    AsyncNodeConnection,
    DxgError,
    Node,
    NodeConnection,
    NodeProtocolError,
    NodeUnavailable,
    diag,
    open_node,
    open_node_async,
    thunks,
)
from dxg.client.calls import Delivered, Failed, ReplyRouter, RouterBroken, apply_ioctl_reply
from dxg.oslib.fds import close_all, open_fd_count, recv_with_fds, send_with_fds
from dxg.uapi import ioctls as io
from dxg.uapi import structs as s
from dxg.uapi import wddm, wire
from dxg.uapi.escape import ESCAPE_HEADER, EscapeFlags, EscapeHeader
from dxg.uapi.escape import Op as EOp
from dxg.uapi.ntstatus import NTSTATUS

DEADLINE = 10.0
QAI = io.LX_DXQUERYADAPTERINFO
HOLD = 1000  # a QueryAdapterInfo whose ``type`` is >= HOLD is held until the test releases it


wait_for = wait_until  # polls with a deadline


# ---- the fake node --------------------------------------------------------------------------------


@dataclass
class Req:
    """One request the fake node received."""

    conn: FakeConn
    seq: int
    msg: wire.Message
    fds: list[int] = field(default_factory=list)

    @property
    def tag(self) -> int:
        """``type`` of a QueryAdapterInfo: the test's name for this call."""
        assert isinstance(self.msg, wire.IoctlRequest)
        return int(s.d3dkmt_queryadapterinfo.from_buffer_copy(self.msg.struct).type)

    def reply(self, msg: wire.Message, fds: tuple[int, ...] = ()) -> None:
        self.conn.send(wire.encode(msg, self.seq), fds)


class FakeConn:
    """One client connection on the fake node: a reader thread, sends from any thread."""

    def __init__(self, node: FakeNode, sock: socket.socket) -> None:
        self.node = node
        self.sock = sock
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def send(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        with self.lock:
            sent = send_with_fds(self.sock, data, fds)
            if sent < len(data):
                self.sock.sendall(data[sent:])

    def _serve(self) -> None:
        dec = wire.FrameDecoder()
        fifo: deque[int] = deque()
        buf = bytearray(65536)
        try:
            while True:
                data, fds = recv_with_fds(self.sock, buf, wire.MAX_FDS)
                if not data:
                    break
                fifo.extend(fds)
                dec.feed(data)
                for frame in dec.frames():
                    got = [fifo.popleft() for _ in range(frame.fd_count)]
                    self.node._received(self, frame, wire.decode(frame), got)
        except OSError:
            pass
        finally:
            close_all(fifo)
            self.sock.close()


class FakeNode:
    """A wire-v2 node in threads. ``serve(req)`` answers (or holds) each IOCTL/ADMIN; HELLO and
    CANCEL are handled here (CANCEL of a held request answers it with -EINTR)."""

    def __init__(self, path: Path, serve: Callable[[Req], None] | None = None,
                 name: str = "fake") -> None:
        self.path = str(path)
        self.serve = serve or self.echo
        self.name = name
        self.cond = threading.Condition()
        self.requests: list[Req] = []
        self.cancels: list[int] = []
        self.held: dict[tuple[int, int], Req] = {}
        self.conns: list[FakeConn] = []
        self.on_request: Callable[[Req], None] | None = None
        self.answer_cancels = True  # a CANCEL of a held call answers it with -EINTR
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(16)
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self.cond:
                self.conns.append(FakeConn(self, sock))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.sock.shutdown(socket.SHUT_RDWR)
            c.sock.close()
        for req in self.held.values():
            close_all(req.fds)

    def _received(self, conn: FakeConn, frame: wire.Frame, msg: wire.Message,
                  fds: list[int]) -> None:
        if isinstance(msg, wire.Hello):
            conn.send(wire.encode(wire.HelloReply(wire.MAX_WIRE_VERSION, node_name=self.name, max_fds=8), frame.seq))
            return
        if isinstance(msg, wire.Cancel):
            with self.cond:
                self.cancels.append(frame.seq)
                req = self.held.pop((id(conn), frame.seq), None) if self.answer_cancels else None
                self.cond.notify_all()
            if req is not None:
                close_all(req.fds)
                req.reply(wire.IoctlReply(-errno.EINTR, req.msg.struct))
            return
        req = Req(conn, frame.seq, msg, fds)
        with self.cond:
            self.requests.append(req)
            self.cond.notify_all()
        if self.on_request is not None:
            self.on_request(req)
        try:
            self.serve(req)
        except Exception as e:  # the test's client gets the fake's failure, instead of a hang
            req.reply(wire.ErrorReply(errno.EIO, f"fake node: {type(e).__name__}: {e}"))

    # -- helpers for tests --

    def hold(self, req: Req) -> None:
        with self.cond:
            self.held[(id(req.conn), req.seq)] = req
            self.cond.notify_all()

    def wait_held(self, n: int) -> list[Req]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.held) >= n, DEADLINE), "not held"
            return list(self.held.values())

    def take_held(self, tag: int) -> Req:
        with self.cond:
            assert self.cond.wait_for(lambda: any(r.tag == tag for r in self.held.values()),
                                      DEADLINE), f"tag {tag} not held"
            key = next(k for k, r in self.held.items() if r.tag == tag)
            return self.held.pop(key)

    def wait_cancel(self, seq: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: seq in self.cancels, DEADLINE), "no CANCEL"

    @staticmethod
    def answer(req: Req, extra: bytes = b"") -> wire.IoctlReply:
        """QueryAdapterInfo's fake answer: ret = the tag, the buffer reversed (+ extra)."""
        msg = req.msg
        assert isinstance(msg, wire.IoctlRequest)
        writes = tuple(wire.Write(r.addr, (r.data or b"")[::-1] + extra)
                       for r in msg.regions if r.writable and r.data)
        return wire.IoctlReply(req.tag, msg.struct, writes)

    def echo(self, req: Req) -> None:
        msg = req.msg
        if isinstance(msg, wire.AdminRequest):
            chunk = int(msg.request.get("chunk", wire.MAX_PAYLOAD))
            reply = {"echo": msg.request, "pad": "x" * int(msg.request.get("pad", 0))}
            req.conn.send(b"".join(wire.admin_reply_frames(reply, req.seq, chunk)))
            return
        assert isinstance(msg, wire.IoctlRequest)
        close_all(req.fds)
        if msg.code == QAI and req.tag >= HOLD:
            self.hold(req)
            return
        if msg.code == QAI:
            req.reply(self.answer(req))
        else:
            req.reply(wire.IoctlReply(0, msg.struct))


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeNode]:
    node = FakeNode(tmp_path / "fake.sock")
    try:
        yield node
    finally:
        node.close()


def qai(tag: int, data: bytes = b"") -> tuple[s.d3dkmt_queryadapterinfo, Any]:
    """A QueryAdapterInfo tagged ``tag`` whose private data holds ``data``."""
    buf = ctypes.create_string_buffer(data, len(data)) if data else None
    args = s.d3dkmt_queryadapterinfo(type=tag)
    if buf is not None:
        args.private_data = ctypes.addressof(buf)
        args.private_data_size = len(data)
    return args, buf


# ---- sync connection ------------------------------------------------------------------------------


def test_hello_and_a_round_trip_apply_writes_and_struct(fake):
    with NodeConnection(fake.path) as conn:
        assert (conn.version, conn.node_name, conn.max_fds) == (wire.MAX_WIRE_VERSION, "fake", 8)
        args, buf = qai(7, b"abcdef")
        threads_before = threading.active_count()
        assert conn.ioctl(QAI, args) == 7
        assert threading.active_count() == threads_before  # no reader thread: the caller reads
        assert buf.raw == b"fedcba"
        assert args.private_data_size == 6
    assert conn.closed


def test_replies_out_of_order_reach_their_threads(fake):
    conn = NodeConnection(fake.path)
    results: dict[int, tuple[int, bytes]] = {}

    def worker(i: int) -> None:
        args, buf = qai(HOLD + i, bytes([i]) * 3 + b"xyz")
        results[i] = (conn.ioctl(QAI, args), buf.raw)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    held = fake.wait_held(8)
    for req in sorted(held, key=lambda r: -r.tag):  # the last asked is answered first
        fake.held.pop((id(req.conn), req.seq))
        req.reply(fake.answer(req))
    for t in threads:
        t.join(DEADLINE)
    assert results == {i: (HOLD + i, b"zyx" + bytes([i]) * 3) for i in range(8)}
    conn.close()


def test_a_parked_call_does_not_stall_the_others(fake):
    conn = NodeConnection(fake.path)
    parked: dict[str, int] = {}
    t0 = threading.Thread(target=lambda: parked.update(ret=conn.ioctl(QAI, qai(HOLD)[0])))
    t0.start()
    fake.wait_held(1)  # t0 is alone: it is the reader now, blocked in the stream

    done = []

    def worker(i: int) -> None:
        for n in range(20):
            args, buf = qai(i, b"%d-%d" % (i, n))
            assert conn.ioctl(QAI, args) == i
            assert buf.raw == (b"%d-%d" % (i, n))[::-1]
        done.append(i)

    others = [threading.Thread(target=worker, args=(i,)) for i in range(1, 8)]
    for t in others:
        t.start()
    for t in others:
        t.join(DEADLINE)
    assert sorted(done) == list(range(1, 8))
    assert "ret" not in parked and t0.is_alive()
    req = fake.take_held(HOLD)
    req.reply(fake.answer(req))
    t0.join(DEADLINE)
    assert parked == {"ret": HOLD}
    conn.close()


@contextlib.contextmanager
def interrupt_main_on(fake: FakeNode, tag: int) -> Iterator[None]:
    """Raise KeyboardInterrupt in the main thread (from a signal handler, as Ctrl-C does) once
    the fake node has received the request tagged ``tag``."""
    main = threading.main_thread().ident

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    def on_request(req: Req) -> None:
        if isinstance(req.msg, wire.IoctlRequest) and req.msg.code == QAI and req.tag == tag:
            signal.pthread_kill(main, signal.SIGUSR1)

    old = signal.signal(signal.SIGUSR1, handler)
    fake.on_request = on_request
    try:
        yield
    finally:
        fake.on_request = None
        signal.signal(signal.SIGUSR1, old)


def test_interrupted_reader_sends_cancel_and_the_connection_goes_on(fake):
    conn = NodeConnection(fake.path)
    before = open_fd_count()
    fake.answer_cancels = False
    with interrupt_main_on(fake, HOLD + 1), pytest.raises(KeyboardInterrupt):
        conn.ioctl(QAI, qai(HOLD + 1)[0])
    req = fake.take_held(HOLD + 1)
    fake.wait_cancel(req.seq)
    # the late reply (with a descriptor) to the request given up on: dropped, the fd closed
    late = os.eventfd(0)
    req.reply(wire.IoctlReply(0, req.msg.struct, (), (wire.FdFixup(wire.FD_IN_STRUCT, 0, 4),)),
              (late,))
    os.close(late)
    args, buf = qai(5, b"ok")
    assert conn.ioctl(QAI, args) == 5 and buf.raw == b"ko"
    wait_for(lambda: open_fd_count() == before, what="the late descriptor closed")
    assert not conn.closed
    conn.close()


def test_interrupted_follower_leaves_the_reader_alone(fake):
    conn = NodeConnection(fake.path)
    got: dict[str, int] = {}
    reader = threading.Thread(target=lambda: got.update(ret=conn.ioctl(QAI, qai(HOLD)[0])))
    reader.start()
    fake.wait_held(1)
    with interrupt_main_on(fake, HOLD + 2), pytest.raises(KeyboardInterrupt):
        conn.ioctl(QAI, qai(HOLD + 2)[0])
    (req,) = [r for r in fake.requests if r.tag == HOLD + 2]
    fake.wait_cancel(req.seq)
    first = fake.take_held(HOLD)
    first.reply(fake.answer(first))
    reader.join(DEADLINE)
    assert got == {"ret": HOLD}
    assert conn.ioctl(QAI, qai(3)[0]) == 3
    conn.close()


def test_descriptors_both_ways(fake):
    """The caller hands an eventfd over (its number in the struct's buffer); the driver hands a
    memfd back (its number stored at a user address) and a sync file (stored in the struct)."""

    def serve(req: Req) -> None:
        msg = req.msg
        if not isinstance(msg, wire.IoctlRequest):
            return fake.echo(req)
        if msg.code == io.LX_DXESCAPE:
            (region,) = msg.regions
            number = struct.unpack_from("<q", region.data, 16)[0]
            (theirs,) = req.fds
            assert msg.fd_numbers == (number,)
            assert os.readlink(f"/proc/self/fd/{theirs}") == "anon_inode:[eventfd]"
            os.eventfd_write(theirs, 5)
            os.close(theirs)
            mem = os.memfd_create("fake-region")
            os.write(mem, b"from the driver")
            fixup = wire.FdFixup(wire.FD_IN_USER, region.addr + 16, 8)
            req.reply(wire.IoctlReply(0, msg.struct, (), (fixup,)), (mem,))
            os.close(mem)
        elif msg.code == io.LX_DXCREATESYNCFILE:
            efd = os.eventfd(9)
            fixup = wire.FdFixup(wire.FD_IN_STRUCT, s.d3dkmt_createsyncfile.sync_file_handle.offset,
                                 8)
            req.reply(wire.IoctlReply(0, msg.struct, (), (fixup,)), (efd,))
            os.close(efd)
        else:
            fake.echo(req)

    fake.serve = serve
    conn = NodeConnection(fake.path)
    mine = os.eventfd(0, os.EFD_NONBLOCK)
    priv = ctypes.create_string_buffer(struct.pack("<16xq8x", mine), 32)
    args = s.d3dkmt_escape(priv_drv_data=ctypes.addressof(priv), priv_drv_data_size=32)
    assert conn.ioctl(io.LX_DXESCAPE, args, fds=(mine,)) == 0
    assert os.eventfd_read(mine) == 5
    got = struct.unpack_from("<q", priv.raw, 16)[0]
    assert got not in (mine, -1)
    assert os.pread(got, 64, 0) == b"from the driver"
    os.close(got)
    sf = s.d3dkmt_createsyncfile()
    assert conn.ioctl(io.LX_DXCREATESYNCFILE, sf) == 0
    assert os.eventfd_read(int(sf.sync_file_handle)) == 9
    os.close(int(sf.sync_file_handle))
    os.close(mine)
    with pytest.raises(OSError) as ei:
        conn.ioctl(io.LX_DXESCAPE, args, fds=(mine,))  # closed: refused before anything is sent
    assert ei.value.errno == errno.EBADF
    with pytest.raises(ValueError):
        conn.ioctl(io.LX_DXESCAPE, args, fds=tuple(range(9)))  # more than the node's max_fds
    assert conn.ioctl(QAI, qai(4)[0]) == 4
    conn.close()


def test_admin_reply_in_chunks_with_ioctl_replies_between(fake):
    def serve(req: Req) -> None:
        if isinstance(req.msg, wire.AdminRequest):
            frames = wire.admin_reply_frames({"big": "y" * 50_000}, req.seq, 7_000)
            assert len(frames) > 5
            hold = fake.take_held(HOLD)
            for i, f in enumerate(frames):
                req.conn.send(f)
                if i == 2:  # another request's reply between two chunks
                    hold.reply(fake.answer(hold))
            return
        fake.echo(req)

    fake.serve = serve
    conn = NodeConnection(fake.path)
    got: dict[str, int] = {}
    t = threading.Thread(target=lambda: got.update(ret=conn.ioctl(QAI, qai(HOLD)[0])))
    t.start()
    fake.wait_held(1)
    assert conn.admin({"op": "big"}) == {"big": "y" * 50_000}
    t.join(DEADLINE)
    assert got == {"ret": HOLD}
    conn.close()


def held_calls(conn: NodeConnection, n: int,
               first: int = 0) -> tuple[list[threading.Thread], list[BaseException]]:
    """``n`` threads, each in a call the fake node holds (tags ``HOLD + first`` on); what each
    raises lands in the list."""
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            conn.ioctl(QAI, qai(HOLD + i)[0])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(first, first + n)]
    for t in threads:
        t.start()
    return threads, errors


def test_fatal_error_fails_every_waiter_and_drops_the_connection(fake):
    conn = NodeConnection(fake.path)
    threads, errors = held_calls(conn, 4)
    held = fake.wait_held(4)
    held[0].conn.send(wire.encode(wire.ErrorReply(errno.EPROTO, "node going down", True), 0))
    for t in threads:
        t.join(DEADLINE)
    assert len(errors) == 4
    assert all(isinstance(e, NodeProtocolError) and e.errno == errno.EPROTO for e in errors)
    assert all("node going down" in str(e) for e in errors)
    assert len({id(e) for e in errors}) == 4  # one exception object per thread
    assert conn.closed
    with pytest.raises(NodeUnavailable):
        conn.ioctl(QAI, qai(1)[0])


def test_non_fatal_error_goes_to_its_waiter_only(fake):
    def serve(req: Req) -> None:
        if isinstance(req.msg, wire.IoctlRequest) and req.tag == 66:
            req.reply(wire.ErrorReply(errno.EINVAL, "bad request"))
        else:
            fake.echo(req)

    fake.serve = serve
    conn = NodeConnection(fake.path)
    with pytest.raises(NodeProtocolError) as ei:
        conn.ioctl(QAI, qai(66)[0])
    assert ei.value.errno == errno.EINVAL
    assert conn.ioctl(QAI, qai(2)[0]) == 2
    conn.close()


@pytest.mark.parametrize("bad", ["unknown seq", "fd claimed but absent", "fd not claimed",
                                 "wrong kind", "garbage"])
def test_protocol_violations_drop_the_connection(fake, bad):
    def serve(req: Req) -> None:
        if not (isinstance(req.msg, wire.IoctlRequest) and req.tag == 77):
            return fake.echo(req)
        msg = req.msg
        if bad == "unknown seq":
            req.conn.send(wire.encode(wire.IoctlReply(0, msg.struct), req.seq + 1000))
        elif bad == "fd claimed but absent":
            fix = (wire.FdFixup(wire.FD_IN_STRUCT, 0, 4),)
            req.conn.send(wire.encode(wire.IoctlReply(0, msg.struct, (), fix), req.seq))
        elif bad == "fd not claimed":
            efd = os.eventfd(0)
            req.conn.send(wire.encode(wire.IoctlReply(0, msg.struct), req.seq), (efd,))
            os.close(efd)
            req.conn.send(wire.encode(wire.IoctlReply(0, msg.struct), 999))
        elif bad == "wrong kind":
            req.conn.send(wire.encode(wire.Hello(), req.seq))
        else:
            req.conn.send(b"\x00" * 32)

    fake.serve = serve
    before = open_fd_count()
    conn = NodeConnection(fake.path)
    with pytest.raises(NodeProtocolError):
        conn.ioctl(QAI, qai(77)[0])
    assert conn.closed
    wait_for(lambda: open_fd_count() == before, what="descriptors closed")


def test_lost_node_and_close_wake_every_waiter(fake):
    conn = NodeConnection(fake.path)
    threads, errors = held_calls(conn, 3)
    fake.wait_held(3)
    conn.close()  # a reader is blocked in recv: close must wake it
    for t in threads:
        t.join(DEADLINE)
    assert len(errors) == 3 and all(isinstance(e, NodeUnavailable) for e in errors)

    conn = NodeConnection(fake.path)
    (t,), errors = held_calls(conn, 1, first=9)
    (req,) = [r for r in fake.wait_held(4) if r.tag == HOLD + 9]
    req.conn.sock.shutdown(socket.SHUT_RDWR)  # the node goes away
    t.join(DEADLINE)
    assert isinstance(errors[-1], NodeUnavailable) and "lost" in str(errors[-1])
    assert conn.closed
    conn.reopen()
    assert conn.ioctl(QAI, qai(8)[0]) == 8
    conn.close()


def test_forked_child_gets_enotty_then_reopens(fake):
    conn = NodeConnection(fake.path)
    assert conn.ioctl(QAI, qai(1)[0]) == 1
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(r)
            first = conn.ioctl(QAI, qai(2)[0])
            conn.reopen()
            args, buf = qai(3, b"child")
            second = conn.ioctl(QAI, args)
            os.write(w, json.dumps([first, second, buf.raw.decode()]).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        report = json.loads(f.read() or b"null")
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert report == [-errno.ENOTTY, 3, "dlihc"]
    assert conn.ioctl(QAI, qai(4)[0]) == 4  # the parent's stream was not touched
    conn.close()


# ---- asyncio connection ---------------------------------------------------------------------------


def test_async_out_of_order_and_a_parked_task(fake):
    async def main() -> None:
        async with await AsyncNodeConnection.open(fake.path) as conn:
            assert conn.node_name == "fake"

            async def call(tag: int, data: bytes) -> tuple[int, bytes]:
                args, buf = qai(tag, data)
                return await conn.ioctl(QAI, args), buf.raw

            parked = asyncio.ensure_future(call(HOLD + 99, b"p"))
            tasks = [asyncio.ensure_future(call(HOLD + i, b"t%d" % i)) for i in range(8)]
            await asyncio.to_thread(fake.wait_held, 9)
            for req in sorted(fake.held.values(), key=lambda r: -r.tag):
                if req.tag != HOLD + 99:
                    fake.held.pop((id(req.conn), req.seq))
                    req.reply(fake.answer(req))
            assert await asyncio.gather(*tasks) == [(HOLD + i, b"%dt" % i) for i in range(8)]
            others = await asyncio.gather(*(call(i, b"q") for i in range(1, 20)))
            assert others == [(i, b"q") for i in range(1, 20)]
            assert not parked.done()
            req = fake.take_held(HOLD + 99)
            req.reply(fake.answer(req))
            assert await parked == (HOLD + 99, b"p")
        assert conn.closed

    asyncio.run(main())
    asyncio.run(main())  # a second loop: nothing is tied to the first


def test_async_cancelled_task_sends_cancel(fake):
    async def main() -> None:
        conn = await AsyncNodeConnection.open(fake.path)
        task = asyncio.ensure_future(conn.ioctl(QAI, qai(HOLD + 1)[0]))
        (req,) = await asyncio.to_thread(fake.wait_held, 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.to_thread(fake.wait_cancel, req.seq)
        args, buf = qai(6, b"after")
        assert await conn.ioctl(QAI, args) == 6 and buf.raw == b"retfa"
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(conn.ioctl(QAI, qai(HOLD + 2)[0]), 0.05)
        (req2,) = [r for r in fake.requests if r.tag == HOLD + 2]
        await asyncio.to_thread(fake.wait_cancel, req2.seq)
        assert await conn.ioctl(QAI, qai(7)[0]) == 7
        await conn.aclose()

    asyncio.run(main())


def test_async_descriptors_admin_chunks_and_fatal_error(fake):
    def serve(req: Req) -> None:
        msg = req.msg
        if isinstance(msg, wire.IoctlRequest) and msg.code == io.LX_DXCREATESYNCFILE:
            (theirs,) = req.fds
            os.eventfd_write(theirs, 2)
            os.close(theirs)
            efd = os.eventfd(11)
            fixup = wire.FdFixup(wire.FD_IN_STRUCT, s.d3dkmt_createsyncfile.sync_file_handle.offset,
                                 4)
            req.reply(wire.IoctlReply(0, msg.struct, (), (fixup,)), (efd,))
            os.close(efd)
        else:
            fake.echo(req)

    fake.serve = serve

    async def main() -> None:
        conn = await AsyncNodeConnection.open(fake.path)
        mine = os.eventfd(0)
        sf = s.d3dkmt_createsyncfile(sync_file_handle=mine)
        assert await conn.ioctl(io.LX_DXCREATESYNCFILE, sf, fds=(mine,)) == 0
        assert os.eventfd_read(mine) == 2
        got = int(sf.sync_file_handle) & 0xFFFFFFFF
        assert os.eventfd_read(got) == 11
        close_all((mine, got))
        reply = await conn.admin({"op": "x", "pad": 30_000, "chunk": 4096})
        assert reply == {"echo": {"op": "x", "pad": 30_000, "chunk": 4096}, "pad": "x" * 30_000}
        tasks = [asyncio.ensure_future(conn.ioctl(QAI, qai(HOLD + i)[0])) for i in range(3)]
        held = await asyncio.to_thread(fake.wait_held, 3)
        held[0].conn.send(wire.encode(wire.ErrorReply(errno.ENOMEM, "out of memory", True), 0))
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, NodeProtocolError) and r.errno == errno.ENOMEM
                   for r in results)
        assert conn.closed
        with pytest.raises(NodeUnavailable):
            await conn.ioctl(QAI, qai(1)[0])

    asyncio.run(main())


def test_async_not_found_and_refused(tmp_path):
    async def main() -> None:
        from dxg.client import NodeNotFound

        with pytest.raises(NodeNotFound):
            await AsyncNodeConnection.open(tmp_path / "nope.sock")
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(tmp_path / "stale.sock"))
        stale.close()
        with pytest.raises(NodeUnavailable):
            await AsyncNodeConnection.open(tmp_path / "stale.sock")

    asyncio.run(main())


# ---- sans-I/O pieces ------------------------------------------------------------------------------


def test_router_matches_seqs_and_keeps_descriptors_with_their_frames():
    r = ReplyRouter()
    a = r.register(wire.Kind.IOCTL_REPLY)
    b = r.register(wire.Kind.ADMIN_REPLY)
    c = r.register(wire.Kind.IOCTL_REPLY)
    efd = os.eventfd(0)
    fix = (wire.FdFixup(wire.FD_IN_STRUCT, 0, 4),)
    to_c = wire.encode(wire.IoctlReply(3, b"cccc", (), fix), c)
    to_a = wire.encode(wire.IoctlReply(1, b"aaaa"), a)
    chunks = wire.admin_reply_frames({"k": "v" * 100}, b, 30)
    out = r.feed(to_a[:10])
    assert out == []
    out = r.feed(to_a[10:] + chunks[0])
    assert [o.seq for o in out] == [a]
    out = r.feed(to_c, [efd])  # descriptors on the frame's first byte
    assert len(out) == 1 and isinstance(out[0], Delivered) and out[0].fds == [efd]
    out = r.feed(b"".join(chunks[1:]))
    assert isinstance(out[0], Delivered) and out[0].message == wire.AdminReply({"k": "v" * 100})
    assert r.in_flight == 0
    os.close(efd)


def test_router_drops_abandoned_replies_and_refuses_strangers():
    r = ReplyRouter()
    a = r.register(wire.Kind.IOCTL_REPLY)
    assert r.abandon(a) and not r.abandon(a)
    efd = os.eventfd(0)
    fix = (wire.FdFixup(wire.FD_IN_STRUCT, 0, 4),)
    assert r.feed(wire.encode(wire.IoctlReply(-errno.EINTR, b"xxxx", (), fix), a), [efd]) == []
    with pytest.raises(OSError):
        os.fstat(efd)  # closed by the router
    assert a not in r.abandoned
    with pytest.raises(RouterBroken) as ei:
        r.feed(wire.encode(wire.IoctlReply(0, b""), a))  # answered already: a stranger now
    assert isinstance(ei.value.failure(), NodeProtocolError)


def test_router_non_fatal_error_and_wrong_kind_fail_one_request():
    r = ReplyRouter()
    a = r.register(wire.Kind.IOCTL_REPLY)
    b = r.register(wire.Kind.ADMIN_REPLY)
    out = r.feed(wire.encode(wire.ErrorReply(errno.EINVAL, "nope"), a) +
                 wire.encode(wire.IoctlReply(0, b""), b))
    assert [type(o) for o in out] == [Failed, Failed]
    e = out[0].failure()
    assert isinstance(e, NodeProtocolError) and e.errno == errno.EINVAL and "nope" in str(e)


def test_router_fd_batches_must_line_up():
    r = ReplyRouter()
    a = r.register(wire.Kind.IOCTL_REPLY)
    efd = os.eventfd(0)
    with pytest.raises(RouterBroken):  # two descriptors arrive, the frame names one
        other = os.eventfd(0)
        fix = (wire.FdFixup(wire.FD_IN_STRUCT, 0, 4),)
        r.feed(wire.encode(wire.IoctlReply(0, b"xxxx", (), fix), a), [efd, other])
    for fd in (efd, other):
        with pytest.raises(OSError):
            os.fstat(fd)
    assert r.broken


def test_apply_reply_checks_everything_before_touching_memory():
    buf = ctypes.create_string_buffer(b"12345678", 8)
    addr = ctypes.addressof(buf)
    args = s.d3dkmt_queryadapterinfo(private_data=addr, private_data_size=8)
    req = wire.IoctlRequest(QAI, bytes(args), (wire.Region(addr, 8, wire.REGION_IN, b"12345678"),))
    written: list[tuple[int, bytes]] = []

    def write(a: int, d: bytes) -> bool:
        written.append((a, d))
        return True

    efd = os.eventfd(0)
    bad = wire.IoctlReply(0, bytes(args), (wire.Write(addr, b"zz"),))  # region not writable
    with pytest.raises(NodeProtocolError):
        apply_ioctl_reply(req, bad, [], args, write)
    outside = wire.IoctlReply(0, bytes(args), (), (wire.FdFixup(wire.FD_IN_USER, addr, 8),))
    with pytest.raises(NodeProtocolError):
        apply_ioctl_reply(req, outside, [efd], args, write)
    with pytest.raises(OSError):
        os.fstat(efd)  # a refused reply's descriptors are closed
    assert written == []
    out_req = wire.IoctlRequest(QAI, bytes(args), (wire.Region(addr, 8, wire.REGION_OUT),))
    efd = os.eventfd(0)
    fixups = (wire.FdFixup(wire.FD_IN_USER, addr, 8),)
    assert apply_ioctl_reply(out_req, wire.IoctlReply(5, bytes(args), (), fixups), [efd], args,
                             write) == 5
    assert written == [(addr, efd.to_bytes(8, "little"))]
    refused = apply_ioctl_reply(out_req, wire.IoctlReply(0, bytes(args), (), fixups),
                                [os.eventfd(0)], args, lambda a, d: False)
    assert refused == -errno.EFAULT  # the number could not be stored: that descriptor is closed
    os.close(efd)


def test_router_one_whole_frame_per_read_routes_as_split_reads_do():
    def replies(r: ReplyRouter) -> list[bytes]:
        a = r.register(wire.Kind.IOCTL_REPLY)
        b = r.register(wire.Kind.ADMIN_REPLY)
        c = r.register(wire.Kind.IOCTL_REPLY)
        d = r.register(wire.Kind.IOCTL_REPLY)
        assert r.abandon(d)
        return [wire.encode(wire.IoctlReply(1, b"aaaa"), a),
                wire.encode(wire.IoctlReply(0, b""), b),  # the wrong kind: fails b alone
                wire.encode(wire.ErrorReply(errno.EPERM, "no"), c),
                wire.encode(wire.IoctlReply(2, b"dddd"), d)]  # abandoned: dropped

    def summary(outs: list[Delivered | Failed]) -> list[tuple]:
        return [(o.seq, o.message, o.fds) if isinstance(o, Delivered)
                else (o.seq, type(o.failure()), str(o.failure())) for o in outs]

    whole, split = ReplyRouter(), ReplyRouter()
    got_whole = [o for data in replies(whole) for o in whole.feed(data)]
    got_split = []
    for data in replies(split):
        got_split += split.feed(data[:5]) + split.feed(data[5:])
    assert summary(got_whole) == summary(got_split) and len(got_whole) == 3
    assert whole.in_flight == split.in_flight == 0 and not whole.abandoned
    r = ReplyRouter()
    a = r.register(wire.Kind.IOCTL_REPLY)
    with pytest.raises(RouterBroken) as ei:
        r.feed(wire.encode(wire.IoctlReply(0, b""), a + 1))  # a stranger
    assert "not in flight" in str(ei.value.failure()) and r.broken
    r = ReplyRouter()
    a = r.register(wire.Kind.IOCTL_REPLY)
    fix = (wire.FdFixup(wire.FD_IN_STRUCT, 0, 4),)
    with pytest.raises(RouterBroken) as ei:
        r.feed(wire.encode(wire.IoctlReply(0, b"xxxx", (), fix), a))  # its descriptor is missing
    assert "did not arrive" in str(ei.value.failure()) and r.broken
    with pytest.raises(RouterBroken):
        r.feed(wire.encode(wire.IoctlReply(0, b"xxxx"), a))


def test_apply_bare_reply_copies_the_struct_of_a_union_or_a_struct():
    class Both(ctypes.Union):
        _fields_ = (("n", ctypes.c_uint32), ("b", ctypes.c_uint8 * 6))

    for args in (s.d3dkmt_enumadapters3(adapter_count=3), wddm.D3DKMT_ADAPTERTYPE(), Both(7)):
        req = wire.IoctlRequest(QAI, bytes(args))
        new = bytes(range(1, len(req.struct) + 1))
        assert apply_ioctl_reply(req, wire.IoctlReply(-errno.EINTR, new), [], args,
                                 lambda a, d: False) == -errno.EINTR
        assert bytes(args) == new
        with pytest.raises(NodeProtocolError, match="struct size"):
            apply_ioctl_reply(req, wire.IoctlReply(0, new + b"x"), [], args, lambda a, d: False)
        with pytest.raises(NodeProtocolError, match="wrongly"):
            apply_ioctl_reply(req, wire.AdminReply({}), [], args, lambda a, d: False)
        assert bytes(args) == new


# ---- a fake driver: the Pythonic API and the diagnostic escapes -----------------------------------


class FakeMem:
    """The regions of one request, as the driver sees them; collects the writes."""

    def __init__(self, regions: tuple[wire.Region, ...]) -> None:
        self.regions = [(r, bytearray(r.data or bytes(r.length))) for r in regions]
        self.dirty: dict[int, tuple[int, int]] = {}

    def _find(self, addr: int, n: int) -> tuple[int, wire.Region, bytearray]:
        for i, (r, b) in enumerate(self.regions):
            if r.addr <= addr and addr + n <= r.end:
                return i, r, b
        raise AssertionError(f"0x{addr:x}+{n} not sent")

    def read(self, addr: int, n: int) -> bytes:
        _, r, b = self._find(addr, n)
        return bytes(b[addr - r.addr : addr - r.addr + n])

    def write(self, addr: int, data: bytes) -> None:
        i, r, b = self._find(addr, len(data))
        assert r.writable
        b[addr - r.addr : addr - r.addr + len(data)] = data
        lo, hi = self.dirty.get(i, (addr, addr + len(data)))
        self.dirty[i] = (min(lo, addr), max(hi, addr + len(data)))

    def writes(self) -> tuple[wire.Write, ...]:
        out = []
        for i, (lo, hi) in sorted(self.dirty.items()):
            r, b = self.regions[i]
            out.append(wire.Write(lo, bytes(b[lo - r.addr : hi - r.addr])))
        return tuple(out)


class FakeDriver:
    """Just enough of the driver for the API: two adapters, devices, contexts, pydxg escapes."""

    LUIDS = (0x1_0000_0010, 0x1_0000_0020)

    def __init__(self, node: FakeNode) -> None:
        self.node = node
        self.next = 0x40000000
        self.adapters: dict[int, int] = {}  # handle -> luid
        self.devices: dict[int, int] = {}  # handle -> adapter handle
        self.contexts: dict[int, int] = {}  # handle -> device handle
        self.shm: dict[int, int] = {}  # region -> memfd
        self.lock = threading.Lock()

    def handle(self) -> int:
        self.next += 0x40
        return self.next

    def __call__(self, req: Req) -> None:
        msg = req.msg
        if not isinstance(msg, wire.IoctlRequest):
            return self.node.echo(req)
        name = io.IOCTLS_BY_CODE[msg.code].name
        args = io.IOCTLS_BY_CODE[msg.code].struct.from_buffer_copy(msg.struct)
        mem = FakeMem(msg.regions)
        fds: list[int] = []
        fixups: list[wire.FdFixup] = []
        try:
            with self.lock:
                ret = getattr(self, name.lower())(args, mem, req, fds, fixups)
        finally:
            close_all(req.fds)
        if ret is None:
            return  # held
        req.reply(wire.IoctlReply(ret, bytes(args), mem.writes(), tuple(fixups)), tuple(fds))
        close_all(fds)

    def lx_dxenumadapters3(self, a, mem, req, fds, fixups):
        if not a.filter.include_compute_only:
            a.adapter_count = 0
            return 0
        if a.adapters == 0:
            a.adapter_count = len(self.LUIDS)
            return 0
        if a.adapter_count < len(self.LUIDS):
            a.adapter_count = len(self.LUIDS)
            return NTSTATUS.STATUS_BUFFER_TOO_SMALL
        infos = (s.d3dkmt_adapterinfo * len(self.LUIDS))()
        for i, luid in enumerate(self.LUIDS):
            h = self.handle()
            self.adapters[h] = luid
            infos[i].adapter_handle.v = h
            infos[i].adapter_luid.a, infos[i].adapter_luid.b = luid & 0xFFFFFFFF, luid >> 32
        mem.write(a.adapters, bytes(infos))
        a.adapter_count = len(self.LUIDS)
        return 0

    def lx_dxopenadapterfromluid(self, a, mem, req, fds, fixups):
        luid = (a.adapter_luid.b << 32) | a.adapter_luid.a
        if luid not in self.LUIDS:
            return -errno.EINVAL
        h = self.handle()
        self.adapters[h] = luid
        a.adapter_handle.v = h
        return 0

    def lx_dxqueryadapterinfo(self, a, mem, req, fds, fixups):
        if a.adapter.v not in self.adapters:
            return -errno.EINVAL
        qai_ = wddm.KMTQUERYADAPTERINFOTYPE
        if a.type == qai_.KMTQAITYPE_DRIVER_DESCRIPTION:
            text = f"fake adapter {self.adapters[a.adapter.v]:x}".encode("utf-16-le")
            mem.write(a.private_data, text + b"\0\0")
        elif a.type == qai_.KMTQAITYPE_ADAPTERTYPE:
            t = wddm.D3DKMT_ADAPTERTYPE()
            t.Paravirtualized = t.ComputeOnly = 1
            mem.write(a.private_data, bytes(t))
        elif a.type == qai_.KMTQAITYPE_PHYSICALADAPTERDEVICEIDS:
            q = wddm.D3DKMT_QUERY_DEVICE_IDS()
            q.DeviceIds.VendorID, q.DeviceIds.DeviceID = 0x1414, 0x8C
            mem.write(a.private_data, bytes(q))
        else:
            return -errno.EINVAL
        return 0

    def lx_dxcreatedevice(self, a, mem, req, fds, fixups):
        if a.adapter.v not in self.adapters:
            return -errno.EINVAL
        a.device.v = h = self.handle()
        self.devices[h] = a.adapter.v
        return 0

    def lx_dxgetdevicestate(self, a, mem, req, fds, fixups):
        if a.device.v not in self.devices:
            return -errno.EINVAL
        a.execution_state = 1
        return 0

    def lx_dxcreatecontextvirtual(self, a, mem, req, fds, fixups):
        if a.device.v not in self.devices:
            return -errno.EINVAL
        a.context.v = h = self.handle()
        self.contexts[h] = a.device.v
        return 0

    def lx_dxdestroycontext(self, a, mem, req, fds, fixups):
        return 0 if self.contexts.pop(a.context.v, None) else -errno.EINVAL

    def lx_dxdestroydevice(self, a, mem, req, fds, fixups):
        if self.devices.pop(a.device.v, None) is None:
            return -errno.EINVAL
        for c in [c for c, d in self.contexts.items() if d == a.device.v]:
            del self.contexts[c]
        return 0

    def lx_dxcloseadapter(self, a, mem, req, fds, fixups):
        return 0 if self.adapters.pop(a.adapter_handle.v, None) else -errno.EINVAL

    def lx_dxescape(self, a, mem, req, fds, fixups):
        data = bytearray(mem.read(a.priv_drv_data, a.priv_drv_data_size))
        head = EscapeHeader.unpack(bytes(data))
        flags = head.flags
        status = 0
        at = ESCAPE_HEADER.size
        if head.op == EOp.PING:
            pass
        elif head.op == EOp.SLEEP:
            self.node.hold(req)
            return None
        elif head.op == EOp.SHMEM_CREATE:
            region = len(self.shm) + 1
            fd = os.memfd_create("fake-shm")
            os.ftruncate(fd, head.length)
            os.pwrite(fd, bytes(i % 251 for i in range(head.length)), 0)
            self.shm[region] = fd
            struct.pack_into("<Q", data, at, region)
            fds.append(os.dup(fd))
            fixups.append(wire.FdFixup(wire.FD_IN_USER, a.priv_drv_data + 16, 8))
            flags |= EscapeFlags.FD_OUT
        elif head.op in (EOp.SHMEM_READ, EOp.SHMEM_WRITE, EOp.SHMEM_FREE):
            region, offset = struct.unpack_from("<QQ", data, at)
            fd = self.shm.get(region)
            if fd is None:
                status = NTSTATUS.STATUS_INVALID_HANDLE
            elif head.op == EOp.SHMEM_READ:
                data[at + 16 :] = os.pread(fd, head.length, offset)
            elif head.op == EOp.SHMEM_WRITE:
                os.pwrite(fd, bytes(data[at + 16 :]), offset)
            else:
                os.close(self.shm.pop(region))
        elif head.op == EOp.EVENTFD_SIGNAL:
            (theirs,) = req.fds
            assert req.msg.fd_numbers == (head.fd,)
            os.eventfd_write(theirs, struct.unpack_from("<Q", data, at)[0])
        else:
            status = NTSTATUS.STATUS_INVALID_PARAMETER
        out = EscapeHeader(head.op, status, int(flags), head.fd, head.length).pack()
        data[: len(out)] = out
        mem.write(a.priv_drv_data, bytes(data))
        return 0


@pytest.fixture
def driver(fake) -> Iterator[FakeDriver]:
    drv = FakeDriver(fake)
    fake.serve = drv
    yield drv
    close_all(drv.shm.values())


def test_sync_api_whole_flow_and_cascading_close(fake, driver):
    with open_node(fake.path) as node:
        assert isinstance(node, Node)
        ads = node.adapters()
        assert [a.luid for a in ads] == list(FakeDriver.LUIDS)
        ad = ads[0]
        assert ad.description == "fake adapter 100000010"
        assert ad.adapter_type.paravirtualized and ad.compute_only and not ad.software
        assert (ad.vendor_id, ad.device_id) == (0x1414, 0x8C)
        dev = ad.create_device()
        assert dev.execution_state() == 1
        ctx = dev.create_context()
        assert driver.contexts == {ctx.handle: dev.handle}
        with pytest.raises(DxgError) as ei:
            node.open_adapter(0x1234)
        assert ei.value.status == NTSTATUS.STATUS_INVALID_PARAMETER
        other = node.open_adapter(FakeDriver.LUIDS[1])
        other.create_device().create_context()
        assert len(driver.devices) == 2
    assert ctx.closed and dev.closed and ad.closed and other.closed
    assert driver.contexts == {} and driver.devices == {} and driver.adapters == {}


def test_sync_api_many_threads_on_one_node(fake, driver):
    with open_node(fake.path) as node:
        ad = node.adapters()[0]
        errors: list[BaseException] = []

        def worker() -> None:
            try:
                for _ in range(10):
                    with ad.create_device() as dev:
                        dev.create_context()
                        assert dev.execution_state() == 1
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DEADLINE)
        assert errors == []
        assert driver.devices == {} and driver.contexts == {}


def test_async_api_whole_flow(fake, driver):
    async def main() -> None:
        async with await open_node_async(fake.path) as node:
            assert isinstance(node, AsyncNode)
            ads = await node.adapters()
            ad = ads[0]
            assert await ad.description() == "fake adapter 100000010"
            assert (await ad.adapter_type()).paravirtualized and await ad.compute_only()
            assert await ad.vendor_id() == 0x1414
            devs = await asyncio.gather(*(ad.create_device() for _ in range(5)))
            assert len({d.handle for d in devs}) == 5
            states = await asyncio.gather(*(d.execution_state() for d in devs))
            assert states == [1] * 5
            async with await devs[0].create_context() as ctx:
                assert driver.contexts == {ctx.handle: devs[0].handle}
            assert ctx.closed and driver.contexts == {}
            await devs[1].close()
            assert len(driver.devices) == 4
        assert all(d.closed for d in devs) and driver.adapters == {}

    asyncio.run(main())


def test_diag_escapes_sync_and_async(fake, driver):
    with open_node(fake.path) as node:
        ad = node.adapters()[0]
        diag.ping(ad)
        region, fd = diag.shmem_create(ad, 1000)
        with mmap.mmap(fd, 1000) as m:
            assert m[:5] == bytes(range(5)) and m[251] == 0
            diag.shmem_write(ad, region, 10, b"hello")
            assert m[10:15] == b"hello"  # the same memory on both sides
            m[20:23] = b"abc"
            assert diag.shmem_read(ad, region, 20, 3) == b"abc"
        os.close(fd)
        diag.shmem_free(ad, region)
        with pytest.raises(DxgError) as ei:
            diag.shmem_free(ad, region)
        assert ei.value.status == NTSTATUS.STATUS_INVALID_HANDLE
        efd = os.eventfd(0)
        diag.eventfd_signal(ad, efd, 3)
        assert os.eventfd_read(efd) == 3
        assert ad.escape(EscapeHeader(EOp.PING).pack())[:4] == b"PDXE"

    async def main() -> None:
        async with await open_node_async(fake.path) as node:
            ad = (await node.adapters())[1]
            dev = await ad.create_device()
            await diag.ping(dev)
            region, fd = await diag.shmem_create(ad, 64)
            assert await diag.shmem_read(ad, region, 0, 4) == bytes(range(4))
            os.close(fd)
            await diag.eventfd_signal(ad, efd, 4)
            assert os.eventfd_read(efd) == 4
            sleeper = asyncio.ensure_future(diag.sleep(dev, 60_000))
            (req,) = await asyncio.to_thread(fake.wait_held, 1)
            sleeper.cancel()  # the held SLEEP is cancelled on the node (CANCEL -> -EINTR)
            with pytest.raises(asyncio.CancelledError):
                await sleeper
            await asyncio.to_thread(fake.wait_cancel, req.seq)
            await diag.ping(ad)

    asyncio.run(main())
    os.close(efd)


def test_async_thunks_share_the_table(fake, driver):
    async def main() -> None:
        conn = await AsyncNodeConnection.open(fake.path)
        args = s.d3dkmt_enumadapters3()
        args.filter.include_compute_only = 1
        assert await thunks.D3DKMTEnumAdapters3(conn, args) == 0
        assert args.adapter_count == 2
        assert thunks.D3DKMTRender.code == io.LX_DXRENDER
        with pytest.raises(TypeError):
            thunks.D3DKMTRender(conn, s.d3dkmt_createcontext())
        conn.close()

    asyncio.run(main())


# ---- the same against the real stack (host, guest driver, node) ----------------------------------


def test_real_stack_async_api_and_diag(stack):
    async def main() -> None:
        async with await open_node_async(stack.node_path) as node:
            ads = await node.adapters()
            assert {a.luid for a in ads} == {a.guest_luid for a in stack.host.adapters}
            ad = ads[0]
            assert (await ad.description()).startswith("pydxg")
            assert await ad.paravirtualized() and await ad.compute_only()
            dev = await ad.create_device()
            assert await dev.execution_state() == 1
            await asyncio.gather(*(diag.ping(dev) for _ in range(10)))
            region, fd = await diag.shmem_create(ad, 5000)
            with mmap.mmap(fd, 5000) as m:
                assert m[:3] == b"\x00\x01\x02"
                await diag.shmem_write(ad, region, 1000, b"async")
                assert m[1000:1005] == b"async"
                m[2000:2003] = b"xyz"
                assert await diag.shmem_read(ad, region, 2000, 3) == b"xyz"
            os.close(fd)
            await diag.shmem_free(ad, region)
            efd = os.eventfd(0)
            await diag.eventfd_signal(ad, efd, 5)
            assert os.eventfd_read(efd) == 5
            os.close(efd)
            async with await dev.create_context() as ctx:
                assert stack.host_totals()["contexts"] == 1
            assert ctx.closed

    asyncio.run(main())
    wait_for(lambda: stack.host_totals()["devices"] == 0, what="host objects freed")


def test_real_stack_a_parked_call_parks_only_its_thread(stack):
    node = open_node(stack.node_path)
    ad = node.adapters()[0]
    dev = ad.create_device()
    outcome: list[BaseException | None] = []

    def sleeper() -> None:
        try:
            diag.sleep(dev, 60_000)  # a long host command, held on a worker thread there
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=sleeper)
    t.start()
    errors: list[BaseException] = []

    def pinger() -> None:
        try:
            for _ in range(20):
                diag.ping(ad)
                assert ad.create_device().execution_state() == 1
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    pingers = [threading.Thread(target=pinger) for _ in range(8)]
    for p in pingers:
        p.start()
    for p in pingers:
        p.join(DEADLINE)
    assert errors == [] and not any(p.is_alive() for p in pingers)
    assert t.is_alive() and outcome == []  # still parked on the host
    node.close()  # its device (then the process) goes: the host cuts the sleep short
    t.join(DEADLINE)
    assert not t.is_alive() and len(outcome) == 1 and isinstance(outcome[0], DxgError)
    wait_for(lambda: stack.host_totals()["devices"] == 0, what="host objects freed")
