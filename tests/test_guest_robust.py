"""The guest driver against a misbehaving host and failing callers (regressions from review).

The driver runs on its own event loop; these tests call its ioctls there (``drv.rt.run``) with
the caller's memory being this process's own."""

import asyncio
import contextlib
import ctypes
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from types import MappingProxyType
from typing import Any

import pytest

from conftest import wait_until
from dxg import uapi
from dxg.guest import vmbus
from dxg.guest.driver import GuestDriver
from dxg.guest.usermem import UserMemoryFault
from dxg.host.config import HostConfig
from dxg.host.host import Host
from dxg.oslib.fds import open_fd_count
from dxg.oslib.memfd import memfd_from_bytes
from dxg.protocol import messages as m
from dxg.protocol.commands import VgpuCommand
from dxg.vmbus.transport import SocketTransport

TIMEOUT = 10.0


class SelfMemory:
    """This process's own memory (the driver runs in-process here)."""

    def read(self, addr: int, size: int) -> bytes:
        return ctypes.string_at(addr, size)

    def write(self, addr: int, data: bytes) -> None:
        ctypes.memmove(addr, data, len(data))

    def take_fd(self, number: int) -> int:
        return os.dup(number)

    def give_fd_to_user(self, fd: int, addr: int, width: int = 8) -> None:
        self.write(addr, fd.to_bytes(width, "little", signed=True))


class ReadOnlyMemory(SelfMemory):
    def write(self, addr: int, data: bytes) -> None:
        raise UserMemoryFault("read-only buffer")


@pytest.fixture
def pair(tmp_path) -> Iterator[tuple[Host, GuestDriver]]:
    host = Host(HostConfig(adapters=2))
    drv = GuestDriver()
    try:
        drv.bind(host.listen(str(tmp_path / "h.sock")))
        assert drv.wait_for_adapters(2, TIMEOUT)
        yield host, drv
    finally:
        drv.close()
        host.close()


def open_process(drv: GuestDriver, name: str = "t") -> Any:
    return drv.rt.call(drv.open_process, os.getpid(), 0, name)


def close_process(drv: GuestDriver, proc: Any) -> None:
    drv.rt.run(drv.close_process(proc), TIMEOUT)


def call(drv, proc, code, args, mem=None) -> int:
    ret, out = drv.rt.run(drv.ioctl(proc, code, bytes(args), mem or SelfMemory()), TIMEOUT)
    ctypes.memmove(ctypes.addressof(args), out, len(out))
    return ret


def open_adapter(drv, proc, index=0) -> int:
    a = uapi.d3dkmt_openadapterfromluid()
    luid = drv.active_adapters()[index].luid
    a.adapter_luid.a, a.adapter_luid.b = luid & 0xFFFFFFFF, luid >> 32
    assert call(drv, proc, uapi.LX_DXOPENADAPTERFROMLUID, a) == 0
    return a.adapter_handle.v


def create_device(drv, proc, adapter) -> int:
    d = uapi.d3dkmt_createdevice()
    d.adapter.v = adapter
    assert call(drv, proc, uapi.LX_DXCREATEDEVICE, d) == 0
    return d.device.v


def fds_with_target(prefix: str) -> int:
    """This process's descriptors whose target starts with ``prefix``."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(prefix)
    return count


def host_totals(host: Host) -> dict[str, int]:
    return host.census()["totals"]


def patch_handler(host: Host, command: VgpuCommand,
                  wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Replace the host's handler of ``command`` (in the only partition) by ``wrap(real)``."""
    (part,) = host.partitions()

    def patch() -> None:
        handlers = dict(part.dispatcher.handlers)
        handlers[command] = wrap(handlers[command])
        part.dispatcher.handlers = MappingProxyType(handlers)

    host.rt.call(patch)


# ---- hostile host replies ------------------------------------------------------------------------


def query_umd_private(drv, proc, h, size=16) -> tuple[int, bytes]:
    buf = (ctypes.c_uint8 * size)()
    q = uapi.d3dkmt_queryadapterinfo()
    q.adapter.v, q.type = h, 1
    q.private_data, q.private_data_size = ctypes.addressof(buf), size
    return call(drv, proc, uapi.LX_DXQUERYADAPTERINFO, q), bytes(buf)


