"""The stacks a benchmark part measures, started for it and always stopped after it, and the
client processes it measures them with.

- :func:`up`: ``dxg up`` (host, guest and node in one process; ``dev_node=True`` also serves the
  FUSE file), ready once its node answers with its adapters (and the file is mounted).
- :func:`split`: ``dxg host --listen unix:PATH|tcp:127.0.0.1:0`` and ``dxg guest --connect``,
  two processes, so each one's memory can be read and the guest-host link is a real socket.
- :class:`Workers`: client processes forked from a process that imported pydxg and NumPy once
  (a fork server), so 64 clients start in a moment instead of paying 64 interpreter start-ups,
  each talking to the bench over its own control connection.

All are context managers: whatever way the ``with`` block ends (an error, KeyboardInterrupt),
the daemons get SIGTERM (a clean stop: the FUSE file is unmounted), then SIGKILL, and every
worker is killed. Each daemon and the fork server also carry PR_SET_PDEATHSIG, so even a bench
killed with SIGKILL leaves nothing running. ``start_up``/``stop_up`` are the older one-call
forms that ``bench/*.py`` use (through ``bench/common.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

__all__ = ["DXG", "Spec", "Stack", "Worker", "Workers", "cpu_busy", "fuse_unavailable", "rss_kib",
           "settle_rss", "split", "stacks", "start_up", "stop", "stop_up", "up", "wait_node"]

DXG = (sys.executable, "-m", "dxg.cli.main")
PR_SET_PDEATHSIG = 1
MNT_DETACH = 2

# Run first in every process the bench starts (argv: parent pid, signal): the process gets the
# signal when the bench goes, however it goes, so no daemon outlives it.
_BOOT = (
    "import ctypes, os, sys\n"
    "ppid, sig = int(sys.argv[1]), int(sys.argv[2])\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, sig, 0, 0, 0)\n"
    "if os.getppid() != ppid:\n"
    "    os._exit(1)\n"
    "del sys.argv[1:3]\n"
)
_RUN_DXG = _BOOT + ("import runpy\nsys.argv[0] = 'dxg'\n"
                    "runpy.run_module('dxg.cli.main', run_name='__main__', alter_sys=True)\n")
_RUN_ZYGOTE = _BOOT + "from dxg.bench.stack import _zygote_main\n_zygote_main()\n"


def _dxg_argv(*args: str) -> list[str]:
    """A ``dxg`` command line that dies (SIGTERM: a clean stop) with this process."""
    return [sys.executable, "-c", _RUN_DXG, str(os.getpid()), str(int(signal.SIGTERM)), *args]


# ---- what the machine does -------------------------------------------------------------------


def cpu_busy() -> tuple[float, float]:
    """(seconds of CPU the whole machine spent busy, seconds this process and its waited-for
    children spent) so far: what other processes took between two readings is the difference
    (the noise a measurement shared the machine with)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    t = os.times()
    return busy, t.user + t.system + t.children_user + t.children_system


def rss_kib(pid: int) -> int:
    """VmRSS of process ``pid`` in KiB (RuntimeError once it has exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    raise RuntimeError(f"process {pid} has exited")


def settle_rss(pid: int, seconds: float = 3.0, step: float = 0.1, slack_kib: int = 8) -> int:
    """``pid``'s RSS once it stops moving (work a call left behind has run), or after
    ``seconds``: what a reading after a burst of calls should be."""
    last = rss_kib(pid)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(step)
        now = rss_kib(pid)
        if abs(now - last) <= slack_kib:
            return now
        last = now
    return last


def fuse_unavailable() -> str | None:
    """None when this process can mount the FUSE file, else why not."""
    try:
        from dxg.node.fuse import fuse_available
    except ImportError as e:  # pragma: no cover - a checkout without the FUSE node
        return f"no FUSE node in this checkout ({e})"
    return fuse_available()


# ---- daemons ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Stack:
    """A running stack: its node (and FUSE file), its processes, its logs. ``procs`` are in
    start order: [dxg up] or [dxg host, dxg guest]."""

    kind: str  # "up", "unix", "tcp"
    node: str
    procs: list[subprocess.Popen[bytes]]
    tmp: Path
    dev: str | None = None
    logs: list[Path] = field(default_factory=list)

    @property
    def daemon_pid(self) -> int:
        """The process that holds the host's objects (dxg up, or dxg host)."""
        return self.procs[0].pid

    @property
    def guest_pid(self) -> int:
        return self.procs[-1].pid

    def log_tail(self, lines: int = 5) -> str:
        out = []
        for log in self.logs:
            with contextlib.suppress(OSError):
                text = log.read_text(errors="replace").strip().splitlines()[-lines:]
                if text:
                    out.append(f"{log.name}: " + " | ".join(text))
        return "; ".join(out)


