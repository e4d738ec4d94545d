"""What `dxg ls`, `dxg ps` and `dxg top` show, computed with no I/O from what the node answers:
the guest's snapshot (adapters in enumeration order, the host link each is on, processes and
their objects per adapter) and each host's census of this guest (memory per adapter and per
process, and the work figures of dxg.host.statistics: engine time, jobs running, submissions
waiting, fences). One model for the three views and their JSON, so they never disagree.

Utilization is measured, not guessed: the host counts the engine time of every job of a device
(the time it holds a worker thread; a job still running counts up to the census) and stamps each
census with its monotonic clock (``now_ns``). Between two samples, the engine time used divided
by the host time that passed and by the adapter's slots (the jobs it runs at once) is the
utilization, per adapter and per process. `dxg ls`/`ps` take two samples ``--interval`` apart;
`dxg top` compares each frame's sample with the one before.

JSON (every ``--json``): numbers are plain JSON numbers (ids, handles, bytes, counts,
utilization in percent); only LUIDs are strings, ``"0x%016x"`` (64 bits do not survive a double,
which is what JSON tools such as jq read numbers into). `json_form` applies it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AdapterView",
    "HostView",
    "ProcessView",
    "Sample",
    "Usage",
    "View",
    "adapter_memory",
    "build_view",
    "flag_names",
    "human_bytes",
    "join_memory",
    "json_form",
    "match_adapters",
    "take_sample",
]

# D3DKMT_ADAPTERTYPE bits by name, and the short names the 80-column `dxg ls` uses.
FLAG_NAMES = ("paravirtualized", "compute_only", "render_supported", "display_supported",
              "software", "hybrid_discrete", "hybrid_integrated")
SHORT_FLAGS = (("paravirtualized", "pv"), ("compute_only", "compute"),
               ("render_supported", "render"), ("display_supported", "display"),
               ("software", "soft"), ("hybrid_discrete", "hybrid-d"),
               ("hybrid_integrated", "hybrid-i"))
_GROUPS = ("local", "nonlocal")


def flag_names(adapter: Any) -> list[str]:
    """The set bits of a client adapter's D3DKMT_ADAPTERTYPE, as names."""
    t = adapter.adapter_type
    return [name for name in FLAG_NAMES if getattr(t, name)]


def short_flags(names: Iterable[str]) -> str:
    """``pv compute soft``: the flags in a few columns."""
    short = dict(SHORT_FLAGS)
    return " ".join(short.get(n, n) for n in names)


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


