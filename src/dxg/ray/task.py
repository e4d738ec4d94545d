"""Inside a Ray worker: turn what Ray gave a task into what pydxg enforces.

Ray only admits work: it tells the worker which ``pydxg_vgpu`` instances (adapters) the task
holds and how much of each. Before the task's code runs, :func:`task_environment` makes every
pydxg connection the task opens see only those adapters (``DXG_VISIBLE_ADAPTERS``) and be held
by the guest to the task's share of memory and compute (``DXG_PROCESS_LIMITS``, a restriction
the guest applies to the connection before it can touch an adapter: docs/policy.md). A task's
environment is put back when it ends, as Ray reuses worker processes; an actor keeps its own
for its whole life (its process is its own).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

from dxg.ray.resources import ADAPTERS_ENV, TaskShare, assigned_amount, decode_adapters, task_share

__all__ = ["LIMITS_ENV", "LOST_WAIT", "VISIBLE_ENV", "AdapterLost", "current_share",
           "task_environment", "wait_out_lost_adapter"]

VISIBLE_ENV = "DXG_VISIBLE_ADAPTERS"
LIMITS_ENV = "DXG_PROCESS_LIMITS"
# How long a task whose adapter went waits for it to come back before it gives up: long enough
# for the node's agent to see the loss (a poll or two) and start draining the node, so that
# Ray's retry goes to another node; short, as the drain waits for this task.
LOST_WAIT = 5.0


class AdapterLost(RuntimeError):
    """The adapter a task was given went away under it (its host was lost). ``dxg.ray.remote``
    has Ray retry this exception; by then the node's agent has usually restarted the Ray node
    without the adapter, so the retry runs elsewhere."""


def _resource_ids() -> Mapping[str, Any]:
    """The unit-instance resources Ray assigned to the running task or actor: {name:
    [(instance, fraction), ...]}. Ray's public ``get_accelerator_ids()`` lists only the
    accelerators Ray itself knows, so this reads the core worker's assignment (pinned Ray
    version; tests/test_ray.py checks it)."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("dxg.ray: not inside a Ray task or actor")
    worker = ray._private.worker.global_worker
    return dict(worker.core_worker.resource_ids())


def current_share() -> TaskShare:
    """The adapters and quota of the running task or actor (ValueError if it holds no
    ``pydxg_vgpu`` or its node was not started by ``dxg ray start``)."""
    text = os.environ.get(ADAPTERS_ENV)
    if text is None:
        raise ValueError(f"{ADAPTERS_ENV} is not set: this Ray node was not started with "
                         "`dxg ray start`, so it has no pydxg adapters")
    return task_share(assigned_amount(_resource_ids()), decode_adapters(text))


@contextlib.contextmanager
def task_environment(*, permanent: bool = False) -> Iterator[TaskShare]:
    """Hold the process to the running task's share while the block runs (``permanent``: and
    after, for an actor)."""
    share = current_share()
    values = {VISIBLE_ENV: share.visible_env(), LIMITS_ENV: share.limits_env()}
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield share
    finally:
        if not permanent:
            for name, old in saved.items():
                if old is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = old


def _node_luids() -> tuple[int, ...] | None:
    """The LUIDs the node's guest enumerates now (None: the guest does not answer)."""
    from dxg.ray.agent import read_luids

    node = os.environ.get("DXG_NODE")
    if not node:
        return None
    try:
        return read_luids(node)  # type: ignore[arg-type]
    except Exception:
        return None


def wait_out_lost_adapter(share: TaskShare, error: BaseException) -> None:
    """After a task failed with ``error``: if one of its adapters is gone from the node, wait
    up to LOST_WAIT for it to come back (a host that blinked), then raise
    :class:`AdapterLost`, which Ray retries; by then the node's agent is draining the node to
    restart Ray without the adapter, so the retry goes elsewhere. Returns at once when its
    adapters are all there: the failure was the task's own."""
    import time

    luids = _node_luids()
    if luids is None or all(luid in luids for luid in share.luids):
        return  # all there, or the guest cannot say: the failure stays the task's own
    deadline = time.monotonic() + LOST_WAIT
    while time.monotonic() < deadline:
        time.sleep(0.2)
        luids = _node_luids()
        if luids is not None and all(luid in luids for luid in share.luids):
            break  # back: the work may be retried here
    raise AdapterLost(", ".join(f"0x{luid:016x}" for luid in share.luids)
                      + f" went away under this task ({type(error).__name__}: {error})") from error
