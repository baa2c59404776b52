"""The plan as text (a table, the paper beside ours, the direction checks) and as JSON.

Table columns: the chosen pool sizes; their power (kW, on the plan's power basis) and price ($/h); the highest
request rate within all 9 SLOs (iso goals) or the target met (min goals); throughput per money and per power
(req/$ = RPS x 3600 / ($/h), RPS/kW); the ratio to Baseline-A100 (of the rate for iso goals, of the minimised
spend for min goals); the P50 TTFT and TBT at that rate; the SLO that limits the configuration (the one missed
furthest at the lowest failing rate above the answer, or at the largest failing smaller size for min goals).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from ops.plan.budget import spend
from ops.plan.designs import BASELINE_A100
from ops.plan.outcome import GOAL_SPEND, ConfigResult, DesignPlan, maximises_throughput
from ops.plan.paper import FACTS, GAP_THRESHOLD, PaperRow
from ops.plan.planner import PlanResult

NO_FEASIBLE = "no feasible configuration"


def header_lines(result: PlanResult, context: Sequence[str]) -> list[str]:
    request = result.request
    if maximises_throughput(request.goal):
        assert request.budget is not None
        aim = f"highest rate within all 9 SLOs at {request.budget.describe()}"
    else:
        aim = f"lowest {GOAL_SPEND[request.goal]} meeting all 9 SLOs at {request.target_rps:g} req/s"
    return [f"plan         {request.goal}: {aim}", *context]


def table_lines(result: PlanResult) -> list[str]:
    goal = result.request.goal
    rate_title = "max RPS" if maximises_throughput(goal) else "RPS"
    ratio_title = "x A100 rate" if maximises_throughput(goal) else f"x A100 {GOAL_SPEND[goal]}"
    titles = ["design", "prefill x decode", "kW", "$/h", rate_title, "req/$", "RPS/kW", ratio_title,
              "TTFT p50", "TBT p50", "limited by"]  # fmt: skip
    rows = [titles]
    baseline = _baseline_value(result)
    for plan in result.designs:
        rows.append(_row(result, plan, baseline))
    widths = [max(len(row[i]) for row in rows) for i in range(len(titles))]
    lines = ["  ".join(cell.ljust(w) if i in (0, 1, 10) else cell.rjust(w) for i, (cell, w) in
                       enumerate(zip(row, widths, strict=True))).rstrip() for row in rows]  # fmt: skip
    lines.insert(1, "-" * len(lines[0]))
    if not result.feasible:
        lines.append(f"{NO_FEASIBLE}: " + "; ".join(f"{p.spec.name}: {p.note}" for p in result.designs))
    return lines


def paper_lines(rows: Sequence[PaperRow]) -> list[str]:
    measured = [row for row in rows if row.ours is not None]
    lines = [
        f"The paper (Splitwise, ISCA 2024, as quoted in {FACTS}) beside this run; "
        f"gaps over {GAP_THRESHOLD:.0%} are flagged:"
    ]
    if measured:
        width = max(len(row.figure) for row in measured)
        lines.append(f"  {'figure'.ljust(width)}  {'paper':>7}  {'ours':>7}  {'gap':>7}")
        for row in measured:
            flag = "  GAP > 15%, see docs/planning.md" if row.flagged else ""
            gap = f"{row.gap * 100:+.0f}%" if row.gap is not None else "-"
            assert row.ours is not None
            lines.append(f"  {row.figure.ljust(width)}  {row.paper:>7.3g}  {row.ours:>7.3g}  {gap:>7}{flag}")
        sources = sorted({row.source for row in measured})
        lines += ["  sources:", *(f"    {source}" for source in sources)]
    else:
        lines.append("  none of the paper's figures is measured by this run")
    unmeasured: dict[str, int] = defaultdict(int)
    for row in rows:
        if row.ours is None:
            unmeasured[row.note] += 1
    if unmeasured:
        lines.append("  not measured here (what would measure them):")
        lines += [f"    {count} figure(s): {note}" for note, count in unmeasured.items()]
    return lines


def check_lines(result: PlanResult) -> list[str]:
    if not result.checks:
        return []
    lines = ["The paper's directions:"]
    lines += [f"  {'PASS' if c.ok else 'FAIL'}  {c.name}: {c.detail}" for c in result.checks]
    return lines


def to_dict(result: PlanResult, paper: Sequence[PaperRow], context: dict[str, Any]) -> dict[str, Any]:
    """A JSON-safe document of the whole plan: inputs, each design's answer and scan, the paper, the checks."""
    request = result.request
    return {
        "goal": request.goal,
        "budget": None if request.budget is None else asdict(request.budget),
        "target_rps": request.target_rps,
        "feasible": result.feasible,
        **context,
        "designs": [_design_dict(result, plan) for plan in result.designs],
        "checks": [asdict(check) for check in result.checks],
        "paper": [{**asdict(row), "gap": row.gap, "flagged": row.flagged} for row in paper],
        "simulations": result.simulations,
        "wall_s": result.wall_s,
    }


def _design_dict(result: PlanResult, plan: DesignPlan) -> dict[str, Any]:
    return {
        "design": plan.spec.name,
        "machine_types": asdict(plan.spec),
        "feasible": plan.feasible,
        "note": plan.note,
        "best": None if plan.best is None else _config_dict(result, plan, plan.best),
        "scanned": [_config_dict(result, plan, r) for r in plan.scanned],
        "simulations": plan.simulations,
    }


def _config_dict(result: PlanResult, plan: DesignPlan, config: ConfigResult) -> dict[str, Any]:
    prices = result.request.prices
    return {
        **asdict(config.config),
        "power_w": spend(plan.spec, config.config, prices, "power"),
        "cost_per_hour": spend(plan.spec, config.config, prices, "cost"),
        "rps": config.rps,
        "feasible": config.feasible,
        "trial": None if config.trial is None else asdict(config.trial),
        "failure": None if config.failure is None else asdict(config.failure),
        "failure_config": None if config.failure_config is None else asdict(config.failure_config),
        "simulations": config.simulations,
        "capped": config.capped,
        "converged": config.converged,
    }


def _baseline_value(result: PlanResult) -> float | None:
    plans = result.plans()
    baseline = plans.get(BASELINE_A100)
    if baseline is None or baseline.best is None:
        return None
    return _compared_value(result, baseline)


def _compared_value(result: PlanResult, plan: DesignPlan) -> float:
    assert plan.best is not None
    if maximises_throughput(result.request.goal):
        return plan.best.rps
    return spend(plan.spec, plan.best.config, result.request.prices, GOAL_SPEND[result.request.goal])


def _row(result: PlanResult, plan: DesignPlan, baseline: float | None) -> list[str]:
    if plan.best is None:
        return [plan.spec.name, "none", *([""] * 8), plan.note]
    best, prices = plan.best, result.request.prices
    power_kw = spend(plan.spec, best.config, prices, "power") / 1000
    cost = spend(plan.spec, best.config, prices, "cost")
    ratio = _compared_value(result, plan) / baseline if baseline else None
    trial = best.trial
    return [
        plan.spec.name,
        best.config.label(),
        f"{power_kw:,.1f}",
        f"{cost:,.0f}",
        f"{best.rps:.2f}",
        f"{best.rps * 3600 / cost:,.0f}" if cost > 0 else "-",
        f"{best.rps / power_kw:.3f}",
        "-" if ratio is None else f"{ratio:.2f}",
        _ms(trial.ttft_p50_s if trial else None),
        _ms(trial.tbt_p50_s if trial else None),
        best.limited_by(),
    ]


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.0f} ms"
