"""The pydxg client library: what libdxg is to ``/dev/dxg``, over the node's socket.

* :func:`open_node` and the objects of :mod:`dxg.client.api` (Node, Adapter, Device, Context),
  and their asyncio twins (:func:`open_node_async`, AsyncNode, AsyncAdapter, ...);
* :mod:`dxg.client.memory`: device memory -- Allocation, DeviceArray (``device.allocate``,
  ``device.empty``, ``device.array``), PagingQueue, GPU virtual addresses, video memory budgets;
* :mod:`dxg.client.sync`: synchronization objects -- Fence (``device.fence``: ``value`` from a
  shared page, ``signal``, ``wait``, ``eventfd_wait``), :func:`wait_all`, :func:`wait_any`;
* :mod:`dxg.client.share`: sharing between processes by descriptor -- Resource
  (``device.shared_resource``, ``device.open_resource``), ``fence.share()``/``device.open_fence``,
  SharedHandle, and sync files (``fence.sync_file(value)``: SyncFile);
* :mod:`dxg.client.thunks`: ``D3DKMTxxx(conn, args) -> NTSTATUS``, one per ioctl (awaitable on
  an async connection);
* :mod:`dxg.client.diag`: pydxg's diagnostic escapes (ping, sleep, shared memory, eventfd);
* :class:`NodeConnection` / :class:`AsyncNodeConnection`: the raw ``ioctl(code, struct, fds)``;
* :mod:`dxg.client.luids` and :mod:`dxg.client.visible`: LUIDs as ints or ``0x…`` strings, and
  ``DXG_VISIBLE_ADAPTERS`` (which adapters this process sees, as ``CUDA_VISIBLE_DEVICES``).
"""

from dxg.client.aio import AsyncNodeConnection
from dxg.client.api import (
    Adapter,
    AdapterType,
    AsyncAdapter,
    AsyncContext,
    AsyncDevice,
    AsyncNode,
    ClockCalibration,
    Context,
    Device,
    DeviceIds,
    ExecutionState,
    FeatureState,
    Node,
    open_node,
    open_node_async,
)
from dxg.client.connection import NodeConnection
from dxg.client.errors import (
    DxgError,
    NodeError,
    NodeForked,
    NodeNotFound,
    NodePermissionDenied,
    NodeProtocolError,
    NodeUnavailable,
    NoSuchAdapter,
)
from dxg.client.luids import parse_luid
from dxg.client.memory import (
    Allocation,
    AsyncAllocation,
    AsyncDeviceArray,
    AsyncGpuMapping,
    AsyncGpuVaRange,
    AsyncPagingQueue,
    DeviceArray,
    GpuMapping,
    GpuVaRange,
    OfferPriority,
    PagingQueue,
    PagingTimeout,
    ReclaimResult,
    Residency,
    VideoMemoryInfo,
)
from dxg.client.share import AsyncResource, Resource, SharedHandle, SyncFile
from dxg.client.sync import AsyncFence, Fence, SyncKind, SyncObject, wait_all, wait_any
from dxg.client.visible import VISIBLE_ENV

__all__ = [
    "VISIBLE_ENV",
    "Adapter",
    "AdapterType",
    "Allocation",
    "AsyncAdapter",
    "AsyncAllocation",
    "AsyncContext",
    "AsyncDevice",
    "AsyncDeviceArray",
    "AsyncFence",
    "AsyncGpuMapping",
    "AsyncGpuVaRange",
    "AsyncNode",
    "AsyncNodeConnection",
    "AsyncPagingQueue",
    "AsyncResource",
    "ClockCalibration",
    "Context",
    "Device",
    "DeviceArray",
    "DeviceIds",
    "DxgError",
    "ExecutionState",
    "FeatureState",
    "Fence",
    "GpuMapping",
    "GpuVaRange",
    "NoSuchAdapter",
    "Node",
    "NodeConnection",
    "NodeError",
    "NodeForked",
    "NodeNotFound",
    "NodePermissionDenied",
    "NodeProtocolError",
    "NodeUnavailable",
    "OfferPriority",
    "PagingQueue",
    "PagingTimeout",
    "ReclaimResult",
    "Residency",
    "Resource",
    "SharedHandle",
    "SyncFile",
    "SyncKind",
    "SyncObject",
    "VideoMemoryInfo",
    "open_node",
    "open_node_async",
    "parse_luid",
    "wait_all",
    "wait_any",
]
