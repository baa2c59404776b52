"""The `splitserve` command line. Each subcommand imports what it needs only when it runs, so `--help` is instant.

Errors a user can fix (bad flags, a bad model directory, bad sampling values) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    # The words as given: a node moving to another pool re-executes itself with them.
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    from engine.errors import EngineError

    try:
        return int(args.func(args))
    except EngineError as exc:
        print(f"splitserve {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitserve", description="Phase-split LLM serving (prefill/decode)."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    tiny = sub.add_parser(
        "make-tiny-model", help="write a random-weight Hugging Face checkpoint with a tokenizer"
    )
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--arch", choices=["llama", "qwen2", "qwen3", "mistral"], default="llama")
    tiny.add_argument("--layers", type=_positive_int, default=2)
    tiny.add_argument("--hidden", type=_positive_int, default=64)
    tiny.add_argument("--heads", type=_positive_int, default=4)
    tiny.add_argument("--kv-heads", type=_positive_int, default=2)
    tiny.add_argument("--vocab", type=_positive_int, default=1024)
    tiny.add_argument("--intermediate", type=_positive_int, default=None)
    tiny.add_argument("--max-position-embeddings", type=_positive_int, default=2048)
    tiny.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_cmd_make_tiny_model)

    gen = sub.add_parser(
        "generate", help="generate text from a prompt on one local engine, streamed to stdout"
    )
    gen.add_argument("--model", type=Path, required=True, help="a local Hugging Face model directory")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 (float16 on CUDA only)")
    gen.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    gen.add_argument(
        "--threads", type=_positive_int, default=None, help="torch CPU threads (default: all cores)"
    )
    gen.set_defaults(func=_cmd_generate)

    for role, text in (
        ("prefill", "run a prefill node (prompt phase; streams KV to decode nodes)"),
        ("decode", "run a decode node (token phase; receives KV from prefill nodes)"),
        ("colocated", "run a colocated node (both phases; the baseline and the router's fallback)"),
    ):
        node = sub.add_parser(role, help=text)
        _add_node_args(node)
        node.set_defaults(func=_cmd_node, role=role)

    router = sub.add_parser("router", help="run a router (public gRPC API; places requests on nodes)")
    router.add_argument(
        "--model", type=Path, required=True, help="the served model's directory (for its tokenizer)"
    )
    _add_redis_url_arg(router)
    router.add_argument("--host", default="127.0.0.1")
    router.add_argument("--grpc-port", type=int, default=50051)
    router.add_argument("--http-port", type=int, default=8000, help="OpenAI-compatible HTTP endpoint")
    router.add_argument(
        "--api-key", default=None, help="require this bearer token (default: $SPLITSERVE_API_KEY)"
    )
    _add_placement_args(router)
    _add_admission_args(router)
    _add_cluster_token_args(router)
    _add_tracing_arg(router)
    router.set_defaults(func=_cmd_router)

    up = sub.add_parser("up", help="start a whole local cluster (Redis, nodes, router) as separate processes")
    up.add_argument("--model", type=Path, default=None, help="model directory (default: a tiny demo model)")
    up.add_argument("--prefill", type=int, default=1)
    up.add_argument("--decode", type=int, default=1)
    up.add_argument("--colocated", type=int, default=0)
    up.add_argument(
        "--redis-url", default=None, help="an external Redis (default: an embedded one on loopback)"
    )
    up.add_argument("--kv-backend", choices=["nixl", "torch"], default="torch")
    up.add_argument("--grpc-port", type=int, default=50051)
    up.add_argument("--http-port", type=int, default=8000)
    up.add_argument("--api-key", default=None, help="require this bearer token on the router's endpoints")
    up.add_argument("--threads-per-node", type=_positive_int, default=1)
    for role in ("prefill", "decode", "colocated"):
        up.add_argument(
            f"--{role}-machine-type",
            default=None,
            help=f"machine type of the {role} nodes (price and power model; default: cpu)",
        )
    up.add_argument("--machines", default=None, help="a JSON catalog of user machine types")
    _add_placement_args(up)
    _add_admission_args(up)
    _add_cluster_token_args(up, generated=True)
    up.set_defaults(func=_cmd_up)

    from ops.bench.arguments import add_arguments as add_bench_arguments

    bench = sub.add_parser("bench", help="load-test an OpenAI-compatible or splitserve gRPC endpoint")
    add_bench_arguments(bench)
    bench.set_defaults(func=_cmd_bench)

    from ops.profiling.arguments import add_arguments as add_profile_arguments

    profile = sub.add_parser(
        "profile", help="measure this machine's prompt and token latency into a perf-model CSV"
    )
    add_profile_arguments(profile)
    profile.set_defaults(func=_cmd_profile)

    from ops.sim.arguments import add_arguments as add_simulate_arguments

    simulate = sub.add_parser(
        "simulate", help="replay a trace on a simulated cluster: latency, SLOs, throughput, cost, energy"
    )
    add_simulate_arguments(simulate)
    simulate.set_defaults(func=_cmd_simulate)

    from ops.plan.arguments import add_arguments as add_plan_arguments

    plan = sub.add_parser(
        "plan", help="size prefill/decode pools per design for max throughput at a budget or min cost/power"
    )
    add_plan_arguments(plan)
    plan.set_defaults(func=_cmd_plan)

    from ops.operator.command import add_arguments as add_operator_arguments

    operator = sub.add_parser(
        "operator", help="run the Kubernetes operator for SplitserveCluster resources, or print the CRD"
    )
    add_operator_arguments(operator)
    operator.set_defaults(func=_cmd_operator)
    return parser


def _add_placement_args(parser: argparse.ArgumentParser) -> None:
    from router.policy import add_policy_arguments

    group = parser.add_argument_group("placement")
    add_policy_arguments(group)
    group.add_argument(
        "--slo-ttft-ms", type=float, default=None, help="TTFT target placement must predict within"
    )
    group.add_argument(
        "--slo-tbt-ms", type=float, default=None, help="TBT target placement must predict within"
    )


def _add_admission_args(parser: argparse.ArgumentParser) -> None:
    """The router's load-shedding and request-reading limits (router/admission.py, router/http_body.py)."""
    group = parser.add_argument_group("load shedding")
    group.add_argument(
        "--max-concurrent-requests", type=_positive_int, default=256,
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
        "--tokenizer-threads", type=_positive_int, default=2, help="threads tokenizing long prompts"
    )


