"""The one accessor through which handlers touch the caller: its memory (copy_from_user /
copy_to_user) and the file descriptors that go between it and the driver.

Front ends supply an implementation: the socket node serves the regions and descriptors a request
carried and returns new descriptors beside the reply; the FUSE file reads and writes the calling
process with process_vm_readv/writev and takes its descriptors with pidfd_getfd, but cannot put a
new descriptor into the caller (it raises FrontEndLimit, an -EOPNOTSUPP). Handlers never know
which one they got.
"""

from __future__ import annotations

import errno
from typing import Protocol

from dxg.guest.errors import IoctlError
from dxg.oslib.procmem import FrontEndLimit, UserMemoryFault

__all__ = ["FrontEndLimit", "UserMemory", "UserMemoryFault", "copy_from_user", "copy_to_user",
           "give_fd", "map_block", "take_fd"]


class UserMemory(Protocol):
    def read(self, addr: int, size: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> None: ...

    def take_fd(self, number: int) -> int:
        """A descriptor of this side's own (close it when done) for the caller's descriptor
        ``number``. Raises OSError (EBADF when the caller has no such descriptor or did not
        hand it over)."""
        ...

    def give_fd_to_user(self, fd: int, addr: int, width: int = 8,
                        in_struct: bool = False) -> None:
        """Hand ``fd`` to the caller (the accessor owns it from now on, whatever happens) and
        store its number there at user address ``addr`` (with ``in_struct``: at that offset
        of the ioctl's struct). FrontEndLimit where impossible."""
        ...

    def map_block(self, block: int, block_size: int, offset: int, where: int,
                  fd: int | None = None, readonly: bool = False, in_struct: bool = True) -> None:
        """Map shared memory block ``block`` (``block_size`` bytes; ``fd``, owned by the
        accessor from now on, when the caller does not have it yet) into the caller, and store
        the address of its byte ``offset`` at ``where`` (an offset into the ioctl's struct, or
        a user address). FrontEndLimit where impossible (a file cannot map into its caller)."""
        ...

    def unmap_block(self, block: int) -> bool:
        """Tell the caller ``block`` is gone (it unmaps it); False when no room is left."""
        ...


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


def take_fd(mem: UserMemory, number: int) -> int:
    """The caller's descriptor ``number`` as one of ours (-EBADF when it has none such)."""
    if number < 0:
        raise IoctlError(errno.EBADF, f"bad file descriptor {number}")
    try:
        return mem.take_fd(number)
    except FrontEndLimit as e:
        raise IoctlError(errno.EOPNOTSUPP, str(e)) from None
    except OSError as e:
        raise IoctlError(e.errno or errno.EBADF, str(e)) from None


def map_block(mem: UserMemory, block: int, block_size: int, offset: int, where: int,
              fd: int | None = None, readonly: bool = False, in_struct: bool = True) -> None:
    """Map ``block`` into the caller (see UserMemory.map_block); -EOPNOTSUPP where the front
    end cannot map memory into its caller (the FUSE file)."""
    try:
        mem.map_block(block, block_size, offset, where, fd, readonly, in_struct)
    except FrontEndLimit as e:
        raise IoctlError(errno.EOPNOTSUPP, str(e)) from None
    except UserMemoryFault as e:
        raise IoctlError(errno.EFAULT, str(e) or "bad user address") from None


def give_fd(mem: UserMemory, fd: int, addr: int, width: int = 8,
            in_struct: bool = False) -> None:
    """Install ``fd`` in the caller, its number stored at ``addr`` (a user address, or with
    ``in_struct`` an offset of the ioctl's struct); ownership passes on."""
    try:
        if in_struct:
            mem.give_fd_to_user(fd, addr, width, in_struct=True)
        else:
            mem.give_fd_to_user(fd, addr, width)
    except FrontEndLimit as e:
        raise IoctlError(errno.EOPNOTSUPP, str(e)) from None
    except UserMemoryFault as e:
        raise IoctlError(errno.EFAULT, str(e) or "bad user address") from None
