"""Exceptions of the client library. Every failure carries an NTSTATUS in ``.status``."""

from __future__ import annotations

import os

from dxg.uapi.ntstatus import NTSTATUS, errno_to_ntstatus, nt_success, status_name

__all__ = [
    "DxgError",
    "NoSuchAdapter",
    "NodeError",
    "NodeForked",
    "NodeNotFound",
    "NodePermissionDenied",
    "NodeProtocolError",
    "NodeUnavailable",
    "check_status",
]


class DxgError(Exception):
    """A D3DKMT call failed. ``status`` is the NTSTATUS (unsigned 32-bit); ``str()`` names it."""

    def __init__(self, status: int, message: str = "") -> None:
        self.status = int(status) & 0xFFFFFFFF
        self.message = message
        text = status_name(self.status)
        super().__init__(f"{message}: {text}" if message else text)


class NodeError(DxgError):
    """The node itself (the socket) could not be used."""

    default_status = NTSTATUS.STATUS_DEVICE_NOT_READY

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(self.default_status if status is None else status, message)

    def __str__(self) -> str:
        return self.message


class NodeNotFound(NodeError):
    """Nothing at the node path: no node is running there."""

    default_status = NTSTATUS.STATUS_NO_SUCH_DEVICE


class NodePermissionDenied(NodeError):
    """The node exists but this user may not connect to it."""

    default_status = NTSTATUS.STATUS_ACCESS_DENIED


class NodeUnavailable(NodeError):
    """The node exists but does not answer (stale socket, node shutting down, connection lost)."""

    default_status = NTSTATUS.STATUS_DEVICE_NOT_READY


class NodeForked(NodeUnavailable):
    """A forked child used its parent's connection or objects: each process opens its own."""

    def __init__(self, parent_pid: int) -> None:
        super().__init__(
            f"process {os.getpid()} is using dxg objects of process {parent_pid} (forked from "
            "it): open the node again in the child (dxg.client.open_node(), or "
            "connection.reopen()) and make its own objects there")
        self.parent_pid = parent_pid


class NoSuchAdapter(DxgError, ValueError):
    """No adapter this process can see has that LUID or index (``.status`` is what the driver
    answered for an unknown LUID: STATUS_INVALID_PARAMETER)."""

    def __init__(self, message: str, status: int = NTSTATUS.STATUS_INVALID_PARAMETER) -> None:
        super().__init__(status, message)


class NodeProtocolError(NodeError):
    """The node answered with an ERROR frame, or something the wire does not allow."""

    def __init__(self, err: int, message: str) -> None:
        self.errno = err
        name = os.strerror(err) if err > 0 else "protocol error"
        super().__init__(f"{message} ({name})", errno_to_ntstatus(err) if err > 0 else None)


def check_status(status: int, what: str) -> int:
    """``status`` if it is a success (0 or a positive NTSTATUS success code), else DxgError."""
    if not nt_success(status):
        raise DxgError(status, what)
    return status
