"""Device memory on the host, end to end: a real Host on real sockets driven by the raw guest of
test_host (hand-built CREATEALLOCATION, LOCK2, paging queue, residency, offer/reclaim, budget and
GPU VA messages), checked against what the host holds (census, descriptors, its own objects)."""

import ctypes
import fcntl
import mmap
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from dxg.host import Host, HostConfig
from dxg.host.vaspace import VaFault, vaspace_of
from dxg.protocol.commands import VgpuCommand
from dxg.protocol.messages import (
    LOCK2_COPY,
    LOCK2_FD,
    BlockRef,
    CloseAdapter,
    CreateAllocation,
    CreateAllocationReturn,
    DestroyAllocation,
    IoctlArgs,
    IoctlArgsReturn,
    Lock2,
    Lock2Return,
    NewAllocation,
    NtStatusReturn,
    Unlock2,
)
from dxg.uapi import NTSTATUS
from dxg.uapi.handles import HandleType
from dxg.uapi.memory import (
    ALLOC_CACHED,
    ALLOC_NONLOCAL,
    GROUP_LOCAL,
    GROUP_NONLOCAL,
    PAGE_SIZE,
    VA_MAX,
    VA_MIN,
    AllocDesc,
)
from dxg.uapi.structs import (
    d3dddi_destroypagingqueue,
    d3dddi_makeresident,
    d3dddi_mapgpuvirtualaddress,
    d3dddi_reservegpuvirtualaddress,
    d3dddi_updategpuvirtualaddress_operation,
    d3dkmt_changevideomemoryreservation,
    d3dkmt_createpagingqueue,
    d3dkmt_evict,
    d3dkmt_freegpuvirtualaddress,
    d3dkmt_getallocationpriority,
    d3dkmt_offerallocations,
    d3dkmt_queryallocationresidency,
    d3dkmt_queryvideomemoryinfo,
    d3dkmt_reclaimallocations2,
    d3dkmt_setallocationpriority,
    d3dkmt_updategpuvirtualaddress,
)
from test_host import TIMEOUT, RawGuest, wait_until

