"""The host end to end: a real Host on real sockets, driven by a minimal raw guest (a GuestBus on a
loop of its own plus a small async driver whose probe opens the channels) that sends hand-built
DXGK messages with ``await channel.request(...)``."""

import asyncio
import concurrent.futures
import ctypes
import json
import os
import struct
import time
import uuid
from collections.abc import Callable, Iterator, Sequence

import pytest

from dxg.host import Host, HostConfig, parse_umd_private_blob
from dxg.host.config import adapter_identity
from dxg.host.handles import HandleTable
from dxg.protocol.bus import (
    DXGK_VMBUS_INTERFACE_VERSION,
    GUEST_CAPS_WSL2,
    PCI_DEVICE_ID_COMPUTE_ACCELERATOR,
    PCI_VENDOR_MICROSOFT,
)
from dxg.protocol.commands import GlobalCommand, HostToVmCommand, VgpuCommand
from dxg.protocol.guids import DXGK_GLOBAL_GUID, DXGK_VGPU_GUID, guid_to_luid, luid_parts
from dxg.protocol.headers import (
    decode_host_to_vm,
    encode_global,
    encode_vgpu,
)
from dxg.protocol.messages import (
    GETDEVICESTATE_ARGS_SIZE,
    IAI_ASYNC_MSG_ENABLED,
    CloseAdapter,
    CreateContextVirtual,
    CreateDevice,
    CreateProcess,
    CreateProcessReturn,
    DestroyContext,
    DestroyDevice,
    Escape,
    FlushDevice,
    GetDeviceStateReturn,
    GetInternalAdapterInfoReturn,
    HandleReturn,
    IsFeatureEnabled,
    IsFeatureEnabledReturn,
    NtStatusReturn,
    OpenAdapter,
    OpenAdapterReturn,
    QueryAdapterInfo,
    QueryClockCalibrationReturn,
    SetGuestData,
    SetIoSpaceRegion,
    SignalGuestEvent,
    StatusAndData,
)
from dxg.runtime.loop import LoopThread
from dxg.uapi import (
    NTSTATUS,
    d3dkmt_getdevicestate,
    d3dkmt_queryclockcalibration,
    dxgk_gpuclockdata,
    wddm,
)
from dxg.uapi.escape import EscapeHeader, Op
from dxg.uapi.handles import HandleType, handle_index, handle_instance, handle_unique
from dxg.vmbus.bus import BusDevice, BusError, GuestBus
from dxg.vmbus.channel import Channel, Packet
from dxg.vmbus.transport import connect

OK = NTSTATUS.STATUS_SUCCESS
Q = wddm.KMTQUERYADAPTERINFOTYPE
TIMEOUT = 10.0
# Long enough that only a cancellation ends it within any test.
LONG_SLEEP_MS = 600_000


def wait_until(predicate: Callable[[], object], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.002)


# ---- the raw guest -----------------------------------------------------------------------------


class RawDriver:
    """Binds both DXGK channel types: opens each as it is offered and remembers the order. Its
    state is only changed on the guest's loop (probe/remove run on the bus's work task)."""

    id_table = (DXGK_VGPU_GUID, DXGK_GLOBAL_GUID)

    def __init__(self, vgpu_version: int = DXGK_VMBUS_INTERFACE_VERSION) -> None:
        self.vgpu_version = vgpu_version
        self.order: list[uuid.UUID] = []
        self.offers: list[BusDevice] = []
        self.global_channel: Channel | None = None
        self.vgpus: dict[int, Channel] = {}  # host vGPU LUID -> channel
        self.removed: list[uuid.UUID] = []
        self.open_errors: list[BaseException] = []
        self.notifications: list[bytes] = []

    async def probe(self, dev: BusDevice) -> bool:
        self.order.append(dev.type_guid)
        self.offers.append(dev)
        try:
            if dev.type_guid == DXGK_GLOBAL_GUID:
                ch = await dev.open()
                ch.on_inband = self._inband
                self.global_channel = ch
            else:
                ch = await dev.open(GUEST_CAPS_WSL2, self.vgpu_version)
                self.vgpus[dev.offer.host_vgpu_luid] = ch
        except BusError as e:
            self.open_errors.append(e)
        return True

    async def remove(self, dev: BusDevice) -> None:
        self.removed.append(dev.instance_guid)
        self.vgpus.pop(dev.offer.host_vgpu_luid, None)

    def _inband(self, channel: Channel, packet: Packet) -> None:
        packet.close_fds()
        self.notifications.append(packet.payload)


