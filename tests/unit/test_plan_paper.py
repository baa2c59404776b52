"""The paper's figures beside ours: sources quoted right, gaps computed and flagged, figures measured only by the
runs that can measure them."""

from __future__ import annotations

from pathlib import Path

import pytest

from ops.plan.designs import Config, DesignSpec
from ops.plan.outcome import ConfigResult, DesignPlan, Goal, Trial
from ops.plan.paper import (
    GAP_THRESHOLD,
    RATIO_FIGURES,
    PaperRow,
    RunFacts,
    compare_with_paper,
    guess_trace_kind,
)
from ops.sim import DESIGNS

FACTS = Path(__file__).resolve().parents[2] / "docs" / "splitwise-facts.md"  # shipped: every source cites it


def plan(name: str, prefill: int = 0, decode: int = 0, colocated: int = 0, rps: float = 10.0) -> DesignPlan:
    config = Config(name, prefill, decode, colocated)
    trial = Trial(rps, True, 0.2, 0.05, 5.0, "tbt P50 1.20x <= 1.25x")
    return DesignPlan(DesignSpec(name, *DESIGNS[name]), ConfigResult(config, rps, trial, None, 7))


def facts(
    goal: Goal, trace: str | None, plans: list[DesignPlan], spends: dict[str, tuple[float, float]]
) -> RunFacts:
    return RunFacts(
        goal,
        "conversation" if trace == "conversation" else "coding" if trace == "coding" else None,
        {p.spec.name: p for p in plans},
        {name: {"power": power, "cost": cost} for name, (power, cost) in spends.items()},
    )


def by_figure(rows: list[PaperRow]) -> dict[str, PaperRow]:
    return {row.figure: row for row in rows}


def test_every_source_quotes_its_line_of_the_facts_file() -> None:
    lines = FACTS.read_text().splitlines()
    rows = compare_with_paper(facts("iso-power", None, [], {}))
    assert len(rows) == 16 + len(RATIO_FIGURES) + 2
    for row in rows:
        number, quote = row.source.removeprefix("docs/splitwise-facts.md line ").split(": ", 1)
        text = lines[int(number) - 1]
        assert quote.strip("'") in text, row.source
        # The value is printed as is (2.15x, 45/25) or as a percentage change ("10% lower cost" is 0.9).
        assert f"{row.paper:g}" in text or f"{round(abs(row.paper - 1) * 100)}%" in text, (row.paper, text)


def test_iso_power_conversation_measures_the_splits_and_ratios_and_flags_big_gaps() -> None:
    plans = [
        plan("baseline-a100", colocated=70, rps=30.0),
        plan("baseline-h100", colocated=40, rps=60.0),
        plan("splitwise-aa", 45, 30, rps=57.0),  # decode 30 vs the paper's 25: +20%
        plan("splitwise-ha", 25, 26, rps=66.0),
    ]
    spends = {"baseline-h100": (408_000.0, 1520.0), "splitwise-ha": (400_000.0, 1407.6)}
    rows = by_figure(compare_with_paper(facts("iso-power", "conversation", plans, spends)))
    aa_decode = rows["splitwise-aa decode machines at iso-power, conversation"]
    assert (aa_decode.paper, aa_decode.ours) == (25, 30) and aa_decode.flagged
    aa_prefill = rows["splitwise-aa prefill machines at iso-power, conversation"]
    assert aa_prefill.gap == 0.0 and not aa_prefill.flagged
    ratio = rows["AA / Baseline-A100 throughput at iso-power"]
    assert ratio.ours == pytest.approx(57.0 / 30.0) and ratio.flagged == (abs(1.9 / 2.15 - 1) > GAP_THRESHOLD)
    assert rows["HA / Baseline-H100 throughput at iso-power"].ours == pytest.approx(1.1)
    assert rows["HA / Baseline-H100 cost at iso-power"].ours == pytest.approx(1407.6 / 1520.0)
    # Designs not in the run, the other trace and the other goals are left unmeasured, with what would measure them.
    hh = rows["splitwise-hh prefill machines at iso-power, conversation"]
    assert hh.ours is None and hh.gap is None and not hh.flagged
    assert "with splitwise-hh" in hh.note
    coding = rows["splitwise-aa prefill machines at iso-power, coding"]
    assert coding.ours is None and "coding trace" in coding.note
    assert rows["AA / Baseline-H100 throughput at iso-cost"].ours is None


def test_iso_cost_and_min_power_figures_come_from_their_own_goals() -> None:
    plans = [plan("baseline-h100", colocated=40, rps=60.0), plan("splitwise-aa", 60, 26, rps=90.0)]
    spends = {"baseline-h100": (408_000.0, 1520.0), "splitwise-aa": (559_000.0, 1513.6)}
    rows = by_figure(compare_with_paper(facts("iso-cost", "coding", plans, spends)))
    assert rows["AA / Baseline-H100 throughput at iso-cost"].ours == pytest.approx(1.5)
    assert rows["AA / Baseline-H100 power at iso-cost"].ours == pytest.approx(559 / 408)
    assert rows["AA / Baseline-A100 throughput at iso-power"].ours is None

    plans = [plan("baseline-h100", colocated=30), plan("splitwise-hhcap", 20, 10)]
    spends = {"baseline-h100": (306_000.0, 1140.0), "splitwise-hhcap": (275_400.0, 1140.0)}
    rows = by_figure(compare_with_paper(facts("min-power", None, plans, spends)))
    power = rows["HHcap / Baseline-H100 power at iso-throughput"]
    assert power.ours == pytest.approx(0.9) and power.flagged  # paper 0.75: +20%


def test_an_infeasible_design_leaves_its_ratio_unmeasured() -> None:
    infeasible = DesignPlan(
        DesignSpec("baseline-a100", *DESIGNS["baseline-a100"]), None, note="no rate passes"
    )
    rows = by_figure(
        compare_with_paper(facts("iso-power", "conversation", [infeasible, plan("splitwise-aa", 45, 25)], {}))
    )
    row = rows["AA / Baseline-A100 throughput at iso-power"]
    assert row.ours is None and "both feasible" in row.note


@pytest.mark.parametrize(
    ("name", "kind"),
    [("conv.csv", "conversation"), ("AzureLLMInferenceTrace_code.csv", "coding"), ("mine.csv", None)],
)
def test_trace_kind_from_the_file_name(name: str, kind: str | None) -> None:
    assert guess_trace_kind(name) == kind
