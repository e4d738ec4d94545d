"""The host's dispatcher: one guest packet in, one reply out, through the command table.

Rules every request follows:
- Bytes from the guest are hostile. A message that does not decode, a command on a channel it may
  not travel on, a body that does not parse, descriptors or a bulk attachment on a command that
  carries none: a 4-byte STATUS_INVALID_PARAMETER (in the command's failure layout where there is
  one). An unknown code, or one pydxg does not speak: 4-byte STATUS_NOT_IMPLEMENTED.
  Fire-and-forget packets that fail are dropped with a log line. No exception leaves here.
- Failures otherwise use the command's own reply layout (CommandSpec.failure), so the guest
  always reads a reply of the size it expects.
- Commands for a removed adapter answer STATUS_DEVICE_REMOVED, except the teardown commands,
  which still release the host objects.

The dispatcher runs where the connection routed the packet. It decodes, checks and routes; a
handler that only touches in-memory state runs to completion here (microseconds), while one that
can take long (a coroutine: backend work) becomes a task of the partition and answers when done,
so it never delays another command, process or adapter.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from dxg.host import adapter as adapter_mod
from dxg.host import allocation as allocation_mod
from dxg.host import context as context_mod
from dxg.host import device as device_mod
from dxg.host import escape as escape_mod
from dxg.host import hwqueue as hwqueue_mod
from dxg.host import pagingqueue as pagingqueue_mod
from dxg.host import process as process_mod
from dxg.host import residency as residency_mod
from dxg.host import share as share_mod
from dxg.host import statistics as statistics_mod
from dxg.host import syncobject as syncobject_mod
from dxg.host import vaspace as vaspace_mod
from dxg.host.call import Call, CommandFailed, Handler
from dxg.oslib.fds import close_all
from dxg.protocol.commands import GlobalCommand, VgpuCommand
from dxg.protocol.errors import ProtocolError
from dxg.protocol.framing import DXG_MAX_VM_BUS_PACKET_SIZE, FLAG_HAS_BULK
from dxg.protocol.headers import decode_guest
from dxg.protocol.table import COMMANDS, Route, fail_status
from dxg.uapi.handles import HandleType
from dxg.uapi.ntstatus import NTSTATUS
from dxg.vmbus.channel import Channel, Packet

if TYPE_CHECKING:
    from dxg.host.adapter import HostAdapter
    from dxg.host.partition import Partition
    from dxg.host.process import HostProcess

log = logging.getLogger(__name__)

# Teardown commands still run on a removed adapter, so a guest can always release what it holds.
_TEARDOWN = frozenset({VgpuCommand.DESTROYDEVICE, VgpuCommand.DESTROYCONTEXT,
                       VgpuCommand.CLOSEADAPTER, VgpuCommand.DESTROYALLOCATION,
                       VgpuCommand.DESTROYPAGINGQUEUE,
                       VgpuCommand.PYDXG_CLOSEPROCESSADAPTER, VgpuCommand.DESTROYHWQUEUE})


def _merge(*tables: Mapping[Any, Handler]) -> MappingProxyType[Any, Handler]:
    merged: dict[Any, Handler] = {}
    for table in tables:
        for command, handler in table.items():
            if command in merged:
                raise RuntimeError(f"two handlers for {command!r}")
            if command not in COMMANDS:
                raise RuntimeError(f"a handler for {command!r}, which the table does not list")
            merged[command] = handler
    return MappingProxyType(merged)


# Every command the host serves, from the module of the object kind it acts on; the partition
# module adds the VM-level ones (SETIOSPACEREGION, the census).
OBJECT_HANDLERS = _merge(adapter_mod.HANDLERS, process_mod.HANDLERS, device_mod.HANDLERS,
                         context_mod.HANDLERS, escape_mod.HANDLERS, allocation_mod.HANDLERS,
                         residency_mod.HANDLERS, vaspace_mod.HANDLERS, pagingqueue_mod.HANDLERS,
                         hwqueue_mod.HANDLERS, syncobject_mod.HANDLERS,
                         statistics_mod.HANDLERS, share_mod.HANDLERS)


def _discard(result: Any) -> None:
    """A handler's awaitable that will not run: a coroutine is closed (no "never awaited")."""
    if inspect.iscoroutine(result):
        result.close()


def _settle(p: Partition, process: HostProcess | None, size: int, _task: object) -> None:
    p.pending_calls -= 1
    p.pending_bytes -= size
    if process is not None:
        process.pending -= 1


