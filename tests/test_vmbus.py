"""dxg.vmbus on its event loops: offers, probe/remove, request ids, rescind, reconnect, file
descriptors and bulk attachments beside messages, hostile frames, heartbeats; over Unix sockets,
TCP and the in-process loopback (across two loops and on one)."""

import asyncio
import concurrent.futures
import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence

import pytest

from dxg.oslib.fds import close_all, open_fd_count, send_with_fds
from dxg.oslib.memfd import SharedMemory, memfd_from_bytes
from dxg.protocol.bus import (
    BUS_VERSION_2_0,
    AllOffersDelivered,
    BusMessage,
    Hello,
    Offer,
    OpenChannel,
    OpenResult,
    Ping,
    Pong,
    Rescind,
    VersionResponse,
    decode_bus_message,
    encode_bus_message,
)
from dxg.protocol.errors import ProtocolError
from dxg.protocol.framing import (
    CONTROL_RELID,
    DXG_MAX_VM_BUS_PACKET_SIZE,
    FLAG_HAS_BULK,
    FRAME_HEADER,
    MAGIC,
    VM_PKT_BULK,
    VM_PKT_COMP,
    VM_PKT_DATA_INBAND,
    FrameReader,
    Gather,
    bulk_announcement,
    encode_frame,
    frame_flags,
)
from dxg.protocol.guids import DXGK_GLOBAL_GUID, DXGK_VGPU_GUID
from dxg.runtime.loop import LoopThread
from dxg.runtime.tasks import TaskSet
from dxg.vmbus.bus import BusDevice, GuestBus, HostBusSession
from dxg.vmbus.channel import Channel, ChannelClosed, Packet
from dxg.vmbus.connection import MAX_MESSAGE
from dxg.vmbus.transport import (
    Listener,
    LoopbackTransport,
    SocketTransport,
    Transport,
    TransportError,
    connect,
)

TIMEOUT = 10.0


def wait_until(pred: Callable[[], object], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.002)


