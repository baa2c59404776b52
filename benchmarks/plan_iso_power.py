"""The paper's iso-power provisioning on conv.csv with the shipped perf model (BLOOM-176B, TP 8), beside the paper.

Three parts:
1. `splitserve plan --goal iso-power --power-basis paper` over all six designs: the table, the direction checks and
   the paper's figures beside ours (the basis that makes "40 DGX-H100 = 70 DGX-A100" hold, so the paper's splits
   lie on our frontier), with its wall time.
2. The paper's own splits in our simulator: the highest rate within all 9 SLOs at the paper's split against ours,
   which says how much the split gaps cost in our model.
3. With --sensitivity: how the highest rate of Baseline-A100 and of Splitwise-AA at the paper's split moves with
   the length of the trace sample, the planner's main knob.

    OMP_NUM_THREADS=1 python benchmarks/plan_iso_power.py [--jobs 2] [--limit 10000] [--sensitivity]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy is imported

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ops.cli import main as splitserve
from ops.plan.designs import Config, DesignSpec
from ops.plan.evaluate import Evaluator
from ops.plan.rate_search import RateLimits
from ops.plan.sample import TraceSample
from ops.sim import DESIGNS, SimConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PERF_CSV = DATA / "splitwise-perf-model" / "perf_model.csv"
CONV = DATA / "azure-llm-inference-2023" / "conv.csv"
# splitwise-facts.md line 67 (conversation) and line 66 (the budget: 70 DGX-A100 for the baseline).
PAPER_SPLITS = {
    "splitwise-aa": (45, 25),
    "splitwise-hh": (25, 15),
    "splitwise-ha": (25, 26),
    "splitwise-hhcap": (25, 21),
}
SENSITIVITY_LIMITS = (1000, 3000, 10000, 19366)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--limit", type=int, default=10000, help="requests in the trace sample")
    parser.add_argument("--sensitivity", action="store_true", help="also sweep the sample length")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        plan_json = Path(scratch) / "plan.json"
        started = time.perf_counter()
        code = splitserve(["plan", "--trace", str(CONV), "--perf-model", str(PERF_CSV), "--goal", "iso-power",
                           "--power-basis", "paper", "--limit", str(args.limit), "--jobs", str(args.jobs),
                           "--quiet", "--output", str(plan_json)])  # fmt: skip
        wall_s = time.perf_counter() - started
        if code != 0:
            return code
        document = json.loads(plan_json.read_text())
    print(f"\nplan wall time: {wall_s:.1f} s with --jobs {args.jobs} ({document['simulations']} simulations)")

    sample = TraceSample.load(CONV, start=0, limit=args.limit)
    evaluator = _evaluator(sample)
    print(f"\nThe paper's conversation splits in our simulator ({sample.describe()}):")
    print(
        f"  {'design':<16} {'paper split':>11} {'max RPS':>8} {'our split':>10} {'max RPS':>8} {'ours/paper':>10}"
    )
    for design in document["designs"]:
        name, best = design["design"], design["best"]
        if name not in PAPER_SPLITS or best is None:
            continue
        prefill, decode = PAPER_SPLITS[name]
        at_paper = evaluator.max_rate(Config(name, prefill, decode), best["rps"]).rps
        ours = f"{best['prefill']}x{best['decode']}"
        ratio = best["rps"] / at_paper if at_paper > 0 else float("inf")
        print(
            f"  {name:<16} {prefill:>8}x{decode:<2} {at_paper:>8.2f} {ours:>10} {best['rps']:>8.2f} {ratio:>10.2f}"
        )

    if args.sensitivity:
        _sensitivity()
    return 0


def _evaluator(sample: TraceSample) -> Evaluator:
    specs = {name: DesignSpec(name, *types) for name, types in DESIGNS.items()}
    return Evaluator(sample, SimConfig(perf_csv=PERF_CSV), specs, RateLimits(rel_tol=0.05))


def _sensitivity() -> None:
    print("\nHighest rate within all 9 SLOs against the sample length (rows 0.., conv.csv):")
    print(
        f"  {'requests':>8} {'span':>7} {'baseline-a100 70':>16} {'splitwise-aa 45x25':>18} {'AA/A100':>8} {'wall':>6}"
    )
    for limit in SENSITIVITY_LIMITS:
        sample = TraceSample.load(CONV, start=0, limit=limit)
        evaluator = _evaluator(sample)
        started = time.perf_counter()
        baseline = evaluator.max_rate(Config("baseline-a100", colocated=70), 30.0).rps
        split = evaluator.max_rate(Config("splitwise-aa", 45, 25), 60.0).rps
        wall = time.perf_counter() - started
        ratio = split / baseline if baseline > 0 else float("inf")
        print(
            f"  {limit:>8} {sample.span_s:>6.0f}s {baseline:>16.2f} {split:>18.2f} {ratio:>8.2f} {wall:>5.0f}s"
        )


if __name__ == "__main__":
    raise SystemExit(main())
