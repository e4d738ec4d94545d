"""The whole stack with real processes: host, guest driver, node, client processes."""

import ctypes
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import client, make_stack, read_json_line, wait_until
from dxg import uapi
from dxg.client import DxgError, NodeConnection, open_node
from dxg.client import thunks as t
from dxg.host.config import HostConfig
from dxg.host.host import Host
from dxg.node.server import SocketNode
from dxg.uapi import NTSTATUS


def test_three_clients_each_run_the_flow_100_times(stack):
    procs = [client("flow", stack.node_path, 100) for _ in range(3)]
    results = [read_json_line(p, timeout=240) for p in procs]
    for p in procs:
        assert p.wait(timeout=30) == 0, p.stderr.read()
    for r in results:
        hs = r["handles"]
        assert len(hs) == 100 * (2 + 2 * 3)
        assert len(set(hs)) == len(hs), "a handle value repeated within one process"
        assert all(h and (h & 0x3F) == 0 and h >> 30 for h in hs)
    wait_until(lambda: stack.host_totals()["processes"] == 0, 5, "host processes gone")
    totals = stack.host_totals()
    assert totals["devices"] == 0 and totals["contexts"] == 0
    assert stack.driver.processes() == []


def test_two_hosts_bound_into_one_guest(tmp_path):
    with make_stack(tmp_path, "a") as a, Host(HostConfig(adapters=2)) as second:
        addr = second.listen(str(tmp_path / "second.sock"))
        a.driver.bind(addr)
        assert a.driver.wait_for_adapters(4, 15)
        with open_node(a.node_path) as node:
            adapters = node.adapters()
            luids = [ad.luid for ad in adapters]
            assert len(luids) == 4 and len(set(luids)) == 4
            for ad in adapters:
                dev = ad.create_device()
                dev.create_context()
            assert a.host_totals()["devices"] == 2 and second.census()["totals"]["devices"] == 2
        wait_until(lambda: second.census()["totals"]["processes"] == 0, 5)
        assert a.host_totals()["processes"] == 0


def test_two_complete_pairs_in_one_process_do_not_interfere(tmp_path):
    with make_stack(tmp_path, "one") as one, make_stack(tmp_path, "two") as two:
        luids_one = {a.luid for a in one.driver.active_adapters()}
        luids_two = {a.luid for a in two.driver.active_adapters()}
        assert luids_one.isdisjoint(luids_two)
        procs = [client("hold", s.node_path, 1, 2) for s in (one, two)]
        held = [read_json_line(p) for p in procs]
        assert one.host_totals()["devices"] == 2 and two.host_totals()["devices"] == 2
        assert one.host_totals()["contexts"] == 4 and two.host_totals()["contexts"] == 4
        assert [p["pid"] for p in one.driver.snapshot()["processes"]] == [held[0]["pid"]]
        assert [p["pid"] for p in two.driver.snapshot()["processes"]] == [held[1]["pid"]]
        procs[0].kill()
        procs[0].wait()
        wait_until(lambda: one.host_totals()["processes"] == 0, 5)
        assert two.host_totals()["devices"] == 2
        procs[1].stdin.close()
        assert procs[1].wait(timeout=30) == 0
        wait_until(lambda: two.host_totals()["processes"] == 0, 5)


def _luids(node_path):
    with open_node(node_path) as node:
        return [a.luid for a in node.adapters()]


@pytest.mark.parametrize("order", ["global-first", "vgpu-first"])
def test_offer_orders_give_the_same_adapters(tmp_path, order):
    with make_stack(tmp_path, "ref", host_id="fixed-host") as ref:
        expected = _luids(ref.node_path)
    with make_stack(tmp_path, order, host_id="fixed-host", offer_order=order) as s:
        assert _luids(s.node_path) == expected


