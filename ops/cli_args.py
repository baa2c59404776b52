"""The flags of the server commands (prefill, decode, colocated, router, up), the flag types every command shares,
and the helpers that read flags back: a checked value (cluster token, OTLP endpoint) or the words `up` passes on.

The groups shared by several commands (Redis URL, cluster token, placement, load shedding, tracing) are defined once
here, so a node, a router and `up` spell and document them the same way.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

EXIT_USAGE = 2
REDIS_URL_ENV = "SPLITSERVE_REDIS_URL"


def add_node_args(parser: argparse.ArgumentParser) -> None:
    """The flags of `prefill`, `decode` and `colocated`."""
    parser.add_argument("--model", type=Path, required=True)
    add_redis_url_arg(parser)
    parser.add_argument("--node-id", default=None)
    add_host_args(parser)
    parser.add_argument("--port", type=port_number, default=0, help="gRPC port (0: any free port)")
    parser.add_argument(
        "--metrics-port",
        type=port_number,
        default=0,
        help="Prometheus GET /metrics port on --host (0: any free port)",
    )
    parser.add_argument("--kv-backend", choices=["nixl", "torch"], default="torch")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--kv-cache-mb", type=positive_int, default=256)
    parser.add_argument("--max-batched-tokens", type=positive_int, default=512)
    parser.add_argument("--max-seqs", type=positive_int, default=64)
    parser.add_argument(
        "--tensor-parallel", type=positive_int, default=1, metavar="N",
        help="split the model over N processes (each rank gets --threads threads)",
    )  # fmt: skip
    parser.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="recompute (prefill) and receive (decode) every prompt block, as Splitwise does",
    )
    parser.add_argument(
        "--machine-type", default="cpu", help="a name from the machine catalog: cost, power (default: cpu)"
    )
    parser.add_argument(
        "--machines",
        type=Path,
        default=None,
        help='a JSON machine catalog {"machines": [...]} added to the built-ins',
    )
    parser.add_argument(
        "--perf-model",
        type=Path,
        default=None,
        help="a perf_model.csv: the latency model this node registers",
    )
    parser.add_argument(
        "--perf-group", default=None, help="MODEL/HARDWARE/TP in --perf-model (default: its only group)"
    )
    parser.add_argument(
        "--power-cap-w",
        default=None,
        metavar="W|recommend",
        help="power cap per GPU in watts, or `recommend`: the lowest cap the node's SLO slack allows",
    )
    parser.add_argument(
        "--power-cap-target-s",
        type=float,
        default=None,
        help="recommend: the latency target (TBT on decode nodes, TTFT otherwise; default: Splitwise's P50 SLO)",
    )
    parser.add_argument(
        "--power-cap-apply",
        action="store_true",
        help="set the cap through NVML (default: a dry run that logs the NVML calls it would make)",
    )
    parser.add_argument("--drain-timeout", type=float, default=30.0)
    parser.add_argument(
        "--stall-timeout-s",
        type=stall_seconds,
        default=2.0,
        help="leave the cluster while one engine step or the event loop is stuck longer than this; raise it for "
        "models whose single step takes longer (a large model on CPU)",
    )
    add_cluster_token_args(parser)
    add_tracing_arg(parser)
    parser.add_argument(
        "--kv-transfer-timeout-s",
        type=positive_float,
        default=30.0,
        help="a KV write not landed within this fails (prefill: the request is retried elsewhere; decode: how long "
        "a failed transfer's blocks stay quarantined)",
    )
    parser.add_argument(
        "--no-kv-rank-to-rank",
        dest="kv_rank_to_rank",
        action="store_false",
        help="at --tensor-parallel above 1: exchange KV only through rank 0's whole-heads pool, also with peers of "
        "the same degree (default: each rank writes its own heads to the peer rank holding them)",
    )
    parser.add_argument(
        "--one-piece-below",
        type=int,
        default=512,
        help="prefill: send the KV of prompts shorter than this many tokens in one piece (0: always layer by layer)",
    )


def add_host_args(parser: argparse.ArgumentParser) -> None:
    """--host (where the server listens) and --advertise-host (the address it gives others to dial)."""
    parser.add_argument("--host", default="127.0.0.1", help="listen on this address (0.0.0.0: every one)")
    parser.add_argument(
        "--advertise-host",
        default=None,
        help="the address routers and peers dial (default: --host); the KV transport listens on it alone",
    )


def advertised_host(args: argparse.Namespace) -> str:
    """The address a server publishes (cluster/addresses.py); ValueError for a wildcard --host without one."""
    from cluster.addresses import advertised_host as resolve

    return resolve(args.host, args.advertise_host)


def add_router_args(parser: argparse.ArgumentParser) -> None:
    """The flags of `router`."""
    parser.add_argument(
        "--model", type=Path, required=True, help="the served model's directory (for its tokenizer)"
    )
    add_redis_url_arg(parser)
    add_host_args(parser)
    parser.add_argument("--grpc-port", type=port_number, default=50051)
    parser.add_argument("--http-port", type=port_number, default=8000, help="OpenAI-compatible HTTP endpoint")
    parser.add_argument(
        "--api-key", default=None, help="require this bearer token (default: $SPLITSERVE_API_KEY)"
    )
    add_placement_args(parser)
    add_admission_args(parser)
    add_cluster_token_args(parser)
    add_tracing_arg(parser)


def add_up_args(parser: argparse.ArgumentParser) -> None:
    """The flags of `up`; placement and load shedding pass on to its routers (placement_flags, admission_flags)."""
    parser.add_argument(
        "--model", type=Path, default=None, help="model directory (default: a tiny demo model)"
    )
    parser.add_argument("--prefill", type=int, default=1)
    parser.add_argument("--decode", type=int, default=1)
    parser.add_argument("--colocated", type=int, default=0)
    parser.add_argument(
        "--redis-url", default=None, help="an external Redis (default: an embedded one on loopback)"
    )
    parser.add_argument("--kv-backend", choices=["nixl", "torch"], default="torch")
    parser.add_argument("--grpc-port", type=port_number, default=50051)
    parser.add_argument("--http-port", type=port_number, default=8000)
    parser.add_argument("--api-key", default=None, help="require this bearer token on the router's endpoints")
    parser.add_argument("--threads-per-node", type=positive_int, default=1)
    parser.add_argument(
        "--tensor-parallel", type=positive_int, default=1, metavar="N",
        help="ranks every node splits the model over (the --ROLE-tensor-parallel flags override it per pool)",
    )  # fmt: skip
    for role in ("prefill", "decode", "colocated"):
        parser.add_argument(
            f"--{role}-machine-type",
            default=None,
            help=f"machine type of the {role} nodes (price and power model; default: cpu)",
        )
        parser.add_argument(
            f"--{role}-tensor-parallel", type=positive_int, default=None, metavar="N",
            help=f"ranks each {role} node splits the model over (default: --tensor-parallel)",
        )  # fmt: skip
    parser.add_argument("--machines", default=None, help="a JSON catalog of user machine types")
    add_placement_args(parser)
    add_admission_args(parser)
    add_cluster_token_args(parser, generated=True)


def add_placement_args(parser: argparse.ArgumentParser) -> None:
    from router.policies import add_policy_arguments

    group = parser.add_argument_group("placement")
    add_policy_arguments(group)
    group.add_argument(
        "--slo-ttft-ms", type=float, default=None, help="TTFT target placement must predict within"
    )
    group.add_argument(
        "--slo-tbt-ms", type=float, default=None, help="TBT target placement must predict within"
    )
    group.add_argument(
        "--no-prefix-pull", dest="prefix_pull", action="store_false",
        help="prefill nodes compute prompt blocks they lack even when the chosen decode node caches them "
        "(by default it writes them back: prefill_node/prefix_pull.py)",
    )  # fmt: skip


def add_admission_args(parser: argparse.ArgumentParser) -> None:
    """The router's load-shedding and request-reading limits (router/admission.py, router/http_body.py)."""
    group = parser.add_argument_group("load shedding")
    group.add_argument(
        "--max-concurrent-requests", type=positive_int, default=256,
        help="requests running on the nodes at once; more wait in the queue (an OpenAI request counts n)",
    )  # fmt: skip
    group.add_argument(
        "--max-queued-requests", type=int, default=512,
        help="requests waiting for a slot; beyond it: HTTP 429 with Retry-After, gRPC RESOURCE_EXHAUSTED",
    )  # fmt: skip
    group.add_argument(
        "--queue-timeout-s", type=float, default=30.0, help="longest wait for a slot before a 429"
    )
    group.add_argument(
        "--body-timeout-s",
        type=float,
        default=10.0,
        help="an HTTP request body must arrive within this (408)",
    )
    group.add_argument(
        "--tokenizer-threads", type=positive_int, default=2, help="threads tokenizing long prompts"
    )
    parser.add_argument(
        "--cors-allow-origin", action="append", default=[], metavar="ORIGIN",
        help="an origin browsers may call the HTTP endpoint from (e.g. https://ui.example.com, or *); repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--tool-call-parser", choices=["auto", "hermes", "llama3"], default="auto",
        help="how the model writes tool calls: hermes (<tool_call> JSON, Qwen and Hermes), llama3 (bare JSON); "
        "auto: as the chat template shows it",
    )  # fmt: skip


