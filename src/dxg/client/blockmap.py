"""The blocks of shared memory the node mapped into this process (the wire's block maps).

A Lock2 (or a fence page) hands the client a block the first time with its descriptor: the
block is mapped here once, the descriptor closed, and every later Lock2 of any allocation in it
reuses the mapping (zero copy, no descriptor per allocation). The node says when a block is gone
(UNMAP) and it is unmapped then. Maps go through libc's mmap, not Python's mmap objects: the
address handed to the caller is a raw pointer, as from the kernel, and nothing in Python keeps
the mapping pinned.

Thread-safe: the connection's reader adds and removes blocks while callers look them up.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from collections.abc import Sequence

from dxg.oslib.fds import close_all
from dxg.uapi import wire

__all__ = ["BlockMaps"]

_MAP_FAILED = ctypes.c_void_p(-1).value


class _Block:
    __slots__ = ("addr", "fd", "readonly", "size")

    def __init__(self, size: int, readonly: bool) -> None:
        self.addr = 0
        self.fd = -1  # kept only while the block could not be mapped
        self.size = size
        self.readonly = readonly


class BlockMaps:
    """Block number -> this process's mapping of it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._blocks: dict[int, _Block] = {}
        libc = ctypes.CDLL(None, use_errno=True)
        self._mmap = libc.mmap
        self._mmap.restype = ctypes.c_void_p
        self._mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                               ctypes.c_int, ctypes.c_long)
        self._munmap = libc.munmap
        self._munmap.restype = ctypes.c_int
        self._munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)

    def __len__(self) -> int:
        return len(self._blocks)

    @property
    def mapped_bytes(self) -> int:
        with self._lock:
            return sum(b.size for b in self._blocks.values() if b.addr)

    def receive(self, maps: Sequence[wire.BlockMap], fds: list[int]) -> None:
        """Take in one reply's block maps: ``fds`` are the descriptors of its MAP_WITH_FD
        entries, in order (this object owns them from here). A MAP without a descriptor (a
        block already here: the common Lock2) changes nothing, so such maps alone take no
        lock."""
        if not fds and all(m.op == wire.MAP and not m.flags & wire.MAP_WITH_FD for m in maps):
            return
        fds = list(fds)
        try:
            with self._lock:
                for m in maps:
                    if m.op == wire.UNMAP:
                        self._drop(m.block)
                    elif m.with_fd:
                        fd = fds.pop(0)
                        old = self._blocks.pop(m.block, None)
                        if old is not None:
                            self._release(old)
                        block = _Block(m.block_size, bool(m.flags & wire.MAP_READONLY))
                        block.fd = fd
                        self._blocks[m.block] = block
                        self._map(block)
        finally:
            close_all(fds)

    def address(self, block: int, offset: int, size: int) -> int | None:
        """The address of byte ``offset`` of ``block`` (mapped now if it could not be before),
        or None when the block is not here or ``offset`` is outside it."""
        with self._lock:
            b = self._blocks.get(block)
            if b is None or not 0 <= offset < b.size or size != b.size:
                return None
            if not b.addr and not self._map(b):
                return None
            return b.addr + offset

    def readonly_at(self, address: int) -> bool:
        """Whether ``address`` lies in a block mapped read-only here (memory this process may
        only read: a fence page, an allocation opened from a read-only share)."""
        with self._lock:
            return any(b.readonly and b.addr <= address < b.addr + b.size
                       for b in self._blocks.values() if b.addr)

    def _map(self, b: _Block) -> bool:
        prot = mmap.PROT_READ if b.readonly else mmap.PROT_READ | mmap.PROT_WRITE
        addr = self._mmap(None, b.size, prot, mmap.MAP_SHARED, b.fd, 0)
        if addr is None or addr == _MAP_FAILED:
            return False  # keep the descriptor: a later Lock2 tries again
        b.addr = addr
        os.close(b.fd)
        b.fd = -1
        return True

    def _release(self, b: _Block) -> None:
        if b.addr:
            self._munmap(b.addr, b.size)
            b.addr = 0
        if b.fd >= 0:
            os.close(b.fd)
            b.fd = -1

    def _drop(self, block: int) -> None:
        b = self._blocks.pop(block, None)
        if b is not None:
            self._release(b)

    def close(self) -> None:
        """Unmap every block (the connection is closing: its memory is gone with it)."""
        with self._lock:
            blocks, self._blocks = self._blocks, {}
            for b in blocks.values():
                self._release(b)
