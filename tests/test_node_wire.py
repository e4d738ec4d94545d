"""The client <-> node wire, version 3 (dxg.uapi.wire), the region-backed user memory and the
client's user-buffer table: bytes only, no sockets."""

import ctypes
import errno
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dxg.client import userbufs
from dxg.node.usermem import RegionUserMemory
from dxg.oslib.procmem import UserMemoryFault
from dxg.uapi import ioctls as io
from dxg.uapi import structs as s
from dxg.uapi import wire

HDR = struct.Struct("<IHHII")
REPLY = struct.Struct("<qIII4x")
FIXUP = struct.Struct("<BBHIQ")


def frames_of(data: bytes) -> list[wire.Frame]:
    dec = wire.FrameDecoder()
    dec.feed(data)
    out = []
    while (f := dec.next_frame()) is not None:
        out.append(f)
    return out


def roundtrip(msg: wire.Message, seq: int = 7) -> wire.Message:
    (frame,) = frames_of(wire.encode(msg, seq))
    assert frame.seq == seq
    return wire.decode(frame)


def ioctl_payload(code: int, body: bytes, table: list[tuple[int, int, int]], data: bytes,
                  numbers: tuple[int, ...] = ()) -> bytes:
    p = struct.pack("<IIII", code, len(body), len(table), len(numbers)) + body
    p += b"".join(struct.pack("<QII", a, n, f) for a, n, f in table)
    p += b"".join(struct.pack("<iI", n, 0) for n in numbers)
    return p + data


def reply_payload(body: bytes, fixups: list[tuple[int, int, int]], ret: int = 0) -> bytes:
    p = REPLY.pack(ret, len(body), 0, len(fixups)) + body
    return p + b"".join(FIXUP.pack(t, w, 0, 0, where) for t, w, where in fixups)


def frame(kind: int, payload: bytes, seq: int = 1, flags: int = 0) -> wire.Frame:
    return wire.Frame(kind, seq, payload, flags)


# ---- round trips ------------------------------------------------------------------------------


def test_hello_roundtrip_and_negotiation():
    assert roundtrip(wire.Hello(1, 5)) == wire.Hello(1, 5)
    assert wire.negotiate(wire.Hello(1, 5)) == wire.MAX_WIRE_VERSION
    assert wire.negotiate(wire.Hello(wire.MAX_WIRE_VERSION + 1, 9)) is None
    assert wire.negotiate(wire.Hello(0, 0)) is None
    r = wire.HelloReply(2, wire.MAX_PAYLOAD, wire.MAX_REGIONS, 8, "node-x")
    assert roundtrip(r) == r
    assert wire.MIN_WIRE_VERSION == wire.MAX_WIRE_VERSION == 3


def test_ioctl_request_roundtrip():
    regions = (
        wire.Region(0x1000, 4, wire.REGION_IN, b"abcd"),
        wire.Region(0x2000, 8, wire.REGION_OUT),
        wire.Region(0x2008, 3, wire.REGION_IN | wire.REGION_OUT, b"xyz"),
    )
    req = wire.IoctlRequest(io.LX_DXENUMADAPTERS2, b"\x01" * 16, regions)
    assert roundtrip(req) == req


def test_ioctl_reply_roundtrip_negative_and_positive_returns():
    for ret in (0, 0x103, -errno.EFAULT, -(1 << 63), (1 << 63) - 1):
        rep = wire.IoctlReply(ret, b"s" * 24, (wire.Write(0x10, b"ab"), wire.Write(0x20, b"c")))
        assert roundtrip(rep) == rep


def test_admin_and_error_roundtrip():
    assert roundtrip(wire.AdminRequest({"op": "snapshot"})) == wire.AdminRequest({"op": "snapshot"})
    assert roundtrip(wire.AdminReply({"a": [1, 2]})) == wire.AdminReply({"a": [1, 2]})
    e = wire.ErrorReply(errno.EPROTO, "bad", fatal=True)
    assert roundtrip(e) == e


def test_frames_split_anywhere():
    data = wire.encode(wire.Hello(), 1) + wire.encode(wire.AdminRequest({"op": "x"}), 2)
    for cut in range(len(data) + 1):
        dec = wire.FrameDecoder()
        got = []
        for part in (data[:cut], data[cut:]):
            dec.feed(part)
            while (f := dec.next_frame()) is not None:
                got.append(f)
        assert [f.seq for f in got] == [1, 2]
        assert dec.buffered == 0


def test_header_needed_counts_missing_bytes():
    data = wire.encode(wire.AdminRequest({"op": "x"}), 1)
    dec = wire.FrameDecoder()
    assert dec.header_needed() == wire.HEADER_SIZE
    dec.feed(data[:20])
    assert dec.header_needed() == len(data) - 20


# ---- the encoder refuses what the decoder would reject ------------------------------------------


