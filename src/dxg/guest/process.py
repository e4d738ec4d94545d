"""A process: one node connection. Owns its handle table, its links to adapters, and one host
process per host it has touched (CREATEPROCESS is sent lazily, per host)."""

import errno
import logging
import threading
from typing import TYPE_CHECKING

from dxg.guest.errors import IoctlError
from dxg.guest.handles import HandleSpace, HandleTable, HandleType

if TYPE_CHECKING:
    from dxg.guest.adapter import GuestAdapter
    from dxg.guest.device import GuestDevice
    from dxg.guest.hostlink import HostLink

log = logging.getLogger(__name__)


class ProcessAdapter:
    """The (process, adapter) link; refcount = the adapter handles the process holds."""

    def __init__(self, process: "GuestProcess", adapter: "GuestAdapter") -> None:
        self.process = process
        self.adapter = adapter
        self.refcount = 0
        self.devices: list[GuestDevice] = []


class GuestProcess:
    def __init__(self, pid: int, uid: int, name: str, space: HandleSpace) -> None:
        self.pid = pid
        self.uid = uid
        self.name = name
        self.handles = HandleTable(space)
        self.lock = threading.RLock()
        self.adapters: dict[int, ProcessAdapter] = {}  # id(adapter) -> link
        # host link -> (link generation, host process handle)
        self.host_processes: dict[HostLink, tuple[int, int]] = {}
        self.host_process_lock = threading.Lock()
        self.closed = False

    def __repr__(self) -> str:
        return f"<GuestProcess pid={self.pid} {self.name!r}>"


# ---- life cycle ---------------------------------------------------------------------------------

def host_process(proc: GuestProcess, link: "HostLink") -> int:
    """The host process handle of `proc` on `link`, creating it (CREATEPROCESS) on first use or
    after the host came back."""
    from dxg.guest import vmbus

    with proc.host_process_lock:
        if proc.closed:
            raise IoctlError(errno.ESRCH, "process is exiting")
        have = proc.host_processes.get(link)
        if have is not None and have[0] == link.generation:
            return have[1]
        handle = vmbus.create_process(link, id(proc) & 0xFFFFFFFFFFFF, proc.pid, proc.name)
        proc.host_processes[link] = (link.generation, handle)
        return handle


def existing_host_process(proc: GuestProcess, link: "HostLink") -> int | None:
    """The host process handle if the host (in its current incarnation) knows the process."""
    with proc.host_process_lock:
        have = proc.host_processes.get(link)
    if have is None or have[0] != link.generation:
        return None
    return have[1]


def open_adapter(proc: GuestProcess, adapter: "GuestAdapter") -> int:
    """A new adapter handle (EnumAdapters and OpenAdapterFromLuid both open)."""
    with proc.lock:
        if proc.closed:
            raise IoctlError(errno.ESRCH, "process is exiting")
        pa = proc.adapters.get(id(adapter))
        if pa is None:
            pa = ProcessAdapter(proc, adapter)
            proc.adapters[id(adapter)] = pa
            with adapter.lock:
                adapter.process_adapters.append(pa)
        pa.refcount += 1
        return proc.handles.alloc(HandleType.ADAPTER, pa)


def close_adapter(proc: GuestProcess, handle: int) -> None:
    """Drop one adapter handle; the last one destroys the process's devices on that adapter."""
    with proc.lock:
        pa = proc.handles.free(handle, HandleType.ADAPTER)
        if pa is None:
            raise IoctlError(errno.EBADF, "invalid adapter handle")
        pa.refcount -= 1
        if pa.refcount > 0:
            return
        devices = list(pa.devices)
        del proc.adapters[id(pa.adapter)]
    with pa.adapter.lock:
        if pa in pa.adapter.process_adapters:
            pa.adapter.process_adapters.remove(pa)
    for dev in devices:
        destroy_device_quietly(proc, dev)


def destroy_device_quietly(proc: GuestProcess, dev: "GuestDevice") -> None:
    """Teardown must go on past one failed host call: log it and carry on."""
    from dxg.guest import vmbus
    from dxg.guest.device import destroy_device

    try:
        destroy_device(proc, dev, flush=True)
    except (IoctlError, vmbus.HostStatus) as e:
        log.warning("pid %d: destroying device 0x%08x failed: %s", proc.pid, dev.handle, e)


def process_exit(proc: GuestProcess) -> None:
    """Everything the process created goes: devices (FLUSHDEVICE(4) then DESTROYDEVICE), adapter
    handles, then its host processes (DESTROYPROCESS drops whatever the host still holds)."""
    from dxg.guest import vmbus

    with proc.lock:
        proc.closed = True
        links = list(proc.adapters.values())
        proc.adapters.clear()
        for h, _t, _o in proc.handles.items():
            proc.handles.free(h)
    try:
        for pa in links:
            with pa.adapter.lock:
                if pa in pa.adapter.process_adapters:
                    pa.adapter.process_adapters.remove(pa)
            for dev in list(pa.devices):
                destroy_device_quietly(proc, dev)
    finally:
        # DESTROYPROCESS drops whatever the host still holds for the process, whatever failed.
        with proc.host_process_lock:
            hosts = list(proc.host_processes.items())
            proc.host_processes.clear()
        for link, (generation, hprocess) in hosts:
            if generation != link.generation or not link.up:
                continue  # that host is gone, and took the process with it
            try:
                vmbus.destroy_process(link, hprocess)
            except (IoctlError, vmbus.HostStatus) as e:
                log.warning("DESTROYPROCESS on %s failed: %s", link.name, e)
