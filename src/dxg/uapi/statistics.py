"""pydxg's layout of a QueryStatistics result (``d3dkmt_querystatistics.result``).

The Linux header leaves the 776-byte result opaque; the Windows one is a union of per-type
structs whose fields (paging, preemption, VidPN counters) a software adapter does not have.
pydxg answers every type it supports with ONE record, documented in ``docs/statistics.md``,
little-endian, at the start of the result (the rest of the 776 bytes is zero)::

    @0    u32  magic     0x51584450 (the bytes "PDXQ")
    @4    u16  version   2
    @6    u16  size      152: bytes of the record
    @8    u32  type      the d3dkmt_querystatistics_type it answers
    @12   u32  reserved  0
    @16   u64  processes            live processes using the adapter (1 for a process)
    @24   u64  devices              live devices
    @32   u64  contexts             live contexts
    @40   u64  hwqueues             live hardware queues
    @48   u64  allocations          live allocations
    @56   u64  committed_local      bytes committed in the local segment group
    @64   u64  committed_nonlocal   bytes committed in the non-local segment group
    @72   u64  local_capacity       the local segment group's size (0 for PROCESS)
    @80   u64  nonlocal_capacity    the non-local segment group's size (0 for PROCESS)
    @88   u64  command_buffers      command buffers run to their end (cumulative)
    @96   u64  commands             the commands in them (cumulative)
    @104  u64  engine_busy_ns       the engine's time on the work (cumulative, ns)
    @112  u64  faults               devices that entered an error state by a fault (cumulative)
    @120  u64  resets               devices marked as in error, MarkDeviceAsError (cumulative)
    @128  u64  demoted_bytes        bytes moved out of the local group for higher priorities
                                    (cumulative)
    @136  u64  promoted_bytes       bytes moved back into the local group (cumulative)
    @144  u64  reserved  0

Shared by the host (which fills it) and clients (which read it); nothing here does I/O.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import astuple, dataclass, fields
from typing import ClassVar, Self

from dxg.uapi import structs as s

__all__ = [
    "QUERY_ADAPTER",
    "QUERY_PROCESS",
    "QUERY_PROCESS_ADAPTER",
    "RESULT_BYTES",
    "RESULT_OFFSET",
    "STATISTICS_MAGIC",
    "STATISTICS_VERSION",
    "SUPPORTED_TYPES",
    "StatisticsRecord",
]

STATISTICS_MAGIC = 0x51584450  # b"PDXQ" little-endian
STATISTICS_VERSION = 2
RESULT_OFFSET = 24  # of the result in d3dkmt_querystatistics
RESULT_BYTES = ctypes.sizeof(s.d3dkmt_querystatistics_result)  # 776

_T = s.d3dkmt_querystatistics_type
QUERY_ADAPTER = int(_T._D3DKMT_QUERYSTATISTICS_ADAPTER)
QUERY_PROCESS = int(_T._D3DKMT_QUERYSTATISTICS_PROCESS)
QUERY_PROCESS_ADAPTER = int(_T._D3DKMT_QUERYSTATISTICS_PROCESS_ADAPTER)
# What pydxg fills; the other types are answered STATUS_NOT_SUPPORTED.
SUPPORTED_TYPES = frozenset({QUERY_ADAPTER, QUERY_PROCESS, QUERY_PROCESS_ADAPTER})


@dataclass(frozen=True, slots=True)
class StatisticsRecord:
    """One answer: the counters of an adapter, a process or a process on an adapter."""

    type: int
    processes: int = 0
    devices: int = 0
    contexts: int = 0
    hwqueues: int = 0
    allocations: int = 0
    committed_local: int = 0
    committed_nonlocal: int = 0
    local_capacity: int = 0
    nonlocal_capacity: int = 0
    command_buffers: int = 0
    commands: int = 0
    engine_busy_ns: int = 0
    faults: int = 0
    resets: int = 0
    demoted_bytes: int = 0
    promoted_bytes: int = 0
    _HEAD: ClassVar[struct.Struct] = struct.Struct("<IHHII")
    _S: ClassVar[struct.Struct] = struct.Struct("<IHHII16QQ")

    def pack(self) -> bytes:
        """The record, padded with zeros to the result's 776 bytes."""
        values = astuple(self)
        raw = self._S.pack(STATISTICS_MAGIC, STATISTICS_VERSION, self._S.size, values[0], 0,
                           *(v & 0xFFFFFFFFFFFFFFFF for v in values[1:]), 0)
        return raw.ljust(RESULT_BYTES, b"\0")

    @classmethod
    def unpack(cls, result: bytes) -> Self:
        """The record at the start of a result; ValueError if it is not one."""
        if len(result) < cls._S.size:
            raise ValueError(f"a statistics result of {len(result)} bytes")
        magic, version, size, qtype, _r = cls._HEAD.unpack_from(result)
        if magic != STATISTICS_MAGIC or version != STATISTICS_VERSION or size < cls._S.size:
            raise ValueError(f"not a pydxg v{STATISTICS_VERSION} statistics record")
        counters = cls._S.unpack_from(result)[5:-1]
        return cls(qtype, *counters)

    @classmethod
    def of(cls, query: ctypes.Structure) -> Self:
        """The record in a d3dkmt_querystatistics after the call."""
        return cls.unpack(bytes(query)[RESULT_OFFSET : RESULT_OFFSET + RESULT_BYTES])

    @classmethod
    def counter_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))[1:]
