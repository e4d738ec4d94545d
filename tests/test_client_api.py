"""dxg.client against a real in-process stack: Host + GuestDriver + SocketNode (conftest.stack),
with this test process and real client processes as the apps."""

import ctypes
import os
import signal

import pytest

from conftest import client, read_json_line, wait_until
from dxg.client import DxgError, NodeConnection, open_node, thunks
from dxg.uapi import ioctls as io
from dxg.uapi import structs as s
from dxg.uapi.ntstatus import NTSTATUS


def host_luids(stack) -> set[int]:
    return {a.guest_luid for a in stack.host.adapters}


def idle(stack) -> bool:
    t = stack.host_totals()
    return t["processes"] == 0 and t["devices"] == 0 and t["contexts"] == 0


def test_adapters_describe_themselves(stack):
    with open_node(stack.node_path) as node:
        ads = node.adapters()
        assert {a.luid for a in ads} == host_luids(stack)
        for a in ads:
            low, high = a.luid_parts
            assert (high << 32) | low == a.luid
            assert a.description.startswith("pydxg")
            assert a.adapter_type.paravirtualized and a.compute_only
            assert not a.adapter_type.display_supported
            assert a.vendor_id == a.ids.vendor_id and a.device_id == a.ids.device_id
            assert a.handle != 0
        # the soft adapters are compute-only: a filter without them finds none
        assert node.adapters(include_compute_only=False) == []


def test_enumadapters_thunks_count_then_fill(stack):
    conn = NodeConnection(stack.node_path)
    args = s.d3dkmt_enumadapters3()
    args.filter.include_compute_only = 1
    assert thunks.D3DKMTEnumAdapters3(conn, args) == 0
    assert args.adapter_count == 2
    small = (s.d3dkmt_adapterinfo * 1)()
    args.adapters, args.adapter_count = ctypes.addressof(small), 1
    assert thunks.D3DKMTEnumAdapters3(conn, args) == NTSTATUS.STATUS_BUFFER_TOO_SMALL
    infos = (s.d3dkmt_adapterinfo * 2)()
    args.adapters, args.adapter_count = ctypes.addressof(infos), 2
    assert thunks.D3DKMTEnumAdapters3(conn, args) == 0
    got = {(i.adapter_luid.b << 32) | i.adapter_luid.a for i in infos}
    assert got == host_luids(stack)
    e2 = s.d3dkmt_enumadapters2()
    assert thunks.D3DKMTEnumAdapters2(conn, e2) == 0 and e2.num_adapters == 0
    conn.close()


def test_open_adapter_by_luid_int_and_parts(stack):
    with open_node(stack.node_path) as node:
        luid = sorted(host_luids(stack))[0]
        a = node.open_adapter(luid)
        b = node.open_adapter((luid & 0xFFFFFFFF, luid >> 32))
        assert a.luid == b.luid == luid and a.handle != b.handle
        with pytest.raises(DxgError) as ei:
            node.open_adapter(0x1234)
        assert ei.value.status == NTSTATUS.STATUS_INVALID_PARAMETER
        assert "STATUS_INVALID_PARAMETER" in str(ei.value)


def test_device_and_context_life_cycle(stack):
    with open_node(stack.node_path) as node:
        ad = node.adapters()[0]
        with ad.create_device() as dev:
            assert (
                dev.execution_state()
                == s.d3dkmt_deviceexecution_state._D3DKMT_DEVICEEXECUTION_ACTIVE
            )
            ctx = dev.create_context(node_ordinal=0)
            ctx2 = dev.create_context(priv_data=b"hello")
            assert ctx.handle != ctx2.handle
            assert len(ctx2.priv_data) == 5
            t = stack.host_totals()
            assert (t["devices"], t["contexts"]) == (1, 2)
            ctx.close()
            ctx.close()  # idempotent
            assert stack.host_totals()["contexts"] == 1
        assert dev.closed and ctx2.closed
        t = stack.host_totals()
        assert (t["devices"], t["contexts"]) == (0, 0)
        dev.close()


