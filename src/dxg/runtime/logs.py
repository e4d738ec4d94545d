"""Log lines a peer can provoke, limited: the first few of a kind are written, the rest of a
burst are counted and summed up in one line, so a hostile host or guest that sends a flood of bad
messages cannot flood the log (and the disk) with them."""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["LogLimiter"]


class LogLimiter:
    """Per owner (a host link, a partition): at most ``burst`` lines of each key per
    ``window`` seconds, then one line saying how many were held back."""

    __slots__ = ("_burst", "_counts", "_logger", "_window")

    def __init__(self, logger: logging.Logger, burst: int = 5, window: float = 60.0) -> None:
        self._logger = logger
        self._burst = burst
        self._window = window
        self._counts: dict[str, list[float]] = {}  # key -> [window start, written, held back]

    def log(self, level: int, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        entry = self._counts.get(key)
        if entry is None or now - entry[0] >= self._window:
            if entry is not None and entry[2]:
                self._logger.log(level, "%d more %r messages were held back in %gs", entry[2],
                                 key, self._window)
            if len(self._counts) > 256:
                self._counts.clear()  # keys come from a fixed set of call sites; stay bounded
            entry = self._counts[key] = [now, 0, 0]
        if entry[1] < self._burst:
            entry[1] += 1
            self._logger.log(level, msg, *args)
            if entry[1] == self._burst:
                self._logger.log(level, "(further %r messages are held back for %gs)", key,
                                 self._window)
        else:
            entry[2] += 1
