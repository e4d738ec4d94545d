"""The DXGK message envelope: the 16-byte extension header (interface version >= 40) followed by
a 24-byte command header, then the command body. Host -> VM messages carry no extension header.

    dxgvmb_ext_header      command_offset u32 @0 (=16) | reserved u32 @4 | vgpu_luid winluid @8
    command header         command_id u64 @0 | process handle u32 @8 | channel word u32 @12
                           | command_type u32 @16 | pad to 24
The channel word is the enum channel type (vm_to_host) or the bit-field channel_type:8,
async_msg:1 (vgpu_to_host and host_to_vm).
"""

import struct
from dataclasses import dataclass
from types import MappingProxyType

from dxg.protocol.commands import ChannelType, GlobalCommand, HostToVmCommand, VgpuCommand
from dxg.protocol.errors import ProtocolError
from dxg.protocol.framing import Gather

EXT_HEADER = struct.Struct("<IIQ")
EXT_HEADER_SIZE = EXT_HEADER.size  # 16
CMD_HEADER = struct.Struct("<QIII4x")
CMD_HEADER_SIZE = CMD_HEADER.size  # 24
_ASYNC_BIT = 1 << 8
# Codes to enum members by plain lookup (an IntEnum call costs a function call per message).
_GLOBAL = MappingProxyType({int(c): c for c in GlobalCommand})
_VGPU = MappingProxyType({int(c): c for c in VgpuCommand})
_HOST_TO_VM = MappingProxyType({int(c): c for c in HostToVmCommand})
# Commands whose body parsers take a view of a large message (its data is not copied).
_VIEW_BODIES = frozenset({VgpuCommand.ESCAPE, VgpuCommand.LOCK2, VgpuCommand.UNLOCK2})


@dataclass(frozen=True, slots=True)
class GuestMessage:
    """A decoded guest -> host message."""

    channel_type: ChannelType
    command: GlobalCommand | VgpuCommand
    process: int
    vgpu_luid: int
    async_msg: bool
    # everything after the 24-byte command header: a view of the message's own buffer when it
    # came with an attachment (a large command's: nothing is copied), else bytes
    body: bytes | memoryview
    command_id: int = 0

    @property
    def is_global(self) -> bool:
        return self.channel_type == ChannelType.VM_TO_HOST


@dataclass(frozen=True, slots=True)
class HostMessage:
    """A decoded host -> VM notification."""

    command: HostToVmCommand
    process: int
    body: bytes


def encode_global(command: GlobalCommand, process: int,
                  body: bytes | Gather = b"") -> bytes | Gather:
    return _guest(ChannelType.VM_TO_HOST, int(ChannelType.VM_TO_HOST), command, process, 0, body)


def encode_vgpu(
    command: VgpuCommand, process: int, vgpu_luid: int, body: bytes | Gather = b"",
    async_msg: bool = False
) -> bytes | Gather:
    word = int(ChannelType.VGPU_TO_HOST) | (_ASYNC_BIT if async_msg else 0)
    return _guest(ChannelType.VGPU_TO_HOST, word, command, process, vgpu_luid, body)


def _guest(ct: ChannelType, word: int, command: int, process: int, luid: int,
           body: bytes | Gather) -> bytes | Gather:
    # A message longer than one packet travels with a bulk attachment (dxg.protocol.framing);
    # whether a command may be that long is the command table's call (CommandSpec.large). A
    # body held as buffers (a Gather: a large data region) stays so: the headers go in front.
    head = EXT_HEADER.pack(EXT_HEADER_SIZE, 0, luid) + CMD_HEADER.pack(
        0, process & 0xFFFFFFFF, word, int(command))
    if isinstance(body, Gather):
        return Gather((head, *body.parts))
    return head + body


def decode_guest(payload: bytes | bytearray | Gather) -> GuestMessage:
    """Parse a guest -> host message; raises ProtocolError on anything malformed or unknown.
    The body of a message that came with an attachment (a bytearray) is a view of it when the
    command is a large one (its parser slices it without copying), else bytes."""
    if isinstance(payload, Gather):
        payload = bytes(payload)
    if len(payload) < EXT_HEADER_SIZE + CMD_HEADER_SIZE:
        raise ProtocolError(f"guest message of {len(payload)} bytes is shorter than its headers")
    offset, _reserved, luid = EXT_HEADER.unpack_from(payload, 0)
    if offset != EXT_HEADER_SIZE:
        raise ProtocolError(f"extension header command_offset {offset}, expected 16")
    command_id, process, word, ctype = CMD_HEADER.unpack_from(payload, EXT_HEADER_SIZE)
    if word & 0xFF == ChannelType.VM_TO_HOST and word == ChannelType.VM_TO_HOST:
        command: GlobalCommand | VgpuCommand | None = _GLOBAL.get(ctype)
        if command is None:
            raise ProtocolError(f"unknown global command {ctype}")
        return GuestMessage(ChannelType.VM_TO_HOST, command, process, luid, False,
                            _body(payload, command), command_id)
    if word & 0xFF == ChannelType.VGPU_TO_HOST and not word & ~0x1FF:
        command = _VGPU.get(ctype)
        if command is None:
            raise ProtocolError(f"unknown vGPU command {ctype}")
        return GuestMessage(
            ChannelType.VGPU_TO_HOST, command, process, luid, bool(word & _ASYNC_BIT),
            _body(payload, command), command_id,
        )
    raise ProtocolError(f"bad channel word 0x{word:x} in guest message")


def _body(payload: bytes | bytearray, command: GlobalCommand | VgpuCommand) -> bytes | memoryview:
    at = EXT_HEADER_SIZE + CMD_HEADER_SIZE
    if isinstance(payload, bytes):
        return payload[at:]
    view = memoryview(payload)[at:]
    return view if command in _VIEW_BODIES else bytes(view)


def encode_host_to_vm(command: HostToVmCommand, process: int = 0, body: bytes = b"") -> bytes:
    return CMD_HEADER.pack(0, process & 0xFFFFFFFF, int(ChannelType.HOST_TO_VM), int(command)) + body


def decode_host_to_vm(payload: bytes | bytearray) -> HostMessage:
    if len(payload) < CMD_HEADER_SIZE:
        raise ProtocolError(f"host message of {len(payload)} bytes is shorter than its header")
    _cid, process, word, ctype = CMD_HEADER.unpack_from(payload, 0)
    if word & 0xFF != ChannelType.HOST_TO_VM:
        raise ProtocolError(f"bad channel word 0x{word:x} in host message")
    command = _HOST_TO_VM.get(ctype)
    if command is None:
        raise ProtocolError(f"unknown host-to-VM command {ctype}")
    return HostMessage(command, process, bytes(payload[CMD_HEADER_SIZE:]))
