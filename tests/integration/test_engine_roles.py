"""Prefill role on one engine + decode role on another, KV streamed layer by layer in-process == colocated output."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from engine import kernels
from engine.config import EngineConfig, EngineRole
from engine.engine import KVLayerWrite, LLMEngine, RequestOutput
from engine.errors import ResourceExhaustedError, UnknownRequestError
from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason

LENGTHS = (3, 16, 40, 95, 150)


def prompts(vocab: int, seed: int = 5) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, vocab) for _ in range(48)]
    out = [[rng.randrange(3, vocab) for _ in range(n)] for n in LENGTHS]
    out.append(
        [*shared, 7, 8, 9]
    )  # these two share three full blocks: the prefill side serves the second's from cache
    out.append([*shared, 10, 11])
    return out


class InProcessTransfer:
    """Plays the transport: copies each layer's freshly written blocks into the decode engine's reserved blocks."""

    def __init__(self, prefill: LLMEngine, decode: LLMEngine) -> None:
        self.prefill, self.decode = prefill, decode
        self.dst_blocks: dict[str, list[int]] = {}
        self.layer_calls = 0
        prefill.set_kv_layer_hook(self.on_layer)

    def on_layer(self, layer: int, writes: list[KVLayerWrite]) -> None:
        self.layer_calls += 1
        bs = self.prefill.config.block_size
        for w in writes:
            first = w.start // bs
            dst = self.dst_blocks[w.request_id][first : first + len(w.block_ids)]
            self.copy(layer, w.block_ids, dst)

    def copy(self, layer: int, src: list[int], dst: list[int]) -> None:
        src_t = _ids(src)
        buffer = kernels.gather_blocks(self.prefill.kv_layers[layer], src_t)
        kernels.scatter_blocks(buffer, self.decode.kv_layers[layer], _ids(dst))

    def hand_over(self, out: RequestOutput) -> None:
        """Prompt done: send the blocks the prefill side served from its prefix cache (never written this time)."""
        assert out.kv is not None
        cached = self.prefill.blocks.blocks_for(out.num_cached_prompt_tokens)
        for layer in range(len(self.decode.kv_layers)):
            self.copy(layer, out.kv.block_ids[:cached], self.dst_blocks[out.request_id][:cached])
        self.prefill.release(out.request_id)
        self.decode.admit(out.request_id, out.kv.first_token_id, out.kv.first_logprob)


def _ids(ids: list[int]):
    import torch

    return torch.tensor(ids, dtype=torch.int32)


def config(role: EngineRole) -> EngineConfig:
    return EngineConfig(role=role, num_kv_blocks=96, max_num_batched_tokens=48, max_num_seqs=8)


def run_disaggregated(
    model_dir: Path, batch: list[list[int]], params: SamplingParams
) -> tuple[dict[str, list[int]], int]:
    """Run batch through a prefill engine and a decode engine; returns tokens per request and prefix-cache hits."""
    prefill = LLMEngine(model_dir, config(EngineRole.PREFILL))
    decode = LLMEngine(model_dir, config(EngineRole.DECODE))
    return run_pair(prefill, decode, batch, params)


def run_pair(
    prefill: LLMEngine, decode: LLMEngine, batch: list[list[int]], params: SamplingParams
) -> tuple[dict[str, list[int]], int]:
    """run_disaggregated on given engines (idle, holding nothing): every block is free again at the end."""
    transfer = InProcessTransfer(prefill, decode)
    tokens: dict[str, list[int]] = {}
    for i, prompt in enumerate(batch):
        rid = f"r{i}"
        transfer.dst_blocks[rid] = decode.reserve(
            rid, prompt, params
        )  # reserved at arrival, as the router does
        prefill.add_request(rid, prompt, params)
    finished: set[str] = set()
    for _ in range(10_000):
        for out in prefill.step():
            if out.finish_reason == FinishReason.PREFILL_DONE:
                transfer.hand_over(out)
        for out in decode.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                finished.add(out.request_id)
        if len(finished) == len(batch):
            break
    assert len(finished) == len(batch), "disaggregated run did not finish"
    assert transfer.layer_calls > 0
    for engine in (prefill, decode):
        stats = engine.stats()
        assert stats.num_free_blocks == stats.num_blocks and stats.num_held == 0, "blocks leaked"
    return tokens, prefill.stats().prefix_cache.hit_blocks


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_prefill_then_decode_equals_colocated(arch: str, tiny_models: dict[str, Path]) -> None:
    colocated = LLMEngine(tiny_models[arch], config(EngineRole.COLOCATED))
    batch = prompts(colocated.tokenizer.vocab_size)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    expected = {f"r{i}": c.token_ids for i, c in enumerate(colocated.generate(batch, params))}
    tokens, prefix_hits = run_disaggregated(tiny_models[arch], batch, params)
    assert tokens == expected
    # The two shared-prefix prompts prefill side by side, so only blocks finished before the second one's admission
    # are hits: at least one, which hand_over must send although no layer hook ever saw it written.
    assert prefix_hits >= 1


def test_seeded_sampling_continues_across_the_hand_over(llama_dir: Path) -> None:
    colocated = LLMEngine(llama_dir, config(EngineRole.COLOCATED))
    batch = prompts(colocated.tokenizer.vocab_size)[:3]
    params = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, seed=11, ignore_eos=True)
    expected = {f"r{i}": c.token_ids for i, c in enumerate(colocated.generate(batch, params))}
    assert run_disaggregated(llama_dir, batch, params)[0] == expected


def test_reserve_refuses_when_the_pool_is_short_and_leaves_it_unchanged(llama_dir: Path) -> None:
    decode = LLMEngine(llama_dir, EngineConfig(role=EngineRole.DECODE, num_kv_blocks=4, block_size=16))
    decode.reserve("a", list(range(3, 40)))  # 3 blocks
    with pytest.raises(ResourceExhaustedError, match="need 2 KV blocks"):
        decode.reserve("b", list(range(3, 30)))
    assert decode.stats().num_free_blocks == 1
    decode.abort("a")
    assert decode.stats().num_free_blocks == 4


def test_admit_and_release_need_a_request_in_the_right_state(llama_dir: Path) -> None:
    decode = LLMEngine(llama_dir, config(EngineRole.DECODE))
    with pytest.raises(UnknownRequestError, match="no reserved request 'x'"):
        decode.admit("x", 5)
    prefill = LLMEngine(llama_dir, config(EngineRole.PREFILL))
    with pytest.raises(UnknownRequestError, match="no prefilled request 'x'"):
        prefill.release("x")


def test_prefill_request_that_ends_on_its_first_token_needs_no_decode(llama_dir: Path) -> None:
    prefill = LLMEngine(llama_dir, config(EngineRole.PREFILL))
    [done] = prefill.generate([[5, 6, 7]], SamplingParams(max_tokens=1, temperature=0.0))
    assert done.finish_reason == FinishReason.LENGTH and len(done.token_ids) == 1
    assert prefill.stats().num_free_blocks == prefill.stats().num_blocks


def test_decode_engine_preempts_and_recomputes_imported_requests_exactly(llama_dir: Path) -> None:
    """A decode pool too small for all admitted requests to grow: preempted ones recompute locally, same tokens."""
    colocated = LLMEngine(llama_dir, config(EngineRole.COLOCATED))
    batch = prompts(colocated.tokenizer.vocab_size)[:4]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    expected = [c.token_ids for c in colocated.generate(batch, params)]

    prefill = LLMEngine(llama_dir, config(EngineRole.PREFILL))
    decode = LLMEngine(
        llama_dir, EngineConfig(role=EngineRole.DECODE, num_kv_blocks=16, max_num_batched_tokens=48)
    )
    tokens: dict[str, list[int]] = {}
    for i, prompt in enumerate(batch):
        rid = f"r{i}"
        dst = decode.reserve(rid, prompt, params)
        [out] = [o for o in _run_prefill(prefill, rid, prompt, params) if o.kv is not None]
        assert out.kv is not None
        for layer in range(len(decode.kv_layers)):
            buffer = kernels.gather_blocks(prefill.kv_layers[layer], _ids(out.kv.block_ids))
            kernels.scatter_blocks(buffer, decode.kv_layers[layer], _ids(dst))
        prefill.release(rid)
        decode.admit(rid, out.kv.first_token_id)
    for _ in range(10_000):
        if not decode.has_unfinished():
            break
        for o in decode.step():
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert decode.stats().num_preemptions > 0, "the pool was meant to force preemption"
    assert [tokens[f"r{i}"] for i in range(len(batch))] == expected
    assert decode.stats().num_free_blocks == decode.stats().num_blocks


def _run_prefill(
    prefill: LLMEngine, rid: str, prompt: list[int], params: SamplingParams
) -> list[RequestOutput]:
    prefill.add_request(rid, prompt, params)
    outs: list[RequestOutput] = []
    while prefill.has_unfinished():
        outs += prefill.step()
    return outs


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=1.0, seed=5, frequency_penalty=0.5, ignore_eos=True),
    ],
    ids=["greedy", "seeded-with-penalty"],
)
def test_resuming_with_prior_output_continues_exactly(llama_dir: Path, params: SamplingParams) -> None:
    """A request whose node died after 7 delivered tokens resumes elsewhere and continues as if nothing happened."""
    prompt = prompts(1000)[3]
    [whole] = LLMEngine(llama_dir, config(EngineRole.COLOCATED)).generate([prompt], params)
    delivered = whole.token_ids[:7]

    colocated = LLMEngine(llama_dir, config(EngineRole.COLOCATED))
    colocated.add_request("resumed", prompt, params, prior_output=delivered)
    new_tokens = []
    while colocated.has_unfinished():
        new_tokens += [t for out in colocated.step() for t in out.new_token_ids]
    assert delivered + new_tokens == whole.token_ids

    prefill = LLMEngine(llama_dir, config(EngineRole.PREFILL))
    decode = LLMEngine(llama_dir, config(EngineRole.DECODE))
    dst = decode.reserve("resumed", prompt, params, prior_output=delivered)
    [handoff] = [o for o in _run_prefill_resumed(prefill, prompt, params, delivered) if o.kv is not None]
    assert handoff.kv is not None and handoff.kv.num_tokens == len(prompt) + len(delivered)
    for layer in range(len(decode.kv_layers)):
        buffer = kernels.gather_blocks(prefill.kv_layers[layer], _ids(handoff.kv.block_ids))
        kernels.scatter_blocks(buffer, decode.kv_layers[layer], _ids(dst))
    prefill.release("resumed")
    decode.admit("resumed", handoff.kv.first_token_id)
    resumed = []
    while decode.has_unfinished():
        resumed += [t for out in decode.step() for t in out.new_token_ids]
    assert delivered + resumed == whole.token_ids


def _run_prefill_resumed(
    prefill: LLMEngine, prompt: list[int], params: SamplingParams, prior: list[int]
) -> list[RequestOutput]:
    prefill.add_request("resumed", prompt, params, prior_output=prior)
    outs: list[RequestOutput] = []
    while prefill.has_unfinished():
        outs += prefill.step()
    return outs
