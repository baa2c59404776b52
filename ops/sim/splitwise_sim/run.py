"""Running a design SplitwiseSim's way: its instances, schedulers and KV transfers, and its latency definitions.

What is SplitwiseSim's here (ops/sim/splitwise_sim/*, each module says how it works):
- machines: each machine of a pool holds gpus // tensor_parallel instances; an instance's memory is
  tensor_parallel GPUs of N GiB each, N read from the accelerator's name ("a100-80gb": 80 GiB), minus the model's
  weights, and KV is counted in bytes by SplitwiseSim's formula (work.py);
- scheduling: mixed_pool for phase-split designs, token_jsq for colocated ones (schedulers.py);
- KV transfer: after the prompt finishes, the prompt's KV (prompt tokens) over a link of 200 GiB/s of its own,
  started once the token instance has room for it (else retried every second), with no overlap with the prompt;
- latencies: TTFT to the prompt's end, E2E to the last token, TBT = (E2E - TTFT) / output tokens;
- the 9-SLO check as the paper's notebooks do it: per request, slowdowns against the request alone on the reference
  hardware by SplitwiseSim's own curves (TTFT: the prompt curve at the prompt's size; TBT: the token curve at the
  prompt's size; E2E: TTFT + TBT x (output - 1)), their P50/P90/P99 (linear interpolation) strictly under each limit.
What is ours: node names, cost and energy (idle, prompt and token power by busy time, as ops/sim/hardware.py says).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from cluster.machines import BUILTIN_MACHINES
from ops.bench.slo import SloCheck
from ops.bench.workload import TraceRequest, check_requests
from ops.sim import hardware
from ops.sim.cluster import build_specs
from ops.sim.config import SimConfig
from ops.sim.design import ClusterDesign, machine_type
from ops.sim.node import NodeSpec
from ops.sim.result import SimResult, slowdown_check
from ops.sim.splitwise_sim.events import EventLoop
from ops.sim.splitwise_sim.instance import Instance, Limits
from ops.sim.splitwise_sim.perf import SplitwisePerf, load_perf
from ops.sim.splitwise_sim.schedulers import MixedPoolScheduler, TokenJSQScheduler
from ops.sim.splitwise_sim.work import MODEL_SHAPES, ModelShape, Request, Task
from ops.sim.timing import load_timers

__all__ = ["simulate_splitwise_sim", "splitwise_slo_check"]

TRANSFER_BYTES_PER_S = 200 * 1024**3  # SplitwiseSim's mixed_pool transfer_bandwidth: 200 GiB/s
TRANSFER_RETRY_S = 1.0  # a transfer that finds no room on the token instance looks again this much later
END_TIME_S = 86_400.0  # SplitwiseSim's default end of simulated time
# SimConfig fields that mean nothing to SplitwiseSim's model, with the values that leave them unused.
UNUSED_FIELDS = {
    "kv_capacity_tokens": None,
    "link_gbps": None,
    "kv_bytes_per_token": None,
    "request_overhead_s": 0.0,
    "iteration_overhead_s": 0.0,
}


@dataclass(slots=True)
class Transfer:
    """The prompt's KV on its way from the prompt instance to the token instance."""

    source: Instance
    destination: Instance
    size_bytes: int


def simulate_splitwise_sim(
    design: ClusterDesign, requests: Sequence[TraceRequest], config: SimConfig
) -> SimResult:
    started = time.perf_counter()
    run = _Run(design, requests, config)
    run.loop.run(END_TIME_S)
    return run.result(time.perf_counter() - started)


