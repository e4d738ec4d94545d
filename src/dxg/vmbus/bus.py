"""Bus logic on both ends of a connection, on an event loop.

Host side: a `HostBusSession` per connected guest negotiates the bus version, offers channels
(in the order the host chooses), opens them on request and rescinds them.
Guest side: a `GuestBus` per host connection receives offers, matches each to a registered
driver by device-type GUID and awaits its `probe()`; a rescind or a lost connection awaits
`remove()`. Probe and remove run one at a time, in arrival order, on a task of the bus, so they
may await channel requests while the connection keeps delivering completions. With `reconnect`,
a lost host is dialled again and its channels are offered anew. A heartbeat (PING every
`heartbeat_interval` seconds) notices a host that has stopped answering (hung, stopped, cut off
without a FIN): after `heartbeat_timeout` seconds of silence the link is dropped, which fails
every call on its adapters at once with device-removed; the host is dialled again and its
adapters come back when it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import uuid
from collections.abc import Awaitable, Callable
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
    Ping,
    Pong,
    Refuse,
    Rescind,
    Unload,
    VersionResponse,
    negotiate_bus_version,
)
from dxg.runtime.tasks import TaskSet
from dxg.vmbus.channel import Channel, ChannelClosed
from dxg.vmbus.connection import MAX_MESSAGE, BusConnection
from dxg.vmbus.transport import Transport, TransportError

log = logging.getLogger(__name__)

Dialer = Callable[[], Awaitable[Transport]]


class BusError(ConnectionError):
    """The bus could not be brought up (no common version, handshake timed out, ...)."""


# ---------------------------------------------------------------------------------------------
# guest side
# ---------------------------------------------------------------------------------------------


class BusDevice:
    """An offered channel as a driver sees it. The driver keeps its state in `drvdata`."""

    def __init__(self, bus: GuestBus, conn: BusConnection, offer: Offer) -> None:
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

    async def open(self, guest_caps: int = 0, interface_version: int = 0,
                   timeout: float = 10.0) -> Channel:
        return await self.bus._open(self, guest_caps, interface_version, timeout)

    def close(self) -> None:
        self.bus._close(self)

    def __repr__(self) -> str:
        return f"<BusDevice relid={self.offer.relid} type={self.type_guid} on {self.bus.name}>"


class BusDriver(Protocol):
    id_table: tuple[uuid.UUID, ...]

    async def probe(self, dev: BusDevice) -> bool:
        """Take the device (True), or refuse it (False: the bus forgets it)."""
        ...

    async def remove(self, dev: BusDevice) -> None: ...


class GuestBus:
    """The guest's view of one host: its connection, its offered devices, and their drivers.

    Offers, rescinds and connection loss are queued, with the connection they came on, to one
    task that runs the drivers' probe() and remove(); work for a connection that has since gone
    is skipped, so a quick reconnect never mixes the old host's channels with the new one's. A
    rescind closes its channel at once, so a probe waiting on a request there fails immediately.

    What a host sends is bounded: the bus keeps only the devices a driver took, holds or
    queues at most `max_offers` offers at once (more are ignored), and drops a host that sends
    more than 16 times that many over one connection, or whose control messages pile up past
    `max_queued_work` before they can be handled.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, dial: Dialer, name: str, *,
                 reconnect: bool = True, handshake_timeout: float = 10.0,
                 heartbeat_interval: float = 1.0, heartbeat_timeout: float = 5.0,
                 max_message: int = MAX_MESSAGE, max_offers: int = 4096,
                 max_queued_work: int = 8192) -> None:
        if not 0 < heartbeat_interval < heartbeat_timeout:
            raise ValueError("need 0 < heartbeat_interval < heartbeat_timeout")
        self.loop = loop
        self.name = name
        self._dial = dial
        self.reconnect = reconnect
        self.handshake_timeout = handshake_timeout
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.max_message = max_message
        self.max_offers = max_offers
        self.max_queued_work = max_queued_work
        # Offers of the current connection held or waiting to be probed, and all it has sent.
        self._offers_live = 0
        self._offers_seen = 0
        self.ignored_offers = 0
        self.host_name = ""
        self.version = 0
        self._drivers: list[BusDriver] = []
        self._devices: dict[tuple[int, int], BusDevice] = {}  # (id(conn), relid) -> device
        self._conn: BusConnection | None = None
        self._version: asyncio.Future[VersionResponse | Refuse] | None = None
        self._open_waiters: dict[int, asyncio.Future[int]] = {}
        self.offers_delivered = asyncio.Event()
        self.connected = asyncio.Event()
        self._lost = asyncio.Event()
        self._closing = False
        self._work: asyncio.Queue[Callable[[], Awaitable[None]]] = asyncio.Queue()
        self._tasks = TaskSet(f"bus {name}")
        self._pings = itertools.count(1)
        self.last_error: str | None = None
        self.generation = 0
        self.heartbeat_failures = 0

    def __repr__(self) -> str:
        return f"<GuestBus {self.name} gen={self.generation}>"

    # ---- life cycle ---------------------------------------------------------------------------

    def register_driver(self, driver: BusDriver) -> None:
        self._drivers.append(driver)

    async def start(self, wait: bool = True) -> None:
        """Connect now (raising, with nothing left running, if the host is unreachable and
        `wait` is False), then keep the link up in the background when `reconnect` is set."""
        if not wait:
            await self._connect_once()
        self._tasks.spawn(self._work_loop(), f"bus-work {self.name}")
        self._tasks.spawn(self._supervise(), f"bus-sup {self.name}")

    async def close(self) -> None:
        self._closing = True
        conn = self._conn
        if conn is not None:
            conn.say_goodbye(Unload())
            conn.close()
            await self._remove_all(conn)
        self._lost.set()
        await self._tasks.cancel_and_wait(timeout=15)

    @property
    def closing(self) -> bool:
        return self._closing

    def devices(self) -> list[BusDevice]:
        return list(self._devices.values())

    @property
    def up(self) -> bool:
        conn = self._conn
        return conn is not None and not conn.closed and self.connected.is_set()

    # ---- connection ------------------------------------------------------------------------

    async def _connect_once(self) -> None:
        if self._closing:
            raise BusError(f"bus {self.name} is closing")
        transport = await self._dial()
        if self._closing:
            transport.close()
            raise BusError(f"bus {self.name} is closing")
        self.offers_delivered.clear()
        self._lost.clear()
        version: asyncio.Future[VersionResponse | Refuse] = self.loop.create_future()
        self._version = version
        conn = BusConnection(self.loop, transport, self, f"guest<-{self.name}",
                             self.max_message)
        self._conn = conn
        self._offers_live = self._offers_seen = 0
        conn.start()
        try:
            conn.send_control(Hello(BUS_VERSIONS_SUPPORTED, "pydxg-guest"))
            reply = await asyncio.wait_for(asyncio.shield(version), self.handshake_timeout)
        except TimeoutError:
            conn.close()
            raise BusError(f"{self.name}: host did not answer the version handshake") from None
        except ConnectionRefusedError as e:
            conn.close()
            raise BusError(f"{self.name}: {e}") from None
        except (ConnectionError, OSError) as e:
            conn.close()
            raise BusError(f"{self.name}: host hung up during the version handshake ({e})") \
                from None
        finally:
            self._version = None
        if isinstance(reply, Refuse):
            conn.close()
            raise BusError(f"{self.name}: the host refused this guest: {reply.reason}")
        if not reply.accepted:
            conn.close()
            raise BusError(f"{self.name}: host speaks no bus version we know")
        self.version = reply.version
        self.host_name = reply.host_name
        self.generation += 1
        self.last_error = None
        self.connected.set()
        self._tasks.spawn(self._heartbeat(conn), f"bus-heartbeat {self.name}")
        log.info("bus %s: connected to host %r (bus version 0x%x)", self.name, reply.host_name,
                 reply.version)

    async def _supervise(self) -> None:
        delay = 0.05
        while not self._closing:
            conn = self._conn
            if conn is not None and not conn.closed:
                await self._lost.wait()
                if self._closing or not self.reconnect:
                    return
                continue
            if self.generation and not self.reconnect:
                return
            try:
                await self._connect_once()
                delay = 0.05
            except (TransportError, BusError, OSError) as e:
                if self._closing:
                    return
                if self.last_error != str(e):
                    log.warning("bus %s: %s (retrying)", self.name, e)
                self.last_error = str(e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _heartbeat(self, conn: BusConnection) -> None:
        """PING while the link is up; drop it when the host stays silent too long."""
        while not conn.closed:
            await asyncio.sleep(self.heartbeat_interval)
            if conn.closed:
                return
            silent = self.loop.time() - conn.last_heard
            if silent >= self.heartbeat_timeout:
                self.heartbeat_failures += 1
                self.last_error = f"host silent for {silent:.1f}s"
                log.warning("bus %s: the host has not answered for %.1fs; its adapters are "
                            "removed until it answers again", self.name, silent)
                conn.close(TimeoutError(errno.ETIMEDOUT, "host stopped answering"))
                return
            with contextlib.suppress(ConnectionError):
                conn.send_control(Ping(next(self._pings)))

    # ---- ConnectionHandler ---------------------------------------------------------------------

    def connection_lost(self, conn: BusConnection, error: BaseException | None) -> None:
        if conn is not self._conn:
            return
        self.connected.clear()
        if self._version is not None and not self._version.done():
            self._version.set_exception(ConnectionResetError("connection lost"))
        for waiter in list(self._open_waiters.values()):
            if not waiter.done():
                waiter.set_exception(ChannelClosed("connection lost"))
        if not self._closing:
            self._work.put_nowait(lambda: self._remove_all(conn))
        self._lost.set()

    def _queue(self, conn: BusConnection, work: Callable[[], Awaitable[None]]) -> None:
        if self._work.qsize() >= self.max_queued_work:
            log.error("bus %s: the host sent more than %d control messages before they could "
                      "be handled; dropping it", self.name, self.max_queued_work)
            conn.close(ConnectionError(errno.EPROTO, "host flooded the bus"))
            return
        self._work.put_nowait(work)

    def control_received(self, conn: BusConnection, msg: BusMessage) -> None:
        if conn is not self._conn:
            return
        if isinstance(msg, VersionResponse | Refuse):
            if self._version is not None and not self._version.done():
                self._version.set_result(msg)
        elif isinstance(msg, Offer):
            self._offers_seen += 1
            if self._offers_seen > 16 * self.max_offers:
                log.error("bus %s: the host sent %d offers on one connection; dropping it",
                          self.name, self._offers_seen)
                conn.close(ConnectionError(errno.EPROTO, "host churned offers without end"))
                return
            if self._offers_live >= self.max_offers:
                self.ignored_offers += 1
                conn.logs.log(logging.ERROR, "too many offers", "bus %s: the host offers more "
                              "than %d devices at once; offer %d ignored", self.name,
                              self.max_offers, msg.relid)
                return
            self._offers_live += 1
            self._queue(conn, lambda: self._probe(conn, msg))
        elif isinstance(msg, Rescind):
            ch = conn.detach(msg.relid)
            if ch is not None:
                ch.close("rescinded")
            self._queue(conn, lambda: self._rescind(conn, msg.relid))
        elif isinstance(msg, AllOffersDelivered):
            async def delivered() -> None:
                self.offers_delivered.set()

            self._queue(conn, delivered)
        elif isinstance(msg, OpenResult):
            waiter = self._open_waiters.get(msg.relid)
            if waiter is not None and not waiter.done():
                waiter.set_result(msg.status)
        elif isinstance(msg, Unload):
            log.info("bus %s: host unloads", self.name)
            conn.close()
        elif isinstance(msg, Pong):
            pass  # last_heard is what counts
        else:
            log.warning("bus %s: unexpected control message %r", self.name, msg)

    # ---- probe / remove (the work task) -------------------------------------------------------

    async def _work_loop(self) -> None:
        while True:
            item = await self._work.get()
            try:
                await item()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("bus %s: probe/remove failed", self.name)

    async def _probe(self, conn: BusConnection, offer: Offer) -> None:
        if conn.closed or conn is not self._conn:
            return  # an offer of a connection that has gone since
        key = (id(conn), offer.relid)
        if key in self._devices:
            log.warning("bus %s: duplicate offer for relid %d ignored", self.name, offer.relid)
            self._offer_gone(conn)
            return
        dev = BusDevice(self, conn, offer)
        self._devices[key] = dev
        for drv in self._drivers:
            if offer.type_guid in drv.id_table:
                dev.driver = drv
                if await drv.probe(dev):
                    return
                break
        else:
            log.info("bus %s: no driver for channel type %s", self.name, offer.type_guid)
        # Nobody took it: forget it (a refused offer costs nothing to keep around).
        if self._devices.get(key) is dev:
            del self._devices[key]
            self._offer_gone(conn)
            if dev.channel is not None:
                dev.channel.close("refused")
                conn.detach(offer.relid)

    async def _rescind(self, conn: BusConnection, relid: int) -> None:
        dev = self._devices.pop((id(conn), relid), None)
        if dev is not None:
            self._offer_gone(conn)
            await self._teardown(dev, "rescinded")

    def _offer_gone(self, conn: BusConnection) -> None:
        if conn is self._conn:
            self._offers_live -= 1

    async def _remove_all(self, conn: BusConnection) -> None:
        devs = [d for d in self._devices.values() if d.conn is conn]
        for d in devs:
            self._devices.pop((id(conn), d.offer.relid), None)
        # vGPU channels first, then the global channel, as a module unload would.
        for dev in sorted(devs, key=lambda d: d.offer.mmio_megabytes):
            await self._teardown(dev, "lost its host")

    async def _teardown(self, dev: BusDevice, reason: str) -> None:
        if dev.channel is not None:
            dev.channel.close(reason)
            dev.conn.detach(dev.offer.relid)
        if dev.driver is not None:
            await dev.driver.remove(dev)

    # ---- channel open/close -------------------------------------------------------------------

    async def _open(self, dev: BusDevice, guest_caps: int, version: int,
                    timeout: float) -> Channel:
        conn = dev.conn
        relid = dev.offer.relid
        if conn.closed:
            raise ChannelClosed(f"bus {self.name}: the connection of channel {relid} is gone")
        channel = Channel(conn, dev.offer)
        waiter: asyncio.Future[int] = self.loop.create_future()
        self._open_waiters[relid] = waiter
        conn.attach(channel)
        try:
            conn.send_control(OpenChannel(relid, guest_caps, version))
            try:
                status = await asyncio.wait_for(waiter, timeout)
            except TimeoutError:
                raise BusError(f"bus {self.name}: host did not answer OPEN_CHANNEL {relid}") \
                    from None
            if conn.closed:
                raise ChannelClosed(f"bus {self.name}: connection lost while opening {relid}")
            if status != 0:
                raise BusError(f"bus {self.name}: host refused channel {relid} ({status})")
        except BaseException:
            if conn.channel(relid) is channel:
                conn.detach(relid)
            channel.close("failed to open")
            raise
        finally:
            if self._open_waiters.get(relid) is waiter:
                del self._open_waiters[relid]
        dev.channel = channel
        return channel

    def _close(self, dev: BusDevice) -> None:
        ch = dev.channel
        if ch is None:
            return
        dev.channel = None
        ch.close("closed by the guest")
        dev.conn.detach(ch.relid)
        with contextlib.suppress(ConnectionError):
            if not dev.conn.closed:
                dev.conn.send_control(CloseChannel(ch.relid))


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------


class HostBusHandler(Protocol):
    def channel_opened(self, session: HostBusSession, channel: Channel,
                       msg: OpenChannel) -> int: ...

    def channel_closed(self, session: HostBusSession, channel: Channel) -> None: ...

    def session_closed(self, session: HostBusSession) -> None: ...


class HostBusSession:
    """The host's end of one guest connection. `on_handshake` runs once the guest's HELLO has
    been accepted."""

    def __init__(self, loop: asyncio.AbstractEventLoop, transport: Transport,
                 handler: HostBusHandler, offers: list[Offer], host_name: str = "pydxg-host",
                 max_message: int = MAX_MESSAGE,
                 on_handshake: Callable[[HostBusSession], None] | None = None) -> None:
        self.loop = loop
        self.handler = handler
        self.host_name = host_name
        self.peer = transport.peer
        self._offers: dict[int, Offer] = {}
        self._initial = list(offers)
        self._ready = False
        self._on_handshake = on_handshake
        self.handshaken = False
        self.closed = False
        self.conn = BusConnection(loop, transport, self, f"host->{transport.peer}", max_message)

    def __repr__(self) -> str:
        return f"<HostBusSession {self.peer}>"

    def start(self) -> None:
        self.conn.start()

    def offers(self) -> list[Offer]:
        return list(self._offers.values())

    def offer(self, offer: Offer) -> None:
        self._offers[offer.relid] = offer
        if self._ready:
            with contextlib.suppress(ConnectionError):
                self.conn.send_control(offer)

    def rescind(self, relid: int) -> None:
        self._offers.pop(relid, None)
        self._initial = [o for o in self._initial if o.relid != relid]
        ch = self.conn.detach(relid)
        with contextlib.suppress(ConnectionError):
            self.conn.send_control(Rescind(relid))
        if ch is not None:
            ch.close("rescinded")
            self.handler.channel_closed(self, ch)

    def close(self) -> None:
        """Say goodbye (best effort) and end the session."""
        self.conn.say_goodbye(Unload())
        self.conn.close()

    def cut(self, why: str) -> None:
        """End the session without a goodbye (the guest misbehaved)."""
        self.conn.close(ConnectionAbortedError(errno.ECONNABORTED, why))

    def control_received(self, conn: BusConnection, msg: BusMessage) -> None:
        if isinstance(msg, Hello):
            version = negotiate_bus_version(msg.versions)
            conn.send_control(VersionResponse(version is not None, version or 0,
                                              self.host_name))
            if version is None:
                log.warning("host: guest %s speaks no common bus version", self.peer)
                return
            if self._ready:
                return  # a second HELLO changes nothing
            self._ready = True
            for o in self._initial:
                self._offers[o.relid] = o
            initial, self._initial = self._initial, []
            for o in initial:
                conn.send_control(o)
            conn.send_control(AllOffersDelivered())
            self.handshaken = True
            if self._on_handshake is not None:
                self._on_handshake(self)
        elif isinstance(msg, OpenChannel):
            offer = self._offers.get(msg.relid)
            if offer is None or conn.channel(msg.relid) is not None:
                conn.send_control(OpenResult(msg.relid, -errno.EINVAL))
                return
            ch = Channel(conn, offer)
            status = self.handler.channel_opened(self, ch, msg)
            if status == 0:
                conn.attach(ch)
            conn.send_control(OpenResult(msg.relid, status))
        elif isinstance(msg, CloseChannel):
            ch = conn.detach(msg.relid)
            if ch is not None:
                ch.close("closed by the guest")
                self.handler.channel_closed(self, ch)
        elif isinstance(msg, Unload):
            conn.close()
        elif isinstance(msg, Pong):
            pass
        else:
            log.warning("host: unexpected control message %r from %s", msg, self.peer)

    def connection_lost(self, conn: BusConnection, error: BaseException | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.handler.session_closed(self)


__all__ = ["BusDevice", "BusDriver", "BusError", "Dialer", "GuestBus", "HostBusHandler",
           "HostBusSession"]
