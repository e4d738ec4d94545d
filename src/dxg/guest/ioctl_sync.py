"""The synchronization-object ioctls (the sync half of the real driver's ioctl.c): create and
destroy, signal and wait from the CPU, signal and wait on a context's GPU timeline, the legacy
Signal/WaitForSynchronizationObject2. See docs/sync.md.

Every handle is checked against the caller's table and replaced by the host's; counts are checked
against the real driver's limits before any user memory is read: at most 32 objects for a CPU
signal or wait and the legacy calls (D3DDDI_MAX_OBJECT_SIGNALED / _WAITED_ON), contexts below
64 for the legacy signal and 1..64 for SignalSynchronizationObjectFromGpu2
(D3DDDI_MAX_BROADCAST_CONTEXT), and what fits one bus packet for the GPU signal and wait.

A CPU wait registers its host event before the request goes (no wake-up is lost): a blocking one
parks its call until SIGNALGUESTEVENT comes (other calls of the process go on), an asynchronous
one (``async_event``: an eventfd the caller hands over) returns at once and the eventfd is
written when the wait is over. A blocking wait whose call is cancelled (the client's CANCEL, its
process gone) unregisters its event and withdraws the wait on the host. GPU signals and waits
are fire-and-forget once the host enables asynchronous messages, as in the real driver; a CPU
signal is sent with a completion (the fence's page shows the value when the call returns).
"""

from __future__ import annotations

import errno
import functools
import struct
from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from dxg.guest import vmbus
from dxg.guest.allocation import link_key
from dxg.guest.device import ObjectState
from dxg.guest.errors import IoctlError
from dxg.guest.handles import HandleType
from dxg.guest.ioctl_memory import _check_block_fd
from dxg.guest.lookup import PRIVATE_DATA_MAX, _context, _device, _h, _host_result
from dxg.guest.process import GuestProcess, existing_host_process, host_process
from dxg.guest.syncobject import GuestSyncObject, HostEvent, release_syncobject
from dxg.guest.usermem import UserMemory, copy_from_user, map_block, take_fd
from dxg.oslib.eventfd import eventfd_count
from dxg.oslib.fds import close_all, close_foreign
from dxg.protocol import messages as m
from dxg.protocol.commands import GlobalCommand, VgpuCommand
from dxg.protocol.headers import encode_vgpu
from dxg.uapi import structs as s
from dxg.uapi.handles import to_handle
from dxg.uapi.ntstatus import nt_success
from dxg.vmbus.channel import ChannelClosed

if TYPE_CHECKING:
    from dxg.guest.adapter import GuestAdapter
    from dxg.guest.context import GuestContext
    from dxg.guest.device import GuestDevice
    from dxg.guest.driver import GuestDriver

V = VgpuCommand
_T = s.d3dddi_synchronizationobject_type
MUTEX = int(_T._D3DDDI_SYNCHRONIZATION_MUTEX)
SEMAPHORE = int(_T._D3DDDI_SEMAPHORE)
FENCE = int(_T._D3DDDI_FENCE)
CPU_NOTIFICATION = int(_T._D3DDDI_CPU_NOTIFICATION)
MONITORED_FENCE = int(_T._D3DDDI_MONITORED_FENCE)
PERIODIC_MONITORED_FENCE = int(_T._D3DDDI_PERIODIC_MONITORED_FENCE)

MAX_OBJECT_SIGNALED = 32  # D3DDDI_MAX_OBJECT_SIGNALED
MAX_OBJECT_WAITED_ON = 32  # D3DDDI_MAX_OBJECT_WAITED_ON
MAX_BROADCAST_CONTEXT = 64  # D3DDDI_MAX_BROADCAST_CONTEXT
# The GPU signal and wait take as many objects (a u32 handle and a u64 value each) as fit one
# bus packet with their contexts: the real driver bounds them by the packet size too.
MAX_GPU_OBJECTS = (PRIVATE_DATA_MAX - 512) // 12
# Where CreateSynchronizationObject2 returns the monitored fence's CPU address.
_INFO = s.d3dkmt_createsynchronizationobject2.info.offset
_UNION = s.d3dddi_synchronizationobjectinfo2._anon0.offset
FENCE_CPU_VA = _INFO + _UNION + 8  # info.monitored_fence.fence_cpu_virtual_address
_VALUE_KINDS = frozenset({FENCE, MONITORED_FENCE})


