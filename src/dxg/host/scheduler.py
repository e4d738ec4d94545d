"""Who runs next on an adapter's engine.

An adapter executes at most ``slots`` command buffers at once (one per host core by default:
the soft engine's NumPy work runs on worker threads and releases the GIL). Work that finds every
slot taken waits; when a slot frees, the waiting job of the highest context scheduling priority
goes first, then the one that waited longest. Queues of one process and of every guest of the
host compete here, so a high-priority queue's latency holds while a low-priority one floods the
adapter. Everything here runs on the host's event loop.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from typing import Any

__all__ = ["EngineScheduler"]


class EngineScheduler:
    """Execution slots of one adapter, handed out by priority."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("an engine needs at least one slot")
        self.slots = slots
        self.running = 0
        self.peak = 0  # the most buffers that ever ran at once
        self.waiting = 0  # waiters not given up yet
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self.executed = 0

    async def acquire(self, priority: int) -> None:
        """A slot for work of ``priority`` (higher first)."""
        if self.running < self.slots and not self.waiting:
            self.running += 1
            self.peak = max(self.peak, self.running)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (-priority, next(self._seq), future))
        self.waiting += 1
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(ran=False)  # granted just as it was cancelled: hand it on
            else:
                self.waiting -= 1
            raise

    def release(self, ran: bool = True) -> None:
        """A slot is free (``ran``: after work ran in it): the most urgent waiter gets it."""
        if ran:
            self.executed += 1
        while self._waiting:
            _, _, future = heapq.heappop(self._waiting)
            if not future.done():
                self.waiting -= 1
                future.set_result(None)  # the slot passes on: running stays the same
                return
        self.running -= 1

    def census(self) -> dict[str, Any]:
        return {"slots": self.slots, "running": self.running, "waiting": self.waiting,
                "executed": self.executed, "peak": self.peak}
