"""Output tokens/s of splitserve's engine vs Hugging Face transformers `generate`, same model, same machine, same run.

64 requests take their prompt and output lengths from the Azure conversation trace (scaled to the model's context).
splitserve gets all of them at once (continuous batching). transformers gets them the way a user batches `generate`:
fixed-size batches, left-padded, each batch running to its longest requested output. Both count only the tokens each
request asked for, and both include prompt processing in the wall time.

    python benchmarks/engine_throughput.py [--dtype bfloat16] [--requests 64] [--hf-batch 16]

Prints one JSON line per system and the ratio. Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_model, beside this script
from bench_model import SHAPES, ensure_model  # noqa: E402

TRACE = REPO.parent / "shared" / "data" / "azure-llm-inference-2023" / "conv.csv"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="default: .cache/bench-llama-SHAPE, made once")
    p.add_argument(
        "--shape", choices=sorted(SHAPES), default="156m", help="the random model's size (1b: GPU)"
    )
    p.add_argument("--trace", type=Path, default=TRACE)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument(
        "--scale", type=float, default=0.25, help="multiply trace lengths by this (model context is 2048)"
    )
    p.add_argument("--hf-batch", type=int, default=16, help="batch size a transformers user would pick")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--budget", type=int, default=1024, help="splitserve per-step token budget")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (both systems run there)")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def trace_lengths(path: Path, n: int, scale: float, max_len: int, seed: int) -> list[tuple[int, int]]:
    """(prompt, output) pairs: n random rows of the trace, scaled, clipped so prompt + output fits max_len."""
    with path.open() as f:
        rows = [(int(r["ContextTokens"]), int(r["GeneratedTokens"])) for r in csv.DictReader(f)]
    picked = random.Random(seed).sample(rows, n)
    out = []
    for ctx, gen in picked:
        gen_s = max(1, round(gen * scale))
        ctx_s = max(1, min(round(ctx * scale), max_len - gen_s))
        out.append((ctx_s, gen_s))
    return out


def make_prompts(lengths: list[tuple[int, int]], vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(p)] for p, _ in lengths]


def run_splitserve(model_dir: Path, prompts, lengths, dtype: str, budget: int, device: str) -> dict:
    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.sampling_params import SamplingParams

    engine = LLMEngine(
        model_dir, EngineConfig(dtype=dtype, max_num_batched_tokens=budget, max_num_seqs=len(prompts))
    )
    params = [SamplingParams(max_tokens=g, temperature=0.0, ignore_eos=True) for _, g in lengths]
    engine.generate([prompts[0][:8]], SamplingParams(max_tokens=2, temperature=0.0))  # warm-up
    start = time.perf_counter()
    completions = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for c in completions)
    return {
        "system": "splitserve",
        "output_tokens": tokens,
        "seconds": elapsed,
        "tokens_per_s": tokens / elapsed,
    }


def run_transformers(model_dir: Path, prompts, lengths, dtype: str, batch: int, device: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    pad = 0
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(prompts), batch):
        group = prompts[i : i + batch]
        wanted = [g for _, g in lengths[i : i + batch]]
        width = max(len(p) for p in group)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in group], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=device)
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max(wanted),
                min_new_tokens=max(wanted),
                do_sample=False,
                pad_token_id=pad,
            )
        tokens += sum(wanted)
    elapsed = time.perf_counter() - start
    return {
        "system": "transformers",
        "output_tokens": tokens,
        "seconds": elapsed,
        "tokens_per_s": tokens / elapsed,
    }


def main() -> int:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO))

    args.model = args.model or REPO / ".cache" / f"bench-llama-{args.shape}"
    ensure_model(
        args.model, seed=args.seed, dtype=args.dtype, max_position_embeddings=2048, **SHAPES[args.shape]
    )
    lengths = trace_lengths(args.trace, args.requests, args.scale, 2048, args.seed)
    prompts = make_prompts(lengths, 1000, args.seed)
    info = {
        "requests": len(prompts),
        "prompt_tokens": sum(p for p, _ in lengths),
        "output_tokens": sum(g for _, g in lengths),
        "dtype": args.dtype,
        "threads": args.threads,
        "device": args.device,
    }
    print(json.dumps({"workload": info}))
    ours = run_splitserve(args.model, prompts, lengths, args.dtype, args.budget, args.device)
    print(json.dumps(ours))
    if args.skip_hf:
        return 0
    theirs = run_transformers(args.model, prompts, lengths, args.dtype, args.hf_batch, args.device)
    print(json.dumps(theirs))
    print(json.dumps({"ratio_splitserve_over_transformers": ours["tokens_per_s"] / theirs["tokens_per_s"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
