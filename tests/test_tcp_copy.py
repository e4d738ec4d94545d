"""Lock2/Unlock2 over a TCP host link (no descriptors cross: the guest copies): the shadow an
allocation is copied into, and the client's mapping of it, are kept after the last Unlock2 for
the next Lock2 of that allocation (its bytes are fetched again, and written back at the last
Unlock2); a process keeps at most ProcessMemory.kept_limit bytes of them, the least recently used
going first; they go with their allocation, its device and the process. Pieces travel several at
once, straight between the socket and the memory on both sides."""

import asyncio
import contextlib
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import wait_until
from dxg.client import open_node, open_node_async
from dxg.guest.allocation import KEPT_SHADOW_BYTES
from dxg.guest.ioctl_memory import COPY_CHUNK, COPY_DEPTH
from dxg.uapi.memory import PAGE_SIZE
from test_client_memory import tcp_stack
from test_memory_stack import host_allocations

MIB = 1 << 20


def shadow_fds() -> int:
    """Shadows alive in this process (the guest and the client run here: the guest's
    descriptor and the client's mapping's, one memfd): distinct memfds named so."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:pydxg-shadow "):
                inodes.add(os.stat(f"/proc/self/fd/{fd}").st_ino)
    return len(inodes)


def memory_of(stack):
    """The ProcessMemory of the (one) client process of the stack's guest."""
    (proc,) = stack.driver.processes()
    return proc.memory


def kept(stack) -> tuple[int, int, int]:
    """(kept shadows, their bytes, shadows in use) of the one client process (read on the
    guest's loop)."""
    def read():
        mem = memory_of(stack)
        return mem.kept, mem.kept_bytes, mem.shadows

    return stack.driver.rt.call(read)


def kept_handles(stack) -> list[int]:
    """The client's handles of the allocations whose shadows are kept, oldest use first."""
    return stack.driver.rt.call(lambda: [sh.owner.handle for sh in memory_of(stack)._kept])


def test_the_shadow_and_its_mapping_are_kept_for_the_next_lock(tmp_path: Path):
    before = shadow_fds()
    with tcp_stack(tmp_path) as s, open_node(s.node_path) as node:
        a = node.adapters()[0].create_device().allocate(128 * 1024 + 1)
        (host_alloc,) = host_allocations(s.host)
        with a.map() as view:
            first = view.ctypes.data
            view[:] = 5
        # written back at the last Unlock2; the shadow stays, out of use, mapped
        assert bytes(host_alloc.view()) == b"\x05" * a.size
        assert kept(s) == (1, a.size, 0)
        assert shadow_fds() == before + 1
        host_alloc.view()[:4] = b"host"
        for i in range(3):
            with a.map() as view:
                assert view.ctypes.data == first  # the same mapping: no new shadow, no map
                assert view[:4].tobytes() == b"host"  # fetched again at every Lock2
                assert (view[4:-1] == 5).all() and view[-1] == (i - 1 if i else 5)
                view[-1] = i
            assert kept(s) == (1, a.size, 0)
            assert host_alloc.view()[-1] == i
        assert shadow_fds() == before + 1
        snap = s.driver.snapshot()
        assert all(p["shadows"] == 0 for p in snap["processes"])  # none in use
        a.close()
        wait_until(lambda: shadow_fds() == before, 5, "the shadow gone with its allocation")
        assert kept(s) == (0, 0, 0)


