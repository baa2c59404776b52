"""Entry point of a router process: `splitserve router`. The request life cycle is in router/inference.py.

The router is stateless: it reads cluster state from Redis into memory and can run in any number of copies.
Process life: load the tokenizer -> sync the cluster view -> serve gRPC (Inference, health, reflection) -> print
the ready line -> on SIGTERM/SIGINT stop taking requests, let streams finish (grace period), exit 0. A port it cannot
listen on is one line on stderr naming the flag to change, and exit code 2.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from cluster import tracing
from cluster.auth import TOKEN_ENV
from cluster.grpc_util import add_checked_servicer, make_server
from cluster.state import ClusterView
from engine.tokenizer import Tokenizer
from router.admission import DEFAULT_MAX_ACTIVE, DEFAULT_MAX_QUEUED, DEFAULT_QUEUE_TIMEOUT_S
from router.auth import ApiKeyInterceptor
from router.config import RouterConfig
from router.dashboard.app import add_dashboard
from router.dashboard.snapshot import DashboardSource
from router.http_runner import JsonErrorAppRunner
from router.inference import InferenceService
from router.kv_index import KVIndex
from router.openai_http import BODY_TIMEOUT_S, create_app
from router.policies import create_policy
from router.policy import PlacementPolicy
from splitserve.v1 import inference_pb2_grpc

SERVICE_NAME = "splitserve.v1.Inference"


@dataclass(slots=True)
class RouterOptions:
    model_dir: Path
    redis_url: str
    host: str = "127.0.0.1"
    advertise_host: str | None = None  # the address in the ready line (default: host)
    grpc_port: int = 50051
    http_port: int = 8000
    api_key: str | None = None  # None: SPLITSERVE_API_KEY from the environment, if set
    policy: str = "jsq"
    policy_options: dict[str, Any] = field(default_factory=dict)
    ttft_slo_s: float | None = None
    tbt_slo_s: float | None = None
    prefix_pull: bool = (
        True  # prefill nodes may copy prefix blocks from the decode node (prefill_node/prefix_pull.py)
    )
    max_model_len: int | None = None
    grace_s: float = 10.0
    # Load shedding (router/admission.py): requests running on the nodes, and waiting for a slot (for how long).
    max_concurrent_requests: int = DEFAULT_MAX_ACTIVE
    max_queued_requests: int = DEFAULT_MAX_QUEUED
    queue_timeout_s: float = DEFAULT_QUEUE_TIMEOUT_S
    body_timeout_s: float = BODY_TIMEOUT_S  # an HTTP request body must arrive within this (408)
    tokenizer_threads: int = 2  # threads tokenizing long prompts off the event loop
    cors_origins: tuple[
        str, ...
    ] = ()  # origins browsers may call the HTTP endpoint from ("*": any); none: no CORS
    tool_call_parser: str = (
        "auto"  # how the model writes tool calls (router/tool_parsers.py); auto: its template's
    )
    otlp_endpoint: str | None = None  # None: OTEL_EXPORTER_OTLP_ENDPOINT if set, else no tracing
    cluster_token: str | None = (
        None  # sent on every call to a node (cluster/auth.py); None: $SPLITSERVE_CLUSTER_TOKEN
    )

    def __post_init__(self) -> None:
        if self.max_concurrent_requests < 1 or self.max_queued_requests < 0:
            raise ValueError("--max-concurrent-requests must be >= 1 and --max-queued-requests >= 0")
        if self.queue_timeout_s <= 0 or self.body_timeout_s <= 0 or self.tokenizer_threads < 1:
            raise ValueError("--queue-timeout-s and --body-timeout-s must be > 0, --tokenizer-threads >= 1")

    def placement_policy(self) -> PlacementPolicy:
        """The configured policy; ValueError for an unknown name or option."""
        return create_policy(self.policy, **self.policy_options)


async def run_router(options: RouterOptions) -> int:
    tokenizer = Tokenizer.from_dir(options.model_dir)
    config = json.loads((options.model_dir / "config.json").read_text())
    max_len = options.max_model_len or int(config.get("max_position_embeddings", 2048))
    tracing.configure("router", tracing.endpoint_from(options.otlp_endpoint))
    view = ClusterView(options.redis_url)
    view.start()
    api_key = options.api_key or os.environ.get("SPLITSERVE_API_KEY") or None
    interceptors = [ApiKeyInterceptor(api_key)] if api_key else []
    try:
        server, health, port = make_server(
            f"{options.host}:{options.grpc_port}", [SERVICE_NAME], interceptors
        )
    except OSError as exc:  # taken since the command line checked it, say
        return _cannot_listen(exc, options.host, options.grpc_port, "--grpc-port")
    service = InferenceService(
        RouterConfig(
            model_name=options.model_dir.name,
            max_model_len=max_len,
            vocab_size=int(config["vocab_size"]),
            ttft_slo_s=options.ttft_slo_s,
            tbt_slo_s=options.tbt_slo_s,
            prefix_pull=options.prefix_pull,
            max_concurrent_requests=options.max_concurrent_requests,
            max_queued_requests=options.max_queued_requests,
            queue_timeout_s=options.queue_timeout_s,
            tokenizer_threads=options.tokenizer_threads,
        ),
        tokenizer,
        view,
        options.placement_policy(),
    )
    policy_reads_kv = getattr(service.policy, "kv_aware", False)
    if policy_reads_kv:  # the policy weighs cached prefixes: follow the nodes' KV events
        service.kv_index = KVIndex(options.redis_url)
        if not await asyncio.to_thread(service.kv_index.start, 2.0):
            print(
                "splitserve router: KV index not synced yet; placing without it until it is", file=sys.stderr
            )
    service.clients.cluster_token = options.cluster_token or os.environ.get(TOKEN_ENV) or None
    # Registered like the generated add_InferenceServicer_to_server, but undecodable bytes get INVALID_ARGUMENT.
    add_checked_servicer(inference_pb2_grpc.add_InferenceServicer_to_server, service, server)
    await server.start()
    await health.set(True)
    app = create_app(service, api_key, options.body_timeout_s, options.cors_origins, options.tool_call_parser)
    source = DashboardSource(service.config.model_name, view, service.requests, service.policy, bool(api_key))
    add_dashboard(app, source, options.redis_url, api_key)
    # Parser-level errors (bad request line, bad headers) are OpenAI-shaped JSON too (router/http_runner.py).
    runner = JsonErrorAppRunner(app, access_log=None, shutdown_timeout=options.grace_s)
    await runner.setup()
    site = web.TCPSite(runner, options.host, options.http_port)
    try:
        await site.start()
    except OSError as exc:
        await server.stop(None)  # a gRPC server left running outlives the event loop, and fails noisily then
        return _cannot_listen(exc, options.host, options.http_port, "--http-port")
    http_port = runner.addresses[0][1]
    public = options.advertise_host or options.host
    ready = {"event": "ready", "role": "router", "address": f"{public}:{port}"}
    print(json.dumps({**ready, "http_address": f"{public}:{http_port}"}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await health.set(False)
    await runner.cleanup()
    await server.stop(grace=options.grace_s)
    await service.clients.close()
    service.encoder.close()
    view.stop()
    if service.kv_index is not None:
        service.kv_index.stop()
    tracing.shutdown()  # exports the spans still buffered
    print(json.dumps({"event": "stopped", "role": "router"}), flush=True)
    return 0


def _cannot_listen(exc: OSError, host: str, port: int, flag: str) -> int:
    """One line naming the flag to change, exit code 2: what `splitserve router` says of a port it cannot have."""
    why = f"port {port} is in use" if exc.errno == errno.EADDRINUSE else f"cannot listen on {host}:{port}"
    print(f"splitserve router: error: {why} (change {flag})", file=sys.stderr, flush=True)
    return 2
