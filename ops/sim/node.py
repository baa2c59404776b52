"""One simulated node (a model instance): its queues, its batch, and when its next iteration boundary is.

Every node can run both phases; which work it gets depends on where the policy places requests (a prefill-pool node
serves whole requests only when borrowed, a decode-pool node computes prompts only for local prefill). Work on a
node passes through:
1. prompt queue (FCFS): requests placed here for their prompt. A batch is the longest FCFS prefix holding at most
   max_batch_tokens prompt tokens (a longer prompt runs alone). A request that also decodes here (colocated,
   borrowed, local prefill) needs its KV (prompt + output tokens) reserved and a decode slot first; if it does not
   fit, the batch stops there: nobody overtakes it.
2. prompt iteration: PerfModel.prompt_time_s(batch tokens), or mixed_time_s(tokens, running) when decodes are
   running, which then advance one token too (Splitwise's mixed machines run prompts first). The first token of
   every request in the batch is out at the batch's end.
3. decode queue (FCFS): requests whose KV arrived from a prefill node, admitted at an iteration boundary when their
   KV (prompt + output tokens) fits and the batch has fewer than max_batch_size sequences.
4. decode batch: each iteration of token_time_s(batch size) gives every member one token.

Decode iterations are not simulated one by one. Between batch changes every member advances at the same rate, so
the node keeps an iteration counter and a heap of the iteration at which each member finishes; it wakes only at a
finish or, when new work arrives mid-run, at the next iteration boundary (work joins between iterations).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ops.sim.timing import BatchTimer
    from router.cluster_index import RoleArrays

IDLE, PROMPT, TOKEN = 0, 1, 2
# Schedules a wake: (node index, version, time, decode iterations done by then).
Scheduler = Callable[[int, int, float, int], None]


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """What does not change during a run; powers and cost are this instance's share of its machine."""

    node_id: str
    machine_type: str
    hardware: str  # the perf-CSV hardware timing it
    kv_capacity: int  # tokens of KV
    link_bytes_per_s: float  # for KV transfers; 0 where none can happen
    layerwise_residual_s: float  # what a layer-wise transfer leaves after the compute
    idle_w: float
    prompt_w: float
    token_w: float
    cost_per_s: float


class RequestBook:
    """Per-request lengths and where each decodes, shared by the nodes and the simulator (index = trace order)."""

    __slots__ = ("decodes_locally", "output", "prompt")

    def __init__(self, prompt: list[int], output: list[int]) -> None:
        self.prompt = prompt
        self.output = output
        self.decodes_locally = [False] * len(prompt)


