"""CUDA graphs of the decode step: one graph per batch-size bucket, replayed instead of launching every kernel.

A decode step of a small model on a GPU is bound by launch overhead, not by the GPU: each layer launches about a
dozen kernels, and at batch 1-16 their Python dispatch and launch take longer than the kernels run. A CUDA graph
records the whole forward (embedding, every layer, the LM head) once and replays it with one launch.

A graph replays fixed addresses and shapes, so the step's inputs are copied into static buffers sized for the
bucket (1, 2, 4, 8, then multiples of 16 up to max_num_seqs), padded with rows that write nowhere (slot -1, which
store_kv skips) and attend to nothing (sequence length 0, which decode attention answers with zeros). Block tables
are as wide as the longest sequence the engine admits. Only pure decode steps replay a graph: a step with prompt
chunks, prompt logprobs or a per-layer hook (the prefill role's KV streaming) runs eagerly as before.

The capture itself is `cuda_capture`; tests on CPU pass `eager_capture`, which runs the same function over the same
static buffers on every replay, so the bucketing, padding and buffer handling are checked without a GPU (the real
capture is checked by tests/gpu). SPLITSERVE_CUDA_GRAPHS=0 turns graphs off.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from engine.models.attention import AttentionBatch
from engine.models.decoder import DecoderModel

GRAPHS_ENV = "SPLITSERVE_CUDA_GRAPHS"

# capture(fn) runs fn as the graph's body and returns replay(): run the body again, return its (static) output.
Capture = Callable[[Callable[[], torch.Tensor], Any], Callable[[], torch.Tensor]]


def enabled(device: torch.device, wanted: bool) -> bool:
    return wanted and device.type == "cuda" and os.environ.get(GRAPHS_ENV, "1") != "0"


def bucket_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16, ending with max_batch itself."""
    sizes = [size for size in (1, 2, 4, 8) if size < max_batch]
    sizes += list(range(16, max_batch, 16))
    return [*sizes, max_batch]


def cuda_capture(body: Callable[[], torch.Tensor], pool: Any) -> Callable[[], torch.Tensor]:
    # Warm up on a side stream first (cuBLAS picks its algorithms and Triton compiles outside the capture), as
    # torch.cuda.graphs recommends; then record into the shared memory pool.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = body()

    def replay() -> torch.Tensor:
        graph.replay()
        return output

    return replay


def eager_capture(body: Callable[[], torch.Tensor], pool: Any) -> Callable[[], torch.Tensor]:
    """Stands in for cuda_capture where there is no GPU: every replay runs the body again."""
    del pool
    return body


class DecodeGraphs:
    """Static input buffers and one captured forward per bucket; `run` serves a decode-only step."""

    def __init__(
        self,
        model: DecoderModel,
        kv_caches: list[torch.Tensor],
        block_size: int,
        max_batch: int,
        max_seq_tokens: int,
        capture: Capture = cuda_capture,
    ) -> None:
        device = model.device
        self.buckets = bucket_sizes(max_batch)
        self.max_blocks = -(-max_seq_tokens // block_size)
        largest = self.buckets[-1]
        self._ids = torch.zeros(largest, dtype=torch.long, device=device)
        self._positions = torch.zeros(largest, dtype=torch.long, device=device)
        self._slots = torch.full((largest,), -1, dtype=torch.long, device=device)
        self._tables = torch.zeros(largest, self.max_blocks, dtype=torch.int32, device=device)
        self._seq_lens = torch.zeros(largest, dtype=torch.int32, device=device)
        pool = torch.cuda.graph_pool_handle() if capture is cuda_capture else None
        self._replays: dict[int, Callable[[], torch.Tensor]] = {}
        # Largest first, so the smaller graphs reuse the largest one's memory from the shared pool.
        for size in reversed(self.buckets):
            self._replays[size] = capture(self._body(model, kv_caches, block_size, size), pool)

    def _body(
        self, model: DecoderModel, kv_caches: list[torch.Tensor], block_size: int, size: int
    ) -> Callable[[], torch.Tensor]:
        batch = AttentionBatch(
            slot_mapping=self._slots[:size],
            num_decode_tokens=size,
            decode_block_tables=self._tables[:size],
            decode_seq_lens=self._seq_lens[:size],
            prefills=[],
            block_size=block_size,
            sliding_window=model.config.sliding_window,
        )
        ids, positions = self._ids[:size], self._positions[:size]

        def body() -> torch.Tensor:
            return model.logits(model.forward(ids, positions, batch, kv_caches))

        return body

    def serves(self, attention: AttentionBatch, num_tokens: int) -> bool:
        """A decode-only step whose batch and block tables fit the captured shapes."""
        return (
            not attention.prefills
            and attention.num_decode_tokens == num_tokens
            and 0 < num_tokens <= self.buckets[-1]
            and attention.decode_block_tables.shape[1] <= self.max_blocks
        )

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attention: AttentionBatch
    ) -> torch.Tensor:
        """fp32 logits [n, vocab] for the step's n decode tokens (the caller checked `serves`)."""
        n = input_ids.numel()
        size = next(b for b in self.buckets if b >= n)
        width = attention.decode_block_tables.shape[1]
        self._ids[:n].copy_(input_ids)
        self._positions[:n].copy_(positions)
        self._slots[:n].copy_(attention.slot_mapping)
        self._tables[:n, :width].copy_(attention.decode_block_tables)
        self._tables[:n, width:].zero_()
        self._seq_lens[:n].copy_(attention.decode_seq_lens)
        # Padding rows: no K/V write, no attention. Rows past `size` are not part of this graph.
        self._ids[n:size].zero_()
        self._positions[n:size].zero_()
        self._slots[n:size].fill_(-1)
        self._seq_lens[n:size].zero_()
        return self._replays[size]()[:n]
