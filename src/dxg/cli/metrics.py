"""`--metrics ADDR`: a daemon's Prometheus endpoint (``http://ADDR/metrics``).

Every figure is read from the live objects when Prometheus scrapes, never kept twice: a
:class:`GuestCollector` (``dxg up``, ``dxg guest``) reads the guest driver's snapshot, each bound
host's census of this guest's partition (memory, the statistics counters: command buffers run,
engine time, faults, resets, fence waits) and the driver's own ioctl latency histograms; a
:class:`HostCollector` (``dxg host``) reads the host's census of every guest's partition. Each
daemon has its own ``CollectorRegistry`` (no global registry, no module state), served by
prometheus-client's HTTP server on a thread of its own. Metric names: docs/running.md.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

__all__ = ["GuestCollector", "HostCollector", "MetricsServer", "parse_metrics_address"]

SCRAPE_TIMEOUT = 10.0  # seconds a scrape waits for the hosts' censuses
_SEGMENTS = ("local", "nonlocal")
_NS = 1e-9


def parse_metrics_address(text: str) -> tuple[str, int]:
    """(host, port) of ``--metrics``: ``PORT``, ``:PORT``, ``HOST:PORT`` or ``[V6]:PORT``; the
    host defaults to 127.0.0.1 (the metrics name processes: keep them on this machine unless
    asked). Port 0 picks a free one. Raises ValueError with what to write."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        raise ValueError(f"--metrics {text!r}: not an address (use PORT, HOST:PORT or "
                         "[V6]:PORT, e.g. 127.0.0.1:9464)")
    return host, number


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MetricsServer:
    """One daemon's metrics endpoint: its registry and the HTTP server thread serving it."""

    def __init__(self, address: str, *collectors: Collector) -> None:
        host, port = parse_metrics_address(address)
        self.registry = CollectorRegistry()
        for collector in collectors:
            self.registry.register(collector)
        ProcessCollector(registry=self.registry)  # the daemon's own CPU, memory, descriptors
        self._server, self._thread = start_http_server(port, host, registry=self.registry)
        bound = self._server.server_address
        shown = f"[{bound[0]}]" if ":" in str(bound[0]) else str(bound[0])
        self.url = f"http://{shown}:{bound[1]}/metrics"
        self.public = not _loopback(host)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


# ---- the families ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Labels:
    """Label names of the per-adapter and per-process families: the adapter's (index, LUID)
    and its place (``host`` link on a guest, ``guest`` partition on a host)."""

    adapter: tuple[str, ...]
    process: tuple[str, ...]


