"""The ioctl handlers and the dispatch table indexed by ioctl number (the real driver's ioctl.c).

A handle that is stale, foreign, of the wrong type or not a handle at all is answered -EBADF,
which is what the real driver's ntstatus2int gives for STATUS_INVALID_HANDLE (the real guest
answers most of these -EINVAL; callers then cannot tell a bad handle from a bad argument).

`dispatch()` checks the whole 32-bit code (type, number, direction and size bits) exactly as the
kernel does (-ENOTTY otherwise), parses the struct, runs the handler and returns
(return value, struct bytes out). Handlers are coroutines (they wait for the host without
holding anything up) and see only the process, the struct and the UserMemory accessor: they
never know which front end called. The table is keyed by the ABI's ioctl names.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import logging
import struct
from collections.abc import Awaitable, Callable
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from dxg import uapi
from dxg.guest import vmbus
from dxg.guest.context import create_context, destroy_context
from dxg.guest.device import (
    DEVICEEXECUTION_ACTIVE,
    ObjectState,
    create_device,
    destroy_device,
)
from dxg.guest.errors import IoctlError
from dxg.guest.handles import HandleType
from dxg.guest.ioctl_memory import HANDLERS as MEMORY_HANDLERS
from dxg.guest.ioctl_queue import HANDLERS as QUEUE_HANDLERS
from dxg.guest.ioctl_share import HANDLERS as SHARE_HANDLERS
from dxg.guest.ioctl_stats import HANDLERS as STATS_HANDLERS
from dxg.guest.ioctl_sync import HANDLERS as SYNC_HANDLERS
from dxg.guest.lookup import (
    PRIVATE_DATA_MAX,
    _adapter,
    _context,
    _device,
    _errno_of,
    _h,
    _host_result,
)
from dxg.guest.process import (
    GuestProcess,
    ProcessAdapter,
    close_adapter,
    existing_host_process,
    host_process,
    open_adapter,
)
from dxg.guest.usermem import (
    UserMemory,
    UserMemoryFault,
    copy_from_user,
    copy_to_user,
    give_fd,
    take_fd,
)
from dxg.oslib.eventfd import eventfd_count
from dxg.oslib.fds import close_all, close_foreign
from dxg.oslib.memfd import memfd_from_bytes
from dxg.protocol import messages as m
from dxg.protocol.errors import ProtocolError
from dxg.protocol.guids import luid_parts, luid_to_int
from dxg.uapi import wddm
from dxg.uapi.escape import FD_OFFSET, EscapeFlags, EscapeHeader, is_pydxg_escape
from dxg.uapi.ntstatus import NTSTATUS, nt_success

if TYPE_CHECKING:
    from dxg.guest.adapter import GuestAdapter
    from dxg.guest.driver import GuestDriver

log = logging.getLogger(__name__)

Handler = Callable[["GuestDriver", GuestProcess, Any, UserMemory], Awaitable[int]]

# EnumAdapters3 accepts at most this many entries (the real driver's bound).
ENUMADAPTERS3_MAX = 0xFFFF
# pydxg escapes may carry more (a bulk attachment on the bus): up to this much.
PYDXG_ESCAPE_MAX = 16 << 20
# enum d3dddi_knownescapetype of the real driver (first u32 of a driver_known_escape's data).
_KNOWN_ESCAPE_TRANSLATEALLOCATIONHANDLE = 0
_KNOWN_ESCAPE_TRANSLATERESOURCEHANDLE = 1
_KNOWN_ESCAPE_BUILDTESTCOMMANDBUFFER = 3


# ---- enumeration and open (local) ----------------------------------------------------------------


def _fill_adapter_infos(proc: GuestProcess, adapters: list[GuestAdapter], mem: UserMemory,
                        addr: int) -> list[int]:
    """Open each adapter and write the array; returns the handles opened (all undone on
    failure)."""
    infos = (uapi.d3dkmt_adapterinfo * len(adapters))()
    opened: list[int] = []
    try:
        for i, ad in enumerate(adapters):
            h = open_adapter(proc, ad)
            opened.append(h)
            infos[i].adapter_handle.v = h
            infos[i].adapter_luid.a, infos[i].adapter_luid.b = luid_parts(ad.luid)
        copy_to_user(mem, addr, bytes(infos))
    except BaseException:
        for h in opened:
            pa = proc.handles.free(h, HandleType.ADAPTER)
            if pa is not None:
                _drop_adapter_ref(proc, pa)
        raise
    return opened


def _drop_adapter_ref(proc: GuestProcess, pa: ProcessAdapter) -> None:
    """Undo one open that was never used (no device can exist on it yet)."""
    pa.refcount -= 1
    if pa.refcount <= 0 and not pa.devices:
        proc.adapters.pop(id(pa.adapter), None)
        if pa in pa.adapter.process_adapters:
            pa.adapter.process_adapters.remove(pa)


async def enum_adapters2(drv: GuestDriver, proc: GuestProcess, args: Any,
                         mem: UserMemory) -> int:
    """Lists the adapters that are not compute-only, opening each one (those the caller's
    policy lets it see: dxg.guest.policy)."""
    adapters = [a for a in drv.adapters_for(proc) if not a.compute_only]
    if args.num_adapters == 0 or args.adapters == 0:
        args.num_adapters = len(adapters)
        return 0
    if args.num_adapters > uapi.D3DKMT_ADAPTERS_MAX:
        raise IoctlError(errno.EINVAL, "num_adapters exceeds D3DKMT_ADAPTERS_MAX")
    if args.num_adapters < len(adapters):
        args.num_adapters = len(adapters)  # the real driver forgets this; callers need it
        return -errno.EOVERFLOW
    _fill_adapter_infos(proc, adapters, mem, args.adapters)
    args.num_adapters = len(adapters)
    return 0


async def enum_adapters3(drv: GuestDriver, proc: GuestProcess, args: Any,
                         mem: UserMemory) -> int:
    """Like EnumAdapters2 with a filter. A too-small array gets -EOVERFLOW and the needed count,
    and opens nothing (the real driver overflows its buffer and leaks handles here). Only the
    adapters the caller's policy lets it see."""
    adapters = drv.adapters_for(proc)
    if not args.filter.include_compute_only:
        adapters = [a for a in adapters if not a.compute_only]
    if args.adapter_count == 0 or args.adapters == 0:
        args.adapter_count = len(adapters)
        return 0
    if args.adapter_count > ENUMADAPTERS3_MAX:
        raise IoctlError(errno.EINVAL, "adapter_count too large")
    if args.adapter_count < len(adapters):
        args.adapter_count = len(adapters)
        return -errno.EOVERFLOW
    _fill_adapter_infos(proc, adapters, mem, args.adapters)
    args.adapter_count = len(adapters)
    return 0


