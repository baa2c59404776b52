"""A node that stops making progress leaves the cluster until it makes progress again.

A killed or paused (SIGSTOP) process stops renewing its lease, and routers drop it within about 2.5 s. A process that
is alive but stuck would not: its engine thread inside one step for seconds (a wedged kernel, a device hang), or its
event loop blocked, while the load publisher's own thread keeps renewing the lease and its requests wait. The
publisher asks `ProgressWatch.stalled()` before every heartbeat; while it names a stall, the node's registration is
withdrawn (every router's view drops it at once, and routers re-route or resume its requests: router/liveness.py),
and the node registers again as soon as both make progress again.

The engine's first step is not judged: it includes one-off warm-up (allocations, kernel selection) that can take
longer than any later step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

DEFAULT_STALL_S = 2.0
TICK_S = 0.25


class ProgressWatch:
    def __init__(
        self,
        step_started: Callable[[], float | None],
        stall_s: float = DEFAULT_STALL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """step_started: monotonic time the engine's current step began, None between steps and before the first
        step completed."""
        if stall_s <= TICK_S:
            raise ValueError(f"stall_s must be more than {TICK_S} s, got {stall_s}")
        self.stall_s = stall_s
        self._step_started = step_started
        self._clock = clock
        self._loop_tick = clock()

    def tick(self) -> None:
        """The event loop is alive (called from it every TICK_S)."""
        self._loop_tick = self._clock()

    async def tick_forever(self) -> None:
        while True:
            self.tick()
            await asyncio.sleep(TICK_S)

    def stalled(self) -> str | None:
        """Why the node is stuck, or None; safe to call from any thread."""
        now = self._clock()
        if now - self._loop_tick > self.stall_s:
            return f"the event loop has not run for {now - self._loop_tick:.1f} s"
        started = self._step_started()
        if started is not None and now - started > self.stall_s:
            return f"the engine has been in one step for {now - started:.1f} s"
        return None
