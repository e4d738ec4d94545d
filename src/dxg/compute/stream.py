"""Streams and events: what CUDA streams and events are, on pydxg's hardware queues.

A :class:`Stream` is one hardware queue (CreateHwQueue) of the device's context. Operations on
arrays do not run when called: each one is encoded (``dxg.backends.softcmd``) into the stream's
*pending* command buffer, and the buffer is submitted (SubmitCommandToHwQueue) when the host
needs a result (a read, ``synchronize``, an event another stream waits for) or when it gets
large. So many small operations cost one submission, and Python runs ahead of the GPU.

Every submission gets the next value of the queue's progress fence; the value a pending command
will get is ``stream.next_value``. An :class:`Event` is such a value: ``stream.record()`` marks
the work queued so far, ``other.wait_event(ev)`` makes ``other``'s later work wait for it on the
GPU (SubmitWaitForSyncObjectsToHwQueue on the progress fence; the host never blocks) and
``ev.synchronize()`` waits for it on the CPU (the fence's value is read from a shared page).

Streams also order themselves where arrays say they must: an operation that reads an array
another stream writes (or writes an array another stream uses) with that work not done yet
makes its stream wait for it on the GPU first, as if an event had been recorded and waited for.
So results never depend on timing; explicit events are for work the arrays do not show (a
hand-built command buffer) and for waiting from the host.
"""

from __future__ import annotations

from typing import Any

from dxg.backends.softcmd import CommandBuffer
from dxg.client.errors import DxgError
from dxg.uapi.ntstatus import NTSTATUS

__all__ = ["Event", "Stream"]

FLUSH_COMMANDS = 1024  # a pending buffer with this many commands is submitted
FLUSH_BYTES = 512 << 10  # ... or this many bytes
FLUSH_WORK = 1 << 22  # ... or this much estimated work (element operations): keeps the GPU busy
MAX_IN_FLIGHT = 64  # submissions a stream lets run ahead of the host before it waits


