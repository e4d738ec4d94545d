"""A real guest driver and node against a malicious host (issue 9, part 4), on real sockets.

The host is a real Host whose partition for the guest is made to lie: its replies to the
guest's requests pass through hypothesis-made tampering before they go on the wire (random
bytes; the true reply cut short or extended; a status word made success, an unknown success
code or a failure; a handle, size, offset or count made 0, huge or someone else's; the
descriptors the reply carries dropped, or others added), and it sends the guest hypothesis-made
traffic of its own: host->guest notifications (SIGNALGUESTEVENT for the guest's live event ids
and others, with any status; PYDXG_FENCEVALUE with any value; SETGUESTDATA at the device-state
cookie or elsewhere; unknown commands; malformed bodies), completions for requests never made,
requests the guest never answers, and bus control messages (offers with garbage, a RESCIND of a
channel that is not there, OPEN_RESULT nobody asked for, PING).

Through it all a client (the raw node client of tests/hostile_support, using the client API)
runs one valid call of each ioctl (tests/hostile_scenario.STEPS). Then:

* every call is answered before a deadline, with a return the docs allow (-EPROTO for a reply
  the guest cannot trust, -ENODEV for an adapter it lost, the host's failure mapped), and the
  node's replies stay well-formed (no write outside the client's buffers, no broken frame);
* no catch-all fired on the guest or the node (no error logged with a traceback);
* once the tampering stops the guest serves normal calls again (adapters that went come back),
  and once the client goes nothing of it is left: no guest process, no host objects, no
  descriptors the host sent kept open."""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import Stack, make_stack, wait_until
from dxg.client.api import Node
from dxg.client.errors import DxgError, NodeError
from dxg.guest.driver import GuestDriver
from dxg.host.config import HostConfig
from dxg.host.host import Host
from dxg.host.process import drop_process
from dxg.node.server import SocketNode
from dxg.oslib.memfd import memfd_from_bytes
from dxg.protocol import bus as b
from dxg.protocol import messages as m
from dxg.protocol.commands import HostToVmCommand
from dxg.protocol.framing import VM_PKT_DATA_INBAND
from dxg.protocol.headers import decode_guest, encode_host_to_vm
from dxg.uapi.ntstatus import NTSTATUS
from dxg.vmbus.channel import Channel
from dxg.vmbus.transport import TransportClosed
from hostile_scenario import STEPS, Target, build_objects
from hostile_support import (
    DEADLINE,
    NoAnswer,
    NodeBroke,
    NodeHungUp,
    RawNodeClient,
    allowed_return,
    host_left,
    hostile_settings,
    log_watch,
    open_files,
)

EXAMPLES = int(os.environ.get("PYDXG_HOSTILE_HOST_EXAMPLES", "4"))
STATUSES = [0, int(NTSTATUS.STATUS_PENDING), int(NTSTATUS.STATUS_TIMEOUT), 0x0000_0104,
            0x4000_0000, int(NTSTATUS.STATUS_INVALID_PARAMETER),
            int(NTSTATUS.STATUS_DEVICE_REMOVED), int(NTSTATUS.STATUS_NO_MEMORY),
            int(NTSTATUS.STATUS_INVALID_HANDLE), int(NTSTATUS.STATUS_INTERNAL_ERROR),
            0xC000_0001, 0xFFFF_FFFF, 0x8000_0005]


