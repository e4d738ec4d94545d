"""QueryStatistics and InvalidateCache end to end: counts after known work (command buffers,
commands, engine time, faults, resets, objects, committed bytes) per process-adapter, process and
adapter; counts that outlive the objects and processes they count; one guest never sees
another's; PIDs, LUIDs and types refused; the host's own checks; and InvalidateCache's range
and ownership checks. The layout: docs/statistics.md."""

from __future__ import annotations

import ctypes
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import make_stack, wait_until
from dxg.backends.softcmd import CommandBuffer, DType, Operand
from dxg.client import open_node
from dxg.client import thunks as t
from dxg.client.execution import DeviceFault
from dxg.guest.driver import GuestDriver
from dxg.guest.errors import IoctlError
from dxg.guest.ioctl_stats import process_of_pid
from dxg.node.server import SocketNode
from dxg.protocol import messages as m
from dxg.protocol.commands import VgpuCommand
from dxg.uapi import structs as s
from dxg.uapi.memory import AllocDesc
from dxg.uapi.ntstatus import NTSTATUS
from dxg.uapi.statistics import (
    QUERY_ADAPTER,
    QUERY_PROCESS,
    QUERY_PROCESS_ADAPTER,
    RESULT_BYTES,
    STATISTICS_MAGIC,
    StatisticsRecord,
)
from test_host import RawGuest

F32 = DType.of(np.float32)
OK = NTSTATUS.STATUS_SUCCESS
INVALID = NTSTATUS.STATUS_INVALID_PARAMETER
BAD_HANDLE = NTSTATUS.STATUS_INVALID_HANDLE
NOT_SUPPORTED = NTSTATUS.STATUS_NOT_SUPPORTED
GIB = 1 << 30


@pytest.fixture
def stack(tmp_path: Path):
    with make_stack(tmp_path, adapters=2) as s_:
        yield s_


def query(conn, luid: tuple[int, int], qtype: int, pid: int = 0
          ) -> tuple[int, StatisticsRecord | None]:
    args = s.d3dkmt_querystatistics()
    args.type = qtype
    args.adapter_luid.a, args.adapter_luid.b = luid
    args.process = pid
    status = t.D3DKMTQueryStatistics(conn, args)
    return status, (StatisticsRecord.of(args) if status == OK else None)


def stats(node, adapter, qtype: int, pid: int = 0) -> StatisticsRecord:
    status, record = query(node.conn, adapter.luid_parts, qtype, pid)
    assert status == OK, hex(status)
    assert record is not None and record.type == qtype
    return record


def run(dev, queue, cmd: CommandBuffer) -> int:
    """``cmd`` in an allocation mapped at a GPU VA, submitted and waited for."""
    raw = cmd.tobytes()
    buf = dev.allocate(len(raw))
    buf.upload(raw)
    done = queue.submit(int(buf.map_gpu()), len(raw))
    queue.wait(done, timeout=30)
    return done


def two_commands(va: int, n: int = 1024) -> CommandBuffer:
    x = Operand(va, F32, (n,))
    return CommandBuffer().fill(x, 1.0).binary("add", x, x, x)


# ---- the layout --------------------------------------------------------------------------------


def test_the_record_is_where_the_document_says() -> None:
    names = StatisticsRecord.counter_names()
    record = StatisticsRecord(QUERY_PROCESS_ADAPTER, *range(101, 101 + len(names)))
    raw = record.pack()
    assert len(raw) == RESULT_BYTES == 776
    assert raw[:4] == b"PDXQ" and struct.unpack_from("<IHHII", raw) == (
        STATISTICS_MAGIC, 2, 152, QUERY_PROCESS_ADAPTER, 0)
    for i, name in enumerate(names):  # 16, 24, ... 136, in the documented order
        assert struct.unpack_from("<Q", raw, 16 + 8 * i)[0] == getattr(record, name)
    assert names[-4:] == ("faults", "resets", "demoted_bytes", "promoted_bytes")
    assert raw[144:] == bytes(776 - 144)
    assert StatisticsRecord.unpack(raw) == record
    with pytest.raises(ValueError):
        StatisticsRecord.unpack(b"PDXQ" + raw[4:64])  # short
    with pytest.raises(ValueError):
        StatisticsRecord.unpack(b"XDXQ" + raw[4:])
    with pytest.raises(ValueError):
        StatisticsRecord.unpack(raw[:4] + b"\1\0" + raw[6:])  # version 1


