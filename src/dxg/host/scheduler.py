"""Who runs next on an adapter's engine.

An adapter executes at most ``slots`` command buffers at once (one per host core by default:
the soft engine's NumPy work runs on worker threads and releases the GIL, and the host runs
BLAS single-threaded, so one slot is one core). Work that finds every slot taken waits; when a
slot frees, the waiting jobs are served by **fair shares** of the engine's time (weighted fair
queueing on virtual time, as CFS or WF2Q do it):

- every guest (partition) has an `EngineGroup` on the adapter and each of its processes an
  `EngineAccount`. The engine time a job uses, measured on the threads that ran it (fan-out
  helpers included: `charge`), advances its account's virtual time by ``ns / weight`` and its
  group's by ``ns / group weight``. A process's weight is its **compute share** (its guest's
  policy says it: PYDXG_SETPROCESSQUOTA; 1 by default); every guest weighs 1, so what a guest
  says about its own processes divides its part and never takes from another guest's;
- a freed slot goes to the group with the least virtual time, within it to the account with the
  least (jobs still running count as if charged now), and within that account to the waiting
  job of the highest context scheduling priority, then the one that waited longest;
- an account (or group) that had nothing waiting starts again no further behind the last one
  served than a bounded credit of its own engine time (as CFS places a task that wakes): 50 ms
  when it had nothing running either (``idle_lag_ns``: a process that comes back after a pause
  cannot take the engine over to catch up), 500 ms when its other jobs were still running
  (``busy_lag_ns``: a busy process whose next job was still on its way to the engine when a
  slot freed, or whose client was late with a submission, keeps what it is owed, while one that
  keeps using less than its share cannot bank it without end).

Context priorities therefore order the jobs of one process, never one process against another
(any process may set its own contexts to 7: a priority across processes would make every share
optional). A process that uses less than its share (a latency-sensitive one beside a flood) is
behind in virtual time, so it is first in line anyway. Nothing is preempted: a job keeps its slot
until it returns (a runaway buffer is stopped by the TDR: dxg.host.hwqueue). The scheduler is
work-conserving: a free slot with nobody waiting is taken at once, whatever the shares.

A running job may also **borrow** idle slots for a moment (`try_borrow` / `give_back`), to
spread one large op over cores nobody else wants (dxg.backends.fanout). A slot is lent only
while nobody waits, and lent, never held: a job that comes while it is lent starts at once (that
core runs two threads until the borrower's piece ends: the borrower sees `wanted()` and gives
the slot back before taking another), so borrowing never delays a job, whatever its priority.
`acquire` and `release` run on the host's event loop; borrowing and `charge` happen on the
engine's worker threads, so the counters they share are kept under a lock.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from typing import Any

__all__ = ["BUSY_LAG_NS", "IDLE_LAG_NS", "MAX_SHARE", "EngineAccount", "EngineGroup",
           "EngineScheduler", "Slot"]

MAX_SHARE = 10_000  # the largest compute share (a weight: 1 is everyone's default)
# The most engine time an account (or group) with nothing waiting keeps as credit (see above),
# when it had nothing running either, and when it did.
IDLE_LAG_NS = 50_000_000
BUSY_LAG_NS = 500_000_000


class _Share:
    """The engine time one process or one guest has used on an adapter, and its weight."""

    __slots__ = ("running", "started", "used_ns", "vtime", "weight")

    def __init__(self, weight: int = 1) -> None:
        self.weight = max(1, int(weight))
        self.vtime = 0.0  # virtual time: engine ns used / weight (raised when it comes back)
        self.used_ns = 0  # engine ns its jobs used (measured where they ran)
        self.running = 0  # slots its jobs hold now
        self.started = 0  # the sum of those jobs' grant times (monotonic ns)

    def effective(self, now: int) -> float:
        """Its virtual time with its running jobs charged up to ``now``."""
        return self.vtime + (self.running * now - self.started) / self.weight

    def _begin(self, now: int) -> None:
        self.running += 1
        self.started += now

    def _end(self, start: int, ns: int) -> None:
        self.running -= 1
        self.started -= start
        self.used_ns += ns
        self.vtime += ns / self.weight


class EngineGroup(_Share):
    """One guest's processes on one adapter (kept by its partition): guests share the engine by
    their weights (1 each), and the group's part goes to its accounts by theirs."""

    __slots__ = ("name", "ready", "vclock")

    def __init__(self, name: str = "", weight: int = 1) -> None:
        super().__init__(weight)
        self.name = name
        self.vclock = 0.0  # the virtual time of the last of its accounts served
        self.ready: dict[EngineAccount, None] = {}  # its accounts with jobs waiting

    def __repr__(self) -> str:
        return f"<EngineGroup {self.name!r} weight={self.weight} used={self.used_ns}ns>"


