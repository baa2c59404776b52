"""What the chaos tests (tests/adversarial/test_chaos*.py) and benchmarks/chaos.py share: prompts, the single-process
reference, streams that record their timing, and faults on real node processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from cluster.state import ClusterView
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams
from ops.launcher import ClusterSpec, LocalCluster, Process
from splitserve.v1 import inference_pb2 as pb
from splitserve.v1 import inference_pb2_grpc

CALL_TIMEOUT_S = 180.0


def long_prompts(n: int, seed: int, shortest: int = 1000, longest: int = 1500) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 1000) for _ in range(rng.randint(shortest, longest))] for _ in range(n)]


def reference(model: Path, batch: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy outputs of the single-process engine: what the cluster must produce, fault or not."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=8192))
    return [c.token_ids for c in engine.generate(batch, params)]


def cluster_spec(model: Path, prefill: int, decode: int) -> ClusterSpec:
    return ClusterSpec(
        model_dir=model, prefill=prefill, decode=decode, grpc_port=0, http_port=0, kv_backend="torch"
    )


@dataclass
class Stream:
    """One request's outcome as its client saw it."""

    token_ids: list[int] = field(default_factory=list)
    request_ids: set[str] = field(
        default_factory=set
    )  # the request_id of every response (the client's label)
    started: float = 0.0
    first_token_at: float | None = None
    ended: float | None = None
    error: str | None = None

    @property
    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started


async def stream(address: str, prompt: list[int], max_tokens: int, request_id: str = "") -> Stream:
    """Run one greedy request to its end; a failure is recorded in `error`, never raised."""
    out = Stream(started=time.monotonic())
    request = pb.GenerateRequest(
        request_id=request_id,
        token_ids=pb.TokenIds(ids=prompt),
        sampling=pb.SamplingParameters(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
    )
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            async for msg in inference_pb2_grpc.InferenceStub(channel).Generate(
                request, timeout=CALL_TIMEOUT_S
            ):
                out.request_ids.add(msg.request_id)
                if msg.token_ids and out.first_token_at is None:
                    out.first_token_at = time.monotonic()
                out.token_ids += list(msg.token_ids)
    except grpc.aio.AioRpcError as exc:
        out.error = f"{exc.code().name}: {exc.details()}"
    out.ended = time.monotonic()
    return out


async def wait_until(predicate, timeout_s: float, interval_s: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval_s)
    return True


def holds_work(view: ClusterView, node_id: str) -> bool:
    """The node's last load report shows requests or reserved KV blocks (reports lag by up to ~100 ms)."""
    state = view.get(node_id)
    load = state.load if state else None
    return load is not None and (
        load.running_requests > 0
        or load.queued_prompt_tokens > 0
        or load.free_kv_blocks < load.total_kv_blocks
    )


def kv_all_free(view: ClusterView, node_id: str) -> bool:
    state = view.get(node_id)
    load = state.load if state else None
    return load is not None and load.running_requests == 0 and load.free_kv_blocks == load.total_kv_blocks


def start_node(cluster: LocalCluster, role: str) -> Process:
    """A new node of `role` in a running cluster, without waiting for it (see `await_node`)."""
    return cluster.start_node(role)


def await_node(cluster: LocalCluster, proc: Process, view: ClusterView) -> None:
    cluster._await_ready(proc)
    if not view.wait_for(lambda: view.get(proc.node_id) is not None, timeout_s=10.0):
        raise TimeoutError(f"{proc.role} node {proc.node_id} did not join the cluster view")


def kill(proc: Process) -> float:
    os.kill(proc.popen.pid, signal.SIGKILL)
    return time.monotonic()


@contextlib.contextmanager
def paused(proc: Process) -> Iterator[float]:
    """SIGSTOP the process for the block (yields the time it stopped); SIGCONT it afterwards, whatever happens."""
    os.kill(proc.popen.pid, signal.SIGSTOP)
    try:
        yield time.monotonic()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.popen.pid, signal.SIGCONT)
