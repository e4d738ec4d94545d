"""The FUSE front end: a file that unmodified programs open and drive like ``/dev/dxg``.

:class:`FuseNode` mounts a one-file FUSE filesystem *over a regular file* (the kernel allows a
file mount point when the root is a file, ``rootmode=0100000``), so the path itself is the
device: ``open(path, O_RDONLY | O_CLOEXEC)`` then ``ioctl(fd, LX_DXENUMADAPTERS3, &args)`` with
the real codes and struct layouts. It speaks the kernel's FUSE protocol on ``/dev/fuse`` itself
(:mod:`dxg.node.fuse_proto`; no libfuse), on the driver's event loop: ``/dev/fuse`` is read
non-blocking from one reader callback, quick requests (OPEN, GETATTR, INTERRUPT, ...) are
answered inline, and each IOCTL runs as a task of its open file's process. There are no threads
and no cap on calls in flight: a call parked in the driver parks only its caller.

How a call travels: the kernel copies the top-level struct in (``_IOC_SIZE`` bytes, as the
code's direction bits say: FUSE's "restricted" ioctls), we hand it to the same dispatcher the
socket node uses (``await driver.ioctl``), and the kernel copies the struct the driver returns
back out. Pointers inside the struct are followed into the caller with ``process_vm_readv`` /
``process_vm_writev`` through :class:`dxg.oslib.procmem.PinnedProcessMemory`: the caller is
pinned with a pidfd the moment its request is read, every access checks that it is still alive
and that the request is still unanswered, and once the request is answered or interrupted the
accessor refuses everything (a call that outlives a SIGKILLed caller never writes into whatever
process gets its pid next). The return value is the driver's: 0, a positive NTSTATUS, or
``-errno`` (``ioctl()`` then returns -1 with ``errno`` set).

Processes, as in the kernel (``dxgk_open`` / ``dxgk_release``): each open file is one driver
process (as each socket connection is); its RELEASE, including the kernel closing the file when
the process dies, cancels its calls still in flight and tears down everything it created. A
FUSE request carries the calling *thread*'s id; the node maps it to its thread group, and a
caller from another thread group than the file's (a forked child using its parent's descriptor)
gets ``-ENOTTY`` from the driver, as from the real one. The child opens the file again and gets
its own process. A caller killed (SIGKILL) inside a call gets ``EINTR`` at once so that it can
die; its call is cancelled.

Limits: at most ``max_opens`` open files in all and ``max_opens_per_uid`` (default a quarter)
per user; root counts towards the total only. Past a limit ``open()`` fails with ``EMFILE``.

Mounting: as root with ``mount(2)`` directly (``fuse.pydxg``, ``nosuid,nodev``,
``default_permissions`` so the kernel enforces ``mode``, ``allow_other`` so every user reaches
it); otherwise through ``fusermount3`` and its ``_FUSE_COMMFD`` descriptor-passing protocol
(``allow_other`` then needs ``user_allow_other`` in ``/etc/fuse.conf``). Before mounting, the
path is checked: no symbolic link at it, every directory above it this user's or root's and not
writable by others unless sticky, and an existing file must be a regular file or a character
device of this user; it is opened ``O_NOFOLLOW`` and ``mount(2)`` mounts on that descriptor
(``/proc/self/fd/N``), so it cannot be swapped between check and use. pydxg mounts already at
the path are probed by opening the file (a dead connection answers ``ENOTCONN`` whatever the
cached attributes say): dead layers are detached, a live node is never covered
(:class:`~dxg.node.server.NodeBusy`). :meth:`FuseNode.close` detaches the mount lazily
(``MNT_DETACH`` / ``fusermount3 -u -z``), aborts the connection, closes every remaining process
and removes the file if the node created it.

What a file cannot do: install a new file descriptor in the caller or map memory into it (the
kernel driver does both in the caller's context). Those ioctls are answered with an error
status, never a hang; see :data:`dxg.node.support.FILE_LIMITS` and ``docs/libdxg.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from dxg.node import fuse_proto as fp
from dxg.node.admission import UidCounter, process_groups, process_name
from dxg.node.server import NodeBusy
from dxg.node.support import FILE_LIMITS, render_libdxg_table
from dxg.oslib.procmem import PinnedProcessMemory, Syscalls, UserMemoryFault, task_identity
from dxg.runtime.loop import LoopThread
from dxg.runtime.tasks import TaskSet
from dxg.uapi.nodepath import trusted_path_problem

__all__ = [
    "FILE_LIMITS",
    "FuseNode",
    "FuseUnavailable",
    "UnsafeDevicePath",
    "fuse_available",
    "pydxg_mounts",
]

log = logging.getLogger(__name__)

FSTYPE = "fuse.pydxg"
SUBTYPE = "pydxg"

MS_NOSUID = 0x2
MS_NODEV = 0x4
MNT_DETACH = 0x2

SIGKILL_BIT = 1 << (9 - 1)

# Attributes of the file never change while it is mounted: let the kernel cache them.
ATTR_VALID_S = 60.0
# One read of /dev/fuse must hold the largest request: an IOCTL carries at most _IOC_SIZE
# (16383) bytes; WRITE at most max_write (4096).
READ_BUFFER = 64 * 1024 + 4096
MAX_WRITE = 4096
# Requests handled per wake-up of the reader before other work on the loop gets a turn.
READ_BATCH = 64
# Layers of dead mounts detached at one path before giving up.
MAX_DEAD_LAYERS = 64

# Like a character device: no page cache (and so no shared mmap: -ENODEV), no seeking, and no
# FLUSH round trip on every close(); /dev/dxg has no flush either.
OPEN_FLAGS = fp.FOPEN_DIRECT_IO | fp.FOPEN_NONSEEKABLE | fp.FOPEN_NOFLUSH

_DEAD_ERRNOS = frozenset({errno.ENOTCONN, errno.ECONNABORTED, errno.ECONNREFUSED})


class FuseUnavailable(RuntimeError):
    """FUSE cannot be used here: no ``/dev/fuse``, or mounting is not permitted."""


class UnsafeDevicePath(PermissionError):
    """The device path could be controlled by someone else (a symbolic link, a directory above
    it that another user may change, a file of another user or of the wrong kind)."""


class FuseDriver(Protocol):
    """What the node needs from the driver (``dxg.guest.driver.GuestDriver`` is one). Everything
    but ``rt`` is called on the driver's loop."""

    rt: LoopThread

    def open_process(self, pid: int, uid: int, name: str,
                     gids: tuple[int, ...] = ()) -> Any: ...

    async def close_process(self, proc: Any) -> None: ...

    async def ioctl(self, proc: Any, code: int, arg: bytes, mem: Any,
                    caller_tgid: int | None = None) -> tuple[int, bytes]: ...


