"""NTSTATUS values and the two status/errno translations around ``/dev/dxg``.

* Guest kernel (dxgkrnl ``dxgvmbus.c: ntstatus2int``): a host NTSTATUS becomes the ioctl
  return value: success codes pass through unchanged (so ``STATUS_PENDING`` 0x103 and
  ``STATUS_TIMEOUT`` 0x102 come back as positive returns), failures become a negative errno
  (:func:`ntstatus_to_errno`, :data:`NTSTATUS_TO_ERRNO`).
* User mode (libdxg ``src/d3dkmt-wsl.cpp``): ``ioctl() == -1`` turns ``errno`` back into an
  NTSTATUS with ``LinuxErrToNTSTATUS`` (:func:`errno_to_ntstatus`, :data:`ERRNO_TO_NTSTATUS`);
  any other return value is passed through as the NTSTATUS (:func:`ioctl_result_to_ntstatus`).

The round trip is lossy on purpose, exactly as in the real stack: e.g. ``STATUS_NOT_IMPLEMENTED``
becomes ``-EPERM`` in the kernel and ``STATUS_NOT_SUPPORTED`` in libdxg, and
``STATUS_OBJECT_NAME_NOT_FOUND`` comes back as ``STATUS_OBJECT_NAME_INVALID``.

Values are the well-known Windows ``ntstatus.h`` codes (unsigned 32-bit); the ones used by the
driver match ``drivers/hv/dxgkrnl`` and libdxg ``include/dxg/d3dkmdt.h``.
"""

from __future__ import annotations

import enum
import errno
from types import MappingProxyType

__all__ = (
    "ERRNO_TO_NTSTATUS",
    "NTSTATUS",
    "NTSTATUS_TO_ERRNO",
    "errno_to_ntstatus",
    "ioctl_result_to_ntstatus",
    "nt_success",
    "ntstatus_to_errno",
    "ntstatus_to_signed",
    "ntstatus_to_unsigned",
    "status_name",
)


class NTSTATUS(enum.IntEnum):
    """NTSTATUS codes as unsigned 32-bit values (``0xC0000008``, not ``-1073741816``)."""

    # Success (severity 0) and informational (severity 1) codes: NT_SUCCESS() is true.
    STATUS_SUCCESS = 0x00000000
    STATUS_ABANDONED_WAIT_0 = 0x00000080
    STATUS_USER_APC = 0x000000C0
    STATUS_ALERTED = 0x00000101
    STATUS_TIMEOUT = 0x00000102
    STATUS_PENDING = 0x00000103
    STATUS_MORE_ENTRIES = 0x00000105
    STATUS_GRAPHICS_PARTIAL_DATA_POPULATED = 0x401E000A
    # Warning codes (severity 2): NT_SUCCESS() is false.
    STATUS_BUFFER_OVERFLOW = 0x80000005
    STATUS_DEVICE_BUSY = 0x80000011
    STATUS_NO_MORE_ENTRIES = 0x8000001A
    # Error codes (severity 3).
    STATUS_UNSUCCESSFUL = 0xC0000001
    STATUS_NOT_IMPLEMENTED = 0xC0000002
    STATUS_INVALID_INFO_CLASS = 0xC0000003
    STATUS_INFO_LENGTH_MISMATCH = 0xC0000004
    STATUS_ACCESS_VIOLATION = 0xC0000005
    STATUS_INVALID_HANDLE = 0xC0000008
    STATUS_INVALID_PARAMETER = 0xC000000D
    STATUS_NO_SUCH_DEVICE = 0xC000000E
    STATUS_NO_SUCH_FILE = 0xC000000F
    STATUS_INVALID_DEVICE_REQUEST = 0xC0000010
    STATUS_NO_MEMORY = 0xC0000017
    STATUS_CONFLICTING_ADDRESSES = 0xC0000018
    STATUS_ILLEGAL_INSTRUCTION = 0xC000001D
    STATUS_ACCESS_DENIED = 0xC0000022
    STATUS_BUFFER_TOO_SMALL = 0xC0000023
    STATUS_OBJECT_TYPE_MISMATCH = 0xC0000024
    STATUS_OBJECT_NAME_INVALID = 0xC0000033
    STATUS_OBJECT_NAME_NOT_FOUND = 0xC0000034
    STATUS_OBJECT_NAME_COLLISION = 0xC0000035
    STATUS_OBJECT_PATH_NOT_FOUND = 0xC000003A
    STATUS_SHARING_VIOLATION = 0xC0000043
    STATUS_QUOTA_EXCEEDED = 0xC0000044
    STATUS_INTEGER_OVERFLOW = 0xC0000095
    STATUS_INSUFFICIENT_RESOURCES = 0xC000009A
    STATUS_DEVICE_NOT_READY = 0xC00000A3
    STATUS_IO_TIMEOUT = 0xC00000B5
    STATUS_NOT_SUPPORTED = 0xC00000BB
    STATUS_INTERNAL_ERROR = 0xC00000E5
    STATUS_INVALID_USER_BUFFER = 0xC00000E8
    STATUS_PROCESS_IS_TERMINATING = 0xC000010A
    STATUS_CANCELLED = 0xC0000120
    STATUS_INVALID_ADDRESS = 0xC0000141
    STATUS_INVALID_DEVICE_STATE = 0xC0000184
    STATUS_IO_DEVICE_ERROR = 0xC0000185
    STATUS_NOT_FOUND = 0xC0000225
    STATUS_DEVICE_REMOVED = 0xC00002B6
    # Graphics kernel (facility 0x1E) codes.
    STATUS_GRAPHICS_INSUFFICIENT_DMA_BUFFER = 0xC01E0001
    STATUS_GRAPHICS_INVALID_DISPLAY_ADAPTER = 0xC01E0002
    STATUS_GRAPHICS_ADAPTER_WAS_RESET = 0xC01E0003
    STATUS_GRAPHICS_INVALID_DRIVER_MODEL = 0xC01E0004
    STATUS_GRAPHICS_PRESENT_MODE_CHANGED = 0xC01E0005
    STATUS_GRAPHICS_PRESENT_OCCLUDED = 0xC01E0006
    STATUS_GRAPHICS_PRESENT_DENIED = 0xC01E0007
    STATUS_GRAPHICS_DRIVER_MISMATCH = 0xC01E0009
    STATUS_GRAPHICS_NO_VIDEO_MEMORY = 0xC01E0100
    STATUS_GRAPHICS_CANT_LOCK_MEMORY = 0xC01E0101
    STATUS_GRAPHICS_ALLOCATION_BUSY = 0xC01E0102
    STATUS_GRAPHICS_TOO_MANY_REFERENCES = 0xC01E0103
    STATUS_GRAPHICS_TRY_AGAIN_LATER = 0xC01E0104
    STATUS_GRAPHICS_TRY_AGAIN_NOW = 0xC01E0105
    STATUS_GRAPHICS_ALLOCATION_INVALID = 0xC01E0106
    STATUS_GRAPHICS_INVALID_ALLOCATION_HANDLE = 0xC01E0114
    STATUS_GRAPHICS_WRONG_ALLOCATION_DEVICE = 0xC01E0115
    STATUS_GRAPHICS_ALLOCATION_CONTENT_LOST = 0xC01E0116
    STATUS_GRAPHICS_GPU_EXCEPTION_ON_DEVICE = 0xC01E0200


