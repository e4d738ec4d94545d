"""M2 of ``dxg bench``: moving bytes through pydxg against moving them without it.

- Zero copy (a local link, `dxg up`): Lock2 + a write of the whole allocation + a read of it all
  + Unlock2, through the raw thunks on a NodeConnection (Lock2 returns the address of the host's
  shared memory, mapped into this process), against the same write + read on an in-process,
  already-touched NumPy buffer. Sizes 4 KiB .. 256 MiB.
- The TCP copy path (`dxg host --listen tcp:` + `dxg guest --connect tcp:`, two processes):
  Lock2 fetches the allocation from the host, a byte per page is written, Unlock2 writes it all
  back; against a raw loopback TCP socket to a forked echo moving the same bytes the same way.

Both sides of a figure are measured interleaved (a window of each in turn, the order swapped
every round). Times per iteration; GB/s (2 x the bytes moved, at the p50) in the note.
The stacks come from dxg.bench.stack. bench/memory.py (parts A and B) runs the same
measurements, with more diagnostics, from here.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import struct
from collections.abc import Callable
from typing import Any

import numpy as np

from dxg.bench.model import Context, Figure, interleave, stats
from dxg.bench.stack import split, up

__all__ = ["Mem", "TcpEcho", "run", "tcp_copy", "zero_copy",
           "zero_copy_name"]

KIB = 1 << 10
MIB = 1 << 20
PAGE = 4096
PART = "M2"


def round_page(n: int) -> int:
    return -(-n // PAGE) * PAGE


def size_name(n: int) -> str:
    """4 KiB, 16 MiB, 128 KiB+1: how the figures name a size."""
    if n % MIB == 0:
        return f"{n // MIB} MiB"
    if n % KIB == 0:
        return f"{n // KIB} KiB"
    return f"{n // KIB} KiB+{n % KIB}"


def zero_copy_name(size: int) -> str:
    """The figure's name (the Ray column attaches to "Lock2 write+read 16 MiB" and "... 256 MiB")."""
    return f"Lock2 write+read {size_name(size)}"


def tcp_name(size: int) -> str:
    return f"TCP link Lock2+Unlock2 {size_name(size)}"


# ---- the client ---------------------------------------------------------------------------------


class DxgError(RuntimeError):
    pass


