"""The sans-I/O half of a node connection, shared by the sync and the asyncio connections.

Nothing here touches a socket. :class:`ReplyRouter` turns the bytes and descriptors read from
the node into replies matched to the requests in flight (by ``seq``, in any order), joins
ADMIN_REPLY chunks and keeps the descriptors that travel with frames in step with them.
:func:`build_ioctl` turns a ctypes struct (and the buffers it points at, and the descriptors the
caller hands over) into an IOCTL request; :func:`apply_ioctl_reply` puts a reply back into this
process (writes, struct, descriptor numbers). The connecting helpers (node path trust, connect
errors, HELLO checks) are here too, so both connections say the same things.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dxg.client.blockmap import BlockMaps
from dxg.client.errors import (
    NodeError,
    NodeNotFound,
    NodePermissionDenied,
    NodeProtocolError,
    NodeUnavailable,
)
from dxg.client.userbufs import gather
from dxg.oslib.fds import close_all
from dxg.oslib.procmem import ProcessVmUserMemory, UserMemoryFault
from dxg.uapi import wire
from dxg.uapi.ioctls import IOCTLS_BY_CODE
from dxg.uapi.nodepath import (
    NODE_ENV,
    UntrustedPath,
    client_node_paths,
    default_node_path,
    open_trusted_dir,
    proc_fd_path,
)

__all__ = [
    "ARGS_TYPES",
    "MAX_ADMIN_REPLY",
    "RECV_CHUNK",
    "Delivered",
    "Failed",
    "Failure",
    "NodeTarget",
    "ReplyRouter",
    "RouterBroken",
    "SelfMemory",
    "apply_ioctl_reply",
    "build_ioctl",
    "check_hello_reply",
    "connect_error",
    "connect_target",
    "hello_error",
    "lost",
    "node_target",
    "node_targets",
    "not_found_anywhere",
]

MAX_ADMIN_REPLY = 256 << 20  # a joined ADMIN_REPLY larger than this is a broken node
_IOCTL_HEAD = 16  # the IOCTL payload's fixed header
_REGION_ENTRY = 16
_FD_ENTRY = 8
_REPLY_KINDS = frozenset({wire.Kind.IOCTL_REPLY, wire.Kind.ADMIN_REPLY, wire.Kind.HELLO_REPLY})
_KIND_ERROR = int(wire.Kind.ERROR)
_KIND_IOCTL_REPLY = int(wire.Kind.IOCTL_REPLY)
_KIND_ADMIN_REPLY = int(wire.Kind.ADMIN_REPLY)
_IOCTL_REPLY = wire.Kind.IOCTL_REPLY
ARGS_TYPES = (ctypes.Structure, ctypes.Union)  # what an ioctl's arguments may be
RECV_CHUNK = 256 * 1024  # the most a client reads at once
_EMPTY_TYPES = (tuple, list)  # descriptor sequences seen empty without walking them

Failure = Callable[[], NodeError]
"""Makes the exception a waiter raises (one per waiter: threads must not share one object)."""


def lost(message: str) -> Failure:
    """The failure of every waiter of a connection that was lost."""
    return lambda: NodeUnavailable(message)


# ---- this process's memory ----------------------------------------------------------------------


class SelfMemory:
    """Reads and writes this process's memory without faulting on bad addresses: through
    process_vm_readv/writev aimed at ourselves, or, where a sandbox forbids those calls,
    directly (a bad pointer then crashes, as it would in C)."""

    def __init__(self) -> None:
        self._mem = ProcessVmUserMemory(os.getpid())
        probe = ctypes.create_string_buffer(b"pydxg", 8)
        try:
            self.safe = self._mem.read(ctypes.addressof(probe), 8) == probe.raw
        except UserMemoryFault:
            self.safe = False

    def read(self, addr: int, size: int) -> bytes | None:
        if addr <= 0 or size <= 0 or addr + size > 1 << 64:
            return None
        if not self.safe:
            return ctypes.string_at(addr, size)
        try:
            return self._mem.read(addr, size)
        except UserMemoryFault:
            return None

    def write(self, addr: int, data: bytes) -> bool:
        if not self.safe:
            ctypes.memmove(addr, data, len(data))
            return True
        try:
            self._mem.write(addr, data)
        except UserMemoryFault:
            return False
        return True


# ---- connecting ---------------------------------------------------------------------------------


def node_target(path: str | os.PathLike[str] | None) -> tuple[Path, bool]:
    """(the node path, whether its directory must pass the trust check): only the implicit
    default is checked; an explicit path or ``$DXG_NODE`` is the user's choice."""
    if path is not None:
        return Path(path), False
    return default_node_path(), not os.environ.get(NODE_ENV)


