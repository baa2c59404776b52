"""Teacher-forced logprobs of a prompt's own tokens (vLLM's prompt_logprobs; OpenAI's completions `echo`).

The hidden state at prompt position p predicts prompt token p + 1, so a sequence that asked gets, for every prompt
token after the first, its logprob and the top-k alternatives: the model's raw log-softmax in fp32, like output
logprobs. They are computed in the same forward as the prompt, chunk by chunk (a prompt may span several steps):
1. ModelRunner.prepare asks `rows_of_chunk` which rows of the step's hidden states belong to positions still missing
   (only those of sequences that asked: nobody else pays for full-vocabulary logits of prompt rows).
2. ModelRunner.run hands the step's hidden states to `compute`, which projects those rows to logits a slice at a
   time, so memory stays bounded however long the chunk.
3. The engine appends them to seq.prompt_logprobs for the chunks whose forward succeeded (`record`), and the
   request's first output takes them (`take_for_output`), once.
A recomputed prompt (after preemption) skips the positions already recorded. Cached prefix blocks have no logits, so
a sequence that still needs them never reuses any (engine/block_manager.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.sequence import Sequence, TokenLogprob

# Prompt rows projected to full-vocabulary logits at once: 256 x a 152k vocabulary in fp32 is ~150 MB.
ROWS_PER_PASS = 256


@dataclass(slots=True)
class PromptRows:
    """One chunk's rows that need prompt logprobs: hidden rows first_row.. predict `targets`, in order."""

    seq: (
        Sequence | None
    )  # None on tensor-parallel ranks other than 0: they compute the rows, rank 0 keeps them
    first_row: int  # index into the step's hidden states
    targets: list[int]  # the prompt tokens those rows predict
    top_k: int


def rows_of_chunk(seq: Sequence, start: int, end: int, first_row: int) -> PromptRows | None:
    """The rows of a chunk computing positions [start, end) (from hidden row first_row) that seq still needs."""
    if not seq.needs_prompt_logits or seq.prompt_logprobs is None or seq.params.prompt_logprobs is None:
        return None
    recorded = len(seq.prompt_logprobs)  # the next position to record
    if start > recorded:  # positions recorded..start-1 would never get a logprob: fail the request, not lie
        raise RuntimeError(
            f"{seq.request_id}: prompt position {start} computed before {recorded} had its logprob"
        )
    low, high = recorded, min(end, seq.num_prompt_tokens - 1)  # the last prompt position predicts an output
    if low >= high:
        return None
    targets = seq.prompt_token_ids[low + 1 : high + 1]
    return PromptRows(seq, first_row + low - start, targets, seq.params.prompt_logprobs)


def compute(
    hidden: torch.Tensor, spans: list[PromptRows], to_logits: Callable[[torch.Tensor], torch.Tensor]
) -> list[tuple[Sequence, list[TokenLogprob]]]:
    """Each span's logprobs, from the step's final hidden states [T, hidden] and the model's head (fp32 logits)."""
    if not spans:
        return []
    rows = torch.tensor(
        [span.first_row + i for span in spans for i in range(len(span.targets))],
        dtype=torch.long,
        device=hidden.device,
    )
    targets = torch.tensor(
        [t for span in spans for t in span.targets], dtype=torch.long, device=hidden.device
    )
    k = max(span.top_k for span in spans)
    chosen: list[float] = []
    top_values: list[list[float]] = []
    top_ids: list[list[int]] = []
    for begin in range(0, rows.numel(), ROWS_PER_PASS):
        part = slice(begin, begin + ROWS_PER_PASS)
        logprobs = torch.log_softmax(to_logits(hidden.index_select(0, rows[part])).float(), dim=-1)
        chosen += logprobs.gather(1, targets[part, None]).squeeze(1).tolist()
        if k:
            values, ids = logprobs.topk(k, dim=-1)  # sorted, best first
            top_values += values.tolist()
            top_ids += ids.tolist()
    results = []
    offset = 0
    for span in spans:
        entries = []
        for i, token in enumerate(span.targets):
            row = offset + i
            top = (
                list(zip(top_ids[row][: span.top_k], top_values[row][: span.top_k], strict=True)) if k else []
            )
            entries.append(TokenLogprob(token, chosen[row], top))
        if (
            span.seq is not None
        ):  # a tensor-parallel worker computes the rows only to take part in the gathers
            results.append((span.seq, entries))
        offset += len(span.targets)
    return results


def record(computed: list[tuple[Sequence, list[TokenLogprob]]]) -> None:
    """Append a step's prompt logprobs to their sequences (only chunks whose forward succeeded are passed)."""
    for seq, entries in computed:
        if seq.prompt_logprobs is not None:
            seq.prompt_logprobs.extend(entries)


def take_for_output(seq: Sequence) -> list[TokenLogprob] | None:
    """The prompt logprobs for the request's first output; None on every later one, or when none were asked for."""
    if seq.prompt_logprobs is None or seq.prompt_logprobs_sent:
        return None
    seq.prompt_logprobs_sent = True
    return list(seq.prompt_logprobs)
