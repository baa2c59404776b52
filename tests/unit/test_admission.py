"""The router's admission gate (router/admission.py): bounded running and waiting, FIFO, deadlines, cancels."""

from __future__ import annotations

import asyncio

import pytest

from router.admission import Admission, Overloaded


async def _hold(admission: Admission, seconds: float, streams: int = 1, log: list[int] | None = None) -> None:
    async with admission.slot(streams):
        assert admission.active <= admission.max_active
        if log is not None:
            log.append(streams)
        await asyncio.sleep(seconds)


def test_beyond_running_and_queued_requests_are_refused_at_once() -> None:
    async def main() -> list[BaseException | None]:
        admission = Admission(max_active=2, max_queued=3, queue_timeout_s=5)
        tasks = [asyncio.create_task(_hold(admission, 0.2)) for _ in range(8)]
        await asyncio.sleep(0.05)
        assert (admission.active, admission.queued) == (2, 3)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert (admission.active, admission.queued, admission.refused) == (0, 0, 3)
        return results

    results = asyncio.run(main())
    assert [type(r).__name__ for r in results] == ["NoneType"] * 5 + ["Overloaded"] * 3


def test_a_waiter_gives_up_at_its_deadline_and_a_cancelled_one_leaves_the_queue() -> None:
    async def main() -> None:
        admission = Admission(max_active=1, max_queued=2, queue_timeout_s=0.2)
        running = asyncio.create_task(_hold(admission, 1.0))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded, match="no slot freed"):
            await _hold(admission, 0)
        cancelled = asyncio.create_task(_hold(admission, 0))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        await asyncio.sleep(0.01)
        assert admission.queued == 0
        running.cancel()
        await asyncio.sleep(0.01)
        assert admission.active == 0

    asyncio.run(main())


def test_slots_are_granted_in_arrival_order_and_n_choices_hold_n_slots() -> None:
    async def main() -> list[int]:
        admission = Admission(max_active=4, max_queued=10, queue_timeout_s=5)
        log: list[int] = []
        first = asyncio.create_task(_hold(admission, 0.1, streams=3, log=log))
        await asyncio.sleep(0.01)
        # 3 of 4 slots held: the 2-stream request waits, and the 1-stream one behind it may not jump ahead.
        later = [asyncio.create_task(_hold(admission, 0.05, streams=s, log=log)) for s in (2, 1, 99)]
        await asyncio.sleep(0.01)
        assert admission.queued == 3
        await asyncio.gather(first, *later)
        return log

    assert asyncio.run(main()) == [3, 2, 1, 99]  # 99 streams are capped at the 4 slots there are
