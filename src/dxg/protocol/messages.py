"""Command bodies: what follows the 24-byte command header, in the real dxgvmbus.h layouts
(x86-64, natural alignment; offsets here are from the end of the command header).

Each fixed-size message is a frozen dataclass with pack()/unpack(); unpack() rejects any body of
the wrong size. Variable-length ones (private data) check the declared size against the bytes.
"""

import struct
from dataclasses import dataclass, fields
from typing import ClassVar, Self

from dxg.protocol.errors import ProtocolError
from dxg.protocol.framing import Gather

WIN_MAX_PATH = 260
DXG_VM_PROCESS_NAME_LENGTH = 260
DEVICE_DESCRIPTION_CHARS = 80


def _exact(b: bytes, n: int, what: str) -> None:
    if len(b) != n:
        raise ProtocolError(f"{what}: body of {len(b)} bytes, expected {n}")


def _atleast(b: bytes, n: int, what: str) -> None:
    if len(b) < n:
        raise ProtocolError(f"{what}: body of {len(b)} bytes, need at least {n}")


# A data region at least this long (a Lock2 copy, an Unlock2 write-back, an escape's attachment)
# is packed as a Gather: the head and the region's own buffer, written to the socket as they are.
GATHER_FROM = 1 << 16
Data = bytes | bytearray | memoryview


def _with_data(head: bytes, *data: Data) -> bytes | Gather:
    """``head`` then ``data``: joined when short, else a Gather (nothing copied)."""
    if sum(len(d) for d in data) >= GATHER_FROM:
        return Gather((head, *data))
    return b"".join((head, *data))


def _whole(body: Data | Gather) -> Data:
    return bytes(body) if isinstance(body, Gather) else body


def _tail(body: Data, at: int) -> Data:
    """The bytes from ``at`` on: a view when ``body`` is a received message's buffer (a large
    one: its data is not copied), a copy of small bytes."""
    return body[at:] if isinstance(body, bytes) else memoryview(body)[at:]


def utf16z(text: str, nchars: int) -> bytes:
    """A NUL-terminated UTF-16LE string in a field of `nchars` u16 (truncated to fit)."""
    raw = text.encode("utf-16-le")[: (nchars - 1) * 2]
    return raw.ljust(nchars * 2, b"\0")


def from_utf16z(raw: bytes) -> str:
    for i in range(0, len(raw) - 1, 2):
        if raw[i] == 0 and raw[i + 1] == 0:
            raw = raw[:i]
            break
    return raw.decode("utf-16-le", "replace")


class _Fixed:
    """Mixin for fixed-layout bodies: fields map 1:1 onto the struct format, in order."""

    _S: ClassVar[struct.Struct]

    def pack(self) -> bytes:
        return self._S.pack(*(getattr(self, f.name) for f in fields(self)))  # type: ignore[arg-type]

    @classmethod
    def unpack(cls, body: bytes) -> Self:
        _exact(body, cls._S.size, cls.__name__)
        return cls(*cls._S.unpack(body))


@dataclass(frozen=True, slots=True)
class NtStatusReturn(_Fixed):
    """The bare 4-byte NTSTATUS reply of most commands."""

    status: int
    _S: ClassVar[struct.Struct] = struct.Struct("<I")


# ---- global commands -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CreateProcess:
    """CREATEPROCESS (568 bytes with the header): opaque guest cookie, pid, name, flags."""

    process_cookie: int
    process_id: int
    process_name: str
    linux_process: bool = True
    _S: ClassVar[struct.Struct] = struct.Struct(f"<QQ{(DXG_VM_PROCESS_NAME_LENGTH + 1) * 2}sB5x")

    def pack(self) -> bytes:
        flags = 0x8 if self.linux_process else 0  # csrss:1 dwm:1 wow64:1 linux_process:1
        name = utf16z(self.process_name, DXG_VM_PROCESS_NAME_LENGTH + 1)
        return self._S.pack(self.process_cookie, self.process_id, name, flags)

    @classmethod
    def unpack(cls, body: bytes) -> "CreateProcess":
        _exact(body, cls._S.size, "CreateProcess")
        cookie, pid, name, flags = cls._S.unpack(body)
        return cls(cookie, pid, from_utf16z(name), bool(flags & 0x8))


@dataclass(frozen=True, slots=True)
class CreateProcessReturn(_Fixed):
    hprocess: int
    _S: ClassVar[struct.Struct] = struct.Struct("<I")


NO_LIMIT = (1 << 64) - 1  # a ProcessQuota limit that bounds nothing


@dataclass(frozen=True, slots=True)
class ProcessQuota(_Fixed):
    """PYDXG_SETPROCESSQUOTA (pydxg): the process's account (processes of one account on one
    guest share ``per_account``), its memory limits in bytes per adapter (2**64-1: no limit)
    and its compute share (its weight on each adapter's engine, 1..10000: dxg.host.scheduler)."""

    account: int
    per_process: int
    per_account: int
    compute_share: int = 1
    _S: ClassVar[struct.Struct] = struct.Struct("<QQQI4x")


@dataclass(frozen=True, slots=True)
class SetIoSpaceRegion(_Fixed):
    start: int
    length: int
    shared_page_gpadl: int = 0
    _S: ClassVar[struct.Struct] = struct.Struct("<QQI4x")


