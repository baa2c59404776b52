"""Sends a workload through a driver: open loop at the workload's arrival times, or a closed loop of N in flight.

Every request has a deadline (the driver's timeout), and the run as a whole ends when every request has an answer
or its deadline passed: no wait is unbounded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from ops.bench.drivers import Driver
from ops.bench.metrics import RequestTiming
from ops.bench.prompts import BuiltPrompt
from ops.bench.workload import Workload


async def run_workload(
    workload: Workload,
    prompts: Sequence[BuiltPrompt],
    driver: Driver,
    *,
    request_timeout_s: float = 300.0,
    on_done: Callable[[RequestTiming], None] | None = None,
) -> list[RequestTiming]:
    """Results in workload order (position i is request i)."""
    if len(prompts) != len(workload.requests):
        raise ValueError(f"{len(prompts)} prompts for {len(workload.requests)} requests")
    results: list[RequestTiming | None] = [None] * len(prompts)
    limit = asyncio.Semaphore(workload.concurrency) if workload.concurrency else None
    started = time.perf_counter()

    async def one(i: int) -> None:
        request = workload.requests[i]
        if workload.mode == "open":
            await asyncio.sleep(max(0.0, started + request.arrival_s - time.perf_counter()))
        if limit is not None:
            await limit.acquire()
        try:
            timing = await driver.send(prompts[i], request.output_tokens, request_timeout_s)
        finally:
            if limit is not None:
                limit.release()
        results[i] = timing
        if on_done is not None:
            on_done(timing)

    await asyncio.gather(*(one(i) for i in range(len(prompts))))
    return [r for r in results if r is not None]
