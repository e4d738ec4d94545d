"""Device memory end to end, as the issue names it: a client's mapping and the host's memory are
the same bytes; allocate/free cycles leave nothing behind on any side; a killed client's memory
goes back to the host's OS at once; Lock2 over a TCP link copies any size."""

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import make_stack, read_json_line, wait_until
from dxg import uapi
from dxg.client import open_node
from dxg.client import thunks as t
from dxg.uapi import structs as s_
from dxg.uapi.memory import PAGE_SIZE
from test_client_memory import tcp_stack

MIB = 1 << 20


def host_allocations(host):
    """Every live allocation on the host (test only: read while the stack is idle)."""
    out = []
    for part in list(host._partitions.values()):
        for proc in list(part.processes.values()):
            for dev in list(proc.devices.values()):
                out.extend(dev.allocations.values())
                for res in dev.resources.values():
                    out.extend(res.allocations.values())
    return out


def test_the_client_mapping_and_the_host_see_the_same_bytes(tmp_path):
    with make_stack(tmp_path, adapters=1) as s, open_node(s.node_path) as node:
        dev = node.adapters()[0].create_device()
        a = dev.allocate(3 * PAGE_SIZE + 1)
        (host_alloc,) = host_allocations(s.host)
        assert host_alloc.size == a.size == 4 * PAGE_SIZE
        with a.map() as view:
            view[:] = np.arange(a.size, dtype=np.uint32).astype(np.uint8)
            # written through the client's mapping: the host reads it with no call in between
            assert bytes(host_alloc.view()) == view.tobytes()
            host_alloc.view()[100:105] = b"HOST!"
            assert view[100:105].tobytes() == b"HOST!"  # and back, in the same mapping
        with a.map() as again, a.map() as third:  # two maps in one process: one mapping
            assert again.ctypes.data == third.ctypes.data
            assert again[100:105].tobytes() == b"HOST!"
        dev.close()
        assert host_allocations(s.host) == []


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


CYCLER = r"""
import json, os, sys
from dxg.client import open_node

def stat():
    with open("/proc/self/status") as f:
        rss = next(int(x.split()[1]) for x in f if x.startswith("VmRSS:"))
    return {"fds": len(os.listdir("/proc/self/fd")), "rss": rss}

node = open_node(sys.argv[1])
dev = node.adapters()[0].create_device()
keep = dev.allocate(4096)  # one that stays, so its block stays mapped
for rounds in (int(sys.argv[2]), int(sys.argv[3])):
    for i in range(rounds):
        a = dev.allocate(4096)
        with a.map() as v:
            v[0] = i & 0xFF
        a.close()
    print(json.dumps(stat()), flush=True)
    sys.stdin.readline()
"""


