"""`dxg top`: the live view in a real terminal (tmux, 80x24, against `dxg up` and a client
doing work), the terminal given back when it quits, and frames that fit 80x24 whatever they
hold."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import client, read_json_line, wait_until
from dxg.cli.top import render_frame
from dxg.cli.views import AdapterView, HostView, ProcessView, Usage, View

DXG = [sys.executable, "-m", "dxg.cli.main"]


class Tmux:
    """A tmux server of its own (its own socket) with one 80x24 pane running bash."""

    def __init__(self, sock: Path) -> None:
        self.sock = str(sock)
        self.run("new-session", "-d", "-s", "top", "-x", "80", "-y", "24",
                 "bash --norc --noprofile")

    def run(self, *args: str) -> str:
        r = subprocess.run(["tmux", "-S", self.sock, *args], capture_output=True, text=True,
                           timeout=30, check=False)
        assert r.returncode == 0, f"tmux {args[0]}: {r.stderr}"
        return r.stdout

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "top")

    def flags(self) -> dict[str, str]:
        """The pane's alternate-screen and cursor-visible flags."""
        out = self.run("display-message", "-p", "-t", "top", "#{alternate_on} #{cursor_flag}")
        alternate, cursor = out.split()
        return {"alternate": alternate, "cursor": cursor}

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "top", *keys)

    def wait_for(self, pattern: str, timeout: float, what: str) -> re.Match[str]:
        found = wait_until(lambda: re.search(pattern, self.screen(), re.M), timeout, what)
        return found  # type: ignore[no-any-return]

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.sock, "kill-server"], capture_output=True,
                       timeout=30, check=False)


