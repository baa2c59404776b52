"""`cost`: the cheapest placement whose predicted TTFT and TBT meet the request's SLO.

A request can be served three ways, and this policy prices each with router/placement_model.py:
- a remote pair: prefill node i computes the prompt, decode node j generates. Cost = prefill machine time + the
  decode machine time of the expected output, shared with j's batch. TTFT depends on i only and TBT on j only, so
  the cheapest feasible pair is the cheapest feasible prefill node plus the cheapest feasible decode node.
- local prefill: decode node j computes the prompt itself (no transfer, no prefill node). It pays j's price for the
  prompt time, and the requests already running on j stall for that long; so it is considered only when j knows
  its prompt speed (a registered PerfSummary) and the stall stays within LOCAL_STALL_TBT_FACTOR x the TBT limit.
  This is the per-request choice between local and remote prefill by marginal cost.
- a colocated node k: prompt and output priced on k, latency predicted on k's queue and batch.
The cheapest feasible option wins; on equal cost a remote pair beats local prefill beats colocated (the split is the
design point), then the lower predicted latency, then JSQ's order (shortest queue; most free KV), which is all that
is left to decide by when nodes registered no performance model. When no option meets the SLO the request still gets the placement
with the lowest predicted TTFT (JSQ-like), since refusing it would miss the SLO by more.

SLO limits come from the request (PlacementRequest.ttft_slo_s / tbt_slo_s) or else from the policy's options.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from router import placement_model as pm
from router.policy import Placement, PlacementRequest

if TYPE_CHECKING:
    from router.cluster_index import RoleArrays

# Splitwise's P99 TBT slowdown limit is 5x: a one-off stall of a running batch up to 5 TBT limits keeps the P99
# reachable, while anything longer would break it for every request in the batch.
LOCAL_STALL_TBT_FACTOR = 5.0


class CostPolicy:
    name = "cost"
    kv_aware = True  # prices a prefix-cache hit (placement_model.to_compute)

    def __init__(
        self, ttft_slo_s: float | None = None, tbt_slo_s: float | None = None, local_prefill: bool = True
    ) -> None:
        for label, value in (("ttft_slo_s", ttft_slo_s), ("tbt_slo_s", tbt_slo_s)):
            if value is not None and not value > 0:
                raise ValueError(f"{label} must be > 0, got {value!r}")
        self.ttft_slo_s = ttft_slo_s
        self.tbt_slo_s = tbt_slo_s
        self.local_prefill = local_prefill

    def place(self, request: PlacementRequest, roles: dict[str, RoleArrays]) -> Placement | None:
        ttft_limit = request.ttft_slo_s if request.ttft_slo_s is not None else self.ttft_slo_s
        tbt_limit = request.tbt_slo_s if request.tbt_slo_s is not None else self.tbt_slo_s
        prompt, output = request.prompt_tokens, max(1, request.expected_output_tokens)
        prefill, decode, colocated = roles["prefill"], roles["decode"], roles["colocated"]

        p_work, c_work = pm.to_compute(prefill, prompt), pm.to_compute(colocated, prompt)
        p_ttft, d_tbt = pm.predicted_ttft(prefill, p_work), pm.predicted_tbt(decode)
        p_cost, d_cost = pm.prefill_cost(prefill, p_work), pm.decode_cost(decode, output)
        p_usable = prefill.usable
        d_usable = decode.usable & pm.fits_kv(decode, prompt)
        c_usable = colocated.usable & pm.fits_kv(colocated, prompt)
        c_ttft, c_tbt = pm.predicted_ttft(colocated, c_work), pm.predicted_tbt(colocated)
        c_cost = pm.prefill_cost(colocated, c_work) + pm.decode_cost(colocated, output)

        # (cost, kind rank, latency, placement) of the best feasible option of each kind
        options: list[tuple[float, int, float, Placement]] = []
        p = pm.pick(
            prefill, p_usable & pm.within(p_ttft, ttft_limit), p_cost, p_ttft, *pm.queue_keys(prefill)
        )
        d = pm.pick(decode, d_usable & pm.within(d_tbt, tbt_limit), d_cost, d_tbt, *pm.room_keys(decode))
        if p is not None and d is not None:
            pair = Placement(prefill=prefill.node_ids[p], decode=decode.node_ids[d])
            options.append((float(p_cost[p] + d_cost[d]), 0, float(p_ttft[p]), pair))
        if self.local_prefill:
            local = self._best_local(decode, d_usable, prompt, d_cost, d_tbt, ttft_limit, tbt_limit)
            if local is not None:
                options.append(local)
        feasible_c = c_usable & pm.within(c_ttft, ttft_limit) & pm.within(c_tbt, tbt_limit)
        c = pm.pick(colocated, feasible_c, c_cost, c_ttft, *pm.queue_keys(colocated))
        if c is not None:
            options.append(
                (float(c_cost[c]), 2, float(c_ttft[c]), Placement(colocated=colocated.node_ids[c]))
            )
        if options:
            return min(options, key=lambda option: option[:3])[3]
        return _fastest(prefill, decode, colocated, p_usable, d_usable, c_usable, p_ttft, d_tbt, c_ttft)

    def _best_local(
        self,
        decode: RoleArrays,
        usable: np.ndarray,
        prompt: int,
        d_cost: np.ndarray,
        d_tbt: np.ndarray,
        ttft_limit: float | None,
        tbt_limit: float | None,
    ) -> tuple[float, int, float, Placement] | None:
        work = pm.to_compute(decode, prompt)
        compute = pm.prompt_seconds(decode, work)
        ttft = pm.predicted_ttft(decode, work)
        stall_ok = decode.running == 0
        if tbt_limit is not None:
            stall_ok = stall_ok | (compute + d_tbt <= LOCAL_STALL_TBT_FACTOR * tbt_limit)
        allowed = (
            usable
            & (decode.prompt_per_token_s > 0)  # a node that never measured its prompt speed would look free
            & stall_ok
            & pm.within(ttft, ttft_limit)
            & pm.within(d_tbt, tbt_limit)
        )
        cost = decode.cost_per_s * compute + d_cost
        j = pm.pick(decode, allowed, cost, ttft, *pm.room_keys(decode))
        if j is None:
            return None
        return float(cost[j]), 1, float(ttft[j]), Placement(colocated=decode.node_ids[j], borrowed=True)


def _fastest(
    prefill: RoleArrays,
    decode: RoleArrays,
    colocated: RoleArrays,
    p_usable: np.ndarray,
    d_usable: np.ndarray,
    c_usable: np.ndarray,
    p_ttft: np.ndarray,
    d_tbt: np.ndarray,
    c_ttft: np.ndarray,
) -> Placement | None:
    """No option meets the SLO: the pair (else the colocated node) predicted to answer first."""
    p = pm.pick(prefill, p_usable, p_ttft, prefill.cost_per_s, *pm.queue_keys(prefill))
    d = pm.pick(decode, d_usable, d_tbt, decode.cost_per_s, *pm.room_keys(decode))
    if p is not None and d is not None:
        return Placement(prefill=prefill.node_ids[p], decode=decode.node_ids[d])
    c = pm.pick(colocated, c_usable, c_ttft, colocated.cost_per_s, *pm.queue_keys(colocated))
    return Placement(colocated=colocated.node_ids[c]) if c is not None else None
