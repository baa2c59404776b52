"""Turns a scheduled step into tensors, runs the model over the paged KV cache, and returns logits to sample from
(and the prompt logprobs of sequences that asked for them: engine/prompt_logprobs.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine import kernels
from engine.decode_graphs import Capture, DecodeGraphs, cuda_capture
from engine.models.attention import AttentionBatch, PrefillChunk
from engine.models.decoder import DecoderModel, LayerHook
from engine.outputs import KVStepPlan
from engine.prompt_logprobs import PromptRows, compute, rows_of_chunk
from engine.scheduler import SchedulerOutput
from engine.sequence import Sequence, TokenLogprob
from engine.tensor_parallel.kv_resharding import GatherBlocks, KVResharding, stacked_blocks


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attention: AttentionBatch
    sample_rows: torch.Tensor  # [N] index in T of the last token of each chunk that completes its sequence
    prompt_rows: list[PromptRows]  # rows whose prompt logprobs were asked for
    # Tensor parallel: blocks the transfer pool received since the last step, for every rank to take its heads of.
    kv_imports: list[int] = dataclasses.field(default_factory=list)
    # Tensor parallel: what every rank's extension does after each layer of this step (rank_calls.py); opaque here.
    layer_plan: object = None
    # Tensor parallel prefill role: the slots whose stored KV is mirrored into the transfer pool (None: every slot).
    mirror_slots: torch.Tensor | None = None

    def to(self, device: torch.device) -> StepInputs:
        """The same step with every tensor on `device` (a tensor-parallel rank on another GPU)."""
        if self.input_ids.device == device:
            return self
        att = self.attention
        attention = dataclasses.replace(
            att,
            slot_mapping=att.slot_mapping.to(device),
            decode_block_tables=att.decode_block_tables.to(device),
            decode_seq_lens=att.decode_seq_lens.to(device),
            prefills=[dataclasses.replace(c, block_table=c.block_table.to(device)) for c in att.prefills],
            prefill_kernel_args=None,
        )
        return dataclasses.replace(
            self,
            input_ids=self.input_ids.to(device),
            positions=self.positions.to(device),
            attention=attention,
            sample_rows=self.sample_rows.to(device),
            mirror_slots=None if self.mirror_slots is None else self.mirror_slots.to(device),
        )


@dataclass(slots=True)
class StepLogits:
    """What one forward yields: logits to sample from, and prompt logprobs computed on the way."""

    sample: torch.Tensor  # fp32 [N, vocab], one row per chunk that completes its sequence, in chunk order
    # Per sequence that asked: the logprobs of the prompt positions this step computed.
    prompt_logprobs: list[tuple[Sequence, list[TokenLogprob]]]


class ModelRunner:
    def __init__(self, model: DecoderModel, num_blocks: int, block_size: int) -> None:
        cfg = model.config
        self.model = model
        kernels.prepare(model.device)
        self.block_size = block_size
        self.num_blocks = num_blocks
        # Zeroed, not empty: masked-out cache slots are still multiplied by zero weights, and NaN * 0 is NaN.
        self.kv_caches = [
            torch.zeros(
                num_blocks,
                2,
                block_size,
                cfg.num_kv_heads,
                cfg.head_dim,
                dtype=model.dtype,
                device=model.device,
            )
            for _ in range(cfg.num_layers)
        ]
        self.decode_graphs: DecodeGraphs | None = None
        # Tensor parallel rank 0: hands each step's inputs to the other ranks first (engine/tp_ranks.py).
        self.announce: Callable[[object], None] | None = None
        # Tensor parallel prefill and decode roles: the whole-heads pool other nodes exchange KV with.
        self.resharding: KVResharding | None = None

    @property
    def transfer_pool(self) -> list[torch.Tensor]:
        """The pool a KV transport registers: every KV head (rank 0's transfer pool at TP > 1), same block ids."""
        return self.resharding.pool if self.resharding is not None else self.kv_caches

    def queue_kv_import(self, block_ids: list[int]) -> None:
        """Blocks the transfer pool received from outside: every rank takes its heads before the next step."""
        if self.resharding is not None:
            self.resharding.queue_import(block_ids)

    def export_to_transfer_pool(self, block_ids: list[int]) -> None:
        """Before a transport reads blocks the ranks computed: gather them, whole heads, into the transfer pool."""
        if self.resharding is None or not block_ids:
            return
        if self.announce is not None:
            self.announce(GatherBlocks(block_ids))
        self.resharding.export_blocks(block_ids, self.kv_caches)

    def blocks_by_rank(self, block_ids: list[int]) -> list[torch.Tensor]:
        """Each rank's own pool's blocks [layers, n, 2, block_size, its KV heads, D], rank 0 first (diagnostics)."""
        if self.resharding is None:
            return [stacked_blocks(self.kv_caches, block_ids)]
        if self.announce is not None:
            self.announce(GatherBlocks(block_ids))
        parts = self.resharding.gather_blocks(block_ids, self.kv_caches)
        assert parts is not None  # rank 0
        return parts

    def enable_decode_graphs(
        self, max_batch: int, max_seq_tokens: int, capture: Capture = cuda_capture
    ) -> None:
        """Capture the decode step for every batch bucket up to max_batch (engine/decode_graphs.py)."""
        self.decode_graphs = DecodeGraphs(
            self.model, self.kv_caches, self.block_size, max_batch, max_seq_tokens, capture
        )

    @staticmethod
    def bytes_per_block(model: DecoderModel, block_size: int) -> int:
        cfg = model.config
        element = torch.empty((), dtype=model.dtype).element_size()
        return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * element

    def run(
        self,
        sched: SchedulerOutput,
        on_layer_stored: LayerHook | None = None,
        plan: KVStepPlan | None = None,
        mirror_slots: list[int] | None = None,
    ) -> StepLogits:
        """Compute the step: fp32 logits for each chunk that completes its sequence, and any prompt logprobs.
        plan's layer plan goes to the tensor-parallel worker ranks with the step (rank 0's hook has its own copy);
        mirror_slots: the only slots mirrored into the transfer pool (None: all)."""
        inputs = self.prepare(sched)
        if plan is not None:
            inputs.layer_plan = plan.layer_plan
        if mirror_slots is not None:
            inputs.mirror_slots = torch.tensor(mirror_slots, dtype=torch.long, device=self.model.device)
        graphs = self.decode_graphs
        if (
            graphs is not None
            and on_layer_stored is None
            and not inputs.prompt_rows
            and graphs.serves(inputs.attention, inputs.input_ids.numel())
        ):
            logits = graphs.run(inputs.input_ids, inputs.positions, inputs.attention)
            return StepLogits(sample=logits.index_select(0, inputs.sample_rows), prompt_logprobs=[])
        if self.resharding is not None:
            inputs.kv_imports = self.resharding.take_imports()
        if self.announce is not None:
            # The other ranks need the rows, not the sequences the prompt logprobs are for.
            rows = [dataclasses.replace(span, seq=None) for span in inputs.prompt_rows]
            self.announce(dataclasses.replace(inputs, prompt_rows=rows))
        return self.execute(inputs, on_layer_stored)

    def execute(self, inputs: StepInputs, on_layer_stored: LayerHook | None = None) -> StepLogits:
        """The forward of prepared inputs (every tensor-parallel rank runs this, in step)."""
        if self.resharding is not None:
            if inputs.kv_imports:
                self.resharding.import_blocks(inputs.kv_imports, self.kv_caches)
            mirrored = inputs.attention.slot_mapping if inputs.mirror_slots is None else inputs.mirror_slots
            on_layer_stored = self.resharding.mirroring(on_layer_stored, mirrored, self.kv_caches)
        hidden = self.model.forward(
            inputs.input_ids, inputs.positions, inputs.attention, self.kv_caches, on_layer_stored
        )
        return StepLogits(
            sample=self.model.logits(hidden.index_select(0, inputs.sample_rows)),
            prompt_logprobs=compute(hidden, inputs.prompt_rows, self.model.logits),
        )

    def prepare(self, sched: SchedulerOutput) -> StepInputs:
        bs = self.block_size
        device = self.model.device
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        prompt_rows: list[PromptRows] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        for chunk in sched.chunks:
            seq = chunk.seq
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + chunk.num_tokens
            first_row = len(ids)
            ids.extend(seq.token_slice(start, end))
            positions.extend(range(start, end))
            blocks = seq.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            if chunk.num_tokens == 1:
                decode_tables.append(blocks[: -(-end // bs)])
                decode_lens.append(end)
            else:
                table = torch.tensor(blocks[: -(-end // bs)], dtype=torch.long, device=device)
                prefills.append(PrefillChunk(first_row, chunk.num_tokens, end, table))
            if chunk.completes_sequence:
                sample_rows.append(len(ids) - 1)
            wanted = rows_of_chunk(seq, start, end, first_row)
            if wanted is not None:
                prompt_rows.append(wanted)
        width = max((len(t) for t in decode_tables), default=0)
        padded = [t + [0] * (width - len(t)) for t in decode_tables]
        attention = AttentionBatch(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            num_decode_tokens=len(decode_tables),
            decode_block_tables=torch.tensor(padded, dtype=torch.int32, device=device).view(
                len(padded), width
            ),
            decode_seq_lens=torch.tensor(decode_lens, dtype=torch.int32, device=device),
            prefills=prefills,
            block_size=bs,
            sliding_window=self.model.config.sliding_window,
        )
        return StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.long, device=device),
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            attention=attention,
            sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=device),
            prompt_rows=prompt_rows,
        )
