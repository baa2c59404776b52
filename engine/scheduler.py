"""Continuous batching with chunked prefill under a per-step token budget.

Each step:
1. Running sequences, oldest first, get the tokens they still need (one for a decoding sequence, a chunk for one still
   in its prompt), as far as the budget goes. A sequence that needs a new block and finds the pool empty preempts the
   newest running sequence (its blocks are freed and it recomputes later); if it is itself the newest, it yields.
2. Waiting sequences join in arrival order while budget, sequence slots and blocks last; the last one admitted may get
   only a chunk of its prompt.
Sequences join and leave only between steps; the engine calls `finish` for those that completed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.block_manager import BlockManager
from engine.outputs import KVLayerWrite, StepWork
from engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens computed this step, starting at seq.num_computed_tokens

    @property
    def completes_sequence(self) -> bool:
        """True when this chunk reaches the sequence's last token, so the step samples its next token."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[
        ScheduledChunk
    ]  # decode (single-token, already-computed-prompt) chunks first, then prompt chunks
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    def work(self) -> StepWork:
        """Which tokens this batch computes for which request, split into prompt and decode work."""
        prompt: dict[str, int] = {}
        decode: dict[str, int] = {}
        for chunk in self.chunks:
            seq = chunk.seq
            # Decoding: past the prompt, with all but the last token computed (a recompute after preemption, or a
            # resumed request's prior output, is prompt work even though the sequence has output tokens).
            if (
                seq.output_token_ids
                and chunk.num_tokens == 1
                and seq.num_computed_tokens == seq.num_tokens - 1
            ):
                decode[seq.request_id] = 1
            else:
                prompt[seq.request_id] = chunk.num_tokens
        return StepWork(prompt, decode)

    def kv_writes(self, block_size: int) -> list[KVLayerWrite]:
        """The KV this batch writes (into every layer) for requests that hand theirs over: what a transport ships."""
        writes = []
        for chunk in self.chunks:
            seq = chunk.seq
            if not seq.hands_over:
                continue
            start = seq.num_computed_tokens
            end = start + chunk.num_tokens
            blocks = seq.block_ids[start // block_size : -(-end // block_size)]
            writes.append(KVLayerWrite(seq.request_id, blocks, start, end))
        return writes


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_batched_tokens: int, max_num_seqs: int) -> None:
        self.blocks = block_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last one is the first to be preempted

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Admit a sequence whose KV is already in its blocks (decode role) straight into the running set."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues (finished or aborted); the caller frees or hands over its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._reserve_or_preempt(seq, n, preempted):
                break  # seq preempted itself; everything after it is newer and was preempted already
            chunks.append(ScheduledChunk(seq, n))
            budget -= n
            i += 1
        if not preempted:
            budget = self._admit_waiting(budget, chunks)
        # Single-token chunks first: the model runner packs them into one batched decode-attention call.
        chunks.sort(key=lambda c: c.num_tokens != 1)
        return SchedulerOutput(chunks, preempted)

    def _reserve_or_preempt(self, seq: Sequence, n: int, preempted: list[Sequence]) -> bool:
        """Give seq blocks for n more tokens, preempting the newest running sequences (maybe seq itself) if needed."""
        while not self.blocks.ensure_capacity(seq, seq.num_computed_tokens + n):
            # running[-1] is at or after seq in the list, so nothing already placed in this step is ever dropped.
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _admit_waiting(self, budget: int, chunks: list[ScheduledChunk]) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            self.blocks.admit_with_prefix_cache(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.blocks.ensure_capacity(seq, seq.num_computed_tokens + n):
                # Give its prefix-cache hits back, so a waiting request never holds blocks running ones need.
                self.blocks.free(seq)
                seq.num_computed_tokens = seq.num_cached_prompt_tokens = 0
                break
            self.blocks.record_admission(seq)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, n))
            budget -= n
        return budget

    def _preempt(self, seq: Sequence) -> None:
        """Free seq's KV and queue it first in line; it will recompute prompt and output so far."""
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
