"""Reaching into another process: its memory and its file descriptors.

The FUSE front end serves programs that call ``ioctl()`` on a file. The kernel hands the node the
top-level struct only; every pointer inside it refers to the *caller's* memory. This module is
how the node follows those pointers, the way the real driver's ``copy_from_user`` /
``copy_to_user`` do:

* :class:`ProcessVmUserMemory` implements the driver's ``UserMemory``
  accessor with ``process_vm_readv(2)`` / ``process_vm_writev(2)``. A partial transfer, an
  unmapped address or a vanished process is a :class:`UserMemoryFault`
  (the driver answers ``-EFAULT``), never a partial result.
* :func:`take_fd` duplicates a file descriptor *out of* another process with
  ``pidfd_getfd(2)`` (what the kernel does with ``eventfd_ctx_fdget`` when a struct names an
  eventfd). The opposite direction, installing a new fd in the caller, has no system call, so a
  file-based front end cannot return fds (see ``docs/libdxg.md``).
* :class:`PinnedProcessMemory` is the same accessor pinned to one caller for the life of one
  request (a pidfd, checked before every access, and revoked once the request is answered or
  interrupted): what the FUSE node hands the driver, so that a call that outlives its caller
  never reaches into whatever process later gets the same pid.
* :func:`thread_group_of` maps a thread id (what a FUSE request carries) to its process id.

Both system calls need ptrace-attach rights over the target: the node runs as root, or as the
same user as its clients with ``kernel.yama.ptrace_scope`` at 0.

No state lives at module level: the ``libc`` handle is an object (:class:`Syscalls`) that the
front end creates once and passes to each accessor.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select


class UserMemoryFault(Exception):
    """The address range is not readable/writable in the caller (the kernel's -EFAULT)."""


__all__ = [
    "FrontEndLimit",
    "PinnedProcessMemory",
    "ProcessVmUserMemory",
    "Syscalls",
    "TakeFdError",
    "UserMemoryFault",
    "take_fd",
    "task_identity",
    "thread_group_of",
]

# x86-64 / arm64 generic syscall numbers used through libc's syscall() when glibc lacks a wrapper.
SYS_PIDFD_OPEN = 434
SYS_PIDFD_GETFD = 438

# One process_vm_* call moves at most this much (the kernel's UIO_MAXIOV is about iovecs, not
# bytes, but huge single transfers pin memory for long; the driver's limits are far below it).
MAX_TRANSFER = 1 << 30


class _IoVec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


class TakeFdError(OSError):
    """A file descriptor could not be taken from the other process."""


class FrontEndLimit(OSError):
    """What the caller asked for needs the kernel's help in its own context (a new descriptor
    in its table, a mapping in its address space), which a file server cannot give. The FUSE
    node answers the ioctl with this errno (``EOPNOTSUPP``)."""

    def __init__(self, what: str) -> None:
        super().__init__(errno.EOPNOTSUPP, f"{what}: not possible through the device file; "
                         "use the socket node (dxg.client)")


class Syscalls:
    """The few libc entry points this module needs, loaded once per owner (no module state)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        iov_p = ctypes.POINTER(_IoVec)
        self.process_vm_readv = libc.process_vm_readv
        self.process_vm_writev = libc.process_vm_writev
        for fn in (self.process_vm_readv, self.process_vm_writev):
            fn.argtypes = (ctypes.c_int, iov_p, ctypes.c_ulong, iov_p, ctypes.c_ulong,
                           ctypes.c_ulong)
            fn.restype = ctypes.c_ssize_t
        self.syscall = libc.syscall
        self.syscall.restype = ctypes.c_long

    def pidfd_open(self, pid: int) -> int:
        """A pidfd for ``pid`` (``os.pidfd_open`` where Python has it)."""
        opener = getattr(os, "pidfd_open", None)
        if opener is not None:
            return int(opener(pid, 0))
        fd = self.syscall(ctypes.c_long(SYS_PIDFD_OPEN), ctypes.c_int(pid), ctypes.c_uint(0))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return int(fd)

    def pidfd_getfd(self, pidfd: int, target_fd: int) -> int:
        fd = self.syscall(ctypes.c_long(SYS_PIDFD_GETFD), ctypes.c_int(pidfd),
                          ctypes.c_int(target_fd), ctypes.c_uint(0))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return int(fd)


class ProcessVmUserMemory:
    """``UserMemory`` over the address space of process ``pid``.

    ``pid`` may be any thread id of the target (the kernel resolves the thread's address space).
    Every read and write either moves exactly the bytes asked for or raises
    :class:`UserMemoryFault`.
    """

    __slots__ = ("_sys", "pid")

    def __init__(self, pid: int, syscalls: Syscalls | None = None) -> None:
        if pid <= 0:
            raise ValueError(f"bad pid {pid}")
        self.pid = pid
        self._sys = syscalls if syscalls is not None else Syscalls()

    def __repr__(self) -> str:
        return f"<ProcessVmUserMemory pid={self.pid}>"

    @staticmethod
    def _check(addr: int, size: int, what: str) -> None:
        if addr <= 0 or size < 0 or size > MAX_TRANSFER or addr + size > (1 << 64):
            raise UserMemoryFault(f"bad user {what} at 0x{addr:x} (+{size})")

    def _fault(self, what: str, addr: int, size: int, done: int) -> UserMemoryFault:
        if done < 0:
            err = ctypes.get_errno()
            why = os.strerror(err) if err else "failed"
            if err == errno.ESRCH:
                why = "the process is gone"
        else:
            why = f"only {done} of {size} bytes"
        return UserMemoryFault(f"{what} of pid {self.pid} at 0x{addr:x}+{size}: {why}")

    def read(self, addr: int, size: int) -> bytes:
        if size == 0:
            return b""
        self._check(addr, size, "read")
        buf = bytearray(size)
        local = _IoVec(ctypes.addressof((ctypes.c_char * size).from_buffer(buf)), size)
        remote = _IoVec(addr, size)
        done = self._sys.process_vm_readv(self.pid, ctypes.byref(local), 1,
                                          ctypes.byref(remote), 1, 0)
        if done != size:
            raise self._fault("read", addr, size, done)
        return bytes(buf)

    def write(self, addr: int, data: bytes) -> None:
        size = len(data)
        if size == 0:
            return
        self._check(addr, size, "write")
        data = bytes(data)  # no copy when it is bytes already; the kernel only reads it
        local = _IoVec(ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p), size)
        remote = _IoVec(addr, size)
        done = self._sys.process_vm_writev(self.pid, ctypes.byref(local), 1,
                                           ctypes.byref(remote), 1, 0)
        if done != size:
            raise self._fault("write", addr, size, done)

    def take_fd(self, fd: int) -> int:
        """A duplicate (close-on-exec) of the caller's file descriptor ``fd``."""
        return take_fd(self.pid, fd, self._sys)

    def give_fd_to_user(self, fd: int, addr: int, width: int = 8,
                        in_struct: bool = False) -> None:
        """Install ``fd`` in the caller (ShareObjects, CreateSyncFile): impossible from here.
        The descriptor was handed over to us: it is closed."""
        os.close(fd)
        raise FrontEndLimit("returning a file descriptor to the caller")

    def map_block(self, block: int, block_size: int, offset: int, where: int,
                  fd: int | None = None, readonly: bool = False, in_struct: bool = True) -> None:
        """Map shared memory into the caller (Lock2, fence pages): impossible from here (a
        file cannot change another process's address space). ``fd`` is closed."""
        if fd is not None:
            os.close(fd)
        raise FrontEndLimit("mapping memory into the caller")

    def unmap_block(self, block: int) -> bool:
        return True  # nothing was ever mapped into this caller


class PinnedProcessMemory(ProcessVmUserMemory):
    """``UserMemory`` of one caller, pinned for the life of one request.

    Why: ``process_vm_readv``/``process_vm_writev`` name their target by pid *number*. A call
    that outlives its caller (SIGKILLed in the middle of a long ioctl) must not later write its
    output to whatever process gets that number next. So the request pins its caller:

    * :meth:`pin` runs first, when the request is read: it finds the calling thread's process
      and opens a pidfd for it. The caller is then blocked in the kernel waiting for our answer
      (once the daemon has read a FUSE request, even SIGKILL only makes the kernel send an
      INTERRUPT and keep waiting), so the thread and its process, and their pid numbers, are
      certainly the caller's at that moment.
    * Before *every* access (:meth:`read`, :meth:`write`, :meth:`take_fd`) it checks that the
      accessor has not been revoked and that the pidfd does not report the process as exited
      (a pidfd polls readable once its process has exited, before its pid can be reaped and
      reused). The thread-group id is the target (a thread id could be reused by a thread of
      another process while this one lives on).
    * :meth:`revoke` is called the moment the request is answered or interrupted (the node
      answered EINTR for a dying caller): from then on every access raises
      :class:`UserMemoryFault` and nothing is read or written. :meth:`close` revokes and closes
      the pidfd when the call ends.
    * :meth:`take_fd` duplicates through the pidfd itself (``pidfd_getfd``), never by number.

    The window that remains, in theory: between the pidfd check and the ``process_vm_*``
    system call right after it (adjacent calls on one thread, microseconds apart) the process
    would have to exit, be reaped by its parent *and* have its pid number handed to a new
    process. While the request is unanswered the caller cannot exit at all, and once it is
    answered the accessor is revoked; so this needs the request to be finished behind the
    node's back (the connection aborted through ``/sys/fs/fuse/connections/N/abort``) and a
    full pid wrap-around inside that gap, and even then the kernel checks ptrace rights against
    the new process. Closing it entirely would take ``/proc/PID/mem`` opened at pin time (bound
    to the address space, not the number), which writes with ``FOLL_FORCE`` (through read-only
    protections) where ``copy_to_user`` would fault, so it is not used.
    """

    __slots__ = ("_pidfd", "_poller", "_why", "tgid", "tid")

    def __init__(self, tid: int, tgid: int, pidfd: int, syscalls: Syscalls) -> None:
        super().__init__(tgid, syscalls)
        self.tid = tid
        self.tgid = tgid
        self._pidfd = pidfd
        self._poller = select.poll()
        self._poller.register(pidfd, select.POLLIN)
        self._why: str | None = None

    @classmethod
    def pin(cls, tid: int, syscalls: Syscalls) -> PinnedProcessMemory:
        """Pin the process of thread ``tid`` (the caller of a request being served). Raises
        OSError (``ESRCH`` when it cannot be found, or why ``pidfd_open`` failed)."""
        try:
            # Succeeds only for a thread-group leader: then ``tid`` is its process's id.
            pidfd, tgid = syscalls.pidfd_open(tid), tid
        except OSError as e:
            # Not a leader: EINVAL, or ENOENT on newer kernels (which know thread pidfds).
            if e.errno not in (errno.EINVAL, errno.ENOENT):
                raise
            ident = task_identity(tid)  # another thread of its process
            if ident is None:
                raise ProcessLookupError(errno.ESRCH, f"no thread {tid}") from None
            tgid = ident[0]
            pidfd = syscalls.pidfd_open(tgid)
        try:
            # The pidfd is open: make sure it is the thread's own process we pinned.
            if tgid != tid and not os.path.exists(f"/proc/{tgid}/task/{tid}"):
                raise ProcessLookupError(errno.ESRCH, f"thread {tid} left process {tgid}")
            pinned = cls(tid, tgid, pidfd, syscalls)
        except BaseException:
            os.close(pidfd)
            raise
        if not pinned.alive():
            pinned.close()
            raise ProcessLookupError(errno.ESRCH, f"process {tgid} has exited")
        return pinned

    def __repr__(self) -> str:
        state = f" revoked ({self._why})" if self._why else ""
        return f"<PinnedProcessMemory pid={self.tgid} tid={self.tid}{state}>"

    def __enter__(self) -> PinnedProcessMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def revoked(self) -> bool:
        return self._why is not None

    def alive(self) -> bool:
        """Whether the pinned process has not exited (its pidfd is not readable)."""
        if self._pidfd < 0:
            return False
        return not self._poller.poll(0)

    def revoke(self, why: str) -> None:
        """Refuse every access from now on (the request was answered or interrupted)."""
        if self._why is None:
            self._why = why

    def close(self) -> None:
        """Revoke and close the pidfd (idempotent)."""
        self.revoke("the call is over")
        if self._pidfd >= 0:
            self._poller.unregister(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1

    def _guard(self, what: str) -> None:
        if self._why is not None:
            raise UserMemoryFault(f"{what} of pid {self.tgid} refused: {self._why}")
        if not self.alive():
            self.revoke("the caller has exited")
            raise UserMemoryFault(f"{what} of pid {self.tgid} refused: the caller has exited")

    def read(self, addr: int, size: int) -> bytes:
        self._guard("read")
        return super().read(addr, size)

    def write(self, addr: int, data: bytes) -> None:
        self._guard("write")
        super().write(addr, data)

    def take_fd(self, fd: int) -> int:
        """A duplicate of the caller's descriptor ``fd``, taken through the pidfd."""
        try:
            self._guard("take_fd")
        except UserMemoryFault as e:
            raise TakeFdError(errno.ESRCH, str(e)) from None
        if fd < 0:
            raise TakeFdError(errno.EBADF, f"bad file descriptor {fd}")
        try:
            return self._sys.pidfd_getfd(self._pidfd, fd)
        except OSError as e:
            raise TakeFdError(e.errno or errno.EBADF,
                              f"pidfd_getfd(pid {self.tgid}, fd {fd}): {e.strerror}") from None


def take_fd(pid: int, fd: int, syscalls: Syscalls | None = None) -> int:
    """Duplicate file descriptor ``fd`` of process ``pid`` into this process (``pidfd_getfd``).

    The new descriptor is close-on-exec and refers to the same open file (for an eventfd: the
    same counter). The caller owns it and must close it. Raises :class:`TakeFdError` with the
    errno: ``EBADF`` when ``fd`` is not open there, ``ESRCH`` when the process is gone, ``EPERM``
    without ptrace rights over it.
    """
    sys_ = syscalls if syscalls is not None else Syscalls()
    if fd < 0:
        raise TakeFdError(errno.EBADF, f"bad file descriptor {fd}")
    try:
        pidfd = sys_.pidfd_open(pid)
    except OSError as e:
        raise TakeFdError(e.errno or errno.ESRCH, f"pidfd_open({pid}): {e.strerror}") from None
    try:
        return sys_.pidfd_getfd(pidfd, fd)
    except OSError as e:
        raise TakeFdError(e.errno or errno.EBADF,
                          f"pidfd_getfd(pid {pid}, fd {fd}): {e.strerror}") from None
    finally:
        os.close(pidfd)


def task_identity(tid: int) -> tuple[int, str] | None:
    """(process id, command name) of thread ``tid``, or None if no such thread exists."""
    if tid <= 0:
        return None
    tgid: int | None = None
    name = ""
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Name:"):
                    name = line[5:].strip().decode("utf-8", "replace")
                elif line.startswith(b"Tgid:"):
                    tgid = int(line.split()[1])
                    break
    except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
        return None
    return None if tgid is None else (tgid, name)


def thread_group_of(tid: int) -> int | None:
    """The process (thread group) id of thread ``tid``, or None if no such thread exists."""
    ident = task_identity(tid)
    return None if ident is None else ident[0]
