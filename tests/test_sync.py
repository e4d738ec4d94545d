"""Synchronization objects end to end: monitored fences (the value read from a shared page, CPU
signals and waits, timeouts, eventfds), waits on several fences, GPU signals and waits on a
context's timeline, the legacy kinds, waiters woken with an error when their object, device,
adapter, host or process goes, and a SIGKILLed waiter that leaves nothing behind. Client
threads and processes are real; the stack is as `dxg up` runs it and with the host over a Unix
socket or TCP."""

import asyncio
import ctypes
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import Stack, make_stack, read_json_line, wait_until
from dxg.client import (
    AsyncFence,
    DxgError,
    Fence,
    SyncKind,
    open_node,
    open_node_async,
    wait_all,
    wait_any,
)
from dxg.client import thunks as t
from dxg.client.sync import signal_from_gpu, wait_from_gpu
from dxg.guest.driver import GuestDriver
from dxg.host.call import CommandFailed
from dxg.host.config import HostConfig
from dxg.host.host import Host
from dxg.node.server import SocketNode
from dxg.protocol import messages as m
from dxg.uapi import ioctls as io
from dxg.uapi import structs as s
from dxg.uapi.ntstatus import NTSTATUS, ioctl_result_to_ntstatus

OK = NTSTATUS.STATUS_SUCCESS
TIMEOUT = NTSTATUS.STATUS_TIMEOUT


@pytest.fixture(params=["embedded", "unix"])
def sstack(request, tmp_path) -> Iterator[Stack]:
    with make_stack(tmp_path, embedded=request.param == "embedded") as st:
        yield st


@pytest.fixture
def dev(sstack):
    with open_node(sstack.node_path) as node:
        yield node.adapters()[0].create_device()


@contextmanager
def tcp_stack(tmp: Path) -> Iterator[Stack]:
    """Host and guest linked over TCP: no descriptor crosses, the guest keeps the fence pages."""
    host = Host(HostConfig(adapters=1))
    drv = GuestDriver()
    node = None
    try:
        addr = host.listen("tcp:127.0.0.1:0")
        drv.bind(addr)
        assert drv.wait_for_adapters(1, 15), "adapters did not come up"
        node = SocketNode(drv, str(tmp / "tcp-dxg.sock"))
        node.start()
        yield Stack(host, drv, node, str(tmp / "tcp-dxg.sock"), addr)
    finally:
        if node is not None:
            node.close()
        drv.close()
        host.close()


def host_sync(st: Stack) -> dict[str, int]:
    """What every process of every guest holds on the host: sync objects, CPU waits, GPU ops."""
    out = {"sync_objects": 0, "cpu_waits": 0, "gpu_ops": 0, "processes": 0}
    for part in st.host.census()["partitions"]:
        for p in part["processes"]:
            out["processes"] += 1
            for key in ("sync_objects", "cpu_waits", "gpu_ops"):
                out[key] += p[key]
    return out


def guest_events(st: Stack) -> int:
    return st.driver.rt.call(lambda: sum(len(link.events) for link in st.driver.links()))


def outcome(fn) -> object:
    try:
        return fn()
    except DxgError as e:
        return e.status


def in_thread(fn) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def run() -> None:
        box["result"] = outcome(fn)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, box


# ---- monitored fences ----------------------------------------------------------------------------


def test_fence_value_signal_and_wait(sstack, dev):
    with dev.fence(3) as f:
        assert isinstance(f, Fence) and f.handle and f.address and f.kind == 5
        assert f.value == 3  # from the mapped page: no call
        f.signal(5)
        assert f.value == 5
        f.signal(4)  # a fence never goes back ...
        assert f.value == 5
        f.signal(2, rewind=True)  # ... unless the signal allows a rewind
        assert f.value == 2
        assert f.wait(2) == OK and f.wait(0) == OK
        t0 = time.monotonic()
        assert f.wait(3, timeout=0.2) == TIMEOUT
        assert 0.15 < time.monotonic() - t0 < 5
        assert f.wait(3, timeout=0) == TIMEOUT
        f.signal(2**64 - 1)
        assert f.value == 2**64 - 1 and f.wait(2**64 - 1) == OK
    with pytest.raises(DxgError) as e:
        f.wait(1)
    assert e.value.status == NTSTATUS.STATUS_INVALID_HANDLE
    with pytest.raises(DxgError):
        _ = f.value


