"""Hardware queues running command buffers on the soft engine, end to end: results against
NumPy, order within a queue, faults that stay with their device, MarkDeviceAsError, priorities,
and nothing left behind."""

from pathlib import Path

import numpy as np
import pytest

from conftest import make_stack, wait_until
from dxg.backends.softcmd import CommandBuffer, DType, Operand
from dxg.client import DxgError, open_node
from dxg.client.execution import DeviceFault

F32 = DType.of(np.float32)


def operand(mapping, shape, dtype=F32) -> Operand:
    return Operand(int(mapping), dtype, tuple(shape))


def submit(dev, queue, cmd: CommandBuffer) -> int:
    """Put ``cmd`` in an allocation mapped into the GPU VA space and submit it."""
    raw = cmd.tobytes()
    buf = dev.allocate(len(raw))
    buf.upload(raw)
    return queue.submit(int(buf.map_gpu()), len(raw))


@pytest.fixture
def stack(tmp_path: Path):
    with make_stack(tmp_path, adapters=1) as s:
        yield s


def test_a_command_buffer_runs_and_its_results_are_in_device_memory(stack):
    with open_node(stack.node_path) as node, node.adapters()[0].create_device() as dev:
        ctx = dev.create_context()
        q = ctx.hwqueue()
        a = dev.array(np.arange(256, dtype=np.float32).reshape(16, 16))
        b = dev.array(np.eye(16, dtype=np.float32) * 2)
        c = dev.empty((16, 16), np.float32)
        va, vb, vc = (x.map_gpu() for x in (a, b, c))
        cmd = CommandBuffer()
        cmd.gemm(operand(vc, (16, 16)), operand(va, (16, 16)), operand(vb, (16, 16)))
        cmd.binary("add", operand(vc, (16, 16)), operand(vc, (16, 16)), operand(va, (16, 16)))
        done = submit(dev, q, cmd)
        assert q.wait(done) >= done and q.progress >= done
        expect = np.arange(256, dtype=np.float32).reshape(16, 16) * 3
        np.testing.assert_allclose(c.download(), expect)


def test_work_runs_in_submission_order_within_a_queue(stack):
    with open_node(stack.node_path) as node, node.adapters()[0].create_device() as dev:
        q = dev.create_context().hwqueue()
        x = dev.array(np.zeros(1024, np.float32))
        one = dev.array(np.ones(1024, np.float32))
        vx, v1 = x.map_gpu(), one.map_gpu()
        for _ in range(20):  # x = x * 2 + 1, twenty times: only in order gives 2**20 - 1
            cmd = CommandBuffer()
            cmd.binary("add", operand(vx, (1024,)), operand(vx, (1024,)), operand(vx, (1024,)))
            cmd.binary("add", operand(vx, (1024,)), operand(vx, (1024,)), operand(v1, (1024,)))
            last = submit(dev, q, cmd)
        q.wait(last)
        assert np.all(x.download() == 2.0 ** 20 - 1)


def test_a_fault_stays_with_its_device(stack):
    with open_node(stack.node_path) as node:
        ad = node.adapters()[0]
        bad, good = ad.create_device(), ad.create_device()
        qb, qg = bad.create_context().hwqueue(), good.create_context().hwqueue()
        x = bad.array(np.ones(16, np.float32))
        vx = x.map_gpu()
        cmd = CommandBuffer()
        cmd.binary("add", operand(vx, (16,)), operand(vx, (16,)),
                   Operand(0x7F0000000, F32, (16,)))  # nothing mapped there
        done = submit(bad, qb, cmd)
        with pytest.raises(DeviceFault) as e:
            qb.wait(done, timeout=10)
        assert e.value.address == 0x7F0000000
        assert bad.execution_state() != 1
        with pytest.raises(DxgError):
            submit(bad, qb, CommandBuffer().nop())  # later work of that device is refused
        y = good.array(np.ones(16, np.float32))
        vy = y.map_gpu()
        cmd = CommandBuffer()
        cmd.binary("add", operand(vy, (16,)), operand(vy, (16,)), operand(vy, (16,)))
        qg.wait(submit(good, qg, cmd))  # the other device carries on
        assert np.all(y.download() == 2)