class Stream:
    """A hardware queue of a :class:`~dxg.compute.device.Device` (``dev.stream()``;
    ``dev.default_stream``). ``with stream:`` makes it the current stream of this thread, where
    operations go."""

    def __init__(self, device: Any, queue: Any, name: str) -> None:
        self.device = device
        self.queue = queue  # dxg.client.execution.HwQueue
        self.name = name
        self._lock = device._lock  # one lock for every stream of a device: no lock order
        self._cb = CommandBuffer()
        self._waited: dict[Stream, int] = {}  # the latest value of each stream we wait for
        self._work = 0
        self.submissions = 0  # command buffers submitted
        self.commands = 0  # commands submitted

    def __repr__(self) -> str:
        return (f"<dxg.compute.Stream {self.name} queue=0x{self.queue.handle:08x} "
                f"submitted={self.queue.submitted}>")

    # -- the current stream --------------------------------------------------------------------

    def __enter__(self) -> Stream:
        self.device._push_stream(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.device._pop_stream(self)

    # -- progress ------------------------------------------------------------------------------

    @property
    def next_value(self) -> int:
        """The progress value the pending commands will reach once submitted."""
        return self.queue.submitted + 1

    @property
    def pending(self) -> int:
        """Commands encoded and not submitted yet."""
        return len(self._cb)

    def reached_value(self) -> int:
        """The progress fence's value (a read of a shared page, no call)."""
        try:
            return self.queue.progress
        except DxgError:
            return -1

    def reached(self, value: int) -> bool:
        return self.reached_value() >= value

    @property
    def done(self) -> bool:
        """Whether everything encoded on this stream has run (submits nothing)."""
        return not len(self._cb) and self.reached(self.queue.submitted)

    # -- encoding and submitting ---------------------------------------------------------------

    def _append(self, add: Any, reads: Any = (), writes: Any = (), work: int = 0) -> None:
        """Encode one command (``add(command_buffer)``) and note which blocks it reads and
        writes; submits when the pending buffer is large. A block another stream writes (or, for
        a write, uses) with work not done yet makes this stream wait for that work first."""
        with self._lock:
            self.device._live()
            for blk in writes:
                if blk.kind == "readonly":  # (refused here: the GPU write would fault the device)
                    raise DxgError(NTSTATUS.STATUS_ACCESS_DENIED,
                                   "the array's memory was opened read-only (a read-only share)")
            for blk in reads:
                writer = blk.writer
                if writer is not None and writer[0] is not self:
                    self._after(*writer)
            for blk in writes:
                for other, value in list(blk.uses.items()):
                    if other is not self:
                        self._after(other, value)
            add(self._cb)
            value = self.queue.submitted + 1
            for blk in reads:
                blk.uses[self] = value
            for blk in writes:
                blk.uses[self] = value
                blk.writer = (self, value)
            self._work += work
            if (len(self._cb) >= FLUSH_COMMANDS or self._cb.nbytes >= FLUSH_BYTES
                    or self._work >= FLUSH_WORK):
                self.flush()

    def _after(self, other: Stream, value: int) -> None:
        """This stream's next work waits (on the GPU) until ``other`` reaches ``value``."""
        if self._waited.get(other, 0) >= value or other.reached(value):
            return
        if value > other.queue.submitted:
            other.flush()
        self.flush()  # what was encoded before does not wait
        try:
            self.queue.wait_for(other.queue, value)
        except DxgError:
            self.device.check()
            raise
        self._waited[other] = value

    def flush(self) -> int:
        """Submit the pending commands (if any); the progress value that says they are done."""
        with self._lock:
            if not len(self._cb):
                return self.queue.submitted
            self.device._live()
            cb, self._cb, self._work = self._cb, CommandBuffer(), 0
            return self._submit(cb.tobytes(), len(cb))

    def _submit(self, data: bytes, count: int) -> int:
        pool = self.device.pool
        blk = pool.malloc(len(data), "upload", self.device._pressure)
        try:
            blk.alloc.upload(data, offset=blk.offset)
            try:
                value = self.queue.submit(blk.va, len(data))
            except DxgError:
                self.device.check()  # a fault before: DeviceFault says so
                raise
        except BaseException:
            pool.release(blk)
            raise
        blk.uses[self] = value
        pool.release(blk)  # freed once the queue has run it
        self.submissions += 1
        self.commands += count
        pool.reap()
        if self.queue.submitted - self.reached_value() > MAX_IN_FLIGHT:
            self._wait(self.queue.submitted - MAX_IN_FLIGHT)
        return value

    def launch(self, commands: CommandBuffer, reads: Any = (), writes: Any = ()) -> int:
        """Run a command buffer built by hand (``dxg.backends.softcmd.CommandBuffer``; operands
        from ``array.operand()``) after this stream's work, as its own submission. ``reads`` and
        ``writes``: the arrays it uses, so that their memory stays until it has run and reads
        wait for it. Returns its progress value."""
        with self._lock:
            self.device._live()
            self.flush()
            value = self.queue.submitted + 1
            for a in reads:
                a._block.uses[self] = value
            for a in writes:
                a._block.uses[self] = value
                a._block.writer = (self, value)
            return self._submit(commands.tobytes(), len(commands))

    # -- waiting -------------------------------------------------------------------------------

    def _wait(self, value: int) -> None:
        if value <= 0 or self.reached(value):
            return
        self.queue.wait(value, timeout=None)

    def wait_value(self, value: int) -> None:
        """Until the progress fence reaches ``value`` (submitting what is pending first when
        ``value`` is the pending one); raises DeviceFault if the device faulted."""
        with self._lock:
            if value > self.queue.submitted:
                self.flush()
        self._wait(value)
        self.device._after_wait()

    def synchronize(self) -> None:
        """Submit what is pending and wait until all of it has run; DeviceFault if the device
        faulted."""
        self.wait_value(self.flush())

    # -- events --------------------------------------------------------------------------------

    def record(self) -> Event:
        """An :class:`Event` for the work encoded on this stream so far."""
        with self._lock:
            value = self.queue.submitted + (1 if len(self._cb) else 0)
        return Event(self, value)

    def signal_fence(self, fence: Any, value: int) -> None:
        """Once the work encoded on this stream so far has run, ``fence`` (a ``dxg.client``
        monitored fence of this device, or one another process shared) reaches ``value``:
        how another process learns that memory it shares with this one is ready."""
        with self._lock:
            self.device._live()
            self.flush()
            try:
                self.queue.signal(fence, value)
            except DxgError:
                self.device.check()
                raise

    def wait_fence(self, fence: Any, value: int) -> None:
        """This stream's later work waits (on the GPU; the host does not block) until
        ``fence`` reaches ``value``: work of another process on memory shared with it."""
        with self._lock:
            self.device._live()
            self.flush()
            try:
                self.queue.wait_for(fence, value)
            except DxgError:
                self.device.check()
                raise

    def wait_event(self, event: Event) -> None:
        """This stream's later work waits (on the GPU) for ``event``; the host does not block."""
        if not isinstance(event, Event):
            raise TypeError(f"wait_event takes an Event, not {type(event).__name__}")
        if event.stream.device is not self.device:
            raise ValueError("the event belongs to another device")
        if event.stream is self:
            return  # a stream runs in order
        with self._lock:
            self.device._live()
            if event.value > 0:
                self._after(event.stream, event.value)


class Event:
    """A point in a stream's work (``stream.record()``): progress value ``value`` of
    ``stream``'s queue."""

    __slots__ = ("stream", "value")

    def __init__(self, stream: Stream, value: int) -> None:
        self.stream = stream
        self.value = value

    def __repr__(self) -> str:
        return f"<dxg.compute.Event {self.stream.name}@{self.value} done={self.done}>"

    @property
    def done(self) -> bool:
        """Whether the work before the event has run (a page read: no call, no submission)."""
        return self.stream.reached(self.value)

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        """Wait until the work before the event has run (DeviceFault if the device faulted)."""
        self.stream.wait_value(self.value)
