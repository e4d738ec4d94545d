"""The client <-> node wire (sans I/O): bytes in, typed messages out, and back.

A process talks to the node over one stream connection (a Unix socket). The connection *is* the
process, as an open ``/dev/dxg`` file is in the kernel. This module knows nothing of sockets:
:class:`FrameDecoder` turns a byte stream into :class:`Frame` objects, :func:`decode` turns a frame
into a message, and :func:`encode` does the reverse. Anyone can test it with bytes alone.

Wire version 1. All integers little-endian.

Frame (every message)::

    0   u32 magic    0x4E475844 (the bytes "DXGN")
    4   u16 kind     Kind below
    6   u16 flags    0 (reserved)
    8   u32 seq      chosen by the client per request; the node echoes it in the reply
    12  u32 length   payload bytes that follow, at most MAX_PAYLOAD (4 MiB)

A bad magic or an over-long length is a *framing* error (:class:`WireError`): the stream
cannot be trusted any more, so the node answers ERROR (fatal) and closes the connection. Any
other defect (unknown kind, non-zero flags, a payload that does not parse) leaves the framing
intact: the node answers ERROR (not fatal) with the request's seq and the connection goes on.

Kinds and payloads:

``HELLO`` (1, client -> node; must be the first frame)::

    u16 min_version, u16 max_version, u32 reserved (0)

    Until it has answered HELLO the node reads frames of at most MAX_HELLO_PAYLOAD (64) bytes:
    a longer one is a framing error, so an unidentified peer cannot make it buffer more.

``HELLO_REPLY`` (2, node -> client)::

    u16 version (the highest both sides speak), u16 reserved, u32 max_payload,
    u32 max_regions, u32 reserved, then the node's name in UTF-8 (at most 256 bytes)

    No common version: ERROR(EPROTONOSUPPORT, fatal).

``IOCTL`` (3, client -> node)::

    u32 code          the full 32-bit ioctl code, _IOWR('G', nr, struct), size bits included
    u32 struct_len    bytes of the argument struct (must equal _IOC_SIZE(code))
    u32 region_count  at most MAX_REGIONS (4096)
    u32 reserved      0
    struct bytes
    region_count x { u64 addr, u32 length, u32 flags }
    the data of each IN region, in table order, concatenated

    A *region* is a range of the caller's memory that a pointer in the struct (or in a buffer
    it points to) refers to. flags: REGION_IN (1) = its bytes are carried and the driver may
    read them; REGION_OUT (2) = the driver may write it. At least one flag; addr != 0;
    1 <= length; addr + length <= 2**64; regions sorted by addr and not overlapping; and
    ``16 + struct_len + 16 * region_count + sum(length)`` <= MAX_PAYLOAD, so that the reply,
    which can carry every byte of every region back, fits too. The IN data must fill the rest
    of the payload exactly. NULL pointers send no region.

``IOCTL_REPLY`` (4, node -> client)::

    i64 ret           0, a positive NTSTATUS success code, or a negative errno
    u32 struct_len    the struct after the call (same length as sent)
    u32 write_count
    struct bytes
    write_count x { u64 addr, u32 length, u32 reserved (0) }
    the data of each write, in table order, concatenated

    Writes are what the driver stored into user memory: at most one per OUT region of the
    request, covering the span from the first to the last byte the driver wrote there. Inside
    that span, bytes the driver did not write carry the region's data as sent (IN|OUT) or zero
    (OUT only), so clients send a region IN|OUT when it matters. The client applies them in
    order.

``ADMIN`` (5, client -> node) and ``ADMIN_REPLY`` (6, node -> client): one JSON object, UTF-8.

``ERROR`` (7, node -> client)::

    i32 errno (> 0), u32 flags (bit 0 FATAL: the node closes the connection after it),
    then a message in UTF-8 (at most 1024 bytes)

Requests are answered in order, one at a time per connection (v1 has no pipelining): the
client sends one request and waits for its reply. A client interrupted while waiting may send
its next request before that reply arrives; it skips replies whose seq it has given up on.
"""

from __future__ import annotations

import errno
import json
import struct
from dataclasses import dataclass
from enum import IntEnum
from types import MappingProxyType
from typing import Any

__all__ = [
    "HEADER_SIZE",
    "MAGIC",
    "MAX_ERROR_TEXT",
    "MAX_HELLO_PAYLOAD",
    "MAX_NODE_NAME",
    "MAX_PAYLOAD",
    "MAX_REGIONS",
    "MAX_STRUCT",
    "MAX_WIRE_VERSION",
    "MIN_WIRE_VERSION",
    "REGION_IN",
    "REGION_OUT",
    "AdminReply",
    "AdminRequest",
    "ErrorReply",
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
    "decode",
    "encode",
    "negotiate",
]

