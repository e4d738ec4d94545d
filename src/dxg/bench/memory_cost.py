"""M6, memory: what the daemon's RSS is idle, and what each connected client and each live
allocation adds to it.

- idle: ``dxg up`` with one adapter, nothing connected, against a Python interpreter that
  imported NumPy (what any Python daemon of soft GPUs carries), readings taken in turn;
- per idle client: N client processes (forked, see :class:`dxg.bench.stack.Workers`) each with
  a node connection and its adapters open, added in batches; each batch's RSS growth of the
  daemon (once it stops moving) over its clients is a sample;
- per live allocation: one client makes 4 KiB allocations in batches, each Lock2'ed and
  Unlock2'ed once (so its mapping exists; its data page is never written); each batch's growth
  over its allocations is a sample. For ``dxg up`` (one daemon) and for a separate ``dxg host``
  + ``dxg guest`` over Unix (the two together), as bench/memory.py part C measures it.

There is no native baseline for the last two: dxgkrnl keeps its per-process and per-allocation
state in kernel memory, which no process's RSS shows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import ExitStack
from multiprocessing.connection import Connection
from typing import Any

from dxg.bench.model import Context, Figure, stats
from dxg.bench.stack import Stack, Worker, Workers, rss_kib, settle_rss, split, up

__all__ = ["alloc_holder", "idle_client", "run"]

KIB = 1024


def idle_client(conn: Connection, node_path: str) -> None:
    """A worker: a node connection with its adapters open, idle until told to go."""
    from dxg.client import open_node

    node = open_node(node_path)
    adapters = node.adapters()
    conn.send("ready")
    conn.recv()
    for a in adapters:
        a.close()
    node.close()


def alloc_holder(conn: Connection, node_path: str) -> None:
    """A worker with a device: ("alloc", k) makes k live 4 KiB allocations (each Lock2'ed and
    Unlock2'ed once) and answers "done"; None ends it."""
    from dxg.client import open_node

    node = open_node(node_path)
    dev = node.adapters()[0].create_device()
    for _ in range(20):  # warm up: the arena, the block's mapping in the guest and here
        a = dev.allocate(4096)
        with a.map():
            pass
        a.close()
    held: list[Any] = []
    conn.send("ready")
    while (cmd := conn.recv()) is not None:
        for _ in range(int(cmd[1])):
            a = dev.allocate(4096)
            with a.map():
                pass
            held.append(a)
        conn.send("done")
    for a in held:
        a.close()
    node.close()


def _rss(pids: tuple[int, ...], settle: float) -> int:
    """The summed RSS (KiB) of ``pids``, each once it stops moving."""
    return sum(settle_rss(p, settle) for p in pids)


def _idle(stack: Stack, rounds: int) -> tuple[list[float], list[float]]:
    """Readings of the daemon's RSS and of a Python + NumPy interpreter's, in turn."""
    py = subprocess.Popen([sys.executable, "-c", "import sys, numpy; print(1, flush=True); "
                           "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert py.stdout is not None
        if py.stdout.readline().strip() != b"1":
            raise RuntimeError("the reference interpreter did not start")
        daemon, ref = [], []
        for _ in range(rounds):
            daemon.append(float(rss_kib(stack.daemon_pid)))
            ref.append(float(rss_kib(py.pid)))
            time.sleep(0.02)
        return daemon, ref
    finally:
        py.kill()
        py.wait()


def _per_client(workers: Workers, stack: Stack, batches: int, per: int,
                settle: float) -> list[float]:
    clients: list[Worker] = []
    samples = []
    try:
        before = _rss((stack.daemon_pid,), settle)
        for _ in range(batches):
            fresh = [workers.spawn("dxg.bench.memory_cost:idle_client", stack.node)
                     for _ in range(per)]
            clients += fresh
            for w in fresh:
                if w.recv(120) != "ready":
                    raise RuntimeError(f"client {w.pid} did not get ready")
            after = _rss((stack.daemon_pid,), settle)
            samples.append((after - before) / per)
            before = after
    finally:
        for w in clients:
            w.kill()
            w.close()
    return samples


def _per_alloc(workers: Workers, pids: tuple[int, ...], node: str, batches: int, per: int,
               settle: float) -> tuple[list[float], int, int]:
    """Bytes of RSS growth per allocation of ``pids`` together, per batch; and the daemons'
    open descriptors before and with every allocation live."""
    w = workers.spawn("dxg.bench.memory_cost:alloc_holder", node)
    try:
        if w.recv(120) != "ready":
            raise RuntimeError(f"client {w.pid} did not get ready")
        fds0 = sum(len(os.listdir(f"/proc/{p}/fd")) for p in pids)
        before = _rss(pids, settle)
        samples = []
        for _ in range(batches):
            w.send(("alloc", per))
            if w.recv(300) != "done":
                raise RuntimeError("the allocating client failed")
            after = _rss(pids, settle)
            samples.append((after - before) * KIB / per)
            before = after
        fds1 = sum(len(os.listdir(f"/proc/{p}/fd")) for p in pids)
        w.send(None)
        return samples, fds0, fds1
    finally:
        w.kill()
        w.close()


def run(ctx: Context) -> list[Figure]:
    if ctx.quick:
        readings, c_batches, c_per, a_batches, a_per, settle = 10, 4, 8, 4, 150, 1.5
    else:
        readings, c_batches, c_per, a_batches, a_per, settle = 50, 10, 20, 10, 1000, 3.0
    figures: list[Figure] = []
    with ExitStack() as es:
        stack = es.enter_context(up(ctx.tmp, 1, name="m6-up"))
        workers = es.enter_context(Workers(ctx.tmp, preload=("numpy", "dxg.client")))
        settle_rss(stack.daemon_pid, settle)
        ctx.log("M6: idle RSS")
        daemon, ref = _idle(stack, readings)
        figures.append(Figure("M6", "daemon RSS, idle (dxg up, 1 adapter)", "KiB",
                              stats(daemon), stats(ref), "a Python interpreter with NumPy",
                              note="VmRSS; the reference is what any Python daemon that runs "
                                   "NumPy carries"))
        ctx.log(f"M6: {c_batches} x {c_per} idle clients")
        per_client = _per_client(workers, stack, c_batches, c_per, settle)
        figures.append(Figure("M6", "daemon RSS per idle client (dxg up)", "KiB",
                              stats(per_client),
                              note=f"{c_batches * c_per} client processes, a node connection "
                                   "and the adapter open each; no native baseline (dxgkrnl's "
                                   "per-process state is kernel memory)"))
        ctx.log(f"M6: {a_batches} x {a_per} live allocations (dxg up)")
        per_alloc, fds0, fds1 = _per_alloc(workers, (stack.daemon_pid,), stack.node, a_batches,
                                           a_per, settle)
        figures.append(Figure("M6", "daemon RSS per live 4 KiB allocation (dxg up)", "bytes",
                              stats(per_alloc),
                              note=f"{a_batches * a_per} allocations, each Lock2'ed once; "
                                   f"daemon fds {fds0} -> {fds1}; no native baseline"))
        sp = es.enter_context(split(ctx.tmp, "unix", 1, name="m6-unix"))
        ctx.log(f"M6: {a_batches} x {a_per} live allocations (host + guest)")
        per_alloc, fds0, fds1 = _per_alloc(workers, (sp.daemon_pid, sp.guest_pid), sp.node,
                                           a_batches, a_per, settle)
        figures.append(Figure("M6", "host + guest RSS per live 4 KiB allocation (over Unix)",
                              "bytes", stats(per_alloc),
                              note=f"{a_batches * a_per} allocations, each Lock2'ed once; dxg "
                                   f"host + dxg guest together; their fds {fds0} -> {fds1}; "
                                   "no native baseline"))
    return figures
