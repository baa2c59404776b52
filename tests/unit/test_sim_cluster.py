"""Simulations of whole clusters: the router's policies place, SLOs pass or fail with load, bad input is refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cluster.machines import BUILTIN_MACHINES
from cluster.perfmodel import PerfModel
from ops.bench.workload import TraceRequest, load_azure_trace
from ops.sim import ClusterDesign, Pool, SimConfig, make_design, simulate
from ops.sim.hardware import kv_capacity_tokens

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
CSV = DATA / "splitwise-perf-model" / "perf_model.csv"
CONV = DATA / "azure-llm-inference-2023" / "conv.csv"
pytestmark = pytest.mark.skipif(not (CSV.exists() and CONV.exists()), reason="shared data not present")


def test_placements_follow_the_routers_join_the_shortest_queue() -> None:
    # JSQ: the prefill node with the fewest pending prompt tokens, the decode node with the most free KV (each
    # placement takes its prompt's worth). All four arrive at once, so no prompt has started when the next comes.
    requests = [TraceRequest(0.0, p, 8) for p in (300, 100, 250, 50)]
    result = simulate(make_design("splitwise-aa", 2, 2), requests, SimConfig(CSV, policy="jsq"))
    assert result.prefill_node == ["prefill-0", "prefill-1", "prefill-1", "prefill-0"]
    assert result.decode_node == ["decode-0", "decode-1", "decode-1", "decode-0"]


def test_the_mixed_pool_policy_borrows_a_node_when_the_decode_pool_is_full() -> None:
    # One decode node with KV for one request: the second has nowhere to go but a borrowed prefill node.
    requests = [TraceRequest(0.0, 200, 100), TraceRequest(0.0, 200, 100)]
    config = SimConfig(CSV, policy="mixed", kv_capacity_tokens=350)
    result = simulate(make_design("splitwise-aa", 2, 1), requests, config)
    assert result.decode_node[0] == "decode-0"
    assert result.prefill_node[1] == result.decode_node[1] and result.prefill_node[1].startswith("prefill-")
    with_jsq = simulate(make_design("splitwise-aa", 2, 1), requests, SimConfig(CSV, kv_capacity_tokens=350))
    assert with_jsq.decode_node == ["decode-0", "decode-0"]  # jsq waits for the decode node instead
    assert with_jsq.e2e_s[1] > result.e2e_s[1]


def test_slos_hold_at_low_load_and_break_under_overload() -> None:
    requests = load_azure_trace(CONV, limit=300)
    calm = simulate(make_design("splitwise-aa", 4, 4), requests, SimConfig(CSV))
    assert calm.slo_passed and calm.slo.mode == "per_request" and calm.slo.compared == 300
    crowded = load_azure_trace(CONV, limit=300, time_scale=20.0)
    overloaded = simulate(make_design("splitwise-aa", 1, 1), crowded, SimConfig(CSV))
    assert not overloaded.slo_passed
    assert not next(r for r in overloaded.slo.rows if (r.metric, r.percentile) == ("ttft", 99)).ok
    assert overloaded.throughput_rps < 300 / (crowded[-1].arrival_s - crowded[0].arrival_s)


def test_every_request_completes_with_consistent_latencies() -> None:
    requests = load_azure_trace(CONV, limit=400, time_scale=5.0)
    result = simulate(make_design("splitwise-ha", 2, 2), requests, SimConfig(CSV))
    assert not any(math.isnan(v) for v in result.e2e_s)
    assert (result.ttft_s > 0).all() and (result.e2e_s >= result.ttft_s).all()
    single = result.output_tokens == 1
    assert np.isnan(result.tbt_s[single]).all() and np.isfinite(result.tbt_s[~single]).all()
    # Nothing runs faster than alone on its own hardware (H100 prompts, A100 decodes).
    h100 = PerfModel.from_csv(CSV, "bloom-176b", "h100-80gb", 8)
    alone_ttft = [h100.prompt_time_s(int(p)) for p in result.prompt_tokens]
    assert (result.ttft_s >= [t - 1e-9 for t in alone_ttft]).all()
    assert result.duration_s == pytest.approx(float((result.arrival_s + result.e2e_s).max()))
    document = json.loads(json.dumps(result.to_dict()))  # JSON-safe
    assert document["requests"] == 400 and len(document["per_request"]["decode_node"]) == 400


def test_a_dgx_holds_eight_over_tp_instances() -> None:
    requests = [TraceRequest(0.0, 512, 8) for _ in range(8)]
    config = SimConfig(CSV, model="llama2-70b", tensor_parallel=2)
    result = simulate(make_design("baseline-h100", colocated=1), requests, config)
    assert sorted(set(result.prefill_node)) == [f"colocated-0.{j}" for j in range(4)]
    assert result.cost_per_hour == pytest.approx(BUILTIN_MACHINES["dgx-h100"].cost_per_hour)
    # 2 x 80 GB x 0.9 - 140 GB of weights leaves 4 GB of KV per instance, at 2 x 80 layers x 1024 x 2 bytes a token.
    expected = int((0.9 * 160e9 - 140e9) // (2 * 80 * 1024 * 2))
    assert kv_capacity_tokens("llama2-70b", BUILTIN_MACHINES["dgx-h100"], 2) == expected


def test_a_cpu_cluster_runs_on_given_kv_capacity_and_link(tmp_path: Path) -> None:
    perf = tmp_path / "cpu.csv"
    rows = [
        line
        for line in CSV.read_text().splitlines()
        if "llama2-70b,a100-80gb," in line and line.endswith(",8")
    ]
    header = CSV.read_text().splitlines()[0]
    # The A100 rows renamed as a CPU profile of a "tiny" model at TP 1, as `splitserve profile` would label them.
    renamed = [r.replace("llama2-70b,a100-80gb", "tiny,cpu").removesuffix(",8") + ",1" for r in rows]
    perf.write_text("\n".join([header, *renamed]) + "\n")
    design = ClusterDesign("custom", prefill=Pool("cpu", 1), decode=Pool("cpu", 1))
    config = SimConfig(
        perf, model="tiny", tensor_parallel=1, reference_hardware="cpu", kv_capacity_tokens=4096,
        link_gbps=10.0, kv_bytes_per_token=4096,
    )  # fmt: skip
    result = simulate(design, [TraceRequest(0.0, 600, 4), TraceRequest(0.5, 300, 2)], config)
    assert result.slo_passed and result.decode_node == ["decode-0", "decode-0"]
    unsized = SimConfig(perf, model="tiny", tensor_parallel=1, reference_hardware="cpu")
    with pytest.raises(ValueError, match="no size known for model 'tiny'"):
        simulate(design, [TraceRequest(0.0, 600, 4)], unsized)


@pytest.mark.parametrize(
    ("design", "requests", "config", "message"),
    [
        (make_design("baseline-a100", colocated=1), [], {}, "no requests"),
        (make_design("baseline-a100", colocated=1), [TraceRequest(0.0, 10, 5)], {"model": "gpt-9"},
         "no measurements for gpt-9/a100-80gb/tp8; available: bloom-176b"),
        (ClusterDesign("custom", colocated=Pool("dgx-z", 1)), [TraceRequest(0.0, 10, 5)], {},
         "unknown machine type 'dgx-z'"),
        (make_design("baseline-a100", colocated=1), [TraceRequest(0.0, 10, 5)], {"policy": "fastest"},
         "unknown placement policy 'fastest'"),
        (make_design("baseline-a100", colocated=1), [TraceRequest(0.0, 3000, 100)], {"kv_capacity_tokens": 2000},
         "request 0 needs KV for 3100 tokens"),
        (make_design("baseline-a100", colocated=1), [TraceRequest(0.0, 10, 5)], {"reference_hardware": "tpu"},
         "no measurements for bloom-176b/tpu/tp8"),
    ],
)  # fmt: skip
def test_bad_input_is_a_value_error_naming_it(
    design: ClusterDesign, requests: list[TraceRequest], config: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        simulate(design, requests, SimConfig(CSV, **config))  # type: ignore[arg-type]


def test_a_malformed_perf_csv_is_a_value_error(tmp_path: Path) -> None:
    broken = tmp_path / "perf.csv"
    broken.write_text(CSV.read_text().splitlines()[0] + "\nbloom-176b,a100-80gb,512,one,128,1,1,1,1,1,8\n")
    with pytest.raises(ValueError, match="line 2"):
        simulate(make_design("baseline-a100", colocated=1), [TraceRequest(0.0, 10, 5)], SimConfig(broken))
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="missing column"):
        simulate(make_design("baseline-a100", colocated=1), [TraceRequest(0.0, 10, 5)], SimConfig(empty))
