"""Cuts generated text exactly at the first stop string, even when one arrives split across streamed deltas.

Text that might be the start of a stop string is held back from the stream until the next token shows whether it
is: a client never receives characters that the final text will not contain.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class StopStringMatcher:
    stops: list[str]
    text: str = ""  # everything decoded so far
    emitted: int = 0  # how much of `text` the stream has been given
    stopped_at: int | None = None  # index in `text` where the first stop string begins

    def feed(self, delta: str) -> str:
        """Add decoded text; return what may be streamed now. After a match, `stopped_at` is set."""
        if self.stopped_at is not None or not delta:
            return ""
        longest = max((len(s) for s in self.stops), default=0)
        search_from = max(0, len(self.text) - longest + 1)
        self.text += delta
        if self.stops:
            hits = [i for s in self.stops if (i := self.text.find(s, search_from)) >= 0]
            if hits:
                self.stopped_at = min(hits)
                return self._emit_to(self.stopped_at)
        return self._emit_to(len(self.text) - self._held_back())

    def flush(self) -> str:
        """At the end of generation nothing more can complete a stop string: release what was held back."""
        end = self.stopped_at if self.stopped_at is not None else len(self.text)
        return self._emit_to(end)

    @property
    def final_text(self) -> str:
        return self.text if self.stopped_at is None else self.text[: self.stopped_at]

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text)), best, -1):
                if self.text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def _emit_to(self, end: int) -> str:
        end = max(end, self.emitted)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
