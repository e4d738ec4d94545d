"""The execution benchmark: command buffers run by the soft engine on hardware queues, against
the same work done in-process with NumPy, small submissions one by one against batched or
asynchronous ones, a fence's signal-to-wake latency against a raw Unix-socket round trip, two
queues against one, and a high-priority queue's latency beside a low-priority flood. One
command, one run, a table per part with its target:

    .venv/bin/python bench/execution.py [--quick] [--json FILE] [--skip e1,e2,...]

Everything runs against `dxg up` (the embedded default, a local link: allocations are shared
memory) started by the bench in a child process; the flood of E5 comes from another child
process. The client API is used directly (dxg.client: device.array/empty/allocate, map_gpu,
context.hwqueue, device.fence); command buffers are dxg.backends.softcmd.CommandBuffer bytes
put once in an allocation mapped at a GPU VA and submitted by that VA. Measurements that are
compared are interleaved in rounds (a window of each in turn, the order swapped every round), so
the noise of a busy 2-core machine hits both sides of a ratio alike; each window starts after
0.2 s idle (this process's OpenBLAS threads spin ~0.1 s after a call: without it, the side
measured right after a NumPy GEMM loses a core to them). The header says how many cores other processes
kept busy on average during the run (from /proc/stat, less this process and its children): a
run with much of it is noise, not pydxg. A part that fails prints its error.

The engine model measured (docs/execution.md): the host runs BLAS single-threaded (`dxg up` and
`dxg host` set it at start-up) and each command buffer runs in one engine slot, one core
(dxg.host.scheduler); a big GEMM whose queue has nothing waiting behind it (a synchronous user)
borrows the idle slots and runs in row blocks on all of them at once (dxg.backends.fanout),
while a queue with a backlog keeps one core and gets its parallelism from other queues.

Two ways of waiting for a queue appear: ``q.wait`` (the client API: it reads the progress
fence's shared page, and makes a blocking CPU wait on the fence when the work is not done yet)
and a raw CPU wait on the progress fence (WaitForSynchronizationObjectFromCpu on ``q.fence``: blocks in the driver until
the host signals it; the page is read first, so one already reached costs no call).

Measured:
  E1  GEMM 2048 x 2048 f32 on data already on the device (A, B, C uploaded and mapped once; one
      command-buffer allocation reused): per iteration one submission and its wait, with
      ``q.wait`` and with the CPU fence wait, against np.matmul(A, B, out=C) in this process on
      preallocated, touched arrays (this process's BLAS on every core). p50/p99 ms, GFLOP/s at
      the p50, ratio = NumPy p50 / pydxg p50. Target >= 0.97. Checked: C against NumPy's. The
      host's side is the fan-out: the queue is idle behind the GEMM, so it runs as row blocks
      on every engine slot (with one core per block: the host's BLAS is single-threaded).
  E2  N small ops (N = 10,000; 1,000 with --quick), each an in-place add of 256 f32 (x += one,
      so x == N afterwards proves every op ran, in order): one submission + one wait per op
      (``q.wait``, and the CPU fence wait), against asynchronous submissions (N submissions of
      the one-op buffer, no wait between them, one wait at the end; at most 1024 in flight, as
      a queue takes at most 4096) and one batched buffer of N commands (one submission, one
      wait). Time per op, ratio = sync time / batched (or async) time. Target >= 20.
  E3  A monitored fence's signal-to-wake latency: a thread parked in ``fence.wait(v)`` (in the
      driver: the bench waits 2 ms after handing it ``v``), another thread of the same process
      calls ``fence.signal(v)``; from just before the signal to the waiter's return. Also the
      signal call alone, and the eventfd form (``fence.eventfd_wait(v)``, the waiter blocked in
      select on the eventfd). Against a raw Unix-socket round trip (64 B to a forked Python
      echo, as bench/runtime.py measures it), and the same round trip made after 2 ms idle (the
      floor a wake after idling pays: both processes were asleep). p50/p99 us, ratio to the raw
      round trip. Reported (no target in the issue).
  E4  N GEMMs 1024 x 1024 f32 (N = 32; 8 with --quick) on one hardware queue against N/2 on
      each of two queues (two contexts of one device), all submitted at once, then waited:
      GEMMs/s, each way against the machine's best in-process NumPy rate (the best of the four
      NumPy lines below). Target >= 0.8 for both: the cores are used whether a user has one
      queue or two. The host's BLAS is single-threaded, one engine slot per core; a GEMM fans
      out over the idle slots while its queue is the adapter's only one with work (also with
      GEMMs behind it), so one queue uses every core, and two busy queues one slot each (the
      ratio two / one, printed too, is about 1 since this change; it was the target, >= 1.7,
      while one queue ran on one core). Beside it the machine's own ceiling, the same N
      np.matmul on one thread of this process against N/2 on each of two threads: with this
      process's BLAS on every core (as a NumPy user has it: one GEMM already takes both, two
      threads add nothing) and single-threaded (threadpoolctl; as the host's engine runs).
  E5  A high-priority queue's latency while another process floods the adapter with 1024 x 1024
      GEMMs on 4 queues of one context, each kept 2 submissions deep: the small op of E2
      submitted and waited (CPU fence wait) at random intervals (0..5 ms apart), p50/p99 ms,
      with context priorities high = 7 / flood = -7, against both 0 (the same flood), windows
      interleaved; and the same small op on an idle adapter (before the flood). Also the
      flood's GEMMs/s in each kind of window. Reported (no target in the issue).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import select
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import cpu_busy, pct, start_up, stop_up, timed

GEMM_TARGET = 0.97
BATCH_TARGET = 20.0
CORES_TARGET = 0.8  # E4: each way against NumPy's best in-process rate
SMALL = 256  # elements of a small op
MAX_IN_FLIGHT = 1024  # asynchronous submissions outstanding on one queue (it takes 4096)


def stats(samples: list[float]) -> dict[str, Any]:
    return {"p50": pct(samples, 0.5), "p99": pct(samples, 0.99), "n": len(samples)}


def median(xs: list[float]) -> float:
    return pct(xs, 0.5)


# ---- the client ----------------------------------------------------------------------------------


class Gpu:
    """A device on the node's first adapter; arrays on it mapped at GPU VAs, command buffers put
    in allocations once and submitted by VA."""

    def __init__(self, node: str) -> None:
        from dxg.client import open_node

        self.node = open_node(node)
        self.dev = self.node.adapters()[0].create_device()

    def array(self, data: np.ndarray) -> tuple[Any, int]:
        """A device array holding ``data`` and its GPU VA."""
        a = self.dev.array(data)
        return a, int(a.map_gpu())

    def empty(self, shape: tuple[int, ...]) -> tuple[Any, int]:
        a = self.dev.empty(shape, np.float32)
        return a, int(a.map_gpu())

    def command(self, cb: Any) -> tuple[int, int]:
        """``cb``'s bytes in an allocation mapped at a GPU VA: (va, length)."""
        raw = cb.tobytes()
        buf = self.dev.allocate(len(raw))
        buf.upload(raw)
        return int(buf.map_gpu()), len(raw)

    def queue(self, priority: int | None = None) -> tuple[Any, Any]:
        ctx = self.dev.create_context()
        if priority is not None:
            ctx.set_priority(priority)
        return ctx, ctx.hwqueue()

    def close(self) -> None:
        self.dev.close()
        self.node.close()


