"""dxg.client.memory against a real stack: allocations, maps, device arrays, paging queues,
residency, offers, GPU virtual addresses and video memory budgets, sync and asyncio, with real
client processes where a test is about processes."""

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from conftest import Stack, make_stack, wait_until
from dxg.client import (
    Allocation,
    AsyncAllocation,
    AsyncDeviceArray,
    DeviceArray,
    DxgError,
    GpuMapping,
    GpuVaRange,
    PagingQueue,
    ReclaimResult,
    Residency,
    VideoMemoryInfo,
    open_node,
    open_node_async,
)
from dxg.guest.driver import GuestDriver
from dxg.host.config import HostConfig
from dxg.host.host import Host
from dxg.node.server import SocketNode
from dxg.uapi.memory import GROUP_LOCAL, GROUP_NONLOCAL, PAGE_SIZE, VA_MAX, VA_MIN
from dxg.uapi.ntstatus import NTSTATUS

MIB = 1 << 20


@contextmanager
def tcp_stack(tmp: Path, **host_kw) -> Iterator[Stack]:
    """Host and guest linked over TCP (no descriptors cross: Lock2 copies)."""
    host = Host(HostConfig(adapters=1, **host_kw))
    drv = GuestDriver()
    node = None
    try:
        addr = host.listen("tcp:127.0.0.1:0")
        drv.bind(addr)
        assert drv.wait_for_adapters(1, 15), "adapters did not come up"
        node_path = str(tmp / "tcp-dxg.sock")
        node = SocketNode(drv, node_path)
        node.start()
        yield Stack(host, drv, node, node_path, addr)
    finally:
        if node is not None:
            node.close()
        drv.close()
        host.close()


@pytest.fixture(params=["unix", "embedded"])
def mstack(request, tmp_path) -> Iterator[Stack]:
    """The stack with the guest on a Unix socket to the host, and as `dxg up` runs it."""
    with make_stack(tmp_path, embedded=request.param == "embedded") as s:
        yield s


@pytest.fixture
def dev(mstack):
    with open_node(mstack.node_path) as node:
        yield node.adapters()[0].create_device()


def usage(adapter, group=GROUP_LOCAL) -> int:
    return adapter.video_memory_info(group).current_usage


def pattern(n: int, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def run_client(code: str, *args: str) -> subprocess.Popen:
    """A client process running ``code`` (argv[1:] = args), stdin/stdout piped."""
    return subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def read_line(proc: subprocess.Popen) -> dict:
    from conftest import read_json_line

    return read_json_line(proc, 60)


# ---- allocations and maps ------------------------------------------------------------------------


def test_allocate_upload_download_map(dev):
    data = pattern(10000)
    with dev.allocate(10000) as a:
        assert isinstance(a, Allocation) and a.handle and a.device is dev
        assert a.nbytes == 10000 and a.size == 3 * PAGE_SIZE and not a.non_local
        a.upload(data)
        assert a.download() == data
        assert a.download(100, offset=9000) == data[9000:9100]
        with a.map() as view:
            assert view.dtype == np.uint8 and view.shape == (a.size,)
            assert view[:10000].tobytes() == data
            view[:4] = [1, 2, 3, 4]
        assert a.download(4) == b"\x01\x02\x03\x04"
        a.upload(np.arange(4, dtype=np.uint32), offset=8)
        with a.map(np.uint32, (4,), offset=8) as typed:
            assert typed.tolist() == [0, 1, 2, 3]
        with pytest.raises(ValueError):
            a.upload(b"x" * (a.size + 1))
        with pytest.raises(ValueError):
            a.download(16, offset=a.size - 8)
    assert a.closed
    a.close()  # idempotent
    with pytest.raises(DxgError) as ei, a.map():
        pass
    assert ei.value.status == NTSTATUS.STATUS_INVALID_HANDLE


def test_async_allocate_upload_download_map(stack):
    data = pattern(3 * PAGE_SIZE + 5, seed=2)

    async def main() -> None:
        async with await open_node_async(stack.node_path) as node:
            ad = (await node.adapters())[0]
            async with await ad.create_device() as dev:
                before = (await ad.video_memory_info()).current_usage
                a = await dev.allocate(len(data))
                assert isinstance(a, AsyncAllocation) and a.size == 4 * PAGE_SIZE
                assert (await ad.video_memory_info()).current_usage == before + a.size
                await a.upload(data)
                assert await a.download() == data
                async with a.map() as view:
                    assert view[: len(data)].tobytes() == data
                    async with a.map() as inner:
                        inner[0] = 0xAB
                    assert view[0] == 0xAB
                x = await dev.array(np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4))
                assert isinstance(x, AsyncDeviceArray)
                assert np.array_equal(await x.download(),
                                      np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4))
                async with x.map() as xv:
                    assert xv.shape == (3, 4) and xv.dtype == np.float32
                q = await dev.paging_queue()
                assert q.fence_value >= 0
                assert await q.make_resident([a, x]) >= 0
                assert await a.residency() == Residency.RESIDENT_IN_GPU_MEMORY
            assert a.closed and x.closed and q.closed
            assert (await ad.video_memory_info()).current_usage == before

    asyncio.run(main())


