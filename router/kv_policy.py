"""`kv`: send a request where its prompt's KV already is, unless that node's queue costs more than the hit saves.

Every node's prefix cache is known to the router through KV events (router/kv_index.py); per request the router
fills RoleArrays.cached_tokens with the leading prompt tokens each node holds (`lookup_cached_tokens`). Then:
- prefill node: the lowest predicted TTFT from the node's latency line over what it would actually compute,
      ttft_i = prompt_fixed_s_i * batches + prompt_per_token_s_i * (queued_i + prompt - cached_i)
  (router/placement_model.py), so a hit of C tokens is worth C tokens of queue. Nodes without a registered latency
  model predict 0 for all; they are ordered by the same sum in tokens, then by running requests.
- decode node: among those with room for the KV it lacks, the one holding the longest prefix of the prompt (the
  previous turn of a conversation decoded there: it shares those blocks and receives only the rest), then JSQ's
  order (most free blocks, fewest running). It is chosen first: with prefix pulls (PlacementRequest.prefix_pull,
  prefill_node/prefix_pull.py) the prefill node copies what that node holds instead of computing it, so cached_i
  above is the longer of the prefill node's prefix and the decode node's (the copy is priced at nothing: a block
  crosses the network in far less time than it takes to compute).
- no pair: the colocated node with the fewest tokens to compute (queue plus uncached prompt).
Option `local_prefill_tokens=N` (0, off, by default): a decode node that holds the prompt's prefix computes the rest
itself when that is at most N tokens and less than any prefill node would compute: a conversation's later turns then
stay on the decode node that holds all of it (the prefill nodes lack the earlier answers), with no transfer at all.
N bounds the stall of that node's running batch, like Dynamo's maximum local prefill length.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from engine.prefix_hash import chain
from router import placement_model as pm
from router.policy import Placement, PlacementRequest

if TYPE_CHECKING:
    from router.cluster_index import RoleArrays
    from router.kv_index import KVIndex


class KVAware:
    name = "kv"
    kv_aware = True

    def __init__(self, local_prefill_tokens: int = 0) -> None:
        if (
            isinstance(local_prefill_tokens, bool)
            or not isinstance(local_prefill_tokens, int)
            or local_prefill_tokens < 0
        ):
            raise ValueError(f"local_prefill_tokens must be an integer >= 0, got {local_prefill_tokens!r}")
        self.local_prefill_tokens = local_prefill_tokens

    def place(self, request: PlacementRequest, roles: dict[str, RoleArrays]) -> Placement | None:
        prompt = request.prompt_tokens
        prefill, decode, colocated = roles["prefill"], roles["decode"], roles["colocated"]
        d_fits = decode.usable & pm.fits_kv(decode, np.maximum(prompt - decode.cached_tokens, 1))
        d = pm.pick(decode, d_fits, -decode.cached_tokens, *pm.room_keys(decode))
        pulled = int(decode.cached_tokens[d]) if d is not None and request.prefix_pull else 0
        p = _soonest(prefill, prompt, pulled)
        if not request.resuming:  # a resumed stream continues on a pair only
            # What that prefill node would compute from its own cache: a pull makes it compute no more than the
            # decode node would, but costs a transfer each way, which local prefill does not.
            remote_work = int(pm.to_compute(prefill, prompt)[p]) if p is not None else None
            local = self._local_prefill(decode, prompt, remote_work)
            if local is not None:
                return local
        if p is not None and d is not None:
            return Placement(prefill=prefill.node_ids[p], decode=decode.node_ids[d])
        c = _soonest(colocated, prompt)
        return Placement(colocated=colocated.node_ids[c]) if c is not None else None

    def _local_prefill(self, decode: RoleArrays, prompt: int, remote_work: int | None) -> Placement | None:
        """A decode node holding the prompt's prefix computes the rest itself: no prefill hop, no transfer. Only
        when that rest is at most local_prefill_tokens (its running batch stalls for as long) and less than the
        best prefill node would compute (a turn whose earlier answers were decoded there)."""
        if not self.local_prefill_tokens:
            return None
        work = pm.to_compute(decode, prompt)
        allowed = decode.usable & (work <= self.local_prefill_tokens) & pm.fits_kv(decode, work)
        if remote_work is not None:
            allowed &= work < remote_work
        j = pm.pick(decode, allowed, work, *pm.room_keys(decode))
        return None if j is None else Placement(colocated=decode.node_ids[j], borrowed=True)


def _soonest(arrays: RoleArrays, prompt: int, pulled: int = 0) -> int | None:
    """The usable node predicted to finish computing the prompt first: latency line over queue plus uncached work
    (what it can pull from the decode node counts as cached), then (no latency lines) those tokens, then the most
    cached itself, then fewest running."""
    work = pm.to_compute(arrays, prompt, pulled)
    ttft = pm.predicted_ttft(arrays, work)
    # At equal work, the node holding more of the prefix itself: it has fewer blocks to pull.
    return pm.pick(
        arrays, arrays.usable, ttft, arrays.pending_tokens + work, -arrays.cached_tokens, arrays.running
    )


def lookup_cached_tokens(index: KVIndex, prompt: Sequence[int], block_sizes: Iterable[int]) -> dict[str, int]:
    """Per node, the leading tokens of prompt whose KV it offers. An engine always computes a prompt's last token,
    so at most (len - 1) // block_size blocks count, as in its own lookup (engine/block_manager.py)."""
    found: dict[str, int] = {}
    for block_size in set(block_sizes):
        keys = list(chain(prompt, block_size, max_blocks=(len(prompt) - 1) // block_size))
        for node, blocks in index.cached_blocks(keys).items():
            found[node] = max(found.get(node, 0), blocks * block_size)
    return found
