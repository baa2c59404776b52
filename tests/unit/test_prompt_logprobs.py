"""Prompt logprobs and logit_bias in the engine, against Hugging Face transformers' teacher-forced log-softmax.

Tolerance: 1e-4 absolute on logprobs in fp32 (the engine's paged attention and HF's eager attention sum in different
orders; the parity tests use the same bound for output logprobs).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from engine.sequence import TokenLogprob
from tests.hf_reference import load_reference

TOLERANCE = 1e-4
TOP_K = 5
BUDGET = 32  # max_num_batched_tokens: a 100-token prompt takes 4 steps


@pytest.fixture(scope="module")
def reference(llama_dir: Path):
    return load_reference(llama_dir)


def make_engine(model_dir: Path, **overrides: object) -> LLMEngine:
    config = dict(dtype="float32", block_size=16, num_kv_blocks=64, max_num_batched_tokens=BUDGET)
    config.update(overrides)
    return LLMEngine(model_dir, EngineConfig(**config))  # type: ignore[arg-type]


def random_prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1000) for _ in range(length)]


@torch.inference_mode()
def hf_prompt_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """Row i: HF's log-softmax at prompt position i, which predicts prompt token i + 1. Shape [len - 1, vocab]."""
    logits = model(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits[:-1], dim=-1)


def assert_equal_to_hf(entries: list[TokenLogprob], prompt: list[int], ref: torch.Tensor, top_k: int) -> None:
    assert [e.token_id for e in entries] == prompt[1:]
    chosen = torch.tensor([e.logprob for e in entries])
    expected = ref.gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)
    assert torch.allclose(chosen, expected, atol=TOLERANCE, rtol=0), (chosen - expected).abs().max()
    values, ids = ref.topk(top_k, dim=-1)
    for i, entry in enumerate(entries):
        assert [t for t, _ in entry.top] == ids[i].tolist(), f"position {i}: top-{top_k} ids differ from HF's"
        top_values = [v for _, v in entry.top]
        assert top_values == sorted(top_values, reverse=True)
        assert torch.allclose(torch.tensor(top_values), values[i], atol=TOLERANCE, rtol=0)


def test_prompt_logprobs_equal_hf_short_and_chunked_in_one_batch(llama_dir: Path, reference) -> None:
    engine = make_engine(llama_dir)
    prompts = [random_prompt(n, seed=n) for n in (2, 9, 100)]  # 100 > BUDGET: computed over several steps
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, prompt_logprobs=TOP_K)
    completions = engine.generate(prompts, params)
    for prompt, completion in zip(prompts, completions, strict=True):
        assert completion.prompt_logprobs is not None
        assert len(completion.prompt_logprobs) == len(prompt) - 1
        assert_equal_to_hf(completion.prompt_logprobs, prompt, hf_prompt_logprobs(reference, prompt), TOP_K)


def test_prompt_logprobs_come_on_the_first_output_only(llama_dir: Path) -> None:
    engine = make_engine(llama_dir)
    prompt = random_prompt(70, seed=3)
    engine.add_request(
        "r", prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    )
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert [len(o.new_token_ids) for o in outputs] == [1, 1, 1, 1]
    assert outputs[0].prompt_logprobs is not None and len(outputs[0].prompt_logprobs) == 69
    assert all(e.top == [] for e in outputs[0].prompt_logprobs)  # 0 alternatives asked for
    assert all(o.prompt_logprobs is None for o in outputs[1:])


def test_a_request_asking_for_prompt_logprobs_does_not_reuse_the_prefix_cache(
    llama_dir: Path, reference
) -> None:
    engine = make_engine(llama_dir)
    prompt = random_prompt(80, seed=4)
    plain = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    first = engine.generate([prompt], plain)[0]
    assert first.num_cached_prompt_tokens == 0
    again = engine.generate([prompt], plain)[0]
    assert again.num_cached_prompt_tokens == 64, "the first request was meant to populate the prefix cache"
    asked = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=TOP_K)
    scored = engine.generate([prompt], asked)[0]
    assert scored.num_cached_prompt_tokens == 0
    assert scored.prompt_logprobs is not None
    assert_equal_to_hf(scored.prompt_logprobs, prompt, hf_prompt_logprobs(reference, prompt), TOP_K)
    assert scored.token_ids == first.token_ids
    # It still populated the cache for others: a plain request after it hits.
    assert engine.generate([prompt], plain)[0].num_cached_prompt_tokens == 64
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_blocks


