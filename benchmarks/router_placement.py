"""Placement decisions/s and p99 decision time with 1,000 registered nodes, on one core, for every policy.

Measures what the router does per request on its hot path: refresh the placement index from the view (rebuilt at
most every 5 ms under churn), correct it with this router's unreported picks, then run the policy. The baseline, measured in the same run, is the one thing the router
avoids by keeping an in-memory view: a single Redis round trip (GET of one node's load) per decision.

    python benchmarks/router_placement.py [--nodes 1000] [--decisions 20000]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.machines import BUILTIN_MACHINES
from cluster.perfmodel import PerfModel
from cluster.redis_server import EmbeddedRedis
from cluster.state import LoadReport, NodeInfo, NodeState, connect
from router.cluster_index import ClusterIndex
from router.load_tracker import LoadTracker
from router.policies import create_policy
from router.policy import PlacementRequest

PERF_CSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "splitwise-perf-model" / "perf_model.csv"
FLEET = {"dgx-a100": "a100-80gb", "dgx-h100": "h100-80gb", "dgx-h100-cap": "h100-80gb-pcap"}
POLICIES = {"jsq": {}, "cost": {}, "power": {"budget_w": 2_000_000.0}, "mixed": {}}


def synthetic_nodes(n: int, seed: int) -> list[NodeState]:
    """A mixed fleet: machine types and BLOOM-176B latency lines from the shipped perf model, random loads."""
    rng = random.Random(seed)
    summaries = {m: PerfModel.from_csv(PERF_CSV, "bloom-176b", hw, 8).summary() for m, hw in FLEET.items()}
    states = []
    for i in range(n):
        role = "prefill" if i % 2 == 0 else "decode"
        machine = BUILTIN_MACHINES[rng.choice(list(FLEET))]
        info = NodeInfo(f"{role}-{i}", role, f"10.0.{i // 250}.{i % 250}:50051", "m", machine.name, 4096, 16,
                        cost_per_hour=machine.cost_per_hour, idle_power_w=machine.idle_power_w,
                        max_power_w=machine.max_power_w, perf=summaries[machine.name].as_tuple())  # fmt: skip
        load = LoadReport(
            info.node_id, rng.randrange(0, 8000), rng.randrange(0, 64), rng.randrange(0, 4096), 4096,
            power_w=rng.uniform(machine.idle_power_w, machine.max_power_w),
        )  # fmt: skip
        states.append(NodeState(info, load, "g"))
    return states


def time_decisions(states: list[NodeState], decisions: int, policy_name: str = "jsq") -> list[float]:
    """Each decision sees a fresh view snapshot (as under constant load-report churn) and re-reads it."""
    policy, tracker, index = (
        create_policy(policy_name, **POLICIES[policy_name]),
        LoadTracker(),
        ClusterIndex(),
    )
    rng = random.Random(1)
    durations = []
    picked_node: dict[int, str] = {}
    for i in range(decisions):
        request = PlacementRequest(
            prompt_tokens=rng.randrange(16, 4096), max_total_tokens=4096, ttft_slo_s=2.0, tbt_slo_s=0.08
        )
        snapshot = tuple(states)  # a new object each time, as the view hands out after any change
        started = time.perf_counter()
        index.update(snapshot)
        placement = policy.place(request, index.for_request(tracker))
        durations.append(time.perf_counter() - started)
        if placement and placement.prefill:
            tracker.picked(placement.prefill, f"r{i}", request.prompt_tokens, 0)
            picked_node[i] = placement.prefill
        if i - 64 in picked_node:  # keep ~64 requests in their prompt phase, as under steady load
            tracker.done(picked_node.pop(i - 64), f"r{i - 64}")
    return durations


def time_redis_round_trips(count: int) -> list[float]:
    with EmbeddedRedis() as redis_server:
        client = connect(redis_server.url)
        client.set("splitserve:bench:load", b"x" * 160)
        durations = []
        for _ in range(count):
            started = time.perf_counter()
            client.get("splitserve:bench:load")
            durations.append(time.perf_counter() - started)
        client.close()
    return durations


def summary(name: str, durations: list[float]) -> dict[str, object]:
    ordered = sorted(durations)
    return {
        "measure": name,
        "per_s": len(durations) / sum(durations),
        "p50_us": statistics.median(ordered) * 1e6,
        "p99_us": ordered[int(0.99 * (len(ordered) - 1))] * 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--decisions", type=int, default=20000)
    args = parser.parse_args()
    nodes = synthetic_nodes(args.nodes, 0)
    baseline = summary(
        "one Redis GET per decision (baseline)", time_redis_round_trips(min(args.decisions, 5000))
    )
    print(json.dumps(baseline))
    for name in POLICIES:
        ours = summary(
            f"placement, policy {name} (in-memory view)", time_decisions(nodes, args.decisions, name)
        )
        ratio = ours["per_s"] / baseline["per_s"]  # type: ignore[operator]
        print(json.dumps({"nodes": args.nodes, **ours, "ratio_over_redis_round_trip": ratio}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
