"""Multi-turn conversations through `jsq` and `kv` placement on the same cluster shape, alternating, in one run.

2 prefill + 2 decode nodes (one torch thread each) on the 8-layer 4k-context Llama of the cluster benchmarks. The
workload is `splitserve bench --turns`: conversations whose turns resend the earlier turns and answers plus a new
message (lengths from the Azure conversation trace, scaled), all sharing a system prompt, sent over gRPC at the
trace's pace. Each policy gets a fresh cluster per round (caches start empty), rounds alternate jsq, kv, jsq, kv...
Per run it prints TTFT p50/p99, output throughput, the prompt tokens the prefill nodes computed (prompt tokens less
those served from a prefix cache, as the usage reports them) and the KV bytes the prefill nodes wrote into decode
nodes (their splitserve:kv_transfer_bytes_total), then kv's ratios against jsq.

    python benchmarks/kv_routing.py [--conversations 24] [--turns 4] [--rounds 2] [--time-scale 1]

Target (issue 16): kv at >= 2x lower TTFT p50 and >= 50% fewer transferred bytes than jsq at equal load.
Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_model, beside this script
from bench_model import LLAMA_8L_4K, ensure_model  # noqa: E402

sys.path.insert(0, str(REPO))

from ops.launcher import ClusterSpec, LocalCluster  # noqa: E402

TRACE = REPO.parent / "shared" / "data" / "azure-llm-inference-2023" / "conv.csv"


def transferred_bytes(cluster: LocalCluster) -> float:
    """KV bytes every prefill node wrote into decode nodes, from their Prometheus metrics."""
    total = 0.0
    for node in cluster.by_role("prefill"):
        with urllib.request.urlopen(f"http://{node.metrics_address}/metrics", timeout=10) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith("splitserve:kv_transfer_bytes_total"):
                    total += float(line.rsplit(None, 1)[1])
    return total


def run(policy: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    spec = ClusterSpec(model_dir=args.model, prefill=2, decode=2, grpc_port=0, http_port=0,
                       kv_backend=args.kv_backend, router_args=["--policy", policy])  # fmt: skip
    with LocalCluster(spec) as cluster:
        command = [
            sys.executable, "-m", "ops.cli", "bench", "--endpoint", f"grpc://{cluster.router_address}",
            "--tokenizer", str(args.model), "--trace", str(args.trace),
            "--num-requests", str(args.conversations * args.turns), "--turns", str(args.turns),
            "--think-time", str(args.think_time), "--system-prompt-len", str(args.system_prompt_len),
            "--time-scale", str(args.time_scale), "--token-scale", str(args.token_scale), "--max-context", "4096",
            "--json", "--out", str(out),
        ]  # fmt: skip
        done = subprocess.run(
            command, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
        summary = json.loads(done.stdout)
        moved = transferred_bytes(cluster)
    cached = summary.get("cached_prompt_tokens") or 0
    return {
        "completed": summary["completed"],
        "ttft_p50_ms": summary["ttft_s"]["p50"] * 1e3,
        "ttft_p99_ms": summary["ttft_s"]["p99"] * 1e3,
        "output_tok_s": summary["output_throughput"],
        "prompt_tokens": summary["total_prompt_tokens"],
        "prefill_tokens_computed": summary["total_prompt_tokens"] - cached,
        "kv_bytes_transferred": moved,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=REPO / ".cache" / "bench-llama-8l-4k")
    parser.add_argument("--trace", type=Path, default=TRACE)
    parser.add_argument("--conversations", type=int, default=24)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--think-time", type=float, default=0.5)
    parser.add_argument("--system-prompt-len", type=int, default=256)
    parser.add_argument("--time-scale", type=float, default=1.0)
    parser.add_argument("--token-scale", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kv-backend", choices=["nixl", "torch"], default="torch")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "kv-routing")
    args = parser.parse_args()
    ensure_model(args.model, seed=0, **LLAMA_8L_4K)
    results: dict[str, list[dict[str, float]]] = {"jsq": [], "kv": []}
    for round_ in range(1, args.rounds + 1):
        for policy in ("jsq", "kv"):
            figures = run(policy, args, args.out / f"{policy}-{round_}")
            results[policy].append(figures)
            print(
                json.dumps(
                    {"round": round_, "policy": policy, **{k: round(v, 1) for k, v in figures.items()}}
                )
            )
    median = {p: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for p, runs in results.items()}
    ratios = {
        "ttft_p50_jsq_over_kv": median["jsq"]["ttft_p50_ms"] / median["kv"]["ttft_p50_ms"],
        "ttft_p99_jsq_over_kv": median["jsq"]["ttft_p99_ms"] / median["kv"]["ttft_p99_ms"],
        "kv_bytes_saved": 1 - median["kv"]["kv_bytes_transferred"] / median["jsq"]["kv_bytes_transferred"],
        "prefill_tokens_saved": 1
        - median["kv"]["prefill_tokens_computed"] / median["jsq"]["prefill_tokens_computed"],
        "throughput_kv_over_jsq": median["kv"]["output_tok_s"] / median["jsq"]["output_tok_s"],
    }
    print(json.dumps({"median": median, "ratios": {k: round(v, 3) for k, v in ratios.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
