"""Extra TTFT and 2nd-token latency of disaggregated serving over colocated, layer-wise vs one-piece KV transfer.

Three clusters on the same model and machine, measured in one run: a colocated node (the baseline), a prefill +
decode pair streaming KV layer by layer, and the same pair sending it in one piece after the prompt. Requests run
one at a time, so each figure is latency, not queueing. Client-side timings through the router's gRPC endpoint.

    python benchmarks/disagg_latency.py [--lengths 512 2048] [--repeats 5] [--kv-backend torch]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_model, beside this script
from bench_model import LLAMA_8L_4K, ensure_model  # noqa: E402

sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

from ops.launcher import ClusterSpec, LocalCluster  # noqa: E402
from splitserve.v1 import inference_pb2 as pb  # noqa: E402
from splitserve.v1 import inference_pb2_grpc  # noqa: E402

# 8 layers so that per-layer streaming has something to overlap; a 4096-token context for 2048-token prompts.
SETUPS = {
    "colocated": dict(prefill=0, decode=0, colocated=1, node_args=[]),
    "layer-wise": dict(prefill=1, decode=1, colocated=0, node_args=["--one-piece-below", "0"]),
    "one-piece": dict(prefill=1, decode=1, colocated=0, node_args=["--one-piece-below", "1000000"]),
}


async def time_one(address: str, prompt: list[int]) -> tuple[float, float]:
    """(TTFT, time from the first to the second token) of one greedy request, seconds."""
    request = pb.GenerateRequest(
        sampling=pb.SamplingParameters(max_tokens=2, temperature=0.0, ignore_eos=True)
    )
    request.token_ids.ids.extend(prompt)
    stamps: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        started = time.perf_counter()
        async for msg in inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=300):
            stamps += [time.perf_counter()] * len(msg.token_ids)
    return stamps[0] - started, stamps[1] - stamps[0]


def measure(setup: str, model: Path, lengths: list[int], repeats: int, backend: str, threads: int) -> dict:
    spec = ClusterSpec(
        model_dir=model,
        grpc_port=0,
        http_port=0,
        kv_backend=backend,
        threads_per_node=threads,
        **SETUPS[setup],
    )  # type: ignore[arg-type]
    rng = random.Random(0)
    out: dict[str, dict[str, float]] = {}
    with LocalCluster(spec) as cluster:
        for n in lengths:
            asyncio.run(
                time_one(cluster.router_address, [rng.randrange(3, 8000) for _ in range(n)])
            )  # warm-up
            runs = [
                asyncio.run(time_one(cluster.router_address, [rng.randrange(3, 8000) for _ in range(n)]))
                for _ in range(repeats)
            ]
            out[str(n)] = {
                "ttft_ms": statistics.median(r[0] for r in runs) * 1e3,
                "second_token_ms": statistics.median(r[1] for r in runs) * 1e3,
            }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=REPO / ".cache" / "bench-llama-8l-4k")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kv-backend", choices=["torch", "nixl"], default="torch")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per node process")
    args = parser.parse_args()
    ensure_model(args.model, seed=0, **LLAMA_8L_4K)
    results = {
        s: measure(s, args.model, args.lengths, args.repeats, args.kv_backend, args.threads) for s in SETUPS
    }
    for setup, by_length in results.items():
        print(json.dumps({"setup": setup, "kv_backend": args.kv_backend, **by_length}))
    base = results["colocated"]
    for setup in ("layer-wise", "one-piece"):
        for n in map(str, args.lengths):
            print(
                json.dumps(
                    {
                        "setup": setup,
                        "prompt_tokens": int(n),
                        "extra_ttft_ms": results[setup][n]["ttft_ms"] - base[n]["ttft_ms"],
                        "extra_ttft_ratio": results[setup][n]["ttft_ms"] / base[n]["ttft_ms"],
                        "extra_second_token_ms": results[setup][n]["second_token_ms"]
                        - base[n]["second_token_ms"],
                    }
                )
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
