"""A process: one node connection. Owns its handle table, its links to adapters, and one host
process per host it has touched (CREATEPROCESS is sent lazily, per host, once even when several
of its calls need it at the same time). Touched only on the driver's event loop."""

from __future__ import annotations

import asyncio
import errno
import logging
from typing import TYPE_CHECKING

from dxg.guest.allocation import ProcessMemory
from dxg.guest.errors import IoctlError
from dxg.guest.handles import HandleSpace, HandleTable, HandleType
from dxg.guest.policy import ROOT_GRANT, Grant
from dxg.guest.quota import GuestLimits, Quota, charge_object
from dxg.guest.syncobject import ProcessSync
from dxg.uapi.ntstatus import nt_success

if TYPE_CHECKING:
    from dxg.guest.adapter import GuestAdapter
    from dxg.guest.device import GuestDevice
    from dxg.guest.hostlink import HostLink

log = logging.getLogger(__name__)


class ProcessAdapter:
    """The (process, adapter) link; refcount = the adapter handles the process holds."""

    def __init__(self, process: GuestProcess, adapter: GuestAdapter) -> None:
        self.process = process
        self.adapter = adapter
        self.refcount = 0
        self.devices: list[GuestDevice] = []


class UserShare:
    """What one user's processes hold together (handles, host objects), and how many there are."""

    def __init__(self, uid: int, limits: GuestLimits) -> None:
        exempt = uid == 0
        self.handles = Quota(None if exempt else limits.handles_per_uid, f"handles of uid {uid}")
        self.objects = Quota(None if exempt else limits.objects_per_uid,
                             f"host objects of uid {uid}")
        self.processes = 0


class GuestProcess:
    def __init__(self, pid: int, uid: int, name: str, space: HandleSpace,
                 limits: GuestLimits | None = None, share: UserShare | None = None,
                 grant: Grant = ROOT_GRANT, gids: tuple[int, ...] = (),
                 memory_quota: bool = False) -> None:
        limits = limits if limits is not None else GuestLimits()
        self.pid = pid
        self.uid = uid
        self.gids = gids
        self.name = name
        # What the policy lets it do (dxg.guest.policy): the adapters it sees, its quotas and
        # compute share, possibly lowered by the process itself before it used any adapter
        # (GuestDriver.restrict); memory_quota: its hosts are told them (the policy has quotas
        # or shares other than the default for someone, or the process restricted itself).
        self.grant = grant
        self.memory_quota = memory_quota
        self.share = share if share is not None else UserShare(uid, limits)
        self.handles = HandleTable(space, limits.handles_per_process, self.share.handles)
        self.objects = Quota(limits.objects_per_process, f"host objects of pid {pid}")
        self.adapters: dict[int, ProcessAdapter] = {}  # id(adapter) -> link
        # host link -> (link generation, the host process handle, or its CREATEPROCESS)
        self.host_processes: dict[HostLink, tuple[int, asyncio.Future[int]]] = {}
        self.memory = ProcessMemory()  # blocks of shared memory, and unmaps the client is due
        self.sync = ProcessSync()  # sync objects, mirror pages, host events (dxg.guest.syncobject)
        self.closed = False

    def __repr__(self) -> str:
        return f"<GuestProcess pid={self.pid} {self.name!r}>"

    def charge_object(self, n: int = 1) -> None:
        """``n`` more objects on a host for this process (-ENOMEM past its or its user's
        share; then none of them is charged)."""
        for i in range(n):
            try:
                charge_object(self.objects, self.share.objects)
            except BaseException:
                self.release_objects(i)
                raise

    def release_objects(self, n: int = 1) -> None:
        self.objects.release(n)
        self.share.objects.release(n)


# ---- life cycle ---------------------------------------------------------------------------------

async def host_process(proc: GuestProcess, link: HostLink) -> int:
    """The host process handle of `proc` on `link`, creating it (CREATEPROCESS) on first use or
    after the host came back. Concurrent callers share one CREATEPROCESS, which runs as a task
    of the link: a caller that gives up (its call cancelled) fails no one else."""
    from dxg.guest import vmbus

    if proc.closed:
        raise IoctlError(errno.ESRCH, "process is exiting")
    have = proc.host_processes.get(link)
    if have is not None and have[0] == link.generation:
        done = have[1]
        if done.done() and not done.cancelled() and done.exception() is None:
            return done.result()
        return await asyncio.shield(done)
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    proc.host_processes[link] = (link.generation, future)

    def fail(e: Exception) -> None:
        if proc.host_processes.get(link, (0, None))[1] is future:
            del proc.host_processes[link]
        future.set_exception(e)
        future.exception()  # retrieved: waiters, if any, get it through the shield

    async def create() -> None:
        try:
            handle = await vmbus.create_process(link, id(proc) & 0xFFFFFFFFFFFF, proc.pid,
                                                proc.name)
        except Exception as e:
            fail(e)
            return
        except BaseException:
            fail(IoctlError(errno.ENODEV, "the host link closed"))
            raise
        try:
            if proc.memory_quota:
                await _set_quota(proc, link, handle)
        except Exception as e:
            fail(e)
            await _destroy_quietly(link, handle)
            return
        except BaseException:
            fail(IoctlError(errno.ENODEV, "the host link closed"))
            raise
        if not proc.closed:
            future.set_result(handle)
            return
        # The process went while the host was creating it: it is not ours to keep.
        fail(IoctlError(errno.ESRCH, "process is exiting"))
        await _destroy_quietly(link, handle)

    try:
        link.tasks.spawn(create(), f"CREATEPROCESS pid {proc.pid}")
    except RuntimeError:
        fail(IoctlError(errno.ENODEV, "the host link is closing"))
    return await asyncio.shield(future)


