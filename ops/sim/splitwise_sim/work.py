"""A request as SplitwiseSim models it: a prompt task, a token task, and a KV transfer between them when the two run
on different instances.

KV sizes follow SplitwiseSim's formula: 2 (K and V) x tokens x hidden size x layers x bytes per value, with the
model's full hidden size (so grouped-query models are charged as if every head had its own KV). A prompt task holds
the KV of prompt + 1 tokens, a token task that of the rest of the output (output - 1 tokens, its first token came
with the prompt); the transfer moves the prompt's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BLOCKED", "COMPLETED", "NONE", "QUEUED", "RUNNING", "ModelShape", "Request", "Task"]

NONE, QUEUED, RUNNING, BLOCKED, COMPLETED = range(5)


@dataclass(frozen=True, slots=True)
class ModelShape:
    """SplitwiseSim's model description: what its memory accounting needs."""

    layers: int
    hidden_size: int
    weight_bytes: int
    dtype_bytes: int = 2

    def kv_bytes(self, tokens: int) -> int:
        return 2 * tokens * self.hidden_size * self.layers * self.dtype_bytes


# SplitwiseSim's model repository (configs/model_repo): architectures and fp16 sizes.
MODEL_SHAPES = {
    "bloom-176b": ModelShape(layers=70, hidden_size=14336, weight_bytes=329_000_000_000),
    "llama2-70b": ModelShape(layers=80, hidden_size=8192, weight_bytes=135_000_000_000),
}


class Task:
    """A prompt task (is_prompt) computes the prompt and the first token; a token task generates the rest."""

    __slots__ = (
        "generated",
        "generating",
        "in_batch",
        "is_prompt",
        "memory",
        "num_preemptions",
        "request",
        "size",
        "state",
        "tokens_per_iteration",
    )

    def __init__(self, request: Request, is_prompt: bool, size: int, memory: int) -> None:
        self.request, self.is_prompt = request, is_prompt
        self.size = size  # prompt tokens, or tokens to generate
        self.memory = memory  # bytes of KV it holds while it runs
        self.tokens_per_iteration = size if is_prompt else 1
        self.state = NONE
        self.num_preemptions = 0
        # tokens the running iteration(s) will produce, and produced: floats once a run is cut short (SplitwiseSim)
        self.generating: float = 0
        self.generated: float = 0
        self.in_batch = False

    def done(self) -> bool:
        return self.generated == (1 if self.is_prompt else self.size)

    def sort_key(self) -> tuple[int, float]:
        """A pending queue's order: fewest preemptions first, then the request's arrival."""
        return self.num_preemptions, self.request.arrival


class Request:
    __slots__ = (
        "arrival",
        "completion",
        "first_token",
        "index",
        "memory",
        "output_tokens",
        "prompt_task",
        "prompt_tokens",
        "token_task",
        "transfer",
    )

    def __init__(
        self, index: int, arrival: float, prompt_tokens: int, output_tokens: int, shape: ModelShape
    ) -> None:
        self.index, self.arrival = index, arrival
        self.prompt_tokens, self.output_tokens = prompt_tokens, output_tokens
        self.prompt_task = Task(self, True, prompt_tokens, shape.kv_bytes(prompt_tokens + 1))
        self.token_task = Task(self, False, output_tokens - 1, shape.kv_bytes(output_tokens - 1))
        self.memory = 0  # bytes of KV allocated to it so far
        self.transfer: object | None = None  # run.Transfer when the phases run on two instances
        self.first_token = float("nan")
        self.completion = float("nan")
