"""Fan-out of big GEMMs over idle engine slots (dxg.backends.fanout) as the host does it: a
buffer borrows whatever slots nobody uses, also with work queued behind it on its own queue (an
MLP's GEMMs back to back), never while other queues' jobs hold or wait for the slots or another
queue has work; a job that
comes while a slot is lent takes it back; wide matrices are cut by columns and match NumPy."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import make_stack, wait_until
from dxg.backends.fanout import MIN_FLOPS, FanOut
from dxg.backends.softcmd import CommandBuffer, DType, Operand
from dxg.client import open_node
from dxg.host.scheduler import EngineScheduler, Slot
from test_execution import Lender

N = 512  # a 512^3 GEMM: 2^28 flops, past MIN_FLOPS
assert 2 * N ** 3 >= MIN_FLOPS


def _submit(dev: Any, queue: Any, cmd: CommandBuffer) -> int:
    raw = cmd.tobytes()
    buf = dev.allocate(len(raw))
    buf.upload(raw)
    return int(queue.submit(int(buf.map_gpu()), len(raw)))


class _Gemms:
    """Operands of ``count`` N x N GEMMs on a device: C_i = A @ B_i."""

    def __init__(self, dev: Any, count: int) -> None:
        rng = np.random.default_rng(count)
        self.a = rng.standard_normal((N, N), dtype=np.float32)
        self.bs = [rng.standard_normal((N, N), dtype=np.float32) for _ in range(count)]
        self.da = dev.array(self.a)
        self.dbs = [dev.array(b) for b in self.bs]
        self.dcs = [dev.array(np.zeros((N, N), np.float32)) for _ in range(count)]

    def command(self, i: int) -> CommandBuffer:
        def op(arr: Any) -> Operand:
            return Operand(int(arr.map_gpu()), DType.F32, (N, N))

        return CommandBuffer().gemm(op(self.dcs[i]), op(self.da), op(self.dbs[i]))

    def check(self) -> None:
        for b, dc in zip(self.bs, self.dcs, strict=True):
            got = np.asarray(dc.download(), np.float32).reshape(N, N)
            np.testing.assert_allclose(got, self.a @ b, rtol=1e-3, atol=1e-2)


def _stalled(dev: Any, gate: Any, *queues: Any) -> None:
    """Each of ``queues`` waits (on the GPU) for ``gate`` to reach 1 before its next work."""
    for q in queues:
        q.wait_for(gate, 1)


def test_a_gemm_with_work_queued_behind_it_fans_out_over_idle_slots(tmp_path: Path) -> None:
    """Two GEMMs queued back to back on one queue (held by a GPU wait until both are there):
    each borrows the idle slot, the first one too, although the second waits behind it (its
    queue runs in order: the backlog could not use the slot)."""
    with make_stack(tmp_path, "fb", adapters=1) as s:
        engine = s.host.adapters[0].engine = EngineScheduler(2)
        with open_node(s.node_path) as node, node.adapters()[0].create_device() as dev:
            queue = dev.create_context().hwqueue()
            gate = dev.fence()
            g = _Gemms(dev, 2)
            _stalled(dev, gate, queue)
            done = [_submit(dev, queue, g.command(i)) for i in range(2)]
            gate.signal(1)
            queue.wait(done[-1], timeout=60)
            g.check()
        census = engine.census()
    assert census["executed"] == 2 and census["lent"] == 2, census
    assert census["borrowed"] == 0 and census["running"] == 0


def test_no_fan_out_while_other_queues_hold_or_wait_for_the_slots(tmp_path: Path) -> None:
    """One slot of two runs another job (held here) the whole time; two queues' GEMMs, released
    together, take the other slot in turn (one of them waits): none borrows anything."""
    with make_stack(tmp_path, "fn", adapters=1) as s:
        engine = s.host.adapters[0].engine = EngineScheduler(2)

        async def hold() -> Slot:
            return await engine.acquire(0)

        slot = s.host.rt.run(hold(), timeout=10)
        try:
            with open_node(s.node_path) as node, node.adapters()[0].create_device() as dev:
                q1, q2 = (dev.create_context().hwqueue() for _ in range(2))
                gate = dev.fence()
                g = _Gemms(dev, 3)
                _stalled(dev, gate, q1, q2)
                done = [(q1, _submit(dev, q1, g.command(0))), (q1, _submit(dev, q1, g.command(1))),
                        (q2, _submit(dev, q2, g.command(2)))]
                gate.signal(1)
                for q, value in done:
                    q.wait(value, timeout=60)
                g.check()
            census = engine.census()
        finally:
            s.host.rt.call(engine.release, slot)
    assert census["executed"] == 3 and census["lent"] == 0, census


def test_no_fan_out_while_another_queue_has_work_waiting(tmp_path: Path) -> None:
    """The first test again, with a second queue whose submission waits (behind a GPU wait)
    the whole time: two timelines have work, so the first queue's GEMMs keep one slot each
    (lending would only make a core run two threads once the other queue runs)."""
    with make_stack(tmp_path, "fw", adapters=1) as s:
        engine = s.host.adapters[0].engine = EngineScheduler(2)
        with open_node(s.node_path) as node, node.adapters()[0].create_device() as dev:
            queue, other = (dev.create_context().hwqueue() for _ in range(2))
            gate, later = dev.fence(), dev.fence()
            g = _Gemms(dev, 3)
            _stalled(dev, later, other)
            waiting = _submit(dev, other, g.command(2))
            _stalled(dev, gate, queue)
            done = [_submit(dev, queue, g.command(i)) for i in range(2)]
            wait_until(lambda: engine.timelines == 2, 10, "both queues' submissions counted")
            gate.signal(1)
            queue.wait(done[-1], timeout=60)
            lent = engine.census()["lent"]
            later.signal(1)
            other.wait(waiting, timeout=60)
            g.check()
        census = engine.census()
    assert lent == 0, census
    assert census["executed"] == 3 and census["timelines"] == 0, census


def test_a_job_that_comes_while_a_slot_is_lent_takes_it_back_before_the_next_piece() -> None:
    """A running job borrowed the idle slot; another queue's job then starts at once in it (it
    never waits for the lender): the helper hands the slot back without taking a piece, and the
    borrower's own thread does every piece."""
    import asyncio

    async def scenario() -> tuple[list[int], dict[str, Any], int]:
        engine = EngineScheduler(2)
        first = await engine.acquire(0)
        assert engine.try_borrow(4) == 1
        second = await asyncio.wait_for(engine.acquire(0), 10)  # not delayed by the loan
        done: list[int] = []
        pieces = [lambda i=i: done.append(i) for i in range(4)]
        with ThreadPoolExecutor(2) as pool:
            fan = FanOut(engine, pool.submit)
            await asyncio.to_thread(fan.map, pieces, 1)
        census = engine.census()
        engine.release(first)
        engine.release(second)
        return done, census, fan.helped

    done, census, helped = asyncio.run(scenario())
    assert sorted(done) == [0, 1, 2, 3] and helped == 0
    assert census["borrowed"] == 0 and census["running"] == 2


