"""Every ioctl through the real socket node, with hostile structs and buffers (issue 9, part 4).

A raw client (tests/hostile_support.RawNodeClient: one connection = one process) builds real
objects with the client API (adapters on both vGPUs, devices, a context and its hardware queue,
allocations, a shared resource, fences, a paging queue, a GPU VA range, share descriptors, a
sync file, and objects it destroyed again), then sends IOCTL frames it makes itself:
hypothesis-generated struct bytes, random or "structured" (each field set to a handle the test
made, live or dead, of the right kind or not, a handle of another process, 0, all ones, an
off-by-one count; each pointer at a buffer it sends of the right size, one byte short or long, at
NULL or at memory it never sent; descriptors of every kind, or numbers it never sent). For each
call:

* the node answers it before a deadline (a call that may wait, a CPU wait, is answered once
  cancelled), while another call of the same process is answered meanwhile;
* the answer is one the docs allow (0, a success NTSTATUS the driver passes on, a documented
  negative errno; never -EPROTO, which only a broken host reply gives) and no catch-all fired
  (the node's "driver ioctl ... raised" -> -EIO, the host's "... handler failed" ->
  STATUS_INTERNAL_ERROR, or any other error logged with a traceback);
* what the reply writes lies inside the regions the request let it write;

and afterwards another process's objects are untouched and served, the hostile process can still
open an adapter and make a device, and once its connection closes nothing of it is left: no
guest process, host objects, handles, committed bytes or shared objects back to the baseline, no
descriptor left open. A stateful machine (HostileSession) creates and destroys objects and mixes
in hostile calls on live and dead handles.

Example counts are modest (PYDXG_HOSTILE_EXAMPLES, default 5 per ioctl); with CI=true the
examples are derandomized."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from conftest import Stack, make_stack, wait_until
from dxg import uapi
from dxg.client.api import Node
from dxg.client.errors import DxgError
from dxg.client.userbufs import USERBUFS, Buf
from dxg.node.server import FD_IOCTLS
from dxg.uapi import wire
from dxg.uapi.ntstatus import ntstatus_to_errno
from hostile_scenario import STEPS, Target, build_objects
from hostile_support import (
    DEADLINE,
    RawNodeClient,
    allowed_return,
    check_writes_inside,
    host_left,
    hostile_settings,
    log_watch,
    open_files,
    struct_fields,
)

EXAMPLES = int(os.environ.get("PYDXG_HOSTILE_EXAMPLES", "5"))

# Calls that may rightly wait (a CPU wait for a fence value nobody signals, a legacy wait, a
# pydxg SLEEP escape): answered once cancelled.
MAY_WAIT = frozenset({"LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU",
                      "LX_DXWAITFORSYNCHRONIZATIONOBJECT", "LX_DXESCAPE"})
FAKE_BASE = 0x7E00_0000_0000  # where the raw client says its buffers are
FAKE_STRIDE = 1 << 24
UNMAPPED = (0x1000, 0xDEAD_BEEF_0000, FAKE_BASE - 8, (1 << 64) - 4096, (1 << 47) - 1)
MAX_BUFFER = 256 * 1024
FD_FIELDS = frozenset({"nt_handle", "sync_file_handle", "async_event", "cpu_event_handle",
                       "event", "object_vail_nt_handle"})
# u32 handle arrays a struct points at, and the kind of handle each should mostly hold
HANDLE_LISTS = {"objects": "sync", "allocations": "allocation", "allocation_list": "allocation",
                "resources": "resource", "hwqueues": "hwqueue", "contexts": "context",
                "history_buffer_array": "allocation", "written_primaries": "allocation"}
VALUE_LISTS = frozenset({"fence_values", "monitored_fence_values", "priorities",
                         "priority_list"})
# which kind of handle a struct's handle field names (by the first word of its name)
HANDLE_HINTS = {"adapter": "adapter", "adapter_handle": "adapter", "allocation": "allocation",
                "context": "context", "contexts": "context", "broadcast_context": "context",
                "device": "device", "device_handle": "device", "hwqueue": "hwqueue",
                "queue": "hwqueue", "paging_queue": "paging_queue", "resource": "resource",
                "sync_object": "sync", "syncobj": "sync", "object_array": "sync",
                "monitored_fence": "sync", "fence_object": "sync",
                "queue_progress_fence": "sync", "keyed_mutex": "sync"}
COUNTS = (0, 1, 2, 3, 4, 7, 8, 16, 32, 33, 64, 255, 256, 4095, 4096, 4097, 0x7FFF_FFFF,
          0x8000_0000, 0xFFFF_FFFF, 1 << 32, 1 << 63, (1 << 64) - 1)


# ---- the world: one stack, a neighbour process, the baseline ------------------------------------


class World:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.neighbour = RawNodeClient(stack.node_path)
        nb = Node(self.neighbour)
        ad = nb.adapters()[0]
        self.nb_adapter = ad
        self.nb_device = ad.create_device()
        self.nb_context = self.nb_device.create_context()
        self.nb_alloc = self.nb_device.allocate(8192)
        self.nb_alloc.upload(b"neighbour" * 100)
        self.nb_fence = self.nb_device.fence(5)
        self.foreign = [ad.handle, self.nb_device.handle, self.nb_context.handle,
                        self.nb_alloc.handle, self.nb_fence.handle]
        self.luids = [a.luid for a in stack.driver.active_adapters()]
        # One hostile process made and closed first: whatever the host keeps for later ones
        # (arenas, worker threads) is there before the baseline is taken.
        with self.target(*STEPS) as _:  # (every step works)
            pass
        self.settle_baseline()

    def settle_baseline(self) -> None:
        """The baseline: only the neighbour left (the processes before it gone)."""
        wait_until(lambda: host_left(self.stack.host)["processes"] == 1
                   and len(self.stack.driver.snapshot()["processes"]) == 1, DEADLINE,
                   "only the neighbour left")
        self.base_host = host_left(self.stack.host)
        self.base_procs = self.stack.driver.snapshot()["processes"]
        self.base_files = open_files()

    def close(self) -> None:
        self.neighbour.close()

    @contextmanager
    def target(self, *steps: str) -> Iterator[Target]:
        raw = RawNodeClient(self.stack.node_path)
        t = Target(raw, Node(raw), luids=list(self.luids), foreign=list(self.foreign))
        try:
            build_objects(t)
            for name in steps:
                STEPS[name](t)
            yield t
        finally:
            raw.close()
            for obj in t.keep:
                obj.close()

    def clean(self) -> bool:
        return (host_left(self.stack.host) == self.base_host
                and self.stack.driver.snapshot()["processes"] == self.base_procs
                and open_files() <= self.base_files)

    def check_clean(self) -> None:
        try:
            wait_until(self.clean, DEADLINE, "nothing of the hostile process left")
        except AssertionError:
            raise AssertionError(
                f"left behind: host {host_left(self.stack.host)} vs {self.base_host}; "
                f"guest {self.stack.driver.snapshot()['processes']} vs {self.base_procs}; "
                f"files {open_files() - self.base_files}") from None

    def neighbour_served(self) -> None:
        """The other process's objects are as it left them, and the host serves it."""
        assert self.nb_adapter.description  # QueryAdapterInfo, forwarded to the host
        assert self.nb_fence.value == 5
        assert self.nb_alloc.download(9) == b"neighbour"
        self.nb_context.priority()  # (a call on its context: still there)
        ctx = self.nb_device.create_context()
        ctx.close()
        assert self.nb_device.execution_state() == 1  # D3DKMT_DEVICEEXECUTION_ACTIVE


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    embedded = os.environ.get("PYDXG_HOSTILE_EMBEDDED") == "1"
    with make_stack(Path(tmp_path_factory.mktemp("hi")), "hi", adapters=2,
                    embedded=embedded) as stack:
        w = World(stack)
        try:
            yield w
        finally:
            w.close()


