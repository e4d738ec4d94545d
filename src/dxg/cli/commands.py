"""The sub-commands. Heavy imports happen inside each command so `dxg ls` stays light."""

import argparse
import errno
import json
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


def console() -> Any:
    """A rich console; wide when writing to a pipe or file, so tables do not wrap."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)


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
    print(f"node: {path} (mode {args.mode:04o})", flush=True)
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
    every core and two queues side by side gain nothing. A lone big GEMM gets the idle cores
    back by fanning out over idle slots (dxg.backends.fanout). Process-wide (BLAS's thread
    count is), so it is set here, by the daemon, after NumPy has loaded BLAS."""
    import numpy  # noqa: F401  (loads BLAS, so that its thread pool can be found)
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")


def _load_policy(args: argparse.Namespace) -> Any:
    """The guest's policy from --policy and the quota flags, read before anything starts (a
    bad file stops the command with one line saying what to fix)."""
    from dxg.guest.policy import load_policy

    policy = load_policy(args.policy, memory_per_process=args.memory_per_process,
                         memory_per_uid=args.memory_per_uid)
    if args.policy or args.memory_per_process is not None or args.memory_per_uid is not None:
        print(policy.describe(), flush=True)
    return policy


def cmd_up(args: argparse.Namespace) -> int:
    if args.adapters < 1:
        raise ValueError("--adapters must be at least 1")
    policy = _load_policy(args)
    _hold_stop_signals()
    raise_fd_limit()
    raise_priority(args.priority)  # before NumPy starts BLAS's threads: they inherit it
    single_threaded_blas()
    from dxg.guest.driver import GuestDriver
    from dxg.host.config import HostConfig
    from dxg.host.host import Host
    from dxg.runtime.loop import LoopThread

    node_path = _node_path(args)
    # Host, guest and node share one event loop, and the guest reaches the host over an
    # in-process link: a call crosses no thread and no extra socket, and no socket file is left
    # behind if the process is killed.
    rt = LoopThread("dxg-up")
    host = Host(HostConfig(adapters=args.adapters, name="pydxg-embedded-host",
                           dedicated_memory_mb=args.dedicated_memory,
                           shared_memory_mb=args.shared_memory,
                           guest_memory=args.guest_memory), loop=rt)
    closers: list[Any] = []
    drv = GuestDriver(loop=rt, policy=policy)
    try:
        if args.host_listen:
            print(f"host: also listening on {host.listen(args.host_listen)}", flush=True)
        drv.bind_host(host)
        if not drv.wait_for_adapters(args.adapters, 30):
            raise RuntimeError("the embedded host's adapters did not come up")
        closers = _serve_node(drv, args)
        print(f"pydxg up: {args.adapters} CPU soft adapter(s); clients use DXG_NODE={node_path}",
              flush=True)
        _wait_for_signal()
    finally:
        for c in reversed(closers):
            c.close()
        drv.close()
        host.close()
        rt.close()
    return 0


def cmd_host(args: argparse.Namespace) -> int:
    _hold_stop_signals()
    raise_fd_limit()
    raise_priority(args.priority)  # before NumPy starts BLAS's threads: they inherit it
    single_threaded_blas()
    from dxg.host.config import HostConfig
    from dxg.host.host import Host

    cfg = HostConfig(adapters=args.adapters, host_id=args.host_id, offer_order=args.offer_order,
                     dedicated_memory_mb=args.dedicated_memory,
                     shared_memory_mb=args.shared_memory, guest_memory=args.guest_memory)
    if args.name:
        cfg.name = args.name
    host = Host(cfg)
    try:
        for addr in args.listen:
            print(f"host: listening on {host.listen(addr)}", flush=True)
        _wait_for_signal()
    finally:
        host.close()
    return 0


def cmd_guest(args: argparse.Namespace) -> int:
    from dxg.guest.driver import GuestDriver

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
            print(f"guest: bound host {addr}", flush=True)
        closers = _serve_node(drv, args)
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


