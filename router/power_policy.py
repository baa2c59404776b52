"""`power`: keep the cluster's draw under a budget, and spend the least energy within it.

The cluster's draw now is the sum of every node's reported power (measured by NVML or modeled from utilisation).
Placing a request on a node may raise that node's draw up to its maximum (placement_model.added_power: a bound,
not a guess, so the guarantee below holds for any draw a node can reach):

    placement allowed  <=>  cluster draw + added power of the nodes it wakes <= budget

Within the allowed placements the policy prefers energy-efficient nodes: the decode node with the fewest joules per
output token (a capped machine, or one whose running batch shares the iteration), then the prefill node with the
fewest joules for the prompt; a colocated node competes on its total. The decode node is chosen among those for
which some prefill node still fits the remaining headroom, so whenever any allowed pair exists one is found.

SLO limits (request or policy options) filter the choice when some allowed placement meets them; otherwise latency
yields to the budget. When nothing fits the budget (every option would pass it) the request goes where it adds the
least power: serving it late beats refusing it, and the overshoot is bounded by one node's headroom.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from router import placement_model as pm
from router.policy import Placement, PlacementRequest

if TYPE_CHECKING:
    from router.cluster_index import RoleArrays


class PowerPolicy:
    name = "power"
    kv_aware = True  # prices a prefix-cache hit (placement_model.to_compute)

    def __init__(
        self, budget_w: float, ttft_slo_s: float | None = None, tbt_slo_s: float | None = None
    ) -> None:
        if isinstance(budget_w, bool) or not isinstance(budget_w, int | float) or not budget_w > 0:
            raise ValueError(f"budget_w must be a number of watts > 0, got {budget_w!r}")
        if not math.isfinite(budget_w):
            raise ValueError("budget_w must be finite")
        self.budget_w = float(budget_w)
        self.ttft_slo_s = ttft_slo_s
        self.tbt_slo_s = tbt_slo_s

    def place(self, request: PlacementRequest, roles: dict[str, RoleArrays]) -> Placement | None:
        ttft_limit = request.ttft_slo_s if request.ttft_slo_s is not None else self.ttft_slo_s
        tbt_limit = request.tbt_slo_s if request.tbt_slo_s is not None else self.tbt_slo_s
        headroom = self.budget_w - pm.cluster_power(roles)
        candidates = _Candidates(request, roles)
        for limits in ((ttft_limit, tbt_limit), (None, None)):
            placement = candidates.within_budget(headroom, *limits)
            if placement is not None:
                return placement
        return candidates.least_added_power()


class _Candidates:
    """Per-node predictions for one request, shared by the budgeted search and the fallback."""

    def __init__(self, request: PlacementRequest, roles: dict[str, RoleArrays]) -> None:
        prompt, output = request.prompt_tokens, max(1, request.expected_output_tokens)
        self.prefill, self.decode, self.colocated = roles["prefill"], roles["decode"], roles["colocated"]
        p, d, c = self.prefill, self.decode, self.colocated
        self.p_usable = p.usable
        self.d_usable = d.usable & pm.fits_kv(d, prompt)
        self.c_usable = c.usable & pm.fits_kv(c, prompt)
        self.p_added, self.d_added, self.c_added = pm.added_power(p), pm.added_power(d), pm.added_power(c)
        p_work, c_work = pm.to_compute(p, prompt), pm.to_compute(c, prompt)
        self.p_energy, self.d_energy = pm.prefill_energy(p, p_work), pm.decode_energy(d, output)
        self.c_energy = pm.prefill_energy(c, c_work) + pm.decode_energy(c, output)
        self.p_ttft, self.d_tbt = pm.predicted_ttft(p, p_work), pm.predicted_tbt(d)
        self.c_ttft, self.c_tbt = pm.predicted_ttft(c, c_work), pm.predicted_tbt(c)

    def within_budget(
        self, headroom: float, ttft_limit: float | None, tbt_limit: float | None
    ) -> Placement | None:
        p_ok = self.p_usable & pm.within(self.p_ttft, ttft_limit) & (self.p_added <= headroom)
        d_ok = self.d_usable & pm.within(self.d_tbt, tbt_limit)
        options: list[tuple[float, int, Placement]] = []
        if p_ok.any():
            cheapest_prefill = float(self.p_added[p_ok].min())
            d_ok &= self.d_added + cheapest_prefill <= headroom
            d = pm.pick(self.decode, d_ok, self.d_energy, self.d_added, *pm.room_keys(self.decode))
            if d is not None:
                p_ok &= self.p_added + self.d_added[d] <= headroom
                p = pm.pick(self.prefill, p_ok, self.p_energy, self.p_added, *pm.queue_keys(self.prefill))
                assert p is not None  # d was chosen so that the cheapest prefill node still fits
                pair = Placement(prefill=self.prefill.node_ids[p], decode=self.decode.node_ids[d])
                options.append((float(self.p_energy[p] + self.d_energy[d]), 0, pair))
        c_ok = (
            self.c_usable
            & pm.within(self.c_ttft, ttft_limit)
            & pm.within(self.c_tbt, tbt_limit)
            & (self.c_added <= headroom)
        )
        c = pm.pick(self.colocated, c_ok, self.c_energy, self.c_added, *pm.queue_keys(self.colocated))
        if c is not None:
            options.append((float(self.c_energy[c]), 1, Placement(colocated=self.colocated.node_ids[c])))
        return min(options, key=lambda option: option[:2])[2] if options else None

    def least_added_power(self) -> Placement | None:
        options: list[tuple[float, int, Placement]] = []
        p = pm.pick(self.prefill, self.p_usable, self.p_added, *pm.queue_keys(self.prefill))
        d = pm.pick(self.decode, self.d_usable, self.d_added, *pm.room_keys(self.decode))
        if p is not None and d is not None:
            pair = Placement(prefill=self.prefill.node_ids[p], decode=self.decode.node_ids[d])
            options.append((float(self.p_added[p] + self.d_added[d]), 0, pair))
        c = pm.pick(self.colocated, self.c_usable, self.c_added, *pm.queue_keys(self.colocated))
        if c is not None:
            options.append((float(self.c_added[c]), 1, Placement(colocated=self.colocated.node_ids[c])))
        return min(options, key=lambda option: option[:2])[2] if options else None