OK = NTSTATUS.STATUS_SUCCESS
INVALID = NTSTATUS.STATUS_INVALID_PARAMETER
BAD_HANDLE = NTSTATUS.STATUS_INVALID_HANDLE
NO_MEMORY = NTSTATUS.STATUS_NO_MEMORY
CONFLICT = NTSTATUS.STATUS_CONFLICTING_ADDRESSES
PENDING = NTSTATUS.STATUS_PENDING
MIB = 1 << 20
V = VgpuCommand
# d3dkmt_createallocationflags bits
CREATE_RESOURCE, CREATE_SHARED, CREATE_PROTECTED = 1 << 0, 1 << 1, 1 << 3
EXISTING_SYSMEM, STANDARD_ALLOCATION, EXISTING_SECTION = 1 << 5, 1 << 16, 1 << 17
# residency, reclaim results, offer priorities
RESIDENT_LOCAL, RESIDENT_NONLOCAL, NOT_RESIDENT = 1, 2, 3
RECLAIM_OK, RECLAIM_DISCARDED, RECLAIM_NOT_COMMITTED = 0, 1, 2
OFFER_LOW, OFFER_HIGH = 1, 3
PROT_WRITE = 1


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def shared_rss() -> int:
    """Bytes of shared memory this process has resident (the host's blocks: RssShmem)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssShmem:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssShmem")


# ---- a guest with a process and a device on adapter 0 -------------------------------------------


@dataclass
class Dev:
    g: RawGuest
    host: Host
    hp: int
    dev: int
    index: int = 0

    # raw requests
    def send(self, cmd: V, body: bytes) -> tuple[bytes, list[int]]:
        """One request on the adapter's channel; the reply and the descriptors beside it."""
        async def go() -> tuple[bytes, list[int]]:
            packet = await self.g.vch(self.index).request(
                self.g.vpayload(self.index, cmd, self.hp, body))
            return packet.payload, packet.take_fds()
        return self.g.rt.run(go(), TIMEOUT)

    def ioctl(self, cmd: V, args: ctypes.Structure, extra: bytes = b""
              ) -> tuple[int, ctypes.Structure, bytes, list[int]]:
        """(status, the struct after the call, the reply's extra, descriptors)."""
        reply, fds = self.send(cmd, IoctlArgs(bytes(args), extra).pack())
        r = IoctlArgsReturn.unpack(reply)
        assert len(r.args) == len(bytes(args))
        return r.status, type(args).from_buffer_copy(r.args), r.extra, fds

    def status(self, cmd: V, args: ctypes.Structure, extra: bytes = b"") -> int:
        status, _, _, fds = self.ioctl(cmd, args, extra)
        assert not fds
        return status

    # allocations
    def create(self, *privs: bytes, flags: int = 0, resource: int = 0, standard: int = 0,
               priority: int = 0) -> CreateAllocationReturn:
        body = CreateAllocation(self.dev, resource, flags, standard, b"", b"",
                                tuple(NewAllocation(0, priority, p) for p in privs))
        reply, fds = self.send(V.CREATEALLOCATION, body.pack())
        assert not fds
        return CreateAllocationReturn.unpack(reply)

    def alloc(self, size: int, flags: int = 0) -> int:
        r = self.create(AllocDesc(size, flags).pack())
        assert r.status == OK, hex(r.status)
        return r.allocations[0].handle

    def destroy(self, *handles: int, resource: int = 0) -> int:
        body = DestroyAllocation(self.dev, resource, 0, handles)
        return NtStatusReturn.unpack(self.send(V.DESTROYALLOCATION, body.pack())[0]).status

    def lock(self, handle: int, mode: int = LOCK2_COPY, offset: int = 0, length: int = 0
             ) -> tuple[Lock2Return, list[int]]:
        reply, fds = self.send(V.LOCK2, Lock2(self.dev, handle, 0, mode, offset, length).pack())
        return Lock2Return.unpack(reply), fds

    def read(self, handle: int, offset: int, length: int) -> bytes:
        r, _ = self.lock(handle, LOCK2_COPY, offset, length)
        assert r.status == OK, hex(r.status)
        return r.data

    def write(self, handle: int, offset: int, data: bytes) -> int:
        reply, _ = self.send(V.UNLOCK2, Unlock2(self.dev, handle, offset, data).pack())
        return NtStatusReturn.unpack(reply).status

    # paging queues and residency
    def paging_queue(self) -> tuple[d3dkmt_createpagingqueue, BlockRef, list[int]]:
        args = d3dkmt_createpagingqueue()
        args.device.v = self.dev
        status, out, extra, fds = self.ioctl(V.CREATEPAGINGQUEUE, args)
        assert status == OK, hex(status)
        return out, BlockRef.unpack(extra), fds  # type: ignore[return-value]

    def handles(self, *handles: int) -> bytes:
        return struct.pack(f"<{len(handles)}I", *handles)

    def make_resident(self, queue: int, *handles: int) -> tuple[int, int]:
        args = d3dddi_makeresident()
        args.paging_queue.v = queue
        args.alloc_count = len(handles)
        args.allocation_list = 1
        status, out, _, _ = self.ioctl(V.MAKERESIDENT, args, self.handles(*handles))
        return status, out.paging_fence_value  # type: ignore[attr-defined]

    def evict(self, *handles: int) -> int:
        args = d3dkmt_evict()
        args.device.v = self.dev
        args.alloc_count = len(handles)
        args.allocations = 1
        return self.status(V.EVICT, args, self.handles(*handles))

    def residency(self, *handles: int, resource: int = 0) -> list[int]:
        args = d3dkmt_queryallocationresidency()
        args.device.v = self.dev
        args.resource.v = resource
        args.allocation_count = len(handles)
        args.allocations = int(bool(handles))
        status, _, extra, _ = self.ioctl(V.QUERYALLOCATIONRESIDENCY, args, self.handles(*handles))
        assert status == OK, hex(status)
        return list(struct.unpack(f"<{len(extra) // 4}I", extra))

    def offer(self, *handles: int, priority: int = OFFER_LOW, resources: bool = False,
              decommit: bool = False) -> int:
        args = d3dkmt_offerallocations()
        args.device.v = self.dev
        args.resources, args.allocations = (1, 0) if resources else (0, 1)
        args.allocation_count = len(handles)
        args.priority = priority
        args.flags.allow_decommit = int(decommit)
        return self.status(V.OFFERALLOCATIONS, args, self.handles(*handles))

    def reclaim(self, queue: int, *handles: int, resources: bool = False
                ) -> tuple[int, list[int]]:
        args = d3dkmt_reclaimallocations2()
        args.paging_queue.v = queue
        args.allocation_count = len(handles)
        args.resources, args.allocations = (1, 0) if resources else (0, 1)
        status, _, extra, _ = self.ioctl(V.RECLAIMALLOCATIONS, args, self.handles(*handles))
        return status, list(struct.unpack(f"<{len(extra) // 4}I", extra))

    # budgets
    @property
    def adapter_handle(self) -> int:
        return self.g.adapter_handles[self.index]

    def qvmi(self, group: int) -> d3dkmt_queryvideomemoryinfo:
        args = d3dkmt_queryvideomemoryinfo()
        args.adapter.v = self.adapter_handle
        args.memory_segment_group = group
        status, out, _, _ = self.ioctl(V.QUERYVIDEOMEMORYINFO, args)
        assert status == OK, hex(status)
        return out  # type: ignore[return-value]

    def reserve_memory(self, group: int, nbytes: int) -> int:
        args = d3dkmt_changevideomemoryreservation()
        args.adapter.v = self.adapter_handle
        args.memory_segment_group = group
        args.reservation = nbytes
        return self.status(V.CHANGEVIDEOMEMORYRESERVATION, args)

    # GPU VA
    def reserve_va(self, size: int, base: int = 0, lo: int = 0, hi: int = 0) -> tuple[int, int]:
        args = d3dddi_reservegpuvirtualaddress()
        args.adapter.v = self.adapter_handle
        args.base_address, args.size = base, size
        args.minimum_address, args.maximum_address = lo, hi
        status, out, _, _ = self.ioctl(V.RESERVEGPUVIRTUALADDRESS, args)
        return status, out.virtual_address  # type: ignore[attr-defined]

    def free_va(self, base: int, size: int) -> int:
        args = d3dkmt_freegpuvirtualaddress()
        args.adapter.v = self.adapter_handle
        args.base_address, args.size = base, size
        return self.status(V.FREEGPUVIRTUALADDRESS, args)

    def map_va(self, queue: int, handle: int, pages: int, base: int = 0, first_page: int = 0,
               write: bool = True) -> tuple[int, int, int]:
        args = d3dddi_mapgpuvirtualaddress()
        args.paging_queue.v = queue
        args.allocation.v = handle
        args.base_address = base
        args.offset_in_pages, args.size_in_pages = first_page, pages
        args.protection.write = int(write)
        status, out, _, _ = self.ioctl(V.MAPGPUVIRTUALADDRESS, args)
        return status, out.virtual_address, out.paging_fence_value  # type: ignore[attr-defined]

    # the host's view
    def host_call(self, fn: Callable[..., object], *args: object) -> object:
        return self.host.rt.call(fn, *args)

    def host_object(self, handle: int, htype: HandleType) -> object:
        (part,) = [p for p in self.host.partitions() if self.hp in p.processes]
        return self.host_call(part.handles.get, handle, htype)

    def translate(self, va: int, n: int, write: bool = False) -> list[tuple[int, int, int]]:
        """translate() on the host, with allocation handles in place of the objects."""
        def go() -> list[tuple[int, int, int]]:
            (part,) = [p for p in self.host.partitions() if self.hp in p.processes]
            space = vaspace_of(part.processes[self.hp], self.host.adapters[self.index])
            return [(a.handle, off, ln) for a, off, ln in space.translate(va, n, write)]
        return self.host_call(go)  # type: ignore[return-value]

    def census(self) -> dict:
        for part in self.host.census()["partitions"]:
            for proc in part["processes"]:
                if proc["handle"] == self.hp:
                    return proc
        raise AssertionError("process not in the census")


def new_dev(g: RawGuest, host: Host, pid: int = 4242, index: int = 0) -> Dev:
    hp = g.create_process(pid=pid)
    if index not in g.adapter_handles:
        g.open_adapter(index)
    return Dev(g, host, hp, g.create_device(index, hp), index)


def partition_memory(host: Host) -> dict:
    (part,) = host.census()["partitions"]
    return part["memory"]


def segment_use(host: Host, index: int = 0) -> dict:
    return host.census()["adapters"][index]["memory"]


@pytest.fixture
def sock_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("m"))


def make_host(sock_dir: str, name: str = "mem.sock", **kw: object) -> tuple[Host, RawGuest]:
    host = Host(HostConfig(adapters=1, host_id="mem-host", **kw))  # type: ignore[arg-type]
    addr = host.listen(name if name.startswith("tcp:") else os.path.join(sock_dir, name))
    g = RawGuest(addr)
    wait_until(lambda: g.driver.global_channel is not None and len(g.driver.vgpus) == 1)
    return host, g


