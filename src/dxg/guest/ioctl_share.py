"""The sharing and sync-file ioctls (the real driver's dxgkio_share_objects, *_nt and
dxgsyncfile.c): ShareObjects, QueryResourceInfoFromNtHandle, OpenResourceFromNtHandle,
OpenSyncObjectFromNtHandle2, ShareObjectWithHost, CreateSyncFile, WaitSyncFile and
OpenSyncObjectFromSyncFile. See docs/sharing.md.

A descriptor a caller hands in is hostile: a number that is not open in the caller is -EBADF,
anything that is not one of the driver's share descriptors or sync files (another file, an
eventfd, a socket) -EINVAL, and so is a share descriptor of the other kind (a sync object's
where a resource's is due), as the real driver answers a file with other operations. It is
identified without calling into its filesystem, and closed off the event loop when it is not a
pipe or socket (a file on a FUSE mount served by this loop would block it: dxg.guest.share).
An entry used across an await is pinned, so that its host reference outlives the call even when
its last copy is closed meanwhile. Where the real driver ignores ``desired_access``, pydxg
grants it: a share without write access opens read-only (no CPU or GPU write, no signal), a
process can share onward at most the access it has, and an opener is told what it got
(``reserved`` = OPENED_READ_ONLY, ``flags.no_signal`` on return). Where it returns success and
does nothing (WaitSyncFile and OpenSyncObjectFromSyncFile of a fence that is not shared) pydxg
answers -EINVAL.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import struct
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from dxg.guest import vmbus
from dxg.guest.allocation import GuestAllocation, GuestResource, link_key
from dxg.guest.device import ObjectState
from dxg.guest.errors import IoctlError
from dxg.guest.handles import HandleType
from dxg.guest.ioctl_memory import DESTROY_UNDO, _forget_created
from dxg.guest.ioctl_sync import (
    MONITORED_FENCE,
    _adopt,
    _live_context,
    _post,
    _syncobject,
    _undo_create,
    map_fence_page,
)
from dxg.guest.lookup import _device, _h, _host_result
from dxg.guest.process import GuestProcess, host_process
from dxg.guest.share import ShareFd, Shares, SyncFile, release_nt, undo_nt
from dxg.guest.syncobject import GuestSyncObject, HostEvent
from dxg.guest.usermem import UserMemory, copy_from_user, copy_to_user, give_fd, take_fd
from dxg.oslib.fds import close_all, close_foreign
from dxg.protocol import messages as m
from dxg.protocol.commands import GlobalCommand, VgpuCommand
from dxg.uapi import memory as mm
from dxg.uapi import structs as s
from dxg.uapi.access import OPENED_READ_ONLY, grants_write
from dxg.uapi.ntstatus import NTSTATUS, nt_success

if TYPE_CHECKING:
    from dxg.guest.adapter import GuestAdapter
    from dxg.guest.device import GuestDevice
    from dxg.guest.driver import GuestDriver

V = VgpuCommand
G = GlobalCommand
_OPENINFO = ctypes.sizeof(s.d3dddi_openallocationinfo2)
# Where OpenSyncObjectFromNtHandle2 and OpenSyncObjectFromSyncFile return the fence's CPU
# address, and CreateSyncFile the sync file's descriptor.
_NT_FENCE_CPU_VA = s.d3dkmt_opensyncobjectfromnthandle2._anon0.offset
_SYNCFILE_FENCE_CPU_VA = s.d3dkmt_opensyncobjectfromsyncfile.fence_value_cpu_va.offset
_SYNCFILE_HANDLE = s.d3dkmt_createsyncfile.sync_file_handle.offset
_SHARED_FENCE_FLAGS = 0b11  # d3dddi_synchronizationobject_flags: shared, nt_security_sharing
_MAX_FD = (1 << 31) - 1


# ---- descriptors handed in -----------------------------------------------------------------------


def _file_of(drv: GuestDriver, mem: UserMemory, number: int) -> ShareFd | SyncFile:
    """The share descriptor or sync file the caller's descriptor ``number`` is a copy of."""
    if not 0 <= number <= _MAX_FD:
        raise IoctlError(errno.EBADF, f"bad file descriptor {number}")
    fd = take_fd(mem, number)
    try:
        entry = drv.shares.find(fd)
    finally:
        close_foreign((fd,))  # (not on the loop when it is not a pipe or socket)
    if entry is None:
        raise IoctlError(errno.EINVAL, f"descriptor {number} is no share descriptor or sync file")
    return entry