async def _set_quota(proc: GuestProcess, link: HostLink, hprocess: int) -> None:
    """Tell the host the process's memory quotas (its account: its uid) and compute share
    before it can use memory or run work there; a host that cannot take them gets no process
    of this guest (-EPROTO)."""
    from dxg.guest import vmbus

    grant = proc.grant
    status = await vmbus.set_process_quota(link, hprocess, proc.uid, grant.memory_per_process,
                                           grant.memory_per_uid, grant.compute_share)
    if not nt_success(status):
        log.error("host %s cannot enforce the memory quotas and compute share of pid %d "
                  "(status 0x%08x)", link.name, proc.pid, status)
        raise IoctlError(errno.EPROTO,
                         "the host cannot enforce this process's quotas and compute share")


async def _destroy_quietly(link: HostLink, hprocess: int) -> None:
    from dxg.guest import vmbus

    try:
        await vmbus.destroy_process(link, hprocess)
    except (IoctlError, vmbus.HostStatus):
        pass


def existing_host_process(proc: GuestProcess, link: HostLink) -> int | None:
    """The host process handle if the host (in its current incarnation) knows the process."""
    have = proc.host_processes.get(link)
    if have is None or have[0] != link.generation:
        return None
    future = have[1]
    if not future.done() or future.cancelled() or future.exception() is not None:
        return None
    return future.result()


def open_adapter(proc: GuestProcess, adapter: GuestAdapter) -> int:
    """A new adapter handle (EnumAdapters and OpenAdapterFromLuid both open)."""
    if proc.closed:
        raise IoctlError(errno.ESRCH, "process is exiting")
    pa = proc.adapters.get(id(adapter))
    created = pa is None
    if pa is None:
        pa = ProcessAdapter(proc, adapter)
    handle = proc.handles.alloc(HandleType.ADAPTER, pa)
    if created:
        proc.adapters[id(adapter)] = pa
        adapter.process_adapters.append(pa)
    pa.refcount += 1
    return handle


async def close_adapter(proc: GuestProcess, handle: int) -> None:
    """Drop one adapter handle; the last one destroys the process's devices on that adapter."""
    pa = proc.handles.free(handle, HandleType.ADAPTER)
    if pa is None:
        raise IoctlError(errno.EBADF, "invalid adapter handle")
    pa.refcount -= 1
    if pa.refcount > 0:
        return
    devices = list(pa.devices)
    proc.adapters.pop(id(pa.adapter), None)
    if pa in pa.adapter.process_adapters:
        pa.adapter.process_adapters.remove(pa)
    for dev in devices:
        await destroy_device_quietly(proc, dev)
    from dxg.guest.syncobject import release_adapter_syncobjects

    proc.release_objects(release_adapter_syncobjects(proc, pa.adapter))
    await _close_on_host(proc, pa.adapter)


async def _close_on_host(proc: GuestProcess, adapter: GuestAdapter) -> None:
    """What the process still holds on the adapter's host without a device (GPU VA
    reservations, video memory reservations, memory blocks) goes with its last handle."""
    from dxg.guest import vmbus
    from dxg.protocol.commands import VgpuCommand

    hprocess = existing_host_process(proc, adapter.link)
    if hprocess is None or not adapter.active or not adapter.link.up:
        return
    try:
        await vmbus.send(adapter, VgpuCommand.PYDXG_CLOSEPROCESSADAPTER, hprocess)
    except (IoctlError, vmbus.HostStatus) as e:
        log.warning("pid %d: releasing adapter memory on the host failed: %s", proc.pid, e)


async def destroy_device_quietly(proc: GuestProcess, dev: GuestDevice) -> None:
    """Teardown must go on past one failed host call: log it and carry on."""
    from dxg.guest import vmbus
    from dxg.guest.device import destroy_device

    try:
        await destroy_device(proc, dev, flush=True)
    except (IoctlError, vmbus.HostStatus) as e:
        log.warning("pid %d: destroying device 0x%08x failed: %s", proc.pid, dev.handle, e)


async def process_exit(proc: GuestProcess) -> None:
    """Everything the process created goes: devices (FLUSHDEVICE(4) then DESTROYDEVICE), adapter
    handles, then its host processes (DESTROYPROCESS drops whatever the host still holds)."""
    from dxg.guest import vmbus

    proc.closed = True
    links = list(proc.adapters.values())
    proc.adapters.clear()
    proc.handles.clear()
    proc.release_objects(proc.objects.used)
    try:
        for pa in links:
            if pa in pa.adapter.process_adapters:
                pa.adapter.process_adapters.remove(pa)
            for dev in list(pa.devices):
                await destroy_device_quietly(proc, dev)
    finally:
        proc.sync.close(proc)
        proc.memory.close()
        # DESTROYPROCESS drops whatever the host still holds for the process, whatever failed.
        hosts = list(proc.host_processes.items())
        proc.host_processes.clear()
        for link, (generation, future) in hosts:
            if generation != link.generation or not link.up:
                continue  # that host is gone, and took the process with it
            if not future.done() or future.cancelled() or future.exception() is not None:
                continue  # still being created: host_process sees `closed` and undoes it
            try:
                await vmbus.destroy_process(link, future.result())
            except (IoctlError, vmbus.HostStatus) as e:
                log.warning("DESTROYPROCESS on %s failed: %s", link.name, e)
