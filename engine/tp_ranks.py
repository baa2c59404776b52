"""The ranks of a tensor-parallel engine: rank 0 is the engine itself, ranks 1..N-1 are worker processes it starts.

One scheduler drives them all: rank 0's engine plans each step, announces the step's inputs to the workers (one
broadcast of the prepared tensors), and every rank then runs the same forward over its shard of the weights and its
own KV heads, meeting in the layers' all-reduces and the logits' all-gather. Only rank 0 samples.

Two gloo groups connect the ranks: "step" carries the announcements and waits as long as an engine may stay idle;
"compute" carries the model's collectives and gives up after `timeout_s`, so a rank that dies or hangs mid-step makes
the others raise instead of waiting forever. Rank 0 also checks its workers are alive before each step. A worker
exits when rank 0 says stop, when a collective fails, or when rank 0's process is gone (it watches its parent).
Workers are spawned (not forked: the engine process has threads), on 127.0.0.1, and stopped by close(), bounded.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from engine.config import EngineConfig, EngineRole, ModelConfig, RankExtension
from engine.devices import resolve_device, resolve_dtype
from engine.errors import EngineBrokenError, ModelLoadError
from engine.model_runner import ModelRunner
from engine.models.decoder import DecoderModel
from engine.tensor_parallel import CollectiveFailed, TPComm, TPPlan
from engine.tensor_parallel.kv_resharding import GatherBlocks, KVResharding
from engine.tensor_parallel.rank_calls import RankChannel, serve_calls

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
DEFAULT_TIMEOUT_S = 60.0
IDLE_TIMEOUT_S = 7 * 24 * 3600.0  # how long a worker waits for the next step: an engine may idle for days
JOIN_TIMEOUT_S = 120.0  # spawning a worker imports torch and loads its shard
STOP_TIMEOUT_S = 10.0
PARENT_CHECK_S = 1.0


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker needs to build its rank of the model (all picklable: it crosses a process spawn)."""

    model_dir: Path
    dtype: str
    device: str
    num_blocks: int
    block_size: int
    max_positions: int
    world: int
    store_port: int
    timeout_s: float
    threads: int
    role: (
        str  # EngineRole's value: prefill and decode ranks keep the transfer pool in step (kv_resharding.py)
    )
    rank_extension: RankExtension | None = None  # what else each worker does with its pool (rank_calls.py)


class TPGroup:
    """Rank 0's side: the workers' processes, and the groups to announce steps and compute with."""

    def __init__(
        self, spec: WorkerSpec, store: Any, processes: list[Any], channels: list[RankChannel]
    ) -> None:
        self.spec = spec
        self._store = store
        self._processes = processes
        self.channels = channels  # rank 1's first: calls to the workers' extensions (empty calls without one)
        self.step = TPComm(store, 0, spec.world, IDLE_TIMEOUT_S, HOST, prefix="step")
        self.compute = TPComm(store, 0, spec.world, spec.timeout_s, HOST, prefix="compute")
        self._closed = False

    @classmethod
    def start(cls, spec_without_port: WorkerSpec) -> TPGroup:
        """Spawn ranks 1..N-1 and join them; ModelLoadError (with every worker stopped) if they do not come up."""
        # Not waiting for the workers here: they are spawned only once the port is known.
        store = dist.TCPStore(
            HOST, 0, None, is_master=True, timeout=timedelta(seconds=JOIN_TIMEOUT_S), wait_for_workers=False
        )
        spec = _with_port(spec_without_port, store.port)
        context = mp.get_context("spawn")
        pipes = [context.Pipe() for _ in range(1, spec.world)]
        processes = [
            context.Process(
                target=worker_main,
                args=(spec, rank, pipes[rank - 1][1]),
                name=f"splitserve-tp-rank{rank}",
                daemon=True,
            )
            for rank in range(1, spec.world)
        ]
        for process in processes:
            process.start()
        for _, worker_end in pipes:
            worker_end.close()  # the worker holds its own copy: rank 0 reads EOF once the worker is gone
        channels = [RankChannel(rank, pipes[rank - 1][0]) for rank in range(1, spec.world)]
        try:
            return cls(spec, store, processes, channels)
        except CollectiveFailed as exc:
            _stop(processes)
            raise ModelLoadError(
                f"tensor parallel {spec.world}: the worker ranks did not start: {exc}"
            ) from exc

    @property
    def processes(self) -> list[Any]:
        """The worker ranks' processes (multiprocessing.Process), rank 1 first."""
        return list(self._processes)

    def check_alive(self) -> None:
        """EngineBrokenError naming the worker ranks whose process is gone."""
        dead = [p.name for p in self._processes if not p.is_alive()]
        if dead:
            raise EngineBrokenError(f"tensor-parallel rank(s) gone: {', '.join(dead)}")

    def announce(self, inputs: object) -> None:
        """Before each step: the workers run the same step (EngineBrokenError if one is gone)."""
        self.check_alive()
        self.step.broadcast_object(inputs)

    def close(self) -> None:
        """Stop the workers (a stop announcement, then SIGKILL after a bound); idempotent."""
        if self._closed:
            return
        self._closed = True
        if all(p.is_alive() for p in self._processes):
            with contextlib.suppress(CollectiveFailed):
                self.step.broadcast_object(None)
        _stop(self._processes)
        for channel in self.channels:
            channel.close()