def _share_of(drv: GuestDriver, mem: UserMemory, number: int, kind: int,
              dev: GuestDevice) -> ShareFd:
    entry = _file_of(drv, mem, number)
    if not isinstance(entry, ShareFd) or entry.kind != kind:
        raise IoctlError(errno.EINVAL, f"descriptor {number} shares another kind of object")
    _same_host(entry, dev.adapter)
    return entry


def _same_host(entry: ShareFd | SyncFile, adapter: GuestAdapter) -> None:
    if not entry.live or not entry.adapter.active:
        raise IoctlError(errno.ENODEV, "the shared object's adapter or host is gone")
    if entry.adapter is not adapter:
        raise IoctlError(errno.EINVAL, "a shared object opens on its own adapter")


# ---- ShareObjects ------------------------------------------------------------------------------


def _shareable(proc: GuestProcess, handle: int) -> tuple[int, int, GuestAdapter, bool]:
    """(kind, host handle, adapter, read-only) of an object the caller may share."""
    res = proc.handles.get(handle, HandleType.RESOURCE)
    if res is not None:
        if not res.shared or res.device.state != ObjectState.ACTIVE:
            raise IoctlError(errno.EINVAL, "the resource was not made shared")
        return m.SHARED_RESOURCE, res.host_handle, res.device.adapter, res.readonly
    obj = proc.handles.get(handle, HandleType.SYNCOBJECT)
    if obj is not None:
        if not obj.shared:
            raise IoctlError(errno.EINVAL, "the sync object was not made shared")
        return m.SHARED_SYNC_OBJECT, obj.host_handle, obj.adapter, obj.readonly
    raise IoctlError(errno.EBADF, f"0x{handle:08x} is no resource or sync object")


async def _nt_reference(proc: GuestProcess, adapter: GuestAdapter,
                        host_handle: int) -> m.CreateNtSharedObjectReturn:
    """CREATENTSHAREDOBJECT: one host reference on the shared object (given back if the caller
    gives up before it gets it)."""
    link = adapter.link
    hprocess = await host_process(proc, link)
    reply = await vmbus.send(link, G.CREATENTSHAREDOBJECT, hprocess,
                             m.CreateNtSharedObject(host_handle),
                             undo=functools.partial(undo_nt, link))
    return reply


async def share_objects(drv: GuestDriver, proc: GuestProcess, args: Any,
                        mem: UserMemory) -> int:
    """ShareObjects: a descriptor for one shared resource or sync object, its number stored at
    ``shared_handle``; ``desired_access`` decides whether it grants write access (GENERIC_WRITE,
    GENERIC_ALL, or 0 as callers of the real driver pass it) or reading only. Through the FUSE
    file, which cannot put a descriptor into its caller: -EOPNOTSUPP."""
    if int(args.object_count) != 1 or not args.shared_handle:
        return -errno.EINVAL  # one object, as the real driver
    (handle,) = struct.unpack("<I", copy_from_user(mem, args.objects, 4, 4))
    kind, host_handle, adapter, readonly = _shareable(proc, handle)
    if not adapter.active:
        return -errno.ENODEV
    writable = grants_write(int(args.desired_access)) and not readonly
    drv.shares.reserve(proc.uid)
    try:
        reply = await _nt_reference(proc, adapter, host_handle)
        ret = _host_result(reply.status)
        if ret < 0:
            drv.shares.unreserve(proc.uid)
            return ret
        if reply.kind != kind or not reply.handle:
            undo_nt(adapter.link, reply)
            raise IoctlError(errno.EPROTO, "host answered CREATENTSHAREDOBJECT wrongly")
    except BaseException:
        drv.shares.unreserve(proc.uid)
        raise
    try:
        entry, write_end = drv.shares.new_share(adapter, reply, writable, proc.uid)
    except BaseException:
        drv.shares.unreserve(proc.uid)
        release_nt(adapter.link, reply.handle)
        raise
    try:
        give_fd(mem, write_end, args.shared_handle, 8)
    except BaseException:
        drv.shares.close(entry)  # (its descriptor never reached anyone)
        raise
    return 0


