"""Prefix KV that another node computed, brought into this engine's prefix cache instead of being recomputed.

The case it serves: turn 2 of a conversation reaches a prefill node that cached turn 1's prompt, while turn 1's
answer was decoded on (and is cached by) the decode node chosen for turn 2. Computing the answer's tokens again costs
the prefill node a forward pass over them; copying their KV from the decode node costs a transfer of a few blocks.

On the importing engine:
1. `begin(engine, import_id, token_ids, num_blocks)`: for the first num_blocks full blocks of token_ids, the leading
   ones this cache already holds are left alone; fresh blocks are taken for the rest and held (nobody else can
   read or take them) while the other node writes their KV through the transport.
2. `finish(engine, import_id, filled=True)`: their KV is in place. The blocks join the prefix cache under their keys
   (and are published in KV events), and the hold is dropped: the request that follows finds them like any cached
   prefix. With filled=False (the transfer failed or was abandoned) they are freed without entering the cache.
   Either way the caller makes sure no write into them can still land first.

On the exporting engine, `pin(engine, request_id, first, count)` holds blocks [first, first + count) of a reserved
request (blocks its prefix cache shared into the reservation: complete KV) while they are read, and `unpin` lets
them go. A wrong or missing import only ever costs a recompute: the imported blocks are keyed by their own tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import InvalidRequestError, ResourceExhaustedError, UnknownRequestError


@dataclass(frozen=True, slots=True)
class PrefixImport:
    first_block: int  # leading prefix blocks this engine held already: not imported
    block_ids: list[int]  # where blocks first_block, first_block + 1, ... of the prefix are to be written
    keys: list[int]
    tokens: list[tuple[int, ...]]


def begin(engine, import_id: str, token_ids: list[int], num_blocks: int) -> PrefixImport:
    """Take blocks for the part of token_ids' first num_blocks blocks this cache lacks (maybe none)."""
    imports: dict[str, PrefixImport] = engine.prefix_imports
    if import_id in imports:
        raise InvalidRequestError(f"a prefix import {import_id!r} is already under way")
    blocks = engine.blocks
    if not blocks.enable_prefix_caching:
        return PrefixImport(0, [], [], [])
    keys, tokens, have = blocks.prefix_keys(token_ids, num_blocks)
    taken = blocks.take_free(len(keys) - have)
    if taken is None:
        raise ResourceExhaustedError(f"{len(keys) - have} KV blocks to import, {blocks.num_free_blocks} free")
    started = PrefixImport(have, taken, keys[have:], tokens[have:])
    if taken:
        imports[import_id] = started
    return started


def finish(engine, import_id: str, filled: bool) -> None:
    """End an import: its blocks enter the cache (filled) or are freed (not); unknown ids are ignored."""
    started = engine.prefix_imports.pop(import_id, None)
    if started is None:
        return
    if filled:
        # Tensor parallel: the ranks take their heads of the blocks before the next step.
        engine.import_blocks(started.block_ids)
        engine.blocks.publish(started.block_ids, started.keys, started.tokens)
    engine.blocks.unpin(started.block_ids)


def pin(engine, request_id: str, first: int, count: int) -> list[int]:
    """Hold blocks [first, first + count) of a reserved request that came from its prefix cache; their ids."""
    seq = engine.reserved_sequence(request_id)
    if seq is None:
        raise UnknownRequestError(f"no reserved request {request_id!r}")
    cached = seq.num_cached_prompt_tokens // engine.config.block_size
    if first < 0 or count < 1 or first + count > cached:
        raise InvalidRequestError(
            f"blocks [{first}, {first + count}) of {request_id!r} asked for; only its first {cached} hold cached KV"
        )
    block_ids = list(seq.block_ids[first : first + count])
    engine.export_blocks(block_ids)  # tensor parallel: the ranks' heads into the pool the transport reads
    engine.blocks.pin(block_ids)
    return block_ids


def unpin(engine, block_ids: list[int]) -> None:
    engine.blocks.unpin(block_ids)
