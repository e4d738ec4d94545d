"""ESCAPE: driver-private requests from a user-mode driver, and pydxg's own diagnostic escapes.

A private data blob that starts with the pydxg escape header (dxg.uapi.escape) is served here:
PING, SLEEP (a long command: it runs on a worker thread, in order with the other escapes of its
device, and ends early when its process goes), shared-memory regions (a memfd handed to the caller
as a descriptor on a local link, as a copy over TCP) and EVENTFD_SIGNAL (a descriptor the caller
handed in). Any other escape goes to the backend, on a worker thread. The reply echoes the command
with the private data overwritten; a pydxg op reports its own status in the header.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import struct
import threading
from collections.abc import Awaitable
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

from dxg.host.call import Call, CommandFailed, Handler
from dxg.oslib.fds import close_all
from dxg.oslib.memfd import SharedMemory
from dxg.protocol import messages as m
from dxg.protocol.commands import VgpuCommand
from dxg.uapi.escape import (
    ESCAPE_HEADER,
    MAX_EVENTFD_VALUE,
    MAX_SLEEP_MS,
    OP_FIELDS,
    EscapeFlags,
    EscapeHeader,
    Op,
    is_pydxg_escape,
)
from dxg.uapi.handles import HandleType
from dxg.uapi.ntstatus import NTSTATUS

if TYPE_CHECKING:
    from dxg.host.device import HostDevice
    from dxg.host.partition import Partition
    from dxg.host.process import HostProcess

log = logging.getLogger(__name__)

OK = NTSTATUS.STATUS_SUCCESS
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_RANGE = struct.Struct("<QQ")  # region, offset
_PATTERN = bytes(range(251))
# What a failed eventfd write answers: no room in its counter, or too many writes in flight.
_EVENTFD_STATUS = MappingProxyType({errno.EAGAIN: NTSTATUS.STATUS_DEVICE_BUSY,
                                    errno.EBUSY: NTSTATUS.STATUS_DEVICE_BUSY})


@dataclass(eq=False, slots=True)
class Region:
    """A shared-memory region of one process (pydxg SHMEM escapes)."""

    id: int
    mem: SharedMemory

    @property
    def size(self) -> int:
        return self.mem.size


def drop_region(p: Partition, process: HostProcess, region: Region) -> None:
    if process.regions.pop(region.id, None) is not None:
        region.mem.close()
        p.uncharge(region.size, process)


class _OpFailed(Exception):
    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = int(status)


def _region_of(process: HostProcess, data: bytes, length: int,
               need_range: bool = True) -> tuple[Region, int]:
    if len(data) < OP_FIELDS + _RANGE.size:
        raise _OpFailed(NTSTATUS.STATUS_INVALID_PARAMETER, "region fields missing")
    rid, offset = _RANGE.unpack_from(data, OP_FIELDS)
    region = process.regions.get(rid)
    if region is None:
        raise _OpFailed(NTSTATUS.STATUS_INVALID_HANDLE, f"no region {rid}")
    if need_range and (offset > region.size or length > region.size - offset):
        raise _OpFailed(NTSTATUS.STATUS_INVALID_PARAMETER, "range outside the region")
    return region, offset


def _still_there(p: Partition, process: HostProcess, device: HostDevice | None) -> None:
    """An escape is checked when it arrives but may run later, after its device's earlier
    escapes: by then its process or device may have gone, and it must not act for them."""
    if not process.alive or (device is not None
                             and p.handles.get(device.handle, HandleType.DEVICE) is not device):
        raise CommandFailed(NTSTATUS.STATUS_INVALID_HANDLE, "its process or device has gone")


async def _pydxg(p: Partition, call: Call, process: HostProcess, device: HostDevice | None,
                 body: m.Escape) -> m.Escape:
    data = bytearray(body.priv_drv_data)
    head = EscapeHeader.unpack(bytes(data))
    flags = EscapeFlags(head.flags & ~(EscapeFlags.FD_OUT | EscapeFlags.DATA_AS_FD))
    attachment = b""
    fds = call.take_fds()
    try:
        if bool(fds) != bool(flags & EscapeFlags.FD_IN) or len(fds) > 1:
            raise _OpFailed(NTSTATUS.STATUS_INVALID_PARAMETER, "descriptor and FD_IN disagree")
        op = head.op
        if op == Op.PING:
            pass
        elif op == Op.SLEEP:
            if len(data) < OP_FIELDS + 4:
                raise _OpFailed(NTSTATUS.STATUS_INVALID_PARAMETER, "SLEEP needs milliseconds")
            ms = min(_U32.unpack_from(data, OP_FIELDS)[0], MAX_SLEEP_MS)
            cut = await p.run_blocking(process, lambda cancelled: cancelled.wait(ms / 1000),
                                       device=device, engine_time=False)
            if cut:
                raise _OpFailed(NTSTATUS.STATUS_CANCELLED, "the caller went away")
        elif op == Op.SHMEM_CREATE:
            if len(data) < OP_FIELDS + 8:
                raise _OpFailed(NTSTATUS.STATUS_INVALID_PARAMETER, "SHMEM_CREATE needs room")
            size = head.length
            if not 0 < size <= p.config.max_region_bytes:
                raise _OpFailed(NTSTATUS.STATUS_INVALID_PARAMETER, f"region of {size} bytes")
            if not call.can_pass_fds and size > p.max_message - 4096:
                raise _OpFailed(NTSTATUS.STATUS_INVALID_PARAMETER,
                                "region too large to copy over this link")
            try:
                p.charge(size, process)
            except CommandFailed as e:
                raise _OpFailed(e.status, str(e)) from None
            try:
                mem = SharedMemory(size, "pydxg-region")
            except OSError as e:
                p.uncharge(size, process)
                raise _OpFailed(NTSTATUS.STATUS_NO_MEMORY, str(e)) from None
            mem.write(0, (_PATTERN * (size // len(_PATTERN) + 1))[:size])
            process.region_ids += 1
            region = Region(process.region_ids, mem)
            process.regions[region.id] = region
            _U64.pack_into(data, OP_FIELDS, region.id)
            flags |= EscapeFlags.FD_OUT
            if call.can_pass_fds:
                call.reply_fds.append(os.dup(mem.fd))
            else:
                flags |= EscapeFlags.DATA_AS_FD
                attachment = mem.read(0, size)
        elif op == Op.SHMEM_READ:
            region, offset = _region_of(process, bytes(data), head.length)
            if len(data) != OP_FIELDS + _RANGE.size + head.length:
                raise _OpFailed(NTSTATUS.STATUS_INVALID_PARAMETER, "buffer size != length")
            data[OP_FIELDS + _RANGE.size :] = region.mem.read(offset, head.length)
        elif op == Op.SHMEM_WRITE:
            region, offset = _region_of(process, bytes(data), head.length)
            if len(data) != OP_FIELDS + _RANGE.size + head.length:
                raise _OpFailed(NTSTATUS.STATUS_INVALID_PARAMETER, "buffer size != length")
            region.mem.write(offset, data[OP_FIELDS + _RANGE.size :])
        elif op == Op.SHMEM_FREE:
            region, _ = _region_of(process, bytes(data), 0, need_range=False)
            drop_region(p, process, region)
        elif op == Op.EVENTFD_SIGNAL:
            if not fds or len(data) < OP_FIELDS + 8:
                raise _OpFailed(NTSTATUS.STATUS_INVALID_PARAMETER, "EVENTFD_SIGNAL needs an fd")
            value = _U64.unpack_from(data, OP_FIELDS)[0]
            if not 0 < value <= MAX_EVENTFD_VALUE:
                raise _OpFailed(NTSTATUS.STATUS_INVALID_PARAMETER,
                                f"EVENTFD_SIGNAL adds 1..{MAX_EVENTFD_VALUE}")
            # The descriptor is the caller's: the write runs on a thread of its own, which
            # owns the descriptor from here (dxg.oslib.eventfd).
            result = await p.eventfd_writers.add(fds.pop(), value, process)
            if result:
                raise _OpFailed(_EVENTFD_STATUS.get(-result, NTSTATUS.STATUS_INVALID_PARAMETER),
                                f"EVENTFD_SIGNAL failed: {os.strerror(-result)}")
        else:
            raise _OpFailed(NTSTATUS.STATUS_INVALID_PARAMETER, f"unknown pydxg escape op {op}")
        status = OK
    except _OpFailed as e:
        log.debug("partition %d: pydxg escape %d failed: %s", p.id, head.op, e)
        status = e.status
        if head.op == Op.SHMEM_CREATE:
            close_all(call.reply_fds)
            call.reply_fds = []
            attachment = b""
            flags &= ~(EscapeFlags.FD_OUT | EscapeFlags.DATA_AS_FD)
    finally:
        close_all(fds)
    data[: ESCAPE_HEADER.size] = dataclasses.replace(head, status=status, flags=int(flags)).pack()
    return dataclasses.replace(body, priv_drv_data=bytes(data), attachment=attachment)


async def _backend(p: Partition, call: Call, process: HostProcess, device: HostDevice | None,
                   body: m.Escape) -> m.Escape:
    close_all(call.take_fds())
    assert call.adapter is not None
    index = call.adapter.index
    backend = p.config.backend
    data = body.priv_drv_data

    def job(cancelled: threading.Event) -> tuple[int, bytes]:
        return backend.escape(index, data, cancelled)

    status, out = await p.run_blocking(process, job, device=device)
    if status != OK:
        raise CommandFailed(status, "backend escape failed")
    if len(out) != len(data):
        log.error("partition %d: backend escape changed the private data size", p.id)
        raise CommandFailed(NTSTATUS.STATUS_INTERNAL_ERROR, "backend broke the escape")
    return dataclasses.replace(body, priv_drv_data=bytes(out), attachment=b"")


def escape(p: Partition, call: Call, body: m.Escape):  # type: ignore[no-untyped-def]
    """Check the handles now (inline), then run the escape as a task of its own; the escapes
    of one device run one after another (all of them: a quick one queues behind a long one)."""
    from dxg.host.adapter import open_of
    from dxg.host.device import device_of

    adapter = call.adapter
    assert adapter is not None
    process = p.process(call)
    if body.adapter != open_of(p, adapter).handle:
        raise CommandFailed(NTSTATUS.STATUS_INVALID_HANDLE, "not this adapter's host handle")
    lane: object | None = None
    device: HostDevice | None = None
    if body.device:
        device = device_of(p, process, body.device, adapter)
        lane = ("device", device.handle)
        if body.context:
            context = p.handles.get(body.context, HandleType.CONTEXT)
            if context is None or context.device is not device:
                raise CommandFailed(NTSTATUS.STATUS_INVALID_HANDLE, "not this device's context")
    elif body.context:
        raise CommandFailed(NTSTATUS.STATUS_INVALID_PARAMETER, "a context needs its device")
    if body.attachment:
        raise CommandFailed(NTSTATUS.STATUS_INVALID_PARAMETER, "requests carry no attachment")
    serve = _pydxg if is_pydxg_escape(body.priv_drv_data) else _backend

    def run() -> Awaitable[m.Escape]:
        _still_there(p, process, device)  # its turn may come after its process went
        return serve(p, call, process, device, body)
    if lane is None:
        return run()
    return p.lanes.run(lane, run)


HANDLERS: MappingProxyType[VgpuCommand, Handler] = MappingProxyType({
    VgpuCommand.ESCAPE: escape,
})

__all__ = ["HANDLERS", "Region", "drop_region"]
