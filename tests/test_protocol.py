"""dxg.protocol: bytes in, messages out; hostile bytes raise ProtocolError and nothing else."""

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dxg.protocol import bus, framing, headers
from dxg.protocol import messages as m
from dxg.protocol.commands import GlobalCommand, HostToVmCommand, VgpuCommand
from dxg.protocol.errors import ProtocolError
from dxg.protocol.guids import DXGK_VGPU_GUID, guid_to_luid, vgpu_instance_guid


def test_frames_round_trip_in_pieces():
    data = b"".join(
        framing.encode_frame(i, framing.VM_PKT_DATA_INBAND, bytes([i]) * i, trans_id=i)
        for i in range(1, 40)
    )
    r = framing.FrameReader()
    got = []
    for k in range(0, len(data), 7):
        r.feed(data[k : k + 7])
        got.extend(r.frames())
    assert [f.relid for f in got] == list(range(1, 40))
    assert all(f.payload == bytes([f.relid]) * f.relid for f in got)
    assert r.pending_bytes == 0


def test_frame_cap_is_128k():
    framing.encode_frame(1, framing.VM_PKT_DATA_INBAND, b"x" * framing.DXG_MAX_VM_BUS_PACKET_SIZE)
    with pytest.raises(ProtocolError):
        framing.encode_frame(1, framing.VM_PKT_DATA_INBAND,
                             b"x" * (framing.DXG_MAX_VM_BUS_PACKET_SIZE + 1))
    r = framing.FrameReader()
    r.feed(framing.FRAME_HEADER.pack(framing.MAGIC, 1 << 20, 1, 6, 0, 0))
    with pytest.raises(ProtocolError):
        r.frames()


@pytest.mark.parametrize("bad", [
    framing.FRAME_HEADER.pack(0xDEADBEEF, 0, 1, 6, 0, 0),
    framing.FRAME_HEADER.pack(framing.MAGIC, 0, 1, 99, 0, 0),
])
def test_bad_frames_rejected(bad):
    r = framing.FrameReader()
    r.feed(bad)
    with pytest.raises(ProtocolError):
        r.frames()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_frame_reader_never_crashes(data):
    r = framing.FrameReader()
    r.feed(data)
    try:
        r.frames()
    except ProtocolError:
        pass


def test_bus_messages_round_trip():
    offer = bus.Offer(3, DXGK_VGPU_GUID, vgpu_instance_guid(0x1234_5678_9ABC), 0, 40, 1, 77,
                      0x1414, 0x8A)
    for msg in (bus.Hello((bus.BUS_VERSION_1_0,), "g"), bus.VersionResponse(True, 1, "h"),
                offer, bus.Rescind(3), bus.AllOffersDelivered(), bus.OpenChannel(3, 1, 40),
                bus.OpenResult(3, -22), bus.CloseChannel(3), bus.Unload()):
        assert bus.decode_bus_message(bus.encode_bus_message(msg)) == msg


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_bus_decoder_never_crashes(data):
    try:
        bus.decode_bus_message(data)
    except ProtocolError:
        pass


def test_version_negotiation():
    assert bus.negotiate_bus_version((0x0009_0000, bus.BUS_VERSION_1_0)) == bus.BUS_VERSION_1_0
    assert bus.negotiate_bus_version((0x0009_0000,)) is None


def test_luid_is_first_8_bytes_of_instance_guid():
    luid = 0x0000_0001_8000_1234
    g = vgpu_instance_guid(luid)
    assert guid_to_luid(g) == luid
    assert g.bytes_le[:8] == luid.to_bytes(8, "little")
    assert isinstance(g, uuid.UUID)


def test_envelope_layouts_match_the_real_driver():
    body = m.CreateDevice(flags=1, cdd_device=0, error_code=0x1122).pack()
    assert len(body) + headers.CMD_HEADER_SIZE == 40  # sizeof(dxgkvmb_command_createdevice)
    raw = headers.encode_vgpu(VgpuCommand.CREATEDEVICE, 0x40000040, 0xAB, body, async_msg=True)
    assert raw[:4] == (16).to_bytes(4, "little")
    msg = headers.decode_guest(raw)
    assert msg.command == VgpuCommand.CREATEDEVICE and msg.async_msg and msg.vgpu_luid == 0xAB
    assert msg.process == 0x40000040 and m.CreateDevice.unpack(msg.body).error_code == 0x1122
    g = headers.decode_guest(headers.encode_global(GlobalCommand.CREATEPROCESS, 0,
                                                   m.CreateProcess(1, 2, "x").pack()))
    assert g.is_global and len(g.body) + 24 == 568  # sizeof(dxgkvmb_command_createprocess)
    assert m.GetInternalAdapterInfoReturn._S.size == 712
    assert m.SetGuestData._S.size + 24 == 48 and m.SignalGuestEvent._S.size + 24 == 48
    h = headers.decode_host_to_vm(headers.encode_host_to_vm(
        HostToVmCommand.SETGUESTDATA, 0, m.SetGuestData(5, 1, 0).pack()))
    assert h.command == HostToVmCommand.SETGUESTDATA


@pytest.mark.parametrize("raw", [
    b"",
    b"\x10" + b"\0" * 30,
    headers.EXT_HEADER.pack(16, 0, 0) + headers.CMD_HEADER.pack(0, 0, 1, 9999),
    headers.EXT_HEADER.pack(16, 0, 0) + headers.CMD_HEADER.pack(0, 0, 0, 9999),
    headers.EXT_HEADER.pack(16, 0, 0) + headers.CMD_HEADER.pack(0, 0, 7, 0),
    headers.EXT_HEADER.pack(8, 0, 0) + headers.CMD_HEADER.pack(0, 0, 0, 0),
])
def test_hostile_envelopes_rejected(raw):
    with pytest.raises(ProtocolError):
        headers.decode_guest(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=100))
def test_message_decoders_never_crash(data):
    for cls in (m.CreateProcess, m.OpenAdapter, m.QueryAdapterInfo, m.CreateContextVirtual,
                m.GetInternalAdapterInfoReturn, m.StatusAndData, m.CreateDevice,
                m.GetDeviceStateReturn, m.IsFeatureEnabledReturn,
                m.QueryClockCalibrationReturn):
        try:
            cls.unpack(data)
        except ProtocolError:
            pass


def test_variable_bodies_check_their_declared_size():
    ok = m.QueryAdapterInfo(15, b"\0" * 4).pack()
    assert m.QueryAdapterInfo.unpack(ok).private_data == b"\0" * 4
    with pytest.raises(ProtocolError):
        m.QueryAdapterInfo.unpack(ok[:-1])
    cc = m.CreateContextVirtual(0, 1, 0, 0, 0, 0, b"abc").pack()
    with pytest.raises(ProtocolError):
        m.CreateContextVirtual.unpack(cc + b"x")
