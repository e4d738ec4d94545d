"""Faults, end to end with real processes: many clients working while random ones are SIGKILLed
(nothing of theirs is left on guest or host: handles, bytes, descriptors), the host killed in
the middle of execution (every waiter wakes with device-removed within a second; when the host
comes back so do the adapters, and new work runs), and the guest killed (the host frees its
partition: memory back to its baseline)."""

from __future__ import annotations

import json
import os
import random
import selectors
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import CLIENTS, make_stack, wait_until
from dxg.guest.driver import GuestDriver
from dxg.host.config import HostConfig
from dxg.host.host import Host
from dxg.node.server import SocketNode
from dxg.uapi.ntstatus import NTSTATUS

CHAOS_CLIENTS = 64
CHAOS_SECONDS = float(os.environ.get("PYDXG_CHAOS_SECONDS", "60"))
ENV = dict(os.environ, PYTHONUNBUFFERED="1")


def open_fds(*procs: subprocess.Popen[str]) -> Counter[tuple[int, int]]:
    """The files this process holds open, counted by identity (device and inode, so a number
    reused for another file is not mistaken for the old one, and a leaked duplicate of a file
    open at the start still counts), less the pipes to ``procs`` (the test's own)."""
    mine = {f.fileno() for p in procs for f in (p.stdin, p.stdout, p.stderr)
            if f is not None and not f.closed}
    out: Counter[tuple[int, int]] = Counter()
    for name in os.listdir("/proc/self/fd"):
        if int(name) in mine:
            continue
        try:
            st = os.stat(f"/proc/self/fd/{name}")
        except OSError:  # closed meanwhile (the listing's own descriptor, among others)
            continue
        out[(st.st_dev, st.st_ino)] += 1
    return out


def none_left(before: Counter[tuple[int, int]], *procs: subprocess.Popen[str]) -> bool:
    """No descriptor is open now that was not before: no new file, and no more copies of a
    file than there were (what went meanwhile does not matter)."""
    return not open_fds(*procs) - before


def host_left(host: Host, driver: GuestDriver | None = None) -> dict[str, int]:
    """What the host holds for guests' processes: objects, handles, committed bytes, shared
    objects (each partition's "shared" census: objects, references, waits, blocks, bytes);
    with ``driver``, what its guest keeps of sharing too (share descriptors, sync files)."""
    census = host.census()
    totals = census["totals"]
    used = sum(g["used"] for a in census["adapters"] for g in a["memory"].values())
    left = {"processes": totals["processes"], "devices": totals["devices"],
            "contexts": totals["contexts"], "handles": totals["handles"], "bytes": used}
    shared: Counter[str] = Counter()
    for part in census["partitions"]:
        shared.update(part["shared"])
    left.update({f"shared_{k}": v for k, v in shared.items()})
    if driver is not None:
        left.update({f"guest_{k}": v for k, v in driver.snapshot()["shares"].items()})
    return left


def worker(node_path: str, rounds: int = 0) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(CLIENTS / "worker.py"), node_path, str(rounds)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=ENV)


# ---- many clients, random SIGKILLs ---------------------------------------------------------------


