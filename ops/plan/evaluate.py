"""Simulating one configuration: at one rate (a trial), at its highest passing rate, or at its smallest size.

Everything here runs inside a worker process when the plan runs with --jobs > 1, so the Evaluator holds all it
needs (the sample, the simulator config, the designs) and its methods take and return small picklable values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import numpy as np

from ops.plan.designs import Config, DesignSpec
from ops.plan.outcome import ConfigResult, Trial
from ops.plan.rate_search import RateLimits, search_max_rate
from ops.plan.sample import TraceSample
from ops.sim import ClusterDesign, Pool, SimConfig, SimResult, simulate

# Which pool a size search grows: both pools together, the decode pool beside a fixed prefill pool, or the
# colocated pool.
GrowPool = Literal["both", "decode", "colocated"]


class Evaluator:
    def __init__(
        self,
        sample: TraceSample,
        sim_config: SimConfig,
        specs: Mapping[str, DesignSpec],
        rate_limits: RateLimits,
    ) -> None:
        self.sample = sample
        self.sim_config = sim_config
        self.specs = dict(specs)
        self.rate_limits = rate_limits

    def trial(self, config: Config, rps: float) -> Trial:
        result = simulate(self.cluster_design(config), self.sample.at_rate(rps), self.sim_config)
        return trial_of(result, rps)

    def max_rate(self, config: Config, guess_rps: float) -> ConfigResult:
        search = search_max_rate(lambda rps: self.trial(config, rps), guess_rps, self.rate_limits)
        return ConfigResult(
            config,
            search.rps,
            search.best,
            search.first_failure,
            search.probes,
            search.capped,
            search.converged,
        )

    def min_size(self, config: Config, grow: GrowPool, target_rps: float, largest: int) -> ConfigResult:
        """The smallest size in 1..largest of the `grow` pool(s) that meets the SLOs at target_rps.

        `config` gives the design and any fixed pool. Passing is taken to be monotone in the size (machines never
        hurt), so this bisects after one simulation at `largest`; infeasible when even that fails."""
        at_largest = self.trial(_resized(config, grow, largest), target_rps)
        simulations = 1
        if not at_largest.passed:
            return ConfigResult(_resized(config, grow, largest), 0.0, None, at_largest, simulations)
        best, best_trial, low = largest, at_largest, 0  # low: the largest size known to fail (0: none)
        failure: Trial | None = None  # at `low`, which ends one below `best` whenever anything failed
        while best - low > 1:
            middle = (low + best) // 2
            trial = self.trial(_resized(config, grow, middle), target_rps)
            simulations += 1
            if trial.passed:
                best, best_trial = middle, trial
            else:
                low, failure = middle, trial
        failed_config = _resized(config, grow, low) if failure is not None else None
        return ConfigResult(
            _resized(config, grow, best),
            target_rps,
            best_trial,
            failure,
            simulations,
            failure_config=failed_config,
        )

    def cluster_design(self, config: Config) -> ClusterDesign:
        spec = self.specs[config.design]

        def pool(machine_type: str | None, count: int) -> Pool | None:
            return Pool(machine_type, count) if machine_type is not None and count > 0 else None

        return ClusterDesign(
            name=spec.name,
            prefill=pool(spec.prefill_type, config.prefill),
            decode=pool(spec.decode_type, config.decode),
            colocated=pool(spec.colocated_type, config.colocated),
        )


def trial_of(result: SimResult, rps: float) -> Trial:
    return Trial(
        rps=rps,
        passed=bool(result.slo_passed),
        ttft_p50_s=_median(result.ttft_s),
        tbt_p50_s=_median(result.tbt_s),
        e2e_p50_s=_median(result.e2e_s),
        binding=_binding_slo(result),
    )


def _resized(config: Config, grow: GrowPool, size: int) -> Config:
    if grow == "both":
        return Config(config.design, prefill=size, decode=size)
    if grow == "decode":
        return Config(config.design, prefill=config.prefill, decode=size)
    return Config(config.design, colocated=size)


def _median(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else None


def _binding_slo(result: SimResult) -> str:
    """The SLO with the highest slowdown relative to its limit: what stops a configuration taking more load."""
    rows = [row for row in result.slo.rows if row.slowdown is not None]
    if not rows:
        return "no SLO sample"
    row = max(rows, key=lambda r: math.inf if r.slowdown is None else r.slowdown / r.limit)
    relation = "<=" if row.ok else ">"
    return f"{row.metric} P{row.percentile} {row.slowdown:.2f}x {relation} {row.limit:g}x"


# Tasks for Runner.map: module-level, so that worker processes receive them by reference.
def max_rate_task(evaluator: Evaluator, config: Config, guess_rps: float) -> ConfigResult:
    return evaluator.max_rate(config, guess_rps)


def min_size_task(
    evaluator: Evaluator, config: Config, grow: GrowPool, target_rps: float, largest: int
) -> ConfigResult:
    return evaluator.min_size(config, grow, target_rps, largest)


def trial_task(evaluator: Evaluator, config: Config, rps: float) -> Trial:
    return evaluator.trial(config, rps)
