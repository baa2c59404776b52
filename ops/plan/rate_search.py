"""The highest request rate at which a configuration meets its SLOs, by bracketing and bisection.

Meeting the SLOs is taken to be monotone in the rate (more load never lowers latency), so the answer is the point
where a pass/fail predicate flips. From an initial guess the search doubles (while passing) or halves (while
failing) to bracket the flip, then bisects geometrically (rates span orders of magnitude) until the bracket is
within `rel_tol`. Every probe is a simulation, so the number of probes is bounded by `max_probes`; the result is
the highest rate that passed, a lower bound on the true one within `rel_tol` when the search converged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class Probe(Protocol):
    @property
    def passed(self) -> bool: ...


P = TypeVar("P", bound=Probe)


@dataclass(frozen=True, slots=True)
class RateLimits:
    rel_tol: float = 0.05  # stop when highest-fail / highest-pass <= 1 + rel_tol
    max_probes: int = 14
    range_factor: float = 256.0  # search within [guess / range_factor, guess * range_factor]

    def __post_init__(self) -> None:
        if not (0 < self.rel_tol < 1):
            raise ValueError(f"rate tolerance must be in (0, 1), got {self.rel_tol}")
        if self.max_probes < 2:
            raise ValueError(f"max_probes must be >= 2, got {self.max_probes}")
        if not self.range_factor > 1:
            raise ValueError(f"range_factor must be > 1, got {self.range_factor}")


@dataclass(frozen=True, slots=True)
class RateSearch(Generic[P]):
    rps: float  # highest rate that passed; 0.0 when none did
    best: P | None  # the probe at that rate
    first_failure: P | None  # the probe at the lowest rate that failed: what stops the configuration
    probes: int  # simulations spent
    capped: bool  # passed at the top of the search range: the true maximum may be higher
    # The bracket shrank to rel_tol, or every rate down to the range's bottom failed (False: max_probes ran out).
    converged: bool


def search_max_rate(probe: Callable[[float], P], guess_rps: float, limits: RateLimits) -> RateSearch[P]:
    if not (math.isfinite(guess_rps) and guess_rps > 0):
        raise ValueError(f"the initial rate guess must be a finite number > 0, got {guess_rps}")
    low_end, high_end = guess_rps / limits.range_factor, guess_rps * limits.range_factor
    passing: tuple[float, P] | None = None  # highest passing rate so far and its probe
    failing: tuple[float, P] | None = None  # lowest failing rate so far and its probe
    count = 0

    def run(rate: float) -> None:
        nonlocal passing, failing, count
        result = probe(rate)
        count += 1
        if result.passed:
            if passing is None or rate > passing[0]:
                passing = (rate, result)
        elif failing is None or rate < failing[0]:
            failing = (rate, result)

    rate = guess_rps
    run(rate)
    out_of_range = False
    # Bracket: step by factors of 2 until one passing and one failing rate are known, or the range ends.
    while count < limits.max_probes and (passing is None or failing is None):
        rate = rate * 2 if failing is None else rate / 2
        if not low_end <= rate <= high_end:
            out_of_range = True
            break
        run(rate)
    # Bisect the bracket.
    while count < limits.max_probes and passing is not None and failing is not None:
        if failing[0] / passing[0] <= 1 + limits.rel_tol:
            break
        run(math.sqrt(passing[0] * failing[0]))
    failure = None if failing is None else failing[1]
    if passing is None:
        # Failing all the way down to the bottom of the range counts as an answer: nothing passes.
        return RateSearch(0.0, None, failure, count, capped=False, converged=out_of_range)
    converged = failing is not None and failing[0] / passing[0] <= 1 + limits.rel_tol
    return RateSearch(passing[0], passing[1], failure, count, capped=failing is None, converged=converged)
