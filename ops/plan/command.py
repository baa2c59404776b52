"""`splitserve plan`: Splitwise's provisioning search over simulated clusters.

    splitserve plan --trace conv.csv --perf-model perf_model.csv                        # iso-power, paper budget
    splitserve plan --trace conv.csv --perf-model perf_model.csv --goal iso-cost --budget 1520
    splitserve plan --trace code.csv --perf-model perf_model.csv --goal min-cost --target-rps 70 \\
        --design splitwise-hh --jobs 2 --output plan.json --plot plan.png

Exit codes: 0 a plan was found (some designs may have none); 3 no design has a feasible configuration (the table
says why, and the JSON has "feasible": false; with --cluster-out, also when the design it would write has none);
2 bad input (one line on stderr); 1 the plan ran past --time-limit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cluster.machines import MachineType, load_catalog
from cluster.perfmodel import PerfModel
from ops.cli_errors import require_file
from ops.plan import report
from ops.plan.budget import parse_budget
from ops.plan.cluster_spec import ClusterOutput
from ops.plan.cluster_spec import prepare as prepare_cluster_output
from ops.plan.designs import DesignSpec, resolve_designs
from ops.plan.estimate import CapacityGuess, load_perf_models
from ops.plan.evaluate import Evaluator
from ops.plan.outcome import GOAL_SPEND, ConfigResult, Goal, maximises_throughput
from ops.plan.paper import TRACE_KINDS, RunFacts, TraceKind, compare_with_paper, guess_trace_kind
from ops.plan.planner import PlanRequest, PlanResult, run_plan
from ops.plan.pricing import PAPER_RELATIVE_POWER, MachinePrice, PowerBasis, price_table
from ops.plan.rate_search import RateLimits
from ops.plan.runner import PlanTimeout, Runner
from ops.plan.sample import TraceSample
from ops.sim import DESIGNS, SimConfig
from ops.sim.arguments import shared_config

EXIT_TIMEOUT = 1
EXIT_USAGE = 2
EXIT_INFEASIBLE = 3


def main(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, OSError) as exc:
        return _fail(exc, EXIT_USAGE)
    except PlanTimeout as exc:
        return _fail(exc, EXIT_TIMEOUT)


def _fail(exc: Exception, code: int) -> int:
    message = " ".join(str(exc).split())
    print(f"splitserve plan: error: {message}", file=sys.stderr)
    return code


def _run(args: argparse.Namespace) -> int:
    inputs = {"--trace": args.trace, "--perf-model": args.perf_model, "--machines": args.machines,
              "--cluster-template": args.cluster_template}  # fmt: skip
    for flag, path in inputs.items():
        require_file(path, flag)
    goal: Goal = args.goal
    catalog = load_catalog(args.machines)
    specs = resolve_designs(args.design or list(DESIGNS), args.custom, DESIGNS, catalog)
    prices = _prices(catalog, specs, args.power_basis)
    kind = GOAL_SPEND[goal]
    request = PlanRequest(
        goal=goal,
        specs=tuple(specs),
        prices=prices,
        budget=parse_budget(args.budget, kind, prices) if maximises_throughput(goal) else None,
        target_rps=args.target_rps,
        coarse_points=args.coarse_points,
        max_machines=args.max_machines,
    )
    sim_config = SimConfig(**shared_config(args), catalog=catalog)
    cluster_output = prepare_cluster_output(args, specs, catalog)
    guess_from = _perf_models(sim_config, specs, catalog)
    sample = TraceSample.load(
        args.trace, start=args.start, limit=args.limit, arrivals=args.arrivals, seed=args.seed
    )
    guess = CapacityGuess.from_perf_models(
        guess_from, sample.mean_prompt_tokens(), sample.mean_output_tokens(), sim_config.max_batch_tokens
    )
    limits = RateLimits(rel_tol=args.rate_tolerance, max_probes=args.max_probes)
    evaluator = Evaluator(sample, sim_config, {spec.name: spec for spec in specs}, limits)
    progress = None if args.quiet else _print_progress
    with Runner(evaluator, jobs=args.jobs, time_limit_s=args.time_limit, on_result=progress) as runner:
        result = run_plan(request, runner, guess)
    trace_kind = _trace_kind(args.paper_trace, args.trace)
    paper = compare_with_paper(RunFacts(goal, trace_kind, result.plans(), result.spends(), args.target_rps))
    context = _context(args, sample, trace_kind)
    _print(result, paper, context)
    if args.output:
        _write_json(args.output, report.to_dict(result, paper, context))
    if args.plot:
        report_title = f"splitwise plan: {goal}, {sample.describe()}"
        from ops.plan.plot import save_plot

        save_plot(result, args.plot, report_title)
    written = cluster_output is None or _write_cluster(cluster_output, result)
    return 0 if result.feasible and written else EXIT_INFEASIBLE


def _prices(
    catalog: dict[str, MachineType], specs: list[DesignSpec], basis: PowerBasis
) -> dict[str, MachinePrice]:
    """Every machine type a design or a budget may name: the designs' (checked) and the others the basis prices."""
    priceable = [name for name in catalog if basis == "rated" or name in PAPER_RELATIVE_POWER]
    prices = price_table(catalog, priceable, basis)
    prices.update(price_table(catalog, {t for spec in specs for t in spec.machine_types()}, basis))
    return prices


