"""Client run as a container would run it: inside its own mount and PID namespaces, where the
node was bind-mounted as a CDI spec says (tests/test_containers.py). It looks around (its pid,
whether the host's node path is visible), then enumerates and computes through the node
(``DXG_NODE``, ``DXG_VISIBLE_ADAPTERS`` from its environment) and prints one JSON line."""

import json
import os
import sys

import numpy as np

import dxg.compute as dc
from dxg.client import NoSuchAdapter, open_node

hidden = sys.argv[1:]  # paths that must not be visible in here
out: dict = {
    "pid": os.getpid(),
    "node": os.environ.get("DXG_NODE"),
    "visible": os.environ.get("DXG_VISIBLE_ADAPTERS"),
    "hidden_seen": [p for p in hidden if os.path.exists(p)],
}
with open_node() as node:
    adapters = node.adapters()
    out["luids"] = [f"0x{a.luid:016x}" for a in adapters]
    out["node_path"] = str(node.conn.path)
    for a in adapters:
        a.close()
out["device_count"] = dc.device_count()
with dc.device(0) as dev:
    x = dev.asarray(np.arange(8, dtype=np.float32))
    out["computed"] = float((x * 2 + 1).get().sum())
    out["device0"] = f"0x{dev.luid:016x}"
for luid in sys.stdin.read().split():  # LUIDs to try opening by LUID
    try:
        with open_node() as node:
            node.open_adapter(luid).close()
        out.setdefault("opened", []).append(luid)
    except NoSuchAdapter as e:
        out.setdefault("refused", []).append([luid, str(e)])
print(json.dumps(out), flush=True)