_FLAG_NAMES = ("paravirtualized", "compute_only", "render_supported", "display_supported",
               "software", "hybrid_discrete", "hybrid_integrated")


def adapter_flags(adapter: Any) -> list[str]:
    """The set bits of the adapter's D3DKMT_ADAPTERTYPE, as names."""
    t = adapter.adapter_type
    return [name for name in _FLAG_NAMES if getattr(t, name)]


# ---- memory figures from the host census -------------------------------------------------------
#
# Each host's census (node.admin({"op": "census"}): one entry per bound host, its partition's
# census inside) reports per adapter {"memory": {"local": {"total", "used"}, "nonlocal": ...}}
# (host-wide segment use) and per process {"memory": [{"adapter", "local", "nonlocal"}],
# "allocations"}, adapters by the host's own index. The guest snapshot numbers adapters across
# all hosts and says which host link each is on. A census without these figures (an older host)
# leaves them None, shown as "-".

_GROUPS = ("local", "nonlocal")


def human_bytes(n: int | None) -> str:
    """``12.0M``, ``1.0G``, ``512``; None (unknown) is ``-``."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{int(value)}" if not unit else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _luid_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            return None
    return None


def _host_censuses(census: dict[str, Any]) -> dict[Any, dict[str, Any]]:
    """Host link index -> that host's census (hosts that answered)."""
    out = {}
    for host in census.get("hosts") or []:
        c = host.get("census") if isinstance(host, dict) else None
        if isinstance(c, dict):
            out[host.get("index")] = c
    return out


def match_adapters(snapshot: dict[str, Any], census: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Guest adapter index -> its entry in its host's census ("index" is the host's number).
    By LUID where the census gives one, else by position: a host's adapters reach the guest in
    the host's order (vGPU channel relid = first relid + host index)."""
    hosts = _host_censuses(census)
    by_link: dict[Any, list[dict[str, Any]]] = {}
    for ad in snapshot.get("adapters") or []:
        by_link.setdefault(ad.get("host"), []).append(ad)
    out: dict[int, dict[str, Any]] = {}
    for link, ads in by_link.items():
        c = hosts.get(link)
        if c is None:
            continue
        entries = sorted((e for e in c.get("adapters") or [] if isinstance(e, dict)),
                         key=lambda e: e.get("index", 0))
        by_luid = {_luid_int(e.get(k)): e for e in entries for k in ("luid", "guest_luid")
                   if e.get(k) is not None}
        positional = len(entries) == len(ads)
        for pos, ad in enumerate(sorted(ads, key=lambda a: a["index"])):
            entry = by_luid.get(_luid_int(ad.get("luid")))
            if entry is None and positional:
                entry = entries[pos]
            if entry is not None:
                out[ad["index"]] = entry
    return out


def adapter_memory(entry: dict[str, Any] | None) -> dict[str, dict[str, int | None]]:
    """{"local": {"used", "total"}, "nonlocal": {...}} of a census adapter entry (None where
    the census does not say)."""
    mem = entry.get("memory") if isinstance(entry, dict) else None
    out: dict[str, dict[str, int | None]] = {}
    for group in _GROUPS:
        g = mem.get(group) if isinstance(mem, dict) else None
        g = g if isinstance(g, dict) else {}
        out[group] = {"used": _int_or_none(g.get("used")), "total": _int_or_none(g.get("total"))}
    return out


def _process_budget(proc: dict[str, Any], host_adapter: int) -> dict[str, int | None] | None:
    """{"local", "nonlocal", "limit"} of a census process on one host adapter: the budgets
    QueryVideoMemoryInfo answers it (dxg.host.memory.Segments.info) and the quota that binds
    it (None: none); None where the census does not say."""
    for u in proc.get("memory") or []:
        if isinstance(u, dict) and u.get("adapter") == host_adapter and "local_budget" in u:
            return {"local": _int_or_none(u.get("local_budget")),
                    "nonlocal": _int_or_none(u.get("nonlocal_budget")),
                    "limit": _int_or_none(u.get("limit"))}
    return None


