"""Handle manager: 32-bit handles in the real d3dkmthandle layout (instance bits 0-5, always 0;
index bits 6-29; unique bits 30-31), typed entries, one table per process.

Difference from the real driver, on purpose: the real guest reuses the host's handle values,
which only works with one host. pydxg binds several hosts into one node, so the guest allocates
its own handles and each object keeps its host handle. Indices come from one index space per
driver, so a handle of process A is never valid in process B (foreign handles are always
rejected), and a freed index rests at the tail of a FIFO free list until at least
MIN_FREE_ENTRIES others were handed out (the real driver's use-after-free mitigation). The unique
bits advance 1, 2, 3, 1, ... on every reuse (the real driver always leaves 2).
"""

import threading
from collections import deque
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

INDEX_BITS = 24
INDEX_MAX = (1 << INDEX_BITS) - 1
INDEX_SHIFT = 6
UNIQUE_SHIFT = 30
SIZE_INCREMENT = 1024  # HMGRTABLE_SIZE_INCREMENT
MIN_FREE_ENTRIES = 128  # HMGRTABLE_MIN_FREE_ENTRIES
# pydxg's own guard: processes share one index space, so no process may hold more than this
# many handles at once (-ENOMEM past it); the space (2**24) then takes 64 such processes.
MAX_HANDLES_PER_PROCESS = 1 << 18


class HandleType(IntEnum):
    """enum hmgrentry_type of the real driver."""

    FREE = 0
    ADAPTER = 1
    SHAREDRESOURCE = 2
    DEVICE = 3
    RESOURCE = 4
    ALLOCATION = 5
    OVERLAY = 6
    CONTEXT = 7
    SYNCOBJECT = 8
    KEYEDMUTEX = 9
    PAGINGQUEUE = 10
    DEVICESYNCOBJECT = 11
    PROCESS = 12
    SHAREDVMOBJECT = 13
    PROTECTEDSESSION = 14
    HWQUEUE = 15
    MONITOREDFENCE = 32


def make_handle(index: int, unique: int) -> int:
    return ((unique & 3) << UNIQUE_SHIFT) | ((index & INDEX_MAX) << INDEX_SHIFT)


def split_handle(h: int) -> tuple[int, int, int]:
    """(index, unique, instance)"""
    return (h >> INDEX_SHIFT) & INDEX_MAX, (h >> UNIQUE_SHIFT) & 3, h & 0x3F


class HandleSpace:
    """The driver's index allocator shared by all process tables (an instance, not a global)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: deque[int] = deque()
        self._unique: dict[int, int] = {}
        self._next = 1  # index 0 is never used, so no valid handle is 0

    def alloc(self) -> tuple[int, int]:
        with self._lock:
            if len(self._free) <= MIN_FREE_ENTRIES and self._next <= INDEX_MAX:
                grow = min(SIZE_INCREMENT, INDEX_MAX + 1 - self._next)
                self._free.extend(range(self._next, self._next + grow))
                self._next += grow
            if not self._free:
                raise MemoryError("handle index space exhausted")
            index = self._free.popleft()
            unique = self._unique.get(index, 0) % 3 + 1
            self._unique[index] = unique
            return index, unique

    def free(self, index: int) -> None:
        with self._lock:
            self._free.append(index)


@dataclass(slots=True)
class _Entry:
    type: HandleType
    unique: int
    obj: Any


class HandleTable:
    """One process's table: typed entries keyed by index."""

    def __init__(self, space: HandleSpace, limit: int = MAX_HANDLES_PER_PROCESS) -> None:
        self._space = space
        self._limit = limit
        self._entries: dict[int, _Entry] = {}
        self.lock = threading.RLock()

    def alloc(self, htype: HandleType, obj: Any) -> int:
        with self.lock:
            if len(self._entries) >= self._limit:
                raise MemoryError(f"a process may hold at most {self._limit} handles")
            index, unique = self._space.alloc()
            self._entries[index] = _Entry(htype, unique, obj)
        return make_handle(index, unique)

    def get(self, handle: int, htype: HandleType | None = None) -> Any | None:
        """The live object behind `handle`, or None when it is stale, foreign, of another
        type, or not a handle at all."""
        index, unique, instance = split_handle(handle)
        if instance != 0 or handle == 0:
            return None
        with self.lock:
            e = self._entries.get(index)
            if e is None or e.unique != unique:
                return None
            if htype is not None and e.type != htype:
                return None
            return e.obj

    def free(self, handle: int, htype: HandleType | None = None) -> Any | None:
        """Remove the entry and return its object (None if the handle is not valid)."""
        index, unique, instance = split_handle(handle)
        with self.lock:
            e = self._entries.get(index)
            if e is None or e.unique != unique or instance != 0:
                return None
            if htype is not None and e.type != htype:
                return None
            del self._entries[index]
        self._space.free(index)
        return e.obj

    def items(self) -> list[tuple[int, HandleType, Any]]:
        with self.lock:
            return [(make_handle(i, e.unique), e.type, e.obj) for i, e in self._entries.items()]

    def __len__(self) -> int:
        with self.lock:
            return len(self._entries)
