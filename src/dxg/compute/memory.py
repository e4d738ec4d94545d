"""Device memory for dxg.compute: blocks of GPU memory, each at a GPU virtual address mapped once,
and the rules that say when a block may be reused or destroyed.

Three kinds of memory, so that the CPU never locks (Lock2) memory the GPU may be writing:

* **data slabs**: small arrays (up to ``SMALL_BYTES``) are carved from 4 MiB allocations, each
  mapped once at a GPU VA. Only the GPU touches them (no CPU map at all): new small arrays cost
  no call to the node.
* **upload slabs**: command buffers and the bytes of small uploads. The CPU writes a block (a
  Lock2 of the slab), the GPU only reads it (a command buffer, or a COPY into a data block), so
  a Lock2 here never races a GPU write, even over TCP where Unlock2 writes the whole allocation
  back.
* **dedicated allocations**: large arrays (their own allocation, uploaded and downloaded with a
  Lock2 once the GPU is done with them) and download staging buffers (the GPU copies a small
  array there, the CPU reads it).

A block is never reused or destroyed while work that uses it may still run: each block keeps,
per stream, the progress value of the last submission that reads or writes it (``uses``) and of
the last one that writes it (``writer``). When an array is garbage collected its block goes to
the *graveyard* (a deque append, safe from any thread and inside a finalizer), and ``reap``
frees what is there once the streams' progress fences (read from a shared page, no call) show
its work done: a slab block goes back to its slab, a dedicated allocation is destroyed
(DestroyAllocation2). Empty slabs beyond one spare per kind are destroyed too.
"""

from __future__ import annotations

import bisect
import collections
import threading
from typing import Any

from dxg.client.errors import DxgError
from dxg.uapi.ntstatus import NTSTATUS

__all__ = ["ALIGN", "SLAB_BYTES", "SMALL_BYTES", "Block", "Pool", "Slab"]

ALIGN = 256  # every block starts on this many bytes
SLAB_BYTES = 4 << 20  # one slab allocation
SMALL_BYTES = 1 << 20  # blocks up to this size are carved from slabs
STAGING_KEEP = 4  # download staging allocations kept for reuse
STAGING_MIN = 64 << 10


def _round(n: int, to: int = ALIGN) -> int:
    return (n + to - 1) // to * to


class Block:
    """``size`` bytes of GPU memory at GPU VA ``va``: bytes ``offset`` .. of allocation
    ``alloc`` (a slab's, or its own: ``slab`` None). A block of size 0 has no memory."""

    __slots__ = ("alloc", "kind", "offset", "size", "slab", "uses", "va", "writer")

    def __init__(self, alloc: Any, va: int, offset: int, size: int, slab: Slab | None,
                 kind: str) -> None:
        self.alloc = alloc
        self.va = va
        self.offset = offset
        self.size = size
        self.slab = slab
        # "data", "upload", "dedicated", "staging", "empty", "external", "readonly" (external
        # memory opened read-only: no work may write it)
        self.kind = kind
        self.uses: dict[Any, int] = {}  # stream -> progress value of its last use
        self.writer: tuple[Any, int] | None = None  # (stream, value) of the last write

    def __repr__(self) -> str:
        return f"<Block {self.kind} va=0x{self.va:x} size={self.size}>"

    @property
    def dedicated(self) -> bool:
        return self.slab is None and self.alloc is not None

    def read_by(self, stream: Any, value: int) -> None:
        self.uses[stream] = value

    def written_by(self, stream: Any, value: int) -> None:
        self.uses[stream] = value
        self.writer = (stream, value)

    def idle(self, progress: dict[Any, int] | None = None) -> bool:
        """Whether every submission that uses this block has run (progress fences)."""
        for stream, value in self.uses.items():
            reached = progress.get(stream) if progress is not None else None
            if reached is None:
                reached = stream.reached_value()
                if progress is not None:
                    progress[stream] = reached
            if reached < value:
                return False
        return True