class _Families:
    """The metric families one scrape fills."""

    def __init__(self, labels: _Labels) -> None:
        a, p = list(labels.adapter), list(labels.process)
        self.adapter_info = GaugeMetricFamily(
            "dxg_adapter_info", "An adapter (value 1) with its description and state",
            labels=[*a, "description", "state"])
        self.adapter_memory_used = GaugeMetricFamily(
            "dxg_adapter_memory_used_bytes", "Device memory committed on the adapter, by "
            "segment group (all guests of its host)", labels=[*a, "segment"])
        self.adapter_memory_total = GaugeMetricFamily(
            "dxg_adapter_memory_total_bytes", "The adapter's segment group capacity",
            labels=[*a, "segment"])
        self.adapter_processes = GaugeMetricFamily(
            "dxg_adapter_processes", "Processes that hold objects on the adapter", labels=a)
        self.adapter_submissions = CounterMetricFamily(
            "dxg_adapter_submissions", "Command buffers the adapter ran to their end",
            labels=a)
        self.adapter_commands = CounterMetricFamily(
            "dxg_adapter_commands", "Commands in those command buffers", labels=a)
        self.adapter_busy = CounterMetricFamily(
            "dxg_adapter_engine_busy_seconds", "Engine time spent on the adapter's work",
            labels=a)
        self.adapter_faults = CounterMetricFamily(
            "dxg_adapter_faults", "Devices that left the ACTIVE state with an error", labels=a)
        self.adapter_resets = CounterMetricFamily(
            "dxg_adapter_resets", "Devices reset (MarkDeviceAsError)", labels=a)
        self.adapter_waits = CounterMetricFamily(
            "dxg_adapter_fence_waits", "Waits on fences: from the CPU (kind=cpu) and queued "
            "on a context (kind=gpu)", labels=[*a, "kind"])
        self.adapter_running = GaugeMetricFamily(
            "dxg_adapter_running_jobs", "Jobs on the adapter's engine now", labels=a)
        self.adapter_queued = GaugeMetricFamily(
            "dxg_adapter_queued_submissions", "Submissions waiting or running", labels=a)
        self.process_memory = GaugeMetricFamily(
            "dxg_process_memory_bytes", "Device memory a process has committed, by segment "
            "group", labels=[*p, "segment"])
        self.process_submissions = CounterMetricFamily(
            "dxg_process_submissions", "Command buffers of the process run to their end",
            labels=p)
        self.process_busy = CounterMetricFamily(
            "dxg_process_engine_busy_seconds", "Engine time spent on the process's work",
            labels=p)
        self.process_faults = CounterMetricFamily(
            "dxg_process_faults", "The process's devices that faulted", labels=p)
        self.process_waits = CounterMetricFamily(
            "dxg_process_fence_waits", "The process's waits on fences (kind=cpu|gpu)",
            labels=[*p, "kind"])

    def all(self) -> list[Metric]:
        return [v for v in vars(self).values() if isinstance(v, Metric)]

    def adapter_work(self, labels: list[str], work: dict[str, Any]) -> None:
        """The partition census's ``work`` of an adapter (dxg.host.statistics.adapter_work)."""
        self.adapter_submissions.add_metric(labels, _num(work.get("command_buffers")))
        self.adapter_commands.add_metric(labels, _num(work.get("commands")))
        self.adapter_busy.add_metric(labels, _num(work.get("engine_busy_ns")) * _NS)
        self.adapter_faults.add_metric(labels, _num(work.get("faults")))
        self.adapter_resets.add_metric(labels, _num(work.get("resets")))
        self.adapter_waits.add_metric([*labels, "cpu"], _num(work.get("cpu_waits")))
        self.adapter_waits.add_metric([*labels, "gpu"], _num(work.get("gpu_waits")))
        self.adapter_running.add_metric(labels, _num(work.get("running")))
        self.adapter_queued.add_metric(labels, _num(work.get("queued")))

    def adapter_memory(self, labels: list[str], memory: Any) -> None:
        for segment in _SEGMENTS:
            group = memory.get(segment) if isinstance(memory, dict) else None
            if isinstance(group, dict):
                self.adapter_memory_used.add_metric([*labels, segment], _num(group.get("used")))
                self.adapter_memory_total.add_metric([*labels, segment],
                                                     _num(group.get("total")))

    def process(self, labels: list[str], memory: dict[str, Any] | None,
                work: dict[str, Any] | None) -> None:
        for segment in _SEGMENTS:
            self.process_memory.add_metric([*labels, segment],
                                           _num((memory or {}).get(segment)))
        work = work or {}
        self.process_submissions.add_metric(labels, _num(work.get("command_buffers")))
        self.process_busy.add_metric(labels, _num(work.get("engine_busy_ns")) * _NS)
        self.process_faults.add_metric(labels, _num(work.get("faults")))
        self.process_waits.add_metric([*labels, "cpu"], _num(work.get("cpu_waits")))
        self.process_waits.add_metric([*labels, "gpu"], _num(work.get("gpu_waits")))


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _by_adapter(entries: Any) -> dict[int, dict[str, Any]]:
    """A census list of per-adapter entries (``{"adapter": i, ...}``), by adapter index."""
    out: dict[int, dict[str, Any]] = {}
    for e in entries if isinstance(entries, list) else ():
        if isinstance(e, dict) and isinstance(e.get("adapter"), int):
            out[e["adapter"]] = e
    return out


def _partition_processes(fam: _Families, census: dict[str, Any],
                         adapter_labels: dict[int, list[str]],
                         process_labels: Any) -> dict[int, int]:
    """Per-process families of one partition census; returns processes per host adapter."""
    users: dict[int, int] = {}
    for proc in census.get("processes") or []:
        if not isinstance(proc, dict):
            continue
        memory = _by_adapter(proc.get("memory"))
        work = _by_adapter(proc.get("work"))
        for index in sorted({*memory, *work}):
            labels = adapter_labels.get(index)
            if labels is None:
                continue
            users[index] = users.get(index, 0) + 1
            fam.process([*process_labels(proc), labels[0], labels[1]], memory.get(index),
                        work.get(index))
    return users


# ---- the guest daemon ----------------------------------------------------------------------------


