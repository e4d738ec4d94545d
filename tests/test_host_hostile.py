"""The host against hostile or broken guests, on real sockets: a guest that never reads, peers
that never say HELLO, too many peers, running out of descriptors, and guests that try to pin
host memory."""

import asyncio
import contextlib
import errno
import gc
import logging
import os
import resource
import select
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator

import pytest

from dxg.host import Host, HostConfig, Partition
from dxg.host.partition import OBJECT_BYTES
from dxg.protocol.bus import (
    BUS_VERSIONS_SUPPORTED,
    DXGK_VMBUS_INTERFACE_VERSION,
    AllOffersDelivered,
    BusMessage,
    Hello,
    Offer,
    OpenChannel,
    OpenResult,
    Refuse,
    VersionResponse,
    decode_bus_message,
    encode_bus_message,
)
from dxg.protocol.commands import VgpuCommand
from dxg.protocol.framing import (
    CONTROL_RELID,
    FLAG_COMPLETION_REQUESTED,
    VM_PKT_DATA_INBAND,
    Frame,
    FrameReader,
    encode_frame,
)
from dxg.protocol.guids import DXGK_VGPU_GUID
from dxg.protocol.headers import encode_vgpu
from dxg.protocol.messages import QueryAdapterInfo
from dxg.runtime.loop import LoopThread
from dxg.uapi import NTSTATUS
from dxg.uapi.handles import HandleType
from dxg.vmbus.bus import BusError
from dxg.vmbus.transport import Listener, SocketTransport, TransportClosed
from test_host import TIMEOUT, RawGuest, wait_until

OK = NTSTATUS.STATUS_SUCCESS
log = logging.getLogger(__name__)


class RawPeer:
    """A guest written by hand on a bare blocking socket: it speaks the bus only as far as told
    to."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(address.removeprefix("unix:"))
        self.reader = FrameReader()
        self.pending: list[Frame] = []  # control frames read but not yet taken
        self.offers: list[Offer] = []
        self.flooder: threading.Thread | None = None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        if self.flooder is not None:
            self.flooder.join(TIMEOUT)
        self.sock.close()

    def send_control(self, msg: BusMessage) -> None:
        self.sock.sendall(encode_frame(CONTROL_RELID, VM_PKT_DATA_INBAND,
                                       encode_bus_message(msg)))

    def next_control(self, timeout: float = TIMEOUT) -> BusMessage | None:
        """The next control message, or None once the host has hung up."""
        deadline = time.monotonic() + timeout
        while True:
            self.pending += [f for f in self.reader.frames() if f.relid == CONTROL_RELID]
            if self.pending:
                return decode_bus_message(self.pending.pop(0).payload)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no control message before the deadline")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 16)
            except ConnectionResetError:
                data = b""
            finally:
                self.sock.settimeout(None)
            if not data:
                return None
            self.reader.feed(data)

    def hung_up(self, timeout: float = TIMEOUT) -> bool:
        """Read (and drop) whatever comes until the host closes the connection."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                if not self.sock.recv(1 << 16):
                    return True
            except TimeoutError:
                return False
            except ConnectionResetError:
                return True
            finally:
                self.sock.settimeout(None)
        return False

    def handshake(self) -> None:
        self.send_control(Hello(BUS_VERSIONS_SUPPORTED, "raw-peer"))
        reply = self.next_control()
        assert isinstance(reply, VersionResponse) and reply.accepted
        while not isinstance(msg := self.next_control(), AllOffersDelivered):
            assert isinstance(msg, Offer)
            self.offers.append(msg)

    def offer(self, type_guid: object) -> Offer:
        return next(o for o in self.offers if o.type_guid == type_guid)

    def open_all(self) -> None:
        for o in self.offers:
            version = DXGK_VMBUS_INTERFACE_VERSION if o.type_guid == DXGK_VGPU_GUID else 0
            self.send_control(OpenChannel(o.relid, 0, version))
        for _ in self.offers:
            result = self.next_control()
            assert isinstance(result, OpenResult) and result.status == 0

    def flood_and_never_read(self) -> None:
        """Send big QUERYADAPTERINFO requests (each answered with ~120 KB) from a thread, and
        never read a byte of the answers."""
        vgpu = self.offer(DXGK_VGPU_GUID)
        body = QueryAdapterInfo(0, bytes(120_000)).pack()
        frame = encode_frame(vgpu.relid, VM_PKT_DATA_INBAND,
                             encode_vgpu(VgpuCommand.QUERYADAPTERINFO, 0, vgpu.host_vgpu_luid,
                                         body), 1, FLAG_COMPLETION_REQUESTED)

        def flood() -> None:
            try:
                for _ in range(300):
                    self.sock.sendall(frame)
            except OSError:
                pass  # the host dropped us, or the test closed the socket

        self.flooder = threading.Thread(target=flood, name="raw-flooder", daemon=True)
        self.flooder.start()