class FenceWait:
    """A CPU wait on a queue's progress fence (WaitForSynchronizationObjectFromCpu), the
    arguments made once; the shared page is read first (no call when already reached)."""

    def __init__(self, gpu: Gpu, q: Any) -> None:
        from dxg.client import thunks
        from dxg.uapi import structs as s

        self.t = thunks
        self.conn = gpu.node.conn
        self.q = q
        self.handles = (ctypes.c_uint32 * 1)(q.fence)
        self.values = (ctypes.c_uint64 * 1)(0)
        self.args = s.d3dkmt_waitforsynchronizationobjectfromcpu()
        self.args.device.v = gpu.dev.handle
        self.args.object_count = 1
        self.args.objects = ctypes.addressof(self.handles)
        self.args.fence_values = ctypes.addressof(self.values)
        self.page = ctypes.c_uint64.from_address(q.fence_address)

    def __call__(self, value: int) -> None:
        if self.page.value >= value:
            return
        self.values[0] = value
        status = self.t.D3DKMTWaitForSynchronizationObjectFromCpu(self.conn, self.args)
        if status != 0:
            raise RuntimeError(f"WaitForSynchronizationObjectFromCpu: 0x{status & 0xFFFFFFFF:x}")


def op(va: int, shape: tuple[int, ...]) -> Any:
    from dxg.backends.softcmd import Operand

    return Operand(va, np.float32, shape)