# ---- per-adapter commands --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpenAdapter(_Fixed):
    vmbus_interface_version: int
    vmbus_last_compatible_interface_version: int
    guest_luid_low: int
    guest_luid_high: int
    _S: ClassVar[struct.Struct] = struct.Struct("<IIII")


@dataclass(frozen=True, slots=True)
class OpenAdapterReturn(_Fixed):
    host_adapter_handle: int
    status: int
    vmbus_interface_version: int
    vmbus_last_compatible_interface_version: int
    _S: ClassVar[struct.Struct] = struct.Struct("<IIII")


@dataclass(frozen=True, slots=True)
class CloseAdapter(_Fixed):
    host_handle: int
    _S: ClassVar[struct.Struct] = struct.Struct("<I4x")


# async_msg_enabled and friends in GETINTERNALADAPTERINFO's flag word
IAI_SECURE_VM = 1 << 0
IAI_VM_RESET = 1 << 1
IAI_VAIL_SUPPORTED = 1 << 2
IAI_HW_SCH_ENABLED = 1 << 3
IAI_HW_SCH_CAPABLE = 1 << 4
IAI_VA_BACKED_VM = 1 << 5
IAI_ASYNC_MSG_ENABLED = 1 << 6


@dataclass(frozen=True, slots=True)
class GetInternalAdapterInfoReturn:
    """712 bytes: device types, versions, flag bits, host LUIDs, description, instance id."""

    device_types: int
    driver_store_copy_mode: int
    driver_ddi_version: int
    flags: int
    host_adapter_luid: int
    device_description: str
    device_instance_id: str
    host_vgpu_luid: int
    _S: ClassVar[struct.Struct] = struct.Struct(
        f"<IIIIQ{DEVICE_DESCRIPTION_CHARS * 2}s{WIN_MAX_PATH * 2}sQ"
    )

    @property
    def async_msg_enabled(self) -> bool:
        return bool(self.flags & IAI_ASYNC_MSG_ENABLED)

    def pack(self) -> bytes:
        return self._S.pack(
            self.device_types, self.driver_store_copy_mode, self.driver_ddi_version, self.flags,
            self.host_adapter_luid, utf16z(self.device_description, DEVICE_DESCRIPTION_CHARS),
            utf16z(self.device_instance_id, WIN_MAX_PATH), self.host_vgpu_luid,
        )

    @classmethod
    def unpack(cls, body: bytes) -> "GetInternalAdapterInfoReturn":
        _exact(body, cls._S.size, "GetInternalAdapterInfoReturn")
        t, mode, ddi, flags, hl, desc, inst, vl = cls._S.unpack(body)
        return cls(t, mode, ddi, flags, hl, from_utf16z(desc), from_utf16z(inst), vl)


@dataclass(frozen=True, slots=True)
class QueryAdapterInfo:
    query_type: int
    private_data: bytes
    _S: ClassVar[struct.Struct] = struct.Struct("<II")

    def pack(self) -> bytes:
        return self._S.pack(self.query_type, len(self.private_data)) + self.private_data

    @classmethod
    def unpack(cls, body: bytes) -> "QueryAdapterInfo":
        _atleast(body, cls._S.size, "QueryAdapterInfo")
        qtype, size = cls._S.unpack_from(body)
        _exact(body, cls._S.size + size, "QueryAdapterInfo")
        return cls(qtype, body[cls._S.size :])


@dataclass(frozen=True, slots=True)
class StatusAndData:
    """Replies that are an NTSTATUS followed by a data blob (QUERYADAPTERINFO)."""

    status: int
    data: bytes

    def pack(self) -> bytes:
        return struct.pack("<I", self.status) + self.data

    @classmethod
    def unpack(cls, body: bytes) -> "StatusAndData":
        _atleast(body, 4, "StatusAndData")
        return cls(struct.unpack_from("<I", body)[0], body[4:])


@dataclass(frozen=True, slots=True)
class CreateDevice(_Fixed):
    flags: int
    cdd_device: int
    error_code: int  # the guest's device-state cookie, echoed in SETGUESTDATA
    _S: ClassVar[struct.Struct] = struct.Struct("<IB3xQ")


@dataclass(frozen=True, slots=True)
class HandleReturn(_Fixed):
    """Replies that are a new handle (CREATEDEVICE). pydxg adds the status that says why when
    the handle is 0 (the real reply is the handle alone, and a refusal has no reason)."""

    handle: int
    status: int = 0
    _S: ClassVar[struct.Struct] = struct.Struct("<II")


@dataclass(frozen=True, slots=True)
class DestroyDevice(_Fixed):
    device: int
    _S: ClassVar[struct.Struct] = struct.Struct("<I4x")


@dataclass(frozen=True, slots=True)
class FlushDevice(_Fixed):
    device: int
    reason: int
    _S: ClassVar[struct.Struct] = struct.Struct("<II")


@dataclass(frozen=True, slots=True)
class CreateContextVirtual:
    """Echoed back by the host with `context` filled in and the private data updated."""

    context: int
    device: int
    node_ordinal: int
    engine_affinity: int
    flags: int
    client_hint: int
    priv_drv_data: bytes
    _S: ClassVar[struct.Struct] = struct.Struct("<IIIIIII")

    def pack(self) -> bytes:
        return self._S.pack(
            self.context, self.device, self.node_ordinal, self.engine_affinity, self.flags,
            self.client_hint, len(self.priv_drv_data),
        ) + self.priv_drv_data

    @classmethod
    def unpack(cls, body: bytes) -> "CreateContextVirtual":
        _atleast(body, cls._S.size, "CreateContextVirtual")
        *head, size = cls._S.unpack_from(body)
        _exact(body, cls._S.size + size, "CreateContextVirtual")
        return cls(*head, body[cls._S.size :])