# ---- tampering -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tamper:
    """What to do to one reply (drawn before the call: applied on the host's loop)."""

    kind: str  # pass, random, cut, extend, word, status, fds-drop, fds-add, empty
    at: float = 0.0  # where, as a fraction of the reply
    value: int = 0
    data: bytes = b""

    def apply(self, payload: bytes, fds: list[int], can_pass_fds: bool = True
              ) -> tuple[bytes, list[int], list[int]]:
        """(the reply, its descriptors, descriptors made here that the caller closes after).
        Over a link without descriptors (TCP) none are added: the transport refuses them."""
        raw = bytearray(payload)
        extra: list[int] = []
        if self.kind == "random":
            raw = bytearray(self.data)
        elif self.kind == "empty":
            raw = bytearray()
        elif self.kind == "cut" and raw:
            del raw[int(self.at * len(raw)):]
        elif self.kind == "extend":
            raw += self.data or b"\0"
        elif self.kind == "word" and len(raw) >= 4:
            width = 8 if self.value > 0xFFFF_FFFF and len(raw) >= 8 else 4
            off = int(self.at * ((len(raw) - width) // 4 + 1)) * 4
            off = min(off, len(raw) - width)
            raw[off:off + width] = (self.value & ((1 << (8 * width)) - 1)).to_bytes(width,
                                                                                  "little")
        elif self.kind == "status" and len(raw) >= 4:
            raw[0:4] = struct.pack("<I", self.value)
        elif self.kind == "fds-drop":
            fds = []
        elif self.kind == "fds-add" and can_pass_fds:
            fd = memfd_from_bytes(b"unasked" * 10, "hostile-host")
            extra.append(fd)
            fds = [*fds, fd]
        return bytes(raw), fds, extra


tampers = st.one_of(
    st.just(Tamper("pass")),
    st.builds(Tamper, st.just("random"), data=st.binary(max_size=200)),
    st.just(Tamper("empty")),
    st.builds(Tamper, st.just("cut"), at=st.floats(0, 0.99)),
    st.builds(Tamper, st.just("extend"), data=st.binary(min_size=1, max_size=40)),
    st.builds(Tamper, st.just("word"), at=st.floats(0, 1), value=st.one_of(
        st.sampled_from([0, 1, 0x40, 0x4000_0040, 0xFFFF_FFFF, 0x7FFF_FFFF, 1 << 32,
                         (1 << 64) - 1, 1 << 63, 4096, 4097]),
        st.integers(0, (1 << 64) - 1))),
    st.builds(Tamper, st.just("status"), value=st.sampled_from(STATUSES)),
    st.just(Tamper("fds-drop")),
    st.just(Tamper("fds-add")),
)


class LyingHost:
    """Makes the guest's partition on ``host`` tamper with its replies, in order, from a
    list of plans (replies past the list go out untouched)."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.plans: list[Tamper] = []
        self.replies = 0
        self.seen: list[str] = []
        self.tampered: list[str] = []  # the commands whose replies were changed
        self._undo: list[Channel] = []

    @property
    def partition(self) -> Any:
        """The guest's partition (the newest: a guest that dropped the link dials again), or
        None while it has none."""
        return max(self.stack.host.partitions(), key=lambda p: p.id, default=None)

    def __enter__(self) -> LyingHost:
        def install() -> None:
            part = self.partition
            for ch in [part.global_channel, *part.vgpu_channels.values()]:
                if ch is None:
                    continue
                commands: dict[int, str] = {}
                real_request, real_complete = ch.on_request, ch.complete

                def on_request(c: Channel, packet: Any, _real: Any = real_request,
                               _commands: dict[int, str] = commands) -> None:
                    if packet.wants_completion:
                        try:
                            _commands[packet.trans_id] = decode_guest(
                                bytes(packet.payload)).command.name
                        except Exception:
                            _commands[packet.trans_id] = "?"
                    _real(c, packet)

                def complete(trans_id: int, payload: Any, fds: Any = (),
                             _real: Any = real_complete, _ch: Channel = ch,
                             _commands: dict[int, str] = commands) -> bool:
                    command = _commands.pop(trans_id, "?")
                    self.seen.append(command)
                    plan = self.plans[self.replies] if self.replies < len(self.plans) else None
                    self.replies += 1
                    if plan is None or plan.kind == "pass":
                        return _real(trans_id, payload, fds)
                    self.tampered.append(command)
                    flat = bytes(payload) if isinstance(payload, bytes | bytearray) else \
                        b"".join(bytes(p) for p in payload.parts)
                    new, new_fds, extra = plan.apply(flat, list(fds), _ch.can_pass_fds)
                    try:
                        return _real(trans_id, new, new_fds)
                    finally:
                        for fd in extra:
                            os.close(fd)

                ch.on_request = on_request
                ch.complete = complete
                self._undo.append(ch)
                ch._hostile_real = (real_request, real_complete)  # type: ignore[attr-defined]

        self.stack.host.rt.call(install)
        return self

    def __exit__(self, *exc: object) -> None:
        def remove() -> None:
            for ch in self._undo:
                ch.on_request = ch._hostile_real[0]  # type: ignore[attr-defined]
                del ch.complete
                del ch._hostile_real  # type: ignore[attr-defined]
            self._undo.clear()

        self.stack.host.rt.call(remove)

    # -- traffic of its own --

    def notify(self, payload: bytes, wants: bool = False, trans_id: int = 0) -> None:
        def send() -> None:
            ch = self.partition.global_channel if self.partition is not None else None
            if ch is None or ch.closed:
                return
            with contextlib.suppress(TransportClosed, ConnectionError):
                if wants:
                    ch.connection.send(ch.relid, VM_PKT_DATA_INBAND, payload, trans_id or 1,
                                       wants_completion=True)
                else:
                    ch.notify(payload)
        self.stack.host.rt.call(send)

    def complete_stray(self, trans_id: int, payload: bytes) -> None:
        def send() -> None:
            ch = self.partition.global_channel if self.partition is not None else None
            if ch is not None and not ch.closed:
                ch.complete(trans_id, payload)
        self.stack.host.rt.call(send)

    def raw(self, data: bytes) -> None:
        """Bytes straight onto the wire (a broken frame: the guest drops the link)."""
        def send() -> None:
            session = self.partition.session if self.partition is not None else None
            if session is not None and not session.conn.closed:
                with contextlib.suppress(TransportClosed, ConnectionError):
                    session.conn.transport.write(data)
        self.stack.host.rt.call(send)

    def control(self, msg: b.BusMessage) -> None:
        def send() -> None:
            session = self.partition.session if self.partition is not None else None
            if session is not None and not session.conn.closed:
                with contextlib.suppress(TransportClosed, ConnectionError):
                    session.conn.send_control(msg)
        self.stack.host.rt.call(send)


@dataclass(frozen=True)
class EventId:
    """An event id relative to the guest's next one when sent (ids near it are live), or
    absolute."""

    rel: int | None = None
    absolute: int = 0

    def resolve(self, next_event: int) -> int:
        return max(0, next_event + self.rel) if self.rel is not None else self.absolute


event_ids = st.one_of(st.builds(EventId, st.integers(-6, 2)),
                      st.builds(EventId, st.none(), st.sampled_from([0, (1 << 64) - 1])),
                      st.builds(EventId, st.none(), st.integers(0, (1 << 64) - 1)))


@st.composite
def notification(draw: st.DrawFn) -> tuple[str, Any]:
    """One piece of the host's own traffic (event ids and the cookie filled in when sent)."""
    kind = draw(st.sampled_from(["event", "event", "fence", "guestdata", "unknown",
                                 "malformed", "stray", "request", "control", "garbage"]))
    if kind == "garbage":
        return kind, draw(st.one_of(
            st.binary(min_size=24, max_size=200),
            st.builds(lambda relid, ptype, flags, payload: struct.pack(
                "<IIIHHQ", 0x42475844, len(payload), relid, ptype, flags, 0) + payload,
                st.sampled_from([0, 1, 2, 3, 99]), st.sampled_from([6, 9, 11, 7]),
                st.integers(0, 0xFFFF), st.binary(max_size=100))))
    if kind == "event":
        cmd = draw(st.sampled_from([HostToVmCommand.SIGNALGUESTEVENT,
                                    HostToVmCommand.SIGNALGUESTEVENTPASSIVE]))
        return kind, (cmd, draw(event_ids), draw(st.integers(0, (1 << 64) - 1)),
                      draw(st.integers(0, 1)), draw(st.sampled_from(STATUSES)))
    if kind == "fence":
        return kind, (draw(event_ids), draw(st.one_of(
            st.sampled_from([0, 1, 2, 3, 9, (1 << 64) - 1]), st.integers(0, (1 << 64) - 1))))
    if kind == "guestdata":
        return kind, (draw(st.sampled_from(["cookie", 0, "cookie^1", (1 << 64) - 1])),
                      draw(st.integers(0, (1 << 64) - 1)), draw(st.integers(0, 0xFFFF_FFFF)))
    if kind == "unknown":
        header = struct.pack("<QIII", 0, 0, 2, draw(st.integers(0, 0xFFFF_FFFF)))
        return kind, header + struct.pack("<I", 0) + draw(st.binary(max_size=64))
    if kind == "malformed":
        return kind, draw(st.binary(max_size=80))
    if kind in ("stray", "request"):
        return kind, (draw(st.integers(1, 1 << 40)), draw(st.binary(max_size=64)))
    msg = draw(st.sampled_from(["rescind", "open_result", "ping", "pong", "offers",
                                "version"]))
    value = draw(st.integers(0, 0xFFFF_FFFF))
    relid = draw(st.integers(64, 0xFFFF_FFFF))  # (no channel the guest has)
    control: b.BusMessage = {
        "rescind": b.Rescind(relid),
        "open_result": b.OpenResult(relid, -(value % 200)),
        "ping": b.Ping(value),
        "pong": b.Pong(value),
        "offers": b.AllOffersDelivered(),
        "version": b.VersionResponse(True, value, "liar"),
    }[msg]
    return kind, control


def send_traffic(liar: LyingHost, stage: Stage, items: list[tuple[str, Any]]) -> None:
    link = stage.link
    for kind, what in items:
        if kind == "event":
            cmd, event, pid, deref, status = what
            next_event = stage.stack.driver.rt.call(lambda: link.events._next)
            liar.notify(encode_host_to_vm(cmd, 0, m.SignalGuestEvent(
                event.resolve(next_event), pid, deref, status).pack()))
        elif kind == "fence":
            event, value = what
            next_event = stage.stack.driver.rt.call(lambda: link.events._next)
            liar.notify(encode_host_to_vm(HostToVmCommand.PYDXG_FENCEVALUE, 0,
                                          m.FenceValue(event.resolve(next_event), value).pack()))
        elif kind == "guestdata":
            pointer, data64, bits = what
            cookie = link.device_state_cookie
            pointer = {"cookie": cookie, "cookie^1": cookie ^ 1}.get(pointer, pointer)
            liar.notify(encode_host_to_vm(HostToVmCommand.SETGUESTDATA, 0,
                                          m.SetGuestData(pointer, data64, bits).pack()))
        elif kind == "stray":
            liar.complete_stray(*what)
        elif kind == "request":
            liar.notify(what[1], wants=True, trans_id=what[0])
        elif kind == "control":
            liar.control(what)
        elif kind == "garbage":
            liar.raw(what)
        else:
            liar.notify(what)


# ---- the stage -----------------------------------------------------------------------------------


@dataclass
class Stage:
    stack: Stack
    base_host: dict[str, int]
    base_files: set[tuple[int, int]]

    @property
    def link(self) -> Any:
        (link,) = self.stack.driver.links()
        return link

    def recovered(self) -> None:
        """Both adapters up (one the guest dropped comes back) and a normal call served."""
        def served() -> bool:
            raw = RawNodeClient(self.stack.node_path)
            try:
                adapters = Node(raw).adapters()
                if len(adapters) != 2:  # (the guest is still dialling the host again)
                    return False
                ad = adapters[0]
                assert ad.description
                ad.create_device().create_context()
                return True
            except DxgError as e:  # (a link dropped by what the host sent just now)
                if e.status != NTSTATUS.STATUS_DEVICE_REMOVED:
                    raise
                return False
            finally:
                raw.close()

        wait_until(served, DEADLINE, "the adapters back and serving")

    def link_files(self) -> set[tuple[int, int]]:
        """The sockets of the bus link, both ends (a new pair once the guest dialed again)."""
        socks = [p.session.conn.transport.sock for p in self.stack.host.partitions()
                 if p.session is not None]
        for link in self.stack.driver.links():
            conn = link.bus._conn
            if conn is not None:
                socks.append(conn.transport.sock)
        out = set()
        for sock in socks:
            try:
                st_ = os.fstat(sock.fileno())
            except (OSError, ValueError):
                continue
            out.add((st_.st_dev, st_.st_ino))
        return out

    def files_left(self) -> set[tuple[int, int]]:
        return (open_files() - self.link_files()) - self.base_files

    def host_events(self) -> int:
        """Host events the guest still has registered (waits, eventfds, mirrors)."""
        return int(self.stack.driver.rt.call(
            lambda: sum(len(link.events) for link in self.stack.driver.links())))

    def clean(self, host_too: bool = True) -> bool:
        return (self.stack.driver.snapshot()["processes"] == [] and self.host_events() == 0
                and (not host_too or host_left(self.stack.host) == self.base_host)
                and not self.files_left())

    def check_clean(self, host_too: bool = True) -> None:
        """Nothing of the client left on the guest (no process, no descriptor) and, unless the
        host lied about a process it made (then the guest cannot know the handle to destroy,
        and the host's census is taken again), on the host."""
        try:
            wait_until(lambda: self.clean(host_too), DEADLINE, "nothing of the client left")
            if not host_too:  # the processes the host made but lied about: dropped here
                def drop() -> None:
                    for part in self.stack.host.partitions():
                        for process in list(part.processes.values()):
                            drop_process(part, process)

                self.stack.host.rt.call(drop)
                wait_until(self.clean, DEADLINE, "nothing of the client left")
        except AssertionError:
            raise AssertionError(
                f"left behind: guest {self.stack.driver.snapshot()['processes']}, "
                f"{self.host_events()} host events; host "
                f"{host_left(self.stack.host)} vs {self.base_host}; files "
                f"{self.files_left()}") from None


@contextlib.contextmanager
def tcp_stack(tmp: Path) -> Iterator[Stack]:
    """Host and guest over TCP: no descriptors cross, so Lock2/Unlock2 copy and the guest keeps
    its clients' fence pages itself (PYDXG_FENCEVALUE)."""
    host = Host(HostConfig(adapters=2))
    drv = GuestDriver()
    node = None
    try:
        addr = host.listen("tcp:127.0.0.1:0")
        drv.bind(addr)
        assert drv.wait_for_adapters(2, DEADLINE), "adapters did not come up"
        node = SocketNode(drv, str(tmp / "tcp-dxg.sock"))
        node.start()
        yield Stack(host, drv, node, str(tmp / "tcp-dxg.sock"), addr)
    finally:
        if node is not None:
            node.close()
        drv.close()
        host.close()


@pytest.fixture(scope="module", params=["unix", "tcp"])
def stage(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stage]:
    tmp = Path(tmp_path_factory.mktemp("hh"))
    with (make_stack(tmp, "hh", adapters=2) if request.param == "unix"
          else tcp_stack(tmp)) as stack:
        s = Stage(stack, {}, set())
        s.recovered()  # (a first client: what the host keeps for later ones is there now)
        wait_until(lambda: stack.driver.snapshot()["processes"] == [], DEADLINE)
        wait_until(lambda: host_left(stack.host)["processes"] == 0, DEADLINE)
        s.base_host = host_left(stack.host)
        s.base_files = open_files() - s.link_files()
        yield s


def run_step(t: Target, name: str) -> str:
    """Run one step; what came of it. A hang, a broken node stream or a node that hung up is a
    failure; a call that failed (the host lied) is not."""
    try:
        STEPS[name](t)
    except (NoAnswer, NodeBroke, NodeHungUp, NodeError):
        raise
    except DxgError as e:
        return f"failed 0x{e.status:08x}"
    except (AssertionError, ValueError, KeyError, IndexError, TypeError, TimeoutError) as e:
        return f"failed {type(e).__name__}"  # (the step's own expectations of an honest host)
    return "ok"


STEP_NAMES = sorted(STEPS)


@pytest.mark.parametrize("name", ["BUILD", *STEP_NAMES],
                         ids=["build", *(n[3:] for n in STEP_NAMES)])
@hostile_settings(EXAMPLES)
@given(data=st.data())
def test_every_call_against_a_lying_host(stage: Stage, name: str, data: st.DataObject) -> None:
    with log_watch() as watch:
        stage.recovered()  # (a link the last example's garbage dropped is back)
        raw = RawNodeClient(stage.stack.node_path)
        t = Target(raw, Node(raw), luids=[a.luid for a in stage.stack.driver.active_adapters()])
        liar = LyingHost(stage.stack)
        try:
            if name != "BUILD":
                build_objects(t)  # (the host honest)
            plans = data.draw(st.lists(tampers, min_size=1, max_size=6))
            before = data.draw(st.lists(notification(), max_size=3))
            after = data.draw(st.lists(notification(), max_size=3))
            liar.plans = plans
            with liar:
                send_traffic(liar, stage, before)
                if name == "BUILD":
                    try:
                        build_objects(t)
                    except (NoAnswer, NodeBroke, NodeHungUp, NodeError):
                        raise
                    except (DxgError, AssertionError, ValueError, KeyError, IndexError,
                            TypeError):
                        pass
                else:
                    run_step(t, name)
                send_traffic(liar, stage, after)
            bad = [(hex(code), ret) for code, ret in raw.returns
                   if not (allowed_return(ret) or ret == -errno.EPROTO)]
            assert not bad, bad
        finally:
            raw.close()
            for obj in t.keep:
                obj.close()
        stage.recovered()
        stage.check_clean(host_too="CREATEPROCESS" not in liar.tampered)
    assert not watch.records, watch.take()
