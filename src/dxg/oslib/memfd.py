"""Shared memory as a memfd: a file in RAM that travels between processes as a descriptor and
maps the same pages wherever it is mapped (host, guest and client see each other's writes)."""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os

__all__ = ["SharedMemory", "memfd_from_bytes"]


# A memfd made here is sealed at its size before anyone else sees it: whoever gets a
# descriptor can write it but never shrink it, so this process's mapping can never fault.
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class SharedMemory:
    """A memfd of ``size`` bytes and this process's mapping of it. ``fd`` stays ours; hand out
    duplicates. One made here is sealed at its size (a peer holding a descriptor cannot make
    our mapping fault) and its pages go back to the OS at ``close()``, even while a peer still
    maps it. ``close()`` unmaps and closes (idempotent); views still exported keep the mapping
    until they are released."""

    __slots__ = ("_own", "fd", "map", "size")

    def __init__(self, size: int, name: str = "pydxg", fd: int | None = None) -> None:
        if size <= 0:
            raise ValueError("shared memory needs a positive size")
        own = fd is None
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING) if own else fd
        self._own = own
        try:
            if own:
                os.ftruncate(self.fd, size)
                fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SEALS)
            elif os.fstat(self.fd).st_size < size:
                raise ValueError("the descriptor is smaller than the size asked for")
            self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self.size = size

    @classmethod
    def adopt(cls, fd: int, size: int) -> SharedMemory:
        """Map a memfd received from elsewhere (the object owns ``fd`` from now on)."""
        return cls(size, fd=fd)

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return self.map[offset : offset + length]

    def view(self, offset: int = 0, length: int | None = None) -> memoryview:
        """A writable view of ``[offset, offset + length)`` (to the end by default), no copy:
        the mapping stays while the view (or any slice of it) lives, even past close()."""
        n = self.size - offset if length is None else length
        self._check(offset, n)
        return memoryview(self.map)[offset : offset + n]

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._check(offset, len(data))
        self.map[offset : offset + len(data)] = data

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"range {offset}+{length} outside {self.size} bytes")

    def close(self) -> None:
        if self.fd < 0:
            return
        if self._own:  # (a peer's memory is the peer's to free)
            with contextlib.suppress(OSError, ValueError):
                self.map.madvise(mmap.MADV_REMOVE)
        with contextlib.suppress(BufferError):
            self.map.close()
        os.close(self.fd)
        self.fd = -1


def memfd_from_bytes(data: bytes | memoryview, name: str = "pydxg") -> int:
    """A new memfd holding ``data`` (for the copy path over transports that cannot pass
    descriptors); the caller owns the returned descriptor."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd
