"""The plan's table, JSON, plot and direction checks, from plan results built by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.machines import BUILTIN_MACHINES
from ops.plan import report
from ops.plan.budget import parse_budget
from ops.plan.checks import beats_baseline, capped_matches_uncapped, capped_twin
from ops.plan.designs import Config, DesignSpec
from ops.plan.outcome import ConfigResult, DesignPlan, Trial
from ops.plan.paper import RunFacts, compare_with_paper
from ops.plan.planner import PlanRequest, PlanResult
from ops.plan.plot import save_plot
from ops.plan.pricing import price_table
from ops.sim import DESIGNS

PRICES = price_table(BUILTIN_MACHINES, list(BUILTIN_MACHINES), "rated")
SPECS = {name: DesignSpec(name, *types) for name, types in DESIGNS.items()}


def result_of(config: Config, rps: float, ttft: float = 0.2, tbt: float = 0.05) -> ConfigResult:
    passed = Trial(rps, True, ttft, tbt, 8.0, "tbt P50 1.20x <= 1.25x")
    failed = Trial(rps * 1.04, False, ttft * 3, tbt, 9.0, "ttft P99 7.10x > 6x")
    return ConfigResult(config, rps, passed, failed, 6)


def design_plan(name: str, configs: list[tuple[Config, float]]) -> DesignPlan:
    scanned = tuple(result_of(c, r) for c, r in configs)
    best = max(scanned, key=lambda r: r.rps)
    return DesignPlan(SPECS[name], best, scanned, simulations=sum(r.simulations for r in scanned))


def iso_power_result(baseline_rps: float = 30.0) -> PlanResult:
    budget = parse_budget("7xdgx-a100", "power", PRICES)
    plans = (
        design_plan("baseline-a100", [(Config("baseline-a100", colocated=7), baseline_rps)]),
        design_plan(
            "splitwise-aa", [(Config("splitwise-aa", 2, 5), 40.0), (Config("splitwise-aa", 4, 3), 55.0)]
        ),
        DesignPlan(SPECS["splitwise-hh"], None, note="nothing fits the budget"),
    )
    request = PlanRequest("iso-power", tuple(SPECS[p.spec.name] for p in plans), PRICES, budget=budget)
    return PlanResult(request, plans, tuple(beats_baseline("iso-power", list(plans))), 13, 1.5)


def test_the_table_has_one_row_per_design_with_ratios_to_baseline_a100() -> None:
    lines = report.table_lines(iso_power_result())
    aa = next(line for line in lines if line.startswith("splitwise-aa"))
    assert "4x3" in aa and "55.00" in aa and "1.83" in aa  # 55 / 30 req/s
    assert "ttft P99 7.10x > 6x at 57.2 req/s" in aa
    assert f"{7 * 6.5:,.1f}" in aa
    hh = next(line for line in lines if line.startswith("splitwise-hh"))
    assert "none" in hh and "nothing fits the budget" in hh
    assert not any(report.NO_FEASIBLE in line for line in lines)


def test_a_plan_with_no_feasible_design_says_so() -> None:
    budget = parse_budget("1000", "power", PRICES)
    plans = (DesignPlan(SPECS["splitwise-aa"], None, note="nothing fits the budget: 1x1 alone needs 13,000"),)
    result = PlanResult(
        PlanRequest("iso-power", (SPECS["splitwise-aa"],), PRICES, budget=budget), plans, (), 0, 0.1
    )
    assert not result.feasible
    assert any(line.startswith(report.NO_FEASIBLE) for line in report.table_lines(result))
    document = report.to_dict(result, [], {})
    assert document["feasible"] is False and document["designs"][0]["best"] is None


def test_the_json_is_strict_and_complete() -> None:
    result = iso_power_result()
    paper = compare_with_paper(RunFacts("iso-power", "conversation", result.plans(), result.spends()))
    document = json.loads(json.dumps(report.to_dict(result, paper, {"sample": "s"}), allow_nan=False))
    aa = next(d for d in document["designs"] if d["design"] == "splitwise-aa")
    assert aa["best"]["prefill"] == 4 and aa["best"]["rps"] == 55.0 and len(aa["scanned"]) == 2
    assert aa["best"]["power_w"] == pytest.approx(7 * 6500.0)
    assert aa["best"]["failure"]["passed"] is False
    assert {row["figure"] for row in document["paper"] if row["flagged"]} >= {
        "splitwise-aa prefill machines at iso-power, conversation"
    }
    assert document["checks"][0]["ok"] is True


def test_the_plot_is_a_png(tmp_path: Path) -> None:
    path = tmp_path / "out" / "plan.png"
    save_plot(iso_power_result(), path, "test plan")
    assert path.read_bytes().startswith(b"\x89PNG")


def test_a_split_design_that_does_not_beat_the_baseline_fails_its_check() -> None:
    checks = iso_power_result(baseline_rps=60.0).checks
    assert [c.ok for c in checks] == [False, False]  # AA at 55 < 60; HH infeasible
    assert "55.00 vs 60.00" in checks[0].detail


def test_hhcap_matches_hh_only_with_close_latency_and_lower_power() -> None:
    hh = design_plan("splitwise-hh", [(Config("splitwise-hh", 20, 20), 60.0)])
    twin = capped_twin({"splitwise-hh": hh, "splitwise-hhcap": hh})
    assert twin == Config("splitwise-hhcap", 20, 20)
    same = Trial(60.0, True, 0.2, 0.05, 8.0, "")
    assert capped_matches_uncapped(hh, same, 408_000.0, 347_000.0).ok
    slower = Trial(60.0, True, 0.2, 0.07, 8.0, "")  # TBT +40%
    assert not capped_matches_uncapped(hh, slower, 408_000.0, 347_000.0).ok
    assert not capped_matches_uncapped(hh, same, 408_000.0, 408_000.0).ok
    missed = Trial(60.0, False, 0.2, 0.05, 8.0, "ttft P99 9x > 6x")
    check = capped_matches_uncapped(hh, missed, 408_000.0, 347_000.0)
    assert not check.ok and "misses an SLO" in check.detail