class RawGuest:
    """A GuestBus with a RawDriver on its own loop (or on ``rt``), connected to ``address``.
    Requests are sent on that loop (``await channel.request(...)``); the synchronous helpers
    below wait for them from the test's thread."""

    def __init__(self, address: str, name: str = "raw-guest", rt: LoopThread | None = None,
                 **driver_args: int) -> None:
        self.rt = rt if rt is not None else LoopThread(f"raw-guest {name}")
        self._owns_loop = rt is None
        self.driver = RawDriver(**driver_args)
        self.adapter_handles: dict[int, int] = {}  # adapter index -> host adapter handle
        self._closed = False
        try:
            self.bus: GuestBus = self.rt.run(self._start(address, name), TIMEOUT)
        except BaseException:
            if self._owns_loop:
                self.rt.close()
            raise

    async def _start(self, address: str, name: str) -> GuestBus:
        loop = asyncio.get_running_loop()

        async def dial():  # type: ignore[no-untyped-def]
            return await connect(loop, address)

        bus = GuestBus(loop, dial, name, reconnect=False)
        bus.register_driver(self.driver)
        try:
            await bus.start(wait=False)
            # Set by the bus's work task after every offer's probe has run.
            await asyncio.wait_for(bus.offers_delivered.wait(), TIMEOUT)
        except BaseException:
            await bus.close()
            raise
        return bus

    def hang_up(self) -> None:
        """Close the bus (the host sees the guest go); the loop keeps running."""
        self.rt.run(self.bus.close(), TIMEOUT)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.hang_up()
        finally:
            if self._owns_loop:
                self.rt.close()

    @property
    def connected(self) -> bool:
        return self.bus.connected.is_set()

    # channels
    @property
    def glob(self) -> Channel:
        assert self.driver.global_channel is not None
        return self.driver.global_channel

    @property
    def vgpu_luids(self) -> list[int]:
        """Host vGPU LUIDs in offer order."""
        return [d.offer.host_vgpu_luid for d in self.driver.offers if d.type_guid == DXGK_VGPU_GUID]

    def vgpu_offer(self, index: int) -> BusDevice:
        return [d for d in self.driver.offers if d.type_guid == DXGK_VGPU_GUID][index]

    def vch(self, index: int) -> Channel:
        return self.driver.vgpus[self.vgpu_luids[index]]

    # requests
    @staticmethod
    async def _request(ch: Channel, payload: bytes, fds: Sequence[int] = ()) -> bytes:
        packet = await ch.request(payload, fds)
        packet.close_fds()
        return packet.payload

    def request(self, ch: Channel, payload: bytes, fds: Sequence[int] = ()) -> bytes:
        """Send ``payload`` on ``ch`` and wait for the completion's payload."""
        return self.rt.run(self._request(ch, payload, fds), TIMEOUT)

    def start_request(self, ch: Channel, payload: bytes) -> concurrent.futures.Future[bytes]:
        """Send ``payload`` now; the returned future resolves with the completion."""
        return self.rt.spawn(self._request(ch, payload))

    def send_async(self, ch: Channel, payload: bytes) -> None:
        self.rt.call(ch.send_async, payload)

    def g(self, cmd: GlobalCommand, process: int = 0, body: bytes = b"") -> bytes:
        return self.request(self.glob, encode_global(cmd, process, body))

    def vpayload(self, index: int, cmd: VgpuCommand, process: int = 0, body: bytes = b"",
                 luid: int | None = None) -> bytes:
        vluid = self.vgpu_luids[index] if luid is None else luid
        return encode_vgpu(cmd, process, vluid, body)

    def v(self, index: int, cmd: VgpuCommand, process: int = 0, body: bytes = b"",
          via_global: bool = False, luid: int | None = None) -> bytes:
        ch = self.glob if via_global else self.vch(index)
        return self.request(ch, self.vpayload(index, cmd, process, body, luid))

    # DXGK commands
    def create_process(self, pid: int = 4242, name: str = "app", cookie: int = 0xFFFF8880DEAD0000
                       ) -> int:
        reply = self.g(GlobalCommand.CREATEPROCESS, 0, CreateProcess(cookie, pid, name).pack())
        return CreateProcessReturn.unpack(reply).hprocess

    def destroy_process(self, hprocess: int) -> int:
        return NtStatusReturn.unpack(self.g(GlobalCommand.DESTROYPROCESS, hprocess)).status

    def open_adapter(self, index: int, via_global: bool = False) -> OpenAdapterReturn:
        guest_luid = guid_to_luid(self.vgpu_offer(index).instance_guid)
        body = OpenAdapter(DXGK_VMBUS_INTERFACE_VERSION, 16, *luid_parts(guest_luid)).pack()
        reply = OpenAdapterReturn.unpack(self.v(index, VgpuCommand.OPENADAPTER, 0, body,
                                                via_global))
        if reply.host_adapter_handle:
            self.adapter_handles[index] = reply.host_adapter_handle
        return reply

    def create_device(self, index: int, hprocess: int, cookie: int = 0xFFFF888000001234,
                      via_global: bool = True) -> int:
        body = CreateDevice(0, 0, cookie).pack()
        reply = self.v(index, VgpuCommand.CREATEDEVICE, hprocess, body, via_global)
        return HandleReturn.unpack(reply).handle

    def destroy_device(self, index: int, hprocess: int, device: int) -> int:
        reply = self.v(index, VgpuCommand.DESTROYDEVICE, hprocess, DestroyDevice(device).pack(),
                       True)
        return NtStatusReturn.unpack(reply).status

    def create_context(self, index: int, hprocess: int, device: int, node: int = 0,
                       priv: bytes = b"ctx-private") -> CreateContextVirtual:
        body = CreateContextVirtual(0, device, node, 0, 0, 5, priv).pack()
        reply = self.v(index, VgpuCommand.CREATECONTEXTVIRTUAL, hprocess, body, True)
        return CreateContextVirtual.unpack(reply)

    def destroy_context(self, index: int, hprocess: int, context: int) -> int:
        reply = self.v(index, VgpuCommand.DESTROYCONTEXT, hprocess,
                       DestroyContext(context).pack(), True)
        return NtStatusReturn.unpack(reply).status

    def query_info(self, index: int, qtype: int, data: bytes, hprocess: int = 0
                   ) -> StatusAndData:
        body = QueryAdapterInfo(qtype, data).pack()
        reply = self.v(index, VgpuCommand.QUERYADAPTERINFO, hprocess, body, True)
        return StatusAndData.unpack(reply)

    def device_state(self, index: int, hprocess: int, device: int, state_type: int = 1
                     ) -> GetDeviceStateReturn:
        args = d3dkmt_getdevicestate()
        args.device.v = device
        args.state_type = state_type
        reply = self.v(index, VgpuCommand.GETDEVICESTATE, hprocess, bytes(args), True)
        return GetDeviceStateReturn.unpack(reply)

    def census(self) -> dict:
        return json.loads(self.g(GlobalCommand.PYDXG_QUERYPARTITION).decode())

    # pydxg escapes (ESCAPE with the PDXE header) on the adapter's own vGPU channel
    def escape_payload(self, index: int, hprocess: int, device: int, op: Op,
                       fields: bytes = b"") -> bytes:
        body = Escape(self.adapter_handles[index], device, 0, 0, 0,
                      EscapeHeader(op).pack() + fields)
        return self.vpayload(index, VgpuCommand.ESCAPE, hprocess, body.pack())

    def escape(self, index: int, hprocess: int, device: int, op: Op,
               fields: bytes = b"") -> EscapeHeader:
        """Run a pydxg escape; returns the header the host answered (its status is the op's)."""
        return escape_status(self.request(
            self.vch(index), self.escape_payload(index, hprocess, device, op, fields)))

    def start_sleep(self, index: int, hprocess: int, device: int,
                    ms: int = LONG_SLEEP_MS) -> concurrent.futures.Future[bytes]:
        return self.start_request(self.vch(index), self.escape_payload(
            index, hprocess, device, Op.SLEEP, struct.pack("<I", ms)))


def escape_status(reply: bytes) -> EscapeHeader:
    if len(reply) == 4:  # the bare failure status: the escape never ran
        raise AssertionError(f"escape failed: 0x{NtStatusReturn.unpack(reply).status:08x}")
    return EscapeHeader.unpack(Escape.unpack(reply).priv_drv_data)


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def sock_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # Unix socket paths are limited to ~107 bytes: keep them short.
    base = tmp_path_factory.mktemp("h")
    yield str(base)


@pytest.fixture
def host(sock_dir: str) -> Iterator[Host]:
    h = Host(HostConfig(adapters=2, host_id="test-host"))
    h.listen(os.path.join(sock_dir, "host.sock"))
    yield h
    h.close()


@pytest.fixture
def guest(host: Host) -> Iterator[RawGuest]:
    g = RawGuest(host.addresses[0])
    wait_until(lambda: g.driver.global_channel is not None and len(g.driver.vgpus) == 2)
    yield g
    g.close()


def totals(host: Host) -> dict[str, int]:
    return host.census()["totals"]


def objects(host: Host) -> tuple[int, int, int]:
    t = totals(host)
    return t["processes"], t["devices"], t["contexts"]


def host_process(host: Host, hprocess: int, guest: int = 0) -> dict:
    """The host's census entry of one process (of the first guest to connect, or the
    ``guest``-th)."""
    part = sorted(host.census()["partitions"], key=lambda p: p["id"])[guest]
    return next(p for p in part["processes"] if p["handle"] == hprocess)


