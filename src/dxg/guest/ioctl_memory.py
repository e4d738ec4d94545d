"""The device-memory ioctls: allocations, Lock2/Unlock2, GPU virtual addresses, paging queues,
residency, offers and budgets (the memory half of the real driver's ioctl.c).

Every handle in a struct or in an array it points at is checked against the caller's table and
replaced by the host's before anything is sent; counts and sizes are checked against the real
driver's limits before any user memory is read. Most commands travel as IoctlArgs (the struct
with host handles and no pointers, then its arrays); the guest copies back only the output
fields, never the host's handles. See docs/memory.md.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import errno
import fcntl
import os
import stat
import struct
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from dxg.guest import vmbus
from dxg.guest.allocation import (
    FENCE_PAGE,
    GuestAllocation,
    GuestBlock,
    GuestPagingQueue,
    GuestResource,
    Shadow,
    link_key,
    release_allocation,
    release_paging_queue,
)
from dxg.guest.device import ObjectState
from dxg.guest.errors import IoctlError
from dxg.guest.handles import HandleType
from dxg.guest.lookup import PRIVATE_DATA_MAX, _adapter, _device, _h, _host_result
from dxg.guest.process import GuestProcess, host_process
from dxg.guest.usermem import UserMemory, copy_from_user, copy_to_user, map_block
from dxg.oslib.fds import close_all
from dxg.protocol import messages as m
from dxg.protocol.commands import VgpuCommand
from dxg.protocol.framing import DXG_MAX_VM_BUS_PACKET_SIZE
from dxg.protocol.headers import encode_vgpu
from dxg.protocol.table import COMMANDS
from dxg.uapi import memory as mm
from dxg.uapi import structs as s
from dxg.uapi.ntstatus import nt_success
from dxg.vmbus.channel import ChannelClosed, Packet

if TYPE_CHECKING:
    from dxg.guest.adapter import GuestAdapter
    from dxg.guest.device import GuestDevice
    from dxg.guest.driver import GuestDriver

V = VgpuCommand
_ALLOCINFO = ctypes.sizeof(s.d3dddi_allocationinfo2)
_UPDATEVA_OP = ctypes.sizeof(s.d3dddi_updategpuvirtualaddress_operation)
_STDALLOC = ctypes.sizeof(s.d3dkmt_createstandardallocation)
_EXISTINGHEAP = 1  # _D3DKMT_STANDARDALLOCATIONTYPE_EXISTINGHEAP
_LOCK2_DATA = s.d3dkmt_lock2.data.offset
_PQ_FENCE = s.d3dkmt_createpagingqueue.fence_cpu_virtual_address.offset
# UpdateGpuVirtualAddress operations that name an allocation (MAP, MAP_PROTECT).
_OPS_WITH_ALLOCATION = frozenset({0, 3})
_OP_ALLOCATION = 8 + 16  # byte offset of the allocation handle inside one operation
# DestroyAllocation flags: assume_not_in_use, and system_use_only (bit 31): the guest undoing
# what a caller abandoned (the only case where a resource's allocations may go alone). A
# caller's own flags never carry bit 31.
DESTROY_UNDO = 1 | (1 << 31)
_SYSTEM_USE_ONLY = 1 << 31
# A copy over a link without descriptors goes in pieces of at most this many bytes, this many
# on their way at once (independent reads or writes of disjoint ranges, each answered alone):
# 16 MiB in flight per copy, what a host queues for it at most (bench/memory.py part B: four
# pieces of 4 MiB did as well as any larger split on a loopback link).
COPY_CHUNK = 4 << 20
COPY_DEPTH = 4
# The data bytes of a LOCK2_COPY reply that travel in its first packet (after its fixed part).
_COPY_INLINE = DXG_MAX_VM_BUS_PACKET_SIZE - len(m.Lock2Return(0).pack())
_U32 = struct.Struct("<I")


def _u32s(data: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(data) // 4}I", data))


def _pack_u32s(values: list[int]) -> bytes:
    return struct.pack(f"<{len(values)}I", *values)


# ---- lookups -------------------------------------------------------------------------------------


def _allocation(proc: GuestProcess, handle: int, dev: GuestDevice) -> GuestAllocation:
    alloc = proc.handles.get(handle, HandleType.ALLOCATION)
    if alloc is None or alloc.device is not dev:
        raise IoctlError(errno.EBADF, f"0x{handle:08x} is not an allocation of this device")
    return alloc


def _resource(proc: GuestProcess, handle: int, dev: GuestDevice) -> GuestResource:
    res = proc.handles.get(handle, HandleType.RESOURCE)
    if res is None or res.device is not dev:
        raise IoctlError(errno.EBADF, f"0x{handle:08x} is not a resource of this device")
    return res


def _device_any(proc: GuestProcess, handle: Any) -> GuestDevice:
    """A device of the caller, its adapter removed or not (for calls that release things)."""
    dev = proc.handles.get(_h(handle), HandleType.DEVICE)
    if dev is None or dev.state != ObjectState.ACTIVE:
        raise IoctlError(errno.EBADF, "invalid device handle")
    return dev


def _queue(proc: GuestProcess, handle: Any, removed_ok: bool = False) -> GuestPagingQueue:
    queue = proc.handles.get(_h(handle), HandleType.PAGINGQUEUE)
    if queue is None:
        raise IoctlError(errno.EBADF, "invalid paging queue handle")
    if not queue.device.adapter.active and not removed_ok:
        raise IoctlError(errno.ENODEV, "adapter was removed")
    return queue


def _read_handles(mem: UserMemory, addr: int, count: int, limit: int) -> list[int]:
    if not 0 < count <= limit:
        raise IoctlError(errno.EINVAL, f"{count} objects (1..{limit})")
    return _u32s(copy_from_user(mem, addr, 4 * count, 4 * limit))


def _host_allocations(proc: GuestProcess, dev: GuestDevice, handles: list[int]) -> list[int]:
    return [_allocation(proc, h, dev).host_handle for h in handles]


async def _send_args(proc: GuestProcess, adapter: GuestAdapter, command: VgpuCommand,
                     args: ctypes.Structure, extra: bytes = b"",
                     want_fds: bool = False, undo: Any = None) -> Any:
    """Send an IoctlArgs command; returns (status, struct after the call, extra[, fds]).
    ``undo(hprocess, reply)`` runs when the reply comes after the caller gave up."""
    hprocess = await host_process(proc, adapter.link)
    out = await vmbus.send(adapter, command, hprocess, m.IoctlArgs(bytes(args), extra),
                           want_fds=want_fds,
                           undo=None if undo is None else lambda r: undo(hprocess, r))
    reply, got = out if want_fds else (out, [])
    if len(reply.args) != ctypes.sizeof(args):
        close_all(got)
        raise IoctlError(errno.EPROTO, f"host changed the {command.name} struct size")
    after = type(args).from_buffer_copy(reply.args)
    if want_fds:
        return reply.status, after, reply.extra, got
    return reply.status, after, reply.extra


def _check_block_fd(fd: int, size: int, readonly: bool = False) -> None:
    """A descriptor a host sent for a block must be what every mapper can trust: a regular
    file of at least ``size`` bytes, sealed so nobody can shrink it (a mapping past a file's end
    faults: a host must not be able to crash a client that way); opened read-only for memory
    its process may only read (docs/sharing.md)."""
    st = os.fstat(fd)
    if readonly and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY:
        raise IoctlError(errno.EPROTO, "host sent a writable descriptor of read-only memory")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0
    need = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
    if not stat.S_ISREG(st.st_mode) or st.st_size < size or seals & need != need:
        raise IoctlError(errno.EPROTO, "host sent a block that is not sealed shared memory of "
                         "its size")


def _no_extra(extra: bytes, command: str) -> None:
    if extra:
        raise IoctlError(errno.EPROTO, f"host sent unexpected data with {command}")


# ---- create / destroy --------------------------------------------------------------------------


async def create_allocation(drv: GuestDriver, proc: GuestProcess, args: Any,
                            mem: UserMemory) -> int:
    """CreateAllocation: standalone allocations, or a resource with 1..N allocations. The host
    places each in a block; nothing is mapped until a Lock2."""
    dev = _device(proc, args.device)
    flags = args.flags
    count = int(args.alloc_count)
    if flags.create_protected or flags.existing_section:
        return -errno.EINVAL
    if flags.existing_sysmem:
        # pydxg cannot give the host a caller's own pages without copying them (docs/memory.md)
        return -errno.EOPNOTSUPP
    shared = bool(flags.create_shared or flags.nt_security_sharing)
    if shared and (not flags.create_shared or not flags.nt_security_sharing
                   or not flags.create_resource or _h(args.resource)):
        # shared by NT handle (descriptor) only, as the real driver, and made whole at once
        # (docs/sharing.md)
        return -errno.EINVAL
    if not 0 < count <= mm.CREATEALLOCATION_MAX:
        return -errno.EINVAL
    runtime = copy_from_user(mem, args.private_runtime_data, args.private_runtime_data_size,
                             PRIVATE_DATA_MAX)
    standard_size = 0
    global_priv = b""
    if flags.standard_allocation:
        if count != 1 or args.priv_drv_data_size:
            return -errno.EINVAL
        std = s.d3dkmt_createstandardallocation.from_buffer_copy(
            copy_from_user(mem, args.standard_allocation, _STDALLOC, _STDALLOC))
        standard_size = int(std.existing_heap_data.size)
        if (std.type != _EXISTINGHEAP or standard_size <= 0
                or standard_size % mm.PAGE_SIZE):
            return -errno.EINVAL
    else:
        global_priv = copy_from_user(mem, args.priv_drv_data, args.priv_drv_data_size,
                                     PRIVATE_DATA_MAX)
    raw = copy_from_user(mem, args.allocation_info, count * _ALLOCINFO,
                         mm.CREATEALLOCATION_MAX * _ALLOCINFO)
    infos = (s.d3dddi_allocationinfo2 * count).from_buffer_copy(raw)
    new: list[m.NewAllocation] = []
    total = len(runtime) + len(global_priv)
    for info in infos:
        if info.sysmem:
            return -errno.EINVAL  # a sysmem pointer without existing_sysmem
        if flags.standard_allocation and info.priv_drv_data_size:
            return -errno.EINVAL
        priv = copy_from_user(mem, info.priv_drv_data, info.priv_drv_data_size, PRIVATE_DATA_MAX)
        total += len(priv) + 16
        if total > PRIVATE_DATA_MAX:
            return -errno.EINVAL  # the whole request must fit one bus packet
        new.append(m.NewAllocation(int(info.flags.value), int(info.priority), priv))
    resource: GuestResource | None = None
    if _h(args.resource):
        resource = _resource(proc, _h(args.resource), dev)
        if resource.shared:
            return -errno.EINVAL  # a shared resource takes no more allocations
    adapter = dev.adapter
    charged = count + (1 if resource is None and flags.create_resource else 0)
    proc.charge_object(charged)
    try:
        hprocess = await host_process(proc, adapter.link)

        def undo(reply: m.CreateAllocationReturn) -> None:
            _undo_create(adapter, hprocess, dev.host_handle, reply, resource is None)

        reply = await vmbus.send(adapter, V.CREATEALLOCATION, hprocess, m.CreateAllocation(
            dev.host_handle, resource.host_handle if resource else 0, int(flags.value),
            standard_size, runtime, global_priv, tuple(new)), undo=undo)
    except BaseException:
        if not proc.closed:
            proc.release_objects(charged)
        raise
    ret = _host_result(reply.status)
    if ret < 0:
        if not proc.closed:
            proc.release_objects(charged)
        return ret
    try:
        allocs, res = _adopt(proc, dev, hprocess, reply, new, resource, flags.create_resource,
                             shared)
    except BaseException:
        if not proc.closed:
            proc.release_objects(charged)
        undo(reply)
        raise
    try:
        for info, alloc, made in zip(infos, allocs, reply.allocations, strict=True):
            info.allocation.v = alloc.handle
            if made.priv_drv_data:
                copy_to_user(mem, info.priv_drv_data, made.priv_drv_data)
        copy_to_user(mem, args.allocation_info, bytes(infos))
    except BaseException:
        _forget_created(proc, dev, allocs, res if res is not resource else None)
        if not proc.closed:
            proc.release_objects(charged)
        undo(reply)
        raise
    if res is not None:
        args.resource.v = res.handle
    return 0


def _adopt(proc: GuestProcess, dev: GuestDevice, hprocess: int,
           reply: m.CreateAllocationReturn, sent: list[m.NewAllocation],
           resource: GuestResource | None, create_resource: int,
           shared: bool = False) -> tuple[list[GuestAllocation], GuestResource | None]:
    """The guest's objects for what the host made, after checking the reply."""
    if proc.closed or dev.state != ObjectState.ACTIVE:
        raise IoctlError(errno.ENODEV, "the device went while the host made its memory")
    if len(reply.allocations) != len(sent):
        raise IoctlError(errno.EPROTO, "host made another number of allocations")
    if resource is None and bool(create_resource) != bool(reply.resource):
        raise IoctlError(errno.EPROTO, "host answered the resource wrongly")
    for a, n in zip(reply.allocations, sent, strict=True):
        if (a.size <= 0 or a.size % mm.PAGE_SIZE or a.block_size <= 0
                or a.offset % mm.PAGE_SIZE or a.offset + a.size > a.block_size
                or a.group not in (mm.GROUP_LOCAL, mm.GROUP_NONLOCAL)
                or len(a.priv_drv_data) != len(n.priv_drv_data) or not a.handle):
            raise IoctlError(errno.EPROTO, "host described an allocation wrongly")
    link = dev.adapter.link
    res = resource
    made: list[GuestAllocation] = []
    try:
        if resource is None and create_resource:
            res = GuestResource(dev, reply.resource, shared=shared)
            res.handle = proc.handles.alloc(HandleType.RESOURCE, res)
        for a in reply.allocations:
            block = proc.memory.use(link_key(link, hprocess, a.block), a.block_size)
            alloc = GuestAllocation(dev, a.handle, block, a.offset, a.size, a.group, a.flags,
                                    res)
            made.append(alloc)
            alloc.handle = proc.handles.alloc(HandleType.ALLOCATION, alloc)
    except BaseException:
        _forget_created(proc, dev, made, res if res is not resource else None, linked=False)
        raise
    if res is not None:
        res.allocations.extend(made)
        if res is not resource:
            dev.resources.append(res)
    else:
        dev.allocations.extend(made)
    return made, res


