"""`--metrics`: the daemons serve Prometheus metrics read from the live objects. Real daemons
(`dxg up`, `dxg host` + `dxg guest`), real clients doing work, scraped over HTTP (urllib) and
parsed with prometheus_client's text parser."""

import os
import queue
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import client, read_json_line, wait_until


class Daemon:
    """A `dxg` daemon process and its stdout lines (read on a thread, so waiting for one line
    never depends on how the pipe was buffered)."""

    def __init__(self, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "DXG_NODE"}
        self.proc = subprocess.Popen([sys.executable, "-m", "dxg.cli.main", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def line(self, prefix: str, timeout: float = 60.0) -> str:
        """The next stdout line starting with ``prefix`` (waited for, with a deadline)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise AssertionError(f"{self.proc.args} exited: "
                                     f"{self.proc.stderr.read()[-2000:]}")
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        raise AssertionError(f"{self.proc.args} printed no {prefix!r} line in {timeout}s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def running(*args: str) -> Iterator[Daemon]:
    daemon = Daemon(*args)
    try:
        yield daemon
    finally:
        daemon.stop()


def scrape(url: str) -> dict[str, list]:
    """Metric family name -> its samples."""
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(families: dict[str, list], sample: str, **labels: str) -> float:
    """The one sample named ``sample`` whose labels include ``labels``."""
    family = sample.removesuffix("_total").removesuffix("_bucket").removesuffix(
        "_count").removesuffix("_sum")
    found = [s for s in families.get(family, []) if s.name == sample
             and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, f"{sample}{labels}: {found}"
    return float(found[0].value)


def test_dxg_up_metrics_count_real_work(tmp_path: Path):
    node = str(tmp_path / "n.sock")
    with running("up", "--node", node, "--adapters", "2", "--metrics", "127.0.0.1:0") as up:
        url = up.line("metrics: ")
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        first = scrape(url)
        luids = {s.labels["adapter"]: s.labels["luid"] for s in first["dxg_adapter_info"]}
        assert set(luids) == {"0", "1"}
        assert value(first, "dxg_adapter_memory_total_bytes", adapter="0",
                     segment="local") == 1024 << 20
        assert value(first, "dxg_adapter_submissions_total", adapter="0") == 0
        # a client computes on adapter 0 (submissions, a fence wait) and keeps its memory
        worker = client("metered", node)
        try:
            held = read_json_line(worker)
            after = scrape(url)
            pid = str(held["pid"])
            assert value(after, "dxg_adapter_submissions_total", adapter="0") >= 1
            assert value(after, "dxg_adapter_commands_total", adapter="0") >= 1
            assert value(after, "dxg_adapter_engine_busy_seconds_total", adapter="0") > 0
            assert value(after, "dxg_adapter_fence_waits_total", adapter="0", kind="cpu") >= 1
            assert value(after, "dxg_adapter_processes", adapter="0") == 1
            assert value(after, "dxg_adapter_memory_used_bytes", adapter="0",
                         segment="local") >= held["bytes"]
            assert value(after, "dxg_process_memory_bytes", pid=pid, adapter="0",
                         segment="local") >= held["bytes"]
            assert value(after, "dxg_process_submissions_total", pid=pid, adapter="0") >= 1
            assert value(after, "dxg_process_faults_total", pid=pid, adapter="0") == 0
            # the guest's dispatcher timed every ioctl
            creates = value(after, "dxg_ioctl_duration_seconds_count", ioctl="LX_DXCREATEDEVICE")
            assert creates >= 1
            assert value(after, "dxg_ioctl_duration_seconds_bucket", ioctl="LX_DXCREATEDEVICE",
                         le="+Inf") == creates
            assert value(after, "dxg_ioctl_duration_seconds_sum", ioctl="LX_DXCREATEDEVICE") > 0
            assert value(after, "dxg_host_up", host="0") == 1
            assert "process_cpu_seconds" in after  # the daemon's own process metrics
        finally:
            worker.stdin.close()
            worker.wait(timeout=30)
        # the process is gone: its memory with it, its work still counted on the adapter
        gone = wait_until(lambda: (f := scrape(url)) and not any(
            s.labels.get("pid") == pid for s in f["dxg_process_memory_bytes"]) and f,
            what="the client's metrics to go")
        assert value(gone, "dxg_adapter_memory_used_bytes", adapter="0", segment="local") == 0
        assert value(gone, "dxg_adapter_submissions_total", adapter="0") >= 1


def test_host_and_guest_daemons_serve_metrics(tmp_path: Path):
    bus, node = str(tmp_path / "host.sock"), str(tmp_path / "n.sock")
    with running("host", "--listen", bus, "--adapters", "1", "--metrics", "0") as host:
        host_url = host.line("metrics: ")
        with running("guest", "--connect", bus, "--node", node, "--metrics", ":0") as guest:
            guest_url = guest.line("metrics: ")
            worker = client("metered", node)
            try:
                held = read_json_line(worker)
                h = scrape(host_url)
                g = scrape(guest_url)
            finally:
                worker.stdin.close()
                worker.wait(timeout=30)
    assert value(h, "dxg_host_guests") == 1
    [part] = {s.labels["guest"] for s in h["dxg_host_requests"]}
    assert value(h, "dxg_adapter_submissions_total", adapter="0", guest=part) >= 1
    assert value(h, "dxg_process_memory_bytes", pid=str(held["pid"]), guest=part,
                 segment="local") >= held["bytes"]
    assert value(g, "dxg_adapter_submissions_total", adapter="0") >= 1
    assert value(g, "dxg_ioctl_duration_seconds_count", ioctl="LX_DXCREATEDEVICE") >= 1


@pytest.mark.parametrize("address", ["nohost:port", "70000", "[::1]:x"])
def test_a_bad_metrics_address_stops_the_daemon_before_it_starts(tmp_path, address):
    r = subprocess.run([sys.executable, "-m", "dxg.cli.main", "up", "--node",
                        str(tmp_path / "n.sock"), "--metrics", address],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "not an address" in r.stderr
