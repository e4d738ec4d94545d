"""Backends: the engines behind host adapters.

A backend describes the adapters it drives (identity, memory, engines, the command-buffer formats
they execute) with an `AdapterDescription`; the host turns that description into the adapter's
identity on the wire (GETINTERNALADAPTERINFO, QUERYADAPTERINFO, the vGPU offer). The host gets its
backend from its config (`HostConfig.backend`), so another engine plugs in without touching the
host. Whatever a backend does that can take long (driver escapes now; memory and execution as
they land) the host runs on its worker threads, never on its event loop, and never while it holds
any state of its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from dxg.backends.fanout import FanOut


class Cancelled(Protocol):
    """What tells a run to stop at its next command boundary: a threading.Event set when its
    caller goes, or the host's watchdog, which is also set once the run passes its time limit
    (the TDR: dxg.host.hwqueue)."""

    def is_set(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class AdapterDescription:
    """What a backend's adapter is. Immutable; one per host adapter."""

    name: str  # shown as the device description (UTF-16 on the wire, 80 chars max)
    driver_description: str  # KMTQAITYPE_DRIVER_DESCRIPTION
    vendor_id: int  # PCI ids of the (physical) adapter behind the vGPU
    device_id: int
    subsystem_vendor_id: int
    subsystem_id: int
    revision_id: int
    dedicated_video_memory: int  # bytes
    dedicated_system_memory: int  # bytes
    shared_system_memory: int  # bytes
    node_count: int  # engines (nodes) a context can target: node_ordinal < node_count
    command_formats: tuple[str, ...]  # the command-buffer formats this adapter executes
    compute_only: bool = True  # an MCDM-style compute accelerator: no display, no 3-D
    software_device: bool = True  # runs on the CPU
    engine: str = ""  # free text: what executes the work (e.g. "numpy 2.4.6")


class Backend(Protocol):
    """The engine interface a host drives. Methods other than ``describe`` may block: the host
    calls them on a worker thread and passes ``cancelled``, set when the caller has gone."""

    name: str

    def describe(self, index: int, dedicated_memory_mb: int,
                 shared_memory_mb: int) -> AdapterDescription:
        """The description of adapter ``index`` with the memory sizes the host is configured for."""
        ...

    def escape(self, index: int, data: bytes, cancelled: threading.Event) -> tuple[int, bytes]:
        """A driver-private escape on adapter ``index``: (NTSTATUS, private data to return,
        the same length as ``data``)."""
        ...

    def execute(self, index: int, buffer: memoryview | bytes,
                resolve: Callable[[int, int, bool], memoryview],
                cancelled: Cancelled | None = None,
                fanout: FanOut | None = None) -> Any:
        """Run one command buffer on adapter ``index`` (in one of ``command_formats``).
        ``resolve(va, nbytes, write)`` gives the submitting process's GPU memory; anything
        wrong with the buffer or its memory raises the engine's fault (EngineFault for the soft
        engine) and nothing else. ``fanout`` lends the run idle engine slots for its big ops
        (dxg.backends.fanout; a backend may ignore it). Returns what it did (commands, bytes,
        time)."""
        ...


__all__ = ["AdapterDescription", "Backend"]