def _forget_created(proc: GuestProcess, dev: GuestDevice, allocs: list[GuestAllocation],
                    new_res: GuestResource | None, linked: bool = True) -> None:
    for alloc in allocs:
        release_allocation(proc, alloc)
        if linked:
            owner = alloc.resource.allocations if alloc.resource else dev.allocations
            if alloc in owner:
                owner.remove(alloc)
    if new_res is not None:
        if new_res.handle:
            proc.handles.free(new_res.handle, HandleType.RESOURCE)
            new_res.handle = 0
        if new_res in dev.resources:
            dev.resources.remove(new_res)


def _undo_create(adapter: GuestAdapter, hprocess: int, device: int,
                 reply: m.CreateAllocationReturn, new_resource: bool) -> None:
    """The caller is gone (or could not be told): what the host made is destroyed again."""
    if not nt_success(reply.status) or not reply.allocations:
        return
    if new_resource and reply.resource:
        msg = m.DestroyAllocation(device, reply.resource, DESTROY_UNDO, ())
    else:  # (allocations added to an existing resource may go alone only in an undo)
        msg = m.DestroyAllocation(device, 0, DESTROY_UNDO,
                                  tuple(a.handle for a in reply.allocations))
    vmbus.spawn_quietly(adapter.link, vmbus.send(adapter, V.DESTROYALLOCATION, hprocess, msg))


