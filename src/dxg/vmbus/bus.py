"""Bus logic on both ends of a connection.

Host side: a `HostBusSession` per connected guest negotiates the bus version, offers channels
(in the order the host chooses), opens them on request and rescinds them.
Guest side: a `GuestBus` per host connection receives offers, matches each to a registered
driver by device-type GUID and calls `probe()`; a rescind or a lost connection calls `remove()`.
Probe and remove run on one worker thread per bus, in arrival order, so they may block on
channel requests while the reader thread keeps delivering completions. With `reconnect`, a lost
host is dialled again and its channels are offered anew.
"""

import contextlib
import errno
import logging
import queue
import threading
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from dxg.protocol.bus import (
    BUS_VERSIONS_SUPPORTED,
    AllOffersDelivered,
    BusMessage,
    CloseChannel,
    Hello,
    Offer,
    OpenChannel,
    OpenResult,
    Rescind,
    Unload,
    VersionResponse,
    negotiate_bus_version,
)
from dxg.vmbus.channel import Channel, ChannelClosed
from dxg.vmbus.connection import BusConnection
from dxg.vmbus.transport import Transport, TransportError, connect

log = logging.getLogger(__name__)


class BusError(ConnectionError):
    """The bus could not be brought up (no common version, handshake timed out, ...)."""


# ---------------------------------------------------------------------------------------------
# guest side
# ---------------------------------------------------------------------------------------------


class BusDevice:
    """An offered channel as a driver sees it. The driver keeps its state in `drvdata`."""

    def __init__(self, bus: "GuestBus", conn: BusConnection, offer: Offer) -> None:
        self.bus = bus
        self.conn = conn  # the connection the offer came on; the channel lives and dies with it
        self.offer = offer
        self.channel: Channel | None = None
        self.driver: BusDriver | None = None
        self.drvdata: Any = None

    @property
    def type_guid(self) -> uuid.UUID:
        return self.offer.type_guid

    @property
    def instance_guid(self) -> uuid.UUID:
        return self.offer.instance_guid

    def open(self, guest_caps: int = 0, interface_version: int = 0,
             timeout: float = 10.0) -> Channel:
        return self.bus._open(self, guest_caps, interface_version, timeout)

    def close(self) -> None:
        self.bus._close(self)

    def __repr__(self) -> str:
        return f"<BusDevice relid={self.offer.relid} type={self.type_guid} on {self.bus.name}>"


class BusDriver(Protocol):
    id_table: tuple[uuid.UUID, ...]

    def probe(self, dev: BusDevice) -> None: ...

    def remove(self, dev: BusDevice) -> None: ...


# errno answered to an open that was waiting when the connection went away
_ENOTCONN = -errno.ENOTCONN