@dataclass(frozen=True, slots=True)
class NodeTarget:
    """One place to look for the node: its path, whether its directory must pass the trust
    check (the implicit default), and where the path came from ("DXG_NODE", "default", or ""
    for a path the caller gave), so that a failure names what the person set."""

    path: Path
    check: bool
    origin: str


def node_targets(path: str | os.PathLike[str] | None) -> tuple[NodeTarget, ...]:
    """Where to look for the node, in order: the given path, else ``$DXG_NODE``, else this
    user's default path and the system node (``client_node_paths``)."""
    if path is not None:
        return (NodeTarget(Path(path), False, ""),)
    if os.environ.get(NODE_ENV):
        return (NodeTarget(default_node_path(), False, "DXG_NODE"),)
    return tuple(NodeTarget(p, True, "default") for p in client_node_paths())


def not_found_anywhere(targets: Sequence[NodeTarget]) -> NodeNotFound:
    """The error when no place held a node: every place looked, and what to do."""
    where = " nor ".join(str(t.path) for t in targets)
    return NodeNotFound(f"no dxg node at {where} (start one with `dxg up`, or set DXG_NODE "
                        "to the node's path)")


_UNIX_PATH_MAX = 107


def connect_target(path: Path, check: bool) -> tuple[str, int]:
    """What to ``connect()`` to for the node at ``path``, and a directory descriptor to close
    once connected (-1 if none). With ``check``, the directory is reached one component at a
    time from ``/`` through directories only this user or root control, held open, and the node
    is named through it, so no directory on the way can be swapped between the check and the
    connect; anything another user could change is refused. A path too long for a Unix socket
    address is reached the same way (without the ownership check)."""
    if check:
        try:
            fd = open_trusted_dir(path.parent)
        except UntrustedPath as e:
            raise NodePermissionDenied(
                f"not connecting to the dxg node {path}: {e.strerror} "
                f"(set {NODE_ENV} to use it anyway)") from None
        except OSError as e:
            raise connect_error(path, e) from None
        return proc_fd_path(fd, path.name), fd
    if len(os.fsencode(path)) <= _UNIX_PATH_MAX:
        return os.fspath(path), -1
    try:
        fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise connect_error(path, e) from None
    return proc_fd_path(fd, path.name), fd


def connect_error(path: Path, e: OSError, origin: str = "") -> NodeError:
    """What a failed ``connect()`` to the node means to the user: what is at ``path`` when it
    is clearly not a node (a directory, a regular file, a stale socket...), and what to do."""
    from dxg.client.nodeprobe import describe_node_path, origin_name

    name = origin_name(path, origin)
    if isinstance(e, FileNotFoundError):
        return NodeNotFound(f"no dxg node at {name} (start one with `dxg up`, or set DXG_NODE "
                            "to the node's path)")
    if isinstance(e, PermissionError) and not os.path.isdir(path):
        return NodePermissionDenied(f"permission denied connecting to the dxg node {name} "
                                    "(ask its owner for access: `dxg up --mode/--group`)")
    found = describe_node_path(path, origin)
    if found is not None:
        return NodeUnavailable(found)
    if isinstance(e, ConnectionRefusedError):
        return NodeUnavailable(f"the dxg node {name} is not accepting connections")
    if isinstance(e, TimeoutError):
        return NodeUnavailable(f"the dxg node {name} did not answer in time")
    return NodeUnavailable(f"cannot connect to the dxg node {name}: {e.strerror or e}")


def hello_error(path: Path, e: NodeError, origin: str = "") -> NodeError:
    """A connection that went but did not shake hands as a node: say what is there instead
    (a host's bus socket...) when that can be told, else ``e``."""
    from dxg.client.nodeprobe import describe_node_path

    found = describe_node_path(path, origin)
    return NodeUnavailable(found) if found is not None else e


def check_hello_reply(path: Path, reply: wire.Message) -> wire.HelloReply:
    if not isinstance(reply, wire.HelloReply):
        raise NodeProtocolError(errno.EPROTO, f"the dxg node {path} did not answer HELLO")
    if not wire.MIN_WIRE_VERSION <= reply.version <= wire.MAX_WIRE_VERSION:
        raise NodeProtocolError(
            errno.EPROTONOSUPPORT, f"the dxg node {path} chose wire version {reply.version}"
        )
    return reply