@dataclass(frozen=True, slots=True)
class DestroyContext(_Fixed):
    context: int
    _S: ClassVar[struct.Struct] = struct.Struct("<I4x")


GETDEVICESTATE_ARGS_SIZE = 56  # sizeof(struct d3dkmt_getdevicestate)


@dataclass(frozen=True, slots=True)
class GetDeviceState:
    args: bytes  # struct d3dkmt_getdevicestate, 56 bytes

    def pack(self) -> bytes:
        _exact(self.args, GETDEVICESTATE_ARGS_SIZE, "GetDeviceState args")
        return self.args

    @classmethod
    def unpack(cls, body: bytes) -> "GetDeviceState":
        _exact(body, GETDEVICESTATE_ARGS_SIZE, "GetDeviceState")
        return cls(body)


@dataclass(frozen=True, slots=True)
class GetDeviceStateReturn:
    args: bytes
    status: int

    def pack(self) -> bytes:
        _exact(self.args, GETDEVICESTATE_ARGS_SIZE, "GetDeviceStateReturn args")
        return self.args + struct.pack("<I4x", self.status)

    @classmethod
    def unpack(cls, body: bytes) -> "GetDeviceStateReturn":
        _exact(body, GETDEVICESTATE_ARGS_SIZE + 8, "GetDeviceStateReturn")
        return cls(body[:GETDEVICESTATE_ARGS_SIZE],
                   struct.unpack_from("<I", body, GETDEVICESTATE_ARGS_SIZE)[0])


@dataclass(frozen=True, slots=True)
class IsFeatureEnabled(_Fixed):
    feature_id: int
    _S: ClassVar[struct.Struct] = struct.Struct("<I4x")


@dataclass(frozen=True, slots=True)
class IsFeatureEnabledReturn(_Fixed):
    """status | dxgk_feature_desc {min, max, bits} | dxgk_isfeatureenabled_result {version, bits}"""

    status: int
    min_supported_version: int
    max_supported_version: int
    desc_bits: int  # supported:1 virtualization_mode:3 global:1 driver_feature:1 internal:1
    result_version: int
    result_bits: int  # enabled:1 known_feature:1 supported_by_driver:1 supported_on_config:1
    _S: ClassVar[struct.Struct] = struct.Struct("<IHHH2xHH")


QUERYCLOCKCALIBRATION_ARGS_SIZE = 40  # sizeof(struct d3dkmt_queryclockcalibration), packed
GPUCLOCKDATA_SIZE = 28  # sizeof(struct dxgk_gpuclockdata), packed


@dataclass(frozen=True, slots=True)
class QueryClockCalibration:
    args: bytes

    def pack(self) -> bytes:
        _exact(self.args, QUERYCLOCKCALIBRATION_ARGS_SIZE, "QueryClockCalibration args")
        return self.args

    @classmethod
    def unpack(cls, body: bytes) -> "QueryClockCalibration":
        _exact(body, QUERYCLOCKCALIBRATION_ARGS_SIZE, "QueryClockCalibration")
        return cls(body)


@dataclass(frozen=True, slots=True)
class QueryClockCalibrationReturn:
    status: int
    clock_data: bytes  # struct dxgk_gpuclockdata, 28 bytes

    def pack(self) -> bytes:
        _exact(self.clock_data, GPUCLOCKDATA_SIZE, "clock data")
        return struct.pack("<I", self.status) + self.clock_data

    @classmethod
    def unpack(cls, body: bytes) -> "QueryClockCalibrationReturn":
        _exact(body, 4 + GPUCLOCKDATA_SIZE, "QueryClockCalibrationReturn")
        return cls(struct.unpack_from("<I", body)[0], body[4:])


@dataclass(frozen=True, slots=True)
class Escape:
    """ESCAPE: adapter (host handle), device, type, flags, private data size, context, then the
    private data. The host echoes it with the private data overwritten (same size). pydxg's
    layout: the real struct's fields, a u64 attachment size, the private data, then the
    attachment (bytes the reply carries beside the private data: the copy of a region a pydxg
    escape hands over where the link cannot carry a descriptor; empty otherwise). The real
    struct's tail padding is not sent."""

    adapter: int
    device: int
    type: int
    flags: int
    context: int
    priv_drv_data: bytes
    attachment: Data = b""
    _S: ClassVar[struct.Struct] = struct.Struct("<IIIIIIQ")

    def pack(self) -> bytes | Gather:
        return _with_data(self._S.pack(self.adapter, self.device, self.type, self.flags,
                                       len(self.priv_drv_data), self.context,
                                       len(self.attachment)),
                          self.priv_drv_data, self.attachment)

    @classmethod
    def unpack(cls, body: bytes | Gather) -> "Escape":
        body = _whole(body)
        _atleast(body, cls._S.size, "Escape")
        adapter, device, etype, flags, size, context, extra = cls._S.unpack_from(body)
        _exact(body, cls._S.size + size + extra, "Escape")
        at = cls._S.size + size
        return cls(adapter, device, etype, flags, context, bytes(body[cls._S.size : at]),
                   _tail(body, at))


