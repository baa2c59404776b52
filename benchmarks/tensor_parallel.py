"""Tensor parallel 1 vs 2 (engine/tensor_parallel/): prompt and decode step times of one engine, same cores.

TP 1 runs one process with `--threads` threads; TP 2 runs two processes with `--threads / 2` each, so both use the
same cores. Per round and setup (alternating, fresh engine each): a batch of prompts computed (prefill tokens/s),
then decode steps at that batch (ms per step), greedy, bfloat16 by default on the 156M Llama of the engine
benchmarks. Prints each round as a JSON line, then medians and TP 2 over TP 1.

    python benchmarks/tensor_parallel.py [--rounds 3] [--batch 8] [--prompt-len 256] [--decode-steps 32]

On a 2-core CPU expect no speed-up: both ranks share the memory bandwidth that bounds decoding, and every layer adds
two all-reduces through loopback gloo. The figure shows what the split costs where it cannot pay; on GPUs (one per
rank, benchmarks/gpu_suite.sh) it is what lets a model too large for one device run at all. The KV transfer between
different TP degrees (issue 17, item 2) is not built yet, so its re-sharding cost is not measured here.
Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_model, beside this script
from bench_model import LLAMA_156M, ensure_model  # noqa: E402

sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from engine.config import EngineConfig  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402


def run(tp: int, args: argparse.Namespace) -> dict[str, float]:
    torch.set_num_threads(max(1, args.threads // tp))
    config = EngineConfig(dtype=args.dtype, num_kv_blocks=1024, max_num_batched_tokens=args.batch * args.prompt_len,
                          max_num_seqs=args.batch, tensor_parallel=tp)  # fmt: skip
    engine = LLMEngine(args.model, config)
    try:
        rng = random.Random(0)
        prompts = [[rng.randrange(3, 30000) for _ in range(args.prompt_len)] for _ in range(args.batch)]
        params = SamplingParams(max_tokens=args.decode_steps + 1, temperature=0.0, ignore_eos=True)
        engine.generate([prompts[0][:32]], SamplingParams(max_tokens=2))  # warm-up: first-call costs
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, params)
        started = time.perf_counter()
        engine.step()  # every prompt in one step (the budget fits the batch)
        prefill_s = time.perf_counter() - started
        steps = 0
        started = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
            steps += 1
        decode_s = time.perf_counter() - started
    finally:
        engine.close()
    return {
        "prefill_tok_s": args.batch * args.prompt_len / prefill_s,
        "decode_step_ms": decode_s / max(steps, 1) * 1e3,
    }


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
    args = parser.parse_args()
    ensure_model(args.model, seed=0, **LLAMA_156M)
    results: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    for round_ in range(1, args.rounds + 1):
        for tp in (1, 2) if round_ % 2 else (2, 1):
            figures = run(tp, args)
            results[tp].append(figures)
            print(json.dumps({"round": round_, "tp": tp, **{k: round(v, 2) for k, v in figures.items()}}))
    median = {tp: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for tp, runs in results.items()}
    ratios = {k: median[2][k] / median[1][k] for k in median[1]}
    print(json.dumps({"median": median, "tp2_over_tp1": ratios}, default=lambda v: round(v, 3)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
