"""Bus control messages (relid 0): version negotiation, channel offers, opens, rescinds.

These stand in for the VMBus channel-management messages and for the vGPU's PCI config-space
mailbox (dxgmodule.c): a vGPU offer carries what the guest would read from config space (the DXGK
interface version, host caps, host vGPU LUID, PCI ids), and OPEN_CHANNEL carries what the guest
would write back (guest caps, the chosen interface version).

Every message is: type u32 | body (fixed layout per type, little-endian).
"""

import struct
import uuid
from dataclasses import dataclass
from enum import IntEnum
from types import MappingProxyType
from typing import ClassVar

from dxg.protocol.errors import ProtocolError

# Version of this bus wire format (major << 16 | minor). Both sides list what they speak.
# 2.0: frames carry descriptors and bulk attachments (see framing); PING/PONG heartbeats.
BUS_VERSION_2_0 = 0x0002_0000
BUS_VERSIONS_SUPPORTED = (BUS_VERSION_2_0,)

# DXGK interface versions (dxgkrnl.h): the guest speaks 40; 27 is what an old host implies.
DXGK_VMBUS_INTERFACE_VERSION = 40
DXGK_VMBUS_INTERFACE_VERSION_OLD = 27
DXGK_VMBUS_LAST_COMPATIBLE_INTERFACE_VERSION = 16

# Guest caps bit 0 (wsl2) and host caps bit 0 (map_guest_memory), as in config space.
GUEST_CAPS_WSL2 = 0x1
HOST_CAPS_MAP_GUEST_MEMORY = 0x1

# PCI ids of a virtual compute device (vendor Microsoft).
PCI_VENDOR_MICROSOFT = 0x1414
PCI_DEVICE_ID_VIRTUAL_RENDER = 0x008E
PCI_DEVICE_ID_COMPUTE_ACCELERATOR = 0x008A

_NAME_LEN = 64


class BusMsg(IntEnum):
    HELLO = 1
    VERSION_RESPONSE = 2
    OFFER = 3
    RESCIND = 4
    ALLOFFERS_DELIVERED = 5
    OPEN_CHANNEL = 6
    OPEN_RESULT = 7
    CLOSE_CHANNEL = 8
    UNLOAD = 9
    PING = 10
    PONG = 11
    REFUSE = 12


_TYPE = struct.Struct("<I")