async def open_adapter_from_luid(drv: GuestDriver, proc: GuestProcess, args: Any,
                                 mem: UserMemory) -> int:
    ad = drv.adapter_for(proc, luid_to_int(args.adapter_luid.a, args.adapter_luid.b))
    if ad is None:
        return -errno.EINVAL  # no such adapter, or one the caller's policy hides: the same
    args.adapter_handle.v = open_adapter(proc, ad)
    return 0


async def close_adapter_ioctl(drv: GuestDriver, proc: GuestProcess, args: Any,
                              mem: UserMemory) -> int:
    await close_adapter(proc, _h(args.adapter_handle))
    return 0


async def enum_processes(drv: GuestDriver, proc: GuestProcess, args: Any,
                         mem: UserMemory) -> int:
    adapter = drv.adapter_for(proc, luid_to_int(args.adapter_luid.a, args.adapter_luid.b))
    if adapter is None:
        return -errno.EINVAL
    pids = [pa.process.pid for pa in adapter.process_adapters if not pa.process.closed]
    ret = 0
    if len(pids) > args.buffer_count or (args.buffer == 0 and pids):
        ret = _errno_of(NTSTATUS.STATUS_BUFFER_TOO_SMALL)
    elif pids:
        copy_to_user(mem, args.buffer, struct.pack(f"<{len(pids)}I", *pids))
    args.buffer_count = len(pids)
    return ret


# ---- adapter queries (forwarded) -------------------------------------------------------------------

_PATCHED_TYPES = frozenset({wddm.KMTQUERYADAPTERINFOTYPE.KMTQAITYPE_ADAPTERTYPE,
                            wddm.KMTQUERYADAPTERINFOTYPE.KMTQAITYPE_ADAPTERTYPE_RENDER})


def _patch_adapter_type(adapter: GuestAdapter, data: bytes) -> bytes:
    """The guest's view of the adapter type: paravirtualized, no display, and compute-only as
    the vGPU's PCI id says (dxgvmbus.c patches the same bits)."""
    if len(data) < ctypes.sizeof(wddm.D3DKMT_ADAPTERTYPE):
        return data
    t = wddm.D3DKMT_ADAPTERTYPE.from_buffer_copy(data)
    t.Paravirtualized = 1
    t.DisplaySupported = 0
    t.PostDevice = 0
    t.IndirectDisplayDevice = 0
    t.ACGSupported = 0
    t.SupportSetTimingsFromVidPn = 0
    t.ComputeOnly = int(adapter.compute_only)
    return bytes(t) + data[ctypes.sizeof(t):]