# ---- helpers -------------------------------------------------------------------------------------


def _u32s(mem: UserMemory, addr: int, n: int, limit: int) -> list[int]:
    return list(struct.unpack(f"<{n}I", copy_from_user(mem, addr, 4 * n, 4 * limit)))


def _u64s(mem: UserMemory, addr: int, n: int, limit: int) -> list[int]:
    return list(struct.unpack(f"<{n}Q", copy_from_user(mem, addr, 8 * n, 8 * limit)))


def _syncobject(proc: GuestProcess, handle: int) -> GuestSyncObject:
    obj = proc.handles.get(handle, HandleType.SYNCOBJECT)
    if obj is None:
        raise IoctlError(errno.EBADF, f"0x{handle:08x} is not a sync object")
    return obj


def _waitable(proc: GuestProcess, handle: int) -> tuple[int, GuestAdapter, Any, bool]:
    """(host handle, adapter, object, monitored) of a sync object or of a queue's monitored
    fence (a paging queue's or a hardware queue's)."""
    obj = proc.handles.get(handle, HandleType.SYNCOBJECT)
    if obj is not None:
        return obj.host_handle, obj.adapter, obj, obj.monitored
    queue = proc.handles.get(handle, HandleType.MONITOREDFENCE)
    if queue is None:
        raise IoctlError(errno.EBADF, f"0x{handle:08x} is not a sync object")
    device = getattr(queue, "device", None) or queue.context.device
    return int(queue.host_fence), device.adapter, queue, True


def _objects(proc: GuestProcess, handles: list[int],
             adapter: GuestAdapter) -> tuple[list[int], list[Any], list[bool]]:
    """Host handles, objects and monitored-ness of ``handles``, all on ``adapter``."""
    hosts, objs, monitored = [], [], []
    for h in handles:
        host, on, obj, mon = _waitable(proc, h)
        if on is not adapter:
            raise IoctlError(errno.EINVAL, f"sync object 0x{h:08x} is on another adapter")
        if not on.active:
            raise IoctlError(errno.ENODEV, "adapter was removed")
        hosts.append(host)
        objs.append(obj)
        monitored.append(mon)
    return hosts, objs, monitored


def _live_context(proc: GuestProcess, handle: Any) -> GuestContext:
    ctx = _context(proc, handle)
    if ctx.destroyed or ctx.device.state != ObjectState.ACTIVE:
        raise IoctlError(errno.EBADF, "invalid context handle")
    if not ctx.device.adapter.active:
        raise IoctlError(errno.ENODEV, "adapter was removed")
    return ctx


def _eventfd(mem: UserMemory, number: int) -> int:
    """The caller's eventfd ``number``, taken (ours to close); -EINVAL for anything else."""
    if not 0 < number < 1 << 31:
        raise IoctlError(errno.EINVAL, f"bad eventfd {number}")
    fd = take_fd(mem, number)
    if eventfd_count(fd) is None:
        close_foreign((fd,))  # (a file: closed off the loop)
        raise IoctlError(errno.EINVAL, f"descriptor {number} is not an eventfd")
    return fd


async def _post(proc: GuestProcess, adapter: GuestAdapter, command: VgpuCommand,
                body: Any) -> int:
    """A fire-and-forget command once the host enables asynchronous messages (as the real
    driver sends the signal and the GPU wait); elsewhere a request whose status is the
    answer."""
    hprocess = await host_process(proc, adapter.link)
    if not adapter.link.async_msg_enabled:
        reply = await vmbus.send(adapter, command, hprocess, body)
        return _host_result(reply.status)
    channel = adapter.route()
    if channel is None or channel.closed:
        raise IoctlError(errno.ENODEV, "the adapter's channel is gone")
    try:
        channel.send_async(encode_vgpu(command, hprocess, adapter.host_vgpu_luid, body.pack(),
                                       async_msg=True))
    except ChannelClosed:
        raise IoctlError(errno.ENODEV, "the host removed the channel") from None
    except ValueError as e:  # too long for the connection
        raise IoctlError(errno.E2BIG, str(e)) from None
    return 0


