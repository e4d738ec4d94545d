"""The `dxg` command line, run as users run it: real processes, real node."""

import json
import os
import re
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
    assert len(rows) == 2 and all(row["vendor_id"] == 0x1414 for row in rows)
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
        g, first = _daemon("guest", "--connect", addrs[0], "--connect", addrs[1], "--node",
                           node)
        procs.append(g)
        r = dxg("wait", "--adapters", "4", "--timeout", "60", env={"DXG_NODE": node})
        assert r.returncode == 0, r.stderr
        rows = json.loads(dxg("ls", "--json", env={"DXG_NODE": node}).stdout)["adapters"]
        assert len({row["luid"] for row in rows}) == 4
        assert [row["host"] for row in rows] == [0, 0, 1, 1]
        holder = client("hold", node, 1, 1)
        held = read_json_line(holder)
        assert len(held["devices"]) == 4 and len(held["contexts"]) == 4
        _two_hosts_look_right(node, held["pid"], rows)
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
        ps = json.loads(dxg("ps", "--json", env={"DXG_NODE": node}).stdout)
        assert [h["census"]["totals"]["devices"] for h in ps["census"]["hosts"]] == [0, 0]
    finally:
        for p in reversed(procs):  # the guest first: its hosts are not lost while it runs
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        for p in procs:
            assert p.wait(timeout=30) == 0, p.stderr.read()
    # What the guest printed: its node, its hosts, one line per adapter, nothing else.
    out = [first, *g.stdout.read().splitlines()]
    assert out[0].startswith(f"node: {node} (mode 0666")
    assert out[1:3] == [f"guest: bound host {a}" for a in addrs]
    assert [ln.split(":")[0] for ln in out[3:]] == [f"adapter {i}" for i in range(4)], out
    assert [ln.endswith(f"(host {i // 2})") for i, ln in enumerate(out[3:])] == [True] * 4
    assert g.stderr.read() == ""


def _two_hosts_look_right(node: str, pid: int, rows: list[dict]) -> None:
    """`dxg ls`, `ps` and `top --once` with a guest bound to two hosts: each adapter says
    which host it is on, and everything fits 80 columns (top: 24 rows)."""
    env = {"DXG_NODE": node}
    ls = dxg("ls", env=env).stdout.splitlines()
    assert ls[0].split() == ["#", "LUID", "host", "local", "non-local", "GPU%", "flags"]
    for i, row in enumerate(rows):
        cells = ls[1 + i].split()
        assert cells[:3] == [str(i), row["luid"], str(row["host"])], ls
    assert [ln.split(":")[0] for ln in ls[5:7]] == ["host 0", "host 1"]
    ps = dxg("ps", env=env).stdout.splitlines()
    headings = [ln for ln in ps if ln.startswith("adapter ")]
    assert [h.split()[3:5] for h in headings] == [["host", str(r["host"])] for r in rows]
    assert sum(1 for ln in ps if re.match(rf"\s*{pid}\s", ln)) == 4, ps
    top = dxg("top", "--once", "--interval", "0.2", env={**env, "COLUMNS": "80",
                                                           "LINES": "24"}).stdout.splitlines()
    assert re.findall(r"^\s*\d+ 0x[0-9a-f]{16} h(\d)", "\n".join(top), re.M) == \
        ["0", "0", "1", "1"], top
    assert sum(1 for ln in top if re.match(rf"\s*{pid}\s", ln)) == 4, top
    for lines in (ls, ps, top):
        assert all(len(line) <= 80 for line in lines), lines
    assert len(top) <= 24


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
    from dxg.cli.views import adapter_memory, human_bytes, join_memory, match_adapters

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


# ---- the operator's view: one JSON number format, who `dxg ps` lists, measured use ----------


_LUID = re.compile(r"^0x[0-9a-f]{16}$")