def test_host_reply_larger_than_the_buffer_is_refused(pair, monkeypatch):
    host, drv = pair
    proc = open_process(drv)
    h = open_adapter(drv, proc)
    monkeypatch.setattr(host.adapters[0], "query_info",
                        lambda qtype, data: (0x103, data + b"X" * 4096))
    ret, buf = query_umd_private(drv, proc, h)
    assert ret == -71  # EPROTO
    assert buf == bytes(16)  # nothing was written to the caller


@pytest.mark.parametrize("reply", ["success-status-only", "empty", "wrong-type"])
def test_malformed_host_replies_are_eproto(pair, reply):
    host, drv = pair
    proc = open_process(drv)
    h = open_adapter(drv, proc)
    bodies = {"success-status-only": m.NtStatusReturn(0), "empty": b"",
              "wrong-type": m.HandleReturn(0x40000040)}
    patch_handler(host, VgpuCommand.QUERYADAPTERINFO, lambda real: (
        lambda p, c, body: bodies[reply]))
    ret, buf = query_umd_private(drv, proc, h, size=64)
    assert ret == -71 and buf == bytes(64)
    create_device(drv, proc, h)  # the link is fine


def test_descriptors_a_host_should_not_send_are_closed(pair):
    host, drv = pair
    proc = open_process(drv)
    h = open_adapter(drv, proc)
    spare = memfd_from_bytes(b"unwanted", "unwanted-by-guest")

    def wrap(real):
        def handler(p, call, body):
            call.reply_fds.append(os.dup(spare))
            return real(p, call, body)
        return handler

    try:
        patch_handler(host, VgpuCommand.QUERYADAPTERINFO, wrap)
        for _ in range(20):
            assert query_umd_private(drv, proc, h)[0] == -71
        # Only ours is left: the host's copies and those the guest got were all closed (the
        # host closes its last one just after sending it).
        wait_until(lambda: fds_with_target("/memfd:unwanted-by-guest ") == 1)
    finally:
        os.close(spare)


# ---- teardown ------------------------------------------------------------------------------------


def test_a_failure_of_one_host_call_does_not_stop_teardown(pair):
    host, drv = pair
    proc = open_process(drv)
    h = open_adapter(drv, proc)
    for _ in range(2):
        create_device(drv, proc, h)

    def destroys_but_answers_garbage(real):
        def handler(p, call, body):
            real(p, call, body)
            return b""  # the host destroys the device but answers an empty (malformed) reply
        return handler

    patch_handler(host, VgpuCommand.DESTROYDEVICE, destroys_but_answers_garbage)
    close_process(drv, proc)
    wait_until(lambda: host_totals(host)["processes"] == 0, 5)
    assert host_totals(host)["devices"] == 0


def test_context_private_data_that_cannot_be_written_back_leaks_nothing(pair):
    host, drv = pair
    proc = open_process(drv)
    dev = create_device(drv, proc, open_adapter(drv, proc))
    priv = (ctypes.c_uint8 * 16)(*b"p" * 16)
    c = uapi.d3dkmt_createcontextvirtual()
    c.device.v, c.priv_drv_data, c.priv_drv_data_size = dev, ctypes.addressof(priv), 16
    assert call(drv, proc, uapi.LX_DXCREATECONTEXTVIRTUAL, c, ReadOnlyMemory()) == -14
    wait_until(lambda: host_totals(host)["contexts"] == 0)
    assert len(proc.handles) == 2  # the adapter and the device, no context
    assert call(drv, proc, uapi.LX_DXCREATECONTEXTVIRTUAL, c) == 0  # a writable caller: fine
    assert host_totals(host)["contexts"] == 1


# ---- binding -------------------------------------------------------------------------------------


def _loop_tasks(drv: GuestDriver) -> int:
    async def count() -> int:
        return len([t for t in asyncio.all_tasks() if t is not asyncio.current_task()])

    return drv.rt.run(count(), TIMEOUT)


