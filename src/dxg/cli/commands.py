"""The sub-commands. Heavy imports happen inside each command so `dxg ls` stays light."""

import argparse
import errno
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from dxg.uapi.nodepath import default_node_path


def describe_error(e: BaseException) -> str:
    """One line for any failure a user can hit."""
    from dxg.vmbus.transport import TransportError

    if isinstance(e, TransportError):
        # its text already says what failed: "cannot reach ..." or "cannot listen on ..."
        text = e.strerror or str(e)
        return f"host unreachable: {text}" if text.startswith("cannot reach") else text
    if isinstance(e, PermissionError):
        return f"permission denied: {e.filename or e}"
    if isinstance(e, OSError) and e.errno == errno.EADDRINUSE:
        return str(e.strerror or e)
    text = str(e) or type(e).__name__
    return text.splitlines()[0]


def _node_path(args: argparse.Namespace) -> Path:
    return Path(args.node) if args.node else default_node_path()


_STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


def _hold_stop_signals() -> None:
    """Before any thread starts: keep SIGINT/SIGTERM for `_wait_for_signal` (every thread
    started later inherits the mask), so a stop request is never lost to a handler racing a
    lock, nor delivered to a worker thread."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)


def _wait_for_signal() -> None:
    signal.sigwait(_STOP_SIGNALS)
    # A second Ctrl-C or TERM while shutting down ends the process at once.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def _serve_node(drv: Any, args: argparse.Namespace) -> list[Any]:
    """Start the socket node (and the FUSE device file if asked); returns what to close."""
    from dxg.node.server import SocketNode

    path = _node_path(args)
    node = SocketNode(drv, str(path), mode=args.mode, group=args.group,
                      max_connections=args.max_connections, max_per_uid=args.max_per_uid)
    node.start()
    closers: list[Any] = [node]
    hint = "" if path == default_node_path() else "; clients need DXG_NODE set to it"
    print(f"node: {path} (mode {args.mode:04o}{hint})", flush=True)
    if args.dev_node:
        from dxg.node.fuse import FuseNode

        fuse = FuseNode(drv, args.dev_node, mode=args.mode)
        try:
            fuse.start()
        except BaseException:
            node.close()
            raise
        closers.append(fuse)
        print(f"device file: {args.dev_node}", flush=True)
    return closers


def _adapter_line(index: int, luid: str, description: str, host: str = "",
                  memory: Any = None) -> str:
    """``adapter 0: 0x…  pydxg Soft GPU (NumPy), 1.0G local + 4.0G non-local``."""
    from dxg.cli.views import human_bytes

    text = f"adapter {index}: {luid}  {description}{host}"
    if isinstance(memory, dict):
        local, far = (memory.get(g, {}).get("total") for g in ("local", "nonlocal"))
        text += f", {human_bytes(local)} local + {human_bytes(far)} non-local"
    return text


def _print_host_adapters(host: Any) -> None:
    """A host's adapters, one line each, with the LUIDs its guests see."""
    for a in host.census()["adapters"]:
        print(_adapter_line(a["index"], f"0x{a['guest_luid']:016x}", a["name"],
                            memory=a.get("memory")), flush=True)


def _print_guest_adapters(drv: Any, wait: float) -> None:
    """The guest's adapters, one line each, once every connected host's have come up (or
    after ``wait`` seconds: the rest are logged as they come, with -v)."""

    def settled() -> bool:
        snap = drv.snapshot()
        hosts = {h["index"] for h in snap["hosts"] if h["connected"]}
        have = {a["host"] for a in snap["adapters"]}
        return hosts <= have and all(a["state"] != "WAITING_VMBUS" for a in snap["adapters"])

    drv.wait_for(settled, wait)
    snap = drv.snapshot()
    several = len(snap["hosts"]) > 1
    for h in snap["hosts"]:
        print(f"guest: bound host {h['address']}" if h["connected"] else
              f"guest: host {h['address']} is not reachable yet; retrying", flush=True)
    for a in snap["adapters"]:
        host = f" (host {a['host']})" if several else ""
        state = "" if a["state"] == "ACTIVE" else f" [{a['state'].lower()}]"
        print(_adapter_line(a["index"], a["luid"], a["description"] + state, host), flush=True)


