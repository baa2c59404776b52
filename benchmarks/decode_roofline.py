"""Batch-1 decode time per token against the memory roofline, on CPU or GPU.

One request decodes alone, so every step streams all the weights (and the request's KV so far) from memory once: the
roofline is bytes per step over the memory bandwidth, which this script measures on the same device (a large copy,
read + write counted). Prints per-token time, the roofline time and their ratio (1.0 is the roofline).

    python benchmarks/decode_roofline.py [--device cuda] [--shape 1b] [--tokens 256]

Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_model, beside this script
from bench_model import CACHE, SHAPES, ensure_model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--shape", choices=sorted(SHAPES), default="156m")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--tokens", type=int, default=128, help="tokens decoded (timed)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="afterwards, decode STEPS more tokens under torch.profiler and print its busiest operations to stderr "
        "(where a step's time goes: host work or device kernels)",
    )
    return p.parse_args()


def memory_bandwidth(device: str) -> float:
    """Bytes per second of a large device-to-device copy (read and write both counted), best of 5."""
    import torch

    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)  # 256 MiB, beyond any cache
    dst = torch.empty_like(src)
    best = 0.0
    for _ in range(6):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = max(best, 2 * src.numel() / (time.perf_counter() - start))
    return best


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def main() -> int:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(CACHE.parent))
    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.sampling_params import SamplingParams

    model_dir = ensure_model(
        CACHE / f"bench-llama-{args.shape}",
        seed=0,
        dtype=args.dtype,
        max_position_embeddings=2048,
        **SHAPES[args.shape],
    )
    engine = LLMEngine(model_dir, EngineConfig(dtype=args.dtype, device=args.device, max_num_seqs=1))
    prompt = list(range(3, 3 + args.prompt))
    engine.generate([prompt[:8]], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
    engine.add_request(
        "timed", prompt, SamplingParams(max_tokens=args.tokens + 1, temperature=0.0, ignore_eos=True)
    )
    engine.step()  # the prefill (and first token) is not timed
    _sync(args.device)
    start = time.perf_counter()
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    _sync(args.device)
    per_token = (time.perf_counter() - start) / steps

    model = engine.model
    weights = weight_bytes(model)
    cfg = model.config
    element = torch.empty((), dtype=model.dtype).element_size()
    kv_per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * element
    mean_context = args.prompt + args.tokens / 2
    step_bytes = weights + kv_per_token * mean_context
    bandwidth = memory_bandwidth(args.device)
    roofline = step_bytes / bandwidth
    print(json.dumps({
        "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
        "shape": args.shape, "dtype": args.dtype, "threads": args.threads,
        "cuda_graphs": engine.runner.decode_graphs is not None,
        "weight_bytes": weights, "step_bytes": step_bytes, "bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "ms_per_token": round(per_token * 1e3, 3), "roofline_ms_per_token": round(roofline * 1e3, 3),
        "share_of_roofline": round(roofline / per_token, 3),
    }))  # fmt: skip
    if args.profile:
        profile_decode(engine, prompt, args.profile, args.device)
    return 0


def profile_decode(engine: object, prompt: list[int], steps: int, device: str) -> None:
    """Decode `steps` tokens at batch 1 under torch.profiler; its table, by self CPU time, goes to stderr."""
    from torch.profiler import ProfilerActivity, profile

    from engine.sampling_params import SamplingParams

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    engine.add_request("profiled", prompt, params)  # type: ignore[attr-defined]
    engine.step()  # type: ignore[attr-defined]  # the prefill, left out
    with profile(activities=activities) as profiler:
        while engine.has_unfinished():  # type: ignore[attr-defined]
            engine.step()  # type: ignore[attr-defined]
        _sync(device)
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=30), file=sys.stderr)


def weight_bytes(model: object) -> int:
    """Bytes of every weight a decode step reads: the layers, the final norm and the LM head (of the embedding, one
    row: left out)."""
    import torch

    from engine.models.linear import Linear

    def size(value: object) -> int:
        if isinstance(value, Linear):
            return value.nbytes
        return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0

    layers = model.layers  # type: ignore[attr-defined]
    total = sum(size(getattr(layer, f.name)) for layer in layers for f in dataclasses.fields(layer))
    return total + size(model.final_norm) + size(model.lm_head)  # type: ignore[attr-defined]


if __name__ == "__main__":
    raise SystemExit(main())
