"""Client: keeps one adapter's engine busy (chains of GEMMs through dxg.compute) until stdin
closes. Prints {"pid": ...} once its first results are back, so the caller knows work runs."""

import json
import os
import select
import sys

import numpy as np

import dxg.compute as dc

node_path = sys.argv[1]
index = int(sys.argv[2]) if len(sys.argv) > 2 else 0
rng = np.random.default_rng(0)

with dc.device(index, node=node_path) as dev:
    a = dev.asarray(rng.random((192, 192), dtype=np.float32) / 192)
    y = dev.asarray(rng.random((192, 192), dtype=np.float32))
    told = False
    while not select.select([sys.stdin], [], [], 0)[0]:
        for _ in range(16):
            y = dc.tanh(y @ a)
        y.get()
        if not told:
            print(json.dumps({"pid": os.getpid()}), flush=True)
            told = True