async def share_object_with_host(drv: GuestDriver, proc: GuestProcess, args: Any,
                                 mem: UserMemory) -> int:
    """ShareObjectWithHost: a Windows NT handle of the object in the host's own processes.
    pydxg's host is no Windows: there is no such handle to give. The handles are checked, then
    the call answers -EPERM (STATUS_NOT_SUPPORTED, what the real driver returns when its host
    refuses)."""
    dev = _device(proc, args.device_handle)
    handle = _h(args.object_handle)
    for htype in (HandleType.RESOURCE, HandleType.ALLOCATION, HandleType.SYNCOBJECT):
        obj = proc.handles.get(handle, htype)
        if obj is not None:
            break
    else:
        return -errno.EBADF
    if getattr(obj, "device", dev) not in (dev, None):
        return -errno.EBADF
    return -errno.EPERM


# ---- resources ---------------------------------------------------------------------------------


async def query_resource_info_from_nt_handle(drv: GuestDriver, proc: GuestProcess, args: Any,
                                             mem: UserMemory) -> int:
    """QueryResourceInfoFromNtHandle: the sizes OpenResourceFromNtHandle needs, answered by the
    guest (kept from the share's CREATENTSHAREDOBJECT)."""
    dev = _device(proc, args.device)
    entry = _share_of(drv, mem, int(args.nt_handle), m.SHARED_RESOURCE, dev)
    info = entry.info
    args.reserved = 0 if entry.writable else OPENED_READ_ONLY  # (pydxg: the access it grants)
    args.private_runtime_data_size = info.runtime_data_size
    args.total_priv_drv_data_size = info.total_priv_drv_data_size
    args.resource_priv_drv_data_size = info.priv_drv_data_size
    args.allocation_count = info.allocation_count
    return 0


def _undo_open(adapter: GuestAdapter, hprocess: int, device: int,
               reply: m.OpenResourceReturn) -> None:
    """What the host opened for a caller that gave up (or could not be told) goes again."""
    if nt_success(reply.status) and reply.resource:
        vmbus.spawn_quietly(adapter.link, vmbus.send(
            adapter, V.DESTROYALLOCATION, hprocess,
            m.DestroyAllocation(device, reply.resource, DESTROY_UNDO, ())))


