"""The client <-> node wire (sans I/O): bytes in, typed messages out, and back.

A process talks to the node over one Unix stream connection. The connection *is* the process,
as an open ``/dev/dxg`` file is in the kernel. This module knows nothing of sockets:
:class:`FrameDecoder` turns a byte stream into :class:`Frame` objects, :func:`decode` turns a frame
into a message, and :func:`encode` does the reverse. Anyone can test it with bytes alone. It lives
in the contract layer because the client and the node both speak it.

Wire version 3 (2 plus block maps in IOCTL_REPLY). All integers little-endian.

Frame (every message)::

    0   u32 magic    0x4E475844 (the bytes "DXGN")
    4   u16 kind     Kind below
    6   u16 flags    bits 0-7: file descriptors that travel with this frame (SCM_RIGHTS on the
                     frame's first byte), at most MAX_FDS; bit 8 MORE: an ADMIN_REPLY chunk that
                     more chunks with the same seq follow; other bits reserved (0)
    8   u32 seq      chosen by the client per request; every reply to it carries the same seq
    12  u32 length   payload bytes that follow, at most MAX_PAYLOAD (4 MiB)

Many requests may be in flight on one connection: the node answers each when it is done, in any
order, and the client matches replies to requests by ``seq`` (a thread of a client blocked in a
long call does not hold up the other threads of that process). Seq 0 is never a request's: the
node uses it for an ERROR about no request in particular (a fatal ERROR ends the connection
whatever its seq). A client does not reuse a seq while a request with it is in flight or has been
cancelled and not yet answered (the node answers EBUSY to a seq already in flight). Replies to
different requests may interleave, ADMIN_REPLY chunks included.

A bad magic or an over-long length is a *framing* error (:class:`WireError`): the stream
cannot be trusted any more, so the node answers ERROR (fatal) and closes the connection. Any
other defect (unknown kind, reserved flags, a payload that does not parse, a descriptor count that
disagrees with the payload) leaves the framing intact: the node answers ERROR (not fatal) with
the request's seq and the connection goes on.

Kinds and payloads:

``HELLO`` (1, client -> node; must be the first frame)::

    u16 min_version, u16 max_version, u32 reserved (0)

    Until it has answered HELLO the node reads frames of at most MAX_HELLO_PAYLOAD (64) bytes.
    No common version: ERROR(EPROTONOSUPPORT, fatal), whose text names the versions the node
    speaks (a wire-1 client learns that it must be upgraded).

``HELLO_REPLY`` (2, node -> client)::

    u16 version, u16 reserved, u32 max_payload, u32 max_regions, u32 max_fds,
    then the node's name in UTF-8 (at most 256 bytes)

``IOCTL`` (3, client -> node)::

    u32 code          the full 32-bit ioctl code, _IOWR('G', nr, struct), size bits included
    u32 struct_len    bytes of the argument struct (must equal _IOC_SIZE(code))
    u32 region_count  at most MAX_REGIONS (4096)
    u32 fd_count      descriptors the caller hands over (must equal the frame's fd bits)
    struct bytes
    region_count x { u64 addr, u32 length, u32 flags }
    fd_count x { i32 number, u32 reserved (0) }
    the data of each IN region, in table order, concatenated

    A *region* is a range of the caller's memory that a pointer in the struct (or in a buffer
    it points to) refers to. flags: REGION_IN (1) = its bytes are carried and the driver may
    read them; REGION_OUT (2) = the driver may write it. At least one flag; addr != 0;
    1 <= length; addr + length <= 2**64; regions sorted by addr and not overlapping; and
    ``16 + struct_len + 16 * region_count + 8 * fd_count + sum(length)`` <= MAX_PAYLOAD. The IN
    data must fill the rest of the payload exactly. NULL pointers send no region.

    ``number`` is the caller's own number for the i-th descriptor sent, as it wrote it into the
    struct or a buffer (an eventfd, a shared object): the driver asks for a descriptor by that
    number and gets the one that travelled. Numbers are distinct and >= 0.

``IOCTL_REPLY`` (4, node -> client)::

    i64 ret           0, a positive NTSTATUS success code, or a negative errno
    u32 struct_len    the struct after the call (same length as sent)
    u32 write_count
    u32 fd_count      descriptor fixups (below)
    u32 map_count     block maps (below), at most MAX_MAPS
    struct bytes
    write_count x { u64 addr, u32 length, u32 reserved (0) }
    fd_count x { u8 target, u8 width, u16 reserved, u32 reserved, u64 where }
    map_count x { u8 op, u8 target, u8 flags, u8 width, u32 reserved (0),
                  u64 block, u64 block_size, u64 offset, u64 where }
    the data of each write, in table order, concatenated

    The frame carries fd_count descriptors for the fixups, then one for each MAP entry with
    MAP_WITH_FD, in table order.

    Writes are what the driver stored into user memory: at most one per OUT region of the
    request, covering the span from the first to the last byte the driver wrote there. Inside
    that span, bytes the driver did not write carry the region's data as sent (IN|OUT) or zero
    (OUT only), so clients send a region IN|OUT when it matters. The client applies them in
    order, then copies the struct.

    The i-th fd entry says where the number of the i-th descriptor received must be stored, the
    way the kernel stores the number of a descriptor it installs: target FD_IN_STRUCT (0) at byte
    ``where`` of the struct, FD_IN_USER (1) at user address ``where`` (inside an OUT region of
    the request), as a ``width``-byte (4 or 8) little-endian integer. The client applies these
    last. The descriptors are the caller's from then on.

    Block maps put shared memory into the caller, the way the kernel maps pages into it: a
    *block* is a shared memory object of ``block_size`` bytes that the node names by a number
    unique within the connection (never reused). ``MAP`` (1): the caller maps the block (it
    arrives as a descriptor with MAP_WITH_FD (1), the first time; later maps of the same block
    reuse the caller's mapping), read-only with MAP_READONLY (2), and stores the address of byte
    ``offset`` of it as a ``width``-byte (8) integer at ``where`` (target as for descriptors).
    ``UNMAP`` (2): the block is gone; the caller unmaps it (target, flags, width, offset and
    where are 0). The client handles the maps of every reply it reads, even one to a request
    it gave up on, in the order the replies arrive, before anything else of the reply, so a
    later reply can name a block an earlier one brought.

``ADMIN`` (5, client -> node): one JSON object, UTF-8.

``ADMIN_REPLY`` (6, node -> client): one JSON object, UTF-8, possibly in several frames: every
frame but the last has the MORE flag; the client joins the payloads in order (a chunk alone is
not JSON: join first, then :func:`decode` the joined frame). Replies of any size work; each frame
still respects MAX_PAYLOAD.

``ERROR`` (7, node -> client)::

    i32 errno (> 0), u32 flags (bit 0 FATAL: the node closes the connection after it),
    then a message in UTF-8 (at most 1024 bytes)

``CANCEL`` (8, client -> node; empty payload): the client gave up on request ``seq`` (a thread
interrupted while it waited). The node cancels that call if it is still running and answers it
(an IOCTL with ``ret = -EINTR``, an ADMIN with ERROR(EINTR)), or not at all if it had already
answered; CANCEL itself gets no reply. What the driver had asked a host to do for the call is
not undone unless it created something (then it is destroyed when the host answers): a long
host command of a cancelled call runs to its end, or until its process or device goes.
"""

