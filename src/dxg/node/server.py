"""The Unix-socket front end: the socket twin of ``/dev/dxg``, on the driver's event loop.

Each accepted connection is one process, exactly as each ``open("/dev/dxg")`` is in the kernel:
the peer's pid/uid/gid come from ``SO_PEERCRED``, its name from ``/proc/<pid>/comm``, and
``driver.open_process`` runs once the client has said HELLO. There is no thread per client: the
connection is a reader callback on the loop, and each request runs as a task of its connection,
so many calls of one process are in flight at once and a call parked in the driver parks only its
caller. Replies go out as each call finishes, matched by ``seq``.

When the peer goes away (clean close, crash, SIGKILL) the connection sees it at once: its calls
still in flight are cancelled (what they were creating on the host is undone when the host
answers) and then its process is closed with ``driver.close_process``.

Everything a client sends is checked before it reaches the driver: framing, sizes, region and
descriptor tables (:mod:`dxg.uapi.wire`), the ioctl code against the ABI's table (``-ENOTTY`` for
unknown codes, as the kernel), and the struct length against the code's size bits (``-EFAULT``
when short, ``-EINVAL`` when long). Malformed frames get an ERROR reply and the connection goes
on as long as the framing is intact; a broken stream gets a fatal ERROR and the connection is
closed.

Limits on what a client can hold:

* Before HELLO is answered the node reads frames of at most ``wire.MAX_HELLO_PAYLOAD`` bytes,
  and the whole handshake must be over within ``handshake_timeout`` (10 s) of the accept;
  after that the limit is ``wire.MAX_PAYLOAD``.
* A request frame, once its first byte has arrived, must be complete within ``frame_timeout``
  (30 s). A connection idle *between* requests is never timed out: it is an open process.
* At most ``max_calls`` calls in flight per connection: past that the node stops reading from
  it until some finish (the client waits; nothing is refused).
* Replies the client does not read: while more than ``pause_buffer`` bytes wait for it, the node
  reads no new requests from it; at most ``max_buffer`` bytes wait for one client and
  ``max_total_buffer`` for all of them (past either, the client whose reply does not fit is
  dropped); a client that takes nothing for ``send_timeout`` seconds while replies wait is
  dropped. A dropped client's process is closed like any other.
* At most ``max_connections`` connections in all, and at most ``max_per_uid`` (default a
  quarter of that) per peer uid. Root's connections count towards the total but not against a
  per-uid limit. Refused connections get a fatal ERROR (``EMFILE``) saying which limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import os
import secrets
import socket
import stat
import struct
from collections import deque
from pathlib import Path
from typing import Any, Protocol

from dxg.node.usermem import RegionUserMemory
from dxg.oslib.fds import close_all
from dxg.runtime.loop import LoopThread
from dxg.runtime.tasks import TaskSet
from dxg.uapi import wire
from dxg.uapi.ioctls import IOCTLS_BY_CODE
from dxg.uapi.nodepath import (
    default_node_path,
    open_trusted_dir,
    private_node_dir,
    proc_fd_path,
    trusted_path_problem,
)
from dxg.vmbus.transport import SocketTransport, TransportClosed, WriteBudget, read_buffer

__all__ = ["NodeBusy", "NodeDriver", "SocketNode"]

log = logging.getLogger(__name__)

_UCRED = struct.Struct("iII")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }
_HANDSHAKE_TIMEOUT = 10.0
_FRAME_TIMEOUT = 30.0
_SEND_TIMEOUT = 30.0
_MAX_BUFFER = 2 * wire.MAX_PAYLOAD + 1024 * 1024
_PAUSE_BUFFER = 1024 * 1024
_MAX_TOTAL_BUFFER = 256 * 1024 * 1024
_MAX_CALLS = 256
_UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1


class NodeDriver(Protocol):
    """What the node needs from the driver (``dxg.guest.driver.GuestDriver`` is one). Everything
    but ``rt`` is called on the driver's loop."""

    rt: LoopThread

    def open_process(self, pid: int, uid: int, name: str) -> Any: ...

    async def close_process(self, proc: Any) -> None: ...

    async def ioctl(self, proc: Any, code: int, arg: bytes, mem: Any) -> tuple[int, bytes]: ...

    async def admin(self, request: dict[str, Any]) -> dict[str, Any]: ...


class NodeBusy(FileExistsError):
    """Another node is already serving at this path (or it is not a socket)."""


