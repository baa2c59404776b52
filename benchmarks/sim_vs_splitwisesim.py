"""Our simulator against Microsoft's SplitwiseSim, the Splitwise paper's own, on the same traces and designs.

For each trace (SplitwiseSim's generator, run in its checkout: Poisson arrivals at each rate for --seconds, prompt
and output sizes drawn from conv.csv or code.csv, numpy seeded with --seed before each trace) and each of the six
Table V designs at the paper's iso-power splits, it runs:
- SplitwiseSim itself (its run.py, BLOOM-176B, performance_model=db: the overrides in splitwise_sim_overrides);
- `splitserve simulate --fidelity splitwise-sim` (ops/sim/splitwise_sim);
- `splitserve simulate` (our default model), with `--policy jsq` and with `--policy mixed` for split designs;
and prints, per design and trace, P50/P90/P99 of TTFT, TBT and E2E and the 9-SLO verdict of each, with our figures'
differences from SplitwiseSim's. All latencies are compared as SplitwiseSim defines them (TBT = (E2E - TTFT) /
output tokens; SLO slowdowns as the paper's notebooks compute them, ops/sim/splitwise_sim/run.py), so that only the
models differ.

    python benchmarks/sim_vs_splitwisesim.py --splitwise-sim DIR [--python PY] [--rates 70 100 130]
        [--traces conv code] [--seconds 120] [--jobs 2] [--output out.json]

DIR is a checkout of github.com/Mutinifni/splitwise-sim (fetch it; its license is MIT) and PY a Python with its
needs (hydra-core 1.3.2, omegaconf 2.3.0, numpy, pandas, scipy, networkx, requests). Its configs/config.yaml asks for
a Ray launcher; the first run removes those lines from it (Ray is not needed for single runs). SplitwiseSim's
results land in DIR/results as its own runs would, and a run whose detailed output is newer than its trace is
reused. Expect about a minute per SplitwiseSim run of a 2-minute trace on this machine; ours take about a second.
Not a test: tests/unit/test_splitwise_sim_fidelity.py checks a small case against stored SplitwiseSim output.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ops.bench.stats import percentile  # noqa: E402
from ops.sim import SimConfig, SimResult, make_design, simulate  # noqa: E402
from ops.sim.splitwise_sim import splitwise_slo_check  # noqa: E402
from ops.sim.splitwise_sim.perf import load_perf  # noqa: E402
from ops.sim.splitwise_sim.trace import load_splitwise_sim_trace  # noqa: E402

DATA = REPO.parent / "shared" / "data"
SOURCES = {"conv": "conv.csv", "code": "code.csv"}
# The paper's iso-power splits (docs/splitwise-facts.md line 67; baselines: 70 DGX-A100 or 40 DGX-H100).
SPLITS = {
    "conv": {
        "splitwise-aa": (45, 25),
        "splitwise-hh": (25, 15),
        "splitwise-ha": (25, 26),
        "splitwise-hhcap": (25, 21),
    },
    "code": {
        "splitwise-aa": (55, 15),
        "splitwise-hh": (35, 5),
        "splitwise-ha": (35, 8),
        "splitwise-hhcap": (35, 7),
    },
}
BASELINES = {"baseline-a100": 70, "baseline-h100": 40}
METRICS = ("ttft", "tbt", "e2e")


def splitwise_sim_overrides(design: str, prefill: int, decode: int, colocated: int) -> list[str]:
    """SplitwiseSim's run.py overrides for one of our designs (its scripts/ and configs/experiment/ do the same)."""
    split = ["applications.0.scheduler=mixed_pool", "start_state=splitwise"]
    homogeneous = ["start_state.split_type=homogeneous", f"start_state.prompt.num_instances={prefill}",
                   f"start_state.token.num_instances={decode}"]  # fmt: skip
    servers = "cluster.servers.{}.count={}"
    table = {
        "baseline-a100": ["applications.0.scheduler=token_jsq", "cluster=half_half", servers.format(0, colocated),
                          servers.format(1, 0), "start_state=baseline"],
        "baseline-h100": ["applications.0.scheduler=token_jsq", "cluster=half_half", servers.format(0, 0),
                          servers.format(1, colocated), "start_state=baseline"],
        "splitwise-aa": [*split, "cluster=half_half", servers.format(0, prefill + decode), servers.format(1, 0),
                         *homogeneous],
        "splitwise-hh": [*split, "cluster=half_half", servers.format(0, 0), servers.format(1, prefill + decode),
                         *homogeneous],
        # heterogeneous: the prompt pool is the DGX-H100s, the token pool the other SKU (listed first)
        "splitwise-ha": [*split, "cluster=half_half", servers.format(0, decode), servers.format(1, prefill),
                         "start_state.split_type=heterogeneous"],
        "splitwise-hhcap": ["applications.0.scheduler=mixed_pool", "start_state=splitwise_hhcap",
                            "cluster=hhcap_half_half", servers.format(0, decode), servers.format(1, prefill),
                            "start_state.split_type=heterogeneous"],
    }  # fmt: skip
    return [*table[design], "performance_model=db", "seed=0"]