def stuck_guest(host: Host, address: str) -> tuple[RawPeer, Partition]:
    """A guest that completes the handshake, opens its channels, then floods requests and reads
    nothing: returned once the host has replies for it that it does not take."""
    before = {p.id for p in host.partitions()}
    peer = RawPeer(address)
    peer.handshake()
    peer.open_all()
    assert host.wait_for(lambda: len(host.partitions()) == len(before) + 1, TIMEOUT)
    (partition,) = [p for p in host.partitions() if p.id not in before]
    # Everything the host sent so far has been read. Shrink the host's send buffer so that one
    # ~120 KB reply cannot fit: once its first bytes arrive, the rest waits in the host's buffer.
    assert partition.session is not None
    transport = partition.session.conn.transport
    assert isinstance(transport, SocketTransport)
    transport.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer.flood_and_never_read()
    wait_until(lambda: bool(select.select([peer.sock], [], [], 0)[0]))
    wait_until(lambda: host.rt.call(lambda: transport.buffered > 0))
    return peer, partition


@pytest.fixture
def sock_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield os.path.join(str(tmp_path_factory.mktemp("hh")), "host.sock")


# ---- a guest that never reads --------------------------------------------------------------------


def test_guest_that_never_reads_cannot_hold_up_removal_or_close(sock_path: str) -> None:
    # A long send timeout: the stuck guest stays stuck for the whole test.
    host = Host(HostConfig(adapters=2, send_timeout=60.0))
    address = host.listen(sock_path)
    stuck = good = None
    try:
        stuck, stuck_partition = stuck_guest(host, address)  # first: it is rescinded first
        good = RawGuest(address, name="good")
        wait_until(lambda: len(good.driver.vgpus) == 2)
        # The other guest is served while one is stuck.
        hp = good.create_process()
        assert good.open_adapter(0).status == OK
        assert good.create_device(0, hp)

        # Sending never blocks the host: the removal returns, and its rescind reaches the good
        # guest, while the stuck guest's rescind waits in its buffer.
        host.remove_adapter(1)
        wait_until(lambda: good.driver.removed == [host.adapters[1].instance_guid], timeout=3.0)
        assert not stuck_partition.closed
        assert stuck_partition.signal_guest_event(5)  # queued for it, not waited for

        started = time.monotonic()
        host.close()
        assert time.monotonic() - started < 8.0
        assert stuck_partition.closed and host.closed
        wait_until(lambda: not good.connected)
        assert stuck.hung_up()
    finally:
        host.close()
        for g in (good, stuck):
            if g is not None:
                g.close()


def test_guest_that_never_reads_is_dropped_after_the_send_timeout(sock_path: str) -> None:
    host = Host(HostConfig(adapters=1, send_timeout=0.5))
    address = host.listen(sock_path)
    stuck = good = None
    try:
        good = RawGuest(address, name="good")
        wait_until(lambda: len(good.driver.vgpus) == 1)
        (good_partition,) = host.partitions()
        stuck, stuck_partition = stuck_guest(host, address)

        # The host gives up on the guest that does not read; the other one is unaffected.
        assert host.wait_for(lambda: host.partitions() == [good_partition], TIMEOUT)
        assert stuck_partition.closed
        assert stuck.hung_up()
        assert stuck_partition.signal_guest_event(5) is False  # nothing left to send it on
        assert good.create_process()
        assert good_partition.signal_guest_event(6)
        wait_until(lambda: len(good.driver.notifications) == 1)
        started = time.monotonic()
        host.close()
        assert time.monotonic() - started < 8.0
    finally:
        host.close()
        for g in (good, stuck):
            if g is not None:
                g.close()


