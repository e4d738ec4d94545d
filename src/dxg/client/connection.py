"""One connection to the node: this process's ``open("/dev/dxg")``.

:meth:`NodeConnection.ioctl` is the socket version of ``ioctl(fd, code, &args)``: it gathers the
user buffers the struct points at (:mod:`dxg.client.userbufs`), sends them with the struct,
applies the writes the driver made to them back into this process's memory, copies the struct
back and returns the raw return value (0, a positive NTSTATUS, or a negative errno).

This process's memory is read with ``process_vm_readv`` on itself, so a bad pointer in a struct
gives ``-EFAULT`` from the driver, as from the kernel, instead of crashing the interpreter; the
driver's writes go back with ``process_vm_writev`` (``ctypes.memmove`` where those calls are
not allowed). A connection belongs to the process that opened it: after ``fork()`` the child
gets ``-ENOTTY`` (as the kernel answers a child using its parent's ``/dev/dxg`` file) and must
open its own (:meth:`NodeConnection.reopen`).

A call interrupted while it waits for the node (``KeyboardInterrupt`` during a blocking wait)
raises in the caller and leaves the connection usable: the node still finishes that call, and its
reply is skipped when it arrives (its writes to user memory are then not applied).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import threading
from collections import deque
from pathlib import Path
from typing import Any

from dxg.client.errors import (
    NodeError,
    NodeNotFound,
    NodePermissionDenied,
    NodeProtocolError,
    NodeUnavailable,
)
from dxg.client.userbufs import gather
from dxg.guest.usermem import UserMemoryFault
from dxg.node import wire
from dxg.node.paths import NODE_ENV, default_node_path, node_dir_problem
from dxg.node.procmem import ProcessVmUserMemory
from dxg.uapi.ioctls import IOCTLS_BY_CODE

__all__ = ["NodeConnection"]

_RECV_CHUNK = 256 * 1024
# An interrupted request up to this size is assumed whole on the wire (a Unix socket's buffer
# takes it without blocking, so the send cannot stop half-way); a bigger one drops the stream.
_ATOMIC_SEND = 64 * 1024


class _SelfMemory:
    """Reads and writes this process's memory without faulting on bad addresses: through
    process_vm_readv/writev (the node's ProcessVmUserMemory, aimed at ourselves), or, where a
    sandbox forbids those calls, directly."""

    def __init__(self) -> None:
        self._mem = ProcessVmUserMemory(os.getpid())
        probe = ctypes.create_string_buffer(b"pydxg", 8)
        try:
            self.safe = self._mem.read(ctypes.addressof(probe), 8) == probe.raw
        except UserMemoryFault:
            self.safe = False

    def read(self, addr: int, size: int) -> bytes | None:
        if addr <= 0 or size <= 0 or addr + size > 1 << 64:
            return None
        if not self.safe:
            return ctypes.string_at(addr, size)
        try:
            return self._mem.read(addr, size)
        except UserMemoryFault:
            return None

    def write(self, addr: int, data: bytes) -> bool:
        if not self.safe:
            ctypes.memmove(addr, data, len(data))
            return True
        try:
            self._mem.write(addr, data)
        except UserMemoryFault:
            return False
        return True


class NodeConnection:
    """A connection to the node at ``path`` (default :func:`default_node_path`).

    Raises :class:`NodeNotFound`, :class:`NodePermissionDenied` or :class:`NodeUnavailable` when
    the node cannot be reached. When the path is the implicit default (no ``path``, no
    ``$DXG_NODE``), a node directory that another user (not root) owns, or that everyone may
    write without the sticky bit, is refused (:class:`NodePermissionDenied`): someone else could
    have put their own socket there. Thread-safe: calls are serialized on one lock (a call that
    blocks in the driver holds the connection until it returns).
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, timeout: float = 10.0) -> None:
        self.path = Path(path) if path is not None else default_node_path()
        self._check_dir = path is None and not os.environ.get(NODE_ENV)
        self._timeout = timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._decoder = wire.FrameDecoder()
        self._seq = 0
        self._abandoned: set[int] = set()
        self._ready: deque[wire.Frame] = deque()
        self._pid = os.getpid()
        self._mem = _SelfMemory()
        self.version = 0
        self.node_name = ""
        self.max_payload = wire.MAX_PAYLOAD
        self._connect()

    # ---- connecting -----------------------------------------------------------------------------

    def _connect(self) -> None:
        path = self.path
        if self._check_dir:
            try:
                problem = node_dir_problem(path.parent)
            except OSError:
                problem = None  # cannot look: connect() says what is wrong
            if problem is not None:
                raise NodePermissionDenied(
                    f"not connecting to the dxg node {path}: {problem} "
                    f"(set {NODE_ENV} to use it anyway)"
                )
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self._timeout)
        try:
            sock.connect(os.fspath(path))
        except FileNotFoundError:
            sock.close()
            raise NodeNotFound(f"no dxg node at {path} (is `dxg up` running?)") from None
        except PermissionError:
            sock.close()
            raise NodePermissionDenied(
                f"permission denied connecting to the dxg node {path}"
            ) from None
        except ConnectionRefusedError:
            sock.close()
            raise NodeUnavailable(f"the dxg node {path} is not accepting connections") from None
        except OSError as e:
            sock.close()
            raise NodeUnavailable(f"cannot connect to the dxg node {path}: {e.strerror}") from None
        self._sock = sock
        self._decoder = wire.FrameDecoder()
        self._abandoned.clear()
        self._ready.clear()
        try:
            reply = self._roundtrip(wire.Hello())
        except NodeError:
            self._drop()
            raise
        if not isinstance(reply, wire.HelloReply):
            self._drop()
            raise NodeProtocolError(errno.EPROTO, f"the dxg node {path} did not answer HELLO")
        if not wire.MIN_WIRE_VERSION <= reply.version <= wire.MAX_WIRE_VERSION:
            self._drop()
            raise NodeProtocolError(
                errno.EPROTONOSUPPORT, f"the dxg node {path} chose wire version {reply.version}"
            )
        self.version = reply.version
        self.node_name = reply.node_name
        self.max_payload = min(reply.max_payload, wire.MAX_PAYLOAD)
        sock.settimeout(None)

    def reopen(self) -> None:
        """Drop this connection and open a new one (for a forked child, or after a loss)."""
        if self.forked:
            # The parent's lock may have been held by one of its threads at fork time.
            self._lock = threading.Lock()
        with self._lock:
            self._drop()
            self._pid = os.getpid()
            self._mem = _SelfMemory()
            self._connect()

    @property
    def forked(self) -> bool:
        """True in a child process that inherited this connection from its parent."""
        return os.getpid() != self._pid

    def _drop(self) -> None:
        # In a forked child this only drops the child's reference; the parent's stream is
        # untouched (the node sees EOF only when every process holding it has closed it).
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def close(self) -> None:
        """Close the connection; the node then closes everything this process opened."""
        if self.forked:
            self._drop()  # the parent's lock may be held forever in this child
            return
        with self._lock:
            self._drop()

    @property
    def closed(self) -> bool:
        return self._sock is None

    def __enter__(self) -> NodeConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._sock is None else f"v{self.version}"
        return f"<NodeConnection {str(self.path)!r} {state}>"

    # ---- one request, one reply -----------------------------------------------------------------

    def _roundtrip(self, msg: wire.Message) -> wire.Message:
        sock = self._sock
        if sock is None:
            raise NodeUnavailable(f"the connection to the dxg node {self.path} is closed")
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        seq = self._seq
        data = wire.encode(msg, seq)
        sent = False
        try:
            sent = True  # from here on the node may have (part of) the request
            sock.sendall(data)
            frame = self._next_reply(sock, seq)
        except (OSError, wire.WireError) as e:
            self._drop()
            raise NodeUnavailable(f"lost the dxg node {self.path}: {e}") from None
        except BaseException:
            # Interrupted (KeyboardInterrupt...). A whole request is still answered and its
            # reply is skipped later; one that may be half sent leaves the stream unusable.
            if sent and len(data) > _ATOMIC_SEND:
                self._drop()
            elif sent:
                self._abandoned.add(seq)
            raise
        try:
            reply = wire.decode(frame)
        except wire.MalformedMessage as e:
            self._drop()
            raise NodeProtocolError(e.errno, f"bad reply from the dxg node: {e}") from None
        if isinstance(reply, wire.ErrorReply):
            if reply.fatal:
                self._drop()
            raise NodeProtocolError(reply.errno, f"dxg node {self.path}: {reply.message}")
        if frame.seq != seq:
            self._drop()
            raise NodeProtocolError(errno.EPROTO, "reply out of sequence from the dxg node")
        return reply

    def _next_reply(self, sock: socket.socket, seq: int) -> wire.Frame:
        """The next frame that is not the reply to an abandoned request.

        The blocking wait only peeks, so an exception from a signal handler there (the usual
        place: a call blocked in the driver) consumes nothing; the bytes are then taken and
        fed in one statement."""
        ready = self._ready
        while True:
            while ready:
                frame = ready.popleft()
                if frame.seq != seq and frame.seq in self._abandoned:
                    self._abandoned.discard(frame.seq)
                    continue
                return frame
            want = min(max(self._decoder.header_needed(), 4096), _RECV_CHUNK)
            peeked = sock.recv(want, socket.MSG_PEEK)
            if not peeked:
                raise ConnectionResetError(errno.ECONNRESET, "connection closed by the node")
            self._decoder.feed(sock.recv(len(peeked)))
            while (f := self._decoder.next_frame()) is not None:
                ready.append(f)

    # ---- ioctl ----------------------------------------------------------------------------------

    def ioctl(self, code: int, args: ctypes.Structure | ctypes.Union) -> int:
        """``ioctl(fd, code, &args)``: returns 0, a positive NTSTATUS or a negative errno, and
        updates ``args`` and the buffers it points at as the driver left them."""
        if not isinstance(args, ctypes.Structure | ctypes.Union):
            raise TypeError("ioctl arguments are a ctypes struct")
        if self.forked:
            return -errno.ENOTTY  # as the kernel answers a child using its parent's file
        with self._lock:
            raw = bytes(args)
            desc = IOCTLS_BY_CODE.get(code & 0xFFFFFFFF)
            regions: tuple[wire.Region, ...] = ()
            if desc is not None:
                budget = self.max_payload - 16 - len(raw)
                regions = gather(desc.name, args, self._mem.read, budget)
            reply = self._roundtrip(wire.IoctlRequest(code & 0xFFFFFFFF, raw, regions))
            if not isinstance(reply, wire.IoctlReply):
                raise NodeProtocolError(errno.EPROTO, "the dxg node answered an ioctl wrongly")
            if len(reply.struct) != len(raw):
                raise NodeProtocolError(errno.EPROTO, "the dxg node changed the struct size")
            ret = reply.ret
            for w in reply.writes:
                if not _inside_writable(regions, w.addr, len(w.data)):
                    raise NodeProtocolError(
                        errno.EPROTO, f"the dxg node wrote outside the buffers sent (0x{w.addr:x})"
                    )
                if not self._mem.write(w.addr, w.data) and ret >= 0:
                    ret = -errno.EFAULT
            ctypes.memmove(ctypes.addressof(args), reply.struct, len(raw))
            return ret

    # ---- admin ----------------------------------------------------------------------------------

    def admin(self, request: dict[str, Any]) -> dict[str, Any]:
        """An introspection request (``{"op": "snapshot"}``, ``{"op": "census"}``)."""
        if self.forked:
            raise NodeUnavailable("this connection belongs to the parent process")
        with self._lock:
            reply = self._roundtrip(wire.AdminRequest(dict(request)))
        if not isinstance(reply, wire.AdminReply):
            raise NodeProtocolError(errno.EPROTO, "the dxg node answered an admin request wrongly")
        return reply.reply


def _inside_writable(regions: tuple[wire.Region, ...], addr: int, size: int) -> bool:
    return any(r.writable and r.addr <= addr and addr + size <= r.end for r in regions)