# ---- ioctl requests and replies -----------------------------------------------------------------


def build_ioctl(code: int, args: ctypes.Structure | ctypes.Union, read: Callable[[int, int],
                bytes | None], max_payload: int, fds: Sequence[int] = (),
                max_fds: int = wire.MAX_FDS) -> wire.IoctlRequest:
    """The IOCTL request for ``ioctl(code, &args)``, with the user buffers the struct points at
    (what fits in ``max_payload``) and the numbers of the descriptors ``fds`` the caller hands
    over. Raises TypeError/ValueError for a bad call and OSError(EBADF) for a descriptor that is
    not open: nothing has been sent then. The caller checked that ``args`` is one of
    ARGS_TYPES."""
    numbers: tuple[int, ...] = (
        () if isinstance(fds, _EMPTY_TYPES) and not fds else tuple(int(fd) for fd in fds))
    if numbers:
        if len(numbers) > min(max_fds, wire.MAX_FDS):
            raise ValueError(f"{len(numbers)} descriptors exceed the node's limit of {max_fds}")
        if len(set(numbers)) != len(numbers) or any(n < 0 for n in numbers):
            raise ValueError("descriptors must be distinct and >= 0")
        for n in numbers:
            os.fstat(n)  # OSError(EBADF) now rather than a failed sendmsg later
    code &= 0xFFFFFFFF
    raw = bytes(args)
    regions: tuple[wire.Region, ...] = ()
    desc = IOCTLS_BY_CODE.get(code)
    if desc is not None:
        budget = max_payload - _IOCTL_HEAD - len(raw) - _FD_ENTRY * len(numbers)
        regions = gather(desc.name, args, read, budget)
    return wire.IoctlRequest(code, raw, regions, numbers)


def _inside_writable(regions: Iterable[wire.Region], addr: int, size: int) -> bool:
    return any(r.writable and r.addr <= addr and addr + size <= r.end for r in regions)


def apply_ioctl_reply(request: wire.IoctlRequest, reply: wire.Message, fds: list[int],
                      args: ctypes.Structure | ctypes.Union,
                      write: Callable[[int, bytes], bool],
                      blocks: BlockMaps | None = None) -> int:
    """Put ``reply`` into this process, in the wire's order: the writes (each inside a region
    the request let the driver write), the struct, then the number of each received descriptor
    where its fixup says. Returns the ioctl's return value (-EFAULT if a write could not be
    stored). The descriptors are the caller's afterwards; a reply that breaks the rules raises
    :class:`NodeProtocolError` before anything is applied, with ``fds`` closed. The reply's
    block maps were taken in by the reader (:class:`ReplyRouter`); here each MAP's address is
    stored where it says (-EFAULT when the block is not mapped in this process)."""
    if (type(reply) is wire.IoctlReply and not reply.writes and not reply.fixups and not fds
            and len(reply.struct) == len(request.struct)):
        if not reply.maps:
            # The common reply, a bare struct: nothing to check or apply but the struct itself.
            memoryview(args).cast("B")[:] = reply.struct
            return reply.ret
        if all(m.target == wire.FD_IN_STRUCT for m in reply.maps):
            # A Lock2's reply: the struct with block addresses in it (the same steps as below).
            return _apply_struct_maps(request, reply, args, blocks)
    try:
        if not isinstance(reply, wire.IoctlReply):
            raise NodeProtocolError(errno.EPROTO, "the dxg node answered an ioctl wrongly")
        if len(reply.struct) != len(request.struct):
            raise NodeProtocolError(errno.EPROTO, "the dxg node changed the struct size")
        if len(reply.fixups) != len(fds):
            raise NodeProtocolError(errno.EPROTO, "descriptors and fixups disagree")
        for w in reply.writes:
            if not _inside_writable(request.regions, w.addr, len(w.data)):
                raise NodeProtocolError(
                    errno.EPROTO, f"the dxg node wrote outside the buffers sent (0x{w.addr:x})")
        for f in (*reply.fixups, *(m for m in reply.maps if m.op == wire.MAP)):
            inside = (f.where + f.width <= len(request.struct) if f.target == wire.FD_IN_STRUCT
                      else _inside_writable(request.regions, f.where, f.width))
            if not inside:
                raise NodeProtocolError(
                    errno.EPROTO, f"the dxg node put a descriptor outside the buffers sent "
                    f"(0x{f.where:x})")
    except NodeProtocolError:
        close_all(fds)
        raise
    ret = reply.ret
    for w in reply.writes:
        if not write(w.addr, w.data) and ret >= 0:
            ret = -errno.EFAULT
    body = bytearray(reply.struct)
    for f, fd in zip(reply.fixups, fds, strict=True):
        if f.target == wire.FD_IN_STRUCT:
            body[f.where : f.where + f.width] = fd.to_bytes(f.width, "little", signed=True)
    user_maps: list[tuple[int, bytes]] = []
    for m in reply.maps:
        if m.op != wire.MAP:
            continue
        addr = None if blocks is None else blocks.address(m.block, m.offset, m.block_size)
        if addr is None:
            if ret >= 0:
                ret = -errno.EFAULT  # the block never reached this process
            addr = 0
        raw = addr.to_bytes(8, "little")
        if m.target == wire.FD_IN_STRUCT:
            body[m.where : m.where + 8] = raw
        else:
            user_maps.append((m.where, raw))
    for where, raw in user_maps:
        if not write(where, raw) and ret >= 0:
            ret = -errno.EFAULT
    ctypes.memmove(ctypes.addressof(args), bytes(body), len(body))
    for f, fd in zip(reply.fixups, fds, strict=True):
        if f.target == wire.FD_IN_USER and not write(
                f.where, fd.to_bytes(f.width, "little", signed=True)):
            close_all((fd,))  # its number cannot reach the caller: nobody could close it
            if ret >= 0:
                ret = -errno.EFAULT
    return ret


