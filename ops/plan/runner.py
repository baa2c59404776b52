"""Runs Evaluator calls in this process (--jobs 1) or on a pool of worker processes, under one deadline.

Each simulation is single-threaded, so N jobs run N simulations at once. Workers are spawned, not forked: they
start from a clean interpreter and get the Evaluator once, at start-up, instead of with every call. A plan that
runs past its deadline stops: queued calls are dropped and running workers terminated.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Sequence
from multiprocessing.pool import Pool as ProcessPool
from types import TracebackType
from typing import Any, TypeVar

from ops.plan.evaluate import Evaluator

T = TypeVar("T")
# A module-level function of the Evaluator and some picklable arguments: it is sent to workers by reference.
Task = Callable[..., T]


class PlanTimeout(RuntimeError):
    """The plan ran past its deadline."""


_WORKER_EVALUATOR: Evaluator | None = None


def _init_worker(evaluator: Evaluator) -> None:
    global _WORKER_EVALUATOR
    _WORKER_EVALUATOR = evaluator


def _call_in_worker(task: Task[T], args: tuple[Any, ...]) -> T:
    assert _WORKER_EVALUATOR is not None, "worker started without an evaluator"
    return task(_WORKER_EVALUATOR, *args)


class Runner:
    def __init__(
        self,
        evaluator: Evaluator,
        *,
        jobs: int,
        time_limit_s: float,
        on_result: Callable[[Any], None] | None = None,
    ) -> None:
        if jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {jobs}")
        if not time_limit_s > 0:
            raise ValueError(f"--time-limit must be > 0 seconds, got {time_limit_s}")
        self.evaluator = evaluator
        self.jobs = jobs
        self.time_limit_s = time_limit_s
        self._deadline = time.monotonic() + time_limit_s
        self._on_result = on_result
        self._pool: ProcessPool | None = None

    def __enter__(self) -> Runner:
        if self.jobs > 1:
            context = multiprocessing.get_context("spawn")
            self._pool = context.Pool(self.jobs, initializer=_init_worker, initargs=(self.evaluator,))
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._pool is not None:
            # On an error the workers' current simulations are of no use: stop them rather than wait.
            if kind is None:
                self._pool.close()
            else:
                self._pool.terminate()
            self._pool.join()
            self._pool = None

    def map(self, task: Task[T], calls: Sequence[tuple[Any, ...]]) -> list[T]:
        """task(evaluator, *args) for each args, results in order; PlanTimeout past the deadline."""
        results: list[T] = []
        if self._pool is None:
            for args in calls:
                self._check_deadline()
                results.append(self._report(task(self.evaluator, *args)))
            return results
        pending = [self._pool.apply_async(_call_in_worker, (task, args)) for args in calls]
        for handle in pending:
            try:
                results.append(self._report(handle.get(timeout=max(0.0, self._deadline - time.monotonic()))))
            except multiprocessing.TimeoutError:
                raise PlanTimeout(self._timeout_message()) from None
        return results

    def _report(self, result: T) -> T:
        if self._on_result is not None:
            self._on_result(result)
        return result

    def _check_deadline(self) -> None:
        if time.monotonic() > self._deadline:
            raise PlanTimeout(self._timeout_message())

    def _timeout_message(self) -> str:
        return (
            f"the plan did not finish within --time-limit {self.time_limit_s:g} s; "
            "use a shorter sample (--limit), fewer designs or more --jobs"
        )
