"""The pydxg client library: what libdxg is to ``/dev/dxg``, over the node's socket.

* :func:`open_node` and the objects of :mod:`dxg.client.api` (Node, Adapter, Device, Context),
  and their asyncio twins (:func:`open_node_async`, AsyncNode, AsyncAdapter, ...);
* :mod:`dxg.client.thunks`: ``D3DKMTxxx(conn, args) -> NTSTATUS``, one per ioctl (awaitable on
  an async connection);
* :mod:`dxg.client.diag`: pydxg's diagnostic escapes (ping, sleep, shared memory, eventfd);
* :class:`NodeConnection` / :class:`AsyncNodeConnection`: the raw ``ioctl(code, struct, fds)``.
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
    FeatureState,
    Node,
    open_node,
    open_node_async,
)
from dxg.client.connection import NodeConnection
from dxg.client.errors import (
    DxgError,
    NodeError,
    NodeNotFound,
    NodePermissionDenied,
    NodeProtocolError,
    NodeUnavailable,
)

__all__ = [
    "Adapter",
    "AdapterType",
    "AsyncAdapter",
    "AsyncContext",
    "AsyncDevice",
    "AsyncNode",
    "AsyncNodeConnection",
    "ClockCalibration",
    "Context",
    "Device",
    "DeviceIds",
    "DxgError",
    "FeatureState",
    "Node",
    "NodeConnection",
    "NodeError",
    "NodeNotFound",
    "NodePermissionDenied",
    "NodeProtocolError",
    "NodeUnavailable",
    "open_node",
    "open_node_async",
]
