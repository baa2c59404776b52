"""Paged KV-cache kernels: writing K/V, decode attention, and block copies for KV transfer.

Cache layout (the rest of the engine relies on it): per transformer layer one tensor `kv_layer` of shape
`[num_blocks, 2, block_size, num_kv_heads, head_dim]`; index 0 of dim 1 holds K, index 1 holds V. The token at
absolute position p of a sequence lives in block `block_table[p // block_size]` at offset `p % block_size`;
its "slot" is `block_id * block_size + offset`. block_size is a power of two. Supported dtypes: float32,
bfloat16, float16.

Every function dispatches on kv_layer's device: CUDA tensors go to the Triton kernels
(engine.kernels.triton_kernels, imported only then, so CPU users never import Triton), anything else to the
torch implementation in engine.kernels.cpu. Arguments are checked by shape, dtype and device only (never by
content, so nothing synchronises with the GPU) and a mismatch raises ValueError. Out-of-range slot or block
ids are caller bugs: the CPU path raises IndexError, the CUDA kernels skip them rather than touch memory
outside the cache.
"""

from __future__ import annotations

from types import ModuleType

import torch

from engine.kernels import cpu, cpu_native, validation

__all__ = [
    "gather_blocks",
    "paged_decode_attention",
    "paged_prefill_attention",
    "prefill_attention_supported",
    "prepare",
    "scatter_blocks",
    "store_kv",
]


def prepare(device: torch.device) -> None:
    """Load (or build, once per machine) the kernels `device` will use, so that no request waits for a compiler."""
    if device.type == "cpu":
        cpu_native.native()


def _triton() -> ModuleType:
    # Imported on first CUDA use: importing Triton is slow and pointless on CPU-only hosts.
    from engine.kernels import triton_kernels

    return triton_kernels


def store_kv(
    key: torch.Tensor, value: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write key[t] and value[t] (each [T, KVH, D]) into slot slot_mapping[t]; negative slots are skipped."""
    if _on_cuda(kv_layer):
        _triton().store_kv(key, value, kv_layer, slot_mapping)
        return
    validation.check_store_kv(key, value, kv_layer, slot_mapping)
    cpu.store_kv(key, value, kv_layer, slot_mapping)


def paged_decode_attention(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence over its cached K/V; returns [B, H, D] in query's dtype.

    query is [B, H, D], the token at position seq_lens[b] - 1 (its K/V already stored). Sequence b attends to
    positions [max(0, seq_len - sliding_window), seq_len), or [0, seq_len) without a window, reading block ids
    from row b of block_tables ([B, max_blocks]; unused entries may hold any valid block id or 0). GQA follows
    Hugging Face's repeat_kv: query head h reads KV head h // (H // KVH). Softmax and accumulation run in
    fp32. A row with seq_len <= 0 (batch padding) yields zeros.
    """
    if _on_cuda(kv_layer):
        return _triton().paged_decode_attention(
            query, kv_layer, block_tables, seq_lens, scale, sliding_window
        )
    validation.check_paged_decode_attention(query, kv_layer, block_tables, seq_lens, scale, sliding_window)
    return cpu.paged_decode_attention(query, kv_layer, block_tables, seq_lens, scale, sliding_window)


def prefill_attention_supported(query: torch.Tensor, kv_layer: torch.Tensor) -> bool:
    """Whether paged_prefill_attention has a kernel for this case; else attention.py runs torch's SDPA per chunk."""
    return not _on_cuda(kv_layer) and cpu.prefill_attention_supported(query, kv_layer)


def paged_prefill_attention(
    query: torch.Tensor,
    out: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    chunks: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> None:
    """Every prefill chunk's attention over its paged K/V in one call, written into out's rows (CPU kernel only).

    chunks: [C, 3] int32 (first query row, query rows n, context length ctx); chunk c's queries sit at positions
    ctx - n .. ctx - 1, their K/V already stored, and attend causally to positions from 0 (from p - window + 1
    with a sliding window), reading block ids from row c of block_tables ([C, max_blocks] int32).
    """
    cpu.paged_prefill_attention(query, out, kv_layer, block_tables, chunks, scale, sliding_window)


def gather_blocks(
    kv_layer: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Copy the blocks block_ids ([n]) into a contiguous [n, 2, block_size, KVH, D] buffer (out, if given)."""
    if _on_cuda(kv_layer):
        return _triton().gather_blocks(kv_layer, block_ids, out)
    validation.check_gather_blocks(kv_layer, block_ids, out)
    return cpu.gather_blocks(kv_layer, block_ids, out)


def scatter_blocks(buffer: torch.Tensor, kv_layer: torch.Tensor, block_ids: torch.Tensor) -> None:
    """Inverse of gather_blocks: write buffer[i] ([n, 2, block_size, KVH, D]) into block block_ids[i]."""
    if _on_cuda(kv_layer):
        _triton().scatter_blocks(buffer, kv_layer, block_ids)
        return
    validation.check_scatter_blocks(buffer, kv_layer, block_ids)
    cpu.scatter_blocks(buffer, kv_layer, block_ids)


def _on_cuda(kv_layer: torch.Tensor) -> bool:
    # A non-tensor kv_layer takes the CPU branch, whose validation names the problem.
    return isinstance(kv_layer, torch.Tensor) and kv_layer.is_cuda