def _withdraw(adapter: GuestAdapter, hprocess: int, event_id: int) -> None:
    """Tell the host a CPU wait is given up (fire-and-forget; best effort)."""
    channel = adapter.route()
    if channel is None or channel.closed or not adapter.active:
        return
    body = m.WaitSyncObjectCpu(0, 0, event_id, (), ())
    try:
        channel.send_async(encode_vgpu(V.WAITFORSYNCOBJECTFROMCPU, hprocess,
                                       adapter.host_vgpu_luid, body.pack(), async_msg=True))
    except (ChannelClosed, ValueError):
        pass


# ---- create / destroy ----------------------------------------------------------------------------


async def create_sync_object(drv: GuestDriver, proc: GuestProcess, args: Any,
                             mem: UserMemory) -> int:
    """CreateSynchronizationObject2: any kind the real driver accepts (the host refuses a
    periodic monitored fence: no display). A monitored fence's value page is mapped read-only
    into the caller at ``fence_cpu_virtual_address`` (0 through the FUSE file, which cannot
    map); a CPU notification's eventfd is taken and written whenever the object is
    signalled."""
    dev = _device(proc, args.device)
    info = args.info
    kind = int(info.type)
    if not MUTEX <= kind <= PERIODIC_MONITORED_FENCE:
        return -errno.EINVAL
    if (info.flags.shared or info.flags.nt_security_sharing) and not (
            info.flags.shared and info.flags.nt_security_sharing):
        # shared by NT handle (a descriptor: docs/sharing.md), as the real driver requires; the
        # host shares monitored fences (other kinds: STATUS_NOT_SUPPORTED)
        return -errno.EINVAL
    adapter = dev.adapter
    link = adapter.link
    channel = adapter.route()
    if channel is None or channel.closed:
        return -errno.ENODEV
    monitored = kind == MONITORED_FENCE
    local = channel.can_pass_fds
    hinfo = type(info).from_buffer_copy(bytes(info))
    event: HostEvent | None = None
    mirror: tuple[Any, int, HostEvent] | None = None
    proc.charge_object()

    def forget() -> None:
        if event is not None:
            link.events.remove(event.id)
        if mirror is not None:
            proc.sync.drop_mirror(proc, link, mirror)
        if not proc.closed:
            proc.release_objects()

    try:
        hprocess = await host_process(proc, link)
        if kind == CPU_NOTIFICATION:
            fd = _eventfd(mem, int(info.cpu_notification.event))
            event = link.events.add_eventfd(proc, adapter, fd, persistent=True)
            hinfo.cpu_notification.event = event.id
        if monitored:
            hinfo.monitored_fence.fence_cpu_virtual_address = 0
            hinfo.monitored_fence.fence_gpu_virtual_address = 0
            if not local:  # the guest keeps the page the client reads
                mirror = proc.sync.new_mirror(proc, link, adapter,
                                              int(info.monitored_fence.initial_fence_value))

        def undo(reply: m.CreateSyncObjectReturn) -> None:
            _undo_create(link, hprocess, reply)

        reply, got = await vmbus.send(
            adapter, V.CREATESYNCOBJECT, hprocess,
            m.CreateSyncObject(dev.host_handle, mirror[2].id if mirror else 0, bytes(hinfo)),
            want_fds=True, undo=undo)
    except BaseException:
        forget()
        raise
    try:
        ret = _host_result(reply.status)
        if ret < 0:
            forget()
            return ret
        obj = _adopt(proc, dev, hprocess, kind, int(info.flags.value), reply, got, local)
    except BaseException:
        forget()
        if nt_success(reply.status):
            _undo_create(link, hprocess, reply)
        raise
    finally:
        close_all(got)
    obj.event = event
    obj.mirror = mirror
    if monitored:
        args.info.monitored_fence.fence_cpu_virtual_address = 0
        map_fence_page(proc, obj, mem, FENCE_CPU_VA, lambda: _undo_create(link, hprocess, reply))
        args.info.monitored_fence.fence_gpu_virtual_address = reply.gpu_va
    args.sync_object.v = obj.handle
    return ret