async def destroy_allocation2(drv: GuestDriver, proc: GuestProcess, args: Any,
                              mem: UserMemory) -> int:
    """DestroyAllocation2: a resource (with its allocations) or a list of standalone ones.
    Every handle is checked first; the guest's handles go before the host's objects. Works on
    a removed adapter too (what the guest holds is released)."""
    dev = _device_any(proc, args.device)
    count = int(args.alloc_count)
    res_handle = _h(args.resource)
    if bool(count) == bool(res_handle):
        return -errno.EINVAL  # exactly one of them
    if res_handle:
        res = _resource(proc, res_handle, dev)
        gone = list(res.allocations)
        msg = m.DestroyAllocation(dev.host_handle, res.host_handle,
                                  int(args.flags.value) & ~_SYSTEM_USE_ONLY, ())
        proc.handles.free(res.handle, HandleType.RESOURCE)
        res.handle = 0
        dev.resources.remove(res)
        objects = len(gone) + 1
    else:
        handles = _read_handles(mem, args.allocations, count, mm.CREATEALLOCATION_MAX)
        if len(set(handles)) != len(handles):
            return -errno.EINVAL
        gone = [_allocation(proc, h, dev) for h in handles]
        if any(a.resource is not None for a in gone):
            return -errno.EINVAL  # a resource's allocations go with the resource
        msg = m.DestroyAllocation(dev.host_handle, 0, int(args.flags.value) & ~_SYSTEM_USE_ONLY,
                                  tuple(a.host_handle for a in gone))
        for a in gone:
            dev.allocations.remove(a)
        objects = len(gone)
    for a in gone:
        release_allocation(proc, a)
    proc.release_objects(objects)
    adapter = dev.adapter
    if not adapter.active or not adapter.link.up:
        return 0
    hprocess = await host_process(proc, adapter.link)
    reply = await vmbus.send(adapter, V.DESTROYALLOCATION, hprocess, msg)
    return _host_result(reply.status)


# ---- CPU access ----------------------------------------------------------------------------------


async def lock2(drv: GuestDriver, proc: GuestProcess, args: Any, mem: UserMemory) -> int:
    """Lock2: the allocation's bytes in the caller. On a local link the caller maps the block
    (once: later locks of anything in it reuse the mapping) and no host call is made once the
    guest has the block's descriptor; elsewhere a shadow copy is fetched (docs/memory.md)."""
    dev = _device(proc, args.device)
    alloc = _allocation(proc, _h(args.allocation), dev)
    if alloc.offered or alloc.offering:
        return -errno.EINVAL  # reclaim it first
    adapter = dev.adapter
    channel = adapter.route()
    if channel is None or channel.closed:
        return -errno.ENODEV
    if not channel.can_pass_fds:
        return await _lock_copy(proc, dev, alloc, args, mem)
    block = alloc.block
    if block.fd < 0:
        hprocess = await host_process(proc, adapter.link)
        reply, got = await vmbus.send(adapter, V.LOCK2, hprocess, m.Lock2(
            dev.host_handle, alloc.host_handle, int(args.flags.value), m.LOCK2_FD, 0, 0),
            want_fds=True)
        try:
            ret = _host_result(reply.status)
            if ret < 0:
                return ret
            if (len(got) != 1
                    or link_key(adapter.link, hprocess, reply.block, alloc.readonly) != block.key
                    or reply.block_size != block.size or reply.offset != alloc.offset
                    or reply.size != alloc.size):
                raise IoctlError(errno.EPROTO, "host answered LOCK2 for another block")
            _check_block_fd(got[0], block.size, alloc.readonly)
            if block.fd < 0 and proc.memory.blocks.get(block.key) is block:
                block.fd = got.pop()
        finally:
            close_all(got)
        if block.fd < 0:
            return -errno.EAGAIN  # the block went while its descriptor came
    if alloc.handle == 0:
        return -errno.EBADF  # destroyed meanwhile
    if alloc.offered or alloc.offering:
        return -errno.EINVAL  # offered while its block's descriptor came
    map_block(mem, block.id, block.size, alloc.offset, _LOCK2_DATA, proc.memory.give(block),
              readonly=alloc.readonly)
    block.mapped = True
    alloc.lock_count += 1
    return 0


