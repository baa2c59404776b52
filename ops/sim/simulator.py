"""The discrete-event loop: arrivals, placement by the router's own policy, prompt batches, KV transfers, decodes.

A request's life in the simulation:
1. arrival: the router's policy (router.policies.create_policy, the very object the router runs) picks a
   (prefill, decode) pair or one node for both phases from the nodes' placement arrays. If it picks nothing (no
   capacity), the request waits in the router's FCFS queue, retried whenever a node finishes work.
2. prompt on the prefill node (ops/sim/node.py): batched, first token at the batch's end (TTFT).
3. KV transfer to the decode node: prompt tokens x KV bytes per token over the slower of the two nodes' links.
   Prompts under serialize_below_tokens go in one piece after the prompt (the whole transfer is added); longer
   ones layer by layer during the prompt's compute, adding max(the hardware's residual, what outlasts the compute).
   Transfers do not contend for links. A request with one output token needs no decode and finishes with its prompt.
4. decode on the decode node until the last token (E2E); a node running both phases skips step 3.

What the policy sees per request (PlacementRequest): prompt tokens, prompt + output as max_total_tokens (the trace's
output length plays max_tokens), the running mean of finished outputs as expected_output_tokens (the router does not
know the length in advance), and TTFT/TBT targets at Splitwise's P50 limits times the request's alone-latency on the
reference hardware. The arrays are the live ones; policies only read them.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import Sequence

import numpy as np

from cluster.machines import BUILTIN_MACHINES
from cluster.slo import SPLITWISE_SLO_LIMITS
from ops.bench.workload import TraceRequest, check_requests
from ops.sim import hardware
from ops.sim.cluster import build_specs, role_arrays
from ops.sim.config import SimConfig
from ops.sim.design import ClusterDesign, machine_type
from ops.sim.node import Node, RequestBook
from ops.sim.result import SimResult, slo_check
from ops.sim.splitwise_sim import simulate_splitwise_sim
from ops.sim.timing import load_timers
from router.cluster_index import ROLES, RoleArrays
from router.policies import create_policy
from router.policy import Placement, PlacementPolicy, PlacementRequest

__all__ = ["simulate"]

_WAKE, _KV_READY = 0, 1
# Before any request finishes, the router expects this many output tokens (PlacementRequest's default).
_INITIAL_EXPECTED_OUTPUT = 128


def simulate(design: ClusterDesign, requests: Sequence[TraceRequest], config: SimConfig) -> SimResult:
    """Run `requests` (arrival offsets in seconds, in order) through `design`; ValueError for unusable input.

    With config.fidelity "splitwise-sim" the run is SplitwiseSim's model instead (ops/sim/splitwise_sim)."""
    if config.fidelity == "splitwise-sim":
        return simulate_splitwise_sim(design, requests, config)
    started = time.perf_counter()
    run = _Simulation(design, requests, config)
    run.run()
    return run.result(wall_s=time.perf_counter() - started)


