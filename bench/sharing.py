"""The sharing benchmark: a 256 MiB resource shared by one process and opened in a second one,
read in the opener against the same read in the owner. One command, one run, one table:

    .venv/bin/python bench/sharing.py [--quick] [--json FILE] [--size MIB]

The stack is `dxg up` (the embedded default, a local link) started by the bench in a child
process. Two more child processes: the *owner* makes the shared resource
(``device.shared_resource``), fills it and shares it (``resource.share()``); the descriptor goes
to the *opener* by SCM_RIGHTS on a socket pair the bench made, and the opener opens it
(``device.open_resource``). Both read the same memory the same way, on preallocated, touched
destinations (np.frombuffer over the mapping Lock2 gave them):

  copy       np.copyto(dst, view): the 256 MiB copied out (GB/s: size per p50)
  sum        view.sum(dtype=np.uint64) over the bytes viewed as u64
  map+copy   Lock2, the copy, Unlock2: what a reader that maps each time pays

The reads are interleaved in rounds (a window of each process in turn, which goes first swapped
every round), so the noise of a busy machine hits both sides alike. Ratio = owner p50 / opener
p50; the issue's target: >= 0.95. Also reported: what opening costs the opener once
(QueryResourceInfoFromNtHandle + OpenResourceFromNtHandle, then the first Lock2 with its map),
and a check that the opener read the owner's bytes (its checksum).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import pct, start_up, stop_up

MIB = 1 << 20
TARGET = 0.95
MODES = ("copy", "sum", "map+copy")

READER = r"""
import json, os, socket, sys, time
import numpy as np
from dxg.client import open_node
node_path, role, sock_fd, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
node = open_node(node_path)
dev = node.adapters()[0].create_device()
sock = socket.socket(fileno=sock_fd)
out = {}
if role == "owner":
    res = dev.shared_resource(size)
    (alloc,) = res.allocations
    with alloc.map(np.uint64) as v:
        v[:] = np.arange(v.size, dtype=np.uint64)
    with res.share(read_only=True) as handle:
        socket.send_fds(sock, [b"share"], [handle.fileno()])
        sock.recv(1)  # the opener has it (our copy can go)
else:
    _, fds, _, _ = socket.recv_fds(sock, 16, 1)
    t0 = time.perf_counter()
    res = dev.open_resource(fds[0])
    t1 = time.perf_counter()
    (alloc,) = res.allocations
    with alloc.map(np.uint64):
        t2 = time.perf_counter()
    sock.send(b"k")
    out = {"open_s": t1 - t0, "first_map_s": t2 - t1}
    os.close(fds[0])
dst = np.ones(size // 8, np.uint64)  # touched
held = alloc.map(np.uint64)
view = held.__enter__()
expect = int(view.sum(dtype=np.uint64))
out["checksum"] = expect
print(json.dumps(out), flush=True)

def once(mode):
    t0 = time.perf_counter()
    if mode == "copy":
        np.copyto(dst, view)
    elif mode == "sum":
        view.sum(dtype=np.uint64)
    else:
        with alloc.map(np.uint64) as v:
            np.copyto(dst, v)
    return time.perf_counter() - t0

for line in sys.stdin:
    mode, n = line.split()
    once(mode)  # (warm: the window starts hot)
    print(json.dumps([once(mode) for _ in range(int(n))]), flush=True)
held.__exit__(None, None, None)
"""


class Reader:
    def __init__(self, node: str, role: str, sock: socket.socket, size: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", READER, node, role, str(sock.fileno()), str(size)],
            pass_fds=(sock.fileno(),), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def line(self) -> Any:
        assert self.proc.stdout is not None
        text = self.proc.stdout.readline()
        if not text:
            raise RuntimeError(f"a reader died ({self.proc.wait()})")
        return json.loads(text)

    def run(self, mode: str, n: int) -> list[float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{mode} {n}\n")
        self.proc.stdin.flush()
        return self.line()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def measure(node: str, size: int, rounds: int, per_window: int) -> dict[str, Any]:
    a, b = socket.socketpair()
    owner = Reader(node, "owner", a, size)
    opener = Reader(node, "opener", b, size)
    a.close()
    b.close()
    try:
        first = opener.line()  # (the opener prints once it has opened and mapped)
        own = owner.line()
        result: dict[str, Any] = {"size": size, "open_s": first["open_s"],
                                  "first_map_s": first["first_map_s"],
                                  "same_bytes": first["checksum"] == own["checksum"]}
        for mode in MODES:
            times: dict[str, list[float]] = {"owner": [], "opener": []}
            for r in range(rounds):
                order = (("owner", owner), ("opener", opener))
                for name, reader in (order if r % 2 == 0 else order[::-1]):
                    times[name] += reader.run(mode, per_window)
            result[mode] = {k: {"p50": pct(v, 0.5), "p99": pct(v, 0.99), "n": len(v)}
                            for k, v in times.items()}
        return result
    finally:
        owner.close()
        opener.close()


def report(r: dict[str, Any]) -> None:
    size = r["size"]
    print(f"Sharing: a {size // MIB} MiB resource read in the process that opened it (by "
          f"descriptor) vs in its owner")
    print(f"opening: {r['open_s'] * 1e3:.2f} ms (query + open), first map "
          f"{r['first_map_s'] * 1e3:.2f} ms; the opener read the owner's bytes: "
          f"{'yes' if r['same_bytes'] else 'NO'}")
    print(f"{'read':<10} {'opener p50 ms':>13} {'p99 ms':>8} {'GB/s':>6} {'owner p50 ms':>12} "
          f"{'p99 ms':>8} {'GB/s':>6} {'ratio':>6} {'target':>7} {'met':>4}")
    for mode in MODES:
        op, ow = r[mode]["opener"], r[mode]["owner"]
        ratio = ow["p50"] / op["p50"]
        print(f"{mode:<10} {op['p50'] * 1e3:13.2f} {op['p99'] * 1e3:8.2f} "
              f"{size / op['p50'] / 1e9:6.2f} {ow['p50'] * 1e3:12.2f} {ow['p99'] * 1e3:8.2f} "
              f"{size / ow['p50'] / 1e9:6.2f} {ratio:6.2f} {TARGET:>7.2f} "
              f"{'yes' if ratio >= TARGET else 'NO':>4}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--size", type=int, default=256, metavar="MIB", help="resource size")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pydxg-bench-share."))
    up, node = start_up(tmp)
    try:
        result = measure(node, args.size * MIB, 4 if args.quick else 10,
                         3 if args.quick else 5)
    finally:
        stop_up(up)
    result["quick"] = args.quick
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    ok = all(result[m]["owner"]["p50"] / result[m]["opener"]["p50"] >= TARGET for m in MODES)
    return 0 if ok and result["same_bytes"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