def raise_fd_limit() -> None:
    """Let a daemon serve as many clients as the system allows it descriptors (each client is
    one socket, and one FUSE open is one more): the soft limit goes up to the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def raise_priority(nice: int) -> None:
    """Run the daemon ahead of its clients, as a kernel driver would not compete with the
    processes it serves: with many busy clients on few cores, a daemon at the same priority gets
    a client's share of the CPU and every client waits for it. Done before any thread starts
    (they inherit it: NumPy's BLAS starts its threads when it is first imported, so this runs
    before the host is); a user not allowed to raise priority keeps the default, silently."""
    import contextlib

    if nice < 0:
        with contextlib.suppress(PermissionError, OSError):
            os.setpriority(os.PRIO_PROCESS, 0, nice)


def single_threaded_blas() -> None:
    """The host's engine gives each command buffer one slot, one core
    (dxg.host.scheduler): BLAS must then run on the thread that calls it, or one GEMM takes
    every core and two queues side by side gain nothing. A big GEMM gets the idle cores back by
    fanning out over idle slots (dxg.backends.fanout). Process-wide (BLAS's thread
    count is), so it is set here, by the daemon, after NumPy has loaded BLAS."""
    import numpy  # noqa: F401  (loads BLAS, so that its thread pool can be found)
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")


def _load_policy(args: argparse.Namespace) -> Any:
    """The guest's policy from --policy and the quota flags, read before anything starts (a
    bad file stops the command with one line saying what to fix)."""
    from dxg.guest.policy import load_policy

    policy = load_policy(args.policy, memory_per_process=args.memory_per_process,
                         memory_per_uid=args.memory_per_uid, compute_share=args.compute_share)
    if (args.policy or args.memory_per_process is not None or args.memory_per_uid is not None
            or args.compute_share is not None):
        print(policy.describe(), flush=True)
    return policy


def _listening(what: str, bound: str) -> None:
    """Say where a bus listener is, and warn when other machines can reach it."""
    from dxg.cli.preflight import public_listener_warning

    print(f"{what} {bound}", flush=True)
    warning = public_listener_warning(bound)
    if warning:
        print(f"dxg: {warning}", file=sys.stderr, flush=True)


def _serve_metrics(args: argparse.Namespace, *collectors: Any) -> Any:
    """The daemon's metrics endpoint when ``--metrics`` asks for one (None otherwise)."""
    if not args.metrics:
        return None
    from dxg.cli.metrics import MetricsServer

    server = MetricsServer(args.metrics, *collectors)
    print(f"metrics: {server.url}", flush=True)
    if server.public:
        print(f"dxg: warning: the metrics at {server.url} name processes and users and have no "
              "authentication: serve them on 127.0.0.1 unless this network is trusted",
              file=sys.stderr, flush=True)
    return server


def _check_metrics_address(args: argparse.Namespace) -> None:
    if args.metrics:
        from dxg.cli.metrics import parse_metrics_address

        parse_metrics_address(args.metrics)


def cmd_up(args: argparse.Namespace) -> int:
    from dxg.cli.preflight import check_node_free

    check_node_free(_node_path(args))  # before anything starts: another daemon's node?
    _check_metrics_address(args)
    policy = _load_policy(args)
    _hold_stop_signals()
    raise_fd_limit()
    raise_priority(args.priority)  # before NumPy starts BLAS's threads: they inherit it
    single_threaded_blas()
    from dxg.guest.driver import GuestDriver
    from dxg.host.config import HostConfig
    from dxg.host.host import Host
    from dxg.runtime.loop import LoopThread

    # Host, guest and node share one event loop, and the guest reaches the host over an
    # in-process link: a call crosses no thread and no extra socket, and no socket file is left
    # behind if the process is killed.
    rt = LoopThread("dxg-up")
    host = Host(HostConfig(adapters=args.adapters, name="pydxg-embedded-host",
                           dedicated_memory_mb=args.dedicated_memory,
                           shared_memory_mb=args.shared_memory,
                           guest_memory=args.guest_memory, tdr_seconds=args.tdr), loop=rt)
    closers: list[Any] = []
    drv = GuestDriver(loop=rt, policy=policy)
    try:
        if args.host_listen:
            _listening("host: also listening on", host.listen(args.host_listen))
        drv.bind_host(host)
        if not drv.wait_for_adapters(args.adapters, 30):
            raise RuntimeError("the embedded host's adapters did not come up")
        closers = _serve_node(drv, args)
        _print_host_adapters(host)  # the guest's LUIDs, with the host's memory
        if args.metrics:
            from dxg.cli.metrics import GuestCollector

            closers.append(_serve_metrics(args, GuestCollector(drv)))
        _wait_for_signal()
    finally:
        for c in reversed(closers):
            c.close()
        drv.close()
        host.close()
        rt.close()
    return 0


