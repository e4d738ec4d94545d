"""A channel: one relid on a bus connection, with its own request-id space.

The requester side (guest) sends data packets that ask for a completion and blocks only the
calling thread until the completion with the same trans_id arrives; fire-and-forget packets
carry trans_id 0. The responder side (host) gets each data packet through `on_request`, whose
return value becomes the completion payload.
"""

import contextlib
import itertools
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dxg.protocol.bus import Offer
from dxg.protocol.errors import ProtocolError
from dxg.protocol.framing import (
    DXG_MAX_VM_BUS_PACKET_SIZE,
    FLAG_COMPLETION_REQUESTED,
    VM_PKT_COMP,
    VM_PKT_DATA_INBAND,
    Frame,
)

if TYPE_CHECKING:
    from dxg.vmbus.connection import BusConnection

log = logging.getLogger(__name__)


class ChannelClosed(ConnectionError):
    """The channel was rescinded or its connection went away; the request cannot complete."""


class ChannelTimeout(TimeoutError):
    """The other side did not complete a request in time."""


@dataclass(slots=True)
class _Pending:
    done: threading.Event = field(default_factory=threading.Event)
    result: bytes | None = None
    error: BaseException | None = None


RequestHandler = Callable[["Channel", bytes, bool], bytes | None]
InbandHandler = Callable[["Channel", bytes], None]


class Channel:
    def __init__(self, connection: "BusConnection", offer: Offer) -> None:
        self.connection = connection
        self.offer = offer
        self.relid = offer.relid
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.on_request: RequestHandler | None = None
        self.on_inband: InbandHandler | None = None
        self.on_close: Callable[[Channel], None] | None = None

    @property
    def type_guid(self) -> uuid.UUID:
        return self.offer.type_guid

    @property
    def instance_guid(self) -> uuid.UUID:
        return self.offer.instance_guid

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- requester side -------------------------------------------------------------------

    def request(self, payload: bytes, timeout: float | None = 30.0) -> bytes:
        """Send a packet that asks for a completion; return the completion payload."""
        if len(payload) > DXG_MAX_VM_BUS_PACKET_SIZE:
            raise ValueError(f"request of {len(payload)} bytes exceeds the 128 KiB cap")
        pending = _Pending()
        with self._lock:
            if self._closed:
                raise ChannelClosed(f"channel {self.relid} is closed")
            trans_id = next(self._ids)
            self._pending[trans_id] = pending
        try:
            self.connection.send_frame(
                self.relid, VM_PKT_DATA_INBAND, payload, trans_id, FLAG_COMPLETION_REQUESTED
            )
        except OSError as e:
            with self._lock:
                self._pending.pop(trans_id, None)
            raise ChannelClosed(f"channel {self.relid}: send failed: {e}") from None
        if not pending.done.wait(timeout):
            with self._lock:
                self._pending.pop(trans_id, None)
            raise ChannelTimeout(f"channel {self.relid}: no completion for request {trans_id}")
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    def send_async(self, payload: bytes) -> None:
        """Fire-and-forget: no completion is requested, trans_id is 0."""
        if self._closed:
            raise ChannelClosed(f"channel {self.relid} is closed")
        try:
            self.connection.send_frame(self.relid, VM_PKT_DATA_INBAND, payload, 0, 0)
        except OSError as e:
            raise ChannelClosed(f"channel {self.relid}: send failed: {e}") from None

    # ---- responder side -------------------------------------------------------------------

    def notify(self, payload: bytes) -> None:
        """An in-band packet that asks for no completion (host -> guest notifications)."""
        self.send_async(payload)

    # ---- called by the connection's reader --------------------------------------------------

    def deliver(self, frame: Frame) -> None:
        if frame.packet_type == VM_PKT_COMP:
            with self._lock:
                pending = self._pending.pop(frame.trans_id, None)
            if pending is None:
                log.warning("channel %d: did not find request %d to complete", self.relid,
                            frame.trans_id)
                return
            pending.result = frame.payload
            pending.done.set()
            return
        if self.on_request is not None:
            try:
                reply = self.on_request(self, frame.payload, frame.wants_completion)
            except Exception:  # a handler bug must not take the bus down
                log.exception("channel %d: request handler failed", self.relid)
                reply = b""
            if frame.wants_completion:
                try:
                    self.connection.send_frame(self.relid, VM_PKT_COMP, reply or b"", frame.trans_id)
                except ProtocolError:
                    log.error("channel %d: reply of %d bytes exceeds the cap; sent empty",
                              self.relid, len(reply or b""))
                    with contextlib.suppress(OSError, ConnectionError):
                        self.connection.send_frame(self.relid, VM_PKT_COMP, b"", frame.trans_id)
                except (OSError, ConnectionError):
                    pass
            return
        if self.on_inband is not None:
            try:
                self.on_inband(self, frame.payload)
            except Exception:
                log.exception("channel %d: in-band handler failed", self.relid)
            return
        log.warning("channel %d: unexpected in-band packet dropped", self.relid)

    def close(self, reason: str = "closed") -> None:
        """Fail every pending request with ChannelClosed; later requests fail at once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._pending.values())
            self._pending.clear()
        for p in pending:
            p.error = ChannelClosed(f"channel {self.relid} {reason}")
            p.done.set()
        if self.on_close is not None:
            try:
                self.on_close(self)
            except Exception:
                log.exception("channel %d: close handler failed", self.relid)
