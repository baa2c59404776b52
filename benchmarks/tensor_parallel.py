"""Tensor parallel 1 vs 2 (engine/tensor_parallel/): one engine's prompt and decode step times, and a split cluster's
KV transfer between TP degrees, same cores.

Engine part: TP 1 runs one process with `--threads` threads; TP 2 runs two processes with `--threads / 2` each, so
both use the same cores. Per round and setup (alternating, fresh engine each): a batch of prompts computed (prefill
tokens/s), then decode steps at that batch (ms per step), greedy, bfloat16 by default on the 156M Llama of the
engine benchmarks. Two more TP 2 setups in the prefill role: `tp2-prefill-role` gathers every layer's KV into rank
0's whole-heads pool as it is computed (KV that leaves through that pool), `tp2-prefill-rank-to-rank` does not (KV
that each rank sends itself, cluster/node/rank_kv.py); their prompts over the colocated TP 2 engine's are printed.

Transfer part: one prefill and one decode node for each pair of TP degrees (prefill TP, decode TP) in 1-1, 2-1, 1-2
and 2-2, KV rank to rank (each prefill rank writes the heads each decode rank holds), and 2-1, 1-2 and 2-2 through
both nodes' whole-heads pools (`--no-kv-rank-to-rank`: rank 0 gathers and sends, the decode node's rank 0 receives
and hands each rank its heads), each node's ranks sharing `--threads` threads, `--transfer-requests` prompts of
`--transfer-prompt-len` tokens sent one at a time (so nothing queues), two output tokens each. From the router's
request log, per request: the prompt's compute on the prefill node (`prefill`), the wait after it until the KV had
landed (`transfer`), the whole transfer (`transfer_seconds`) and TTFT. Pairs alternate by round; medians and each
pair over 1-1 are printed.

    python benchmarks/tensor_parallel.py [--rounds 3] [--batch 8] [--prompt-len 256] [--decode-steps 32]
                                         [--transfer-requests 8] [--transfer-prompt-len 1024] [--skip-engine]
                                         [--skip-transfer] [--device cpu|cuda]

On a 2-core CPU expect no speed-up: both ranks share the memory bandwidth that bounds decoding, and every layer adds
two all-reduces through loopback gloo. The figures show what the split costs where it cannot pay; on GPUs (one per
rank, benchmarks/gpu_suite.sh) it is what lets a model too large for one device run at all.
Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_model, beside this script
from bench_model import LLAMA_156M, ensure_model  # noqa: E402

sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from engine.config import EngineConfig, EngineRole  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.outputs import KVStepPlan  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

# name -> (prefill TP, decode TP, rank to rank): each prefill rank writes its heads to the decode ranks holding them
# (cluster/node/rank_kv.py); the -via-rank0 pairs send them through both nodes' whole-heads pools instead
# (--no-kv-rank-to-rank).
PAIRS = {
    "1-1": (1, 1, True),
    "2-1": (2, 1, True),
    "1-2": (1, 2, True),
    "2-2": (2, 2, True),
    "2-1-via-rank0": (2, 1, False),
    "1-2-via-rank0": (1, 2, False),
    "2-2-via-rank0": (2, 2, False),
}


def run(tp: int, args: argparse.Namespace, role: str = "colocated", mirror: bool = True) -> dict[str, float]:
    """A batch of prompts in one step, then (colocated) decode steps to the end. In the prefill role the prompts'
    step also gathers every layer's KV into rank 0's transfer pool (mirror), or, as for KV going rank to rank, not:
    their cost over the colocated TP 2 step."""
    torch.set_num_threads(max(1, args.threads // tp))
    config = EngineConfig(device=args.device, dtype=args.dtype, num_kv_blocks=1024, max_num_batched_tokens=args.batch * args.prompt_len,
                          max_num_seqs=args.batch, tensor_parallel=tp, role=EngineRole(role))  # fmt: skip
    engine = LLMEngine(args.model, config)
    if not mirror:  # what a prefill node's service plans when every request's KV goes rank to rank
        engine.set_kv_layer_hook(
            lambda _layer, _writes: None,
            lambda writes: KVStepPlan(unmirrored=frozenset(w.request_id for w in writes)),
        )
    try:
        rng = random.Random(0)
        prompts = [[rng.randrange(3, 30000) for _ in range(args.prompt_len)] for _ in range(args.batch)]
        # Different prompts of the same shapes, so that the timed step computes its prompts instead of finding them
        # in the prefix cache.
        warm_up = [[rng.randrange(3, 30000) for _ in range(args.prompt_len)] for _ in range(args.batch)]
        params = SamplingParams(max_tokens=args.decode_steps + 1, temperature=0.0, ignore_eos=True)
        # First-call costs (on a GPU also the kernels' first launches at the timed batch's shapes): a batch of the
        # same shapes once, untimed.
        _prompts_step(
            engine, "warm-up", warm_up, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        )
        while engine.has_unfinished():
            engine.step()
        prompt_s = _prompts_step(engine, "r", prompts, params)
        steps = 0
        started = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
            steps += 1
        decode_s = time.perf_counter() - started
    finally:
        engine.close()
    figures = {"prefill_tok_s": args.batch * args.prompt_len / prompt_s}
    if steps:
        figures["decode_step_ms"] = decode_s / steps * 1e3
    return figures


def _prompts_step(engine: LLMEngine, tag: str, prompts: list[list[int]], params: SamplingParams) -> float:
    """Seconds of one step computing every prompt (the budget fits the batch); a prefill engine lets go of them."""
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}{i}", prompt, params)
    started = time.perf_counter()
    outputs = engine.step()
    elapsed = time.perf_counter() - started
    if engine.config.role == "prefill":
        for out in outputs:
            engine.release(out.request_id)
    return elapsed


def run_split(
    prefill_tp: int, decode_tp: int, rank_to_rank: bool, args: argparse.Namespace
) -> dict[str, float]:
    """Median per-request phases of one prefill and one decode node at these TP degrees."""
    import grpc

    from ops.launcher import ClusterSpec, LocalCluster  # the cluster's packages only where clusters run
    from splitserve.v1 import inference_pb2 as pb
    from splitserve.v1 import inference_pb2_grpc

    role_args = {
        role: ["--tensor-parallel", str(tp), "--threads", str(max(1, args.threads // tp))]
        + ([] if rank_to_rank else ["--no-kv-rank-to-rank"])
        for role, tp in (("prefill", prefill_tp), ("decode", decode_tp))
    }
    spec = ClusterSpec(model_dir=args.model, prefill=1, decode=1, grpc_port=0, http_port=0, threads_per_node=args.threads,
                       kv_backend=args.kv_backend, node_args=["--dtype", args.dtype], role_args=role_args)  # fmt: skip
    rng = random.Random(1)
    prompts = [
        [rng.randrange(3, 30000) for _ in range(args.transfer_prompt_len)]
        for _ in range(args.transfer_requests + 1)
    ]
    sampling = pb.SamplingParameters(max_tokens=2, temperature=0.0, ignore_eos=True)
    with LocalCluster(spec) as cluster, grpc.insecure_channel(cluster.router_address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        for prompt in prompts:  # the first warms both nodes up; left out below
            request = pb.GenerateRequest(sampling=sampling)
            request.token_ids.ids.extend(prompt)
            for _ in stub.Generate(request, timeout=300):
                pass
        address = cluster.by_role("router")[0].ready["http_address"]
        with urllib.request.urlopen(f"http://{address}/dashboard/api/state", timeout=10) as reply:
            records = json.load(reply)["requests"]["recent"][: args.transfer_requests]
    return {
        "prefill_ms": statistics.median(r["phases"]["prefill"] for r in records) * 1e3,
        "transfer_wait_ms": statistics.median(r["phases"]["transfer"] for r in records) * 1e3,
        "transfer_ms": statistics.median(r["transfer_seconds"] for r in records) * 1e3,
        "ttft_ms": statistics.median(r["ttft_s"] for r in records) * 1e3,
        "kv_mb": statistics.median(r["transfer_bytes"] for r in records) / 1e6,
    }


ENGINE_SETUPS = {
    "tp1": (1, "colocated", True),
    "tp2": (2, "colocated", True),
    "tp2-prefill-role": (2, "prefill", True),
    "tp2-prefill-rank-to-rank": (2, "prefill", False),
}


def engine_part(args: argparse.Namespace) -> None:
    results: dict[str, list[dict[str, float]]] = {name: [] for name in ENGINE_SETUPS}
    for round_ in range(1, args.rounds + 1):
        for name in ENGINE_SETUPS if round_ % 2 else list(ENGINE_SETUPS)[::-1]:
            tp, role, mirror = ENGINE_SETUPS[name]
            figures = run(tp, args, role, mirror)
            results[name].append(figures)
            print(
                json.dumps({"round": round_, "setup": name, **{k: round(v, 2) for k, v in figures.items()}})
            )
    median = {
        name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()
    }
    ratios = {k: median["tp2"][k] / median["tp1"][k] for k in median["tp1"]}
    prompts = {name: median[name]["prefill_tok_s"] / median["tp2"]["prefill_tok_s"] for name in median}
    print(json.dumps({"median": median, "tp2_over_tp1": ratios, "prompts_over_colocated_tp2": prompts},
                     default=lambda v: round(v, 3)))  # fmt: skip


def transfer_part(args: argparse.Namespace) -> None:
    results: dict[str, list[dict[str, float]]] = {name: [] for name in PAIRS}
    for round_ in range(1, args.rounds + 1):
        for name in PAIRS if round_ % 2 else list(PAIRS)[::-1]:
            figures = run_split(*PAIRS[name], args)
            results[name].append(figures)
            print(json.dumps({"round": round_, "pair": name, **{k: round(v, 2) for k, v in figures.items()}}))
    median = {
        name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()
    }
    base = median["1-1"]
    over = {pair: {k: v / base[k] for k, v in figures.items() if base[k]} for pair, figures in median.items()}
    print(json.dumps({"median": median, "over_1_1": over}, default=lambda v: round(v, 3)))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=REPO / ".cache" / "bench-llama-156m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--transfer-requests", type=int, default=8)
    parser.add_argument("--transfer-prompt-len", type=int, default=1024)
    parser.add_argument("--kv-backend", choices=["torch", "nixl"], default="torch")
    parser.add_argument("--skip-engine", action="store_true", help="only the transfer part")
    parser.add_argument("--skip-transfer", action="store_true", help="only the engine part")
    parser.add_argument(
        "--device",
        default="cpu",
        help="the engine part's device: cuda puts every rank on the GPU(s), sharing one",
    )
    args = parser.parse_args()
    ensure_model(args.model, seed=0, **LLAMA_156M)
    if not args.skip_engine:
        engine_part(args)
    if not args.skip_transfer:
        transfer_part(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