@dataclass(frozen=True, slots=True)
class Empty:
    """No body at all (header-only requests, empty completions)."""

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, body: bytes) -> "Empty":
        _exact(body, 0, "Empty")
        return cls()


@dataclass(frozen=True, slots=True)
class JsonReply:
    """A pydxg extension reply: one UTF-8 JSON object (the host census)."""

    text: bytes

    def pack(self) -> bytes:
        return self.text

    @classmethod
    def unpack(cls, body: bytes) -> "JsonReply":
        if not body.startswith(b"{"):
            raise ProtocolError("JsonReply: not a JSON object")
        return cls(body)


# ---- device memory (pydxg layouts: docs/memory.md) ---------------------------------------------


@dataclass(frozen=True, slots=True)
class IoctlArgs:
    """The body of most memory commands: the ioctl's struct as the caller passed it, with every
    guest handle replaced by the host's and every user pointer zeroed, then the array(s) the
    struct points at, concatenated in the struct's field order (handles as host handles)."""

    args: bytes
    extra: bytes = b""
    _S: ClassVar[struct.Struct] = struct.Struct("<II")

    def pack(self) -> bytes:
        return self._S.pack(len(self.args), len(self.extra)) + self.args + self.extra

    @classmethod
    def unpack(cls, body: bytes) -> "IoctlArgs":
        _atleast(body, cls._S.size, "IoctlArgs")
        n, extra = cls._S.unpack_from(body)
        _exact(body, cls._S.size + n + extra, "IoctlArgs")
        at = cls._S.size + n
        return cls(body[cls._S.size : at], body[at:])


@dataclass(frozen=True, slots=True)
class IoctlArgsReturn:
    """The reply of an IoctlArgs command: an NTSTATUS, the struct after the call (same size as
    sent) and what the call returns beside it (output arrays, block references)."""

    status: int
    args: bytes
    extra: bytes = b""
    _S: ClassVar[struct.Struct] = struct.Struct("<III")

    def pack(self) -> bytes:
        return self._S.pack(self.status, len(self.args), len(self.extra)) + self.args + self.extra

    @classmethod
    def unpack(cls, body: bytes) -> "IoctlArgsReturn":
        _atleast(body, cls._S.size, "IoctlArgsReturn")
        status, n, extra = cls._S.unpack_from(body)
        _exact(body, cls._S.size + n + extra, "IoctlArgsReturn")
        at = cls._S.size + n
        return cls(status, body[cls._S.size : at], body[at:])


@dataclass(frozen=True, slots=True)
class BlockRef(_Fixed):
    """Where host memory is: ``offset`` bytes into the host's block ``block`` (a shared memory
    object of ``block_size`` bytes, never reused within a process)."""

    block: int
    block_size: int
    offset: int
    _S: ClassVar[struct.Struct] = struct.Struct("<QQQ")


@dataclass(frozen=True, slots=True)
class NewAllocation:
    """One allocation in a request: flags and priority of its d3dddi_allocationinfo2, and its
    private driver data."""

    flags: int
    priority: int
    priv_drv_data: bytes


@dataclass(frozen=True, slots=True)
class CreateAllocation:
    """CREATEALLOCATION: device u32, resource u32 (host handle of a resource to add to; 0 =
    none), flags u32 (d3dkmt_createallocationflags), alloc_count u32, standard_size u64 (the heap
    size of a standard EXISTINGHEAP allocation; 0 otherwise), runtime data size u32, global
    private data size u32, the runtime data, the global private data, then alloc_count x
    {flags u32, priority u32, private data size u32, reserved u32}, then each allocation's
    private data."""

    device: int
    resource: int
    flags: int
    standard_size: int
    runtime_data: bytes
    priv_drv_data: bytes
    allocations: tuple[NewAllocation, ...]
    _S: ClassVar[struct.Struct] = struct.Struct("<IIIIQII")
    _A: ClassVar[struct.Struct] = struct.Struct("<IIII")

    def pack(self) -> bytes:
        parts = [self._S.pack(self.device, self.resource, self.flags, len(self.allocations),
                              self.standard_size, len(self.runtime_data),
                              len(self.priv_drv_data)), self.runtime_data, self.priv_drv_data]
        parts += [self._A.pack(a.flags, a.priority, len(a.priv_drv_data), 0)
                  for a in self.allocations]
        parts += [a.priv_drv_data for a in self.allocations]
        return b"".join(parts)

    @classmethod
    def unpack(cls, body: bytes) -> "CreateAllocation":
        _atleast(body, cls._S.size, "CreateAllocation")
        device, resource, flags, count, standard, nrt, npriv = cls._S.unpack_from(body)
        at = cls._S.size
        need = at + nrt + npriv + count * cls._A.size
        _atleast(body, need, "CreateAllocation")
        runtime = body[at : at + nrt]
        at += nrt
        priv = body[at : at + npriv]
        at += npriv
        heads = [cls._A.unpack_from(body, at + i * cls._A.size) for i in range(count)]
        at += count * cls._A.size
        _exact(body, at + sum(h[2] for h in heads), "CreateAllocation")
        allocs = []
        for aflags, priority, size, reserved in heads:
            if reserved:
                raise ProtocolError("CreateAllocation: reserved field set")
            allocs.append(NewAllocation(aflags, priority, body[at : at + size]))
            at += size
        return cls(device, resource, flags, standard, runtime, priv, tuple(allocs))


