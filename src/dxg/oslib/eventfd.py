"""Adding to an eventfd that belongs to someone else, without ever blocking for it.

A descriptor a peer handed in is the peer's: it chose blocking or not, and it can fill the
counter at any moment. A write to a full blocking eventfd sleeps until someone reads it, and
user space has no way to write to it without that risk (no per-call non-blocking write works on
an eventfd, and its flags are shared with the peer). So the write never runs on a loop or on a
shared worker: each runs on a thread of its own that owns the descriptor, after a check that
needs no syscall on it (``/proc/self/fdinfo``). Only a peer that races its own counter to the
top between that check and the write can make such a thread sleep, and then only its own: the
writers in flight are capped per owner and in all, so what a peer can pin is a few idle
threads, and past the cap its signals answer EBUSY at once.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import Hashable

__all__ = ["EVENTFD_MAX", "EventfdWriters", "eventfd_count"]

EVENTFD_MAX = 0xFFFF_FFFF_FFFF_FFFE  # the largest value an eventfd counter holds


def eventfd_count(fd: int) -> int | None:
    """The counter of eventfd ``fd``, read from fdinfo (no syscall on the descriptor itself),
    or None when ``fd`` is not an eventfd."""
    try:
        if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[eventfd]":
            return None
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
            for line in f:
                if line.startswith("eventfd-count:"):
                    return int(line.split(":", 1)[1], 16)
    except (OSError, ValueError):
        return None
    return None


def _add(fd: int, value: int) -> int:
    count = eventfd_count(fd)
    if count is None:
        return -errno.EINVAL
    if count + value > EVENTFD_MAX:
        return -errno.EAGAIN  # no room: a blocking write would sleep
    try:
        os.eventfd_write(fd, value)
    except OSError as e:
        return -(e.errno or errno.EIO)
    return 0


class EventfdWriters:
    """The writes to peers' eventfds of one owner (a host partition), each on its own thread;
    at most ``limit`` in flight in all and ``per_key`` for one key (a process)."""

    def __init__(self, name: str, limit: int = 8, per_key: int = 2) -> None:
        if not 1 <= per_key <= limit:
            raise ValueError("need 1 <= per_key <= limit")
        self.name = name
        self.limit = limit
        self.per_key = per_key
        self.in_flight = 0
        self._by_key: dict[Hashable, int] = {}

    async def add(self, fd: int, value: int, key: Hashable) -> int:
        """Add ``value`` to eventfd ``fd`` (taken: it is closed, whatever happens): 0, or
        -EINVAL (not an eventfd), -EAGAIN (its counter has no room), -EBUSY (too many writes
        of this key, or in all, still in flight). Cancelling stops the wait, not the write."""
        if self.in_flight >= self.limit or self._by_key.get(key, 0) >= self.per_key:
            os.close(fd)
            return -errno.EBUSY
        loop = asyncio.get_running_loop()
        done: asyncio.Future[int] = loop.create_future()
        self.in_flight += 1
        self._by_key[key] = self._by_key.get(key, 0) + 1

        def finished(result: int) -> None:
            self.in_flight -= 1
            left = self._by_key[key] - 1
            if left:
                self._by_key[key] = left
            else:
                del self._by_key[key]
            if not done.done():
                done.set_result(result)

        def write() -> None:
            result = -errno.EIO
            try:
                result = _add(fd, value)
            finally:
                os.close(fd)
                try:
                    loop.call_soon_threadsafe(finished, result)
                except RuntimeError:
                    pass  # the loop is closed: nobody is counting any more

        try:
            threading.Thread(target=write, name=f"{self.name} eventfd", daemon=True).start()
        except RuntimeError:  # no thread to be had now
            os.close(fd)
            finished(-errno.EAGAIN)
        return await done
