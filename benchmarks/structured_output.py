"""Structured-output overhead: output tokens/s of one engine on the same workload with and without a json_schema
constraint (grammar-constrained sampling with xgrammar), runs alternating, in the same process.

The same workload means the same tokens: a first constrained run (which also compiles the schema once: its compile
time is printed, then served from the cache) fixes each request's output length; the measured runs then generate
exactly those lengths, constrained (with ignore_eos, so a request whose grammar ends early keeps being masked to
EOS) and unconstrained (ignore_eos and max_tokens = that length). Both sample at temperature 1 with the same seeds,
all requests at once (continuous batching), prompt processing included in the wall time.

    python benchmarks/structured_output.py [--dtype bfloat16] [--requests 32] [--repeats 3] [--device cpu]

Prints one JSON line per run and the median ratio (constrained / free tokens/s; the issue's target is > 0.9).
Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_model, beside this script
from bench_model import LLAMA_156M, ensure_model  # noqa: E402

# Bounded, so a random model closes it; large enough that a request spends most of its tokens inside the grammar.
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 99999},
        "name": {"type": "string", "maxLength": 24},
        "kind": {"enum": ["person", "company", "place"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 6},
        "scores": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 100},
            "maxItems": 8,
        },
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string", "maxLength": 24},
                "city": {"type": "string", "maxLength": 16},
            },
            "required": ["street", "city"],
            "additionalProperties": False,
        },
    },
    "required": ["id", "name", "kind", "tags", "scores", "address"],
    "additionalProperties": False,
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=REPO / ".cache" / "bench-llama-156m")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=256, help="cap on a constrained output (rarely reached)")
    p.add_argument("--repeats", type=int, default=3, help="measured (free, constrained) pairs")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> int:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO))
    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.sampling_params import SamplingParams
    from engine.structured_spec import StructuredKind, StructuredOutput

    ensure_model(args.model, seed=args.seed, dtype=args.dtype, max_position_embeddings=2048, **LLAMA_156M)
    engine = LLMEngine(
        args.model,
        EngineConfig(
            dtype=args.dtype, device=args.device, max_num_seqs=args.requests, max_num_batched_tokens=2048
        ),
    )
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(3, 1000) for _ in range(args.prompt_tokens)] for _ in range(args.requests)]
    spec = StructuredOutput(StructuredKind.JSON_SCHEMA, text=json.dumps(SCHEMA))
    started = time.perf_counter()
    engine.intake.grammars.compile(spec)
    print(json.dumps({"schema_compile_seconds": round(time.perf_counter() - started, 3)}))

    def constrained(max_tokens: int, seed: int, ignore_eos: bool) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0, seed=seed, structured=spec, ignore_eos=ignore_eos
        )

    first = engine.generate(prompts, [constrained(args.max_tokens, i, False) for i in range(len(prompts))])
    lengths = [len(c.token_ids) for c in first]
    parsed = sum(1 for c in first if _is_json(c.text))
    print(json.dumps({"workload": {
        "requests": len(prompts), "prompt_tokens": len(prompts) * args.prompt_tokens, "output_tokens": sum(lengths),
        "outputs_that_parse": parsed, "dtype": args.dtype, "threads": args.threads, "device": args.device,
    }}))  # fmt: skip
    runs = {
        "free": [
            SamplingParams(max_tokens=n, temperature=1.0, seed=i, ignore_eos=True)
            for i, n in enumerate(lengths)
        ],
        "json_schema": [constrained(n, i, True) for i, n in enumerate(lengths)],
    }
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(args.repeats):
        for name, params in runs.items():
            start = time.perf_counter()
            completions = engine.generate(prompts, params)
            seconds = time.perf_counter() - start
            tokens = sum(len(c.token_ids) for c in completions)
            rates[name].append(tokens / seconds)
            print(json.dumps({"run": repeat, "system": name, "output_tokens": tokens, "seconds": round(seconds, 3),
                              "tokens_per_s": round(tokens / seconds, 1)}))  # fmt: skip
    ratios = [c / f for c, f in zip(rates["json_schema"], rates["free"], strict=True)]
    print(json.dumps({
        "median_tokens_per_s": {name: round(statistics.median(r), 1) for name, r in rates.items()},
        "ratio_json_schema_over_free": round(statistics.median(ratios), 3),
    }))  # fmt: skip
    return 0


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