def gemm_buffer(vc: int, va: int, vb: int, n: int) -> Any:
    from dxg.backends.softcmd import CommandBuffer

    return CommandBuffer().gemm(op(vc, (n, n)), op(va, (n, n)), op(vb, (n, n)))


def add_buffer(vx: int, v1: int, count: int = 1) -> Any:
    """``count`` in-place adds x += one (SMALL f32 each)."""
    from dxg.backends.softcmd import CommandBuffer

    cb = CommandBuffer()
    x, one = op(vx, (SMALL,)), op(v1, (SMALL,))
    for _ in range(count):
        cb.binary("add", x, x, one)
    return cb


# Idle before each window of an interleave: OpenBLAS's threads spin for about 0.1 s after a call
# before they sleep, so right after a GEMM in one process (the host's, at nice -10, or this one)
# a GEMM in the other finds a core taken: measured, alternating GEMMs 1:1 costs both sides ~60%.
SETTLE = 0.2


def interleave(fns: dict[str, Any], rounds: int, per: int) -> dict[str, list[float]]:
    """``rounds`` rounds of ``per`` calls of each function in turn (the order reversed every other
    round), each window after SETTLE seconds idle; all the samples of each."""
    return common.interleave(fns, rounds, per, lambda prev, name: SETTLE)


# ---- E1: one big GEMM ----------------------------------------------------------------------------


def big_gemm(node: str, n: int, rounds: int, per: int) -> dict[str, Any]:
    gpu = Gpu(node)
    try:
        rng = np.random.default_rng(1)
        a_h = rng.standard_normal((n, n), dtype=np.float32)
        b_h = rng.standard_normal((n, n), dtype=np.float32)
        c_h = np.zeros((n, n), np.float32)  # touched
        _a, va = gpu.array(a_h)
        _b, vb = gpu.array(b_h)
        c, vc = gpu.array(np.zeros((n, n), np.float32))
        cva, clen = gpu.command(gemm_buffer(vc, va, vb, n))
        _ctx, q = gpu.queue()
        fwait = FenceWait(gpu, q)

        def pydxg_poll() -> None:
            q.wait(q.submit(cva, clen))

        def pydxg_fence() -> None:
            fwait(q.submit(cva, clen))

        def numpy() -> None:
            np.matmul(a_h, b_h, out=c_h)

        pydxg_poll()  # warm up: the engine's pages, BLAS's threads
        pydxg_fence()
        numpy()
        ok = bool(np.allclose(c.download(), c_h, rtol=1e-4, atol=1e-3))
        samples = interleave({"poll": pydxg_poll, "fence": pydxg_fence, "numpy": numpy},
                             rounds, per)
    finally:
        gpu.close()
    return {"n": n, "correct": ok, **{k: stats(v) for k, v in samples.items()}}


# ---- E2: many small ops --------------------------------------------------------------------------


