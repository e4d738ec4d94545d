"""Objects shared between processes by descriptor, on the host (docs/sharing.md).

A *shared resource* is made by CREATEALLOCATION with ``create_resource | create_shared |
nt_security_sharing``; a *shared sync object* (a monitored fence) by CREATESYNCOBJECT with
``shared | nt_security_sharing``. Each gets an NT handle in the partition's table (the handle
OPENRESOURCE and OPENSYNCOBJECT name, as the real host's NT handle) and lives as long as a host
handle names it (its creator's, or one opened in any process of the guest) or a reference
CREATENTSHAREDOBJECT took is not given back (the guest takes one per share descriptor it hands
out, and gives it back when every copy of that descriptor is closed). The real driver keeps this
life on the guest; here the host counts both, so that a guest that dies leaves nothing.

Memory. Each allocation of a shared resource has a block of its own (never an arena, which
holds other allocations of its process), made with a partition-wide id (``SHARED_BLOCK_IDS``
and up) so that it never collides with a process's own block numbers, and its mode set to 0444:
the descriptor a read-only opener gets is the block reopened O_RDONLY through /proc, and a
process that is not root cannot reopen it for writing (nor can it map it writable, or make a
read-only mapping writable). Every allocation handle of the resource, the creator's included, is
a *view* (`Allocation.shared`): the bytes are committed once, by its `SharedAllocation`, charged
to one process. The creator pays first. When the charged process lets go, a holder pays whose
quotas fit the bytes (dxg.host.quota); when none does, or only descriptors hold the memory, it
stays the creator's: its process's while it lives, its account's (the creator's user, on its
guest) after that, until the object goes. So sharing is never a way around a quota, nor a way to
push memory onto another user's. Shared memory is never offered (OfferAllocations refuses it:
discarding it would take it from every holder).

Access. A handle opened read-only (``OPEN_READ_ONLY``) cannot write: LOCK2 hands a read-only
descriptor, UNLOCK2 write-backs are refused (STATUS_ACCESS_DENIED), GPU VA mappings of it are
read-only (a command buffer writing it faults its own device), and a read-only sync object cannot
be signalled (STATUS_ACCESS_DENIED). The guest decides who gets which access (it holds the
descriptors); the host enforces it on every path.

A shared fence's value lives in a fence page of its own (its creator's other fences are not
shown to openers). Its waits are not ended when its creator's device or handle goes while others
hold it: it ends with its last holder (waits then fail with STATUS_INVALID_HANDLE), with its
adapter, or with the creator's device entering the error state (as every fence of that device).
Its page reaches every client as a read-only descriptor (`readonly_fd`): only signals move the
value. A CPU wait can be held by an NT reference instead of a process (PYDXG_WAITSHAREDSYNC: a
sync file's, which outlives the process that made it).

Everything here runs on the host's event loop.
"""

from __future__ import annotations

import asyncio
import functools
import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from dxg.host.allocation import Allocation, Resource, drop_resource
from dxg.host.call import Call, CommandFailed, Handler
from dxg.host.memory import READ_ONLY_MODE, Block, FenceBlock, Usage, readonly_fd
from dxg.host.placement import choose_group
from dxg.host.quota import GuestLedgers, Ledger, ProcessQuota
from dxg.protocol import messages as m
from dxg.protocol.commands import GlobalCommand, HostToVmCommand, VgpuCommand
from dxg.protocol.framing import DXG_MAX_VM_BUS_PACKET_SIZE
from dxg.uapi.handles import HandleType
from dxg.uapi.memory import ALLOC_CACHED, ALLOC_NONLOCAL, GROUP_LOCAL, PAGE_SIZE
from dxg.uapi.ntstatus import NTSTATUS

if TYPE_CHECKING:
    from dxg.host.adapter import HostAdapter
    from dxg.host.device import HostDevice
    from dxg.host.memory import Segments
    from dxg.host.partition import Partition
    from dxg.host.process import HostProcess
    from dxg.host.syncobject import SyncObject

__all__ = [
    "HANDLERS",
    "SHARED_BLOCK_IDS",
    "HostShares",
    "OpenedSync",
    "SharedAllocation",
    "SharedResource",
    "SharedSync",
    "create_shared_resource",
    "readonly_fd",
    "release_resource",
]