async def query_adapter_info(drv: GuestDriver, proc: GuestProcess, args: Any,
                             mem: UserMemory) -> int:
    if args.private_data_size == 0 or args.private_data_size > PRIVATE_DATA_MAX:
        return -errno.EINVAL
    pa = _adapter(proc, args.adapter)
    data = copy_from_user(mem, args.private_data, args.private_data_size, PRIVATE_DATA_MAX)
    hprocess = existing_host_process(proc, pa.adapter.link) or \
        await host_process(proc, pa.adapter.link)
    status, out = await vmbus.query_adapter_info(pa.adapter, hprocess, args.type, data)
    ret = _host_result(status)
    if ret < 0:
        return ret
    if args.type in _PATCHED_TYPES:
        out = _patch_adapter_type(pa.adapter, out)
    copy_to_user(mem, args.private_data, out)
    return ret


async def is_feature_enabled(drv: GuestDriver, proc: GuestProcess, args: Any,
                             mem: UserMemory) -> int:
    pa = _adapter(proc, args.adapter)
    reply = await vmbus.is_feature_enabled(pa.adapter, args.feature_id)
    ret = _host_result(reply.status)
    if ret < 0:
        return ret
    args.result = type(args.result).from_buffer_copy(
        struct.pack("<HH", reply.result_version, reply.result_bits))
    return ret


async def query_clock_calibration(drv: GuestDriver, proc: GuestProcess, args: Any,
                                  mem: UserMemory) -> int:
    pa = _adapter(proc, args.adapter)
    guest_handle = _h(args.adapter)
    hprocess = await host_process(proc, pa.adapter.link)
    args.adapter.v = pa.adapter.host_handle
    try:
        status, clock = await vmbus.query_clock_calibration(pa.adapter, hprocess, bytes(args))
    finally:
        args.adapter.v = guest_handle
    ret = _host_result(status)
    if ret < 0:
        return ret
    args.clock_data = type(args.clock_data).from_buffer_copy(clock)
    return ret


# ---- devices and contexts --------------------------------------------------------------------------


async def create_device_ioctl(drv: GuestDriver, proc: GuestProcess, args: Any,
                              mem: UserMemory) -> int:
    pa = _adapter(proc, args.adapter)
    dev = await create_device(proc, pa, int.from_bytes(bytes(args.flags), "little"))
    args.device.v = dev.handle
    return 0


async def destroy_device_ioctl(drv: GuestDriver, proc: GuestProcess, args: Any,
                               mem: UserMemory) -> int:
    dev = proc.handles.get(_h(args.device), HandleType.DEVICE)
    if dev is None or dev.state != ObjectState.ACTIVE:
        return -errno.EBADF
    status = await destroy_device(proc, dev)
    if not dev.adapter.active:
        return -errno.ENODEV  # the handles are gone; the adapter (and its host object) already was
    return 0 if nt_success(status) else _errno_of(status)


async def create_context_virtual(drv: GuestDriver, proc: GuestProcess, args: Any,
                                 mem: UserMemory) -> int:
    dev = _device(proc, args.device)
    if args.priv_drv_data_size > PRIVATE_DATA_MAX:
        return -errno.EINVAL
    priv = copy_from_user(mem, args.priv_drv_data, args.priv_drv_data_size, PRIVATE_DATA_MAX)
    ctx, priv_out = await create_context(
        proc, dev, args.node_ordinal, args.engine_affinity,
        int.from_bytes(bytes(args.flags), "little"), int(args.client_hint), priv,
    )
    if priv_out:
        try:
            copy_to_user(mem, args.priv_drv_data, priv_out)
        except IoctlError:
            await destroy_context(proc, ctx)  # the caller never learns the handle: no leak
            raise
    args.context.v = ctx.handle
    return 0


async def destroy_context_ioctl(drv: GuestDriver, proc: GuestProcess, args: Any,
                                mem: UserMemory) -> int:
    ctx = _context(proc, args.context)
    status = await destroy_context(proc, ctx)
    return 0 if nt_success(status) else _errno_of(status)


_STATE_EXECUTION = 1  # _D3DKMT_DEVICESTATE_EXECUTION