def _process_bytes(proc: dict[str, Any], host_adapter: int | None = None) -> int | None:
    """local + non-local bytes of a census process (on one host adapter, or on all)."""
    usages = proc.get("memory")
    if not isinstance(usages, list):
        return None
    total = 0
    for u in usages:
        if isinstance(u, dict) and (host_adapter is None or u.get("adapter") == host_adapter):
            total += sum(_int_or_none(u.get(g)) or 0 for g in _GROUPS)
    return total


def join_memory(data: dict[str, Any]) -> dict[str, Any]:
    """Add the census's memory figures to the snapshot's processes, in place: per process
    ``memory`` (bytes over all adapters, local + non-local) and ``allocations``, per adapter link
    ``memory`` (bytes on that adapter); None where the census does not say."""
    snap, census = data["snapshot"], data.get("census") or {}
    hosts = _host_censuses(census)
    matched = match_adapters(snap, census)
    links = {ad["index"]: ad.get("host") for ad in snap.get("adapters") or []}
    for p in snap.get("processes") or []:
        theirs = [(link, cp) for link, c in hosts.items() for cp in c.get("processes") or []
                  if isinstance(cp, dict) and cp.get("pid") == p["pid"]]
        sums = [_process_bytes(cp) for _, cp in theirs]
        known = [n for n in sums if n is not None]
        p["memory"] = sum(known) if known else None
        counts = [_int_or_none(cp.get("allocations")) for _, cp in theirs]
        p["allocations"] = sum(n for n in counts if n is not None) \
            if any(n is not None for n in counts) else None
        for link in p.get("adapters") or []:
            entry = matched.get(link.get("adapter"))
            host_index = entry.get("index") if entry is not None else None
            per = [_process_bytes(cp, host_index) for lk, cp in theirs
                   if lk == links.get(link.get("adapter"))] if host_index is not None else []
            known = [n for n in per if n is not None]
            link["memory"] = sum(known) if known else None
            budgets = [_process_budget(cp, host_index) for lk, cp in theirs
                       if lk == links.get(link.get("adapter"))] if host_index is not None else []
            link["budget"] = next((b for b in budgets if b is not None), None)
            work = [_process_work(cp, host_index) for lk, cp in theirs
                    if lk == links.get(link.get("adapter"))] if host_index is not None else []
            link["queues"] = sum(w[0] for w in work) if work else None
            link["executed"] = sum(w[1] for w in work) if work else None
    return data


def _budget_text(budget: dict[str, int | None] | None) -> str:
    if not budget:
        return "-"
    return f"{human_bytes(budget['local'])}/{human_bytes(budget['nonlocal'])}"


def _or_dash(value: Any) -> str:
    return "-" if value is None else str(value)


def _process_work(cp: dict[str, Any], adapter: int) -> tuple[int, int]:
    """(hardware queues, command buffers run) of a host process on one adapter."""
    queues = executed = 0
    for dev in cp.get("devices") or []:
        if not isinstance(dev, dict) or dev.get("adapter") != adapter:
            continue
        for ctx in dev.get("contexts") or []:
            if isinstance(ctx, dict):
                queues += len(ctx.get("hwqueues") or [])
                executed += _int_or_none(ctx.get("executed")) or 0
    return queues, executed


