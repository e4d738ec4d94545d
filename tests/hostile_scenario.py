"""The objects a hostile test process starts with and one valid call of (almost) every ioctl
made on them through the client API (tests/test_hostile_*.py). The raw client records the
requests of these calls: they are what mutated hostile calls start from, and, seen from the
host, what a well-behaved guest sends."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from typing import Any

from dxg.backends.softcmd import CommandBuffer
from dxg.client import diag, sync
from dxg.client import thunks as th
from dxg.client.sync import SyncKind
from dxg.uapi import structs as s
from dxg.uapi.ntstatus import NTSTATUS
from hostile_support import RawNodeClient


@dataclass
class Target:
    """One hostile process (a raw connection) and the objects it made."""

    raw: RawNodeClient
    node: Any
    handles: dict[str, list[int]] = field(default_factory=dict)  # kind -> live handles
    dead: list[int] = field(default_factory=list)
    foreign: list[int] = field(default_factory=list)  # another process's handles
    va: int = 0  # a GPU VA range it reserved
    objects: dict[str, Any] = field(default_factory=dict)  # the client API's objects
    luids: list[int] = field(default_factory=list)
    fds: dict[str, int] = field(default_factory=dict)  # what it may hand the node
    keep: list[Any] = field(default_factory=list)  # descriptors it owns (closed at the end)

    def all_live(self) -> list[int]:
        return [h for hs in self.handles.values() for h in hs]



def build_objects(t: Target) -> None:
    """The objects every hostile process starts with (their valid calls are recorded)."""
    node = t.node
    ad, ad2 = node.adapters()[:2]
    dev, dev2 = ad.create_device(), ad2.create_device()
    ctx = dev.create_context()
    queue = ctx.hwqueue()
    alloc = dev.allocate(4096)
    res = dev.shared_resource(4096)
    fence = dev.fence(1)
    sfence = dev.shared_fence(2)
    pq = dev.paging_queue()
    va = ad.reserve_gpu_va(1 << 20)
    # objects made and destroyed again: their handles are dead
    dead_ctx = dev.create_context()
    dead_alloc = dev.allocate(4096)
    dead_dev = ad2.create_device()
    t.dead = [dead_ctx.handle, dead_alloc.handle, dead_dev.handle]
    for obj in (dead_ctx, dead_alloc, dead_dev):
        obj.close()
    t.handles = {
        "adapter": [ad.handle, ad2.handle], "device": [dev.handle, dev2.handle],
        "context": [ctx.handle], "hwqueue": [queue.handle],
        "allocation": [alloc.handle, *(a.handle for a in res.allocations)],
        "resource": [res.handle],
        "sync": [fence.handle, sfence.handle, pq.sync_object, queue.fence],
        "paging_queue": [pq.handle],
    }
    t.va = int(va)
    share_res, share_fence = res.share(), sfence.share()
    sync_file, local_sync_file = sfence.sync_file(3), fence.sync_file(3)
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    rd, wr = os.pipe2(os.O_CLOEXEC)
    t.keep += [share_res, share_fence, sync_file, local_sync_file, _Fd(efd), _Fd(null), _Fd(rd), _Fd(wr)]
    t.fds = {"share_resource": share_res.fileno(), "share_fence": share_fence.fileno(),
             "sync_file": sync_file.fileno(), "local_sync_file": local_sync_file.fileno(),
             "eventfd": efd, "devnull": null, "pipe_r": rd,
             "pipe_w": wr}
    t.objects = {"ad": ad, "ad2": ad2, "dev": dev, "dev2": dev2, "ctx": ctx, "queue": queue,
                 "alloc": alloc, "res": res, "fence": fence, "sfence": sfence, "pq": pq,
                 "va": va, "share_res": share_res, "share_fence": share_fence,
                 "sync_file": sync_file, "efd": efd}


def _legacy(kind: str, t: Target) -> None:
    o = t.objects
    sem = o["dev"].sync_object(SyncKind.SEMAPHORE, initial=0, max_count=4)
    args: Any
    if kind == "signal":
        args = s.d3dkmt_signalsynchronizationobject2()
    else:
        args = s.d3dkmt_waitforsynchronizationobject2()
    args.context.v = o["ctx"].handle
    args.object_count = 1
    args.object_array[0].v = sem.handle
    call = th.D3DKMTSignalSynchronizationObject2 if kind == "signal" else \
        th.D3DKMTWaitForSynchronizationObject2
    assert call(t.raw, args) == 0


def _signal_gpu2(t: Target) -> None:
    o = t.objects
    fences = (ctypes.c_uint32 * 1)(o["fence"].handle)
    values = (ctypes.c_uint64 * 1)(2)
    ctxs = (ctypes.c_uint32 * 1)(o["ctx"].handle)
    args = s.d3dkmt_signalsynchronizationobjectfromgpu2()
    args.object_count, args.objects = 1, ctypes.addressof(fences)
    args.context_count, args.contexts = 1, ctypes.addressof(ctxs)
    args.monitored_fence_values = ctypes.addressof(values)
    assert th.D3DKMTSignalSynchronizationObjectFromGpu2(t.raw, args) == 0


def _enum2(t: Target) -> None:
    args = s.d3dkmt_enumadapters2()
    assert th.D3DKMTEnumAdapters2(t.raw, args) == 0
    infos = (s.d3dkmt_adapterinfo * 4)()
    args.num_adapters, args.adapters = 4, ctypes.addressof(infos)
    assert th.D3DKMTEnumAdapters2(t.raw, args) == 0


def _nop_buffer(t: Target) -> tuple[int, int]:
    raw = CommandBuffer().nop().tobytes()
    buf = t.objects["dev"].allocate(len(raw))
    buf.upload(raw)
    return int(buf.map_gpu()), len(raw)


def _submit(t: Target) -> None:
    va, length = _nop_buffer(t)
    args = s.d3dkmt_submitcommand()
    args.command_buffer, args.command_length = va, length
    args.broadcast_context_count = 1
    args.broadcast_context[0].v = t.objects["ctx"].handle
    assert th.D3DKMTSubmitCommand(t.raw, args) == 0


def _thunk_call(name: str, **fields: Any) -> Any:
    def step(t: Target) -> None:
        o = t.objects
        args = getattr(th, name).struct()
        for key, value in fields.items():
            target: Any = args
            *path, leaf = key.split(".")
            for part in path:
                target = getattr(target, part)
            setattr(target, leaf, value(o) if callable(value) else value)
        getattr(th, name)(t.raw, args)
    return step


def _locked(t: Target) -> None:
    """Lock2 three times and one upload (Lock2, Unlock2): the Unlock2s replayed find it locked."""
    o = t.objects
    for _ in range(3):
        args = s.d3dkmt_lock2()
        args.device.v, args.allocation.v = o["dev"].handle, o["alloc"].handle
        assert th.D3DKMTLock2(t.raw, args) == 0
    o["alloc"].upload(b"unlock")


def _waits(t: Target) -> None:
    """A CPU wait that times out (it is cancelled), and an asynchronous one (an eventfd)."""
    fence = t.objects["fence"]
    assert fence.wait(9, timeout=0.01) == NTSTATUS.STATUS_TIMEOUT
    t.keep.append(_Fd(fence.eventfd_wait(9)))


def _offer(t: Target, reclaim: bool) -> None:
    dev = t.objects["dev"]
    alloc = dev.allocate(4096)
    dev.offer([alloc])
    if reclaim:
        dev.reclaim([alloc])


def _update_va(t: Target) -> None:
    o = t.objects
    mapping = o["alloc"].map_gpu(o["pq"], va=t.va)
    mapping.close()  # UpdateGpuVirtualAddress (UNMAP)


# One or more valid calls of each ioctl, made on the target's own objects: the templates the
# mutated hostile calls start from (ioctls not here are recorded by build_objects).
STEPS: dict[str, Any] = {
    "LX_DXENUMADAPTERS2": _enum2,
    "LX_DXOPENADAPTERFROMLUID": lambda t: t.node.open_adapter(t.luids[0]),
    "LX_DXCLOSEADAPTER": lambda t: t.node.open_adapter(t.luids[1]).close(),
    "LX_DXQUERYADAPTERINFO": lambda t: t.objects["ad"].description,
    "LX_ISFEATUREENABLED": lambda t: t.objects["ad"].is_feature_enabled(0),
    "LX_DXQUERYCLOCKCALIBRATION": lambda t: t.objects["ad"].clock_calibration(),
    "LX_DXENUMPROCESSES": lambda t: t.objects["ad"].processes(),
    "LX_DXQUERYVIDEOMEMORYINFO": lambda t: t.objects["ad"].video_memory_info(),
    "LX_DXCHANGEVIDEOMEMORYRESERVATION": lambda t: t.objects["ad"].reserve_video_memory(4096),
    "LX_DXFLUSHHEAPTRANSITIONS": lambda t: t.objects["ad"].flush_heap_transitions(),
    "LX_DXESCAPE": lambda t: diag.ping(t.objects["dev"]),
    "LX_DXDESTROYHWQUEUE": lambda t: t.objects["ctx"].hwqueue().close(),
    "LX_DXDESTROYPAGINGQUEUE": lambda t: t.objects["dev"].paging_queue().close(),
    "LX_DXDESTROYSYNCHRONIZATIONOBJECT": lambda t: t.objects["dev"].fence().close(),
    "LX_DXGETDEVICESTATE": lambda t: t.objects["dev"].execution_state(),
    "LX_DXMARKDEVICEASERROR": lambda t: t.objects["ad2"].create_device().mark_error(),
    "LX_DXSETCONTEXTSCHEDULINGPRIORITY": lambda t: t.objects["ctx"].set_priority(3),
    "LX_DXGETCONTEXTSCHEDULINGPRIORITY": lambda t: t.objects["ctx"].priority(),
    "LX_DXSETCONTEXTINPROCESSSCHEDULINGPRIORITY":
        lambda t: t.objects["ctx"].set_priority(1, in_process=True),
    "LX_DXGETCONTEXTINPROCESSSCHEDULINGPRIORITY":
        lambda t: t.objects["ctx"].priority(in_process=True),
    "LX_DXLOCK2": lambda t: t.objects["alloc"].upload(b"lock"),
    "LX_DXUNLOCK2": lambda t: _locked(t),
    "LX_DXQUERYALLOCATIONRESIDENCY": lambda t: t.objects["alloc"].residency(),
    "LX_DXGETALLOCATIONPRIORITY": lambda t: t.objects["alloc"].priority,
    "LX_DXSETALLOCATIONPRIORITY": lambda t: setattr(t.objects["alloc"], "priority", 5),
    "LX_DXMAKERESIDENT": lambda t: t.objects["dev"].make_resident([t.objects["alloc"]]),
    "LX_DXEVICT": lambda t: t.objects["dev"].evict([t.objects["alloc"]]),
    "LX_DXOFFERALLOCATIONS": lambda t: _offer(t, reclaim=False),
    "LX_DXRECLAIMALLOCATIONS2": lambda t: _offer(t, reclaim=True),
    "LX_DXMAPGPUVIRTUALADDRESS": lambda t: t.objects["alloc"].map_gpu(t.objects["pq"]),
    "LX_DXUPDATEGPUVIRTUALADDRESS": _update_va,
    "LX_DXFREEGPUVIRTUALADDRESS":
        lambda t: t.objects["ad"].reserve_gpu_va(1 << 16).close(),
    "LX_DXUPDATEALLOCPROPERTY": _thunk_call(
        "D3DKMTUpdateAllocationProperty", **{
            "paging_queue.v": lambda o: o["pq"].handle,
            "allocation.v": lambda o: o["alloc"].handle,
            "set_accessed_physically": 1, "flags.accessed_physically": 1}),
    "LX_DXINVALIDATECACHE": _thunk_call(
        "D3DKMTInvalidateCache", **{"device.v": lambda o: o["dev"].handle,
                                    "allocation.v": lambda o: o["alloc"].handle,
                                    "offset": 0, "length": 4096}),
    "LX_DXSHAREOBJECTWITHHOST": _thunk_call(
        "D3DKMTShareObjectWithHost", **{"device_handle.v": lambda o: o["dev"].handle,
                                        "object_handle.v": lambda o: o["res"].handle}),
    "LX_DXQUERYSTATISTICS": _thunk_call(
        "D3DKMTQueryStatistics", **{"type": 0,
                                    "adapter_luid.a": lambda o: o["ad"].luid_parts[0],
                                    "adapter_luid.b": lambda o: o["ad"].luid_parts[1]}),
    "LX_DXSUBMITCOMMAND": _submit,
    "LX_DXSUBMITCOMMANDTOHWQUEUE": lambda t: t.objects["queue"].submit(*_nop_buffer(t)),
    "LX_DXSUBMITSIGNALSYNCOBJECTSTOHWQUEUE":
        lambda t: t.objects["queue"].signal(t.objects["fence"], 2),
    "LX_DXSUBMITWAITFORSYNCOBJECTSTOHWQUEUE":
        lambda t: t.objects["queue"].wait_for(t.objects["fence"], 1),
    "LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMCPU": lambda t: t.objects["fence"].signal(2),
    "LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU": lambda t: _waits(t),
    "LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMGPU":
        lambda t: sync.signal_from_gpu(t.objects["ctx"], [(t.objects["fence"], 2)]),
    "LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMGPU":
        lambda t: sync.wait_from_gpu(t.objects["ctx"], [(t.objects["fence"], 1)]),
    "LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMGPU2": _signal_gpu2,
    "LX_DXSIGNALSYNCHRONIZATIONOBJECT": lambda t: _legacy("signal", t),
    "LX_DXWAITFORSYNCHRONIZATIONOBJECT": lambda t: _legacy("wait", t),
    "LX_DXWAITSYNCFILE": lambda t: t.objects["ctx"].wait_sync_file(t.objects["sync_file"]),
    "LX_DXOPENSYNCOBJECTFROMSYNCFILE":
        lambda t: t.objects["dev"].open_sync_file(t.objects["sync_file"]),
    "LX_DXQUERYRESOURCEINFOFROMNTHANDLE":
        lambda t: t.objects["dev"].open_resource(t.objects["share_res"]),
    "LX_DXOPENRESOURCEFROMNTHANDLE":
        lambda t: t.objects["dev"].open_resource(t.objects["share_res"]),
    "LX_DXOPENSYNCOBJECTFROMNTHANDLE2":
        lambda t: t.objects["dev"].open_fence(t.objects["share_fence"]),
}


class _Fd:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1



__all__ = ["STEPS", "Target", "build_objects"]