OK = NTSTATUS.STATUS_SUCCESS
INVALID = NTSTATUS.STATUS_INVALID_PARAMETER
INVALID_HANDLE = NTSTATUS.STATUS_INVALID_HANDLE
DENIED = NTSTATUS.STATUS_ACCESS_DENIED
# Block ids of shared memory: above any a process numbers its own blocks with.
SHARED_BLOCK_IDS = 1 << 62
FENCE_PAGE_BYTES = PAGE_SIZE
# References one shared object may hold from CREATENTSHAREDOBJECT (descriptors of it).
MAX_NT_REFS = 1 << 20
_BLOCK_MODE = READ_ONLY_MODE  # nobody but root may reopen a shared block for writing
_OPEN_HEAD = 24  # OpenResourceReturn's fixed part
_PER_ALLOCATION = 48  # and each allocation's


# ---- the objects ---------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class SharedAllocation:
    """The memory of one allocation of a shared resource: its block, and the process usage its
    bytes are committed in (what `Segments.hold` and dxg.host.placement move)."""

    block: Block
    size: int
    flags: int  # ALLOC_* as answered
    priority: int
    priv_drv_data: bytes  # as the creator's call left it (what an opener gets)
    usage: Usage = None  # type: ignore[assignment]  # set when held
    group: int = GROUP_LOCAL
    # A live device of the charged process on the adapter (promotion by its queues); None when
    # an account pays (the creator is gone) or the process has none.
    device: HostDevice | None = None
    alive: bool = True
    discarded: bool = False  # (never: shared memory is not offered)

    @property
    def segments(self) -> Segments:
        return self.usage.segments

    @property
    def wants_local(self) -> bool:
        return not self.flags & ALLOC_NONLOCAL


@dataclass(eq=False, slots=True)
class SharedResource:
    handle: int  # the NT handle
    adapter: HostAdapter
    runtime_data: bytes
    priv_drv_data: bytes
    allocations: list[SharedAllocation] = field(default_factory=list)
    resources: dict[Resource, None] = field(default_factory=dict)  # every handle of it
    nt_refs: int = 0
    pinned: int = 0  # bytes charged to the partition for its data
    # Who pays when no holder does (dxg.host.quota): the creator while it lives, its account
    # (the same quotas) after.
    creator: HostProcess | None = None
    quota: ProcessQuota = field(default_factory=ProcessQuota)

    def info(self) -> m.CreateNtSharedObjectReturn:
        return m.CreateNtSharedObjectReturn(
            OK, self.handle, m.SHARED_RESOURCE, len(self.allocations), len(self.runtime_data),
            len(self.priv_drv_data), sum(len(a.priv_drv_data) for a in self.allocations))


@dataclass(eq=False, slots=True)
class SharedSync:
    handle: int  # the NT handle
    obj: SyncObject
    fence: FenceBlock  # its own page
    holders: int = 1  # host handles of it: the creator's and the opened ones
    nt_refs: int = 0
    opened: dict[OpenedSync, None] = field(default_factory=dict)
    waits: int = 0  # CPU waits its NT references hold (PYDXG_WAITSHAREDSYNC), one per reference

    def mirrored(self, value: int, p: Partition) -> None:
        """Tell the openers that keep the page themselves (links without descriptors)."""
        for o in self.opened:
            if o.mirror_event:
                p.notify(HostToVmCommand.PYDXG_FENCEVALUE,
                         m.FenceValue(o.mirror_event, value).pack())


@dataclass(eq=False, slots=True)
class OpenedSync:
    """A shared sync object opened by a process: a handle of its own (HandleType.SYNCOBJECT)
    that names the shared object, with its own access."""

    handle: int
    process: HostProcess
    device: HostDevice
    shared: SharedSync
    readonly: bool
    mirror_event: int = 0


# ---- the partition's table -----------------------------------------------------------------------