def main() -> int:
    args = _parse()
    checkout: Path = args.splitwise_sim.resolve()
    _drop_ray_launcher(checkout / "configs" / "config.yaml")
    traces = [(kind, rate) for kind in args.traces for rate in args.rates]
    for kind, rate in traces:
        _generate_trace(args, checkout, kind, rate)
    runs = [(kind, rate, design, sizes) for kind, rate in traces for design, sizes in _designs(kind).items()]
    with ThreadPoolExecutor(args.jobs) as pool:
        outputs = list(pool.map(lambda run: _run_splitwise_sim(args, checkout, *run), runs))
    perf_csv = DATA / "splitwise-perf-model" / "perf_model.csv"
    a100 = load_perf(perf_csv, "bloom-176b", 8, ["a100-80gb"])["a100-80gb"]
    report = []
    for (kind, rate, design, sizes), detailed in zip(runs, outputs, strict=True):
        requests = load_splitwise_sim_trace(_trace_path(checkout, kind, rate))
        entry: dict[str, Any] = {"trace": f"{kind}_{rate}", "requests": len(requests), "design": design,
                                 "sizes": sizes, "splitwise_sim": _their_figures(detailed, requests, a100)}  # fmt: skip
        cluster = make_design(design, **sizes)
        for name, config in _our_configs(perf_csv, design).items():
            entry[name] = _our_figures(simulate(cluster, requests, config), a100)
        report.append(entry)
        _print_entry(entry)
    _print_summary(report)
    if args.output:
        args.output.write_text(json.dumps(report, indent=1) + "\n")
    return 0


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--splitwise-sim", type=Path, required=True, help="a checkout of Mutinifni/splitwise-sim"
    )
    parser.add_argument("--python", default=sys.executable, help="a Python with SplitwiseSim's needs")
    parser.add_argument("--rates", type=int, nargs="+", default=[70, 100, 130])
    parser.add_argument("--traces", nargs="+", choices=sorted(SOURCES), default=["conv", "code"])
    parser.add_argument("--seconds", type=int, default=120, help="length of each generated trace")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="SplitwiseSim runs at once")
    parser.add_argument("--output", type=Path, default=None)
    return parser.parse_args()


def _designs(kind: str) -> dict[str, dict[str, int]]:
    designs = {name: {"colocated": count} for name, count in BASELINES.items()}
    designs.update({name: {"prefill": p, "decode": d} for name, (p, d) in SPLITS[kind].items()})
    return designs


def _drop_ray_launcher(config: Path) -> None:
    lines = config.read_text().splitlines(keepends=True)
    kept, skipping = [], False
    for line in lines:
        if line.strip() == "- override hydra/launcher: ray":
            continue
        if line.startswith("  launcher:"):
            skipping = True
            continue
        if skipping and (line.startswith("    ") or not line.strip()):
            continue
        skipping = False
        kept.append(line)
    if kept != lines:
        config.write_text("".join(kept))


def _trace_name(kind: str, rate: int | str) -> str:
    return f"bench_{kind}_{rate}"


def _trace_path(checkout: Path, kind: str, rate: int) -> Path:
    return checkout / "traces" / f"{_trace_name(kind, rate)}.csv"


def _generate_trace(args: argparse.Namespace, checkout: Path, kind: str, rate: int) -> None:
    path = _trace_path(checkout, kind, rate)
    if path.exists():
        return
    path.parent.mkdir(exist_ok=True)
    source = DATA / "azure-llm-inference-2023" / SOURCES[kind]
    template = str(path.parent / f"{_trace_name(kind, '{}')}.csv")  # its generator fills in the rate
    code = (
        "import numpy, generate_trace as g\n"
        f"numpy.random.seed({args.seed})\n"
        f"g.generate_traces(1_000_000, {args.seconds}, [{rate}], {str(source)!r}, {template!r})\n"
    )
    subprocess.run([args.python, "-c", code], cwd=checkout, check=True, timeout=600)


