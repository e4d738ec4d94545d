"""The ioctl handlers and the dispatch table indexed by ioctl number (the real driver's ioctl.c).

A handle that is stale, foreign, of the wrong type or not a handle at all is answered -EBADF,
which is what the real driver's ntstatus2int gives for STATUS_INVALID_HANDLE (the real guest
answers most of these -EINVAL; callers then cannot tell a bad handle from a bad argument).

`dispatch()` checks the whole 32-bit code (type, number, direction and size bits) exactly as the
kernel does (-ENOTTY otherwise), parses the struct, runs the handler and returns
(return value, struct bytes out). Handlers see only the process, the struct and the UserMemory
accessor: they never know which front end called.
"""

import ctypes
import errno
import logging
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dxg import uapi
from dxg.guest import vmbus
from dxg.guest.context import GuestContext, create_context, destroy_context
from dxg.guest.device import (
    DEVICEEXECUTION_ACTIVE,
    GuestDevice,
    ObjectState,
    create_device,
    destroy_device,
)
from dxg.guest.errors import IoctlError
from dxg.guest.handles import HandleType
from dxg.guest.process import (
    GuestProcess,
    ProcessAdapter,
    close_adapter,
    host_process,
    open_adapter,
)
from dxg.guest.usermem import UserMemory, UserMemoryFault, copy_from_user, copy_to_user
from dxg.protocol.errors import ProtocolError
from dxg.protocol.framing import DXG_MAX_VM_BUS_PACKET_SIZE
from dxg.protocol.guids import luid_parts, luid_to_int
from dxg.uapi import wddm
from dxg.uapi.ntstatus import NTSTATUS, nt_success, ntstatus_to_errno

if TYPE_CHECKING:
    from dxg.guest.adapter import GuestAdapter
    from dxg.guest.driver import GuestDriver

log = logging.getLogger(__name__)

Handler = Callable[["GuestDriver", GuestProcess, Any, UserMemory], int]

# EnumAdapters3 accepts at most this many entries (the real driver's bound).
ENUMADAPTERS3_MAX = 0xFFFF
# Private data must fit in one bus packet with its headers.
PRIVATE_DATA_MAX = DXG_MAX_VM_BUS_PACKET_SIZE - 128


def _errno_of(status: int) -> int:
    return ntstatus_to_errno(status)


def _h(handle: Any) -> int:
    return int(handle.v)


def _adapter(proc: GuestProcess, handle: Any) -> ProcessAdapter:
    pa = proc.handles.get(_h(handle), HandleType.ADAPTER)
    if pa is None:
        raise IoctlError(errno.EBADF, "invalid adapter handle")
    if not pa.adapter.active:
        raise IoctlError(errno.ENODEV, "adapter was removed")
    return pa


def _device(proc: GuestProcess, handle: Any) -> GuestDevice:
    dev = proc.handles.get(_h(handle), HandleType.DEVICE)
    if dev is None or dev.state != ObjectState.ACTIVE:
        raise IoctlError(errno.EBADF, "invalid device handle")
    if not dev.adapter.active:
        raise IoctlError(errno.ENODEV, "adapter was removed")
    return dev


def _context(proc: GuestProcess, handle: Any) -> GuestContext:
    ctx = proc.handles.get(_h(handle), HandleType.CONTEXT)
    if ctx is None:
        raise IoctlError(errno.EBADF, "invalid context handle")
    return ctx


# ---- enumeration and open (local) ----------------------------------------------------------------


def _fill_adapter_infos(proc: GuestProcess, adapters: "list[GuestAdapter]", mem: UserMemory,
                        addr: int) -> None:
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
            try:
                close_adapter(proc, h)
            except IoctlError as e:
                log.warning("pid %d: undoing an adapter open failed: %s", proc.pid, e)
        raise


def enum_adapters2(drv: "GuestDriver", proc: GuestProcess, args: Any, mem: UserMemory) -> int:
    """Lists the adapters that are not compute-only, opening each one."""
    adapters = [a for a in drv.active_adapters() if not a.compute_only]
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