class HostShares:
    """A partition's shared objects, the sync objects its processes opened, the CPU waits NT
    references hold, and where the memory of shared resources whose creator is gone is
    charged (its account's)."""

    def __init__(self, ledgers: GuestLedgers) -> None:
        self.ledgers = ledgers  # the partition's quota ledgers (its accounts', its own)
        self.resources: dict[int, SharedResource] = {}
        self.syncs: dict[int, SharedSync] = {}
        self.opened: dict[int, OpenedSync] = {}
        # (account, adapter index) -> the usage of shared memory a gone creator left its account
        self.accounts: dict[tuple[int, int], Usage] = {}
        # guest event -> (the shared sync object, the wait) of PYDXG_WAITSHAREDSYNC
        self.waits: dict[int, tuple[SharedSync, asyncio.Future[None]]] = {}
        self.block_ids = SHARED_BLOCK_IDS
        self.blocks = 0
        self.block_bytes = 0

    # blocks
    def new_block(self, size: int, kind: str, adapter: int) -> Block:
        try:
            block = Block(self.block_ids + 1, size, kind, adapter)
        except OSError as e:
            raise CommandFailed(NTSTATUS.STATUS_NO_MEMORY, f"no shared memory: {e}") from None
        try:
            os.fchmod(block.fd, _BLOCK_MODE)
        except OSError:
            block.close()
            raise CommandFailed(NTSTATUS.STATUS_NO_MEMORY, "cannot protect shared memory") \
                from None
        self.block_ids += 1
        self.blocks += 1
        self.block_bytes += size
        return block

    def close_block(self, block: Block) -> None:
        if not block.closed:
            self.blocks -= 1
            self.block_bytes -= block.size
            block.close()

    def fence_page(self, adapter: int) -> tuple[FenceBlock, int]:
        """A fence page of its own for a shared fence: (the page, the slot of its value)."""
        fb = FenceBlock(self.new_block(FENCE_PAGE_BYTES, "shared-fence", adapter))
        index = fb.free.pop()
        fb.used += 1
        return fb, index

    def close_fence(self, fb: FenceBlock) -> None:
        if not fb.block.closed:
            self.blocks -= 1
            self.block_bytes -= fb.block.size
            fb.close()

    # charges
    def account_usage(self, segments: Segments, adapter: int, quota: ProcessQuota) -> Usage:
        """Where shared memory a gone creator left is charged: no process's, its account's
        (the creator's user on this guest: its ledger and quota) and the guest's."""
        key = (quota.account, adapter)
        usage = self.accounts.get(key)
        if usage is None:
            counted = self.ledgers.ledgers(ProcessQuota(quota.account, None, quota.per_account),
                                           adapter, Ledger(), True)
            usage = self.accounts[key] = Usage(segments, adapter, *counted)
            segments.join(usage)
        return usage

    def _leave_accounts(self, adapter: int) -> None:
        for key in [k for k in self.accounts if k[1] == adapter]:
            usage = self.accounts[key]
            if not any(usage.committed):
                usage.segments.leave(usage)
                self.ledgers.release(ProcessQuota(key[0]), adapter)
                del self.accounts[key]

    # sync objects
    def resolve(self, obj: Any, process: HostProcess,
                device: HostDevice | None) -> SyncObject:
        """The sync object an opened handle of ``process`` names (syncobject_of's second
        case); INVALID_HANDLE for anything else."""
        if (not isinstance(obj, OpenedSync) or obj.process is not process
                or (device is not None and obj.device is not device)):
            raise CommandFailed(INVALID_HANDLE, "not a sync object of this process")
        return obj.shared.obj

    def any_readonly(self, handles: tuple[int, ...] | list[int]) -> bool:
        return any(o is not None and o.readonly for o in map(self.opened.get, handles))

    def drop_opened(self, p: Partition, process: HostProcess, handle: int,
                    status: int = INVALID_HANDLE) -> bool:
        """DESTROYSYNCOBJECT of an opened handle; False when ``handle`` is not one of
        ``process``."""
        o = self.opened.get(handle)
        if o is None or o.process is not process:
            return False
        self._drop_opened(p, o, status)
        return True

    def _drop_opened(self, p: Partition, o: OpenedSync, status: int) -> None:
        if self.opened.pop(o.handle, None) is None:
            return
        p.free(o.handle, HandleType.SYNCOBJECT, o.process)
        ss = o.shared
        ss.opened.pop(o, None)
        ss.holders -= 1
        self._maybe_drop_sync(p, ss, status)

    def release_creator(self, p: Partition, obj: SyncObject, status: int) -> None:
        """The creator's handle of a shared sync object goes (destroyed, its device or
        process gone); the object lives on while others hold it."""
        process = obj.process
        if process.sync.objects.get(obj.handle) is not obj:
            return
        del process.sync.objects[obj.handle]
        p.free(obj.handle, HandleType.SYNCOBJECT, process)
        obj.mirror_event = 0  # (that guest event goes with the creator's handle)
        ss = obj.shared
        assert ss is not None
        ss.holders -= 1
        self._maybe_drop_sync(p, ss, status)

    def _maybe_drop_sync(self, p: Partition, ss: SharedSync, status: int) -> None:
        if ss.holders > 0 or ss.nt_refs > 0 or self.syncs.get(ss.handle) is not ss:
            return
        del self.syncs[ss.handle]
        p.free(ss.handle, HandleType.SHAREDVMOBJECT)
        ss.obj.fail(status)
        ss.obj.block = None
        self.close_fence(ss.fence)

    def add_sync(self, p: Partition, obj: SyncObject, fence: FenceBlock) -> SharedSync:
        """``obj`` (just made, its handle its creator's) is shared: its NT handle."""
        ss = SharedSync(0, obj, fence)
        ss.handle = p.alloc(HandleType.SHAREDVMOBJECT, ss)
        obj.shared = ss
        self.syncs[ss.handle] = ss
        return ss

    def drop_device(self, p: Partition, device: HostDevice) -> None:
        """The sync objects ``device`` opened go with it."""
        for o in [o for o in self.opened.values() if o.device is device]:
            self._drop_opened(p, o, NTSTATUS.STATUS_DEVICE_REMOVED)

    def drop_process(self, p: Partition, process: HostProcess) -> None:
        for o in [o for o in self.opened.values() if o.process is process]:
            self._drop_opened(p, o, NTSTATUS.STATUS_DEVICE_REMOVED)

    def adapter_removed(self, p: Partition, adapter: HostAdapter) -> None:
        """Shared fences of a removed adapter fail (as its other objects); the handles opened
        there go (the guest releases its own without telling the host)."""
        gone = NTSTATUS.STATUS_DEVICE_REMOVED
        for o in [o for o in self.opened.values() if o.device.adapter is adapter]:
            self._drop_opened(p, o, gone)
        for ss in list(self.syncs.values()):
            if ss.obj.adapter is adapter:
                ss.obj.fail(gone)

    # resources
    def _maybe_drop_resource(self, p: Partition, sr: SharedResource) -> None:
        if sr.resources or sr.nt_refs > 0 or self.resources.get(sr.handle) is not sr:
            return
        del self.resources[sr.handle]
        p.free(sr.handle, HandleType.SHAREDRESOURCE)
        p.uncharge(sr.pinned)
        sr.pinned = 0
        for sa in sr.allocations:
            if sa.alive:
                sa.alive = False
                if sa.usage is not None:
                    sa.segments.unhold(sa)
            sa.device = None
            self.close_block(sa.block)
        self._leave_accounts(sr.adapter.index)

    def _holders(self, sr: SharedResource,
                 leaving: Usage | None) -> list[tuple[Usage, HostDevice]]:
        """(usage, device) of each live process that holds a handle of ``sr``, the creator
        first; ``leaving`` (a usage about to go) is none of them."""
        index = sr.adapter.index
        found: dict[Usage, HostDevice] = {}
        for r in sorted(sr.resources, key=lambda r: r.device.process is not sr.creator):
            process = r.device.process
            usage = process.memory.usages.get(index)
            if process.alive and usage is not None and usage is not leaving:
                found.setdefault(usage, r.device)
        return list(found.items())

    def _home(self, sr: SharedResource, segments: Segments,
              leaving: Usage | None) -> tuple[Usage, HostDevice | None]:
        """Who pays when no holder does: the creator's process while it lives (holding a
        handle or not), its account after."""
        creator = sr.creator
        index = sr.adapter.index
        if creator is not None and creator.alive:
            usage = creator.memory.usages.get(index)
            if usage is not None and usage is not leaving:
                return usage, live_device(creator, sr.adapter)
        return self.account_usage(segments, index, sr.quota), None

    def _rehome(self, sr: SharedResource, leaving: Usage | None = None) -> None:
        """The charged process holds the resource no longer (or its usage is ``leaving``):
        its memory is charged to a holder whose quotas fit it (the creator first), else stays
        the creator's (its process while it lives, its account after). Never onto a quota that
        has no room for it: a holder is not made to pay for more than its quotas allow."""
        holders = self._holders(sr, leaving)
        held = dict(holders)
        for sa in sr.allocations:
            if not sa.alive or sa.usage is None:
                continue
            current = sa.usage
            if current in held:
                sa.device = held[current]  # (a device of the charged process that is alive)
                continue
            target = next(((u, d) for u, d in holders if _fits(current, u, sa.size)), None)
            if target is None:
                target = self._home(sr, sa.segments, leaving)
            usage, device = target
            if usage is not current:
                group = sa.group
                sa.segments.unhold(sa)
                sa.usage = usage
                sa.segments.hold(sa, group)
            sa.device = device
        self._leave_accounts(sr.adapter.index)

    def process_leaving(self, process: HostProcess, adapter: int | None = None) -> None:
        """``process``'s usage of ``adapter`` (None: of every adapter) is about to go (it closed
        the adapter, or it exits): shared memory charged to it is charged elsewhere first."""
        usages = {u: i for i, u in process.memory.usages.items() if adapter in (None, i)}
        for sr in list(self.resources.values()):
            charged = next((sa.usage for sa in sr.allocations
                            if sa.alive and sa.usage in usages), None)
            if charged is not None:
                self._rehome(sr, leaving=charged)

    def device_gone(self, device: HostDevice) -> None:
        """``device`` went: shared memory whose queues it was brings another live device of the
        charged process back in (or none)."""
        for sr in self.resources.values():
            for sa in sr.allocations:
                if sa.device is device:
                    sa.device = live_device(device.process, device.adapter)

    # CPU waits held by NT references (PYDXG_WAITSHAREDSYNC)
    def add_wait(self, p: Partition, ss: SharedSync, event: int, value: int) -> None:
        future = ss.obj.wait(value)
        self.waits[event] = (ss, future)
        ss.waits += 1
        future.add_done_callback(functools.partial(self._wait_done, p, event))

    def _wait_done(self, p: Partition, event: int, future: asyncio.Future[None]) -> None:
        if future.cancelled():
            return
        error = future.exception()
        got = self.waits.get(event)
        if got is None or got[1] is not future:
            return  # (withdrawn)
        del self.waits[event]
        got[0].waits -= 1
        status = OK if error is None else (
            error.status if isinstance(error, CommandFailed) else NTSTATUS.STATUS_INTERNAL_ERROR)
        p.notify(HostToVmCommand.SIGNALGUESTEVENT,
                 m.SignalGuestEvent(event, 0, 0, int(status) & 0xFFFFFFFF).pack())

    def withdraw_wait(self, event: int) -> None:
        got = self.waits.pop(event, None)
        if got is not None:
            got[0].waits -= 1
            if not got[1].done():
                got[1].cancel()

    # the partition goes
    def close(self, p: Partition) -> None:
        """Everything shared goes (after the processes: no handle is left)."""
        for event in list(self.waits):
            self.withdraw_wait(event)
        for o in list(self.opened.values()):
            self._drop_opened(p, o, NTSTATUS.STATUS_DEVICE_REMOVED)
        for ss in list(self.syncs.values()):
            ss.nt_refs = 0
            ss.holders = 0
            self._maybe_drop_sync(p, ss, NTSTATUS.STATUS_DEVICE_REMOVED)
        for sr in list(self.resources.values()):
            sr.nt_refs = 0
            sr.resources.clear()
            self._maybe_drop_resource(p, sr)
        for (account, index), usage in list(self.accounts.items()):
            usage.segments.leave(usage)
            self.ledgers.release(ProcessQuota(account), index)
        self.accounts.clear()

    def census(self) -> dict[str, int]:
        return {
            "resources": len(self.resources),
            "sync_objects": len(self.syncs),
            "opened_sync_objects": len(self.opened),
            "nt_refs": sum(s.nt_refs for s in (*self.resources.values(), *self.syncs.values())),
            "waits": len(self.waits),
            "blocks": self.blocks,
            "block_bytes": self.block_bytes,
            # shared memory charged to accounts whose creator is gone (no process pays it)
            "account_bytes": sum(sum(u.committed) for u in self.accounts.values()),
        }


