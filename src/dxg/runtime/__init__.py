"""The runtime every layer runs on: an event loop per owner (`LoopThread`), the tasks an owner
started (`TaskSet`, cancelled when the owner goes), and lanes that keep one key's jobs in order
(`Lanes`). No loop, task or lane lives at module level."""

from dxg.runtime.loop import LoopThread, on_loop, owned_loop
from dxg.runtime.tasks import Lanes, TaskSet

__all__ = ["Lanes", "LoopThread", "TaskSet", "on_loop", "owned_loop"]