async def get_device_state(drv: GuestDriver, proc: GuestProcess, args: Any,
                           mem: UserMemory) -> int:
    dev = _device(proc, args.device)
    link = dev.adapter.link
    counter = link.device_state_counter
    if args.state_type == _STATE_EXECUTION and dev.execution_state_counter == counter:
        args.execution_state = dev.execution_state
        return 0
    hprocess = await host_process(proc, link)
    guest_handle = _h(args.device)
    args.device.v = dev.host_handle
    try:
        out, status = await vmbus.get_device_state(dev.adapter, hprocess, bytes(args))
    finally:
        args.device.v = guest_handle
    ret = _host_result(status)
    if ret < 0:
        return ret
    ctypes.memmove(ctypes.addressof(args) + 8, out[8:], len(out) - 8)
    if args.state_type == _STATE_EXECUTION:
        dev.execution_state = int(args.execution_state) or DEVICEEXECUTION_ACTIVE
        dev.execution_state_counter = counter
    return ret


# ---- escapes ---------------------------------------------------------------------------------------


async def escape(drv: GuestDriver, proc: GuestProcess, args: Any, mem: UserMemory) -> int:
    """Forwarded to the host's driver (ESCAPE, the private data echoed back overwritten). The
    driver-known TRANSLATE* escapes are no-ops, as in the real driver. A pydxg escape
    (dxg.uapi.escape) may hand a descriptor over in either direction, and carry more data than
    one packet; over a link that cannot carry descriptors a region comes back as a copy."""
    pa = _adapter(proc, args.adapter)
    adapter = pa.adapter
    device = _device(proc, args.device) if _h(args.device) else None
    if device is not None and device.adapter is not adapter:
        raise IoctlError(errno.EINVAL, "the device is on another adapter")
    context = _context(proc, args.context) if _h(args.context) else None
    if context is not None and context.device is not device:
        raise IoctlError(errno.EINVAL, "the context is not the device's")
    size = int(args.priv_drv_data_size)
    if size > PYDXG_ESCAPE_MAX:
        return -errno.EINVAL
    data = copy_from_user(mem, args.priv_drv_data, size, PYDXG_ESCAPE_MAX)
    pydxg = is_pydxg_escape(data)
    if not pydxg and size > PRIVATE_DATA_MAX:
        return -errno.EINVAL
    if (args.flags.driver_known_escape and args.type == 0 and len(data) >= 4
            and not pydxg):
        known = int.from_bytes(data[:4], "little")
        if known in (_KNOWN_ESCAPE_TRANSLATEALLOCATIONHANDLE,
                     _KNOWN_ESCAPE_TRANSLATERESOURCEHANDLE):
            return 0
        if known == _KNOWN_ESCAPE_BUILDTESTCOMMANDBUFFER:
            return -errno.EINVAL  # its nested user pointers are not supported
    fds_in: list[int] = []
    if pydxg:
        head = EscapeHeader.unpack(data)
        if head.flags & EscapeFlags.FD_IN:
            channel = adapter.route()
            if channel is not None and not channel.can_pass_fds:
                # The op cannot happen on this link (TCP): its status says so; the call itself
                # arrived and succeeds, as every pydxg escape reports its own outcome.
                copy_to_user(mem, args.priv_drv_data, dataclasses.replace(
                    head, status=int(NTSTATUS.STATUS_NOT_SUPPORTED)).pack())
                return 0
            fd_in = take_fd(mem, head.fd)
            if eventfd_count(fd_in) is None:
                # The one op that takes a descriptor signals an eventfd; anything else is
                # refused here, before the host would have to close it (a file on a FUSE
                # mount: closing it may block; it is closed off the loop).
                close_foreign((fd_in,))
                copy_to_user(mem, args.priv_drv_data, dataclasses.replace(
                    head, status=int(NTSTATUS.STATUS_INVALID_PARAMETER)).pack())
                return 0
            fds_in.append(fd_in)
    try:
        hprocess = await host_process(proc, adapter.link)
        msg = m.Escape(adapter.host_handle, device.host_handle if device else 0, int(args.type),
                       int(args.flags.value), context.host_handle if context else 0, data)
        out, got = await vmbus.escape(adapter, hprocess, msg, fds_in)
    finally:
        close_all(fds_in)
    fd = -1
    try:
        if got or out.attachment:
            head = EscapeHeader.unpack(out.priv_drv_data) if pydxg else None
            if head is None or not head.flags & EscapeFlags.FD_OUT or len(got) > 1 or (
                    got and out.attachment):
                raise IoctlError(errno.EPROTO, "host sent a descriptor the escape did not ask for")
            if got:
                fd = got.pop()
            elif head.flags & EscapeFlags.DATA_AS_FD:
                fd = memfd_from_bytes(out.attachment, "pydxg-region")
            else:
                raise IoctlError(errno.EPROTO, "host sent data the escape did not ask for")
        copy_to_user(mem, args.priv_drv_data, out.priv_drv_data)
        if fd >= 0:
            fd, give = -1, fd
            give_fd(mem, give, args.priv_drv_data + FD_OFFSET, 8)
    finally:
        close_all(got)
        if fd >= 0:
            close_all((fd,))
    return 0


