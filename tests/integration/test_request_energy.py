"""Per-request energy and cost from a live split cluster: gRPC and HTTP usage, and the router's /metrics.

The prefill node runs as a dgx-h100 and the decode node as a dgx-a100 (different prices, so each phase's cost shows
which node charged it). This machine has no GPU, so both nodes' power is modeled from their engine's utilisation.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.machines import BUILTIN_MACHINES, MachineType
from engine.async_engine import AsyncEngine, StepTiming
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams
from ops.launcher import ClusterSpec, LocalCluster
from splitserve.v1 import inference_pb2 as pb
from tests.integration.cluster_client import generate

pytestmark = pytest.mark.timeout(300)
PREFILL, DECODE = BUILTIN_MACHINES["dgx-h100"], BUILTIN_MACHINES["dgx-a100"]
PHASE_MACHINE = {"prefill": PREFILL, "transfer": PREFILL, "decode": DECODE}
PROMPT = list(range(3, 43))


@pytest.fixture(scope="module")
def cluster(llama_dir: Path) -> Iterator[LocalCluster]:
    spec = ClusterSpec(
        model_dir=llama_dir,
        prefill=1,
        decode=1,
        grpc_port=0,
        http_port=0,
        role_args={"prefill": ["--machine-type", "dgx-h100"], "decode": ["--machine-type", "dgx-a100"]},
    )
    with LocalCluster(spec) as running:
        yield running


def timed_generate(cluster: LocalCluster, max_tokens: int) -> tuple[pb.Usage, float]:
    started = time.monotonic()
    result = asyncio.run(
        generate(cluster.router_address, PROMPT, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    )
    assert result.usage is not None and result.usage.completion_tokens == max_tokens
    return result.usage, time.monotonic() - started


def phase(charges: pb.ChargeBreakdown, name: str) -> tuple[float, float, float]:
    """(energy J, cost USD, machine seconds) of one phase."""
    return (
        getattr(charges, f"{name}_energy_joules"),
        getattr(charges, f"{name}_cost_usd"),
        getattr(charges, f"{name}_seconds"),
    )


def assert_consistent(usage: pb.Usage, wall_s: float) -> None:
    """Totals are the sum of the phases; each phase is its node's price x the machine time charged, at a power the
    node's machine type can draw; no node charged more time than the request took."""
    charges = usage.charges
    assert charges.power_source == "modeled"
    assert usage.energy_joules > 0 and usage.cost_usd > 0
    energies, costs, _ = zip(*(phase(charges, p) for p in PHASE_MACHINE), strict=True)
    assert sum(energies) == pytest.approx(usage.energy_joules, rel=1e-9)
    assert sum(costs) == pytest.approx(usage.cost_usd, rel=1e-9)
    for name, machine in PHASE_MACHINE.items():
        energy, cost, time_s = phase(charges, name)
        assert cost == pytest.approx(machine.cost_per_hour / 3600 * time_s, rel=1e-9, abs=1e-15)
        assert machine.idle_power_w * time_s * 0.999 <= energy <= machine.max_power_w * time_s * 1.001
    assert charges.prefill_seconds > 0 and charges.transfer_seconds > 0 and charges.decode_seconds > 0
    assert charges.prefill_seconds + charges.transfer_seconds <= wall_s
    assert charges.decode_seconds <= wall_s


def test_grpc_usage_carries_each_phases_energy_and_cost(cluster: LocalCluster) -> None:
    short, short_wall = timed_generate(cluster, max_tokens=3)
    long, long_wall = timed_generate(cluster, max_tokens=40)
    assert_consistent(short, short_wall)
    assert_consistent(long, long_wall)
    # 39 decode steps against 2: more machine time on the decode node, so more energy and cost there.
    assert long.charges.decode_energy_joules > short.charges.decode_energy_joules
    assert long.charges.decode_cost_usd > short.charges.decode_cost_usd