@dataclass(frozen=True, slots=True)
class AllocationInfo:
    """One allocation the host made: its handle, segment group, ALLOC_* flags, where its memory
    is (block, offset), its size in bytes (whole pages) and its private data after the call."""

    handle: int
    group: int
    flags: int
    block: int
    block_size: int
    offset: int
    size: int
    priv_drv_data: bytes


@dataclass(frozen=True, slots=True)
class CreateAllocationReturn:
    """CREATEALLOCATION's reply: status u32, resource u32, alloc_count u32, reserved u32, then
    alloc_count x {handle u32, group u32, flags u32, private data size u32, block u64, block size
    u64, offset u64, size u64}, then each allocation's private data."""

    status: int
    resource: int
    allocations: tuple[AllocationInfo, ...] = ()
    _S: ClassVar[struct.Struct] = struct.Struct("<IIII")
    _A: ClassVar[struct.Struct] = struct.Struct("<IIIIQQQQ")

    def pack(self) -> bytes:
        parts = [self._S.pack(self.status, self.resource, len(self.allocations), 0)]
        parts += [self._A.pack(a.handle, a.group, a.flags, len(a.priv_drv_data), a.block,
                               a.block_size, a.offset, a.size) for a in self.allocations]
        parts += [a.priv_drv_data for a in self.allocations]
        return b"".join(parts)

    @classmethod
    def unpack(cls, body: bytes) -> "CreateAllocationReturn":
        _atleast(body, cls._S.size, "CreateAllocationReturn")
        status, resource, count, _ = cls._S.unpack_from(body)
        at = cls._S.size
        _atleast(body, at + count * cls._A.size, "CreateAllocationReturn")
        heads = [cls._A.unpack_from(body, at + i * cls._A.size) for i in range(count)]
        at += count * cls._A.size
        _exact(body, at + sum(h[3] for h in heads), "CreateAllocationReturn")
        out = []
        for handle, group, flags, size, block, block_size, offset, nbytes in heads:
            out.append(AllocationInfo(handle, group, flags, block, block_size, offset, nbytes,
                                      body[at : at + size]))
            at += size
        return cls(status, resource, tuple(out))


@dataclass(frozen=True, slots=True)
class DestroyAllocation:
    """DESTROYALLOCATION: device u32, resource u32 (host handle; 0 = none), flags u32
    (d3dddicb_destroyallocation2flags), count u32, then count x allocation handle u32."""

    device: int
    resource: int
    flags: int
    allocations: tuple[int, ...]
    _S: ClassVar[struct.Struct] = struct.Struct("<IIII")

    def pack(self) -> bytes:
        n = len(self.allocations)
        return self._S.pack(self.device, self.resource, self.flags, n) + struct.pack(
            f"<{n}I", *self.allocations)

    @classmethod
    def unpack(cls, body: bytes) -> "DestroyAllocation":
        _atleast(body, cls._S.size, "DestroyAllocation")
        device, resource, flags, n = cls._S.unpack_from(body)
        _exact(body, cls._S.size + 4 * n, "DestroyAllocation")
        return cls(device, resource, flags, struct.unpack_from(f"<{n}I", body, cls._S.size))


LOCK2_FD = 1  # send the descriptor of the allocation's block (a local link)
LOCK2_COPY = 2  # send the bytes offset..offset+length of the allocation (a link without fds)


@dataclass(frozen=True, slots=True)
class Lock2(_Fixed):
    """LOCK2: device u32, allocation u32, lock flags u32, mode u32 (LOCK2_FD | LOCK2_COPY), then
    offset u64 and length u64 inside the allocation (for LOCK2_COPY)."""

    device: int
    allocation: int
    flags: int
    mode: int
    offset: int
    length: int
    _S: ClassVar[struct.Struct] = struct.Struct("<IIIIQQ")


@dataclass(frozen=True, slots=True)
class Lock2Return:
    """LOCK2's reply: status u32, reserved u32, where the allocation is (a BlockRef: block,
    block size, offset), its size u64, then the bytes asked for with LOCK2_COPY. With LOCK2_FD
    the block's descriptor travels beside it. ``data`` may be any buffer (a view of the
    allocation's memory: a large one is packed as a Gather, not copied; unpacked from a large
    message it is a view of that message's buffer)."""

    status: int
    block: int = 0
    block_size: int = 0
    offset: int = 0
    size: int = 0
    data: Data = b""
    _S: ClassVar[struct.Struct] = struct.Struct("<IIQQQQ")

    def pack(self) -> bytes | Gather:
        return _with_data(self._S.pack(self.status, 0, self.block, self.block_size, self.offset,
                                       self.size), self.data)

    @classmethod
    def unpack(cls, body: bytes | Gather) -> "Lock2Return":
        body = _whole(body)
        _atleast(body, cls._S.size, "Lock2Return")
        status, _, block, block_size, offset, size = cls._S.unpack_from(body)
        return cls(status, block, block_size, offset, size, _tail(body, cls._S.size))


@dataclass(frozen=True, slots=True)
class Unlock2:
    """UNLOCK2 (links without descriptors): device u32, allocation u32, offset u64 inside the
    allocation, then the bytes to write back there (none: nothing to write). ``data`` as in
    Lock2Return."""

    device: int
    allocation: int
    offset: int
    data: Data = b""
    _S: ClassVar[struct.Struct] = struct.Struct("<IIQ")

    def pack(self) -> bytes | Gather:
        return _with_data(self._S.pack(self.device, self.allocation, self.offset), self.data)

    @classmethod
    def unpack(cls, body: bytes | Gather) -> "Unlock2":
        body = _whole(body)
        _atleast(body, cls._S.size, "Unlock2")
        device, allocation, offset = cls._S.unpack_from(body)
        return cls(device, allocation, offset, _tail(body, cls._S.size))