def _admission_flags(args: argparse.Namespace) -> list[str]:
    """The load-shedding flags, for `up` to pass on to its routers."""
    flags = []
    for name in ("max_concurrent_requests", "max_queued_requests", "queue_timeout_s", "body_timeout_s",
                 "tokenizer_threads"):  # fmt: skip
        flags += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return flags


def _placement_flags(args: argparse.Namespace) -> list[str]:
    """The placement flags as given, for `up` to pass on to its routers."""
    flags = ["--policy", args.policy]
    for option in args.policy_option:
        flags += ["--policy-option", option]
    for name in ("slo_ttft_ms", "slo_tbt_ms"):
        if getattr(args, name) is not None:
            flags += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return flags


def _add_node_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True)
    _add_redis_url_arg(parser)
    parser.add_argument("--node-id", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="gRPC port (0: any free port)")
    parser.add_argument(
        "--metrics-port",
        type=_port_number,
        default=0,
        help="Prometheus GET /metrics port on --host (0: any free port)",
    )
    parser.add_argument("--kv-backend", choices=["nixl", "torch"], default="torch")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=_positive_int, default=None)
    parser.add_argument("--kv-cache-mb", type=_positive_int, default=256)
    parser.add_argument("--max-batched-tokens", type=_positive_int, default=512)
    parser.add_argument("--max-seqs", type=_positive_int, default=64)
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
        type=_stall_seconds,
        default=2.0,
        help="leave the cluster while one engine step or the event loop is stuck longer than this; raise it for "
        "models whose single step takes longer (a large model on CPU)",
    )
    _add_cluster_token_args(parser)
    _add_tracing_arg(parser)
    parser.add_argument(
        "--one-piece-below",
        type=int,
        default=512,
        help="prefill: send the KV of prompts shorter than this many tokens in one piece (0: always layer by layer)",
    )


REDIS_URL_ENV = "SPLITSERVE_REDIS_URL"


