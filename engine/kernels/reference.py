"""Plain torch reference implementations of the KV-cache kernels.

They favour being obviously correct over speed (Python loops over tokens, sequences and blocks) and are what
the fast paths are tested against. They do not validate their arguments; engine.kernels has the checked entry
points.
"""

from __future__ import annotations

import torch


def store_kv_reference(
    key: torch.Tensor, value: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    block_size = kv_layer.shape[2]
    for token, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:  # padding token
            continue
        block, offset = divmod(slot, block_size)
        kv_layer[block, 0, offset] = key[token]
        kv_layer[block, 1, offset] = value[token]


def paged_decode_attention_reference(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    num_heads = query.shape[1]
    block_size, num_kv_heads = kv_layer.shape[2], kv_layer.shape[3]
    group = num_heads // num_kv_heads
    out = query.new_zeros(query.shape)
    for b, seq_len in enumerate(seq_lens.tolist()):
        if seq_len <= 0:  # padding row: nothing to attend to
            continue
        start = 0 if sliding_window is None else max(0, seq_len - sliding_window)
        positions = range(start, seq_len)
        blocks = [int(block_tables[b, p // block_size]) for p in positions]
        offsets = [p % block_size for p in positions]
        keys = kv_layer[blocks, 0, offsets].float()  # [n, KVH, D]
        values = kv_layer[blocks, 1, offsets].float()
        # Hugging Face repeat_kv: query head h reads KV head h // group.
        keys = keys.repeat_interleave(group, dim=1)  # [n, H, D]
        values = values.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", query[b].float(), keys) * scale
        probs = torch.softmax(scores, dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", probs, values).to(query.dtype)
    return out


def gather_blocks_reference(
    kv_layer: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    if out is None:
        out = kv_layer.new_empty((block_ids.shape[0], *kv_layer.shape[1:]))
    for i, block in enumerate(block_ids.tolist()):
        out[i] = kv_layer[block]
    return out


def scatter_blocks_reference(buffer: torch.Tensor, kv_layer: torch.Tensor, block_ids: torch.Tensor) -> None:
    for i, block in enumerate(block_ids.tolist()):
        kv_layer[block] = buffer[i]