# dxgkrnl dxgvmbus.c ntstatus2int(): the failure rows, in the order of its switch statement.
# (The architecture report's "NOT_FOUND" row is STATUS_OBJECT_NAME_NOT_FOUND in the source.)
# Any other failure -> -EINVAL.  STATUS_TIMEOUT's row is unreachable: NT_SUCCESS(0x102) is true,
# so the function returns 0x102 before the switch.
NTSTATUS_TO_ERRNO: MappingProxyType[int, int] = MappingProxyType(
    {
        NTSTATUS.STATUS_OBJECT_NAME_COLLISION: -errno.EEXIST,
        NTSTATUS.STATUS_NO_MEMORY: -errno.ENOMEM,
        NTSTATUS.STATUS_INVALID_PARAMETER: -errno.EINVAL,
        NTSTATUS.STATUS_OBJECT_NAME_INVALID: -errno.ENOENT,
        NTSTATUS.STATUS_OBJECT_NAME_NOT_FOUND: -errno.ENOENT,
        NTSTATUS.STATUS_TIMEOUT: -errno.EAGAIN,
        NTSTATUS.STATUS_BUFFER_TOO_SMALL: -errno.EOVERFLOW,
        NTSTATUS.STATUS_DEVICE_REMOVED: -errno.ENODEV,
        NTSTATUS.STATUS_ACCESS_DENIED: -errno.EACCES,
        NTSTATUS.STATUS_NOT_SUPPORTED: -errno.EPERM,
        NTSTATUS.STATUS_ILLEGAL_INSTRUCTION: -errno.EOPNOTSUPP,
        NTSTATUS.STATUS_INVALID_HANDLE: -errno.EBADF,
        NTSTATUS.STATUS_GRAPHICS_ALLOCATION_BUSY: -errno.EINPROGRESS,
        NTSTATUS.STATUS_OBJECT_TYPE_MISMATCH: -errno.EPROTOTYPE,
        NTSTATUS.STATUS_NOT_IMPLEMENTED: -errno.EPERM,
    }
)

