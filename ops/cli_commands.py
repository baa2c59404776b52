"""The bodies of the server commands: `prefill`/`decode`/`colocated` (one node), `router`, and `up` (a whole local
cluster, whose foreground loop is ops/up_foreground.py). Their flags are defined in ops/cli_args.py.

Each checks what it can before anything starts (a missing model directory or catalog, a port in use, a bad machine
type, policy, cluster token file or OTLP endpoint: a UserError, printed by ops/cli.py as one line on stderr with exit
code 2), then runs the server. They import servers inside the function, so that
`splitserve --help` stays instant.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ops import cli_args
from ops.cli_errors import UserError, require_dir, require_file, require_free_port, require_redis

DEMO_MODEL_DIR = Path(".cache") / "demo-model"
UP_HOST = "127.0.0.1"  # where `up` serves: ClusterSpec's default host


def node_command(args: argparse.Namespace) -> int:
    """Serve one node in args.role until it stops; a move to another pool re-executes it in the new role."""
    require_file(args.machines, "--machines")
    require_file(args.perf_model, "--perf-model")
    from cluster.node.runtime import NodeOptions
    from cluster.power.node_power import resolve_settings

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
        otlp_endpoint = cli_args.otlp_endpoint(args)
        cluster_token = cli_args.cluster_token(args)
        advertise_host = cli_args.advertised_host(args)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    require_dir(args.model, "--model", "model directory")
    require_free_port(args.host, args.port, "--port")
    require_free_port(args.host, args.metrics_port, "--metrics-port")
    require_redis(args.redis_url, "--redis-url")  # or the model loads, only for the node to fail to register
    options = NodeOptions(
        role=args.role,
        model_dir=args.model,
        redis_url=args.redis_url,
        node_id=args.node_id,
        host=args.host,
        advertise_host=advertise_host,
        port=args.port,
        metrics_port=args.metrics_port,
        kv_backend=args.kv_backend,
        dtype=args.dtype,
        device=args.device,
        threads=args.threads,
        kv_cache_memory_mb=args.kv_cache_mb,
        max_num_batched_tokens=args.max_batched_tokens,
        max_num_seqs=args.max_seqs,
        tensor_parallel=args.tensor_parallel,
        prefix_caching=not args.no_prefix_caching,
        machine_type=args.machine_type,
        power=power,
        drain_timeout_s=args.drain_timeout,
        stall_timeout_s=args.stall_timeout_s,
        one_piece_below=args.one_piece_below,
        kv_transfer_timeout_s=args.kv_transfer_timeout_s,
        kv_rank_to_rank=args.kv_rank_to_rank,
        otlp_endpoint=otlp_endpoint,
        cluster_token=cluster_token,
    )
    from cluster.node.control import MoveToPool, exec_in_role

    try:
        if args.role == "prefill":
            from prefill_node.server import serve as serve_prefill

            return serve_prefill(options)
        from decode_node.server import serve as serve_decode

        return serve_decode(options)
    except MoveToPool as move:
        # The node stopped cleanly; the same flags after the new role word bring it back in that pool.
        exec_in_role(move.role, args.argv[args.argv.index(args.command) + 1 :])


def router_command(args: argparse.Namespace) -> int:
    """Serve one router until it stops."""
    from cluster.event_loop import run
    from router.policies import parse_policy_options
    from router.server import RouterOptions, run_router

    try:  # a bad policy name or option is a usage error, found before anything starts
        options = RouterOptions(
            model_dir=args.model,
            redis_url=args.redis_url,
            host=args.host,
            advertise_host=cli_args.advertised_host(args),
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            api_key=args.api_key,
            policy=args.policy,
            policy_options=parse_policy_options(args.policy_option),
            prefix_pull=args.prefix_pull,
            ttft_slo_s=None if args.slo_ttft_ms is None else args.slo_ttft_ms / 1000.0,
            tbt_slo_s=None if args.slo_tbt_ms is None else args.slo_tbt_ms / 1000.0,
            otlp_endpoint=cli_args.otlp_endpoint(args),
            cluster_token=cli_args.cluster_token(args),
            max_concurrent_requests=args.max_concurrent_requests,
            max_queued_requests=args.max_queued_requests,
            queue_timeout_s=args.queue_timeout_s,
            body_timeout_s=args.body_timeout_s,
            tokenizer_threads=args.tokenizer_threads,
            cors_origins=tuple(args.cors_allow_origin),
            tool_call_parser=args.tool_call_parser,
        )
        options.placement_policy()
    except ValueError as exc:
        raise UserError(str(exc)) from None
    require_dir(args.model, "--model", "model directory")
    require_free_port(args.host, args.grpc_port, "--grpc-port")
    require_free_port(args.host, args.http_port, "--http-port")
    return run(lambda: run_router(options))


def up_command(args: argparse.Namespace) -> int:
    """Start Redis, the nodes and a router as processes (the demo model without --model); run until Ctrl-C."""
    from ops.launcher import ClusterSpec
    from router.policies import create_policy, parse_policy_options

    # Found here, or by a router or node only after Redis and the nodes before it started.
    require_file(args.machines, "--machines")
    try:
        create_policy(args.policy, **parse_policy_options(args.policy_option))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    from cluster.machines import load_catalog

    try:  # the nodes would refuse an unknown type too, but only after Redis started
        catalog = load_catalog(args.machines)
        role_args: dict[str, list[str]] = {}
        for role in ("prefill", "decode", "colocated"):
            machine = getattr(args, f"{role}_machine_type")
            if machine is not None and machine not in catalog:
                raise ValueError(f"unknown machine type {machine!r} (known: {', '.join(sorted(catalog))})")
            tensor_parallel = getattr(args, f"{role}_tensor_parallel") or args.tensor_parallel
            role_args[role] = [
                *(["--machine-type", machine] if machine else []),
                *(["--machines", args.machines] if args.machines else []),
                *(["--tensor-parallel", str(tensor_parallel)] if tensor_parallel > 1 else []),
            ]
        cluster_token = cli_args.cluster_token(args)  # None: LocalCluster generates one
    except ValueError as exc:
        raise UserError(str(exc)) from None
    require_dir(args.model, "--model", "model directory")
    require_free_port(UP_HOST, args.grpc_port, "--grpc-port")
    require_free_port(UP_HOST, args.http_port, "--http-port")
    if args.redis_url:
        require_redis(args.redis_url, "--redis-url")
    model = args.model
    if model is None:
        model = DEMO_MODEL_DIR
        from engine.tiny_model import make_tiny_model

        # Made once; remade when its recipe differs, e.g. when an older splitserve wrote it.
        make_tiny_model(
            model, arch="llama", layers=4, hidden=256, heads=8, kv_heads=2, vocab=2048, reuse=True
        )
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
        router_args=[*cli_args.placement_flags(args), *cli_args.admission_flags(args)],
        role_args=role_args,
    )
    from ops.up_foreground import run_foreground

    return run_foreground(spec, model.name)