# ---- discovery ---------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["global-first", "vgpu-first"])
def test_offers_in_both_orders(sock_dir: str, order: str) -> None:
    with Host(HostConfig(adapters=2, offer_order=order, mmio_megabytes=64)) as host:
        addr = host.listen(os.path.join(sock_dir, "o.sock"))
        g = RawGuest(addr)
        try:
            expected = [DXGK_GLOBAL_GUID, DXGK_VGPU_GUID, DXGK_VGPU_GUID]
            if order == "vgpu-first":
                expected = [DXGK_VGPU_GUID, DXGK_VGPU_GUID, DXGK_GLOBAL_GUID]
            assert g.driver.order == expected
            wait_until(lambda: len(g.driver.vgpus) == 2 and g.driver.global_channel is not None)
            glob = next(d for d in g.driver.offers if d.type_guid == DXGK_GLOBAL_GUID)
            assert glob.offer.mmio_megabytes == 64
            seen: set[int] = set()
            for i, adapter in enumerate(host.adapters):
                offer = g.vgpu_offer(i).offer
                assert offer.interface_version == DXGK_VMBUS_INTERFACE_VERSION == 40
                assert offer.pci_vendor_id == PCI_VENDOR_MICROSOFT
                assert offer.pci_device_id == PCI_DEVICE_ID_COMPUTE_ACCELERATOR
                assert offer.host_vgpu_luid == adapter.host_vgpu_luid
                guest_luid = guid_to_luid(offer.instance_guid)
                assert guest_luid == adapter.guest_luid
                three = {guest_luid, adapter.host_adapter_luid, adapter.host_vgpu_luid}
                assert len(three) == 3
                assert not three & seen
                seen |= three
        finally:
            g.close()


def test_identity_is_deterministic_per_host_id() -> None:
    a, b = Host(HostConfig(host_id="box-1")), Host(HostConfig(host_id="box-1"))
    c, d = Host(HostConfig()), Host(HostConfig())
    assert [x.identity for x in a.adapters] == [x.identity for x in b.adapters]
    assert adapter_identity("box-1", 0) == a.adapters[0].identity
    assert c.adapters[0].guest_luid != d.adapters[0].guest_luid  # random id per instance
    assert a.global_instance_guid == b.global_instance_guid


def test_vgpu_open_with_wrong_interface_version_is_refused(host: Host) -> None:
    g = RawGuest(host.addresses[0], vgpu_version=27)
    try:
        wait_until(lambda: len(g.driver.open_errors) == 2 and g.driver.global_channel is not None)
        assert g.driver.vgpus == {}
        assert all("refused" in str(e) for e in g.driver.open_errors)
    finally:
        g.close()


# ---- object life cycle ------------------------------------------------------------------------


def test_process_device_context_lifecycle(host: Host, guest: RawGuest) -> None:
    assert NtStatusReturn.unpack(
        guest.g(GlobalCommand.SETIOSPACEREGION, 0, SetIoSpaceRegion(1 << 40, 256 << 20).pack())
    ).status == OK
    hp = guest.create_process(pid=1234, name="python3", cookie=0xABCDEF)
    assert hp and handle_instance(hp) == 0 and handle_unique(hp) == 1 and handle_index(hp) > 0

    opened = guest.open_adapter(0)
    assert opened.status == OK and opened.host_adapter_handle
    assert (opened.vmbus_interface_version, opened.vmbus_last_compatible_interface_version) == (
        40, 16)
    assert guest.open_adapter(0).host_adapter_handle == opened.host_adapter_handle  # one per VM

    info = GetInternalAdapterInfoReturn.unpack(guest.v(0, VgpuCommand.GETINTERNALADAPTERINFO))
    adapter = host.adapters[0]
    assert info.host_adapter_luid == adapter.host_adapter_luid
    assert info.host_vgpu_luid == adapter.host_vgpu_luid
    assert info.flags & IAI_ASYNC_MSG_ENABLED
    assert info.device_description == adapter.description.name
    assert info.device_instance_id.startswith("PCI\\VEN_1414&DEV_")
    assert info.device_types

    dev = guest.create_device(0, hp, cookie=0x5555)
    assert dev and dev != hp
    ctx = guest.create_context(0, hp, dev, priv=b"abc" * 10)
    assert ctx.context and ctx.device == dev and ctx.priv_drv_data == b"abc" * 10
    assert ctx.client_hint == 5

    census = host.census()
    assert census["totals"] == {"processes": 1, "devices": 1, "contexts": 1,
                                "adapter_handles": 1, "handles": 4, "regions": 0,
                                "partitions": 1}
    (part,) = census["partitions"]
    (proc,) = part["processes"]
    assert (proc["handle"], proc["pid"], proc["name"], proc["cookie"]) == (
        hp, 1234, "python3", 0xABCDEF)
    assert proc["devices"][0]["handle"] == dev
    assert proc["devices"][0]["contexts"][0]["handle"] == ctx.context
    assert part["io_space"] == {"start": 1 << 40, "length": 256 << 20}
    assert guest.census()["totals"] == part["totals"]  # PYDXG_QUERYPARTITION, same JSON

    flush = guest.v(0, VgpuCommand.FLUSHDEVICE, hp, FlushDevice(dev, 4).pack(), True)
    assert NtStatusReturn.unpack(flush).status == OK
    assert guest.destroy_context(0, hp, ctx.context) == OK
    assert guest.destroy_context(0, hp, ctx.context) == NTSTATUS.STATUS_INVALID_HANDLE
    assert guest.destroy_device(0, hp, dev) == OK
    assert objects(host) == (1, 0, 0)

    # DESTROYPROCESS takes down everything the process still owns.
    dev2 = guest.create_device(0, hp)
    guest.create_context(0, hp, dev2)
    guest.create_context(0, hp, dev2)
    assert objects(host) == (1, 1, 2)
    assert guest.destroy_process(hp) == OK
    assert objects(host) == (0, 0, 0)
    assert guest.destroy_process(hp) == NTSTATUS.STATUS_INVALID_HANDLE

    assert guest.v(0, VgpuCommand.CLOSEADAPTER, 0, CloseAdapter(opened.host_adapter_handle).pack()
                   ) == b""
    assert totals(host)["adapter_handles"] == 1  # opened twice, closed once
    guest.v(0, VgpuCommand.CLOSEADAPTER, 0, CloseAdapter(opened.host_adapter_handle).pack())
    assert totals(host)["handles"] == 0


def test_context_validation(host: Host, guest: RawGuest) -> None:
    hp = guest.create_process()
    guest.open_adapter(0)
    dev = guest.create_device(0, hp)
    bad_node = guest.create_context(0, hp, dev, node=1)  # the soft adapter has one node
    assert bad_node.context == 0 and bad_node.priv_drv_data == b"ctx-private"
    assert guest.create_context(0, hp, 0x40000FC0).context == 0  # no such device
    assert objects(host) == (1, 1, 0)


def test_closing_the_adapter_drops_its_devices(host: Host, guest: RawGuest) -> None:
    hp = guest.create_process()
    h0 = guest.open_adapter(0).host_adapter_handle
    guest.open_adapter(1)
    d0 = guest.create_device(0, hp)
    guest.create_context(0, hp, d0)
    d1 = guest.create_device(1, hp)
    guest.v(0, VgpuCommand.CLOSEADAPTER, 0, CloseAdapter(h0).pack())
    (proc,) = host.census()["partitions"][0]["processes"]
    assert [d["handle"] for d in proc["devices"]] == [d1]
    assert guest.create_device(0, hp) == 0  # adapter 0 is no longer open in this partition


