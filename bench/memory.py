"""The device-memory benchmark: CPU access to an allocation through Lock2 against the same work on
an in-process buffer (zero copy on a local link), the copy path of a TCP host link against a raw
TCP socket, and what allocating, freeing and holding small allocations costs. One command, one
run, a table per part with its target:

    .venv/bin/python bench/memory.py [--quick] [--json FILE] [--skip a,b,c]

The stack runs in child processes started by the bench: `dxg up` (the embedded default) for A,
`dxg host --listen tcp:...` + `dxg guest --connect tcp:...` for B, and `dxg host --listen
unix:...` + `dxg guest --connect unix:...` for C (separate host and guest processes, so each
one's memory and descriptors can be read). Allocations go through the raw thunks (D3DKMT*) on a
NodeConnection, with the soft adapter's 16-byte descriptor (dxg.uapi.memory.AllocDesc) as each
allocation's private data. Measurements that are compared are interleaved in rounds (a window of
each in turn, the order swapped every round), so the noise of a busy machine hits both sides of
a ratio alike. A part that fails (a feature the checkout does not have yet) prints its error.
Parts A and B are the measurements of `dxg bench`'s M2 (dxg.bench.transfer: the client and the
measurements), shown here with their diagnostics and targets; the stacks are dxg.bench.stack's.

Measured:
  A  Lock2 + write + read + Unlock2 of 16 MiB and 256 MiB (write the whole allocation from a
     source ndarray with np.copyto, read it all back into a destination ndarray, on the address
     Lock2 returns), against the same write + read on a preallocated, already-touched
     in-process ndarray. Allocated once, warmed up once. p50/p99 per iteration, GB/s (2 x size
     moved per iteration, at the p50), ratio = in-process p50 / pydxg p50. Target >= 0.95.
     Where a gap comes from, in the same rounds: Lock2 + Unlock2 alone, and the same write + read
     on the mapping alone (held locked, no calls), with its ratio to the in-process buffer.
  B  TCP host link (Lock2 copies): Lock2 (fetches the allocation host -> guest) + a write of one
     byte per page + Unlock2 (writes it all back) of 128 KiB + 1 (page-rounded by the driver to
     132 KiB) and 64 MiB, against a raw loopback TCP connection to a forked Python echo moving
     the same (page-rounded) bytes the same way: an 8-byte request, the bytes back (recv_into),
     the bytes sent, a 1-byte ack. Ratio = raw p50 / pydxg p50. Target >= 0.8. In the same
     rounds, the floor of any Lock2 + Unlock2 on this link: two calls the guest forwards to the
     host (QueryAdapterInfo), no data.
  C  4 KiB allocations over a Unix host link: CreateAllocation + DestroyAllocation2 pairs/s and
     each call alone (calls/s, p50, p99); then N live allocations (10,000; 2,000 with --quick)
     made by a client process, each Lock2'ed once and Unlock2'ed (so every mapping exists, the
     data pages never written): per live allocation the VmRSS growth (bytes) and open
     descriptors of the host, the guest and the client processes, before, live, and after all
     are freed. "Back" means: the descriptors are what they were before, and the RSS kept after
     the free is at most 10% of the live growth (the bench's own criterion; a Python heap
     seldom returns every page). Then a second cycle (the same N made and freed again): "no
     growth" means its RSS after the free is within the same 10% of the first free's, and the
     descriptors are back again: what the first cycle kept is reused, not leaked per cycle.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dxg.bench import transfer
from dxg.bench.model import pct, timed
from dxg.bench.stack import split, up
from dxg.bench.transfer import Mem

KIB = 1 << 10
MIB = 1 << 20
ZERO_COPY_TARGET = 0.95
TCP_TARGET = 0.8
RSS_BACK = 0.10  # RSS kept after the free, as a share of the live growth, that still counts as back




def stats(samples: list[float]) -> dict[str, Any]:
    return {"p50": pct(samples, 0.5), "p99": pct(samples, 0.99), "n": len(samples)}


def proc_mem(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssShmem (KiB) and the open descriptors of process ``pid``."""
    out = {"fds": len(os.listdir(f"/proc/{pid}/fd"))}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "RssAnon", "RssShmem"):
                out[key] = int(line.split()[1])
    if "VmRSS" not in out:
        raise RuntimeError(f"process {pid} has exited")
    return out