def test_timed_out_waits_leave_nothing_registered(sstack, dev):
    f = dev.fence()
    for _ in range(20):
        assert f.wait(1, timeout=0.01) == TIMEOUT
    wait_until(lambda: host_sync(sstack)["cpu_waits"] == 0, what="host waits withdrawn")
    wait_until(lambda: guest_events(sstack) == 0, what="guest events unregistered")
    f.signal(1)
    assert f.wait(1, timeout=5) == OK


def test_ten_thousand_signal_wait_cycles_across_threads(tmp_path):
    """Two threads of one process pass the turn 5,000 times each way: 10,000 signals, each
    waking the wait of the other thread; none is lost (every wait has a deadline)."""
    with make_stack(tmp_path, embedded=True) as st, open_node(st.node_path) as node:
        dev = node.adapters()[0].create_device()
        ping, pong = dev.fence(), dev.fence()
        rounds = 5000
        lost: list[int] = []

        def other() -> None:
            for i in range(1, rounds + 1):
                if ping.wait(i, timeout=20) != OK:
                    lost.append(i)
                    return
                pong.signal(i)

        th = threading.Thread(target=other)
        th.start()
        for i in range(1, rounds + 1):
            ping.signal(i)
            if pong.wait(i, timeout=20) != OK:
                lost.append(-i)
                break
        th.join(60)
        assert not lost and ping.value == pong.value == rounds
        assert host_sync(st)["cpu_waits"] == 0 and guest_events(st) == 0


def test_wait_all_and_wait_any(sstack, dev):
    a, b, c = dev.fence(), dev.fence(), dev.fence(7)
    assert wait_all([(a, 0), (b, 0), (c, 7)]) == OK
    assert wait_all([(a, 1), (c, 7)], timeout=0.1) == TIMEOUT
    assert wait_any([(a, 1), (b, 1)], timeout=0.1) == TIMEOUT
    assert wait_any([(a, 1), (c, 7)]) == OK  # one reached already

    th, box = in_thread(lambda: wait_all([(a, 2), (b, 3)], timeout=10))
    a.signal(2)
    time.sleep(0.1)
    assert th.is_alive()  # one of two
    b.signal(3)
    th.join(10)
    assert box["result"] == OK

    th, box = in_thread(lambda: wait_any([(a, 9), (b, 9)], timeout=10))
    time.sleep(0.05)
    b.signal(9)
    th.join(10)
    assert box["result"] == OK and a.value == 2
    with pytest.raises(ValueError):
        wait_all([(a, 1)] * 33)


def test_eventfd_wait_polled_with_select(sstack, dev):
    f = dev.fence()
    fds = [f.eventfd_wait(v) for v in (1, 2, 3)]
    try:
        assert select.select(fds, [], [], 0.05)[0] == []
        f.signal(2)
        ready = set()
        deadline = time.monotonic() + 5
        while len(ready) < 2 and time.monotonic() < deadline:
            ready |= set(select.select(fds, [], [], 0.5)[0])
        assert ready == {fds[0], fds[1]}
        assert os.eventfd_read(fds[0]) == 1 and os.eventfd_read(fds[1]) == 1
        with pytest.raises(BlockingIOError):  # written once only
            os.eventfd_read(fds[0])
        f.signal(3)
        assert select.select([fds[2]], [], [], 5)[0] == [fds[2]]
        reached = f.eventfd_wait(1)  # a value reached already: readable at once
        fds.append(reached)
        assert select.select([reached], [], [], 5)[0] == [reached]
    finally:
        for fd in fds:
            os.close(fd)
    wait_until(lambda: guest_events(sstack) == 0, what="one-shot eventfds released")


