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


class _Suspended:
    """A coroutine started eagerly that had to wait: it becomes a task once what it waits for
    is done (a task resumed earlier would find that future not done). Until then cancelling
    cancels what it waits for, as cancelling a task does."""

    __slots__ = ("cancelling", "coro", "name", "outer", "owner", "task", "waiting")

    def __init__(self, owner: TaskSet, coro: Coroutine[Any, Any, Any], waiting: Any,
                 outer: asyncio.Future[Any], name: str | None) -> None:
        self.owner = owner
        self.coro = coro
        self.waiting = waiting
        self.outer = outer
        self.name = name
        self.task: asyncio.Task[Any] | None = None
        self.cancelling = False
        outer.add_done_callback(self._outer_done)
        if waiting is None:  # a bare yield (asyncio.sleep(0)): just let the loop run once
            asyncio.get_running_loop().call_soon(self._resume)
        else:
            waiting.add_done_callback(self._resume)

    def _resume(self, _f: Any = None) -> None:
        if self.task is not None:
            return
        self.waiting = None
        task = asyncio.get_running_loop().create_task(self.coro, name=self.name)
        self.task = task
        self.owner._tasks.add(task)
        task.add_done_callback(self.owner._done)
        task.add_done_callback(self._task_done)
        if self.cancelling:
            task.cancel()

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.owner._suspended.discard(self)
        if self.outer.done():
            return
        if task.cancelled():
            self.outer.cancel()
        elif task.exception() is not None:
            self.outer.set_exception(task.exception())  # type: ignore[arg-type]
        else:
            self.outer.set_result(task.result())

    def _outer_done(self, outer: asyncio.Future[Any]) -> None:
        if outer.cancelled():
            self.cancel()

    def cancel(self) -> None:
        self.cancelling = True
        if self.task is not None:
            self.task.cancel()
        elif self.waiting is not None:
            self.waiting.cancel()


def _settle(outer: asyncio.Future[Any], error: BaseException) -> None:
    """``outer`` ends as a coroutine that raised ``error`` on its first step."""
    if isinstance(error, asyncio.CancelledError):
        outer.cancel()
    else:
        outer.set_exception(error)


class TaskSet:
    """The tasks one owner started; ``cancel()`` stops them all (on the loop's thread).

    ``loop``: the loop the set is used on, when the owner knows it (saves looking up the running
    loop on every :meth:`eager` call); every method must still be called on that loop."""

    __slots__ = ("_closed", "_loop", "_name", "_suspended", "_tasks")

    def __init__(self, name: str = "", loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._name = name
        self._loop = loop
        self._tasks: set[asyncio.Task[Any]] = set()
        self._suspended: set[_Suspended] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._tasks) + len(self._suspended)

    def eager(self, coro: Coroutine[Any, Any, _T], name: str | None = None) -> asyncio.Future[_T]:
        """Run ``coro`` now, on the caller's stack, until it first has to wait; most calls never
        do (a local ioctl, or a forwarded one whose host answered in-process), and then cost no
        task and no trip round the loop. One that waits continues as a task of this set. Returns
        a future of its outcome (already done when it finished at once). Like a task, a
        coroutine run this way must not await a future it shares unshielded."""
        outer: asyncio.Future[_T] = (self._loop or asyncio.get_running_loop()).create_future()
        if self._closed:
            coro.close()
            outer.cancel()
            return outer
        try:
            waiting = coro.send(None)
        except StopIteration as e:
            outer.set_result(e.value)
            return outer
        except BaseException as e:
            _settle(outer, e)
            return outer
        self._park(coro, waiting, outer, name)
        return outer

    def start(self, coro: Coroutine[Any, Any, Any],
              name: str | None = None) -> asyncio.Future[Any] | None:
        """:meth:`eager` for a caller that does not want the result: None when ``coro``
        returned at once (no future is made then), else the future of its outcome (done when
        it raised at once or the set is closed)."""
        if self._closed:
            return self.eager(coro, name)
        try:
            waiting = coro.send(None)
        except StopIteration:
            return None
        except BaseException as e:
            outer = (self._loop or asyncio.get_running_loop()).create_future()
            _settle(outer, e)
            return outer
        outer = (self._loop or asyncio.get_running_loop()).create_future()
        self._park(coro, waiting, outer, name)
        return outer

    def _park(self, coro: Coroutine[Any, Any, Any], waiting: Any, outer: asyncio.Future[Any],
              name: str | None) -> None:
        """``coro`` yielded ``waiting`` on its first step: it goes on once that is done (or
        fails ``outer`` at once if that is nothing asyncio waits on)."""
        if waiting is not None and not asyncio.isfuture(waiting):
            # Not something asyncio waits on (a task would fail the same way): stop it.
            error: BaseException = RuntimeError(f"eager coroutine yielded {waiting!r}")
            try:
                coro.close()
            except BaseException as e:  # it would not stop (it awaited in a finally)
                error = e
            outer.set_exception(error)
            return
        self._suspended.add(_Suspended(self, coro, waiting, outer, name))

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

    def cancel(self) -> list[asyncio.Future[Any]]:
        """Close the set and cancel every task in it; returns them (to await if wanted)."""
        self._closed = True
        tasks: list[asyncio.Future[Any]] = list(self._tasks)
        for task in tasks:
            task.cancel()
        for entry in list(self._suspended):
            entry.cancel()
            tasks.append(entry.outer)
        return tasks

    async def wait(self, timeout: float | None = None) -> None:
        """Wait (at most ``timeout``) for the tasks running now to finish."""
        tasks: list[asyncio.Future[Any]] = list(self._tasks)
        tasks += [entry.outer for entry in self._suspended]
        if tasks:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait(tasks, timeout=timeout)

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
