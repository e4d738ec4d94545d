"""Latency of one ioctl through the socket node, against a raw Unix-socket round trip measured in
the same run on the same machine.

    .venv/bin/python bench/latency.py [--iterations N]

Starts the embedded stack (`dxg up`) in a child process, then times from this process:
- raw: a 64-byte request/response over a Unix stream socket to a forked echo process (the floor
  any socket-based node pays);
- EnumAdapters3 with adapter_count 0 (answered by the guest alone);
- QueryAdapterInfo(DRIVER_DESCRIPTION) (forwarded to the host and back).
Prints p50/p99 in microseconds and each as a ratio of the raw round trip.
"""

import argparse
import ctypes
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def raw_rtt(n: int) -> list[float]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        a.close()
        while True:
            d = b.recv(64)
            if not d:
                os._exit(0)
            b.sendall(d)
    b.close()
    msg = b"x" * 64
    out = []
    for i in range(n + 200):
        t0 = time.perf_counter_ns()
        a.sendall(msg)
        got = 0
        while got < 64:
            got += len(a.recv(64 - got))
        if i >= 200:
            out.append((time.perf_counter_ns() - t0) / 1000)
    a.close()
    os.waitpid(pid, 0)
    return out


def timed(fn, n: int) -> list[float]:
    for _ in range(200):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t0) / 1000)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=5000)
    args = ap.parse_args()
    from dxg import uapi
    from dxg.client.connection import NodeConnection
    from dxg.uapi import wddm

    tmp = Path(tempfile.mkdtemp(prefix="pydxg-bench."))
    node_path = tmp / "dxg.sock"
    env = dict(os.environ, DXG_NODE=str(node_path))
    up = subprocess.Popen([sys.executable, "-m", "dxg.cli.main", "up", "--adapters", "2"],
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        subprocess.run([sys.executable, "-m", "dxg.cli.main", "wait", "--node", str(node_path),
                        "--adapters", "2", "--timeout", "60"], check=True)
        conn = NodeConnection(str(node_path))
        enum = uapi.d3dkmt_enumadapters3()
        enum.filter.include_compute_only = 1

        def enum_count() -> None:
            enum.adapter_count = 0
            enum.adapters = 0
            assert conn.ioctl(uapi.LX_DXENUMADAPTERS3, enum) == 0

        infos = (uapi.d3dkmt_adapterinfo * 8)()
        enum.adapter_count = 8
        enum.adapters = ctypes.addressof(infos)
        assert conn.ioctl(uapi.LX_DXENUMADAPTERS3, enum) == 0
        desc = wddm.D3DKMT_DRIVER_DESCRIPTION()
        q = uapi.d3dkmt_queryadapterinfo()
        q.adapter.v = infos[0].adapter_handle.v
        q.type = wddm.KMTQUERYADAPTERINFOTYPE.KMTQAITYPE_DRIVER_DESCRIPTION
        q.private_data = ctypes.addressof(desc)
        q.private_data_size = ctypes.sizeof(desc)

        def query() -> None:
            assert conn.ioctl(uapi.LX_DXQUERYADAPTERINFO, q) == 0

        n = args.iterations
        rows = [("raw Unix-socket round trip (64 B)", raw_rtt(n)),
                ("EnumAdapters3, count only (local)", timed(enum_count, n)),
                ("QueryAdapterInfo DRIVER_DESCRIPTION (host)", timed(query, n))]
        conn.close()
    finally:
        up.terminate()
        up.wait(timeout=30)
    base50, base99 = pct(rows[0][1], 0.5), pct(rows[0][1], 0.99)
    print(f"{'measurement':<45} {'p50 us':>9} {'p99 us':>9} {'p50 ratio':>10} {'p99 ratio':>10}")
    for name, s in rows:
        p50, p99 = pct(s, 0.5), pct(s, 0.99)
        print(f"{name:<45} {p50:9.1f} {p99:9.1f} {p50 / base50:10.2f} {p99 / base99:10.2f}")
    print(f"({n} iterations each; mean raw {statistics.mean(rows[0][1]):.1f} us)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
