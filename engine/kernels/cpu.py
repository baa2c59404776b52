"""CPU implementations of the KV-cache kernels, tuned for a small (2-core, AVX-512) host.

Arguments are assumed to be validated already (engine.kernels does it).

Decode attention, prefill attention and the K/V store run in C++ (csrc/, built by engine/kernels/cpu_native.py)
where it could be built: decode attention reads K/V in place, where the torch version below copies them three times;
prefill attention (bf16 only) replaces torch's SDPA per chunk in engine/models/attention.py. The torch versions stay
as the fallback; the notes below are the design of the torch decode attention.

Decode attention does not use scaled_dot_product_attention: with q_len=1 in bf16 it was measured very slow on
CPU (32 ms/layer at batch 32 against 4.8 ms in fp32 with expanded KV heads); with the grouped [B, KVH, G, D]
layout and a boolean mask it took 5-11 ms here, still no faster than the chunked matmuls below. It gathers K/V
blocks with index_select and runs grouped batched matmuls in fp32 instead. Sequences are sorted by length and
processed in chunks whose padded K stays under an element budget: short sequences share one batched matmul,
long ones are not padded to the batch's longest (decode batches mix lengths widely), and each chunk's gathered
K/V stays small. Padding the whole batch to its longest sequence was the slowest variant: the big gather
buffers are fresh allocations, page-faulted on every call. Measured with torch.set_num_threads(2), H=8, D=64,
block 16, median of 5x10 calls, in ms (this host is noisy, +-30%):

    batch, lengths, dtype, KVH   per-sequence   chunked (2^18)   pad-to-max fp32   pad-to-max bf16 matmul
    32, 100-1000, bf16, 2            3.9             3.5              25.8                5.7
    32, 100-1000, bf16, 4            5.2             5.1              50                  13.7
    32, 100-1000, fp32, 2            5.6             4.5              70                  -
    32, 100-1000, fp32, 4            8.3             7.9              67                  -
    128, 10-100, bf16, 2             10.3            1.4              2.9                 1.5
    64, 100-400, bf16, 2             6.7             3.3              6.2                 -
    8, 2000-4000, bf16, 4            4.6             4.6              57                  -

The bf16-matmul variant (bf16 scores and probabilities) was also less accurate, so all math is in fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from engine.kernels import cpu_native

# Largest padded K size (chunk rows x longest row's tokens x KV heads x head_dim, in elements) handled by one
# batched matmul, so that a chunk's fp32 K and V (1 MiB each) stay near the core's cache. Chosen from the
# measurements above (2^17..2^19 were within noise; 2^20 and up hit the slow padded cases); a sequence longer
# than this forms a chunk on its own.
CHUNK_ELEMENT_BUDGET = 1 << 18

_T = TypeVar("_T")


def store_kv(
    key: torch.Tensor, value: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    slots = slot_mapping.to(torch.int64)
    compiled = cpu_native.native()
    if compiled is not None and _rows_dense(key) and _rows_dense(value) and _rows_dense(kv_layer, dims=2):
        compiled.store_kv(key, value, kv_layer, slots.contiguous())  # C++: two row copies per token
        return
    keep = slots >= 0
    if not bool(keep.all()):  # drop padding tokens; the common case (no padding) skips the copies
        slots, key, value = slots[keep], key[keep], value[keep]
    block_size = kv_layer.shape[2]
    blocks, offsets = slots // block_size, slots % block_size
    # Advanced indexing works on any kv_layer strides and raises IndexError for slots past the cache.
    kv_layer[blocks, 0, offsets] = key
    kv_layer[blocks, 1, offsets] = value


def _rows_dense(tensor: torch.Tensor, dims: int = 2) -> bool:
    """Whether the last `dims` dimensions are laid out densely (row-major), whatever the strides before them."""
    expected = 1
    for size, stride in zip(reversed(tensor.shape[-dims:]), reversed(tensor.stride()[-dims:]), strict=True):
        if size > 1 and stride != expected:
            return False
        expected *= size
    return True


def gather_blocks(
    kv_layer: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    if out is None:
        return kv_layer.index_select(0, block_ids)
    return torch.index_select(kv_layer, 0, block_ids, out=out)


def scatter_blocks(buffer: torch.Tensor, kv_layer: torch.Tensor, block_ids: torch.Tensor) -> None:
    kv_layer.index_copy_(0, block_ids.to(torch.int64), buffer)


def paged_decode_attention(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The C++ kernel (engine/kernels/cpu_native.py) where it is built, else the torch ops below."""
    compiled = cpu_native.native()
    if compiled is None or kv_layer.stride(-1) != 1:
        return torch_paged_decode_attention(query, kv_layer, block_tables, seq_lens, scale, sliding_window)
    tables, lens = _checked_decode_indices(block_tables, seq_lens, kv_layer)
    return compiled.paged_decode_attention(
        query.contiguous(), kv_layer, tables, lens, float(scale), sliding_window or 0
    )


