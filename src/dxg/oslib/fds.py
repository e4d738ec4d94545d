"""File descriptors beside bytes on a Unix stream socket (SCM_RIGHTS), and counting them.

The kernel attaches the descriptors of one ``sendmsg`` to the first byte it sends and hands them
over no later than that byte is read; a reader that keeps received descriptors in a FIFO and lets
each frame claim the count it declares therefore matches them up exactly.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import socket
from collections.abc import Iterable, Sequence

__all__ = ["FdOverflow", "close_all", "open_fd_count", "recv_with_fds", "send_with_fds"]

_INT = array.array("i").itemsize
# Plain ints: combining the socket module's IntFlag members costs an enum call on every read.
_RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
_CMSG_SPACE = tuple(socket.CMSG_SPACE(n * _INT) for n in range(65))


class FdOverflow(OSError):
    """More descriptors arrived than the reader allows: some were dropped by the kernel."""

    def __init__(self) -> None:
        super().__init__(errno.EMSGSIZE, "descriptors truncated (MSG_CTRUNC)")


def send_with_fds(sock: socket.socket, data: bytes | memoryview, fds: Sequence[int] = ()) -> int:
    """One ``sendmsg`` of ``data`` with ``fds`` attached; returns the bytes sent (may be fewer)."""
    if not fds:
        return sock.send(data)
    return sock.sendmsg([data], [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds))])


def recv_with_fds(sock: socket.socket, buf: bytearray, max_fds: int,
                  flags: int = 0) -> tuple[bytes, list[int]]:
    """One ``recvmsg`` into ``buf`` (reused by the caller: allocating a large buffer per read
    costs more than the read) of at most ``max_fds`` descriptors (close-on-exec); returns a copy
    of the bytes read. Descriptors beyond ``max_fds`` make it raise :class:`FdOverflow` after
    closing those that did arrive."""
    space = _CMSG_SPACE[max_fds] if max_fds < len(_CMSG_SPACE) else \
        socket.CMSG_SPACE(max_fds * _INT)
    n, ancdata, msg_flags, _ = sock.recvmsg_into([buf], space, _RECV_FLAGS | flags)
    data = bytes(memoryview(buf)[:n])
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(payload[: len(payload) - len(payload) % _INT])
            fds.extend(got)
    if msg_flags & _MSG_CTRUNC:
        close_all(fds)
        raise FdOverflow()
    return data, fds


def close_all(fds: Iterable[int]) -> None:
    """Close each descriptor, ignoring those already closed."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def open_fd_count(pid: int | None = None) -> int:
    """How many descriptors a process (default: this one) has open."""
    return len(os.listdir(f"/proc/{'self' if pid is None else pid}/fd"))
