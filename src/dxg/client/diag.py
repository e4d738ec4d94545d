"""pydxg's diagnostic escapes (:mod:`dxg.uapi.escape`) from the client: real calls through
every layer (client, node, guest, host) that tools and tests use.

Each function takes an adapter or device of either flavor (:mod:`dxg.client.api`) and, like
the objects' own methods, returns the result on a sync object and a coroutine on an async one::

    diag.ping(adapter)                      # await diag.ping(async_adapter)
    region, fd = diag.shmem_create(adapter, 4096)
    diag.eventfd_signal(adapter, efd, 3)    # the host adds 3 to our eventfd

The escape goes out as ``LX_DXESCAPE`` (driver-private type 0) with the pydxg header; the ioctl
succeeds when the escape arrived, and the op's own outcome is the status in the returned
header (a failure raises :class:`~dxg.client.errors.DxgError` with it). A descriptor the host
hands back (SHMEM_CREATE) is the caller's to close.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Sequence
from typing import Any, Protocol

from dxg.client.drive import Op
from dxg.client.errors import DxgError
from dxg.oslib.fds import close_all
from dxg.uapi import ioctls as io
from dxg.uapi import structs as s
from dxg.uapi.escape import ESCAPE_HEADER, EscapeFlags, EscapeHeader
from dxg.uapi.escape import Op as EscapeOp
from dxg.uapi.ntstatus import NTSTATUS, ioctl_result_to_ntstatus, nt_success

__all__ = [
    "EscapeTarget",
    "escape_op",
    "eventfd_signal",
    "ping",
    "shmem_create",
    "shmem_free",
    "shmem_read",
    "shmem_write",
    "sleep",
]

_ESCAPE_DRIVERPRIVATE = int(s.d3dkmt_escapetype._D3DKMT_ESCAPE_DRIVERPRIVATE)
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_RANGE = struct.Struct("<QQ")  # region, offset
_DATA_AT = ESCAPE_HEADER.size + _RANGE.size  # SHMEM_READ/WRITE bytes start here
_CHUNK = 1 << 20  # bytes per SHMEM_READ/WRITE call (one wire message carries at most 4 MiB)


class EscapeTarget(Protocol):
    """An adapter or a device of :mod:`dxg.client.api` (either flavor)."""

    def _escape_handles(self) -> tuple[int, int]: ...

    def _run(self, operation: Op[Any]) -> Any: ...


def escape_op(adapter: int, device: int, data: bytes, fds: Sequence[int] = (), flags: int = 0,
              context: int = 0, escape_type: int = _ESCAPE_DRIVERPRIVATE) -> Op[bytes]:
    """D3DKMTEscape with private data ``data``: the private data as the driver left it.
    ``fds``: descriptors of ours the driver may take (their numbers are in ``data``)."""
    buf = ctypes.create_string_buffer(bytes(data), len(data))
    args = s.d3dkmt_escape()
    args.adapter.v = adapter
    args.device.v = device
    args.type = escape_type
    args.flags.value = flags
    args.priv_drv_data = ctypes.addressof(buf) if data else 0
    args.priv_drv_data_size = len(data)
    args.context.v = context
    fds = tuple(fds)
    ret = yield lambda conn: conn.ioctl(io.LX_DXESCAPE, args, fds)
    out = buf.raw
    status = ioctl_result_to_ntstatus(ret)
    if not nt_success(status):
        _close_received(out)
        raise DxgError(status, "Escape")
    return out


def _close_received(out: bytes) -> None:
    """A failed pydxg escape may still have handed a descriptor over: nobody else closes it."""
    try:
        head = EscapeHeader.unpack(out)
    except ValueError:
        return
    if head.flags & EscapeFlags.FD_OUT and head.fd >= 0:
        close_all((head.fd,))


def _pydxg(target: EscapeTarget, op: EscapeOp, fields: bytes = b"", length: int = 0,
           fd: int = -1) -> Op[tuple[EscapeHeader, bytes]]:
    """One pydxg escape: (the header and the private data after it). Raises DxgError with the
    op's status when the host says it failed."""
    adapter, device = target._escape_handles()
    flags = EscapeFlags.FD_IN if fd >= 0 else EscapeFlags.NONE
    head = EscapeHeader(op, flags=int(flags), fd=fd, length=length)
    out = yield from escape_op(adapter, device, head.pack() + fields,
                               fds=(fd,) if fd >= 0 else ())
    got = EscapeHeader.unpack(out)
    if not nt_success(got.status):
        _close_received(out)
        raise DxgError(got.status, f"pydxg escape {op.name}")
    return got, out


