"""The runtime with real client processes: calls in flight per process, long host commands next
to other processes and adapters, descriptors across both hops (and the TCP copy path), what a
killed process leaves, and the faults a new user hit (dead FUSE mounts aside: test_fuse).

Nothing here sleeps to let things settle: every wait is on a condition with a deadline, and
"did not wait for the parked call" is shown by order (the parked call is still running when the
others are done), not by timing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import CLIENTS, make_stack, read_json_line, wait_until
from dxg.client import open_node
from dxg.host.config import HostConfig
from dxg.host.host import Host
from dxg.oslib.fds import open_fd_count
from dxg.uapi import wire

NOBODY = 65534


def rt_client(node: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(CLIENTS / "rt.py"), node, *map(str, args)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def host_jobs(host: Host, pid: int) -> int:
    """Backend jobs the host runs for the client process `pid` right now."""
    total = 0
    for part in host.census()["partitions"]:
        for proc in part["processes"]:
            if proc["pid"] == pid:
                total += proc["jobs"]
    return total


def finish(p: subprocess.Popen[str]) -> None:
    if p.poll() is None:
        p.kill()
    p.wait(timeout=30)
    for pipe in (p.stdin, p.stdout, p.stderr):
        if pipe is not None:
            pipe.close()


# ---- many calls in flight per process -----------------------------------------------------------


@pytest.mark.parametrize("mode", ["threads", "tasks"])
def test_a_call_parked_on_the_host_parks_only_its_thread(stack, mode):
    p = rt_client(stack.node_path, mode, 50)
    try:
        hello = read_json_line(p)
        wait_until(lambda: host_jobs(stack.host, hello["pid"]) == 1, 10, "the SLEEP running")
        p.stdin.write("go\n")
        p.stdin.flush()
        result = read_json_line(p, timeout=60)
        assert result["finished"] == 50
        assert result["parked_still"], "the other calls waited for the parked one"
        assert host_jobs(stack.host, hello["pid"]) == 1
    finally:
        finish(p)
    # The killed process's SLEEP stops, and everything it had goes.
    wait_until(lambda: stack.host_totals()["processes"] == 0, 10, "host processes gone")
    assert stack.driver.processes() == []


def test_a_long_host_command_delays_no_other_process_or_adapter(stack):
    parker = rt_client(stack.node_path, "park", 0, 60_000)
    try:
        pid = read_json_line(parker)["pid"]
        wait_until(lambda: host_jobs(stack.host, pid) == 1, 10, "the SLEEP running")
        for adapter in (1, 0):  # the other adapter, and the same one (no device in common)
            other = rt_client(stack.node_path, "calls", adapter, 100)
            assert read_json_line(other, timeout=60)["done"] == 100
            assert other.wait(timeout=30) == 0
        assert host_jobs(stack.host, pid) == 1, "the parked command finished first"
    finally:
        finish(parker)
    wait_until(lambda: stack.host_totals()["processes"] == 0, 10)


def test_sigkill_with_calls_in_flight_leaves_nothing(stack):
    p = rt_client(stack.node_path, "busy")
    ready = read_json_line(p)
    wait_until(lambda: host_jobs(stack.host, ready["pid"]) == 1, 10, "the SLEEP running")
    totals = stack.host_totals()
    assert totals["devices"] == 7 and totals["contexts"] == 12
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    wait_until(lambda: stack.host_totals()["processes"] == 0, 10, "host processes gone")
    totals = stack.host_totals()
    assert totals["devices"] == 0 and totals["contexts"] == 0 and totals["regions"] == 0
    assert stack.driver.processes() == []
    with open_node(stack.node_path) as node:  # the node keeps serving
        assert len(node.adapters()) == 2


# ---- descriptors across both hops -----------------------------------------------------------------


def _region(host: Host, pid: int, region: int):
    def find():
        for part in host.partitions():
            for proc in part.processes.values():
                if proc.pid == pid and region in proc.regions:
                    return proc.regions[region]
        return None

    return host.rt.call(find)


@pytest.mark.parametrize("embedded", [False, True], ids=["unix", "embedded"])
def test_a_host_memfd_reaches_the_client_and_both_see_each_others_writes(tmp_path, embedded):
    with make_stack(tmp_path, "fd", embedded=embedded) as s:
        p = rt_client(s.node_path, "shmem", 1 << 20)
        try:
            r = read_json_line(p)
            assert r["host_pattern"], "the client does not see what the host wrote"
            region = _region(s.host, r["pid"], r["region"])
            assert region is not None
            # the client's write, seen by the host through the same pages
            assert s.host.rt.call(region.mem.read, (1 << 20) - 64, 64).hex() == r["mine"]
            # the host's write, seen by the client
            data = os.urandom(32)
            s.host.rt.call(region.mem.write, 4096, data)
            p.stdin.write(f"check 4096 {data.hex()}\n")
            p.stdin.flush()
            assert read_json_line(p)["saw_host_write"]
            assert read_json_line(p)["freed"]
            assert p.wait(timeout=30) == 0
        finally:
            finish(p)
        wait_until(lambda: s.host_totals()["regions"] == 0, 10)


def test_ten_thousand_passes_leak_no_descriptor(tmp_path):
    with make_stack(tmp_path, "leak", embedded=True) as s:
        warm = rt_client(s.node_path, "shmem-loop", 10)
        assert read_json_line(warm)["ok"] == 10
        finish(warm)
        wait_until(lambda: s.driver.processes() == [], 10)
        before = open_fd_count()  # host, guest and node all live in this process
        p = rt_client(s.node_path, "shmem-loop", 10_000)
        r = read_json_line(p, timeout=400)
        assert p.wait(timeout=30) == 0
        finish(p)
        assert r["ok"] == 10_000
        assert r["fds_after"] <= r["fds_before"], "the client holds more descriptors"
        wait_until(lambda: s.driver.processes() == [], 10)
        wait_until(lambda: open_fd_count() <= before, 10, "the stack's descriptors back")
        assert s.host_totals()["regions"] == 0


def test_an_eventfd_goes_from_the_client_to_the_host(stack):
    from dxg.uapi.ntstatus import NTSTATUS

    p = rt_client(stack.node_path, "eventfd")
    r = read_json_line(p)
    assert r["value"] == 12 and r["after"] == 1
    assert r["refused"] == {"full": NTSTATUS.STATUS_DEVICE_BUSY,
                            "zero": NTSTATUS.STATUS_INVALID_PARAMETER,
                            "pipe": NTSTATUS.STATUS_INVALID_PARAMETER}
    assert p.wait(timeout=30) == 0


def test_over_tcp_the_same_calls_copy_with_bulk_data(tmp_path):
    from dxg.client import DxgError, diag
    from dxg.guest.driver import GuestDriver
    from dxg.node.server import SocketNode
    from dxg.uapi.ntstatus import NTSTATUS

    with Host(HostConfig(adapters=1)) as host:
        addr = host.listen("tcp:127.0.0.1:0")
        drv = GuestDriver()
        node = SocketNode(drv, str(tmp_path / "dxg.sock"))
        try:
            drv.bind(addr)
            assert drv.wait_for_adapters(1, 15)
            node.start()
            size = 3 << 20  # far past one 128 KiB packet, both ways
            with open_node(str(tmp_path / "dxg.sock")) as n:
                ad = n.adapters()[0]
                region, fd = diag.shmem_create(ad, size)
                try:
                    st = os.fstat(fd)
                    assert st.st_size == size
                    copy = os.pread(fd, size, 0)
                    assert copy == (bytes(range(251)) * (size // 251 + 1))[:size]
                finally:
                    os.close(fd)
                data = os.urandom(size)
                diag.shmem_write(ad, region, 0, data)
                assert diag.shmem_read(ad, region, 0, size) == data
                diag.shmem_free(ad, region)
                # a descriptor cannot reach the host over TCP: a clear status, nothing hangs
                efd = os.eventfd(0)
                try:
                    with pytest.raises(DxgError) as e:
                        diag.eventfd_signal(ad, efd, 1)
                    assert e.value.status == NTSTATUS.STATUS_NOT_SUPPORTED
                finally:
                    os.close(efd)
        finally:
            node.close()
            drv.close()


# ---- two stacks in one process --------------------------------------------------------------------


def test_an_embedded_and_a_socket_stack_in_one_process(tmp_path):
    with make_stack(tmp_path, "a", embedded=True) as a, make_stack(tmp_path, "b") as b:
        assert a.driver.rt is not b.driver.rt and a.host.rt is a.driver.rt
        procs = [rt_client(x.node_path, "calls", 1, 50) for x in (a, b)]
        for p in procs:
            assert read_json_line(p, timeout=60)["done"] == 50
            assert p.wait(timeout=30) == 0
        wait_until(lambda: a.host_totals()["processes"] == 0, 10)
        wait_until(lambda: b.host_totals()["processes"] == 0, 10)


# ---- the wire ----------------------------------------------------------------------------------


def test_a_wire_1_client_gets_a_clear_version_error(stack):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(stack.node_path)
    s.sendall(wire.encode(wire.Hello(1, 1), 1))
    dec = wire.FrameDecoder()
    while (frame := dec.next_frame()) is None:
        dec.feed(s.recv(4096))
    reply = wire.decode(frame)
    assert isinstance(reply, wire.ErrorReply) and reply.fatal
    assert reply.errno == 93 and f"wire version {wire.MAX_WIRE_VERSION}" in reply.message
    assert s.recv(1) == b""
    s.close()


# ---- faults a new user hit ------------------------------------------------------------------------


def _dxg(*args: str, **kw) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "dxg.cli.main", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _up_until_ready(node: Path, stop: str) -> None:
    """`dxg up` at ``node`` until `dxg wait` sees its two adapters; then stop it with
    ``stop`` ("kill" or "terminate")."""
    up = _dxg("up", "--node", str(node))
    try:
        r = subprocess.run([sys.executable, "-m", "dxg.cli.main", "wait", "--node", str(node),
                            "--adapters", "2", "--timeout", "60"], capture_output=True,
                           text=True, timeout=90)
        assert r.returncode == 0, r.stderr
    finally:
        getattr(up, stop)()
        up.wait(timeout=30)


def test_a_killed_dxg_up_leaves_no_host_socket_behind(tmp_path):
    node = tmp_path / "n" / "dxg.sock"
    _up_until_ready(node, "kill")
    left = sorted(p.name for p in node.parent.iterdir())
    assert left == ["dxg.sock"], left  # the node's own socket (replaced by the next start)
    _up_until_ready(node, "terminate")
    assert not node.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a node as another user")
def test_a_per_user_node_directory_is_created_private(tmp_path):
    """A node started by an ordinary user at the default path makes its directory 0700
    (it was 0755, where the docs promise 0700)."""
    from dxg.guest.driver import GuestDriver
    from dxg.node.server import SocketNode

    base = Path(tempfile.mkdtemp(prefix="pydxg-user-"))  # /tmp: nobody can reach it
    os.chmod(base, 0o755)
    runtime = base / "runtime"
    runtime.mkdir()
    os.chown(runtime, NOBODY, NOBODY)
    os.chmod(runtime, 0o700)
    request_cleanup = shutil.rmtree
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: an unprivileged user with everything already imported
        code = 1
        try:
            os.close(r)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.environ.pop("DXG_NODE", None)
            os.environ["XDG_RUNTIME_DIR"] = str(runtime)
            drv = GuestDriver()
            node = SocketNode(drv)
            node.start()
            st = os.stat(runtime / "pydxg")
            os.write(w, f"{stat.S_IMODE(st.st_mode):o} {st.st_uid} {node.path}".encode())
            node.close()
            drv.close()
            code = 0
        except BaseException as e:
            os.write(w, f"error {type(e).__name__} {e}".encode())
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        got = f.read().split()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, " ".join(got)
    request_cleanup(base, ignore_errors=True)
    assert got[0] == "700" and int(got[1]) == NOBODY
    assert got[2] == str(runtime / "pydxg" / "dxg.sock")
