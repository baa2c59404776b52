"""Which (prompt size, batch size, token size) points a profile measures, and which it must leave out.

Like the Splitwise simulator's perf_model.csv, a profile is three one-dimensional sweeps through one anchor point
(prompt 512, batch 1, 128 tokens by default): prompt sizes at batch 1, batch sizes at the anchor prompt, and token
sizes at the anchor prompt and batch 1. The anchor belongs to all three and is measured once.

A point is left out, with a note saying why, when one of its sequences would not fit the model's context or when its
batch would not fit the engine's KV pool (a batch that preempts itself would time recomputation, not the batch).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import InvalidRequestError


@dataclass(frozen=True, slots=True)
class ProfilePoint:
    prompt_size: int  # tokens in each prompt
    batch_size: int  # prompts prefilled together in one engine step, then decoded together
    token_size: int  # tokens generated per request; the first comes from the prefill step

    @property
    def batch_prompt_tokens(self) -> int:
        """Prompt tokens in the prefill step: the key of the perf model's prompt curve."""
        return self.prompt_size * self.batch_size

    @property
    def sequence_tokens(self) -> int:
        """Tokens one request holds when it finishes (prompt plus output)."""
        return self.prompt_size + self.token_size

    def describe(self) -> str:
        return f"prompt {self.prompt_size} x batch {self.batch_size}, {self.token_size} tokens"


@dataclass(frozen=True, slots=True)
class SweepSpec:
    prompt_sizes: tuple[int, ...]  # the prompt sweep, at batch 1
    batch_sizes: tuple[int, ...]  # the batch sweep, at the anchor prompt
    token_sweep: tuple[int, ...]  # the token sweep, at the anchor prompt and batch 1
    anchor_prompt: int = 512  # where the three sweeps cross (the published data's point)
    anchor_tokens: int = 128  # token size of the prompt and batch sweeps

    @property
    def anchor(self) -> ProfilePoint:
        return ProfilePoint(self.anchor_prompt, 1, self.anchor_tokens)

    def candidates(self) -> list[ProfilePoint]:
        """Every point of the three sweeps, anchor first, each once, before any feasibility check."""
        points = [self.anchor]
        points += [ProfilePoint(p, 1, self.anchor_tokens) for p in self.prompt_sizes]
        points += [ProfilePoint(self.anchor_prompt, b, self.anchor_tokens) for b in self.batch_sizes]
        points += [ProfilePoint(self.anchor_prompt, 1, t) for t in self.token_sweep]
        return list(dict.fromkeys(points))


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """What the engine being profiled can hold."""

    max_sequence_tokens: int  # prompt + output of one request (the model's context, or the pool if smaller)
    kv_blocks: int  # blocks in the KV pool
    block_size: int  # tokens per block

    def blocks_for(self, point: ProfilePoint) -> int:
        per_sequence = -(-point.sequence_tokens // self.block_size)
        return point.batch_size * per_sequence


@dataclass(frozen=True, slots=True)
class SweepPlan:
    points: tuple[ProfilePoint, ...]  # to measure, anchor first
    skipped: tuple[str, ...]  # one note per candidate left out


def plan_sweep(spec: SweepSpec, limits: EngineLimits) -> SweepPlan:
    """The feasible points of the spec; raises InvalidRequestError when what is left cannot make a perf model."""
    points: list[ProfilePoint] = []
    skipped: list[str] = []
    for point in spec.candidates():
        reason = _infeasible(point, limits)
        if reason is None:
            points.append(point)
        elif point == spec.anchor:
            # Every sweep passes through the anchor: without it the profile has no common reference.
            raise InvalidRequestError(
                f"the anchor point ({point.describe()}) is infeasible: {reason}; lower --anchor-prompt or --token-size"
            )
        else:
            skipped.append(f"skipped {point.describe()}: {reason}")
    _require_two_keys("prompt-token counts", {p.batch_prompt_tokens for p in points}, "--prompt-sizes")
    _require_two_keys("batch sizes", {p.batch_size for p in points}, "--batch-sizes")
    return SweepPlan(tuple(points), tuple(skipped))


def _infeasible(point: ProfilePoint, limits: EngineLimits) -> str | None:
    if point.sequence_tokens > limits.max_sequence_tokens:
        return f"{point.sequence_tokens} tokens per sequence exceed the limit of {limits.max_sequence_tokens}"
    needed = limits.blocks_for(point)
    if needed > limits.kv_blocks:
        return f"needs {needed} KV blocks, the pool has {limits.kv_blocks} (raise --kv-cache-mb)"
    return None


def _require_two_keys(what: str, keys: set[int], flag: str) -> None:
    # cluster.perfmodel interpolates between measured keys, so each of its two curves needs two distinct points.
    if len(keys) < 2:
        raise InvalidRequestError(
            f"the feasible points cover {len(keys)} distinct {what}; a perf model needs at least 2 (see {flag})"
        )
