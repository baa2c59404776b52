"""Start-up, registration and shutdown shared by prefill, decode and colocated nodes.

A node's process life:
1. Pick its power meter and set its power cap (cluster/power/node_power.py; a cap the GPU refuses exits 2 here), then
   load the model into an engine of the node's role, on its own thread (AsyncEngine), which reports every step to
   the node's ChargeLedger (per-request energy and cost).
2. Register the engine's KV pool with the transport (prefill, decode), serve Prometheus metrics over HTTP
   (cluster/node/metrics.py) and gRPC with health and reflection (a port it cannot bind: one line, exit 2). With a
   cluster token every other gRPC call needs it (cluster/auth.py), and so do KV peers.
3. Register in Redis (address, KV capacity, transport descriptor, machine type with its cost, power and latency
   model) and publish load (with the meter's power reading) at least every 100 ms, and the prefix-cache keys the
   engine gained and lost (KV events) every 100 ms. While one engine step or the
   event loop is stuck longer than `--stall-timeout-s` (cluster/node/progress_watch.py), the registration is
   withdrawn, so routers move the node's requests elsewhere; it is registered again when the node makes progress.
4. Print one JSON line `{"event": "ready", ...}` on stdout (gRPC and metrics addresses): launchers (`splitserve
   up`, tests) wait for it.
5. While serving, apply the operator's control from Redis (cluster/node/control.py): drain in place and resume, each
   printed as a JSON line `draining` / `resumed`.
6. On SIGTERM or SIGINT, drain: stop taking new work (UNAVAILABLE, health NOT_SERVING, `draining` in the load
   report), let in-flight requests finish within the grace period, deregister, then stop and exit 0. A control that
   moves the node to another pool does the same, prints `moving` instead of `stopped`, and raises MoveToPool: the
   command line then re-executes the process in its new role.
7. If the engine thread dies (it cannot compute any more), stop at once without draining: NOT_SERVING, deregister,
   one line on stderr naming the cause, `stopped` with the error, exit 1 so that a supervisor restarts the node.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import grpc
import redis

from cluster import tracing
from cluster.allocator import keep_freed_memory
from cluster.auth import ClusterTokenInterceptor
from cluster.grpc_util import make_server
from cluster.node import rank_kv
from cluster.node.control import ControlWatcher, MoveToPool, serve_until_stop_or_move
from cluster.node.metrics import MetricsServer, NodeIdentity, NodeMetrics
from cluster.node.progress_watch import ProgressWatch
from cluster.power.node_power import PowerSettings, resolve_settings, start_node_power
from cluster.power.powercap import PowerCapError
from cluster.state import LoadPublisher, LoadReport, NodeInfo, NodeRegistration, Role
from cluster.state.kv_events import KVEventPublisher
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig, EngineRole
from engine.engine import LLMEngine
from engine.tensor_parallel import TPPlan

IDLE_POLL_S = 0.05


@dataclass(slots=True)
class NodeOptions:
    role: str  # prefill | decode | colocated
    model_dir: Path
    redis_url: str
    node_id: str | None = None
    host: str = "127.0.0.1"  # where the node listens
    advertise_host: str | None = None  # what it registers for routers and peers to dial (default: host)
    port: int = 0  # 0: any free port (printed in the ready line)
    metrics_port: int = 0  # Prometheus GET /metrics on host (0: any free port, printed in the ready line)
    kv_backend: str = "torch"
    dtype: str = "auto"
    device: str = "cpu"
    threads: int | None = None
    kv_cache_memory_mb: int = 256
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    tensor_parallel: int = (
        1  # ranks the model is split over: this process and N-1 it starts (engine/tp_ranks.py)
    )
    prefix_caching: bool = True  # share cached prompt blocks (and publish them as KV events)
    block_size: int = 16
    machine_type: str = "cpu"
    power: PowerSettings | None = None  # machine type, perf model and power cap; None: machine_type, no cap
    drain_timeout_s: float = 30.0
    stall_timeout_s: float = (
        2.0  # a step or the event loop stuck this long withdraws the node (cluster/node/progress_watch.py)
    )
    otlp_endpoint: str | None = None  # None: OTEL_EXPORTER_OTLP_ENDPOINT if set, else no tracing
    # Every gRPC call but health/reflection, and every KV peer, must carry it (cluster/auth.py); None: open.
    cluster_token: str | None = None
    one_piece_below: int = (
        512  # prefill: prompts shorter than this send their KV in one piece, not layer by layer
    )
    kv_transfer_timeout_s: float = 30.0  # a KV write not landed by then fails (and quarantines its blocks)
    # Each rank writes the KV heads it holds to the peer's ranks holding them, at any degrees (rank_kv.py).
    kv_rank_to_rank: bool = True


class NodeService(Protocol):
    accepting: bool


# Builds the role's servicer(s) on the server and returns the object whose `accepting` flag gates new work.
Attach = Callable[[AsyncEngine, Any, grpc.aio.Server], NodeService]


async def run_node(options: NodeOptions, service_names: list[str], attach: Attach) -> int:
    if options.threads:
        import torch

        torch.set_num_threads(options.threads)
    keep_freed_memory()  # before the model loads: every engine step reuses its temporaries (cluster/allocator.py)
    node_id = options.node_id or f"{options.role}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    settings = options.power or resolve_settings(options.machine_type)
    try:
        power = start_node_power(
            settings, options.role, options.device, options.max_num_batched_tokens, options.max_num_seqs
        )
    except PowerCapError as exc:
        print(f"splitserve {options.role}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    _say(power.log)
    tracing.configure(
        options.role,
        tracing.endpoint_from(options.otlp_endpoint),
        {"splitserve.node_id": node_id, "splitserve.machine_type": settings.machine.name},
    )
    engine = LLMEngine(options.model_dir, _engine_config(options, node_id))
    async_engine = AsyncEngine(engine, name=f"engine-{options.role}", step_observer=power.ledger)
    transport = _make_transport(options, node_id, engine)
    # Public Inference included: a node serves only its routers, never a client that skipped one.
    guard = [ClusterTokenInterceptor(options.cluster_token)] if options.cluster_token else []

    # A port taken (since the command line checked it) or a host this machine does not have: one line, exit 2.
    def cannot_listen(what: str, flag: str, exc: OSError) -> int:
        print(f"splitserve {options.role}: error: {what}: {exc} (change {flag})", file=sys.stderr, flush=True)
        async_engine.shutdown()
        if transport is not None:
            transport.close()
        power.close()
        return 2

    try:
        server, health, port = make_server(f"{options.host}:{options.port}", service_names, guard)
    except OSError as exc:
        return cannot_listen("gRPC", "--port", exc)
    service = attach(async_engine, transport, server)
    metrics = NodeMetrics(NodeIdentity(options.role, node_id, power.machine.name), async_engine, power.meter)
    if hasattr(service, "on_kv_transfer"):  # prefill nodes time their transfers
        service.on_kv_transfer = metrics.observe_kv_transfer
    if (pull := getattr(service, "prefix_pull", None)) is not None:
        pull.on_import = metrics.observe_kv_import
    metrics_server = MetricsServer(metrics)
    try:
        metrics_port = await metrics_server.start(options.host, options.metrics_port)
    except OSError as exc:  # nothing is registered yet
        where = f"{options.host}:{options.metrics_port}"
        return cannot_listen(f"cannot serve metrics on {where}", "--metrics-port", exc)
    if hasattr(service, "start"):
        await service.start()
    await server.start()
    await health.set(True)
    public = _public_host(options)
    address, metrics_address = f"{public}:{port}", f"{public}:{metrics_port}"
    registration = NodeRegistration(options.redis_url)
    registration.register(
        NodeInfo(
            node_id=node_id,
            role=options.role,  # type: ignore[arg-type]
            address=address,
            model=options.model_dir.name,
            kv_capacity_blocks=engine.blocks.num_blocks,
            block_size=engine.config.block_size,
            transport=transport.local_descriptor() if transport is not None else b"",
            **power.registration(),
        )
    )
    draining = False

    def current_load() -> LoadReport:
        load = async_engine.load
        return LoadReport(
            node_id=node_id,
            queued_prompt_tokens=load.queued_prompt_tokens,
            running_requests=load.running_requests,
            free_kv_blocks=load.free_kv_blocks,
            total_kv_blocks=load.total_kv_blocks,
            prefix_queried_blocks=load.prefix_queried_blocks,
            prefix_hit_blocks=load.prefix_hit_blocks,
            draining=draining,
            **power.load_fields(),
        )

    progress = ProgressWatch(lambda: async_engine.step_started, options.stall_timeout_s)
    ticker = asyncio.create_task(progress.tick_forever())
    publisher = LoadPublisher(registration, current_load, stalled=progress.stalled)
    publisher.start()
    # The prefix-cache keys this node holds, for routers that place by them (cluster/state/kv_events.py).
    kv_events = KVEventPublisher(options.redis_url, node_id, engine.blocks.events)
    kv_events.start()
    ready = {"role": options.role, "node_id": node_id, "address": address, "metrics_address": metrics_address}
    _say({"event": "ready", **ready})

    async def set_draining(drain: bool) -> None:
        nonlocal draining
        draining = drain
        service.accepting = not drain
        await health.set(not drain)
        publisher.notify()

    stop = _stop_on_signal()
    role = cast(Role, options.role)  # checked by the command line's choices
    watcher = ControlWatcher(registration.read_control, set_draining, role=role, node_id=node_id, say=_say)
    engine_watch = asyncio.create_task(_stop_when_engine_dies(async_engine, stop))
    move_to = await serve_until_stop_or_move(stop, watcher)
    engine_watch.cancel()
    await set_draining(True)
    fatal = async_engine.fatal_error  # a dead engine has nothing left to drain: leave at once
    started = time.monotonic()
    while not fatal and time.monotonic() - started < options.drain_timeout_s and _busy(async_engine, service):
        await asyncio.sleep(IDLE_POLL_S)
    publisher.stop()
    kv_events.stop()
    ticker.cancel()
    _deregister(registration)
    await server.stop(grace=1.0)
    await metrics_server.stop()
    if hasattr(service, "stop"):
        await service.stop()
    async_engine.shutdown()
    if transport is not None:
        transport.close()
    power.close()
    tracing.shutdown()  # exports the spans still buffered
    drained = not _busy(async_engine, service)
    # A SIGTERM during the move's drain wins: stop, do not come back.
    if move_to is not None and not stop.is_set():
        _say({"event": "moving", "node_id": node_id, "to": move_to, "drained": drained})
        raise MoveToPool(move_to)
    if fatal is not None:
        cause = " ".join(f"{type(fatal).__name__}: {fatal}".split())  # one line, whatever the error's text
        print(f"splitserve {options.role}: error: the engine stopped: {cause}", file=sys.stderr, flush=True)
        _say({"event": "stopped", "node_id": node_id, "drained": False, "error": str(fatal)})
        return 1
    _say({"event": "stopped", "node_id": node_id, "drained": drained})
    return 0


def _engine_config(options: NodeOptions, node_id: str) -> EngineConfig:
    # The worker ranks of a split prefill or decode node run a transport each (cluster/node/rank_kv.py).
    ranks_transfer = _ranks_transfer(options) and options.tensor_parallel > 1
    return EngineConfig(
        role=EngineRole(options.role),
        dtype=options.dtype,
        device=options.device,
        block_size=options.block_size,
        kv_cache_memory_bytes=options.kv_cache_memory_mb * 1024 * 1024,
        max_num_batched_tokens=options.max_num_batched_tokens,
        max_num_seqs=options.max_num_seqs,
        enable_prefix_caching=options.prefix_caching,
        tensor_parallel=options.tensor_parallel,
        rank_extension=(
            rank_kv.rank_extension(
                options.kv_backend, node_id, options.tensor_parallel, _transport_options(options)
            )
            if ranks_transfer
            else None
        ),
    )


def _ranks_transfer(options: NodeOptions) -> bool:
    """Whether the node's KV goes rank to rank with peers that publish ranks (cluster/node/rank_kv.py)."""
    return options.role != "colocated" and options.kv_rank_to_rank


