"""The guest driver: binds host connections (one HostLink per bus device set), brings adapters
up as their channels arrive in any order, and serves processes for the node front ends.

State lives on this instance only: two GuestDrivers in one Python process are independent. All of
it is touched on the driver's event loop (a `LoopThread` its owner passes in, or one of its
own), so none of it needs a lock; the node front ends run on the same loop. The methods marked
as such may be called from any thread.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from dxg.guest import vmbus
from dxg.guest.adapter import AdapterState, GuestAdapter
from dxg.guest.errors import IoctlError
from dxg.guest.handles import HandleSpace
from dxg.guest.hostlink import HostLink
from dxg.guest.ioctl import dispatch
from dxg.guest.policy import Policy, RestrictError, restrict_grant
from dxg.guest.process import GuestProcess, UserShare, process_exit
from dxg.guest.quota import GuestLimits
from dxg.guest.share import Shares
from dxg.guest.syncobject import adapter_stopped
from dxg.guest.usermem import UserMemory
from dxg.protocol.bus import (
    DXGK_VMBUS_INTERFACE_VERSION,
    GUEST_CAPS_WSL2,
    PCI_DEVICE_ID_COMPUTE_ACCELERATOR,
)
from dxg.protocol.guids import DXGK_GLOBAL_GUID, DXGK_VGPU_GUID, guid_to_luid
from dxg.runtime.latency import LatencyHistograms
from dxg.runtime.loop import Changes, LoopThread, on_loop, owned_loop
from dxg.uapi.ntstatus import nt_success
from dxg.uapi.wddm import D3DKMT_ADAPTERADDRESS, KMTQUERYADAPTERINFOTYPE
from dxg.vmbus.bus import BusDevice, BusError, GuestBus
from dxg.vmbus.channel import ChannelClosed
from dxg.vmbus.transport import Transport, connect

if TYPE_CHECKING:
    from dxg.host.host import Host

log = logging.getLogger(__name__)

# Where each host's IO space is placed in the (emulated) guest physical address space.
IOSPACE_BASE = 0x10_0000_0000
IOSPACE_STRIDE = 0x10_0000_0000


class GuestDriver:
    id_table = (DXGK_GLOBAL_GUID, DXGK_VGPU_GUID)

    def __init__(self, name: str = "pydxg-guest", loop: LoopThread | None = None, *,
                 heartbeat_interval: float = 1.0, heartbeat_timeout: float = 5.0,
                 max_adapters_per_host: int = 64, max_adapters: int = 256,
                 limits: GuestLimits | None = None, policy: Policy | None = None) -> None:
        if not 1 <= max_adapters_per_host <= max_adapters:
            raise ValueError("need 1 <= max_adapters_per_host <= max_adapters")
        self.name = name
        self.rt, self._owns_loop = owned_loop(loop, f"dxg-guest {name}")
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        # A host cannot make the guest hold (or enumerate) more adapters than this.
        self.max_adapters_per_host = max_adapters_per_host
        self.max_adapters = max_adapters
        self._links: dict[GuestBus, HostLink] = {}
        self._by_luid: dict[int, GuestAdapter] = {}  # adapters not stopped, by guest LUID
        self._order: list[GuestAdapter] | None = None  # enumeration order, rebuilt on change
        self._next_link = 0
        self._processes: dict[int, GuestProcess] = {}
        self.limits = limits if limits is not None else GuestLimits()
        # Who sees which adapters, and the processes' memory quotas (dxg.guest.policy).
        self.policy = policy if policy is not None else Policy()
        self._shares: dict[int, UserShare] = {}  # uid -> what that user's processes hold
        self.handle_space = HandleSpace()
        # Share descriptors and sync files handed out (dxg.guest.share): they outlive processes.
        self.shares = Shares(self.rt.loop)
        self.started = time.time()
        # How long each ioctl takes, by ioctl number (dxg.runtime.latency), once something
        # reads it (observe_ioctls: the metrics endpoint); None: not measured.
        self.ioctl_latency: LatencyHistograms | None = None
        self._changes = Changes(self.rt)
        self._closed = False

    def __repr__(self) -> str:
        return f"<GuestDriver {self.name!r} hosts={len(self._links)}>"

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.rt.loop

    # ---- binding hosts (any thread) ------------------------------------------------------------

    def bind(self, address: str, reconnect: bool = True, wait: bool = False) -> GuestBus:
        """Attach the host at ``address``. Raises TransportError/BusError if it is unreachable
        and not ``wait``."""
        loop = self.loop

        async def dial() -> Transport:
            return await connect(loop, address)

        return self.rt.run(self._bind(address, dial, reconnect, wait))

    def bind_host(self, host: Host, reconnect: bool = True) -> GuestBus:
        """Attach a host of this process over an in-process link (no socket)."""
        loop = self.loop

        async def dial() -> Transport:
            return await host.connect_local(loop, self.name)

        return self.rt.run(self._bind(f"local:{host.config.name}", dial, reconnect, False))

    async def _bind(self, address: str, dial: Any, reconnect: bool, wait: bool) -> GuestBus:
        bus = GuestBus(self.loop, dial, address, reconnect=reconnect,
                       heartbeat_interval=self.heartbeat_interval,
                       heartbeat_timeout=self.heartbeat_timeout)
        link = HostLink(bus, self._next_link, address)
        self._next_link += 1
        self._links[bus] = link
        bus.register_driver(self)
        try:
            await bus.start(wait=wait)
        except BaseException:
            self._links.pop(bus, None)
            await bus.close()
            raise
        return bus

    def unbind(self, bus: GuestBus) -> None:
        self.rt.run(self._unbind(bus))

    async def _unbind(self, bus: GuestBus) -> None:
        await bus.close()
        link = self._links.pop(bus, None)
        if link is not None:
            for ad in list(link.adapters.values()):
                if self._by_luid.get(ad.luid) is ad:
                    del self._by_luid[ad.luid]
            await link.tasks.cancel_and_wait(timeout=5)
            link.events.close()
        self._changed_adapters()

    @on_loop
    def links(self) -> list[HostLink]:
        return list(self._links.values())

    def close(self) -> None:
        """Unbind every host and close every process; stops the loop if the driver made it."""
        if self._closed or self.rt.closed:
            self._closed = True
            return
        self._closed = True
        try:
            self.rt.run(self._close(), timeout=60)
        finally:
            if self._owns_loop:
                self.rt.close()

    async def _close(self) -> None:
        for bus in list(self._links):
            await self._unbind(bus)
        for proc in list(self._processes.values()):
            await self.close_process(proc)
        self.shares.close_all()

    # ---- bus driver callbacks (the bus's probe/remove task) ------------------------------------

    async def probe(self, dev: BusDevice) -> bool:
        link = self._links.get(dev.bus)
        if link is None:
            return False
        if dev.type_guid == DXGK_GLOBAL_GUID:
            taken = await self._probe_global(link, dev)
        else:
            taken = self._probe_vgpu(link, dev)
        await self._start_adapters(link)
        return taken

    async def _probe_global(self, link: HostLink, dev: BusDevice) -> bool:
        if link.global_dev is not None:
            log.error("host %s offered a second global channel; refused", link.name)
            return False
        link.global_dev = dev
        try:
            channel = await dev.open()
        except (BusError, ChannelClosed) as e:
            log.error("host %s: cannot open the global channel: %s", link.name, e)
            link.global_dev = None
            return False
        channel.on_inband = link.on_host_message
        link.global_channel = channel
        link.generation += 1
        link.async_msg_enabled = False
        # Each host's window has its own slot; a host cannot make it overlap the next one.
        size = min(dev.offer.mmio_megabytes << 20, IOSPACE_STRIDE)
        link.iospace = (IOSPACE_BASE + link.index * IOSPACE_STRIDE, size)
        try:
            await vmbus.set_iospace_region(link, *link.iospace)
        except (IoctlError, vmbus.HostStatus) as e:
            log.warning("host %s: SETIOSPACEREGION failed: %s", link.name, e)
        return True

    def _probe_vgpu(self, link: HostLink, dev: BusDevice) -> bool:
        luid = guid_to_luid(dev.instance_guid)
        version = dev.offer.interface_version
        if version < DXGK_VMBUS_INTERFACE_VERSION:
            log.error("host %s: vGPU %016x speaks DXGK interface %d; pydxg needs %d",
                      link.name, luid, version, DXGK_VMBUS_INTERFACE_VERSION)
            return False
        clash = self._by_luid.get(luid)
        if clash is not None and clash.state != AdapterState.STOPPED:
            log.error("host %s: vGPU LUID %016x is already used by host %s; refused (is the "
                      "same host, or the same --host-id, bound twice?)", link.name, luid,
                      clash.link.name)
            return False
        live = sum(1 for a in link.adapters.values() if a.state != AdapterState.STOPPED)
        if live >= self.max_adapters_per_host or len(self._by_luid) >= self.max_adapters:
            link.refused_adapters += 1
            if link.refused_adapters == 1:
                log.error("host %s offers more adapters than this guest takes (%d per host, "
                          "%d in all); further offers are ignored", link.name,
                          self.max_adapters_per_host, self.max_adapters)
            return False
        self._add_waiting_adapter(link, dev, luid, version)
        return True

    def _add_waiting_adapter(self, link: HostLink, dev: BusDevice, luid: int,
                             version: int) -> GuestAdapter:
        adapter = GuestAdapter(link, dev, luid,
                               dev.offer.pci_device_id == PCI_DEVICE_ID_COMPUTE_ACCELERATOR)
        adapter.interface_version = min(version, DXGK_VMBUS_INTERFACE_VERSION)
        dev.drvdata = adapter
        link.adapters[luid] = adapter
        link.waiting.add(adapter)
        self._by_luid[luid] = adapter
        self._changed_adapters()
        return adapter

    async def _start_adapters(self, link: HostLink) -> None:
        """An adapter starts once both its vGPU channel and the global channel exist."""
        if not link.up:
            return
        waiting = sorted(link.waiting, key=lambda a: a.dev.offer.relid)
        link.waiting.clear()
        for ad in waiting:
            if ad.state != AdapterState.WAITING_VMBUS:
                continue
            try:
                ad.channel = await ad.dev.open(GUEST_CAPS_WSL2, ad.interface_version)
                opened = await vmbus.open_adapter(ad)
                if not nt_success(opened.status) or opened.host_adapter_handle == 0:
                    raise IoctlError(0, f"OPENADAPTER status 0x{opened.status:08x}")
                ad.host_handle = opened.host_adapter_handle
                info = await vmbus.get_internal_adapter_info(ad)
                if self.policy.needs_host_index:
                    ad.host_index = await _host_index(ad)
            except (IoctlError, BusError, ChannelClosed, vmbus.HostStatus) as e:
                log.error("host %s: adapter %016x failed to start: %s", link.name, ad.luid, e)
                self._set_stopped(ad)
                await self._release_adapter(ad)
                continue
            ad.description = info.device_description
            ad.instance_id = info.device_instance_id
            ad.host_adapter_luid = info.host_adapter_luid
            ad.host_vgpu_luid = info.host_vgpu_luid or ad.host_vgpu_luid
            link.async_msg_enabled = info.async_msg_enabled
            ad.state = AdapterState.ACTIVE
            self._changed_adapters()
            log.info("adapter %016x up: %s (host %s)", ad.luid, ad.description, link.name)

    async def remove(self, dev: BusDevice) -> None:
        link = self._links.get(dev.bus)
        if link is None:
            return
        if dev.type_guid == DXGK_GLOBAL_GUID:
            if link.global_dev is not dev:
                return
            link.global_dev = None
            link.global_channel = None
            for ad in list(link.adapters.values()):
                # Without the global channel the adapter is gone for its users (its objects
                # fail -ENODEV); release it on the host and wait, as a fresh adapter, for the
                # global channel to come back.
                if ad.state == AdapterState.STOPPED:
                    continue
                self._set_stopped(ad)
                await self._release_adapter(ad)
                log.info("adapter %016x stopped (global channel gone)", ad.luid)
                if not ad.dev.conn.closed:
                    self._add_waiting_adapter(link, ad.dev, ad.luid, ad.interface_version)
        else:
            ad = dev.drvdata
            if isinstance(ad, GuestAdapter):
                self._stop_adapter(ad)
                if link.adapters.get(ad.luid) is ad:
                    del link.adapters[ad.luid]
                link.waiting.discard(ad)
        self._changed_adapters()

    async def _release_adapter(self, ad: GuestAdapter) -> None:
        """Give the host back what a (partly) started adapter holds: its adapter handle and
        its vGPU channel. Best effort: the host may be gone already."""
        if ad.host_handle and ad.channel is not None and not ad.channel.closed:
            try:
                await vmbus.close_adapter(ad)
            except (IoctlError, vmbus.HostStatus) as e:
                log.info("adapter %016x: CLOSEADAPTER failed: %s", ad.luid, e)
        ad.dev.close()
        ad.channel = None

    def _set_stopped(self, ad: GuestAdapter) -> None:
        ad.state = AdapterState.STOPPED
        ad.link.waiting.discard(ad)
        adapter_stopped(ad)  # its waiters wake with STATUS_DEVICE_REMOVED
        if self._by_luid.get(ad.luid) is ad:
            del self._by_luid[ad.luid]
        self._changed_adapters()

    def _changed_adapters(self) -> None:
        self._order = None
        self._notify()

    def _stop_adapter(self, ad: GuestAdapter) -> None:
        """Objects and handles stay until their processes close them; calls fail -ENODEV."""
        if ad.state == AdapterState.STOPPED:
            return
        self._set_stopped(ad)
        if ad.channel is not None:
            ad.channel.close("adapter stopped")
        log.info("adapter %016x stopped", ad.luid)

    def _notify(self) -> None:
        self._changes.notify()

    # ---- adapters ----------------------------------------------------------------------------

    @on_loop
    def all_adapters(self) -> list[GuestAdapter]:
        return list(self._adapter_order())

    @on_loop
    def active_adapters(self) -> list[GuestAdapter]:
        return [a for a in self._adapter_order() if a.state == AdapterState.ACTIVE]

    def _adapter_order(self) -> list[GuestAdapter]:
        """Adapters in enumeration order (host bound first, then offer order), on the loop;
        kept until adapters come, go or change state."""
        if self._order is None:
            out: list[GuestAdapter] = []
            for link in sorted(self._links.values(), key=lambda x: x.index):
                out.extend(sorted(link.adapters.values(), key=lambda a: a.dev.offer.relid))
            self._order = out
        return self._order

    def adapter_by_luid(self, luid: int) -> GuestAdapter | None:
        """The active adapter with this guest LUID (on the loop)."""
        ad = self._by_luid.get(luid)
        return ad if ad is not None and ad.state == AdapterState.ACTIVE else None

    def adapters_for(self, proc: GuestProcess) -> list[GuestAdapter]:
        """The active adapters ``proc`` may see, in enumeration order (its policy grant)."""
        grant = proc.grant
        return [a for a in self.active_adapters() if grant.sees(a)]

    def adapter_for(self, proc: GuestProcess, luid: int) -> GuestAdapter | None:
        """The active adapter with this LUID if ``proc`` may see it: one it may not is
        answered exactly as a LUID that names nothing."""
        ad = self.adapter_by_luid(luid)
        return ad if ad is not None and proc.grant.sees(ad) else None

    def wait_for_adapters(self, count: int, timeout: float) -> bool:
        """Wait (off the loop) until at least ``count`` adapters are active."""
        return self.wait_for(lambda: len(self.active_adapters()) >= count, timeout)

    def wait_for(self, predicate: Any, timeout: float) -> bool:
        """Wait (off the loop) until ``predicate()``, evaluated on the loop, holds."""
        return self._changes.wait_for(predicate, timeout)

    # ---- processes (the node front ends, on the loop) ------------------------------------------

    def open_process(self, pid: int, uid: int, name: str,
                     gids: tuple[int, ...] = ()) -> GuestProcess:
        """A process for a node connection or FUSE open by ``uid`` with groups ``gids`` (its
        primary group and the supplementary ones): what it may do comes from the policy."""
        share = self._shares.get(uid)
        if share is None:
            share = self._shares[uid] = UserShare(uid, self.limits)
        share.processes += 1
        grant = self.policy.grant_for(uid, gids)
        proc = GuestProcess(pid, uid, name, self.handle_space, self.limits, share, grant,
                            tuple(gids),
                            self.policy.has_memory_quotas or self.policy.has_compute_shares)
        self._processes[id(proc)] = proc
        return proc

    def restrict(self, proc: GuestProcess, request: dict[str, Any]) -> dict[str, Any]:
        """Lower ``proc``'s own grant as it asks (dxg.guest.policy.restrict_grant): before it
        holds an adapter handle or a host knows it, so that every host is told the lowered
        quotas and share before the process can use memory or run work there (on the loop).
        Returns the new grant's census; IoctlError EINVAL (malformed), EBUSY (too late),
        ESRCH (closing)."""
        try:
            grant = restrict_grant(proc.grant, request)
        except RestrictError as e:
            raise IoctlError(errno.EINVAL, f"restrict: {e}") from None
        if proc.closed:
            raise IoctlError(errno.ESRCH, "process is exiting")
        if proc.adapters or proc.host_processes:
            raise IoctlError(errno.EBUSY,
                             "restrict: limits can only be set before the process opens an "
                             "adapter (this connection has used one): restrict right after "
                             "connecting")
        proc.grant = grant
        proc.memory_quota = True  # its hosts are told the lowered quotas and share
        log.debug("pid %d (%s) restricted itself: %s", proc.pid, proc.name, grant.census())
        return grant.census()

    async def close_process(self, proc: GuestProcess) -> None:
        if self._processes.pop(id(proc), None) is None:
            return
        try:
            await process_exit(proc)
        except Exception:
            log.exception("teardown of process %d failed", proc.pid)
        finally:
            proc.share.processes -= 1
            if proc.share.processes <= 0 and self._shares.get(proc.uid) is proc.share:
                del self._shares[proc.uid]

    @on_loop
    def processes(self) -> list[GuestProcess]:
        return list(self._processes.values())

    async def ioctl(self, proc: GuestProcess, code: int, arg: bytes, mem: UserMemory,
                    caller_tgid: int | None = None) -> tuple[int, bytes]:
        """One ioctl from `proc`. A caller from another thread group than the opener (a forked
        child using its parent's file) gets -ENOTTY, as from the real driver."""
        if caller_tgid is not None and caller_tgid != proc.pid:
            return -25, arg  # ENOTTY
        if proc.closed:
            return -9, arg  # EBADF
        latency = self.ioctl_latency
        if latency is None:
            return await dispatch(self, proc, code, arg, mem)
        t0 = time.perf_counter()
        ret = -4  # EINTR, if the call is cancelled
        try:
            ret, out = await dispatch(self, proc, code, arg, mem)
            return ret, out
        finally:
            latency.observe(code & 0xFF, time.perf_counter() - t0, ret < 0)

    def observe_ioctls(self) -> LatencyHistograms:
        """Start timing every ioctl (by ioctl number); returns the histograms (any thread)."""
        if self.ioctl_latency is None:
            self.ioctl_latency = LatencyHistograms()
        return self.ioctl_latency

    def maps_lost(self, proc: GuestProcess, blocks: list[int]) -> None:
        """A front end could not deliver these blocks' maps to the client: hand their
        descriptors again the next time (on the loop)."""
        proc.memory.not_mapped(blocks)

    # ---- introspection -------------------------------------------------------------------------

    async def admin(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "snapshot":
            return self.snapshot()
        if op == "census":
            return {"hosts": await self.host_census()}
        return {"error": f"unknown admin op {op!r}"}

    @on_loop
    def snapshot(self) -> dict[str, Any]:
        adapters = self.all_adapters()
        index = {id(a): i for i, a in enumerate(adapters)}
        procs = []
        for p in sorted(self._processes.values(), key=lambda x: x.pid):
            links = []
            for pa in p.adapters.values():
                links.append({
                    "adapter": index.get(id(pa.adapter)),
                    "luid": f"0x{pa.adapter.luid:016x}",
                    "handles": pa.refcount,
                    "devices": len(pa.devices),
                    "contexts": sum(len(d.contexts) for d in pa.devices),
                    "allocations": sum(len(d.allocations) + sum(
                        len(r.allocations) for r in d.resources) for d in pa.devices),
                    "allocation_bytes": sum(
                        sum(a.size for a in d.allocations) + sum(
                            a.size for r in d.resources for a in r.allocations)
                        for d in pa.devices),
                    "paging_queues": sum(len(d.paging_queues) for d in pa.devices),
                })
            procs.append({"pid": p.pid, "uid": p.uid, "gids": list(p.gids),
                          "grant": p.grant.census(), "name": p.name, "adapters": links,
                          "handles": len(p.handles), "blocks": len(p.memory.blocks),
                          "block_fds": p.memory.fds, "shadows": p.memory.shadows})
        return {
            "driver": self.name,
            "pid": os.getpid(),
            "hosts": [
                {"index": link.index, "address": link.address, "host": link.bus.host_name,
                 "connected": link.up, "async_msg_enabled": link.async_msg_enabled,
                 "last_error": link.bus.last_error,
                 "heartbeat_failures": link.bus.heartbeat_failures}
                for link in sorted(self._links.values(), key=lambda x: x.index)
            ],
            "adapters": [
                {"index": i, "luid": f"0x{a.luid:016x}", "state": a.state.name,
                 "description": a.description, "compute_only": a.compute_only,
                 "host": a.link.index, "pci_vendor_id": a.pci_vendor_id,
                 "pci_device_id": a.pci_device_id}
                for i, a in enumerate(adapters)
            ],
            "processes": procs,
            "shares": self.shares.census(),  # share descriptors and sync files (docs/sharing.md)
        }

    async def host_census(self) -> list[dict[str, Any]]:
        out = []
        for link in sorted(self._links.values(), key=lambda x: x.index):
            entry: dict[str, Any] = {"index": link.index, "address": link.address}
            if link.up:
                try:
                    entry["census"] = await vmbus.query_partition(link)
                except (IoctlError, vmbus.HostStatus) as e:
                    entry["error"] = str(e)
            else:
                entry["error"] = "not connected"
            out.append(entry)
        return out


async def _host_index(ad: GuestAdapter) -> int | None:
    """The adapter's number on its host: its ADAPTERADDRESS DeviceNumber (None when the host
    does not say; policy rules by number then do not match it)."""
    size = ctypes.sizeof(D3DKMT_ADAPTERADDRESS)
    try:
        status, data = await vmbus.query_adapter_info(
            ad, 0, KMTQUERYADAPTERINFOTYPE.KMTQAITYPE_ADAPTERADDRESS, bytes(size))
    except (IoctlError, vmbus.HostStatus) as e:
        log.warning("adapter %016x: no ADAPTERADDRESS (%s): policy rules by index will not "
                    "match it", ad.luid, e)
        return None
    if not nt_success(status) or len(data) < size:
        log.warning("adapter %016x: no ADAPTERADDRESS (status 0x%08x): policy rules by index "
                    "will not match it", ad.luid, status)
        return None
    return int(D3DKMT_ADAPTERADDRESS.from_buffer_copy(data[:size]).DeviceNumber)


__all__ = ["GuestDriver"]