def _adopt(proc: GuestProcess, dev: GuestDevice, hprocess: int, kind: int, flags: int,
           reply: m.CreateSyncObjectReturn, got: list[int], local: bool) -> GuestSyncObject:
    """The guest's object for what the host made, after checking the reply."""
    if proc.closed or dev.state != ObjectState.ACTIVE:
        raise IoctlError(errno.ENODEV, "the device went while the host made the object")
    if not reply.sync_object:
        raise IoctlError(errno.EPROTO, "host answered CREATESYNCOBJECT without a handle")
    monitored = kind == MONITORED_FENCE
    obj = GuestSyncObject(dev, reply.sync_object, kind, flags, device_object=monitored)
    if monitored and local:
        if (not reply.block or reply.block_size <= 0 or reply.offset % 8
                or reply.offset + 8 > reply.block_size or len(got) != 1):
            raise IoctlError(errno.EPROTO, "host placed the fence outside its block")
        _check_block_fd(got[0], reply.block_size, readonly=True)  # (only the host writes it)
        link = dev.adapter.link
        block = proc.memory.use(link_key(link, hprocess, reply.block), reply.block_size,
                                readonly=True)
        if block.fd < 0:
            block.fd = got.pop()
        obj.block = block
        obj.offset = reply.offset
    elif got or (not monitored and reply.block):
        raise IoctlError(errno.EPROTO, "host sent a fence page the object does not have")
    try:
        obj.handle = proc.handles.alloc(HandleType.SYNCOBJECT, obj)
    except BaseException:
        release_syncobject(proc, obj)
        raise
    proc.sync.objects[obj.handle] = obj
    return obj


def map_fence_page(proc: GuestProcess, obj: GuestSyncObject, mem: UserMemory, at: int,
                   undo: Callable[[], None]) -> None:
    """Map a monitored fence's value page (its own, or its TCP mirror's) read-only into the
    caller at ``at``. A front end that cannot map (the FUSE file) leaves the address 0; any other
    failure releases the object here and on the host (``undo``)."""
    mirror = obj.mirror
    block = obj.block if obj.block is not None else mirror[0].shadow.block  # type: ignore[index]
    offset = obj.offset if obj.block is not None else 8 * mirror[1]  # type: ignore[index]
    try:
        map_block(mem, block.id, block.size, offset, at, proc.memory.give(block), readonly=True)
        block.mapped = True
    except IoctlError as e:
        if e.errno != errno.EOPNOTSUPP:
            release_syncobject(proc, obj)
            if not proc.closed:
                proc.release_objects()
            undo()
            raise


def _undo_create(link: Any, hprocess: int, reply: m.CreateSyncObjectReturn) -> None:
    """What the host made for a caller that gave up (or could not be told) goes again."""
    if nt_success(reply.status) and reply.sync_object:
        vmbus.spawn_quietly(link, vmbus.send(link, GlobalCommand.DESTROYSYNCOBJECT, hprocess,
                                             m.DestroySyncObject(reply.sync_object)))


async def destroy_sync_object(drv: GuestDriver, proc: GuestProcess, args: Any,
                              mem: UserMemory) -> int:
    """DestroySynchronizationObject: the guest's handle first, then the host's object (on the
    global channel, as the real driver); waits on it end with an error. Works on a removed
    adapter too (what the guest holds is released)."""
    obj = _syncobject(proc, _h(args.sync_object))
    adapter = obj.adapter
    host = obj.host_handle
    release_syncobject(proc, obj)
    proc.release_objects()
    link = adapter.link
    if not adapter.active or not link.up:
        return 0  # the host (and the object there) is gone
    hprocess = existing_host_process(proc, link)
    if hprocess is None:
        return 0
    reply = await vmbus.send(link, GlobalCommand.DESTROYSYNCOBJECT, hprocess,
                             m.DestroySyncObject(host))
    return _host_result(reply.status)


# ---- CPU ----------------------------------------------------------------------------------------


async def signal_sync_object_cpu(drv: GuestDriver, proc: GuestProcess, args: Any,
                                 mem: UserMemory) -> int:
    """SignalSynchronizationObjectFromCpu: 1..32 monitored fences take their values now."""
    dev = _device(proc, args.device)
    n = int(args.object_count)
    if not 0 < n <= MAX_OBJECT_SIGNALED:
        return -errno.EINVAL
    handles = _u32s(mem, args.objects, n, MAX_OBJECT_SIGNALED)
    values = _u64s(mem, args.fence_values, n, MAX_OBJECT_SIGNALED)
    hosts = []
    for h in handles:
        obj = _syncobject(proc, h)
        if not obj.monitored or obj.adapter is not dev.adapter:
            return -errno.EINVAL
        if obj.readonly:
            return -errno.EACCES  # opened from a read-only share (docs/sharing.md)
        hosts.append(obj.host_handle)
    hprocess = await host_process(proc, dev.adapter.link)
    reply = await vmbus.send(dev.adapter, V.SIGNALSYNCOBJECT, hprocess, m.SignalSyncObject(
        int(args.flags.value), dev.host_handle, tuple(hosts), (), tuple(values)))
    return _host_result(reply.status)


