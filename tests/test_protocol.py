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


# ---- messages: bulk attachments announced, assembled once, read in place ------------------------

MAX = framing.DXG_MAX_VM_BUS_PACKET_SIZE


def _stream(*messages: list) -> bytes:
    return b"".join(bytes(b) for msg in messages for b in msg)


def _read(reader: framing.MessageReader, stream: bytes, seed: int,
          direct: bool = True) -> list[framing.Frame]:
    """``stream`` into ``reader`` in random pieces: straight into the buffers it names when
    ``direct`` (as SocketTransport reads over TCP), through frames_of otherwise."""
    rng = random.Random(seed)
    out: list[framing.Frame] = []
    pos = 0
    while pos < len(stream):
        want = rng.choice([1, 23, 24, 25, 4096, MAX - 1, MAX + 24, 3 * MAX])
        buffers = reader.buffers() if direct else None
        if buffers:
            n = min(want, sum(len(b) for b in buffers), len(stream) - pos)
            left, at = n, pos
            for b in buffers:
                k = min(len(b), left)
                b[:k] = stream[at : at + k]
                at += k
                left -= k
            out += reader.filled(n)
        else:
            n = min(want, len(stream) - pos)
            out += reader.frames_of(stream[pos : pos + n])
        pos += n
    return out


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("size", [0, 1, MAX, MAX + 1, 5 << 17 | 3, 3 << 20])
def test_messages_come_whole_in_one_buffer_however_their_bytes_arrive(size, direct):
    data = random.Random(size).randbytes(size)
    msg = framing.encode_message(4, framing.VM_PKT_COMP, framing.Gather(
        (data[:10], memoryview(data)[10:])), 9, framing.frame_flags(True))
    after = framing.encode_message(4, framing.VM_PKT_DATA_INBAND, b"next", 10)
    r = framing.MessageReader(64 << 20)
    first, second = _read(r, _stream(msg, after), size, direct)
    assert first.payload == data and (first.trans_id, second.trans_id) == (9, 10)
    assert first.wants_completion and first.has_bulk == (size > MAX) and not first.placed
    assert type(first.payload) is (bytearray if size > MAX else bytes)
    assert second.payload == b"next" and r.pending_bytes == 0


def test_bulk_chunks_announce_their_attachment_and_payloads_go_as_views():
    data = bytearray(random.Random(1).randbytes(3 * MAX + 5))
    msg = framing.encode_message(4, framing.VM_PKT_COMP, data, 0x1_2345_6789)
    heads = [framing.FRAME_HEADER.unpack(b) for b in msg if isinstance(b, bytes)]
    word = framing.bulk_announcement(2 * MAX + 5, 0x2345_6789)
    assert word == (0x2345_6789 << 32) | (2 * MAX + 5)
    assert [h[1:] for h in heads] == [
        (MAX, 4, framing.VM_PKT_BULK, 0, word), (MAX, 4, framing.VM_PKT_BULK, 0, word),
        (5, 4, framing.VM_PKT_BULK, 0, word),
        (MAX, 4, framing.VM_PKT_COMP, framing.FLAG_HAS_BULK, 0x1_2345_6789)]
    views = [b for b in msg if not isinstance(b, bytes)]
    assert all(isinstance(v, memoryview) and v.obj is data for v in views)  # nothing copied
    assert _stream(msg).endswith(data[:MAX])
    assert framing.bulk_announcement(0) == framing.bulk_announcement(1 << 32) == 0


def test_an_attachment_is_placed_where_its_owner_names():
    data = random.Random(2).randbytes(2 << 20)
    stream = _stream(framing.encode_message(3, framing.VM_PKT_COMP, data, 77))
    for direct in (False, True):
        where = bytearray(len(data) - MAX)
        asked = []

        def place(relid, owner, length, where=where, asked=asked):
            asked.append((relid, owner, length))
            return memoryview(where)

        (f,) = _read(framing.MessageReader(64 << 20, place), stream, 3, direct)
        assert asked == [(3, 77, len(where))]
        assert f.placed == len(where) and f.payload == data[:MAX] and where == data[MAX:]
    # memory of another length (or read-only) is not used: the message comes whole
    for wrong in (memoryview(bytearray(5)), memoryview(bytes(len(data) - MAX))):
        (f,) = _read(framing.MessageReader(64 << 20, lambda *a, w=wrong: w), stream, 4)
        assert f.placed == 0 and f.payload == data


def test_attachments_of_older_senders_still_come_whole():
    """Chunks that announce nothing (trans_id 0) are collected as they come."""
    data = random.Random(5).randbytes(3 * MAX + 7)
    bulk = memoryview(data)[MAX:]
    stream = b"".join(framing.FRAME_HEADER.pack(framing.MAGIC, len(c), 2, framing.VM_PKT_BULK,
                                                0, 0) + bytes(c)
                      for c in (bulk[i : i + MAX] for i in range(0, len(bulk), MAX)))
    stream += framing.encode_frame(2, framing.VM_PKT_DATA_INBAND, data[:MAX], 3,
                                   framing.FLAG_HAS_BULK)
    for direct in (False, True):
        (f,) = _read(framing.MessageReader(64 << 20), stream, 6, direct)
        assert f.payload == data and f.has_bulk
    with pytest.raises(ProtocolError, match="longer"):
        framing.MessageReader(2 * MAX).frames_of(stream)


def test_a_message_buffer_is_used_again_only_once_nothing_refers_to_it():
    r = framing.MessageReader(64 << 20)

    def message(fill: int) -> bytearray:
        (frame,) = r.frames_of(_stream(framing.encode_message(
            2, framing.VM_PKT_COMP, bytes([fill]) * (MAX + 999))))
        assert isinstance(frame.payload, bytearray)
        return frame.payload

    first = message(1)
    held = memoryview(first)[MAX:]  # a view of it still held: it is not used again
    del first
    second = message(2)
    assert set(held.tobytes()) == {1} and set(second) == {2}
    assert second is r._spare
    spare = id(second)
    del second, held
    third = message(3)  # nothing refers to the second now: it is used again
    assert id(third) == spare and set(third) == {3}
    del third
    for _ in range(framing.SPARE_IDLE):  # messages without attachments: the spare goes
        r.frames_of(framing.encode_frame(2, framing.VM_PKT_COMP, b"small"))
    assert r._spare is None


def _h(length: int, relid: int, ptype: int, flags: int = 0, trans: int = 0) -> bytes:
    return framing.FRAME_HEADER.pack(framing.MAGIC, length, relid, ptype, flags, trans)


_B = framing.VM_PKT_BULK
_P = framing.VM_PKT_DATA_INBAND
_HB = framing.FLAG_HAS_BULK


def _ann(n: int) -> int:
    return framing.bulk_announcement(n)


BAD_MESSAGES = {
    "more than announced": _h(8, 2, _B, 0, _ann(4)) + bytes(8),
    "chunks disagree": _h(2, 2, _B, 0, _ann(4)) + b"ab" + _h(2, 2, _B, 0, _ann(5)) + b"cd",
    "chunks of two channels": _h(2, 2, _B, 0, _ann(4)) + b"ab" + _h(2, 3, _B, 0, _ann(4)) + b"cd",
    "announced past max_message": _h(1, 2, _B, 0, _ann((1 << 20) - MAX + 1)) + b"x",
    "claimed before it all came": _h(2, 2, _B, 0, _ann(4)) + b"ab" + _h(1, 2, _P, _HB) + b"x",
    "claimed on another channel": _h(4, 2, _B, 0, _ann(4)) + b"abcd" + _h(1, 3, _P, _HB) + b"x",
    "claimed by no packet": _h(4, 2, _B, 0, _ann(4)) + b"abcd" + _h(1, 2, _P) + b"x",
    "unannounced, claimed by no packet": _h(4, 2, _B) + b"abcd" + _h(1, 2, _P) + b"x",
    "a chunk with descriptors": _h(4, 2, _B, 1 << 8, _ann(4)) + b"abcd",
    "a chunk on the control channel": _h(4, 0, _B, 0, _ann(4)) + b"abcd",
    "announced, then not": _h(2, 2, _B, 0, _ann(4)) + b"ab" + _h(2, 2, _B) + b"cd",
}


@pytest.mark.parametrize("case", list(BAD_MESSAGES))
def test_messages_that_break_their_word_are_refused(case):
    for direct in (False, True):
        with pytest.raises(ProtocolError):
            _read(framing.MessageReader(1 << 20), BAD_MESSAGES[case], 7, direct)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 2**64 - 1))
def test_message_reader_never_crashes(data, word):
    r = framing.MessageReader(1 << 20, lambda *a: None)
    try:
        r.frames_of(_h(len(data) % 64, 2, _B, 0, word) + data)
        r.frames_of(data)
    except ProtocolError:
        pass