def small_ops(node: str, count: int, rounds: int) -> dict[str, Any]:
    gpu = Gpu(node)
    try:
        x, vx = gpu.array(np.zeros(SMALL, np.float32))
        _one, v1 = gpu.array(np.ones(SMALL, np.float32))
        one_va, one_len = gpu.command(add_buffer(vx, v1, 1))
        all_va, all_len = gpu.command(add_buffer(vx, v1, count))
        _ctx, q = gpu.queue()
        fwait = FenceWait(gpu, q)
        zeros = np.zeros(SMALL, np.float32)

        def sync_poll(k: int) -> None:
            for _ in range(k):
                q.wait(q.submit(one_va, one_len))

        def sync_fence(k: int) -> None:
            for _ in range(k):
                fwait(q.submit(one_va, one_len))

        def asynchronous(k: int) -> None:
            last = 0
            for i in range(k):
                if i >= MAX_IN_FLIGHT:
                    fwait(last - MAX_IN_FLIGHT + 1)  # at most MAX_IN_FLIGHT outstanding
                last = q.submit(one_va, one_len)
            fwait(last)

        def batched(_k: int) -> None:  # always all ``count``
            fwait(q.submit(all_va, all_len))

        fns = {"sync_poll": sync_poll, "sync_fence": sync_fence, "async": asynchronous,
               "batched": batched}
        # Warm up (a short run of each), then rounds of whole runs, each checked.
        for fn in fns.values():
            fn(min(count, 200))
        times: dict[str, list[float]] = {k: [] for k in fns}
        correct = True
        names = list(fns)
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                x.upload(zeros)
                time.sleep(SETTLE)
                t0 = time.perf_counter()
                fns[name](count)
                times[name].append(time.perf_counter() - t0)
                correct = correct and bool(np.all(x.download() == count))
        return {"count": count, "correct": correct, "seconds": times,
                **{k: median(v) for k, v in times.items()}}
    finally:
        gpu.close()


# ---- E3: fence signal to wake --------------------------------------------------------------------


def fence_wake(node: str, rounds: int, per: int) -> dict[str, Any]:
    from runtime import Echo

    echo = Echo()
    gpu = Gpu(node)
    fence = gpu.dev.fence()
    orders: list[tuple[str, int] | None] = []
    go = threading.Semaphore(0)
    woke: list[int] = []
    woke_evt = threading.Event()

    def waiter() -> None:
        while True:
            go.acquire()
            order = orders.pop()
            if order is None:
                return
            kind, v = order
            if kind == "wait":
                fence.wait(v)
            else:
                fd = fence.eventfd_wait(v)
                try:
                    select.select([fd], [], [])
                finally:
                    os.close(fd)
            woke.append(time.perf_counter_ns())
            woke_evt.set()

    th = threading.Thread(target=waiter, daemon=True)
    th.start()
    value = [0]
    signal_us: list[float] = []

    def raw_idle() -> float:  # the floor after the same 2 ms of idling as a wake
        time.sleep(0.002)
        t0 = time.perf_counter_ns()
        echo.rtt()
        return (time.perf_counter_ns() - t0) / 1000

    def one(kind: str) -> float:
        value[0] += 1
        v = value[0]
        woke_evt.clear()
        orders.append((kind, v))
        go.release()
        time.sleep(0.002)  # the waiter is parked in the driver by now
        t0 = time.perf_counter_ns()
        fence.signal(v)
        t1 = time.perf_counter_ns()
        if not woke_evt.wait(10):
            raise RuntimeError(f"the waiter did not wake for {v}")
        signal_us.append((t1 - t0) / 1000)
        return (woke.pop() - t0) / 1000

    try:
        timed(echo.rtt, 200)
        for _ in range(10):
            one("wait")
            one("eventfd")
        signal_us.clear()
        samples: dict[str, list[float]] = {"raw": [], "raw_idle": [], "wake": [], "eventfd": []}
        for r in range(rounds):
            order = list(samples) if r % 2 == 0 else list(samples)[::-1]
            for name in order:
                if name == "raw":
                    samples["raw"] += timed(echo.rtt, per * 4)
                elif name == "raw_idle":
                    samples["raw_idle"] += [raw_idle() for _ in range(per)]
                else:
                    kind = "wait" if name == "wake" else "eventfd"
                    samples[name] += [one(kind) for _ in range(per)]
        # the signal calls of both kinds of wake
        samples["signal"] = signal_us
    finally:
        orders.append(None)
        go.release()
        th.join(10)
        echo.close()
        gpu.close()
    return {k: stats(v) for k, v in samples.items()}