def _apply_struct_maps(request: wire.IoctlRequest, reply: wire.IoctlReply,
                       args: ctypes.Structure | ctypes.Union, blocks: BlockMaps | None) -> int:
    """:func:`apply_ioctl_reply` of a reply whose only tables are maps into the struct."""
    size = len(request.struct)
    for m in reply.maps:
        if m.op == wire.MAP and m.where + m.width > size:
            raise NodeProtocolError(errno.EPROTO, f"the dxg node put a descriptor outside the "
                                    f"buffers sent (0x{m.where:x})")
    ret = reply.ret
    body = bytearray(reply.struct)
    for m in reply.maps:
        if m.op != wire.MAP:
            continue
        addr = None if blocks is None else blocks.address(m.block, m.offset, m.block_size)
        if addr is None:
            if ret >= 0:
                ret = -errno.EFAULT  # the block never reached this process
            addr = 0
        body[m.where : m.where + 8] = addr.to_bytes(8, "little")
    memoryview(args).cast("B")[:] = body
    return ret


# ---- routing replies ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivered:
    """The reply to request ``seq`` and the descriptors that came with it (now the caller's)."""

    seq: int
    message: wire.Message
    fds: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Failed:
    """Request ``seq`` failed on its own (a non-fatal ERROR); the connection goes on."""

    seq: int
    failure: Failure


class RouterBroken(Exception):
    """The stream from the node cannot be trusted any more: the connection must drop, and every
    request in flight fails with ``failure()``."""

    def __init__(self, failure: Failure) -> None:
        super().__init__("node connection broken")
        self.failure = failure


@dataclass(slots=True)
class _FdBatch:
    """Descriptors from one recvmsg: they belong to the frame whose first byte lies in
    [start, end) of the stream (the kernel attaches them to the first byte of the sendmsg that
    carried them, and stops a read after such a segment)."""

    start: int
    end: int
    fds: list[int]