MAGIC = 0x4E475844
MIN_WIRE_VERSION = 1
MAX_WIRE_VERSION = 1
MAX_PAYLOAD = 4 * 1024 * 1024
MAX_HELLO_PAYLOAD = 64  # what a node reads before the handshake (a HELLO is 8 bytes)
MAX_REGIONS = 4096
MAX_STRUCT = 0x3FFF  # _IOC_SIZE is 14 bits wide
MAX_ERROR_TEXT = 1024
MAX_NODE_NAME = 256

REGION_IN = 1
REGION_OUT = 2
_REGION_FLAGS = REGION_IN | REGION_OUT
_ERROR_FATAL = 1
_U64_END = 1 << 64

_HEADER = struct.Struct("<IHHII")
HEADER_SIZE = _HEADER.size
_HELLO = struct.Struct("<HHI")
_HELLO_REPLY = struct.Struct("<HHIII")
_IOCTL = struct.Struct("<IIII")
_REGION = struct.Struct("<QII")
_REPLY = struct.Struct("<qII")
_WRITE = struct.Struct("<QII")
_ERROR = struct.Struct("<iI")


class Kind(IntEnum):
    HELLO = 1
    HELLO_REPLY = 2
    IOCTL = 3
    IOCTL_REPLY = 4
    ADMIN = 5
    ADMIN_REPLY = 6
    ERROR = 7


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


@dataclass(frozen=True)
class Frame:
    kind: int
    seq: int
    payload: bytes
    flags: int = 0


@dataclass(frozen=True)
class Hello:
    min_version: int = MIN_WIRE_VERSION
    max_version: int = MAX_WIRE_VERSION


@dataclass(frozen=True)
class HelloReply:
    version: int
    max_payload: int = MAX_PAYLOAD
    max_regions: int = MAX_REGIONS
    node_name: str = ""


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class IoctlRequest:
    code: int
    struct: bytes
    regions: tuple[Region, ...] = ()


@dataclass(frozen=True)
class Write:
    addr: int
    data: bytes


@dataclass(frozen=True)
class IoctlReply:
    ret: int
    struct: bytes
    writes: tuple[Write, ...] = ()


@dataclass(frozen=True)
class AdminRequest:
    request: dict[str, Any]


@dataclass(frozen=True)
class AdminReply:
    reply: dict[str, Any]


@dataclass(frozen=True)
class ErrorReply:
    errno: int
    message: str = ""
    fatal: bool = False


Message = Hello | HelloReply | IoctlRequest | IoctlReply | AdminRequest | AdminReply | ErrorReply


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

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._buf = bytearray()
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
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        if self._broken:
            raise WireError(errno.EPROTO, "stream already broken")
        self._buf += data

    def header_needed(self) -> int:
        """Bytes still missing before the next frame is complete (at least 1 when none is)."""
        if len(self._buf) < HEADER_SIZE:
            return HEADER_SIZE - len(self._buf)
        length = _HEADER.unpack_from(self._buf)[4]
        return max(HEADER_SIZE + length - len(self._buf), 0)

    def next_frame(self) -> Frame | None:
        if self._broken:
            raise WireError(errno.EPROTO, "stream already broken")
        if len(self._buf) < HEADER_SIZE:
            return None
        magic, kind, flags, seq, length = _HEADER.unpack_from(self._buf)
        if magic != MAGIC:
            self._broken = True
            raise WireError(errno.EPROTO, f"bad frame magic 0x{magic:08X}")
        if length > self._max:
            self._broken = True
            raise WireError(
                errno.EMSGSIZE, f"frame of {length} bytes exceeds the limit of {self._max}"
            )
        end = HEADER_SIZE + length
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[HEADER_SIZE:end])
        del self._buf[:end]
        return Frame(kind, seq, payload, flags)


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


def _encode_payload(msg: Message) -> tuple[Kind, bytes]:
    if isinstance(msg, Hello):
        return Kind.HELLO, _HELLO.pack(msg.min_version, msg.max_version, 0)
    if isinstance(msg, HelloReply):
        name = msg.node_name.encode()[:MAX_NODE_NAME]
        head = _HELLO_REPLY.pack(msg.version, 0, msg.max_payload, msg.max_regions, 0)
        return Kind.HELLO_REPLY, head + name
    if isinstance(msg, IoctlRequest):
        if len(msg.struct) > MAX_STRUCT:
            raise ValueError("struct too large")
        total = _check_regions(msg.regions)
        if _IOCTL.size + len(msg.struct) + _REGION.size * len(msg.regions) + total > MAX_PAYLOAD:
            raise ValueError("request (with all its regions) exceeds MAX_PAYLOAD")
        parts = [_IOCTL.pack(msg.code, len(msg.struct), len(msg.regions), 0), msg.struct]
        parts += [_REGION.pack(r.addr, r.length, r.flags) for r in msg.regions]
        parts += [r.data for r in msg.regions if r.data is not None]
        return Kind.IOCTL, b"".join(parts)
    if isinstance(msg, IoctlReply):
        if len(msg.struct) > MAX_STRUCT:
            raise ValueError("struct too large")
        for w in msg.writes:
            if w.addr <= 0 or not w.data or w.addr + len(w.data) > _U64_END:
                raise ValueError(f"bad write 0x{w.addr:x}+{len(w.data)}")
        parts = [_REPLY.pack(msg.ret, len(msg.struct), len(msg.writes)), msg.struct]
        parts += [_WRITE.pack(w.addr, len(w.data), 0) for w in msg.writes]
        parts += [w.data for w in msg.writes]
        return Kind.IOCTL_REPLY, b"".join(parts)
    if isinstance(msg, AdminRequest):
        return Kind.ADMIN, _json_bytes(msg.request)
    if isinstance(msg, AdminReply):
        return Kind.ADMIN_REPLY, _json_bytes(msg.reply)
    if isinstance(msg, ErrorReply):
        text = msg.message.encode(errors="replace")[:MAX_ERROR_TEXT]
        return Kind.ERROR, _ERROR.pack(msg.errno, _ERROR_FATAL if msg.fatal else 0) + text
    raise TypeError(f"not a wire message: {msg!r}")