@pytest.mark.parametrize(
    "regions",
    [
        (wire.Region(0, 4, wire.REGION_IN, b"abcd"),),
        (wire.Region(0x10, 0, wire.REGION_OUT),),
        (wire.Region(0x10, 4, 0),),
        (wire.Region(0x10, 4, 8),),
        (wire.Region(0x10, 4, wire.REGION_IN, b"ab"),),
        (wire.Region(0x10, 4, wire.REGION_OUT, b"abcd"),),
        (wire.Region(0x10, 8, wire.REGION_OUT), wire.Region(0x14, 8, wire.REGION_OUT)),
        (wire.Region(0x20, 8, wire.REGION_OUT), wire.Region(0x10, 8, wire.REGION_OUT)),
        (wire.Region((1 << 64) - 2, 4, wire.REGION_OUT),),
        (wire.Region(0x10, wire.MAX_PAYLOAD, wire.REGION_OUT),),
    ],
)
def test_encoder_rejects_bad_regions(regions):
    with pytest.raises(ValueError):
        wire.encode(wire.IoctlRequest(1, b"", regions), 1)


def test_encoder_rejects_too_many_regions():
    regions = tuple(
        wire.Region(0x1000 + 2 * i, 1, wire.REGION_OUT) for i in range(wire.MAX_REGIONS + 1)
    )
    with pytest.raises(ValueError):
        wire.encode(wire.IoctlRequest(1, b"", regions), 1)


# ---- hostile input: framing ----------------------------------------------------------------------


def test_bad_magic_breaks_the_stream():
    dec = wire.FrameDecoder()
    dec.feed(HDR.pack(0xDEADBEEF, 1, 0, 1, 0))
    with pytest.raises(wire.WireError) as ei:
        dec.next_frame()
    assert ei.value.errno == errno.EPROTO
    with pytest.raises(wire.WireError):
        dec.feed(b"more")


def test_huge_length_is_refused_before_buffering():
    dec = wire.FrameDecoder()
    dec.feed(HDR.pack(wire.MAGIC, wire.Kind.IOCTL, 0, 1, 0xFFFFFFFF))
    with pytest.raises(wire.WireError) as ei:
        dec.next_frame()
    assert ei.value.errno == errno.EMSGSIZE


def test_handshake_limit_then_raised_keeps_buffered_bytes():
    # A node reads HELLO with a tiny limit, then raises it; what follows HELLO is kept.
    big = wire.encode(wire.AdminRequest({"pad": "x" * 10_000}), 2)
    dec = wire.FrameDecoder(wire.MAX_HELLO_PAYLOAD)
    assert dec.max_payload == wire.MAX_HELLO_PAYLOAD
    dec.feed(wire.encode(wire.Hello(), 1) + big[:100])
    assert isinstance(wire.decode(dec.next_frame()), wire.Hello)
    dec.max_payload = wire.MAX_PAYLOAD
    dec.feed(big[100:])
    assert wire.decode(dec.next_frame()) == wire.AdminRequest({"pad": "x" * 10_000})
    # Under the small limit the same header is a broken stream, before any payload arrives.
    small = wire.FrameDecoder(wire.MAX_HELLO_PAYLOAD)
    small.feed(HDR.pack(wire.MAGIC, wire.Kind.HELLO, 0, 1, wire.MAX_HELLO_PAYLOAD + 1))
    with pytest.raises(wire.WireError) as ei:
        small.next_frame()
    assert ei.value.errno == errno.EMSGSIZE
    for bad in (-1, wire.MAX_PAYLOAD + 1):
        with pytest.raises(ValueError):
            wire.FrameDecoder(bad)
        with pytest.raises(ValueError):
            dec.max_payload = bad


def test_unknown_kind_and_flags_are_per_frame_errors():
    with pytest.raises(wire.MalformedMessage) as ei:
        wire.decode(frame(99, b""))
    assert ei.value.errno == errno.EOPNOTSUPP
    with pytest.raises(wire.MalformedMessage):
        wire.decode(frame(wire.Kind.HELLO, struct.pack("<HHI", 1, 1, 0), flags=1))


# ---- hostile input: payloads ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x00" * 15,
        struct.pack("<IIII", 1, 0, 0, 1),  # one descriptor named, no table
        struct.pack("<IIII", 1, 0, 0, wire.MAX_FDS + 1),  # too many descriptors
        struct.pack("<IIII", 1, wire.MAX_STRUCT + 1, 0, 0),
        struct.pack("<IIII", 1, 64, 0, 0) + b"x" * 10,  # truncated struct
        struct.pack("<IIII", 1, 0, 2, 0) + struct.pack("<QII", 0x10, 4, 1),  # truncated table
    ],
)
def test_malformed_ioctl_payloads(payload):
    with pytest.raises(wire.MalformedMessage):
        wire.decode(frame(wire.Kind.IOCTL, payload))


def test_huge_region_count_is_e2big():
    p = struct.pack("<IIII", 1, 0, 0xFFFFFFFF, 0)
    with pytest.raises(wire.MalformedMessage) as ei:
        wire.decode(frame(wire.Kind.IOCTL, p))
    assert ei.value.errno == errno.E2BIG


def test_regions_spanning_more_than_the_limit_are_e2big():
    p = ioctl_payload(1, b"", [(0x1000, 0xFFFFFFFF, wire.REGION_OUT)], b"")
    with pytest.raises(wire.MalformedMessage) as ei:
        wire.decode(frame(wire.Kind.IOCTL, p))
    assert ei.value.errno == errno.E2BIG