# ---- synchronization objects (pydxg layouts: docs/sync.md) -----------------------------------

SYNCOBJECTINFO_SIZE = 80  # sizeof(struct d3dddi_synchronizationobjectinfo2)


def _u64s(body: bytes, at: int, n: int) -> tuple[int, ...]:
    return struct.unpack_from(f"<{n}Q", body, at) if n else ()


def _u32s(body: bytes, at: int, n: int) -> tuple[int, ...]:
    return struct.unpack_from(f"<{n}I", body, at) if n else ()


@dataclass(frozen=True, slots=True)
class CreateSyncObject:
    """CREATESYNCOBJECT: device u32 (host handle), reserved u32, mirror_event u64, then the
    caller's d3dddi_synchronizationobjectinfo2 (80 bytes) with the CPU notification's event
    replaced by a guest host-event id and the fence addresses zeroed. ``mirror_event`` (0 =
    none): a guest host-event id to which the host sends every new value of the fence
    (PYDXG_FENCEVALUE), for a guest that keeps the page its client reads itself (a link that
    carries no descriptors)."""

    device: int
    mirror_event: int
    info: bytes
    _S: ClassVar[struct.Struct] = struct.Struct("<IIQ")

    def pack(self) -> bytes:
        _exact(self.info, SYNCOBJECTINFO_SIZE, "CreateSyncObject info")
        return self._S.pack(self.device, 0, self.mirror_event) + self.info

    @classmethod
    def unpack(cls, body: bytes) -> "CreateSyncObject":
        _exact(body, cls._S.size + SYNCOBJECTINFO_SIZE, "CreateSyncObject")
        device, reserved, mirror = cls._S.unpack_from(body)
        if reserved:
            raise ProtocolError("CreateSyncObject: reserved field set")
        return cls(device, mirror, bytes(body[cls._S.size :]))


@dataclass(frozen=True, slots=True)
class CreateSyncObjectReturn(_Fixed):
    """CREATESYNCOBJECT's reply: status u32, sync_object u32 (host handle; 0 on failure),
    fence_gpu_va u64, then where the fence's value is: block u64 (0: the object has no page),
    block_size u64, offset u64. On a link that carries descriptors the fence block's descriptor
    travels beside it."""

    status: int
    sync_object: int = 0
    gpu_va: int = 0
    block: int = 0
    block_size: int = 0
    offset: int = 0
    _S: ClassVar[struct.Struct] = struct.Struct("<IIQQQQ")


@dataclass(frozen=True, slots=True)
class DestroySyncObject(_Fixed):
    """DESTROYSYNCOBJECT (global channel, as in the real driver): sync_object u32 (host)."""

    sync_object: int
    _S: ClassVar[struct.Struct] = struct.Struct("<I4x")


@dataclass(frozen=True, slots=True)
class SignalSyncObject:
    """SIGNALSYNCOBJECT: flags u32 (d3dddicb_signalflags), device u32 (host handle; non-zero:
    a signal from the CPU, SignalSynchronizationObjectFromCpu; 0: on the contexts' GPU
    timelines), object_count u32, context_count u32, value_count u32 (0: the legacy single
    ``fence_value`` for every object; else one per object), reserved u32, fence_value u64,
    cpu_event u64 (enqueue_cpu_event: the guest host-event id to signal when the contexts get
    there; 0 = none), then values u64[value_count], objects u32[object_count] and contexts
    u32[context_count] (host handles)."""

    flags: int
    device: int
    objects: tuple[int, ...]
    contexts: tuple[int, ...] = ()
    values: tuple[int, ...] = ()
    fence_value: int = 0
    cpu_event: int = 0
    _S: ClassVar[struct.Struct] = struct.Struct("<IIIIIIQQ")

    def pack(self) -> bytes:
        no, nc, nv = len(self.objects), len(self.contexts), len(self.values)
        return (self._S.pack(self.flags, self.device, no, nc, nv, 0, self.fence_value,
                             self.cpu_event)
                + struct.pack(f"<{nv}Q{no}I{nc}I", *self.values, *self.objects,
                              *self.contexts))

    @classmethod
    def unpack(cls, body: bytes) -> "SignalSyncObject":
        _atleast(body, cls._S.size, "SignalSyncObject")
        flags, device, no, nc, nv, reserved, fence, event = cls._S.unpack_from(body)
        if reserved:
            raise ProtocolError("SignalSyncObject: reserved field set")
        _exact(body, cls._S.size + 8 * nv + 4 * (no + nc), "SignalSyncObject")
        at = cls._S.size
        values = _u64s(body, at, nv)
        at += 8 * nv
        objects = _u32s(body, at, no)
        contexts = _u32s(body, at + 4 * no, nc)
        return cls(flags, device, objects, contexts, values, fence, event)


WAIT_ANY = 1  # WaitSyncObjectCpu.flags: d3dddi_waitforsynchronizationobjectfromcpu_flags


@dataclass(frozen=True, slots=True)
class WaitSyncObjectCpu:
    """WAITFORSYNCOBJECTFROMCPU: device u32, object_count u32, flags u32 (bit 0 wait_any),
    reserved u32, guest_event u64 (the guest's host-event id, registered before this is sent),
    then values u64[n] and objects u32[n]. The host acks at once (NTSTATUS) and sends
    SIGNALGUESTEVENT(guest_event) when the wait is over, its status field saying how. pydxg:
    object_count 0 withdraws the wait registered with guest_event (its caller gave up)."""

    device: int
    flags: int
    guest_event: int
    objects: tuple[int, ...]
    values: tuple[int, ...]
    _S: ClassVar[struct.Struct] = struct.Struct("<IIIIQ")

    def pack(self) -> bytes:
        n = len(self.objects)
        if len(self.values) != n:
            raise ProtocolError("WaitSyncObjectCpu: one value per object")
        return (self._S.pack(self.device, n, self.flags, 0, self.guest_event)
                + struct.pack(f"<{n}Q{n}I", *self.values, *self.objects))

    @classmethod
    def unpack(cls, body: bytes) -> "WaitSyncObjectCpu":
        _atleast(body, cls._S.size, "WaitSyncObjectCpu")
        device, n, flags, reserved, event = cls._S.unpack_from(body)
        if reserved:
            raise ProtocolError("WaitSyncObjectCpu: reserved field set")
        _exact(body, cls._S.size + 12 * n, "WaitSyncObjectCpu")
        values = _u64s(body, cls._S.size, n)
        return cls(device, flags, event, _u32s(body, cls._S.size + 8 * n, n), values)


@dataclass(frozen=True, slots=True)
class WaitSyncObjectGpu:
    """WAITFORSYNCOBJECTFROMGPU: context u32, object_count u32, legacy u32 (1: one value, the
    legacy ``fence_value``, for every object; 0: one u64 per object, monitored fences),
    reserved u32, then values u64[1 or n] and objects u32[n]."""

    context: int
    legacy: int
    objects: tuple[int, ...]
    values: tuple[int, ...]
    _S: ClassVar[struct.Struct] = struct.Struct("<IIII")

    def pack(self) -> bytes:
        n, nv = len(self.objects), len(self.values)
        if nv != (1 if self.legacy else n):
            raise ProtocolError("WaitSyncObjectGpu: one value (legacy) or one per object")
        return (self._S.pack(self.context, n, 1 if self.legacy else 0, 0)
                + struct.pack(f"<{nv}Q{n}I", *self.values, *self.objects))

    @classmethod
    def unpack(cls, body: bytes) -> "WaitSyncObjectGpu":
        _atleast(body, cls._S.size, "WaitSyncObjectGpu")
        context, n, legacy, reserved = cls._S.unpack_from(body)
        if reserved or legacy not in (0, 1):
            raise ProtocolError("WaitSyncObjectGpu: reserved field set")
        nv = 1 if legacy else n
        _exact(body, cls._S.size + 8 * nv + 4 * n, "WaitSyncObjectGpu")
        values = _u64s(body, cls._S.size, nv)
        return cls(context, legacy, _u32s(body, cls._S.size + 8 * nv, n), values)


@dataclass(frozen=True, slots=True)
class FenceValue(_Fixed):
    """PYDXG_FENCEVALUE (host -> guest, pydxg extension): ``value`` is the fence's value now;
    ``event`` is the mirror_event its CREATESYNCOBJECT named."""

    event: int
    value: int
    _S: ClassVar[struct.Struct] = struct.Struct("<QQ")


# ---- sharing (pydxg layouts: docs/sharing.md) -------------------------------------------------

SHARED_RESOURCE = 1  # CreateNtSharedObjectReturn.kind
SHARED_SYNC_OBJECT = 2
OPEN_READ_ONLY = 1  # OpenResource.flags / OpenSyncObject.flags: no write, no signal


@dataclass(frozen=True, slots=True)
class CreateNtSharedObject(_Fixed):
    """CREATENTSHAREDOBJECT (global channel, as in the real driver): ``object`` u32, the caller
    process's host handle of a shared resource or shared sync object (its own or one it
    opened), reserved u32. Each one takes a reference the shared object keeps until its
    DESTROYNTSHAREDOBJECT (the guest takes one per share descriptor it hands out)."""

    object: int
    _S: ClassVar[struct.Struct] = struct.Struct("<I4x")


@dataclass(frozen=True, slots=True)
class CreateNtSharedObjectReturn(_Fixed):
    """CREATENTSHAREDOBJECT's reply: status u32, the NT handle u32 (the shared object's handle
    in the partition, what OPENRESOURCE and OPENSYNCOBJECT name), kind u32 (SHARED_RESOURCE,
    SHARED_SYNC_OBJECT), then what QueryResourceInfoFromNtHandle answers of a resource:
    allocation count, runtime data size, resource private data size and the allocations'
    private data size in all (u32 each; 0 for a sync object), reserved u32."""

    status: int
    handle: int = 0
    kind: int = 0
    allocation_count: int = 0
    runtime_data_size: int = 0
    priv_drv_data_size: int = 0
    total_priv_drv_data_size: int = 0
    _S: ClassVar[struct.Struct] = struct.Struct("<IIIIIII4x")


@dataclass(frozen=True, slots=True)
class DestroyNtSharedObject(_Fixed):
    """DESTROYNTSHAREDOBJECT (global channel, VM level): the NT handle u32, reserved u32. Drops
    one CREATENTSHAREDOBJECT reference; the object goes with its last reference and handle."""

    handle: int
    _S: ClassVar[struct.Struct] = struct.Struct("<I4x")


