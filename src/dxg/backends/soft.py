"""The CPU "soft GPU": an adapter whose engine is NumPy on the host's CPU.

The description lives here (identity, memory sizes, one compute node and the command-buffer
format it executes), and `SoftBackend.execute` runs command buffers: the format is
`dxg.backends.softcmd` (docs/commands.md), the execution `dxg.backends.engine`.
"""

from __future__ import annotations

import json
import os
import struct
import threading

import numpy

from dxg.backends import AdapterDescription, Cancelled
from dxg.backends.engine import Resolve, RunResult, run
from dxg.backends.fanout import FanOut
from dxg.backends.softcmd import EngineFault, FaultKind, Opcode, decode
from dxg.uapi.ntstatus import NTSTATUS

SOFT_ADAPTER_NAME = "pydxg Soft GPU (NumPy)"
# The version-1 pydxg soft command-buffer format (little-endian ops: copy, fill, elementwise math,
# GEMM, reductions, softmax, 2-D convolution); byte layout in docs/commands.md.
SOFT_COMMAND_FORMAT_V1 = "pydxg-soft-v1"

# PCI identity reported for the physical adapter behind each soft vGPU: vendor Microsoft, the
# device id Windows uses for its own software (CPU) render adapter, and a pydxg subsystem id so
# the two can be told apart.
SOFT_VENDOR_ID = 0x1414
SOFT_DEVICE_ID = 0x008C
SOFT_SUBSYSTEM_VENDOR_ID = 0x1414
SOFT_SUBSYSTEM_ID = 0x5059  # "PY"
SOFT_REVISION_ID = 1

MIB = 1 << 20


def soft_adapter_description(
    dedicated_memory_mb: int = 1024, shared_memory_mb: int = 4096
) -> AdapterDescription:
    """The description of one soft adapter: one compute node, NumPy engine, our command format."""
    if dedicated_memory_mb < 0 or shared_memory_mb < 0:
        raise ValueError("memory sizes must not be negative")
    return AdapterDescription(
        name=SOFT_ADAPTER_NAME,
        driver_description=f"{SOFT_ADAPTER_NAME}, pydxg soft compute driver",
        vendor_id=SOFT_VENDOR_ID,
        device_id=SOFT_DEVICE_ID,
        subsystem_vendor_id=SOFT_SUBSYSTEM_VENDOR_ID,
        subsystem_id=SOFT_SUBSYSTEM_ID,
        revision_id=SOFT_REVISION_ID,
        dedicated_video_memory=dedicated_memory_mb * MIB,
        dedicated_system_memory=0,
        shared_system_memory=shared_memory_mb * MIB,
        node_count=1,
        command_formats=(SOFT_COMMAND_FORMAT_V1,),
        compute_only=True,
        software_device=True,
        engine=f"numpy {numpy.__version__}",
    )


# The soft driver's private escapes: a 16-byte head (u32 magic "PDXS", u16 version 1, u16 op,
# u32 status/fault kind, u32 aux) and the op's data after it (docs/execution.md).
SOFT_ESCAPE = struct.Struct("<IHHII")
SOFT_ESCAPE_MAGIC = 0x53584450
SOFT_ESCAPE_QUERY_ENGINE = 1
SOFT_ESCAPE_VALIDATE = 2


class SoftBackend:
    """The soft adapters' backend: NumPy on the host CPU."""

    name = "soft"

    def describe(self, index: int, dedicated_memory_mb: int,
                 shared_memory_mb: int) -> AdapterDescription:
        return soft_adapter_description(dedicated_memory_mb, shared_memory_mb)

    def escape(self, index: int, data: bytes, cancelled: threading.Event) -> tuple[int, bytes]:
        """The soft driver's private escapes (SOFT_ESCAPE head, docs/execution.md):
        QUERY_ENGINE fills the rest of the data with the engine's description (UTF-8 JSON,
        NUL-padded; STATUS_BUFFER_TOO_SMALL with the size needed when it does not fit);
        VALIDATE checks the command buffer that follows the head without running it (status 0,
        or STATUS_INVALID_PARAMETER with the fault's kind and command index in the head)."""
        if len(data) < SOFT_ESCAPE.size:
            return int(NTSTATUS.STATUS_INVALID_PARAMETER), data
        magic, version, op, _status, _aux = SOFT_ESCAPE.unpack_from(data)
        if magic != SOFT_ESCAPE_MAGIC or version != 1:
            return int(NTSTATUS.STATUS_INVALID_PARAMETER), data
        body = data[SOFT_ESCAPE.size :]
        if op == SOFT_ESCAPE_QUERY_ENGINE:
            desc = soft_adapter_description()
            text = json.dumps({"engine": desc.engine, "formats": list(desc.command_formats),
                               "ops": [o.name for o in Opcode],
                               "threads": os.cpu_count() or 1}).encode()
            if len(text) > len(body):
                head = SOFT_ESCAPE.pack(magic, 1, op, 0, len(text))
                return int(NTSTATUS.STATUS_BUFFER_TOO_SMALL), head + body
            head = SOFT_ESCAPE.pack(magic, 1, op, 0, len(text))
            return int(NTSTATUS.STATUS_SUCCESS), head + text + bytes(len(body) - len(text))
        if op == SOFT_ESCAPE_VALIDATE:
            try:
                decode(body)
            except EngineFault as e:
                kinds = tuple(FaultKind)
                head = SOFT_ESCAPE.pack(magic, 1, op, kinds.index(e.kind) + 1,
                                        e.command_index & 0xFFFFFFFF)
                return int(NTSTATUS.STATUS_INVALID_PARAMETER), head + body
            return int(NTSTATUS.STATUS_SUCCESS), data
        return int(NTSTATUS.STATUS_INVALID_PARAMETER), data

    def execute(self, index: int, buffer: memoryview | bytes, resolve: Resolve,
                cancelled: Cancelled | None = None,
                fanout: FanOut | None = None) -> RunResult:
        """Run one pydxg-soft-v1 command buffer on adapter ``index`` (blocking: call it on a
        worker thread). ``resolve(va, nbytes, write)`` gives a memoryview of exactly that range
        of the submitting process's GPU VA space or raises `EngineFault` (PAGE_FAULT). Raises
        `EngineFault` for anything wrong with the buffer or its memory, nothing else.
        ``fanout``: idle engine slots a big op may borrow (dxg.backends.fanout)."""
        return run(buffer, resolve, cancelled, fanout)


__all__ = ["SOFT_ADAPTER_NAME", "SOFT_COMMAND_FORMAT_V1", "SOFT_ESCAPE", "SOFT_ESCAPE_MAGIC",
           "SOFT_ESCAPE_QUERY_ENGINE", "SOFT_ESCAPE_VALIDATE", "SoftBackend",
           "soft_adapter_description"]