def _popen(argv: list[str], out: Path | None, log: Path,
           env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "wb") as err:
        stdout: Any = subprocess.DEVNULL
        if out is not None:
            stdout = open(out, "wb")  # closed below: the child keeps its own copy
        try:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=err,
                                    env=env, start_new_session=True)
        finally:
            if out is not None:
                stdout.close()


def _wait_line(path: Path, prefix: str, procs: list[subprocess.Popen[bytes]],
               deadline: float, what: str) -> str:
    """The rest of the first line of file ``path`` that contains ``prefix`` (a daemon's stdout)."""
    while True:
        with contextlib.suppress(FileNotFoundError):
            for line in path.read_text(errors="replace").splitlines():
                if prefix in line:
                    return line.split(prefix, 1)[1].strip()
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{what} exited ({dead[0].returncode}) before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after 60 s")
        time.sleep(0.02)


def wait_node(node: str, adapters: int, procs: Sequence[subprocess.Popen[bytes]],
              timeout: float = 60.0) -> None:
    """Until the node at ``node`` answers with at least ``adapters`` adapters (from this process:
    no `dxg wait` interpreter to start); RuntimeError when a daemon exits or time runs out."""
    from dxg.client import NodeError, open_node

    deadline = time.monotonic() + timeout
    last = ""
    while True:
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"a daemon exited ({dead[0].returncode}) before node {node} "
                               "was ready")
        if os.path.exists(node):
            try:
                with open_node(node) as n:
                    found = n.adapters()
                    count = len(found)
                    for a in found:
                        a.close()
                if count >= adapters:
                    return
                last = f"{count} adapters"
            except (NodeError, OSError) as e:
                last = str(e)
        if time.monotonic() > deadline:
            raise RuntimeError(f"node {node} not ready after {timeout:.0f} s ({last})")
        time.sleep(0.02)


def stop(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 30.0) -> None:
    """SIGTERM each (the last started first: a guest before its host), SIGKILL what is still
    there after ``timeout``; even when interrupted, nothing is left running."""
    try:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _unmount_under(tmp: Path) -> None:
    """Detach any pydxg FUSE mount left under ``tmp`` (a daemon that was SIGKILLed)."""
    with contextlib.suppress(Exception):
        from dxg.node.fuse import pydxg_mounts

        libc = ctypes.CDLL(None, use_errno=True)
        for where in pydxg_mounts(tmp):
            libc.umount2(os.fsencode(where), MNT_DETACH)


def _launch_up(tmp: Path, adapters: int, extra: Sequence[str], dev_node: bool,
               name: str) -> Stack:
    node = str(tmp / f"{name}.sock")
    dev = str(tmp / f"{name}.dev") if dev_node else None
    argv = _dxg_argv("up", "--node", node, "--adapters", str(adapters), *extra)
    if dev is not None:
        argv += ["--dev-node", dev]
    proc = _popen(argv, tmp / f"{name}.out", tmp / f"{name}.log", env=dict(os.environ,
                                                                           DXG_NODE=node))
    return Stack("up", node, [proc], tmp, dev, [tmp / f"{name}.log"])


def _launch_split(tmp: Path, link: str, adapters: int, extra: Sequence[str],
                  name: str) -> Stack:
    if link not in ("unix", "tcp"):
        raise ValueError(f"link {link!r}: unix or tcp")
    listen = "tcp:127.0.0.1:0" if link == "tcp" else f"unix:{tmp / f'{name}-host.sock'}"
    hlog, glog = tmp / f"{name}-host.log", tmp / f"{name}-guest.log"
    host = _popen(_dxg_argv("host", "--listen", listen, "--adapters", str(adapters), *extra),
                  tmp / f"{name}-host.out", hlog)
    return Stack(link, str(tmp / f"{name}-guest.sock"), [host], tmp, None, [hlog, glog])


