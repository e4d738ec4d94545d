"""pydxg adapters as Ray resources (docs/ray.md).

On every Ray node, ``dxg ray start`` runs the node's pydxg guest and its Ray node together and
advertises the guest's adapters as ``pydxg_vgpu`` (plus ``pydxg_memory`` and one
``pydxg_adapter_<luid>`` each). A task or actor asks for a share of one adapter::

    import dxg.compute, dxg.ray

    @dxg.ray.remote(vgpu=0.25)
    def step(x):
        with dxg.compute.device(0) as dev:  # the adapter Ray gave this task, and only it
            return (dev.asarray(x) @ dev.asarray(x)).get()

and runs seeing only that adapter, with a pydxg quota of that fraction of its memory and
compute, enforced by the guest and the host (Ray only admits the work).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from dxg.ray.resources import MEMORY, VGPU, NodeAdapter, TaskShare, adapter_resource, validate_vgpu
from dxg.ray.task import AdapterLost, current_share, task_environment, wait_out_lost_adapter

__all__ = ["MEMORY", "VGPU", "AdapterLost", "NodeAdapter", "TaskShare", "adapter_resource",
           "current_share", "options", "remote", "task_environment"]


def options(vgpu: float = 1.0, **ray_options: Any) -> dict[str, Any]:
    """Ray options asking for ``vgpu`` of a pydxg adapter (merged into ``resources``), for
    ``.options(**dxg.ray.options(0.25))`` on a function already made remote with
    :func:`remote`."""
    opts = dict(ray_options)
    resources = dict(opts.pop("resources", None) or {})
    resources[VGPU] = validate_vgpu(vgpu)
    opts["resources"] = resources
    return opts


def remote(target: Any = None, *, vgpu: float = 1.0, **ray_options: Any) -> Any:
    """``ray.remote`` for work on a pydxg adapter: ``@dxg.ray.remote(vgpu=0.25)`` on a function
    or a class (an actor), with any other ``ray.remote`` option. Inside, ``dxg.compute`` and
    ``dxg.client`` see only the adapter(s) Ray assigned, under a quota of the share asked
    for: a fraction of one adapter (0 < vgpu <= 1) or whole adapters (2, 3, ...).

    A task whose adapter goes away under it (its host lost) raises :class:`AdapterLost`,
    which Ray retries (``retry_exceptions``, unless given) after the node's agent took the
    adapter off the node."""
    opts = options(vgpu, **ray_options)

    def wrap(obj: Any) -> Any:
        import ray

        if inspect.isclass(obj):
            made = _actor_class(obj)
        else:
            made = _task_function(obj)
            opts.setdefault("retry_exceptions", [AdapterLost])
        return ray.remote(**opts)(made)

    return wrap if target is None else wrap(target)


def _task_function(fn: Any) -> Any:
    if inspect.iscoroutinefunction(fn) or inspect.isgeneratorfunction(fn):
        raise TypeError("dxg.ray.remote: async and generator tasks are not supported; use a "
                        "plain function or an actor")

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with task_environment() as share:
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                wait_out_lost_adapter(share, e)
                raise

    return run


def _actor_class(cls: type) -> type:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        with task_environment(permanent=True):
            pass
        cls.__init__(self, *args, **kwargs)

    made = type(cls.__name__, (cls,), {"__init__": __init__, "__doc__": cls.__doc__,
                                        "__module__": cls.__module__})
    made.__qualname__ = cls.__qualname__
    return made
