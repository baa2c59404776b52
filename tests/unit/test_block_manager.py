"""Block manager: reference counts, prefix-cache keys, eviction order."""

from __future__ import annotations

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


def seq(tokens: list[int], name: str = "r") -> Sequence:
    return Sequence(name, tokens, SamplingParams(), detokenizer=None)


def computed(bm: BlockManager, s: Sequence) -> Sequence:
    """Pretend the whole prompt was computed and publish its full blocks."""
    assert bm.ensure_capacity(s, s.num_tokens)
    s.num_computed_tokens = s.num_tokens
    bm.register_computed_blocks(s)
    return s


def test_allocation_and_free_return_every_block() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = computed(bm, seq(list(range(10)), "a"))
    assert len(a.block_ids) == 3 and bm.num_free_blocks == 5
    bm.free(a)
    assert bm.num_free_blocks == 8 and a.block_ids == []


def test_ensure_capacity_refuses_without_partial_allocation() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    s = seq(list(range(12)))
    assert not bm.ensure_capacity(s, 12)
    assert s.block_ids == [] and bm.num_free_blocks == 2


def test_shared_prefix_reuses_blocks_and_counts_hits() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    first = computed(bm, seq(list(range(13)), "a"))  # 3 full blocks + 1 partial
    second = seq([*range(12), 99, 98], "b")
    bm.admit_with_prefix_cache(second)
    bm.record_admission(second)
    assert second.block_ids == first.block_ids[:3]
    assert second.num_computed_tokens == 12 and second.num_cached_prompt_tokens == 12
    assert all(bm.ref_count(b) == 2 for b in first.block_ids[:3])
    assert bm.stats.hit_blocks == 3 and bm.stats.queried_blocks == 3


def test_prefix_cache_always_leaves_the_last_prompt_token_to_compute() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    computed(bm, seq(list(range(8)), "a"))
    again = seq(list(range(8)), "b")
    bm.admit_with_prefix_cache(again)
    assert again.num_computed_tokens == 4  # block 2 would cover the last token, whose logits are needed


def test_freed_blocks_stay_cached_until_reused() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a = computed(bm, seq(list(range(8)), "a"))
    bm.free(a)
    b = seq([*range(8), 1], "b")
    bm.admit_with_prefix_cache(b)
    assert b.num_computed_tokens == 8
    bm.free(b)
    # Take every block for unrelated tokens: the cached entries are evicted, not served stale.
    filler = computed(bm, seq([7] * 16, "filler"))
    bm.free(filler)
    c = seq([*range(8), 1], "c")
    bm.admit_with_prefix_cache(c)
    assert c.num_computed_tokens == 0


def test_different_prefix_before_equal_block_is_not_a_hit() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    computed(bm, seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "a"))
    other = seq([9, 9, 9, 9, 5, 6, 7, 8, 9], "b")  # same second block, different first
    bm.admit_with_prefix_cache(other)
    assert other.num_computed_tokens == 0


def test_tail_blocks_are_evicted_before_shared_heads() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    a = computed(bm, seq([1, 2, 3, 4, 5], "a"))  # blocks [1,2] [3,4] [5]
    head, tail = a.block_ids[0], a.block_ids[2]
    bm.free(a)
    fresh = seq([8, 8])
    assert bm.ensure_capacity(fresh, 2)
    assert fresh.block_ids == [tail] and head != tail


def test_cache_keys_are_the_cluster_wide_hash_chain() -> None:
    """Routers hash prompts with engine/prefix_hash.py to find these keys: both must agree, in every process."""
    from engine.prefix_hash import ROOT_KEY, block_key, chain

    bm = BlockManager(num_blocks=8, block_size=4)
    s = computed(bm, seq(list(range(10))))
    keys = list(chain(list(range(10)), 4))
    assert len(keys) == 2
    assert keys[0] == block_key(ROOT_KEY, [0, 1, 2, 3]) and keys[1] == block_key(keys[0], [4, 5, 6, 7])
    assert sorted(bm.events.snapshot()) == sorted(keys)
    assert bm._cached == {keys[0]: s.block_ids[0], keys[1]: s.block_ids[1]}
    # The function is part of the cluster's wire format (KV events in Redis): pinned, so a change is deliberate.
    assert block_key(ROOT_KEY, [1, 2, 3]) == block_key(ROOT_KEY, (1, 2, 3)) == 0x3750CCE79E1EC52
    assert 0 <= block_key(2**63 - 1, [2**31 - 1] * 16) < 2**63


def test_events_report_stored_and_evicted_keys_once_per_drain() -> None:
    from engine.prefix_hash import chain

    bm = BlockManager(num_blocks=3, block_size=4)
    a = computed(bm, seq(list(range(8)), "a"))  # 2 full blocks
    first = bm.events.drain()
    assert sorted(first.stored) == sorted(chain(list(range(8)), 4)) and first.removed == []
    assert bm.events.drain().stored == []  # drained
    bm.free(a)  # freed blocks keep their keys: still offered
    assert bm.events.drain() == type(first)([], [])
    b = computed(bm, seq(list(range(100, 112)), "b"))  # 3 blocks: takes the free one, then evicts a's two
    batch = bm.events.drain()
    assert sorted(batch.removed) == sorted(chain(list(range(8)), 4))
    assert sorted(batch.stored) == sorted(chain(list(range(100, 112)), 4))
    assert sorted(bm.events.snapshot()) == sorted(chain(list(range(100, 112)), 4))
    bm.free(b)


def test_only_the_last_change_of_a_key_between_drains_is_reported() -> None:
    bm = BlockManager(num_blocks=1, block_size=4)
    a = computed(bm, seq([1, 2, 3, 4], "a"))
    bm.free(a)
    computed(bm, seq([5, 6, 7, 8], "b"))  # evicts a's key before anyone drained
    batch = bm.events.drain()
    from engine.prefix_hash import chain

    assert batch.stored == list(chain([5, 6, 7, 8], 4)) and batch.removed == [next(chain([1, 2, 3, 4], 4))]
