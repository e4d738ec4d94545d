"""Guest -> host message senders (the counterpart of the real driver's dxgvmbus.c): each builds
one command, sends it on the right channel, checks the reply's shape, and turns transport
failures into errnos (a rescinded channel or a lost host is -ENODEV: the adapter is gone)."""

import errno
import json
import logging
from typing import Any, TypeVar

from dxg.guest.adapter import GuestAdapter
from dxg.guest.errors import IoctlError
from dxg.guest.hostlink import HostLink
from dxg.protocol import messages as m
from dxg.protocol.bus import (
    DXGK_VMBUS_INTERFACE_VERSION,
    DXGK_VMBUS_LAST_COMPATIBLE_INTERFACE_VERSION,
)
from dxg.protocol.commands import GlobalCommand, VgpuCommand
from dxg.protocol.errors import ProtocolError
from dxg.protocol.guids import luid_parts
from dxg.protocol.headers import encode_global, encode_vgpu
from dxg.uapi.ntstatus import nt_success
from dxg.vmbus.channel import Channel, ChannelClosed, ChannelTimeout

log = logging.getLogger(__name__)
_T = TypeVar("_T", bound=Any)

REQUEST_TIMEOUT = 60.0


def _request(channel: Channel | None, payload: bytes) -> bytes:
    if channel is None or channel.closed:
        raise IoctlError(errno.ENODEV, "the adapter's channel is gone")
    try:
        return channel.request(payload, REQUEST_TIMEOUT)
    except ChannelClosed:
        raise IoctlError(errno.ENODEV, "the host removed the channel") from None
    except ChannelTimeout:
        raise IoctlError(errno.ETIMEDOUT, "the host did not answer") from None


def _parse(cls: type[_T], reply: bytes) -> _T:
    try:
        return cls.unpack(reply)  # type: ignore[no-any-return]
    except ProtocolError as e:
        # A 4-byte reply where a bigger one was due is the host's failure status; a success
        # status there is a malformed reply (its outputs are missing).
        if len(reply) == 4 and cls is not m.NtStatusReturn:
            status = m.NtStatusReturn.unpack(reply).status
            if not nt_success(status):
                raise HostStatus(status) from None
        raise IoctlError(errno.EPROTO, f"malformed host reply: {e}") from None


class HostStatus(Exception):
    """The host answered a failure NTSTATUS where a structured reply was expected."""

    def __init__(self, status: int) -> None:
        super().__init__(f"host status 0x{status:08x}")
        self.status = status


def _global(link: HostLink, command: GlobalCommand, process: int, body: bytes = b"") -> bytes:
    return _request(link.global_channel, encode_global(command, process, body))


def _vgpu(adapter: GuestAdapter, command: VgpuCommand, process: int, body: bytes = b"",
          channel: Channel | None = None) -> bytes:
    payload = encode_vgpu(command, process, adapter.host_vgpu_luid, body)
    return _request(channel if channel is not None else adapter.route(), payload)


# ---- global ------------------------------------------------------------------------------------


def create_process(link: HostLink, cookie: int, pid: int, name: str) -> int:
    body = m.CreateProcess(cookie, pid, name).pack()
    reply = _parse(m.CreateProcessReturn, _global(link, GlobalCommand.CREATEPROCESS, 0, body))
    if reply.hprocess == 0:
        raise IoctlError(errno.ENOTRECOVERABLE, "the host refused to create the process")
    return reply.hprocess


def destroy_process(link: HostLink, hprocess: int) -> int:
    return _parse(m.NtStatusReturn, _global(link, GlobalCommand.DESTROYPROCESS, hprocess)).status


def set_iospace_region(link: HostLink, start: int, length: int) -> int:
    body = m.SetIoSpaceRegion(start, length).pack()
    return _parse(m.NtStatusReturn, _global(link, GlobalCommand.SETIOSPACEREGION, 0, body)).status


