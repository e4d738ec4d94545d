"""A process limits itself (docs/policy.md, "A process can limit itself"): the node's "restrict"
request on the caller's own connection (NodeConnection.restrict, AsyncNodeConnection.restrict)
and ``DXG_PROCESS_LIMITS``, read each time a connection is opened.

Real stacks (a host and a guest over Unix sockets, the socket node: conftest.make_stack) and real
client processes; waits have deadlines, never fixed sleeps."""

from __future__ import annotations

import asyncio
import errno
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_stack, read_json_line, wait_until
from dxg.client import DxgError, open_node, open_node_async
from dxg.client.api import Node
from dxg.client.connection import NodeConnection
from dxg.client.errors import NodeProtocolError
from dxg.client.limits import LIMITS_ENV, LimitsRefused, parse_limits
from dxg.guest.policy import load_policy
from dxg.node.server import SocketNode
from dxg.runtime.loop import LoopThread
from dxg.uapi import wire
from dxg.uapi.memory import PAGE_SIZE
from dxg.uapi.ntstatus import NTSTATUS

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="runs a client as another user")
MiB = 1 << 20
NOBODY = 65534
NO_MEMORY = int(NTSTATUS.STATUS_NO_MEMORY)
UNKNOWN_LUID = 0x7777_0000_1234


@pytest.fixture
def stack(public_dir: Path) -> Iterator[Any]:
    """Two adapters; every process (root too) has compute share 8, so that a fraction of it
    shows (root has no memory quota: only what it asks for binds it)."""
    with make_stack(public_dir, "rs", driver_kw={
            "policy": load_policy(None, compute_share=8)}) as s:
        yield s


@pytest.fixture(autouse=True)
def _no_inherited_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LIMITS_ENV, raising=False)


def _grant_of(s: Any, conn_pid: int, restricted: bool = True) -> list[dict[str, Any]]:
    return [p["grant"] for p in s.driver.snapshot()["processes"]
            if p["pid"] == conn_pid and p["grant"]["restricted"] == restricted]


def _host_process(s: Any, pid: int) -> list[dict[str, Any]]:
    return [proc for p in s.host.census()["partitions"] for proc in p["processes"]
            if proc["pid"] == pid]


# ---- memory --------------------------------------------------------------------------------------


def test_a_restricted_process_is_held_to_its_memory_and_another_is_not(stack: Any) -> None:
    s = stack
    with open_node(s.node_path) as mine, open_node(s.node_path) as other:
        grant = mine.conn.restrict(memory=MiB)
        assert grant["memory_per_process"] == MiB and grant["restricted"]
        # asking for more later keeps the lower value (and "256M" is read as the policy reads)
        assert mine.conn.restrict(memory="256M")["memory_per_process"] == MiB
        ad = mine.adapters()[0]
        with ad.create_device() as dev:
            with pytest.raises(DxgError) as e:
                dev.allocate(2 * MiB)
            assert e.value.status == NO_MEMORY
            small = dev.allocate(MiB)  # exactly the limit
            with pytest.raises(DxgError) as e:
                dev.allocate(PAGE_SIZE)
            assert e.value.status == NO_MEMORY
            assert ad.video_memory_info(0).budget == MiB
            quotas = [p["quota"]["per_process"] for p in _host_process(s, os.getpid())]
            assert MiB in quotas  # the host was told, and enforces it
            with other.adapters()[0].create_device() as dev2:  # same user, not restricted
                dev2.allocate(2 * MiB).close()
            small.close()
        assert _grant_of(s, os.getpid())[0]["memory_per_process"] == MiB


def test_restricting_after_an_adapter_was_opened_is_busy(stack: Any) -> None:
    with open_node(stack.node_path) as node:
        node.conn.restrict(compute=1)  # before: fine
        node.adapters()
        with pytest.raises(LimitsRefused) as e:
            node.conn.restrict(memory=MiB)
        assert e.value.errno == errno.EBUSY and "before" in str(e.value)
        assert isinstance(e.value, NodeProtocolError) and isinstance(e.value, DxgError)
        # and the grant did not change
        assert _grant_of(stack, os.getpid())[0]["memory_per_process"] is None


# ---- adapters ------------------------------------------------------------------------------------


