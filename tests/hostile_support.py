"""Helpers of the hostile-input tests (tests/test_hostile_*.py): a raw node client that sends
IOCTL frames it builds itself (the regions and descriptors it chooses, several calls in flight,
CANCEL) and can still serve as the connection of the Pythonic client API, a watch on the log
records that mean an internal error (a catch-all that answered an unexpected exception), and
the census of what the host and the guest hold."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import socket
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, settings

from dxg.client.calls import (
    Delivered,
    Failed,
    ReplyRouter,
    RouterBroken,
    SelfMemory,
    apply_ioctl_reply,
    build_ioctl,
)
from dxg.host.host import Host
from dxg.oslib.fds import close_all, recv_with_fds, send_with_fds
from dxg.uapi import wire
from dxg.uapi.ntstatus import NTSTATUS, nt_success

DEADLINE = 10.0  # seconds any answer may take (typical: milliseconds)
CI = os.environ.get("CI") == "true"


def hostile_settings(examples: int, **kw: Any) -> settings:
    """Modest example counts, no per-example deadline (a deadline of our own is on every
    answer), derandomized in CI (CI=true)."""
    return settings(max_examples=examples, deadline=None, derandomize=CI,
                    database=None if CI else settings.default.database,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much], **kw)


# The returns an ioctl may give (docs/ioctls.md, dxg.uapi.ntstatus): 0, a success NTSTATUS the
# driver passes on, or a negative errno of the documented set. -EPROTO never comes from a real
# host (it says the host's reply was malformed), and the catch-all's -EIO is caught by its log
# record (LogWatch) whatever errno it shows as.
ALLOWED_ERRNOS = frozenset({
    errno.EINVAL, errno.EBADF, errno.EFAULT, errno.ENOMEM, errno.ENODEV, errno.ENOTTY,
    errno.ENOSYS, errno.EOVERFLOW, errno.EACCES, errno.EPERM, errno.E2BIG, errno.EMFILE,
    errno.EINTR, errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.EOPNOTSUPP, errno.ENOENT,
    errno.ESRCH, errno.EEXIST, errno.EIO, errno.ERANGE, errno.ENOBUFS, errno.EINPROGRESS,
    errno.EPROTOTYPE, errno.ENOSPC, errno.EDQUOT,
    errno.ENOTRECOVERABLE,  # the host made no process (hprocess 0), as the real driver answers
})
ALLOWED_SUCCESS = frozenset({0, int(NTSTATUS.STATUS_PENDING), int(NTSTATUS.STATUS_TIMEOUT)})
_KNOWN_FAILURES = frozenset(int(s) for s in NTSTATUS if not nt_success(int(s))) - {
    int(NTSTATUS.STATUS_INTERNAL_ERROR)}


def allowed_return(ret: int) -> bool:
    """Whether ``ret`` is an answer the docs allow (an errno of the set; a raw negative
    NTSTATUS the real driver passes through, never STATUS_INTERNAL_ERROR)."""
    if ret >= 0:
        return ret in ALLOWED_SUCCESS
    if ret >= -4095:
        return -ret in ALLOWED_ERRNOS
    return (ret & 0xFFFFFFFF) in _KNOWN_FAILURES


# ---- the log records of internal errors ----------------------------------------------------------


# ERROR records that report what a peer did wrong (and what is done about it), not an internal
# error: a guest or host breaking the wire, a host offering what the guest refuses.
PEER_FAULTS = (
    "protocol error, dropping the connection",
    "offered a second global channel",
    "cannot open the global channel",
    "speaks DXGK interface",
    "is already used by host",
    "offers more adapters",
    "failed to start",
    "control messages before they could",
    "offers on one connection",
    "the host offers more",
)


class LogWatch(logging.Handler):
    """Collects what a catch-all writes: any record with a traceback (the node's "driver ioctl
    ... raised", the host's "... handler failed", a channel's "packet handler failed", a task
    that failed), and any ERROR record that is not a report of a peer's fault (PEER_FAULTS):
    "returned a malformed result", "cannot encode a reply", "over the packet cap", ..."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or (record.levelno >= logging.ERROR and not any(
                fault in str(record.msg) for fault in PEER_FAULTS)):
            self.records.append(record)

    def take(self) -> list[str]:
        out = [f"{r.name}: {r.getMessage()}" + (
            f"\n{logging.Formatter().formatException(r.exc_info)}" if r.exc_info else "")
            for r in self.records]
        self.records.clear()
        return out


@contextmanager
def log_watch() -> Iterator[LogWatch]:
    watch = LogWatch()
    logger = logging.getLogger("dxg")
    old = logger.level
    logger.addHandler(watch)
    if logger.getEffectiveLevel() > logging.ERROR:
        logger.setLevel(logging.ERROR)
    try:
        yield watch
    finally:
        logger.removeHandler(watch)
        logger.setLevel(old)