class GuestBus:
    """The guest's view of one host: its connection, its offered devices, and their drivers.

    Offers, rescinds and connection loss are queued, with the connection they came on, to one
    worker thread that runs the drivers' probe() and remove(); work for a connection that has
    since gone is skipped, so a quick reconnect never mixes the old host's channels with the
    new one's. A rescind closes its channel at once on the reader thread, so a probe blocked
    in a request on that channel fails immediately instead of timing out."""

    def __init__(self, address: str, name: str | None = None, reconnect: bool = True,
                 handshake_timeout: float = 10.0) -> None:
        self.address = address
        self.name = name or address
        self.reconnect = reconnect
        self.handshake_timeout = handshake_timeout
        self.host_name = ""
        self.version = 0
        self._drivers: list[BusDriver] = []
        self._devices: dict[tuple[int, int], BusDevice] = {}  # (id(conn), relid) -> device
        self._lock = threading.Lock()
        self._conn: BusConnection | None = None
        self._version_reply: VersionResponse | None = None
        self._version_event = threading.Event()
        self._open_waiters: dict[int, tuple[threading.Event, list[int]]] = {}
        self.offers_delivered = threading.Event()
        self.connected = threading.Event()
        self._lost = threading.Event()
        self._closing = threading.Event()
        self._work: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._worker = threading.Thread(target=self._work_loop, name=f"bus-work {self.name}",
                                        daemon=True)
        self._supervisor: threading.Thread | None = None
        self.last_error: str | None = None
        self.generation = 0

    # ---- life cycle ---------------------------------------------------------------------------

    def register_driver(self, driver: BusDriver) -> None:
        with self._lock:
            self._drivers.append(driver)

    def start(self, wait: bool = True) -> None:
        """Connect now (raising, with no thread left behind, if the host is unreachable and
        `wait` is False), then keep the link up in the background when `reconnect` is set."""
        if not wait:
            self._connect_once()
        self._worker.start()
        self._supervisor = threading.Thread(target=self._supervise, name=f"bus-sup {self.name}",
                                            daemon=True)
        self._supervisor.start()

    def close(self) -> None:
        self._closing.set()
        with self._lock:
            conn = self._conn
        if conn is not None:
            conn.say_goodbye(Unload())
            conn.close()
        self._lost.set()
        self._version_event.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=15)
        if self._worker.is_alive():
            self._work.put(None)
            self._worker.join(timeout=15)

    def devices(self) -> list[BusDevice]:
        with self._lock:
            return list(self._devices.values())

    # ---- connection ------------------------------------------------------------------------

    def _connect_once(self) -> None:
        transport = connect(self.address)
        with self._lock:
            if self._closing.is_set():
                transport.release()
                raise BusError(f"bus {self.name} is closing")
            self._version_event.clear()
            self._version_reply = None
            self.offers_delivered.clear()
            self._lost.clear()
            conn = BusConnection(transport, self._on_control, self._on_lost,
                                 f"guest<-{self.name}")
            self._conn = conn
        conn.start()
        try:
            conn.send_control(Hello(BUS_VERSIONS_SUPPORTED, "pydxg-guest"))
        except (OSError, ConnectionError) as e:
            conn.close()
            raise BusError(f"{self.name}: handshake failed: {e}") from None
        if not self._version_event.wait(self.handshake_timeout):
            conn.close()
            raise BusError(f"{self.name}: host did not answer the version handshake")
        reply = self._version_reply
        if conn.closed or reply is None:
            conn.close()
            raise BusError(f"{self.name}: host hung up during the version handshake")
        if not reply.accepted:
            conn.close()
            raise BusError(f"{self.name}: host speaks no bus version we know")
        self.version = reply.version
        self.host_name = reply.host_name
        self.generation += 1
        self.last_error = None
        self.connected.set()
        log.info("bus %s: connected to host %r (bus version 0x%x)", self.name, reply.host_name,
                 reply.version)

    def _supervise(self) -> None:
        delay = 0.05
        while not self._closing.is_set():
            conn = self._conn
            if conn is not None and not conn.closed:
                self._lost.wait()
                if self._closing.is_set() or not self.reconnect:
                    return
                continue
            if self.generation and not self.reconnect:
                return
            try:
                self._connect_once()
                delay = 0.05
            except (TransportError, BusError, OSError) as e:
                if self._closing.is_set():
                    return
                if self.last_error != str(e):
                    log.warning("bus %s: %s (retrying)", self.name, e)
                self.last_error = str(e)
                self._closing.wait(delay)
                delay = min(delay * 2, 1.0)

    def _on_lost(self, conn: BusConnection) -> None:
        """Reader thread of `conn`, once it is gone: wake whoever waits on it, queue removal."""
        if conn is not self._conn:
            return
        self.connected.clear()
        self._version_event.set()
        with self._lock:
            waiters = list(self._open_waiters.values())
        for event, status in waiters:
            status.append(_ENOTCONN)
            event.set()
        self._work.put(lambda: self._remove_all(conn))
        self._lost.set()

    # ---- control messages (reader thread) ----------------------------------------------------

    def _on_control(self, msg: BusMessage) -> None:
        conn = self._conn
        if conn is None:
            return
        if isinstance(msg, VersionResponse):
            self._version_reply = msg
            self._version_event.set()
        elif isinstance(msg, Offer):
            self._work.put(lambda: self._probe(conn, msg))
        elif isinstance(msg, Rescind):
            ch = conn.detach(msg.relid)
            if ch is not None:
                ch.close("rescinded")
            self._work.put(lambda: self._rescind(conn, msg.relid))
        elif isinstance(msg, AllOffersDelivered):
            self._work.put(self.offers_delivered.set)
        elif isinstance(msg, OpenResult):
            with self._lock:
                waiter = self._open_waiters.get(msg.relid)
            if waiter is not None:
                waiter[1].append(msg.status)
                waiter[0].set()
        elif isinstance(msg, Unload):
            log.info("bus %s: host unloads", self.name)
            conn.transport.close()
        else:
            log.warning("bus %s: unexpected control message %r", self.name, msg)

    # ---- probe / remove (worker thread) -------------------------------------------------------

    def _work_loop(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            try:
                item()
            except Exception:
                log.exception("bus %s: probe/remove failed", self.name)

    def _probe(self, conn: BusConnection, offer: Offer) -> None:
        if conn.closed or conn is not self._conn:
            return  # an offer of a connection that has gone since
        dev = BusDevice(self, conn, offer)
        key = (id(conn), offer.relid)
        with self._lock:
            if key in self._devices:
                log.warning("bus %s: duplicate offer for relid %d ignored", self.name, offer.relid)
                return
            self._devices[key] = dev
            drivers = list(self._drivers)
        for drv in drivers:
            if offer.type_guid in drv.id_table:
                dev.driver = drv
                drv.probe(dev)
                return
        log.info("bus %s: no driver for channel type %s", self.name, offer.type_guid)

    def _rescind(self, conn: BusConnection, relid: int) -> None:
        with self._lock:
            dev = self._devices.pop((id(conn), relid), None)
        if dev is not None:
            self._teardown(dev, "rescinded")

    def _remove_all(self, conn: BusConnection) -> None:
        with self._lock:
            devs = [d for d in self._devices.values() if d.conn is conn]
            for d in devs:
                del self._devices[(id(conn), d.offer.relid)]
        # vGPU channels first, then the global channel, as a module unload would.
        for dev in sorted(devs, key=lambda d: d.offer.mmio_megabytes):
            self._teardown(dev, "lost its host")

    def _teardown(self, dev: BusDevice, reason: str) -> None:
        if dev.channel is not None:
            dev.channel.close(reason)
            dev.conn.detach(dev.offer.relid)
        if dev.driver is not None:
            dev.driver.remove(dev)

    # ---- channel open/close -------------------------------------------------------------------

    def _open(self, dev: BusDevice, guest_caps: int, version: int, timeout: float) -> Channel:
        conn = dev.conn
        if conn.closed:
            raise ChannelClosed(f"bus {self.name}: the connection of channel "
                                f"{dev.offer.relid} is gone")
        relid = dev.offer.relid
        channel = Channel(conn, dev.offer)
        event = threading.Event()
        status: list[int] = []
        with self._lock:
            self._open_waiters[relid] = (event, status)
        conn.attach(channel)
        try:
            conn.send_control(OpenChannel(relid, guest_caps, version))
            if not event.wait(timeout):
                raise BusError(f"bus {self.name}: host did not answer OPEN_CHANNEL {relid}")
            if conn.closed or status[0] == _ENOTCONN:
                raise ChannelClosed(f"bus {self.name}: connection lost while opening {relid}")
            if status[0] != 0:
                raise BusError(f"bus {self.name}: host refused channel {relid} ({status[0]})")
        except BaseException:
            conn.detach(relid)
            channel.close("failed to open")
            raise
        finally:
            with self._lock:
                self._open_waiters.pop(relid, None)
        dev.channel = channel
        return channel

    def _close(self, dev: BusDevice) -> None:
        ch = dev.channel
        if ch is None:
            return
        dev.channel = None
        ch.close("closed by the guest")
        dev.conn.detach(ch.relid)
        with contextlib.suppress(OSError, ConnectionError):
            dev.conn.send_control(CloseChannel(ch.relid))


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------


class HostBusHandler(Protocol):
    def channel_opened(self, session: "HostBusSession", channel: Channel,
                       msg: OpenChannel) -> int: ...

    def channel_closed(self, session: "HostBusSession", channel: Channel) -> None: ...

    def session_closed(self, session: "HostBusSession") -> None: ...


class HostBusSession:
    """The host's end of one guest connection."""

    def __init__(self, transport: Transport, handler: HostBusHandler, offers: list[Offer],
                 host_name: str = "pydxg-host") -> None:
        self.handler = handler
        self.host_name = host_name
        self.peer = transport.peer
        self._offers: dict[int, Offer] = {}
        self._initial = list(offers)
        self._lock = threading.Lock()
        self._ready = False
        self.closed = threading.Event()
        self.conn = BusConnection(transport, self._on_control, self._on_lost,
                                  f"host->{transport.peer}")

    def start(self) -> None:
        self.conn.start()

    def offers(self) -> list[Offer]:
        with self._lock:
            return list(self._offers.values())

    def offer(self, offer: Offer) -> None:
        with self._lock:
            self._offers[offer.relid] = offer
            ready = self._ready
        if ready:
            self.conn.send_control(offer)

    def rescind(self, relid: int) -> None:
        with self._lock:
            self._offers.pop(relid, None)
            self._initial = [o for o in self._initial if o.relid != relid]
        ch = self.conn.detach(relid)
        with contextlib.suppress(OSError, ConnectionError):
            self.conn.send_control(Rescind(relid), lock_timeout=5.0)
        if ch is not None:
            ch.close("rescinded")
            self.handler.channel_closed(self, ch)

    def close(self) -> None:
        self.conn.say_goodbye(Unload())
        self.conn.close()

    def _on_control(self, msg: BusMessage) -> None:
        if isinstance(msg, Hello):
            version = negotiate_bus_version(msg.versions)
            self.conn.send_control(VersionResponse(version is not None, version or 0,
                                                   self.host_name))
            if version is None:
                log.warning("host: guest %s speaks no common bus version", self.peer)
                return
            with self._lock:
                self._ready = True
                for o in self._initial:
                    self._offers[o.relid] = o
                initial, self._initial = self._initial, []
            for o in initial:
                self.conn.send_control(o)
            self.conn.send_control(AllOffersDelivered())
        elif isinstance(msg, OpenChannel):
            with self._lock:
                offer = self._offers.get(msg.relid)
            if offer is None or self.conn.channel(msg.relid) is not None:
                self.conn.send_control(OpenResult(msg.relid, -22))
                return
            ch = Channel(self.conn, offer)
            status = self.handler.channel_opened(self, ch, msg)
            if status == 0:
                self.conn.attach(ch)
            self.conn.send_control(OpenResult(msg.relid, status))
        elif isinstance(msg, CloseChannel):
            ch = self.conn.detach(msg.relid)
            if ch is not None:
                ch.close("closed by the guest")
                self.handler.channel_closed(self, ch)
        elif isinstance(msg, Unload):
            self.conn.transport.close()
        else:
            log.warning("host: unexpected control message %r from %s", msg, self.peer)

    def _on_lost(self, conn: BusConnection) -> None:
        self.closed.set()
        self.handler.session_closed(self)
