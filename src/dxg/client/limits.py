"""A process limits itself: ``conn.restrict(adapters=, memory=, compute=)`` and
``DXG_PROCESS_LIMITS``, for whoever starts a task that must stay within a slice of what its user
is granted (a Ray task on a fraction of an adapter, a job step).

The node lowers the connection's grant from the guest's policy (docs/policy.md, "A process can
limit itself"): ``adapters`` keeps only those LUIDs of the grant, ``memory`` is the most bytes
the process may commit per adapter (both segment groups), ``compute`` multiplies its compute
share (``max(1, round(share * f))``). It only ever lowers, calls compose, and only before the
connection opened an adapter. Socket node only (the FUSE device file has no such request).

``DXG_PROCESS_LIMITS`` is read each time a connection is opened (NodeConnection,
AsyncNodeConnection: so every open_node, dxg.compute device and `dxg` command of the process) and
sent as its first request after HELLO; a node that refuses it fails the open. Its value:
comma-separated ``key=value`` pairs, each key at most once::

    DXG_PROCESS_LIMITS=memory=256M,compute=0.25,adapters=0x0000000100000000+0x0000000100000001

``memory``: a size (bytes, or K/M/G/T, powers of 1024); ``compute``: a fraction 0 < f <= 1;
``adapters``: LUIDs as ``dxg ls`` prints them, joined by ``+`` (``none``: no adapter). Empty
or unset: no limits. It guards against a task overrunning its share by accident, not against
code that clears the variable and connects again: bound the user with the policy too."""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from dxg.client.errors import NodeProtocolError
from dxg.client.luids import parse_luid
from dxg.oslib.fds import close_all
from dxg.runtime.sizes import parse_size
from dxg.uapi import wire

__all__ = ["LIMITS_ENV", "LimitsRefused", "as_refused", "check_restrict_reply",
           "limits_from_env", "parse_limits", "restrict_request"]

LIMITS_ENV = "DXG_PROCESS_LIMITS"
MAX_LUIDS = 64  # (as the node takes)
_MEMORY_MAX = 1 << 62
_EXAMPLE = "memory=256M,compute=0.25,adapters=0x0000000100000000+0x0000000100000001"
_ENV_HELP = (f"write e.g. {_EXAMPLE}: memory in bytes or K/M/G/T, compute 0 < f <= 1, "
             "adapters LUIDs as `dxg ls` prints them joined by +")


class LimitsRefused(NodeProtocolError):
    """The node refused to restrict this connection: ``.errno`` says why (EBUSY: an adapter
    was opened already; EINVAL: a malformed request; EOPNOTSUPP: a node that cannot)."""


def restrict_request(adapters: Iterable[Any] | None = None, memory: int | str | None = None,
                     compute: float | None = None) -> dict[str, Any]:
    """The ADMIN request for :meth:`NodeConnection.restrict`; ValueError/TypeError for values
    the node would refuse (adapters: LUIDs as ints or ``0x…`` strings; memory: bytes or a
    size like "256M"; compute: 0 < f <= 1)."""
    request: dict[str, Any] = {"op": "restrict"}
    if adapters is not None:
        if isinstance(adapters, str | bytes):
            raise TypeError("adapters is a list of LUIDs, not one string")
        luids = sorted({parse_luid(a) for a in adapters})
        if len(luids) > MAX_LUIDS:
            raise ValueError(f"adapters: {len(luids)} LUIDs; at most {MAX_LUIDS}")
        request["adapters"] = luids
    if memory is not None:
        size = parse_size(memory)
        if size > _MEMORY_MAX:
            raise ValueError(f"memory: {memory!r} is more than 4 EiB")
        request["memory"] = size
    if compute is not None:
        if isinstance(compute, bool) or not isinstance(compute, int | float):
            raise TypeError(f"compute is a fraction 0 < f <= 1, not {type(compute).__name__}")
        if not (math.isfinite(compute) and 0 < compute <= 1):
            raise ValueError(f"compute: {compute!r} is not a fraction 0 < f <= 1")
        request["compute"] = float(compute)
    return request


def check_restrict_reply(msg: Any, fds: Sequence[int] = ()) -> dict[str, Any]:
    """The new grant in the node's answer ``msg`` to a restrict (its descriptors, none
    expected, are closed); LimitsRefused when it answered something else (a node whose driver
    does not know "restrict" answers {"error": ...})."""
    close_all(fds)
    if not isinstance(msg, wire.AdminReply):
        raise LimitsRefused(errno.EPROTO, "the dxg node answered a restrict wrongly")
    reply = msg.reply
    if "error" in reply or "compute_share" not in reply:
        text = reply.get("error", "no grant in the reply")
        raise LimitsRefused(errno.EOPNOTSUPP, f"the dxg node cannot restrict processes: {text}")
    return dict(reply)


def as_refused(e: NodeProtocolError) -> LimitsRefused:
    """The node's ERROR answer to a restrict, as LimitsRefused (same errno, same text)."""
    text = e.message
    if e.errno > 0:
        text = text.removesuffix(f" ({os.strerror(e.errno)})")
    return LimitsRefused(e.errno, text)


def parse_limits(text: str) -> dict[str, Any] | None:
    """``DXG_PROCESS_LIMITS``'s value as a restrict request; None: no limits. ValueError (one
    line naming the variable and what to write) for anything else."""
    value = text.strip()
    if not value:
        return None
    seen: dict[str, str] = {}
    for raw in value.split(","):
        key, eq, item = raw.partition("=")
        key, item = key.strip().lower(), item.strip()
        if not eq or key not in ("memory", "compute", "adapters") or not item:
            raise _bad(text, f"{raw.strip()!r} is not key=value with key memory, compute or "
                             "adapters")
        if key in seen:
            raise _bad(text, f"{key} is given twice")
        seen[key] = item
    kw: dict[str, Any] = {}
    if "memory" in seen:
        try:
            kw["memory"] = parse_size(seen["memory"])
        except ValueError:
            raise _bad(text, f"memory={seen['memory']!r} is not a size") from None
    if "compute" in seen:
        try:
            f = float(seen["compute"])
        except ValueError:
            f = math.nan
        if not (math.isfinite(f) and 0 < f <= 1):
            raise _bad(text, f"compute={seen['compute']!r} is not a fraction 0 < f <= 1")
        kw["compute"] = f
    if "adapters" in seen:
        items = seen["adapters"]
        luids = []
        for a in ([] if items.lower() == "none" else items.split("+")):
            try:
                luids.append(parse_luid(a.strip()))
            except ValueError:
                raise _bad(text, f"adapters: {a.strip()!r} is not a LUID") from None
        kw["adapters"] = luids
    try:
        return restrict_request(**kw)
    except (ValueError, TypeError) as e:
        raise _bad(text, str(e)) from None


def limits_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The restrict request ``DXG_PROCESS_LIMITS`` asks for in ``environ`` (default: this
    process's environment); None when unset or empty."""
    env = os.environ if environ is None else environ
    text = env.get(LIMITS_ENV)
    return None if text is None else parse_limits(text)


def _bad(text: str, what: str) -> ValueError:
    return ValueError(f"{LIMITS_ENV}={text!r}: {what} ({_ENV_HELP})")