def query_partition(link: HostLink) -> dict:
    reply = _global(link, GlobalCommand.PYDXG_QUERYPARTITION, 0)
    try:
        return json.loads(reply.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise IoctlError(errno.EPROTO, f"malformed census from host: {e}") from None


# ---- adapter bring-up (always on the adapter's own vGPU channel) ---------------------------------


def open_adapter(adapter: GuestAdapter) -> m.OpenAdapterReturn:
    low, high = luid_parts(adapter.luid)
    body = m.OpenAdapter(DXGK_VMBUS_INTERFACE_VERSION,
                         DXGK_VMBUS_LAST_COMPATIBLE_INTERFACE_VERSION, low, high).pack()
    reply = _vgpu(adapter, VgpuCommand.OPENADAPTER, 0, body, channel=adapter.channel)
    return _parse(m.OpenAdapterReturn, reply)


def get_internal_adapter_info(adapter: GuestAdapter) -> m.GetInternalAdapterInfoReturn:
    reply = _vgpu(adapter, VgpuCommand.GETINTERNALADAPTERINFO, 0, channel=adapter.channel)
    return _parse(m.GetInternalAdapterInfoReturn, reply)


def close_adapter(adapter: GuestAdapter) -> None:
    _vgpu(adapter, VgpuCommand.CLOSEADAPTER, 0, m.CloseAdapter(adapter.host_handle).pack(),
          channel=adapter.channel)


# ---- per process, per adapter ------------------------------------------------------------------


def query_adapter_info(adapter: GuestAdapter, hprocess: int, qtype: int,
                       data: bytes) -> tuple[int, bytes]:
    reply = _vgpu(adapter, VgpuCommand.QUERYADAPTERINFO, hprocess,
                  m.QueryAdapterInfo(qtype, data).pack())
    out = _parse(m.StatusAndData, reply)
    if nt_success(out.status) and len(out.data) != len(data):
        raise IoctlError(errno.EPROTO, "host answered QUERYADAPTERINFO with the wrong size")
    return out.status, out.data


def create_device(adapter: GuestAdapter, hprocess: int, flags: int, cookie: int) -> int:
    body = m.CreateDevice(flags, 0, cookie).pack()
    return _parse(m.HandleReturn, _vgpu(adapter, VgpuCommand.CREATEDEVICE, hprocess, body)).handle


def destroy_device(adapter: GuestAdapter, hprocess: int, device: int) -> int:
    body = m.DestroyDevice(device).pack()
    return _parse(m.NtStatusReturn,
                  _vgpu(adapter, VgpuCommand.DESTROYDEVICE, hprocess, body)).status


def flush_device(adapter: GuestAdapter, hprocess: int, device: int, reason: int) -> int:
    body = m.FlushDevice(device, reason).pack()
    return _parse(m.NtStatusReturn, _vgpu(adapter, VgpuCommand.FLUSHDEVICE, hprocess, body)).status


def create_context_virtual(adapter: GuestAdapter, hprocess: int,
                           msg: m.CreateContextVirtual) -> m.CreateContextVirtual:
    reply = _vgpu(adapter, VgpuCommand.CREATECONTEXTVIRTUAL, hprocess, msg.pack())
    out = _parse(m.CreateContextVirtual, reply)
    if len(out.priv_drv_data) != len(msg.priv_drv_data):
        raise IoctlError(errno.EPROTO, "host changed the context private data size")
    return out


def destroy_context(adapter: GuestAdapter, hprocess: int, context: int) -> int:
    body = m.DestroyContext(context).pack()
    return _parse(m.NtStatusReturn,
                  _vgpu(adapter, VgpuCommand.DESTROYCONTEXT, hprocess, body)).status


def get_device_state(adapter: GuestAdapter, hprocess: int, args: bytes) -> tuple[bytes, int]:
    reply = _vgpu(adapter, VgpuCommand.GETDEVICESTATE, hprocess, m.GetDeviceState(args).pack())
    out = _parse(m.GetDeviceStateReturn, reply)
    return out.args, out.status


def is_feature_enabled(adapter: GuestAdapter, feature_id: int) -> m.IsFeatureEnabledReturn:
    body = m.IsFeatureEnabled(feature_id).pack()
    return _parse(m.IsFeatureEnabledReturn, _vgpu(adapter, VgpuCommand.ISFEATUREENABLED, 0, body))


def query_clock_calibration(adapter: GuestAdapter, hprocess: int,
                            args: bytes) -> tuple[int, bytes]:
    reply = _vgpu(adapter, VgpuCommand.QUERYCLOCKCALIBRATION, hprocess,
                  m.QueryClockCalibration(args).pack())
    out = _parse(m.QueryClockCalibrationReturn, reply)
    return out.status, out.clock_data
