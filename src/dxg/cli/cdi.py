"""`dxg cdi`: a Container Device Interface spec that hands the node to containers.

Runtimes that read CDI (podman, containerd, CRI-O, docker with CDI on) take a device by name,
``--device pydxg.dev/vgpu=0``, and apply the spec's edits to the container: the node socket (and
the FUSE device file, when there is one) bind-mounted in, ``DXG_NODE`` pointing at it, and
``DXG_VISIBLE_ADAPTERS`` naming the adapter (dxg.client.visible). Devices: one per adapter, by
index and by LUID, and ``all``. Request one of them per container: the variable of one device
replaces another's (to hand over several adapters, write ``DXG_VISIBLE_ADAPTERS`` yourself).
The spec format: https://github.com/cncf-tags/container-device-interface (SPEC.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["CDI_VERSION", "build_spec", "run_cdi"]

CDI_VERSION = "0.6.0"
_KIND = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def build_spec(kind: str, node: str, container_node: str, luids: list[int],
               dev_node: str | None = None) -> dict[str, Any]:
    """The CDI spec (JSON-able) for the node at ``node`` (host path) with adapters ``luids``
    (in the node's order), seen in the container at ``container_node``."""
    if not _KIND.match(kind):
        raise ValueError(f"--kind {kind!r}: a CDI kind is VENDOR/CLASS, e.g. pydxg.dev/vgpu")
    mounts: list[dict[str, Any]] = [
        {"hostPath": node, "containerPath": container_node, "options": ["bind"]}]
    if dev_node:
        mounts.append({"hostPath": dev_node, "containerPath": dev_node, "options": ["bind"]})

    def device(name: str, visible: str) -> dict[str, Any]:
        return {"name": name, "containerEdits": {"env": [f"DXG_VISIBLE_ADAPTERS={visible}"]}}

    devices = [device("all", "all")]
    for i, luid in enumerate(luids):
        text = f"0x{luid:016x}"
        devices.append(device(str(i), text))
        devices.append(device(text, text))
    return {
        "cdiVersion": CDI_VERSION,
        "kind": kind,
        "devices": devices,
        "containerEdits": {"env": [f"DXG_NODE={container_node}"], "mounts": mounts},
    }


def run_cdi(args: argparse.Namespace) -> int:
    from dxg.client import open_node

    if args.dev_node and not os.path.exists(args.dev_node):
        raise FileNotFoundError(f"no device file at {args.dev_node} (start the daemon with "
                                f"--dev-node {args.dev_node}, or leave --dev-node out)")
    with open_node(args.node or None) as node:
        adapters = node.adapters()
        luids = [a.luid for a in adapters]
        path = os.path.abspath(node.conn.path)
    spec = build_spec(args.kind, path, args.container_node, luids,
                      os.path.abspath(args.dev_node) if args.dev_node else None)
    text = json.dumps(spec, indent=2) + "\n"
    if not args.output:
        print(text, end="")
        return 0
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    names = ", ".join(f"{args.kind}={d['name']}" for d in spec["devices"][:3])
    print(f"wrote {out}: {len(spec['devices'])} devices ({names}, ...)", flush=True)
    return 0