class GuestCollector(Collector):
    """What a guest driver serves: its adapters (as its clients number them) and processes,
    with their hosts' figures for this guest, and its ioctl latency histograms."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver
        self.latency = driver.observe_ioctls()

    def describe(self) -> list[Metric]:
        return []  # (no collect() at registration: the daemon may not be up yet)

    def _read(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        drv = self.driver

        async def both() -> tuple[dict[str, Any], list[dict[str, Any]]]:
            return drv.snapshot(), await drv.host_census()

        return drv.rt.run(both(), timeout=SCRAPE_TIMEOUT)

    def collect(self) -> Iterator[Metric]:
        from dxg.cli.views import match_adapters

        snap, hosts = self._read()
        fam = _Families(_Labels(("adapter", "luid", "host"),
                                ("pid", "name", "uid", "adapter", "luid")))
        up = GaugeMetricFamily("dxg_host_up", "Whether the guest reaches the host (1) or not",
                               labels=["host", "address"])
        for h in snap.get("hosts") or []:
            up.add_metric([str(h.get("index")), str(h.get("address"))],
                          1.0 if h.get("connected") else 0.0)
        matched = match_adapters(snap, {"hosts": hosts})
        censuses = {h.get("index"): h.get("census") for h in hosts
                    if isinstance(h.get("census"), dict)}
        # (host link, host adapter index) -> the guest's labels of that adapter
        by_host: dict[Any, dict[int, list[str]]] = {}
        for ad in snap.get("adapters") or []:
            labels = [str(ad["index"]), str(ad.get("luid")), str(ad.get("host"))]
            fam.adapter_info.add_metric([*labels, str(ad.get("description")),
                                         str(ad.get("state"))], 1.0)
            entry = matched.get(ad["index"])
            if entry is None:
                continue
            by_host.setdefault(ad.get("host"), {})[entry.get("index")] = labels
            fam.adapter_memory(labels, entry.get("memory"))
            if isinstance(entry.get("work"), dict):
                fam.adapter_work(labels, entry["work"])
        names = {p["pid"]: p for p in snap.get("processes") or []}

        def process_labels(proc: dict[str, Any]) -> list[str]:
            mine = names.get(proc.get("pid"), {})
            return [str(proc.get("pid")), str(mine.get("name", proc.get("name", ""))),
                    str(mine.get("uid", ""))]

        for link, census in censuses.items():
            adapter_labels = by_host.get(link, {})
            users = _partition_processes(fam, census, adapter_labels, process_labels)
            for index, labels in adapter_labels.items():
                fam.adapter_processes.add_metric(labels, float(users.get(index, 0)))
        yield up
        yield from fam.all()
        yield from self._latency()

    def _latency(self) -> Iterator[Metric]:
        from dxg import uapi

        hist = HistogramMetricFamily("dxg_ioctl_duration_seconds", "Time the guest driver "
                                     "took to answer each ioctl", labels=["ioctl"])
        errors = CounterMetricFamily("dxg_ioctl_errors", "ioctls answered with an error",
                                     labels=["ioctl"])
        bounds = self.latency.bounds
        for nr, series in sorted(self.latency.snapshot().items(), key=lambda kv: str(kv[0])):
            desc = uapi.IOCTLS.get(nr) if isinstance(nr, int) else None
            name = desc.name if desc is not None else f"unknown_{nr}"
            buckets, running = [], 0
            for bound, n in zip((*map(repr, bounds), "+Inf"), series.counts, strict=True):
                running += n
                buckets.append((bound, float(running)))
            hist.add_metric([name], buckets, series.total)
            errors.add_metric([name], float(series.errors))
        yield hist
        yield errors


# ---- the host daemon ---------------------------------------------------------------------------


class HostCollector(Collector):
    """What a host serves: its adapters (host-wide memory; each guest's work on them) and
    every guest's processes."""

    def __init__(self, host: Any) -> None:
        self.host = host

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        census = self.host.census()
        fam = _Families(_Labels(("adapter", "luid", "guest"),
                                ("pid", "name", "guest", "adapter", "luid")))
        guests = GaugeMetricFamily("dxg_host_guests", "Guests connected to the host")
        parts = [p for p in census.get("partitions") or [] if isinstance(p, dict)]
        guests.add_metric([], float(len(parts)))
        requests = CounterMetricFamily("dxg_host_requests", "Requests a guest sent the host",
                                       labels=["guest", "peer"])
        luids: dict[int, str] = {}
        for ad in census.get("adapters") or []:
            luid = f"0x{int(ad.get('guest_luid') or 0):016x}"
            luids[ad["index"]] = luid
            labels = [str(ad["index"]), luid, ""]
            fam.adapter_info.add_metric([*labels, str(ad.get("name")),
                                         "REMOVED" if ad.get("removed") else "ACTIVE"], 1.0)
            fam.adapter_memory(labels, ad.get("memory"))
        for part in parts:
            guest = str(part.get("id"))
            requests.add_metric([guest, str(part.get("peer"))], _num(part.get("requests")))
            adapter_labels = {i: [str(i), luid, guest] for i, luid in luids.items()}
            for entry in part.get("adapters") or []:
                labels = adapter_labels.get(entry.get("index"))
                if labels is not None and isinstance(entry.get("work"), dict):
                    fam.adapter_work(labels, entry["work"])
            users = _partition_processes(
                fam, part, adapter_labels,
                lambda proc, guest=guest: [str(proc.get("pid")), str(proc.get("name", "")),
                                           guest])
            for index, count in users.items():
                fam.adapter_processes.add_metric(adapter_labels[index], float(count))
        yield guests
        yield requests
        yield from fam.all()
