"""Sharing between processes by descriptor, and sync files, end to end with real processes and
real sockets (docs/sharing.md): resources and fences shared by ShareObjects and opened in another
process (the descriptor given by pass_fds or SCM_RIGHTS), access rights enforced on every path
(Lock2 and the mapping, Unlock2, the GPU, signals), lifetimes (the last handle and the last
descriptor, in any order; SIGKILL), hostile descriptors, sync files polled and waited on from
the GPU, and the errors where the real driver says nothing."""

import asyncio
import contextlib
import ctypes
import errno
import itertools
import mmap
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import Stack, make_stack, read_json_line, wait_until
from dxg.client import (
    DxgError,
    Resource,
    SharedHandle,
    SyncFile,
    open_node,
    open_node_async,
)
from dxg.client import thunks as t
from dxg.client.sync import signal_from_gpu
from dxg.host.quota import GuestLedgers
from dxg.host.share import HostShares, readonly_fd
from dxg.protocol import messages as m
from dxg.protocol.commands import GlobalCommand, VgpuCommand
from dxg.uapi import structs as s
from dxg.uapi.access import GENERIC_READ
from dxg.uapi.memory import PAGE_SIZE, AllocDesc
from dxg.uapi.ntstatus import NTSTATUS
from test_client_memory import tcp_stack
from test_host_memory import make_host, new_dev

MIB = 1 << 20
OK = NTSTATUS.STATUS_SUCCESS
ACCESS_DENIED = NTSTATUS.STATUS_ACCESS_DENIED
INVALID = NTSTATUS.STATUS_INVALID_PARAMETER
BAD_HANDLE = NTSTATUS.STATUS_INVALID_HANDLE
# d3dkmt_createallocationflags: create_resource, create_shared, nt_security_sharing
SHARED_RESOURCE_FLAGS = (1 << 0) | (1 << 1) | (1 << 6)


@pytest.fixture(params=["unix", "embedded"])
def stack(request, tmp_path: Path) -> Iterator[Stack]:
    """The guest on a Unix socket to the host, and as `dxg up` runs them (one loop)."""
    with make_stack(tmp_path, embedded=request.param == "embedded") as s_:
        yield s_


@pytest.fixture
def unix(tmp_path: Path) -> Iterator[Stack]:
    with make_stack(tmp_path) as s_:
        yield s_