# ---- counts after known work ---------------------------------------------------------------------


def test_counts_after_known_work(stack) -> None:
    """Three command buffers of two commands each on one queue: the process on the adapter,
    the process on every adapter and the adapter all say so, with the objects and committed
    bytes the process holds; the other adapter saw nothing."""
    pid = os.getpid()
    with open_node(stack.node_path) as node:
        first, second = node.adapters()
        assert stats(node, first, QUERY_ADAPTER).command_buffers == 0
        dev = first.create_device()
        q = dev.create_context().hwqueue()
        x = dev.array(np.zeros(1024, np.float32))
        vx = int(x.map_gpu())
        for _ in range(3):
            run(dev, q, two_commands(vx))
        assert np.all(x.download() == 2.0)
        usage = first.video_memory_info(0)
        mine = stats(node, first, QUERY_PROCESS_ADAPTER, pid)
        assert (mine.command_buffers, mine.commands, mine.faults, mine.resets) == (3, 6, 0, 0)
        assert mine.engine_busy_ns > 0
        assert (mine.processes, mine.devices, mine.contexts, mine.hwqueues) == (1, 1, 1, 1)
        assert mine.allocations == 4  # the array and three command buffers
        assert mine.committed_local == usage.current_usage == 4 * 4096
        assert mine.committed_nonlocal == 0
        assert mine.local_capacity == usage.budget == GIB
        assert mine.nonlocal_capacity > 0
        adapter = stats(node, first, QUERY_ADAPTER)
        assert adapter == StatisticsRecord(QUERY_ADAPTER, **{
            k: getattr(mine, k) for k in StatisticsRecord.counter_names()})
        everywhere = stats(node, first, QUERY_PROCESS, pid)
        assert (everywhere.command_buffers, everywhere.commands) == (3, 6)
        assert everywhere.local_capacity == everywhere.nonlocal_capacity == 0
        other = stats(node, second, QUERY_PROCESS_ADAPTER, pid)
        assert (other.command_buffers, other.devices, other.engine_busy_ns) == (0, 0, 0)
        assert stats(node, second, QUERY_ADAPTER).command_buffers == 0

        # Work on the second adapter: PROCESS adds both up, each adapter keeps its own.
        dev2 = second.create_device()
        q2 = dev2.create_context().hwqueue()
        y = dev2.array(np.zeros(256, np.float32))
        run(dev2, q2, two_commands(int(y.map_gpu()), 256))
        everywhere = stats(node, second, QUERY_PROCESS, pid)
        assert (everywhere.command_buffers, everywhere.commands, everywhere.devices) == (4, 8, 2)
        assert stats(node, second, QUERY_PROCESS_ADAPTER, pid).command_buffers == 1
        assert stats(node, first, QUERY_PROCESS_ADAPTER, pid).command_buffers == 3


