"""`dxg ls` and `dxg ps`: the adapters, and the processes that hold objects on them, in tables
that fit 80 columns (an SSH session, a default terminal) unless ``--wide`` is asked; ``--json``
gives the same figures in the one number format of dxg.cli.views."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from dxg.cli.views import (
    AdapterView,
    Sample,
    View,
    build_view,
    flag_names,
    human_bytes,
    json_form,
    short_flags,
    take_sample,
)

__all__ = ["WIDTH", "fit", "ls_lines", "percent", "plural", "print_ps", "ps_lines", "run_ls",
           "run_ps", "sample_pair", "table"]

WIDTH = 80  # what the default tables fit in


def _open(args: argparse.Namespace) -> Any:
    from dxg.client import open_node

    # No --node: the default path, whose directory the client checks before it trusts it.
    return open_node(args.node or None)


def sample_pair(node: Any, interval: float, strict: bool) -> tuple[Sample | None, Sample]:
    """Two samples ``interval`` seconds apart (utilization is measured between them); one when
    ``interval`` is 0 (no utilization)."""
    first = take_sample(node, strict)
    if interval <= 0:
        return None, first
    time.sleep(interval)
    return first, take_sample(node, strict)


def percent(value: float | None) -> str:
    """``42%``; None (not measured) is ``-``."""
    return "-" if value is None else f"{value:.0f}%"


def plural(n: int, noun: str) -> str:
    """``1 process``, ``2 processes``."""
    if n == 1:
        return f"1 {noun}"
    return f"{n} {noun}es" if noun.endswith("s") else f"{n} {noun}s"


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


# ---- a table of fixed columns -------------------------------------------------------------------


def table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool],
          squeeze: int | None = None, width: int | None = WIDTH) -> list[str]:
    """Lines of a table, numbers right-aligned, two spaces between columns (one when two do not
    fit ``width``, None: no limit). Column ``squeeze`` (a name) is then cut with "…" so that
    the lines fit."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    gap = 2
    if width is not None and sum(widths) + gap * (len(widths) - 1) > width:
        gap = 1
        over = sum(widths) + len(widths) - 1 - width
        if squeeze is not None and over > 0:
            widths[squeeze] = max(4, widths[squeeze] - over)

    def cell(text: str, i: int) -> str:
        w = widths[i]
        if len(text) > w:
            text = text[: w - 1] + "…"
        return text.rjust(w) if right[i] else text.ljust(w)

    return [(" " * gap).join(cell(c, i) for i, c in enumerate(r)).rstrip()
            for r in (list(header), *rows)]


def fit(line: str, width: int | None = WIDTH) -> str:
    """``line`` cut to ``width`` columns, ending in "…" when cut."""
    if width is None or len(line) <= width:
        return line
    return line[: width - 1] + "…"


def host_lines(view: View, width: int | None = WIDTH) -> list[str]:
    """One line per bound host: its index (the ``host`` column), address, name, state."""
    out = []
    for h in view.hosts:
        label = f"host {h.index}" if view.several_hosts else "host"
        state = "" if h.connected else f", not connected ({h.error or 'gone'})"
        name = f" ({h.name})" if h.name and h.name not in h.address else ""
        out.append(fit(f"{label}: {h.address}{name}{state}", width))
    return out


# ---- dxg ls -------------------------------------------------------------------------------------


def ls_rows(adapters: Sequence[Any], view: View) -> list[dict[str, Any]]:
    """One row per adapter the caller enumerates (``adapters``: client adapters, in their
    order), with the view's figures for it."""
    by_luid = {a.luid: a for a in view.adapters}
    rows = []
    for i, ad in enumerate(adapters):
        v: AdapterView | None = by_luid.get(ad.luid)
        row: dict[str, Any] = {
            "index": i, "handle": ad.handle, "luid": ad.luid, "vendor_id": ad.vendor_id,
            "device_id": ad.device_id, "description": ad.description, "flags": flag_names(ad),
            "host": v.host if v is not None else None,
            "memory": (v.as_json()["memory"] if v is not None else
                       {g: {"used": None, "total": None} for g in ("local", "nonlocal")}),
            "utilization": v.utilization if v is not None else None,
            "running": v.running if v is not None else None,
            "queued": v.queued if v is not None else None,
            "slots": v.slots if v is not None else None,
        }
        rows.append(row)
    return rows


def _used_total(group: dict[str, int | None]) -> str:
    if group["used"] is None and group["total"] is None:
        return "-"
    return f"{human_bytes(group['used'])}/{human_bytes(group['total'])}"