@pytest.fixture
def up(tmp_path: Path):
    """`dxg up` in a child process; yields its node path."""
    node = str(tmp_path / "dxg.sock")
    proc = subprocess.Popen([*DXG, "up", "--node", node, "--priority", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        r = subprocess.run([*DXG, "wait", "--node", node, "--adapters", "2", "--timeout", "60"],
                           capture_output=True, text=True, timeout=90, check=False)
        assert r.returncode == 0, r.stderr
        yield node
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""


def test_top_in_tmux_quits_with_q_and_ctrl_c_and_restores_the_terminal(tmp_path, up):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (scripts/setup.sh installs it): `dxg top` in a "
                    "terminal is NOT tested")
    busy = client("busy", up, 0)
    tmux = None
    try:
        pid = read_json_line(busy, 60)["pid"]
        # One script per run: top, then its exit status and the terminal's modes after it.
        script = tmp_path / "run.sh"
        script.write_text(
            f"cd {os.getcwd()}\n"
            f"DXG_NODE={up} {' '.join(DXG)} top --interval 0.3\n"
            'echo "TOP-EXIT=$?"\n'
            "stty -a | tr ' ;' '\\n\\n' | grep -E '^-?(icanon|echo)$' | tr '\\n' ' ' "
            "| sed 's/^/MODES: /'\n"
            "echo\n")
        tmux = Tmux(tmp_path / "tmux.sock")
        for quit_keys, status in ((("q",), 0), (("C-c",), 130)):
            tmux.keys("clear", "Enter")
            tmux.keys(f"bash {script}", "Enter")
            # the client's row: its pid, adapter 0, and the engine time it is using
            row = tmux.wait_for(rf"^\s*{pid}\s+0\s+.*\s(\d+)%\s+.*running\s*$", 60,
                                f"the busy client's row in `dxg top` ({quit_keys[0]})")
            screen = tmux.screen().splitlines()
            assert screen[0].startswith("dxg top") and "q quits" in screen[0]
            assert re.search(r"^\s*0 0x[0-9a-f]{16}\s+GPU\s+\d+%", "\n".join(screen), re.M)
            assert len(screen) <= 24 and all(len(line) <= 80 for line in screen)
            assert tmux.flags() == {"alternate": "1", "cursor": "0"}
            assert int(row.group(1)) >= 0
            tmux.keys(*quit_keys)
            tmux.wait_for(rf"^TOP-EXIT={status}$", 30, f"`dxg top` ending on {quit_keys[0]}")
            modes = tmux.wait_for(r"^MODES: (.*)$", 10, "the terminal's modes").group(1)
            assert modes.split() == ["icanon", "echo"], modes  # not -icanon, -echo
            assert tmux.flags() == {"alternate": "0", "cursor": "1"}
            assert "Traceback" not in tmux.screen()
    finally:
        if tmux is not None:
            tmux.close()
        busy.stdin.close()
        busy.wait(timeout=60)


def test_top_needs_a_terminal_or_once(up):
    r = subprocess.run([*DXG, "top", "--node", up], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 1
    assert r.stderr == ("dxg top: stdout is not a terminal: use `dxg top --once` for one "
                        "frame\n")


def test_top_once_shows_the_work_measured(up):
    busy = client("busy", up, 1)
    try:
        pid = read_json_line(busy, 60)["pid"]

        def frame() -> list[str]:
            r = subprocess.run([*DXG, "top", "--once", "--interval", "0.3", "--node", up],
                               capture_output=True, text=True, timeout=60, check=False,
                               env=dict(os.environ, COLUMNS="80", LINES="24"))
            assert r.returncode == 0, r.stderr
            return r.stdout.splitlines()

        def busy_row() -> list[str] | None:
            lines = frame()
            rows = [ln for ln in lines if re.match(rf"\s*{pid}\s+1\s", ln)]
            if rows and re.search(r"\s([1-9]\d*)%\s", rows[0]) and "running" in rows[0]:
                return lines
            return None

        lines = wait_until(busy_row, 60, "the busy client using adapter 1")
        assert len(lines) <= 24 and all(len(line) <= 80 for line in lines)
        gpu = [ln for ln in lines if re.match(r"\s*1 0x[0-9a-f]{16}\s+GPU", ln)]
        assert gpu and not re.search(r"GPU\s+0%", gpu[0]), lines
    finally:
        busy.stdin.close()
        busy.wait(timeout=60)


# ---- frames, with no stack ------------------------------------------------------------------------


def _view(adapters: int, processes: int, hosts: int = 1) -> View:
    ads = tuple(AdapterView(index=i, luid=0x1000 + i, host=i % hosts, description="soft",
                            state="ACTIVE", vendor_id=0x1414, device_id=0x8C,
                            local=Usage(i << 20, 1 << 30), nonlocal_=Usage(0, 4 << 30),
                            utilization=float(10 * i), running=i % 2, queued=i, slots=2)
                for i in range(adapters))
    procs = tuple(ProcessView(pid=1000 + n, uid=0, name=f"a-rather-long-process-name-{n}",
                              adapter=n % adapters, luid=0x1000 + n % adapters, devices=1,
                              contexts=1, allocations=1, queues=1, fences=2, queued=0,
                              running=0, memory=n << 20, budget=None,
                              utilization=float(n % 7), share=1 + n % 3, state="idle")
                  for n in range(processes))
    hs = tuple(HostView(index=h, address=f"tcp:10.0.0.{h}:7700", name="pydxg-host",
                        connected=True, error=None, totals={}) for h in range(hosts))
    return View(ads, procs, hs, 1.0)


@pytest.mark.parametrize(("adapters", "processes", "hosts"),
                         [(2, 40, 1), (4, 3, 2), (12, 5, 2), (1, 0, 1)])
def test_a_frame_fits_80x24_and_says_what_it_left_out(adapters, processes, hosts):
    lines = [text for text, _ in render_frame(_view(adapters, processes, hosts), "/run/n.sock",
                                              80, 24, clock="12:00:00")]
    assert len(lines) <= 24 and all(len(line) <= 80 for line in lines), "\n".join(lines)
    text = "\n".join(lines)
    rows = [ln for ln in lines if re.match(r"\s*10\d\d\s", ln)]
    shown_adapters = len(re.findall(r"^\s*\d+ 0x[0-9a-f]{16}", text, re.M))
    if shown_adapters < adapters:
        assert f"… {adapters - shown_adapters} more adapters" in text
    if len(rows) < processes:
        assert f"… {processes - len(rows)} more" in text
    if processes == 0:
        assert "no processes hold objects on an adapter" in text
    if hosts > 1 and shown_adapters > 1:
        assert " h1 " in text or " h1" in text
    assert lines[0].startswith("dxg top  12:00:00")


def test_a_frame_in_ascii_and_in_a_small_terminal():
    view = _view(3, 30, 2)
    lines = [t for t, _ in render_frame(view, "/n", 40, 10, ascii_only=True)]
    assert len(lines) <= 10 and all(len(line) <= 40 for line in lines)
    assert all(ch.isascii() for line in lines for ch in line), lines
    wide = [t for t, _ in render_frame(view, "/n", 120, 50)]
    assert all(len(line) <= 120 for line in wide) and len(wide) <= 50
    assert not any("more" in line for line in wide)  # everything fits


def test_utilization_is_engine_time_over_host_time():
    """Two samples: engine time grown over the host's time and the slots; build_view leaves
    the samples as they were (dxg top keeps them)."""
    from dxg.cli.views import Sample, build_view

    snap = {"adapters": [{"index": 0, "luid": "0x10", "host": 0, "state": "ACTIVE"}],
            "hosts": [{"index": 0, "address": "local", "connected": True}],
            "processes": [{"pid": 7, "name": "app", "adapters": [
                {"adapter": 0, "devices": 1, "contexts": 0}]}]}
    census = {"hosts": [{"index": 0, "census": {"id": 1, "now_ns": 2_000_000_000, "adapters": [
        {"index": 0, "work": {"engine_busy_ns": 500_000_000, "slots": 2}}],
        "processes": [{"pid": 7, "handle": 5, "work": [
            {"adapter": 0, "engine_busy_ns": 500_000_000}]}]}}]}
    before = json.dumps([snap, census], sort_keys=True)
    first = Sample(snap, census, 0.0)
    later = json.loads(before)
    later[1]["hosts"][0]["census"]["now_ns"] = 3_000_000_000
    later[1]["hosts"][0]["census"]["adapters"][0]["work"]["engine_busy_ns"] = 1_500_000_000
    later[1]["hosts"][0]["census"]["processes"][0]["work"][0]["engine_busy_ns"] = 1_000_000_000
    view, _ = build_view(Sample(later[0], later[1], 1.0), first)
    assert json.dumps([snap, census], sort_keys=True) == before
    # 1 s of engine time in 1 s on 2 slots: 50%; the process used 0.5 s of it: 25%
    assert view.adapters[0].utilization == 50.0
    assert view.processes[0].utilization == 25.0 and view.processes[0].state == "running"
    # a different partition (the guest reconnected): no rate, not a wrong one
    later[1]["hosts"][0]["census"]["id"] = 2
    view, _ = build_view(Sample(later[0], later[1], 1.0), first)
    assert view.adapters[0].utilization is None and view.processes[0].utilization is None


def test_nonsense_in_a_census_never_breaks_a_view():
    """A host's census is its word: any value anywhere in it (wrong types, NaN, huge numbers)
    gives "-" where it cannot be read, never an exception, in `ps`, `top` and the JSON."""
    import math
    import random

    from dxg.cli.listing import ps_lines
    from dxg.cli.views import Sample, build_view

    snap = {"adapters": [{"index": 0, "luid": "0x10", "host": 0, "state": "ACTIVE"}],
            "hosts": [{"index": 0, "address": "local", "connected": True}],
            "processes": [{"pid": 7, "name": "app", "adapters": [
                {"adapter": 0, "devices": 1, "contexts": 0}]}]}
    inner = {"id": 1, "now_ns": 2, "totals": {"processes": 1}, "adapters": [
        {"index": 0, "guest_luid": 16, "memory": {"local": {"used": 1, "total": 2}},
         "work": {"engine_busy_ns": 5, "slots": 2, "queued": 1}}],
        "processes": [{"pid": 7, "handle": 5, "allocations": 1,
                       "memory": [{"adapter": 0, "local": 3, "local_budget": 4}],
                       "devices": [{"adapter": 0, "contexts": [{"hwqueues": [{}]}]}],
                       "compute": {"share": 1, "adapters": [{"adapter": 0, "share": 2}]},
                       "work": [{"adapter": 0, "engine_busy_ns": 5, "fences": 1}]}]}
    junk = [None, [], {}, "x", -1, 1.5, True, [1], {"a": 1}, 2**70, "0x12", math.nan]
    rng = random.Random(10)

    def mutate(obj):
        if isinstance(obj, dict):
            return {k: rng.choice(junk) if rng.random() < 0.15 else mutate(v)
                    for k, v in obj.items()}
        if isinstance(obj, list):
            return [rng.choice(junk) if rng.random() < 0.15 else mutate(v) for v in obj]
        return obj

    for _ in range(500):
        samples = [Sample(snap, {"hosts": [{"index": 0, "census": mutate(inner)}]}, t)
                   for t in (0.0, 1.0)]
        view, detail = build_view(samples[1], samples[0])
        ps_lines(view)
        render_frame(view, "/n")
        json.dumps(detail)