def test_counts_outlive_queues_contexts_devices_and_processes(stack) -> None:
    with open_node(stack.node_path) as watcher:
        adapter = watcher.adapters()[0]
        assert stats(watcher, adapter, QUERY_ADAPTER).command_buffers == 0  # (on the host now)
        with open_node(stack.node_path) as node:
            ad = node.adapters()[0]
            dev = ad.create_device()
            ctx = dev.create_context()
            q = ctx.hwqueue()
            x = dev.array(np.zeros(64, np.float32))
            run(dev, q, two_commands(int(x.map_gpu()), 64))
            run(dev, q, two_commands(int(x.map_gpu()), 64))
            q.close()
            ctx.close()
            dev.close()
            mine = stats(node, ad, QUERY_PROCESS_ADAPTER, os.getpid())
            assert (mine.command_buffers, mine.commands) == (2, 4)
            assert (mine.devices, mine.contexts, mine.hwqueues, mine.allocations) == (0, 0, 0, 0)
            assert mine.engine_busy_ns > 0
            busy = mine.engine_busy_ns
        # Its process went: the adapter keeps what it did (and no longer counts it as a user).
        wait_until(lambda: stack.host_totals()["processes"] == 1, what="the process gone")
        left = stats(watcher, adapter, QUERY_ADAPTER)
        assert (left.command_buffers, left.commands, left.engine_busy_ns) == (2, 4, busy)
        assert (left.processes, left.devices, left.committed_local) == (0, 0, 0)


def test_faults_and_resets_are_counted(stack) -> None:
    with open_node(stack.node_path) as node:
        ad = node.adapters()[0]
        bad, reset, good = ad.create_device(), ad.create_device(), ad.create_device()
        qb, qg = bad.create_context().hwqueue(), good.create_context().hwqueue()
        x = bad.array(np.ones(16, np.float32))
        vx = int(x.map_gpu())
        cmd = CommandBuffer().binary("add", Operand(vx, F32, (16,)), Operand(vx, F32, (16,)),
                                     Operand(0x7F0000000, F32, (16,)))  # nothing mapped there
        with pytest.raises(DeviceFault):
            run(bad, qb, cmd)
        reset.mark_error()
        y = good.array(np.zeros(16, np.float32))
        run(good, qg, two_commands(int(y.map_gpu()), 16))
        mine = stats(node, ad, QUERY_PROCESS_ADAPTER, os.getpid())
        assert (mine.faults, mine.resets) == (1, 1)
        assert mine.command_buffers == 1  # the faulted buffer did not run to its end
        assert (mine.devices, mine.hwqueues) == (3, 2)
        adapter = stats(node, ad, QUERY_ADAPTER)
        assert (adapter.faults, adapter.resets, adapter.command_buffers) == (1, 1, 1)
        bad.close()
        reset.close()
        assert stats(node, ad, QUERY_ADAPTER).faults == 1  # the device went, its fault stays


CHILD = r"""
import sys
import numpy as np
from dxg.client import open_node
from dxg.backends.softcmd import CommandBuffer, DType, Operand
node = open_node(sys.argv[1])
dev = node.adapters()[0].create_device()
q = dev.create_context().hwqueue()
x = dev.array(np.zeros(32, np.float32))
o = Operand(int(x.map_gpu()), DType.of(np.float32), (32,))
raw = CommandBuffer().fill(o, 3.0).tobytes()
buf = dev.allocate(len(raw)); buf.upload(raw)
q.wait(q.submit(int(buf.map_gpu()), len(raw)), timeout=30)
print("ready", flush=True)
sys.stdin.read()
"""