def _run_splitwise_sim(
    args: argparse.Namespace, checkout: Path, kind: str, rate: int, design: str, sizes: dict[str, int]
) -> Path:
    trace = _trace_name(kind, rate)
    label = "-".join(str(sizes.get(k, 0)) for k in ("prefill", "decode", "colocated"))
    out = checkout / "results" / "splitserve-bench" / trace / f"{design}-{label}"
    detailed = out / "detailed" / "0.csv"
    if detailed.exists() and detailed.stat().st_mtime > _trace_path(checkout, kind, rate).stat().st_mtime:
        return detailed
    overrides = splitwise_sim_overrides(design, sizes.get("prefill", 0), sizes.get("decode", 0),
                                        sizes.get("colocated", 0))  # fmt: skip
    command = [args.python, "run.py", *overrides, f"trace.filename={trace}", f"output_dir={out}"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=checkout, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0 or not detailed.exists():
        raise RuntimeError(f"SplitwiseSim failed on {design} {trace}: {done.stderr[-2000:]}")
    (out / "splitserve-run-seconds.txt").write_text(f"{time.perf_counter() - started:.2f}\n")
    print(f"SplitwiseSim {design} {trace}: done", file=sys.stderr)
    return detailed


def _our_configs(perf_csv: Path, design: str) -> dict[str, SimConfig]:
    configs = {
        "fidelity_splitwise_sim": SimConfig(perf_csv=perf_csv, fidelity="splitwise-sim"),
        "splitserve_jsq": SimConfig(perf_csv=perf_csv),
    }
    if not design.startswith("baseline"):
        configs["splitserve_mixed"] = SimConfig(perf_csv=perf_csv, policy="mixed")
    return configs


def _figures(
    ttft: np.ndarray, e2e: np.ndarray, prompt: np.ndarray, output: np.ndarray, a100: Any
) -> dict[str, Any]:
    tbt = (e2e - ttft) / output
    figures: dict[str, Any] = {
        metric: {f"p{q}": percentile(values, q) for q in (50, 90, 99)}
        for metric, values in (("ttft", ttft), ("tbt", tbt), ("e2e", e2e))
    }
    slo = splitwise_slo_check(a100, prompt, output, ttft, tbt, e2e)
    figures["slo_passed"] = slo.passed
    figures["slo_failed"] = [f"{r.metric} P{r.percentile}" for r in slo.rows if not r.ok]
    return figures


def _their_figures(detailed: Path, requests: list[Any], a100: Any) -> dict[str, Any]:
    with detailed.open(newline="") as handle:
        rows = {int(float(row["request_ids"])): row for row in csv.DictReader(handle)}
    if len(rows) != len(requests):
        raise RuntimeError(f"{detailed}: SplitwiseSim finished {len(rows)} of {len(requests)} requests")
    ttft = np.array([float(rows[i]["ttft_times"]) for i in range(len(requests))])
    e2e = np.array([float(rows[i]["response_times"]) for i in range(len(requests))])
    prompt = np.array([r.prompt_tokens for r in requests])
    output = np.array([r.output_tokens for r in requests])
    figures = _figures(ttft, e2e, prompt, output, a100)
    seconds = detailed.parent.parent / "splitserve-run-seconds.txt"
    figures["wall_s"] = float(seconds.read_text()) if seconds.exists() else None
    return figures


def _our_figures(result: SimResult, a100: Any) -> dict[str, Any]:
    figures = _figures(result.ttft_s, result.e2e_s, result.prompt_tokens, result.output_tokens, a100)
    figures["wall_s"] = result.wall_s
    return figures


def _print_entry(entry: dict[str, Any]) -> None:
    theirs = entry["splitwise_sim"]
    sizes = "x".join(str(v) for v in entry["sizes"].values())
    print(f"\n{entry['design']} {sizes} on {entry['trace']} ({entry['requests']} requests)")
    print(f"  {'':<24}" + "".join(f"{m.upper() + ' ' + p:>16}" for m in METRICS for p in ("p50", "p90", "p99"))
          + "  verdict")  # fmt: skip
    for name in ("splitwise_sim", "fidelity_splitwise_sim", "splitserve_jsq", "splitserve_mixed"):
        if name not in entry:
            continue
        ours = entry[name]
        cells = []
        for metric in METRICS:
            for p in ("p50", "p90", "p99"):
                value = ours[metric][p]
                cell = f"{value:.3f}"
                if name != "splitwise_sim":
                    cell += f" ({(value / theirs[metric][p] - 1) * 100:+.0f}%)"
                cells.append(f"{cell:>16}")
        verdict = "PASS" if ours["slo_passed"] else "FAIL " + ",".join(ours["slo_failed"])
        print(f"  {name:<24}" + "".join(cells) + f"  {verdict}")


def _print_summary(report: list[dict[str, Any]]) -> None:
    print("\nAgainst SplitwiseSim, over every design and trace:")
    for name in ("fidelity_splitwise_sim", "splitserve_jsq", "splitserve_mixed"):
        entries = [e for e in report if name in e]
        same = sum(e[name]["slo_passed"] == e["splitwise_sim"]["slo_passed"] for e in entries)
        worst = max(
            abs(e[name][m][p] / e["splitwise_sim"][m][p] - 1)
            for e in entries
            for m in METRICS
            for p in ("p50", "p90", "p99")
        )
        print(
            f"  {name:<24} same 9-SLO verdict {same}/{len(entries)}, largest P50/P90/P99 difference {worst:.1%}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