@pytest.mark.parametrize("limit", ["buffer", "stall"])
def test_a_peer_that_stops_reading_is_dropped_by_its_transport(limit: str) -> None:
    """What the host sends a guest is bounded twice: by bytes waiting (max_buffer) and by time
    without progress (send_timeout); either drops the connection, and writing never blocks."""
    rt = LoopThread("stop-reading")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    lost: list[BaseException | None] = []

    class Receiver:
        def data_received(self, data: bytes, fds: list[int]) -> None:
            pass

        def connection_lost(self, error: BaseException | None) -> None:
            lost.append(error)

    kw = {"max_buffer": 1 << 20, "send_timeout": 60.0} if limit == "buffer" else \
        {"max_buffer": 1 << 30, "send_timeout": 0.2}
    try:
        transport = rt.call(lambda: SocketTransport(rt.loop, ours, "stops-reading", **kw))
        rt.call(transport.start, Receiver())
        chunk = bytes(64 * 1024)

        def fill() -> int:
            written = 0
            with contextlib.suppress(TransportClosed):
                for _ in range(64):  # 4 MiB: past the buffer limit, past any socket buffer
                    transport.write(chunk)
                    written += len(chunk)
            return written

        written = rt.call(fill)
        wait_until(lambda: lost)
        (error,) = lost
        assert isinstance(error, ConnectionError)
        if limit == "buffer":
            # dropped once the socket's own buffer and max_buffer were full, not later
            assert error.errno == errno.ENOBUFS and written < 64 * len(chunk)
        else:
            assert error.errno == errno.ETIMEDOUT and written == 64 * len(chunk)
        assert rt.call(lambda: transport.closed and transport.buffered == 0)
        with pytest.raises(TransportClosed):
            rt.call(transport.write, b"more")
    finally:
        rt.close()
        theirs.close()
        ours.close()


# ---- connection limits --------------------------------------------------------------------------


def test_peers_that_do_not_complete_the_handshake_are_dropped(sock_path: str) -> None:
    host = Host(HostConfig(adapters=1, handshake_timeout=0.5))
    address = host.listen(sock_path)
    good = silent = stranger = None
    try:
        good = RawGuest(address, name="good")
        silent = RawPeer(address)  # connects, says nothing
        stranger = RawPeer(address)  # says HELLO in no version the host speaks
        stranger.send_control(Hello((0x7FFF0000,), "from-the-future"))
        reply = stranger.next_control()
        assert isinstance(reply, VersionResponse) and not reply.accepted

        assert silent.hung_up() and stranger.hung_up()
        assert host.wait_for(lambda: len(host.partitions()) == 1, TIMEOUT)
        # The guest that did complete the handshake is past its deadline too, and still served.
        assert good.connected and good.create_process()
    finally:
        host.close()
        for g in (good, silent, stranger):
            if g is not None:
                g.close()


def test_connections_beyond_max_guests_are_refused_with_a_reason(sock_path: str) -> None:
    host = Host(HostConfig(adapters=1, max_guests=2, name="full-host"))
    address = host.listen(sock_path)
    guests: list[RawGuest] = []
    extra = None
    try:
        guests = [RawGuest(address, name=f"g{i}") for i in range(2)]
        assert host.wait_for(lambda: len(host.partitions()) == 2, TIMEOUT)
        extra = RawPeer(address)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            extra.send_control(Hello(BUS_VERSIONS_SUPPORTED, "one-too-many"))
        refusal = extra.next_control()
        assert isinstance(refusal, Refuse) and "max_guests" in refusal.reason
        assert extra.next_control() is None  # and hung up: no version, no offers
        assert host.census()["refused_connections"] == 1
        assert len(host.partitions()) == 2
        assert all(g.create_process() for g in guests)

        # A guest driver's bus says why it was turned away.
        with pytest.raises(BusError, match=r"refused this guest.*full-host.*max_guests"):
            RawGuest(address, name="refused")
        assert host.census()["refused_connections"] == 2

        guests.pop().close()  # a slot comes free
        assert host.wait_for(lambda: len(host.partitions()) == 1, TIMEOUT)
        guests.append(RawGuest(address, name="late"))
        assert guests[-1].create_process()
    finally:
        host.close()
        for g in guests:
            g.close()
        if extra is not None:
            extra.close()


