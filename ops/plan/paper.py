"""The Splitwise paper's provisioning figures, and ours beside them.

Every figure quotes its line of docs/splitwise-facts.md (FACTS: the project's summary of Patel et al., ISCA 2024,
arXiv 2311.18677, shipped in the repository so that a user can follow each citation). A figure is
measured only by the run that can produce it: the splits and iso-power ratios by an iso-power run on the same
trace, the iso-cost ratios by an iso-cost run, and so on; others show "not measured" and what would measure them.
A gap is ours / paper - 1, flagged beyond GAP_THRESHOLD; docs/planning.md explains each flagged gap of a real run.

"HA 1.18x at 10% lower cost" (line 73) names no reference design. We read it as against Baseline-H100: at the
paper's iso-power split (25 H100 + 26 A100) the HA cluster costs 7% less than 40 DGX-H100 and 14% more than 70
DGX-A100, so only Baseline-H100 fits "lower cost".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from ops.plan.budget import SpendKind
from ops.plan.outcome import DesignPlan, Goal

GAP_THRESHOLD = 0.15
TraceKind = Literal["conversation", "coding"]
TRACE_KINDS: tuple[TraceKind, ...] = ("conversation", "coding")
FACTS = "docs/splitwise-facts.md"  # relative to the repository root

_SPLIT_LINE = 67
_SPLITS: dict[TraceKind, dict[str, tuple[int, int]]] = {
    # line 67: "coding AA 55/15, HH 35/5, HA 35/8, HHcap 35/7; conversation AA 45/25, HH 25/15, HA 25/26, HHcap 25/21"
    "coding": {
        "splitwise-aa": (55, 15),
        "splitwise-hh": (35, 5),
        "splitwise-ha": (35, 8),
        "splitwise-hhcap": (35, 7),
    },
    "conversation": {
        "splitwise-aa": (45, 25),
        "splitwise-hh": (25, 15),
        "splitwise-ha": (25, 26),
        "splitwise-hhcap": (25, 21),
    },
}
# Line 66 ends "Iso-power splits found (prompt/token):"; line 67 holds the splits.
_SPLIT_QUOTE = (
    "coding AA 55/15, HH 35/5, HA 35/8, HHcap 35/7; conversation AA 45/25, HH 25/15, HA 25/26, HHcap 25/21"
)


@dataclass(frozen=True, slots=True)
class RatioFigure:
    """measure(design) / measure(reference) as the paper reports it, for one goal (and trace, where stated)."""

    name: str
    goal: Goal
    trace: TraceKind | None  # None: the facts do not tie the figure to a trace
    design: str
    reference: str
    measure: Literal["rps", "power", "cost"]
    value: float
    line: int
    quote: str


RATIO_FIGURES: tuple[RatioFigure, ...] = (
    RatioFigure("AA / Baseline-A100 throughput at iso-power", "iso-power", "conversation", "splitwise-aa",
                "baseline-a100", "rps", 2.15, 73,
                "Iso-power, conversation: Splitwise-AA 2.15x Baseline-A100 throughput at the same power and cost"),
    RatioFigure("HA / Baseline-H100 throughput at iso-power", "iso-power", "conversation", "splitwise-ha",
                "baseline-h100", "rps", 1.18, 73, "HA 1.18x at 10% lower cost"),
    RatioFigure("HA / Baseline-H100 cost at iso-power", "iso-power", "conversation", "splitwise-ha",
                "baseline-h100", "cost", 0.90, 73, "HA 1.18x at 10% lower cost"),
    RatioFigure("AA / Baseline-H100 throughput at iso-cost", "iso-cost", None, "splitwise-aa", "baseline-h100",
                "rps", 1.4, 74, "Iso-cost: AA 1.4x Baseline-H100 throughput (at +25% power)"),
    RatioFigure("AA / Baseline-H100 power at iso-cost", "iso-cost", None, "splitwise-aa", "baseline-h100",
                "power", 1.25, 74, "Iso-cost: AA 1.4x Baseline-H100 throughput (at +25% power)"),
    RatioFigure("HHcap / Baseline-H100 power at iso-throughput", "min-power", None, "splitwise-hhcap",
                "baseline-h100", "power", 0.75, 74, "Iso-throughput: HHcap matches Baseline-H100 at 25% less power"),
)  # fmt: skip
# line 68: "Example: Splitwise-HH, coding, 70 RPS -> cost-optimal 27 prompt + 3 token machines."
COST_OPTIMAL_EXAMPLE = ("splitwise-hh", "coding", 70.0, (27, 3), 68)


@dataclass(frozen=True, slots=True)
class PaperRow:
    figure: str
    paper: float
    ours: float | None  # None: this run does not measure the figure
    source: str  # "docs/splitwise-facts.md line N: '...'"
    note: str = ""  # what would measure it, when not measured

    @property
    def gap(self) -> float | None:
        return None if self.ours is None else self.ours / self.paper - 1.0

    @property
    def flagged(self) -> bool:
        gap = self.gap
        return gap is not None and abs(gap) > GAP_THRESHOLD


@dataclass(frozen=True, slots=True)
class RunFacts:
    """What the paper comparison needs to know about a run."""

    goal: Goal
    trace: TraceKind | None  # None: neither of the paper's traces
    plans: Mapping[str, DesignPlan]  # by design name
    spends: Mapping[
        str, Mapping[SpendKind, float]
    ]  # chosen configuration's power (W) and cost ($/h), by design
    target_rps: float | None = None


def compare_with_paper(run: RunFacts) -> list[PaperRow]:
    rows = _split_rows(run)
    rows += [_ratio_row(figure, run) for figure in RATIO_FIGURES]
    rows += _cost_optimal_rows(run)
    return rows


def guess_trace_kind(file_name: str) -> TraceKind | None:
    """'conversation' for the Azure conv trace, 'coding' for the code trace, by file name; None otherwise."""
    lowered = file_name.lower()
    if "conv" in lowered:
        return "conversation"
    if "code" in lowered or "coding" in lowered:
        return "coding"
    return None


def _split_rows(run: RunFacts) -> list[PaperRow]:
    rows = []
    for trace in TRACE_KINDS:
        for design, (prefill, decode) in _SPLITS[trace].items():
            best = _best_config(run, design) if run.goal == "iso-power" and run.trace == trace else None
            note = "" if best else f"needs --goal iso-power on the {trace} trace with {design}"
            source = f"{FACTS} line {_SPLIT_LINE}: '{_SPLIT_QUOTE}'"
            for pool, paper, ours in _pair_rows(prefill, decode, best):
                rows.append(
                    PaperRow(f"{design} {pool} machines at iso-power, {trace}", paper, ours, source, note)
                )
    return rows


def _ratio_row(figure: RatioFigure, run: RunFacts) -> PaperRow:
    source = f"{FACTS} line {figure.line}: '{figure.quote}'"
    needs = f"needs --goal {figure.goal}" + (f" on the {figure.trace} trace" if figure.trace else "")
    needs += f" with {figure.design} and {figure.reference}"
    if run.goal != figure.goal or (figure.trace is not None and run.trace != figure.trace):
        return PaperRow(figure.name, figure.value, None, source, needs)
    ours = _ratio(run, figure)
    note = "" if ours is not None else f"{needs}, both feasible"
    return PaperRow(figure.name, figure.value, ours, source, note)


def _cost_optimal_rows(run: RunFacts) -> list[PaperRow]:
    design, trace, target, (prefill, decode), line = COST_OPTIMAL_EXAMPLE
    measured = run.goal == "min-cost" and run.trace == trace and run.target_rps == target
    best = _best_config(run, design) if measured else None
    note = "" if best else f"needs --goal min-cost --target-rps {target:g} on the {trace} trace with {design}"
    source = (
        f"{FACTS} line {line}: 'Example: Splitwise-HH, coding, 70 RPS -> cost-optimal 27 prompt + 3 token'"
    )
    return [
        PaperRow(f"{design} {pool} machines, min cost at {target:g} RPS, {trace}", paper, ours, source, note)
        for pool, paper, ours in _pair_rows(prefill, decode, best)
    ]


def _pair_rows(
    prefill: int, decode: int, ours: tuple[int, int] | None
) -> list[tuple[str, float, float | None]]:
    return [
        ("prefill", prefill, None if ours is None else ours[0]),
        ("decode", decode, None if ours is None else ours[1]),
    ]


def _best_config(run: RunFacts, design: str) -> tuple[int, int] | None:
    plan = run.plans.get(design)
    if plan is None or plan.best is None:
        return None
    return plan.best.config.prefill, plan.best.config.decode


def _ratio(run: RunFacts, figure: RatioFigure) -> float | None:
    values = []
    for design in (figure.design, figure.reference):
        plan = run.plans.get(design)
        if plan is None or plan.best is None:
            return None
        values.append(plan.best.rps if figure.measure == "rps" else run.spends[design][figure.measure])
    return values[0] / values[1] if values[1] > 0 else None
