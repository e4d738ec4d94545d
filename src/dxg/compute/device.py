"""A virtual GPU as a NumPy user sees it: ``dxg.compute.device(i)``.

A :class:`Device` owns (or borrows) a node connection and holds one adapter, one dxg device,
one context with a hardware queue per stream (the default stream first), a paging queue that
maps every allocation at a GPU virtual address once, and the memory pool
(:mod:`dxg.compute.memory`). Arrays are made on it (``dev.asarray``, ``dev.empty``,
``dev.zeros`` ...); operations on them run on the current stream of the calling thread.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from dxg.client.errors import DxgError
from dxg.client.execution import DeviceFault
from dxg.compute import dtypes as _dt
from dxg.compute.memory import Pool
from dxg.compute.stream import Stream

__all__ = ["Device", "device", "device_count"]

CLOSE_TIMEOUT = 30.0  # seconds close() waits for submitted work before it destroys everything


def _open(node: Any) -> tuple[Any, bool]:
    """A dxg.client Node and whether we own it (``node``: None, a path, or a Node)."""
    from dxg.client import open_node

    if node is None or isinstance(node, str | os.PathLike):
        return open_node(None if node is None else str(node)), True
    return node, False


def device_count(node: Any = None) -> int:
    """How many adapters (virtual GPUs) the node has."""
    n, owned = _open(node)
    try:
        adapters = n.adapters()
        for a in adapters:
            a.close()
        return len(adapters)
    finally:
        if owned:
            n.close()


def device(which: int | str | tuple[int, int] = 0, *, node: Any = None) -> Device:
    """The virtual GPU ``which``: an index into the node's adapters (0, 1, ...; with
    ``DXG_VISIBLE_ADAPTERS`` set, into the adapters it names, renumbered from 0 as CUDA does)
    or an adapter LUID (a ``0x…`` string as ``dxg ls`` prints it, (low, high), or an int that
    is not an index). ``node``: the node's path (default: ``$DXG_NODE`` or the default path)
    or an open ``dxg.client.Node`` to share (then the Device does not close it). Each call
    makes a new Device with its own dxg device and context; close it (``with``) when done.
    An index or LUID that names no adapter raises ``dxg.client.NoSuchAdapter`` (a
    ValueError)."""
    from dxg.client.luids import pick_adapter

    n, owned = _open(node)
    try:
        adapters = n.adapters()
        try:
            index = pick_adapter(adapters, which)
        except BaseException:
            for a in adapters:
                a.close()
            raise
        for i, a in enumerate(adapters):
            if i != index:
                a.close()
        return Device(adapters[index], index, n, owned)
    except BaseException:
        if owned:
            n.close()
        raise


class Device:
    """A virtual GPU (see :func:`device`)."""

    def __init__(self, adapter: Any, index: int, node: Any, owns_node: bool) -> None:
        self.adapter = adapter
        self.index = index
        self.luid = adapter.luid
        self.node = node
        self._owns_node = owns_node
        self._closed = False
        self._lock = threading.RLock()
        self._local = threading.local()  # .stack: this thread's `with stream:` stack
        self._streams: list[Stream] = []
        # (stream, dtype, bytes) -> a 0-d array holding that constant (dxg.compute.ops._scalar)
        self._scalars: collections.OrderedDict[Any, Any] = collections.OrderedDict()
        self.dxg = adapter.create_device()  # dxg.client.Device
        try:
            self.context = self.dxg.create_context()
            self.paging_queue = self.dxg.paging_queue()
            self.pool = Pool(self.dxg, self.paging_queue, self._lock)
            self.default_stream = self._new_stream("default")
        except BaseException:
            self.dxg.close()
            adapter.close()
            raise

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<dxg.compute.Device {self.index} luid=0x{self.luid:016x}{state}>"

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def name(self) -> str:
        """The adapter's description."""
        return str(self.adapter.description)

    @property
    def device_ids(self) -> Any:
        """The adapter's PCI-style ids (``dxg.client.DeviceIds``: vendor_id, device_id...)."""
        return self.adapter.device_ids

    @property
    def execution_state(self) -> Any:
        """The dxg device's execution state (``dxg.client.ExecutionState``; ACTIVE unless its
        work faulted)."""
        self._live()
        return self.dxg.execution_state

    @property
    def closed(self) -> bool:
        return self._closed

    def _live(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r}: the device is closed")

    # -- streams -------------------------------------------------------------------------------

    def _new_stream(self, name: str) -> Stream:
        stream = Stream(self, self.context.hwqueue(), name)
        with self._lock:
            self._streams.append(stream)
        return stream

    def stream(self, name: str | None = None) -> Stream:
        """A new stream: a hardware queue of its own, whose work may run at the same time as
        other streams' (order between streams: events)."""
        self._live()
        return self._new_stream(name or f"stream{len(self._streams)}")

    @property
    def streams(self) -> list[Stream]:
        with self._lock:
            return list(self._streams)

    @property
    def current_stream(self) -> Stream:
        """Where this thread's operations go: the innermost ``with stream:``, else the default
        stream."""
        stack = getattr(self._local, "stack", None)
        return stack[-1] if stack else self.default_stream

    def _push_stream(self, stream: Stream) -> None:
        if stream.device is not self:
            raise ValueError("the stream belongs to another device")
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        stack.append(stream)

    def _pop_stream(self, stream: Stream) -> None:
        stack = getattr(self._local, "stack", None)
        if stack and stack[-1] is stream:
            stack.pop()

    # -- arrays --------------------------------------------------------------------------------

    def _empty(self, shape: Sequence[int], dtype: Any) -> Any:
        from dxg.compute.array import ndarray

        self._live()
        dt = np.dtype(dtype)
        dims = tuple(int(d) for d in shape)
        nbytes = int(np.prod(dims, dtype=np.int64)) * dt.itemsize if dims else dt.itemsize
        block = self.pool.malloc(nbytes, "data", self._pressure)
        return ndarray._new(self, block, dims, dt)

    def empty(self, shape: int | Sequence[int], dtype: Any = np.float64) -> Any:
        """A new array of ``shape`` and ``dtype``; contents undefined (no work, no call when
        small)."""
        return self._empty(_dt.shape_of(shape), _dt.device_dtype(dtype))

    def zeros(self, shape: int | Sequence[int], dtype: Any = np.float64) -> Any:
        return self.full(shape, 0, dtype)

    def ones(self, shape: int | Sequence[int], dtype: Any = np.float64) -> Any:
        return self.full(shape, 1, dtype)

    def full(self, shape: int | Sequence[int], fill_value: Any, dtype: Any = None) -> Any:
        """A new array with every element ``fill_value`` (a FILL on the current stream)."""
        from dxg.compute import ops

        if dtype is None:
            dtype = _dt.coerce(np.asarray(fill_value).dtype)
        out = self.empty(shape, dtype)
        ops.fill(out, fill_value)
        return out

    def empty_like(self, a: Any, dtype: Any = None) -> Any:
        return self.empty(a.shape, a.dtype if dtype is None else dtype)

    def zeros_like(self, a: Any, dtype: Any = None) -> Any:
        return self.zeros(a.shape, a.dtype if dtype is None else dtype)

    def ones_like(self, a: Any, dtype: Any = None) -> Any:
        return self.ones(a.shape, a.dtype if dtype is None else dtype)

    def full_like(self, a: Any, fill_value: Any, dtype: Any = None) -> Any:
        return self.full(a.shape, fill_value, a.dtype if dtype is None else dtype)

    def asarray(self, obj: Any, dtype: Any = None) -> Any:
        """``obj`` on this device: a device array of this device as it is (cast when ``dtype``
        differs), anything else (an ndarray, a list, a scalar) uploaded. Integer types other
        than uint8 become int32 (values checked), booleans int32."""
        from dxg.compute import ops
        from dxg.compute.array import ndarray

        if isinstance(obj, ndarray):
            if obj.device is not self:
                obj = obj.get()
            elif dtype is None or np.dtype(dtype) == obj.dtype:
                return obj
            else:
                return obj.astype(_dt.device_dtype(dtype))
        return ops.upload(self, obj, dtype)

    def array(self, obj: Any, dtype: Any = None, copy: bool = True) -> Any:
        """Like :meth:`asarray`, but a device array of this device is copied (``copy``)."""
        from dxg.compute.array import ndarray

        if isinstance(obj, ndarray) and obj.device is self and copy:
            return obj.astype(obj.dtype if dtype is None else _dt.device_dtype(dtype))
        return self.asarray(obj, dtype)

    def arange(self, *args: Any, dtype: Any = None) -> Any:
        """``numpy.arange(*args)`` uploaded."""
        return self.asarray(np.arange(*args, dtype=dtype))

    def from_allocation(self, allocation: Any, shape: int | Sequence[int], dtype: Any,
                        offset: int = 0) -> Any:
        """An array over memory this Device did not make: a ``dxg.client`` allocation of
        ``self.dxg`` (typically of a resource another process shared: ``self.dxg.
        open_resource(fd)``), ``shape`` and ``dtype`` from byte ``offset``. No copy: work on
        the array reads and writes that memory (an allocation opened read-only cannot be
        written: ``set``, assignments, fills and ``out=`` raise DxgError(STATUS_ACCESS_DENIED)
        before any work is queued). The allocation stays the caller's
        (closing it ends the array); the array only maps it at a GPU VA, once. Work another
        process does on it is ordered with fences (``stream.wait_fence``), as on a GPU."""
        from dxg.compute.array import ndarray
        from dxg.compute.memory import Block

        self._live()
        if allocation.device is not self.dxg:
            raise ValueError("the allocation belongs to another dxg device than this one's "
                             "(open it with dev.dxg)")
        dt = _dt.device_dtype(dtype)
        dims = _dt.shape_of(shape)
        nbytes = int(np.prod(dims, dtype=np.int64)) * dt.itemsize
        if offset < 0 or offset % dt.itemsize or offset + nbytes > allocation.size:
            raise ValueError(f"{nbytes} bytes at offset {offset} do not fit an allocation of "
                             f"{allocation.size} bytes")
        with self._lock:  # a mapping of the whole allocation it has already, else a new one
            whole = [m for m in allocation.gpu_mappings
                     if m.offset == 0 and m.size >= allocation.size]
            va = int(whole[0].va if whole else allocation.map_gpu(self.paging_queue).va)
        kind = "readonly" if getattr(allocation, "read_only", False) else "external"
        block = Block(allocation, va + offset, offset, nbytes, None, kind)
        return ndarray._new(self, block, dims, dt, owned=False)

    # -- synchronization -----------------------------------------------------------------------

    def synchronize(self) -> None:
        """Submit every stream's pending work and wait for all of it; raises
        :class:`~dxg.client.execution.DeviceFault` if the device faulted."""
        self._live()
        values = [(s, s.flush()) for s in self.streams]
        for s, v in values:
            s.wait_value(v)
        self.check()

    def check(self) -> None:
        """Raise DeviceFault if the device's work faulted (one GetDeviceState call)."""
        self._live()
        self.dxg.check()

    def _after_wait(self) -> None:
        self.pool.reap()

    def _pressure(self) -> None:
        """Out of device memory: wait for the work in flight and free what it was using."""
        for s in self.streams:
            try:
                s.wait_value(s.flush())
            except (DeviceFault, DxgError):
                pass
        self.pool.reap()

    # -- memory --------------------------------------------------------------------------------

    def memory_info(self) -> dict[str, Any]:
        """The pool's figures (slabs, dedicated allocations, blocks waiting for their work) and
        this process's video memory usage on the adapter (QueryVideoMemoryInfo)."""
        self._live()
        self.pool.reap()
        info = self.pool.stats()
        vm = self.adapter.video_memory_info()
        info.update(usage=vm.current_usage, budget=vm.budget)
        return info

    def free_unused(self) -> None:
        """Give the device back the memory the pool keeps for reuse (empty slabs, staging)."""
        self._live()
        self.pool.trim()

    # -- closing -------------------------------------------------------------------------------

    def close(self) -> None:
        """Wait (a while) for submitted work, drop what is pending, and destroy everything: the
        arrays' memory, the streams, the context, the device; the node too when this Device
        opened it. Arrays of a closed device can no longer be used."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            streams, self._streams = self._streams, []
            self._scalars.clear()
        try:
            for s in streams:
                try:
                    if s.queue.submitted and s.reached_value() < s.queue.submitted:
                        s.queue.wait(s.queue.submitted, timeout=CLOSE_TIMEOUT)
                except (DxgError, TimeoutError):
                    pass
            self.pool.close()
            try:
                self.dxg.close()  # contexts (and queues), allocations, paging queue, device
            except DxgError:
                pass
            try:
                self.adapter.close()
            except DxgError:
                pass
        finally:
            if self._owns_node:
                self.node.close()