def cmd_host(args: argparse.Namespace) -> int:
    _check_metrics_address(args)
    _hold_stop_signals()
    raise_fd_limit()
    raise_priority(args.priority)  # before NumPy starts BLAS's threads: they inherit it
    single_threaded_blas()
    from dxg.host.config import HostConfig
    from dxg.host.host import Host

    cfg = HostConfig(adapters=args.adapters, host_id=args.host_id, offer_order=args.offer_order,
                     dedicated_memory_mb=args.dedicated_memory,
                     shared_memory_mb=args.shared_memory, guest_memory=args.guest_memory,
                     tdr_seconds=args.tdr)
    if args.name:
        cfg.name = args.name
    host = Host(cfg)
    metrics = None
    try:
        for addr in args.listen:
            _listening("host: listening on", host.listen(addr))
        _print_host_adapters(host)
        if args.metrics:
            from dxg.cli.metrics import HostCollector

            metrics = _serve_metrics(args, HostCollector(host))
        _wait_for_signal()
    finally:
        if metrics is not None:
            metrics.close()
        host.close()
    return 0


def cmd_guest(args: argparse.Namespace) -> int:
    from dxg.cli.preflight import check_node_free
    from dxg.guest.driver import GuestDriver

    check_node_free(_node_path(args))  # before anything starts: another daemon's node?
    _check_metrics_address(args)
    policy = _load_policy(args)
    _hold_stop_signals()
    raise_fd_limit()
    raise_priority(args.priority)
    drv = GuestDriver(heartbeat_timeout=args.heartbeat_timeout,
                      heartbeat_interval=min(1.0, args.heartbeat_timeout / 3), policy=policy)
    closers: list[Any] = []
    try:
        for addr in args.connect:
            drv.bind(addr, wait=args.wait)
        closers = _serve_node(drv, args)
        _print_guest_adapters(drv, 5.0)
        if args.metrics:
            from dxg.cli.metrics import GuestCollector

            closers.append(_serve_metrics(args, GuestCollector(drv)))
        _wait_for_signal()
    finally:
        for c in reversed(closers):
            c.close()
        drv.close()
    return 0


# ---- tools ------------------------------------------------------------------------------------


def _open(args: argparse.Namespace) -> Any:
    from dxg.client import open_node

    # No --node: the default path, whose directory the client checks before it trusts it.
    return open_node(args.node or None)


def cmd_ls(args: argparse.Namespace) -> int:
    from dxg.cli.listing import run_ls

    return run_ls(args)


def cmd_ps(args: argparse.Namespace) -> int:
    from dxg.cli.listing import run_ps

    return run_ps(args)


def cmd_top(args: argparse.Namespace) -> int:
    from dxg.cli.top import run_top

    return run_top(args)


def cmd_cdi(args: argparse.Namespace) -> int:
    from dxg.cli.cdi import run_cdi

    return run_cdi(args)


def cmd_wait(args: argparse.Namespace) -> int:
    from dxg.client import NodeError

    deadline = time.monotonic() + args.timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            with _open(args) as node:
                if len(node.adapters()) >= args.adapters:
                    return 0
        except (NodeError, OSError) as e:
            last = e
        time.sleep(0.1)
    raise TimeoutError(f"node {_node_path(args)} not ready after {args.timeout:.0f}s"
                       + (f": {describe_error(last)}" if last else ""))


def cmd_demo(args: argparse.Namespace) -> int:
    from dxg.cli.demo import run_demo

    return run_demo(args.node or None)


def cmd_uapi_header(args: argparse.Namespace) -> int:
    from dxg.uapi.cheader import render_header

    sys.stdout.write(render_header())
    return 0


def cmd_ioctls(args: argparse.Namespace) -> int:
    from dxg.node import support

    sys.stdout.write(support.render_ioctls_doc() if args.markdown else support.render_plain())
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from dxg.bench.runner import run_bench

    return run_bench(args)
