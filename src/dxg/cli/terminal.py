"""The terminal as `dxg top` uses it: keys one at a time with no echo (termios, signals kept so
Ctrl-C still interrupts), the alternate screen and a hidden cursor; everything is put back when
the view ends, however it ends (q, Ctrl-C, SIGTERM, a hang-up, an exception). Only SIGKILL
leaves the terminal as it was; `reset` then fixes it."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import termios
import time
from types import FrameType, MappingProxyType, TracebackType
from typing import Any, TextIO

__all__ = ["Terminal"]

_ENTER = "\x1b[?1049h\x1b[?25l\x1b[H\x1b[2J"  # alternate screen, cursor hidden, cleared
_LEAVE = "\x1b[0m\x1b[?25h\x1b[?1049l"  # attributes reset, cursor shown, main screen back
_STYLES = MappingProxyType({"title": "\x1b[1m", "header": "\x1b[7m"})  # bold, reverse


class _Stop(Exception):
    """SIGTERM or SIGHUP while the view runs: end it like q, terminal restored."""


class Terminal:
    """Raw keys in, whole frames out. ``keys_fd`` may be a non-terminal (no keys are read)."""

    __slots__ = ("_keys_fd", "_out", "_saved", "_signals", "_wake_r", "_wake_w")

    def __init__(self, keys_fd: int, out: TextIO) -> None:
        self._keys_fd = keys_fd if os.isatty(keys_fd) else None
        self._out = out
        self._saved: list[Any] | None = None
        self._signals: dict[int, Any] = {}
        self._wake_r = self._wake_w = -1

    def __enter__(self) -> Terminal:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self._signals = {signal.SIGWINCH: signal.signal(signal.SIGWINCH, self._resized),
                             signal.SIGTERM: signal.signal(signal.SIGTERM, self._stop),
                             signal.SIGHUP: signal.signal(signal.SIGHUP, self._stop)}
            if self._keys_fd is not None:
                self._saved = termios.tcgetattr(self._keys_fd)
                raw = termios.tcgetattr(self._keys_fd)
                raw[3] &= ~(termios.ICANON | termios.ECHO)  # lflag: no line editing, no echo
                raw[6][termios.VMIN] = 1
                raw[6][termios.VTIME] = 0
                termios.tcsetattr(self._keys_fd, termios.TCSANOW, raw)
            self._out.write(_ENTER)
            self._out.flush()
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        self._restore()
        return isinstance(exc, _Stop)  # a stop signal ends the view quietly

    def _restore(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._out.write(_LEAVE)
            self._out.flush()
        if self._saved is not None and self._keys_fd is not None:
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(self._keys_fd, termios.TCSADRAIN, self._saved)
            self._saved = None
        for signum, handler in self._signals.items():
            signal.signal(signum, handler)
        self._signals = {}
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def _resized(self, signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"w")

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        raise _Stop(signal.Signals(signum).name)

    def size(self) -> tuple[int, int]:
        """(columns, rows) of the terminal now."""
        try:
            size = os.get_terminal_size(self._out.fileno())
        except (OSError, ValueError):
            return 80, 24
        return max(20, size.columns), max(5, size.lines)

    def draw(self, lines: list[tuple[str, str]], width: int, height: int) -> None:
        """A whole frame: ``lines`` of (text, style), each at most ``width`` columns, at most
        ``height`` of them; every row is written (padded), so nothing of the last frame stays."""
        parts = []
        for row, (text, style) in enumerate(lines[:height]):
            lead = _STYLES.get(style, "")
            parts.append(f"\x1b[{row + 1};1H{lead}{text.ljust(width)[:width]}"
                         f"{chr(27) + '[0m' if lead else ''}")
        if len(lines) < height:
            parts.append(f"\x1b[{len(lines) + 1};1H\x1b[J")  # below the frame: cleared
        self._out.write("".join(parts))
        self._out.flush()

    def wait_key(self, timeout: float) -> str | None:
        """The keys typed within ``timeout`` seconds ("" on a resize: draw again), None when
        the time is up."""
        deadline = time.monotonic() + timeout
        fds = [self._wake_r] + ([self._keys_fd] if self._keys_fd is not None else [])
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select(fds, [], [], left)
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 64)
                return ""
            if self._keys_fd is not None and self._keys_fd in ready:
                data = os.read(self._keys_fd, 64)
                if not data:  # the terminal went away
                    raise _Stop("end of input")
                return data.decode("utf-8", "replace")
