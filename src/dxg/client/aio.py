"""The node connection on asyncio: :class:`AsyncNodeConnection`, the twin of
:class:`~dxg.client.connection.NodeConnection` for code that runs on an event loop.

::

    async with await AsyncNodeConnection.open() as conn:
        ret = await conn.ioctl(io.LX_DXENUMADAPTERS3, args)

Same wire, same rules, same sans-I/O core (:mod:`dxg.client.calls`): many requests in flight,
replies matched by ``seq`` in any order, descriptors both ways, ADMIN_REPLY chunks joined. One
reader callback on the loop (``add_reader`` on the non-blocking socket) resolves the futures of
the requests in flight; frames go out through a small write queue, so a frame is never cut by a
cancelled caller (a cancelled call sends CANCEL after its request, and its late reply is
dropped). The connection lives on the loop that opened it (no global loop); it is not
thread-safe (use the sync connection from threads).

After ``fork()`` the child's calls answer ``-ENOTTY`` and ``await conn.reopen()`` (on the
child's own loop) opens the child's own connection.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import socket
from collections import deque
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

__all__ = ["AsyncNodeConnection"]




class _Outgoing:
    """One frame waiting in the write queue; its descriptors are our own duplicates (the
    caller may close its own once its call is over, even if the frame is still queued)."""

    __slots__ = ("data", "fds")

    def __init__(self, data: memoryview, fds: list[int]) -> None:
        self.data = data
        self.fds = fds


class AsyncNodeConnection:
    """A connection to the node on the running event loop: ``await AsyncNodeConnection.open()``.

    Raises the same errors as :class:`~dxg.client.connection.NodeConnection` (NodeNotFound,
    NodePermissionDenied, NodeUnavailable; the same node directory trust check)."""

    def __init__(self, path: str | os.PathLike[str] | None = None, timeout: float = 10.0) -> None:
        """Not connected yet: use :meth:`open`."""
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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._router = ReplyRouter(f"the dxg node {self.path}")
        self._futures: dict[int, asyncio.Future[tuple[wire.Message, list[int]]]] = {}
        self._queue: deque[_Outgoing] = deque()
        self._writing = False
        self._buf = bytearray(RECV_CHUNK)

    @classmethod
    async def open(cls, path: str | os.PathLike[str] | None = None,
                   timeout: float = 10.0) -> AsyncNodeConnection:
        """Connect and shake hands (at most ``timeout`` seconds)."""
        conn = cls(path, timeout)
        await conn._connect()
        return conn

    # ---- connecting -----------------------------------------------------------------------------

    async def _connect(self) -> None:
        """Connect to the first place that holds a node (as NodeConnection does), restricted
        by ``$DXG_PROCESS_LIMITS`` when it is set (dxg.client.limits)."""
        limits = limits_from_env()  # (a bad value fails before anything connects)
        targets = self._targets
        for i, where in enumerate(targets):
            self.path, self._check_dir = where.path, where.check
            try:
                await self._connect_to(where)
            except NodeNotFound:
                if i + 1 < len(targets):
                    continue
                if len(targets) > 1:
                    raise not_found_anywhere(targets) from None
                raise
            self._targets = (where,)
            if limits is not None:
                try:
                    async with asyncio.timeout(self._timeout):
                        await self._restrict(limits)
                except TimeoutError:
                    self._drop()
                    raise NodeUnavailable(f"the dxg node {self.path} did not answer in "
                                          "time") from None
                except BaseException:
                    self._drop()  # never handed out unrestricted
                    raise
            return

    async def _connect_to(self, where: NodeTarget) -> None:
        path = where.path
        target, dir_fd = connect_target(path, where.check)
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(self._timeout):
                await loop.sock_connect(sock, target)
        except OSError as e:  # TimeoutError included
            sock.close()
            raise connect_error(path, e, where.origin) from None
        except BaseException:
            sock.close()
            raise
        finally:
            if dir_fd >= 0:
                os.close(dir_fd)
        self._loop = loop
        self._sock = sock
        self._router = ReplyRouter(f"the dxg node {path}")
        loop.add_reader(sock.fileno(), self._on_readable)
        try:
            async with asyncio.timeout(self._timeout):
                message, fds = await self._call(wire.Hello(), wire.Kind.HELLO_REPLY)
            close_all(fds)
            reply = check_hello_reply(path, message)
        except TimeoutError:
            self._drop()
            raise NodeUnavailable(f"the dxg node {path} did not answer in time") from None
        except NodeError as e:
            self._drop()
            raise hello_error(path, e, where.origin) from None
        except BaseException:
            self._drop()
            raise
        self.version = reply.version
        self.node_name = reply.node_name
        self.max_payload = min(reply.max_payload, wire.MAX_PAYLOAD)
        self.max_regions = min(reply.max_regions, wire.MAX_REGIONS)
        self.max_fds = min(reply.max_fds, wire.MAX_FDS)

    async def reopen(self) -> None:
        """Drop this connection and open a new one on the running loop (for a forked child,
        or after a loss)."""
        if self.forked:
            self._forget_parent()
        else:
            self._drop()
        await self._connect()

    def _forget_parent(self) -> None:
        """In a forked child: close our copy of the parent's socket without touching the loop
        (its epoll instance is shared with the parent) or the stream."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        self._loop = None
        self._futures = {}
        self._queue = deque()
        self._writing = False
        self._router = ReplyRouter(f"the dxg node {self.path}")
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

    @property
    def closed(self) -> bool:
        return self._sock is None

    def close(self) -> None:
        """Close the connection now; calls in flight raise NodeUnavailable."""
        if self.forked:
            self._forget_parent()
            return
        self._drop()

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> AsyncNodeConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._sock is None else f"v{self.version}"
        return f"<AsyncNodeConnection {str(self.path)!r} {state}>"

    def _drop(self, failure: Failure | None = None) -> None:
        """Close the stream and fail every request in flight."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if failure is None:
            failure = lost(f"the connection to the dxg node {self.path} is closed")
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.remove_reader(sock.fileno())
            if self._writing:
                loop.remove_writer(sock.fileno())
        sock.close()
        self._writing = False
        for item in self._queue:
            close_all(item.fds)
        self._queue.clear()
        self._router.close()
        futures, self._futures = self._futures, {}
        for fut in futures.values():
            if not fut.done():
                fut.set_exception(failure())

    # ---- the stream -----------------------------------------------------------------------------

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            data, fds = recv_with_fds(sock, self._buf, wire.MAX_FDS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._drop(lost(f"lost the dxg node {self.path}: {e}"))
            return
        if not data:
            close_all(fds)
            self._drop(lost(f"lost the dxg node {self.path}: connection closed by the node"))
            return
        try:
            outcomes = self._router.feed(data, fds)
        except RouterBroken as e:
            self._drop(e.failure)
            return
        for o in outcomes:
            fut = self._futures.pop(o.seq, None)
            if fut is None or fut.done():  # its caller is gone (cancelled)
                if isinstance(o, Delivered):
                    close_all(o.fds)
                continue
            if isinstance(o, Delivered):
                fut.set_result((o.message, o.fds))
            else:
                fut.set_exception(o.failure())

    def _write(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Queue one frame; it goes out whole whatever happens to its caller."""
        sock = self._sock
        assert sock is not None
        view = memoryview(data)
        if not self._queue:
            try:
                sent = send_with_fds(sock, view, fds) if fds else sock.send(view)
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent == len(view):
                return
            if sent:
                fds = ()  # they went with the first bytes
            view = view[sent:]
        self._queue.append(_Outgoing(view, [os.dup(fd) for fd in fds]))
        if not self._writing:
            assert self._loop is not None
            self._loop.add_writer(sock.fileno(), self._on_writable)
            self._writing = True

    def _on_writable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        queue = self._queue
        while queue:
            item = queue[0]
            try:
                sent = send_with_fds(sock, item.data, item.fds) if item.fds else \
                    sock.send(item.data)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._drop(lost(f"lost the dxg node {self.path}: {e}"))
                return
            if sent and item.fds:
                close_all(item.fds)
                item.fds = []
            item.data = item.data[sent:]
            if item.data:
                return
            queue.popleft()
        assert self._loop is not None
        self._loop.remove_writer(sock.fileno())
        self._writing = False

    # ---- requests in flight ---------------------------------------------------------------------

    async def _call(self, msg: wire.Message, expect: wire.Kind,
                    fds: Sequence[int] = ()) -> tuple[wire.Message, list[int]]:
        if self._sock is None or self._loop is None:
            raise NodeUnavailable(f"the connection to the dxg node {self.path} is closed")
        if asyncio.get_running_loop() is not self._loop:
            raise RuntimeError("an AsyncNodeConnection is used on the loop that opened it")
        router = self._router
        seq = router.register(expect)
        try:
            data = wire.encode(msg, seq)
        except BaseException:
            router.forget(seq)
            raise
        fut: asyncio.Future[tuple[wire.Message, list[int]]] = self._loop.create_future()
        self._futures[seq] = fut
        try:
            self._write(data, fds)
        except OSError as e:
            self._futures.pop(seq, None)
            router.forget(seq)
            if fds and e.errno == errno.EBADF:
                raise  # one of the caller's descriptors was closed: nothing went
            message = f"lost the dxg node {self.path}: {e}"
            self._drop(lost(message))
            raise NodeUnavailable(message) from None
        try:
            return await fut
        except asyncio.CancelledError:
            self._abandon(seq, fut)
            raise

    def _abandon(self, seq: int, fut: asyncio.Future[tuple[wire.Message, list[int]]]) -> None:
        """The caller was cancelled: drop a reply it may have got, else tell the node."""
        self._futures.pop(seq, None)
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            close_all(fut.result()[1])
            return
        if self._router.abandon(seq) and self._sock is not None:
            try:
                self._write(wire.encode(wire.Cancel(), seq))
            except OSError as e:
                self._drop(lost(f"lost the dxg node {self.path}: {e}"))

    # ---- ioctl and admin ------------------------------------------------------------------------

    async def ioctl(self, code: int, args: ctypes.Structure | ctypes.Union,
                    fds: Sequence[int] = ()) -> int:
        """As :meth:`NodeConnection.ioctl <dxg.client.connection.NodeConnection.ioctl>`."""
        if not isinstance(args, ARGS_TYPES):
            raise TypeError("ioctl arguments are a ctypes struct")
        if self.forked:
            return -errno.ENOTTY
        request = build_ioctl(code, args, self._mem.read, self.max_payload, fds, self.max_fds)
        reply, got = await self._call(request, wire.Kind.IOCTL_REPLY, request.fd_numbers)
        return apply_ioctl_reply(request, reply, got, args, self._mem.write,
                                 self._router.blocks)

    def mapped_readonly(self, address: int) -> bool:
        """Whether ``address`` is in memory the node mapped into this process read-only."""
        return self._router.blocks.readonly_at(address)

    async def restrict(self, adapters: Iterable[Any] | None = None,
                       memory: int | str | None = None,
                       compute: float | None = None) -> dict[str, Any]:
        """As :meth:`NodeConnection.restrict <dxg.client.connection.NodeConnection.restrict>`:
        lower this connection's limits before it opens an adapter; the new grant, or
        :class:`~dxg.client.limits.LimitsRefused`."""
        return await self._restrict(restrict_request(adapters, memory, compute))

    async def _restrict(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.forked:
            raise NodeForked(self._pid)
        try:
            reply, fds = await self._call(wire.AdminRequest(dict(request)),
                                          wire.Kind.ADMIN_REPLY)
        except NodeProtocolError as e:
            raise as_refused(e) from None
        return check_restrict_reply(reply, fds)

    async def admin(self, request: dict[str, Any]) -> dict[str, Any]:
        """An introspection request (``{"op": "snapshot"}``, ``{"op": "census"}``)."""
        if self.forked:
            raise NodeForked(self._pid)
        reply, fds = await self._call(wire.AdminRequest(dict(request)), wire.Kind.ADMIN_REPLY)
        close_all(fds)
        if not isinstance(reply, wire.AdminReply):
            raise NodeProtocolError(errno.EPROTO, "the dxg node answered an admin request wrongly")
        return reply.reply