def _fits(src: Usage, dst: Usage, size: int) -> bool:
    """Whether ``size`` bytes committed under ``src`` may move to ``dst``: every quota of
    ``dst`` they would newly count in has room for them (a ledger both count in, the guest's
    or a shared account's, does not change)."""
    if dst is src:
        return True
    have = {id(ledger) for ledger in src.ledgers}
    return all(ledger.used + size <= limit for ledger, limit in dst.bounds
               if id(ledger) not in have)


def live_device(process: HostProcess, adapter: HostAdapter) -> HostDevice | None:
    """A device of ``process`` on ``adapter`` (None: none, or the process is going)."""
    if not process.alive:
        return None
    return next((d for d in process.devices.values() if d.adapter is adapter), None)


# ---- resources -----------------------------------------------------------------------------------


def _view(p: Partition, device: HostDevice, resource: Resource, sa: SharedAllocation,
          readonly: bool) -> Allocation:
    """A handle of ``sa`` for ``device`` in ``resource``."""
    process = device.process
    a = Allocation(0, device, resource, sa.size, sa.flags, sa.priority, group=sa.group,
                   block=sa.block, offset=0, arena=None,
                   usage=process.memory.usage(device.adapter.segments, device.adapter.index),
                   shared=sa, readonly=readonly)
    a.handle = p.alloc(HandleType.ALLOCATION, a, process)
    device.allocations[a.handle] = a
    resource.allocations[a.handle] = a
    return a