def _start_host_process(addr: str, host_id: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "dxg.cli.main", "host", "--listen", addr,
                          "--host-id", host_id, "--offer-order", "vgpu-first"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    assert "listening" in line, line
    return p


def test_host_restarted_gives_the_same_adapters(tmp_path):
    from dxg.guest.driver import GuestDriver

    addr = str(tmp_path / "restart.sock")
    host = _start_host_process(addr, "restart-me")
    drv = GuestDriver()
    node = SocketNode(drv, str(tmp_path / "dxg.sock"))
    try:
        drv.bind(addr)
        assert drv.wait_for_adapters(2, 15)
        node.start()
        before = _luids(node.path)
        with open_node(str(node.path)) as n:
            ad = n.adapters()[0]
            dev = ad.create_device()
            host.kill()
            host.wait()
            wait_until(lambda: not drv.active_adapters(), 10, "adapters stopped")
            with pytest.raises(DxgError) as e:
                dev.create_context()
            assert e.value.status == NTSTATUS.STATUS_DEVICE_REMOVED
            host = _start_host_process(addr, "restart-me")
            assert drv.wait_for_adapters(2, 15)
            assert _luids(str(node.path)) == before
            fresh = n.open_adapter(before[0])
            fresh.create_device().create_context()
    finally:
        node.close()
        drv.close()
        host.kill()
        host.wait()


def test_removing_one_hosts_channels_leaves_the_other_working(tmp_path):
    with make_stack(tmp_path, "a") as a, Host(HostConfig(adapters=1)) as other:
        a.driver.bind(other.listen(str(tmp_path / "other.sock")))
        assert a.driver.wait_for_adapters(3, 15)
        with open_node(a.node_path) as node:
            adapters = node.adapters()
            theirs = next(ad for ad in adapters
                      if ad.luid == a.driver.active_adapters()[2].luid)
            ours = adapters[0]
            dev_theirs = theirs.create_device()
            other.remove_adapter(0)
            wait_until(lambda: len(a.driver.active_adapters()) == 2, 10)
            for call in (dev_theirs.create_context, theirs.create_device,
                         lambda: theirs.description):
                with pytest.raises(DxgError) as e:
                    call()
                assert e.value.status == NTSTATUS.STATUS_DEVICE_REMOVED
            assert len(node.adapters()) == 2
            ours.create_device().create_context()
            other.close()
            ours.create_device().create_context()


def test_sigkilled_client_leaves_nothing_behind(stack):
    victim = client("hold", stack.node_path, 2, 3)
    bystander = client("hold", stack.node_path, 1, 1)
    held = read_json_line(victim)
    read_json_line(bystander)
    assert stack.host_totals()["contexts"] == 2 * 2 * 3 + 2
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    t0 = time.monotonic()
    wait_until(lambda: stack.host_totals()["processes"] == 1, 1.0, "host cleanup within 1 s")
    wait_until(lambda: [p["pid"] for p in stack.driver.snapshot()["processes"]]
               != [] and held["pid"] not in
               [p["pid"] for p in stack.driver.snapshot()["processes"]], 1.0)
    assert time.monotonic() - t0 < 1.0
    totals = stack.host_totals()
    assert totals["devices"] == 2 and totals["contexts"] == 2
    bystander.stdin.write("ping\n")
    bystander.stdin.flush()
    assert read_json_line(bystander)["ok"]
    bystander.stdin.close()
    assert bystander.wait(timeout=30) == 0


def test_bad_handles_get_the_invalid_handle_error(stack):
    other = client("hold", stack.node_path, 1, 1)
    theirs = read_json_line(other)
    conn = NodeConnection(stack.node_path)
    try:
        e = uapi.d3dkmt_enumadapters3()
        e.filter.include_compute_only = 1
        infos = (uapi.d3dkmt_adapterinfo * 4)()
        e.adapter_count, e.adapters = 4, ctypes.addressof(infos)
        assert t.D3DKMTEnumAdapters3(conn, e) == 0
        adapter = infos[0].adapter_handle.v
        cd = uapi.d3dkmt_createdevice()
        cd.adapter.v = adapter
        assert t.D3DKMTCreateDevice(conn, cd) == 0
        device = cd.device.v
        cc = uapi.d3dkmt_createcontextvirtual()
        cc.device.v = device
        assert t.D3DKMTCreateContextVirtual(conn, cc) == 0

        def create_context_on(h):
            a = uapi.d3dkmt_createcontextvirtual()
            a.device.v = h
            return t.D3DKMTCreateContextVirtual(conn, a)

        def create_device_on(h):
            a = uapi.d3dkmt_createdevice()
            a.adapter.v = h
            return t.D3DKMTCreateDevice(conn, a)

        bad = NTSTATUS.STATUS_INVALID_HANDLE
        # another process's handles
        assert create_context_on(theirs["devices"][0]) == bad
        assert create_device_on(theirs["adapters"][0]) == bad
        # wrong types
        assert create_context_on(adapter) == bad
        assert create_context_on(cc.context.v) == bad
        assert create_device_on(device) == bad
        # destroyed
        dd = uapi.d3dkmt_destroydevice()
        dd.device.v = device
        assert t.D3DKMTDestroyDevice(conn, dd) == 0
        assert create_context_on(device) == bad
        assert t.D3DKMTDestroyDevice(conn, dd) == bad
        dc = uapi.d3dkmt_destroycontext()
        dc.context.v = cc.context.v
        assert t.D3DKMTDestroyContext(conn, dc) == bad  # went with its device
        # random 32-bit values
        rng = random.Random(1234)
        for _ in range(300):
            h = rng.getrandbits(32)
            assert create_context_on(h) == bad
            assert create_device_on(h) == bad
        ca = uapi.d3dkmt_closeadapter()
        ca.adapter_handle.v = adapter
        assert t.D3DKMTCloseAdapter(conn, ca) == 0
        assert t.D3DKMTCloseAdapter(conn, ca) == bad
    finally:
        conn.close()
        other.stdin.close()
        other.wait(timeout=30)


def test_unimplemented_and_unhandled_ioctls_answer_clearly(stack):
    with NodeConnection(stack.node_path) as conn:
        # An ioctl of the ABI not implemented yet: ENOSYS, never a hang
        from dxg.node.support import ioctl_support

        todo = [r for r in ioctl_support() if r.handled and not r.implemented]
        if todo:
            ret = conn.ioctl(todo[0].code, uapi.IOCTLS[todo[0].nr].struct())
            assert ret == -38, todo[0].name
        # 0x2d (Render) has no handler in the real driver either: ENOTTY
        code = uapi.IOCTLS[0x2D].code
        assert conn.ioctl(code, uapi.IOCTLS[0x2D].struct()) == -25
        e = uapi.d3dkmt_enumadapters3()
        assert conn.ioctl(uapi.LX_DXENUMADAPTERS3, e) == 0 and e.adapter_count == 0
        e.filter.include_compute_only = 1
        assert conn.ioctl(uapi.LX_DXENUMADAPTERS3, e) == 0 and e.adapter_count == 2
        e2 = uapi.d3dkmt_enumadapters2()
        assert conn.ioctl(uapi.LX_DXENUMADAPTERS2, e2) == 0 and e2.num_adapters == 0


def test_malformed_requests_leave_the_node_up(stack):
    import socket as so

    from dxg.uapi import wire

    def raw_session():
        s = so.socket(so.AF_UNIX, so.SOCK_STREAM)
        s.connect(stack.node_path)
        s.sendall(wire.encode(wire.Hello(), 1))
        dec = wire.FrameDecoder()

        def recv():
            while True:
                frame = dec.next_frame()
                if frame is not None:
                    return wire.decode(frame)
                data = s.recv(1 << 16)
                if not data:
                    return None
                dec.feed(data)

        assert isinstance(recv(), wire.HelloReply)
        return s, recv

    s, recv = raw_session()
    enum3 = uapi.d3dkmt_enumadapters3()
    enum3.filter.include_compute_only = 1

    def ioctl(code, struct_bytes, regions=()):
        s.sendall(wire.encode(wire.IoctlRequest(code, struct_bytes, tuple(regions)), 7))
        return recv()

    # truncated struct (size bits say 24, 16 sent)
    r = ioctl(uapi.LX_DXENUMADAPTERS3, bytes(enum3)[:16])
    assert getattr(r, "ret", None) in (-14, -22) or isinstance(r, wire.ErrorReply)
    # unknown ioctl codes, wrong size bits, wrong type
    assert ioctl(0xC0184700 | 0x99, bytes(24)).ret == -25
    assert ioctl(uapi.LX_DXENUMADAPTERS3 + (1 << 16), bytes(25)).ret == -25
    assert ioctl((uapi.LX_DXENUMADAPTERS3 & ~0xFF00) | (ord("X") << 8), bytes(24)).ret == -25
    # huge counts
    enum3.adapter_count = 0x10000
    enum3.adapters = 0x1000
    assert ioctl(uapi.LX_DXENUMADAPTERS3, bytes(enum3)).ret in (-22, -14)
    q = uapi.d3dkmt_queryadapterinfo()
    q.private_data_size = 1 << 30
    q.private_data = 0x1000
    assert ioctl(uapi.LX_DXQUERYADAPTERINFO, bytes(q)).ret in (-22, -9)
    # pointers the request did not carry
    enum3.adapter_count, enum3.adapters = 2, 0xDEAD0000
    assert ioctl(uapi.LX_DXENUMADAPTERS3, bytes(enum3)).ret == -14
    # the connection still works
    enum3.adapter_count, enum3.adapters = 0, 0
    r = ioctl(uapi.LX_DXENUMADAPTERS3, bytes(enum3))
    assert r.ret == 0
    # garbage framing: the node drops this connection but stays up for others
    s.sendall(b"\xff" * 64)
    s.close()
    with open_node(stack.node_path) as node:
        assert len(node.adapters()) == 2
    assert stack.driver.wait_for_adapters(2, 1)


def test_host_notification_invalidates_the_cached_device_state(stack):
    """SETGUESTDATA (host -> guest, global channel) bumps the device-state counter; the next
    GetDeviceState asks the host instead of answering from the cache."""
    with open_node(stack.node_path) as node:
        ad = node.adapters()[0]
        dev = ad.create_device()
        assert dev.execution_state() == 1  # ACTIVE, from the guest's cache
        link = stack.driver.links()[0]
        before = link.device_state_counter
        part = stack.host.partitions()[0]
        host_dev = part.census()["processes"][0]["devices"][0]["handle"]
        assert part.set_device_execution_state(host_dev, 2)  # RESET
        wait_until(lambda: link.device_state_counter > before, 5, "SETGUESTDATA delivered")
        assert dev.execution_state() == 2
        assert dev.execution_state() == 2  # now cached again


def test_adapter_queries_through_the_client(stack):
    from dxg.uapi import wddm

    q = wddm.KMTQUERYADAPTERINFOTYPE
    with open_node(stack.node_path) as node:
        ad = node.adapters()[1]
        assert ad.description.startswith("pydxg")
        for qtype in (q.KMTQAITYPE_ADAPTERTYPE, q.KMTQAITYPE_ADAPTERTYPE_RENDER):
            t_ = ad.query_info(qtype, wddm.D3DKMT_ADAPTERTYPE())
            # the guest's patch: paravirtualized, no display, compute-only from the vGPU's PCI id
            assert t_.Paravirtualized and not t_.DisplaySupported and t_.ComputeOnly
        ids = ad.device_ids()
        assert (ids.vendor_id, ids.device_id) == (0x1414, 0x008C)
        with pytest.raises(DxgError) as e:
            ad.device_ids(5)
        assert e.value.status == NTSTATUS.STATUS_INVALID_PARAMETER
        caps = ad.query_info(q.KMTQAITYPE_WDDM_2_7_CAPS, wddm.D3DKMT_WDDM_2_7_CAPS())
        assert caps.Value == 0  # no hardware scheduling on a soft adapter
        addr = ad.query_info(q.KMTQAITYPE_ADAPTERADDRESS, wddm.D3DKMT_ADAPTERADDRESS())
        assert addr.DeviceNumber == 1
        seg = ad.query_info(q.KMTQAITYPE_GETSEGMENTSIZE, wddm.D3DKMT_SEGMENTSIZEINFO())
        assert seg.DedicatedVideoMemorySize == 1 << 30 and seg.SharedSystemMemorySize > 0
        with pytest.raises(DxgError) as e:  # too small for the type
            ad.query_info(q.KMTQAITYPE_GETSEGMENTSIZE, (ctypes.c_uint8 * 8)())
        assert e.value.status == NTSTATUS.STATUS_BUFFER_TOO_SMALL
        feat = ad.is_feature_enabled(0)  # _DXGK_FEATURE_HWSCH
        assert feat.known_feature and not feat.enabled
        clock = ad.clock_calibration()
        assert clock.gpu_frequency == 10**9 and clock.gpu_clock_counter > 0
        assert ad.processes() == [os.getpid()]


def test_enumadapters3_too_small_opens_nothing(stack):
    with NodeConnection(stack.node_path) as conn:
        e = uapi.d3dkmt_enumadapters3()
        e.filter.include_compute_only = 1
        one = (uapi.d3dkmt_adapterinfo * 1)()
        e.adapter_count, e.adapters = 1, ctypes.addressof(one)
        assert t.D3DKMTEnumAdapters3(conn, e) == NTSTATUS.STATUS_BUFFER_TOO_SMALL
        assert e.adapter_count == 2 and one[0].adapter_handle.v == 0
        assert stack.driver.snapshot()["processes"][0]["handles"] == 0
        two = (uapi.d3dkmt_adapterinfo * 2)()
        e.adapter_count, e.adapters = 2, ctypes.addressof(two)
        assert t.D3DKMTEnumAdapters3(conn, e) == 0
        assert e.adapter_count == 2 and two[0].adapter_handle.v != two[1].adapter_handle.v
        assert stack.driver.snapshot()["processes"][0]["handles"] == 2