class EngineAccount(_Share):
    """One process's use of one adapter's engine (kept by the process): its weight (its compute
    share), the engine time it used, and its jobs waiting for a slot."""

    __slots__ = ("group", "name", "waiting")

    def __init__(self, group: EngineGroup, weight: int = 1, name: str = "") -> None:
        super().__init__(weight)
        self.group = group
        self.name = name
        # (-priority, arrival, future): a heap, the most urgent first
        self.waiting: list[tuple[int, int, asyncio.Future[Slot]]] = []

    def __repr__(self) -> str:
        return f"<EngineAccount {self.name!r} weight={self.weight} used={self.used_ns}ns>"

    def census(self, now: int | None = None) -> dict[str, Any]:
        """Its share, engine time (ns: of the jobs that ended; ``running_ns``: of those in a
        slot now, up to ``now``), and jobs running and waiting."""
        now = time.monotonic_ns() if now is None else now
        return {"share": self.weight, "engine_ns": self.used_ns,
                "running_ns": max(0, self.running * now - self.started),
                "running": self.running,
                "waiting": sum(not f.done() for _, _, f in self.waiting)}


class Slot:
    """One job's hold on an engine slot: whose it is, since when, and the engine time measured
    for it so far (`EngineScheduler.charge`): in all, and of that on borrowed slots."""

    __slots__ = ("account", "lent_ns", "ns", "released", "start")

    def __init__(self, account: EngineAccount, start: int) -> None:
        self.account = account
        self.start = start
        self.ns = 0
        self.lent_ns = 0
        self.released = False