# ---- accept errors ------------------------------------------------------------------------------


def test_accepting_survives_running_out_of_descriptors(
    sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dxg.vmbus.transport")
    host = Host(HostConfig(adapters=1))
    address = host.listen(sock_path)
    (listener,) = host._listeners
    peers = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(4)]
    fillers: list[int] = []
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        # No descriptor number left below the limit: the host's accept() fails with EMFILE.
        top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1, hard))
        while True:
            try:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as e:
                assert e.errno == errno.EMFILE
                break
        for p in peers:  # connect() and send() need no new descriptor on this side
            p.connect(address.removeprefix("unix:"))
            p.sendall(encode_frame(CONTROL_RELID, VM_PKT_DATA_INBAND,
                                   encode_bus_message(Hello(BUS_VERSIONS_SUPPORTED, "p"))))
        wait_until(lambda: "cannot accept" in caplog.text)
        assert not listener._closed
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        # Descriptors are back: the listener's back-off ends, the waiting peers are accepted
        # and answered.
        assert host.wait_for(lambda: len(host.partitions()) == len(peers), TIMEOUT)
        for p in peers:
            reader = FrameReader()
            p.settimeout(TIMEOUT)
            while not (frames := reader.frames()):
                reader.feed(p.recv(1 << 16))
            reply = decode_bus_message(frames[0].payload)
            assert isinstance(reply, VersionResponse) and reply.accepted
        assert f"accepting on unix:{sock_path} again" in caplog.text
        assert caplog.text.count("cannot accept") == 1  # logged once, not per retry
    finally:
        host.close()
        for p in peers:
            p.close()
    assert listener._closed and not os.path.exists(sock_path)


class _ScriptedSocket:
    """Stands in for a listening socket: accept() raises or returns what it is told to; the
    rest (the descriptor the loop watches, close) is the real listening socket's."""

    def __init__(self, real: socket.socket,
                 script: list[OSError | tuple[socket.socket, str]]) -> None:
        self.real = real
        self.script = script

    def accept(self) -> tuple[socket.socket, str]:
        if not self.script:
            raise BlockingIOError(errno.EAGAIN, "nothing scripted")
        step = self.script.pop(0)
        if isinstance(step, OSError):
            raise step
        return step

    def fileno(self) -> int:
        return self.real.fileno()

    def close(self) -> None:
        self.real.close()


def test_accept_errors_are_retried_and_only_a_dead_listener_stops_it(
    sock_path: str, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="dxg.vmbus.transport")
    host_end, guest_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    script: list[OSError | tuple[socket.socket, str]] = [
        OSError(errno.ECONNABORTED, "aborted"),
        OSError(errno.ENOBUFS, "no buffers"),
        OSError(errno.ENOBUFS, "no buffers"),
        OSError(errno.ENFILE, "file table full"),
        (host_end, "scripted-peer"),
        OSError(errno.EBADF, "gone"),
    ]
    host = Host(HostConfig(adapters=1))
    listener = None
    try:
        # A listener of the host's, as listen() makes it, whose accept() follows the script.
        listener = host.rt.call(lambda: Listener(host.loop, sock_path, host._accepted,
                                                 name="scripted"))
        listener.sock = _ScriptedSocket(listener.sock, script)  # type: ignore[assignment]
        host.rt.call(listener._accept)
        wait_until(lambda: not script)  # the back-offs retried until the script ran out
        wait_until(lambda: "no longer accepting" in caplog.text)
        assert caplog.text.count("cannot accept") == 2  # ENOBUFS once, then ENFILE
        assert "accepting on" in caplog.text and "again" in caplog.text
        assert listener.accepted == 1
        # The connection that did come through is a guest like any other.
        guest_end.sendall(encode_frame(CONTROL_RELID, VM_PKT_DATA_INBAND,
                                       encode_bus_message(Hello(BUS_VERSIONS_SUPPORTED, "s"))))
        assert host.wait_for(lambda: len(host.partitions()) == 1, TIMEOUT)
    finally:
        if listener is not None:
            host.rt.call(listener.close)
        host.close()
        guest_end.close()


# ---- memory a guest can pin ---------------------------------------------------------------------


