"""Triton kernels for the KV cache (the CUDA path), with thin wrappers that validate and launch them.

The wrappers also run under the Triton interpreter (TRITON_INTERPRET=1, set before this module is imported) on
CPU tensors, which is how the tests exercise them without a GPU. Design notes that follow from that and from
the GPU:
- Loaded values are converted to fp32 before any arithmetic: the interpreter computes garbage for bf16
  arithmetic and tl.dot on bf16, and fp32 accumulation is what the API promises anyway. On a GPU, tl.dot on
  fp32 operands uses TF32, which is exact for bf16/fp16 inputs (their mantissas fit); fp32 caches ask for IEEE
  precision instead.
- Out-of-bounds loads and stores are silent (tl.device_assert does nothing in the interpreter and costs on the
  GPU), so every access is masked, including against block and slot ids outside the cache.
- Interpreter cost is per operation rather than per element, so kernels use few programs with large tiles.
- Block ids are widened to int64 before multiplying by strides: a cache layer can exceed 2^31 elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels import validation

# Decode attention: 8 warps, and 64-token tiles up to head_dim 128 else 32, keep the fp32 tiles in registers
# (the tile is also tl.dot's N dimension, so at least 16). Compiled for sm_90, ptxas reports no spills for
# bf16 and fp16 at head_dim 64, 80, 128 and 256, nor for fp32 up to 128 (fp32 at 256 spills about 800
# bytes); 4 warps, or 64-token tiles at head_dim 256, spill.
DECODE_NUM_WARPS = 8
# store_kv: tokens per program x (KV heads x head_dim), in powers of two; 2048 keeps the sm_90 build at 64
# registers (8192 took 254 and starved occupancy of a purely memory-bound copy).
STORE_TILE_ELEMENTS = 2048
COPY_TILE_ELEMENTS = 4096  # gather/scatter: elements of one block copied per program
_MIN_DOT_DIM = 16  # tl.dot needs every dimension >= 16


def _pow2_at_least(n: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(n))


# --------------------------------------------------------------------------------------------------- store_kv


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, kv_ptr, slot_ptr,
    num_tokens, num_slots,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_cb, stride_ckv, stride_ct, stride_ch, stride_cd,
    HEAD_DIM: tl.constexpr, HD: tl.constexpr, HD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_range = tokens < num_tokens
    slots = tl.load(slot_ptr + tokens, mask=in_range, other=-1).to(tl.int64)
    # Negative slots are padding; slots past the cache would write out of bounds, so they are dropped too.
    keep = in_range & (slots >= 0) & (slots < num_slots)

    # One row per token, one column per (head, dim) element, so any key/value strides work (e.g. slices of a
    # fused qkv projection) without a copy.
    elem = tl.arange(0, HD_PAD)
    head, dim = elem // HEAD_DIM, elem % HEAD_DIM
    mask = keep[:, None] & (elem < HD)[None, :]
    tok64 = tokens.to(tl.int64)[:, None]
    key = tl.load(key_ptr + tok64 * stride_kt + (head * stride_kh + dim * stride_kd)[None, :], mask=mask)
    value = tl.load(value_ptr + tok64 * stride_vt + (head * stride_vh + dim * stride_vd)[None, :], mask=mask)

    blocks, offsets = slots // BLOCK_SIZE, slots % BLOCK_SIZE
    dst = (
        kv_ptr
        + (blocks * stride_cb + offsets * stride_ct)[:, None]
        + (head * stride_ch + dim * stride_cd)[None, :]
    )
    tl.store(dst, key, mask=mask)
    tl.store(dst + stride_ckv, value, mask=mask)


def store_kv(
    key: torch.Tensor, value: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    validation.check_store_kv(key, value, kv_layer, slot_mapping)
    slot_mapping = slot_mapping.contiguous()  # the kernel indexes it with unit stride; a no-op in practice
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    num_blocks, _, block_size, num_kv_heads, head_dim = kv_layer.shape
    hd = num_kv_heads * head_dim
    hd_pad = _pow2_at_least(hd)
    block_t = min(_pow2_at_least(num_tokens), _pow2_at_least(STORE_TILE_ELEMENTS // hd_pad))
    grid = (triton.cdiv(num_tokens, block_t),)
    _store_kv_kernel[grid](
        key, value, kv_layer, slot_mapping,
        num_tokens, num_blocks * block_size,
        *key.stride(), *value.stride(), *kv_layer.stride(),
        HEAD_DIM=head_dim, HD=hd, HD_PAD=hd_pad, BLOCK_SIZE=block_size, BLOCK_T=block_t,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- decode attention


@triton.jit
def _paged_decode_kernel(
    q_ptr, kv_ptr, table_ptr, lens_ptr, out_ptr,
    scale_log2, window, num_blocks, table_width,
    stride_qb, stride_qh, stride_qd,
    stride_cb, stride_ckv, stride_ct, stride_ch, stride_cd,
    stride_tb, stride_tn,
    stride_ob, stride_oh, stride_od,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    # One program per (sequence, KV head): the GROUP query heads sharing that KV head (h // GROUP == kv_head)
    # are the rows of one tile, so each K/V tile is loaded once and both products are tl.dot calls.
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(lens_ptr + seq)
    start = tl.maximum(seq_len - window, 0) if HAS_WINDOW else 0

    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, DIM_PAD)
    q_mask = (rows < GROUP)[:, None] & (dims < HEAD_DIM)[None, :]
    q_offsets = (kv_head * GROUP + rows)[:, None] * stride_qh + dims[None, :] * stride_qd
    q = tl.load(q_ptr + seq * stride_qb + q_offsets, mask=q_mask, other=0.0).to(tl.float32)

    # Online softmax in base 2: exp(x * scale) == exp2(x * scale * log2(e)).
    row_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    row_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    cols = tl.arange(0, BLOCK_N)
    table_row = table_ptr + seq.to(tl.int64) * stride_tb
    for tile_start in range(start, seq_len, BLOCK_N):
        positions = tile_start + cols
        logical = positions // BLOCK_SIZE
        valid = (positions < seq_len) & (logical < table_width)
        blocks = tl.load(table_row + logical * stride_tn, mask=valid, other=0).to(tl.int64)
        valid = valid & (blocks >= 0) & (blocks < num_blocks)
        token_offsets = blocks * stride_cb + (positions % BLOCK_SIZE) * stride_ct + kv_head * stride_ch
        kv_offsets = token_offsets[:, None] + dims[None, :] * stride_cd
        kv_mask = valid[:, None] & (dims < HEAD_DIM)[None, :]
        k = tl.load(kv_ptr + kv_offsets, mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(kv_ptr + stride_ckv + kv_offsets, mask=kv_mask, other=0.0).to(tl.float32)

        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [GROUP_PAD, BLOCK_N]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        rescale = tl.exp2(row_max - new_max)  # exp2(-inf) == 0 on the first tile
        probs = tl.exp2(scores - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(probs, axis=1)
        acc = acc * rescale[:, None] + tl.dot(probs, v, input_precision=DOT_PRECISION)
        row_max = new_max

    # A padding row (seq_len <= 0) never enters the loop; give it zeros instead of 0/0.
    out = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]
    out_offsets = (kv_head * GROUP + rows)[:, None] * stride_oh + dims[None, :] * stride_od
    tl.store(out_ptr + seq * stride_ob + out_offsets, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def paged_decode_attention(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    validation.check_paged_decode_attention(query, kv_layer, block_tables, seq_lens, scale, sliding_window)
    seq_lens = seq_lens.contiguous()  # the kernel indexes it with unit stride; a no-op in practice
    batch, num_heads, head_dim = query.shape
    num_blocks, _, block_size, num_kv_heads, _ = kv_layer.shape
    out = query.new_empty(query.shape)  # contiguous whatever query's strides
    if batch == 0:
        return out
    group = num_heads // num_kv_heads
    dim_pad = _pow2_at_least(head_dim, _MIN_DOT_DIM)
    grid = (batch, num_kv_heads)
    _paged_decode_kernel[grid](
        query, kv_layer, block_tables, seq_lens, out,
        float(scale) * 1.4426950408889634,  # log2(e)
        sliding_window or 0, num_blocks, block_tables.shape[1],
        *query.stride(), *kv_layer.stride(), *block_tables.stride(), *out.stride(),
        GROUP=group, GROUP_PAD=_pow2_at_least(group, _MIN_DOT_DIM),
        HEAD_DIM=head_dim, DIM_PAD=dim_pad, BLOCK_SIZE=block_size, BLOCK_N=64 if dim_pad <= 128 else 32,
        HAS_WINDOW=sliding_window is not None,
        DOT_PRECISION="ieee" if kv_layer.dtype == torch.float32 else "tf32",
        num_warps=DECODE_NUM_WARPS,
    )  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------- gather / scatter


@triton.jit
def _copy_blocks_kernel(
    kv_ptr, buf_ptr, ids_ptr,
    num_blocks, block_elements, stride_cb, stride_bb,
    TO_BUFFER: tl.constexpr, TILE: tl.constexpr,
):  # fmt: skip
    # Program (i, t) copies tile t of block ids[i]; a block is block_elements contiguous elements in both.
    index = tl.program_id(0)
    elems = tl.program_id(1) * TILE + tl.arange(0, TILE)
    block = tl.load(ids_ptr + index).to(tl.int64)
    # Ids outside the cache are skipped. The block test is broadcast to the tile before combining: Triton 3.9's
    # interpreter rejects a mask built from a scalar & vector of booleans.
    in_cache = tl.full((TILE,), 1, tl.int1) & (block >= 0) & (block < num_blocks)
    mask = (elems < block_elements) & in_cache
    cache = kv_ptr + block * stride_cb + elems
    buffer = buf_ptr + index.to(tl.int64) * stride_bb + elems
    if TO_BUFFER:
        tl.store(buffer, tl.load(cache, mask=mask), mask=mask)
    else:
        tl.store(cache, tl.load(buffer, mask=mask), mask=mask)


def _check_blocks_contiguous(op: str, name: str, tensor: torch.Tensor) -> None:
    """The copy kernel treats each block as one contiguous run of elements; the block stride is free."""
    if tensor.shape[0] and not tensor[0].is_contiguous():
        raise ValueError(f"{op}: each block of {name} must be contiguous, got strides {tensor.stride()}")


def _copy_blocks(
    kv_layer: torch.Tensor, buffer: torch.Tensor, block_ids: torch.Tensor, to_buffer: bool
) -> None:
    count = block_ids.shape[0]
    if count == 0:
        return
    block_ids = block_ids.contiguous()  # the kernel indexes it with unit stride; a no-op in practice
    block_elements = kv_layer[0].numel()
    tile = min(_pow2_at_least(block_elements), COPY_TILE_ELEMENTS)
    grid = (count, triton.cdiv(block_elements, tile))
    _copy_blocks_kernel[grid](
        kv_layer, buffer, block_ids,
        kv_layer.shape[0], block_elements, kv_layer.stride(0), buffer.stride(0),
        TO_BUFFER=to_buffer, TILE=tile,
    )  # fmt: skip


def gather_blocks(
    kv_layer: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    validation.check_gather_blocks(kv_layer, block_ids, out)
    _check_blocks_contiguous("gather_blocks", "kv_layer", kv_layer)
    if out is None:
        out = kv_layer.new_empty((block_ids.shape[0], *kv_layer.shape[1:]))
    _copy_blocks(kv_layer, out, block_ids, to_buffer=True)
    return out


def scatter_blocks(buffer: torch.Tensor, kv_layer: torch.Tensor, block_ids: torch.Tensor) -> None:
    validation.check_scatter_blocks(buffer, kv_layer, block_ids)
    _check_blocks_contiguous("scatter_blocks", "kv_layer", kv_layer)
    _check_blocks_contiguous("scatter_blocks", "buffer", buffer)
    _copy_blocks(kv_layer, buffer, block_ids, to_buffer=False)
