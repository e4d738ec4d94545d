"""Host configuration and the deterministic identity (LUIDs, channel GUIDs) derived from it."""

import hashlib
import uuid
from dataclasses import dataclass, field

from dxg.backends import Backend
from dxg.backends.soft import SoftBackend
from dxg.protocol.guids import guid_to_luid, vgpu_instance_guid

OFFER_ORDERS = ("global-first", "vgpu-first")


@dataclass(slots=True)
class HostConfig:
    adapters: int = 2  # adapters this host exposes
    name: str = "pydxg-host"  # host name sent in the bus version response
    # Seed of every identity (LUIDs, channel instance GUIDs): a restarted host with the same id
    # offers the same adapters. None: a random id per Host instance.
    host_id: str | None = None
    offer_order: str = "global-first"  # or "vgpu-first": the order offers reach a new guest
    async_msg_enabled: bool = True  # reported in GETINTERNALADAPTERINFO
    dedicated_memory_mb: int = 1024  # per adapter (KMTQAITYPE_GETSEGMENTSIZE)
    shared_memory_mb: int = 4096  # per adapter (KMTQAITYPE_GETSEGMENTSIZE)
    # Device memory one guest's processes may commit on each adapter, both segment groups
    # together, in bytes (None: the segments alone bound it). Its processes' budgets and
    # segment sizes reflect it (dxg.host.quota).
    guest_memory: int | None = None
    mmio_megabytes: int = 256  # IO-space size in the global channel's offer
    host_caps: int = 0  # vGPU offer host caps (bit 0 map_guest_memory: not supported yet)
    max_handles_per_partition: int = 1 << 20  # live host objects one guest may hold
    # Host memory one guest's objects may pin, in bytes, as estimated per object (see
    # dxg.host.partition.OBJECT_BYTES) plus the bytes of its regions; past it, creating
    # commands fail with STATUS_NO_MEMORY.
    max_partition_bytes: int = 256 << 20
    # What one process of a guest may hold of that: objects, and bytes of memory. A guest
    # bounds its users' shares too (dxg.guest.quota); these hold even for a guest that does not.
    max_objects_per_process: int = 1 << 15
    max_process_bytes: int = 64 << 20
    # Device memory (dxg.host.memory). Allocations up to arena_max_allocation bytes are carved
    # from per-process arenas (the first arena_min_bytes, each next one twice the largest, up to
    # arena_max_bytes); larger ones get a shared-memory block of their own. A process may hold
    # max_blocks_per_process blocks (arenas, dedicated blocks, fence blocks: one descriptor each
    # on the host) and, per adapter, max_va_entries GPU VA reservations and mappings together
    # (each also charged VA_ENTRY_BYTES against the memory budget above).
    arena_max_allocation: int = 1 << 20
    arena_min_bytes: int = 4 << 20
    arena_max_bytes: int = 64 << 20
    max_blocks_per_process: int = 1024
    max_va_entries: int = 1 << 16
    max_guests: int = 64  # guests connected at once; further connections are refused
    # A guest must complete the bus handshake (an accepted HELLO) this many seconds after it
    # connects, or it is dropped with its partition.
    handshake_timeout: float = 10.0
    # A guest that stops reading for this many seconds, while the host has something to send
    # it, is dropped; so is one that lets more than max_send_buffer bytes wait for it, or whose
    # waiting bytes would take all guests' together past max_total_send_buffer.
    send_timeout: float = 15.0
    max_send_buffer: int = 128 << 20
    max_total_send_buffer: int = 1 << 30
    # The engine behind the adapters (describes them; runs what can take long).
    backend: Backend = field(default_factory=SoftBackend)
    # Worker threads that run backend work (and long escapes), so the loop never blocks.
    backend_workers: int = 32
    # Of those, what one guest and one process of it may keep busy at once: the rest of their
    # jobs wait their turn, so one guest (or process) cannot take every worker from the others.
    max_jobs_per_partition: int = 16
    max_jobs_per_process: int = 4
    # The TDR (timeout detection, as Windows' TdrDelay): a command buffer that has run this many
    # seconds on the engine (the CPU time of its thread) and is still running is stopped at its
    # next command boundary and its device enters the HUNG state (dxg.host.hwqueue). 0: off.
    tdr_seconds: float = 2.0
    # Requests of one guest (and of one process of it) that may wait or run as tasks at once
    # (long commands), and the bytes they hold; past any, a new one fails STATUS_NO_MEMORY.
    max_pending_calls: int = 4096
    max_pending_calls_per_process: int = 1024
    max_pending_bytes: int = 256 << 20
    # The longest message a guest may send or be sent (a bulk attachment beyond one packet).
    max_message_bytes: int = 64 << 20
    # The largest single pydxg escape shared-memory region (also counted in the budget above).
    max_region_bytes: int = 64 << 20

    def validate(self) -> None:
        if not 0 <= self.adapters <= 64:
            raise ValueError(f"adapters must be 0..64, not {self.adapters}")
        if self.offer_order not in OFFER_ORDERS:
            raise ValueError(f"offer_order must be one of {OFFER_ORDERS}, not {self.offer_order!r}")
        if self.dedicated_memory_mb < 0 or self.shared_memory_mb < 0 or self.mmio_megabytes < 0:
            raise ValueError("memory sizes must not be negative")
        if self.guest_memory is not None and self.guest_memory < 0:
            raise ValueError("guest_memory must not be negative")
        if self.max_handles_per_partition < 1:
            raise ValueError("max_handles_per_partition must be positive")
        if self.max_partition_bytes < 1:
            raise ValueError("max_partition_bytes must be positive")
        if self.max_objects_per_process < 1 or self.max_process_bytes < 1:
            raise ValueError("per-process limits must be positive")
        if self.max_guests < 1:
            raise ValueError("max_guests must be positive")
        if not self.handshake_timeout > 0:
            raise ValueError("handshake_timeout must be positive")
        if not 0.001 <= self.send_timeout <= 3600:
            raise ValueError("send_timeout must be 0.001..3600 seconds")
        if not 1 <= self.backend_workers <= 1024:
            raise ValueError("backend_workers must be 1..1024")
        if not 1 <= self.max_jobs_per_process <= self.max_jobs_per_partition:
            raise ValueError("need 1 <= max_jobs_per_process <= max_jobs_per_partition")
        if not 0 <= self.tdr_seconds <= 3600:  # (also refuses NaN)
            raise ValueError(f"tdr_seconds must be 0 (off) or up to 3600, not {self.tdr_seconds}")
        if not 1 <= self.max_pending_calls_per_process <= self.max_pending_calls:
            raise ValueError("need 1 <= max_pending_calls_per_process <= max_pending_calls")
        if self.max_pending_bytes < 1:
            raise ValueError("max_pending_bytes must be positive")
        # (a guest copies memory over TCP in pieces of 4 MiB: dxg.guest.ioctl_memory.COPY_CHUNK)
        if not 8 << 20 <= self.max_message_bytes <= 1 << 32:
            raise ValueError("max_message_bytes must be 8 MiB..4 GiB")
        if not self.max_message_bytes < self.max_send_buffer <= self.max_total_send_buffer:
            raise ValueError("need max_message_bytes < max_send_buffer <= max_total_send_buffer")
        if self.max_region_bytes < 1:
            raise ValueError("max_region_bytes must be positive")
        page = 4096
        if not (0 < self.arena_max_allocation <= self.arena_min_bytes <= self.arena_max_bytes
                and self.arena_min_bytes % page == 0 and self.arena_max_bytes % page == 0):
            raise ValueError("need 0 < arena_max_allocation <= arena_min_bytes <= "
                             "arena_max_bytes, the arena sizes whole pages")
        if self.max_blocks_per_process < 1 or self.max_va_entries < 1:
            raise ValueError("max_blocks_per_process and max_va_entries must be positive")


