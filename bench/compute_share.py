"""The compute-share benchmark: two processes with a 3:1 compute share on one adapter, both
saturating it, against a 1:1 pair on the same adapter. One command, one run, one table:

    .venv/bin/python bench/compute_share.py [--quick] [--json FILE] [--size N]

The stack is `dxg up --policy FILE` (the embedded default) started by the bench in a child
process, with a policy that gives three users compute shares: A (uid 41201) 3, B (41202) 1 and
C (41203) 1 (docs/policy.md). Three child processes, one per user (they start as root to import
pydxg, then become the user: the bench needs root), each keep 4 hardware queues of one context
6 submissions deep with N x N f32 GEMMs (N = 1024; 512 with --quick), from the moment they are
told to go until told to pause. The adapter has one engine slot per core (docs/execution.md),
and each process alone could fill them all, so the engine's time is what they share.

Windows of two kinds are interleaved in rounds (which goes first swapped every round): A with
B (shares 3:1) and C with B (1:1, the baseline). In each window both processes go, run for a
moment to reach a steady state, then for ``--window`` seconds the bench reads, at the start and
at the end, each process's engine time from the host's census (``compute.adapters[].engine_ns``
+ ``running_ns``: measured on the threads that ran its command buffers, the jobs still running
counted up to the reading) and its GEMMs done (its queues' progress fences), then pauses both
(what they submitted drains before the next window). Per kind, over all its windows: each
process's engine time and share of it, GEMMs/s, and the ratio of the two (engine time, and
GEMMs done). Target (issue 9): the 3:1 pair's engine-time ratio within 5% of 3. The header says
how many cores other processes kept busy meanwhile (from /proc/stat): a run with much of it is
noise, not pydxg.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_busy, start_up, stop_up

TOLERANCE = 0.05
USERS = {"A": (41201, 3), "B": (41202, 1), "C": (41203, 1)}  # name: (uid, compute share)
PAIRS = {"3:1": ("A", "B"), "1:1": ("C", "B")}
QUEUES, DEPTH = 4, 6

FLOOD = r"""
import json, os, queue, sys, threading, time
import numpy as np
from dxg.backends.softcmd import CommandBuffer, DType, Operand
from dxg.client import open_node
node_path, uid, n, queues, depth = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:6])
rng = np.random.default_rng(uid)  # (before the switch: NumPy imports its parts lazily)
host = [rng.standard_normal((n, n), dtype=np.float32) for _ in range(2)]
os.setgroups([]); os.setgid(uid); os.setuid(uid)
node = open_node(node_path)
dev = node.adapters()[0].create_device()
ctx = dev.create_context()
qs = [ctx.hwqueue() for _ in range(queues)]
f32 = DType.of(np.float32)
a, b = dev.array(host[0]), dev.array(host[1])
va, vb = int(a.map_gpu()), int(b.map_gpu())
keep, cmds = [a, b], []
for _ in qs:
    c = dev.empty((n, n), np.float32)
    raw = CommandBuffer().gemm(Operand(int(c.map_gpu()), f32, (n, n)), Operand(va, f32, (n, n)),
                               Operand(vb, f32, (n, n))).tobytes()
    buf = dev.allocate(len(raw)); buf.upload(raw)
    keep += [c, buf]; cmds.append((int(buf.map_gpu()), len(raw)))
inbox = queue.Queue()
def reader():
    for line in sys.stdin:
        inbox.put(line.strip())
    inbox.put("quit")
threading.Thread(target=reader, daemon=True).start()
print(json.dumps({"pid": os.getpid()}), flush=True)
feeding = False
while True:
    try:
        cmd = inbox.get(timeout=0.001 if feeding else None)
    except queue.Empty:
        cmd = ""
    if cmd == "go":
        feeding = True
    elif cmd == "pause":
        feeding = False
        for q in qs:
            q.wait(timeout=300)
    elif cmd == "count":
        print(json.dumps({"done": sum(q.progress for q in qs)}), flush=True)
    elif cmd == "quit":
        break
    if cmd in ("go", "pause"):
        print(json.dumps({"ok": True}), flush=True)
    if feeding:
        for q, (v, ln) in zip(qs, cmds):
            while q.submitted - q.progress < depth:
                q.submit(v, ln)
