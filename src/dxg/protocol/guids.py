"""Channel device-type GUIDs and the LUID <-> instance-GUID rule of the real driver."""

import struct
import uuid

# HV_GPUP_DXGK_GLOBAL_GUID: one global channel per VM (process-level commands, notifications).
DXGK_GLOBAL_GUID = uuid.UUID("dde9cbc0-5060-4436-9448-ea1254a5d177")
# HV_GPUP_DXGK_VGPU_GUID: one channel per virtual GPU.
DXGK_VGPU_GUID = uuid.UUID("6e382d18-3336-4f4b-acc4-2b7703d4df4a")

_LUID = struct.Struct("<II")


def luid_to_int(low: int, high: int) -> int:
    """Pack a winluid {a, b} into one 64-bit integer (high part in the upper 32 bits)."""
    return ((high & 0xFFFFFFFF) << 32) | (low & 0xFFFFFFFF)


def luid_parts(luid: int) -> tuple[int, int]:
    """Split a 64-bit LUID into winluid (a, b)."""
    return luid & 0xFFFFFFFF, (luid >> 32) & 0xFFFFFFFF


def guid_to_luid(instance: uuid.UUID) -> int:
    """The first 8 bytes of a vGPU channel's instance GUID are the adapter's guest LUID."""
    low, high = _LUID.unpack_from(instance.bytes_le, 0)
    return luid_to_int(low, high)


def vgpu_instance_guid(luid: int, salt: bytes = b"") -> uuid.UUID:
    """A vGPU channel instance GUID whose first 8 bytes carry `luid`."""
    tail = (salt + b"pydxg-vgpu")[:8].ljust(8, b"\0")
    return uuid.UUID(bytes_le=_LUID.pack(*luid_parts(luid)) + tail)