def test_adapters_hides_the_others_as_if_the_policy_had(stack: Any) -> None:
    s = stack
    luids = [a.luid for a in s.driver.active_adapters()]
    assert len(luids) == 2
    with open_node(s.node_path) as node:
        grant = node.conn.restrict(adapters=[luids[1], UNKNOWN_LUID])
        assert grant["only_luids"] == sorted(f"0x{x:016x}" for x in (luids[1], UNKNOWN_LUID))
        # a later call intersects: asking for both again still leaves only the second
        grant = node.conn.restrict(adapters=[f"0x{luids[0]:016x}", luids[1]])
        assert grant["only_luids"] == [f"0x{luids[1]:016x}"]
        # EnumProcesses answers a hidden LUID as one that names nothing
        with pytest.raises(DxgError) as hidden:
            node.processes(luids[0])
        with pytest.raises(DxgError) as nothing:
            node.processes(UNKNOWN_LUID)
        assert hidden.value.status == nothing.value.status
        assert [a.luid for a in node.adapters()] == [luids[1]]
        with pytest.raises(DxgError) as hidden:
            node.open_adapter(luids[0])
        with pytest.raises(DxgError) as nothing:
            node.open_adapter(UNKNOWN_LUID)
        assert hidden.value.status == nothing.value.status == NTSTATUS.STATUS_INVALID_PARAMETER
        node.open_adapter(luids[1]).close()
    with open_node(s.node_path) as fresh:  # another connection of the same process: all
        assert [a.luid for a in fresh.adapters()] == luids
        with Node(NodeConnection(s.node_path)) as none:
            none.conn.restrict(adapters=[])  # (an empty list: no adapter at all)
            assert none.adapters() == []


# ---- compute share -------------------------------------------------------------------------------


def test_the_compute_share_is_a_fraction_of_the_grant(stack: Any) -> None:
    s = stack
    with open_node(s.node_path) as node:
        assert node.conn.restrict(compute=0.3)["compute_share"] == round(8 * 0.3)  # 2
        assert node.conn.restrict(compute=1.0)["compute_share"] == 2  # never more
        with node.adapters()[0].create_device():
            r = subprocess.run([sys.executable, "-m", "dxg.cli.main", "ps", "--json", "--node",
                                s.node_path], capture_output=True, text=True, timeout=60,
                               check=False)
            assert r.returncode == 0, r.stderr
            data = json.loads(r.stdout)
            mine = [p for p in data["snapshot"]["processes"]
                    if p["pid"] == os.getpid() and p["grant"]["restricted"]]
            assert [p["grant"]["compute_share"] for p in mine] == [2]
            hosts = [p for h in data["census"]["hosts"] for p in h["census"]["processes"]
                     if p["pid"] == os.getpid()]
            assert [p["compute"]["share"] for p in hosts] == [2]  # the host weighs it so
    with NodeConnection(s.node_path) as conn:  # never below 1
        assert conn.restrict(compute=0.01)["compute_share"] == 1


# ---- who may ------------------------------------------------------------------------------------

_AS_NOBODY = textwrap.dedent("""
    import json, os, socket, struct, sys
    from dxg.client.connection import NodeConnection
    from dxg.client.errors import NodeProtocolError
    from dxg.uapi import wire
    os.setgroups([]); os.setgid({uid}); os.setuid({uid})
    out = {{"pid": os.getpid()}}
    conn = NodeConnection({path!r})
    out["grant"] = conn.restrict(memory=1 << 20, compute=0.5)
    for name, request in (("snapshot", {{"op": "snapshot"}}), ("census", {{"op": "census"}}),
                          ("no_op", {{"memory": 1}})):
        try:
            conn.admin(request)
            out[name] = 0
        except NodeProtocolError as e:
            out[name] = e.errno
    # a long ADMIN from a non-admin: refused before its JSON is read, the connection goes on
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect({path!r})
    raw.sendall(wire.encode(wire.Hello(), 1))
    dec = wire.FrameDecoder()
    def recv():
        while (f := dec.next_frame()) is None:
            dec.feed(raw.recv(65536))
        return wire.decode(f)
    recv()
    pad = " " * 5000
    raw.sendall(wire.frame_bytes(wire.Kind.ADMIN, 7, ('{{"op":"restrict"' + pad + '}}').encode()))
    out["long"] = recv().errno
    raw.sendall(wire.frame_bytes(wire.Kind.ADMIN, 8, b'{{"op":"restrict","memory":4096}}'))
    out["short"] = recv().reply["memory_per_process"]
    print(json.dumps(out), flush=True)
    sys.stdin.read()
""")


