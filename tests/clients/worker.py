"""Client: real work on a virtual GPU in rounds, each checked against NumPy: arrays uploaded,
GEMMs, reductions and elementwise math through dxg.compute (command buffers on a hardware
queue, fences), some memory kept across rounds, a resource and a fence shared with itself (shared,
then opened again from its own descriptor; a sync file of the fence; the last two rounds' kept,
so a SIGKILL finds some alive), and a second thread blocked in a fence wait the whole time.
Prints one JSON line per round ({"round": n, "ok": true}); stops after ROUNDS
rounds (0: until stdin closes or it is killed) and exits 0 when every result was right."""

import contextlib
import json
import os
import select
import sys
import threading

import numpy as np

import dxg.compute as dc
from dxg.client import DxgError

node_path, rounds = sys.argv[1], int(sys.argv[2])
seed = int(sys.argv[3]) if len(sys.argv) > 3 else os.getpid()
rng = np.random.default_rng(seed)

with dc.device(0, node=node_path) as dev:
    fence = dev.dxg.fence()  # never signalled: its waiter is parked in the driver all along

    def park() -> None:
        with contextlib.suppress(DxgError):  # woken with an error when the device closes
            fence.wait(1)

    parked = threading.Thread(target=park, daemon=True)
    parked.start()
    kept: list[dc.ndarray] = []
    shared: list[list] = []  # each round's shared objects and descriptors (the last two kept)

    def share_with_itself(n: int) -> bool:
        """A resource and a fence shared by descriptor and opened again here; a sync file."""
        d = dev.dxg
        data = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
        res = d.shared_resource(8192)
        res.allocations[0].upload(data)
        handle = res.share(read_only=bool(n % 2))
        again = d.open_resource(handle.fileno())  # (by number: the node says the access)
        fence = d.shared_fence()
        fh = fence.share()
        opened = d.open_fence(fh.fileno())
        sf = fence.sync_file(n)
        fence.signal(n)
        ok = (again.allocations[0].download(4096) == data and again.read_only == bool(n % 2)
              and opened.wait(n, timeout=30) == 0 and sf.wait(30) and sf.status() == sf.SIGNALED)
        shared.append([sf, fh, handle, opened, again, fence, res])
        while len(shared) > 2:
            for obj in shared.pop(0):
                obj.close()
        return bool(ok)

    n = 0
    while rounds == 0 or n < rounds:
        n += 1
        a = rng.standard_normal((48, 64), dtype=np.float32)
        b = rng.standard_normal((64, 32), dtype=np.float32)
        x, y = dev.asarray(a), dev.asarray(b)
        z = dc.exp((x @ y) * 0.05) + 1.0
        got = z.sum(axis=0).get()
        want = (np.exp((a @ b) * np.float32(0.05)) + np.float32(1)).sum(axis=0)
        ok = bool(np.allclose(got, want, rtol=1e-4, atol=1e-3)) and share_with_itself(n)
        kept.append(dev.zeros(int(rng.integers(1, 64)) * 4096, np.uint8))
        if len(kept) > 8:
            kept.pop(0)
        print(json.dumps({"round": n, "ok": ok, "pid": os.getpid()}), flush=True)
        if not ok:
            sys.exit(2)
        if rounds == 0 and select.select([sys.stdin], [], [], 0)[0] and not sys.stdin.read(1):
            break  # stdin closed: stop cleanly