from __future__ import annotations

import errno
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from types import MappingProxyType
from typing import Any

__all__ = [
    "FD_IN_STRUCT",
    "FD_IN_USER",
    "FLAG_MORE",
    "HEADER_SIZE",
    "MAGIC",
    "MAP",
    "MAP_READONLY",
    "MAP_WITH_FD",
    "MAX_ERROR_TEXT",
    "MAX_FDS",
    "MAX_HELLO_PAYLOAD",
    "MAX_MAPS",
    "MAX_NODE_NAME",
    "MAX_PAYLOAD",
    "MAX_REGIONS",
    "MAX_STRUCT",
    "MAX_WIRE_VERSION",
    "MIN_WIRE_VERSION",
    "REGION_IN",
    "REGION_OUT",
    "UNMAP",
    "AdminReply",
    "AdminRequest",
    "BlockMap",
    "Cancel",
    "ErrorReply",
    "FdFixup",
    "Frame",
    "FrameDecoder",
    "Hello",
    "HelloReply",
    "IoctlReply",
    "IoctlRequest",
    "Kind",
    "MalformedMessage",
    "Message",
    "Region",
    "WireError",
    "Write",
    "admin_reply_frames",
    "decode",
    "encode",
    "frame_bytes",
    "negotiate",
]

MAGIC = 0x4E475844
MIN_WIRE_VERSION = 3
MAX_WIRE_VERSION = 3
MAX_PAYLOAD = 4 * 1024 * 1024
MAX_HELLO_PAYLOAD = 64  # what a node reads before the handshake (a HELLO is 8 bytes)
MAX_REGIONS = 4096
MAX_FDS = 16  # descriptors one frame may carry
MAX_MAPS = 1024  # block maps one reply may carry
MAX_STRUCT = 0x3FFF  # _IOC_SIZE is 14 bits wide
MAX_ERROR_TEXT = 1024
MAX_NODE_NAME = 256

REGION_IN = 1
REGION_OUT = 2
FD_IN_STRUCT = 0
FD_IN_USER = 1
MAP = 1
UNMAP = 2
MAP_WITH_FD = 1
MAP_READONLY = 2
_MAP_FLAGS = MAP_WITH_FD | MAP_READONLY
FLAG_FD_MASK = 0xFF
FLAG_MORE = 0x100
_KNOWN_FLAGS = FLAG_FD_MASK | FLAG_MORE
_REGION_FLAGS = REGION_IN | REGION_OUT
_ERROR_FATAL = 1
_U64_END = 1 << 64