def _add_redis_url_arg(parser: argparse.ArgumentParser) -> None:
    """--redis-url, or $SPLITSERVE_REDIS_URL: a URL with a password belongs in the environment, not in argv."""
    parser.add_argument(
        "--redis-url",
        default=os.environ.get(REDIS_URL_ENV),
        required=not os.environ.get(REDIS_URL_ENV),
        help=f"Redis holding cluster state, redis:// or rediss:// (default: ${REDIS_URL_ENV}; splitserve up "
        "starts one)",
    )


def _add_cluster_token_args(parser: argparse.ArgumentParser, *, generated: bool = False) -> None:
    """The cluster token (ops/cluster_auth.py): nodes require it on every internal call, routers send it."""
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


def _cluster_token(args: argparse.Namespace) -> str | None:
    """The cluster token from the flags or environment; ClusterTokenError (a ValueError) for a bad file."""
    from ops.cluster_auth import resolve_token

    return resolve_token(args.cluster_token, args.cluster_token_file)


def _stall_seconds(text: str) -> float:
    from ops.progress_watch import TICK_S

    value = float(text)
    if not value > TICK_S:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be more than {TICK_S} s")
    return value


def _port_number(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in 0..65535, got {value}")
    return value


def _add_tracing_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--otlp-endpoint",
        default=None,
        metavar="URL",
        help="export OpenTelemetry traces over OTLP/gRPC, e.g. http://127.0.0.1:4317 "
        "(default: $OTEL_EXPORTER_OTLP_ENDPOINT; neither: tracing off)",
    )


