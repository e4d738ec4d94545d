"""Messages a person can act on: each failure is one line that says what was found and what to
do. Real `dxg` processes against real nodes, hosts and files."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def dxg(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "DXG_NODE"}
    return subprocess.run([sys.executable, "-m", "dxg.cli.main", *args], capture_output=True,
                          text=True, timeout=timeout, env=dict(base, **(env or {})))


def one_line(r: subprocess.CompletedProcess, command: str) -> str:
    """The failure's one line (after argparse's usage line, for a bad option)."""
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith(("usage:", " "))]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"dxg {command}: "), lines[0]
    return lines[0]


def test_version_comes_from_the_package_metadata():
    from importlib.metadata import version

    r = dxg("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"dxg {version('pydxg')}"


# ---- a wrong DXG_NODE says what it found ---------------------------------------------------------


def test_dxg_node_naming_a_directory(tmp_path):
    line = one_line(dxg("ls", env={"DXG_NODE": str(tmp_path)}), "ls")
    assert f"DXG_NODE={tmp_path} is a directory, not a dxg node" in line
    assert "point DXG_NODE at the node socket" in line


def test_dxg_node_naming_a_regular_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    line = one_line(dxg("ps", env={"DXG_NODE": str(f)}), "ps")
    assert f"DXG_NODE={f} is a regular file, not a dxg node" in line


def test_dxg_node_naming_a_stale_socket(tmp_path):
    stale = tmp_path / "old.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # bound, never listened, closed: what a killed daemon leaves
    line = one_line(dxg("ls", env={"DXG_NODE": str(stale)}), "ls")
    assert "is a stale socket: no daemon serves it" in line
    assert f"dxg up --node {stale}" in line


def test_dxg_node_naming_a_hosts_bus_socket(tmp_path):
    from dxg.host.config import HostConfig
    from dxg.host.host import Host

    host = Host(HostConfig(adapters=1))
    try:
        bus = host.listen(str(tmp_path / "host.sock")).removeprefix("unix:")
        line = one_line(dxg("ls", env={"DXG_NODE": bus}), "ls")
        assert "is a pydxg host's bus socket, not a node" in line
        assert f"dxg guest --connect {bus}" in line
        line = one_line(dxg("ls", "--node", bus), "ls")
        assert "point --node at the node the guest prints" in line
    finally:
        host.close()


def test_a_missing_node_says_how_to_start_one(tmp_path):
    line = one_line(dxg("ls", "--node", str(tmp_path / "none.sock")), "ls")
    assert "no dxg node at" in line and "dxg up" in line


# ---- daemons check their arguments before they start ---------------------------------------------


@pytest.mark.parametrize("command", [["up"], ["host", "--listen", "/tmp/x.sock"]])
@pytest.mark.parametrize("count", ["0", "65", "two"])
def test_adapter_count_has_one_rule(command, count):
    line = one_line(dxg(*command, "--adapters", count), command[0])
    assert line.endswith(f"{count!r} is not an adapter count: a host offers 1 to 64 adapters")


@pytest.mark.parametrize("command", [["host", "--listen"], ["guest", "--connect"],
                                     ["up", "--host-listen"]])
def test_an_unknown_address_scheme_is_named(command):
    line = one_line(dxg(*command, "bogus://x"), command[0])
    assert "unknown address scheme 'bogus:' in 'bogus://x'" in line
    assert "tcp:HOST:PORT" in line


def test_a_tcp_listener_other_machines_reach_is_warned_about():
    proc = subprocess.Popen([sys.executable, "-m", "dxg.cli.main", "host", "--listen",
                             "tcp:0.0.0.0:0", "--listen", "tcp:127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        listening: list[str] = []
        for line in proc.stdout:  # both listeners are up once their lines are out
            listening += [line] if line.startswith("host: listening on") else []
            if len(listening) == 2:
                break
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert len(listening) == 2, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1, err  # only the public listener is warned about
    assert warnings[0].startswith("dxg: warning: the bus on tcp:0.0.0.0:")
    assert "no authentication or encryption" in warnings[0] and "127.0.0.1" in warnings[0]


def test_dxg_up_on_a_served_node_fails_before_starting_anything(stack):
    r = dxg("up", "--node", stack.node_path)
    line = one_line(r, "up")
    assert f"a dxg node is already served at {stack.node_path}" in line
    assert "pick another --node or DXG_NODE" in line
    assert r.stdout == "", "nothing started, nothing printed"
    r = dxg("guest", "--connect", "/nonexistent/host.sock", env={"DXG_NODE": stack.node_path})
    assert "already served" in one_line(r, "guest")
    r = dxg("ls", "--json", env={"DXG_NODE": stack.node_path})
    assert r.returncode == 0 and len(json.loads(r.stdout)["adapters"]) == 2  # still serving


# ---- a user other than root finds root's node -----------------------------------------------------


def _namespaces_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root (a mount namespace, a daemon as root, a client as nobody)"
    r = subprocess.run(["unshare", "--mount", "--fork", "true"], capture_output=True, text=True)
    return None if r.returncode == 0 else f"unshare --mount not permitted: {r.stderr.strip()}"


_PROBLEM = _namespaces_problem()


@pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM))
def test_nobody_finds_roots_node_at_the_system_path():
    """In a mount namespace of its own (tmpfs over /run and nobody's node directory, so the real
    /run/pydxg is untouched): root's `dxg up` serves /run/pydxg/dxg.sock; `dxg ls` run as
    nobody (no DXG_NODE, no XDG_RUNTIME_DIR) first says where it looked, then finds it."""
    r = subprocess.run(["unshare", "--mount", "--fork", sys.executable,
                        str(ROOT / "tests" / "clients" / "system_node.py")],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    before = out["before"]
    assert before["code"] == 1
    assert before["err"].strip() == (
        "dxg ls: no dxg node at /tmp/pydxg-65534/dxg.sock nor /run/pydxg/dxg.sock (start one "
        "with `dxg up`, or set DXG_NODE to the node's path)")
    after = out["after"]
    assert after["code"] == 0, after["err"]
    assert len(json.loads(after["out"])["adapters"]) == 1
