"""Tasks that belong to an owner, and lanes that keep some of them in order.

asyncio keeps only a weak reference to a running task, and nothing cancels a task when what it
works for goes away. :class:`TaskSet` is the owner's strong set: a process (a node connection)
spawns each of its calls into its own set and cancels the set when the process dies, so a dead
process's calls stop and its waiters wake. :class:`Lanes` runs the jobs that share a key one after
another (the commands of one context or queue) while jobs with other keys run freely.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class TaskSet:
    """The tasks one owner started; ``cancel()`` stops them all (on the loop's thread)."""

    __slots__ = ("_closed", "_name", "_tasks")

    def __init__(self, name: str = "") -> None:
        self._name = name
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._tasks)

    @property
    def closed(self) -> bool:
        return self._closed

    def spawn(self, coro: Coroutine[Any, Any, _T], name: str | None = None) -> asyncio.Task[_T]:
        """Start ``coro`` as a task of this set. A closed set refuses (RuntimeError)."""
        if self._closed:
            coro.close()
            raise RuntimeError(f"task set {self._name!r} is closed")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not isinstance(exc, (ConnectionError, asyncio.CancelledError)):
            log.error("%s: task %s failed", self._name or "tasks", task.get_name(),
                      exc_info=exc)

    def cancel(self) -> list[asyncio.Task[Any]]:
        """Close the set and cancel every task in it; returns them (to await if wanted)."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        return tasks

    async def cancel_and_wait(self, timeout: float | None = None) -> None:
        tasks = self.cancel()
        if tasks:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait(tasks, timeout=timeout)


class Lanes:
    """Per-key FIFO: ``await lanes.run(key, job)`` starts ``job()`` once every earlier job with
    the same key has finished (whatever its outcome), so the commands of one context stay in
    order while other keys go ahead. Keys with nothing queued cost nothing."""

    __slots__ = ("_tails",)

    def __init__(self) -> None:
        self._tails: dict[Hashable, asyncio.Future[None]] = {}

    def busy(self, key: Hashable) -> bool:
        """Whether a job with ``key`` is running or queued."""
        return key in self._tails

    def __len__(self) -> int:
        return len(self._tails)

    async def run(self, key: Hashable, job: Callable[[], Awaitable[_T]]) -> _T:
        previous = self._tails.get(key)
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tails[key] = mine
        try:
            if previous is not None:
                # Wait for the job ahead (not its result); a cancellation of ours propagates.
                await asyncio.wait((previous,))
            return await job()
        finally:
            if previous is not None and not previous.done():
                # Cancelled while queued: the next job must still wait for the one ahead.
                previous.add_done_callback(lambda _f: self._release(key, mine))
            else:
                self._release(key, mine)

    def _release(self, key: Hashable, mine: asyncio.Future[None]) -> None:
        if not mine.done():
            mine.set_result(None)
        if self._tails.get(key) is mine:
            del self._tails[key]


__all__ = ["Lanes", "TaskSet"]