def test_feature_and_clock_queries(stack):
    with open_node(stack.node_path) as node:
        ad = node.adapters()[0]
        f = ad.is_feature_enabled(s.dxgk_feature_id._DXGK_FEATURE_HWSCH)
        assert f.known_feature in (True, False)
        c1 = ad.clock_calibration()
        c2 = ad.clock_calibration()
        assert c1.gpu_frequency > 0
        assert c2.gpu_clock_counter >= c1.gpu_clock_counter


def test_query_info_with_a_caller_struct(stack):
    from dxg.uapi import wddm

    with open_node(stack.node_path) as node:
        ad = node.adapters()[0]
        t = ad.query_info(
            wddm.KMTQUERYADAPTERINFOTYPE.KMTQAITYPE_ADAPTERTYPE, wddm.D3DKMT_ADAPTERTYPE()
        )
        assert t.Paravirtualized == 1
        bad = s.d3dkmt_queryadapterinfo(private_data=0x10, private_data_size=4)
        bad.adapter.v = ad.handle
        bad.type = wddm.KMTQUERYADAPTERINFOTYPE.KMTQAITYPE_ADAPTERTYPE
        assert (
            thunks.D3DKMTQueryAdapterInfo(node.conn, bad) == NTSTATUS.STATUS_UNSUCCESSFUL
        )  # EFAULT


def test_bad_handles_raise_with_status(stack):
    with open_node(stack.node_path) as node:
        ad = node.adapters()[0]
        dev = ad.create_device()
        dev.handle ^= 0x40  # someone else's / stale handle
        with pytest.raises(DxgError) as ei:
            dev.execution_state()
        assert ei.value.status == NTSTATUS.STATUS_INVALID_HANDLE
        assert NTSTATUS(ei.value.status).name in str(ei.value)


def test_processes_and_a_killed_client(stack):
    me = os.getpid()
    with open_node(stack.node_path) as node:
        ad = node.adapters()[0]
        assert node.processes(ad.luid) == [me]
        proc = client("hold", stack.node_path, 2, 2)
        try:
            info = read_json_line(proc)
            assert info["pid"] == proc.pid
            assert sorted(ad.processes()) == sorted([me, proc.pid])
            snap = node.snapshot()
            mine = next(p for p in snap["processes"] if p["pid"] == proc.pid)
            assert sum(a["devices"] for a in mine["adapters"]) == 4
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            wait_until(lambda: node.processes(ad.luid) == [me], 1.0, "killed client released")
            wait_until(lambda: stack.host_totals()["devices"] == 0, 5.0, "host objects freed")
        finally:
            if proc.poll() is None:
                proc.kill()
    wait_until(lambda: idle(stack), 5.0, "host idle after the node closed")


def test_many_client_processes_run_the_whole_flow(stack):
    procs = [client("flow", stack.node_path, 3) for _ in range(6)]
    try:
        results = [read_json_line(p, 60) for p in procs]
        for p in procs:
            assert p.wait(30) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert {r["pid"] for r in results} == {p.pid for p in procs}
    wait_until(lambda: idle(stack), 5.0, "host idle after the clients exited")


def test_node_close_releases_everything_of_this_process(stack):
    node = open_node(stack.node_path)
    for ad in node.adapters():
        ad.create_device().create_context()
    assert stack.host_totals()["contexts"] == 2
    node.close()
    node.close()
    wait_until(lambda: idle(stack), 5.0, "host idle after Node.close")


def test_unhandled_ioctl_is_enotty(stack):
    conn = NodeConnection(stack.node_path)
    assert conn.ioctl(io.LX_DXCREATECONTEXT, s.d3dkmt_createcontext()) == -25
    assert thunks.D3DKMTRender(conn, s.d3dkmt_render()) == NTSTATUS.STATUS_UNSUCCESSFUL
    with pytest.raises(TypeError):
        thunks.D3DKMTRender(conn, s.d3dkmt_createcontext())
    conn.close()