def _finish(stack: Stack, adapters: int) -> None:
    """Until a launched stack is ready (a split one's guest started once its host listens);
    stopped, and the error says why with the end of its logs, when it does not get there."""
    deadline = time.monotonic() + 60
    try:
        if stack.kind != "up":
            name = stack.logs[0].name.removesuffix("-host.log")
            addr = _wait_line(stack.tmp / f"{name}-host.out", "listening on ", stack.procs,
                              deadline, "dxg host")
            stack.procs.append(_popen(_dxg_argv("guest", "--connect", addr, "--node",
                                                stack.node), None, stack.logs[1]))
        wait_node(stack.node, adapters, stack.procs, max(1.0, deadline - time.monotonic()))
        if stack.dev is not None:
            _wait_line(stack.tmp / f"{stack.logs[0].stem}.out", "device file:", stack.procs,
                       deadline, "dxg up")
    except BaseException as e:
        _stop_stack(stack)
        if isinstance(e, RuntimeError):
            raise RuntimeError(f"{e} ({stack.log_tail()})") from None
        raise


def _start_up(tmp: Path, adapters: int, extra: Sequence[str], dev_node: bool,
              name: str) -> Stack:
    stack = _launch_up(tmp, adapters, extra, dev_node, name)
    _finish(stack, adapters)
    return stack


def _start_split(tmp: Path, link: str, adapters: int, extra: Sequence[str],
                 name: str) -> Stack:
    stack = _launch_split(tmp, link, adapters, extra, name)
    _finish(stack, adapters)
    return stack


@dataclass(frozen=True, slots=True)
class Spec:
    """One stack of :func:`stacks`: ``kind`` "up", "unix" or "tcp"."""

    kind: str
    name: str
    adapters: int = 1
    dev_node: bool = False
    extra: tuple[str, ...] = ()


def stacks(es: contextlib.ExitStack, tmp: Path, specs: Sequence[Spec]) -> dict[str, Stack | str]:
    """Several stacks started side by side (their start-ups overlap), each stopped when ``es``
    closes: name -> the Stack, or why it did not start (the others still run)."""
    out: dict[str, Stack | str] = {}
    launched = []
    for spec in specs:
        try:
            if spec.kind == "up":
                st = _launch_up(tmp, spec.adapters, spec.extra, spec.dev_node, spec.name)
            else:
                st = _launch_split(tmp, spec.kind, spec.adapters, spec.extra, spec.name)
        except Exception as e:
            out[spec.name] = f"{type(e).__name__}: {e}"
            continue
        es.callback(_stop_stack, st)
        launched.append((spec, st))
    for spec, st in launched:
        try:
            _finish(st, spec.adapters)
            out[spec.name] = st
        except Exception as e:
            out[spec.name] = f"{type(e).__name__}: {e}"
    return out


def _stop_stack(stack: Stack) -> None:
    try:
        stop(stack.procs)
    finally:
        if stack.dev is not None:
            _unmount_under(stack.tmp)


@contextlib.contextmanager
def up(tmp: Path, adapters: int = 1, *, dev_node: bool = False, extra: Sequence[str] = (),
       name: str = "up") -> Iterator[Stack]:
    """``dxg up`` with ``adapters`` soft adapters (``extra``: more flags), its node (and with
    ``dev_node`` its FUSE file) in ``tmp`` named after ``name``; stopped when the block ends."""
    stack = _start_up(tmp, adapters, extra, dev_node, name)
    try:
        yield stack
    finally:
        _stop_stack(stack)


@contextlib.contextmanager
def split(tmp: Path, link: str, adapters: int = 1, *, extra: Sequence[str] = (),
          name: str = "") -> Iterator[Stack]:
    """``dxg host`` + ``dxg guest`` over ``link`` ("unix" or "tcp" on loopback, the port chosen
    by the host); ``extra`` goes to the host. Stopped (the guest first) when the block ends."""
    stack = _start_split(tmp, link, adapters, extra, name or link)
    try:
        yield stack
    finally:
        _stop_stack(stack)


