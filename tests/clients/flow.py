"""Client: the whole flow N times (enumerate, open by LUID, device, context, query, destroy,
close). Prints one JSON line: every handle it was given, and the pid."""

import json
import os
import sys

from dxg.client import open_node

node_path, iterations = sys.argv[1], int(sys.argv[2])
handles: list[int] = []
with open_node(node_path) as node:
    for _ in range(iterations):
        adapters = node.adapters()
        handles += [a.handle for a in adapters]
        for a in adapters:
            with node.open_adapter(a.luid) as opened:
                handles.append(opened.handle)
                assert opened.description
                device = opened.create_device()
                context = device.create_context()
                handles += [device.handle, context.handle]
                assert device.execution_state() == 1
                context.close()
                device.close()
            a.close()
print(json.dumps({"pid": os.getpid(), "handles": handles}), flush=True)
