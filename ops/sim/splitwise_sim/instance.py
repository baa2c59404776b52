"""One model instance as SplitwiseSim's "Splitwise" instance runs it: iteration-level batching of prompt and token
tasks with a token budget, KV memory admission, contiguous token iterations, and preemption.

The rules, in the order SplitwiseSim applies them:
- Arrival: a task joins the request pool (requests by arrival time) and the pending queue (by preemptions, then
  arrival). An idle instance starts an iteration if the task's KV fits; a busy one cuts its run of token iterations
  short at the next boundary when the task fits the batch (size and token budget), or when it is a prompt that fits
  the prompt part of the budget.
- Batch selection, at every iteration start: tasks preempted max_preemptions times or more (only when every pending
  task has been), then pending prompts, then preempted token tasks, then the running batch, then any other request's
  first task; each step stops at max_batch_size tasks or max_batch_tokens tokens (a prompt counts its size, a token
  task 1). New work must fit the KV memory left; running and preempted work is not checked. A running task left out
  is preempted. Every pooled request whose first task is not in the batch counts one preemption.
- Duration: one iteration when the batch has a prompt, else as many as the shortest remaining output, each
  costing the performance model's iteration time (ops/sim/splitwise_sim/perf.py).
- Memory: a task's KV is allocated when it first runs; a prompt instance frees the prompt's KV once its transfer is
  done, a token instance frees all of the request's KV when it finishes.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import TYPE_CHECKING

from ops.sim.splitwise_sim.work import BLOCKED, COMPLETED, QUEUED, RUNNING, Task

if TYPE_CHECKING:
    from ops.sim.splitwise_sim.events import Event, EventLoop
    from ops.sim.splitwise_sim.perf import SplitwisePerf
    from ops.sim.splitwise_sim.work import Request

__all__ = ["Instance", "Limits"]

TaskDone = Callable[[Task], None]


class Limits:
    __slots__ = ("max_batch_size", "max_batch_tokens", "max_preemptions")

    def __init__(
        self, max_batch_size: int = 512, max_batch_tokens: int = 2048, max_preemptions: int = 4
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_preemptions = max_preemptions


def _arrival(request: Request) -> float:
    return request.arrival


class Instance:
    def __init__(
        self,
        name: str,
        tag: str,
        perf: SplitwisePerf,
        limits: Limits,
        weight_bytes: int,
        max_memory: int,
        loop: EventLoop,
        task_done: TaskDone,
        went_idle: Callable[[Instance], None],
    ) -> None:
        self.name, self.tag, self.perf, self.limits = name, tag, perf, limits
        self.loop, self._task_done, self._went_idle = loop, task_done, went_idle
        self.max_memory = max_memory
        self.memory = weight_bytes  # allocated: the weights, then KV
        # The scheduler's own view: KV promised at placement, freed as the instance frees it.
        self.sched_memory = weight_bytes
        self.sched_pending_tokens = 0
        self.sched_mixed = False  # lent to the other pool by the mixed-pool scheduler
        self.pending_queue: list[Task] = []
        self.pending_prompts: list[Task] = []
        self.blocked: list[Task] = []
        self.pending_requests: list[Request] = []  # by arrival
        self.request_tasks: dict[Request, list[Task]] = {}
        self.batch: list[Task] = []
        self.prompts_in_batch = 0
        self.batch_tokens = 0
        self.iteration_s = 0.0
        self.contiguous: float = (
            0  # iterations the running run covers (a float once cut short, as in SplitwiseSim)
        )
        self.pause_next = False
        self.completion: Event | None = None
        # what the run cost, for energy: seconds busy with a prompt in the batch, and with tokens only
        self.run_started = 0.0
        self.busy_prompt_s = 0.0
        self.busy_token_s = 0.0

    # -- memory ---------------------------------------------------------------------------------------------------

    def alloc_memory(self, size: int) -> None:
        self.memory += size

    def free_memory(self, size: int) -> None:
        self.memory -= size
        self.sched_memory -= size

    # -- work arriving ----------------------------------------------------------------------------------------------

    def task_arrival(self, task: Task) -> None:
        task.state = QUEUED
        tasks = self.request_tasks.get(task.request)
        if tasks is None:
            bisect.insort(self.pending_requests, task.request, key=_arrival)
            self.request_tasks[task.request] = [task]
        else:
            tasks.append(task)
        self._add_pending(task)
        limits = self.limits
        if not self.batch:
            if self.memory + task.memory > self.max_memory:
                return
            self.start_iteration()
            return
        if len(self.batch) < limits.max_batch_size and (
            self.batch_tokens + task.tokens_per_iteration <= limits.max_batch_tokens
        ):
            self._pause()
            return
        if task.is_prompt:
            token_tasks = len(self.batch) - self.prompts_in_batch
            batch_prompt_tokens = self.batch_tokens - token_tasks
            if self.prompts_in_batch < len(self.batch) and (
                batch_prompt_tokens + task.size <= limits.max_batch_tokens
            ):
                self._pause()

    def transfer_done(self) -> None:
        """A KV transfer out of this instance finished (its memory is free): maybe start the waiting work."""
        if not self.pending_queue:
            return
        task = self.pending_queue[0]
        if not self.batch:
            if self.memory + task.memory > self.max_memory:
                return
            self.start_iteration()
            return
        if len(self.batch) < self.limits.max_batch_size and self.batch_tokens < self.limits.max_batch_tokens:
            self._pause()

    def _add_pending(self, task: Task, preempted: bool = False) -> None:
        bisect.insort(self.pending_queue, task, key=Task.sort_key)
        if preempted:
            self.blocked.append(task)
        if task.is_prompt:
            self.pending_prompts.append(task)

    def _remove_pending(self, task: Task) -> None:
        self.pending_queue.remove(task)
        if task in self.blocked:
            self.blocked.remove(task)
        if task.is_prompt:
            self.pending_prompts.remove(task)

    # -- iterations -------------------------------------------------------------------------------------------------

    def start_iteration(self) -> None:
        preempted, new = self._select_batch()
        for task in preempted:
            task.state = BLOCKED
            self._remove_from_batch(task)
            self._add_pending(task, preempted=True)
        for task in new:
            self._remove_pending(task)
            self._add_to_batch(task)
        for request in self.pending_requests:
            first = self.request_tasks[request][0]
            if not first.in_batch:
                first.num_preemptions += 1
        if not self.batch:
            if not self.pending_requests:
                self._went_idle(self)
            return
        prompt_tokens = sum(t.size for t in self.batch if t.is_prompt)
        self.iteration_s = self.perf.iteration_s(
            prompt_tokens, len(self.batch) - self.prompts_in_batch, self.prompts_in_batch
        )
        self.contiguous = 1 if self.prompts_in_batch else min(t.size - t.generated for t in self.batch)
        for task in self.batch:
            task.generating = self.contiguous
            if task.state == QUEUED:
                task.state = RUNNING
                self.alloc_memory(task.memory)
                task.request.memory += task.memory
            elif task.state == BLOCKED:
                task.state = RUNNING
        self.run_started = self.loop.now
        self.completion = self.loop.schedule(self.iteration_s * self.contiguous, self.complete_iteration)

    def _pause(self) -> None:
        """Cut a run of token iterations short at the next iteration boundary, for work that has arrived."""
        if self.pause_next or self.prompts_in_batch:
            return
        self.pause_next = True
        completion = self.completion
        assert completion is not None  # a token run is under way
        now = self.loop.now
        iteration_start = completion.time - self.iteration_s * self.contiguous
        elapsed = now - iteration_start
        self.contiguous = (elapsed // self.iteration_s) + 1
        for task in self.batch:
            task.generating = self.contiguous
        remaining = self.iteration_s * self.contiguous - elapsed
        event = self.loop.reschedule(completion, remaining)
        if (
            event is not None
        ):  # None: the boundary is now, and the iteration already completed (and restarted)
            self.completion = event

    def complete_iteration(self) -> None:
        seconds = self.loop.now - self.run_started
        if self.prompts_in_batch:
            self.busy_prompt_s += seconds
        else:
            self.busy_token_s += seconds
        finished = []
        for task in self.batch:
            task.generated += task.generating
            task.generating = 0
            if task.done():
                finished.append(task)
        for task in finished:
            self._complete(task)
        self.pause_next = False
        self.start_iteration()

    def _complete(self, task: Task) -> None:
        task.state = COMPLETED
        request = task.request
        if task.is_prompt:
            self.sched_pending_tokens -= task.size
            request.first_token = self.loop.now
        else:
            self.sched_pending_tokens -= 1
            self.free_memory(request.memory)
            request.memory = 0
        self._remove_from_batch(task)
        tasks = self.request_tasks[request]
        tasks.remove(task)
        if not tasks:
            self.pending_requests.remove(request)
            del self.request_tasks[request]
        self._task_done(task)

    def _add_to_batch(self, task: Task) -> None:
        self.batch.append(task)
        task.in_batch = True
        if task.is_prompt:
            self.prompts_in_batch += 1

    def _remove_from_batch(self, task: Task) -> None:
        self.batch.remove(task)
        task.in_batch = False
        if task.is_prompt:
            self.prompts_in_batch -= 1

    def _select_batch(self) -> tuple[list[Task], list[Task]]:
        """SplitwiseSim's five passes (module docstring). Returns (running tasks left out, tasks new to the batch)."""
        limits = self.limits
        max_size, max_tokens = limits.max_batch_size, limits.max_batch_tokens
        chosen: list[Task] = []
        in_batch: set[Request] = set()
        tokens = 0
        memory = self.memory

        def full(task: Task) -> bool:
            return len(chosen) == max_size or (
                bool(chosen) and tokens + task.tokens_per_iteration > max_tokens
            )

        for task in self.pending_queue:  # long-waiting tasks first (sorted ascending: all must qualify)
            if task.num_preemptions < limits.max_preemptions:
                break
            if full(task):
                break
            if task.request in in_batch:
                continue
            if task.state == BLOCKED:
                chosen.append(task)
                in_batch.add(task.request)
                tokens += task.tokens_per_iteration
            elif task.memory + memory <= self.max_memory:
                chosen.append(task)
                in_batch.add(task.request)
                memory += task.memory
                tokens += task.tokens_per_iteration
        for task in self.pending_prompts:
            if full(task):
                break
            if task.request in in_batch:
                continue
            if task.memory + memory > self.max_memory:
                break
            chosen.append(task)
            in_batch.add(task.request)
            memory += task.memory
            tokens += task.tokens_per_iteration
        for group in (self.blocked, self.batch):
            for task in group:
                if full(task):
                    break
                if task.request in in_batch:
                    continue
                chosen.append(task)
                in_batch.add(task.request)
                tokens += task.tokens_per_iteration
        for request in self.pending_requests:
            if len(chosen) == max_size:
                break
            task = self.request_tasks[request][0]
            if request in in_batch:
                continue
            if chosen and tokens + task.tokens_per_iteration > max_tokens:
                break
            if task.state == BLOCKED:
                chosen.append(task)
                in_batch.add(request)
                tokens += task.tokens_per_iteration
                continue
            if task.memory + memory > self.max_memory:
                break
            chosen.append(task)
            in_batch.add(request)
            memory += task.memory
            tokens += task.tokens_per_iteration
        self.batch_tokens = tokens
        chosen_set = set(map(id, chosen))
        preempted = [t for t in self.batch if id(t) not in chosen_set]
        new = [t for t in chosen if not t.in_batch]
        return preempted, new
