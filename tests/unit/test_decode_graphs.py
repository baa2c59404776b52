"""Decode-step graphs (engine/decode_graphs.py) on CPU: buckets, padding rows and static buffers.

The CUDA capture needs a GPU (tests/gpu/test_cuda_engine.py runs it). Here `eager_capture` runs the captured body over
the same static buffers on every replay, so everything around the capture is exercised: which steps replay a graph,
how a batch is padded to its bucket, that padding rows touch no cache slot, and that tokens and logprobs equal the
eager engine's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.decode_graphs import bucket_sizes, eager_capture
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.integration.test_hf_parity import mixed_prompts


@pytest.mark.parametrize(
    ("max_batch", "want"),
    [
        (1, [1]),
        (3, [1, 2, 3]),
        (8, [1, 2, 4, 8]),
        (20, [1, 2, 4, 8, 16, 20]),
        (64, [1, 2, 4, 8, 16, 32, 48, 64]),
    ],
)
def test_bucket_sizes(max_batch: int, want: list[int]) -> None:
    assert bucket_sizes(max_batch) == want


class _CountingCapture:
    """eager_capture that records each bucket captured and how many rows each replay served."""

    def __init__(self) -> None:
        self.captured: list[int] = []
        self.replayed: list[int] = []

    def __call__(self, body: Callable[[], torch.Tensor], pool: object) -> Callable[[], torch.Tensor]:
        replay = eager_capture(body, pool)

        def counted() -> torch.Tensor:
            out = replay()
            self.replayed.append(out.shape[0])
            return out

        self.captured.append(body().shape[0])
        return counted


def _engine(model_dir: Path, max_seqs: int) -> LLMEngine:
    config = EngineConfig(
        dtype="float32", block_size=16, num_kv_blocks=64, max_num_batched_tokens=64, max_num_seqs=max_seqs
    )
    return LLMEngine(model_dir, config)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_graph_replays_give_the_eager_engines_tokens(arch: str, tiny_models: dict[str, Path]) -> None:
    eager = _engine(tiny_models[arch], max_seqs=6)
    prompts = mixed_prompts(eager.tokenizer.vocab_size)[:6]
    # Different lengths finish at different steps, so the decode batch shrinks through sizes that need padding.
    params = [
        SamplingParams(max_tokens=4 + 3 * i, temperature=0.0, ignore_eos=True, logprobs=1) for i in range(6)
    ]
    want = eager.generate(prompts, params)

    graphed = _engine(tiny_models[arch], max_seqs=6)
    capture = _CountingCapture()
    graphed.runner.enable_decode_graphs(6, graphed.max_seq_tokens, capture)
    got = graphed.generate(prompts, params)

    assert capture.captured == [6, 4, 2, 1]  # largest first
    assert capture.replayed, "no decode step replayed a graph"
    assert set(capture.replayed) - {1, 2, 4, 6} == set()
    assert graphed.stats().num_free_blocks == graphed.stats().num_blocks
    for w, g in zip(want, got, strict=True):
        assert g.token_ids == w.token_ids
        for wl, gl in zip(w.logprobs, g.logprobs, strict=True):
            assert gl.logprob == pytest.approx(wl.logprob, abs=1e-4)


def test_padding_rows_write_no_cache_slot(tiny_models: dict[str, Path]) -> None:
    engine = _engine(tiny_models["llama"], max_seqs=8)
    capture = _CountingCapture()
    engine.runner.enable_decode_graphs(8, engine.max_seq_tokens, capture)
    prompts = mixed_prompts(engine.tokenizer.vocab_size)[:3]
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    while not capture.replayed:  # prefill steps run eagerly; stop before the first decode step
        before = [cache.clone() for cache in engine.runner.kv_caches]
        engine.step()
    changed = torch.stack(
        [(b != a).flatten(3).any(-1) for b, a in zip(before, engine.runner.kv_caches, strict=True)]
    )
    # The step decoded 3 sequences in the bucket of 4: each layer's K and V changed in exactly 3 slots.
    assert capture.replayed == [4]
    assert changed.sum(dim=(1, 2, 3)).tolist() == [2 * 3] * len(before)


def test_prompt_chunks_run_eagerly(tiny_models: dict[str, Path]) -> None:
    # 65 tokens at a 64-token budget: a 64-token chunk (eager, with 64 prompt logprobs), then the last prompt token
    # alone, which is a decode-shaped step (its row predicts the output, not a prompt logprob) and replays a graph.
    prompt = mixed_prompts(1000)[-1][:65]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
    want = _engine(tiny_models["llama"], max_seqs=4).generate([prompt], params)
    engine = _engine(tiny_models["llama"], max_seqs=4)
    capture = _CountingCapture()
    engine.runner.enable_decode_graphs(4, engine.max_seq_tokens, capture)
    got = engine.generate([prompt], params)
    assert capture.replayed == [1]
    assert got[0].token_ids == want[0].token_ids
    assert got[0].prompt_logprobs is not None and len(got[0].prompt_logprobs) == 64
    assert got[0].prompt_logprobs == want[0].prompt_logprobs
