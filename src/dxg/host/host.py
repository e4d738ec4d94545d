"""The host: adapters, listeners, and one bus session + partition per connected guest.

No guest can hold up the host: every send to a guest is bounded (HostConfig.send_timeout, after
which the guest is dropped), work that touches several guests (adapter removal, close) runs on
one thread per guest with a deadline, after which a guest that is still stuck is cut off, and no
host lock is held while talking to a guest. Connections are limited (HostConfig.max_guests), must
complete the bus handshake in time (HostConfig.handshake_timeout), and running out of
descriptors or memory pauses accepting instead of ending it.
"""

import errno
import itertools
import logging
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from dxg.backends.soft import soft_adapter_description
from dxg.host.adapter import HostAdapter
from dxg.host.config import HostConfig, adapter_identity, global_instance_guid
from dxg.host.partition import Partition
from dxg.protocol.bus import BusMessage, Hello, Offer, negotiate_bus_version
from dxg.protocol.guids import DXGK_GLOBAL_GUID
from dxg.vmbus.bus import HostBusHandler, HostBusSession
from dxg.vmbus.transport import Listener, Transport

log = logging.getLogger(__name__)

GLOBAL_RELID = 1
FIRST_VGPU_RELID = 2

# accept() errors that concern one connection only (accept(2): pending network errors of the
# new socket are reported by accept itself): take the next one.
_ACCEPT_RETRY = frozenset(
    e for e in (errno.ECONNABORTED, errno.EINTR, errno.EAGAIN, errno.EPROTO, errno.ENETDOWN,
                errno.ENOPROTOOPT, errno.EHOSTDOWN, getattr(errno, "ENONET", None),
                errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH, errno.EPERM)
    if e is not None
)
# accept() errors that say the listening socket itself is gone.
_ACCEPT_DEAD = frozenset({errno.EBADF, errno.EINVAL, errno.ENOTSOCK})
# Any other accept() error (EMFILE, ENFILE, ENOBUFS, ENOMEM, ...) is a shortage that passes:
# accepting pauses, from ACCEPT_BACKOFF_MIN doubling up to ACCEPT_BACKOFF_MAX seconds.
ACCEPT_BACKOFF_MIN = 0.01
ACCEPT_BACKOFF_MAX = 1.0
# Adapter removal: how long the rescinds may take in all; a guest whose rescind has not gone out
# by then (it does not read) is disconnected, so it never keeps a channel the host dropped.
RESCIND_WAIT = 6.0
# close(): how long the goodbyes may take before the guests still stuck are cut off, and then how
# long their sessions may take to wind down.
UNLOAD_WAIT = 2.0
UNLOAD_CUT_WAIT = 5.0