class ReplyRouter:
    """Matches replies to requests in flight. Not thread-safe: the connection serializes it.

    ``register`` gives each request a fresh seq; ``feed`` takes what one read returned and
    yields :class:`Delivered`/:class:`Failed` outcomes; ``abandon`` marks a request whose caller
    gave up (its reply, when it comes, is dropped and its descriptors closed); ``forget`` drops
    one that never reached the node. A reply to a seq neither in flight nor abandoned, a frame
    the wire does not allow, or descriptors that do not line up with their frames raise
    :class:`RouterBroken`."""

    def __init__(self, where: str = "the dxg node") -> None:
        self._where = where
        self.blocks = BlockMaps()
        self._decoder = wire.FrameDecoder()
        self._fed = 0
        self._batches: deque[_FdBatch] = deque()
        self._pending: dict[int, wire.Kind] = {}
        self._abandoned: set[int] = set()
        self._chunks: dict[int, list[bytes]] = {}
        self._chunk_bytes: dict[int, int] = {}
        self._seq = 0
        self.broken = False

    # -- requests --

    def register(self, expect: wire.Kind) -> int:
        """A seq for a new request whose reply will be of kind ``expect``."""
        while True:
            self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
            if self._seq not in self._pending and self._seq not in self._abandoned:
                break
        self._pending[self._seq] = expect
        return self._seq

    def abandon(self, seq: int) -> bool:
        """The caller of ``seq`` gave up; True if its reply is still to come (worth a CANCEL)."""
        if self._pending.pop(seq, None) is None:
            return False
        self._abandoned.add(seq)
        self._chunks.pop(seq, None)
        self._chunk_bytes.pop(seq, None)
        return True

    def forget(self, seq: int) -> None:
        """``seq`` never reached the node: no reply will come."""
        self._pending.pop(seq, None)
        self._abandoned.discard(seq)
        self._chunks.pop(seq, None)
        self._chunk_bytes.pop(seq, None)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def abandoned(self) -> frozenset[int]:
        return frozenset(self._abandoned)

    def header_needed(self) -> int:
        return self._decoder.header_needed()

    # -- input --

    def feed(self, data: bytes, fds: list[int] | None = None) -> list[Delivered | Failed]:
        """Route what one read returned. The descriptors are the router's from here on."""
        if not fds and not self._batches and not self.broken:
            # The common read: exactly one whole frame, nothing before it, no descriptors.
            frame = self._decoder.take_whole(data)
            if frame is not None:
                start = self._fed
                self._fed += len(data)
                out: list[Delivered | Failed] = []
                try:
                    if frame.flags & wire.FLAG_FD_MASK:
                        self._route(frame, start, out)  # (it claims descriptors: broken)
                    elif (frame.kind == _KIND_IOCTL_REPLY and not frame.flags
                          and self._pending.get(frame.seq) is _IOCTL_REPLY):
                        self._deliver_reply(frame, out)
                    else:
                        self._route_frame(frame, [], out)
                except RouterBroken:
                    self._break(out)
                    raise
                return out
        fds = list(fds or ())
        if self.broken:
            close_all(fds)
            raise RouterBroken(self._lost("the connection is already broken"))
        start = self._fed
        self._fed += len(data)
        if fds:
            if not data:
                close_all(fds)
                self._break()
                raise RouterBroken(self._protocol("descriptors arrived without data"))
            self._batches.append(_FdBatch(start, self._fed, fds))
        out = []
        try:
            self._decoder.feed(data)
            while True:
                frame_start = self._fed - self._decoder.buffered
                frame = self._decoder.next_frame()
                if frame is None:
                    break
                self._route(frame, frame_start, out)
            if self._batches and self._batches[0].end <= self._fed - self._decoder.buffered:
                raise RouterBroken(self._protocol("descriptors arrived that no frame claimed"))
        except wire.WireError as e:
            self._break(out)
            raise RouterBroken(self._protocol(f"broken stream: {e}", e.errno)) from None
        except RouterBroken:
            self._break(out)
            raise
        return out

    def close(self) -> None:
        """Close every descriptor not yet handed to a caller, and unmap every block."""
        self._break()
        self.blocks.close()

    # -- internals --

    def _break(self, undelivered: list[Delivered | Failed] | None = None) -> None:
        self.broken = True
        for b in self._batches:
            close_all(b.fds)
        self._batches.clear()
        for o in undelivered or ():
            if isinstance(o, Delivered):
                close_all(o.fds)

    def _protocol(self, text: str, err: int = errno.EPROTO) -> Failure:
        message = f"bad reply from {self._where}: {text}"
        return lambda: NodeProtocolError(err, message)

    def _lost(self, text: str) -> Failure:
        message = f"lost {self._where}: {text}"
        return lambda: NodeUnavailable(message)

    def _claim(self, frame: wire.Frame, start: int) -> list[int]:
        """The descriptors of the frame that starts at stream offset ``start``."""
        batches = self._batches
        if batches and batches[0].end <= start:
            raise RouterBroken(self._protocol("descriptors arrived that no frame claimed"))
        want = frame.fd_count
        if not want:
            return []
        if not batches or not batches[0].start <= start < batches[0].end:
            raise RouterBroken(self._protocol(f"a frame claims {want} descriptors that did "
                                              "not arrive with it"))
        if len(batches[0].fds) != want:
            raise RouterBroken(self._protocol(f"a frame claims {want} descriptors, "
                                              f"{len(batches[0].fds)} arrived with it"))
        return batches.popleft().fds

    def _route(self, frame: wire.Frame, start: int, out: list[Delivered | Failed]) -> None:
        fds = self._claim(frame, start)
        try:
            self._route_frame(frame, fds, out)
        except BaseException:
            close_all(fds)
            raise

    def _route_frame(self, frame: wire.Frame, fds: list[int],
                     out: list[Delivered | Failed]) -> None:
        seq, kind = frame.seq, frame.kind
        error: wire.Message | None = None
        if kind == _KIND_ERROR:
            error = self._decode(frame)
            if isinstance(error, wire.ErrorReply) and error.fatal:
                text = f"{self._where}: {error.message}"
                err = error.errno
                raise RouterBroken(lambda: NodeProtocolError(err, text))
        elif kind not in _REPLY_KINDS:
            raise RouterBroken(self._protocol(f"a frame of kind {_kind_name(kind)}"))
        decoded: wire.Message | None = None
        if kind == _KIND_IOCTL_REPLY and _has_maps(frame.payload):
            # Block maps first, whoever waits for the reply (or nobody: it gave up).
            self._check_known(seq)
            decoded = self._decode(frame)
            if isinstance(decoded, wire.IoctlReply) and decoded.maps:
                n = len(decoded.fixups)
                self.blocks.receive(decoded.maps, fds[n:])
                del fds[n:]
        if seq not in self._pending:
            self._check_known(seq)
            if seq in self._abandoned:
                if not frame.more:
                    self._abandoned.discard(seq)
                close_all(fds)
                return
        if kind == _KIND_ADMIN_REPLY and (frame.more or seq in self._chunks):
            if frame.flags & ~wire.FLAG_MORE:
                raise RouterBroken(self._protocol("bad flags on an ADMIN_REPLY chunk"))
            size = self._chunk_bytes.get(seq, 0) + len(frame.payload)
            if size > MAX_ADMIN_REPLY:
                raise RouterBroken(self._protocol("admin reply too large", errno.EMSGSIZE))
            self._chunk_bytes[seq] = size
            self._chunks.setdefault(seq, []).append(frame.payload)
            if frame.more:
                return
            payload = b"".join(self._chunks.pop(seq))
            self._chunk_bytes.pop(seq, None)
            frame = wire.Frame(frame.kind, seq, payload, 0)
        msg = error if error is not None else (
            decoded if decoded is not None else self._decode(frame))
        expect = self._pending.pop(seq)
        if self._chunks:
            self._chunks.pop(seq, None)
        if self._chunk_bytes:
            self._chunk_bytes.pop(seq, None)
        if isinstance(msg, wire.ErrorReply):
            close_all(fds)
            text = f"{self._where}: {msg.message}"
            err = msg.errno
            out.append(Failed(seq, lambda: NodeProtocolError(err, text)))
        elif kind != expect:
            close_all(fds)
            out.append(Failed(seq, self._protocol(
                f"{_kind_name(frame.kind)} to a request that wants {expect.name}")))
        else:
            out.append(Delivered(seq, msg, fds))

    def _deliver_reply(self, frame: wire.Frame, out: list[Delivered | Failed]) -> None:
        """:meth:`_route_frame` for the common frame: an IOCTL_REPLY that carries no
        descriptors, to an ioctl in flight. The same steps, without the branches that cannot
        apply: its block maps (none brings a descriptor, or it does not decode) are taken in,
        then the reply is delivered."""
        msg = self._decode(frame)
        if msg.maps:  # type: ignore[union-attr]
            self.blocks.receive(msg.maps, [])  # type: ignore[union-attr]
        seq = frame.seq
        del self._pending[seq]
        if self._chunks:
            self._chunks.pop(seq, None)
        if self._chunk_bytes:
            self._chunk_bytes.pop(seq, None)
        out.append(Delivered(seq, msg, []))

    def _decode(self, frame: wire.Frame) -> wire.Message:
        try:
            return wire.decode(frame)
        except wire.MalformedMessage as e:
            raise RouterBroken(self._protocol(str(e), e.errno)) from None

    def _check_known(self, seq: int) -> None:
        if seq not in self._pending and seq not in self._abandoned:
            raise RouterBroken(self._protocol(f"a reply to seq {seq}, which is not in flight"))


def _has_maps(payload: bytes) -> bool:
    """Whether an IOCTL_REPLY payload declares block maps (its map_count, at byte 20)."""
    return len(payload) >= 24 and payload[20:24] != b"\0\0\0\0"


def _kind_name(kind: int) -> str:
    try:
        return wire.Kind(kind).name
    except ValueError:
        return f"unknown kind {kind}"