@pytest.mark.parametrize(
    "table,data",
    [
        ([(0, 4, wire.REGION_IN)], b"abcd"),  # NULL
        ([(0x10, 0, wire.REGION_IN)], b""),  # empty
        ([(0x10, 4, 0)], b""),  # no flags
        ([(0x10, 4, 4)], b""),  # unknown flag
        ([(0x10, 4, wire.REGION_IN)], b"ab"),  # short data
        ([(0x10, 4, wire.REGION_IN)], b"abcdef"),  # trailing data
        ([(0x10, 4, wire.REGION_OUT)], b"ab"),  # OUT carries no data
        ([(0x10, 8, wire.REGION_OUT), (0x14, 4, wire.REGION_OUT)], b""),  # overlap
        ([(0x20, 4, wire.REGION_OUT), (0x10, 4, wire.REGION_OUT)], b""),  # unsorted
        ([((1 << 64) - 2, 4, wire.REGION_OUT)], b""),  # wraps
    ],
)
def test_malformed_region_tables(table, data):
    with pytest.raises(wire.MalformedMessage):
        wire.decode(frame(wire.Kind.IOCTL, ioctl_payload(1, b"", table, data)))


@pytest.mark.parametrize(
    "payload",
    [b"", b"\xff\xfe", b"[1,2]", b'"str"', b"{", b"[" * 100000 + b"]" * 100000, b"nul\x00"],
)
def test_malformed_admin_json(payload):
    with pytest.raises(wire.MalformedMessage):
        wire.decode(frame(wire.Kind.ADMIN, payload))


def test_malformed_replies():
    with pytest.raises(wire.MalformedMessage):
        wire.decode(frame(wire.Kind.IOCTL_REPLY, REPLY.pack(0, 0, 1, 0)))
    bad_write = REPLY.pack(0, 0, 1, 0) + struct.pack("<QII", 0x10, 8, 0) + b"abc"
    with pytest.raises(wire.MalformedMessage):
        wire.decode(frame(wire.Kind.IOCTL_REPLY, bad_write))
    trailing = REPLY.pack(0, 0, 0, 0) + b"x"
    with pytest.raises(wire.MalformedMessage):
        wire.decode(frame(wire.Kind.IOCTL_REPLY, trailing))
    assert wire.encode(wire.IoctlReply(0, b""), 1)[wire.HEADER_SIZE + 20 :][:4] == bytes(4)
    with pytest.raises(wire.MalformedMessage):
        wire.decode(frame(wire.Kind.ERROR, struct.pack("<iI", 0, 0)))
    with pytest.raises(wire.MalformedMessage):
        wire.decode(frame(wire.Kind.HELLO, b"\x01"))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_random_bytes_never_escape_the_two_error_types(data):
    dec = wire.FrameDecoder()
    dec.feed(data)
    try:
        while (f := dec.next_frame()) is not None:
            try:
                wire.decode(f)
            except wire.MalformedMessage:
                pass
    except wire.WireError:
        pass


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(list(wire.Kind)), st.binary(max_size=256))
def test_random_payloads_of_every_kind(kind, payload):
    try:
        wire.decode(frame(kind, payload))
    except wire.MalformedMessage:
        pass


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(st.integers(1, 64), st.integers(0, 3), st.booleans(), st.booleans()),
        max_size=8,
    ),
    st.binary(max_size=64),
)
def test_random_valid_requests_roundtrip(specs, body):
    regions = []
    addr = 0x1000
    for length, gap, readable, writable in specs:
        flags = (wire.REGION_IN if readable else 0) | (wire.REGION_OUT if writable else 0)
        flags = flags or wire.REGION_IN
        addr += gap
        data = bytes([length & 0xFF]) * length if flags & wire.REGION_IN else None
        regions.append(wire.Region(addr, length, flags, data))
        addr += length
    req = wire.IoctlRequest(0xC0104714, body, tuple(regions))
    assert roundtrip(req) == req


# ---- wire 2: descriptors, fixups, chunks, CANCEL -------------------------------------------------


def test_fd_table_roundtrip_and_frame_bits():
    req = wire.IoctlRequest(io.LX_DXESCAPE, b"e" * 32,
                            (wire.Region(0x1000, 40, wire.REGION_IN | wire.REGION_OUT, b"p" * 40),),
                            (7, 3))
    data = wire.encode(req, 9)
    (f,) = frames_of(data)
    assert f.fd_count == 2 and not f.more
    assert wire.decode(f) == req
    assert HDR.unpack_from(data)[2] == 2  # the count rides in the header's flags


def test_fixups_roundtrip():
    fix = (wire.FdFixup(wire.FD_IN_STRUCT, 16, 8), wire.FdFixup(wire.FD_IN_USER, 0x2010, 4))
    rep = wire.IoctlReply(0, b"s" * 24, (wire.Write(0x2000, b"w" * 24),), fix)
    (f,) = frames_of(wire.encode(rep, 3))
    assert f.fd_count == 2
    assert wire.decode(f) == rep


@pytest.mark.parametrize("numbers", [(1, 1), (-1,), tuple(range(wire.MAX_FDS + 1)), (1 << 31,)])
def test_encoder_rejects_bad_fd_tables(numbers):
    with pytest.raises(ValueError):
        wire.encode(wire.IoctlRequest(1, b"", (), numbers), 1)


@pytest.mark.parametrize(
    "fixup",
    [wire.FdFixup(2, 0, 8), wire.FdFixup(wire.FD_IN_STRUCT, 0, 2),
     wire.FdFixup(wire.FD_IN_USER, (1 << 64) - 4, 8)],
)
def test_encoder_rejects_bad_fixups(fixup):
    with pytest.raises(ValueError):
        wire.encode(wire.IoctlReply(0, b"x" * 8, (), (fixup,)), 1)


def test_fd_count_must_match_the_payload():
    p = ioctl_payload(1, b"", [], b"", (4,))
    assert wire.decode(frame(wire.Kind.IOCTL, p, flags=1)).fd_numbers == (4,)
    for bits in (0, 2):
        with pytest.raises(wire.MalformedMessage):
            wire.decode(frame(wire.Kind.IOCTL, p, flags=bits))
    r = reply_payload(b"x" * 8, [(wire.FD_IN_STRUCT, 8, 0)])
    assert len(wire.decode(frame(wire.Kind.IOCTL_REPLY, r, flags=1)).fixups) == 1
    with pytest.raises(wire.MalformedMessage):
        wire.decode(frame(wire.Kind.IOCTL_REPLY, r))
    with pytest.raises(wire.MalformedMessage):  # descriptors on a kind that carries none
        wire.decode(frame(wire.Kind.ADMIN, b"{}", flags=1))


@pytest.mark.parametrize(
    "numbers_raw",
    [struct.pack("<iI", -1, 0), struct.pack("<iI", 3, 1),
     struct.pack("<iI", 3, 0) + struct.pack("<iI", 3, 0)],
)
def test_malformed_fd_tables(numbers_raw):
    n = len(numbers_raw) // 8
    p = struct.pack("<IIII", 1, 0, 0, n) + numbers_raw
    with pytest.raises(wire.MalformedMessage):
        wire.decode(frame(wire.Kind.IOCTL, p, flags=n))


@pytest.mark.parametrize(
    "fixups",
    [[(2, 8, 0)], [(wire.FD_IN_STRUCT, 3, 0)], [(wire.FD_IN_STRUCT, 8, 4)],  # past the struct
     [(wire.FD_IN_USER, 8, 0)], [(wire.FD_IN_USER, 8, (1 << 64) - 4)]],
)
def test_malformed_fixups(fixups):
    p = reply_payload(b"x" * 8, fixups)
    with pytest.raises(wire.MalformedMessage):
        wire.decode(frame(wire.Kind.IOCTL_REPLY, p, flags=len(fixups)))
    reserved = REPLY.pack(0, 0, 0, 1) + FIXUP.pack(wire.FD_IN_USER, 8, 1, 0, 0x1000)
    with pytest.raises(wire.MalformedMessage):
        wire.decode(frame(wire.Kind.IOCTL_REPLY, reserved, flags=1))


def test_admin_reply_in_chunks_joins_back():
    reply = {"data": "z" * 1000, "n": list(range(50))}
    frames = [f for data in wire.admin_reply_frames(reply, 12, 100) for f in frames_of(data)]
    assert len(frames) > 5
    assert all(f.more for f in frames[:-1]) and not frames[-1].more
    assert {f.seq for f in frames} == {12}
    with pytest.raises(wire.MalformedMessage):
        wire.decode(frames[0])  # a chunk alone is not JSON
    joined = wire.Frame(wire.Kind.ADMIN_REPLY, 12, b"".join(f.payload for f in frames))
    assert wire.decode(joined) == wire.AdminReply(reply)
    (one,) = wire.admin_reply_frames({"a": 1}, 1)
    (f,) = frames_of(one)
    assert not f.more and wire.decode(f) == wire.AdminReply({"a": 1})
    with pytest.raises(ValueError):
        wire.admin_reply_frames(reply, 1, 0)


def test_more_only_on_admin_replies():
    with pytest.raises(wire.MalformedMessage):
        wire.decode(frame(wire.Kind.ADMIN, b"{}", flags=wire.FLAG_MORE))
    with pytest.raises(wire.MalformedMessage):
        wire.decode(frame(wire.Kind.IOCTL_REPLY, REPLY.pack(0, 0, 0, 0), flags=wire.FLAG_MORE))
    with pytest.raises(wire.MalformedMessage):  # reserved flag bits
        wire.decode(frame(wire.Kind.ADMIN_REPLY, b"{}", flags=0x200))


def test_cancel_roundtrip_and_rules():
    data = wire.encode(wire.Cancel(), 77)
    assert len(data) == wire.HEADER_SIZE
    (f,) = frames_of(data)
    assert (f.kind, f.seq) == (wire.Kind.CANCEL, 77)
    assert wire.decode(f) == wire.Cancel()
    with pytest.raises(wire.MalformedMessage):
        wire.decode(frame(wire.Kind.CANCEL, b"\x00"))
    with pytest.raises(wire.MalformedMessage):
        wire.decode(frame(wire.Kind.CANCEL, b"", flags=1))


def test_error_fatal_flag_and_text_limit():
    e = wire.decode(frames_of(wire.encode(wire.ErrorReply(errno.EIO, "x" * 5000), 1))[0])
    assert isinstance(e, wire.ErrorReply) and not e.fatal
    assert len(e.message) == wire.MAX_ERROR_TEXT


@settings(max_examples=200)
@given(st.lists(st.integers(0, 1 << 20), unique=True, max_size=wire.MAX_FDS),
       st.lists(st.tuples(st.sampled_from([wire.FD_IN_STRUCT, wire.FD_IN_USER]),
                          st.sampled_from([4, 8]), st.integers(0, 56)), max_size=wire.MAX_FDS))
def test_random_fd_tables_and_fixups_roundtrip(numbers, fixups):
    req = wire.IoctlRequest(0xC0104714, b"b" * 64, (), tuple(numbers))
    assert roundtrip(req) == req
    fix = tuple(wire.FdFixup(t, where if t == wire.FD_IN_STRUCT else 0x1000 + where, w)
                for t, w, where in fixups)
    rep = wire.IoctlReply(1, b"b" * 64, (), fix)
    assert roundtrip(rep) == rep


# ---- RegionUserMemory ----------------------------------------------------------------------------


def test_region_memory_reads_inside_regions_only():
    mem = RegionUserMemory([wire.Region(0x1000, 8, wire.REGION_IN, b"01234567")])
    assert mem.read(0x1000, 8) == b"01234567"
    assert mem.read(0x1003, 2) == b"34"
    assert mem.read(0x5000, 0) == b""
    for addr, size in ((0xFFF, 2), (0x1007, 2), (0x2000, 1), (0, 1), (-1, 1)):
        with pytest.raises(UserMemoryFault):
            mem.read(addr, size)


def test_region_memory_write_rules_and_coalescing():
    mem = RegionUserMemory(
        [
            wire.Region(0x1000, 8, wire.REGION_IN, b"........"),
            wire.Region(0x2000, 8, wire.REGION_IN | wire.REGION_OUT, b"abcdefgh"),
            wire.Region(0x3000, 4, wire.REGION_OUT),
        ]
    )
    with pytest.raises(UserMemoryFault):
        mem.write(0x1000, b"x")  # not writable
    with pytest.raises(UserMemoryFault):
        mem.write(0x2006, b"xyz")  # runs past the end
    with pytest.raises(UserMemoryFault):
        mem.read(0x3000, 1)  # not sent readable
    mem.write(0x2001, b"X")
    mem.write(0x2004, b"YZ")
    assert mem.read(0x2000, 8) == b"aXcdYZgh"  # later reads see earlier writes
    mem.write(0x3000, b"\x01\x02\x03\x04")
    assert mem.writes() == (wire.Write(0x2001, b"XcdYZ"), wire.Write(0x3000, b"\x01\x02\x03\x04"))


def test_region_memory_refuses_overlapping_regions():
    with pytest.raises(ValueError):
        RegionUserMemory(
            [wire.Region(0x10, 8, wire.REGION_OUT), wire.Region(0x14, 8, wire.REGION_OUT)]
        )


def test_region_memory_descriptors_by_number_and_back_with_fixups():
    import os

    efd = os.eventfd(0)
    mem = RegionUserMemory([wire.Region(0x1000, 16, wire.REGION_OUT)], [efd], [42])
    mine = mem.take_fd(42)
    assert mine != efd
    os.close(mine)
    with pytest.raises(OSError):
        mem.take_fd(3)  # not handed over
    out = os.eventfd(0)
    mem.give_fd_to_user(out, 0x1008, 8)
    assert mem.reply_fds() == ([out], (wire.FdFixup(wire.FD_IN_USER, 0x1008, 8),))
    other = os.eventfd(0)
    with pytest.raises(UserMemoryFault):
        mem.give_fd_to_user(other, 0x2000, 8)  # not inside a writable region: closed
    with pytest.raises(OSError):
        os.fstat(other)
    mem.close()
    for fd in (efd, out):
        with pytest.raises(OSError):
            os.fstat(fd)


def test_out_only_regions_cost_nothing_until_written():
    """The review's attack: a 4 MiB OUT region declared in a tiny request made the node allocate
    4 MiB up front and hold it for the whole call. Now memory follows what the driver writes."""
    import tracemalloc

    big = wire.MAX_PAYLOAD - 4096
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        mems = [RegionUserMemory([wire.Region(0x100000, big, wire.REGION_OUT),
                                  wire.Region(0x1000000, 64, wire.REGION_IN | wire.REGION_OUT,
                                              bytes(64))])
                for _ in range(8)]
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 64 * 1024, f"{held} bytes held for 8 untouched 4 MiB OUT regions"
    mem = mems[0]
    assert mem.written_bytes == 0 and mem.writes() == ()
    mem.write(0x100000, b"head")
    mem.write(0x100000 + big - 4, b"tail")
    assert mem.written_bytes == 8  # two runs, not the 4 MiB between them
    (w,) = mem.writes()
    # the reported span: bytes the driver did not write are zero (OUT only)
    assert w.addr == 0x100000 and len(w.data) == big
    assert w.data[:4] == b"head" and w.data[-4:] == b"tail" and not any(w.data[4:-4])


def test_region_memory_runs_merge_and_in_out_regions_keep_what_was_sent():
    mem = RegionUserMemory([wire.Region(0x1000, 16, wire.REGION_IN | wire.REGION_OUT,
                                        b"abcdefghijklmnop")])
    mem.write(0x1002, b"XY")
    mem.write(0x1008, b"Z")
    assert mem.read(0x1000, 16) == b"abXYefghZjklmnop"
    mem.write(0x1004, b"1234")  # touches both runs: one run from 2 to 9
    assert mem.written_bytes == 7
    assert mem.writes() == (wire.Write(0x1002, b"XY1234Z"),)
    mem.write(0x1003, b"q")  # inside a run: in place
    assert mem.written_bytes == 7 and mem.read(0x1001, 4) == b"bXq1"


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), st.integers(1, 96),
       st.lists(st.tuples(st.integers(0, 95), st.binary(min_size=1, max_size=40)),
                max_size=10))
def test_region_memory_matches_a_plain_copy(sent, length, writes):
    data = bytes((i * 7) % 256 for i in range(length)) if sent else None
    flags = wire.REGION_OUT | (wire.REGION_IN if sent else 0)
    mem = RegionUserMemory([wire.Region(0x4000, length, flags, data)])
    ref = bytearray(data if data is not None else bytes(length))
    lo = hi = None
    for off, chunk in writes:
        chunk = chunk[: max(length - off, 0)]
        if not chunk:
            continue
        mem.write(0x4000 + off, chunk)
        ref[off : off + len(chunk)] = chunk
        lo = off if lo is None else min(lo, off)
        hi = off + len(chunk) if hi is None else max(hi, off + len(chunk))
        if sent:
            assert mem.read(0x4000, length) == bytes(ref)
    if lo is None:
        assert mem.writes() == ()
    else:
        assert mem.writes() == (wire.Write(0x4000 + lo, bytes(ref[lo:hi])),)
        assert mem.written_bytes <= hi - lo


# ---- the client's user-buffer table --------------------------------------------------------------


def _reader(read_log=None):
    def read(addr, size):
        if read_log is not None:
            read_log.append((addr, size))
        try:
            return ctypes.string_at(addr, size)
        except Exception:  # pragma: no cover - the tests only pass valid addresses
            return None

    return read


def test_every_row_names_real_fields():
    names = {d.name: d for d in io.IOCTLS.values()}
    for name, row in userbufs.USERBUFS.items():
        desc = names[name]
        args = desc.struct()
        for buf in row:
            assert isinstance(getattr(args, buf.field), int), (name, buf.field)
            assert buf.size(args) == 0 or buf.field in ("standard_allocation", "shared_handle")
            for inner in buf.inner:
                assert isinstance(getattr(buf.elem(), inner.field), int)


def test_enumadapters2_gathers_the_array():
    infos = (s.d3dkmt_adapterinfo * 3)()
    args = s.d3dkmt_enumadapters2(num_adapters=3, adapters=ctypes.addressof(infos))
    (r,) = userbufs.gather("LX_DXENUMADAPTERS2", args, _reader(), 1 << 20)
    assert (r.addr, r.length, r.flags) == (ctypes.addressof(infos), 60, userbufs.INOUT)
    args.adapters = 0
    assert userbufs.gather("LX_DXENUMADAPTERS2", args, _reader(), 1 << 20) == ()


def test_enumprocesses_uses_u32_pids():
    pids = (ctypes.c_uint32 * 5)()
    args = s.d3dkmt_enumprocesses(buffer=ctypes.addressof(pids), buffer_count=5)
    (r,) = userbufs.gather("LX_DXENUMPROCESSES", args, _reader(), 1 << 20)
    assert r.length == 20


def test_createallocation_gathers_nested_private_data():
    priv = [ctypes.create_string_buffer(b"P%d" % i, 16) for i in range(2)]
    infos = (s.d3dddi_allocationinfo2 * 2)()
    for i in range(2):
        infos[i].priv_drv_data = ctypes.addressof(priv[i])
        infos[i].priv_drv_data_size = 16
    args = s.d3dkmt_createallocation(alloc_count=2, allocation_info=ctypes.addressof(infos))
    regions = userbufs.gather("LX_DXCREATEALLOCATION", args, _reader(), 1 << 20)
    spans = {(r.addr, r.length) for r in regions}
    assert (ctypes.addressof(infos), 2 * 96) in spans
    for p in priv:
        assert any(
            r.addr <= ctypes.addressof(p) and ctypes.addressof(p) + 16 <= r.end for r in regions
        )