class _LastChecked:
    """The index tensors a check last passed, and what it returned: every layer of a step passes the same ones.

    The kernels trust their indices, so the wrappers check them, with a handful of small torch ops (~70 us); the
    layers of a step share one block table, so this lets the checks run once per step instead of once per layer.
    The entry holds the tensors themselves, so their ids cannot be reused while it stands, and their versions (plus
    the sizes they were checked against), so an in-place edit or another cache is checked afresh. Inference tensors
    (made under torch.inference_mode) keep no version, so they are checked every time.
    """

    def __init__(self) -> None:
        self._entry: tuple[tuple[torch.Tensor, ...], tuple[int, ...], object] | None = None

    def get(self, tensors: tuple[torch.Tensor, ...], sizes: tuple[int, ...], check: Callable[[], _T]) -> _T:
        if any(t.is_inference() for t in tensors):
            return check()
        stamp = tuple(t._version for t in tensors) + sizes
        entry = self._entry
        if (
            entry is not None
            and entry[1] == stamp
            and all(a is b for a, b in zip(entry[0], tensors, strict=True))
        ):
            return entry[2]  # type: ignore[return-value]
        result = check()
        self._entry = (tensors, stamp, result)
        return result


_decode_indices = _LastChecked()


def _checked_decode_indices(
    block_tables: torch.Tensor, seq_lens: torch.Tensor, kv_layer: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 contiguous (tables, lens) whose block ids lie inside kv_layer and fit the table's width."""
    num_blocks, block_size = kv_layer.shape[0], kv_layer.shape[2]

    def check() -> tuple[torch.Tensor, torch.Tensor]:
        lens = seq_lens.to(torch.int32).contiguous()
        # The kernel trusts its indices, so they are checked here, as index_select checks them for the torch ops.
        _check_table_capacity(
            (lens.to(torch.int64).clamp_min(0) + block_size - 1) // block_size, block_tables.shape[1]
        )
        tables = block_tables.to(torch.int32).contiguous()
        if tables.numel() and (int(tables.min()) < 0 or int(tables.max()) >= num_blocks):
            raise IndexError(f"paged_decode_attention: block_tables name blocks outside 0..{num_blocks - 1}")
        return tables, lens

    return _decode_indices.get((block_tables, seq_lens), (num_blocks, block_size), check)


def torch_paged_decode_attention(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Decode attention in torch ops: the fallback, and the measured design notes at the top of this module."""
    block_size = kv_layer.shape[2]
    lens = seq_lens.to(torch.int64).clamp_min(0)
    starts = lens - sliding_window if sliding_window is not None else torch.zeros_like(lens)
    starts = starts.clamp_min(0)
    first_blocks = starts // block_size
    block_counts = (lens + block_size - 1) // block_size - first_blocks  # 0 for empty (padding) rows
    _check_table_capacity(first_blocks + block_counts, block_tables.shape[1])

    out = query.new_zeros(query.shape)  # padding rows (seq_len 0) stay zero
    order = torch.argsort(block_counts)
    block_elements = block_size * kv_layer.shape[3] * kv_layer.shape[4]
    for lo, hi, width in _chunks(block_counts[order].tolist(), block_elements):
        rows = order[lo:hi]
        result = _attend_chunk(query, kv_layer, block_tables, rows, lens, starts, first_blocks, width, scale)
        out.index_copy_(0, rows, result.to(query.dtype))
    return out


def _check_table_capacity(blocks_needed: torch.Tensor, table_width: int) -> None:
    # Reading past a row of block_tables would silently attend to another sequence's row.
    most = int(blocks_needed.max()) if blocks_needed.numel() else 0
    if most > table_width:
        raise ValueError(
            f"paged_decode_attention: a sequence needs {most} blocks "
            f"but block_tables has only {table_width} columns"
        )


def _chunks(sorted_counts: list[int], block_elements: int) -> list[tuple[int, int, int]]:
    """Split rows sorted by block count into (lo, hi, width) runs whose padded K fits CHUNK_ELEMENT_BUDGET."""
    chunks: list[tuple[int, int, int]] = []
    lo = 0
    while lo < len(sorted_counts) and sorted_counts[lo] == 0:  # empty rows need no work
        lo += 1
    for i in range(lo, len(sorted_counts)):
        # Counts ascend, so row i is the widest of lo..i.
        if i > lo and (i - lo + 1) * sorted_counts[i] * block_elements > CHUNK_ELEMENT_BUDGET:
            chunks.append((lo, i, sorted_counts[i - 1]))
            lo = i
    if lo < len(sorted_counts):
        chunks.append((lo, len(sorted_counts), sorted_counts[-1]))
    return chunks


def _attend_chunk(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    rows: torch.Tensor,
    lens: torch.Tensor,
    starts: torch.Tensor,
    first_blocks: torch.Tensor,
    width: int,
    scale: float,
) -> torch.Tensor:
    """fp32 attention for `rows` of the batch, each reading `width` blocks from its first needed one."""
    n, num_heads, head_dim = len(rows), query.shape[1], query.shape[2]
    block_size, num_kv_heads = kv_layer.shape[2], kv_layer.shape[3]
    length = width * block_size

    # Columns past a short row's last block still name a valid table entry (clamped); the mask hides them.
    columns = (first_blocks[rows, None] + torch.arange(width)).clamp_(max=block_tables.shape[1] - 1)
    blocks = block_tables[rows].gather(1, columns)
    gathered = kv_layer.index_select(0, blocks.reshape(-1)).view(
        n, width, 2, block_size, num_kv_heads, head_dim
    )
    # Upcast the strided K/V views first: that copy comes out dense, so the reshape after it is free
    # (reshaping first would copy once more). For fp32 caches .float() is a no-op and reshape copies once.
    keys = gathered[:, :, 0].float().reshape(n, length, num_kv_heads, head_dim)
    values = gathered[:, :, 1].float().reshape(n, length, num_kv_heads, head_dim)

    positions = first_blocks[rows, None] * block_size + torch.arange(length)
    hidden = (positions < starts[rows, None]) | (positions >= lens[rows, None])

    # Grouped layout: the G query heads sharing a KV head form the rows of one matmul (repeat_kv's h // G
    # rule).
    q = query[rows].float().view(n, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.matmul(q, keys.permute(0, 2, 3, 1)).mul_(scale)  # [n, KVH, G, L]
    scores.masked_fill_(hidden[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, values.transpose(1, 2)).view(n, num_heads, head_dim)


def prefill_attention_supported(query: torch.Tensor, kv_layer: torch.Tensor) -> bool:
    """Whether the C++ prefill-attention kernel serves this case (bf16, a head_dim the build has, AVX-512 BF16)."""
    if query.dtype != torch.bfloat16 or kv_layer.dtype != torch.bfloat16 or kv_layer.stride(-1) != 1:
        return False
    compiled = cpu_native.native()
    return compiled is not None and bool(compiled.prefill_attention_supported(query.shape[-1]))


def paged_prefill_attention(
    query: torch.Tensor,
    out: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    chunks: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> None:
    """Prefill chunks' attention written into out's rows by the C++ kernel (csrc/paged_prefill_cpu.cpp).

    query and out: [T, H, D] bf16 contiguous; chunks: [C, 3] int32 rows (first query row, query rows n, context
    length ctx: the chunk's queries sit at positions ctx - n .. ctx - 1 and see keys from position 0, causally);
    block_tables: [C, max_blocks] int32. The kernel trusts its indices, so they are checked here.
    """
    compiled = cpu_native.native()
    if compiled is None or not prefill_attention_supported(query, kv_layer):
        raise ValueError(
            "paged_prefill_attention: no C++ kernel for this case (see prefill_attention_supported)"
        )
    if not (
        query.is_contiguous()
        and out.is_contiguous()
        and out.shape == query.shape
        and out.dtype == query.dtype
    ):
        raise ValueError("paged_prefill_attention: query and out must be contiguous [T, H, D] tensors alike")
    if query.shape[1] % kv_layer.shape[3] or query.shape[2] != kv_layer.shape[4]:
        raise ValueError("paged_prefill_attention: query heads/dim do not fit kv_layer's KV heads/dim")
    if (
        chunks.dtype != torch.int32
        or block_tables.dtype != torch.int32
        or chunks.shape[0] != block_tables.shape[0]
    ):
        raise ValueError(
            "paged_prefill_attention: chunks [C, 3] and block_tables [C, max_blocks] must be int32"
        )
    # Checked on every call (unlike decode's, once per step): the step's prefill tables are made under
    # inference_mode, which keeps no version to tell an edit by; a step has few prefill chunks.
    if chunks.numel():
        first, n, ctx = chunks[:, 0].long(), chunks[:, 1].long(), chunks[:, 2].long()
        block_size = kv_layer.shape[2]
        if bool((n < 1).any() or (ctx < n).any() or (first < 0).any() or (first + n > query.shape[0]).any()):
            raise IndexError("paged_prefill_attention: a chunk's rows or context fall outside the batch")
        if int(((ctx + block_size - 1) // block_size).max()) > block_tables.shape[1]:
            raise ValueError(
                "paged_prefill_attention: a chunk needs more blocks than block_tables has columns"
            )
        if int(block_tables.min()) < 0 or int(block_tables.max()) >= kv_layer.shape[0]:
            raise IndexError(
                f"paged_prefill_attention: block_tables name blocks outside 0..{kv_layer.shape[0] - 1}"
            )
    compiled.paged_prefill_attention(
        query,
        out,
        kv_layer,
        block_tables.contiguous(),
        chunks.contiguous(),
        float(scale),
        sliding_window or 0,
    )