# ---- A and B: the measurements of dxg bench's M2, with their diagnostics ------------------------


def zero_copy(node: str, size: int, rounds: int, per: int) -> dict[str, Any]:
    r = transfer.zero_copy(node, size, rounds, per)
    s = r.pop("samples")
    return {**r, "pydxg": stats(s["pydxg"]), "local": stats(s["local"]),
            "lock_unlock": stats(s["calls"]), "copy_on_mapping": stats(s["mapped"])}


def tcp_copy(node: str, size: int, rounds: int, per: int) -> dict[str, Any]:
    r = transfer.tcp_copy(node, size, rounds, per)
    s = r.pop("samples")
    return {**r, "pydxg": stats(s["pydxg"]), "raw": stats(s["raw"]),
            "two_forwarded_calls": stats(s["floor"])}


# ---- C: allocate / free, and what a live allocation costs -----------------------------------------


def alloc_calls(node: str, rounds: int, per: int) -> dict[str, Any]:
    """Calls/s of CreateAllocation + DestroyAllocation2 pairs, and of each alone, 4 KiB."""
    mem = Mem(node)
    held: list[int] = []
    samples: dict[str, list[float]] = {"pair": [], "create": [], "destroy": []}
    walls: dict[str, float] = {"pair": 0.0, "create": 0.0, "destroy": 0.0}

    def pair() -> None:
        mem.destroy(mem.create(4 * KIB))

    def create() -> None:
        held.append(mem.create(4 * KIB))

    def destroy() -> None:
        mem.destroy(held.pop())

    try:
        timed(pair, 100)  # warm up: the arena exists, the paths are hot
        for r in range(rounds):
            order = ("pair", "create", "destroy") if r % 2 == 0 else ("create", "destroy", "pair")
            for name in order:
                fn = {"pair": pair, "create": create, "destroy": destroy}[name]
                t0 = time.perf_counter()
                samples[name] += timed(fn, per)
                walls[name] += time.perf_counter() - t0
    finally:
        while held:
            mem.destroy(held.pop())
        mem.close()
    return {k: dict(stats(v), per_s=len(v) / walls[k]) for k, v in samples.items()}


HOLDER = """
import json, sys, time
from array import array
from dxg.bench.transfer import Mem
mem = Mem({node!r})
for _ in range(20):  # warm up: the arena, the block's mapping in the guest and here
    h = mem.create(4096); mem.lock(h); mem.unlock(h); mem.destroy(h)
print(json.dumps({{"ready": 1}}), flush=True)
held = array("I")
for line in sys.stdin:
    cmd = line.split()
    t0 = time.perf_counter()
    if cmd[0] == "alloc":
        for _ in range(int(cmd[1])):
            h = mem.create(4096)
            mem.lock(h)
            mem.unlock(h)
            held.append(h)
    elif cmd[0] == "free":
        for h in held:
            mem.destroy(h)
        held = array("I")
    print(json.dumps({{"s": time.perf_counter() - t0}}), flush=True)
mem.close()
"""


def settle(pids: dict[str, int], seconds: float = 3.0) -> dict[str, dict[str, int]]:
    """Every process's numbers once they stop moving (work a call left behind has run)."""
    last = {k: proc_mem(p) for k, p in pids.items()}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = {k: proc_mem(p) for k, p in pids.items()}
        if all(now[k]["fds"] == last[k]["fds"] and abs(now[k]["VmRSS"] - last[k]["VmRSS"]) <= 8
               for k in pids):
            return now
        last = now
    return last


