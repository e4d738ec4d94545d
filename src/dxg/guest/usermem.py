"""The one accessor through which handlers touch caller memory (copy_from_user/copy_to_user).

Front ends supply an implementation: the socket node serves the regions a request carried; the
FUSE file reads and writes the calling process with process_vm_readv/writev. Handlers never
know which one they got.
"""

import errno
from typing import Protocol

from dxg.guest.errors import IoctlError


class UserMemoryFault(Exception):
    """The address range is not readable/writable in the caller (the kernel's -EFAULT)."""


class UserMemory(Protocol):
    def read(self, addr: int, size: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> None: ...


def copy_from_user(mem: UserMemory, addr: int, size: int, limit: int) -> bytes:
    """Read `size` bytes at `addr`, after checking the size against `limit` (the caller's
    driver limit) so nothing huge is ever read. A NULL address with a size is -EINVAL."""
    if size < 0 or size > limit:
        raise IoctlError(errno.EINVAL, f"user buffer of {size} bytes exceeds the limit {limit}")
    if size == 0:
        return b""
    if addr == 0:
        raise IoctlError(errno.EINVAL, "NULL user buffer with a non-zero size")
    try:
        data = mem.read(addr, size)
    except UserMemoryFault as e:
        raise IoctlError(errno.EFAULT, str(e) or "bad user address") from None
    if len(data) != size:
        raise IoctlError(errno.EFAULT, "short read of user memory")
    return data


def copy_to_user(mem: UserMemory, addr: int, data: bytes) -> None:
    if not data:
        return
    if addr == 0:
        raise IoctlError(errno.EINVAL, "NULL user buffer")
    try:
        mem.write(addr, data)
    except UserMemoryFault as e:
        raise IoctlError(errno.EFAULT, str(e) or "bad user address") from None
