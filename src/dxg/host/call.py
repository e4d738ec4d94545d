"""One guest request as a host handler sees it, and how a handler says it failed.

Handlers live in the module of the object kind they act on (adapter, process, device, context,
escape); each module exports ``HANDLERS``, a frozen map from command to handler. A handler is
``handler(partition, call, body) -> reply`` where ``body`` is the request body parsed with the
command table's request type and ``reply`` is the reply body (an object with ``pack()``), raw
bytes, or None for an empty completion. A handler that only touches the partition's in-memory
state is a plain function and runs to completion where the dispatcher routed it (microseconds,
never blocking). One that can take long is a coroutine function: the dispatcher runs it as a task
of its process, and it does its blocking part on the host's worker threads
(``Partition.run_blocking``), never on the loop and never holding partition state.

``raise CommandFailed(status)`` answers with the command's failure reply (the table's
``failure``), which always has the size the guest expects.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dxg.oslib.fds import close_all
from dxg.protocol.headers import GuestMessage
from dxg.protocol.table import CommandSpec

if TYPE_CHECKING:
    from dxg.host.adapter import HostAdapter
    from dxg.host.partition import Partition


class CommandFailed(Exception):
    """Raised by a handler: answer with the command's failure reply carrying `status`."""

    def __init__(self, status: int, why: str = "") -> None:
        super().__init__(why or f"status 0x{int(status) & 0xFFFFFFFF:08X}")
        self.status = int(status)


@dataclass(slots=True, eq=False)
class Call:
    spec: CommandSpec
    message: GuestMessage
    adapter: HostAdapter | None  # the addressed adapter (None for VM-level commands)
    trans_id: int
    wants_completion: bool
    can_pass_fds: bool  # whether descriptors can go back on this link
    fds: list[int] = field(default_factory=list)  # came with the request; take what you keep
    reply_fds: list[int] = field(default_factory=list)  # go with the reply, then are closed

    @property
    def process_handle(self) -> int:
        return self.message.process

    def take_fds(self) -> list[int]:
        fds, self.fds = self.fds, []
        return fds

    def close_fds(self) -> None:
        close_all(self.fds)
        close_all(self.reply_fds)
        self.fds = []
        self.reply_fds = []


Handler = Callable[["Partition", Call, Any], Any | Awaitable[Any]]

__all__ = ["Call", "CommandFailed", "Handler"]
