"""Frames of the emulated VMBus: one byte stream carries the bus control messages and every
channel's packets, each frame tagged with the channel's relid.

Frame header, 24 bytes little-endian:
    magic u32 ("DXGB") | payload_len u32 | relid u32 | packet_type u16 | flags u16 | trans_id u64
relid 0 is the bus control channel. packet_type follows VMBus: 6 = in-band data, 11 = completion.
A data packet with FLAG_COMPLETION_REQUESTED expects a completion carrying the same trans_id.
Channel payloads are capped at DXG_MAX_VM_BUS_PACKET_SIZE (128 KiB), as in the real driver.
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
VM_PKT_COMP = 0xB
_PACKET_TYPES = (VM_PKT_DATA_INBAND, VM_PKT_COMP)

FLAG_COMPLETION_REQUESTED = 0x1


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


def encode_frame(
    relid: int, packet_type: int, payload: bytes, trans_id: int = 0, flags: int = 0
) -> bytes:
    if len(payload) > DXG_MAX_VM_BUS_PACKET_SIZE:
        raise ProtocolError(
            f"packet of {len(payload)} bytes exceeds the {DXG_MAX_VM_BUS_PACKET_SIZE}-byte cap"
        )
    if packet_type not in _PACKET_TYPES:
        raise ProtocolError(f"unknown packet type {packet_type}")
    return FRAME_HEADER.pack(MAGIC, len(payload), relid, packet_type, flags, trans_id) + payload


class FrameReader:
    """Incremental frame decoder: feed() bytes as they arrive, then iterate frames()."""

    def __init__(self, max_payload: int = DXG_MAX_VM_BUS_PACKET_SIZE) -> None:
        self._buf = bytearray()
        self._max = max_payload

    def feed(self, data: bytes) -> None:
        self._buf += data

    def frames(self) -> list[Frame]:
        out: list[Frame] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= FRAME_HEADER_SIZE:
            magic, length, relid, ptype, flags, trans_id = FRAME_HEADER.unpack_from(buf, pos)
            if magic != MAGIC:
                raise ProtocolError(f"bad frame magic 0x{magic:08x}")
            if length > self._max:
                raise ProtocolError(f"frame of {length} bytes exceeds the {self._max}-byte cap")
            if ptype not in _PACKET_TYPES:
                raise ProtocolError(f"unknown packet type {ptype}")
            end = pos + FRAME_HEADER_SIZE + length
            if len(buf) < end:
                break
            out.append(Frame(relid, ptype, flags, trans_id, bytes(buf[pos + FRAME_HEADER_SIZE : end])))
            pos = end
        if pos:
            del buf[:pos]
        return out

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)
