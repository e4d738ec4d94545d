"""Who a client is, and how much each user may hold: shared by the socket node and the FUSE file.

:class:`UidCounter` counts something per user (connections or open files, bytes of calls in
flight, descriptors held) against one limit per non-root user. Root is exempt from the per-user
limit, as it is from the kernel's per-user limits: what root holds still counts towards the
totals the front ends keep. :func:`process_name` reads a process's name for the logs and for
``driver.open_process``; :func:`peer_groups` and :func:`process_groups` the groups a client is in
(what the guest's policy matches besides its uid).
"""

from __future__ import annotations

import errno
import socket
import struct

__all__ = ["EXEMPT_UID", "UidCounter", "peer_groups", "process_groups", "process_name"]

EXEMPT_UID = 0  # root: counted, never refused by a per-user limit


class UidCounter:
    """How much of one thing each user holds, against ``limit`` per non-root user and, when
    given, ``total_limit`` for everyone together (root included).

    Plain bookkeeping on one thread (the front end's loop): :meth:`fits` says whether ``uid``
    may take ``n`` more, :meth:`add` and :meth:`remove` move its count (a user whose count drops
    to zero is forgotten, so the table holds only users that hold something)."""

    __slots__ = ("_held", "limit", "total", "total_limit")

    def __init__(self, limit: int, total_limit: int | None = None) -> None:
        if limit < 1:
            raise ValueError("a per-user limit must be at least 1")
        if total_limit is not None and total_limit < limit:
            raise ValueError("the total limit must be at least the per-user limit")
        self.limit = limit
        self.total_limit = total_limit
        self.total = 0
        self._held: dict[int, int] = {}

    def __repr__(self) -> str:
        return f"<UidCounter limit={self.limit} total={self.total} users={len(self._held)}>"

    def held(self, uid: int) -> int:
        return self._held.get(uid, 0)

    def fits(self, uid: int, n: int = 1) -> bool:
        """Whether ``uid`` may take ``n`` more (root: as long as the total allows)."""
        if self.total_limit is not None and self.total + n > self.total_limit:  # total_fits
            return False
        return uid == EXEMPT_UID or self._held.get(uid, 0) + n <= self.limit

    def total_fits(self, n: int = 1) -> bool:
        return self.total_limit is None or self.total + n <= self.total_limit

    def add(self, uid: int, n: int = 1) -> None:
        if n:
            self._held[uid] = self._held.get(uid, 0) + n
            self.total += n

    def remove(self, uid: int, n: int = 1) -> None:
        if not n:
            return
        held = self._held.get(uid, 0)
        left = held - n
        self.total -= min(n, held)
        if left > 0:
            self._held[uid] = left
        else:
            self._held.pop(uid, None)

    def users(self) -> dict[int, int]:
        """A copy of what each user holds now."""
        return dict(self._held)


def process_name(pid: int) -> str:
    """The name of process ``pid`` (``/proc/<pid>/comm``), or "" when it cannot be read."""
    if pid <= 0:
        return ""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read(64).decode(errors="replace").strip()
    except OSError:
        return ""


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13+; Python may not name it
_MAX_GROUPS = 65536  # NGROUPS_MAX


def peer_groups(sock: socket.socket, gid: int) -> tuple[int, ...]:
    """The groups of the process at the other end of a Unix socket, as they were when it
    connected (SO_PEERGROUPS): its primary group ``gid`` (from SO_PEERCRED) first. Without
    SO_PEERGROUPS, just ``gid``."""
    size = 64 * 4
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as e:
            if e.errno == errno.ERANGE and size < _MAX_GROUPS * 4:
                size = _MAX_GROUPS * 4
                continue
            return (gid,)
        extra = struct.unpack(f"<{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
        return (gid, *(g for g in dict.fromkeys(extra) if g != gid))


def process_groups(pid: int, gid: int) -> tuple[int, ...]:
    """The groups of process ``pid`` (``/proc/<pid>/status``): ``gid`` first, then its
    supplementary groups; just ``gid`` when they cannot be read."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    extra = [int(g) for g in line.split()[1:]]
                    return (gid, *(g for g in dict.fromkeys(extra) if g != gid))
    except (OSError, ValueError):
        pass
    return (gid,)