class Mem:
    """A device on the first adapter of a node and its allocations, through the raw thunks on
    one NodeConnection, with the soft adapter's 16-byte descriptor (dxg.uapi.memory.AllocDesc)
    as each allocation's private data. The argument structs are made once and reused, so a call
    costs what the driver costs, not what building ctypes structs costs."""

    def __init__(self, node: str) -> None:
        from dxg import uapi
        from dxg.client import thunks
        from dxg.client.connection import NodeConnection
        from dxg.uapi import structs as s
        from dxg.uapi.memory import AllocDesc

        self.t = thunks
        self.s = s
        self.AllocDesc = AllocDesc
        self.conn = NodeConnection(node)
        try:
            enum = uapi.d3dkmt_enumadapters3()
            enum.filter.include_compute_only = 1
            infos = (uapi.d3dkmt_adapterinfo * 8)()
            enum.adapter_count = 8
            enum.adapters = ctypes.addressof(infos)
            ret = self.conn.ioctl(uapi.LX_DXENUMADAPTERS3, enum)
            if ret != 0 or enum.adapter_count < 1:
                raise DxgError(f"EnumAdapters3: {ret}, {enum.adapter_count} adapters")
            self.adapter = int(infos[0].adapter_handle.v)
            cd = s.d3dkmt_createdevice()
            cd.adapter.v = self.adapter
            self._check(thunks.D3DKMTCreateDevice(self.conn, cd), "CreateDevice")
        except BaseException:
            self.conn.close()
            raise
        self.device = int(cd.device.v)
        # CreateAllocation of one allocation; the descriptor is set per size.
        self._priv = ctypes.create_string_buffer(16)
        self._info = (s.d3dddi_allocationinfo2 * 1)()
        self._info[0].priv_drv_data = ctypes.addressof(self._priv)
        self._info[0].priv_drv_data_size = 16
        self._ca = s.d3dkmt_createallocation()
        self._ca.device.v = self.device
        self._ca.alloc_count = 1
        self._ca.allocation_info = ctypes.addressof(self._info)
        self._size = -1
        self._one = (ctypes.c_uint32 * 1)()
        self._da = s.d3dkmt_destroyallocation2()
        self._da.device.v = self.device
        self._da.allocations = ctypes.addressof(self._one)
        self._da.alloc_count = 1
        self._lk = s.d3dkmt_lock2()
        self._lk.device.v = self.device
        self._ul = s.d3dkmt_unlock2()
        self._ul.device.v = self.device
        self._views: dict[int, type[ctypes.Array[ctypes.c_ubyte]]] = {}
        self._qai: Any = None
        self._desc: Any = None

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise DxgError(f"{what}: NTSTATUS 0x{status & 0xFFFFFFFF:08x}")

    def create(self, size: int) -> int:
        if size != self._size:
            ctypes.memmove(self._priv, self.AllocDesc(size).pack(), 16)
            self._size = size
        self._info[0].allocation.v = 0
        self._check(self.t.D3DKMTCreateAllocation(self.conn, self._ca), "CreateAllocation")
        return int(self._info[0].allocation.v)

    def destroy(self, handle: int) -> None:
        self._one[0] = handle
        self._check(self.t.D3DKMTDestroyAllocation2(self.conn, self._da), "DestroyAllocation2")

    def lock(self, handle: int) -> int:
        self._lk.allocation.v = handle
        self._lk.data = 0
        self._check(self.t.D3DKMTLock2(self.conn, self._lk), "Lock2")
        if not self._lk.data:
            raise DxgError("Lock2 returned no address")
        return int(self._lk.data)

    def unlock(self, handle: int) -> None:
        self._ul.allocation.v = handle
        self._check(self.t.D3DKMTUnlock2(self.conn, self._ul), "Unlock2")

    def forwarded(self) -> None:
        """QueryAdapterInfo DRIVER_DESCRIPTION: a call the guest forwards to the host (the floor
        of any call that reaches the host)."""
        from dxg.uapi import wddm

        if self._qai is None:
            self._desc = wddm.D3DKMT_DRIVER_DESCRIPTION()
            self._qai = self.s.d3dkmt_queryadapterinfo()
            self._qai.adapter.v = self.adapter
            self._qai.type = wddm.KMTQUERYADAPTERINFOTYPE.KMTQAITYPE_DRIVER_DESCRIPTION
            self._qai.private_data = ctypes.addressof(self._desc)
            self._qai.private_data_size = ctypes.sizeof(self._desc)
        self._check(self.t.D3DKMTQueryAdapterInfo(self.conn, self._qai), "QueryAdapterInfo")

    def view(self, addr: int, n: int) -> np.ndarray:
        """The ``n`` bytes at ``addr`` (what Lock2 returned) as a uint8 ndarray, no copy."""
        kind = self._views.get(n)
        if kind is None:
            kind = self._views[n] = ctypes.c_ubyte * n
        return np.frombuffer(kind.from_address(addr), dtype=np.uint8)

    def close(self) -> None:
        self.conn.close()


# ---- zero copy ----------------------------------------------------------------------------------


def zero_copy(node: str, size: int, rounds: int, per: int, extras: bool = True,
              warm: int = 1) -> dict[str, Any]:
    """Lock2 + write + read + Unlock2 of ``size`` bytes (one allocation, made once) against the
    same write + read on an in-process buffer. Returns the samples (us) of "pydxg" and "local",
    with ``extras`` also "calls" (Lock2 + Unlock2 alone) and "mapped" (the write + read on the
    mapping alone, held locked meanwhile: where a gap comes from); "correct": the bytes read
    back are those written, and a later lock still sees them."""
    mem = Mem(node)
    try:
        h = mem.create(size)
        try:
            src = np.arange(size, dtype=np.uint32).astype(np.uint8)  # a pattern, touched
            dst = np.zeros(size, dtype=np.uint8)
            buf = np.zeros(size, dtype=np.uint8)  # the in-process buffer, touched

            def pydxg() -> None:
                view = mem.view(mem.lock(h), size)
                np.copyto(view, src)
                np.copyto(dst, view)
                mem.unlock(h)

            def local() -> None:
                np.copyto(buf, src)
                np.copyto(dst, buf)

            def lock_only() -> None:
                mem.lock(h)
                mem.unlock(h)

            for _ in range(warm):  # warm up: maps the block, touches its pages
                pydxg()
                local()
            ok = bool(np.array_equal(dst, src))
            fns: dict[str, Callable[[], object]] = {"pydxg": pydxg, "local": local}
            mapped = mem.view(mem.lock(h), size) if extras else None
            if mapped is not None:
                # The other locks nest inside this one, which on a local link costs the same.
                def copy_mapped() -> None:
                    np.copyto(mapped, src)
                    np.copyto(dst, mapped)

                fns |= {"calls": lock_only, "mapped": copy_mapped}
            try:
                samples = interleave(fns, rounds, per)
            finally:
                if mapped is not None:
                    mem.unlock(h)
            # The bytes stayed in the allocation: a fresh lock sees them.
            addr = mem.lock(h)
            kept = bool(np.array_equal(mem.view(addr, size)[::PAGE], src[::PAGE]))
            mem.unlock(h)
        finally:
            mem.destroy(h)
    finally:
        mem.close()
    return {"size": size, "correct": ok and kept, "address": hex(addr), "samples": samples}