def _info(a: Allocation, sa: SharedAllocation) -> m.AllocationInfo:
    return m.AllocationInfo(a.handle, sa.group, sa.flags, sa.block.id, sa.block.size, 0,
                            sa.size, sa.priv_drv_data)


def create_shared_resource(p: Partition, device: HostDevice, body: m.CreateAllocation,
                           sizes: list[tuple[int, int]]) -> m.CreateAllocationReturn:
    """CREATEALLOCATION of a shared resource (dxg.host.allocation checked the flags): every
    allocation in a block of its own, all or nothing."""
    shares = p.shares
    process = device.process
    adapter = device.adapter
    blobs = len(body.runtime_data) + len(body.priv_drv_data) + sum(
        len(a.priv_drv_data) for a in body.allocations)
    if _OPEN_HEAD + _PER_ALLOCATION * len(sizes) + blobs > DXG_MAX_VM_BUS_PACKET_SIZE:
        raise CommandFailed(INVALID, "the resource's data would not fit an OPENRESOURCE reply")
    p.charge(blobs)
    sr = SharedResource(0, adapter, bytes(body.runtime_data), bytes(body.priv_drv_data),
                        pinned=blobs, creator=process, quota=process.memory.quota)
    try:
        sr.handle = p.alloc(HandleType.SHAREDRESOURCE, sr)
    except BaseException:
        p.uncharge(blobs)
        raise
    shares.resources[sr.handle] = sr
    r = Resource(0, device, body.allocations[0].priority, shared=sr)
    try:
        r.handle = p.alloc(HandleType.RESOURCE, r, process)
    except BaseException:
        shares._maybe_drop_resource(p, sr)
        raise
    device.resources[r.handle] = r
    sr.resources[r] = None
    infos = []
    try:
        segments = adapter.segments
        usage = process.memory.usage(segments, adapter.index)
        for (size, aflags), new in zip(sizes, body.allocations, strict=True):
            group = choose_group(segments, usage, size, bool(aflags & ALLOC_NONLOCAL),
                                 new.priority)
            if group is None:
                raise CommandFailed(NTSTATUS.STATUS_NO_MEMORY,
                                    f"no room for {size} bytes on adapter {adapter.index}")
            sa = SharedAllocation(shares.new_block(size, "shared", adapter.index), size,
                                  aflags | ALLOC_CACHED, new.priority, bytes(new.priv_drv_data),
                                  device=device)
            sr.allocations.append(sa)
            sa.usage = usage
            segments.hold(sa, group)
            infos.append(_info(_view(p, device, r, sa, False), sa))
    except BaseException:
        drop_resource(p, r)  # (and with its last handle, the shared resource)
        raise
    return m.CreateAllocationReturn(OK, r.handle, tuple(infos))