def fds_of(name: str) -> int:
    """This process's descriptors of memfds named ``name`` (a leak count that other tests'
    descriptors, coming and going, cannot disturb)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:{name} "):
                count += 1
    return count


def offers(order: str = "global-first") -> list[Offer]:
    g = Offer(1, DXGK_GLOBAL_GUID, uuid.uuid4(), mmio_megabytes=64)
    v = [Offer(i, DXGK_VGPU_GUID, uuid.uuid4(), interface_version=40) for i in (2, 3)]
    return [g, *v] if order == "global-first" else [*v, g]


# ---- the host end: a bus that echoes -------------------------------------------------------------


class EchoHost:
    """Host bus sessions on ``rt`` whose channels answer by the request's first bytes:

    - ``block...``: once ``open_gate()`` is called (until then it stays pending on the host)
    - ``memfd``: a new shared-memory region of the host's, as a descriptor
    - ``fdpass``: closes the descriptors it got, answers ``ok`` with a descriptor of its own
    - ``readfd``: reads the descriptor it got, writes ``HOST`` at its start, answers
      ``read:`` + what it read
    - anything else: ``echo:`` + the payload (bulk both ways when it is long)
    """

    def __init__(self, rt: LoopThread, address: str | None, offer_list: list[Offer],
                 max_message: int = MAX_MESSAGE) -> None:
        self.rt = rt
        self.offers = offer_list
        self.max_message = max_message
        self.sessions: list[HostBusSession] = []
        self.requests: list[tuple[bytes, bool, int]] = []  # (head of payload, wants, fds)
        self.shared: list[SharedMemory] = []
        self.listener: Listener | None = None
        self.fixed = SharedMemory(4096, "echo-fixed")
        self.tasks = TaskSet("echo host")
        self.gate: asyncio.Event = rt.call(asyncio.Event)
        if address is not None:
            self.listener = rt.call(Listener, rt.loop, address, self._accepted)
            rt.call(self.listener.start)

    @property
    def address(self) -> str:
        assert self.listener is not None
        return str(self.listener.address)

    def open_gate(self) -> None:
        self.rt.call(self.gate.set)

    def _accepted(self, sock: socket.socket, peer: str) -> None:
        self.admit(SocketTransport(self.rt.loop, sock, peer))

    def admit(self, transport: Transport) -> None:
        """A new guest connection (on the host's loop)."""
        session = HostBusSession(self.rt.loop, transport, self, list(self.offers), "echo-host",
                                 self.max_message)
        self.sessions.append(session)
        session.start()

    # HostBusHandler
    def channel_opened(self, session: HostBusSession, channel: Channel,
                       msg: OpenChannel) -> int:
        channel.on_request = self._on_request
        return 0

    def channel_closed(self, session: HostBusSession, channel: Channel) -> None:
        pass

    def session_closed(self, session: HostBusSession) -> None:
        pass

    def _on_request(self, ch: Channel, packet: Packet) -> None:
        fds = packet.take_fds()
        payload = packet.payload
        self.requests.append((payload[:16], packet.wants_completion, len(fds)))
        if not packet.wants_completion:
            close_all(fds)
            return
        trans_id = packet.trans_id
        try:
            if payload.startswith(b"block"):
                self.tasks.spawn(self._when_open(ch, trans_id, payload))
            elif payload == b"memfd":
                mem = SharedMemory(4096, "echo-region")
                mem.write(0, b"from the host")
                self.shared.append(mem)
                ch.complete(trans_id, b"memfd", [mem.fd])
            elif payload == b"fdpass":
                ch.complete(trans_id, b"ok" if len(fds) == 1 else b"no fd", [self.fixed.fd])
            elif payload == b"readfd":
                got = os.pread(fds[0], 64, 0)
                os.pwrite(fds[0], b"HOST", 0)
                ch.complete(trans_id, b"read:" + got)
            else:
                ch.complete(trans_id, b"echo:" + payload)
        finally:
            close_all(fds)

    async def _when_open(self, ch: Channel, trans_id: int, payload: bytes) -> None:
        await self.gate.wait()
        ch.complete(trans_id, b"echo:" + payload)

    def close(self) -> None:
        def close() -> None:
            if self.listener is not None:
                self.listener.close()
            for s in self.sessions:
                s.close()
            self.tasks.cancel()

        if not self.rt.closed:
            self.rt.call(close)
        for mem in self.shared:
            mem.close()
        self.fixed.close()


# ---- the guest end -----------------------------------------------------------------------------


class RecordingDriver:
    id_table = (DXGK_GLOBAL_GUID, DXGK_VGPU_GUID)

    def __init__(self) -> None:
        self.probed: list[BusDevice] = []
        self.removed: list[BusDevice] = []

    async def probe(self, dev: BusDevice) -> bool:
        await dev.open()
        self.probed.append(dev)
        return True

    async def remove(self, dev: BusDevice) -> None:
        self.removed.append(dev)


class Guest:
    """A GuestBus with a RecordingDriver on ``rt``; requests are awaited there."""

    def __init__(self, rt: LoopThread, bus: GuestBus, drv: RecordingDriver) -> None:
        self.rt = rt
        self.bus = bus
        self.drv = drv

    def channel(self, relid: int) -> Channel:
        dev = next(d for d in self.drv.probed if d.offer.relid == relid)
        assert dev.channel is not None
        return dev.channel

    def request(self, ch: Channel, payload: bytes, fds: Sequence[int] = ()) -> Packet:
        async def go() -> Packet:
            return await ch.request(payload, fds)

        return self.rt.run(go(), TIMEOUT)

    def start_request(self, ch: Channel, payload: bytes) -> concurrent.futures.Future[Packet]:
        async def go() -> Packet:
            return await ch.request(payload)

        return self.rt.spawn(go())

    def close(self) -> None:
        if not self.rt.closed:
            self.rt.run(self.bus.close(), TIMEOUT)


def start_guest(rt: LoopThread, dial: str | Callable[[], object], reconnect: bool = False,
                **bus_kw: object) -> Guest:
    """A GuestBus bound to an address (or a dialler) with a RecordingDriver, connected."""
    drv = RecordingDriver()

    async def start() -> GuestBus:
        loop = asyncio.get_running_loop()
        if isinstance(dial, str):
            address = dial

            async def dialler() -> Transport:
                return await connect(loop, address)
        else:
            dialler = dial  # type: ignore[assignment]
        bus = GuestBus(loop, dialler, "test-host", reconnect=reconnect, **bus_kw)  # type: ignore[arg-type]
        bus.register_driver(drv)
        await bus.start(wait=False)
        return bus

    return Guest(rt, rt.run(start(), TIMEOUT), drv)


@pytest.fixture
def host_rt() -> Iterator[LoopThread]:
    rt = LoopThread("test-host")
    yield rt
    rt.close()


@pytest.fixture
def guest_rt() -> Iterator[LoopThread]:
    rt = LoopThread("test-guest")
    yield rt
    rt.close()


@contextlib.contextmanager
def linked(kind: str, host_rt: LoopThread, guest_rt: LoopThread, tmp_path,
           order: str = "global-first", **bus_kw: object) -> Iterator[tuple[EchoHost, Guest]]:
    """An EchoHost and a connected Guest over a ``kind`` of link: unix, tcp, loopback (host and
    guest on two loops) or loopback-one-loop (both on the host's loop)."""
    if kind in ("unix", "tcp"):
        address = str(tmp_path / "h.sock") if kind == "unix" else "tcp:127.0.0.1:0"
        host = EchoHost(host_rt, address, offers(order))
        dial: str | Callable[[], object] = host.address
        rt = guest_rt
    else:
        host = EchoHost(host_rt, None, offers(order))
        rt = host_rt if kind == "loopback-one-loop" else guest_rt

        async def dial_loopback() -> Transport:
            host_end, guest_end = LoopbackTransport.pair(host_rt.loop, rt.loop, "guest", "host")
            host_rt.call_soon(host.admit, host_end)
            return guest_end

        dial = dial_loopback
    guest = None
    try:
        guest = start_guest(rt, dial, **bus_kw)
        wait_until(lambda: len(guest.drv.probed) == 3)
        yield host, guest
    finally:
        if guest is not None:
            guest.close()
        host.close()


LINKS = ["unix", "tcp", "loopback", "loopback-one-loop"]
FD_LINKS = ["unix", "loopback", "loopback-one-loop"]


# ---- offers, probe, requests ---------------------------------------------------------------------


@pytest.mark.parametrize("order", ["global-first", "vgpu-first"])
@pytest.mark.parametrize("kind", LINKS)
def test_offers_probe_and_requests(host_rt, guest_rt, tmp_path, order, kind):
    with linked(kind, host_rt, guest_rt, tmp_path, order) as (_host, guest):
        assert guest.bus.offers_delivered.is_set() and guest.bus.host_name == "echo-host"
        assert guest.bus.version == BUS_VERSION_2_0
        types = [d.type_guid for d in guest.drv.probed]
        assert types[0] == (DXGK_GLOBAL_GUID if order == "global-first" else DXGK_VGPU_GUID)
        ch = guest.drv.probed[0].channel
        assert ch is not None

        async def many() -> list[bytes]:
            # All in flight on the one channel at once, each with its own trans_id ...
            futures = [ch.request(f"f{i}".encode()) for i in range(64)]
            # (on one loop the in-process host answers each before request() returns)
            assert ch.pending == (0 if kind == "loopback-one-loop" else 64)
            packets = await asyncio.gather(*futures)
            assert len({p.trans_id for p in packets}) == 64
            # ... and as many tasks, each awaiting its own.
            async def one(i: int) -> bytes:
                return (await ch.request(f"t{i}".encode())).payload

            tasks = [asyncio.create_task(one(i)) for i in range(64)]
            return [p.payload for p in packets] + await asyncio.gather(*tasks)

        assert guest.rt.run(many(), TIMEOUT) == [f"echo:f{i}".encode() for i in range(64)] + [
            f"echo:t{i}".encode() for i in range(64)]
        assert guest.rt.call(lambda: ch.pending) == 0


def test_a_slow_request_stalls_nothing_else(host_rt, guest_rt, tmp_path):
    with linked("unix", host_rt, guest_rt, tmp_path) as (host, guest):
        blocked = guest.start_request(guest.channel(2), b"block")
        wait_until(lambda: any(r[0] == b"block" for r in host.requests))
        # The host works on it; meanwhile requests on the same channel and on the others are
        # answered (out of order: completions are matched by trans_id).
        assert guest.request(guest.channel(2), b"same").payload == b"echo:same"
        assert guest.request(guest.channel(3), b"other").payload == b"echo:other"
        assert guest.request(guest.channel(1), b"global").payload == b"echo:global"
        assert not blocked.done()
        host.open_gate()
        assert blocked.result(TIMEOUT).payload == b"echo:block"


def test_rescind_fails_pending_and_removes(host_rt, guest_rt, tmp_path):
    with linked("unix", host_rt, guest_rt, tmp_path) as (host, guest):
        vgpu = next(d for d in guest.drv.probed if d.offer.relid == 3)
        ch = guest.channel(3)
        blocked = guest.start_request(ch, b"block")
        wait_until(lambda: guest.rt.call(lambda: ch.pending) == 1)
        host_rt.call(host.sessions[0].rescind, 3)
        with pytest.raises(ChannelClosed, match="rescinded"):
            blocked.result(TIMEOUT)  # failed at once, not when the host would have answered
        wait_until(lambda: vgpu in guest.drv.removed)  # remove() runs on the bus's work task
        with pytest.raises(ChannelClosed):
            guest.request(ch, b"after")
        assert guest.request(guest.channel(2), b"still").payload == b"echo:still"


def test_a_host_flooding_the_bus_with_control_messages_is_dropped(host_rt, guest_rt,
                                                                   tmp_path):
    with linked("unix", host_rt, guest_rt, tmp_path, max_queued_work=50) as (host, guest):
        bus = guest.bus
        busy = guest.rt.call(asyncio.Event)

        async def slow_work() -> None:  # a probe that takes its time: nothing drains
            await busy.wait()

        guest.rt.call(lambda: bus._work.put_nowait(slow_work))

        def flood() -> None:
            with contextlib.suppress(ConnectionError):  # the guest hangs up part way
                for _ in range(200):  # rescinds of a channel that does not exist
                    host.sessions[0].conn.send_control(Rescind(99))

        host_rt.call(flood)
        # Past 50 waiting to be handled, the guest takes no more and drops the host.
        wait_until(lambda: not guest.rt.call(lambda: bus.up))
        assert guest.rt.call(bus._work.qsize) <= 51
        guest.rt.call(busy.set)
        wait_until(lambda: len(guest.drv.removed) == 3)


def test_offers_are_bounded_at_once_and_over_a_connection(host_rt, guest_rt, tmp_path):
    with linked("unix", host_rt, guest_rt, tmp_path, max_offers=4) as (host, guest):
        bus = guest.bus
        session = host.sessions[0]
        # Three devices are held; a fourth offer fits, a fifth and sixth are ignored...
        busy = guest.rt.call(asyncio.Event)

        async def slow_work() -> None:
            await busy.wait()

        guest.rt.call(lambda: bus._work.put_nowait(slow_work))  # nothing is probed meanwhile
        host_rt.call(lambda: [session.conn.send_control(Offer(relid, uuid.uuid4(), uuid.uuid4()))
                              for relid in (10, 11, 12)])
        wait_until(lambda: guest.rt.call(lambda: bus.ignored_offers) == 2)
        guest.rt.call(busy.set)
        # ... and the one of a type no driver takes is forgotten, not kept.
        wait_until(lambda: guest.rt.call(lambda: (bus._work.qsize(), len(bus.devices())))
                   == (0, 3))
        # Offers that come and go are fine, but not without end: past 16 x max_offers in one
        # connection, the host is dropped.
        def churn() -> None:
            with contextlib.suppress(ConnectionError):
                for relid in range(100, 200):
                    session.conn.send_control(Offer(relid, uuid.uuid4(), uuid.uuid4()))

        host_rt.call(churn)
        wait_until(lambda: len(guest.drv.removed) == 3)
        assert not guest.rt.call(lambda: bus.up)


def test_reconnect_after_host_restart(host_rt, guest_rt, tmp_path):
    addr = str(tmp_path / "h.sock")
    host = EchoHost(host_rt, addr, offers())
    guest = start_guest(guest_rt, addr, reconnect=True)
    try:
        wait_until(lambda: len(guest.drv.probed) == 3)
        assert guest.bus.generation == 1
        host.close()
        wait_until(lambda: len(guest.drv.removed) == 3)
        host = EchoHost(host_rt, addr, offers("vgpu-first"))
        wait_until(lambda: len(guest.drv.probed) == 6)
        assert guest.bus.generation == 2
        assert guest.request(guest.drv.probed[-1].channel, b"again").payload == b"echo:again"
    finally:
        guest.close()
        host.close()


def test_unreachable_host_is_a_clear_error(guest_rt, tmp_path):
    async def attempt() -> int:
        loop = asyncio.get_running_loop()

        async def dial() -> Transport:
            return await connect(loop, str(tmp_path / "nobody.sock"))

        bus = GuestBus(loop, dial, "nobody", reconnect=False)
        with pytest.raises(TransportError, match="cannot reach"):
            await bus.start(wait=False)
        await bus.close()
        return len([t for t in asyncio.all_tasks() if t is not asyncio.current_task()])

    assert guest_rt.run(attempt(), TIMEOUT) == 0  # nothing left running


def test_tcp_transport_copies_and_refuses_descriptors(host_rt, guest_rt, tmp_path):
    with linked("tcp", host_rt, guest_rt, tmp_path) as (host, guest):
        assert host.address.startswith("tcp:127.0.0.1:")
        ch = guest.channel(1)
        assert not ch.can_pass_fds
        assert guest.request(ch, b"tcp").payload == b"echo:tcp"
        fd = memfd_from_bytes(b"x")
        try:
            with pytest.raises(ValueError, match="cannot carry"):
                guest.request(ch, b"readfd", [fd])
        finally:
            os.close(fd)
        assert guest.rt.call(lambda: ch.pending) == 0  # the refused request left nothing behind
        assert guest.request(ch, b"still").payload == b"echo:still"
        # Both ends find a peer that vanished without a word (keepalive), with or without
        # anything to send it.
        for sock in (host.sessions[0].conn.transport.sock, guest.bus._conn.transport.sock):
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30


@pytest.mark.parametrize("kind", ["unix", "loopback"])
def test_fire_and_forget_packets_get_no_completion(host_rt, guest_rt, tmp_path, kind):
    with linked(kind, host_rt, guest_rt, tmp_path) as (host, guest):
        seen: list[tuple[bytes, bool, int]] = []
        ch = guest.channel(1)
        host_ch = host_rt.call(host.sessions[0].conn.channel, ch.relid)

        def on_request(c: Channel, packet: Packet) -> None:
            seen.append((packet.payload, packet.wants_completion, packet.trans_id))
            if packet.wants_completion:
                c.complete(packet.trans_id, b"answered")

        host_ch.on_request = on_request
        guest.rt.call(ch.send_async, b"fire")
        reply = guest.request(ch, b"sync")  # ordered after the fire-and-forget one
        assert reply.payload == b"answered"
        assert seen[0] == (b"fire", False, 0)
        assert seen[1][:2] == (b"sync", True) and seen[1][2] == reply.trans_id != 0
        # and the host's notifications reach the guest's in-band handler
        got: list[bytes] = []
        ch.on_inband = lambda c, p: got.append(p.payload)
        host_rt.call(host_ch.notify, b"note")
        wait_until(lambda: got == [b"note"])


# ---- descriptors beside messages -------------------------------------------------------------------


@pytest.mark.parametrize("kind", FD_LINKS)
def test_descriptors_travel_both_ways(host_rt, guest_rt, tmp_path, kind):
    with linked(kind, host_rt, guest_rt, tmp_path) as (host, guest):
        ch = guest.channel(2)
        assert ch.can_pass_fds
        # host -> guest: a memfd that arrives, maps, and shares its pages with the host's
        reply = guest.request(ch, b"memfd")
        (fd,) = reply.take_fds()
        mem = SharedMemory.adopt(fd, 4096)
        try:
            assert mem.read(0, 13) == b"from the host"
            mem.write(100, b"from the guest")
            assert host.shared[0].read(100, 14) == b"from the guest"
            host.shared[0].write(200, b"and back")
            assert mem.read(200, 8) == b"and back"
        finally:
            mem.close()
        # guest -> host: the host reads the guest's descriptor and writes into it
        fd = memfd_from_bytes(b"guest data")
        try:
            reply = guest.request(ch, b"readfd", [fd])
            assert reply.payload == b"read:guest data" and reply.fds == []
            assert os.pread(fd, 10, 0) == b"HOSTt data"
        finally:
            os.close(fd)
        assert host.requests[-1] == (b"readfd", True, 1)


@pytest.mark.parametrize("kind", FD_LINKS)
def test_descriptors_never_leak(host_rt, guest_rt, tmp_path, kind):
    with linked(kind, host_rt, guest_rt, tmp_path) as (_host, guest):
        ch = guest.channel(2)
        fd = memfd_from_bytes(b"passed 10000 times", "guest-passed")

        async def passes(n: int, at_once: int = 100) -> None:
            async def one() -> None:
                packet = await ch.request(b"fdpass", [fd])
                got = packet.take_fds()
                close_all(got)
                assert packet.payload == b"ok" and len(got) == 1

            for _ in range(n // at_once):
                await asyncio.gather(*(one() for _ in range(at_once)))

        try:
            guest.rt.run(passes(200), TIMEOUT)  # warm up
            before = open_fd_count()
            named = fds_of("guest-passed"), fds_of("echo-fixed")
            assert named[0] == 1
            guest.rt.run(passes(10_000), 60)
            # Each pass put a copy of the guest's memfd on the host, and one of the host's in
            # the guest: every copy is closed again.
            # (the host closes the last copy it got just after answering)
            wait_until(lambda: (fds_of("guest-passed"), fds_of("echo-fixed")) == named)
            assert open_fd_count() <= before
        finally:
            os.close(fd)


# ---- bulk attachments ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", LINKS)
def test_bulk_attachments_both_ways(host_rt, guest_rt, tmp_path, kind):
    with linked(kind, host_rt, guest_rt, tmp_path) as (_host, guest):
        ch = guest.channel(3)
        big = os.urandom((3 << 19) + 7)  # 1.5 MiB and a bit: 13 packets' worth
        reply = guest.request(ch, big)
        assert reply.payload == b"echo:" + big
        # exactly one packet's worth goes without bulk, one byte more with it
        for size in (DXG_MAX_VM_BUS_PACKET_SIZE, DXG_MAX_VM_BUS_PACKET_SIZE + 1):
            body = bytes([size & 0xFF]) * size
            assert guest.request(ch, body).payload == b"echo:" + body
        # bulk and descriptors together
        if kind != "tcp":
            fd = memfd_from_bytes(b"beside")
            try:
                packet = guest.request(ch, big, [fd])
                assert packet.payload == b"echo:" + big
            finally:
                os.close(fd)


@pytest.mark.parametrize("kind", LINKS)
def test_a_reply_is_read_into_the_memory_its_request_names(host_rt, guest_rt, tmp_path, kind):
    """``request(into=...)``: the reply's attachment (its bytes after the first packet's) goes
    straight to that memory when it has exactly its length; the Packet says how much went."""
    with linked(kind, host_rt, guest_rt, tmp_path) as (_host, guest):
        ch = guest.channel(2)
        big = os.urandom((5 << 20) + 3)
        reply = b"echo:" + big
        where = bytearray(len(reply) - DXG_MAX_VM_BUS_PACKET_SIZE)

        async def go(into: memoryview) -> Packet:
            return await ch.request(Gather((big[:7], memoryview(big)[7:])), into=into)

        packet = guest.rt.run(go(memoryview(where)), TIMEOUT)
        assert packet.placed == len(where)
        assert packet.payload == reply[:DXG_MAX_VM_BUS_PACKET_SIZE]
        assert where == reply[DXG_MAX_VM_BUS_PACKET_SIZE:]
        # memory of another length is not used: the reply comes whole
        other = bytearray(len(where) - 1)
        packet = guest.rt.run(go(memoryview(other)), TIMEOUT)
        assert packet.placed == 0 and packet.payload == reply and not any(other)
        # several on their way at once, each to its own memory
        wheres = [bytearray(len(where)) for _ in range(4)]

        async def many() -> list[Packet]:
            return list(await asyncio.gather(*(
                ch.request(big, into=memoryview(w)) for w in wheres)))

        for packet, w in zip(guest.rt.run(many(), TIMEOUT), wheres, strict=True):
            assert packet.placed == len(w) and w == reply[DXG_MAX_VM_BUS_PACKET_SIZE:]
        assert guest.rt.call(lambda: ch._into) == {}


def test_a_socket_reads_a_large_payload_straight_into_its_receivers_buffers(host_rt):
    """A receiver that names buffers (recv_buffers) gets the bytes there, read by the kernel,
    in the order named; one that names none gets data_received as usual."""
    lsock = socket.create_server(("127.0.0.1", 0))  # (TCP: no descriptors, reads go direct)
    a = socket.create_connection(lsock.getsockname())
    b, _ = lsock.accept()
    lsock.close()
    target = bytearray(1 << 20)
    head = bytearray(24)
    got: list[object] = []

    class Direct:
        def __init__(self) -> None:
            self.filled = 0

        def recv_buffers(self) -> list[memoryview] | None:
            if self.filled >= len(target) + len(head):
                return None
            at = self.filled
            if at < len(target):
                return [memoryview(target)[at:], memoryview(head)]
            return [memoryview(head)[at - len(target) :]]

        def buffers_filled(self, n: int) -> None:
            self.filled += n

        def data_received(self, data: bytes, fds: list[int]) -> None:
            got.append(bytes(data))

        def connection_lost(self, error: BaseException | None) -> None:
            got.append(None)

    receiver = Direct()
    transport = host_rt.call(lambda: SocketTransport(host_rt.loop, b, "direct"))
    try:
        host_rt.call(transport.start, receiver)
        payload = os.urandom(len(target) + len(head)) + b"after"
        a.sendall(payload)
        wait_until(lambda: b"".join(x for x in got if x) == b"after")
        assert target == payload[: len(target)] and head == payload[len(target) : -5]
    finally:
        host_rt.call(transport.close)
        a.close()


def test_large_writes_wait_as_views_of_the_callers_buffers(host_rt):
    """writev sends the caller's buffers as they are: what the peer has not taken yet waits as
    views of them (nothing is joined), in order, with a bounded queue as write does."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    data = bytearray(os.urandom(8 << 20))
    transport = host_rt.call(lambda: SocketTransport(host_rt.loop, a, "views"))

    class Quiet:
        def data_received(self, data: bytes, fds: list[int]) -> None:
            pass

        def connection_lost(self, error: BaseException | None) -> None:
            pass

    try:
        host_rt.call(transport.start, Quiet())
        parts = [b"head", memoryview(data)[: 3 << 20], memoryview(data)[3 << 20 :], b"tail"]
        host_rt.call(transport.writev, parts)
        queued = host_rt.call(lambda: transport.buffered)
        assert 0 < queued <= len(data) + 8
        data[-1] ^= 0xFF  # not taken yet: the peer gets the buffer as it is when taken
        want = b"head" + bytes(data) + b"tail"
        b.settimeout(TIMEOUT)
        got = bytearray()
        while len(got) < len(want):
            got += b.recv(1 << 20)
        assert got == want
        wait_until(lambda: host_rt.call(lambda: transport.buffered) == 0)
    finally:
        host_rt.call(transport.close)
        b.close()


def test_a_message_over_max_message_is_refused_by_the_sender(host_rt, guest_rt, tmp_path):
    with linked("unix", host_rt, guest_rt, tmp_path, max_message=1 << 20) as (_host, guest):
        ch = guest.channel(2)
        with pytest.raises(ProtocolError, match="exceeds"):
            guest.request(ch, bytes(2 << 20))
        assert guest.rt.call(lambda: ch.pending) == 0
        assert guest.bus.up
        assert guest.request(ch, bytes(1000 << 10)).payload[:5] == b"echo:"


def test_a_message_over_the_receivers_max_message_drops_the_link(host_rt, guest_rt, tmp_path):
    host = EchoHost(host_rt, str(tmp_path / "h.sock"), offers(), max_message=1 << 20)
    guest = start_guest(guest_rt, host.address)  # the guest would send up to 64 MiB
    try:
        wait_until(lambda: len(guest.drv.probed) == 3)
        ch = guest.channel(2)
        blocked = guest.start_request(guest.channel(3), b"block")
        wait_until(lambda: any(r[0] == b"block" for r in host.requests))
        with pytest.raises(ChannelClosed):
            guest.request(ch, bytes(2 << 20))
        with pytest.raises(ChannelClosed):  # everything pending on the link fails with it
            blocked.result(TIMEOUT)
        wait_until(lambda: len(guest.drv.removed) == 3)
        assert host_rt.call(lambda: host.sessions[0].closed)
    finally:
        guest.close()
        host.close()


# ---- hostile frames ----------------------------------------------------------------------------


def _hdr(length: int, relid: int, ptype: int, flags: int = 0, trans: int = 0,
         magic: int = MAGIC) -> bytes:
    return FRAME_HEADER.pack(magic, length, relid, ptype, flags, trans)


_HELLO = encode_bus_message(Hello((BUS_VERSION_2_0,), "raw"))

# (bytes to send, descriptors to attach to them): each must make the host drop the connection
HOSTILE = {
    "frame claims more descriptors than came": (
        _hdr(3, 2, VM_PKT_DATA_INBAND, frame_flags(True, False, 2), 1) + b"abc", 1),
    "descriptors on the control channel": (
        _hdr(len(_HELLO), CONTROL_RELID, VM_PKT_DATA_INBAND, frame_flags(fds=1)) + _HELLO, 1),
    "bulk chunk with descriptors": (
        _hdr(4, 2, VM_PKT_BULK, frame_flags(fds=1)) + b"bulk", 1),
    "bulk chunk on the control channel": (_hdr(4, CONTROL_RELID, VM_PKT_BULK) + b"bulk", 0),
    "bulk that no packet claims": (
        _hdr(4, 2, VM_PKT_BULK) + b"bulk" + _hdr(1, 2, VM_PKT_DATA_INBAND) + b"x", 0),
    "bulk claimed by a control message": (
        _hdr(4, 2, VM_PKT_BULK) + b"bulk"
        + _hdr(len(_HELLO), CONTROL_RELID, VM_PKT_DATA_INBAND, FLAG_HAS_BULK) + _HELLO, 0),
    "too many descriptors in one frame": (
        _hdr(1, 2, VM_PKT_DATA_INBAND, 17 << 8) + b"x", 0),
    "unknown flag bits": (_hdr(1, 2, VM_PKT_DATA_INBAND, 0x4) + b"x", 0),
    "bad magic": (_hdr(0, 2, VM_PKT_DATA_INBAND, magic=0xDEADBEEF), 0),
    "unknown packet type": (_hdr(0, 2, 7), 0),
    "frame over the packet cap": (_hdr(DXG_MAX_VM_BUS_PACKET_SIZE + 1, 2, 6), 0),
    "undecodable control message": (
        _hdr(5, CONTROL_RELID, VM_PKT_DATA_INBAND) + b"\xff\xff\xff\xff!", 0),
    "more descriptors than a read may bring": (b"\0", 65),
    # bulk chunks say how long their attachment is: they must keep their word
    "bulk chunks that bring more than they announce": (
        _hdr(8, 2, VM_PKT_BULK, trans=bulk_announcement(4)) + b"bulkbulk", 0),
    "bulk chunks that disagree on their attachment": (
        _hdr(2, 2, VM_PKT_BULK, trans=bulk_announcement(4)) + b"bu"
        + _hdr(2, 2, VM_PKT_BULK, trans=bulk_announcement(5)) + b"lk", 0),
    "bulk chunks of two channels": (
        _hdr(2, 2, VM_PKT_BULK, trans=bulk_announcement(4)) + b"bu"
        + _hdr(2, 3, VM_PKT_BULK, trans=bulk_announcement(4)) + b"lk", 0),
    "an attachment announced longer than max_message": (
        _hdr(4, 2, VM_PKT_BULK, trans=bulk_announcement(MAX_MESSAGE)) + b"bulk", 0),
    "a packet that claims an attachment before all of it came": (
        _hdr(2, 2, VM_PKT_BULK, trans=bulk_announcement(4)) + b"bu"
        + _hdr(1, 2, VM_PKT_DATA_INBAND, FLAG_HAS_BULK | 1, 1) + b"x", 0),
    "a packet that claims the attachment of another channel": (
        _hdr(4, 2, VM_PKT_BULK, trans=bulk_announcement(4)) + b"bulk"
        + _hdr(1, 3, VM_PKT_DATA_INBAND, FLAG_HAS_BULK | 1, 1) + b"x", 0),
    "announced bulk that no packet claims": (
        _hdr(4, 2, VM_PKT_BULK, trans=bulk_announcement(4)) + b"bulk"
        + _hdr(1, 2, VM_PKT_DATA_INBAND) + b"x", 0),
}


def _raw_connect(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(address.removeprefix("unix:"))
    sock.settimeout(TIMEOUT)
    return sock


def _hung_up(sock: socket.socket) -> bool:
    """Read (and drop) what comes until the peer closes; False on the deadline."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        try:
            if not sock.recv(1 << 16):
                return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
    return False


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_frames_drop_the_connection_and_leak_nothing(host_rt, tmp_path, case):
    data, nfds = HOSTILE[case]
    host = EchoHost(host_rt, str(tmp_path / "h.sock"), offers())
    sock = _raw_connect(host.address)
    ours = [memfd_from_bytes(b"x", "hostile-sent") for _ in range(nfds)]
    try:
        wait_until(lambda: host_rt.call(lambda: len(host.sessions)) == 1)
        before = open_fd_count()
        send_with_fds(sock, data, ours)
        assert _hung_up(sock)
        session = host.sessions[0]
        wait_until(lambda: host_rt.call(lambda: session.closed))
        # Everything the host received went with the connection, and its socket too.
        wait_until(lambda: fds_of("hostile-sent") == nfds)
        assert open_fd_count() <= before - 1
    finally:
        close_all(ours)
        sock.close()
        host.close()


def test_a_too_long_descriptor_backlog_drops_the_connection(host_rt, tmp_path):
    """Descriptors that no frame claims may not pile up: bytes that never finish a frame, each
    read bringing descriptors, are cut off once more than the connection's allowance wait."""
    host = EchoHost(host_rt, str(tmp_path / "h.sock"), offers())
    sock = _raw_connect(host.address)
    ours = [memfd_from_bytes(b"x", "backlog-sent") for _ in range(40)]
    try:
        wait_until(lambda: host_rt.call(lambda: len(host.sessions)) == 1)
        before = open_fd_count()
        header = _hdr(100, 2, VM_PKT_DATA_INBAND)
        send_with_fds(sock, header[:10], ours)  # 40 waiting, no frame yet: fine
        send_with_fds(sock, header[10:], ours)  # 80: too many
        assert _hung_up(sock)
        wait_until(lambda: fds_of("backlog-sent") == 40)
        assert open_fd_count() <= before - 1
    finally:
        close_all(ours)
        sock.close()
        host.close()


def test_descriptors_for_an_unknown_channel_are_closed_and_the_link_stays(host_rt, tmp_path):
    host = EchoHost(host_rt, str(tmp_path / "h.sock"), offers())
    sock = _raw_connect(host.address)
    fd = memfd_from_bytes(b"x", "for-nobody")
    try:
        wait_until(lambda: host_rt.call(lambda: len(host.sessions)) == 1)
        frame = encode_frame(99, VM_PKT_DATA_INBAND, b"who?", 1,
                             frame_flags(True, False, 1))
        send_with_fds(sock, frame, [fd])
        wait_until(lambda: host_rt.call(lambda: host.sessions[0].conn.packets_in) == 1)
        wait_until(lambda: fds_of("for-nobody") == 1)  # the host's copy was closed
        sock.sendall(encode_frame(CONTROL_RELID, VM_PKT_DATA_INBAND, _HELLO))
        reader = FrameReader()
        while not (frames := reader.frames()):
            reader.feed(sock.recv(1 << 16))
        assert isinstance(decode_bus_message(frames[0].payload), VersionResponse)
        assert not host_rt.call(lambda: host.sessions[0].closed)
    finally:
        os.close(fd)
        sock.close()
        host.close()


# ---- a host that stops answering -----------------------------------------------------------------


class FakeHost:
    """A host written by hand on a thread: it completes the handshake, offers one global channel
    and opens it, then answers nothing: no PONG, no completion. With ``garbage`` it sends that
    in answer to the first request."""

    def __init__(self, path: str, garbage: bytes = b"") -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.path = path
        self.garbage = garbage
        self.seen: list[BusMessage | bytes] = []
        self.hung_up = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _send(self, conn: socket.socket, msg: BusMessage) -> None:
        conn.sendall(encode_frame(CONTROL_RELID, VM_PKT_DATA_INBAND, encode_bus_message(msg)))

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        reader = FrameReader()
        with conn:
            while True:
                try:
                    data = conn.recv(1 << 16)
                except OSError:
                    data = b""
                if not data:
                    self.hung_up.set()
                    return
                reader.feed(data)
                for frame in reader.frames():
                    if frame.relid != CONTROL_RELID:
                        self.seen.append(frame.payload)  # a request: never answered ...
                        if self.garbage:  # ... or with garbage
                            conn.sendall(self.garbage)
                        continue
                    msg = decode_bus_message(frame.payload)
                    self.seen.append(msg)
                    if isinstance(msg, Hello):
                        self._send(conn, VersionResponse(True, BUS_VERSION_2_0, "mute"))
                        self._send(conn, Offer(1, DXGK_GLOBAL_GUID, uuid.uuid4()))
                        self._send(conn, AllOffersDelivered())
                    elif isinstance(msg, OpenChannel):
                        self._send(conn, OpenResult(msg.relid, 0))

    def close(self) -> None:
        self.listener.close()
        self.thread.join(TIMEOUT)


def test_heartbeat_drops_a_host_that_stops_answering(guest_rt, tmp_path):
    fake = FakeHost(str(tmp_path / "mute.sock"))
    guest = start_guest(guest_rt, fake.path, heartbeat_interval=0.05, heartbeat_timeout=0.5)
    try:
        wait_until(lambda: len(guest.drv.probed) == 1)
        started = time.monotonic()
        pending = guest.start_request(guest.channel(1), b"never answered")
        with pytest.raises(ChannelClosed):
            pending.result(TIMEOUT)  # fails when the link is dropped, not later
        assert time.monotonic() - started < 0.5 + 5.0  # within the heartbeat timeout (+ slack)
        wait_until(lambda: guest.drv.removed == guest.drv.probed)
        assert guest.bus.heartbeat_failures == 1 and "silent" in guest.bus.last_error
        assert not guest.bus.up
        assert fake.hung_up.wait(TIMEOUT)
        assert any(isinstance(m, Ping) for m in fake.seen)
    finally:
        guest.close()
        fake.close()


def test_heartbeat_drops_a_host_whose_reading_stopped(host_rt, guest_rt, tmp_path):
    with linked("unix", host_rt, guest_rt, tmp_path, heartbeat_interval=0.05,
                heartbeat_timeout=0.5) as (host, guest):
        pending = guest.start_request(guest.channel(2), b"block")
        wait_until(lambda: any(r[0] == b"block" for r in host.requests))
        # The host stays up, but reads nothing more: no PONG comes back.
        transport = host.sessions[0].conn.transport
        assert isinstance(transport, SocketTransport)
        host_rt.call(transport.pause_reading)
        started = time.monotonic()
        with pytest.raises(ChannelClosed):
            pending.result(TIMEOUT)
        assert time.monotonic() - started < 0.5 + 5.0
        wait_until(lambda: len(guest.drv.removed) == 3)
        assert guest.bus.heartbeat_failures == 1


def test_a_busy_host_still_answers_the_heartbeat(host_rt, guest_rt, tmp_path):
    """A request the host takes long over is no silence: PING is answered by the reader."""
    with linked("unix", host_rt, guest_rt, tmp_path, heartbeat_interval=0.01,
                heartbeat_timeout=2.0) as (host, guest):
        blocked = guest.start_request(guest.channel(2), b"block")
        # Many heartbeat periods pass while the request is pending, each PING answered.
        conn = host.sessions[0].conn
        seen = host_rt.call(lambda: conn.packets_in)
        wait_until(lambda: host_rt.call(lambda: conn.packets_in) > seen + 25)
        assert not blocked.done() and guest.bus.up and guest.bus.heartbeat_failures == 0
        host.open_gate()
        assert blocked.result(TIMEOUT).payload == b"echo:block"


def test_a_host_sending_a_frame_without_its_descriptors_is_dropped(guest_rt, tmp_path):
    # A completion of the first request that claims three descriptors and brings none.
    garbage = _hdr(2, 1, VM_PKT_COMP, frame_flags(fds=3), 1) + b"hi"
    fake = FakeHost(str(tmp_path / "bad.sock"), garbage)
    guest = start_guest(guest_rt, fake.path)
    try:
        wait_until(lambda: len(guest.drv.probed) == 1)
        with pytest.raises(ChannelClosed):
            guest.request(guest.channel(1), b"first")
        assert fake.hung_up.wait(TIMEOUT)
        assert not guest.bus.up
        wait_until(lambda: guest.drv.removed == guest.drv.probed)
    finally:
        guest.close()
        fake.close()


def test_ping_is_answered_with_its_cookie(host_rt, tmp_path):
    host = EchoHost(host_rt, str(tmp_path / "h.sock"), offers())
    sock = _raw_connect(host.address)
    try:
        sock.sendall(encode_frame(CONTROL_RELID, VM_PKT_DATA_INBAND,
                                  encode_bus_message(Ping(0xC0FFEE))))
        reader = FrameReader()
        while not (frames := reader.frames()):
            reader.feed(sock.recv(1 << 16))
        assert decode_bus_message(frames[0].payload) == Pong(0xC0FFEE)
    finally:
        sock.close()
        host.close()


# ---- the loopback transport on its own -----------------------------------------------------------


@pytest.mark.parametrize("one_loop", [False, True])
def test_loopback_pair(host_rt, guest_rt, one_loop):
    rt_b = host_rt if one_loop else guest_rt
    got: dict[str, list] = {"a": [], "b": []}
    lost: dict[str, list] = {"a": [], "b": []}

    class Receiver:
        def __init__(self, name: str) -> None:
            self.name = name

        def data_received(self, data: bytes, fds: list[int]) -> None:
            got[self.name].append((data, [os.pread(fd, 8, 0) for fd in fds]))
            close_all(fds)

        def connection_lost(self, error: BaseException | None) -> None:
            lost[self.name].append(error)

    a, b = LoopbackTransport.pair(host_rt.loop, rt_b.loop, "end-a", "end-b")
    assert (a.peer, b.peer) == ("end-b", "end-a") and a.can_pass_fds
    fd = memfd_from_bytes(b"carried")
    try:
        host_rt.call(a.write, b"early", [fd])  # before b has a receiver: kept for it
        host_rt.call(a.start, Receiver("a"))
        rt_b.call(b.start, Receiver("b"))
        rt_b.call(b.write, b"back")
        wait_until(lambda: got["b"] and got["a"])
        assert got["b"] == [(b"early", [b"carried"])] and got["a"] == [(b"back", [])]
        host_rt.call(a.close)
        wait_until(lambda: lost["a"] and lost["b"])
        assert rt_b.call(lambda: b.closed)
    finally:
        os.close(fd)