async def wait_sync_object_cpu(drv: GuestDriver, proc: GuestProcess, args: Any,
                               mem: UserMemory) -> int:
    """WaitForSynchronizationObjectFromCpu: until every (``wait_any``: one) monitored fence has
    reached its value. ``async_event`` 0: the call blocks (it parks; the process's other calls
    go on); else it is an eventfd the caller hands over, written once the wait is over, and the
    call returns at once."""
    dev = _device(proc, args.device)
    n = int(args.object_count)
    if not 0 < n <= MAX_OBJECT_WAITED_ON or int(args.flags.value) & ~m.WAIT_ANY:
        return -errno.EINVAL
    handles = _u32s(mem, args.objects, n, MAX_OBJECT_WAITED_ON)
    values = _u64s(mem, args.fence_values, n, MAX_OBJECT_WAITED_ON)
    adapter = dev.adapter
    hosts, objs, monitored = _objects(proc, handles, adapter)
    if not all(monitored):
        return -errno.EINVAL  # only monitored fences are waited on from the CPU
    link = adapter.link
    hprocess = await host_process(proc, link)
    wait_any = int(args.flags.value) & m.WAIT_ANY
    if args.async_event:
        event = link.events.add_eventfd(proc, adapter, _eventfd(mem, int(args.async_event)),
                                        persistent=False)
        if not wait_any:
            event.on_signal = functools.partial(_reached_all, objs, values)
        try:
            reply = await vmbus.send(adapter, V.WAITFORSYNCOBJECTFROMCPU, hprocess,
                                     m.WaitSyncObjectCpu(dev.host_handle, wait_any, event.id,
                                                         tuple(hosts), tuple(values)))
        except BaseException:
            if link.events.remove(event.id):
                _withdraw(adapter, hprocess, event.id)
            raise
        ret = _host_result(reply.status)
        if ret < 0:
            link.events.remove(event.id)
        return ret
    event = link.events.add_wait(proc, adapter)
    sent = True  # (from here on the host may have registered the wait)
    try:
        reply = await vmbus.send(adapter, V.WAITFORSYNCOBJECTFROMCPU, hprocess,
                                 m.WaitSyncObjectCpu(dev.host_handle, wait_any, event.id,
                                                     tuple(hosts), tuple(values)))
        ret = _host_result(reply.status)
        if ret < 0:
            sent = False  # refused: nothing registered there
            return ret
        assert event.future is not None
        status = await event.future
        ret = _host_result(status)
        if not wait_any:
            _reached_all(objs, values, status)
        return ret
    finally:
        if link.events.remove(event.id) and sent and not proc.closed:
            # given up on (the call was cancelled, even before the ack came): the host forgets
            # the wait (an id it does not know is ignored)
            _withdraw(adapter, hprocess, event.id)


def _reached_all(objs: Sequence[Any], values: Sequence[int], status: int) -> None:
    """A wait-all on ``objs`` ended with ``status``: on success each fence is at least at its
    value, which a queue's fence page over TCP (the guest's own copy) now shows."""
    if _host_result(status) != 0:
        return
    for obj, value in zip(objs, values, strict=True):
        reached = getattr(obj, "reached", None)
        if reached is not None:
            reached(value)


# ---- GPU -----------------------------------------------------------------------------------------


def _legacy_values(objs: list[Any], monitored: list[bool],
                   fence_value: int) -> tuple[tuple[int, ...], int]:
    """(values, fence_value) for a call that gives one value for every object: monitored
    fences get it each; legacy objects the single legacy value."""
    if any(monitored):
        if not all(mon or o.type in _VALUE_KINDS
                   for o, mon in zip(objs, monitored, strict=True)):
            raise IoctlError(errno.EINVAL, "monitored and legacy objects mixed up")
        return (fence_value,) * len(objs), 0
    return (), fence_value