def test_a_blocked_wait_does_not_hold_up_the_other_threads(sstack, dev):
    f = dev.fence()
    th, box = in_thread(lambda: f.wait(1))
    time.sleep(0.1)
    done = 0
    t0 = time.monotonic()
    workers = []
    for _ in range(4):
        def work() -> None:
            nonlocal done
            for _ in range(25):
                dev.execution_state()
                g = dev.fence()
                g.signal(1)
                assert g.wait(1) == OK
                g.close()
                done += 1
        w = threading.Thread(target=work)
        w.start()
        workers.append(w)
    for w in workers:
        w.join(30)
    assert done == 100 and time.monotonic() - t0 < 30
    assert th.is_alive()  # still parked
    f.signal(1)
    th.join(10)
    assert box["result"] == OK


def test_async_flavor(sstack):
    async def main() -> None:
        async with await open_node_async(sstack.node_path) as node:
            ad = (await node.adapters())[0]
            async with await ad.create_device() as d:
                f = await d.fence(1)
                g = await d.fence()
                assert isinstance(f, AsyncFence) and f.value == 1
                await f.signal(4)
                assert f.value == 4 and await f.wait(4) == OK
                assert await f.wait(5, timeout=0.1) == TIMEOUT

                async def later() -> None:
                    await asyncio.sleep(0.1)
                    await g.signal(2)

                task = asyncio.ensure_future(later())
                assert await wait_all([(f, 4), (g, 2)], timeout=10) == OK
                await task
                assert await wait_any([(f, 99), (g, 2)]) == OK
                fd = await g.eventfd_wait(3)
                try:
                    await g.signal(3)
                    loop = asyncio.get_running_loop()
                    readable = loop.create_future()
                    loop.add_reader(fd, readable.set_result, None)
                    await asyncio.wait_for(readable, 5)
                    loop.remove_reader(fd)
                finally:
                    os.close(fd)

    asyncio.run(main())
    wait_until(lambda: host_sync(sstack)["sync_objects"] == 0, what="fences gone with the device")


def test_fences_over_tcp_are_mirrored_by_the_guest(tmp_path):
    """No descriptor crosses TCP: the guest keeps the page the client reads, told of every new
    value by the host (PYDXG_FENCEVALUE)."""
    with tcp_stack(tmp_path) as st, open_node(st.node_path) as node:
        dev = node.adapters()[0].create_device()
        fences = [dev.fence(i) for i in range(600)]  # more than one mirror page (512 slots)
        assert [f.value for f in fences[:3]] == [0, 1, 2] and fences[599].value == 599
        f = fences[0]
        th, box = in_thread(lambda: f.wait(10, timeout=10))
        time.sleep(0.05)
        f.signal(10)
        th.join(10)
        assert box["result"] == OK and f.value == 10
        ctx = dev.create_context()
        signal_from_gpu(ctx, [(fences[1], 77)])  # a signal nobody waits for: the page shows it
        wait_until(lambda: fences[1].value == 77, what="GPU signal mirrored")
        for g in fences:
            g.close()
        snap = st.driver.snapshot()["processes"][0]
        assert snap["shadows"] == 0 and guest_events(st) == 0


def test_wait_on_a_paging_queue_fence(sstack, dev):
    """A queue's monitored fence (MONITOREDFENCE handle) is waited on like any fence."""
    q = dev.paging_queue()
    args = s.d3dkmt_waitforsynchronizationobjectfromcpu()
    handles = (ctypes.c_uint32 * 1)(q.sync_object)
    values = (ctypes.c_uint64 * 1)(0)
    args.device.v = dev.handle
    args.object_count = 1
    args.objects = ctypes.addressof(handles)
    args.fence_values = ctypes.addressof(values)
    assert t.D3DKMTWaitForSynchronizationObjectFromCpu(dev.conn, args) == OK
    # but nobody signals it but its queue: it is no sync object of the caller's
    cpu = s.d3dkmt_signalsynchronizationobjectfromcpu()
    cpu.device.v = dev.handle
    cpu.object_count = 1
    cpu.objects = ctypes.addressof(handles)
    cpu.fence_values = ctypes.addressof(values)
    assert t.D3DKMTSignalSynchronizationObjectFromCpu(dev.conn, cpu) == \
        NTSTATUS.STATUS_INVALID_HANDLE
    # a context's GPU wait on it (reached: 0) holds nothing up
    ctx, a = dev.create_context(), dev.fence()
    gpu = s.d3dkmt_waitforsynchronizationobjectfromgpu()
    gpu.context.v = ctx.handle
    gpu.object_count = 1
    gpu.objects = ctypes.addressof(handles)
    gpu.monitored_fence_values = ctypes.addressof(values)
    assert t.D3DKMTWaitForSynchronizationObjectFromGpu(dev.conn, gpu) == OK
    signal_from_gpu(ctx, [(a, 1)])
    assert a.wait(1, timeout=5) == OK


