"""The runtime's benchmark: call latency against a raw Unix-socket round trip, calls parked in
the driver or on the host next to calls that must not wait for them, many client processes at
once, and the daemon's memory per idle client. One command, one run, a table of ratios:

    .venv/bin/python bench/runtime.py [--quick] [--json FILE]

Everything runs against `dxg up` (the embedded default) started by the bench in a child process.
Measurements that are compared are interleaved in rounds (a window of each in turn), so the noise
of a busy 2-core machine hits both sides of a ratio alike. Parts that need a feature the checkout
does not have (the long host command comes from pydxg's SLEEP escape) print "n/a".

Measured:
  M1  raw round trip (64 B, Python echo in a forked process), EnumAdapters3 count-only (answered
      by the guest), QueryAdapterInfo DRIVER_DESCRIPTION (forwarded to the host): p50, p99, ratios.
  M2  a thread parked for 2 s in a host call (SLEEP escape) beside another thread of the same
      process calling QueryAdapterInfo: that thread's p50/p99 parked vs not parked.
  M3  another process parked for 2 s on adapter 0 beside this process's calls on adapter 1.
  M4  N client processes at once (1, 8, 64), each calling QueryAdapterInfo for a few seconds:
      aggregate calls/s, p50, p99.
  M5  1000 idle clients (connected, an adapter open): the daemon's RSS growth per client.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import pct, start_up, stop_up, timed

# ---- the stack and the clients ---------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Calls:
    """The calls a client makes, on one node connection."""

    def __init__(self, node: str) -> None:
        from dxg import uapi
        from dxg.client.connection import NodeConnection
        from dxg.uapi import wddm

        self.uapi = uapi
        self.conn = NodeConnection(node)
        enum = uapi.d3dkmt_enumadapters3()
        enum.filter.include_compute_only = 1
        self.infos = (uapi.d3dkmt_adapterinfo * 8)()
        enum.adapter_count = 8
        enum.adapters = ctypes.addressof(self.infos)
        assert self.conn.ioctl(uapi.LX_DXENUMADAPTERS3, enum) == 0
        self.count = int(enum.adapter_count)
        self.enum = uapi.d3dkmt_enumadapters3()
        self.enum.filter.include_compute_only = 1
        self.desc = [wddm.D3DKMT_DRIVER_DESCRIPTION() for _ in range(self.count)]
        self.qai = []
        for i in range(self.count):
            q = uapi.d3dkmt_queryadapterinfo()
            q.adapter.v = self.infos[i].adapter_handle.v
            q.type = wddm.KMTQUERYADAPTERINFOTYPE.KMTQAITYPE_DRIVER_DESCRIPTION
            q.private_data = ctypes.addressof(self.desc[i])
            q.private_data_size = ctypes.sizeof(self.desc[i])
            self.qai.append(q)

    def enum_count(self) -> None:
        self.enum.adapter_count = 0
        self.enum.adapters = 0
        ret = self.conn.ioctl(self.uapi.LX_DXENUMADAPTERS3, self.enum)
        assert ret == 0, ret

    def query(self, adapter: int = 0) -> None:
        ret = self.conn.ioctl(self.uapi.LX_DXQUERYADAPTERINFO, self.qai[adapter])
        assert ret == 0, ret

    def handle(self, adapter: int) -> int:
        return int(self.infos[adapter].adapter_handle.v)


def has_sleep() -> bool:
    try:
        import dxg.client.diag  # noqa: F401
    except ImportError:
        return False
    return True


def sleep_call(calls: Calls, adapter: int, ms: int) -> None:
    """A host command that takes `ms` milliseconds (pydxg's SLEEP escape) on a new device."""
    from dxg.client import diag
    from dxg.client.api import Adapter, Node

    node = Node(calls.conn)
    ad = Adapter(node, calls.handle(adapter), 0)
    dev = ad.create_device()
    try:
        diag.sleep(dev, ms)
    finally:
        dev.close()


class Echo:
    """The floor: a 64-byte request/response over a Unix stream socket to a forked echo that
    blocks in recv (the baseline), or that serves from an asyncio loop's reader callback, as the
    node does (what any asyncio-based node pays before it does any work)."""

    def __init__(self, on_loop: bool = False) -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.pid = os.fork()
        if self.pid == 0:
            a.close()
            if on_loop:
                self._serve_on_loop(b)
            while True:
                d = b.recv(64)
                if not d:
                    os._exit(0)
                b.sendall(d)
        b.close()
        self.sock = a
        self.msg = b"x" * 64

    @staticmethod
    def _serve_on_loop(b: socket.socket) -> None:
        import asyncio

        loop = asyncio.new_event_loop()
        b.setblocking(False)

        def readable() -> None:
            d = b.recv(64)
            if not d:
                os._exit(0)
            b.send(d)

        loop.add_reader(b.fileno(), readable)
        loop.run_forever()
        os._exit(0)

    def rtt(self) -> None:
        self.sock.sendall(self.msg)
        got = 0
        while got < 64:
            got += len(self.sock.recv(64 - got))

    def close(self) -> None:
        self.sock.close()
        os.waitpid(self.pid, 0)


# ---- M1 ----------------------------------------------------------------------------------------


def m1(node: str, rounds: int, per: int) -> dict[str, Any]:
    echo = Echo()
    floor = Echo(on_loop=True)
    calls = Calls(node)
    samples: dict[str, list[float]] = {"raw": [], "floor": [], "local": [], "forwarded": []}
    fns = {"raw": echo.rtt, "floor": floor.rtt, "local": calls.enum_count,
           "forwarded": calls.query}
    for fn in fns.values():
        timed(fn, 200)
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name] += timed(fn, per)
    floor.close()  # first: its child holds a copy of the first echo's socket
    echo.close()
    calls.conn.close()
    return {k: {"p50": pct(v, 0.5), "p99": pct(v, 0.99), "n": len(v)} for k, v in samples.items()}


