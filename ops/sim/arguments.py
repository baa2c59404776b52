"""The flags of `splitserve simulate`, apart from its implementation so that building the CLI parser stays light."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ops.sim.config import FIDELITIES
from ops.sim.design import DESIGNS
from router.policies import add_policy_arguments, parse_policy_options


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """The trace and the performance model: what `simulate` and `plan` both read."""
    parser.add_argument(
        "--trace",
        type=Path,
        required=True,
        help="Azure LLM inference trace CSV (TIMESTAMP,ContextTokens,...)",
    )
    parser.add_argument(
        "--perf-model",
        type=Path,
        required=True,
        help="perf_model.csv (Splitwise's) or one `splitserve profile` wrote",
    )
    parser.add_argument("--model", default="bloom-176b", help="the perf CSV's model (default bloom-176b)")
    parser.add_argument(
        "--tp", type=int, default=8, help="tensor parallelism: GPUs per model instance (default 8)"
    )
    parser.add_argument(
        "--fidelity",
        choices=FIDELITIES,
        default="splitserve",
        help="splitserve (default): our model of a cluster; splitwise-sim: the way Microsoft's SplitwiseSim models "
        "it (its batching, perf interpolation, memory, KV transfer, schedulers and latency definitions; no --policy)",
    )


def add_link_and_kv_arguments(group: argparse._ActionsContainer) -> None:
    """Machine-model overrides that `simulate` and `plan` share."""
    group.add_argument("--kv-capacity-tokens", type=int, default=None, help="KV tokens per machine")
    group.add_argument(
        "--link-gbps", type=float, default=None, help="KV transfer bandwidth per machine, Gbps"
    )


def shared_config(args: argparse.Namespace) -> dict[str, Any]:
    """SimConfig fields from the flags `simulate` and `plan` share (the three add_* functions above, and the
    policy flags); ValueError for a malformed policy option."""
    return {
        "perf_csv": args.perf_model,
        "model": args.model,
        "tensor_parallel": args.tp,
        "policy": args.policy,
        "policy_options": parse_policy_options(args.policy_option),
        "kv_capacity_tokens": args.kv_capacity_tokens,
        "link_gbps": args.link_gbps,
        "fidelity": args.fidelity,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_input_arguments(parser)
    cluster = parser.add_argument_group("cluster (a named --design, or pool types of the machine catalog)")
    cluster.add_argument("--design", default=None, help=f"one of: {', '.join(DESIGNS)}")
    cluster.add_argument("--prefill", type=int, default=0, help="prefill (prompt) machines")
    cluster.add_argument("--decode", type=int, default=0, help="decode (token) machines")
    cluster.add_argument("--colocated", type=int, default=0, help="colocated machines (both phases)")
    cluster.add_argument(
        "--prefill-type", default=None, help="machine type of the prefill pool (no --design)"
    )
    cluster.add_argument("--decode-type", default=None, help="machine type of the decode pool (no --design)")
    cluster.add_argument(
        "--colocated-type", default=None, help="machine type of a colocated pool (no --design)"
    )
    cluster.add_argument(
        "--machines",
        type=Path,
        default=None,
        help='machine catalog JSON {"machines": [...]} added to the built-ins',
    )
    add_policy_arguments(parser.add_argument_group("placement"))
    load = parser.add_argument_group("workload")
    load.add_argument("--start", type=int, default=0, help="first trace row (0-based)")
    load.add_argument("--limit", type=int, default=None, help="at most this many requests")
    load.add_argument("--time-scale", type=float, default=1.0, help="replay the trace this many times faster")
    load.add_argument("--token-scale", type=float, default=1.0, help="multiply the trace's token counts")
    load.add_argument("--max-context", type=int, default=None, help="clip prompt + output to this context")
    machine = parser.add_argument_group("machine model")
    add_link_and_kv_arguments(machine)
    machine.add_argument(
        "--kv-bytes-per-token", type=int, default=None, help="for models without a size entry"
    )
    machine.add_argument(
        "--request-overhead-ms",
        type=float,
        default=0.0,
        help="the serving system's latency per request before its prompt starts (placement, RPCs)",
    )
    machine.add_argument(
        "--iteration-overhead-ms",
        type=float,
        default=0.0,
        help="the serving system's time per decode iteration beyond the engine step (token streaming)",
    )
    machine.add_argument("--max-batch-tokens", type=int, default=2048, help="prompt tokens per prefill batch")
    machine.add_argument("--max-batch-size", type=int, default=512, help="sequences per decode batch")
    machine.add_argument(
        "--reference-hardware",
        default="a100-80gb",
        help="SLO slowdowns are vs the request alone on this hardware",
    )
    out = parser.add_argument_group("output")
    out.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    out.add_argument(
        "--requests-csv", type=Path, default=None, help="per-request CSV in `splitserve bench`'s format"
    )