@needs_root
def test_any_user_may_restrict_itself_but_nothing_else(stack: Any, public_dir: Path) -> None:
    s = stack
    code = _AS_NOBODY.format(uid=NOBODY, path=s.node_path)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(public_dir))
    try:
        out = read_json_line(proc, 60)
        assert out["grant"]["memory_per_process"] == MiB
        assert out["grant"]["compute_share"] == 4
        assert out["snapshot"] == out["census"] == out["no_op"] == errno.EACCES
        assert (out["long"], out["short"]) == (errno.EACCES, 4096)
        # the restriction acted on the caller's own process only
        procs = [p for p in s.driver.snapshot()["processes"] if p["pid"] == out["pid"]]
        assert sorted(p["grant"]["memory_per_process"] for p in procs) == [4096, MiB]
        assert all(p["uid"] == NOBODY for p in procs)
        assert not any(p["grant"]["restricted"] for p in s.driver.snapshot()["processes"]
                       if p["pid"] != out["pid"])
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    assert proc.returncode == 0, proc.stderr.read()


# ---- DXG_PROCESS_LIMITS --------------------------------------------------------------------------

_COMPUTE = textwrap.dedent("""
    import json, os
    import numpy as np
    import dxg.compute as dc
    from dxg.client import DxgError, open_node
    out = {"pid": os.getpid()}
    dev = dc.device(0)
    small = dev.asarray(np.arange(1024, dtype=np.float32))
    out["small"] = float((small + small).get().sum())
    try:
        dev.empty(64 << 20, dtype=np.uint8)  # (the adapter has 1 GiB: only the limit binds)
        out["big"] = 0
    except DxgError as e:
        out["big"] = e.status
    with open_node() as node:
        out["grants"] = [p["grant"] for p in node.snapshot()["processes"]
                         if p["pid"] == os.getpid()]
    dev.close()
    print(json.dumps(out), flush=True)
""")


def test_the_variable_restricts_every_connection_dxg_compute_opens(stack: Any) -> None:
    s = stack
    luid = s.driver.active_adapters()[1].luid
    env = dict(os.environ, DXG_NODE=s.node_path, PYTHONUNBUFFERED="1",
               **{LIMITS_ENV: f"memory=32M, compute=0.5, adapters=0x{luid:016x}"})
    r = subprocess.run([sys.executable, "-c", _COMPUTE], capture_output=True, text=True,
                       timeout=120, env=env, check=False)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["small"] == float(sum(range(1024)) * 2)
    assert out["big"] == NO_MEMORY
    assert len(out["grants"]) >= 2  # dxg.compute's connection and open_node's
    for g in out["grants"]:
        assert (g["memory_per_process"], g["compute_share"], g["only_luids"]) == (
            32 * MiB, 4, [f"0x{luid:016x}"])


def test_the_variable_restricts_the_asyncio_connection_too(stack: Any,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LIMITS_ENV, "memory=3M")

    async def main() -> dict[str, Any]:
        async with await open_node_async(stack.node_path) as node:
            first = _grant_of(stack, os.getpid())
            again = await node.conn.restrict(memory=5 * MiB)
            return {"first": first, "again": again}

    out = asyncio.run(main())
    assert [g["memory_per_process"] for g in out["first"]] == [3 * MiB]
    assert out["again"]["memory_per_process"] == 3 * MiB
    with open_node(stack.node_path) as node:  # the sync one too, and a fresh grant each
        assert node.conn.restrict()["memory_per_process"] == 3 * MiB
        node.adapters()
        node.conn.reopen()  # a reopened connection is restricted again
        assert node.conn.restrict()["memory_per_process"] == 3 * MiB


@pytest.mark.parametrize("value", [
    "memory=4X", "memory=", "memory=-1", "compute=0", "compute=1.5", "compute=nan",
    "compute=inf", "compute=abc", "adapters=1", "adapters=0x1+zz", "bogus=1", "memory",
    "memory=1M,memory=2M", "memory=1M,,compute=1",
    "adapters=" + "+".join(hex(i) for i in range(1, 66)),
])
def test_a_malformed_variable_fails_the_open_with_one_line(stack: Any, value: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LIMITS_ENV, value)
    with pytest.raises(ValueError) as e:
        open_node(stack.node_path)
    text = str(e.value)
    assert text.startswith(f"{LIMITS_ENV}=") and "\n" not in text and "write e.g." in text
    assert not stack.driver.processes()  # it failed before anything connected


def test_the_variables_syntax() -> None:
    assert parse_limits("") is None and parse_limits("  ") is None
    assert parse_limits("Memory=1.5G , adapters=none") == {
        "op": "restrict", "memory": 3 << 29, "adapters": []}
    assert parse_limits("compute=1,adapters=0x0000000100000001+0x0000000100000000") == {
        "op": "restrict", "compute": 1.0, "adapters": [1 << 32, (1 << 32) + 1]}


# ---- hostile requests ----------------------------------------------------------------------------

