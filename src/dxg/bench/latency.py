"""M1, call latency: what one ioctl costs through each way into pydxg, beside the raw socket
round trip that is the floor of any user-space driver a process reaches over a socket.

Measured from this process, one call at a time, every way interleaved in the same rounds (a
window of each in turn, the order reversed every other round):

- raw round trips: 64 bytes to a forked echo process and back, over a Unix socket (the
  baseline of every Unix row) and over loopback TCP (TCP_NODELAY; the baseline of the TCP row);
- ``local ioctl``: EnumAdapters3 with adapter_count 0 (the count only), answered by the guest
  driver without a host call;
- ``forwarded ioctl``: QueryAdapterInfo(DRIVER_DESCRIPTION), which the guest forwards to the
  host and back;

each through the socket node and the FUSE file of one ``dxg up``, and the forwarded one through
a separate ``dxg host`` + ``dxg guest`` linked over a Unix socket and over loopback TCP.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import selectors
import socket
from collections.abc import Callable
from contextlib import ExitStack
from multiprocessing.connection import Connection
from typing import Any

from dxg.bench.model import Context, Figure, interleave, stats
from dxg.bench.stack import Spec, Workers, fuse_unavailable, stacks

__all__ = ["Calls", "EchoClient", "run", "start_echo"]

MSG = 64
UNIX_RAW = "raw Unix round trip (64 B)"
TCP_RAW = "raw loopback TCP round trip (64 B)"
LOCAL_UP = "local ioctl (socket node, dxg up)"  # the Ray peer's "one small remote call" joins here


# ---- the floor: an echo process --------------------------------------------------------------


def echo_server(conn: Connection, family: str, path: str, one: bool) -> None:
    """A worker (see :class:`dxg.bench.stack.Workers`): echoes what each connection sends.
    ``one``: serve a single connection with blocking calls (the plainest round trip); else any
    number of connections from one selector loop (one process serving many, as the node does).
    Ends when the bench closes the control connection."""
    if family == "unix":
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ls.bind(path)
    else:
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.bind(("127.0.0.1", 0))
    ls.listen(256)
    conn.send(ls.getsockname())
    if one:
        c, _ = ls.accept()
        if family == "tcp":
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(65536)
        while n := c.recv_into(buf):
            c.sendall(memoryview(buf)[:n])
        return
    sel = selectors.DefaultSelector()
    sel.register(ls, selectors.EVENT_READ, "accept")
    sel.register(conn.fileno(), selectors.EVENT_READ, "ctl")
    while True:
        for key, _ in sel.select():
            if key.data == "ctl":
                return
            if key.data == "accept":
                c, _ = ls.accept()
                if family == "tcp":
                    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sel.register(c, selectors.EVENT_READ, "peer")
                continue
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            try:
                data = sock.recv(65536)
            except ConnectionError:
                data = b""
            if not data:
                sel.unregister(sock)
                sock.close()
                continue
            sock.sendall(data)


def start_echo(workers: Workers, family: str, one: bool) -> Any:
    """An echo worker; returns its address (a path, or (host, port))."""
    path = os.path.join(workers.tmp, f"echo-{family}-{len(workers.workers)}.sock")
    w = workers.spawn("dxg.bench.latency:echo_server", family, path, one)
    addr = w.recv(30)
    return addr if family == "unix" else tuple(addr)


class EchoClient:
    """A connection to an echo worker: ``rtt()`` is one 64-byte round trip."""

    def __init__(self, addr: Any) -> None:
        if isinstance(addr, str):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.connect(addr)
        self.msg = b"x" * MSG
        self.buf = bytearray(MSG)
        self.view = memoryview(self.buf)

    def rtt(self) -> None:
        self.sock.sendall(self.msg)
        got = 0
        while got < MSG:
            n = self.sock.recv_into(self.view[got:])
            if not n:
                raise ConnectionError("the echo process went away")
            got += n

    def close(self) -> None:
        self.sock.close()


# ---- the calls -------------------------------------------------------------------------------


class Calls:
    """The two calls, made through ``ioctl(code, struct) -> status`` (a node connection's, or
    fcntl.ioctl on the FUSE file). The argument structs are built once: a call costs what the
    driver costs, not what building ctypes structs costs."""

    def __init__(self, ioctl: Callable[[int, Any], int]) -> None:
        from dxg import uapi
        from dxg.uapi import wddm

        self.ioctl = ioctl
        self.code_enum = uapi.LX_DXENUMADAPTERS3
        self.code_query = uapi.LX_DXQUERYADAPTERINFO
        infos = (uapi.d3dkmt_adapterinfo * 8)()
        enum = uapi.d3dkmt_enumadapters3()
        enum.filter.include_compute_only = 1
        enum.adapter_count = 8
        enum.adapters = ctypes.addressof(infos)
        ret = ioctl(self.code_enum, enum)
        if ret != 0 or enum.adapter_count < 1:
            raise RuntimeError(f"EnumAdapters3: status {ret}, {enum.adapter_count} adapters")
        self.enum = uapi.d3dkmt_enumadapters3()
        self.enum.filter.include_compute_only = 1
        self.desc = wddm.D3DKMT_DRIVER_DESCRIPTION()
        self.qai = uapi.d3dkmt_queryadapterinfo()
        self.qai.adapter.v = infos[0].adapter_handle.v
        self.qai.type = wddm.KMTQUERYADAPTERINFOTYPE.KMTQAITYPE_DRIVER_DESCRIPTION
        self.qai.private_data = ctypes.addressof(self.desc)
        self.qai.private_data_size = ctypes.sizeof(self.desc)
        self.local()
        self.forwarded()

    def local(self) -> None:
        """EnumAdapters3, count only: the guest answers it."""
        self.enum.adapter_count = 0
        self.enum.adapters = 0
        ret = self.ioctl(self.code_enum, self.enum)
        if ret != 0:
            raise RuntimeError(f"EnumAdapters3: status {ret}")

    def forwarded(self) -> None:
        """QueryAdapterInfo(DRIVER_DESCRIPTION): guest -> host -> guest."""
        ret = self.ioctl(self.code_query, self.qai)
        if ret != 0:
            raise RuntimeError(f"QueryAdapterInfo: status {ret}")


def file_ioctl(fd: int) -> Callable[[int, Any], int]:
    """ioctl(2) on the FUSE file ``fd``, as a C client makes it: 0 or a negative errno."""
    def call(code: int, args: Any) -> int:
        try:
            return fcntl.ioctl(fd, code, args, True)
        except OSError as e:
            return -(e.errno or 1)
    return call


# ---- M1 --------------------------------------------------------------------------------------


def run(ctx: Context) -> list[Figure]:
    from dxg.client.connection import NodeConnection

    rounds, per = (3, 300) if ctx.quick else (20, 1000)
    fns: dict[str, Callable[[], Any]] = {}
    errors: dict[str, str] = {}
    with ExitStack() as es:
        fuse_why = fuse_unavailable()
        if fuse_why is not None:
            errors["fuse"] = f"no FUSE file: {fuse_why}"
        started = stacks(es, ctx.tmp, [Spec("up", "m1-up", dev_node=fuse_why is None),
                                       Spec("unix", "m1-unix"), Spec("tcp", "m1-tcp")])
        if isinstance(started["m1-up"], str) and fuse_why is None:  # without the FUSE file?
            errors["fuse"] = started["m1-up"]
            started.update(stacks(es, ctx.tmp, [Spec("up", "m1-up-nofuse")]))
            started["m1-up"] = started.pop("m1-up-nofuse")
        workers = es.enter_context(Workers(ctx.tmp, preload=()))
        for family in ("unix", "tcp"):
            echo = EchoClient(start_echo(workers, family, one=True))
            es.callback(echo.close)
            fns[f"{family} raw"] = echo.rtt
        stack = started["m1-up"]
        if isinstance(stack, str):
            errors["up"] = stack
        else:
            conn = es.enter_context(NodeConnection(stack.node))
            calls = Calls(conn.ioctl)
            fns["up local"], fns["up fwd"] = calls.local, calls.forwarded
            if stack.dev is not None:
                fd = os.open(stack.dev, os.O_RDWR | os.O_CLOEXEC)
                es.callback(os.close, fd)
                try:
                    fcalls = Calls(file_ioctl(fd))
                    fns["fuse local"], fns["fuse fwd"] = fcalls.local, fcalls.forwarded
                except Exception as e:
                    errors["fuse"] = f"{type(e).__name__}: {e}"
        for link in ("unix", "tcp"):
            sp = started[f"m1-{link}"]
            if isinstance(sp, str):
                errors[link] = sp
                continue
            c = es.enter_context(NodeConnection(sp.node))
            fns[f"{link} fwd"] = Calls(c.ioctl).forwarded
        ctx.log(f"M1: {len(fns)} ways, {rounds} rounds of {per} calls each")
        samples = interleave(fns, rounds, per, warm=200)
    return _figures(samples, errors)


def _figures(samples: dict[str, list[float]], errors: dict[str, str]) -> list[Figure]:
    def fig(key: str, name: str, base: str, note: str, missing: str) -> Figure:
        base_name = TCP_RAW if base == "tcp raw" else UNIX_RAW
        baseline = stats(samples[base]) if base in samples else None
        if key not in samples:
            why = errors.get(missing) or errors.get("up") or "not measured"
            return Figure("M1", name, "us", None, baseline, base_name, error=why)
        return Figure("M1", name, "us", stats(samples[key]), baseline, base_name, note=note)

    def fuse_note(key: str, sock: str) -> str:
        if key in samples and sock in samples:
            ratio = stats(samples[key]).p50 / stats(samples[sock]).p50
            return f"os.open + fcntl.ioctl on the FUSE file; FUSE/socket p50 {ratio:.2f}"
        return "os.open + fcntl.ioctl on the FUSE file"

    return [
        fig("up local", LOCAL_UP, "unix raw",
            "EnumAdapters3, count only: the guest answers, no host call", "up"),
        fig("up fwd", "forwarded ioctl (socket node, dxg up)", "unix raw",
            "QueryAdapterInfo(DRIVER_DESCRIPTION): guest -> host -> guest, one process", "up"),
        fig("fuse local", "local ioctl (FUSE file, dxg up)", "unix raw",
            fuse_note("fuse local", "up local"), "fuse"),
        fig("fuse fwd", "forwarded ioctl (FUSE file, dxg up)", "unix raw",
            fuse_note("fuse fwd", "up fwd"), "fuse"),
        fig("unix fwd", "forwarded ioctl (host + guest over Unix)", "unix raw",
            "separate host and guest processes: client -> guest -> host over a Unix socket",
            "unix"),
        fig("tcp fwd", "forwarded ioctl (host + guest over TCP)", "tcp raw",
            "client -> guest over the node's Unix socket, guest -> host over loopback TCP",
            "tcp"),
    ]
