"""Client for test_policy: a process of some user that does memory work on command.

    memuser.py NODE UID GID [GROUP,...]

Starts as root (so that it can import everything wherever the interpreter lives), becomes
UID/GID with those supplementary groups, connects, then reads one JSON request per line on stdin
and answers one JSON line each: {"ok": true, ...} or {"ok": false, "status": NTSTATUS}. The first
line it prints says who it is and which adapters it sees."""

import itertools
import json
import os
import sys

from dxg.client import DxgError, open_node
from dxg.uapi import wddm

node_path, uid, gid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
groups = [int(g) for g in sys.argv[4].split(",") if g] if len(sys.argv) > 4 else []
os.setgroups(groups)
os.setgid(gid)
os.setuid(uid)

node = open_node(node_path)
adapters = {a.luid: a for a in node.adapters()}
devices: dict[int, object] = {}
allocs: dict[int, object] = {}
ids = itertools.count(1)
print(json.dumps({"ok": True, "pid": os.getpid(), "luids": list(adapters)}), flush=True)


def adapter(req: dict) -> object:
    luid = req["luid"]
    if luid not in adapters:
        adapters[luid] = node.open_adapter(luid)
    return adapters[luid]


def device(req: dict) -> object:
    luid = req["luid"]
    if luid not in devices:
        devices[luid] = adapter(req).create_device()
    return devices[luid]


def info(req: dict) -> dict:
    ad = adapter(req)
    out = {}
    for group, name in ((0, "local"), (1, "nonlocal")):
        v = ad.video_memory_info(group)
        out[name] = {"budget": v.budget, "usage": v.current_usage,
                     "reservation": v.current_reservation,
                     "available": v.available_for_reservation}
    seg = ad.query_info(wddm.KMTQUERYADAPTERINFOTYPE.KMTQAITYPE_GETSEGMENTSIZE,
                        wddm.D3DKMT_SEGMENTSIZEINFO())
    out["sizes"] = {"local": int(seg.DedicatedVideoMemorySize),
                    "nonlocal": int(seg.SharedSystemMemorySize)}
    return out


def handle(req: dict) -> dict:
    op = req["op"]
    if op == "open":
        adapter(req)
        return {}
    if op == "info":
        return info(req)
    if op == "alloc":
        made = device(req).allocate_many(req["sizes"], non_local=req.get("non_local", False))
        mine = []
        for a in made:
            n = next(ids)
            allocs[n] = a
            mine.append(n)
        return {"ids": mine}
    if op == "free":
        for i in req["ids"]:
            allocs.pop(i).close()
        return {}
    if op == "offer":
        device(req).offer([allocs[i] for i in req["ids"]])
        return {}
    if op == "reclaim":
        results = device(req).reclaim([allocs[i] for i in req["ids"]])
        return {"results": [int(r) for r in results]}
    if op == "reserve":
        adapter(req).reserve_video_memory(req["bytes"], req.get("group", 0))
        return {}
    if op == "processes":
        return {"pids": node.processes(req["luid"])}
    raise ValueError(f"unknown op {op!r}")


for line in sys.stdin:
    request = json.loads(line)
    try:
        reply = {"ok": True, **handle(request)}
    except DxgError as e:
        reply = {"ok": False, "status": int(e.status) & 0xFFFFFFFF}
    print(json.dumps(reply), flush=True)