def start_up(tmp: Path, adapters: int = 1, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """`dxg up` with ``adapters`` soft adapters (and ``extra`` flags), its node in ``tmp``, once
    it answers; its log in tmp/up.log. Stop it with :func:`stop_up`."""
    stack = _start_up(tmp, adapters, extra, False, "up")
    return stack.procs[0], stack.node


def stop_up(up: subprocess.Popen[bytes]) -> None:
    """SIGTERM (a clean stop), SIGKILL after 30 s."""
    stop([up])


# ---- client processes ------------------------------------------------------------------------


class Worker:
    """One client process: ``pid``, and ``send``/``recv`` (pickled objects) on its control
    connection. ``recv`` re-raises what the worker's function raised."""

    def __init__(self, pid: int, conn: Connection) -> None:
        self.pid = pid
        self.conn = conn

    def send(self, obj: Any) -> None:
        self.conn.send(obj)

    def recv(self, timeout: float = 60.0) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"worker {self.pid} said nothing for {timeout:.0f} s")
        try:
            msg = self.conn.recv()
        except (EOFError, OSError):
            raise RuntimeError(f"worker {self.pid} went away") from None
        if isinstance(msg, tuple) and len(msg) == 2 and msg[0] == "__error__":
            raise RuntimeError(f"worker {self.pid}: {msg[1]}")
        return msg

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()


class Workers:
    """A fork server (a process that imported ``preload`` once) and the workers forked from it.

    ``spawn("pkg.module:function", *args)`` forks a worker that calls ``function(conn, *args)``
    with ``conn`` its control connection (a multiprocessing Connection to this process); the
    worker ends when the function returns. On ``close`` (the end of the ``with`` block) every
    worker still running is killed and the fork server waits for them all, so their CPU time
    is counted as this run's (see :func:`cpu_busy`).
    """

    def __init__(self, tmp: Path, preload: Sequence[str] = ("numpy", "dxg.client")) -> None:
        self.tmp = tmp
        self.ctl = str(tmp / "workers.ctl")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.ctl)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.ctl)
        self.listener.listen(256)
        self.workers: list[Worker] = []
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
                   MKL_NUM_THREADS="1")
        with open(tmp / "workers.log", "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _RUN_ZYGOTE, str(os.getpid()), str(int(signal.SIGKILL)),
                 str(tmp), *preload], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env,
                start_new_session=True)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def spawn(self, target: str, *args: Any, timeout: float = 60.0) -> Worker:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"target": target, "ctl": self.ctl}).encode() + b"\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            raise RuntimeError(f"the fork server did not answer (see {self.tmp}/workers.log)")
        pid = int(json.loads(line)["pid"])
        self.listener.settimeout(timeout)
        try:
            sock, _ = self.listener.accept()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            raise RuntimeError(f"worker {pid} did not connect (see {self.tmp}/workers.log)"
                               ) from None
        sock.setblocking(True)
        conn = Connection(sock.detach())
        worker = Worker(pid, conn)
        self.workers.append(worker)
        try:
            hello = worker.recv(timeout)
            if hello != pid:  # workers are forked one at a time: the next to connect is this one
                raise RuntimeError(f"worker {pid} answered as {hello!r}")
            conn.send(args)
        except BaseException:
            worker.kill()
            raise
        return worker

    def close(self) -> None:
        try:
            for w in self.workers:
                w.kill()
                w.close()
            if self.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    self.proc.stdin.close()
            try:
                self.proc.wait(30)  # it kills and waits for what it forked, then exits
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.ctl)


def _zygote_main() -> None:
    """The fork server: import what the workers use, then fork one worker per request line."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the bench decides when it ends
    for name in sys.argv[2:]:  # argv[1]: the bench's directory (so `ps` tells whose it is)
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    children: set[int] = set()

    def reap(block: bool = False) -> None:
        while children:
            try:
                pid, _ = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                children.clear()
                return
            if pid == 0:
                return
            children.discard(pid)

    try:
        while True:
            ready, _, _ = select.select([stdin], [], [], 0.2)
            reap()
            if not ready:
                continue
            line = stdin.readline()
            if not line:
                break
            req = json.loads(line)
            pid = os.fork()
            if pid == 0:
                _worker_main(req["target"], req["ctl"])  # never returns
            children.add(pid)
            stdout.write(json.dumps({"pid": pid}).encode() + b"\n")
            stdout.flush()
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        reap(block=True)


def _worker_main(target: str, ctl: str) -> None:
    code = 0
    try:
        zygote = os.getppid()
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != zygote:
            os._exit(1)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.close(null)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(ctl)
        conn = Connection(sock.detach())
        conn.send(os.getpid())
        args = conn.recv()
        module, _, name = target.partition(":")
        try:
            getattr(importlib.import_module(module), name)(conn, *args)
        except BaseException as e:
            code = 1
            with contextlib.suppress(Exception):
                conn.send(("__error__", f"{type(e).__name__}: {e}"))
            traceback.print_exc()
    except BaseException:
        code = 1
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(code)
