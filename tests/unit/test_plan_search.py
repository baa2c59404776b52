"""The planner's searches: the max-rate bisection and the coarse-to-fine scan over pool sizes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from ops.plan.rate_search import RateLimits, search_max_rate
from ops.plan.search import best_index, coarse_to_fine, evenly_spaced


@dataclass(frozen=True)
class Verdict:
    rate: float
    passed: bool


class Threshold:
    """A monotone predicate: passes at rates up to `limit`; counts its calls."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.rates: list[float] = []

    def __call__(self, rate: float) -> Verdict:
        self.rates.append(rate)
        return Verdict(rate, rate <= self.limit)


@pytest.mark.parametrize("limit", [0.37, 3.0, 41.5, 900.0])
@pytest.mark.parametrize("guess", [1.0, 40.0, 500.0])
def test_bisection_finds_where_a_monotone_predicate_flips(limit: float, guess: float) -> None:
    probe, limits = Threshold(limit), RateLimits(rel_tol=0.05, max_probes=30, range_factor=1e4)
    found = search_max_rate(probe, guess, limits)
    assert found.converged and not found.capped
    assert limit / 1.05 <= found.rps <= limit
    assert found.best is not None and found.best.passed and found.best.rate == found.rps
    assert found.first_failure is not None and not found.first_failure.passed
    assert found.first_failure.rate <= found.rps * 1.05 + 1e-12
    assert found.probes == len(probe.rates)


def test_the_probe_budget_bounds_the_simulations() -> None:
    probe = Threshold(41.5)
    found = search_max_rate(probe, 1.0, RateLimits(rel_tol=0.001, max_probes=6))
    assert len(probe.rates) == found.probes == 6
    assert not found.converged
    assert found.rps <= 41.5


def test_a_predicate_that_never_passes_gives_rate_zero() -> None:
    found = search_max_rate(Threshold(-1.0), 10.0, RateLimits(range_factor=64.0))
    assert found.rps == 0.0 and found.best is None and found.converged
    assert found.first_failure is not None and found.first_failure.rate < 10.0


def test_passing_at_the_top_of_the_range_is_reported_as_capped() -> None:
    found = search_max_rate(Threshold(1e9), 10.0, RateLimits(range_factor=8.0))
    assert found.capped and found.rps == pytest.approx(80.0)


def test_rate_search_rejects_a_bad_guess() -> None:
    with pytest.raises(ValueError, match="guess"):
        search_max_rate(Threshold(1.0), 0.0, RateLimits())


def test_evenly_spaced_keeps_both_ends() -> None:
    assert evenly_spaced(69, 5) == [0, 17, 34, 51, 68]
    assert evenly_spaced(3, 5) == [0, 1, 2]


def unimodal(length: int, peak: int, rng: np.random.Generator) -> list[float]:
    rises = np.cumsum(rng.uniform(0.1, 1.0, size=peak + 1))
    falls = rises[-1] - np.cumsum(rng.uniform(0.1, 1.0, size=length - peak - 1))
    return [*rises.tolist(), *falls.tolist()]


@pytest.mark.parametrize("seed", range(12))
def test_coarse_to_fine_finds_the_peak_of_a_unimodal_scan_with_few_scores(seed: int) -> None:
    rng = np.random.default_rng(seed)
    length = int(rng.integers(2, 120))
    values = unimodal(length, int(rng.integers(0, length)), rng)
    batches: list[list[int]] = []

    def score(indices: list[int]) -> list[float]:
        batches.append(list(indices))
        return [values[i] for i in indices]

    scores = coarse_to_fine(length, score, coarse_points=5)
    assert best_index(scores) == int(np.argmax(values))
    visited = [i for batch in batches for i in batch]
    assert len(visited) == len(set(visited)), "no configuration is simulated twice"
    assert len(visited) <= 5 + 2 * max(1, int(np.ceil(np.log2(length))))
    assert all(len(batch) <= 5 for batch in batches)


def test_coarse_to_fine_prefers_the_lowest_index_on_ties() -> None:
    scores = coarse_to_fine(9, lambda indices: [0.0 for _ in indices], coarse_points=3)
    assert best_index(scores) == 0
