"""Keeps an error raised while computing one request from failing the others in its batch.

A step computes many requests at once, so an exception does not say whose it is. The engine narrows it down:
1. Forward: the batch's forward raised -> run its chunks one at a time; each chunk that raises alone fails only its
   own sequence, the others go on with logits computed alone. A chunk's counters move only after its forward
   succeeded, so a rerun writes exactly the cache slots the failed batch had (partly) written, with the same values.
2. Sampling: the batch's sampling raised -> sample row by row; a row that raises fails only its sequence.
3. Bookkeeping after sampling (detokenizing, stop strings, hand-over) is guarded per sequence by the engine itself.
A device that fails every forward whatever it holds is not one bad request: after MAX_FAILED_FORWARDS_IN_A_ROW
single-sequence forwards fail with no success in between, the guard raises EngineBrokenError and the engine's
process is expected to exit (its supervisor restarts it).
Tensor parallel engines (isolate=False) do not rerun: a forward that failed on one rank left the others inside or
past its collectives, and no rerun can bring them back in step, so any failed forward is EngineBrokenError at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.errors import EngineBrokenError
from engine.model_runner import StepLogits
from engine.sampler import SampledToken, sample
from engine.scheduler import ScheduledChunk, SchedulerOutput
from engine.sequence import Sequence, TokenLogprob

MAX_FAILED_FORWARDS_IN_A_ROW = 3

# Runs one scheduled batch through the model; returns logits for the chunks that complete their sequence (and the
# prompt logprobs it computed).
Forward = Callable[[SchedulerOutput], StepLogits]


@dataclass(slots=True)
class ComputedStep:
    """What a guarded forward computed: the chunks that succeeded, their logits, and who failed and why."""

    chunks: list[ScheduledChunk]  # in the scheduled order
    logits: torch.Tensor | None  # one row per chunk of `chunks` that completes its sequence, in order
    failed: list[tuple[Sequence, Exception]] = field(default_factory=list)
    # Prompt logprobs computed by the chunks that succeeded (a failed forward's are dropped with it).
    prompt_logprobs: list[tuple[Sequence, list[TokenLogprob]]] = field(default_factory=list)


class ForwardGuard:
    def __init__(self, forward: Forward, isolate: bool = True) -> None:
        self._forward = forward
        self._isolate = isolate
        self._failed_in_a_row = 0

    def run(self, sched: SchedulerOutput) -> ComputedStep:
        try:
            step = self._forward(sched)
        except Exception as exc:  # whose fault is it? rerun alone to find out
            if not self._isolate:
                raise EngineBrokenError(
                    f"a tensor-parallel forward failed, its ranks are out of step: {type(exc).__name__}: {exc}"
                ) from exc
            if len(sched.chunks) == 1:
                self._count_failure(exc)
                return ComputedStep([], None, [(sched.chunks[0].seq, exc)])
            return self._one_by_one(sched)
        self._failed_in_a_row = 0
        return ComputedStep(list(sched.chunks), step.sample, prompt_logprobs=step.prompt_logprobs)

    def _one_by_one(self, sched: SchedulerOutput) -> ComputedStep:
        done = ComputedStep([], None)
        rows: list[torch.Tensor] = []
        for chunk in sched.chunks:
            try:
                step = self._forward(SchedulerOutput([chunk], []))
            except Exception as exc:
                self._count_failure(exc)
                done.failed.append((chunk.seq, exc))
                continue
            self._failed_in_a_row = 0
            done.chunks.append(chunk)
            rows.append(step.sample)
            done.prompt_logprobs += step.prompt_logprobs
        if rows:
            done.logits = torch.cat(rows)
        return done

    def _count_failure(self, exc: Exception) -> None:
        self._failed_in_a_row += 1
        if self._failed_in_a_row >= MAX_FAILED_FORWARDS_IN_A_ROW:
            raise EngineBrokenError(
                f"{self._failed_in_a_row} forwards in a row failed, each on its own: {type(exc).__name__}: {exc}"
            ) from exc


def sample_isolated(
    logits: torch.Tensor, seqs: list[Sequence], fallback: torch.Generator
) -> list[SampledToken | Exception]:
    """One token per row, as sampler.sample; a row whose sampling raises gets its exception instead."""
    try:
        return list(sample(logits, seqs, fallback))
    except Exception as exc:
        if len(seqs) == 1:
            return [exc]
    results: list[SampledToken | Exception] = []
    for row, seq in enumerate(seqs):
        try:
            results.append(sample(logits[row : row + 1], [seq], fallback)[0])
        except Exception as exc:
            results.append(exc)
    return results