def live(node: str, host_pid: int, guest_pid: int, count: int) -> dict[str, Any]:
    p = subprocess.Popen([sys.executable, "-c", HOLDER.format(node=node)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdin is not None and p.stdout is not None

    def ask(cmd: str) -> dict[str, Any]:
        assert p.stdin is not None and p.stdout is not None
        if cmd:
            p.stdin.write(cmd + "\n")
            p.stdin.flush()
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"the client process died ({p.wait()}) at {cmd or 'start'!r}")
        return json.loads(line)

    try:
        ask("")
        pids = {"host": host_pid, "guest": guest_pid, "client": p.pid}
        before = settle(pids)
        t_alloc = ask(f"alloc {count}")["s"]
        during = settle(pids)
        t_free = ask("free")["s"]
        after = settle(pids)
        # A second cycle: what the first one kept is used again, or it grows per cycle (a leak).
        ask(f"alloc {count}")
        during2 = settle(pids)
        ask("free")
        after2 = settle(pids)
        p.stdin.close()
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    out: dict[str, Any] = {"count": count, "alloc_s": t_alloc, "free_s": t_free}
    for k in pids:
        b, d, a, d2, a2 = before[k], during[k], after[k], during2[k], after2[k]
        grow = d["VmRSS"] - b["VmRSS"]
        kept = a["VmRSS"] - b["VmRSS"]
        out[k] = {"before": b, "live": d, "after": a, "live2": d2, "after2": a2,
                  "rss_bytes_per_alloc": grow * KIB / count,
                  "anon_bytes_per_alloc": (d["RssAnon"] - b["RssAnon"]) * KIB / count,
                  "fds_per_alloc": (d["fds"] - b["fds"]) / count,
                  "kept_bytes_per_alloc": kept * KIB / count,
                  "cycle2_growth_bytes_per_alloc": (a2["VmRSS"] - a["VmRSS"]) * KIB / count,
                  "back": a["fds"] == b["fds"] and kept <= max(RSS_BACK * grow, 64),
                  "no_growth": (a2["fds"] == b["fds"]
                                and a2["VmRSS"] - a["VmRSS"] <= max(RSS_BACK * grow, 64))}
    return out


# ---- the run ---------------------------------------------------------------------------------------


def guarded(fn: Any, *a: Any) -> Any:
    try:
        return fn(*a)
    except Exception as e:  # a part the checkout cannot run yet: reported, not fatal
        return {"error": f"{type(e).__name__}: {e}"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: a,b,c")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    quick = args.quick
    tmp = Path(tempfile.mkdtemp(prefix="pydxg-bench-mem."))
    results: dict[str, Any] = {"quick": quick, "logs": str(tmp)}
    if "a" not in skip:
        with up(tmp) as stack:
            results["a"] = [guarded(zero_copy, stack.node, 16 * MIB, 6 if quick else 20,
                                    4 if quick else 10),
                            guarded(zero_copy, stack.node, 256 * MIB, 3 if quick else 10,
                                    2 if quick else 3)]
    if "b" not in skip:
        with split(tmp, "tcp") as stack:
            results["b"] = [guarded(tcp_copy, stack.node, 128 * KIB + 1, 6 if quick else 20,
                                    10 if quick else 50),
                            guarded(tcp_copy, stack.node, 64 * MIB, 3 if quick else 8,
                                    2 if quick else 3)]
    if "c" not in skip:
        with split(tmp, "unix") as stack:
            results["c_calls"] = guarded(alloc_calls, stack.node, 4 if quick else 10,
                                         100 if quick else 300)
            results["c_live"] = guarded(live, stack.node, stack.daemon_pid, stack.guest_pid,
                                        2000 if quick else 10000)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


def _met(ok: bool) -> str:
    return "yes" if ok else "NO"


def _size(n: int) -> str:
    if n % MIB == 0:
        return f"{n // MIB} MiB"
    if n % KIB == 0:
        return f"{n // KIB} KiB"
    return f"{n // KIB} KiB+{n % KIB}"


def report(r: dict[str, Any]) -> None:
    if "a" in r:
        print("A  zero copy: Lock2 + write + read + Unlock2 vs the same write + read in-process "
              "(GB/s: 2 x size per p50)")
        print(f"{'size':<9} {'pydxg p50 ms':>12} {'p99 ms':>8} {'GB/s':>6} "
              f"{'local p50 ms':>12} {'p99 ms':>8} {'GB/s':>6} {'ratio':>6} {'p99 ratio':>9} "
              f"{'target':>7} {'met':>4} {'calls us':>8} {'mapped ms':>9} {'ratio':>6}")
        for v in r["a"]:
            if "error" in v:
                print(f"{'':<9} error: {v['error']}")
                continue
            px, lo = v["pydxg"], v["local"]
            ratio = lo["p50"] / px["p50"]
            moved = 2 * v["size"]
            print(f"{_size(v['size']):<9} {px['p50'] / 1e3:12.2f} {px['p99'] / 1e3:8.2f} "
                  f"{moved / px['p50'] / 1e3:6.2f} {lo['p50'] / 1e3:12.2f} {lo['p99'] / 1e3:8.2f} "
                  f"{moved / lo['p50'] / 1e3:6.2f} {ratio:6.3f} {lo['p99'] / px['p99']:9.3f} "
                  f"{'>=' + str(ZERO_COPY_TARGET):>7} {_met(ratio >= ZERO_COPY_TARGET):>4} "
                  f"{v['lock_unlock']['p50']:8.0f} {v['copy_on_mapping']['p50'] / 1e3:9.2f} "
                  f"{lo['p50'] / v['copy_on_mapping']['p50']:6.3f}"
                  + ("" if v["correct"] else "  (DATA WRONG)"))
        print()
    if "b" in r:
        print("B  TCP host link: Lock2 (fetch) + a byte per page + Unlock2 (write back) vs a raw "
              "loopback TCP echo (GB/s: 2 x bytes per p50)")
        print(f"{'size':<13} {'pydxg p50 ms':>12} {'p99 ms':>8} {'GB/s':>6} "
              f"{'raw p50 ms':>10} {'p99 ms':>8} {'GB/s':>6} {'ratio':>6} {'p99 ratio':>9} "
              f"{'target':>7} {'met':>4} {'2 calls ms':>10}")
        for v in r["b"]:
            if "error" in v:
                print(f"{'':<13} error: {v['error']}")
                continue
            px, raw = v["pydxg"], v["raw"]
            ratio = raw["p50"] / px["p50"]
            moved = 2 * v["moved"]
            print(f"{_size(v['size']):<13} {px['p50'] / 1e3:12.2f} {px['p99'] / 1e3:8.2f} "
                  f"{moved / px['p50'] / 1e3:6.2f} {raw['p50'] / 1e3:10.2f} "
                  f"{raw['p99'] / 1e3:8.2f} {moved / raw['p50'] / 1e3:6.2f} {ratio:6.3f} "
                  f"{raw['p99'] / px['p99']:9.3f} {'>=' + str(TCP_TARGET):>7} "
                  f"{_met(ratio >= TCP_TARGET):>4} {v['two_forwarded_calls']['p50'] / 1e3:10.2f}"
                  + ("" if v["correct"] else "  (DATA WRONG)"))
        print()
    if "c_calls" in r:
        v = r["c_calls"]
        print("C  4 KiB allocations over a Unix host link (host and guest in separate processes)")
        if "error" in v:
            print(f"   calls: error: {v['error']}")
        else:
            print(f"{'call':<40} {'n':>6} {'per s':>8} {'p50 us':>8} {'p99 us':>8}")
            for key, label in (("pair", "CreateAllocation + DestroyAllocation2"),
                               ("create", "CreateAllocation"),
                               ("destroy", "DestroyAllocation2")):
                x = v[key]
                print(f"{label:<40} {x['n']:>6} {x['per_s']:>8.0f} {x['p50']:>8.1f} "
                      f"{x['p99']:>8.1f}")
        print()
    if "c_live" in r:
        v = r["c_live"]
        if "error" in v:
            print(f"   live allocations: error: {v['error']}")
            return
        n = v["count"]
        print(f"C  {n} live 4 KiB allocations (each locked and unlocked once; made in "
              f"{v['alloc_s']:.1f} s, freed in {v['free_s']:.1f} s): VmRSS KiB and open fds")
        print(f"{'process':<8} {'RSS before':>10} {'live':>8} {'freed':>8} {'B/alloc':>8} "
              f"{'kept B/alloc':>12} {'fds before':>10} {'live':>6} {'freed':>6} "
              f"{'fds/alloc':>9} {'back':>5} {'2nd live':>9} {'2nd freed':>9} {'no growth':>9}")
        for k in ("host", "guest", "client"):
            x = v[k]
            b, d, a = x["before"], x["live"], x["after"]
            print(f"{k:<8} {b['VmRSS']:>10} {d['VmRSS']:>8} {a['VmRSS']:>8} "
                  f"{x['rss_bytes_per_alloc']:>8.0f} {x['kept_bytes_per_alloc']:>12.0f} "
                  f"{b['fds']:>10} {d['fds']:>6} {a['fds']:>6} {x['fds_per_alloc']:>9.4f} "
                  f"{_met(x['back']):>5} {x['live2']['VmRSS']:>9} {x['after2']['VmRSS']:>9} "
                  f"{_met(x['no_growth']):>9}")


if __name__ == "__main__":
    sys.exit(main())
