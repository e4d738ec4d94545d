"""The Ray column of `dxg bench` (dxg.bench.peer_ray): it joins the figures by name, it says why
when it cannot run, and its child never starts Ray outside a network namespace of only `lo`.
(tests/test_bench.py runs the whole `dxg bench --quick`, the column included where it can.)"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from dxg.bench import compute, latency, peer_ray, transfer
from dxg.bench.model import Context


def test_the_column_joins_figures_that_exist() -> None:
    assert peer_ray.RTT_NAME == latency.LOCAL_UP
    quick = compute._names(True)
    assert compute.gemm_name(compute.GEMM_PEER) in quick and compute.MLP_NAME in quick
    sizes = [s for s, _, _ in transfer.ZERO_COPY_QUICK]
    assert all(s in sizes for s in peer_ray.MOVE_QUICK)
    assert [transfer.zero_copy_name(s) for s in peer_ray.MOVE_FULL] == [
        "Lock2 write+read 16 MiB", "Lock2 write+read 256 MiB"]
    full = [transfer.zero_copy_name(s) for s, _, _ in transfer.ZERO_COPY_FULL]
    assert all(transfer.zero_copy_name(s) in full for s in peer_ray.MOVE_FULL)


@pytest.mark.parametrize("patch, why", [
    (("os.geteuid", 1000), "not root"),
    (("dxg.bench.peer_ray.shutil.which", None), "no unshare command"),
    (("dxg.bench.peer_ray.importlib.util.find_spec", None), "Ray is not installed"),
])
def test_skipped_with_a_reason(tmp_path: Path, patch: tuple[str, object], why: str) -> None:
    with mock.patch("os.geteuid", return_value=0), mock.patch(patch[0], return_value=patch[1]):
        results, note = peer_ray.run(Context(tmp=tmp_path, quick=True))
    assert results == {}
    assert note.startswith(why) and note.endswith("Ray column skipped") and "\n" not in note
    assert not any(tmp_path.iterdir())  # nothing was started


def test_child_refuses_a_namespace_with_other_interfaces(tmp_path: Path) -> None:
    nets = sorted(name for _, name in socket.if_nameindex())
    if nets == ["lo"]:
        pytest.skip("this namespace has only lo")
    out = tmp_path / "out.json"
    r = subprocess.run([sys.executable, "-m", "dxg.bench.peer_ray", "--child", "--json",
                        str(out), "--tmp", str(tmp_path / "ray"), "--quick"],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, RAY_ADDRESS=""))
    assert r.returncode == 1, r.stderr
    assert "not only lo" in json.loads(out.read_text())["error"]
    assert not (tmp_path / "ray").exists()  # Ray never started