class Dispatcher:
    """One per partition: routes its channels' packets to the handlers."""

    def __init__(self, partition: Partition, handlers: Mapping[Any, Handler]) -> None:
        self.partition = partition
        self.handlers = handlers
        self.requests = 0
        self.failures = 0

    def on_packet(self, bound: HostAdapter | None, channel: Channel, packet: Packet) -> None:
        """Channel.on_request: `bound` is the adapter of a vGPU channel, None on the global."""
        p = self.partition
        self.requests += 1
        wants = packet.wants_completion
        try:
            msg = decode_guest(packet.payload)
        except ProtocolError as e:
            p.logs.log(logging.WARNING, "bad message", "partition %d: bad message (%s)", p.id, e)
            packet.close_fds()
            self._reply(channel, packet, fail_status(NTSTATUS.STATUS_INVALID_PARAMETER, b""))
            return
        spec = COMMANDS.get(msg.command)  # type: ignore[call-overload]
        handler = self.handlers.get(msg.command)
        if spec is None or handler is None:
            packet.close_fds()
            if wants:
                self._reply(channel, packet, fail_status(NTSTATUS.STATUS_NOT_IMPLEMENTED, b""))
            else:
                p.logs.log(logging.INFO, "unimplemented",
                           "partition %d: fire-and-forget %s not implemented; dropped", p.id,
                           msg.command.name)
            return
        adapter: HostAdapter | None = None
        status = NTSTATUS.STATUS_SUCCESS
        is_global = isinstance(msg.command, GlobalCommand)
        if is_global != (spec.route == Route.GLOBAL):
            status = NTSTATUS.STATUS_INVALID_PARAMETER
        elif spec.route == Route.GLOBAL:
            if bound is not None:
                status = NTSTATUS.STATUS_INVALID_PARAMETER  # global commands: global channel
        elif bound is not None:
            adapter = bound
            if msg.vgpu_luid not in (0, bound.host_vgpu_luid):
                status = NTSTATUS.STATUS_INVALID_PARAMETER
        elif spec.route == Route.VGPU_ONLY:
            status = NTSTATUS.STATUS_INVALID_PARAMETER
        else:
            adapter = p.adapter_by_vgpu_luid(msg.vgpu_luid)
            if adapter is None:
                status = NTSTATUS.STATUS_INVALID_PARAMETER
        if status == NTSTATUS.STATUS_SUCCESS:
            if packet.fds and not spec.fds:
                status = NTSTATUS.STATUS_INVALID_PARAMETER
            elif packet.flags & FLAG_HAS_BULK and not spec.large:
                status = NTSTATUS.STATUS_INVALID_PARAMETER
            elif adapter is not None and adapter.removed and msg.command not in _TEARDOWN:
                status = NTSTATUS.STATUS_DEVICE_REMOVED
        call = Call(spec, msg, adapter, packet.trans_id, wants, channel.can_pass_fds,
                    packet.take_fds())
        if status != NTSTATUS.STATUS_SUCCESS:
            self._fail(channel, call, status)
            return
        try:
            body = spec.parse_request(msg.body)
            result = handler(p, call, body)
        except ProtocolError as e:
            p.logs.log(logging.WARNING, "bad body", "partition %d: %s: %s", p.id, spec.name, e)
            self._fail(channel, call, NTSTATUS.STATUS_INVALID_PARAMETER)
            return
        except CommandFailed as e:
            log.debug("partition %d: %s failed: %s", p.id, spec.name, e)
            self._fail(channel, call, e.status)
            return
        except Exception:
            log.exception("partition %d: %s handler failed", p.id, spec.name)
            self._fail(channel, call, NTSTATUS.STATUS_INTERNAL_ERROR)
            return
        if inspect.isawaitable(result):
            size = len(packet.payload)
            process = (p.handles.get(call.process_handle, HandleType.PROCESS)
                       if call.process_handle else None)
            if (p.pending_calls >= p.config.max_pending_calls
                    or p.pending_bytes + size > p.config.max_pending_bytes
                    or (process is not None
                        and process.pending >= p.config.max_pending_calls_per_process)):
                _discard(result)
                p.logs.log(logging.WARNING, "pending", "partition %d: %d requests (%d bytes) "
                           "waiting already; %s refused", p.id, p.pending_calls,
                           p.pending_bytes, spec.name)
                self._fail(channel, call, NTSTATUS.STATUS_NO_MEMORY)
                return
            try:
                task = p.tasks.spawn(self._finish(channel, call, result),
                                     f"partition {p.id} {spec.name}")
            except RuntimeError:  # the partition is closing
                _discard(result)
                self._fail(channel, call, NTSTATUS.STATUS_DEVICE_REMOVED)
                return
            # It counts against the partition's pending limits until it is done, however.
            p.pending_calls += 1
            p.pending_bytes += size
            if process is not None:
                process.pending += 1
            task.add_done_callback(functools.partial(_settle, p, process, size))
            return
        self._send(channel, call, result)

    async def _finish(self, channel: Channel, call: Call, pending: Any) -> None:
        try:
            result = await pending
        except CommandFailed as e:
            self._fail(channel, call, e.status)
            return
        except asyncio.CancelledError:
            call.close_fds()
            raise
        except Exception:
            log.exception("partition %d: %s handler failed", self.partition.id, call.spec.name)
            self._fail(channel, call, NTSTATUS.STATUS_INTERNAL_ERROR)
            return
        self._send(channel, call, result)

    def _send(self, channel: Channel, call: Call, result: Any) -> None:
        if result is None:
            reply = b""
        elif isinstance(result, bytes | bytearray):
            reply = bytes(result)
        else:
            reply = result.pack()
        if len(reply) > DXG_MAX_VM_BUS_PACKET_SIZE and not call.spec.large:
            log.error("partition %d: %s reply of %d bytes over the packet cap",
                      self.partition.id, call.spec.name, len(reply))
            call.close_fds()
            reply = call.spec.failure(NTSTATUS.STATUS_BUFFER_OVERFLOW, call.message.body)
        if call.reply_fds and not call.can_pass_fds:
            call.close_fds()
            reply = call.spec.failure(NTSTATUS.STATUS_NOT_SUPPORTED, call.message.body)
        try:
            if call.wants_completion:
                channel.complete(call.trans_id, reply, call.reply_fds)
        finally:
            call.close_fds()

    def _fail(self, channel: Channel, call: Call, status: int) -> None:
        self.failures += 1
        call.close_fds()
        if call.wants_completion:
            channel.complete(call.trans_id, call.spec.failure(status, call.message.body))
        else:
            self.partition.logs.log(logging.INFO, "async failed",
                                    "partition %d: fire-and-forget %s failed: 0x%08x",
                                    self.partition.id, call.spec.name, status & 0xFFFFFFFF)

    @staticmethod
    def _reply(channel: Channel, packet: Packet, reply: bytes) -> None:
        if packet.wants_completion:
            channel.complete(packet.trans_id, reply)


__all__ = ["OBJECT_HANDLERS", "Dispatcher", "close_all"]