# ---- the GPU timeline of a context ---------------------------------------------------------------


def test_gpu_signal_and_wait_on_a_context(sstack, dev):
    ctx, other = dev.create_context(), dev.create_context()
    a, b = dev.fence(), dev.fence()
    signal_from_gpu(ctx, [(a, 4)])  # nothing queued on the context: at once
    assert a.wait(4, timeout=5) == OK
    wait_from_gpu(ctx, [(b, 1)])  # the context waits for b ...
    signal_from_gpu(ctx, [(a, 9)])  # ... so this signal waits too
    signal_from_gpu(other, [(a, 6)])  # another context is not held up
    assert a.wait(6, timeout=5) == OK
    assert a.wait(9, timeout=0.2) == TIMEOUT and a.value == 6
    assert host_sync(sstack)["gpu_ops"] == 2
    b.signal(1)
    assert a.wait(9, timeout=5) == OK
    wait_until(lambda: host_sync(sstack)["gpu_ops"] == 0, what="lane drained")
    # a wait whose fence goes releases the lane
    c = dev.fence()
    wait_from_gpu(ctx, [(c, 5)])
    signal_from_gpu(ctx, [(a, 12)])
    c.close()
    assert a.wait(12, timeout=5) == OK
    # a context that goes takes its queued work with it
    wait_from_gpu(other, [(b, 100)])
    signal_from_gpu(other, [(a, 50)])
    assert host_sync(sstack)["gpu_ops"] == 2
    other.close()
    wait_until(lambda: host_sync(sstack)["gpu_ops"] == 0, what="context's queue cancelled")
    assert a.value == 12


def test_signal_from_gpu2_on_several_contexts_with_a_cpu_event(sstack, dev):
    c1, c2 = dev.create_context(), dev.create_context()
    gate = dev.fence()
    wait_from_gpu(c2, [(gate, 1)])
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        ctxs = (ctypes.c_uint32 * 2)(c1.handle, c2.handle)
        args = s.d3dkmt_signalsynchronizationobjectfromgpu2()
        args.context_count = 2
        args.contexts = ctypes.addressof(ctxs)
        args.flags.enqueue_cpu_event = 1
        args.cpu_event_handle = efd
        ret = dev.conn.ioctl(io.LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMGPU2, args, (efd,))
        assert ret == 0
        assert select.select([efd], [], [], 0.2)[0] == []  # c2 is still waiting
        gate.signal(1)
        assert select.select([efd], [], [], 5)[0] == [efd] and os.eventfd_read(efd) == 1
        # and with fences: both contexts must get there
        f = dev.fence()
        wait_from_gpu(c1, [(gate, 2)])
        fences = (ctypes.c_uint32 * 1)(f.handle)
        values = (ctypes.c_uint64 * 1)(3)
        args = s.d3dkmt_signalsynchronizationobjectfromgpu2()
        args.object_count = 1
        args.objects = ctypes.addressof(fences)
        args.context_count = 2
        args.contexts = ctypes.addressof(ctxs)
        args.monitored_fence_values = ctypes.addressof(values)
        assert t.D3DKMTSignalSynchronizationObjectFromGpu2(dev.conn, args) == OK
        assert f.wait(3, timeout=0.2) == TIMEOUT
        gate.signal(2)
        assert f.wait(3, timeout=5) == OK
    finally:
        os.close(efd)


# ---- the legacy kinds ----------------------------------------------------------------------------


def _legacy_signal(dev, ctx, objs, value: int = 0) -> int:
    args = s.d3dkmt_signalsynchronizationobject2()
    args.context.v = ctx.handle
    args.object_count = len(objs)
    for i, o in enumerate(objs):
        args.object_array[i].v = o.handle
    args.fence.fence_value = value
    return t.D3DKMTSignalSynchronizationObject2(dev.conn, args)