def _perf_models(
    config: SimConfig, specs: list[DesignSpec], catalog: dict[str, MachineType]
) -> dict[str, PerfModel]:
    """The perf model of every machine type in the designs, and a check that the SLO reference is measured too."""
    types = sorted({t for spec in specs for t in spec.machine_types()})
    hardware = {t: config.hardware_of(catalog[t]) for t in types}
    PerfModel.from_csv(config.perf_csv, config.model, config.reference_hardware, config.tensor_parallel)
    return load_perf_models(
        str(config.perf_csv), config.model, config.tensor_parallel, types, catalog, hardware
    )


def _trace_kind(choice: str, trace: Path) -> TraceKind | None:
    if choice == "auto":
        return guess_trace_kind(trace.name)
    return next((kind for kind in TRACE_KINDS if kind == choice), None)


def _context(args: argparse.Namespace, sample: TraceSample, trace_kind: TraceKind | None) -> dict[str, Any]:
    return {
        "sample": sample.describe(),
        "trace": str(args.trace),
        "paper_trace": trace_kind,
        "perf_model": f"{args.perf_model} ({args.model}, TP {args.tp})",
        "power_basis": args.power_basis,
        "policy": args.policy if args.fidelity == "splitserve" else "SplitwiseSim's (mixed_pool, token_jsq)",
        "fidelity": args.fidelity,
        "rate_tolerance": args.rate_tolerance,
    }


def _print(result: PlanResult, paper: list[Any], context: dict[str, Any]) -> None:
    lines = report.header_lines(
        result,
        [
            f"sample       {context['sample']}",
            f"perf model   {context['perf_model']}, policy {context['policy']}, fidelity {context['fidelity']}",
            f"power basis  {context['power_basis']}",
            "",
        ],
    )
    lines += report.table_lines(result)
    checks = report.check_lines(result)
    lines += ["", *checks] if checks else []
    lines += ["", *report.paper_lines(paper)]
    lines.append(f"\n{result.simulations:,} simulations in {result.wall_s:,.1f} s")
    print("\n".join(lines))


def _print_progress(result: object) -> None:
    if isinstance(result, ConfigResult):
        outcome = f"{result.rps:.2f} req/s" if result.feasible else "infeasible"
        print(
            f"plan: {result.config.design} {result.config.label()}: {outcome} ({result.simulations} simulations)",
            file=sys.stderr,
            flush=True,
        )


def _write_cluster(output: ClusterOutput, result: PlanResult) -> bool:
    why_not = output.write(result)
    if why_not is not None:
        print(f"splitserve plan: {output.path} not written: {why_not}", file=sys.stderr)
        return False
    print(f"SplitserveCluster written to {output.path}")
    return True


def _write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
