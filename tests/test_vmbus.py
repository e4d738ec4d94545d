"""dxg.vmbus over real sockets: offers, probe/remove, request ids, rescind, reconnect."""

import threading
import time
import uuid

import pytest

from dxg.protocol.bus import Offer, OpenChannel
from dxg.protocol.guids import DXGK_GLOBAL_GUID, DXGK_VGPU_GUID
from dxg.vmbus.bus import BusDevice, GuestBus, HostBusSession
from dxg.vmbus.channel import Channel, ChannelClosed
from dxg.vmbus.transport import Listener


def wait_until(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


class EchoHost:
    """A host whose channels answer b'echo:' + payload; holds its sessions."""

    def __init__(self, address: str, offers: list[Offer]):
        self.listener = Listener(address)
        self.offers = offers
        self.sessions: list[HostBusSession] = []
        self.gate = threading.Event()
        self.gate.set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                t = self.listener.accept()
            except OSError:
                return
            s = HostBusSession(t, self, list(self.offers))
            self.sessions.append(s)
            s.start()

    def channel_opened(self, session, channel: Channel, msg: OpenChannel) -> int:
        def on_request(ch, payload, wants):
            if payload == b"block":
                self.gate.wait(10)
            return b"echo:" + payload
        channel.on_request = on_request
        return 0

    def channel_closed(self, session, channel):
        pass

    def session_closed(self, session):
        pass

    def close(self):
        self.listener.close()
        for s in self.sessions:
            s.close()


class RecordingDriver:
    id_table = (DXGK_GLOBAL_GUID, DXGK_VGPU_GUID)

    def __init__(self):
        self.probed: list[BusDevice] = []
        self.removed: list[BusDevice] = []

    def probe(self, dev):
        dev.open()
        self.probed.append(dev)

    def remove(self, dev):
        self.removed.append(dev)


def start_guest(address: str, reconnect: bool = False) -> tuple[GuestBus, "RecordingDriver"]:
    """A GuestBus bound to `address` with a RecordingDriver, connected."""
    bus = GuestBus(address, reconnect=reconnect)
    drv = RecordingDriver()
    bus.register_driver(drv)
    bus.start(wait=False)
    return bus, drv


def offers(order="global-first"):
    g = Offer(1, DXGK_GLOBAL_GUID, uuid.uuid4(), mmio_megabytes=64)
    v = [Offer(i, DXGK_VGPU_GUID, uuid.uuid4(), interface_version=40) for i in (2, 3)]
    return [g, *v] if order == "global-first" else [*v, g]


@pytest.mark.parametrize("order", ["global-first", "vgpu-first"])
def test_offers_probe_and_requests(tmp_path, order):
    host = EchoHost(str(tmp_path / "h.sock"), offers(order))
    bus, drv = start_guest(str(tmp_path / "h.sock"))
    try:
        assert bus.offers_delivered.wait(10)
        wait_until(lambda: len(drv.probed) == 3)
        types = [d.type_guid for d in drv.probed]
        assert types[0] == (DXGK_GLOBAL_GUID if order == "global-first" else DXGK_VGPU_GUID)
        ch = drv.probed[0].channel
        results = {}

        def worker(i):
            results[i] = ch.request(f"m{i}".encode())

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == {i: f"echo:m{i}".encode() for i in range(32)}
    finally:
        bus.close()
        host.close()


def test_blocked_request_does_not_stall_other_channels(tmp_path):
    host = EchoHost(str(tmp_path / "h.sock"), offers())
    host.gate.clear()
    bus, drv = start_guest(str(tmp_path / "h.sock"))
    try:
        wait_until(lambda: len(drv.probed) == 3)
        # The host handles one session's requests in order; a guest thread blocked in a request
        # only parks itself: other threads can still submit (their replies queue behind it).
        blocked = threading.Thread(target=lambda: drv.probed[1].channel.request(b"block"))
        blocked.start()
        got = []
        t = threading.Thread(target=lambda: got.append(drv.probed[2].channel.request(b"x")))
        t.start()
        host.gate.set()
        t.join(10)
        blocked.join(10)
        assert got == [b"echo:x"]
    finally:
        bus.close()
        host.close()


def test_rescind_fails_pending_and_removes(tmp_path):
    host = EchoHost(str(tmp_path / "h.sock"), offers())
    host.gate.clear()
    bus, drv = start_guest(str(tmp_path / "h.sock"))
    try:
        wait_until(lambda: len(drv.probed) == 3)
        vgpu = next(d for d in drv.probed if d.offer.relid == 3)
        errors = []

        def blocked():
            try:
                vgpu.channel.request(b"block")
            except ChannelClosed as e:
                errors.append(e)

        t = threading.Thread(target=blocked)
        t.start()
        wait_until(lambda: vgpu.channel._pending)
        host.sessions[0].rescind(3)
        t.join(10)
        host.gate.set()
        assert errors  # failed at once, on the reader thread
        wait_until(lambda: vgpu in drv.removed)  # remove() runs on the bus worker
        other = next(d for d in drv.probed if d.offer.relid == 2)
        assert other.channel.request(b"still") == b"echo:still"
    finally:
        bus.close()
        host.close()


def test_reconnect_after_host_restart(tmp_path):
    addr = str(tmp_path / "h.sock")
    host = EchoHost(addr, offers())
    bus, drv = start_guest(addr, reconnect=True)
    try:
        wait_until(lambda: len(drv.probed) == 3)
        host.close()
        wait_until(lambda: len(drv.removed) == 3)
        host = EchoHost(addr, offers("vgpu-first"))
        wait_until(lambda: len(drv.probed) == 6)
        assert drv.probed[-1].channel.request(b"again") == b"echo:again"
    finally:
        bus.close()
        host.close()


def test_unreachable_host_is_a_clear_error(tmp_path):
    from dxg.vmbus.transport import TransportError

    bus = GuestBus(str(tmp_path / "nobody.sock"), reconnect=False)
    with pytest.raises(TransportError, match="cannot reach"):
        bus.start(wait=False)
    bus.close()


def test_tcp_transport(tmp_path):
    host = EchoHost("tcp:127.0.0.1:0", offers())
    port = host.listener.address.target[1]
    bus, drv = start_guest(f"tcp:127.0.0.1:{port}")
    try:
        wait_until(lambda: len(drv.probed) == 3)
        assert drv.probed[0].channel.request(b"tcp") == b"echo:tcp"
    finally:
        bus.close()
        host.close()


def test_fire_and_forget_packets_get_no_completion(tmp_path):
    seen = []
    host = EchoHost(str(tmp_path / "h.sock"), offers())
    bus, drv = start_guest(str(tmp_path / "h.sock"))
    try:
        wait_until(lambda: len(drv.probed) == 3)
        ch = drv.probed[0].channel
        session = host.sessions[0]
        host_ch = session.conn.channel(ch.relid)

        def on_request(c, payload, wants):
            seen.append((payload, wants))
            return b"ignored"

        host_ch.on_request = on_request
        ch.send_async(b"fire")
        assert ch.request(b"sync") == b"ignored"  # ordered after the async one
        assert seen == [(b"fire", False), (b"sync", True)]
        # and the host's notifications reach the guest's in-band handler
        got = []
        ch.on_inband = lambda c, p: got.append(p)
        host_ch.notify(b"note")
        wait_until(lambda: got == [b"note"])
    finally:
        bus.close()
        host.close()
