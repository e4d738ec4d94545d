"""A real Ray cluster on this machine with pydxg: two hosts (separate processes, one soft adapter
each), two Ray nodes (head and worker), each run by `dxg ray start` with its own guest bound to
one host. Run by tests/test_ray.py inside a network namespace that has only `lo` (so Ray talks
over loopback only), as `python ray_cluster.py SCENARIO TMPDIR`; prints one JSON line with what it
saw, which the test checks.

Scenarios:
  share    8 tasks of 0.25 on the 2 adapters, an actor that keeps weights on its vGPU, a task
           whose worker is SIGKILLed mid-computation (retried), and what is left afterwards
  faults   host B lost (resources drop, the work goes to the head), host B back (resources
           return), then the worker's Ray node removed (its work goes to the head, its guest
           stops cleanly)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

DXG = (sys.executable, "-m", "dxg.cli.main")
RAY_ARGS = ("--num-cpus=8", "--object-store-memory=80000000", "--node-ip-address=127.0.0.1")
MIB = 1 << 20


def wait_until(pred: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dxg_json(*args: str) -> Any:
    out = subprocess.run([*DXG, *args, "--json"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"dxg {' '.join(args)}: {out.stderr.strip()}")
    return json.loads(out.stdout)


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ray_tmp = tempfile.mkdtemp(prefix="dxgray")

    def alive(self, name: str) -> bool:
        """Whether process ``name`` still runs; raises with its log when it exited."""
        p = self.procs[name]
        if p.poll() is None:
            return True
        log = (self.tmp / f"{name}.log").read_text(errors="replace")[-1500:]
        raise AssertionError(f"{name} exited ({p.returncode}):\n{log}")

    def host(self, name: str) -> None:
        sock = self.tmp / f"host{name}.sock"
        sock.unlink(missing_ok=True)
        log = open(self.tmp / f"host{name}.log", "ab")
        self.procs[f"host{name}"] = subprocess.Popen(
            [*DXG, "host", "--listen", f"unix:{sock}", "--adapters", "1", "--host-id",
             f"ray-{name}", "--dedicated-memory", "1024", "--shared-memory", "1024"],
            stdout=log, stderr=log)
        wait_until(sock.exists, 30, f"host {name} listening")

    def agent(self, name: str, host: str, head: bool) -> None:
        role = ["--head", "--port", str(self.port)] if head else ["--address", self.address]
        # Ray's socket paths must stay under 108 bytes: its directory is short, not in tmp
        extra = [f"--temp-dir={self.ray_tmp}", "--include-dashboard=false"] if head else []
        log = open(self.tmp / f"agent{name}.log", "ab")
        self.procs[f"agent{name}"] = subprocess.Popen(
            [*DXG, "ray", "start", *role, "--connect", f"unix:{self.tmp / f'host{host}.sock'}",
             "--node", self.node(name), "--state-dir", str(self.tmp / name), "--poll", "0.3",
             "--", *RAY_ARGS, *extra],
            stdout=log, stderr=log)

    def node(self, name: str) -> str:
        return str(self.tmp / name / "dxg.sock")

    def state(self, name: str) -> dict[str, Any]:
        return json.loads((self.tmp / name / "agent.json").read_text())

    def start(self) -> None:

        self.host("A")
        self.host("B")
        self.agent("head", "A", head=True)
        wait_until(lambda: self.alive("agenthead") and (self.tmp / "head" / "agent.json").exists()
                   and self.state("head").get("ray_starts"), 60, "the head's Ray node")
        wait_until(lambda: self.alive("agenthead") and self._connect(), 60,
                   "a Ray driver connected")
        self.agent("worker", "B", head=False)
        wait_until(lambda: self.alive("agentworker") and self.vgpus() == 2, 60,
                   "2 pydxg_vgpu in the cluster")

    def _connect(self) -> bool:
        import ray

        if not (self.tmp / "head" / "ray.log").read_text(errors="replace").count("Ray runtime "
                                                                                "started"):
            return False
        try:
            ray.init(address=self.address, log_to_driver=False)
            return True
        except Exception:
            return False

    def vgpus(self) -> float:
        import ray

        return ray.cluster_resources().get("pydxg_vgpu", 0.0)

    def stop(self) -> dict[str, int | None]:
        import ray

        ray.shutdown()
        codes: dict[str, int | None] = {}
        for name in ("agentworker", "agenthead", "hostA", "hostB"):
            p = self.procs.get(name)
            if p is None:
                continue
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(90)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            codes[name] = p.returncode
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        return codes


def node_processes(node: str) -> list[dict[str, Any]]:
    """The guest's processes (its snapshot, as `dxg ps --json` gives it)."""
    return dxg_json("ps", "--node", node, "--interval", "0")["snapshot"].get("processes", [])


def adapter_used(node: str) -> int:
    data = dxg_json("ls", "--node", node, "--interval", "0")
    return sum(a["memory"]["local"]["used"] + a["memory"]["nonlocal"]["used"]
               for a in data["adapters"])


