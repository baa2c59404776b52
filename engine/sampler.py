"""Turns a step's logits into next tokens, one row per sequence that reached its end this step.

Order per row: grammar mask (structured output: forbidden tokens to -inf, engine/structured_output.py) -> logit
bias -> penalties -> (greedy argmax) or temperature -> top-k -> top-p -> min-p -> draw. Reported logprobs are the
model's own log-softmax, before any mask, bias, penalty or filter, which is what clients compare against the
reference (and what OpenAI reports with logit_bias).

Seeded requests draw with a generator re-seeded from (seed, output index), so a token's draw depends only on the
request, never on which engine or batch computed it: a prefill engine and a decode engine continue one random stream.
Any uint64 seed works: the generator seed is taken modulo 2**64 (torch's range), which leaves every seed below
~1.8e13 exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams
from engine.sequence import Sequence, TokenLogprob
from engine.structured_output import mask_logits

# Spreads consecutive output indices far apart in seed space.
_SEED_STRIDE = 1_000_003
_SEED_MODULUS = 2**64  # torch.Generator.manual_seed takes seeds in [0, 2**64)


@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprob: TokenLogprob | None


def sample(logits: torch.Tensor, seqs: list[Sequence], fallback: torch.Generator) -> list[SampledToken]:
    """logits: fp32 [N, vocab], row i belongs to seqs[i]. Returns one token per row."""
    want_logprobs = [s.params.logprobs is not None for s in seqs]
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
    constrained = any(s.grammar is not None for s in seqs)
    if constrained or any(s.params.has_penalties or s.params.logit_bias for s in seqs):
        logits = logits.clone()  # the raw logits stay untouched for the logprobs above
        if constrained:
            mask_logits(logits, [s.grammar for s in seqs])
        for row, seq in enumerate(seqs):
            if seq.params.logit_bias:
                _apply_logit_bias(logits[row], seq.params.logit_bias)
            if seq.params.has_penalties:
                _apply_penalties(logits[row], seq)
    greedy_ids = logits.argmax(dim=-1).tolist()
    results = []
    for row, seq in enumerate(seqs):
        params = seq.params
        token = (
            greedy_ids[row] if params.greedy else _draw(logits[row], params, _generator_for(seq, fallback))
        )
        logprob = None
        if raw_logprobs is not None and params.logprobs is not None:
            logprob = _token_logprob(raw_logprobs[row], token, params.logprobs)
        results.append(SampledToken(token, logprob))
    return results


def _apply_logit_bias(row: torch.Tensor, bias: dict[int, float]) -> None:
    ids = torch.tensor(list(bias.keys()), dtype=torch.long, device=row.device)
    row.index_add_(0, ids, torch.tensor(list(bias.values()), dtype=row.dtype, device=row.device))


def _apply_penalties(row: torch.Tensor, seq: Sequence) -> None:
    params = seq.params
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.prompt_token_ids) | seq.output_counts.keys()), dtype=torch.long)
        seen = seen[seen < row.numel()]
        values = row[seen]
        row[seen] = torch.where(
            values > 0, values / params.repetition_penalty, values * params.repetition_penalty
        )
    if seq.output_counts and (params.presence_penalty or params.frequency_penalty):
        ids = torch.tensor(list(seq.output_counts.keys()), dtype=torch.long)
        counts = torch.tensor(list(seq.output_counts.values()), dtype=row.dtype)
        keep = ids < row.numel()
        row[ids[keep]] -= params.frequency_penalty * counts[keep] + params.presence_penalty


def _generator_for(seq: Sequence, fallback: torch.Generator) -> torch.Generator:
    if seq.params.seed is None:
        return fallback
    if seq.generator is None:
        seq.generator = torch.Generator()
    seq.generator.manual_seed(generator_seed(seq.params.seed, len(seq.output_token_ids)))
    return seq.generator


def generator_seed(seed: int, output_index: int) -> int:
    """The generator seed for a request's output_index-th draw: distinct per position, valid for any uint64 seed."""
    return (seed * _SEED_STRIDE + output_index) % _SEED_MODULUS


def _draw(row: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    # Shifting the largest logit to 0 first keeps the division finite for any temperature: the best token scores 0,
    # the rest at most -inf, and the softmax never sees inf - inf (a tiny temperature degrades to greedy, not NaN).
    scaled = (row - row.max()) / params.temperature
    if params.top_k and params.top_k < scaled.numel():
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        probs = _top_p(probs, params.top_p)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    # The generator lives on the CPU, so the draw does too (one row is a few hundred KB at most).
    return int(torch.multinomial(probs.cpu(), 1, generator=generator).item())


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (always at least the top one)."""
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def _token_logprob(logprobs: torch.Tensor, token: int, n: int) -> TokenLogprob:
    top: list[tuple[int, float]] = []
    if n:
        values, ids = logprobs.topk(n)
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(logprobs[token]), top)
