"""The C++ attention kernels against the torch paths they replace, on CPU, in bf16.

Prefill: every prompt chunk of a step in one call of the C++ kernel (engine/kernels/csrc/paged_prefill_cpu.cpp)
against torch's scaled_dot_product_attention per chunk (what engine/models/attention.py runs without the kernel).
Decode: the C++ paged decode kernel against the torch-ops fallback (engine/kernels/cpu.py). Runs alternate, the
median of --rounds is reported, with GFLOP/s (prefill: the causal product count) and GB/s of K/V read (decode).

    python benchmarks/cpu_attention.py [--threads 2] [--rounds 5]

Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when run from a checkout

import torch

from engine import kernels
from engine.kernels import cpu
from engine.models.attention import AttentionBatch, PrefillChunk, paged_attention

BLOCK_SIZE = 16
HEADS, KV_HEADS, HEAD_DIM = 16, 4, 64  # the 156M Llama of the engine benchmarks
PREFILL_SHAPES = {  # name: chunks as (query rows, context length)
    "one 512-token prompt": [(512, 512)],
    "four 256-token prompts": [(256, 256)] * 4,
    "256 rows after a 768-token cached prefix": [(256, 1024)],
    "eight 128-token prompts": [(128, 128)] * 8,
}
DECODE_SHAPES = {"24 sequences x 800": [800] * 24, "8 sequences x 2000": [2000] * 8, "1 x 500": [500]}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=5, help="calls per timed round")
    return p.parse_args()


def paged_cache(lengths: list[int], gen: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A bf16 cache whose sequences own shuffled blocks; returns it and each sequence's block table."""
    counts = [math.ceil(n / BLOCK_SIZE) for n in lengths]
    owners = torch.randperm(sum(counts), generator=gen)
    kv = torch.randn(sum(counts), 2, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=gen).bfloat16()
    tables, used = [], 0
    for count in counts:
        tables.append(owners[used : used + count])
        used += count
    return kv, tables


def prefill_pair(chunks: list[tuple[int, int]]) -> tuple[Callable[[], object], Callable[[], object], float]:
    gen = torch.Generator().manual_seed(0)
    kv, tables = paged_cache([ctx for _, ctx in chunks], gen)
    rows = sum(n for n, _ in chunks)
    q = torch.randn(rows, HEADS, HEAD_DIM, generator=gen).bfloat16()
    k = torch.randn(rows, KV_HEADS, HEAD_DIM, generator=gen).bfloat16()
    prefills, first = [], 0
    for (n, ctx), table in zip(chunks, tables, strict=True):
        prefills.append(PrefillChunk(first, n, ctx, table))
        first += n
    batch = AttentionBatch(
        slot_mapping=torch.empty(0, dtype=torch.long),
        num_decode_tokens=0,
        decode_block_tables=torch.empty(0, 0, dtype=torch.int32),
        decode_seq_lens=torch.empty(0, dtype=torch.int32),
        prefills=prefills,
        block_size=BLOCK_SIZE,
        sliding_window=None,
    )
    scale = HEAD_DIM**-0.5
    real = kernels.prefill_attention_supported

    def with_kernel() -> object:
        return paged_attention(q, k, k, kv, batch, scale)

    def with_sdpa() -> object:
        kernels.prefill_attention_supported = lambda query, kv_layer: False
        try:
            return paged_attention(q, k, k, kv, batch, scale)
        finally:
            kernels.prefill_attention_supported = real

    # Causal products: each query row sees its cached prefix and the chunk rows up to itself; QK and PV.
    flops = sum(4 * HEADS * HEAD_DIM * (n * (ctx - n) + n * (n + 1) / 2) for n, ctx in chunks)
    return with_kernel, with_sdpa, flops


def decode_pair(lengths: list[int]) -> tuple[Callable[[], object], Callable[[], object], float]:
    gen = torch.Generator().manual_seed(0)
    kv, tables = paged_cache(lengths, gen)
    width = max(len(t) for t in tables)
    table = torch.zeros(len(lengths), width, dtype=torch.int32)
    for row, t in zip(table, tables, strict=True):
        row[: len(t)] = t
    q = torch.randn(len(lengths), HEADS, HEAD_DIM, generator=gen).bfloat16()
    lens = torch.tensor(lengths, dtype=torch.int32)
    scale = HEAD_DIM**-0.5
    kv_bytes = sum(lengths) * 2 * KV_HEADS * HEAD_DIM * 2
    return (
        lambda: cpu.paged_decode_attention(q, kv, table, lens, scale),
        lambda: cpu.torch_paged_decode_attention(q, kv, table, lens, scale),
        kv_bytes,
    )


def median_seconds(fns: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up (and the kernel build, on first use)
    for _ in range(rounds):
        for name, fn in fns.items():  # alternating, so drifts in machine load hit both alike
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    probe = torch.zeros(1, HEADS, HEAD_DIM, dtype=torch.bfloat16)
    if not kernels.prefill_attention_supported(
        probe, torch.zeros(1, 2, BLOCK_SIZE, KV_HEADS, HEAD_DIM).bfloat16()
    ):
        sys.exit("cpu_attention: the C++ kernels are not available here (no AVX-512 BF16 or no compiler)")
    cases = [("prefill", name, prefill_pair(chunks), "torch_sdpa") for name, chunks in PREFILL_SHAPES.items()]
    cases += [("decode", name, decode_pair(lengths), "torch_ops") for name, lengths in DECODE_SHAPES.items()]
    for phase, name, (kernel, baseline, work), baseline_name in cases:
        t = median_seconds({"kernel": kernel, "torch": baseline}, args.rounds, args.calls)
        # prefill: work is FLOPs, so a rate in GFLOP/s; decode: bytes of K/V read, so GB/s
        rate = "kernel_gflops" if phase == "prefill" else "kernel_kv_gb_per_s"
        result = {
            "phase": phase,
            "shape": name,
            "kernel_ms": round(t["kernel"] * 1e3, 3),
            f"{baseline_name}_ms": round(t["torch"] * 1e3, 3),
            "speedup": round(t["torch"] / t["kernel"], 2),
            rate: round(work / t["kernel"] / 1e9, 1),
        }
        print(json.dumps(result), flush=True)
    print(json.dumps({"threads": args.threads, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM}))


if __name__ == "__main__":
    main()
