"""Frames of the emulated VMBus: one byte stream carries the bus control messages and every
channel's packets, each frame tagged with the channel's relid.

Frame header, 24 bytes little-endian:
    magic u32 ("DXGB") | payload_len u32 | relid u32 | packet_type u16 | flags u16 | trans_id u64
relid 0 is the bus control channel. packet_type follows VMBus: 6 = in-band data, 11 = completion,
9 = a bulk chunk (VMBus's "data using GPA direct": data that does not fit one packet).

flags:
    bit 0      COMPLETION_REQUESTED: a data packet that expects a completion with its trans_id
    bit 1      HAS_BULK: the bulk chunks sent just before this packet on the connection are its
               attachment (a payload of any size up to the receiver's bulk limit)
    bits 8-15  descriptors that travel with this frame (SCM_RIGHTS on its first byte; Unix and
               in-process transports only), at most MAX_FRAME_FDS

Channel payloads (and each bulk chunk) are capped at DXG_MAX_VM_BUS_PACKET_SIZE (128 KiB), as in
the real driver. A bulk attachment is the concatenation of the chunks; the chunks of one packet
are contiguous on the stream and directly precede it.
"""

import struct
from dataclasses import dataclass

from dxg.protocol.errors import ProtocolError

MAGIC = 0x42475844  # b"DXGB" little-endian
FRAME_HEADER = struct.Struct("<IIIHHQ")
FRAME_HEADER_SIZE = FRAME_HEADER.size
DXG_MAX_VM_BUS_PACKET_SIZE = 128 * 1024
CONTROL_RELID = 0

VM_PKT_DATA_INBAND = 0x6
VM_PKT_BULK = 0x9
VM_PKT_COMP = 0xB
_PACKET_TYPES = frozenset({VM_PKT_DATA_INBAND, VM_PKT_BULK, VM_PKT_COMP})

FLAG_COMPLETION_REQUESTED = 0x1
FLAG_HAS_BULK = 0x2
FLAG_FD_SHIFT = 8
FLAG_FD_MASK = 0xFF << FLAG_FD_SHIFT
_KNOWN_FLAGS = FLAG_COMPLETION_REQUESTED | FLAG_HAS_BULK | FLAG_FD_MASK
MAX_FRAME_FDS = 16


@dataclass(frozen=True, slots=True)
class Frame:
    relid: int
    packet_type: int
    flags: int
    trans_id: int
    payload: bytes

    @property
    def wants_completion(self) -> bool:
        return bool(self.flags & FLAG_COMPLETION_REQUESTED)

    @property
    def has_bulk(self) -> bool:
        return bool(self.flags & FLAG_HAS_BULK)

    @property
    def fd_count(self) -> int:
        return (self.flags & FLAG_FD_MASK) >> FLAG_FD_SHIFT


def frame_flags(wants_completion: bool = False, has_bulk: bool = False, fds: int = 0) -> int:
    if not 0 <= fds <= MAX_FRAME_FDS:
        raise ProtocolError(f"{fds} descriptors in one frame (at most {MAX_FRAME_FDS})")
    return ((FLAG_COMPLETION_REQUESTED if wants_completion else 0)
            | (FLAG_HAS_BULK if has_bulk else 0) | (fds << FLAG_FD_SHIFT))


def encode_frame(
    relid: int, packet_type: int, payload: bytes, trans_id: int = 0, flags: int = 0
) -> bytes:
    if len(payload) > DXG_MAX_VM_BUS_PACKET_SIZE:
        raise ProtocolError(
            f"packet of {len(payload)} bytes exceeds the {DXG_MAX_VM_BUS_PACKET_SIZE}-byte cap"
        )
    if packet_type not in _PACKET_TYPES:
        raise ProtocolError(f"unknown packet type {packet_type}")
    if flags & ~_KNOWN_FLAGS:
        raise ProtocolError(f"unknown frame flags 0x{flags:x}")
    return FRAME_HEADER.pack(MAGIC, len(payload), relid, packet_type, flags, trans_id) + payload


def encode_bulk(relid: int, data: bytes | memoryview) -> list[bytes]:
    """The bulk chunks that carry ``data`` (send them right before the packet they belong to)."""
    view = memoryview(data)
    return [
        FRAME_HEADER.pack(MAGIC, len(chunk), relid, VM_PKT_BULK, 0, 0) + bytes(chunk)
        for chunk in (view[i : i + DXG_MAX_VM_BUS_PACKET_SIZE]
                      for i in range(0, len(view), DXG_MAX_VM_BUS_PACKET_SIZE))
    ]


class FrameReader:
    """Incremental frame decoder: feed() bytes as they arrive, then iterate frames()."""

    def __init__(self, max_payload: int = DXG_MAX_VM_BUS_PACKET_SIZE) -> None:
        self._buf = bytearray()
        self._max = max_payload

    def feed(self, data: bytes) -> None:
        self._buf += data

    def frames(self) -> list[Frame]:
        """The whole frames buffered so far (a partial one stays for the next feed)."""
        return self._parse(self._buf)

    def frames_of(self, data: bytes) -> list[Frame]:
        """feed(data) then frames(), copying nothing more than the payloads when nothing was
        left over from before (the common case: a read holds whole frames)."""
        if self._buf:
            self._buf += data
            return self._parse(self._buf)
        out: list[Frame] = []
        pos = self._scan(data, out)
        if pos < len(data):
            self._buf += memoryview(data)[pos:]
        return out

    def _parse(self, buf: bytearray) -> list[Frame]:
        out: list[Frame] = []
        pos = self._scan(buf, out)
        if pos:
            del buf[:pos]
        return out

    def _scan(self, buf: bytes | bytearray, out: list[Frame]) -> int:
        view = memoryview(buf)
        size = len(buf)
        pos = 0
        while size - pos >= FRAME_HEADER_SIZE:
            magic, length, relid, ptype, flags, trans_id = FRAME_HEADER.unpack_from(buf, pos)
            if magic != MAGIC:
                raise ProtocolError(f"bad frame magic 0x{magic:08x}")
            if length > self._max:
                raise ProtocolError(f"frame of {length} bytes exceeds the {self._max}-byte cap")
            if ptype not in _PACKET_TYPES:
                raise ProtocolError(f"unknown packet type {ptype}")
            if flags & ~_KNOWN_FLAGS or (flags & FLAG_FD_MASK) >> FLAG_FD_SHIFT > MAX_FRAME_FDS:
                raise ProtocolError(f"bad frame flags 0x{flags:x}")
            end = pos + FRAME_HEADER_SIZE + length
            if size < end:
                break
            out.append(Frame(relid, ptype, flags, trans_id,
                             bytes(view[pos + FRAME_HEADER_SIZE : end])))
            pos = end
        return pos

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)