def test_sixty_four_clients_working_while_random_ones_are_killed(tmp_path: Path) -> None:
    rnd = random.Random(9)
    with make_stack(tmp_path, adapters=1) as st:
        fds = open_fds()
        baseline = host_left(st.host, st.driver)
        assert baseline["guest_share_fds"] == baseline["guest_sync_files"] == 0
        workers: dict[int, subprocess.Popen[str]] = {}
        sel = selectors.DefaultSelector()

        def spawn() -> None:
            w = worker(st.node_path)
            workers[w.pid] = w
            assert w.stdout is not None
            sel.register(w.stdout, selectors.EVENT_READ, w)

        def drop(w: subprocess.Popen[str]) -> None:
            assert w.stdout is not None
            sel.unregister(w.stdout)
            w.stdout.close()
            if w.stdin is not None:
                w.stdin.close()
            workers.pop(w.pid, None)

        killed = rounds = 0
        started: set[int] = set()
        try:
            for _ in range(CHAOS_CLIENTS):
                spawn()
            # All 64 at work first (starting 64 Python processes takes a while on 2 cores).
            start_by = time.monotonic() + 180
            chaos_from = deadline = next_kill = float("inf")
            while time.monotonic() < deadline:
                assert time.monotonic() < start_by or started >= set(workers), "workers stuck"
                for key, _ in sel.select(timeout=1.0):
                    w = key.data
                    if workers.get(w.pid) is not w:  # killed earlier in this batch of events
                        continue
                    line = w.stdout.readline()
                    if not line:  # it ended by itself: only a wrong result does that
                        assert w.wait(10) == 0, f"worker {w.pid} failed"
                        drop(w)
                        spawn()
                        continue
                    assert json.loads(line)["ok"], f"worker {w.pid}: a wrong result"
                    started.add(w.pid)
                    rounds += time.monotonic() >= chaos_from
                    if chaos_from == float("inf") and started >= set(workers):
                        chaos_from = time.monotonic()
                        deadline = chaos_from + CHAOS_SECONDS
                        next_kill = chaos_from + rnd.uniform(0.3, 1.2)
                    if time.monotonic() >= next_kill:  # a random worker killed mid-work
                        victim = rnd.choice(list(workers.values()))
                        victim.kill()
                        victim.wait(10)
                        drop(victim)
                        killed += 1
                        spawn()
                        next_kill = time.monotonic() + rnd.uniform(0.3, 1.2)
            # The ones left finish their round and stop cleanly: they were never disturbed.
            for w in list(workers.values()):
                assert w.stdin is not None
                w.stdin.close()
            for w in list(workers.values()):
                assert w.wait(60) == 0
                drop(w)
        finally:
            for w in list(workers.values()):
                w.kill()
                w.wait(10)
                if w.stdout is not None:
                    w.stdout.close()
            sel.close()
        print(f"{killed} killed, {rounds} rounds in {CHAOS_SECONDS:.0f} s")
        assert killed >= CHAOS_SECONDS / 2 and rounds >= 10 * CHAOS_SECONDS, (killed, rounds)
        wait_until(lambda: host_left(st.host, st.driver) == baseline, 30,
                   "the host and the guest hold nothing of theirs (shared objects included)")
        wait_until(lambda: st.driver.snapshot()["processes"] == [], 30,
                   "the guest holds nothing of theirs")
        wait_until(lambda: none_left(fds), 30, "no descriptor of theirs left open")


# ---- the host killed during execution ------------------------------------------------------------


BUSY = r"""
import json, sys, threading, time
import numpy as np
from dxg.backends.softcmd import CommandBuffer, DType, Operand
from dxg.client import DxgError, open_node

node = open_node(sys.argv[1])
dev = node.adapters()[0].create_device()
q = dev.create_context().hwqueue()
n = 512
a = dev.array(np.ones((n, n), np.float32))
c = dev.empty((n, n), np.float32)
va, vc = a.map_gpu(), c.map_gpu()
f32 = DType.of(np.float32)
cmd = CommandBuffer()
for _ in range(64):
    cmd.gemm(Operand(int(vc), f32, (n, n)), Operand(int(va), f32, (n, n)),
             Operand(int(va), f32, (n, n)))
raw = cmd.tobytes()
buf = dev.allocate(len(raw))
buf.upload(raw)
vbuf = buf.map_gpu()
fence = dev.fence()
woken = []

def report(who, call):
    try:
        call()
        status = 0
    except DxgError as e:
        status = e.status
    except Exception as e:  # the queue's own error type carries the status too
        status = getattr(e, "status", -1)
    print(json.dumps({"who": who, "status": status, "t": time.time()}), flush=True)

last = 0
for _ in range(200):  # far more work than runs before the host is killed
    last = q.submit(int(vbuf), len(raw))
threads = [threading.Thread(target=report, args=("fence", lambda: fence.wait(1))),
           threading.Thread(target=report, args=("queue", lambda: q.wait(last)))]
for t in threads:
    t.start()
print(json.dumps({"ready": True, "luid": node.adapters()[0].luid}), flush=True)
for t in threads:
    t.join()
"""

AFTER = r"""
import json, sys
import numpy as np
import dxg.compute as dc
with dc.device(0, node=sys.argv[1]) as dev:
    a = np.arange(64, dtype=np.float32).reshape(8, 8)
    got = (dev.asarray(a) @ dev.asarray(a)).get()
    print(json.dumps({"ok": bool(np.allclose(got, a @ a)), "luid": dev.luid}), flush=True)
"""


def _dxg_host(address: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "dxg.cli.main", "host", "--listen", address,
                             "--adapters", "1", "--host-id", "41", "--priority", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)