WAIT_WITHDRAW = 1  # WaitSharedSync.flags: withdraw the wait registered with guest_event


@dataclass(frozen=True, slots=True)
class WaitSharedSync(_Fixed):
    """PYDXG_WAITSHAREDSYNC (global channel, VM level, pydxg): the NT handle u32 of a shared
    sync object the guest holds a reference on (CREATENTSHAREDOBJECT), flags u32
    (WAIT_WITHDRAW), guest_event u64, value u64. Acked at once; SIGNALGUESTEVENT(guest_event)
    when the object reaches ``value`` or goes (its status field non-zero). The wait belongs to
    no process: it lasts until then or until withdrawn, at most one per reference."""

    handle: int
    flags: int
    guest_event: int
    value: int
    _S: ClassVar[struct.Struct] = struct.Struct("<IIQQ")


@dataclass(frozen=True, slots=True)
class OpenResource(_Fixed):
    """OPENRESOURCE: device u32 (host handle), the NT handle u32, flags u32 (OPEN_READ_ONLY:
    the resource is opened without write access), allocation_count u32 (what the caller
    expects: it must be the resource's)."""

    device: int
    handle: int
    flags: int
    allocation_count: int
    _S: ClassVar[struct.Struct] = struct.Struct("<IIII")


@dataclass(frozen=True, slots=True)
class OpenResourceReturn:
    """OPENRESOURCE's reply: status u32, resource u32 (the opener's new host handle),
    alloc_count u32, runtime data size u32, resource private data size u32, reserved u32, then
    alloc_count allocations as in CreateAllocationReturn (handle, group, flags, private data
    size, block, block size, offset, size), their private data, the runtime data, the resource
    private data."""

    status: int
    resource: int = 0
    allocations: tuple[AllocationInfo, ...] = ()
    runtime_data: bytes = b""
    priv_drv_data: bytes = b""
    _S: ClassVar[struct.Struct] = struct.Struct("<IIIII4x")
    _A: ClassVar[struct.Struct] = struct.Struct("<IIIIQQQQ")

    def pack(self) -> bytes:
        parts = [self._S.pack(self.status, self.resource, len(self.allocations),
                              len(self.runtime_data), len(self.priv_drv_data))]
        parts += [self._A.pack(a.handle, a.group, a.flags, len(a.priv_drv_data), a.block,
                               a.block_size, a.offset, a.size) for a in self.allocations]
        parts += [a.priv_drv_data for a in self.allocations]
        parts += [self.runtime_data, self.priv_drv_data]
        return b"".join(parts)

    @classmethod
    def unpack(cls, body: bytes) -> "OpenResourceReturn":
        _atleast(body, cls._S.size, "OpenResourceReturn")
        status, resource, count, nrt, npriv = cls._S.unpack_from(body)
        at = cls._S.size
        _atleast(body, at + count * cls._A.size, "OpenResourceReturn")
        heads = [cls._A.unpack_from(body, at + i * cls._A.size) for i in range(count)]
        at += count * cls._A.size
        _exact(body, at + sum(h[3] for h in heads) + nrt + npriv, "OpenResourceReturn")
        out = []
        for handle, group, flags, size, block, block_size, offset, nbytes in heads:
            out.append(AllocationInfo(handle, group, flags, block, block_size, offset, nbytes,
                                      bytes(body[at : at + size])))
            at += size
        runtime = bytes(body[at : at + nrt])
        return cls(status, resource, tuple(out), runtime, bytes(body[at + nrt :]))


@dataclass(frozen=True, slots=True)
class OpenSyncObject(_Fixed):
    """OPENSYNCOBJECT (global channel, as in the real driver): device u32 (the opener's host
    handle), the NT handle u32, flags u32 (OPEN_READ_ONLY: the object cannot be signalled
    through this handle), reserved u32, mirror_event u64 (as in CreateSyncObject: a guest
    host-event id told every new value, for a guest without the fence block's descriptor;
    0 = none). Answered with a CreateSyncObjectReturn (the fence block's descriptor beside it
    on a link that carries descriptors)."""

    device: int
    handle: int
    flags: int
    mirror_event: int = 0
    _S: ClassVar[struct.Struct] = struct.Struct("<III4xQ")


# ---- host -> VM notifications ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SignalGuestEvent(_Fixed):
    event: int  # a guest host-event id, never a pointer
    process_id: int
    dereference_event: int
    # pydxg: how the wait the event stands for ended, in the real struct's padding (a real host
    # leaves it 0): 0, or the failure NTSTATUS (the object or its device went: docs/sync.md).
    status: int = 0
    _S: ClassVar[struct.Struct] = struct.Struct("<QQB3xI")


SETGUESTDATA_DATATYPE_DWORD = 0
SETGUESTDATA_DATATYPE_UINT64 = 1


@dataclass(frozen=True, slots=True)
class SetGuestData(_Fixed):
    guest_pointer: int
    data64: int
    bits: int  # dereference:1 data_type:4
    _S: ClassVar[struct.Struct] = struct.Struct("<QQI4x")

    @property
    def data_type(self) -> int:
        return (self.bits >> 1) & 0xF

    @property
    def data32(self) -> int:
        return self.data64 & 0xFFFFFFFF