BAD_REQUESTS = [
    {"memory": -1}, {"memory": (1 << 62) + 1}, {"memory": True}, {"memory": 1.5},
    {"memory": "1M"}, {"memory": None}, {"memory": [1]},
    {"compute": 0}, {"compute": -0.5}, {"compute": 1.0000001}, {"compute": math.nan},
    {"compute": math.inf}, {"compute": True}, {"compute": "0.5"}, {"compute": None},
    {"adapters": 5}, {"adapters": "0x1"}, {"adapters": [True]}, {"adapters": [-1]},
    {"adapters": [1 << 64]}, {"adapters": ["0x1"]}, {"adapters": [1.0]},
    {"adapters": list(range(65))}, {"adapters": None}, {"adapters": [[1]]},
    {"bogus": 1}, {"memory": 1, "extra": {}}, {"op": "restrict", "Memory": 1},
]


def test_malformed_requests_are_refused_and_the_node_keeps_serving(stack: Any) -> None:
    with NodeConnection(stack.node_path) as conn:
        for request in BAD_REQUESTS:
            with pytest.raises(NodeProtocolError) as e:
                conn.admin({"op": "restrict", **request})
            assert e.value.errno == errno.EINVAL, request
            assert "restrict" in str(e.value) and "\n" not in str(e.value)
        # nothing changed, and the connection still works
        assert conn.restrict()["memory_per_process"] is None
        assert conn.restrict(memory=0)["memory_per_process"] == 0
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.settimeout(30)
    raw.connect(stack.node_path)
    dec = wire.FrameDecoder()

    def recv() -> wire.Message:
        while (f := dec.next_frame()) is None:
            dec.feed(raw.recv(65536))
        return wire.decode(f)

    raw.sendall(wire.encode(wire.Hello(), 1))
    assert isinstance(recv(), wire.HelloReply)
    for n, payload in enumerate([b'{"op":"restrict","memory":1e999}',
                                 b'{"op":"restrict","compute":-Infinity}',
                                 b'{"op":"restrict","adapters":[' + b"9" * 30 + b"]}",
                                 b'{"op":"restrict","memory":' + b"9" * 5000 + b"}",
                                 b'["op","restrict"]', b'{"op":"restrict"'], 10):
        raw.sendall(wire.frame_bytes(wire.Kind.ADMIN, n, payload))
        reply = recv()
        assert isinstance(reply, wire.ErrorReply) and not reply.fatal, payload
        assert reply.errno == errno.EINVAL
    raw.close()
    with open_node(stack.node_path) as node:
        assert len(node.adapters()) == 2


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                  max_size=3),
    max_leaves=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(request=st.dictionaries(
    st.sampled_from(["memory", "compute", "adapters", "x"])
    | st.text(max_size=6).filter(lambda k: k != "op"),
    _JSON | st.lists(st.integers(0, (1 << 64) - 1), max_size=70), max_size=4))
def test_any_request_is_either_a_lowering_or_einval(stack: Any, request: dict[str, Any]) -> None:
    with NodeConnection(stack.node_path) as conn:
        before = conn.restrict()
        try:
            reply = conn.admin({"op": "restrict", **request})
        except NodeProtocolError as e:
            assert e.errno == errno.EINVAL, (request, str(e))
            return
        assert reply["restricted"]
        assert reply["compute_share"] <= before["compute_share"]
        if "memory" in request:
            assert reply["memory_per_process"] == request["memory"]
        if "adapters" in request:
            assert reply["only_luids"] == [f"0x{x:016x}" for x in sorted(set(request["adapters"]))]


# ---- a node whose driver cannot restrict ---------------------------------------------------------


class _OldDriver:
    """A NodeDriver from before "restrict": the node answers EOPNOTSUPP."""

    def __init__(self) -> None:
        self.rt = LoopThread("old-driver")

    def open_process(self, pid: int, uid: int, name: str, gids: tuple[int, ...] = ()) -> Any:
        return object()

    async def close_process(self, proc: Any) -> None:
        return None

    async def ioctl(self, proc: Any, code: int, arg: bytes, mem: Any) -> tuple[int, bytes]:
        return 0, arg

    async def admin(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"error": f"unknown admin op {request.get('op')!r}"}


def test_a_node_that_cannot_restrict_fails_the_open(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    driver = _OldDriver()
    try:
        with SocketNode(driver, tmp_path / "old.sock") as node:
            with NodeConnection(node.path) as conn:
                with pytest.raises(LimitsRefused) as e:
                    conn.restrict(memory=MiB)
                assert e.value.errno == errno.EOPNOTSUPP
            monkeypatch.setenv(LIMITS_ENV, "memory=1M")
            with pytest.raises(LimitsRefused):
                NodeConnection(node.path)  # never handed out unrestricted
            wait_until(lambda: node.connections() == [], what="the refused connection closed")
    finally:
        driver.rt.close()