def _process_name(pid: int) -> str:
    if pid <= 0:
        return "?"
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read(64).decode(errors="replace").strip() or "?"
    except OSError:
        return "?"


class _Conn:
    """One client connection = one driver process (a transport Receiver, on the loop)."""

    def __init__(self, node: SocketNode, sock: socket.socket, pid: int, uid: int,
                 gid: int) -> None:
        self.node = node
        self.pid, self.uid, self.gid = pid, uid, gid
        self.name = _process_name(pid)
        self.proc: Any = None
        self.transport = SocketTransport(node.loop, sock, f"pid {pid}",
                                         send_timeout=node.send_timeout,
                                         max_buffer=node.max_buffer,
                                         max_fds=4 * wire.MAX_FDS,
                                         budget=node.write_budget,
                                         read_buffer=node.read_buffer)
        self.transport.on_drained = self._drained
        self.decoder = wire.FrameDecoder(wire.MAX_HELLO_PAYLOAD)
        self.fds: deque[int] = deque()
        self.calls = TaskSet(f"pid {pid}")
        self.inflight: dict[int, asyncio.Future[None]] = {}
        self.greeted = False
        self.gone = False
        self.paused = False
        self._stall: asyncio.TimerHandle | None = None
        self._handshake = node.loop.call_later(node.handshake_timeout, self._handshake_late)
        self._admin_chunks: int = wire.MAX_PAYLOAD

    def __repr__(self) -> str:
        return f"<node conn pid={self.pid} uid={self.uid}>"

    # ---- sending ------------------------------------------------------------------------------

    def send(self, msg: wire.Message, seq: int, fds: list[int] | None = None) -> bool:
        """Queue one message; False (and the connection dropped) when it cannot go."""
        if self.gone:
            close_all(fds or ())
            return False
        try:
            data = wire.encode(msg, seq)
        except (ValueError, TypeError) as e:
            log.error("cannot encode a reply for pid %d: %s", self.pid, e)
            close_all(fds or ())
            fds = None
            data = wire.encode(wire.ErrorReply(errno.EIO, "reply could not be encoded"), seq)
        try:
            self.transport.write(data, fds or ())
        except (TransportClosed, ValueError):
            return False
        finally:
            close_all(fds or ())
        self._check_backlog()
        return True

    def _check_backlog(self) -> None:
        """A client that lets replies pile up gets no new requests read until it catches up."""
        backlog = self.transport.buffered > self.node.pause_buffer
        if backlog and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def _drained(self) -> None:
        if self.paused and not self.gone and len(self.inflight) < self.node.max_calls // 2:
            self.paused = False
            self.transport.resume_reading()

    def error(self, seq: int, err: int, text: str, fatal: bool = False) -> None:
        self.send(wire.ErrorReply(err, text, fatal), seq)
        if fatal:
            self.node.loop.call_soon(self.transport.close, None)

    # ---- receiving (Receiver) -----------------------------------------------------------------

    def data_received(self, data: bytes, fds: list[int]) -> None:
        if self.gone:
            close_all(fds)
            return
        self.fds.extend(fds)
        try:
            if len(self.fds) > 4 * wire.MAX_FDS:
                raise wire.WireError(errno.EPROTO, "descriptors arrived that no frame claims")
            self.decoder.feed(data)
            for frame in self.decoder.frames():
                if self.gone:
                    return
                count = frame.fd_count
                if count > len(self.fds):
                    raise wire.WireError(errno.EPROTO, "a frame claims descriptors that did "
                                                       "not arrive")
                frame_fds = [self.fds.popleft() for _ in range(count)]
                self._handle(frame, frame_fds)
        except wire.WireError as e:
            log.info("pid %d (%s): broken stream: %s", self.pid, self.name, e)
            self.error(0, e.errno, str(e), fatal=True)
            return
        self._watch_partial()

    def _watch_partial(self) -> None:
        """A frame begun must be complete within frame_timeout (an idle connection is fine)."""
        if not self.greeted:
            return  # the handshake deadline covers it
        if self.decoder.buffered:
            if self._stall is None:
                self._stall = self.node.loop.call_later(self.node.frame_timeout, self._stalled)
        elif self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _stalled(self) -> None:
        self._stall = None
        if self.decoder.buffered and not self.gone:
            why = f"frame not complete within {self.node.frame_timeout:g} s"
            log.info("pid %d (%s): dropped: %s", self.pid, self.name, why)
            self.error(0, errno.ETIMEDOUT, why, fatal=True)

    def _handshake_late(self) -> None:
        if not self.greeted and not self.gone:
            why = f"no HELLO within {self.node.handshake_timeout:g} s"
            log.info("pid %d (%s): dropped: %s", self.pid, self.name, why)
            self.error(0, errno.ETIMEDOUT, why, fatal=True)

    def connection_lost(self, error: BaseException | None) -> None:
        if self.gone:
            return
        self.gone = True
        self._handshake.cancel()
        if self._stall is not None:
            self._stall.cancel()
        close_all(self.fds)
        self.fds.clear()
        if error is not None and not isinstance(error, ConnectionResetError):
            log.info("pid %d (%s): connection dropped: %s", self.pid, self.name, error)
        self.node._forget(self)
        self.node.spawn(self._release(), f"release pid {self.pid}")

    async def _release(self) -> None:
        """The process is gone: stop its calls, then close it (exactly once)."""
        await self.calls.cancel_and_wait()
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                await self.node.driver.close_process(proc)
            except Exception:
                log.exception("close_process for pid %d failed", self.pid)

    # ---- frames -------------------------------------------------------------------------------

    def _handle(self, frame: wire.Frame, fds: list[int]) -> None:
        if not self.greeted:
            close_all(fds)
            self._hello(frame)
            return
        if frame.kind == wire.Kind.ADMIN and self.uid not in self.node.admin_uids:
            close_all(fds)
            # refused before its (up to 4 MiB of) JSON is parsed
            self.error(frame.seq, errno.EACCES, "admin requests need the node owner or root")
            return
        try:
            msg = wire.decode(frame)
        except wire.MalformedMessage as e:
            close_all(fds)
            self.error(frame.seq, e.errno, str(e))
            return
        if isinstance(msg, wire.IoctlRequest):
            self._ioctl(frame.seq, msg, fds)
        elif isinstance(msg, wire.Cancel):
            task = self.inflight.get(frame.seq)
            if task is not None:
                task.cancel()
        elif isinstance(msg, wire.AdminRequest):
            self._spawn_call(frame.seq, self._admin(frame.seq, msg))
        else:
            close_all(fds)
            self.error(frame.seq, errno.EPROTO, f"unexpected {type(msg).__name__}")

    def _hello(self, frame: wire.Frame) -> None:
        try:
            msg = wire.decode(frame)
        except wire.MalformedMessage as e:
            self.error(frame.seq, e.errno, str(e), fatal=True)
            return
        if not isinstance(msg, wire.Hello):
            self.error(frame.seq, errno.EPROTO, "the first frame must be HELLO", fatal=True)
            return
        version = wire.negotiate(msg)
        if version is None:
            self.error(
                frame.seq, errno.EPROTONOSUPPORT,
                f"this dxg node speaks wire version {wire.MIN_WIRE_VERSION}"
                f"..{wire.MAX_WIRE_VERSION}, the client {msg.min_version}..{msg.max_version}: "
                "use a pydxg client of the node's version",
                fatal=True,
            )
            return
        try:
            self.proc = self.node.driver.open_process(self.pid, self.uid, self.name)
        except Exception as e:
            log.exception("open_process for pid %d failed", self.pid)
            self.error(frame.seq, errno.EIO, f"cannot open a process: {e}", fatal=True)
            return
        self.greeted = True
        self._handshake.cancel()
        self.decoder.max_payload = wire.MAX_PAYLOAD
        self.send(wire.HelloReply(version, wire.MAX_PAYLOAD, wire.MAX_REGIONS, wire.MAX_FDS,
                                  self.node.name), frame.seq)

    def _spawn_call(self, seq: int, coro: Any) -> None:
        """Run the call eagerly: most finish right here; one that waits is tracked by seq."""
        call = self.calls.eager(coro, f"pid {self.pid} seq {seq}")
        if call.done():
            if not call.cancelled() and call.exception() is not None:
                log.error("pid %d: call %d failed", self.pid, seq, exc_info=call.exception())
            return
        self.inflight[seq] = call
        call.add_done_callback(lambda _t: self._call_done(seq, call))
        if len(self.inflight) >= self.node.max_calls and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def _call_done(self, seq: int, task: asyncio.Future[None]) -> None:
        if self.inflight.get(seq) is task:
            del self.inflight[seq]
        if (self.paused and len(self.inflight) < self.node.max_calls // 2 and not self.gone
                and self.transport.buffered <= self.node.pause_buffer):
            self.paused = False
            self.transport.resume_reading()

    def _ioctl(self, seq: int, req: wire.IoctlRequest, fds: list[int]) -> None:
        desc = IOCTLS_BY_CODE.get(req.code)
        ret = 0
        if desc is None:
            ret = -errno.ENOTTY
        elif len(req.struct) < desc.size:
            ret = -errno.EFAULT
        elif len(req.struct) > desc.size:
            ret = -errno.EINVAL
        if ret or seq in self.inflight:
            close_all(fds)
            if not ret:
                self.error(seq, errno.EBUSY, f"seq {seq} is already in flight")
                return
            self.send(wire.IoctlReply(ret, req.struct), seq)
            return
        mem = RegionUserMemory(req.regions, fds, req.fd_numbers)
        self._spawn_call(seq, self._run_ioctl(seq, req, mem))

    async def _run_ioctl(self, seq: int, req: wire.IoctlRequest, mem: RegionUserMemory) -> None:
        try:
            try:
                ret, out = await self.node.driver.ioctl(self.proc, req.code, req.struct, mem)
            except asyncio.CancelledError:
                if not self.gone:  # cancelled by the client (CANCEL): its call was interrupted
                    self.send(wire.IoctlReply(-errno.EINTR, req.struct), seq)
                raise
            except Exception:
                log.exception("driver ioctl 0x%08x from pid %d raised", req.code, self.pid)
                ret, out = -errno.EIO, req.struct
            if (
                not isinstance(ret, int)
                or not _I64_MIN <= ret <= _I64_MAX
                or not isinstance(out, bytes | bytearray)
                or len(out) != len(req.struct)
            ):
                log.error("driver ioctl 0x%08x returned a malformed result", req.code)
                self.send(wire.IoctlReply(-errno.EIO, req.struct), seq)
                return
            fds, fixups = mem.reply_fds()
            if ret < 0:
                fds, fixups = [], ()
            dup = [os.dup(fd) for fd in fds]
            self.send(wire.IoctlReply(ret, bytes(out), mem.writes(), fixups), seq, dup)
        finally:
            mem.close()

    async def _admin(self, seq: int, msg: wire.AdminRequest) -> None:
        try:
            reply = await self.node.driver.admin(msg.request)
        except asyncio.CancelledError:
            if not self.gone:
                self.error(seq, errno.EINTR, "admin request cancelled")
            raise
        except Exception as e:
            log.exception("driver admin request failed")
            self.error(seq, errno.EIO, f"admin request failed: {type(e).__name__}")
            return
        if not isinstance(reply, dict):
            self.error(seq, errno.EIO, "driver returned a non-object")
            return
        try:
            frames = wire.admin_reply_frames(reply, seq, self._admin_chunks)
        except (ValueError, TypeError) as e:
            self.error(seq, errno.EIO, f"admin reply could not be encoded: {e}")
            return
        for data in frames:
            try:
                self.transport.write(data)
            except TransportClosed:
                return