def enum_adapters3(drv: "GuestDriver", proc: GuestProcess, args: Any, mem: UserMemory) -> int:
    """Like EnumAdapters2 with a filter. A too-small array gets -EOVERFLOW and the needed count,
    and opens nothing (the real driver overflows its buffer and leaks handles here)."""
    adapters = drv.active_adapters()
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


def open_adapter_from_luid(drv: "GuestDriver", proc: GuestProcess, args: Any,
                           mem: UserMemory) -> int:
    luid = luid_to_int(args.adapter_luid.a, args.adapter_luid.b)
    for ad in drv.active_adapters():
        if ad.luid == luid:
            args.adapter_handle.v = open_adapter(proc, ad)
            return 0
    return -errno.EINVAL


def close_adapter_ioctl(drv: "GuestDriver", proc: GuestProcess, args: Any,
                        mem: UserMemory) -> int:
    close_adapter(proc, _h(args.adapter_handle))
    return 0


def enum_processes(drv: "GuestDriver", proc: GuestProcess, args: Any, mem: UserMemory) -> int:
    luid = luid_to_int(args.adapter_luid.a, args.adapter_luid.b)
    adapter = next((a for a in drv.all_adapters() if a.luid == luid and a.active), None)
    if adapter is None:
        return -errno.EINVAL
    with adapter.lock:
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


def _patch_adapter_type(adapter: "GuestAdapter", data: bytes) -> bytes:
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


def query_adapter_info(drv: "GuestDriver", proc: GuestProcess, args: Any, mem: UserMemory) -> int:
    if args.private_data_size == 0 or args.private_data_size > PRIVATE_DATA_MAX:
        return -errno.EINVAL
    pa = _adapter(proc, args.adapter)
    data = copy_from_user(mem, args.private_data, args.private_data_size, PRIVATE_DATA_MAX)
    hprocess = host_process(proc, pa.adapter.link)
    status, out = vmbus.query_adapter_info(pa.adapter, hprocess, args.type, data)
    if not nt_success(status):
        return _errno_of(status)
    if args.type in _PATCHED_TYPES:
        out = _patch_adapter_type(pa.adapter, out)
    copy_to_user(mem, args.private_data, out)
    return status


def is_feature_enabled(drv: "GuestDriver", proc: GuestProcess, args: Any, mem: UserMemory) -> int:
    pa = _adapter(proc, args.adapter)
    reply = vmbus.is_feature_enabled(pa.adapter, args.feature_id)
    if not nt_success(reply.status):
        return _errno_of(reply.status)
    args.result = type(args.result).from_buffer_copy(
        struct.pack("<HH", reply.result_version, reply.result_bits))
    return 0


def query_clock_calibration(drv: "GuestDriver", proc: GuestProcess, args: Any,
                            mem: UserMemory) -> int:
    pa = _adapter(proc, args.adapter)
    guest_handle = _h(args.adapter)
    args.adapter.v = pa.adapter.host_handle
    try:
        status, clock = vmbus.query_clock_calibration(
            pa.adapter, host_process(proc, pa.adapter.link), bytes(args))
    finally:
        args.adapter.v = guest_handle
    if not nt_success(status):
        return _errno_of(status)
    args.clock_data = type(args.clock_data).from_buffer_copy(clock)
    return status


# ---- devices and contexts --------------------------------------------------------------------------


def create_device_ioctl(drv: "GuestDriver", proc: GuestProcess, args: Any,
                        mem: UserMemory) -> int:
    pa = _adapter(proc, args.adapter)
    dev = create_device(proc, pa, int.from_bytes(bytes(args.flags), "little"))
    args.device.v = dev.handle
    return 0


def destroy_device_ioctl(drv: "GuestDriver", proc: GuestProcess, args: Any,
                         mem: UserMemory) -> int:
    dev = proc.handles.get(_h(args.device), HandleType.DEVICE)
    if dev is None or dev.state != ObjectState.ACTIVE:
        return -errno.EBADF
    status = destroy_device(proc, dev)
    if not dev.adapter.active:
        return -errno.ENODEV  # the handles are gone; the adapter (and its host object) already was
    return 0 if nt_success(status) else _errno_of(status)