def raylet_of(ray_start_pid: int) -> int | None:
    """The raylet that `ray start` (pid) runs."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError):
            continue
        if ppid == ray_start_pid and comm == "raylet":
            return int(entry.name)
    return None


# ---- scenario: shares, an actor, a killed task -------------------------------------------------

def scenario_share(c: Cluster) -> dict[str, Any]:
    import ray

    import dxg.ray

    out: dict[str, Any] = {"luids": sorted(k for k in ray.cluster_resources()
                                           if k.startswith("pydxg_adapter_"))}

    started = c.tmp / "started"
    started.mkdir()

    @dxg.ray.remote(vgpu=0.25, num_cpus=0, max_retries=0)
    def quarter(i: int, started_dir: str) -> dict[str, Any]:
        import dxg.compute

        share = dxg.ray.current_share()
        start = time.time()
        # a barrier: 4 tasks have started before any goes on, so they do overlap (a Ray that
        # ran them one at a time would leave each waiting here until the deadline)
        (Path(started_dir) / str(i)).touch()
        deadline = time.monotonic() + 20
        while len(os.listdir(started_dir)) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        seen = dxg.compute.device_count()
        x = np.arange(256 * 256, dtype=np.float32).reshape(256, 256) / 65536
        quota = share.memory or 0
        with dxg.compute.device(0) as dev:
            got = (dev.asarray(x) @ dev.asarray(x)).get()
            correct = bool(np.allclose(got, x @ x, rtol=1e-4))
            # half its quota: fits, whatever the other tasks on the adapter hold
            mine = dev.empty((quota // 2 // 4,), np.float32)
            mine[:4] = dev.asarray(np.array([i, i, i, i], np.float32))
            over: dict[str, Any] | None = None
            try:  # more than the quota, though the adapter has room for it
                dev.empty((quota * 5 // 4 // 4,), np.float32)
            except Exception as e:
                over = {"type": type(e).__name__, "text": str(e),
                        "status": getattr(e, "status", None)}
            budget = dev.memory_info()["budget"]  # what the guest says this process may use
            time.sleep(0.8)  # the task's work: long enough for tasks to overlap
            intact = bool((mine[:4].get() == i).all())
        return {"i": i, "luid": share.luids[0], "memory": share.memory,
                "compute": share.compute, "seen": seen, "correct": correct, "over": over,
                "intact": intact, "budget": budget,
                "start": start, "end": time.time(), "pid": os.getpid(),
                "limits": os.environ.get("DXG_PROCESS_LIMITS")}

    out["tasks"] = ray.get([quarter.remote(i, str(started)) for i in range(8)], timeout=180)

    @dxg.ray.remote(vgpu=0.5, num_cpus=0)
    class Model:
        def __init__(self, n: int) -> None:
            import dxg.compute

            rng = np.random.default_rng(7)
            self.w_host = rng.standard_normal((n, n), dtype=np.float32)
            self.dev = dxg.compute.device(0)
            self.w = self.dev.asarray(self.w_host)

        def forward(self, x: np.ndarray) -> dict[str, Any]:
            y = (self.dev.asarray(x) @ self.w).get()
            return {"ok": bool(np.allclose(y, x @ self.w_host, rtol=1e-3, atol=1e-3)),
                    "pid": os.getpid(), "node": os.environ.get("DXG_NODE"),
                    "share": dxg.ray.current_share().compute}

    model = Model.remote(512)
    x = np.ones((4, 512), np.float32)
    calls = []
    for _ in range(3):
        r = ray.get(model.forward.remote(x), timeout=120)
        held = [p for p in node_processes(r["node"]) if p.get("pid") == r["pid"]]
        r["held_bytes"] = sum(link.get("allocation_bytes", 0) for p in held
                              for link in p.get("adapters", []))
        calls.append(r)
    out["actor"] = calls
    ray.kill(model)

    marks = c.tmp / "marks"
    marks.mkdir()

    @dxg.ray.remote(vgpu=0.25, num_cpus=0, max_retries=2)
    def victim(marks_dir: str) -> dict[str, Any]:
        import dxg.compute

        d = Path(marks_dir)
        attempt = len(list(d.glob("attempt-*"))) + 1
        (d / f"attempt-{attempt}").write_text(str(os.getpid()))
        with dxg.compute.device(0) as dev:
            a = dev.asarray(np.ones((1024, 1024), np.float32))
            (d / f"ready-{attempt}").write_text(os.environ.get("DXG_NODE", ""))
            deadline = time.monotonic() + 60
            while attempt == 1 and time.monotonic() < deadline:
                a = a @ dev.asarray(np.eye(1024, dtype=np.float32))
                dev.synchronize()
            return {"attempt": attempt, "pid": os.getpid(),
                    "sum": float(a.get().sum())}

    ref = victim.remote(str(marks))
    wait_until(lambda: (marks / "ready-1").exists(), 120, "the victim started")
    pid = int((marks / "attempt-1").read_text())
    node = (marks / "ready-1").read_text()
    os.kill(pid, signal.SIGKILL)
    out["victim"] = ray.get(ref, timeout=180)
    out["victim"]["killed_pid"] = pid
    wait_until(lambda: not any(p.get("pid") == pid for p in node_processes(node)), 20,
               "the killed worker gone from its guest")
    out["victim"]["left_on_guest"] = [p for p in node_processes(node) if p.get("pid") == pid]
    wait_until(lambda: adapter_used(c.node("head")) == 0 and adapter_used(c.node("worker"))
               == 0, 30, "no device memory held on either host")
    out["used_after"] = [adapter_used(c.node("head")), adapter_used(c.node("worker"))]
    return out


# ---- scenario: host lost, host back, node removed ----------------------------------------------

def scenario_faults(c: Cluster) -> dict[str, Any]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    import dxg.ray

    out: dict[str, Any] = {}
    head_id = next(n["NodeID"] for n in ray.nodes()
                   if n["Alive"] and "node:__internal_head__" in n["Resources"])
    out["vgpu_before"] = c.vgpus()

    @dxg.ray.remote(vgpu=1.0, num_cpus=0)
    class Blocker:  # holds the head's adapter, so new work can only go to the worker
        def ping(self) -> str:
            return ray.get_runtime_context().get_node_id()

    def block_head() -> Any:
        b = Blocker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            head_id, soft=False)).remote()
        ray.get(b.ping.remote(), timeout=60)
        return b

    @dxg.ray.remote(vgpu=0.5, num_cpus=0, max_retries=4)
    def work(i: int, marks_dir: str, seconds: float) -> dict[str, Any]:
        import dxg.compute

        d = Path(marks_dir)
        (d / f"start-{i}-{os.getpid()}").write_text(ray.get_runtime_context().get_node_id())
        x = np.eye(256, dtype=np.float32)
        with dxg.compute.device(0) as dev:
            a = dev.asarray(x)
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                a = a @ dev.asarray(x)
                dev.synchronize()
            ok = bool(np.allclose(a.get(), x))
        return {"i": i, "node": ray.get_runtime_context().get_node_id(), "ok": ok}

    # 1. host B lost while two tasks run on the worker's adapter
    marks = c.tmp / "marks-lost"
    marks.mkdir()
    blocker = block_head()
    refs = [work.remote(i, str(marks), 4.0) for i in range(2)]
    wait_until(lambda: len(list(marks.glob("start-*"))) >= 2, 120, "work running on the worker")
    out["first_nodes"] = sorted({p.read_text() for p in marks.glob("start-*")})
    starts_before = c.state("worker")["ray_starts"]
    c.procs["hostB"].kill()
    c.procs["hostB"].wait()
    wait_until(lambda: c.state("worker")["ray_starts"] > starts_before, 60,
               "the worker's agent restarted Ray without the lost adapter")
    wait_until(lambda: c.vgpus() == 1, 60, "the cluster down to 1 pydxg_vgpu")
    out["vgpu_after_loss"] = c.vgpus()
    ray.kill(blocker)
    out["lost"] = ray.get(refs, timeout=240)
    out["head_id"] = head_id

    # 2. host B back: the worker's adapter returns to the cluster
    c.host("B")
    wait_until(lambda: c.vgpus() == 2, 90, "pydxg_vgpu back to 2")
    out["vgpu_after_return"] = c.vgpus()

    # 3. the worker's Ray node removed (its raylet dies) while work runs on it
    marks = c.tmp / "marks-removed"
    marks.mkdir()
    blocker = block_head()
    refs = [work.remote(10 + i, str(marks), 6.0) for i in range(2)]
    wait_until(lambda: len(list(marks.glob("start-*"))) >= 2, 120, "work running on the worker")
    out["removed_first_nodes"] = sorted({p.read_text() for p in marks.glob("start-*")})
    state = c.state("worker")
    raylet = wait_until(lambda: raylet_of(state["ray_pid"]), 10, "the worker's raylet")
    os.kill(raylet, signal.SIGKILL)
    agent = c.procs["agentworker"]
    agent.wait(120)
    out["worker_agent_rc"] = agent.returncode
    out["worker_guest_pid"] = state["guest_pid"]
    out["worker_events"] = c.state("worker")["events"]
    ray.kill(blocker)
    out["removed"] = ray.get(refs, timeout=240)
    # host B has nothing of the guest that went: a fresh guest sees its adapter empty
    probe = c.tmp / "probe.sock"
    g = subprocess.Popen([*DXG, "guest", "--connect", f"unix:{c.tmp / 'hostB.sock'}", "--node",
                          str(probe)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        subprocess.run([*DXG, "wait", "--node", str(probe), "--timeout", "30"], check=True)
        out["hostB_used_after_removal"] = adapter_used(str(probe))
    finally:
        g.terminate()
        g.wait(30)
    return out


def main() -> int:
    scenario, tmp = sys.argv[1], Path(sys.argv[2])
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    c = Cluster(tmp)
    result: dict[str, Any] = {"scenario": scenario}
    try:
        c.start()
        result.update({"share": scenario_share, "faults": scenario_faults}[scenario](c))
    except Exception as e:
        import traceback

        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()
    finally:
        result["exit_codes"] = c.stop()
    print(json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