def test_two_maps_in_one_process_agree(dev):
    with dev.allocate(PAGE_SIZE) as a, a.map() as one, a.map() as two:
        one[:5] = list(b"hello")
        assert two[:5].tobytes() == b"hello"
        assert one.ctypes.data == two.ctypes.data
    b = dev.allocate(PAGE_SIZE)
    with b.map() as first:
        first[:3] = list(b"abc")
    with b.map() as again:  # a later map sees what an earlier one wrote
        assert again[:3].tobytes() == b"abc"


def test_nested_maps_unlock_once_at_the_end(tmp_path):
    """Over TCP the map is a copy written back at the last Unlock2: what the outer map writes
    after an inner map ended still reaches the host, and only when the outer one ends."""
    with tcp_stack(tmp_path) as s, open_node(s.node_path) as node:
        dev = node.adapters()[0].create_device()
        a = dev.allocate(2 * PAGE_SIZE)
        with a.map() as outer:
            outer[:2] = [1, 2]
            with a.map() as inner:
                assert inner[:2].tolist() == [1, 2]
                inner[2] = 3
            outer[3] = 4  # the inner map ended: this view must still be the live one
        assert a.download(4) == b"\x01\x02\x03\x04"
        data = pattern(2 * PAGE_SIZE, seed=3)
        a.upload(data)
        assert a.download() == data
        arr = dev.array(np.arange(1000, dtype=np.int64))
        assert np.array_equal(arr.download(), np.arange(1000))


def test_a_second_process_cannot_use_the_first_ones_allocation(mstack, dev):
    secret = pattern(PAGE_SIZE, seed=4)
    a = dev.allocate(PAGE_SIZE)
    a.upload(secret)
    code = r"""
import ctypes, json, sys
from dxg.client import open_node, thunks
from dxg.uapi import structs as s
node = open_node(sys.argv[1])
dev = node.adapters()[0].create_device()
out = {}
lock = s.d3dkmt_lock2()
lock.device.v, lock.allocation.v = dev.handle, int(sys.argv[2])
out["lock"] = thunks.D3DKMTLock2(node.conn, lock)
out["data"] = lock.data
arr = (ctypes.c_uint32 * 1)(int(sys.argv[2]))
d = s.d3dkmt_destroyallocation2()
d.device.v, d.allocations, d.alloc_count = dev.handle, ctypes.addressof(arr), 1
out["destroy"] = thunks.D3DKMTDestroyAllocation2(node.conn, d)
print(json.dumps(out), flush=True)
"""
    proc = run_client(code, mstack.node_path, str(a.handle))
    try:
        out = read_line(proc)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert out["lock"] & 0xC0000000 == 0xC0000000, out  # a failure status
    assert out["destroy"] & 0xC0000000 == 0xC0000000, out
    assert out["data"] == 0
    assert a.download() == secret  # untouched, and still ours