def _legacy_wait(dev, ctx, objs, value: int = 0) -> int:
    args = s.d3dkmt_waitforsynchronizationobject2()
    args.context.v = ctx.handle
    args.object_count = len(objs)
    for i, o in enumerate(objs):
        args.object_array[i].v = o.handle
    args.fence.fence_value = value
    return t.D3DKMTWaitForSynchronizationObject2(dev.conn, args)


def test_legacy_kinds(sstack, dev):
    c1, c2 = dev.create_context(), dev.create_context()
    marker = dev.fence()
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        note = dev.sync_object(SyncKind.CPU_NOTIFICATION, eventfd=efd)
        mutex = dev.sync_object(SyncKind.MUTEX, initial=1)
        sem = dev.sync_object(SyncKind.SEMAPHORE, initial=0, max_count=2)
        fence = dev.sync_object(SyncKind.FENCE, initial=1)
        # a CPU notification: its eventfd is written each time it is signalled
        for n in (1, 2):
            assert _legacy_signal(dev, c1, [note]) == OK
            assert select.select([efd], [], [], 5)[0] == [efd]
            wait_until(lambda: _count(efd) >= 1, what=f"notification {n}")
            os.eventfd_read(efd)
        # a mutex: c1 takes it; c2 waits for it until c1 gives it back
        assert _legacy_wait(dev, c1, [mutex]) == OK
        assert _legacy_wait(dev, c2, [mutex]) == OK
        signal_from_gpu(c2, [(marker, 1)])
        assert marker.wait(1, timeout=0.2) == TIMEOUT
        assert _legacy_signal(dev, c1, [mutex]) == OK
        assert marker.wait(1, timeout=5) == OK
        # a semaphore: counts
        assert _legacy_signal(dev, c1, [sem]) == OK
        assert _legacy_wait(dev, c2, [sem]) == OK and _legacy_wait(dev, c2, [sem]) == OK
        signal_from_gpu(c2, [(marker, 2)])
        assert marker.wait(2, timeout=0.2) == TIMEOUT
        assert _legacy_signal(dev, c1, [sem]) == OK
        assert marker.wait(2, timeout=5) == OK
        # a legacy fence: a value no page shows
        assert _legacy_wait(dev, c2, [fence], 5) == OK
        signal_from_gpu(c2, [(marker, 3)])
        assert marker.wait(3, timeout=0.2) == TIMEOUT
        assert _legacy_signal(dev, c1, [fence], 5) == OK
        assert marker.wait(3, timeout=5) == OK
        # the Python device closes every object made through it (legacy ones too, though the
        # driver keeps those past DestroyDevice: see the next test)
        dev.close()
        assert host_sync(sstack)["sync_objects"] == 0
    finally:
        os.close(efd)


def test_a_cancelled_gpu_wait_gives_back_the_units_it_took(sstack, dev):
    """A legacy GPU wait on a mutex and a semaphore takes the mutex at once and waits for the
    semaphore; its context goes: the mutex must come back, or nobody could ever take it."""
    c1, c2 = dev.create_context(), dev.create_context()
    marker = dev.fence()
    mutex = dev.sync_object(SyncKind.MUTEX, initial=1)
    sem = dev.sync_object(SyncKind.SEMAPHORE, initial=0, max_count=1)
    assert _legacy_wait(dev, c2, [mutex, sem]) == OK  # mutex taken, the semaphore awaited
    signal_from_gpu(c2, [(marker, 1)])
    assert marker.wait(1, timeout=0.1) == TIMEOUT
    wait_until(lambda: host_sync(sstack)["gpu_ops"] == 2, what="c2's wait and signal queued")
    c2.close()
    wait_until(lambda: host_sync(sstack)["gpu_ops"] == 0, what="c2's turns cancelled")
    assert _legacy_wait(dev, c1, [mutex]) == OK
    signal_from_gpu(c1, [(marker, 2)])
    assert marker.wait(2, timeout=5) == OK


