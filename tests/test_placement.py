"""Allocation priority at work (dxg.host.placement), end to end through the node: when the local
segment group is over-committed, lower priorities make way for higher ones; a raised priority
and a queue's work bring demoted memory back; contents and GPU VAs never change; QueryStatistics
counts the bytes moved. Real client processes where the test is about processes."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_stack
from dxg.backends.softcmd import CommandBuffer, DType, Operand
from dxg.client import Residency, open_node
from dxg.uapi.memory import (
    GROUP_LOCAL,
    GROUP_NONLOCAL,
    PRIORITY_HIGH,
    PRIORITY_LOW,
    PRIORITY_NORMAL,
)
from dxg.uapi.statistics import QUERY_ADAPTER, QUERY_PROCESS_ADAPTER
from test_statistics import stats

MIB = 1 << 20
GPU = Residency.RESIDENT_IN_GPU_MEMORY
SHARED = Residency.RESIDENT_IN_SHARED_MEMORY
F32 = DType.of(np.float32)


@pytest.fixture
def stack(tmp_path: Path):
    with make_stack(tmp_path, adapters=1, dedicated_memory_mb=8, shared_memory_mb=64) as s:
        yield s


def used(adapter, group: int = GROUP_LOCAL) -> int:
    return adapter.video_memory_info(group).current_usage


def run_nop(dev, queue) -> None:
    """A command buffer on ``queue`` (its buffer allocation is non-local, so it takes no local
    room), waited for."""
    raw = CommandBuffer().nop().tobytes()
    buf = dev.allocate(len(raw), non_local=True)
    buf.upload(raw)
    queue.wait(queue.submit(int(buf.map_gpu()), len(raw)))


def test_equal_priorities_are_first_come_first_served(stack):
    with open_node(stack.node_path) as node:
        ad = node.adapters()[0]
        dev = ad.create_device()
        a = dev.allocate(6 * MIB)
        b = dev.allocate(4 * MIB)  # no room left in local, nobody of lower priority
        assert (a.residency(), b.residency()) == (GPU, SHARED)
        assert (used(ad), used(ad, GROUP_NONLOCAL)) == (6 * MIB, 4 * MIB)


def test_a_higher_priority_demotes_a_lower_one_and_the_queue_brings_it_back(stack):
    with open_node(stack.node_path) as node:
        ad = node.adapters()[0]
        dev_lo, dev_hi = ad.create_device(), ad.create_device()
        q_lo = dev_lo.create_context().hwqueue()
        lo = dev_lo.array(np.arange(6 * MIB // 4, dtype=np.float32))
        lo.priority = PRIORITY_LOW
        va = lo.map_gpu()
        hi = dev_hi.allocate(4 * MIB)  # NORMAL > LOW: it takes the local group
        assert (lo.residency(), hi.residency()) == (SHARED, GPU)
        assert (used(ad), used(ad, GROUP_NONLOCAL)) == (4 * MIB, 6 * MIB)
        np.testing.assert_array_equal(lo.download(), np.arange(6 * MIB // 4, dtype=np.float32))
        # The queue's work does not bring it back while there is no room...
        run_nop(dev_lo, q_lo)
        assert lo.residency() == SHARED
        # ...and does once there is, without waiting for anything else.
        hi.close()
        run_nop(dev_lo, q_lo)
        assert lo.residency() == GPU and used(ad) == 6 * MIB
        # Contents and the GPU VA are the same memory all along: work on it sees it.
        cmd = CommandBuffer().binary("add", Operand(int(va), F32, (6 * MIB // 4,)),
                                     Operand(int(va), F32, (6 * MIB // 4,)),
                                     Operand(int(va), F32, (6 * MIB // 4,)))
        raw = cmd.tobytes()
        buf = dev_lo.allocate(len(raw), non_local=True)
        buf.upload(raw)
        q_lo.wait(q_lo.submit(int(buf.map_gpu()), len(raw)))
        np.testing.assert_array_equal(lo.download(),
                                      2 * np.arange(6 * MIB // 4, dtype=np.float32))
        record = stats(node, ad, QUERY_PROCESS_ADAPTER, os.getpid())
        assert (record.demoted_bytes, record.promoted_bytes) == (6 * MIB, 6 * MIB)


def test_raising_a_priority_promotes_at_once_and_demotes_lower_ones(stack):
    with open_node(stack.node_path) as node:
        ad = node.adapters()[0]
        dev = ad.create_device()
        a = dev.allocate(6 * MIB)
        a.priority = PRIORITY_LOW
        b = dev.allocate(6 * MIB)  # NORMAL: demotes a
        assert (a.residency(), b.residency()) == (SHARED, GPU)
        dev.set_priority([a], PRIORITY_HIGH)  # now a outranks b: they swap
        assert (a.residency(), b.residency()) == (GPU, SHARED)
        dev.set_priority([b], PRIORITY_NORMAL)  # not above a: nothing moves
        assert (a.residency(), b.residency()) == (GPU, SHARED)
        # Lowering a priority moves nothing by itself: demotion happens only when room is
        # needed.
        dev.set_priority([a], PRIORITY_LOW)
        assert a.residency() == GPU
        assert used(ad) == 6 * MIB and used(ad, GROUP_NONLOCAL) == 6 * MIB


def test_nothing_moves_when_the_room_cannot_be_made(stack):
    with open_node(stack.node_path) as node:
        ad = node.adapters()[0]
        dev = ad.create_device()
        low = dev.allocate(2 * MIB)
        low.priority = PRIORITY_LOW
        normal = dev.allocate(5 * MIB)
        # 7 MiB of local memory: demoting `low` alone cannot make room for 8 MiB.
        big = dev.allocate(8 * MIB)
        assert (low.residency(), normal.residency(), big.residency()) == (GPU, GPU, SHARED)
        record = stats(node, ad, QUERY_PROCESS_ADAPTER, os.getpid())
        assert record.demoted_bytes == 0


CHILD = r"""
import sys
from dxg.client import open_node
from dxg.uapi.memory import PRIORITY_LOW
node = open_node(sys.argv[1])
dev = node.adapters()[0].create_device()
a = dev.allocate(6 << 20)
a.upload(b"kept" * 1024)
a.priority = PRIORITY_LOW
print("ready", flush=True)
sys.stdin.readline()
print(a.residency().name, a.download(4096) == b"kept" * 1024, flush=True)
sys.stdin.readline()
"""


def test_another_process_of_lower_priority_makes_way_and_its_counts_are_its_own(stack):
    child = subprocess.Popen([sys.executable, "-c", CHILD, stack.node_path],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        with open_node(stack.node_path) as node:
            ad = node.adapters()[0]
            dev = ad.create_device()
            mine = dev.allocate(6 * MIB)
            assert mine.residency() == GPU
            child.stdin.write("\n")
            child.stdin.flush()
            assert child.stdout.readline().split() == ["RESIDENT_IN_SHARED_MEMORY", "True"]
            me = stats(node, ad, QUERY_PROCESS_ADAPTER, os.getpid())
            them = stats(node, ad, QUERY_PROCESS_ADAPTER, child.pid)
            assert (me.demoted_bytes, them.demoted_bytes) == (0, 6 * MIB)
            child.stdin.write("\n")
            child.stdin.flush()
            assert child.wait(30) == 0
            # The process went (or is going): its counts stay with the adapter.
            assert stats(node, ad, QUERY_ADAPTER).demoted_bytes == 6 * MIB
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
