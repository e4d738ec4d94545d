"""The client's block table: maps taken in from replies (real memfds, real mmap), addresses
handed to callers, unmaps, and the rules a hostile node cannot break it with."""

import ctypes
import os

from dxg.client.blockmap import BlockMaps
from dxg.oslib.memfd import SharedMemory
from dxg.uapi import wire


def _map(block: int, size: int, with_fd: bool = True, readonly: bool = False) -> wire.BlockMap:
    flags = (wire.MAP_WITH_FD if with_fd else 0) | (wire.MAP_READONLY if readonly else 0)
    return wire.BlockMap(wire.MAP, block, size, 0, 0, flags=flags)


def test_a_block_maps_once_and_shares_bytes_with_its_owner():
    shm = SharedMemory(1 << 16)
    maps = BlockMaps()
    try:
        maps.receive([_map(1, shm.size)], [os.dup(shm.fd)])
        a = maps.address(1, 4096, shm.size)
        b = maps.address(1, 8192, shm.size)
        assert a is not None and b == a + 4096
        ctypes.memmove(a, b"hello", 5)
        assert shm.read(4096, 5) == b"hello"  # the same pages
        shm.write(8192, b"world")
        assert ctypes.string_at(b, 5) == b"world"
        assert maps.mapped_bytes == shm.size and len(maps) == 1
        assert maps.address(1, shm.size, shm.size) is None  # outside the block
        assert maps.address(1, 0, 4096) is None  # a size that is not the block's
        assert maps.address(2, 0, shm.size) is None  # never given
        maps.receive([wire.BlockMap(wire.UNMAP, 1, width=0)], [])
        assert maps.address(1, 0, shm.size) is None and len(maps) == 0
    finally:
        maps.close()
        shm.close()


def test_descriptors_are_closed_once_mapped_and_on_close():
    shm = SharedMemory(8192)
    maps = BlockMaps()
    before = len(os.listdir("/proc/self/fd"))
    for block in range(1, 51):
        maps.receive([_map(block, shm.size)], [os.dup(shm.fd)])
    assert len(os.listdir("/proc/self/fd")) == before  # mapped: no descriptor kept
    maps.close()
    assert len(maps) == 0
    shm.close()


def test_a_descriptor_that_cannot_be_mapped_is_kept_for_a_retry_then_closed():
    maps = BlockMaps()
    r, w = os.pipe()  # not mappable
    os.close(r)
    maps.receive([_map(1, 4096)], [w])
    assert maps.address(1, 0, 4096) is None
    maps.close()
    try:
        os.fstat(w)
        raise AssertionError("descriptor left open")
    except OSError:
        pass


def test_a_read_only_block_is_mapped_read_only():
    shm = SharedMemory(4096)
    maps = BlockMaps()
    try:
        maps.receive([_map(3, 4096, readonly=True)], [os.dup(shm.fd)])
        addr = maps.address(3, 0, 4096)
        assert addr is not None
        shm.write(0, (42).to_bytes(8, "little"))
        assert ctypes.c_uint64.from_address(addr).value == 42
        with open("/proc/self/maps") as f:
            line = next(x for x in f if x.startswith(f"{addr:x}-"))
        assert line.split()[1].startswith("r--")
    finally:
        maps.close()
        shm.close()
