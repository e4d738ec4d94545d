"""One body for each client operation, run by a sync or an asyncio driver.

An operation of the Pythonic API (:mod:`dxg.client.api`, :mod:`dxg.client.diag`) is written once,
as a generator that *yields steps* and gets each step's result back::

    def execution_state(self) -> Op[int]:
        args = s.d3dkmt_getdevicestate(...)
        status = yield call(t.D3DKMTGetDeviceState, args)
        ...
        return value

A step is a function of the connection that returns a value (sync connection) or an awaitable
(async connection): the thunks of :mod:`dxg.client.thunks` are exactly that. :func:`run` drives an
operation to completion on a :class:`~dxg.client.connection.NodeConnection`; :func:`arun` does
the same on an :class:`~dxg.client.aio.AsyncNodeConnection`, awaiting each step. An exception
from a step is thrown into the generator, so operations handle errors in plain ``try`` blocks.

:class:`op` and :class:`prop` turn such generators into methods: on an object of the sync flavor
(:class:`SyncRunner`) the method returns the result, on the async flavor (:class:`AsyncRunner`)
it returns a coroutine; a :class:`prop` is a property on the sync side and a zero-argument
async method on the async side (``adapter.description`` / ``await adapter.description()``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Generic, ParamSpec, TypeVar, overload

__all__ = ["AsyncRunner", "Op", "Step", "SyncRunner", "arun", "call", "check_owner", "op", "prop",
           "run"]

_T = TypeVar("_T")
_P = ParamSpec("_P")

Step = Callable[[Any], Any]
"""What an operation yields: called with the connection, returns a value or an awaitable."""

Op = Generator[Step, Any, _T]
"""An operation: yields steps, returns its result."""


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Step:
    """The step ``fn(conn, *args, **kwargs)`` (a thunk, ``ioctl``, ``admin``...)."""
    return lambda conn: fn(conn, *args, **kwargs)


def run(conn: Any, operation: Op[_T]) -> _T:
    """Drive ``operation`` on a sync connection."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = operation.send(value) if error is None else operation.throw(error)
        except StopIteration as stop:
            return stop.value
        finally:
            error = None
        try:
            value = step(conn)
        except BaseException as e:  # the operation decides (KeyboardInterrupt passes through)
            value, error = None, e
            continue
        if inspect.isawaitable(value):
            close = getattr(value, "close", None)
            if close is not None:
                close()
            raise TypeError("a sync operation got an awaitable: the connection is async")


async def arun(conn: Any, operation: Op[_T]) -> _T:
    """Drive ``operation`` on an async connection, awaiting each step."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = operation.send(value) if error is None else operation.throw(error)
        except StopIteration as stop:
            return stop.value
        finally:
            error = None
        try:
            value = step(conn)
            if inspect.isawaitable(value):
                value = await value
        except BaseException as e:  # CancelledError included: the operation may clean up
            value, error = None, e


class SyncRunner:
    """The sync flavor: operations of this object run to completion on ``self.conn``."""

    conn: Any

    def _run(self, operation: Op[_T]) -> _T:
        return run(self.conn, operation)


class AsyncRunner:
    """The asyncio flavor: operations of this object return coroutines to await."""

    conn: Any

    def _run(self, operation: Op[_T]) -> Coroutine[Any, Any, _T]:
        return arun(self.conn, operation)


def check_owner(obj: Any) -> None:
    """Refuse, with what to do, an object used in a forked child of the process that made it
    (its connection is the parent's: the node would answer -ENOTTY, as the kernel does)."""
    conn = obj.conn
    if getattr(conn, "forked", False):
        from dxg.client.errors import NodeForked

        raise NodeForked(getattr(conn, "owner_pid", 0))


class op(Generic[_P, _T]):
    """A method written once as an operation (a generator of steps): on a sync object it returns
    the result, on an async object a coroutine of it. Used in a forked child it raises
    :class:`~dxg.client.errors.NodeForked`, unless ``forked_ok`` (closing)."""

    def __init__(self, fn: Callable[..., Op[_T]], *, forked_ok: bool = False) -> None:
        self.fn = fn
        self.forked_ok = forked_ok
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> op[_P, _T]: ...

    @overload
    def __get__(self, obj: AsyncRunner, owner: type | None = None) -> Callable[
        ..., Coroutine[Any, Any, _T]]: ...

    @overload
    def __get__(self, obj: SyncRunner, owner: type | None = None) -> Callable[..., _T]: ...

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        fn = self.fn
        check = not self.forked_ok

        @functools.wraps(fn)
        def bound(*args: Any, **kwargs: Any) -> Any:
            if check:
                check_owner(obj)
            return obj._run(fn(obj, *args, **kwargs))

        return bound


class prop(Generic[_T]):
    """A read-only value computed by an operation: a property on a sync object, a zero-argument
    async method on an async object (where reading it may need the node)."""

    def __init__(self, fn: Callable[[Any], Op[_T]]) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> prop[_T]: ...

    @overload
    def __get__(self, obj: AsyncRunner, owner: type | None = None) -> Callable[
        [], Coroutine[Any, Any, _T]]: ...

    @overload
    def __get__(self, obj: SyncRunner, owner: type | None = None) -> _T: ...

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        if isinstance(obj, AsyncRunner):
            fn = self.fn

            @functools.wraps(fn)
            def bound() -> Any:
                check_owner(obj)
                return obj._run(fn(obj))

            return bound
        check_owner(obj)
        return obj._run(self.fn(obj))