def _adopt_open(proc: GuestProcess, dev: GuestDevice, hprocess: int,
                reply: m.OpenResourceReturn, info: m.CreateNtSharedObjectReturn,
                readonly: bool) -> GuestResource:
    """The guest's resource and allocations for what the host opened, after checking it."""
    if proc.closed or dev.state != ObjectState.ACTIVE:
        raise IoctlError(errno.ENODEV, "the device went while the host opened the resource")
    if (not reply.resource or len(reply.allocations) != info.allocation_count
            or len(reply.runtime_data) != info.runtime_data_size
            or len(reply.priv_drv_data) != info.priv_drv_data_size
            or sum(len(a.priv_drv_data) for a in reply.allocations)
            != info.total_priv_drv_data_size):
        raise IoctlError(errno.EPROTO, "host opened another resource than it shared")
    for a in reply.allocations:
        if (a.size <= 0 or a.size % mm.PAGE_SIZE or a.block_size <= 0 or a.offset % mm.PAGE_SIZE
                or a.offset + a.size > a.block_size or not a.handle
                or a.group not in (mm.GROUP_LOCAL, mm.GROUP_NONLOCAL)):
            raise IoctlError(errno.EPROTO, "host described an allocation wrongly")
    link = dev.adapter.link
    res = GuestResource(dev, reply.resource, shared=True, readonly=readonly)
    made: list[GuestAllocation] = []
    try:
        res.handle = proc.handles.alloc(HandleType.RESOURCE, res)
        for a in reply.allocations:
            block = proc.memory.use(link_key(link, hprocess, a.block, readonly), a.block_size,
                                    readonly)
            alloc = GuestAllocation(dev, a.handle, block, a.offset, a.size, a.group, a.flags,
                                    res)
            alloc.readonly = readonly
            made.append(alloc)
            alloc.handle = proc.handles.alloc(HandleType.ALLOCATION, alloc)
    except BaseException:
        _forget_created(proc, dev, made, res, linked=False)
        raise
    res.allocations.extend(made)
    dev.resources.append(res)
    return res


async def open_resource_from_nt_handle(drv: GuestDriver, proc: GuestProcess, args: Any,
                                       mem: UserMemory) -> int:
    """OpenResourceFromNtHandle: a resource of the caller's device whose allocations are the
    shared one's memory (zero-copy where the host's descriptors reach the caller), read-only
    when the share grants no write access (``reserved`` answers OPENED_READ_ONLY then); the
    private data are copied to the caller's buffers, which must be at least the sizes
    QueryResourceInfoFromNtHandle gave."""
    dev = _device(proc, args.device)
    entry = _share_of(drv, mem, int(args.nt_handle), m.SHARED_RESOURCE, dev)
    drv.shares.pin(entry)
    try:
        return await _open_resource(drv, proc, args, mem, dev, entry)
    finally:
        drv.shares.unpin(entry)


async def _open_resource(drv: GuestDriver, proc: GuestProcess, args: Any, mem: UserMemory,
                         dev: GuestDevice, entry: ShareFd) -> int:
    info = entry.info
    count = int(args.allocation_count)
    if (count != info.allocation_count or not args.open_alloc_info
            or args.private_runtime_data_size < info.runtime_data_size
            or args.resource_priv_drv_data_size < info.priv_drv_data_size
            or args.total_priv_drv_data_size < info.total_priv_drv_data_size):
        return -errno.EINVAL
    readonly = not entry.writable
    adapter = dev.adapter
    proc.charge_object(count + 1)
    try:
        hprocess = await host_process(proc, adapter.link)
        reply = await vmbus.send(
            adapter, V.OPENRESOURCE, hprocess,
            m.OpenResource(dev.host_handle, entry.nt, m.OPEN_READ_ONLY if readonly else 0, count),
            undo=lambda r: _undo_open(adapter, hprocess, dev.host_handle, r))
    except BaseException:
        if not proc.closed:
            proc.release_objects(count + 1)
        raise
    ret = _host_result(reply.status)
    if ret < 0:
        proc.release_objects(count + 1)
        return ret
    try:
        res = _adopt_open(proc, dev, hprocess, reply, info, readonly)
    except BaseException:
        if not proc.closed:
            proc.release_objects(count + 1)
        _undo_open(adapter, hprocess, dev.host_handle, reply)
        raise
    try:
        infos = (s.d3dddi_openallocationinfo2 * count)()
        at = 0
        for i, (alloc, a) in enumerate(zip(res.allocations, reply.allocations, strict=True)):
            infos[i].allocation.v = alloc.handle
            infos[i].priv_drv_data = args.total_priv_drv_data + at if a.priv_drv_data else 0
            infos[i].priv_drv_data_size = len(a.priv_drv_data)
            at += len(a.priv_drv_data)
        copy_to_user(mem, args.total_priv_drv_data,
                     b"".join(a.priv_drv_data for a in reply.allocations))
        copy_to_user(mem, args.private_runtime_data, reply.runtime_data)
        copy_to_user(mem, args.resource_priv_drv_data, reply.priv_drv_data)
        copy_to_user(mem, args.open_alloc_info, bytes(infos))
    except BaseException:
        _forget_created(proc, dev, list(res.allocations), res)
        if not proc.closed:
            proc.release_objects(count + 1)
        _undo_open(adapter, hprocess, dev.host_handle, reply)
        raise
    args.private_runtime_data_size = len(reply.runtime_data)
    args.resource_priv_drv_data_size = len(reply.priv_drv_data)
    args.total_priv_drv_data_size = info.total_priv_drv_data_size
    args.resource.v = res.handle
    args.keyed_mutex.v = 0
    args.sync_object.v = 0
    args.reserved = OPENED_READ_ONLY if readonly else 0
    return 0


