"""The plan as a PNG: each design's answer (left) and every configuration its search simulated (right).

Iso goals: bars of the highest rate within the SLOs; the scan plotted as rate against prefill machines (colocated
baselines as horizontal lines). Min goals: bars of the minimised spend; the scan as that spend against prefill
machines. Rendered with matplotlib's Agg canvas directly, so no GUI backend or global pyplot state is involved.
"""

from __future__ import annotations

from pathlib import Path

from ops.plan.budget import SPEND_UNITS, spend
from ops.plan.outcome import GOAL_SPEND, DesignPlan, maximises_throughput
from ops.plan.planner import PlanResult

# Colocated designs have one configuration: a horizontal line each, told apart by colour and dash.
_BASELINE_STYLES = (("dimgray", "--"), ("black", ":"), ("tab:brown", "-."))


def save_plot(result: PlanResult, path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 5), layout="constrained")
    FigureCanvasAgg(figure)
    answers, scans = figure.subplots(1, 2)
    maximise = maximises_throughput(result.request.goal)
    kind = GOAL_SPEND[result.request.goal]
    scale, unit = (1000.0, "kW") if kind == "power" else (1.0, SPEND_UNITS["cost"])
    value_label = (
        "max RPS within all 9 SLOs" if maximise else f"{kind} at {result.request.target_rps:g} RPS ({unit})"
    )

    names = [plan.spec.name for plan in result.designs]
    values = [_answer(result, plan, maximise) / (1.0 if maximise else scale) for plan in result.designs]
    bars = answers.bar(range(len(names)), values, color="tab:blue")
    for bar, plan in zip(bars, result.designs, strict=True):
        label = plan.best.config.label() if plan.best is not None else "none"
        answers.annotate(
            label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom"
        )
    answers.set_xticks(range(len(names)), names, rotation=20, ha="right")
    answers.set_ylabel(value_label)
    answers.set_title("chosen configuration per design")

    baselines = 0
    for plan in result.designs:
        if not plan.spec.is_split:
            baselines += 1
        _plot_scan(
            scans, result, plan, maximise, scale, _BASELINE_STYLES[(baselines - 1) % len(_BASELINE_STYLES)]
        )
    scans.set_xlabel("prefill machines (split designs)")
    scans.set_ylabel(value_label)
    scans.set_title("configurations simulated")
    scans.legend(fontsize="small")
    figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def _answer(result: PlanResult, plan: DesignPlan, maximise: bool) -> float:
    if plan.best is None:
        return 0.0
    if maximise:
        return plan.best.rps
    return spend(plan.spec, plan.best.config, result.request.prices, GOAL_SPEND[result.request.goal])


def _plot_scan(
    axes: object,
    result: PlanResult,
    plan: DesignPlan,
    maximise: bool,
    scale: float,
    baseline_style: tuple[str, str],
) -> None:
    from matplotlib.axes import Axes

    assert isinstance(axes, Axes)
    kind = GOAL_SPEND[result.request.goal]
    if not plan.spec.is_split:
        if plan.best is not None:
            value = (
                plan.best.rps if maximise else spend(plan.spec, plan.best.config, result.request.prices, kind)
            )
            axes.axhline(
                value / (1.0 if maximise else scale), linestyle="--", linewidth=1, label=plan.spec.name
            )
        return
    points = sorted(
        (
            r.config.prefill,
            r.rps if maximise else spend(plan.spec, r.config, result.request.prices, kind) / scale,
        )
        for r in plan.scanned
        if r.feasible or maximise
    )
    if points:
        xs, ys = zip(*points, strict=True)
        axes.plot(xs, ys, marker="o", linewidth=1, label=plan.spec.name)