def test_failed_binds_leave_nothing_running(tmp_path):
    drv = GuestDriver()
    full = Host(HostConfig(adapters=1, max_guests=1))
    squatter = GuestDriver()
    try:
        address = full.listen(str(tmp_path / "full.sock"))
        squatter.bind(address)  # takes the host's only slot
        assert full.wait_for(lambda: len(full.partitions()) == 1, TIMEOUT)
        threads, fds, tasks = threading.active_count(), open_fd_count(), _loop_tasks(drv)
        for _ in range(10):
            with pytest.raises(OSError, match="cannot reach"):
                drv.bind(str(tmp_path / "nobody.sock"), reconnect=False)
            with pytest.raises(ConnectionError, match="max_guests"):
                drv.bind(address, reconnect=False)
        wait_until(lambda: open_fd_count() <= fds)  # the refused sockets too
        assert threading.active_count() == threads
        assert _loop_tasks(drv) == tasks
        assert drv.links() == []
    finally:
        drv.close()
        squatter.close()
        full.close()


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
        bus = drv.bind(path, reconnect=True, wait=True)  # keeps trying in the background
        wait_until(lambda: bus.last_error and "hung up" in bus.last_error)
        t0 = time.monotonic()
        drv.unbind(bus)
        assert time.monotonic() - t0 < 5
        assert drv.links() == []
    finally:
        ls.close()
        drv.close()


def test_adapters_restart_after_the_global_channel_comes_back(pair):
    host, drv = pair
    proc = open_process(drv)
    old = open_adapter(drv, proc)
    session = host.partitions()[0].session
    glob = next(o for o in host.rt.call(session.offers) if o.relid == 1)
    host.rt.call(session.rescind, 1)
    wait_until(lambda: not drv.active_adapters(), 5, "adapters stopped")
    d = uapi.d3dkmt_createdevice()
    d.adapter.v = old
    assert call(drv, proc, uapi.LX_DXCREATEDEVICE, d) == -19  # ENODEV on the old handle
    host.rt.call(session.offer, glob)
    assert drv.wait_for_adapters(2, TIMEOUT)
    create_device(drv, proc, open_adapter(drv, proc))


def test_the_same_host_bound_twice_gives_no_duplicate_luids(pair, tmp_path):
    host, drv = pair
    bus = drv.bind(host.listen(str(tmp_path / "again.sock")))
    # set after every offer's probe has run
    assert drv.wait_for(lambda: bus.offers_delivered.is_set(), TIMEOUT)
    luids = [a.luid for a in drv.active_adapters()]
    assert len(luids) == len(set(luids)) == 2


# ---- abandoned requests ------------------------------------------------------------------------


class HeldHost:
    """Holds back what the guest sends the host: the host's transport stops reading (the
    requests wait in the socket) until released."""

    def __init__(self, host: Host) -> None:
        self.host = host
        (part,) = host.partitions()
        assert part.session is not None
        transport = part.session.conn.transport
        assert isinstance(transport, SocketTransport)
        self.transport = transport

    def __enter__(self) -> "HeldHost":
        self.host.rt.call(self.transport.pause_reading)
        return self

    def __exit__(self, *exc: object) -> None:
        self.host.rt.call(self.transport.resume_reading)


def host_requests(host: Host) -> int:
    (part,) = host.census()["partitions"]
    return part["requests"]


def abandon(drv: GuestDriver, coro_fn: Callable[[], Any], channel_of: Callable[[], Any]) -> None:
    """Start ``coro_fn()`` on the driver's loop, wait until its request is on the wire, then
    cancel the caller, and wait until the cancellation has reached it."""
    cancelled = threading.Event()

    async def caller() -> Any:
        try:
            return await coro_fn()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    channel = drv.rt.call(channel_of)
    pending = drv.rt.call(lambda: channel.pending)
    future = drv.rt.spawn(caller())
    wait_until(lambda: drv.rt.call(lambda: channel.pending) == pending + 1)
    future.cancel()
    assert cancelled.wait(TIMEOUT)
    assert drv.rt.call(lambda: channel.pending) == pending + 1  # its answer is still due


