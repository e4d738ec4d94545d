"""The guest driver against a misbehaving host and failing callers (regressions from review)."""

import ctypes
import os
import socket
import threading
import time

import pytest

from conftest import wait_until
from dxg import uapi
from dxg.guest.driver import GuestDriver
from dxg.guest.usermem import UserMemoryFault
from dxg.host.config import HostConfig
from dxg.host.host import Host
from dxg.protocol.commands import VgpuCommand


class SelfMemory:
    """This process's own memory (the driver runs in-process here)."""

    def read(self, addr: int, size: int) -> bytes:
        return ctypes.string_at(addr, size)

    def write(self, addr: int, data: bytes) -> None:
        ctypes.memmove(addr, data, len(data))


class ReadOnlyMemory(SelfMemory):
    def write(self, addr: int, data: bytes) -> None:
        raise UserMemoryFault("read-only buffer")


@pytest.fixture
def pair(tmp_path):
    host = Host(HostConfig(adapters=2))
    drv = GuestDriver()
    try:
        drv.bind(host.listen(str(tmp_path / "h.sock")))
        assert drv.wait_for_adapters(2, 10)
        yield host, drv
    finally:
        drv.close()
        host.close()


def call(drv, proc, code, args, mem=None):
    ret, out = drv.ioctl(proc, code, bytes(args), mem or SelfMemory())
    ctypes.memmove(ctypes.addressof(args), out, len(out))
    return ret


def open_adapter(drv, proc, index=0):
    a = uapi.d3dkmt_openadapterfromluid()
    luid = drv.active_adapters()[index].luid
    a.adapter_luid.a, a.adapter_luid.b = luid & 0xFFFFFFFF, luid >> 32
    assert call(drv, proc, uapi.LX_DXOPENADAPTERFROMLUID, a) == 0
    return a.adapter_handle.v


def create_device(drv, proc, adapter):
    d = uapi.d3dkmt_createdevice()
    d.adapter.v = adapter
    assert call(drv, proc, uapi.LX_DXCREATEDEVICE, d) == 0
    return d.device.v


def test_host_reply_larger_than_the_buffer_is_refused(pair, monkeypatch):
    host, drv = pair
    proc = drv.open_process(os.getpid(), 0, "t")
    h = open_adapter(drv, proc)
    monkeypatch.setattr(host.adapters[0], "query_info",
                        lambda qtype, data: (0x103, data + b"X" * 4096))
    buf = (ctypes.c_uint8 * 16)()
    guard = (ctypes.c_uint8 * 4096)()  # whatever follows must not be written
    q = uapi.d3dkmt_queryadapterinfo()
    q.adapter.v, q.type = h, 1
    q.private_data, q.private_data_size = ctypes.addressof(buf), 16
    assert call(drv, proc, uapi.LX_DXQUERYADAPTERINFO, q) == -71  # EPROTO
    assert bytes(buf) == bytes(16) and bytes(guard) == bytes(4096)


def test_a_failure_of_one_host_call_does_not_stop_teardown(pair):
    host, drv = pair
    proc = drv.open_process(os.getpid(), 0, "t")
    h = open_adapter(drv, proc)
    for _ in range(2):
        create_device(drv, proc, h)
    part = host.partitions()[0]
    real, fail = part._vgpu_handlers[VgpuCommand.DESTROYDEVICE]
    # the host destroys the device but answers with an empty (malformed) reply
    part._vgpu_handlers[VgpuCommand.DESTROYDEVICE] = (lambda msg, ad: (real(msg, ad), b"")[1],
                                                      fail)
    drv.close_process(proc)
    wait_until(lambda: host.census()["totals"]["processes"] == 0, 5)
    assert host.census()["totals"]["devices"] == 0


def test_context_private_data_that_cannot_be_written_back_leaks_nothing(pair):
    host, drv = pair
    proc = drv.open_process(os.getpid(), 0, "t")
    dev = create_device(drv, proc, open_adapter(drv, proc))
    priv = (ctypes.c_uint8 * 16)(*b"p" * 16)
    c = uapi.d3dkmt_createcontextvirtual()
    c.device.v, c.priv_drv_data, c.priv_drv_data_size = dev, ctypes.addressof(priv), 16
    assert call(drv, proc, uapi.LX_DXCREATECONTEXTVIRTUAL, c, ReadOnlyMemory()) == -14
    assert host.census()["totals"]["contexts"] == 0
    assert len(proc.handles) == 2  # the adapter and the device, no context


def test_failed_binds_leave_no_thread(tmp_path):
    drv = GuestDriver()
    before = threading.active_count()
    for _ in range(10):
        with pytest.raises(OSError):
            drv.bind(str(tmp_path / "nobody.sock"), reconnect=False)
    assert threading.active_count() == before and drv.links() == []


def test_a_host_hanging_up_in_the_handshake_fails_fast(tmp_path):
    path = str(tmp_path / "rude.sock")
    ls = socket.socket(socket.AF_UNIX)
    ls.bind(path)
    ls.listen(8)

    def rude():
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return
            c.recv(4096)
            c.close()

    threading.Thread(target=rude, daemon=True).start()
    drv = GuestDriver()
    try:
        t0 = time.monotonic()
        with pytest.raises(ConnectionError, match="hung up"):
            drv.bind(path, reconnect=False)
        assert time.monotonic() - t0 < 5
        bus = drv.bind(path, reconnect=True, wait=True)
        t0 = time.monotonic()
        drv.unbind(bus)
        assert time.monotonic() - t0 < 5
    finally:
        ls.close()


def test_adapters_restart_after_the_global_channel_comes_back(pair):
    host, drv = pair
    proc = drv.open_process(os.getpid(), 0, "t")
    old = open_adapter(drv, proc)
    session = host.partitions()[0].session
    glob = next(o for o in session.offers() if o.relid == 1)
    session.rescind(1)
    wait_until(lambda: not drv.active_adapters(), 5, "adapters stopped")
    d = uapi.d3dkmt_createdevice()
    d.adapter.v = old
    assert call(drv, proc, uapi.LX_DXCREATEDEVICE, d) == -19  # ENODEV on the old handle
    session.offer(glob)
    assert drv.wait_for_adapters(2, 10)
    create_device(drv, proc, open_adapter(drv, proc))


def test_the_same_host_bound_twice_gives_no_duplicate_luids(pair, tmp_path):
    host, drv = pair
    bus = drv.bind(host.listen(str(tmp_path / "again.sock")))
    assert bus.offers_delivered.wait(10)  # set after every offer's probe has run
    luids = [a.luid for a in drv.active_adapters()]
    assert len(luids) == len(set(luids)) == 2