class Node:
    def __init__(
        self,
        index: int,
        spec: NodeSpec,
        timer: BatchTimer,
        book: RequestBook,
        arrays: RoleArrays,
        position: int,
        limits: tuple[int, int],
        schedule: Scheduler,
    ) -> None:
        self.index, self.spec, self.timer, self.book = index, spec, timer, book
        self.arrays, self.position = arrays, position
        self.max_batch_tokens, self.max_batch_size = limits
        self._schedule = schedule
        self.prompt_queue: deque[int] = deque()
        self.pending_prompt_tokens = 0  # queued plus in the running prompt batch
        self.batch: list[int] = []
        self.batch_tokens = 0
        self.batch_had_decodes = False
        self.last_batch_s = 0.0  # duration of the prompt batch that just ended
        self.decode_queue: deque[int] = deque()
        self.finishing: list[tuple[int, int]] = []  # heap of (iteration it finishes at, request)
        self.kv_used = 0  # tokens reserved by admitted requests
        self.kv_incoming = 0  # prompt tokens of requests placed here to decode, not admitted yet
        self.iterations = 0  # decode iterations completed
        self.phase = IDLE
        self.phase_start = 0.0
        self.iteration_s = 0.0  # of the running token phase
        self.phase_iteration0 = 0
        self.version = 0  # of the pending wake; older wakes are stale
        self.wake_iteration = 0
        self.busy_prompt_s = 0.0
        self.busy_token_s = 0.0

    # -- work arriving ------------------------------------------------------------------------------------------

    def enqueue_prompt(self, request: int, now: float) -> None:
        was_empty = not self.prompt_queue
        self.prompt_queue.append(request)
        self.pending_prompt_tokens += self.book.prompt[request]
        self.publish()
        if was_empty:
            self._poke(now)

    def expect_kv(self, request: int) -> None:
        """A request was placed here to decode: its KV will arrive after its prompt elsewhere."""
        self.kv_incoming += self.book.prompt[request]
        self.publish()

    def drop_expected_kv(self, request: int) -> None:
        """A request placed here needs no decode after all (a single output token came with its prompt)."""
        self.kv_incoming -= self.book.prompt[request]
        self.publish()

    def receive_kv(self, request: int, now: float) -> None:
        was_empty = not self.decode_queue
        self.decode_queue.append(request)
        if was_empty and self._fits(request) and len(self.finishing) < self.max_batch_size:
            self._poke(now)

    def _poke(self, now: float) -> None:
        """New work: start now if idle, join at the next iteration boundary if decoding, else after the batch."""
        if self.phase == IDLE:
            self._wake_at(now, self.iterations)
        elif self.phase == TOKEN:
            done = math.ceil((now - self.phase_start) / self.iteration_s - 1e-9)
            target = self.phase_iteration0 + max(0, done)
            if target < self.wake_iteration:
                self._wake_at(self.phase_start + (target - self.phase_iteration0) * self.iteration_s, target)

    # -- a wake: the end of an iteration run --------------------------------------------------------------------

    def step(self, now: float, iteration: int) -> tuple[list[int], list[int]]:
        """Finish what ended at `now`, then start the next work. Returns (prompts done, requests finished)."""
        prompts_done: list[int] = []
        finished: list[int] = []
        if self.phase == PROMPT:
            self.busy_prompt_s += now - self.phase_start
            self.last_batch_s = now - self.phase_start
            if self.batch_had_decodes:
                self.iterations += 1
            self._pop_finished(finished)
            self._end_prompt_batch(prompts_done, finished)
        elif self.phase == TOKEN:
            self.busy_token_s += now - self.phase_start
            self.iterations = iteration
            self._pop_finished(finished)
        self._admit_arrived_kv()
        self._start_next(now)
        self.publish()
        return prompts_done, finished

    def _pop_finished(self, finished: list[int]) -> None:
        book, finishing = self.book, self.finishing
        while finishing and finishing[0][0] <= self.iterations:
            request = heapq.heappop(finishing)[1]
            self.kv_used -= book.prompt[request] + book.output[request]
            finished.append(request)

    def _end_prompt_batch(self, prompts_done: list[int], finished: list[int]) -> None:
        book = self.book
        for request in self.batch:
            prompts_done.append(request)
            if not book.decodes_locally[request]:
                continue
            if book.output[request] > 1:
                heapq.heappush(self.finishing, (self.iterations + book.output[request] - 1, request))
            else:
                self.kv_used -= book.prompt[request] + book.output[request]
                finished.append(request)
        self.pending_prompt_tokens -= self.batch_tokens
        self.batch, self.batch_tokens = [], 0

    def _fits(self, request: int) -> bool:
        need = self.book.prompt[request] + self.book.output[request]
        return self.kv_used + need <= self.spec.kv_capacity

    def _admit_arrived_kv(self) -> None:
        book, queue = self.book, self.decode_queue
        while queue and len(self.finishing) < self.max_batch_size and self._fits(queue[0]):
            request = queue.popleft()
            self.kv_used += book.prompt[request] + book.output[request]
            self.kv_incoming -= book.prompt[request]
            heapq.heappush(self.finishing, (self.iterations + book.output[request] - 1, request))

    def _take_prompt_batch(self) -> None:
        book, queue = self.book, self.prompt_queue
        free_kv = self.spec.kv_capacity - self.kv_used
        free_slots = self.max_batch_size - len(self.finishing)
        tokens = 0
        while queue:
            request = queue[0]
            prompt = book.prompt[request]
            if self.batch and tokens + prompt > self.max_batch_tokens:
                break
            if book.decodes_locally[request]:
                need = prompt + book.output[request]
                if need > free_kv or free_slots == 0:
                    break
                free_kv -= need
                free_slots -= 1
            self.batch.append(queue.popleft())
            tokens += prompt
        self.kv_used = self.spec.kv_capacity - free_kv
        self.batch_tokens = tokens

    def _start_next(self, now: float) -> None:
        self.phase_start = now
        if self.prompt_queue:
            self._take_prompt_batch()
        running = len(self.finishing)
        if self.batch:
            self.phase = PROMPT
            self.batch_had_decodes = running > 0
            self._wake_at(now + self.timer.mixed_s(self.batch_tokens, running), self.iterations)
        elif running:
            self.phase = TOKEN
            self.iteration_s = self.timer.token_s(running)
            self.phase_iteration0 = self.iterations
            target = self.finishing[0][0]
            self._wake_at(now + (target - self.iterations) * self.iteration_s, target)
        else:
            self.phase = IDLE
            self.version += 1  # no wake pending

    def _wake_at(self, time: float, iteration: int) -> None:
        self.version += 1
        self.wake_iteration = iteration
        self._schedule(self.index, self.version, time, iteration)

    # -- what the policy sees and what the run cost ---------------------------------------------------------------

    def publish(self) -> None:
        """Write this node's load into its role's placement arrays (the router's load report)."""
        arrays, i, spec = self.arrays, self.position, self.spec
        arrays.pending_tokens[i] = self.pending_prompt_tokens
        arrays.running[i] = len(self.finishing) + len(self.batch)
        arrays.free_blocks[i] = max(0, spec.kv_capacity - self.kv_used - self.kv_incoming)
        arrays.power_w[i] = self.power_w()

    def power_w(self) -> float:
        return (self.spec.idle_w, self.spec.prompt_w, self.spec.token_w)[self.phase]

    def energy_j(self, duration_s: float) -> float:
        busy = self.busy_prompt_s + self.busy_token_s
        spec = self.spec
        idle = max(0.0, duration_s - busy)
        return spec.idle_w * idle + spec.prompt_w * self.busy_prompt_s + spec.token_w * self.busy_token_s