def test_an_abandoned_createdevice_is_undone_on_the_host(pair):
    host, drv = pair
    proc = open_process(drv)
    h = open_adapter(drv, proc)
    create_device(drv, proc, h)  # the process exists on the host now
    assert host_totals(host)["devices"] == 1
    adapter = drv.active_adapters()[0]
    sent = host_requests(host)
    d = uapi.d3dkmt_createdevice()
    d.adapter.v = h
    with HeldHost(host):
        abandon(drv, lambda: drv.ioctl(proc, uapi.LX_DXCREATEDEVICE, bytes(d), SelfMemory()),
                adapter.route)
    # The host creates the device for the request it now reads, the guest undoes it.
    wait_until(lambda: host_requests(host) == sent + 2)  # CREATEDEVICE, then DESTROYDEVICE
    wait_until(lambda: host_totals(host)["devices"] == 1)
    assert len(proc.handles) == 2  # the adapter and the first device: nothing half-made
    create_device(drv, proc, h)  # and the process goes on
    assert host_totals(host)["devices"] == 2


def test_an_abandoned_createprocess_is_undone_on_the_host(pair):
    host, drv = pair
    (link,) = drv.links()
    sent = host_requests(host)
    with HeldHost(host):
        abandon(drv, lambda: vmbus.create_process(link, 0xC00C1E, 4321, "given up"),
                lambda: link.global_channel)
    wait_until(lambda: host_requests(host) == sent + 2)  # CREATEPROCESS, then DESTROYPROCESS
    wait_until(lambda: host_totals(host)["processes"] == 0)
    assert host_totals(host)["handles"] == 2  # the two adapters the guest opened, only


def test_an_abandoned_request_that_failed_on_the_host_needs_no_undo(pair):
    host, drv = pair
    adapter = drv.active_adapters()[0]
    sent = host_requests(host)
    with HeldHost(host):  # no such host process: the host answers with a failure
        abandon(drv, lambda: vmbus.create_device(adapter, 0x40000FC0, 0, 1), adapter.route)
    wait_until(lambda: host_requests(host) == sent + 1)
    assert host_totals(host)["devices"] == 0


def test_a_create_cancelled_just_as_its_reply_arrives_is_undone(pair):
    host, drv = pair
    proc = open_process(drv)
    h = open_adapter(drv, proc)
    create_device(drv, proc, h)
    adapter = drv.active_adapters()[0]
    d = uapi.d3dkmt_createdevice()
    d.adapter.v = h

    async def race() -> str:
        # The caller is cancelled in the same loop turn as its reply is handed to it: the
        # channel has no request left to undo, so the one who was handed it must.
        channel = adapter.route()
        real = channel.request
        caller: asyncio.Future[Any] | None = None

        def request(*args: Any, **kw: Any) -> Any:
            reply = real(*args, **kw)
            reply.add_done_callback(lambda _f: caller.cancel())  # before the caller wakes
            return reply

        channel.request = request
        try:
            caller = asyncio.ensure_future(
                drv.ioctl(proc, uapi.LX_DXCREATEDEVICE, bytes(d), SelfMemory()))
            try:
                await caller
            except asyncio.CancelledError:
                return "cancelled"
            return "finished"
        finally:
            del channel.request

    assert drv.rt.run(race(), TIMEOUT) == "cancelled"
    wait_until(lambda: host_totals(host)["devices"] == 1)  # the second device was undone
    assert len(proc.handles) == 2


def test_a_caller_giving_up_on_createprocess_fails_no_one_else(pair):
    from dxg.guest.process import host_process

    host, drv = pair
    proc = open_process(drv)
    (link,) = drv.links()
    channel = drv.rt.call(lambda: link.global_channel)
    pending = drv.rt.call(lambda: channel.pending)
    gave_up = threading.Event()

    async def impatient() -> int:
        try:
            return await host_process(proc, link)
        except asyncio.CancelledError:
            gave_up.set()
            raise

    with HeldHost(host):
        first = drv.rt.spawn(impatient())
        second = drv.rt.spawn(host_process(proc, link))  # shares the first's CREATEPROCESS
        wait_until(lambda: drv.rt.call(lambda: channel.pending) == pending + 1)
        first.cancel()
        assert gave_up.wait(TIMEOUT)
    handle = second.result(TIMEOUT)
    assert handle and host_totals(host)["processes"] == 1
    assert drv.rt.run(host_process(proc, link), TIMEOUT) == handle  # kept for later calls
    close_process(drv, proc)
    wait_until(lambda: host_totals(host)["processes"] == 0)
