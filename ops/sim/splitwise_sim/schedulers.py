"""SplitwiseSim's two cluster schedulers used by the paper's designs; both place a request when it arrives.

- token_jsq (the baselines): the instance with the fewest pending tokens runs the whole request.
- mixed_pool (the Splitwise designs): the prompt goes to the prompt instance with the fewest pending tokens unless
  its queue is long (it has queued work and would pass prompt_max_pending_tokens); the token phase to the token
  instance with the least KV promised unless the request's KV would fill it. When a pool has no taker, one
  instance of the other pool (the least loaded by the same measure) joins a "mixed" pool and serves that phase; it
  returns to its own pool when it next runs dry. With no taker at all, one instance runs the whole request.
Pending tokens: a prompt's size on its prompt instance and 1 on its token instance (prompt + 1 for token_jsq),
released as the tasks finish.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ops.sim.splitwise_sim.instance import Instance
    from ops.sim.splitwise_sim.work import Request

__all__ = ["MixedPoolScheduler", "TokenJSQScheduler"]

PROMPT_MAX_PENDING_TOKENS = 8192


def _pending_tokens(instance: Instance) -> int:
    return instance.sched_pending_tokens


def _promised_memory(instance: Instance) -> int:
    return instance.sched_memory


class TokenJSQScheduler:
    def __init__(self, instances: list[Instance]) -> None:
        self.instances = instances

    def place(self, request: Request) -> tuple[Instance, Instance]:
        instance = min(self.instances, key=_pending_tokens)
        instance.sched_pending_tokens += request.prompt_tokens + 1
        return instance, instance

    def went_idle(self, instance: Instance) -> None:
        pass


class MixedPoolScheduler:
    def __init__(self, prompt: list[Instance], token: list[Instance]) -> None:
        self.prompt_pool, self.token_pool = list(prompt), list(token)
        self.mixed: list[Instance] = []

    def _prompt_taker(self, pool: list[Instance], request: Request) -> Instance | None:
        if not pool:
            return None
        best = min(pool, key=_pending_tokens)
        if (
            best.pending_queue
            and best.sched_pending_tokens + request.prompt_tokens > PROMPT_MAX_PENDING_TOKENS
        ):
            return None
        return best

    def _token_taker(self, pool: list[Instance], request: Request) -> Instance | None:
        if not pool:
            return None
        best = min(pool, key=_promised_memory)
        needed = request.prompt_task.memory + request.token_task.memory
        if best.sched_memory + needed >= best.max_memory:
            return None
        return best

    def _lend(self, pool: list[Instance], key: Callable[[Instance], int]) -> Instance:
        instance = min(pool, key=key)
        pool.remove(instance)
        self.mixed.append(instance)
        instance.sched_mixed = True
        return instance

    def place(self, request: Request) -> tuple[Instance, Instance]:
        prompt = self._prompt_taker(self.prompt_pool, request) or self._prompt_taker(self.mixed, request)
        token = self._token_taker(self.token_pool, request) or self._token_taker(self.mixed, request)
        if prompt is None and self.token_pool:
            prompt = self._lend(self.token_pool, _pending_tokens)
        if token is None and self.prompt_pool:
            token = self._lend(self.prompt_pool, _promised_memory)
        if prompt is None or token is None:
            prompt = token = min(self.prompt_pool + self.mixed + self.token_pool, key=_pending_tokens)
        if prompt is not token:
            prompt.sched_memory += request.prompt_task.memory
            token.sched_memory += request.prompt_task.memory + request.token_task.memory
        else:
            prompt.sched_memory += request.prompt_task.memory + request.token_task.memory
        prompt.sched_pending_tokens += request.prompt_tokens
        token.sched_pending_tokens += 1
        return prompt, token

    def went_idle(self, instance: Instance) -> None:
        if not instance.sched_mixed:
            return
        instance.sched_mixed = False
        self.mixed.remove(instance)
        (self.prompt_pool if instance.tag == "prompt" else self.token_pool).append(instance)