for q in qs:
    q.wait(timeout=300)
dev.close(); node.close()
"""


class Flood:
    """One user's flood process, driven line by line."""

    def __init__(self, node: str, uid: int, n: int, log: Path) -> None:
        self.p = subprocess.Popen([sys.executable, "-c", FLOOD, node, str(uid), str(n),
                                   str(QUEUES), str(DEPTH)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=open(log, "wb"), text=True)
        self.pid = int(self.line("start")["pid"])

    def line(self, what: str) -> dict[str, Any]:
        assert self.p.stdout is not None
        text = self.p.stdout.readline()
        if not text:
            raise RuntimeError(f"a flood process died ({self.p.wait()}) at {what!r}")
        return dict(json.loads(text))

    def ask(self, cmd: str) -> dict[str, Any]:
        assert self.p.stdin is not None
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self.line(cmd)

    def close(self) -> None:
        if self.p.stdin is not None:
            self.p.stdin.close()
        try:
            self.p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def engine_ns(node: Any, pids: list[int]) -> dict[int, int]:
    """Each process's engine time on the adapter now (ended jobs + running ones so far), from
    the host census."""
    out = dict.fromkeys(pids, 0)
    for proc in processes(node):
        if proc.get("pid") in out:
            out[proc["pid"]] = sum(a["engine_ns"] + a["running_ns"]
                                   for a in proc["compute"]["adapters"])
    return out


def processes(node: Any) -> list[dict[str, Any]]:
    """The processes in the census of this guest by every host (the node's admin census)."""
    return [proc for host in node.admin({"op": "census"})["hosts"]
            for proc in (host.get("census") or {}).get("processes", [])]


def window(node: Any, floods: list[Flood], settle: float, seconds: float) -> dict[str, Any]:
    """Both go; after ``settle`` s, ``seconds`` s measured; both pause."""
    for f in floods:
        f.ask("go")
    time.sleep(settle)
    pids = [f.pid for f in floods]
    e0, d0, t0 = engine_ns(node, pids), [f.ask("count")["done"] for f in floods], time.monotonic()
    time.sleep(seconds)
    e1, d1, t1 = engine_ns(node, pids), [f.ask("count")["done"] for f in floods], time.monotonic()
    for f in floods:
        f.ask("pause")
    return {"engine_ns": [e1[p] - e0[p] for p in pids],
            "gemms": [b - a for a, b in zip(d0, d1, strict=True)], "seconds": t1 - t0}


def measure(node: str, n: int, rounds: int, seconds: float, tmp: Path) -> dict[str, Any]:
    from dxg.client import open_node

    floods = {name: Flood(node, uid, n, tmp / f"flood-{name}.log")
              for name, (uid, _share) in USERS.items()}
    sums = {kind: {"engine_ns": [0, 0], "gemms": [0, 0], "seconds": 0.0, "windows": []}
            for kind in PAIRS}
    try:
        with open_node(node) as admin:
            shares = {proc["pid"]: proc["compute"]["share"] for proc in processes(admin)}
            window(admin, [floods["A"]], 0.5, 0.5)  # warm-up: pages, BLAS
            kinds = list(PAIRS)
            for r in range(rounds):
                for kind in kinds if r % 2 == 0 else kinds[::-1]:
                    w = window(admin, [floods[x] for x in PAIRS[kind]], 1.0, seconds)
                    s = sums[kind]
                    for i in range(2):
                        s["engine_ns"][i] += w["engine_ns"][i]
                        s["gemms"][i] += w["gemms"][i]
                    s["seconds"] += w["seconds"]
                    s["windows"].append(w["engine_ns"][0] / max(1, w["engine_ns"][1]))
    finally:
        for f in floods.values():
            f.close()
    out: dict[str, Any] = {"n": n, "rounds": rounds, "window_s": seconds,
                           "shares": {name: shares.get(f.pid) for name, f in floods.items()}}
    for kind, s in sums.items():
        e, g = s["engine_ns"], s["gemms"]
        want = USERS[PAIRS[kind][0]][1] / USERS[PAIRS[kind][1]][1]
        ratio = e[0] / max(1, e[1])
        out[kind] = {"pair": PAIRS[kind], "engine_s": [x / 1e9 for x in e],
                     "engine_share": [x / max(1, sum(e)) for x in e],
                     "gemms_per_s": [x / s["seconds"] for x in g],
                     "ratio": ratio, "gemm_ratio": g[0] / max(1, g[1]), "target": want,
                     "deviation": ratio / want - 1, "windows": s["windows"]}
    return out


def report(r: dict[str, Any]) -> None:
    m = r["measured"]
    print(f"Compute shares: two processes saturating one adapter ({r['cpus']} engine slots: "
          f"one per core), each {QUEUES} queues x {DEPTH} deep of {m['n']} x {m['n']} f32 "
          f"GEMMs; {m['rounds']} rounds of {m['window_s']:.0f} s windows, interleaved")
    print(f"shares the host was told: {m['shares']}; other processes kept "
          f"{r['other_cores']:.2f} cores busy; {r['seconds']:.0f} s")
    print(f"{'pair':<6} {'share':>5} {'engine s (1st, 2nd)':>19} {'engine %':>13} "
          f"{'GEMMs/s':>13} {'ratio':>6} {'GEMM ratio':>10} {'target':>7} {'off by':>7}  result")
    for kind in PAIRS:
        v = m[kind]
        a, b = v["pair"]
        ok = abs(v["deviation"]) <= TOLERANCE if kind == "3:1" else None
        result = "PASS" if ok else "FAIL" if ok is not None else "(baseline)"
        print(f"{a + ':' + b:<6} {kind:>5} {v['engine_s'][0]:9.2f} {v['engine_s'][1]:9.2f} "
              f"{v['engine_share'][0] * 100:6.1f} {v['engine_share'][1] * 100:6.1f} "
              f"{v['gemms_per_s'][0]:6.1f} {v['gemms_per_s'][1]:6.1f} {v['ratio']:6.3f} "
              f"{v['gemm_ratio']:10.3f} {v['target']:7.2f} {v['deviation'] * 100:+6.1f}%  "
              f"{result}")
    for kind in PAIRS:
        print(f"  {kind} windows (engine ratio): "
              + " ".join(f"{x:.2f}" for x in m[kind]["windows"]))
    print(f"ratio: engine time of the 1st / the 2nd (GEMM ratio: GEMMs done); target: the 3:1 "
          f"pair's engine-time ratio within {TOLERANCE:.0%} of 3")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller GEMMs, fewer, shorter rounds")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--size", type=int, default=0, help="GEMM size N (default 1024; 512 quick)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/compute_share.py: needs root (its processes run as three users)",
              file=sys.stderr)
        return 1
    n = args.size or (512 if args.quick else 1024)
    rounds, seconds = (2, 3.0) if args.quick else (3, 6.0)
    tmp = Path(tempfile.mkdtemp(prefix="pydxg-bench-share."))
    os.chmod(tmp, 0o755)  # (the users' processes reach the node in it)
    policy = tmp / "policy.toml"
    policy.write_text("".join(f"[[rules]]\nname = \"{name}\"\nuids = [{uid}]\n"
                              f"compute_share = {share}\n\n"
                              for name, (uid, share) in USERS.items()))
    busy0, own0 = cpu_busy()
    t0 = time.monotonic()
    up, node = start_up(tmp, 1, "--policy", str(policy))
    results: dict[str, Any] = {"cpus": os.cpu_count(), "logs": str(tmp)}
    try:
        results["measured"] = measure(node, n, rounds, seconds, tmp)
    finally:
        stop_up(up)
    results["seconds"] = time.monotonic() - t0
    busy1, own1 = cpu_busy()
    results["other_cores"] = max(0.0, (busy1 - busy0) - (own1 - own0)) / results["seconds"]
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
