"""What is at a node path that did not answer as a node, told so a person can act on it.

"Not accepting connections" leaves a person guessing; what they need is what they pointed
``DXG_NODE`` (or ``--node``) at: a directory, a regular file, a socket nobody serves any more,
or a pydxg host's bus socket (which a guest connects to, not a client). Only used once a
connection has failed, so the probes here may cost a connect or two.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from dxg.protocol.bus import BUS_VERSIONS_SUPPORTED, Hello, encode_bus_message
from dxg.protocol.framing import CONTROL_RELID, MAGIC, VM_PKT_DATA_INBAND, encode_frame

__all__ = ["describe_node_path", "origin_name", "where_to_point"]

_BUS_MAGIC = MAGIC.to_bytes(4, "little")  # b"DXGB": every bus frame starts with it
_PROBE_TIMEOUT = 1.0


def origin_name(path: Path, origin: str) -> str:
    """How the path is named in a message: ``DXG_NODE=/x`` when it came from the variable."""
    return f"DXG_NODE={path}" if origin == "DXG_NODE" else str(path)


def where_to_point(origin: str) -> str:
    """The setting the person changes: the variable or the option they used."""
    if origin == "DXG_NODE":
        return "point DXG_NODE at"
    if origin == "default":
        return "set DXG_NODE (or --node) to"
    return "point --node at"


def describe_node_path(path: Path, origin: str = "") -> str | None:
    """One line saying what is at ``path`` and what to do, when it is clearly not a node (a
    directory, a file that is not a socket, a socket with no server, a host's bus socket);
    None when nothing more can be said."""
    name = origin_name(path, origin)
    fix = where_to_point(origin)
    try:
        st = os.stat(path)
    except OSError:
        return None
    if stat.S_ISDIR(st.st_mode):
        inside = path / "dxg.sock"
        hint = f" (is it {inside}?)" if _is_socket(inside) else ""
        return (f"{name} is a directory, not a dxg node: {fix} the node socket that `dxg up` "
                f"printed{hint}")
    if not stat.S_ISSOCK(st.st_mode):
        kind = "a regular file" if stat.S_ISREG(st.st_mode) else "not a socket"
        return (f"{name} is {kind}, not a dxg node: {fix} the node socket that `dxg up` "
                "printed")
    answer = _probe_bus(path)
    if answer == "refused":
        return (f"{name} is a stale socket: no daemon serves it (start one with "
                f"`dxg up --node {path}`, or {fix} a running node)")
    if answer == "bus":
        return (f"{name} is a pydxg host's bus socket, not a node: start a guest on it "
                f"(`dxg guest --connect {path}`) and {fix} the node the guest prints")
    return None


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def _probe_bus(path: Path) -> str | None:
    """"refused" (nobody listens), "bus" (a host answered a bus HELLO), or None."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(_PROBE_TIMEOUT)
    try:
        try:
            sock.connect(os.fspath(path))
        except ConnectionRefusedError:
            return "refused"
        except OSError:
            return None
        hello = Hello(BUS_VERSIONS_SUPPORTED, "dxg-client-probe")
        sock.sendall(encode_frame(CONTROL_RELID, VM_PKT_DATA_INBAND, encode_bus_message(hello)))
        head = b""
        while len(head) < len(_BUS_MAGIC):
            chunk = sock.recv(len(_BUS_MAGIC) - len(head))
            if not chunk:
                break
            head += chunk
        return "bus" if head == _BUS_MAGIC else None
    except OSError:
        return None
    finally:
        sock.close()
