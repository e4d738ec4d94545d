"""Client: open every adapter, create D devices with C contexts each, print their handles as
JSON, then wait for commands on stdin ("ping" -> query again; EOF -> exit)."""

import json
import os
import sys

from dxg.client import DxgError, open_node

node_path, ndev, nctx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
node = open_node(node_path)
out = {"pid": os.getpid(), "adapters": [], "devices": [], "contexts": []}
adapters = node.adapters()
for a in adapters:
    out["adapters"].append(a.handle)
    for _ in range(ndev):
        d = a.create_device()
        out["devices"].append(d.handle)
        for _ in range(nctx):
            out["contexts"].append(d.create_context().handle)
print(json.dumps(out), flush=True)
for _line in sys.stdin:
    try:
        reply = {"ok": True, "descriptions": [a.description for a in adapters],
                 "state": next(iter([a.create_device() for a in adapters])).execution_state()}
    except DxgError as e:
        reply = {"ok": False, "status": e.status}
    print(json.dumps(reply), flush=True)
