"""`splitserve simulate`: replay a trace on a simulated cluster and print latency, SLOs, throughput, cost, energy.

    splitserve simulate --trace conv.csv --perf-model perf_model.csv --design splitwise-hh --prefill 35 --decode 5
    splitserve simulate --trace conv.csv --perf-model perf_model.csv --design baseline-a100 --colocated 70
    splitserve simulate --trace t.csv --perf-model cpu.csv --model tiny --tp 1 --prefill-type cpu --prefill 1 \\
        --decode-type cpu --decode 1 --kv-capacity-tokens 65536 --link-gbps 10 --reference-hardware cpu

Bad input (a missing, malformed or empty trace, perf CSV or catalog, an unknown design, machine type or policy, a
request that cannot fit) prints one line, `splitserve simulate: error: ...`, and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from cluster.machines import load_catalog
from ops.bench.report import write_request_csv
from ops.bench.samples import RequestSample
from ops.bench.workload import TraceRequest, load_azure_trace
from ops.cli_errors import require_file
from ops.sim.arguments import shared_config
from ops.sim.config import SimConfig
from ops.sim.design import ClusterDesign, Pool, make_design
from ops.sim.result import SimResult
from ops.sim.simulator import simulate
from ops.sim.splitwise_sim.trace import is_splitwise_sim_trace, load_splitwise_sim_trace

EXIT_USAGE = 2


def main(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, OSError) as exc:
        message = " ".join(str(exc).split())
        print(f"splitserve simulate: error: {message}", file=sys.stderr)
        return EXIT_USAGE


def _run(args: argparse.Namespace) -> int:
    inputs = {"--trace": args.trace, "--perf-model": args.perf_model, "--machines": args.machines}
    for flag, path in inputs.items():
        require_file(path, flag)
    design = design_from_args(args)
    config = SimConfig(
        **shared_config(args),
        catalog=load_catalog(args.machines),
        reference_hardware=args.reference_hardware,
        max_batch_tokens=args.max_batch_tokens,
        max_batch_size=args.max_batch_size,
        request_overhead_s=args.request_overhead_ms / 1000.0,
        iteration_overhead_s=args.iteration_overhead_ms / 1000.0,
        kv_bytes_per_token=args.kv_bytes_per_token,
    )
    requests = read_trace(args)
    result = simulate(design, requests, config)
    print("\n".join(result.summary_lines()))
    if args.output:
        _write_json(args.output, result, args)
    if args.requests_csv:
        write_request_csv(args.requests_csv, request_samples(result))
    return 0


def read_trace(args: argparse.Namespace) -> list[TraceRequest]:
    """The --trace rows asked for: an Azure trace, or one in SplitwiseSim's format (told apart by the header)."""
    if not is_splitwise_sim_trace(args.trace):
        return load_azure_trace(args.trace, time_scale=args.time_scale, token_scale=args.token_scale,
                                max_context=args.max_context, limit=args.limit, start=args.start)  # fmt: skip
    for flag, value, default in (
        ("--token-scale", args.token_scale, 1.0),
        ("--max-context", args.max_context, None),
    ):
        if value != default:
            raise ValueError(f"{flag} applies to Azure traces only; {args.trace} is in SplitwiseSim's format")
    return load_splitwise_sim_trace(
        args.trace, time_scale=args.time_scale, limit=args.limit, start=args.start
    )


def design_from_args(args: argparse.Namespace) -> ClusterDesign:
    types = {"prefill": args.prefill_type, "decode": args.decode_type, "colocated": args.colocated_type}
    counts = {"prefill": args.prefill, "decode": args.decode, "colocated": args.colocated}
    if args.design is not None:
        given = [f"--{role}-type" for role, name in types.items() if name is not None]
        if given:
            raise ValueError(f"--design {args.design} fixes the machine types; drop {', '.join(given)}")
        return make_design(args.design, **counts)
    if not any(types.values()):
        raise ValueError("give --design NAME, or --prefill-type and --decode-type (or --colocated-type)")
    pools: dict[str, Pool | None] = {}
    for role, name in types.items():
        if name is None:
            if counts[role]:
                raise ValueError(f"--{role} {counts[role]} needs --{role}-type")
            pools[role] = None
        elif counts[role] < 1:
            raise ValueError(f"--{role}-type {name} needs --{role} >= 1 machines")
        else:
            pools[role] = Pool(name, counts[role])
    return ClusterDesign("custom", **pools)


def request_samples(result: SimResult) -> list[RequestSample]:
    """The simulated requests as `splitserve bench` records them, e.g. to use a simulation as a bench baseline."""
    samples = []
    for i in range(len(result.arrival_s)):
        arrival, e2e, tbt = float(result.arrival_s[i]), float(result.e2e_s[i]), float(result.tbt_s[i])
        samples.append(
            RequestSample(
                index=i,
                start_s=arrival,
                end_s=arrival + e2e,
                prompt_tokens=int(result.prompt_tokens[i]),
                output_tokens=int(result.output_tokens[i]),
                ttft_s=float(result.ttft_s[i]),
                tpot_s=None if math.isnan(tbt) else tbt,
                e2e_s=e2e,
                tbt_max_s=None,  # the simulator advances decode in bulk: no per-token gaps
                arrivals=int(result.output_tokens[i]),
                server_ttft_s=None,
                error=None,
            )
        )
    return samples


def _write_json(path: Path, result: SimResult, args: argparse.Namespace) -> None:
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"}
    document = {"schema": "splitserve.simulate/1", "config": config, "result": result.to_dict()}
    path.write_text(json.dumps(document, indent=1) + "\n")
