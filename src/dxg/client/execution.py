"""Hardware queues from Python: command buffers submitted to a context's queue, in order, and the
queue's progress fence read from a page shared with the node (no call).

::

    with open_node() as node, node.adapters()[0].create_device() as dev:
        ctx = dev.create_context()
        q = ctx.hwqueue()
        cmd = dev.allocate(len(buffer)); cmd.upload(buffer)
        va = cmd.map_gpu()                 # command buffers are addressed by GPU VA
        done = q.submit(va, len(buffer))   # fire-and-forget: the fence value it will reach
        q.wait(done)                       # the fence page, else a blocking wait on it

Failures of the work itself do not come back from ``submit`` (the real driver's submissions
have no reply): the device enters an error state, ``dev.execution_state()`` reports it and
``q.wait`` raises :class:`DeviceFault`. Written once for the sync and asyncio flavors, like
:mod:`dxg.client.memory`.
"""

from __future__ import annotations

import ctypes
from types import MappingProxyType
from typing import Any

from dxg.client import thunks as t
from dxg.client.api import _Async, _Object, _Sync, close_child
from dxg.client.drive import Op, call, op
from dxg.client.errors import DxgError, check_status
from dxg.client.memory import _pick
from dxg.uapi import structs as s
from dxg.uapi.ntstatus import NTSTATUS

__all__ = ["AsyncHwQueue", "DeviceFault", "HwQueue"]

_EXECUTION = int(s.d3dkmt_devicestate_type._D3DKMT_DEVICESTATE_EXECUTION)
_ACTIVE = int(s.d3dkmt_deviceexecution_state._D3DKMT_DEVICEEXECUTION_ACTIVE)
# Execution states by value, named as in the header without its prefix (HUNG: the TDR stopped
# a buffer that ran too long; ERROR_DMAPAGEFAULT: a bad address...): for the fault's message.
_STATE_NAMES = MappingProxyType({
    int(v): v.name.removeprefix("_D3DKMT_DEVICEEXECUTION_")
    for v in s.d3dkmt_deviceexecution_state})


class DeviceFault(DxgError):
    """The device's work faulted (or it was marked in error): ``state`` is its execution state,
    ``address`` the GPU VA of a page fault (0 when none)."""

    def __init__(self, state: int, address: int, message: str) -> None:
        super().__init__(NTSTATUS.STATUS_DEVICE_REMOVED, message)
        self.state = state
        self.address = address


class _HwQueueOps(_Object):
    """A hardware queue of a context (D3DKMTCreateHwQueue)."""

    def __init__(self, context: Any, handle: int, fence: int, fence_address: int) -> None:
        super().__init__()
        self.context = context
        self.handle = handle
        self.fence = fence  # the progress fence's handle (a monitored fence)
        self.fence_address = fence_address
        self.submitted = 0  # the last progress value handed out

    def __repr__(self) -> str:
        return f"<{type(self).__name__} handle=0x{self.handle:08x}>"

    @property
    def device(self) -> Any:
        return self.context.device

    @property
    def conn(self) -> Any:
        return self.context.conn

    @property
    def progress(self) -> int:
        """The progress fence's value, read from the shared page (no call)."""
        with self._lock:
            if self._closed:
                raise DxgError(NTSTATUS.STATUS_INVALID_HANDLE, f"fence of {self!r}")
            if not self.fence_address:
                raise DxgError(NTSTATUS.STATUS_NOT_SUPPORTED, "the progress fence is not mapped")
            return int(ctypes.c_uint64.from_address(self.fence_address).value)

    @op
    def submit(self, command_buffer: int, length: int) -> Op[int]:
        """SubmitCommandToHwQueue: the command buffer at GPU VA ``command_buffer`` (``length``
        bytes) runs after what this queue has; returns the progress value that says it is done."""
        with self._lock:
            self.submitted += 1
            value = self.submitted
        args = s.d3dkmt_submitcommandtohwqueue()
        args.hwqueue.v = self.handle
        args.hwqueue_progress_fence_id = value
        args.command_buffer = int(command_buffer)
        args.command_length = int(length)
        check_status((yield call(t.D3DKMTSubmitCommandToHwQueue, args)), "SubmitCommandToHwQueue")
        return value

    @op
    def signal(self, fence: Any, value: int) -> Op[None]:
        """SubmitSignalSyncObjectsToHwQueue: ``fence`` (a monitored fence, e.g.
        ``device.fence()``) takes ``value`` once this queue has run what it has now."""
        handles = (ctypes.c_uint32 * 1)(_handle(fence))
        values = (ctypes.c_uint64 * 1)(int(value))
        queues = (ctypes.c_uint32 * 1)(self.handle)
        args = s.d3dkmt_submitsignalsyncobjectstohwqueue()
        args.hwqueue_count = 1
        args.hwqueues = ctypes.addressof(queues)
        args.object_count = 1
        args.objects = ctypes.addressof(handles)
        args.fence_values = ctypes.addressof(values)
        check_status((yield call(t.D3DKMTSubmitSignalSyncObjectsToHwQueue, args)),
                     "SubmitSignalSyncObjectsToHwQueue")

    @op
    def wait_for(self, fence: Any, value: int) -> Op[None]:
        """SubmitWaitForSyncObjectsToHwQueue: what this queue gets next waits until ``fence``
        (a monitored fence, or another queue's ``fence``) reaches ``value``."""
        handles = (ctypes.c_uint32 * 1)(_handle(fence))
        values = (ctypes.c_uint64 * 1)(int(value))
        args = s.d3dkmt_submitwaitforsyncobjectstohwqueue()
        args.hwqueue.v = self.handle
        args.object_count = 1
        args.objects = ctypes.addressof(handles)
        args.fence_values = ctypes.addressof(values)
        check_status((yield call(t.D3DKMTSubmitWaitForSyncObjectsToHwQueue, args)),
                     "SubmitWaitForSyncObjectsToHwQueue")

    @op
    def wait(self, value: int | None = None, timeout: float | None = 30.0) -> Op[int]:
        """Until the progress fence reaches ``value`` (default: everything submitted): at once
        when its page shows it, else a blocking CPU wait on the fence (parks only this caller).
        Raises :class:`DeviceFault` if the device faulted first, TimeoutError past
        ``timeout``."""
        from dxg.client.sync import _ioctl
        from dxg.uapi import ioctls as io
        from dxg.uapi.ntstatus import nt_success

        target = self.submitted if value is None else int(value)
        if self.fence_address and self.progress >= target:
            return self.progress
        handles = (ctypes.c_uint32 * 1)(self.fence)
        values = (ctypes.c_uint64 * 1)(target)
        args = s.d3dkmt_waitforsynchronizationobjectfromcpu()
        args.device.v = self.device.handle
        args.object_count = 1
        args.objects = ctypes.addressof(handles)
        args.fence_values = ctypes.addressof(values)
        try:
            status = yield _ioctl(io.LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU, args,
                                  timeout=timeout)
        except TimeoutError:
            raise TimeoutError(f"{self!r}: waited {timeout} s for {target}") from None
        if not nt_success(status):
            yield from _check_device(self.device)  # a fault says so (DeviceFault)
            check_status(status, "WaitForSynchronizationObjectFromCpu")
        return self.progress if self.fence_address else target

    def _close(self) -> Op[None]:
        args = s.d3dkmt_destroyhwqueue()
        args.queue.v = self.handle
        yield from close_child(self, t.D3DKMTDestroyHwQueue, args, "DestroyHwQueue",
                               parent=self.context)


