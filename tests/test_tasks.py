"""TaskSet (eager calls, cancellation by owner) and Lanes (per-key order): the runtime pieces
every call of the node and the host goes through."""

import asyncio
import types

import pytest

from dxg.runtime.tasks import Lanes, TaskSet


def run(coro):
    return asyncio.run(coro)


def test_an_eager_call_that_never_waits_costs_no_task():
    async def main():
        tasks = TaskSet("t")

        async def quick():
            return 42

        out = tasks.eager(quick())
        assert out.done() and out.result() == 42
        assert len(tasks) == 0

    run(main())


def test_an_eager_call_that_waits_goes_on_as_a_task_of_the_set():
    async def main():
        tasks = TaskSet("t")
        gate = asyncio.get_running_loop().create_future()
        steps = []

        async def slow():
            steps.append("before")
            value = await gate
            steps.append("after")
            return value + 1

        out = tasks.eager(slow())
        assert steps == ["before"] and not out.done()  # ran inline up to its first wait
        assert len(tasks) == 1
        gate.set_result(1)
        assert await out == 2
        assert steps == ["before", "after"]
        await asyncio.sleep(0)
        assert len(tasks) == 0

    run(main())


def test_an_eager_call_fails_and_yields_like_a_task():
    async def main():
        tasks = TaskSet("t")

        async def boom():
            raise ValueError("no")

        async def nap():
            await asyncio.sleep(0)  # a bare yield
            return "rested"

        failed = tasks.eager(boom())
        assert isinstance(failed.exception(), ValueError)
        assert await tasks.eager(nap()) == "rested"

        @types.coroutine
        def odd():
            yield "not a future"

        async def strange():
            await odd()

        with pytest.raises(RuntimeError, match="yielded"):
            await tasks.eager(strange())
        assert len(tasks) == 0

    run(main())


def test_cancelling_the_outcome_or_the_set_cancels_the_waiting_call():
    async def main():
        tasks = TaskSet("t")
        cancelled = []

        async def wait_forever(tag):
            try:
                await asyncio.get_running_loop().create_future()
            except asyncio.CancelledError:
                cancelled.append(tag)
                raise

        one = tasks.eager(wait_forever("outcome"))
        one.cancel()
        two = tasks.eager(wait_forever("set"))
        await asyncio.sleep(0)
        tasks.cancel()
        await asyncio.wait_for(tasks.wait(), 5)
        assert sorted(cancelled) == ["outcome", "set"]
        assert two.cancelled()
        # A closed set takes nothing more.
        late = tasks.eager(wait_forever("late"))
        assert late.cancelled()
        with pytest.raises(RuntimeError):
            tasks.spawn(wait_forever("late"))

    run(main())


def test_lanes_keep_one_key_in_order_and_let_others_pass():
    async def main():
        lanes = Lanes()
        gate = asyncio.Event()
        done = []

        def job(tag, wait=False):
            async def go():
                if wait:
                    await gate.wait()
                done.append(tag)
                return tag
            return go

        a1 = asyncio.ensure_future(lanes.run("a", job("a1", wait=True)))
        a2 = asyncio.ensure_future(lanes.run("a", job("a2")))
        a3 = asyncio.ensure_future(lanes.run("a", job("a3")))
        b1 = asyncio.ensure_future(lanes.run("b", job("b1")))
        assert await b1 == "b1"  # another key passes the stuck one
        assert lanes.busy("a") and not lanes.busy("b")
        a2.cancel()  # cancelled while queued: a3 still waits for a1
        await asyncio.sleep(0)
        assert done == ["b1"]
        gate.set()
        assert await a3 == "a3" and await a1 == "a1"
        assert a2.cancelled()
        assert done == ["b1", "a1", "a3"]
        assert len(lanes) == 0

    run(main())


def test_start_makes_no_future_for_a_call_that_returns_at_once():
    async def main():
        loop = asyncio.get_running_loop()
        tasks = TaskSet("t", loop)
        gate = loop.create_future()

        async def quick():
            return 42

        async def fails():
            raise ValueError("no")

        async def cancelled():
            raise asyncio.CancelledError

        async def slow():
            return await gate

        assert tasks.start(quick()) is None and len(tasks) == 0
        out = tasks.start(fails())
        assert out is not None and out.done() and isinstance(out.exception(), ValueError)
        out = tasks.start(cancelled())
        assert out is not None and out.cancelled()
        out = tasks.start(slow(), "slow")
        assert out is not None and not out.done() and len(tasks) == 1
        gate.set_result(7)
        assert await out == 7
        await asyncio.sleep(0)
        assert len(tasks) == 0
        tasks.cancel()
        closed = quick()
        out = tasks.start(closed)
        assert out is not None and out.cancelled()
        assert closed.cr_frame is None  # closed without running

    run(main())