# ---- sync objects ------------------------------------------------------------------------------


async def _open_fence(proc: GuestProcess, dev: GuestDevice, nt: int, readonly: bool,
                      mem: UserMemory, cpu_va_at: int) -> GuestSyncObject:
    """OPENSYNCOBJECT: the shared fence as a monitored fence of the caller's device, its page
    mapped read-only into the caller with the address stored at struct offset ``cpu_va_at``
    (0 through the FUSE file, which cannot map)."""
    adapter = dev.adapter
    link = adapter.link
    channel = adapter.route()
    if channel is None or channel.closed:
        raise IoctlError(errno.ENODEV, "the adapter's channel is gone")
    local = channel.can_pass_fds
    mirror: tuple[Any, int, HostEvent] | None = None
    proc.charge_object()

    def forget() -> None:
        if mirror is not None:
            proc.sync.drop_mirror(proc, link, mirror)
        if not proc.closed:
            proc.release_objects()

    try:
        hprocess = await host_process(proc, link)
        if not local:  # the guest keeps the page the caller reads (the host tells its values)
            mirror = proc.sync.new_mirror(proc, link, adapter)
        reply, got = await vmbus.send(
            link, G.OPENSYNCOBJECT, hprocess,
            m.OpenSyncObject(dev.host_handle, nt, m.OPEN_READ_ONLY if readonly else 0,
                             mirror[2].id if mirror else 0),
            want_fds=True, undo=lambda r: _undo_create(link, hprocess, r))
    except BaseException:
        forget()
        raise
    try:
        ret = _host_result(reply.status)
        if ret < 0:
            raise IoctlError(-ret, "OPENSYNCOBJECT failed")
        obj = _adopt(proc, dev, hprocess, MONITORED_FENCE, _SHARED_FENCE_FLAGS, reply, got,
                     local)
    except BaseException:
        forget()
        if nt_success(reply.status):
            _undo_create(link, hprocess, reply)
        raise
    finally:
        close_all(got)
    obj.readonly = readonly
    obj.mirror = mirror
    map_fence_page(proc, obj, mem, cpu_va_at, lambda: _undo_create(link, hprocess, reply))
    return obj


async def open_sync_object_from_nt_handle2(drv: GuestDriver, proc: GuestProcess, args: Any,
                                           mem: UserMemory) -> int:
    """OpenSyncObjectFromNtHandle2: the shared fence as a fence of the caller's device;
    ``flags.no_signal``, or a share without write access, opens it read-only (it cannot be
    signalled through this handle; pydxg sets ``flags.no_signal`` on return then)."""
    dev = _device(proc, args.device)
    entry = _share_of(drv, mem, int(args.nt_handle), m.SHARED_SYNC_OBJECT, dev)
    readonly = not entry.writable or bool(args.flags.no_signal)
    args.monitored_fence.fence_value_cpu_va = 0
    drv.shares.pin(entry)
    try:
        obj = await _open_fence(proc, dev, entry.nt, readonly, mem, _NT_FENCE_CPU_VA)
    finally:
        drv.shares.unpin(entry)
    args.monitored_fence.fence_value_gpu_va = 0
    args.sync_object.v = obj.handle
    args.flags.no_signal = int(readonly)
    return 0