def _adapter_rows(node: Any) -> list[dict[str, Any]]:
    snap, census = _census_and_snapshot(node)
    matched = match_adapters(snap, census)
    guest_index = {_luid_int(ad.get("luid")): ad["index"] for ad in snap.get("adapters") or []}
    rows = []
    for i, ad in enumerate(node.adapters()):
        rows.append({
            "index": i,
            "handle": f"0x{ad.handle:08x}",
            "luid": f"0x{ad.luid:016x}",
            "vendor_id": f"0x{ad.vendor_id:04x}",
            "device_id": f"0x{ad.device_id:04x}",
            "description": ad.description,
            "flags": adapter_flags(ad),
            "memory": adapter_memory(matched.get(guest_index.get(ad.luid, -1))),
        })
    return rows


def _census_and_snapshot(node: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The guest snapshot and the host census; empty ones where the node could not say."""
    from dxg.client import DxgError

    out = []
    for op in ("snapshot", "census"):
        try:
            reply = node.admin({"op": op})
        except DxgError:
            reply = {}
        out.append(reply if isinstance(reply, dict) else {})
    return out[0], out[1]


def _used_total(group: dict[str, int | None]) -> str:
    if group["used"] is None and group["total"] is None:
        return "-"
    return f"{human_bytes(group['used'])}/{human_bytes(group['total'])}"


def cmd_ls(args: argparse.Namespace) -> int:
    with _open(args) as node:
        rows = _adapter_rows(node)
    if args.json:
        print(json.dumps({"adapters": rows}, indent=2))
        return 0
    from rich.table import Table

    t = Table(title=f"adapters on {_node_path(args)}")
    for col in ("#", "handle", "LUID", "vendor", "device", "description", "flags"):
        t.add_column(col)
    t.add_column("local", justify="right", no_wrap=True)
    t.add_column("non-local", justify="right", no_wrap=True)
    for r in rows:
        t.add_row(str(r["index"]), r["handle"], r["luid"], r["vendor_id"], r["device_id"],
                  r["description"], ", ".join(r["flags"]), _used_total(r["memory"]["local"]),
                  _used_total(r["memory"]["nonlocal"]))
    console().print(t)
    if not rows:
        print("no adapters (is a host bound to this guest?)")
    return 0


def _ps_data(node: Any) -> dict[str, Any]:
    snap = node.admin({"op": "snapshot"})
    census = node.admin({"op": "census"})
    return join_memory({"snapshot": snap, "census": census})


def cmd_ps(args: argparse.Namespace) -> int:
    with _open(args) as node:
        data = _ps_data(node)
        me = os.getpid()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print_ps(data, exclude_pid=me)
    return 0


def print_ps(data: dict[str, Any], exclude_pid: int | None = None) -> None:
    from rich.table import Table

    snap = join_memory(data)["snapshot"]
    out = console()
    for ad in snap["adapters"]:
        t = Table(title=f"adapter {ad['index']} {ad['luid']} {ad['description']} [{ad['state']}]")
        for col in ("pid", "uid", "name", "devices", "contexts"):
            t.add_column(col)
        t.add_column("memory", justify="right")
        t.add_column("budget", justify="right")  # local / non-local, as QueryVideoMemoryInfo
        t.add_column("queues", justify="right")
        t.add_column("work", justify="right")
        n = 0
        for p in snap["processes"]:
            if p["pid"] == exclude_pid:
                continue
            for link in p["adapters"]:
                if link["adapter"] == ad["index"]:
                    t.add_row(str(p["pid"]), _or_dash(p.get("uid")), p["name"],
                              str(link["devices"]), str(link["contexts"]),
                              human_bytes(link.get("memory")), _budget_text(link.get("budget")),
                              _or_dash(link.get("queues")), _or_dash(link.get("executed")))
                    n += 1
        if n:
            out.print(t)
        else:
            out.print(f"adapter {ad['index']} {ad['luid']}: no processes")
    for host in data["census"]["hosts"]:
        c = host.get("census")
        if c is None:
            out.print(f"host {host['address']}: {host.get('error')}")
            continue
        totals = c.get("totals", {})
        out.print(f"host {host['address']}: holds "
                      + ", ".join(f"{v} {k}" for k, v in totals.items()))


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
