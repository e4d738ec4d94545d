"""An asyncio event loop on a thread of its own, created by its owner and passed explicitly.

A Host and a GuestDriver each run their I/O and control paths on one loop; whoever builds them
creates the loop (or lets each build its own) and hands it over. There is no global loop: two
complete stacks in one process each have theirs, or share one when their owner says so (``dxg up``
runs host, guest and node on one loop, so a forwarded call crosses no thread).

Code outside the loop's thread reaches it through :meth:`LoopThread.run` (a coroutine) and
:meth:`LoopThread.call` (a plain function), which wait for the result. Code on the loop must never
call them (it would wait for itself): they raise instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class LoopThread:
    """Owns one event loop and the thread that runs it. ``close()`` stops both (idempotent)."""

    def __init__(self, name: str = "dxg-loop") -> None:
        self.name = name
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(self._exception)
        self._started = threading.Event()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._started.wait()

    def __repr__(self) -> str:
        return f"<LoopThread {self.name!r}{' closed' if self._closed else ''}>"

    def _run(self) -> None:
        self.loop.call_soon(self._started.set)
        try:
            self.loop.run_forever()
        finally:
            try:
                pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
                for task in pending:
                    task.cancel()
                if pending:
                    self.loop.run_until_complete(
                        asyncio.gather(*pending, return_exceptions=True))
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            except Exception:
                log.exception("%s: winding down the loop failed", self.name)
            finally:
                self.loop.close()

    def _exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, (ConnectionError, asyncio.CancelledError)):
            log.debug("%s: %s", self.name, context.get("message"))
            return
        loop.default_exception_handler(context)

    @property
    def closed(self) -> bool:
        return self._closed

    def in_loop(self) -> bool:
        """True on the loop's own thread."""
        return threading.get_ident() == self._thread.ident

    def _check_caller(self, what: str) -> None:
        if self.in_loop():
            raise RuntimeError(f"{what} called on the loop's own thread (it would wait for itself)")
        if self._closed:
            raise RuntimeError(f"{self.name} is closed")

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        """Run ``coro`` on the loop and wait for its result (from any other thread)."""
        try:
            self._check_caller("LoopThread.run")
        except RuntimeError:
            coro.close()
            raise
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"{self.name}: no result within {timeout}s") from None

    def call(self, fn: Callable[..., _T], *args: Any, timeout: float | None = None) -> _T:
        """Run the plain function ``fn(*args)`` on the loop and wait for its result."""

        async def call() -> _T:
            return fn(*args)

        return self.run(call(), timeout)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        """Start ``coro`` on the loop from any thread without waiting for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Schedule ``fn(*args)`` on the loop from any thread (dropped once the loop is closed)."""
        with contextlib.suppress(RuntimeError):
            if self.in_loop():
                self.loop.call_soon(fn, *args)
            else:
                self.loop.call_soon_threadsafe(fn, *args)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loop (cancelling what still runs on it) and join its thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.in_loop():
            self.loop.stop()
            return
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("%s: the loop thread did not stop within %gs", self.name, timeout)


class Changes:
    """Something an owner changes on its loop (guests come and go, adapters start), which other
    threads wait on with a predicate: ``notify()`` on the loop, ``wait_for()`` off it."""

    __slots__ = ("_event", "_poll", "_rt")

    def __init__(self, rt: LoopThread, poll: float = 0.05) -> None:
        self._rt = rt
        self._poll = poll  # predicates that change without a notify() are seen this often
        self._event: asyncio.Event | None = None

    def notify(self) -> None:
        if self._event is not None:
            self._event.set()

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait (off the loop) until ``predicate()``, evaluated on the loop, holds; False on
        timeout."""
        deadline = time.monotonic() + timeout

        async def wait() -> bool:
            if self._event is None:
                self._event = asyncio.Event()
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._event.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._event.wait(), min(left, self._poll))
            return True

        return self._rt.run(wait())


def on_loop(method: Callable[..., _T]) -> Callable[..., _T]:
    """Decorate a method of an object that has ``self.rt`` (its LoopThread): the method runs on
    the loop, called directly when already there, else marshalled there and waited for. State
    such methods touch is only ever touched on the loop, so it needs no lock."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kw: Any) -> _T:
        rt: LoopThread = self.rt
        if rt.in_loop():
            return method(self, *args, **kw)
        return rt.call(functools.partial(method, self, *args, **kw))

    return wrapper


def owned_loop(loop: LoopThread | None, name: str) -> tuple[LoopThread, bool]:
    """The loop to use and whether the caller owns it (made it, so must close it)."""
    if loop is not None:
        if loop.closed:
            raise RuntimeError(f"{loop.name} is closed")
        return loop, False
    return LoopThread(name), True


__all__ = ["Changes", "LoopThread", "on_loop", "owned_loop"]