def _transport_options(options: NodeOptions) -> dict[str, Any]:
    """What the node's and its ranks' transports are made with (rank_kv.open_transport): they listen on the address
    peers dial alone (a pod IP on Kubernetes, never every interface)."""
    return {
        "transfer_timeout_s": options.kv_transfer_timeout_s,
        "host": _public_host(options),
        "cluster_token": options.cluster_token,
    }


def _public_host(options: NodeOptions) -> str:
    return options.advertise_host or options.host


def _make_transport(options: NodeOptions, node_id: str, engine: LLMEngine) -> Any:
    if options.role == "colocated":
        return None
    transport = rank_kv.open_transport(
        options.kv_backend, node_id, engine.kv_layers, _transport_options(options)
    )
    if not _ranks_transfer(options):
        return transport
    world = engine.config.tensor_parallel
    if world == 1:  # the node's one rank: its pool is kv_layers, its transport the node's
        local = rank_kv.RankKV(0, transport, shares_transport=True)
    else:
        local = rank_kv.start_rank_kv(
            0,
            engine.runner.kv_caches,
            backend=options.kv_backend,
            node_id=node_id,
            world=world,
            transport_options=_transport_options(options),
        )
    config = engine.model_config

    def heads_of(split: int) -> list[tuple[int, int]]:
        plans = [TPPlan(config, r, split).kv_heads for r in range(split)]
        return [(heads.start, heads.stop) for heads in plans]

    return rank_kv.TensorParallelTransport(transport, rank_kv.RankedKV(local, engine.rank_channels, heads_of))