def _handle(fence: Any) -> int:
    """A sync object's handle: a Fence object, a queue (its progress fence) or an int."""
    if isinstance(fence, _HwQueueOps):
        return fence.fence
    return int(getattr(fence, "handle", fence))


def _check_device(device: Any) -> Op[None]:
    args = s.d3dkmt_getdevicestate()
    args.device.v = device.handle
    args.state_type = _EXECUTION
    check_status((yield call(t.D3DKMTGetDeviceState, args)), "GetDeviceState")
    state = int(args.execution_state)
    if state != _ACTIVE:
        fault = s.d3dkmt_getdevicestate()
        fault.device.v = device.handle
        fault.state_type = int(s.d3dkmt_devicestate_type._D3DKMT_DEVICESTATE_PAGE_FAULT)
        address = 0
        if (yield call(t.D3DKMTGetDeviceState, fault)) == 0:
            address = int(s.d3dkmt_devicepagefault_state.from_buffer_copy(
                bytes(fault)[8 : 8 + ctypes.sizeof(s.d3dkmt_devicepagefault_state)])
                .faulted_virtual_address)
        name = _STATE_NAMES.get(state, "unknown")
        raise DeviceFault(state, address,
                          f"device 0x{device.handle:08x} is in state {state} ({name})"
                          + (f" (page fault at 0x{address:x})" if address else ""))


def hwqueue(context: Any, flags: int = 0) -> Op[Any]:
    """``context.hwqueue()``: CreateHwQueue."""
    args = s.d3dkmt_createhwqueue()
    args.context.v = context.handle
    args.flags.value = int(flags)
    check_status((yield call(t.D3DKMTCreateHwQueue, args)), "CreateHwQueue")
    queue = _pick(context, HwQueue, AsyncHwQueue)(
        context, int(args.queue.v), int(args.queue_progress_fence.v),
        int(args.queue_progress_fence_cpu_va))
    return context._track_queue(queue)


def set_priority(context: Any, priority: int, in_process: bool = False) -> Op[None]:
    args = (s.d3dkmt_setcontextinprocessschedulingpriority() if in_process
            else s.d3dkmt_setcontextschedulingpriority())
    args.context.v = context.handle
    args.priority = int(priority)
    thunk = (t.D3DKMTSetContextInProcessSchedulingPriority if in_process
             else t.D3DKMTSetContextSchedulingPriority)
    check_status((yield call(thunk, args)), "SetContextSchedulingPriority")


def get_priority(context: Any, in_process: bool = False) -> Op[int]:
    args = (s.d3dkmt_getcontextinprocessschedulingpriority() if in_process
            else s.d3dkmt_getcontextschedulingpriority())
    args.context.v = context.handle
    thunk = (t.D3DKMTGetContextInProcessSchedulingPriority if in_process
             else t.D3DKMTGetContextSchedulingPriority)
    check_status((yield call(thunk, args)), "GetContextSchedulingPriority")
    return int(args.priority)


def mark_error(device: Any, reason: int = 0) -> Op[None]:
    args = s.d3dkmt_markdeviceaserror()
    args.device.v = device.handle
    args.reason = int(reason)
    check_status((yield call(t.D3DKMTMarkDeviceAsError, args)), "MarkDeviceAsError")


def check_device(device: Any) -> Op[None]:
    """Raise :class:`DeviceFault` if the device is not active."""
    yield from _check_device(device)


class HwQueue(_Sync, _HwQueueOps):
    """A hardware queue (sync flavor)."""


class AsyncHwQueue(_Async, _HwQueueOps):
    """A hardware queue (asyncio flavor)."""
