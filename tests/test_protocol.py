"""dxg.protocol: bytes in, messages out; hostile bytes raise ProtocolError and nothing else.

The command table (`dxg.protocol.table.COMMANDS`) is covered entry by entry: every request and
reply type round-trips, hostile bodies only ever raise ProtocolError, every failure reply has the
shape the guest expects, and a real host answers every command sent with a hostile body."""

import os
import random
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dxg.host import Host, HostConfig
from dxg.protocol import bus, framing, headers
from dxg.protocol import messages as m
from dxg.protocol.commands import GlobalCommand, HostToVmCommand, VgpuCommand
from dxg.protocol.errors import ProtocolError
from dxg.protocol.guids import DXGK_VGPU_GUID, guid_to_luid, vgpu_instance_guid
from dxg.protocol.table import (
    COMMANDS,
    CommandSpec,
    Route,
    fail_empty,
    fail_status,
    render_command_table,
    spec_of,
)
from dxg.uapi.ntstatus import NTSTATUS, nt_success

ROOT = Path(__file__).resolve().parents[1]

# ---- framing -----------------------------------------------------------------------------------


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
    assert all(f.trans_id == f.relid and f.fd_count == 0 and not f.has_bulk for f in got)
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


@pytest.mark.parametrize("fds", [0, 1, 7, framing.MAX_FRAME_FDS])
@pytest.mark.parametrize("wants", [False, True])
@pytest.mark.parametrize("bulk", [False, True])
def test_flags_carry_completion_bulk_and_descriptor_count(fds, wants, bulk):
    flags = framing.frame_flags(wants, bulk, fds)
    raw = framing.encode_frame(5, framing.VM_PKT_DATA_INBAND, b"p", 9, flags)
    assert framing.FRAME_HEADER.unpack_from(raw)[4] == flags
    assert flags & framing.FLAG_FD_MASK == fds << framing.FLAG_FD_SHIFT
    r = framing.FrameReader()
    r.feed(raw)
    (frame,) = r.frames()
    assert (frame.fd_count, frame.wants_completion, frame.has_bulk) == (fds, wants, bulk)


def test_descriptor_count_is_capped():
    with pytest.raises(ProtocolError):
        framing.frame_flags(fds=framing.MAX_FRAME_FDS + 1)
    with pytest.raises(ProtocolError):
        framing.frame_flags(fds=-1)
    r = framing.FrameReader()
    r.feed(framing.FRAME_HEADER.pack(framing.MAGIC, 0, 1, 6,
                                     (framing.MAX_FRAME_FDS + 1) << framing.FLAG_FD_SHIFT, 0))
    with pytest.raises(ProtocolError, match="flags"):
        r.frames()


@pytest.mark.parametrize("size", [1, framing.DXG_MAX_VM_BUS_PACKET_SIZE,
                                  framing.DXG_MAX_VM_BUS_PACKET_SIZE + 1, 5 << 17 | 3])