# ---- sync files --------------------------------------------------------------------------------


def _sync_file_done(shares: Shares, entry: SyncFile, future: Any) -> None:
    """The sync file's CPU wait ended: reached (0), failed (the host's status), or given up
    (cancelled: its process went, which took the fence that is not shared with it)."""
    if future.cancelled():
        shares.signal(entry, int(NTSTATUS.STATUS_DEVICE_REMOVED))
    else:
        shares.signal(entry, int(future.result()))


async def create_sync_file(drv: GuestDriver, proc: GuestProcess, args: Any,
                           mem: UserMemory) -> int:
    """CreateSyncFile: a descriptor (``sync_file_handle``) that becomes readable, for good, when
    the monitored fence reaches ``fence_value`` (or its wait fails); its bytes say which
    (dxg.guest.share.REACHED). Its CPU wait is registered before the request goes, so no
    wake-up is lost. A sync file of a shared fence keeps a host reference on it, which holds
    the wait (PYDXG_WAITSHAREDSYNC: it does not end with the process that made the sync file)
    and lets any process holding the sync file wait on it from the GPU or open the fence.
    Through the FUSE file: -EOPNOTSUPP."""
    dev = _device(proc, args.device)
    obj = _syncobject(proc, _h(args.monitored_fence))
    if not obj.monitored or obj.adapter is not dev.adapter:
        return -errno.EINVAL
    adapter = dev.adapter
    link = adapter.link
    value = int(args.fence_value)
    shares = drv.shares
    shares.reserve(proc.uid)
    nt = 0
    try:
        hprocess = await host_process(proc, link)
        if obj.shared:
            reply = await _nt_reference(proc, adapter, obj.host_handle)
            ret = _host_result(reply.status)
            if ret < 0:
                shares.unreserve(proc.uid)
                return ret
            nt = reply.handle
        entry, theirs = shares.new_sync_file(adapter, value, nt, proc.uid)
    except BaseException:
        shares.unreserve(proc.uid)
        release_nt(link, nt)
        raise
    try:
        # A shared fence's wait is held by the sync file's own reference, not by this process.
        event = (link.events.add_file_wait(adapter) if nt
                 else link.events.add_wait(proc, adapter))
        entry.event = event
        entry.hprocess = 0 if nt else hprocess
        assert event.future is not None
        event.future.add_done_callback(functools.partial(_sync_file_done, shares, entry))
        if nt:
            reply2 = await vmbus.send(link, G.PYDXG_WAITSHAREDSYNC, 0,
                                      m.WaitSharedSync(nt, 0, event.id, value))
        else:
            reply2 = await vmbus.send(adapter, V.WAITFORSYNCOBJECTFROMCPU, hprocess,
                                      m.WaitSyncObjectCpu(dev.host_handle, 0, event.id,
                                                          (obj.host_handle,), (value,)))
        ret = _host_result(reply2.status)
        if ret < 0:
            link.events.remove(event.id)  # (refused: nothing registered there)
            entry.event = None
            close_all((theirs,))
            shares.close(entry)
            return ret
        shares.watch(entry)
    except BaseException:
        close_all((theirs,))
        shares.close(entry)  # (withdraws the wait)
        raise
    try:
        give_fd(mem, theirs, _SYNCFILE_HANDLE, 8, in_struct=True)
    except BaseException:
        shares.close(entry)
        raise
    args.sync_file_handle = 0  # (the caller finds its descriptor's number here)
    return 0


def _sync_file_of(drv: GuestDriver, mem: UserMemory, number: int,
                  adapter: GuestAdapter) -> SyncFile:
    entry = _file_of(drv, mem, number)
    if not isinstance(entry, SyncFile):
        raise IoctlError(errno.EINVAL, f"descriptor {number} is no sync file")
    if not entry.nt:
        # The real driver answers 0 and does nothing; the fence is not shared, so nobody but
        # its own process can reach it through the file.
        raise IoctlError(errno.EINVAL, "the sync file's fence is not shared")
    _same_host(entry, adapter)
    return entry


