"""Where the node (the socket twin of ``/dev/dxg``) lives by default."""

import os
from pathlib import Path

NODE_ENV = "DXG_NODE"
SOCKET_NAME = "dxg.sock"


def default_node_path() -> Path:
    """The node path a client connects to and ``dxg up`` serves, in this order:

    1. ``$DXG_NODE`` when set and non-empty;
    2. ``/run/pydxg/dxg.sock`` when running as root;
    3. ``$XDG_RUNTIME_DIR/pydxg/dxg.sock`` when ``XDG_RUNTIME_DIR`` is set;
    4. ``/tmp/pydxg-<uid>/dxg.sock``.
    """
    explicit = os.environ.get(NODE_ENV)
    if explicit:
        return Path(explicit)
    uid = os.geteuid()
    if uid == 0:
        return Path("/run/pydxg") / SOCKET_NAME
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "pydxg" / SOCKET_NAME
    return Path(f"/tmp/pydxg-{uid}") / SOCKET_NAME