def test_handles_are_not_reused_soon(host: Host, guest: RawGuest) -> None:
    hp = guest.create_process()
    guest.open_adapter(0)
    first = guest.create_device(0, hp)
    assert guest.destroy_device(0, hp, first) == OK
    later = [guest.create_device(0, hp) for _ in range(20)]
    assert first not in later
    assert handle_index(first) not in {handle_index(h) for h in later}
    assert guest.destroy_device(0, hp, first) == NTSTATUS.STATUS_INVALID_HANDLE


# ---- routing and ownership --------------------------------------------------------------------


def test_routing_on_the_global_channel_by_vgpu_luid(host: Host, guest: RawGuest) -> None:
    hp = guest.create_process()
    r0 = guest.open_adapter(0)
    r1 = guest.open_adapter(1)
    assert r0.status == r1.status == OK
    assert r0.host_adapter_handle != r1.host_adapter_handle
    assert guest.open_adapter(1).host_adapter_handle == r1.host_adapter_handle
    # Adapter bring-up travels on the adapter's own vGPU channel only (the table's VGPU_ONLY
    # route): on the global channel it is refused in the command's own reply layout.
    refused = guest.open_adapter(1, via_global=True)
    assert refused.status == NTSTATUS.STATUS_INVALID_PARAMETER
    assert refused.host_adapter_handle == 0
    info = guest.v(0, VgpuCommand.GETINTERNALADAPTERINFO, 0, b"", via_global=True)
    assert NtStatusReturn.unpack(info).status == NTSTATUS.STATUS_INVALID_PARAMETER
    # Per-adapter commands reach their adapter through either channel.
    feature = guest.v(1, VgpuCommand.ISFEATUREENABLED, 0, IsFeatureEnabled(0).pack(),
                      via_global=True)
    assert IsFeatureEnabledReturn.unpack(feature).status == OK
    d0 = guest.create_device(0, hp, via_global=True)
    d1 = guest.create_device(1, hp, via_global=False)
    devs = {d["handle"]: d["adapter"]
            for d in host.census()["partitions"][0]["processes"][0]["devices"]}
    assert devs == {d0: 0, d1: 1}

    # Unknown vGPU LUID on the global channel: the command's own failure reply.
    reply = guest.v(0, VgpuCommand.OPENADAPTER, 0,
                    OpenAdapter(40, 16, 0, 0).pack(), via_global=True, luid=0x1234)
    assert OpenAdapterReturn.unpack(reply).status == NTSTATUS.STATUS_INVALID_PARAMETER
    reply = guest.v(0, VgpuCommand.CREATEDEVICE, hp, CreateDevice(0, 0, 1).pack(),
                    via_global=True, luid=0)
    assert HandleReturn.unpack(reply).handle == 0
    # A device of adapter 0 is not reachable through adapter 1.
    assert guest.destroy_device(1, hp, d0) == NTSTATUS.STATUS_INVALID_HANDLE
    # Global commands belong on the global channel only (refused in their own failure layout).
    reply = guest.request(guest.vch(0), encode_global(GlobalCommand.CREATEPROCESS, 0,
                                                      CreateProcess(1, 2, "x").pack()))
    assert CreateProcessReturn.unpack(reply).hprocess == 0
    reply = guest.request(guest.vch(0), encode_global(GlobalCommand.SETIOSPACEREGION, 0,
                                                      SetIoSpaceRegion(0, 1).pack()))
    assert NtStatusReturn.unpack(reply).status == NTSTATUS.STATUS_INVALID_PARAMETER
    assert totals(host)["processes"] == 1


def test_wrong_process_and_foreign_handles_are_rejected(host: Host, guest: RawGuest) -> None:
    a = guest.create_process(pid=1, name="a")
    b = guest.create_process(pid=2, name="b")
    guest.open_adapter(0)
    dev_a = guest.create_device(0, a)
    ctx_a = guest.create_context(0, a, dev_a).context
    INVALID = NTSTATUS.STATUS_INVALID_HANDLE

    assert guest.create_device(0, 0x4000FFC0) == 0  # not a live process
    assert guest.create_device(0, 0) == 0
    assert guest.create_device(0, dev_a) == 0  # a device handle is not a process handle
    assert guest.destroy_device(0, b, dev_a) == INVALID  # b cannot touch a's device
    assert guest.destroy_context(0, b, ctx_a) == INVALID
    assert guest.create_context(0, b, dev_a).context == 0
    assert guest.device_state(0, b, dev_a).status == INVALID
    flush = guest.v(0, VgpuCommand.FLUSHDEVICE, b, FlushDevice(dev_a, 4).pack(), True)
    assert NtStatusReturn.unpack(flush).status == INVALID
    assert guest.destroy_context(0, a, dev_a) == INVALID  # wrong type
    assert guest.destroy_device(0, a, dev_a ^ 0xC0000000) == INVALID  # wrong unique bits
    assert guest.destroy_device(0, a, dev_a | 1) == INVALID  # instance bits set
    assert guest.destroy_process(0x12345678) == INVALID
    assert objects(host) == (2, 1, 1)

    # Another guest (partition) cannot use this one's handles either.
    other = RawGuest(host.addresses[0], name="other")
    try:
        wait_until(lambda: len(other.driver.vgpus) == 2)
        other.open_adapter(0)
        assert other.create_device(0, a) == 0
        assert other.destroy_process(a) == INVALID
        c = other.create_process()
        assert other.destroy_device(0, c, dev_a) == INVALID
        assert objects(host) == (3, 1, 1)
    finally:
        other.close()
    host.wait_for(lambda: totals(host)["partitions"] == 1)
    assert objects(host) == (2, 1, 1)


# ---- hostile bytes -------------------------------------------------------------------------------