# ---- M2, M3 --------------------------------------------------------------------------------------


def parked_thread(node: str, seconds: float) -> dict[str, Any] | None:
    """One process, two threads: windows with the other thread idle and windows with it parked
    in a 2 s host call, alternating; this thread's call latency in each kind of window."""
    if not has_sleep():
        return None
    calls = Calls(node)  # both threads use this one connection, as threads of a process do
    free: list[float] = []
    parked: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        free += timed(calls.query, 300)
        busy = threading.Thread(target=sleep_call, args=(calls, 0, 2000))
        busy.start()
        time.sleep(0.1)  # the other thread is inside its call by now
        t_end = time.monotonic() + 1.5
        while time.monotonic() < t_end:
            parked += timed(calls.query, 50)
        busy.join()
    calls.conn.close()
    return {"free": free, "parked": parked}


PARKER = """
import sys
sys.path[:0] = [{here!r}]
from runtime import Calls, sleep_call
calls = Calls({node!r})
print("ready", flush=True)
for line in sys.stdin:
    sleep_call(calls, 0, 2000)
    print("done", flush=True)
"""


def parked_process(node: str, seconds: float) -> dict[str, Any] | None:
    """Another process parked for 2 s on adapter 0; this one's calls on adapter 1."""
    if not has_sleep():
        return None
    here = str(Path(__file__).resolve().parent)
    code = PARKER.format(here=here, node=node)
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdin is not None
    assert p.stdout.readline().strip() == "ready"
    calls = Calls(node)
    adapter = 1 if calls.count > 1 else 0
    free: list[float] = []
    parked: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        free += timed(lambda: calls.query(adapter), 300)
        p.stdin.write("go\n")
        p.stdin.flush()
        time.sleep(0.1)
        t_end = time.monotonic() + 1.5
        while time.monotonic() < t_end:
            parked += timed(lambda: calls.query(adapter), 50)
        assert p.stdout.readline().strip() == "done"
    p.stdin.close()
    p.wait(timeout=30)
    calls.conn.close()
    return {"free": free, "parked": parked}


# ---- M4 ------------------------------------------------------------------------------------------

WORKER = """
import json, os, sys, time
sys.path[:0] = [{here!r}]
from runtime import Calls
calls = Calls({node!r})
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stdin.readline()
end = time.monotonic() + {seconds}
lat = []
while time.monotonic() < end:
    t0 = time.perf_counter_ns(); calls.query(0); lat.append((time.perf_counter_ns() - t0) / 1000)
sys.stdout.write(json.dumps(lat) + "\\n"); sys.stdout.flush()
"""


def scale(node: str, clients: int, seconds: float) -> dict[str, Any]:
    here = str(Path(__file__).resolve().parent)
    code = WORKER.format(here=here, node=node, seconds=seconds)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(clients)]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    t0 = time.monotonic()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    lat: list[float] = []
    for p in procs:
        assert p.stdout is not None
        lat += json.loads(p.stdout.readline())
        p.wait(timeout=60)
    wall = time.monotonic() - t0
    return {"clients": clients, "calls": len(lat), "calls_per_s": len(lat) / wall,
            "p50": pct(lat, 0.5), "p99": pct(lat, 0.99)}


# ---- M5 ------------------------------------------------------------------------------------------

