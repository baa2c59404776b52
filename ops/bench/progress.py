"""A live progress line for a running benchmark, on stderr so that stdout stays clean for results.

On a terminal the line is redrawn in place (carriage return + erase to end of line) at most every
`tty_interval_s`; anywhere else (a log file, CI) a plain line is written at most every `plain_interval_s`, so logs
stay short. `close()` always writes the final state and ends the line.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

__all__ = ["Progress"]

_ERASE_TO_END = "\x1b[K"


class Progress:
    def __init__(
        self,
        total: int,
        *,
        label: str = "bench",
        stream: TextIO | None = None,
        tty: bool | None = None,
        tty_interval_s: float = 0.1,
        plain_interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if total < 0:
            raise ValueError(f"total must be >= 0, not {total}")
        self.total = total
        self.sent = 0
        self.completed = 0  # finished, successfully or not
        self.failed = 0
        self._label = label
        self._stream = stream if stream is not None else sys.stderr
        self._tty = _isatty(self._stream) if tty is None else tty
        self._interval = tty_interval_s if self._tty else plain_interval_s
        self._clock = clock
        self._started = clock()
        self._last_render: float | None = None
        self._closed = False

    def request_sent(self) -> None:
        self.sent += 1
        self._maybe_render()

    def request_done(self, *, failed: bool = False) -> None:
        self.completed += 1
        self.failed += int(failed)
        self._maybe_render()

    def line(self) -> str:
        elapsed = self._clock() - self._started
        rate = self.completed / elapsed if elapsed > 0 else 0.0
        share = f"{100.0 * self.completed / self.total:5.1f}%" if self.total else "  -  "
        parts = [
            f"{self._label} {self.completed:>{len(str(self.total))}}/{self.total} {share}",
            f"in flight {max(0, self.sent - self.completed)}",
            f"errors {self.failed}",
            f"{rate:.2f} req/s",
            f"elapsed {_clock_time(elapsed)}",
        ]
        if rate > 0 and self.completed < self.total:
            parts.append(f"eta {_clock_time((self.total - self.completed) / rate)}")
        return " | ".join(parts)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._render(final=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _maybe_render(self) -> None:
        if self._closed:
            return
        now = self._clock()
        if self._last_render is None or now - self._last_render >= self._interval:
            self._last_render = now
            self._render(final=False)

    def _render(self, *, final: bool) -> None:
        if self._tty:
            self._stream.write("\r" + self.line() + _ERASE_TO_END + ("\n" if final else ""))
        else:
            self._stream.write(self.line() + "\n")
        self._stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-less stream
        return False


def _clock_time(seconds: float) -> str:
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