def test_malformed_and_unknown_messages_are_answered(host: Host, guest: RawGuest) -> None:
    INVALID = NTSTATUS.STATUS_INVALID_PARAMETER
    bad = [
        b"",  # nothing at all
        b"\x00" * 10,  # shorter than the headers
        b"\x11" * 64,  # garbage extension header
        encode_global(GlobalCommand.CREATEPROCESS, 0, b"short"),  # truncated body
        encode_global(GlobalCommand.DESTROYPROCESS, 0, b"extra"),
        struct.pack("<IIQQIII4x", 16, 0, 0, 0, 0, 1, 999),  # unknown global command
        struct.pack("<IIQQIII4x", 16, 0, 0, 0, 0, 0, 63),  # unknown vGPU command (the gap)
        encode_vgpu(VgpuCommand.QUERYADAPTERINFO, 0, guest.vgpu_luids[0],
                    struct.pack("<II", 3, 1000) + b"x"),  # declared size past the end
        encode_vgpu(VgpuCommand.CREATECONTEXTVIRTUAL, 0, guest.vgpu_luids[0], b"\x01" * 27),
        encode_vgpu(VgpuCommand.GETINTERNALADAPTERINFO, 0, guest.vgpu_luids[0], b"junk"),
        encode_vgpu(VgpuCommand.ESCAPE, 0, guest.vgpu_luids[0],  # private data past the end
                    struct.pack("<IIIIIIQ", 0, 0, 0, 0, 1000, 0, 0) + b"x"),
        encode_vgpu(VgpuCommand.ESCAPE, 0, guest.vgpu_luids[0],  # a huge attachment size
                    struct.pack("<IIIIIIQ", 0, 0, 0, 0, 0, 0, 1 << 62)),
    ]
    for payload in bad:
        reply = guest.request(guest.glob, payload)
        if payload == bad[3]:  # CREATEPROCESS fails in its own layout: process handle 0
            assert reply == CreateProcessReturn(0).pack()
        else:
            assert reply == struct.pack("<I", INVALID), payload
    for payload in bad[7:]:
        assert guest.request(guest.vch(0), payload) == struct.pack("<I", INVALID)
    # The session is still fine.
    hp = guest.create_process()
    assert hp
    assert guest.destroy_process(hp) == OK
    assert host.census()["partitions"][0]["closed"] is False


def test_unimplemented_commands(host: Host, guest: RawGuest) -> None:
    NOT_IMPL = struct.pack("<I", NTSTATUS.STATUS_NOT_IMPLEMENTED)
    hp = guest.create_process()
    assert guest.v(1, VgpuCommand.BLT, hp, b"\0" * 8) == NOT_IMPL
    assert guest.g(GlobalCommand.SIGNALFENCE, hp, b"\0" * 16) == NOT_IMPL
    # Fire-and-forget ones (no completion) are dropped; the next request is answered.
    guest.send_async(guest.glob, encode_vgpu(VgpuCommand.SUBMITCOMMAND, hp,
                                             guest.vgpu_luids[0], b"\0" * 384, async_msg=True))
    guest.send_async(guest.glob, b"\xff" * 7)
    guest.send_async(guest.glob, encode_vgpu(VgpuCommand.SIGNALSYNCOBJECT, hp, 0x999, b"", True))
    assert guest.destroy_process(hp) == OK


# ---- long commands -------------------------------------------------------------------------------


def test_a_long_command_holds_up_nothing_but_its_own_devices_escapes(host: Host, guest: RawGuest) -> None:
    a = guest.create_process(pid=1, name="sleeper")
    b = guest.create_process(pid=2, name="other")
    guest.open_adapter(0)
    guest.open_adapter(1)
    dev_a = guest.create_device(0, a)
    dev_a1 = guest.create_device(1, a)
    dev_b = guest.create_device(0, b)

    sleep = guest.start_sleep(0, a, dev_a)
    wait_until(lambda: host_process(host, a)["jobs"] == 1)  # running on a host worker
    # Queued behind it: a command of the same device.
    same_device = guest.start_request(guest.vch(0), guest.escape_payload(0, a, dev_a, Op.PING))

    # Everything else is served while it sleeps: another process on the same adapter (inline
    # commands and one that needs a worker too), the same process on another adapter, and the
    # same process's adapter-level escapes (no device: no lane).
    assert guest.escape(0, b, dev_b, Op.PING).status == OK
    assert guest.escape(0, b, dev_b, Op.SLEEP, struct.pack("<I", 0)).status == OK
    assert guest.create_device(0, b)
    assert guest.escape(1, a, dev_a1, Op.PING).status == OK
    assert guest.escape(1, a, dev_a1, Op.SLEEP, struct.pack("<I", 0)).status == OK
    assert guest.escape(0, a, 0, Op.PING).status == OK
    assert guest.census()["totals"]["processes"] == 2
    # ... and the command of the sleeping device still waits: all of the above were sent after
    # it and answered, it was not.
    assert not sleep.done() and not same_device.done()
    assert host_process(host, a)["jobs"] == 1

    # Ending the process cancels the sleep at once; the device's queue then moves on in order,
    # and the command queued behind it finds its process gone: it does not run for it.
    finished: list[str] = []
    sleep.add_done_callback(lambda _f: finished.append("sleep"))
    same_device.add_done_callback(lambda _f: finished.append("same-device"))
    assert guest.destroy_process(a) == OK
    assert escape_status(sleep.result(TIMEOUT)).status == NTSTATUS.STATUS_CANCELLED
    assert NtStatusReturn.unpack(same_device.result(TIMEOUT)).status == (
        NTSTATUS.STATUS_INVALID_HANDLE)
    assert finished == ["sleep", "same-device"]
    assert objects(host) == (1, 2, 0)


def test_destroying_the_process_cancels_its_long_command(sock_dir: str) -> None:
    # One worker thread: the next escape that needs one runs only once the sleep has let go.
    with Host(HostConfig(adapters=1, backend_workers=1)) as host:
        g = RawGuest(host.listen(os.path.join(sock_dir, "w.sock")))
        try:
            wait_until(lambda: len(g.driver.vgpus) == 1)
            a, b = g.create_process(pid=1), g.create_process(pid=2)
            g.open_adapter(0)
            dev_a, dev_b = g.create_device(0, a), g.create_device(0, b)
            sleep = g.start_sleep(0, a, dev_a)
            wait_until(lambda: host_process(host, a)["jobs"] == 1)
            assert g.destroy_process(a) == OK
            assert escape_status(sleep.result(TIMEOUT)).status == NTSTATUS.STATUS_CANCELLED
            # The worker is free again.
            assert g.escape(0, b, dev_b, Op.SLEEP, struct.pack("<I", 0)).status == OK
            assert host.census()["partitions"][0]["tasks"] == 0
        finally:
            g.close()


def test_a_guest_dropping_cancels_its_long_command(sock_dir: str) -> None:
    with Host(HostConfig(adapters=1, backend_workers=1)) as host:
        address = host.listen(os.path.join(sock_dir, "d.sock"))
        first = RawGuest(address, name="first")
        try:
            hp = first.create_process()
            first.open_adapter(0)
            dev = first.create_device(0, hp)
            sleep = first.start_sleep(0, hp, dev)
            wait_until(lambda: host_process(host, hp)["jobs"] == 1)
            first.hang_up()
            with pytest.raises(ConnectionError):  # the bus went down under the request
                sleep.result(TIMEOUT)
        finally:
            first.close()
        assert host.wait_for(lambda: not host.partitions(), TIMEOUT)
        # The only worker was let go when the guest went: another guest's escape runs at once.
        second = RawGuest(address, name="second")
        try:
            hp = second.create_process()
            second.open_adapter(0)
            dev = second.create_device(0, hp)
            assert second.escape(0, hp, dev, Op.SLEEP, struct.pack("<I", 0)).status == OK
        finally:
            second.close()