def _lines(proc: subprocess.Popen[str], count: int, timeout: float) -> list[dict]:
    assert proc.stdout is not None
    out = []
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while len(out) < count:
            left = deadline - time.monotonic()
            assert left > 0 and sel.select(left), f"only {len(out)} of {count} lines"
            line = proc.stdout.readline()
            assert line, "the client ended early"
            out.append(json.loads(line))
    return out


def test_the_host_killed_during_execution_wakes_every_waiter_and_comes_back(
        tmp_path: Path) -> None:
    address = f"unix:{tmp_path / 'h.sock'}"
    host = _dxg_host(address)
    drv = GuestDriver(heartbeat_timeout=2.0)
    node = None
    busy = None
    try:
        drv.bind(address, wait=True)
        assert drv.wait_for_adapters(1, 60), "the host's adapter did not come up"
        node_path = str(tmp_path / "n.sock")
        node = SocketNode(drv, node_path)
        node.start()
        busy = subprocess.Popen([sys.executable, "-c", BUSY, node_path], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=ENV)
        (ready,) = _lines(busy, 1, 60)
        assert ready["ready"]
        killed_at = time.time()
        host.kill()
        host.wait(10)
        woken = {r["who"]: r for r in _lines(busy, 2, 10)}
        for who in ("fence", "queue"):
            assert woken[who]["status"] == NTSTATUS.STATUS_DEVICE_REMOVED, woken
            assert woken[who]["t"] - killed_at < 1.0, (who, woken[who]["t"] - killed_at)
        assert busy.wait(30) == 0
        # The host comes back (the same identity): so do its adapters, and new work runs.
        host = _dxg_host(address)
        wait_until(lambda: len(drv.active_adapters()) == 1, 60, "the adapter back")
        after = subprocess.run([sys.executable, "-c", AFTER, node_path], capture_output=True,
                               text=True, timeout=120, env=ENV)
        assert after.returncode == 0, after.stderr
        result = json.loads(after.stdout)
        assert result["ok"] and result["luid"] == ready["luid"]
    finally:
        if busy is not None and busy.poll() is None:
            busy.kill()
            busy.wait()
        if node is not None:
            node.close()
        drv.close()
        host.kill()
        host.wait(10)


# ---- the guest killed ----------------------------------------------------------------------------


HOLD_MEMORY = r"""
import json, sys
import numpy as np
import dxg.compute as dc
dev = dc.device(0, node=sys.argv[1])
big = dev.zeros(64 << 20, np.uint8)
x = dev.asarray(np.ones((256, 256), np.float32))
y = (x @ x).sum().get()
print(json.dumps({"ok": float(y) == 256.0 ** 3}), flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("where", ["unix", "tcp"])
def test_the_guest_killed_the_host_frees_its_partition(tmp_path: Path, where: str) -> None:
    with Host(HostConfig(adapters=1)) as host:
        baseline = host_left(host)
        address = host.listen(str(tmp_path / "h.sock") if where == "unix"
                              else "tcp:127.0.0.1:0")
        fds = open_fds()  # (the listening socket stays)
        node_path = str(tmp_path / "n.sock")
        guest = subprocess.Popen([sys.executable, "-m", "dxg.cli.main", "guest", "--connect",
                                  address, "--node", node_path, "--priority", "0"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 text=True, env=ENV)
        clients: list[subprocess.Popen[str]] = []
        try:
            subprocess.run([sys.executable, "-m", "dxg.cli.main", "wait", "--node", node_path,
                            "--adapters", "1", "--timeout", "60"], check=True,
                           capture_output=True, timeout=90, env=ENV)
            for _ in range(3):
                c = subprocess.Popen([sys.executable, "-c", HOLD_MEMORY, node_path],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=ENV)
                clients.append(c)
            for c in clients:
                assert _lines(c, 1, 60)[0]["ok"]
            held = host_left(host)
            assert held["bytes"] >= 3 * (64 << 20) and held["processes"] == 3
            guest.kill()
            guest.wait(10)
            wait_until(lambda: host.census()["partitions"] == [], 10, "the partition freed")
            wait_until(lambda: host_left(host) == baseline, 10, "memory back to baseline")
            wait_until(lambda: none_left(fds, *clients), 10, "no descriptor of the guest's left")
        finally:
            for c in clients:
                c.kill()
                c.wait(10)
            if guest.poll() is None:
                guest.kill()
                guest.wait(10)