def pattern(n: int, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def shared_census(st: Stack) -> dict:
    (part,) = st.host.census()["partitions"]
    return part["shared"]


def guest_shares(st: Stack) -> dict:
    return st.driver.snapshot()["shares"]


def nothing_shared(st: Stack) -> bool:
    c = shared_census(st)
    return (not any(c.values())) and not any(guest_shares(st).values())


def settled(st: Stack, descriptors: int) -> None:
    """Wait until the guest keeps ``descriptors`` share descriptors and the host as many NT
    references (a closed descriptor's reference goes back once the guest sees it closed)."""
    wait_until(lambda: guest_shares(st)["share_fds"] == descriptors
               and shared_census(st)["nt_refs"] == descriptors,
               what=f"{descriptors} share descriptors on guest and host")


def child(code: str, *args: object, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    """A client process running ``code`` (argv[1:] = args; stdin/stdout piped, JSON lines)."""
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], pass_fds=pass_fds,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def tell(proc: subprocess.Popen, word: str = "go") -> None:
    assert proc.stdin is not None
    proc.stdin.write(word + "\n")
    proc.stdin.flush()


def finish(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with_stdin = proc.stdin
        if with_stdin is not None and not with_stdin.closed:
            try:
                with_stdin.close()
            except BrokenPipeError:
                pass
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- resources across processes ------------------------------------------------------------------

OPENER = r"""
import json, sys
import numpy as np
from dxg.client import open_node
node = open_node(sys.argv[1])
dev = node.adapters()[0].create_device()
res = dev.open_resource(int(sys.argv[2]))
a, b = res.allocations
print(json.dumps({"sizes": [a.size, b.size], "first": a.download(16).hex(),
                  "opened": res.opened, "runtime": res.runtime_data.hex()}), flush=True)
b.upload(b"from the opener")
with a.map() as view:
    print(json.dumps({"written": True}), flush=True)
    sys.stdin.readline()                  # the owner writes through its own mapping now
    print(json.dumps({"seen": bytes(view[:5]).hex()}), flush=True)
sys.stdin.readline()
"""


def test_a_resource_shared_with_another_process_is_the_same_memory(stack):
    data = pattern(3 * PAGE_SIZE)
    with open_node(stack.node_path) as node:
        dev = node.adapters()[0].create_device()
        res = dev.shared_resource([3 * PAGE_SIZE, 2 * MIB])
        assert isinstance(res, Resource) and not res.opened and len(res.allocations) == 2
        a, b = res.allocations
        a.upload(data)
        with res.share() as handle:
            assert isinstance(handle, SharedHandle) and not handle.read_only
            proc = child(OPENER, stack.node_path, handle.fileno(), pass_fds=(handle.fileno(),))
        try:
            got = read_json_line(proc)
            assert got["sizes"] == [3 * PAGE_SIZE, 2 * MIB] and got["opened"]
            assert bytes.fromhex(got["first"]) == data[:16]
            assert read_json_line(proc)["written"]
            assert b.download(15) == b"from the opener"
            with a.map() as view:  # zero-copy both ways: the opener's mapping sees this
                view[:5] = list(b"owner")
            tell(proc)
            assert bytes.fromhex(read_json_line(proc)["seen"]) == b"owner"
            c = shared_census(stack)
            assert c["resources"] == 1 and c["blocks"] == 2 and c["block_bytes"] == 3 * PAGE_SIZE + 2 * MIB
        finally:
            finish(proc)
        res.close()
    wait_until(lambda: nothing_shared(stack), what="the shared resource gone")


SCM_OPENER = r"""
import json, socket, sys
from dxg.client import open_node
sock = socket.socket(fileno=int(sys.argv[2]))
msg, fds, _, _ = socket.recv_fds(sock, 16, 4)
node = open_node(sys.argv[1])
res = node.adapters()[0].create_device().open_resource(fds[0])
print(json.dumps({"msg": msg.decode(), "data": res.allocations[0].download(6).hex()}), flush=True)
sys.stdin.readline()
"""


def test_a_share_descriptor_travels_by_scm_rights(unix):
    with open_node(unix.node_path) as node:
        dev = node.adapters()[0].create_device()
        res = dev.shared_resource(PAGE_SIZE)
        res.allocations[0].upload(b"by fd!")
        ours, theirs = socket.socketpair()
        proc = child(SCM_OPENER, unix.node_path, theirs.fileno(), pass_fds=(theirs.fileno(),))
        theirs.close()
        try:
            with res.share() as handle:
                socket.send_fds(ours, [b"here"], [handle.fileno()])
            got = read_json_line(proc)  # (our copy is closed: the one in flight keeps it)
            assert got == {"msg": "here", "data": b"by fd!".hex()}
        finally:
            finish(proc)
            ours.close()
        res.close()
    wait_until(lambda: nothing_shared(unix), what="the shared resource gone")


READ_ONLY_OPENER = r"""
import ctypes, errno, json, mmap, os, sys
import numpy as np
from dxg.backends.softcmd import CommandBuffer, DType, Operand
from dxg.client import DxgError, open_node
from dxg.client.execution import DeviceFault
F32 = DType.of(np.float32)
node = open_node(sys.argv[1])
dev = node.adapters()[0].create_device()
res = dev.open_resource(int(sys.argv[2]))
(a,) = res.allocations
out = {"read": np.frombuffer(a.download(16), np.float32).tolist()}
try:
    a.upload(b"no")
    out["upload"] = "written"
except DxgError as e:
    out["upload"] = int(e.status)
libc = ctypes.CDLL(None, use_errno=True)
with a.map() as view:
    out["read_only"] = a.read_only
    out["writeable"] = bool(view.flags.writeable)
    try:
        view[0] = 1
    except ValueError:
        out["assign"] = "refused"
    addr = view.ctypes.data
    ok = libc.mprotect(ctypes.c_void_p(addr), ctypes.c_size_t(4096),
                       mmap.PROT_READ | mmap.PROT_WRITE)
    out["mprotect"] = ctypes.get_errno() if ok else 0
    pid = os.fork()
    if pid == 0:
        ctypes.memmove(addr, b"x", 1)     # a raw write through the mapping: the page is read-only
        os._exit(0)
    _, st = os.waitpid(pid, 0)
    out["raw_write_signal"] = os.WTERMSIG(st) if os.WIFSIGNALED(st) else 0
# the GPU: reading the shared memory works, writing it faults this device alone
q = dev.create_context().hwqueue()
mine = dev.array(np.zeros(1024, np.float32))
va, vm = a.map_gpu(), mine.map_gpu()
def run(cmd):
    raw = cmd.tobytes()
    buf = dev.allocate(len(raw)); buf.upload(raw)
    return q.wait(q.submit(int(buf.map_gpu()), len(raw)), timeout=20)
cmd = CommandBuffer()
cmd.binary("add", Operand(int(vm), F32, (1024,)), Operand(int(va), F32, (1024,)),
           Operand(int(va), F32, (1024,)))
run(cmd)
out["gpu_read"] = mine.download()[:2].tolist()
cmd = CommandBuffer()
cmd.binary("add", Operand(int(va), F32, (1024,)), Operand(int(va), F32, (1024,)),
           Operand(int(va), F32, (1024,)))
try:
    run(cmd)
    out["gpu_write"] = "done"
except DeviceFault as e:
    out["gpu_write"] = "fault"
    out["fault_va"] = e.address == int(va)
# sharing onward cannot give more access than it has
h = res.share()
again = node.adapters()[0].create_device().open_resource(h)
with again.allocations[0].map() as v2:
    out["reshared_read_only"] = again.allocations[0].read_only and not v2.flags.writeable
print(json.dumps(out), flush=True)
sys.stdin.readline()
"""


def test_a_read_only_share_cannot_be_written_through_any_path(unix):
    with open_node(unix.node_path) as node:
        ad = node.adapters()[0]
        dev = ad.create_device()
        res = dev.shared_resource(4096)
        (a,) = res.allocations
        a.upload(np.ones(1024, np.float32))
        with res.share(read_only=True) as handle:
            assert handle.read_only
            proc = child(READ_ONLY_OPENER, unix.node_path, handle.fileno(),
                         pass_fds=(handle.fileno(),))
        try:
            got = read_json_line(proc, 60)
        finally:
            finish(proc)
        assert got["read"] == [1.0] * 4
        assert got["upload"] == ACCESS_DENIED
        assert got["read_only"] and not got["writeable"] and got["assign"] == "refused"
        assert got["mprotect"] == errno.EACCES  # the descriptor was O_RDONLY: never writable
        assert got["raw_write_signal"] == signal.SIGSEGV
        assert got["gpu_read"] == [2.0, 2.0]
        assert got["gpu_write"] == "fault" and got["fault_va"]
        assert got["reshared_read_only"]
        # nothing the opener tried reached the memory; the owner's device is untouched
        assert np.frombuffer(a.download(4096), np.float32).tolist() == [1.0] * 1024
        assert dev.execution_state() == 1
        a.upload(b"\0\0\0\0")  # the owner still writes
        res.close()
    wait_until(lambda: nothing_shared(unix), what="the shared resource gone")


def test_a_read_only_block_cannot_be_reopened_for_writing():
    """The descriptor a read-only opener gets is the block reopened O_RDONLY; the block's mode
    is 0444, so a process that is not root cannot reopen it for writing either."""
    shares = HostShares(GuestLedgers(None))
    block = shares.new_block(PAGE_SIZE, "shared", 0)
    fd = readonly_fd(block)
    try:
        assert os.get_inheritable(fd) is False
        with pytest.raises(PermissionError):
            mmap.mmap(fd, PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        pid = os.fork()
        if pid == 0:  # (root may reopen anything: drop to nobody first)
            code = 0
            try:
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                try:
                    os.close(os.open(f"/proc/self/fd/{fd}", os.O_RDWR))
                    code = 1
                except PermissionError:
                    pass
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        os.close(fd)
        shares.close_block(block)
    assert shares.blocks == 0


# ---- fences across processes ---------------------------------------------------------------------

FENCE_OPENER = r"""
import json, sys
from dxg.client import DxgError, open_node
node = open_node(sys.argv[1])
dev = node.adapters()[0].create_device()
g = dev.open_fence(int(sys.argv[2]))
r = dev.open_fence(int(sys.argv[3]))
n = dev.open_fence(int(sys.argv[2]), read_only=True)
out = {"value": g.value}
g.signal(5)
print(json.dumps(out), flush=True)
sys.stdin.readline()
out = {"waited": int(g.wait(10, timeout=20)), "ro_value": r.value}
for name, f in (("ro", r), ("no_signal", n)):
    try:
        f.signal(20)
        out[name] = "signalled"
    except DxgError as e:
        out[name] = int(e.status)
out["ro_wait"] = int(r.wait(10, timeout=5))
print(json.dumps(out), flush=True)
sys.stdin.readline()
"""


def test_a_fence_shared_with_another_process(stack):
    with open_node(stack.node_path) as node:
        dev = node.adapters()[0].create_device()
        f = dev.shared_fence(3)
        assert f.shared
        rw, ro = f.share(), f.share(read_only=True)
        proc = child(FENCE_OPENER, stack.node_path, rw.fileno(), ro.fileno(),
                     pass_fds=(rw.fileno(), ro.fileno()))
        rw.close()
        ro.close()
        try:
            assert read_json_line(proc) == {"value": 3}
            assert f.wait(5, timeout=20) == OK and f.value == 5  # the opener signalled it
            f.signal(10)
            tell(proc)
            got = read_json_line(proc)
            assert got == {"waited": 0, "ro_value": 10, "ro": ACCESS_DENIED,
                           "no_signal": ACCESS_DENIED, "ro_wait": 0}
            assert f.value == 10
            c = shared_census(stack)
            assert c["sync_objects"] == 1 and c["opened_sync_objects"] == 3
        finally:
            finish(proc)
        f.close()
    wait_until(lambda: nothing_shared(stack), what="the shared fence gone")


# ---- lifetimes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("order", list(itertools.permutations(["owner", "opener", "fd"])))
def test_a_shared_resource_lives_until_its_last_handle_and_descriptor(unix, order):
    with open_node(unix.node_path) as node:
        ad = node.adapters()[0]
        base = ad.video_memory_info().current_usage
        owner_dev, opener_dev = ad.create_device(), ad.create_device()
        res = owner_dev.shared_resource(2 * PAGE_SIZE)
        res.allocations[0].upload(b"kept")
        handle = res.share()
        other = opener_dev.open_resource(handle)
        assert ad.video_memory_info().current_usage == base + 2 * PAGE_SIZE  # counted once
        holders = {"owner": res, "opener": other, "fd": handle}
        for i, name in enumerate(order):
            holders.pop(name).close()
            if i < 2:
                # what was closed is gone on guest and host (a descriptor: once the guest saw
                # its last copy closed); what is left still holds the resource
                settled(unix, int("fd" in holders))
                assert shared_census(unix)["resources"] == 1
                left = [h for h in holders.values() if isinstance(h, Resource)]
                if left:  # the memory and its contents are still there for who holds it
                    assert left[0].allocations[0].download(4) == b"kept"
                else:  # only the descriptor: opening it again finds the contents
                    again = opener_dev.open_resource(holders["fd"])
                    assert again.allocations[0].download(4) == b"kept"
                    again.close()
                # the memory stays counted while it lives (by a holder, or as nobody's)
                adapter_used = unix.host.census()["adapters"][0]["memory"]["local"]["used"]
                assert adapter_used >= 2 * PAGE_SIZE
        wait_until(lambda: nothing_shared(unix), what="the shared resource gone")
        assert ad.video_memory_info().current_usage == base
        assert unix.host.census()["adapters"][0]["memory"]["local"]["used"] == base


@pytest.mark.parametrize("order", list(itertools.permutations(["owner", "opener", "fd"])))
def test_a_shared_fence_lives_until_its_last_handle_and_descriptor(unix, order):
    with open_node(unix.node_path) as node:
        ad = node.adapters()[0]
        owner_dev, opener_dev = ad.create_device(), ad.create_device()
        f = owner_dev.shared_fence(1)
        handle = f.share()
        g = opener_dev.open_fence(handle)
        holders = {"owner": f, "opener": g, "fd": handle}
        for i, name in enumerate(order):
            holders.pop(name).close()
            if i < 2:
                settled(unix, int("fd" in holders))
                assert shared_census(unix)["sync_objects"] == 1
                fences = [h for h in holders.values() if not isinstance(h, SharedHandle)]
                if fences:  # it still signals and waits for who holds it
                    fences[0].signal(10 + i)
                    assert fences[0].wait(10 + i, timeout=10) == OK
                else:
                    again = opener_dev.open_fence(holders["fd"])
                    assert again.value >= 10
                    again.close()
        wait_until(lambda: nothing_shared(unix), what="the shared fence gone")


def test_the_charge_follows_who_holds_the_memory(unix):
    with open_node(unix.node_path) as n1, open_node(unix.node_path) as n2:
        a1, a2 = n1.adapters()[0], n2.adapters()[0]
        u1, u2 = a1.video_memory_info().current_usage, a2.video_memory_info().current_usage
        res = a1.create_device().shared_resource(MIB)
        assert a1.video_memory_info().current_usage == u1 + MIB
        handle = res.share()
        other = a2.create_device().open_resource(handle)
        assert a2.video_memory_info().current_usage == u2  # (counted once: the owner's)
        res.close()  # the owner lets go: its holder pays now (its quotas have room)
        assert a1.video_memory_info().current_usage == u1
        assert a2.video_memory_info().current_usage == u2 + MIB
        other.close()  # only the descriptor holds it: its creator pays again, while it lives
        assert a2.video_memory_info().current_usage == u2
        assert a1.video_memory_info().current_usage == u1 + MIB
        assert unix.host.census()["adapters"][0]["memory"]["local"]["used"] >= MIB
        handle.close()
        wait_until(lambda: nothing_shared(unix), what="the shared resource gone")


def test_memory_only_descriptors_hold_counts_in_the_guests_quota(tmp_path: Path):
    """Nobody's process pays for it, but the guest does: its host quota is not a way around."""
    with make_stack(tmp_path, "gq", adapters=1, guest_memory=3 * MIB) as st, \
            open_node(st.node_path) as node:
        dev = node.adapters()[0].create_device()
        res = dev.shared_resource(2 * MIB)
        handle = res.share()
        res.close()  # only the descriptor holds the 2 MiB now
        assert shared_census(st)["resources"] == 1
        with pytest.raises(DxgError) as e:
            dev.allocate(2 * MIB)
        assert e.value.status == NTSTATUS.STATUS_NO_MEMORY
        handle.close()
        wait_until(lambda: nothing_shared(st), what="the shared resource gone")
        dev.allocate(2 * MIB)  # its bytes are back in the guest's quota


KILLED_OWNER = r"""
import json, os, socket, sys
from dxg.client import open_node
node = open_node(sys.argv[1])
dev = node.adapters()[0].create_device()
res = dev.shared_resource(8192)
res.allocations[0].upload(b"last words")
f = dev.shared_fence(7)
sock = socket.socket(fileno=int(sys.argv[2]))
h1, h2 = res.share(), f.share()
socket.send_fds(sock, [b"x"], [h1.fileno(), h2.fileno()])
sf = f.sync_file(8)
print(json.dumps({"pid": os.getpid()}), flush=True)
sys.stdin.readline()
"""

KILLED_OPENER = r"""
import json, os, sys
from dxg.client import open_node
node = open_node(sys.argv[1])
dev = node.adapters()[0].create_device()
res = dev.open_resource(int(sys.argv[2]))
g = dev.open_fence(int(sys.argv[3]))
sf = g.sync_file(100)
g.share()
with res.allocations[0].map():
    print(json.dumps({"pid": os.getpid(), "data": res.allocations[0].download(10).hex()}),
          flush=True)
    sys.stdin.readline()
"""


def test_sigkill_of_the_owner_or_an_opener_leaves_nothing(unix):
    ours, theirs = socket.socketpair()
    owner = child(KILLED_OWNER, unix.node_path, theirs.fileno(), pass_fds=(theirs.fileno(),))
    theirs.close()
    try:
        read_json_line(owner)
        _, fds, _, _ = socket.recv_fds(ours, 16, 4)
        res_fd, fence_fd = fds
        owner.kill()
        owner.wait(10)
        # the objects outlive their owner while the descriptors we hold name them
        wait_until(lambda: unix.host_totals()["processes"] == 0, what="the owner gone")
        c = shared_census(unix)
        assert c["resources"] == 1 and c["sync_objects"] == 1
        opener = child(KILLED_OPENER, unix.node_path, res_fd, fence_fd,
                       pass_fds=(res_fd, fence_fd))
        got = read_json_line(opener)
        assert bytes.fromhex(got["data"]) == b"last words"
        wait_until(lambda: shared_census(unix)["opened_sync_objects"] == 1)
        opener.kill()
        opener.wait(10)
        wait_until(lambda: unix.host_totals()["processes"] == 0, what="the opener gone")
        assert shared_census(unix)["opened_sync_objects"] == 0
        assert shared_census(unix)["resources"] == 1  # (our descriptors still hold them)
        os.close(res_fd)
        os.close(fence_fd)
        wait_until(lambda: nothing_shared(unix), 10, "nothing shared left")
        totals = unix.host_totals()
        assert totals["devices"] == 0 and totals["processes"] == 0
        assert unix.host.census()["adapters"][0]["memory"]["local"]["used"] == 0
        assert unix.driver.snapshot()["processes"] == []
    finally:
        for p in (owner,):
            if p.poll() is None:
                p.kill()
        ours.close()


def test_a_killed_process_holding_only_descriptors_leaves_nothing(unix):
    code = r"""
import json, sys
print(json.dumps({"holding": True}), flush=True)
sys.stdin.readline()
"""
    with open_node(unix.node_path) as node:
        dev = node.adapters()[0].create_device()
        res = dev.shared_resource(PAGE_SIZE)
        f = dev.shared_fence()
        h1, h2, sf = res.share(), f.share(), f.sync_file(3)
        holder = child(code, pass_fds=(h1.fileno(), h2.fileno(), sf.fileno()))
        read_json_line(holder)
        for h in (h1, h2, sf):
            h.close()
        res.close()
        f.close()
        assert shared_census(unix)["resources"] == 1  # the holder's copies keep them
        holder.kill()
        holder.wait(10)
        wait_until(lambda: nothing_shared(unix), 10, "nothing shared left")


# ---- hostile descriptors and arguments -----------------------------------------------------------


def _open_resource_status(conn, device: int, nt_handle: int) -> int:
    args = s.d3dkmt_queryresourceinfofromnthandle()
    args.device.v = device
    args.nt_handle = nt_handle
    return t.D3DKMTQueryResourceInfoFromNtHandle(conn, args)


def _open_fence_status(conn, device: int, nt_handle: int) -> int:
    args = s.d3dkmt_opensyncobjectfromnthandle2()
    args.device.v = device
    args.nt_handle = nt_handle
    return t.D3DKMTOpenSyncObjectFromNtHandle2(conn, args)


def _wait_sync_file_status(conn, context: int, fd: int) -> int:
    args = s.d3dkmt_waitsyncfile()
    args.context.v = context
    args.sync_file_handle = fd
    return t.D3DKMTWaitSyncFile(conn, args)


def test_hostile_descriptors_get_the_right_errors(stack):
    with open_node(stack.node_path) as node:
        ad, other_ad = node.adapters()[:2]
        dev = ad.create_device()
        conn = node.conn
        ctx = dev.create_context()
        res = dev.shared_resource(PAGE_SIZE)
        f = dev.shared_fence()
        rh, fh, sf = res.share(), f.share(), f.sync_file(1)
        efd = os.eventfd(0)
        r, w = os.pipe()
        null = os.open(os.devnull, os.O_RDONLY)
        closed = res.share()
        closed_fd = closed.fileno()
        closed.close()
        try:
            for fd, status in ((987654, BAD_HANDLE),  # not open here
                               (closed_fd, BAD_HANDLE),  # a share descriptor closed
                               (1 << 40, BAD_HANDLE),  # no descriptor number at all
                               (efd, INVALID), (r, INVALID), (w, INVALID), (null, INVALID),
                               (fh.fileno(), INVALID),  # a fence's, where a resource's is due
                               (sf.fileno(), INVALID)):  # a sync file
                assert _open_resource_status(conn, dev.handle, fd) == status, fd
            for fd, status in ((987654, BAD_HANDLE), (efd, INVALID),
                               (rh.fileno(), INVALID), (sf.fileno(), INVALID)):
                assert _open_fence_status(conn, dev.handle, fd) == status, fd
            for fd, status in ((987654, BAD_HANDLE), (efd, INVALID), (rh.fileno(), INVALID),
                               (fh.fileno(), INVALID)):
                assert _wait_sync_file_status(conn, ctx.handle, fd) == status, fd
            # the call names a descriptor but does not hand it over (a raw ioctl): EBADF
            args = s.d3dkmt_queryresourceinfofromnthandle()
            args.device.v = dev.handle
            args.nt_handle = rh.fileno()
            assert conn.ioctl(t.D3DKMTQueryResourceInfoFromNtHandle.code, args) == -errno.EBADF
            # a good descriptor, a bad device; another adapter
            assert _open_resource_status(conn, 0x40000FC0, rh.fileno()) == BAD_HANDLE
            with pytest.raises(DxgError) as e:
                other_ad.create_device().open_resource(rh)
            assert e.value.status == INVALID
            # OpenResourceFromNtHandle with buffers smaller than the query said, or a count
            query = s.d3dkmt_queryresourceinfofromnthandle()
            query.device.v = dev.handle
            query.nt_handle = rh.fileno()
            assert t.D3DKMTQueryResourceInfoFromNtHandle(conn, query) == OK
            assert (query.allocation_count, query.total_priv_drv_data_size) == (1, 16)
            infos = (s.d3dddi_openallocationinfo2 * 2)()
            total = (ctypes.c_ubyte * 64)()
            for count, size in ((1, 8), (2, 16), (0, 16)):
                args2 = s.d3dkmt_openresourcefromnthandle()
                args2.device.v = dev.handle
                args2.nt_handle = rh.fileno()
                args2.allocation_count = count
                args2.open_alloc_info = ctypes.addressof(infos)
                args2.total_priv_drv_data_size = size
                args2.total_priv_drv_data = ctypes.addressof(total)
                assert t.D3DKMTOpenResourceFromNtHandle(conn, args2) == INVALID, (count, size)
        finally:
            for fd in (efd, r, w, null):
                os.close(fd)
            for h in (rh, fh, sf):
                h.close()
        res.close()
        f.close()
    wait_until(lambda: nothing_shared(stack), what="nothing shared left")
    assert stack.host_totals()["devices"] == 0


def _share_status(conn, handles: list[int], access: int = 0, out: bool = True) -> int:
    arr = (ctypes.c_uint32 * max(1, len(handles)))(*handles)
    fd = ctypes.c_uint64(0)
    args = s.d3dkmt_shareobjects()
    args.object_count = len(handles)
    args.objects = ctypes.addressof(arr)
    args.desired_access = access
    args.shared_handle = ctypes.addressof(fd) if out else 0
    status = t.D3DKMTShareObjects(conn, args)
    if status == OK:
        os.close(fd.value)
    return status


def test_share_objects_checks_what_it_is_given(stack):
    with open_node(stack.node_path) as node:
        dev = node.adapters()[0].create_device()
        conn = node.conn
        res = dev.shared_resource(PAGE_SIZE)
        f = dev.shared_fence()
        plain, plain_fence = dev.allocate(PAGE_SIZE), dev.fence()
        assert _share_status(conn, [res.handle]) == OK
        assert _share_status(conn, [f.handle], GENERIC_READ) == OK
        assert _share_status(conn, [res.handle, f.handle]) == INVALID  # one object only
        assert _share_status(conn, []) == INVALID
        assert _share_status(conn, [res.handle], out=False) == INVALID
        assert _share_status(conn, [plain_fence.handle]) == INVALID  # not made shared
        assert _share_status(conn, [res.allocations[0].handle]) == BAD_HANDLE  # an allocation
        assert _share_status(conn, [plain.handle]) == BAD_HANDLE
        assert _share_status(conn, [0x40000FC0]) == BAD_HANDLE
        # made shared the wrong way: the real driver's NT-handle sharing only
        args = s.d3dkmt_createsynchronizationobject2()
        args.device.v = dev.handle
        args.info.type = 5
        args.info.flags.nt_security_sharing = 1
        assert t.D3DKMTCreateSynchronizationObject2(conn, args) == INVALID
        args.info.flags.shared = 1
        args.info.type = 1  # a mutex: only monitored fences are shared
        assert t.D3DKMTCreateSynchronizationObject2(conn, args) == NTSTATUS.STATUS_NOT_SUPPORTED
        # ShareObjectWithHost: pydxg's host is no Windows host
        swh = s.d3dkmt_shareobjectwithhost()
        swh.device_handle.v = dev.handle
        swh.object_handle.v = res.handle
        assert t.D3DKMTShareObjectWithHost(conn, swh) == NTSTATUS.STATUS_NOT_SUPPORTED
        swh.object_handle.v = 0x40000FC0
        assert t.D3DKMTShareObjectWithHost(conn, swh) == BAD_HANDLE
        res.close()
        f.close()
    wait_until(lambda: nothing_shared(stack), what="nothing shared left")


# ---- sync files ----------------------------------------------------------------------------------

POLLER = r"""
import json, select, sys
fd = int(sys.argv[1])
print(json.dumps({"ready": bool(select.select([fd], [], [], 0)[0])}), flush=True)
ready = bool(select.select([fd], [], [], 30)[0])
print(json.dumps({"ready": ready}), flush=True)
"""


def test_a_sync_file_becomes_readable_when_its_fence_reaches_the_value(stack):
    with open_node(stack.node_path) as node:
        dev = node.adapters()[0].create_device()
        for fence in (dev.fence(), dev.shared_fence()):  # shared or not, it polls
            sf = fence.sync_file(5)
            assert isinstance(sf, SyncFile) and sf.value == 5 and not sf.ready()
            poller = child(POLLER, sf.fileno(), pass_fds=(sf.fileno(),))
            try:
                assert read_json_line(poller) == {"ready": False}
                fence.signal(4)
                assert not sf.wait(0.05)
                fence.signal(6)
                assert read_json_line(poller) == {"ready": True}  # in the other process too
            finally:
                finish(poller)
            assert select.select([sf], [], [], 10)[0] == [sf]
            # it says the value was reached; readable for good: a holder that reads every
            # byte out takes nothing away (the node fills it again)
            assert sf.status() == SyncFile.SIGNALED
            assert set(os.read(sf.fileno(), 1 << 16)) == {1}
            assert sf.wait(10) and sf.status() == SyncFile.SIGNALED
            reached = fence.sync_file(3)  # a value reached already: readable at once
            assert reached.wait(10)
            for f_ in (sf, reached):
                f_.close()
            fence.close()
    wait_until(lambda: nothing_shared(stack), what="sync files gone")


def test_a_sync_file_ends_readable_when_its_fence_goes(unix):
    with open_node(unix.node_path) as node:
        dev = node.adapters()[0].create_device()
        f = dev.fence()
        sf = f.sync_file(100)
        f.close()  # the wait fails: pollers wake (as a sync_file signalled with an error)
        assert sf.wait(10)
        sf.close()
    wait_until(lambda: nothing_shared(unix), what="sync files gone")


def test_wait_sync_file_holds_the_contexts_later_work(stack):
    with open_node(stack.node_path) as node:
        ad = node.adapters()[0]
        d1, d2 = ad.create_device(), ad.create_device()
        f = d1.shared_fence()
        sf = f.sync_file(5)
        ctx = d2.create_context()
        g = d2.fence()
        ctx.wait_sync_file(sf)
        signal_from_gpu(ctx, [(g, 1)])  # queued behind the wait
        assert g.wait(1, timeout=0.2) == NTSTATUS.STATUS_TIMEOUT
        f.signal(5)
        assert g.wait(1, timeout=10) == OK
        # a sync file already signalled: nothing to wait for
        ctx.wait_sync_file(sf)
        signal_from_gpu(ctx, [(g, 2)])
        assert g.wait(2, timeout=10) == OK
        # the temporary handles of the waits are gone, the sync file holds the fence
        assert shared_census(stack)["opened_sync_objects"] == 0
        sf.close()
        f.close()
    wait_until(lambda: nothing_shared(stack), what="nothing shared left")


def test_open_sync_object_from_sync_file(stack):
    with open_node(stack.node_path) as node:
        ad = node.adapters()[0]
        d1, d2 = ad.create_device(), ad.create_device()
        f = d1.shared_fence(2)
        sf = f.sync_file(9)
        g, value = d2.open_sync_file(sf)
        assert value == 9 and g.value == 2 and g.read_only
        with pytest.raises(DxgError) as e:
            g.signal(9)  # opened no_signal, as the real driver opens it
        assert e.value.status == ACCESS_DENIED
        f.signal(9)
        assert g.wait(9, timeout=10) == OK and sf.wait(10)
        f.close()
        g.close()
        # the fence lives while the sync file does
        g2, _ = d2.open_sync_file(sf)
        assert g2.value == 9
        sf.close()
        g2.close()
    wait_until(lambda: nothing_shared(stack), what="nothing shared left")


def test_the_real_drivers_silent_successes_are_errors_here(stack):
    """WaitSyncFile and OpenSyncObjectFromSyncFile of a fence that is not shared: the real
    driver returns 0 and does nothing; pydxg answers STATUS_INVALID_PARAMETER."""
    with open_node(stack.node_path) as node:
        dev = node.adapters()[0].create_device()
        ctx = dev.create_context()
        f = dev.fence()
        sf = f.sync_file(3)
        with pytest.raises(DxgError) as e:
            dev.open_sync_file(sf)
        assert e.value.status == INVALID
        with pytest.raises(DxgError) as e:
            ctx.wait_sync_file(sf)
        assert e.value.status == INVALID
        # and CreateSyncFile checks its fence
        args = s.d3dkmt_createsyncfile()
        args.device.v = dev.handle
        args.monitored_fence.v = 0x40000FC0
        assert t.D3DKMTCreateSyncFile(node.conn, args) == BAD_HANDLE
        legacy = dev.sync_object(3)  # a legacy FENCE: no monitored value to wait for
        args.monitored_fence.v = legacy.handle
        assert t.D3DKMTCreateSyncFile(node.conn, args) == INVALID
        sf.close()
        f.close()
    wait_until(lambda: nothing_shared(stack), what="nothing shared left")


# ---- other links and flavors ---------------------------------------------------------------------


def test_sharing_over_tcp_copies(tmp_path: Path):
    """No descriptor crosses TCP: openers' Lock2s copy, a read-only opener's copy never goes
    back, and an opened fence's value is mirrored into the opener's own page."""
    with tcp_stack(tmp_path) as st, open_node(st.node_path) as node:
        ad = node.adapters()[0]
        d1, d2 = ad.create_device(), ad.create_device()
        res = d1.shared_resource(PAGE_SIZE)
        res.allocations[0].upload(b"over tcp")
        rw = d2.open_resource(res.share())
        assert rw.allocations[0].download(8) == b"over tcp"
        rw.allocations[0].upload(b"OVER")
        assert res.allocations[0].download(8) == b"OVER tcp"
        ro = d2.open_resource(res.share(read_only=True))
        with ro.allocations[0].map() as view:
            assert not view.flags.writeable
        with pytest.raises(DxgError):
            ro.allocations[0].upload(b"x")
        assert res.allocations[0].download(8) == b"OVER tcp"
        f = d1.shared_fence(3)
        g = d2.open_fence(f.share())
        assert g.value == 3
        f.signal(7)
        wait_until(lambda: g.value == 7, what="the opener's page shows the new value")
        g.signal(9)
        assert f.value == 9
        sf = f.sync_file(10)
        f.signal(10)
        assert sf.wait(10)
        sf.close()
        for obj in (res, rw, ro, f, g):
            obj.close()
        wait_until(lambda: nothing_shared(st), what="nothing shared left")


def test_the_asyncio_flavor(unix):
    async def main() -> None:
        async with await open_node_async(unix.node_path) as node:
            ad = (await node.adapters())[0]
            d1, d2 = await ad.create_device(), await ad.create_device()
            res = await d1.shared_resource([PAGE_SIZE])
            await res.allocations[0].upload(b"async")
            handle = await res.share()
            other = await d2.open_resource(handle)
            assert await other.allocations[0].download(5) == b"async"
            f = await d1.shared_fence()
            g = await d2.open_fence(await f.share())
            sf = await g.sync_file(4)
            loop = asyncio.get_running_loop()
            ready = loop.create_future()

            def readable() -> None:
                if not ready.done():
                    ready.set_result(True)

            loop.add_reader(sf.fileno(), readable)
            await f.signal(4)
            assert await asyncio.wait_for(ready, 10)
            loop.remove_reader(sf.fileno())
            sf.close()
            handle.close()
            await res.close()
    asyncio.run(main())
    wait_until(lambda: nothing_shared(unix), what="nothing shared left")


# ---- the host enforces access even for a guest that asks otherwise -------------------------------


def test_the_host_enforces_read_only_views(tmp_path: Path):
    host, g = make_host(str(tmp_path))
    try:
        owner = new_dev(g, host, pid=1)
        opener = new_dev(g, host, pid=2)
        made = owner.create(AllocDesc(PAGE_SIZE).pack(), flags=SHARED_RESOURCE_FLAGS)
        assert made.status == OK and made.resource
        (alloc,) = made.allocations
        assert alloc.block >= 1 << 62  # a block of its own, never an arena's
        reply = m.CreateNtSharedObjectReturn.unpack(g.g(
            GlobalCommand.CREATENTSHAREDOBJECT, owner.hp,
            m.CreateNtSharedObject(made.resource).pack()))
        assert reply.status == OK and reply.kind == m.SHARED_RESOURCE
        assert (reply.allocation_count, reply.total_priv_drv_data_size) == (1, 16)
        opened = m.OpenResourceReturn.unpack(opener.send(VgpuCommand.OPENRESOURCE, m.OpenResource(
            opener.dev, reply.handle, m.OPEN_READ_ONLY, 1).pack())[0])
        assert opened.status == OK
        (view,) = opened.allocations
        assert view.block == alloc.block
        lock, fds = opener.lock(view.handle, m.LOCK2_FD)
        assert lock.status == OK and len(fds) == 1
        import fcntl
        assert fcntl.fcntl(fds[0], fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        os.close(fds[0])
        assert opener.write(view.handle, 0, b"sneaky") == ACCESS_DENIED  # an Unlock2 write-back
        assert owner.write(alloc.handle, 0, b"owner") == OK
        assert opener.read(view.handle, 0, 5) == b"owner"
        queue, _, qfds = opener.paging_queue()
        for fd in qfds:
            os.close(fd)
        status, va, _ = opener.map_va(queue.paging_queue.v, view.handle, 1, write=True)
        assert status == OK
        with pytest.raises(Exception, match="read-only"):
            opener.translate(va, 4, write=True)
        assert opener.translate(va, 4) == [(view.handle, 0, 4)]
        # shared memory is never offered; a shared resource takes no more allocations
        assert opener.offer(view.handle) == INVALID
        assert owner.create(AllocDesc(PAGE_SIZE).pack(), resource=made.resource).status == INVALID
        # references: one given back is fine, one too many is refused
        destroy = m.DestroyNtSharedObject(reply.handle).pack()
        assert m.NtStatusReturn.unpack(
            g.g(GlobalCommand.DESTROYNTSHAREDOBJECT, 0, destroy)).status == OK
        assert m.NtStatusReturn.unpack(
            g.g(GlobalCommand.DESTROYNTSHAREDOBJECT, 0, destroy)).status == BAD_HANDLE
        assert owner.destroy(resource=made.resource) == OK
        assert opener.destroy(resource=opened.resource) == OK
        (part,) = host.census()["partitions"]
        assert not any(part["shared"].values())
    finally:
        g.close()
        host.close()


# ---- through the FUSE file -----------------------------------------------------------------------


def _file_ioctl(fd: int, code: int, args: ctypes.Structure) -> int:
    """An ioctl on the device file: 0 or -errno; ``args`` updated in place."""
    import fcntl

    buf = bytearray(bytes(args))
    try:
        ret = fcntl.ioctl(fd, code, buf, True)
    except OSError as e:
        return -e.errno
    ctypes.memmove(ctypes.addressof(args), bytes(buf), len(buf))
    return ret


def test_through_the_fuse_file(unix, tmp_path: Path):
    """The file cannot hand its caller a new descriptor: ShareObjects and CreateSyncFile answer
    -EOPNOTSUPP (and leave nothing). A descriptor shared through the socket node opens through
    the file."""
    from test_fuse import mounted

    io = t
    with mounted(unix.driver, tmp_path / "dxg") as fnode, open_node(unix.node_path) as node:
        sdev = node.adapters()[0].create_device()
        fd = os.open(fnode.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            opened = s.d3dkmt_openadapterfromluid()
            opened.adapter_luid.a, opened.adapter_luid.b = node.adapters()[0].luid_parts
            assert _file_ioctl(fd, io.D3DKMTOpenAdapterFromLuid.code, opened) == 0
            cd = s.d3dkmt_createdevice()
            cd.adapter.v = opened.adapter_handle.v
            assert _file_ioctl(fd, io.D3DKMTCreateDevice.code, cd) == 0
            desc = (ctypes.c_ubyte * 16).from_buffer_copy(AllocDesc(PAGE_SIZE).pack())
            infos = (s.d3dddi_allocationinfo2 * 1)()
            infos[0].priv_drv_data = ctypes.addressof(desc)
            infos[0].priv_drv_data_size = 16
            ca = s.d3dkmt_createallocation()
            ca.device.v = cd.device.v
            ca.alloc_count = 1
            ca.allocation_info = ctypes.addressof(infos)
            ca.flags.value = SHARED_RESOURCE_FLAGS
            assert _file_ioctl(fd, io.D3DKMTCreateAllocation.code, ca) == 0
            handle = (ctypes.c_uint32 * 1)(ca.resource.v)
            out = ctypes.c_uint64(0)
            so = s.d3dkmt_shareobjects()
            so.object_count = 1
            so.objects = ctypes.addressof(handle)
            so.shared_handle = ctypes.addressof(out)
            assert _file_ioctl(fd, io.D3DKMTShareObjects.code, so) == -errno.EOPNOTSUPP
            fence = s.d3dkmt_createsynchronizationobject2()
            fence.device.v = cd.device.v
            fence.info.type = 5
            assert _file_ioctl(fd, io.D3DKMTCreateSynchronizationObject2.code, fence) == 0
            sf = s.d3dkmt_createsyncfile()
            sf.device.v = cd.device.v
            sf.monitored_fence.v = fence.sync_object.v
            sf.fence_value = 1
            assert _file_ioctl(fd, io.D3DKMTCreateSyncFile.code, sf) == -errno.EOPNOTSUPP
            assert guest_shares(unix) == {"share_fds": 0, "sync_files": 0}
            # shared through the socket node, opened through the file
            res = sdev.shared_resource(PAGE_SIZE)
            f = sdev.shared_fence(4)
            with res.share() as rh, f.share() as fh:
                q = s.d3dkmt_queryresourceinfofromnthandle()
                q.device.v = cd.device.v
                q.nt_handle = rh.fileno()
                assert _file_ioctl(fd, io.D3DKMTQueryResourceInfoFromNtHandle.code, q) == 0
                assert q.allocation_count == 1
                op = s.d3dkmt_opensyncobjectfromnthandle2()
                op.nt_handle = fh.fileno()
                op.device.v = cd.device.v
                assert _file_ioctl(fd, io.D3DKMTOpenSyncObjectFromNtHandle2.code, op) == 0
                assert op.sync_object.v and op.monitored_fence.fence_value_cpu_va == 0
            res.close()
            f.close()
        finally:
            os.close(fd)
        sdev.close()
    wait_until(lambda: nothing_shared(unix), what="nothing shared left")


# ---- descriptors the daemon must not block on ----------------------------------------------------


def _abort_fuse(st_dev: int) -> None:
    """Abort a FUSE connection: whatever waits on its server gets ENOTCONN (so that a daemon
    blocked on it comes back and the test can fail instead of hanging)."""
    try:
        Path(f"/sys/fs/fuse/connections/{os.minor(st_dev)}/abort").write_text("1")
    except OSError:
        pass


def test_a_file_on_a_fuse_mount_handed_in_is_refused_at_once(unix, tmp_path: Path, monkeypatch):
    """The node's own /dev/dxg (a FUSE file served by the daemon's loop) handed in where a share
    descriptor or sync file is due: -EINVAL at once. Asking the file's filesystem anything
    (fstat: GETATTR; close: FLUSH) from the loop would wait for the loop itself, for ever."""
    import dxg.node.fuse as fuse_node
    from test_fuse import mounted

    # The kernel asks the server for the attributes on every stat (as once the cached ones
    # expired, after a minute).
    monkeypatch.setattr(fuse_node, "ATTR_VALID_S", 0.0)
    with mounted(unix.driver, tmp_path / "dxg") as fnode, open_node(unix.node_path) as node:
        dev = node.adapters()[0].create_device()
        ctx = dev.create_context()
        ffd = os.open(fnode.path, os.O_RDONLY | os.O_CLOEXEC)  # ioctls through the file
        bait = os.open(fnode.path, os.O_RDONLY | os.O_CLOEXEC)  # the "descriptor" handed in
        mount_dev = os.fstat(bait).st_dev
        got: dict[str, int] = {}

        def calls() -> None:
            got["query"] = _open_resource_status(node.conn, dev.handle, bait)
            got["fence"] = _open_fence_status(node.conn, dev.handle, bait)
            got["wait"] = _wait_sync_file_status(node.conn, ctx.handle, bait)
            # the same through the file (the driver takes the caller's descriptor itself)
            opened = s.d3dkmt_openadapterfromluid()
            opened.adapter_luid.a, opened.adapter_luid.b = node.adapters()[0].luid_parts
            assert _file_ioctl(ffd, t.D3DKMTOpenAdapterFromLuid.code, opened) == 0
            cd = s.d3dkmt_createdevice()
            cd.adapter.v = opened.adapter_handle.v
            assert _file_ioctl(ffd, t.D3DKMTCreateDevice.code, cd) == 0
            q = s.d3dkmt_queryresourceinfofromnthandle()
            q.device.v = cd.device.v
            q.nt_handle = bait
            got["file"] = _file_ioctl(ffd, t.D3DKMTQueryResourceInfoFromNtHandle.code, q)

        try:
            worker_ = threading.Thread(target=calls, daemon=True)
            worker_.start()
            worker_.join(20)
            hung = worker_.is_alive()
            if hung:
                _abort_fuse(mount_dev)
                worker_.join(10)
            assert not hung, "the daemon blocked on a FUSE file handed in"
            assert got == {"query": INVALID, "fence": INVALID, "wait": INVALID,
                           "file": -errno.EINVAL}
            # the loop still serves, through both front ends
            assert dev.create_context().handle
            assert os.fstat(bait).st_dev == mount_dev
        finally:
            os.close(bait)
            os.close(ffd)
        dev.close()
    wait_until(lambda: nothing_shared(unix), what="nothing shared left")


# ---- fence pages: only the host writes them ------------------------------------------------------


def _mprotect_errno(address: int) -> int:
    """The errno of making the page at ``address`` writable (0: it could be made writable)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    page = address & ~(mmap.PAGESIZE - 1)
    if libc.mprotect(page, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_WRITE) == 0:
        libc.mprotect(page, mmap.PAGESIZE, mmap.PROT_READ)
        return 0
    return ctypes.get_errno()


def test_no_client_can_write_a_fence_page(stack):
    """A fence's value is read without a call by every holder: a client that could make its
    mapping writable could forge it (a read-only opener, even the creator of a shared fence
    whose openers trust it). Every fence page reaches a client as a read-only descriptor."""
    with open_node(stack.node_path) as n1, open_node(stack.node_path) as n2:
        d1, d2 = n1.adapters()[0].create_device(), n2.adapters()[0].create_device()
        plain, shared = d1.fence(), d1.shared_fence(1)
        with shared.share(read_only=True) as ro_h, shared.share() as rw_h:
            ro, rw = d2.open_fence(ro_h), d2.open_fence(rw_h)
        queue = d1.create_context().hwqueue()
        paging = d1.paging_queue()
        pages = {"a fence": plain.address, "the creator's shared fence": shared.address,
                 "a read-only opener's": ro.address, "a writable opener's": rw.address,
                 "a queue's progress fence": queue.fence_address,
                 "a paging queue's fence": paging.fence_address}
        for name, address in pages.items():
            assert address, name
            assert _mprotect_errno(address) == errno.EACCES, name
        # signals still move the value every holder reads
        rw.signal(7)
        assert shared.value == ro.value == 7 and shared.wait(7, timeout=10) == OK
        for f in (ro, rw, shared, plain):
            f.close()
    wait_until(lambda: nothing_shared(stack), what="nothing shared left")


def test_a_fence_page_mirrored_over_tcp_is_read_only_too(tmp_path: Path):
    with tcp_stack(tmp_path) as st, open_node(st.node_path) as node:
        dev = node.adapters()[0].create_device()
        f = dev.fence(3)
        assert f.address and f.value == 3
        assert _mprotect_errno(f.address) == errno.EACCES
        f.close()


def test_fence_blocks_cannot_be_reopened_for_writing():
    """The block a fence page is in has mode 0444 and is handed out O_RDONLY: a client that is
    not root cannot reopen it for writing through /proc either."""
    from dxg.host.config import HostConfig
    from dxg.host.memory import ProcessMemory

    memory = ProcessMemory()
    fb, _ = memory.fence_slot(HostConfig(adapters=1), 0)
    try:
        assert os.fstat(fb.block.fd).st_mode & 0o777 == 0o444
        fd = readonly_fd(fb.block)
        try:
            with pytest.raises(PermissionError):
                mmap.mmap(fd, PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
    finally:
        memory.drop()


# ---- who pays for shared memory ------------------------------------------------------------------


def test_sharing_is_no_way_around_a_process_or_user_quota(tmp_path: Path):
    """Memory only descriptors hold stays its creator's: its process's while it lives, its
    user's after. Shared, shared again and let go, it is never nobody's."""
    from dxg.guest.policy import parse_policy

    policy = parse_policy('[[rules]]\nuids = [0]\nmemory_per_process = "2M"\n'
                          'memory_per_uid = "4M"\n')
    no_memory = NTSTATUS.STATUS_NO_MEMORY
    with make_stack(tmp_path, "sq", adapters=1, driver_kw={"policy": policy}) as st:
        n1 = open_node(st.node_path)
        ad1 = n1.adapters()[0]
        d1 = ad1.create_device()
        res = d1.shared_resource(2 * MIB)
        handle = res.share()
        res.close()  # only the descriptor holds it now
        assert ad1.video_memory_info().current_usage == 2 * MIB
        for make in (lambda: d1.shared_resource(2 * MIB), lambda: d1.allocate(PAGE_SIZE)):
            with pytest.raises(DxgError) as e:  # its own quota is full
                make()
            assert e.value.status == no_memory
        with open_node(st.node_path) as n2:  # another process of the user: 2 MiB left
            d2 = n2.adapters()[0].create_device()
            kept = d2.allocate(2 * MIB)
            with pytest.raises(DxgError) as e:
                d2.allocate(PAGE_SIZE)
            assert e.value.status == no_memory
            n1.close()  # the creator exits: the bytes stay its user's
            wait_until(lambda: st.host_totals()["processes"] == 1, what="the creator gone")
            assert shared_census(st)["account_bytes"] == 2 * MIB
            with open_node(st.node_path) as n3:
                ad3 = n3.adapters()[0]
                d3 = ad3.create_device()
                info = ad3.video_memory_info()
                assert (info.current_usage, info.budget) == (0, 0)  # its user has nothing left
                with pytest.raises(DxgError) as e:
                    d3.allocate(PAGE_SIZE)
                assert e.value.status == no_memory
                handle.close()
                wait_until(lambda: nothing_shared(st), what="the shared resource gone")
                kept.close()
                d3.allocate(2 * MIB)  # its bytes are back in the user's quota


VICTIM = r"""
import json, os, sys
from dxg.client import DxgError, open_node
os.setgroups([])
os.setgid(41001)
os.setuid(41001)
node = open_node(sys.argv[1])
ad = node.adapters()[0]
dev = ad.create_device()
big, small = dev.open_resource(int(sys.argv[2])), dev.open_resource(int(sys.argv[3]))
print(json.dumps({"opened": True}), flush=True)
for _ in range(2):
    sys.stdin.readline()
    v = ad.video_memory_info()
    out = {"usage": v.current_usage, "budget": v.budget}
    try:
        dev.allocate(4096).close()
        out["alloc"] = "ok"
    except DxgError as e:
        out["alloc"] = int(e.status)
    print(json.dumps(out), flush=True)
sys.stdin.readline()
"""


def test_a_share_cannot_push_memory_onto_another_users_quota(public_dir: Path):
    """Root shares 16 MiB with a user whose quota is 2 MiB, and lets go: the memory stays
    root's (its process's, then its account's when it exits); the user pays only for what its
    quotas have room for (here a 1 MiB resource it holds too), and keeps allocating."""
    from dxg.guest.policy import load_policy

    policy = load_policy(None, memory_per_process=2 * MIB, memory_per_uid=2 * MIB)
    with make_stack(public_dir, "rh", adapters=1, driver_kw={"policy": policy}) as st:
        node = open_node(st.node_path)
        dev = node.adapters()[0].create_device()  # root: no quota
        big, small = dev.shared_resource(16 * MIB), dev.shared_resource(MIB)
        with big.share(read_only=True) as hb, small.share(read_only=True) as hs:
            victim = child(VICTIM, st.node_path, hb.fileno(), hs.fileno(),
                           pass_fds=(hb.fileno(), hs.fileno()))
            try:
                assert read_json_line(victim, 60) == {"opened": True}
            except BaseException:
                finish(victim)
                raise
        try:
            big.close()
            small.close()
            tell(victim)
            assert read_json_line(victim, 30) == {"usage": MIB, "budget": 2 * MIB,
                                                 "alloc": "ok"}
            node.close()  # the creator exits: the 16 MiB are root's account's now
            wait_until(lambda: shared_census(st)["account_bytes"] == 16 * MIB,
                       what="the creator's bytes with its account")
            tell(victim)
            assert read_json_line(victim, 30) == {"usage": MIB, "budget": 2 * MIB,
                                                 "alloc": "ok"}
        finally:
            finish(victim)
        wait_until(lambda: nothing_shared(st), what="nothing shared left")
        assert st.host.census()["adapters"][0]["memory"]["local"]["used"] == 0


# ---- sync files nobody can forge -----------------------------------------------------------------


def test_a_holder_cannot_make_a_sync_file_readable_for_the_others(unix):
    with open_node(unix.node_path) as node:
        dev = node.adapters()[0].create_device()
        for fence in (dev.fence(), dev.shared_fence()):
            sf = fence.sync_file(5)
            others = os.dup(sf.fileno())  # another holder's copy
            mine = os.dup(sf.fileno())
            try:
                copy = os.dup(mine)
                try:  # a socket could be shut down for everyone; a pipe cannot
                    socket.socket(fileno=copy).shutdown(socket.SHUT_RD)
                except OSError as e:
                    assert e.errno == errno.ENOTSOCK
                finally:
                    with contextlib.suppress(OSError):
                        os.close(copy)
                with pytest.raises(OSError):
                    os.write(mine, b"\x01")  # (the read end)
                pid = os.fork()
                if pid == 0:  # nobody but root can reopen the pipe for writing
                    code = 0
                    try:
                        os.setgid(65534)
                        os.setuid(65534)
                        try:
                            os.close(os.open(f"/proc/self/fd/{mine}", os.O_WRONLY | os.O_NONBLOCK))
                            code = 1
                        except PermissionError:
                            pass
                    finally:
                        os._exit(code)
                _, status = os.waitpid(pid, 0)
                assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
                os.close(mine)
                assert not select.select([others], [], [], 0.3)[0] and not sf.ready()
                assert sf.status() == SyncFile.PENDING
                fence.signal(5)
                assert select.select([others], [], [], 10)[0]
                assert sf.status() == SyncFile.SIGNALED
            finally:
                os.close(others)
            sf.close()
            fence.close()
    wait_until(lambda: nothing_shared(unix), what="sync files gone")


def test_a_sync_file_of_a_shared_fence_outlives_the_process_that_made_it(unix):
    """Its wait is held by the sync file's own reference: the maker exiting while the fence
    lives (at 0) makes no copy readable; the fence reaching the value does."""
    with open_node(unix.node_path) as consumer:
        cdev = consumer.adapters()[0].create_device()
        producer = open_node(unix.node_path)
        pdev = producer.adapters()[0].create_device()
        f = pdev.shared_fence(0)
        with f.share() as h:
            g = cdev.open_fence(h)  # the consumer holds the fence too (it may signal it)
        sf = f.sync_file(5)
        fd = sf.detach()  # "passed" to the consumer
        theirs = SyncFile(fd, 5)
        producer.close()
        wait_until(lambda: unix.host_totals()["processes"] == 1, what="the producer gone")
        assert not theirs.wait(0.5) and theirs.status() == SyncFile.PENDING and g.value == 0
        assert shared_census(unix)["waits"] == 1  # held by the sync file
        g.signal(5)
        assert theirs.wait(10) and theirs.status() == SyncFile.SIGNALED
        theirs.close()
        g.close()
    wait_until(lambda: nothing_shared(unix), what="nothing shared left")


def test_a_sync_file_says_whether_its_wait_failed(unix):
    with open_node(unix.node_path) as node:
        dev = node.adapters()[0].create_device()
        f = dev.fence()
        sf = f.sync_file(100)
        reached = f.sync_file(0)
        f.close()  # the wait fails: readable, and it says so
        assert sf.wait(10) and sf.status() == SyncFile.ERROR
        assert reached.wait(10) and reached.status() == SyncFile.SIGNALED
        # the process that made a sync file of a fence that is not shared exits: the fence
        # goes with it, and so does the wait
        other = open_node(unix.node_path)
        of = other.adapters()[0].create_device().fence()
        osf = of.sync_file(1)
        fd = osf.detach()
        other.close()
        gone = SyncFile(fd, 1)
        assert gone.wait(10) and gone.status() == SyncFile.ERROR
        for x in (sf, reached, gone):
            x.close()
    wait_until(lambda: nothing_shared(unix), what="sync files gone")


# ---- a share descriptor used across a call is pinned --------------------------------------------


def test_a_descriptor_closed_during_a_call_keeps_its_object_until_the_call_is_done(
        unix, tmp_path: Path, monkeypatch):
    """Through the FUSE file the driver takes its own copy of the caller's descriptor and
    closes it at once; if the caller's last copy is closed while the call waits for the host,
    the entry must not give its reference back (the object would go, its NT handle with it)
    until the call is done."""
    from dxg.guest import vmbus as guest_vmbus
    from test_fuse import mounted

    gate = threading.Event()
    parked = threading.Event()
    real_send = guest_vmbus.send

    async def held_send(target, command, *args, **kw):
        if command == GlobalCommand.OPENSYNCOBJECT:
            parked.set()
            while not gate.is_set():
                await asyncio.sleep(0.01)
        return await real_send(target, command, *args, **kw)

    with mounted(unix.driver, tmp_path / "dxg") as fnode, open_node(unix.node_path) as node:
        f = node.adapters()[0].create_device().shared_fence(3)
        fh = f.share()
        ffd = os.open(fnode.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            opened = s.d3dkmt_openadapterfromluid()
            opened.adapter_luid.a, opened.adapter_luid.b = node.adapters()[0].luid_parts
            assert _file_ioctl(ffd, t.D3DKMTOpenAdapterFromLuid.code, opened) == 0
            cd = s.d3dkmt_createdevice()
            cd.adapter.v = opened.adapter_handle.v
            assert _file_ioctl(ffd, t.D3DKMTCreateDevice.code, cd) == 0
            op = s.d3dkmt_opensyncobjectfromnthandle2()
            op.nt_handle = fh.fileno()
            op.device.v = cd.device.v
            got: dict[str, int] = {}
            monkeypatch.setattr(guest_vmbus, "send", held_send)
            call = threading.Thread(target=lambda: got.setdefault(
                "ret", _file_ioctl(ffd, t.D3DKMTOpenSyncObjectFromNtHandle2.code, op)))
            call.start()
            assert parked.wait(10)
            fh.close()  # the last copy of the descriptor, and the creator's handle: gone
            f.close()
            wait_until(lambda: guest_shares(unix)["share_fds"] == 0,
                       what="the guest saw the descriptor closed")
            assert shared_census(unix)["sync_objects"] == 1  # (the call still holds it)
            gate.set()
            call.join(20)
            assert got == {"ret": 0} and op.sync_object.v
            monkeypatch.setattr(guest_vmbus, "send", real_send)
            assert shared_census(unix)["opened_sync_objects"] == 1
        finally:
            gate.set()
            os.close(ffd)  # (the file's process goes, and the fence it opened)
    wait_until(lambda: nothing_shared(unix), what="nothing shared left")


# ---- what an opener is told about its access -----------------------------------------------------


def test_opening_by_descriptor_number_tells_the_access_it_got(unix):
    import dxg.compute as dc

    with open_node(unix.node_path) as n1, open_node(unix.node_path) as n2:
        d1 = n1.adapters()[0].create_device()
        res = d1.shared_resource(PAGE_SIZE)
        res.allocations[0].upload(b"\0" * 16)
        f = d1.shared_fence()
        d2 = n2.adapters()[0].create_device()
        with res.share(read_only=True) as rh, f.share(read_only=True) as fh, \
                res.share() as wh:
            ro = d2.open_resource(rh.fileno())  # a number: the node says what it grants
            rw = d2.open_resource(wh.fileno())
            g = d2.open_fence(fh.fileno())
        assert ro.read_only and all(a.read_only for a in ro.allocations)
        assert not rw.read_only and not rw.allocations[0].read_only
        assert g.read_only
        with ro.share() as again, g.share() as gagain:  # onward: never more than it has
            assert again.read_only and gagain.read_only
        with pytest.raises(DxgError) as e:
            g.signal(1)
        assert e.value.status == ACCESS_DENIED
        # dxg.compute over the read-only allocation refuses writes before any work is queued
        with dc.device(0, node=unix.node_path) as cdev:
            with ro.share() as onward:
                cres = cdev.dxg.open_resource(onward.fileno())
            arr = cdev.from_allocation(cres.allocations[0], (4,), np.float32)
            for write in (lambda: arr.__setitem__(0, 1),
                          lambda: arr.__setitem__(slice(None), cdev.asarray(np.ones(4))),
                          lambda: arr.set(np.ones(4, np.float32))):
                with pytest.raises(DxgError) as e:
                    write()
                assert e.value.status == ACCESS_DENIED
            assert arr.get().tolist() == [0.0] * 4
            cdev.synchronize()  # (the device is fine: nothing faulted)
            cres.close()
        for x in (ro, rw, g, res, f):
            x.close()
    wait_until(lambda: nothing_shared(unix), what="nothing shared left")


# ---- priorities of shared memory, its device, the descriptor limit -------------------------------


def test_a_shared_allocations_priority_is_one_for_every_holder(tmp_path: Path):
    from dxg.client import Residency
    from dxg.uapi.memory import PRIORITY_HIGH, PRIORITY_LOW

    with make_stack(tmp_path, "prio", adapters=1, dedicated_memory_mb=8,
                    shared_memory_mb=64) as st, open_node(st.node_path) as node:
        ad = node.adapters()[0]
        d1, d2 = ad.create_device(), ad.create_device()
        res = d1.shared_resource(4 * MIB)
        with res.share() as h:
            other = d2.open_resource(h)
        (mine,), (theirs,) = res.allocations, other.allocations
        theirs.set_priority(PRIORITY_LOW)  # set through one holder's view...
        assert mine.get_priority() == theirs.get_priority() == PRIORITY_LOW  # ...for all
        big = d1.allocate(6 * MIB)  # normal priority: the low shared memory makes way
        assert mine.residency() == Residency.RESIDENT_IN_SHARED_MEMORY
        assert big.residency() == Residency.RESIDENT_IN_GPU_MEMORY
        theirs.set_priority(PRIORITY_HIGH)  # raised: it comes back at once
        assert mine.residency() == Residency.RESIDENT_IN_GPU_MEMORY
        assert mine.get_priority() == PRIORITY_HIGH
        for x in (big, other, res):
            x.close()


def test_shared_memory_never_names_a_destroyed_device(unix):
    """The device placement promotes shared memory for is a live one of the process that
    pays for it."""
    with open_node(unix.node_path) as node:
        ad = node.adapters()[0]
        d1, d2 = ad.create_device(), ad.create_device()
        res = d1.shared_resource(PAGE_SIZE)
        handle = res.share()
        (part,) = unix.host._partitions.values()

        def devices() -> list:
            out = []
            for sr in part.shares.resources.values():
                out += [sa.device for sa in sr.allocations]
            return out

        (first,) = devices()  # the creator's device (its host object)
        d1.close()  # the resource's handle goes with it; the creator still pays (it lives)
        (device,) = devices()
        assert device is not None and device is not first  # d2's, the process's live one
        assert device.process.devices.get(device.handle) is device
        handle.close()
        d2.close()
    wait_until(lambda: nothing_shared(unix), what="nothing shared left")


def test_the_files_the_guest_keeps_are_bounded_by_its_descriptor_limit(monkeypatch):
    import resource

    from dxg.guest import share as guest_share

    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 4096))
    assert guest_share.file_limit() == 256
    loop = asyncio.new_event_loop()
    try:
        shares = guest_share.Shares(loop)
        assert (shares.max_files, shares.max_per_uid) == (256, 256)
    finally:
        loop.close()
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1 << 20, 1 << 20))
    assert guest_share.file_limit() == guest_share.MAX_FILES