def test_a_request_queued_behind_a_destroyed_device_does_not_run(host: Host,
                                                                  guest: RawGuest) -> None:
    hp = guest.create_process()
    guest.open_adapter(0)
    dev = guest.create_device(0, hp)
    pinned = host.census()["partitions"][0]["pinned_bytes"]
    sleep = guest.start_sleep(0, hp, dev)
    wait_until(lambda: host_process(host, hp)["running_jobs"] == 1)
    body = Escape(guest.adapter_handles[0], dev, 0, 0, 0,
                  EscapeHeader(Op.SHMEM_CREATE, length=1 << 20).pack() + bytes(8))
    region = guest.start_request(guest.vch(0), guest.vpayload(0, VgpuCommand.ESCAPE, hp,
                                                              body.pack()))
    assert guest.destroy_device(0, hp, dev) == OK
    assert escape_status(sleep.result(TIMEOUT)).status == NTSTATUS.STATUS_CANCELLED
    # Checked when it arrived, the region was to be made for a device that has gone since:
    # it is not made, and nothing is charged for it.
    assert NtStatusReturn.unpack(region.result(TIMEOUT)).status == NTSTATUS.STATUS_INVALID_HANDLE
    part = host.census()["partitions"][0]
    assert part["totals"]["regions"] == 0
    assert part["pinned_bytes"] < pinned + (1 << 20)


def test_worker_threads_are_shared_fairly(sock_dir: str) -> None:
    config = HostConfig(adapters=1, backend_workers=8, max_jobs_per_process=2,
                        max_jobs_per_partition=3)
    with Host(config) as host:
        address = host.listen(os.path.join(sock_dir, "f.sock"))
        g, other = RawGuest(address, name="busy"), RawGuest(address, name="other")
        try:
            a, b, c = (g.create_process(pid=pid) for pid in (1, 2, 3))
            g.open_adapter(0)
            devs_a = [g.create_device(0, a) for _ in range(4)]
            dev_b, dev_c = g.create_device(0, b), g.create_device(0, c)
            sleeps = [g.start_sleep(0, a, d) for d in devs_a]  # four lanes, one process
            # The process gets two workers; its other jobs wait for them.
            wait_until(lambda: host_process(host, a)["jobs"] == 4)
            wait_until(lambda: host_process(host, a)["running_jobs"] == 2)
            assert host_process(host, a)["jobs"] == 4
            # Another process gets one more: the guest's share of three is taken.
            sleep_b = g.start_sleep(0, b, dev_b)
            wait_until(lambda: host_process(host, b)["running_jobs"] == 1)
            quick_c = g.start_request(g.vch(0), g.escape_payload(
                0, c, dev_c, Op.SLEEP, struct.pack("<I", 0)))
            wait_until(lambda: host_process(host, c)["jobs"] == 1)
            part = min(host.census()["partitions"], key=lambda p: p["id"])
            assert part["running_jobs"] == 3
            assert host_process(host, c)["running_jobs"] == 0
            # Another guest has workers of its own left: it is served at once.
            hp = other.create_process()
            other.open_adapter(0)
            dev = other.create_device(0, hp)
            assert other.escape(0, hp, dev, Op.SLEEP, struct.pack("<I", 0)).status == OK
            # When the busy process goes, its workers come back and the waiting job runs.
            assert g.destroy_process(a) == OK
            for sleep in sleeps:
                reply = sleep.result(TIMEOUT)
                assert len(reply) == 4 or escape_status(reply).status == (
                    NTSTATUS.STATUS_CANCELLED)
            assert escape_status(quick_c.result(TIMEOUT)).status == OK
            assert g.destroy_process(b) == OK
            assert escape_status(sleep_b.result(TIMEOUT)).status == NTSTATUS.STATUS_CANCELLED
            wait_until(lambda: all(p["running_jobs"] == 0
                                   for p in host.census()["partitions"]))
        finally:
            g.close()
            other.close()


def test_a_guest_may_keep_only_so_many_requests_waiting(sock_dir: str) -> None:
    config = HostConfig(adapters=1, max_pending_calls=3, max_pending_calls_per_process=2)
    with Host(config) as host:
        g = RawGuest(host.listen(os.path.join(sock_dir, "p.sock")))
        try:
            a, b = g.create_process(pid=1), g.create_process(pid=2)
            g.open_adapter(0)
            dev, dev_b = g.create_device(0, a), g.create_device(0, b)

            def ping(hp: int, device: int) -> bytes:
                return g.request(g.vch(0), g.escape_payload(0, hp, device, Op.PING))

            sleep = g.start_sleep(0, a, dev)
            queued = g.start_request(g.vch(0), g.escape_payload(0, a, dev, Op.PING))
            wait_until(lambda: host_process(host, a)["pending_calls"] == 2)
            # The process's share is taken: its next long request is refused at once...
            assert NtStatusReturn.unpack(ping(a, dev)).status == NTSTATUS.STATUS_NO_MEMORY
            # ... another process still has room, until the guest's is taken too.
            sleep_b = g.start_sleep(0, b, dev_b)
            wait_until(lambda: host.census()["partitions"][0]["pending_calls"] == 3)
            assert NtStatusReturn.unpack(ping(b, dev_b)).status == NTSTATUS.STATUS_NO_MEMORY
            assert g.create_device(0, a)  # quick commands still run
            assert g.destroy_device(0, a, dev) == OK
            assert g.destroy_device(0, b, dev_b) == OK
            for long in (sleep, sleep_b):
                assert escape_status(long.result(TIMEOUT)).status == NTSTATUS.STATUS_CANCELLED
            queued.result(TIMEOUT)
            wait_until(lambda: host.census()["partitions"][0]["pending_calls"] == 0)
            assert host.census()["partitions"][0]["pending_bytes"] == 0
            assert host_process(host, a)["pending_calls"] == 0
            dev = g.create_device(0, a)
            assert g.escape(0, a, dev, Op.PING).status == OK
        finally:
            g.close()


# ---- queries ------------------------------------------------------------------------------------


