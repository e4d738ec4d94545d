"""Share descriptors and sync files as the guest keeps them (docs/sharing.md).

Both are descriptors the driver makes and hands to a process (beside the reply of ShareObjects
or CreateSyncFile); any process that gets a copy (SCM_RIGHTS, inheritance) can hand it back with
a call. The guest keeps the other end of each and recognizes a descriptor handed back by its
file's identity, ``(st_dev, st_ino)`` from fstat, which is unique among live pipes and sockets
(not among eventfds or other anonymous inodes, which share one inode; those are never ours).

- A *share descriptor* (`ShareFd`, one per ShareObjects call) is the write end of a pipe whose
  read end the guest keeps and watches: end of file there means every copy of the write end is
  closed, in every process. Writing to it changes nothing (the guest drains and drops what comes)
  and it cannot be made to look closed while a copy is open. It holds one host reference on the
  shared object (CREATENTSHAREDOBJECT), given back (DESTROYNTSHAREDOBJECT) when it ends, and the
  access ShareObjects granted (write or read-only).
- A *sync file* (`SyncFile`, CreateSyncFile) is one end of a socket pair. The guest shuts its own
  end for writing once the fence reaches the value (or the wait fails): the process's end then
  reads end-of-file, readable for poll/select/epoll for good, and nothing a reader does can undo
  that. The guest's end reports a hang-up once every copy of the process's end is closed. A
  process that shuts its own end down ends the sync file for everyone holding it.

Both are bounded: ``max_files`` in all and ``max_per_uid`` per user (-EMFILE past either), since
they outlive the processes that made them. Everything here runs on the driver's event loop.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
import socket
import stat
from typing import TYPE_CHECKING

from dxg.guest import vmbus
from dxg.guest.errors import IoctlError
from dxg.oslib.fds import close_all
from dxg.protocol import messages as m
from dxg.protocol.commands import GlobalCommand
from dxg.uapi.ntstatus import NTSTATUS

if TYPE_CHECKING:
    from dxg.guest.adapter import GuestAdapter
    from dxg.guest.hostlink import HostLink
    from dxg.guest.syncobject import HostEvent

__all__ = ["MAX_FILES", "MAX_FILES_PER_UID", "FileKey", "ShareFd", "Shares", "SyncFile"]

log = logging.getLogger(__name__)

FileKey = tuple[int, int]  # (st_dev, st_ino)
MAX_FILES = 1 << 16  # share descriptors and sync files the guest keeps, in all
MAX_FILES_PER_UID = 1 << 12  # ... and of one user
_DRAIN = 1 << 16
PENDING = -1  # SyncFile.status before the wait is over


class ShareFd:
    """Every copy of the descriptor one ShareObjects handed out."""

    __slots__ = ("adapter", "closed", "fd", "generation", "info", "key", "link", "uid",
                 "writable")

    def __init__(self, fd: int, key: FileKey, adapter: GuestAdapter,
                 info: m.CreateNtSharedObjectReturn, writable: bool, uid: int) -> None:
        self.fd = fd  # the read end (ours)
        self.key = key
        self.adapter = adapter
        self.link: HostLink = adapter.link
        self.generation = adapter.link.generation  # the host's incarnation the handle is of
        self.info = info  # the NT handle, the kind, a resource's sizes
        self.writable = writable
        self.uid = uid
        self.closed = False

    @property
    def kind(self) -> int:
        return self.info.kind

    @property
    def nt(self) -> int:
        return self.info.handle

    @property
    def live(self) -> bool:
        """Whether the host that knows its NT handle is still the one on the link."""
        return self.link.generation == self.generation and self.link.up


class SyncFile:
    """A sync file: the guest's end of its socket pair, the fence and value it stands for, the
    CPU wait that signals it, and (for a shared fence) the host reference that lets any
    process open the fence from it."""

    __slots__ = ("adapter", "closed", "event", "generation", "hprocess", "key", "link", "nt",
                 "sock", "status", "uid", "value")

    def __init__(self, sock: socket.socket, key: FileKey, adapter: GuestAdapter, value: int,
                 nt: int, uid: int) -> None:
        self.sock = sock
        self.key = key
        self.adapter = adapter
        self.link: HostLink = adapter.link
        self.generation = adapter.link.generation
        self.value = value
        self.nt = nt  # the shared fence's NT handle (0: the fence is not shared)
        self.uid = uid
        self.event: HostEvent | None = None  # the CPU wait's host event, while it is pending
        self.hprocess = 0  # whose wait it is on the host
        self.status = PENDING  # the wait's end: 0 (reached) or a failure NTSTATUS
        self.closed = False

    @property
    def live(self) -> bool:
        return self.link.generation == self.generation and self.link.up

    def signalled(self, status: int) -> None:
        """The wait is over: readable for good (the process's end reads end-of-file)."""
        if self.status != PENDING:
            return
        self.status = status
        self.event = None
        if not self.closed:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass


def _key(st: os.stat_result) -> FileKey:
    return (st.st_dev, st.st_ino)


class Shares:
    """The driver's share descriptors and sync files, by file identity."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_files: int = MAX_FILES,
                 max_per_uid: int = MAX_FILES_PER_UID) -> None:
        self.loop = loop
        self.max_files = max_files
        self.max_per_uid = max_per_uid
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
        try:
            r, w = os.pipe2(os.O_CLOEXEC)
        except OSError as e:  # (out of descriptors)
            raise IoctlError(e.errno or errno.EMFILE, f"no pipe for a share: {e}") from None
        key = _key(os.fstat(r))  # (both ends: one inode, alive while we keep the read end)
        try:
            os.set_blocking(r, False)
            entry = ShareFd(r, key, adapter, info, writable, uid)
            self._files[key] = entry
            self.loop.add_reader(r, self._share_readable, entry)
        except BaseException:
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
        """A sync file (its room reserved): (the entry, the process's end). Not watched until
        `watch` (its wait is registered first)."""
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as e:
            raise IoctlError(e.errno or errno.EMFILE, f"no socket pair for a sync file: {e}") \
                from None
        try:
            ours.setblocking(False)
            theirs.setblocking(False)
            entry = SyncFile(ours, _key(os.fstat(theirs.fileno())), adapter, value, nt, uid)
            self._files[entry.key] = entry
        except BaseException:
            ours.close()
            theirs.close()
            raise
        return entry, theirs.detach()

    def watch(self, entry: SyncFile) -> None:
        if not entry.closed:
            self.loop.add_reader(entry.sock.fileno(), self._sync_readable, entry)

    def _sync_readable(self, entry: SyncFile) -> None:
        try:
            data = entry.sock.recv(_DRAIN)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # every copy of the process's end closed (or one was shut down)
            self.close(entry)

    @staticmethod
    def _hung_up(entry: SyncFile) -> bool:
        poller = select.poll()
        poller.register(entry.sock.fileno(), select.POLLIN)
        return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in poller.poll(0))

    # ---- lookups ------------------------------------------------------------------------------

    def find(self, fd: int) -> ShareFd | SyncFile | None:
        """The share descriptor or sync file ``fd`` (a descriptor a caller handed in) is a copy
        of, or None when it is none of ours."""
        try:
            st = os.fstat(fd)
        except OSError:
            return None
        entry = self._files.get(_key(st))
        if entry is None or entry.closed:
            return None
        if isinstance(entry, ShareFd):
            return entry if stat.S_ISFIFO(st.st_mode) else None
        if not stat.S_ISSOCK(st.st_mode):
            return None
        if self._hung_up(entry):
            # Every copy is closed (its inode may be another socket's by now): it is gone.
            self.close(entry)
            return None
        return entry

    # ---- ends ---------------------------------------------------------------------------------

    def close(self, entry: ShareFd | SyncFile) -> None:
        """The entry ends: its descriptor, its room, and its host references. Idempotent."""
        if entry.closed:
            return
        entry.closed = True
        if self._files.get(entry.key) is entry:
            del self._files[entry.key]
        self.unreserve(entry.uid)
        if isinstance(entry, ShareFd):
            self._unwatch(entry.fd)
            close_all((entry.fd,))
            entry.fd = -1
            if entry.live:
                release_nt(entry.link, entry.nt)
            return
        self._unwatch(entry.sock.fileno())
        entry.sock.close()
        event = entry.event
        if event is not None and entry.live and entry.link.events.remove(event.id):
            # nobody waits for it any more: the host forgets the wait
            from dxg.guest.ioctl_sync import _withdraw

            if not event.process.closed:
                _withdraw(entry.adapter, entry.hprocess, event.id)
        entry.signalled(int(NTSTATUS.STATUS_INVALID_HANDLE))
        if entry.nt and entry.live:
            release_nt(entry.link, entry.nt)

    def _unwatch(self, fd: int) -> None:
        try:
            self.loop.remove_reader(fd)
        except (ValueError, RuntimeError, OSError):
            pass

    def close_all(self) -> None:
        """The driver goes: every entry ends (its host references go with the hosts)."""
        for entry in list(self._files.values()):
            self.close(entry)

    def census(self) -> dict[str, int]:
        shares = sum(1 for e in self._files.values() if isinstance(e, ShareFd))
        return {"share_fds": shares, "sync_files": len(self._files) - shares}


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
