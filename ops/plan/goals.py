"""The planner's goals for one design, Splitwise's provisioning (splitwise-facts.md, "Provisioning"):

iso-power / iso-cost   the configuration within a power (W) or cost ($/h) budget that sustains the highest
                       request rate within all 9 SLOs. Only the budget frontier is scanned (machines never hurt).
min-power / min-cost   the configuration with the lowest power or cost that meets all 9 SLOs at a target rate.
                       Passing is monotone in each pool's size, so for a prefill pool size the decode pool is
                       bisected to its smallest passing size, and prefill sizes are scanned coarse to fine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ops.plan.budget import SPEND_UNITS, Budget, SpendKind, frontier, spend
from ops.plan.designs import Config, DesignSpec
from ops.plan.estimate import CapacityGuess
from ops.plan.evaluate import max_rate_task, min_size_task
from ops.plan.outcome import ConfigResult, DesignPlan
from ops.plan.pricing import MachinePrice
from ops.plan.runner import Runner
from ops.plan.search import best_index, coarse_to_fine


def maximise_within(
    spec: DesignSpec,
    budget: Budget,
    prices: Mapping[str, MachinePrice],
    runner: Runner,
    guess: CapacityGuess,
    coarse_points: int,
) -> DesignPlan:
    candidates = frontier(spec, budget, prices)
    if not candidates:
        smallest = Config(spec.name, 1, 1) if spec.is_split else Config(spec.name, colocated=1)
        need = spend(spec, smallest, prices, budget.kind)
        unit = SPEND_UNITS[budget.kind]
        return DesignPlan(
            spec, None, note=f"nothing fits the budget: {smallest.label()} alone needs {need:,.0f} {unit}"
        )
    results: dict[int, ConfigResult] = {}
    calibration = _Calibration()

    def score(indices: Sequence[int]) -> list[float]:
        calls = [(candidates[i], calibration.apply(guess.rps(spec, candidates[i]))) for i in indices]
        for i, result in zip(indices, runner.map(max_rate_task, calls), strict=True):
            results[i] = result
            calibration.learn(guess.rps(spec, candidates[i]), result.rps)
        return [results[i].rps for i in indices]

    scores = coarse_to_fine(len(candidates), score, coarse_points)
    scanned = tuple(results[i] for i in sorted(results))
    simulations = sum(r.simulations for r in scanned)
    best = results[best_index(scores)]
    if not best.feasible:
        return DesignPlan(spec, None, scanned, "no configuration meets all 9 SLOs at any rate", simulations)
    note = "may sustain more: passed at the top of the rate range" if best.capped else ""
    return DesignPlan(spec, best, scanned, note, simulations)


def minimise_for(
    spec: DesignSpec,
    kind: SpendKind,
    target_rps: float,
    prices: Mapping[str, MachinePrice],
    runner: Runner,
    max_machines: int,
    coarse_points: int,
) -> DesignPlan:
    infeasible = f"no configuration of up to {max_machines} machines meets all 9 SLOs at {target_rps:g} req/s"
    if not spec.is_split:
        (result,) = runner.map(min_size_task, [(Config(spec.name), "colocated", target_rps, max_machines)])
        if not result.feasible:
            return DesignPlan(spec, None, (result,), infeasible, result.simulations)
        return DesignPlan(spec, result, (result,), "", result.simulations)
    # A balanced pair that passes bounds the scan: with `both` machines per pool the target is met.
    (balanced,) = runner.map(min_size_task, [(Config(spec.name), "both", target_rps, max_machines // 2)])
    if not balanced.feasible:
        return DesignPlan(spec, None, (balanced,), infeasible, balanced.simulations)
    both = balanced.config.prefill
    prefill_sizes = list(range(1, min(2 * both, max_machines - 1) + 1))
    results: dict[int, ConfigResult] = {}

    def score(indices: Sequence[int]) -> list[float]:
        calls = []
        for i in indices:
            prefill = prefill_sizes[i]
            # With at least `both` prefill machines, `both` decode machines are known to pass.
            largest = min(both if prefill >= both else 2 * both, max_machines - prefill)
            calls.append((Config(spec.name, prefill=prefill), "decode", target_rps, largest))
        for i, result in zip(indices, runner.map(min_size_task, calls), strict=True):
            results[i] = result
        return [
            -spend(spec, results[i].config, prices, kind) if results[i].feasible else -math.inf
            for i in indices
        ]

    scores = coarse_to_fine(len(prefill_sizes), score, coarse_points)
    scanned = (balanced, *(results[i] for i in sorted(results)))
    simulations = sum(r.simulations for r in scanned)
    best = results[best_index(scores)]
    if not best.feasible or spend(spec, balanced.config, prices, kind) < spend(
        spec, best.config, prices, kind
    ):
        best = balanced
    return DesignPlan(spec, best, scanned, "", simulations)


class _Calibration:
    """Scales the analytic guess by what simulations measured, so later rate searches start nearer their answer."""

    def __init__(self) -> None:
        self._ratios: list[float] = []

    def learn(self, guessed: float, measured: float) -> None:
        if guessed > 0 and measured > 0:
            self._ratios.append(measured / guessed)

    def apply(self, guessed: float) -> float:
        if not self._ratios:
            return guessed
        ordered = sorted(self._ratios)
        return guessed * ordered[len(ordered) // 2]
