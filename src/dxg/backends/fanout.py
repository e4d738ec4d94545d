"""Fan-out: one large op of a command buffer spread over engine slots nobody is using.

The host runs BLAS single-threaded and gives each command buffer one engine slot (one core), so
queues side by side scale with the cores. One queue alone (a GEMM submitted, then waited for, or
an MLP's GEMMs back to back) would then get one core where NumPy in its own process gets them
all; so when an op is big enough and slots are idle, the engine borrows those slots for a moment
(non-blocking: only idle slots, while no job waits), cuts the op into blocks and runs them at
once on the borrowed slots' helper threads and its own. NumPy's matmul into slices of the
destination releases the GIL, so the pieces really run in parallel. Work queued behind the op
on its own queue does not stop it: a queue runs its buffers in order, so its backlog could not
use the idle slots anyway; the lender refuses while a job of any queue waits for a slot, and a
helper hands its slot back before its next piece once a job wants it.

A GEMM is cut along the larger of C's dimensions (rows, or columns when C is wider than tall:
an MLP layer's 256 x 4096): every piece then re-packs only the smaller operand (BLAS packs the
whole of B for each call, and A for each call), so the pieces together do little more memory
work than one call would; a batch whose matrices are too small for that is cut by matrices.

A `FanOut` is made for one engine run by whoever owns the slots (the host:
dxg.host.hwqueue) and handed to `dxg.backends.engine.run`; it holds no state between runs and
nothing at module level. Helpers pull pieces from a shared list, so the current thread alone
finishes the op if no helper thread ever starts (a busy pool); a borrowed slot goes back as soon
as its helper runs out of pieces, or before its next piece once a job wants it (a job never
waits for a lent slot: dxg.host.scheduler).
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import Any, Protocol

import numpy as np

__all__ = ["MIN_FLOPS", "ROW_ALIGN", "FanOut", "Lender"]

NDArray = np.ndarray[Any, Any]

# An op smaller than this runs on its own thread: below ~2^27 flops (a 512 x 512 x 256 GEMM,
# a few ms on one core) a helper thread's wake-up and the smaller BLAS blocks cost more than
# the second core gives back.
MIN_FLOPS = 1 << 27
# Row (column) blocks start on multiples of this many rows (columns): whole BLAS panels
# (OpenBLAS's SGEMM kernels work on 16..128-row strips), so no piece has a ragged, slower edge in
# its middle.
ROW_ALIGN = 64


class Lender(Protocol):
    """Who owns the engine slots (dxg.host.scheduler.EngineScheduler); callable from any
    thread."""

    def try_borrow(self, most: int) -> int: ...

    def give_back(self, n: int = 1) -> None: ...

    def wanted(self) -> bool: ...


Submit = Callable[[Callable[[], None]], "Future[None]"]


class _Pieces:
    """The pieces of one fanned-out op, taken in turn by the threads working on it."""

    __slots__ = ("cond", "error", "helped", "next", "pieces", "running")

    def __init__(self, pieces: Sequence[Callable[[], None]]) -> None:
        self.pieces = pieces
        self.next = 0  # the next piece to take
        self.running = 0  # pieces taken and not finished
        self.helped = 0  # pieces helpers ran
        self.cond = threading.Condition()
        self.error: BaseException | None = None

    def take(self) -> Callable[[], None] | None:
        with self.cond:
            if self.next >= len(self.pieces) or self.error is not None:
                return None
            piece = self.pieces[self.next]
            self.next += 1
            self.running += 1
            return piece

    def run(self, piece: Callable[[], None], helper: bool) -> None:
        error = None
        try:
            piece()
        except BaseException as e:  # handed to the thread that waits for the op
            error = e
        with self.cond:
            if error is not None and self.error is None:
                self.error = error
            self.helped += helper
            self.running -= 1
            self.cond.notify_all()

    def wait(self) -> None:
        """Until no piece is running and none is left to take."""
        with self.cond:
            while self.running:
                self.cond.wait()


class FanOut:
    """Spreads the big ops of one engine run over idle engine slots of its adapter.

    ``lender`` lends the slots, ``submit(fn)`` runs ``fn`` on a helper thread (the host's
    worker pool), ``allowed()`` (asked at each op and by helpers before each piece; always yes
    by default) lets the owner forbid borrowing, ``charge(ns)``, when given, is told the time
    each helper spent on pieces (from the helper's thread)."""

    __slots__ = ("allowed", "charge", "helped", "lender", "min_flops", "split", "submit")

    def __init__(self, lender: Lender, submit: Submit,
                 allowed: Callable[[], bool] = lambda: True,
                 min_flops: int = MIN_FLOPS,
                 charge: Callable[[int], None] | None = None) -> None:
        self.lender = lender
        self.submit = submit
        self.allowed = allowed
        self.min_flops = min_flops
        # charge(ns): engine time a helper spent on pieces (the run's own thread is timed by
        # its owner): a borrowed slot's time counts for the job's share (dxg.host.scheduler).
        self.charge = charge
        self.split = 0  # ops fanned out in this run
        self.helped = 0  # pieces helper threads ran

    def matmul(self, a: NDArray, b: NDArray, c: NDArray) -> bool:
        """``np.matmul(a, b, out=c)`` in blocks (of C's rows or columns, or of the batch) over
        borrowed idle slots, when the op is big enough; False when it is not worth it or no
        slot is free (the caller runs it as one piece)."""
        batch = c.shape[0] if c.ndim == 3 else 1
        most = max(batch, -(-max(c.shape[-2:]) // ROW_ALIGN)) - 1  # helpers that could help
        lent = self._borrow(2 * c.size * a.shape[-1], most)
        if lent:
            self._run(lambda: _matmul_pieces(a, b, c, lent + 1), lent)
        return bool(lent)

    def spans(self, flops: int, n: int, fn: Callable[[int, int], None], align: int = 1) -> bool:
        """``fn(lo, hi)`` over blocks of ``[0, n)`` (starts on multiples of ``align``) that
        together do an op of ``flops``, over borrowed idle slots when it is worth it (as
        `matmul`); False when it did nothing (the caller runs ``fn(0, n)`` itself). For ops
        whose blocks are independent, e.g. the images of a convolution's batch."""
        lent = self._borrow(flops, -(-n // align) - 1)
        if lent:
            self._run(lambda: [functools.partial(fn, lo, hi)
                               for lo, hi in _bounds(n, lent + 1, align)], lent)
        return bool(lent)

    def _borrow(self, flops: int, most: int) -> int:
        """Idle slots to borrow for an op of ``flops`` with ``most`` pieces past the first."""
        if flops < self.min_flops or most < 1 or not self.allowed():
            return 0
        return self.lender.try_borrow(most)

    def _run(self, pieces: Callable[[], Sequence[Callable[[], None]]], lent: int) -> None:
        try:
            made = pieces()
        except BaseException:
            self.lender.give_back(lent)
            raise
        self.map(made, lent)

    def map(self, pieces: Sequence[Callable[[], None]], lent: int) -> None:
        """Run ``pieces`` (independent, any order) on this thread and ``lent`` helpers, one per
        slot already borrowed from the lender; every one of those slots is given back (by its
        helper, or here for a helper that never started). Returns once every piece ran and
        every slot is back (a helper that started has no piece left to run: it is about to give
        its slot back), so the run's next op finds them idle; raises the first error a piece
        raised."""
        work = _Pieces(pieces)
        futures: list[Future[None]] = []
        try:
            for _ in range(lent):
                futures.append(self.submit(lambda: self._helper(work)))
        except RuntimeError:  # the pool is shut down: this thread does the rest
            pass
        unstarted = lent - len(futures)
        while (piece := work.take()) is not None:
            work.run(piece, False)
        work.wait()
        self.split += 1
        self.helped += work.helped
        started = []
        for f in futures:
            if f.cancel():  # never started: its slot is given back here
                unstarted += 1
            else:
                started.append(f)
        if unstarted:
            self.lender.give_back(unstarted)
        wait_futures(started)
        if work.error is not None:
            raise work.error

    def _helper(self, work: _Pieces) -> None:
        """On a helper thread, in a borrowed slot: pieces until none is left, a job wants the
        slot back, or the owner no longer allows it."""
        charge = self.charge
        try:
            while (not self.lender.wanted() and self.allowed()
                   and (piece := work.take()) is not None):
                # (timed inside the piece: charged before the op can be seen done)
                work.run(piece if charge is None else functools.partial(_timed, piece, charge),
                         True)
        finally:
            self.lender.give_back(1)


def _timed(piece: Callable[[], None], charge: Callable[[int], None]) -> None:
    """``piece()``, then ``charge`` the nanoseconds it took on this thread."""
    t0 = time.monotonic_ns()
    try:
        piece()
    finally:
        charge(time.monotonic_ns() - t0)


def _bounds(n: int, parts: int, align: int) -> list[tuple[int, int]]:
    """``n`` split into at most ``parts`` near-equal spans whose starts are multiples of
    ``align`` (the last one takes the remainder)."""
    units = -(-n // align)
    parts = max(1, min(parts, units))
    cuts = [min(n, (units * i // parts) * align) for i in range(parts + 1)]
    return [(lo, hi) for lo, hi in itertools.pairwise(cuts) if hi > lo]


def _matmul_pieces(a: NDArray, b: NDArray, c: NDArray,
                   parts: int) -> list[Callable[[], None]]:
    """``parts`` pieces of ``np.matmul(a, b, out=c)``: blocks of C's rows (A's rows with them,
    B whole), or of its columns when C has more columns than rows (B's columns with them, A
    whole), every piece as big as the next; or blocks of the batch when the matrices are too
    small for either."""
    rows, cols = c.shape[-2:]
    if c.ndim == 3 and max(rows, cols) < ROW_ALIGN * parts:

        def batch_piece(lo: int, hi: int) -> Callable[[], None]:
            return lambda: np.matmul(a[lo:hi], b[lo:hi], out=c[lo:hi])

        return [batch_piece(lo, hi) for lo, hi in _bounds(c.shape[0], parts, 1)]

    if cols > rows:

        def col_piece(lo: int, hi: int) -> Callable[[], None]:
            return lambda: np.matmul(a, b[..., lo:hi], out=c[..., lo:hi])

        return [col_piece(lo, hi) for lo, hi in _bounds(cols, parts, ROW_ALIGN)]

    def row_piece(lo: int, hi: int) -> Callable[[], None]:
        return lambda: np.matmul(a[..., lo:hi, :], b, out=c[..., lo:hi, :])

    return [row_piece(lo, hi) for lo, hi in _bounds(rows, parts, ROW_ALIGN)]