def test_ten_thousand_allocate_free_cycles_leave_no_growth_on_any_side(tmp_path):
    """Host and guest in one daemon process (as `dxg up`), a client process cycling
    allocate / Lock2 / write / Unlock2 / free: after a warm-up, 10,000 more cycles grow no
    descriptors and no memory anywhere."""
    with make_stack(tmp_path, adapters=1, embedded=True) as s:
        me = os.getpid()
        client = subprocess.Popen([sys.executable, "-c", CYCLER, s.node_path, "1000", "10000"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            warm = read_json_line(client, 120)
            daemon = (fds(me), rss_kib(me))
            client.stdin.write("\n")
            client.stdin.flush()
            done = read_json_line(client, 300)
            assert done["fds"] <= warm["fds"]
            assert done["rss"] - warm["rss"] < 4096, (warm, done)
            # (the daemon is this test process: a little slack for pytest's own descriptors)
            assert fds(me) <= daemon[0] + 2
            assert rss_kib(me) - daemon[1] < 8192, (daemon, rss_kib(me))
            (part,) = s.host.census()["partitions"]
            assert part["memory"]["allocations"] == 1  # the one kept
        finally:
            client.kill()
            client.wait(10)


def shmem_kib() -> int:
    with open("/proc/meminfo") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("Shmem:"))


HOLDER = r"""
import json, os, sys
import numpy as np
from dxg.client import open_node
node = open_node(sys.argv[1])
a = node.adapters()[0].create_device().allocate(int(sys.argv[2]))
with a.map() as v:
    v[:] = 1  # every page really committed
print(json.dumps({"pid": os.getpid()}), flush=True)
sys.stdin.read()
"""


def test_a_client_killed_holding_one_gib_gives_it_back_within_a_second(tmp_path):
    gib = 1 << 30
    with make_stack(tmp_path, adapters=1, embedded=True) as s:
        base = shmem_kib()
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, s.node_path, str(gib)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            read_json_line(proc, 120)
            peak = shmem_kib()
            assert peak - base > 900 * 1024  # the GiB lives in shared memory
            (part,) = s.host.census()["partitions"]
            assert part["memory"]["block_bytes"] >= gib
            proc.kill()
            proc.wait(10)
            killed = time.monotonic()
            # (the machine's Shmem: measured against the peak, so others' use does not count)
            wait_until(lambda: peak - shmem_kib() > 900 * 1024, 5, "the GiB back to the OS")
            took = time.monotonic() - killed
            assert took < 1.0, f"the GiB came back {took:.2f} s after the kill"
            wait_until(lambda: s.host.census()["partitions"][0]["memory"]["block_bytes"] == 0,
                       5, "the host's blocks gone")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.mark.parametrize("size", [1, 128 * 1024 + 1, 64 * MIB])
def test_lock2_over_tcp_copies_any_size(tmp_path: Path, size: int):
    with tcp_stack(tmp_path) as s, open_node(s.node_path) as node:
        ad = node.adapters()[0]
        a = ad.create_device().allocate(size)
        assert a.size == -(-size // PAGE_SIZE) * PAGE_SIZE
        data = np.random.default_rng(size).integers(0, 256, a.size, dtype=np.uint8)
        with a.map() as view:
            view[:] = data  # a copy: it reaches the host at the last Unlock2
        (host_alloc,) = host_allocations(s.host)
        assert bytes(host_alloc.view()) == data.tobytes()
        host_alloc.view()[0:3] = b"abc"
        with a.map() as view:  # fetched again
            assert view[0:3].tobytes() == b"abc"
            assert view[3:].tobytes() == data[3:].tobytes()
        snap = s.driver.snapshot()
        assert all(p["shadows"] == 0 for p in snap["processes"])  # no copy left behind


def test_closing_the_last_adapter_handle_releases_reservations_and_va(tmp_path):
    """The real driver tears the (process, adapter) link down with the last adapter handle:
    reservations, GPU VA reservations and memory on that adapter go with it."""
    with make_stack(tmp_path, adapters=1) as s, open_node(s.node_path) as other, \
            open_node(s.node_path) as node:
        watcher = other.adapters()[0]
        free0 = watcher.video_memory_info().available_for_reservation
        ad = node.adapters()[0]
        ad.reserve_video_memory(256 * MIB)
        ad.reserve_gpu_va(1 << 20)
        assert watcher.video_memory_info().available_for_reservation == free0 - 256 * MIB
        census = s.host.census()["partitions"][0]
        (proc,) = [p for p in census["processes"] if p["gpu_va"]]
        # the ioctl alone (the Python objects would free their VA range themselves)
        args = s_.d3dkmt_closeadapter()
        args.adapter_handle.v = ad.handle
        assert t.D3DKMTCloseAdapter(node.conn, args) == 0
        wait_until(lambda: watcher.video_memory_info().available_for_reservation == free0, 10,
                   "the reservation released")
        census = s.host.census()["partitions"][0]
        (after,) = [p for p in census["processes"] if p["handle"] == proc["handle"]]
        assert not after["gpu_va"] and after["blocks"] == 0


def test_creations_a_caller_gave_up_on_are_undone_on_the_host(tmp_path):
    """A CreatePagingQueue or CreateAllocation (into an existing resource) whose caller is
    interrupted while the host works leaves nothing on the host once the reply comes."""
    import asyncio
    import ctypes

    from dxg.client import open_node_async
    from dxg.uapi.memory import AllocDesc

    def host_counts(host):
        (part,) = host.census()["partitions"]
        return part["memory"]["paging_queues"], part["memory"]["allocations"]

    with make_stack(tmp_path, adapters=1) as s:
        async def main():
            node = await open_node_async(s.node_path)
            try:
                dev = await (await node.adapters())[0].create_device()
                res = await dev.allocate(4096)  # something to compare with
                before = host_counts(s.host)
                conn = node.conn
                priv = ctypes.create_string_buffer(AllocDesc(4096).pack(), 16)
                info = s_.d3dddi_allocationinfo2(priv_drv_data=ctypes.addressof(priv),
                                                 priv_drv_data_size=16)
                ca = s_.d3dkmt_createallocation(alloc_count=1,
                                                allocation_info=ctypes.addressof(info))
                ca.device.v = dev.handle
                ca.flags.create_resource = 1
                assert await t.D3DKMTCreateAllocation(conn, ca) == 0  # a resource
                before = host_counts(s.host)
                add = s_.d3dkmt_createallocation(alloc_count=1,
                                                 allocation_info=ctypes.addressof(info))
                add.device.v = dev.handle
                add.resource.v = ca.resource.v
                pq = s_.d3dkmt_createpagingqueue()
                pq.device.v = dev.handle
                channel = s.driver.active_adapters()[0].route()
                for call, args in ((t.D3DKMTCreatePagingQueue, pq),
                                   (t.D3DKMTCreateAllocation, add)):
                    # the host's loop is held up: the call is in flight there when cancelled
                    s.host.loop.call_soon_threadsafe(time.sleep, 0.5)
                    task = asyncio.ensure_future(call(conn, args))
                    while not channel.pending:  # (the request is with the host)
                        await asyncio.sleep(0.005)
                    task.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await task
                wait_until(lambda: host_counts(s.host) == before, 10,
                           "what the host made for the abandoned calls undone")
                del res
            finally:
                await node.close()

        asyncio.run(main())


def test_memory_is_released_on_the_guest_after_its_host_is_gone(tmp_path):
    """DestroyAllocation2 and DestroyPagingQueue still release what the guest holds (handles,
    block descriptors) when the adapter was removed with its host."""
    with make_stack(tmp_path, adapters=1) as s, open_node(s.node_path) as node:
        dev = node.adapters()[0].create_device()
        a = dev.allocate(3 * MIB)  # a block of its own
        with a.map() as v:
            v[0] = 1
        queue = dev.paging_queue()
        snap = s.driver.snapshot()
        (proc,) = [p for p in snap["processes"] if p["blocks"]]
        assert proc["block_fds"] >= 2  # the allocation's block and the fence block
        s.host.close()
        wait_until(lambda: not s.driver.active_adapters(), 10, "the adapter removed")
        a.close()  # no error: what the guest held is released
        queue.close()
        snap = s.driver.snapshot()
        (after,) = [p for p in snap["processes"] if p["pid"] == proc["pid"]]
        assert after["blocks"] == 0 and after["block_fds"] == 0


def test_a_host_block_that_is_not_sealed_is_refused(tmp_path, monkeypatch):
    """A block a client maps must be sealed against shrinking (else its owner could make the
    client fault); the guest refuses one from a host that did not seal it."""
    import dxg.host.memory as host_memory
    from dxg.client import DxgError

    monkeypatch.setattr(host_memory, "_SEALS", 0)  # a careless (or hostile) host
    with make_stack(tmp_path, adapters=1) as s, open_node(s.node_path) as node:
        a = node.adapters()[0].create_device().allocate(4096)
        with pytest.raises(DxgError), a.map():
            pass
        args = s_.d3dkmt_lock2()
        args.device.v = a.device.handle
        args.allocation.v = a.handle
        assert node.conn.ioctl(uapi.LX_DXLOCK2, args) == -errno.EPROTO and args.data == 0
        assert not any(p["block_fds"] for p in s.driver.snapshot()["processes"])
