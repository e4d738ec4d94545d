"""One connection to the node: this process's ``open("/dev/dxg")``.

:meth:`NodeConnection.ioctl` is the socket version of ``ioctl(fd, code, &args)``: it gathers the
user buffers the struct points at (:mod:`dxg.client.userbufs`), sends them with the struct and
the descriptors the caller hands over, applies the writes the driver made to them back into this
process's memory, copies the struct back, stores the numbers of the descriptors the driver handed
back where the reply says, and returns the raw return value (0, a positive NTSTATUS, or a
negative errno).

Any number of threads may call at once: requests go out under a send lock and the node answers
each when it is done, in any order (wire v2 matches them by ``seq``). There is no reader thread:
a waiting thread that finds nobody reading becomes the reader (leader/follower), routes every
reply it reads to its waiter, and when its own reply arrives hands the role to another waiter. A
single-threaded caller thus reads its own reply with no thread hand-off, and a call parked in the
driver parks only its own thread.

This process's memory is read with ``process_vm_readv`` on itself, so a bad pointer in a struct
gives ``-EFAULT`` from the driver, as from the kernel, instead of crashing the interpreter; the
driver's writes go back with ``process_vm_writev`` (``ctypes.memmove`` where those calls are not
allowed). A connection belongs to the process that opened it: after ``fork()`` the child gets
``-ENOTTY`` (as the kernel answers a child using its parent's ``/dev/dxg`` file) and must open
its own (:meth:`NodeConnection.reopen`).

A call interrupted while it waits (``KeyboardInterrupt`` from a signal handler) sends CANCEL for
its request, raises in the caller and leaves the connection usable: the node answers the request
with ``-EINTR`` (or had already answered), and that late reply is dropped (its writes are not
applied, its descriptors are closed). A request interrupted half-way through its send cannot be
finished, so a large one (which may be cut) drops the connection. A call given a ``timeout`` ends
the same way when it runs out (CANCEL, then :class:`TimeoutError` in the caller).
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from dxg.client.calls import (
    ARGS_TYPES,
    RECV_CHUNK,
    Delivered,
    Failure,
    NodeTarget,
    ReplyRouter,
    RouterBroken,
    SelfMemory,
    apply_ioctl_reply,
    build_ioctl,
    check_hello_reply,
    connect_error,
    connect_target,
    hello_error,
    lost,
    node_targets,
    not_found_anywhere,
)
from dxg.client.errors import (
    NodeError,
    NodeForked,
    NodeNotFound,
    NodeProtocolError,
    NodeUnavailable,
)
from dxg.client.limits import (
    as_refused,
    check_restrict_reply,
    limits_from_env,
    restrict_request,
)
from dxg.oslib.fds import close_all, recv_with_fds, send_with_fds
from dxg.uapi import wire

__all__ = ["NodeConnection"]

_READ_CHUNK = 64 * 1024
# An interrupted request up to this size is assumed whole on the wire (a Unix socket's buffer
# takes it in one piece, so the send cannot stop half-way); a bigger one drops the stream.
_ATOMIC_SEND = 64 * 1024



class _Waiter:
    """One request in flight and the thread waiting for it (its condition shares the
    connection's mutex, so the reader wakes exactly the thread whose reply came)."""

    __slots__ = ("_cond", "done", "failure", "fds", "message", "mu", "seq")

    def __init__(self, seq: int, mu: threading.Lock) -> None:
        self.seq = seq
        self.mu = mu
        self._cond: threading.Condition | None = None  # made only if this thread must wait
        self.done = False
        self.message: wire.Message | None = None
        self.fds: list[int] = []
        self.failure: Failure | None = None

    @property
    def cond(self) -> threading.Condition:
        if self._cond is None:
            self._cond = threading.Condition(self.mu)
        return self._cond

    def notify(self) -> None:
        if self._cond is not None:
            self._cond.notify()

    def finish(self, message: wire.Message | None, fds: list[int],
               failure: Failure | None) -> None:
        self.message, self.fds, self.failure = message, fds, failure
        self.done = True
        self.notify()


class NodeConnection:
    """A connection to the node at ``path`` (default :func:`~dxg.uapi.nodepath.default_node_path`).

    Raises :class:`NodeNotFound`, :class:`NodePermissionDenied` or :class:`NodeUnavailable` when
    the node cannot be reached (``timeout`` bounds the connect and the handshake). When the path
    is the implicit default (no ``path``, no ``$DXG_NODE``), a node directory that another user
    (not root) owns, or that everyone may write without the sticky bit, is refused
    (:class:`NodePermissionDenied`): someone else could have put their own socket there.
    Thread-safe: many calls may be in flight at once.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, timeout: float = 10.0) -> None:
        self._targets = node_targets(path)  # where to look, in order (dxg.client.calls)
        self.path, self._check_dir = self._targets[0].path, self._targets[0].check
        self._timeout = timeout
        self._pid = os.getpid()
        self._mem = SelfMemory()
        self.version = 0
        self.node_name = ""
        self.max_payload = wire.MAX_PAYLOAD
        self.max_regions = wire.MAX_REGIONS
        self.max_fds = wire.MAX_FDS
        self._fresh_state()
        self._connect()

    def _fresh_state(self) -> None:
        """Locks and routing state of a new stream (also in a forked child, where the parent's
        locks may have been held by threads that do not exist here)."""
        self._mu = threading.Lock()  # guards everything below but the socket I/O itself
        self._send_lock = threading.Lock()  # one frame at a time on the stream
        self._sock: socket.socket | None = None
        self._router = ReplyRouter(f"the dxg node {self.path}")
        self._waiters: dict[int, _Waiter] = {}
        self._reader: _Waiter | None = None
        self._orphans: list[socket.socket] = []  # dropped while a reader was in recv
        self._buf = bytearray(RECV_CHUNK)  # the reader's (one reader at a time)
        self._view = memoryview(self._buf)

    # ---- connecting -----------------------------------------------------------------------------

    def _connect(self) -> None:
        """Connect to the first place that holds a node (the given path, ``$DXG_NODE``, or
        this user's default path and then the system node); from then on, only to it. With
        ``$DXG_PROCESS_LIMITS`` set, the connection is restricted before it is handed out
        (dxg.client.limits)."""
        limits = limits_from_env()  # (a bad value fails before anything connects)
        targets = self._targets
        for i, where in enumerate(targets):
            self.path, self._check_dir = where.path, where.check
            try:
                self._connect_to(where)
            except NodeNotFound:
                if i + 1 < len(targets):
                    continue
                if len(targets) > 1:
                    raise not_found_anywhere(targets) from None
                raise
            self._targets = (where,)
            if limits is not None:
                try:
                    self._restrict(limits, self._timeout)
                except BaseException:
                    self._drop()  # never handed out unrestricted
                    raise
            return

    def _connect_to(self, where: NodeTarget) -> None:
        path = where.path
        target, dir_fd = connect_target(path, where.check)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self._timeout)
        try:
            sock.connect(target)
        except OSError as e:
            sock.close()
            raise connect_error(path, e, where.origin) from None
        finally:
            if dir_fd >= 0:
                os.close(dir_fd)
        with self._mu:
            self._sock = sock
            self._router = ReplyRouter(f"the dxg node {path}")
        try:
            message, fds = self._call(wire.Hello(), wire.Kind.HELLO_REPLY)
            close_all(fds)
            reply = check_hello_reply(path, message)
        except NodeError as e:
            self._drop()
            raise hello_error(path, e, where.origin) from None
        self.version = reply.version
        self.node_name = reply.node_name
        self.max_payload = min(reply.max_payload, wire.MAX_PAYLOAD)
        self.max_regions = min(reply.max_regions, wire.MAX_REGIONS)
        self.max_fds = min(reply.max_fds, wire.MAX_FDS)
        sock.settimeout(None)

    def reopen(self) -> None:
        """Drop this connection and open a new one (for a forked child, or after a loss)."""
        if self.forked:
            self._forget_parent()
        else:
            self._drop()
        self._connect()

    def _forget_parent(self) -> None:
        """In a forked child: let go of the parent's stream without touching it (the node sees
        EOF only when every process holding it has closed it) and start afresh."""
        sock = self._sock
        self._fresh_state()
        if sock is not None:
            sock.close()
        self._pid = os.getpid()
        self._mem = SelfMemory()

    @property
    def forked(self) -> bool:
        """True in a child process that inherited this connection from its parent."""
        return os.getpid() != self._pid

    @property
    def owner_pid(self) -> int:
        """The process this connection belongs to (the one that opened it)."""
        return self._pid

    def _drop(self, failure: Failure | None = None) -> None:
        """Close the stream and fail every request in flight."""
        if failure is None:
            failure = lost(f"the connection to the dxg node {self.path} is closed")
        with self._mu:
            self._drop_locked(self._sock, failure)

    def _drop_locked(self, sock: socket.socket | None, failure: Failure) -> None:
        if sock is None or sock is not self._sock:
            return  # already dropped (maybe for another reason, which the waiters got)
        self._sock = None
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes a reader blocked in recv, a sender in send
        except OSError:
            pass
        if self._reader is None:
            sock.close()
        else:
            self._orphans.append(sock)  # the reader closes it once it is out of recv
        self._router.close()
        waiters = list(self._waiters.values())
        self._waiters.clear()
        for w in waiters:
            if not w.done:
                w.finish(None, [], failure)

    def close(self) -> None:
        """Close the connection; the node then closes everything this process opened."""
        if self.forked:
            self._forget_parent()  # the parent's stream stays as it is
            return
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

    # ---- requests in flight ---------------------------------------------------------------------

    def _call(self, msg: wire.Message, expect: wire.Kind, fds: Sequence[int] = (),
              timeout: float | None = None) -> tuple[wire.Message, list[int]]:
        """Send ``msg`` and wait for its reply: (the reply, the descriptors that came with it).
        Past ``timeout`` seconds the request is cancelled (CANCEL) and TimeoutError raised."""
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        with self._mu:
            if self._sock is None:
                raise NodeUnavailable(f"the connection to the dxg node {self.path} is closed")
            seq = self._router.register(expect)
            waiter = _Waiter(seq, self._mu)
            self._waiters[seq] = waiter
        try:
            data = wire.encode(msg, seq)
        except BaseException:
            self._forget(waiter)
            raise
        try:
            self._send(waiter, data, fds)  # cleans up after itself when it fails
            return self._wait(waiter, deadline)
        except NodeError:
            raise
        except BaseException:
            self._abandon(waiter)  # harmless after _send's own cleanup
            raise

    def _send(self, waiter: _Waiter, data: bytes, fds: Sequence[int]) -> None:
        """Put one whole frame on the stream (its descriptors ride on its first bytes)."""
        sock: socket.socket | None = None
        started = False
        try:
            with self._send_lock:
                sock = self._sock
                if sock is None:
                    raise NodeUnavailable(f"the connection to the dxg node {self.path} is closed")
                if fds:
                    sent = send_with_fds(sock, data, fds)
                    started = True
                    if sent < len(data):
                        sock.sendall(memoryview(data)[sent:])
                else:
                    started = True
                    sock.sendall(data)
        except NodeError:
            self._forget(waiter)
            raise
        except OSError as e:
            if not started and fds and e.errno == errno.EBADF and sock is self._sock:
                self._forget(waiter)  # one of the caller's descriptors was closed: nothing went
                raise
            message = f"lost the dxg node {self.path}: {e}"
            self._drop(lost(message))
            raise NodeUnavailable(message) from None
        except BaseException:
            # Interrupted. Nothing sent: no reply will come. A whole request is answered and
            # its reply dropped later; one that may be half sent leaves the stream unusable.
            if not started:
                self._forget(waiter)
            elif len(data) > _ATOMIC_SEND:
                self._drop()
            else:
                self._abandon(waiter)
            raise

    def _forget(self, waiter: _Waiter) -> None:
        with self._mu:
            self._router.forget(waiter.seq)
            self._waiters.pop(waiter.seq, None)
            if self._reader is waiter:
                self._reader = None
                self._promote()

    def _abandon(self, waiter: _Waiter) -> None:
        """The caller gave up: drop the reply it may have got, else tell the node (CANCEL) and
        have the late reply dropped when it comes."""
        with self._mu:
            self._waiters.pop(waiter.seq, None)
            if waiter.done:
                close_all(waiter.fds)
                return
            waiter.done = True
            if not self._router.abandon(waiter.seq):
                return
            sock = self._sock
        if sock is None:
            return
        cancel = wire.encode(wire.Cancel(), waiter.seq)
        if not self._send_lock.acquire(timeout=1.0):
            return  # best effort: the reply is dropped all the same
        try:
            if self._sock is sock:
                sock.sendall(cancel)
        except OSError:
            pass  # the reader notices a broken stream
        finally:
            self._send_lock.release()

    def _wait(self, waiter: _Waiter,
              deadline: float | None = None) -> tuple[wire.Message, list[int]]:
        """Wait for ``waiter``'s reply, reading the stream whenever nobody else does (until
        ``deadline``, a time.monotonic() value: then TimeoutError)."""
        with self._mu:
            while not waiter.done and self._reader is not None:
                if deadline is None:
                    waiter.cond.wait()
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    self._waiters.pop(waiter.seq, None)  # (so it is not the one promoted)
                    if self._reader is None:
                        self._promote()
                    raise TimeoutError("the call did not end in time")
                waiter.cond.wait(left)
            lead = not waiter.done
            if lead:
                self._reader = waiter
                sock, router = self._sock, self._router
            else:
                self._waiters.pop(waiter.seq, None)
        if lead:
            self._lead(waiter, sock, router, deadline)
        if waiter.failure is not None:
            raise waiter.failure()
        assert waiter.message is not None
        return waiter.message, waiter.fds

    def _retire(self, waiter: _Waiter) -> None:
        """``waiter`` is done with: if it was the reader, close the sockets dropped while it
        read and wake another waiter to take over (mutex held)."""
        if self._reader is waiter:
            self._reader = None
            if self._orphans:
                orphans, self._orphans = self._orphans, []
                for orphan in orphans:
                    orphan.close()
            if self._waiters:
                self._promote()

    def _promote(self) -> None:
        """Wake one thread still waiting, to become the reader (mutex held)."""
        for w in self._waiters.values():
            if not w.done:
                w.notify()
                return

    def _lead(self, waiter: _Waiter, sock: socket.socket | None, router: ReplyRouter,
              deadline: float | None = None) -> None:
        """As the reader, read and route frames until ``waiter``'s reply has come or the stream
        is dropped (or ``deadline`` passed: TimeoutError); then retire and take ``waiter`` out
        of the table. ``sock`` and ``router`` are the stream's, as the caller saw them under the
        mutex."""
        mu = self._mu
        view = self._view
        try:
            while sock is not None:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    try:  # (what has arrived is read even when the time is up)
                        ready, _, _ = select.select([sock], [], [], max(0.0, left))
                    except (OSError, ValueError):
                        ready = [sock]  # (the read below sees what is wrong)
                    if not ready:
                        if left <= 0:
                            raise TimeoutError("the call did not end in time")
                        continue
                try:
                    need = router.header_needed()
                    want = _READ_CHUNK if need <= _READ_CHUNK else min(need, RECV_CHUNK)
                    # One blocking read. A signal while it blocks interrupts it before anything
                    # is taken (EINTR), so an exception from the handler consumes nothing.
                    data, fds = recv_with_fds(sock, view[:want], wire.MAX_FDS)
                    if not data:
                        raise ConnectionResetError(errno.ECONNRESET,
                                                   "connection closed by the node")
                except OSError as e:
                    with mu:
                        self._drop_locked(sock, lost(f"lost the dxg node {self.path}: {e}"))
                    break
                with mu:
                    if sock is not self._sock:
                        close_all(fds)
                    else:
                        self._route(sock, router, data, fds)
                    if waiter.done or self._sock is None:
                        self._waiters.pop(waiter.seq, None)
                        self._retire(waiter)
                        return
                    sock, router = self._sock, self._router
        except BaseException:
            with mu:
                if not waiter.done:  # (interrupted: it must not be the waiter promoted)
                    self._waiters.pop(waiter.seq, None)
                self._retire(waiter)
            raise
        with mu:  # dropped: the waiter has its failure
            self._waiters.pop(waiter.seq, None)
            self._retire(waiter)

    def _route(self, sock: socket.socket, router: ReplyRouter, data: bytes,
               fds: list[int]) -> None:
        """Hand what one read brought to the waiters it answers (mutex held)."""
        try:
            outcomes = router.feed(data, fds)
        except RouterBroken as e:
            self._drop_locked(sock, e.failure)
            return
        for o in outcomes:
            w = self._waiters.get(o.seq)
            if w is None or w.done:  # cannot happen: the router knows the seqs in flight
                if isinstance(o, Delivered):
                    close_all(o.fds)
                continue
            if isinstance(o, Delivered):
                w.finish(o.message, o.fds, None)
            else:
                w.finish(None, [], o.failure)

    # ---- ioctl ----------------------------------------------------------------------------------

    def ioctl(self, code: int, args: ctypes.Structure | ctypes.Union,
              fds: Sequence[int] = (), timeout: float | None = None) -> int:
        """``ioctl(fd, code, &args)``: returns 0, a positive NTSTATUS or a negative errno, and
        updates ``args`` and the buffers it points at as the driver left them.

        ``fds`` are descriptors of this process the driver may take (their numbers are in the
        struct or a buffer: an eventfd, a shared object); they stay open here. Descriptors the
        driver hands back are this caller's: their numbers are where the driver stored them.
        ``timeout``: seconds after which the call is cancelled (the node answers it -EINTR, and
        that reply is dropped) and TimeoutError raised."""
        if not isinstance(args, ARGS_TYPES):
            raise TypeError("ioctl arguments are a ctypes struct")
        if os.getpid() != self._pid:  # forked
            return -errno.ENOTTY  # as the kernel answers a child using its parent's file
        request = build_ioctl(code, args, self._mem.read, self.max_payload, fds, self.max_fds)
        reply, got = self._call(request, wire.Kind.IOCTL_REPLY, request.fd_numbers, timeout)
        return apply_ioctl_reply(request, reply, got, args, self._mem.write,
                                 self._router.blocks)

    def mapped_readonly(self, address: int) -> bool:
        """Whether ``address`` is in memory the node mapped into this process read-only."""
        return self._router.blocks.readonly_at(address)

    # ---- admin ----------------------------------------------------------------------------------

    def restrict(self, adapters: Iterable[Any] | None = None, memory: int | str | None = None,
                 compute: float | None = None) -> dict[str, Any]:
        """Lower this connection's limits below its user's grant (docs/policy.md, "A process
        can limit itself"): ``adapters``, the only LUIDs it may see (ints or ``0x…``);
        ``memory``, the most it may commit per adapter (bytes or "256M"); ``compute``, a
        fraction 0 < f <= 1 of its compute share. Only lowers; only before an adapter is
        opened on this connection. Returns the new grant (as ``dxg ps --json`` shows it);
        raises :class:`~dxg.client.limits.LimitsRefused` when the node refuses (``.errno``
        EBUSY: too late; EINVAL: malformed), ValueError/TypeError for bad arguments."""
        return self._restrict(restrict_request(adapters, memory, compute))

    def _restrict(self, request: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        if self.forked:
            raise NodeForked(self._pid)
        try:
            reply, fds = self._call(wire.AdminRequest(dict(request)), wire.Kind.ADMIN_REPLY,
                                    timeout=timeout)
        except TimeoutError:
            raise NodeUnavailable(f"the dxg node {self.path} did not answer in time") from None
        except NodeProtocolError as e:
            raise as_refused(e) from None
        return check_restrict_reply(reply, fds)

    def admin(self, request: dict[str, Any]) -> dict[str, Any]:
        """An introspection request (``{"op": "snapshot"}``, ``{"op": "census"}``)."""
        if self.forked:
            raise NodeForked(self._pid)
        reply, fds = self._call(wire.AdminRequest(dict(request)), wire.Kind.ADMIN_REPLY)
        close_all(fds)
        if not isinstance(reply, wire.AdminReply):
            raise NodeProtocolError(errno.EPROTO, "the dxg node answered an admin request wrongly")
        return reply.reply