def test_kept_shadows_are_bounded_per_process_least_recently_used_first(tmp_path: Path):
    size = 3 * MIB
    with tcp_stack(tmp_path) as s, open_node(s.node_path) as node:
        dev = node.adapters()[0].create_device()
        allocs = [dev.allocate(size) for _ in range(4)]
        s.driver.rt.call(lambda: setattr(memory_of(s), "kept_limit", 3 * size))
        base = shadow_fds()
        for i, a in enumerate(allocs[:3]):
            with a.map() as view:
                view[:] = i + 1
        assert kept(s) == (3, 3 * size, 0)
        with allocs[0].map():  # the first one is used again: the second is now the oldest
            assert kept(s) == (2, 2 * size, 1)
        with allocs[3].map() as view:
            view[:] = 4
        # four kept would be over the limit: the least recently used (the second) went
        assert kept(s) == (3, 3 * size, 0)
        assert shadow_fds() == base + 3
        assert kept_handles(s) == [allocs[2].handle, allocs[0].handle, allocs[3].handle]
        # every allocation still reads what was written, whether its shadow was kept or not
        for i, a in enumerate(allocs):
            with a.map() as view:
                assert (view == i + 1).all()
        # one larger than the limit is never kept
        big = dev.allocate(4 * size)
        with big.map() as view:
            view[:2] = [1, 2]
        assert kept(s)[1] <= 3 * size
        assert kept(s)[2] == 0
        with big.map() as view:
            assert view[:2].tolist() == [1, 2]
        dev.close()
        wait_until(lambda: shadow_fds() == base and kept(s) == (0, 0, 0), 5,
                   "the shadows gone with their device")
    assert KEPT_SHADOW_BYTES == 64 * MIB


def test_kept_shadows_go_with_the_process(tmp_path: Path):
    before = shadow_fds()
    with tcp_stack(tmp_path) as s:
        with open_node(s.node_path) as node:
            dev = node.adapters()[0].create_device()
            for _ in range(3):
                a = dev.allocate(64 * 1024)
                with a.map() as view:
                    view[:] = 1
            assert shadow_fds() == before + 3
        wait_until(lambda: not s.driver.processes(), 10, "the process gone")
        wait_until(lambda: shadow_fds() == before, 5, "its kept shadows gone")