def test_context_private_data_is_echoed_not_kept(sock_path: str) -> None:
    with Host(HostConfig(adapters=1)) as host:
        g = RawGuest(host.listen(sock_path))
        try:
            wait_until(lambda: len(g.driver.vgpus) == 1)
            hp = g.create_process()
            g.open_adapter(0)
            dev = g.create_device(0, hp)
            priv = bytes(range(256)) * 400  # 100 KiB
            reply = g.create_context(0, hp, dev, priv=priv)
            assert reply.context and reply.priv_drv_data == priv
            (ctx,) = host.census()["partitions"][0]["processes"][0]["devices"][0]["contexts"]
            assert ctx["priv_drv_data_size"] == len(priv)

            # Traced from before a few warm-up requests, so that the receive buffers the bus
            # readers hold between requests are counted at both ends of the measurement.
            count = 100
            tracemalloc.start()
            try:
                for _ in range(5):
                    assert g.create_context(0, hp, dev, priv=priv).context
                gc.collect()
                before = tracemalloc.get_traced_memory()[0]
                for _ in range(count):
                    assert g.create_context(0, hp, dev, priv=priv).context
                gc.collect()
                grown = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
            assert host.census()["totals"]["contexts"] == count + 6
            assert grown < count * 8192, f"{grown} bytes for {count} contexts"
        finally:
            g.close()


def test_partition_memory_budget(sock_path: str) -> None:
    fixed = OBJECT_BYTES[HandleType.PROCESS] + OBJECT_BYTES[HandleType.ADAPTER] \
        + OBJECT_BYTES[HandleType.DEVICE]
    budget = fixed + 3 * OBJECT_BYTES[HandleType.CONTEXT]
    with Host(HostConfig(adapters=1, max_partition_bytes=budget)) as host:
        g = RawGuest(host.listen(sock_path))
        try:
            wait_until(lambda: len(g.driver.vgpus) == 1)
            hp = g.create_process()
            g.open_adapter(0)
            dev = g.create_device(0, hp)
            contexts = [g.create_context(0, hp, dev).context for _ in range(3)]
            assert all(contexts)
            (part,) = host.census()["partitions"]
            assert part["pinned_bytes"] == budget
            assert g.create_context(0, hp, dev).context == 0  # over budget: refused
            assert g.create_device(0, hp) == 0
            assert g.create_process() == 0
            assert g.destroy_context(0, hp, contexts[0]) == OK
            assert g.create_context(0, hp, dev).context  # room again
            assert g.destroy_process(hp) == OK
            assert host.census()["partitions"][0]["pinned_bytes"] == OBJECT_BYTES[
                HandleType.ADAPTER]
        finally:
            g.close()
        assert host.wait_for(lambda: not host.partitions(), TIMEOUT)


@pytest.mark.parametrize("bad", [
    {"adapters": -1}, {"adapters": 65}, {"offer_order": "random"},
    {"dedicated_memory_mb": -1}, {"max_handles_per_partition": 0},
    {"max_guests": 0}, {"handshake_timeout": 0}, {"handshake_timeout": float("nan")},
    {"send_timeout": 0}, {"send_timeout": 7200}, {"send_timeout": float("nan")},
    {"max_partition_bytes": 0},
    {"backend_workers": 0}, {"backend_workers": 2000},
    {"max_message_bytes": 1000}, {"max_message_bytes": (8 << 20) - 1},
    {"max_message_bytes": 1 << 33},
    {"max_region_bytes": 0},
    {"max_objects_per_process": 0}, {"max_process_bytes": 0},
])
def test_config_validation_of_the_limits(bad: dict) -> None:
    with pytest.raises(ValueError):
        Host(HostConfig(**bad))


def test_config_limits_at_their_bounds_are_accepted() -> None:
    for good in ({"backend_workers": 1}, {"max_message_bytes": 8 << 20},
                 {"send_timeout": 0.001}, {"max_region_bytes": 1}, {"adapters": 0}):
        Host(HostConfig(**good)).close()


def test_a_host_on_a_loop_of_its_owners_leaves_the_loop_running() -> None:
    rt = LoopThread("owner")
    try:
        host = Host(HostConfig(adapters=1), loop=rt)
        host.close()
        assert not rt.closed
        assert rt.run(asyncio.sleep(0, "still running")) == "still running"
    finally:
        rt.close()
