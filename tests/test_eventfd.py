"""Writes to eventfds that belong to a peer: never on the loop, never unbounded."""

import asyncio
import errno
import os

import pytest

from conftest import wait_until
from dxg.oslib import eventfd as ev
from dxg.oslib.eventfd import EVENTFD_MAX, EventfdWriters


def test_a_write_adds_and_refuses_what_would_block():
    async def main():
        w = EventfdWriters("t")
        efd = os.eventfd(0)
        try:
            assert await w.add(os.dup(efd), 5, "a") == 0
            assert os.eventfd_read(efd) == 5
            os.eventfd_write(efd, EVENTFD_MAX)
            assert await w.add(os.dup(efd), 1, "a") == -errno.EAGAIN  # no room: not written
            r, wr = os.pipe()
            os.close(r)
            assert await w.add(wr, 1, "a") == -errno.EINVAL  # not an eventfd (and closed)
            assert w.in_flight == 0
        finally:
            os.close(efd)

    before = len(os.listdir("/proc/self/fd"))
    asyncio.run(main())
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_peer_that_wins_the_race_pins_only_its_own_few_threads(monkeypatch):
    """The peer fills its counter between the check and the write: the writer sleeps. The loop
    does not; the peer's next signals are refused at once; others' go on."""
    monkeypatch.setattr(ev, "eventfd_count", lambda fd: 0)  # the check saw room: the race won

    async def main():
        w = EventfdWriters("t", limit=3, per_key=1)
        full = os.eventfd(0)
        os.eventfd_write(full, EVENTFD_MAX)
        mine = os.eventfd(0)
        try:
            stuck = asyncio.ensure_future(w.add(os.dup(full), 1, "peer"))
            await asyncio.sleep(0)
            await asyncio.to_thread(wait_until, lambda: w.in_flight == 1)
            assert not stuck.done()
            assert await w.add(os.dup(full), 1, "peer") == -errno.EBUSY  # its share is taken
            assert await w.add(os.dup(mine), 2, "other") == 0  # another owner's is not
            assert os.eventfd_read(mine) == 2
            stuck.cancel()  # the caller may give up; the write still ends when it can
            os.eventfd_read(full)  # room again: the sleeping writer finishes
            await asyncio.to_thread(wait_until, lambda: w.in_flight == 0)
            assert os.eventfd_read(full) == 1
        finally:
            os.close(full)
            os.close(mine)

    asyncio.run(main())


def test_limits_are_checked():
    with pytest.raises(ValueError):
        EventfdWriters("t", limit=1, per_key=2)