def test_overlapping_buffers_merge_into_one_region():
    buf = (ctypes.c_uint32 * 8)()
    base = ctypes.addressof(buf)
    args = s.d3dkmt_signalsynchronizationobjectfromcpu(
        object_count=2, objects=base, fence_values=base + 4
    )
    (r,) = userbufs.gather("LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMCPU", args, _reader(), 1 << 20)
    assert (r.addr, r.length) == (base, 4 + 16)
    assert r.data == ctypes.string_at(base, 20)


def test_unreadable_and_oversized_buffers_are_left_out():
    args = s.d3dkmt_queryadapterinfo(private_data=0x1234, private_data_size=64)
    assert userbufs.gather("LX_DXQUERYADAPTERINFO", args, lambda a, n: None, 1 << 20) == ()
    data = ctypes.create_string_buffer(64)
    args.private_data = ctypes.addressof(data)
    assert userbufs.gather("LX_DXQUERYADAPTERINFO", args, _reader(), 32) == ()
    assert len(userbufs.gather("LX_DXQUERYADAPTERINFO", args, _reader(), 1 << 20)) == 1


def test_union_pointer_skipped_when_flag_says_scalar():
    objs = (ctypes.c_uint32 * 1)()
    args = s.d3dkmt_signalsynchronizationobjectfromgpu2(
        object_count=1, objects=ctypes.addressof(objs)
    )
    args.flags.enqueue_cpu_event = 1
    args.cpu_event_handle = ctypes.addressof(objs) + 64
    log = []
    userbufs.gather("LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMGPU2", args, _reader(log), 1 << 20)
    assert log == [(ctypes.addressof(objs), 4)]


def test_ioctl_without_a_row_sends_nothing():
    args = s.d3dkmt_createdevice()
    assert userbufs.gather("LX_DXCREATEDEVICE", args, _reader(), 1 << 20) == ()


# ---- fast paths: the same bytes and frames as the general ones ---------------------------------


def test_encode_of_a_bare_struct_is_the_general_encoding():
    for msg in (wire.IoctlRequest(io.LX_DXENUMADAPTERS3 & 0xFFFFFFFF, bytes(24)),
                wire.IoctlRequest(0x1234, b""),
                wire.IoctlReply(-errno.EINTR, b"x" * 40),
                wire.IoctlReply(0x103, bytearray(b"abcd"))):
        for seq in (0, 7, 0x1_0000_0005, -1):
            kind, payload, nfds = wire._encode_payload(msg)
            assert wire.encode(msg, seq) == wire.frame_bytes(kind, seq, payload, nfds)
            want = (wire.IoctlReply(msg.ret, bytes(msg.struct))
                    if isinstance(msg, wire.IoctlReply) else msg)
            assert roundtrip(msg, seq & 0xFFFFFFFF) == want
    for msg in (wire.IoctlRequest(1, bytes(wire.MAX_STRUCT + 1)),
                wire.IoctlReply(0, bytes(wire.MAX_STRUCT + 1))):
        with pytest.raises(ValueError, match="struct too large"):
            wire.encode(msg, 1)
    with pytest.raises(struct.error):
        wire.encode(wire.IoctlReply(1 << 63, b""), 1)


def test_take_whole_gives_the_frame_next_frame_would_or_takes_nothing():
    a = wire.encode(wire.IoctlReply(3, b"abcd"), 9)
    b = wire.encode(wire.Cancel(), 4)
    dec = wire.FrameDecoder()
    assert dec.take_whole(a) == frames_of(a)[0] and dec.buffered == 0
    bad_magic = b"\0" + a[1:]
    too_long = wire.FrameDecoder(4)
    for data in (a[:10], a[:-1], a + b, a + a[:3], bad_magic, b""):
        assert dec.take_whole(data) is None and dec.buffered == 0
    assert too_long.take_whole(a) is None
    dec.feed(b[:5])  # something buffered: a whole frame after it is not taken alone
    assert dec.take_whole(a) is None and dec.buffered == 5
    dec.feed(b[5:] + a)
    assert dec.next_frame() == frames_of(b)[0] and dec.next_frame() == frames_of(a)[0]
    dec.feed(bad_magic)
    with pytest.raises(wire.WireError):
        dec.next_frame()
    assert dec.take_whole(a) is None  # broken: feed says so


def test_bare_ioctl_tables_checked_as_before():
    body = bytes(8)
    assert wire.decode(frame(wire.Kind.IOCTL, ioctl_payload(5, body, [], b""))) == \
        wire.IoctlRequest(5, body)
    with pytest.raises(wire.MalformedMessage, match="carries 2 data bytes, its regions declare 0"):
        wire.decode(frame(wire.Kind.IOCTL, ioctl_payload(5, body, [], b"zz")))
    assert wire.decode(frame(wire.Kind.IOCTL_REPLY, reply_payload(body, []))) == \
        wire.IoctlReply(0, body)
    with pytest.raises(wire.MalformedMessage, match="trailing bytes"):
        wire.decode(frame(wire.Kind.IOCTL_REPLY, reply_payload(body, []) + b"z"))
    with pytest.raises(wire.MalformedMessage, match="carries 1 descriptors"):
        wire.decode(frame(wire.Kind.IOCTL_REPLY, reply_payload(body, []), flags=1))


def test_region_memory_without_regions_or_descriptors():
    mem = RegionUserMemory()
    with pytest.raises(UserMemoryFault):
        mem.read(0x1000, 4)
    with pytest.raises(UserMemoryFault):
        mem.write(0x1000, b"x")
    with pytest.raises(OSError):
        mem.take_fd(3)
    assert mem.reply_fds() == ([], ()) and mem.writes() == () and mem.written_bytes == 0
    mem.close()
    mem.close()
    assert mem.read(0x1000, 0) == b""


# ---- block maps (wire 3) ------------------------------------------------------------------------

MAP_ENTRY = struct.Struct("<BBBBIQQQQ")


def test_block_maps_roundtrip_and_count_their_descriptors():
    maps = (wire.BlockMap(wire.MAP, 7, 1 << 20, 4096, 16, flags=wire.MAP_WITH_FD),
            wire.BlockMap(wire.MAP, 8, 65536, 8, 0x7000, wire.FD_IN_USER, wire.MAP_READONLY),
            wire.BlockMap(wire.UNMAP, 3, width=0))
    reply = wire.IoctlReply(0, bytes(24), (wire.Write(0x7000, b"x" * 8),),
                            (wire.FdFixup(wire.FD_IN_STRUCT, 0, 4),), maps)
    data = wire.encode(reply, 5)
    (f,) = frames_of(data)
    assert f.fd_count == 2  # one fixup, one MAP_WITH_FD
    assert wire.decode(f) == reply
    assert reply.fd_count == 2


@pytest.mark.parametrize("entry", [
    (wire.MAP, 0, 0, 8, 0, 1, 4096, 4096, 0),  # offset outside the block
    (wire.MAP, 0, 0, 8, 0, 1, 0, 0, 0),  # empty block
    (wire.MAP, 0, 0, 4, 0, 1, 4096, 0, 0),  # width 4
    (wire.MAP, 0, 0, 8, 0, 1, 4096, 0, 20),  # address past the 24-byte struct
    (wire.MAP, 1, 0, 8, 0, 1, 4096, 0, 0),  # user address 0
    (wire.MAP, 0, 8, 8, 0, 1, 4096, 0, 0),  # unknown flag
    (wire.MAP, 0, 0, 8, 1, 1, 4096, 0, 0),  # reserved set
    (wire.UNMAP, 0, 0, 8, 0, 1, 0, 0, 0),  # an UNMAP with a width
    (9, 0, 0, 8, 0, 1, 4096, 0, 0),  # unknown op
])
def test_malformed_block_maps(entry):
    p = struct.pack("<qIIII", 0, 24, 0, 0, 1) + bytes(24) + MAP_ENTRY.pack(*entry)
    with pytest.raises(wire.MalformedMessage):
        wire.decode(frame(wire.Kind.IOCTL_REPLY, p, flags=entry[2] & wire.MAP_WITH_FD))


def test_block_map_descriptor_count_must_match_the_frame():
    p = struct.pack("<qIIII", 0, 24, 0, 0, 1) + bytes(24) + MAP_ENTRY.pack(
        wire.MAP, 0, wire.MAP_WITH_FD, 8, 0, 1, 4096, 0, 0)
    with pytest.raises(wire.MalformedMessage):
        wire.decode(frame(wire.Kind.IOCTL_REPLY, p, flags=0))
    assert wire.decode(frame(wire.Kind.IOCTL_REPLY, p, flags=1)).maps[0].with_fd


def test_too_many_block_maps_are_refused_both_ways():
    many = tuple(wire.BlockMap(wire.UNMAP, i, width=0) for i in range(wire.MAX_MAPS + 1))
    with pytest.raises(ValueError):
        wire.encode(wire.IoctlReply(0, b"", maps=many), 1)
    p = struct.pack("<qIIII", 0, 0, 0, 0, wire.MAX_MAPS + 1)
    with pytest.raises(wire.MalformedMessage):
        wire.decode(frame(wire.Kind.IOCTL_REPLY, p))


def test_region_memory_collects_block_maps_and_closes_their_descriptors():
    import os

    mem = RegionUserMemory([wire.Region(0x1000, 8, wire.REGION_OUT)])
    r, w = os.pipe()
    try:
        mem.map_block(1, 8192, 4096, 16, fd=w)
        mem.map_block(1, 8192, 0, 0x1000, in_struct=False, readonly=True)
        with pytest.raises(UserMemoryFault):
            mem.map_block(2, 8192, 0, 0x2000, in_struct=False)  # not in a writable region
        assert mem.unmap_block(9)
        maps, fds = mem.reply_maps()
        assert [m.op for m in maps] == [wire.MAP, wire.MAP, wire.UNMAP]
        assert maps[1].target == wire.FD_IN_USER and maps[1].flags == wire.MAP_READONLY
        assert fds == [w]
        mem.close()
        with pytest.raises(OSError):
            os.fstat(w)  # closed with the accessor
    finally:
        os.close(r)
