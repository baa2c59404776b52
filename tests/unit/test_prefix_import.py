"""Prefix KV brought into an engine from another's pool (engine/prefix_import.py) serves like KV computed there.

The other engine's blocks are copied tensor by tensor here, standing in for the KV transport (which
tests/integration/test_kv_routing.py runs for real between node processes).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from engine import prefix_import
from engine.config import EngineConfig, EngineRole
from engine.engine import LLMEngine
from engine.errors import InvalidRequestError, ResourceExhaustedError, UnknownRequestError
from engine.sampling_params import SamplingParams

BLOCK = 16
PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def engine(model: Path, role: EngineRole = EngineRole.COLOCATED, blocks: int = 64) -> LLMEngine:
    return LLMEngine(model, EngineConfig(role=role, num_kv_blocks=blocks))


def prompt(n: int, seed: int = 5) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1000) for _ in range(n)]


def exporter_holding(model: Path, tokens: list[int], rid: str = "turn2") -> LLMEngine:
    """A decode-role engine whose prefix cache holds tokens' full blocks, and a reservation sharing them."""
    source = engine(model)
    source.generate([tokens], SamplingParams(max_tokens=1, temperature=0.0))
    source.reserve(rid, tokens + prompt(5, seed=9), PARAMS)
    return source


def copy_blocks(source: LLMEngine, src: list[int], target: LLMEngine, dst: list[int]) -> None:
    for theirs, ours in zip(source.kv_layers, target.kv_layers, strict=True):
        ours[dst] = theirs[src]


def test_imported_blocks_serve_later_requests_as_cached_and_give_the_same_tokens(llama_dir: Path) -> None:
    shared = prompt(64)  # 4 full blocks
    source = exporter_holding(llama_dir, shared)
    assert source.cached_blocks("turn2") == 4
    target = engine(llama_dir)
    started = prefix_import.begin(target, "turn2", [*shared, 7, 8], 4)
    assert started.first_block == 0 and len(started.block_ids) == 4
    pinned = prefix_import.pin(source, "turn2", 0, 4)
    copy_blocks(source, pinned, target, started.block_ids)
    prefix_import.unpin(source, pinned)
    prefix_import.finish(target, "turn2", filled=True)
    assert target.blocks.num_free_blocks == target.blocks.num_blocks  # cached, held by nobody

    follow_up = shared + prompt(10, seed=6)
    reference = engine(llama_dir).generate([follow_up], PARAMS)[0]
    served = target.generate([follow_up], PARAMS)[0]
    assert served.num_cached_prompt_tokens == 4 * BLOCK
    assert served.token_ids == reference.token_ids


def test_only_blocks_the_importer_lacks_are_taken(llama_dir: Path) -> None:
    shared = prompt(64)
    target = engine(llama_dir)
    target.generate([shared[:40]], SamplingParams(max_tokens=1, temperature=0.0))  # caches blocks 0 and 1
    started = prefix_import.begin(target, "x", shared, 4)
    assert started.first_block == 2 and len(started.block_ids) == 2
    prefix_import.finish(target, "x", filled=False)
    nothing = prefix_import.begin(target, "y", shared[:40], 2)
    assert nothing.block_ids == [] and nothing.first_block == 2


def test_an_unfilled_import_is_freed_and_never_served(llama_dir: Path) -> None:
    shared = prompt(48)
    target = engine(llama_dir, blocks=16)
    started = prefix_import.begin(target, "x", shared, 3)
    assert target.blocks.num_free_blocks == 16 - 3
    with pytest.raises(InvalidRequestError, match="already under way"):
        prefix_import.begin(target, "x", shared, 3)
    prefix_import.finish(target, "x", filled=False)
    prefix_import.finish(target, "x", filled=False)  # a second end is a no-op
    assert target.blocks.num_free_blocks == 16 and not target.prefix_imports
    assert prefix_import.begin(target, "again", shared, 3).first_block == 0  # nothing entered the cache
    prefix_import.finish(target, "again", filled=False)
    assert started.block_ids  # (they were taken)


def test_a_pool_too_short_for_the_import_refuses_it(llama_dir: Path) -> None:
    target = engine(llama_dir, blocks=4)
    with pytest.raises(ResourceExhaustedError):
        prefix_import.begin(target, "x", prompt(96), 6)
    assert target.blocks.num_free_blocks == 4


def test_pin_lends_only_cached_blocks_of_a_reservation_and_holds_them_past_its_end(llama_dir: Path) -> None:
    shared = prompt(64)
    source = exporter_holding(llama_dir, shared)
    with pytest.raises(InvalidRequestError, match="first 4 hold cached KV"):
        prefix_import.pin(source, "turn2", 2, 3)  # block 4 is the reservation's own, still empty
    with pytest.raises(UnknownRequestError):
        prefix_import.pin(source, "nobody", 0, 1)
    pinned = prefix_import.pin(source, "turn2", 1, 3)
    source.abort("turn2")  # the router dropped the reservation while its blocks were being read
    assert all(source.blocks.ref_count(b) == 1 for b in pinned)
    prefix_import.unpin(source, pinned)
    assert source.blocks.num_free_blocks == source.blocks.num_blocks
