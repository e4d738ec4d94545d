"""One ioctl through the FUSE device file against the same ioctl through the socket node.

    .venv/bin/python bench/fuse_vs_socket.py [--iterations N]     (root; needs FUSE and gcc)

Starts ``dxg up --dev-node`` (host + guest + socket node + FUSE file) in a child process, then
times, from client processes of its own:
- EnumAdapters3 with adapter_count 0 (answered by the guest alone);
- QueryAdapterInfo(ADAPTERTYPE) (forwarded to the host and back);
each from a Python client through the socket (``dxg.client.NodeConnection.ioctl``), from a
Python client through the file (``fcntl.ioctl``; same ctypes structs, same process), and from
the C program ``tests/c/dxg_test.c`` through the file (``bench`` mode). Prints p50/p99 in
microseconds and the FUSE/socket ratios.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from dxg.bench.model import pct

ROOT = Path(__file__).resolve().parent.parent
KMTQAITYPE_ADAPTERTYPE = 15




def timed(fn: Callable[[], int], n: int) -> list[float]:
    for _ in range(min(200, n)):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        ret = fn()
        out.append((time.perf_counter_ns() - t0) / 1000)
        if ret != 0:
            raise SystemExit(f"ioctl failed: {ret}")
    return out


def start_stack(tmp: Path) -> tuple[subprocess.Popen, Path, Path]:
    node, dev = tmp / "dxg.sock", tmp / "dxg"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dxg.cli.main", "up", "--node", str(node), "--dev-node", str(dev)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    seen: list[str] = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
        line = proc.stdout.readline() if ready else ""
        if not line:
            break
        seen.append(line)
        if line.startswith("device file:"):
            return proc, node, dev
    proc.terminate()  # SIGTERM: `dxg up` unmounts on the way out; SIGKILL would leave a mount
    proc.wait(timeout=30)
    raise SystemExit("dxg up did not start a device file (root and FUSE needed):\n"
                     + "".join(seen[-10:]))


def python_clients(node: Path, dev: Path, n: int) -> dict[str, dict[str, list[float]]]:
    from dxg.client.connection import NodeConnection
    from dxg.uapi import structs as s
    from dxg.uapi.ioctls import LX_DXENUMADAPTERS3, LX_DXQUERYADAPTERINFO

    def first_adapter(call: Callable[[int, ctypes.Structure], int]) -> int:
        infos = (s.d3dkmt_adapterinfo * 64)()
        e = s.d3dkmt_enumadapters3()
        e.filter.include_compute_only = 1
        e.adapter_count = 64
        e.adapters = ctypes.addressof(infos)
        if call(LX_DXENUMADAPTERS3, e) != 0 or e.adapter_count < 1:
            raise SystemExit("no adapters")
        return int(infos[0].adapter_handle.v)

    def calls(call: Callable[[int, ctypes.Structure], int]) -> dict[str, list[float]]:
        handle = first_adapter(call)
        payload = ctypes.c_uint32()
        q = s.d3dkmt_queryadapterinfo()
        q.adapter.v = handle
        q.type = KMTQAITYPE_ADAPTERTYPE
        q.private_data = ctypes.addressof(payload)
        q.private_data_size = 4

        def enum_count() -> int:
            e = s.d3dkmt_enumadapters3()
            e.filter.include_compute_only = 1
            return call(LX_DXENUMADAPTERS3, e)

        return {"EnumAdapters3 (count only)": timed(enum_count, n),
                "QueryAdapterInfo (ADAPTERTYPE)": timed(
                    lambda: call(LX_DXQUERYADAPTERINFO, q), n)}

    out = {}
    with NodeConnection(node) as conn:
        out["socket, Python client"] = calls(conn.ioctl)
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        def file_ioctl(code: int, args: ctypes.Structure) -> int:
            try:
                return fcntl.ioctl(fd, code, args, True)
            except OSError as e:
                return -e.errno
        out["FUSE file, Python client"] = calls(file_ioctl)
    finally:
        os.close(fd)
    return out


def c_client(dev: Path, n: int, tmp: Path) -> dict[str, tuple[float, float]]:
    gcc = shutil.which("gcc")
    if gcc is None:
        return {}
    header = subprocess.run([sys.executable, "-m", "dxg.cli.main", "uapi-header"],
                            capture_output=True, text=True, check=True).stdout
    (tmp / "dxg_uapi.h").write_text(header)
    exe = tmp / "dxg_test"
    subprocess.run([gcc, "-O2", "-pthread", "-I", str(tmp), str(ROOT / "tests/c/dxg_test.c"),
                    "-o", str(exe)], check=True)
    run = subprocess.run([str(exe), "-q", "-n", str(n), str(dev), "bench"], capture_output=True,
                         text=True, check=True)
    names = {"LX_DXENUMADAPTERS3_count": "EnumAdapters3 (count only)",
             "LX_DXQUERYADAPTERINFO_adaptertype": "QueryAdapterInfo (ADAPTERTYPE)"}
    return {names[m[0]]: (float(m[1]), float(m[2]))
            for m in re.findall(r"^bench (\w+) n=\d+ p50_us=([\d.]+) p99_us=([\d.]+)",
                                run.stdout, re.M)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=3000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pydxg-bench-") as d:
        tmp = Path(d)
        stack, node, dev = start_stack(tmp)
        try:
            py = python_clients(node, dev, args.iterations)
            c = c_client(dev, args.iterations, tmp)
        finally:
            stack.send_signal(signal.SIGTERM)
            try:
                stack.wait(timeout=30)
            except subprocess.TimeoutExpired:
                stack.kill()
    sock, fuse = py["socket, Python client"], py["FUSE file, Python client"]
    print(f"{args.iterations} calls each, {os.cpu_count()} CPUs; microseconds")
    print()
    print("| call | socket p50 / p99 (Python) | FUSE p50 / p99 (Python) | FUSE/socket p50 | "
          "FUSE/socket p99 | FUSE p50 / p99 (C) | C-FUSE/Python-socket p50 |")
    print("|---|---|---|---|---|---|---|")
    for call in sock:
        s50, s99 = pct(sock[call], 0.5), pct(sock[call], 0.99)
        f50, f99 = pct(fuse[call], 0.5), pct(fuse[call], 0.99)
        c50, c99 = c.get(call, (float("nan"), float("nan")))
        print(f"| {call} | {s50:.1f} / {s99:.1f} | {f50:.1f} / {f99:.1f} | {f50 / s50:.2f} | "
              f"{f99 / s99:.2f} | {c50:.1f} / {c99:.1f} | {c50 / s50:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