def ls_lines(rows: Sequence[dict[str, Any]], view: View, wide: bool = False) -> list[str]:
    """The `dxg ls` table: 80 columns (the handle, ids and description only with ``wide``)."""
    Col = tuple[str, bool, Callable[[dict[str, Any]], str]]  # header, right-aligned, cell
    cols: list[Col] = [("#", True, lambda r: str(r["index"])),
                       ("LUID", False, lambda r: f"0x{r['luid']:016x}")]
    if wide:
        cols += [("handle", False, lambda r: f"0x{r['handle']:08x}"),
                 ("vendor", False, lambda r: f"0x{r['vendor_id']:04x}"),
                 ("device", False, lambda r: f"0x{r['device_id']:04x}")]
    if view.several_hosts:
        cols.append(("host", True, lambda r: _dash(r["host"])))
    cols += [("local", True, lambda r: _used_total(r["memory"]["local"])),
             ("non-local", True, lambda r: _used_total(r["memory"]["nonlocal"])),
             ("GPU%", True, lambda r: percent(r["utilization"]))]
    if wide:
        cols += [("queued", True, lambda r: _dash(r["queued"])),
                 ("flags", False, lambda r: ", ".join(r["flags"])),
                 ("description", False, lambda r: r["description"])]
    else:
        cols.append(("flags", False, lambda r: short_flags(r["flags"])))
    width = None if wide else WIDTH
    lines = table([c[0] for c in cols], [[c[2](r) for c in cols] for r in rows],
                  [c[1] for c in cols], squeeze=len(cols) - 1, width=width)
    lines += host_lines(view, width)
    if not rows:
        lines.append("no adapters (is a host bound to this guest?)")
    return lines


def run_ls(args: argparse.Namespace) -> int:
    with _open(args) as node:
        adapters = node.adapters()
        # The figures are the node owner's (admin requests): anyone else sees the adapters
        # without them ("-").
        prev, cur = sample_pair(node, args.interval, strict=False)
        view, _ = build_view(cur, prev, visible=[a.luid for a in adapters])
        rows = ls_rows(adapters, view)
    if args.json:
        print(json.dumps(json_form({"interval": view.interval, "adapters": rows}), indent=2))
        return 0
    _print_lines(ls_lines(rows, view, args.wide))
    return 0


# ---- dxg ps -------------------------------------------------------------------------------------


def _adapter_heading(a: AdapterView, view: View, width: int | None) -> str:
    host = f" host {a.host}" if view.several_hosts else ""
    state = "" if a.state == "ACTIVE" else f" [{a.state.lower()}]"
    queued = f" queued {a.queued}" if a.queued else ""
    return fit(f"adapter {a.index} 0x{a.luid:016x}{host}{state}  GPU {percent(a.utilization)}"
               f"{queued}  local {a.local.text()}", width)


def ps_lines(view: View, wide: bool = False) -> list[str]:
    """The `dxg ps` tables: per adapter, its processes (only those that hold objects on it),
    every table with the same columns."""
    width = None if wide else WIDTH
    shares = any(p.share is not None for p in view.processes)
    header = ["pid", "uid", "name", "ctx", "queues", "fences", "memory", "budget", "GPU%"]
    if shares:
        header.append("share")
    header.append("state")
    right = [h not in ("name", "state") for h in header]
    rows: list[list[str]] = []
    owners: list[int] = []  # the adapter of each row
    for p in view.processes:
        row = [str(p.pid), _dash(p.uid), p.name, str(p.contexts), _dash(p.queues),
               _dash(p.fences), human_bytes(p.memory), p.budget_text(), percent(p.utilization)]
        if shares:
            row.append(_dash(p.share))
        rows.append([*row, p.state])
        owners.append(p.adapter)
    head, *lines = table(header, rows, right, squeeze=2,
                         width=None if width is None else width - 2)
    out: list[str] = []
    for a in view.adapters:
        if out:
            out.append("")
        out.append(_adapter_heading(a, view, width))
        mine = [ln for ln, owner in zip(lines, owners, strict=True) if owner == a.index]
        out += ["  " + ln for ln in [head, *mine]] if mine else ["  no processes"]
    out.append("")
    for h, line in zip(view.hosts, host_lines(view, None), strict=True):
        t = h.totals
        held = (f": {plural(t.get('processes', 0), 'process')}, "
                f"{plural(t.get('devices', 0), 'device')}, "
                f"{plural(t.get('contexts', 0), 'context')}" if t else "")
        out.append(fit(line + held, width))
    return out


def print_ps(view: View, wide: bool = False) -> None:
    _print_lines(ps_lines(view, wide))


def run_ps(args: argparse.Namespace) -> int:
    with _open(args) as node:
        prev, cur = sample_pair(node, args.interval, strict=True)
    view, snapshot = build_view(cur, prev, exclude_pid=os.getpid())
    if args.json:
        data = {"interval": view.interval,
                "adapters": [a.as_json() for a in view.adapters],
                "snapshot": snapshot, "census": cur.census}
        print(json.dumps(json_form(data), indent=2))
        return 0
    print_ps(view, args.wide)
    return 0


def _print_lines(lines: Sequence[str]) -> None:
    sys.stdout.write("".join(line + "\n" for line in lines))
