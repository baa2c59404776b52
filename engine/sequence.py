"""A request's state inside the engine.

Every sequence, fresh or preempted, is driven the same way: the engine computes its tokens
[num_computed_tokens, num_tokens) in chunks, and when a chunk reaches the end it samples the next token. A fresh request
starts at 0; a decode-role request starts at the prompt length (its KV arrived from a prefill engine); a preempted one
falls back to 0 and recomputes prompt plus output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

import torch

from engine.sampling_params import SamplingParams
from engine.stop_strings import StopStringMatcher

if TYPE_CHECKING:
    from engine.detokenizer import IncrementalDetokenizer
    from engine.structured_output import GrammarState


class SequenceStatus(StrEnum):
    WAITING = "waiting"  # queued; owns no blocks (or only prefix-cache hits once admitted)
    RUNNING = "running"  # scheduled each step until finished
    RESERVED = "reserved"  # decode role: blocks reserved, waiting for the prompt's KV to arrive
    PREFILLED = "prefilled"  # prefill role: first token sampled, blocks held until the KV is handed over
    FINISHED = "finished"


class FinishReason(StrEnum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"  # cancelled by the caller
    PREFILL_DONE = "prefill_done"  # prefill role: handed over to a decode engine


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the `n` most likely alternatives, best first


@dataclass(slots=True)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None
    output_token_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    num_hashed_blocks: int = 0  # leading blocks already registered in the prefix cache
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    generator: torch.Generator | None = None
    text: StopStringMatcher = field(default_factory=lambda: StopStringMatcher([]))
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_preemptions: int = 0
    # Prefill role: stop after the first token and hold the KV for a decode node. False for requests a prefill node
    # serves whole (lent to the token phase by the router's mixed pool) and on every other role.
    hands_over: bool = False
    # Penalty bookkeeping: counts of generated tokens (OpenAI penalties) and the set of all seen tokens (HF's).
    output_counts: dict[int, int] = field(default_factory=dict)
    # With params.prompt_logprobs: entry i is prompt token i + 1 given tokens 0..i, appended as the prompt's chunks
    # are computed. None when not asked for, or not this engine's to compute (a decode engine never sees the prompt).
    prompt_logprobs: list[TokenLogprob] | None = None
    prompt_logprobs_sent: bool = False  # they went out with the request's first output
    # With params.structured: where the output stands in its grammar (engine/structured_output.py); it has accepted
    # every output token so far, wherever that token was sampled.
    grammar: GrammarState | None = None

    @property
    def needs_prompt_logits(self) -> bool:
        """True while some prompt position still lacks its logprob: such a sequence cannot reuse cached blocks."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_token_ids) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    @property
    def output_text(self) -> str:
        return self.text.final_text

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED
