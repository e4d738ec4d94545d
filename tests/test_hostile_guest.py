"""A real host against a malicious guest (issue 9, part 4), on real sockets.

A well-behaved guest (the real GuestDriver and node of tests/conftest.make_stack) first runs
one valid call of almost every ioctl (tests/hostile_scenario.STEPS); the host side records every
message that guest sent and every reply. A raw guest (tests/test_host.RawGuest: a bus of its own
and hand-made DXGK messages) then replays the creating messages in a partition of its own,
learning its own host handles from the replies (the recorded handles translated word by word),
and sends, for every command of dxg.protocol.table, hypothesis-made bodies: random bytes,
recorded valid bodies cut short, extended, with a word made huge, zero, a handle of another kind,
a handle of the other guest's partition or a dead one; headers naming another process or none,
the wrong adapter, the wrong channel; descriptors where none belong. For each:

* a request that wants a completion is answered before a deadline, in the command's reply
  layout or with the 4-byte failure status (never STATUS_INTERNAL_ERROR, and no catch-all or
  traceback in the log);
* the raw guest is still served afterwards, and so is the other guest (its process, objects
  and data untouched);
* once the raw guest disconnects the host holds nothing of it: its partition is gone and the
  census (processes, devices, contexts, handles, committed bytes, shared objects) and the open
  descriptors are back to the baseline.

Framing violations (bad magic, oversized frames, unknown packet types or flags, descriptors or
bulk chunks no frame claims) drop only that guest, as docs/protocol.md says, and free all it
held."""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import Stack, make_stack, wait_until
from dxg.client.api import Node
from dxg.host.host import Host
from dxg.oslib.memfd import memfd_from_bytes
from dxg.protocol import framing
from dxg.protocol.commands import GlobalCommand, VgpuCommand
from dxg.protocol.errors import ProtocolError
from dxg.protocol.guids import guid_to_luid
from dxg.protocol.headers import decode_guest, encode_global, encode_vgpu
from dxg.protocol.table import COMMANDS, CommandSpec, Route
from dxg.uapi.ntstatus import NTSTATUS, nt_success
from dxg.vmbus.channel import Channel
from hostile_scenario import STEPS, Target, build_objects
from hostile_support import (
    DEADLINE,
    RawNodeClient,
    host_left,
    hostile_settings,
    log_watch,
    open_files,
)
from test_host import RawGuest
from test_protocol import SAMPLE

EXAMPLES = int(os.environ.get("PYDXG_HOSTILE_GUEST_EXAMPLES", "4"))
SPECS = sorted(COMMANDS.values(), key=lambda s: int(s.command))
# The messages that make objects: replayed so that the raw guest holds objects of every kind.
CREATES = frozenset({GlobalCommand.CREATEPROCESS, VgpuCommand.OPENADAPTER,
                     VgpuCommand.CREATEDEVICE, VgpuCommand.CREATECONTEXTVIRTUAL,
                     VgpuCommand.CREATEALLOCATION, VgpuCommand.CREATESYNCOBJECT,
                     VgpuCommand.CREATEPAGINGQUEUE, VgpuCommand.CREATEHWQUEUE,
                     GlobalCommand.CREATENTSHAREDOBJECT, VgpuCommand.OPENRESOURCE,
                     GlobalCommand.OPENSYNCOBJECT})
INTERNAL = int(NTSTATUS.STATUS_INTERNAL_ERROR)


def handle_like(w: int) -> bool:
    """A host handle's shape: no instance bits, an index, a generation."""
    return w & 0x3F == 0 and w >> 30 != 0 and (w >> 6) & 0xFFFFFF < 1 << 20


def words(data: bytes) -> list[int]:
    return [int.from_bytes(data[i:i + 4], "little") for i in range(0, len(data) - 3, 4)]


# ---- what the good guest sent ---------------------------------------------------------------------


@dataclass
class Recorded:
    payload: bytes
    wants: bool
    adapter: int | None  # the vGPU channel's adapter index, None: the global channel
    reply: bytes | None = None

    @property
    def command(self) -> Any:
        return decode_guest(self.payload).command


def _flat(payload: Any) -> bytes:
    return bytes(payload) if isinstance(payload, bytes | bytearray | memoryview) else \
        b"".join(bytes(p) for p in payload.parts)


def record_partition(host: Host, log: list[Recorded]) -> Any:
    """Record what the (only) partition's channels receive and answer; returns the undo."""
    (part,) = host.partitions()
    undo: list[Any] = []

    def install() -> None:
        channels: list[tuple[int | None, Channel]] = [(None, part.global_channel)]
        channels += list(part.vgpu_channels.items())
        for index, ch in channels:
            pending: dict[int, Recorded] = {}
            real_request, real_complete = ch.on_request, ch.complete

            def on_request(packet: Any, _ch: Channel = ch, _real: Any = real_request,
                           _index: int | None = index,
                           _pending: dict[int, Recorded] = pending) -> None:
                entry = Recorded(_flat(packet.payload), packet.wants_completion, _index)
                log.append(entry)
                if entry.wants:
                    _pending[packet.trans_id] = entry
                _real(_ch, packet)

            def complete(trans_id: int, payload: Any, fds: Any = (),
                         _real: Any = real_complete,
                         _pending: dict[int, Recorded] = pending) -> bool:
                entry = _pending.pop(trans_id, None)
                if entry is not None:
                    entry.reply = _flat(payload)
                return _real(trans_id, payload, fds)

            ch.on_request = lambda _c, p, _f=on_request: _f(p)
            ch.complete = complete
            undo.append((ch, real_request))

    def remove() -> None:
        for ch, real in undo:
            ch.on_request = real
            del ch.complete

    host.rt.call(install)
    return lambda: host.rt.call(remove)


@dataclass
class Arena:
    stack: Stack
    recorded: list[Recorded]
    neighbour: RawNodeClient
    nb: dict[str, Any] = field(default_factory=dict)
    base_host: dict[str, int] = field(default_factory=dict)
    base_files: set[tuple[int, int]] = field(default_factory=set)
    foreign: list[int] = field(default_factory=list)  # handles of the good guest's partition

    @property
    def host(self) -> Host:
        return self.stack.host

    def by_command(self, command: Any) -> list[Recorded]:
        return [r for r in self.recorded if r.command == command]

    def neighbour_served(self) -> None:
        """The good guest's client: its objects as it left them, and served by the host."""
        nb = self.nb
        assert nb["adapter"].description
        assert nb["fence"].value == 5
        assert nb["alloc"].download(9) == b"neighbour"
        nb["device"].create_context().close()
        assert nb["device"].execution_state() == 1

    def clean(self) -> bool:
        return (len(self.host.partitions()) == 1 and host_left(self.host) == self.base_host
                and open_files() <= self.base_files)

    def check_clean(self) -> None:
        try:
            wait_until(self.clean, DEADLINE, "nothing of the raw guest left")
        except AssertionError:
            raise AssertionError(
                f"left behind: {len(self.host.partitions())} partitions; host "
                f"{host_left(self.host)} vs {self.base_host}; "
                f"files {open_files() - self.base_files}") from None


@pytest.fixture(scope="module")
def arena(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Arena]:
    with make_stack(Path(tmp_path_factory.mktemp("hg")), "hg", adapters=2) as stack:
        recorded: list[Recorded] = []
        stop = record_partition(stack.host, recorded)
        raw = RawNodeClient(stack.node_path)
        try:
            t = Target(raw, Node(raw), luids=[a.luid for a in stack.driver.active_adapters()])
            build_objects(t)
            for step in STEPS.values():
                step(t)
        finally:
            stop()
            raw.close()
            for obj in t.keep:
                obj.close()
        neighbour = RawNodeClient(stack.node_path)
        a = Arena(stack, recorded, neighbour)
        try:
            node = Node(neighbour)
            ad = node.adapters()[0]
            dev = ad.create_device()
            alloc = dev.allocate(8192)
            alloc.upload(b"neighbour" * 10)
            a.nb = {"adapter": ad, "device": dev, "alloc": alloc, "fence": dev.fence(5),
                    "context": dev.create_context()}
            a.foreign = sorted({w for r in recorded if r.reply for w in words(r.reply)
                                if handle_like(w)})[:64]
            wait_until(lambda: host_left(stack.host)["processes"] == 1, DEADLINE)
            a.base_host = host_left(stack.host)
            a.base_files = open_files()
            yield a
        finally:
            neighbour.close()


# ---- a raw guest with objects of its own -----------------------------------------------------------