# ---- the TCP copy path ------------------------------------------------------------------------------


class TcpEcho:
    """A forked process on a loopback TCP connection: for an 8-byte request (n) it sends n bytes
    back; then it receives n bytes (recv_into) and answers one byte. What Lock2 (fetch) and
    Unlock2 (write back) of an n-byte allocation move, on a bare socket."""

    def __init__(self, size: int) -> None:
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        self.pid = os.fork()
        if self.pid == 0:
            try:
                conn, _ = lsock.accept()
                lsock.close()
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                buf = bytearray(size)
                mv = memoryview(buf)
                while True:
                    req = conn.recv(8)
                    if len(req) < 8:
                        break
                    (n,) = struct.unpack("<Q", req)
                    conn.sendall(mv[:n])
                    got = 0
                    while got < n:
                        k = conn.recv_into(mv[got:n])
                        if not k:
                            os._exit(0)
                        got += k
                    conn.sendall(b"k")
            finally:
                os._exit(0)
        try:
            self.sock = socket.create_connection(lsock.getsockname())
        except BaseException:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            raise
        finally:
            lsock.close()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = np.zeros(size, dtype=np.uint8)
        self.mv = memoryview(self.buf)
        self.ack = bytearray(1)

    def move(self, n: int) -> None:
        self.sock.sendall(struct.pack("<Q", n))
        got = 0
        while got < n:
            k = self.sock.recv_into(self.mv[got:n])
            if not k:
                raise ConnectionError("echo went away")
            got += k
        self.buf[:n:PAGE] += 1  # the same touch as the pydxg side
        self.sock.sendall(self.mv[:n])
        if self.sock.recv_into(self.ack) != 1:
            raise ConnectionError("echo went away")

    def close(self) -> None:
        self.sock.close()
        os.waitpid(self.pid, 0)


def tcp_copy(node: str, size: int, rounds: int, per: int, floor: bool = True) -> dict[str, Any]:
    """Lock2 (fetch) + a byte per page + Unlock2 (write back) of a ``size``-byte allocation on a
    TCP host link, against a raw TCP echo moving the same page-rounded bytes. Returns the
    samples (us) of "pydxg" and "raw", with ``floor`` also "floor" (two calls the guest forwards
    to the host: what any Lock2 + Unlock2 on this link costs at least); "correct": a pattern
    written under one lock comes back under the next."""
    mem = Mem(node)
    try:
        h = mem.create(size)
        n = round_page(size)
        try:
            echo = TcpEcho(n)
            try:
                def pydxg() -> None:
                    view = mem.view(mem.lock(h), n)
                    view[::PAGE] += 1
                    mem.unlock(h)

                def raw() -> None:
                    echo.move(n)

                want = np.arange(n, dtype=np.uint32).astype(np.uint8)
                view = mem.view(mem.lock(h), n)
                view[:] = want
                mem.unlock(h)
                view = mem.view(mem.lock(h), n)
                ok = bool(np.array_equal(view, want))
                mem.unlock(h)
                raw()

                def two_calls() -> None:
                    mem.forwarded()
                    mem.forwarded()

                fns: dict[str, Callable[[], object]] = {"pydxg": pydxg, "raw": raw}
                if floor:
                    two_calls()
                    fns["floor"] = two_calls
                samples = interleave(fns, rounds, per)
            finally:
                echo.close()
        finally:
            mem.destroy(h)
    finally:
        mem.close()
    return {"size": size, "moved": n, "correct": ok, "samples": samples}


# ---- the part -----------------------------------------------------------------------------------

# (size, rounds, calls per window): quick, then full
ZERO_COPY_QUICK = ((4 * KIB, 4, 100), (1 * MIB, 4, 10), (16 * MIB, 4, 3))
ZERO_COPY_FULL = ((4 * KIB, 10, 500), (64 * KIB, 10, 300), (1 * MIB, 10, 50),
                  (16 * MIB, 20, 10), (256 * MIB, 10, 3))
