"""The paged KV pool's bookkeeping: reference-counted blocks and a prefix cache keyed by a hash chain of token ids.

A full block's key is block_key(parent block's key, its token ids) (engine/prefix_hash.py, the same in every process
of a cluster), so equal keys mean equal whole prefixes. Each key the cache starts or stops offering goes to
`events` (engine/kv_events.py), which a node publishes so that routers send requests where their prefix is. A block is
registered only once its KV has been computed, so a request can never reuse a block another request is still filling.
Freed blocks keep their contents and key until they are handed out again, least recently freed first; a sequence frees
its blocks tail first so that shared prefixes are the last to be evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from engine.kv_events import KVEventLog
from engine.prefix_hash import ROOT_KEY, block_key
from engine.sequence import Sequence


@dataclass(slots=True)
class PrefixCacheStats:
    queried_blocks: int = 0  # full prompt blocks looked up at admission
    hit_blocks: int = 0  # of those, found in the cache


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._block_key: list[int | None] = [None] * num_blocks
        self._block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self._cached: dict[int, int] = {}  # key -> block id
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.stats = PrefixCacheStats()
        self.events = KVEventLog()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def admit_with_prefix_cache(self, seq: Sequence) -> None:
        """Give a new sequence the cached blocks of its longest cached prompt prefix; it computes the rest.

        At least the prompt's last token is always left to compute: its logits are needed to sample. A sequence that
        still needs its prompt's logits (prompt_logprobs) computes every token, as in vLLM: cached positions would
        have none. Its blocks are still published for others.
        """
        if not self._looks_up(seq):
            return
        max_blocks = (seq.num_tokens - 1) // self.block_size
        key = ROOT_KEY
        hits: list[int] = []
        for i in range(max_blocks):
            tokens = tuple(seq.token_slice(i * self.block_size, (i + 1) * self.block_size))
            key = block_key(key, tokens)
            block = self._cached.get(key)
            if block is None or self._block_tokens[block] != tokens:
                break
            hits.append(block)
        for block in hits:
            self._acquire(block)
        seq.block_ids = hits
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_hashed_blocks = len(hits)
        seq.num_cached_prompt_tokens = seq.num_computed_tokens

    def record_admission(self, seq: Sequence) -> None:
        """Count a sequence's prefix-cache lookup once it is actually admitted (retries are not counted twice)."""
        if self._looks_up(seq):
            self.stats.queried_blocks += (seq.num_tokens - 1) // self.block_size
            self.stats.hit_blocks += seq.num_cached_prompt_tokens // self.block_size

    def ensure_capacity(self, seq: Sequence, num_tokens: int) -> bool:
        """Make seq own enough blocks for its first num_tokens tokens; False (and no change) if the pool is short."""
        missing = self.blocks_for(num_tokens) - len(seq.block_ids)
        if missing <= 0:
            return True
        taken = self.take_free(missing)
        if taken is None:
            return False
        seq.block_ids.extend(taken)
        return True

    def register_computed_blocks(self, seq: Sequence) -> None:
        """Publish seq's blocks that became full of computed KV, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_ids))
        if full <= seq.num_hashed_blocks:
            return
        key = ROOT_KEY
        if seq.num_hashed_blocks:
            key = self._block_key[seq.block_ids[seq.num_hashed_blocks - 1]] or ROOT_KEY
        for i in range(seq.num_hashed_blocks, full):
            tokens = tuple(seq.token_slice(i * self.block_size, (i + 1) * self.block_size))
            key = block_key(key, tokens)
            block = seq.block_ids[i]
            self._block_key[block] = key
            self._block_tokens[block] = tokens
            if key not in self._cached:
                self._cached[key] = block
                self.events.stored(key)
        seq.num_hashed_blocks = full

    # ---- blocks filled from outside (engine/prefix_import.py) ------------------------------------------------------

    def prefix_keys(
        self, token_ids: list[int], num_blocks: int
    ) -> tuple[list[int], list[tuple[int, ...]], int]:
        """The keys and tokens of the first num_blocks full blocks of token_ids, and how many of them, from the
        first on, this cache holds."""
        key, keys, tokens, cached = ROOT_KEY, [], [], 0
        for i in range(min(num_blocks, len(token_ids) // self.block_size)):
            block_tokens = tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])
            key = block_key(key, block_tokens)
            keys.append(key)
            tokens.append(block_tokens)
            block = self._cached.get(key)
            if cached == i and block is not None and self._block_tokens[block] == block_tokens:
                cached += 1
        return keys, tokens, cached

    def take_free(self, count: int) -> list[int] | None:
        """count blocks nobody uses, each referenced once, their old cache entries dropped; None if too few."""
        if count > len(self._free):
            return None
        taken = []
        for _ in range(count):
            block, _ = self._free.popitem(last=False)
            self._forget_key(block)
            self._ref_counts[block] = 1
            taken.append(block)
        return taken

    def publish(self, block_ids: list[int], keys: list[int], tokens: list[tuple[int, ...]]) -> None:
        """Offer blocks whose KV is in place (written from outside) under their keys, as computed blocks are."""
        if not self.enable_prefix_caching:
            return
        for block, key, block_tokens in zip(block_ids, keys, tokens, strict=True):
            self._block_key[block] = key
            self._block_tokens[block] = block_tokens
            if key not in self._cached:
                self._cached[key] = block
                self.events.stored(key)

    def pin(self, block_ids: list[int]) -> None:
        """One more reference to each block: nobody can take them over until unpin()."""
        for block in block_ids:
            self._acquire(block)

    def unpin(self, block_ids: list[int]) -> None:
        """Drop one reference to each block, tail first (like free())."""
        for block in reversed(block_ids):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free[block] = None

    def free(self, seq: Sequence) -> None:
        """Drop seq's references, tail first; blocks nobody references become reusable (their cache entry stays)."""
        self.unpin(seq.block_ids)
        seq.block_ids = []
        seq.num_hashed_blocks = 0

    def _looks_up(self, seq: Sequence) -> bool:
        return self.enable_prefix_caching and not seq.needs_prompt_logits

    def _acquire(self, block: int) -> None:
        if self._ref_counts[block] == 0:
            del self._free[block]
        self._ref_counts[block] += 1

    def _forget_key(self, block: int) -> None:
        key = self._block_key[block]
        if key is not None and self._cached.get(key) == block:
            del self._cached[key]
            self.events.removed(key)
        self._block_key[block] = None
        self._block_tokens[block] = None
