"""The guest driver: binds host connections (one HostLink per bus device set), brings adapters
up as their channels arrive in any order, and serves processes for the node front ends.

State lives on this instance only: two GuestDrivers in one Python process are independent.
"""

import logging
import os
import threading
import time
from typing import Any

from dxg.guest import vmbus
from dxg.guest.adapter import AdapterState, GuestAdapter
from dxg.guest.errors import IoctlError
from dxg.guest.handles import HandleSpace
from dxg.guest.hostlink import HostLink
from dxg.guest.ioctl import dispatch
from dxg.guest.process import GuestProcess, process_exit
from dxg.guest.usermem import UserMemory
from dxg.protocol.bus import (
    DXGK_VMBUS_INTERFACE_VERSION,
    GUEST_CAPS_WSL2,
    PCI_DEVICE_ID_COMPUTE_ACCELERATOR,
)
from dxg.protocol.guids import DXGK_GLOBAL_GUID, DXGK_VGPU_GUID, guid_to_luid
from dxg.uapi.ntstatus import nt_success
from dxg.vmbus.bus import BusDevice, BusError, GuestBus
from dxg.vmbus.channel import ChannelClosed

log = logging.getLogger(__name__)

# Where each host's IO space is placed in the (emulated) guest physical address space.
IOSPACE_BASE = 0x10_0000_0000
IOSPACE_STRIDE = 0x10_0000_0000