def fuse_available() -> str | None:
    """None when this process can mount a FUSE node, else the reason it cannot."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist (no FUSE in this kernel or container)"
    if os.geteuid() == 0:
        try:
            os.close(os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC))
        except OSError as e:
            return f"cannot open /dev/fuse: {e.strerror}"
        return None
    if shutil.which("fusermount3") is None and shutil.which("fusermount") is None:
        return "not root and no fusermount3 to mount with (install fuse3)"
    return None


def pydxg_mounts(under: str | os.PathLike[str] | None = None) -> list[str]:
    """Mount points of pydxg FUSE nodes in this mount namespace (optionally below ``under``),
    one entry per mount (a path with stacked mounts appears once per layer)."""
    base = os.path.realpath(under) if under is not None else None
    out = []
    with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 3 or fields[2] != FSTYPE:
                continue
            where = _unescape_mount_path(fields[1])
            if base is None or where == base or where.startswith(base.rstrip("/") + "/"):
                out.append(where)
    return out


@dataclass(frozen=True, slots=True)
class _Mount:
    """One line of /proc/self/mountinfo."""

    id: int
    parent: int
    dev: int
    point: str
    fstype: str


def _mountinfo() -> list[_Mount]:
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            try:
                sep = fields.index("-", 6)
                major, minor = (int(x) for x in fields[2].split(":"))
                out.append(_Mount(int(fields[0]), int(fields[1]), os.makedev(major, minor),
                                  _unescape_mount_path(fields[4]), fields[sep + 1]))
            except (ValueError, IndexError):
                continue
    return out


def _top_mount(point: str) -> _Mount | None:
    """The mount on top at ``point`` (the one a path lookup reaches), or None."""
    here = [m for m in _mountinfo() if m.point == point]
    covered = {m.parent for m in here}
    tops = [m for m in here if m.id not in covered]
    return max(tops, key=lambda m: m.id) if tops else None


def _unescape_mount_path(s: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash as octal escapes."""
    if "\\" not in s:
        return s
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and s[i + 1:i + 4].isdigit() and len(s[i + 1:i + 4]) == 3:
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