def test_bulk_chunks_carry_any_length(size):
    data = bytes(random.Random(size).randbytes(size))
    chunks = framing.encode_bulk(4, data)
    assert len(chunks) == -(-size // framing.DXG_MAX_VM_BUS_PACKET_SIZE)
    r = framing.FrameReader()
    r.feed(b"".join(chunks))
    frames = r.frames()
    assert all(f.packet_type == framing.VM_PKT_BULK and f.relid == 4 and f.flags == 0
               for f in frames)
    assert all(len(f.payload) <= framing.DXG_MAX_VM_BUS_PACKET_SIZE for f in frames)
    assert b"".join(f.payload for f in frames) == data
    assert framing.encode_bulk(4, b"") == []


@pytest.mark.parametrize("bad", [
    framing.FRAME_HEADER.pack(0xDEADBEEF, 0, 1, 6, 0, 0),  # magic
    framing.FRAME_HEADER.pack(framing.MAGIC, 0, 1, 99, 0, 0),  # packet type
    framing.FRAME_HEADER.pack(framing.MAGIC, 0, 1, 6, 0x4, 0),  # unknown flag bit
    framing.FRAME_HEADER.pack(framing.MAGIC, 0, 1, 6, 0x80, 0),  # unknown flag bit
    framing.FRAME_HEADER.pack(framing.MAGIC, 0, 1, 6, 0x1_0000 >> 1, 0),  # past the fd count
])
def test_bad_frames_rejected(bad):
    r = framing.FrameReader()
    r.feed(bad)
    with pytest.raises(ProtocolError):
        r.frames()


@pytest.mark.parametrize("flags", [0x4, 0x8, 0x10, 0x80, 0x1FF])
def test_encoder_rejects_unknown_flags(flags):
    with pytest.raises(ProtocolError, match="flags"):
        framing.encode_frame(1, framing.VM_PKT_DATA_INBAND, b"", 0, flags)
    with pytest.raises(ProtocolError, match="packet type"):
        framing.encode_frame(1, 7, b"")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_frame_reader_never_crashes(data):
    r = framing.FrameReader()
    r.feed(data)
    try:
        r.frames()
    except ProtocolError:
        pass


# ---- bus messages ------------------------------------------------------------------------------


def test_bus_messages_round_trip():
    offer = bus.Offer(3, DXGK_VGPU_GUID, vgpu_instance_guid(0x1234_5678_9ABC), 0, 40, 1, 77,
                      0x1414, 0x8A)
    for msg in (bus.Hello((bus.BUS_VERSION_2_0,), "g"),
                bus.Hello((0x0003_0000, bus.BUS_VERSION_2_0), "two versions"),
                bus.VersionResponse(True, bus.BUS_VERSION_2_0, "h"),
                bus.VersionResponse(False, 0, ""),
                offer, bus.Rescind(3), bus.AllOffersDelivered(), bus.OpenChannel(3, 1, 40),
                bus.OpenResult(3, -22), bus.CloseChannel(3), bus.Unload(),
                bus.Ping(0), bus.Ping(2**64 - 1), bus.Pong(0xC0FFEE),
                bus.Refuse("host x serves 64 guests, its limit (max_guests)"), bus.Refuse("")):
        assert bus.decode_bus_message(bus.encode_bus_message(msg)) == msg


def test_refuse_reason_is_bounded():
    long = bus.Refuse("why" * 200)
    decoded = bus.decode_bus_message(bus.encode_bus_message(long))
    assert isinstance(decoded, bus.Refuse) and len(decoded.reason) == 256
    with pytest.raises(ProtocolError):
        bus.decode_bus_message(struct.pack("<I", bus.BusMsg.REFUSE) + b"x" * 257)
    # undecodable UTF-8 is replaced, not an error
    text = bus.decode_bus_message(struct.pack("<I", bus.BusMsg.REFUSE) + b"\xff\xfe")
    assert isinstance(text, bus.Refuse)


@pytest.mark.parametrize("raw", [
    b"", b"\x01\x00", struct.pack("<I", 99),
    struct.pack("<I", bus.BusMsg.PING) + b"\0" * 7,
    struct.pack("<I", bus.BusMsg.PONG) + b"\0" * 9,
    struct.pack("<I", bus.BusMsg.OFFER) + bytes(bus.Offer._S.size),  # relid 0 is the bus's
    struct.pack("<I", bus.BusMsg.HELLO) + struct.pack("<I64s", 0, b""),  # no versions
    struct.pack("<I", bus.BusMsg.HELLO) + struct.pack("<I64s", 17, b"") + bytes(68),
    struct.pack("<I", bus.BusMsg.UNLOAD) + b"x",
])
def test_hostile_bus_messages_rejected(raw):
    with pytest.raises(ProtocolError):
        bus.decode_bus_message(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_bus_decoder_never_crashes(data):
    try:
        bus.decode_bus_message(data)
    except ProtocolError:
        pass


def test_version_negotiation():
    assert bus.BUS_VERSIONS_SUPPORTED == (bus.BUS_VERSION_2_0,) == (0x0002_0000,)
    assert bus.negotiate_bus_version((0x0009_0000, bus.BUS_VERSION_2_0)) == bus.BUS_VERSION_2_0
    assert bus.negotiate_bus_version((0x0009_0000,)) is None
    assert bus.negotiate_bus_version((0x0001_0000,)) is None  # 1.0 carried no descriptors
    with pytest.raises(ProtocolError):
        bus.Hello((), "none").body()


def test_luid_is_first_8_bytes_of_instance_guid():
    luid = 0x0000_0001_8000_1234
    g = vgpu_instance_guid(luid)
    assert guid_to_luid(g) == luid
    assert g.bytes_le[:8] == luid.to_bytes(8, "little")
    assert isinstance(g, uuid.UUID)


# ---- envelopes ---------------------------------------------------------------------------------


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
    headers.EXT_HEADER.pack(16, 0, 0) + headers.CMD_HEADER.pack(0, 0, 0x201, 0),  # bit 9
    headers.EXT_HEADER.pack(16, 0, 0) + headers.CMD_HEADER.pack(0, 0, 0x101, 1000),  # async vm
])
def test_hostile_envelopes_rejected(raw):
    with pytest.raises(ProtocolError):
        headers.decode_guest(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=100))
