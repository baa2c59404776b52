"""What the planner finds: the goals, one simulation's outcome, one configuration's and one design's results.

Plain values with no simulator imports, so that reports, plots and the paper comparison work on them alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ops.plan.budget import SpendKind
from ops.plan.designs import Config, DesignSpec

Goal = Literal["iso-power", "iso-cost", "min-power", "min-cost"]
GOALS: tuple[Goal, ...] = ("iso-power", "iso-cost", "min-power", "min-cost")
GOAL_SPEND: dict[Goal, SpendKind] = {
    "iso-power": "power",
    "iso-cost": "cost",
    "min-power": "power",
    "min-cost": "cost",
}


def maximises_throughput(goal: Goal) -> bool:
    """iso-* goals maximise the rate within a budget; min-* goals minimise spend at a target rate."""
    return goal in ("iso-power", "iso-cost")


@dataclass(frozen=True, slots=True)
class Trial:
    """One simulation of one configuration at one request rate."""

    rps: float  # offered request rate
    passed: bool  # all 9 Splitwise SLOs held
    ttft_p50_s: float | None
    tbt_p50_s: float | None
    e2e_p50_s: float | None
    binding: str  # the SLO furthest past (or closest to) its limit, e.g. "ttft P99 9.62x > 6x"


@dataclass(frozen=True, slots=True)
class ConfigResult:
    config: Config
    rps: float  # highest passing rate (iso goals) or the target rate (min goals); 0.0: none passed
    trial: Trial | None  # the simulation at `rps`; None when none passed
    # The failing simulation nearest the answer: just above the max rate, or at the smallest failing size.
    failure: Trial | None
    simulations: int
    capped: bool = False  # passed at the top of the rate search range: may sustain more
    converged: bool = True  # False: the search ran out of simulations before pinning the rate down
    failure_config: Config | None = None  # min goals: the one-size-smaller configuration that failed

    @property
    def feasible(self) -> bool:
        return self.trial is not None and self.trial.passed and self.rps > 0

    def limited_by(self) -> str:
        """The SLO that stops this configuration: the one missed just past the answer."""
        if self.capped:
            return "passed at the top of the rate range"
        if self.failure is None:
            return ""
        if self.failure_config is not None:
            return f"{self.failure.binding} at {self.failure_config.label()}"
        return f"{self.failure.binding} at {self.failure.rps:.3g} req/s"


@dataclass(frozen=True, slots=True)
class DesignPlan:
    spec: DesignSpec
    best: ConfigResult | None  # the chosen configuration; None when none is feasible
    scanned: tuple[ConfigResult, ...] = ()  # every configuration simulated, in the order of the scan
    note: str = ""  # why nothing is feasible, or what limits the answer
    simulations: int = 0

    @property
    def feasible(self) -> bool:
        return self.best is not None
