"""What a user of the engine sees: prefix caching, sampling, stop strings, streaming text, bad input, no leaks."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason
from tests.hf_reference import load_reference, reference_logprobs

GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(llama_dir: Path) -> LLMEngine:
    return LLMEngine(llama_dir, EngineConfig(num_kv_blocks=128, max_num_batched_tokens=128))


def random_ids(n: int, seed: int, vocab: int = 1000) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def assert_pool_free(engine: LLMEngine) -> None:
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_blocks and not engine.has_unfinished()


def test_shared_prefix_reuses_cached_blocks_and_gives_the_same_output(
    llama_dir: Path, engine: LLMEngine
) -> None:
    prefix = random_ids(200, seed=1)
    first, second = [*prefix, 11, 12], [*prefix, 13, 14, 15]
    engine.generate([first], GREEDY)
    hits_before = engine.stats().prefix_cache.hit_blocks
    [cached] = engine.generate([second], GREEDY)
    assert engine.stats().prefix_cache.hit_blocks - hits_before == 200 // 16
    assert cached.num_cached_prompt_tokens == 192
    fresh = LLMEngine(llama_dir, EngineConfig(num_kv_blocks=128, enable_prefix_caching=False))
    [uncached] = fresh.generate([second], GREEDY)
    assert cached.token_ids == uncached.token_ids
    assert_pool_free(engine)


def test_same_seed_same_output_regardless_of_batch(engine: LLMEngine) -> None:
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    prompt = random_ids(30, seed=2)
    [alone] = engine.generate([prompt], params)
    batched = engine.generate([random_ids(50, seed=3), prompt, random_ids(9, seed=4)], params)
    assert batched[1].token_ids == alone.token_ids
    other = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, seed=99, ignore_eos=True)
    assert engine.generate([prompt], other)[0].token_ids != alone.token_ids


def test_filters_that_leave_one_candidate_equal_greedy(engine: LLMEngine) -> None:
    prompt = random_ids(25, seed=5)
    [greedy] = engine.generate([prompt], GREEDY)
    for params in (
        SamplingParams(max_tokens=32, temperature=1.5, top_k=1, seed=1, ignore_eos=True),
        SamplingParams(max_tokens=32, temperature=1.5, top_p=1e-6, seed=2, ignore_eos=True),
        SamplingParams(max_tokens=32, temperature=1.5, min_p=1.0, seed=3, ignore_eos=True),
    ):
        assert engine.generate([prompt], params)[0].token_ids == greedy.token_ids


def test_top_k_samples_only_among_the_k_best(engine: LLMEngine) -> None:
    params = SamplingParams(max_tokens=40, temperature=2.0, top_k=3, seed=7, ignore_eos=True, logprobs=3)
    [out] = engine.generate([random_ids(12, seed=6)], params)
    for lp in out.logprobs:
        assert lp.token_id in [t for t, _ in lp.top]


def test_logprobs_match_reference_log_softmax(llama_dir: Path, engine: LLMEngine) -> None:
    prompt = random_ids(40, seed=8)
    [out] = engine.generate(
        [prompt], SamplingParams(max_tokens=10, temperature=0.8, seed=3, logprobs=5, ignore_eos=True)
    )
    ref = reference_logprobs(load_reference(llama_dir), prompt, out.token_ids)
    for i, lp in enumerate(out.logprobs):
        assert lp.logprob == pytest.approx(float(ref[i, lp.token_id]), abs=1e-4)
        values, ids = ref[i].topk(5)
        assert [t for t, _ in lp.top] == ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-4)


def test_stop_string_cuts_output_exactly_and_streams_nothing_past_it(engine: LLMEngine) -> None:
    prompt = random_ids(20, seed=9)
    [full] = engine.generate([prompt], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    text = full.text
    assert len(text) > 12, "the tiny model should produce some text"
    stop = text[6:9]
    expected = text[: text.index(stop)]
    engine.add_request(
        "stop-test", prompt, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=[stop])
    )
    streamed, reason = "", None
    while engine.has_unfinished():
        for out in engine.step():
            streamed += out.new_text
            reason = out.finish_reason
    assert streamed == expected and reason == FinishReason.STOP
    assert_pool_free(engine)


def test_stop_token_ids_end_generation_on_that_token(engine: LLMEngine) -> None:
    prompt = random_ids(20, seed=10)
    [full] = engine.generate([prompt], GREEDY)
    target = full.token_ids[5]
    [out] = engine.generate([prompt], SamplingParams(max_tokens=32, temperature=0.0, stop_token_ids=[target]))
    assert out.finish_reason == FinishReason.STOP
    assert out.token_ids == full.token_ids[: full.token_ids.index(target) + 1]


def test_streamed_deltas_add_up_to_the_final_text(engine: LLMEngine) -> None:
    # A random model may sample byte tokens that never form a valid character: then U+FFFD is part of the true
    # text too. What must hold is that the deltas add up to the full decode (broken-UTF-8 hold-back is unit-tested).
    engine.add_request(
        "stream", "Zürich 東京 🚀 café", SamplingParams(max_tokens=48, temperature=1.0, seed=5)
    )
    pieces, token_ids = [], []
    while engine.has_unfinished():
        for out in engine.step():
            pieces.append(out.new_text)
            token_ids += out.new_token_ids
    assert "".join(pieces) == engine.tokenizer.decode(token_ids)


def test_a_trailing_partial_character_is_streamed_in_the_last_delta(engine: LLMEngine) -> None:
    # Short greedy outputs of a random model often end inside a UTF-8 character; the detokenizer holds such bytes
    # back until the end, and the last delta must carry them (it once dropped them: streamed text lost a trailing
    # U+FFFD that the final text had).
    ended_mid_character = 0
    for seed in range(12):
        request_id = f"partial-{seed}"
        engine.add_request(request_id, random_ids(6, seed), SamplingParams(max_tokens=5, temperature=0.0))
        pieces, token_ids = [], []
        while engine.has_unfinished():
            for out in engine.step():
                pieces.append(out.new_text)
                token_ids += out.new_token_ids
        full = engine.tokenizer.decode(token_ids)
        assert "".join(pieces) == full, seed
        ended_mid_character += full.endswith("\ufffd")
    assert ended_mid_character, "no output ended inside a character: the case is not exercised"


def test_penalties_change_greedy_output_towards_fewer_repeats(engine: LLMEngine) -> None:
    prompt = random_ids(8, seed=11)
    plain = engine.generate([prompt], SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True))[
        0
    ].token_ids
    penalised = engine.generate(
        [prompt],
        SamplingParams(
            max_tokens=48, temperature=0.0, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0
        ),
    )[0].token_ids
    assert len(set(penalised)) >= len(set(plain))


@pytest.mark.parametrize(
    ("prompt", "params", "fragment"),
    [
        ("x" * 5000, SamplingParams(), "the model's context is"),
        ([], SamplingParams(), "prompt is empty"),
        ([1, 2, 10**9], SamplingParams(), "outside the vocabulary"),
        ("hi", "max_tokens=0 set after construction", "max_tokens must be >= 1"),
        ("hi", "top_p=0 set after construction", r"top_p must be in \(0, 1\]"),
    ],
)
def test_bad_requests_fail_alone_and_leak_nothing(engine: LLMEngine, prompt, params, fragment) -> None:
    if isinstance(params, str):  # the engine re-validates: fields changed after construction are caught too
        field, value = params.split()[0].split("=")
        params = SamplingParams()
        setattr(params, field, type(getattr(params, field))(value))
    engine.add_request("good-1", random_ids(30, seed=12), GREEDY)
    with pytest.raises(InvalidRequestError, match=fragment):
        engine.add_request("bad", prompt, params)
    engine.add_request("good-2", random_ids(10, seed=13), GREEDY)
    finished = set()
    while engine.has_unfinished():
        finished |= {o.request_id for o in engine.step() if o.finished}
    assert finished == {"good-1", "good-2"}
    assert_pool_free(engine)


def test_duplicate_request_id_is_refused(engine: LLMEngine) -> None:
    engine.add_request("dup", [5, 6], GREEDY)
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("dup", [5, 6], GREEDY)
    engine.abort("dup")
    assert_pool_free(engine)


def test_abort_mid_generation_frees_blocks(engine: LLMEngine) -> None:
    engine.add_request("long", random_ids(100, seed=14), SamplingParams(max_tokens=200, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.stats().num_free_blocks < engine.stats().num_blocks
    engine.abort("long")
    assert_pool_free(engine)


def test_max_tokens_is_honoured_exactly(engine: LLMEngine) -> None:
    [out] = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True))
    assert len(out.token_ids) == 7 and out.finish_reason == FinishReason.LENGTH


def test_bfloat16_runs_and_float16_on_cpu_is_refused(llama_dir: Path) -> None:
    bf16 = LLMEngine(llama_dir, EngineConfig(dtype="bfloat16", num_kv_blocks=32))
    assert bf16.model.dtype == torch.bfloat16
    assert len(bf16.generate([[5, 6, 7]], GREEDY)[0].token_ids) == 32
    with pytest.raises(InvalidRequestError, match="float16 is not supported on CPU"):
        LLMEngine(llama_dir, EngineConfig(dtype="float16"))


def test_generation_stops_at_the_context_limit(llama_dir: Path) -> None:
    short = LLMEngine(llama_dir, EngineConfig(num_kv_blocks=32, max_model_len=64))
    [out] = short.generate(
        [random_ids(60, seed=15)], SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    )
    assert len(out.token_ids) == 4 and out.finish_reason == FinishReason.LENGTH
    with pytest.raises(InvalidRequestError, match="context is 64 tokens"):
        short.add_request("too-long", random_ids(64, seed=16), GREEDY)