def test_envelope_decoders_never_crash(data):
    for decode in (headers.decode_guest, headers.decode_host_to_vm):
        try:
            decode(data)
        except ProtocolError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=100))
def test_message_decoders_never_crash(data):
    for cls in (m.CreateProcess, m.OpenAdapter, m.QueryAdapterInfo, m.CreateContextVirtual,
                m.GetInternalAdapterInfoReturn, m.StatusAndData, m.CreateDevice,
                m.GetDeviceStateReturn, m.IsFeatureEnabledReturn, m.Escape, m.JsonReply,
                m.QueryClockCalibrationReturn, m.SignalGuestEvent, m.SetGuestData):
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
    esc = m.Escape(1, 2, 0, 0, 0, b"priv", b"attached").pack()
    assert m.Escape.unpack(esc) == m.Escape(1, 2, 0, 0, 0, b"priv", b"attached")
    for bad in (esc[:-1], esc + b"x"):
        with pytest.raises(ProtocolError):
            m.Escape.unpack(bad)


# ---- the command table: every entry ------------------------------------------------------------

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 2**64 - 1)
blob = st.binary(max_size=300)
# Text that survives the UTF-16 fields: the Basic Multilingual Plane, no NUL, no surrogates.
wtext = st.text(st.characters(max_codepoint=0xFFFF, blacklist_categories=("Cs",),
                              blacklist_characters="\0"), max_size=40)