@dataclass(frozen=True, slots=True)
class AdapterIdentity:
    """The three LUIDs of one adapter and its vGPU channel instance GUID.

    guest_luid is what the guest enumerates: the first 8 bytes of the instance GUID.
    host_adapter_luid is the physical adapter's LUID on the host; host_vgpu_luid names the vGPU
    on the wire (extension header, offer). All three differ.
    """

    guest_luid: int
    host_adapter_luid: int
    host_vgpu_luid: int
    instance_guid: uuid.UUID


def _digest(host_id: str, *parts: object) -> bytes:
    text = "\0".join(["pydxg", host_id, *map(str, parts)])
    return hashlib.sha256(text.encode()).digest()


def derive_luid(host_id: str, *parts: object) -> int:
    """A LUID (LowPart u32, HighPart a positive LONG) from a hash of the host id and `parts`."""
    d = _digest(host_id, *parts)
    low = int.from_bytes(d[0:4], "little") or 1
    high = (int.from_bytes(d[4:8], "little") & 0x7FFFFFFF) or 1
    return (high << 32) | low


def global_instance_guid(host_id: str) -> uuid.UUID:
    return uuid.UUID(bytes=_digest(host_id, "global-channel")[:16], version=4)


def adapter_identity(host_id: str, index: int) -> AdapterIdentity:
    salt = _digest(host_id, "salt")[:8]
    guest = derive_luid(host_id, index, "guest")
    instance = vgpu_instance_guid(guest, salt)
    guest = guid_to_luid(instance)
    host_adapter = derive_luid(host_id, index, "host-adapter")
    host_vgpu = derive_luid(host_id, index, "host-vgpu")
    n = 0
    while len({guest, host_adapter, host_vgpu}) < 3:  # astronomically rare; stay deterministic
        n += 1
        host_adapter = derive_luid(host_id, index, "host-adapter", n)
        host_vgpu = derive_luid(host_id, index, "host-vgpu", n)
    return AdapterIdentity(guest, host_adapter, host_vgpu, instance)
