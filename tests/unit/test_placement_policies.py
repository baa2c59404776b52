"""The cost, power and mixed-pool placement policies on constructed cluster states.

States use the built-in machine types (DGX-A100 $17.6/h 6500 W, DGX-H100 $38/h 10200 W, capped DGX-H100 7140 W)
and the latency lines of the shipped BLOOM-176B performance model, so the choices are the ones a real mixed fleet
would face. Property tests compare each policy with a brute force over every placement, written from the policy's
stated rule rather than from its code.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster.machines import BUILTIN_MACHINES
from cluster.perfmodel import PerfModel, PerfSummary
from router.cluster_index import RoleArrays
from router.cost_policy import CostPolicy
from router.mixed_pool import MixedPool
from router.policies import create_policy
from router.policy import Placement, PlacementRequest
from router.power_policy import PowerPolicy

PERF_CSV = Path(__file__).resolve().parents[3] / "shared" / "data" / "splitwise-perf-model" / "perf_model.csv"
HARDWARE = {"dgx-a100": "a100-80gb", "dgx-h100": "h100-80gb", "dgx-h100-cap": "h100-80gb-pcap"}
_SUMMARIES: dict[str, PerfSummary] = {}


def summary(machine: str) -> PerfSummary:
    if machine not in _SUMMARIES:
        model = PerfModel.from_csv(PERF_CSV, "bloom-176b", HARDWARE[machine], 8)
        _SUMMARIES[machine] = model.summary()
    return _SUMMARIES[machine]


@dataclass
class N:
    """One constructed node."""

    name: str
    machine: str = "dgx-h100"
    pending: int = 0
    running: int = 0
    free_tokens: int = 100_000
    power_w: float | None = None  # None: idle power
    usable: bool = True
    perf: bool = True
    cached: int = 0  # leading prompt tokens in the node's prefix cache

    @property
    def type(self):
        return BUILTIN_MACHINES[self.machine]

    @property
    def perf_line(self) -> PerfSummary:
        return summary(self.machine) if self.perf else PerfSummary(0.0, 0.0, 0.0, 0.0)

    @property
    def draw(self) -> float:
        return self.type.idle_power_w if self.power_w is None else self.power_w


def arrays(nodes: list[N]) -> RoleArrays:
    return RoleArrays.build(
        [n.name for n in nodes],
        pending_tokens=[n.pending for n in nodes],
        running=[n.running for n in nodes],
        free_blocks=[n.free_tokens for n in nodes],
        block_size=[1] * len(nodes),
        usable=[n.usable for n in nodes],
        cached_tokens=[n.cached for n in nodes],
        cost_per_s=[n.type.cost_per_hour / 3600 for n in nodes],
        idle_power_w=[n.type.idle_power_w for n in nodes],
        max_power_w=[n.type.max_power_w for n in nodes],
        power_w=[n.draw for n in nodes],
        prompt_fixed_s=[n.perf_line.prompt_fixed_s for n in nodes],
        prompt_per_token_s=[n.perf_line.prompt_per_token_s for n in nodes],
        token_fixed_s=[n.perf_line.token_fixed_s for n in nodes],
        token_per_seq_s=[n.perf_line.token_per_seq_s for n in nodes],
    )


def roles(prefill=(), decode=(), colocated=()) -> dict[str, RoleArrays]:
    return {
        "prefill": arrays(list(prefill)),
        "decode": arrays(list(decode)),
        "colocated": arrays(list(colocated)),
    }


def request(prompt=1000, output=128, ttft=None, tbt=None) -> PlacementRequest:
    return PlacementRequest(prompt, prompt + output, output, ttft_slo_s=ttft, tbt_slo_s=tbt)


# ---- the policies' rules, restated per node (scalar) for brute forces -------------------------------------------


def batches(tokens: int) -> int:
    return -(-tokens // 2048)


def ttft_of(n: N, prompt: int) -> float:
    line = n.perf_line
    return line.prompt_fixed_s * batches(n.pending + prompt) + line.prompt_per_token_s * (n.pending + prompt)


def tbt_of(n: N) -> float:
    return n.perf_line.token_time_s(n.running + 1)


def prefill_usd(n: N, prompt: int) -> float:
    line = n.perf_line
    return (
        n.type.cost_per_hour
        / 3600
        * (line.prompt_fixed_s * batches(prompt) + line.prompt_per_token_s * prompt)
    )


def decode_usd(n: N, output: int) -> float:
    return n.type.cost_per_hour / 3600 * output * tbt_of(n) / (n.running + 1)


def added_w(n: N) -> float:
    return max(n.type.max_power_w - n.draw, 0.0)


# ---- cost ---------------------------------------------------------------------------------------------------------


def test_cost_picks_the_cheapest_pair_when_every_pair_meets_the_slo() -> None:
    state = roles(
        prefill=[N("p-h100", "dgx-h100"), N("p-a100", "dgx-a100")],
        decode=[N("d-h100", "dgx-h100"), N("d-a100", "dgx-a100")],
    )
    # Per the shipped perf model a prompt token costs $17.6/h x 0.313 ms on an A100 and $38/h x 0.151 ms on an H100
    # (4% more); a decode token costs $17.6/h x 57 ms on an A100, $38/h x 41 ms on an H100 (60% more).
    placed = CostPolicy(local_prefill=False).place(request(), state)
    assert placed == Placement(prefill="p-a100", decode="d-a100")


def test_cost_pays_for_the_faster_node_when_the_cheap_one_would_miss_the_ttft_slo() -> None:
    cheap, fast = N("p-a100", "dgx-a100"), N("p-h100", "dgx-h100")
    state = roles(prefill=[cheap, fast], decode=[N("d", "dgx-a100")])
    assert ttft_of(fast, 1000) < 0.25 < ttft_of(cheap, 1000)
    loose = CostPolicy(local_prefill=False).place(request(ttft=1.0), state)
    tight = CostPolicy(local_prefill=False).place(request(ttft=0.25), state)
    assert loose is not None and loose.prefill == "p-a100"
    assert tight is not None and tight.prefill == "p-h100"


def test_cost_packs_decode_batches_up_to_the_tbt_slo() -> None:
    busy, idle = N("d-busy", running=30), N("d-idle", running=0)
    state = roles(prefill=[N("p")], decode=[idle, busy])
    assert CostPolicy(local_prefill=False).place(request(), state) == Placement(prefill="p", decode="d-busy")
    tight = (tbt_of(busy) + tbt_of(idle)) / 2  # the busy node's batch would break this TBT limit
    assert CostPolicy(local_prefill=False).place(request(tbt=tight), state) == Placement(
        prefill="p", decode="d-idle"
    )


@pytest.mark.parametrize("seed", range(40))
def test_cost_matches_a_brute_force_over_every_pair(seed: int) -> None:
    rng = random.Random(seed)
    types = list(HARDWARE)

    def random_node(name: str) -> N:
        return N(name, rng.choice(types), pending=rng.choice([0, 0, 500, 3000, 9000]),
                 running=rng.randrange(0, 64), free_tokens=rng.choice([500, 5000, 100_000]),
                 usable=rng.random() > 0.1)  # fmt: skip

    prefill = [random_node(f"p{i}") for i in range(rng.randrange(1, 6))]
    decode = [random_node(f"d{i}") for i in range(rng.randrange(1, 6))]
    want = request(prompt=rng.randrange(100, 4000), output=rng.randrange(1, 500),
                   ttft=rng.choice([None, 0.5, 1.5, 4.0]), tbt=rng.choice([None, 0.045, 0.06]))  # fmt: skip
    feasible = [
        (prefill_usd(p, want.prompt_tokens) + decode_usd(d, want.expected_output_tokens), p, d)
        for p, d in itertools.product(prefill, decode)
        if p.usable and d.usable and d.free_tokens >= want.prompt_tokens
        and (want.ttft_slo_s is None or ttft_of(p, want.prompt_tokens) <= want.ttft_slo_s)
        and (want.tbt_slo_s is None or tbt_of(d) <= want.tbt_slo_s)
    ]  # fmt: skip
    placed = CostPolicy(local_prefill=False).place(want, roles(prefill, decode))
    if feasible:
        best = min(cost for cost, _, _ in feasible)
        chosen = [cost for cost, p, d in feasible if placed == Placement(prefill=p.name, decode=d.name)]
        assert chosen and chosen[0] == pytest.approx(best, rel=1e-6)
    elif any(p.usable for p in prefill) and any(
        d.usable and d.free_tokens >= want.prompt_tokens for d in decode
    ):
        # nothing meets the SLO: the pair predicted to answer first still serves it
        assert placed is not None and placed.disaggregated
        fastest = min(ttft_of(p, want.prompt_tokens) for p in prefill if p.usable)
        assert ttft_of(next(p for p in prefill if p.name == placed.prefill), want.prompt_tokens) == fastest


def test_cost_prefills_locally_when_the_remote_queue_would_miss_the_ttft_slo() -> None:
    queued = N("p", "dgx-a100", pending=14000)
    state = roles(prefill=[queued], decode=[N("d", "dgx-a100")])
    assert ttft_of(queued, 1000) > 2.0
    # Same machine type on both sides: equal cost, and a remote pair wins ties, unless its queue breaks the TTFT.
    assert CostPolicy().place(request(), state) == Placement(prefill="p", decode="d")
    assert CostPolicy().place(request(ttft=2.0), state) == Placement(colocated="d", borrowed=True)
    assert CostPolicy(local_prefill=False).place(request(ttft=2.0), state) == Placement(
        prefill="p", decode="d"
    )


def test_cost_prefills_locally_only_when_the_running_batch_can_absorb_the_stall() -> None:
    # A prompt token costs 4% less on the A100 decode node than on the H100 prefill node: local prefill is the
    # cheaper path, unless the 1.25 s it takes would stall 40 running requests past 5 x the 80 ms TBT limit.
    want = request(prompt=4000, tbt=0.08)
    idle = roles(prefill=[N("p", "dgx-h100")], decode=[N("d", "dgx-a100", running=0)])
    busy = roles(prefill=[N("p", "dgx-h100")], decode=[N("d", "dgx-a100", running=40)])
    assert CostPolicy().place(want, idle) == Placement(colocated="d", borrowed=True)
    assert CostPolicy().place(want, busy) == Placement(prefill="p", decode="d")


def test_cost_without_performance_models_balances_like_jsq() -> None:
    state = roles(prefill=[N("p1", pending=900, perf=False), N("p2", pending=10, perf=False)],
                  decode=[N("d1", free_tokens=2000, perf=False), N("d2", free_tokens=9000, perf=False)])  # fmt: skip
    assert CostPolicy().place(request(), state) == Placement(prefill="p2", decode="d2")


def test_cost_uses_a_colocated_node_when_it_is_the_cheapest_feasible_option() -> None:
    state = roles(prefill=[N("p", "dgx-h100", pending=20000)], decode=[N("d", "dgx-h100", free_tokens=10)],
                  colocated=[N("c", "dgx-a100")])  # fmt: skip
    assert CostPolicy().place(request(ttft=3.0), state) == Placement(colocated="c")


def test_cost_rejects_nonsense_limits() -> None:
    with pytest.raises(ValueError, match="ttft_slo_s"):
        CostPolicy(ttft_slo_s=0)


# ---- power --------------------------------------------------------------------------------------------------------


def test_power_prefers_the_capped_decode_node_for_the_same_tokens() -> None:
    state = roles(prefill=[N("p")], decode=[N("d-h100", "dgx-h100"), N("d-cap", "dgx-h100-cap")])
    # Capped and uncapped H100 decode at the same speed (perf rows: token time unchanged), at 7140 W vs 10200 W.
    assert PowerPolicy(budget_w=1e6).place(request(), state) == Placement(prefill="p", decode="d-cap")


def test_power_keeps_under_the_budget_by_using_nodes_that_are_already_busy() -> None:
    busy_p = N("p-busy", pending=4000, power_w=BUILTIN_MACHINES["dgx-h100"].max_power_w)
    idle_p = N("p-idle")
    busy_d = N("d-busy", running=20, power_w=BUILTIN_MACHINES["dgx-h100"].max_power_w)
    idle_d = N("d-idle")
    state = roles(prefill=[idle_p, busy_p], decode=[idle_d, busy_d])
    draw = sum(n.draw for n in (busy_p, idle_p, busy_d, idle_d))
    # Room for one more woken node but not two: the pair must reuse a busy node on at least one side.
    budget = draw + added_w(idle_p) + 1.0
    placed = PowerPolicy(budget_w=budget).place(request(), state)
    assert placed is not None
    woken = sum(
        added_w(n) for n in (busy_p, idle_p, busy_d, idle_d) if n.name in (placed.prefill, placed.decode)
    )
    assert draw + woken <= budget


@pytest.mark.parametrize("seed", range(60))
def test_power_never_exceeds_the_budget_when_a_placement_fits(seed: int) -> None:
    rng = random.Random(1000 + seed)
    types = list(HARDWARE)

    def random_node(name: str) -> N:
        machine = rng.choice(types)
        mt = BUILTIN_MACHINES[machine]
        power = rng.choice([None, mt.max_power_w, (mt.idle_power_w + mt.max_power_w) / 2])
        return N(name, machine, pending=rng.choice([0, 800]), running=rng.randrange(0, 10),
                 free_tokens=rng.choice([100, 100_000]), power_w=power, usable=rng.random() > 0.15)  # fmt: skip

    prefill = [random_node(f"p{i}") for i in range(rng.randrange(0, 5))]
    decode = [random_node(f"d{i}") for i in range(rng.randrange(0, 5))]
    colocated = [random_node(f"c{i}") for i in range(rng.randrange(0, 3))]
    draw = sum(n.draw for n in prefill + decode + colocated)
    budget = draw + rng.choice([1.0, 500.0, 3000.0, 8000.0, 20000.0])
    want = request(prompt=500)
    options = [
        added_w(p) + added_w(d)
        for p, d in itertools.product(prefill, decode)
        if p.usable and d.usable and d.free_tokens >= 500
    ] + [added_w(c) for c in colocated if c.usable and c.free_tokens >= 500]
    placed = PowerPolicy(budget_w=budget).place(want, roles(prefill, decode, colocated))
    if not options:
        assert placed is None
        return
    assert placed is not None
    by_name = {n.name: n for n in prefill + decode + colocated}
    used = [by_name[name] for name in (placed.prefill, placed.decode, placed.colocated) if name]
    added = sum(added_w(n) for n in used)
    if min(options) <= budget - draw:
        assert draw + added <= budget + 1e-6
    else:
        assert added == pytest.approx(min(options))  # nothing fits: the least added power


def test_power_rejects_a_budget_that_is_not_a_positive_number() -> None:
    for bad in (0, -5.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="budget_w"):
            PowerPolicy(budget_w=bad)  # type: ignore[arg-type]


# ---- mixed pool ---------------------------------------------------------------------------------------------------


def test_mixed_pool_borrows_a_decode_node_when_the_prompt_pool_overflows_and_returns_it_when_drained() -> (
    None
):
    policy = MixedPool(prompt_threshold=8192)
    calm = roles(prefill=[N("p1", pending=100)], decode=[N("d1"), N("d2", free_tokens=50_000)])
    assert policy.place(request(), calm) == Placement(prefill="p1", decode="d1")
    assert policy.borrowed == {}

    swamped = roles(prefill=[N("p1", pending=9000)], decode=[N("d1"), N("d2", free_tokens=50_000)])
    first = policy.place(request(), swamped)
    assert first == Placement(colocated="d1", borrowed=True)
    assert policy.borrowed == {"d1": "decode"}
    # The borrowed node (now with prompt work queued) takes the next overflow too, before another is borrowed.
    still = roles(
        prefill=[N("p1", pending=9500)], decode=[N("d1", pending=1000), N("d2", free_tokens=50_000)]
    )
    assert policy.place(request(), still) == Placement(colocated="d1", borrowed=True)
    # Its borrowed work drained and the prompt pool recovered: d1 is back in the decode pool.
    drained = roles(prefill=[N("p1", pending=200)], decode=[N("d1"), N("d2", free_tokens=50_000)])
    assert policy.place(request(), drained) == Placement(prefill="p1", decode="d1")
    assert policy.borrowed == {}


def test_mixed_pool_borrows_a_prefill_node_when_no_decode_node_has_room() -> None:
    policy = MixedPool()
    full = roles(prefill=[N("p1", pending=3000), N("p2", pending=100)], decode=[N("d1", free_tokens=300)])
    assert policy.place(request(prompt=1000), full) == Placement(colocated="p2", borrowed=True)
    assert policy.borrowed == {"p2": "prefill"}
    busy = roles(prefill=[N("p1", pending=3000), N("p2", running=1)], decode=[N("d1", free_tokens=300)])
    policy.place(request(prompt=1000), busy)
    assert policy.borrowed == {"p2": "prefill"}  # still running its borrowed request
    recovered = roles(prefill=[N("p1"), N("p2")], decode=[N("d1")])
    assert policy.place(request(prompt=1000), recovered) == Placement(prefill="p1", decode="d1")
    assert policy.borrowed == {}


def test_mixed_pool_wraps_any_policy_by_name() -> None:
    policy = create_policy("mixed", inner="power", budget_w=1e6)
    state = roles(prefill=[N("p")], decode=[N("d-h100", "dgx-h100"), N("d-cap", "dgx-h100-cap")])
    assert policy.place(request(), state) == Placement(prefill="p", decode="d-cap")
    with pytest.raises(ValueError, match="prompt_threshold"):
        create_policy("mixed", prompt_threshold=-1)
    with pytest.raises(ValueError, match="itself"):
        create_policy("mixed", inner="mixed")
    with pytest.raises(ValueError, match="unknown placement policy"):
        create_policy("mixed", inner="cheapest")


# ---- kv: where the prompt's KV is cached ---------------------------------------------------------------------------


@pytest.mark.parametrize("perf", [True, False])
def test_kv_prefers_the_nodes_holding_the_prefix_at_equal_load(perf: bool) -> None:
    state = roles(
        prefill=[N("p0", perf=perf), N("p1", perf=perf, cached=800)],
        decode=[N("d0", perf=perf), N("d1", perf=perf, cached=900), N("d2", perf=perf)],
    )
    assert create_policy("kv").place(request(prompt=1000), state) == Placement(prefill="p1", decode="d1")


@pytest.mark.parametrize("perf", [True, False])
def test_kv_weighs_a_hit_against_the_queue_in_front_of_it(perf: bool) -> None:
    policy = create_policy("kv")
    # 800 cached tokens are worth 800 queued ones: behind 5,000 they lose, behind 500 they win.
    long_queue = roles(
        prefill=[N("p0", perf=perf), N("p1", perf=perf, cached=800, pending=5000)], decode=[N("d0")]
    )
    assert policy.place(request(prompt=1000), long_queue) == Placement(prefill="p0", decode="d0")
    short_queue = roles(
        prefill=[N("p0", perf=perf), N("p1", perf=perf, cached=800, pending=500)], decode=[N("d0")]
    )
    assert policy.place(request(prompt=1000), short_queue) == Placement(prefill="p1", decode="d0")


def test_kv_picks_the_lowest_predicted_ttft_over_uncached_work() -> None:
    """Brute force over random states: the chosen prefill node has the lowest TTFT on what it would compute."""
    rng = random.Random(5)
    policy = create_policy("kv")
    for _ in range(200):
        prefill = [
            N(f"p{i}", machine=rng.choice(list(HARDWARE)), pending=rng.randrange(0, 6000),
              cached=rng.randrange(0, 3000), usable=rng.random() > 0.2)
            for i in range(rng.randrange(1, 6))
        ]  # fmt: skip
        prompt = rng.randrange(1, 3000)
        placement = policy.place(request(prompt=prompt), roles(prefill=prefill, decode=[N("d0")]))
        usable = [n for n in prefill if n.usable]
        if not usable:
            assert placement is None
            continue
        assert placement is not None
        best = min(ttft_of(n, max(prompt - n.cached, 1)) for n in usable)
        chosen = next(n for n in prefill if n.name == placement.prefill)
        assert ttft_of(chosen, max(prompt - chosen.cached, 1)) <= best * (1 + 1e-9)


def test_kv_without_a_pair_takes_the_colocated_node_with_least_to_compute() -> None:
    state = roles(colocated=[N("c0", pending=100), N("c1", cached=600, pending=300)])
    assert create_policy("kv").place(request(prompt=1000), state) == Placement(colocated="c1")


def test_cost_and_power_price_a_cached_prefix_and_say_they_read_it() -> None:
    state = roles(prefill=[N("p0"), N("p1", cached=3000)], decode=[N("d0")])
    assert CostPolicy(local_prefill=False).place(request(prompt=4000), state) == Placement(
        prefill="p1", decode="d0"
    )
    assert PowerPolicy(budget_w=1e9).place(request(prompt=4000), state) == Placement(
        prefill="p1", decode="d0"
    )
    kinds = {name: getattr(create_policy(name, **opts), "kv_aware", False) for name, opts in
             [("jsq", {}), ("kv", {}), ("cost", {}), ("power", {"budget_w": 1.0}), ("mixed", {"inner": "kv"}),
              ("mixed", {})]}  # fmt: skip
    assert kinds == {"jsq": False, "kv": True, "cost": True, "power": True, "mixed": False}
    assert create_policy("mixed", inner="kv").kv_aware


def test_kv_local_prefill_keeps_a_conversation_on_the_decode_node_that_holds_it() -> None:
    # The prefill node holds 600 of the 1,000 prompt tokens, the decode node d1 900 (the earlier answers too).
    state = roles(prefill=[N("p0", cached=600)], decode=[N("d0"), N("d1", cached=900)])
    assert create_policy("kv").place(request(prompt=1000), state) == Placement(prefill="p0", decode="d1")
    local = create_policy("kv", local_prefill_tokens=256)
    assert local.place(request(prompt=1000), state) == Placement(colocated="d1", borrowed=True)
    resumed = PlacementRequest(1000, 1128, 128, resuming=True)  # only a pair can continue a delivered stream
    assert local.place(resumed, state) == Placement(prefill="p0", decode="d1")
    # Not when the rest is longer than the limit, nor when a prefill node would compute as little.
    assert local.place(request(prompt=1200), state) == Placement(prefill="p0", decode="d1")
    even = roles(prefill=[N("p0", cached=900)], decode=[N("d1", cached=900)])
    assert local.place(request(prompt=1000), even) == Placement(prefill="p0", decode="d1")
    with pytest.raises(ValueError, match="local_prefill_tokens"):
        create_policy("kv", local_prefill_tokens=-1)


@pytest.mark.parametrize("perf", [True, False])
def test_kv_with_prefix_pulls_counts_the_decode_nodes_prefix_for_every_prefill_node(perf: bool) -> None:
    # d1 holds 900 of the 1,000 tokens (turn 1's prompt and answer); p0 holds 600 of them but has 500 queued.
    state = roles(
        prefill=[N("p0", perf=perf, cached=600, pending=500), N("p1", perf=perf)],
        decode=[N("d0", perf=perf), N("d1", perf=perf, cached=900)],
    )
    policy = create_policy("kv")
    # Without pulls p0 computes 400 behind 500 queued, p1 all 1,000: p0. With them p1 copies 900 and computes 100.
    assert policy.place(request(prompt=1000), state) == Placement(prefill="p0", decode="d1")
    pulling = PlacementRequest(1000, 1128, 128, prefix_pull=True)
    assert policy.place(pulling, state) == Placement(prefill="p1", decode="d1")
    # Local prefill on d1 computes as little as p1 after its pull, with no transfer either way: d1 does it.
    local = create_policy("kv", local_prefill_tokens=256)
    assert local.place(pulling, state) == Placement(colocated="d1", borrowed=True)


def test_kv_with_prefix_pulls_prefers_the_prefill_node_holding_more_itself_at_equal_work() -> None:
    state = roles(prefill=[N("p0"), N("p1", cached=600)], decode=[N("d0", cached=900)])
    pulling = PlacementRequest(1000, 1128, 128, prefix_pull=True)
    assert create_policy("kv").place(pulling, state) == Placement(prefill="p1", decode="d0")
