"""CUDA path: the Triton kernels compiled for the GPU, and the whole engine in bf16 against transformers.

Skipped without a CUDA device (tests/conftest.py); run them on the GPU machine with `pytest -m gpu tests/gpu`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import kernels
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.kernels import reference
from engine.sampling_params import SamplingParams
from tests.hf_reference import assert_matches_reference, load_reference
from tests.integration.test_hf_parity import mixed_prompts

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_kernels_match_references_on_cuda(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    blocks, bs, kvh, d, heads = 64, 16, 2, 64, 8
    cache = torch.randn(blocks, 2, bs, kvh, d, generator=gen).to(dtype)
    lens = torch.tensor([1, 16, 17, 200, 333], dtype=torch.int32)
    tables = torch.stack([torch.randperm(blocks, generator=gen)[:24] for _ in lens]).to(torch.int32)
    q = torch.randn(len(lens), heads, d, generator=gen).to(dtype)
    want = reference.paged_decode_attention_reference(q, cache, tables, lens, d**-0.5, None)
    got = kernels.paged_decode_attention(q.cuda(), cache.cuda(), tables.cuda(), lens.cuda(), d**-0.5, None)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.cpu().float(), want.float(), atol=tol, rtol=tol)

    ids = torch.tensor([5, 0, 63, 7], dtype=torch.int32)
    gathered = kernels.gather_blocks(cache.cuda(), ids.cuda())
    assert torch.equal(gathered.cpu(), reference.gather_blocks_reference(cache, ids))
    target = torch.zeros_like(cache).cuda()
    kernels.scatter_blocks(gathered, target, ids.cuda())
    assert torch.equal(target.cpu()[ids.long()], cache[ids.long()])


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_engine_on_cuda_matches_transformers(arch: str, tiny_models: dict[str, Path]) -> None:
    engine = LLMEngine(
        tiny_models[arch],
        EngineConfig(device="cuda", dtype="float32", num_kv_blocks=48, max_num_batched_tokens=64),
    )
    completions = engine.generate(
        mixed_prompts(engine.tokenizer.vocab_size),
        SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True),
    )
    assert engine.stats().num_free_blocks == engine.stats().num_blocks
    # The GPU reference runs TF32-free fp32 on CPU; GPU matmuls may use TF32, hence the wider near-tie margin.
    assert_matches_reference(
        load_reference(tiny_models[arch]), completions, margin_tol=5e-2, logprob_tol=5e-2
    )


def test_decode_graphs_match_eager_decoding_on_cuda(tiny_models: dict[str, Path]) -> None:
    """Decode steps replayed as CUDA graphs (the default on GPUs) give the eager engine's tokens."""
    prompts = mixed_prompts(1000)[:6]
    # Different lengths, so the decode batch shrinks through bucket sizes that need padding rows.
    params = [
        SamplingParams(max_tokens=6 + 5 * i, temperature=0.0, ignore_eos=True, logprobs=1) for i in range(6)
    ]
    completions = {}
    for graphs in (False, True):
        config = EngineConfig(
            device="cuda", dtype="bfloat16", num_kv_blocks=64, max_num_seqs=6, cuda_graphs=graphs
        )
        engine = LLMEngine(tiny_models["llama"], config)
        assert (engine.runner.decode_graphs is not None) == graphs
        completions[graphs] = engine.generate(prompts, params)
        assert engine.stats().num_free_blocks == engine.stats().num_blocks
    for eager, graphed in zip(completions[False], completions[True], strict=True):
        assert graphed.token_ids == eager.token_ids
        for e, g in zip(eager.logprobs, graphed.logprobs, strict=True):
            assert abs(g.logprob - e.logprob) < 2e-2


def test_tensor_parallel_2_on_cuda_equals_tp1(tiny_models: dict[str, Path]) -> None:
    """Both ranks on the GPU(s) (sharing one when there is one), collectives staged through host memory."""
    model = tiny_models["qwen3"]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    settings = dict(device="cuda", dtype="float32", num_kv_blocks=128)
    one = LLMEngine(model, EngineConfig(**settings))  # type: ignore[arg-type]
    prompts = mixed_prompts(one.tokenizer.vocab_size)[:4]
    want = [c.token_ids for c in one.generate(prompts, params)]
    two = LLMEngine(model, EngineConfig(**settings, tensor_parallel=2))  # type: ignore[arg-type]
    try:
        assert [c.token_ids for c in two.generate(prompts, params)] == want
    finally:
        two.close()