def _name(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class Hello:
    """guest -> host: the bus versions the guest speaks, newest first."""

    versions: tuple[int, ...]
    guest_name: str = ""
    TYPE: ClassVar[BusMsg] = BusMsg.HELLO
    _S: ClassVar[struct.Struct] = struct.Struct(f"<I{_NAME_LEN}s")

    def body(self) -> bytes:
        if not 1 <= len(self.versions) <= 16:
            raise ProtocolError("HELLO needs 1..16 versions")
        head = self._S.pack(len(self.versions), self.guest_name.encode()[: _NAME_LEN - 1])
        return head + struct.pack(f"<{len(self.versions)}I", *self.versions)

    @classmethod
    def parse(cls, b: bytes) -> "Hello":
        _need(b, cls._S.size, "HELLO")
        n, name = cls._S.unpack_from(b)
        if not 1 <= n <= 16 or len(b) != cls._S.size + 4 * n:
            raise ProtocolError("HELLO version list has the wrong size")
        return cls(struct.unpack_from(f"<{n}I", b, cls._S.size), _name(name))


@dataclass(frozen=True, slots=True)
class VersionResponse:
    """host -> guest: the bus version chosen, or accepted=False when none is shared."""

    accepted: bool
    version: int
    host_name: str = ""
    TYPE: ClassVar[BusMsg] = BusMsg.VERSION_RESPONSE
    _S: ClassVar[struct.Struct] = struct.Struct(f"<II{_NAME_LEN}s")

    def body(self) -> bytes:
        return self._S.pack(int(self.accepted), self.version, self.host_name.encode()[: _NAME_LEN - 1])

    @classmethod
    def parse(cls, b: bytes) -> "VersionResponse":
        _exact(b, cls._S.size, "VERSION_RESPONSE")
        acc, ver, name = cls._S.unpack(b)
        return cls(bool(acc), ver, _name(name))


@dataclass(frozen=True, slots=True)
class Offer:
    """host -> guest: a channel is available. For vGPU channels the config fields mirror the
    PCI config-space mailbox; for the global channel mmio_megabytes sizes the IO space."""

    relid: int
    type_guid: uuid.UUID
    instance_guid: uuid.UUID
    mmio_megabytes: int = 0
    interface_version: int = 0
    host_caps: int = 0
    host_vgpu_luid: int = 0
    pci_vendor_id: int = 0
    pci_device_id: int = 0
    TYPE: ClassVar[BusMsg] = BusMsg.OFFER
    _S: ClassVar[struct.Struct] = struct.Struct("<I16s16sIIIQHH")

    def body(self) -> bytes:
        return self._S.pack(
            self.relid, self.type_guid.bytes_le, self.instance_guid.bytes_le,
            self.mmio_megabytes, self.interface_version, self.host_caps,
            self.host_vgpu_luid, self.pci_vendor_id, self.pci_device_id,
        )

    @classmethod
    def parse(cls, b: bytes) -> "Offer":
        _exact(b, cls._S.size, "OFFER")
        relid, tg, ig, mmio, ver, caps, vluid, ven, dev = cls._S.unpack(b)
        if relid == 0:
            raise ProtocolError("OFFER with relid 0 (reserved for bus control)")
        return cls(relid, uuid.UUID(bytes_le=tg), uuid.UUID(bytes_le=ig), mmio, ver, caps,
                   vluid, ven, dev)


@dataclass(frozen=True, slots=True)
class Rescind:
    relid: int
    TYPE: ClassVar[BusMsg] = BusMsg.RESCIND
    _S: ClassVar[struct.Struct] = struct.Struct("<I")

    def body(self) -> bytes:
        return self._S.pack(self.relid)

    @classmethod
    def parse(cls, b: bytes) -> "Rescind":
        _exact(b, cls._S.size, "RESCIND")
        return cls(*cls._S.unpack(b))


@dataclass(frozen=True, slots=True)
class AllOffersDelivered:
    TYPE: ClassVar[BusMsg] = BusMsg.ALLOFFERS_DELIVERED

    def body(self) -> bytes:
        return b""

    @classmethod
    def parse(cls, b: bytes) -> "AllOffersDelivered":
        _exact(b, 0, "ALLOFFERS_DELIVERED")
        return cls()


@dataclass(frozen=True, slots=True)
class OpenChannel:
    """guest -> host: open `relid`; for a vGPU also the guest caps and chosen DXGK version."""

    relid: int
    guest_caps: int = 0
    interface_version: int = 0
    TYPE: ClassVar[BusMsg] = BusMsg.OPEN_CHANNEL
    _S: ClassVar[struct.Struct] = struct.Struct("<III")

    def body(self) -> bytes:
        return self._S.pack(self.relid, self.guest_caps, self.interface_version)

    @classmethod
    def parse(cls, b: bytes) -> "OpenChannel":
        _exact(b, cls._S.size, "OPEN_CHANNEL")
        return cls(*cls._S.unpack(b))


@dataclass(frozen=True, slots=True)
class OpenResult:
    relid: int
    status: int  # 0 or a negative errno
    TYPE: ClassVar[BusMsg] = BusMsg.OPEN_RESULT
    _S: ClassVar[struct.Struct] = struct.Struct("<Ii")

    def body(self) -> bytes:
        return self._S.pack(self.relid, self.status)

    @classmethod
    def parse(cls, b: bytes) -> "OpenResult":
        _exact(b, cls._S.size, "OPEN_RESULT")
        return cls(*cls._S.unpack(b))


@dataclass(frozen=True, slots=True)
class CloseChannel:
    relid: int
    TYPE: ClassVar[BusMsg] = BusMsg.CLOSE_CHANNEL
    _S: ClassVar[struct.Struct] = struct.Struct("<I")

    def body(self) -> bytes:
        return self._S.pack(self.relid)

    @classmethod
    def parse(cls, b: bytes) -> "CloseChannel":
        _exact(b, cls._S.size, "CLOSE_CHANNEL")
        return cls(*cls._S.unpack(b))


@dataclass(frozen=True, slots=True)
class Unload:
    TYPE: ClassVar[BusMsg] = BusMsg.UNLOAD

    def body(self) -> bytes:
        return b""

    @classmethod
    def parse(cls, b: bytes) -> "Unload":
        _exact(b, 0, "UNLOAD")
        return cls()


@dataclass(frozen=True, slots=True)
class Ping:
    """Either side: are you there? The other side answers PONG with the same cookie at once,
    from its bus reader, whatever else it is doing (a heartbeat: a host that stops answering
    is detected without waiting for any request of its own)."""

    cookie: int
    TYPE: ClassVar[BusMsg] = BusMsg.PING
    _S: ClassVar[struct.Struct] = struct.Struct("<Q")

    def body(self) -> bytes:
        return self._S.pack(self.cookie)

    @classmethod
    def parse(cls, b: bytes) -> "Ping":
        _exact(b, cls._S.size, "PING")
        return cls(*cls._S.unpack(b))


@dataclass(frozen=True, slots=True)
class Pong:
    cookie: int
    TYPE: ClassVar[BusMsg] = BusMsg.PONG
    _S: ClassVar[struct.Struct] = struct.Struct("<Q")

    def body(self) -> bytes:
        return self._S.pack(self.cookie)

    @classmethod
    def parse(cls, b: bytes) -> "Pong":
        _exact(b, cls._S.size, "PONG")
        return cls(*cls._S.unpack(b))


@dataclass(frozen=True, slots=True)
class Refuse:
    """host -> guest, instead of VERSION_RESPONSE: the host will not take this guest (it is
    full, or closing); the reason is for the guest's operator. The host closes after it."""

    reason: str
    TYPE: ClassVar[BusMsg] = BusMsg.REFUSE
    _MAX = 256

    def body(self) -> bytes:
        return self.reason.encode()[: self._MAX]

    @classmethod
    def parse(cls, b: bytes) -> "Refuse":
        if len(b) > cls._MAX:
            raise ProtocolError("REFUSE reason too long")
        return cls(b.decode("utf-8", "replace"))


BusMessage = (
    Hello | VersionResponse | Offer | Rescind | AllOffersDelivered | OpenChannel | OpenResult
    | CloseChannel | Unload | Ping | Pong | Refuse
)

_BY_TYPE: MappingProxyType[int, type] = MappingProxyType({
    c.TYPE: c
    for c in (Hello, VersionResponse, Offer, Rescind, AllOffersDelivered, OpenChannel,
              OpenResult, CloseChannel, Unload, Ping, Pong, Refuse)
})


def encode_bus_message(msg: BusMessage) -> bytes:
    return _TYPE.pack(msg.TYPE) + msg.body()


def decode_bus_message(payload: bytes) -> BusMessage:
    _need(payload, _TYPE.size, "bus message")
    (mtype,) = _TYPE.unpack_from(payload)
    cls = _BY_TYPE.get(mtype)
    if cls is None:
        raise ProtocolError(f"unknown bus message type {mtype}")
    return cls.parse(payload[_TYPE.size :])


def negotiate_bus_version(offered: tuple[int, ...]) -> int | None:
    """Newest version both sides speak (same major, minor no newer than ours), or None."""
    for v in offered:
        if v in BUS_VERSIONS_SUPPORTED:
            return v
    return None


def _need(b: bytes, n: int, what: str) -> None:
    if len(b) < n:
        raise ProtocolError(f"{what}: {len(b)} bytes, need at least {n}")


def _exact(b: bytes, n: int, what: str) -> None:
    if len(b) != n:
        raise ProtocolError(f"{what}: {len(b)} bytes, expected {n}")
