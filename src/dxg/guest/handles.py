"""Handle manager: 32-bit handles in the real d3dkmthandle layout (dxg.uapi.handles), typed
entries (dxg.uapi.handles.HandleType), one table per process.

Difference from the real driver, on purpose: the real guest reuses the host's handle values,
which only works with one host. pydxg binds several hosts into one node, so the guest allocates
its own handles and each object keeps its host handle. Indices come from one index space per
driver, so a handle of process A is never valid in process B (foreign handles are always
rejected), and a freed index rests at the tail of a FIFO free list until at least
MIN_FREE_ENTRIES others were handed out (the real driver's use-after-free mitigation). The unique
bits advance 1, 2, 3, 1, ... on every reuse (the real driver always leaves 2).

Tables and the space are touched only on the driver's event loop: no locks.
"""

from collections import deque
from dataclasses import dataclass
from typing import Any

from dxg.guest.quota import Quota, QuotaExceeded
from dxg.uapi.handles import (
    HANDLE_INDEX_MAX,
    HandleType,
    make_handle,
    split_handle,
)

SIZE_INCREMENT = 1024  # HMGRTABLE_SIZE_INCREMENT
MIN_FREE_ENTRIES = 128  # HMGRTABLE_MIN_FREE_ENTRIES
# pydxg's own guard: processes share one index space, so no process may hold more than this
# many handles at once (-ENOMEM past it); dxg.guest.quota bounds each user too.
MAX_HANDLES_PER_PROCESS = 1 << 16

__all__ = ["MAX_HANDLES_PER_PROCESS", "HandleSpace", "HandleTable", "HandleType"]


class HandleSpace:
    """The driver's index allocator shared by all process tables (an instance, not a global)."""

    def __init__(self) -> None:
        self._free: deque[int] = deque()
        self._unique: dict[int, int] = {}
        self._next = 1  # index 0 is never used, so no valid handle is 0

    def alloc(self) -> tuple[int, int]:
        if len(self._free) <= MIN_FREE_ENTRIES and self._next <= HANDLE_INDEX_MAX:
            grow = min(SIZE_INCREMENT, HANDLE_INDEX_MAX + 1 - self._next)
            self._free.extend(range(self._next, self._next + grow))
            self._next += grow
        if not self._free:
            raise MemoryError("handle index space exhausted")
        index = self._free.popleft()
        unique = self._unique.get(index, 0) % 3 + 1
        self._unique[index] = unique
        return index, unique

    def free(self, index: int) -> None:
        self._free.append(index)

    @property
    def in_use(self) -> int:
        return self._next - 1 - len(self._free)


@dataclass(slots=True)
class _Entry:
    type: HandleType
    unique: int
    obj: Any


class HandleTable:
    """One process's table: typed entries keyed by index."""

    def __init__(self, space: HandleSpace, limit: int = MAX_HANDLES_PER_PROCESS,
                 quota: Quota | None = None) -> None:
        self._space = space
        self._limit = limit
        self._quota = quota  # the share of the process's user, if any
        self._entries: dict[int, _Entry] = {}

    def alloc(self, htype: HandleType, obj: Any) -> int:
        if len(self._entries) >= self._limit:
            raise QuotaExceeded(f"a process may hold at most {self._limit} handles")
        if self._quota is not None:
            self._quota.charge()
        try:
            index, unique = self._space.alloc()
        except MemoryError:
            if self._quota is not None:
                self._quota.release()
            raise
        self._entries[index] = _Entry(htype, unique, obj)
        return make_handle(index, unique)

    def _entry(self, handle: int, htype: HandleType | None) -> _Entry | None:
        parts = split_handle(handle)
        if parts is None:
            return None
        entry = self._entries.get(parts[0])
        if entry is None or entry.unique != parts[1]:
            return None
        if htype is not None and entry.type != htype:
            return None
        return entry

    def get(self, handle: int, htype: HandleType | None = None) -> Any | None:
        """The live object behind `handle`, or None when it is stale, foreign, of another
        type, or not a handle at all."""
        e = self._entry(handle, htype)
        return None if e is None else e.obj

    def free(self, handle: int, htype: HandleType | None = None) -> Any | None:
        """Remove the entry and return its object (None if the handle is not valid)."""
        e = self._entry(handle, htype)
        if e is None:
            return None
        index, _ = split_handle(handle)  # type: ignore[misc]  # valid: _entry said so
        del self._entries[index]
        self._space.free(index)
        if self._quota is not None:
            self._quota.release()
        return e.obj

    def clear(self) -> None:
        """Free every entry (process teardown)."""
        for index in self._entries:
            self._space.free(index)
        if self._quota is not None:
            self._quota.release(len(self._entries))
        self._entries.clear()

    def items(self) -> list[tuple[int, HandleType, Any]]:
        return [(make_handle(i, e.unique), e.type, e.obj) for i, e in self._entries.items()]

    def __len__(self) -> int:
        return len(self._entries)