# ---- what the host and the guest hold ------------------------------------------------------------


def host_left(host: Host) -> dict[str, int]:
    """What the host holds for guests' processes: objects, handles, committed bytes, shared
    objects."""
    census = host.census()
    totals = census["totals"]
    used = sum(g["used"] for a in census["adapters"] for g in a["memory"].values())
    shared = {k: sum(p["shared"][k] for p in census["partitions"])
              for k in ("resources", "sync_objects", "opened_sync_objects", "nt_refs",
                        "block_bytes")}
    return {"processes": totals["processes"], "devices": totals["devices"],
            "contexts": totals["contexts"], "handles": totals["handles"],
            "regions": totals["regions"], "bytes": used, **shared}


def open_files() -> set[tuple[int, int]]:
    """The files this process holds open, by identity (device, inode)."""
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            st = os.stat(f"/proc/self/fd/{name}")
        except OSError:
            continue
        out.add((st.st_dev, st.st_ino))
    return out


# ---- a raw node client ---------------------------------------------------------------------------


@dataclass
class Answer:
    """What came back for one request: the reply (or the failure), the descriptors with it."""

    seq: int
    reply: wire.Message | None
    fds: list[int] = field(default_factory=list)
    error: str = ""

    @property
    def ret(self) -> int:
        assert isinstance(self.reply, wire.IoctlReply), (self.reply, self.error)
        return self.reply.ret


class NodeHungUp(Exception):
    """The node closed the connection."""


class NoAnswer(AssertionError):
    """A request was not answered before its deadline (a hang)."""


class NodeBroke(AssertionError):
    """The node sent something the wire does not allow."""


class RawNodeClient:
    """One connection (one process) to a socket node, spoken by hand: ``send`` puts any IOCTL
    request on the wire (the regions and descriptors the test chooses) and returns its seq,
    ``cancel`` sends CANCEL, ``collect`` reads until the given seqs are answered or the deadline
    passes. ``ioctl`` makes it usable as the connection of the client API (dxg.client.api.Node)
    for the valid calls that build the objects the hostile calls aim at."""

    def __init__(self, path: str, timeout: float = DEADLINE) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.sock.settimeout(None)
        self.router = ReplyRouter(f"node {path}")
        self.answers: dict[int, Answer] = {}
        self._buf = bytearray(1 << 20)
        self._mem = SelfMemory()
        self.closed = False
        self.forked = False
        self.recorded: dict[int, list[wire.IoctlRequest]] = {}  # code -> valid requests sent
        self.returns: list[tuple[int, int]] = []  # (code, what the node answered) of ioctl()
        seq = self.router.register(wire.Kind.HELLO_REPLY)
        self.sock.sendall(wire.encode(wire.Hello(), seq))
        (hello,) = self.collect([seq])
        assert isinstance(hello.reply, wire.HelloReply), hello

    # -- raw requests --

    def send(self, msg: wire.IoctlRequest | wire.AdminRequest, fds: Sequence[int] = ()) -> int:
        kind = wire.Kind.IOCTL_REPLY if isinstance(msg, wire.IoctlRequest) else \
            wire.Kind.ADMIN_REPLY
        seq = self.router.register(kind)
        data = wire.encode(msg, seq)
        if fds:
            sent = send_with_fds(self.sock, data, fds)
            if sent < len(data):
                self.sock.sendall(memoryview(data)[sent:])
        else:
            self.sock.sendall(data)
        return seq

    def cancel(self, seq: int) -> None:
        self.sock.sendall(wire.encode(wire.Cancel(), seq))

    def collect(self, seqs: Iterable[int], timeout: float = DEADLINE) -> list[Answer]:
        """Read until every one of ``seqs`` is answered; AssertionError past ``timeout``."""
        want = list(seqs)
        deadline = time.monotonic() + timeout
        while any(s not in self.answers for s in want):
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [s for s in want if s not in self.answers]
                raise NoAnswer(f"no answer to seq {missing} within {timeout}s")
            ready, _, _ = select.select([self.sock], [], [], left)
            if ready:
                self._read()
        return [self.answers.pop(s) for s in want]

    def answered(self, seq: int) -> bool:
        """Whether ``seq`` has been answered (reads what has arrived, without waiting)."""
        while seq not in self.answers and select.select([self.sock], [], [], 0)[0]:
            self._read()
        return seq in self.answers

    def _read(self) -> None:
        data, fds = recv_with_fds(self.sock, self._buf, wire.MAX_FDS)
        if not data:
            close_all(fds)
            raise NodeHungUp("the node closed the connection")
        try:
            outcomes = self.router.feed(data, fds)
        except RouterBroken as e:
            raise NodeBroke(f"broken stream from the node: {e.failure()}") from None
        for o in outcomes:
            if isinstance(o, Delivered):
                self.answers[o.seq] = Answer(o.seq, o.message, list(o.fds))
            elif isinstance(o, Failed):
                self.answers[o.seq] = Answer(o.seq, None, [], str(o.failure()))

    # -- the NodeConnection interface (for dxg.client.api) --

    def ioctl(self, code: int, args: Any, fds: Sequence[int] = (),
              timeout: float | None = None) -> int:
        request = build_ioctl(code, args, self._mem.read, wire.MAX_PAYLOAD, fds)
        # the calls of the client API: what the hostile ones are made from
        self.recorded.setdefault(code & 0xFFFFFFFF, []).append(request)
        seq = self.send(request, request.fd_numbers)
        if timeout is not None:
            deadline = time.monotonic() + timeout
            while not self.answered(seq) and time.monotonic() < deadline:
                select.select([self.sock], [], [], max(0.0, deadline - time.monotonic()))
            if not self.answered(seq):  # as NodeConnection: CANCEL, drop the reply
                self.cancel(seq)
                (late,) = self.collect([seq])
                close_all(late.fds)
                raise TimeoutError("the call did not end in time")
        (answer,) = self.collect([seq])
        if answer.reply is None:
            raise AssertionError(f"ioctl 0x{code:08x}: {answer.error}")
        if isinstance(answer.reply, wire.IoctlReply):
            self.returns.append((code & 0xFFFFFFFF, answer.reply.ret))
        return apply_ioctl_reply(request, answer.reply, answer.fds, args, self._mem.write,
                                 self.router.blocks)

    def admin(self, request: dict[str, Any]) -> dict[str, Any]:
        (answer,) = self.collect([self.send(wire.AdminRequest(dict(request)))])
        assert isinstance(answer.reply, wire.AdminReply), answer
        return answer.reply.reply

    def reopen(self) -> None:
        raise AssertionError("a raw client does not reopen")

    def mapped_readonly(self, address: int) -> bool:
        return self.router.blocks.readonly_at(address)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for a in self.answers.values():
            close_all(a.fds)
        self.answers.clear()
        self.sock.close()
        self.router.close()


