"""Who runs next on an adapter's engine.

An adapter executes at most ``slots`` command buffers at once (one per host core by default:
the soft engine's NumPy work runs on worker threads and releases the GIL, and the host runs
BLAS single-threaded, so one slot is one core). Work that finds every slot taken waits; when a
slot frees, the waiting job of the highest context scheduling priority goes first, then the one
that waited longest. Queues of one process and of every guest of the host compete here, so a
high-priority queue's latency holds while a low-priority one floods the adapter.

A running job may also **borrow** idle slots for a moment (`try_borrow` / `give_back`), to
spread one large op over cores nobody else wants (dxg.backends.fanout). A slot is lent only
while nobody waits, and lent, never held: a job that comes while it is lent starts at once (that
core runs two threads until the borrower's piece ends: the borrower sees `wanted()` and gives
the slot back before taking another), so borrowing never delays a job, whatever its priority.
`acquire` and `release` run on the host's event loop; borrowing happens on the engine's worker
threads, so the counters they share are kept under a lock.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
from typing import Any

__all__ = ["EngineScheduler"]


class EngineScheduler:
    """Execution slots of one adapter, handed out by priority, and lent while idle."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("an engine needs at least one slot")
        self.slots = slots
        self.running = 0  # slots held by jobs (acquire .. release)
        self.borrowed = 0  # slots lent to running jobs' pieces right now
        self.peak = 0  # the most buffers that ever ran at once
        self.waiting = 0  # waiters not given up yet
        self.executed = 0
        self.lent = 0  # slots ever lent (one per borrow of one slot)
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        # running, borrowed and waiting: the loop changes them, worker threads borrow against
        # them. Held for a few arithmetic steps only, never across an await or a callback.
        self._lock = threading.Lock()

    async def acquire(self, priority: int) -> None:
        """A slot for work of ``priority`` (higher first)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.running < self.slots and not self.waiting:  # lent slots do not count
                self.running += 1
                self.peak = max(self.peak, self.running)
                return
            future: asyncio.Future[None] = loop.create_future()
            heapq.heappush(self._waiting, (-priority, next(self._seq), future))
            self.waiting += 1
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(ran=False)  # granted just as it was cancelled: hand it on
            else:
                with self._lock:
                    self.waiting -= 1
            raise

    def release(self, ran: bool = True) -> None:
        """A slot is free (``ran``: after work ran in it): the most urgent waiter gets it."""
        with self._lock:
            if ran:
                self.executed += 1
            self.running -= 1
        self._grant()

    def _grant(self) -> None:
        """On the loop: free slots go to the waiters, most urgent first."""
        granted: list[asyncio.Future[None]] = []  # (resolved outside the lock)
        with self._lock:
            while self._waiting and self.running < self.slots:
                _, _, future = heapq.heappop(self._waiting)
                if future.done():
                    continue  # its waiter gave up (counted off already)
                self.waiting -= 1
                self.running += 1
                self.peak = max(self.peak, self.running)
                granted.append(future)
        for future in granted:
            future.set_result(None)

    # ---- lending idle slots (any thread) -------------------------------------------------------

    def try_borrow(self, most: int) -> int:
        """Up to ``most`` idle slots (neither running a job nor lent) for a running job's
        pieces, at once (never waits); none while anyone waits for a slot."""
        with self._lock:
            if self.waiting or most < 1:
                return 0
            n = min(most, self.slots - self.running - self.borrowed)
            if n <= 0:
                return 0
            self.borrowed += n
            self.lent += n
            return n

    def give_back(self, n: int = 1) -> None:
        """``n`` borrowed slots are idle again (nobody waits for them: see `acquire`)."""
        with self._lock:
            if not 0 < n <= self.borrowed:
                raise ValueError(f"giving back {n} slots of {self.borrowed} borrowed")
            self.borrowed -= n

    def wanted(self) -> bool:
        """Whether a borrower should give its slot back now: a job took it meanwhile (more
        threads run than there are slots) or one waits."""
        with self._lock:
            return self.waiting > 0 or self.running + self.borrowed > self.slots

    def census(self) -> dict[str, Any]:
        with self._lock:
            return {"slots": self.slots, "running": self.running, "borrowed": self.borrowed,
                    "waiting": self.waiting, "executed": self.executed, "lent": self.lent,
                    "peak": self.peak}
