"""Share descriptors and sync files as the guest keeps them (docs/sharing.md).

Both are descriptors the driver makes and hands to a process (beside the reply of ShareObjects
or CreateSyncFile); any process that gets a copy (SCM_RIGHTS, inheritance) can hand it back with
a call. Both are pipes whose other end the guest keeps. A descriptor handed back is recognized by
what ``/proc/self/fd`` names it, ``pipe:[inode]`` (`dxg.oslib.fds.fd_kind`): that reads the
dentry cache only, so a file on a FUSE mount (the node's own /dev/dxg, served by this very
loop) cannot make the lookup block, as fstat would; anything that is not a pipe is refused at
once. A pipe's inode lives while the guest keeps its end, so it names one entry only.

- A *share descriptor* (`ShareFd`, one per ShareObjects call) is the write end of a pipe whose
  read end the guest keeps and watches: end of file there means every copy of the write end is
  closed, in every process. Writing to it changes nothing (the guest drains and drops what comes)
  and it cannot be made to look closed while a copy is open. It holds one host reference on the
  shared object (CREATENTSHAREDOBJECT), given back (DESTROYNTSHAREDOBJECT) when it ends, and the
  access ShareObjects granted (write or read-only).
- A *sync file* (`SyncFile`, CreateSyncFile) is the read end of a pipe; the guest keeps the write
  end (mode 0: nobody but root can reopen the pipe through /proc). It stays empty until the
  fence reaches the value or the wait fails; then the guest fills it with `STATUS_BYTES` bytes of
  the outcome (`REACHED`, b"\x01"; any other byte: the wait failed) and keeps it filled: a holder
  that reads them all out gets them back at once. So it is readable (poll, select, epoll) for
  good, a reader learns the outcome from one byte, and no holder can make it readable early (a
  pipe cannot be shut down, and only the guest holds a write end). The guest's end reports an
  error once every copy of the read end is closed. The wait on a shared fence is held by the sync
  file's own host reference (PYDXG_WAITSHAREDSYNC), so the process that made it may exit; on a
  fence that is not shared it is that process's (the fence goes with it: the wait fails).

Both are bounded: ``max_files`` in all (`file_limit`: 65,536, or a quarter of the daemon's
descriptor limit when that is lower: each costs the guest one descriptor) and ``max_per_uid``
per user (-EMFILE past either), since they outlive the processes that made them. A call that
uses an entry across an await pins it (`pin`/`unpin`): closing the last copy meanwhile gives its
host reference back only once the call is done. Everything here runs on the driver's event loop.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import resource
import select
import termios
from typing import TYPE_CHECKING

from dxg.guest import vmbus
from dxg.guest.errors import IoctlError
from dxg.oslib.fds import close_all, fd_kind
from dxg.protocol import messages as m
from dxg.protocol.commands import GlobalCommand
from dxg.uapi.ntstatus import NTSTATUS

if TYPE_CHECKING:
    from dxg.guest.adapter import GuestAdapter
    from dxg.guest.hostlink import HostLink
    from dxg.guest.syncobject import HostEvent

__all__ = ["MAX_FILES", "MAX_FILES_PER_UID", "REACHED", "STATUS_BYTES", "FileKey", "ShareFd",
           "Shares", "SyncFile", "file_limit"]

log = logging.getLogger(__name__)

FileKey = tuple[str, int]  # ("pipe", inode)
MAX_FILES = 1 << 16  # share descriptors and sync files the guest keeps, in all (at most)
MAX_FILES_PER_UID = 1 << 12  # ... and of one user
_DRAIN = 1 << 16
PENDING = -1  # SyncFile.status before the wait is over
STATUS_BYTES = 4096  # a signalled sync file's bytes: one pipe page (PIPE_BUF: written at once)
REACHED = b"\x01"  # its byte when the fence reached the value; any other: the wait failed
FAILED = b"\x00"


def file_limit() -> int:
    """How many share descriptors and sync files this daemon keeps at most: MAX_FILES, or a
    quarter of its soft descriptor limit when that is lower (each costs one descriptor, and
    the rest must stay for connections, blocks and host links)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_FILES
    return max(1, min(MAX_FILES, soft // 4))


class _Entry:
    """What share descriptors and sync files have in common."""

    __slots__ = ("adapter", "closed", "fd", "generation", "key", "link", "pins", "released",
                 "uid")

    def __init__(self, fd: int, key: FileKey, adapter: GuestAdapter, uid: int) -> None:
        self.fd = fd  # the guest's end of the pipe
        self.key = key
        self.adapter = adapter
        self.link: HostLink = adapter.link
        self.generation = adapter.link.generation  # the host's incarnation its handle is of
        self.uid = uid
        self.closed = False  # no copy is left (or the driver goes): lookups miss it
        self.pins = 0  # calls using it across an await
        self.released = False  # its host reference was given back

    @property
    def live(self) -> bool:
        """Whether the host that knows its NT handle is still the one on the link."""
        return self.link.generation == self.generation and self.link.up


class ShareFd(_Entry):
    """Every copy of the descriptor one ShareObjects handed out."""

    __slots__ = ("info", "writable")

    def __init__(self, fd: int, key: FileKey, adapter: GuestAdapter,
                 info: m.CreateNtSharedObjectReturn, writable: bool, uid: int) -> None:
        super().__init__(fd, key, adapter, uid)
        self.info = info  # the NT handle, the kind, a resource's sizes
        self.writable = writable

    @property
    def kind(self) -> int:
        return self.info.kind

    @property
    def nt(self) -> int:
        return self.info.handle


class SyncFile(_Entry):
    """A sync file: the guest's (write) end of its pipe, the fence and value it stands for,
    the CPU wait that signals it, and (for a shared fence) the host reference that lets any
    process open the fence from it and that holds the wait."""

    __slots__ = ("event", "hprocess", "nt", "status", "value")

    def __init__(self, fd: int, key: FileKey, adapter: GuestAdapter, value: int, nt: int,
                 uid: int) -> None:
        super().__init__(fd, key, adapter, uid)
        self.value = value
        self.nt = nt  # the shared fence's NT handle (0: the fence is not shared)
        self.event: HostEvent | None = None  # the CPU wait's host event, while it is pending
        self.hprocess = 0  # whose wait it is on the host (0: the NT reference's)
        self.status = PENDING  # the wait's end: 0 (reached) or a failure NTSTATUS


class Shares:
    """The driver's share descriptors and sync files, by pipe inode."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_files: int | None = None,
                 max_per_uid: int = MAX_FILES_PER_UID) -> None:
        self.loop = loop
        self.max_files = file_limit() if max_files is None else max_files
        self.max_per_uid = min(max_per_uid, self.max_files)
        self._files: dict[FileKey, ShareFd | SyncFile] = {}
        self._reserved = 0
        self._per_uid: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._files)

    # ---- limits ------------------------------------------------------------------------------

    def reserve(self, uid: int) -> None:
        """Room for one more file of ``uid`` (-EMFILE past the limits)."""
        mine = self._per_uid.get(uid, 0)
        if self._reserved >= self.max_files or (uid != 0 and mine >= self.max_per_uid):
            raise IoctlError(errno.EMFILE, "too many share descriptors and sync files")
        self._reserved += 1
        self._per_uid[uid] = mine + 1

    def unreserve(self, uid: int) -> None:
        self._reserved -= 1
        left = self._per_uid.get(uid, 0) - 1
        if left > 0:
            self._per_uid[uid] = left
        else:
            self._per_uid.pop(uid, None)

    # ---- share descriptors ---------------------------------------------------------------------

    def new_share(self, adapter: GuestAdapter, info: m.CreateNtSharedObjectReturn,
                  writable: bool, uid: int) -> tuple[ShareFd, int]:
        """A share descriptor group (its room reserved): (the entry, the write end for the
        caller). The read end is watched from now on."""
        r, w = _pipe("a share")
        key: FileKey | None = None
        try:
            key = _key_of(r)
            entry = ShareFd(r, key, adapter, info, writable, uid)
            self._files[key] = entry
            self.loop.add_reader(r, self._share_readable, entry)
        except BaseException:
            if key is not None:
                self._files.pop(key, None)
            close_all((r, w))
            raise
        return entry, w

    def _share_readable(self, entry: ShareFd) -> None:
        try:
            data = os.read(entry.fd, _DRAIN)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # end of file: no process holds a copy any more
            self.close(entry)

    # ---- sync files ---------------------------------------------------------------------------

    def new_sync_file(self, adapter: GuestAdapter, value: int, nt: int,
                      uid: int) -> tuple[SyncFile, int]:
        """A sync file (its room reserved): (the entry, the read end for the caller). Not
        watched until `watch` (its wait is registered first)."""
        r, w = _pipe("a sync file")
        try:
            # One page: the status bytes fill it, so the guest hears (EPOLLOUT) when a reader
            # took them all. Mode 0: a holder cannot reopen the pipe for writing via /proc.
            with contextlib.suppress(OSError):  # (then it is only not refilled: `_refill`)
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, STATUS_BYTES)
            os.fchmod(w, 0)
            entry = SyncFile(w, _key_of(w), adapter, value, nt, uid)
            self._files[entry.key] = entry
        except BaseException:
            close_all((r, w))
            raise
        return entry, r

    def watch(self, entry: SyncFile) -> None:
        """Hear when every copy of the read end is closed (the write end reports an error)."""
        if not entry.closed:
            self.loop.add_reader(entry.fd, self._sync_event, entry)

    def _sync_event(self, entry: SyncFile) -> None:
        if _readers_gone(entry.fd):
            self.close(entry)

    def signal(self, entry: SyncFile, status: int) -> None:
        """The wait is over (``status`` 0: reached): the pipe fills with its outcome, readable
        for good. Idempotent: the first outcome stays."""
        if entry.status != PENDING:
            return
        entry.status = int(status)
        entry.event = None
        if entry.closed:
            return
        self._fill(entry)
        if not entry.closed:
            try:
                self.loop.add_writer(entry.fd, self._refill, entry)
            except (ValueError, RuntimeError, OSError):
                pass

    def _fill(self, entry: SyncFile) -> None:
        byte = REACHED if entry.status == 0 else FAILED
        try:
            os.write(entry.fd, byte * STATUS_BYTES)
        except BlockingIOError:
            pass  # (full: it is readable)
        except OSError:  # no reader is left
            self.close(entry)

    def _refill(self, entry: SyncFile) -> None:
        """The pipe has room: a reader took every byte (fill it again), or a holder made the
        pipe larger (shrink it back: full again, so the loop stops hearing of it)."""
        if entry.closed:
            return
        if _readers_gone(entry.fd):
            self.close(entry)
            return
        if _queued(entry.fd) == 0:
            self._fill(entry)
            return
        try:
            fcntl.fcntl(entry.fd, fcntl.F_SETPIPE_SZ, STATUS_BYTES)
        except OSError:
            self._unwatch_writer(entry.fd)  # (bytes are there: readable; stop hearing of it)

    # ---- lookups ------------------------------------------------------------------------------

    def find(self, fd: int) -> ShareFd | SyncFile | None:
        """The share descriptor or sync file ``fd`` (a descriptor a caller handed in) is a copy
        of, or None when it is none of ours. Never calls into the file's filesystem: anything
        but a pipe is answered at once."""
        key = fd_kind(fd)
        if key is None:
            return None
        entry = self._files.get(key)
        if entry is None or entry.closed:
            return None
        try:
            mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE  # (a pipe: never blocks)
        except OSError:
            return None
        # the end the guest handed out: a share's write end, a sync file's read end
        want = os.O_WRONLY if isinstance(entry, ShareFd) else os.O_RDONLY
        return entry if mode == want else None

    # ---- pins ---------------------------------------------------------------------------------

    @staticmethod
    def pin(entry: ShareFd | SyncFile) -> None:
        """A call uses ``entry`` across an await: its host reference stays until `unpin`."""
        entry.pins += 1

    def unpin(self, entry: ShareFd | SyncFile) -> None:
        entry.pins -= 1
        if entry.pins <= 0 and entry.closed:
            self._release(entry)

    # ---- ends ---------------------------------------------------------------------------------

    def close(self, entry: ShareFd | SyncFile) -> None:
        """The entry ends: its descriptor, its room, and (once no call uses it) its host
        references. Idempotent."""
        if entry.closed:
            return
        entry.closed = True
        if self._files.get(entry.key) is entry:
            del self._files[entry.key]
        self.unreserve(entry.uid)
        self._unwatch(entry.fd)
        if isinstance(entry, SyncFile):
            self._unwatch_writer(entry.fd)
        close_all((entry.fd,))
        entry.fd = -1
        if entry.pins <= 0:
            self._release(entry)

    def _release(self, entry: ShareFd | SyncFile) -> None:
        """Its host references go back (the wait first, then the NT reference)."""
        if entry.released:
            return
        entry.released = True
        if isinstance(entry, ShareFd):
            if entry.live:
                release_nt(entry.link, entry.nt)
            return
        event = entry.event
        entry.event = None
        if event is not None and entry.live and entry.link.events.remove(event.id):
            # nobody waits for it any more: the host forgets the wait
            if event.process is None:
                withdraw_shared_wait(entry.link, entry.nt, event.id)
            elif not event.process.closed:
                from dxg.guest.ioctl_sync import _withdraw

                _withdraw(entry.adapter, entry.hprocess, event.id)
        if entry.status == PENDING:
            entry.status = int(NTSTATUS.STATUS_INVALID_HANDLE)
        if entry.nt and entry.live:
            release_nt(entry.link, entry.nt)

    def _unwatch(self, fd: int) -> None:
        try:
            self.loop.remove_reader(fd)
        except (ValueError, RuntimeError, OSError):
            pass

    def _unwatch_writer(self, fd: int) -> None:
        try:
            self.loop.remove_writer(fd)
        except (ValueError, RuntimeError, OSError):
            pass

    def close_all(self) -> None:
        """The driver goes: every entry ends (its host references go with the hosts)."""
        for entry in list(self._files.values()):
            self.close(entry)

    def census(self) -> dict[str, int]:
        shares = sum(1 for e in self._files.values() if isinstance(e, ShareFd))
        return {"share_fds": shares, "sync_files": len(self._files) - shares}


def _pipe(what: str) -> tuple[int, int]:
    try:
        return os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:  # (out of descriptors)
        raise IoctlError(e.errno or errno.EMFILE, f"no pipe for {what}: {e}") from None


def _key_of(fd: int) -> FileKey:
    key = fd_kind(fd)
    if key is None:  # (our own pipe end: cannot happen)
        raise IoctlError(errno.EIO, "a pipe /proc does not name")
    return key


def _readers_gone(fd: int) -> bool:
    """Whether a pipe's write end has no reader left (poll says POLLERR)."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))


def _queued(fd: int) -> int:
    """Bytes in a pipe (FIONREAD works on either end)."""
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(fd, termios.FIONREAD, buf)
    except OSError:
        return 0
    return buf[0]


def withdraw_shared_wait(link: HostLink, nt: int, event: int) -> None:
    """A sync file's wait held by its NT reference is given up (a task of the link)."""
    if link.up:
        vmbus.spawn_quietly(link, vmbus.send(link, GlobalCommand.PYDXG_WAITSHAREDSYNC, 0,
                                             m.WaitSharedSync(nt, m.WAIT_WITHDRAW, event, 0)))


def release_nt(link: HostLink, nt: int) -> None:
    """Give one CREATENTSHAREDOBJECT reference back (a task of the link; best effort: a host
    that is gone took the object with it)."""
    if nt and link.up:
        vmbus.spawn_quietly(link, vmbus.send(link, GlobalCommand.DESTROYNTSHAREDOBJECT, 0,
                                             m.DestroyNtSharedObject(nt)))


def undo_nt(link: HostLink, reply: m.CreateNtSharedObjectReturn) -> None:
    """The caller of a CREATENTSHAREDOBJECT gave up: its reference goes back."""
    from dxg.uapi.ntstatus import nt_success

    if nt_success(reply.status) and reply.handle:
        release_nt(link, reply.handle)