def create_context_virtual(drv: "GuestDriver", proc: GuestProcess, args: Any,
                           mem: UserMemory) -> int:
    dev = _device(proc, args.device)
    if args.priv_drv_data_size > PRIVATE_DATA_MAX:
        return -errno.EINVAL
    priv = copy_from_user(mem, args.priv_drv_data, args.priv_drv_data_size, PRIVATE_DATA_MAX)
    ctx, priv_out = create_context(
        proc, dev, args.node_ordinal, args.engine_affinity,
        int.from_bytes(bytes(args.flags), "little"), int(args.client_hint), priv,
    )
    if priv_out:
        try:
            copy_to_user(mem, args.priv_drv_data, priv_out)
        except IoctlError:
            destroy_context(proc, ctx)  # the caller never learns the handle: do not leak it
            raise
    args.context.v = ctx.handle
    return 0


def destroy_context_ioctl(drv: "GuestDriver", proc: GuestProcess, args: Any,
                          mem: UserMemory) -> int:
    ctx = _context(proc, args.context)
    status = destroy_context(proc, ctx)
    return 0 if nt_success(status) else _errno_of(status)


_STATE_EXECUTION = 1  # _D3DKMT_DEVICESTATE_EXECUTION


def get_device_state(drv: "GuestDriver", proc: GuestProcess, args: Any, mem: UserMemory) -> int:
    dev = _device(proc, args.device)
    link = dev.adapter.link
    if args.state_type == _STATE_EXECUTION:
        with link.lock:
            counter = link.device_state_counter
        if dev.execution_state_counter == counter:
            args.execution_state = dev.execution_state
            return 0
    guest_handle = _h(args.device)
    args.device.v = dev.host_handle
    try:
        out, status = vmbus.get_device_state(dev.adapter, host_process(proc, link), bytes(args))
    finally:
        args.device.v = guest_handle
    if not nt_success(status):
        return _errno_of(status)
    ctypes.memmove(ctypes.addressof(args) + 8, out[8:], len(out) - 8)
    if args.state_type == _STATE_EXECUTION:
        dev.execution_state = int(args.execution_state) or DEVICEEXECUTION_ACTIVE
        dev.execution_state_counter = counter
    return 0


# ---- dispatch ------------------------------------------------------------------------------------

HANDLERS: dict[int, Handler] = {
    0x01: open_adapter_from_luid,
    0x02: create_device_ioctl,
    0x04: create_context_virtual,
    0x05: destroy_context_ioctl,
    0x09: query_adapter_info,
    0x0E: get_device_state,
    0x14: enum_adapters2,
    0x15: close_adapter_ioctl,
    0x19: destroy_device_ioctl,
    0x3D: query_clock_calibration,
    0x3E: enum_adapters3,
    0x48: enum_processes,
    0x49: is_feature_enabled,
}


def dispatch(drv: "GuestDriver", proc: GuestProcess, code: int, arg: bytes,
             mem: UserMemory) -> tuple[int, bytes]:
    """Run one ioctl. Returns (0 / positive NTSTATUS / negative errno, struct bytes out)."""
    nr = code & 0xFF
    desc = uapi.IOCTLS.get(nr)
    if desc is None or desc.code != (code & 0xFFFFFFFF) or not desc.handled:
        return -errno.ENOTTY, arg
    if len(arg) != desc.size:
        return -errno.EFAULT, arg
    handler = HANDLERS.get(nr)
    if handler is None:
        return -errno.ENOSYS, arg
    args = desc.struct.from_buffer_copy(arg)
    try:
        ret = handler(drv, proc, args, mem)
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
    return ret, bytes(args)


def ioctl_table() -> list[dict[str, Any]]:
    """Every ioctl of the ABI with what pydxg does with it (for `dxg ioctls` and the docs)."""
    rows = []
    for nr in sorted(uapi.IOCTLS):
        d = uapi.IOCTLS[nr]
        if not d.handled:
            status = "no handler in the real driver: -ENOTTY"
        elif nr in HANDLERS:
            status = "implemented"
        else:
            status = "not implemented yet: -ENOSYS"
        rows.append({"nr": nr, "code": f"0x{d.code:08x}", "name": d.name,
                     "struct": d.struct.__name__, "size": d.size, "status": status})
    return rows