def test_another_process_by_its_pid(stack) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD, stack.node_path],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        with open_node(stack.node_path) as node:
            ad = node.adapters()[0]
            theirs = stats(node, ad, QUERY_PROCESS_ADAPTER, child.pid)
            assert (theirs.command_buffers, theirs.commands, theirs.devices) == (1, 1, 1)
            assert theirs.allocations == 2
            mine = stats(node, ad, QUERY_PROCESS_ADAPTER, os.getpid())
            assert (mine.command_buffers, mine.devices) == (0, 0)
            assert stats(node, ad, QUERY_PROCESS, child.pid).command_buffers == 1
            child.communicate("", timeout=30)
            wait_until(lambda: stack.host_totals()["processes"] == 1, what="the child gone")
            assert query(node.conn, ad.luid_parts, QUERY_PROCESS_ADAPTER, child.pid)[0] == INVALID
            assert stats(node, ad, QUERY_ADAPTER).command_buffers == 1
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_guests_see_only_their_own_work(stack, tmp_path: Path) -> None:
    """Two guests on one host adapter: one guest's work never shows in the other's numbers."""
    other = GuestDriver()
    node2 = None
    try:
        other.bind(stack.host_address)
        assert other.wait_for_adapters(2, 15)
        node2 = SocketNode(other, str(tmp_path / "g2.sock"))
        node2.start()
        with open_node(stack.node_path) as a, open_node(str(tmp_path / "g2.sock")) as b:
            ad_a, ad_b = a.adapters()[0], b.adapters()[0]
            assert ad_a.luid_parts == ad_b.luid_parts  # the same host adapter
            dev = ad_a.create_device()
            q = dev.create_context().hwqueue()
            x = dev.array(np.zeros(64, np.float32))
            run(dev, q, two_commands(int(x.map_gpu()), 64))
            assert stats(a, ad_a, QUERY_ADAPTER).command_buffers == 1
            seen = stats(b, ad_b, QUERY_ADAPTER)
            assert (seen.command_buffers, seen.processes, seen.devices) == (0, 0, 0)
            assert (seen.engine_busy_ns, seen.committed_local) == (0, 0)
    finally:
        if node2 is not None:
            node2.close()
        other.close()


# ---- what is refused ------------------------------------------------------------------------------


def test_bad_luids_pids_and_types(stack) -> None:
    with open_node(stack.node_path) as node:
        ad = node.adapters()[0]
        luid = ad.luid_parts
        conn = node.conn
        assert query(conn, (luid[0] ^ 0x5A5A, luid[1]), QUERY_ADAPTER)[0] == INVALID
        assert query(conn, (0, 0), QUERY_ADAPTER)[0] == INVALID
        assert query(conn, luid, QUERY_PROCESS_ADAPTER, os.getppid())[0] == INVALID  # not ours
        assert query(conn, luid, QUERY_PROCESS_ADAPTER, 1 << 40)[0] == INVALID
        assert query(conn, luid, QUERY_ADAPTER, os.getppid())[0] == INVALID  # must resolve too
        for qtype in (QUERY_PROCESS, QUERY_PROCESS_ADAPTER):
            assert query(conn, luid, qtype)[0] == INVALID  # no process named
        for qtype in range(3, 11):
            assert query(conn, luid, qtype, os.getpid())[0] == NOT_SUPPORTED, qtype
        for qtype in (11, 0x7FFFFFFF):
            assert query(conn, luid, qtype)[0] == INVALID
        # What the caller passed comes back as it was, but for the result.
        args = s.d3dkmt_querystatistics()
        args.type = QUERY_PROCESS_ADAPTER
        args.adapter_luid.a, args.adapter_luid.b = luid
        args.process = os.getpid()
        raw = bytearray(bytes(args))
        raw[24:800] = b"\xee" * 776
        raw[800:808] = b"tail-end"
        args = s.d3dkmt_querystatistics.from_buffer_copy(bytes(raw))
        assert t.D3DKMTQueryStatistics(conn, args) == OK
        out = bytes(args)
        assert out[:24] == bytes(raw[:24]) and out[800:] == b"tail-end"
        assert StatisticsRecord.of(args).type == QUERY_PROCESS_ADAPTER
        assert out[24 + 136 : 800] == bytes(776 - 136)


def _proc(pid: int, uid: int, closed: bool = False) -> SimpleNamespace:
    return SimpleNamespace(pid=pid, uid=uid, closed=closed)