@pytest.fixture
def hg(sock_dir: str) -> Iterator[tuple[Host, RawGuest]]:
    host, g = make_host(sock_dir)
    yield host, g
    g.close()
    host.close()


@pytest.fixture
def small(sock_dir: str) -> Iterator[tuple[Host, RawGuest]]:
    """8 MiB local and 8 MiB non-local."""
    host, g = make_host(sock_dir, dedicated_memory_mb=8, shared_memory_mb=8)
    yield host, g
    g.close()
    host.close()


# ---- create and destroy ------------------------------------------------------------------------


def test_create_and_destroy_standalone_resource_and_standard(hg: tuple[Host, RawGuest]) -> None:
    host, g = hg
    d = new_dev(g, host)
    tail = b"umd-private-tail"
    r = d.create(AllocDesc(4096).pack(), AllocDesc(10000).pack() + tail)
    assert r.status == OK and r.resource == 0 and len(r.allocations) == 2
    a, b = r.allocations
    assert (a.size, b.size) == (4096, 12288)
    assert a.group == b.group == GROUP_LOCAL and a.flags == b.flags == ALLOC_CACHED
    assert b.priv_drv_data == AllocDesc(10000).pack() + tail
    assert a.block == b.block and a.offset % PAGE_SIZE == 0 and a.offset != b.offset
    assert a.block_size == 4 * MIB  # the first arena

    res = d.create(*(AllocDesc(8192).pack() for _ in range(3)), flags=CREATE_RESOURCE)
    assert res.status == OK and res.resource and len(res.allocations) == 3
    more = d.create(AllocDesc(2 * MIB, ALLOC_NONLOCAL).pack(), resource=res.resource)
    assert more.status == OK and more.resource == res.resource
    big = more.allocations[0]
    assert big.group == GROUP_NONLOCAL and big.block != a.block and big.block_size == 2 * MIB
    std = d.create(b"", flags=STANDARD_ALLOCATION, standard=64 << 10)
    assert std.status == OK and std.allocations[0].size == 64 << 10

    proc = d.census()
    assert proc["allocations"] == 7 and proc["resources"] == 1
    assert proc["blocks"] == 2 and proc["block_bytes"] == 6 * MIB
    (use,) = proc["memory"]
    assert use["local"] == 4096 + 12288 + 3 * 8192 + (64 << 10)
    assert use["nonlocal"] == 2 * MIB

    # A resource's allocation goes only with its resource; a bad handle destroys nothing.
    assert d.destroy(res.allocations[0].handle) == INVALID
    assert d.destroy(a.handle, 0x40001234) == BAD_HANDLE
    assert d.destroy() == INVALID
    assert d.census()["allocations"] == 7
    assert d.destroy(resource=res.resource) == OK
    assert d.census()["allocations"] == 3 and d.census()["blocks"] == 1
    assert d.destroy(resource=res.resource) == BAD_HANDLE
    assert d.destroy(a.handle, b.handle, std.allocations[0].handle) == OK
    proc = d.census()
    assert proc["allocations"] == 0 and proc["memory"][0]["local"] == 0
    assert segment_use(host) == {"local": {"total": 1024 * MIB, "used": 0},
                                 "nonlocal": {"total": 4096 * MIB, "used": 0}}
    assert d.destroy(a.handle) == BAD_HANDLE


def test_create_is_all_or_nothing(small: tuple[Host, RawGuest]) -> None:
    host, g = small
    d = new_dev(g, host)
    (part,) = host.partitions()
    pinned, handles = part.pinned, host.census()["totals"]["handles"]
    good = AllocDesc(4096).pack()
    bad_cases = [
        ((good, b"XXXX" + good[4:]), 0, INVALID),  # wrong magic
        ((good, AllocDesc(4096, version=2).pack()), 0, INVALID),
        ((good, AllocDesc(4096, flags=0x80).pack()), 0, INVALID),
        ((good, AllocDesc(0).pack()), 0, INVALID),
        ((good, b"short"), 0, INVALID),
        ((good,), CREATE_PROTECTED, INVALID),
        ((good,), EXISTING_SECTION, INVALID),
        ((good,), CREATE_SHARED, NTSTATUS.STATUS_NOT_SUPPORTED),
        ((good,), EXISTING_SYSMEM, NTSTATUS.STATUS_NOT_SUPPORTED),
        ((), 0, INVALID),
        ((good, good), STANDARD_ALLOCATION, INVALID),
        ((good,), STANDARD_ALLOCATION, INVALID),  # private data on a standard allocation
        # Room for the first two, not the third (8 + 8 MiB in all): none stays.
        ((AllocDesc(6 * MIB).pack(), AllocDesc(6 * MIB).pack(), AllocDesc(6 * MIB).pack()),
         0, NO_MEMORY),
    ]
    for privs, flags, status in bad_cases:
        r = d.create(*privs, flags=flags)
        assert (r.status, r.resource, r.allocations) == (status, 0, ()), (privs, flags)
    assert d.create(good, flags=CREATE_RESOURCE, resource=0x40000040).status == INVALID
    assert d.create(good, resource=d.dev).status == BAD_HANDLE  # not a resource
    assert d.create(AllocDesc(6 * MIB).pack(), AllocDesc(6 * MIB).pack(), AllocDesc(6 * MIB).pack(),
                    flags=CREATE_RESOURCE).status == NO_MEMORY
    proc = d.census()
    assert proc["allocations"] == proc["resources"] == 0
    assert all(u["local"] == u["nonlocal"] == 0 for u in proc["memory"])
    assert proc["blocks"] <= 1  # at most the one empty arena kept for next time
    assert part.pinned == pinned and host.census()["totals"]["handles"] == handles
    assert segment_use(host)["local"]["used"] == segment_use(host)["nonlocal"]["used"] == 0


# ---- CPU access --------------------------------------------------------------------------------


def test_lock2_fd_maps_the_bytes_the_host_sees(hg: tuple[Host, RawGuest]) -> None:
    host, g = hg
    d = new_dev(g, host)
    h = d.alloc(3 * PAGE_SIZE)
    r, fds = d.lock(h, LOCK2_FD)
    assert r.status == OK and r.size == 3 * PAGE_SIZE and len(fds) == 1
    (fd,) = fds
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
        with pytest.raises(OSError):
            os.ftruncate(fd, 0)  # a client cannot shrink the block under the host
        assert os.fstat(fd).st_size == r.block_size
        view = mmap.mmap(fd, r.block_size)
        try:
            alloc = d.host_object(h, HandleType.ALLOCATION)
            d.host_call(lambda: alloc.block.write(alloc.offset + 100, b"from the host"))
            assert view[r.offset + 100 : r.offset + 113] == b"from the host"
            view[r.offset + 5000 : r.offset + 5011] = b"from client"
            got = d.host_call(lambda: alloc.block.read(alloc.offset + 5000, 11))
            assert got == b"from client"
            assert d.read(h, 5000, 11) == b"from client"
        finally:
            view.close()
    finally:
        os.close(fd)
    assert d.lock(h, 99)[0].status == INVALID
    assert d.lock(0x40009999, LOCK2_FD)[0].status == BAD_HANDLE


