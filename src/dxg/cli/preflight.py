"""Checks a daemon runs on its arguments before it starts anything, so that a mistake ends in
one line saying what to do instead of a half-started daemon: the adapter count, bus addresses
(a scheme pydxg does not know), a node path another daemon already serves; and the warning for
a bus listener other machines can reach."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import stat
from pathlib import Path

__all__ = ["MAX_ADAPTERS", "adapter_count", "bus_address", "check_node_free",
           "public_listener_warning"]

MAX_ADAPTERS = 64  # what one host offers (HostConfig) and one guest takes from a host


def adapter_count(text: str) -> int:
    """``--adapters N``: one rule for every daemon, 1 to 64."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 1 <= n <= MAX_ADAPTERS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an adapter count: a host offers 1 to {MAX_ADAPTERS} adapters")
    return n


def bus_address(text: str) -> str:
    """``--listen``/``--connect``/``--host-listen ADDR``: checked here so that an unknown scheme
    or a bad port stops the command before anything starts."""
    from dxg.vmbus.transport import TransportError, parse_address

    try:
        parse_address(text)
    except TransportError as e:
        raise argparse.ArgumentTypeError(e.strerror or str(e)) from None
    return text


def public_listener_warning(bound: str) -> str | None:
    """The warning for a bus listener on an address other machines can reach (``bound`` as
    ``Host.listen`` returns it), else None."""
    if not bound.startswith("tcp:"):
        return None
    host = bound[4:].rpartition(":")[0].strip("[]")
    try:
        local = ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = host == "localhost"
    if local:
        return None
    return (f"warning: the bus on {bound} has no authentication or encryption: whoever reaches "
            "it can connect as a guest and run work on these adapters; listen on 127.0.0.1 or "
            "a Unix socket, or reach it through a tunnel (docs/running.md, threat model)")


def check_node_free(path: Path) -> None:
    """Fail, saying what to do, when ``path`` is already served by a node (or is something
    else that is not a socket): another daemon owns it. A stale socket (nobody listening) is
    fine: the node replaces it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise RuntimeError(f"cannot look at the node path {path}: {e.strerror}") from None
    pick = "pick another --node or DXG_NODE"
    if stat.S_ISDIR(st.st_mode):
        raise RuntimeError(f"the node path {path} is a directory: {pick} (a socket path, "
                           f"e.g. {path / 'dxg.sock'})")
    if not stat.S_ISSOCK(st.st_mode):
        raise RuntimeError(f"the node path {path} exists and is not a socket: {pick}")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return  # stale: nobody listens there
    except OSError:
        return  # (too long a path, no access...): the node's own start says what is wrong
    finally:
        probe.close()
    raise RuntimeError(f"a dxg node is already served at {path}: {pick} (or stop the daemon "
                       "serving it)")