class Replayer:
    """A raw guest that replays the good guest's creating messages in its own partition and
    translates the good guest's host handles into its own, word by word."""

    def __init__(self, arena: Arena) -> None:
        self.arena = arena
        self.g = RawGuest(arena.stack.host_address, name="malicious")
        self.map: dict[int, int] = {}
        self.mine: list[int] = []  # host handles of this partition
        try:
            wait_until(lambda: len(self.g.driver.vgpus) == 2, DEADLINE)
            theirs = {a.luid: a.host_handle for a in arena.stack.driver.active_adapters()}
            for i in range(2):  # OPENADAPTER (the good guest's came before the recording)
                ours = self.g.open_adapter(i).host_adapter_handle
                assert ours
                self.map[theirs[guid_to_luid(self.g.vgpu_offer(i).instance_guid)]] = ours
                self.mine.append(ours)
            for r in arena.recorded:
                if r.command in CREATES and r.wants and r.reply is not None:
                    reply = self.send(self.translate(r.payload), True, r.adapter)
                    assert reply is not None
                    self.learn(r.reply, reply)
            # another process of this guest, with a device: its handles are "another process's"
            other = self.g.create_process(pid=4343, name="other")
            self.mine += [other, self.g.create_device(0, other)]
        except BaseException:
            self.g.close()
            raise

    def close(self) -> None:
        self.g.close()

    def translate(self, payload: bytes) -> bytes:
        out = bytearray(payload)
        for i in range(0, len(out) - 3, 4):
            w = int.from_bytes(out[i:i + 4], "little")
            if w in self.map:
                out[i:i + 4] = self.map[w].to_bytes(4, "little")
        return bytes(out)

    def learn(self, theirs: bytes, ours: bytes) -> None:
        if len(theirs) != len(ours):
            return
        for a, b in zip(words(theirs), words(ours), strict=True):
            if handle_like(a) and handle_like(b) and a not in self.map:
                self.map[a] = b
                self.mine.append(b)

    def channel(self, adapter: int | None) -> Channel:
        return self.g.glob if adapter is None else self.g.vch(adapter)

    def send(self, payload: bytes, wants: bool, adapter: int | None,
             fds: tuple[int, ...] = ()) -> bytes | None:
        ch = self.channel(adapter)
        if not wants:
            self.g.rt.call(ch.send_async, payload, fds)
            return None
        return self.g.request(ch, payload, fds)

    def served(self) -> None:
        """A normal request of this guest is still answered."""
        hp = self.g.create_process(pid=777, name="after")
        assert hp
        assert self.g.destroy_process(hp) == NTSTATUS.STATUS_SUCCESS


# ---- hostile messages ---------------------------------------------------------------------------


def reply_ok(spec: CommandSpec, reply: bytes) -> bool:
    """The command's reply layout (or the 4-byte failure status), never an internal error."""
    if len(reply) == 4:
        status = struct.unpack("<I", reply)[0]
        if status == INTERNAL:
            return False
        try:
            spec.parse_reply(reply)
            return True
        except ProtocolError:
            return not nt_success(status)
    try:
        parsed = spec.parse_reply(reply)
    except ProtocolError:
        return False
    return getattr(parsed, "status", 0) != INTERNAL


@dataclass
class Hostile:
    payload: bytes
    wants: bool
    adapter: int | None
    fds: list[str]  # descriptors sent with it (FILES)
    what: str