@pytest.mark.parametrize("size", [PAGE_SIZE, COPY_CHUNK * COPY_DEPTH + COPY_CHUNK // 2 + 1])
def test_concurrent_locks_of_one_allocation_fetch_once_and_share_the_shadow(tmp_path: Path,
                                                                            size: int):
    async def go(node_path: str, host) -> None:
        async with await open_node_async(node_path) as node:
            ad = (await node.adapters())[0]
            async with await ad.create_device() as dev:
                a = await dev.allocate(size)
                data = np.random.default_rng(size).integers(0, 256, a.size, dtype=np.uint8)
                (host_alloc,) = host_allocations(host)
                host_alloc.view()[:] = data.tobytes()
                m1, m2 = a.map(), a.map()
                v1, v2 = await asyncio.gather(m1.__aenter__(), m2.__aenter__())
                assert v1.ctypes.data == v2.ctypes.data
                assert v1.tobytes() == data.tobytes()
                v1[:3] = [7, 8, 9]
                await m1.__aexit__(None, None, None)
                assert v2[:3].tolist() == [7, 8, 9]  # still locked: the same bytes
                await m2.__aexit__(None, None, None)
                assert bytes(host_alloc.view()[:3]) == b"\x07\x08\x09"
                assert bytes(host_alloc.view()[3:]) == data[3:].tobytes()

    with tcp_stack(tmp_path) as s:
        asyncio.run(go(s.node_path, s.host))


def test_a_large_copy_moves_in_pieces_straight_to_memory(tmp_path: Path):
    """More pieces than travel at once, a short last one: every byte arrives both ways, and the
    host's bytes were not copied on their way out (a change made after the fetch shows only at
    the next Lock2)."""
    size = COPY_CHUNK * (COPY_DEPTH + 2) + 3 * PAGE_SIZE
    with tcp_stack(tmp_path) as s, open_node(s.node_path) as node:
        a = node.adapters()[0].create_device().allocate(size)
        (host_alloc,) = host_allocations(s.host)
        data = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
        host_alloc.view()[:] = data.tobytes()
        with a.map() as view:
            assert view.tobytes() == data.tobytes()
            view[::PAGE_SIZE] += 1
            host_alloc.view()[1:3] = b"hh"  # the host's bytes change meanwhile
            assert view[1:3].tobytes() == data[1:3].tobytes()
        data[::PAGE_SIZE] += 1
        assert bytes(host_alloc.view()) == data.tobytes()  # (the write-back covers it again)
        with a.map() as view:
            assert view.tobytes() == data.tobytes()


def test_a_shadow_cannot_be_shrunk_by_the_client_that_maps_it(tmp_path: Path):
    """The client gets a descriptor of the guest's shadow: were it able to shrink it, the
    guest's next read of the shadow would fault and kill the daemon. Shadows (and every memfd
    pydxg makes) are sealed at their size."""
    from dxg.guest.allocation import ProcessMemory

    pm = ProcessMemory()
    shadow = pm.shadow(1 * MIB)
    fd = os.dup(shadow.block.fd)
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(fd, PAGE_SIZE)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 2 * MIB)
        os.pwrite(fd, b"client", 0)  # writing is the client's right
        assert shadow.mem.read(0, 6) == b"client"
    finally:
        os.close(fd)
        pm.drop_shadow(shadow)


def test_a_process_may_hold_only_so_much_in_shadows(tmp_path: Path, monkeypatch):
    import dxg.guest.allocation as ga
    from dxg.client import DxgError
    from dxg.uapi.ntstatus import NTSTATUS

    monkeypatch.setattr(ga, "MAX_SHADOW_BYTES", 8 * MIB)
    with tcp_stack(tmp_path) as s, open_node(s.node_path) as node:
        dev = node.adapters()[0].create_device()
        a, b = dev.allocate(6 * MIB), dev.allocate(6 * MIB)
        with a.map():
            with pytest.raises(DxgError) as e, b.map():
                pass
            assert e.value.status == NTSTATUS.STATUS_NO_MEMORY
        with b.map() as view:  # a's shadow went when it was unlocked (kept ones count too)
            view[0] = 1


def test_many_concurrent_copies_stay_within_what_the_host_lets_wait(tmp_path: Path):
    """Ten 32 MiB allocations locked at once over TCP: their pieces share the link's copy
    slots, so what the host has answered and not yet sent stays far below the point where it
    drops a guest that does not read (the link stays up, every copy arrives)."""
    from concurrent.futures import ThreadPoolExecutor

    with tcp_stack(tmp_path) as s, open_node(s.node_path) as node:
        dev = node.adapters()[0].create_device()
        allocs = [dev.allocate(32 * MIB) for _ in range(10)]
        for i, h in enumerate(host_allocations(s.host)):
            h.view()[-1:] = bytes([i + 1])

        def lock(i: int) -> int:
            with allocs[i].map() as view:
                return int(view[-1])

        with ThreadPoolExecutor(10) as pool:
            got = sorted(pool.map(lock, range(10)))
        assert s.driver.active_adapters()  # the link held
        assert got == sorted(int(h.view()[-1]) for h in host_allocations(s.host))


def test_over_tcp_a_queues_fence_page_shows_what_its_waits_saw_so_memory_is_reused(tmp_path):
    """Over TCP the guest keeps a queue's progress-fence page itself: a CPU wait that saw the
    fence reach a value (blocking, or through an eventfd) brings the page up to it. Without
    that the page stayed 0, dxg.compute's pool never saw its blocks' work done, and a GEMM
    loop grew device memory without end."""
    import dxg.compute

    x = np.ones((128, 128), np.float32)
    with contextlib.ExitStack() as es:
        stack = es.enter_context(tcp_stack(tmp_path))
        dev = es.enter_context(dxg.compute.device(0, node=stack.node_path))
        for i in range(40):
            got = (dev.asarray(x) @ dev.asarray(x)).get()
            assert got[0, 0] == 128
            stream = dev.current_stream
            assert stream.reached_value() == stream.queue.submitted, i  # the page: no call
        info = dev.memory_info()
        assert info["waiting_blocks"] <= 4, info
        assert info["slab_bytes"] <= 16 * MIB, info