def admission_flags(args: argparse.Namespace) -> list[str]:
    """The load-shedding and HTTP flags, for `up` to pass on to its routers."""
    flags = []
    for name in ("max_concurrent_requests", "max_queued_requests", "queue_timeout_s", "body_timeout_s",
                 "tokenizer_threads"):  # fmt: skip
        flags += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    for origin in args.cors_allow_origin:
        flags += ["--cors-allow-origin", origin]
    return [*flags, "--tool-call-parser", args.tool_call_parser]


def placement_flags(args: argparse.Namespace) -> list[str]:
    """The placement flags as given, for `up` to pass on to its routers."""
    flags = ["--policy", args.policy]
    for option in args.policy_option:
        flags += ["--policy-option", option]
    for name in ("slo_ttft_ms", "slo_tbt_ms"):
        if getattr(args, name) is not None:
            flags += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return flags if args.prefix_pull else [*flags, "--no-prefix-pull"]


def add_redis_url_arg(parser: argparse.ArgumentParser) -> None:
    """--redis-url, or $SPLITSERVE_REDIS_URL: a URL with a password belongs in the environment, not in argv."""
    parser.add_argument(
        "--redis-url",
        default=os.environ.get(REDIS_URL_ENV),
        required=not os.environ.get(REDIS_URL_ENV),
        help=f"Redis holding cluster state, redis:// or rediss:// (default: ${REDIS_URL_ENV}; splitserve up "
        "starts one)",
    )


