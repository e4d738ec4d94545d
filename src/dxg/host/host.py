"""The host: adapters, listeners, and one bus session + partition per connected guest.

Everything runs on the host's event loop (a `LoopThread` its owner passes in, or one of its own):
accepting, every guest session, the dispatcher. Backend work runs on the host's worker threads.
No guest can hold up the host: sends to a guest never block (a guest that stops reading is
dropped after HostConfig.send_timeout), connections are limited (HostConfig.max_guests), must
complete the bus handshake in time (HostConfig.handshake_timeout), and running out of descriptors
or memory pauses accepting instead of ending it.

Guests reach the host over a listener (`listen`: Unix or TCP) or, in the same process, over an
in-process transport (`connect_local`: the embedded default, no socket file at all). The public
methods may be called from any thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import secrets
import socket
import uuid
from collections.abc import Callable
from typing import Any

from dxg.host.adapter import HostAdapter
from dxg.host.config import HostConfig, adapter_identity, global_instance_guid
from dxg.host.partition import Partition
from dxg.oslib.fds import close_all
from dxg.protocol.bus import Offer, Refuse, encode_bus_message
from dxg.protocol.framing import CONTROL_RELID, VM_PKT_DATA_INBAND, encode_frame
from dxg.protocol.guids import DXGK_GLOBAL_GUID
from dxg.runtime.loop import Changes, LoopThread, on_loop, owned_loop
from dxg.vmbus.bus import HostBusSession
from dxg.vmbus.transport import (
    Listener,
    LoopbackTransport,
    SocketTransport,
    Transport,
    TransportError,
    WriteBudget,
    read_buffer,
)

log = logging.getLogger(__name__)

GLOBAL_RELID = 1
FIRST_VGPU_RELID = 2


class _Ignore:
    """The receiver of a refused connection: whatever it sends is dropped."""

    def data_received(self, data: bytes, fds: list[int]) -> None:
        close_all(fds)

    def connection_lost(self, error: BaseException | None) -> None:
        pass


class Host:
    """A pydxg host. `listen()` on any number of addresses; every guest that connects gets its
    own bus session (offers: one global channel, one vGPU channel per adapter) and partition."""

    def __init__(self, config: HostConfig | None = None, loop: LoopThread | None = None) -> None:
        self.config = config if config is not None else HostConfig()
        self.config.validate()
        self.host_id = self.config.host_id or secrets.token_hex(16)
        self.global_instance_guid: uuid.UUID = global_instance_guid(self.host_id)
        backend = self.config.backend
        self.adapters: list[HostAdapter] = [
            HostAdapter(i, backend.describe(i, self.config.dedicated_memory_mb,
                                            self.config.shared_memory_mb),
                        adapter_identity(self.host_id, i), FIRST_VGPU_RELID + i)
            for i in range(self.config.adapters)
        ]
        luids = [a.guest_luid for a in self.adapters]
        if len(set(luids)) != len(luids):
            raise ValueError(f"host id {self.host_id!r} derives colliding adapter LUIDs")
        self.rt, self._owns_loop = owned_loop(loop, f"dxg-host {self.config.name}")
        self.workers = concurrent.futures.ThreadPoolExecutor(
            self.config.backend_workers, thread_name_prefix=f"dxg-host-work {self.config.name}")
        self._partitions: dict[int, Partition] = {}
        self._send_budget = WriteBudget(self.config.max_total_send_buffer)
        self._read_buffer = read_buffer()  # shared by every guest connection (one loop)
        self._ids = itertools.count(1)
        self._listeners: list[Listener] = []
        self._closed = False
        self._refused = 0  # connections refused because max_guests were connected
        self._full = False  # a refusal was logged since the host last had room
        self._changes = Changes(self.rt, poll=0.01)

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Host {self.config.name!r} id={self.host_id[:8]} adapters={len(self.adapters)}>"

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.rt.loop

    # ---- listening -----------------------------------------------------------------------------

    @on_loop
    def listen(self, address: str) -> str:
        """Listen on a Unix path or tcp:HOST:PORT (port 0 picks one); returns the bound address."""
        if self._closed:
            raise RuntimeError("host is closed")
        listener = Listener(self.loop, address, self._accepted,
                            name=f"host {self.config.name}")
        self._listeners.append(listener)
        listener.start()
        log.debug("host %s: listening on %s", self.config.name, listener.address)  # printed
        return str(listener.address)

    @property
    def addresses(self) -> list[str]:
        return [str(listener.address) for listener in list(self._listeners)]

    def _accepted(self, sock: socket.socket, peer: str) -> None:
        try:
            transport = SocketTransport(self.loop, sock, peer,
                                        send_timeout=self.config.send_timeout,
                                        max_buffer=self.config.max_send_buffer,
                                        budget=self._send_budget,
                                        read_buffer=self._read_buffer)
        except OSError as e:
            log.warning("host %s: cannot set up the connection of %s: %s", self.config.name,
                        peer, e)
            sock.close()
            return
        self._admit(transport)

    async def connect_local(self, guest_loop: asyncio.AbstractEventLoop,
                            name: str = "local guest") -> Transport:
        """An in-process link to this host: returns the guest's end (on ``guest_loop``); the
        host's end gets a session like any accepted connection. Await it on the guest's loop."""
        if self._closed:
            raise TransportError(f"host {self.config.name} is closed")
        host_end, guest_end = LoopbackTransport.pair(self.loop, guest_loop, name,
                                                     f"host {self.config.name}")
        if self.rt.in_loop():
            self._admit(host_end)
        else:
            self.rt.call_soon(self._admit, host_end)
        return guest_end

    def _offers(self) -> list[Offer]:
        glob = Offer(GLOBAL_RELID, DXGK_GLOBAL_GUID, self.global_instance_guid,
                     mmio_megabytes=self.config.mmio_megabytes)
        vgpus = [a.offer(self.config.host_caps) for a in self.adapters if not a.removed]
        return [glob, *vgpus] if self.config.offer_order == "global-first" else [*vgpus, glob]

    def _admit(self, transport: Transport) -> None:
        """A new guest connection (on the loop): a session and a partition, or a refusal."""
        if self._closed:
            transport.close()
            return
        if len(self._partitions) >= self.config.max_guests:
            self._refuse(transport)
            return
        partition = Partition(next(self._ids), self, self.adapters, self.config, transport.peer,
                              on_closed=self._partition_closed)
        session = HostBusSession(self.loop, transport, partition, self._offers(),
                                 self.config.name, self.config.max_message_bytes)
        partition.session = session
        self._partitions[partition.id] = partition
        self._notify_changed()
        log.info("host %s: guest %s connected (partition %d)", self.config.name, transport.peer,
                 partition.id)
        session.start()
        self.loop.call_later(self.config.handshake_timeout, self._check_handshake, session)

    def _refuse(self, transport: Transport) -> None:
        self._refused += 1
        reason = (f"host {self.config.name} serves {len(self._partitions)} guests, its limit "
                  "(max_guests)")
        # Logged as a warning once each time the host fills up, not for every refusal.
        level = logging.DEBUG if self._full else logging.WARNING
        self._full = True
        log.log(level, "host %s: refused %s: %s (%d refused so far)", self.config.name,
                transport.peer, reason, self._refused)

        transport.start(_Ignore())
        try:
            transport.write(encode_frame(CONTROL_RELID, VM_PKT_DATA_INBAND,
                                         encode_bus_message(Refuse(reason))))
        except ConnectionError:
            pass
        # Closed a moment later, so the refusal is on its way before the FIN.
        self.loop.call_later(0.05, transport.close)

    def _check_handshake(self, session: HostBusSession) -> None:
        if session.handshaken or session.closed:
            return
        log.warning("host %s: guest %s did not complete the bus handshake within %gs; dropped",
                    self.config.name, session.peer, self.config.handshake_timeout)
        session.cut("no bus handshake in time")

    def _partition_closed(self, partition: Partition) -> None:
        self._partitions.pop(partition.id, None)
        self._full = False
        self._notify_changed()

    def _notify_changed(self) -> None:
        self._changes.notify()

    # ---- control -------------------------------------------------------------------------------

    @on_loop
    def partitions(self) -> list[Partition]:
        return list(self._partitions.values())

    @on_loop
    def partition(self, partition_id: int) -> Partition | None:
        return self._partitions.get(partition_id)

    @on_loop
    def remove_adapter(self, index: int) -> None:
        """Surprise-remove an adapter: rescind its vGPU channel in every session; from now on its
        commands answer STATUS_DEVICE_REMOVED and new guests are not offered it. A guest that
        does not take its rescind is dropped by its transport's send timeout."""
        if not 0 <= index < len(self.adapters):
            raise IndexError(f"no adapter {index}")
        adapter = self.adapters[index]
        if adapter.removed:
            return
        adapter.removed = True
        log.info("host %s: adapter %d removed", self.config.name, index)
        from dxg.host.syncobject import adapter_removed

        for partition in list(self._partitions.values()):
            adapter_removed(partition, adapter)  # waits on its objects end with an error
            if partition.session is not None:
                partition.session.rescind(adapter.relid)

    def close(self) -> None:
        """Stop accepting, unload every guest session (dropping its partition), unlink sockets,
        stop the workers (and the loop, if the host made it). Idempotent; any thread."""
        if self._closed:
            return
        if self.rt.closed:
            self._closed = True
            return
        if self.rt.in_loop():
            self._close_on_loop()
        else:
            self.rt.call(self._close_on_loop)
        self.workers.shutdown(wait=False, cancel_futures=True)
        if self._owns_loop:
            self.rt.close()
        log.info("host %s: closed", self.config.name)

    def _close_on_loop(self) -> None:
        if self._closed:
            return
        self._closed = True
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        for partition in list(self._partitions.values()):
            if partition.session is not None:
                partition.session.close()  # goodbye (best effort); the transport ends it
            partition.shutdown()
        self._notify_changed()

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- observation ---------------------------------------------------------------------------

    @on_loop
    def census(self) -> dict[str, Any]:
        """JSON-able picture of everything the host holds (see Partition.census for one guest)."""
        parts = [p.census() for p in self._partitions.values()]
        keys = ("processes", "devices", "contexts", "regions", "adapter_handles", "handles")
        totals = {k: sum(p["totals"][k] for p in parts) for k in keys}
        totals["partitions"] = len(parts)
        return {
            "host": self.config.name,
            "host_id": self.host_id,
            "addresses": self.addresses,
            "refused_connections": self._refused,
            "adapters": [a.census() for a in self.adapters],
            "partitions": parts,
            "totals": totals,
        }

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Wait (off the loop) until `predicate()` holds; it is evaluated on the loop whenever
        guests come and go and every few milliseconds. False on timeout."""
        return self._changes.wait_for(predicate, timeout)

    def wait_for_partitions(self, count: int, timeout: float = 5.0) -> list[Partition]:
        """Wait until exactly `count` guests are connected; returns them (raises on timeout)."""
        if not self.wait_for(lambda: len(self._partitions) == count, timeout):
            raise TimeoutError(f"expected {count} partitions, have {len(self.partitions())}")
        return self.partitions()


__all__ = ["FIRST_VGPU_RELID", "GLOBAL_RELID", "Host"]