def _with_port(spec: WorkerSpec, port: int) -> WorkerSpec:
    fields = {name: getattr(spec, name) for name in WorkerSpec.__slots__}
    fields["store_port"] = port
    return WorkerSpec(**fields)


def _stop(processes: list[Any]) -> None:
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join(STOP_TIMEOUT_S)


# ---- the worker process ---------------------------------------------------------------------------------------------


def worker_main(spec: WorkerSpec, rank: int, calls: Any = None) -> None:
    """Rank `rank`: load its shard, then run every step rank 0 announces until told to stop. `calls`: this
    worker's end of rank 0's call pipe, served when the spec names a rank extension."""
    # Ctrl-C and SIGTERM reach the whole process group; only rank 0 decides when the ranks stop (after its drain).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _exit_with_parent()
    torch.set_num_threads(spec.threads)
    store = dist.TCPStore(
        HOST, spec.store_port, spec.world, is_master=False, timeout=timedelta(seconds=JOIN_TIMEOUT_S)
    )
    try:
        step = TPComm(store, rank, spec.world, IDLE_TIMEOUT_S, HOST, prefix="step")
        compute = TPComm(store, rank, spec.world, spec.timeout_s, HOST, prefix="compute")
        config = ModelConfig.from_dir(spec.model_dir)
        device = _rank_device(resolve_device(spec.device), rank)
        dtype = resolve_dtype(spec.dtype, config.torch_dtype, device)
        plan = TPPlan(config, rank, spec.world)
        model = DecoderModel.load(spec.model_dir, config, dtype, device, spec.max_positions, plan, compute)
        runner = ModelRunner(model, spec.num_blocks, spec.block_size)
        runner.resharding = _resharding(config, EngineRole(spec.role), compute, runner)
        extension = None
        if spec.rank_extension is not None:
            extension = spec.rank_extension.build(rank, runner.kv_caches)
            serve_calls(calls, extension, rank)
        while (inputs := step.broadcast_object()) is not None:
            if isinstance(inputs, GatherBlocks):
                assert runner.resharding is not None  # rank 0 asks only where there is one
                runner.resharding.gather_blocks(inputs.block_ids, runner.kv_caches)
            else:
                runner.execute(inputs.to(device), _layer_plan_hook(extension, inputs.layer_plan))
        if extension is not None:  # its threads must stop before the interpreter tears their objects down
            extension.close()
    except CollectiveFailed as exc:
        logger.warning("tensor-parallel rank %d stops: %s", rank, exc)
        os._exit(1)


def _layer_plan_hook(extension: Any, plan: object) -> Callable[[int], None] | None:
    """The worker's layer hook for a step whose plan rank 0 made (rank_calls.py), if it has an extension."""
    if extension is None or plan is None:
        return None
    return lambda layer: extension.on_layer_stored(layer, plan)


def _rank_device(first: torch.device, rank: int) -> torch.device:
    """Rank r's device: the r-th GPU after rank 0's (wrapping around: ranks may share a GPU); CPU stays CPU."""
    if first.type != "cuda":
        return first
    return torch.device("cuda", ((first.index or 0) + rank) % torch.cuda.device_count())


def _exit_with_parent() -> None:
    """End this process as soon as rank 0's process is gone (its collectives would fail anyway, but an idle worker
    waits in no collective that could notice)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        os._exit(1)

    threading.Thread(target=watch, name="tp-parent-watch", daemon=True).start()


# ---- the engine's entry points ---------------------------------------------------------------------------------------


def plan_for(config: ModelConfig, world: int) -> TPPlan | None:
    """Rank 0's plan (None at TP 1); ModelLoadError when the model does not divide over `world` ranks."""
    return None if world == 1 else TPPlan(config, 0, world)


def _resharding(
    config: ModelConfig, role: EngineRole, compute: TPComm, runner: ModelRunner
) -> KVResharding | None:
    """The prefill and decode roles' transfer pool upkeep (their KV crosses nodes); None for whole requests."""
    if role == EngineRole.COLOCATED:
        return None
    return KVResharding(config, compute, role == EngineRole.PREFILL, runner.kv_caches[0])


def start_ranks(
    model_dir: Path, config: EngineConfig, runner: ModelRunner, max_positions: int
) -> TPGroup | None:
    """Spawn and join ranks 1..N-1 for rank 0's runner (None at TP 1), and wire the runner to them."""
    world = config.tensor_parallel
    if world == 1:
        return None
    model = runner.model
    spec = WorkerSpec(
        model_dir=Path(model_dir),
        dtype=str(model.dtype).removeprefix("torch."),
        device=str(model.device),
        num_blocks=runner.num_blocks,
        block_size=runner.block_size,
        max_positions=max_positions,
        world=world,
        store_port=0,  # the group's store picks one
        timeout_s=config.tensor_parallel_timeout_s,
        threads=torch.get_num_threads(),
        role=config.role.value,
        rank_extension=config.rank_extension,
    )
    group = TPGroup.start(spec)
    model.tp = group.compute
    runner.announce = group.announce
    runner.resharding = _resharding(ModelConfig.from_dir(model_dir), config.role, group.compute, runner)
    return group
