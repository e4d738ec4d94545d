"""The `dxg` command line, run as users run it: real processes, real node."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import client, read_json_line, wait_until

ROOT = Path(__file__).resolve().parents[1]


def dxg(*args: str, env: dict | None = None, timeout: float = 60, **kw):
    return subprocess.run([sys.executable, "-m", "dxg.cli.main", *args], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, **(env or {})), **kw)


def test_ioctl_doc_is_generated_from_the_code():
    r = dxg("ioctls", "--markdown")
    assert r.returncode == 0
    assert (ROOT / "docs" / "ioctls.md").read_text() == r.stdout, \
        "docs/ioctls.md is stale: run `dxg ioctls --markdown > docs/ioctls.md`"


def test_every_generated_doc_is_current():
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_docs.py"), "--check"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{r.stdout}{r.stderr} (run python tools/gen_docs.py)"


def test_uapi_header_command():
    r = dxg("uapi-header")
    assert r.returncode == 0
    assert "#define LX_DXENUMADAPTERS3" in r.stdout and "struct d3dkmt_enumadapters3 {" in r.stdout


def test_ls_and_ps(stack):
    env = {"DXG_NODE": stack.node_path}
    r = dxg("ls", "--json", env=env)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["adapters"]
    assert len(rows) == 2 and all(row["vendor_id"] == "0x1414" for row in rows)
    assert {"paravirtualized", "compute_only"} <= set(rows[0]["flags"])
    luids = {f"0x{a.luid:016x}" for a in stack.driver.active_adapters()}
    assert {row["luid"] for row in rows} == luids
    table = dxg("ls", env=env)
    assert table.returncode == 0 and rows[0]["luid"] in table.stdout
    holder = client("hold", stack.node_path, 2, 1)
    held = read_json_line(holder)
    try:
        r = dxg("ps", "--json", env=env)
        assert r.returncode == 0, r.stderr
        data = json.loads(r.stdout)
        procs = {p["pid"]: p for p in data["snapshot"]["processes"]}
        mine = procs[held["pid"]]
        assert mine["name"] == "python" or mine["name"]
        assert sum(link["devices"] for link in mine["adapters"]) == 4
        assert sum(link["contexts"] for link in mine["adapters"]) == 4
        census = data["census"]["hosts"][0]["census"]
        assert census["totals"]["devices"] == 4
        text = dxg("ps", env=env)
        assert str(held["pid"]) in text.stdout
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_missing_node_is_one_clear_line(tmp_path):
    r = dxg("ls", "--node", str(tmp_path / "nothing.sock"))
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "no dxg node at" in r.stderr


def test_unreachable_host_is_one_clear_line(tmp_path):
    r = dxg("guest", "--connect", str(tmp_path / "nohost.sock"), "--node",
            str(tmp_path / "n.sock"))
    assert r.returncode == 1
    assert "host unreachable" in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("dxg guest:")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_permission_denied_is_one_clear_line(tmp_path):
    """A node the user may not open: the CLI, run as nobody, prints one clear line."""
    from conftest import make_stack

    with make_stack(tmp_path) as s:
        os.chmod(s.node_path, 0o600)
        os.chmod(tmp_path, 0o755)
        code, err = _as_nobody(["ls", "--node", s.node_path], {})
    assert code == 1, err
    assert "permission denied" in err.lower() and "Traceback" not in err
    assert err.count("\n") == 1


def _as_nobody(argv: list[str], env: dict[str, str | None]) -> tuple[int, str]:
    """Run ``dxg argv`` in a forked child that dropped to nobody, with ``env`` changes (None
    removes a variable); returns its exit code and what it printed on stderr."""
    import ctypes.util  # noqa: F401  (imported here: nobody may not read this tree)

    import dxg.cli.demo  # noqa: F401
    from dxg.cli.main import main

    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.close(rfd)
            sys.stderr = open(wfd, "w")  # the child's stderr until _exit
            for name, value in env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            code = main(argv)
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd) as f:
        err = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
@pytest.mark.parametrize("command", [["ls"], ["ps"], ["wait", "--timeout", "1"], ["demo"]])
def test_the_default_node_in_a_directory_others_control_is_refused(public_dir, command):
    """No --node and no DXG_NODE: the default path is checked before anything connects to it
    (here a directory everyone may write, where anyone could have put a node of their own)."""
    runtime = public_dir / "run"
    (runtime / "pydxg").mkdir(parents=True)
    os.chmod(runtime, 0o755)
    os.chmod(runtime / "pydxg", 0o777)
    code, err = _as_nobody(command, {"DXG_NODE": None, "XDG_RUNTIME_DIR": str(runtime)})
    assert code == 1, err
    assert "not connecting to the dxg node" in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_up_and_demo(tmp_path):
    """The main job: `dxg up`, then `dxg demo` with its three client processes."""
    node = str(tmp_path / "dxg.sock")
    env = dict(os.environ, DXG_NODE=node)
    up = subprocess.Popen([sys.executable, "-m", "dxg.cli.main", "up", "--mode", "0660"],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        r = dxg("wait", "--adapters", "2", "--timeout", "60", env={"DXG_NODE": node})
        assert r.returncode == 0, r.stderr
        assert oct(os.stat(node).st_mode & 0o777) == "0o660"
        r = dxg("demo", env={"DXG_NODE": node}, timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "demo OK: the host holds nothing" in r.stdout
        for name in ("cuda-app", "image-editor", "d3d12-app"):
            assert name in r.stdout
        # The seed's scenario: the editor renders into a shared resource and signals a shared
        # fence; the D3D12-style app waits for it on the GPU and reads the image, checked.
        assert "rendered the blur into shared resource" in r.stdout
        shared = [line for line in r.stdout.splitlines()
                  if "opened the editor's shared resource" in line]
        assert len(shared) == 1 and shared[0].endswith(": ok"), r.stdout
        assert r.stdout.count(": ok") >= 4 and "BAD" not in r.stdout
    finally:
        up.terminate()
        assert up.wait(timeout=30) == 0
    assert not os.path.exists(node)


def test_up_with_a_device_file(tmp_path):
    """`dxg up --dev-node PATH`: PATH itself becomes the device file (a FUSE mount over a
    file), driven with the real ioctl; stopping `dxg up` removes it and leaves no mount."""
    import ctypes
    import fcntl

    from dxg import uapi
    from dxg.node.fuse import fuse_available, pydxg_mounts

    if (why := fuse_available()) is not None:
        pytest.skip(f"!!! FUSE UNAVAILABLE ({why}): `dxg up --dev-node` is NOT being tested !!!")
    node, devfile = str(tmp_path / "dxg.sock"), tmp_path / "dxg"
    up = subprocess.Popen([sys.executable, "-m", "dxg.cli.main", "up", "--node", node,
                           "--dev-node", str(devfile)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        r = dxg("wait", "--adapters", "2", "--timeout", "60", env={"DXG_NODE": node})
        assert r.returncode == 0, r.stderr
        wait_until(lambda: pydxg_mounts(tmp_path) or up.poll() is not None, 30, "mount")
        assert up.poll() is None, up.stderr.read()
        fd = os.open(devfile, os.O_RDONLY | os.O_CLOEXEC)
        try:
            e = uapi.d3dkmt_enumadapters3()
            e.filter.include_compute_only = 1
            buf = bytearray(bytes(e))
            assert fcntl.ioctl(fd, uapi.LX_DXENUMADAPTERS3, buf, True) == 0
            assert uapi.d3dkmt_enumadapters3.from_buffer(buf).adapter_count == 2
            assert ctypes.sizeof(e) == len(buf)
        finally:
            os.close(fd)
    finally:
        up.terminate()
        assert up.wait(timeout=30) == 0, up.stderr.read()
    assert not pydxg_mounts(tmp_path) and not devfile.exists()


def _daemon(*args: str) -> tuple[subprocess.Popen, str]:
    """Start a `dxg` daemon; return it and its first stdout line."""
    p = subprocess.Popen([sys.executable, "-m", "dxg.cli.main", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if not line:
        raise AssertionError(f"dxg {args[0]} failed: {p.stderr.read()}")
    return p, line.strip()


def test_host_and_guest_apart_over_tcp_with_two_hosts(tmp_path):
    """`dxg host --listen tcp:...` twice, `dxg guest --connect ... --connect ...`: all four
    adapters enumerate through the one node, and each works."""
    procs = []
    try:
        addrs = []
        for host_id in ("box-a", "box-b"):
            h, line = _daemon("host", "--listen", "tcp:127.0.0.1:0", "--host-id", host_id)
            procs.append(h)
            addrs.append(line.rsplit(" ", 1)[-1])
        assert all(a.startswith("tcp:127.0.0.1:") for a in addrs)
        node = str(tmp_path / "dxg.sock")
        g, _ = _daemon("guest", "--connect", addrs[0], "--connect", addrs[1], "--node", node)
        procs.append(g)
        r = dxg("wait", "--adapters", "4", "--timeout", "60", env={"DXG_NODE": node})
        assert r.returncode == 0, r.stderr
        rows = json.loads(dxg("ls", "--json", env={"DXG_NODE": node}).stdout)["adapters"]
        assert len({row["luid"] for row in rows}) == 4
        holder = client("hold", node, 1, 1)
        held = read_json_line(holder)
        assert len(held["devices"]) == 4 and len(held["contexts"]) == 4
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
        ps = json.loads(dxg("ps", "--json", env={"DXG_NODE": node}).stdout)
        assert [h["census"]["totals"]["devices"] for h in ps["census"]["hosts"]] == [0, 0]
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            assert p.wait(timeout=30) == 0, p.stderr.read()


_HOLD_MEMORY = r"""
import json, os, sys
from dxg.client import open_node
node = open_node(sys.argv[1])
dev = node.adapters()[0].create_device()
local = dev.allocate(3 << 20)
far = dev.allocate(1 << 20, non_local=True)
print(json.dumps({"pid": os.getpid()}), flush=True)
sys.stdin.read()
"""


def test_ls_and_ps_show_memory(stack):
    """`dxg ls`: used/total per adapter (local and non-local); `dxg ps`: bytes per process."""
    env = {"DXG_NODE": stack.node_path}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_MEMORY, stack.node_path],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        pid = read_json_line(holder)["pid"]
        rows = json.loads(dxg("ls", "--json", env=env).stdout)["adapters"]
        mem = [row["memory"] for row in rows]
        assert mem[0]["local"] == {"used": 3 << 20, "total": 1 << 30}
        assert mem[0]["nonlocal"] == {"used": 1 << 20, "total": 4 << 30}
        assert mem[1]["local"]["used"] == 0 and mem[1]["nonlocal"]["used"] == 0
        table = dxg("ls", env=env)
        assert table.returncode == 0, table.stderr
        assert "3.0M/1.0G" in table.stdout and "1.0M/4.0G" in table.stdout
        assert "0/1.0G" in table.stdout

        data = json.loads(dxg("ps", "--json", env=env).stdout)
        mine = next(p for p in data["snapshot"]["processes"] if p["pid"] == pid)
        assert mine["memory"] == 4 << 20 and isinstance(mine["memory"], int)
        assert mine["allocations"] == 2
        per_adapter = {link["adapter"]: link["memory"] for link in mine["adapters"]}
        assert per_adapter[0] == 4 << 20 and per_adapter.get(1, 0) == 0
        text = dxg("ps", env=env).stdout
        line = next(ln for ln in text.splitlines() if str(pid) in ln)
        assert "4.0M" in line
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # gone with the process
    wait_until(lambda: json.loads(dxg("ls", "--json", env=env).stdout)["adapters"][0]
               ["memory"]["local"]["used"] == 0, 10, "the holder's memory back")


def test_memory_columns_without_the_census_figures():
    """A host whose census has no memory figures (an older host): "-", and None in JSON."""
    from dxg.cli.commands import adapter_memory, human_bytes, join_memory, match_adapters

    snap = {"adapters": [{"index": 0, "luid": "0x10", "host": 0},
                         {"index": 1, "luid": "0x20", "host": 0}],
            "processes": [{"pid": 7, "name": "app", "adapters": [
                {"adapter": 1, "devices": 1, "contexts": 0}]}]}
    old = {"hosts": [{"index": 0, "census": {
        "adapters": [{"index": 0, "handle": 1, "opens": 1}, {"index": 1, "handle": 2, "opens": 1}],
        "processes": [{"pid": 7}]}}]}
    assert adapter_memory(match_adapters(snap, old)[1]) == {
        "local": {"used": None, "total": None}, "nonlocal": {"used": None, "total": None}}
    data = join_memory({"snapshot": snap, "census": old})
    proc = data["snapshot"]["processes"][0]
    assert proc["memory"] is None and proc["allocations"] is None
    assert proc["adapters"][0]["memory"] is None
    assert human_bytes(None) == "-" and human_bytes(0) == "0" and human_bytes(1536) == "1.5K"
    assert human_bytes(12 << 20) == "12.0M" and human_bytes(1 << 30) == "1.0G"
    # with the figures, matched by LUID when the census gives one (here in reverse order)
    new = {"hosts": [{"index": 0, "census": {
        "adapters": [{"index": 1, "luid": "0x10", "memory": {"local": {"total": 8, "used": 2}}},
                     {"index": 0, "luid": "0x20"}],
        "processes": [{"pid": 7, "allocations": 3, "memory": [
            {"adapter": 0, "local": 5, "nonlocal": 1}, {"adapter": 1, "local": 4}]}]}}]}
    assert adapter_memory(match_adapters(snap, new)[0])["local"] == {"used": 2, "total": 8}
    data = join_memory({"snapshot": snap, "census": new})
    proc = data["snapshot"]["processes"][0]
    assert proc["memory"] == 10 and proc["allocations"] == 3
    assert proc["adapters"][0]["memory"] == 6  # guest adapter 1 is the host's adapter 0
    # no census at all (the host did not answer)
    gone = join_memory({"snapshot": snap, "census": {"hosts": [{"index": 0, "error": "x"}]}})
    assert gone["snapshot"]["processes"][0]["memory"] is None