def test_which_process_a_pid_names() -> None:
    """The caller itself first; another process only in the caller's PID namespace and, unless
    the caller is root, of the caller's user; never a closed one."""
    me, parent = os.getpid(), os.getppid()

    def adapter(*procs: SimpleNamespace) -> SimpleNamespace:
        return SimpleNamespace(process_adapters=[SimpleNamespace(process=p) for p in procs])

    caller = _proc(me, 1000)
    twin = _proc(me, 1000)  # the same program's other open of the node
    assert process_of_pid(caller, adapter(twin, caller), me) is caller
    assert process_of_pid(_proc(me, 1000), adapter(twin), me) is twin
    same_user = _proc(parent, 1000)
    assert process_of_pid(caller, adapter(same_user), parent) is same_user
    stranger = _proc(parent, 1001)
    with pytest.raises(IoctlError):
        process_of_pid(caller, adapter(stranger), parent)
    assert process_of_pid(_proc(me, 0), adapter(stranger), parent) is stranger  # root
    with pytest.raises(IoctlError):
        process_of_pid(caller, adapter(_proc(parent, 1000, closed=True)), parent)
    gone = _proc(2 ** 22 + 17, 1000)  # no such process: its namespace cannot be told
    with pytest.raises(IoctlError):
        process_of_pid(caller, adapter(gone), gone.pid)
    with pytest.raises(IoctlError):
        process_of_pid(caller, adapter(), me)  # not using the adapter


# ---- the host's own checks -------------------------------------------------------------------------


def _host_luid(stack, index: int = 0) -> int:
    return int(stack.host.census()["adapters"][index]["host_adapter_luid"])


def _ioctl(guest: RawGuest, command: VgpuCommand, hprocess: int, args) -> m.IoctlArgsReturn:
    reply = guest.v(0, command, hprocess, m.IoctlArgs(bytes(args)).pack(), True)
    return m.IoctlArgsReturn.unpack(reply)


def test_the_host_checks_what_a_guest_sends(stack) -> None:
    """A guest's word is not trusted: the LUID must be the addressed adapter's, the process a
    live one of that guest, the type one the host fills; InvalidateCache's allocation must be
    the device's and the range inside it."""
    guest = RawGuest(stack.host_address)
    try:
        wait_until(lambda: guest.driver.global_channel is not None
                   and len(guest.driver.vgpus) == 2)
        guest.open_adapter(0)
        hp = guest.create_process()
        other = guest.create_process(pid=4343)
        args = s.d3dkmt_querystatistics()
        args.type = QUERY_PROCESS_ADAPTER
        args.adapter_luid.a, args.adapter_luid.b = (_host_luid(stack) & 0xFFFFFFFF,
                                                    _host_luid(stack) >> 32)
        args.process = other
        reply = _ioctl(guest, VgpuCommand.QUERYSTATISTICS, hp, args)
        assert reply.status == OK
        got = s.d3dkmt_querystatistics.from_buffer_copy(reply.args)
        assert StatisticsRecord.of(got).processes == 1
        for process, status in ((0x7FFF0001, BAD_HANDLE), (1 << 40, BAD_HANDLE)):
            args.process = process
            assert _ioctl(guest, VgpuCommand.QUERYSTATISTICS, hp, args).status == status
        args.process = 0
        assert _ioctl(guest, VgpuCommand.QUERYSTATISTICS, hp, args).status == INVALID
        args.type = QUERY_ADAPTER
        assert _ioctl(guest, VgpuCommand.QUERYSTATISTICS, hp, args).status == OK
        args.type = 5
        assert _ioctl(guest, VgpuCommand.QUERYSTATISTICS, hp, args).status == NOT_SUPPORTED
        args.type = QUERY_ADAPTER
        args.adapter_luid.a ^= 1  # another LUID than the addressed adapter's
        assert _ioctl(guest, VgpuCommand.QUERYSTATISTICS, hp, args).status == INVALID
        assert _ioctl(guest, VgpuCommand.QUERYSTATISTICS, 0x7FFF0001, args).status == BAD_HANDLE

        # INVALIDATECACHE: a device with one allocation of a page.
        dev, dev2 = guest.create_device(0, hp), guest.create_device(0, hp)
        body = m.CreateAllocation(dev, 0, 0, 0, b"", b"", (
            m.NewAllocation(0, 0, AllocDesc(4096).pack()),))
        made = m.CreateAllocationReturn.unpack(
            guest.v(0, VgpuCommand.CREATEALLOCATION, hp, body.pack(), True))
        assert made.status == OK
        alloc = made.allocations[0].handle
        inv = s.d3dkmt_invalidatecache()
        inv.device.v, inv.allocation.v = dev, alloc
        for offset, length, status in ((0, 4096, OK), (4096, 0, OK), (4095, 1, OK),
                                       (4095, 2, INVALID), (4097, 0, INVALID),
                                       ((1 << 64) - 1, 2, INVALID)):
            inv.offset, inv.length = offset, length
            assert _ioctl(guest, VgpuCommand.INVALIDATECACHE, hp, inv).status == status
        inv.offset, inv.length = 0, 4096
        inv.device.v = dev2  # the allocation is not that device's
        assert _ioctl(guest, VgpuCommand.INVALIDATECACHE, hp, inv).status == BAD_HANDLE
        inv.device.v = dev
        assert _ioctl(guest, VgpuCommand.INVALIDATECACHE, other, inv).status == BAD_HANDLE
        inv.allocation.v = 0x7FFF0001
        assert _ioctl(guest, VgpuCommand.INVALIDATECACHE, hp, inv).status == BAD_HANDLE
    finally:
        guest.close()