async def _lock_copy(proc: GuestProcess, dev: GuestDevice, alloc: GuestAllocation, args: Any,
                     mem: UserMemory) -> int:
    """Lock2 where no descriptor can go: unless the allocation is locked already, its bytes are
    fetched into its shadow (the one kept since its last Unlock2, or a new one), which is mapped
    into the caller. One fetch or write-back of an allocation runs at a time."""
    while alloc.shadow is not None and alloc.shadow.busy is not None:
        await asyncio.shield(alloc.shadow.busy)
    if alloc.handle == 0:
        return -errno.EBADF  # destroyed meanwhile
    shadow = alloc.shadow
    if shadow is None or not alloc.lock_count:
        if shadow is None:
            shadow = proc.memory.shadow(alloc.size, readonly=alloc.readonly)
            shadow.owner = alloc
            alloc.shadow = shadow
        else:
            proc.memory.take(shadow)
        shadow.busy = asyncio.get_running_loop().create_future()
        fetched = False
        try:
            await _fetch(proc, dev, alloc, shadow, int(args.flags.value))
            fetched = True
        finally:
            _settle(shadow)
            if not fetched:
                proc.memory.drop_shadow(shadow)
        if alloc.shadow is not shadow:
            return -errno.EBADF  # the allocation went while its bytes came
        if alloc.offered or alloc.offering:
            proc.memory.keep(shadow)
            return -errno.EINVAL  # offered while its bytes came
    block = shadow.block
    try:
        map_block(mem, block.id, block.size, 0, _LOCK2_DATA, proc.memory.give(block),
                  readonly=alloc.readonly)
    except BaseException:
        if not alloc.lock_count:
            proc.memory.keep(shadow)
        raise
    block.mapped = True
    alloc.lock_count += 1
    return 0


async def _slot(slots: asyncio.Semaphore, holding: bool) -> bool:
    """One of the link's copy slots. A copy that holds some already takes one only if it is
    free (it has replies to wait for first): copies never wait on each other in a circle."""
    if holding and slots.locked():
        return False
    await slots.acquire()  # (at once when it is not locked)
    return True


def _settle(shadow: Shadow) -> None:
    """The shadow's fetch or write-back is over: whoever waits for it goes on."""
    busy, shadow.busy = shadow.busy, None
    if busy is not None and not busy.done():
        busy.set_result(None)


def _copy_request(adapter: GuestAdapter, hprocess: int, command: VgpuCommand, body: Any,
                  into: memoryview | None = None) -> asyncio.Future[Packet]:
    """Send one LOCK2 or UNLOCK2 piece as vmbus.send does, without waiting for the reply (so
    that several are on their way); ``into``: where the reply's bulk attachment is read."""
    channel = adapter.route()
    if channel is None or channel.closed:
        raise IoctlError(errno.ENODEV, "the adapter's channel is gone")
    payload = encode_vgpu(command, hprocess, adapter.host_vgpu_luid, body.pack())
    try:
        return channel.request(payload, into=into)
    except ChannelClosed:
        raise IoctlError(errno.ENODEV, "the host removed the channel") from None
    except ValueError as e:  # a message too long for the connection
        raise IoctlError(errno.E2BIG, str(e)) from None


async def _copy_reply(command: VgpuCommand, pending: asyncio.Future[Packet]) -> tuple[Any, int]:
    """(the parsed reply of a piece, how many of its bytes were read into its ``into``)."""
    try:
        packet = await pending
    except ChannelClosed:
        raise IoctlError(errno.ENODEV, "the host removed the channel") from None
    packet.close_fds()
    return vmbus._parse(COMMANDS[command], packet.payload), packet.placed


async def _fetch(proc: GuestProcess, dev: GuestDevice, alloc: GuestAllocation, shadow: Shadow,
                 flags: int) -> None:
    """The allocation's bytes into its shadow: LOCK2_COPY pieces, COPY_DEPTH of them on their
    way at once. A reply's bytes beyond its first packet are read from the socket straight into
    the shadow; the few in that packet are copied there."""
    adapter = dev.adapter
    hprocess = await host_process(proc, adapter.link)
    slots = adapter.link.copy_slots
    view = shadow.view()
    size = alloc.size
    inflight: collections.deque[tuple[asyncio.Future[Packet], int, int]] = collections.deque()
    sent = 0
    try:
        while sent < size or inflight:
            while sent < size and len(inflight) < COPY_DEPTH:
                if not await _slot(slots, bool(inflight)):
                    break
                n = min(COPY_CHUNK, size - sent)
                into = view[sent + _COPY_INLINE : sent + n] if n > _COPY_INLINE else None
                body = m.Lock2(dev.host_handle, alloc.host_handle, flags, m.LOCK2_COPY, sent, n)
                try:
                    request = _copy_request(adapter, hprocess, V.LOCK2, body, into)
                except BaseException:
                    slots.release()
                    raise
                inflight.append((request, sent, n))
                sent += n
            pending, at, n = inflight[0]
            try:
                reply, placed = await _copy_reply(V.LOCK2, pending)
            finally:
                inflight.popleft()
                slots.release()
            ret = _host_result(reply.status)
            if ret < 0:
                raise IoctlError(-ret, "LOCK2 copy failed")
            data = reply.data
            if len(data) + placed != n or (placed and len(data) != _COPY_INLINE):
                raise IoctlError(errno.EPROTO, "host sent another number of bytes")
            view[at : at + len(data)] = data
    finally:
        for pending, _at, _n in inflight:
            pending.cancel()  # (their replies, if they come, still land in the shadow)
            slots.release()


async def _write_back(proc: GuestProcess, dev: GuestDevice, alloc: GuestAllocation,
                      shadow: Shadow) -> int:
    """The shadow's bytes back to the host: UNLOCK2 pieces written to the socket from the
    shadow's memory as it is, COPY_DEPTH of them on their way at once."""
    adapter = dev.adapter
    hprocess = await host_process(proc, adapter.link)
    slots = adapter.link.copy_slots
    view = shadow.view()
    size = alloc.size
    inflight: collections.deque[asyncio.Future[Packet]] = collections.deque()
    sent = 0
    try:
        while sent < size or inflight:
            while sent < size and len(inflight) < COPY_DEPTH:
                if not await _slot(slots, bool(inflight)):
                    break
                n = min(COPY_CHUNK, size - sent)
                body = m.Unlock2(dev.host_handle, alloc.host_handle, sent, view[sent : sent + n])
                try:
                    inflight.append(_copy_request(adapter, hprocess, V.UNLOCK2, body))
                except BaseException:
                    slots.release()
                    raise
                sent += n
            try:
                reply, _placed = await _copy_reply(V.UNLOCK2, inflight[0])
            finally:
                inflight.popleft()
                slots.release()
            ret = _host_result(reply.status)
            if ret < 0:
                return ret
        return 0
    finally:
        for pending in inflight:
            pending.cancel()
            slots.release()