def test_query_adapter_info(host: Host, guest: RawGuest) -> None:
    hp = guest.create_process()
    guest.open_adapter(0)
    desc = host.adapters[0].description

    def q(qtype: int, cls: type, process: int = 0, extra: int = 0, fill: bytes = b"\xee"
          ):  # type: ignore[no-untyped-def]
        size = ctypes.sizeof(cls) + extra
        r = guest.query_info(0, qtype, fill * size, process)
        assert len(r.data) == size
        assert r.status == OK, hex(r.status)
        if extra:
            assert r.data[-extra:] == b"\xee" * extra  # only the payload is overwritten
        return cls.from_buffer_copy(r.data[: ctypes.sizeof(cls)])

    for qtype in (Q.KMTQAITYPE_ADAPTERTYPE, Q.KMTQAITYPE_ADAPTERTYPE_RENDER):
        t = q(qtype, wddm.D3DKMT_ADAPTERTYPE, hp)
        assert not t.RenderSupported and t.SoftwareDevice and t.ComputeOnly
        assert not t.DisplaySupported and not t.Paravirtualized
    seg = q(Q.KMTQAITYPE_GETSEGMENTSIZE, wddm.D3DKMT_SEGMENTSIZEINFO, extra=8)
    assert seg.DedicatedVideoMemorySize == desc.dedicated_video_memory == 1024 << 20
    assert seg.SharedSystemMemorySize == desc.shared_system_memory
    text = q(Q.KMTQAITYPE_DRIVER_DESCRIPTION, wddm.D3DKMT_DRIVER_DESCRIPTION)
    assert wddm.decode_utf16z(text.DriverDescription) == desc.driver_description
    ids = q(Q.KMTQAITYPE_PHYSICALADAPTERDEVICEIDS, wddm.D3DKMT_QUERY_DEVICE_IDS, fill=b"\0")
    assert (ids.DeviceIds.VendorID, ids.DeviceIds.DeviceID) == (desc.vendor_id, desc.device_id)
    caps = q(Q.KMTQAITYPE_WDDM_2_7_CAPS, wddm.D3DKMT_WDDM_2_7_CAPS)
    assert caps.Value == 0
    addr = q(Q.KMTQAITYPE_ADAPTERADDRESS, wddm.D3DKMT_ADAPTERADDRESS)
    assert (addr.BusNumber, addr.DeviceNumber, addr.FunctionNumber) == (1, 0, 0)
    assert q(Q.KMTQAITYPE_PHYSICALADAPTERCOUNT, wddm.D3DKMT_PHYSICAL_ADAPTER_COUNT).Count == 1

    r = guest.query_info(0, Q.KMTQAITYPE_UMDRIVERPRIVATE, bytes(200))
    assert r.status == OK and len(r.data) == 200
    blob = parse_umd_private_blob(r.data)
    assert blob == {"node_count": 1, "compute_only": True, "software_device": True,
                    "command_formats": ("pydxg-soft-v1",)}

    # Too small, wrong physical adapter, unknown and unsupported types.
    r = guest.query_info(0, Q.KMTQAITYPE_GETSEGMENTSIZE, b"\x01" * 23)
    assert (r.status, r.data) == (NTSTATUS.STATUS_BUFFER_TOO_SMALL, b"\x01" * 23)
    r = guest.query_info(0, Q.KMTQAITYPE_UMDRIVERPRIVATE, bytes(8))
    assert r.status == NTSTATUS.STATUS_BUFFER_TOO_SMALL
    r = guest.query_info(0, Q.KMTQAITYPE_ADAPTERTYPE, b"")
    assert (r.status, r.data) == (NTSTATUS.STATUS_BUFFER_TOO_SMALL, b"")
    r = guest.query_info(0, Q.KMTQAITYPE_PHYSICALADAPTERDEVICEIDS, struct.pack("<I", 1) + bytes(24))
    assert r.status == NTSTATUS.STATUS_INVALID_PARAMETER and len(r.data) == 28
    r = guest.query_info(0, Q.KMTQAITYPE_MODELIST, bytes(64))
    assert (r.status, r.data) == (NTSTATUS.STATUS_NOT_SUPPORTED, bytes(64))
    r = guest.query_info(0, 0xDEAD, bytes(4))
    assert r.status == NTSTATUS.STATUS_INVALID_PARAMETER and r.data == bytes(4)
    r = guest.query_info(0, Q.KMTQAITYPE_ADAPTERTYPE, bytes(4), hprocess=0x7777)
    assert r.status == NTSTATUS.STATUS_INVALID_HANDLE and r.data == bytes(4)


def test_feature_and_clock_queries(host: Host, guest: RawGuest) -> None:
    hp = guest.create_process()
    handle = guest.open_adapter(1).host_adapter_handle

    def feature(fid: int) -> IsFeatureEnabledReturn:
        return IsFeatureEnabledReturn.unpack(
            guest.v(1, VgpuCommand.ISFEATUREENABLED, 0, IsFeatureEnabled(fid).pack()))

    for fid in (0, 32, 33):
        r = feature(fid)
        assert r.status == OK and r.result_bits == 0b10  # known, not enabled
    assert feature(7).result_bits == 0 and feature(7).status == OK

    def clock(adapter_handle: int, node: int = 0, process: int = hp) -> QueryClockCalibrationReturn:
        args = d3dkmt_queryclockcalibration()
        args.adapter.v = adapter_handle
        args.node_ordinal = node
        return QueryClockCalibrationReturn.unpack(
            guest.v(1, VgpuCommand.QUERYCLOCKCALIBRATION, process, bytes(args), True))

    before = time.monotonic_ns()
    r = clock(handle)
    after = time.monotonic_ns()
    assert r.status == OK
    data = dxgk_gpuclockdata.from_buffer_copy(r.clock_data)
    assert data.gpu_frequency == 1_000_000_000
    assert before <= data.gpu_clock_counter <= data.cpu_clock_counter <= after
    assert bytes(data.flags) == bytes(4)
    assert clock(handle, node=1).status == NTSTATUS.STATUS_INVALID_PARAMETER
    assert clock(handle + 0x40).status == NTSTATUS.STATUS_INVALID_HANDLE
    assert clock(handle, process=0).status == NTSTATUS.STATUS_INVALID_HANDLE
    assert clock(handle, process=0).clock_data == bytes(28)


def test_device_state_and_host_notifications(host: Host, guest: RawGuest) -> None:
    hp = guest.create_process()
    guest.open_adapter(0)
    dev = guest.create_device(0, hp, cookie=0xFFFF9999AAAA0000)
    r = guest.device_state(0, hp, dev)
    assert r.status == OK
    args = d3dkmt_getdevicestate.from_buffer_copy(r.args)
    assert (args.device.v, args.state_type, args.execution_state) == (dev, 1, 1)
    for other in (3, 5):  # reset, page fault: nothing to report
        r = guest.device_state(0, hp, dev, other)
        assert r.status == OK and r.args[8:] == bytes(GETDEVICESTATE_ARGS_SIZE - 8)
    assert guest.device_state(0, hp, dev, 2).status == NTSTATUS.STATUS_NOT_SUPPORTED
    assert guest.device_state(0, hp, dev, 99).status == NTSTATUS.STATUS_INVALID_PARAMETER

    (partition,) = host.partitions()
    assert partition.set_device_execution_state(dev, 3) is True  # HUNG
    wait_until(lambda: len(guest.driver.notifications) == 1)
    msg = decode_host_to_vm(guest.driver.notifications[0])
    assert msg.command == HostToVmCommand.SETGUESTDATA
    data = SetGuestData.unpack(msg.body)
    assert (data.guest_pointer, data.data32, data.data_type) == (0xFFFF9999AAAA0000, 1, 0)
    args = d3dkmt_getdevicestate.from_buffer_copy(guest.device_state(0, hp, dev).args)
    assert args.execution_state == 3
    assert partition.set_device_execution_state(dev, 3) is False  # no change, no message
    with pytest.raises(KeyError):
        partition.set_device_execution_state(0x40000000 | (999 << 6), 1)

    assert partition.signal_guest_event(77, process_id=4242)
    wait_until(lambda: len(guest.driver.notifications) == 2)
    msg = decode_host_to_vm(guest.driver.notifications[1])
    assert msg.command == HostToVmCommand.SIGNALGUESTEVENT
    assert SignalGuestEvent.unpack(msg.body).event == 77


# ---- removal, disconnect, isolation ---------------------------------------------------------------