class _Run:
    def __init__(self, design: ClusterDesign, requests: Sequence[TraceRequest], config: SimConfig) -> None:
        if not requests:
            raise ValueError("no requests to simulate (the trace slice is empty)")
        _check_config(config)
        self.design, self.config = design, config
        self.catalog = BUILTIN_MACHINES if config.catalog is None else config.catalog
        self.shape: ModelShape = MODEL_SHAPES[config.model]
        hardware = {
            role: config.hardware_of(machine_type(p.machine_type, self.catalog)) for role, p in design.pools()
        }
        self.perf = load_perf(config.perf_csv, config.model, config.tensor_parallel,
                              [*hardware.values(), config.reference_hardware])  # fmt: skip
        timers = load_timers(config.perf_csv, config.model, config.tensor_parallel, hardware.values())
        self.specs = build_specs(design, config, self.catalog, timers)
        self.loop = EventLoop()
        limits = Limits(max_batch_size=config.max_batch_size, max_batch_tokens=config.max_batch_tokens)
        self.instances: dict[str, list[Instance]] = {
            role: [self._instance(spec, role, limits) for spec in self.specs[role]] for role in hardware
        }
        if design.colocated is not None:
            self.scheduler: TokenJSQScheduler | MixedPoolScheduler = TokenJSQScheduler(
                self.instances["colocated"]
            )
            self.policy = "token_jsq"
        else:
            self.scheduler = MixedPoolScheduler(self.instances["prefill"], self.instances["decode"])
            self.policy = "mixed_pool"
        check_requests(requests)
        self.requests = [
            Request(i, r.arrival_s, r.prompt_tokens, r.output_tokens, self.shape)
            for i, r in enumerate(requests)
        ]
        self.placed: list[tuple[Instance, Instance] | None] = [None] * len(self.requests)
        for request in self.requests:
            self.loop.schedule(request.arrival, partial(self._arrive, request))

    def _instance(self, spec: NodeSpec, role: str, limits: Limits) -> Instance:
        machine = machine_type(spec.machine_type, self.catalog)
        gpus = self.config.tensor_parallel if machine.gpus else 1
        return Instance(
            name=spec.node_id,
            tag={"prefill": "prompt", "decode": "token"}.get(role, "colocated"),
            perf=self.perf[spec.hardware],
            limits=limits,
            weight_bytes=self.shape.weight_bytes,
            max_memory=gpus
            * hardware.gpu_memory_gb(machine.accelerator)
            * 1024**3,  # "80gb": 80 GiB, as SplitwiseSim
            loop=self.loop,
            task_done=self._task_done,
            went_idle=self._went_idle,
        )

    def _went_idle(self, instance: Instance) -> None:
        self.scheduler.went_idle(instance)

    # -- a request's life ------------------------------------------------------------------------------------------

    def _arrive(self, request: Request) -> None:
        prompt, token = self.scheduler.place(request)
        self.placed[request.index] = (prompt, token)
        if prompt is not token:
            request.transfer = Transfer(prompt, token, self.shape.kv_bytes(request.prompt_tokens))
        prompt.task_arrival(request.prompt_task)
        if prompt is token:
            prompt.task_arrival(request.token_task)

    def _task_done(self, task: Task) -> None:
        request = task.request
        if not task.is_prompt:
            request.completion = self.loop.now
        elif request.transfer is not None:
            self._offer_transfer(request)

    def _offer_transfer(self, request: Request) -> None:
        transfer = request.transfer
        assert isinstance(transfer, Transfer)
        destination = transfer.destination
        if destination.memory + request.memory <= destination.max_memory:
            destination.alloc_memory(request.memory)
            self.loop.schedule(
                transfer.size_bytes / TRANSFER_BYTES_PER_S, lambda: self._transfer_done(request)
            )
        else:
            self.loop.schedule(TRANSFER_RETRY_S, lambda: self._offer_transfer(request))

    def _transfer_done(self, request: Request) -> None:
        transfer = request.transfer
        assert isinstance(transfer, Transfer)
        transfer.source.free_memory(request.memory)
        transfer.destination.task_arrival(request.token_task)
        transfer.source.transfer_done()

    # -- the outcome ---------------------------------------------------------------------------------------------

    def result(self, wall_s: float) -> SimResult:
        unfinished = sum(1 for r in self.requests if math.isnan(r.completion))
        if unfinished:
            raise ValueError(f"{unfinished} of {len(self.requests)} requests did not finish in SplitwiseSim's model "
                             f"within {END_TIME_S:.0f} simulated seconds")  # fmt: skip
        arrival = np.array([r.arrival for r in self.requests], dtype=np.float64)
        prompt = np.array([r.prompt_tokens for r in self.requests], dtype=np.int64)
        output = np.array([r.output_tokens for r in self.requests], dtype=np.int64)
        ttft = np.array([r.first_token for r in self.requests]) - arrival
        e2e = np.array([r.completion for r in self.requests]) - arrival
        tbt = (e2e - ttft) / output
        duration = float((arrival + e2e).max() - arrival.min())
        every = [instance for pool in self.instances.values() for instance in pool]
        specs = {spec.node_id: spec for pool in self.specs.values() for spec in pool}
        placed = [p for p in self.placed if p is not None]
        reference = self.perf[self.config.reference_hardware]
        return SimResult.assemble(
            self.design,
            self.catalog,
            latencies=(arrival, ttft, tbt, e2e),
            prompt=prompt,
            output=output,
            nodes=([p.name for p, _ in placed], [d.name for _, d in placed]),
            policy=f"splitwise-sim {self.policy}",
            reference_hardware=self.config.reference_hardware,
            duration_s=duration,
            energy_j=sum(_energy_j(instance, specs[instance.name], duration) for instance in every),
            slo=splitwise_slo_check(reference, prompt, output, ttft, tbt, e2e),
            wall_s=wall_s,
            events=self.loop.processed,
        )


def splitwise_slo_check(
    reference: SplitwisePerf,
    prompt: np.ndarray,
    output: np.ndarray,
    ttft: np.ndarray,
    tbt: np.ndarray,
    e2e: np.ndarray,
) -> SloCheck:
    """The paper's notebooks' 9-SLO check (module docstring): slowdowns strictly under each limit."""
    alone_ttft = np.array([reference.prompt(int(p)) for p in prompt])
    alone_tbt = np.array([reference.token(int(p)) for p in prompt])
    alone_e2e = alone_ttft + alone_tbt * (output - 1)
    slowdowns = {"ttft": ttft / alone_ttft, "tbt": tbt / alone_tbt, "e2e": e2e / alone_e2e}
    return slowdown_check(slowdowns, compared=len(prompt), strict=True)


def _check_config(config: SimConfig) -> None:
    if config.model not in MODEL_SHAPES:
        raise ValueError(
            f"SplitwiseSim fidelity knows the models {', '.join(MODEL_SHAPES)}, not {config.model!r}"
        )
    if config.policy != "jsq" or config.policy_options:
        raise ValueError(
            "a placement policy has no meaning in SplitwiseSim fidelity: it schedules as SplitwiseSim does "
            "(mixed_pool for phase-split designs, token_jsq for colocated ones)"
        )
    for name, unused in UNUSED_FIELDS.items():
        if getattr(config, name) != unused:
            raise ValueError(
                f"{name} has no meaning in SplitwiseSim fidelity (its own memory, link and overheads)"
            )


def _energy_j(instance: Instance, spec: NodeSpec, duration: float) -> float:
    busy = instance.busy_prompt_s + instance.busy_token_s
    idle = max(0.0, duration - busy)
    return spec.idle_w * idle + spec.prompt_w * instance.busy_prompt_s + spec.token_w * instance.busy_token_s