def _count(efd: int) -> int:
    from dxg.oslib.eventfd import eventfd_count

    return eventfd_count(efd) or 0


def test_adapter_level_objects_go_with_the_last_adapter_handle(sstack):
    with open_node(sstack.node_path) as node:
        ad = node.adapters()[0]
        d = ad.create_device()
        args = s.d3dkmt_createsynchronizationobject2()
        args.device.v = d.handle
        args.info.type = SyncKind.SEMAPHORE
        args.info.semaphore.max_count = 1
        assert t.D3DKMTCreateSynchronizationObject2(node.conn, args) == OK
        destroy = s.d3dkmt_destroydevice()
        destroy.device.v = d.handle
        assert t.D3DKMTDestroyDevice(node.conn, destroy) == OK
        assert host_sync(sstack)["sync_objects"] == 1  # not a device object
        for a in node.adapters():  # (adapters() opened each once more)
            a.close()
        ad.close()
        wait_until(lambda: host_sync(sstack)["sync_objects"] == 0, what="dropped with the adapter")


def test_limits_and_bad_arguments(sstack, dev):
    f = dev.fence()
    conn = dev.conn

    def create(kind: int, **info) -> int:
        args = s.d3dkmt_createsynchronizationobject2()
        args.device.v = dev.handle
        args.info.type = kind
        for k, v in info.items():
            setattr(args.info.flags, k, v)
        return t.D3DKMTCreateSynchronizationObject2(conn, args)

    assert create(7) == NTSTATUS.STATUS_INVALID_PARAMETER
    assert create(0) == NTSTATUS.STATUS_INVALID_PARAMETER
    assert create(6) == NTSTATUS.STATUS_NOT_SUPPORTED  # periodic: no display (-EPERM)
    assert create(5, shared=1) == NTSTATUS.STATUS_INVALID_PARAMETER  # without nt sharing
    args = s.d3dkmt_createsynchronizationobject2()
    args.device.v = dev.handle
    args.info.type = SyncKind.CPU_NOTIFICATION
    args.info.cpu_notification.event = 0  # no eventfd handed over
    assert t.D3DKMTCreateSynchronizationObject2(conn, args) != OK
    args.info.type = SyncKind.SEMAPHORE
    args.info.semaphore.max_count = 1
    args.info.semaphore.initial_count = 2
    assert t.D3DKMTCreateSynchronizationObject2(conn, args) == NTSTATUS.STATUS_INVALID_PARAMETER

    handles = (ctypes.c_uint32 * 33)(*([f.handle] * 33))
    values = (ctypes.c_uint64 * 33)()
    w = s.d3dkmt_waitforsynchronizationobjectfromcpu()
    w.device.v = dev.handle
    w.objects = ctypes.addressof(handles)
    w.fence_values = ctypes.addressof(values)
    for count, want in ((33, NTSTATUS.STATUS_INVALID_PARAMETER), (0,
                        NTSTATUS.STATUS_INVALID_PARAMETER), (32, OK)):
        w.object_count = count
        assert t.D3DKMTWaitForSynchronizationObjectFromCpu(conn, w) == want, count
    w.object_count = 1
    handles[0] = 0x40000FC0  # not a handle of ours
    assert t.D3DKMTWaitForSynchronizationObjectFromCpu(conn, w) == \
        NTSTATUS.STATUS_INVALID_HANDLE
    sig = s.d3dkmt_signalsynchronizationobjectfromcpu()
    sig.device.v = dev.handle
    sig.object_count = 33
    sig.objects = ctypes.addressof(handles)
    sig.fence_values = ctypes.addressof(values)
    assert t.D3DKMTSignalSynchronizationObjectFromCpu(conn, sig) == \
        NTSTATUS.STATUS_INVALID_PARAMETER
    w.async_event = 1  # stdout: not an eventfd (and not handed over)
    handles[0] = f.handle
    assert t.D3DKMTWaitForSynchronizationObjectFromCpu(conn, w) != OK
    legacy = s.d3dkmt_signalsynchronizationobject2()
    legacy.context.v = dev.create_context().handle
    legacy.object_count = 33
    assert t.D3DKMTSignalSynchronizationObject2(conn, legacy) == NTSTATUS.STATUS_INVALID_PARAMETER
    legacy.object_count = 1
    legacy.object_array[0].v = f.handle
    legacy.context_count = 64
    assert t.D3DKMTSignalSynchronizationObject2(conn, legacy) == NTSTATUS.STATUS_INVALID_PARAMETER
    destroy = s.d3dkmt_destroysynchronizationobject()
    destroy.sync_object.v = 0x40000FC0
    assert t.D3DKMTDestroySynchronizationObject(conn, destroy) == NTSTATUS.STATUS_INVALID_HANDLE
    wait_until(lambda: guest_events(sstack) == 0, what="no event left registered")