# ---- E4: two queues against one ------------------------------------------------------------------


def two_queues(node: str, n: int, count: int, rounds: int) -> dict[str, Any]:
    gpu = Gpu(node)
    try:
        rng = np.random.default_rng(2)
        a_h = rng.standard_normal((n, n), dtype=np.float32)
        b_h = rng.standard_normal((n, n), dtype=np.float32)
        _a, va = gpu.array(a_h)
        _b, vb = gpu.array(b_h)
        c1, vc1 = gpu.array(np.zeros((n, n), np.float32))
        c2, vc2 = gpu.array(np.zeros((n, n), np.float32))
        cmd1 = gpu.command(gemm_buffer(vc1, va, vb, n))
        cmd2 = gpu.command(gemm_buffer(vc2, va, vb, n))
        _ctx1, q1 = gpu.queue()
        _ctx2, q2 = gpu.queue()
        w1, w2 = FenceWait(gpu, q1), FenceWait(gpu, q2)
        outs = [np.zeros((n, n), np.float32) for _ in range(2)]

        def one_queue() -> None:
            last = 0
            for _ in range(count):
                last = q1.submit(*cmd1)
            w1(last)

        def two() -> None:
            l1 = l2 = 0
            for _ in range(count // 2):
                l1 = q1.submit(*cmd1)
                l2 = q2.submit(*cmd2)
            w1(l1)
            w2(l2)

        def np_one() -> None:
            for _ in range(count):
                np.matmul(a_h, b_h, out=outs[0])

        def np_two() -> None:
            def work(out: np.ndarray) -> None:
                for _ in range(count // 2):
                    np.matmul(a_h, b_h, out=out)

            ts = [threading.Thread(target=work, args=(o,)) for o in outs]
            for t in ts:
                t.start()
            for t in ts:
                t.join()

        def single(fn: Any) -> Any:
            def run() -> None:
                with threadpool_limits(1, user_api="blas"):  # process-wide while it runs
                    fn()

            return run

        fns = {"one": one_queue, "two": two, "np_one": np_one, "np_two": np_two,
               "np_one_st": single(np_one), "np_two_st": single(np_two)}
        for fn in fns.values():
            fn()
        want = a_h @ b_h
        ok = all(bool(np.allclose(c.download(), want, rtol=1e-4, atol=1e-3)) for c in (c1, c2))
        times: dict[str, list[float]] = {k: [] for k in fns}
        names = list(fns)
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                time.sleep(SETTLE)
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t0)
    finally:
        gpu.close()
    return {"n": n, "count": count, "correct": ok, "seconds": times,
            "per_s": {k: count / median(v) for k, v in times.items()}}


# ---- E5: priorities under a flood ----------------------------------------------------------------

FLOOD = """
import sys, threading, time
import numpy as np
from dxg.client import open_node
from dxg.backends.softcmd import CommandBuffer, Operand
n, queues, depth = {n}, {queues}, {depth}
node = open_node({node!r})
dev = node.adapters()[0].create_device()
ctx = dev.create_context()
qs = [ctx.hwqueue() for _ in range(queues)]
rng = np.random.default_rng(3)
def arr(x):
    a = dev.array(x); return a, int(a.map_gpu())
a, va = arr(rng.standard_normal((n, n), dtype=np.float32))
b, vb = arr(rng.standard_normal((n, n), dtype=np.float32))
cmds = []
for q in qs:
    c, vc = arr(np.zeros((n, n), np.float32))
    raw = CommandBuffer().gemm(Operand(vc, np.float32, (n, n)), Operand(va, np.float32, (n, n)),
                               Operand(vb, np.float32, (n, n))).tobytes()
    buf = dev.allocate(len(raw)); buf.upload(raw)
    cmds.append((int(buf.map_gpu()), len(raw), c))
stop = threading.Event()
def reader():
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "prio":
            ctx.set_priority(int(cmd[1]))
            print("ok", flush=True)
        elif cmd[0] == "count":
            print(sum(q.progress for q in qs), time.monotonic(), flush=True)
    stop.set()
threading.Thread(target=reader, daemon=True).start()
print("ready", flush=True)
while not stop.is_set():
    for q, (va_, ln, _c) in zip(qs, cmds):
        while q.submitted - q.progress < depth:
            q.submit(va_, ln)
    time.sleep(0.001)
for q in qs:
    q.wait(timeout=60)
dev.close(); node.close()
"""


class Flood:
    def __init__(self, node: str, n: int, queues: int, depth: int) -> None:
        code = FLOOD.format(node=node, n=n, queues=queues, depth=depth)
        self.p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        if self.ask("") != "ready":
            raise RuntimeError(f"the flood process did not start ({self.p.poll()})")

    def ask(self, cmd: str) -> str:
        assert self.p.stdin is not None and self.p.stdout is not None
        if cmd:
            self.p.stdin.write(cmd + "\n")
            self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"the flood process died ({self.p.wait()}) at {cmd or 'start'!r}")
        return line.strip()

    def count(self) -> tuple[int, float]:
        done, when = self.ask("count").split()
        return int(done), float(when)

    def close(self) -> None:
        if self.p.stdin is not None:
            self.p.stdin.close()
        try:
            self.p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def priorities(node: str, flood_n: int, rounds: int, window: float,
               idle_samples: int) -> dict[str, Any]:
    gpu = Gpu(node)
    flood: Flood | None = None
    try:
        x, vx = gpu.array(np.zeros(SMALL, np.float32))
        _one, v1 = gpu.array(np.ones(SMALL, np.float32))
        cmd = gpu.command(add_buffer(vx, v1, 1))
        ctx, q = gpu.queue()
        fwait = FenceWait(gpu, q)
        rnd = random.Random(5)

        def sample(seconds: float | None, count: int | None = None) -> list[float]:
            out: list[float] = []
            end = time.monotonic() + (seconds or 0)
            while (time.monotonic() < end) if seconds else (len(out) < (count or 0)):
                time.sleep(rnd.uniform(0, 0.005))
                t0 = time.perf_counter_ns()
                fwait(q.submit(*cmd))
                out.append((time.perf_counter_ns() - t0) / 1000)
            return out

        sample(None, 20)
        idle = sample(None, idle_samples)
        flood = Flood(node, flood_n, queues=4, depth=2)
        time.sleep(0.5)  # the flood is under way
        lat: dict[str, list[float]] = {"prio": [], "equal": []}
        rate: dict[str, list[float]] = {"prio": [], "equal": []}
        settings = {"prio": (7, -7), "equal": (0, 0)}
        names = list(lat)
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                hi, lo = settings[name]
                ctx.set_priority(hi)
                if flood.ask(f"prio {lo}") != "ok":
                    raise RuntimeError("the flood did not take its priority")
                sample(0.3)  # what waited under the old priorities drains
                d0, t0 = flood.count()
                lat[name] += sample(window)
                d1, t1 = flood.count()
                rate[name].append((d1 - d0) / (t1 - t0))
        ok = bool(np.all(x.download() > 0))
    finally:
        if flood is not None:
            flood.close()
        gpu.close()
    return {"flood_n": flood_n, "correct": ok, "idle": stats(idle),
            **{k: stats(v) for k, v in lat.items()},
            "flood_per_s": {k: median(v) for k, v in rate.items()}}


