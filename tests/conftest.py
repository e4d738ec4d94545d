"""Shared fixtures: a real stack (Host + GuestDriver + SocketNode) on Unix sockets under tmp_path,
the embedded stack as `dxg up` builds it (one loop, an in-process link), and helpers to run client
processes and wait on conditions with deadlines."""

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from dxg.guest.driver import GuestDriver
from dxg.host.config import HostConfig
from dxg.host.host import Host
from dxg.node.server import SocketNode
from dxg.oslib.procmem import Syscalls
from dxg.runtime.loop import LoopThread

CLIENTS = Path(__file__).parent / "clients"


def wait_until(pred: Callable[[], object], timeout: float = 10.0, what: str = "condition"):
    """Poll `pred` until it is truthy; fail after `timeout` seconds. Returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.01)


class CountingSyscalls(Syscalls):
    """Syscalls that record the pid of every process_vm_readv/writev they make."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int]] = []
        for name in ("process_vm_readv", "process_vm_writev"):
            real = getattr(self, name)

            def counted(pid, *args, _real=real, _name=name):
                self.calls.append((_name, pid))
                return _real(pid, *args)

            setattr(self, name, counted)

    def touching(self, pid: int) -> list[tuple[str, int]]:
        return [c for c in self.calls if c[1] == pid]


@dataclass
class Stack:
    host: Host
    driver: GuestDriver
    node: SocketNode
    node_path: str
    host_address: str

    def host_totals(self) -> dict:
        return self.host.census()["totals"]


@contextmanager
def make_stack(tmp: Path, name: str = "s", adapters: int = 2, embedded: bool = False,
               node_kw: dict | None = None, driver_kw: dict | None = None,
               **host_kw) -> Iterator[Stack]:
    """Host and guest on their own loops, linked over a Unix socket; or, with `embedded`, as
    `dxg up` runs them (one loop, an in-process link)."""
    rt = LoopThread(f"test-{name}") if embedded else None
    host = Host(HostConfig(adapters=adapters, **host_kw), loop=rt)
    drv = GuestDriver(loop=rt, **(driver_kw or {}))
    node = None
    try:
        if embedded:
            drv.bind_host(host)
            addr = "local"
        else:
            addr = host.listen(str(tmp / f"{name}-host.sock"))
            drv.bind(addr)
        assert drv.wait_for_adapters(adapters, 15), "adapters did not come up"
        node_path = str(tmp / f"{name}-dxg.sock")
        node = SocketNode(drv, node_path, **(node_kw or {}))
        node.start()
        yield Stack(host, drv, node, node_path, addr)
    finally:
        if node is not None:
            node.close()
        drv.close()
        host.close()
        if rt is not None:
            rt.close()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with make_stack(tmp_path) as s:
        yield s


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every user can reach (pytest's own tmp directories are root's, 0700)."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="pydxg-test-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[Stack]:
    """The stack as `dxg up` builds it."""
    with make_stack(tmp_path, "e", embedded=True) as s:
        yield s


def client(script: str, *args: str, **kw) -> subprocess.Popen:
    """Start tests/clients/<script>.py in its own process (stdin/stdout piped, text)."""
    return subprocess.Popen(
        [sys.executable, str(CLIENTS / f"{script}.py"), *map(str, args)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"), **kw,
    )


def read_json_line(proc: subprocess.Popen, timeout: float = 30.0) -> dict:
    """The next stdout line of `proc`, parsed as JSON (the clients print one object per line)."""
    assert proc.stdout is not None
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        ready = sel.select(timeout)
    if not ready:
        proc.kill()
        raise AssertionError(f"client {proc.args} printed nothing in {timeout}s")
    line = proc.stdout.readline()
    if not line:
        err = proc.stderr.read() if proc.stderr else ""
        raise AssertionError(f"client {proc.args} exited ({proc.wait()}): {err[-2000:]}")
    return json.loads(line)
