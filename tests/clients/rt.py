"""Client for the runtime tests: one mode per scenario, one JSON line per result.

    rt.py NODE threads N          one thread parked in a host SLEEP; once told (a stdin line),
                                  N calls of another thread finish while it is still parked
    rt.py NODE tasks N            the same with asyncio tasks on one AsyncNode
    rt.py NODE park ADAPTER MS    create a device on adapter ADAPTER, say "parked", SLEEP there
    rt.py NODE calls ADAPTER N    N QueryAdapterInfo + device-less pings on ADAPTER, timed
    rt.py NODE shmem SIZE         region: check the host's pattern, write ours, wait for the
                                  host's write (stdin line "check OFFSET HEX"), report
    rt.py NODE shmem-loop N       N x (create, map, read, unmap, close, free); fd counts
    rt.py NODE eventfd            hand an eventfd to the host, read what it added
    rt.py NODE busy               devices, contexts and a parked SLEEP, then wait to be killed
"""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import sys
import threading
import time

from dxg.client import DxgError, diag, open_node, open_node_async


def out(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def threads(node_path: str, n: int) -> None:
    node = open_node(node_path)
    adapters = node.adapters()
    dev = adapters[0].create_device()
    done = threading.Event()
    parked_result: list[object] = []

    def park() -> None:
        try:
            diag.sleep(dev, 60_000)
            parked_result.append("returned")
        except DxgError as e:
            parked_result.append(e.status)
        done.set()

    t = threading.Thread(target=park, daemon=True)
    t.start()
    out(parking=True, pid=os.getpid())
    sys.stdin.readline()  # the test says go once the host is inside the SLEEP
    finished = 0
    start = time.monotonic()
    for _ in range(n):
        diag.ping(adapters[1 % len(adapters)])
        _ = adapters[0].clock_calibration()
        finished += 1
    out(finished=finished, parked_still=not done.is_set(),
        seconds=time.monotonic() - start)
    os._exit(0)  # the parked thread is still inside its call


async def tasks(node_path: str, n: int) -> None:
    node = await open_node_async(node_path)
    adapters = await node.adapters()
    dev = await adapters[0].create_device()
    parked = asyncio.ensure_future(diag.sleep(dev, 60_000))
    out(parking=True, pid=os.getpid())
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    finished = 0
    for _ in range(n):
        await asyncio.gather(diag.ping(adapters[1 % len(adapters)]),
                             adapters[0].clock_calibration())
        finished += 1
    out(finished=finished, parked_still=not parked.done())
    os._exit(0)


def park(node_path: str, adapter: int, ms: int) -> None:
    node = open_node(node_path)
    dev = node.adapters()[adapter].create_device()
    out(parked=True, pid=os.getpid())
    diag.sleep(dev, ms)
    out(returned=True)


def calls(node_path: str, adapter: int, n: int) -> None:
    node = open_node(node_path)
    ad = node.adapters()[adapter]
    start = time.monotonic()
    for _ in range(n):
        _ = ad.clock_calibration()
        diag.ping(ad)
    out(done=n, seconds=time.monotonic() - start)


def shmem(node_path: str, size: int) -> None:
    node = open_node(node_path)
    ad = node.adapters()[0]
    region, fd = diag.shmem_create(ad, size)
    m = mmap.mmap(fd, size)
    pattern = bytes(range(251))
    host_pattern = m[:size] == (pattern * (size // 251 + 1))[:size]
    mine = os.urandom(64)
    m[size - 64 : size] = mine
    out(region=region, host_pattern=host_pattern, mine=mine.hex(), pid=os.getpid())
    for line in sys.stdin:
        cmd, offset, data = line.split()
        if cmd == "check":
            off = int(offset)
            expected = bytes.fromhex(data)
            out(saw_host_write=m[off : off + len(expected)] == expected)
        break
    m.close()
    os.close(fd)
    diag.shmem_free(ad, region)
    out(freed=True)


def shmem_loop(node_path: str, n: int) -> None:
    node = open_node(node_path)
    ad = node.adapters()[0]
    before = fds()
    ok = 0
    for i in range(n):
        region, fd = diag.shmem_create(ad, 4096)
        m = mmap.mmap(fd, 4096)
        if m[i % 251] == i % 251:
            ok += 1
        m.close()
        os.close(fd)
        diag.shmem_free(ad, region)
    out(ok=ok, fds_before=before, fds_after=fds())


def eventfd(node_path: str) -> None:
    node = open_node(node_path)
    ad = node.adapters()[0]
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    diag.eventfd_signal(ad, efd, 7)
    diag.eventfd_signal(ad, efd, 5)
    value = os.eventfd_read(efd)
    refused: dict[str, int] = {}

    def status(name: str, fd: int, add: int) -> None:
        try:
            diag.eventfd_signal(ad, fd, add)
        except DxgError as e:
            refused[name] = int(e.status)

    # A blocking eventfd whose counter has no room: the host must not block on it (nor on
    # our descriptor at all), and says so.
    full = os.eventfd(0, os.EFD_CLOEXEC)
    os.eventfd_write(full, 0xFFFF_FFFF_FFFF_FFFE)
    status("full", full, 1)
    status("zero", efd, 0)
    _r, w = os.pipe()
    status("pipe", w, 1)
    diag.eventfd_signal(ad, efd, 1)  # the host still serves us
    out(value=value, refused=refused, after=os.eventfd_read(efd))


def busy(node_path: str) -> None:
    node = open_node(node_path)
    adapters = node.adapters()
    for ad in adapters:
        for _ in range(3):
            dev = ad.create_device()
            for _ in range(2):
                dev.create_context()
    dev = adapters[0].create_device()

    def sleep() -> None:
        try:
            diag.sleep(dev, 60_000)
        except DxgError:
            pass

    threading.Thread(target=sleep, daemon=True).start()
    out(ready=True, pid=os.getpid())
    sys.stdin.read()


def main() -> None:
    node_path, mode, *rest = sys.argv[1:]
    if mode == "threads":
        threads(node_path, int(rest[0]))
    elif mode == "tasks":
        asyncio.run(tasks(node_path, int(rest[0])))
    elif mode == "park":
        park(node_path, int(rest[0]), int(rest[1]))
    elif mode == "calls":
        calls(node_path, int(rest[0]), int(rest[1]))
    elif mode == "shmem":
        shmem(node_path, int(rest[0]))
    elif mode == "shmem-loop":
        shmem_loop(node_path, int(rest[0]))
    elif mode == "eventfd":
        eventfd(node_path)
    elif mode == "busy":
        busy(node_path)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