def json_form(value: Any, key: str = "") -> Any:
    """``value`` in the one JSON number format: LUIDs (keys ``luid`` or ``*_luid``) as
    ``"0x%016x"``, everything else as it is (numbers stay numbers)."""
    if isinstance(value, Mapping):
        return {k: json_form(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_form(v, key) for v in value]
    if (key == "luid" or key.endswith("_luid")) and isinstance(value, int) \
            and not isinstance(value, bool):
        return f"0x{value & 0xFFFFFFFFFFFFFFFF:016x}"
    return value


def _int(value: Any) -> int | None:
    """A count from a census (a host's word: anything else is "not known")."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    return None


def _luid_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            return None
    return None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


# ---- samples ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """One look at the node: the guest's snapshot and the hosts' census (empty where the node
    would not say), and when it was taken here (time.monotonic)."""

    snapshot: Mapping[str, Any]
    census: Mapping[str, Any]
    taken: float


def take_sample(node: Any, strict: bool = True) -> Sample:
    """Snapshot and census from ``node``. ``strict``: a refusal (not the node's owner or root)
    is raised; otherwise an empty part stands for it."""
    from dxg.client import DxgError

    parts: list[Mapping[str, Any]] = []
    for op in ("snapshot", "census"):
        try:
            reply = node.admin({"op": op})
        except DxgError:
            if strict:
                raise
            reply = {}
        parts.append(reply if isinstance(reply, dict) else {})
    return Sample(parts[0], parts[1], time.monotonic())


def _host_censuses(census: Mapping[str, Any]) -> dict[Any, dict[str, Any]]:
    """Host link index -> that host's census (hosts that answered)."""
    out = {}
    for host in _dicts(census.get("hosts")):
        c = host.get("census")
        if isinstance(c, dict):
            out[_int(host.get("index"))] = c
    return out


# ---- memory figures (the census's, joined to the snapshot) --------------------------------------
#
# Each host's census (node.admin({"op": "census"}): one entry per bound host, its partition's
# census inside) reports per adapter {"memory": {"local": {"total", "used"}, "nonlocal": ...}}
# (host-wide segment use) and per process {"memory": [{"adapter", "local", "nonlocal"}],
# "allocations"}, adapters by the host's own index. The guest snapshot numbers adapters across
# all hosts and says which host link each is on. A census without these figures (an older host)
# leaves them None, shown as "-".


def match_adapters(snapshot: Mapping[str, Any],
                   census: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """Guest adapter index -> its entry in its host's census ("index" is the host's number).
    By LUID where the census gives one, else by position: a host's adapters reach the guest in
    the host's order (vGPU channel relid = first relid + host index)."""
    hosts = _host_censuses(census)
    by_link: dict[Any, list[dict[str, Any]]] = {}
    for ad in _dicts(snapshot.get("adapters")):
        by_link.setdefault(ad.get("host"), []).append(ad)
    out: dict[int, dict[str, Any]] = {}
    for link, ads in by_link.items():
        c = hosts.get(link)
        if c is None:
            continue
        entries = sorted(_dicts(c.get("adapters")), key=lambda e: _int(e.get("index")) or 0)
        by_luid = {_luid_int(e.get(k)): e for e in entries for k in ("luid", "guest_luid")
                   if _luid_int(e.get(k)) is not None}
        positional = len(entries) == len(ads)
        for pos, ad in enumerate(sorted(ads, key=lambda a: a["index"])):
            entry = by_luid.get(_luid_int(ad.get("luid")))
            if entry is None and positional:
                entry = entries[pos]
            if entry is not None:
                out[ad["index"]] = entry
    return out


def adapter_memory(entry: Mapping[str, Any] | None) -> dict[str, dict[str, int | None]]:
    """{"local": {"used", "total"}, "nonlocal": {...}} of a census adapter entry (None where
    the census does not say)."""
    mem = entry.get("memory") if isinstance(entry, Mapping) else None
    out: dict[str, dict[str, int | None]] = {}
    for group in _GROUPS:
        g = mem.get(group) if isinstance(mem, dict) else None
        g = g if isinstance(g, dict) else {}
        out[group] = {"used": _int(g.get("used")), "total": _int(g.get("total"))}
    return out


def _process_budget(proc: Mapping[str, Any], host_adapter: int) -> dict[str, int | None] | None:
    """{"local", "nonlocal", "limit"} of a census process on one host adapter: the budgets
    QueryVideoMemoryInfo answers it (dxg.host.memory.Segments.info) and the quota that binds
    it (None: none); None where the census does not say."""
    for u in _dicts(proc.get("memory")):
        if u.get("adapter") == host_adapter and "local_budget" in u:
            return {"local": _int(u.get("local_budget")),
                    "nonlocal": _int(u.get("nonlocal_budget")),
                    "limit": _int(u.get("limit"))}
    return None


def _process_bytes(proc: Mapping[str, Any], host_adapter: int | None = None) -> int | None:
    """local + non-local bytes of a census process (on one host adapter, or on all)."""
    usages = proc.get("memory")
    if not isinstance(usages, list):
        return None
    return sum(sum(_int(u.get(g)) or 0 for g in _GROUPS) for u in _dicts(usages)
               if host_adapter is None or u.get("adapter") == host_adapter)


def _hw_queues(cp: Mapping[str, Any], adapter: int) -> tuple[int, int]:
    """(hardware queues, command buffers run) of a host process on one adapter."""
    queues = executed = 0
    for dev in _dicts(cp.get("devices")):
        if dev.get("adapter") != adapter:
            continue
        for ctx in _dicts(dev.get("contexts")):
            queues += len(_dicts(ctx.get("hwqueues")))
            executed += _int(ctx.get("executed")) or 0
    return queues, executed


def _work(cp: Mapping[str, Any], adapter: int) -> dict[str, Any] | None:
    """The census's work figures of a host process on one host adapter (None: not given)."""
    return next((w for w in _dicts(cp.get("work")) if w.get("adapter") == adapter), None)


def _share(cp: Mapping[str, Any], adapter: int) -> int | float | None:
    """The process's compute share on the adapter (its weight on the engine when it is busy:
    dxg.host.scheduler), where the census gives one: ``compute.adapters[].share``, else
    ``compute.share``."""
    compute = cp.get("compute")
    if not isinstance(compute, dict):
        return None
    for e in _dicts(compute.get("adapters")):
        if e.get("adapter") == adapter and _int(e.get("share")) is not None:
            return e["share"]  # type: ignore[no-any-return]
    share = compute.get("share")
    return share if _int(share) is not None else None


def join_memory(data: dict[str, Any]) -> dict[str, Any]:
    """Add the census's figures to the snapshot's processes, in place: per process ``memory``
    (bytes over all adapters, local + non-local) and ``allocations``; per adapter link
    ``memory`` (bytes on that adapter), ``budget``, ``queues`` (hardware queues), ``executed``
    (command buffers run), ``fences``, ``queued`` (submissions waiting or running),
    ``running`` (jobs on the engine now) and ``share``; None where the census does not say."""
    snap, census = data["snapshot"], data.get("census") or {}
    hosts = _host_censuses(census)
    matched = match_adapters(snap, census)
    links = {ad["index"]: ad.get("host") for ad in _dicts(snap.get("adapters"))}
    for p in _dicts(snap.get("processes")):
        theirs = [(link, cp) for link, c in hosts.items() for cp in _dicts(c.get("processes"))
                  if cp.get("pid") == p.get("pid")]
        known = [n for n in (_process_bytes(cp) for _, cp in theirs) if n is not None]
        p["memory"] = sum(known) if known else None
        counts = [n for n in (_int(cp.get("allocations")) for _, cp in theirs) if n is not None]
        p["allocations"] = sum(counts) if counts else None
        for link in _dicts(p.get("adapters")):
            entry = matched.get(link.get("adapter"))  # type: ignore[arg-type]
            index = entry.get("index") if entry is not None else None
            mine = [cp for lk, cp in theirs if lk == links.get(link.get("adapter"))] \
                if index is not None else []
            per = [n for n in (_process_bytes(cp, index) for cp in mine) if n is not None]
            link["memory"] = sum(per) if per else None
            link["budget"] = next((b for b in (_process_budget(cp, index) for cp in mine)
                                   if b is not None), None)
            hw = [_hw_queues(cp, index) for cp in mine]
            link["queues"] = sum(w[0] for w in hw) if hw else None
            link["executed"] = sum(w[1] for w in hw) if hw else None
            works = [w for w in (_work(cp, index) for cp in mine) if w is not None]
            for key in ("fences", "queued", "running"):
                values = [v for v in (_int(w.get(key)) for w in works) if v is not None]
                link[key] = sum(values) if values else None
            link["faulted"] = any(_int(w.get("faulted")) for w in works)
            shares = [s for s in (_share(cp, index) for cp in mine) if s is not None]
            link["share"] = shares[0] if shares else None
    return data


# ---- utilization --------------------------------------------------------------------------------


def _clocks(sample: Sample) -> dict[Any, tuple[Any, int]]:
    """Host link -> (its partition id, its now_ns) in ``sample``."""
    out = {}
    for link, c in _host_censuses(sample.census).items():
        now = _int(c.get("now_ns"))
        if now is not None:
            out[link] = (c.get("id"), now)
    return out


def _busy(sample: Sample) -> dict[tuple[Any, ...], int]:
    """Engine time so far by (link, host adapter) and by (link, host process handle, host
    adapter)."""
    out: dict[tuple[Any, ...], int] = {}
    for link, c in _host_censuses(sample.census).items():
        for a in _dicts(c.get("adapters")):
            busy = _int(_dict(a.get("work")).get("engine_busy_ns"))
            if busy is not None:
                out[(link, _int(a.get("index")))] = busy
        for cp in _dicts(c.get("processes")):
            for w in _dicts(cp.get("work")):
                busy = _int(w.get("engine_busy_ns"))
                if busy is not None:
                    out[(link, _int(cp.get("handle")), _int(w.get("adapter")))] = busy
    return out


class _Rates:
    """Utilization (percent of the adapter's engine) between two samples."""

    __slots__ = ("_before", "_clocks_now", "_clocks_then", "_now")

    def __init__(self, prev: Sample | None, cur: Sample) -> None:
        self._now = _busy(cur)
        self._clocks_now = _clocks(cur)
        self._before = _busy(prev) if prev is not None else None
        self._clocks_then = _clocks(prev) if prev is not None else {}

    def _elapsed(self, link: Any) -> int | None:
        now, then = self._clocks_now.get(link), self._clocks_then.get(link)
        if now is None or then is None or now[0] != then[0] or now[1] <= then[1]:
            return None  # no earlier look at the same partition of this host
        return now[1] - then[1]

    def percent(self, key: tuple[Any, ...], slots: int | None) -> float | None:
        """``key``'s engine time over the interval, in percent of ``slots`` busy throughout."""
        if self._before is None or not slots or key not in self._now:
            return None
        elapsed = self._elapsed(key[0])
        if elapsed is None:
            return None
        # A process the earlier look did not see came since: all its time is in the interval.
        used = self._now[key] - self._before.get(key, 0)
        return round(min(100.0, max(0.0, 100.0 * used / (elapsed * slots))), 1)


# ---- the model ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Usage:
    """Bytes used and total of one memory segment group (None: not known)."""

    used: int | None
    total: int | None

    def text(self) -> str:
        if self.used is None and self.total is None:
            return "-"
        return f"{human_bytes(self.used)}/{human_bytes(self.total)}"

    @property
    def fraction(self) -> float | None:
        if self.used is None or not self.total:
            return None
        return min(1.0, self.used / self.total)


@dataclass(frozen=True, slots=True)
class AdapterView:
    """One adapter as the guest enumerates it, with its host's figures."""

    index: int
    luid: int
    host: int | None  # the host link it is on (the snapshot's host index)
    description: str
    state: str
    vendor_id: int | None  # the PCI ids of its bus offer
    device_id: int | None
    local: Usage
    nonlocal_: Usage
    utilization: float | None  # percent of its engine, over the interval
    running: int | None  # this guest's jobs on its engine now
    queued: int | None  # this guest's submissions waiting or running
    slots: int | None  # jobs its engine runs at once

    def as_json(self) -> dict[str, Any]:
        return {"index": self.index, "luid": self.luid, "host": self.host,
                "description": self.description, "state": self.state,
                "pci_vendor_id": self.vendor_id, "pci_device_id": self.device_id,
                "memory": {"local": {"used": self.local.used, "total": self.local.total},
                           "nonlocal": {"used": self.nonlocal_.used,
                                        "total": self.nonlocal_.total}},
                "utilization": self.utilization, "running": self.running,
                "queued": self.queued, "slots": self.slots}


@dataclass(frozen=True, slots=True)
class ProcessView:
    """One process on one adapter on which it holds objects."""

    pid: int
    uid: int | None
    name: str
    adapter: int
    luid: int
    devices: int
    contexts: int
    allocations: int
    queues: int | None  # hardware queues
    fences: int | None
    queued: int | None  # submissions waiting or running
    running: int | None  # jobs on the engine now
    memory: int | None  # bytes committed on the adapter (local + non-local)
    budget: Mapping[str, int | None] | None
    utilization: float | None  # percent of the adapter's engine, over the interval
    share: int | float | None  # its compute share (the scheduler's weight), where given
    state: str  # faulted, running, queued or idle

    def budget_text(self) -> str:
        b = self.budget
        if not b:
            return "-"
        return f"{human_bytes(b.get('local'))}/{human_bytes(b.get('nonlocal'))}"


@dataclass(frozen=True, slots=True)
class HostView:
    """One host the guest is bound to."""

    index: int
    address: str
    name: str
    connected: bool
    error: str | None
    totals: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class View:
    """Adapters, the processes that hold objects on them, and the hosts, at one sample."""

    adapters: tuple[AdapterView, ...]
    processes: tuple[ProcessView, ...]
    hosts: tuple[HostView, ...]
    interval: float | None  # seconds the utilization was measured over (None: not measured)

    @property
    def several_hosts(self) -> bool:
        return len(self.hosts) > 1


def _holds_objects(link: Mapping[str, Any]) -> bool:
    return any(_int(link.get(k)) for k in ("devices", "contexts", "allocations",
                                            "paging_queues", "fences"))


def _state(link: Mapping[str, Any], utilization: float | None) -> str:
    """faulted (a device out of the ACTIVE state), running (a job on the engine now, or engine
    time used in the interval), queued (submissions wait, none ran), else idle."""
    if link.get("faulted"):
        return "faulted"
    if _int(link.get("running")) or utilization:
        return "running"
    if _int(link.get("queued")):
        return "queued"
    return "idle"


def build_view(cur: Sample, prev: Sample | None = None, exclude_pid: int | None = None,
               visible: Iterable[int] | None = None) -> tuple[View, dict[str, Any]]:
    """The view at ``cur`` (utilization since ``prev``), without the processes of
    ``exclude_pid`` (the tool itself) and, with ``visible`` (LUIDs the caller enumerates), only
    those adapters. Also returns the snapshot with the census's figures joined in (the raw
    detail of ``dxg ps --json``), its processes those of the view."""
    import copy

    snap: dict[str, Any] = copy.deepcopy(dict(cur.snapshot))
    census: dict[str, Any] = dict(cur.census)
    join_memory({"snapshot": snap, "census": census})
    rates = _Rates(prev, cur)
    hosts_census = _host_censuses(census)
    matched = match_adapters(snap, census)
    shown = None if visible is None else set(visible)

    adapters = []
    by_index: dict[int, AdapterView] = {}
    for ad in _dicts(snap.get("adapters")):
        luid = _luid_int(ad.get("luid")) or 0
        if shown is not None and luid not in shown:
            continue
        entry = matched.get(ad["index"])
        mem = adapter_memory(entry)
        work = _dict((entry or {}).get("work"))
        slots = _int(work.get("slots"))
        view = AdapterView(
            index=ad["index"], luid=luid, host=_int(ad.get("host")),
            description=str(ad.get("description") or ""), state=str(ad.get("state") or "?"),
            vendor_id=_int(ad.get("pci_vendor_id")), device_id=_int(ad.get("pci_device_id")),
            local=Usage(**mem["local"]), nonlocal_=Usage(**mem["nonlocal"]),
            utilization=rates.percent((ad.get("host"), _int((entry or {}).get("index"))), slots)
            if entry is not None else None,
            running=_int(work.get("running")), queued=_int(work.get("queued")), slots=slots)
        adapters.append(view)
        by_index[view.index] = view

    processes = []
    kept = []
    for p in _dicts(snap.get("processes")):
        if p.get("pid") == exclude_pid:
            continue
        theirs = [(lk, cp) for lk, c in hosts_census.items() for cp in _dicts(c.get("processes"))
                  if cp.get("pid") == p.get("pid")]
        links = [lk for lk in _dicts(p.get("adapters"))
                 if lk.get("adapter") in by_index and _holds_objects(lk)]
        if not links:
            continue
        for link in links:
            ad = by_index[link["adapter"]]
            entry = matched.get(ad.index)
            host_index = _int((entry or {}).get("index"))
            utilization = None
            for lk, cp in theirs:
                if lk == ad.host and entry is not None:
                    u = rates.percent((lk, _int(cp.get("handle")), host_index), ad.slots)
                    if u is not None:
                        utilization = (utilization or 0.0) + u
            link["utilization"] = utilization
            link["state"] = _state(link, utilization)
            processes.append(ProcessView(
                pid=int(p["pid"]), uid=_int(p.get("uid")), name=str(p.get("name") or "?"),
                adapter=ad.index, luid=ad.luid, devices=_int(link.get("devices")) or 0,
                contexts=_int(link.get("contexts")) or 0,
                allocations=_int(link.get("allocations")) or 0,
                queues=_int(link.get("queues")), fences=_int(link.get("fences")),
                queued=_int(link.get("queued")), running=_int(link.get("running")),
                memory=_int(link.get("memory")), budget=link.get("budget"),
                utilization=utilization, share=link.get("share"), state=link["state"]))
        p["adapters"] = links
        kept.append(p)
    snap["processes"] = kept

    hosts = []
    for h in _dicts(snap.get("hosts")):
        c = hosts_census.get(h.get("index"))
        err = next((str(e.get("error")) for e in _dicts(census.get("hosts"))
                    if e.get("index") == h.get("index") and e.get("error")), None)
        hosts.append(HostView(index=_int(h.get("index")) or 0, address=str(h.get("address")),
                              name=str(h.get("host") or ""), connected=bool(h.get("connected")),
                              error=err, totals=_dict((c or {}).get("totals"))))
    interval = cur.taken - prev.taken if prev is not None else None
    return View(tuple(adapters), tuple(processes), tuple(hosts), interval), snap