# ---- InvalidateCache through the driver -----------------------------------------------------------


def test_invalidate_cache(stack) -> None:
    with open_node(stack.node_path) as node:
        ad = node.adapters()[0]
        dev, dev2 = ad.create_device(), ad.create_device()
        buf = dev.allocate(10000)  # rounded up to 3 pages
        foreign = dev2.allocate(4096)

        def invalidate(device: int, allocation: int, offset: int, length: int) -> int:
            args = s.d3dkmt_invalidatecache()
            args.device.v, args.allocation.v = device, allocation
            args.offset, args.length = offset, length
            return t.D3DKMTInvalidateCache(node.conn, args)

        assert buf.size == 3 * 4096
        assert invalidate(dev.handle, buf.handle, 0, buf.size) == OK
        assert invalidate(dev.handle, buf.handle, 100, 200) == OK
        assert invalidate(dev.handle, buf.handle, buf.size, 0) == OK
        assert invalidate(dev.handle, buf.handle, 0, buf.size + 1) == INVALID
        assert invalidate(dev.handle, buf.handle, buf.size + 1, 0) == INVALID
        assert invalidate(dev.handle, buf.handle, (1 << 64) - 1, 2) == INVALID
        assert invalidate(dev.handle, foreign.handle, 0, 4096) == BAD_HANDLE
        assert invalidate(dev2.handle, buf.handle, 0, 4096) == BAD_HANDLE
        assert invalidate(0x7FFF0001, buf.handle, 0, 4096) == BAD_HANDLE
        # What a CPU wrote is what the engine reads, with or without the call (coherent).
        data = np.arange(1024, dtype=np.float32)
        src = dev.array(data)
        dst = dev.empty(1024, np.float32)
        assert invalidate(dev.handle, src.handle, 0, src.size) == OK
        q = dev.create_context().hwqueue()
        o_dst, o_src = (Operand(int(a.map_gpu()), F32, (1024,)) for a in (dst, src))
        run(dev, q, CommandBuffer().unary("relu", o_dst, o_src))
        np.testing.assert_array_equal(dst.download(), data)


def test_statistics_layout_is_pydxg_only_in_the_result() -> None:
    """The result sits at offset 24 of the 808-byte struct, 776 bytes long."""
    assert s.d3dkmt_querystatistics.result.offset == 24
    assert ctypes.sizeof(s.d3dkmt_querystatistics) == 808
    assert s.d3dkmt_querystatistics.process.offset == 16
