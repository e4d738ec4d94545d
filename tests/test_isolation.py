"""One user can never hurt another: each attack of the security review, reproduced.

Fair shares per process and per user (handles, host objects), fast teardown of a large process,
clients that never read their replies, what one client's calls may hold in the node (memory for
OUT regions, calls in flight, descriptors), a host that stops answering (and what it ran
meanwhile), a host that offers unbounded adapters, and the smaller items (unknown success codes,
a hostile census, a flood of bad notifications). The FUSE items (pinned callers, opens per user,
the device path) are in test_fuse.py; the node directory's ancestors, the per-user bounds of
call bytes and descriptors and the reply pool's shares in test_node_server.py.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid

import pytest

from conftest import make_stack, wait_until
from dxg import uapi
from dxg.client import DxgError, open_node
from dxg.guest.driver import GuestDriver
from dxg.guest.quota import GuestLimits
from dxg.node.server import SocketNode
from dxg.oslib.fds import open_fd_count, send_with_fds
from dxg.protocol.bus import DXGK_VMBUS_INTERFACE_VERSION, Offer
from dxg.protocol.commands import HostToVmCommand
from dxg.protocol.guids import DXGK_GLOBAL_GUID, DXGK_VGPU_GUID, luid_parts
from dxg.runtime.loop import LoopThread
from dxg.uapi import wire
from dxg.uapi.escape import EscapeHeader, Op
from dxg.uapi.ntstatus import NTSTATUS
from dxg.vmbus.bus import HostBusSession
from dxg.vmbus.transport import Listener, SocketTransport

NOBODY = 65534
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="runs clients as another user")


def as_user(uid: int, code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a client process as `uid` (everything it needs imported first)."""
    prelude = ("import os, sys, json, ctypes, errno\n"
               "from dxg.client import open_node, DxgError\n"
               "from dxg.client import thunks\n"
               "from dxg import uapi\n"
               f"os.setgid({uid}); os.setuid({uid})\n")
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True,
                          text=True, timeout=120)


# ---- fair shares ---------------------------------------------------------------------------------

OPEN_UNTIL_FULL = """
node = open_node(sys.argv[1] if len(sys.argv) > 1 else {node!r})
luid = node.adapters()[0].luid
n = 0
try:
    while True:
        node.open_adapter(luid)
        n += 1
except DxgError as e:
    print(json.dumps({{"opened": n, "status": e.status}}), flush=True)
"""

CREATE_UNTIL_FULL = """
node = open_node({node!r})
ad = node.adapters()[0]
n = 0
try:
    while True:
        ad.create_device()
        n += 1
except DxgError as e:
    print(json.dumps({{"devices": n, "status": e.status}}), flush=True)
"""


