"""M4, scale: 1, 2, 4, .. 64 client processes at once against one ``dxg up``.

Every client is a real process (forked from a fork server that imported pydxg, see
:class:`dxg.bench.stack.Workers`) with its own node connection, its own dxg.compute device and
its own connection to one echo process. For each client count, in the same rounds (a window of
each, the order reversed every other round), all the clients at once, from the same instant:

- ``calls``: forwarded ioctls (QueryAdapterInfo, guest -> host -> guest) back to back;
- ``echo``: 64-byte round trips to one echo process that serves every client from one selector
  loop (one process serving many, the shape of the node): the baseline;
- ``ops``: small dxg.compute ops, ``add(a, b, out=c)`` of 64x64 float32 and ``synchronize()``,
  one at a time (each is a submission and a fence wait: at least two calls).

Rates are aggregate (every client's calls together) in bins of the window: p50 is the median bin
and the p99 column the slow tail (the bin 99% of bins beat); latencies are every call's.
"""

from __future__ import annotations

import time
from array import array
from contextlib import ExitStack
from multiprocessing.connection import Connection
from typing import Any

from dxg.bench.latency import Calls, EchoClient, start_echo
from dxg.bench.model import Context, Figure, Stats, pct, stats
from dxg.bench.stack import Worker, Workers, up

__all__ = ["client", "rate_stats", "run"]

SIDE = 64


def client(conn: Connection, node: str, echo: Any) -> None:
    """A worker: connects, says "ready", then for each (kind, t0, t1) runs ``kind`` back to back
    from monotonic time t0 to t1 and sends (end times, latencies) as bytes of float64 arrays
    (seconds, microseconds). None ends it."""
    import numpy as np

    import dxg.compute as dc
    from dxg.client.connection import NodeConnection

    nc = NodeConnection(node)
    calls = Calls(nc.ioctl)
    rt = EchoClient(echo if isinstance(echo, str) else tuple(echo))
    dev = dc.device(0, node=node)
    a = dev.asarray(np.ones((SIDE, SIDE), np.float32))
    b = dev.asarray(np.full((SIDE, SIDE), 2, np.float32))
    c = dev.empty((SIDE, SIDE), np.float32)

    def op() -> None:
        dc.add(a, b, out=c)
        dev.synchronize()

    op()
    if float(c.get()[0, 0]) != 3.0:
        raise RuntimeError("the op computed a wrong value")
    fns = {"calls": calls.forwarded, "echo": rt.rtt, "ops": op}
    for fn in fns.values():
        for _ in range(20):
            fn()
    conn.send("ready")
    clock = time.monotonic_ns
    while (cmd := conn.recv()) is not None:
        kind, t0, t1 = cmd
        fn = fns[kind]
        ends, lats = array("d"), array("d")
        start, stop = int(t0 * 1e9), int(t1 * 1e9)
        while (now := clock()) < start:
            time.sleep(min(0.001, (start - now) / 1e9))
        while now < stop:
            fn()
            end = clock()
            ends.append(end / 1e9)
            lats.append((end - now) / 1000)
            now = end
        conn.send((ends.tobytes(), lats.tobytes()))
    dev.close()
    nc.close()
    rt.close()


def rate_stats(ends: list[float], t0: float, t1: float, bin_s: float) -> list[float]:
    """Events per second in each ``bin_s`` bin of [t0, t1) (only whole bins)."""
    n = int((t1 - t0) / bin_s)
    counts = [0] * n
    for e in ends:
        i = int((e - t0) / bin_s)
        if 0 <= i < n:
            counts[i] += 1
    return [c / bin_s for c in counts]


def _rate(bins: list[float]) -> Stats:
    """Median bin and the slow tail (the 1st percentile: 99% of bins were at least this)."""
    return Stats(pct(bins, 0.5), pct(bins, 0.01), len(bins))


def _clients(n: int) -> str:
    return f"{n} client" + ("" if n == 1 else "s")


def _window(clients: list[Worker], kind: str, seconds: float) -> tuple[list[float], list[float],
                                                                      float, float]:
    t0 = time.monotonic() + 0.05 + 0.002 * len(clients)
    t1 = t0 + seconds
    for w in clients:
        w.send((kind, t0, t1))
    ends: list[float] = []
    lats: list[float] = []
    for w in clients:
        e, lat = w.recv(seconds + 120)
        ends += array("d", e)
        lats += array("d", lat)
    return ends, lats, t0, t1


def run(ctx: Context) -> list[Figure]:
    counts = (1, 4, 16) if ctx.quick else (1, 2, 4, 8, 16, 32, 64)
    seconds, rounds, bin_s = (0.4, 1, 0.05) if ctx.quick else (2.0, 3, 0.1)
    figures: list[Figure] = []
    with ExitStack() as es:
        stack = es.enter_context(up(ctx.tmp, 1, name="m4-up"))
        workers = es.enter_context(Workers(ctx.tmp, preload=("numpy", "dxg.client",
                                                            "dxg.compute")))
        echo = start_echo(workers, "unix", one=False)
        clients: list[Worker] = []
        for n in counts:
            fresh = [workers.spawn("dxg.bench.scale:client", stack.node, echo)
                     for _ in range(n - len(clients))]
            for w in fresh:
                if w.recv(120) != "ready":
                    raise RuntimeError(f"client {w.pid} did not get ready")
            clients += fresh
            ctx.log(f"M4: {_clients(n)}, {rounds} x {seconds:g} s of each kind")
            bins: dict[str, list[float]] = {"calls": [], "echo": [], "ops": []}
            lat: dict[str, list[float]] = {"calls": [], "echo": [], "ops": []}
            total: dict[str, float] = {"calls": 0.0, "echo": 0.0, "ops": 0.0}
            kinds = list(bins)
            for r in range(rounds):
                for kind in kinds if r % 2 == 0 else kinds[::-1]:
                    ends, lats, t0, t1 = _window(clients[:n], kind, seconds)
                    bins[kind] += rate_stats(ends, t0, t1, bin_s)
                    lat[kind] += lats
                    total[kind] += sum(1 for e in ends if t0 <= e < t1)
            wall = seconds * rounds
            echo_rate = _rate(bins["echo"])
            figures += [
                Figure("M4", f"forwarded calls/s, {_clients(n)}", "calls/s", _rate(bins["calls"]),
                       echo_rate, "raw Unix round trips/s, same clients", lower_is_better=False,
                       note=f"aggregate {total['calls'] / wall:.0f}/s (echo "
                            f"{total['echo'] / wall:.0f}/s); p99 column: the slow tail"),
                Figure("M4", f"forwarded call latency, {_clients(n)}", "us", stats(lat["calls"]),
                       stats(lat["echo"]), "raw Unix round trip, same clients",
                       note=f"{len(lat['calls'])} calls"),
                Figure("M4", f"dxg.compute ops/s, {_clients(n)}", "ops/s", _rate(bins["ops"]),
                       echo_rate, "raw Unix round trips/s, same clients", lower_is_better=False,
                       note=f"add 64x64 f32 + synchronize, one at a time per client; aggregate "
                            f"{total['ops'] / wall:.0f}/s, per op p50 "
                            f"{pct(lat['ops'], 0.5):.0f} us p99 {pct(lat['ops'], 0.99):.0f} us"),
            ]
        for w in clients:
            w.send(None)
    return figures