def _ping(target: EscapeTarget) -> Op[None]:
    yield from _pydxg(target, EscapeOp.PING)


def _sleep(target: EscapeTarget, ms: int) -> Op[None]:
    yield from _pydxg(target, EscapeOp.SLEEP, _U32.pack(ms))


def _shmem_create(target: EscapeTarget, size: int) -> Op[tuple[int, int]]:
    head, out = yield from _pydxg(target, EscapeOp.SHMEM_CREATE, bytes(_U64.size), length=size)
    if not head.flags & EscapeFlags.FD_OUT or head.fd < 0:
        raise DxgError(NTSTATUS.STATUS_UNSUCCESSFUL, "SHMEM_CREATE returned no descriptor")
    return _U64.unpack_from(out, ESCAPE_HEADER.size)[0], head.fd


def _shmem_read(target: EscapeTarget, region: int, offset: int, length: int) -> Op[bytes]:
    parts = []
    for at in range(offset, offset + length, _CHUNK):
        n = min(_CHUNK, offset + length - at)
        _, out = yield from _pydxg(target, EscapeOp.SHMEM_READ, _RANGE.pack(region, at) +
                                   bytes(n), length=n)
        parts.append(out[_DATA_AT : _DATA_AT + n])
    return b"".join(parts)


def _shmem_write(target: EscapeTarget, region: int, offset: int, data: bytes) -> Op[None]:
    view = memoryview(bytes(data))
    for i in range(0, len(view), _CHUNK):
        piece = view[i : i + _CHUNK]
        yield from _pydxg(target, EscapeOp.SHMEM_WRITE, _RANGE.pack(region, offset + i) +
                          piece.tobytes(), length=len(piece))


def _shmem_free(target: EscapeTarget, region: int) -> Op[None]:
    yield from _pydxg(target, EscapeOp.SHMEM_FREE, _RANGE.pack(region, 0))


def _eventfd_signal(target: EscapeTarget, fd: int, value: int) -> Op[None]:
    os.fstat(fd)  # OSError(EBADF) here rather than from the node
    yield from _pydxg(target, EscapeOp.EVENTFD_SIGNAL, _U64.pack(value), fd=fd)


def ping(target: EscapeTarget) -> Any:
    """The smallest call that reaches the host and back."""
    return target._run(_ping(target))


def sleep(target: EscapeTarget, ms: int) -> Any:
    """Have the host hold the call for ``ms`` milliseconds (a long command; on a device it runs
    in order with that device's other escapes)."""
    if not 0 <= ms <= 0xFFFFFFFF:
        raise ValueError(f"bad sleep time {ms} ms")
    return target._run(_sleep(target, ms))


def shmem_create(target: EscapeTarget, size: int) -> Any:
    """A shared memory region of ``size`` bytes holding 0, 1, 2... (mod 251): (its id, a
    descriptor of it that the caller owns and may mmap)."""
    return target._run(_shmem_create(target, size))


def shmem_read(target: EscapeTarget, region: int, offset: int, length: int) -> Any:
    """The host's view of ``length`` bytes of ``region`` at ``offset``."""
    return target._run(_shmem_read(target, region, offset, length))


def shmem_write(target: EscapeTarget, region: int, offset: int, data: bytes) -> Any:
    """Have the host write ``data`` into ``region`` at ``offset``."""
    return target._run(_shmem_write(target, region, offset, data))


def shmem_free(target: EscapeTarget, region: int) -> Any:
    return target._run(_shmem_free(target, region))


def eventfd_signal(target: EscapeTarget, fd: int, value: int = 1) -> Any:
    """Hand our eventfd ``fd`` to the host, which adds ``value`` to it."""
    return target._run(_eventfd_signal(target, fd, value))