_HEADER = struct.Struct("<IHHII")
HEADER_SIZE = _HEADER.size
_HELLO = struct.Struct("<HHI")
_HELLO_REPLY = struct.Struct("<HHIII")
_IOCTL = struct.Struct("<IIII")
_REGION = struct.Struct("<QII")
_FD_NUMBER = struct.Struct("<iI")
_REPLY = struct.Struct("<qIIII")
_WRITE = struct.Struct("<QII")
_FIXUP = struct.Struct("<BBHIQ")
_MAP_ENTRY = struct.Struct("<BBBBIQQQQ")
_ERROR = struct.Struct("<iI")
# A whole frame's header and its IOCTL / IOCTL_REPLY head in one pack (the common frames).
_IOCTL_FRAME = struct.Struct("<IHHIIIIII")
_REPLY_FRAME = struct.Struct("<IHHIIqIIII")


class Kind(IntEnum):
    HELLO = 1
    HELLO_REPLY = 2
    IOCTL = 3
    IOCTL_REPLY = 4
    ADMIN = 5
    ADMIN_REPLY = 6
    ERROR = 7
    CANCEL = 8


_KINDS = MappingProxyType({int(k): k for k in Kind})
_KIND_IOCTL = int(Kind.IOCTL)
_KIND_IOCTL_REPLY = int(Kind.IOCTL_REPLY)
_KIND_ADMIN_REPLY = int(Kind.ADMIN_REPLY)
# Kinds that may carry descriptors (the frame's fd bits); any other kind with fd bits is malformed.
_FD_KINDS = frozenset({Kind.IOCTL, Kind.IOCTL_REPLY})


class WireError(Exception):
    """The byte stream is broken (bad magic, over-long frame): the connection must close."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


class MalformedMessage(Exception):
    """One frame's payload is invalid; the framing is intact and the connection can go on."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


# ---- messages -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Frame:
    kind: int
    seq: int
    payload: bytes
    flags: int = 0

    @property
    def fd_count(self) -> int:
        """Descriptors that travel with this frame (its first byte carries them)."""
        return self.flags & FLAG_FD_MASK

    @property
    def more(self) -> bool:
        return bool(self.flags & FLAG_MORE)


@dataclass(frozen=True, slots=True)
class Hello:
    min_version: int = MIN_WIRE_VERSION
    max_version: int = MAX_WIRE_VERSION


@dataclass(frozen=True, slots=True)
class HelloReply:
    version: int
    max_payload: int = MAX_PAYLOAD
    max_regions: int = MAX_REGIONS
    max_fds: int = MAX_FDS
    node_name: str = ""


@dataclass(frozen=True, slots=True)
class Region:
    """A range of the caller's memory; ``data`` is its content when ``flags`` has REGION_IN."""

    addr: int
    length: int
    flags: int
    data: bytes | None = None

    @property
    def readable(self) -> bool:
        return bool(self.flags & REGION_IN)

    @property
    def writable(self) -> bool:
        return bool(self.flags & REGION_OUT)

    @property
    def end(self) -> int:
        return self.addr + self.length


@dataclass(frozen=True, slots=True)
class IoctlRequest:
    code: int
    struct: bytes
    regions: tuple[Region, ...] = ()
    fd_numbers: tuple[int, ...] = ()  # the caller's numbers of the descriptors that travel


@dataclass(frozen=True, slots=True)
class Write:
    addr: int
    data: bytes


@dataclass(frozen=True, slots=True)
class FdFixup:
    """Where the client stores the number of one descriptor it received."""

    target: int  # FD_IN_STRUCT or FD_IN_USER
    where: int  # struct offset or user address
    width: int = 8  # 4 or 8 bytes, little-endian


@dataclass(frozen=True, slots=True)
class BlockMap:
    """Map a block into the caller (MAP) or unmap it (UNMAP); see IOCTL_REPLY."""

    op: int  # MAP or UNMAP
    block: int
    block_size: int = 0
    offset: int = 0
    where: int = 0
    target: int = FD_IN_STRUCT
    flags: int = 0  # MAP_WITH_FD, MAP_READONLY
    width: int = 8

    @property
    def with_fd(self) -> bool:
        return bool(self.flags & MAP_WITH_FD)


@dataclass(frozen=True, slots=True)
class IoctlReply:
    ret: int
    struct: bytes
    writes: tuple[Write, ...] = ()
    fixups: tuple[FdFixup, ...] = ()  # one per descriptor fixup
    maps: tuple[BlockMap, ...] = ()  # the MAPs with MAP_WITH_FD bring one descriptor each

    @property
    def fd_count(self) -> int:
        if not self.maps:  # (the common reply: no generator to run)
            return len(self.fixups)
        return len(self.fixups) + sum(1 for m in self.maps if m.flags & MAP_WITH_FD)


