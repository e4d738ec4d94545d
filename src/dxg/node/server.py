"""The Unix-socket front end: the socket twin of ``/dev/dxg``, on the driver's event loop.

Each accepted connection is one process, exactly as each ``open("/dev/dxg")`` is in the kernel:
the peer's pid/uid/gid come from ``SO_PEERCRED``, its groups from ``SO_PEERGROUPS`` (what the
guest's policy matches: dxg.guest.policy), its name from ``/proc/<pid>/comm``, and
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

Limits on what a client can hold (defaults in brackets; root is held to the per-connection
limits and the totals, never to a per-uid limit):

* Before HELLO is answered the node reads frames of at most ``wire.MAX_HELLO_PAYLOAD`` bytes,
  and the whole handshake must be over within ``handshake_timeout`` (10 s) of the accept;
  after that the limit is ``wire.MAX_PAYLOAD``.
* A request frame, once its first byte has arrived, must be complete within ``frame_timeout``
  (30 s). A connection idle *between* requests is never timed out: it is an open process.
* Calls: at most ``max_calls`` (256) run at once per connection. Requests read past that wait
  in the connection's queue, at most ``max_queued`` (256) of them, and start first come first
  served as running calls finish. Frames are decoded as soon as they are read, whatever the
  number of calls, so a CANCEL is handled at once: a running call is interrupted and answered
  ``-EINTR`` (an ADMIN: ERROR(EINTR)); a queued one is taken out of the queue and answered the
  same way without ever running. Only when a request finds no room (the queue full, or the
  byte limits below) does the node stop reading from the connection: that request waits, read
  but not queued, with whatever follows it (a CANCEL included) unread. Reading resumes once
  the queue has drained to half (and the bytes to half of their limit). Nothing is refused.
* Bytes: the requests a connection has running or queued hold at most ``max_call_bytes``
  (32 MiB) of frames, those of all connections of one uid at most ``max_call_bytes_per_uid``
  (128 MiB), those of everyone (root included) at most ``max_total_call_bytes`` (512 MiB);
  past any, requests wait as above (a connection waiting for its user's bytes tries again as
  soon as any call of that user ends; one waiting for the total, when any call ends). A connection holding nothing is never
  held back by its own limit, so one maximal request (4 MiB) always fits. An OUT-only region
  costs nothing until the driver writes into it (:mod:`dxg.node.usermem`).
* A connection whose reading is paused (for room, or for a reply backlog) is still watched
  for a hang-up: a client that goes meanwhile has its calls cancelled and its process closed
  at once, its unread requests dropped.
* Descriptors: only the ioctls named in :data:`FD_IOCTLS` take descriptors; any other request
  carrying some gets ``-EINVAL`` and they are closed. The calls of one connection hold at most
  ``max_fds`` (64) descriptors, those of one uid at most ``max_fds_per_uid`` (256), those of
  everyone at most ``max_total_fds`` (2048); a request whose descriptors would pass any gets
  ``-EMFILE`` (they are closed). A reply whose descriptors cannot be kept for a slow reader
  (the node is out of descriptors) is answered ``-EMFILE``, and nothing leaks.
* Replies the client does not read: while more than ``pause_buffer`` (1 MiB) bytes wait for it,
  the node reads no new requests from it. At most ``max_buffer`` (9 MiB) bytes wait for one
  client (past it that client is dropped), ``max_buffer_per_uid`` (a quarter of the total, and
  at least ``max_buffer``) for all the connections of one uid, and ``max_total_buffer``
  (256 MiB) for all clients. When a user's share or the whole pool is full, the node makes room
  by dropping the connection holding the most unread bytes (of that user, or of anyone): the
  client whose reply does not fit is dropped only when it holds the most itself. A client that
  takes nothing for ``send_timeout`` (30 s) seconds while replies wait is dropped. A dropped
  client's process is closed like any other.
* At most ``max_connections`` connections in all, and at most ``max_per_uid`` (default a
  quarter of that) per peer uid. Refused connections get a fatal ERROR (``EMFILE``) saying
  which limit.
"""

from __future__ import annotations

import asyncio
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
from collections import deque
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Protocol

from dxg.node.admission import EXEMPT_UID, UidCounter, peer_groups, process_name
from dxg.node.usermem import RegionUserMemory
from dxg.oslib.fds import close_foreign
from dxg.runtime.logs import LogLimiter
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

__all__ = ["FD_IOCTLS", "NodeBusy", "NodeDriver", "SocketNode"]

log = logging.getLogger(__name__)

