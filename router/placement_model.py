"""What placing a request on each node would cost: predicted latency, money and power, as vectors over a pool.

The cost and power policies (and the mixed pool) compare nodes by these predictions. Every function takes one
role's RoleArrays and returns one value per node, so a decision over a pool of 1,000 nodes stays a handful of numpy
operations. The inputs are what nodes register (machine type: $/h, idle and maximum power; PerfSummary: latency as
two straight lines) and what they report (queued prompt tokens, running requests, power draw).

Prompt work is what a node would compute: the prompt less the leading tokens it already holds in its prefix cache
(RoleArrays.cached_tokens, filled per request from the nodes' KV events; `to_compute`), so every policy prices a
cache hit as the time and energy it saves.

A node that registered no performance model (all PerfSummary terms 0) predicts zero latency: it is never ruled
out by an SLO, and costs are then compared by price alone. That keeps a cluster without profiles placeable.
"""

from __future__ import annotations

import numpy as np

from router.cluster_index import RoleArrays

# Splitwise batches at most this many prompt tokens per prefill iteration (machine-level scheduler).
MAX_BATCH_PROMPT_TOKENS = 2048


def to_compute(arrays: RoleArrays, prompt_tokens: int, pulled: int = 0) -> np.ndarray:
    """Prompt tokens each node would compute: those past its cached prefix, or past the `pulled` leading tokens it
    would copy from its decode node instead (engines always compute the last one)."""
    return np.maximum(prompt_tokens - np.maximum(arrays.cached_tokens, pulled), 1)


def prompt_seconds(arrays: RoleArrays, prompt_tokens: int | np.ndarray) -> np.ndarray:
    """Compute time of this prompt on each node, as its share of the batch it would join (no queueing)."""
    batches = -(-prompt_tokens // MAX_BATCH_PROMPT_TOKENS)
    return arrays.prompt_fixed_s * batches + arrays.prompt_per_token_s * prompt_tokens


def predicted_ttft(arrays: RoleArrays, prompt_tokens: int | np.ndarray) -> np.ndarray:
    """Queueing plus compute: the queued prompt tokens run first, in batches of MAX_BATCH_PROMPT_TOKENS."""
    total = arrays.pending_tokens + prompt_tokens
    batches = -(-total // MAX_BATCH_PROMPT_TOKENS)
    return arrays.prompt_fixed_s * batches + arrays.prompt_per_token_s * total


def predicted_tbt(arrays: RoleArrays) -> np.ndarray:
    """Time per decode iteration once the request joins the running batch."""
    return arrays.token_fixed_s + arrays.token_per_seq_s * (arrays.running + 1)


def prefill_cost(arrays: RoleArrays, prompt_tokens: int | np.ndarray) -> np.ndarray:
    """USD of machine time the prompt uses on each node."""
    return arrays.cost_per_s * prompt_seconds(arrays, prompt_tokens)


def decode_cost(arrays: RoleArrays, output_tokens: int) -> np.ndarray:
    """USD of machine time for the output on each node: every iteration's time is shared by the whole batch, so
    joining a busy node is cheaper per request than waking an idle one (as long as its TBT stays within the SLO)."""
    return arrays.cost_per_s * output_tokens * predicted_tbt(arrays) / (arrays.running + 1)


def decode_energy(arrays: RoleArrays, output_tokens: int) -> np.ndarray:
    """Joules for the output on each node at its maximum draw, shared by the batch like decode_cost."""
    return arrays.max_power_w * output_tokens * predicted_tbt(arrays) / (arrays.running + 1)


def prefill_energy(arrays: RoleArrays, prompt_tokens: int | np.ndarray) -> np.ndarray:
    return arrays.max_power_w * prompt_seconds(arrays, prompt_tokens)


def added_power(arrays: RoleArrays) -> np.ndarray:
    """Upper bound of the extra draw if the node takes the request: up to its maximum (its cap when capped).

    Bounding by the maximum rather than modelling the increase keeps a budget guarantee simple and safe: a node
    already at full draw adds nothing, an idle one may add everything up to its maximum."""
    return np.maximum(arrays.max_power_w - arrays.power_w, 0.0)


def fits_kv(arrays: RoleArrays, tokens: int | np.ndarray) -> np.ndarray:
    return arrays.free_blocks * arrays.block_size >= tokens


def within(predicted: np.ndarray, limit: float | None) -> np.ndarray:
    """Nodes whose prediction meets the limit (all of them when there is no limit)."""
    if limit is None:
        return np.ones(predicted.shape, dtype=bool)
    return predicted <= limit


def pick(arrays: RoleArrays, allowed: np.ndarray, *keys: np.ndarray) -> int | None:
    """Position of the allowed node with the smallest keys (lexicographic: ties on the first go to the second...),
    or None when none is allowed. Keys within a relative 1e-9 count as equal, so float noise does not decide."""
    candidates = np.flatnonzero(allowed)
    if candidates.size == 0:
        return None
    for key in keys:
        values = key[candidates]
        best = values.min()
        candidates = candidates[values <= best + abs(best) * 1e-9]
        if candidates.size == 1:
            break
    return int(candidates[0])


def queue_keys(arrays: RoleArrays) -> tuple[np.ndarray, np.ndarray]:
    """JSQ's order for nodes that compute prompts, as tie-break keys for pick(): fewest queued tokens, then running."""
    return arrays.pending_tokens, arrays.running


def room_keys(arrays: RoleArrays) -> tuple[np.ndarray, np.ndarray]:
    """JSQ's order for decode nodes, as tie-break keys for pick(): most free KV blocks, then fewest running."""
    return -arrays.free_blocks, arrays.running


def cluster_power(roles: dict[str, RoleArrays]) -> float:
    return float(sum(arrays.power_w.sum() for arrays in roles.values()))
