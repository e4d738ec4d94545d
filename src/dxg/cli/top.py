"""`dxg top`: a live view of the adapters and the processes on them, in the manner of nvitop.

Per adapter: utilization and a bar, this guest's submissions waiting and its jobs running on
the engine, memory used and a bar. Per process and adapter: memory, measured utilization,
compute share (where the host's census gives one), state. Each frame compares a fresh sample
with the previous one (dxg.cli.views: utilization is engine time over host time), so the first
frame shows "-" until there is a second sample.

A frame fits the terminal (80x24 over SSH included): lists that do not fit end in "… N more".
`q` (or Ctrl-C) quits; the terminal is restored however the view ends (dxg.cli.terminal).
``--once`` prints one frame, measured over ``--interval``, for scripts and tests.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

from dxg.cli.listing import fit, percent, plural, sample_pair, table
from dxg.cli.views import AdapterView, ProcessView, View, build_view, human_bytes, take_sample

__all__ = ["render_frame", "run_top"]

Line = tuple[str, str]  # (text, style: "", "title" or "header")

_EIGHTHS = " ▏▎▍▌▋▊▉"


def bar(fraction: float | None, width: int, ascii_only: bool = False) -> str:
    """``[████▌    ]``: ``fraction`` (0..1) of ``width`` columns, brackets included; blank when
    not known."""
    inner = max(1, width - 2)
    if fraction is None:
        return "[" + " " * inner + "]"
    fraction = min(1.0, max(0.0, fraction))
    if ascii_only:
        filled = round(fraction * inner)
        return "[" + "#" * filled + "." * (inner - filled) + "]"
    eighths = round(fraction * inner * 8)
    full, part = divmod(eighths, 8)
    body = "█" * full + (_EIGHTHS[part] if part else "")
    return "[" + body.ljust(inner) + "]"


def _adapter_lines(a: AdapterView, several_hosts: bool, width: int,
                   ascii_only: bool) -> list[str]:
    """Two lines: GPU (utilization, queue) and MEM (local memory)."""
    name = f"{a.index:>2} 0x{a.luid:016x}" + (f" h{a.host}" if several_hosts else "")
    if a.state != "ACTIVE":
        return [fit(f"{name}  {a.state.lower()}", width), ""]
    queue = f"  queue {a.queued if a.queued is not None else '-':>3}" \
            f"  run {a.running if a.running is not None else '-'}/{a.slots or '-'}"
    util = percent(a.utilization).rjust(4)
    mem = a.local.fraction
    used = f"  {a.local.text()}"
    bar_width = max(8, width - len(name) - 2 - 4 - 4 - 1 - max(len(queue), len(used)))
    busy = None if a.utilization is None else a.utilization / 100
    gpu = f"{name}  GPU {util} {bar(busy, bar_width, ascii_only)}{queue}"
    memline = (" " * len(name) + f"  MEM {percent(None if mem is None else mem * 100):>4} "
               f"{bar(mem, bar_width, ascii_only)}{used}")
    return [fit(gpu, width), fit(memline, width)]


def _process_rows(procs: Sequence[ProcessView]) -> list[list[str]]:
    shares = any(p.share is not None for p in procs)
    rows = []
    for p in procs:
        row = [str(p.pid), str(p.adapter), "-" if p.uid is None else str(p.uid), p.name,
               human_bytes(p.memory), percent(p.utilization)]
        if shares:
            row.append("-" if p.share is None else str(p.share))
        row += [str(p.queued if p.queued is not None else "-"), p.state]
        rows.append(row)
    return rows


def render_frame(view: View, node: str, width: int = 80, height: int = 24,
                 clock: str | None = None, ascii_only: bool = False,
                 live: bool = False) -> list[Line]:
    """One frame of at most ``width`` columns and ``height`` rows (``live``: with the key
    that quits)."""
    width, height = max(20, width), max(5, height)
    clock = clock or time.strftime("%H:%M:%S")
    nprocs = len({p.pid for p in view.processes})
    title = (f"dxg top  {clock}  {plural(len(view.adapters), 'adapter')}, "
             f"{plural(nprocs, 'process')}{'  q quits' if live else ''}  node {node}")
    lines: list[Line] = [(fit(title, width), "title")]

    # Adapters: two lines each, as many as leave room for the process header and one row.
    room = height - len(lines) - 3
    shown = list(view.adapters)
    if 2 * len(shown) > room:
        keep = max(0, (room - 1) // 2)
        hidden = len(shown) - keep
        shown = shown[:keep]
    else:
        hidden = 0
    for a in shown:
        lines += [(text, "") for text in _adapter_lines(a, view.several_hosts, width, ascii_only)]
    if hidden:
        lines.append((fit(f"… {hidden} more adapters", width), ""))
    if not view.adapters:
        lines.append(("no adapters (is a host bound to this guest?)", ""))

    # Processes: busiest first, then by memory; cut to the rows left.
    procs = sorted(view.processes, key=lambda p: (-(p.utilization or 0.0), -(p.memory or 0),
                                                  p.pid, p.adapter))
    header = ["PID", "#", "UID", "NAME", "MEMORY", "GPU%"]
    if any(p.share is not None for p in procs):
        header.append("SHARE")
    header += ["QUEUED", "STATE"]
    right = [h not in ("NAME", "STATE") for h in header]
    left = height - len(lines) - 1  # rows under the process header
    if left < 1:
        if procs and left == 0:
            lines.append((fit(f"… {plural(len(procs), 'process')}", width), ""))
        procs = []
    elif not procs:
        lines.append((fit("no processes hold objects on an adapter", width), ""))
    else:
        more = 0
        if len(procs) > left:
            more = len(procs) - (left - 1)
            procs = procs[: left - 1]
        rows = [fit(r, width) for r in table(header, _process_rows(procs), right, squeeze=3,
                                             width=width)]
        lines.append((rows[0].ljust(width)[:width], "header"))
        lines += [(r, "") for r in rows[1:]]
        if more:
            lines.append((fit(f"… {more} more", width), ""))
    # The hosts, when there is room left and more than one.
    if view.several_hosts:
        for h in view.hosts:
            if len(lines) >= height:
                break
            state = "" if h.connected else " (not connected)"
            lines.append((fit(f"h{h.index}: {h.address} {h.name}{state}", width), ""))
    if ascii_only:
        lines = [(t.replace("…", "~"), s) for t, s in lines]
    return lines[:height]


def _ascii_only(stream: object) -> bool:
    encoding = getattr(stream, "encoding", None) or "ascii"
    try:
        "█…▏".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return True
    return False


def _open(args: argparse.Namespace) -> Any:
    from dxg.client import open_node

    return open_node(args.node or None)


def run_top(args: argparse.Namespace) -> int:
    from dxg.uapi.nodepath import default_node_path

    node_path = args.node or str(default_node_path())
    me = os.getpid()
    ascii_only = _ascii_only(sys.stdout)
    if args.once:
        with _open(args) as node:
            prev, cur = sample_pair(node, args.interval, strict=True)
        view, _ = build_view(cur, prev, exclude_pid=me)
        size = shutil.get_terminal_size((80, 24))
        for text, _style in render_frame(view, node_path, size.columns, size.lines,
                                         ascii_only=ascii_only):
            print(text.rstrip())
        return 0
    if not sys.stdout.isatty():
        raise ValueError("stdout is not a terminal: use `dxg top --once` for one frame")
    from dxg.cli.terminal import Terminal

    with _open(args) as node:
        cur = take_sample(node)
        prev = None
        with Terminal(sys.stdin.fileno(), sys.stdout) as term:
            while True:
                view, _ = build_view(cur, prev, exclude_pid=me)
                # The first frame has no utilization yet: the second comes soon.
                wait = args.interval if prev is not None else min(args.interval, 0.3)
                next_at = time.monotonic() + wait
                while True:
                    width, height = term.size()
                    term.draw(render_frame(view, node_path, width, height,
                                           ascii_only=ascii_only, live=True), width, height)
                    keys = term.wait_key(next_at - time.monotonic())
                    if keys is None:
                        break  # time for the next sample
                    if "q" in keys.lower() or "\x03" in keys:
                        return 0
                prev, cur = cur, take_sample(node)
    return 0