@pytest.mark.parametrize(("m", "k", "n", "batch", "trans_b"), [
    (256, 1024, 4160, 1, False),  # an MLP layer: wider than tall, cut by columns (one ragged)
    (200, 512, 1024, 1, True),  # B transposed: column blocks are row slices of its memory
    (96, 256, 768, 6, False),  # a batch of wide matrices, each cut by columns
])
def test_a_wide_gemm_is_cut_by_columns_and_matches_numpy(m, k, n, batch, trans_b):
    """Column blocks of C (B's columns with them): every row of every block is written once,
    whatever the layout of B."""
    from dxg.backends.engine import run

    rng = np.random.default_rng(m)
    a = rng.standard_normal((batch, m, k), dtype=np.float32)
    b = rng.standard_normal((batch, n, k) if trans_b else (batch, k, n), dtype=np.float32)
    mem = bytearray(a.nbytes + b.nbytes + batch * m * n * 4)
    np.frombuffer(mem, np.float32, a.size, 0)[:] = a.ravel()
    np.frombuffer(mem, np.float32, b.size, a.nbytes)[:] = b.ravel()
    c = np.frombuffer(mem, np.float32, batch * m * n, a.nbytes + b.nbytes).reshape(batch, m, n)
    c[:] = np.nan
    base = 0x10000
    cmd = CommandBuffer().gemm(
        Operand(base + a.nbytes + b.nbytes, DType.F32, (m, n)),
        Operand(base, DType.F32, (m, k)), Operand(base + a.nbytes, DType.F32, b.shape[1:]),
        trans_b=trans_b, batch=batch)

    def resolve(va: int, size: int, write: bool) -> memoryview:
        return memoryview(mem)[va - base:va - base + size]

    lender = Lender(free=3)
    with ThreadPoolExecutor(3) as pool:
        fan = FanOut(lender, pool.submit, min_flops=1 << 20)
        run(cmd.tobytes(), resolve, fanout=fan)
    wait_until(lambda: lender.out == 0, 10, "the slots given back")
    assert fan.split == 1 and lender.lent == 3
    want = np.matmul(a, b.transpose(0, 2, 1) if trans_b else b)
    np.testing.assert_allclose(c, want, rtol=1e-4, atol=1e-3)