# ---- the run -------------------------------------------------------------------------------------


def guarded(fn: Any, *a: Any) -> Any:
    try:
        return fn(*a)
    except Exception as e:  # a part the checkout cannot run: reported, not fatal
        return {"error": f"{type(e).__name__}: {e}"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run, < 60 s)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: e1,e2,e3,e4,e5")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    quick = args.quick
    tmp = Path(tempfile.mkdtemp(prefix="pydxg-bench-exec."))
    results: dict[str, Any] = {"quick": quick, "logs": str(tmp), "cpus": os.cpu_count()}
    busy0, own0 = cpu_busy()
    t_start = time.monotonic()
    up, node = start_up(tmp)
    try:
        if "e1" not in skip:
            results["e1"] = guarded(big_gemm, node, 2048, 3 if quick else 10, 2 if quick else 3)
        if "e2" not in skip:
            results["e2"] = guarded(small_ops, node, 1000 if quick else 10000, 2 if quick else 3)
        if "e3" not in skip:
            results["e3"] = guarded(fence_wake, node, 4 if quick else 20, 25 if quick else 50)
        if "e4" not in skip:
            results["e4"] = guarded(two_queues, node, 1024, 8 if quick else 32,
                                    2 if quick else 6)
        if "e5" not in skip:
            results["e5"] = guarded(priorities, node, 1024, 2 if quick else 6,
                                    2.0 if quick else 4.0, 100 if quick else 300)
    finally:
        stop_up(up)
    results["seconds"] = time.monotonic() - t_start
    busy1, own1 = cpu_busy()
    # Cores other processes kept busy meanwhile, on average (the noise the rounds had to share).
    results["other_cores"] = max(0.0, (busy1 - busy0) - (own1 - own0)) / results["seconds"]
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


def _met(ok: bool) -> str:
    return "yes" if ok else "NO"


def report(r: dict[str, Any]) -> None:
    print(f"pydxg execution benchmark ({'quick' if r['quick'] else 'full'} run, "
          f"{r['cpus']} CPUs, {r.get('seconds', 0):.0f} s; other processes kept "
          f"{r.get('other_cores', 0):.2f} cores busy on average meanwhile)")
    print()
    if "e1" in r:
        v = r["e1"]
        print("E1  GEMM 2048 x 2048 f32 on data already on the device: submit + wait vs "
              "np.matmul(out=) in-process")
        if "error" in v:
            print(f"    error: {v['error']}")
        else:
            flop = 2 * v["n"] ** 3
            np50, np99 = v["numpy"]["p50"], v["numpy"]["p99"]
            print(f"{'side':<40} {'p50 ms':>8} {'p99 ms':>8} {'GFLOP/s':>8} {'ratio':>6} "
                  f"{'p99 ratio':>9} {'target':>7} {'met':>4}")
            for key, label in (("numpy", "NumPy in-process (baseline)"),
                               ("poll", "pydxg, q.wait (the client API)"),
                               ("fence", "pydxg, CPU wait on the progress fence")):
                x = v[key]
                ratio = np50 / x["p50"]
                tail = (f"{'':>7} {'':>4}" if key == "numpy" else
                        f"{'>=' + str(GEMM_TARGET):>7} {_met(ratio >= GEMM_TARGET):>4}")
                print(f"{label:<40} {x['p50'] / 1e3:8.1f} {x['p99'] / 1e3:8.1f} "
                      f"{flop / x['p50'] / 1e3:8.1f} {ratio:6.3f} {np99 / x['p99']:9.3f} {tail}")
            if not v["correct"]:
                print("    (DATA WRONG)")
        print()
    if "e2" in r:
        v = r["e2"]
        if "error" in v:
            print(f"E2  error: {v['error']}")
        else:
            n = v["count"]
            print(f"E2  {n} small ops (in-place add of {SMALL} f32): one wait after each vs "
                  "asynchronous / batched (median of runs)")
            print(f"{'way':<52} {'total s':>8} {'us/op':>7} {'sync/this':>9} {'target':>7} "
                  f"{'met':>4}")
            base = v["sync_poll"]
            for key, label, target in (
                    ("sync_poll", "sync: submit + q.wait, each", False),
                    ("sync_fence", "sync: submit + CPU fence wait, each", False),
                    ("async", f"async: {n} submissions, one wait", True),
                    ("batched", f"batched: one buffer of {n} commands, one wait", True)):
                s = v[key]
                ratio = base / s
                tail = (f"{'>=' + str(int(BATCH_TARGET)):>7} {_met(ratio >= BATCH_TARGET):>4}"
                        if target else f"{'':>7} {'':>4}")
                print(f"{label:<52} {s:8.3f} {s / n * 1e6:7.1f} {ratio:9.2f} {tail}")
            if not v["correct"]:
                print("    (DATA WRONG)")
        print()
    if "e3" in r:
        v = r["e3"]
        print("E3  fence signal-to-wake (another thread of the process parked in the wait) vs a "
              "raw Unix-socket round trip")
        if "error" in v:
            print(f"    error: {v['error']}")
        else:
            b50, b99 = v["raw"]["p50"], v["raw"]["p99"]
            print(f"{'measurement':<52} {'p50 us':>9} {'p99 us':>9} {'p50 ratio':>10} "
                  f"{'p99 ratio':>10}")
            for key, label in (("raw", "raw Unix-socket round trip (64 B, forked echo)"),
                               ("raw_idle", "the same, each after 2 ms idle (as a wake is)"),
                               ("wake", "fence.signal -> fence.wait returns"),
                               ("eventfd", "fence.signal -> eventfd_wait's fd readable"),
                               ("signal", "fence.signal call alone")):
                x = v[key]
                print(f"{label:<52} {x['p50']:9.1f} {x['p99']:9.1f} {x['p50'] / b50:10.2f} "
                      f"{x['p99'] / b99:10.2f}")
        print()
    if "e4" in r:
        v = r["e4"]
        if "error" in v:
            print(f"E4  error: {v['error']}")
        else:
            print(f"E4  {v['count']} GEMMs {v['n']} x {v['n']} f32: two hardware queues (two "
                  f"contexts) vs one (median of runs); engine slots: {r['cpus']} (one per host "
                  "core: the host's BLAS is single-threaded)")
            ps = v["per_s"]
            best = max(ps.get(k, 0.0) for k in ("np_one", "np_two", "np_one_st", "np_two_st"))
            print(f"{'way':<52} {'GEMM/s':>8} {'ratio':>6} {'target':>7} {'met':>4}   (ratio: "
                  "to NumPy's best line below)")
            for key, name in (("one", "pydxg, one queue"), ("two", "pydxg, two queues")):
                ratio = ps[key] / best
                print(f"{name:<52} {ps[key]:8.1f} {ratio:6.2f} {'>=' + str(CORES_TARGET):>7} "
                      f"{_met(ratio >= CORES_TARGET):>4}")
            print(f"{'pydxg, two queues / one queue':<52} {'':8} {ps['two'] / ps['one']:6.2f}")
            for suffix, blas in (("", "BLAS on every core"), ("_st", "single-threaded BLAS")):
                one, two = ps.get(f"np_one{suffix}"), ps.get(f"np_two{suffix}")
                if one is None or two is None:
                    continue
                print(f"{'NumPy in-process, one thread, ' + blas:<52} {one:8.1f}")
                print(f"{'NumPy in-process, two threads, ' + blas:<52} {two:8.1f} "
                      f"{two / one:6.2f}")
            if not v["correct"]:
                print("    (DATA WRONG)")
        print()
    if "e5" in r:
        v = r["e5"]
        if "error" in v:
            print(f"E5  error: {v['error']}")
        else:
            print(f"E5  a small op's latency (submit + CPU fence wait) on one queue while another "
                  f"process floods the adapter ({v['flood_n']} x {v['flood_n']} GEMMs, 4 queues "
                  "2 deep)")
            eq50, eq99 = v["equal"]["p50"], v["equal"]["p99"]
            print(f"{'setting':<52} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'equal/this p50':>14} "
                  f"{'p99':>6} {'flood GEMM/s':>12}")
            for key, label in (("idle", "idle adapter (no flood)"),
                               ("equal", "flood, both priority 0"),
                               ("prio", "flood, this queue 7, the flood -7")):
                x = v[key]
                fr = v["flood_per_s"].get(key)
                print(f"{label:<52} {x['n']:>5} {x['p50'] / 1e3:8.2f} {x['p99'] / 1e3:8.2f} "
                      f"{eq50 / x['p50']:14.2f} {eq99 / x['p99']:6.2f} "
                      + (f"{fr:12.1f}" if fr is not None else f"{'':>12}"))
            if not v["correct"]:
                print("    (DATA WRONG)")


if __name__ == "__main__":
    sys.exit(main())