def test_http_usage_carries_energy_and_cost_streamed_or_not(cluster: LocalCluster, llama_dir: Path) -> None:
    client = openai.OpenAI(
        base_url=f"http://{cluster.http_address}/v1", api_key="x", max_retries=0, timeout=60
    )
    whole = client.completions.create(
        model=llama_dir.name, prompt=PROMPT, max_tokens=6, temperature=0.0, extra_body={"ignore_eos": True}
    )
    assert whole.usage is not None and whole.usage.model_extra is not None
    extra = whole.usage.model_extra
    charges = extra["charges"]
    assert extra["energy_joules"] > 0 and extra["cost_usd"] > 0 and charges["power_source"] == "modeled"
    phases = ("prefill", "transfer", "decode")
    assert sum(charges[f"{p}_energy_joules"] for p in phases) == pytest.approx(extra["energy_joules"])
    assert sum(charges[f"{p}_cost_usd"] for p in phases) == pytest.approx(extra["cost_usd"])
    chunks = list(
        client.chat.completions.create(
            model=llama_dir.name,
            messages=[{"role": "user", "content": "Hello"}],
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    assert usage is not None and usage.model_extra is not None
    assert usage.model_extra["energy_joules"] > 0 and usage.model_extra["charges"]["decode_cost_usd"] > 0


def scrape(cluster: LocalCluster) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(f"http://{cluster.http_address}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for got, v in samples.get(name, []) if labels.items() <= got.items())


def test_metrics_count_and_sum_what_requests_were_charged(cluster: LocalCluster) -> None:
    before = scrape(cluster)
    usages = [timed_generate(cluster, max_tokens=n)[0] for n in (2, 5)]
    after = scrape(cluster)
    for p in ("prefill", "transfer", "decode"):
        count = "splitserve:request_energy_joules_count"
        assert value(after, count, phase=p) - value(before, count, phase=p) == len(usages)
        energy = "splitserve:request_energy_joules_sum"
        added = value(after, energy, phase=p) - value(before, energy, phase=p)
        assert added == pytest.approx(sum(getattr(u.charges, f"{p}_energy_joules") for u in usages))
        cost = "splitserve:request_cost_usd_sum"
        added = value(after, cost, phase=p) - value(before, cost, phase=p)
        assert added == pytest.approx(sum(getattr(u.charges, f"{p}_cost_usd") for u in usages))
    power = {labels["role"]: (labels, watts) for labels, watts in after["splitserve:node_power_watts"]}
    assert set(power) == {"prefill", "decode"}
    for role, machine in (("prefill", PREFILL), ("decode", DECODE)):
        labels, watts = power[role]
        assert labels["machine_type"] == machine.name and labels["source"] == "modeled"
        assert_within_model(watts, machine)


def assert_within_model(watts: float, machine: MachineType) -> None:
    step = 0.01 * machine.max_power_w  # load reports round to 1% of the maximum
    assert machine.idle_power_w - step <= watts <= machine.max_power_w + step


def test_a_colocated_node_charges_prefill_and_decode_and_no_transfer(llama_dir: Path) -> None:
    machine = BUILTIN_MACHINES["dgx-h100-cap"]
    spec = ClusterSpec(
        model_dir=llama_dir,
        prefill=0,
        decode=0,
        colocated=1,
        grpc_port=0,
        http_port=0,
        role_args={"colocated": ["--machine-type", machine.name]},
    )
    with LocalCluster(spec) as colocated:
        usage, wall_s = timed_generate(colocated, max_tokens=8)
    charges = usage.charges
    assert charges.power_source == "modeled"
    assert (
        charges.prefill_seconds > 0
        and charges.decode_seconds > 0
        and charges.prefill_seconds + charges.decode_seconds <= wall_s
    )
    assert (charges.transfer_seconds, charges.transfer_energy_joules, charges.transfer_cost_usd) == (0, 0, 0)
    charged_s = charges.prefill_seconds + charges.decode_seconds
    assert usage.cost_usd == pytest.approx(machine.cost_per_hour / 3600 * charged_s, rel=1e-9)
    assert (
        machine.idle_power_w * charged_s * 0.999
        <= usage.energy_joules
        <= machine.max_power_w * charged_s * 1.001
    )


# ---- the engine's step report, in process ------------------------------------------------------------------------


class StepLog:
    def __init__(self) -> None:
        self.steps: list[StepTiming] = []

    def observe_step(self, step: StepTiming) -> None:
        self.steps.append(step)

    def tokens(self, kind: str, rid: str) -> int:
        return sum(getattr(s, f"{kind}_tokens").get(rid, 0) for s in self.steps)


def test_the_engine_reports_the_tokens_each_step_computed_for_each_request(llama_dir: Path) -> None:
    """Chunked prompts (a 64-token budget), concurrent decoding, and prefix-cache hits that nothing computed."""
    log = StepLog()
    engine = AsyncEngine(
        LLMEngine(llama_dir, EngineConfig(num_kv_blocks=64, max_num_batched_tokens=64)), step_observer=log
    )
    params = SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)
    prompts = {"a": list(range(3, 103)), "b": list(range(200, 230))}

    async def run(rid: str, prompt: list[int]) -> int:
        stream = await engine.generate(rid, prompt, params)
        outs = [out async for out in stream]
        return outs[-1].num_cached_prompt_tokens

    async def main() -> int:
        await asyncio.gather(*(run(rid, p) for rid, p in prompts.items()))
        return await run("again", prompts["a"])  # the same prompt: its full blocks come from the prefix cache

    try:
        cached = asyncio.run(main())
        preemptions = asyncio.run(engine.call(lambda e: e.stats().num_preemptions))
    finally:
        engine.shutdown()
    assert preemptions == 0 and cached == 96
    assert log.tokens("prompt", "a") == 100 and log.tokens("prompt", "b") == 30
    assert log.tokens("prompt", "again") == 100 - cached
    for rid in ("a", "b", "again"):
        assert log.tokens("decode", rid) == params.max_tokens - 1  # the first token comes with the prompt
    chunked = [s for s in log.steps if s.prompt_tokens.get("a")]
    assert len(chunked) >= 2 and all(s.wall_s > 0 for s in log.steps)