def test_device_array_float32_round_trip(dev):
    src = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
    x = dev.empty((2, 3, 4), np.float32)
    assert isinstance(x, DeviceArray) and isinstance(x, Allocation)
    assert x.shape == (2, 3, 4) and x.dtype == np.float32 and x.nbytes == 96 and len(x) == 2
    x.upload(src)
    got = x.download()
    assert got.dtype == np.float32 and got.shape == (2, 3, 4) and np.array_equal(got, src)
    got[0, 0, 0] = 99  # a copy
    assert x.download()[0, 0, 0] == src[0, 0, 0]
    with x.map() as view:
        assert view.shape == (2, 3, 4) and view.dtype == np.float32
        view *= 2
    assert np.array_equal(x.download(), src * 2)
    x.upload(src.ravel())  # same size, other shape: reshaped
    assert np.array_equal(x.download(), src)
    with pytest.raises(ValueError):
        x.upload(np.zeros(5, np.float32))
    y = dev.from_numpy(src.astype(np.float64))
    assert y.dtype == np.float64 and np.allclose(y.download(), src)
    z = dev.zeros((100, 100), np.int16)
    assert not z.download().any()
    e = dev.empty(0, np.float32)  # an empty array still gets a page
    assert e.nbytes == 0 and e.download().shape == (0,)


def test_closing_the_device_frees_its_allocations(stack):
    with open_node(stack.node_path) as node:
        ad = node.adapters()[0]
        local0, nonlocal0 = usage(ad), usage(ad, GROUP_NONLOCAL)
        dev = ad.create_device()
        small = dev.allocate_many([PAGE_SIZE, 3 * PAGE_SIZE, 5000])
        big = dev.allocate(3 * MIB)
        far = dev.allocate(MIB, non_local=True)
        arr = dev.empty((256, 256), np.float32)
        q = dev.paging_queue()
        assert far.non_local and not big.non_local
        assert dev.residency([big, far]) == [Residency.RESIDENT_IN_GPU_MEMORY,
                                             Residency.RESIDENT_IN_SHARED_MEMORY]
        local = sum(a.size for a in small) + big.size + arr.size
        assert usage(ad) == local0 + local
        assert usage(ad, GROUP_NONLOCAL) == nonlocal0 + far.size
        small[0].close()
        assert usage(ad) == local0 + local - PAGE_SIZE
        dev.close()
        assert all(a.closed for a in [*small, big, far, arr, q])
        assert usage(ad) == local0 and usage(ad, GROUP_NONLOCAL) == nonlocal0
        with pytest.raises(DxgError):
            q.fence_value  # noqa: B018


def test_paging_queue_fence_and_make_resident_after_evict(dev):
    a, b = dev.allocate(PAGE_SIZE), dev.allocate(2 * MIB)
    data = pattern(PAGE_SIZE, seed=5)
    a.upload(data)
    with dev.paging_queue() as q:
        assert isinstance(q, PagingQueue) and q.sync_object
        start = q.fence_value
        assert isinstance(start, int) and start >= 0
        value = q.make_resident([a, b])
        assert q.fence_value >= value >= start
        assert dev.residency([a, b]) == [Residency.RESIDENT_IN_GPU_MEMORY] * 2
        dev.evict([a, b])
        assert a.residency() == Residency.NOT_RESIDENT
        value2 = q.make_resident([a])
        assert value2 >= value and q.fence_value >= value2
        assert a.residency() == Residency.RESIDENT_IN_GPU_MEMORY
        assert b.residency() == Residency.NOT_RESIDENT
        assert q.wait(value2) >= value2
    assert a.download() == data
    assert dev.make_resident([b]) >= 0  # the device's own queue
    assert b.residency() == Residency.RESIDENT_IN_GPU_MEMORY