class GuestSession(HostBusSession):
    """A host bus session that records when the guest's HELLO was accepted."""

    def __init__(self, transport: Transport, handler: HostBusHandler, offers: list[Offer],
                 host_name: str, handshake_deadline: float) -> None:
        self.handshaken = threading.Event()
        self.handshake_deadline = handshake_deadline  # time.monotonic() by which to say HELLO
        super().__init__(transport, handler, offers, host_name)

    def _on_control(self, msg: BusMessage) -> None:
        super()._on_control(msg)
        if isinstance(msg, Hello) and negotiate_bus_version(msg.versions) is not None:
            self.handshaken.set()


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
        self._closing = threading.Event()  # set with _closed: wakes paused accept loops
        self._changed = threading.Condition(self._lock)
        self._handshakes: dict[int, GuestSession] = {}  # partition id -> session not yet HELLO'd
        self._watchdog: threading.Thread | None = None
        self._refused = 0  # connections refused because max_guests were connected
        self._full = False  # a refusal was logged since the host last had room

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
            watchdog = None
            if self._watchdog is None:
                watchdog = self._watchdog = threading.Thread(
                    target=self._watch_handshakes, name=f"host-handshakes {self.config.name}",
                    daemon=True)
                self._threads.append(watchdog)
        if watchdog is not None:
            watchdog.start()
        thread.start()
        log.info("host %s: listening on %s", self.config.name, bound)
        return bound

    @property
    def addresses(self) -> list[str]:
        with self._lock:
            return [str(listener.address) for listener in self._listeners]

    def _accept_loop(self, listener: Listener) -> None:
        name = self.config.name
        backoff = ACCEPT_BACKOFF_MIN
        short_of: int | None = None  # the errno accepting is paused for, logged once
        while not self._closing.is_set():
            try:
                sock, peer = listener.sock.accept()
            except OSError as e:
                if self._closing.is_set():
                    break
                if e.errno in _ACCEPT_RETRY:
                    log.debug("host %s: accept on %s: %s", name, listener.address, e)
                    continue
                if e.errno in _ACCEPT_DEAD:
                    log.error("host %s: listener %s failed, no longer accepting: %s", name,
                              listener.address, e)
                    break
                if short_of != e.errno:
                    log.warning("host %s: cannot accept on %s (%s); pausing until it passes",
                                name, listener.address, e)
                    short_of = e.errno
                self._closing.wait(backoff)
                backoff = min(backoff * 2, ACCEPT_BACKOFF_MAX)
                continue
            if short_of is not None:
                log.warning("host %s: accepting on %s again", name, listener.address)
                short_of = None
            backoff = ACCEPT_BACKOFF_MIN
            self._admit(sock, str(peer) if peer else str(listener.address))

    def _admit(self, sock: socket.socket, peer: str) -> None:
        try:
            transport = Transport(sock, peer, send_timeout=self.config.send_timeout)
        except OSError as e:
            log.warning("host %s: cannot set up the connection of %s: %s", self.config.name,
                        peer, e)
            sock.close()
            return
        try:
            self._start_session(transport)
        except Exception:
            log.exception("host %s: could not start a session for %s", self.config.name, peer)
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
            if len(self._partitions) >= self.config.max_guests:
                self._refused += 1
                transport.release()
                # Logged as a warning once each time the host fills up, not for every refusal.
                level = logging.DEBUG if self._full else logging.WARNING
                self._full = True
                log.log(level, "host %s: %d guests connected, the limit: refused %s "
                        "(%d refused so far)", self.config.name, len(self._partitions),
                        transport.peer, self._refused)
                return
            partition = Partition(next(self._ids), self.adapters, self.config, transport.peer,
                                  on_closed=self._partition_closed)
            deadline = time.monotonic() + self.config.handshake_timeout
            session = GuestSession(transport, partition, self._offers(), self.config.name,
                                   deadline)
            partition.session = session
            self._partitions[partition.id] = partition
            self._handshakes[partition.id] = session
            self._changed.notify_all()
        log.info("host %s: guest %s connected (partition %d)", self.config.name, transport.peer,
                 partition.id)
        try:
            session.start()
        except BaseException:
            partition.shutdown()  # drops it from the host
            raise

    def _partition_closed(self, partition: Partition) -> None:
        with self._lock:
            self._partitions.pop(partition.id, None)
            self._handshakes.pop(partition.id, None)
            self._full = False
            self._changed.notify_all()

    def _watch_handshakes(self) -> None:
        """Cut off every guest that has not completed the bus handshake by its deadline."""
        while True:
            with self._changed:
                if self._closed:
                    return
                now = time.monotonic()
                late: list[GuestSession] = []
                for pid, session in list(self._handshakes.items()):
                    if session.handshaken.is_set() or session.closed.is_set():
                        del self._handshakes[pid]
                    elif session.handshake_deadline <= now:
                        del self._handshakes[pid]
                        late.append(session)
                if not late:
                    next_deadline = min((s.handshake_deadline
                                         for s in self._handshakes.values()), default=None)
                    self._changed.wait(None if next_deadline is None else next_deadline - now)
                    continue
            for session in late:
                log.warning("host %s: guest %s did not complete the bus handshake within "
                            "%gs; dropped", self.config.name, session.peer,
                            self.config.handshake_timeout)
                session.conn.transport.close()  # no goodbye: the reader thread tears down

    # ---- per-guest work, one thread per guest ---------------------------------------------------

    @staticmethod
    def _for_each(what: str, partitions: Sequence[Partition],
                  work: Callable[[Partition], None]) -> list[tuple[Partition, threading.Thread]]:
        """Start `work(partition)` for every partition on a thread of its own (inline when no
        thread can be had), so that a guest that is stuck delays no other."""

        def run(partition: Partition) -> None:
            try:
                work(partition)
            except Exception:
                log.exception("host: %s of partition %d failed", what, partition.id)

        started: list[tuple[Partition, threading.Thread]] = []
        for partition in partitions:
            thread = threading.Thread(target=run, args=(partition,),
                                      name=f"host-{what} {partition.id}", daemon=True)
            try:
                thread.start()
            except RuntimeError:
                run(partition)
                continue
            started.append((partition, thread))
        return started

    @staticmethod
    def _join(started: list[tuple[Partition, threading.Thread]],
              timeout: float) -> list[tuple[Partition, threading.Thread]]:
        """Wait up to `timeout` for all of them; returns those still running."""
        deadline = time.monotonic() + timeout
        for _, thread in started:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [(p, t) for p, t in started if t.is_alive()]

    # ---- control -------------------------------------------------------------------------------

    def partitions(self) -> list[Partition]:
        with self._lock:
            return list(self._partitions.values())

    def partition(self, partition_id: int) -> Partition | None:
        with self._lock:
            return self._partitions.get(partition_id)

    def remove_adapter(self, index: int) -> None:
        """Surprise-remove an adapter: rescind its vGPU channel in every session; from now on its
        commands answer STATUS_DEVICE_REMOVED and new guests are not offered it. The rescinds go
        out in parallel; a guest that cannot take its rescind within RESCIND_WAIT seconds is
        disconnected."""
        with self._lock:
            if not 0 <= index < len(self.adapters):
                raise IndexError(f"no adapter {index}")
            adapter = self.adapters[index]
            if adapter.removed:
                return
            adapter.removed = True
            partitions = [p for p in self._partitions.values() if p.session is not None]
        log.info("host %s: adapter %d removed", self.config.name, index)

        def rescind(partition: Partition) -> None:
            assert partition.session is not None
            partition.session.rescind(adapter.relid)  # send errors are the session's to absorb

        for partition, _ in self._join(self._for_each("rescind", partitions, rescind),
                                       RESCIND_WAIT):
            log.warning("host %s: guest %s did not take the rescind of adapter %d; "
                        "disconnected", self.config.name, partition.peer, index)
            self._cut(partition)

    @staticmethod
    def _cut(partition: Partition) -> None:
        """Shut a guest's connection down without a goodbye and without waiting: its session's
        reader thread wakes (as does a send stuck on it) and tears session and partition down."""
        if partition.session is not None:
            partition.session.conn.transport.close()

    def close(self) -> None:
        """Stop accepting, unload every guest session (dropping its partition), unlink sockets."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._closing.set()
            self._changed.notify_all()
            listeners, self._listeners = self._listeners, []
            threads, self._threads = self._threads, []
            partitions = list(self._partitions.values())
        for listener in listeners:
            listener.close()
        for thread in threads:
            # One that listen() has not started yet finds the host closed and returns at once.
            if thread is not threading.current_thread() and thread.ident is not None:
                thread.join(timeout=5)

        def unload(partition: Partition) -> None:
            if partition.session is not None:
                partition.session.close()  # goodbye (best effort), then wind the session down

        stuck = self._join(self._for_each("unload", partitions, unload), UNLOAD_WAIT)
        for partition, _ in stuck:
            log.warning("host %s: guest %s is stuck; cut off", self.config.name, partition.peer)
            self._cut(partition)
        for partition, _ in self._join(stuck, UNLOAD_CUT_WAIT):
            log.error("host %s: session of guest %s did not wind down", self.config.name,
                      partition.peer)
        for partition in partitions:
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
        with self._lock:
            refused = self._refused
        return {
            "host": self.config.name,
            "host_id": self.host_id,
            "addresses": self.addresses,
            "refused_connections": refused,
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
