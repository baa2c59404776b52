"""The planner's goals on real simulations of a short conv.csv sample with the shipped perf model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cluster.machines import BUILTIN_MACHINES
from ops.plan.budget import Budget, frontier, parse_budget, spend
from ops.plan.designs import Config, DesignSpec
from ops.plan.estimate import CapacityGuess, load_perf_models
from ops.plan.evaluate import Evaluator
from ops.plan.goals import maximise_within, minimise_for
from ops.plan.pricing import price_table
from ops.plan.rate_search import RateLimits
from ops.plan.runner import Runner
from ops.plan.sample import ArrivalShape, TraceSample
from ops.sim import DESIGNS, SimConfig

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
CONV = DATA / "azure-llm-inference-2023" / "conv.csv"
PERF = DATA / "splitwise-perf-model" / "perf_model.csv"
SPECS = {name: DesignSpec(name, *types) for name, types in DESIGNS.items()}
PRICES = price_table(BUILTIN_MACHINES, list(BUILTIN_MACHINES), "rated")
TOLERANCE = 0.1


@pytest.fixture(scope="module")
def sample() -> TraceSample:
    return TraceSample.load(CONV, start=0, limit=300)


@pytest.fixture(scope="module")
def evaluator(sample: TraceSample) -> Evaluator:
    config = SimConfig(perf_csv=PERF)
    return Evaluator(sample, config, SPECS, RateLimits(rel_tol=TOLERANCE, max_probes=10))


@pytest.fixture(scope="module")
def guess(sample: TraceSample) -> CapacityGuess:
    types = ["dgx-a100", "dgx-h100"]
    hardware = {t: BUILTIN_MACHINES[t].accelerator for t in types}
    models = load_perf_models(str(PERF), "bloom-176b", 8, types, BUILTIN_MACHINES, hardware)
    return CapacityGuess.from_perf_models(
        models, sample.mean_prompt_tokens(), sample.mean_output_tokens(), 2048
    )


@pytest.mark.parametrize("arrivals", ["trace", "poisson"])
def test_sample_replays_at_the_asked_rate_with_the_traces_lengths(arrivals: ArrivalShape) -> None:
    sample = TraceSample.load(CONV, start=0, limit=300, arrivals=arrivals)
    gaps = {}
    for rps in (0.5, 7.0, 80.0):
        requests = sample.at_rate(rps)
        assert (len(requests) - 1) / requests[-1].arrival_s == pytest.approx(rps)
        assert [r.prompt_tokens for r in requests] == [r.prompt_tokens for r in sample.requests]
        assert [r.output_tokens for r in requests] == [r.output_tokens for r in sample.requests]
        gaps[rps] = np.diff([r.arrival_s for r in requests])
    # A higher rate is the same arrivals closer together, which keeps passing monotone in the rate.
    np.testing.assert_allclose(gaps[7.0] * 7.0, gaps[80.0] * 80.0)
    trace_gaps = np.diff([r.arrival_s for r in sample.requests])
    assert np.allclose(gaps[0.5] / gaps[0.5].mean(), trace_gaps / trace_gaps.mean()) == (arrivals == "trace")


def test_iso_power_picks_the_best_configuration_on_the_frontier(
    evaluator: Evaluator, guess: CapacityGuess
) -> None:
    spec = SPECS["splitwise-aa"]
    budget = parse_budget("7xdgx-a100", "power", PRICES)
    with Runner(evaluator, jobs=1, time_limit_s=120) as runner:
        plan = maximise_within(spec, budget, PRICES, runner, guess, coarse_points=2)
    assert plan.best is not None and plan.best.feasible
    on_frontier = frontier(spec, budget, PRICES)
    assert all(result.config in on_frontier for result in plan.scanned)
    assert plan.best.rps == max(result.rps for result in plan.scanned)
    assert plan.simulations == sum(result.simulations for result in plan.scanned)
    # The rate found is the edge: it passes, and the failure the search met lies within the tolerance above it.
    assert evaluator.trial(plan.best.config, plan.best.rps).passed
    assert plan.best.failure is not None and not plan.best.failure.passed
    assert plan.best.failure.rps <= plan.best.rps * (1 + TOLERANCE)


def test_iso_power_with_a_budget_below_one_machine_per_pool_is_infeasible(
    evaluator: Evaluator, guess: CapacityGuess
) -> None:
    with Runner(evaluator, jobs=1, time_limit_s=60) as runner:
        plan = maximise_within(
            SPECS["splitwise-hh"], Budget("power", 15_000.0, "15000"), PRICES, runner, guess, 5
        )
    assert plan.best is None and plan.simulations == 0
    assert "nothing fits the budget" in plan.note


def test_min_cost_picks_the_cheapest_passing_configuration(
    evaluator: Evaluator, guess: CapacityGuess
) -> None:
    spec, target = SPECS["splitwise-ha"], 6.0
    with Runner(evaluator, jobs=1, time_limit_s=120) as runner:
        plan = minimise_for(spec, "cost", target, PRICES, runner, max_machines=16, coarse_points=3)
    assert plan.best is not None and plan.best.trial is not None and plan.best.trial.passed
    best_cost = spend(spec, plan.best.config, PRICES, "cost")
    assert all(spend(spec, r.config, PRICES, "cost") >= best_cost for r in plan.scanned if r.feasible)
    # The decode pool was bisected to its smallest passing size; the failure reported is the next size down.
    failed = plan.best.failure_config
    assert failed is None or failed.machines() < plan.best.config.machines()
    if plan.best.config.decode > 1:
        smaller = Config(spec.name, plan.best.config.prefill, plan.best.config.decode - 1)
        assert not evaluator.trial(smaller, target).passed


def test_min_power_sizes_a_colocated_baseline_to_the_smallest_passing_count(evaluator: Evaluator) -> None:
    spec, target = SPECS["baseline-a100"], 4.0
    with Runner(evaluator, jobs=1, time_limit_s=120) as runner:
        plan = minimise_for(spec, "power", target, PRICES, runner, max_machines=32, coarse_points=3)
    assert plan.best is not None
    count = plan.best.config.colocated
    assert evaluator.trial(Config(spec.name, colocated=count), target).passed
    assert count == 1 or not evaluator.trial(Config(spec.name, colocated=count - 1), target).passed


def test_a_target_no_cluster_within_the_machine_cap_meets_is_infeasible(evaluator: Evaluator) -> None:
    with Runner(evaluator, jobs=1, time_limit_s=60) as runner:
        plan = minimise_for(
            SPECS["splitwise-aa"], "cost", 500.0, PRICES, runner, max_machines=4, coarse_points=3
        )
    assert plan.best is None
    assert "up to 4 machines" in plan.note and "500 req/s" in plan.note
