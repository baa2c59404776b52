"""Placement: which (prefill, decode) pair, or which colocated node, serves a request. Chosen once, at arrival.

Policies read the router's placement index (router/cluster_index.py): per role, every live node's load as arrays,
already corrected for this router's own recent picks and with draining or excluded nodes marked unusable. The
default is Splitwise's join-the-shortest-queue: the prefill node with the fewest pending prompt tokens, the decode
node with the most free KV blocks that can hold the prompt. When no pair exists (a pool is empty or full) a colocated
node serves the whole request.

Other policies (router/policies.py builds any of them by name): `cost` (router/cost_policy.py: the cheapest placement whose
predicted TTFT and TBT meet the SLO, including prefill on the decode node itself), `power` (router/power_policy.py:
stay under a cluster power budget, least energy first) and `mixed` (router/mixed_pool.py: Splitwise's mixed pool
around any of them). The simulator (ops/sim) calls these same objects on its simulated machines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from router.cluster_index import RoleArrays

# Packs a secondary key under the primary one so one argmin/argmax orders by both (running < 2**24 always).
_SECONDARY = 1 << 24


@dataclass(frozen=True, slots=True)
class PlacementRequest:
    prompt_tokens: int  # tokens whose KV the prefill node computes (prompt, plus output already delivered)
    max_total_tokens: int  # prompt + max_tokens, capped by the context
    # What the placer expects the request to generate (output length is unknown at arrival: the router uses a
    # running mean of finished requests, capped by max_tokens); cost and energy estimates scale with it.
    expected_output_tokens: int = 128
    # Latency targets for this request (None: none). cost/power policies keep predictions within them.
    ttft_slo_s: float | None = None
    tbt_slo_s: float | None = None
    # Tokens were delivered already (its decode node died): only a (prefill, decode) pair can resume the stream.
    resuming: bool = False
    # The prefill node of a pair may copy the prompt blocks its decode node caches instead of computing them
    # (RouterConfig.prefix_pull): what the decode node holds counts as cached for the prefill node too.
    prefix_pull: bool = False


@dataclass(frozen=True, slots=True)
class Placement:
    prefill: str | None = None
    decode: str | None = None
    # One node runs both phases: a colocated node, or (borrowed=True) a node of the prefill or decode pool that
    # serves a whole request while its own pool lends it (mixed pool), or a decode node computing the prompt
    # itself because that costs less than a remote prefill plus the transfer (local prefill).
    colocated: str | None = None
    borrowed: bool = False

    @property
    def disaggregated(self) -> bool:
        return self.prefill is not None and self.decode is not None


class PlacementPolicy(Protocol):
    name: str
    # Whether place() reads RoleArrays.cached_tokens: the router then looks each prompt up in its KV index
    # (router/kv_index.py). A policy without the attribute is taken as not reading them.

    def place(self, request: PlacementRequest, roles: dict[str, RoleArrays]) -> Placement | None:
        """Pick usable nodes for a request; None if nothing fits."""
        ...


class JoinShortestQueue:
    """Splitwise's default: prefill by fewest pending prompt tokens, decode by most free KV blocks."""

    name = "jsq"
    kv_aware = False

    def place(self, request: PlacementRequest, roles: dict[str, RoleArrays]) -> Placement | None:
        prefill, decode = roles["prefill"], roles["decode"]
        p = _best(prefill, -(prefill.pending_tokens * _SECONDARY + prefill.running), prefill.usable)
        fits = decode.usable & (decode.free_blocks * decode.block_size >= request.prompt_tokens)
        d = _best(decode, decode.free_blocks * _SECONDARY - decode.running, fits)
        if p is not None and d is not None:
            return Placement(prefill=p, decode=d)
        colocated = roles["colocated"]
        c = _best(colocated, -(colocated.pending_tokens + colocated.running), colocated.usable)
        return Placement(colocated=c) if c is not None else None


def _best(arrays: RoleArrays, score: np.ndarray, allowed: np.ndarray) -> str | None:
    """The allowed node with the highest score (the first one on ties), or None."""
    if not allowed.any():
        return None
    masked = np.where(allowed, score, np.iinfo(np.int64).min)
    return arrays.node_ids[int(masked.argmax())]