IDLER = """
import sys
sys.path[:0] = [{here!r}]
from dxg.client.connection import NodeConnection
from dxg import uapi
conns = []
for _ in range({n}):
    c = NodeConnection({node!r})
    a = uapi.d3dkmt_enumadapters3()
    a.filter.include_compute_only = 1
    c.ioctl(uapi.LX_DXENUMADAPTERS3, a)
    conns.append(c)
print("ready", flush=True)
sys.stdin.read()
"""


def idle(node: str, up_pid: int, clients: int) -> dict[str, Any]:
    here = str(Path(__file__).resolve().parent)
    per = 250
    before = rss_kib(up_pid)
    procs = []
    left = clients
    while left > 0:
        n = min(per, left)
        left -= n
        code = IDLER.format(here=here, n=n, node=node)
        p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        procs.append(p)
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    after = rss_kib(up_pid)
    for p in procs:
        assert p.stdin is not None
        p.stdin.close()
        p.wait(timeout=60)
    return {"clients": clients, "rss_before_kib": before, "rss_after_kib": after,
            "kib_per_client": (after - before) / clients}


# ---- the table -------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: m1,m2,m3,m4,m5")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    quick = args.quick
    tmp = Path(tempfile.mkdtemp(prefix="pydxg-bench."))
    os.environ.setdefault("DXG_NODE", str(tmp / "dxg.sock"))
    up, node = start_up(tmp, 2)
    if os.environ.get("BENCH_NICE"):
        os.setpriority(os.PRIO_PROCESS, up.pid, int(os.environ["BENCH_NICE"]))
        for tid in os.listdir(f"/proc/{up.pid}/task"):
            os.setpriority(os.PRIO_PROCESS, int(tid), int(os.environ["BENCH_NICE"]))
    results: dict[str, Any] = {}
    try:
        if "m1" not in skip:
            results["m1"] = m1(node, 5 if quick else 20, 200 if quick else 500)
        if "m2" not in skip:
            results["m2"] = parked_thread(node, 4 if quick else 12)
        if "m3" not in skip:
            results["m3"] = parked_process(node, 4 if quick else 12)
        if "m4" not in skip:
            results["m4"] = [scale(node, n, 2 if quick else 5)
                             for n in ((1, 8) if quick else (1, 8, 64))]
        if "m5" not in skip:
            results["m5"] = idle(node, up.pid, 200 if quick else 1000)
    finally:
        stop_up(up)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


def report(r: dict[str, Any]) -> None:
    print(f"{'measurement':<52} {'p50 us':>9} {'p99 us':>9} {'p50 ratio':>10} {'p99 ratio':>10}")
    if "m1" in r:
        m = r["m1"]
        b50, b99 = m["raw"]["p50"], m["raw"]["p99"]
        for key, label in (("raw", "M1 raw Unix-socket round trip (64 B)"),
                           ("floor", "M1 the same, echo on an asyncio loop (floor)"),
                           ("local", "M1 EnumAdapters3 count only (guest)"),
                           ("forwarded", "M1 QueryAdapterInfo (host, forwarded)")):
            v = m[key]
            print(f"{label:<52} {v['p50']:9.1f} {v['p99']:9.1f} {v['p50'] / b50:10.2f} "
                  f"{v['p99'] / b99:10.2f}")
    for key, label in (("m2", "M2 thread beside a thread parked 2 s"),
                       ("m3", "M3 adapter 1 beside a process parked 2 s on 0")):
        if key not in r:
            continue
        v = r[key]
        if v is None:
            print(f"{label:<52} {'n/a (no SLEEP escape in this checkout)':>40}")
            continue
        f50, f99 = pct(v["free"], 0.5), pct(v["free"], 0.99)
        p50, p99 = pct(v["parked"], 0.5), pct(v["parked"], 0.99)
        print(f"{label + ' (not parked)':<52} {f50:9.1f} {f99:9.1f} {1:10.2f} {1:10.2f}")
        print(f"{label + ' (parked)':<52} {p50:9.1f} {p99:9.1f} {p50 / f50:10.2f} "
              f"{p99 / f99:10.2f}")
    if "m4" in r:
        print()
        print(f"{'M4 clients':<12} {'calls':>8} {'calls/s':>10} {'p50 us':>9} {'p99 us':>9} "
              f"{'p99/p50':>8}")
        for v in r["m4"]:
            print(f"{v['clients']:<12} {v['calls']:>8} {v['calls_per_s']:>10.0f} "
                  f"{v['p50']:>9.1f} {v['p99']:>9.1f} {v['p99'] / v['p50']:>8.1f}")
    if "m5" in r:
        v = r["m5"]
        print()
        print(f"M5 {v['clients']} idle clients: daemon RSS {v['rss_before_kib']} -> "
              f"{v['rss_after_kib']} KiB, {v['kib_per_client']:.1f} KiB per client")


if __name__ == "__main__":
    sys.exit(main())