# ---- hostile calls -------------------------------------------------------------------------------


@dataclass
class HostileCall:
    name: str
    request: wire.IoctlRequest
    fds: list[int]
    mode: str


class FakeMemory:
    """The buffers a raw client says it has: each at an address of its own, far apart."""

    def __init__(self) -> None:
        self.buffers: list[tuple[int, bytes, int]] = []  # (addr, data, flags)

    def put(self, data: bytes, flags: int) -> int:
        addr = FAKE_BASE + len(self.buffers) * FAKE_STRIDE
        self.buffers.append((addr, bytes(data), flags))
        return addr

    def regions(self) -> tuple[wire.Region, ...]:
        return tuple(wire.Region(a, len(d), f, d if f & wire.REGION_IN else None)
                     for a, d, f in self.buffers if d)


def _put(raw: bytearray, off: int, size: int, value: int) -> None:
    raw[off:off + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


def handle_strategy(t: Target, kind: str | None) -> st.SearchStrategy[int]:
    live = t.all_live()
    preferred = t.handles.get(kind or "", []) or live
    mutated = st.sampled_from(live).flatmap(lambda h: st.sampled_from(
        [h ^ 0x40, h + 0x40, h - 0x40, h ^ 0x4000_0000, h ^ 0xC000_0000, h & 0x3FFF_FFFF,
         h | 0x3F]))
    return st.one_of(
        st.sampled_from(preferred), st.sampled_from(preferred), st.sampled_from(live),
        st.sampled_from(t.dead), st.sampled_from(t.foreign or [0]),
        st.sampled_from([0, 0xFFFF_FFFF, 0x4000_0000, 0x40]), mutated,
        st.integers(0, 0xFFFF_FFFF))


def scalar_strategy(name: str, size: int, t: Target) -> st.SearchStrategy[int]:
    top = (1 << (8 * size)) - 1
    leaf = name.rsplit(".", 1)[-1].split("[")[0]
    if leaf in FD_FIELDS:
        return st.one_of(st.sampled_from(list(t.fds.values())),
                         st.sampled_from([0, 1, 2, 99_999, top, 1 << 31]))
    if "luid" in name:
        parts = [p for luid in t.luids for p in (luid & 0xFFFF_FFFF, luid >> 32)]
        return st.one_of(st.sampled_from(parts), st.integers(0, top))
    if any(k in leaf for k in ("count", "size", "num_", "length")):
        return st.one_of(st.sampled_from([c & top for c in COUNTS]), st.integers(0, top))
    if any(k in leaf for k in ("address", "_va", "base", "minimum", "maximum")):
        va = t.va
        return st.one_of(st.sampled_from([0, va, va + 4096, va - 4096, 4096, top]),
                         st.integers(0, top).map(lambda v: v & ~0xFFF))
    return st.one_of(st.sampled_from([0, 1, 2, 3, 0xFF, top, top >> 1]),
                     st.integers(0, min(top, 64)), st.integers(0, top))


@st.composite
def buffer_content(draw: st.DrawFn, buf: Buf, n: int, t: Target, mem: FakeMemory) -> bytes:
    if n <= 0:
        return b""
    if buf.field in HANDLE_LISTS:
        handles = draw(st.lists(handle_strategy(t, HANDLE_LISTS[buf.field]),
                                min_size=min(n // 4, 8), max_size=min(n // 4, 8)))
        body = b"".join(struct.pack("<I", h) for h in handles)
        return (body + bytes(n))[:n]
    if buf.field in VALUE_LISTS:
        width = 8 if "fence" in buf.field else 4
        top = (1 << (8 * width)) - 1
        values = draw(st.lists(st.sampled_from([0, 1, 2, 3, 5, 100, top, top >> 1]),
                               min_size=min(n // width, 8), max_size=min(n // width, 8)))
        body = b"".join(v.to_bytes(width, "little") for v in values)
        return (body + bytes(n))[:n]
    if buf.elem is not None and buf.inner:
        # an array of structs with pointers of their own (CreateAllocation's allocation_info)
        esz = ctypes.sizeof(buf.elem)
        out = bytearray(n) if draw(st.booleans()) else \
            bytearray(draw(st.binary(min_size=n, max_size=n)))
        for i in range(min(n // esz, 4)):
            elem = buf.elem.from_buffer_copy(out, i * esz)
            for inner in buf.inner:
                size = draw(st.sampled_from([0, 1, 16, 64, 4096]))
                setattr(elem, f"{inner.field}_size", draw(st.sampled_from(
                    [size, size, size + 1, max(size - 1, 0), 0xFFFF_FFFF])))
                where = draw(st.sampled_from(["buffer", "buffer", "null", "unmapped"]))
                if where == "buffer" and size:
                    data = draw(st.binary(min_size=size, max_size=size))
                    setattr(elem, inner.field, mem.put(data, draw(flag_strategy(inner.flags))))
                else:
                    setattr(elem, inner.field,
                            0 if where != "unmapped" else draw(st.sampled_from(UNMAPPED)))
            if hasattr(elem, "allocation"):
                elem.allocation.v = draw(st.sampled_from([0, 0, *t.handles["allocation"]]))
            out[i * esz:(i + 1) * esz] = bytes(elem)
        return bytes(out)
    if draw(st.booleans()):
        return bytes(n)
    return draw(st.binary(min_size=n, max_size=n))


def flag_strategy(flags: int) -> st.SearchStrategy[int]:
    return st.sampled_from([flags, flags, flags, wire.REGION_IN, wire.REGION_OUT,
                            wire.REGION_IN | wire.REGION_OUT])


@st.composite
def hostile_value(draw: st.DrawFn, t: Target, width: int) -> int:
    """Something hostile for an aligned u32/u64 anywhere: a handle, a count, a descriptor."""
    if width == 4 and draw(st.booleans()):
        return draw(handle_strategy(t, None))
    top = (1 << (8 * width)) - 1
    return draw(st.one_of(st.sampled_from([c & top for c in COUNTS]),
                          st.sampled_from(list(t.fds.values())), st.integers(0, top)))


@st.composite
def mutated_call(draw: st.DrawFn, desc: Any, t: Target) -> tuple[bytes, list[wire.Region],
                                                                 list[int], list[int]]:
    """A valid call of this process (recorded when it made its objects), with one to three
    things made hostile: a struct field, a word of the struct or of a buffer it sends, a buffer
    cut short, dropped, or sent without the access the driver needs, the descriptors swapped."""
    template = draw(st.sampled_from(t.raw.recorded[desc.code]))
    raw = bytearray(template.struct)
    regions = list(template.regions)
    numbers = list(template.fd_numbers)
    fds = [n for n in numbers if _open(n)]
    numbers = numbers[:len(fds)] if len(fds) != len(numbers) else numbers
    leaves = list(struct_fields(desc.struct))
    kinds = ["field", "field", "word"]
    if regions:
        kinds += ["cut", "drop", "access", "buffer-word", "buffer-word"]
    if fds or desc.name in FD_IOCTLS:
        kinds += ["fds"]
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(kinds))
        if kind == "field" and leaves:
            name, off, ctype = draw(st.sampled_from(leaves))
            width = ctypes.sizeof(ctype)
            if name.endswith(".v") and width == 4:
                first = name.split(".")[0].split("[")[0]
                value = draw(handle_strategy(t, HANDLE_HINTS.get(first)))
            else:
                value = draw(scalar_strategy(name, width, t))
            _put(raw, off, width, value)
        elif kind == "word" or (kind == "field" and not leaves):
            width = draw(st.sampled_from([4, 8])) if len(raw) >= 8 else 4
            off = draw(st.integers(0, (len(raw) - width) // 4)) * 4
            _put(raw, off, width, draw(hostile_value(t, width)))
        elif kind in ("cut", "drop", "access", "buffer-word") and regions:
            # (by size and content, not by address: the addresses differ from run to run)
            order = sorted(range(len(regions)), key=lambda j: (
                regions[j].length, regions[j].flags, regions[j].data or b""))
            i = order[draw(st.integers(0, len(regions) - 1))]
            r = regions[i]
            if kind == "drop":
                del regions[i]
            elif kind == "cut":
                n = draw(st.integers(0, r.length - 1))
                if n == 0:
                    del regions[i]
                else:
                    regions[i] = wire.Region(r.addr, n, r.flags,
                                             r.data[:n] if r.data is not None else None)
            elif kind == "access":
                flags = draw(st.sampled_from([wire.REGION_IN, wire.REGION_OUT]))
                data = (r.data if r.data is not None else bytes(r.length)) \
                    if flags & wire.REGION_IN else None
                regions[i] = wire.Region(r.addr, r.length, flags, data)
            elif r.data is not None and r.length >= 4:
                width = 8 if r.length >= 8 and draw(st.booleans()) else 4
                off = draw(st.integers(0, (r.length - width) // 4)) * 4
                data = bytearray(r.data)
                _put(data, off, width, draw(hostile_value(t, width)))
                regions[i] = wire.Region(r.addr, r.length, r.flags, bytes(data))
        elif kind == "fds":
            chosen = draw(st.lists(st.sampled_from(sorted(t.fds)), unique=True, max_size=2))
            fds = [t.fds[k] for k in chosen]
            # the numbers the struct names, now for other files (or none of them)
            numbers = [*numbers[:len(fds)], *(60_000 + i for i in range(len(numbers),
                                                                        len(fds)))][:len(fds)]
            if len(set(numbers)) != len(numbers):
                numbers = [60_000 + i for i in range(len(fds))]
    return bytes(raw), regions, fds, numbers


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@st.composite
def hostile_call(draw: st.DrawFn, desc: Any, t: Target) -> HostileCall:
    modes = ["random", "structured"]
    if t.raw.recorded.get(desc.code):
        modes += ["mutated"] * 6 + ["valid"]
    mode = draw(st.sampled_from(modes))
    size = desc.size
    mem = FakeMemory()
    row: tuple[Buf, ...] = USERBUFS.get(desc.name, ())
    fds: list[int] = []
    numbers: list[int] = []
    if mode == "valid":
        template = draw(st.sampled_from(t.raw.recorded[desc.code]))
        numbers = [n for n in template.fd_numbers if _open(n)]
        if len(numbers) != len(template.fd_numbers):
            numbers = []
        request = wire.IoctlRequest(desc.code, template.struct, template.regions,
                                    tuple(numbers))
        return HostileCall(desc.name, request, list(numbers), mode)
    if mode == "mutated":
        struct_bytes, regions, fds, numbers = draw(mutated_call(desc, t))
        request = wire.IoctlRequest(desc.code, struct_bytes, tuple(regions), tuple(numbers))
        return HostileCall(desc.name, request, fds, mode)
    if mode == "random":
        raw = bytearray(draw(st.binary(min_size=size, max_size=size)))
        args = desc.struct.from_buffer_copy(raw)
        for buf in row:  # some pointers at buffers sent, of random sizes
            if draw(st.booleans()):
                n = draw(st.integers(1, 512))
                setattr(args, buf.field, mem.put(draw(st.binary(min_size=n, max_size=n)),
                                                 draw(flag_strategy(buf.flags))))
    else:
        raw = bytearray(draw(st.binary(min_size=size, max_size=size))) \
            if draw(st.booleans()) else bytearray(size)
        for name, off, ctype in struct_fields(desc.struct):
            if draw(st.integers(0, 3)) == 0:
                continue  # leave it as it is
            width = ctypes.sizeof(ctype)
            if name.endswith(".v") and width == 4:
                first = name.split(".")[0].split("[")[0]
                value = draw(handle_strategy(t, HANDLE_HINTS.get(first)))
            else:
                value = draw(scalar_strategy(name, width, t))
            _put(raw, off, width, value)
        args = desc.struct.from_buffer_copy(raw)
        for buf in row:
            where = draw(st.sampled_from(["buffer", "buffer", "buffer", "null", "unmapped",
                                          "keep"]))
            if where == "keep":
                continue
            if where == "null":
                setattr(args, buf.field, 0)
                continue
            if where == "unmapped":
                setattr(args, buf.field, draw(st.sampled_from(UNMAPPED)))
                continue
            want = buf.size(args)
            n = draw(st.sampled_from([want, want, want, want + 1, max(want - 1, 0),
                                      want // 2, 1]))
            n = min(n, MAX_BUFFER)
            content = draw(buffer_content(buf, n, t, mem))
            setattr(args, buf.field, mem.put(content, draw(flag_strategy(buf.flags))))
    if desc.name in FD_IOCTLS or draw(st.integers(0, 9)) == 0:
        chosen = draw(st.lists(st.sampled_from(sorted(t.fds)), unique=True, max_size=3))
        for key in chosen:
            fds.append(t.fds[key])
            numbers.append(t.fds[key] if draw(st.integers(0, 4)) else 50_000 + len(numbers))
    request = wire.IoctlRequest(desc.code, bytes(args), mem.regions(), tuple(numbers))
    return HostileCall(desc.name, request, fds, mode)


# ---- running them --------------------------------------------------------------------------------


def probe_request() -> wire.IoctlRequest:
    """EnumAdapters3, count only: answered by the guest alone."""
    return wire.IoctlRequest(uapi.LX_DXENUMADAPTERS3, bytes(uapi.d3dkmt_enumadapters3()))


def fire(t: Target, calls: list[HostileCall]) -> list[int]:
    """Send the hostile calls (all at once, in flight together) and a probe call of the same
    process after them; all must be answered (calls that may rightly wait are cancelled once
    the probe is back). Returns their results."""
    raw = t.raw
    seqs = [raw.send(call.request, call.fds) for call in calls]
    probe = raw.send(probe_request())
    (p,) = raw.collect([probe])
    assert isinstance(p.reply, wire.IoctlReply) and p.reply.ret == 0, p
    for call, seq in zip(calls, seqs, strict=True):
        if call.name in MAY_WAIT and not raw.answered(seq):
            raw.cancel(seq)
    answers = raw.collect(seqs)
    results = []
    try:
        for call, answer in zip(calls, answers, strict=True):
            assert isinstance(answer.reply, wire.IoctlReply), (call.name, answer.error)
            reply = answer.reply
            assert allowed_return(reply.ret), (call.name, call.mode, reply.ret)
            check_writes_inside(call.request, reply)
            results.append(reply.ret)
    finally:
        for answer in answers:
            for fd in answer.fds:
                os.close(fd)
    return results


def hang_up_with_calls_in_flight(t: Target, calls: list[HostileCall]) -> None:
    """Send the calls and close the connection at once (the process dies mid-call)."""
    for call in calls:
        t.raw.send(call.request, call.fds)
    t.raw.close()


def after_the_calls(world: World, t: Target) -> None:
    """A normal call works for the hostile process (a fresh adapter handle, a device) and for
    its neighbour."""
    ad = t.node.adapters()[0]
    assert ad.description
    ad.create_device()
    world.neighbour_served()


IOCTL_NRS = sorted(uapi.IOCTLS)


@pytest.mark.parametrize("nr", IOCTL_NRS, ids=[uapi.IOCTLS[n].name[3:] for n in IOCTL_NRS])
@hostile_settings(EXAMPLES)
@given(data=st.data())
def test_every_ioctl_with_hostile_structs_and_buffers(world: World, nr: int,
                                                       data: st.DataObject) -> None:
    desc = uapi.IOCTLS[nr]
    with log_watch() as watch:
        with world.target(*([desc.name] if desc.name in STEPS else [])) as t:
            calls = data.draw(st.lists(hostile_call(desc, t), min_size=1, max_size=3))
            how = data.draw(st.sampled_from(["one by one", "one by one", "all at once",
                                             "hang up"]))
            if how == "hang up":
                hang_up_with_calls_in_flight(t, calls)
            else:
                batches = [calls] if how == "all at once" else [[c] for c in calls]
                for batch in batches:
                    for call, ret in zip(batch, fire(t, batch), strict=True):
                        if not desc.handled:  # (descriptors where none are taken: -EINVAL)
                            assert ret == (-errno.EINVAL if call.fds else -errno.ENOTTY)
                after_the_calls(world, t)
        world.check_clean()
    assert not watch.records, watch.take()


# ---- a stateful session: objects made and destroyed, hostile calls on live and dead handles ----

# ioctl that destroys an object of each kind (one handle field), for the dead-handle rule
DESTROYS = {"context": ("LX_DXDESTROYCONTEXT", "context"),
            "device": ("LX_DXDESTROYDEVICE", "device"),
            "hwqueue": ("LX_DXDESTROYHWQUEUE", "queue"),
            "paging_queue": ("LX_DXDESTROYPAGINGQUEUE", "paging_queue"),
            "sync": ("LX_DXDESTROYSYNCHRONIZATIONOBJECT", "sync_object")}
_KINDS_OF = {"Device": "device", "Context": "context", "Allocation": "allocation",
             "Fence": "sync", "HwQueue": "hwqueue", "PagingQueue": "paging_queue"}
_BY_NAME = {d.name: d for d in uapi.IOCTLS.values()}


class HostileSession(RuleBasedStateMachine):
    """One process that makes and destroys objects through the client API while hostile calls
    of every kind land in between, aimed at its live handles, its dead ones and another
    process's. Dead handles stay dead (-EBADF), nothing the driver answers is outside the
    documented set, and when the process goes nothing of it is left."""

    world: World

    devices = Bundle("devices")
    contexts = Bundle("contexts")
    objects = Bundle("objects")  # allocations, fences, queues, paging queues
    dead = Bundle("dead")

    def __init__(self) -> None:
        super().__init__()
        self._watch_cm = log_watch()
        self.watch = self._watch_cm.__enter__()
        self._target_cm = self.world.target()
        self.t = self._target_cm.__enter__()

    def _live(self, obj: Any) -> Any:
        kind = _KINDS_OF[type(obj).__name__]
        self.t.handles.setdefault(kind, []).append(obj.handle)
        return obj

    def _made(self, make: Any) -> Any:
        try:
            return self._live(make())
        except DxgError as e:
            # its parent was destroyed under it (a hostile call may have done that)
            assert allowed_return(ntstatus_to_errno(e.status)), e
            return multiple()

    @rule(target=devices, second=st.booleans())
    def create_device(self, second: bool) -> Any:
        ad = self.t.objects["ad2" if second else "ad"]
        return self._made(ad.create_device)

    @rule(target=contexts, dev=devices)
    def create_context(self, dev: Any) -> Any:
        return self._made(dev.create_context)

    @rule(target=objects, dev=devices, size=st.sampled_from([1, 4096, 65536]))
    def allocate(self, dev: Any, size: int) -> Any:
        return self._made(lambda: dev.allocate(size))

    @rule(target=objects, dev=devices)
    def fence(self, dev: Any) -> Any:
        return self._made(dev.fence)

    @rule(target=objects, dev=devices)
    def paging_queue(self, dev: Any) -> Any:
        return self._made(dev.paging_queue)

    @rule(target=objects, ctx=contexts)
    def hwqueue(self, ctx: Any) -> Any:
        return self._made(ctx.hwqueue)

    @rule(target=dead, obj=consumes(devices) | consumes(contexts) | consumes(objects))
    def destroy(self, obj: Any) -> tuple[str, int]:
        kind = _KINDS_OF[type(obj).__name__]
        try:
            obj.close()
        except DxgError as e:  # gone already (with its parent, or by a hostile call)
            assert allowed_return(ntstatus_to_errno(e.status)), e
        with contextlib.suppress(ValueError):
            self.t.handles[kind].remove(obj.handle)
        self.t.dead.append(obj.handle)
        return kind, obj.handle

    @rule(entry=dead)
    def dead_stays_dead(self, entry: tuple[str, int]) -> None:
        kind, handle = entry
        if kind not in DESTROYS:
            return
        name, fld = DESTROYS[kind]
        desc = _BY_NAME[name]
        args = desc.struct()
        getattr(args, fld).v = handle
        (ret,) = fire(self.t, [HostileCall(name, wire.IoctlRequest(desc.code, bytes(args)),
                                           [], "dead")])
        assert ret == -errno.EBADF, (name, hex(handle), ret)

    @rule(data=st.data(), nr=st.sampled_from([n for n in IOCTL_NRS if uapi.IOCTLS[n].handled]))
    def hostile(self, data: st.DataObject, nr: int) -> None:
        calls = data.draw(st.lists(hostile_call(uapi.IOCTLS[nr], self.t), min_size=1,
                                   max_size=2))
        fire(self.t, calls)

    @invariant()
    def nothing_logged(self) -> None:
        assert not self.watch.records, self.watch.take()

    def teardown(self) -> None:
        try:
            after_the_calls(self.world, self.t)
        finally:
            self._target_cm.__exit__(None, None, None)
            try:
                self.world.check_clean()
            finally:
                self._watch_cm.__exit__(None, None, None)
        assert not self.watch.records, self.watch.take()


def test_a_hostile_session_of_live_and_dead_objects(world: World) -> None:
    class Session(HostileSession):
        pass

    Session.world = world
    run_state_machine_as_test(Session, settings=hostile_settings(
        int(os.environ.get("PYDXG_HOSTILE_SESSIONS", "12")), stateful_step_count=25))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)


@hostile_settings(EXAMPLES * 4)
@given(request=st.dictionaries(st.text(max_size=8), json_values, max_size=4),
       op=st.sampled_from([None, "census", "snapshot", "", "CENSUS", 7]))
def test_hostile_admin_requests(world: World, request: dict[str, Any], op: Any) -> None:
    """ADMIN requests of any shape: an ADMIN_REPLY or a per-request ERROR, never a catch-all."""
    if op is not None:
        request = {**request, "op": op}
    with log_watch() as watch:
        raw = RawNodeClient(world.stack.node_path)
        try:
            (answer,) = raw.collect([raw.send(wire.AdminRequest(request))])
            assert isinstance(answer.reply, wire.AdminReply) or answer.error, answer
            # and the connection goes on
            (probe,) = raw.collect([raw.send(probe_request())])
            assert isinstance(probe.reply, wire.IoctlReply) and probe.reply.ret == 0
        finally:
            raw.close()
    assert not watch.records, watch.take()
