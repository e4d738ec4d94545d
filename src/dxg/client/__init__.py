"""The pydxg client library: what libdxg is to ``/dev/dxg``, over the node's socket.

* :func:`open_node` and the objects of :mod:`dxg.client.api` (Node, Adapter, Device, Context);
* :mod:`dxg.client.thunks`: ``D3DKMTxxx(conn, args) -> NTSTATUS``, one per ioctl;
* :class:`NodeConnection`: the raw ``ioctl(code, struct)`` on the node.
"""

from dxg.client.api import (
    Adapter,
    AdapterType,
    ClockCalibration,
    Context,
    Device,
    DeviceIds,
    FeatureState,
    Node,
    open_node,
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
]