def test_lock2_copy_and_unlock2_round_trip(hg: tuple[Host, RawGuest]) -> None:
    host, g = hg
    d = new_dev(g, host)
    h = d.alloc(2 * MIB)  # a block of its own
    assert d.read(h, 0, 64) == bytes(64)
    data = os.urandom(300_000)
    assert d.write(h, 12345, data) == OK
    assert d.read(h, 12345, len(data)) == data
    assert d.read(h, 2 * MIB - 10, 10) == bytes(10)
    assert d.lock(h, LOCK2_COPY, 2 * MIB - 10, 11)[0].status == INVALID
    assert d.lock(h, LOCK2_COPY, 1 << 63, 1)[0].status == INVALID
    assert d.write(h, 2 * MIB - 1, b"xy") == INVALID
    assert d.write(h, 0, b"") == OK


# ---- descriptors and arenas --------------------------------------------------------------------


def test_ten_thousand_small_allocations_need_a_handful_of_descriptors(
        hg: tuple[Host, RawGuest]) -> None:
    host, g = hg
    before = fd_count()
    d = new_dev(g, host)
    handles: list[int] = []
    desc = AllocDesc(PAGE_SIZE).pack()
    while len(handles) < 10_000:
        r = d.create(*[desc] * min(1024, 10_000 - len(handles)))
        assert r.status == OK
        handles += [a.handle for a in r.allocations]
    assert len(set(handles)) == 10_000
    proc = d.census()
    assert proc["allocations"] == 10_000 and proc["memory"][0]["local"] == 10_000 * PAGE_SIZE
    assert proc["blocks"] <= 5 and fd_count() - before <= 5
    for i in range(0, 10_000, 1024):
        assert d.destroy(*handles[i : i + 1024]) == OK
    proc = d.census()
    assert proc["allocations"] == 0 and proc["blocks"] == 1  # one empty arena is kept
    assert g.destroy_process(d.hp) == OK
    assert fd_count() == before


# ---- segments ----------------------------------------------------------------------------------


def test_segments_run_out_and_recover(small: tuple[Host, RawGuest]) -> None:
    host, g = small
    d = new_dev(g, host)
    r1 = d.create(AllocDesc(6 * MIB).pack())
    r2 = d.create(AllocDesc(6 * MIB).pack())  # no room left locally: non-local
    assert (r1.allocations[0].group, r2.allocations[0].group) == (GROUP_LOCAL, GROUP_NONLOCAL)
    assert d.create(AllocDesc(6 * MIB).pack()).status == NO_MEMORY
    assert d.create(AllocDesc(3 * MIB, ALLOC_NONLOCAL).pack()).status == NO_MEMORY
    small_one = d.create(AllocDesc(2 * MIB, ALLOC_NONLOCAL).pack())
    assert small_one.status == OK and small_one.allocations[0].group == GROUP_NONLOCAL
    assert segment_use(host)["nonlocal"]["used"] == 8 * MIB
    assert d.destroy(r1.allocations[0].handle) == OK
    r3 = d.create(AllocDesc(6 * MIB).pack())
    assert r3.status == OK and r3.allocations[0].group == GROUP_LOCAL


def test_offered_memory_is_discarded_under_pressure_and_reclaimed_zeroed(
        small: tuple[Host, RawGuest]) -> None:
    host, g = small
    d = new_dev(g, host)
    queue, _, fds = d.paging_queue()
    for fd in fds:
        os.close(fd)
    pq = queue.paging_queue.v
    keep = d.alloc(MIB, ALLOC_NONLOCAL)
    victim = d.alloc(4 * MIB, ALLOC_NONLOCAL)
    assert d.write(keep, 0, b"keep me") == OK
    assert d.write(victim, 0, b"lose me") == OK
    # Without pressure an offer keeps the contents.
    assert d.offer(keep, priority=OFFER_HIGH) == OK
    assert d.offer(keep) == INVALID  # offered already
    assert d.lock(keep)[0].status == INVALID and d.write(keep, 0, b"x") == INVALID
    assert d.reclaim(pq, keep) == (OK, [RECLAIM_OK])
    assert d.read(keep, 0, 7) == b"keep me"
    assert d.reclaim(pq, keep)[0] == INVALID  # not offered

    # Another process needs the room: the offered allocation is discarded for it.
    assert d.offer(victim) == OK and d.offer(keep, priority=OFFER_HIGH) == OK
    other = new_dev(g, host, pid=77)
    taker = other.create(AllocDesc(4 * MIB, ALLOC_NONLOCAL).pack())  # 3 MiB are free
    assert taker.status == OK
    assert d.residency(victim, keep) == [NOT_RESIDENT, RESIDENT_NONLOCAL]
    assert d.census()["memory"][0]["nonlocal"] == MIB
    assert d.make_resident(pq, victim)[0] == INVALID  # reclaim it first
    # No room to recommit 4 MiB while the other process holds 4 of 8.
    assert d.reclaim(pq, victim, keep) == (OK, [RECLAIM_NOT_COMMITTED, RECLAIM_OK])
    assert other.destroy(taker.allocations[0].handle) == OK
    assert d.reclaim(pq, victim) == (OK, [RECLAIM_DISCARDED])
    assert d.read(victim, 0, 4 * MIB) == bytes(4 * MIB)
    assert d.read(keep, 0, 7) == b"keep me"
    assert d.census()["memory"][0]["nonlocal"] == 5 * MIB

    # allow_decommit: discarded at once; a resource reclaims as one.
    res = d.create(AllocDesc(8192).pack(), AllocDesc(8192).pack(), flags=CREATE_RESOURCE)
    assert d.offer(res.resource, resources=True, decommit=True) == OK
    assert d.residency(resource=res.resource) == [NOT_RESIDENT]  # one, for the whole
    assert d.reclaim(pq, res.resource, resources=True) == (OK, [RECLAIM_DISCARDED])
    assert d.residency(resource=res.resource) == [RESIDENT_LOCAL]
    assert d.offer(res.allocations[0].handle, resources=True) == BAD_HANDLE