def test_priority(dev):
    a = dev.allocate(PAGE_SIZE)
    a.priority = 0x78000000
    assert a.priority == 0x78000000
    dev.set_priority([a], 0x50000000)
    assert a.get_priority() == 0x50000000


def test_offer_and_reclaim(dev):
    a, b = dev.allocate(PAGE_SIZE), dev.allocate(PAGE_SIZE)
    data = pattern(PAGE_SIZE, seed=6)
    a.upload(data)
    dev.offer([a, b])
    assert dev.reclaim([a, b]) == [ReclaimResult.OK, ReclaimResult.OK]
    assert a.download() == data
    with pytest.raises(DxgError):
        dev.reclaim([a])  # not offered any more


def test_an_offered_allocation_is_discarded_when_memory_runs_out(tmp_path):
    with make_stack(tmp_path, adapters=1, dedicated_memory_mb=8, shared_memory_mb=8) as s, \
            open_node(s.node_path) as node:
        ad = node.adapters()[0]
        assert ad.video_memory_info().budget == 8 * MIB
        assert ad.video_memory_info(GROUP_NONLOCAL).budget == 8 * MIB
        dev = ad.create_device()
        a = dev.allocate(2 * MIB)
        a.upload(b"precious")
        dev.allocate(8 * MIB, non_local=True)  # the non-local group is full
        with pytest.raises(DxgError) as ei:
            dev.allocate(7 * MIB)
        assert ei.value.status == NTSTATUS.STATUS_NO_MEMORY
        dev.offer([a])
        big = dev.allocate(7 * MIB)  # fits only once the offered one is gone
        assert usage(ad) == big.size
        big.close()
        assert dev.reclaim([a]) == [ReclaimResult.DISCARDED]
        assert usage(ad) == a.size  # committed again; its contents are gone
        assert a.download(8) == bytes(8)


def test_gpu_virtual_addresses(mstack, dev):
    ad = dev.adapter
    a = dev.allocate(4 * PAGE_SIZE)
    with ad.reserve_gpu_va(16 * PAGE_SIZE) as r:
        assert isinstance(r, GpuVaRange) and VA_MIN <= r.va and r.end <= VA_MAX
        assert r.va % PAGE_SIZE == 0 and r.size == 16 * PAGE_SIZE
        with dev.paging_queue() as q:
            m = a.map_gpu(q, va=r.va + 4 * PAGE_SIZE)
            assert isinstance(m, GpuMapping) and int(m) == r.va + 4 * PAGE_SIZE
            assert m.va in r and m.va_range is r and not m.implicit
            assert m.size == a.size and q.fence_value >= m.paging_fence_value
            part = a.map_gpu(q, va=r.va + 12 * PAGE_SIZE, offset=PAGE_SIZE, size=PAGE_SIZE)
            assert part.size == PAGE_SIZE and a.gpu_mappings == [m, part]
            with pytest.raises(DxgError):  # the same addresses twice
                a.map_gpu(q, va=r.va + 4 * PAGE_SIZE)
            m.close()  # UNMAP inside the range: the addresses can be mapped again
            again = a.map_gpu(q, va=r.va + 4 * PAGE_SIZE)
            assert again.va == m.va and a.gpu_mappings == [part, again]
        with pytest.raises(DxgError):  # a range that overlaps one reserved
            ad.reserve_gpu_va(PAGE_SIZE, base=r.va)
    part.close()  # the range was freed, and its mappings with it: nothing left to do
    assert part.closed
    anywhere = a.map_gpu()  # the device's own queue, fresh space the adapter picks
    assert anywhere.implicit and anywhere.va_range is None
    assert VA_MIN <= anywhere.va < VA_MAX and anywhere.va % PAGE_SIZE == 0
    anywhere.close()  # FreeGpuVirtualAddress of its own space
    r2 = ad.reserve_gpu_va(PAGE_SIZE, base=r.va)  # free again
    assert r2.va == r.va
    last = a.map_gpu(va=r2.va, size=PAGE_SIZE)
    a.close()
    assert last.closed and again.closed  # they went with the allocation
    ad.close()
    assert r2.closed