def _busy(engine: AsyncEngine, service: NodeService) -> bool:
    """Work left to drain: requests in the engine, outputs the engine made that a stream has not relayed yet (a fast
    engine finishes long before its last tokens have left over gRPC), or work the service holds outside the engine
    (a decode node's reservations whose Decode call has not come yet, a prefill node's unanswered Prefill calls)."""
    load = engine.load
    in_engine = load.running_requests > 0 or load.waiting_requests > 0 or engine.open_streams > 0
    return in_engine or getattr(service, "pending_work", 0) > 0


def _deregister(registration: NodeRegistration) -> None:
    """Leave the cluster now; with Redis unreachable, say so and go on stopping: the node's key expires by itself
    within its lease (2 s), so routers drop it all the same."""
    try:
        registration.deregister()
    except redis.RedisError as exc:
        print(
            f"splitserve: could not deregister (Redis unreachable: {exc}); the lease expires it",
            file=sys.stderr,
        )


async def _stop_when_engine_dies(engine: AsyncEngine, stop: asyncio.Event) -> None:
    """Step 7: an engine thread that died cannot serve again; stop the node so that its supervisor restarts it."""
    await engine.wait_fatal()
    stop.set()


def _stop_on_signal() -> asyncio.Event:
    """An event set by the first SIGTERM or SIGINT (further ones change nothing)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _say(event: dict[str, object]) -> None:
    print(json.dumps(event), flush=True)