async def wait_sync_file(drv: GuestDriver, proc: GuestProcess, args: Any,
                         mem: UserMemory) -> int:
    """WaitSyncFile: the context's later GPU work waits until the sync file's fence reaches its
    value (nothing to wait for once the sync file says it did). As the real driver: the fence
    is opened for the call (read-only), the GPU wait queued, the handle destroyed again (the
    wait stays: it holds the fence, which the sync file keeps alive)."""
    ctx = _live_context(proc, args.context)
    dev = ctx.device
    entry = _sync_file_of(drv, mem, int(args.sync_file_handle), dev.adapter)
    if entry.status == 0:
        return 0
    drv.shares.pin(entry)
    try:
        return await _wait_sync_file(proc, ctx, entry)
    finally:
        drv.shares.unpin(entry)


async def _wait_sync_file(proc: GuestProcess, ctx: Any, entry: SyncFile) -> int:
    dev = ctx.device
    adapter = dev.adapter
    link = adapter.link
    hprocess = await host_process(proc, link)
    reply, got = await vmbus.send(
        link, G.OPENSYNCOBJECT, hprocess,
        m.OpenSyncObject(dev.host_handle, entry.nt, m.OPEN_READ_ONLY),
        want_fds=True, undo=lambda r: _undo_create(link, hprocess, r))
    close_all(got)
    ret = _host_result(reply.status)
    if ret < 0:
        return ret
    if not reply.sync_object:
        raise IoctlError(errno.EPROTO, "host answered OPENSYNCOBJECT without a handle")
    try:
        ret = await _post(proc, adapter, V.WAITFORSYNCOBJECTFROMGPU, m.WaitSyncObjectGpu(
            ctx.host_handle, 0, (reply.sync_object,), (entry.value,)))
    finally:
        # (ordered after the wait: the same channel once async messages are on; a request
        # answered before this goes otherwise)
        vmbus.spawn_quietly(link, vmbus.send(link, G.DESTROYSYNCOBJECT, hprocess,
                                             m.DestroySyncObject(reply.sync_object)))
    return ret


async def open_sync_object_from_sync_file(drv: GuestDriver, proc: GuestProcess, args: Any,
                                          mem: UserMemory) -> int:
    """OpenSyncObjectFromSyncFile: the sync file's (shared) fence as a fence of the caller's
    device, read-only (no_signal, as the real driver opens it), and the value it stands for."""
    dev = _device(proc, args.device)
    entry = _sync_file_of(drv, mem, int(args.sync_file_handle), dev.adapter)
    args.fence_value_cpu_va = 0
    drv.shares.pin(entry)
    try:
        obj = await _open_fence(proc, dev, entry.nt, True, mem, _SYNCFILE_FENCE_CPU_VA)
    finally:
        drv.shares.unpin(entry)
    args.syncobj.v = obj.handle
    args.fence_value = entry.value
    args.fence_value_gpu_va = 0
    return 0


HANDLERS: MappingProxyType[str, Any] = MappingProxyType({
    "LX_DXSHAREOBJECTS": share_objects,
    "LX_DXSHAREOBJECTWITHHOST": share_object_with_host,
    "LX_DXQUERYRESOURCEINFOFROMNTHANDLE": query_resource_info_from_nt_handle,
    "LX_DXOPENRESOURCEFROMNTHANDLE": open_resource_from_nt_handle,
    "LX_DXOPENSYNCOBJECTFROMNTHANDLE2": open_sync_object_from_nt_handle2,
    "LX_DXCREATESYNCFILE": create_sync_file,
    "LX_DXWAITSYNCFILE": wait_sync_file,
    "LX_DXOPENSYNCOBJECTFROMSYNCFILE": open_sync_object_from_sync_file,
})

__all__ = ["HANDLERS"]