def _json_values(value, key=""):
    """(key, value) of every scalar in a JSON document."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _json_values(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from _json_values(v, key)
    else:
        yield key, value


def test_every_json_output_has_one_number_format(stack):
    """Numbers are JSON numbers; only LUIDs are strings, "0x%016x", in `ls` and `ps` alike."""
    env = {"DXG_NODE": stack.node_path}
    holder = client("hold", stack.node_path, 1, 1)
    try:
        read_json_line(holder)
        ls = json.loads(dxg("ls", "--json", env=env).stdout)
        ps = json.loads(dxg("ps", "--json", env=env).stdout)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    row = ls["adapters"][0]
    assert isinstance(row["handle"], int) and row["vendor_id"] == 0x1414
    assert isinstance(row["device_id"], int) and isinstance(row["slots"], int)
    for doc in (ls, ps):
        values = list(_json_values(doc))
        luids = [v for k, v in values if k == "luid" or k.endswith("_luid")]
        assert luids and all(isinstance(v, str) and _LUID.match(v) for v in luids), luids
        hexes = [(k, v) for k, v in values if isinstance(v, str) and v.startswith("0x")
                 and not (k == "luid" or k.endswith("_luid"))]
        assert hexes == [], hexes
    assert {a["luid"] for a in ls["adapters"]} == {a["luid"] for a in ps["adapters"]}
    census = ps["census"]["hosts"][0]["census"]
    assert {a["guest_luid"] for a in census["adapters"]} == {a["luid"] for a in ls["adapters"]}


_IDLE = r"""
import json, os, sys
from dxg.client import open_node
node = open_node(sys.argv[1])
adapters = node.adapters()          # adapter handles, but no objects on the adapters
print(json.dumps({"pid": os.getpid()}), flush=True)
sys.stdin.read()
"""


def test_ps_lists_only_processes_holding_objects_and_never_itself(stack):
    env = {"DXG_NODE": stack.node_path}
    holder = client("hold", stack.node_path, 1, 0)
    idle = subprocess.Popen([sys.executable, "-c", _IDLE, stack.node_path], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        held, waiting = read_json_line(holder)["pid"], read_json_line(idle)["pid"]
        r = dxg("ps", "--json", "--interval", "0", env=env)
        data = json.loads(r.stdout)
        pids = {p["pid"] for p in data["snapshot"]["processes"]}
        assert held in pids and waiting not in pids, pids
        assert data["interval"] is None  # --interval 0: not measured
        text = dxg("ps", env=env)
        assert text.returncode == 0, text.stderr
        listed = {int(m) for m in re.findall(r"^\s+(\d+)\s", text.stdout, re.M)}
        assert listed == {held}, text.stdout
        assert all(len(line) <= 80 for line in text.stdout.splitlines())
    finally:
        for p in (holder, idle):
            p.stdin.close()
            p.wait(timeout=30)
    # `dxg ps` never lists itself: with nothing else alive there is nothing to list
    wait_until(lambda: not json.loads(dxg("ps", "--json", "--interval", "0", env=env).stdout)
               ["snapshot"]["processes"], 10, "the clients gone")


def test_utilization_is_measured_per_adapter_and_process(stack):
    """A client keeping adapter 1 busy: `ls` and `ps` measure its engine time; it stops, and
    the figures go back to 0."""
    env = {"DXG_NODE": stack.node_path}
    busy = client("busy", stack.node_path, 1)
    try:
        pid = read_json_line(busy, 60)["pid"]

        def measured() -> tuple[dict, dict] | None:
            ls = json.loads(dxg("ls", "--json", "--interval", "0.3", env=env).stdout)
            ps = json.loads(dxg("ps", "--json", "--interval", "0.3", env=env).stdout)
            mine = next(p for p in ps["snapshot"]["processes"] if p["pid"] == pid)
            link = mine["adapters"][0]
            if ls["adapters"][1]["utilization"] and link["utilization"]:
                return ls, link
            return None

        ls, link = wait_until(measured, 60, "utilization measured on adapter 1")
        assert 0 < ls["adapters"][1]["utilization"] <= 100
        assert ls["adapters"][0]["utilization"] == 0  # nobody works there
        assert link["adapter"] == 1 and link["state"] == "running"
        assert link["queues"] == 1 and link["fences"] >= 1 and link["memory"] > 0
        assert 0 < ls["interval"] < 5
        text = dxg("ps", env=env).stdout
        row = next(ln for ln in text.splitlines() if re.match(rf"\s*{pid}\s", ln))
        assert re.search(r"\s\d+%\s", row) and row.rstrip().endswith("running")
    finally:
        busy.stdin.close()
        busy.wait(timeout=60)
    wait_until(lambda: json.loads(dxg("ls", "--json", "--interval", "0.2", env=env).stdout)
               ["adapters"][1]["utilization"] == 0, 30, "adapter 1 idle again")


def test_up_is_quiet_and_says_each_thing_once(tmp_path):
    """`dxg up`: its node and its adapters, one line each, and nothing on stderr; `-v` after
    the subcommand adds the log (what happens), and the node path is still said once."""
    node = str(tmp_path / "dxg.sock")
    for verbose in ((), ("-v",)):
        up = subprocess.Popen([sys.executable, "-m", "dxg.cli.main", "up", "--node", node,
                               "--priority", "0", *verbose],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            r = dxg("wait", "--adapters", "2", "--timeout", "60", env={"DXG_NODE": node})
            assert r.returncode == 0, r.stderr
        finally:
            up.terminate()
            out, err = up.communicate(timeout=30)
        assert up.returncode == 0, err
        lines = out.splitlines()
        assert lines[0] == f"node: {node} (mode 0666; clients need DXG_NODE set to it)"
        assert [ln.split(": ")[0] for ln in lines[1:]] == ["adapter 0", "adapter 1"], lines
        assert all(re.match(r"adapter \d: 0x[0-9a-f]{16}  pydxg Soft GPU \(NumPy\), 1\.0G local"
                            r" \+ 4\.0G non-local$", ln) for ln in lines[1:]), lines
        if verbose:
            assert "adapter" in err and "up:" in err, err  # the log says what happened
            assert (out + err).count(node) == 1, err
        else:
            assert err == ""


def test_global_options_work_after_the_subcommand(stack):
    env = {"DXG_NODE": stack.node_path}
    for args in (["ls", "-v"], ["-v", "ls"], ["ls", "--json", "-vv"], ["ps", "-v"],
                 ["top", "--once", "-v", "--interval", "0.1"]):
        r = dxg(*args, env=env)
        assert r.returncode == 0, (args, r.stderr)
    r = dxg("ls", "--interval", "-1", env=env)
    assert r.returncode == 2 and "is not an interval (seconds, 0 to 3600)" in r.stderr
