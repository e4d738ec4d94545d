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


class FdOverflow(OSError):
    """More descriptors arrived than the reader allows: some were dropped by the kernel."""

    def __init__(self) -> None:
        super().__init__(errno.EMSGSIZE, "descriptors truncated (MSG_CTRUNC)")


def send_with_fds(sock: socket.socket, data: bytes | memoryview, fds: Sequence[int] = ()) -> int:
    """One ``sendmsg`` of ``data`` with ``fds`` attached; returns the bytes sent (may be fewer)."""
    if not fds:
        return sock.send(data)
    return sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


def recv_with_fds(sock: socket.socket, size: int, max_fds: int,
                  flags: int = 0) -> tuple[bytes, list[int]]:
    """One ``recvmsg`` of up to ``size`` bytes and ``max_fds`` descriptors (close-on-exec).
    Descriptors beyond ``max_fds`` make it raise :class:`FdOverflow` after closing those that
    did arrive."""
    data, ancdata, msg_flags, _ = sock.recvmsg(size, socket.CMSG_SPACE(max_fds * _INT),
                                               socket.MSG_CMSG_CLOEXEC | flags)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(payload[: len(payload) - len(payload) % _INT])
            fds.extend(got)
    if msg_flags & socket.MSG_CTRUNC:
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