def test_budgets_match_the_census_and_reservations_hold_room(
        small: tuple[Host, RawGuest]) -> None:
    host, g = small
    a = new_dev(g, host, pid=1)
    b = new_dev(g, host, pid=2)
    a.alloc(3 * MIB)
    b.alloc(MIB, ALLOC_NONLOCAL)
    assert b.reserve_memory(GROUP_LOCAL, 4 * MIB) == OK
    assert b.reserve_memory(GROUP_LOCAL, 6 * MIB) == NO_MEMORY  # 3 MiB are a's
    for d in (a, b):
        proc = d.census()
        (use,) = proc["memory"]
        for group, name in ((GROUP_LOCAL, "local"), (GROUP_NONLOCAL, "nonlocal")):
            info = d.qvmi(group)
            assert info.budget == segment_use(host)[name]["total"] == 8 * MIB
            assert info.current_usage == use[name]
            assert info.current_reservation == use[f"{name}_reservation"]
    qa, qb = a.qvmi(GROUP_LOCAL), b.qvmi(GROUP_LOCAL)
    assert (qa.current_usage, qa.available_for_reservation) == (3 * MIB, 4 * MIB)
    assert (qb.current_reservation, qb.available_for_reservation) == (4 * MIB, 5 * MIB)
    # b's reservation holds its room: a has 1 MiB left locally, the rest goes non-local.
    assert a.create(AllocDesc(2 * MIB).pack()).allocations[0].group == GROUP_NONLOCAL
    assert a.create(AllocDesc(MIB).pack()).allocations[0].group == GROUP_LOCAL
    assert b.create(AllocDesc(4 * MIB).pack()).allocations[0].group == GROUP_LOCAL
    assert segment_use(host)["local"]["used"] == 8 * MIB
    bad = d3dkmt_queryvideomemoryinfo()
    bad.adapter.v = a.adapter_handle
    bad.memory_segment_group = 2
    assert a.status(V.QUERYVIDEOMEMORYINFO, bad) == INVALID
    bad.memory_segment_group, bad.process = 0, 1
    assert a.status(V.QUERYVIDEOMEMORYINFO, bad) == INVALID
    bad.process, bad.adapter.v = 0, a.dev
    assert a.status(V.QUERYVIDEOMEMORYINFO, bad) == BAD_HANDLE


def test_priorities_and_residency(hg: tuple[Host, RawGuest]) -> None:
    host, g = hg
    d = new_dev(g, host)
    x, y = d.alloc(PAGE_SIZE), d.alloc(PAGE_SIZE)
    args = d3dkmt_setallocationpriority()
    args.device.v = d.dev
    args.allocation_count = 2
    args.allocation_list = args.priorities = 1
    assert d.status(V.SETALLOCATIONPRIORITY, args, d.handles(x, y, 7, 9)) == OK
    assert d.status(V.SETALLOCATIONPRIORITY, args, d.handles(x, y, 7)) == INVALID
    get = d3dkmt_getallocationpriority()
    get.device.v = d.dev
    get.allocation_count = 2
    get.allocation_list = 1
    status, _, extra, _ = d.ioctl(V.GETALLOCATIONPRIORITY, get, d.handles(y, x))
    assert status == OK and struct.unpack("<2I", extra) == (9, 7)
    assert d.evict(x) == OK
    assert d.residency(x, y) == [NOT_RESIDENT, RESIDENT_LOCAL]
    assert d.evict(x, 0x40007777) == BAD_HANDLE


# ---- paging queues -----------------------------------------------------------------------------


def test_paging_fence_reaches_its_value_in_the_shared_slot(hg: tuple[Host, RawGuest]) -> None:
    host, g = hg
    d = new_dev(g, host)
    q1, ref1, fds1 = d.paging_queue()
    q2, ref2, fds2 = d.paging_queue()
    assert len(fds1) == len(fds2) == 1  # the block's descriptor on every create
    assert ref1.block == ref2.block and ref1.offset != ref2.offset and ref1.block_size == 65536
    assert d.host_object(q1.sync_object.v, HandleType.MONITOREDFENCE) is not None
    assert q1.fence_cpu_virtual_address == 0
    with pytest.raises(PermissionError):  # the block is handed out read-only: only the host
        mmap.mmap(fds1[0], ref1.block_size)  # writes a fence value (docs/sharing.md)
    view = mmap.mmap(fds1[0], ref1.block_size, prot=mmap.PROT_READ)
    for fd in fds1 + fds2:
        os.close(fd)
    try:
        def slot(ref: BlockRef) -> int:
            return struct.unpack_from("<Q", view, ref.offset)[0]

        h = d.alloc(PAGE_SIZE)
        pq = q1.paging_queue.v
        assert d.make_resident(pq, h) == (OK, 0)  # nothing to page in
        assert d.evict(h) == OK
        status, value = d.make_resident(pq, h)
        assert (status, value) == (PENDING, 1)
        wait_until(lambda: slot(ref1) == 1)
        assert slot(ref2) == 0
        assert d.residency(h) == [RESIDENT_LOCAL]
        assert d.make_resident(pq, h) == (OK, 1)
        assert d.evict(h) == OK
        assert d.make_resident(pq, h) == (PENDING, 2)
        wait_until(lambda: slot(ref1) == 2)
        assert d.make_resident(q2.paging_queue.v, 0x40005555)[0] == BAD_HANDLE
        destroy = d3dddi_destroypagingqueue()
        destroy.paging_queue.v = pq
        assert d.status(V.DESTROYPAGINGQUEUE, destroy) == OK
        assert slot(ref1) == 0  # the slot is zeroed for its next queue
        assert d.status(V.DESTROYPAGINGQUEUE, destroy) == BAD_HANDLE
        assert d.census()["paging_queues"] == 1
    finally:
        view.close()


# ---- GPU virtual addresses ---------------------------------------------------------------------