# A strategy of valid values for every body type the table names.
VALID: dict[type, st.SearchStrategy] = {
    m.Empty: st.just(m.Empty()),
    m.NtStatusReturn: st.builds(m.NtStatusReturn, u32),
    m.CreateProcess: st.builds(m.CreateProcess, u64, u64, wtext, st.booleans()),
    m.CreateProcessReturn: st.builds(m.CreateProcessReturn, u32),
    m.SetIoSpaceRegion: st.builds(m.SetIoSpaceRegion, u64, u64, u32),
    m.JsonReply: st.builds(lambda b: m.JsonReply(b"{" + b), blob),
    m.OpenAdapter: st.builds(m.OpenAdapter, u32, u32, u32, u32),
    m.OpenAdapterReturn: st.builds(m.OpenAdapterReturn, u32, u32, u32, u32),
    m.CloseAdapter: st.builds(m.CloseAdapter, u32),
    m.GetInternalAdapterInfoReturn: st.builds(m.GetInternalAdapterInfoReturn, u32, u32, u32,
                                              u32, u64, wtext, wtext, u64),
    m.QueryAdapterInfo: st.builds(m.QueryAdapterInfo, u32, blob),
    m.StatusAndData: st.builds(m.StatusAndData, u32, blob),
    m.CreateDevice: st.builds(m.CreateDevice, u32, u8, u64),
    m.HandleReturn: st.builds(m.HandleReturn, u32),
    m.DestroyDevice: st.builds(m.DestroyDevice, u32),
    m.FlushDevice: st.builds(m.FlushDevice, u32, u32),
    m.CreateContextVirtual: st.builds(m.CreateContextVirtual, u32, u32, u32, u32, u32, u32,
                                      blob),
    m.DestroyContext: st.builds(m.DestroyContext, u32),
    m.GetDeviceState: st.builds(m.GetDeviceState, st.binary(min_size=56, max_size=56)),
    m.GetDeviceStateReturn: st.builds(m.GetDeviceStateReturn,
                                      st.binary(min_size=56, max_size=56), u32),
    m.IsFeatureEnabled: st.builds(m.IsFeatureEnabled, u32),
    m.IsFeatureEnabledReturn: st.builds(m.IsFeatureEnabledReturn, u32, u16, u16, u16, u16, u16),
    m.QueryClockCalibration: st.builds(m.QueryClockCalibration,
                                       st.binary(min_size=40, max_size=40)),
    m.QueryClockCalibrationReturn: st.builds(m.QueryClockCalibrationReturn, u32,
                                             st.binary(min_size=28, max_size=28)),
    m.Escape: st.builds(m.Escape, u32, u32, u32, u32, u32, blob, blob),
    m.IoctlArgs: st.builds(m.IoctlArgs, blob, blob),
    m.IoctlArgsReturn: st.builds(m.IoctlArgsReturn, u32, blob, blob),
    m.CreateAllocation: st.builds(
        m.CreateAllocation, u32, u32, u32, u64, blob, blob,
        st.lists(st.builds(m.NewAllocation, u32, u32, blob), max_size=4).map(tuple)),
    m.CreateAllocationReturn: st.builds(
        m.CreateAllocationReturn, u32, u32,
        st.lists(st.builds(m.AllocationInfo, u32, u32, u32, u64, u64, u64, u64, blob),
                 max_size=4).map(tuple)),
    m.DestroyAllocation: st.builds(m.DestroyAllocation, u32, u32, u32,
                                   st.lists(u32, max_size=20).map(tuple)),
    m.Lock2: st.builds(m.Lock2, u32, u32, u32, u32, u64, u64),
    m.Lock2Return: st.builds(m.Lock2Return, u32, u64, u64, u64, u64, blob),
    m.Unlock2: st.builds(m.Unlock2, u32, u32, u64, blob),
}

SPECS = sorted(COMMANDS.values(), key=lambda s: int(s.command))
SPEC_IDS = [s.name for s in SPECS]


def body_types(spec: CommandSpec) -> list[type]:
    return [t for t in (spec.request, spec.reply) if t is not None]


def test_the_table_is_complete_and_consistent():
    assert len(COMMANDS) == len({int(c) for c in COMMANDS})
    for command, spec in COMMANDS.items():
        assert spec.command is command and spec_of(int(command)) is spec
        assert (spec.route == Route.GLOBAL) == isinstance(command, GlobalCommand)
        for t in body_types(spec):
            assert t in VALID, f"{spec.name}: add a strategy for {t.__name__}"
            assert callable(t.unpack) and callable(getattr(t, "pack", None))
    assert spec_of(9999) is None
    assert spec_of(int(VgpuCommand.SUBMITCOMMAND)) is None  # not spoken: NOT_IMPLEMENTED


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_every_entry_round_trips_a_valid_body(data):
    for spec in SPECS:
        request = data.draw(VALID[spec.request], label=f"{spec.name} request")
        assert spec.parse_request(request.pack()) == request
        if spec.reply is None:
            assert spec.parse_reply(b"") is None
            with pytest.raises(ProtocolError):
                spec.parse_reply(b"\0")
        else:
            reply = data.draw(VALID[spec.reply], label=f"{spec.name} reply")
            assert spec.parse_reply(reply.pack()) == reply