class SocketNode:
    """Serve ``driver`` on an ``AF_UNIX`` stream socket at ``path``, on the driver's loop.

    ``mode``/``group`` set the socket's permissions as for a device node (``/dev/dxg`` is
    0666). A missing parent directory is created (private, 0700, when it is a per-user default
    directory). A live socket at ``path`` is never replaced (:class:`NodeBusy`); a stale one
    (nobody listening) is. ``admin_uids`` may use the ADMIN request (default: root and the
    node's own user). The other keywords are the limits of the module docstring.
    """

    def __init__(
        self,
        driver: NodeDriver,
        path: str | os.PathLike[str] | None = None,
        mode: int = 0o666,
        group: str | int | None = None,
        *,
        name: str = "pydxg",
        admin_uids: frozenset[int] | None = None,
        max_connections: int = 1024,
        max_per_uid: int | None = None,
        handshake_timeout: float = _HANDSHAKE_TIMEOUT,
        frame_timeout: float = _FRAME_TIMEOUT,
        send_timeout: float = _SEND_TIMEOUT,
        max_buffer: int = _MAX_BUFFER,
        pause_buffer: int = _PAUSE_BUFFER,
        max_total_buffer: int = _MAX_TOTAL_BUFFER,
        max_calls: int = _MAX_CALLS,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if max_per_uid is None:
            max_per_uid = max(1, max_connections // 4)
        if max_per_uid < 1:
            raise ValueError("max_per_uid must be at least 1")
        if not handshake_timeout > 0 or not frame_timeout > 0 or not send_timeout > 0:
            raise ValueError("timeouts must be positive")
        if not wire.MAX_PAYLOAD < max_buffer <= max_total_buffer or max_calls < 2:
            raise ValueError("need MAX_PAYLOAD < max_buffer <= max_total_buffer and "
                             "max_calls >= 2")
        self.driver = driver
        self.rt: LoopThread = driver.rt
        self.loop = driver.rt.loop
        self._path = Path(path) if path is not None else default_node_path()
        self.mode = mode
        self.group = group
        self.name = name
        self.admin_uids = (
            frozenset(admin_uids) if admin_uids is not None else frozenset({0, os.geteuid()})
        )
        self.max_connections = max_connections
        self.max_per_uid = max_per_uid
        self.handshake_timeout = handshake_timeout
        self.frame_timeout = frame_timeout
        self.send_timeout = send_timeout
        self.max_buffer = max_buffer
        self.pause_buffer = pause_buffer
        self.write_budget = WriteBudget(max_total_buffer)
        self.read_buffer = read_buffer()  # shared by every connection (all on one loop)
        self.max_calls = max_calls
        self._conns: set[_Conn] = set()
        self._per_uid: dict[int, int] = {}
        self._listener: socket.socket | None = None
        self._dir_fd = -1
        self._inode: tuple[int, int] | None = None
        self._closing = False
        self._started = False
        self._tasks = TaskSet(f"node {self._path}")
        self.refused = 0

    @property
    def path(self) -> Path:
        return self._path

    def __enter__(self) -> SocketNode:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SocketNode {str(self._path)!r} connections={len(self._conns)}>"

    def spawn(self, coro: Any, name: str) -> None:
        try:
            self._tasks.spawn(coro, name)
        except RuntimeError:
            coro.close()

    # ---- start ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Create the socket and start serving (any thread)."""
        if self._started:
            raise RuntimeError("node already started")
        if len(os.fsencode(self._path.name)) > 64:
            raise OSError(errno.ENAMETOOLONG, f"node name too long: {self._path.name}")
        if self.rt.in_loop():
            self._start()
        else:
            self.rt.call(self._start)

    def _start(self) -> None:
        path = self._path
        self._prepare_dir(path.parent)
        # The directory is checked one component at a time from / and held open; the socket is
        # made, renamed and later removed through that descriptor, so no directory on the way
        # can be swapped for another user's between the check and the use.
        dir_fd = open_trusted_dir(path.parent)
        try:
            self._bind(dir_fd, path.name)
        except BaseException:
            os.close(dir_fd)
            raise
        self._dir_fd = dir_fd
        log.info("node serving %s (mode %o)", path, self.mode)

    def _bind(self, dir_fd: int, name: str) -> None:
        self._check_existing(dir_fd, name)
        gid = self._group_id()
        tmp = f".{name}.{os.getpid()}.{secrets.token_hex(4)}"
        bind_path = proc_fd_path(dir_fd, tmp)
        if len(os.fsencode(bind_path)) > _UNIX_PATH_MAX:
            raise OSError(errno.ENAMETOOLONG, f"node name too long for a Unix socket: {name}")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(bind_path)
            try:
                os.chmod(tmp, self.mode, dir_fd=dir_fd)  # our socket, in a trusted directory
                if gid is not None:
                    os.chown(tmp, -1, gid, dir_fd=dir_fd, follow_symlinks=False)
                listener.listen(512)
                os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dir_fd)
                raise
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            self._inode = (st.st_dev, st.st_ino)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self._started = True
        self.loop.add_reader(listener.fileno(), self._accept)

    def _prepare_dir(self, parent: Path) -> None:
        """Create the node's directory if missing (a per-user default directory private, 0700)
        and make sure nobody else controls it or any directory above it: each must be this
        user's or root's, and not writable by everyone unless sticky, or its owner could swap
        the socket."""
        private = private_node_dir(parent)
        if not parent.exists():
            parent.mkdir(mode=0o700 if private else 0o755, parents=True, exist_ok=True)
            if private:
                os.chmod(parent, 0o700)  # whatever the umask did
        problem = trusted_path_problem(parent / "x")
        if problem is not None:
            raise PermissionError(errno.EPERM, f"refusing to serve a node there: {problem}")

    def _check_existing(self, dir_fd: int, name: str) -> None:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        path = self._path
        if not stat.S_ISSOCK(st.st_mode):
            raise NodeBusy(errno.EEXIST, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.settimeout(1.0)
        try:
            probe.connect(proc_fd_path(dir_fd, name))
        except (ConnectionRefusedError, FileNotFoundError):
            return  # stale: nobody listens; the rename replaces it
        except OSError as e:
            raise NodeBusy(errno.EEXIST, f"{path} exists and cannot be probed: {e}") from None
        finally:
            probe.close()
        raise NodeBusy(errno.EEXIST, f"a node is already serving {path}")

    def _group_id(self) -> int | None:
        if self.group is None:
            return None
        if isinstance(self.group, int):
            return self.group
        try:
            return grp.getgrnam(self.group).gr_gid
        except KeyError:
            raise LookupError(f"no such group: {self.group!r}") from None

    # ---- accepting ---------------------------------------------------------------------------

    def _accept(self) -> None:
        listener = self._listener
        for _ in range(64):
            if self._closing or listener is None:
                return
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept failed: %s; pausing for a moment", e)
                    self.loop.remove_reader(listener.fileno())
                    self.loop.call_later(0.05, self._resume_accepting)
                    return
                if e.errno == errno.ECONNABORTED:
                    continue
                return
            self._start_conn(sock)

    def _resume_accepting(self) -> None:
        if not self._closing and self._listener is not None:
            self.loop.add_reader(self._listener.fileno(), self._accept)

    def _start_conn(self, sock: socket.socket) -> None:
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        except OSError:
            sock.close()  # gone before we could look at it
            return
        pid, uid, gid = _UCRED.unpack(creds)
        refusal = self._admit(uid)
        if refusal is not None:
            err, text = refusal
            self.refused += 1
            log.info("refused a connection from pid %d uid %d: %s", pid, uid, text)
            with contextlib.suppress(OSError):
                sock.setblocking(False)
                sock.send(wire.encode(wire.ErrorReply(err, text, True), 0))
            sock.close()
            return
        conn = _Conn(self, sock, pid, uid, gid)
        self._conns.add(conn)
        self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
        conn.transport.start(conn)

    def _admit(self, uid: int) -> tuple[int, str] | None:
        """Whether a connection of ``uid`` may take a slot, or why not."""
        if self._closing:
            return errno.ESHUTDOWN, "node is closing"
        if len(self._conns) >= self.max_connections:
            return errno.EMFILE, f"node is full ({self.max_connections} connections)"
        held = self._per_uid.get(uid, 0)
        if uid != 0 and held >= self.max_per_uid:
            return (
                errno.EMFILE,
                f"uid {uid} already holds {held} connections, the most one user may",
            )
        return None

    def _forget(self, conn: _Conn) -> None:
        if conn in self._conns:
            self._conns.discard(conn)
            left = self._per_uid.get(conn.uid, 0) - 1
            if left > 0:
                self._per_uid[conn.uid] = left
            else:
                self._per_uid.pop(conn.uid, None)

    # ---- introspection --------------------------------------------------------------------------

    def connections(self) -> list[dict[str, Any]]:
        """Who is connected (any thread)."""
        if not self.rt.in_loop():
            return list(self.rt.call(self.connections))
        return [{"pid": c.pid, "uid": c.uid, "gid": c.gid, "name": c.name,
                 "calls": len(c.inflight), "buffered": c.transport.buffered}
                for c in self._conns]

    # ---- close ----------------------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> None:
        """Stop accepting, close every connection (closing its process) and unlink the socket.
        Idempotent; any thread."""
        if self._closing or not self._started or self.rt.closed:
            self._closing = True
            return
        if self.rt.in_loop():
            raise RuntimeError("SocketNode.close() must be called off the loop")
        self.rt.run(self._close(), timeout=timeout + 5)

    async def _close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._listener is not None:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(self._listener.fileno())
            self._listener.close()
        self._unlink_own()
        for conn in list(self._conns):
            conn.transport.close(None)
            conn.connection_lost(None)  # starts its release now (it runs once)
        await self._tasks.wait(timeout=10)

    def _unlink_own(self) -> None:
        dir_fd, self._dir_fd = self._dir_fd, -1
        if dir_fd < 0:
            return
        name = self._path.name
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(name, dir_fd=dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)