def test_video_memory_info_matches_the_allocations(mstack, dev):
    ad = dev.adapter
    info = ad.video_memory_info()
    assert isinstance(info, VideoMemoryInfo) and info.budget > 0
    assert info.current_usage <= info.budget
    sizes = [PAGE_SIZE, 2 * MIB + 1, 100]
    allocs = [dev.allocate(n) for n in sizes]
    after = ad.video_memory_info()
    assert after.current_usage == info.current_usage + sum(a.size for a in allocs)
    assert after.budget == info.budget
    assert [a.size for a in allocs] == [PAGE_SIZE, 2 * MIB + PAGE_SIZE, PAGE_SIZE]
    ad.reserve_video_memory(16 * MIB)
    reserved = ad.video_memory_info()
    assert reserved.current_reservation == 16 * MIB
    assert reserved.available_for_reservation <= reserved.budget
    ad.reserve_video_memory(0)
    assert ad.video_memory_info().current_reservation == 0
    with pytest.raises(DxgError):
        ad.reserve_video_memory(info.budget + PAGE_SIZE)
    nl = ad.video_memory_info(GROUP_NONLOCAL)
    assert nl.budget > 0
    with pytest.raises(DxgError) as ei:  # more than both groups hold
        dev.allocate(info.budget + nl.budget + PAGE_SIZE)
    assert ei.value.status == NTSTATUS.STATUS_NO_MEMORY
    for a in allocs:
        a.close()
    assert ad.video_memory_info().current_usage == info.current_usage


def test_a_killed_client_gives_its_memory_back(stack):
    code = r"""
import json, os, sys
from dxg.client import open_node
node = open_node(sys.argv[1])
dev = node.adapters()[0].create_device()
a = dev.allocate(int(sys.argv[2]))
a.upload(b"x" * 100)
print(json.dumps({"pid": os.getpid(), "size": a.size}), flush=True)
sys.stdin.read()
"""
    with open_node(stack.node_path) as node:
        ad = node.adapters()[0]
        # another process's bytes: what this one may still reserve shrinks by them
        free0 = ad.video_memory_info().available_for_reservation
        proc = run_client(code, stack.node_path, str(3 * MIB))
        try:
            held = read_line(proc)
            assert held["size"] == 3 * MIB
            assert ad.video_memory_info().available_for_reservation == free0 - 3 * MIB
            proc.kill()
            proc.wait(10)
            wait_until(lambda: ad.video_memory_info().available_for_reservation == free0, 10,
                       "the killed client's memory back")
        finally:
            if proc.poll() is None:
                proc.kill()


def test_standard_allocation(dev):
    a = dev.allocate(5000, standard=True)
    assert a.size == 2 * PAGE_SIZE
    a.upload(b"std")
    assert a.download(3) == b"std"
    with pytest.raises(ValueError):
        dev.allocate(0)


def test_maps_from_several_threads(dev):
    """The sync objects are thread-safe: maps that overlap in time share one Lock2, and every
    write lands."""
    from concurrent.futures import ThreadPoolExecutor

    a = dev.allocate(PAGE_SIZE)

    def work(i: int) -> None:
        for _ in range(50):
            with a.map(np.uint32, (PAGE_SIZE // 4,)) as view:
                view[i] += 1

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))
    with a.map(np.uint32, (8,)) as view:
        assert view.tolist() == [50] * 8
    assert a._maps == 0 and a._locks == 0  # every Lock2 was matched by an Unlock2