def test_remove_adapter(host: Host, guest: RawGuest, sock_dir: str) -> None:
    hp = guest.create_process()
    guest.open_adapter(1)
    dev = guest.create_device(1, hp)
    ctx = guest.create_context(1, hp, dev).context
    victim = host.adapters[1]

    host.remove_adapter(1)
    wait_until(lambda: guest.driver.removed == [victim.instance_guid])
    assert list(guest.driver.vgpus) == [host.adapters[0].host_vgpu_luid]
    REMOVED = NTSTATUS.STATUS_DEVICE_REMOVED
    assert guest.create_device(1, hp) == 0
    assert guest.device_state(1, hp, dev).status == REMOVED
    assert guest.query_info(1, Q.KMTQAITYPE_ADAPTERTYPE, bytes(4)).status == REMOVED
    feature = guest.v(1, VgpuCommand.ISFEATUREENABLED, 0, IsFeatureEnabled(0).pack(), True)
    assert IsFeatureEnabledReturn.unpack(feature).status == REMOVED
    assert guest.create_context(1, hp, dev).context == 0
    # Adapter 0 is unaffected.
    guest.open_adapter(0)
    assert guest.create_device(0, hp)
    # Teardown still releases what the guest holds.
    assert guest.destroy_context(1, hp, ctx) == OK
    assert guest.destroy_device(1, hp, dev) == OK
    assert host.census()["adapters"][1]["removed"] is True

    late = RawGuest(host.addresses[0], name="late")  # a new guest is not offered the adapter
    try:
        wait_until(lambda: len(late.driver.vgpus) == 1)
        assert late.vgpu_luids == [host.adapters[0].host_vgpu_luid]
    finally:
        late.close()


def test_guest_disconnect_drops_everything(host: Host) -> None:
    g = RawGuest(host.addresses[0])
    wait_until(lambda: len(g.driver.vgpus) == 2)
    for pid in (10, 11):
        hp = g.create_process(pid=pid)
        for i in (0, 1):
            g.open_adapter(i)
            dev = g.create_device(i, hp)
            g.create_context(i, hp, dev)
    assert objects(host) == (2, 4, 4)
    (partition,) = host.partitions()
    g.close()
    assert host.wait_for(lambda: totals(host)["partitions"] == 0, TIMEOUT)
    assert partition.closed
    assert partition.census()["totals"] == {"processes": 0, "devices": 0, "contexts": 0,
                                            "regions": 0, "adapter_handles": 0, "handles": 0}
    assert totals(host)["handles"] == 0


def test_two_hosts_do_not_interfere(sock_dir: str) -> None:
    a = Host(HostConfig(adapters=1, name="host-a"))
    b = Host(HostConfig(adapters=2, name="host-b"))
    ga = gb = None
    try:
        ga = RawGuest(a.listen(os.path.join(sock_dir, "a.sock")), name="ga")
        gb = RawGuest(b.listen(os.path.join(sock_dir, "b.sock")), name="gb")
        wait_until(lambda: len(ga.driver.vgpus) == 1 and len(gb.driver.vgpus) == 2)
        assert ga.bus.host_name == "host-a" and gb.bus.host_name == "host-b"
        assert not {x.guest_luid for x in a.adapters} & {x.guest_luid for x in b.adapters}

        pa = ga.create_process(name="on-a")
        ga.open_adapter(0)
        ga.create_device(0, pa)
        pb = gb.create_process(name="on-b")
        assert objects(a) == (1, 1, 0) and objects(b) == (1, 0, 0)
        # a's adapter LUID means nothing to b
        reply = gb.v(0, VgpuCommand.CREATEDEVICE, pb, CreateDevice(0, 0, 1).pack(),
                     via_global=True, luid=ga.vgpu_luids[0])
        assert HandleReturn.unpack(reply).handle == 0

        b.remove_adapter(0)
        wait_until(lambda: len(gb.driver.vgpus) == 1)
        assert len(ga.driver.vgpus) == 1 and not a.adapters[0].removed
        assert ga.open_adapter(0).status == OK

        a.close()
        wait_until(lambda: not ga.connected)
        assert gb.create_process() and objects(b) == (2, 0, 0)
    finally:
        for g in (ga, gb):
            if g is not None:
                g.close()
        a.close()
        b.close()


def test_tcp_listener(sock_dir: str) -> None:
    with Host(HostConfig(adapters=1)) as host:
        addr = host.listen("tcp:127.0.0.1:0")
        assert addr.startswith("tcp:127.0.0.1:") and not addr.endswith(":0")
        g = RawGuest(addr)
        try:
            wait_until(lambda: len(g.driver.vgpus) == 1)
            hp = g.create_process()
            g.open_adapter(0)
            dev = g.create_device(0, hp)
            assert g.create_context(0, hp, dev).context
            assert objects(host) == (1, 1, 1)
            assert g.destroy_process(hp) == OK
            assert objects(host) == (0, 0, 0)
        finally:
            g.close()


def test_close_unloads_guests_and_unlinks_the_socket(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "c.sock")
    host = Host(HostConfig(adapters=1))
    host.listen(path)
    g = RawGuest(path)
    try:
        wait_until(lambda: len(g.driver.vgpus) == 1)
        g.create_process()
        (partition,) = host.partitions()
        host.close()
        assert not os.path.exists(path)
        wait_until(lambda: not g.connected)  # the host said UNLOAD and hung up
        assert partition.closed and host.closed
        with pytest.raises(RuntimeError):
            host.listen(path)
    finally:
        g.close()
        host.close()


# ---- the handle table on its own ---------------------------------------------------------------


def test_handle_table_format_reuse_and_types() -> None:
    t = HandleTable(reuse_delay=4)
    h = t.alloc(HandleType.DEVICE, "dev")
    assert h == 0x40000040 and t.get(h, HandleType.DEVICE) == "dev"
    assert t.get(h, HandleType.CONTEXT) is None and t.get(h | 1) is None and t.get(0) is None
    assert t.free(h) == "dev" and t.get(h) is None and t.free(h) is None
    fresh = [t.alloc(HandleType.CONTEXT, i) for i in range(5)]
    assert handle_index(h) not in [handle_index(x) for x in fresh]
    for x in fresh:
        t.free(x)
    again = [t.alloc(HandleType.CONTEXT, i) for i in range(3)]
    reused = [x for x in again if handle_index(x) == handle_index(h)]
    assert reused and handle_unique(reused[0]) == 2  # same slot, next generation
    small = HandleTable(capacity=2)
    small.alloc(HandleType.PROCESS, 1)
    small.alloc(HandleType.PROCESS, 2)
    with pytest.raises(Exception, match="capacity"):
        small.alloc(HandleType.PROCESS, 3)


def test_partition_capacity_limits_a_greedy_guest(sock_dir: str) -> None:
    with Host(HostConfig(adapters=1, max_handles_per_partition=3)) as host:
        g = RawGuest(host.listen(os.path.join(sock_dir, "cap.sock")))
        try:
            wait_until(lambda: len(g.driver.vgpus) == 1)
            hp = g.create_process()
            g.open_adapter(0)
            assert g.create_device(0, hp)
            assert g.create_device(0, hp) == 0  # table full: a failure reply, not a crash
            assert g.create_process() == 0
        finally:
            g.close()
