"""One plan: every design searched for the goal, then the paper's directions checked on the answers."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from ops.plan.budget import Budget, SpendKind, spend
from ops.plan.checks import Check, beats_baseline, capped_matches_uncapped, capped_twin
from ops.plan.designs import DesignSpec
from ops.plan.estimate import CapacityGuess
from ops.plan.evaluate import trial_task
from ops.plan.goals import maximise_within, minimise_for
from ops.plan.outcome import GOAL_SPEND, DesignPlan, Goal, maximises_throughput
from ops.plan.pricing import MachinePrice
from ops.plan.runner import Runner


@dataclass(frozen=True, slots=True)
class PlanRequest:
    goal: Goal
    specs: tuple[DesignSpec, ...]
    prices: Mapping[str, MachinePrice]
    budget: Budget | None = None  # iso-* goals
    target_rps: float | None = None  # min-* goals
    coarse_points: int = 5
    max_machines: int = 256  # min-* goals: the largest cluster considered

    def __post_init__(self) -> None:
        if maximises_throughput(self.goal) and self.budget is None:
            raise ValueError(f"--goal {self.goal} needs a budget")
        if not maximises_throughput(self.goal) and not (self.target_rps and self.target_rps > 0):
            raise ValueError(f"--goal {self.goal} needs --target-rps > 0")
        if self.max_machines < 2:
            raise ValueError(f"--max-machines must be >= 2, got {self.max_machines}")


@dataclass(frozen=True, slots=True)
class PlanResult:
    request: PlanRequest
    designs: tuple[DesignPlan, ...]
    checks: tuple[Check, ...]
    simulations: int
    wall_s: float

    @property
    def feasible(self) -> bool:
        return any(plan.feasible for plan in self.designs)

    def plans(self) -> dict[str, DesignPlan]:
        return {plan.spec.name: plan for plan in self.designs}

    def spends(self) -> dict[str, dict[SpendKind, float]]:
        """Power (W) and cost ($/h) of each design's chosen configuration."""
        return {
            plan.spec.name: {
                kind: spend(plan.spec, plan.best.config, self.request.prices, kind)
                for kind in ("power", "cost")
            }
            for plan in self.designs
            if plan.best is not None
        }


def run_plan(request: PlanRequest, runner: Runner, guess: CapacityGuess) -> PlanResult:
    started = time.monotonic()
    plans = []
    for spec in request.specs:
        if maximises_throughput(request.goal):
            assert request.budget is not None
            plan = maximise_within(spec, request.budget, request.prices, runner, guess, request.coarse_points)
        else:
            assert request.target_rps is not None
            kind = GOAL_SPEND[request.goal]
            plan = minimise_for(
                spec,
                kind,
                request.target_rps,
                request.prices,
                runner,
                request.max_machines,
                request.coarse_points,
            )
        plans.append(plan)
    checks = beats_baseline(request.goal, plans)
    simulations = sum(plan.simulations for plan in plans)
    by_name = {plan.spec.name: plan for plan in plans}
    twin = capped_twin(by_name)
    if twin is not None:
        hh = by_name["splitwise-hh"]
        assert hh.best is not None
        (trial,) = runner.map(trial_task, [(twin, hh.best.rps)])
        simulations += 1
        specs = {spec.name: spec for spec in request.specs}
        checks.append(
            capped_matches_uncapped(
                hh,
                trial,
                spend(hh.spec, hh.best.config, request.prices, "power"),
                spend(specs[twin.design], twin, request.prices, "power"),
            )
        )
    return PlanResult(request, tuple(plans), tuple(checks), simulations, time.monotonic() - started)
