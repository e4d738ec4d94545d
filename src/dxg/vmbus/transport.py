"""Stream transports on an event loop. The only place in the bus that touches sockets.

A transport moves bytes (and, where it can, file descriptors beside them) between two ends:

* :class:`SocketTransport`: a Unix or TCP stream socket driven by the loop's reader and writer
  callbacks. On a Unix socket, descriptors travel as SCM_RIGHTS with the bytes they were written
  with; TCP cannot carry them (``can_pass_fds`` is False and the layers above copy instead).
* :class:`LoopbackTransport`: two ends in one process (the embedded default, ``dxg up``): bytes
  and duplicated descriptors are handed to the other end's loop, no socket in between.

Writing never blocks: what the peer does not take at once is buffered, and a peer that takes
nothing for ``send_timeout`` seconds, or lets more than ``max_buffer`` bytes pile up, is dropped
(so no side can be held up, or made to hold memory, by one that stops reading). Every method runs
on the loop's thread; ``data_received``/``connection_lost`` are called there too.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import errno
import itertools
import logging
import os
import socket
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from dxg.oslib.fds import FdOverflow, close_all, recv_with_fds, send_with_fds

Buffer = bytes | bytearray | memoryview

log = logging.getLogger(__name__)

# A peer that takes no bytes for this long, while we have some for it, is dropped.
SEND_TIMEOUT = 15.0
# What one transport may hold for a peer that reads slowly before it is dropped.
MAX_BUFFER = 256 * 1024 * 1024
# Descriptors one read may bring (more is a protocol violation: the connection is dropped).
MAX_FDS_PER_READ = 64
_RECV_CHUNK = 256 * 1024
# Buffers one sendmsg takes (the kernel's IOV_MAX).
_IOV_MAX = 1024
# TCP keepalive: probe after 30 s of silence, every 10 s, give up after 3 unanswered.
_KEEPALIVE = ((socket.TCP_KEEPIDLE, 30), (socket.TCP_KEEPINTVL, 10), (socket.TCP_KEEPCNT, 3))
_READS_PER_WAKEUP = 16


class TransportError(OSError):
    """A transport could not be set up (bad address, nothing listening, ...)."""


class TransportClosed(ConnectionError):
    """The transport is closed: nothing more can be written."""


class Receiver(Protocol):
    def data_received(self, data: bytes, fds: list[int]) -> None:
        """New bytes, with the descriptors that arrived with them (now the receiver's)."""

    def connection_lost(self, error: BaseException | None) -> None:
        """The transport is gone (None: an orderly end of stream)."""


class DirectReceiver(Receiver, Protocol):
    """A receiver that can say where the next bytes go, so that a large payload is read
    straight into its place (a socket without descriptors only): ``recv_buffers()`` names the
    buffers for the next read (None: read as usual and call data_received), and
    ``buffers_filled(n)`` says that ``n`` bytes were read into them, in order."""

    def recv_buffers(self) -> list[memoryview] | None: ...

    def buffers_filled(self, n: int) -> None: ...


@dataclass(frozen=True, slots=True)
class Address:
    family: int
    target: str | tuple[str, int]

    def __str__(self) -> str:
        if self.family == socket.AF_UNIX:
            return f"unix:{self.target}"
        host, port = self.target  # type: ignore[misc]
        return f"tcp:{host}:{port}"


def read_buffer() -> bytearray:
    """A receive buffer for the transports of one loop to share."""
    return bytearray(_RECV_CHUNK)


_ADDRESS_FORMS = "use unix:/path, /path, tcp:HOST:PORT or HOST:PORT"


def parse_address(text: str) -> Address:
    """'unix:/path', '/path' or './path' (Unix socket); 'tcp:HOST:PORT' or 'HOST:PORT' (TCP);
    'unix:///path' and 'tcp://HOST:PORT' are read the same. Any other 'scheme://' is refused
    (TransportError naming the scheme), rather than taken for a file name."""
    scheme, sep, rest = text.partition("://")
    if sep and "/" not in scheme:
        if scheme not in ("unix", "tcp"):
            raise TransportError(f"unknown address scheme {scheme + ':'!r} in {text!r} "
                                 f"({_ADDRESS_FORMS})")
        text = f"{scheme}:{rest if scheme == 'tcp' else '/' + rest.lstrip('/')}"
    if text.startswith("unix:"):
        return Address(socket.AF_UNIX, text[5:])
    if text.startswith("tcp:"):
        text = text[4:]
    elif "/" in text or ":" not in text:
        return Address(socket.AF_UNIX, text)
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        return Address(socket.AF_INET6 if ":" in host else socket.AF_INET, (host, int(port)))
    except ValueError:
        raise TransportError(f"bad TCP address {text!r}: port must be a number") from None


class WriteBudget:
    """Bytes waiting for slow readers, bounded across many transports (a node's clients): a
    transport whose write would push the total past ``limit`` drops its peer instead.

    ``parent``: a wider budget this one is a share of (a user's share of a node's pool): a take
    is charged here first, then there, and a give returns to both. ``evict(n, requester)``: when a
    take does not fit, the owner may make room by dropping some *other* transport (whose close
    gives its bytes back) and return True; it returns False when it will not (nothing to drop,
    or the ``requester`` itself is the one to drop), and the take fails. Without ``evict`` a take
    that does not fit simply fails."""

    __slots__ = ("evict", "limit", "parent", "used")

    def __init__(self, limit: int, *, parent: WriteBudget | None = None,
                 evict: Callable[[int, object], bool] | None = None) -> None:
        self.limit = limit
        self.used = 0
        self.parent = parent
        self.evict = evict

    def take(self, n: int, requester: object = None) -> bool:
        while self.used + n > self.limit:
            used = self.used
            if self.evict is None or not self.evict(used + n - self.limit, requester):
                return False
            if self.used >= used:  # an evict that freed nothing here cannot loop forever
                return False
        if self.parent is not None and not self.parent.take(n, requester):
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used = max(0, self.used - n)
        if self.parent is not None:
            self.parent.give(n)


class Transport:
    """What every transport offers the layers above."""

    peer: str = ""
    can_pass_fds: bool = False

    def start(self, receiver: Receiver) -> None:
        raise NotImplementedError

    def write(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Queue ``data`` (and ``fds``, duplicated: the caller keeps its own) for the peer."""
        raise NotImplementedError

    def writev(self, buffers: Sequence[Buffer], fds: Sequence[int] = ()) -> None:
        """write() of the buffers' bytes, in order (the peer sees one stream). A socket sends
        them as they are (the caller must not change them until they are taken; views of them
        may wait in the queue); elsewhere they are joined."""
        self.write(b"".join(buffers), fds)

    def close(self, error: BaseException | None = None) -> None:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        raise NotImplementedError

    @property
    def buffered(self) -> int:
        """Bytes written but not yet taken by the peer."""
        return 0


class SocketTransport(Transport):
    """A connected stream socket on ``loop`` (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, peer: str, *,
                 send_timeout: float = SEND_TIMEOUT, max_buffer: int = MAX_BUFFER,
                 max_fds: int = MAX_FDS_PER_READ, budget: WriteBudget | None = None,
                 read_buffer: bytearray | None = None) -> None:
        self.loop = loop
        self.budget = budget
        # Called (on the loop) when everything written has gone out, after a backlog.
        self.on_drained: Callable[[], None] | None = None
        self.sock = sock
        self.peer = peer
        self.send_timeout = send_timeout
        self.max_buffer = max_buffer
        self.max_fds = max_fds
        self.can_pass_fds = sock.family == socket.AF_UNIX
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # A peer that vanishes without a word (its machine gone, the network cut) is found
            # within about a minute, even by an end with nothing to send it.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for option, value in _KEEPALIVE:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)
        self._fd = sock.fileno()
        self._receiver: Receiver | None = None
        # Bytes are read into this buffer and copied out at once, so every transport of one
        # loop may share one (a server with a thousand idle clients holds one, not a thousand).
        self._rbuf = read_buffer if read_buffer is not None else bytearray(_RECV_CHUNK)
        # Bytes the peer has not taken yet, in order: (a buffer, the descriptors that go with
        # its first byte).
        self._out: collections.deque[tuple[Buffer, list[int]]] = collections.deque()
        # The receiver's recv_buffers, when it can take bytes where they go (TCP only: bytes
        # read straight into a receiver's buffer could not carry descriptors).
        self._direct: Callable[[], list[memoryview] | None] | None = None
        self._buffered = 0
        self._progress = 0.0  # when the peer last took bytes while some were waiting
        self._stall: asyncio.TimerHandle | None = None
        self._closed = False
        self._reading = False

    def __repr__(self) -> str:
        return f"<SocketTransport {self.peer}{' closed' if self._closed else ''}>"

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def buffered(self) -> int:
        return self._buffered

    # ---- reading ------------------------------------------------------------------------------

    def start(self, receiver: Receiver) -> None:
        if self._closed:
            self.loop.call_soon(receiver.connection_lost, TransportClosed("closed"))
            return
        self._receiver = receiver
        direct = getattr(receiver, "recv_buffers", None)
        self._direct = direct if direct is not None and not self.can_pass_fds else None
        self.resume_reading()

    def pause_reading(self) -> None:
        if self._reading and not self._closed:
            self.loop.remove_reader(self._fd)
            self._reading = False

    def resume_reading(self) -> None:
        if not self._reading and not self._closed and self._receiver is not None:
            self.loop.add_reader(self._fd, self._readable)
            self._reading = True

    def _readable(self) -> None:
        receiver = self._receiver
        direct = self._direct
        for _ in range(_READS_PER_WAKEUP):
            if self._closed or not self._reading or receiver is None:
                return
            buffers = direct() if direct is not None else None
            if buffers:
                if not self._read_into(receiver, buffers):  # type: ignore[arg-type]
                    return
                continue
            try:
                if self.can_pass_fds:
                    data, fds = recv_with_fds(self.sock, self._rbuf, self.max_fds)
                else:
                    n = self.sock.recv_into(self._rbuf)
                    data, fds = bytes(memoryview(self._rbuf)[:n]), []
            except (BlockingIOError, InterruptedError):
                return
            except FdOverflow as e:
                self.close(e)
                return
            except OSError as e:
                self.close(e)
                return
            if not data:
                close_all(fds)
                self.close(None)
                return
            receiver.data_received(data, fds)
            if len(data) < len(self._rbuf):
                return

    def _read_into(self, receiver: DirectReceiver, buffers: list[memoryview]) -> bool:
        """One read straight into the receiver's buffers; True when it filled them (there may
        be more to read now)."""
        try:
            n = self.sock.recvmsg_into(buffers)[0]
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            self.close(e)
            return False
        if not n:
            self.close(None)
            return False
        receiver.buffers_filled(n)
        return n == sum(len(b) for b in buffers)

    # ---- writing ------------------------------------------------------------------------------

    def write(self, data: bytes, fds: Sequence[int] = ()) -> None:
        if self._closed:
            raise TransportClosed(f"{self.peer}: transport is closed")
        if fds and not self.can_pass_fds:
            raise ValueError(f"{self.peer}: this transport cannot carry file descriptors")
        if not data:
            return
        sent = 0
        if not self._out:
            try:
                sent = send_with_fds(self.sock, data, fds) if fds else self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as e:
                self.close(e)
                raise TransportClosed(f"{self.peer}: {e.strerror or e}") from None
            if sent == len(data):
                return
        view = memoryview(data)[sent:]
        # The descriptors go with the first byte: if none went yet, they wait with the bytes, as
        # copies. A copy that cannot be made (EMFILE) fails the write with nothing queued and
        # nothing leaked (OSError; the caller may send something else).
        pending: list[int] = []
        if not sent:
            try:
                for fd in fds:
                    pending.append(os.dup(fd))
            except OSError:
                close_all(pending)
                raise
        if self._buffered + len(view) > self.max_buffer or (
                self.budget is not None and not self.budget.take(len(view), self)):
            close_all(pending)
            err = ConnectionError(errno.ENOBUFS, f"{self.peer} does not read its replies: "
                                                 f"{self._buffered + len(view)} bytes would "
                                                 "wait for it; dropped")
            self.close(err)
            raise TransportClosed(str(err))
        self._out.append((view, pending))
        self._buffered += len(view)
        if len(self._out) == 1:
            self._progress = time.monotonic()
            self.loop.add_writer(self._fd, self._writable)
            self._arm_stall()

    def writev(self, buffers: Sequence[Buffer], fds: Sequence[int] = ()) -> None:
        """The buffers' bytes in order, with sendmsg: nothing is joined or copied here; what
        the peer does not take at once waits as views of the caller's buffers."""
        if self._closed:
            raise TransportClosed(f"{self.peer}: transport is closed")
        if fds and not self.can_pass_fds:
            raise ValueError(f"{self.peer}: this transport cannot carry file descriptors")
        buffers = [b for b in buffers if len(b)]
        total = sum(len(b) for b in buffers)
        if not total:
            return
        sent = 0
        if not self._out:
            try:
                sent = self._sendmsg(buffers[:_IOV_MAX], fds)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as e:
                self.close(e)
                raise TransportClosed(f"{self.peer}: {e.strerror or e}") from None
            if sent == total:
                return
        pending: list[int] = []
        if not sent:
            try:
                for fd in fds:
                    pending.append(os.dup(fd))
            except OSError:
                close_all(pending)
                raise
        left = total - sent
        if self._buffered + left > self.max_buffer or (
                self.budget is not None and not self.budget.take(left, self)):
            close_all(pending)
            err = ConnectionError(errno.ENOBUFS, f"{self.peer} does not read its replies: "
                                                 f"{self._buffered + left} bytes would "
                                                 "wait for it; dropped")
            self.close(err)
            raise TransportClosed(str(err))
        was_idle = not self._out
        for b in buffers:
            if sent >= len(b):
                sent -= len(b)
                continue
            self._out.append((memoryview(b)[sent:] if sent else b, pending))
            sent = 0
            pending = []
        self._buffered += left
        if was_idle:
            self._progress = time.monotonic()
            self.loop.add_writer(self._fd, self._writable)
            self._arm_stall()

    def _sendmsg(self, buffers: Sequence[Buffer], fds: Sequence[int]) -> int:
        if len(buffers) == 1:
            return send_with_fds(self.sock, buffers[0], fds)
        if fds:
            return self.sock.sendmsg(buffers, [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                array.array("i", fds))])
        return self.sock.sendmsg(buffers)

    def _writable(self) -> None:
        out = self._out
        while out and not self._closed:
            first, fds = out[0]
            # Everything queued, up to the next buffer whose descriptors go with its own first
            # byte (they must start a sendmsg of their own).
            batch = [first]
            for view, more in itertools.islice(out, 1, _IOV_MAX):
                if more:
                    break
                batch.append(view)
            try:
                sent = self._sendmsg(batch, fds)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.close(e)
                return
            if fds:
                close_all(fds)
                out[0] = (first, [])
            self._buffered -= sent
            if self.budget is not None:
                self.budget.give(sent)
            self._progress = time.monotonic()
            for view in batch:
                if sent < len(view):
                    out[0] = (memoryview(view)[sent:], [])
                    return
                sent -= len(view)
                out.popleft()
        if not out and not self._closed:
            self.loop.remove_writer(self._fd)
            if self._stall is not None:
                self._stall.cancel()
                self._stall = None
            if self.on_drained is not None:
                self.on_drained()

    def _arm_stall(self) -> None:
        if self._stall is None:
            self._stall = self.loop.call_later(self.send_timeout, self._check_stall)

    def _check_stall(self) -> None:
        self._stall = None
        if self._closed or not self._out:
            return
        idle = time.monotonic() - self._progress
        if idle >= self.send_timeout:
            self.close(ConnectionError(errno.ETIMEDOUT, f"{self.peer} stopped reading for "
                                                        f"{self.send_timeout:g}s; dropped"))
            return
        self._stall = self.loop.call_later(self.send_timeout - idle, self._check_stall)

    # ---- closing ------------------------------------------------------------------------------

    def close(self, error: BaseException | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        if self._reading:
            self.loop.remove_reader(self._fd)
            self._reading = False
        if self._out:
            self.loop.remove_writer(self._fd)
        for _view, fds in self._out:
            close_all(fds)
        self._out.clear()
        if self.budget is not None:
            self.budget.give(self._buffered)
        self._buffered = 0
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        receiver = self._receiver
        if receiver is not None:
            self.loop.call_soon(receiver.connection_lost, error)


class LoopbackTransport(Transport):
    """One end of an in-process pair. Bytes and descriptors (duplicated, as SCM_RIGHTS would)
    reach the other end on its loop; closing one end ends the other."""

    can_pass_fds = True

    def __init__(self, loop: asyncio.AbstractEventLoop, peer: str) -> None:
        self.loop = loop
        self.peer = peer
        self._other: LoopbackTransport | None = None
        self._receiver: Receiver | None = None
        self._early: list[tuple[bytes, list[int]]] = []
        self._closed = False
        self._lost: BaseException | None = None

    @classmethod
    def pair(cls, loop_a: asyncio.AbstractEventLoop, loop_b: asyncio.AbstractEventLoop,
             name_a: str = "loopback", name_b: str = "loopback"
             ) -> tuple[LoopbackTransport, LoopbackTransport]:
        """Two connected ends: ``a`` lives on ``loop_a`` (its peer is named ``name_b``)."""
        a, b = cls(loop_a, name_b), cls(loop_b, name_a)
        a._other, b._other = b, a
        return a, b

    def __repr__(self) -> str:
        return f"<LoopbackTransport to {self.peer}{' closed' if self._closed else ''}>"

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self, receiver: Receiver) -> None:
        self._receiver = receiver
        early, self._early = self._early, []
        for data, fds in early:
            self.loop.call_soon(self._deliver, data, fds)
        if self._closed:
            self.loop.call_soon(receiver.connection_lost, self._lost)

    def write(self, data: bytes, fds: Sequence[int] = ()) -> None:
        other = self._other
        if self._closed or other is None:
            raise TransportClosed(f"{self.peer}: transport is closed")
        copies = [os.dup(fd) for fd in fds] if fds else []
        data = data if type(data) is bytes else bytes(data)  # the peer keeps it: immutable
        if other.loop is self.loop and _running_loop() is self.loop:
            # Both ends on this loop: hand the bytes over now, as a kernel would copy them into
            # the peer's socket buffer; the receiver takes care of calls nested this way.
            other._deliver(data, copies)
        else:
            _call_on(other.loop, other._deliver, data, copies)

    def _deliver(self, data: bytes, fds: list[int]) -> None:
        if self._closed:
            close_all(fds)
            return
        if self._receiver is None:
            self._early.append((data, fds))
            return
        self._receiver.data_received(data, fds)

    def close(self, error: BaseException | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        self._lost = error
        for _data, fds in self._early:
            close_all(fds)
        self._early.clear()
        receiver = self._receiver
        if receiver is not None:
            self.loop.call_soon(receiver.connection_lost, error)
        other = self._other
        if other is not None:
            _call_on(other.loop, other.close, None)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _call_on(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: object) -> None:
    """Run ``fn`` on ``loop`` soon, from whichever thread we are on (dropped once it is closed)."""
    with contextlib.suppress(RuntimeError):
        if _running_loop() is loop:
            loop.call_soon(fn, *args)
        else:
            loop.call_soon_threadsafe(fn, *args)


async def connect(loop: asyncio.AbstractEventLoop, address: str | Address,
                  timeout: float = 5.0, **kw: object) -> SocketTransport:
    """Dial ``address``; raises :class:`TransportError` saying what failed."""
    addr = parse_address(address) if isinstance(address, str) else address
    sock = socket.socket(addr.family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, addr.target), timeout)
    except TimeoutError:
        sock.close()
        raise TransportError(errno.ETIMEDOUT, f"cannot reach {addr}: timed out") from None
    except OSError as e:
        sock.close()
        raise TransportError(e.errno, f"cannot reach {addr}: {e.strerror or e}") from None
    except BaseException:
        sock.close()
        raise
    return SocketTransport(loop, sock, str(addr), **kw)  # type: ignore[arg-type]


# accept() errors that concern one connection only: take the next one.
_ACCEPT_RETRY = frozenset(
    e for e in (errno.ECONNABORTED, errno.EINTR, errno.EPROTO, errno.ENETDOWN,
                errno.ENOPROTOOPT, errno.EHOSTDOWN, getattr(errno, "ENONET", None),
                errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH, errno.EPERM)
    if e is not None
)
# accept() errors that say the listening socket itself is gone.
_ACCEPT_DEAD = frozenset({errno.EBADF, errno.EINVAL, errno.ENOTSOCK})
ACCEPT_BACKOFF_MIN = 0.01
ACCEPT_BACKOFF_MAX = 1.0


class Listener:
    """A listening socket on ``loop`` that hands each new connection to ``on_accept(sock,
    peer)``. Running out of descriptors or memory pauses accepting (with a growing back-off)
    instead of ending it; a dead listening socket stops it. Unlinks its Unix path on close."""

    def __init__(self, loop: asyncio.AbstractEventLoop, address: str | Address,
                 on_accept: Callable[[socket.socket, str], None], backlog: int = 128,
                 name: str = "listener") -> None:
        self.loop = loop
        self.name = name
        self.address = parse_address(address) if isinstance(address, str) else address
        self._on_accept = on_accept
        sock = socket.socket(self.address.family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            if self.address.family == socket.AF_UNIX:
                _remove_stale_socket(str(self.address.target))
            else:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(self.address.target)
            sock.listen(backlog)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            raise TransportError(e.errno, f"cannot listen on {self.address}: "
                                          f"{e.strerror or e}") from None
        self.sock = sock
        self._inode: tuple[int, int] | None = None
        if self.address.family != socket.AF_UNIX:
            host, port = sock.getsockname()[:2]
            self.address = Address(self.address.family, (host, port))
        else:
            st = os.stat(str(self.address.target))
            self._inode = (st.st_dev, st.st_ino)
        self._closed = False
        self._backoff = ACCEPT_BACKOFF_MIN
        self._short_of: int | None = None
        self._resume: asyncio.TimerHandle | None = None
        self.accepted = 0

    def start(self) -> None:
        self.loop.add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(64):
            if self._closed:
                return
            try:
                conn, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in _ACCEPT_RETRY:
                    log.debug("%s: accept on %s: %s", self.name, self.address, e)
                    continue
                if e.errno in _ACCEPT_DEAD:
                    log.error("%s: listener %s failed, no longer accepting: %s", self.name,
                              self.address, e)
                    self.loop.remove_reader(self.sock.fileno())
                    return
                if self._short_of != e.errno:
                    log.warning("%s: cannot accept on %s (%s); pausing until it passes",
                                self.name, self.address, e)
                    self._short_of = e.errno
                self.loop.remove_reader(self.sock.fileno())
                self._resume = self.loop.call_later(self._backoff, self._resume_accepting)
                self._backoff = min(self._backoff * 2, ACCEPT_BACKOFF_MAX)
                return
            if self._short_of is not None:
                log.warning("%s: accepting on %s again", self.name, self.address)
                self._short_of = None
            self._backoff = ACCEPT_BACKOFF_MIN
            self.accepted += 1
            conn.setblocking(False)
            try:
                self._on_accept(conn, str(peer) if peer else str(self.address))
            except Exception:
                log.exception("%s: could not take a connection", self.name)
                conn.close()

    def _resume_accepting(self) -> None:
        self._resume = None
        if not self._closed:
            self.loop.add_reader(self.sock.fileno(), self._accept)
            self._accept()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._resume is not None:
            self._resume.cancel()
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        if self.address.family == socket.AF_UNIX:
            path = str(self.address.target)
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(path)


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead server; refuse to clobber a live one or a non-socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        # Nobody listens (or it went meanwhile): stale. Anything else (a timeout or EAGAIN
        # against a live server with a full backlog) means somebody is there.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except OSError as e:
        raise OSError(errno.EADDRINUSE, f"{path} is in use by a running server (busy: "
                                        f"{e.strerror or e})") from None
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path} is in use by a running server")


__all__ = ["Address", "Listener", "LoopbackTransport", "Receiver", "SocketTransport",
           "Transport", "TransportClosed", "TransportError", "WriteBudget", "connect",
           "parse_address", "read_buffer"]