@needs_root
def test_one_user_cannot_use_up_the_handles_or_host_objects_of_the_others(public_dir):
    import json

    limits = GuestLimits(handles_per_process=200, handles_per_uid=300, objects_per_process=20,
                         objects_per_uid=30)
    with make_stack(public_dir, "q", driver_kw={"limits": limits}) as s:
        # Handles: a process stops at its own share, a second one at what is left of the user's.
        first = subprocess.Popen(
            [sys.executable, "-c", "import os, sys, json\n"
             "from dxg.client import open_node, DxgError\n"
             f"os.setgid({NOBODY}); os.setuid({NOBODY})\n"
             + OPEN_UNTIL_FULL.format(node=s.node_path) + "sys.stdin.read()\n"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            got = json.loads(first.stdout.readline())
            # (node.adapters() holds two handles of its own)
            assert got["opened"] == 200 - 2 and got["status"] == NTSTATUS.STATUS_NO_MEMORY
            r2 = as_user(NOBODY, OPEN_UNTIL_FULL.format(node=s.node_path))
            got2 = json.loads(r2.stdout)
            assert got2["opened"] == 300 - 200 - 2, r2.stderr
            # root (and every other user) still has its share: more than nobody has left
            with open_node(s.node_path) as node:
                ad = node.adapters()[0]
                for _ in range(150):
                    node.open_adapter(ad.luid)
                ad.create_device()
        finally:
            first.stdin.close()
            first.wait(timeout=30)
        # Host objects: the same per process and per user.
        r = as_user(NOBODY, CREATE_UNTIL_FULL.format(node=s.node_path))
        assert json.loads(r.stdout) == {"devices": 20, "status": NTSTATUS.STATUS_NO_MEMORY}, \
            r.stderr
        with open_node(s.node_path) as node:  # more than the 10 nobody's share has left
            ad = node.adapters()[0]
            assert len([ad.create_device() for _ in range(15)]) == 15
        wait_until(lambda: s.host_totals()["processes"] == 0, 10)


def test_the_host_caps_each_process_too(tmp_path):
    """Even a guest that shares nothing out fairly cannot let one process take a host's budget."""
    with make_stack(tmp_path, "hq", max_objects_per_process=10) as s, \
            open_node(s.node_path) as node, open_node(s.node_path) as other:
        ad = node.adapters()[0]
        for _ in range(10):
            ad.create_device()
        with pytest.raises(DxgError) as e:
            ad.create_device()
        assert e.value.status == NTSTATUS.STATUS_NO_MEMORY
        other.adapters()[0].create_device()  # another process keeps its own


def test_a_large_process_is_torn_down_fast(tmp_path):
    with make_stack(tmp_path, "big") as s:
        code = ("import sys\nfrom dxg.client import open_node\n"
                f"node = open_node({s.node_path!r})\nluid = node.adapters()[0].luid\n"
                "for _ in range(20000):\n    node.open_adapter(luid)\n"
                "ad = node.adapters()[0]\n"
                "for _ in range(200):\n    ad.create_device().create_context()\n"
                "print('ready', flush=True)\nsys.stdin.read()\n")
        p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        assert s.host_totals()["contexts"] == 200
        t0 = time.monotonic()
        p.kill()
        p.wait(timeout=30)
        wait_until(lambda: s.driver.processes() == [] and s.host_totals()["processes"] == 0,
                   30, "the large process gone")
        assert time.monotonic() - t0 < 10
        p.stdout.close()
        p.stdin.close()


# ---- clients that never read ---------------------------------------------------------------------


def test_clients_that_never_read_are_bounded_and_dropped(tmp_path):
    with make_stack(tmp_path, "nr", node_kw={"send_timeout": 1.0,
                                           "max_total_buffer": 32 << 20}) as s:
        q = uapi.d3dkmt_queryadapterinfo()
        q.type = 65  # DRIVER_DESCRIPTION: an 8 KiB reply every time
        q.private_data, q.private_data_size = 0x10000, 8192
        region = (wire.Region(0x10000, 8192, wire.REGION_OUT),)
        socks = []
        for _ in range(16):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            c.connect(s.node_path)
            c.sendall(wire.encode(wire.Hello(), 1))
            c.setblocking(False)
            socks.append(c)
        deadline = time.monotonic() + 10
        peak = 0
        while time.monotonic() < deadline and any(x.fileno() >= 0 for x in socks):
            for c in socks:
                if c.fileno() < 0:
                    continue
                try:
                    for seq in range(2, 200):
                        c.send(wire.encode(wire.IoctlRequest(uapi.LX_DXQUERYADAPTERINFO,
                                                             bytes(q), region), seq))
                except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                    pass
            peak = max(peak, s.node.rt.call(lambda: s.node.write_budget.used))
            if not s.node.connections():
                break
        assert peak <= 32 << 20
        wait_until(lambda: s.node.connections() == [], 15, "non-reading clients dropped")
        for c in socks:
            c.close()
        with open_node(s.node_path) as node:  # and everyone else is served
            assert len(node.adapters()) == 2


# ---- what one client's calls may hold -----------------------------------------------------------


class RawClient:
    """A hand-driven wire connection to a real node: what a hostile client sends."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.dec = wire.FrameDecoder()
        self.sock.sendall(wire.encode(wire.Hello(), 1))
        assert isinstance(self.replies(1)[1], wire.HelloReply)

    def replies(self, n: int) -> dict[int, wire.Message]:
        out = {}
        while len(out) < n:
            f = self.dec.next_frame()
            if f is None:
                data = self.sock.recv(1 << 20)
                assert data, "the node hung up"
                self.dec.feed(data)
                continue
            out[f.seq] = wire.decode(f)
        return out

    def open_adapter(self, luid: int) -> int:
        a = uapi.d3dkmt_openadapterfromluid()
        a.adapter_luid.a, a.adapter_luid.b = luid_parts(luid)
        self.sock.sendall(wire.encode(wire.IoctlRequest(uapi.LX_DXOPENADAPTERFROMLUID,
                                                        bytes(a)), 2))
        reply = self.replies(1)[2]
        return uapi.d3dkmt_openadapterfromluid.from_buffer_copy(reply.struct).adapter_handle.v

    def close(self) -> None:
        self.sock.close()


def sleep_escape(adapter: int, seq: int, ms: int = 20_000, extra_out: int = 0,
                 fd_numbers: tuple[int, ...] = ()) -> bytes:
    """A pydxg SLEEP escape (parks the call on the host); ``extra_out`` declares an OUT-only
    region of that many bytes that nobody writes."""
    priv = EscapeHeader(Op.SLEEP).pack() + struct.pack("<I", ms)
    e = uapi.d3dkmt_escape()
    e.adapter.v = adapter
    e.priv_drv_data, e.priv_drv_data_size = 0x10000, len(priv)
    regions = [wire.Region(0x10000, len(priv), wire.REGION_IN | wire.REGION_OUT, priv)]
    if extra_out:
        regions.append(wire.Region(0x1000000, extra_out, wire.REGION_OUT))
    return wire.encode(wire.IoctlRequest(uapi.LX_DXESCAPE, bytes(e), tuple(regions),
                                         fd_numbers), seq)


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def the_conn(s) -> dict:
    (info,) = s.node.connections()
    return info


def test_out_only_regions_cost_the_node_nothing_while_calls_wait(tmp_path):
    """The review's attack: 150 parked calls each declaring one 4 MiB OUT region (19,800 bytes
    sent) grew the daemon by 600 MiB. OUT-only regions now cost what the driver writes."""
    with make_stack(tmp_path, "om", embedded=True) as s:
        raw = RawClient(s.node_path)
        adapter = raw.open_adapter(s.driver.active_adapters()[0].luid)
        before = rss()
        calls = 40
        raw.sock.sendall(b"".join(sleep_escape(adapter, 100 + i, extra_out=wire.MAX_PAYLOAD - 4096)
                                  for i in range(calls)))  # 160 MiB declared
        wait_until(lambda: the_conn(s)["calls"] == calls, 10, "the calls parked")
        grown = rss() - before
        assert grown < 32 << 20, f"the node grew by {grown >> 20} MiB for {calls} parked calls"
        raw.close()


def test_max_calls_holds_within_one_read_and_cancel_gets_through_at_the_cap(tmp_path):
    """The review's attack: one 200 KB send put 1724 calls in flight against max_calls=256, and
    a client at the cap could not cancel any of its calls. Now the cap holds whatever one read
    brings, the rest waits in a bounded queue, and CANCEL is read at the cap."""
    with make_stack(tmp_path, "mc", embedded=True,
                    node_kw={"max_calls": 16, "max_queued": 16}) as s:
        raw = RawClient(s.node_path)
        adapter = raw.open_adapter(s.driver.active_adapters()[0].luid)
        raw.sock.sendall(b"".join(sleep_escape(adapter, 100 + i) for i in range(24)))
        wait_until(lambda: (the_conn(s)["calls"], the_conn(s)["queued"]) == (16, 8), 10,
                   "16 calls running and 8 waiting")
        raw.sock.sendall(wire.encode(wire.Cancel(), 105))  # running: interrupted
        got = raw.replies(1)
        assert isinstance(got[105], wire.IoctlReply) and got[105].ret == -errno.EINTR
        raw.sock.sendall(wire.encode(wire.Cancel(), 123))  # queued: never runs
        got = raw.replies(1)
        assert isinstance(got[123], wire.IoctlReply) and got[123].ret == -errno.EINTR
        wait_until(lambda: (the_conn(s)["calls"], the_conn(s)["queued"]) == (16, 6), 10)
        # a flood past the queue's bound: the node stops reading, the bounds hold
        raw.sock.sendall(b"".join(sleep_escape(adapter, 200 + i) for i in range(300)))
        wait_until(lambda: the_conn(s)["queued"] == 16, 10)
        assert the_conn(s)["calls"] == 16
        raw.close()
        wait_until(lambda: s.node.connections() == [], 10)


def test_descriptors_are_held_only_by_fd_ioctls_and_bounded(tmp_path):
    """The review's attack: 200 parked calls with 16 descriptors each took the daemon from 14
    to 3214 open descriptors. Now only ioctls that take descriptors may hold them, and a
    connection's calls hold at most max_fds (64)."""
    with make_stack(tmp_path, "fd", embedded=True) as s:
        raw = RawClient(s.node_path)
        adapter = raw.open_adapter(s.driver.active_adapters()[0].luid)
        efd = os.eventfd(0)
        try:
            before = open_fd_count()
            q = uapi.d3dkmt_queryadapterinfo()
            q.private_data, q.private_data_size = 0x10000, 4
            send_with_fds(raw.sock, wire.encode(wire.IoctlRequest(
                uapi.LX_DXQUERYADAPTERINFO, bytes(q),
                (wire.Region(0x10000, 4, wire.REGION_IN | wire.REGION_OUT, bytes(4)),), (9,)), 9),
                [efd])
            assert raw.replies(1)[9].ret == -errno.EINVAL  # takes no descriptors
            for i in range(20):
                send_with_fds(raw.sock, sleep_escape(adapter, 100 + i,
                                                     fd_numbers=tuple(range(16))), [efd] * 16)
            got = raw.replies(16)  # 4 calls hold 64; the other 16 are refused at once
            assert sorted(got) == list(range(104, 120))
            assert {r.ret for r in got.values()} == {-errno.EMFILE}
            info = the_conn(s)
            assert (info["calls"], info["held_fds"]) == (4, 64)
            assert open_fd_count() - before <= 64 + 8
            raw.close()
            wait_until(lambda: s.node.connections() == [], 10)
            wait_until(lambda: open_fd_count() <= before, 10, "descriptors released")
        finally:
            os.close(efd)


# ---- a host that stops answering -----------------------------------------------------------------


def test_a_stopped_host_fails_calls_at_once_and_comes_back(tmp_path):
    sock = str(tmp_path / "h.sock")
    host = subprocess.Popen([sys.executable, "-m", "dxg.cli.main", "host", "--listen", sock,
                             "--host-id", "stoppable"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    drv = GuestDriver(heartbeat_interval=0.2, heartbeat_timeout=1.0)
    node = SocketNode(drv, str(tmp_path / "dxg.sock"))
    try:
        assert "listening" in host.stdout.readline()
        drv.bind(sock)
        assert drv.wait_for_adapters(2, 15)
        node.start()
        with open_node(node.path) as client:
            ad = client.adapters()[0]
            dev = ad.create_device()
            host.send_signal(signal.SIGSTOP)
            wait_until(lambda: _state(host.pid) == "T", 10, "the host stopped")
            t0 = time.monotonic()
            with pytest.raises(DxgError) as e:
                dev.create_context()  # waits on the stopped host until the heartbeat gives up
            assert e.value.status == NTSTATUS.STATUS_DEVICE_REMOVED
            assert time.monotonic() - t0 < 5
            assert drv.active_adapters() == []
            host.send_signal(signal.SIGCONT)
        assert drv.wait_for_adapters(2, 20), "the host's adapters did not come back"
        with open_node(node.path) as client:
            client.adapters()[0].create_device().create_context()
            census = client.admin({"op": "census"})
        # What the stopped host ran for the old link (the CREATECONTEXT the guest gave up on)
        # went with that link's partition: only the new client's objects are left.
        totals = census["hosts"][0]["census"]["totals"]
        assert totals["devices"] == 1 and totals["contexts"] == 1
    finally:
        node.close()
        drv.close()
        if host.poll() is None:
            host.send_signal(signal.SIGCONT)
            host.terminate()
        try:
            host.wait(timeout=30)
        except subprocess.TimeoutExpired:
            host.kill()
            host.wait(timeout=30)
            raise
        finally:
            host.stdout.close()


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


# ---- a host that offers unbounded adapters -------------------------------------------------------


class FloodHost:
    """A hostile host: one global channel and `count` vGPU offers."""

    def __init__(self, rt: LoopThread, address: str, count: int) -> None:
        self.rt = rt
        self.count = count
        self.listener = rt.call(lambda: Listener(rt.loop, address, self._accept))
        rt.call(self.listener.start)
        self.sessions: list[HostBusSession] = []

    def _accept(self, sock: socket.socket, peer: str) -> None:
        offers = [Offer(1, DXGK_GLOBAL_GUID, uuid.uuid4(), mmio_megabytes=1)]
        offers += [Offer(2 + i, DXGK_VGPU_GUID, uuid.uuid4(),
                         interface_version=DXGK_VMBUS_INTERFACE_VERSION,
                         host_vgpu_luid=i + 1) for i in range(self.count)]
        s = HostBusSession(self.rt.loop, SocketTransport(self.rt.loop, sock, peer), self,
                           offers)
        self.sessions.append(s)
        s.start()

    def channel_opened(self, session, channel, msg) -> int:
        return -errno.ENODEV  # nothing ever starts: the offers alone are the attack

    def channel_closed(self, session, channel) -> None:
        pass

    def session_closed(self, session) -> None:
        pass

    def close(self) -> None:
        self.rt.call(self.listener.close)


def test_a_host_offering_twenty_thousand_adapters_is_capped(tmp_path):
    rt = LoopThread("flood")
    flood = FloodHost(rt, str(tmp_path / "flood.sock"), 20_000)
    drv = GuestDriver(max_adapters_per_host=64)
    try:
        cpu0 = time.process_time()
        bus = drv.bind(str(tmp_path / "flood.sock"))
        assert drv.rt.run(_wait_offers(bus), 120)
        cpu = time.process_time() - cpu0
        adapters = drv.all_adapters()
        assert len(adapters) <= 64
        assert cpu < 30, f"{cpu:.1f} CPU-seconds for 20,000 offers"
        # Only what a driver took is kept (64 adapters and the global channel).
        assert len(bus.devices()) <= 64 + 1
    finally:
        drv.close()
        flood.close()
        rt.close()


async def _wait_offers(bus) -> bool:
    await bus.offers_delivered.wait()
    return True


# ---- smaller items -----------------------------------------------------------------------------


def test_an_unknown_success_status_from_a_host_fails_the_call(tmp_path, monkeypatch):
    from dxg.host import adapter as host_adapter

    with make_stack(tmp_path, "st") as s:
        monkeypatch.setattr(host_adapter.HostAdapter, "query_info",
                            lambda self, t, data: (0x00000107, data))
        with open_node(s.node_path) as node:
            with pytest.raises(DxgError) as e:
                _ = node.adapters()[0].description
            assert e.value.status != NTSTATUS.STATUS_SUCCESS


def test_a_hostile_census_is_one_clear_error_without_a_traceback(tmp_path, caplog):
    from dxg.host import partition as host_partition

    with make_stack(tmp_path, "cs") as s:
        deep = b"{" + b'"a":[' * 100_000 + b"]" * 100_000 + b"}"
        def hostile(p, call, body):
            return host_partition.m.JsonReply(deep)

        command = host_partition.GlobalCommand.PYDXG_QUERYPARTITION
        for part in s.host.partitions():
            part.dispatcher.handlers = {**part.dispatcher.handlers, command: hostile}
        caplog.set_level(logging.DEBUG)
        with open_node(s.node_path) as node:
            census = node.admin({"op": "census"})
        assert "malformed census" in census["hosts"][0]["error"]
        assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_a_flood_of_bad_notifications_is_limited_in_the_log(tmp_path, caplog):
    with make_stack(tmp_path, "fl") as s:
        caplog.set_level(logging.WARNING, logger="dxg.guest.hostlink")
        (part,) = s.host.partitions()
        sent = s.host.rt.call(lambda: sum(
            part.notify(HostToVmCommand.SETGUESTDATA, b"bad") for _ in range(5000)))
        assert sent == 5000
        # the guest has read them all once a round trip after them is answered
        with open_node(s.node_path) as node:
            _ = node.adapters()[0].description
        lines = [r for r in caplog.records if r.name == "dxg.guest.hostlink"]
        assert 1 <= len(lines) <= 10, len(lines)