class _Libc:
    """mount(2) and umount2(2) through ctypes (Python has no wrapper)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._mount = libc.mount
        self._mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                ctypes.c_ulong, ctypes.c_char_p)
        self._mount.restype = ctypes.c_int
        self._umount2 = libc.umount2
        self._umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
        self._umount2.restype = ctypes.c_int

    def mount(self, source: str, target: str, fstype: str, flags: int, data: str) -> None:
        if self._mount(source.encode(), os.fsencode(target), fstype.encode(), flags,
                       data.encode()) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), target)

    def umount2(self, target: str, flags: int) -> None:
        if self._umount2(os.fsencode(target), flags) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), target)


@dataclass(eq=False, slots=True)
class _File:
    """One open file = one driver process (``dxgprocess``): what it creates goes when the file
    is released. ``calls`` are its ioctls in flight, cancelled on release."""

    fh: int
    tgid: int
    uid: int
    name: str
    proc: Any
    calls: TaskSet
    releasing: bool = False


@dataclass(eq=False, slots=True)
class _Call:
    """One IOCTL in flight."""

    unique: int
    tid: int
    code: int
    file: _File
    mem: Any
    task: asyncio.Task[None] | None = None
    replied: bool = False


@dataclass(slots=True)
class _NullMemory:
    """The accessor for a caller we cannot see (outside our PID namespace): every access faults."""

    why: str = "caller is not visible from the node's PID namespace"
    _revoked: bool = field(default=False)

    def read(self, addr: int, size: int) -> bytes:
        raise UserMemoryFault(self.why)

    def write(self, addr: int, data: bytes) -> None:
        raise UserMemoryFault(self.why)

    def take_fd(self, number: int) -> int:
        raise UserMemoryFault(self.why)

    def give_fd_to_user(self, fd: int, addr: int, width: int = 8,
                        in_struct: bool = False) -> None:
        os.close(fd)
        raise UserMemoryFault(self.why)

    def map_block(self, block: int, block_size: int, offset: int, where: int,
                  fd: int | None = None, readonly: bool = False, in_struct: bool = True) -> None:
        if fd is not None:
            os.close(fd)
        raise UserMemoryFault(self.why)

    def alive(self) -> bool:
        return True

    def revoke(self, why: str) -> None:
        self._revoked = True

    def close(self) -> None:
        self._revoked = True


class FuseNode:
    """Serve ``driver`` through the file ``path``, mounted with FUSE, on the driver's loop.

    ``mode``, ``uid`` and ``gid`` are what the file shows (``/dev/dxg`` is ``crw-rw-rw-``
    root:root); with ``default_permissions`` the kernel checks opens against them.
    ``allow_other`` lets users other than the mounting one in at all. A missing ``path`` is
    created (and removed again by :meth:`close`); a directory is refused, and so is any path
    someone else could control (:class:`UnsafeDevicePath`). ``mount`` picks how to mount:
    ``"auto"`` (``mount(2)`` as root, else ``fusermount3``), ``"syscall"`` or ``"fusermount"``.
    ``max_opens`` / ``max_opens_per_uid`` bound the open files (root is exempt from the
    per-user limit). ``syscalls`` is the ``process_vm_*``/pidfd entry point the accessors use
    (tests pass an instrumented one). :meth:`start` and :meth:`close` are called from any
    thread but the loop's.
    """

    def __init__(
        self,
        driver: FuseDriver,
        path: str | os.PathLike[str],
        mode: int = 0o666,
        allow_other: bool = True,
        *,
        uid: int | None = None,
        gid: int | None = None,
        mount: str = "auto",
        fsname: str = "pydxg",
        max_opens: int = 1024,
        max_opens_per_uid: int | None = None,
        probe_timeout: float = 5.0,
        syscalls: Syscalls | None = None,
    ) -> None:
        if mount not in ("auto", "syscall", "fusermount"):
            raise ValueError(f"mount must be 'auto', 'syscall' or 'fusermount', not {mount!r}")
        if max_opens < 1:
            raise ValueError("max_opens must be at least 1")
        if max_opens_per_uid is None:
            max_opens_per_uid = max(1, max_opens // 4)
        if max_opens_per_uid < 1:
            raise ValueError("max_opens_per_uid must be at least 1")
        self.driver = driver
        self.rt: LoopThread = driver.rt
        self.loop = driver.rt.loop
        self._path = Path(os.path.abspath(path))
        self.mode = mode & 0o7777
        self.allow_other = allow_other
        self.uid = os.geteuid() if uid is None else uid
        self.gid = os.getegid() if gid is None else gid
        self.mount_method = mount
        self.fsname = fsname
        self.max_opens = max_opens
        self.max_opens_per_uid = max_opens_per_uid
        self.probe_timeout = probe_timeout
        self._attr = fp.Attr(mode=stat.S_IFREG | self.mode, uid=self.uid, gid=self.gid,
                             time_ns=time.time_ns())
        self._sys = syscalls if syscalls is not None else Syscalls()
        self._libc = _Libc()
        self._fd = -1
        self._target_fd = -1  # the checked file, O_NOFOLLOW, until it is mounted over
        self._created: tuple[int, int] | None = None  # (dev, ino) of a file we created
        self._mounted_by: str | None = None
        self._initialized = threading.Event()
        self._kernel_minor = 0
        self._started = False
        self._closing = False
        self._attached = False
        self._gone = False
        self._buf = bytearray(READ_BUFFER)
        # State below is touched on the loop only.
        self._files: dict[int, _File] = {}
        self._opens = UidCounter(max_opens_per_uid)  # open files per user
        self._calls: dict[int, _Call] = {}
        self._tasks = TaskSet(f"fuse {self._path}")
        self._changed: asyncio.Event | None = None
        self._next_fh = 1
        self.refused = 0
        self._ops: MappingProxyType[int, Callable[[fp.Request], list[bytes] | None]] = \
            MappingProxyType({
                fp.Op.IOCTL: self._ioctl,
                fp.Op.GETATTR: self._getattr,
                fp.Op.OPEN: self._open,
                fp.Op.FLUSH: self._empty,
                fp.Op.RELEASE: self._release,
                fp.Op.INIT: self._init,
                fp.Op.INTERRUPT: self._interrupt,
                fp.Op.FORGET: self._nothing,
                fp.Op.BATCH_FORGET: self._nothing,
                fp.Op.STATFS: self._statfs,
                fp.Op.LOOKUP: self._no_entry,
                # /dev/dxg has no read or write: the kernel answers EINVAL.
                fp.Op.READ: self._einval,
                fp.Op.WRITE: self._einval,
                fp.Op.SETATTR: self._eperm,
                fp.Op.DESTROY: self._destroy,
            })

    # ---- public API ------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def mounted(self) -> bool:
        return self._mounted_by is not None and not self._closing

    @property
    def mounted_by(self) -> str | None:
        """``"syscall"`` or ``"fusermount"`` once mounted."""
        return self._mounted_by

    def __enter__(self) -> FuseNode:
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<FuseNode {str(self._path)!r} mounted={self.mounted}>"

    def start(self, timeout: float = 10.0) -> None:
        """Mount, start serving, and return once the file answers (``stat`` through FUSE).

        Raises :class:`FuseUnavailable` when FUSE cannot be used here, ``IsADirectoryError``
        for a directory at ``path``, :class:`UnsafeDevicePath` for a path someone else could
        control, :class:`~dxg.node.server.NodeBusy` when a live node already serves ``path``,
        and ``TimeoutError`` if the kernel never starts talking. Not on the loop's thread: the
        loop answers the kernel while this waits.
        """
        if self._started:
            raise RuntimeError("FUSE node already started")
        if self.rt.in_loop():
            raise RuntimeError("FuseNode.start() must be called off the driver's loop")
        self._started = True
        reason = fuse_available()
        if reason is not None:
            raise FuseUnavailable(reason)
        try:
            self._prepare_mountpoint()
            self._mount()
            self.rt.call(self._attach)
            if not self._initialized.wait(timeout):
                raise TimeoutError(f"the kernel sent no FUSE INIT for {self._path}")
            self._check_mounted()
        except BaseException:
            self.close()
            raise
        finally:
            self._close_target()
        log.info("FUSE node serving %s (mode %o, %s, kernel FUSE 7.%d)", self._path, self.mode,
                 self._mounted_by, self._kernel_minor)

    def close(self, timeout: float = 10.0) -> None:
        """Unmount (lazily), abort the connection, cancel the calls in flight and close every
        remaining process. Idempotent; any thread but the loop's."""
        if self._closing:
            return
        if self.rt.in_loop() and not self.rt.closed:
            raise RuntimeError("FuseNode.close() must be called off the driver's loop")
        self._closing = True
        if self._mounted_by is not None:
            self._unmount()
        if self._attached and not self.rt.closed:
            try:
                self.rt.run(self._shutdown(timeout), timeout=timeout + 5)
            except (TimeoutError, RuntimeError) as e:
                log.warning("FUSE node %s: shutting down on the loop failed: %s", self._path, e)
        self._close_fuse_fd()
        self._close_target()
        self._remove_created()
        self._mounted_by = None

    def open_files(self) -> int:
        """How many open files (kernel file descriptions) the node is serving."""
        return self._on_loop(lambda: len(self._files))

    def inflight(self) -> int:
        """How many ioctls are in flight (read from the kernel and not answered yet)."""
        return self._on_loop(lambda: len(self._calls))

    def processes(self) -> list[dict[str, Any]]:
        """The processes that have the file open (one per open file, until its RELEASE has
        closed it): pid (thread group), uid, name, calls in flight, the driver's process."""

        def snapshot() -> list[dict[str, Any]]:
            return [{"pid": f.tgid, "uid": f.uid, "name": f.name, "files": 1,
                     "calls": len(f.calls), "process": f.proc}
                    for f in sorted(self._files.values(), key=lambda x: (x.tgid, x.fh))]

        return self._on_loop(snapshot)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no file is open any more (every RELEASE handled and its process closed).
        False on timeout."""
        if self.rt.closed:
            return not self._files
        return bool(self.rt.run(self._wait_idle(timeout)))

    # ---- helpers for callers off the loop ------------------------------------------------------

    def _on_loop(self, fn: Callable[[], Any]) -> Any:
        if self.rt.in_loop() or self.rt.closed:
            return fn()
        return self.rt.call(fn)

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def _wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        if self._changed is None:
            self._changed = asyncio.Event()
        while self._files:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return True

    # ---- the path ----------------------------------------------------------------------------

    def _canonical(self) -> str:
        """The path as the mount table writes it (symbolic links above it resolved)."""
        return os.path.join(os.path.realpath(self._path.parent), self._path.name)

    def _check_path(self) -> None:
        problem = trusted_path_problem(self._path)
        if problem is not None:
            raise UnsafeDevicePath(errno.EPERM, f"refusing to serve a device file at "
                                                f"{self._path}: {problem}")

    def _check_target(self, st: os.stat_result) -> None:
        """What may be covered: a regular file or a character device of this user."""
        path = self._path
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeDevicePath(errno.ELOOP, f"refusing to serve a device file at {path}: "
                                                "it is a symbolic link")
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "the FUSE node must be a file, not a directory",
                                    str(path))
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode)):
            raise UnsafeDevicePath(errno.EPERM, f"refusing to cover {path}: neither a regular "
                                                "file nor a character device")
        if st.st_uid != os.geteuid():
            raise UnsafeDevicePath(errno.EPERM, f"refusing to cover {path}: it belongs to uid "
                                                f"{st.st_uid}, not to this user")

    def _prepare_mountpoint(self) -> None:
        """Check the path, detach dead pydxg mounts at it, and hold the file to mount over
        open (``O_NOFOLLOW``) in ``_target_fd``, creating it if missing."""
        path = self._path
        self._check_path()
        self._detach_dead_layers()
        with contextlib.suppress(FileNotFoundError):
            self._check_target(os.lstat(path))
        try:
            fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            if not path.parent.exists():
                path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                self._check_path()
            # O_EXCL never follows a link: a link planted here now fails with EEXIST.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            st = os.fstat(fd)
            self._created = (st.st_dev, st.st_ino)
            self._target_fd = fd
            return
        try:
            st = os.fstat(fd)
            self._check_target(st)
        except BaseException:
            os.close(fd)
            raise
        if stat.S_ISCHR(st.st_mode):
            log.warning("%s is a character device; the FUSE node covers it until closed", path)
        self._target_fd = fd

    def _close_target(self) -> None:
        if self._target_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._target_fd)
            self._target_fd = -1

    def _remove_created(self) -> None:
        """Remove the file the node created, if it is still that file."""
        created, self._created = self._created, None
        if created is None:
            return
        try:
            st = os.lstat(self._path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) == created:
            with contextlib.suppress(OSError):
                os.unlink(self._path)

    def _detach_dead_layers(self) -> None:
        """Detach every dead pydxg mount at the path, top first; refuse a live one. A node
        killed with SIGKILL leaves its mount behind, and the file's attributes stay cached for a
        minute, so ``stat`` cannot tell: opening the file can (a dead connection answers
        ENOTCONN, a live node opens it)."""
        point = self._canonical()
        for _ in range(MAX_DEAD_LAYERS):
            top = _top_mount(point)
            if top is None or top.fstype != FSTYPE:
                return
            state = self._probe(point)
            if state is None:
                raise NodeBusy(errno.EEXIST, f"another node serves {self._path}")
            if state not in _DEAD_ERRNOS:
                raise NodeBusy(errno.EEXIST, f"a pydxg node is mounted at {self._path} and "
                                             f"cannot be probed: {os.strerror(state)}")
            log.warning("detaching a dead pydxg FUSE mount at %s", self._path)
            self._detach_layer(point)
            if _top_mount(point) == top:
                raise FuseUnavailable(f"cannot detach the dead FUSE mount at {self._path}")
        raise FuseUnavailable(f"more than {MAX_DEAD_LAYERS} dead FUSE mounts at {self._path}")

    def _probe(self, point: str) -> int | None:
        """Open the file on top at ``point``: None when something answers the open, else the
        errno (ETIMEDOUT when nothing answers within ``probe_timeout``: a hung node)."""
        result: list[int | None] = []

        def probe() -> None:
            try:
                os.close(os.open(point, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                                 | os.O_NONBLOCK))
                result.append(None)
            except OSError as e:
                result.append(e.errno or errno.EIO)

        # A hung node would block the open for good: probe on a thread we can give up on.
        t = threading.Thread(target=probe, name=f"dxg-fuse-probe:{self._path.name}",
                             daemon=True)
        t.start()
        t.join(self.probe_timeout)
        return result[0] if result else errno.ETIMEDOUT

    def _detach_layer(self, point: str) -> None:
        if os.geteuid() == 0:
            try:
                self._libc.umount2(point, MNT_DETACH)
                return
            except OSError as e:
                log.warning("umount %s: %s", point, e.strerror)
        with contextlib.suppress(FuseUnavailable, subprocess.TimeoutExpired):
            subprocess.run([self._fusermount(), "-u", "-z", "-q", "--", point],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
                           check=False)

    def _check_mounted(self) -> None:
        """After INIT: the path shows the FUSE file, and the mount table has our mount there."""
        st = os.stat(self._path)
        if st.st_ino != fp.FUSE_ROOT_ID or not stat.S_ISREG(st.st_mode):
            raise FuseUnavailable(f"{self._path} does not show the FUSE file after mounting")
        point = self._canonical()
        if not any(m.dev == st.st_dev and m.point == point and m.fstype == FSTYPE
                   for m in _mountinfo()):
            raise FuseUnavailable(f"the FUSE mount did not land at {self._path}")

    # ---- mounting ----------------------------------------------------------------------------

    def _options(self) -> list[str]:
        opts = ["default_permissions"]
        if self.allow_other:
            opts.append("allow_other")
        return opts

    def _mount(self) -> None:
        method = self.mount_method
        if method == "auto":
            method = "syscall" if os.geteuid() == 0 else "fusermount"
        if method == "syscall":
            try:
                self._mount_syscall()
                self._mounted_by = "syscall"
                return
            except PermissionError as e:
                if self.mount_method == "syscall":
                    raise FuseUnavailable(f"mount(2) of {self._path} refused: {e.strerror}") \
                        from None
                log.info("mount(2) refused (%s); trying fusermount3", e.strerror)
        self._mount_fusermount()
        self._mounted_by = "fusermount"

    def _mount_syscall(self) -> None:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        data = ",".join([f"fd={fd}", f"rootmode={stat.S_IFREG:o}", f"user_id={os.geteuid()}",
                         f"group_id={os.getegid()}", *self._options()])
        # The checked file itself, not whatever the path names by now.
        target = f"/proc/self/fd/{self._target_fd}"
        try:
            try:
                self._libc.mount(self.fsname, target, FSTYPE, MS_NOSUID | MS_NODEV, data)
            except OSError as e:
                if e.errno != errno.ENODEV:
                    raise
                self._libc.mount(self.fsname, target, "fuse", MS_NOSUID | MS_NODEV, data)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _fusermount(self) -> str:
        prog = shutil.which("fusermount3") or shutil.which("fusermount")
        if prog is None:
            raise FuseUnavailable("no fusermount3 to mount with (install the fuse3 package)")
        return prog

    def _mount_fusermount(self) -> None:
        """fusermount3 mounts the path itself (for users other than root it refuses a link and
        mounts on the file it opened); :meth:`_check_mounted` checks where it landed."""
        prog = self._fusermount()
        opts = ",".join(["nosuid", "nodev", f"fsname={self.fsname}", f"subtype={SUBTYPE}",
                         *self._options()])
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
            try:
                proc = subprocess.run(
                    [prog, "-o", opts, "--", str(self._path)], env=env,
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                    capture_output=True, timeout=30, check=False,
                )
            except subprocess.TimeoutExpired:
                raise FuseUnavailable(f"{prog} did not finish mounting {self._path}") from None
            theirs.close()
            if proc.returncode != 0:
                msg = proc.stderr.decode(errors="replace").strip()
                raise FuseUnavailable(f"{prog} could not mount {self._path}: {msg}")
            self._mounted_by = "fusermount"  # mounted: close() must unmount, whatever follows
            ours.settimeout(5.0)
            try:
                _msg, fds, _flags, _addr = socket.recv_fds(ours, 16, 4)
            except OSError as e:
                raise FuseUnavailable(f"{prog} sent no /dev/fuse descriptor: {e}") from None
            if not fds:
                raise FuseUnavailable(f"{prog} sent no /dev/fuse descriptor")
            for extra in fds[1:]:
                os.close(extra)
            os.set_inheritable(fds[0], False)
            self._fd = fds[0]
        finally:
            ours.close()
            theirs.close()

    def _unmount(self) -> None:
        path = str(self._path)
        if self._mounted_by == "fusermount":
            try:
                prog = self._fusermount()
                proc = subprocess.run([prog, "-u", "-z", "-q", "--", path],
                                      stdin=subprocess.DEVNULL, capture_output=True,
                                      timeout=30, check=False)
                if proc.returncode == 0:
                    return
                log.warning("%s -u %s: %s", prog, path, proc.stderr.decode(errors="replace"))
            except (FuseUnavailable, subprocess.TimeoutExpired) as e:
                log.warning("cannot unmount %s with fusermount3: %s", path, e)
        try:
            self._libc.umount2(path, MNT_DETACH)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOENT):
                log.warning("umount %s: %s", path, e.strerror)

    def _close_fuse_fd(self) -> None:
        """Closing the last /dev/fuse descriptor aborts the connection: files still open (a
        lazy unmount keeps them working) now fail with ENOTCONN."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)

    # ---- on the loop: the reader -------------------------------------------------------------

    def _attach(self) -> None:
        os.set_blocking(self._fd, False)
        self.loop.add_reader(self._fd, self._readable)
        self._attached = True

    def _detach_reader(self) -> None:
        if self._attached and self._fd >= 0:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(self._fd)
        self._attached = False

    def _readable(self) -> None:
        """Read and handle what the kernel has for us (at most READ_BATCH requests a turn)."""
        buf = self._buf
        for _ in range(READ_BATCH):
            if self._fd < 0 or self._gone:
                return
            try:
                n = os.readv(self._fd, [buf])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno == errno.ENOENT:
                    continue  # the request was interrupted before we could read it
                if e.errno != errno.ENODEV:
                    log.error("FUSE node %s: reading /dev/fuse failed: %s", self._path, e)
                # ENODEV: unmounted and every file closed, or aborted: the connection is over.
                self._connection_over()
                return
            self._handle(memoryview(buf)[:n])

    def _connection_over(self) -> None:
        """The kernel has finished every request: no call may touch its caller any more."""
        self._gone = True
        self._detach_reader()
        for call in list(self._calls.values()):
            call.replied = True
            call.mem.revoke("the FUSE connection is over")
            if call.task is not None:
                call.task.cancel()

    def _send(self, reply: list[bytes]) -> None:
        if self._fd < 0:
            return
        try:
            os.writev(self._fd, reply)
        except OSError as e:
            # ENOENT: the request was interrupted and already answered, or aborted.
            if e.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):
                log.error("FUSE node %s: reply rejected: %s", self._path, e)

    def _handle(self, raw: memoryview) -> None:
        try:
            req = fp.parse(raw)
        except fp.ProtocolViolation as e:
            log.error("FUSE node %s: %s", self._path, e)
            return
        op = self._ops.get(req.opcode)
        try:
            reply = op(req) if op is not None else fp.error_reply(req.unique, errno.ENOSYS)
        except fp.ProtocolViolation as e:
            log.error("FUSE node %s: %s", self._path, e)
            reply = fp.error_reply(req.unique, errno.EIO)
        except Exception:
            log.exception("FUSE node %s: opcode %d failed", self._path, req.opcode)
            reply = fp.error_reply(req.unique, errno.EIO)
        if reply is not None:
            self._send(reply)

    # ---- quick requests, answered inline -------------------------------------------------------

    def _nothing(self, req: fp.Request) -> None:
        return None

    def _empty(self, req: fp.Request) -> list[bytes]:
        return fp.empty_reply(req.unique)

    def _getattr(self, req: fp.Request) -> list[bytes]:
        return fp.attr_reply(req.unique, self._attr, ATTR_VALID_S)

    def _statfs(self, req: fp.Request) -> list[bytes]:
        return fp.statfs_reply(req.unique)

    def _no_entry(self, req: fp.Request) -> list[bytes]:
        return fp.error_reply(req.unique, errno.ENOENT)

    def _einval(self, req: fp.Request) -> list[bytes]:
        return fp.error_reply(req.unique, errno.EINVAL)

    def _eperm(self, req: fp.Request) -> list[bytes]:
        return fp.error_reply(req.unique, errno.EPERM)

    def _destroy(self, req: fp.Request) -> list[bytes]:
        self._gone = True
        return fp.empty_reply(req.unique)

    def _init(self, req: fp.Request) -> list[bytes]:
        kernel = fp.parse_init(req)
        if kernel.major < fp.FUSE_KERNEL_VERSION:
            log.error("kernel speaks FUSE %d.%d; need 7.x", kernel.major, kernel.minor)
            return fp.error_reply(req.unique, errno.EPROTO)
        reply = fp.init_reply(req.unique, kernel, flags=0, max_write=MAX_WRITE)
        if kernel.major == fp.FUSE_KERNEL_VERSION:
            self._kernel_minor = kernel.minor
            self._initialized.set()
        return reply

    def _admit(self, uid: int) -> str | None:
        """Why an open by ``uid`` is refused, or None."""
        if len(self._files) >= self.max_opens:
            return f"the device file is full ({self.max_opens} open files)"
        if not self._opens.fits(uid):
            return (f"uid {uid} already holds {self._opens.held(uid)} open files, the most one "
                    "user may")
        return None

    def _open(self, req: fp.Request) -> list[bytes]:
        if self._closing:
            return fp.error_reply(req.unique, errno.ENODEV)
        ident = task_identity(req.pid)
        if ident is None:
            log.warning("open of %s by an unknown task (pid %d) refused", self._path, req.pid)
            return fp.error_reply(req.unique, errno.EPERM)
        tgid, name = ident
        if tgid != req.pid:
            name = process_name(tgid) or name
        refusal = self._admit(req.uid)
        if refusal is not None:
            self.refused += 1
            log.info("open of %s by pid %d (%s) uid %d refused: %s", self._path, tgid, name,
                     req.uid, refusal)
            return fp.error_reply(req.unique, errno.EMFILE)
        fp.parse_open(req)
        try:
            # (the caller's groups: its request's gid, then its supplementary groups, read
            # while it waits in open())
            proc = self.driver.open_process(tgid, req.uid, name,
                                            process_groups(tgid, req.gid))
        except Exception:
            log.exception("open_process for pid %d failed", tgid)
            return fp.error_reply(req.unique, errno.EIO)
        fh = self._next_fh
        self._next_fh += 1
        self._files[fh] = _File(fh, tgid, req.uid, name, proc, TaskSet(f"pid {tgid} fh {fh}"))
        self._opens.add(req.uid)
        log.debug("open of %s by pid %d (%s), fh %d", self._path, tgid, name, fh)
        return fp.open_reply(req.unique, fh, OPEN_FLAGS)

    def _release(self, req: fp.Request) -> list[bytes]:
        """The last descriptor of an open file is gone (close, exit, SIGKILL): cancel its calls
        and close its process. The file counts (and shows in :meth:`processes`) until then."""
        f = self._files.get(fp.parse_fh(req))
        if f is not None and not f.releasing:
            f.releasing = True
            try:
                self._tasks.spawn(self._close_file(f), f"release pid {f.tgid} fh {f.fh}")
            except RuntimeError:
                pass  # closing: _shutdown closes it
        return fp.empty_reply(req.unique)

    async def _close_file(self, f: _File) -> None:
        try:
            await f.calls.cancel_and_wait(timeout=10)
            try:
                await self.driver.close_process(f.proc)
            except Exception:
                log.exception("closing the process of pid %d failed", f.tgid)
        finally:
            self._forget(f)

    def _forget(self, f: _File) -> None:
        if self._files.get(f.fh) is f:
            del self._files[f.fh]
            self._opens.remove(f.uid)
        self._notify()

    # ---- ioctls ----------------------------------------------------------------------------

    def _ioctl(self, req: fp.Request) -> list[bytes] | None:
        """Pin the caller before anything else, then run the call as a task of its file."""
        io = fp.parse_ioctl(req)
        mem: PinnedProcessMemory | _NullMemory
        if req.pid > 0:
            try:
                mem = PinnedProcessMemory.pin(req.pid, self._sys)
            except OSError as e:
                log.info("ioctl 0x%08x: cannot pin the calling thread %d: %s", io.cmd, req.pid,
                         e)
                return fp.ioctl_reply(req.unique, -(e.errno or errno.ESRCH))
            tgid = mem.tgid
        else:
            mem, tgid = _NullMemory(), -1
        f = self._files.get(io.fh)
        if f is None or f.releasing:
            mem.close()
            return fp.ioctl_reply(req.unique, -errno.EBADF)
        call = _Call(req.unique, req.pid, io.cmd, f, mem)
        try:
            call.task = f.calls.spawn(
                self._run_ioctl(call, bytes(io.data), io.out_size, tgid),
                f"ioctl 0x{io.cmd:08x} pid {tgid}")
        except RuntimeError:
            mem.close()
            return fp.ioctl_reply(req.unique, -errno.EBADF)
        self._calls[req.unique] = call
        # Cleanup in a callback: a task cancelled before its first step never runs its body.
        call.task.add_done_callback(lambda _t: self._call_done(call))
        return None

    def _call_done(self, call: _Call) -> None:
        if self._calls.get(call.unique) is call:
            del self._calls[call.unique]
        self._answer(call, fp.error_reply(call.unique, errno.EINTR))  # if nothing was sent
        call.mem.close()

    async def _run_ioctl(self, call: _Call, arg: bytes, out_size: int, tgid: int) -> None:
        try:
            ret, out = await self.driver.ioctl(call.file.proc, call.code, arg, call.mem,
                                               caller_tgid=tgid)
        except OSError as e:
            # e.g. FrontEndLimit: the call needs what a file cannot do in the caller.
            log.info("ioctl 0x%08x from pid %d: %s", call.code, tgid, e)
            ret, out = -(e.errno or errno.EIO), arg
        except Exception:
            log.exception("ioctl 0x%08x from pid %d failed inside the driver", call.code, tgid)
            ret, out = -errno.EIO, arg
        if not isinstance(ret, int) or not -(1 << 31) <= ret < (1 << 31):
            log.error("ioctl 0x%08x returned %r, which does not fit an int", call.code, ret)
            ret = -errno.EINVAL
        if not isinstance(out, bytes | bytearray):
            log.error("ioctl 0x%08x returned a malformed struct", call.code)
            ret, out = -errno.EIO, arg
        if out_size == 0 or out == arg:
            reply = fp.ioctl_reply(call.unique, ret)
        else:
            reply = fp.ioctl_reply(call.unique, ret, bytes(out[:out_size]))
        self._answer(call, reply)

    def _answer(self, call: _Call, reply: list[bytes]) -> None:
        """Answer once; from this moment the call may not touch its caller any more."""
        if call.replied:
            return
        call.replied = True
        call.mem.revoke("the call was answered")
        self._send(reply)

    def _interrupt(self, req: fp.Request) -> None:
        """The caller of a request still being served got a signal. A dying caller (SIGKILL)
        gets EINTR at once, so it can exit and its file be released; its call is cancelled and
        may not touch it (or its pid's next owner) again. Other signals let the call finish,
        as the driver's paths that are not interruptible in the kernel."""
        call = self._calls.get(fp.parse_interrupt(req))
        if call is None or call.replied:
            return None
        if call.mem.alive() and not _fatal_signal_pending(call.tid):
            return None
        log.info("ioctl 0x%08x: caller %d is dying; answered EINTR", call.code, call.tid)
        call.replied = True
        call.mem.revoke("the caller was interrupted by a fatal signal")
        self._send(fp.error_reply(call.unique, errno.EINTR))
        if call.task is not None:
            call.task.cancel()
        return None

    # ---- shutting down (on the loop) -----------------------------------------------------------

    async def _shutdown(self, timeout: float) -> None:
        self._detach_reader()
        for call in list(self._calls.values()):
            call.replied = True
            call.mem.revoke("the node is closing")
        self._close_fuse_fd()  # aborts the connection: every caller still waiting gets ENOTCONN
        files = [f for f in self._files.values() if not f.releasing]
        for f in files:
            f.releasing = True
            f.calls.cancel()
        for f in files:
            await f.calls.cancel_and_wait(timeout=timeout)
            try:
                await self.driver.close_process(f.proc)
            except Exception:
                log.exception("closing the process of pid %d failed", f.tgid)
            self._forget(f)
        await self._tasks.wait(timeout=timeout)  # releases already under way finish theirs
        await self._tasks.cancel_and_wait(timeout=1)


def _fatal_signal_pending(tid: int) -> bool:
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith((b"SigPnd:", b"ShdPnd:")) \
                        and int(line.split()[1], 16) & SIGKILL_BIT:
                    return True
    except (OSError, ValueError, IndexError):
        return True  # the thread is gone
    return False


def main(argv: list[str] | None = None) -> int:
    """``python -m dxg.node.fuse ioctl-table``: print docs/libdxg.md's supported-ioctl table."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if args != ["ioctl-table"]:
        print("usage: python -m dxg.node.fuse ioctl-table", file=sys.stderr)
        return 2
    sys.stdout.write(render_libdxg_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
