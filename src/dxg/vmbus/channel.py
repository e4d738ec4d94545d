"""A channel: one relid on a bus connection, with its own request-id space.

The requester side (guest) sends data packets that ask for a completion and gets a future that
resolves with the completion carrying the same trans_id; fire-and-forget packets carry trans_id
0. The responder side (host) gets each data packet through ``on_request`` and answers, now or
later, with :meth:`Channel.complete`. Packets carry bytes of any length the command allows (the
connection splits what does not fit one packet into bulk chunks) and, on transports that can,
file descriptors. Everything runs on the connection's loop.

A request whose caller gives up (its task is cancelled: the process died, the call was
interrupted) stays pending: when its completion arrives after all, the optional ``on_late``
callback undoes what the host did for it (a handle it created), so nothing the guest abandoned
stays behind on the host. (A host that never answers is dropped by the heartbeat, which closes
the channel and forgets every pending request.)
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from dxg.oslib.fds import close_all
from dxg.protocol.bus import Offer
from dxg.protocol.framing import (
    FLAG_COMPLETION_REQUESTED,
    VM_PKT_COMP,
    VM_PKT_DATA_INBAND,
    Gather,
)

if TYPE_CHECKING:
    from dxg.vmbus.connection import BusConnection

log = logging.getLogger(__name__)


class ChannelClosed(ConnectionError):
    """The channel was rescinded or its connection went away; the request cannot complete."""


class Packet:
    """One packet as a channel sees it: the whole payload (bulk included: a bytearray then) and
    the descriptors that came with it (owned by whoever takes the packet: close them or keep
    them). ``placed``: a reply whose attachment was read into the memory its request named
    (``Channel.request(into=...)``) has only its first packet's bytes in ``payload``; the other
    ``placed`` bytes are there."""

    __slots__ = ("fds", "flags", "packet_type", "payload", "placed", "trans_id")

    def __init__(self, packet_type: int, flags: int, trans_id: int,
                 payload: bytes | bytearray, fds: list[int], placed: int = 0) -> None:
        self.packet_type = packet_type
        self.flags = flags
        self.trans_id = trans_id
        self.payload = payload
        self.fds = fds
        self.placed = placed

    @property
    def wants_completion(self) -> bool:
        return bool(self.flags & FLAG_COMPLETION_REQUESTED)

    def close_fds(self) -> None:
        close_all(self.fds)
        self.fds = []

    def take_fds(self) -> list[int]:
        fds, self.fds = self.fds, []
        return fds


RequestHandler = Callable[["Channel", Packet], None]
LateHandler = Callable[[Packet], None]


class Channel:
    def __init__(self, connection: BusConnection, offer: Offer) -> None:
        self.connection = connection
        self.offer = offer
        self.relid = offer.relid
        self._ids = itertools.count(1)
        # trans_id -> (the caller's future, what undoes the request if the caller gives up)
        self._pending: dict[int, tuple[asyncio.Future[Packet], LateHandler | None]] = {}
        # Where the attachments of expected replies go, by the low 32 bits of their trans_id
        # (what a bulk chunk announces): (trans_id, the memory).
        self._into: dict[int, tuple[int, memoryview]] = {}
        self._closed = False
        self.close_reason = ""
        self.on_request: RequestHandler | None = None  # responder side
        self.on_inband: RequestHandler | None = None  # notifications (no completion wanted)
        self.on_close: Callable[[Channel], None] | None = None

    def __repr__(self) -> str:
        return f"<Channel {self.relid} {'closed' if self._closed else 'open'}>"

    @property
    def type_guid(self) -> uuid.UUID:
        return self.offer.type_guid

    @property
    def instance_guid(self) -> uuid.UUID:
        return self.offer.instance_guid

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def can_pass_fds(self) -> bool:
        return self.connection.can_pass_fds

    @property
    def pending(self) -> int:
        return len(self._pending)

    # ---- requester side ---------------------------------------------------------------------

    def request(self, payload: bytes | Gather, fds: Sequence[int] = (),
                on_late: LateHandler | None = None, *,
                into: memoryview | None = None) -> asyncio.Future[Packet]:
        """Send ``payload`` asking for a completion; the future resolves with it. ``fds`` are
        duplicated (the caller keeps its own). Cancel the future to give up: ``on_late`` then
        receives the completion if it still arrives.

        ``into``: where the reply's bulk attachment (its bytes after the first packet's) is
        read, straight from the socket, when the reply announces exactly ``len(into)`` such
        bytes; the reply's Packet then says so (``placed``). The memory is written until the
        reply has come or the channel closes, even when the caller gave up."""
        if self._closed:
            raise ChannelClosed(f"channel {self.relid} is {self.close_reason or 'closed'}")
        trans_id = next(self._ids)
        future: asyncio.Future[Packet] = self.connection.loop.create_future()
        # A cancelled future stays here until its completion comes (or the channel closes):
        # that is when the request is known to be abandoned, and its undo runs.
        self._pending[trans_id] = (future, on_late)
        if into is not None and len(into):
            self._into.setdefault(trans_id & 0xFFFFFFFF, (trans_id, into))
        try:
            self.connection.send(self.relid, VM_PKT_DATA_INBAND, payload, trans_id,
                                 wants_completion=True, fds=fds)
        except ConnectionError as e:
            self._forget(trans_id)
            raise ChannelClosed(f"channel {self.relid}: send failed: {e}") from None
        except BaseException:
            # Refused before it went (too long, descriptors this link cannot carry): nothing
            # will complete it.
            self._forget(trans_id)
            raise
        return future

    def _forget(self, trans_id: int) -> None:
        del self._pending[trans_id]
        placed = self._into.get(trans_id & 0xFFFFFFFF)
        if placed is not None and placed[0] == trans_id:
            del self._into[trans_id & 0xFFFFFFFF]

    def placement(self, owner: int, length: int) -> tuple[int, memoryview] | None:
        """(trans_id, memory) of the pending request whose reply's attachment goes to memory
        of ``length`` bytes, by the low 32 bits of its trans_id (``owner``); None: none."""
        found = self._into.get(owner)
        if found is None or len(found[1]) != length:
            return None
        return found

    def send_async(self, payload: bytes | Gather, fds: Sequence[int] = ()) -> None:
        """Fire-and-forget: no completion is requested, trans_id is 0."""
        if self._closed:
            raise ChannelClosed(f"channel {self.relid} is {self.close_reason or 'closed'}")
        try:
            self.connection.send(self.relid, VM_PKT_DATA_INBAND, payload, 0, fds=fds)
        except ConnectionError as e:
            raise ChannelClosed(f"channel {self.relid}: send failed: {e}") from None

    notify = send_async  # host -> guest notifications are in-band packets without completion

    # ---- responder side ---------------------------------------------------------------------

    def complete(self, trans_id: int, payload: bytes | Gather, fds: Sequence[int] = ()) -> bool:
        """Answer request ``trans_id``; False when the channel or connection is gone. A large
        ``payload`` goes as views of its buffers (keep them unchanged until the peer took
        them)."""
        if self._closed:
            return False
        try:
            self.connection.send(self.relid, VM_PKT_COMP, payload, trans_id, fds=fds)
        except ConnectionError:
            return False
        return True

    # ---- called by the connection -----------------------------------------------------------

    def deliver(self, packet: Packet) -> None:
        if packet.packet_type == VM_PKT_COMP:
            entry = self._pending.pop(packet.trans_id, None)
            if entry is not None and self._into:
                placed = self._into.get(packet.trans_id & 0xFFFFFFFF)
                if placed is not None and placed[0] == packet.trans_id:
                    del self._into[packet.trans_id & 0xFFFFFFFF]
            if entry is None:
                self.connection.logs.log(
                    logging.WARNING, "unknown completion",
                    "channel %d: did not find request %d to complete", self.relid,
                    packet.trans_id)
                packet.close_fds()
                return
            future, late = entry
            if not future.done():
                future.set_result(packet)
                return
            if late is None:  # given up on, and nothing to undo
                packet.close_fds()
                return
            try:
                late(packet)
            except Exception:
                log.exception("channel %d: undoing abandoned request %d failed", self.relid,
                              packet.trans_id)
                packet.close_fds()
            return
        handler = self.on_request if packet.wants_completion else (self.on_inband
                                                                   or self.on_request)
        if handler is None:
            self.connection.logs.log(logging.WARNING, "unexpected packet",
                                     "channel %d: unexpected in-band packet dropped", self.relid)
            packet.close_fds()
            return
        try:
            handler(self, packet)
        except Exception:  # a handler bug must not take the bus down
            log.exception("channel %d: packet handler failed", self.relid)
            packet.close_fds()

    def close(self, reason: str = "closed") -> None:
        """Fail every pending request with ChannelClosed; later requests fail at once."""
        if self._closed:
            return
        self._closed = True
        self.close_reason = reason
        pending = list(self._pending.values())
        self._pending.clear()
        self._into.clear()
        for future, _late in pending:
            if not future.done():
                future.set_exception(ChannelClosed(f"channel {self.relid} {reason}"))
        if self.on_close is not None:
            try:
                self.on_close(self)
            except Exception:
                log.exception("channel %d: close handler failed", self.relid)


__all__ = ["Channel", "ChannelClosed", "Packet"]