def test_a_bad_opcode_faults_the_device(stack):
    with open_node(stack.node_path) as node, node.adapters()[0].create_device() as dev:
        q = dev.create_context().hwqueue()
        raw = bytearray(CommandBuffer().nop().tobytes())
        raw[-8:-6] = (0x7777).to_bytes(2, "little")  # the nop's opcode
        buf = dev.allocate(len(raw))
        buf.upload(bytes(raw))
        done = q.submit(int(buf.map_gpu()), len(raw))
        with pytest.raises(DeviceFault):
            q.wait(done, timeout=10)


def test_mark_device_as_error(stack):
    with open_node(stack.node_path) as node, node.adapters()[0].create_device() as dev:
        q = dev.create_context().hwqueue()
        dev.mark_error()
        assert dev.execution_state() == 2  # RESET
        with pytest.raises(DeviceFault):
            dev.check()
        with pytest.raises(DxgError):
            q.submit(0x10000, 64)


def test_priorities_round_trip(stack):
    with open_node(stack.node_path) as node, node.adapters()[0].create_device() as dev:
        ctx = dev.create_context()
        ctx.set_priority(5)
        ctx.set_priority(-2, in_process=True)
        assert ctx.priority() == 5 and ctx.priority(in_process=True) == -2
        with pytest.raises(DxgError):
            ctx.set_priority(9)


def test_queues_go_with_their_context_and_process(stack):
    with open_node(stack.node_path) as node:
        dev = node.adapters()[0].create_device()
        ctx = dev.create_context()
        qs = [ctx.hwqueue() for _ in range(3)]
        assert all(q.progress == 0 for q in qs)
        ctx.close()
        (part,) = stack.host.census()["partitions"]
        procs = [p for p in part["processes"] if p["devices"]]
        assert all(not c["hwqueues"] for p in procs for d in p["devices"]
                   for c in d["contexts"])
    wait_until(lambda: not stack.host.census()["partitions"][0]["processes"], 10,
               "the process gone from the host")


def test_queues_wait_for_each_other_through_fences(stack):
    """Queue B's work waits (on the GPU timeline) for a fence queue A signals after its own
    work: B computes from what A wrote, whatever order they are submitted in."""
    with open_node(stack.node_path) as node, node.adapters()[0].create_device() as dev:
        ctx = dev.create_context()
        qa, qb = ctx.hwqueue(), dev.create_context().hwqueue()
        fence = dev.fence()
        x = dev.array(np.zeros(4096, np.float32))
        y = dev.array(np.zeros(4096, np.float32))
        ones = dev.array(np.ones(4096, np.float32))
        vx, vy, v1 = (a.map_gpu() for a in (x, y, ones))
        shape = (4096,)
        qb.wait_for(fence, 1)  # B's next work waits for A: submitted before A's
        cmd = CommandBuffer().binary("add", operand(vy, shape), operand(vx, shape),
                                     operand(vx, shape))
        done_b = submit(dev, qb, cmd)
        cmd = CommandBuffer().binary("add", operand(vx, shape), operand(vx, shape),
                                     operand(v1, shape))
        submit(dev, qa, cmd)
        qa.signal(fence, 1)
        qb.wait(done_b)
        assert np.all(y.download() == 2.0) and fence.value == 1


def test_a_cpu_wait_on_a_queue_progress_fence(stack):
    """The progress fence is a monitored fence: a CPU wait on it (WaitForSynchronizationObject
    FromCpu) returns once the queue gets there."""
    import ctypes

    from dxg.client import thunks as t
    from dxg.uapi import structs as s

    with open_node(stack.node_path) as node, node.adapters()[0].create_device() as dev:
        q = dev.create_context().hwqueue()
        x = dev.array(np.ones(1 << 16, np.float32))
        vx = x.map_gpu()
        cmd = CommandBuffer()
        for _ in range(50):
            cmd.binary("add", operand(vx, (1 << 16,)), operand(vx, (1 << 16,)),
                       operand(vx, (1 << 16,)))
        done = submit(dev, q, cmd)
        handles = (ctypes.c_uint32 * 1)(q.fence)
        values = (ctypes.c_uint64 * 1)(done)
        args = s.d3dkmt_waitforsynchronizationobjectfromcpu()
        args.device.v = dev.handle
        args.object_count = 1
        args.objects = ctypes.addressof(handles)
        args.fence_values = ctypes.addressof(values)
        assert t.D3DKMTWaitForSynchronizationObjectFromCpu(node.conn, args) == 0
        assert q.progress >= done
        assert x.download()[0] == 2.0 ** 50


