"""The host: adapters, listeners, and one bus session + partition per connected guest."""

import contextlib
import itertools
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from dxg.backends.soft import soft_adapter_description
from dxg.host.adapter import HostAdapter
from dxg.host.config import HostConfig, adapter_identity, global_instance_guid
from dxg.host.partition import Partition
from dxg.protocol.bus import Offer
from dxg.protocol.guids import DXGK_GLOBAL_GUID
from dxg.vmbus.bus import HostBusSession
from dxg.vmbus.transport import Listener, Transport

log = logging.getLogger(__name__)

GLOBAL_RELID = 1
FIRST_VGPU_RELID = 2


class Host:
    """A pydxg host. `listen()` on any number of addresses; every guest that connects gets its
    own bus session (offers: one global channel, one vGPU channel per adapter) and partition."""

    def __init__(self, config: HostConfig | None = None) -> None:
        self.config = config if config is not None else HostConfig()
        self.config.validate()
        self.host_id = self.config.host_id or secrets.token_hex(16)
        self.global_instance_guid: uuid.UUID = global_instance_guid(self.host_id)
        description = soft_adapter_description(self.config.dedicated_memory_mb,
                                               self.config.shared_memory_mb)
        self.adapters: list[HostAdapter] = [
            HostAdapter(i, description, adapter_identity(self.host_id, i), FIRST_VGPU_RELID + i)
            for i in range(self.config.adapters)
        ]
        luids = [a.guest_luid for a in self.adapters]
        if len(set(luids)) != len(luids):
            raise ValueError(f"host id {self.host_id!r} derives colliding adapter LUIDs")
        self._lock = threading.Lock()
        self._partitions: dict[int, Partition] = {}
        self._ids = itertools.count(1)
        self._listeners: list[Listener] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._changed = threading.Condition(self._lock)

    def __enter__(self) -> "Host":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Host {self.config.name!r} id={self.host_id[:8]} adapters={len(self.adapters)}>"

    # ---- listening -----------------------------------------------------------------------------

    def listen(self, address: str) -> str:
        """Listen on a Unix path or tcp:HOST:PORT (port 0 picks one); returns the bound address."""
        with self._lock:
            if self._closed:
                raise RuntimeError("host is closed")
        listener = Listener(address)
        bound = str(listener.address)
        thread = threading.Thread(target=self._accept_loop, args=(listener,),
                                  name=f"host-accept {bound}", daemon=True)
        with self._lock:
            if self._closed:
                listener.close()
                raise RuntimeError("host is closed")
            self._listeners.append(listener)
            self._threads.append(thread)
        thread.start()
        log.info("host %s: listening on %s", self.config.name, bound)
        return bound

    @property
    def addresses(self) -> list[str]:
        with self._lock:
            return [str(listener.address) for listener in self._listeners]

    def _accept_loop(self, listener: Listener) -> None:
        while True:
            try:
                transport = listener.accept()
            except OSError:
                break  # the listener was closed
            try:
                self._start_session(transport)
            except Exception:
                log.exception("host %s: could not start a session for %s", self.config.name,
                              transport.peer)
                transport.release()

    def _offers(self) -> list[Offer]:
        glob = Offer(GLOBAL_RELID, DXGK_GLOBAL_GUID, self.global_instance_guid,
                     mmio_megabytes=self.config.mmio_megabytes)
        vgpus = [a.offer(self.config.host_caps) for a in self.adapters if not a.removed]
        return [glob, *vgpus] if self.config.offer_order == "global-first" else [*vgpus, glob]

    def _start_session(self, transport: Transport) -> None:
        with self._lock:
            if self._closed:
                transport.release()
                return
            partition = Partition(next(self._ids), self.adapters, self.config, transport.peer,
                                  on_closed=self._partition_closed)
            session = HostBusSession(transport, partition, self._offers(), self.config.name)
            partition.session = session
            self._partitions[partition.id] = partition
            self._changed.notify_all()
        log.info("host %s: guest %s connected (partition %d)", self.config.name, transport.peer,
                 partition.id)
        session.start()

    def _partition_closed(self, partition: Partition) -> None:
        with self._lock:
            self._partitions.pop(partition.id, None)
            self._changed.notify_all()

    # ---- control -------------------------------------------------------------------------------

    def partitions(self) -> list[Partition]:
        with self._lock:
            return list(self._partitions.values())

    def partition(self, partition_id: int) -> Partition | None:
        with self._lock:
            return self._partitions.get(partition_id)

    def remove_adapter(self, index: int) -> None:
        """Surprise-remove an adapter: rescind its vGPU channel in every session; from now on its
        commands answer STATUS_DEVICE_REMOVED and new guests are not offered it."""
        with self._lock:
            if not 0 <= index < len(self.adapters):
                raise IndexError(f"no adapter {index}")
            adapter = self.adapters[index]
            if adapter.removed:
                return
            adapter.removed = True
            sessions = [p.session for p in self._partitions.values() if p.session is not None]
        log.info("host %s: adapter %d removed", self.config.name, index)
        for session in sessions:
            with contextlib.suppress(OSError, ConnectionError):
                session.rescind(adapter.relid)

    def close(self) -> None:
        """Stop accepting, unload every guest session (dropping its partition), unlink sockets."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            listeners, self._listeners = self._listeners, []
            threads, self._threads = self._threads, []
            partitions = list(self._partitions.values())
        for listener in listeners:
            listener.close()
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout=5)
        for partition in partitions:
            if partition.session is not None:
                partition.session.close()
            partition.shutdown()
        log.info("host %s: closed", self.config.name)

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._closed

    # ---- observation ---------------------------------------------------------------------------

    def census(self) -> dict[str, Any]:
        """JSON-able picture of everything the host holds (see Partition.census for one guest)."""
        parts = [p.census() for p in self.partitions()]
        keys = ("processes", "devices", "contexts", "adapter_handles", "handles")
        totals = {k: sum(p["totals"][k] for p in parts) for k in keys}
        totals["partitions"] = len(parts)
        return {
            "host": self.config.name,
            "host_id": self.host_id,
            "addresses": self.addresses,
            "adapters": [a.census() for a in self.adapters],
            "partitions": parts,
            "totals": totals,
        }

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Wait until `predicate()` holds (re-checked whenever guests come and go, and every
        few milliseconds); False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with self._changed:
                self._changed.wait(min(left, 0.01))

    def wait_for_partitions(self, count: int, timeout: float = 5.0) -> list[Partition]:
        """Wait until exactly `count` guests are connected; returns them (raises on timeout)."""
        if not self.wait_for(lambda: len(self.partitions()) == count, timeout):
            raise TimeoutError(f"expected {count} partitions, have {len(self.partitions())}")
        return self.partitions()
