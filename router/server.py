"""Entry point of a router process: `splitserve router`. The request life cycle is in router/inference.py.

The router is stateless: it reads cluster state from Redis into memory and can run in any number of copies.
Process life: load the tokenizer -> sync the cluster view -> serve gRPC (Inference, health, reflection) -> print
the ready line -> on SIGTERM/SIGINT stop taking requests, let streams finish (grace period), exit 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from engine.tokenizer import Tokenizer
from ops import tracing
from ops.cluster_state import ClusterView
from ops.dashboard.app import add_dashboard
from ops.dashboard.snapshot import DashboardSource
from ops.grpc_util import make_server
from router.auth import ApiKeyInterceptor
from router.inference import InferenceService, RouterConfig
from router.openai_http import create_app
from router.policy import PlacementPolicy, create_policy
from splitserve.v1 import inference_pb2_grpc

SERVICE_NAME = "splitserve.v1.Inference"


@dataclass(slots=True)
class RouterOptions:
    model_dir: Path
    redis_url: str
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_port: int = 8000
    api_key: str | None = None  # None: SPLITSERVE_API_KEY from the environment, if set
    policy: str = "jsq"
    policy_options: dict[str, Any] = field(default_factory=dict)
    ttft_slo_s: float | None = None
    tbt_slo_s: float | None = None
    max_model_len: int | None = None
    grace_s: float = 10.0
    otlp_endpoint: str | None = None  # None: OTEL_EXPORTER_OTLP_ENDPOINT if set, else no tracing

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
    server, health, port = make_server(f"{options.host}:{options.grpc_port}", [SERVICE_NAME], interceptors)
    service = InferenceService(
        RouterConfig(
            model_name=options.model_dir.name,
            max_model_len=max_len,
            vocab_size=int(config["vocab_size"]),
            ttft_slo_s=options.ttft_slo_s,
            tbt_slo_s=options.tbt_slo_s,
        ),
        tokenizer,
        view,
        options.placement_policy(),
    )
    inference_pb2_grpc.add_InferenceServicer_to_server(service, server)
    await server.start()
    await health.set(True)
    app = create_app(service, api_key)
    source = DashboardSource(service.config.model_name, view, service.requests, service.policy, bool(api_key))
    add_dashboard(app, source, options.redis_url, api_key)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=options.grace_s)
    await runner.setup()
    site = web.TCPSite(runner, options.host, options.http_port)
    await site.start()
    http_port = runner.addresses[0][1]
    ready = {"event": "ready", "role": "router", "address": f"{options.host}:{port}"}
    print(json.dumps({**ready, "http_address": f"{options.host}:{http_port}"}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await health.set(False)
    await runner.cleanup()
    await server.stop(grace=options.grace_s)
    await service.clients.close()
    view.stop()
    tracing.shutdown()  # exports the spans still buffered
    print(json.dumps({"event": "stopped", "role": "router"}), flush=True)
    return 0