def _hostile(data: st.DataObject, valid: bytes) -> bytes:
    """Random bytes, a truncation, an extension, or the valid body with a declared size (any
    aligned u32 or u64 in it) made huge."""
    kind = data.draw(st.sampled_from(["random", "truncated", "extended", "huge"]))
    if kind == "random" or not valid:
        return data.draw(st.binary(max_size=700))
    if kind == "truncated":
        return valid[: data.draw(st.integers(0, len(valid) - 1))]
    if kind == "extended":
        return valid + data.draw(st.binary(min_size=1, max_size=64))
    raw = bytearray(valid)
    width = data.draw(st.sampled_from([4, 8])) if len(raw) >= 8 else 4
    if len(raw) < width:
        return bytes(raw) + b"\xff" * width
    at = data.draw(st.integers(0, (len(raw) - width) // 4)) * 4
    value = data.draw(st.sampled_from([2**(8 * width) - 1, 2**(8 * width - 1), len(raw) + 1,
                                       0x7FFF_FFFF, 1 << 20]))
    raw[at : at + width] = value.to_bytes(width, "little")
    return bytes(raw)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_hostile_bodies_only_ever_raise_protocol_error(data):
    for spec in SPECS:
        request = data.draw(VALID[spec.request]).pack()
        try:
            spec.parse_request(_hostile(data, request))
        except ProtocolError:
            pass
        reply = data.draw(VALID[spec.reply]).pack() if spec.reply is not None else b""
        try:
            spec.parse_reply(_hostile(data, reply))
        except ProtocolError:
            pass


def _failure_recognizable(parsed: object, status: int) -> bool:
    """Whether a parsed failure reply says it failed (its status, or a zero handle)."""
    if parsed is None:  # an empty completion: nothing to say (CLOSEADAPTER)
        return True
    if hasattr(parsed, "status"):
        return parsed.status == status
    for field in ("hprocess", "handle", "context"):
        if hasattr(parsed, field):
            return getattr(parsed, field) == 0
    return False


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@settings(max_examples=40, deadline=None)
@given(data=st.data(), status=st.sampled_from([NTSTATUS.STATUS_INVALID_PARAMETER,
                                               NTSTATUS.STATUS_DEVICE_REMOVED,
                                               NTSTATUS.STATUS_NO_MEMORY,
                                               NTSTATUS.STATUS_NOT_SUPPORTED]))
def test_every_failure_reply_has_the_shape_the_guest_expects(spec, data, status):
    valid = data.draw(VALID[spec.request]).pack()
    for body in (valid, _hostile(data, valid)):
        reply = spec.failure(int(status), body)
        if spec.failure is fail_status:
            assert reply == struct.pack("<I", int(status))
            continue
        if spec.failure is fail_empty:
            assert reply == b"" and spec.parse_reply(reply) is None
            continue
        try:
            parsed = spec.parse_reply(reply)
        except ProtocolError:
            # Only where the request itself did not parse: then the bare 4-byte status.
            with pytest.raises(ProtocolError):
                spec.parse_request(body)
            assert reply == struct.pack("<I", int(status))
            continue
        assert _failure_recognizable(parsed, int(status)), (spec.name, parsed)


def test_docs_list_the_command_table():
    text = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    start, end = "<!-- command-table -->", "<!-- /command-table -->"
    assert start in text and end in text, "docs/protocol.md lacks the command-table markers"
    listed = text.split(start, 1)[1].split(end, 1)[0]
    assert listed == "\n" + render_command_table().rstrip("\n") + "\n", \
        "docs/protocol.md is stale: run python tools/gen_docs.py"
    for spec in SPECS:
        assert f"| {int(spec.command)} | {spec.name} |" in listed


# ---- the command table against a real host --------------------------------------------------------

SAMPLE: dict[type, object] = {
    m.Empty: m.Empty(),
    m.CreateProcess: m.CreateProcess(0xFFFF8880DEAD0000, 777, "fuzz"),
    m.SetIoSpaceRegion: m.SetIoSpaceRegion(1 << 40, 1 << 20),
    m.OpenAdapter: m.OpenAdapter(40, 16, 0, 0),
    m.CloseAdapter: m.CloseAdapter(0x40000FC0),
    m.QueryAdapterInfo: m.QueryAdapterInfo(15, bytes(16)),
    m.CreateDevice: m.CreateDevice(0, 0, 1),
    m.DestroyDevice: m.DestroyDevice(0x40000FC0),
    m.FlushDevice: m.FlushDevice(0x40000FC0, 4),
    m.CreateContextVirtual: m.CreateContextVirtual(0, 0x40000FC0, 0, 0, 0, 0, b"p"),
    m.DestroyContext: m.DestroyContext(0x40000FC0),
    m.GetDeviceState: m.GetDeviceState(bytes(56)),
    m.IsFeatureEnabled: m.IsFeatureEnabled(0),
    m.QueryClockCalibration: m.QueryClockCalibration(bytes(40)),
    m.Escape: m.Escape(0x40000FC0, 0, 0, 0, 0, bytes(8)),
    m.IoctlArgs: m.IoctlArgs(bytes(56), bytes(8)),
    m.CreateAllocation: m.CreateAllocation(0x40000FC0, 0, 0, 0, b"", b"", (
        m.NewAllocation(0, 0, bytes(16)),)),
    m.DestroyAllocation: m.DestroyAllocation(0x40000FC0, 0, 0, (0x40000FC0,)),
    m.Lock2: m.Lock2(0x40000FC0, 0x40000FC0, 0, 1, 0, 0),
    m.Unlock2: m.Unlock2(0x40000FC0, 0x40000FC0, 0, b"x"),
}


def hostile_bodies(valid: bytes, seed: int) -> Iterator[bytes]:
    """The hostile bodies every command is sent with (never the valid one itself)."""
    rng = random.Random(seed)
    out = [b"", valid[:-1], valid + b"\0", valid[: len(valid) // 2], b"\xff" * (len(valid) + 3),
           rng.randbytes(1), rng.randbytes(17), rng.randbytes(600),
           rng.randbytes(framing.DXG_MAX_VM_BUS_PACKET_SIZE + 1000)]  # a bulk attachment
    for at in range(0, max(0, len(valid) - 3), 4):  # each aligned u32 made huge
        raw = bytearray(valid)
        raw[at : at + 4] = b"\xff\xff\xff\xff"
        out.append(bytes(raw))
    seen = {valid}
    for body in out:
        if body not in seen:
            seen.add(body)
            yield body


def expected_shape(spec: CommandSpec, reply: bytes) -> bool:
    try:
        spec.parse_reply(reply)
        return True
    except ProtocolError:
        # The bare failure status where the request did not even parse.
        return len(reply) == 4 and not nt_success(m.NtStatusReturn.unpack(reply).status)


@pytest.fixture
def raw_host(tmp_path_factory: pytest.TempPathFactory):
    from test_host import RawGuest

    path = os.path.join(str(tmp_path_factory.mktemp("p")), "fuzz.sock")
    with Host(HostConfig(adapters=1)) as host:
        guest = RawGuest(host.listen(path), name="fuzzer")
        try:
            yield host, guest
        finally:
            guest.close()


def test_a_real_host_answers_every_entry_sent_with_a_hostile_body(raw_host):
    host, guest = raw_host
    hp = guest.create_process(name="target")
    assert guest.open_adapter(0).status == NTSTATUS.STATUS_SUCCESS
    sent = 0
    for spec in SPECS:
        valid = SAMPLE[spec.request].pack()  # type: ignore[attr-defined]
        process = hp if spec.per_process else 0
        channels = {
            Route.GLOBAL: [guest.glob],
            Route.VGPU: [guest.vch(0), guest.glob],
            Route.VGPU_ONLY: [guest.vch(0)],
        }[spec.route]
        for body in hostile_bodies(valid, int(spec.command)):
            if isinstance(spec.command, GlobalCommand):
                payload = headers.encode_global(spec.command, process, body)
            else:
                payload = guest.vpayload(0, spec.command, process, body)
            for ch in channels:
                reply = guest.request(ch, payload)
                sent += 1
                assert expected_shape(spec, reply), (spec.name, body[:32], reply[:32])
    # The host kept serving the guest throughout, and still does.
    assert guest.connected
    (part,) = host.census()["partitions"]
    assert not part["closed"] and part["requests"] >= sent
    assert guest.destroy_process(hp) == NTSTATUS.STATUS_SUCCESS
    assert guest.create_process(name="after")
