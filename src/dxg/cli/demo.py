"""`dxg demo`: three client processes at once against the node, `dxg ps` while they run, and
proof afterwards that the host holds nothing of theirs. The image editor and the D3D12-style
app share a resource and a fence: they get the two ends of a socket pair, over which the editor
sends the share descriptors (SCM_RIGHTS)."""

import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from dxg.cli.demo_app import KINDS

READY_TIMEOUT = 60.0
CLEANUP_TIMEOUT = 10.0


def _reader(proc: subprocess.Popen[str], ready: threading.Event, lines: list[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        if line == "READY":
            ready.set()
            continue
        lines.append(line)
        print(line, flush=True)
    ready.set()


def host_objects_of(census: dict[str, Any], pids: set[int]) -> list[dict[str, Any]]:
    """The host-side processes (with their objects) that belong to `pids`."""
    found = []
    for host in census.get("hosts", []):
        for proc in (host.get("census") or {}).get("processes", []):
            if proc.get("pid") in pids:
                found.append(proc)
    return found


def run_demo(given: str | None) -> int:
    """``given``: the node the user named, or None for the default, whose directory is
    checked (by the first connection) before the clients are pointed at it."""
    from dxg.cli.listing import print_ps
    from dxg.cli.views import Sample, build_view
    from dxg.client import open_node
    from dxg.uapi.nodepath import default_node_path

    with open_node(given) as node:  # fail early, with one line, if there is no node
        n = len(node.adapters())
    node_path = given or str(default_node_path())
    print(f"demo: node {node_path} has {n} adapter(s); starting 3 clients", flush=True)
    env = dict(os.environ, DXG_NODE=node_path, PYTHONUNBUFFERED="1")
    procs: list[subprocess.Popen[str]] = []
    readies: list[threading.Event] = []
    pair = dict(zip(("image", "d3d12"), socket.socketpair(), strict=True))
    try:
        for kind in KINDS:
            peer = pair.get(kind)
            fds = (peer.fileno(),) if peer is not None else ()
            p = subprocess.Popen(
                [sys.executable, "-m", "dxg.cli.demo_app", kind, node_path],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, pass_fds=fds,
                env=dict(env, DXG_DEMO_PEER=str(fds[0])) if fds else env,
            )
            if peer is not None:
                peer.close()  # the child's now
            ev = threading.Event()
            threading.Thread(target=_reader, args=(p, ev, []), daemon=True).start()
            procs.append(p)
            readies.append(ev)
        deadline = time.monotonic() + READY_TIMEOUT
        for ev in readies:
            if not ev.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError("a demo client did not get ready in time")
        failed = [p for p in procs if p.poll() is not None]
        if failed:
            raise RuntimeError(f"demo client pid {failed[0].pid} exited early "
                               f"with status {failed[0].returncode}")
        pids = {p.pid for p in procs}
        print("\n$ dxg ps   (while the three clients run)", flush=True)
        with open_node(node_path) as node:
            data = {"snapshot": node.admin({"op": "snapshot"}),
                    "census": node.admin({"op": "census"})}
        print_ps(build_view(Sample(data["snapshot"], data["census"], time.monotonic()),
                            exclude_pid=os.getpid())[0])
        held = host_objects_of(data["census"], pids)
        print(f"host holds objects for {len(held)} of the 3 demo processes", flush=True)
    finally:
        for sock in pair.values():
            sock.close()
        for p in procs:
            if p.stdin:
                p.stdin.close()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    bad = [p for p in procs if p.returncode != 0]
    if bad:
        raise RuntimeError(f"demo client pid {bad[0].pid} failed with status {bad[0].returncode}")
    print("\nclients exited; checking what the host still holds of theirs", flush=True)
    deadline = time.monotonic() + CLEANUP_TIMEOUT
    with open_node(node_path) as node:
        while True:
            census = node.admin({"op": "census"})
            left = host_objects_of(census, pids)
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        snap = node.admin({"op": "snapshot"})
    guest_left = [p for p in snap["processes"] if p["pid"] in pids]
    if left or guest_left:
        print(f"LEAK: host still holds {left}; guest still holds {guest_left}", flush=True)
        return 1
    for host in census.get("hosts", []):
        totals = (host.get("census") or {}).get("totals", {})
        print(f"host {host['address']}: " + ", ".join(f"{v} {k}" for k, v in totals.items()),
              flush=True)
        used = [sum(g.get("used", 0) for g in (a.get("memory") or {}).values())
                for a in (host.get("census") or {}).get("adapters", [])]
        print(f"host {host['address']}: device memory in use per adapter: "
              + ", ".join(f"{u} bytes" for u in used), flush=True)
    print(f"demo OK: the host holds nothing of pids {sorted(pids)}", flush=True)
    return 0