def test_a_fault_wakes_the_waiters_of_its_device(stack):
    """A CPU waiter on the faulting device's fence wakes with an error instead of hanging."""
    with open_node(stack.node_path) as node, node.adapters()[0].create_device() as dev:
        q = dev.create_context().hwqueue()
        fence = dev.fence()
        cmd = CommandBuffer().copy(0x7F0000000, 0x7F0001000, 64)  # nothing mapped
        submit(dev, q, cmd)
        q.signal(fence, 1)
        with pytest.raises(DxgError):
            fence.wait(1, timeout=10)


def test_submit_command_broadcasts_to_contexts_and_fences_follow(stack):
    """SubmitCommand (the legacy, queue-less path) runs the buffer on each named context's
    timeline; a fence signalled on those contexts afterwards says it is done."""
    from dxg.client import sync
    from dxg.client import thunks as t
    from dxg.uapi import structs as s

    with open_node(stack.node_path) as node, node.adapters()[0].create_device() as dev:
        c1, c2 = dev.create_context(), dev.create_context()
        x = dev.array(np.zeros(64, np.float32))
        one = dev.array(np.ones(64, np.float32))
        vx, v1 = x.map_gpu(), one.map_gpu()
        raw = CommandBuffer().binary("add", operand(vx, (64,)), operand(vx, (64,)),
                                     operand(v1, (64,))).tobytes()
        buf = dev.allocate(len(raw))
        buf.upload(raw)
        args = s.d3dkmt_submitcommand()
        args.command_buffer = int(buf.map_gpu())
        args.command_length = len(raw)
        args.broadcast_context_count = 2
        args.broadcast_context[0].v = c1.handle
        args.broadcast_context[1].v = c2.handle
        assert t.D3DKMTSubmitCommand(node.conn, args) == 0
        f1, f2 = dev.fence(), dev.fence()
        sync.signal_from_gpu(c1, [(f1, 1)])
        sync.signal_from_gpu(c2, [(f2, 1)])
        f1.wait(1, timeout=10)
        f2.wait(1, timeout=10)
        assert np.all(x.download() == 2.0)  # once per context
        args.broadcast_context_count = 65
        assert t.D3DKMTSubmitCommand(node.conn, args) != 0


def test_the_soft_adapters_escapes(stack):
    import json
    import struct

    from dxg.backends.soft import (
        SOFT_ESCAPE,
        SOFT_ESCAPE_MAGIC,
        SOFT_ESCAPE_QUERY_ENGINE,
        SOFT_ESCAPE_VALIDATE,
    )

    with open_node(stack.node_path) as node, node.adapters()[0].create_device() as dev:
        head = SOFT_ESCAPE.pack(SOFT_ESCAPE_MAGIC, 1, SOFT_ESCAPE_QUERY_ENGINE, 0, 0)
        out = dev.escape(head + bytes(512))
        info = json.loads(out[SOFT_ESCAPE.size:].rstrip(b"\0"))
        assert info["formats"] == ["pydxg-soft-v1"] and "GEMM" in info["ops"]
        with pytest.raises(DxgError):  # too small a buffer: the size it needs comes back
            dev.escape(head + bytes(4))
        good = CommandBuffer().nop().tobytes()
        check = SOFT_ESCAPE.pack(SOFT_ESCAPE_MAGIC, 1, SOFT_ESCAPE_VALIDATE, 0, 0)
        dev.escape(check + good)
        bad = bytearray(good)
        bad[-8:-6] = (0x7777).to_bytes(2, "little")
        with pytest.raises(DxgError):
            dev.escape(check + bytes(bad))
        assert struct.unpack_from("<I", out, 12)[0] == len(out[SOFT_ESCAPE.size:].rstrip(b"\0"))