# ---- waiters woken with an error -----------------------------------------------------------------


def test_a_waiter_wakes_with_an_error_when_its_fence_or_device_goes(sstack):
    with open_node(sstack.node_path) as node:
        d = node.adapters()[0].create_device()
        f, g = d.fence(), d.fence()
        th, box = in_thread(lambda: f.wait(1))
        time.sleep(0.1)
        destroy = s.d3dkmt_destroysynchronizationobject()
        destroy.sync_object.v = f.handle
        assert t.D3DKMTDestroySynchronizationObject(node.conn, destroy) == OK
        th.join(10)
        assert box["result"] == NTSTATUS.STATUS_INVALID_HANDLE
        th, box = in_thread(lambda: g.wait(1))
        async_fd = g.eventfd_wait(1)
        time.sleep(0.1)
        args = s.d3dkmt_destroydevice()
        args.device.v = d.handle
        assert t.D3DKMTDestroyDevice(node.conn, args) == OK  # the fence is still open here
        th.join(10)
        assert box["result"] == NTSTATUS.STATUS_DEVICE_REMOVED
        assert select.select([async_fd], [], [], 5)[0] == [async_fd]  # woken, too
        os.close(async_fd)
        assert host_sync(sstack)["sync_objects"] == 0 and host_sync(sstack)["cpu_waits"] == 0
        wait_until(lambda: guest_events(sstack) == 0, what="events gone")


def test_a_waiter_wakes_with_an_error_when_its_adapter_is_removed(tmp_path):
    with make_stack(tmp_path) as st, open_node(st.node_path) as node:
        d = node.adapters()[1].create_device()
        f = d.fence()
        th, box = in_thread(lambda: f.wait(1))
        time.sleep(0.1)
        st.host.remove_adapter(1)
        th.join(10)
        assert box["result"] == NTSTATUS.STATUS_DEVICE_REMOVED
        assert host_sync(st)["sync_objects"] == 0  # the host dropped what was on it
        with pytest.raises(DxgError) as e:
            f.signal(1)
        assert e.value.status == NTSTATUS.STATUS_DEVICE_REMOVED
        f.close()  # releasing works on a removed adapter
        wait_until(lambda: guest_events(st) == 0, what="events gone")


def test_a_waiter_wakes_with_an_error_when_the_host_goes(tmp_path):
    host = Host(HostConfig(adapters=1))
    drv = GuestDriver(heartbeat_timeout=2.0)
    node = None
    try:
        drv.bind(host.listen(str(tmp_path / "h.sock")))
        assert drv.wait_for_adapters(1, 15)
        node = SocketNode(drv, str(tmp_path / "n.sock"))
        node.start()
        with open_node(str(tmp_path / "n.sock")) as client:
            f = client.adapters()[0].create_device().fence()
            th, box = in_thread(lambda: f.wait(1))
            time.sleep(0.1)
            host.close()
            th.join(10)
            assert box["result"] == NTSTATUS.STATUS_DEVICE_REMOVED
    finally:
        if node is not None:
            node.close()
        drv.close()
        host.close()


WAITER = r"""
import json, os, sys
from dxg.client import open_node
node = open_node(sys.argv[1])
dev = node.adapters()[0].create_device()
f = dev.fence()
fd = f.eventfd_wait(5)  # an asynchronous wait armed too
print(json.dumps({"pid": os.getpid(), "fence": f.handle}), flush=True)
f.wait(10)  # blocks until SIGKILL
"""