def check_writes_inside(request: wire.IoctlRequest, reply: wire.IoctlReply) -> None:
    """Every write, descriptor fixup and map of a reply lands in a region the request let the
    driver write (or in the struct)."""
    def inside(addr: int, size: int) -> bool:
        return any(r.writable and r.addr <= addr and addr + size <= r.end
                   for r in request.regions)

    assert len(reply.struct) == len(request.struct)
    for w in reply.writes:
        assert inside(w.addr, len(w.data)), f"write at 0x{w.addr:x} outside the regions"
    for f in (*reply.fixups, *(m for m in reply.maps if m.op == wire.MAP)):
        if f.target == wire.FD_IN_STRUCT:
            assert f.where + f.width <= len(request.struct)
        else:
            assert inside(f.where, f.width), f"fixup at 0x{f.where:x} outside the regions"


def struct_fields(ctype: type) -> Iterator[tuple[str, int, type]]:
    """(dotted name, byte offset, ctypes scalar type) of every scalar of a ctypes struct type,
    arrays and nested structs and unions flattened; a d3dkmthandle is one u32 leaf."""
    def walk(t: type, prefix: str, base: int) -> Iterator[tuple[str, int, type]]:
        for fname, ftype, *_bits in getattr(t, "_fields_", ()):
            desc = getattr(t, fname)
            off = base + desc.offset
            name = f"{prefix}{fname}"
            if _bits:
                continue  # bit fields: the random bytes cover them
            if issubclass(ftype, ctypes.Array):
                elem = ftype._type_
                size = ctypes.sizeof(elem)
                for i in range(min(ftype._length_, 8)):
                    if hasattr(elem, "_fields_"):
                        yield from walk(elem, f"{name}[{i}].", off + i * size)
                    else:
                        yield (f"{name}[{i}]", off + i * size, elem)
            elif hasattr(ftype, "_fields_"):
                yield from walk(ftype, f"{name}.", off)
            else:
                yield (name, off, ftype)
    return walk(ctype, "", 0)


__all__ = [
    "ALLOWED_ERRNOS",
    "DEADLINE",
    "Answer",
    "LogWatch",
    "NoAnswer",
    "NodeBroke",
    "NodeHungUp",
    "RawNodeClient",
    "allowed_return",
    "check_writes_inside",
    "host_left",
    "hostile_settings",
    "log_watch",
    "open_files",
    "struct_fields",
]