def test_prompt_logprobs_survive_preemption_without_duplicates(llama_dir: Path, reference) -> None:
    # 12 blocks of 16 tokens for three 60-token prompts growing by 40 tokens each: some get preempted and recompute.
    engine = make_engine(llama_dir, num_kv_blocks=12, max_num_batched_tokens=64)
    prompts = [random_prompt(60, seed=10 + i) for i in range(3)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, prompt_logprobs=2)
    completions = engine.generate(prompts, params)
    assert engine.stats().num_preemptions > 0, "the pool was meant to be small enough to force preemption"
    for prompt, completion in zip(prompts, completions, strict=True):
        assert completion.prompt_logprobs is not None
        assert_equal_to_hf(completion.prompt_logprobs, prompt, hf_prompt_logprobs(reference, prompt), 2)


def test_logit_bias_forces_the_greedy_token_and_logprobs_stay_raw(llama_dir: Path, reference) -> None:
    engine = make_engine(llama_dir)
    prompt = random_prompt(12, seed=5)
    ref = hf_prompt_logprobs(reference, [*prompt, 0])[-1]  # the distribution after the whole prompt
    unlikely = int(ref.argmin())
    params = SamplingParams(
        max_tokens=1, temperature=0.0, ignore_eos=True, logprobs=1, logit_bias={unlikely: 100.0}
    )
    completion = engine.generate([prompt], params)[0]
    assert completion.token_ids == [unlikely]
    assert abs(completion.logprobs[0].logprob - float(ref[unlikely])) < TOLERANCE  # raw, not biased
    assert completion.logprobs[0].top[0][0] == int(ref.argmax())
    # -100 on the unbiased greedy choice bans it.
    banned = int(ref.argmax())
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, logit_bias={banned: -100.0})
    assert engine.generate([prompt], params)[0].token_ids != [banned]


def test_logit_bias_applies_to_sampled_draws(llama_dir: Path) -> None:
    engine = make_engine(llama_dir)
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=3, ignore_eos=True, logit_bias={42: 100.0})
    assert engine.generate([random_prompt(5, seed=6)], params)[0].token_ids == [42] * 8


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"prompt_logprobs": 21}, "prompt_logprobs must be <= 20"),
        ({"prompt_logprobs": -1}, "prompt_logprobs must be >= 0"),
        ({"prompt_logprobs": True}, "prompt_logprobs must be an integer"),
        ({"logit_bias": {5: 100.5}}, "logit_bias[5] must be in [-100, 100], got 100.5"),
        ({"logit_bias": {5: float("nan")}}, "logit_bias[5] must not be NaN"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias token id must be an integer"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias token id must be >= 0"),
        ({"logit_bias": dict.fromkeys(range(301), 1.0)}, "logit_bias: at most 300 entries, got 301"),
        ({"logit_bias": [1, 2]}, "logit_bias must be a mapping"),
    ],
)
def test_bad_values_are_refused_naming_the_field(kwargs: dict, fragment: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)
    assert fragment in str(err.value)


def test_limits_are_accepted() -> None:
    SamplingParams(prompt_logprobs=20, logit_bias=dict.fromkeys(range(300), -100.0))


def test_logit_bias_outside_the_vocabulary_is_refused_and_queues_nothing(llama_dir: Path) -> None:
    engine = make_engine(llama_dir)
    vocab = engine.model_config.vocab_size
    with pytest.raises(InvalidRequestError, match=rf"logit_bias: token id {vocab} is outside the vocabulary"):
        engine.add_request("r", [5, 6], SamplingParams(logit_bias={vocab: 1.0}))
    assert not engine.has_unfinished()
