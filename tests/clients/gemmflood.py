"""Client for test_scheduling and bench/compute_share.py: a process of some user that keeps an
adapter busy with GEMMs.

    gemmflood.py NODE UID N QUEUES DEPTH

Starts as root (so that it can import everything wherever the interpreter lives), becomes UID
(gid the same; UID 0 stays root), connects, makes QUEUES hardware queues on one context of the
first adapter's device, each with an N x N f32 GEMM command buffer, and prints one JSON line
({"pid", "ready"}). Then it answers commands on stdin, one per line, with one JSON line each:

    go        keep every queue DEPTH submissions deep until told otherwise
    pause     stop submitting, and answer once what was submitted has run
    count     GEMMs done so far (the queues' progress fences) and this process's monotonic time
    quit      (or end of input) stop, wait for the queues and exit

Feeding happens on the main thread (a fence-page check per queue, 1 ms apart); commands are read
on another."""

import json
import os
import queue
import sys
import threading
import time

import numpy as np

from dxg.backends.softcmd import CommandBuffer, DType, Operand
from dxg.client import execution as _execution  # noqa: F401  (imported lazily otherwise:
from dxg.client import open_node  # after the switch this tree may be unreadable, as in /tmp)

node_path, uid, n, queues, depth = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                                    int(sys.argv[4]), int(sys.argv[5]))
rng = np.random.default_rng(uid)  # (before the switch: NumPy imports its parts lazily)
host_a = rng.standard_normal((n, n), dtype=np.float32)
host_b = rng.standard_normal((n, n), dtype=np.float32)
if uid:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)

node = open_node(node_path)
dev = node.adapters()[0].create_device()
ctx = dev.create_context()
qs = [ctx.hwqueue() for _ in range(queues)]
f32 = DType.of(np.float32)
a = dev.array(host_a)
b = dev.array(host_b)
va, vb = int(a.map_gpu()), int(b.map_gpu())
keep = [a, b]
buffers = []
for _ in qs:
    c = dev.empty((n, n), np.float32)
    raw = CommandBuffer().gemm(Operand(int(c.map_gpu()), f32, (n, n)), Operand(va, f32, (n, n)),
                               Operand(vb, f32, (n, n))).tobytes()
    buf = dev.allocate(len(raw))
    buf.upload(raw)
    keep += [c, buf]
    buffers.append((int(buf.map_gpu()), len(raw)))

commands: queue.Queue[str] = queue.Queue()


def reader() -> None:
    for line in sys.stdin:
        if line.strip():
            commands.put(line.strip())
    commands.put("quit")


def say(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


threading.Thread(target=reader, daemon=True).start()
say(pid=os.getpid(), ready=True)
feeding = False
while True:
    try:
        cmd = commands.get(timeout=0.001 if feeding else None)
    except queue.Empty:
        cmd = ""
    if cmd == "go":
        feeding = True
        say(ok=True)
    elif cmd == "pause":
        feeding = False
        for q in qs:
            q.wait(timeout=120)
        say(ok=True)
    elif cmd == "count":
        say(done=sum(q.progress for q in qs), now=time.monotonic())
    elif cmd == "quit":
        break
    if feeding:
        for q, (va_, length) in zip(qs, buffers, strict=True):
            while q.submitted - q.progress < depth:
                q.submit(va_, length)
for q in qs:
    q.wait(timeout=120)
dev.close()
node.close()