def _otlp_endpoint(args: argparse.Namespace) -> str | None:
    """The checked OTLP endpoint (flag or environment); ValueError for one the exporter cannot use."""
    from ops.tracing import endpoint_from

    return endpoint_from(args.otlp_endpoint)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from engine.errors import InvalidRequestError
    from engine.tiny_model import make_tiny_model

    if args.hidden % args.heads:
        raise InvalidRequestError(f"--hidden {args.hidden} is not a multiple of --heads {args.heads}")
    if args.heads % args.kv_heads:
        raise InvalidRequestError(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    out = make_tiny_model(
        args.dir,
        arch=args.arch,
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        kv_heads=args.kv_heads,
        vocab=args.vocab,
        seed=args.seed,
        intermediate=args.intermediate,
        max_position_embeddings=args.max_position_embeddings,
        dtype=args.dtype,
    )
    print(out)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.sampling_params import SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    engine = LLMEngine(args.model, EngineConfig(dtype=args.dtype, device=args.device))
    prompt: str | list[int] = args.prompt
    if args.chat:
        # The rendered template already holds any BOS token; encoding must not add a second one.
        rendered = engine.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
        prompt = engine.tokenizer.encode(rendered, add_special_tokens=False)
    engine.add_request("cli", prompt, params)
    while engine.has_unfinished():
        for out in engine.step():
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _cmd_node(args: argparse.Namespace) -> int:
    from ops.node_runtime import NodeOptions
    from ops.power.node_power import resolve_settings

    try:  # before the model loads: a wrong machine type or perf group fails in one line, at once
        power = resolve_settings(
            args.machine_type,
            args.machines,
            args.perf_model,
            args.perf_group,
            args.power_cap_w,
            args.power_cap_target_s,
            args.power_cap_apply,
        )
        otlp_endpoint = _otlp_endpoint(args)
        cluster_token = _cluster_token(args)
    except ValueError as exc:
        print(f"splitserve {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    options = NodeOptions(
        role=args.role,
        model_dir=args.model,
        redis_url=args.redis_url,
        node_id=args.node_id,
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        kv_backend=args.kv_backend,
        dtype=args.dtype,
        device=args.device,
        threads=args.threads,
        kv_cache_memory_mb=args.kv_cache_mb,
        max_num_batched_tokens=args.max_batched_tokens,
        max_num_seqs=args.max_seqs,
        machine_type=args.machine_type,
        power=power,
        drain_timeout_s=args.drain_timeout,
        stall_timeout_s=args.stall_timeout_s,
        one_piece_below=args.one_piece_below,
        otlp_endpoint=otlp_endpoint,
        cluster_token=cluster_token,
    )
    from ops.node_control import MoveToPool, exec_in_role

    try:
        if args.role == "prefill":
            from prefill_node.server import serve as serve_prefill

            return serve_prefill(options)
        from decode_node.server import serve as serve_decode

        return serve_decode(options)
    except MoveToPool as move:
        # The node stopped cleanly; the same flags after the new role word bring it back in that pool.
        exec_in_role(move.role, args.argv[args.argv.index(args.command) + 1 :])


def _cmd_router(args: argparse.Namespace) -> int:
    from ops.node_runtime import run
    from router.policy import parse_policy_options
    from router.server import RouterOptions, run_router

    try:  # a bad policy name or option is a usage error, found before anything starts
        options = RouterOptions(
            model_dir=args.model,
            redis_url=args.redis_url,
            host=args.host,
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            api_key=args.api_key,
            policy=args.policy,
            policy_options=parse_policy_options(args.policy_option),
            ttft_slo_s=None if args.slo_ttft_ms is None else args.slo_ttft_ms / 1000.0,
            tbt_slo_s=None if args.slo_tbt_ms is None else args.slo_tbt_ms / 1000.0,
            otlp_endpoint=_otlp_endpoint(args),
            cluster_token=_cluster_token(args),
            max_concurrent_requests=args.max_concurrent_requests,
            max_queued_requests=args.max_queued_requests,
            queue_timeout_s=args.queue_timeout_s,
            body_timeout_s=args.body_timeout_s,
            tokenizer_threads=args.tokenizer_threads,
        )
        options.placement_policy()
    except ValueError as exc:
        print(f"splitserve router: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return run(lambda: run_router(options))


def _cmd_bench(args: argparse.Namespace) -> int:
    from ops.bench.command import main as bench_main

    return bench_main(args)


def _cmd_profile(args: argparse.Namespace) -> int:
    from ops.profiling.command import main as profile_main

    return profile_main(args)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from ops.sim.command import main as simulate_main

    return simulate_main(args)


def _cmd_plan(args: argparse.Namespace) -> int:
    from ops.plan.command import main as plan_main

    return plan_main(args)


def _cmd_operator(args: argparse.Namespace) -> int:
    from ops.operator.command import main as operator_main

    return operator_main(args)


DEMO_MODEL_DIR = Path(".cache") / "demo-model"


def _cmd_up(args: argparse.Namespace) -> int:
    from ops.launcher import ClusterSpec
    from router.policy import create_policy, parse_policy_options

    try:  # the routers would refuse a bad policy too, but only after Redis and the nodes started
        create_policy(args.policy, **parse_policy_options(args.policy_option))
    except ValueError as exc:
        print(f"splitserve up: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from ops.machines import load_catalog

    try:  # the nodes would refuse an unknown type too, but only after Redis started
        catalog = load_catalog(args.machines)
        role_args: dict[str, list[str]] = {}
        for role in ("prefill", "decode", "colocated"):
            machine = getattr(args, f"{role}_machine_type")
            if machine is not None and machine not in catalog:
                raise ValueError(f"unknown machine type {machine!r} (known: {', '.join(sorted(catalog))})")
            role_args[role] = [
                *(["--machine-type", machine] if machine else []),
                *(["--machines", args.machines] if args.machines else []),
            ]
        cluster_token = _cluster_token(args)  # None: LocalCluster generates one
    except ValueError as exc:
        print(f"splitserve up: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    model = args.model
    if model is None:
        model = DEMO_MODEL_DIR
        if not (model / "config.json").exists():
            from engine.tiny_model import make_tiny_model

            make_tiny_model(model, arch="llama", layers=4, hidden=256, heads=8, kv_heads=2, vocab=2048)
    spec = ClusterSpec(
        model_dir=model.resolve(),
        prefill=args.prefill,
        decode=args.decode,
        colocated=args.colocated,
        redis_url=args.redis_url,
        kv_backend=args.kv_backend,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        api_key=args.api_key,
        cluster_token=cluster_token,
        threads_per_node=args.threads_per_node,
        router_args=[*_placement_flags(args), *_admission_flags(args)],
        role_args=role_args,
    )
    from ops.up_foreground import run_foreground

    return run_foreground(spec, model.name)


if __name__ == "__main__":
    raise SystemExit(main())