class EngineScheduler:
    """Execution slots of one adapter, handed out by fair shares (then by priority within a
    process), and lent while idle."""

    def __init__(self, slots: int, idle_lag_ns: int = IDLE_LAG_NS,
                 busy_lag_ns: int = BUSY_LAG_NS) -> None:
        if slots < 1:
            raise ValueError("an engine needs at least one slot")
        self.slots = slots
        self.idle_lag_ns = idle_lag_ns
        self.busy_lag_ns = busy_lag_ns
        self.running = 0  # slots held by jobs (acquire .. release)
        self.borrowed = 0  # slots lent to running jobs' pieces right now
        self.peak = 0  # the most buffers that ever ran at once
        self.waiting = 0  # waiters not given up yet
        self.executed = 0
        self.lent = 0  # slots ever lent (one per borrow of one slot)
        self.hung = 0  # command buffers stopped by the TDR (dxg.host.hwqueue)
        # timelines (hardware queues, contexts) with submissions waiting or running: a GEMM
        # borrows idle slots only while its own is the only one (dxg.backends.fanout), since
        # two busy timelines already keep the slots busy and lending would only make a core run
        # two threads (updated on the host's loop; read, a plain int, from workers)
        self.timelines = 0
        self.vclock = 0.0  # the virtual time of the last group served
        self._ready: dict[EngineGroup, None] = {}  # groups with jobs waiting
        # Whose jobs come without an account (tools, tests): one process of one guest.
        self._default = EngineAccount(EngineGroup("default"), name="default")
        self._seq = itertools.count()
        # running, borrowed, waiting and the shares: the loop changes them, worker threads
        # borrow and charge against them. Held for a few arithmetic steps only, never across
        # an await or a callback.
        self._lock = threading.Lock()

    async def acquire(self, priority: int, account: EngineAccount | None = None) -> Slot:
        """A slot for a job of ``account`` (None: the default one) with context ``priority``
        (higher first among that account's jobs)."""
        account = account if account is not None else self._default
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.running < self.slots and not self.waiting:  # lent slots do not count
                return self._start(account, time.monotonic_ns())
            future: asyncio.Future[Slot] = loop.create_future()
            self._enqueue(account, priority, future)
            self.waiting += 1
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(future.result(), ran=False)  # granted just as it was cancelled
            else:
                with self._lock:
                    self.waiting -= 1
            raise

    def release(self, slot: Slot, ran: bool = True) -> int:
        """``slot`` is free (``ran``: after work ran in it): its engine time is charged to its
        account and group, and the waiter most behind its share gets it. Returns the engine ns
        charged."""
        with self._lock:
            if slot.released:
                raise ValueError("an engine slot released twice")
            slot.released = True
            if ran:
                self.executed += 1
            self.running -= 1
            ns = slot.ns
            slot.account._end(slot.start, ns)
            slot.account.group._end(slot.start, ns)
        self._grant()
        return ns

    def charge(self, slot: Slot, ns: int, lent: bool = False) -> None:
        """``ns`` of engine time ran for ``slot``'s job (any thread: its own, or with ``lent``
        a fan-out helper's in a borrowed slot); charged to its account when the slot is
        released."""
        if ns > 0:
            with self._lock:
                slot.ns += ns
                if lent:
                    slot.lent_ns += ns

    def _start(self, account: EngineAccount, now: int) -> Slot:
        """(Under the lock.) ``account``'s job takes a slot now."""
        self.running += 1
        self.peak = max(self.peak, self.running)
        account._begin(now)
        account.group._begin(now)
        return Slot(account, now)

    def _enqueue(self, account: EngineAccount, priority: int,
                 future: asyncio.Future[Slot]) -> None:
        """(Under the lock.) A job of ``account`` waits; an account or a group that had none
        waiting starts at most its credit behind the last one served."""
        group = account.group
        if not account.waiting:
            account.vtime = max(account.vtime, group.vclock - self._lag(account))
            if not group.ready:
                group.vtime = max(group.vtime, self.vclock - self._lag(group))
                self._ready[group] = None
            group.ready[account] = None
        heapq.heappush(account.waiting, (-priority, next(self._seq), future))

    def _lag(self, share: _Share) -> float:
        """The credit (virtual time) of an account or group that had nothing waiting."""
        return (self.busy_lag_ns if share.running else self.idle_lag_ns) / share.weight

    def _prune(self, account: EngineAccount) -> bool:
        """(Under the lock.) Drop the waiters of ``account`` that gave up from the top of its
        heap (counted off already); an account left with none is no longer ready. Whether it
        still has one waiting."""
        heap = account.waiting
        while heap and heap[0][2].done():
            heapq.heappop(heap)
        if heap:
            return True
        group = account.group
        group.ready.pop(account, None)
        if not group.ready:
            self._ready.pop(group, None)
        return False

    def _pick(self, now: int) -> tuple[EngineAccount, asyncio.Future[Slot]] | None:
        """(Under the lock.) The next waiter: the group, then the account, most behind its
        share (ties: the one whose job came first), then that account's most urgent job."""
        best: tuple[tuple[float, int], EngineGroup] | None = None
        for group in list(self._ready):
            heads = [a.waiting[0][1] for a in list(group.ready) if self._prune(a)]
            if not heads:
                continue
            key = (group.effective(now), min(heads))
            if best is None or key < best[0]:
                best = (key, group)
        if best is None:
            return None
        group = best[1]
        account = min(group.ready, key=lambda a: (a.effective(now), a.waiting[0][1]))
        group.vclock = max(group.vclock, account.effective(now))
        self.vclock = max(self.vclock, group.effective(now))
        _, _, future = heapq.heappop(account.waiting)
        self._prune(account)
        return account, future

    def _grant(self) -> None:
        """On the loop: free slots go to the waiters, by shares and then priority."""
        granted: list[tuple[asyncio.Future[Slot], Slot]] = []  # (resolved outside the lock)
        with self._lock:
            now = time.monotonic_ns()
            while self.running < self.slots and self._ready:
                picked = self._pick(now)
                if picked is None:
                    break
                account, future = picked
                self.waiting -= 1
                granted.append((future, self._start(account, now)))
        for future, slot in granted:
            future.set_result(slot)

    # ---- lending idle slots (any thread) -------------------------------------------------------

    def try_borrow(self, most: int) -> int:
        """Up to ``most`` idle slots (neither running a job nor lent) for a running job's
        pieces, at once (never waits); none while anyone waits for a slot."""
        with self._lock:
            if self.waiting or most < 1:
                return 0
            n = min(most, self.slots - self.running - self.borrowed)
            if n <= 0:
                return 0
            self.borrowed += n
            self.lent += n
            return n

    def give_back(self, n: int = 1) -> None:
        """``n`` borrowed slots are idle again (nobody waits for them: see `acquire`)."""
        with self._lock:
            if not 0 < n <= self.borrowed:
                raise ValueError(f"giving back {n} slots of {self.borrowed} borrowed")
            self.borrowed -= n

    def wanted(self) -> bool:
        """Whether a borrower should give its slot back now: a job took it meanwhile (more
        threads run than there are slots) or one waits."""
        with self._lock:
            return self.waiting > 0 or self.running + self.borrowed > self.slots

    def census(self) -> dict[str, Any]:
        with self._lock:
            return {"slots": self.slots, "running": self.running, "borrowed": self.borrowed,
                    "waiting": self.waiting, "executed": self.executed, "lent": self.lent,
                    "peak": self.peak, "hung": self.hung, "timelines": self.timelines}
