"""Host processes: one per CREATEPROCESS, the owner of everything a guest process creates.

Also where a process's life ends on the host: DESTROYPROCESS (or the guest going away) drops its
devices (and their contexts, allocations and paging queues), its GPU VA spaces and memory blocks,
its escape regions, and cancels the backend work it has in flight.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from dxg.host.call import Call, CommandFailed, Handler
from dxg.host.memory import ProcessMemory
from dxg.host.quota import ProcessQuota
from dxg.host.scheduler import MAX_SHARE, EngineAccount
from dxg.host.syncobject import ProcessSync
from dxg.protocol import messages as m
from dxg.protocol.commands import GlobalCommand
from dxg.uapi.handles import HandleType
from dxg.uapi.ntstatus import NTSTATUS

if TYPE_CHECKING:
    from dxg.host.device import HostDevice
    from dxg.host.escape import Region
    from dxg.host.partition import Partition

log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class HostProcess:
    handle: int
    pid: int
    name: str
    cookie: int  # the guest's opaque process pointer, kept and never dereferenced
    linux_process: bool
    # Worker threads its jobs may hold at once (HostConfig.max_jobs_per_process).
    job_slots: asyncio.Semaphore
    devices: dict[int, HostDevice] = field(default_factory=dict)
    regions: dict[int, Region] = field(default_factory=dict)  # pydxg escape regions
    # Its device memory: blocks, usage per adapter, GPU VA spaces (dxg.host.memory).
    memory: ProcessMemory = field(default_factory=ProcessMemory)
    # Its synchronization objects, CPU waits and queued GPU signals/waits (dxg.host.syncobject).
    sync: ProcessSync = field(default_factory=ProcessSync)
    # Backend work in flight for this process: set each event to cut it short.
    jobs: set[threading.Event] = field(default_factory=set)
    running: int = 0  # of those jobs, the ones on a worker thread now
    pending: int = 0  # its requests running or queued as tasks (long commands)
    region_ids: int = 0
    objects: int = 0  # devices and contexts it holds (HostConfig.max_objects_per_process)
    pinned: int = 0  # bytes of memory it holds (HostConfig.max_process_bytes)
    alive: bool = True  # False once dropped: its requests still queued find it gone
    # Its weight on every adapter's engine (PYDXG_SETPROCESSQUOTA; dxg.host.scheduler), and
    # its engine time and waiting jobs per adapter index.
    compute_share: int = 1
    engine_accounts: dict[int, EngineAccount] = field(default_factory=dict)

    @property
    def context_count(self) -> int:
        return sum(len(d.contexts) for d in self.devices.values())

    def census(self) -> dict[str, Any]:
        devices = self.devices.values()
        return {
            "handle": self.handle,
            "pid": self.pid,
            "name": self.name,
            "cookie": self.cookie,
            "quota": {"account": self.memory.quota.account,
                      "per_process": self.memory.quota.per_process,
                      "per_account": self.memory.quota.per_account},
            # Its compute share and, per adapter, the engine time its command buffers used
            # (ns, measured where they ran, fan-out helpers included) and its jobs running
            # and waiting for a slot (dxg.host.scheduler).
            "compute": {"share": self.compute_share,
                        "adapters": [{"adapter": index, **account.census()}
                                     for index, account in sorted(
                                         self.engine_accounts.items())]},
            "linux_process": self.linux_process,
            "devices": [d.census() for d in self.devices.values()],
            "device_count": len(self.devices),
            "context_count": self.context_count,
            "regions": len(self.regions),
            "jobs": len(self.jobs),
            "running_jobs": self.running,
            "pending_calls": self.pending,
            **self.memory.census(),  # memory (per adapter), blocks, block_bytes
            **self.sync.census(),  # sync_objects, cpu_waits, gpu_ops
            "allocations": sum(len(d.allocations) for d in devices),
            "resources": sum(len(d.resources) for d in devices),
            "paging_queues": sum(len(d.paging_queues) for d in devices),
            "gpu_va": [v.census() for v in self.memory.vaspaces.values()],
        }


def drop_process(p: Partition, process: HostProcess) -> None:
    """Everything of the process goes; work it has in flight is told to stop, and its
    requests still waiting to run find it gone (`alive`)."""
    from dxg.host.device import drop_device
    from dxg.host.escape import drop_region
    from dxg.host.syncobject import drop_process_syncobjects
    from dxg.host.vaspace import drop_vaspace

    process.alive = False
    for job in list(process.jobs):
        job.set()
    drop_process_syncobjects(p, process)
    for device in list(process.devices.values()):
        drop_device(p, device)
    for adapter_index in list(process.memory.vaspaces):
        drop_vaspace(p, process, adapter_index)
    p.shares.process_leaving(process)  # (shared memory it was charged goes to its account)
    process.memory.drop()
    for region in list(process.regions.values()):
        drop_region(p, process, region)
    p.statistics.process_gone(process)  # its counts stay with its adapters
    p.processes.pop(process.handle, None)
    p.free(process.handle, HandleType.PROCESS)


def create_process(p: Partition, call: Call, body: m.CreateProcess) -> m.CreateProcessReturn:
    process = HostProcess(0, body.process_id, body.process_name, body.process_cookie,
                          body.linux_process, asyncio.Semaphore(p.config.max_jobs_per_process))
    process.memory.ledgers = p.ledgers  # its commitments count for its guest (dxg.host.quota)
    process.handle = p.alloc(HandleType.PROCESS, process)
    p.processes[process.handle] = process
    log.debug("partition %d: process %d %r -> 0x%08x", p.id, process.pid, process.name,
              process.handle)
    return m.CreateProcessReturn(process.handle)


def destroy_process(p: Partition, call: Call, body: m.Empty) -> m.NtStatusReturn:
    process = p.process(call)
    drop_process(p, process)
    log.debug("partition %d: process 0x%08x destroyed", p.id, process.handle)
    return m.NtStatusReturn(NTSTATUS.STATUS_SUCCESS)


def set_process_quota(p: Partition, call: Call, body: m.ProcessQuota) -> m.NtStatusReturn:
    """PYDXG_SETPROCESSQUOTA: the process's account and memory limits (dxg.host.quota), and
    its compute share (dxg.host.scheduler). Only while it holds no memory anywhere, so that
    every byte it commits is counted under them."""
    process = p.process(call)
    if process.memory.usages:
        raise CommandFailed(NTSTATUS.STATUS_INVALID_PARAMETER,
                            "quotas are set before the process uses memory")
    if not 1 <= body.compute_share <= MAX_SHARE:
        raise CommandFailed(NTSTATUS.STATUS_INVALID_PARAMETER,
                            f"compute share {body.compute_share} (1..{MAX_SHARE})")
    process.memory.quota = ProcessQuota.from_wire(body.account, body.per_process,
                                                  body.per_account)
    process.compute_share = body.compute_share
    for account in process.engine_accounts.values():
        account.weight = body.compute_share
    return m.NtStatusReturn(NTSTATUS.STATUS_SUCCESS)


HANDLERS: MappingProxyType[GlobalCommand, Handler] = MappingProxyType({
    GlobalCommand.CREATEPROCESS: create_process,
    GlobalCommand.DESTROYPROCESS: destroy_process,
    GlobalCommand.PYDXG_SETPROCESSQUOTA: set_process_quota,
})

__all__ = ["HANDLERS", "HostProcess", "drop_process"]