# ---- dispatch ------------------------------------------------------------------------------------

HANDLERS: MappingProxyType[str, Handler] = MappingProxyType({
    "LX_DXOPENADAPTERFROMLUID": open_adapter_from_luid,
    "LX_DXCREATEDEVICE": create_device_ioctl,
    "LX_DXCREATECONTEXTVIRTUAL": create_context_virtual,
    "LX_DXDESTROYCONTEXT": destroy_context_ioctl,
    "LX_DXQUERYADAPTERINFO": query_adapter_info,
    "LX_DXESCAPE": escape,
    "LX_DXGETDEVICESTATE": get_device_state,
    "LX_DXENUMADAPTERS2": enum_adapters2,
    "LX_DXCLOSEADAPTER": close_adapter_ioctl,
    "LX_DXDESTROYDEVICE": destroy_device_ioctl,
    "LX_DXQUERYCLOCKCALIBRATION": query_clock_calibration,
    "LX_DXENUMADAPTERS3": enum_adapters3,
    "LX_DXENUMPROCESSES": enum_processes,
    "LX_ISFEATUREENABLED": is_feature_enabled,
    **MEMORY_HANDLERS,
    **QUEUE_HANDLERS,
    **STATS_HANDLERS,
    **SYNC_HANDLERS,
    **SHARE_HANDLERS,
})
# The same table by ioctl number, for dispatch (derived: the names above are the source).
_BY_NR: MappingProxyType[int, Handler] = MappingProxyType(
    {uapi.IOCTLS_BY_NAME[name].nr: handler for name, handler in HANDLERS.items()})
# What dispatch needs, by the whole 32-bit code of each ioctl the ABI handles: its description
# and its handler (None: no handler yet). Any other code is -ENOTTY.
_BY_CODE: MappingProxyType[int, tuple[uapi.IoctlDef, Handler | None]] = MappingProxyType(
    {desc.code: (desc, _BY_NR.get(nr)) for nr, desc in uapi.IOCTLS.items() if desc.handled})


async def dispatch(drv: GuestDriver, proc: GuestProcess, code: int, arg: bytes,
                   mem: UserMemory) -> tuple[int, bytes]:
    """Run one ioctl. Returns (0 / positive NTSTATUS / negative errno, struct bytes out)."""
    entry = _BY_CODE.get(code & 0xFFFFFFFF)
    if entry is None:
        return -errno.ENOTTY, arg
    desc, handler = entry
    if len(arg) != desc.size:
        return -errno.EFAULT, arg
    if handler is None:
        return -errno.ENOSYS, arg
    args = desc.struct.from_buffer_copy(arg)
    try:
        ret = await handler(drv, proc, args, mem)
    except IoctlError as e:
        log.debug("ioctl %s from pid %d: %s", desc.name, proc.pid, e)
        return -e.errno, arg
    except vmbus.HostStatus as e:
        return _errno_of(e.status), arg
    except UserMemoryFault:
        return -errno.EFAULT, arg
    except ProtocolError as e:
        log.warning("ioctl %s: bad host reply: %s", desc.name, e)
        return -errno.EPROTO, arg
    except MemoryError:
        return -errno.ENOMEM, arg
    finally:
        if proc.memory.unmaps:
            _deliver_unmaps(proc, mem)
    return ret, bytes(args)


def _deliver_unmaps(proc: GuestProcess, mem: UserMemory) -> None:
    """Blocks the process lost since its last call: its client unmaps them with this reply."""
    unmaps = proc.memory.unmaps
    done = 0
    for block in unmaps:
        if not mem.unmap_block(block):
            break
        done += 1
    del unmaps[:done]


def implemented(name: str) -> bool:
    """Whether the driver has a handler for the ioctl named ``name`` (an LX_* macro name)."""
    return name in HANDLERS
