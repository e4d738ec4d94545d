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
import re
import socket
import threading
from collections.abc import Iterable, Sequence

__all__ = ["FdOverflow", "close_all", "close_foreign", "fd_kind", "open_fd_count",
           "recv_with_fds", "send_with_fds"]

_INT = array.array("i").itemsize
# Plain ints: combining the socket module's IntFlag members costs an enum call on every read.
_RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
_CMSG_SPACE = tuple(socket.CMSG_SPACE(n * _INT) for n in range(65))
# What /proc/self/fd/N reads for files of the kernel's own pseudo filesystems: a pipe, a socket,
# an anonymous inode (eventfd, epoll, ...). Closing one never calls into a file server.
_PSEUDO = re.compile(r"(pipe|socket):\[(\d+)\]|anon_inode:.*")


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
        close_foreign(fds)  # (a peer's: a file among them is closed off this thread)
        raise FdOverflow()
    return data, fds


def close_all(fds: Iterable[int]) -> None:
    """Close each descriptor, ignoring those already closed."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def fd_kind(fd: int) -> tuple[str, int] | None:
    """``("pipe", inode)`` or ``("socket", inode)`` for a pipe or socket, else None (a file, an
    anonymous inode, a closed number). Read from ``/proc/self/fd`` (the kernel's name of the
    file, from the dentry cache): no call reaches the file's filesystem, so a file on a FUSE
    mount whose server never answers (or is the caller's own event loop) cannot block it, as
    fstat would."""
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    found = _PSEUDO.fullmatch(link)
    if found is None or found.group(1) is None:
        return None
    return found.group(1), int(found.group(2))


def close_foreign(fds: Iterable[int]) -> None:
    """Close descriptors a caller handed in. A pipe, a socket or an anonymous inode is closed
    at once; anything else (a file: on a FUSE mount, close sends FLUSH and waits for the
    server, which may never answer, or be this very event loop) on a thread of its own."""
    slow = []
    for fd in fds:
        try:
            quick = _PSEUDO.fullmatch(os.readlink(f"/proc/self/fd/{fd}")) is not None
        except OSError:
            quick = True  # (not open: nothing to wait for)
        if quick:
            close_all((fd,))
        else:
            slow.append(fd)
    if slow:
        threading.Thread(target=close_all, args=(slow,), name="pydxg close",
                         daemon=True).start()


def open_fd_count(pid: int | None = None) -> int:
    """How many descriptors a process (default: this one) has open."""
    return len(os.listdir(f"/proc/{'self' if pid is None else pid}/fd"))
