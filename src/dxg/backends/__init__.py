"""Backends: the engines behind host adapters.

A backend describes the adapter it drives (identity, memory, engines, the command-buffer formats it
executes) with an `AdapterDescription`; the host turns that description into the adapter's
identity on the wire (GETINTERNALADAPTERINFO, QUERYADAPTERINFO, the vGPU offer).
"""

from dataclasses import dataclass


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


__all__ = ["AdapterDescription"]
