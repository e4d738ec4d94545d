"""dxg.ray: pydxg adapters as Ray resources.

The resource and share arithmetic and the CLI's errors are tested directly. The rest runs a real
Ray cluster (tests/clients/ray_cluster.py): two hosts, two Ray nodes each started by `dxg ray
start` with its own guest, all on this machine inside a network namespace that has only `lo`
and a PID namespace of its own, so that nothing it started outlives it (root, `unshare`), with
Ray's own temporary directory and home."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from dxg.ray import options, remote
from dxg.ray.agent import AgentSpec, NodeAgent
from dxg.ray.resources import (
    ADAPTERS_ENV,
    UNIT_INSTANCE_ENV,
    VGPU,
    NodeAdapter,
    decode_adapters,
    encode_adapters,
    node_resources,
    task_share,
    validate_vgpu,
)
from dxg.uapi.ntstatus import NTSTATUS

CLUSTER = Path(__file__).parent / "clients" / "ray_cluster.py"
# a network namespace with only lo, and a PID namespace whose end (its first process exiting,
# or killed at the timeout) ends everything the cluster started
UNSHARE = ("unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child")
GIB = 1 << 30
A = NodeAdapter(0x0000000100000002, 2 * GIB)
B = NodeAdapter(0x00000001000000FF, GIB)


# ---- what a node advertises, what a task gets ---------------------------------------------------

def test_a_node_advertises_one_vgpu_per_adapter_its_memory_and_each_luid():
    assert node_resources([A, B]) == {
        VGPU: 2.0, "pydxg_memory": float(3 * GIB),
        "pydxg_adapter_0000000100000002": 1.0, "pydxg_adapter_00000001000000ff": 1.0}
    assert node_resources([]) == {}  # Ray refuses a resource of 0


def test_the_adapter_list_travels_to_the_workers_and_back():
    text = encode_adapters([A, B])
    assert text == f"0x0000000100000002:{2 * GIB},0x00000001000000ff:{GIB}"
    assert decode_adapters(text) == (A, B)
    assert decode_adapters("") == ()
    for bad in ("0x1", "1:2", "0xzz:1", "0x1:-5", "0x1:1,", ",".join(["0x1:1"] * 65)):
        with pytest.raises(ValueError, match=ADAPTERS_ENV):
            decode_adapters(bad)


def test_a_fraction_of_one_adapter_is_that_fraction_of_its_memory_and_compute():
    share = task_share([(0, 0.25)], [A, B])
    assert share.luids == (A.luid,)
    assert share.memory == GIB // 2 and share.memory % 4096 == 0
    assert share.compute == 0.25
    assert share.visible_env() == "0x0000000100000002"
    assert share.limits_env() == "adapters=0x0000000100000002,memory=536870912,compute=0.25"
    odd = task_share([(1, 1 / 3)], [A, B])
    assert odd.memory == GIB // 3 // 4096 * 4096  # whole pages, rounded down


def test_whole_adapters_come_without_a_quota():
    share = task_share([(0, 1.0), (1, 1.0)], [A, B])
    assert share.luids == (A.luid, B.luid) and share.memory is None and share.compute == 1.0
    assert share.limits_env() == "adapters=0x0000000100000002+0x00000001000000ff"


def test_an_assignment_the_node_cannot_have_is_refused():
    with pytest.raises(ValueError, match="instance 2"):
        task_share([(2, 0.5)], [A, B])
    with pytest.raises(ValueError, match="holds no pydxg_vgpu"):
        task_share([], [A, B])


@pytest.mark.parametrize("vgpu", [0, -1, 1.5, float("nan"), float("inf"), True, "1", 1e-6])
def test_a_share_ray_cannot_grant_is_refused_before_anything_is_submitted(vgpu):
    with pytest.raises(ValueError):
        validate_vgpu(vgpu)


def test_options_merge_the_share_into_the_other_resources():
    assert options(0.5, num_cpus=0, resources={"x": 1}) == {
        "num_cpus": 0, "resources": {"x": 1, VGPU: 0.5}}
    assert validate_vgpu(3) == 3.0


def test_async_tasks_are_refused_with_what_to_use_instead():
    async def job() -> None:
        pass

    with pytest.raises(TypeError, match="actor"):
        remote(vgpu=0.5)(job)


def test_the_agent_starts_ray_with_the_resources_and_tells_the_workers(tmp_path):
    spec = AgentSpec(node=tmp_path / "n.sock", state_dir=tmp_path, address="10.0.0.1:6379",
                     ray_args=("--num-cpus=4",), ray="/opt/ray")
    agent = NodeAgent(spec)
    cmd = agent.ray_command([A])
    assert cmd[:4] == ["/opt/ray", "start", "--block", "--disable-usage-stats"]
    assert "--address=10.0.0.1:6379" in cmd and cmd[-1] == "--num-cpus=4"
    resources = json.loads(next(c for c in cmd if c.startswith("--resources="))[12:])
    assert resources == node_resources([A])
    env = agent.ray_env([A])
    assert env[UNIT_INSTANCE_ENV].split(",").count(VGPU) == 1
    assert env[ADAPTERS_ENV] == encode_adapters([A]) and env["DXG_NODE"] == str(spec.node)
    head = NodeAgent(AgentSpec(node=spec.node, state_dir=tmp_path, head=True, port=7000,
                               ray="ray"))
    assert "--head" in head.ray_command([]) and "--port=7000" in head.ray_command([])
    assert not any(c.startswith("--resources") for c in head.ray_command([]))


def _dxg(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dxg.cli.main", *args], capture_output=True,
                          text=True, timeout=120, **kw)


def test_ray_cli_failures_are_one_line_with_what_to_do(tmp_path):
    r = _dxg("ray", "status", "--state-dir", str(tmp_path))
    assert r.returncode == 1 and "dxg ray start" in r.stderr and len(r.stderr.splitlines()) == 1
    r = _dxg("ray", "start", "--head", "--up", "--ray", str(tmp_path / "no-ray"), "--state-dir",
             str(tmp_path / "s"), "--node", str(tmp_path / "n.sock"))
    assert r.returncode == 1
    assert "pydxg[ray]" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = _dxg("ray", "start", "--up")
    assert r.returncode == 2 and "--head" in r.stderr  # argparse: one of --head/--address


# ---- a real cluster -----------------------------------------------------------------------------

def _cluster_problem() -> str | None:
    try:
        import ray  # noqa: F401
    except ImportError:
        return "ray is not installed (pip install -e '.[ray]')"
    if os.geteuid() != 0:
        return "needs root to make a network namespace with only lo (unshare -n)"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare and ip (util-linux, iproute2)"
    probe = subprocess.run([*UNSHARE, "ip", "link", "set", "lo", "up"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot make a network namespace here: {probe.stderr.strip()}"
    return None


needs_cluster = pytest.mark.skipif(_cluster_problem() is not None,
                                   reason=str(_cluster_problem()))


def run_cluster(scenario: str, tmp: Path) -> dict:
    env = dict(os.environ, HOME=str(tmp), RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([*UNSHARE, "sh", "-c", 'ip link set lo up && exec "$0" "$@"',
                        sys.executable, str(CLUSTER), scenario, str(tmp)],
                       capture_output=True, text=True, env=env, timeout=280)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no result (rc {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    result = json.loads(lines[-1])
    assert "error" not in result, result.get("traceback", result)
    for name, code in result["exit_codes"].items():
        assert code == 0, (name, code, _logs(tmp))
    return result


def _logs(tmp: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                     for p in sorted(tmp.glob("*.log")))


@needs_cluster
def test_fractions_quotas_an_actor_and_a_killed_task_on_a_real_cluster(tmp_path):
    out = run_cluster("share", tmp_path)
    tasks = out["tasks"]
    assert len(tasks) == 8
    by_adapter: dict[int, list[dict]] = defaultdict(list)
    for t in tasks:
        by_adapter[t["luid"]].append(t)
        assert t["seen"] == 1  # only the adapter Ray gave it
        assert t["correct"] and t["intact"]
        assert t["compute"] == 0.25 and t["memory"] == 2 * GIB // 4
        # the guest holds the task to its quota: the budget it is told, and the allocation
        # past it fails with the quota's status although the adapter had room for it
        assert t["budget"] <= t["memory"]
        assert t["over"] is not None and t["over"]["status"] == NTSTATUS.STATUS_NO_MEMORY
        assert t["limits"].startswith(f"adapters=0x{t['luid']:016x},memory={t['memory']}")
    assert {f"pydxg_adapter_{luid:016x}" for luid in by_adapter} <= set(out["luids"])
    peaks = []
    for luid, ts in by_adapter.items():  # never more than 4 quarters of one adapter at once
        events = sorted([(t["start"], 1) for t in ts] + [(t["end"], -1) for t in ts])
        running = peak = 0
        for _, step in events:
            running += step
            peak = max(peak, running)
        assert peak <= 4, (hex(luid), peak)
        peaks.append(peak)
    assert max(peaks) >= 2, peaks  # (4 ran together: the check above had something to check)
    calls = out["actor"]
    assert all(c["ok"] for c in calls) and len({c["pid"] for c in calls}) == 1
    assert all(c["share"] == 0.5 for c in calls)
    assert all(c["held_bytes"] >= 512 * 512 * 4 for c in calls)  # its weights stay on the vGPU
    victim = out["victim"]
    assert victim["attempt"] == 2 and victim["sum"] == 1024 * 1024
    assert victim["pid"] != victim["killed_pid"] and victim["left_on_guest"] == []
    assert out["used_after"] == [0, 0]


@needs_cluster
def test_a_lost_host_a_returning_host_and_a_removed_node_on_a_real_cluster(tmp_path):
    out = run_cluster("faults", tmp_path)
    head = out["head_id"]
    assert out["vgpu_before"] == 2.0
    assert head not in out["first_nodes"]  # the work ran on the worker first
    assert out["vgpu_after_loss"] == 1.0  # the lost host's adapter left the cluster
    assert all(r["ok"] and r["node"] == head for r in out["lost"])  # retried on the head
    assert out["vgpu_after_return"] == 2.0
    assert head not in out["removed_first_nodes"]
    assert all(r["ok"] and r["node"] == head for r in out["removed"])
    assert out["worker_agent_rc"] == 0
    events = out["worker_events"]
    assert any("the Ray node exited" in e for e in events)
    assert any(e.endswith("guest stopped (0)") for e in events)  # cleanly
    assert out["hostB_used_after_removal"] == 0
