"""The FUSE front end: a file that unmodified programs open and drive like ``/dev/dxg``.

:class:`FuseNode` mounts a one-file FUSE filesystem *over a regular file* (the kernel allows a
file mount point when the root is a file, ``rootmode=0100000``), so the path itself is the
device: ``open(path, O_RDONLY | O_CLOEXEC)`` then ``ioctl(fd, LX_DXENUMADAPTERS3, &args)`` with
the real codes and struct layouts. It speaks the kernel's FUSE protocol on ``/dev/fuse`` itself
(:mod:`dxg.node.fuse_proto`; no libfuse), with a pool of reader threads.

How a call travels: the kernel copies the top-level struct in (``_IOC_SIZE`` bytes, as the
code's direction bits say: FUSE's "restricted" ioctls), we hand it to the same dispatcher the
socket node uses (``driver.ioctl``), and the kernel copies the struct the driver returns back
out. Pointers inside the struct are followed into the caller with ``process_vm_readv`` /
``process_vm_writev`` (:class:`dxg.node.procmem.ProcessVmUserMemory`), the driver's
copy-from-user / copy-to-user accessor. The return value is the driver's: 0, a positive
NTSTATUS, or ``-errno`` (``ioctl()`` then returns -1 with ``errno`` set).

Processes, as in the kernel (``dxgk_open`` / ``dxgk_release``): an open from a thread group
that has no driver process yet creates one; further opens from the same process share it
(refcounted); the last release of its files, including the kernel closing them when the process
dies, tears down everything it created. A FUSE request carries the calling *thread*'s id; the
node maps it to its thread group, and a caller from another thread group than the file's (a
forked child using its parent's descriptor) gets ``-ENOTTY`` from the driver, as from the real
one. The child opens the file again and gets its own process.

Mounting: as root with ``mount(2)`` directly (``fuse.pydxg``, ``nosuid,nodev``,
``default_permissions`` so the kernel enforces ``mode``, ``allow_other`` so every user reaches
it); otherwise through ``fusermount3`` and its ``_FUSE_COMMFD`` descriptor-passing protocol
(``allow_other`` then needs ``user_allow_other`` in ``/etc/fuse.conf``). :meth:`FuseNode.close`
detaches the mount lazily (``MNT_DETACH`` / ``fusermount3 -u -z``), stops the threads, aborts the
connection, closes every remaining process and removes the file if the node created it.

What a file cannot do: install a new file descriptor in the caller or map memory into it (the
kernel driver does both in the caller's context). Those ioctls are answered with an error
status, never a hang; see :data:`FILE_LIMITS` and ``docs/libdxg.md``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import select
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from dxg.node import fuse_proto as fp
from dxg.node.procmem import ProcessVmUserMemory, Syscalls, task_identity

__all__ = [
    "FILE_LIMITS",
    "FuseNode",
    "FuseUnavailable",
    "IoctlSupport",
    "fuse_available",
    "ioctl_support",
    "pydxg_mounts",
    "render_ioctl_table",
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

# Like a character device: no page cache (and so no shared mmap: -ENODEV), no seeking, and no
# FLUSH round trip on every close(); /dev/dxg has no flush either.
OPEN_FLAGS = fp.FOPEN_DIRECT_IO | fp.FOPEN_NONSEEKABLE | fp.FOPEN_NOFLUSH

# ioctls whose full semantics need something a file-based node cannot do in the caller.
FILE_LIMITS: MappingProxyType[int, str] = MappingProxyType({
    0x07: "the paging-queue fence page cannot be mapped into the caller",
    0x10: "monitored-fence pages cannot be mapped into the caller",
    0x18: "the hardware-queue progress fence page cannot be mapped into the caller",
    0x25: "Lock2 cannot map allocation memory into the caller",
    0x3F: "ShareObjects cannot install the new file descriptor in the caller",
    0x40: "the shared fence page cannot be mapped into the caller",
    0x45: "CreateSyncFile cannot install the new file descriptor in the caller",
})


class FuseUnavailable(RuntimeError):
    """FUSE cannot be used here: no ``/dev/fuse``, or mounting is not permitted."""


class FuseDriver(Protocol):
    """What the node needs from the driver (``dxg.guest.driver.GuestDriver`` is one)."""

    def open_process(self, pid: int, uid: int, name: str) -> Any: ...

    def close_process(self, proc: Any) -> None: ...

    def ioctl(self, proc: Any, code: int, arg: bytes, mem: Any,
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
    """Mount points of pydxg FUSE nodes in this mount namespace (optionally below ``under``)."""
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


class _Process:
    """The driver process behind one open file (``dxgprocess``): what it creates goes when the
    file is closed. A thread group that opens twice gets two, as two node connections would."""

    __slots__ = ("files", "proc", "tgid")

    def __init__(self, tgid: int, proc: Any) -> None:
        self.tgid = tgid
        self.proc = proc
        self.files = 0


@dataclass(slots=True)
class _File:
    fh: int
    owner: _Process
    opener_tid: int
    flags: int


@dataclass(slots=True)
class _Call:
    tid: int
    replied: bool = False


class _NullMemory:
    """The accessor for a caller we cannot see (outside our PID namespace): every access faults."""

    def read(self, addr: int, size: int) -> bytes:
        from dxg.guest.usermem import UserMemoryFault

        raise UserMemoryFault("caller is not visible from the node's PID namespace")

    def write(self, addr: int, data: bytes) -> None:
        from dxg.guest.usermem import UserMemoryFault

        raise UserMemoryFault("caller is not visible from the node's PID namespace")


class FuseNode:
    """Serve ``driver`` through the file ``path``, mounted with FUSE.

    ``mode``, ``uid`` and ``gid`` are what the file shows (``/dev/dxg`` is ``crw-rw-rw-``
    root:root); with ``default_permissions`` the kernel checks opens against them.
    ``allow_other`` lets users other than the mounting one in at all. A missing ``path`` is
    created (and removed again by :meth:`close`); a directory is refused. ``mount`` picks how
    to mount: ``"auto"`` (``mount(2)`` as root, else ``fusermount3``), ``"syscall"`` or
    ``"fusermount"``. ``threads`` reader threads start; more are added (up to ``max_threads``)
    while all of them are busy inside the driver.
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
        threads: int = 2,
        max_threads: int = 64,
        fsname: str = "pydxg",
    ) -> None:
        if mount not in ("auto", "syscall", "fusermount"):
            raise ValueError(f"mount must be 'auto', 'syscall' or 'fusermount', not {mount!r}")
        if threads < 1 or max_threads < threads:
            raise ValueError("need 1 <= threads <= max_threads")
        self.driver = driver
        self._path = Path(os.path.abspath(path))
        self.mode = mode & 0o7777
        self.allow_other = allow_other
        self.uid = os.geteuid() if uid is None else uid
        self.gid = os.getegid() if gid is None else gid
        self.mount_method = mount
        self.min_threads = threads
        self.max_threads = max_threads
        self.fsname = fsname
        self._attr = fp.Attr(mode=stat.S_IFREG | self.mode, uid=self.uid, gid=self.gid,
                             time_ns=time.time_ns())
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._read_lock = threading.Lock()
        self._sys = Syscalls()
        self._libc = _Libc()
        self._fd = -1
        self._wake_r = self._wake_w = -1
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._files: dict[int, _File] = {}
        self._procs: dict[int, _Process] = {}  # fh -> the driver process of that open file
        self._inflight: dict[int, _Call] = {}
        self._next_fh = 1
        self._created_file = False
        self._mounted_by: str | None = None
        self._initialized = threading.Event()
        self._kernel_minor = 0
        self._started = False
        self._closing = False
        self._gone = False

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
        return (f"<FuseNode {str(self._path)!r} mounted={self.mounted} "
                f"files={len(self._files)} processes={len(self._procs)}>")

    def start(self, timeout: float = 10.0) -> None:
        """Mount, start serving, and return once the file answers (``stat`` through FUSE).

        Raises :class:`FuseUnavailable` when FUSE cannot be used here, ``IsADirectoryError``
        for a directory at ``path``, and ``TimeoutError`` if the kernel never starts talking.
        """
        if self._started:
            raise RuntimeError("FUSE node already started")
        self._started = True
        reason = fuse_available()
        if reason is not None:
            raise FuseUnavailable(reason)
        try:
            self._prepare_mountpoint()
            self._mount()
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            os.set_blocking(self._fd, False)
            for _ in range(self.min_threads):
                self._spawn()
            if not self._initialized.wait(timeout):
                raise TimeoutError(f"the kernel sent no FUSE INIT for {self._path}")
            st = os.stat(self._path)
            if st.st_ino != fp.FUSE_ROOT_ID or not stat.S_ISREG(st.st_mode):
                raise FuseUnavailable(f"{self._path} does not show the FUSE file after mounting")
        except BaseException:
            self.close()
            raise
        log.info("FUSE node serving %s (mode %o, %s, kernel FUSE 7.%d)", self._path, self.mode,
                 self._mounted_by, self._kernel_minor)

    def close(self, timeout: float = 5.0) -> None:
        """Unmount (lazily), stop the threads, close every remaining process. Idempotent."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        if self._mounted_by is not None:
            self._unmount()
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
        deadline = time.monotonic() + timeout
        for t in list(self._threads):
            if t is not threading.current_thread():
                t.join(max(deadline - time.monotonic(), 0.0))
        stuck = [t.name for t in self._threads if t.is_alive()]
        if stuck:
            log.warning("FUSE node %s: threads still inside the driver: %s", self._path, stuck)
        if self._fd >= 0:
            # Closing the last /dev/fuse descriptor aborts the connection: files still open
            # (a lazy unmount keeps them working) now fail with ENOTCONN.
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1
        with self._lock:
            leftovers = list(self._procs.values())
            self._procs.clear()
            self._files.clear()
            self._changed.notify_all()
        for p in leftovers:
            self._close_process(p)
        if self._created_file:
            with contextlib.suppress(OSError):
                os.unlink(self._path)
            self._created_file = False
        self._mounted_by = None

    def open_files(self) -> int:
        """How many open files (kernel file descriptions) the node is serving."""
        with self._lock:
            return len(self._files)

    def processes(self) -> list[dict[str, Any]]:
        """The processes that have the file open: pid (thread group), open files."""
        with self._lock:
            return [{"pid": p.tgid, "files": p.files, "process": p.proc}
                    for p in sorted(self._procs.values(), key=lambda x: x.tgid)]

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no file is open any more (every RELEASE handled). False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._files or self._procs:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    # ---- mounting ----------------------------------------------------------------------------

    def _prepare_mountpoint(self) -> None:
        path = self._path
        try:
            st = os.stat(path)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.close(fd)
            self._created_file = True
            return
        except OSError as e:
            if e.errno != errno.ENOTCONN:
                raise
            # A node that died without unmounting left a dead FUSE mount here: detach it.
            log.warning("detaching a dead FUSE mount at %s", path)
            self._detach(str(path))
            st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "the FUSE node must be a file, not a directory",
                                    str(path))
        if stat.S_ISCHR(st.st_mode):
            log.warning("%s is a character device; the FUSE node covers it until closed", path)

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
        try:
            try:
                self._libc.mount(self.fsname, str(self._path), FSTYPE, MS_NOSUID | MS_NODEV,
                                 data)
            except OSError as e:
                if e.errno != errno.ENODEV:
                    raise
                self._libc.mount(self.fsname, str(self._path), "fuse", MS_NOSUID | MS_NODEV,
                                 data)
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
        self._detach(path)

    def _detach(self, path: str) -> None:
        try:
            self._libc.umount2(path, MNT_DETACH)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOENT):
                log.warning("umount %s: %s", path, e.strerror)

    # ---- the reader threads -----------------------------------------------------------------

    def _spawn(self) -> None:
        """One more reader thread, unless there are ``max_threads`` already."""
        with self._lock:
            if len(self._threads) >= self.max_threads or self._closing:
                return
            t = threading.Thread(target=self._serve, daemon=True,
                                 name=f"dxg-fuse:{self._path.name}:{len(self._threads)}")
            self._threads.append(t)
            self._idle += 1
        t.start()

    def _serve(self) -> None:
        buf = bytearray(READ_BUFFER)
        view = memoryview(buf)
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while True:
                with self._read_lock:
                    n = self._read(buf, poller)
                if n is None:
                    return
                with self._lock:
                    self._idle -= 1
                    spawn = self._idle == 0
                if spawn:  # nobody is left waiting for the next request
                    self._spawn()
                try:
                    self._handle(view[:n])
                finally:
                    with self._lock:
                        self._idle += 1
        except Exception:
            log.exception("FUSE node %s: reader thread failed", self._path)
        finally:
            with self._lock:
                self._idle -= 1

    def _read(self, buf: bytearray, poller: select.poll) -> int | None:
        """The next request (its length in ``buf``), or None when the node stops."""
        while not self._closing and not self._gone:
            try:
                return os.readv(self._fd, [buf])
            except BlockingIOError:
                pass
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.ENOENT:
                    continue  # the request was interrupted before we could read it
                if e.errno == errno.ENODEV:
                    self._gone = True  # unmounted and every file closed: the connection is over
                    return None
                raise
            poller.poll()
        return None

    def _send(self, reply: list[bytes]) -> None:
        try:
            os.writev(self._fd, reply)
        except OSError as e:
            # ENOENT: the request was interrupted and already answered, or aborted.
            if e.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):
                log.error("FUSE node %s: reply rejected: %s", self._path, e)

    # ---- requests ----------------------------------------------------------------------------

    def _handle(self, raw: memoryview) -> None:
        try:
            req = fp.parse(raw)
        except fp.ProtocolViolation as e:
            log.error("FUSE node %s: %s", self._path, e)
            return
        op = req.opcode
        try:
            if op == fp.Op.IOCTL:
                reply = self._ioctl(req)
            elif op == fp.Op.GETATTR:
                reply = fp.attr_reply(req.unique, self._attr, ATTR_VALID_S)
            elif op == fp.Op.OPEN:
                reply = self._open(req)
            elif op == fp.Op.FLUSH:
                reply = fp.empty_reply(req.unique)
            elif op == fp.Op.RELEASE:
                reply = self._release(req)
            elif op == fp.Op.INIT:
                reply = self._init(req)
            elif op == fp.Op.INTERRUPT:
                reply = self._interrupt(req)
            elif op in (fp.Op.FORGET, fp.Op.BATCH_FORGET):
                reply = None
            elif op == fp.Op.STATFS:
                reply = fp.statfs_reply(req.unique)
            elif op == fp.Op.LOOKUP:
                reply = fp.error_reply(req.unique, errno.ENOENT)
            elif op in (fp.Op.READ, fp.Op.WRITE):
                # /dev/dxg has no read or write: the kernel answers EINVAL.
                reply = fp.error_reply(req.unique, errno.EINVAL)
            elif op == fp.Op.SETATTR:
                reply = fp.error_reply(req.unique, errno.EPERM)
            elif op == fp.Op.DESTROY:
                self._gone = True
                reply = fp.empty_reply(req.unique)
            else:
                reply = fp.error_reply(req.unique, errno.ENOSYS)
        except fp.ProtocolViolation as e:
            log.error("FUSE node %s: %s", self._path, e)
            reply = fp.error_reply(req.unique, errno.EIO)
        except Exception:
            log.exception("FUSE node %s: opcode %d failed", self._path, op)
            reply = fp.error_reply(req.unique, errno.EIO)
        if reply is not None:
            self._send(reply)

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

    def _open(self, req: fp.Request) -> list[bytes]:
        ident = task_identity(req.pid)
        if ident is None:
            log.warning("open of %s by an unknown task (pid %d) refused", self._path, req.pid)
            return fp.error_reply(req.unique, errno.EPERM)
        tgid, name = ident
        flags = fp.parse_open(req)
        if tgid != req.pid:
            name = _comm(tgid) or name
        with self._lock:
            if self._closing:
                return fp.error_reply(req.unique, errno.ENODEV)
            # Each open file is one process's handle on the driver (as each node connection
            # is): what it creates goes when it is closed.
            owner = _Process(tgid, self.driver.open_process(tgid, req.uid, name))
            owner.files = 1
            fh = self._next_fh
            self._next_fh += 1
            self._files[fh] = _File(fh, owner, req.pid, flags)
            self._procs[fh] = owner
        log.debug("open of %s by pid %d (%s), fh %d", self._path, tgid, name, fh)
        return fp.open_reply(req.unique, fh, OPEN_FLAGS)

    def _release(self, req: fp.Request) -> list[bytes]:
        fh = fp.parse_fh(req)
        done: _Process | None = None
        with self._lock:
            if self._files.pop(fh, None) is not None:
                done = self._procs.pop(fh, None)
        if done is not None:
            self._close_process(done)
        with self._lock:
            self._changed.notify_all()
        return fp.empty_reply(req.unique)

    def _close_process(self, p: _Process) -> None:
        try:
            self.driver.close_process(p.proc)
        except Exception:
            log.exception("closing the process of pid %d failed", p.tgid)

    def _caller_tgid(self, tid: int, owner_tgid: int) -> int:
        """The thread group of calling thread ``tid``; -1 when it cannot be known."""
        if tid == owner_tgid:
            return tid
        if tid <= 0:
            return -1
        if os.path.exists(f"/proc/{owner_tgid}/task/{tid}"):
            return owner_tgid
        ident = task_identity(tid)
        return -1 if ident is None else ident[0]

    def _ioctl(self, req: fp.Request) -> list[bytes] | None:
        io = fp.parse_ioctl(req)
        f = self._files.get(io.fh)
        if f is None:
            return fp.ioctl_reply(req.unique, -errno.EBADF)
        proc = f.owner.proc
        tgid = self._caller_tgid(req.pid, f.owner.tgid)
        mem: Any = ProcessVmUserMemory(req.pid, self._sys) if req.pid > 0 else _NullMemory()
        arg = bytes(io.data)
        call = _Call(req.pid)
        self._inflight[req.unique] = call
        try:
            ret, out = self.driver.ioctl(proc, io.cmd, arg, mem, caller_tgid=tgid)
        except OSError as e:
            # e.g. FrontEndLimit: the call needs what a file cannot do in the caller.
            log.info("ioctl 0x%08x from pid %d: %s", io.cmd, tgid, e)
            ret, out = -(e.errno or errno.EIO), arg
        except Exception:
            log.exception("ioctl 0x%08x from pid %d failed inside the driver", io.cmd, tgid)
            ret, out = -errno.EIO, arg
        finally:
            self._inflight.pop(req.unique, None)
        if call.replied:
            return None
        if not -(1 << 31) <= ret < (1 << 31):
            log.error("ioctl 0x%08x returned %d, which does not fit an int", io.cmd, ret)
            ret = -errno.EINVAL
        if io.out_size == 0 or out == arg:
            return fp.ioctl_reply(req.unique, ret)
        return fp.ioctl_reply(req.unique, ret, out[:io.out_size])

    def _interrupt(self, req: fp.Request) -> None:
        """The caller of a request still being served got a signal. A dying caller (SIGKILL)
        gets EINTR at once, so it can exit and its files be released (which fails its
        pending driver call); other signals let the call finish, as the driver's paths that
        are not interruptible in the kernel."""
        target = fp.parse_interrupt(req)
        call = self._inflight.get(target)
        if call is None or call.replied or not _fatal_signal_pending(call.tid):
            return None
        call.replied = True
        self._send(fp.error_reply(target, errno.EINTR))
        return None


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read(64).decode(errors="replace").strip()
    except OSError:
        return ""


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


# ---- the list of supported ioctls (docs/libdxg.md is generated from it) ----------------------


@dataclass(frozen=True, slots=True)
class IoctlSupport:
    nr: int
    name: str
    code: int
    struct: str
    size: int
    implemented: bool
    note: str


def ioctl_support() -> list[IoctlSupport]:
    """Every ioctl of the ABI (``dxg.uapi.IOCTLS``) with whether the driver implements it
    (``dxg.guest.ioctl.HANDLERS``) and what the file cannot do for it (:data:`FILE_LIMITS`)."""
    from dxg.guest.ioctl import HANDLERS
    from dxg.uapi.ioctls import IOCTLS

    out = []
    for nr in sorted(IOCTLS):
        d = IOCTLS[nr]
        if not d.handled:
            note = "no handler in the real driver either: -ENOTTY"
        elif nr in HANDLERS:
            note = FILE_LIMITS.get(nr, "")
        else:
            note = "not implemented yet: -ENOTTY"
            if nr in FILE_LIMITS:
                note += f"; once it is, {FILE_LIMITS[nr]}"
        out.append(IoctlSupport(nr, d.name, d.code, d.struct.__name__, d.size,
                                d.handled and nr in HANDLERS, note))
    return out


def render_ioctl_table(rows: Iterable[IoctlSupport] | None = None) -> str:
    """The Markdown table of ``docs/libdxg.md`` (between its ``ioctl-table`` markers)."""
    rows = list(rows) if rows is not None else ioctl_support()
    lines = [
        "| nr | ioctl | code | struct (bytes) | through the file | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| 0x{r.nr:02x} | `{r.name}` | `0x{r.code:08x}` | `{r.struct}` ({r.size}) "
                     f"| {'yes' if r.implemented else 'no'} | {r.note} |")
    done = sum(r.implemented for r in rows)
    lines.append("")
    lines.append(f"{done} of {len(rows)} ioctls are implemented.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m dxg.node.fuse ioctl-table``: print the supported-ioctl table."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if args != ["ioctl-table"]:
        print("usage: python -m dxg.node.fuse ioctl-table", file=sys.stderr)
        return 2
    sys.stdout.write(render_ioctl_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