TCP_QUICK = ((64 * MIB, 3, 2),)
TCP_FULL = ((128 * KIB + 1, 20, 50), (64 * MIB, 8, 3))


def _unit(size: int) -> tuple[str, float]:
    """Microseconds up to 1 MiB, milliseconds above: (unit, divisor of a sample in us)."""
    return ("us", 1.0) if size <= MIB else ("ms", 1e3)


def _gbs(moved: int, p50_us: float) -> float:
    return moved / p50_us / 1e3 if p50_us > 0 else float("nan")


def _zero_copy_figure(node: str, size: int, rounds: int, per: int, quick: bool) -> Figure:
    unit, div = _unit(size)
    name = zero_copy_name(size)
    base_name = "the same write + read on an in-process NumPy buffer"
    try:
        r = zero_copy(node, size, rounds, per, extras=not quick, warm=3 if size < MIB else 1)
    except Exception as e:
        return Figure(PART, name, unit, None, baseline_name=base_name,
                      error=f"{type(e).__name__}: {e}")
    s = r["samples"]
    px = stats([x / div for x in s["pydxg"]])
    lo = stats([x / div for x in s["local"]])
    moved = 2 * size
    note = (f"GB/s at p50: pydxg {_gbs(moved, px.p50 * div):.2f}, in-process "
            f"{_gbs(moved, lo.p50 * div):.2f}")
    if "calls" in s:
        mp = stats(s["mapped"])
        note += (f"; Lock2+Unlock2 alone {stats(s['calls']).p50:.0f} us, write+read on the "
                 f"mapping alone {mp.p50 / div:.3g} {unit}")
    return Figure(PART, name, unit, px, lo, base_name, note=note,
                  error="" if r["correct"] else "the bytes read back differ from those written")


def _tcp_figure(node: str, size: int, rounds: int, per: int) -> Figure:
    unit, div = _unit(round_page(size))
    name = tcp_name(size)
    base_name = "a raw loopback TCP socket moving the same bytes both ways"
    try:
        r = tcp_copy(node, size, rounds, per)
    except Exception as e:
        return Figure(PART, name, unit, None, baseline_name=base_name,
                      error=f"{type(e).__name__}: {e}")
    s = r["samples"]
    px = stats([x / div for x in s["pydxg"]])
    raw = stats([x / div for x in s["raw"]])
    moved = 2 * r["moved"]
    note = (f"Lock2 fetches, Unlock2 writes back {size_name(r['moved'])}; GB/s at p50: pydxg "
            f"{_gbs(moved, px.p50 * div):.2f}, raw {_gbs(moved, raw.p50 * div):.2f}; two calls "
            f"forwarded to the host (the floor) {stats(s['floor']).p50:.0f} us")
    return Figure(PART, name, unit, px, raw, base_name, note=note,
                  error="" if r["correct"] else "the bytes read back differ from those written")


def _failed(names: list[tuple[str, str]], why: str) -> list[Figure]:
    return [Figure(PART, n, u, None, error=why) for n, u in names]


def run(ctx: Context) -> list[Figure]:
    """Every M2 figure: zero copy on `dxg up`, then the copy path of a TCP host link."""
    figures: list[Figure] = []
    zc = ZERO_COPY_QUICK if ctx.quick else ZERO_COPY_FULL
    tcp = TCP_QUICK if ctx.quick else TCP_FULL
    tmp = ctx.tmp
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        with up(tmp) as stack:
            for size, rounds, per in zc:
                ctx.log(f"M2 {zero_copy_name(size)}")
                figures.append(_zero_copy_figure(stack.node, size, rounds, per, ctx.quick))
    except Exception as e:  # the stack did not start (or stop): every figure not made says why
        done = {f.name for f in figures}
        figures += _failed([(zero_copy_name(s), _unit(s)[0]) for s, _, _ in zc
                            if zero_copy_name(s) not in done], f"dxg up: {e}")
    try:
        with split(tmp, "tcp") as stack:
            for size, rounds, per in tcp:
                ctx.log(f"M2 {tcp_name(size)}")
                figures.append(_tcp_figure(stack.node, size, rounds, per))
    except Exception as e:
        done = {f.name for f in figures}
        figures += _failed([(tcp_name(s), _unit(round_page(s))[0]) for s, _, _ in tcp
                            if tcp_name(s) not in done], f"dxg host + guest over TCP: {e}")
    return figures
