"""Host handle allocator (the host half of `hmgr.c`): one table per partition.

Handles use the d3dkmthandle layout (instance bits 0-5 = 0, index bits 6-29, unique bits 30-31),
so the guest can use host handle values as its own. Entries are typed; a lookup checks the index,
the unique bits and the type, so stale, forged and wrong-type handles are all rejected.

Freed indices go to the tail of a FIFO free list and are handed out again only while more than
`reuse_delay` indices wait there, so a freed index is not reused until at least that many other
handles have been allocated (the use-after-free mitigation of the real table). Each reuse of a
slot advances its 2-bit unique counter (1, 2, 3, 1, ...); index 0 is never used, so no valid
handle is 0.
"""

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from dxg.uapi.handles import (
    HANDLE_INDEX_MAX,
    HandleType,
    make_handle,
    split_handle,
)

__all__ = ["HandleTable", "HandleTableFull", "HandleType"]


class HandleTableFull(Exception):
    """No index left (or the table's capacity of live entries is reached)."""


@dataclass(slots=True)
class _Entry:
    type: HandleType
    unique: int
    obj: Any


class HandleTable:
    """Typed handle table. Not locked: only its partition's event loop touches it."""

    def __init__(self, capacity: int = HANDLE_INDEX_MAX, reuse_delay: int = 128) -> None:
        if not 1 <= capacity <= HANDLE_INDEX_MAX:
            raise ValueError(f"capacity must be 1..{HANDLE_INDEX_MAX}")
        self.capacity = capacity
        self.reuse_delay = max(0, reuse_delay)
        self._live: dict[int, _Entry] = {}  # index -> entry
        self._next_unique: dict[int, int] = {}  # freed index -> unique for its next use
        self._free: deque[int] = deque()
        self._next_index = 1

    def __len__(self) -> int:
        return len(self._live)

    def alloc(self, htype: HandleType, obj: Any) -> int:
        if len(self._live) >= self.capacity:
            raise HandleTableFull(f"{len(self._live)} live handles, capacity {self.capacity}")
        if len(self._free) > self.reuse_delay:
            index = self._free.popleft()
        elif self._next_index <= HANDLE_INDEX_MAX:
            index = self._next_index
            self._next_index += 1
        elif self._free:
            index = self._free.popleft()
        else:
            raise HandleTableFull("every handle index is in use")
        unique = self._next_unique.pop(index, 1)
        self._live[index] = _Entry(htype, unique, obj)
        return make_handle(index, unique)

    def _entry(self, handle: int, htype: HandleType | None) -> _Entry | None:
        parts = split_handle(handle)
        if parts is None:
            return None
        entry = self._live.get(parts[0])
        if entry is None or entry.unique != parts[1]:
            return None
        if htype is not None and entry.type != htype:
            return None
        return entry

    def get(self, handle: int, htype: HandleType | None = None) -> Any:
        """The object behind a live handle of type `htype`, or None."""
        entry = self._entry(handle, htype)
        return None if entry is None else entry.obj

    def free(self, handle: int, htype: HandleType | None = None) -> Any:
        """Release a live handle; returns its object, or None when the handle is not live."""
        entry = self._entry(handle, htype)
        if entry is None:
            return None
        index, _ = split_handle(handle)  # type: ignore[misc]  # valid: _entry said so
        del self._live[index]
        self._next_unique[index] = entry.unique % 3 + 1
        self._free.append(index)
        return entry.obj

    def items(self, htype: HandleType | None = None) -> Iterator[tuple[int, Any]]:
        """(handle, object) for each live entry (of type `htype`), in index order."""
        for index in sorted(self._live):
            entry = self._live[index]
            if htype is None or entry.type == htype:
                yield make_handle(index, entry.unique), entry.obj

    def count(self, htype: HandleType) -> int:
        return sum(1 for e in self._live.values() if e.type == htype)