def release_resource(p: Partition, r: Resource) -> None:
    """A handle of a shared resource went (its allocations went before)."""
    sr = r.shared
    if sr is None or r not in sr.resources:
        return
    del sr.resources[r]
    shares = p.shares
    shares._maybe_drop_resource(p, sr)
    if shares.resources.get(sr.handle) is sr:
        shares._rehome(sr)


def open_resource(p: Partition, call: Call, body: m.OpenResource) -> m.OpenResourceReturn:
    """OPENRESOURCE: a resource of the caller's device that names the shared one, with views
    of its allocations (read-only with OPEN_READ_ONLY)."""
    from dxg.host.device import device_of

    process = p.process(call)
    device = device_of(p, process, body.device, call.adapter)
    sr = p.handles.get(body.handle, HandleType.SHAREDRESOURCE)
    if not isinstance(sr, SharedResource):
        raise CommandFailed(INVALID_HANDLE, f"0x{body.handle:08x} is no shared resource")
    if sr.adapter is not device.adapter:
        raise CommandFailed(INVALID, "a shared resource opens on its own adapter")
    if body.flags & ~m.OPEN_READ_ONLY or body.allocation_count != len(sr.allocations):
        raise CommandFailed(INVALID, "unknown flags, or another number of allocations")
    readonly = bool(body.flags & m.OPEN_READ_ONLY)
    priority = sr.allocations[0].priority if sr.allocations else 0
    r = Resource(0, device, priority, shared=sr)
    r.handle = p.alloc(HandleType.RESOURCE, r, process)
    device.resources[r.handle] = r
    sr.resources[r] = None
    infos = []
    try:
        for sa in sr.allocations:
            infos.append(_info(_view(p, device, r, sa, readonly), sa))
    except BaseException:
        drop_resource(p, r)
        raise
    p.shares._rehome(sr)  # (its opener pays, if the charged process let go and it has room)
    return m.OpenResourceReturn(OK, r.handle, tuple(infos), sr.runtime_data, sr.priv_drv_data)