def _put(raw: bytearray, off: int, width: int, value: int) -> None:
    raw[off:off + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")


@st.composite
def hostile_message(draw: st.DrawFn, spec: CommandSpec, r: Replayer) -> Hostile:
    recorded = r.arena.by_command(spec.command)
    if recorded and draw(st.integers(0, 4)):
        rec = draw(st.sampled_from(recorded))
        payload, wants, adapter = r.translate(rec.payload), rec.wants, rec.adapter
    else:
        body = SAMPLE[spec.request].pack()  # type: ignore[attr-defined]
        adapter = None if spec.route == Route.GLOBAL else draw(st.sampled_from([0, 1]))
        process = draw(st.sampled_from(r.mine or [0])) if spec.per_process else 0
        if isinstance(spec.command, GlobalCommand):
            payload = encode_global(spec.command, process, body)
            adapter = None
        else:
            payload = encode_vgpu(spec.command, process, r.g.vgpu_luids[adapter or 0], body)
            if spec.route != Route.VGPU_ONLY and draw(st.booleans()):
                adapter = None
        wants = True
    raw = bytearray(payload)
    head = 40  # extension header + command header
    pool = [*r.mine, *r.arena.foreign, 0, 0xFFFF_FFFF, 0x4000_0040, 0x7FFF_FFFF]
    what = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["word", "word", "word", "cut", "extend", "random-body",
                                     "process", "luid", "channel", "fds", "completion"]))
        what.append(kind)
        if kind == "word" and len(raw) > head + 3:
            width = draw(st.sampled_from([4, 8])) if len(raw) >= head + 8 else 4
            off = head + draw(st.integers(0, (len(raw) - head - width) // 4)) * 4
            value = draw(st.one_of(
                st.sampled_from(pool),
                st.sampled_from([1, 2, 0x80, 0xFFFF, 1 << 20, 1 << 31, (1 << 64) - 1,
                                 1 << 63, 0x1_0000_0000]),
                st.integers(0, (1 << (8 * width)) - 1)))
            _put(raw, off, width, value)
        elif kind == "cut" and len(raw) > head:
            del raw[draw(st.integers(head, len(raw) - 1)):]
        elif kind == "extend":
            raw += draw(st.binary(min_size=1, max_size=64))
        elif kind == "random-body":
            del raw[head:]
            raw += draw(st.binary(max_size=300))
        elif kind == "process":
            _put(raw, 24, 4, draw(st.sampled_from(pool)))
        elif kind == "luid":
            _put(raw, 8, 8, draw(st.sampled_from([0, 1, (1 << 64) - 1,
                                                  *r.g.vgpu_luids])))
        elif kind == "channel":
            adapter = draw(st.sampled_from([None, 0, 1]))
        elif kind == "completion":
            wants = not wants if spec.asynchronous else wants
    fds = draw(st.lists(st.sampled_from(sorted(FILES)), min_size=1, max_size=3)) \
        if "fds" in what else []
    return Hostile(bytes(raw), wants, adapter, fds, "+".join(what))


def _memfd() -> int:
    return memfd_from_bytes(b"guest's" * 100, "hostile-guest")


# descriptors a guest may attach where none, or others, belong
FILES = {
    "devnull": lambda: os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC),
    "eventfd": lambda: os.eventfd(0, os.EFD_CLOEXEC),
    "full eventfd": lambda: _full_eventfd(),
    "memfd": _memfd,
    "pipe": lambda: _pipe_end(),
}


def _full_eventfd() -> int:
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    os.eventfd_write(fd, 0xFFFF_FFFF_FFFF_FFFE)  # no room: a write to it would block
    return fd


def _pipe_end() -> int:
    r, w = os.pipe2(os.O_CLOEXEC)
    os.close(r)
    return w


def send_hostile(r: Replayer, spec: CommandSpec, h: Hostile) -> None:
    fds = [FILES[name]() for name in h.fds]
    try:
        reply = r.send(h.payload, h.wants, h.adapter, tuple(fds))
    finally:
        for fd in fds:
            os.close(fd)
    if reply is not None:
        assert reply_ok(spec, reply), (spec.name, h.what, reply[:32].hex())


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
@hostile_settings(EXAMPLES)
@given(data=st.data())
def test_every_command_from_a_malicious_guest(arena: Arena, spec: CommandSpec,
                                              data: st.DataObject) -> None:
    with log_watch() as watch:
        r = Replayer(arena)
        try:
            messages = data.draw(st.lists(hostile_message(spec, r), min_size=1, max_size=4))
            how = data.draw(st.sampled_from(["one by one", "one by one", "all at once",
                                             "hang up"]))
            if how == "one by one":
                for h in messages:
                    send_hostile(r, spec, h)
            else:  # in flight together; or the guest goes before the answers come
                sent = send_all(r, messages)
                if how == "hang up":
                    r.g.hang_up()
                else:
                    for h, future in sent:
                        reply = future.result(DEADLINE)
                        assert reply_ok(spec, reply), (spec.name, h.what, reply[:32].hex())
            if how != "hang up":
                assert r.g.connected
                r.served()
            arena.neighbour_served()
        finally:
            r.close()
        arena.check_clean()
    assert not watch.records, watch.take()


def send_all(r: Replayer, messages: list[Hostile]) -> list[tuple[Hostile, Any]]:
    """Send them all without waiting: (message, future of its reply) of those that want one."""
    async def start() -> list[tuple[Hostile, Any]]:
        out = []
        for h in messages:
            fds = [FILES[name]() for name in h.fds]
            try:
                ch = r.channel(h.adapter)
                if h.wants:
                    out.append((h, asyncio.ensure_future(ch.request(h.payload, fds))))
                else:
                    ch.send_async(h.payload, fds)
            finally:
                for fd in fds:
                    os.close(fd)
        return out

    async def payload_of(future: Any) -> bytes:
        packet = await future
        packet.close_fds()
        return bytes(packet.payload)

    started = r.g.rt.run(start(), DEADLINE)
    return [(h, r.g.rt.spawn(payload_of(f))) for h, f in started]


# ---- framing violations -----------------------------------------------------------------------------


def _frame(relid: int, ptype: int, payload: bytes, flags: int = 0, trans: int = 0,
           magic: int = framing.MAGIC, length: int | None = None) -> bytes:
    return framing.FRAME_HEADER.pack(magic, len(payload) if length is None else length, relid,
                                     ptype, flags, trans) + payload


INBAND, BULK, COMP = framing.VM_PKT_DATA_INBAND, framing.VM_PKT_BULK, framing.VM_PKT_COMP
GLOBAL_RELID = 1
# what a guest may break, and whether the host drops it for that (docs/protocol.md, section 1)
VIOLATIONS = {
    "bad magic": (_frame(GLOBAL_RELID, INBAND, b"x" * 40, magic=0), True),
    "oversized frame": (_frame(GLOBAL_RELID, INBAND, b"", length=framing.DXG_MAX_VM_BUS_PACKET_SIZE
                               + 1), True),
    "unknown packet type": (_frame(GLOBAL_RELID, 7, b"x" * 40), True),
    "unknown flag": (_frame(GLOBAL_RELID, INBAND, b"x" * 40, flags=0x4), True),
    "descriptors that never came": (_frame(GLOBAL_RELID, INBAND, b"x" * 40,
                                           flags=1 << framing.FLAG_FD_SHIFT), True),
    "too many descriptors": (_frame(GLOBAL_RELID, INBAND, b"x" * 40,
                                    flags=0xFF << framing.FLAG_FD_SHIFT), True),
    "a bulk chunk no packet claims": (_frame(GLOBAL_RELID, BULK, b"y" * 100)
                                      + _frame(GLOBAL_RELID, INBAND, b"x" * 40, trans=5,
                                               flags=framing.FLAG_COMPLETION_REQUESTED), True),
    # (an attachment of no bytes: the message is the packet, answered as any other)
    "has-bulk with no chunks": (_frame(GLOBAL_RELID, INBAND, b"x" * 40,
                                       flags=framing.FLAG_HAS_BULK), False),
    "a control message that does not parse": (_frame(0, INBAND, b"\xff\xff\xff\x7f" + b"z" * 9),
                                              True),
    # not protocol errors: answered, dropped or ignored, and the guest goes on
    "a completion nobody asked for": (_frame(GLOBAL_RELID, COMP, b"\0" * 8, trans=999_999),
                                      False),
    "a packet for a channel that is not open": (_frame(77, INBAND, b"x" * 40, trans=3,
                                                       flags=framing.FLAG_COMPLETION_REQUESTED),
                                                False),
}


def write_raw(r: Replayer, data: bytes) -> None:
    conn = r.g.bus._conn
    assert conn is not None
    r.g.rt.call(conn.transport.write, data)


@pytest.mark.parametrize("violation", sorted(VIOLATIONS))
def test_a_framing_violation_drops_only_that_guest(arena: Arena, violation: str) -> None:
    data, dropped = VIOLATIONS[violation]
    with log_watch() as watch:
        r = Replayer(arena)
        try:
            write_raw(r, data)
            if dropped:
                wait_until(lambda: not r.g.connected, DEADLINE, "the host drops the guest")
            else:
                r.served()
                assert r.g.connected
            arena.neighbour_served()
        finally:
            r.close()
        arena.check_clean()
    assert not watch.records, watch.take()


@hostile_settings(EXAMPLES * 5)
@given(garbage=st.binary(min_size=1, max_size=400),
       header=st.booleans(), relid=st.sampled_from([0, 1, 2, 3, 77]),
       ptype=st.sampled_from([INBAND, BULK, COMP, 0, 7]), flags=st.integers(0, 0xFFFF))
def test_random_frames_from_a_guest_leave_nothing_behind(arena: Arena, garbage: bytes,
                                                         header: bool, relid: int, ptype: int,
                                                         flags: int) -> None:
    """Whatever a guest writes: the host answers, ignores or drops it; never anything else."""
    with log_watch() as watch:
        r = Replayer(arena)
        try:
            write_raw(r, _frame(relid, ptype, garbage, flags) if header else garbage)
            if r.g.connected:
                try:
                    r.served()
                except Exception:  # dropped meanwhile: that is allowed
                    wait_until(lambda: not r.g.connected, DEADLINE, "the host drops the guest")
            arena.neighbour_served()
        finally:
            r.close()
        arena.check_clean()
    assert not watch.records, watch.take()