async def unlock2(drv: GuestDriver, proc: GuestProcess, args: Any, mem: UserMemory) -> int:
    """Unlock2: one lock fewer; the last one writes a shadow copy back to the host, and the
    shadow is kept for the allocation's next Lock2."""
    dev = _device(proc, args.device)
    alloc = _allocation(proc, _h(args.allocation), dev)
    if alloc.lock_count <= 0:
        return -errno.EINVAL
    alloc.lock_count -= 1
    shadow = alloc.shadow
    if alloc.lock_count or shadow is None or shadow.kept:
        return 0
    if alloc.readonly:  # nothing it may write goes back (docs/sharing.md)
        proc.memory.keep(shadow)
        return 0
    shadow.busy = asyncio.get_running_loop().create_future()
    try:
        return await _write_back(proc, dev, alloc, shadow)
    finally:
        _settle(shadow)
        if alloc.shadow is shadow and not alloc.lock_count:
            proc.memory.keep(shadow)


# ---- paging queues -----------------------------------------------------------------------------


async def create_paging_queue(drv: GuestDriver, proc: GuestProcess, args: Any,
                              mem: UserMemory) -> int:
    """CreatePagingQueue: the queue and its monitored fence, whose value the caller reads from
    a read-only page mapped into it (through the FUSE file, which cannot map, the address is 0
    and the value is read with a query)."""
    dev = _device(proc, args.device)
    adapter = dev.adapter
    if args.physical_adapter_index:
        return -errno.EINVAL
    hargs = s.d3dkmt_createpagingqueue.from_buffer_copy(bytes(args))
    hargs.device.v = dev.host_handle
    hargs.fence_cpu_virtual_address = 0
    proc.charge_object()
    try:
        status, out, extra, got = await _send_args(
            proc, adapter, V.CREATEPAGINGQUEUE, hargs, want_fds=True,
            undo=lambda hp, r: _undo_queue(adapter, hp, _queue_of_reply(r)))
    except BaseException:
        if not proc.closed:
            proc.release_objects()
        raise
    hprocess = await host_process(proc, adapter.link)
    try:
        ret = _host_result(status)
        if ret < 0:
            proc.release_objects()
            return ret
        queue = _adopt_queue(proc, dev, hprocess, out, extra, got)
    except BaseException:
        if not proc.closed:
            proc.release_objects()
        if nt_success(status) and _h(out.paging_queue):
            _undo_queue(adapter, hprocess, out.paging_queue.v)
        raise
    finally:
        close_all(got)
    block = queue.block
    try:
        map_block(mem, block.id, block.size, queue.fence_offset, _PQ_FENCE,
                  proc.memory.give(block), readonly=True)
        block.mapped = True
    except IoctlError as e:
        if e.errno != errno.EOPNOTSUPP:
            _drop_queue(proc, dev, queue)
            _undo_queue(adapter, hprocess, queue.host_handle)
            raise
        args.fence_cpu_virtual_address = 0  # a front end that cannot map (the FUSE file)
    args.paging_queue.v = queue.handle
    args.sync_object.v = queue.fence_handle
    return ret


def _adopt_queue(proc: GuestProcess, dev: GuestDevice, hprocess: int, out: Any, extra: bytes,
                 got: list[int]) -> GuestPagingQueue:
    if proc.closed or dev.state != ObjectState.ACTIVE:
        raise IoctlError(errno.ENODEV, "the device went while the host made the queue")
    if not _h(out.paging_queue) or not _h(out.sync_object):
        raise IoctlError(errno.EPROTO, "host answered CREATEPAGINGQUEUE wrongly")
    block, offset, shadow = adopt_fence_page(proc, dev, hprocess, extra, got)
    queue = GuestPagingQueue(dev, _h(out.paging_queue), _h(out.sync_object), block, offset)
    queue.shadow = shadow
    try:
        queue.handle = proc.handles.alloc(HandleType.PAGINGQUEUE, queue)
        queue.fence_handle = proc.handles.alloc(HandleType.MONITOREDFENCE, queue)
    except BaseException:
        release_paging_queue(proc, queue)
        raise
    dev.paging_queues.append(queue)
    return queue


def adopt_fence_page(proc: GuestProcess, dev: GuestDevice, hprocess: int, extra: bytes,
                     got: list[int]) -> tuple[GuestBlock, int, Shadow | None]:
    """Where a queue's monitored fence the host just made shows its value, as the guest keeps
    it: (block, offset of the u64 in it, the guest's own page when the link cannot carry the
    host's block). ``extra`` is the host's BlockRef; ``got`` its descriptor (taken)."""
    if len(extra) != m.BlockRef._S.size:
        raise IoctlError(errno.EPROTO, "host did not say where the fence is")
    ref = m.BlockRef.unpack(extra)
    if ref.block_size <= 0 or ref.offset % 8 or ref.offset + 8 > ref.block_size:
        raise IoctlError(errno.EPROTO, "host placed the fence outside its block")
    channel = dev.adapter.route()
    if channel is None or not channel.can_pass_fds:
        if got:
            raise IoctlError(errno.EPROTO, "host sent a descriptor over a link without them")
        shadow = proc.memory.shadow(FENCE_PAGE, readonly=True)
        return shadow.block, 0, shadow
    if len(got) != 1:
        raise IoctlError(errno.EPROTO, "host sent no fence block")
    _check_block_fd(got[0], ref.block_size, readonly=True)  # (only the host writes a fence)
    block = proc.memory.use(link_key(dev.adapter.link, hprocess, ref.block), ref.block_size,
                            readonly=True)
    if block.fd < 0:
        block.fd = got.pop()
    return block, ref.offset, None


def _drop_queue(proc: GuestProcess, dev: GuestDevice, queue: GuestPagingQueue) -> None:
    release_paging_queue(proc, queue)
    if queue in dev.paging_queues:
        dev.paging_queues.remove(queue)
    if not proc.closed:
        proc.release_objects()


def _queue_of_reply(reply: m.IoctlArgsReturn) -> int:
    if not nt_success(reply.status) or len(reply.args) != ctypes.sizeof(
            s.d3dkmt_createpagingqueue):
        return 0
    return int(s.d3dkmt_createpagingqueue.from_buffer_copy(reply.args).paging_queue.v)


