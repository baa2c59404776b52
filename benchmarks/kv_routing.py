"""Multi-turn conversations through `jsq` and `kv` placement on the same cluster shape, alternating, in one run.

Five setups: `splitwise` (jsq, nodes without prefix caches: every prompt recomputed and resent, as Splitwise and
most disaggregated peers' transfers do), `jsq` (blind placement, but each node's own prefix cache, decode nodes
included, still used when the request happens to land on it), `kv` (placement by where the KV is), `kv-nopull`
(kv with `--no-prefix-pull`: a prefill node computes the earlier answers it lacks instead of copying them from the
decode node that holds them) and `kv-local` (kv, and a decode node holding a conversation computes a later turn's
new message itself when it is at most 256 tokens: no prefill hop, no transfer).

2 prefill + 2 decode nodes (one torch thread each) on the 8-layer 4k-context Llama of the cluster benchmarks. The
workload is `splitserve bench --turns`: conversations whose turns resend the earlier turns and answers plus a new
message (lengths from the Azure conversation trace, scaled), all sharing a system prompt, sent over gRPC at the
trace's pace. Each setup gets a fresh cluster per round (caches start empty); rounds alternate the setups.
Per run it prints TTFT p50/p99, output throughput, the prompt tokens the prefill nodes computed (prompt tokens less
those served from a prefix cache, as the usage reports them) and the KV bytes that crossed between nodes: those the
prefill nodes wrote into decode nodes plus those decode nodes wrote back into prefill nodes (the prefill nodes'
splitserve:kv_transfer_bytes_total and splitserve:kv_imported_bytes_total), then each baseline's figures over kv's.

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


def transferred_bytes(cluster: LocalCluster) -> tuple[float, float]:
    """KV bytes the prefill nodes wrote into decode nodes, and decode nodes wrote back into prefill nodes (prefix
    pulls), from the prefill nodes' Prometheus metrics."""
    sent, pulled = 0.0, 0.0
    for node in cluster.by_role("prefill"):
        with urllib.request.urlopen(f"http://{node.metrics_address}/metrics", timeout=10) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith("splitserve:kv_transfer_bytes_total"):
                    sent += float(line.rsplit(None, 1)[1])
                elif line.startswith("splitserve:kv_imported_bytes_total"):
                    pulled += float(line.rsplit(None, 1)[1])
    return sent, pulled


SETUPS = {  # name -> (router flags, extra node flags)
    "splitwise": (["--policy", "jsq"], ["--no-prefix-caching"]),
    "jsq": (["--policy", "jsq"], []),
    "kv": (["--policy", "kv"], []),
    "kv-nopull": (["--policy", "kv", "--no-prefix-pull"], []),
    "kv-local": (["--policy", "kv", "--policy-option", "local_prefill_tokens=256"], []),
}


def run(setup: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    router_args, node_args = SETUPS[setup]
    spec = ClusterSpec(model_dir=args.model, prefill=2, decode=2, grpc_port=0, http_port=0, kv_backend=args.kv_backend,
                       node_args=node_args, router_args=router_args)  # fmt: skip
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
        sent, pulled = transferred_bytes(cluster)
    cached = summary.get("cached_prompt_tokens") or 0
    return {
        "completed": summary["completed"],
        "ttft_p50_ms": summary["ttft_s"]["p50"] * 1e3,
        "ttft_p99_ms": summary["ttft_s"]["p99"] * 1e3,
        "output_tok_s": summary["output_throughput"],
        "prompt_tokens": summary["total_prompt_tokens"],
        "prefill_tokens_computed": summary["total_prompt_tokens"] - cached,
        "kv_bytes_transferred": sent + pulled,
        "kv_bytes_pulled_back": pulled,
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
    results: dict[str, list[dict[str, float]]] = {setup: [] for setup in SETUPS}
    for round_ in range(1, args.rounds + 1):
        for setup in SETUPS:
            figures = run(setup, args, args.out / f"{setup}-{round_}")
            results[setup].append(figures)
            print(
                json.dumps({"round": round_, "setup": setup, **{k: round(v, 1) for k, v in figures.items()}})
            )
    median = {p: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for p, runs in results.items()}
    kv = median["kv"]
    ratios = {
        f"{base}_over_kv": {
            "ttft_p50": median[base]["ttft_p50_ms"] / kv["ttft_p50_ms"],
            "ttft_p99": median[base]["ttft_p99_ms"] / kv["ttft_p99_ms"],
            "kv_bytes": median[base]["kv_bytes_transferred"] / max(kv["kv_bytes_transferred"], 1.0),
            "prefill_tokens": median[base]["prefill_tokens_computed"] / max(kv["prefill_tokens_computed"], 1),
            "output_tok_s": median[base]["output_tok_s"] / kv["output_tok_s"],
        }
        for base in ("splitwise", "jsq", "kv-nopull")
    }
    print(json.dumps({"median": median, "ratios": ratios}, default=lambda v: round(v, 3)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
