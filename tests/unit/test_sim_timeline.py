"""The simulator's timeline on cases small enough to work out by hand from the performance model.

Expected values are computed here from cluster.perfmodel.PerfModel over the shared perf_model.csv (BLOOM-176B, TP 8),
independently of the simulator's own memoised timers, and from the transfer rule in ops/sim/hardware.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cluster.machines import BUILTIN_MACHINES
from cluster.perfmodel import PerfModel
from ops.bench.workload import TraceRequest
from ops.sim import SimConfig, make_design, simulate
from ops.sim.hardware import MODELS

CSV = Path(__file__).resolve().parents[3] / "shared" / "data" / "splitwise-perf-model" / "perf_model.csv"
pytestmark = pytest.mark.skipif(not CSV.exists(), reason="shared perf_model.csv not present")
approx = pytest.approx
BLOOM_KV_BYTES = MODELS["bloom-176b"].kv_bytes_per_token
A100_LINK_BYTES_PER_S = 8 * 200e9 / 8  # 8 ports of 200 Gbps per DGX-A100, one instance at TP 8


@pytest.fixture(scope="module")
def a100() -> PerfModel:
    return PerfModel.from_csv(CSV, "bloom-176b", "a100-80gb", 8)


def config(**overrides: object) -> SimConfig:
    return SimConfig(CSV, **overrides)  # type: ignore[arg-type]


def test_a_request_alone_on_a_colocated_machine_takes_its_alone_latency(a100: PerfModel) -> None:
    result = simulate(make_design("baseline-a100", colocated=1), [TraceRequest(0.0, 1500, 40)], config())
    ttft, tbt = a100.prompt_time_s(1500), a100.token_time_s(1)
    assert result.ttft_s[0] == approx(ttft)
    assert result.tbt_s[0] == approx(tbt)
    assert result.e2e_s[0] == approx(ttft + 39 * tbt)
    assert all(row.slowdown == approx(1.0) for row in result.slo.rows)
    assert result.prefill_node == result.decode_node == ["colocated-0"]


def test_the_serving_overhead_delays_the_prompt_and_counts_in_every_latency(a100: PerfModel) -> None:
    requests = [TraceRequest(0.0, 1500, 40), TraceRequest(0.01, 100, 5)]
    plain = simulate(make_design("baseline-a100", colocated=1), requests, config())
    slowed = simulate(make_design("baseline-a100", colocated=1), requests, config(request_overhead_s=0.05))
    assert slowed.ttft_s == approx(plain.ttft_s + 0.05)
    assert slowed.e2e_s == approx(plain.e2e_s + 0.05)
    assert slowed.tbt_s == approx(plain.tbt_s)
    with pytest.raises(ValueError, match="request_overhead_s"):
        config(request_overhead_s=-1.0)


def test_the_iteration_overhead_lengthens_every_decode_step(a100: PerfModel) -> None:
    design = make_design("baseline-a100", colocated=1)
    result = simulate(design, [TraceRequest(0.0, 1500, 40)], config(iteration_overhead_s=0.01))
    assert result.ttft_s[0] == approx(a100.prompt_time_s(1500))
    assert result.tbt_s[0] == approx(a100.token_time_s(1) + 0.01)


def test_a_short_prompt_sends_its_kv_after_the_prompt(a100: PerfModel) -> None:
    result = simulate(make_design("splitwise-aa", 1, 1), [TraceRequest(0.0, 300, 20)], config())
    ttft = a100.prompt_time_s(300)
    transfer = 300 * BLOOM_KV_BYTES / A100_LINK_BYTES_PER_S
    assert result.ttft_s[0] == approx(ttft)
    assert result.e2e_s[0] == approx(ttft + transfer + 19 * a100.token_time_s(1))
    assert (result.prefill_node, result.decode_node) == (["prefill-0"], ["decode-0"])


def test_a_long_prompt_hides_its_kv_transfer_behind_the_compute(a100: PerfModel) -> None:
    result = simulate(make_design("splitwise-aa", 1, 1), [TraceRequest(0.0, 1024, 20)], config())
    transfer = 1024 * BLOOM_KV_BYTES / A100_LINK_BYTES_PER_S
    assert transfer < a100.prompt_time_s(
        1024
    )  # the whole transfer fits in the compute: the A100 residual is left
    assert result.e2e_s[0] == approx(a100.prompt_time_s(1024) + 0.008 + 19 * a100.token_time_s(1))
    # With a slow link the part of the transfer that outlasts the compute shows.
    slow = simulate(make_design("splitwise-aa", 1, 1), [TraceRequest(0.0, 1024, 20)], config(link_gbps=50.0))
    slow_transfer = 1024 * BLOOM_KV_BYTES / (50e9 / 8)
    assert slow.e2e_s[0] == approx(slow_transfer + 19 * a100.token_time_s(1))


def test_prompts_that_fit_one_batch_share_it_and_the_rest_wait(a100: PerfModel) -> None:
    together = simulate(
        make_design("splitwise-aa", 1, 1), [TraceRequest(0.0, 1000, 5), TraceRequest(0.0, 1000, 5)], config()
    )
    assert together.ttft_s.tolist() == approx([a100.prompt_time_s(2000)] * 2)
    apart = simulate(
        make_design("splitwise-aa", 1, 1), [TraceRequest(0.0, 1500, 5), TraceRequest(0.0, 1000, 5)], config()
    )
    first = a100.prompt_time_s(1500)
    assert apart.ttft_s.tolist() == approx([first, first + a100.prompt_time_s(1000)])


def test_a_full_kv_cache_makes_the_next_request_wait_for_a_finish(a100: PerfModel) -> None:
    # 2 x 100 prompt tokens batch together; each request reserves 150 tokens of KV; 250 hold only one at a time,
    # while the router still sees room for the second prompt (250 - 100 >= 100) and places it.
    requests = [TraceRequest(0.0, 100, 50), TraceRequest(0.0, 100, 50)]
    design = make_design("splitwise-aa", 1, 1)
    tight = simulate(design, requests, config(kv_capacity_tokens=250))
    roomy = simulate(design, requests, config(kv_capacity_tokens=300))
    one, two = a100.token_time_s(1), a100.token_time_s(2)
    assert tight.ttft_s[0] == tight.ttft_s[1]
    assert tight.e2e_s[1] - tight.e2e_s[0] == approx(49 * one)
    assert roomy.e2e_s[1] == approx(roomy.e2e_s[0])
    assert roomy.e2e_s[0] - roomy.ttft_s[0] == approx(tight.e2e_s[0] - tight.ttft_s[0] - 49 * one + 49 * two)


def test_a_colocated_machine_runs_a_new_prompt_mixed_with_the_running_decode(a100: PerfModel) -> None:
    first_ttft, one = a100.prompt_time_s(500), a100.token_time_s(1)
    arrives = first_ttft + 2.5 * one  # mid-iteration: the prompt joins at the next boundary
    requests = [TraceRequest(0.0, 500, 10), TraceRequest(arrives, 400, 30)]
    result = simulate(make_design("baseline-a100", colocated=1), requests, config())
    boundary = first_ttft + 3 * one
    mixed = a100.mixed_time_s(400, 1)
    assert result.ttft_s[1] == approx(boundary + mixed - arrives)
    # The first request got tokens 2-4 alone, its 5th in the mixed batch, the last 5 alongside the second one.
    assert result.e2e_s[0] == approx(boundary + mixed + 5 * a100.token_time_s(2))


def test_an_idle_machine_costs_its_price_and_draws_idle_power(a100: PerfModel) -> None:
    result = simulate(make_design("baseline-a100", colocated=3), [TraceRequest(0.0, 800, 30)], config())
    a100_box = BUILTIN_MACHINES["dgx-a100"]
    duration = result.e2e_s[0]
    prompt_s, token_s = a100.prompt_time_s(800), 29 * a100.token_time_s(1)
    assert result.duration_s == approx(duration)
    assert result.cost_usd == approx(3 * a100_box.cost_per_hour * duration / 3600)
    assert a100.average_power_fraction is not None  # the CSV measures power on A100
    token_w = a100.average_power_fraction * a100_box.rated_power_w
    busy = a100_box.max_power_w * prompt_s + token_w * token_s
    assert result.energy_j == approx(2 * a100_box.idle_power_w * duration + busy)
    assert result.throughput_rps == approx(1 / duration)
    assert result.tokens_per_s == approx(30 / duration)


@pytest.mark.parametrize("design", ["splitwise-aa", "baseline-a100"])
def test_a_one_token_request_finishes_with_its_prompt_and_frees_its_kv(design: str, a100: PerfModel) -> None:
    counts = {"prefill": 1, "decode": 1} if design == "splitwise-aa" else {"colocated": 1}
    # KV for one request at a time: the second can only be placed once the first has let its KV go.
    requests = [TraceRequest(0.0, 300, 1), TraceRequest(0.0, 300, 1)]
    result = simulate(make_design(design, **counts), requests, config(kv_capacity_tokens=400))
    first = a100.prompt_time_s(300)
    assert result.e2e_s[0] == result.ttft_s[0] == approx(first)
    assert result.e2e_s[1] == approx(2 * first)
    assert np.isnan(result.tbt_s).all()