def test_va_reservations(hg: tuple[Host, RawGuest]) -> None:
    host, g = hg
    d = new_dev(g, host)
    status, base = d.reserve_va(16 * PAGE_SIZE)
    assert status == OK and base >= VA_MIN and base % PAGE_SIZE == 0
    assert d.reserve_va(PAGE_SIZE, base + PAGE_SIZE)[0] == CONFLICT
    assert d.reserve_va(PAGE_SIZE, base + 100)[0] == INVALID
    assert d.reserve_va(100)[0] == INVALID
    assert d.reserve_va(0)[0] == INVALID
    assert d.reserve_va(2 * PAGE_SIZE, VA_MAX - PAGE_SIZE)[0] == INVALID
    assert d.reserve_va(PAGE_SIZE, PAGE_SIZE)[0] == INVALID  # below VA_MIN
    status, fixed = d.reserve_va(PAGE_SIZE, 1 << 40)
    assert (status, fixed) == (OK, 1 << 40)
    lo, hi = 1 << 36, (1 << 36) + 8 * PAGE_SIZE
    status, bounded = d.reserve_va(4 * PAGE_SIZE, lo=lo, hi=hi)
    assert status == OK and lo <= bounded and bounded + 4 * PAGE_SIZE <= hi
    assert d.reserve_va(8 * PAGE_SIZE, lo=lo, hi=hi)[0] == NO_MEMORY
    assert d.free_va(base, PAGE_SIZE) == INVALID  # not the whole reservation
    assert d.free_va(base, 16 * PAGE_SIZE) == OK
    assert d.free_va(base, 16 * PAGE_SIZE) == INVALID
    assert d.census()["gpu_va"] == [{"adapter": 0, "reservations": 2, "mappings": 0}]


def test_map_translate_and_isolation(hg: tuple[Host, RawGuest]) -> None:
    host, g = hg
    d = new_dev(g, host)
    q, _, fds = d.paging_queue()
    for fd in fds:
        os.close(fd)
    pq = q.paging_queue.v
    h = d.alloc(4 * PAGE_SIZE)
    ro = d.alloc(PAGE_SIZE)
    status, base = d.reserve_va(16 * PAGE_SIZE)
    assert status == OK
    status, va, fence = d.map_va(pq, h, 4, base + 2 * PAGE_SIZE)
    assert (status, va, fence) == (OK, base + 2 * PAGE_SIZE, 0)
    assert d.map_va(pq, h, 1, base + 5 * PAGE_SIZE)[0] == CONFLICT  # over a mapping
    assert d.map_va(pq, h, 1, base + 100)[0] == INVALID
    assert d.map_va(pq, h, 5)[0] == INVALID  # more pages than the allocation has
    assert d.map_va(pq, h, 1, first_page=4)[0] == INVALID
    assert d.map_va(pq, h, 1, 1 << 45)[0] == INVALID  # in no reservation
    status, ro_va, _ = d.map_va(pq, ro, 1, write=False)  # fresh space
    assert status == OK and not base <= ro_va < base + 16 * PAGE_SIZE

    assert d.translate(va + 10, 3 * PAGE_SIZE, write=True) == [(h, 10, 3 * PAGE_SIZE)]
    assert d.translate(ro_va, 8) == [(ro, 0, 8)]
    for bad_va, n, write in ((ro_va, 8, True), (base, 8, False), (va + 4 * PAGE_SIZE - 4, 8,
                                                                   False), (0, 1, False)):
        with pytest.raises(VaFault):
            d.translate(bad_va, n, write)
    # Through a host view, the bytes land in the allocation.
    def poke() -> None:
        (part,) = host.partitions()
        space = vaspace_of(part.processes[d.hp], host.adapters[0])
        view = space.view(va + PAGE_SIZE, 5)
        view[:] = b"GPU!!"
        view.release()
    d.host_call(poke)
    assert d.read(h, PAGE_SIZE, 5) == b"GPU!!"

    # Another process's allocation and queue are not there for it.
    other = new_dev(g, host, pid=99)
    oq, _, ofds = other.paging_queue()
    for fd in ofds:
        os.close(fd)
    assert other.map_va(oq.paging_queue.v, h, 1)[0] == BAD_HANDLE
    assert other.map_va(pq, other.alloc(PAGE_SIZE), 1)[0] == BAD_HANDLE
    with pytest.raises(VaFault):
        other.translate(va, 8)

    # An evicted allocation faults; its mappings go with it.
    assert d.evict(h) == OK
    with pytest.raises(VaFault):
        d.translate(va, 8)
    assert d.census()["gpu_va"] == [{"adapter": 0, "reservations": 2, "mappings": 2}]
    assert d.destroy(h, ro) == OK
    assert d.census()["gpu_va"] == [{"adapter": 0, "reservations": 1, "mappings": 0}]
    with pytest.raises(VaFault):
        d.translate(va, 8)


def _op(kind: int, **fields: int) -> bytes:
    op = d3dddi_updategpuvirtualaddress_operation()
    op.operation = kind
    part = {0: op.map, 1: op.unmap, 2: op.copy, 3: op.map_protect}.get(kind, op.map)
    for name, value in fields.items():
        if name == "allocation":
            part.allocation.v = value
        elif name == "protection":
            part.protection.value = value
        else:
            setattr(part, name, value)
    return bytes(op)


def test_update_gpu_va_operations_all_or_nothing(hg: tuple[Host, RawGuest]) -> None:
    host, g = hg
    d = new_dev(g, host)
    q, _, fds = d.paging_queue()
    for fd in fds:
        os.close(fd)
    a, b = d.alloc(4 * PAGE_SIZE), d.alloc(2 * PAGE_SIZE)
    status, base = d.reserve_va(32 * PAGE_SIZE)
    assert status == OK
    P = PAGE_SIZE

    def update(*ops: bytes, fence: int = 0, value: int = 0) -> int:
        args = d3dkmt_updategpuvirtualaddress()
        args.device.v = d.dev
        args.num_operations = len(ops)
        args.operations = 1
        args.fence_object.v = fence
        args.fence_value = value
        return d.status(V.UPDATEGPUVIRTUALADDRESS, args, b"".join(ops))

    ops = [
        _op(0, base_address=base, size=4 * P, allocation=a, allocation_offset=0,
            allocation_size=4 * P),
        _op(3, base_address=base + 8 * P, size=2 * P, allocation=b, allocation_offset=0,
            allocation_size=2 * P, protection=0),  # read-only
        _op(2, source_address=base, size=4 * P, dest_address=base + 16 * P),
        _op(1, base_address=base + P, size=P),
    ]
    assert update(*ops) == OK
    assert d.translate(base, P, True) == [(a, 0, P)]
    with pytest.raises(VaFault):
        d.translate(base + P, 1)  # unmapped by the last op
    assert d.translate(base + 2 * P, 2 * P) == [(a, 2 * P, 2 * P)]
    assert d.translate(base + 16 * P, 4 * P, True) == [(a, 0, 4 * P)]  # the copy, whole
    assert d.translate(base + 8 * P, 2 * P) == [(b, 0, 2 * P)]
    with pytest.raises(VaFault):
        d.translate(base + 8 * P, 1, write=True)
    census = d.census()["gpu_va"]

    # One bad operation: none is applied.
    bad = _op(0, base_address=base + 24 * P, size=P, allocation=0x40006666,
              allocation_offset=0, allocation_size=P)
    unmap_all = _op(1, base_address=base, size=32 * P)
    assert update(unmap_all, bad) == BAD_HANDLE
    outside = _op(1, base_address=base + 30 * P, size=4 * P)
    assert update(unmap_all, outside) == INVALID
    assert update(_op(7)) == INVALID
    assert d.translate(base, P) == [(a, 0, P)] and d.census()["gpu_va"] == census
    # A paging fence of the device, at a value it reached.
    fence = q.sync_object.v
    assert update(unmap_all, fence=fence, value=0) == OK
    assert update(unmap_all, fence=fence, value=5) == INVALID
    assert update(unmap_all, fence=q.paging_queue.v) == INVALID
    with pytest.raises(VaFault):
        d.translate(base + 16 * P, 1)
    assert d.census()["gpu_va"] == [{"adapter": 0, "reservations": 1, "mappings": 0}]