# libdxg src/d3dkmt-wsl.cpp LinuxErrToNTSTATUS(): errno (positive) -> NTSTATUS.
# Any other errno -> STATUS_UNSUCCESSFUL.  (On Linux EOPNOTSUPP == ENOTSUP == 95.)
ERRNO_TO_NTSTATUS: MappingProxyType[int, NTSTATUS] = MappingProxyType(
    {
        errno.EEXIST: NTSTATUS.STATUS_OBJECT_NAME_COLLISION,
        errno.ENOMEM: NTSTATUS.STATUS_NO_MEMORY,
        errno.EINVAL: NTSTATUS.STATUS_INVALID_PARAMETER,
        errno.ENOENT: NTSTATUS.STATUS_OBJECT_NAME_INVALID,
        errno.EAGAIN: NTSTATUS.STATUS_TIMEOUT,
        errno.EOVERFLOW: NTSTATUS.STATUS_BUFFER_TOO_SMALL,
        errno.ENODEV: NTSTATUS.STATUS_DEVICE_REMOVED,
        errno.EACCES: NTSTATUS.STATUS_ACCESS_DENIED,
        errno.ENOSYS: NTSTATUS.STATUS_NOT_SUPPORTED,
        errno.EPERM: NTSTATUS.STATUS_NOT_SUPPORTED,
        errno.EOPNOTSUPP: NTSTATUS.STATUS_ILLEGAL_INSTRUCTION,
        errno.EBADF: NTSTATUS.STATUS_INVALID_HANDLE,
        errno.EINPROGRESS: NTSTATUS.STATUS_GRAPHICS_ALLOCATION_BUSY,
        errno.EPROTOTYPE: NTSTATUS.STATUS_OBJECT_TYPE_MISMATCH,
    }
)

# Linux returns -1..-4095 from a syscall as an error (errno); other negative ioctl returns are
# passed to user space as the return value itself.
_MAX_ERRNO = 4095


def _known(value: int) -> int:
    """``value`` as an NTSTATUS member when it is one (nicer reprs), else unchanged."""
    try:
        return NTSTATUS(value)
    except ValueError:
        return value


def ntstatus_to_unsigned(st: int) -> int:
    """An NTSTATUS given signed (``-1073741816``) or unsigned, as unsigned 32-bit."""
    if not -0x80000000 <= st <= 0xFFFFFFFF:
        raise ValueError(f"{st!r} is not a 32-bit NTSTATUS")
    return st & 0xFFFFFFFF


def ntstatus_to_signed(st: int) -> int:
    """An NTSTATUS as the signed 32-bit ``int`` C sees (``0xC0000008`` -> ``-1073741816``)."""
    u = ntstatus_to_unsigned(st)
    return u - 0x1_0000_0000 if u & 0x80000000 else u


def nt_success(st: int) -> bool:
    """``NT_SUCCESS(st)``: the status read as signed 32-bit is >= 0."""
    return ntstatus_to_signed(st) >= 0


def ntstatus_to_errno(st: int) -> int:
    """dxgkrnl ``ntstatus2int``: success -> ``st`` itself (>= 0); failure -> negative errno.

    Failures not in :data:`NTSTATUS_TO_ERRNO` give ``-EINVAL``.
    """
    if nt_success(st):
        return ntstatus_to_signed(st)
    return NTSTATUS_TO_ERRNO.get(ntstatus_to_unsigned(st), -errno.EINVAL)


def errno_to_ntstatus(err: int) -> int:
    """libdxg ``LinuxErrToNTSTATUS``: an errno (either sign) -> unsigned NTSTATUS.

    Exactly like libdxg, anything not in :data:`ERRNO_TO_NTSTATUS` (including 0) gives
    ``STATUS_UNSUCCESSFUL``; libdxg only calls it after ``ioctl()`` returned -1.
    """
    return ERRNO_TO_NTSTATUS.get(abs(err), NTSTATUS.STATUS_UNSUCCESSFUL)


def ioctl_result_to_ntstatus(ret: int) -> int:
    """What libdxg's ``D3DKMT*`` thunk returns for a kernel-style ioctl result ``ret``.

    * ``ret >= 0``: the value itself (0, or a positive NTSTATUS success code such as 0x103);
    * ``-4095 <= ret < 0``: a negative errno, mapped by :func:`errno_to_ntstatus`;
    * ``ret < -4095``: a raw negative NTSTATUS that the kernel returned directly (e.g.
      ``STATUS_INVALID_PARAMETER`` from CreateAllocation's checks); Linux hands it to user
      space as the ioctl return value and libdxg passes it through, so it comes back as the
      unsigned NTSTATUS.
    """
    if ret >= 0:
        return _known(ntstatus_to_unsigned(ret))
    if ret >= -_MAX_ERRNO:
        return errno_to_ntstatus(-ret)
    return _known(ntstatus_to_unsigned(ret))


def status_name(st: int) -> str:
    """``"STATUS_INVALID_HANDLE (0xC0000008)"``; an unknown value as ``"0x12345678"``."""
    u = ntstatus_to_unsigned(st)
    try:
        return f"{NTSTATUS(u).name} (0x{u:08X})"
    except ValueError:
        return f"0x{u:08X}"