class GuestDriver:
    id_table = (DXGK_GLOBAL_GUID, DXGK_VGPU_GUID)

    def __init__(self, name: str = "pydxg-guest") -> None:
        self.name = name
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._links: dict[GuestBus, HostLink] = {}
        self._next_link = 0
        self._processes: dict[int, GuestProcess] = {}
        self.handle_space = HandleSpace()
        self.started = time.time()

    # ---- binding hosts -------------------------------------------------------------------------

    def bind(self, address: str, reconnect: bool = True, wait: bool = False) -> GuestBus:
        """Attach one host. Raises TransportError/BusError if it is unreachable and not `wait`."""
        bus = GuestBus(address, reconnect=reconnect)
        with self._lock:
            link = HostLink(bus, self._next_link)
            self._next_link += 1
            self._links[bus] = link
        bus.register_driver(self)
        try:
            bus.start(wait=wait)
        except BaseException:
            with self._lock:
                self._links.pop(bus, None)
            raise
        return bus

    def unbind(self, bus: GuestBus) -> None:
        bus.close()
        with self._lock:
            self._links.pop(bus, None)
            self._changed.notify_all()

    def links(self) -> list[HostLink]:
        with self._lock:
            return list(self._links.values())

    def close(self) -> None:
        for bus in list(self._links):
            self.unbind(bus)
        with self._lock:
            procs = list(self._processes.values())
        for p in procs:
            self.close_process(p)

    # ---- bus driver callbacks (run on the bus's probe/remove thread) ---------------------------

    def probe(self, dev: BusDevice) -> None:
        with self._lock:
            link = self._links.get(dev.bus)
        if link is None:
            return
        if dev.type_guid == DXGK_GLOBAL_GUID:
            self._probe_global(link, dev)
        else:
            self._probe_vgpu(link, dev)
        self._start_adapters(link)

    def _probe_global(self, link: HostLink, dev: BusDevice) -> None:
        with link.lock:
            if link.global_dev is not None:
                log.error("host %s offered a second global channel; refused", link.name)
                return
            link.global_dev = dev
        try:
            channel = dev.open()
        except (BusError, ChannelClosed) as e:
            log.error("host %s: cannot open the global channel: %s", link.name, e)
            with link.lock:
                link.global_dev = None
            return
        channel.on_inband = link.on_host_message
        with link.lock:
            link.global_channel = channel
            link.generation += 1
            link.async_msg_enabled = False
            # Each host's window has its own slot; a host cannot make it overlap the next one.
            size = min(dev.offer.mmio_megabytes << 20, IOSPACE_STRIDE)
            link.iospace = (IOSPACE_BASE + link.index * IOSPACE_STRIDE, size)
        try:
            vmbus.set_iospace_region(link, *link.iospace)
        except IoctlError as e:
            log.warning("host %s: SETIOSPACEREGION failed: %s", link.name, e)

    def _probe_vgpu(self, link: HostLink, dev: BusDevice) -> None:
        luid = guid_to_luid(dev.instance_guid)
        version = dev.offer.interface_version
        if version < DXGK_VMBUS_INTERFACE_VERSION:
            log.error("host %s: vGPU %016x speaks DXGK interface %d; pydxg needs %d",
                      link.name, luid, version, DXGK_VMBUS_INTERFACE_VERSION)
            return
        clash = next((a for a in self.all_adapters()
                      if a.luid == luid and a.state != AdapterState.STOPPED), None)
        if clash is not None:
            log.error("host %s: vGPU LUID %016x is already used by host %s; refused (is the "
                      "same host, or the same --host-id, bound twice?)", link.name, luid,
                      clash.link.name)
            return
        self._add_waiting_adapter(link, dev, luid, version)

    def _add_waiting_adapter(self, link: HostLink, dev: BusDevice, luid: int,
                             version: int) -> GuestAdapter:
        adapter = GuestAdapter(link, dev, luid,
                               dev.offer.pci_device_id == PCI_DEVICE_ID_COMPUTE_ACCELERATOR)
        adapter.interface_version = min(version, DXGK_VMBUS_INTERFACE_VERSION)
        dev.drvdata = adapter
        with link.lock:
            link.adapters[luid] = adapter
        return adapter

    def _start_adapters(self, link: HostLink) -> None:
        """An adapter starts once both its vGPU channel and the global channel exist."""
        if not link.up:
            return
        with link.lock:
            waiting = [a for a in link.adapters.values() if a.state == AdapterState.WAITING_VMBUS]
        for ad in waiting:
            try:
                ad.channel = ad.dev.open(GUEST_CAPS_WSL2, ad.interface_version)
                opened = vmbus.open_adapter(ad)
                if not nt_success(opened.status) or opened.host_adapter_handle == 0:
                    raise IoctlError(0, f"OPENADAPTER status 0x{opened.status:08x}")
                ad.host_handle = opened.host_adapter_handle
                info = vmbus.get_internal_adapter_info(ad)
            except (IoctlError, BusError, ChannelClosed, vmbus.HostStatus) as e:
                log.error("host %s: adapter %016x failed to start: %s", link.name, ad.luid, e)
                ad.state = AdapterState.STOPPED
                self._release_adapter(ad)
                continue
            ad.description = info.device_description
            ad.instance_id = info.device_instance_id
            ad.host_adapter_luid = info.host_adapter_luid
            ad.host_vgpu_luid = info.host_vgpu_luid or ad.host_vgpu_luid
            with self._lock:
                link.async_msg_enabled = info.async_msg_enabled
                ad.state = AdapterState.ACTIVE
                self._changed.notify_all()
            log.info("adapter %016x up: %s (host %s)", ad.luid, ad.description, link.name)

    def remove(self, dev: BusDevice) -> None:
        with self._lock:
            link = self._links.get(dev.bus)
        if link is None:
            return
        if dev.type_guid == DXGK_GLOBAL_GUID:
            with link.lock:
                if link.global_dev is not dev:
                    return
                link.global_dev = None
                link.global_channel = None
                adapters = list(link.adapters.values())
            for ad in adapters:
                # Without the global channel the adapter is gone for its users (its objects
                # fail -ENODEV); release it on the host and wait, as a fresh adapter, for the
                # global channel to come back.
                if ad.state == AdapterState.STOPPED:
                    continue
                ad.state = AdapterState.STOPPED
                self._release_adapter(ad)
                log.info("adapter %016x stopped (global channel gone)", ad.luid)
                if not ad.dev.conn.closed:
                    self._add_waiting_adapter(link, ad.dev, ad.luid, ad.interface_version)
        else:
            ad = dev.drvdata
            if isinstance(ad, GuestAdapter):
                self._stop_adapter(ad)
                with link.lock:
                    if link.adapters.get(ad.luid) is ad:
                        del link.adapters[ad.luid]
        with self._lock:
            self._changed.notify_all()

    def _release_adapter(self, ad: GuestAdapter) -> None:
        """Give the host back what a (partly) started adapter holds: its adapter handle and
        its vGPU channel. Best effort: the host may be gone already."""
        if ad.host_handle and ad.channel is not None and not ad.channel.closed:
            try:
                vmbus.close_adapter(ad)
            except (IoctlError, vmbus.HostStatus) as e:
                log.info("adapter %016x: CLOSEADAPTER failed: %s", ad.luid, e)
        ad.dev.close()
        ad.channel = None

    def _stop_adapter(self, ad: GuestAdapter) -> None:
        """Objects and handles stay until their processes close them; calls fail -ENODEV."""
        if ad.state == AdapterState.STOPPED:
            return
        ad.state = AdapterState.STOPPED
        if ad.channel is not None:
            ad.channel.close("adapter stopped")
        log.info("adapter %016x stopped", ad.luid)

    # ---- adapters ----------------------------------------------------------------------------

    def all_adapters(self) -> list[GuestAdapter]:
        out: list[GuestAdapter] = []
        for link in sorted(self.links(), key=lambda x: x.index):
            with link.lock:
                out.extend(sorted(link.adapters.values(), key=lambda a: a.dev.offer.relid))
        return out

    def active_adapters(self) -> list[GuestAdapter]:
        return [a for a in self.all_adapters() if a.active]

    def wait_for_adapters(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.active_adapters()) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    # ---- processes -----------------------------------------------------------------------------

    def open_process(self, pid: int, uid: int, name: str) -> GuestProcess:
        proc = GuestProcess(pid, uid, name, self.handle_space)
        with self._lock:
            self._processes[id(proc)] = proc
        return proc

    def close_process(self, proc: GuestProcess) -> None:
        with self._lock:
            if self._processes.pop(id(proc), None) is None:
                return
        try:
            process_exit(proc)
        except Exception:
            log.exception("teardown of process %d failed", proc.pid)

    def processes(self) -> list[GuestProcess]:
        with self._lock:
            return list(self._processes.values())

    def ioctl(self, proc: GuestProcess, code: int, arg: bytes, mem: UserMemory,
              caller_tgid: int | None = None) -> tuple[int, bytes]:
        """One ioctl from `proc`. A caller from another thread group than the opener (a forked
        child using its parent's file) gets -ENOTTY, as from the real driver."""
        if caller_tgid is not None and caller_tgid != proc.pid:
            return -25, arg  # ENOTTY
        if proc.closed:
            return -9, arg  # EBADF
        return dispatch(self, proc, code, arg, mem)

    # ---- introspection -------------------------------------------------------------------------

    def admin(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "snapshot":
            return self.snapshot()
        if op == "census":
            return {"hosts": self.host_census()}
        return {"error": f"unknown admin op {op!r}"}

    def snapshot(self) -> dict[str, Any]:
        adapters = self.all_adapters()
        index = {id(a): i for i, a in enumerate(adapters)}
        procs = []
        for p in sorted(self.processes(), key=lambda x: x.pid):
            with p.lock:
                links = []
                for pa in p.adapters.values():
                    devices = [d for d in pa.devices]
                    links.append({
                        "adapter": index.get(id(pa.adapter)),
                        "luid": f"0x{pa.adapter.luid:016x}",
                        "handles": pa.refcount,
                        "devices": len(devices),
                        "contexts": sum(len(d.contexts) for d in devices),
                    })
            procs.append({"pid": p.pid, "uid": p.uid, "name": p.name, "adapters": links,
                          "handles": len(p.handles)})
        return {
            "driver": self.name,
            "pid": os.getpid(),
            "hosts": [
                {"index": link.index, "address": link.bus.address, "host": link.bus.host_name,
                 "connected": link.up, "async_msg_enabled": link.async_msg_enabled,
                 "last_error": link.bus.last_error}
                for link in sorted(self.links(), key=lambda x: x.index)
            ],
            "adapters": [
                {"index": i, "luid": f"0x{a.luid:016x}", "state": a.state.name,
                 "description": a.description, "compute_only": a.compute_only,
                 "host": a.link.index, "pci_vendor_id": a.pci_vendor_id,
                 "pci_device_id": a.pci_device_id}
                for i, a in enumerate(adapters)
            ],
            "processes": procs,
        }

    def host_census(self) -> list[dict[str, Any]]:
        out = []
        for link in sorted(self.links(), key=lambda x: x.index):
            entry: dict[str, Any] = {"index": link.index, "address": link.bus.address}
            if link.up:
                try:
                    entry["census"] = vmbus.query_partition(link)
                except IoctlError as e:
                    entry["error"] = str(e)
            else:
                entry["error"] = "not connected"
            out.append(entry)
        return out