def _undo_queue(adapter: GuestAdapter, hprocess: int, host_queue: int) -> None:
    if host_queue:
        args = s.d3dddi_destroypagingqueue()
        args.paging_queue.v = host_queue
        spawn_destroy(adapter, hprocess, V.DESTROYPAGINGQUEUE, args)


def spawn_destroy(adapter: GuestAdapter, hprocess: int, command: VgpuCommand,
                  args: ctypes.Structure) -> None:
    """Destroy on the host what it made for a caller that gave up (an IoctlArgs command sent
    by the link, nobody waiting for it)."""
    vmbus.spawn_quietly(adapter.link, vmbus.send(adapter, command, hprocess,
                                                 m.IoctlArgs(bytes(args))))


async def destroy_paging_queue(drv: GuestDriver, proc: GuestProcess, args: Any,
                               mem: UserMemory) -> int:
    queue = _queue(proc, args.paging_queue, removed_ok=True)
    dev = queue.device
    host_args = s.d3dddi_destroypagingqueue()
    host_args.paging_queue.v = queue.host_handle
    _drop_queue(proc, dev, queue)
    if not dev.adapter.active or not dev.adapter.link.up:
        return 0  # the host (and the queue there) is gone
    status, _, _extra = await _send_args(proc, dev.adapter, V.DESTROYPAGINGQUEUE, host_args)
    return _host_result(status)


# ---- residency, priorities, offers -----------------------------------------------------------------


async def make_resident(drv: GuestDriver, proc: GuestProcess, args: Any, mem: UserMemory) -> int:
    """MakeResident: STATUS_PENDING with the paging fence value to wait for, as the real
    driver; the fence's page shows when it is reached."""
    queue = _queue(proc, args.paging_queue)
    dev = queue.device
    handles = _read_handles(mem, args.allocation_list, int(args.alloc_count),
                            mm.MAKERESIDENT_ALLOC_MAX)
    hargs = s.d3dddi_makeresident.from_buffer_copy(bytes(args))
    hargs.paging_queue.v = queue.host_handle
    hargs.allocation_list = 1
    hargs.priority_list = 0
    status, out, extra = await _send_args(proc, dev.adapter, V.MAKERESIDENT, hargs,
                                          _pack_u32s(_host_allocations(proc, dev, handles)))
    _no_extra(extra, "MAKERESIDENT")
    ret = _host_result(status)
    if ret < 0:
        return ret
    args.paging_fence_value = out.paging_fence_value
    args.num_bytes_to_trim = out.num_bytes_to_trim
    if ret == 0:
        queue.reached(int(out.paging_fence_value))
    return ret


async def evict(drv: GuestDriver, proc: GuestProcess, args: Any, mem: UserMemory) -> int:
    dev = _device(proc, args.device)
    handles = _read_handles(mem, args.allocations, int(args.alloc_count),
                            mm.MAKERESIDENT_ALLOC_MAX)
    hargs = s.d3dkmt_evict.from_buffer_copy(bytes(args))
    hargs.device.v = dev.host_handle
    hargs.allocations = 1
    status, out, extra = await _send_args(proc, dev.adapter, V.EVICT, hargs,
                                          _pack_u32s(_host_allocations(proc, dev, handles)))
    _no_extra(extra, "EVICT")
    ret = _host_result(status)
    if ret >= 0:
        args.num_bytes_to_trim = out.num_bytes_to_trim
    return ret


def _resource_or_list(proc: GuestProcess, dev: GuestDevice, args: Any, mem: UserMemory,
                      list_field: str, count: int) -> tuple[GuestResource | None, list[int], int]:
    """(resource, host handles of the listed allocations, how many allocations the call names)."""
    res_handle = _h(args.resource)
    if res_handle:
        res = _resource(proc, res_handle, dev)
        return res, [], len(res.allocations)
    handles = _read_handles(mem, getattr(args, list_field), count, mm.MAKERESIDENT_ALLOC_MAX)
    return None, _host_allocations(proc, dev, handles), count


def _for_host(struct_type: type[ctypes.Structure], args: Any, dev: GuestDevice,
              res: GuestResource | None, hosts: list[int], list_field: str,
              out_field: str) -> Any:
    """The struct of a resource-or-list call as the host gets it (host handles, pointers 0 or
    1 as their arrays follow)."""
    hargs = struct_type.from_buffer_copy(bytes(args))
    hargs.device.v = dev.host_handle
    hargs.resource.v = res.host_handle if res else 0
    setattr(hargs, list_field, 1 if hosts else 0)
    setattr(hargs, out_field, 1)
    return hargs


async def _send_for_u32s(proc: GuestProcess, dev: GuestDevice, command: VgpuCommand,
                         hargs: Any, extra: bytes, count: int) -> tuple[int, bytes]:
    """(return value, the ``count`` u32s the host answers beside the struct)."""
    status, _, out = await _send_args(proc, dev.adapter, command, hargs, extra)
    ret = _host_result(status)
    if ret >= 0 and len(out) != 4 * count:
        raise IoctlError(errno.EPROTO, f"host answered {command.name} with {len(out)} bytes")
    return ret, out


async def query_allocation_residency(drv: GuestDriver, proc: GuestProcess, args: Any,
                                     mem: UserMemory) -> int:
    dev = _device(proc, args.device)
    res, hosts, n = _resource_or_list(proc, dev, args, mem, "allocations",
                                      int(args.allocation_count))
    if n == 0 or not args.residency_status:
        return -errno.EINVAL
    # (one status for a resource as a whole, as the real driver writes)
    hargs = _for_host(s.d3dkmt_queryallocationresidency, args, dev, res, hosts, "allocations",
                      "residency_status")
    ret, out = await _send_for_u32s(proc, dev, V.QUERYALLOCATIONRESIDENCY, hargs,
                                    _pack_u32s(hosts), 1 if res else n)
    if ret >= 0:
        copy_to_user(mem, args.residency_status, out)
    return ret


async def set_allocation_priority(drv: GuestDriver, proc: GuestProcess, args: Any,
                                  mem: UserMemory) -> int:
    dev = _device(proc, args.device)
    res, hosts, n = _resource_or_list(proc, dev, args, mem, "allocation_list",
                                      int(args.allocation_count))
    nprio = 1 if res else n
    priorities = copy_from_user(mem, args.priorities, 4 * nprio, 4 * mm.MAKERESIDENT_ALLOC_MAX)
    hargs = _for_host(s.d3dkmt_setallocationpriority, args, dev, res, hosts, "allocation_list",
                      "priorities")
    ret, _ = await _send_for_u32s(proc, dev, V.SETALLOCATIONPRIORITY, hargs,
                                  _pack_u32s(hosts) + priorities, 0)
    return ret