def test_a_sigkilled_waiter_leaves_nothing_behind(sstack):
    before = host_sync(sstack)
    proc = subprocess.Popen([sys.executable, "-c", WAITER, sstack.node_path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        held = read_json_line(proc, 60)
        wait_until(lambda: host_sync(sstack)["cpu_waits"] == 2, what="both waits on the host")
        assert guest_events(sstack) == 2 and host_sync(sstack)["sync_objects"] == 1
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        wait_until(lambda: host_sync(sstack) == before, what="the host forgot it all")
        wait_until(lambda: guest_events(sstack) == 0, what="the guest forgot it all")
        assert held["pid"] not in [p["pid"] for p in sstack.driver.snapshot()["processes"]]
    finally:
        if proc.poll() is None:
            proc.kill()


# ---- the host's SyncObject alone -----------------------------------------------------------------


def test_host_sync_object_interface():
    from dxg.host.syncobject import FENCE, MONITORED_FENCE, MUTEX, SEMAPHORE, SyncObject

    async def main() -> None:
        f = SyncObject(1, None, MONITORED_FENCE, process=object(), adapter=object(), value=2)
        assert f.value == 2 and f.wait(2).done()
        w5, w3 = f.wait(5), f.wait(3)
        f.signal(3)
        assert w3.done() and not w5.done()
        f.signal(1)
        assert f.value == 3
        f.signal(1, rewind=True)
        assert f.value == 1
        f.fail(NTSTATUS.STATUS_DEVICE_REMOVED)
        with pytest.raises(CommandFailed) as e:
            w5.result()
        assert e.value.status == NTSTATUS.STATUS_DEVICE_REMOVED
        assert f.wait(1).done() and f.wait(2).exception() is not None
        mx = SyncObject(2, None, MUTEX, process=object(), adapter=object(), value=1)
        first, second = mx.wait(), mx.wait()
        assert first.done() and not second.done()
        mx.signal()
        assert second.done()
        sem = SyncObject(3, None, SEMAPHORE, process=object(), adapter=object(), max_count=2)
        sem.signal()
        sem.signal()
        sem.signal()  # capped at max_count
        assert sem.value == 2 and sem.wait().done() and sem.wait().done()
        assert not sem.wait().done()
        legacy = SyncObject(4, None, FENCE, process=object(), adapter=object())
        waits = [legacy.wait(i) for i in range(200)]  # pruned as they go
        for w in waits[100:]:
            w.cancel()
        legacy.signal(99)
        assert all(w.done() for w in waits)

    asyncio.run(main())


def test_signal_guest_event_carries_a_status():
    body = m.SignalGuestEvent(7, 42, 0, NTSTATUS.STATUS_DEVICE_REMOVED).pack()
    assert len(body) == 24 and m.SignalGuestEvent.unpack(body).status == \
        NTSTATUS.STATUS_DEVICE_REMOVED
    assert m.SignalGuestEvent.unpack(m.SignalGuestEvent(7, 42, 1).pack()).status == 0


def test_ioctl_results_map_as_libdxg():
    import errno

    assert ioctl_result_to_ntstatus(-errno.ENODEV) == NTSTATUS.STATUS_DEVICE_REMOVED
    assert ioctl_result_to_ntstatus(-errno.EBADF) == NTSTATUS.STATUS_INVALID_HANDLE


def test_a_waiter_wakes_with_an_error_when_its_device_enters_the_error_state(sstack, dev):
    f = dev.fence(2)
    th, box = in_thread(lambda: f.wait(5))
    time.sleep(0.1)
    (part,) = sstack.host.partitions()
    ((_, device),) = part.devices()
    hung = int(s.d3dkmt_deviceexecution_state._D3DKMT_DEVICEEXECUTION_HUNG)
    assert part.set_device_execution_state(device, hung)
    th.join(10)
    assert box["result"] == NTSTATUS.STATUS_DEVICE_REMOVED
    assert f.wait(2) == OK  # reached before: still reached
    with pytest.raises(DxgError) as e:
        f.wait(3)
    assert e.value.status == NTSTATUS.STATUS_DEVICE_REMOVED
    wait_until(lambda: guest_events(sstack) == 0, what="events gone")
