"""What a pydxg node is worth to Ray, and what a task's share of it is worth to pydxg.

A node advertises ``pydxg_vgpu`` (one unit per adapter; Ray treats it as a *unit-instance*
resource, like GPUs, when ``RAY_custom_unit_instance_resources`` names it, so a fraction is
always carved out of ONE adapter and Ray tells the task which), ``pydxg_memory`` (the bytes of
all its adapters, local + non-local, as pydxg's quotas count them) and ``pydxg_adapter_<luid>``
(1 per adapter: a task may ask for one adapter by its LUID). Which adapter each instance is
travels to the workers in ``DXG_RAY_ADAPTERS`` (the raylet's environment, inherited by every
worker it starts): ``0x<luid>:<bytes>`` per instance, comma separated, instance order.

Pure functions, no I/O: the agent and the task wrapper both use them, and tests need no cluster.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["ADAPTERS_ENV", "ADAPTER_PREFIX", "MEMORY", "PAGE", "UNIT_INSTANCE_ENV", "VGPU",
           "NodeAdapter", "TaskShare", "adapter_resource", "decode_adapters", "encode_adapters",
           "node_resources", "task_share", "validate_vgpu"]

VGPU = "pydxg_vgpu"
MEMORY = "pydxg_memory"
ADAPTER_PREFIX = "pydxg_adapter_"
ADAPTERS_ENV = "DXG_RAY_ADAPTERS"
UNIT_INSTANCE_ENV = "RAY_custom_unit_instance_resources"
PAGE = 4096
MAX_ADAPTERS = 64  # D3DKMT_ADAPTERS_MAX: more entries in the variable is a corrupt value


@dataclass(frozen=True, slots=True)
class NodeAdapter:
    """One adapter of the node's guest, as Ray sees it: its LUID and its memory (bytes, local
    and non-local together)."""

    luid: int
    memory: int


@dataclass(frozen=True, slots=True)
class TaskShare:
    """What a task was given, in pydxg's terms: the adapters it may see (LUIDs, in the order
    Ray assigned them), its memory quota per adapter (None: the whole adapter) and its
    compute fraction (1.0: the whole share of its user)."""

    luids: tuple[int, ...]
    memory: int | None
    compute: float

    def visible_env(self) -> str:
        return ",".join(f"0x{luid:016x}" for luid in self.luids)

    def limits_env(self) -> str:
        """``DXG_PROCESS_LIMITS`` for it: every connection the task opens is held to this."""
        parts = [f"adapters={'+'.join(f'0x{luid:016x}' for luid in self.luids)}"]
        if self.memory is not None:
            parts.append(f"memory={self.memory}")
        if self.compute < 1.0:
            parts.append(f"compute={self.compute:.6g}")
        return ",".join(parts)


def adapter_resource(luid: int) -> str:
    """The per-adapter resource name: ``pydxg_adapter_000000010000abcd``."""
    return f"{ADAPTER_PREFIX}{luid:016x}"


def node_resources(adapters: Sequence[NodeAdapter]) -> dict[str, float]:
    """The custom resources a node with ``adapters`` gives ``ray start --resources``; empty
    when it has none (Ray refuses a resource of 0)."""
    if not adapters:
        return {}
    out: dict[str, float] = {VGPU: float(len(adapters)),
                             MEMORY: float(sum(a.memory for a in adapters))}
    for a in adapters:
        out[adapter_resource(a.luid)] = 1.0
    return out


def encode_adapters(adapters: Iterable[NodeAdapter]) -> str:
    return ",".join(f"0x{a.luid:016x}:{a.memory}" for a in adapters)


def decode_adapters(text: str) -> tuple[NodeAdapter, ...]:
    """``DXG_RAY_ADAPTERS`` back into adapters; ValueError naming what is wrong."""
    if not text.strip():
        return ()
    out = []
    for entry in text.split(","):
        luid_text, sep, memory_text = entry.strip().partition(":")
        try:
            if not sep or not luid_text.lower().startswith("0x"):
                raise ValueError(entry)
            luid = int(luid_text, 16)
            memory = int(memory_text)
        except ValueError:
            raise ValueError(f"{ADAPTERS_ENV}: {entry!r} is not 0x<luid>:<bytes> (the pydxg "
                             "Ray agent sets this variable; start the node with "
                             "`dxg ray start`)") from None
        if not 0 <= luid < 1 << 64 or memory < 0:
            raise ValueError(f"{ADAPTERS_ENV}: {entry!r} is out of range")
        out.append(NodeAdapter(luid, memory))
    if len(out) > MAX_ADAPTERS:
        raise ValueError(f"{ADAPTERS_ENV}: more than {MAX_ADAPTERS} adapters")
    return tuple(out)


def validate_vgpu(vgpu: float) -> float:
    """A request Ray can grant from unit instances: 0 < vgpu <= 1, or a whole number of
    adapters. Raises ValueError with what to ask for instead."""
    if isinstance(vgpu, bool) or not isinstance(vgpu, int | float) or not math.isfinite(vgpu):
        raise ValueError(f"vgpu must be a number, not {vgpu!r}")
    if vgpu <= 0:
        raise ValueError(f"vgpu must be more than 0, not {vgpu}")
    if vgpu > 1 and vgpu != int(vgpu):
        raise ValueError(f"vgpu {vgpu}: above 1 only whole adapters can be given (2, 3, ...), "
                         "as with Ray's GPUs")
    if vgpu < 1e-4:
        raise ValueError(f"vgpu {vgpu}: Ray counts resources in steps of 0.0001")
    return float(vgpu)


def task_share(assigned: Sequence[tuple[int, float]],
               adapters: Sequence[NodeAdapter]) -> TaskShare:
    """The pydxg share of a task Ray gave ``assigned`` ((instance, fraction) of
    ``pydxg_vgpu``) on a node with ``adapters`` (instance order). A fraction of one adapter
    becomes a quota of that fraction of its memory (whole pages, rounded down) and the same
    fraction of compute; whole adapters come without a quota. ValueError when Ray's answer
    does not fit the node (an instance the node does not have)."""
    if not assigned:
        raise ValueError(f"this task holds no {VGPU}: ask for one (dxg.ray.remote(vgpu=...))")
    luids = []
    for instance, _fraction in assigned:
        if not 0 <= instance < len(adapters):
            raise ValueError(f"Ray assigned {VGPU} instance {instance}, but this node has "
                             f"{len(adapters)} adapter(s) in {ADAPTERS_ENV}")
        luids.append(adapters[instance].luid)
    if len(assigned) == 1 and assigned[0][1] < 1.0:
        instance, fraction = assigned[0]
        memory = int(adapters[instance].memory * fraction) // PAGE * PAGE
        return TaskShare((luids[0],), memory, fraction)
    return TaskShare(tuple(luids), None, 1.0)


def assigned_amount(resource_ids: Mapping[str, Sequence[tuple[int, float]]]
                    ) -> list[tuple[int, float]]:
    """The (instance, fraction) pairs of ``pydxg_vgpu`` in a worker's resource ids."""
    return [(int(i), float(f)) for i, f in resource_ids.get(VGPU, ())]
