"""Lookups and result rules every ioctl handler shares: a handle of the calling process as the
object it names (with the errno the kernel would give), and a host's NTSTATUS as an ioctl's
return value."""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING, Any

from dxg.guest.device import GuestDevice, ObjectState
from dxg.guest.errors import IoctlError
from dxg.guest.handles import HandleType
from dxg.protocol.framing import DXG_MAX_VM_BUS_PACKET_SIZE
from dxg.uapi.ntstatus import NTSTATUS, nt_success, ntstatus_to_errno

if TYPE_CHECKING:
    from dxg.guest.context import GuestContext
    from dxg.guest.process import GuestProcess, ProcessAdapter

log = logging.getLogger("dxg.guest.ioctl")

# Private data must fit in one bus packet with its headers.
PRIVATE_DATA_MAX = DXG_MAX_VM_BUS_PACKET_SIZE - 128
# The success codes a host may hand back as a call's return value; any other success code from
# a host is not one the driver knows, and fails the call (-EPROTO) instead of reaching a client.
_PASSED_SUCCESS = frozenset({int(NTSTATUS.STATUS_SUCCESS), int(NTSTATUS.STATUS_PENDING),
                             int(NTSTATUS.STATUS_TIMEOUT)})


def _errno_of(status: int) -> int:
    return ntstatus_to_errno(status)


def _host_result(status: int) -> int:
    """A host's NTSTATUS as the ioctl's return: failures become -errno; success codes pass only
    if the driver knows them."""
    status &= 0xFFFFFFFF
    if not nt_success(status):
        return _errno_of(status)
    if status not in _PASSED_SUCCESS:
        log.warning("host answered the unknown success status 0x%08x; failing the call", status)
        return -errno.EPROTO
    return status


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


__all__ = ["PRIVATE_DATA_MAX", "_adapter", "_context", "_device", "_errno_of", "_h",
           "_host_result"]