class Slab:
    """One allocation mapped at a GPU VA, carved into blocks (first fit, coalescing frees)."""

    __slots__ = ("alloc", "free", "kind", "size", "used", "va")

    def __init__(self, alloc: Any, va: int, size: int, kind: str) -> None:
        self.alloc = alloc
        self.va = va
        self.size = size
        self.kind = kind
        self.free: list[list[int]] = [[0, size]]  # [offset, size], sorted by offset
        self.used = 0

    def carve(self, n: int) -> int | None:
        for i, (off, size) in enumerate(self.free):
            if size >= n:
                if size == n:
                    del self.free[i]
                else:
                    self.free[i] = [off + n, size - n]
                self.used += n
                return off
        return None

    def give_back(self, off: int, n: int) -> None:
        self.used -= n
        i = bisect.bisect_left(self.free, [off, 0])
        self.free.insert(i, [off, n])
        if i + 1 < len(self.free) and off + n == self.free[i + 1][0]:  # merge the next
            self.free[i][1] += self.free[i + 1][1]
            del self.free[i + 1]
        if i > 0 and self.free[i - 1][0] + self.free[i - 1][1] == off:  # merge into the previous
            self.free[i - 1][1] += self.free[i][1]
            del self.free[i]

    @property
    def empty(self) -> bool:
        return self.used == 0


