"""QueryStatistics and InvalidateCache (the real driver's dxgkio_query_statistics and
dxgkio_invalidate_cache).

QueryStatistics names an adapter by its *guest* LUID and a process by its PID (0: none). The
guest finds the adapter, replaces the LUID with the host's, maps the PID to the host process of
that process (one the driver serves, that has the adapter open, that the caller may see), sends
QUERYSTATISTICS and copies back only the result: the caller's type, LUID and PID stay as they
were. The real driver matches the PID without a namespace check; pydxg only matches a process in
the caller's PID namespace and, unless the caller is root, of the caller's user. The result's
layout is pydxg's (dxg.uapi.statistics, docs/statistics.md): the guest does not read it.

InvalidateCache is checked (the allocation is the device's, the range lies within it) and
forwarded; the soft adapters' memory is coherent, so the host has nothing more to do.
"""

from __future__ import annotations

import errno
import os
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from dxg.guest.errors import IoctlError
from dxg.guest.ioctl_memory import _allocation, _no_extra, _send_args
from dxg.guest.lookup import _device, _h, _host_result
from dxg.guest.process import GuestProcess, host_process
from dxg.guest.usermem import UserMemory
from dxg.protocol.commands import VgpuCommand
from dxg.protocol.guids import luid_parts, luid_to_int
from dxg.uapi import structs as s

if TYPE_CHECKING:
    from dxg.guest.adapter import GuestAdapter
    from dxg.guest.driver import GuestDriver

V = VgpuCommand


def _pid_namespace(pid: int) -> str | None:
    """The PID namespace of process ``pid`` (as /proc names it), None when it cannot be told."""
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _visible(caller: GuestProcess, target: GuestProcess) -> bool:
    """Whether ``caller`` may ask about ``target``: a process of the same PID namespace, and of
    the same user unless the caller is root."""
    if target is caller:
        return True
    if caller.uid != 0 and caller.uid != target.uid:
        return False
    mine = _pid_namespace(caller.pid)
    return mine is not None and mine == _pid_namespace(target.pid)


def process_of_pid(caller: GuestProcess, adapter: GuestAdapter, pid: int) -> GuestProcess:
    """The live process with ``pid`` that has ``adapter`` open and that ``caller`` may see (the
    caller itself first, then the oldest such); -EINVAL when there is none."""
    found = [pa.process for pa in adapter.process_adapters
             if pa.process.pid == pid and not pa.process.closed]
    if any(target is caller for target in found):
        return caller
    for target in found:
        if _visible(caller, target):
            return target
    raise IoctlError(errno.EINVAL, f"no process {pid} of the caller's uses the adapter")


async def query_statistics(drv: GuestDriver, proc: GuestProcess, args: Any,
                           mem: UserMemory) -> int:
    adapter = drv.adapter_for(proc, luid_to_int(args.adapter_luid.a, args.adapter_luid.b))
    if adapter is None:
        return -errno.EINVAL
    pid = int(args.process)
    hargs = s.d3dkmt_querystatistics.from_buffer_copy(bytes(args))
    hargs.adapter_luid.a, hargs.adapter_luid.b = luid_parts(adapter.host_adapter_luid)
    hargs.process = 0
    hargs.result = type(hargs.result)()  # an output only: nothing of the caller's travels
    if pid:
        if pid > 0xFFFFFFFF:
            return -errno.EINVAL
        target = process_of_pid(proc, adapter, pid)
        hargs.process = await host_process(target, adapter.link)
    status, out, extra = await _send_args(proc, adapter, V.QUERYSTATISTICS, hargs)
    _no_extra(extra, "QUERYSTATISTICS")
    ret = _host_result(status)
    if ret >= 0:
        args.result = out.result
    return ret


async def invalidate_cache(drv: GuestDriver, proc: GuestProcess, args: Any,
                           mem: UserMemory) -> int:
    dev = _device(proc, args.device)
    alloc = _allocation(proc, _h(args.allocation), dev)
    offset, length = int(args.offset), int(args.length)
    if offset > alloc.size or length > alloc.size - offset:
        return -errno.EINVAL
    hargs = s.d3dkmt_invalidatecache.from_buffer_copy(bytes(args))
    hargs.device.v = dev.host_handle
    hargs.allocation.v = alloc.host_handle
    status, _, extra = await _send_args(proc, dev.adapter, V.INVALIDATECACHE, hargs)
    _no_extra(extra, "INVALIDATECACHE")
    return _host_result(status)


HANDLERS: MappingProxyType[str, Any] = MappingProxyType({
    "LX_DXQUERYSTATISTICS": query_statistics,
    "LX_DXINVALIDATECACHE": invalidate_cache,
})

__all__ = ["HANDLERS", "process_of_pid"]