async def get_allocation_priority(drv: GuestDriver, proc: GuestProcess, args: Any,
                                  mem: UserMemory) -> int:
    dev = _device(proc, args.device)
    res, hosts, n = _resource_or_list(proc, dev, args, mem, "allocation_list",
                                      int(args.allocation_count))
    if not args.priorities:
        return -errno.EINVAL
    hargs = _for_host(s.d3dkmt_getallocationpriority, args, dev, res, hosts, "allocation_list",
                      "priorities")
    ret, out = await _send_for_u32s(proc, dev, V.GETALLOCATIONPRIORITY, hargs,
                                    _pack_u32s(hosts), 1 if res else n)
    if ret >= 0:
        copy_to_user(mem, args.priorities, out)
    return ret


def _offer_targets(proc: GuestProcess, dev: GuestDevice, args: Any, mem: UserMemory,
                   count: int) -> tuple[bool, list[int], list[GuestAllocation]]:
    """(by resource?, host handles, the guest allocations concerned) of an offer or reclaim."""
    if bool(args.resources) == bool(args.allocations):
        raise IoctlError(errno.EINVAL, "give resources or allocations, not both")
    if args.resources:
        handles = _read_handles(mem, args.resources, count, mm.MAKERESIDENT_ALLOC_MAX)
        resources = [_resource(proc, h, dev) for h in handles]
        return True, [r.host_handle for r in resources], [
            a for r in resources for a in r.allocations]
    handles = _read_handles(mem, args.allocations, count, mm.MAKERESIDENT_ALLOC_MAX)
    allocs = [_allocation(proc, h, dev) for h in handles]
    return False, [a.host_handle for a in allocs], allocs


async def offer_allocations(drv: GuestDriver, proc: GuestProcess, args: Any,
                            mem: UserMemory) -> int:
    """OfferAllocations: the host may discard their contents when it needs the memory."""
    dev = _device(proc, args.device)
    by_resource, hosts, allocs = _offer_targets(proc, dev, args, mem, int(args.allocation_count))
    if any(a.lock_count for a in allocs):
        return -errno.EBUSY  # locked memory cannot be offered
    hargs = s.d3dkmt_offerallocations.from_buffer_copy(bytes(args))
    hargs.device.v = dev.host_handle
    hargs.resources = 1 if by_resource else 0
    hargs.allocations = 0 if by_resource else 1
    for a in allocs:
        a.offering += 1  # no Lock2 starts while the offer travels
    try:
        status, _, extra = await _send_args(proc, dev.adapter, V.OFFERALLOCATIONS, hargs,
                                            _pack_u32s(hosts))
    finally:
        for a in allocs:
            a.offering -= 1
    _no_extra(extra, "OFFERALLOCATIONS")
    ret = _host_result(status)
    if ret >= 0:
        for a in allocs:
            a.offered = True
    return ret


async def reclaim_allocations2(drv: GuestDriver, proc: GuestProcess, args: Any,
                               mem: UserMemory) -> int:
    """ReclaimAllocations2: per allocation OK (contents kept), DISCARDED (contents lost; the
    memory is back, zero-filled) or NOT_COMMITTED (no memory for it yet: still offered)."""
    queue = _queue(proc, args.paging_queue)
    dev = queue.device
    count = int(args.allocation_count)
    by_resource, hosts, allocs = _offer_targets(proc, dev, args, mem, count)
    hargs = s.d3dkmt_reclaimallocations2.from_buffer_copy(bytes(args))
    hargs.paging_queue.v = queue.host_handle
    hargs.resources = 1 if by_resource else 0
    hargs.allocations = 0 if by_resource else 1
    hargs.results = 1 if args.results else 0
    status, out, extra = await _send_args(proc, dev.adapter, V.RECLAIMALLOCATIONS, hargs,
                                          _pack_u32s(hosts))
    ret = _host_result(status)
    if ret < 0:
        return ret
    if len(extra) != 4 * count:
        raise IoctlError(errno.EPROTO, "host answered another number of reclaim results")
    results = _u32s(extra)
    per_alloc = results if not by_resource else None
    if per_alloc is not None:
        for a, r in zip(allocs, per_alloc, strict=True):
            if r != 2:  # _D3DDDI_RECLAIM_RESULT_NOT_COMMITTED
                a.offered = False
    else:
        resources_ok = {h for h, r in zip(hosts, results, strict=True) if r != 2}
        for a in allocs:
            if a.resource is not None and a.resource.host_handle in resources_ok:
                a.offered = False
    if args.results:
        copy_to_user(mem, args.results, extra)
    args.paging_fence_value = out.paging_fence_value
    queue.reached(int(out.paging_fence_value))
    return ret


async def update_alloc_property(drv: GuestDriver, proc: GuestProcess, args: Any,
                                mem: UserMemory) -> int:
    queue = _queue(proc, args.paging_queue)
    dev = queue.device
    alloc = _allocation(proc, _h(args.allocation), dev)
    hargs = s.d3dddi_updateallocproperty.from_buffer_copy(bytes(args))
    hargs.paging_queue.v = queue.host_handle
    hargs.allocation.v = alloc.host_handle
    status, out, extra = await _send_args(proc, dev.adapter, V.UPDATEALLOCATIONPROPERTY, hargs)
    _no_extra(extra, "UPDATEALLOCATIONPROPERTY")
    ret = _host_result(status)
    if ret >= 0:
        args.paging_fence_value = out.paging_fence_value
        if ret == 0:
            queue.reached(int(out.paging_fence_value))
    return ret


async def flush_heap_transitions(drv: GuestDriver, proc: GuestProcess, args: Any,
                                 mem: UserMemory) -> int:
    pa = _adapter(proc, args.adapter)
    hargs = s.d3dkmt_flushheaptransitions()
    hargs.adapter.v = pa.adapter.host_handle
    status, _, _extra = await _send_args(proc, pa.adapter, V.FLUSHHEAPTRANSITIONS, hargs)
    return _host_result(status)


# ---- budgets -------------------------------------------------------------------------------------


async def query_video_memory_info(drv: GuestDriver, proc: GuestProcess, args: Any,
                                  mem: UserMemory) -> int:
    """QueryVideoMemoryInfo: the caller's budget, usage and reservation in a segment group (the
    same numbers `dxg ps` and the host's census show)."""
    if args.process:
        return -errno.EINVAL  # only the calling process, as the real driver
    pa = _adapter(proc, args.adapter)
    hargs = s.d3dkmt_queryvideomemoryinfo.from_buffer_copy(bytes(args))
    hargs.adapter.v = pa.adapter.host_handle
    status, out, extra = await _send_args(proc, pa.adapter, V.QUERYVIDEOMEMORYINFO, hargs)
    _no_extra(extra, "QUERYVIDEOMEMORYINFO")
    ret = _host_result(status)
    if ret >= 0:
        args.budget = out.budget
        args.current_usage = out.current_usage
        args.current_reservation = out.current_reservation
        args.available_for_reservation = out.available_for_reservation
    return ret


