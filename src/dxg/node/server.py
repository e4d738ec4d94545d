"""The Unix-socket front end: the socket twin of ``/dev/dxg``.

Each accepted connection is one process, exactly as each ``open("/dev/dxg")`` is in the kernel:
the peer's pid/uid/gid come from ``SO_PEERCRED``, its name from ``/proc/<pid>/comm``, and
``driver.open_process`` runs once the client has said HELLO. Every connection has its own thread,
so one client blocked in a driver call never stalls another.

When the peer goes away (clean close, crash, SIGKILL) its process is closed with
``driver.close_process``: a watcher thread sees the hang-up (``EPOLLRDHUP``) even while the
connection's thread is still blocked inside a driver call, and closes the process at once;
drivers must therefore cope with ``close_process`` running while a call of that process is in
flight (it should fail that call), as the kernel's process teardown wakes pending waits.

Everything a client sends is checked before it reaches the driver: framing, sizes, region tables
(:mod:`dxg.node.wire`), the ioctl code against the ABI's table (``-ENOTTY`` for unknown codes,
as the kernel), and the struct length against the code's size bits (``-EFAULT`` when short,
``-EINVAL`` when long). Malformed frames get an ERROR reply and the connection goes on as long
as the framing is intact; a broken stream gets a fatal ERROR and the connection is closed.

Limits on what a client can hold (the connection's thread, its buffer, its slot):

* Before HELLO is answered the node reads frames of at most ``wire.MAX_HELLO_PAYLOAD`` bytes,
  and the whole handshake must be over within ``handshake_timeout`` (10 s) of the accept,
  however the bytes trickle in; after that the limit is ``wire.MAX_PAYLOAD``.
* A request frame, once its first byte has arrived, must be complete within ``frame_timeout``
  (30 s). A connection idle *between* requests is never timed out: it is an open process.
  A stall gets a fatal ERROR (``ETIMEDOUT``) and the connection is closed.
* At most ``max_connections`` connections in all, and at most ``max_per_uid`` (default a
  quarter of that) per peer uid, so one local user cannot lock the others out. Root's
  connections count towards the total but not against a per-uid limit (root can stop the node
  anyway). Refused connections get a fatal ERROR (``EMFILE``) saying which limit.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import secrets
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from dxg.node import wire
from dxg.node.paths import default_node_path, node_dir_problem, tmp_fallback_dir
from dxg.node.usermem import RegionUserMemory
from dxg.uapi.ioctls import IOCTLS_BY_CODE

__all__ = ["NodeBusy", "NodeDriver", "SocketNode"]

log = logging.getLogger(__name__)

_UCRED = struct.Struct("iII")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }
_HANDSHAKE_TIMEOUT = 10.0
_FRAME_TIMEOUT = 30.0
_ERROR_SEND_TIMEOUT = 1.0  # for the last words to a peer that has stalled
_RECV_CHUNK = 256 * 1024
_UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1


class NodeDriver(Protocol):
    """What the node needs from the driver (``dxg.guest.driver.GuestDriver`` is one)."""

    def open_process(self, pid: int, uid: int, name: str) -> Any: ...

    def close_process(self, proc: Any) -> None: ...

    def ioctl(self, proc: Any, code: int, arg: bytes, mem: Any) -> tuple[int, bytes]: ...

    def admin(self, request: dict[str, Any]) -> dict[str, Any]: ...


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


class _Stalled(Exception):
    """The peer stopped sending in the middle of its handshake or of a frame."""


class _Conn:
    """One client connection = one driver process."""

    def __init__(self, node: SocketNode, sock: socket.socket, pid: int, uid: int, gid: int) -> None:
        self.node = node
        self.sock = sock
        self.fd = sock.fileno()
        self.pid, self.uid, self.gid = pid, uid, gid
        self.name = "?"
        self.proc: Any = None
        self.lock = threading.Lock()
        self.in_flight = False
        self.peer_gone = False
        self.released = False
        self.greeted = False
        self.handshake_deadline = time.monotonic() + node.handshake_timeout
        self.thread: threading.Thread | None = None

    # ---- life cycle -----------------------------------------------------------------------------

    def release(self) -> None:
        """Close the driver process, exactly once, whoever gets here first."""
        with self.lock:
            if self.released:
                return
            self.released = True
            proc, self.proc = self.proc, None
        if proc is not None:
            try:
                self.node.driver.close_process(proc)
            except Exception:
                log.exception("close_process for pid %d failed", self.pid)

    def hangup(self) -> bool:
        """The peer is gone (or the node is closing). Returns True when a driver call is in
        flight, i.e. when the caller must release the process itself."""
        with self.lock:
            self.peer_gone = True
            busy = self.in_flight
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        return busy

    def peer_hung_up(self) -> bool:
        """Whether the socket really reports the peer gone right now."""
        p = select.poll()
        p.register(self.fd, select.POLLRDHUP)
        try:
            events = p.poll(0)
        except OSError:
            return True
        return any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, ev in events)

    def _enter_call(self) -> bool:
        with self.lock:
            if self.peer_gone:
                return False
            self.in_flight = True
            return True

    def _leave_call(self) -> bool:
        with self.lock:
            self.in_flight = False
            return not self.peer_gone

    # ---- the connection's thread ----------------------------------------------------------------

    def run(self) -> None:
        try:
            self._serve()
        except Exception:
            log.exception("connection of pid %d failed", self.pid)
        finally:
            self.release()
            self.node._forget(self)
            with contextlib.suppress(OSError):
                self.sock.close()

    def _send(self, msg: wire.Message, seq: int, timeout: float | None = None) -> bool:
        try:
            data = wire.encode(msg, seq)
        except (ValueError, TypeError) as e:
            log.error("cannot encode a reply for pid %d: %s", self.pid, e)
            data = wire.encode(wire.ErrorReply(errno.EIO, "reply could not be encoded"), seq)
        try:
            self._set_timeout(timeout)
            self.sock.sendall(data)
        except OSError:
            return False
        return True

    def _set_timeout(self, timeout: float | None) -> None:
        if timeout != self.sock.gettimeout():
            self.sock.settimeout(timeout)

    def _error(self, seq: int, err: int, text: str, fatal: bool = False) -> bool:
        timeout = _ERROR_SEND_TIMEOUT if fatal else None
        return self._send(wire.ErrorReply(err, text, fatal), seq, timeout)

    def _frames(self, decoder: wire.FrameDecoder) -> Iterator[wire.Frame]:
        """Yield frames until EOF; raises WireError on a broken stream and _Stalled when the
        handshake or a started frame is not complete in time."""
        node = self.node
        started: float | None = None  # when the frame being read began to arrive
        while True:
            frame = decoder.next_frame()
            if frame is not None:
                started = None
                yield frame
                continue
            deadline: float | None = None
            why = ""
            if not self.greeted:
                deadline = self.handshake_deadline
                why = f"no HELLO within {node.handshake_timeout:g} s"
            elif decoder.buffered:
                if started is None:
                    started = time.monotonic()
                deadline = started + node.frame_timeout
                why = f"frame not complete within {node.frame_timeout:g} s"
            # else: idle between requests, which an open process may be for ever
            timeout = None
            if deadline is not None:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    raise _Stalled(why)
            want = min(max(decoder.header_needed(), 4096), _RECV_CHUNK)
            try:
                self._set_timeout(timeout)
                data = self.sock.recv(want)
            except TimeoutError:
                raise _Stalled(why) from None
            except OSError:
                return
            if not data:
                return
            decoder.feed(data)

    def _serve(self) -> None:
        self.name = _process_name(self.pid)
        # Until HELLO is answered the peer is nobody: it gets a few bytes' worth of buffer.
        decoder = wire.FrameDecoder(wire.MAX_HELLO_PAYLOAD)
        frames = self._frames(decoder)
        try:
            if not self._handshake(frames):
                return
            self.greeted = True
            decoder.max_payload = wire.MAX_PAYLOAD
            for frame in frames:
                if not self._handle(frame):
                    return
        except wire.WireError as e:
            log.info("pid %d (%s): broken stream: %s", self.pid, self.name, e)
            self._error(0, e.errno, str(e), fatal=True)
        except _Stalled as e:
            log.info("pid %d (%s): dropped: %s", self.pid, self.name, e)
            self._error(0, errno.ETIMEDOUT, str(e), fatal=True)

    def _handshake(self, frames: Iterator[wire.Frame]) -> bool:
        frame = next(frames, None)
        if frame is None:
            return False
        try:
            msg = wire.decode(frame)
        except wire.MalformedMessage as e:
            self._error(frame.seq, e.errno, str(e), fatal=True)
            return False
        if not isinstance(msg, wire.Hello):
            self._error(frame.seq, errno.EPROTO, "the first frame must be HELLO", fatal=True)
            return False
        version = wire.negotiate(msg)
        if version is None:
            self._error(
                frame.seq,
                errno.EPROTONOSUPPORT,
                f"node speaks wire versions {wire.MIN_WIRE_VERSION}..{wire.MAX_WIRE_VERSION}",
                fatal=True,
            )
            return False
        with self.lock:
            if self.peer_gone:
                return False
        try:
            proc = self.node.driver.open_process(self.pid, self.uid, self.name)
        except Exception as e:
            log.exception("open_process for pid %d failed", self.pid)
            self._error(frame.seq, errno.EIO, f"cannot open a process: {e}", fatal=True)
            return False
        # Nothing else releases a connection that has no call in flight (the watcher and
        # close() leave that to this thread), so the process is simply ours to record.
        with self.lock:
            self.proc = proc
        reply = wire.HelloReply(version, wire.MAX_PAYLOAD, wire.MAX_REGIONS, self.node.name)
        return self._send(reply, frame.seq)

    def _handle(self, frame: wire.Frame) -> bool:
        if frame.kind == wire.Kind.ADMIN and self.uid not in self.node.admin_uids:
            # refused before its (up to 4 MiB of) JSON is parsed
            return self._error(
                frame.seq, errno.EACCES, "admin requests need the node owner or root"
            )
        try:
            msg = wire.decode(frame)
        except wire.MalformedMessage as e:
            return self._error(frame.seq, e.errno, str(e))
        if isinstance(msg, wire.IoctlRequest):
            reply = self._ioctl(msg)
            if reply is None:
                return False
            return self._send(reply, frame.seq)
        if isinstance(msg, wire.AdminRequest):
            return self._admin(msg, frame.seq)
        return self._error(frame.seq, errno.EPROTO, f"unexpected {type(msg).__name__}")

    def _ioctl(self, req: wire.IoctlRequest) -> wire.IoctlReply | None:
        desc = IOCTLS_BY_CODE.get(req.code)
        if desc is None:
            return wire.IoctlReply(-errno.ENOTTY, req.struct)
        if len(req.struct) < desc.size:
            return wire.IoctlReply(-errno.EFAULT, req.struct)
        if len(req.struct) > desc.size:
            return wire.IoctlReply(-errno.EINVAL, req.struct)
        mem = RegionUserMemory(req.regions)
        if not self._enter_call():
            return None
        try:
            ret, out = self.node.driver.ioctl(self.proc, req.code, req.struct, mem)
        except Exception:
            log.exception("driver ioctl 0x%08x from pid %d raised", req.code, self.pid)
            ret, out = -errno.EIO, req.struct
        finally:
            alive = self._leave_call()
        if not alive:
            return None
        if (
            not isinstance(ret, int)
            or not _I64_MIN <= ret <= _I64_MAX
            or not isinstance(out, bytes | bytearray)
            or len(out) != len(req.struct)
        ):
            log.error("driver ioctl 0x%08x returned a malformed result", req.code)
            return wire.IoctlReply(-errno.EIO, req.struct)
        return wire.IoctlReply(ret, bytes(out), mem.writes())

    def _admin(self, msg: wire.AdminRequest, seq: int) -> bool:
        try:
            reply = self.node.driver.admin(msg.request)
        except Exception as e:
            log.exception("driver admin request failed")
            return self._error(seq, errno.EIO, f"admin request failed: {type(e).__name__}")
        if not isinstance(reply, dict):
            return self._error(seq, errno.EIO, "driver returned a non-object")
        try:
            data = wire.encode(wire.AdminReply(reply), seq)
        except (ValueError, TypeError) as e:
            return self._error(seq, errno.EMSGSIZE, f"admin reply too large: {e}")
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        return True


class SocketNode:
    """Serve ``driver`` on an ``AF_UNIX`` stream socket at ``path``.

    ``mode``/``group`` set the socket's permissions as for a device node (``/dev/dxg`` is
    0666). The parent directory is created if missing. A live socket at ``path`` is never
    replaced (:class:`NodeBusy`); a stale one (nobody listening) is. ``admin_uids`` may use the
    ADMIN request (default: root and the node's own user).

    ``max_connections`` caps connections in all, ``max_per_uid`` (default
    ``max(1, max_connections // 4)``) those of one uid other than root. ``handshake_timeout``
    bounds the time from accept to HELLO, ``frame_timeout`` the time a request frame may take
    to arrive once it has begun; an idle connection is never timed out.
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
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if max_per_uid is None:
            max_per_uid = max(1, max_connections // 4)
        if max_per_uid < 1:
            raise ValueError("max_per_uid must be at least 1")
        if not handshake_timeout > 0 or not frame_timeout > 0:
            raise ValueError("timeouts must be positive")
        self.driver = driver
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
        self._lock = threading.Lock()
        self._conns: dict[int, _Conn] = {}
        self._per_uid: dict[int, int] = {}
        self._listener: socket.socket | None = None
        self._epoll: select.epoll | None = None
        self._wake_r = self._wake_w = -1
        self._watcher: threading.Thread | None = None
        self._inode: tuple[int, int] | None = None
        self._closing = False
        self._started = False

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

    # ---- start ----------------------------------------------------------------------------------

    def start(self) -> None:
        if self._started:
            raise RuntimeError("node already started")
        path = self._path
        if len(os.fsencode(path)) > _UNIX_PATH_MAX:
            raise OSError(errno.ENAMETOOLONG, f"node path too long for a Unix socket: {path}")
        self._prepare_dir(path.parent)
        self._check_existing(path)
        gid = self._group_id()
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}"
        if len(os.fsencode(tmp)) > _UNIX_PATH_MAX:
            tmp = path  # no room for a temporary name: bind in place
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(os.fspath(tmp))
            try:
                os.chmod(tmp, self.mode)
                if gid is not None:
                    os.chown(tmp, -1, gid)
                listener.listen(128)
                if tmp != path:
                    os.rename(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            st = os.stat(path)
            self._inode = (st.st_dev, st.st_ino)
            listener.setblocking(False)
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._epoll = select.epoll()
            self._epoll.register(listener.fileno(), select.EPOLLIN)
            self._epoll.register(self._wake_r, select.EPOLLIN)
        except BaseException:
            listener.close()
            self._close_poll()
            raise
        self._listener = listener
        self._started = True
        self._watcher = threading.Thread(
            target=self._watch, name=f"dxg-node-accept:{path.name}", daemon=True
        )
        self._watcher.start()
        log.info("node serving %s (mode %o)", path, self.mode)

    def _prepare_dir(self, parent: Path) -> None:
        """Create the node's directory if missing and make sure nobody else controls it: it
        must be this user's or root's (and not world-writable unless sticky), or its owner
        could swap the socket. ``/tmp/pydxg-<uid>`` is created private (0700)."""
        parent.mkdir(
            mode=0o700 if parent == tmp_fallback_dir() else 0o755, parents=True, exist_ok=True
        )
        st = os.stat(parent)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, f"not a directory: {parent}")
        problem = node_dir_problem(parent)
        if problem is not None:
            raise PermissionError(errno.EPERM, f"refusing to serve a node there: {problem}")

    def _check_existing(self, path: Path) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise NodeBusy(errno.EEXIST, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.settimeout(1.0)
        try:
            probe.connect(os.fspath(path))
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

    # ---- the watcher: accepts connections and notices peers that hang up --------------------

    def _watch(self) -> None:
        ep, listener = self._epoll, self._listener
        assert ep is not None and listener is not None
        lfd = listener.fileno()
        while True:
            try:
                events = ep.poll()
            except InterruptedError:
                continue
            except OSError:
                return
            for fd, ev in events:
                if fd == self._wake_r:
                    if self._closing:
                        return
                    with contextlib.suppress(OSError):
                        os.read(self._wake_r, 512)
                elif fd == lfd:
                    self._accept_all(listener)
                else:
                    self._peer_event(fd, ev)

    def _accept_all(self, listener: socket.socket) -> None:
        while not self._closing:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept failed: %s", e)
                    time.sleep(0.05)  # out of descriptors: back off instead of spinning
                    return
                if e.errno == errno.ECONNABORTED:
                    continue
                return
            self._start_conn(sock)

    def _start_conn(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        except OSError:
            sock.close()  # gone before we could look at it
            return
        pid, uid, gid = _UCRED.unpack(creds)
        conn = _Conn(self, sock, pid, uid, gid)
        with self._lock:
            refusal = self._admit(conn)
        if refusal is not None:
            err, text = refusal
            log.info("refused a connection from pid %d uid %d: %s", pid, uid, text)
            with contextlib.suppress(OSError):
                sock.settimeout(_ERROR_SEND_TIMEOUT)
                sock.sendall(wire.encode(wire.ErrorReply(err, text, True), 0))
            sock.close()
            return
        assert self._epoll is not None
        try:
            self._epoll.register(conn.fd, select.EPOLLRDHUP | select.EPOLLET)
        except OSError:
            pass
        conn.thread = threading.Thread(
            target=conn.run, name=f"dxg-node-conn:{conn.fd}", daemon=True
        )
        conn.thread.start()

    def _admit(self, conn: _Conn) -> tuple[int, str] | None:
        """Take a slot for ``conn`` (under ``_lock``), or say why not."""
        if self._closing:
            return errno.ESHUTDOWN, "node is closing"
        if len(self._conns) >= self.max_connections:
            return errno.EMFILE, f"node is full ({self.max_connections} connections)"
        held = self._per_uid.get(conn.uid, 0)
        if conn.uid != 0 and held >= self.max_per_uid:
            return (
                errno.EMFILE,
                f"uid {conn.uid} already holds {held} connections, the most one user may",
            )
        self._conns[conn.fd] = conn
        self._per_uid[conn.uid] = held + 1
        return None

    def _peer_event(self, fd: int, ev: int) -> None:
        if not ev & (select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR):
            return
        with self._lock:
            conn = self._conns.get(fd)
        if conn is None or not conn.peer_hung_up():
            return  # stale event for a descriptor that has since been reused
        if conn.hangup():
            # The connection's thread is blocked in the driver: close the process now.
            threading.Thread(
                target=conn.release, name=f"dxg-node-reap:{conn.pid}", daemon=True
            ).start()

    def _forget(self, conn: _Conn) -> None:
        with self._lock:
            if self._conns.get(conn.fd) is conn:
                del self._conns[conn.fd]
                left = self._per_uid.get(conn.uid, 0) - 1
                if left > 0:
                    self._per_uid[conn.uid] = left
                else:
                    self._per_uid.pop(conn.uid, None)
                if self._epoll is not None:
                    with contextlib.suppress(OSError, ValueError):
                        self._epoll.unregister(conn.fd)

    # ---- introspection --------------------------------------------------------------------------

    def connections(self) -> list[dict[str, Any]]:
        with self._lock:
            conns = list(self._conns.values())
        return [{"pid": c.pid, "uid": c.uid, "gid": c.gid, "name": c.name} for c in conns]

    # ---- close ----------------------------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection (closing its process) and unlink the socket.
        Idempotent."""
        with self._lock:
            if self._closing or not self._started:
                self._closing = True
                return
            self._closing = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout)
        if self._listener is not None:
            self._listener.close()
        self._unlink_own()
        with self._lock:
            conns = list(self._conns.values())
        idle = []
        for conn in conns:
            if conn.hangup():
                conn.release()  # its thread is stuck in the driver; it exits when that returns
            else:
                idle.append(conn)
        deadline = time.monotonic() + timeout
        for conn in idle:  # these release their own process on the way out
            if conn.thread is not None and conn.thread is not threading.current_thread():
                conn.thread.join(max(deadline - time.monotonic(), 0))
        self._close_poll()

    def _unlink_own(self) -> None:
        try:
            st = os.lstat(self._path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) == self._inode:
            with contextlib.suppress(OSError):
                os.unlink(self._path)

    def _close_poll(self) -> None:
        with self._lock:
            ep, self._epoll = self._epoll, None
        if ep is not None:
            ep.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1
