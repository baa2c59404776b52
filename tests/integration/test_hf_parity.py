"""The engine's greedy outputs equal Hugging Face transformers' on the same checkpoints, under memory pressure."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.conftest import MODEL_VARIANTS
from tests.hf_reference import assert_matches_reference, load_reference

PROMPT_LENGTHS = (1, 5, 17, 48, 100, 160, 233, 300)
MAX_TOKENS = 64


def mixed_prompts(vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in PROMPT_LENGTHS]


def pressured_engine(model_dir: Path, dtype: str = "float32") -> LLMEngine:
    """A pool far smaller than 8 x 364 tokens (forces preemption) and a budget below the longest prompt (chunking)."""
    config = EngineConfig(
        dtype=dtype, block_size=16, num_kv_blocks=48, max_num_batched_tokens=64, max_num_seqs=8
    )
    return LLMEngine(model_dir, config)


@pytest.mark.parametrize("arch", MODEL_VARIANTS)
def test_greedy_matches_transformers_under_preemption_and_chunking(
    arch: str, tiny_models: dict[str, Path]
) -> None:
    engine = pressured_engine(tiny_models[arch])
    prompts = mixed_prompts(engine.tokenizer.vocab_size)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=2)
    completions = engine.generate(prompts, params)

    stats = engine.stats()
    assert stats.num_preemptions > 0, "the pool was meant to be small enough to force preemption"
    assert all(len(c.token_ids) == MAX_TOKENS for c in completions)
    assert stats.num_free_blocks == stats.num_blocks, "blocks leaked"
    report = assert_matches_reference(load_reference(tiny_models[arch]), completions)
    assert report.tokens_compared == MAX_TOKENS * len(PROMPT_LENGTHS)
    assert report.near_ties_skipped < report.tokens_compared // 20


def test_bfloat16_matches_transformers_bfloat16(llama_dir: Path) -> None:
    engine = pressured_engine(llama_dir, dtype="bfloat16")
    prompts = mixed_prompts(engine.tokenizer.vocab_size, seed=1)[:4]
    completions = engine.generate(
        prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=0)
    )
    reference = load_reference(llama_dir, dtype=torch.bfloat16)
    # bf16 keeps ~3 significant digits: on logits of magnitude ~10, equally valid op orders differ by ~0.1.
    assert_matches_reference(reference, completions, margin_tol=0.25, logprob_tol=0.3)


@pytest.mark.parametrize(
    ("arch", "shard"),
    [("llama", False), ("qwen3", True), ("qwen2", False), ("mistral", True)],
)
def test_checkpoint_saved_by_transformers_loads_and_matches(
    arch: str, shard: bool, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    import transformers

    config_cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "mistral": transformers.MistralConfig,
    }[arch]
    source = tiny_models[arch]
    vocab = json.loads((source / "config.json").read_text())["vocab_size"]
    config = config_cls(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=arch in ("qwen2", "qwen3"),
        **({"head_dim": 16} if arch == "qwen3" else {}),  # Qwen3 sets head_dim apart from hidden/heads
    )
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():  # HF's 0.02 init gives near-uniform logits; widen it for clear margins
            p.mul_(8.0) if p.dim() > 1 else p.add_(0.1 * torch.randn_like(p))
    out = tmp_path / arch
    model.save_pretrained(out, max_shard_size="100KB" if shard else "5GB")
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ):
        if (source / name).exists() and not (out / name).exists():
            shutil.copy(source / name, out / name)
    assert (out / "model.safetensors.index.json").exists() == shard

    engine = LLMEngine(out, EngineConfig(num_kv_blocks=64, max_num_batched_tokens=128))
    prompts = mixed_prompts(engine.tokenizer.vocab_size, seed=2)[:5]
    completions = engine.generate(
        prompts, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=0)
    )
    assert_matches_reference(model.eval(), completions)