async def change_video_memory_reservation(drv: GuestDriver, proc: GuestProcess, args: Any,
                                          mem: UserMemory) -> int:
    if args.process:
        return -errno.EINVAL
    pa = _adapter(proc, args.adapter)
    hargs = s.d3dkmt_changevideomemoryreservation.from_buffer_copy(bytes(args))
    hargs.adapter.v = pa.adapter.host_handle
    status, _, _extra = await _send_args(proc, pa.adapter, V.CHANGEVIDEOMEMORYRESERVATION, hargs)
    return _host_result(status)


# ---- GPU virtual addresses ---------------------------------------------------------------------


async def reserve_gpu_va(drv: GuestDriver, proc: GuestProcess, args: Any,
                         mem: UserMemory) -> int:
    pa = _adapter(proc, args.adapter)
    hargs = s.d3dddi_reservegpuvirtualaddress.from_buffer_copy(bytes(args))
    hargs.adapter.v = pa.adapter.host_handle
    status, out, _extra = await _send_args(proc, pa.adapter, V.RESERVEGPUVIRTUALADDRESS, hargs)
    ret = _host_result(status)
    if ret >= 0:
        args.virtual_address = out.virtual_address
        args.paging_fence_value = out.paging_fence_value
    return ret


async def map_gpu_va(drv: GuestDriver, proc: GuestProcess, args: Any, mem: UserMemory) -> int:
    queue = _queue(proc, args.paging_queue)
    dev = queue.device
    alloc = _allocation(proc, _h(args.allocation), dev)
    hargs = s.d3dddi_mapgpuvirtualaddress.from_buffer_copy(bytes(args))
    hargs.paging_queue.v = queue.host_handle
    hargs.allocation.v = alloc.host_handle
    status, out, _extra = await _send_args(proc, dev.adapter, V.MAPGPUVIRTUALADDRESS, hargs)
    ret = _host_result(status)
    if ret >= 0:
        args.virtual_address = out.virtual_address
        args.paging_fence_value = out.paging_fence_value
        if ret == 0:
            queue.reached(int(out.paging_fence_value))
    return ret


async def free_gpu_va(drv: GuestDriver, proc: GuestProcess, args: Any, mem: UserMemory) -> int:
    pa = _adapter(proc, args.adapter)
    hargs = s.d3dkmt_freegpuvirtualaddress.from_buffer_copy(bytes(args))
    hargs.adapter.v = pa.adapter.host_handle
    status, _, _extra = await _send_args(proc, pa.adapter, V.FREEGPUVIRTUALADDRESS, hargs)
    return _host_result(status)


# Operations per UpdateGpuVirtualAddress: what fits one bus packet.
UPDATEVA_MAX_OPS = (PRIVATE_DATA_MAX - 64) // _UPDATEVA_OP


async def update_gpu_va(drv: GuestDriver, proc: GuestProcess, args: Any,
                        mem: UserMemory) -> int:
    """UpdateGpuVirtualAddress: map, unmap, copy and protect operations, applied together."""
    dev = _device(proc, args.device)
    count = int(args.num_operations)
    if not 0 < count <= UPDATEVA_MAX_OPS:
        return -errno.EINVAL
    raw = bytearray(copy_from_user(mem, args.operations, count * _UPDATEVA_OP,
                                   UPDATEVA_MAX_OPS * _UPDATEVA_OP))
    for i in range(count):
        at = i * _UPDATEVA_OP
        op = _U32.unpack_from(raw, at)[0]
        if op in _OPS_WITH_ALLOCATION:
            handle = _U32.unpack_from(raw, at + _OP_ALLOCATION)[0]
            _U32.pack_into(raw, at + _OP_ALLOCATION, _allocation(proc, handle, dev).host_handle)
        elif op not in (1, 2):
            return -errno.EINVAL
    hargs = s.d3dkmt_updategpuvirtualaddress.from_buffer_copy(bytes(args))
    hargs.device.v = dev.host_handle
    if _h(args.context):
        ctx = proc.handles.get(_h(args.context), HandleType.CONTEXT)
        if ctx is None or ctx.device is not dev:
            return -errno.EBADF
        hargs.context.v = ctx.host_handle
    if _h(args.fence_object):
        queue = proc.handles.get(_h(args.fence_object), HandleType.MONITOREDFENCE)
        if queue is None or queue.device is not dev:
            return -errno.EBADF
        hargs.fence_object.v = queue.host_fence
    hargs.operations = 1
    status, _, extra = await _send_args(proc, dev.adapter, V.UPDATEGPUVIRTUALADDRESS, hargs,
                                        bytes(raw))
    _no_extra(extra, "UPDATEGPUVIRTUALADDRESS")
    return _host_result(status)


HANDLERS: MappingProxyType[str, Any] = MappingProxyType({
    "LX_DXCREATEALLOCATION": create_allocation,
    "LX_DXDESTROYALLOCATION2": destroy_allocation2,
    "LX_DXLOCK2": lock2,
    "LX_DXUNLOCK2": unlock2,
    "LX_DXCREATEPAGINGQUEUE": create_paging_queue,
    "LX_DXDESTROYPAGINGQUEUE": destroy_paging_queue,
    "LX_DXMAKERESIDENT": make_resident,
    "LX_DXEVICT": evict,
    "LX_DXQUERYALLOCATIONRESIDENCY": query_allocation_residency,
    "LX_DXSETALLOCATIONPRIORITY": set_allocation_priority,
    "LX_DXGETALLOCATIONPRIORITY": get_allocation_priority,
    "LX_DXOFFERALLOCATIONS": offer_allocations,
    "LX_DXRECLAIMALLOCATIONS2": reclaim_allocations2,
    "LX_DXUPDATEALLOCPROPERTY": update_alloc_property,
    "LX_DXFLUSHHEAPTRANSITIONS": flush_heap_transitions,
    "LX_DXQUERYVIDEOMEMORYINFO": query_video_memory_info,
    "LX_DXCHANGEVIDEOMEMORYRESERVATION": change_video_memory_reservation,
    "LX_DXRESERVEGPUVIRTUALADDRESS": reserve_gpu_va,
    "LX_DXMAPGPUVIRTUALADDRESS": map_gpu_va,
    "LX_DXFREEGPUVIRTUALADDRESS": free_gpu_va,
    "LX_DXUPDATEGPUVIRTUALADDRESS": update_gpu_va,
})

__all__ = ["COPY_CHUNK", "COPY_DEPTH", "HANDLERS", "UPDATEVA_MAX_OPS"]
