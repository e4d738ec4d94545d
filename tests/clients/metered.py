"""Client for the metrics tests: on adapter 0, compute (submissions), wait on a fence from the
CPU once (a wait the host registers: it times out), keep its memory, print one JSON line
({"pid", "bytes": its local usage}) and wait for stdin to close."""

import json
import os
import sys

import numpy as np

import dxg.compute as dc

with dc.device(0, node=sys.argv[1]) as dev:
    x = dev.asarray(np.ones(1 << 18, dtype=np.float32))  # 1 MiB of device memory
    total = float((x * 2).get().sum())
    fence = dev.dxg.fence(0)
    fence.wait(1, timeout=0.05)  # never signalled: a CPU wait registered on the host
    usage = dev.adapter.video_memory_info().current_usage
    print(json.dumps({"pid": os.getpid(), "bytes": int(usage), "total": total}), flush=True)
    sys.stdin.read()