def test_large_bodies_are_packed_as_views_and_parsed_without_copies():
    data = bytearray(random.Random(8).randbytes(1 << 20))
    body = m.Unlock2(1, 2, 3, memoryview(data)).pack()
    assert isinstance(body, framing.Gather) and len(body) == 16 + len(data)
    assert any(isinstance(p, memoryview) and p.obj is data for p in body.parts)
    payload = headers.encode_vgpu(VgpuCommand.UNLOCK2, 5, 6, body)
    assert isinstance(payload, framing.Gather) and len(payload) == 40 + len(body)
    received = bytearray(bytes(payload))  # how a large message arrives: a bytearray
    msg = headers.decode_guest(received)
    assert isinstance(msg.body, memoryview) and msg.body.obj is received
    got = m.Unlock2.unpack(msg.body)
    assert got.data.obj is received and got.data == data and got.offset == 3
    assert m.Unlock2.unpack(body) == m.Unlock2(1, 2, 3, bytes(data))  # a Gather parses too
    reply = m.Lock2Return(0, 1, 2, 3, 4, memoryview(data)).pack()
    assert isinstance(reply, framing.Gather)
    assert m.Lock2Return.unpack(bytearray(bytes(reply))).data == data
    esc = m.Escape(1, 2, 0, 0, 0, b"priv", memoryview(data)).pack()
    parsed = m.Escape.unpack(bytearray(bytes(esc)))
    assert type(parsed.priv_drv_data) is bytes and parsed.attachment == data
    # small ones stay bytes, and so do the bodies of other commands, however they came
    assert isinstance(m.Unlock2(1, 2, 3, b"x").pack(), bytes)
    other = headers.decode_guest(bytearray(headers.encode_vgpu(
        VgpuCommand.CREATEDEVICE, 1, 2, m.CreateDevice(0, 0, 1).pack())))
    assert type(other.body) is bytes


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
                m.QueryClockCalibrationReturn, m.SignalGuestEvent, m.SetGuestData,
                m.CreateSyncObject, m.SignalSyncObject, m.WaitSyncObjectCpu,
                m.WaitSyncObjectGpu, m.FenceValue, m.CreateNtSharedObjectReturn,
                m.OpenResourceReturn, m.OpenSyncObject):
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
    m.ProcessQuota: st.builds(m.ProcessQuota, u64, u64, u64),
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
    # synchronization objects
    m.CreateSyncObject: st.builds(m.CreateSyncObject, u32, u64,
                                  st.binary(min_size=80, max_size=80)),
    m.CreateSyncObjectReturn: st.builds(m.CreateSyncObjectReturn, u32, u32, u64, u64, u64, u64),
    m.DestroySyncObject: st.builds(m.DestroySyncObject, u32),
    m.SignalSyncObject: st.builds(m.SignalSyncObject, u32, u32,
                                  st.lists(u32, max_size=8).map(tuple),
                                  st.lists(u32, max_size=8).map(tuple),
                                  st.lists(u64, max_size=8).map(tuple), u64, u64),
    m.WaitSyncObjectCpu: st.integers(0, 8).flatmap(lambda n: st.builds(
        m.WaitSyncObjectCpu, u32, u32, u64, st.lists(u32, min_size=n, max_size=n).map(tuple),
        st.lists(u64, min_size=n, max_size=n).map(tuple))),
    m.WaitSyncObjectGpu: st.tuples(st.integers(0, 8), st.integers(0, 1)).flatmap(
        lambda nl: st.builds(m.WaitSyncObjectGpu, u32, st.just(nl[1]),
                             st.lists(u32, min_size=nl[0], max_size=nl[0]).map(tuple),
                             st.lists(u64, min_size=1 if nl[1] else nl[0],
                                      max_size=1 if nl[1] else nl[0]).map(tuple))),
    # sharing by descriptor
    m.CreateNtSharedObject: st.builds(m.CreateNtSharedObject, u32),
    m.CreateNtSharedObjectReturn: st.builds(m.CreateNtSharedObjectReturn, u32, u32, u32, u32,
                                            u32, u32, u32),
    m.DestroyNtSharedObject: st.builds(m.DestroyNtSharedObject, u32),
    m.WaitSharedSync: st.builds(m.WaitSharedSync, u32, u32, u64, u64),
    m.OpenResource: st.builds(m.OpenResource, u32, u32, u32, u32),
    m.OpenResourceReturn: st.builds(
        m.OpenResourceReturn, u32, u32,
        st.lists(st.builds(m.AllocationInfo, u32, u32, u32, u64, u64, u64, u64, blob),
                 max_size=4).map(tuple), blob, blob),
    m.OpenSyncObject: st.builds(m.OpenSyncObject, u32, u32, u32, u64),
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
    assert spec_of(int(VgpuCommand.BLT)) is None  # not spoken: NOT_IMPLEMENTED


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
    m.ProcessQuota: m.ProcessQuota(1000, 1 << 20, (1 << 64) - 1),
    m.CreateNtSharedObject: m.CreateNtSharedObject(0x40000FC0),
    m.DestroyNtSharedObject: m.DestroyNtSharedObject(0x40000FC0),
    m.WaitSharedSync: m.WaitSharedSync(0x40000FC0, 0, 7, 1),
    m.OpenResource: m.OpenResource(0x40000FC0, 0x40000FC0, 0, 1),
    m.OpenSyncObject: m.OpenSyncObject(0x40000FC0, 0x40000FC0, 1, 0),
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
    m.CreateSyncObject: m.CreateSyncObject(0x40000FC0, 0, bytes(80)),
    m.DestroySyncObject: m.DestroySyncObject(0x40000FC0),
    m.SignalSyncObject: m.SignalSyncObject(0, 0x40000FC0, (0x40000FC0,), (), (1,)),
    m.WaitSyncObjectCpu: m.WaitSyncObjectCpu(0x40000FC0, 0, 7, (0x40000FC0,), (1,)),
    m.WaitSyncObjectGpu: m.WaitSyncObjectGpu(0x40000FC0, 0, (0x40000FC0,), (1,)),
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
