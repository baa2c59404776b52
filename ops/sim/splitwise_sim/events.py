"""SplitwiseSim's event loop semantics, which decide the order of simultaneous work.

- Events are ordered by time alone in a binary heap: ties fall as the heap leaves them, not first-in first-out.
  Scheduling the same events in the same order therefore replays SplitwiseSim's order exactly; a sequence number
  as a tie-breaker would not.
- An action scheduled with no delay runs at once, inside the action that scheduled it (a request's placement, a
  task's hand-over and a KV transfer's start happen within the event that caused them).
- A cancelled event stays in the heap (so the heap's shape, and with it the order of ties, is unchanged) and is
  skipped when it comes up.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

__all__ = ["Event", "EventLoop"]

Action = Callable[[], None]


class Event:
    __slots__ = ("action", "cancelled", "time")

    def __init__(self, time: float, action: Action) -> None:
        self.time, self.action, self.cancelled = time, action, False

    def __lt__(self, other: Event) -> bool:
        return self.time < other.time


class EventLoop:
    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[Event] = []
        self.processed = 0

    def schedule(self, delay: float, action: Action) -> Event | None:
        """Run `action` after `delay` seconds; at once (returning None) when the delay is zero."""
        if delay == 0:
            action()
            return None
        event = Event(self.now + delay, action)
        heapq.heappush(self._heap, event)
        return event

    def reschedule(self, event: Event, delay: float) -> Event | None:
        event.cancelled = True
        return self.schedule(delay, event.action)

    def run(self, end_time: float) -> None:
        heap = self._heap
        while heap and self.now < end_time:
            event = heapq.heappop(heap)
            if event.cancelled:
                continue
            self.now = event.time
            self.processed += 1
            event.action()
