"""Guest -> host requests (the counterpart of the real driver's dxgvmbus.c), through the one
command table: `send` builds the command's envelope for its route (global channel, the adapter's
vGPU channel, or the global channel once async messages are on), sends it, and parses the reply
with the table's reply type. Transport failures become errnos: a rescinded channel or a lost host
is -ENODEV (the adapter is gone). There is no fixed timeout: a legitimately long command waits as
long as the host works on it, and a host that is gone (or stops answering its heartbeat) fails
every call on it at once.

Requests that create host objects name an undo: if the caller gives up (its process died, the
call was interrupted) and the reply still arrives, the object is destroyed again, so nothing the
guest abandoned stays on the host.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from dxg.guest.errors import IoctlError
from dxg.oslib.fds import close_all
from dxg.protocol import messages as m
from dxg.protocol.bus import (
    DXGK_VMBUS_INTERFACE_VERSION,
    DXGK_VMBUS_LAST_COMPATIBLE_INTERFACE_VERSION,
)
from dxg.protocol.commands import GlobalCommand, VgpuCommand
from dxg.protocol.errors import ProtocolError
from dxg.protocol.guids import luid_parts
from dxg.protocol.headers import encode_global, encode_vgpu
from dxg.protocol.table import COMMANDS, CommandSpec, Route
from dxg.uapi.ntstatus import nt_success
from dxg.vmbus.channel import ChannelClosed, Packet

if TYPE_CHECKING:
    from dxg.guest.adapter import GuestAdapter
    from dxg.guest.hostlink import HostLink

log = logging.getLogger(__name__)

Undo = Callable[[Any], None]  # given the late reply of an abandoned request


class HostStatus(Exception):
    """The host answered a failure NTSTATUS where a structured reply was expected."""

    def __init__(self, status: int) -> None:
        super().__init__(f"host status 0x{status:08x}")
        self.status = status


def _parse(spec: CommandSpec, payload: bytes) -> Any:
    try:
        return spec.parse_reply(payload)
    except ProtocolError as e:
        # A 4-byte reply where a bigger one was due is the host's failure status; a success
        # status there is a malformed reply (its outputs are missing).
        if len(payload) == 4 and spec.reply is not m.NtStatusReturn:
            status = m.NtStatusReturn.unpack(payload).status
            if not nt_success(status):
                raise HostStatus(status) from None
        raise IoctlError(errno.EPROTO, f"malformed host reply to {spec.name}: {e}") from None


def _late(link: HostLink, spec: CommandSpec, undo: Undo | None) -> Callable[[Packet], None]:
    def late(packet: Packet) -> None:
        packet.close_fds()
        if undo is None:
            return
        try:
            reply = spec.parse_reply(packet.payload)
        except ProtocolError:
            return  # a failure reply: the host created nothing
        undo(reply)

    return late


async def send(target: HostLink | GuestAdapter, command: GlobalCommand | VgpuCommand,
               process: int, body: Any = None, *, fds: Sequence[int] = (),
               undo: Undo | None = None, want_fds: bool = False) -> Any:
    """Send ``command`` with ``body`` (a message of the table's request type) and return the
    parsed reply (and the descriptors that came with it when ``want_fds``)."""
    from dxg.guest.adapter import GuestAdapter

    spec = COMMANDS[command]
    raw = b"" if body is None else body.pack()
    if spec.route == Route.GLOBAL:
        link = target if not isinstance(target, GuestAdapter) else target.link
        channel = link.global_channel
        payload = encode_global(command, process, raw)  # type: ignore[arg-type]
    else:
        assert isinstance(target, GuestAdapter)
        link = target.link
        channel = target.channel if spec.route == Route.VGPU_ONLY else target.route()
        payload = encode_vgpu(command, process, target.host_vgpu_luid, raw)  # type: ignore[arg-type]
    if channel is None or channel.closed:
        raise IoctlError(errno.ENODEV, "the adapter's channel is gone")
    if fds and not channel.can_pass_fds:
        raise IoctlError(errno.EOPNOTSUPP, "descriptors cannot reach this host (TCP link)")
    late = _late(link, spec, undo)
    try:
        pending = channel.request(payload, fds, late)
        try:
            packet = await pending
        except asyncio.CancelledError:
            # Cancelled just as the reply came: the channel handed it to us, so the undo is
            # ours to run (what the host made for a caller that gave up must not stay).
            if (pending.done() and not pending.cancelled()
                    and pending.exception() is None):
                late(pending.result())
            raise
    except ChannelClosed:
        raise IoctlError(errno.ENODEV, "the host removed the channel") from None
    except ValueError as e:  # a message too long for the connection
        raise IoctlError(errno.E2BIG, str(e)) from None
    got = packet.take_fds()
    try:
        if got and not spec.fds:
            raise IoctlError(errno.EPROTO, f"host sent descriptors with {spec.name}")
        reply = _parse(spec, packet.payload)
    except BaseException:
        close_all(got)
        raise
    if want_fds:
        return reply, got
    close_all(got)
    return reply


def _spawn_undo(link: HostLink, coro: Any) -> None:
    try:
        link.tasks.spawn(coro, f"undo {link.name}")
    except RuntimeError:
        coro.close()


def spawn_quietly(link: HostLink, coro: Any) -> None:
    """Run ``coro`` (an undo or a teardown no caller waits for) as a task of the link; its
    failures are logged, not raised."""
    _spawn_undo(link, _quietly(coro))


async def _quietly(coro: Any) -> None:
    try:
        await coro
    except (IoctlError, HostStatus, asyncio.CancelledError) as e:
        log.debug("undoing an abandoned request: %s", e)


# ---- global ------------------------------------------------------------------------------------


async def create_process(link: HostLink, cookie: int, pid: int, name: str) -> int:
    def undo(reply: m.CreateProcessReturn) -> None:
        if reply.hprocess:
            _spawn_undo(link, _quietly(destroy_process(link, reply.hprocess)))

    reply = await send(link, GlobalCommand.CREATEPROCESS, 0,
                       m.CreateProcess(cookie, pid, name), undo=undo)
    if reply.hprocess == 0:
        raise IoctlError(errno.ENOTRECOVERABLE, "the host refused to create the process")
    return int(reply.hprocess)


async def set_process_quota(link: HostLink, hprocess: int, account: int,
                            per_process: int | None, per_account: int | None,
                            compute_share: int = 1) -> int:
    """PYDXG_SETPROCESSQUOTA: the NTSTATUS (limits None: none)."""
    none = m.NO_LIMIT
    body = m.ProcessQuota(account, none if per_process is None else per_process,
                          none if per_account is None else per_account, compute_share)
    return int((await send(link, GlobalCommand.PYDXG_SETPROCESSQUOTA, hprocess, body)).status)


async def destroy_process(link: HostLink, hprocess: int) -> int:
    return int((await send(link, GlobalCommand.DESTROYPROCESS, hprocess)).status)


async def set_iospace_region(link: HostLink, start: int, length: int) -> int:
    reply = await send(link, GlobalCommand.SETIOSPACEREGION, 0, m.SetIoSpaceRegion(start, length))
    return int(reply.status)


async def query_partition(link: HostLink) -> dict[str, Any]:
    reply = await send(link, GlobalCommand.PYDXG_QUERYPARTITION, 0)
    try:
        census = json.loads(reply.text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise IoctlError(errno.EPROTO, f"malformed census from host: {type(e).__name__}") \
            from None
    if not isinstance(census, dict):
        raise IoctlError(errno.EPROTO, "malformed census from host: not an object")
    return census


# ---- adapter bring-up (always on the adapter's own vGPU channel) ---------------------------------


async def open_adapter(adapter: GuestAdapter) -> m.OpenAdapterReturn:
    low, high = luid_parts(adapter.luid)
    body = m.OpenAdapter(DXGK_VMBUS_INTERFACE_VERSION,
                         DXGK_VMBUS_LAST_COMPATIBLE_INTERFACE_VERSION, low, high)
    return await send(adapter, VgpuCommand.OPENADAPTER, 0, body)  # type: ignore[no-any-return]


async def get_internal_adapter_info(adapter: GuestAdapter) -> m.GetInternalAdapterInfoReturn:
    return await send(adapter, VgpuCommand.GETINTERNALADAPTERINFO, 0)  # type: ignore[no-any-return]


async def close_adapter(adapter: GuestAdapter) -> None:
    await send(adapter, VgpuCommand.CLOSEADAPTER, 0, m.CloseAdapter(adapter.host_handle))


# ---- per process, per adapter ------------------------------------------------------------------


async def query_adapter_info(adapter: GuestAdapter, hprocess: int, qtype: int,
                             data: bytes) -> tuple[int, bytes]:
    out = await send(adapter, VgpuCommand.QUERYADAPTERINFO, hprocess,
                     m.QueryAdapterInfo(qtype, data))
    if nt_success(out.status) and len(out.data) != len(data):
        raise IoctlError(errno.EPROTO, "host answered QUERYADAPTERINFO with the wrong size")
    return out.status, out.data


async def create_device(adapter: GuestAdapter, hprocess: int, flags: int, cookie: int) -> int:
    def undo(reply: m.HandleReturn) -> None:
        if reply.handle:
            _spawn_undo(adapter.link, _quietly(destroy_device(adapter, hprocess, reply.handle)))

    reply = await send(adapter, VgpuCommand.CREATEDEVICE, hprocess,
                       m.CreateDevice(flags, 0, cookie), undo=undo)
    if reply.handle == 0 and not nt_success(reply.status):
        raise HostStatus(reply.status)
    return int(reply.handle)


async def destroy_device(adapter: GuestAdapter, hprocess: int, device: int) -> int:
    reply = await send(adapter, VgpuCommand.DESTROYDEVICE, hprocess, m.DestroyDevice(device))
    return int(reply.status)


async def flush_device(adapter: GuestAdapter, hprocess: int, device: int, reason: int) -> int:
    reply = await send(adapter, VgpuCommand.FLUSHDEVICE, hprocess, m.FlushDevice(device, reason))
    return int(reply.status)


async def create_context_virtual(adapter: GuestAdapter, hprocess: int,
                                 msg: m.CreateContextVirtual) -> m.CreateContextVirtual:
    def undo(reply: m.CreateContextVirtual) -> None:
        if reply.context:
            _spawn_undo(adapter.link,
                        _quietly(destroy_context(adapter, hprocess, reply.context)))

    out = await send(adapter, VgpuCommand.CREATECONTEXTVIRTUAL, hprocess, msg, undo=undo)
    if len(out.priv_drv_data) != len(msg.priv_drv_data):
        raise IoctlError(errno.EPROTO, "host changed the context private data size")
    return out  # type: ignore[no-any-return]


async def destroy_context(adapter: GuestAdapter, hprocess: int, context: int) -> int:
    reply = await send(adapter, VgpuCommand.DESTROYCONTEXT, hprocess, m.DestroyContext(context))
    return int(reply.status)


async def get_device_state(adapter: GuestAdapter, hprocess: int,
                           args: bytes) -> tuple[bytes, int]:
    out = await send(adapter, VgpuCommand.GETDEVICESTATE, hprocess, m.GetDeviceState(args))
    return out.args, out.status


async def is_feature_enabled(adapter: GuestAdapter,
                             feature_id: int) -> m.IsFeatureEnabledReturn:
    return await send(adapter, VgpuCommand.ISFEATUREENABLED, 0,  # type: ignore[no-any-return]
                      m.IsFeatureEnabled(feature_id))


async def query_clock_calibration(adapter: GuestAdapter, hprocess: int,
                                  args: bytes) -> tuple[int, bytes]:
    out = await send(adapter, VgpuCommand.QUERYCLOCKCALIBRATION, hprocess,
                     m.QueryClockCalibration(args))
    return out.status, out.clock_data


async def escape(adapter: GuestAdapter, hprocess: int, msg: m.Escape,
                 fds: Sequence[int] = ()) -> tuple[m.Escape, list[int]]:
    out, got = await send(adapter, VgpuCommand.ESCAPE, hprocess, msg, fds=fds, want_fds=True)
    if len(out.priv_drv_data) != len(msg.priv_drv_data):
        close_all(got)
        raise IoctlError(errno.EPROTO, "host changed the escape private data size")
    return out, got
