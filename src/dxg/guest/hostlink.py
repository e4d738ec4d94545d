"""Per-host state: what the real driver keeps in `struct dxgglobal`, but one per bound bus
device (one per host connection), so several hosts serve one node. Holds the global channel, the
vGPU channel records, the adapters of this host, the IO space, the device-state counter and the
routing rule (adapter traffic on the global channel once the host enables async messages).
Touched only on the driver's event loop."""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import TYPE_CHECKING

from dxg.guest.syncobject import HostEvents
from dxg.protocol import messages as m
from dxg.protocol.commands import HostToVmCommand
from dxg.protocol.errors import ProtocolError
from dxg.protocol.headers import decode_host_to_vm
from dxg.runtime.logs import LogLimiter
from dxg.runtime.tasks import TaskSet
from dxg.vmbus.bus import BusDevice, GuestBus
from dxg.vmbus.channel import Channel, Packet

if TYPE_CHECKING:
    from dxg.guest.adapter import GuestAdapter

log = logging.getLogger(__name__)

# Lock2/Unlock2 copy pieces (4 MiB each) on their way over one link at once: 64 MiB, well
# inside the 128 MiB a host lets wait for a guest before it drops it.
COPY_SLOTS = 16


class HostLink:
    def __init__(self, bus: GuestBus, index: int, address: str) -> None:
        self.bus = bus
        self.index = index  # order in which hosts were bound, for stable enumeration
        self.address = address
        self.global_dev: BusDevice | None = None
        self.global_channel: Channel | None = None
        self.adapters: dict[int, GuestAdapter] = {}  # guest LUID -> adapter
        self.waiting: set[GuestAdapter] = set()  # offered, not started yet
        self.refused_adapters = 0  # offers past the guest's adapter limits
        self.async_msg_enabled = False
        self.iospace: tuple[int, int] = (0, 0)
        # The device-state counter and the opaque cookie the host echoes in SETGUESTDATA
        # (the real driver sends the counter's kernel address).
        self.device_state_counter = 0
        self.device_state_cookie = secrets.randbits(63) | 1
        self.generation = 0
        # Pieces of Lock2/Unlock2 copies on their way over this link at once, whoever asked:
        # what a host answers must stay well inside what it may keep waiting for the guest.
        self.copy_slots = asyncio.Semaphore(COPY_SLOTS)
        # Work the link does on its own (undoing what the host did for abandoned requests).
        self.tasks = TaskSet(f"link {bus.name}")
        # Host events (dxg.guest.syncobject): what SIGNALGUESTEVENT and PYDXG_FENCEVALUE name.
        self.events = HostEvents(f"link {bus.name}", self.tasks)
        self.logs = LogLimiter(log)  # what the host provokes cannot flood the log

    @property
    def name(self) -> str:
        return self.bus.name

    @property
    def up(self) -> bool:
        ch = self.global_channel
        return ch is not None and not ch.closed

    def on_host_message(self, _channel: Channel, packet: Packet) -> None:
        """Host -> guest notifications arrive only on the global channel, without ext header."""
        packet.close_fds()
        try:
            msg = decode_host_to_vm(packet.payload)
        except ProtocolError as e:
            self.logs.log(logging.WARNING, "bad notification",
                          "host %s: bad notification dropped: %s", self.name, e)
            return
        if msg.command == HostToVmCommand.SETGUESTDATA:
            try:
                data = m.SetGuestData.unpack(msg.body)
            except ProtocolError as e:
                self.logs.log(logging.WARNING, "bad SETGUESTDATA",
                              "host %s: bad SETGUESTDATA: %s", self.name, e)
                return
            if (
                data.data_type == m.SETGUESTDATA_DATATYPE_DWORD
                and data.guest_pointer == self.device_state_cookie
                and data.data32 != 0
            ):
                self.device_state_counter += 1
        elif msg.command in (HostToVmCommand.SIGNALGUESTEVENT,
                             HostToVmCommand.SIGNALGUESTEVENTPASSIVE):
            try:
                event = m.SignalGuestEvent.unpack(msg.body)
            except ProtocolError as e:
                self.logs.log(logging.WARNING, "bad SIGNALGUESTEVENT",
                              "host %s: bad SIGNALGUESTEVENT: %s", self.name, e)
                return
            if not self.events.signal(event.event, event.status):
                self.logs.log(logging.DEBUG, "unknown event",
                              "host %s: SIGNALGUESTEVENT for an unknown event ignored",
                              self.name)
        elif msg.command == HostToVmCommand.PYDXG_FENCEVALUE:
            try:
                fence = m.FenceValue.unpack(msg.body)
            except ProtocolError as e:
                self.logs.log(logging.WARNING, "bad PYDXG_FENCEVALUE",
                              "host %s: bad PYDXG_FENCEVALUE: %s", self.name, e)
                return
            self.events.value(fence.event, fence.value)
        elif msg.command == HostToVmCommand.SENDWNFNOTIFICATION:
            pass
        else:
            self.logs.log(logging.WARNING, "unexpected message",
                          "host %s: unexpected host message %s", self.name, msg.command.name)
