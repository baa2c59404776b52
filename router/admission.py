"""Load shedding: how many requests one router lets onto the nodes at once, and how many may wait for that.

Life of a request at the gate:
1. A free slot: it goes on at once.
2. All `max_active` slots taken: it waits in a FIFO queue of at most `max_queued` requests, for at most
   `queue_timeout_s`.
3. The queue is full, or the wait ran out: `Overloaded` at once (HTTP 429 with Retry-After, gRPC
   RESOURCE_EXHAUSTED), so a client backs off instead of waiting minutes behind a backlog.
4. When a request finishes (or fails, or its client leaves) its slots pass to the oldest waiter.

A request holds as many slots as Generate streams it runs on the nodes: an OpenAI request with n choices holds n
(capped at max_active, so it can always run). Memory stays bounded: at most max_active + max_queued requests are
held past tokenization by this router. The defaults (256 running, 512 waiting) keep a small cluster's decode batches
full while a burst is absorbed without unbounded queueing; size them per deployment with the router's flags.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

DEFAULT_MAX_ACTIVE = 256
DEFAULT_MAX_QUEUED = 512
DEFAULT_QUEUE_TIMEOUT_S = 30.0
# What a refused client is told to wait: a slot typically frees within one request's decode time.
RETRY_AFTER_S = 1


class Overloaded(Exception):
    """The router refuses a request for now; the client may retry after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: int = RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass(slots=True)
class _Waiter:
    slots: int
    granted: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Admission:
    def __init__(
        self,
        max_active: int = DEFAULT_MAX_ACTIVE,
        max_queued: int = DEFAULT_MAX_QUEUED,
        queue_timeout_s: float = DEFAULT_QUEUE_TIMEOUT_S,
    ) -> None:
        if max_active < 1 or max_queued < 0 or queue_timeout_s <= 0:
            raise ValueError("admission needs max_active >= 1, max_queued >= 0 and a positive queue timeout")
        self.max_active = max_active
        self.max_queued = max_queued
        self.queue_timeout_s = queue_timeout_s
        self.active = 0  # slots held by running requests
        self.refused = 0  # requests refused since start (for logs and tests)
        self._queue: collections.deque[_Waiter] = collections.deque()

    @property
    def queued(self) -> int:
        return len(self._queue)

    @contextlib.asynccontextmanager
    async def slot(self, streams: int = 1) -> AsyncIterator[None]:
        """Hold `streams` slots (capped at max_active) for the body of the `async with`; Overloaded if refused."""
        slots = max(1, min(streams, self.max_active))
        await self._acquire(slots)
        try:
            yield
        finally:
            self._release(slots)

    async def _acquire(self, slots: int) -> None:
        if not self._queue and self.active + slots <= self.max_active:
            self.active += slots
            return
        if len(self._queue) >= self.max_queued:
            self.refused += 1
            raise Overloaded(
                f"the router is overloaded: {self.active} requests running and {len(self._queue)} waiting; "
                "retry later"
            )
        waiter = _Waiter(slots)
        self._queue.append(waiter)
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                await asyncio.shield(waiter.granted)
        except TimeoutError:
            self.refused += 1
            self._forget(waiter)
            raise Overloaded(
                f"the router is overloaded: no slot freed within {self.queue_timeout_s:g} s; retry later"
            ) from None
        except asyncio.CancelledError:  # the client left while waiting
            self._forget(waiter)
            raise

    def _forget(self, waiter: _Waiter) -> None:
        """Drop a waiter that gave up; slots it was granted in the meantime go back."""
        if waiter.granted.done():
            self._release(waiter.slots)
        else:
            waiter.granted.cancel()
            with contextlib.suppress(ValueError):
                self._queue.remove(waiter)
            self._grant()  # a big waiter leaving the head may let smaller ones behind it in

    def _release(self, slots: int) -> None:
        self.active -= slots
        self._grant()

    def _grant(self) -> None:
        # Strict FIFO: the head waits for enough slots even if a smaller one behind it would fit (no starvation).
        while self._queue and self.active + self._queue[0].slots <= self.max_active:
            waiter = self._queue.popleft()
            self.active += waiter.slots
            waiter.granted.set_result(None)