class _Simulation:
    def __init__(self, design: ClusterDesign, requests: Sequence[TraceRequest], config: SimConfig) -> None:
        if not requests:
            raise ValueError("no requests to simulate (the trace slice is empty)")
        self.design, self.config = design, config
        self.catalog = BUILTIN_MACHINES if config.catalog is None else config.catalog
        self.policy: PlacementPolicy = create_policy(config.policy, **config.policy_options)
        hardwares = [
            config.hardware_of(machine_type(p.machine_type, self.catalog)) for _, p in design.pools()
        ]
        self.timers = load_timers(
            config.perf_csv,
            config.model,
            config.tensor_parallel,
            [*hardwares, config.reference_hardware],
            config.iteration_overhead_s,
        )
        self.arrival = [r.arrival_s for r in requests]
        self.book = RequestBook([r.prompt_tokens for r in requests], [r.output_tokens for r in requests])
        check_requests(requests)
        specs = build_specs(design, config, self.catalog, self.timers)
        self.roles: dict[str, RoleArrays] = {role: role_arrays(specs[role], self.timers) for role in ROLES}
        self.nodes: list[Node] = []
        for role in ROLES:
            for position, spec in enumerate(specs[role]):
                node = Node(
                    len(self.nodes),
                    spec,
                    self.timers[spec.hardware],
                    self.book,
                    self.roles[role],
                    position,
                    (config.max_batch_tokens, config.max_batch_size),
                    self._schedule_wake,
                )
                self.nodes.append(node)
        self.by_id = {node.spec.node_id: node for node in self.nodes}
        self._check_capacity()
        self.kv_bytes_per_token = self._kv_bytes_per_token()
        n = len(requests)
        self.first_token = [math.nan] * n
        self.finish = [math.nan] * n
        self.prefill_node: list[str] = [""] * n
        self.decode_node: list[Node | None] = [None] * n
        self.reference = self.timers[config.reference_hardware]
        self.alone_tbt_s = self.reference.token_s(1)
        self.router_queue: deque[int] = deque()
        self.events: list[tuple[float, int, int, int, int, int]] = []
        self.sequence = itertools.count()
        self.processed = 0
        self.finished_count = 0
        self.finished_output_tokens = 0

    def _check_capacity(self) -> None:
        """Every request must fit the KV of any node it could decode on, or it would wait forever."""
        smallest = min(node.spec.kv_capacity for node in self.nodes)
        for i, (prompt, output) in enumerate(zip(self.book.prompt, self.book.output, strict=True)):
            if prompt + output > smallest:
                raise ValueError(
                    f"request {i} needs KV for {prompt + output} tokens, but the smallest node holds {smallest}; "
                    "raise kv_capacity_tokens or tensor_parallel, or cut the trace's context"
                )

    def _kv_bytes_per_token(self) -> int:
        if self.design.prefill is None:
            return 0  # no transfers in a colocated cluster
        if self.config.kv_bytes_per_token is not None:
            return self.config.kv_bytes_per_token
        return hardware.model_spec(self.config.model).kv_bytes_per_token

    # -- the loop ---------------------------------------------------------------------------------------------------

    def run(self) -> None:
        events, count = self.events, len(self.arrival)
        # Requests reach the nodes request_overhead_s after they arrive; latencies still count from arrival.
        overhead = self.config.request_overhead_s
        arrival = [a + overhead for a in self.arrival] if overhead else self.arrival
        next_request = 0
        while True:
            next_arrival = arrival[next_request] if next_request < count else math.inf
            # Arrivals first at equal times, so that requests arriving together can share a batch.
            if events and events[0][0] < next_arrival:
                now, _, kind, a, b, c = heapq.heappop(events)
                self.processed += 1
                if kind == _WAKE:
                    node = self.nodes[a]
                    if b == node.version:
                        self._on_wake(node, now, c)
                else:
                    self._decoder(a).receive_kv(a, now)
            elif next_request < count:
                self.processed += 1
                self._on_arrival(next_request, next_arrival)
                next_request += 1
            else:
                break
        if self.finished_count < count:
            raise ValueError(
                f"{count - self.finished_count} of {count} requests were never served: policy "
                f"{self.config.policy!r} placed nothing for them while the cluster was idle"
            )

    def _schedule_wake(self, node: int, version: int, at: float, iteration: int) -> None:
        heapq.heappush(self.events, (at, next(self.sequence), _WAKE, node, version, iteration))

    def _on_arrival(self, request: int, now: float) -> None:
        if self.router_queue or not self._place(request, now):
            self.router_queue.append(request)

    def _place(self, request: int, now: float) -> bool:
        book = self.book
        prompt, output = book.prompt[request], book.output[request]
        expected = (
            round(self.finished_output_tokens / self.finished_count)
            if self.finished_count
            else _INITIAL_EXPECTED_OUTPUT
        )
        placement = self.policy.place(
            PlacementRequest(
                prompt_tokens=prompt,
                max_total_tokens=prompt + output,
                expected_output_tokens=max(1, min(output, expected)),
                ttft_slo_s=SPLITWISE_SLO_LIMITS["ttft", 50] * self.reference.prompt_s(prompt),
                tbt_slo_s=SPLITWISE_SLO_LIMITS["tbt", 50] * self.alone_tbt_s,
            ),
            self.roles,
        )
        if placement is None:
            return False
        self._assign(request, placement, now)
        return True

    def _assign(self, request: int, placement: Placement, now: float) -> None:
        if placement.prefill is not None and placement.decode is not None:
            prefill, decode = self._node(placement.prefill), self._node(placement.decode)
            self.decode_node[request] = decode
            decode.expect_kv(request)
        elif placement.colocated is not None:
            prefill = self._node(placement.colocated)
            self.decode_node[request] = prefill
            self.book.decodes_locally[request] = True
        else:
            raise ValueError(f"policy {self.config.policy!r} returned an incomplete placement {placement}")
        self.prefill_node[request] = prefill.spec.node_id
        prefill.enqueue_prompt(request, now)

    def _node(self, node_id: str) -> Node:
        try:
            return self.by_id[node_id]
        except KeyError:
            raise ValueError(f"policy {self.config.policy!r} placed on unknown node {node_id!r}") from None

    def _decoder(self, request: int) -> Node:
        node = self.decode_node[request]
        if node is None:
            raise RuntimeError(f"request {request} has no decode node")  # set at placement: a simulator bug
        return node

    def _on_wake(self, node: Node, now: float, iteration: int) -> None:
        prompts_done, finished = node.step(now, iteration)
        book = self.book
        for request in prompts_done:
            self.first_token[request] = now
            if book.decodes_locally[request]:
                continue
            decode = self._decoder(request)
            if book.output[request] == 1:
                decode.drop_expected_kv(request)
                self._finished(request, now)
            else:
                ready = now + self._transfer_s(request, node, decode)
                heapq.heappush(self.events, (ready, next(self.sequence), _KV_READY, request, 0, 0))
        for request in finished:
            self._finished(request, now)
        if self.router_queue:
            self._drain_router_queue(now)

    def _transfer_s(self, request: int, prefill: Node, decode: Node) -> float:
        prompt = self.book.prompt[request]
        bandwidth = min(prefill.spec.link_bytes_per_s, decode.spec.link_bytes_per_s)
        whole = self.kv_bytes_per_token * prompt / bandwidth
        if prompt < self.config.serialize_below_tokens:
            return whole
        residual = max(prefill.spec.layerwise_residual_s, decode.spec.layerwise_residual_s)
        return max(residual, whole - prefill.last_batch_s)

    def _finished(self, request: int, now: float) -> None:
        self.finish[request] = now
        self.finished_count += 1
        self.finished_output_tokens += self.book.output[request]

    def _drain_router_queue(self, now: float) -> None:
        queue = self.router_queue
        while queue and self._place(queue[0], now):
            queue.popleft()

    # -- the outcome ------------------------------------------------------------------------------------------------

    def result(self, wall_s: float) -> SimResult:
        arrival = np.asarray(self.arrival, dtype=np.float64)
        prompt = np.asarray(self.book.prompt, dtype=np.int64)
        output = np.asarray(self.book.output, dtype=np.int64)
        first_token = np.asarray(self.first_token, dtype=np.float64)
        finish = np.asarray(self.finish, dtype=np.float64)
        ttft, e2e = first_token - arrival, finish - arrival
        with np.errstate(invalid="ignore", divide="ignore"):
            tbt = np.where(output > 1, (finish - first_token) / np.maximum(output - 1, 1), np.nan)
        duration = float(finish.max() - arrival.min())
        return SimResult.assemble(
            self.design,
            self.catalog,
            latencies=(arrival, ttft, tbt, e2e),
            prompt=prompt,
            output=output,
            nodes=(self.prefill_node, [self._decoder(i).spec.node_id for i in range(len(arrival))]),
            policy=self.config.policy,
            reference_hardware=self.config.reference_hardware,
            duration_s=duration,
            energy_j=sum(node.energy_j(duration) for node in self.nodes),
            slo=slo_check(self.reference, prompt, output, ttft, tbt, e2e),
            wall_s=wall_s,
            events=self.processed,
        )
