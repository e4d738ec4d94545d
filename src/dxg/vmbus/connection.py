"""One transport carrying the bus control messages (relid 0) and every channel's frames."""

import contextlib
import logging
import threading
from collections.abc import Callable

from dxg.protocol.bus import BusMessage, decode_bus_message, encode_bus_message
from dxg.protocol.errors import ProtocolError
from dxg.protocol.framing import CONTROL_RELID, VM_PKT_DATA_INBAND, FrameReader, encode_frame
from dxg.vmbus.channel import Channel
from dxg.vmbus.transport import Transport

log = logging.getLogger(__name__)


class BusConnection:
    """Reads frames on its own thread and routes them: control messages to `on_control`,
    channel packets to the channel registered for their relid. Unknown relids are dropped."""

    def __init__(
        self,
        transport: Transport,
        on_control: Callable[[BusMessage], None],
        on_lost: Callable[["BusConnection"], None],
        name: str,
    ) -> None:
        self.transport = transport
        self.name = name
        self._on_control = on_control
        self._on_lost = on_lost
        self._channels: dict[int, Channel] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"bus-rx {name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def attach(self, channel: Channel) -> None:
        with self._lock:
            self._channels[channel.relid] = channel

    def detach(self, relid: int) -> Channel | None:
        with self._lock:
            return self._channels.pop(relid, None)

    def channel(self, relid: int) -> Channel | None:
        with self._lock:
            return self._channels.get(relid)

    def send_control(self, msg: BusMessage, lock_timeout: float | None = None) -> None:
        self.send_frame(CONTROL_RELID, VM_PKT_DATA_INBAND, encode_bus_message(msg),
                        lock_timeout=lock_timeout)

    def send_frame(
        self, relid: int, packet_type: int, payload: bytes, trans_id: int = 0, flags: int = 0,
        lock_timeout: float | None = None,
    ) -> None:
        if self._closed.is_set():
            raise ConnectionError(f"bus connection {self.name} is closed")
        self.transport.send(encode_frame(relid, packet_type, payload, trans_id, flags),
                            lock_timeout)

    def say_goodbye(self, msg: BusMessage) -> None:
        """Best-effort last message before close(): never waits behind a stuck sender."""
        with contextlib.suppress(OSError, ConnectionError):
            self.send_control(msg, lock_timeout=1.0)

    def close(self) -> None:
        self._closing = True
        self.transport.close()
        if threading.current_thread() is not self._thread:
            if self._thread.is_alive():
                self._thread.join(timeout=5)
            if not self._thread.is_alive():
                self.transport.release()
        self._shutdown()

    def _run(self) -> None:
        reader = FrameReader()
        try:
            while True:
                data = self.transport.recv()
                if not data:
                    break
                reader.feed(data)
                for frame in reader.frames():
                    if frame.relid == CONTROL_RELID:
                        self._on_control(decode_bus_message(frame.payload))
                        continue
                    ch = self.channel(frame.relid)
                    if ch is None:
                        log.warning("%s: packet for unknown channel %d dropped", self.name,
                                    frame.relid)
                        continue
                    ch.deliver(frame)
        except ProtocolError as e:
            log.error("%s: protocol error, dropping the connection: %s", self.name, e)
        except OSError as e:
            if not (self._closing or self._closed.is_set()):
                log.info("%s: connection lost: %s", self.name, e)
        except Exception:
            log.exception("%s: bus reader failed", self.name)
        finally:
            self.transport.release()
            self._shutdown()

    def _shutdown(self) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            channels = list(self._channels.values())
            self._channels.clear()
        for ch in channels:
            ch.close("lost its connection")
        try:
            self._on_lost(self)
        except Exception:
            log.exception("%s: connection-lost handler failed", self.name)