class Pool:
    """The memory of one :class:`~dxg.compute.device.Device` (see the module's docstring)."""

    def __init__(self, device: Any, paging_queue: Any, lock: Any = None) -> None:
        self._device = device  # dxg.client.Device
        self._paging = paging_queue
        # the compute device's lock: making memory may wait for streams, which take it too
        self._lock = lock if lock is not None else threading.RLock()
        self._slabs: dict[str, list[Slab]] = {"data": [], "upload": []}
        self._dedicated: set[Any] = set()  # allocations of dedicated and staging blocks
        self._staging: list[Block] = []  # idle download staging blocks, kept for reuse
        self.graveyard: collections.deque[Block] = collections.deque()
        self._deferred: list[Block] = []
        self.closed = False

    # -- making memory -------------------------------------------------------------------------

    def _allocation(self, nbytes: int, on_pressure: Any) -> tuple[Any, int]:
        """A new allocation of ``nbytes`` and its GPU mapping; on STATUS_NO_MEMORY,
        ``on_pressure()`` (wait for the work in flight, free what it used) and one retry."""
        for attempt in range(2):
            try:
                alloc = self._device.allocate(nbytes)
            except DxgError as e:
                if attempt or e.status != NTSTATUS.STATUS_NO_MEMORY or on_pressure is None:
                    raise
                on_pressure()
                continue
            try:
                mapping = alloc.map_gpu(self._paging)
            except BaseException:
                alloc.close()
                raise
            return alloc, int(mapping.va)
        raise AssertionError("unreachable")

    def malloc(self, nbytes: int, kind: str = "data", on_pressure: Any = None) -> Block:
        """A block of at least ``nbytes``: carved from a slab of ``kind`` ("data" or "upload")
        when small, its own allocation otherwise."""
        with self._lock:
            if self.closed:
                raise RuntimeError("the dxg.compute device is closed")
            if nbytes <= 0:
                return Block(None, 0, 0, 0, None, "empty")
            if nbytes > SMALL_BYTES:
                alloc, va = self._allocation(nbytes, on_pressure)
                self._dedicated.add(alloc)
                return Block(alloc, va, 0, nbytes, None, "dedicated")
            n = _round(nbytes)
            slabs = self._slabs[kind]
            for slab in slabs:
                off = slab.carve(n)
                if off is not None:
                    return Block(slab.alloc, slab.va + off, off, n, slab, kind)
            self.reap()  # memory the GPU is done with may come back
            for slab in slabs:
                off = slab.carve(n)
                if off is not None:
                    return Block(slab.alloc, slab.va + off, off, n, slab, kind)
            alloc, va = self._allocation(SLAB_BYTES, on_pressure)
            slab = Slab(alloc, va, SLAB_BYTES, kind)
            slabs.append(slab)
            off = slab.carve(n)
            assert off == 0
            return Block(alloc, va, 0, n, slab, kind)

    def staging(self, nbytes: int, on_pressure: Any = None) -> Block:
        """A download staging block: an allocation of its own (the CPU locks it while the GPU
        writes nothing else there), reused once given back with :meth:`unstage`."""
        with self._lock:
            if self.closed:
                raise RuntimeError("the dxg.compute device is closed")
            for i, blk in enumerate(self._staging):
                if blk.size >= nbytes and blk.size <= 4 * max(nbytes, STAGING_MIN):
                    del self._staging[i]
                    blk.uses.clear()
                    blk.writer = None
                    return blk
            size = max(STAGING_MIN, 1 << (max(nbytes, 1) - 1).bit_length())
            alloc, va = self._allocation(size, on_pressure)
            self._dedicated.add(alloc)
            return Block(alloc, va, 0, size, None, "staging")

    def unstage(self, blk: Block) -> None:
        """A staging block whose bytes have been read: kept for the next download."""
        with self._lock:
            if self.closed:
                return
            self._staging.insert(0, blk)
            while len(self._staging) > STAGING_KEEP:
                self._destroy(self._staging.pop().alloc)

    # -- freeing ---------------------------------------------------------------------------------

    def release(self, blk: Block) -> None:
        """``blk`` is no longer referenced (any thread, a finalizer too): free it once its work is
        done (at the next :meth:`reap`)."""
        if not self.closed:
            self.graveyard.append(blk)

    def reap(self) -> int:
        """Free the released blocks whose work is done; the bytes freed."""
        with self._lock:
            if self.closed:
                self.graveyard.clear()
                return 0
            while self.graveyard:
                self._deferred.append(self.graveyard.popleft())
            if not self._deferred:
                return 0
            progress: dict[Any, int] = {}
            keep: list[Block] = []
            freed = 0
            touched: set[str] = set()
            for blk in self._deferred:
                if not blk.idle(progress):
                    keep.append(blk)
                    continue
                freed += blk.size
                if blk.slab is not None:
                    blk.slab.give_back(blk.offset, blk.size)
                    touched.add(blk.slab.kind)
                elif blk.alloc is not None:
                    self._destroy(blk.alloc)
            self._deferred = keep
            for kind in touched:
                self._drop_empty_slabs(kind, spare=1)
            return freed

    def _drop_empty_slabs(self, kind: str, spare: int) -> None:
        slabs = self._slabs[kind]
        empty = [s for s in slabs if s.empty]
        for slab in empty[spare:]:
            slabs.remove(slab)
            self._destroy(slab.alloc)

    def _destroy(self, alloc: Any) -> None:
        self._dedicated.discard(alloc)
        try:
            alloc.close()  # DestroyAllocation2 (its GPU mapping goes with it)
        except DxgError:
            pass  # the device is gone or in error: its memory goes with it

    def trim(self) -> None:
        """Destroy every empty slab and every kept staging buffer."""
        with self._lock:
            self.reap()
            for kind in self._slabs:
                self._drop_empty_slabs(kind, spare=0)
            while self._staging:
                self._destroy(self._staging.pop().alloc)

    def stats(self) -> dict[str, int]:
        """Bytes in use by blocks and held from the device (slabs, dedicated allocations)."""
        with self._lock:
            slabs = [s for kind in self._slabs.values() for s in kind]
            return {
                "slabs": len(slabs),
                "slab_bytes": sum(s.size for s in slabs),
                "slab_used_bytes": sum(s.used for s in slabs),
                "dedicated": len(self._dedicated),
                "dedicated_bytes": sum(a.size for a in self._dedicated),
                "waiting_blocks": len(self._deferred) + len(self.graveyard),
            }

    def close(self) -> None:
        """Forget everything: the device's destruction destroys the allocations."""
        with self._lock:
            self.closed = True
            self._slabs = {"data": [], "upload": []}
            self._dedicated = set()
            self._staging = []
            self._deferred = []
            self.graveyard.clear()
