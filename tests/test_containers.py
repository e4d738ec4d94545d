"""Handing pydxg to a container: `dxg cdi` writes the spec, and a client started as a container
runtime would start it (its own mount and PID namespaces; a tmpfs over /run and /tmp, so the
only thing of the host's it can reach is the node bind-mounted where the spec says, with the
spec's DXG_NODE and DXG_VISIBLE_ADAPTERS) enumerates and computes through the node, and sees
only the adapters its device names, renumbered from 0."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import CLIENTS

ROOT = Path(__file__).resolve().parents[1]


def _namespaces_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root to make mount and PID namespaces (unshare) and mount"
    try:
        r = subprocess.run(["unshare", "--mount", "--pid", "--fork", "--mount-proc", "sh", "-c",
                            "mount -t tmpfs tmpfs /mnt"], capture_output=True, text=True,
                           timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare is not usable here: {e}"
    if r.returncode != 0:
        return f"unshare --mount --pid is not permitted here: {r.stderr.strip()}"
    return None


_PROBLEM = _namespaces_problem()
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM))


def dxg(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dxg.cli.main", *args], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, **(env or {})))


def cdi_spec(node_path: str) -> dict[str, Any]:
    r = dxg("cdi", "--node", node_path)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def run_container(spec: dict[str, Any], device: str, hidden: list[str], stdin: str = "",
                  env: dict[str, str] | None = None) -> dict[str, Any]:
    """Apply the spec's edits for ``device`` as a runtime does, and run the client inside."""
    dev = next(d for d in spec["devices"] if d["name"] == device)
    edits = [spec.get("containerEdits", {}), dev["containerEdits"]]
    cenv = {k: v for k, v in os.environ.items()
            if k not in ("DXG_NODE", "DXG_VISIBLE_ADAPTERS", "XDG_RUNTIME_DIR")}
    for e in edits:
        cenv.update(item.split("=", 1) for item in e.get("env", []))
    cenv.update(env or {})
    steps = ["set -e", "mount -t tmpfs tmpfs /run"]
    for e in edits:
        for m in e.get("mounts", []):
            target = shlex.quote(m["containerPath"])
            steps += [f"mkdir -p $(dirname {target})", f"touch {target}",
                      f"mount --bind {shlex.quote(m['hostPath'])} {target}"]
    for e in edits:  # the host's node directory is gone (not all of /tmp: this checkout and
        for m in e.get("mounts", []):  # its virtualenv may live there)
            steps.append(f"mount -t tmpfs tmpfs {shlex.quote(os.path.dirname(m['hostPath']))}")
    steps.append("exec " + " ".join(shlex.quote(a) for a in
                                    [sys.executable, str(CLIENTS / "container.py"), *hidden]))
    r = subprocess.run(["unshare", "--mount", "--pid", "--fork", "--mount-proc", "sh", "-c",
                        "\n".join(steps)],
                       input=stdin, capture_output=True, text=True, timeout=120, env=cenv,
                       cwd="/")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_cdi_spec_names_the_node_and_every_adapter(stack):
    spec = cdi_spec(stack.node_path)
    luids = [f"0x{a.luid:016x}" for a in stack.driver.active_adapters()]
    assert spec["cdiVersion"] == "0.6.0" and spec["kind"] == "pydxg.dev/vgpu"
    assert spec["containerEdits"]["env"] == ["DXG_NODE=/run/pydxg/dxg.sock"]
    assert spec["containerEdits"]["mounts"] == [
        {"hostPath": stack.node_path, "containerPath": "/run/pydxg/dxg.sock",
         "options": ["bind"]}]
    names = {d["name"]: d["containerEdits"]["env"] for d in spec["devices"]}
    assert names["all"] == ["DXG_VISIBLE_ADAPTERS=all"]
    for i, luid in enumerate(luids):
        assert names[str(i)] == names[luid] == [f"DXG_VISIBLE_ADAPTERS={luid}"]


def test_a_container_enumerates_and_computes_through_the_bind_mounted_node(stack, tmp_path):
    spec = cdi_spec(stack.node_path)
    luids = [f"0x{a.luid:016x}" for a in stack.driver.active_adapters()]
    hidden = [stack.node_path]  # (its directory is an empty tmpfs there)
    out = run_container(spec, "all", hidden)
    assert out["pid"] == 1, "the client runs in a PID namespace of its own"
    assert out["hidden_seen"] == [], "the host's paths are not visible in the container"
    assert out["node"] == out["node_path"] == "/run/pydxg/dxg.sock"
    assert out["luids"] == luids and out["device_count"] == 2
    assert out["computed"] == float(sum(2 * i + 1 for i in range(8)))


def test_dxg_visible_adapters_restricts_and_renumbers(stack):
    spec = cdi_spec(stack.node_path)
    luids = [f"0x{a.luid:016x}" for a in stack.driver.active_adapters()]
    # the CDI device "1": adapter 1 only, which becomes the container's device 0
    out = run_container(spec, "1", [], stdin=" ".join(luids))
    assert out["visible"] == luids[1]
    assert out["luids"] == [luids[1]] and out["device_count"] == 1
    assert out["device0"] == luids[1] and out["computed"] == 64.0
    assert out["opened"] == [luids[1]]
    assert [luid for luid, _ in out["refused"]] == [luids[0]]
    assert "no such adapter" in out["refused"][0][1]
    # by index, in the order given (as CUDA_VISIBLE_DEVICES): "1,0" swaps them
    out = run_container(spec, "all", [], env={"DXG_VISIBLE_ADAPTERS": "1,0"})
    assert out["luids"] == [luids[1], luids[0]] and out["device0"] == luids[1]
