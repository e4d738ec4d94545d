"""One transport carrying the bus control messages (relid 0) and every channel's packets.

The connection decodes and routes, nothing else: control messages go to its handler (PING is
answered on the spot, so a peer busy with long work still proves it is alive), channel packets to
the channel registered for their relid, with the descriptors the transport brought (matched to
frames by each frame's count) and their bulk attachment (the chunks just before them, bounded by
``max_message``). Unknown relids are dropped. Anything malformed drops the connection.

Large messages are not copied on the way: a message longer than a packet is written as views of
the sender's buffers (``Transport.writev``); one received is read straight into a buffer of its
own, allocated once (its length is announced by its first bulk chunk), or, for a reply whose
requester said where its bytes go (``Channel.request(into=...)``), straight there.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from dxg.oslib.fds import close_all
from dxg.protocol.bus import BusMessage, Ping, Pong, decode_bus_message, encode_bus_message
from dxg.protocol.errors import ProtocolError
from dxg.protocol.framing import (
    CONTROL_RELID,
    DXG_MAX_VM_BUS_PACKET_SIZE,
    VM_PKT_COMP,
    VM_PKT_DATA_INBAND,
    Frame,
    Gather,
    MessageReader,
    encode_frame,
    encode_message,
    frame_flags,
)
from dxg.runtime.logs import LogLimiter
from dxg.vmbus.channel import Channel, Packet
from dxg.vmbus.transport import Transport, TransportClosed

log = logging.getLogger(__name__)

# The longest message (payload plus bulk attachment) a connection accepts by default.
MAX_MESSAGE = 64 * 1024 * 1024
# Descriptors received but not yet claimed by a frame; more is a protocol violation.
MAX_UNCLAIMED_FDS = 64


class ConnectionHandler(Protocol):
    def control_received(self, conn: BusConnection, msg: BusMessage) -> None: ...

    def connection_lost(self, conn: BusConnection, error: BaseException | None) -> None: ...


class BusConnection:
    """See the module docstring. Runs on ``loop``; call it only from there."""

    def __init__(self, loop: asyncio.AbstractEventLoop, transport: Transport,
                 handler: ConnectionHandler, name: str, max_message: int = MAX_MESSAGE) -> None:
        self.loop = loop
        self.transport = transport
        self.name = name
        self.max_message = max_message
        self._handler = handler
        self._reader = MessageReader(max_message, self._place)
        self._fds: collections.deque[int] = collections.deque()
        # Attachments read into a requester's memory whose packet is not routed yet, in order:
        # (relid, trans_id, where).
        self._placed: collections.deque[tuple[int, int, memoryview]] = collections.deque()
        self._channels: dict[int, Channel] = {}
        self._closed = False
        self._receiving = False
        self.last_heard = loop.time()  # when the peer last sent anything (for heartbeats)
        self.logs = LogLimiter(log)  # what the peer provokes cannot flood the log
        self.packets_in = 0

    def __repr__(self) -> str:
        return f"<BusConnection {self.name}{' closed' if self._closed else ''}>"

    def start(self) -> None:
        self.transport.start(self)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def can_pass_fds(self) -> bool:
        return self.transport.can_pass_fds

    @property
    def peer(self) -> str:
        return self.transport.peer

    def attach(self, channel: Channel) -> None:
        self._channels[channel.relid] = channel

    def detach(self, relid: int) -> Channel | None:
        return self._channels.pop(relid, None)

    def channel(self, relid: int) -> Channel | None:
        return self._channels.get(relid)

    def channels(self) -> list[Channel]:
        return list(self._channels.values())

    # ---- sending ------------------------------------------------------------------------------

    def send_control(self, msg: BusMessage) -> None:
        self.send(CONTROL_RELID, VM_PKT_DATA_INBAND, encode_bus_message(msg))

    def send(self, relid: int, packet_type: int, payload: bytes | bytearray | memoryview | Gather,
             trans_id: int = 0, *, wants_completion: bool = False,
             fds: Sequence[int] = ()) -> None:
        """One packet. A payload longer than a packet goes as bulk chunks plus the packet with
        the first part, written as views of ``payload`` (it must not change until the peer took
        it); ``fds`` (duplicated) travel with it. Raises ConnectionError if the connection is
        gone, ValueError if ``fds`` cannot travel on this transport."""
        if self._closed:
            raise TransportClosed(f"bus connection {self.name} is closed")
        if fds and not self.transport.can_pass_fds:
            raise ValueError(f"{self.name}: this transport cannot carry file descriptors")
        size = len(payload)
        big = size > DXG_MAX_VM_BUS_PACKET_SIZE
        if big and size > self.max_message:
            raise ProtocolError(f"message of {size} bytes exceeds {self.max_message}")
        flags = frame_flags(wants_completion, False, len(fds))
        if not big and not isinstance(payload, Gather):
            self.transport.write(encode_frame(relid, packet_type, payload, trans_id, flags), fds)
            return
        self.transport.writev(encode_message(relid, packet_type, payload, trans_id, flags), fds)

    # ---- receiving (Receiver) -----------------------------------------------------------------

    def data_received(self, data: bytes, fds: list[int]) -> None:
        if self._closed:
            close_all(fds)
            return
        self.last_heard = self.loop.time()
        self._fds.extend(fds)
        if self._receiving:
            self._reader.feed(data)
            return  # an in-process peer answered while we route: the loop below takes it
        self._receive(self._reader.frames_of, data)

    def recv_buffers(self) -> list[memoryview] | None:
        """Where the transport should read the next bytes to (a large payload's own place)."""
        if self._closed or self._receiving:
            return None
        return self._reader.buffers()

    def buffers_filled(self, n: int) -> None:
        if self._closed:
            return
        self.last_heard = self.loop.time()
        self._receive(self._reader.filled, n)

    def _receive(self, parse: Callable[[Any], list[Frame]], arg: Any) -> None:
        self._receiving = True
        try:
            if len(self._fds) > MAX_UNCLAIMED_FDS:
                raise ProtocolError(f"{len(self._fds)} descriptors arrived that no frame claims")
            frames = parse(arg)
            while frames:
                for frame in frames:
                    self._route(frame)
                    if self._closed:
                        return
                frames = self._reader.frames()
        except ProtocolError as e:
            log.error("%s: protocol error, dropping the connection: %s", self.name, e)
            self.close(e)
        finally:
            self._receiving = False

    def _place(self, relid: int, owner: int, length: int) -> memoryview | None:
        """MessageReader's place: the memory a requester named for this reply's attachment."""
        channel = self._channels.get(relid)
        found = channel.placement(owner, length) if channel is not None else None
        if found is None:
            return None
        trans_id, where = found
        self._placed.append((relid, trans_id, where))
        return where

    def _route(self, frame: Frame) -> None:
        count = frame.fd_count
        if count > len(self._fds):
            raise ProtocolError(f"frame claims {count} descriptors, {len(self._fds)} arrived")
        fds = [self._fds.popleft() for _ in range(count)]
        payload = frame.payload
        placed = frame.placed
        if placed:
            relid, trans_id, where = self._placed.popleft()
            if (relid, trans_id) != (frame.relid, frame.trans_id) or \
                    frame.packet_type != VM_PKT_COMP:
                # Not the reply it was read for (a peer that numbers oddly): the bytes are
                # this packet's, copied out; that request's memory gets its own reply later.
                payload = bytes(payload) + bytes(where)
                placed = 0
        self.packets_in += 1
        if frame.relid == CONTROL_RELID:
            close_all(fds)
            if fds or frame.has_bulk:
                raise ProtocolError("descriptors or bulk on the control channel")
            msg = decode_bus_message(payload)
            if isinstance(msg, Ping):
                try:
                    self.send_control(Pong(msg.cookie))
                except ConnectionError:
                    pass
                return
            self._handler.control_received(self, msg)
            return
        channel = self._channels.get(frame.relid)
        if channel is None:
            close_all(fds)
            self.logs.log(logging.WARNING, "unknown channel",
                          "%s: packet for unknown channel %d dropped", self.name, frame.relid)
            return
        channel.deliver(Packet(frame.packet_type, frame.flags, frame.trans_id, payload, fds,
                               placed))

    def connection_lost(self, error: BaseException | None) -> None:
        if error is not None and not isinstance(error, (ConnectionError, ProtocolError)):
            log.info("%s: connection lost: %s", self.name, error)
        self._shutdown(error)

    # ---- closing ------------------------------------------------------------------------------

    def say_goodbye(self, msg: BusMessage) -> None:
        """Best-effort last message before close()."""
        try:
            self.send_control(msg)
        except (ConnectionError, ProtocolError, ValueError):
            pass

    def close(self, error: BaseException | None = None) -> None:
        self.transport.close(error)
        self._shutdown(error)

    def _shutdown(self, error: BaseException | None) -> None:
        if self._closed:
            return
        self._closed = True
        close_all(self._fds)
        self._fds.clear()
        self._reader.reset()
        self._placed.clear()
        channels = list(self._channels.values())
        self._channels.clear()
        for ch in channels:
            ch.close("lost its connection")
        try:
            self._handler.connection_lost(self, error)
        except Exception:
            log.exception("%s: connection-lost handler failed", self.name)


__all__ = ["MAX_MESSAGE", "BusConnection", "ConnectionHandler"]