def _json_bytes(obj: dict[str, Any]) -> bytes:
    if not isinstance(obj, dict):
        raise TypeError("admin messages are JSON objects")
    return json.dumps(obj, separators=(",", ":"), default=str).encode()


def encode(msg: Message, seq: int) -> bytes:
    """The whole frame (header + payload) for ``msg``. Raises ValueError if ``msg`` breaks a
    rule of the wire (the encoder never emits what :func:`decode` would reject)."""
    kind, payload = _encode_payload(msg)
    return frame_bytes(kind, seq, payload)


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
    version, _r0, max_payload, max_regions, _r1 = _HELLO_REPLY.unpack_from(p)
    name = p[_HELLO_REPLY.size :].decode(errors="replace")
    return HelloReply(version, max_payload, max_regions, name)


def _decode_ioctl(p: bytes) -> IoctlRequest:
    n = len(p)
    if n < _IOCTL.size:
        raise _bad("IOCTL payload shorter than its header")
    code, struct_len, count, reserved = _IOCTL.unpack_from(p)
    if reserved:
        raise _bad("IOCTL reserved field is not zero")
    if struct_len > MAX_STRUCT:
        raise _bad(f"struct length {struct_len} exceeds {MAX_STRUCT}")
    if count > MAX_REGIONS:
        raise _bad(f"{count} regions exceed the limit of {MAX_REGIONS}", errno.E2BIG)
    table = _IOCTL.size + struct_len
    data_at = table + _REGION.size * count
    if data_at > n:
        raise _bad("IOCTL payload truncated before the end of its region table")
    body = p[_IOCTL.size : table]
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
    regions = []
    at = data_at
    for addr, length, flags in raw:
        data = None
        if flags & REGION_IN:
            data = p[at : at + length]
            at += length
        regions.append(Region(addr, length, flags, data))
    return IoctlRequest(code, body, tuple(regions))


def _decode_ioctl_reply(p: bytes) -> IoctlReply:
    n = len(p)
    if n < _REPLY.size:
        raise _bad("IOCTL_REPLY payload shorter than its header")
    ret, struct_len, count = _REPLY.unpack_from(p)
    if struct_len > MAX_STRUCT:
        raise _bad(f"struct length {struct_len} exceeds {MAX_STRUCT}")
    if count > MAX_REGIONS:
        raise _bad(f"{count} writes exceed the limit of {MAX_REGIONS}", errno.E2BIG)
    table = _REPLY.size + struct_len
    data_at = table + _WRITE.size * count
    if data_at > n:
        raise _bad("IOCTL_REPLY payload truncated before the end of its write table")
    body = p[_REPLY.size : table]
    writes = []
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
    return IoctlReply(ret, body, tuple(writes))


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


_DECODERS = MappingProxyType(
    {
        Kind.HELLO: _decode_hello,
        Kind.HELLO_REPLY: _decode_hello_reply,
        Kind.IOCTL: _decode_ioctl,
        Kind.IOCTL_REPLY: _decode_ioctl_reply,
        Kind.ADMIN: lambda p: AdminRequest(_decode_json(p)),
        Kind.ADMIN_REPLY: lambda p: AdminReply(_decode_json(p)),
        Kind.ERROR: _decode_error,
    }
)


def decode(frame: Frame) -> Message:
    """The message in ``frame``; raises :class:`MalformedMessage` if it does not parse."""
    if frame.flags:
        raise _bad(f"frame flags 0x{frame.flags:x} are reserved")
    try:
        decoder = _DECODERS[Kind(frame.kind)]
    except ValueError:
        raise _bad(f"unknown frame kind {frame.kind}", errno.EOPNOTSUPP) from None
    return decoder(frame.payload)