def _gemm_job(dev, n: int, reps: int):
    a = dev.array(np.ones((n, n), np.float32))
    c = dev.empty((n, n), np.float32)
    va, vc = a.map_gpu(), c.map_gpu()
    cmd = CommandBuffer()
    for _ in range(reps):
        cmd.gemm(operand(vc, (n, n)), operand(va, (n, n)), operand(va, (n, n)))
    return cmd, c


def test_queues_run_side_by_side(stack):
    """Two queues' command buffers run at the same time (each on a worker thread), up to the
    adapter's execution slots."""
    with open_node(stack.node_path) as node, node.adapters()[0].create_device() as dev:
        jobs = []
        for _ in range(2):
            q = dev.create_context().hwqueue()
            cmd, c = _gemm_job(dev, 512, 40)
            jobs.append((q, submit(dev, q, cmd), c))
        for q, done, c in jobs:
            q.wait(done, timeout=60)
            assert c.download()[0, 0] == 512.0
        (adapter,) = stack.host.census()["adapters"]
        engine = adapter["scheduler"]
        assert engine["peak"] == min(2, engine["slots"]) and engine["running"] == 0


def test_a_fault_in_one_process_leaves_another_running(stack):
    with open_node(stack.node_path) as one, open_node(stack.node_path) as two:
        bad = one.adapters()[0].create_device()
        good = two.adapters()[0].create_device()
        qb, qg = bad.create_context().hwqueue(), good.create_context().hwqueue()
        done = submit(bad, qb, CommandBuffer().copy(0x7F0000000, 0x7F0001000, 64))
        with pytest.raises(DeviceFault):
            qb.wait(done, timeout=10)
        cmd, c = _gemm_job(good, 64, 1)
        qg.wait(submit(good, qg, cmd))
        assert c.download()[0, 0] == 64.0 and good.execution_state() == 1


KILLED = r"""
import json, sys
import numpy as np
from dxg.backends.softcmd import CommandBuffer, DType, Operand
from dxg.client import open_node
node = open_node(sys.argv[1])
dev = node.adapters()[0].create_device()
q = dev.create_context().hwqueue()
a = dev.array(np.ones((768, 768), np.float32)); c = dev.empty((768, 768), np.float32)
va, vc = int(a.map_gpu()), int(c.map_gpu())
f32 = DType.of(np.float32)
cmd = CommandBuffer()
for _ in range(200):
    cmd.gemm(Operand(vc, f32, (768, 768)), Operand(va, f32, (768, 768)), Operand(va, f32, (768, 768)))
raw = cmd.tobytes(); buf = dev.allocate(len(raw)); buf.upload(raw)
vb = int(buf.map_gpu())
for _ in range(4):
    q.submit(vb, len(raw))
print(json.dumps({"submitted": 4}), flush=True)
sys.stdin.read()
"""