@dataclass(frozen=True, slots=True)
class AdminRequest:
    request: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AdminReply:
    reply: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ErrorReply:
    errno: int
    message: str = ""
    fatal: bool = False


@dataclass(frozen=True, slots=True)
class Cancel:
    """The client gave up on the request whose seq this frame carries."""


Message = (
    Hello | HelloReply | IoctlRequest | IoctlReply | AdminRequest | AdminReply | ErrorReply | Cancel
)


def negotiate(hello: Hello) -> int | None:
    """The version a node speaking MIN..MAX_WIRE_VERSION picks for ``hello``, or None."""
    top = min(hello.max_version, MAX_WIRE_VERSION)
    if top < max(hello.min_version, MIN_WIRE_VERSION):
        return None
    return top


# ---- framing ------------------------------------------------------------------------------------


class FrameDecoder:
    """Accumulates stream bytes and yields whole frames; raises :class:`WireError` on a broken
    stream (after which it must not be fed again).

    ``max_payload`` is the longest payload accepted; a node starts a connection with
    MAX_HELLO_PAYLOAD and raises it to MAX_PAYLOAD once the handshake is done (bytes already
    buffered are kept)."""

    __slots__ = ("_broken", "_buf", "_max", "_pos")

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._max = self._check_limit(max_payload)
        self._broken = False

    @staticmethod
    def _check_limit(limit: int) -> int:
        if not 0 <= limit <= MAX_PAYLOAD:
            raise ValueError(f"payload limit {limit} outside 0..{MAX_PAYLOAD}")
        return limit

    @property
    def max_payload(self) -> int:
        return self._max

    @max_payload.setter
    def max_payload(self, limit: int) -> None:
        self._max = self._check_limit(limit)

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        if self._broken:
            raise WireError(errno.EPROTO, "stream already broken")
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def take_whole(self, data: bytes) -> Frame | None:
        """``feed(data)`` then ``next_frame()`` in one step, for the common read: nothing
        buffered and ``data`` exactly one whole frame that passes the checks. In any other case
        None, with nothing taken (``feed`` it as usual)."""
        size = len(data)
        if self._pos != len(self._buf) or self._broken or size < HEADER_SIZE:
            return None
        magic, kind, flags, seq, length = _HEADER.unpack_from(data)
        if magic != MAGIC or length > self._max or HEADER_SIZE + length != size:
            return None
        return Frame(kind, seq, data[HEADER_SIZE:], flags)

    def header_needed(self) -> int:
        """Bytes still missing before the next frame is complete (at least 1 when none is)."""
        have = len(self._buf) - self._pos
        if have < HEADER_SIZE:
            return HEADER_SIZE - have
        length = _HEADER.unpack_from(self._buf, self._pos)[4]
        return max(HEADER_SIZE + length - have, 0)

    def next_frame(self) -> Frame | None:
        if self._broken:
            raise WireError(errno.EPROTO, "stream already broken")
        buf, pos = self._buf, self._pos
        if len(buf) - pos < HEADER_SIZE:
            return None
        magic, kind, flags, seq, length = _HEADER.unpack_from(buf, pos)
        if magic != MAGIC:
            self._broken = True
            raise WireError(errno.EPROTO, f"bad frame magic 0x{magic:08X}")
        if length > self._max:
            self._broken = True
            raise WireError(
                errno.EMSGSIZE, f"frame of {length} bytes exceeds the limit of {self._max}"
            )
        end = pos + HEADER_SIZE + length
        if len(buf) < end:
            return None
        payload = bytes(memoryview(buf)[pos + HEADER_SIZE : end])
        if end == len(buf):
            buf.clear()
            self._pos = 0
        else:
            self._pos = end
        return Frame(kind, seq, payload, flags)

    def frames(self) -> Iterator[Frame]:
        while (frame := self.next_frame()) is not None:
            yield frame


def frame_bytes(kind: int, seq: int, payload: bytes, flags: int = 0) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds MAX_PAYLOAD")
    return _HEADER.pack(MAGIC, kind, flags, seq & 0xFFFFFFFF, len(payload)) + payload


# ---- encode -------------------------------------------------------------------------------------


def _check_regions(regions: tuple[Region, ...]) -> int:
    """Validate a region table (the encoder's side of the rules); return sum of lengths."""
    if len(regions) > MAX_REGIONS:
        raise ValueError(f"{len(regions)} regions exceed MAX_REGIONS")
    total = 0
    prev_end = 0
    for r in regions:
        if not r.flags or r.flags & ~_REGION_FLAGS:
            raise ValueError(f"bad region flags {r.flags}")
        if r.addr <= 0 or r.length <= 0 or r.end > _U64_END:
            raise ValueError(f"bad region 0x{r.addr:x}+{r.length}")
        if r.addr < prev_end:
            raise ValueError("regions must be sorted and must not overlap")
        if r.readable != (r.data is not None) or (r.data is not None and len(r.data) != r.length):
            raise ValueError("an IN region carries exactly its bytes; others carry none")
        prev_end = r.end
        total += r.length
    return total


def _check_fd_numbers(numbers: tuple[int, ...]) -> None:
    if len(numbers) > MAX_FDS:
        raise ValueError(f"{len(numbers)} descriptors exceed MAX_FDS ({MAX_FDS})")
    if len(set(numbers)) != len(numbers) or any(not 0 <= n < 1 << 31 for n in numbers):
        raise ValueError("descriptor numbers must be distinct and >= 0")


def _check_fixups(fixups: tuple[FdFixup, ...]) -> None:
    if len(fixups) > MAX_FDS:
        raise ValueError(f"{len(fixups)} descriptors exceed MAX_FDS ({MAX_FDS})")
    for f in fixups:
        if f.target not in (FD_IN_STRUCT, FD_IN_USER) or f.width not in (4, 8):
            raise ValueError(f"bad descriptor fixup {f}")
        if not 0 <= f.where < _U64_END - f.width:
            raise ValueError(f"bad descriptor fixup place 0x{f.where:x}")


def _check_maps(maps: tuple[BlockMap, ...], struct_len: int) -> None:
    if len(maps) > MAX_MAPS:
        raise ValueError(f"{len(maps)} block maps exceed MAX_MAPS ({MAX_MAPS})")
    for b in maps:
        if not _map_ok(b.op, b.target, b.flags, b.width, b.block, b.block_size, b.offset,
                       b.where, struct_len):
            raise ValueError(f"bad block map {b}")


def _map_ok(op: int, target: int, flags: int, width: int, block: int, size: int, offset: int,
            where: int, struct_len: int) -> bool:
    if op == UNMAP:
        return not (target or flags or width or size or offset or where)
    if op != MAP or flags & ~_MAP_FLAGS or width != 8 or size <= 0 or offset >= size:
        return False
    if target == FD_IN_STRUCT:
        return where + width <= struct_len
    return target == FD_IN_USER and 0 < where and where + width <= _U64_END


def _encode_payload(msg: Message) -> tuple[Kind, bytes, int]:
    """(kind, payload, fd count) of ``msg``."""
    if isinstance(msg, IoctlRequest):
        if len(msg.struct) > MAX_STRUCT:
            raise ValueError("struct too large")
        total = _check_regions(msg.regions)
        _check_fd_numbers(msg.fd_numbers)
        fixed = (_IOCTL.size + len(msg.struct) + _REGION.size * len(msg.regions)
                 + _FD_NUMBER.size * len(msg.fd_numbers))
        if fixed + total > MAX_PAYLOAD:
            raise ValueError("request (with all its regions) exceeds MAX_PAYLOAD")
        parts = [_IOCTL.pack(msg.code, len(msg.struct), len(msg.regions), len(msg.fd_numbers)),
                 msg.struct]
        parts += [_REGION.pack(r.addr, r.length, r.flags) for r in msg.regions]
        parts += [_FD_NUMBER.pack(n, 0) for n in msg.fd_numbers]
        parts += [r.data for r in msg.regions if r.data is not None]
        return Kind.IOCTL, b"".join(parts), len(msg.fd_numbers)
    if isinstance(msg, IoctlReply):
        if len(msg.struct) > MAX_STRUCT:
            raise ValueError("struct too large")
        for w in msg.writes:
            if w.addr <= 0 or not w.data or w.addr + len(w.data) > _U64_END:
                raise ValueError(f"bad write 0x{w.addr:x}+{len(w.data)}")
        _check_fixups(msg.fixups)
        _check_maps(msg.maps, len(msg.struct))
        if msg.fd_count > MAX_FDS:
            raise ValueError(f"{msg.fd_count} descriptors exceed MAX_FDS ({MAX_FDS})")
        parts = [_REPLY.pack(msg.ret, len(msg.struct), len(msg.writes), len(msg.fixups),
                             len(msg.maps)), msg.struct]
        parts += [_WRITE.pack(w.addr, len(w.data), 0) for w in msg.writes]
        parts += [_FIXUP.pack(f.target, f.width, 0, 0, f.where) for f in msg.fixups]
        parts += [_MAP_ENTRY.pack(b.op, b.target, b.flags, b.width, 0, b.block, b.block_size,
                                  b.offset, b.where) for b in msg.maps]
        parts += [w.data for w in msg.writes]
        return Kind.IOCTL_REPLY, b"".join(parts), msg.fd_count
    if isinstance(msg, Hello):
        return Kind.HELLO, _HELLO.pack(msg.min_version, msg.max_version, 0), 0
    if isinstance(msg, HelloReply):
        name = msg.node_name.encode()[:MAX_NODE_NAME]
        head = _HELLO_REPLY.pack(msg.version, 0, msg.max_payload, msg.max_regions, msg.max_fds)
        return Kind.HELLO_REPLY, head + name, 0
    if isinstance(msg, AdminRequest):
        return Kind.ADMIN, _json_bytes(msg.request), 0
    if isinstance(msg, AdminReply):
        return Kind.ADMIN_REPLY, _json_bytes(msg.reply), 0
    if isinstance(msg, ErrorReply):
        text = msg.message.encode(errors="replace")[:MAX_ERROR_TEXT]
        return Kind.ERROR, _ERROR.pack(msg.errno, _ERROR_FATAL if msg.fatal else 0) + text, 0
    if isinstance(msg, Cancel):
        return Kind.CANCEL, b"", 0
    raise TypeError(f"not a wire message: {msg!r}")


def _json_bytes(obj: dict[str, Any]) -> bytes:
    if not isinstance(obj, dict):
        raise TypeError("admin messages are JSON objects")
    return json.dumps(obj, separators=(",", ":"), default=str).encode()


def encode(msg: Message, seq: int) -> bytes:
    """The whole frame (header + payload) for ``msg``. Raises ValueError if ``msg`` breaks a
    rule of the wire (the encoder never emits what :func:`decode` would reject). An ADMIN_REPLY
    larger than one frame must go through :func:`admin_reply_frames`."""
    # The common frames (a bare struct, no tables) in one pack: the same bytes as below.
    if type(msg) is IoctlReply and not msg.writes and not msg.fixups and not msg.maps:
        n = len(msg.struct)
        if n > MAX_STRUCT:
            raise ValueError("struct too large")
        return _REPLY_FRAME.pack(MAGIC, _KIND_IOCTL_REPLY, 0, seq & 0xFFFFFFFF, _REPLY.size + n,
                                 msg.ret, n, 0, 0, 0) + msg.struct
    if type(msg) is IoctlRequest and not msg.regions and not msg.fd_numbers:
        n = len(msg.struct)
        if n > MAX_STRUCT:
            raise ValueError("struct too large")
        return _IOCTL_FRAME.pack(MAGIC, _KIND_IOCTL, 0, seq & 0xFFFFFFFF, _IOCTL.size + n,
                                 msg.code, n, 0, 0) + msg.struct
    if type(msg) is IoctlReply and not msg.writes and not msg.fixups:
        return _encode_map_reply(msg, seq)  # a Lock2's reply: the struct and its block maps
    kind, payload, nfds = _encode_payload(msg)
    return frame_bytes(kind, seq, payload, nfds)


def _encode_map_reply(msg: IoctlReply, seq: int) -> bytes:
    """:func:`encode` of an IOCTL_REPLY whose only tables are block maps, in one pack for the
    heads: the same checks and the same bytes as :func:`_encode_payload` + :func:`frame_bytes`
    (its payload is at most 16 + MAX_STRUCT + 40 * MAX_MAPS bytes, far below MAX_PAYLOAD)."""
    n = len(msg.struct)
    if n > MAX_STRUCT:
        raise ValueError("struct too large")
    maps = msg.maps
    _check_maps(maps, n)
    nfds = 0
    entries = []
    for b in maps:
        if b.flags & MAP_WITH_FD:
            nfds += 1
        entries.append(_MAP_ENTRY.pack(b.op, b.target, b.flags, b.width, 0, b.block,
                                       b.block_size, b.offset, b.where))
    if nfds > MAX_FDS:
        raise ValueError(f"{nfds} descriptors exceed MAX_FDS ({MAX_FDS})")
    return b"".join((_REPLY_FRAME.pack(MAGIC, _KIND_IOCTL_REPLY, nfds, seq & 0xFFFFFFFF,
                                       _REPLY.size + n + _MAP_ENTRY.size * len(maps),
                                       msg.ret, n, 0, 0, len(maps)), msg.struct, *entries))


def admin_reply_frames(reply: dict[str, Any], seq: int,
                       chunk: int = MAX_PAYLOAD) -> list[bytes]:
    """An ADMIN_REPLY of any size, as frames of at most ``chunk`` payload bytes each."""
    data = _json_bytes(reply)
    if not 1 <= chunk <= MAX_PAYLOAD:
        raise ValueError("bad chunk size")
    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)] or [b""]
    last = len(pieces) - 1
    return [frame_bytes(Kind.ADMIN_REPLY, seq, p, 0 if i == last else FLAG_MORE)
            for i, p in enumerate(pieces)]


# ---- decode -------------------------------------------------------------------------------------


def _bad(message: str, err: int = errno.EINVAL) -> MalformedMessage:
    return MalformedMessage(err, message)


def _decode_hello(p: bytes) -> Hello:
    if len(p) != _HELLO.size:
        raise _bad("HELLO payload has the wrong size")
    lo, hi, reserved = _HELLO.unpack(p)
    if reserved:
        raise _bad("HELLO reserved field is not zero")
    return Hello(lo, hi)


def _decode_hello_reply(p: bytes) -> HelloReply:
    if len(p) < _HELLO_REPLY.size or len(p) > _HELLO_REPLY.size + MAX_NODE_NAME:
        raise _bad("HELLO_REPLY payload has the wrong size")
    version, r0, max_payload, max_regions, max_fds = _HELLO_REPLY.unpack_from(p)
    if r0:
        raise _bad("HELLO_REPLY reserved field is not zero")
    name = p[_HELLO_REPLY.size :].decode(errors="replace")
    return HelloReply(version, max_payload, max_regions, max_fds, name)


def _check_tables(struct_len: int, count: int, entries: str, nfds: int) -> None:
    """The sizes an IOCTL or IOCTL_REPLY header declares, against the wire's limits."""
    if struct_len > MAX_STRUCT:
        raise _bad(f"struct length {struct_len} exceeds {MAX_STRUCT}")
    if count > MAX_REGIONS:
        raise _bad(f"{count} {entries} exceed the limit of {MAX_REGIONS}", errno.E2BIG)
    if nfds > MAX_FDS:
        raise _bad(f"{nfds} descriptors exceed the limit of {MAX_FDS}", errno.E2BIG)


def _decode_ioctl(p: bytes) -> IoctlRequest:
    n = len(p)
    if n < _IOCTL.size:
        raise _bad("IOCTL payload shorter than its header")
    code, struct_len, count, nfds = _IOCTL.unpack_from(p)
    _check_tables(struct_len, count, "regions", nfds)
    table = _IOCTL.size + struct_len
    fd_table = table + _REGION.size * count
    data_at = fd_table + _FD_NUMBER.size * nfds
    if data_at > n:
        raise _bad("IOCTL payload truncated before the end of its tables")
    body = p[_IOCTL.size : table]
    if not count and not nfds:  # a bare struct: no tables to walk
        if data_at != n:
            raise _bad(f"IOCTL payload carries {n - data_at} data bytes, its regions declare 0")
        return IoctlRequest(code, body)
    raw: list[tuple[int, int, int]] = []
    prev_end = 0
    total = 0
    carried = 0
    for i in range(count):
        addr, length, flags = _REGION.unpack_from(p, table + i * _REGION.size)
        if not flags or flags & ~_REGION_FLAGS:
            raise _bad(f"region {i}: bad flags 0x{flags:x}")
        if addr == 0 or length == 0 or addr + length > _U64_END:
            raise _bad(f"region {i}: bad range 0x{addr:x}+{length}")
        if addr < prev_end:
            raise _bad(f"region {i}: regions unsorted or overlapping")
        prev_end = addr + length
        total += length
        if flags & REGION_IN:
            carried += length
        raw.append((addr, length, flags))
    if data_at + total > MAX_PAYLOAD:
        raise _bad("regions add up to more than the message limit", errno.E2BIG)
    if data_at + carried != n:
        raise _bad(f"IOCTL payload carries {n - data_at} data bytes, its regions declare {carried}")
    numbers = []
    for i in range(nfds):
        number, reserved = _FD_NUMBER.unpack_from(p, fd_table + i * _FD_NUMBER.size)
        if number < 0 or reserved:
            raise _bad(f"descriptor {i}: bad number {number}")
        numbers.append(number)
    if len(set(numbers)) != len(numbers):
        raise _bad("descriptor numbers repeat")
    regions = []
    at = data_at
    for addr, length, flags in raw:
        data = None
        if flags & REGION_IN:
            data = p[at : at + length]
            at += length
        regions.append(Region(addr, length, flags, data))
    return IoctlRequest(code, body, tuple(regions), tuple(numbers))


def _decode_ioctl_reply(p: bytes) -> IoctlReply:
    n = len(p)
    if n < _REPLY.size:
        raise _bad("IOCTL_REPLY payload shorter than its header")
    ret, struct_len, count, nfds, nmaps = _REPLY.unpack_from(p)
    _check_tables(struct_len, count, "writes", nfds)
    if nmaps > MAX_MAPS:
        raise _bad(f"{nmaps} block maps exceed the limit of {MAX_MAPS}", errno.E2BIG)
    table = _REPLY.size + struct_len
    fixups_at = table + _WRITE.size * count
    maps_at = fixups_at + _FIXUP.size * nfds
    data_at = maps_at + _MAP_ENTRY.size * nmaps
    if data_at > n:
        raise _bad("IOCTL_REPLY payload truncated before the end of its tables")
    body = p[_REPLY.size : table]
    if not count and not nfds and not nmaps:  # a bare struct: no tables to walk
        if data_at != n:
            raise _bad("IOCTL_REPLY payload has trailing bytes")
        return IoctlReply(ret, body)
    writes: list[Write] = []
    at = data_at
    for i in range(count):
        addr, length, reserved = _WRITE.unpack_from(p, table + i * _WRITE.size)
        if reserved or addr == 0 or length == 0 or addr + length > _U64_END:
            raise _bad(f"write {i}: bad entry 0x{addr:x}+{length}")
        if at + length > n:
            raise _bad(f"write {i}: data runs past the payload")
        writes.append(Write(addr, p[at : at + length]))
        at += length
    if at != n:
        raise _bad("IOCTL_REPLY payload has trailing bytes")
    fixups: list[FdFixup] = []
    for i in range(nfds):
        target, width, r0, r1, where = _FIXUP.unpack_from(p, fixups_at + i * _FIXUP.size)
        if target not in (FD_IN_STRUCT, FD_IN_USER) or width not in (4, 8) or r0 or r1:
            raise _bad(f"descriptor {i}: bad fixup")
        if target == FD_IN_STRUCT and where + width > struct_len:
            raise _bad(f"descriptor {i}: fixup outside the struct")
        if target == FD_IN_USER and (where == 0 or where + width > _U64_END):
            raise _bad(f"descriptor {i}: bad user address")
        fixups.append(FdFixup(target, where, width))
    maps = []
    map_fds = 0
    for i in range(nmaps):
        op, target, flags, width, r0, block, size, offset, where = _MAP_ENTRY.unpack_from(
            p, maps_at + i * _MAP_ENTRY.size)
        if r0 or not _map_ok(op, target, flags, width, block, size, offset, where, struct_len):
            raise _bad(f"block map {i}: bad entry")
        map_fds += flags & MAP_WITH_FD
        maps.append(BlockMap(op, block, size, offset, where, target, flags, width))
    if nfds + map_fds > MAX_FDS:  # (the reply's fd_count)
        raise _bad(f"{nfds + map_fds} descriptors exceed the limit of {MAX_FDS}", errno.E2BIG)
    return IoctlReply(ret, body, tuple(writes), tuple(fixups), tuple(maps))


def _decode_json(p: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(p.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _bad(f"not a JSON object: {type(e).__name__}") from None
    if not isinstance(obj, dict):
        raise _bad("not a JSON object")
    return obj


def _decode_error(p: bytes) -> ErrorReply:
    if len(p) < _ERROR.size or len(p) > _ERROR.size + MAX_ERROR_TEXT:
        raise _bad("ERROR payload has the wrong size")
    err, flags = _ERROR.unpack_from(p)
    if err <= 0:
        raise _bad("ERROR carries no errno")
    text = p[_ERROR.size :].decode(errors="replace")
    return ErrorReply(err, text, bool(flags & _ERROR_FATAL))


def _decode_cancel(p: bytes) -> Cancel:
    if p:
        raise _bad("CANCEL carries no payload")
    return Cancel()


_DECODERS = MappingProxyType(
    {
        Kind.HELLO: _decode_hello,
        Kind.HELLO_REPLY: _decode_hello_reply,
        Kind.IOCTL: _decode_ioctl,
        Kind.IOCTL_REPLY: _decode_ioctl_reply,
        Kind.ADMIN: lambda p: AdminRequest(_decode_json(p)),
        Kind.ADMIN_REPLY: lambda p: AdminReply(_decode_json(p)),
        Kind.ERROR: _decode_error,
        Kind.CANCEL: _decode_cancel,
    }
)


def decode(frame: Frame) -> Message:
    """The message in ``frame``; raises :class:`MalformedMessage` if it does not parse. The
    descriptors a frame carries are the transport's business: their count (the frame's fd bits)
    must agree with the payload's table."""
    flags = frame.flags
    if not flags:  # the common frames first (no descriptors, nothing flagged): same checks
        kind_nr = frame.kind
        if kind_nr == _KIND_IOCTL_REPLY:
            reply = _decode_ioctl_reply(frame.payload)
            if reply.fixups or (reply.maps and reply.fd_count):
                raise _bad(f"frame carries 0 descriptors, its payload names {reply.fd_count}")
            return reply
        if kind_nr == _KIND_IOCTL:
            request = _decode_ioctl(frame.payload)
            if request.fd_numbers:
                raise _bad(f"frame carries 0 descriptors, its payload names "
                           f"{len(request.fd_numbers)}")
            return request
    if flags & ~_KNOWN_FLAGS:
        raise _bad(f"frame flags 0x{flags:x} are reserved")
    kind = _KINDS.get(frame.kind)
    if kind is None:
        raise _bad(f"unknown frame kind {frame.kind}", errno.EOPNOTSUPP)
    if flags & FLAG_MORE and kind != _KIND_ADMIN_REPLY:
        raise _bad("only ADMIN_REPLY frames may have the MORE flag")
    nfds = flags & FLAG_FD_MASK
    if nfds and kind not in _FD_KINDS:
        raise _bad(f"{kind.name} frames carry no descriptors")
    msg = _DECODERS[kind](frame.payload)
    declared = len(msg.fd_numbers) if type(msg) is IoctlRequest else (
        msg.fd_count if type(msg) is IoctlReply else 0)
    if declared != nfds:
        raise _bad(f"frame carries {nfds} descriptors, its payload names {declared}")
    return msg
