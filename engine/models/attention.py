"""Attention over the paged KV cache for one step's flattened batch.

A step's tokens are packed into one [T, ...] tensor: first one token per decoding sequence, then each prefill chunk.
Decode tokens go through the paged decode-attention kernel in one call. Prefill chunks go through the C++ prefill
kernel in one call where it serves (bf16 on AVX-512 BF16 CPUs: ~3x torch's SDPA there, see
engine/kernels/csrc/paged_prefill_cpu.cpp); otherwise each chunk runs scaled-dot-product attention against its
sequence's cached prefix plus the chunk itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine import kernels


@dataclass(slots=True)
class PrefillChunk:
    """One sequence's prompt chunk within the step."""

    token_start: int  # index of the chunk's first token in the step's flattened batch
    num_tokens: int  # query tokens in this chunk
    context_len: int  # tokens whose KV exists once this chunk is stored (cached prefix + chunk)
    block_table: torch.Tensor  # [ceil(context_len / block_size)] int64 block ids of the sequence


@dataclass(slots=True)
class AttentionBatch:
    """Everything attention needs to know about a step, built once per step and shared by all layers."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot of each token's new K/V
    num_decode_tokens: int  # the first num_decode_tokens tokens are one-per-sequence decode queries
    decode_block_tables: torch.Tensor  # [num_decode, max_blocks] int32
    decode_seq_lens: torch.Tensor  # [num_decode] int32, including the token being decoded
    prefills: list[PrefillChunk]
    block_size: int
    sliding_window: int | None
    # The prefill kernel's (block tables, chunks) int32 tensors, built on first use and shared by every layer.
    prefill_kernel_args: tuple[torch.Tensor, torch.Tensor] | None = None

    def prefill_args(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prefill_kernel_args is None:
            width = max(chunk.block_table.numel() for chunk in self.prefills)
            tables = torch.zeros(len(self.prefills), width, dtype=torch.int32)
            for row, chunk in zip(tables, self.prefills, strict=True):
                row[: chunk.block_table.numel()] = chunk.block_table
            chunks = torch.tensor(
                [[c.token_start, c.num_tokens, c.context_len] for c in self.prefills], dtype=torch.int32
            )
            self.prefill_kernel_args = (tables, chunks)
        return self.prefill_kernel_args


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_layer: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D] already stored in kv_layer. Returns [T, H, D]."""
    out = torch.empty_like(q)
    nd = batch.num_decode_tokens
    if nd:
        out[:nd] = kernels.paged_decode_attention(
            q[:nd], kv_layer, batch.decode_block_tables, batch.decode_seq_lens, scale, batch.sliding_window
        )
    if batch.prefills and kernels.prefill_attention_supported(q, kv_layer):
        tables, chunks = batch.prefill_args()
        kernels.paged_prefill_attention(
            q.contiguous(), out, kv_layer, tables, chunks, scale, batch.sliding_window
        )
        return out
    for chunk in batch.prefills:
        rows = slice(chunk.token_start, chunk.token_start + chunk.num_tokens)
        out[rows] = _prefill_attention(q[rows], k[rows], v[rows], kv_layer, chunk, batch, scale)
    return out


def _prefill_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    kv_layer: torch.Tensor,
    chunk: PrefillChunk,
    batch: AttentionBatch,
    scale: float,
) -> torch.Tensor:
    n, ctx = chunk.num_tokens, chunk.context_len
    if ctx == n:
        # No cached prefix: attend to the chunk's own fresh K/V and skip reading the cache back.
        k, v = k_new, v_new
    else:
        blocks = kv_layer.index_select(0, chunk.block_table)  # [nb, 2, bs, KVH, D]
        k = blocks[:, 0].flatten(0, 1)[:ctx]
        v = blocks[:, 1].flatten(0, 1)[:ctx]
    mask = _chunk_mask(n, ctx, batch.sliding_window, q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale,
        enable_gqa=True,
    )
    return out.squeeze(0).transpose(0, 1)


def _chunk_mask(n: int, ctx: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Causal mask for n queries at positions ctx-n .. ctx-1 over keys 0 .. ctx-1; None when plain causal suffices."""
    if n == ctx and (window is None or window >= ctx):
        return None
    q_pos = torch.arange(ctx - n, ctx, device=device).unsqueeze(1)
    k_pos = torch.arange(ctx, device=device).unsqueeze(0)
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed
