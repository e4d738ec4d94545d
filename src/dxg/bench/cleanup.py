"""M5, clean-up: a client that holds objects is killed with SIGKILL; how long until the host
holds nothing of it.

Each sample is one client process (forked, see :class:`dxg.bench.stack.Workers`) that makes what
a real client holds: a device, two contexts with a hardware queue each, 4 MiB of device memory
in one allocation and 16 of 64 KiB, GPU VA mappings, four monitored fences, a thread blocked in
a CPU wait on one and an eventfd wait on another, and a 64x64 GEMM queued 8 times on each queue.
Once the host's census shows it, the bench kills it and measures from the kill:

- pydxg: until the census (the node's admin call, polled every 2 ms, as bench/faults.py does)
  shows no object of its pid on the host;
- baseline: until the kernel is done with the process (its pidfd turns readable: it has exited,
  its descriptors are closed, so its node socket is seen closed): nothing can be faster.

Against ``dxg up`` and against a separate ``dxg host`` + ``dxg guest`` over a Unix socket (the
guest tells the host), a sample of each in turn.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from contextlib import ExitStack
from multiprocessing.connection import Connection
from typing import Any

from dxg.bench.model import Context, Figure, stats
from dxg.bench.stack import Stack, Workers, split, up

__all__ = ["held_by", "hold_objects", "holder", "run"]

POLL_S = 0.002
DEADLINE_S = 30.0


def hold_objects(node: Any, big: int, smalls: int, n: int) -> list[Any]:
    """What a real client holds, made on ``node`` (also bench/faults.py's client): a device, two
    contexts with a hardware queue each, one allocation of ``big`` bytes and ``smalls`` of 64
    KiB, GPU VA mappings, four monitored fences, a thread blocked in a CPU wait on one and an
    eventfd wait on another, and an ``n`` x ``n`` GEMM queued 8 times on each queue. Returns
    what must stay referenced."""
    import numpy as np

    from dxg.backends.softcmd import CommandBuffer, DType, Operand
    from dxg.client import DxgError

    dev = node.adapters()[0].create_device()
    queues = [dev.create_context().hwqueue() for _ in range(2)]
    held: list[Any] = [dev.allocate(big)] + [dev.allocate(64 << 10) for _ in range(smalls)]
    a = dev.array(np.ones((n, n), np.float32))
    c = dev.empty((n, n), np.float32)
    va, vc = a.map_gpu(), c.map_gpu()
    f32 = DType.of(np.float32)
    raw = CommandBuffer().gemm(Operand(int(vc), f32, (n, n)), Operand(int(va), f32, (n, n)),
                               Operand(int(va), f32, (n, n))).tobytes()
    buf = dev.allocate(len(raw))
    buf.upload(raw)
    vbuf = buf.map_gpu()
    fences = [dev.fence() for _ in range(4)]

    def park() -> None:
        try:
            fences[0].wait(1, timeout=None)
        except DxgError:
            pass

    threading.Thread(target=park, daemon=True).start()
    efd = fences[1].eventfd_wait(1)
    for q in queues:
        for _ in range(8):
            q.submit(int(vbuf), len(raw))
    return [*held, dev, queues, a, c, buf, fences, efd]


def holder(conn: Connection, node_path: str) -> None:
    """A worker: makes its objects, says "ready" and waits to be killed."""
    from dxg.client import open_node

    node = open_node(node_path)
    held = hold_objects(node, 4 << 20, 16, 64)
    conn.send("ready")
    conn.recv()  # until it is killed
    del held


def held_by(census: dict[str, Any], pid: int) -> int:
    """How many host-side process entries of ``pid`` the node's census shows (0: none)."""
    return sum(1 for host in census.get("hosts", [])
               for p in (host.get("census") or {}).get("processes", []) if p.get("pid") == pid)


def _one(workers: Workers, stack: Stack, admin: Any) -> tuple[float, float]:
    """One client made and killed: (seconds until the host holds nothing of it, seconds until
    the kernel was done with the process)."""
    w = workers.spawn("dxg.bench.cleanup:holder", stack.node)
    if w.recv(120) != "ready":
        raise RuntimeError(f"client {w.pid} did not get ready")
    if not held_by(admin.admin({"op": "census"}), w.pid):
        raise RuntimeError("the host holds nothing of a ready client")
    pidfd = os.pidfd_open(w.pid)
    gone: list[float] = []

    def watch() -> None:
        select.select([pidfd], [], [], DEADLINE_S)
        gone.append(time.perf_counter())

    watcher = threading.Thread(target=watch, daemon=True)
    try:
        watcher.start()
        t0 = time.perf_counter()
        os.kill(w.pid, signal.SIGKILL)
        deadline = t0 + DEADLINE_S
        while held_by(admin.admin({"op": "census"}), w.pid):
            if time.perf_counter() > deadline:
                raise RuntimeError(f"the host still holds a killed client after {DEADLINE_S:g} s")
            time.sleep(POLL_S)
        t_host = time.perf_counter() - t0
        watcher.join(DEADLINE_S)
        if not gone:
            raise RuntimeError("the killed client did not exit")
        return t_host, gone[0] - t0
    finally:
        w.kill()
        w.close()
        watcher.join(DEADLINE_S)
        os.close(pidfd)


def run(ctx: Context) -> list[Figure]:
    from dxg.client import open_node

    kills = 4 if ctx.quick else 40
    kinds = (("up", "dxg up"), ("unix", "host + guest over Unix"))
    host: dict[str, list[float]] = {k: [] for k, _ in kinds}
    kernel: dict[str, list[float]] = {k: [] for k, _ in kinds}
    left: dict[str, int] = {}
    with ExitStack() as es:
        stacks = {"up": es.enter_context(up(ctx.tmp, 1, name="m5-up")),
                  "unix": es.enter_context(split(ctx.tmp, "unix", 1, name="m5-unix"))}
        admins = {k: es.enter_context(open_node(s.node)) for k, s in stacks.items()}
        workers = es.enter_context(Workers(ctx.tmp, preload=("numpy", "dxg.client",
                                                            "dxg.backends.softcmd")))
        ctx.log(f"M5: {kills} kills on each of {len(kinds)} stacks")
        for i in range(kills):
            for key, _ in kinds if i % 2 == 0 else kinds[::-1]:
                t_host, t_kernel = _one(workers, stacks[key], admins[key])
                host[key].append(t_host * 1e3)
                kernel[key].append(t_kernel * 1e3)
        for key, admin in admins.items():
            census = admin.admin({"op": "census"})
            left[key] = sum(len((h.get("census") or {}).get("processes", []))
                            for h in census.get("hosts", []))
    out = []
    for key, label in kinds:
        fig = Figure("M5", f"SIGKILL -> host holds nothing ({label})", "ms", stats(host[key]),
                     stats(kernel[key]), "the process has exited (pidfd)",
                     note="a device, 2 queues with 16 GEMMs queued, 5 MiB in 20 allocations, "
                          f"4 fences, 2 waits; {POLL_S * 1e3:g} ms polls; "
                          f"host processes left at the end: {left.get(key, '?')}")
        if left.get(key):
            fig = Figure(fig.part, fig.name, fig.unit, fig.pydxg, fig.baseline,
                         fig.baseline_name, note=fig.note,
                         error=f"the host still holds {left[key]} processes after every kill")
        out.append(fig)
    return out