# The ioctls (by name) that may take descriptors from the caller: a request of any other code
# that carries descriptors is refused with -EINVAL before it is queued: the escape (pydxg's
# FD_IN escapes, e.g. EVENTFD_SIGNAL), the sync ioctls that take eventfds, and the calls that
# take a share descriptor or a sync file back.
FD_IOCTLS: frozenset[str] = frozenset({
    "LX_DXESCAPE",
    # eventfds of sync objects (dxg.guest.ioctl_sync): a CPU notification, an asynchronous CPU
    # wait, a signal with enqueue_cpu_event
    "LX_DXCREATESYNCHRONIZATIONOBJECT", "LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU",
    "LX_DXSIGNALSYNCHRONIZATIONOBJECT", "LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMGPU2",
    # share descriptors and sync files handed back (dxg.guest.ioctl_share)
    "LX_DXQUERYRESOURCEINFOFROMNTHANDLE", "LX_DXOPENRESOURCEFROMNTHANDLE",
    "LX_DXOPENSYNCOBJECTFROMNTHANDLE2", "LX_DXWAITSYNCFILE", "LX_DXOPENSYNCOBJECTFROMSYNCFILE",
})

_UCRED = struct.Struct("iII")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }
_HANDSHAKE_TIMEOUT = 10.0
_FRAME_TIMEOUT = 30.0
_SEND_TIMEOUT = 30.0
_MAX_BUFFER = 2 * wire.MAX_PAYLOAD + 1024 * 1024
_PAUSE_BUFFER = 1024 * 1024
_MAX_TOTAL_BUFFER = 256 * 1024 * 1024
_MAX_CALLS = 256
_MAX_QUEUED = 256
_MAX_CALL_BYTES = 32 * 1024 * 1024
_MAX_CALL_BYTES_PER_UID = 128 * 1024 * 1024
_MAX_FDS = 64
_MAX_FDS_PER_UID = 256
_MAX_TOTAL_CALL_BYTES = 512 * 1024 * 1024
_MAX_TOTAL_FDS = 2048
_UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
_CALL_KINDS = frozenset({wire.Kind.IOCTL, wire.Kind.ADMIN})
_FD_MASK = wire.FLAG_FD_MASK
_STRUCT_TYPES = (bytes, bytearray)  # what a driver's ioctl may hand back as the struct


class NodeDriver(Protocol):
    """What the node needs from the driver (``dxg.guest.driver.GuestDriver`` is one). Everything
    but ``rt`` is called on the driver's loop."""

    rt: LoopThread

    def open_process(self, pid: int, uid: int, name: str,
                     gids: tuple[int, ...] = ()) -> Any: ...

    async def close_process(self, proc: Any) -> None: ...

    async def ioctl(self, proc: Any, code: int, arg: bytes, mem: Any) -> tuple[int, bytes]: ...

    async def admin(self, request: dict[str, Any]) -> dict[str, Any]: ...


class NodeBusy(FileExistsError):
    """Another node is already serving at this path (or it is not a socket)."""


class _Call:
    """One request admitted: queued, then running. It holds its frame's bytes (``cost``) and
    its descriptors (in ``mem``) against its connection's and its user's limits until it ends."""

    __slots__ = ("cost", "fds", "future", "mem", "request", "seq")

    def __init__(self, seq: int, request: wire.IoctlRequest | wire.AdminRequest,
                 mem: RegionUserMemory | None, cost: int, fds: int) -> None:
        self.seq = seq
        self.request = request
        self.mem = mem
        self.cost = cost
        self.fds = fds
        self.future: asyncio.Future[None] | None = None