def test_a_process_killed_mid_execution_leaves_nothing_and_the_host_serves_on(stack):
    import subprocess
    import sys

    from conftest import read_json_line

    proc = subprocess.Popen([sys.executable, "-c", KILLED, stack.node_path],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        read_json_line(proc, 60)
        wait_until(lambda: stack.host.census()["adapters"][0]["scheduler"]["running"] > 0, 30,
                   "its work running")
        proc.kill()
        proc.wait(10)
        wait_until(lambda: not stack.host.census()["partitions"][0]["processes"], 30,
                   "the killed process gone from the host")
        wait_until(lambda: stack.host.census()["adapters"][0]["scheduler"]["running"] == 0, 30,
                   "its work stopped")
        assert stack.host.census()["adapters"][0]["memory"]["local"]["used"] == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    with open_node(stack.node_path) as node, node.adapters()[0].create_device() as dev:
        q = dev.create_context().hwqueue()
        cmd, c = _gemm_job(dev, 32, 1)
        q.wait(submit(dev, q, cmd))  # the host serves on
        assert c.download()[0, 0] == 32.0


def test_the_engine_holds_the_memory_it_works_on():
    """NumPy keeps only the exporter of an array made on a buffer; the engine holds the views
    it resolved until its run ends, so the memory's owner cannot unmap it under the engine
    (the host closes a block of a process that died while its work runs)."""
    import mmap as mmap_mod

    from dxg.backends.engine import run

    m = mmap_mod.mmap(-1, 1 << 18)
    closes: list[str] = []

    def resolve(va: int, n: int, write: bool) -> memoryview:
        if closes == [] and va == 0x20000:  # a later operand: the first ones are in use
            try:
                m.close()
                closes.append("closed")
            except BufferError:
                closes.append("refused")
        return memoryview(m)[va - 0x10000 : va - 0x10000 + n]

    cmd = CommandBuffer().binary("add", Operand(0x10000, F32, (16,)), Operand(0x10000, F32, (16,)),
                                 Operand(0x20000, F32, (16,)))
    run(cmd.tobytes(), resolve)
    assert closes == ["refused"]
    m.close()


def test_dxg_ps_shows_queues_and_work(stack):
    import json
    import subprocess
    import sys

    with open_node(stack.node_path) as node, node.adapters()[0].create_device() as dev:
        q = dev.create_context().hwqueue()
        cmd, _c = _gemm_job(dev, 16, 1)
        q.wait(submit(dev, q, cmd))
        q.wait(submit(dev, q, cmd))
        out = subprocess.run([sys.executable, "-m", "dxg.cli.main", "ps", "--json", "--node",
                              stack.node_path], capture_output=True, text=True, check=True)
        procs = json.loads(out.stdout)["snapshot"]["processes"]
        links = [link for p in procs for link in p["adapters"] if link.get("queues")]
        assert [(link["queues"], link["executed"]) for link in links] == [(1, 2)]


def test_work_queued_for_a_destroyed_context_never_runs(stack):
    """SubmitCommand work parked behind a GPU wait that is never satisfied does not run once
    its context is destroyed (the wait goes with the context)."""
    from dxg.client import sync
    from dxg.client import thunks as t
    from dxg.uapi import structs as s

    with open_node(stack.node_path) as node, node.adapters()[0].create_device() as dev:
        ctx = dev.create_context()
        gate = dev.fence()
        sync.wait_from_gpu(ctx, [(gate, 1)])  # never signalled
        x = dev.array(np.zeros(64, np.float32))
        one = dev.array(np.ones(64, np.float32))
        vx, v1 = x.map_gpu(), one.map_gpu()
        raw = CommandBuffer().binary("add", operand(vx, (64,)), operand(vx, (64,)),
                                     operand(v1, (64,))).tobytes()
        buf = dev.allocate(len(raw))
        buf.upload(raw)
        args = s.d3dkmt_submitcommand()
        args.command_buffer = int(buf.map_gpu())
        args.command_length = len(raw)
        args.broadcast_context_count = 1
        args.broadcast_context[0].v = ctx.handle
        assert t.D3DKMTSubmitCommand(node.conn, args) == 0
        ctx.close()
        # a later context's signal says the lane of the dead context drained
        other = dev.create_context()
        done = dev.fence()
        sync.signal_from_gpu(other, [(done, 1)])
        done.wait(1, timeout=10)
        wait_until(lambda: stack.host.census()["adapters"][0]["scheduler"]["running"] == 0, 10,
                   "nothing running")
        assert np.all(x.download() == 0) and dev.execution_state() == 1


def test_a_gpu_wait_names_at_most_32_objects(stack):
    import ctypes

    from dxg.client import thunks as t
    from dxg.uapi import structs as s

    with open_node(stack.node_path) as node, node.adapters()[0].create_device() as dev:
        ctx = dev.create_context()
        fences = [dev.fence() for _ in range(33)]
        handles = (ctypes.c_uint32 * 33)(*(f.handle for f in fences))
        values = (ctypes.c_uint64 * 33)(*([1] * 33))
        args = s.d3dkmt_waitforsynchronizationobjectfromgpu()
        args.context.v = ctx.handle
        args.object_count = 33
        args.objects = ctypes.addressof(handles)
        args.monitored_fence_values = ctypes.addressof(values)
        assert t.D3DKMTWaitForSynchronizationObjectFromGpu(node.conn, args) != 0


# ---- fan-out: a lone big op spread over idle engine slots ----------------------------------------


class Lender:
    """A stand-in for the engine scheduler: ``free`` slots to lend, ``wanted`` on demand."""

    def __init__(self, free: int, wanted: bool = False) -> None:
        import threading

        self.free = free
        self.out = 0
        self.lent = 0
        self.want = wanted
        self.lock = threading.Lock()

    def try_borrow(self, most: int) -> int:
        with self.lock:
            n = max(0, min(most, self.free - self.out))
            self.out += n
            self.lent += n
            return n

    def give_back(self, n: int = 1) -> None:
        with self.lock:
            assert 0 < n <= self.out
            self.out -= n

    def wanted(self) -> bool:
        return self.want


def _engine_gemm(m: int, k: int, n: int, batch: int = 1, trans_a: bool = False,
                 seed: int = 0):
    """A GEMM command buffer over memory of its own: (buffer, resolve, a, b, c) with C as a
    NumPy view of the memory the engine writes."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((batch, k, m) if trans_a else (batch, m, k), dtype=np.float32)
    b = rng.standard_normal((batch, k, n), dtype=np.float32)
    mem = bytearray(a.nbytes + b.nbytes + batch * m * n * 4)
    np.frombuffer(mem, np.float32, a.size, 0)[:] = a.ravel()
    np.frombuffer(mem, np.float32, b.size, a.nbytes)[:] = b.ravel()
    c = np.frombuffer(mem, np.float32, batch * m * n, a.nbytes + b.nbytes).reshape(batch, m, n)
    base = 0x10000
    cmd = CommandBuffer().gemm(
        Operand(base + a.nbytes + b.nbytes, F32, (m, n)),
        Operand(base, F32, a.shape[1:]), Operand(base + a.nbytes, F32, (k, n)),
        trans_a=trans_a, batch=batch)

    def resolve(va: int, size: int, write: bool) -> memoryview:
        return memoryview(mem)[va - base:va - base + size]

    want = np.matmul(a.transpose(0, 2, 1) if trans_a else a, b)
    return cmd.tobytes(), resolve, want, c


@pytest.mark.parametrize(("m", "k", "n", "batch", "trans_a"), [
    (520, 512, 384, 1, False),  # rows in blocks of 64, the last one ragged
    (384, 640, 512, 1, True),  # A transposed: row blocks are column slices of its memory
    (48, 512, 512, 12, False),  # too few rows for blocks: the batch is split
    (200, 256, 256, 5, False),  # a batch of matrices, each split by rows
])
def test_the_engine_fans_a_big_gemm_out_and_matches_numpy(m, k, n, batch, trans_a):
    from concurrent.futures import ThreadPoolExecutor

    from dxg.backends.engine import run
    from dxg.backends.fanout import FanOut

    buffer, resolve, want, c = _engine_gemm(m, k, n, batch, trans_a)
    lender = Lender(free=3)
    with ThreadPoolExecutor(3) as pool:
        fan = FanOut(lender, pool.submit, lambda: True, min_flops=1 << 20)
        run(buffer, resolve, fanout=fan)
    assert fan.split == 1 and lender.lent == 3 and lender.out == 0
    np.testing.assert_allclose(c, want, rtol=1e-4, atol=1e-3)


def test_no_fan_out_for_a_small_op_a_queue_with_a_backlog_or_no_idle_slot():
    from concurrent.futures import ThreadPoolExecutor

    from dxg.backends.engine import run
    from dxg.backends.fanout import FanOut

    buffer, resolve, want, c = _engine_gemm(256, 256, 256)  # 2^25 flops
    with ThreadPoolExecutor(2) as pool:
        for lender, lone, floor in ((Lender(2), True, 1 << 26),  # too small
                                    (Lender(2), False, 1 << 20),  # work behind it
                                    (Lender(0), True, 1 << 20)):  # no slot idle
            fan = FanOut(lender, pool.submit, lambda lone=lone: lone, min_flops=floor)
            c[:] = 0
            run(buffer, resolve, fanout=fan)
            assert fan.split == 0 and lender.lent == 0
            np.testing.assert_allclose(c, want, rtol=1e-4, atol=1e-3)


def test_fan_out_spans_cover_the_range_once_in_aligned_blocks():
    from concurrent.futures import ThreadPoolExecutor

    from dxg.backends.fanout import FanOut

    seen: list[tuple[int, int]] = []
    lender = Lender(free=3)
    with ThreadPoolExecutor(3) as pool:
        fan = FanOut(lender, pool.submit, lambda: True, min_flops=100)
        assert fan.spans(1000, 100, lambda lo, hi: seen.append((lo, hi)), align=8)
        assert not fan.spans(99, 100, lambda lo, hi: seen.append((-1, -1)))  # too small
    assert sorted(seen) == [(0, 24), (24, 48), (48, 72), (72, 100)]
    assert lender.lent == 3 and lender.out == 0 and fan.split == 1


def test_fan_out_finishes_alone_when_no_helper_starts_and_returns_every_slot():
    """Helpers pull pieces: when the pool never runs them (busy), the engine's own thread does
    every piece and gives their slots back; when a waiter wants a slot, a helper that starts
    gives its slot back before taking a piece."""
    from concurrent.futures import Future, ThreadPoolExecutor

    from dxg.backends.fanout import FanOut

    done: list[int] = []
    pieces = [lambda i=i: done.append(i) for i in range(5)]
    never: list[Future[None]] = []

    def stuck(fn):  # a pool whose threads are all busy: the work never starts
        never.append(Future())
        return never[-1]

    lender = Lender(free=4)
    fan = FanOut(lender, stuck, lambda: True)
    assert lender.try_borrow(4) == 4
    fan.map(pieces, 4)
    assert sorted(done) == list(range(5)) and lender.out == 0 and fan.helped == 0
    assert all(f.cancelled() for f in never)

    for wanted, lone in ((True, True), (False, False)):  # a job wants the slot; work came
        done.clear()  # behind the op on its queue: helpers give their slots back at once
        lender = Lender(free=2, wanted=wanted)
        with ThreadPoolExecutor(2) as pool:
            fan = FanOut(lender, pool.submit, lambda lone=lone: lone)
            assert lender.try_borrow(2) == 2
            fan.map(pieces, 2)
        assert sorted(done) == list(range(5)) and lender.out == 0 and fan.helped == 0


def test_a_failing_piece_fails_the_op_and_still_returns_the_slots():
    from concurrent.futures import ThreadPoolExecutor

    from dxg.backends.fanout import FanOut

    def bad() -> None:
        raise ValueError("piece failed")

    lender = Lender(free=2)
    with ThreadPoolExecutor(2) as pool:
        fan = FanOut(lender, pool.submit, lambda: True)
        assert lender.try_borrow(2) == 2
        with pytest.raises(ValueError, match="piece failed"):
            fan.map([bad, lambda: None, bad], 2)
    wait_until(lambda: lender.out == 0, 10, "the slots given back")


def test_borrowed_slots_are_counted_never_held_against_jobs_and_waiters_go_by_priority():
    """Slots are lent only while idle and nobody waits; a job that comes while a slot is lent
    takes it at once (the borrower is told it is wanted); jobs that wait are served by
    priority; borrows and returns come from other threads."""
    import asyncio
    import threading

    from dxg.host.scheduler import EngineScheduler

    async def scenario() -> list[str]:
        engine = EngineScheduler(2)
        first = await engine.acquire(0)  # a job runs in one slot
        assert engine.try_borrow(4) == 1  # it borrows the other, idle one
        c = engine.census()
        assert (c["running"], c["borrowed"], c["lent"]) == (1, 1, 1) and not engine.wanted()
        second = await asyncio.wait_for(engine.acquire(0), 10)  # not delayed by the lent slot
        assert engine.wanted() and engine.try_borrow(1) == 0
        order: list[str] = []
        slots = {}

        async def job(name: str, priority: int) -> None:
            slots[name] = await engine.acquire(priority)
            order.append(name)

        low = asyncio.ensure_future(job("low", -3))
        high = asyncio.ensure_future(job("high", 5))
        while engine.waiting < 2:  # both parked: every slot runs a job
            await asyncio.sleep(0)
        t = threading.Thread(target=engine.give_back)  # the helper thread's return
        t.start()
        t.join()
        assert engine.census()["borrowed"] == 0 and engine.wanted()  # (they still wait)
        engine.release(first)  # a job ends: the most urgent waiter gets its slot
        await asyncio.wait_for(high, 10)
        assert order == ["high"]
        engine.release(second)
        await asyncio.wait_for(low, 10)
        engine.release(slots["high"])
        engine.release(slots["low"])
        c = engine.census()
        assert (c["running"], c["borrowed"], c["waiting"], c["executed"]) == (0, 0, 0, 4)
        assert c["peak"] == 2 and c["lent"] == 1
        return order

    assert asyncio.run(scenario()) == ["high", "low"]


def _big_gemm(dev, m: int, k: int, n: int, seed: int):
    rng = np.random.default_rng(seed)
    a_h = rng.standard_normal((m, k), dtype=np.float32)
    b_h = rng.standard_normal((k, n), dtype=np.float32)
    a, b, c = dev.array(a_h), dev.array(b_h), dev.empty((m, n), np.float32)
    va, vb, vc = (x.map_gpu() for x in (a, b, c))
    cmd = CommandBuffer().gemm(operand(vc, (m, n)), operand(va, (m, k)), operand(vb, (k, n)))
    return cmd, c, a_h @ b_h


def test_a_lone_big_gemm_is_split_over_idle_engine_slots(stack):
    """A synchronous user's big GEMM (its queue has nothing behind it) borrows the adapter's
    idle slots; they are back once it is done, and C is NumPy's."""
    from dxg.host.scheduler import EngineScheduler

    adapter = stack.host.adapters[0]
    adapter.engine = EngineScheduler(4)  # as on a 4-core host, whatever this machine has
    with open_node(stack.node_path) as node, node.adapters()[0].create_device() as dev:
        q = dev.create_context().hwqueue()
        cmd, c, want = _big_gemm(dev, 1000, 512, 640, 1)
        q.wait(submit(dev, q, cmd), timeout=60)
        np.testing.assert_allclose(c.download(), want, rtol=1e-4, atol=1e-3)
    engine = stack.host.census()["adapters"][0]["scheduler"]
    assert engine["lent"] == 3 and engine["executed"] == 1
    wait_until(lambda: stack.host.census()["adapters"][0]["scheduler"]["borrowed"] == 0, 10,
               "the borrowed slots given back")


def _hwqueues(census) -> list[dict]:
    """Every hardware queue in a host census, wherever it is nested."""
    if isinstance(census, dict):
        found = list(census.get("hwqueues", []))
        return found + [q for k, v in census.items() if k != "hwqueues" for q in _hwqueues(v)]
    if isinstance(census, list):
        return [q for v in census for q in _hwqueues(v)]
    return []


def test_a_backlogged_queues_gemms_still_borrow_the_idle_slots(stack):
    """GEMMs with work queued behind them on their queue (held behind a fence until all are
    queued) borrow the idle slots all the same: the queue runs in order, so its backlog could
    not use them (an MLP's GEMMs back to back); still one job runs at a time."""
    from dxg.host.scheduler import EngineScheduler

    stack.host.adapters[0].engine = EngineScheduler(4)
    with open_node(stack.node_path) as node, node.adapters()[0].create_device() as dev:
        q = dev.create_context().hwqueue()
        gate = dev.fence()
        q.wait_for(gate, 1)  # nothing runs until all are submitted
        jobs = [_big_gemm(dev, 512, 512, 512, seed) for seed in range(3)]
        for cmd, _c, _want in jobs:
            submit(dev, q, cmd)
        x = dev.array(np.zeros(16, np.float32))
        vx = x.map_gpu()
        last = submit(dev, q, CommandBuffer().binary("add", operand(vx, (16,)),  # small, lone
                                                     operand(vx, (16,)), operand(vx, (16,))))
        wait_until(lambda: [h["queued"] for h in _hwqueues(stack.host.census())] == [4], 10,
                   "the four submissions at the host")
        gate.signal(1)
        q.wait(last, timeout=60)
        for _cmd, c, want in jobs:
            np.testing.assert_allclose(c.download(), want, rtol=1e-4, atol=1e-3)
    engine = stack.host.census()["adapters"][0]["scheduler"]
    assert engine["lent"] == 9 and engine["executed"] == 4 and engine["peak"] == 1