# ---- NT handles ----------------------------------------------------------------------------------


def _shared_of(p: Partition, process: HostProcess,
               handle: int) -> SharedResource | SharedSync:
    """The shared object a host handle of ``process`` names (a resource, a sync object it
    created, or one it opened)."""
    r = p.handles.get(handle, HandleType.RESOURCE)
    if isinstance(r, Resource) and r.device.process is process:
        if r.shared is None:
            raise CommandFailed(INVALID, f"resource 0x{handle:08x} is not shared")
        return r.shared
    obj = p.handles.get(handle, HandleType.SYNCOBJECT)
    if isinstance(obj, OpenedSync):
        if obj.process is process:
            return obj.shared
    elif obj is not None and obj._process is process:
        if obj.shared is None:
            raise CommandFailed(INVALID, f"sync object 0x{handle:08x} is not shared")
        return obj.shared
    raise CommandFailed(INVALID_HANDLE, f"0x{handle:08x} is no object of this process")


def create_nt_shared_object(p: Partition, call: Call,
                            body: m.CreateNtSharedObject) -> m.CreateNtSharedObjectReturn:
    """CREATENTSHAREDOBJECT: one reference more on a shared object, and its NT handle."""
    shared = _shared_of(p, p.process(call), body.object)
    if shared.nt_refs >= MAX_NT_REFS:
        raise CommandFailed(NTSTATUS.STATUS_NO_MEMORY, "too many descriptors of one object")
    shared.nt_refs += 1
    if isinstance(shared, SharedResource):
        return shared.info()
    return m.CreateNtSharedObjectReturn(OK, shared.handle, m.SHARED_SYNC_OBJECT)


def destroy_nt_shared_object(p: Partition, call: Call,
                             body: m.DestroyNtSharedObject) -> m.NtStatusReturn:
    """DESTROYNTSHAREDOBJECT: one reference fewer; the object goes with its last."""
    shares = p.shares
    shared: SharedResource | SharedSync | None = shares.resources.get(body.handle)
    if shared is None:
        shared = shares.syncs.get(body.handle)
    if shared is None or shared.nt_refs <= 0:
        raise CommandFailed(INVALID_HANDLE, f"0x{body.handle:08x} holds no reference")
    shared.nt_refs -= 1
    if isinstance(shared, SharedResource):
        shares._maybe_drop_resource(p, shared)
    else:
        shares._maybe_drop_sync(p, shared, INVALID_HANDLE)
    return m.NtStatusReturn(OK)