# ---- teardown ----------------------------------------------------------------------------------


def _fill(d: Dev) -> None:
    """A bit of everything: arena and dedicated memory, a resource, queues, VA."""
    q, _, fds = d.paging_queue()
    for fd in fds:
        os.close(fd)
    small_h = d.alloc(PAGE_SIZE)
    d.alloc(3 * MIB, ALLOC_NONLOCAL)
    d.create(AllocDesc(PAGE_SIZE).pack(), AllocDesc(PAGE_SIZE).pack(), flags=CREATE_RESOURCE)
    assert d.reserve_va(8 * PAGE_SIZE)[0] == OK
    assert d.map_va(q.paging_queue.v, small_h, 1)[0] == OK
    assert d.reserve_memory(GROUP_LOCAL, MIB) == OK
    r, lock_fds = d.lock(small_h, LOCK2_FD)
    assert r.status == OK
    for fd in lock_fds:
        os.close(fd)


def test_freed_memory_goes_back_to_the_os_while_a_client_maps_it(
        hg: tuple[Host, RawGuest]) -> None:
    host, g = hg
    d = new_dev(g, host)
    rss = shared_rss()
    small_h, big_h = d.alloc(MIB), d.alloc(16 * MIB)
    r, fds = d.lock(small_h, LOCK2_FD)
    (fd,) = fds
    try:
        view = mmap.mmap(fd, r.block_size)
        view[r.offset : r.offset + MIB] = b"x" * MIB  # the client fills it
        view.close()
        assert d.write(big_h, 0, b"y" * 16 * MIB) == OK
        assert os.fstat(fd).st_blocks * 512 >= MIB
        assert shared_rss() - rss >= 16 * MIB
        assert d.destroy(small_h, big_h) == OK
        assert os.fstat(fd).st_blocks == 0  # punched, though the client still has the block
        assert shared_rss() - rss < MIB
        again = d.alloc(MIB)
        assert d.read(again, 0, MIB) == bytes(MIB)
    finally:
        os.close(fd)
    assert g.destroy_process(d.hp) == OK
    assert shared_rss() - rss < MIB


def test_process_exit_and_teardown_free_everything(sock_dir: str) -> None:
    host, g = make_host(sock_dir)
    try:
        (part,) = host.partitions()
        g.open_adapter(0)
        before, pinned = fd_count(), part.pinned
        empty = partition_memory(host)
        assert empty == {"allocations": 0, "resources": 0, "paging_queues": 0, "blocks": 0,
                         "block_bytes": 0}
        d = new_dev(g, host)
        _fill(d)
        assert partition_memory(host)["blocks"] == 3 and fd_count() > before
        assert g.destroy_process(d.hp) == OK
        assert partition_memory(host) == empty and fd_count() == before
        assert segment_use(host, 0)["local"]["used"] == segment_use(host, 0)["nonlocal"]["used"]
        assert segment_use(host, 0)["nonlocal"]["used"] == 0
        assert part.pinned == pinned

        # DESTROYDEVICE and CLOSEADAPTER drop theirs too.
        d = new_dev(g, host, pid=5)
        _fill(d)
        assert g.destroy_device(0, d.hp, d.dev) == OK
        assert d.census()["allocations"] == 0 and d.census()["memory"][0]["local"] == 0
        d.dev = g.create_device(0, d.hp)
        _fill(d)
        g.v(0, V.CLOSEADAPTER, 0, CloseAdapter(g.adapter_handles.pop(0)).pack())
        wait_until(lambda: not host.census()["partitions"][0]["adapters"])
        proc = d.census()
        assert (proc["allocations"], proc["blocks"], proc["memory"], proc["gpu_va"]) == (
            0, 0, [], [])
        assert fd_count() == before

        # The guest going away takes everything.
        d = new_dev(g, host, pid=6)
        _fill(d)
        g.close()
        assert host.wait_for(lambda: host.census()["totals"]["partitions"] == 0, TIMEOUT)
        assert fd_count() < before  # its connection went too
        assert segment_use(host)["local"]["used"] == 0
    finally:
        g.close()
        host.close()


def test_over_tcp_memory_is_copied(sock_dir: str) -> None:
    host, g = make_host(sock_dir, "tcp:127.0.0.1:0")
    try:
        d = new_dev(g, host)
        h = d.alloc(PAGE_SIZE)
        assert d.lock(h, LOCK2_FD)[0].status == NTSTATUS.STATUS_NOT_SUPPORTED
        assert d.write(h, 8, b"over tcp") == OK and d.read(h, 8, 8) == b"over tcp"
        q, ref, fds = d.paging_queue()
        assert fds == [] and ref.block_size == 65536
        assert d.evict(h) == OK
        assert d.make_resident(q.paging_queue.v, h) == (OK, 1)  # reached before the reply
    finally:
        g.close()
        host.close()


def test_hostile_arguments_are_refused(hg: tuple[Host, RawGuest]) -> None:
    host, g = hg
    d = new_dev(g, host)
    h = d.alloc(PAGE_SIZE)
    args = d3dkmt_evict()
    args.device.v = d.dev
    args.alloc_count = 1
    for body in (IoctlArgs(bytes(args)[:-1], d.handles(h)),  # struct too short
                 IoctlArgs(bytes(args), d.handles(h) + b"x"),  # extra too long
                 IoctlArgs(bytes(args), b"")):
        reply, _ = d.send(V.EVICT, body.pack())
        assert IoctlArgsReturn.unpack(reply).status == INVALID
    args.alloc_count = 1 << 31
    assert d.status(V.EVICT, args, d.handles(h)) == INVALID
    args.alloc_count = 0
    assert d.status(V.EVICT, args) == INVALID
    reply, _ = d.send(V.EVICT, b"\x01")
    assert NtStatusReturn.unpack(reply[:4]).status == INVALID
    mr = d3dddi_makeresident()
    mr.paging_queue.v = d.dev  # a device is no paging queue
    mr.alloc_count = 1
    assert d.status(V.MAKERESIDENT, mr, d.handles(h)) == BAD_HANDLE
    offer = d3dkmt_offerallocations()
    offer.device.v = d.dev
    offer.allocation_count = 1
    offer.priority = OFFER_LOW
    offer.resources = offer.allocations = 1
    assert d.status(V.OFFERALLOCATIONS, offer, d.handles(h)) == INVALID
    offer.resources = 0
    offer.priority = 9
    assert d.status(V.OFFERALLOCATIONS, offer, d.handles(h)) == INVALID
    assert d.offer(h, h) == INVALID  # listed twice
    assert d.census()["allocations"] == 1


