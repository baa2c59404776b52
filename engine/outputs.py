"""What the engine hands out: per-step deltas, whole completions, KV hand-overs, load and statistics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.block_manager import PrefixCacheStats
from engine.sequence import FinishReason, Sequence, TokenLogprob


@dataclass(slots=True)
class KVLayerWrite:
    """One request's KV that a step wrote into one layer: tokens [start, end) living in block_ids."""

    request_id: str
    block_ids: list[int]  # the blocks holding tokens start..end-1, in order
    start: int
    end: int


KVLayerHook = Callable[[int, list[KVLayerWrite]], None]


@dataclass(frozen=True, slots=True)
class KVStepPlan:
    """What a prefill engine's step does with its new KV besides the layer hook (tensor parallel only)."""

    layer_plan: object = (
        None  # what every rank's extension does after each layer (rank_calls.py); None: nothing
    )
    # Requests whose KV never leaves through the whole-heads transfer pool (it goes rank to rank, or nowhere):
    # their stored rows are not mirrored into it (kv_resharding.py).
    unmirrored: frozenset[str] = frozenset()


# Once per step, before the forward (engine.set_kv_layer_hook).
KVStepPlanner = Callable[[list[KVLayerWrite]], KVStepPlan]


@dataclass(slots=True)
class KVHandoff:
    """What a prefill engine hands to a transport once a prompt is done."""

    block_ids: list[int]  # the request's blocks, in token order
    num_tokens: int  # prompt tokens whose KV the blocks hold
    kv_layers: list[
        torch.Tensor
    ]  # per layer: the whole pool [num_blocks, 2, block_size, KVH, D]; index by block_ids
    first_token_id: int
    first_logprob: TokenLogprob | None


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request (a streaming delta)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[TokenLogprob]
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_prompt_tokens: int
    kv: KVHandoff | None = None
    # The prompt's teacher-forced logprobs (params.prompt_logprobs), on the request's first output only: entry i is
    # prompt token i + 1 given tokens 0..i. None on later outputs, when not asked for, and on a decode engine.
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class Completion:
    """A whole request's result, as returned by generate()."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_cached_prompt_tokens: int = 0
    prompt_logprobs: list[TokenLogprob] | None = None  # as RequestOutput.prompt_logprobs

    @classmethod
    def of(cls, seq: Sequence) -> Completion:
        """The result of a finished sequence."""
        if seq.finish_reason is None:
            raise ValueError(f"request {seq.request_id!r} has not finished")
        return cls(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=list(seq.output_token_ids),
            text=seq.output_text,
            finish_reason=seq.finish_reason,
            logprobs=list(seq.logprobs),
            num_cached_prompt_tokens=seq.num_cached_prompt_tokens,
            prompt_logprobs=list(seq.prompt_logprobs) if seq.prompt_logprobs is not None else None,
        )


@dataclass(frozen=True, slots=True)
class StepWork:
    """What one engine step computed, per request id (power accounting charges each request its share)."""

    prompt_tokens: dict[
        str, int
    ]  # prompt (or recomputed context) tokens computed; prefix-cache hits excluded
    decode_tokens: dict[str, int]  # 1 for each sequence that decoded a token


NO_WORK = StepWork({}, {})


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """What a node reports for placement: work not yet computed and room left in the KV pool."""

    queued_prompt_tokens: int  # prompt (or recompute) tokens scheduled but not yet computed
    running_requests: int
    waiting_requests: int
    free_kv_blocks: int
    total_kv_blocks: int
    # Prefix cache, cumulative: full prompt blocks looked up at admission (or reservation), and those found.
    prefix_queried_blocks: int = 0
    prefix_hit_blocks: int = 0


@dataclass(slots=True)
class EngineStats:
    num_blocks: int
    num_free_blocks: int
    num_waiting: int
    num_running: int
    num_held: int  # reserved (decode) or handed-over-but-unreleased (prefill) requests
    num_preemptions: int
    prefix_cache: PrefixCacheStats