def add_cluster_token_args(parser: argparse.ArgumentParser, *, generated: bool = False) -> None:
    """The cluster token (cluster/auth.py): nodes require it on every internal call, routers send it."""
    default = "a fresh random one" if generated else "none: nodes take every caller"
    group = parser.add_argument_group("cluster membership")
    token = group.add_mutually_exclusive_group()
    token.add_argument(
        "--cluster-token",
        default=None,
        help=f"the cluster's shared secret; argv is visible in `ps`: prefer the file or $SPLITSERVE_CLUSTER_TOKEN "
        f"(default: $SPLITSERVE_CLUSTER_TOKEN, else {default})",
    )
    token.add_argument(
        "--cluster-token-file",
        type=Path,
        default=None,
        help="read the cluster token from this file (a Secret)",
    )


def cluster_token(args: argparse.Namespace) -> str | None:
    """The cluster token from the flags or environment; ClusterTokenError (a ValueError) for a bad file."""
    from cluster.auth import resolve_token

    return resolve_token(args.cluster_token, args.cluster_token_file)


def stall_seconds(text: str) -> float:
    from cluster.node.progress_watch import TICK_S

    value = float(text)
    if not value > TICK_S:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be more than {TICK_S} s")
    return value


def port_number(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in 0..65535, got {value}")
    return value


def add_tracing_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--otlp-endpoint",
        default=None,
        metavar="URL",
        help="export OpenTelemetry traces over OTLP/gRPC, e.g. http://127.0.0.1:4317 "
        "(default: $OTEL_EXPORTER_OTLP_ENDPOINT; neither: tracing off)",
    )


def otlp_endpoint(args: argparse.Namespace) -> str | None:
    """The checked OTLP endpoint (flag or environment); ValueError for one the exporter cannot use."""
    from cluster.tracing import endpoint_from

    return endpoint_from(args.otlp_endpoint)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value
