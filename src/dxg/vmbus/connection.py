"""One transport carrying the bus control messages (relid 0) and every channel's packets.

The connection decodes and routes, nothing else: control messages go to its handler (PING is
answered on the spot, so a peer busy with long work still proves it is alive), channel packets to
the channel registered for their relid, with the descriptors the transport brought (matched to
frames by each frame's count) and their bulk attachment (the chunks just before them, bounded by
``max_message``). Unknown relids are dropped. Anything malformed drops the connection.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Sequence
from typing import Protocol

from dxg.oslib.fds import close_all
from dxg.protocol.bus import BusMessage, Ping, Pong, decode_bus_message, encode_bus_message
from dxg.protocol.errors import ProtocolError
from dxg.protocol.framing import (
    CONTROL_RELID,
    DXG_MAX_VM_BUS_PACKET_SIZE,
    VM_PKT_BULK,
    VM_PKT_DATA_INBAND,
    Frame,
    FrameReader,
    encode_bulk,
    encode_frame,
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
        self._reader = FrameReader()
        self._fds: collections.deque[int] = collections.deque()
        self._bulk = bytearray()
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

    def send(self, relid: int, packet_type: int, payload: bytes, trans_id: int = 0, *,
             wants_completion: bool = False, fds: Sequence[int] = ()) -> None:
        """One packet. A payload longer than a packet goes as bulk chunks plus the packet with
        the first part; ``fds`` (duplicated) travel with it. Raises ConnectionError if the
        connection is gone, ValueError if ``fds`` cannot travel on this transport."""
        if self._closed:
            raise TransportClosed(f"bus connection {self.name} is closed")
        if fds and not self.transport.can_pass_fds:
            raise ValueError(f"{self.name}: this transport cannot carry file descriptors")
        big = len(payload) > DXG_MAX_VM_BUS_PACKET_SIZE
        if big and len(payload) > self.max_message:
            raise ProtocolError(f"message of {len(payload)} bytes exceeds {self.max_message}")
        inline = payload[:DXG_MAX_VM_BUS_PACKET_SIZE] if big else payload
        frame = encode_frame(relid, packet_type, inline, trans_id,
                             frame_flags(wants_completion, big, len(fds)))
        if big:
            frame = b"".join(encode_bulk(relid, memoryview(payload)[DXG_MAX_VM_BUS_PACKET_SIZE:])) \
                + frame
        self.transport.write(frame, fds)

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
        self._receiving = True
        try:
            if len(self._fds) > MAX_UNCLAIMED_FDS:
                raise ProtocolError(f"{len(self._fds)} descriptors arrived that no frame claims")
            frames = self._reader.frames_of(data)
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

    def _route(self, frame: Frame) -> None:
        count = frame.fd_count
        if count > len(self._fds):
            raise ProtocolError(f"frame claims {count} descriptors, {len(self._fds)} arrived")
        fds = [self._fds.popleft() for _ in range(count)]
        if frame.packet_type == VM_PKT_BULK:
            close_all(fds)
            if fds or frame.relid == CONTROL_RELID:
                raise ProtocolError("a bulk chunk with descriptors or on the control channel")
            if len(self._bulk) + len(frame.payload) + DXG_MAX_VM_BUS_PACKET_SIZE > \
                    self.max_message:
                raise ProtocolError(f"message longer than {self.max_message} bytes")
            self._bulk += frame.payload
            return
        payload = frame.payload
        if frame.has_bulk:
            payload += bytes(self._bulk)
            self._bulk.clear()
        elif self._bulk:
            close_all(fds)
            raise ProtocolError("bulk chunks that no packet claims")
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
        channel.deliver(Packet(frame.packet_type, frame.flags, frame.trans_id, payload, fds))

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
        self._bulk.clear()
        channels = list(self._channels.values())
        self._channels.clear()
        for ch in channels:
            ch.close("lost its connection")
        try:
            self._handler.connection_lost(self, error)
        except Exception:
            log.exception("%s: connection-lost handler failed", self.name)


__all__ = ["MAX_MESSAGE", "BusConnection", "ConnectionHandler"]
