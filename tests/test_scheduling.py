"""Sharing an adapter's engine (dxg.host.scheduler, docs/execution.md "Compute shares"): the
engine time of busy processes splits by their compute shares (weights from the guest's policy,
told to the host with the process's quotas), guests split it equally whatever they say of their
own processes, priorities order the jobs of one process only, nothing is banked while idle; and
the TDR (dxg.host.hwqueue.Watchdog): a buffer that runs past the limit is stopped between
commands, its device alone goes HUNG, its waiters wake with an error, others carry on.

The scheduler's own tests drive it on an event loop with engine time charged by hand (exact);
the end-to-end ones use real client processes of real users (tests/clients/gemmflood.py: they
start as root and become the user, so they need root, as CI is) and measure engine time from the
host's census, with tolerances that hold on a busy 2-core machine (the benchmark,
bench/compute_share.py, measures the 5% figure). Waits have deadlines, never fixed sleeps."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from conftest import CLIENTS, make_stack, read_json_line, wait_until
from dxg.backends.softcmd import CommandBuffer, DType, Operand
from dxg.client import DxgError, open_node
from dxg.client.execution import DeviceFault
from dxg.guest.policy import parse_policy
from dxg.host.scheduler import EngineAccount, EngineGroup, EngineScheduler, Slot
from dxg.uapi.statistics import QUERY_ADAPTER

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="runs clients as other users")
ALICE, BOB = 41101, 41102  # (numeric: nothing needs to exist in /etc/passwd)
F32 = DType.of(np.float32)
HUNG = 3  # D3DKMT_DEVICEEXECUTION_HUNG
MS = 1_000_000


# ---- the scheduler alone ----------------------------------------------------------------------


async def _busy(engine: EngineScheduler, accounts: dict[str, EngineAccount], grants: int,
                ns: int = MS, per: int = 4) -> dict[str, int]:
    """``per`` jobs of each account always waiting; each granted slot is charged ``ns`` and
    released at once, until ``grants`` slots were given: how many each account got."""
    got = dict.fromkeys(accounts, 0)
    left = [grants]

    async def worker(name: str) -> None:
        while left[0] > 0:
            slot = await engine.acquire(0, accounts[name])
            if left[0] <= 0:
                engine.release(slot, ran=False)
                return
            left[0] -= 1
            got[name] += 1
            engine.charge(slot, ns)
            await asyncio.sleep(0)  # (the others queue up meanwhile)
            engine.release(slot)

    await asyncio.gather(*(worker(name) for name in accounts for _ in range(per)))
    return got


def test_a_busy_engine_is_shared_by_weight() -> None:
    async def scenario() -> dict[str, int]:
        engine = EngineScheduler(2)
        group = EngineGroup("guest")
        accounts = {"a": EngineAccount(group, 3, "a"), "b": EngineAccount(group, 1, "b")}
        got = await _busy(engine, accounts, 400)
        assert accounts["a"].used_ns == got["a"] * MS and accounts["b"].used_ns == got["b"] * MS
        assert engine.census()["running"] == 0 and engine.census()["waiting"] == 0
        return got

    got = asyncio.run(scenario())
    assert abs(got["a"] - 300) <= 4 and abs(got["b"] - 100) <= 4, got


def test_guests_share_equally_whatever_weights_they_give_their_processes() -> None:
    async def scenario() -> dict[str, int]:
        engine = EngineScheduler(1)
        greedy, modest = EngineGroup("greedy guest"), EngineGroup("modest guest")
        accounts = {"greedy": EngineAccount(greedy, 10_000), "modest": EngineAccount(modest, 1),
                    "modest2": EngineAccount(modest, 1)}
        return await _busy(engine, accounts, 400)

    got = asyncio.run(scenario())
    assert abs(got["greedy"] - 200) <= 4, got  # half for each guest...
    assert abs(got["modest"] - got["modest2"]) <= 4, got  # ...split within the guest


def test_an_idle_process_banks_no_more_than_the_lag() -> None:
    """A process that comes back after the others used the engine alone gets its share from
    then on (and at most ``lag_ns`` of engine time ahead), not the engine until it has caught
    up."""

    async def scenario() -> dict[str, int]:
        engine = EngineScheduler(1, idle_lag_ns=5 * MS)
        group = EngineGroup("guest")
        a, b = EngineAccount(group, 1, "a"), EngineAccount(group, 1, "b")
        await _busy(engine, {"a": a}, 100)  # b idle meanwhile
        assert a.used_ns == 100 * MS and b.used_ns == 0
        return await _busy(engine, {"a": a, "b": b}, 40)

    got = asyncio.run(scenario())
    # b may catch up the 5 ms it was placed behind (5 jobs), then gets half of the rest
    assert 20 <= got["b"] <= 5 + 35 // 2 + 2, got


def test_priorities_order_the_jobs_of_a_process_and_never_another_process() -> None:
    """Within a process the highest context priority goes first; between processes the one
    most behind its share goes first, whatever the other's priorities; a waiter that gives up
    is passed over."""

    async def scenario() -> list[str]:
        engine = EngineScheduler(1)
        group = EngineGroup("guest")
        heavy, light = EngineAccount(group, 1, "heavy"), EngineAccount(group, 1, "light")
        blocker = await engine.acquire(0, heavy)  # heavy runs a long job...
        order: list[str] = []
        slots: list[Slot] = []

        async def job(name: str, account: EngineAccount, priority: int) -> None:
            slots.append(await engine.acquire(priority, account))
            order.append(name)

        tasks = [asyncio.ensure_future(job(*spec)) for spec in (
            ("heavy low", heavy, -7), ("heavy high", heavy, 7), ("light low", light, -7),
            ("light gone", light, 7), ("light mid", light, 0))]
        while engine.waiting < 5:
            await asyncio.sleep(0)
        tasks[3].cancel()  # gives up before its turn
        await asyncio.sleep(0)
        engine.charge(blocker, 5 * MS)  # ...of 5 ms, while light's jobs wait
        engine.release(blocker)
        for i in range(4):
            while len(order) <= i:
                await asyncio.sleep(0)
            engine.charge(slots[i], MS // 10)
            engine.release(slots[i])
        await asyncio.gather(*tasks[:3], tasks[4])
        census = engine.census()
        assert census["waiting"] == 0 and census["running"] == 0 and census["executed"] == 5
        return order

    order = asyncio.run(scenario())
    # light is behind its share: both its jobs first (mid before low), then heavy's, high first
    assert order == ["light mid", "light low", "heavy high", "heavy low"], order


def test_fan_out_helpers_charge_their_time_to_the_borrowing_job() -> None:
    """The time helper threads spend on a fanned-out op's pieces, in the slots the job
    borrowed, is charged to the job (and so to its process's share) before the op is done."""
    from concurrent.futures import ThreadPoolExecutor

    from dxg.backends.fanout import FanOut

    async def scenario() -> tuple[Slot, EngineScheduler]:
        engine = EngineScheduler(3)
        return await engine.acquire(0), engine

    slot, engine = asyncio.run(scenario())
    pieces = [lambda: time.sleep(0.02) for _ in range(6)]
    with ThreadPoolExecutor(2) as pool:
        fan = FanOut(engine, pool.submit, lambda: True,
                     charge=lambda ns: engine.charge(slot, ns, lent=True))
        assert engine.try_borrow(2) == 2
        fan.map(pieces, 2)
    assert fan.helped >= 1 and slot.lent_ns >= fan.helped * 20 * MS * 0.9
    assert slot.ns == slot.lent_ns  # (this thread's own time is its owner's to charge)
    assert engine.release(slot) == slot.ns and slot.account.used_ns == slot.ns


def test_a_slot_released_twice_is_refused() -> None:
    async def scenario() -> None:
        engine = EngineScheduler(1)
        slot = await engine.acquire(0)
        engine.release(slot)
        with pytest.raises(ValueError, match="twice"):
            engine.release(slot)

    asyncio.run(scenario())


# ---- real processes -----------------------------------------------------------------------------


class Flood:
    """A gemmflood client process of ``uid``."""

    def __init__(self, node: str, uid: int, n: int = 256, queues: int = 4,
                 depth: int = 2) -> None:
        self.p = subprocess.Popen(
            [sys.executable, str(CLIENTS / "gemmflood.py"), node, str(uid), str(n), str(queues),
             str(depth)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.pid = int(read_json_line(self.p, 60)["pid"])

    def ask(self, cmd: str) -> dict[str, Any]:
        assert self.p.stdin is not None
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return read_json_line(self.p, 120)

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                assert self.p.stdin is not None
                self.p.stdin.close()
                self.p.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                self.p.kill()
                self.p.wait()


def _compute(host: Any, pid: int) -> dict[str, Any]:
    """The host census's compute figures of the process ``pid``."""
    for part in host.census()["partitions"]:
        for proc in part["processes"]:
            if proc["pid"] == pid:
                return proc["compute"]
    raise AssertionError(f"pid {pid} is not on the host")


def _engine_ns(host: Any, pid: int) -> int:
    return sum(a["engine_ns"] for a in _compute(host, pid)["adapters"])


@needs_root
def test_the_policys_shares_reach_the_host_and_split_a_busy_adapter(public_dir: Path) -> None:
    """Two users' processes with compute shares 3 and 1 (from the guest's policy, told to the
    host) keep one adapter's two slots busy: the engine time the host measures for them splits
    about 3:1 (bench/compute_share.py measures it to 5%, against a 1:1 baseline)."""
    policy = parse_policy(f"[[rules]]\nuids = [{ALICE}]\ncompute_share = 3\n"
                          f"[[rules]]\nuids = [{BOB}]\ncompute_share = 1\n")
    with (threadpool_limits(1, user_api="blas"),  # as `dxg up` runs BLAS: a slot, a core
          make_stack(public_dir, "sh", adapters=1, driver_kw={"policy": policy}) as s):
        s.host.adapters[0].engine = EngineScheduler(2)  # two slots, whatever the machine has
        floods = [Flood(s.node_path, uid, n=512, queues=4, depth=6) for uid in (ALICE, BOB)]
        try:
            alice, bob = floods
            assert _compute(s.host, alice.pid)["share"] == 3
            assert _compute(s.host, bob.pid)["share"] == 1
            grants = {p["pid"]: p["grant"] for p in s.driver.snapshot()["processes"]}
            assert grants[alice.pid]["compute_share"] == 3
            for f in floods:
                f.ask("go")
            wait_until(lambda: all(_engine_ns(s.host, f.pid) > 0 for f in floods), 60,
                       "both floods on the engine")
            start = {f.pid: _engine_ns(s.host, f.pid) for f in floods}

            def used() -> dict[int, int]:
                return {f.pid: _engine_ns(s.host, f.pid) - start[f.pid] for f in floods}

            # (about 4 s of both slots: hundreds of scheduling decisions)
            wait_until(lambda: sum(used().values()) > 8e9, 120, "8 s of engine time")
            got = used()
            census = s.host.census()["adapters"][0]["scheduler"]
            for f in floods:
                f.ask("pause")
        finally:
            for f in floods:
                f.close()
    ratio = got[alice.pid] / max(1, got[bob.pid])
    assert 2.0 <= ratio <= 4.5, (ratio, got)  # (1:1 without shares; 3 on a quiet machine)
    assert census["waiting"] > 0  # both kept the engine busy: the shares decided


def _submit(dev: Any, queue: Any, cmd: CommandBuffer) -> int:
    raw = cmd.tobytes()
    buf = dev.allocate(len(raw))
    buf.upload(raw)
    return int(queue.submit(int(buf.map_gpu()), len(raw)))


def _op(vx: int, n: int) -> Operand:
    return Operand(vx, F32, (n,))


def test_context_priorities_still_order_a_processs_waiting_buffers(tmp_path: Path) -> None:
    """With the engine's only slot held, a process's buffers on a low- and a high-priority
    context wait; when the slot frees, the high-priority one runs first (its result says the
    order: x = (x + 1) * 2 * 2 only if the add ran before both doublings)."""
    with make_stack(tmp_path, "pr", adapters=1) as s:
        engine = s.host.adapters[0].engine = EngineScheduler(1)
        with open_node(s.node_path) as node, node.adapters()[0].create_device() as dev:
            low1, low2, high = (dev.create_context() for _ in range(3))
            low1.set_priority(-7)
            low2.set_priority(-7)
            high.set_priority(7)
            queues = [c.hwqueue() for c in (low1, low2, high)]
            x = dev.array(np.ones(64, np.float32))
            one = dev.array(np.ones(64, np.float32))
            vx, v1 = int(x.map_gpu()), int(one.map_gpu())
            double = CommandBuffer().binary("add", _op(vx, 64), _op(vx, 64), _op(vx, 64))
            add = CommandBuffer().binary("add", _op(vx, 64), _op(vx, 64), _op(v1, 64))

            async def hold() -> Slot:
                return await engine.acquire(0)

            slot = s.host.rt.run(hold(), timeout=10)
            try:
                done = [_submit(dev, queues[0], double), _submit(dev, queues[1], double),
                        _submit(dev, queues[2], add)]
                wait_until(lambda: engine.census()["waiting"] == 3, 20, "three buffers waiting")
            finally:
                s.host.rt.call(engine.release, slot)
            for q, value in zip(queues, done, strict=True):
                q.wait(value, timeout=30)
            assert np.all(x.download() == 8.0), x.download()[:4]


def _statistics(node: Any, adapter: Any) -> Any:
    from dxg.client import thunks as t
    from dxg.uapi import structs as st
    from dxg.uapi.statistics import StatisticsRecord

    args = st.d3dkmt_querystatistics()
    args.type = QUERY_ADAPTER
    args.adapter_luid.a, args.adapter_luid.b = adapter.luid_parts
    assert t.D3DKMTQueryStatistics(node.conn, args) == 0
    return StatisticsRecord.of(args)


def test_the_tdr_stops_a_runaway_buffer_and_hangs_only_its_device(tmp_path: Path) -> None:
    """A buffer of thousands of GEMMs, far longer than the limit (0.5 s here), is stopped
    between two of them: its device goes HUNG (GetDeviceState says so, its queue's waiter and
    its fence's waiter wake with an error, its next submission is refused), the TDR counts as
    a fault; another process's queue and another device of the same process carry on."""
    with make_stack(tmp_path, "tdr", adapters=1, tdr_seconds=0.5) as s:
        flood = Flood(s.node_path, 0, n=128, queues=1, depth=2)  # another process, busy
        try:
            flood.ask("go")
            wait_until(lambda: flood.ask("count")["done"] > 0, 30, "the other process working")
            with open_node(s.node_path) as node:
                ad = node.adapters()[0]
                dev, good = ad.create_device(), ad.create_device()
                q = dev.create_context().hwqueue()
                fence = dev.fence()
                n = 384
                a = dev.array(np.ones((n, n), np.float32))
                c = dev.empty((n, n), np.float32)
                va, vc = int(a.map_gpu()), int(c.map_gpu())
                cmd = CommandBuffer()
                for _ in range(3000):  # minutes of work on one core
                    cmd.gemm(Operand(vc, F32, (n, n)), Operand(va, F32, (n, n)),
                             Operand(va, F32, (n, n)))
                woke: list[BaseException] = []

                def wait_fence() -> None:
                    try:
                        fence.wait(1, timeout=60)
                    except BaseException as e:  # (what the waiter got)
                        woke.append(e)

                t0 = time.monotonic()
                done = _submit(dev, q, cmd)
                q.signal(fence, 1)  # after the buffer: it never comes
                waiter = threading.Thread(target=wait_fence)
                waiter.start()
                before = flood.ask("count")["done"]
                with pytest.raises(DeviceFault) as e:
                    q.wait(done, timeout=120)
                elapsed = time.monotonic() - t0
                waiter.join(60)
                assert e.value.state == HUNG and "HUNG" in str(e.value)
                assert elapsed >= 0.5, elapsed

                def reasons() -> list[str]:
                    return [d.fault_reason for p in s.host.partitions()
                            for proc in p.processes.values() for d in proc.devices.values()
                            if d.fault_reason]

                (why,) = s.host.rt.call(reasons)
                stopped = int(why.rsplit("before command ", 1)[1])
                assert "TDR" in why and 0 < stopped < 3000, why  # at the limit, not the end
                assert dev.execution_state() == HUNG
                assert len(woke) == 1 and isinstance(woke[0], DxgError), woke
                with pytest.raises(DxgError):
                    _submit(dev, q, CommandBuffer().nop())
                # the other process kept working, and works on
                wait_until(lambda: flood.ask("count")["done"] > before + 4, 30,
                           "the other process's GEMMs after the TDR")
                y = good.array(np.ones(16, np.float32))
                qg = good.create_context().hwqueue()
                vy = int(y.map_gpu())
                qg.wait(_submit(good, qg, CommandBuffer().binary(
                    "add", _op(vy, 16), _op(vy, 16), _op(vy, 16))), timeout=30)
                assert np.all(y.download() == 2) and good.execution_state() == 1
                assert _statistics(node, ad).faults == 1
                assert s.host.census()["adapters"][0]["scheduler"]["hung"] == 1
                flood.ask("pause")
        finally:
            flood.close()


def test_a_buffer_that_ends_in_time_is_not_hung_and_zero_turns_the_tdr_off(
        tmp_path: Path) -> None:
    """With the TDR off (0) a buffer runs as long as it takes; HostConfig refuses a negative
    limit."""
    from dxg.host.config import HostConfig

    with pytest.raises(ValueError, match="tdr_seconds"):
        HostConfig(tdr_seconds=-1).validate()
    with make_stack(tmp_path, "off", adapters=1, tdr_seconds=0) as s, \
            open_node(s.node_path) as node, node.adapters()[0].create_device() as dev:
        q = dev.create_context().hwqueue()
        n = 256
        a = dev.array(np.ones((n, n), np.float32))
        c = dev.empty((n, n), np.float32)
        va, vc = int(a.map_gpu()), int(c.map_gpu())
        cmd = CommandBuffer()
        for _ in range(40):
            cmd.gemm(Operand(vc, F32, (n, n)), Operand(va, F32, (n, n)), Operand(va, F32, (n, n)))
        q.wait(_submit(dev, q, cmd), timeout=60)
        assert dev.execution_state() == 1 and c.download()[0, 0] == n


# ---- where shares and the limit come from ---------------------------------------------------------


def test_shares_come_from_the_policy_and_its_flag() -> None:
    """``compute_share`` in a rule or [defaults], ``--compute-share`` over the defaults (rules
    inherit it); root gets the defaults' share unless a rule names it."""
    policy = parse_policy(f"[defaults]\ncompute_share = 2\n[[rules]]\nuids = [{ALICE}]\n"
                          f"compute_share = 5\n[[rules]]\nuids = [{BOB}]\n")
    assert policy.grant_for(ALICE).compute_share == 5
    assert policy.grant_for(BOB).compute_share == 2  # inherited
    assert policy.grant_for(0).compute_share == 2 and policy.grant_for(0).rule == "root"
    assert policy.has_compute_shares and not policy.has_memory_quotas
    flagged = parse_policy(f"[[rules]]\nuids = [{ALICE}]\n", compute_share=7)
    assert flagged.grant_for(ALICE).compute_share == 7 and flagged.grant_for(BOB).compute_share == 7
    assert not parse_policy("").has_compute_shares
    assert "compute share 7" in flagged.describe()


def test_the_flags_are_checked_with_one_line_each() -> None:
    from dxg.cli.main import build_parser

    args = build_parser().parse_args(["up", "--tdr", "0.5", "--compute-share", "3"])
    assert (args.tdr, args.compute_share) == (0.5, 3)
    assert build_parser().parse_args(["host", "--listen", "x"]).tdr == 2.0
    for argv, message in ((["up", "--compute-share", "0"], "is not a compute share"),
                          (["guest", "--connect", "x", "--compute-share", "x"], "compute share"),
                          (["host", "--listen", "x", "--tdr", "-1"], "is not a TDR limit"),
                          (["up", "--tdr", "nan"], "is not a TDR limit")):
        r = subprocess.run([sys.executable, "-m", "dxg.cli.main", *argv], capture_output=True,
                           text=True, timeout=60, check=False)
        assert r.returncode == 2 and message in r.stderr.splitlines()[-1], (argv, r.stderr)


def test_a_host_refuses_a_share_outside_1_to_10000(tmp_path: Path) -> None:
    """PYDXG_SETPROCESSQUOTA carries the share (u32); the host takes 1..10000 and sets the
    process's accounts' weight, and refuses anything else (INVALID_PARAMETER)."""
    from dxg.guest import vmbus
    from dxg.guest.process import existing_host_process
    from dxg.protocol import messages as m
    from dxg.uapi.ntstatus import NTSTATUS

    body = m.ProcessQuota(7, m.NO_LIMIT, 1 << 20, 9)
    assert len(body.pack()) == 32 and m.ProcessQuota.unpack(body.pack()) == body
    with make_stack(tmp_path, "q", adapters=1) as s, open_node(s.node_path) as node, \
            node.adapters()[0].create_device():
        (proc,) = s.driver.processes()
        link = s.driver.links()[0]
        hprocess = s.driver.rt.call(existing_host_process, proc, link)

        def send(share: int) -> int:
            return s.driver.rt.run(vmbus.set_process_quota(link, hprocess, 5, None, None, share))

        pid = os.getpid()
        assert send(0) == send(10_001) == send((1 << 32) - 1) == NTSTATUS.STATUS_INVALID_PARAMETER
        assert _compute(s.host, pid)["share"] == 1
        assert send(10_000) == NTSTATUS.STATUS_SUCCESS
        assert _compute(s.host, pid)["share"] == 10_000
