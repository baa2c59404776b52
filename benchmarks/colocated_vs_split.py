"""The same conv.csv slice through a colocated node and through a prefill/decode split, compared side by side.

Both clusters get the same CPU budget: the colocated node runs 2 torch threads, the prefill and decode nodes 1 each.
Each run goes through `splitserve bench` over the router's OpenAI HTTP endpoint; the script then prints
`splitserve bench --compare`. On a 2-core machine both setups share the same two cores, so this measures the
harness and the split's overheads, not a win.

    python benchmarks/colocated_vs_split.py [--requests 100] [--time-scale 2] [--token-scale 0.25]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_model, beside this script
from bench_model import LLAMA_8L_4K, ensure_model  # noqa: E402

sys.path.insert(0, str(REPO))

from ops.launcher import ClusterSpec, LocalCluster  # noqa: E402

TRACE = REPO.parent / "shared" / "data" / "azure-llm-inference-2023" / "conv.csv"


def run(setup: str, spec: ClusterSpec, args: argparse.Namespace, out: Path) -> Path:
    with LocalCluster(spec) as cluster:
        command = [
            sys.executable, "-m", "ops.cli", "bench", "--endpoint", f"http://{cluster.http_address}/v1",
            "--tokenizer", str(args.model), "--trace", str(args.trace), "--num-requests", str(args.requests),
            "--time-scale", str(args.time_scale), "--token-scale", str(args.token_scale), "--max-context", "4096",
            "--slo-ttft", str(args.slo_ttft), "--slo-tpot", str(args.slo_tpot), "--plot", "--out", str(out / setup),
        ]  # fmt: skip
        subprocess.run(
            command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL
        )
    return out / setup / "results.json"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=REPO / ".cache" / "bench-llama-8l-4k")
    parser.add_argument("--trace", type=Path, default=TRACE)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--time-scale", type=float, default=2.0)
    parser.add_argument("--token-scale", type=float, default=0.25)
    parser.add_argument("--slo-ttft", type=float, default=2.0)
    parser.add_argument("--slo-tpot", type=float, default=0.2)
    parser.add_argument("--kv-backend", choices=["nixl", "torch"], default="nixl")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "colocated-vs-split")
    args = parser.parse_args()
    ensure_model(args.model, seed=0, **LLAMA_8L_4K)
    common = dict(model_dir=args.model, grpc_port=0, http_port=0, kv_backend=args.kv_backend)
    colocated = run(
        "colocated",
        ClusterSpec(prefill=0, decode=0, colocated=1, threads_per_node=2, **common),
        args,
        args.out,
    )  # type: ignore[arg-type]
    split = run("split", ClusterSpec(prefill=1, decode=1, threads_per_node=1, **common), args, args.out)  # type: ignore[arg-type]
    subprocess.run(
        [sys.executable, "-m", "ops.cli", "bench", "--compare", str(colocated), str(split)], check=True
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