def test_random_arguments_never_break_the_host(hg: tuple[Host, RawGuest],
                                               caplog: pytest.LogCaptureFixture) -> None:
    """Every memory command with random structs and arrays that name real handles: each gets
    an answer (never an internal error), and teardown still leaves nothing behind."""
    import random

    host, g = hg
    d = new_dev(g, host)
    q, _, fds = d.paging_queue()
    for fd in fds:
        os.close(fd)
    allocs = [d.alloc(PAGE_SIZE), d.alloc(2 * MIB)]
    res = d.create(AllocDesc(PAGE_SIZE).pack(), flags=CREATE_RESOURCE).resource
    assert d.reserve_va(64 * PAGE_SIZE)[0] == OK
    real = [d.dev, d.adapter_handle, q.paging_queue.v, q.sync_object.v, res, *allocs, 0]
    structs = {
        V.RESERVEGPUVIRTUALADDRESS: d3dddi_reservegpuvirtualaddress,
        V.MAPGPUVIRTUALADDRESS: d3dddi_mapgpuvirtualaddress,
        V.FREEGPUVIRTUALADDRESS: d3dkmt_freegpuvirtualaddress,
        V.UPDATEGPUVIRTUALADDRESS: d3dkmt_updategpuvirtualaddress,
        V.CREATEPAGINGQUEUE: d3dkmt_createpagingqueue,
        V.DESTROYPAGINGQUEUE: d3dddi_destroypagingqueue,
        V.MAKERESIDENT: d3dddi_makeresident,
        V.EVICT: d3dkmt_evict,
        V.QUERYALLOCATIONRESIDENCY: d3dkmt_queryallocationresidency,
        V.SETALLOCATIONPRIORITY: d3dkmt_setallocationpriority,
        V.GETALLOCATIONPRIORITY: d3dkmt_getallocationpriority,
        V.OFFERALLOCATIONS: d3dkmt_offerallocations,
        V.RECLAIMALLOCATIONS: d3dkmt_reclaimallocations2,
        V.QUERYVIDEOMEMORYINFO: d3dkmt_queryvideomemoryinfo,
        V.CHANGEVIDEOMEMORYRESERVATION: d3dkmt_changevideomemoryreservation,
    }
    rng = random.Random(7)

    def word() -> int:
        return rng.choice([*real, rng.getrandbits(32), rng.randrange(4), 1, PAGE_SIZE])

    for cmd, ctype in structs.items():
        for _ in range(60):
            raw = bytearray(ctypes.sizeof(ctype))
            for at in range(0, len(raw), 4):
                struct.pack_into("<I", raw, at, word() if rng.random() < 0.6 else 0)
            count = rng.choice([0, 1, 2, 3])
            extra = b"".join(struct.pack("<I", word()) for _ in range(count * rng.choice([1, 2,
                                                                                           16])))
            status, _, _, got = d.ioctl(cmd, ctype.from_buffer_copy(raw), extra)
            for fd in got:
                os.close(fd)
            assert status != NTSTATUS.STATUS_INTERNAL_ERROR, cmd.name
    for _ in range(100):
        r, got = d.lock(rng.choice(real), rng.choice([0, 1, 2, 3]), rng.getrandbits(rng.choice(
            [8, 24, 64])), rng.getrandbits(rng.choice([8, 24, 64])))
        for fd in got:
            os.close(fd)
        assert r.status != NTSTATUS.STATUS_INTERNAL_ERROR
    # Random VA operations around a reservation keep the VA space consistent.
    status, base = d.reserve_va(64 * PAGE_SIZE)
    assert status == OK
    live = [a for a in allocs if d.host_object(a, HandleType.ALLOCATION) is not None]

    def addr() -> int:
        return base + rng.randrange(-4, 68) * PAGE_SIZE

    for _ in range(300):
        ops = []
        for _ in range(rng.randrange(1, 4)):
            kind = rng.choice([0, 1, 2, 3])
            size = rng.randrange(1, 6) * PAGE_SIZE
            if kind in (0, 3):
                ops.append(_op(kind, base_address=addr(), size=size,
                               allocation=rng.choice([*live, 0x40001000]),
                               allocation_offset=rng.randrange(0, 3) * PAGE_SIZE,
                               allocation_size=size, **({"protection": rng.randrange(4)}
                                                        if kind == 3 else {})))
            elif kind == 1:
                ops.append(_op(1, base_address=addr(), size=size))
            else:
                ops.append(_op(2, source_address=addr(), size=size, dest_address=addr()))
        args = d3dkmt_updategpuvirtualaddress()
        args.device.v = d.dev
        args.num_operations = len(ops)
        assert d.status(V.UPDATEGPUVIRTUALADDRESS, args, b"".join(ops)) in (OK, INVALID,
                                                                            BAD_HANDLE)

    def check() -> int:
        (part,) = host.partitions()
        space = vaspace_of(part.processes[d.hp], host.adapters[0])
        total = 0
        for r in space.reservations:
            assert r.starts == [mp.va for mp in r.maps]
            for mp, nxt in zip(r.maps, r.maps[1:], strict=False):
                assert mp.end <= nxt.va
            for mp in r.maps:
                assert r.base <= mp.va and mp.end <= r.end and mp.size > 0
                assert mp in mp.allocation.mappings
                assert mp.offset + mp.size <= mp.allocation.size
            total += len(r.maps)
        assert total == space.mappings == sum(
            len(a.mappings) for dev in part.processes[d.hp].devices.values()
            for a in dev.allocations.values())
        return total

    assert d.host_call(check)
    assert d.destroy(allocs[0]) == OK
    d.host_call(check)
    assert "handler failed" not in caplog.text
    assert g.destroy_process(d.hp) == OK
    assert partition_memory(host)["blocks"] == 0
    assert segment_use(host)["local"]["used"] == segment_use(host)["nonlocal"]["used"] == 0