# ---- sync objects --------------------------------------------------------------------------------


def open_sync_object(p: Partition, call: Call,
                     body: m.OpenSyncObject) -> m.CreateSyncObjectReturn:
    """OPENSYNCOBJECT: a handle of the caller's device that names the shared fence (read-only
    with OPEN_READ_ONLY); its page's descriptor goes beside the reply."""
    process = p.process(call)
    device = p.handles.get(body.device, HandleType.DEVICE)
    if device is None or device.process is not process:
        raise CommandFailed(INVALID_HANDLE, f"device 0x{body.device:08x} is not this process's")
    if device.adapter.removed:
        raise CommandFailed(NTSTATUS.STATUS_DEVICE_REMOVED, "the adapter was removed")
    ss = p.handles.get(body.handle, HandleType.SHAREDVMOBJECT)
    if not isinstance(ss, SharedSync):
        raise CommandFailed(INVALID_HANDLE, f"0x{body.handle:08x} is no shared sync object")
    if ss.obj.adapter is not device.adapter:
        raise CommandFailed(INVALID, "a shared sync object opens on its own adapter")
    if body.flags & ~m.OPEN_READ_ONLY:
        raise CommandFailed(INVALID, "unknown flags")
    o = OpenedSync(0, process, device, ss, bool(body.flags & m.OPEN_READ_ONLY),
                   body.mirror_event)
    o.handle = p.alloc(HandleType.SYNCOBJECT, o, process)
    try:
        if call.can_pass_fds:
            # read-only whatever the access: no client writes a fence page (only signals)
            call.reply_fds.append(readonly_fd(ss.fence.block))
    except BaseException:
        p.free(o.handle, HandleType.SYNCOBJECT, process)
        raise
    p.shares.opened[o.handle] = o
    ss.opened[o] = None
    ss.holders += 1
    if o.mirror_event:  # (before the reply: the guest's page shows the value when it returns)
        p.notify(HostToVmCommand.PYDXG_FENCEVALUE,
                 m.FenceValue(o.mirror_event, ss.obj.value).pack())
    ref = ss.obj.ref()
    return m.CreateSyncObjectReturn(OK, o.handle, 0, ref.block, ref.block_size, ref.offset)


def wait_shared_sync(p: Partition, call: Call, body: m.WaitSharedSync) -> m.NtStatusReturn:
    """PYDXG_WAITSHAREDSYNC: a CPU wait on a shared sync object held by one of its NT
    references (a sync file's), not by a process: acked at once, SIGNALGUESTEVENT when it
    reaches the value or goes; or (WAIT_WITHDRAW) that wait withdrawn."""
    shares = p.shares
    if body.flags & ~m.WAIT_WITHDRAW or not body.guest_event:
        raise CommandFailed(INVALID, "unknown flags, or no event")
    if body.flags & m.WAIT_WITHDRAW:
        shares.withdraw_wait(body.guest_event)
        return m.NtStatusReturn(OK)
    ss = shares.syncs.get(body.handle)
    if ss is None or ss.nt_refs <= 0:
        raise CommandFailed(INVALID_HANDLE, f"0x{body.handle:08x} holds no reference")
    if body.guest_event in shares.waits:
        raise CommandFailed(INVALID, "that event is waited for already")
    if ss.waits >= ss.nt_refs:
        raise CommandFailed(NTSTATUS.STATUS_NO_MEMORY, "one wait per reference")
    shares.add_wait(p, ss, body.guest_event, body.value)
    return m.NtStatusReturn(OK)


HANDLERS: MappingProxyType[Any, Handler] = MappingProxyType({
    GlobalCommand.PYDXG_WAITSHAREDSYNC: wait_shared_sync,
    GlobalCommand.CREATENTSHAREDOBJECT: create_nt_shared_object,
    GlobalCommand.DESTROYNTSHAREDOBJECT: destroy_nt_shared_object,
    GlobalCommand.OPENSYNCOBJECT: open_sync_object,
    VgpuCommand.OPENRESOURCE: open_resource,
})