class _Conn:
    """One client connection = one driver process (a transport Receiver, on the loop)."""

    def __init__(self, node: SocketNode, sock: socket.socket, pid: int, uid: int,
                 gid: int) -> None:
        self.node = node
        self.pid, self.uid, self.gid = pid, uid, gid
        self.gids: tuple[int, ...] = (gid,)
        self.name = process_name(pid) or "?"
        self.proc: Any = None
        self.transport = SocketTransport(node.loop, sock, f"pid {pid}",
                                         send_timeout=node.send_timeout,
                                         max_buffer=node.max_buffer,
                                         max_fds=4 * wire.MAX_FDS,
                                         budget=node._budget_for(uid),
                                         read_buffer=node.read_buffer)
        self.transport.on_drained = self._pump
        self.decoder = wire.FrameDecoder(wire.MAX_HELLO_PAYLOAD)
        self.fds: deque[int] = deque()  # received, not yet claimed by a frame
        self.calls = TaskSet(f"pid {pid}", node.loop)
        self.running: dict[int, _Call] = {}  # seq -> call that has to wait (a task)
        self.queue: deque[_Call] = deque()  # calls waiting for a free slot, in order
        self.queued: dict[int, _Call] = {}  # the same, by seq
        self.held_bytes = 0  # frame bytes of the calls running or queued
        self.held_fds = 0  # descriptors they hold
        self.waiting: wire.Frame | None = None  # a request read that found no room
        self.greeted = False
        self.gone = False
        self.broken = False  # the stream broke: nothing more is taken from it
        self.paused = False
        self._pumping = False
        self._repump = False
        self._wake: asyncio.Handle | None = None
        self.watched_fd = -1  # registered for hang-ups while reading is paused
        self._stall: asyncio.TimerHandle | None = None
        self._handshake = node.loop.call_later(node.handshake_timeout, self._handshake_late)
        self._admin_chunks: int = wire.MAX_PAYLOAD

    def __repr__(self) -> str:
        return f"<node conn pid={self.pid} uid={self.uid}>"

    # ---- sending ------------------------------------------------------------------------------

    def send(self, msg: wire.Message, seq: int, fds: list[int] | None = None) -> bool:
        """Queue one message; False (and the connection dropped) when it cannot go. ``fds`` go
        beside it and stay the caller's (the transport keeps copies while they wait); OSError
        when those copies cannot be made (EMFILE): nothing was sent, the caller may answer
        otherwise."""
        if self.gone:
            return False
        try:
            data = wire.encode(msg, seq)
        except (ValueError, TypeError) as e:
            log.error("cannot encode a reply for pid %d: %s", self.pid, e)
            fds = None
            data = wire.encode(wire.ErrorReply(errno.EIO, "reply could not be encoded"), seq)
        transport = self.transport
        try:
            transport.write(data, fds or ())
        except (TransportClosed, ValueError):
            return False
        if transport.buffered > self.node.pause_buffer:  # as _check_backlog
            self._pause()
        return True

    def _check_backlog(self) -> None:
        """A client that lets replies pile up gets no new requests read until it catches up."""
        if self.transport.buffered > self.node.pause_buffer:
            self._pause()

    def _pause(self) -> None:
        """Stop reading; the node still sees at once if the peer hangs up meanwhile."""
        if not self.paused and not self.gone:
            self.paused = True
            self.transport.pause_reading()
            self.node._watch_hangup(self)

    def _resume(self) -> None:
        if self.paused and not self.gone and not self.broken:
            self.paused = False
            self.node._unwatch_hangup(self)
            self.transport.resume_reading()

    def error(self, seq: int, err: int, text: str, fatal: bool = False) -> None:
        self.send(wire.ErrorReply(err, text, fatal), seq)
        if fatal:
            self.node.loop.call_soon(self.transport.close, None)

    # ---- receiving (Receiver) -----------------------------------------------------------------

    def data_received(self, data: bytes, fds: list[int]) -> None:
        if (not fds and self.greeted and not self._pumping and self.waiting is None
                and not self.queue and not self.fds and not self.gone and not self.broken
                and self.transport.buffered <= self.node.pause_buffer):
            # The common read: exactly one whole request and nothing else pending. It is taken
            # as _pump would take it (the same checks, through _handle), minus the buffering.
            frame = self.decoder.take_whole(data)
            if frame is not None:
                self._take_one(frame)
                return
        if self.gone or self.broken:
            close_foreign(fds)
            return
        try:
            if fds:
                self.fds.extend(fds)
                if len(self.fds) > 4 * wire.MAX_FDS:
                    raise wire.WireError(errno.EPROTO, "descriptors arrived that no frame claims")
            self.decoder.feed(data)
        except wire.WireError as e:
            self._broken(e)
            return
        self._pump()

    def _broken(self, e: wire.WireError) -> None:
        log.info("pid %d (%s): broken stream: %s", self.pid, self.name, e)
        self._pause()  # nothing more is read: the stream cannot be trusted
        self.broken = True
        self.error(0, e.errno, str(e), fatal=True)

    def _pump(self) -> None:
        """Start queued calls while there are free slots, take the frames read while there is
        room for them, and read on only while there is. Runs after every read, every call that
        ends and every drained backlog; re-entered (a call that ends at once), it runs again
        after the current pass instead."""
        if self._pumping:
            self._repump = True
            return
        if self.broken:
            return
        self._pumping = True
        try:
            while not self.gone:
                self._repump = False
                if self.queue:
                    self._start_queued()
                self._take_frames()
                if not self._repump:
                    break
        except wire.WireError as e:
            self._broken(e)
            return
        finally:
            self._pumping = False
        self._pumped()

    def _pumped(self) -> None:
        """After a pass: pause or resume reading, and watch a partial frame."""
        if self.gone:
            return
        if self.waiting is not None or self.transport.buffered > self.node.pause_buffer:
            self._pause()
        elif self.paused:
            self._resume()
        if self._stall is not None or self.decoder.buffered:
            self._watch_partial()  # (nothing to do otherwise)

    def _take_one(self, frame: wire.Frame) -> None:
        """One pass of :meth:`_pump` over a single frame read whole, with nothing queued,
        waiting or buffered before it and no descriptors (see data_received)."""
        self._pumping = True
        self._repump = False
        try:
            cost = wire.HEADER_SIZE + len(frame.payload) if frame.kind in _CALL_KINDS else 0
            if cost and not self._room(cost, False):
                self.waiting = frame
            elif frame.flags & _FD_MASK:
                raise wire.WireError(errno.EPROTO, "a frame claims descriptors that did not "
                                                   "arrive")
            else:
                self._handle(frame, [], cost)
        except wire.WireError as e:
            self._broken(e)
            return
        finally:
            self._pumping = False
        if self._repump:
            self._pump()  # (it runs the rest of the pass)
        else:
            self._pumped()

    def _start_queued(self) -> None:
        while self.queue and len(self.running) < self.node.max_calls and not self.gone:
            call = self.queue.popleft()
            del self.queued[call.seq]
            self._start(call)

    def _take_frames(self) -> None:
        transport, node, decoder = self.transport, self.node, self.decoder
        while not self.gone:
            if transport.buffered > node.pause_buffer:
                return  # a backlog: nothing new until the client reads its replies
            frame, retry = self.waiting, True
            if frame is None:
                frame, retry = decoder.next_frame(), False
                if frame is None:
                    return
            self.waiting = None
            cost = wire.HEADER_SIZE + len(frame.payload) \
                if self.greeted and frame.kind in _CALL_KINDS else 0
            if cost and not self._room(cost, retry):
                self.waiting = frame
                return
            count = frame.flags & _FD_MASK
            fds: list[int] = []
            if count:
                if count > len(self.fds):
                    raise wire.WireError(errno.EPROTO, "a frame claims descriptors that did "
                                                       "not arrive")
                fds = [self.fds.popleft() for _ in range(count)]
            self._handle(frame, fds, cost)

    def _room(self, cost: int, retry: bool) -> bool:
        """Whether a request of ``cost`` bytes may be admitted now (``retry``: one that found no
        room before, admitted again only once the queue and the bytes are down to half)."""
        node = self.node
        if len(self.queue) >= (node.max_queued // 2 + 1 if retry else node.max_queued):
            return False
        limit = node.max_call_bytes // 2 if retry else node.max_call_bytes
        if self.held_bytes and self.held_bytes + cost > limit:
            return False
        if not node.call_bytes.fits(self.uid, cost):
            node._wait_for_uid(self, cost)
            return False
        return True

    def wake(self) -> None:
        """Another connection of this user let bytes go: try the waiting request again (soon,
        from the loop: never nested in that connection's own work)."""
        if self._wake is None and not self.gone:
            self._wake = self.node.loop.call_soon(self._woken)

    def _woken(self) -> None:
        self._wake = None
        self._pump()

    def _watch_partial(self) -> None:
        """A frame begun must be complete within frame_timeout (an idle connection is fine, and
        so is one whose frames wait because it holds too much)."""
        if not self.greeted:
            return  # the handshake deadline covers it
        if self.decoder.buffered and not self.paused:
            if self._stall is None:
                self._stall = self.node.loop.call_later(self.node.frame_timeout, self._stalled)
        elif self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _stalled(self) -> None:
        self._stall = None
        if self.decoder.buffered and not self.gone and not self.paused:
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
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        self.node._unwatch_hangup(self)
        close_foreign(self.fds)
        self.fds.clear()
        self.waiting = None
        queued = list(self.queue)
        self.queue.clear()
        self.queued.clear()
        for call in queued:
            self._finish(call)
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

    def _handle(self, frame: wire.Frame, fds: list[int], cost: int) -> None:
        if not self.greeted:
            close_foreign(fds)
            self._hello(frame)
            return
        # Any uid may send one kind of ADMIN, "restrict" (lower its own process's limits);
        # every other op needs an admin uid. A non-admin's is refused before its JSON is parsed unless it
        # is small (a restrict request of 64 LUIDs is about 1.5 KiB).
        admin = frame.kind == wire.Kind.ADMIN and self.uid in self.node.admin_uids
        if frame.kind == wire.Kind.ADMIN and not admin and len(frame.payload) > 4096:
            close_foreign(fds)
            self.error(frame.seq, errno.EACCES, "admin requests need the node owner or root "
                       "(other users may send only a short \"restrict\")")
            return
        try:
            msg = wire.decode(frame)
        except wire.MalformedMessage as e:
            close_foreign(fds)
            self.error(frame.seq, e.errno, str(e))
            return
        if isinstance(msg, wire.IoctlRequest):
            self._ioctl(frame.seq, msg, fds, cost)
        elif isinstance(msg, wire.Cancel):
            self._cancel(frame.seq)
        elif isinstance(msg, wire.AdminRequest):
            if not admin and msg.request.get("op") != "restrict":
                close_foreign(fds)
                self.error(frame.seq, errno.EACCES, "admin requests need the node owner or root "
                           "(other users may send only \"restrict\")")
                return
            if self._busy(frame.seq):
                return
            self._admit(_Call(frame.seq, msg, None, cost, 0))
        else:
            close_foreign(fds)
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
            self.proc = self.node.driver.open_process(self.pid, self.uid, self.name,
                                                      self.gids)
        except Exception as e:
            log.exception("open_process for pid %d failed", self.pid)
            self.error(frame.seq, errno.EIO, f"cannot open a process: {e}", fatal=True)
            return
        self.greeted = True
        self._handshake.cancel()
        self.decoder.max_payload = wire.MAX_PAYLOAD
        self.send(wire.HelloReply(version, wire.MAX_PAYLOAD, wire.MAX_REGIONS, wire.MAX_FDS,
                                  self.node.name), frame.seq)

    def _busy(self, seq: int) -> bool:
        """A request whose seq is still in flight gets EBUSY (the wire's rule)."""
        if seq in self.running or seq in self.queued:
            self.error(seq, errno.EBUSY, f"seq {seq} is already in flight")
            return True
        return False

    def _ioctl(self, seq: int, req: wire.IoctlRequest, fds: list[int], cost: int) -> None:
        desc = IOCTLS_BY_CODE.get(req.code)
        ret = 0
        if desc is None:
            ret = -errno.ENOTTY
        elif (n := len(req.struct)) != desc.size:
            ret = -errno.EFAULT if n < desc.size else -errno.EINVAL
        elif fds and desc.name not in FD_IOCTLS:
            ret = -errno.EINVAL  # this ioctl takes no descriptors: none is held for it
        if ret:
            close_foreign(fds)
            self.send(wire.IoctlReply(ret, req.struct), seq)
            return
        if (seq in self.running or seq in self.queued) and self._busy(seq):
            close_foreign(fds)
            return
        node = self.node
        if fds and (self.held_fds + len(fds) > node.max_fds
                    or not node.call_fds.fits(self.uid, len(fds))):
            close_foreign(fds)
            node.logs.log(logging.INFO, "descriptors refused",
                          "pid %d (%s): descriptors refused: the calls of this %s hold too many",
                          self.pid, self.name,
                          "process" if self.held_fds + len(fds) > node.max_fds else "user")
            self.send(wire.IoctlReply(-errno.EMFILE, req.struct), seq)
            return
        mem = RegionUserMemory(req.regions, fds, req.fd_numbers)
        self._admit(_Call(seq, req, mem, cost, len(fds)))

    def _admit(self, call: _Call) -> None:
        """Charge a checked request to its connection and user; start it, or queue it."""
        node = self.node
        self.held_bytes += call.cost
        node.call_bytes.add(self.uid, call.cost)
        if call.fds:
            self.held_fds += call.fds
            node.call_fds.add(self.uid, call.fds)
        if not self.queue and len(self.running) < node.max_calls:
            self._start(call)
        else:
            self.queue.append(call)
            self.queued[call.seq] = call

    def _start(self, call: _Call) -> None:
        """Run the call eagerly: most finish right here; one that waits is tracked by seq."""
        coro: Coroutine[Any, Any, None]
        if isinstance(call.request, wire.IoctlRequest):
            assert call.mem is not None
            coro = self._run_ioctl(call.seq, call.request, call.mem)
        else:
            coro = self._admin(call.seq, call.request)
        future = self.calls.start(coro, f"pid {self.pid} seq {call.seq}")
        if future is None:  # it returned at once (nothing to log)
            self._finish(call)
            return
        if future.done():
            self._ended(future, call)
            return
        call.future = future
        self.running[call.seq] = call
        future.add_done_callback(lambda f: self._call_done(f, call))

    def _call_done(self, future: asyncio.Future[None], call: _Call) -> None:
        if self.running.get(call.seq) is call:
            del self.running[call.seq]
        self._ended(future, call)
        self._pump()

    def _ended(self, future: asyncio.Future[None], call: _Call) -> None:
        if not future.cancelled() and future.exception() is not None:
            log.error("pid %d: call %d failed", self.pid, call.seq, exc_info=future.exception())
        self._finish(call)

    def _finish(self, call: _Call) -> None:
        """The call is over (answered, cancelled, or its process gone): give back what it held."""
        if call.mem is not None:
            call.mem.close()  # a call that never ran still closes its descriptors
        node = self.node
        self.held_bytes -= call.cost
        node.call_bytes.remove(self.uid, call.cost)
        if call.fds:
            self.held_fds -= call.fds
            node.call_fds.remove(self.uid, call.fds)
        if call.cost and node._uid_waiters:
            node._uid_released(self.uid)  # (it wakes the connections waiting for room)

    def _cancel(self, seq: int) -> None:
        """CANCEL: interrupt the call if it runs; take it out of the queue if it waits there."""
        call = self.running.get(seq)
        if call is not None:
            if call.future is not None:
                call.future.cancel()  # the call answers -EINTR itself
            return
        call = self.queued.pop(seq, None)
        if call is None:
            return  # already answered (or never sent): CANCEL gets no reply
        self.queue.remove(call)
        if isinstance(call.request, wire.IoctlRequest):
            self.send(wire.IoctlReply(-errno.EINTR, call.request.struct), seq)
        else:
            self.error(seq, errno.EINTR, "admin request cancelled")
        self._finish(call)

    async def _run_ioctl(self, seq: int, req: wire.IoctlRequest, mem: RegionUserMemory) -> None:
        try:
            try:
                ret, out = await self.node.driver.ioctl(self.proc, req.code, req.struct, mem)
            except asyncio.CancelledError:
                if not self.gone:  # cancelled by the client (CANCEL): its call was interrupted
                    self._fail_with_maps(seq, -errno.EINTR, req.struct, mem)
                raise
            except Exception:
                log.exception("driver ioctl 0x%08x from pid %d raised", req.code, self.pid)
                ret, out = -errno.EIO, req.struct
            if (
                not isinstance(ret, int)
                or not _I64_MIN <= ret <= _I64_MAX
                or not isinstance(out, _STRUCT_TYPES)
                or len(out) != len(req.struct)
            ):
                log.error("driver ioctl 0x%08x returned a malformed result", req.code)
                self._fail_with_maps(seq, -errno.EIO, req.struct, mem)
                return
            fds, fixups = mem.reply_fds()
            if ret < 0:
                fds, fixups = [], ()
            maps, map_fds = mem.reply_maps()  # (these go whatever ret: the driver's state says so)
            try:
                self.send(wire.IoctlReply(ret, bytes(out), mem.writes(), fixups, maps), seq,
                          fds + map_fds)
            except OSError as e:
                # the reply's descriptors could not be kept for the client (out of
                # descriptors): it gets -EMFILE, as from a kernel that cannot install them
                log.warning("pid %d: reply descriptors dropped: %s", self.pid, e)
                self._fail_with_maps(seq, -(e.errno or errno.EMFILE), req.struct, mem)
        finally:
            mem.close()

    def _fail_with_maps(self, seq: int, ret: int, struct: bytes, mem: RegionUserMemory) -> None:
        """Answer a call that failed after the driver changed what the client maps: the unmaps
        still go (the blocks are gone), and the driver learns which maps never reached the
        client (it sends their descriptors again next time)."""
        maps, _ = mem.reply_maps()
        unmaps = tuple(m for m in maps if m.op == wire.UNMAP)
        lost = [m.block for m in maps if m.op == wire.MAP and m.with_fd]
        if lost:
            self.node.driver.maps_lost(self.proc, lost)
        self.send(wire.IoctlReply(ret, struct, maps=unmaps), seq)

    async def _admin(self, seq: int, msg: wire.AdminRequest) -> None:
        restrict = msg.request.get("op") == "restrict"
        try:
            if restrict:
                # on the caller's own process (the driver refuses with an errno: EINVAL,
                # EBUSY...); a driver that cannot restrict says so
                lower = getattr(self.node.driver, "restrict", None)
                if lower is None:
                    self.error(seq, errno.EOPNOTSUPP, "this node cannot restrict processes")
                    return
                reply = lower(self.proc, msg.request)
            else:
                reply = await self.node.driver.admin(msg.request)
        except asyncio.CancelledError:
            if not self.gone:
                self.error(seq, errno.EINTR, "admin request cancelled")
            raise
        except Exception as e:
            err = getattr(e, "errno", None)
            if restrict and isinstance(err, int) and 0 < err < 4096:
                self.error(seq, err, str(e))  # refused: the caller's fault, nothing to log
                return
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
        self._check_backlog()


class SocketNode:
    """Serve ``driver`` on an ``AF_UNIX`` stream socket at ``path``, on the driver's loop.

    ``mode``/``group`` set the socket's permissions as for a device node (``/dev/dxg`` is
    0666). A missing parent directory is created (private, 0700, when it is a per-user default
    directory). A live socket at ``path`` is never replaced (:class:`NodeBusy`); a stale one
    (nobody listening) is. ``admin_uids`` may use the ADMIN request (default: root and the
    node's own user). The other keywords are the limits of the module docstring; those per uid
    bind every user but root.
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
        max_buffer_per_uid: int | None = None,
        max_calls: int = _MAX_CALLS,
        max_queued: int = _MAX_QUEUED,
        max_call_bytes: int = _MAX_CALL_BYTES,
        max_call_bytes_per_uid: int = _MAX_CALL_BYTES_PER_UID,
        max_fds: int = _MAX_FDS,
        max_fds_per_uid: int = _MAX_FDS_PER_UID,
        max_total_call_bytes: int = _MAX_TOTAL_CALL_BYTES,
        max_total_fds: int = _MAX_TOTAL_FDS,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if max_per_uid is None:
            max_per_uid = max(1, max_connections // 4)
        if max_per_uid < 1:
            raise ValueError("max_per_uid must be at least 1")
        if not handshake_timeout > 0 or not frame_timeout > 0 or not send_timeout > 0:
            raise ValueError("timeouts must be positive")
        if max_buffer_per_uid is None:
            max_buffer_per_uid = min(max(max_buffer, max_total_buffer // 4), max_total_buffer)
        if not wire.MAX_PAYLOAD < max_buffer <= max_buffer_per_uid <= max_total_buffer:
            raise ValueError("need MAX_PAYLOAD < max_buffer <= max_buffer_per_uid <= "
                             "max_total_buffer")
        if max_calls < 1 or max_queued < 1:
            raise ValueError("max_calls and max_queued must be at least 1")
        if not wire.HEADER_SIZE + wire.MAX_PAYLOAD <= max_call_bytes <= max_call_bytes_per_uid:
            raise ValueError("need one whole frame <= max_call_bytes <= max_call_bytes_per_uid")
        if max_call_bytes_per_uid > max_total_call_bytes:
            raise ValueError("need max_call_bytes_per_uid <= max_total_call_bytes")
        if not wire.MAX_FDS <= max_fds <= max_fds_per_uid <= max_total_fds:
            raise ValueError("need wire.MAX_FDS <= max_fds <= max_fds_per_uid <= max_total_fds")
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
        # Unread replies: each user but root has a share, charged before the node's pool;
        # when either is full the biggest holder of unread bytes is dropped (_evict).
        self.max_buffer_per_uid = max_buffer_per_uid
        self.write_budget = WriteBudget(max_total_buffer,
                                        evict=lambda n, who: self._evict(n, who, None))
        self._uid_budgets: dict[int, WriteBudget] = {}
        self.read_buffer = read_buffer()  # shared by every connection (all on one loop)
        self.max_calls = max_calls
        self.max_queued = max_queued
        self.max_call_bytes = max_call_bytes
        self.max_fds = max_fds
        # Frame bytes of calls, and descriptors they hold: per uid, and in all (root too).
        self.call_bytes = UidCounter(max_call_bytes_per_uid, max_total_call_bytes)
        self.call_fds = UidCounter(max_fds_per_uid, max_total_fds)
        # Connections waiting for their user's bytes (by uid), or for the total's (None).
        self._uid_waiters: dict[int | None, set[_Conn]] = {}
        self._conns: set[_Conn] = set()
        self._per_uid = UidCounter(max_per_uid)  # connections per uid
        # Connections whose reading is paused, watched for a hang-up only (an epoll of its own,
        # itself watched by the loop): a client that goes while the node reads nothing from
        # it is seen at once, and its calls cancelled.
        self._hangups: select.epoll | None = None
        self._hangup_conns: dict[int, _Conn] = {}
        self.logs = LogLimiter(log)  # what clients provoke cannot flood the log
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
        log.debug("node serving %s (mode %o)", path, self.mode)  # `dxg up` prints it

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
        hangups = select.epoll()
        try:
            self.loop.add_reader(hangups.fileno(), self._hung_up)
        except BaseException:
            hangups.close()
            listener.close()
            raise
        self._hangups = hangups
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
        conn.gids = peer_groups(sock, gid)  # (what the guest's policy matches: its groups)
        self._conns.add(conn)
        self._per_uid.add(uid)
        conn.transport.start(conn)

    def _admit(self, uid: int) -> tuple[int, str] | None:
        """Whether a connection of ``uid`` may take a slot, or why not."""
        if self._closing:
            return errno.ESHUTDOWN, "node is closing"
        if len(self._conns) >= self.max_connections:
            return errno.EMFILE, f"node is full ({self.max_connections} connections)"
        if not self._per_uid.fits(uid):
            return (
                errno.EMFILE,
                f"uid {uid} already holds {self._per_uid.held(uid)} connections, the most one "
                "user may",
            )
        return None

    def _forget(self, conn: _Conn) -> None:
        waiters = self._uid_waiters.get(conn.uid)
        if waiters is not None:
            waiters.discard(conn)
            if not waiters:
                del self._uid_waiters[conn.uid]
        if conn in self._conns:
            self._conns.discard(conn)
            self._per_uid.remove(conn.uid)
            if not self._per_uid.held(conn.uid):
                self._uid_budgets.pop(conn.uid, None)  # its transports are closed: all given back

    # ---- what users hold ------------------------------------------------------------------------

    def _budget_for(self, uid: int) -> WriteBudget:
        """The reply budget a connection of ``uid`` writes against: its user's share of the
        node's pool (root: the pool itself)."""
        if uid == EXEMPT_UID:
            return self.write_budget
        budget = self._uid_budgets.get(uid)
        if budget is None:
            budget = WriteBudget(self.max_buffer_per_uid, parent=self.write_budget,
                                 evict=lambda n, who: self._evict(n, who, uid))
            self._uid_budgets[uid] = budget
        return budget

    def _evict(self, need: int, requester: object, uid: int | None) -> bool:
        """A reply does not fit in ``uid``'s share (None: in the node's pool): drop the connection
        (of that user, or of anyone) holding the most unread bytes, unless that is the
        requester itself (False: its own write fails and drops it). True when room was made."""
        mine = 0
        victim: _Conn | None = None
        for conn in self._conns:
            if uid is not None and conn.uid != uid:
                continue
            if conn.transport is requester:
                mine = conn.transport.buffered
            elif conn.transport.buffered > (victim.transport.buffered if victim else 0):
                victim = conn
        if victim is None or victim.transport.buffered <= mine:
            return False
        why = (f"{'its user' if uid is not None else 'the node'}'s reply buffers are full and "
               f"it holds the most unread bytes ({victim.transport.buffered}); dropped")
        self.logs.log(logging.INFO, "evicted", "pid %d (%s) uid %d: %s", victim.pid,
                      victim.name, victim.uid, why)
        victim.transport.close(ConnectionError(errno.ENOBUFS, why))
        return True

    def _watch_hangup(self, conn: _Conn) -> None:
        hangups = self._hangups
        if hangups is None or conn.transport.closed:
            return
        fd = conn.transport.sock.fileno()
        try:
            try:
                hangups.register(fd, select.EPOLLRDHUP)  # (HUP and ERR come unasked)
            except FileExistsError:
                hangups.modify(fd, select.EPOLLRDHUP)
        except OSError:
            return
        self._hangup_conns[fd] = conn
        conn.watched_fd = fd

    def _unwatch_hangup(self, conn: _Conn) -> None:
        fd, conn.watched_fd = conn.watched_fd, -1
        if fd < 0 or self._hangup_conns.get(fd) is not conn:
            return  # (its descriptor closed and went to another connection meanwhile)
        del self._hangup_conns[fd]
        if self._hangups is not None:
            with contextlib.suppress(OSError):  # closed already: epoll forgot it itself
                self._hangups.unregister(fd)

    def _hung_up(self) -> None:
        if self._hangups is None:
            return
        for fd, _events in self._hangups.poll(0):
            conn = self._hangup_conns.get(fd)
            if conn is None:
                with contextlib.suppress(OSError):
                    self._hangups.unregister(fd)
                continue
            self._unwatch_hangup(conn)
            log.debug("pid %d (%s): hung up while its reading was paused", conn.pid, conn.name)
            conn.transport.close(None)

    def _wait_for_uid(self, conn: _Conn, cost: int) -> None:
        """``conn`` waits for its user's bytes, or (key None) for anyone's: the total's."""
        key = conn.uid if self.call_bytes.total_fits(cost) else None
        self._uid_waiters.setdefault(key, set()).add(conn)

    def _uid_released(self, uid: int) -> None:
        """Calls of ``uid`` let bytes go: its connections waiting for room try again, and so do
        those waiting for the total."""
        for key in (uid, None):
            for conn in self._uid_waiters.pop(key, None) or ():
                conn.wake()

    # ---- introspection --------------------------------------------------------------------------

    def connections(self) -> list[dict[str, Any]]:
        """Who is connected (any thread)."""
        if not self.rt.in_loop():
            return list(self.rt.call(self.connections))
        return [{"pid": c.pid, "uid": c.uid, "gid": c.gid, "name": c.name,
                 "calls": len(c.running), "queued": len(c.queue), "held_bytes": c.held_bytes,
                 "held_fds": c.held_fds, "buffered": c.transport.buffered}
                for c in self._conns]

    # ---- close ----------------------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> None:
        """Stop accepting, close every connection (closing its process) and unlink the socket.
        Idempotent; any thread."""
        if self._closing or not self._started:
            self._closing = True
            return
        if self.rt.closed:
            self._close_without_loop()
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
        if self._hangups is not None:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(self._hangups.fileno())
        for conn in list(self._conns):
            conn.transport.close(None)
            conn.connection_lost(None)  # starts its release now (it runs once)
        if self._hangups is not None:
            self._hangups.close()
            self._hangups = None
        self._hangup_conns.clear()
        await self._tasks.wait(timeout=10)

    def _close_without_loop(self) -> None:
        """The loop is already gone (its owner closed it first): nothing runs on it any more, so
        release what the node holds directly: the listener, the sockets of the connections,
        the socket file and the directory descriptor."""
        self._closing = True
        if self._listener is not None:
            self._listener.close()
        for conn in list(self._conns):
            conn.gone = True
            close_foreign(conn.fds)
            conn.fds.clear()
            for call in [*conn.queue, *conn.running.values()]:
                if call.mem is not None:
                    call.mem.close()
            with contextlib.suppress(OSError):
                conn.transport.sock.close()
        self._conns.clear()
        if self._hangups is not None:
            self._hangups.close()
            self._hangups = None
        self._unlink_own()

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