async def _signal_gpu(proc: GuestProcess, contexts: list[GuestContext], flags: int,
                      objects: list[int], values: tuple[int, ...], fence_value: int,
                      cpu_event_fd: int, mem: UserMemory) -> int:
    """Queue a signal of ``objects`` on every context's GPU timeline (and, with
    ``cpu_event_fd``, a write of that eventfd when they all get there)."""
    adapter = contexts[0].device.adapter
    if any(c.device.adapter is not adapter for c in contexts):
        return -errno.EINVAL
    hosts, objs, monitored = _objects(proc, objects, adapter)
    if not all(isinstance(o, GuestSyncObject) for o in objs):
        return -errno.EINVAL  # a queue's fence: only its queue signals it
    if any(o.readonly for o in objs):
        return -errno.EACCES  # opened from a read-only share (docs/sharing.md)
    if values and (len(values) != len(objects)
                   or not all(o.type in _VALUE_KINDS for o in objs)):
        return -errno.EINVAL
    if not values:
        values, fence_value = _legacy_values(objs, monitored, fence_value)
    link = adapter.link
    event = None
    if cpu_event_fd:
        if any(monitored) or any(isinstance(o, GuestSyncObject) and o.type in _VALUE_KINDS
                                 for o in objs):
            return -errno.EINVAL  # the union holds the eventfd: no value for them
        event = link.events.add_eventfd(proc, adapter, _eventfd(mem, cpu_event_fd),
                                        persistent=False)
    try:
        ret = await _post(proc, adapter, V.SIGNALSYNCOBJECT, m.SignalSyncObject(
            flags, 0, tuple(hosts), tuple(c.host_handle for c in contexts), tuple(values),
            fence_value, event.id if event else 0))
    except BaseException:
        if event is not None:
            link.events.remove(event.id)
        raise
    if ret < 0 and event is not None:
        link.events.remove(event.id)
    return ret


async def signal_sync_object_gpu(drv: GuestDriver, proc: GuestProcess, args: Any,
                                 mem: UserMemory) -> int:
    """SignalSynchronizationObjectFromGpu: monitored fences take their values once the
    context's GPU work queued before is done."""
    ctx = _live_context(proc, args.context)
    n = int(args.object_count)
    if not 0 < n <= MAX_GPU_OBJECTS:
        return -errno.EINVAL
    handles = _u32s(mem, args.objects, n, MAX_GPU_OBJECTS)
    values = _u64s(mem, args.monitored_fence_values, n, MAX_GPU_OBJECTS)
    return await _signal_gpu(proc, [ctx], 0, handles, tuple(values), 0, 0, mem)


async def signal_sync_object_gpu2(drv: GuestDriver, proc: GuestProcess, args: Any,
                                  mem: UserMemory) -> int:
    """SignalSynchronizationObjectFromGpu2: the signal once every context (1..64) got there;
    with ``enqueue_cpu_event`` (no objects with a value then: the union holds the eventfd) the
    caller's eventfd is written at that point."""
    nc = int(args.context_count)
    n = int(args.object_count)
    if not 0 < nc <= MAX_BROADCAST_CONTEXT or n > MAX_GPU_OBJECTS:
        return -errno.EINVAL
    contexts = [_live_context(proc, to_handle(h))
                for h in _u32s(mem, args.contexts, nc, MAX_BROADCAST_CONTEXT)]
    handles = _u32s(mem, args.objects, n, MAX_GPU_OBJECTS) if n else []
    enqueue = bool(args.flags.enqueue_cpu_event)
    if not n and not enqueue:
        return -errno.EINVAL
    values: tuple[int, ...] = ()
    fence_value = 0
    if n and not enqueue:
        _, _, monitored = _objects(proc, handles, contexts[0].device.adapter)
        if monitored[0]:
            values = tuple(_u64s(mem, args.monitored_fence_values, n, MAX_GPU_OBJECTS))
        else:
            fence_value = int(args.fence_value)
    return await _signal_gpu(proc, contexts, int(args.flags.value), handles, values,
                             fence_value, int(args.cpu_event_handle) if enqueue else 0, mem)


