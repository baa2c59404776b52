"""Cheap argument checks shared by the CPU and Triton paths.

They look only at shapes, dtypes and devices, never at tensor contents, so they cost a few attribute reads and
never synchronise with a GPU. Every failure raises ValueError naming the operation and the mismatch.
"""

from __future__ import annotations

import math

import torch

CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


def _fail(op: str, message: str) -> ValueError:
    return ValueError(f"{op}: {message}")


def check_kv_layer(op: str, kv_layer: torch.Tensor) -> tuple[int, int, int, int]:
    """Validate a cache layer; returns (num_blocks, block_size, num_kv_heads, head_dim)."""
    if not isinstance(kv_layer, torch.Tensor):
        raise _fail(op, f"kv_layer must be a torch.Tensor, got {type(kv_layer).__name__}")
    if kv_layer.dim() != 5 or kv_layer.shape[1] != 2:
        raise _fail(
            op,
            "kv_layer must have shape [num_blocks, 2, block_size, num_kv_heads, head_dim], "
            f"got {tuple(kv_layer.shape)}",
        )
    if kv_layer.dtype not in CACHE_DTYPES:
        raise _fail(op, f"kv_layer dtype {kv_layer.dtype} is not one of {CACHE_DTYPES}")
    num_blocks, _, block_size, num_kv_heads, head_dim = kv_layer.shape
    # Slot arithmetic (slot // block_size) and the kernels' shifts assume a power of two.
    if block_size <= 0 or block_size & (block_size - 1):
        raise _fail(op, f"block_size must be a power of two, got {block_size}")
    if num_kv_heads == 0 or head_dim == 0:
        raise _fail(op, f"kv_layer has an empty head dimension: {tuple(kv_layer.shape)}")
    return num_blocks, block_size, num_kv_heads, head_dim


def _check_index(op: str, name: str, index: torch.Tensor, dims: int, device: torch.device) -> None:
    if not isinstance(index, torch.Tensor):
        raise _fail(op, f"{name} must be a torch.Tensor, got {type(index).__name__}")
    if index.dim() != dims:
        raise _fail(op, f"{name} must be {dims}-D, got shape {tuple(index.shape)}")
    if index.dtype not in INDEX_DTYPES:
        raise _fail(op, f"{name} must be int32 or int64, got {index.dtype}")
    _check_device(op, name, index, device)


def _check_device(op: str, name: str, tensor: torch.Tensor, device: torch.device) -> None:
    if tensor.device != device:
        raise _fail(op, f"{name} is on {tensor.device} but kv_layer is on {device}")


def _check_data(op: str, name: str, tensor: torch.Tensor, kv_layer: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise _fail(op, f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype != kv_layer.dtype:
        raise _fail(op, f"{name} dtype {tensor.dtype} does not match kv_layer dtype {kv_layer.dtype}")
    _check_device(op, name, tensor, kv_layer.device)


def check_store_kv(
    key: torch.Tensor, value: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    op = "store_kv"
    _, _, num_kv_heads, head_dim = check_kv_layer(op, kv_layer)
    _check_data(op, "key", key, kv_layer)
    _check_data(op, "value", value, kv_layer)
    if key.dim() != 3 or tuple(key.shape[1:]) != (num_kv_heads, head_dim):
        raise _fail(op, f"key must have shape [T, {num_kv_heads}, {head_dim}], got {tuple(key.shape)}")
    if value.shape != key.shape:
        raise _fail(op, f"value shape {tuple(value.shape)} does not match key shape {tuple(key.shape)}")
    _check_index(op, "slot_mapping", slot_mapping, 1, kv_layer.device)
    if slot_mapping.shape[0] != key.shape[0]:
        raise _fail(op, f"slot_mapping has {slot_mapping.shape[0]} entries but key has {key.shape[0]} tokens")


def check_paged_decode_attention(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> None:
    op = "paged_decode_attention"
    _, _, num_kv_heads, head_dim = check_kv_layer(op, kv_layer)
    _check_data(op, "query", query, kv_layer)
    if query.dim() != 3 or query.shape[2] != head_dim:
        raise _fail(op, f"query must have shape [B, H, {head_dim}], got {tuple(query.shape)}")
    if query.shape[1] % num_kv_heads:
        raise _fail(op, f"query has {query.shape[1]} heads, not a multiple of {num_kv_heads} KV heads")
    batch = query.shape[0]
    _check_index(op, "block_tables", block_tables, 2, kv_layer.device)
    _check_index(op, "seq_lens", seq_lens, 1, kv_layer.device)
    if block_tables.shape[0] != batch or seq_lens.shape[0] != batch:
        raise _fail(
            op,
            f"batch sizes differ: query {batch}, block_tables {block_tables.shape[0]}, "
            f"seq_lens {seq_lens.shape[0]}",
        )
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise _fail(op, f"scale must be a finite float, got {scale!r}")
    if sliding_window is not None and (
        isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1
    ):
        raise _fail(op, f"sliding_window must be None or a positive int, got {sliding_window!r}")


def _check_block_buffer(op: str, name: str, buffer: torch.Tensor, kv_layer: torch.Tensor, count: int) -> None:
    _check_data(op, name, buffer, kv_layer)
    expected = (count, *kv_layer.shape[1:])
    if tuple(buffer.shape) != expected:
        raise _fail(op, f"{name} must have shape {expected}, got {tuple(buffer.shape)}")


def check_gather_blocks(kv_layer: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor | None) -> None:
    op = "gather_blocks"
    check_kv_layer(op, kv_layer)
    _check_index(op, "block_ids", block_ids, 1, kv_layer.device)
    if out is not None:
        _check_block_buffer(op, "out", out, kv_layer, block_ids.shape[0])
        # The CPU path writes through index_select(out=...), the kernel through a flat pointer.
        if not out.is_contiguous():
            raise _fail(op, "out must be contiguous")


def check_scatter_blocks(buffer: torch.Tensor, kv_layer: torch.Tensor, block_ids: torch.Tensor) -> None:
    op = "scatter_blocks"
    check_kv_layer(op, kv_layer)
    _check_index(op, "block_ids", block_ids, 1, kv_layer.device)
    _check_block_buffer(op, "buffer", buffer, kv_layer, block_ids.shape[0])
