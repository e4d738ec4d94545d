"""A virtual GPU as the guest sees it: identity from its vGPU channel, state, host handle."""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING

from dxg.vmbus.bus import BusDevice
from dxg.vmbus.channel import Channel

if TYPE_CHECKING:
    from dxg.guest.hostlink import HostLink
    from dxg.guest.process import ProcessAdapter


class AdapterState(IntEnum):
    ACTIVE = 0
    STOPPED = 1
    WAITING_VMBUS = 2


class GuestAdapter:
    def __init__(self, link: HostLink, dev: BusDevice, luid: int, compute_only: bool) -> None:
        self.link = link
        self.dev = dev
        self.luid = luid
        self.compute_only = compute_only
        self.state = AdapterState.WAITING_VMBUS
        self.channel: Channel | None = None
        self.host_handle = 0
        self.host_adapter_luid = 0
        self.host_vgpu_luid = dev.offer.host_vgpu_luid
        self.description = ""
        self.instance_id = ""
        self.pci_vendor_id = dev.offer.pci_vendor_id
        self.pci_device_id = dev.offer.pci_device_id
        self.interface_version = 0
        # Its number on its host (ADAPTERADDRESS DeviceNumber), asked for only when the policy
        # names adapters that way (dxg.guest.policy); None: not known.
        self.host_index: int | None = None
        self.process_adapters: list[ProcessAdapter] = []

    @property
    def active(self) -> bool:
        return self.state == AdapterState.ACTIVE

    def route(self) -> Channel | None:
        """Where this adapter's commands go: the global channel once the host enables async
        messages (the host then finds the vGPU by the extension header), else its own."""
        if self.link.async_msg_enabled and self.link.global_channel is not None:
            return self.link.global_channel
        return self.channel

    def __repr__(self) -> str:
        return f"<GuestAdapter luid=0x{self.luid:016x} {self.state.name} {self.description!r}>"