async def signal_sync_object_legacy(drv: GuestDriver, proc: GuestProcess, args: Any,
                                    mem: UserMemory) -> int:
    """SignalSynchronizationObject2 (legacy): up to 32 objects from the struct, signalled on
    the context and up to 63 more (broadcast); one fence value for all, or the caller's eventfd
    with ``enqueue_cpu_event``."""
    nc = int(args.context_count)
    n = int(args.object_count)
    if nc >= MAX_BROADCAST_CONTEXT or n > MAX_OBJECT_SIGNALED:
        return -errno.EINVAL
    contexts = [_live_context(proc, args.context)]
    contexts += [_live_context(proc, args.contexts[i]) for i in range(nc)]
    handles = [int(args.object_array[i].v) for i in range(n)]
    enqueue = bool(args.flags.enqueue_cpu_event)
    if not n and not enqueue:
        return -errno.EINVAL
    return await _signal_gpu(proc, contexts, int(args.flags.value), handles, (),
                             0 if enqueue else int(args.fence.fence_value),
                             int(args.cpu_event_handle) if enqueue else 0, mem)


async def _wait_gpu(proc: GuestProcess, ctx: GuestContext, handles: list[int],
                    values: tuple[int, ...] | None, fence_value: int) -> int:
    adapter = ctx.device.adapter
    hosts, objs, monitored = _objects(proc, handles, adapter)
    if values is None:  # one value for all
        if any(monitored):
            values, _ = _legacy_values(objs, monitored, fence_value)
            legacy = 0
        else:
            values, legacy = (fence_value,), 1
    else:
        legacy = 0
    for o in objs:
        if isinstance(o, GuestSyncObject) and o.type == CPU_NOTIFICATION:
            return -errno.EINVAL
    return await _post(proc, adapter, V.WAITFORSYNCOBJECTFROMGPU, m.WaitSyncObjectGpu(
        ctx.host_handle, legacy, tuple(hosts), tuple(values)))


async def wait_sync_object_gpu(drv: GuestDriver, proc: GuestProcess, args: Any,
                               mem: UserMemory) -> int:
    """WaitForSynchronizationObjectFromGpu: the context's later GPU work waits until the
    objects are reached. The first object decides, as in the real driver: monitored fences
    (and queues' fences) take one value each, legacy objects the single ``fence_value``."""
    ctx = _live_context(proc, args.context)
    n = int(args.object_count)
    if not 0 < n <= MAX_OBJECT_WAITED_ON:
        return -errno.EINVAL
    handles = _u32s(mem, args.objects, n, MAX_OBJECT_WAITED_ON)
    _, _, _, first_monitored = _waitable(proc, handles[0])
    if first_monitored:
        values = tuple(_u64s(mem, args.monitored_fence_values, n, MAX_OBJECT_WAITED_ON))
        return await _wait_gpu(proc, ctx, handles, values, 0)
    return await _wait_gpu(proc, ctx, handles, None, int(args.fence_value))


async def wait_sync_object_legacy(drv: GuestDriver, proc: GuestProcess, args: Any,
                                  mem: UserMemory) -> int:
    """WaitForSynchronizationObject2 (legacy): the context waits for up to 32 objects of the
    struct (a mutex or semaphore is taken; fences reach ``fence_value``)."""
    ctx = _live_context(proc, args.context)
    n = int(args.object_count)
    if not 0 < n <= MAX_OBJECT_WAITED_ON:
        return -errno.EINVAL
    handles = [int(args.object_array[i].v) for i in range(n)]
    return await _wait_gpu(proc, ctx, handles, None, int(args.fence.fence_value))


HANDLERS: MappingProxyType[str, Any] = MappingProxyType({
    "LX_DXCREATESYNCHRONIZATIONOBJECT": create_sync_object,
    "LX_DXDESTROYSYNCHRONIZATIONOBJECT": destroy_sync_object,
    "LX_DXSIGNALSYNCHRONIZATIONOBJECT": signal_sync_object_legacy,
    "LX_DXWAITFORSYNCHRONIZATIONOBJECT": wait_sync_object_legacy,
    "LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMCPU": signal_sync_object_cpu,
    "LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMGPU": signal_sync_object_gpu,
    "LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMGPU2": signal_sync_object_gpu2,
    "LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU": wait_sync_object_cpu,
    "LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMGPU": wait_sync_object_gpu,
})

__all__ = ["FENCE_CPU_VA", "HANDLERS", "MAX_GPU_OBJECTS", "map_fence_page"]
